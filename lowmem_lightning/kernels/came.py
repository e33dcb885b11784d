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
reads of ``g`` with fp32 momentum (the minimum), four with 8-bit. 1-D tensors take two passes. No
division or root per element (``scalars_kernel`` supplies ``1 / d``; see :mod:`.factored`).

File order: Triton kernels, PyTorch reference, launcher.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .aot import dtype_variants, signature_of, with_aligned
from .codec import BLOCK_SIZE, decode_signed
from .dispatch import cpu_compiled, per_layout, scalar_args, update_backend
from .factored import (
    INT_TYPES,
    ONE_WARP,
    TILES,
    as_blocks,
    block_direction,
    block_of,
    clip_divisor_reference,
    col_tile,
    copy_back,
    ema,
    factored_scale_reference,
    factored_stats_reference,
    factored_u,
    index_args,
    launch_finalize,
    launch_scalars,
    launch_second_moment,
    momentum_block,
    momentum_update_reference,
    row_tile,
    second_moment_reference,
    state_views,
    store_row_ema,
    tile_shape,
    write_back,
)
from .rounding import index_seed, index_seed_reference, round_param_reference, store_param

__all__ = ["came_reference", "came_update"]


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _res_stats_kernel(
    g_ptr,
    m_ptr,
    absmax_ptr,
    rf_ptr,
    cf_ptr,
    scal_ptr,
    sr_ptr,
    colpart_ptr,
    rsum_part_ptr,
    flag_ptr,
    R,
    C,
    n_rt,
    beta1,
    one_minus_beta1,
    beta3,
    one_minus_beta3,
    eps2,
    QUANTIZED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Instability statistics: program = ``BLOCK_R`` rows of batch ``b`` over all columns; ``u = ((rf * cf)
    * g) * (1 / d)`` and the new momentum ``m``, row sums of ``s = (u - m)^2 + eps2`` (+ row EMA ``sr``)
    and column partials. Multiplies only (``rf``, ``cf``, ``1 / d`` precomputed). An fp32 momentum is
    stored here (bit for bit what the update would recompute), so the update pass reads ``m`` alone
    instead of ``g`` and the old ``m``; an 8-bit one is recomputed there (its update uses the fp32
    ``m`` before quantization, which only this pass and the update have in registers)."""
    pid, b, rmask, grow = row_tile(n_rt, R, BLOCK_R)
    rf = tl.load(rf_ptr + grow, mask=rmask, other=0.0)
    inv_d = tl.load(scal_ptr + 2)
    finite = tl.load(flag_ptr) != 0.0
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols, cmask, m2, offs = col_tile(grow, rmask, c0, C, BLOCK_C)
        g = tl.load(g_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        cf = tl.load(cf_ptr + b.to(tl.int64) * C + cols, mask=cmask, other=0.0)
        u = ((rf[:, None] * cf[None, :]) * g) * inv_d
        if QUANTIZED:
            old = decode_signed(tl.load(m_ptr + offs, mask=m2, other=0),
                                tl.load(absmax_ptr + offs // 256, mask=m2, other=0.0))
        else:
            old = tl.load(m_ptr + offs, mask=m2, other=0.0)
        m = ema(old, u, beta1, one_minus_beta1)
        if not QUANTIZED:  # the new fp32 momentum, stored here: the update pass reads it, not g and old m
            tl.store(m_ptr + offs, tl.where(finite, m, old), mask=m2)  # unchanged when not finite
        diff = u - m
        s = tl.where(m2, diff * diff + eps2, 0.0)
        acc += tl.sum(s, axis=1)
        tl.store(colpart_ptr + pid.to(tl.int64) * C + cols, tl.sum(s, axis=0), mask=cmask)
    store_row_ema(sr_ptr, rsum_part_ptr, pid, grow, rmask, acc, C, beta3, one_minus_beta3, flag_ptr)


@triton.jit(do_not_specialize=["tensor_index"])
def _came_update_kernel(
    p_ptr,
    g_ptr,
    m_ptr,
    absmax_ptr,
    v_ptr,
    cf_ptr,
    srf_ptr,
    scf_ptr,
    scal_ptr,
    flag_ptr,
    step_ptr,
    n,
    C,
    inv_c_hi,
    inv_c_lo,
    inv_r_hi,
    inv_r_lo,
    beta1,
    one_minus_beta1,
    weight_decay,
    lr,
    tensor_index,
    FACTORED: tl.constexpr,
    QUANTIZED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One codec block of ``BLOCK`` (= 256) elements per program: ``u`` (factored: ``v_ptr``/``cf_ptr``
    the second-moment factors; flat: ``v``) times ``1 / d``, the momentum (stored), the confidence
    factors ``srf``/``scf`` of the instability statistics applied to ``m``, weight decay, the param.
    No per-element division; the flat path's ``inv_sqrt`` is correctly rounded and branch-free."""
    if FACTORED and not QUANTIZED:  # _res_stats_kernel stored the new fp32 momentum
        pid, offs, finite, mask = block_of(flag_ptr, n, BLOCK)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    else:
        pid, offs, finite, mask, u = block_direction(g_ptr, v_ptr, cf_ptr, flag_ptr, n, C, inv_c_hi, inv_c_lo,
                                                     inv_r_hi, inv_r_lo, FACTORED, BLOCK)
        u = u * tl.load(scal_ptr + 2)
        m = momentum_block(m_ptr, absmax_ptr, pid, offs, mask, finite, u, beta1, one_minus_beta1, QUANTIZED)
    if FACTORED:
        upd = factored_u(m, offs, mask, srf_ptr, scf_ptr, C, inv_c_hi, inv_c_lo, inv_r_hi, inv_r_lo)
    else:
        upd = m
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = p + p * (-(weight_decay * lr)) - upd * lr
    store_param(p_ptr, p, offs, mask, index_seed(tl.load(step_ptr), tensor_index), True)


AOT_SPECS = with_aligned([
    (_res_stats_kernel,
     signature_of(_res_stats_kernel, INT_TYPES, g_ptr=f"*{grad}", m_ptr="*i8" if quantized else "*fp32"),
     {"QUANTIZED": quantized, "BLOCK_R": br, "BLOCK_C": bc})
    for _, grad, (br, bc, quantized) in dtype_variants((br, bc, q) for q in (False, True) for br, bc in TILES)
] + [
    (_came_update_kernel, signature_of(_came_update_kernel, INT_TYPES, p_ptr=f"*{param}", g_ptr=f"*{grad}",
                                       m_ptr="*i8" if quantized else "*fp32"),
     {"FACTORED": factored, "QUANTIZED": quantized, "BLOCK": BLOCK_SIZE}, {"num_warps": ONE_WARP})
    for param, grad, (factored, quantized) in dtype_variants((f, q) for f in (False, True) for q in (False, True))
])
"""(kernel, signature, constexprs) for every CAME-specific kernel and constexpr variant in fp32, plus
the richest variant for the other dtype pairs (the shared second-moment kernels are listed in
:mod:`.factored`)."""


# --------------------------------------------------------------------------------------------------
# PyTorch reference (the specification, the CPU path and the test oracle)
# --------------------------------------------------------------------------------------------------


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
) -> tuple[torch.Tensor, ...]:
    """One CAME step; returns ``(new_param, v, vc, sr, sc, m, absmax)`` (inputs untouched).

    ``param``/``grad``: ``(B, R, C)`` when factored (``vc``, ``sr``, ``sc`` given: ``v``/``sr`` are row
    statistics ``(B, R)``, ``vc``/``sc`` column statistics ``(B, C)``), else flat ``(n,)`` with ``v``
    full. ``m``: fp32 (param's shape) or flat int8 codes with ``absmax``. ``step`` and ``flag`` 0-d
    fp32. ``hp`` fp32 ``[lr, eps1, eps2, clip, beta1, beta2, beta3, 1 - beta1, 1 - beta2, 1 - beta3,
    weight_decay, sqrt(numel), tensor_index]`` (each ``1 - beta`` computed in double, see
    :func:`.factored.ema`). Where ``flag == 0`` every output equals its input. ``reduce``: None, or the
    ``SumReduce`` of a sharded tensor whose local shard is given (sums completed across ranks).
    """
    v, vc, u = came_direction_reference(grad, v, vc, flag, hp, reduce)
    beta1, omb1 = hp[4], hp[7]
    new_m, m, absmax = momentum_update_reference(m, absmax, u, beta1, omb1, flag != 0)
    new_p, sr, sc = came_finish_reference(param, u, new_m, sr, sc, step, flag, hp, reduce)
    return new_p, v, vc, sr, sc, m, absmax


def came_direction_reference(
    grad: torch.Tensor, v: torch.Tensor, vc: torch.Tensor | None, flag: torch.Tensor, hp: torch.Tensor, reduce=None
) -> tuple[torch.Tensor, ...]:
    """First part of :func:`came_reference`: the new second-moment statistics and the clipped update
    ``u`` (fp32, the grad's layout); returns ``(v, vc, u)``."""
    lr, eps1, eps2, clip, beta1, beta2, beta3, omb1, omb2, omb3, weight_decay, sqrt_n, tensor_index = hp.unbind()
    ok = flag != 0
    g = grad.to(torch.float32)
    v, vc, u = second_moment_reference(g, v, vc, eps1, beta2, omb2, ok, reduce)
    return v, vc, u * (1.0 / clip_divisor_reference(u, sqrt_n, clip, reduce))


def came_finish_reference(
    param: torch.Tensor, u: torch.Tensor, new_m: torch.Tensor, sr: torch.Tensor | None, sc: torch.Tensor | None,
    step: torch.Tensor, flag: torch.Tensor, hp: torch.Tensor, reduce=None,
) -> tuple[torch.Tensor, ...]:
    """Last part of :func:`came_reference`: instability statistics from ``u`` and the new momentum
    ``new_m`` (fp32), then the param update; returns ``(new_param, sr, sc)``."""
    lr, eps1, eps2, clip, beta1, beta2, beta3, omb1, omb2, omb3, weight_decay, sqrt_n, tensor_index = hp.unbind()
    ok = flag != 0
    p = param.to(torch.float32)
    if sr is not None:
        diff = u - new_m
        sr, sc = factored_stats_reference(diff * diff + eps2, sr, sc, beta3, omb3, ok, reduce)
        upd = factored_scale_reference(sr, sc, reduce) * new_m
    else:
        upd = new_m
    new_p = p + p * (-(weight_decay * lr)) - upd * lr
    seed = index_seed_reference(step, tensor_index)
    new_p = torch.where(ok, round_param_reference(new_p, param.dtype, seed, stochastic=True), param)
    return new_p, sr, sc


# --------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------


def _came_inplace(param, grad, v, vc, sr, sc, m, absmax, step, flag, hp, reduce=None) -> None:
    write_back((param, v, vc, sr, sc, m, absmax), came_reference(param, grad, v, vc, sr, sc, m, absmax, step, flag,
                                                                 hp, reduce))


def _came_direction_inplace(grad, v, vc, flag, hp) -> torch.Tensor:
    new_v, new_vc, u = came_direction_reference(grad, v, vc, flag, hp)
    write_back((v, vc), (new_v, new_vc))
    return u


def _came_momentum_inplace(u, m, absmax, hp) -> torch.Tensor:
    """8-bit momentum EMA on (blocks, 256) views, the host having checked the finite flag (no masks)."""
    new_m, codes, scales = momentum_update_reference(m, absmax, u, hp[4], hp[7], None)
    m.copy_(codes)
    absmax.copy_(scales)
    return new_m


def _came_finish_inplace(param, u, new_m, sr, sc, step, flag, hp) -> None:
    write_back((param, sr, sc), came_finish_reference(param, u, new_m, sr, sc, step, flag, hp))


# the CPU path: the reference above, compiled once per layout (factored (B, R, C) / flat), never per shape
_CAME_CPU = per_layout(_came_inplace)
# 8-bit momentum on CPU: three graphs (direction, momentum codec on (blocks, 256) views, instability +
# update), with u and the fp32 momentum materialized transiently; one graph mixing the codec's 2-D views
# with the (B, R, C) layout compiled several times slower (see factored.as_blocks)
_DIRECTION_CPU = per_layout(_came_direction_inplace)
_MOMENTUM_CPU = cpu_compiled(_came_momentum_inplace)
_FINISH_CPU = per_layout(_came_finish_inplace)


def came_update(
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
    *,
    lr: float,
    eps: tuple[float, float],
    clip_threshold: float,
    betas: tuple[float, float, float],
    weight_decay: float,
    tensor_index: int,
    reduce=None,
    backend: str | None = None,
) -> None:
    """Apply one CAME step in place to ``param`` and its state. Never synchronizes.

    Factored (>= 2 dims; ``vc``, ``sr``, ``sc`` given): ``v``/``sr`` have shape ``param.shape[:-1]``,
    ``vc``/``sc`` ``param.shape[:-2] + param.shape[-1:]``. Else ``v`` is the full second moment.
    ``m``: fp32 (param's shape) or flat int8 codes with ``absmax`` (fp32, one per 256 elements).
    ``step`` (advanced by the optimizer; seeds stochastic rounding) and ``flag`` are 0-d fp32 on the
    param's device. Triton on CUDA (seven launches factored, three 1-D), the ``torch.compile``'d
    reference on CPU. ``reduce``: the ``SumReduce`` of a sharded (DTensor) param whose local shard is
    given: the eager reference runs with sums completed across ranks (any device, also for an empty
    shard, since every rank must join the collectives); the caller then passes ``backend="eager"``.
    ``backend``: ``"triton"``, ``"compiled"`` or ``"eager"``; None lets :func:`.dispatch.choose` decide.
    """
    backend = update_backend(param, backend, reduce)
    if backend is None:
        return
    work, g, v_, vc_, m_ = state_views(param, grad, v, vc, m)
    sr_ = sc_ = None
    if vc is not None:
        B = work.shape[0]
        sr_, sc_ = sr.view(B, -1), sc.view(B, -1)
    if backend == "triton":
        _launch(work, g, v_, vc_, sr_, sc_, m_, absmax, step, flag, lr, eps, clip_threshold, betas, weight_decay,
                tensor_index)
    else:
        numel = param.numel() if reduce is None else reduce.numel
        hp = scalar_args(lr, eps[0], eps[1], clip_threshold, *betas, *(1.0 - b for b in betas), weight_decay,
                         math.sqrt(numel), float(tensor_index), device=param.device)
        args = (work, g, v_, vc_, sr_, sc_, m_, absmax, step, flag, hp)
        if reduce is not None:
            _came_inplace(*args, reduce)
        elif absmax is not None:
            factored = vc is not None
            u = _DIRECTION_CPU[factored].on(backend)(g, v_, vc_, flag, hp)
            if flag.item():  # a CPU tensor: a memory read, not a device sync; 0 leaves everything as it was
                u_blocks, m_blocks = as_blocks(u, m_)
                new_m = _MOMENTUM_CPU.on(backend)(u_blocks, m_blocks, absmax, hp).view(u.shape)
                _FINISH_CPU[factored].on(backend)(work, u, new_m, sr_, sc_, step, flag, hp)
        else:
            _CAME_CPU[vc is not None].on(backend)(*args)
    copy_back(param, work)


def _launch(work, g, v, vc, sr, sc, m, absmax, step, flag, lr, eps, clip_threshold, betas, weight_decay,
            tensor_index) -> None:
    beta1, beta2, beta3 = (float(b) for b in betas)
    rf, cf, usq_part, _ = launch_second_moment(work, g, v, vc, step, flag, eps[0], beta2, 1.0 - beta2, False, False)
    n = work.numel()
    scal = launch_scalars(usq_part, None, step, None, n, clip_threshold, lr, eps[1], False, False, False)
    quantized = absmax is not None
    R = C = 1
    srf = scf = None
    if vc is not None:
        B, R, C = work.shape
        block_r, block_c = tile_shape(C)
        n_rt = triton.cdiv(R, block_r)
        colpart = torch.empty(B * n_rt, C, dtype=torch.float32, device=work.device)
        rsum_part = torch.empty(B * n_rt, dtype=torch.float32, device=work.device)
        _res_stats_kernel[(B * n_rt,)](
            g, m, flag if absmax is None else absmax, rf, cf, scal, sr, colpart, rsum_part, flag, R, C, n_rt,
            beta1, 1.0 - beta1, beta3, 1.0 - beta3, float(eps[1]), QUANTIZED=quantized, BLOCK_R=block_r,
            BLOCK_C=block_c, enable_fp_fusion=False,
        )
        srf, scf = launch_finalize(colpart, sc, sr, rsum_part, flag, step, beta3, 1.0 - beta3, False, n_rt)
    _came_update_kernel[(triton.cdiv(n, BLOCK_SIZE),)](
        work, g, m, flag if absmax is None else absmax, v if rf is None else rf, v if cf is None else cf,
        v if srf is None else srf, v if scf is None else scf, scal, flag, step, n, C, *index_args(R, C),
        beta1, 1.0 - beta1, float(weight_decay), float(lr), int(tensor_index),
        FACTORED=vc is not None, QUANTIZED=quantized, BLOCK=BLOCK_SIZE, num_warps=ONE_WARP, enable_fp_fusion=False,
    )
