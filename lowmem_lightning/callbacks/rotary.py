"""A part of ``LowMemOptimizerCallback``: rotary position frequencies back in fp32 after Lightning's bf16 cast.

Under ``precision="bf16-true"`` (or ``"16-true"``) Lightning casts the whole module, buffers too, right before each
stage starts; a Hugging Face model's rotary ``inv_freq`` then loses the precision its positions need (see
:mod:`lowmem_lightning.rotary`). :class:`KeepRotaryFp32` puts the fp32 values back at the start of fit, validation,
test and predict, so a project's own LightningModule around an HF model trains and evaluates on the positions the
pretrained model used and its saved model is served with.

The tensors transformers keeps in fp32 (MoE routers: :mod:`lowmem_lightning.kept_fp32`) cannot be recomputed once
rounded: their fp32 tensors are taken at ``setup``, before Lightning's cast, and put back at the stage's start.
"""

from __future__ import annotations

import lightning as L

from lowmem_lightning.kept_fp32 import fp32_originals, restore_fp32
from lowmem_lightning.rotary import keep_rotary_fp32

__all__ = ["KeepRotaryFp32"]


class KeepRotaryFp32(L.Callback):
    """Restores fp32 rotary frequency buffers (:func:`~lowmem_lightning.rotary.keep_rotary_fp32`) and the fp32
    tensors transformers keeps (taken at ``setup``: :func:`~lowmem_lightning.kept_fp32.fp32_originals`) at the start
    of every stage; a walk over the modules and nothing else when they are fp32 already."""

    def __init__(self) -> None:
        self._originals: dict = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Before the strategy casts the module for ``stage``: hold its kept-fp32 tensors (references)."""
        self._originals = fp32_originals(pl_module)

    def _restore(self, pl_module: L.LightningModule) -> None:
        restore_fp32(pl_module, self._originals)
        self._originals = {}
        keep_rotary_fp32(pl_module)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After the strategy cast and moved the module for fit."""
        self._restore(pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """``trainer.validate`` casts the module again before this."""
        self._restore(pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """``trainer.test`` casts the module again before this."""
        self._restore(pl_module)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """``trainer.predict`` casts the module again before this."""
        self._restore(pl_module)
