"""Checkpoints of any LightningModule that leave out its frozen base (``LowMemOptimizerCallback(checkpoint_frozen=
False)``).

Lightning writes the module's whole ``state_dict`` into every checkpoint. A user's own module that puts a LoRA on a
pretrained base (peft's ``get_peft_model`` in ``__init__`` or ``configure_model``) writes the frozen base at every
save: a QLoRA 7B, 3.9 GB for adapters of a few MB. Saving the trainable part alone by hand (an ``on_save_checkpoint``
that trims ``state_dict``) then needs ``strict=False`` to resume or load (Lightning-AI/pytorch-lightning#21053), which
also lets a real mismatch through.

:class:`LeaveOutFrozenBase` does it safely, for every checkpoint the module writes (``ModelCheckpoint``, weights-only
ones, ``trainer.save_checkpoint``, the SIGTERM and Ctrl+C ones), through the module's own ``on_save_checkpoint`` and
``on_load_checkpoint`` (a callback's hooks are not called for a weights-only checkpoint, and run after the module was
loaded):

- at fit start, the checksums of the frozen tensors as the module was built are recorded
  (:func:`~lowmem_lightning.frozen_base.tensor_digests`; on the module, so a notebook's second fit keeps the first's);
- a save leaves out the frozen tensors whose checksum is still the build's and records theirs
  (:data:`~lowmem_lightning.frozen_base.FROZEN_BASE_KEY`); a frozen tensor that changed since (trained, then frozen; a
  frozen BatchNorm's statistics) stays in;
- a load (``trainer.fit/validate/test/predict(ckpt_path=...)``, ``lowmem fit --ckpt_path last``) takes them back from
  the module as this run built it, before Lightning loads the checkpoint, compared in the recorded dtype (a
  ``bf16-true`` fit casts an fp32-built module after the load); a module that holds other frozen weights is refused
  with a ``ValueError`` naming a tensor, before any step. :func:`load_from_checkpoint` does the same for
  ``MyModule.load_from_checkpoint``.

A checkpoint is then complete together with the module as your code builds it before the load (from the same base
files, loaded the same way). Under a sharded strategy (FSDP, DeepSpeed, model parallel: the model's state is written
apart) checkpoints stay whole, said once at setup.
"""

from __future__ import annotations

import types
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn

from lowmem_lightning.frozen_base import FROZEN_BASE_KEY, drop_unchanged, model_states, restore_dropped, tensor_digests
from lowmem_lightning.lowmem_warning import LowMemWarning

__all__ = ["LeaveOutFrozenBase", "leave_out_frozen", "load_from_checkpoint", "record_baseline", "take_back_frozen"]

_BASELINE = "_lowmem_frozen_baseline"
"""Module attribute: ``{state_dict key: digest}`` of its frozen tensors as built."""
_HELD = "_lowmem_frozen_held"
"""Module attribute: the frozen keys a loaded checkpoint held with other values than the build's (never left out)."""
_OWN_HOOKS = "_lowmem_own_checkpoint_hooks"
"""Module attribute: the module's own instance-level checkpoint hooks our wrappers replaced, to call and put back."""


def _class_name(module: torch.nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _trainable(module: torch.nn.Module) -> set[str]:
    return {name for name, param in module.named_parameters() if param.requires_grad}


def record_baseline(module: torch.nn.Module) -> None:
    """Record the digests of ``module``'s frozen tensors not recorded yet and not held different by a loaded
    checkpoint (the build's, at fit start)."""
    baseline = module.__dict__.setdefault(_BASELINE, {})
    held = module.__dict__.get(_HELD, set())
    trainable = _trainable(module)
    new = {k: v for k, v in module.state_dict().items() if k not in trainable and k not in baseline and k not in held}
    baseline.update(tensor_digests(new))


def leave_out_frozen(module: torch.nn.Module, checkpoint: dict) -> None:
    """Remove from ``checkpoint``'s model states the frozen tensors whose digest is still the build's, and record
    theirs under :data:`FROZEN_BASE_KEY`. Nothing when the module left out its own (``CausalLMModule``) or no
    baseline was recorded."""
    baseline = module.__dict__.get(_BASELINE)
    if not baseline or FROZEN_BASE_KEY in checkpoint:
        return
    trainable, dropped, seen = _trainable(module), {}, {}
    for container, key in model_states(checkpoint):
        dropped.update(drop_unchanged(container[key], trainable, baseline, seen))
    if dropped:
        checkpoint[FROZEN_BASE_KEY] = {"module": _class_name(module),
                                       "tensors": {k: list(d) for k, d in dropped.items()}}


def take_back_frozen(module: torch.nn.Module, checkpoint: dict, note_held: bool = True) -> None:
    """Put into ``checkpoint``'s model states the frozen tensors it left out, from ``module`` as built (``ValueError``
    when they differ from those it trained on); with ``note_held``, note the frozen tensors it holds with other values
    than the module's, which later saves keep."""
    record = checkpoint.get(FROZEN_BASE_KEY)
    ours = isinstance(record, dict) and "module" in record  # CausalLMModule takes back its own records
    if not ours and not note_held:
        return
    built, checked = module.state_dict(), set()
    for container, key in model_states(checkpoint):
        state = container[key]
        if ours:
            container[key] = restore_dropped(state, record, built, lambda differ, left_out: _refusal(
                module, differ, left_out), checked)
        if note_held:
            _note_held(module, state, built)


def _refusal(module: torch.nn.Module, differ: list[str], left_out: int) -> str:
    return (f"Invalid checkpoint: it leaves out the frozen weights (LowMemOptimizerCallback(checkpoint_frozen=False)), "
            f"and those this {type(module).__name__} holds before the load are not the ones it trained on: "
            f"{len(differ)} of its {left_out} frozen tensors differ, e.g. {differ[0]!r}. Resume or load it with the "
            f"module built as for the run that wrote it (the same base weights, loaded the same way).")


def _note_held(module: torch.nn.Module, state: dict, built: dict) -> None:
    """Add to the module's held keys the frozen tensors ``state`` holds with other digests than the module's now."""
    trainable = _trainable(module)
    frozen = {k: v for k, v in state.items() if k in built and k not in trainable and isinstance(v, torch.Tensor)}
    if not frozen:
        return
    saved = tensor_digests(frozen)
    as_saved = tensor_digests({k: built[k] for k in saved}, {k: d[2] for k, d in saved.items()})
    held = module.__dict__.setdefault(_HELD, set())
    held.update(k for k, d in saved.items() if as_saved.get(k) != d)
    for key in held:
        module.__dict__.get(_BASELINE, {}).pop(key, None)


def _own_hook(module: torch.nn.Module, name: str):
    own = module.__dict__.get(_OWN_HOOKS, {}).get(name)
    return own if own is not None else getattr(type(module), name).__get__(module)


def _on_save_checkpoint(module: L.LightningModule, checkpoint: dict) -> Any:
    """The module's ``on_save_checkpoint``, then :func:`leave_out_frozen`."""
    result = _own_hook(module, "on_save_checkpoint")(checkpoint)
    leave_out_frozen(module, checkpoint)
    return result


def _on_load_checkpoint(module: L.LightningModule, checkpoint: dict) -> Any:
    """:func:`take_back_frozen` (noting held tensors when this run leaves the base out), then the module's
    ``on_load_checkpoint``."""
    take_back_frozen(module, checkpoint, note_held=_installed(module, "on_save_checkpoint"))
    return _own_hook(module, "on_load_checkpoint")(checkpoint)


_HOOKS = {"on_save_checkpoint": _on_save_checkpoint, "on_load_checkpoint": _on_load_checkpoint}


def _installed(module: torch.nn.Module, name: str = "on_load_checkpoint") -> bool:
    hook = module.__dict__.get(name)
    return isinstance(hook, types.MethodType) and hook.__func__ is _HOOKS[name]


def _install(module: torch.nn.Module, names: tuple[str, ...]) -> None:
    """Put our ``names`` hooks on ``module`` (an instance attribute each, in place of any of ours from an earlier
    fit), keeping its own instance-level ones."""
    _uninstall(module)
    module.__dict__[_OWN_HOOKS] = {name: module.__dict__[name] for name in names if name in module.__dict__}
    for name in names:
        module.__dict__[name] = types.MethodType(_HOOKS[name], module)


def _uninstall(module: torch.nn.Module) -> None:
    if not _installed(module):
        return
    own = module.__dict__.pop(_OWN_HOOKS, {})
    for name in _HOOKS:
        if _installed(module, name):
            del module.__dict__[name]
    module.__dict__.update(own)


_SHARDED = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)


class LeaveOutFrozenBase(L.Callback):
    """The part of ``LowMemOptimizerCallback`` that takes back, at a load, the frozen base a checkpoint left out, and,
    with ``leave_out`` (``checkpoint_frozen=False``), leaves it out of the module's checkpoints (this module's
    docstring says how). A run with whole checkpoints thus still resumes one that left the base out.

    Args:
        leave_out: Leave the frozen tensors unchanged since the build out of every checkpoint.
    """

    def __init__(self, leave_out: bool = True) -> None:
        self.leave_out = leave_out

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Wrap the module's checkpoint hooks (any stage: ``validate(ckpt_path=...)`` loads too). With ``leave_out``
        they stay after the fit, so a ``trainer.save_checkpoint`` after it is written as the fit's were (a module
        pickled then refers to this package); the next fit's setup sets them as its own callback says. Under a
        sharded strategy, say once that checkpoints stay whole. One that only takes back steps aside for one that
        leaves out (``LowMemOptimizerCallback(checkpoint_frozen=False)`` on a ``LowMemModule``, which brings its own
        part)."""
        if not self.leave_out and any(isinstance(c, LeaveOutFrozenBase) and c.leave_out for c in trainer.callbacks):
            return
        if isinstance(trainer.strategy, _SHARDED):
            if self.leave_out:
                rank_zero_warn(
                    f"LowMemOptimizerCallback(checkpoint_frozen=False): checkpoints stay whole under "
                    f"{type(trainer.strategy).__name__} (the model's state is written apart, shard by shard).",
                    category=LowMemWarning)
            return
        _install(pl_module, tuple(_HOOKS) if self.leave_out else ("on_load_checkpoint",))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Record the digests of the frozen tensors as built (:func:`record_baseline`)."""
        if self.leave_out and _installed(pl_module, "on_save_checkpoint"):
            record_baseline(pl_module)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Without ``leave_out``, give the module its own hooks back: a module pickled after the fit (``torch.save``,
        MLflow's ``log_model``) then holds no reference to this package. With it they stay, for the saves after the
        fit."""
        if not self.leave_out and _installed(pl_module) and not _installed(pl_module, "on_save_checkpoint"):
            _uninstall(pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """As :meth:`teardown` (Lightning skips it after an exception)."""
        self.teardown(trainer, pl_module, "")


def load_from_checkpoint(module_class: type[L.LightningModule], checkpoint_path, **kwargs) -> L.LightningModule:
    """``module_class.load_from_checkpoint(checkpoint_path, **kwargs)`` for a checkpoint that left out the frozen base
    (``LowMemOptimizerCallback(checkpoint_frozen=False)``; a whole one loads as it would): Lightning builds the module
    (``__init__``, then ``configure_model``) and the frozen tensors are taken from it, checked against the
    checkpoint's checksums (``ValueError`` naming a tensor when they differ), before the checkpoint is loaded."""
    had_own = "on_load_checkpoint" in module_class.__dict__
    own = module_class.__dict__.get("on_load_checkpoint")
    inherited = module_class.on_load_checkpoint

    def on_load_checkpoint(self, checkpoint: dict) -> Any:
        take_back_frozen(self, checkpoint)
        return inherited(self, checkpoint)

    module_class.on_load_checkpoint = on_load_checkpoint
    try:
        return module_class.load_from_checkpoint(checkpoint_path, **kwargs)
    finally:
        if had_own:
            module_class.on_load_checkpoint = own
        else:
            del module_class.on_load_checkpoint
