"""Fused AdamW step with 8-bit block-wise quantized moments (Triton kernel, reference, launcher).

Math (AdamW, Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019, with the
semantics of ``torch.optim.AdamW``), all in fp32, for step ``t`` (already advanced)::

    g   = grad * sign                      (sign = -1 when maximizing)
    p   = p * (1 - lr * weight_decay)
    m   = beta1 * m + (1 - beta1) * g
    v   = beta2 * v + (1 - beta2) * g * g
    p   = p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

The moments are stored block-wise quantized (Dettmers et al., "8-bit Optimizers via Block-wise
Quantization", ICLR 2022) with the companding code of :mod:`.codec`: ``m`` as int8 codes of the
signed code, ``v`` as uint8 codes of the unsigned code, each with one fp32 absmax per block of 256
elements. The parameter update uses the fp32 ``m, v`` *before* re-quantization; the new codes use a
new absmax per block. Tensors under ``MIN_QUANTIZED_NUMEL`` elements keep fp32 ``m, v`` (same
kernel, ``QUANTIZED=False``). bf16/fp16 params are written back with stochastic rounding
(:mod:`.rounding`).

``beta^t`` is computed by exponentiation by squaring on the integer step (24 fp32 multiplies, exact
for ``t < 2**24``), the same operations in the kernel and the reference, so both agree bit for bit
without a host sync: the step is a device tensor the kernel reads. It and the step scalars
(``step_size = lr / (1 - beta1^t)``, ``inv_bc2 = 1 / sqrt(1 - beta2^t)``, ``1 - lr * wd``,
``(1 - beta1) * sign``) are computed once per program, not per element.

Exactness at few instructions (issue 24): the fp32 operations, in order, are
``w = sqrt(max(v, 2**-100))``, ``denom = w * inv_bc2 + eps``, ``p - step_size * (m / denom)``, where
every square root and quotient is correctly rounded, computed branch-free by :mod:`.codec`'s
``sqrt_rn_fast`` / ``div_rn_fast`` / ``rcp_rn``: the instruction sequences of ptxas' own IEEE
``sqrt.rn`` / ``div.rn`` fast paths (MUFU + Newton/Markstein FMA steps), without their per-element
``FCHK`` + slow-path ``CALL`` (operands here are in the fast paths' range: ``v`` floored at 2**-100,
``denom >= eps``). The reference computes the same values with IEEE ``/`` and a correctly rounded
square root, so kernel and reference agree bit for bit (only the sign of a zero update may differ,
``-0 / d``, which changes no value). The floor moves ``sqrt(v)`` only below 8.9e-16 (= ulp(1e-8)).
The v-code reuses ``w`` (:func:`.codec.encode_unsigned_roots`), the block scales are reciprocals
computed once per block (codes: :mod:`.codec`). No slow-path ``CALL`` remains in the SASS
(``tests/test_kernels_sass.py``; counts in ``benchmarks/RESULTS.md``).

A tensor whose ``flag`` is 0 (non-finite gradient) is left untouched: no param, code or absmax is
written. Hyperparameters are runtime arguments (an LR schedule never recompiles).

One launch covers many tensors: a table of int64 data pointers (one column per tensor) and a
tile -> tensor map let each program find its tensor (:mod:`.multitensor`); :func:`.dispatch.dispatch`
groups them by device and by what changes the compiled kernel (``_launch_key``: quantized, aligned,
param dtype, grad dtype). The family registers as :data:`ADAMW_8BIT`. Two launch forms share the tile code
(:func:`_load_tile`, :func:`_update_tile`) and so compute the same bits: one program per tile
(``_adamw8bit_kernel``, the default) and persistent programs (``_adamw8bit_persistent_kernel``, chosen by
:func:`.multitensor.persistent` / ``LOWMEM_PERSISTENT_PROGRAMS_PER_SM``) that loop over the tiles and load the
next tile before computing the current one (issue 24; SASS evidence in ``benchmarks/RESULTS.md``).

File order: Triton kernel, PyTorch reference (named scalars and tensors first), launcher.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl

from .aot import signature_of
from .codec import (
    BLOCK_SIZE,
    decode_signed,
    decode_signed_reference,
    decode_unsigned,
    decode_unsigned_reference,
    div_rn_fast,
    encode_signed,
    encode_signed_reference,
    encode_unsigned_roots,
    encode_unsigned_roots_reference,
    rcp_rn,
    sqrt_floor,
    sqrt_floor_reference,
    sqrt_rn_fast,
    sqrt_rn_reference,
)
from .cpu_buckets import fold_seeds, gather_rows, per_tensor, plan
from .dispatch import Family, HostStep, packed, triton_dtype, unpack
from .multitensor import (
    PARAM_GRAD_DTYPE_PAIRS,
    PERSISTENT_TABLE_TYPES,
    aot_spec,
    as_fp32,
    is_aligned,
    launch_over,
    table_pointer,
    tile_header,
)
from .rounding import (
    SEED_MASK,
    SEED_STEP,
    device_seed,
    masked_reference,
    nearest_variant,
    seed_reference,
    store_param,
    write_param_reference,
)

__all__ = [
    "ROWS",
    "AdamWScalars",
    "AdamWTensors",
    "ADAMW_8BIT",
    "ADAMW_8BIT_NEAREST",
    "adamw8bit_step",
    "adamw32_step",
    "adamw_math",
    "step_terms_reference",
]

ROWS = 4
"""Quantization blocks per Triton program (a tile of ROWS x BLOCK_SIZE elements)."""

_POW_BITS = 24
"""Bits of the step used by ``beta ** step`` (fp32 step counters are exact below 2**24)."""




# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------


@triton.jit
def _beta_powers(beta1, beta2, step):
    """``(beta1 ** step, beta2 ** step)`` for an integer-valued fp32 ``step`` >= 0, by squaring.

    The same fp32 multiplies as the reference (which runs 24 rounds; rounds past the top bit of
    ``step`` change nothing), so both agree bit for bit.
    """
    e = step.to(tl.int32)
    r1 = beta1 * 0.0 + 1.0
    r2 = beta2 * 0.0 + 1.0
    while e > 0:
        odd = (e & 1) != 0
        r1 = tl.where(odd, r1 * beta1, r1)
        r2 = tl.where(odd, r2 * beta2, r2)
        beta1 = beta1 * beta1
        beta2 = beta2 * beta2
        e = e >> 1
    return r1, r2


@triton.jit
def _state_pointers(table_ptr, T, t, QUANTIZED: tl.constexpr, ALIGNED: tl.constexpr):
    """``(m, m_absmax, v, v_absmax)`` pointers of tensor ``t`` (fp32 state: the absmax pointers repeat m, v)."""
    if QUANTIZED:
        m_ptr = table_pointer(table_ptr, T, t, 2, tl.int8, ALIGNED)
        m_abs_ptr = table_pointer(table_ptr, T, t, 3, tl.float32, False)
        v_ptr = table_pointer(table_ptr, T, t, 4, tl.uint8, ALIGNED)
        v_abs_ptr = table_pointer(table_ptr, T, t, 5, tl.float32, False)
    else:
        m_ptr = table_pointer(table_ptr, T, t, 2, tl.float32, ALIGNED)
        m_abs_ptr = m_ptr
        v_ptr = table_pointer(table_ptr, T, t, 4, tl.float32, ALIGNED)
        v_abs_ptr = v_ptr
    return m_ptr, m_abs_ptr, v_ptr, v_abs_ptr


@triton.jit
def _tile_index(tile, n, n_write, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """``(offs, rows, in_bounds, write, row_in_bounds, row_write)`` of tile ``tile`` of a tensor of ``n`` elements
    (``n_write``: ``n``, or 0 when nothing may be written)."""
    rows = tile * ROWS + tl.arange(0, ROWS)  # block index inside the tensor, (ROWS,)
    offs = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]  # element index, (ROWS, BLOCK)
    # absmax rows: one per thread, scalar accesses at any alignment
    return offs, rows, offs < n, offs < n_write, rows * BLOCK < n, rows * BLOCK < n_write


@triton.jit
def _load_words(ptr, rows, n, BLOCK: tl.constexpr):
    """8-bit codes of whole blocks as int64 words ``(ROWS, BLOCK // 8)``, 8 codes each (0 outside the tensor):
    a register double buffer that carries the packed words unpacks them where they are used (carried as
    bytes, the compiler unpacked one set right after its load, waiting for the next tile's data)."""
    words = rows[:, None] * (BLOCK // 8) + tl.arange(0, BLOCK // 8)[None, :]
    return tl.load(ptr.to(tl.pointer_type(tl.int64)) + words, mask=words * 8 < n, other=0)


@triton.jit
def _unpack_words(words, DTYPE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """The ``(ROWS, BLOCK)`` codes of ``DTYPE`` (int8 / uint8) packed in :func:`_load_words`' words (little endian)."""
    shifts = (tl.arange(0, 8) * 8).to(tl.int64)
    codes = ((words[:, :, None] >> shifts[None, None, :]) & 0xFF).to(tl.uint8)
    return tl.reshape(codes, (ROWS, BLOCK)).to(DTYPE, bitcast=True)


@triton.jit
def _load_tile(p_ptr, g_ptr, m_ptr, m_abs_ptr, v_ptr, v_abs_ptr, tile, n, ROWS: tl.constexpr, BLOCK: tl.constexpr,
               QUANTIZED: tl.constexpr, PACKED: tl.constexpr = False):
    """The raw operands of a tile as stored: ``(p, g, m, v, m_scale, v_scale)`` (codes and block scales when
    ``QUANTIZED``, else fp32 moments and zero scales), 0 outside the tensor. ``PACKED`` (quantized, aligned):
    the codes as :func:`_load_words`' int64 words."""
    offs, rows, in_bounds, _, row_in_bounds, _ = _tile_index(tile, n, n, ROWS, BLOCK)
    p = tl.load(p_ptr + offs, mask=in_bounds, other=0.0)
    g = tl.load(g_ptr + offs, mask=in_bounds, other=0.0)
    if QUANTIZED:
        m_scale = tl.load(m_abs_ptr + rows, mask=row_in_bounds, other=0.0)
        v_scale = tl.load(v_abs_ptr + rows, mask=row_in_bounds, other=0.0)
        if PACKED:
            m = _load_words(m_ptr, rows, n, BLOCK)
            v = _load_words(v_ptr, rows, n, BLOCK)
        else:
            m = tl.load(m_ptr + offs, mask=in_bounds, other=0)
            v = tl.load(v_ptr + offs, mask=in_bounds, other=0)
    else:
        m_scale = tl.zeros((ROWS,), dtype=tl.float32)
        v_scale = tl.zeros((ROWS,), dtype=tl.float32)
        m = tl.load(m_ptr + offs, mask=in_bounds, other=0.0)
        v = tl.load(v_ptr + offs, mask=in_bounds, other=0.0)
    return p, g, m, v, m_scale, v_scale


@triton.jit
def _step_scalars(lr, beta1, beta2, step):
    """``(lr / (1 - beta1^t), 1 / sqrt(1 - beta2^t))`` of step ``t`` (== :func:`step_terms_reference`)."""
    beta1_t, beta2_t = _beta_powers(beta1, beta2, step)
    return div_rn_fast(lr, 1.0 - beta1_t), rcp_rn(sqrt_rn_fast(1.0 - beta2_t))


@triton.jit
def _update_tile(p_ptr, m_ptr, m_abs_ptr, v_ptr, v_abs_ptr, tile, n, n_write, seed, p, g, m, v, m_scale, v_scale,
                 step_size, inv_bc2, beta1, beta2, eps, decay, c1, c2, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                 QUANTIZED: tl.constexpr, STOCHASTIC: tl.constexpr, PACKED: tl.constexpr = False):
    """The AdamW step of one tile whose raw operands :func:`_load_tile` returned: math, param and state stores."""
    offs, rows, _, write, _, row_write = _tile_index(tile, n, n_write, ROWS, BLOCK)
    p = p.to(tl.float32)
    g = g.to(tl.float32)  # grad_sign: folded into c1
    if PACKED:
        m = _unpack_words(m, tl.int8, ROWS, BLOCK)
        v = _unpack_words(v, tl.uint8, ROWS, BLOCK)
    if QUANTIZED:
        m = decode_signed(m, m_scale[:, None])
        v = decode_unsigned(v, v_scale[:, None])
    p = p * decay
    m = beta1 * m + c1 * g
    v = beta2 * v + c2 * (g * g)
    w = sqrt_floor(v)  # sqrt(max(v, 2**-100)), correctly rounded, branch-free
    denom = w * inv_bc2 + eps
    p = p - step_size * div_rn_fast(m, denom)
    store_param(p_ptr, p, offs, write, seed, STOCHASTIC)
    if QUANTIZED:
        m_max = tl.max(tl.abs(m), axis=1)  # (ROWS,)
        v_max = tl.max(v, axis=1)
        inv_w_max = rcp_rn(sqrt_floor(v_max))  # == 1 / max(w): one reciprocal per row, not per element
        tl.store(m_ptr + offs, encode_signed(m, m_max[:, None]), mask=write)
        tl.store(v_ptr + offs, encode_unsigned_roots(w, inv_w_max[:, None]), mask=write)
        tl.store(m_abs_ptr + rows, m_max, mask=row_write)
        tl.store(v_abs_ptr + rows, v_max, mask=row_write)
    else:
        tl.store(m_ptr + offs, m, mask=write)
        tl.store(v_ptr + offs, v, mask=write)


@triton.jit
def _adamw8bit_kernel(
    table_ptr,  # int64 (11, T): param, grad, m, m_absmax, v, v_absmax, step, flag pointers; numel, tile, seed
    tile_owner_ptr,  # int32 (num_tiles,): tensor index of each program
    T,  # number of tensors in the table
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    grad_sign,
    PARAM_DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
    QUANTIZED: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr = False,
    STOCHASTIC: tl.constexpr = True,
):
    """One program per tile: loads, step scalars, update, stores (the non-persistent launch)."""
    lr = as_fp32(lr)
    beta1 = as_fp32(beta1)
    beta2 = as_fp32(beta2)
    eps = as_fp32(eps)
    weight_decay = as_fp32(weight_decay)
    grad_sign = as_fp32(grad_sign)
    t, p_ptr, g_ptr, step_ptr, n, n_write, tile, seed_base = tile_header(
        table_ptr, tile_owner_ptr, T, 4, PARAM_DTYPE, GRAD_DTYPE, ALIGNED)
    m_ptr, m_abs_ptr, v_ptr, v_abs_ptr = _state_pointers(table_ptr, T, t, QUANTIZED, ALIGNED)
    p, g, m, v, m_scale, v_scale = _load_tile(p_ptr, g_ptr, m_ptr, m_abs_ptr, v_ptr, v_abs_ptr, tile, n, ROWS, BLOCK,
                                              QUANTIZED)
    step = tl.load(step_ptr)
    seed = device_seed(step, seed_base)  # == rounding.step_seed(step, index, base)
    step_size, inv_bc2 = _step_scalars(lr, beta1, beta2, step)  # per program, == step_terms_reference
    decay = 1.0 - lr * weight_decay
    c1 = (1.0 - beta1) * grad_sign  # (1 - beta1) * (sign * g) == c1 * g bit for bit (sign is +-1)
    c2 = 1.0 - beta2
    _update_tile(p_ptr, m_ptr, m_abs_ptr, v_ptr, v_abs_ptr, tile, n, n_write, seed, p, g, m, v, m_scale, v_scale,
                 step_size, inv_bc2, beta1, beta2, eps, decay, c1, c2, ROWS, BLOCK, QUANTIZED, STOCHASTIC)


_FIRST_ROW = tl.constexpr(9)
"""Row of the launch table holding each tensor's first tile (:func:`.multitensor.launch_over`: param, grad, 4
state rows, step, flag, numel, first tile, seed)."""


@triton.jit
def _next_first(table_ptr, T, t, num_tiles):
    """First tile of tensor ``t + 1`` (``num_tiles`` past the last tensor)."""
    return tl.load(table_ptr + _FIRST_ROW * T + t + 1, mask=t + 1 < T, other=num_tiles)


@triton.jit
def _advance(table_ptr, T, t, next_first, tile_id, num_tiles):
    """``(t, next_first)`` of the tensor holding ``tile_id``, walking forward from tensor ``t`` (a program's tiles
    only increase): no table read while the tile stays in the same tensor."""
    while tile_id >= next_first:
        t = t + 1
        next_first = _next_first(table_ptr, T, t, num_tiles)
    return t, next_first


@triton.jit
def _header(table_ptr, T, t):
    """Tensor ``t``'s table entries: ``(p, g, m, m_absmax, v, v_absmax)`` addresses (int64), ``n``, ``n_write`` (0
    when its finite flag is 0), its first tile, its stochastic-rounding seed and its step counter."""
    step = tl.load(table_pointer(table_ptr, T, t, 6, tl.float32, False))
    n = tl.load(table_ptr + 8 * T + t)
    n_write = tl.where(tl.load(table_pointer(table_ptr, T, t, 7, tl.float32, False)) != 0.0, n, 0)
    return (tl.load(table_ptr + t), tl.load(table_ptr + T + t), tl.load(table_ptr + 2 * T + t),
            tl.load(table_ptr + 3 * T + t), tl.load(table_ptr + 4 * T + t), tl.load(table_ptr + 5 * T + t),
            n, n_write, tl.load(table_ptr + _FIRST_ROW * T + t), device_seed(step, tl.load(table_ptr + 10 * T + t)),
            step)


@triton.jit
def _load_at(p_addr, g_addr, m_addr, m_abs_addr, v_addr, v_abs_addr, n, tile, PARAM_DTYPE: tl.constexpr,
             GRAD_DTYPE: tl.constexpr, QUANTIZED: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
             ALIGNED: tl.constexpr):
    """:func:`_load_tile` from header addresses (tile ``tile`` of a tensor of ``n`` elements; ``n`` = 0: nothing)."""
    p_ptr, m_ptr, m_abs_ptr, v_ptr, v_abs_ptr, n, _ = _pointers_of(p_addr, m_addr, m_abs_addr, v_addr, v_abs_addr, n,
                                                                   n, PARAM_DTYPE, QUANTIZED, ALIGNED)
    g_ptr = g_addr.to(tl.pointer_type(GRAD_DTYPE))
    if ALIGNED:
        g_ptr = tl.multiple_of(g_ptr, 16)
    return _load_tile(p_ptr, g_ptr, m_ptr, m_abs_ptr, v_ptr, v_abs_ptr, tile, n, ROWS, BLOCK, QUANTIZED,
                      QUANTIZED and ALIGNED)


@triton.jit
def _pointers_of(p_addr, m_addr, m_abs_addr, v_addr, v_abs_addr, n, n_write, PARAM_DTYPE: tl.constexpr,
                 QUANTIZED: tl.constexpr, ALIGNED: tl.constexpr):
    """Typed pointers and counts from the loop-carried addresses of :func:`_header`, with the ``ALIGNED`` facts
    restated (hints on a loop-carried value do not survive the loop; ``(n >> 4) << 4`` tells the compiler
    ``n`` is a multiple of 16, which it is when ``ALIGNED``)."""
    m_type: tl.constexpr = tl.int8 if QUANTIZED else tl.float32
    v_type: tl.constexpr = tl.uint8 if QUANTIZED else tl.float32
    p_ptr = p_addr.to(tl.pointer_type(PARAM_DTYPE))
    m_ptr = m_addr.to(tl.pointer_type(m_type))
    v_ptr = v_addr.to(tl.pointer_type(v_type))
    if ALIGNED:
        p_ptr = tl.multiple_of(p_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
        n = (n >> 4) << 4
        n_write = (n_write >> 4) << 4
    return (p_ptr, m_ptr, m_abs_addr.to(tl.pointer_type(tl.float32)), v_ptr, v_abs_addr.to(tl.pointer_type(tl.float32)),
            n, n_write)


@triton.jit
def _adamw8bit_persistent_kernel(
    table_ptr,  # as _adamw8bit_kernel's
    tile_owner_ptr,  # int32 (num_tiles,): tensor index of each tile
    T,  # number of tensors in the table
    num_tiles,  # tiles of all tensors; program p handles tiles p, p + grid, p + 2 grid, ...
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    grad_sign,
    PARAM_DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
    QUANTIZED: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr = False,
    STOCHASTIC: tl.constexpr = True,
):
    """Persistent programs over the tile table, double-buffered in registers: each iteration issues the loads
    of the program's next tile before it computes and stores the current one, so the memory system works
    while the math runs. The table is read only when the next tile starts another tensor (:func:`_advance`,
    :func:`_header`): no dependent table reads stand between two tiles of one tensor. Step scalars are
    recomputed only when the step counter differs from the previous tile's. The same operations as
    :func:`_adamw8bit_kernel`, so the same bits."""
    lr = as_fp32(lr)
    beta1 = as_fp32(beta1)
    beta2 = as_fp32(beta2)
    eps = as_fp32(eps)
    weight_decay = as_fp32(weight_decay)
    grad_sign = as_fp32(grad_sign)
    decay = 1.0 - lr * weight_decay
    c1 = (1.0 - beta1) * grad_sign
    c2 = 1.0 - beta2
    pid = tl.program_id(0)
    grid = tl.num_programs(0)
    t = tl.load(tile_owner_ptr + pid).to(tl.int64)  # the grid has at most num_tiles programs
    next_first = _next_first(table_ptr, T, t, num_tiles)
    p_addr, g_addr, m_addr, m_abs_addr, v_addr, v_abs_addr, n, n_write, first, seed, step = _header(table_ptr, T, t)
    p, g, m, v, m_scale, v_scale = _load_at(p_addr, g_addr, m_addr, m_abs_addr, v_addr, v_abs_addr, n, pid - first,
                                            PARAM_DTYPE, GRAD_DTYPE, QUANTIZED, ROWS, BLOCK, ALIGNED)
    known_step = step * 0.0 - 1.0  # steps are >= 0: the first tile computes its scalars
    step_size = lr * 0.0
    inv_bc2 = lr * 0.0
    for tile_id in range(pid, num_tiles, grid):
        # 1. the next tile's header (table reads only when it starts another tensor) and loads, issued first
        after = tile_id + grid
        t2, next_first = _advance(table_ptr, T, t, next_first, tl.minimum(after, num_tiles - 1), num_tiles)
        p_addr2, g_addr2, m_addr2, m_abs_addr2, v_addr2, v_abs_addr2, n2, n_write2, first2, seed2, step2 = \
            p_addr, g_addr, m_addr, m_abs_addr, v_addr, v_abs_addr, n, n_write, first, seed, step
        if t2 != t:
            p_addr2, g_addr2, m_addr2, m_abs_addr2, v_addr2, v_abs_addr2, n2, n_write2, first2, seed2, step2 = \
                _header(table_ptr, T, t2)
        p2, g2, m2, v2, m_scale2, v_scale2 = _load_at(
            p_addr2, g_addr2, m_addr2, m_abs_addr2, v_addr2, v_abs_addr2, tl.where(after < num_tiles, n2, 0),
            after - first2, PARAM_DTYPE, GRAD_DTYPE, QUANTIZED, ROWS, BLOCK, ALIGNED)
        # 2. the current tile: step scalars (when the step changed), update, stores
        if step != known_step:
            step_size, inv_bc2 = _step_scalars(lr, beta1, beta2, step)
            known_step = step
        p_ptr, m_ptr, m_abs_ptr, v_ptr, v_abs_ptr, n_ok, n_write_ok = _pointers_of(
            p_addr, m_addr, m_abs_addr, v_addr, v_abs_addr, n, n_write, PARAM_DTYPE, QUANTIZED, ALIGNED)
        _update_tile(p_ptr, m_ptr, m_abs_ptr, v_ptr, v_abs_ptr, tile_id - first, n_ok, n_write_ok, seed, p, g, m, v,
                     m_scale, v_scale, step_size, inv_bc2, beta1, beta2, eps, decay, c1, c2, ROWS, BLOCK, QUANTIZED,
                     STOCHASTIC, QUANTIZED and ALIGNED)
        t = t2
        p_addr, g_addr, m_addr, m_abs_addr, v_addr, v_abs_addr, n, n_write, first, seed, step = \
            p_addr2, g_addr2, m_addr2, m_abs_addr2, v_addr2, v_abs_addr2, n2, n_write2, first2, seed2, step2
        p, g, m, v, m_scale, v_scale = p2, g2, m2, v2, m_scale2, v_scale2


AOT_SPECS = [
    aot_spec(_adamw8bit_kernel, p, g, aligned, QUANTIZED=q, ROWS=ROWS, BLOCK=BLOCK_SIZE)
    for aligned in (False, True) for p, g in PARAM_GRAD_DTYPE_PAIRS for q in (True, False)
]
"""(kernel, signature, constexprs) for every (param dtype, grad dtype, quantized, aligned) variant launched."""

PERSISTENT_AOT_SPECS = [
    (_adamw8bit_persistent_kernel, signature_of(_adamw8bit_persistent_kernel, PERSISTENT_TABLE_TYPES),
     {"PARAM_DTYPE": triton_dtype(p), "GRAD_DTYPE": triton_dtype(g), "QUANTIZED": q, "ROWS": ROWS,
      "BLOCK": BLOCK_SIZE, "ALIGNED": aligned})
    for aligned in (False, True) for p, g in PARAM_GRAD_DTYPE_PAIRS for q in (True, False)
]
"""The same variants of the persistent kernel (``launch_over``'s ``persistent_kernel``)."""

AOT_SPECS = AOT_SPECS + PERSISTENT_AOT_SPECS


# --------------------------------------------------------------------------------------------------
# PyTorch reference (the specification, the CPU path and the test oracle)
# --------------------------------------------------------------------------------------------------


class AdamWScalars(NamedTuple):
    """The hyperparameters of one AdamW step, in the order of ``_adamw8bit_kernel``'s scalar arguments
    (launched by name; the host steps get them through :func:`.dispatch.pack`)."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    grad_sign: float
    """-1.0 when maximizing, else 1.0."""

    @classmethod
    def of(cls, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, maximize: bool
           ) -> AdamWScalars:
        """The scalars of a param group's values (``maximize`` becomes the sign of the gradient)."""
        return cls(float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), -1.0 if maximize else 1.0)


class AdamWTensors(NamedTuple):
    """The tensors of one AdamW step, one entry per param (a :func:`.dispatch.dispatch` batch).

    Tensor ``i`` is quantized when ``exp_avg_absmaxes[i]`` is not None (flat int8 / uint8 codes + fp32
    absmax per 256 elements) and keeps fp32 ``exp_avgs[i]`` / ``exp_avg_sqs[i]`` otherwise. ``steps[i]``
    (0-d fp32, already advanced) and ``flags[i]`` (0-d fp32, 0 = leave the tensor untouched) live on the
    param's device; ``seed_bases[i] = rounding.step_seed(0, tensor_index, base_seed)`` seeds the
    stochastic rounding of bf16/fp16 params (step ``t`` uses ``step_seed(t, tensor_index, base_seed)``).
    """

    params: Sequence[torch.Tensor]
    grads: Sequence[torch.Tensor]
    exp_avgs: Sequence[torch.Tensor]
    exp_avg_absmaxes: Sequence[torch.Tensor | None]
    exp_avg_sqs: Sequence[torch.Tensor]
    exp_avg_sq_absmaxes: Sequence[torch.Tensor | None]
    steps: Sequence[torch.Tensor]
    flags: Sequence[torch.Tensor]
    seed_bases: Sequence[int]


def _pow_by_squaring_reference(base: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``base ** step`` with the kernel's fp32 multiplies (24 rounds; rounds past the top bit are no-ops)."""
    if step.device.type == "cpu":  # host scalars: the same IEEE fp32 multiplies in numpy, ~100x fewer ops
        out = [_pow_by_squaring_host(np.float32(base.item()), int(t)) for t in step.reshape(-1).tolist()]
        return torch.tensor(out, dtype=torch.float32).reshape(step.shape)
    e = step.to(torch.int32)
    result = base * 0.0 + 1.0
    for _ in range(_POW_BITS):
        result = torch.where((e & 1) != 0, result * base, result)
        base = base * base
        e = e >> 1
    return result


def _pow_by_squaring_host(base: np.float32, e: int) -> np.float32:
    result = np.float32(1.0)
    while e > 0:
        if e & 1:
            result = np.float32(result * base)
        base = np.float32(base * base)
        e >>= 1
    return result


def step_terms_reference(
    scalars: AdamWScalars, steps: torch.Tensor, seed_bases: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor scalars of a step: fp32 ``(..., 2)`` ``[lr / (1 - beta1^t), 1 / sqrt(1 - beta2^t)]`` and
    the int64 stochastic-rounding seeds ``step_seed(t, i, base)``.

    ``scalars``: 0-d fp32 tensors (:func:`.dispatch.unpack`); ``steps`` (any shape, fp32, already
    advanced) and ``seed_bases`` (int64, same shape). Runs eagerly, once per group: its 24 unrolled
    squaring rounds would blow up a compiled graph. Each division and root is correctly rounded, as the
    kernel's branch-free ones (``div_rn_fast``, ``rcp_rn``, ``sqrt_rn_fast`` of :mod:`.codec`).
    """
    step_size = scalars.lr / (1.0 - _pow_by_squaring_reference(scalars.beta1, steps))
    inv_bc2 = 1.0 / sqrt_rn_reference(1.0 - _pow_by_squaring_reference(scalars.beta2, steps))
    seeds = seed_reference(steps, seed_bases)
    return torch.stack([step_size, inv_bc2], dim=-1), seeds


def adamw_math(p, g, m, v, s: AdamWScalars, step_size, inv_bc2):
    """fp32 AdamW update of ``p, m, v`` (any one shape) with the scalars ``s`` (0-d fp32 tensors); returns
    the new ``(p, m, v, w)``, ``w = sqrt(max(v, SQRT_FLOOR))`` (reused by the v-code).

    The kernel's operations in its order: ``denom = w * inv_bc2 + eps`` (``inv_bc2 = RN(1 /
    sqrt(1 - beta2^t))``, a product where torch divides), ``p - step_size * RN(m / denom)``; every
    division and root correctly rounded.
    """
    g = g * s.grad_sign
    p = p * (1.0 - s.lr * s.weight_decay)
    m = s.beta1 * m + (1.0 - s.beta1) * g
    v = s.beta2 * v + (1.0 - s.beta2) * (g * g)
    w = sqrt_floor_reference(v)
    denom = w * inv_bc2 + s.eps
    p = p - step_size * (m / denom)
    return p, m, v, w


def adamw8bit_step(param, grad, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax, ok,
                   s: AdamWScalars, step_size, inv_bc2, seed, stochastic: bool = True) -> None:
    """One 8-bit AdamW step on whole blocks, in place: the specification of ``_adamw8bit_kernel``.

    Tensors are ``(num_blocks, BLOCK_SIZE)`` views (absmax ``(num_blocks, 1)``): with the block
    dimension static, torch.compile emits vectorised loops (a flat input reshaped inside the graph
    made it divide symbolic sizes per element). ``ok``: a bool tensor (0-d; False leaves everything
    untouched) or None when the caller checked the finite flag on the host (the bucketed host path: a
    ``where(ok, new, old)`` on mutated inputs made inductor materialise copies). ``s``: the
    hyperparameters as 0-d fp32 tensors; ``step_size``, ``inv_bc2`` (:func:`step_terms_reference`) and
    ``seed``: per tensor or per row; ``stochastic``: the kernel's ``STOCHASTIC`` (False: bf16/fp16 params
    rounded to nearest-even). fp32 tensors everywhere, so compiled and eager store the same bits.
    """
    p = param.to(torch.float32)
    g = grad.to(torch.float32)
    m = decode_signed_reference(exp_avg_codes, exp_avg_absmax)
    v = decode_unsigned_reference(exp_avg_sq_codes, exp_avg_sq_absmax)
    p, m, v, w = adamw_math(p, g, m, v, s, step_size, inv_bc2)
    write_param_reference(param, p, ok, seed, stochastic)
    m_absmax = m.abs().amax(dim=1, keepdim=True)
    v_absmax = v.amax(dim=1, keepdim=True)
    v_codes = encode_unsigned_roots_reference(w, 1.0 / sqrt_floor_reference(v_absmax))  # max(w) = its root
    exp_avg_codes.copy_(masked_reference(ok, encode_signed_reference(m, m_absmax), exp_avg_codes))
    exp_avg_absmax.copy_(masked_reference(ok, m_absmax, exp_avg_absmax))
    exp_avg_sq_codes.copy_(masked_reference(ok, v_codes, exp_avg_sq_codes))
    exp_avg_sq_absmax.copy_(masked_reference(ok, v_absmax, exp_avg_sq_absmax))


def adamw32_step(param, grad, exp_avg, exp_avg_sq, ok, s: AdamWScalars, step_size, inv_bc2, seed,
                 stochastic: bool = True) -> None:
    """The step with fp32 moments (tensors under ``MIN_QUANTIZED_NUMEL`` elements), in place on tensors of
    one shape: the same math as :func:`adamw8bit_step`, no codec; ``ok`` as there."""
    p, m, v, _ = adamw_math(param.to(torch.float32), grad.to(torch.float32), exp_avg, exp_avg_sq, s, step_size,
                            inv_bc2)
    write_param_reference(param, p, ok, seed, stochastic)
    exp_avg.copy_(masked_reference(ok, m, exp_avg))
    exp_avg_sq.copy_(masked_reference(ok, v, exp_avg_sq))


# --------------------------------------------------------------------------------------------------
# Launcher: the family's Triton launch and host step, registered with dispatch
# --------------------------------------------------------------------------------------------------


def _launch_key(t: AdamWTensors, i: int) -> tuple:
    """What changes the compiled kernel: quantized, aligned, param dtype, grad dtype."""
    return (t.exp_avg_absmaxes[i] is not None, is_aligned(t.params[i], t.grads[i], t.exp_avgs[i], t.exp_avg_sqs[i]),
            t.params[i].dtype, t.grads[i].dtype)


def _launch(t: AdamWTensors, scalars: AdamWScalars, stochastic: bool = True) -> None:
    """One launch of ``_adamw8bit_kernel`` over a group of one :func:`_launch_key` (``stochastic``: its
    ``STOCHASTIC`` rounding mode)."""
    quantized, aligned, *_ = _launch_key(t, 0)
    state_rows = [
        [m.data_ptr() for m in t.exp_avgs],
        [a.data_ptr() if quantized else 0 for a in t.exp_avg_absmaxes],
        [v.data_ptr() for v in t.exp_avg_sqs],
        [a.data_ptr() if quantized else 0 for a in t.exp_avg_sq_absmaxes],
    ]
    launch_over(_adamw8bit_kernel, t.params, t.grads, state_rows, t.steps, t.flags, t.seed_bases, scalars,
                ROWS * BLOCK_SIZE, persistent_kernel=_adamw8bit_persistent_kernel, QUANTIZED=quantized, ROWS=ROWS,
                BLOCK=BLOCK_SIZE, ALIGNED=aligned, STOCHASTIC=stochastic)


def _host_key(t: AdamWTensors, i: int) -> tuple:
    """Tensors stepped by the same host step function: quantized, param dtype, grad dtype."""
    return (t.exp_avg_absmaxes[i] is not None, t.params[i].dtype, t.grads[i].dtype)


def _host(t: AdamWTensors, scalars: AdamWScalars, backend: str, steps: list[float], stochastic: bool = True) -> None:
    """The reference step of one :func:`_host_key` group whose flags are set (``steps``: their counters,
    read on the host), one call per bucket of :func:`.cpu_buckets.plan` (``stochastic``: the rounding mode).
    The step terms and seeds are computed on the host once per tensor (:func:`_host_terms`, no tensor ops)
    and gathered per row inside the bucket step (:func:`.cpu_buckets.gather_rows`)."""
    device = t.params[0].device
    hp = packed(scalars, device)
    table = per_tensor([(*_host_terms(scalars.lr, scalars.beta1, scalars.beta2, int(s)), seed)
                        for s, seed in zip(steps, _host_seeds(steps, t.seed_bases))], torch.float64, device)
    quantized = t.exp_avg_absmaxes[0] is not None
    run_bucket = _bucket_8bit if quantized else _bucket_32bit
    for layout in plan(t.params, BLOCK_SIZE if quantized else 1):
        run_bucket(layout, backend, t, hp, table, layout.row_map.to(device), stochastic)


@functools.lru_cache(maxsize=1024)
def _host_terms(lr: float, beta1: float, beta2: float, step: int) -> tuple[float, float]:
    """:func:`step_terms_reference` of one step on the host: ``(lr / (1 - beta1^t), 1 / sqrt(1 - beta2^t))`` by
    the same IEEE fp32 operations in numpy scalars (``lr``, ``beta1``, ``beta2`` rounded to fp32 first, as
    :func:`.dispatch.pack` does; numpy's fp32 square root is correctly rounded), so the same bits."""
    one = np.float32(1.0)
    beta1_t, beta2_t = _pow_from_squares(beta1, step), _pow_from_squares(beta2, step)
    return float(np.float32(lr) / (one - beta1_t)), float(one / np.sqrt(one - beta2_t))


@functools.lru_cache(maxsize=64)
def _squares(base: float) -> tuple[np.float32, ...]:
    """``base ** (2 ** k)`` for ``k < 24`` by repeated fp32 squaring (the ``base`` sequence of the squaring loop)."""
    out = [np.float32(base)]
    for _ in range(_POW_BITS - 1):
        out.append(np.float32(out[-1] * out[-1]))
    return tuple(out)


def _pow_from_squares(base: float, e: int) -> np.float32:
    """:func:`_pow_by_squaring_host` of fp32 ``base`` from the cached squares: the same fp32 products in the same
    order (one per set bit of ``e``), so the same bits."""
    result, squares, k = np.float32(1.0), _squares(base), 0
    while e:
        if e & 1:
            result = np.float32(result * squares[k])
        e >>= 1
        k += 1
    return result


def _host_seeds(steps: Sequence[float], seed_bases: Sequence[int]) -> list[int]:
    """The seeds of :func:`.rounding.seed_reference` (``(step * SEED_STEP + base) & SEED_MASK``) in Python ints."""
    return [(int(t) * SEED_STEP + base) & SEED_MASK for t, base in zip(steps, seed_bases)]


def _step_terms(steps: list[float], seed_bases: Sequence[int], hp: torch.Tensor):
    """:func:`step_terms_reference` of every tensor (``(T, 2)`` fp32, ``(T,)`` int64 seeds) from host step values
    and ``hp`` (:func:`.dispatch.pack` of :class:`AdamWScalars`), computed on the host (:func:`_host_terms`)."""
    lr, beta1, beta2 = hp[:3].tolist()
    terms = [_host_terms(lr, beta1, beta2, int(t)) for t in steps]
    return (torch.tensor(terms, dtype=torch.float32, device=hp.device),
            torch.tensor(_host_seeds(steps, seed_bases), dtype=torch.int64, device=hp.device))


def _row_terms(table: torch.Tensor, row_map: torch.Tensor):
    """``(step_size, inv_bc2, seed)`` of every row of a bucket, ``(rows, 1)`` each (fp32, fp32, int64), from the
    per-tensor float64 ``table`` ``(T, 3)`` (fp32 terms and 31-bit seeds, all exact) and ``row_map``."""
    step_size, inv_bc2, seed = gather_rows(table, row_map).unbind(1)
    return step_size.to(torch.float32).view(-1, 1), inv_bc2.to(torch.float32).view(-1, 1), fold_seeds(seed, row_map)


def _bucket_step_8bit(param, grad, m, m_absmax, v, v_absmax, hp, table, row_map, stochastic=True):
    """:func:`adamw8bit_step` over a bucket: ``(rows, BLOCK_SIZE)`` operands, absmax ``(rows, 1)``, ``hp``
    (:func:`.dispatch.pack` of :class:`AdamWScalars`), the per-tensor step ``table`` ``(T, 3)``: step size,
    ``inv_bc2`` and seed (float64, exact), gathered per row by ``row_map`` (:attr:`.cpu_buckets.Bucket.row_map`);
    few inputs (each costs guard time per compiled call)."""
    adamw8bit_step(param, grad, m, m_absmax, v, v_absmax, None, unpack(AdamWScalars, hp), *_row_terms(table, row_map),
                   stochastic)


def _bucket_step_32bit(param, grad, m, v, hp, table, row_map, stochastic=True):
    """:func:`adamw32_step` over a bucket of fp32-state tensors: ``(elements, 1)`` operands, one row per
    element (``row_map`` ``(elements, 2)``)."""
    adamw32_step(param, grad, m, v, None, unpack(AdamWScalars, hp), *_row_terms(table, row_map), stochastic)


_BUCKET_STEPS = {True: HostStep(_bucket_step_8bit), False: HostStep(_bucket_step_32bit)}
"""The bucket steps by ``quantized``, each compiled (once, ``dynamic=True``) on first use."""


def _bucket_8bit(layout, backend: str, t: AdamWTensors, hp, table, row_map, stochastic: bool) -> None:
    p, m, v = layout.rows_of(t.params), layout.rows_of(t.exp_avgs), layout.rows_of(t.exp_avg_sqs)
    m_absmax, v_absmax = layout.scales_of(t.exp_avg_absmaxes), layout.scales_of(t.exp_avg_sq_absmaxes)
    _BUCKET_STEPS[True].on(backend)(p, layout.rows_of(t.grads), m, m_absmax, v, v_absmax, hp, table, row_map,
                                    stochastic)
    layout.write_back(t.params, p)
    layout.write_back(t.exp_avgs, m)
    layout.write_back(t.exp_avg_sqs, v)
    layout.write_back_scales(t.exp_avg_absmaxes, m_absmax)
    layout.write_back_scales(t.exp_avg_sq_absmaxes, v_absmax)


def _bucket_32bit(layout, backend: str, t: AdamWTensors, hp, table, row_map, stochastic: bool) -> None:
    p, m, v = layout.rows_of(t.params), layout.rows_of(t.exp_avgs), layout.rows_of(t.exp_avg_sqs)
    _BUCKET_STEPS[False].on(backend)(p, layout.rows_of(t.grads), m, v, hp, table, row_map, stochastic)
    for dst, src in ((t.params, p), (t.exp_avgs, m), (t.exp_avg_sqs, v)):
        layout.write_back(dst, src)


ADAMW_8BIT = Family("adamw_8bit", launch=_launch, host=_host, launch_key=_launch_key, host_key=_host_key,
                    bucketed=True)
"""The AdamW family: ``dispatch(ADAMW_8BIT, AdamWTensors(...), AdamWScalars.of(...))`` applies one step in
place to every tensor (one Triton launch per :func:`_launch_key` group on CUDA; on the host one call per
bucket of each :func:`_host_key` group, the same bits as one call per tensor). Never synchronizes with a
CUDA device (on the CPU the flags are read on the host: a memory read)."""

ADAMW_8BIT_NEAREST = nearest_variant(ADAMW_8BIT, _launch, _host)
""":data:`ADAMW_8BIT` storing bf16/fp16 params rounded to nearest-even (``bf16_rounding="nearest"``)."""
