"""Replace the optimizers inside whatever ``configure_optimizers`` returned, keeping its structure.

Lightning accepts many return shapes (an optimizer; a list; ``([opts], [scheds])``; a dict; a list of
dicts; ``None``). Instead of parsing them, :func:`replace_optimizers` walks the returned object, swaps
every ``torch.optim.Optimizer`` for its replacement and retargets every LR scheduler in place, so
Lightning sees the same shape it would have seen, now with our optimizers.

LR scheduling rules when an optimizer is rebuilt (:func:`rebuild_param_groups`):

* each param group keeps its params (trainable ones only), its ``lr`` and ``weight_decay``, the keys a
  scheduler added (``initial_lr``, ``max_lr``, ...), and every hyperparameter the module chose (a value
  other than the old optimizer class's constructor default, e.g. ``SGD(momentum=0.9)``) that the new
  optimizer also takes; hyperparameters left at their defaults take the new optimizer's defaults;
* a new base ``lr`` rescales every group and its scheduler by ``lr / old_default_lr``, so per-group LR
  ratios and the schedule's current position are kept (``StepLR(2, 0.5)`` over ``lr=1e-3`` gives
  ``1.25e-4`` after 6 steps, whatever lr the module had asked for).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterator

import torch

__all__ = [
    "LR_KEYS",
    "find_optimizers",
    "find_schedulers",
    "rebuild_param_groups",
    "replace_optimizers",
    "retarget_scheduler",
]

LR_KEYS: tuple[str, ...] = ("lr", "initial_lr", "max_lr", "min_lr")
"""Param-group keys that hold a learning rate and are rescaled with a new base ``lr``."""

_SCHEDULER_LR_LISTS: tuple[str, ...] = ("base_lrs", "max_lrs", "_last_lr")


def _walk(obj) -> Iterator:
    yield obj
    if isinstance(obj, dict):
        for value in obj.values():
            yield from _walk(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _walk(value)


def find_optimizers(config) -> list[torch.optim.Optimizer]:
    """Every distinct optimizer in a ``configure_optimizers`` return value, in order of appearance."""
    found: dict[int, torch.optim.Optimizer] = {}
    for obj in _walk(config):
        if isinstance(obj, torch.optim.Optimizer):
            found.setdefault(id(obj), obj)
        optimizer = getattr(obj, "optimizer", None)
        if isinstance(optimizer, torch.optim.Optimizer) and not isinstance(obj, torch.optim.Optimizer):
            found.setdefault(id(optimizer), optimizer)
    return list(found.values())


def find_schedulers(config) -> list:
    """Every distinct LR scheduler (anything with an ``optimizer`` attribute) in a return value,
    including the children of ``SequentialLR``/``ChainedScheduler``."""
    found: dict[int, object] = {}

    def add(obj) -> None:
        if id(obj) in found:
            return
        found[id(obj)] = obj
        for child in getattr(obj, "_schedulers", ()) or ():
            add(child)

    for obj in _walk(config):
        if not isinstance(obj, torch.optim.Optimizer) and isinstance(
            getattr(obj, "optimizer", None), torch.optim.Optimizer
        ):
            add(obj)
    return list(found.values())


def replace_optimizers(config, mapping: dict[int, torch.optim.Optimizer]):
    """A copy of ``config`` (same lists/tuples/dicts) with each optimizer ``o`` replaced by
    ``mapping[id(o)]``; schedulers are left in place (retarget them with :func:`retarget_scheduler`)."""
    if isinstance(config, torch.optim.Optimizer):
        return mapping.get(id(config), config)
    if isinstance(config, dict):
        return type(config)((key, replace_optimizers(value, mapping)) for key, value in config.items())
    if isinstance(config, tuple) and hasattr(config, "_fields"):  # namedtuple
        return type(config)(*(replace_optimizers(value, mapping) for value in config))
    if isinstance(config, (list, tuple)):
        return type(config)(replace_optimizers(value, mapping) for value in config)
    return config


def _as_float(value) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        fa, fb = _as_float(a), _as_float(b)
        return fa is not None and fa == fb
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - odd types compare as different
        return False


def constructor_defaults(cls: type) -> dict:
    """Default values of ``cls.__init__``'s keyword arguments (what a hyperparameter is when nobody chose it)."""
    try:
        parameters = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def lr_ratio(old: torch.optim.Optimizer, group: dict, new_lr: float | None) -> float | None:
    """Factor that turns ``group``'s learning rates into ones based on ``new_lr``.

    ``new_lr / old.defaults["lr"]`` when the old default is a positive number (keeps per-group ratios),
    else ``new_lr / group["initial_lr" or "lr"]``; ``None`` when no new lr is set or the base is 0.
    """
    if new_lr is None:
        return None
    base = _as_float(old.defaults.get("lr"))
    if not base or base <= 0 or not math.isfinite(base):
        base = _as_float(group.get("initial_lr", group.get("lr")))
    if not base or base <= 0:
        return None
    return new_lr / base


def rebuild_param_groups(
    old: torch.optim.Optimizer,
    new_defaults: dict,
    *,
    lr: float | None,
    weight_decay: float | None,
    fixed_keys: frozenset[str] = frozenset(),
) -> tuple[list[dict], list[float | None]]:
    """Param groups for the replacement of ``old``, and the LR factor applied to each group.

    ``new_defaults`` are the new optimizer's defaults (only keys it knows carry over);
    ``fixed_keys`` are the hyperparameters given explicitly for the new optimizer, which win over
    per-group values. ``weight_decay``, when set, applies to every group except groups the module
    deliberately left undecayed (``weight_decay == 0`` while another group of ``old`` decays).
    Frozen params (``requires_grad=False``) are dropped; groups keep their positions (possibly empty)
    so schedulers' per-group lists still line up.
    """
    old_defaults = old.defaults
    class_defaults = constructor_defaults(type(old))
    any_decay = any((_as_float(g.get("weight_decay")) or 0.0) > 0 for g in old.param_groups)
    groups, ratios = [], []
    for group in old.param_groups:
        new_group: dict = {"params": [p for p in group["params"] if p.requires_grad]}
        for key, value in group.items():
            if key in ("params", "weight_decay", *LR_KEYS) or key in fixed_keys:
                continue
            if key not in old_defaults:  # added by a scheduler or by the user (e.g. "name")
                new_group[key] = value
            elif key in new_defaults and key in class_defaults and not _same(value, class_defaults[key]):
                new_group[key] = value  # the module chose it (per group or in the constructor)
        ratio = lr_ratio(old, group, lr)
        for key in LR_KEYS:
            if key not in group:
                continue
            value = _as_float(group[key])
            if lr is None or value is None:
                new_group[key] = group[key] if value is None else value
            elif ratio is not None:
                new_group[key] = value * ratio
        if lr is not None and ratio is None:
            new_group["lr"] = lr
            if "initial_lr" in group:
                new_group["initial_lr"] = lr
        old_wd = group.get("weight_decay")
        if weight_decay is None:
            if old_wd is not None and "weight_decay" in new_defaults:
                new_group["weight_decay"] = _as_float(old_wd)
        elif any_decay and (_as_float(old_wd) or 0.0) == 0.0:
            new_group["weight_decay"] = 0.0
        else:
            new_group["weight_decay"] = weight_decay
        groups.append(new_group)
        ratios.append(ratio)
    return groups, ratios


def mark_step_calls(optimizer: torch.optim.Optimizer) -> None:
    """Make ``optimizer.step`` record that it ran, as torch's LR schedulers expect of the optimizer
    they drive (otherwise they warn that ``optimizer.step()`` was overridden)."""
    if getattr(optimizer.step, "_wrapped_by_lr_sched", False):
        return
    step: Callable = optimizer.step

    @functools.wraps(step)
    def step_and_mark(*args, **kwargs):
        optimizer._opt_called = True  # type: ignore[attr-defined]
        return step(*args, **kwargs)

    step_and_mark._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    optimizer.step = step_and_mark  # type: ignore[method-assign]


def retarget_scheduler(scheduler, new: torch.optim.Optimizer, ratios: list[float | None]) -> None:
    """Point ``scheduler`` at ``new`` and rescale its per-group LR lists by ``ratios``.

    Works for every torch scheduler (``LRScheduler`` subclasses keep ``base_lrs``, ``CyclicLR`` also
    ``max_lrs``; ``OneCycleLR`` keeps its LRs in the param groups, rescaled by
    :func:`rebuild_param_groups`; ``ReduceLROnPlateau`` only reads the groups).
    """
    scheduler.optimizer = new
    for name in _SCHEDULER_LR_LISTS:
        values = getattr(scheduler, name, None)
        if isinstance(values, list) and len(values) == len(ratios):
            setattr(
                scheduler, name,
                [v if r is None or _as_float(v) is None else _as_float(v) * r for v, r in zip(values, ratios)],
            )
    mark_step_calls(new)
