"""Replace the optimizers inside whatever ``configure_optimizers`` returned, keeping its structure.

Lightning accepts many return shapes (an optimizer; a list; ``([opts], [scheds])``; a dict; a list of
dicts; ``None``). Instead of parsing them, :func:`replace_optimizers` walks the returned object, swaps
every ``torch.optim.Optimizer`` for its replacement and retargets every LR scheduler in place, so
Lightning sees the same shape it would have seen, now with our optimizers.

Rules when an optimizer is rebuilt (:func:`rebuild_param_groups`):

* each param group keeps all its params, frozen ones included (an optimizer allocates state only for
  params that received a gradient, so a param unfrozen later trains as under the module's own
  optimizer), its ``lr``, the keys a scheduler or the module added (``initial_lr``, ``max_lr``,
  ``max_momentum``, ``name``, ...);
* every other hyperparameter is *translated* by meaning, not by key name
  (:mod:`lowmem_lightning.callbacks.translate`): a setting the module chose (a value other than the
  old class's constructor default) goes to the new optimizer's key of the same meaning (AdamW's
  ``betas[0]`` -> SGD's ``momentum`` / CAME's ``betas[0]`` / Adafactor's ``beta1``); weight decay is
  kept per group, and warned about when its kind changes (coupled L2 <-> decoupled); a chosen
  setting with no equivalent is dropped and named in the one warning of the fit; settings left at
  their defaults take the new optimizer's defaults;
* the new optimizer's ``defaults`` are the module optimizer's, translated the same way (the callback
  does this after building it), so a group added later with ``add_param_group`` (Lightning's
  ``BackboneFinetuning``) gets what the module's optimizer would have given it;
* a new base ``lr`` rescales every group and its scheduler by ``lr / old_default_lr``, so per-group LR
  ratios and the schedule's current position are kept (``StepLR(2, 0.5)`` over ``lr=1e-3`` gives
  ``1.25e-4`` after 6 steps, whatever lr the module had asked for);
* a scheduler that cycles momentum (``OneCycleLR``/``CyclicLR`` with ``cycle_momentum=True``) is
  retargeted to the new optimizer's ``betas[0]`` or ``momentum`` (:func:`momentum_slot`); an optimizer
  with neither (Adafactor) is refused before training by the callback.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator

import torch

from lowmem_lightning.callbacks.translate import (
    FAMILIES,
    MOMENTUM_KEYS,
    Slot,
    Translation,
    as_float,
    family_of,
    translate_group,
)

__all__ = [
    "LR_KEYS",
    "find_optimizers",
    "find_schedulers",
    "momentum_schedulers",
    "momentum_slot",
    "rebuild_param_groups",
    "replace_optimizers",
    "retarget_scheduler",
    "SCHEDULER_GROUP_LISTS",
    "expand_scheduler_groups",
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


def lr_ratio(old: torch.optim.Optimizer, group: dict, new_lr: float | None) -> float | None:
    """Factor that turns ``group``'s learning rates into ones based on ``new_lr``.

    ``new_lr / old.defaults["lr"]`` when the old default is a positive number (keeps per-group ratios),
    else ``new_lr / group["initial_lr" or "lr"]``; ``None`` when no new lr is set or the base is 0.
    """
    if new_lr is None:
        return None
    base = as_float(old.defaults.get("lr"))
    if not base or base <= 0 or not math.isfinite(base):
        base = as_float(group.get("initial_lr", group.get("lr")))
    if not base or base <= 0:
        return None
    return new_lr / base


def _learning_rates(old: torch.optim.Optimizer, group: dict, lr: float | None) -> tuple[dict, float | None]:
    """The LR keys of the rebuilt group (rescaled to a new base ``lr``) and the factor applied."""
    out: dict = {}
    ratio = lr_ratio(old, group, lr)
    for key in LR_KEYS:
        if key not in group:
            continue
        value = as_float(group[key])
        if lr is None or value is None:
            out[key] = group[key] if value is None else value
        elif ratio is not None:
            out[key] = value * ratio
    if lr is not None and ratio is None:
        out["lr"] = lr
        if "initial_lr" in group:
            out["initial_lr"] = lr
    return out, ratio


def rebuild_param_groups(
    old: torch.optim.Optimizer,
    target_cls: type,
    new_defaults: dict,
    *,
    lr: float | None,
    weight_decay: float | None,
    fixed_keys: frozenset[str] = frozenset(),
    keep: Callable[[torch.Tensor], bool] = lambda param: True,
    driven: frozenset[str] = frozenset(),
) -> tuple[list[dict], list[float | None], list[Translation]]:
    """Param groups for the ``target_cls`` replacement of ``old``, the LR factor applied to each group,
    and each group's :class:`~lowmem_lightning.callbacks.translate.Translation` (what was carried,
    changed, dropped).

    ``new_defaults`` are the target's defaults; ``fixed_keys`` the hyperparameters given explicitly
    for it, which win over per-group values; ``keep(param)`` says which params stay (all, by default:
    frozen ones too, so that unfreezing them later trains them); ``driven``: settings an LR scheduler
    drives (see :func:`translate_group`). ``weight_decay``, when set, applies to every group except
    groups the module deliberately left undecayed (``weight_decay == 0`` while another group of
    ``old`` decays). Groups keep their positions (possibly empty) so schedulers' per-group lists still
    line up; keys the module or a scheduler added to a group (``name``, ``initial_lr``,
    ``max_momentum``, ...) are kept.
    """
    skip = frozenset(fixed_keys) | ({"weight_decay", "l2"} if weight_decay is not None else frozenset())
    any_decay = any((as_float(g.get("weight_decay")) or 0.0) > 0 for g in old.param_groups)
    groups, ratios, translations = [], [], []
    for group in old.param_groups:
        translation = translate_group(type(old), group, target_cls, new_defaults, skip=skip | set(LR_KEYS),
                                      driven=driven, lr_carried=lr is None)
        new_group: dict = {"params": [p for p in group["params"] if keep(p)]}
        for key, value in group.items():
            if key not in old.defaults and key not in ("params", *LR_KEYS):
                new_group[key] = value  # added by a scheduler or by the user (e.g. "name")
        new_group.update(translation.values)
        rates, ratio = _learning_rates(old, group, lr)
        new_group.update(rates)
        if weight_decay is not None:
            old_wd = as_float(group.get("weight_decay")) or 0.0
            new_group["weight_decay"] = 0.0 if any_decay and old_wd == 0.0 else weight_decay
        groups.append(new_group)
        ratios.append(ratio)
        translations.append(translation)
    return groups, ratios, translations


def momentum_schedulers(schedulers: list) -> list:
    """The schedulers among ``schedulers`` that write the optimizer's momentum/beta1 each step
    (torch's ``OneCycleLR`` and ``CyclicLR`` with ``cycle_momentum=True``)."""
    kinds = (torch.optim.lr_scheduler.OneCycleLR, torch.optim.lr_scheduler.CyclicLR)
    return [s for s in schedulers if isinstance(s, kinds) and getattr(s, "cycle_momentum", False)]


def momentum_slot(target_cls: type, new_defaults: dict) -> Slot | None:
    """The slot of the target's beta1 that torch's momentum-cycling schedulers can write (``betas[0]``
    or ``momentum``), or None when it has none (Adafactor keeps ``beta1``, which they do not know)."""
    family = family_of(target_cls)
    if family is not None:
        slot = FAMILIES[family].get("beta1")
    else:
        slot = next((s for s in MOMENTUM_KEYS if s.key in new_defaults), None)
    return slot if slot in MOMENTUM_KEYS and slot.key in new_defaults else None


SCHEDULER_GROUP_LISTS: tuple[str, ...] = ("base_lrs", "_last_lr", "lr_lambdas", "max_lrs", "base_momentums",
                                          "max_momentums", "min_lrs")
"""The per-param-group lists torch's LR schedulers keep (one entry per group, zipped strictly with the groups)."""


def expand_scheduler_groups(scheduler, origin: list[int]) -> None:
    """Give ``scheduler`` one entry per group of an optimizer whose groups were split: new group ``k`` came from old
    group ``origin[k]`` (:func:`~lowmem_lightning.optim.state_precision.split_param_groups`) and takes that group's
    entry of every per-group list (:data:`SCHEDULER_GROUP_LISTS`: base and last LRs, ``LambdaLR``'s lambdas,
    ``CyclicLR``'s bounds, ``ReduceLROnPlateau``'s floors), so the split groups follow their group's schedule.
    Lists already of the new length are left alone (call it for each child of a ``SequentialLR`` too:
    :func:`find_schedulers` lists them)."""
    old_count = max(origin, default=-1) + 1
    if len(origin) == old_count:
        return
    for name in SCHEDULER_GROUP_LISTS:
        values = getattr(scheduler, name, None)
        if isinstance(values, list) and len(values) == old_count:
            setattr(scheduler, name, [values[i] for i in origin])


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
    :func:`rebuild_param_groups`; ``ReduceLROnPlateau`` only reads the groups). A scheduler that cycles
    momentum (:func:`momentum_schedulers`) writes the new optimizer's ``betas[0]`` or ``momentum``
    (its ``use_beta1``), whichever the new optimizer has.
    """
    scheduler.optimizer = new
    if getattr(scheduler, "cycle_momentum", False):
        scheduler.use_beta1 = "betas" in new.defaults  # where torch's schedulers write the cycled momentum
    for name in _SCHEDULER_LR_LISTS:
        values = getattr(scheduler, name, None)
        if isinstance(values, list) and len(values) == len(ratios):
            setattr(
                scheduler, name,
                [v if r is None or as_float(v) is None else as_float(v) * r for v, r in zip(values, ratios)],
            )
    mark_step_calls(new)
