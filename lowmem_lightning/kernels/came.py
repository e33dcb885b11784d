"""CAME step: factored second moment, factored confidence (instability) statistics, (8-bit) momentum.

Math (Luo et al., "CAME: Confidence-guided Adaptive Memory Efficient Optimization", ACL 2023, with
the semantics of the authors' ``came-pytorch``), all in fp32. A tensor of >= 2 dims is viewed as
``(B, R, C)`` (leading dims are a batch, the last two are factored)::

    q   = g * g + eps1
    vr  = b2 * vr + (1 - b2) * mean_C(q);   vc = b2 * vc + (1 - b2) * mean_R(q)
    u   = (1 / sqrt(vr / mean_R(vr)))[:, None] * (1 / sqrt(vc))[None, :] * g
    u   = u * (1 / max(1, rms(u) / clip_threshold))          (one scalar reciprocal)
    m   = b1 * m + (1 - b1) * u
    s   = (u - m) ** 2 + eps2                                  instability, never stored full size
    sr  = b3 * sr + (1 - b3) * mean_C(s);   sc = b3 * sc + (1 - b3) * mean_R(s)
    p   = p + p * (-weight_decay * lr) - ((1 / sqrt(sr / mean_R(sr)))[:, None] * (1 / sqrt(sc))[None, :] * m) * lr

1-D tensors (as the official code): ``v = b2 * v + (1 - b2) * q`` full size, ``u = g / sqrt(v)``,
clipping and momentum as above, and ``p -= lr * m`` (no confidence statistics).

State: ``vr, vc, sr, sc`` (O(R + C) fp32), momentum ``m`` in fp32 or in the signed block-wise 8-bit
code of :mod:`.codec` (int8 + one fp32 absmax per 256 elements; the update uses the fp32 ``m``
before re-quantization). bf16/fp16 params are written with stochastic rounding (:mod:`.rounding`).
A 0/1 ``flag`` (non-finite guard) leaves params and every state untouched.

Passes over the gradient: the math has three global reductions in sequence (second-moment
statistics, RMS of ``u``, instability statistics) before the update; factored tensors take seven
launches: the two second-moment passes and the scalar kernel of :mod:`.factored`, then
``_res_stats_kernel`` (recomputes ``u`` and the new ``m`` in registers from ``g`` and the old ``m``,
sums ``s`` by rows and columns: no full-size scratch; an fp32 ``m`` is stored here), its column
finalize (the confidence factors), and ``_came_update_kernel`` (reads the stored fp32 ``m``, or, for
8-bit momentum, recomputes the same ``m`` bit for bit and stores its codes; then the param). Three
reads of ``g`` with fp32 momentum (the minimum), four with 8-bit. 1-D tensors take three launches.
Each launch covers every tensor of a group (:func:`.factored_plan.group_key`), so a step of a model's
matrices is seven launches, not seven per tensor. No
division or root per element (``scalars_kernel`` supplies ``1 / d``; see :mod:`.factored`).

File order: Triton kernels, PyTorch reference, launcher.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .aot import dtype_variants
from .codec import BLOCK_SIZE, block_rows, decode_signed
from .dispatch import Family, HostStep, pack, per_layout, unpack
from .factored import (
    clip_divisor_reference,
    col_tile,
    colpart_row,
    ema,
    factored_scale_reference,
    factored_stats_reference,
    group_spec,
    inv_sqrt,
    launch_direction,
    launch_finalize,
    row_tile,
    second_moment_reference,
    step_and_flag,
    store_row_ema,
)
from .factored_plan import (
    F_ABSMAX,
    F_COFF,
    F_G,
    F_M,
    F_P,
    F_ROFF,
    F_SC,
    F_SR,
    F_STEP,
    F_TIDX,
    F_V,
    STATS_WARPS,
    TILES,
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
from .factored_update import (
    factored_scale,
    launch_update,
    momentum_tile,
    momentum_update_reference,
    tile_factors,
    update_tile,
)
from .multitensor import copy_back, table_pointer
from .rounding import index_seed, index_seed_reference, nearest_variant, round_param_reference, store_param

__all__ = ["CAMEScalars", "CAMETensors", "CAME", "CAME_NEAREST", "came_reference"]


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _res_stats_kernel(
    table_ptr,
    owner_ptr,
    T,
    rf_ptr,
    cf_ptr,
    scal_ptr,
    colpart_ptr,
    rsum_part_ptr,
    beta1,
    one_minus_beta1,
    beta3,
    one_minus_beta3,
    eps2,
    QUANTIZED: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Instability statistics, one launch for the group: program = ``BLOCK_R`` rows of batch ``b`` of one
    tensor over all columns; ``u = ((rf * cf) * g) * (1 / d)`` and the new momentum ``m``, row sums of
    ``s = (u - m)^2 + eps2`` (+ row EMA ``sr``) and column partials. Multiplies only (``rf``, ``cf``, ``1 /
    d`` precomputed). An fp32 momentum is stored here (bit for bit what the update would recompute), so
    the update pass reads ``m`` alone instead of ``g`` and the old ``m``; an 8-bit one is recomputed
    there (its update uses the fp32 ``m`` before quantization, which only this pass and the update have
    in registers)."""
    t, rt, local, b, rmask, grow, R, C = row_tile(table_ptr, owner_ptr, T, BLOCK_R, ALIGNED)
    g_ptr = table_pointer(table_ptr, T, t, F_G, GRAD_DTYPE, ALIGNED)
    rf = tl.load(rf_ptr + tfield(table_ptr, T, t, F_ROFF) + grow, mask=rmask, other=0.0)
    cf_row = cf_ptr + tfield(table_ptr, T, t, F_COFF) + b.to(tl.int64) * C
    cp_ptr = colpart_row(colpart_ptr, table_ptr, T, t, local, C)
    inv_d = tl.load(scal_ptr + 4 * t + 2)  # sign / d: a maximized gradient's sign folded in (bit for bit -g)
    step, finite = step_and_flag(table_ptr, T, t)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols, cmask, m2, offs = col_tile(grow, rmask, c0, C, BLOCK_C)
        g = tl.load(g_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        cf = tl.load(cf_row + cols, mask=cmask, other=0.0)
        u = ((rf[:, None] * cf[None, :]) * g) * inv_d
        if QUANTIZED:
            m_ptr = table_pointer(table_ptr, T, t, F_M, tl.int8, ALIGNED)
            absmax_ptr = table_pointer(table_ptr, T, t, F_ABSMAX, tl.float32, False)
            old = decode_signed(tl.load(m_ptr + offs, mask=m2, other=0),
                                tl.load(absmax_ptr + offs // 256, mask=m2, other=0.0))
        else:
            m_ptr = table_pointer(table_ptr, T, t, F_M, tl.float32, ALIGNED)
            old = tl.load(m_ptr + offs, mask=m2, other=0.0)
        m = ema(old, u, beta1, one_minus_beta1)
        if not QUANTIZED:  # the new fp32 momentum, stored here: the update pass reads it, not g and old m
            tl.store(m_ptr + offs, tl.where(finite, m, old), mask=m2)  # unchanged when not finite
        diff = u - m
        s = tl.where(m2, diff * diff + eps2, 0.0)
        acc += tl.sum(s, axis=1)
        tl.store(cp_ptr + cols, tl.sum(s, axis=0), mask=cmask)
    sr_ptr = table_pointer(table_ptr, T, t, F_SR, tl.float32, False)
    store_row_ema(sr_ptr, rsum_part_ptr + rt, grow, rmask, acc, C, beta3, one_minus_beta3, finite)


@triton.jit
def _came_update_kernel(
    table_ptr,
    owner_ptr,
    T,
    rf_ptr,
    cf_ptr,
    srf_ptr,
    scf_ptr,
    scal_ptr,
    beta1,
    one_minus_beta1,
    weight_decay,
    lr,
    FACTORED: tl.constexpr,
    QUANTIZED: tl.constexpr,
    PARAM_DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    ROW_BLOCKS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    STOCHASTIC: tl.constexpr = True,
):
    """The update, one launch for the group: ``ROWS`` codec blocks of ``BLOCK`` (= 256) elements of one
    tensor per program: ``u`` (factored: the second-moment factors ``rf``/``cf``; flat: ``v``) times ``1 /
    d``, the momentum (stored; an 8-bit block's absmax a row reduction of the tile), the confidence
    factors ``srf``/``scf`` of the instability statistics applied to ``m`` (``ROW_BLOCKS``: one row factor
    per codec block, contiguous column factors), weight decay, the param. No per-element division; the
    flat path's ``inv_sqrt`` is correctly rounded and branch-free."""
    t, blocks, offs, finite, mask, bmask = update_tile(table_ptr, owner_ptr, T, ALIGNED, ROWS, BLOCK)
    if FACTORED:  # the row/column indices of the elements, once for both factor pairs
        ridx, cidx, roff, coff = tile_factors(table_ptr, T, t, offs, blocks, ROW_BLOCKS, BLOCK)
    if FACTORED and not QUANTIZED:  # _res_stats_kernel stored the new fp32 momentum
        m = tl.load(table_pointer(table_ptr, T, t, F_M, tl.float32, ALIGNED) + offs, mask=mask, other=0.0)
    else:
        g = tl.load(table_pointer(table_ptr, T, t, F_G, GRAD_DTYPE, ALIGNED) + offs, mask=mask, other=0.0)
        g = g.to(tl.float32)
        if FACTORED:
            u = factored_scale(g, ridx, cidx, mask, bmask, rf_ptr + roff, cf_ptr + coff, ROW_BLOCKS)
        else:
            v_ptr = table_pointer(table_ptr, T, t, F_V, tl.float32, ALIGNED)
            u = inv_sqrt(tl.load(v_ptr + offs, mask=mask, other=1.0)) * g
        u = u * tl.load(scal_ptr + 4 * t + 2)
        m = momentum_tile(table_ptr, T, t, blocks, offs, mask, bmask, finite, u, beta1, one_minus_beta1, QUANTIZED,
                          ALIGNED)
    if FACTORED:
        upd = factored_scale(m, ridx, cidx, mask, bmask, srf_ptr + roff, scf_ptr + coff, ROW_BLOCKS)
    else:
        upd = m
    p_ptr = table_pointer(table_ptr, T, t, F_P, PARAM_DTYPE, ALIGNED)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = p + p * (-(weight_decay * lr)) - upd * lr
    step = tl.load(table_pointer(table_ptr, T, t, F_STEP, tl.float32, False))
    store_param(p_ptr, p, offs, mask, index_seed(step, tfield(table_ptr, T, t, F_TIDX)), STOCHASTIC)


AOT_SPECS = [
    spec
    for aligned in (False, True)
    for spec in (
        [group_spec(_res_stats_kernel, "fp32", grad, aligned, {"num_warps": STATS_WARPS}, QUANTIZED=quantized,
                    BLOCK_R=br, BLOCK_C=bc)
         for _, grad, (br, bc, quantized) in dtype_variants((br, bc, q) for q in (False, True) for br, bc in TILES)]
        + [group_spec(_came_update_kernel, param, grad, aligned, {"num_warps": UPDATE_WARPS}, FACTORED=factored,
                      QUANTIZED=quantized, ROW_BLOCKS=row_blocks, ROWS=UPDATE_ROWS, BLOCK=BLOCK_SIZE)
           for param, grad, (factored, row_blocks, quantized) in dtype_variants(
               [(False, False, q) for q in (False, True)] + [(True, rb, q) for rb in (False, True)
                                                             for q in (False, True)])]
    )
]
"""(kernel, signature, constexprs, aligned, options) for every CAME-specific kernel and constexpr variant
in fp32, plus the richest variant for the other dtype pairs, general and ``ALIGNED`` (the shared
second-moment kernels are listed in :mod:`.factored`)."""


# --------------------------------------------------------------------------------------------------
# PyTorch reference (the specification, the CPU path and the test oracle)
# --------------------------------------------------------------------------------------------------


class CAMEScalars(NamedTuple):
    """The hyperparameters of one CAME tensor update, packed (:func:`.dispatch.pack`) for the host step in
    this order; each ``1 - beta`` computed in double (see :func:`.factored.ema`); ``sqrt_n`` and
    ``tensor_index`` are per tensor (filled by the launcher)."""

    lr: float
    eps1: float
    eps2: float
    clip_threshold: float
    beta1: float
    beta2: float
    beta3: float
    one_minus_beta1: float
    one_minus_beta2: float
    one_minus_beta3: float
    weight_decay: float
    grad_sign: float
    """-1.0 when maximizing, else 1.0."""
    sqrt_n: float = 0.0
    """Square root of the (global) element count."""
    tensor_index: float = 0.0

    @classmethod
    def of(cls, lr: float, eps: tuple[float, float], clip_threshold: float, betas: tuple[float, float, float],
           weight_decay: float, maximize: bool = False) -> CAMEScalars:
        """The scalars of a param group's values."""
        b1, b2, b3 = (float(b) for b in betas)
        return cls(float(lr), float(eps[0]), float(eps[1]), float(clip_threshold), b1, b2, b3, 1.0 - b1, 1.0 - b2,
                   1.0 - b3, float(weight_decay), -1.0 if maximize else 1.0)


class CAMETensors(NamedTuple):
    """The tensors of one CAME step, one entry per param (a :func:`.dispatch.dispatch` batch).

    Factored (>= 2 dims; ``vcs[i]``, ``srs[i]``, ``scs[i]`` given): ``vs[i]``/``srs[i]`` have shape
    ``param.shape[:-1]``, ``vcs[i]``/``scs[i]`` ``param.shape[:-2] + param.shape[-1:]``; else ``vs[i]`` is
    the full second moment. ``ms[i]``: fp32 (param's shape) or flat int8 codes with ``absmaxes[i]``.
    ``steps[i]`` (advanced; seeds stochastic rounding) and ``flags[i]``: 0-d fp32 on the param's device.
    ``reduces[i]``: the ``SumReduce`` of a sharded (DTensor) param whose local shard is given, else None.
    """

    params: Sequence[torch.Tensor]
    grads: Sequence[torch.Tensor]
    vs: Sequence[torch.Tensor]
    vcs: Sequence[torch.Tensor | None]
    srs: Sequence[torch.Tensor | None]
    scs: Sequence[torch.Tensor | None]
    ms: Sequence[torch.Tensor]
    absmaxes: Sequence[torch.Tensor | None]
    steps: Sequence[torch.Tensor]
    flags: Sequence[torch.Tensor]
    tensor_indices: Sequence[int]
    reduces: Sequence[object | None]


def came_reference(
    param: torch.Tensor,
    grad: torch.Tensor,
    v: torch.Tensor,
    vc: torch.Tensor | None,
    sr: torch.Tensor | None,
    sc: torch.Tensor | None,
    m: torch.Tensor,
    absmax: torch.Tensor | None,
    step: torch.Tensor,
    flag: torch.Tensor,
    hp: torch.Tensor,
    reduce=None,
    stochastic: bool = True,
) -> tuple[torch.Tensor, ...]:
    """One CAME step; returns ``(new_param, v, vc, sr, sc, m, absmax)`` (inputs untouched).

    ``param``/``grad``: ``(B, R, C)`` when factored (``vc``, ``sr``, ``sc`` given: ``v``/``sr`` are row
    statistics ``(B, R)``, ``vc``/``sc`` column statistics ``(B, C)``), else flat ``(n,)`` with ``v``
    full. ``m``: fp32 (param's shape) or flat int8 codes with ``absmax``. ``step`` and ``flag`` 0-d
    fp32. ``hp``: :class:`CAMEScalars` packed (:func:`.dispatch.pack`). Where ``flag == 0`` every output
    equals its input. ``reduce``: None, or the ``SumReduce`` of a sharded tensor whose local shard is
    given (sums completed across ranks). ``stochastic``: the param rounding (False: nearest-even).
    """
    s = unpack(CAMEScalars, hp)
    v, vc, u = came_direction_reference(grad, v, vc, flag, hp, reduce)
    new_m, m, absmax = momentum_update_reference(m, absmax, u, s.beta1, s.one_minus_beta1, flag != 0)
    new_p, sr, sc = came_finish_reference(param, u, new_m, sr, sc, step, flag, hp, reduce, stochastic)
    return new_p, v, vc, sr, sc, m, absmax


def came_direction_reference(
    grad: torch.Tensor, v: torch.Tensor, vc: torch.Tensor | None, flag: torch.Tensor, hp: torch.Tensor, reduce=None
) -> tuple[torch.Tensor, ...]:
    """First part of :func:`came_reference`: the new second-moment statistics and the clipped update
    ``u`` (fp32, the grad's layout; a maximized gradient's sign folded into the scalar ``1 / d``, the same
    bits as negating ``g``); returns ``(v, vc, u)``."""
    s = unpack(CAMEScalars, hp)
    ok = flag != 0
    g = grad.to(torch.float32)
    v, vc, u = second_moment_reference(g, v, vc, s.eps1, s.beta2, s.one_minus_beta2, ok, reduce)
    return v, vc, u * ((1.0 / clip_divisor_reference(u, s.sqrt_n, s.clip_threshold, reduce)) * s.grad_sign)


def came_finish_reference(
    param: torch.Tensor, u: torch.Tensor, new_m: torch.Tensor, sr: torch.Tensor | None, sc: torch.Tensor | None,
    step: torch.Tensor, flag: torch.Tensor, hp: torch.Tensor, reduce=None, stochastic: bool = True,
) -> tuple[torch.Tensor, ...]:
    """Last part of :func:`came_reference`: instability statistics from ``u`` and the new momentum
    ``new_m`` (fp32), then the param update (rounded stochastically, or to nearest-even when ``stochastic``
    is False); returns ``(new_param, sr, sc)``."""
    s = unpack(CAMEScalars, hp)
    ok = flag != 0
    p = param.to(torch.float32)
    if sr is not None:
        diff = u - new_m
        sr, sc = factored_stats_reference(diff * diff + s.eps2, sr, sc, s.beta3, s.one_minus_beta3, ok, reduce)
        upd = factored_scale_reference(sr, sc, reduce) * new_m
    else:
        upd = new_m
    new_p = p + p * (-(s.weight_decay * s.lr)) - upd * s.lr
    seed = index_seed_reference(step, s.tensor_index)
    new_p = torch.where(ok, round_param_reference(new_p, param.dtype, seed, stochastic=stochastic), param)
    return new_p, sr, sc


# --------------------------------------------------------------------------------------------------
# Launcher: the family's Triton launches and host step, registered with dispatch
# --------------------------------------------------------------------------------------------------


def _came_inplace(param, grad, v, vc, sr, sc, m, absmax, step, flag, hp, stochastic, reduce=None) -> None:
    write_back((param, v, vc, sr, sc, m, absmax), came_reference(param, grad, v, vc, sr, sc, m, absmax, step, flag,
                                                                 hp, reduce, stochastic))


def _came_direction_inplace(grad, v, vc, flag, hp) -> torch.Tensor:
    new_v, new_vc, u = came_direction_reference(grad, v, vc, flag, hp)
    write_back((v, vc), (new_v, new_vc))
    return u


def _came_momentum_inplace(u, m, absmax, hp) -> torch.Tensor:
    """8-bit momentum EMA on (blocks, 256) views, the host having checked the finite flag (no masks)."""
    s = unpack(CAMEScalars, hp)
    new_m, codes, scales = momentum_update_reference(m, absmax, u, s.beta1, s.one_minus_beta1, None)
    m.copy_(codes)
    absmax.copy_(scales)
    return new_m


def _came_finish_inplace(param, u, new_m, sr, sc, step, flag, hp, stochastic=True) -> None:
    write_back((param, sr, sc), came_finish_reference(param, u, new_m, sr, sc, step, flag, hp, None, stochastic))


# the host step: the reference above, compiled once per layout (factored (B, R, C) / flat), never per shape
_CAME_CPU = per_layout(_came_inplace)
# 8-bit momentum: three graphs (direction, momentum codec on (blocks, 256) views, instability + update),
# with u and the fp32 momentum materialized transiently; one graph mixing the codec's 2-D views with
# the (B, R, C) layout compiled several times slower (see factored_plan.run_host_step)
_DIRECTION_CPU = per_layout(_came_direction_inplace)
_MOMENTUM_CPU = HostStep(_came_momentum_inplace)
_FINISH_CPU = per_layout(_came_finish_inplace)


def _views(t: CAMETensors) -> tuple:
    """``(param, work, g, v, vc, sr, sc, m, absmax, step, flag, tensor_index, reduce)`` of the one tensor
    of ``t``, in the kernel layout (:func:`.factored_plan.state_views`; ``sr``/``sc`` as ``(B, R)``/``(B, C)``)."""
    param, grad, v, vc, sr, sc, m, absmax, step, flag, tensor_index, reduce = (field[0] for field in t)
    work, g, v, vc, m = state_views(param, grad, v, vc, m)
    if vc is not None:
        B = work.shape[0]
        sr, sc = sr.view(B, -1), sc.view(B, -1)
    return param, work, g, v, vc, sr, sc, m, absmax, step, flag, tensor_index, reduce


def _host(t: CAMETensors, scalars: CAMEScalars, backend: str, steps: None, stochastic: bool = True) -> None:
    """The reference step of one tensor (``t`` holds one), eager or compiled as ``backend`` says
    (:func:`.factored_plan.run_host_step`); a sharded one (``reduces[0]`` set) runs eagerly, its sums
    completed across ranks. ``stochastic``: the param rounding mode."""
    param, work, g, v, vc, sr, sc, m, absmax, step, flag, tensor_index, reduce = _views(t)
    numel = param.numel() if reduce is None else reduce.numel
    hp = pack(scalars._replace(sqrt_n=math.sqrt(numel), tensor_index=float(tensor_index)), param.device)
    factored = vc is not None

    def rest(backend: str, u: torch.Tensor) -> None:
        new_m = _MOMENTUM_CPU.on(backend)(block_rows(u, pad=False), block_rows(m, pad=False), absmax, hp)
        _FINISH_CPU[factored].on(backend)(work, u, new_m.view(u.shape), sr, sc, step, flag, hp, stochastic)

    run_host_step(_CAME_CPU, _DIRECTION_CPU, rest, backend=backend, factored=factored, quantized=absmax is not None,
                  flag=flag, reduce=reduce, whole_args=(work, g, v, vc, sr, sc, m, absmax, step, flag, hp, stochastic),
                  direction_args=(g, v, vc, flag, hp))
    copy_back(param, work)


def _launch(t: CAMETensors, s: CAMEScalars, stochastic: bool = True) -> None:
    """The Triton passes of one group (:func:`.factored_plan.group_key`; seven launches factored, three 1-D, for
    all its tensors together; ``stochastic``: the update kernel's ``STOCHASTIC``)."""
    plan = plan_group(t.params, t.grads, t.vs, t.vcs, t.ms, t.absmaxes, t.steps, t.flags, t.tensor_indices,
                      srs=t.srs, scs=t.scs, reduces=t.reduces)
    scal = launch_direction(plan, eps1=s.eps1, decay=s.beta2, one_minus_decay=s.one_minus_beta2,
                            beta_from_step=False, clip=s.clip_threshold, lr=s.lr, eps2=s.eps2,
                            rule=(False, False, False), grad_sign=s.grad_sign, elr=None)
    quantized = t.absmaxes[0] is not None
    ws = plan.ws
    if plan.factored:
        block_r, block_c = plan.tile
        owner, programs = plan.rows
        _res_stats_kernel[(programs,)](
            table_ptr=plan.table, owner_ptr=owner, T=plan.T, rf_ptr=ws["rf"], cf_ptr=ws["cf"], scal_ptr=scal,
            colpart_ptr=ws["colpart"], rsum_part_ptr=ws["rsum"], beta1=s.beta1, one_minus_beta1=s.one_minus_beta1,
            beta3=s.beta3, one_minus_beta3=s.one_minus_beta3, eps2=s.eps2, QUANTIZED=quantized,
            GRAD_DTYPE=plan.grad_dtype, ALIGNED=plan.aligned, BLOCK_R=block_r, BLOCK_C=block_c,
            num_warps=STATS_WARPS, enable_fp_fusion=False,
        )
        plan.complete("colpart", "rsum")  # a sharded group's instability sums, over every rank's rows
        launch_finalize(plan, ws["srf"], ws["scf"], fields=(F_SR.value, F_SC.value), decay=s.beta3,
                        one_minus_decay=s.one_minus_beta3, beta_from_step=False)
    launch_update(_came_update_kernel, plan, scal, dict(
        srf_ptr=ws["srf"], scf_ptr=ws["scf"], beta1=s.beta1, one_minus_beta1=s.one_minus_beta1,
        weight_decay=s.weight_decay, lr=s.lr, QUANTIZED=quantized, STOCHASTIC=stochastic))


def _launch_key(t: CAMETensors, i: int) -> tuple:
    return group_key(t.params[i], t.grads[i], t.vcs[i], t.ms[i], t.absmaxes[i])


def _shard_key(t: CAMETensors, i: int) -> tuple | None:
    return shard_key(t.reduces[i], _launch_key(t, i))


CAME = Family("came", launch=_launch, host=_host, launch_key=_launch_key, shard_key=_shard_key)
"""The CAME family: ``dispatch(CAME, CAMETensors(...), CAMEScalars.of(...))`` applies one step in place to
every param and its state (statistics per tensor; on Triton each pass is one launch per
:func:`.factored_plan.group_key` group, on the host one tensor at a time). Never synchronizes with a CUDA
device."""

CAME_NEAREST = nearest_variant(CAME, _launch, _host)
""":data:`CAME` storing bf16/fp16 params rounded to nearest-even (``bf16_rounding="nearest"``)."""
