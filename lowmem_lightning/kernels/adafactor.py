"""Adafactor step: factored second moment, RMS update clipping, relative step, optional (8-bit) momentum.

Math (Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", ICML 2018,
with the semantics of ``transformers.optimization.Adafactor``), all in fp32, step ``t`` already
advanced. A tensor of >= 2 dims is viewed as ``(B, R, C)`` (leading dims are a batch, the last two
are factored); ``g`` is its gradient, ``p`` the param::

    beta2 = 1 - t ** decay_rate
    q     = g * g + eps1
    vr    = beta2 * vr + (1 - beta2) * mean_C(q)              (B, R)   row statistics
    vc    = beta2 * vc + (1 - beta2) * mean_R(q)              (B, C)   column statistics
    u     = (1 / sqrt(vr / mean_R(vr)))[:, None] * (1 / sqrt(vc))[None, :] * g
    (1-D: v = beta2 * v + (1 - beta2) * q, u = g / sqrt(v), v full size)
    d     = max(1, rms(u) / clip_threshold)                   update clipping
    rel   = min(1e-6 * t if warmup_init else 1e-2, 1 / sqrt(t))   if relative_step, else lr
    lr_t  = rel * max(eps2, rms(p))   if scale_parameter, else rel    (rms(p) before the update)
    u     = u * (lr_t / d)                                    (lr_t / d: one scalar quotient)
    m     = beta1 * m + (1 - beta1) * u;  u = m                 when beta1 is set
    p     = p + p * (-weight_decay * lr_t) - u

Momentum ``m`` is fp32 or the signed block-wise 8-bit code of :mod:`.codec` (int8 codes + one fp32
absmax per 256 elements; the update uses the fp32 ``m`` before re-quantization). bf16/fp16 params
are written with stochastic rounding (:mod:`.rounding`), seeded on the device from the step counter
and the tensor index. A 0/1 ``flag`` (non-finite guard) leaves params and every state untouched.

Passes over the gradient (the math has two global reductions in sequence, the statistics and the
RMS of ``u``, so it needs three): factored tensors take exactly three and five launches, the first
four being the shared statistics kernels of :mod:`.factored`. Each launch covers every tensor of a
group (:func:`.factored_plan.group_key`; a launch table and a tile map per pass), so a step of a model's
matrices is five launches, not five per tensor:

1. ``sq_stats_kernel`` (tiles of BLOCK_R = 64 rows looping over all columns): row sums of ``q`` and the
   row EMA in-register, column partial sums per row tile, sum of ``p^2`` (for ``scale_parameter``).
2. ``sq_finalize_kernel``: column EMA from the partials (added 32 partial rows at a time), the
   row/column factors ``rf``, ``cf`` (O(R + C)).
3. ``clip_stats_kernel``: partial sums of ``u^2``.
4. ``scalars_kernel`` (one program per tensor; CAME uses it for ``d``): ``lr_t`` and ``d`` from the
   partial sums. Its step-size rule and :func:`step_size_reference` are the rule's only copies.
5. ``adafactor_update_kernel`` (this file; 8 codec blocks of 256 elements per program): the update.

1-D tensors take three launches (``full_stats_kernel`` updates ``v`` and sums ``u^2``, the scalars,
then the update). All reductions are deterministic (partial sums, no atomics).

File order: Triton kernels, PyTorch reference (the step function), launcher.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .aot import dtype_variants
from .codec import BLOCK_SIZE, block_rows
from .dispatch import Family, HostStep, pack, per_layout, unpack
from .factored import (
    clip_divisor_reference,
    group_spec,
    inv_sqrt_reference,
    launch_direction,
    second_moment_reference,
    total_square_sum_reference,
)
from .factored_plan import (
    F_P,
    F_STEP,
    F_TIDX,
    UPDATE_ROWS,
    UPDATE_WARPS,
    group_key,
    plan_group,
    run_host_step,
    shard_key,
    state_views,
    tfield,
    write_back,
)
from .factored_update import launch_update, momentum_tile, momentum_update_reference, tile_direction
from .multitensor import copy_back, table_pointer
from .rounding import index_seed, index_seed_reference, masked_reference, round_param_reference, store_param

__all__ = ["AdafactorScalars", "AdafactorModes", "AdafactorHyper", "AdafactorTensors", "ADAFACTOR",
           "adafactor_reference", "step_size_reference"]


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------


@triton.jit
def adafactor_update_kernel(
    table_ptr,
    owner_ptr,
    T,
    rf_ptr,
    cf_ptr,
    scal_ptr,
    beta1,
    one_minus_beta1,
    weight_decay,
    FACTORED: tl.constexpr,
    MOMENTUM: tl.constexpr,
    PARAM_DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    ROW_BLOCKS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    STOCHASTIC: tl.constexpr = True,
):
    """The update (pass 5), one launch for the group: ``ROWS`` codec blocks of ``BLOCK`` (= 256) elements
    of one tensor per program. ``u`` from the statistics (factored: the factors ``rf``/``cf`` in the group's
    scratch; flat: ``v``), ``u = u * scal[4t + 3]`` (``scal = [lr_t, d, sign / d, sign * lr_t / d]`` per
    tensor from :func:`.factored.scalars_kernel`: no division per element; a maximized gradient's sign
    folded in, bit for bit ``-g``), momentum (``MOMENTUM``: 0 none, 1 fp32, 2 int8 codes, the absmax of
    each block a row reduction of the tile), weight decay, the param stored with stochastic rounding.
    ``ROW_BLOCKS`` (factored, ``C % 256 == 0``): one row factor per codec block and contiguous column
    factors (:func:`.factored_update.factored_index`).
    Exactness: the only per-element root/division left is the flat path's ``inv_sqrt`` (correctly
    rounded, branch-free, see :func:`.factored.inv_sqrt`), so the compiled kernel, the interpreter and
    the reference compute the same fp32 values."""
    t, blocks, offs, finite, mask, bmask, u = tile_direction(table_ptr, owner_ptr, T, rf_ptr, cf_ptr, GRAD_DTYPE,
                                                             FACTORED, ALIGNED, ROW_BLOCKS, ROWS, BLOCK)
    lr_t = tl.load(scal_ptr + 4 * t)
    u = u * tl.load(scal_ptr + 4 * t + 3)
    if MOMENTUM != 0:
        u = momentum_tile(table_ptr, T, t, blocks, offs, mask, bmask, finite, u, beta1, one_minus_beta1,
                          MOMENTUM == 2, ALIGNED)
    p_ptr = table_pointer(table_ptr, T, t, F_P, PARAM_DTYPE, ALIGNED)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = p + p * (-(weight_decay * lr_t)) - u
    step = tl.load(table_pointer(table_ptr, T, t, F_STEP, tl.float32, False))
    store_param(p_ptr, p, offs, mask, index_seed(step, tfield(table_ptr, T, t, F_TIDX)), STOCHASTIC)


AOT_SPECS = [
    group_spec(adafactor_update_kernel, param, grad, aligned, {"num_warps": UPDATE_WARPS}, FACTORED=factored,
               MOMENTUM=momentum, ROW_BLOCKS=row_blocks, ROWS=UPDATE_ROWS, BLOCK=BLOCK_SIZE)
    for aligned in (False, True)
    for param, grad, (factored, row_blocks, momentum) in dtype_variants(
        [(False, False, m) for m in (0, 1, 2)] + [(True, rb, m) for rb in (False, True) for m in (0, 1, 2)])
]
"""(kernel, signature, constexprs, aligned, options) for every variant of the update kernel in fp32, plus
the richest for the other (param, grad) dtype pairs, general and ``ALIGNED`` (the statistics kernels,
shared with CAME, are listed in :mod:`.factored`)."""


# --------------------------------------------------------------------------------------------------
# PyTorch reference (the specification, the CPU path and the test oracle)
# --------------------------------------------------------------------------------------------------


class AdafactorScalars(NamedTuple):
    """The numeric hyperparameters of one Adafactor tensor update, packed (:func:`.dispatch.pack`) for the
    host step in this order; ``sqrt_n`` and ``tensor_index`` are per tensor (filled by the launcher)."""

    lr: float
    """0.0 under ``relative_step``."""
    eps1: float
    eps2: float
    clip_threshold: float
    decay_rate: float
    beta1: float
    """0.0 without momentum."""
    one_minus_beta1: float
    weight_decay: float
    grad_sign: float
    """-1.0 when maximizing, else 1.0."""
    sqrt_n: float = 0.0
    """Square root of the (global) element count."""
    tensor_index: float = 0.0


class AdafactorModes(NamedTuple):
    """The mode switches of Adafactor's step size and of the param store (Python bools: each combination is
    its own graph): ``stochastic`` False rounds bf16/fp16 params to nearest-even (``bf16_rounding="nearest"``)."""

    relative_step: bool
    warmup_init: bool
    scale_parameter: bool
    stochastic: bool = True


class AdafactorHyper(NamedTuple):
    """Everything but the tensors of one Adafactor step: the :class:`AdafactorScalars` and the modes."""

    scalars: AdafactorScalars
    modes: AdafactorModes

    @classmethod
    def of(cls, lr: float | None, eps: tuple[float, float], clip_threshold: float, decay_rate: float,
           beta1: float | None, weight_decay: float, relative_step: bool, warmup_init: bool,
           scale_parameter: bool, maximize: bool = False, stochastic: bool = True) -> AdafactorHyper:
        """The hyperparameters of a param group's values (``lr`` None and ``beta1`` None become 0.0;
        ``stochastic``: the param rounding mode)."""
        b1 = 0.0 if beta1 is None else float(beta1)
        scalars = AdafactorScalars(0.0 if lr is None else float(lr), float(eps[0]), float(eps[1]),
                                   float(clip_threshold), float(decay_rate), b1, 1.0 - b1, float(weight_decay),
                                   -1.0 if maximize else 1.0)
        return cls(scalars, AdafactorModes(bool(relative_step), bool(warmup_init), bool(scale_parameter),
                                           bool(stochastic)))


class AdafactorTensors(NamedTuple):
    """The tensors of one Adafactor step, one entry per param (a :func:`.dispatch.dispatch` batch).

    ``vs[i]``: the row statistic (``param.shape[:-1]``) when ``vcs[i]`` (``param.shape[:-2] +
    param.shape[-1:]``) is given (factored, >= 2 dims), else the full second moment. ``ms[i]``: None (no
    momentum), fp32 (param's shape) or flat int8 codes with ``absmaxes[i]`` (fp32, one per 256
    elements). ``steps[i]`` (already advanced) and ``flags[i]``: 0-d fp32 on the param's device.
    ``elrs[i]``: a 0-d fp32 tensor that receives the step size ``lr_t``, or None. ``reduces[i]``: the
    ``SumReduce`` of a sharded (DTensor) param whose local shard is given, else None.
    """

    params: Sequence[torch.Tensor]
    grads: Sequence[torch.Tensor]
    vs: Sequence[torch.Tensor]
    vcs: Sequence[torch.Tensor | None]
    ms: Sequence[torch.Tensor | None]
    absmaxes: Sequence[torch.Tensor | None]
    steps: Sequence[torch.Tensor]
    flags: Sequence[torch.Tensor]
    elrs: Sequence[torch.Tensor | None]
    tensor_indices: Sequence[int]
    reduces: Sequence[object | None]


def adafactor_reference(
    param: torch.Tensor,
    grad: torch.Tensor,
    v: torch.Tensor,
    vc: torch.Tensor | None,
    m: torch.Tensor | None,
    absmax: torch.Tensor | None,
    step: torch.Tensor,
    flag: torch.Tensor,
    hp: torch.Tensor,
    modes: AdafactorModes,
    reduce=None,
) -> tuple[torch.Tensor, ...]:
    """One Adafactor step; returns ``(new_param, v, vc, m, absmax, lr_t)`` (inputs untouched).

    ``param``/``grad``: ``(B, R, C)`` when factored (``vc`` given; ``v`` is the row statistic
    ``(B, R)``, ``vc`` the column statistic ``(B, C)``), else flat ``(n,)`` with ``v`` full ``(n,)``.
    ``m``: None, fp32 (param's shape) or flat int8 codes with ``absmax``. ``step`` (already advanced)
    and ``flag`` 0-d fp32. ``hp``: :class:`AdafactorScalars` packed (:func:`.dispatch.pack`). ``lr_t``
    is the 0-d step size applied. Where ``flag == 0`` every output equals its input. ``reduce``: None,
    or the ``SumReduce`` of a sharded tensor whose local shard is given (every sum is completed across
    ranks; ``sqrt_n`` is then the global one).
    """
    v, vc, u, lr_t = adafactor_direction_reference(param, grad, v, vc, step, flag, hp, modes, reduce)
    new_p, m, absmax = adafactor_apply_reference(param, u, m, absmax, lr_t, step, flag, hp, modes.stochastic)
    return new_p, v, vc, m, absmax, lr_t


def step_size_reference(lr, step: torch.Tensor, modes: AdafactorModes) -> torch.Tensor:
    """Adafactor's step size before the RMS scale (transformers' ``_get_lr``): ``lr``, or under
    ``relative_step`` ``min(1e-6 * t if warmup_init else 1e-2, 1 / sqrt(t))``; ``step`` a 0-d fp32 tensor.
    The same rule as ``scalars_kernel``; the optimizer's reported step size reads it too."""
    if not modes.relative_step:
        return lr
    min_step = 1e-6 * step if modes.warmup_init else torch.full_like(step, 1e-2)
    return torch.minimum(min_step, inv_sqrt_reference(step))


def adafactor_direction_reference(
    param: torch.Tensor,
    grad: torch.Tensor,
    v: torch.Tensor,
    vc: torch.Tensor | None,
    step: torch.Tensor,
    flag: torch.Tensor,
    hp: torch.Tensor,
    modes: AdafactorModes,
    reduce=None,
) -> tuple[torch.Tensor, ...]:
    """First half of :func:`adafactor_reference`: returns ``(v, vc, u, lr_t)``, the new statistics, the
    clipped and scaled update ``u = u * ((lr_t / d) * grad_sign)`` (fp32, the param's layout; one rounded
    quotient of two scalars, which the kernels multiply by; a maximized gradient's sign folded into it,
    the same bits as negating ``g``) and the step size."""
    s = unpack(AdafactorScalars, hp)
    ok = flag != 0
    g = grad.to(torch.float32)
    omb2 = torch.exp2(s.decay_rate * torch.log2(step))
    beta2 = 1.0 - omb2
    v, vc, u = second_moment_reference(g, v, vc, s.eps1, beta2, omb2, ok, reduce)
    d = clip_divisor_reference(u, s.sqrt_n, s.clip_threshold, reduce)
    lr_t = step_size_reference(s.lr, step, modes)
    if modes.scale_parameter:
        p = param.to(torch.float32)
        lr_t = torch.maximum(s.eps2, torch.sqrt(total_square_sum_reference(p, reduce)) / s.sqrt_n) * lr_t
    return v, vc, u * ((lr_t / d) * s.grad_sign), lr_t


def adafactor_apply_reference(
    param: torch.Tensor,
    u: torch.Tensor,
    m: torch.Tensor | None,
    absmax: torch.Tensor | None,
    lr_t: torch.Tensor,
    step: torch.Tensor,
    flag: torch.Tensor | None,
    hp: torch.Tensor,
    stochastic: bool = True,
) -> tuple[torch.Tensor, ...]:
    """Second half of :func:`adafactor_reference`: momentum (if ``m``), weight decay and the rounded
    param (stochastically, or to nearest-even when ``stochastic`` is False); returns ``(new_param, m,
    absmax)``. ``flag=None``: the caller checked it is 1 (no masks)."""
    s = unpack(AdafactorScalars, hp)
    ok = None if flag is None else flag != 0
    p = param.to(torch.float32)
    if m is not None:
        u, m, absmax = momentum_update_reference(m, absmax, u, s.beta1, s.one_minus_beta1, ok)
    new_p = p + p * (-(s.weight_decay * lr_t)) - u
    seed = index_seed_reference(step, s.tensor_index)
    new_p = masked_reference(ok, round_param_reference(new_p, param.dtype, seed, stochastic=stochastic), param)
    return new_p, m, absmax


# --------------------------------------------------------------------------------------------------
# Launcher: the family's Triton launches and host step, registered with dispatch
# --------------------------------------------------------------------------------------------------


def _adafactor_inplace(param, grad, v, vc, m, absmax, step, flag, hp, elr, modes, reduce=None) -> None:
    outs = adafactor_reference(param, grad, v, vc, m, absmax, step, flag, hp, modes, reduce)
    write_back((param, v, vc, m, absmax, elr), outs)


def _adafactor_direction_inplace(param, grad, v, vc, step, flag, hp, elr, modes) -> tuple[torch.Tensor, torch.Tensor]:
    new_v, new_vc, u, lr_t = adafactor_direction_reference(param, grad, v, vc, step, flag, hp, modes)
    write_back((v, vc, elr), (new_v, new_vc, lr_t))
    return u, lr_t


def _adafactor_apply_inplace(param, u, m, absmax, lr_t, step, flag, hp, stochastic=True) -> None:
    write_back((param, m, absmax), adafactor_apply_reference(param, u, m, absmax, lr_t, step, flag, hp, stochastic))


# the host step: the reference above, compiled once per layout (factored (B, R, C) / flat) and
# (param dtype, grad dtype, momentum form, modes), never per shape
_ADAFACTOR_CPU = per_layout(_adafactor_inplace)
# 8-bit momentum: two graphs, the statistics/direction (u materialized in fp32, transient) and the
# momentum codec + param update: inductor's fusion of the block codec with the row/column reductions
# in one graph was several times slower (benchmarks/RESULTS.md)
_DIRECTION_CPU = per_layout(_adafactor_direction_inplace)
_MOMENTUM_APPLY_CPU = HostStep(_adafactor_apply_inplace)


def _host(t: AdafactorTensors, hyper: AdafactorHyper, backend: str, steps: None) -> None:
    """The reference step of one tensor (``t`` holds one), eager or compiled as ``backend`` says
    (:func:`.factored_plan.run_host_step`); a sharded one (``reduces[0]`` set) runs eagerly, its sums
    completed across ranks."""
    param, grad, v, vc, m, absmax, step, flag, elr, tensor_index, reduce = (field[0] for field in t)
    work, g, v, vc, m = state_views(param, grad, v, vc, m)
    numel = param.numel() if reduce is None else reduce.numel
    hp = pack(hyper.scalars._replace(sqrt_n=math.sqrt(numel), tensor_index=float(tensor_index)), param.device)

    def rest(backend: str, out: tuple) -> None:
        u, lr_t = out
        _MOMENTUM_APPLY_CPU.on(backend)(*(block_rows(x, pad=False) for x in (work, u, m)), absmax, lr_t, step, None,
                                        hp, hyper.modes.stochastic)

    run_host_step(_ADAFACTOR_CPU, _DIRECTION_CPU, rest, backend=backend, factored=vc is not None,
                  quantized=absmax is not None, flag=flag, reduce=reduce,
                  whole_args=(work, g, v, vc, m, absmax, step, flag, hp, elr, hyper.modes),
                  direction_args=(work, g, v, vc, step, flag, hp, elr, hyper.modes))
    copy_back(param, work)


def _launch(t: AdafactorTensors, hyper: AdafactorHyper) -> None:
    """The Triton passes of one group (:func:`.factored_plan.group_key`; five launches factored, three 1-D, for
    all its tensors together)."""
    s, modes = hyper
    plan = plan_group(t.params, t.grads, t.vs, t.vcs, t.ms, t.absmaxes, t.steps, t.flags, t.tensor_indices,
                      [e is not None for e in t.elrs], reduces=t.reduces)
    scal = launch_direction(plan, eps1=s.eps1, decay=s.decay_rate, one_minus_decay=0.0, beta_from_step=True,
                            clip=s.clip_threshold, lr=s.lr, eps2=s.eps2, rule=modes[:3], grad_sign=s.grad_sign,
                            elr=next((e for e in t.elrs if e is not None), None))
    momentum = 0 if t.ms[0] is None else (2 if t.absmaxes[0] is not None else 1)
    launch_update(adafactor_update_kernel, plan, scal, dict(beta1=s.beta1, one_minus_beta1=s.one_minus_beta1,
                  weight_decay=s.weight_decay, MOMENTUM=momentum, STOCHASTIC=modes.stochastic))


def _launch_key(t: AdafactorTensors, i: int) -> tuple:
    return group_key(t.params[i], t.grads[i], t.vcs[i], t.ms[i], t.absmaxes[i])


def _shard_key(t: AdafactorTensors, i: int) -> tuple | None:
    return shard_key(t.reduces[i], _launch_key(t, i))


ADAFACTOR = Family("adafactor", launch=_launch, host=_host, launch_key=_launch_key, shard_key=_shard_key)
"""The Adafactor family: ``dispatch(ADAFACTOR, AdafactorTensors(...), AdafactorHyper.of(...))`` applies
one step in place to every param and its state (statistics per tensor; on Triton each pass is one launch
per :func:`.factored_plan.group_key` group, on the host one tensor at a time). Never synchronizes with a
CUDA device."""
