"""The non-finite guard of :class:`~lowmem_lightning.optim.base.LowMemOptimizer` (a mixin of it) and the
gradient norms it reads.

* ``_finite_flags(grads)`` returns, for each gradient, a 0-d 0/1 fp32 flag on the device (1 = the fp32 sum of
  squares of the gradient is finite: no inf/NaN element and no overflow of ``g * g`` or of its sums), with no
  host sync: one fused ``_foreach_norm(2)`` launch on CUDA. On the CPU (plain tensors) the norms (one
  ``vector_norm`` per gradient) are read on the host (a memory read, no sync at stake) and the flags are the
  shared constants of :func:`~lowmem_lightning.kernels.dispatch.host_flag`, whose values the optimizer and
  dispatch know without reading them: no tensor op per step beyond the norms. Kernels receive the flag and
  leave params and state untouched where it is 0; the number of skipped tensor updates accumulates on the
  device (on the CPU: added only when a step skips one) and is read (one sync) only through
  ``skipped_updates``; the number of tensor updates checked (applied or skipped) is a host count,
  ``attempted_updates``. For DTensor (sharded) gradients the flags agree across the ranks that shard them
  (:mod:`.sharding`).
* **Reused norm:** after ``clip_grad_norm_`` (or ``use_grad_norm`` with the norm
  ``torch.nn.utils.clip_grad_norm_`` returned) the next ``step()`` reads no gradient for the check: it applies
  every update when that total norm is finite and skips the *whole step* when it is not.

The mixin keeps its data on the optimizer: ``_skipped`` (device -> skipped-update counter), ``_attempted`` (a dict:
under ``"updates"`` the host count of updates checked), ``_pending_norm`` (a dict: under ``"norm"`` the norm and
gradients' fingerprint the next step reuses) and ``_step_norm`` (that norm while the step runs); the optimizer creates
them and its ``step()`` moves the pending norm into ``_step_norm``. The methods a user calls (``use_grad_norm``,
``clip_grad_norm_``, ``zero_grad``; ``step_params`` counts in ``_attempted``) change these dicts in place and never
rebind an attribute: Lightning Fabric's ``_FabricOptimizer`` and Lightning's ``LightningOptimizer`` are instances
of a class made on the fly that subclasses ours and forwards attribute *reads* to the wrapped optimizer, so a method
called on the wrapper runs with the wrapper as ``self``, and an attribute it assigned would land on the wrapper,
never seen by the wrapped optimizer's ``step()`` (the norm of ``fabric_opt.use_grad_norm(norm)`` was lost).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import torch

from ..kernels.dispatch import host_flag
from .sharding import agree_on_flags, is_dtensor, local

__all__ = ["FiniteGuard"]


class FiniteGuard:
    """Finite flags per gradient, the skipped-update count, and the reuse of a clipping norm for the check.

    Mixed into a ``torch.optim.Optimizer`` (it reads ``param_groups``); see the module docstring.
    """

    @property
    def skipped_updates(self) -> int:
        """Number of (tensor, step) updates skipped because the gradient held inf or NaN, or elements
        whose squares overflow fp32 (see :meth:`_finite_flags`).

        Reading it synchronises with the device (one read of :meth:`skipped_updates_tensor`); the step itself never
        does.
        """
        total = self.skipped_updates_tensor()
        return 0 if total is None else int(total.item())

    @property
    def attempted_updates(self) -> int:
        """Number of (tensor, step) updates the steps so far set out to make: every gradient checked by
        :meth:`_finite_flags`, applied or skipped (:attr:`skipped_updates` of them). A host count: reading it never
        synchronises. A step whose skipped updates equal its attempted ones changed nothing."""
        return self._attempted["updates"]

    def skipped_updates_tensor(self) -> torch.Tensor | None:
        """:attr:`skipped_updates` as a 0-d fp32 tensor on the counter's device, copied without a host sync (later
        steps do not change it); ``None`` while no counter exists (on the CPU: no update skipped yet). For a caller
        that reads many steps' counts at once, later (the state-memory monitor)."""
        counters = list(self._skipped.values())
        if not counters:
            return None
        total = counters[0].clone()
        for counter in counters[1:]:
            total += counter.to(total.device, non_blocking=True)
        return total

    def use_grad_norm(self, total_norm: torch.Tensor | float) -> None:
        """Let the next :meth:`step` reuse ``total_norm`` for its finite check instead of reading every gradient.

        ``total_norm``: the L2 norm over *every* gradient that step applies, computed before any clipping
        scaled them (what ``torch.nn.utils.clip_grad_norm_`` returns; :meth:`clip_grad_norm_` passes its own).
        Semantics of that step (a whole-step skip, unlike the per-tensor check): a finite norm applies every
        update (each gradient's sum of squares is below the total's, so none overflows); an inf/NaN norm
        skips the whole step: no param, state or step counter changes and every (tensor, step) of it counts in
        :attr:`skipped_updates`. A norm of a wider dtype than fp32 is as good; an fp16 norm overflows at 65504
        (a spurious skip, never a missed one). Consumed by the next ``step()`` only (``step_params`` ignores
        it), and only if no gradient was replaced or changed in place since this call (identity and version
        counter of each ``.grad``): otherwise that step checks every gradient itself, so a norm left over by a
        step that never ran (e.g. skipped by AMP's ``GradScaler``) cannot vouch for new gradients. A DTensor
        norm is made whole first (one collective). No device sync.
        """
        if not isinstance(total_norm, torch.Tensor):
            total_norm = torch.tensor(float(total_norm), dtype=torch.float32)
        if total_norm.numel() != 1:
            raise ValueError(f"Invalid total_norm: expected one value (a 0-d tensor or a float), got a tensor of "
                             f"shape {tuple(total_norm.shape)}.")
        if is_dtensor(total_norm):
            total_norm = total_norm.full_tensor()
        self._pending_norm["norm"] = (total_norm.detach().reshape(()), self._grad_fingerprint())  # in place: wrappers

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``torch.optim.Optimizer.zero_grad``, which also drops a norm :meth:`use_grad_norm` left for a step that
        never ran (e.g. skipped by AMP's ``GradScaler``): the gradients it vouched for are gone."""
        self._pending_norm.clear()  # in place (see the module docstring: wrappers)
        super().zero_grad(set_to_none)

    def _grad_fingerprint(self) -> tuple:
        """Identity and in-place version of every gradient, in param-group order (no device access)."""
        return tuple((id(p.grad), p.grad._version) for group in self.param_groups for p in group["params"]
                     if p.grad is not None)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, eps: float = 1e-6) -> torch.Tensor:
        """Clip every gradient of this optimizer to a total L2 norm of ``max_norm`` (as
        ``torch.nn.utils.clip_grad_norm_``: scale by ``min(1, max_norm / (norm + eps))``) and hand the norm to the
        next :meth:`step` (:meth:`use_grad_norm`), which then reads each gradient once, in its kernel.

        The norm is accumulated in fp32 (one ``_foreach_norm`` pass per device, no host sync); when it is not
        finite the gradients are left as they are (the next step skips as a whole). Returns the total norm
        (0-d fp32 on the first gradient's device). ``ValueError`` for a ``max_norm`` that is not a number > 0.
        """
        if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm > 0:
            raise ValueError(f"Invalid max_norm={max_norm!r}: expected a number > 0.")
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            total = torch.zeros((), dtype=torch.float32)
        elif any(is_dtensor(g) for g in grads):
            params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            total = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)  # its collectives
        else:
            total = _total_norm(grads)
            coef = torch.clamp(max_norm / (total + eps), max=1.0)
            coef = torch.where(torch.isfinite(total), coef, torch.ones_like(coef))
            for device_grads in _by_device(grads).values():
                torch._foreach_mul_(device_grads, coef.to(device_grads[0].device))
        self.use_grad_norm(total)
        return total

    def _finite_flags(self, grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """One 0-d fp32 flag per gradient, on the grads' device: 1.0 where the gradient is safe to apply.

        Safe means the fp32 sum of squares of the gradient is finite (the flag is the isfinite of its
        L2 norm, accumulated in fp32 without rescaling). That is 0 for any inf/NaN element and also for
        any finite gradient whose ``g * g`` overflows fp32 (|g| > ~1.8e19) or whose squares summed
        over the tensor overflow: every second-moment, row/column mean and RMS that an optimizer
        forms from ``g * g`` is bounded by that sum, so no finite gradient that passes can produce
        an infinite state.

        CPU gradients (plain tensors) are checked on the host: flags are the shared read-only
        :func:`~lowmem_lightning.kernels.dispatch.host_flag` constants. Elsewhere the flags are views of one
        device tensor (no host sync). DTensor gradients are checked on the local shard and the flags combined
        across ranks (one collective), so all ranks skip or apply an update together. Inside a :meth:`step`
        that reuses a total norm (:meth:`use_grad_norm`) no gradient is read: every flag is the isfinite of
        that norm.
        """
        if not grads:
            return []
        self._attempted["updates"] += len(grads)  # in place: wrappers (see the module docstring)
        distributed = [g for g in grads if is_dtensor(g)]
        norm = self._step_norm
        if not distributed and grads[0].device.type == "cpu" and (norm is None or norm.device.type == "cpu"):
            return self._host_flags(grads, norm)
        grads = [local(g) for g in grads]
        if norm is not None:
            ok = norm.to(grads[0].device, non_blocking=True).isfinite().to(torch.float32)
            flags = ok.expand(len(grads))
        else:
            norms = _square_sum_norms(grads, fused=grads[0].device.type != "cpu")
            flags = norms.lt(math.inf).to(torch.float32)  # == isfinite for a norm (>= 0 or NaN), one op not five
            if distributed:
                agree_on_flags(flags, distributed)
        counter = self._skip_counter(flags.device)
        counter.add_(flags.numel() - flags.sum())
        return list(flags.unbind(0))

    def _host_flags(self, grads: Sequence[torch.Tensor], norm: torch.Tensor | None) -> list[torch.Tensor]:
        """:meth:`_finite_flags` of CPU ``grads``, decided on the host: the reused total ``norm`` (one read), or
        each gradient's fp32 norm (one ``vector_norm`` pass per gradient, each read: a ``_foreach_norm`` is one op
        but the same passes on the CPU, and not faster below ~20 small tensors).
        Skips are counted only when there are any (one op then, none otherwise)."""
        if norm is not None:
            apply = [math.isfinite(norm.item())] * len(grads)
        else:
            # bf16: the norm in the gradient's dtype (accumulated in fp32 all the same, and a finite fp32 norm is below
            # sqrt(fp32 max) ~1.8e19, far inside bf16's range, so the same flag); dtype=float32 first copies the whole
            # gradient to fp32 on the CPU (measured ~14x slower at 4M elements, issue 24.6)
            apply = [torch.linalg.vector_norm(g, 2, dtype=None if g.dtype == torch.bfloat16 else torch.float32).item()
                     < math.inf for g in grads]
        skipped = len(apply) - sum(apply)
        if skipped:
            self._skip_counter(grads[0].device).add_(float(skipped))
        return [host_flag(good) for good in apply]

    def _skip_counter(self, device: torch.device) -> torch.Tensor:
        """The 0-d fp32 skipped-update counter of ``device`` (created at zero on first use)."""
        counter = self._skipped.get(device)
        if counter is None:
            counter = self._skipped[device] = torch.zeros((), dtype=torch.float32, device=device)
        return counter


def _by_device(tensors: Sequence[torch.Tensor]) -> dict[torch.device, list[torch.Tensor]]:
    out: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
    for t in tensors:
        out[t.device].append(t)
    return out


def _total_norm(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """The fp32 L2 norm over every gradient (one ``_foreach_norm`` per device, summed on the first device)."""
    parts = [_square_sum_norms(g, fused=g[0].device.type != "cpu") for g in _by_device(grads).values()]
    device = grads[0].device
    return torch.linalg.vector_norm(torch.cat([p.to(device) for p in parts]), 2)


def _square_sum_norms(grads: Sequence[torch.Tensor], fused: bool) -> torch.Tensor:
    """fp32 ``(len(grads),)``: each gradient's L2 norm accumulated in fp32 without rescaling, so it is inf
    exactly when an element is inf/NaN or the sum of squares overflows fp32. ``fused``: one
    ``_foreach_norm`` launch (CUDA); otherwise one ``vector_norm`` pass per tensor (faster on CPU)."""
    if fused:
        return torch.stack(torch._foreach_norm(list(grads), 2, dtype=torch.float32))
    return torch.stack([torch.linalg.vector_norm(g, 2, dtype=torch.float32) for g in grads])
