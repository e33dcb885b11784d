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

Reentrant activation checkpointing (``torch.utils.checkpoint(..., use_reentrant=True)``) runs each
checkpointed block's backward as a nested backward pass, and a param used in several such blocks (tied
or shared weights) has its gradient accumulated, and the hook fired, once per block: stepping at the
first firing would update it with part of its gradient, then again with the rest. So a param whose
gradient arrives in a nested pass (told apart from the outer pass by the autograd graph task, with
:meth:`GradientRelease.watch` on the loss; the callback does this) is held back the first time: its
gradient is kept and it is updated after backward (:meth:`GradientRelease.finish_step`) with the whole
gradient, exactly as a normal step. A param that got its gradient in one firing is released in
backward from the next step on; one that got it in several is always updated after backward. Should a
param released in backward fire again in the same backward (the loss was not watched, or the model's
structure changed), that step cannot be made right and ``RuntimeError`` stops it: never a silent
partial update.

Buckets: a gradient ready in backward joins the current bucket; when the bucket's gradients reach
``bucket_bytes`` (DDP's 25 MiB by default) they are updated together in one optimizer call (one finite
check and one kernel launch per dtype group on CUDA, instead of one of each per tensor) and freed. The
rest is updated when the backward pass ends (an autograd engine callback), so at most ``bucket_bytes``
plus one tensor of released gradients is alive at any time. ``bucket_bytes=0`` steps each tensor alone.
Each tensor's update is the same as in a normal step, so the results do not depend on the bucketing.
"""

from __future__ import annotations

import math
import warnings

import lightning as L
import torch
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.strategies import SingleDeviceStrategy

__all__ = ["GradientRelease", "GradientReleaseCallback", "release_refusal", "DEFAULT_BUCKET_BYTES"]

DEFAULT_BUCKET_BYTES = 25 * 2**20
"""Gradient bytes gathered before a bucket is updated (DDP's default bucket size)."""


def _graph_task() -> int | None:
    """Id of the autograd graph task running now (each nested backward pass has its own)."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current() if current is not None else None


class GradientRelease:
    """Post-accumulate-grad hooks that step ``optimizer`` in backward, per bucket of ready gradients, and free them.

    Args:
        optimizer: the optimizer whose params are updated (ours or any ``torch.optim.Optimizer``).
        clip_value: clamp each gradient to ``[-clip_value, clip_value]`` before its update (Lightning's
            ``gradient_clip_algorithm="value"``), or None.
        bucket_bytes: update the gradients ready in backward together once they reach this many bytes
            (an int >= 0; the rest at the end of the backward pass); 0 updates each tensor alone.

    :meth:`attach` registers one hook per trainable param of the optimizer (call it again to hook params
    unfrozen since), :meth:`watch` marks the loss of the coming backward (so gradients of nested,
    reentrant-checkpoint passes are recognised), :meth:`finish_step` closes a training step (call it
    after backward), :meth:`detach` removes the hooks. ``updates`` counts the tensor updates made in
    backward since attach; ``held_back`` the params whose gradient is accumulated in several nested
    passes per backward and so are updated after it; ``bucket_steps`` the optimizer calls made in
    backward; ``peak_bucket_bytes`` the most gradient bytes a bucket held (the tensor that closed it
    included).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, clip_value: float | None = None,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        if clip_value is not None and not (isinstance(clip_value, (int, float)) and clip_value > 0
                                           and math.isfinite(clip_value)):
            raise ValueError(f"Invalid clip_value={clip_value!r}: expected None or a finite number > 0.")
        if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 0:
            raise ValueError(f"Invalid bucket_bytes={bucket_bytes!r}: expected an int >= 0 (0: each tensor alone).")
        self.optimizer = optimizer
        self.clip_value = None if clip_value is None else float(clip_value)
        self.bucket_bytes = bucket_bytes
        self.updates = 0
        self.bucket_steps = 0
        self.peak_bucket_bytes = 0
        self._bucket: dict[int, torch.Tensor] = {}  # id(param) -> param, gradients ready, not yet updated
        self._bucket_nbytes = 0
        self._flush_queued: set[int] = set()  # graph tasks whose end flushes the bucket
        self._rank: dict[int, int] = {}  # id(param) -> its position among the optimizer's params
        self._handles: dict[int, object] = {}
        self._per_tensor = callable(getattr(optimizer, "step_params", None))
        self._outer: int | None = None  # graph task of the watched loss's backward
        self._fired: dict[int, int] = {}  # id(param) -> hook firings in the current backward
        self._stepped: set[int] = set()  # params updated in the current backward
        self._pending: dict[int, torch.Tensor] = {}  # params held back until finish_step
        self._single: set[int] = set()  # nested params seen to get their gradient in one firing
        self._multi: set[int] = set()  # params seen to get it in several
        self._warn_if_one_bucket()

    def _warn_if_one_bucket(self) -> None:
        """Warn when every trainable gradient fits in one bucket: it closes only when backward ends, so every
        gradient is alive then, as without release (the step is still exact; only the memory saving is lost)."""
        total = sum(param.numel() * param.element_size() for param in self.params())
        if 0 < total <= self.bucket_bytes:
            warnings.warn(
                f"Gradient release with bucket_bytes={self.bucket_bytes} ({self.bucket_bytes / 2**20:.1f} MiB): all "
                f"{total / 2**20:.2f} MiB of this optimizer's gradients fit in one bucket, which is updated when "
                "backward ends, so no gradient memory is saved; set bucket_bytes=0 (each tensor alone; "
                "LowMemOptimizerCallback(bucket_bytes=0)) or smaller than the gradients.", UserWarning, stacklevel=3)

    @property
    def attached(self) -> bool:
        """Whether the hooks are registered."""
        return bool(self._handles)

    @property
    def held_back(self) -> int:
        """Number of params updated after backward because their gradient arrives in several firings."""
        return len(self._multi)

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
        """Register a hook on every trainable param not hooked yet (so params unfrozen since the last call
        are released too); returns self."""
        self._rank = {id(param): rank for rank, param in enumerate(self.params())}
        for param in self.params():
            if id(param) not in self._handles:
                self._handles[id(param)] = param.register_post_accumulate_grad_hook(self._on_grad_ready)
        return self

    def detach(self) -> None:
        """Remove the hooks; later backward passes keep their gradients as usual."""
        for handle in self._handles.values():
            handle.remove()
        self._handles = {}

    def watch(self, loss: torch.Tensor) -> None:
        """Mark ``loss`` as the root of the next backward: its graph task is the outer one, and a gradient
        accumulated in any other (a reentrant checkpoint's nested pass) is held back until it is whole."""
        self._outer = None
        if isinstance(loss, torch.Tensor) and loss.requires_grad:
            loss.register_hook(self._record_outer)

    def _record_outer(self, grad: torch.Tensor) -> None:
        self._outer = _graph_task()

    def finish_step(self) -> None:
        """Close the training step: update what is left in the bucket, then the params held back with their
        whole gradient, learn which of them got it in one firing, then the per-group bookkeeping of ours."""
        self._flush()
        self._flush_queued.clear()
        pending = list(self._pending.values())
        for param in pending:
            (self._multi if self._fired.get(id(param), 0) > 1 else self._single).add(id(param))
        if pending:
            self._update(pending)
        self._pending, self._fired, self._stepped, self._outer = {}, {}, set(), None
        if self._per_tensor:
            self.optimizer.finish_step()

    def _update(self, params: list[torch.Tensor]) -> None:
        """Clip, update and free the gradients of ``params`` (each with a gradient)."""
        for param in params:
            if self.clip_value is not None:
                param.grad.clamp_(-self.clip_value, self.clip_value)
        if self._per_tensor:
            self.optimizer.step_params(params)
        else:  # a torch optimizer steps every param with a gradient: hide those held back meanwhile
            chosen = {id(p) for p in params}
            hidden = {key: p for key, p in self._pending.items() if key not in chosen and p.grad is not None}
            grads = {key: p.grad for key, p in hidden.items()}
            for p in hidden.values():
                p.grad = None
            self.optimizer.step()
            for key, p in hidden.items():
                p.grad = grads[key]
        for param in params:
            param.grad = None

    @torch.no_grad()
    def _on_grad_ready(self, param: torch.Tensor) -> None:
        if param.grad is None:
            return
        key = id(param)
        self._fired[key] = self._fired.get(key, 0) + 1
        if key in self._pending:
            return  # held back: this firing adds to its gradient
        if key in self._stepped:
            raise RuntimeError(
                f"GradientRelease: a param of shape {tuple(param.shape)} got a second gradient in one backward after "
                "it was updated in backward, so that update used part of its gradient (a weight shared by blocks "
                "under reentrant activation checkpointing, with the loss not watched or the weight's use changed "
                "between steps). Call GradientRelease.watch(loss) before every backward (LowMemOptimizerCallback "
                "does), use torch.utils.checkpoint(..., use_reentrant=False), or step_in_backward=False."
            )
        if key in self._bucket:  # a second gradient before its bucket was updated: hold it back, whole
            self._bucket_nbytes -= _grad_bytes(self._bucket.pop(key))
            self._pending[key] = param
            return
        task = _graph_task()
        nested = self._outer is not None and task != self._outer
        if key in self._multi or (nested and key not in self._single):
            self._pending[key] = param
            return
        self._bucket[key] = param
        self._bucket_nbytes += _grad_bytes(param)
        self.peak_bucket_bytes = max(self.peak_bucket_bytes, self._bucket_nbytes)
        if self._bucket_nbytes >= self.bucket_bytes:
            self._flush()
        elif task is not None and task >= 0 and task not in self._flush_queued:
            self._flush_queued.add(task)  # the rest of the bucket is updated when this backward pass ends
            torch.autograd.Variable._execution_engine.queue_callback(lambda: self._end_of_pass(task))

    def _end_of_pass(self, task: int) -> None:
        self._flush_queued.discard(task)
        self._flush()

    @torch.no_grad()
    def _flush(self) -> None:
        """Update the bucket's params in one optimizer call (in the optimizer's param order, so per-group
        values written by a group's first tensor, e.g. Adafactor's step size, come out as in a normal step)
        and free their gradients."""
        params = sorted(self._bucket.values(), key=lambda p: self._rank.get(id(p), len(self._rank)))
        self._bucket, self._bucket_nbytes = {}, 0
        if not params:
            return
        self._update(params)
        self._stepped.update(id(p) for p in params)
        self.updates += len(params)
        self.bucket_steps += 1


def _grad_bytes(param: torch.Tensor) -> int:
    return param.grad.numel() * param.grad.element_size()


def release_refusal(trainer: L.Trainer, pl_module: L.LightningModule) -> str | None:
    """Why ``step_in_backward=True`` cannot keep a normal step's semantics in this run (None: it can).

    Refused: gradient accumulation, from the start or from an epoch of a ``GradientAccumulationScheduler`` (the
    update would run on every micro-batch), clipping by norm (it
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
    scheduler = next((c for c in getattr(trainer, "callbacks", ()) if isinstance(c, GradientAccumulationScheduler)
                      and c.going_to_accumulate_grad_batches()), None)
    if scheduler is not None:
        return (f"GradientAccumulationScheduler(scheduling={scheduler.scheduling!r}) accumulates the gradients of "
                "several batches from its epochs on (the update would run on every batch); remove it (raise the "
                "batch size instead) or set step_in_backward=False")
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


class GradientReleaseCallback(L.Callback):
    """The gradient-release lifecycle of a fit: what ``LowMemOptimizerCallback(step_in_backward=True)`` adds.

    ``setup("fit")`` refuses a run whose semantics release would change (:func:`release_refusal`);
    ``on_train_start`` (after any checkpoint was restored) hooks every optimizer of the Trainer with a
    :class:`GradientRelease` and takes clipping by value into the hooks (``trainer.gradient_clip_val`` is
    off for the fit: Lightning's pass after backward would find no gradient); each training batch hooks
    params unfrozen since, marks the loss, and closes the step after backward; ``teardown`` or an
    exception removes the hooks and gives ``gradient_clip_val`` back.
    """

    def __init__(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        self.bucket_bytes = bucket_bytes
        """The :class:`GradientRelease` bucket size (bytes; 0: each tensor alone)."""
        self.releases: list[GradientRelease] = []
        """The hooks of the current fit, one per optimizer (empty outside training)."""
        self._clip: tuple[L.Trainer, float | int | None] | None = None  # the gradient_clip_val to give back

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Refuse, before the strategy sets up, a run where release cannot equal a normal step."""
        if stage != "fit":
            return
        reason = release_refusal(trainer, pl_module)
        if reason is not None:
            raise ValueError(f"LowMemOptimizerCallback(step_in_backward=True) cannot run: {reason}.")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Hook every optimizer; clipping by value moves from Lightning into the hooks."""
        if self.releases:
            return
        clip = trainer.gradient_clip_val if trainer.gradient_clip_algorithm == "value" else None
        self.releases = [GradientRelease(opt, clip_value=clip or None, bucket_bytes=self.bucket_bytes).attach()
                         for opt in trainer.optimizers]
        self._clip = (trainer, trainer.gradient_clip_val)
        trainer.gradient_clip_val = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        """Hook the params unfrozen since the last step (they are released too)."""
        for release in self.releases:
            release.attach()

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        """Mark the loss, so gradients of reentrant-checkpoint passes are told apart."""
        for release in self.releases:
            release.watch(loss)

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Close the step backward just updated (params held back are updated now, whole)."""
        for release in self.releases:
            release.finish_step()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Remove the hooks; give ``gradient_clip_val`` back."""
        self._detach()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Remove the hooks; give ``gradient_clip_val`` back (Lightning skips ``teardown`` after an exception)."""
        self._detach()

    def _detach(self) -> None:
        for release in self.releases:
            release.detach()
        self.releases = []
        if self._clip is not None:
            trainer, clip = self._clip
            trainer.gradient_clip_val = clip
            self._clip = None
