"""Gradient release: each tensor is updated inside backward as soon as its gradient is ready.

LOMO (Lv et al., "Full Parameter Fine-tuning for Large Language Models with Limited Resources",
2023) and torchtune's "optimizer in backward" remove the gradient buffer: a hook registered with
``Tensor.register_post_accumulate_grad_hook`` fires when a parameter's gradient has been accumulated
in backward; it applies the optimizer to that one tensor and frees the gradient. At the end of
backward no gradient is alive, and during it at most the gradients autograd is still accumulating:
a 7B full fine-tune saves its 2 B/param bf16 gradient buffer (14 GB).

:class:`GradientRelease` owns the hooks of one optimizer. Our optimizers update one tensor through
:meth:`~lowmem_lightning.optim.base.LowMemOptimizer.step_params` and close the step (per-group
bookkeeping such as Adafactor's reported step size) with ``finish_step``; a torch optimizer (the fp32
``adamw`` baseline) is stepped whole, which updates only the hooked tensor because every other
gradient is None at that moment (Lightning zeroes gradients to None before backward and released
ones are freed). Gradient clipping by value is applied per tensor in the hook; everything that needs
all gradients at once is refused beforehand (:func:`release_refusal`).
"""

from __future__ import annotations

import math

import lightning as L
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy

__all__ = ["GradientRelease", "release_refusal"]


class GradientRelease:
    """Post-accumulate-grad hooks that step ``optimizer`` per tensor in backward and free each gradient.

    Args:
        optimizer: the optimizer whose params are updated (ours or any ``torch.optim.Optimizer``).
        clip_value: clamp each gradient to ``[-clip_value, clip_value]`` before its update (Lightning's
            ``gradient_clip_algorithm="value"``), or None.

    :meth:`attach` registers one hook per trainable param of the optimizer, :meth:`finish_step` closes
    a training step (call it after backward), :meth:`detach` removes the hooks. ``updates`` counts the
    tensor updates made in backward since attach.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, clip_value: float | None = None):
        if clip_value is not None and not (isinstance(clip_value, (int, float)) and clip_value > 0
                                           and math.isfinite(clip_value)):
            raise ValueError(f"Invalid clip_value={clip_value!r}: expected None or a finite number > 0.")
        self.optimizer = optimizer
        self.clip_value = None if clip_value is None else float(clip_value)
        self.updates = 0
        self._handles: list = []
        self._per_tensor = callable(getattr(optimizer, "step_params", None))

    @property
    def attached(self) -> bool:
        """Whether the hooks are registered."""
        return bool(self._handles)

    def params(self) -> list[torch.Tensor]:
        """The optimizer's params that require grad (each counted once)."""
        seen, out = set(), []
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                if param.requires_grad and id(param) not in seen:
                    seen.add(id(param))
                    out.append(param)
        return out

    def attach(self) -> GradientRelease:
        """Register the hooks (idempotent); returns self."""
        if not self._handles:
            self._handles = [p.register_post_accumulate_grad_hook(self._on_grad_ready) for p in self.params()]
        return self

    def detach(self) -> None:
        """Remove the hooks; later backward passes keep their gradients as usual."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def finish_step(self) -> None:
        """Close the training step whose updates the hooks made (per-group bookkeeping of ours)."""
        if self._per_tensor:
            self.optimizer.finish_step()

    @torch.no_grad()
    def _on_grad_ready(self, param: torch.Tensor) -> None:
        if param.grad is None:
            return
        if self.clip_value is not None:
            param.grad.clamp_(-self.clip_value, self.clip_value)
        if self._per_tensor:
            self.optimizer.step_params([param])
        else:
            self.optimizer.step()
        param.grad = None
        self.updates += 1


def release_refusal(trainer: L.Trainer, pl_module: L.LightningModule) -> str | None:
    """Why ``step_in_backward=True`` cannot keep a normal step's semantics in this run (None: it can).

    Refused: gradient accumulation (the update would run on every micro-batch), clipping by norm (it
    needs every gradient at once), ``16-mixed`` (its GradScaler unscales and checks all gradients
    after backward), manual optimization (the module steps itself), and any strategy but a single
    device (DDP/FSDP reduce gradients after the hook would fire).
    """
    if not pl_module.automatic_optimization:
        return ("the module uses manual optimization (automatic_optimization=False) and steps its optimizer "
                "itself; set step_in_backward=False")
    if trainer.accumulate_grad_batches > 1:
        return (f"accumulate_grad_batches={trainer.accumulate_grad_batches} needs the gradients of several batches; "
                "set accumulate_grad_batches=1 (raise the batch size instead) or step_in_backward=False")
    clip_algorithm = trainer.gradient_clip_algorithm  # an enum; None means norm
    algorithm = getattr(clip_algorithm, "value", clip_algorithm) or "norm"
    if trainer.gradient_clip_val and algorithm != "value":
        return (f"gradient_clip_val={trainer.gradient_clip_val} with gradient_clip_algorithm="
                f"{algorithm!r} clips by the global norm of all gradients at once; use "
                "gradient_clip_algorithm='value' (applied per tensor) or step_in_backward=False")
    if str(trainer.precision) in ("16-mixed", "16"):
        return (f"precision={trainer.precision!r} scales the loss with a GradScaler that checks all gradients after "
                "backward; use 'bf16-mixed' or 'bf16-true', or step_in_backward=False")
    if not isinstance(trainer.strategy, SingleDeviceStrategy) or trainer.world_size > 1:
        return (f"strategy {type(trainer.strategy).__name__} (world size {trainer.world_size}) reduces gradients "
                "across processes after the hook would fire; train on one device or set step_in_backward=False")
    return None
