"""FSDP1Check: refuse, at setup, an optimizer that needs whole tensors under FSDP1 (``strategy="fsdp"``).

FSDP1 hands the optimizer flat 1-D slices of its flattened params, so Adafactor/CAME would factor
nothing and take their RMS over a slice: a different algorithm, silently. FSDP2 (Lightning's
``ModelParallelStrategy`` + ``fully_shard``) hands over DTensors, whose statistics the optimizers
complete across ranks. The optimizers themselves refuse FSDP1 params at construction with the same message
(raw FSDP1 and ``configure_optimizers`` users); element-wise ones save and load FSDP1 checkpoints
(:mod:`lowmem_lightning.optim.fsdp1`). One of the parts of :class:`~lowmem_lightning.callbacks.LowMemOptimizerCallback`.
"""

from __future__ import annotations

import lightning as L

from lowmem_lightning.optim.fsdp1 import WHOLE_TENSOR_OPTIMIZERS, fsdp1_refusal

__all__ = ["FSDP1Check", "WHOLE_TENSOR_OPTIMIZERS", "refuse_fsdp1"]


def refuse_fsdp1(strategy, optimizer_name: str) -> None:
    """Raise ``ValueError`` when ``optimizer_name`` needs whole tensors and ``strategy`` is FSDP1 (the message of
    :func:`lowmem_lightning.optim.fsdp1.fsdp1_refusal`, which the optimizers also raise given FSDP1 params)."""
    try:
        from lightning.pytorch.strategies import FSDPStrategy
    except ImportError:  # pragma: no cover - every supported Lightning has it
        return
    if isinstance(strategy, FSDPStrategy) and optimizer_name in WHOLE_TENSOR_OPTIMIZERS:
        raise ValueError(fsdp1_refusal(f"optimizer={optimizer_name!r} with strategy=FSDPStrategy (FSDP1)"))


class FSDP1Check(L.Callback):
    """Refuse ``optimizer`` under FSDP1 at ``setup("fit")``, before the strategy wraps the model (see module doc).

    Args:
        optimizer: Registered optimizer name the fit will use.
    """

    def __init__(self, optimizer: str) -> None:
        self.optimizer_name = optimizer

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Refuse a whole-tensor optimizer under FSDP1 (``ValueError``)."""
        if stage == "fit":
            refuse_fsdp1(trainer.strategy, self.optimizer_name)
