"""A part of ``LowMemOptimizerCallback``: a warning when gradient checkpointing is on in modules that are in eval mode.

``from_pretrained`` hands a Hugging Face model over in eval mode, and Lightning keeps each module's mode when fit
starts (it only warns that some are in eval mode). Transformers checkpoints a layer only while ``module.training``,
so a project that calls ``gradient_checkpointing_enable()`` on a model it loaded with ``from_pretrained`` (the usual
pattern in a LightningModule's ``__init__``) trains without checkpointing: every layer's activations are kept, the
memory checkpointing is there to save, and dropout is off. :class:`CheckpointingModeCheck` says so once, naming the
fix; it changes no module's mode (a project may keep some modules in eval mode on purpose).
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lowmem_lightning.lowmem_warning import LowMemWarning

__all__ = ["CheckpointingModeCheck", "checkpointing_in_eval_mode", "warn_checkpointing_in_eval_mode"]


def checkpointing_in_eval_mode(module: nn.Module) -> list[str]:
    """Names of the layers of ``module`` with gradient checkpointing switched on that are in eval mode, where
    transformers skips checkpointing: the innermost modules with ``gradient_checkpointing = True`` (the decoder
    layers; the model holding them carries the flag too)."""
    flagged = [name for name, sub in module.named_modules() if getattr(sub, "gradient_checkpointing", False) is True]
    layers = {name for name in flagged if not any(other.startswith(f"{name}.") or (not name and other)
                                                  for other in flagged)}
    return [name for name, sub in module.named_modules() if name in layers and not sub.training]


def warn_checkpointing_in_eval_mode(module: nn.Module) -> None:
    """One ``LowMemWarning`` (rank 0) naming the count, the first layer and the fix when layers of ``module`` with
    gradient checkpointing are in eval mode (:func:`checkpointing_in_eval_mode`); nothing otherwise."""
    names = checkpointing_in_eval_mode(module)
    if names:
        rank_zero_warn(
            f"Gradient checkpointing is on in {len(names)} layer(s) that are in eval mode (e.g. '{names[0]}'): "
            "transformers checkpoints a layer only in train mode, so this fit keeps every layer's activations "
            "(the memory checkpointing saves) and runs without dropout. from_pretrained returns a model in eval "
            "mode and Lightning keeps modules' modes; call model.train() after loading it.",
            category=LowMemWarning,
        )


class CheckpointingModeCheck(L.Callback):
    """Warns at the start of training when layers with gradient checkpointing are in eval mode
    (:func:`warn_checkpointing_in_eval_mode`), once per fit."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After Lightning set up the fit, with the modes training will run in."""
        warn_checkpointing_in_eval_mode(pl_module)
