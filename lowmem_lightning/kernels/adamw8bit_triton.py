"""Triton kernels of the fused 8-bit AdamW step (:mod:`.adamw8bit`: math, reference, launcher).

The tile code (:func:`_load_tile`: the raw operands of ``ROWS`` codec blocks of one tensor;
:func:`_update_tile`: decode, AdamW, encode, stores) is shared by two launch forms, so both compute the
same bits: one program per tile (:func:`_adamw8bit_kernel`) and persistent programs that loop over the
tiles of the launch table and load the next tile before computing the current one
(:func:`_adamw8bit_persistent_kernel`). The step scalars (``lr / (1 - beta1^t)``, ``1 / sqrt(1 -
beta2^t)``, by squaring: :func:`_beta_powers`) are computed once per program, not per element.

Exactness at few instructions (issue 24): the fp32 operations, in order, are
``w = sqrt(max(v, 2**-100))``, ``denom = w * inv_bc2 + eps``, ``p - step_size * (m / denom)``, where
every square root and quotient is correctly rounded, computed branch-free by :mod:`.codec`'s
``sqrt_rn_fast`` / ``div_rn_fast`` / ``rcp_rn``: the instruction sequences of ptxas' own IEEE
``sqrt.rn`` / ``div.rn`` fast paths (MUFU + Newton/Markstein FMA steps), without their per-element
``FCHK`` + slow-path ``CALL`` (operands here are in the fast paths' range: ``v`` floored at 2**-100,
``denom >= eps``). The reference (:func:`.adamw8bit.adamw_math`) computes the same values with IEEE
``/`` and a correctly rounded square root, so kernel and reference agree bit for bit (only the sign of
a zero update may differ, ``-0 / d``, which changes no value). The floor moves ``sqrt(v)`` only below
8.9e-16 (= ulp(1e-8)). The v-code reuses ``w`` (:func:`.codec.encode_unsigned_roots`), the block scales
are reciprocals computed once per block (codes: :mod:`.codec`). No slow-path ``CALL`` remains in the
SASS (``tests/test_kernels_sass.py``; counts in ``benchmarks/RESULTS.md``).

File order: tile code, the one-program-per-tile kernel, the persistent kernel and its table walk.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .codec import (
    decode_signed,
    decode_unsigned,
    div_rn_fast,
    encode_signed,
    encode_unsigned_roots,
    rcp_rn,
    sqrt_floor,
    sqrt_rn_fast,
)
from .multitensor import as_fp32, table_pointer, tile_header
from .rounding import device_seed, store_param

__all__ = ["_adamw8bit_kernel", "_adamw8bit_persistent_kernel", "_beta_powers"]  # the names other modules import


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
    """``(lr / (1 - beta1^t), 1 / sqrt(1 - beta2^t))`` of step ``t`` (== :func:`.adamw8bit.step_terms_reference`)."""
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
