"""Row/column second-moment statistics shared by the factored optimizers (:mod:`.adafactor`, :mod:`.came`).

Math (Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", ICML 2018,
section 3; CAME applies it to its instability statistic too). A tensor of >= 2 dims is viewed as
``(B, R, C)`` (leading dims a batch); ``q`` is the statistic's input, e.g. ``g * g + eps1``; fp32::

    vr = beta * vr + (1 - beta) * mean_C(q)       (B, R)   row statistics
    vc = beta * vc + (1 - beta) * mean_R(q)       (B, C)   column statistics
    u  = (1 / sqrt(vr / mean_R(vr)))[:, None] * (1 / sqrt(vc))[None, :] * g
    d  = max(1, rms(u) / clip_threshold)                   update clipping
    (1-D: v = beta * v + (1 - beta) * q, u = g / sqrt(v), v full size)

The statistics passes (deterministic partial sums, no atomics) are listed in :mod:`.adafactor`. Every
pass is one launch for all tensors of a group (:func:`group_key`: same dtypes, layout, tile shape and
momentum form): an int64 launch table (one column per tensor: pointers, sizes, offsets into one fp32
scratch, fp32 constants as bit patterns; rows ``F_*``) and, per pass, a map from program to tensor
(:func:`plan_group`), as :mod:`.multitensor` does for AdamW. So a step of a model's matrices is five
launches (Adafactor) or seven (CAME), and its 1-D tensors three, however many tensors there are. The
per-element passes only multiply (the factors are precomputed per row and column; the 1-D path's
``inv_sqrt`` is branch-free and correctly rounded), so their SASS has no slow-path ``CALL``. The
``@triton.jit`` helpers are the building blocks of the optimizers' update kernels; each has a
``*_reference`` twin that the step functions call, the same fp32 operations.

File order: Triton helpers and kernels, PyTorch references, launchers.
"""

from __future__ import annotations

import functools
import math
import struct
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .aot import dtype_variants, runtime_params, signature_of
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
from .dispatch import triton_dtype
from .multitensor import copy_back, is_aligned, launch_table, table_pointer, tile_map
from .rounding import masked_reference

__all__ = ["TILES", "UPDATE_ROWS", "UPDATE_WARPS", "STATS_WARPS", "tile_shape", "factored_shape", "state_views",
           "run_host_step", "GroupPlan", "plan_group", "launch_direction", "launch_finalize", "launch_update",
           "group_key", "group_spec", "split_reciprocal", "factored_index", "factored_scale",
           "div_rn", "inv_sqrt", "row_of", "factored_stats_reference", "factored_scale_reference",
           "clip_divisor_reference", "momentum_update_reference", "second_moment_reference", "write_back"]

TILE_ELEMENTS = 8192
"""Elements of one (BLOCK_R x BLOCK_C) tile of the row/column statistics kernels (64 x 128 for wide
matrices: 4 / 64 = 0.06 B/param of column partials, and 64 times fewer partial rows than elements)."""

TILES = ((64, 128), (128, 64), (256, 32), (512, 16))
"""(BLOCK_R, BLOCK_C) variants of the statistics kernels: BLOCK_C follows the column count so narrow
matrices (1000 x 3) do not run mostly-masked tiles."""

STATS_WARPS = 8
"""Warps per program of the row-tile statistics kernels (32 elements per thread of a 64 x 128 tile)."""

FINALIZE_BLOCK = 256
"""Columns (and rows) per program of the finalize kernel (:data:`FINALIZE_WARPS` warps: 4 consecutive
columns per thread, so its per-column loads and stores are vectors)."""

FINALIZE_ROWS = 8
"""Column partials the finalize kernel adds at once (a ``FINALIZE_ROWS x FINALIZE_BLOCK`` tile per
iteration, summed over its rows at the end: a two-level sum, not ``n_rt`` dependent adds per column)."""

FINALIZE_WARPS = 2
"""Warps per program of the finalize kernel."""

UPDATE_ROWS = 8
"""Codec blocks (of 256 elements) per program of the update kernels: 2048 elements, 8 times fewer
programs than one block each; the 8-bit momentum's per-block absmax is a row reduction of the tile."""

UPDATE_WARPS = 4
"""Warps per program of the update kernels (16 elements per thread, moved as vectors when aligned)."""

FLAT_BLOCK = 1024
"""Elements per program of the 1-D statistics kernel."""

# Rows of the int64 launch table (one column per tensor of a group), see :func:`plan_group`. Float
# entries (``1 / C``, ``1 / R`` as hi + lo, ``sqrt(numel)``) are stored as their fp32 bit patterns.
F_P, F_G, F_V, F_VC, F_M, F_ABSMAX, F_STEP, F_FLAG, F_SR, F_SC = (tl.constexpr(i) for i in range(10))
F_N, F_R, F_C, F_NRT, F_RT, F_CP, F_ROFF, F_COFF, F_FIN, F_UPD = (tl.constexpr(i) for i in range(10, 20))
F_TIDX, F_ELR, F_INVC_HI, F_INVC_LO, F_INVR_HI, F_INVR_LO, F_SQRTN, F_NPART = (tl.constexpr(i) for i in range(20, 28))
TABLE_ROWS = 28


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
def tfield(table_ptr, T, t, F: tl.constexpr):
    """Entry ``F`` (a row of the launch table, int64) of tensor ``t``."""
    return tl.load(table_ptr + F * T + t)


@triton.jit
def tfloat(table_ptr, T, t, F: tl.constexpr):
    """Entry ``F`` of tensor ``t`` read as the fp32 whose bit pattern it holds."""
    return tl.load(table_ptr + F * T + t).to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def owner_of(owner_ptr, table_ptr, T, F_FIRST: tl.constexpr):
    """``(t, local)``: the tensor this program works on (the pass's tile -> tensor map) and its tile
    index inside that tensor (the program id minus the tensor's first tile, table row ``F_FIRST``)."""
    pid = tl.program_id(0)
    t = tl.load(owner_ptr + pid).to(tl.int64)
    return t, pid - tfield(table_ptr, T, t, F_FIRST).to(tl.int32)


@triton.jit
def sizes_of(table_ptr, T, t, ALIGNED: tl.constexpr):
    """``(R, C, n_rt)`` of tensor ``t`` (int32; ``C`` a known multiple of 16 when ``ALIGNED``)."""
    C = tfield(table_ptr, T, t, F_C).to(tl.int32)
    if ALIGNED:
        C = tl.multiple_of(C, 16)
    return tfield(table_ptr, T, t, F_R).to(tl.int32), C, tfield(table_ptr, T, t, F_NRT).to(tl.int32)


@triton.jit
def index_floats(table_ptr, T, t):
    """``(1/C hi, 1/C lo, 1/R hi, 1/R lo)`` of tensor ``t``: what :func:`row_of` divides by."""
    return (tfloat(table_ptr, T, t, F_INVC_HI), tfloat(table_ptr, T, t, F_INVC_LO),
            tfloat(table_ptr, T, t, F_INVR_HI), tfloat(table_ptr, T, t, F_INVR_LO))


@triton.jit
def factored_index(offs, blocks, C, inv_c_hi, inv_c_lo, inv_r_hi, inv_r_lo, ROW_BLOCKS: tl.constexpr,
                   BLOCK: tl.constexpr):
    """``(ridx, cidx)`` of the ``(ROWS, BLOCK)`` flat element offsets ``offs`` (codec ``blocks``) of a ``(B,
    R, C)`` tensor: the global row ``b * R + r`` (into ``B * R`` row factors) and the column index ``b * C
    + c`` (into ``B * C`` column factors). ``ROW_BLOCKS`` (``C % BLOCK == 0``: every codec block lies in
    one row): ``ridx`` per block (``ROWS``), from the block's first element only, and ``cidx`` contiguous
    from a multiple of ``BLOCK`` (vector loads); else both per element."""
    if ROW_BLOCKS:  # one return: the branches' shapes differ (the compiler checks every return)
        start = blocks * BLOCK
        grow = row_of(start, inv_c_hi, inv_c_lo)
        b = row_of(grow, inv_r_hi, inv_r_lo)
        cbase = tl.multiple_of(b * C + (start - grow * C), BLOCK)
        cidx = cbase[:, None] + tl.arange(0, BLOCK)[None, :]
    else:
        grow = row_of(offs, inv_c_hi, inv_c_lo)  # b * R + r
        b = row_of(grow, inv_r_hi, inv_r_lo)
        cidx = b * C + (offs - grow * C)
    return grow, cidx


@triton.jit
def factored_scale(x, ridx, cidx, mask, bmask, rf_ptr, cf_ptr, ROW_BLOCKS: tl.constexpr):
    """``(rf[ridx] * cf[cidx]) * x`` (:func:`factored_index`): gathers and two multiplies per element, no
    division (``ROW_BLOCKS``: one row factor per codec block, broadcast over its elements)."""
    if ROW_BLOCKS:
        rf = tl.load(rf_ptr + ridx, mask=bmask, other=0.0)[:, None]
    else:
        rf = tl.load(rf_ptr + ridx, mask=mask, other=0.0)
    cf = tl.load(cf_ptr + cidx, mask=mask, other=0.0)
    return (rf * cf) * x


@triton.jit
def tile_factors(table_ptr, T, t, offs, blocks, ROW_BLOCKS: tl.constexpr, BLOCK: tl.constexpr):
    """``(ridx, cidx, roff, coff)``: :func:`factored_index` of tensor ``t``'s elements ``offs`` and the
    tensor's offsets into the group's row and column factor arrays."""
    C = tfield(table_ptr, T, t, F_C).to(tl.int32)
    if ROW_BLOCKS:
        C = tl.multiple_of(C, BLOCK)
    inv_c_hi, inv_c_lo, inv_r_hi, inv_r_lo = index_floats(table_ptr, T, t)
    ridx, cidx = factored_index(offs, blocks, C, inv_c_hi, inv_c_lo, inv_r_hi, inv_r_lo, ROW_BLOCKS, BLOCK)
    roff = tfield(table_ptr, T, t, F_ROFF)
    coff = tl.multiple_of(tfield(table_ptr, T, t, F_COFF), 16)  # regions start on 16 elements (_offsets)
    return ridx, cidx, roff, coff


@triton.jit
def update_tile(table_ptr, owner_ptr, T, ALIGNED: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """This update program's ``ROWS`` codec blocks of its tensor: ``(t, blocks, offs, finite, mask, bmask)``
    with ``offs`` the ``(ROWS, BLOCK)`` element offsets, ``mask`` empty when the gradient is not finite
    (flag 0) and ``bmask`` the blocks that exist and are written (``finite`` and inside the tensor)."""
    t, local = owner_of(owner_ptr, table_ptr, T, F_UPD)
    n = tfield(table_ptr, T, t, F_N)
    finite = tl.load(table_pointer(table_ptr, T, t, F_FLAG, tl.float32, False)) != 0.0
    n_write = tl.where(finite, n, 0)
    if ALIGNED:
        n_write = tl.multiple_of(n_write, 16)
    blocks = local.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    offs = blocks[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    return t, blocks, offs, finite, offs < n_write, blocks * BLOCK < n_write


@triton.jit
def tile_direction(table_ptr, owner_ptr, T, rf_ptr, cf_ptr, GRAD_DTYPE: tl.constexpr, FACTORED: tl.constexpr,
                   ALIGNED: tl.constexpr, ROW_BLOCKS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """:func:`update_tile` and the unclipped update ``u`` of its elements: ``(rf * cf) * g`` (factored;
    the group's factor arrays, at the tensor's offsets) or ``g / sqrt(v)`` (``v`` full size). Returns
    ``(t, blocks, offs, finite, mask, bmask, u)``."""
    t, blocks, offs, finite, mask, bmask = update_tile(table_ptr, owner_ptr, T, ALIGNED, ROWS, BLOCK)
    g_ptr = table_pointer(table_ptr, T, t, F_G, GRAD_DTYPE, ALIGNED)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if FACTORED:
        ridx, cidx, roff, coff = tile_factors(table_ptr, T, t, offs, blocks, ROW_BLOCKS, BLOCK)
        u = factored_scale(g, ridx, cidx, mask, bmask, rf_ptr + roff, cf_ptr + coff, ROW_BLOCKS)
    else:
        v_ptr = table_pointer(table_ptr, T, t, F_V, tl.float32, ALIGNED)
        u = inv_sqrt(tl.load(v_ptr + offs, mask=mask, other=1.0)) * g
    return t, blocks, offs, finite, mask, bmask, u


@triton.jit
def momentum_tile(table_ptr, T, t, blocks, offs, mask, bmask, finite, u, beta1, one_minus_beta1,
                  QUANTIZED: tl.constexpr, ALIGNED: tl.constexpr):
    """``m = beta1 * m + (1 - beta1) * u`` over ``(ROWS, 256)`` codec blocks, stored back as fp32 or as int8
    codes with a new absmax per block (a row reduction: the row's max ``|m|``); returns the fp32 ``m``."""
    if QUANTIZED:
        m_ptr = table_pointer(table_ptr, T, t, F_M, tl.int8, ALIGNED)
        absmax_ptr = table_pointer(table_ptr, T, t, F_ABSMAX, tl.float32, False)
        scale = tl.load(absmax_ptr + blocks, mask=bmask, other=0.0)
        old = decode_signed(tl.load(m_ptr + offs, mask=mask, other=0), scale[:, None])
        m = tl.where(mask, ema(old, u, beta1, one_minus_beta1), 0.0)
        absmax = tl.max(tl.abs(m), axis=1)
        tl.store(m_ptr + offs, encode_signed(m, absmax[:, None]), mask=mask)
        tl.store(absmax_ptr + blocks, absmax, mask=bmask)
    else:
        m_ptr = table_pointer(table_ptr, T, t, F_M, tl.float32, ALIGNED)
        m = ema(tl.load(m_ptr + offs, mask=mask, other=0.0), u, beta1, one_minus_beta1)
        tl.store(m_ptr + offs, m, mask=mask)
    return m


@triton.jit
def row_tile(table_ptr, owner_ptr, T, BLOCK_R: tl.constexpr, ALIGNED: tl.constexpr):
    """This program's tile of a ``(B, R, C)`` statistics pass: ``(t, rt, local, b, rmask, grow, R, C)``:
    its tensor, its global row-tile index (into the group's per-tile partial sums), its tile index inside
    the tensor, its batch, the row mask, the global row ids ``b * R + row`` of its ``BLOCK_R`` rows, and
    ``R``, ``C``."""
    t, local = owner_of(owner_ptr, table_ptr, T, F_RT)
    R, C, n_rt = sizes_of(table_ptr, T, t, ALIGNED)
    b = local // n_rt
    rows = (local - b * n_rt) * BLOCK_R + tl.arange(0, BLOCK_R)
    rt = tfield(table_ptr, T, t, F_RT) + local
    return t, rt, local, b, rows < R, b.to(tl.int64) * R + rows, R, C


@triton.jit
def col_tile(grow, rmask, c0, C, BLOCK_C: tl.constexpr):
    """Columns ``c0 .. c0 + BLOCK_C`` of a row tile: ``(cols, cmask, m2, offs)``, with ``m2`` the 2-D mask
    and ``offs`` the element offsets ``grow * C + col`` of the tile in a row-major ``(B * R, C)`` tensor."""
    cols = c0 + tl.arange(0, BLOCK_C)
    cmask = cols < C
    return cols, cmask, rmask[:, None] & cmask[None, :], grow[:, None] * C + cols[None, :]


@triton.jit
def colpart_row(colpart_ptr, table_ptr, T, t, local, C):
    """Where row tile ``local`` of tensor ``t`` stores its ``C`` column partial sums (the tensor's region
    starts on 16 elements, :func:`_offsets`)."""
    return colpart_ptr + tl.multiple_of(tfield(table_ptr, T, t, F_CP), 16) + local.to(tl.int64) * C


@triton.jit
def store_row_ema(stat_ptr, part_ptr, grow, rmask, row_sum, C, beta, one_minus_beta, finite):
    """Row statistic ``stat = beta * stat + (1 - beta) * row_sum / C`` (unchanged for a non-finite
    gradient) and this tile's partial sum of the new values (for ``mean_R``) at ``part_ptr``."""
    old = tl.load(stat_ptr + grow, mask=rmask, other=0.0)
    new = ema(old, div_rn(row_sum, C.to(tl.float32)), beta, one_minus_beta)
    new = tl.where(finite, new, old)
    tl.store(stat_ptr + grow, new, mask=rmask)
    tl.store(part_ptr, tl.sum(tl.where(rmask, new, 0.0), axis=0))


@triton.jit
def step_and_flag(table_ptr, T, t):
    """``(step, finite)`` of tensor ``t``: its step counter (fp32) and whether its gradient is finite."""
    step = tl.load(table_pointer(table_ptr, T, t, F_STEP, tl.float32, False))
    return step, tl.load(table_pointer(table_ptr, T, t, F_FLAG, tl.float32, False)) != 0.0


# --------------------------------------------------------------------------------------------------
# Triton kernels: the statistics passes, one launch per pass for every tensor of a group
# --------------------------------------------------------------------------------------------------


@triton.jit
def sq_stats_kernel(
    table_ptr, owner_ptr, T, colpart_ptr, rsum_part_ptr, psq_part_ptr, eps1, decay, one_minus_decay, beta_from_step,
    WITH_PSQ: tl.constexpr, PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Pass 1 (factored): row EMA ``vr``, column partial sums of ``q = g*g + eps1`` per row tile, and the
    partial sums of ``p^2`` (``WITH_PSQ``). Program = one tile of ``BLOCK_R`` rows over all columns of one
    tensor of the group (the launch table's tile map)."""
    t, rt, local, b, rmask, grow, R, C = row_tile(table_ptr, owner_ptr, T, BLOCK_R, ALIGNED)
    g_ptr = table_pointer(table_ptr, T, t, F_G, GRAD_DTYPE, ALIGNED)
    p_ptr = table_pointer(table_ptr, T, t, F_P, PARAM_DTYPE, ALIGNED)
    cp_ptr = colpart_row(colpart_ptr, table_ptr, T, t, local, C)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    psq = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols, cmask, m2, offs = col_tile(grow, rmask, c0, C, BLOCK_C)
        g = tl.load(g_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        q = tl.where(m2, g * g + eps1, 0.0)
        acc += tl.sum(q, axis=1)
        tl.store(cp_ptr + cols, tl.sum(q, axis=0), mask=cmask)
        if WITH_PSQ:
            p = tl.load(p_ptr + offs, mask=m2, other=0.0).to(tl.float32)
            psq += tl.sum(p * p, axis=1)
    step, finite = step_and_flag(table_ptr, T, t)
    beta, omb = beta_of_step(step, decay, one_minus_decay, beta_from_step)
    v_ptr = table_pointer(table_ptr, T, t, F_V, tl.float32, False)
    store_row_ema(v_ptr, rsum_part_ptr + rt, grow, rmask, acc, C, beta, omb, finite)
    if WITH_PSQ:
        tl.store(psq_part_ptr + rt, tl.sum(psq, axis=0))


@triton.jit
def sq_finalize_kernel(
    table_ptr, owner_ptr, T, colpart_ptr, rsum_part_ptr, rf_ptr, cf_ptr, decay, one_minus_decay, beta_from_step,
    VR_FIELD: tl.constexpr, VC_FIELD: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
    FROWS: tl.constexpr,
):
    """Pass 2 (factored): column EMA ``vc`` from the partials, then the factors the later passes
    multiply by: ``cf = 1 / sqrt(vc)`` (``B * C``) and ``rf = 1 / sqrt(vr / mean_R(vr))`` (``B * R``).
    Program ``(t, b, j)``: columns and rows ``j * BLOCK ..`` of batch ``b`` of tensor ``t``; the column
    partials are added ``FROWS`` at a time (a 2-D tile, summed over its rows at the end); each program
    sums the row partials of its batch itself (same loads, same order: every program gets the same
    ``mean_R``), so no pass waits for another. ``VR_FIELD``/``VC_FIELD``: the table rows of the
    statistics (``vr``/``vc``, or CAME's ``sr``/``sc``). O(R + C) work per tensor. ``ALIGNED``: column
    counts multiples of 16 (vector accesses; scratch regions start on 16 elements)."""
    t, local = owner_of(owner_ptr, table_ptr, T, F_FIN)
    R, C, n_rt = sizes_of(table_ptr, T, t, ALIGNED)
    nj = (tl.maximum(R, C) + BLOCK - 1) // BLOCK
    b = local // nj
    j = local - b * nj
    rt0 = tfield(table_ptr, T, t, F_RT) + b * n_rt
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for r0 in range(0, n_rt, BLOCK):
        idx = r0 + tl.arange(0, BLOCK)
        total += tl.load(rsum_part_ptr + rt0 + idx, mask=idx < n_rt, other=0.0)
    rmean = div_rn(tl.sum(total, axis=0), R.to(tl.float32))
    step, finite = step_and_flag(table_ptr, T, t)
    cols = j * BLOCK + tl.arange(0, BLOCK)
    if j * BLOCK < C:
        cmask = cols < C
        base = colpart_row(colpart_ptr, table_ptr, T, t, b * n_rt, C)
        acc = tl.zeros([FROWS, BLOCK], dtype=tl.float32)
        for r0 in range(0, n_rt, FROWS):
            prow = r0 + tl.arange(0, FROWS)
            m2 = (prow < n_rt)[:, None] & cmask[None, :]
            acc += tl.load(base + prow.to(tl.int64)[:, None] * C + cols[None, :], mask=m2, other=0.0)
        beta, omb = beta_of_step(step, decay, one_minus_decay, beta_from_step)
        cidx = b.to(tl.int64) * C + cols
        vc_ptr = table_pointer(table_ptr, T, t, VC_FIELD, tl.float32, ALIGNED)
        old = tl.load(vc_ptr + cidx, mask=cmask, other=0.0)
        new = tl.where(finite, ema(old, div_rn(tl.sum(acc, axis=0), R.to(tl.float32)), beta, omb), old)
        tl.store(vc_ptr + cidx, new, mask=cmask)
        tl.store(cf_ptr + tl.multiple_of(tfield(table_ptr, T, t, F_COFF), 16) + cidx, inv_sqrt(new), mask=cmask)
    if j * BLOCK < R:
        rmask = cols < R
        ridx = b.to(tl.int64) * R + cols
        vr = tl.load(table_pointer(table_ptr, T, t, VR_FIELD, tl.float32, False) + ridx, mask=rmask, other=1.0)
        tl.store(rf_ptr + tfield(table_ptr, T, t, F_ROFF) + ridx, inv_sqrt(div_rn(vr, rmean)), mask=rmask)


@triton.jit
def clip_stats_kernel(
    table_ptr, owner_ptr, T, rf_ptr, cf_ptr, usq_part_ptr,
    GRAD_DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Pass 3 (factored): partial sums of ``u^2``, ``u = (rf * cf) * g``, one per tile of ``BLOCK_R`` rows."""
    t, rt, local, b, rmask, grow, R, C = row_tile(table_ptr, owner_ptr, T, BLOCK_R, ALIGNED)
    g_ptr = table_pointer(table_ptr, T, t, F_G, GRAD_DTYPE, ALIGNED)
    rf = tl.load(rf_ptr + tfield(table_ptr, T, t, F_ROFF) + grow, mask=rmask, other=0.0)
    cf_row = cf_ptr + tfield(table_ptr, T, t, F_COFF) + b.to(tl.int64) * C  # rows of one tile share a batch
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols, cmask, m2, offs = col_tile(grow, rmask, c0, C, BLOCK_C)
        g = tl.load(g_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        cf = tl.load(cf_row + cols, mask=cmask, other=0.0)
        u = tl.where(m2, (rf[:, None] * cf[None, :]) * g, 0.0)
        acc += tl.sum(u * u, axis=1)
    tl.store(usq_part_ptr + rt, tl.sum(acc, axis=0))


@triton.jit
def full_stats_kernel(
    table_ptr, owner_ptr, T, usq_part_ptr, psq_part_ptr, eps1, decay, one_minus_decay, beta_from_step,
    WITH_PSQ: tl.constexpr, PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Unfactored (1-D) pass: ``v`` EMA and partial sums of ``u^2 = (g / sqrt(v))^2`` (and ``p^2``), one
    program per ``BLOCK`` elements of one tensor of the group."""
    t, local = owner_of(owner_ptr, table_ptr, T, F_RT)
    rt = tfield(table_ptr, T, t, F_RT) + local
    n = tfield(table_ptr, T, t, F_N)
    if ALIGNED:
        n = tl.multiple_of(n, 16)
    offs = local.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(table_pointer(table_ptr, T, t, F_G, GRAD_DTYPE, ALIGNED) + offs, mask=mask, other=0.0).to(tl.float32)
    v_ptr = table_pointer(table_ptr, T, t, F_V, tl.float32, ALIGNED)
    old = tl.load(v_ptr + offs, mask=mask, other=1.0)
    step, finite = step_and_flag(table_ptr, T, t)
    beta, omb = beta_of_step(step, decay, one_minus_decay, beta_from_step)
    v = tl.where(finite, ema(old, g * g + eps1, beta, omb), old)
    tl.store(v_ptr + offs, v, mask=mask)
    u = tl.where(mask, inv_sqrt(v) * g, 0.0)
    tl.store(usq_part_ptr + rt, tl.sum(u * u, axis=0))
    if WITH_PSQ:
        p = tl.load(table_pointer(table_ptr, T, t, F_P, PARAM_DTYPE, ALIGNED) + offs, mask=mask, other=0.0)
        p = p.to(tl.float32)
        tl.store(psq_part_ptr + rt, tl.sum(p * p, axis=0))


@triton.jit
def scalars_kernel(
    table_ptr, T, usq_part_ptr, psq_part_ptr, scal_ptr, elr_ptr, clip, lr, eps2, relative_step, warmup_init,
    scale_parameter, grad_sign,
    BLOCK: tl.constexpr,
):
    """Pass 4, one program per tensor ``t`` of the group: ``scal[4t:4t+4] = [lr_t, d, grad_sign / d,
    grad_sign * lr_t / d]`` from its partial sums (step size, clip divisor and the two scalars the update
    passes multiply ``u`` by, so they divide nothing per element and a maximized gradient costs nothing
    per element); ``elr <- lr_t`` for the tensor whose table entry asks for it. Adafactor's step-size rule
    (``relative_step``, ``warmup_init``, ``scale_parameter``; CAME passes 0, 0, 0: ``lr_t = lr``)."""
    t = tl.program_id(0).to(tl.int64)
    first = tfield(table_ptr, T, t, F_RT)
    n_part = tfield(table_ptr, T, t, F_NPART).to(tl.int32)
    sqrt_n = tfloat(table_ptr, T, t, F_SQRTN)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    pacc = tl.zeros([BLOCK], dtype=tl.float32)
    for i0 in range(0, n_part, BLOCK):
        idx = i0 + tl.arange(0, BLOCK)
        acc += tl.load(usq_part_ptr + first + idx, mask=idx < n_part, other=0.0)
        if scale_parameter != 0:
            pacc += tl.load(psq_part_ptr + first + idx, mask=idx < n_part, other=0.0)
    d = tl.maximum(tl.div_rn(tl.div_rn(tl.sqrt_rn(tl.sum(acc, axis=0)), sqrt_n), clip), 1.0)
    step = tl.load(table_pointer(table_ptr, T, t, F_STEP, tl.float32, False))
    min_step = tl.where(warmup_init != 0, 1e-6 * step, 1e-2)
    rel = tl.where(relative_step != 0, tl.minimum(min_step, inv_sqrt(step)), lr)
    scale = tl.where(scale_parameter != 0, tl.maximum(eps2, tl.div_rn(tl.sqrt_rn(tl.sum(pacc, axis=0)), sqrt_n)), 1.0)
    lr_t = scale * rel
    out = scal_ptr + 4 * t
    tl.store(out, lr_t)
    tl.store(out + 1, d)
    tl.store(out + 2, tl.div_rn(1.0, d) * grad_sign)
    tl.store(out + 3, tl.div_rn(lr_t, d) * grad_sign)
    if tfield(table_ptr, T, t, F_ELR) != 0:
        tl.store(elr_ptr, lr_t)


def tile_shape(cols: int) -> tuple[int, int]:
    """``(BLOCK_R, BLOCK_C)`` for a matrix of ``cols`` columns (one of :data:`TILES`)."""
    block_c = min(128, max(16, triton.next_power_of_2(cols)))
    return TILE_ELEMENTS // block_c, block_c


INT_TYPES = {
    "T": "i32", "relative_step": "i32", "warmup_init": "i32", "scale_parameter": "i32", "beta_from_step": "i32",
}
"""Triton types of the integer arguments of the factored kernels (others: fp32 scalars, ``*fp32`` pointers)."""


def group_spec(kernel, param: str, grad: str, aligned: bool, options: dict | None = None, m_ptr_type=None,
               **constexprs) -> tuple:
    """``(kernel, signature, constexprs, aligned, options)`` of one ahead-of-time variant of a group kernel:
    the launch table ``*i64``, the tile map ``*i32``, ``PARAM_DTYPE``/``GRAD_DTYPE`` where the kernel has
    them, ``ALIGNED`` (and then every pointer argument declared 16-byte aligned, as Triton's launcher
    finds them: fresh allocations, and scratch regions that start on 16 elements)."""
    sig = signature_of(kernel, INT_TYPES, table_ptr="*i64", **({"owner_ptr": "*i32"} if "owner_ptr" in
                                                                 runtime_params(kernel) else {}))
    names = set(kernel.arg_names)
    dtypes = {"PARAM_DTYPE": _TL[param], "GRAD_DTYPE": _TL[grad]}
    cx = {k: v for k, v in dtypes.items() if k in names} | constexprs
    if "ALIGNED" in names:
        cx["ALIGNED"] = aligned
    pointers = tuple(name for name in runtime_params(kernel) if name.endswith("_ptr"))
    return (kernel, sig, cx, pointers if aligned else (), options or {})


_TL = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}

AOT_SPECS = [
    spec
    for aligned in (False, True)
    for spec in (
        [group_spec(sq_stats_kernel, p, g, aligned, {"num_warps": STATS_WARPS}, WITH_PSQ=psq, BLOCK_R=br, BLOCK_C=bc)
         for p, g, (br, bc, psq) in dtype_variants((br, bc, psq) for psq in (False, True) for br, bc in TILES)]
        + [group_spec(full_stats_kernel, p, g, aligned, WITH_PSQ=psq, BLOCK=FLAT_BLOCK)
           for p, g, psq in dtype_variants((False, True))]
        + [group_spec(clip_stats_kernel, "fp32", g, aligned, {"num_warps": STATS_WARPS}, BLOCK_R=br, BLOCK_C=bc)
           for _, g, (br, bc) in dtype_variants(TILES)]
    )
] + [
    spec
    for aligned in (False, True)
    for spec in (
        group_spec(sq_finalize_kernel, "fp32", "fp32", aligned, {"num_warps": FINALIZE_WARPS}, VR_FIELD=F_V.value,
                   VC_FIELD=F_VC.value, BLOCK=FINALIZE_BLOCK, FROWS=FINALIZE_ROWS),
        group_spec(scalars_kernel, "fp32", "fp32", aligned, BLOCK=FLAT_BLOCK),
    )
]
"""(kernel, signature, constexprs, aligned, options) for every statistics kernel and variant in fp32, the
richest for the other dtype pairs; general and ``ALIGNED``."""

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


def _fp32_bits(x: float) -> int:
    """The bit pattern (as a signed int32) of ``x`` rounded to fp32: how the launch table holds floats."""
    return struct.unpack("<i", struct.pack("<f", x))[0]


def _kernel_grad(grad: torch.Tensor) -> torch.Tensor:
    return grad if grad.dtype in (torch.float32, torch.bfloat16, torch.float16) else grad.float()


def group_key(param: torch.Tensor, grad: torch.Tensor, vc: torch.Tensor | None, m: torch.Tensor | None,
              absmax: torch.Tensor | None) -> tuple:
    """What must be equal for tensors to share the launches of one group (:func:`plan_group`): param and
    kernel grad dtypes, factored or flat, the statistics tile shape (from the column count), whether every
    codec block lies in one row (``C % 256 == 0``, the update's ``ROW_BLOCKS``), the momentum form (none,
    fp32, int8) and, last, alignment (16-byte pointers, sizes and column counts multiples of 16)."""
    factored = vc is not None
    cols = param.shape[-1] if factored else 1
    aligned = is_aligned(param, grad, m) and (not factored or cols % 16 == 0)
    momentum = 0 if m is None else (2 if absmax is not None else 1)
    return (param.dtype, _kernel_grad(grad).dtype, factored, tile_shape(cols) if factored else None,
            factored and cols % BLOCK_SIZE == 0, momentum, aligned)


class GroupPlan(NamedTuple):
    """The launch table, tile maps and scratch of one group of tensors (:func:`plan_group`).

    ``table``: int64 ``(TABLE_ROWS, T)`` on the device (rows ``F_*``). ``rows``/``fin``/``upd``:
    ``(tile map, programs)`` of the row-tile (or 1-D tile) passes, the finalize pass and the update
    pass. ``ws``: fp32 scratch views ``colpart``, ``rsum``, ``psq``, ``usq``, ``rf``, ``cf``, ``scal``
    (4 per tensor), ``srf``, ``scf``. ``works``/``params``: the contiguous params the kernels update and
    the params they belong to (:meth:`copy_back`)."""

    table: torch.Tensor
    T: int
    rows: tuple
    fin: tuple
    upd: tuple
    ws: dict
    factored: bool
    tile: tuple
    row_blocks: bool
    aligned: bool
    param_dtype: object
    grad_dtype: object
    works: list
    params: list

    def copy_back(self) -> None:
        """Write params that were updated through contiguous copies back."""
        for param, work in zip(self.params, self.works):
            copy_back(param, work)


def _sizes(work: torch.Tensor, factored: bool) -> dict:
    """Per-tensor counts of a group: batch, rows, columns, row tiles, partials, programs, scratch sizes."""
    n = work.numel()
    upd = triton.cdiv(n, UPDATE_ROWS * BLOCK_SIZE)
    if not factored:
        parts = triton.cdiv(n, FLAT_BLOCK)
        return dict(n=n, B=1, R=1, C=1, n_rt=parts, parts=parts, cp=0, fin=0, rf=0, cf=0, upd=upd)
    B, R, C = factored_shape(work.shape)
    block_r, _ = tile_shape(C)
    n_rt = triton.cdiv(R, block_r)
    return dict(n=n, B=B, R=R, C=C, n_rt=n_rt, parts=B * n_rt, cp=B * n_rt * C,
                fin=B * triton.cdiv(max(R, C), FINALIZE_BLOCK), rf=B * R, cf=B * C, upd=upd)


def _offsets(counts: list[int]) -> tuple[list[int], int]:
    """Running offsets of regions of ``counts`` elements, each rounded up to 16 (aligned starts); total."""
    out, total = [], 0
    for count in counts:
        out.append(total)
        total += -(-count // 16) * 16
    return out, total


def _workspace(sizes: list[dict], T: int, device) -> tuple[dict, dict]:
    """One fp32 scratch allocation for a group, cut into its regions; and each tensor's region offsets."""
    cp_off, cp_total = _offsets([s["cp"] for s in sizes])
    rf_off, rf_total = _offsets([s["rf"] for s in sizes])
    cf_off, cf_total = _offsets([s["cf"] for s in sizes])
    _, parts = _offsets([sum(s["parts"] for s in sizes)])
    lengths = {"colpart": cp_total, "rsum": parts, "psq": parts, "usq": parts, "rf": rf_total, "cf": cf_total,
               "scal": -(-4 * T // 16) * 16, "srf": rf_total, "scf": cf_total}
    buf = torch.empty(sum(lengths.values()), dtype=torch.float32, device=device)
    ws, start = {}, 0
    for name, length in lengths.items():
        ws[name] = buf.narrow(0, start, length)
        start += length
    return ws, {"cp": cp_off, "rf": rf_off, "cf": cf_off}


def plan_group(params, grads, vs, vcs, ms, absmaxes, steps, flags, tensor_indices, write_elr=None, srs=None,
               scs=None) -> GroupPlan:
    """The launch table of one group of tensors (one :func:`group_key`): contiguous params and grads,
    pointers, sizes, per-pass tile maps (:func:`.multitensor.tile_map`) and one scratch allocation.
    ``write_elr[i]``: tensor ``i`` writes the step size (Adafactor); ``srs``/``scs``: CAME's instability
    statistics. No device synchronisation: the table is copied without one (:func:`.multitensor.launch_table`)."""
    device = params[0].device
    factored = vcs[0] is not None
    works = [p.contiguous() for p in params]
    grads = [_kernel_grad(g).contiguous() for g in grads]
    sizes = [_sizes(w, factored) for w in works]
    T = len(works)
    rows_owner, rt_first, n_rows = tile_map(tuple(s["parts"] for s in sizes), device, 1)
    fin_owner, fin_first, n_fin = tile_map(tuple(s["fin"] for s in sizes), device, 1)
    upd_owner, upd_first, n_upd = tile_map(tuple(s["upd"] for s in sizes), device, 1)
    ws, offs = _workspace(sizes, T, device)
    dummy = [f.data_ptr() for f in flags]

    def ptrs(tensors):
        return [dummy[i] if x is None else x.data_ptr() for i, x in enumerate(tensors)]

    inv = [(*split_reciprocal(s["C"]), *split_reciprocal(s["R"])) for s in sizes]
    table = [
        [w.data_ptr() for w in works], [g.data_ptr() for g in grads], ptrs(vs), ptrs(vcs), ptrs(ms), ptrs(absmaxes),
        ptrs(steps), ptrs(flags), ptrs(srs or [None] * T), ptrs(scs or [None] * T),
        [s["n"] for s in sizes], [s["R"] for s in sizes], [s["C"] for s in sizes], [s["n_rt"] for s in sizes],
        list(rt_first), offs["cp"], offs["rf"], offs["cf"], list(fin_first), list(upd_first),
        [int(i) for i in tensor_indices], [int(bool(x)) for x in (write_elr or [False] * T)],
        *([_fp32_bits(x[k]) for x in inv] for k in range(4)),
        [_fp32_bits(math.sqrt(s["n"])) for s in sizes], [s["parts"] for s in sizes],
    ]
    assert len(table) == TABLE_ROWS
    aligned = all(group_key(p, g, vc, m, a)[-1] for p, g, vc, m, a in zip(params, grads, vcs, ms, absmaxes))
    return GroupPlan(launch_table(table, device), T, (rows_owner, n_rows), (fin_owner, n_fin), (upd_owner, n_upd),
                     ws, factored, tile_shape(sizes[0]["C"]) if factored else (1, FLAT_BLOCK),
                     factored and sizes[0]["C"] % BLOCK_SIZE == 0, aligned,
                     triton_dtype(works[0].dtype), triton_dtype(grads[0].dtype), works, list(params))


def launch_finalize(plan: GroupPlan, rf: torch.Tensor, cf: torch.Tensor, *, fields: tuple[int, int], decay: float,
                    one_minus_decay: float, beta_from_step: bool) -> None:
    """Pass 2 (:func:`sq_finalize_kernel`) over every tensor of ``plan``: column EMA of the statistics in
    table rows ``fields`` (``(F_V, F_VC)`` or CAME's ``(F_SR, F_SC)``) from the group's column partials,
    factors into ``rf``/``cf`` (the group's scratch)."""
    owner, programs = plan.fin
    sq_finalize_kernel[(programs,)](
        table_ptr=plan.table, owner_ptr=owner, T=plan.T, colpart_ptr=plan.ws["colpart"], rsum_part_ptr=plan.ws["rsum"],
        rf_ptr=rf, cf_ptr=cf, decay=decay, one_minus_decay=one_minus_decay, beta_from_step=int(beta_from_step),
        VR_FIELD=fields[0], VC_FIELD=fields[1], ALIGNED=plan.aligned, BLOCK=FINALIZE_BLOCK, FROWS=FINALIZE_ROWS,
        num_warps=FINALIZE_WARPS, enable_fp_fusion=False,
    )


def launch_direction(plan: GroupPlan, *, eps1: float, decay: float, one_minus_decay: float, beta_from_step: bool,
                     clip: float, lr: float, eps2: float, rule: tuple[bool, bool, bool], grad_sign: float,
                     elr: torch.Tensor | None) -> torch.Tensor:
    """Passes 1-4, one launch each for the whole group (factored: statistics, finalize, clip statistics,
    scalars; 1-D: statistics, scalars). ``rule``: Adafactor's ``(relative_step, warmup_init,
    scale_parameter)`` (CAME: all False, ``lr_t = lr``); ``elr`` receives the step size of the tensors
    whose ``write_elr`` is set. Returns ``scal`` (``4 * T`` fp32: ``[lr_t, d, sign / d, sign * lr_t / d]``
    per tensor); the factors are in ``plan.ws["rf"]``/``["cf"]``."""
    ws, with_psq = plan.ws, rule[2]
    owner, programs = plan.rows
    common = dict(table_ptr=plan.table, owner_ptr=owner, T=plan.T)
    stats = dict(eps1=eps1, decay=decay, one_minus_decay=one_minus_decay, beta_from_step=int(beta_from_step),
                 WITH_PSQ=with_psq, PARAM_DTYPE=plan.param_dtype, GRAD_DTYPE=plan.grad_dtype, ALIGNED=plan.aligned,
                 enable_fp_fusion=False)
    if plan.factored:
        block_r, block_c = plan.tile
        sq_stats_kernel[(programs,)](**common, colpart_ptr=ws["colpart"], rsum_part_ptr=ws["rsum"],
                                     psq_part_ptr=ws["psq"], BLOCK_R=block_r, BLOCK_C=block_c,
                                     num_warps=STATS_WARPS, **stats)
        launch_finalize(plan, ws["rf"], ws["cf"], fields=(F_V.value, F_VC.value), decay=decay,
                        one_minus_decay=one_minus_decay, beta_from_step=beta_from_step)
        clip_stats_kernel[(programs,)](**common, rf_ptr=ws["rf"], cf_ptr=ws["cf"], usq_part_ptr=ws["usq"],
                                       GRAD_DTYPE=plan.grad_dtype, ALIGNED=plan.aligned, BLOCK_R=block_r,
                                       BLOCK_C=block_c, num_warps=STATS_WARPS, enable_fp_fusion=False)
    else:
        full_stats_kernel[(programs,)](**common, usq_part_ptr=ws["usq"], psq_part_ptr=ws["psq"], BLOCK=FLAT_BLOCK,
                                       **stats)
    relative_step, warmup_init, scale_parameter = rule
    scalars_kernel[(plan.T,)](
        table_ptr=plan.table, T=plan.T, usq_part_ptr=ws["usq"], psq_part_ptr=ws["psq"], scal_ptr=ws["scal"],
        elr_ptr=ws["scal"] if elr is None else elr, clip=clip, lr=lr, eps2=eps2, relative_step=int(relative_step),
        warmup_init=int(warmup_init), scale_parameter=int(scale_parameter), grad_sign=grad_sign, BLOCK=FLAT_BLOCK,
        enable_fp_fusion=False,
    )
    return ws["scal"]


def launch_update(kernel, plan: GroupPlan, scal: torch.Tensor, args: dict) -> None:
    """The last pass of a factored optimizer, one launch of ``kernel`` (Adafactor's or CAME's update) over
    every tensor of ``plan`` (:data:`UPDATE_ROWS` codec blocks per program), with the group's factors,
    ``scal`` and the family's own arguments ``args``; then params updated through copies are written back."""
    owner, programs = plan.upd
    kernel[(programs,)](
        table_ptr=plan.table, owner_ptr=owner, T=plan.T, rf_ptr=plan.ws["rf"], cf_ptr=plan.ws["cf"], scal_ptr=scal,
        FACTORED=plan.factored, PARAM_DTYPE=plan.param_dtype, GRAD_DTYPE=plan.grad_dtype, ALIGNED=plan.aligned,
        ROW_BLOCKS=plan.row_blocks, ROWS=UPDATE_ROWS, BLOCK=BLOCK_SIZE, num_warps=UPDATE_WARPS,
        enable_fp_fusion=False, **args,
    )
    plan.copy_back()
