"""Row/column second-moment statistics shared by the factored optimizers (:mod:`.adafactor`, :mod:`.came`).

Math (Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", ICML 2018,
section 3; CAME applies it to its instability statistic too). A tensor of >= 2 dims is viewed as
``(B, R, C)`` (leading dims a batch); ``q`` is the statistic's input, e.g. ``g * g + eps1``; fp32::

    vr = beta * vr + (1 - beta) * mean_C(q)       (B, R)   row statistics
    vc = beta * vc + (1 - beta) * mean_R(q)       (B, C)   column statistics
    u  = (1 / sqrt(vr / mean_R(vr)))[:, None] * (1 / sqrt(vc))[None, :] * g
    d  = max(1, rms(u) / clip_threshold)                   update clipping
    (1-D: v = beta * v + (1 - beta) * q, u = g / sqrt(v), v full size)

The statistics passes (deterministic partial sums, no atomics) are listed in :mod:`.adafactor`. The
per-element passes only multiply (the factors are precomputed per row and column; the 1-D path's
``inv_sqrt`` is branch-free and correctly rounded), so their SASS has no slow-path ``CALL``. The
``@triton.jit`` helpers are the building blocks of the optimizers' update kernels; each has a
``*_reference`` twin that the step functions call, the same fp32 operations.

File order: Triton helpers and kernels, PyTorch references, launchers.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .aot import dtype_variants, signature_of, with_aligned
from .codec import (
    BLOCK_SIZE,
    decode_signed,
    decode_signed_reference,
    dequantize_reference,
    div_rn_fast,
    encode_signed,
    encode_signed_reference,
    quantize_reference,
    rcp_rn,
    sqrt_rn_fast,
    sqrt_rn_reference,
)
from .rounding import masked_reference

__all__ = ["TILES", "ONE_WARP", "tile_shape", "factored_shape", "state_views", "run_host_step",
           "launch_second_moment", "launch_finalize", "index_args", "split_reciprocal",
           "div_rn", "inv_sqrt", "row_of", "factored_stats_reference", "factored_scale_reference",
           "clip_divisor_reference", "momentum_update_reference", "second_moment_reference", "write_back"]

TILE_ELEMENTS = 2048
"""Elements of one (BLOCK_R x BLOCK_C) tile of the row/column statistics kernels."""

TILES = ((16, 128), (32, 64), (64, 32), (128, 16))
"""(BLOCK_R, BLOCK_C) variants of the statistics kernels: BLOCK_C follows the column count so narrow
matrices (1000 x 3) do not run mostly-masked tiles."""

FINALIZE_BLOCK = 128
"""Columns per program of the column finalize kernel."""

ONE_WARP = 1
"""Warps per program of the 256-element update kernels and the finalize kernel: 8 (4) elements per
thread, so streams move as vectors (4 warps left 2 (1) per thread, scalar accesses)."""

FLAT_BLOCK = 1024
"""Elements per program of the 1-D statistics kernel."""


# --------------------------------------------------------------------------------------------------
# Triton helpers (used by the kernels below and by the update kernels of Adafactor and CAME)
# --------------------------------------------------------------------------------------------------


@triton.jit
def ema(old, new, beta, one_minus_beta):
    """``beta * old + (1 - beta) * new`` as ``old.mul_(beta).add_(new, alpha=1-beta)`` computes it.

    ``one_minus_beta`` is passed separately: computed in double on the host (as torch computes
    ``alpha``), it is exact where ``1 - float32(beta)`` is not (beta = 0.9999 would be 1.7e-5 off).
    """
    return old * beta + new * one_minus_beta


@triton.jit
def beta_of_step(step, decay, one_minus_decay, beta_from_step):
    """``(beta, 1 - beta)``: ``(1 - t ** decay, t ** decay)`` when ``beta_from_step != 0`` (Adafactor's
    beta2_t), else the constants ``(decay, one_minus_decay)``."""
    x = tl.exp2(decay * tl.log2(step))
    return tl.where(beta_from_step != 0, 1.0 - x, decay), tl.where(beta_from_step != 0, x, one_minus_decay)


@triton.jit
def div_rn(a, b):
    """``a / b`` correctly rounded and branch-free (:func:`.codec.div_rn_fast`: ``b`` and the quotient
    normal, or ``a == 0``), and an infinite ``a`` divided as the reference does (the FMA residual of
    ``inf`` would be NaN): an overflowed row sum gives an infinite statistic and a zero factor, not NaN."""
    return tl.where(tl.abs(a) <= 3.4028234663852886e38, div_rn_fast(a, b), a * rcp_rn(b))


@triton.jit
def inv_sqrt(x):
    """``1 / sqrt(max(x, 2**-126))``: the IEEE root, then the IEEE reciprocal (as the reference), branch-free.

    The floor caps an underflowed statistic's factor at ~9.2e18 (a zero gradient times it stays 0, not
    NaN). Values below ``2**-100`` are scaled by ``2**64`` before the root and by ``2**-32`` after (both
    exact), keeping :func:`.codec.sqrt_rn_fast` and :func:`.codec.rcp_rn` in their exact ranges."""
    x = tl.maximum(x, 1.1754943508222875e-38)
    tiny = x < 7.888609052210118e-31  # 2**-100
    s = sqrt_rn_fast(x * tl.where(tiny, 18446744073709551616.0, 1.0))
    return rcp_rn(s * tl.where(tiny, 2.3283064365386963e-10, 1.0))


@triton.jit
def row_of(offs, inv_hi, inv_lo):
    """``offs // D`` (int64) for element offsets ``0 <= offs < 2**46`` without an integer division:
    ``floor((offs + 0.5) * (1 / D))`` in fp64, ``1 / D`` passed as two fp32 (``hi + lo``, ~48 bits, see
    :func:`split_reciprocal`). The half-integer ``offs + 0.5`` is at least ``0.5 / D`` from a multiple of
    ``D``, and the error, ``< offs * 2**-47 / D``, is smaller."""
    inv = tl.cast(inv_hi, tl.float64) + tl.cast(inv_lo, tl.float64)
    return tl.floor((offs.to(tl.float64) + 0.5) * inv).to(tl.int64)


@triton.jit
def factored_u(g, offs, mask, rf_ptr, cf_ptr, C, inv_c_hi, inv_c_lo, inv_r_hi, inv_r_lo):
    """``u = (rf * cf) * g`` at flat element indices ``offs`` of a ``(B, R, C)`` tensor, with the row
    factors ``rf`` (``B * R``) and column factors ``cf`` (``B * C``) precomputed by
    :func:`sq_finalize_kernel`: two gathers and two multiplies per element, no division."""
    grow = row_of(offs, inv_c_hi, inv_c_lo)  # b * R + r
    b = row_of(grow, inv_r_hi, inv_r_lo)
    rf = tl.load(rf_ptr + grow, mask=mask, other=0.0)
    cf = tl.load(cf_ptr + (b * C + (offs - grow * C)), mask=mask, other=0.0)
    return (rf * cf) * g


@triton.jit
def block_of(flag_ptr, n, BLOCK: tl.constexpr):
    """This program's codec block: ``(pid, offs, finite, mask)``; ``mask`` is empty when the gradient is
    not finite (``flag == 0``)."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    finite = tl.load(flag_ptr) != 0.0
    return pid, offs, finite, offs < tl.where(finite, n, 0)


@triton.jit
def block_direction(g_ptr, v_ptr, cf_ptr, flag_ptr, n, C, inv_c_hi, inv_c_lo, inv_r_hi, inv_r_lo,
                    FACTORED: tl.constexpr, BLOCK: tl.constexpr):
    """This program's codec block: ``(pid, offs, finite, mask, u)`` with ``u`` the unclipped update,
    ``(rf * cf) * g`` (factored: ``v_ptr`` holds ``rf``, ``cf_ptr`` ``cf``) or ``g / sqrt(v)`` (``v`` full
    size); ``mask`` is empty when the gradient is not finite."""
    pid, offs, finite, mask = block_of(flag_ptr, n, BLOCK)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if FACTORED:
        u = factored_u(g, offs, mask, v_ptr, cf_ptr, C, inv_c_hi, inv_c_lo, inv_r_hi, inv_r_lo)
    else:
        u = inv_sqrt(tl.load(v_ptr + offs, mask=mask, other=1.0)) * g
    return pid, offs, finite, mask, u


@triton.jit
def momentum_block(m_ptr, absmax_ptr, pid, offs, mask, finite, u, beta1, one_minus_beta1,
                   QUANTIZED: tl.constexpr):
    """``m = beta1 * m + (1 - beta1) * u`` over one codec block, stored back as fp32 or as int8 codes with
    a new absmax (the block's max ``|m|``); returns the fp32 ``m``."""
    if QUANTIZED:
        scale = tl.load(absmax_ptr + pid, mask=finite, other=0.0)
        old = decode_signed(tl.load(m_ptr + offs, mask=mask, other=0), scale)
        m = tl.where(mask, ema(old, u, beta1, one_minus_beta1), 0.0)
        absmax = tl.max(tl.abs(m), axis=0)
        tl.store(m_ptr + offs, encode_signed(m, absmax), mask=mask)
        tl.store(absmax_ptr + pid, absmax, mask=finite)
    else:
        m = ema(tl.load(m_ptr + offs, mask=mask, other=0.0), u, beta1, one_minus_beta1)
        tl.store(m_ptr + offs, m, mask=mask)
    return m


@triton.jit
def row_tile(n_rt, R, BLOCK_R: tl.constexpr):
    """This program's tile of a ``(B, R, C)`` statistics pass: ``(pid, b, rmask, grow)``, with ``grow``
    the global row ids ``b * R + row`` of its ``BLOCK_R`` rows (``n_rt`` tiles per batch)."""
    pid = tl.program_id(0)
    b = pid // n_rt
    rows = (pid % n_rt) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    return pid, b, rmask, b.to(tl.int64) * R + rows


@triton.jit
def col_tile(grow, rmask, c0, C, BLOCK_C: tl.constexpr):
    """Columns ``c0 .. c0 + BLOCK_C`` of a row tile: ``(cols, cmask, m2, offs)``, with ``m2`` the 2-D mask
    and ``offs`` the element offsets ``grow * C + col`` of the tile in a row-major ``(B * R, C)`` tensor."""
    cols = c0 + tl.arange(0, BLOCK_C)
    cmask = cols < C
    return cols, cmask, rmask[:, None] & cmask[None, :], grow[:, None] * C + cols[None, :]


@triton.jit
def store_row_ema(stat_ptr, rsum_part_ptr, pid, grow, rmask, row_sum, C, beta, one_minus_beta, flag_ptr):
    """Row statistic ``stat = beta * stat + (1 - beta) * row_sum / C`` (unchanged for a non-finite
    gradient) and this tile's partial sum of the new values (for ``mean_R``)."""
    old = tl.load(stat_ptr + grow, mask=rmask, other=0.0)
    new = ema(old, div_rn(row_sum, C.to(tl.float32)), beta, one_minus_beta)
    new = tl.where(tl.load(flag_ptr) != 0.0, new, old)
    tl.store(stat_ptr + grow, new, mask=rmask)
    tl.store(rsum_part_ptr + pid, tl.sum(tl.where(rmask, new, 0.0), axis=0))


# --------------------------------------------------------------------------------------------------
# Triton kernels: the statistics passes
# --------------------------------------------------------------------------------------------------


@triton.jit
def sq_stats_kernel(
    g_ptr, p_ptr, vr_ptr, colpart_ptr, rsum_part_ptr, psq_part_ptr, flag_ptr, step_ptr, eps1, decay,
    one_minus_decay, beta_from_step, R, C, n_rt,
    WITH_PSQ: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Pass 1 (factored): row EMA ``vr``, column partial sums of ``q = g*g + eps1`` per row tile, and the
    partial sums of ``p^2`` (``WITH_PSQ``). Program = one tile of ``BLOCK_R`` rows over all columns."""
    pid, b, rmask, grow = row_tile(n_rt, R, BLOCK_R)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    psq = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols, cmask, m2, offs = col_tile(grow, rmask, c0, C, BLOCK_C)
        g = tl.load(g_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        q = tl.where(m2, g * g + eps1, 0.0)
        acc += tl.sum(q, axis=1)
        tl.store(colpart_ptr + pid.to(tl.int64) * C + cols, tl.sum(q, axis=0), mask=cmask)
        if WITH_PSQ:
            p = tl.load(p_ptr + offs, mask=m2, other=0.0).to(tl.float32)
            psq += tl.sum(p * p, axis=1)
    beta, omb = beta_of_step(tl.load(step_ptr), decay, one_minus_decay, beta_from_step)
    store_row_ema(vr_ptr, rsum_part_ptr, pid, grow, rmask, acc, C, beta, omb, flag_ptr)
    if WITH_PSQ:
        tl.store(psq_part_ptr + pid, tl.sum(psq, axis=0))


@triton.jit
def sq_finalize_kernel(
    colpart_ptr, vc_ptr, vr_ptr, rsum_part_ptr, rf_ptr, cf_ptr, flag_ptr, step_ptr, decay, one_minus_decay,
    beta_from_step, R, C, n_rt,
    BLOCK: tl.constexpr,
):
    """Pass 2 (factored): column EMA ``vc`` from the partials, then the factors the later passes
    multiply by: ``cf = 1 / sqrt(vc)`` (``B * C``) and ``rf = 1 / sqrt(vr / mean_R(vr))`` (``B * R``).
    Program ``(b, j)``: columns and rows ``j * BLOCK ..`` of batch ``b``; each program sums the row
    partials of its batch itself (same loads, same order: every program gets the same ``mean_R``), so
    no pass waits for another. Per row and column only (O(R + C) work): the per-element passes are
    left with multiplies."""
    b = tl.program_id(0)
    j = tl.program_id(1)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for r0 in range(0, n_rt, BLOCK):
        idx = r0 + tl.arange(0, BLOCK)
        total += tl.load(rsum_part_ptr + b * n_rt + idx, mask=idx < n_rt, other=0.0)
    rmean = div_rn(tl.sum(total, axis=0), R.to(tl.float32))
    finite = tl.load(flag_ptr) != 0.0
    cols = j * BLOCK + tl.arange(0, BLOCK)
    if j * BLOCK < C:
        cmask = cols < C
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for rt in range(0, n_rt):
            acc += tl.load(colpart_ptr + (b * n_rt + rt).to(tl.int64) * C + cols, mask=cmask, other=0.0)
        beta, omb = beta_of_step(tl.load(step_ptr), decay, one_minus_decay, beta_from_step)
        cidx = b.to(tl.int64) * C + cols
        old = tl.load(vc_ptr + cidx, mask=cmask, other=0.0)
        new = tl.where(finite, ema(old, div_rn(acc, R.to(tl.float32)), beta, omb), old)
        tl.store(vc_ptr + cidx, new, mask=cmask)
        tl.store(cf_ptr + cidx, inv_sqrt(new), mask=cmask)
    if j * BLOCK < R:
        rmask = cols < R
        ridx = b.to(tl.int64) * R + cols
        vr = tl.load(vr_ptr + ridx, mask=rmask, other=1.0)
        tl.store(rf_ptr + ridx, inv_sqrt(div_rn(vr, rmean)), mask=rmask)


@triton.jit
def clip_stats_kernel(
    g_ptr, rf_ptr, cf_ptr, usq_part_ptr, R, C, n_rt,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Pass 3 (factored): partial sums of ``u^2``, ``u = (rf * cf) * g``, one per tile of ``BLOCK_R`` rows."""
    pid, b, rmask, grow = row_tile(n_rt, R, BLOCK_R)
    rf = tl.load(rf_ptr + grow, mask=rmask, other=0.0)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols, cmask, m2, offs = col_tile(grow, rmask, c0, C, BLOCK_C)
        g = tl.load(g_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        cf = tl.load(cf_ptr + b.to(tl.int64) * C + cols, mask=cmask, other=0.0)
        u = tl.where(m2, (rf[:, None] * cf[None, :]) * g, 0.0)
        acc += tl.sum(u * u, axis=1)
    tl.store(usq_part_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def full_stats_kernel(
    g_ptr, p_ptr, v_ptr, usq_part_ptr, psq_part_ptr, flag_ptr, step_ptr, n, eps1, decay, one_minus_decay,
    beta_from_step,
    WITH_PSQ: tl.constexpr, BLOCK: tl.constexpr,
):
    """Unfactored (1-D) pass: ``v`` EMA and partial sums of ``u^2 = (g / sqrt(v))^2`` (and ``p^2``)."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    old = tl.load(v_ptr + offs, mask=mask, other=1.0)
    beta, omb = beta_of_step(tl.load(step_ptr), decay, one_minus_decay, beta_from_step)
    v = ema(old, g * g + eps1, beta, omb)
    v = tl.where(tl.load(flag_ptr) != 0.0, v, old)
    tl.store(v_ptr + offs, v, mask=mask)
    u = tl.where(mask, inv_sqrt(v) * g, 0.0)
    tl.store(usq_part_ptr + pid, tl.sum(u * u, axis=0))
    if WITH_PSQ:
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(psq_part_ptr + pid, tl.sum(p * p, axis=0))


def tile_shape(cols: int) -> tuple[int, int]:
    """``(BLOCK_R, BLOCK_C)`` for a matrix of ``cols`` columns (one of :data:`TILES`)."""
    block_c = min(128, max(16, triton.next_power_of_2(cols)))
    return TILE_ELEMENTS // block_c, block_c


INT_TYPES = {
    "n": "i64", "R": "i32", "C": "i32", "n_rt": "i32", "beta_from_step": "i32", "n_usq": "i32", "n_psq": "i32",
    "relative_step": "i32", "warmup_init": "i32", "scale_parameter": "i32", "write_elr": "i32", "tensor_index": "i32",
}
"""Triton types of the integer arguments of the factored kernels (others: fp32 scalars, ``*fp32`` pointers)."""

AOT_SPECS = with_aligned(
    [
        (sq_stats_kernel, signature_of(sq_stats_kernel, INT_TYPES, g_ptr=f"*{grad}", p_ptr=f"*{param}"),
         {"WITH_PSQ": psq, "BLOCK_R": br, "BLOCK_C": bc})
        for param, grad, (br, bc, psq) in dtype_variants((br, bc, psq) for psq in (False, True) for br, bc in TILES)
    ]
    + [
        (full_stats_kernel, signature_of(full_stats_kernel, INT_TYPES, g_ptr=f"*{grad}", p_ptr=f"*{param}"),
         {"WITH_PSQ": psq, "BLOCK": FLAT_BLOCK})
        for param, grad, psq in dtype_variants((False, True))
    ]
    + [(sq_finalize_kernel, signature_of(sq_finalize_kernel, INT_TYPES), {"BLOCK": FINALIZE_BLOCK},
        {"num_warps": ONE_WARP})]
    + [
        (clip_stats_kernel, signature_of(clip_stats_kernel, INT_TYPES, g_ptr=f"*{grad}"),
         {"BLOCK_R": br, "BLOCK_C": bc})
        for _, grad, (br, bc) in dtype_variants(TILES)
    ]
)
"""(kernel, signature, constexprs, aligned, options) for every statistics kernel and variant in fp32, the
richest for the other dtype pairs; general and aligned (:func:`.aot.with_aligned`)."""


# --------------------------------------------------------------------------------------------------
# PyTorch references of the shared pieces (used by the step functions of Adafactor and CAME)
# --------------------------------------------------------------------------------------------------


def factored_shape(shape: torch.Size | tuple) -> tuple[int, int, int]:
    """``(B, R, C)`` view of a tensor of >= 2 dims: leading dims flattened into a batch ``B``."""
    return (math.prod(shape[:-2]), shape[-2], shape[-1])


def inv_sqrt_reference(x: torch.Tensor) -> torch.Tensor:
    """Reference of :func:`inv_sqrt`: ``1 / sqrt(max(x, 2**-126))``, both ops correctly rounded
    (:func:`.codec.sqrt_rn_reference`: torch's vectorized CPU ``sqrt`` is not always)."""
    return 1.0 / sqrt_rn_reference(torch.clamp_min(x, 1.1754943508222875e-38))


def ema_reference(old: torch.Tensor, new: torch.Tensor, beta: torch.Tensor, one_minus_beta: torch.Tensor
                  ) -> torch.Tensor:
    """Reference of :func:`ema`."""
    return old * beta + new * one_minus_beta


def factored_stats_reference(
    q: torch.Tensor, vr: torch.Tensor, vc: torch.Tensor, beta: torch.Tensor, omb: torch.Tensor, ok: torch.Tensor,
    reduce=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row/column EMAs of ``q`` (B, R, C): new ``vr`` (B, R) and ``vc`` (B, C); unchanged where ``ok`` is False.

    ``omb`` is ``1 - beta`` (computed in double by the caller, see :func:`ema`). ``reduce``: None, or
    the :class:`~lowmem_lightning.optim.sharding.SumReduce` of a sharded tensor (``q`` is the local
    shard; the sums are completed across ranks and divided by the global R and C).
    """
    row_sum, col_sum, rows, cols = q.sum(-1), q.sum(-2), q.shape[-2], q.shape[-1]
    if reduce is not None:
        row_sum, col_sum, rows, cols = reduce.over_cols(row_sum), reduce.over_rows(col_sum), reduce.rows, reduce.cols
    new_vr = torch.where(ok, ema_reference(vr, row_sum / cols, beta, omb), vr)
    new_vc = torch.where(ok, ema_reference(vc, col_sum / rows, beta, omb), vc)
    return new_vr, new_vc


def factored_scale_reference(vr: torch.Tensor, vc: torch.Tensor, reduce=None) -> torch.Tensor:
    """``rf[:, None] * cf[None, :]`` (B, R, C) with ``rf = 1/sqrt(vr / mean_R(vr))``, ``cf = 1/sqrt(vc)``.

    ``reduce``: as in :func:`factored_stats_reference` (``mean_R`` over the global rows).
    """
    rsum, rows = vr.sum(-1, keepdim=True), vr.shape[-1]
    if reduce is not None:
        rsum, rows = reduce.over_rows(rsum), reduce.rows
    rmean = rsum / rows
    return inv_sqrt_reference(vr / rmean)[..., :, None] * inv_sqrt_reference(vc)[..., None, :]


def second_moment_reference(
    g: torch.Tensor, v: torch.Tensor, vc: torch.Tensor | None, eps1, beta, omb, ok: torch.Tensor, reduce=None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The second-moment pass both optimizers share (module docstring): EMA of ``q = g * g + eps1`` into
    ``v`` (rows, with ``vc`` the columns, when factored; else full) where ``ok``, and the unclipped
    direction ``u = g / sqrt(v_hat)``. Returns ``(v, vc, u)``; fp32, ``g`` in the kernel layout."""
    q = g * g + eps1
    if vc is not None:
        v, vc = factored_stats_reference(q, v, vc, beta, omb, ok, reduce)
        return v, vc, factored_scale_reference(v, vc, reduce) * g
    v = torch.where(ok, ema_reference(v, q, beta, omb), v)
    return v, vc, inv_sqrt_reference(v) * g


def total_square_sum_reference(x: torch.Tensor, reduce=None) -> torch.Tensor:
    """``sum(x^2)`` (0-d fp32; summed by rows first, like the kernels), completed across ranks by ``reduce``."""
    total = (x * x).sum(-1).sum()
    return total if reduce is None else reduce.over_all(total)


def clip_divisor_reference(u: torch.Tensor, sqrt_n: torch.Tensor, clip: torch.Tensor, reduce=None) -> torch.Tensor:
    """``max(1, rms(u) / clip)`` with ``rms(u) = sqrt(sum(u^2)) / sqrt_n`` (``sqrt_n``: sqrt of the global numel)."""
    return torch.clamp(torch.sqrt(total_square_sum_reference(u, reduce)) / sqrt_n / clip, min=1.0)


def momentum_update_reference(
    m: torch.Tensor, absmax: torch.Tensor | None, u: torch.Tensor, beta1: torch.Tensor, omb1: torch.Tensor,
    ok: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """EMA of the momentum: returns ``(new fp32 m, stored m, stored absmax)``.

    ``m`` is fp32 or int8 codes with ``absmax`` (flat, or the shape of ``u``: the same layout); the
    stored values are re-quantized when ``absmax`` is given, and unchanged where ``ok`` is False
    (``ok=None``: always re-quantized).
    """
    if absmax is None:
        new = ema_reference(m, u, beta1, omb1)
        return new, masked_reference(ok, new, m), None
    if m.numel() % BLOCK_SIZE:  # a partial last block: the codec's padded reference
        new = ema_reference(dequantize_reference(m, absmax).view(u.shape), u, beta1, omb1)
        codes, scales = quantize_reference(new, signed=True)
        return new, masked_reference(ok, codes.view(m.shape), m), masked_reference(ok, scales, absmax)
    # whole blocks: the same codec math on (blocks, 256) views, no padding copies (the host steps pass
    # 2-D views already, see codec.block_rows)
    u_blocks = u.reshape(-1, BLOCK_SIZE)
    m_blocks = m.view(u_blocks.shape)
    scale = absmax.view(*u_blocks.shape[:-1], 1)
    new = ema_reference(decode_signed_reference(m_blocks, scale), u_blocks, beta1, omb1)
    new_scale = new.abs().amax(dim=-1, keepdim=True)
    codes = masked_reference(ok, encode_signed_reference(new, new_scale), m_blocks)
    return new.view(u.shape), codes.view(m.shape), masked_reference(ok, new_scale, scale).view(-1)


# --------------------------------------------------------------------------------------------------
# Launchers and layout helpers
# --------------------------------------------------------------------------------------------------


def write_back(dsts, srcs) -> None:
    """``dst.copy_(src)`` for each pair whose ``dst`` is not None (a step function's outputs into the state)."""
    for dst, src in zip(dsts, srcs, strict=True):
        if dst is not None:
            dst.copy_(src)


def state_views(param: torch.Tensor, grad: torch.Tensor, v: torch.Tensor, vc: torch.Tensor | None,
                m: torch.Tensor | None) -> tuple:
    """Contiguous ``(work_param, grad, v, vc, m)`` views in the kernel layout (``(B, R, C)`` or flat); a
    non-contiguous param is worked on as a copy (:func:`.multitensor.copy_back` writes it back)."""
    work = param.contiguous()
    if vc is not None:
        shape3 = factored_shape(param.shape)
        return (work.view(shape3), grad.reshape(shape3).contiguous(), v.view(shape3[:2]), vc.view(shape3[0], -1),
                None if m is None else m.view(shape3))
    return (work.view(-1), grad.reshape(-1).contiguous(), v.view(-1), None, None if m is None else m.view(-1))


def run_host_step(whole: dict, direction: dict, rest, *, backend: str, factored: bool, quantized: bool,
                  flag: torch.Tensor, reduce, whole_args: tuple, direction_args: tuple) -> None:
    """The control flow of a factored optimizer's host step (Adafactor, CAME), written once.

    ``whole[factored]`` (:class:`.dispatch.HostStep` per layout): the step in one graph, eager with
    ``reduce`` appended for a sharded tensor, else on ``backend``. 8-bit momentum splits it (inductor
    fused the block codec with the row/column reductions several times slower): ``direction[factored]``,
    then, if the flag (a CPU tensor: no device sync) is set, ``rest(backend, out)`` on its output.
    """
    if reduce is not None:
        whole[factored].eager(*whole_args, reduce)
    elif quantized:
        out = direction[factored].on(backend)(*direction_args)
        if flag.item():
            rest(backend, out)
    else:
        whole[factored].on(backend)(*whole_args)


@functools.lru_cache(maxsize=4096)
def split_reciprocal(d: int) -> tuple[float, float]:
    """``1 / d`` as two fp32 values ``(hi, lo)``, ``hi + lo`` within ``2**-48`` of it (for :func:`row_of`)."""
    hi = float(torch.tensor(1.0 / d, dtype=torch.float32))
    return hi, float(torch.tensor(1.0 / d - hi, dtype=torch.float32))


def index_args(R: int, C: int) -> tuple[float, float, float, float]:
    """``(1/C hi, 1/C lo, 1/R hi, 1/R lo)``: the runtime arguments :func:`factored_u` turns flat element
    offsets of a ``(B, R, C)`` tensor into rows and batches with."""
    return (*split_reciprocal(C), *split_reciprocal(R))


def launch_finalize(colpart, vc, vr, rsum_part, flag, step, *, decay: float, one_minus_decay: float,
                    beta_from_step: bool, n_rt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 2 (:func:`sq_finalize_kernel`): column EMA into ``vc`` (B, C); returns the factors
    ``(rf (B, R), cf (B, C))`` of the row statistic ``vr`` and the new ``vc`` (fp32 scratch)."""
    (B, R), C = vr.shape, vc.shape[1]
    rf = torch.empty(B, R, dtype=torch.float32, device=vr.device)
    cf = torch.empty(B, C, dtype=torch.float32, device=vr.device)
    sq_finalize_kernel[(B, triton.cdiv(max(R, C), FINALIZE_BLOCK))](
        colpart_ptr=colpart, vc_ptr=vc, vr_ptr=vr, rsum_part_ptr=rsum_part, rf_ptr=rf, cf_ptr=cf, flag_ptr=flag,
        step_ptr=step, decay=decay, one_minus_decay=one_minus_decay, beta_from_step=int(beta_from_step), R=R, C=C,
        n_rt=n_rt, BLOCK=FINALIZE_BLOCK, num_warps=ONE_WARP, enable_fp_fusion=False,
    )
    return rf, cf


def launch_second_moment(
    work, g, v, vc, step, flag, *, eps1: float, decay: float, one_minus_decay: float, beta_from_step: bool,
    with_psq: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Passes 1-3 (factored) or 1 (flat): update the second-moment statistics.

    Returns ``(rf, cf, usq_partials, psq_partials)``: ``rf`` (B, R) and ``cf`` (B, C) the row and
    column factors of ``u = (rf * cf) * g`` (factored; None when flat), ``usq_partials`` the partial
    sums of ``u^2``, ``psq_partials`` the partial sums of ``p^2`` (None unless ``with_psq``).
    """
    dev = work.device
    if vc is not None:
        B, R, C = work.shape
        block_r, block_c = tile_shape(C)
        n_rt = triton.cdiv(R, block_r)
        colpart = torch.empty(B * n_rt, C, dtype=torch.float32, device=dev)
        rsum_part = torch.empty(B * n_rt, dtype=torch.float32, device=dev)
        psq_part = torch.empty(B * n_rt, dtype=torch.float32, device=dev) if with_psq else None
        sq_stats_kernel[(B * n_rt,)](
            g_ptr=g, p_ptr=work, vr_ptr=v, colpart_ptr=colpart, rsum_part_ptr=rsum_part,
            psq_part_ptr=rsum_part if psq_part is None else psq_part, flag_ptr=flag, step_ptr=step, eps1=eps1,
            decay=decay, one_minus_decay=one_minus_decay, beta_from_step=int(beta_from_step), R=R, C=C, n_rt=n_rt,
            WITH_PSQ=with_psq, BLOCK_R=block_r, BLOCK_C=block_c, enable_fp_fusion=False,
        )
        rf, cf = launch_finalize(colpart, vc, v, rsum_part, flag, step, decay=decay, one_minus_decay=one_minus_decay,
                                 beta_from_step=beta_from_step, n_rt=n_rt)
        usq_part = torch.empty(B * n_rt, dtype=torch.float32, device=dev)
        clip_stats_kernel[(B * n_rt,)](
            g_ptr=g, rf_ptr=rf, cf_ptr=cf, usq_part_ptr=usq_part, R=R, C=C, n_rt=n_rt, BLOCK_R=block_r,
            BLOCK_C=block_c, enable_fp_fusion=False,
        )
        return rf, cf, usq_part, psq_part
    n = work.numel()
    nprog = triton.cdiv(n, FLAT_BLOCK)
    usq_part = torch.empty(nprog, dtype=torch.float32, device=dev)
    psq_part = torch.empty(nprog, dtype=torch.float32, device=dev) if with_psq else None
    full_stats_kernel[(nprog,)](
        g_ptr=g, p_ptr=work, v_ptr=v, usq_part_ptr=usq_part, psq_part_ptr=usq_part if psq_part is None else psq_part,
        flag_ptr=flag, step_ptr=step, n=n, eps1=eps1, decay=decay, one_minus_decay=one_minus_decay,
        beta_from_step=int(beta_from_step), WITH_PSQ=with_psq, BLOCK=FLAT_BLOCK, enable_fp_fusion=False,
    )
    return None, None, usq_part, psq_part
