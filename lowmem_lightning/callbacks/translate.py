"""How a module's optimizer settings translate into the optimizer the callback builds, as data.

Each optimizer *family* lists where its param groups keep each *setting*, a name with one meaning
across optimizers (:data:`FAMILIES`): ``beta1`` is the first-moment / momentum coefficient (Adam's
``betas[0]``, SGD's and RMSprop's ``momentum``, Adafactor's ``beta1``, CAME's ``betas[0]``: the one
knob torch's ``OneCycleLR``/``CyclicLR`` cycle as "momentum or beta1"); ``beta2`` the decay of the
squared-gradient average (Adam's ``betas[1]``, RMSprop's ``alpha``, CAME's ``betas[1]``); ``eps`` the
term added to the root of that average (Adam, RMSprop); ``factored_eps`` the term added to squared
gradients of Adafactor and CAME (``eps[0]``), while their ``eps[1]`` mean different things
(``scale_eps``: Adafactor's floor of the param RMS; ``instability_eps``: CAME's); ``weight_decay``
is decoupled decay (``p -= lr * wd * p``: AdamW, Adafactor, CAME, ``Adam(decoupled_weight_decay=True)``)
and ``l2`` a coupled L2 penalty added to the gradient (Adam, SGD, RMSprop). Settings of one family only:
Lion's ``lion_beta2`` (``betas[1]``, the momentum's own decay; its ``betas[0]`` is ``beta1``), AdEMAMix's slow
EMA (``slow_beta`` = ``betas[2]``, ``alpha``, ``t_alpha``, ``t_beta3``), Muon's ``adamw_beta1`` and
Newton-Schulz settings.

:func:`translate_group` reads a source param group setting by setting and writes each to the slot
with the same meaning in the target family:

* **carried**: the target has the setting; a setting left at the source class's constructor default
  is not carried (the target keeps its own default), except ``weight_decay``/``l2`` into the same
  kind of decay (kept per group, as before) and settings a scheduler drives (carried as they are);
* **implied**: a chosen value the target always behaves as (``relative_step=False``,
  ``scale_parameter=False`` into an optimizer that takes an lr and does not scale it): nothing to do;
* **changed** (warned): coupled ``l2`` into decoupled ``weight_decay`` or back (:data:`MEANING_CHANGES`),
  and the ``lr`` between an adaptive optimizer, Lion's sign update and Muon's orthogonalized one
  (:data:`LR_CHANGES`): the value is carried, its effect differs, the warning says how;
* **dropped** (warned): a chosen value with no slot in the target. Dropping ``amsgrad``, ``nesterov``
  or ``centered`` changes the algorithm: :data:`DROP_REASONS` says how;
* **ignored**: implementation switches (``foreach``, ``fused``, ``capturable``, ``differentiable``)
  that do not change the math, when the target lacks them.

Classes are matched to families through their MRO (:data:`CLASS_FAMILIES`), so subclasses translate
like their base. A class of no known family keeps the old rule: a chosen value carries to the key of
the same name when the target's default has the same shape, and is dropped (warned) otherwise.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

__all__ = [
    "CLASS_FAMILIES",
    "DROP_REASONS",
    "FAMILIES",
    "IGNORED",
    "IMPLIED",
    "LR_CHANGES",
    "MEANING_CHANGES",
    "MOMENTUM_KEYS",
    "STEP_KINDS",
    "Slot",
    "Translation",
    "constructor_defaults",
    "family_of",
    "same_value",
    "step_kind",
    "translate_group",
]


@dataclass(frozen=True)
class Slot:
    """Where a setting lives in a param group: ``group[key]``, or ``group[key][index]`` for a tuple."""

    key: str
    index: int | None = None

    def __str__(self) -> str:
        return self.key if self.index is None else f"{self.key}[{self.index}]"

    def read(self, group: dict, default=None):
        """The setting's value in ``group`` (``default`` when the key or the tuple element is absent)."""
        value = group.get(self.key, default)
        if self.index is None:
            return value
        if isinstance(value, (tuple, list)) and len(value) > self.index:
            return value[self.index]
        return default


def _slots(*names: str, **renamed: Slot) -> dict[str, Slot]:
    return {**{name: Slot(name) for name in names}, **renamed}


_IMPLEMENTATION = ("foreach", "fused", "capturable", "differentiable")
_OURS = ("bf16_rounding", "quantize_state")  # settings every optimizer of this package takes

FAMILIES: dict[str, dict[str, Slot]] = {
    "adam": _slots("lr", "eps", "amsgrad", "maximize", *_IMPLEMENTATION,
                   beta1=Slot("betas", 0), beta2=Slot("betas", 1), l2=Slot("weight_decay")),
    "adamw": _slots("lr", "eps", "weight_decay", "amsgrad", "maximize", *_IMPLEMENTATION,
                    beta1=Slot("betas", 0), beta2=Slot("betas", 1)),
    "adamw_8bit": _slots("lr", "eps", "weight_decay", "maximize", *_OURS,
                         beta1=Slot("betas", 0), beta2=Slot("betas", 1)),
    "sgd": _slots("lr", "dampening", "nesterov", "maximize", "momentum_dtype", *_OURS, *_IMPLEMENTATION,
                  beta1=Slot("momentum"), l2=Slot("weight_decay")),
    "rmsprop": _slots("lr", "eps", "centered", "maximize", *_IMPLEMENTATION,
                      beta1=Slot("momentum"), beta2=Slot("alpha"), l2=Slot("weight_decay")),
    "adafactor": _slots("lr", "beta1", "clip_threshold", "decay_rate", "weight_decay", "scale_parameter",
                        "relative_step", "warmup_init", "momentum_dtype", "maximize", *_OURS,
                        factored_eps=Slot("eps", 0), scale_eps=Slot("eps", 1)),
    "came": _slots("lr", "clip_threshold", "weight_decay", "momentum_dtype", "maximize", *_OURS,
                   beta1=Slot("betas", 0), beta2=Slot("betas", 1), beta3=Slot("betas", 2),
                   factored_eps=Slot("eps", 0), instability_eps=Slot("eps", 1)),
    "muon": _slots("lr", "weight_decay", "nesterov", "maximize", "momentum_dtype", "ns_coefficients", "ns_steps",
                   "adjust_lr_fn", "use_muon", *_OURS, *_IMPLEMENTATION,
                   beta1=Slot("momentum"), beta2=Slot("adamw_betas", 1), eps=Slot("adamw_eps"),
                   adamw_beta1=Slot("adamw_betas", 0), ns_eps=Slot("eps")),
    # Lion's betas[0] weighs the momentum against the gradient in the update's sign, as Adam's betas[0] weighs
    # them in its first moment (beta1 = beta2 is signSGD on Adam's m); betas[1] is the momentum's own decay,
    # which no other family has apart (Adam's first moment decays at betas[0]): lion_beta2.
    "lion": _slots("lr", "weight_decay", "maximize", *_OURS, *_IMPLEMENTATION,
                   beta1=Slot("betas", 0), lion_beta2=Slot("betas", 1)),
    # AdEMAMix is Adam (betas[0], betas[1], eps: same meanings) plus a slow EMA: betas[2] (not CAME's beta3,
    # the decay of its instability), its weight alpha and their warmups.
    "ademamix": _slots("lr", "eps", "weight_decay", "alpha", "t_alpha", "t_beta3", "maximize", *_OURS,
                       *_IMPLEMENTATION,
                       beta1=Slot("betas", 0), beta2=Slot("betas", 1), slow_beta=Slot("betas", 2)),
}
"""Family -> {setting: slot}. A family lists the union of its members' keys (torch's SGD has no
``momentum_dtype``, ours has): a key absent from a group is not read, a key absent from the target's
defaults is not written."""

CLASS_FAMILIES: dict[str, str] = {
    "torch.optim.adam.Adam": "adam",
    "torch.optim.adamw.AdamW": "adamw",
    "torch.optim.sgd.SGD": "sgd",
    "torch.optim.rmsprop.RMSprop": "rmsprop",
    "torch.optim.Muon": "muon", "torch.optim._muon.Muon": "muon",  # torch >= 2.9 (its eps is Newton-Schulz's)
    "transformers.optimization.Adafactor": "adafactor",
    "lowmem_lightning.optim.adamw8bit.AdamW8bit": "adamw_8bit",
    "lowmem_lightning.optim.sgd.SGD": "sgd",
    "lowmem_lightning.optim.adafactor.Adafactor": "adafactor",
    "lowmem_lightning.optim.came.CAME": "came",
    "lowmem_lightning.optim.muon.Muon": "muon",
    "lowmem_lightning.optim.lion.Lion": "lion",
    "lowmem_lightning.optim.ademamix.AdEMAMix": "ademamix",
}
"""``module.QualName`` of a class -> its family (``PagedAdamW8bit`` is an ``AdamW8bit``, ``Lion8bit`` a ``Lion``,
``AdEMAMix8bit`` an ``AdEMAMix``, ``Muon8bit`` a ``Muon``)."""

MEANING_CHANGES: dict[tuple[str, str], str] = {
    ("l2", "weight_decay"): "coupled L2 penalty (added to the gradient{adaptive}) -> decoupled decay in {target} "
                            "(p -= lr * weight_decay * p)",
    ("weight_decay", "l2"): "decoupled decay (p -= lr * weight_decay * p) -> coupled L2 penalty in {target} "
                            "(added to the gradient)",
}
"""(source setting, target setting) carried with a different meaning, and how it differs."""

DROP_REASONS: dict[str | tuple[str, str], str] = {
    "amsgrad": "{target} has no AMSGrad (running maximum of the second moment): the update is plain AdamW's",
    "nesterov": "{target} has no Nesterov momentum: the look-ahead is lost",
    "centered": "{target} does not center the second moment (RMSprop's variance estimate)",
    ("eps", "adafactor"): "{target}'s eps pair is added to squared gradients and bounds the param scale, not "
                          "added to the root of the second moment",
    ("eps", "came"): "{target}'s eps pair is added to squared gradients and to the instability, not to the root "
                     "of the second moment",
    ("beta2", "adafactor"): "{target}'s second-moment decay follows decay_rate (beta2_t = 1 - t ** decay_rate)",
    ("eps", "lion"): "{target}'s update is a sign: there is no denominator to add eps to",
    ("beta2", "lion"): "{target} keeps no second moment (its betas[1] is the momentum's own decay, default 0.99)",
    "lion_beta2": "{target} has no momentum decay apart from beta1 (Lion's betas[1]): the momentum now decays "
                  "at the carried beta1",
    "slow_beta": "{target} has no slow EMA (AdEMAMix's betas[2]): the alpha * m2 term of the update is lost",
    "alpha": "{target} has no slow EMA (AdEMAMix's alpha weighs it): the alpha * m2 term of the update is lost",
    "t_alpha": "{target} has no slow EMA, so no warmup of its weight alpha",
    "t_beta3": "{target} has no slow EMA, so no warmup of its decay betas[2]",
    ("beta3", "ademamix"): "{target}'s betas[2] is the decay of its slow EMA, not of CAME's instability",
    "adamw_beta1": "{target} has one first-moment decay: Muon's momentum went into it, not the beta1 of the "
                   "params Muon gave AdamW (adamw_betas[0])",
}
"""Why a setting is dropped, by setting or by (setting, target family): the entries by setting alone
change the algorithm (warned as such); others are "no equivalent"."""

STEP_KINDS: dict[str, str] = {
    "adam": "normalized", "adamw": "normalized", "adamw_8bit": "normalized", "rmsprop": "normalized",
    "adafactor": "normalized", "came": "normalized", "ademamix": "normalized", "lion": "sign",
    "muon": "orthogonalized",
}
"""Family -> how its ``lr`` becomes a step: ``normalized`` (the update is divided by a root of the second
moment or clipped to unit RMS: each element moves by about ``lr`` or less), ``sign`` (Lion: every element
moves by exactly ``lr``), ``orthogonalized`` (Muon's hidden matrices with its default ``adjust_lr_fn``: ``lr *
sqrt(max(1, rows/cols))`` times an orthogonal matrix, an element RMS of ``lr / sqrt(cols)``; with
``adjust_lr_fn="match_rms_adamw"`` Muon counts as ``normalized``: its update is scaled to AdamW's RMS). Families
without an entry get no note: SGD's step scales with the gradient."""

_MUON_FIX = ("optimizer_kwargs={{'adjust_lr_fn': 'match_rms_adamw'}} scales Muon's update to AdamW's RMS (Liu et "
             "al. 2025), so this lr and weight decay keep their meaning for both of its parts")

LR_CHANGES: dict[tuple[str, str], str] = {
    ("normalized", "sign"): "{target} moves every element by lr (a sign), {source} by about lr * m / sqrt(v), "
                            "mostly less; the Lion paper (Chen et al. 2023) uses an lr 3-10x smaller and a "
                            "weight decay 3-10x larger than AdamW's",
    ("sign", "normalized"): "{source} moved every element by lr (a sign), {target} by about lr * m / sqrt(v), "
                            "mostly less; the Lion paper (Chen et al. 2023) gives AdamW an lr 3-10x larger and "
                            "a weight decay 3-10x smaller than Lion's",
    ("normalized", "orthogonalized"): "{target} moves its hidden matrices by lr * sqrt(max(1, rows/cols)) times "
                                      "an orthogonal matrix, an element RMS of lr / sqrt(cols) (lr/64 for 4096 "
                                      "columns), {source} by about lr * m / sqrt(v) (RMS ~0.2 lr); "
                                      + _MUON_FIX,
    ("sign", "orthogonalized"): "{target} moves its hidden matrices by lr * sqrt(max(1, rows/cols)) times an "
                                "orthogonal matrix, an element RMS of lr / sqrt(cols) (lr/64 for 4096 columns), "
                                "{source} every element by lr (a sign); " + _MUON_FIX,
    ("orthogonalized", "normalized"): "{source} moved its hidden matrices by an element RMS of lr / sqrt(cols) "
                                      "(Jordan et al.'s scaling, lr ~0.02), {target} moves every element by about "
                                      "lr * m / sqrt(v) (RMS ~0.2 lr): up to sqrt(cols) times more at the same lr",
    ("orthogonalized", "sign"): "{source} moved its hidden matrices by an element RMS of lr / sqrt(cols) (Jordan "
                                "et al.'s scaling, lr ~0.02), {target} moves every element by lr (a sign): "
                                "sqrt(cols) times more at the same lr",
}
"""(source step kind, target step kind) -> how the same ``lr`` moves the params differently. The lr is carried
as it is (the module's schedule, per-group ratios and ``lr * weight_decay`` stay as the module set them);
the note says so, and by how much the paper would change it, unless the callback was given an lr."""

IMPLIED: dict[str, object] = {"relative_step": False, "scale_parameter": False, "quantize_state": False}
"""Chosen values that every target without the setting behaves as (it takes an lr, unscaled; it keeps 32-bit
state: torch's optimizers)."""

IGNORED: frozenset[str] = frozenset(_IMPLEMENTATION)
"""Implementation switches: carried where the target takes them, otherwise dropped silently."""

MOMENTUM_KEYS: tuple[Slot, ...] = (Slot("betas", 0), Slot("momentum"))
"""The slots torch's ``OneCycleLR``/``CyclicLR`` write when they cycle momentum (``use_beta1``)."""

_ADAPTIVE = ("adam", "rmsprop")  # families whose L2 gradient term is divided by the adaptive denominator


def family_of(cls: type) -> str | None:
    """The family of optimizer class ``cls`` (its first MRO entry in :data:`CLASS_FAMILIES`), or None."""
    for klass in cls.__mro__:
        family = CLASS_FAMILIES.get(f"{klass.__module__}.{klass.__qualname__}")
        if family is not None:
            return family
    return None


def constructor_defaults(cls: type) -> dict:
    """Default values of ``cls.__init__``'s keyword arguments (what a hyperparameter is when nobody chose it)."""
    try:
        parameters = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def as_float(value) -> float | None:
    """A number or a 1-element tensor as a Python float; ``None`` for anything else (bools included)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def same_value(a, b) -> bool:
    """Whether two hyperparameter values are equal (numbers and 1-element tensors by value)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        fa, fb = as_float(a), as_float(b)
        return fa is not None and fa == fb
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - odd types compare as different
        return False


_MISSING = object()


@dataclass
class Translation:
    """One param group translated: the target's hyperparameters and what happened to each setting.

    ``values``: target key -> value (tuples completed from the target's defaults). ``carried``,
    ``implied``, ``changed``, ``dropped``: ``"key=value"`` texts of the source settings (``changed`` and
    ``dropped`` entries carry the reason after a colon); ``warned`` are the notes the user must see.
    """

    values: dict = field(default_factory=dict)
    carried: list[str] = field(default_factory=list)
    implied: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    @property
    def warned(self) -> list[str]:
        """The notes of the warning: changed meanings, then dropped settings."""
        return self.changed + self.dropped


def _fmt(value) -> str:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = float(value)
    if isinstance(value, float):  # a schedule's arithmetic: 0.00011999999999999988 reads as 0.00012
        value = float(f"{value:.12g}")
    return repr(value)


def _source_settings(cls: type, group: dict) -> tuple[str | None, dict[str, Slot]]:
    family = family_of(cls)
    if family == "adam" and group.get("decoupled_weight_decay"):
        family = "adamw"  # Adam(decoupled_weight_decay=True) is AdamW
    if family is None:
        return None, {}
    return family, FAMILIES[family]


def translate_group(
    source_cls: type,
    group: dict,
    target_cls: type,
    target_defaults: dict,
    *,
    skip: frozenset[str] = frozenset(),
    driven: frozenset[str] = frozenset(),
    lr_carried: bool = False,
) -> Translation:
    """Translate ``group`` (a param group of a ``source_cls`` optimizer) for a ``target_cls`` optimizer.

    ``target_defaults``: the target's defaults (keys it takes, values that complete tuples); ``skip``:
    settings handled elsewhere (the LR keys; ``weight_decay``/``l2`` when the callback sets it) and
    target keys given explicitly (those win, silently); ``driven``: settings an LR scheduler drives
    (``{"beta1"}``: carried as they are now, never warned). ``lr`` is never translated here; with
    ``lr_carried`` (the group's lr goes to the target as it is) a change of its effect (:data:`LR_CHANGES`)
    is noted in ``changed``.
    """
    out = Translation()
    source_family, source_slots = _source_settings(source_cls, group)
    target_family = family_of(target_cls)
    if source_family is None or target_family is None:
        _translate_by_name(source_cls, group, target_cls, target_defaults, skip, out)
        return out
    target_slots = {name: slot for name, slot in FAMILIES[target_family].items() if slot.key in target_defaults}
    defaults = constructor_defaults(source_cls)
    target_name = target_cls.__name__
    for setting, slot in source_slots.items():
        if setting == "lr" or setting in skip or slot.key not in group:
            continue
        if setting in target_slots and target_slots[setting].key in skip:
            continue  # given explicitly for the target: that value wins
        value = slot.read(group)
        chosen = not same_value(value, slot.read(defaults, _MISSING))
        text = f"{slot}={_fmt(value)}"
        decay = setting in ("weight_decay", "l2")
        if setting in target_slots:
            if chosen or setting in driven or decay:
                _write(out.values, target_slots[setting], value, target_defaults, skip)
                out.carried.append(text)
        elif decay and (as_float(value) or 0.0) == 0.0:
            other = "l2" if setting == "weight_decay" else "weight_decay"
            if other in target_slots:  # no decay means the same in both kinds
                _write(out.values, target_slots[other], value, target_defaults, skip)
                out.carried.append(text)
        elif not chosen and setting not in driven:
            continue  # a default: the target's own default replaces it
        elif decay and (other := "l2" if setting == "weight_decay" else "weight_decay") in target_slots:
            _write(out.values, target_slots[other], value, target_defaults, skip)
            adaptive = " and divided by the adaptive denominator" if source_family in _ADAPTIVE else ""
            why = MEANING_CHANGES[(setting, other)].format(target=target_name, adaptive=adaptive)
            out.changed.append(f"{text} changes meaning: {why}")
        elif setting in IMPLIED and same_value(value, IMPLIED[setting]):
            out.implied.append(text)
        elif setting in IGNORED:
            continue
        else:
            why = DROP_REASONS.get((setting, target_family), DROP_REASONS.get(setting, "{target} has no equivalent"))
            why = why.format(target=target_name)
            out.dropped.append(f"{text} dropped: {why}")
    if lr_carried:
        _note_lr(source_cls, source_family, group, target_cls, target_family, target_defaults, out)
    return out


def _note_lr(source_cls: type, source_family: str, group: dict, target_cls: type, target_family: str,
             target_defaults: dict, out: Translation) -> None:
    """Note in ``out.changed`` that the carried ``lr`` moves the params differently (:data:`LR_CHANGES`), unless
    the target computes its own step size (Adafactor's ``relative_step``: the lr is dropped elsewhere)."""
    target_adjust = out.values.get("adjust_lr_fn", target_defaults.get("adjust_lr_fn"))
    kinds = (_step_kind(source_family, group.get("adjust_lr_fn")), _step_kind(target_family, target_adjust))
    why = LR_CHANGES.get(kinds)
    base = group.get("initial_lr", group.get("lr"))  # the lr the user gave, not an LR schedule's current value
    lr = as_float(base)
    if why is None or lr is None or target_defaults.get("relative_step"):
        return
    why = why.format(source=source_cls.__name__, target=target_cls.__name__)
    out.changed.append(f"lr={_fmt(base)} changes meaning: {why}")


def _step_kind(family: str | None, adjust_lr_fn) -> str | None:
    """:data:`STEP_KINDS` of ``family``; Muon with ``adjust_lr_fn="match_rms_adamw"`` steps as AdamW does."""
    if family == "muon" and adjust_lr_fn == "match_rms_adamw":
        return "normalized"
    return STEP_KINDS.get(family)


def step_kind(cls: type, adjust_lr_fn: str | None = None) -> str | None:
    """How optimizer class ``cls`` turns its ``lr`` into a step (:data:`STEP_KINDS`: ``"normalized"``, ``"sign"``,
    ``"orthogonalized"``), with Muon's ``adjust_lr_fn``; ``None`` for SGD and unknown classes."""
    return _step_kind(family_of(cls), adjust_lr_fn)


def _write(values: dict, slot: Slot, value, target_defaults: dict, skip: frozenset[str]) -> None:
    """Put ``value`` into ``slot`` of ``values``, completing a tuple from ``target_defaults``."""
    if slot.key in skip:
        return
    if slot.index is None:
        values[slot.key] = value
        return
    current = list(values.get(slot.key, target_defaults.get(slot.key)) or ())
    if len(current) <= slot.index:
        return
    current[slot.index] = value
    values[slot.key] = tuple(current)


def _translate_by_name(source_cls: type, group: dict, target_cls: type, target_defaults: dict,
                       skip: frozenset[str], out: Translation) -> None:
    """Classes of no known family: a chosen value carries to the same key when the shapes agree."""
    defaults = constructor_defaults(source_cls)
    for key, value in group.items():
        if key in ("params", "lr", *skip) or key not in defaults or key in IGNORED:
            continue
        if same_value(value, defaults[key]) and key != "weight_decay":
            continue
        text = f"{key}={_fmt(value)}"
        target = target_defaults.get(key, _MISSING)
        if target is not _MISSING and _same_shape(value, target):
            out.values[key] = value
            out.carried.append(text)
        elif not same_value(value, defaults[key]):
            out.dropped.append(f"{text} dropped: {target_cls.__name__} has no equivalent")


def _same_shape(a, b) -> bool:
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b)
    return True
