"""Name -> optimizer class registry: the single way the callback, the CLI and users build optimizers.

Entries are ``"module:Class"`` strings imported on first use, so importing the registry is cheap.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported by the optimizers' own modules: the names are readable without it
    import torch

__all__ = ["OPTIMIZERS", "available_optimizers", "optimizer_class", "build_optimizer", "register_optimizer",
           "unknown_optimizer_message", "optimizer_keywords"]

OPTIMIZERS: dict[str, str] = {
    "adamw": "torch.optim:AdamW",
    "adamw_8bit": "lowmem_lightning.optim.adamw8bit:AdamW8bit",
    "adamw_4bit": "lowmem_lightning.optim.adamw4bit:AdamW4bit",
    "paged_adamw_8bit": "lowmem_lightning.optim.paged:PagedAdamW8bit",
    "sgd": "lowmem_lightning.optim.sgd:SGD",
    "adafactor": "lowmem_lightning.optim.adafactor:Adafactor",
    "came": "lowmem_lightning.optim.came:CAME",
    "lion": "lowmem_lightning.optim.lion:Lion",
    "lion_8bit": "lowmem_lightning.optim.lion:Lion8bit",
    "ademamix": "lowmem_lightning.optim.ademamix:AdEMAMix",
    "ademamix_8bit": "lowmem_lightning.optim.ademamix:AdEMAMix8bit",
    "muon": "lowmem_lightning.optim.muon:Muon",
    "muon_8bit": "lowmem_lightning.optim.muon:Muon8bit",
}
"""Registered names and where their classes live."""

_CLASSES: dict[str, type] = {}


def available_optimizers() -> list[str]:
    """Every valid optimizer name, sorted."""
    return sorted(set(OPTIMIZERS) | set(_CLASSES))


def unknown_optimizer_message(name: object, what: str = "Unknown optimizer ") -> str:
    """The error for an optimizer name that is not registered: ``what`` and the name, every valid name, and the
    closest one when the name looks like a typo (``'adamw_8bitt'``: did you mean ``'adamw_8bit'``?)."""
    names = available_optimizers()
    message = f"{what}{name!r}: expected one of {', '.join(names)}."
    close = difflib.get_close_matches(name.lower(), names, n=1, cutoff=0.75) if isinstance(name, str) else []
    return f"{message} Did you mean {close[0]!r}?" if close else message


def register_optimizer(name: str, cls_or_path: type | str) -> None:
    """Register ``name`` for a class (or a ``"module:Class"`` path) so ``build_optimizer`` can build it."""
    if isinstance(cls_or_path, str):
        OPTIMIZERS[name] = cls_or_path
        _CLASSES.pop(name, None)
    else:
        _CLASSES[name] = cls_or_path


def optimizer_class(name: str) -> type:
    """The class registered under ``name``; ``ValueError`` listing every valid name otherwise."""
    if not isinstance(name, str) or name not in OPTIMIZERS and name not in _CLASSES:
        raise ValueError(unknown_optimizer_message(name))
    if name not in _CLASSES:
        module_name, _, cls_name = OPTIMIZERS[name].partition(":")
        _CLASSES[name] = getattr(importlib.import_module(module_name), cls_name)
    return _CLASSES[name]


def build_optimizer(name: str, params: Iterable[torch.Tensor] | Iterable[dict], **kwargs) -> torch.optim.Optimizer:
    """Build the optimizer registered as ``name`` over ``params`` (tensors or param-group dicts).

    ``kwargs`` go to the optimizer's constructor, which validates them (``ValueError`` naming the
    argument). Unknown names raise ``ValueError`` listing every valid name.
    """
    cls = optimizer_class(name)
    try:
        optimizer = cls(params, **kwargs)
    except TypeError as err:
        unknown = sorted(set(kwargs) - set(_keywords(cls))) if "unexpected keyword" in str(err) else []
        allowed = f" ({', '.join(unknown)}: {cls.__name__} takes {', '.join(_keywords(cls))})" if unknown else ""
        raise ValueError(f"Invalid arguments for optimizer {name!r} ({cls.__name__}): {err}{allowed}") from err
    _warn_nearest_low_precision(name, optimizer)
    return optimizer


def _warn_nearest_low_precision(name: str, optimizer: torch.optim.Optimizer) -> None:
    """One ``LowMemWarning`` (rank 0) when a torch optimizer (``adamw``: ``torch.optim.AdamW``) steps bf16/fp16
    params: it keeps its state in the params' dtype and rounds each update to nearest, so an update under half an
    ulp of a weight (2**-9 of it in bf16) is lost, silently. This package's optimizers round stochastically."""
    cls = type(optimizer)
    if not cls.__module__.startswith("torch.optim"):
        return
    import torch

    low = [p for group in optimizer.param_groups for p in group["params"]
           if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)]
    if not low or (torch.distributed.is_available() and torch.distributed.is_initialized()
                   and torch.distributed.get_rank() != 0):
        return
    import warnings

    from lowmem_lightning.lowmem_warning import LowMemWarning

    dtype = str(low[0].dtype).removeprefix("torch.")
    warnings.warn(
        f"optimizer {name!r} (torch.optim.{cls.__name__}) steps {sum(p.numel() for p in low):,} {dtype} params: it "
        f"keeps its state in {dtype} and rounds each update to nearest, so an update under half an ulp of its weight "
        f"(2^-{9 if dtype == 'bfloat16' else 12} of the weight in {dtype}) is lost. For a full-precision "
        "baseline train fp32 weights (precision 32-true or bf16-mixed); for bf16 weights use this package's "
        "optimizers (adamw_8bit, adamw_4bit, ...), which round stochastically.", LowMemWarning, stacklevel=3)


def optimizer_keywords(name: str) -> list[str]:
    """The keyword arguments the registered optimizer ``name``'s constructor takes (``params`` aside), in order."""
    return _keywords(optimizer_class(name))


def _keywords(cls: type) -> list[str]:
    """The keyword arguments of ``cls``'s constructor (``params`` aside), in order; empty when unknown."""
    import inspect

    try:
        parameters = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in parameters if p.name not in ("self", "params") and p.kind not in (p.VAR_POSITIONAL,
                                                                                             p.VAR_KEYWORD)]
