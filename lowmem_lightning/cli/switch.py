"""What ``--optim NAME`` does to the settings a config wrote for another optimizer.

A recipe's ``LowMemOptimizerCallback`` carries ``optimizer_kwargs`` written for its own optimizer
(``tiny_sgd.yaml``: ``momentum``, ``nesterov``); ``--optim came`` on that recipe must not hand them to
CAME. :func:`switch_optimizer` keeps every such setting the new optimizer accepts with the same value
and drops the others, and gives ``adafactor`` ``relative_step: false, scale_parameter: false`` (and the module's lr when
the callback has none) when the run has a learning rate (the callback's, ``--lr`` or the module's), so
the recipe's lr and LR schedule drive it, as they drive every other optimizer (Adafactor's own relative
step refuses an lr and an LR scheduler). A callback lr written for SGD is not handed to an adaptive
optimizer, nor the reverse: their learning rates differ by orders of magnitude. One kept between optimizers that
turn an lr into steps of different sizes (AdamW's, Lion's sign, Muon's orthogonalized update) is named in the line.
It returns one line saying what changed, for the command to print.
"""

from __future__ import annotations

from lowmem_lightning.optim.registry import available_optimizers, optimizer_class, optimizer_keywords
from lowmem_lightning.optim.validation import validate_optimizer_args

__all__ = ["switch_optimizer", "ADAFACTOR_EXTERNAL_LR"]

ADAFACTOR_EXTERNAL_LR = {"relative_step": False, "scale_parameter": False}
"""Adafactor's settings for an external learning rate (what ``tiny_adafactor.yaml`` uses)."""


def _accepted(name: str) -> set[str]:
    return set(optimizer_keywords(name))


def _builds(name: str, lr, weight_decay, kwargs: dict) -> bool:
    try:
        validate_optimizer_args(name, lr, weight_decay, kwargs)
    except (ValueError, TypeError):
        return False
    return True


def _carry(name: str, old_kwargs: dict, lr, weight_decay) -> tuple[dict, dict]:
    """``(kept, dropped)``: the old settings ``name`` accepts with their values, one by one in order."""
    accepted = _accepted(name)
    kept, dropped = {}, {}
    for key, value in old_kwargs.items():
        if key in accepted and _builds(name, lr, weight_decay, {**kept, key: value}):
            kept[key] = value
        else:
            dropped[key] = value
    return kept, dropped


def _named_storage(name: str) -> bool:
    """Whether ``name`` is one of an fp32 / 8-bit pair of registered names (``muon`` / ``muon_8bit``): its name,
    not a ``momentum_dtype`` carried from another optimizer's settings, says how the momentum is stored."""
    names = available_optimizers()
    return name.endswith("_8bit") and name[: -len("_8bit")] in names or f"{name}_8bit" in names


def _lr_kind(name: str) -> str:
    """``"SGD"`` (the lr scales the raw gradient) or ``"adaptive"`` (the lr is the size of a normalized step):
    :func:`~lowmem_lightning.callbacks.optimizer.lr_kind` of the registered optimizer ``name``."""
    from lowmem_lightning.callbacks.optimizer import lr_kind

    return lr_kind(optimizer_class(name))


_STEP_WHY = {
    "sign": "{name} moves every element by lr (a sign; the Lion paper uses an lr 3-10x smaller than AdamW's)",
    "orthogonalized": "{name} moves its hidden matrices by an element RMS of lr / sqrt(cols) (Muon's own lr is "
                      "~0.02; optimizer_kwargs adjust_lr_fn: match_rms_adamw keeps an AdamW lr meaningful)",
    "normalized": "{name} moves every element by about lr * m / sqrt(v), not as {previous} did",
}


def _step_note(previous: str, name: str, lr, old_kwargs: dict, new_kwargs: dict) -> list[str]:
    """The note for a config's callback ``lr`` kept across optimizers that turn an lr into steps of different
    sizes (:func:`~lowmem_lightning.callbacks.translate.step_kind`: AdamW's, Lion's sign, Muon's orthogonalized
    update); empty when they step alike."""
    from lowmem_lightning.callbacks.translate import step_kind

    before = step_kind(optimizer_class(previous), old_kwargs.get("adjust_lr_fn"))
    after = step_kind(optimizer_class(name), new_kwargs.get("adjust_lr_fn"))
    if before is None or after is None or before == after:
        return []
    why = _STEP_WHY[after].format(name=name, previous=previous)
    return [f"kept lr={lr!r} (the config's, for {previous}), though {why}: --lr to set one"]


def switch_optimizer(
    init: dict, name: str, run_lr: float | None, *, lr_given: bool = False, module_lr: float | None = None,
    kwargs_given: bool = False,
) -> str | None:
    """Set ``init["optimizer"] = name`` in a ``LowMemOptimizerCallback``'s init args (a dict or
    Namespace, changed in place), carrying over the settings ``name`` accepts.

    ``run_lr``: the run's learning rate (the callback's ``lr``, ``--lr``, else the module's; ``None``
    when it has none). Adafactor gets ``relative_step=False, scale_parameter=False`` and, when the
    callback gives no lr, the module's ``run_lr`` (Adafactor cannot take its lr from the param groups
    alone). A callback lr the config wrote for an optimizer of another lr scale (``sgd`` <-> the adaptive
    ones: ``tiny_sgd.yaml``'s 0.3 would make AdamW diverge) is dropped unless ``lr_given`` (``--lr``), so
    the module's lr (``module_lr``) applies. ``kwargs_given``: the ``optimizer_kwargs`` were given on the
    command line (``--trainer.callbacks.optimizer_kwargs``), for ``name``: they are all kept, and the
    callback's constructor refuses any that ``name`` does not take. Returns one line saying what was dropped or
    added (``None`` when only the name changed).
    """
    previous = init.get("optimizer") or "adamw_8bit"
    init["optimizer"] = name
    old_kwargs = dict(init.get("optimizer_kwargs") or {})
    if previous == name:
        return None
    parts = []
    callback_lr = init.get("lr")
    crossed = _lr_kind(previous) != _lr_kind(name)
    if not lr_given and callback_lr is not None and crossed and float(callback_lr) != module_lr:
        parts.append(f"dropped the config's lr={init['lr']!r} ({previous}'s: {_lr_kind(previous)} and {name} "
                     f"take learning rates of different scales; the module's lr applies, --lr to set one)")
        init["lr"] = None
        run_lr = module_lr
    elif not lr_given and callback_lr is not None and crossed:
        parts.append(f"kept lr={init['lr']!r} (the config's, for {previous} and the module alike), though "
                     f"{_lr_kind(previous)} and {name} take learning rates of different scales: --lr to set one")
    if init.get("bf16_rounding") is not None and "bf16_rounding" not in _accepted(name):
        parts.append(f"dropped the config's bf16_rounding={init['bf16_rounding']!r} ({name} does not take it)")
        init["bf16_rounding"] = None
    if init.get("fp32_state") is not None and "quantize_state" not in _accepted(name):
        parts.append(f"dropped the config's fp32_state={init['fp32_state']!r} ({name} keeps 32-bit state for all)")
        init["fp32_state"] = None
    if kwargs_given:
        kept, dropped = old_kwargs, {}
    else:
        kept, dropped = _carry(name, old_kwargs, init.get("lr"), init.get("weight_decay"))
        if "momentum_dtype" in kept and _named_storage(name):  # the name's own storage: no setting needed
            value = kept.pop("momentum_dtype")
            if value != getattr(optimizer_class(name), "_default_momentum_dtype", None):
                parts.append(f"dropped the config's momentum_dtype={value!r} ({previous}'s; {name}'s name chooses "
                             "how its momentum is stored)")
    added = {}
    if name == "adafactor" and run_lr is not None and "relative_step" not in kept:
        added = {k: v for k, v in ADAFACTOR_EXTERNAL_LR.items() if k not in kept}
        if init.get("lr") is None:
            init["lr"] = float(run_lr)
            added["lr"] = float(run_lr)
    init["optimizer_kwargs"] = {**kept, **{k: v for k, v in added.items() if k != "lr"}} or None
    if not lr_given and callback_lr is not None and init.get("lr") is not None:
        parts.extend(_step_note(previous, name, init["lr"], old_kwargs, init["optimizer_kwargs"] or {}))
    if dropped:
        listed = ", ".join(f"{k}={v!r}" for k, v in dropped.items())
        parts.append(f"dropped the config's optimizer_kwargs {listed} ({previous}'s, not valid for {name})")
    if added:
        listed = ", ".join(f"{k}={v!r}" for k, v in added.items())
        parts.append(f"set {listed} so the run's lr and LR schedule drive it")
    return f"--optim {name}: " + "; ".join(parts) + "." if parts else None
