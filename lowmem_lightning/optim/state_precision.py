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
convergence benchmark all use it. A Lightning checkpoint resumes only under the ``fp32_state`` it was saved with
(the param groups differ): :func:`check_checkpoint_groups` refuses another one before a sharded
(``torch.distributed.checkpoint``) load fails on missing state keys. This module imports no Lightning.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .layout import QUANTIZE_STATE

__all__ = ["EMBEDDINGS", "Fp32State", "parse_fp32_state", "check_fp32_state", "fp32_state_params", "unmatched_message",
           "split_param_groups", "saved_param_groups", "check_checkpoint_groups"]

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


def saved_param_groups(path, index: int) -> list[tuple[bool, int]] | None:
    """Per param group of the ``index``-th optimizer in the Lightning checkpoint at ``path``: ``(quantize_state,
    number of params)`` (a group without the key: True); None when ``path`` is neither a checkpoint file nor a
    ``torch.distributed.checkpoint`` folder, or holds no such optimizer. A folder's groups are read from its
    metadata and byte entries on this process alone (no collective, no tensor shard read)."""
    from pathlib import Path

    path = Path(path) if path is not None else None
    if path is None or not (path.is_file() or (path / ".metadata").is_file()):
        return None
    stamp = (path / ".metadata" if path.is_dir() else path).stat().st_mtime_ns
    return _saved_param_groups(str(path), index, stamp)


@functools.lru_cache(maxsize=8)
def _saved_param_groups(path: str, index: int, stamp: int) -> list[tuple[bool, int]] | None:
    """:func:`saved_param_groups` of ``path`` as last modified at ``stamp`` (nanoseconds)."""
    from pathlib import Path

    groups = _file_groups(path, index) if Path(path).is_file() else _folder_groups(path, index)
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        return None
    return [(g.get(QUANTIZE_STATE, True) is not False, len(g.get("params") or ())) for g in groups] or None


def _file_groups(path: str, index: int) -> list | None:
    """The ``param_groups`` of optimizer ``index`` in a single-file Lightning checkpoint (memory-mapped)."""
    checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    states = checkpoint.get("optimizer_states") if isinstance(checkpoint, dict) else None
    if not isinstance(states, list) or index >= len(states) or not isinstance(states[index], dict):
        return None
    return states[index].get("param_groups")


def _folder_groups(path: str, index: int) -> list[dict]:
    """The ``quantize_state`` and ``params`` of each param group of ``optimizer_{index}`` in a
    ``torch.distributed.checkpoint`` folder: its byte entries, read on this process alone."""
    import torch.distributed.checkpoint as dcp

    prefix = f"optimizer_{index}.param_groups."
    keys = [key for key in dcp.FileSystemReader(path).read_metadata().state_dict_metadata
            if key.startswith(prefix) and key.rsplit(".", 1)[1] in (QUANTIZE_STATE, "params")]
    values = dict.fromkeys(keys)
    if values:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore")
            dcp.load(values, checkpoint_id=path, no_dist=True)
    groups: dict[int, dict] = {}
    for key, value in values.items():
        number, _, name = key[len(prefix):].partition(".")
        groups.setdefault(int(number), {})[name] = value
    return [groups.get(k, {}) for k in range(1 + max(groups, default=-1))]


def _describe(groups: list[tuple[bool, int]]) -> str:
    """``groups`` (``(quantize_state, params)`` each) for a message: ``"2 param groups (4 params; 1 param with
    quantize_state=False)"``."""
    parts = [f"{n} param{'s' if n != 1 else ''}{'' if quantized else ' with quantize_state=False'}"
             for quantized, n in groups]
    return f"{len(groups)} param group{'s' if len(groups) != 1 else ''} ({'; '.join(parts)})"


def check_checkpoint_groups(path, index: int, optimizer: torch.optim.Optimizer) -> None:
    """``ValueError`` when the Lightning checkpoint at ``path`` holds the ``index``-th optimizer's state in other
    param groups than ``optimizer`` has and either side has a ``quantize_state=False`` group: it was saved under
    another ``fp32_state``, which a sharded load would fail on with missing state keys (the message names both
    layouts and says to resume with the checkpoint's ``fp32_state``). Nothing for a path that is no checkpoint."""
    saved = saved_param_groups(path, index)
    own = [(g.get(QUANTIZE_STATE, True) is not False, len(g["params"])) for g in optimizer.param_groups]
    if saved is None or saved == own or all(quantized for quantized, _ in saved + own):
        return
    raise ValueError(
        f"Cannot resume from {str(path)!r}: its optimizer state (optimizer {index}) has {_describe(saved)}, this "
        f"run's {type(optimizer).__name__} has {_describe(own)}. Groups with quantize_state=False are what "
        "fp32_state (LowMemOptimizerCallback, LowMemModule) splits off: resume with the fp32_state the checkpoint "
        "was saved with, or load only the weights (a new fit without ckpt_path) to change it."
    )
