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
pass is one launch for all tensors of a group (:func:`.factored_plan.group_key`: same dtypes, layout,
tile shape and momentum form): an int64 launch table (one column per tensor: pointers, sizes, offsets
into one fp32 scratch, fp32 constants as bit patterns; rows ``F_*``) and, per pass, a map from program
to tensor (:func:`.factored_plan.plan_group`), as :mod:`.multitensor` does for AdamW. So a step of a
model's matrices is five launches (Adafactor) or seven (CAME), and its 1-D tensors three, however many
tensors there are. The per-element passes only multiply (the factors are precomputed per row and
column; the 1-D path's ``inv_sqrt`` is branch-free and correctly rounded), so their SASS has no
slow-path ``CALL``. The ``@triton.jit`` helpers are the building blocks of the optimizers' update
kernels; each has a ``*_reference`` twin that the step functions call, the same fp32 operations.

Sharded tensors (DTensor shards, a ``SumReduce`` each; :func:`.factored_plan.shard_key`: split by rows or
1-D) run the same passes. Their partials are padded to the longest shard's tile count (extra programs store
zeros), so every rank's scratch has one layout, and after each pass that makes a partial sum covering the
whole tensor one ``all_reduce`` per group completes it (:meth:`.factored_plan.GroupPlan.complete`): after
pass 1 the column partials, the row-statistic partials (for ``mean_R``) and the ``p^2`` partials; after
pass 3 the ``u^2`` partials (1-D: with the ``p^2`` ones, after its one statistics pass); after CAME's
instability pass its column and row partials. Row sums need none (each rank holds whole rows); the
finalize divides by the global row count (``GLOBAL_R``). A tensor split along its columns or a batch dim
runs the eager reference.

Three modules hold the factored machinery: this one, the statistics passes (Triton helpers and
kernels, their AOT specs, the PyTorch references, the launchers of passes 1-4); :mod:`.factored_plan`,
the plan of a group (the launch table's rows and their Triton accessors, the tile geometry of every
pass, group keys, scratch, and the host step's layout); :mod:`.factored_update`, the building blocks of
the update kernels (direction, momentum), the momentum reference and the update launch.

File order: Triton helpers and kernels, AOT specs, PyTorch references, launchers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .aot import dtype_variants, runtime_params, signature_of
from .codec import div_rn_fast, rcp_rn, sqrt_rn_fast, sqrt_rn_reference
from .factored_plan import (
    F_COFF,
    F_CP,
    F_ELR,
    F_FIN,
    F_FLAG,
    F_G,
    F_N,
    F_NPART,
    F_P,
    F_RG,
    F_ROFF,
    F_RT,
    F_SQRTN,
    F_STEP,
    F_V,
    F_VC,
    FINALIZE_BLOCK,
    FINALIZE_ROWS,
    FINALIZE_WARPS,
    FLAT_BLOCK,
    STATS_WARPS,
    TILES,
    GroupPlan,
    owner_of,
    sizes_of,
    tfield,
    tfield16,
    tfloat,
)
from .multitensor import table_pointer

__all__ = ["launch_direction", "launch_finalize", "group_spec", "div_rn", "inv_sqrt", "row_of",
           "factored_stats_reference", "factored_scale_reference", "clip_divisor_reference",
           "second_moment_reference"]


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
    :func:`.factored_plan.split_reciprocal`). The half-integer ``offs + 0.5`` is at least ``0.5 / D`` from a multiple of
    ``D``, and the error, ``< offs * 2**-47 / D``, is smaller."""
    inv = tl.cast(inv_hi, tl.float64) + tl.cast(inv_lo, tl.float64)
    return tl.floor((offs.to(tl.float64) + 0.5) * inv).to(tl.int64)


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
    starts on 16 elements, :func:`.factored_plan._offsets`)."""
    return colpart_ptr + tfield16(table_ptr, T, t, F_CP) + local.to(tl.int64) * C


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
def mean_rows(table_ptr, T, t, R, GLOBAL_R: tl.constexpr):
    """The row count ``mean_R`` divides by (fp32): the local ``R``, or with ``GLOBAL_R`` (a sharded group) the
    global one (table row ``F_RG``). Called at each division, so an unsharded launch compiles as it did."""
    if GLOBAL_R:
        return tfield(table_ptr, T, t, F_RG).to(tl.float32)
    else:
        return R.to(tl.float32)


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
    FROWS: tl.constexpr, GLOBAL_R: tl.constexpr = False,
):
    """Pass 2 (factored): column EMA ``vc`` from the partials, then the factors the later passes
    multiply by: ``cf = 1 / sqrt(vc)`` (``B * C``) and ``rf = 1 / sqrt(vr / mean_R(vr))`` (``B * R``).
    Program ``(t, b, j)``: columns and rows ``j * BLOCK ..`` of batch ``b`` of tensor ``t``; the column
    partials are added ``FROWS`` at a time (a 2-D tile, summed over its rows at the end); each program
    sums the row partials of its batch itself (same loads, same order: every program gets the same
    ``mean_R``), so no pass waits for another. ``VR_FIELD``/``VC_FIELD``: the table rows of the
    statistics (``vr``/``vc``, or CAME's ``sr``/``sc``). O(R + C) work per tensor. ``ALIGNED``: column
    counts multiples of 16 (vector accesses; scratch regions start on 16 elements). ``GLOBAL_R`` (sharded
    groups): the partials hold every rank's sums and the means divide by the global row count (table row
    ``F_RG``); the local ``R`` still bounds this rank's rows."""
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
    rmean = div_rn(tl.sum(total, axis=0), mean_rows(table_ptr, T, t, R, GLOBAL_R))
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
        new = tl.where(finite, ema(old, div_rn(tl.sum(acc, axis=0), mean_rows(table_ptr, T, t, R, GLOBAL_R)), beta,
                                   omb), old)
        tl.store(vc_ptr + cidx, new, mask=cmask)
        tl.store(cf_ptr + tfield16(table_ptr, T, t, F_COFF) + cidx, inv_sqrt(new), mask=cmask)
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
    if ALIGNED:
        n = tfield16(table_ptr, T, t, F_N)
    else:
        n = tfield(table_ptr, T, t, F_N)
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
        *(group_spec(sq_finalize_kernel, "fp32", "fp32", aligned, {"num_warps": FINALIZE_WARPS}, VR_FIELD=F_V.value,
                     VC_FIELD=F_VC.value, BLOCK=FINALIZE_BLOCK, FROWS=FINALIZE_ROWS, **sharded)
          for sharded in ({}, {"GLOBAL_R": True})),
        group_spec(scalars_kernel, "fp32", "fp32", aligned, BLOCK=FLAT_BLOCK),
    )
]
"""(kernel, signature, constexprs, aligned, options) for every statistics kernel and variant in fp32, the
richest for the other dtype pairs; general and ``ALIGNED``; the finalize also as sharded groups run it
(``GLOBAL_R``; the unsharded spec leaves it at its default, so its code is unchanged)."""


# --------------------------------------------------------------------------------------------------
# PyTorch references of the shared pieces (used by the step functions of Adafactor and CAME)
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Launchers of the statistics passes
# --------------------------------------------------------------------------------------------------


def launch_finalize(plan: GroupPlan, rf: torch.Tensor, cf: torch.Tensor, *, fields: tuple[int, int], decay: float,
                    one_minus_decay: float, beta_from_step: bool) -> None:
    """Pass 2 (:func:`sq_finalize_kernel`) over every tensor of ``plan``: column EMA of the statistics in
    table rows ``fields`` (``(F_V, F_VC)`` or CAME's ``(F_SR, F_SC)``) from the group's column partials,
    factors into ``rf``/``cf`` (the group's scratch). A sharded group's launch divides by the global row count
    (``GLOBAL_R``); an unsharded one's is launched exactly as before (no ``GLOBAL_R`` argument)."""
    owner, programs = plan.fin
    sharded = {} if plan.reduce is None else {"GLOBAL_R": True}
    sq_finalize_kernel[(programs,)](
        table_ptr=plan.table, owner_ptr=owner, T=plan.T, colpart_ptr=plan.ws["colpart"], rsum_part_ptr=plan.ws["rsum"],
        rf_ptr=rf, cf_ptr=cf, decay=decay, one_minus_decay=one_minus_decay, beta_from_step=int(beta_from_step),
        VR_FIELD=fields[0], VC_FIELD=fields[1], ALIGNED=plan.aligned, BLOCK=FINALIZE_BLOCK, FROWS=FINALIZE_ROWS,
        num_warps=FINALIZE_WARPS, enable_fp_fusion=False, **sharded,
    )


def launch_direction(plan: GroupPlan, *, eps1: float, decay: float, one_minus_decay: float, beta_from_step: bool,
                     clip: float, lr: float, eps2: float, rule: tuple[bool, bool, bool], grad_sign: float,
                     elr: torch.Tensor | None) -> torch.Tensor:
    """Passes 1-4, one launch each for the whole group (factored: statistics, finalize, clip statistics,
    scalars; 1-D: statistics, scalars). ``rule``: Adafactor's ``(relative_step, warmup_init,
    scale_parameter)`` (CAME: all False, ``lr_t = lr``); ``elr`` receives the step size of the tensors
    whose ``write_elr`` is set. Returns ``scal`` (``4 * T`` fp32: ``[lr_t, d, sign / d, sign * lr_t / d]``
    per tensor); the factors are in ``plan.ws["rf"]``/``["cf"]``. A sharded group's partial sums are completed
    across ranks after each pass that makes them (:meth:`.factored_plan.GroupPlan.complete`: one ``all_reduce``
    per pass), so the next pass reads the whole tensor's sums."""
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
        plan.complete("colpart", "rsum", *(("psq",) if with_psq else ()))
        launch_finalize(plan, ws["rf"], ws["cf"], fields=(F_V.value, F_VC.value), decay=decay,
                        one_minus_decay=one_minus_decay, beta_from_step=beta_from_step)
        clip_stats_kernel[(programs,)](**common, rf_ptr=ws["rf"], cf_ptr=ws["cf"], usq_part_ptr=ws["usq"],
                                       GRAD_DTYPE=plan.grad_dtype, ALIGNED=plan.aligned, BLOCK_R=block_r,
                                       BLOCK_C=block_c, num_warps=STATS_WARPS, enable_fp_fusion=False)
        plan.complete("usq")
    else:
        full_stats_kernel[(programs,)](**common, usq_part_ptr=ws["usq"], psq_part_ptr=ws["psq"], BLOCK=FLAT_BLOCK,
                                       **stats)
        plan.complete(*(("psq",) if with_psq else ()), "usq")
    relative_step, warmup_init, scale_parameter = rule
    scalars_kernel[(plan.T,)](
        table_ptr=plan.table, T=plan.T, usq_part_ptr=ws["usq"], psq_part_ptr=ws["psq"], scal_ptr=ws["scal"],
        elr_ptr=ws["scal"] if elr is None else elr, clip=clip, lr=lr, eps2=eps2, relative_step=int(relative_step),
        warmup_init=int(warmup_init), scale_parameter=int(scale_parameter), grad_sign=grad_sign, BLOCK=FLAT_BLOCK,
        enable_fp_fusion=False,
    )
    return ws["scal"]
