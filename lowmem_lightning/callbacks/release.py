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
ones are freed). Gradient clipping by value is applied per tensor in the hook; what else needs all
gradients at once is refused beforehand (:func:`release_refusal`).

Clipping by the global norm (``clip_norm``) takes two backward passes over the retained graph, as LOMO
(section 3.3) does: in the norm pass (:meth:`GradientRelease.norm_pass`) each hook takes its gradient's norm
(``torch._foreach_norm``, the op ``torch.nn.utils.clip_grad_norm_`` uses) and frees it at once, no bucket
(all activations are still alive in this pass: a bucket of gradients beside them would raise the step's
peak); the total norm is those norms stacked in ``clip_grad_norm_``'s order and reduced as it does, so the
coefficient ``min(1, clip_norm / (total + 1e-6))`` is its own, bit for bit. The second pass updates each
gradient multiplied by that coefficient. A non-finite total is handed to our optimizer as the step's norm
(as :class:`~.clip_norm.ClipNormReuse` does in a normal step): every update of the step is skipped and
counted in ``skipped_updates``; a torch optimizer gets the gradients scaled by the non-finite coefficient,
as after ``clip_grad_norm_(error_if_nonfinite=False)``. No gradient buffer exists in either pass; the price
is a second backward per step (and the activations kept until it).

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

import inspect
import math
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import lightning as L
import torch
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype, _has_foreach_support

from lowmem_lightning.lowmem_warning import LowMemWarning

__all__ = ["GradientRelease", "GradientReleaseCallback", "release_refusal", "DEFAULT_BUCKET_BYTES", "TWO_PASS_NOTICE"]

DEFAULT_BUCKET_BYTES = 25 * 2**20
"""Gradient bytes gathered before a bucket is updated (DDP's default bucket size)."""

TWO_PASS_NOTICE = "Gradient release with clipping by norm: backward runs twice per step."
"""The line logged (rank zero) at the start of a fit that clips by norm under gradient release."""


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
        clip_norm: clip the gradients to this total L2 norm (Lightning's ``gradient_clip_algorithm="norm"``;
            a finite number > 0), or None. Each step then takes two backward passes over a retained graph:
            the first inside ``with release.norm_pass():`` (norms only, each gradient freed once its norm is
            taken), the second updates (in buckets); an update with no norm pass before it raises
            ``RuntimeError``. Not together with ``clip_value``.

    :meth:`attach` registers one hook per trainable param of the optimizer (call it again to hook params
    unfrozen since), :meth:`watch` marks the loss of the coming backward (so gradients of nested,
    reentrant-checkpoint passes are recognised), :meth:`finish_step` closes a training step (call it
    after backward), :meth:`detach` removes the hooks. ``updates`` counts the tensor updates made in
    backward since attach; ``held_back`` the params whose gradient is accumulated in several nested
    passes per backward and so are updated after it; ``bucket_steps`` the optimizer calls made in
    backward; ``peak_bucket_bytes`` the most gradient bytes a bucket held (the tensor that closed it
    included); ``total_norm`` the total gradient norm of the last norm pass (0-d, the gradients' dtype, as
    ``clip_grad_norm_`` returns it; None before one).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, clip_value: float | None = None,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, clip_norm: float | None = None):
        for name, value in (("clip_value", clip_value), ("clip_norm", clip_norm)):
            if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                          and value > 0 and math.isfinite(value)):
                raise ValueError(f"Invalid {name}={value!r}: expected None or a finite number > 0.")
        if clip_value is not None and clip_norm is not None:
            raise ValueError(f"Invalid clip_value={clip_value!r} with clip_norm={clip_norm!r}: clip by value or by "
                             "norm, not both (set one of them to None).")
        if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 0:
            raise ValueError(f"Invalid bucket_bytes={bucket_bytes!r}: expected an int >= 0 (0: each tensor alone).")
        self.optimizer = optimizer
        self.clip_value = None if clip_value is None else float(clip_value)
        self.bucket_bytes = bucket_bytes
        self.clip_norm = None if clip_norm is None else float(clip_norm)
        self.total_norm: torch.Tensor | None = None
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
        self._norm_pass = False  # inside norm_pass(): hooks take norms instead of updating
        self._norms: dict[int, torch.Tensor] = {}  # id(param) -> its gradient's norm (norm pass)
        self._coef: torch.Tensor | None = None  # the clip coefficient of the step's update pass
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
                "LowMemOptimizerCallback(bucket_bytes=0)) or smaller than the gradients.", LowMemWarning, stacklevel=3)

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
        try:
            self._close_backward()
            if self._per_tensor:
                self.optimizer.finish_step()
        finally:
            self._coef = None
            if self._per_tensor and self.clip_norm is not None:
                self.optimizer._step_norm = None

    def _close_backward(self) -> None:
        """Process (update, or in the norm pass take the norm of) what is left in the bucket, then the params held
        back with their whole gradient; learn which of them got it in one firing; reset the per-backward state."""
        self._flush()
        self._flush_queued.clear()
        pending = list(self._pending.values())
        for param in pending:
            (self._multi if self._fired.get(id(param), 0) > 1 else self._single).add(id(param))
        if pending:
            self._update(pending)
        self._pending, self._fired, self._stepped, self._outer = {}, {}, set(), None

    @contextmanager
    def norm_pass(self) -> Iterator[GradientRelease]:
        """The first of the two backward passes of clipping by norm: run ``loss.backward(retain_graph=True)``
        inside the block. Each hook takes its gradient's norm and frees it (no update); on exit the total norm
        (:attr:`total_norm`) and the clip coefficient ``min(1, clip_norm / (total + 1e-6))`` are computed as
        ``torch.nn.utils.clip_grad_norm_`` computes them, and the next backward pass updates every gradient
        multiplied by it (our optimizer also gets the total as the step's norm: a non-finite one skips the
        whole step). ``ValueError`` without ``clip_norm``."""
        if self.clip_norm is None:
            raise ValueError("GradientRelease.norm_pass() needs clip_norm (a finite number > 0), got None.")
        self._norm_pass, self._norms, self._coef, self.total_norm = True, {}, None, None
        try:
            yield self
            self._close_backward()
        except BaseException:
            self._pending, self._fired, self._stepped, self._outer, self._bucket = {}, {}, set(), None, {}
            self._bucket_nbytes = 0
            raise
        finally:
            self._norm_pass = False
        self.total_norm = self._total_norm()
        self._norms = {}
        self._coef = torch.clamp(self.clip_norm / (self.total_norm + 1e-6), max=1.0)
        if self._per_tensor:
            self.optimizer._step_norm = self.total_norm  # each update of the step checks this norm, as step() would

    def _total_norm(self) -> torch.Tensor:
        """The L2 norm of the norm pass's per-gradient norms, stacked in the order ``clip_grad_norm_`` stacks them
        (the optimizer's param order, grouped by device and dtype as its grouping orders them), so it is that
        function's total bit for bit (0-d; zero when no param got a gradient)."""
        if not self._norms:
            return torch.tensor(0.0)
        last = len(self._rank)
        norms = [self._norms[key] for key in sorted(self._norms, key=lambda key: self._rank.get(key, last))]
        grouped = _group_tensors_by_device_and_dtype([norms])  # a norm has its gradient's device and dtype
        first = norms[0].device
        ordered = [norm.to(first) for [group], _ in grouped.values() for norm in group]
        return torch.linalg.vector_norm(torch.stack(ordered), 2.0)

    def _take_norms(self, params: list[torch.Tensor]) -> None:
        """Norm pass: keep the L2 norm of each param's gradient (``_foreach_norm`` per device and dtype, the op
        ``clip_grad_norm_`` uses) and free the gradient. The norm pass hands each gradient over alone, as soon as
        it is ready (no bucket: the graph's activations are all still alive in this pass, so a bucket of
        gradients beside them would raise its peak above the update pass's)."""
        grouped = _group_tensors_by_device_and_dtype([[p.grad for p in params]], with_indices=True)
        for (device, _), ([grads], indices) in grouped.items():
            if _has_foreach_support(grads, device):
                norms = torch._foreach_norm(grads, 2.0)
            else:
                norms = [torch.linalg.vector_norm(g, 2.0) for g in grads]
            for index, norm in zip(indices, norms):
                self._norms[id(params[index])] = norm
        for param in params:
            param.grad = None

    def _scale(self, params: list[torch.Tensor]) -> None:
        """Multiply the gradients of ``params`` by the step's clip coefficient (as ``clip_grad_norm_`` does)."""
        if self._coef is None:
            raise RuntimeError(
                f"GradientRelease(clip_norm={self.clip_norm}): a gradient is ready for its update but no norm pass "
                "ran before this backward, so the clip coefficient is unknown. Run loss.backward(retain_graph=True) "
                "inside `with release.norm_pass():` first, then loss.backward() (LowMemOptimizerCallback does).")
        grouped = _group_tensors_by_device_and_dtype([[p.grad for p in params]])
        for (device, _), ([grads], _) in grouped.items():
            coef = self._coef.to(device)
            if _has_foreach_support(grads, device):
                torch._foreach_mul_(grads, coef)
            else:
                for grad in grads:
                    grad.mul_(coef)

    def _update(self, params: list[torch.Tensor]) -> None:
        """Clip, update and free the gradients of ``params`` (each with a gradient); in the norm pass, take their
        norms and free them."""
        if self._norm_pass:
            self._take_norms(params)
            return
        if self.clip_norm is not None:
            self._scale(params)
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
                "it was updated (or its norm taken) in backward, so that used part of its gradient (a weight shared "
                "by blocks under reentrant activation checkpointing, with the loss not watched or the weight's use "
                "changed between steps). Call GradientRelease.watch(loss) before every backward "
                "(LowMemOptimizerCallback does), use torch.utils.checkpoint(..., use_reentrant=False), "
                "or step_in_backward=False."
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
        if self._bucket_nbytes >= self.bucket_bytes or self._norm_pass:  # norm pass: each gradient alone
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
        if not self._norm_pass:
            self.updates += len(params)
            self.bucket_steps += 1


def _grad_bytes(param: torch.Tensor) -> int:
    return param.grad.numel() * param.grad.element_size()


def release_refusal(trainer: L.Trainer, pl_module: L.LightningModule) -> str | None:
    """Why ``step_in_backward=True`` cannot keep a normal step's semantics in this run (None: it can).

    Refused: gradient accumulation, from the start or from an epoch of a ``GradientAccumulationScheduler`` (the
    update would run on every micro-batch), ``16-mixed`` (its GradScaler unscales and checks all gradients
    after backward), manual optimization (the module steps itself), any strategy but a single
    device (DDP/FSDP reduce gradients after the hook would fire), and clipping by norm (two backward passes)
    with a ``pl_module.backward`` override that cannot be called with ``retain_graph=True``.
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
    if _clip(trainer)[1] is not None and not _takes_retain_graph(pl_module.backward):
        return (f"gradient_clip_val={trainer.gradient_clip_val} clips by norm in two backward passes, the first "
                f"with retain_graph=True, and {type(pl_module).__name__}.backward cannot take it; override it as "
                "backward(self, loss, *args, **kwargs) passing them on to loss.backward, use "
                "gradient_clip_algorithm='value', or step_in_backward=False")
    if str(trainer.precision) in ("16-mixed", "16"):
        return (f"precision={trainer.precision!r} scales the loss with a GradScaler that checks all gradients after "
                "backward; use 'bf16-mixed' or 'bf16-true', or step_in_backward=False")
    if not isinstance(trainer.strategy, SingleDeviceStrategy) or trainer.world_size > 1:
        return (f"strategy {type(trainer.strategy).__name__} (world size {trainer.world_size}) reduces gradients "
                "across processes after the hook would fire; train on one device or set step_in_backward=False")
    return None


def _clip(trainer: L.Trainer) -> tuple[float | None, float | None]:
    """``(clip_value, clip_norm)`` of the Trainer's gradient clipping: the one its algorithm names (an enum or
    None, which means norm) gets ``gradient_clip_val``; the other is None (both None when it does not clip)."""
    algorithm = trainer.gradient_clip_algorithm
    algorithm = getattr(algorithm, "value", algorithm) or "norm"
    clip = trainer.gradient_clip_val or None
    return (clip, None) if algorithm == "value" else (None, clip)


def _takes_retain_graph(backward) -> bool:
    """Whether ``backward(loss, retain_graph=True)`` binds (Lightning's own passes its keywords to
    ``loss.backward``; an override may not)."""
    try:
        inspect.signature(backward).bind(torch.zeros(()), retain_graph=True)
    except TypeError:
        return False
    except ValueError:  # no signature to read (a builtin): assume it forwards
        return True
    return True


class _TwoPassBackward:
    """The precision plugin's ``backward`` while clipping by norm under gradient release: the plugin's own
    backward (so the module's ``backward``, an override included) runs twice, first with ``retain_graph=True``
    inside every release's :meth:`GradientRelease.norm_pass`, then as Lightning called it (the updates).

    Gradients of trainable params no release hooks (not in the optimizer) are put back after the norm pass, so
    the second pass does not add to them twice."""

    def __init__(self, original, releases: list[GradientRelease]) -> None:
        self.original = original
        self.releases = releases

    def __call__(self, tensor: torch.Tensor, model: L.LightningModule, optimizer, *args, **kwargs) -> None:
        """Norm pass, then update pass, of ``tensor`` (the loss)."""
        hooked = {id(p) for release in self.releases for p in release.params()}
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in hooked]
        kept = [None if p.grad is None else p.grad.clone() for p in others]
        retained = (args[0], True, *args[2:]) if len(args) >= 2 else args
        retain_kwargs = kwargs if len(args) >= 2 else {**kwargs, "retain_graph": True}
        with ExitStack() as stack:
            for release in self.releases:
                stack.enter_context(release.norm_pass())
            self.original(tensor, model, optimizer, *retained, **retain_kwargs)
        for param, grad in zip(others, kept):
            param.grad = grad
        try:
            self.original(tensor, model, optimizer, *args, **kwargs)
        except RuntimeError as err:
            if "second time" not in str(err):
                raise
            raise RuntimeError(
                f"Clipping by norm under gradient release runs backward twice, the first with retain_graph=True, "
                f"and the graph was freed after the first: {type(model).__name__}.backward must pass its keyword "
                "arguments on to loss.backward(...).") from err


class GradientReleaseCallback(L.Callback):
    """The gradient-release lifecycle of a fit: what ``LowMemOptimizerCallback(step_in_backward=True)`` adds.

    ``setup("fit")`` refuses a run whose semantics release would change (:func:`release_refusal`);
    ``on_train_start`` (after any checkpoint was restored) hooks every optimizer of the Trainer with a
    :class:`GradientRelease` and takes clipping into the hooks (``trainer.gradient_clip_val`` is
    off for the fit: Lightning's pass after backward would find no gradient); clipping by norm also makes the
    precision plugin's ``backward`` run twice per step (norm pass, then update pass; logged once at setup);
    each training batch hooks params unfrozen since, marks the loss, and closes the step after backward;
    ``teardown`` or an exception removes the hooks, gives ``gradient_clip_val`` and the plugin's ``backward``
    back.
    """

    def __init__(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        self.bucket_bytes = bucket_bytes
        """The :class:`GradientRelease` bucket size (bytes; 0: each tensor alone)."""
        self.releases: list[GradientRelease] = []
        """The hooks of the current fit, one per optimizer (empty outside training)."""
        self._clip: tuple[L.Trainer, float | int | None] | None = None  # the gradient_clip_val to give back
        self._routed: tuple[object, object] | None = None  # (precision plugin, its own instance "backward" or None)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Refuse, before the strategy sets up, a run where release cannot equal a normal step."""
        if stage != "fit":
            return
        reason = release_refusal(trainer, pl_module)
        if reason is not None:
            raise ValueError(f"LowMemOptimizerCallback(step_in_backward=True) cannot run: {reason}.")
        if _clip(trainer)[1] is not None:
            rank_zero_info(TWO_PASS_NOTICE)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Hook every optimizer; clipping moves from Lightning into the hooks (by norm: two backward passes)."""
        if self.releases:
            return
        clip_value, clip_norm = _clip(trainer)
        self.releases = [GradientRelease(opt, clip_value=clip_value, bucket_bytes=self.bucket_bytes,
                                         clip_norm=clip_norm).attach() for opt in trainer.optimizers]
        self._clip = (trainer, trainer.gradient_clip_val)
        trainer.gradient_clip_val = None
        if clip_norm is not None:
            plugin = trainer.precision_plugin
            own = vars(plugin).get("backward")
            self._routed = (plugin, own)
            plugin.backward = _TwoPassBackward(plugin.backward, self.releases)

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
        if self._routed is not None:
            plugin, own = self._routed
            if own is None:
                vars(plugin).pop("backward", None)
            else:
                plugin.backward = own
            self._routed = None
