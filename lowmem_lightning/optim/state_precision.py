"""Which params keep 32-bit optimizer state: the ``fp32_state`` option, resolved to param groups.

bitsandbytes users exempt chosen params from 8-bit state (``GlobalOptimManager.register_module_override(module,
"weight", {"optim_bits": 32})``), and HF ``Trainer`` does it for every ``nn.Embedding`` under a bitsandbytes 8-bit
optimizer. Here the same choice is the param-group key ``quantize_state=False`` (:func:`.layout.quantizes_state`),
and ``fp32_state`` names the params that get it, by module class or by name:

* a module class (``torch.nn.Embedding``) or its import path as a string (``"torch.nn.Embedding"``, what YAML
  gives): every param owned by a module of that class;
* ``"embeddings"``: ``nn.Embedding`` and ``nn.EmbeddingBag`` (HF Trainer's rule);
* any other string is a pattern (:func:`fnmatch.fnmatchcase`, ``*`` and ``?``) matched against each param's
  qualified name (``model.embed_tokens.weight``) and the name of its module (``lm_head``), whole or from a dot on
  (``lm_head`` selects ``model.lm_head`` of a LightningModule holding the HF model as ``self.model``).

:func:`split_param_groups` moves the chosen params of each group into a group of their own (every other key of
the user's group kept) with ``quantize_state=False``; the callback, ``LowMemModule``, ``lowmem estimate`` and the
convergence benchmark all use it. This module imports no Lightning.
"""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .layout import QUANTIZE_STATE

__all__ = ["EMBEDDINGS", "Fp32State", "parse_fp32_state", "check_fp32_state", "fp32_state_params", "unmatched_message",
           "split_param_groups"]

EMBEDDINGS = "embeddings"
"""The ``fp32_state`` shorthand for every ``nn.Embedding`` and ``nn.EmbeddingBag`` (what HF Trainer exempts)."""

_ALLOWED = ("a module class (torch.nn.Embedding), its import path ('torch.nn.Embedding'), 'embeddings', or a "
            "name pattern ('*embed_tokens*', 'lm_head'), or a list of these")


@dataclass(frozen=True)
class Fp32State:
    """A parsed ``fp32_state``: per entry as given (a class or a string, kept for messages), the module classes it
    selects (empty for a pattern) and its name pattern (None for a class)."""

    entries: tuple[tuple[object, tuple[type, ...], str | None], ...]

    def matches(self, module: nn.Module, module_name: str, param_name: str) -> list[int]:
        """Indices of the entries that select the param ``param_name`` of ``module`` (called ``module_name``)."""
        return [k for k, (_, classes, pattern) in enumerate(self.entries)
                if (classes and isinstance(module, classes))
                or (pattern is not None and (_named(param_name, pattern) or _named(module_name, pattern)))]


def _named(name: str, pattern: str) -> bool:
    """Whether ``name`` matches ``pattern`` whole or from a dot on (``model.lm_head`` matches ``lm_head``)."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def _as_class(item) -> type:
    """``item`` (a class or an import path) as an ``nn.Module`` subclass; ``ValueError`` naming it otherwise."""
    if isinstance(item, type):
        cls = item
    else:
        module_name, _, attr = item.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError, ValueError) as err:
            raise ValueError(f"Invalid fp32_state entry {item!r}: it reads as a class path, but it does not import "
                             f"({type(err).__name__}: {err}); expected {_ALLOWED}.") from err
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"Invalid fp32_state entry {item!r}: {cls!r} is not a torch.nn.Module subclass; "
                         f"expected {_ALLOWED}.")
    return cls


def _is_class_path(text: str) -> bool:
    """A dotted string without wildcards whose last part starts with a capital (``torch.nn.Embedding``)."""
    last = text.rpartition(".")[2]
    return "." in text and not any(c in text for c in "*?[") and last[:1].isupper()


def parse_fp32_state(value) -> Fp32State | None:
    """``value`` (None, a class, a string, or a list/tuple of them) as :class:`Fp32State`; None for None or an
    empty list. ``ValueError`` naming ``fp32_state``, the value and what is allowed for anything else (a class
    path that does not import, a class that is not an ``nn.Module``, an empty string)."""
    if value is None:
        return None
    items = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    entries = []
    for item in items:
        if item == EMBEDDINGS:
            entries.append((item, (nn.Embedding, nn.EmbeddingBag), None))
        elif isinstance(item, type) or (isinstance(item, str) and _is_class_path(item)):
            entries.append((item, (_as_class(item),), None))
        elif isinstance(item, str) and item.strip():
            entries.append((item, (), item))
        else:
            raise ValueError(f"Invalid fp32_state={value!r}: the entry {item!r} is not allowed; expected {_ALLOWED}.")
    return Fp32State(tuple(entries)) if entries else None


def check_fp32_state(optimizer, fp32_state, owner: str = "LowMemOptimizerCallback") -> Fp32State | None:
    """``fp32_state`` parsed (:func:`parse_fp32_state`; None when unset) for the registered optimizer ``optimizer``;
    ``ValueError`` naming ``owner``, the value and the optimizer when that optimizer does not take
    ``quantize_state`` (torch's ``adamw``: its state is 32-bit already)."""
    from .registry import optimizer_class, optimizer_keywords

    parsed = parse_fp32_state(fp32_state)
    if parsed is None or not isinstance(optimizer, str):
        return parsed
    cls = optimizer_class(optimizer)
    if QUANTIZE_STATE not in optimizer_keywords(optimizer):
        raise ValueError(
            f"Invalid fp32_state={fp32_state!r} for {owner}(optimizer={optimizer!r}): {cls.__name__} keeps 32-bit "
            "state for every param already (fp32_state exempts params from the quantized state of this package's "
            "optimizers); leave it unset."
        )
    return parsed


def unmatched_message(owner: str, fp32_state, unmatched: list, module: nn.Module) -> str:
    """The warning for entries of ``fp32_state`` that select no param of ``module`` (a typo must not pass silently)."""
    return (f"{owner}(fp32_state={fp32_state!r}): {', '.join(map(repr, unmatched))} selects no param of "
            f"{type(module).__name__} (no module of that class, no param or module name matching that pattern); "
            "those params keep the optimizer's quantized state. Check the spelling: patterns match names as "
            "named_parameters() gives them ('*embed_tokens*', 'lm_head').")


def fp32_state_params(module: nn.Module, fp32_state: Fp32State) -> tuple[set[int], list]:
    """``(ids, unmatched)``: the ids of ``module``'s params that ``fp32_state`` selects (tied params once), and the
    entries of ``fp32_state`` (as given) that select none: a typo the caller warns about."""
    ids: set[int] = set()
    used: set[int] = set()
    for module_name, owner in module.named_modules():
        for name, param in owner.named_parameters(recurse=False):
            qualified = f"{module_name}.{name}" if module_name else name
            hits = fp32_state.matches(owner, module_name, qualified)
            if hits:
                ids.add(id(param))
                used.update(hits)
    unmatched = [item for k, (item, _, _) in enumerate(fp32_state.entries) if k not in used]
    return ids, unmatched


def _param_of(item) -> torch.Tensor:
    return item[1] if isinstance(item, tuple) else item


def split_param_groups(groups: Iterable, fp32_ids: set[int]) -> tuple[list[dict], list[int]]:
    """``(new_groups, origin)``: ``groups`` (tensors or group dicts, as an optimizer takes them) with the params whose
    id is in ``fp32_ids`` given ``quantize_state=False``, and ``origin[k]`` the index of the input group new group
    ``k`` came from.

    A group whose params are all selected gets the key in place; a group with some selected keeps its position and
    the others, and a new group with the selected ones (a copy of every other key of the group: lr, weight decay,
    betas, ``initial_lr``/``max_lr`` of a scheduler, ``param_names`` split alike) is appended after all input
    groups, so the input groups keep their indices (schedulers' per-group lists: extend them with ``origin``).
    A plain list of tensors is one group."""
    groups = list(groups)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    out, origin, extra, extra_origin = [], [], [], []
    for index, group in enumerate(groups):
        params = list(group["params"]) if not isinstance(group["params"], torch.Tensor) else [group["params"]]
        chosen = [k for k, item in enumerate(params) if id(_param_of(item)) in fp32_ids]
        if not chosen:
            out.append(dict(group))
        elif len(chosen) == len(params):
            out.append({**group, QUANTIZE_STATE: False})
        else:
            out.append(_part(group, params, [k for k in range(len(params)) if k not in chosen], {}))
            extra.append(_part(group, params, chosen, {QUANTIZE_STATE: False}))
            extra_origin.append(index)
        origin.append(index)
    return out + extra, origin + extra_origin


def _part(group: dict, params: Sequence, keep: list[int], extra: dict) -> dict:
    """A copy of ``group`` holding the params at positions ``keep`` (and their ``param_names``), plus ``extra``."""
    part = {**group, "params": [params[k] for k in keep], **extra}
    names = group.get("param_names")
    if isinstance(names, (list, tuple)) and len(names) == len(params):
        part["param_names"] = [names[k] for k in keep]
    return part
