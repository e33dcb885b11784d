"""Fused AdamW step with 4-bit block-wise quantized moments (Triton kernel, reference, launcher).

The AdamW math is :mod:`.adamw8bit`'s, operation for operation (:func:`.adamw8bit.adamw_math`); only the
storage of the moments differs. Each moment is cut into blocks of ``BLOCK4 = 128`` elements with one
fp32 absmax per block, and every element keeps a 4-bit code; two codes share a byte (element ``2j`` in
the low nibble of byte ``j``, element ``2j + 1`` in the high one): ``1 + 2 * 4/128 = 1.0625`` bytes
of state per parameter, as torchao's AdamW4bit (Li et al., "Memory Efficient Optimizers with 4-bit
States", NeurIPS 2023).

The codes (chosen by ``benchmarks/codec_study.py``, see RESULTS.md "4-bit state codes"):

* **m**, signed power code, **rounded to nearest unless that stalls**: ``x = m * RN(1 / absmax)`` in
  [-1, 1], levels ``sign * (k / 7) ** 2`` for ``k = 0..7`` (int4 two's complement ``-7..7``). ``|x|`` lies
  between the levels ``(k / 7)**2`` and ``((k + 1) / 7)**2`` with ``k = min(floor(7 sqrt|x|), 6)``; with
  ``above = 49 |x| - k*k`` (in ``[0, 2k + 1]``) the nearer one is the upper when ``2 above >= 2k + 1``. If
  that nearest code equals the element's previous code, the code is instead rounded **stochastically**:
  the upper level when ``u * (2k + 1) < above`` (``u`` uniform in [0, 1) from
  :func:`.rounding.hash_uniform` of the element index and a salted step seed), i.e. with probability
  ``(|x| - lo) / (hi - lo)``, unbiased. Why both: a 4-bit m rounded to nearest stalls (an EMA step of
  ``(1 - beta1) g`` smaller than half a level is rounded away, every step): on the codec study's noisy
  quadratic every round-to-nearest m code (torchao's dynamic-exponent one too) had 0.48-0.57 relative
  error from m alone; stochastic rounding everywhere removes the stall (0.056) but adds its variance to
  every element at every step, which the EMA accumulates (``1 / (1 - beta1**2)``): on pure noise and on
  the convergence model's recorded gradients it was worse than nearest (0.37 vs 0.25, 0.34 vs 0.29).
  Stochastic only where nearest would stall keeps the quadratic's 0.056 and measures 0.28 / 0.27 there
  (``benchmarks/RESULTS.md``, "4-bit codes, stall-aware m").
* **v**, unsigned power code **without zero**: levels ``((k + 1) / 16) ** 4 * absmax``, ``k = 0..15``,
  code ``clamp(round(16 * (v / absmax) ** (1/4)), 1, 16) - 1`` (round half to even). Its smallest level
  is ``1.5e-5`` of the block maximum, so a second moment is never decoded as zero (the zero-point
  problem of the paper, where ``m / sqrt(v)`` explodes); the fourth root spends the levels where
  second moments live. Rounding to nearest (stochastic rounding of v was measured worse: it reaches
  the lowest level too often).
* Rank-1 normalization of v (the paper's) was measured 3-7% better than these block scales on the
  study's problems, but needs the row and column maxima of the *new* v before any code is written,
  i.e. a second pass over the gradient; this kernel reads every operand once.

Exactness: the kernel and the reference perform the same fp32 operations (correctly rounded square
roots and reciprocals of :mod:`.codec`, the magic-number rounding, the same hash), so they store the
same codes and absmax bits; launchers disable FMA contraction.

File order: Triton kernel, PyTorch reference, launcher.
"""

from __future__ import annotations

import functools
import sys

import torch
import triton
import triton.language as tl

from .adamw8bit import AdamWScalars, AdamWTensors, _host_seeds, _host_terms, _row_terms, adamw_math
from .adamw8bit_triton import _beta_powers
from .codec import (
    block_scale_rcp,
    block_scale_rcp_reference,
    div_rn_fast,
    rcp_rn,
    round_to_int,
    sqrt_floor,
    sqrt_floor_reference,
    sqrt_rn_fast,
)
from .cpu_buckets import Bucket, per_tensor, plan
from .dispatch import Family, HostStep, packed, unpack
from .multitensor import PARAM_GRAD_DTYPE_PAIRS, aot_spec, as_fp32, is_aligned, launch_over, table_pointer, tile_header
from .rounding import (
    device_seed,
    hash_uniform,
    hash_uniform_reference,
    masked_reference,
    nearest_variant,
    store_param,
    write_param_reference,
)

__all__ = [
    "BLOCK4",
    "ROWS4",
    "M_SEED_SALT",
    "ADAMW_4BIT",
    "ADAMW_4BIT_NEAREST",
    "num_blocks4",
    "packed_len",
    "adamw4bit_step",
    "encode_m4_reference",
    "decode_m4_reference",
    "encode_v4_reference",
    "decode_v4_reference",
    "pack_nibbles_reference",
    "unpack_nibbles_reference",
    "quantize4_reference",
    "dequantize4_reference",
]

BLOCK4 = 128
"""Elements per 4-bit quantization block (one fp32 absmax each), as the paper and torchao."""

ROWS4 = 8
"""Quantization blocks per Triton program (a tile of ``ROWS4 x BLOCK4`` = 1024 elements)."""

M_SEED_SALT = 0x5BD1E995
"""Added to a tensor's step seed for the stochastic rounding of m (the param's own rounding uses the
unsalted seed): the two hash streams are then those of elements ``~2**31`` apart."""

M_LEVELS = 7
V_LEVELS = 16
_LITTLE_ENDIAN = sys.byteorder == "little"
_M_LEVELS = tl.constexpr(7.0)
_M_LEVELS_SQ = tl.constexpr(49.0)
_V_LEVELS = tl.constexpr(16.0)
_SALT = tl.constexpr(M_SEED_SALT)


def num_blocks4(numel: int) -> int:
    """Blocks of :data:`BLOCK4` elements (one fp32 absmax each) covering ``numel`` elements."""
    return -(-numel // BLOCK4)


def packed_len(numel: int) -> int:
    """Bytes of 4-bit codes for ``numel`` elements (two per byte)."""
    return -(-numel // 2)


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------


@triton.jit
def _unpack(byte_ptr, offs_b, mask_b, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """``(ROWS, BLOCK)`` int32 nibbles of the ``(ROWS, BLOCK // 2)`` bytes at ``offs_b`` (low nibble first)."""
    b = tl.load(byte_ptr + offs_b, mask=mask_b, other=0).to(tl.int32)
    return tl.reshape(tl.join(b & 15, b >> 4), (ROWS, BLOCK))


@triton.jit
def _pack(nibbles, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """``(ROWS, BLOCK // 2)`` uint8 bytes of ``(ROWS, BLOCK)`` int32 nibbles (inverse of :func:`_unpack`)."""
    lo, hi = tl.split(tl.reshape(nibbles, (ROWS, BLOCK // 2, 2)))
    return (lo | (hi << 4)).to(tl.uint8)


@triton.jit
def _decode_m4(nib, absmax):
    """int4 two's complement ``q`` in -7..7 -> ``sign(q) (q / 7)**2 * absmax``."""
    y = ((nib ^ 8) - 8).to(tl.float32) * (1.0 / 7.0)
    return y * tl.abs(y) * absmax


@triton.jit
def _decode_v4(nib, absmax):
    """``k`` in 0..15 -> ``((k + 1) / 16)**4 * absmax``."""
    y = (nib + 1).to(tl.float32) * 0.0625
    y = y * y
    return y * y * absmax


@triton.jit
def _encode_m4(m, inv_absmax, u, previous):
    """int4 codes (int32 nibbles) of ``m`` given the block's reciprocal absmax: the nearer level, or the
    stochastically rounded one (uniforms ``u``) where the nearer one is the ``previous`` nibble."""
    r = m * inv_absmax
    a = tl.abs(r)
    k = tl.minimum((sqrt_floor(a) * _M_LEVELS).to(tl.int32), 6)
    kf = k.to(tl.float32)
    width = 2.0 * kf + 1.0
    above = a * _M_LEVELS_SQ - kf * kf
    c_near = k + (above * 2.0 >= width).to(tl.int32)
    near = tl.where(r < 0.0, -c_near, c_near) & 15
    c = k + (u * width < above).to(tl.int32)
    return tl.where(near == previous, tl.where(r < 0.0, -c, c) & 15, near)


@triton.jit
def _encode_v4(w, inv_w_max):
    """Codes ``k`` (int32 nibbles) of ``v`` from ``w = sqrt_floor(v)`` and ``RN(1 / sqrt_floor(absmax))``."""
    c = round_to_int(sqrt_floor(w * inv_w_max) * _V_LEVELS)
    return tl.minimum(tl.maximum(c, 1), 16) - 1


@triton.jit
def _adamw4bit_kernel(
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
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr = False,
    STOCHASTIC: tl.constexpr = True,
):
    lr = as_fp32(lr)
    beta1 = as_fp32(beta1)
    beta2 = as_fp32(beta2)
    eps = as_fp32(eps)
    weight_decay = as_fp32(weight_decay)
    grad_sign = as_fp32(grad_sign)
    t, p_ptr, g_ptr, step_ptr, n, n_write, tile, seed_base = tile_header(
        table_ptr, tile_owner_ptr, T, 4, PARAM_DTYPE, GRAD_DTYPE, ALIGNED)
    m_ptr = table_pointer(table_ptr, T, t, 2, tl.uint8, ALIGNED)
    m_abs_ptr = table_pointer(table_ptr, T, t, 3, tl.float32, False)
    v_ptr = table_pointer(table_ptr, T, t, 4, tl.uint8, ALIGNED)
    v_abs_ptr = table_pointer(table_ptr, T, t, 5, tl.float32, False)

    HALF: tl.constexpr = BLOCK // 2
    rows = tile * ROWS + tl.arange(0, ROWS)  # block index inside the tensor, (ROWS,)
    offs = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]  # element index, (ROWS, BLOCK)
    offs_b = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]  # byte index, (ROWS, HALF)
    in_bounds = offs < n
    n_bytes = (n + 1) // 2
    n_bytes_write = (n_write + 1) // 2  # 0 when the gradient is not finite: nothing is written
    if ALIGNED:  # n is a multiple of 16: the byte masks are uniform over 8 bytes (vector accesses)
        n_bytes = tl.multiple_of(n_bytes, 8)
        n_bytes_write = tl.multiple_of(n_bytes_write, 8)
    bytes_in = offs_b < n_bytes
    bytes_write = offs_b < n_bytes_write
    write = offs < n_write
    row_in_bounds = rows * BLOCK < n
    row_write = rows * BLOCK < n_write

    p = tl.load(p_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    m_scale = tl.load(m_abs_ptr + rows, mask=row_in_bounds, other=0.0)
    v_scale = tl.load(v_abs_ptr + rows, mask=row_in_bounds, other=0.0)
    m_old = _unpack(m_ptr, offs_b, bytes_in, ROWS, BLOCK)
    m = _decode_m4(m_old, m_scale[:, None])
    v = _decode_v4(_unpack(v_ptr, offs_b, bytes_in, ROWS, BLOCK), v_scale[:, None])

    step = tl.load(step_ptr)
    seed = device_seed(step, seed_base)  # == rounding.step_seed(step, index, base)
    beta1_t, beta2_t = _beta_powers(beta1, beta2, step)
    step_size = div_rn_fast(lr, 1.0 - beta1_t)
    inv_bc2 = rcp_rn(sqrt_rn_fast(1.0 - beta2_t))
    decay = 1.0 - lr * weight_decay
    c1 = (1.0 - beta1) * grad_sign
    c2 = 1.0 - beta2

    p = p * decay
    m = beta1 * m + c1 * g
    v = beta2 * v + c2 * (g * g)
    w = sqrt_floor(v)
    denom = w * inv_bc2 + eps
    p = p - step_size * div_rn_fast(m, denom)
    store_param(p_ptr, p, offs, write, seed, STOCHASTIC)

    m_max = tl.max(tl.abs(m), axis=1)  # (ROWS,)
    v_max = tl.max(v, axis=1)
    inv_m_max = block_scale_rcp(m_max)
    inv_w_max = rcp_rn(sqrt_floor(v_max))
    u = hash_uniform(offs, seed + _SALT)
    tl.store(m_ptr + offs_b, _pack(_encode_m4(m, inv_m_max[:, None], u, m_old), ROWS, BLOCK), mask=bytes_write)
    tl.store(v_ptr + offs_b, _pack(_encode_v4(w, inv_w_max[:, None]), ROWS, BLOCK), mask=bytes_write)
    tl.store(m_abs_ptr + rows, m_max, mask=row_write)
    tl.store(v_abs_ptr + rows, v_max, mask=row_write)


AOT_SPECS = [
    aot_spec(_adamw4bit_kernel, p, g, aligned, ROWS=ROWS4, BLOCK=BLOCK4)
    for aligned in (False, True) for p, g in PARAM_GRAD_DTYPE_PAIRS
]
"""(kernel, signature, constexprs) for every (param dtype, grad dtype, aligned) variant launched."""


# --------------------------------------------------------------------------------------------------
# PyTorch reference (the specification, the CPU path and the test oracle)
# --------------------------------------------------------------------------------------------------


_NIBBLE_SHIFTS = torch.arange(16, dtype=torch.int64) * 4
"""Bit offsets of the 16 nibbles of a little-endian int64 word of packed codes, in element order."""
_FOLD_MASKS = (0x00FF00FF00FF00FF, 0x0000FFFF0000FFFF)
"""Masks of the fold of nibble bytes (nibble ``k`` at bit ``8k`` of an int64 word) into packed nibbles (at ``4k``)."""


def _int64_words(t: torch.Tensor) -> bool:
    """Whether ``t``'s last dim can be read as little-endian int64 words: a contiguous tensor on a little-endian
    host whose last dim is a multiple of 8 bytes and whose storage offset is one of 8 (codes buffers start at
    offset 0 and bucket operands at whole rows of 64 bytes). Asked outside torch.compile only: reading the
    storage offset breaks a graph, and a compiled step is given the bucket operands, which always qualify."""
    if not (_LITTLE_ENDIAN and t.dim() > 0 and t.is_contiguous() and t.shape[-1] % 8 == 0):
        return False
    return torch.compiler.is_compiling() or t.storage_offset() % 8 == 0


def unpack_nibbles_reference(codes: torch.Tensor) -> torch.Tensor:
    """``(..., H)`` uint8 bytes -> ``(..., 2H)`` int32 nibbles (low nibble first).

    Where the bytes can be read as int64 words (:func:`_int64_words`, e.g. a bucket's rows of 64 bytes),
    element ``e`` of a row is ``(word[e // 16] >> 4 (e % 16)) & 15``: a broadcast word and a shift by a loaded
    table per element, which inductor fuses into the step's loop (an interleaving ``stack`` compiled into a
    scalar loop of strided stores, an int16 view into a scalar int16 loop). Other shapes: int16 views on
    little-endian hosts (a byte becomes ``lo | hi << 8``, whose two bytes are the nibbles), else the ``stack``."""
    if _int64_words(codes):
        words = codes.view(torch.int64).unsqueeze(-1)  # (..., H / 8, 1)
        shifts = _NIBBLE_SHIFTS.to(codes.device).view((1,) * codes.dim() + (16,))  # 1-d: compiled 9x slower
        return ((words >> shifts) & 15).flatten(-2).to(torch.int32)
    if not _LITTLE_ENDIAN:
        b = codes.to(torch.int32)
        return torch.stack([b & 15, b >> 4], dim=-1).flatten(-2)
    c = codes.to(torch.int16).contiguous()
    return ((c & 15) | ((c >> 4) << 8)).view(torch.uint8).to(torch.int32)


def pack_nibbles_reference(nibbles: torch.Tensor) -> torch.Tensor:
    """``(..., 2H)`` int32 nibbles (0..15) -> ``(..., H)`` uint8 bytes (inverse of :func:`unpack_nibbles_reference`).

    On little-endian hosts the nibbles, as bytes, are read as int64 words of 8 (when ``2H`` is a multiple of 8)
    and folded by shifts and masks (nibble ``k`` from bit ``8k`` to bit ``4k``; vectorized int64 ops, no
    de-interleaving gather), else as int16 pairs ``lo | hi << 8`` folded into ``lo | hi << 4``."""
    if not _LITTLE_ENDIAN:
        pairs = nibbles.unflatten(-1, (-1, 2))
        return ((pairs[..., 0] & 15) | ((pairs[..., 1] & 15) << 4)).to(torch.uint8)
    if nibbles.dim() > 0 and nibbles.shape[-1] % 8 == 0:
        x = nibbles.to(torch.uint8, copy=True).contiguous().view(torch.int64)  # a new buffer: offset 0
        x = (x | (x >> 4)) & _FOLD_MASKS[0]
        x = (x | (x >> 8)) & _FOLD_MASKS[1]
        return (x | (x >> 16)).to(torch.int32).view(torch.uint8)  # the low 32 bits of a word: its 4 packed bytes
    w = nibbles.to(torch.uint8).contiguous().view(torch.int16)
    return ((w & 15) | ((w >> 4) & 0xF0)).to(torch.uint8)


def decode_m4_reference(nibbles: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """Reference of the kernel's m decode: int4 ``q`` -> ``sign(q) (q / 7)**2 * absmax``."""
    y = ((nibbles ^ 8) - 8).to(torch.float32) * (1.0 / 7.0)
    return y * y.abs() * absmax


def decode_v4_reference(nibbles: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """Reference of the kernel's v decode: ``k`` -> ``((k + 1) / 16)**4 * absmax``."""
    y = (nibbles + 1).to(torch.float32) * 0.0625
    y = y * y
    return y * y * absmax


def encode_m4_reference(m: torch.Tensor, absmax: torch.Tensor, u: torch.Tensor | None,
                        previous: torch.Tensor | None = None) -> torch.Tensor:
    """int4 nibbles of ``m`` (``(..., B)``, ``absmax`` broadcastable), as the kernel: rounded to the nearer
    level, except where that is the ``previous`` nibble (same shape), which are stochastically rounded with
    uniforms ``u`` (see the module docstring). ``u`` None: nearest everywhere; ``previous`` None (and ``u``
    given): stochastic everywhere."""
    r = m * block_scale_rcp_reference(absmax)
    a = r.abs()
    k = (sqrt_floor_reference(a) * float(M_LEVELS)).to(torch.int32).clamp(max=M_LEVELS - 1)
    kf = k.to(torch.float32)
    width = 2.0 * kf + 1.0
    above = a * float(M_LEVELS * M_LEVELS) - kf * kf  # in [0, 2k + 1]
    c_near = k + (above * 2.0 >= width).to(torch.int32)
    near = torch.where(r < 0, -c_near, c_near) & 15
    if u is None:
        return near
    c = k + (u * width < above).to(torch.int32)
    stochastic = torch.where(r < 0, -c, c) & 15
    return stochastic if previous is None else torch.where(near == previous, stochastic, near)


def encode_v4_reference(w: torch.Tensor, inv_w_max: torch.Tensor) -> torch.Tensor:
    """Reference of the kernel's v encode from ``w = sqrt_floor(v)`` and ``RN(1 / sqrt_floor(absmax))``."""
    c = torch.round(sqrt_floor_reference(w * inv_w_max) * float(V_LEVELS)).to(torch.int32)
    return c.clamp(1, V_LEVELS) - 1


def adamw4bit_step(param, grad, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax, ok,
                   s: AdamWScalars, step_size, inv_bc2, seed, stochastic: bool = True) -> None:
    """One 4-bit AdamW step on whole blocks, in place: the specification of ``_adamw4bit_kernel``.

    ``param``/``grad`` are ``(rows, BLOCK4)``, the packed codes ``(rows, BLOCK4 // 2)`` uint8 and the
    absmax ``(rows, 1)`` fp32. ``ok``: a 0-d bool tensor (False leaves everything untouched) or None
    (the caller checked the finite flag on the host). ``s``: the hyperparameters as 0-d fp32 tensors;
    ``step_size``, ``inv_bc2`` (:func:`.adamw8bit.step_terms_reference`) and ``seed`` (int64): per
    tensor or per row. Element ``j`` of a row hashes as index ``row * BLOCK4 + j``. ``stochastic``: the
    kernel's ``STOCHASTIC`` for the param store (False: nearest-even; m's codes keep their stall-aware rounding).
    """
    p = param.to(torch.float32)
    g = grad.to(torch.float32)
    m_old = unpack_nibbles_reference(exp_avg_codes)
    m = decode_m4_reference(m_old, exp_avg_absmax)
    v = decode_v4_reference(unpack_nibbles_reference(exp_avg_sq_codes), exp_avg_sq_absmax)
    p, m, v, w = adamw_math(p, g, m, v, s, step_size, inv_bc2)
    write_param_reference(param, p, ok, seed, stochastic)
    m_absmax = m.abs().amax(dim=1, keepdim=True)
    v_absmax = v.amax(dim=1, keepdim=True)
    offs = torch.arange(param.numel(), device=param.device).view(param.shape)
    u = hash_uniform_reference(offs, seed + M_SEED_SALT)
    m_codes = pack_nibbles_reference(encode_m4_reference(m, m_absmax, u, m_old))
    v_codes = pack_nibbles_reference(encode_v4_reference(w, 1.0 / sqrt_floor_reference(v_absmax)))
    exp_avg_codes.copy_(masked_reference(ok, m_codes, exp_avg_codes))
    exp_avg_absmax.copy_(masked_reference(ok, m_absmax, exp_avg_absmax))
    exp_avg_sq_codes.copy_(masked_reference(ok, v_codes, exp_avg_sq_codes))
    exp_avg_sq_absmax.copy_(masked_reference(ok, v_absmax, exp_avg_sq_absmax))


def _blocks(x: torch.Tensor) -> torch.Tensor:
    flat = x.detach().reshape(-1).to(torch.float32)
    return torch.nn.functional.pad(flat, (0, (-flat.numel()) % BLOCK4)).view(-1, BLOCK4)


def quantize4_reference(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, absmax)`` of any float tensor in the 4-bit codes: ``packed_len(n)`` uint8 bytes and
    ``num_blocks4(n)`` fp32 scales; m (``signed``) rounded to the nearer level (a one-off conversion,
    e.g. of a ``torch.optim.AdamW`` state), v (``>= 0``) as the kernel rounds it."""
    n = x.numel()
    blocks = _blocks(x)
    if signed:
        absmax = blocks.abs().amax(dim=1, keepdim=True)
        nibbles = encode_m4_reference(blocks, absmax, None)
    else:
        absmax = blocks.amax(dim=1, keepdim=True)
        nibbles = encode_v4_reference(sqrt_floor_reference(blocks), 1.0 / sqrt_floor_reference(absmax))
    return pack_nibbles_reference(nibbles).reshape(-1)[:packed_len(n)].contiguous(), absmax.reshape(-1)


def dequantize4_reference(codes: torch.Tensor, absmax: torch.Tensor, numel: int, signed: bool) -> torch.Tensor:
    """Flat fp32 values (``numel`` of them) of 4-bit ``codes`` and their ``absmax`` (inverse of
    :func:`quantize4_reference` up to the codes' rounding)."""
    nibbles = unpack_nibbles_reference(codes.reshape(-1))
    nibbles = torch.nn.functional.pad(nibbles, (0, absmax.numel() * BLOCK4 - nibbles.numel())).view(-1, BLOCK4)
    decode = decode_m4_reference if signed else decode_v4_reference
    return decode(nibbles, absmax.reshape(-1, 1).to(torch.float32)).reshape(-1)[:numel]


# --------------------------------------------------------------------------------------------------
# Launcher: the family's Triton launch and host step, registered with dispatch
# --------------------------------------------------------------------------------------------------


def _launch_key(t: AdamWTensors, i: int) -> tuple:
    """What changes the compiled kernel: aligned, param dtype, grad dtype."""
    return (is_aligned(t.params[i], t.grads[i], t.exp_avgs[i], t.exp_avg_sqs[i]), t.params[i].dtype, t.grads[i].dtype)


def _launch(t: AdamWTensors, scalars: AdamWScalars, stochastic: bool = True) -> None:
    """One launch of ``_adamw4bit_kernel`` over a group of one :func:`_launch_key` (``stochastic``: its
    ``STOCHASTIC`` param rounding)."""
    aligned = _launch_key(t, 0)[0]
    state_rows = [[x.data_ptr() for x in seq] for seq in (t.exp_avgs, t.exp_avg_absmaxes, t.exp_avg_sqs,
                                                            t.exp_avg_sq_absmaxes)]
    launch_over(_adamw4bit_kernel, t.params, t.grads, state_rows, t.steps, t.flags, t.seed_bases, scalars,
                ROWS4 * BLOCK4, ROWS=ROWS4, BLOCK=BLOCK4, ALIGNED=aligned, STOCHASTIC=stochastic)


def _host_key(t: AdamWTensors, i: int) -> tuple:
    """Tensors stepped by one host call: param dtype, grad dtype."""
    return (t.params[i].dtype, t.grads[i].dtype)


def _bucket_step_4bit(param, grad, m, m_absmax, v, v_absmax, hp, table, row_map, stochastic=True):
    """:func:`adamw4bit_step` over a bucket: ``(rows, BLOCK4)`` operands, codes ``(rows, BLOCK4 // 2)``,
    absmax ``(rows, 1)``, ``hp`` (:func:`.dispatch.pack` of :class:`.adamw8bit.AdamWScalars`) and the per-tensor
    step ``table`` ``(T, 3)`` (step size, ``inv_bc2``, seed; float64, exact) gathered per row by ``row_map``
    (:attr:`.cpu_buckets.Bucket.row_map`) inside the graph, as the 8-bit bucket step does."""
    step_size, inv_bc2, seeds = _row_terms(table, row_map)
    adamw4bit_step(param, grad, m, m_absmax, v, v_absmax, None, unpack(AdamWScalars, hp), step_size, inv_bc2, seeds,
                   stochastic)


_BUCKET_STEP = HostStep(_bucket_step_4bit)
"""The bucket step, compiled (once, ``dynamic=True``) on first use where dispatch says so."""


@functools.lru_cache(maxsize=256)
def _codes_layout(layout: Bucket) -> Bucket:
    """The bucket of the packed codes matching the param bucket ``layout`` (half the elements per row);
    cached per ``layout`` (the buckets of :func:`.cpu_buckets.plan` are cached, and building one costs two
    small tensor ops per call: 10% of the compiled CPU step at 4M params)."""
    pieces = tuple((i, start // 2, packed_len(numel)) for i, start, numel in layout.pieces)
    return Bucket(pieces, BLOCK4 // 2, layout.in_place)


def _word_aligned(codes: torch.Tensor) -> torch.Tensor:
    """``codes`` (a bucket operand), or a copy of it when its storage offset is not a multiple of 8 bytes (a
    state tensor that is a view into a larger buffer): the compiled step reads the codes as int64 words
    (:func:`unpack_nibbles_reference`) and cannot check the offset itself; the copy is written back like a
    gathered operand."""
    return codes if codes.storage_offset() % 8 == 0 else codes.clone()


def _host(t: AdamWTensors, scalars: AdamWScalars, backend: str, steps: list[float], stochastic: bool = True) -> None:
    """The reference step of one :func:`_host_key` group whose flags are set (``steps``: their counters,
    read on the host), one call per bucket of :func:`.cpu_buckets.plan` (rows of ``BLOCK4``; ``stochastic``:
    the param rounding mode). Step terms and seeds are computed on the host once per tensor
    (:func:`.adamw8bit._host_terms`) and gathered per row inside the bucket step."""
    device = t.params[0].device
    hp = packed(scalars, device)
    table = per_tensor([(*_host_terms(scalars.lr, scalars.beta1, scalars.beta2, int(s)), seed)
                        for s, seed in zip(steps, _host_seeds(steps, t.seed_bases))], torch.float64, device)
    for layout in plan(t.params, BLOCK4):
        codes = _codes_layout(layout)
        p, g = layout.rows_of(t.params), layout.rows_of(t.grads)
        m, v = _word_aligned(codes.rows_of(t.exp_avgs)), _word_aligned(codes.rows_of(t.exp_avg_sqs))
        m_absmax, v_absmax = layout.scales_of(t.exp_avg_absmaxes), layout.scales_of(t.exp_avg_sq_absmaxes)
        _BUCKET_STEP.on(backend)(p, g, m, m_absmax, v, v_absmax, hp, table, layout.row_map.to(device), stochastic)
        layout.write_back(t.params, p)
        codes.write_back(t.exp_avgs, m)
        codes.write_back(t.exp_avg_sqs, v)
        layout.write_back_scales(t.exp_avg_absmaxes, m_absmax)
        layout.write_back_scales(t.exp_avg_sq_absmaxes, v_absmax)


ADAMW_4BIT = Family("adamw_4bit", launch=_launch, host=_host, launch_key=_launch_key, host_key=_host_key,
                    bucketed=True)
"""The 4-bit AdamW family: ``dispatch(ADAMW_4BIT, AdamWTensors(...), AdamWScalars.of(...))`` with packed
uint8 codes in ``exp_avgs`` / ``exp_avg_sqs`` and fp32 absmax per :data:`BLOCK4` elements (every tensor
quantized: the optimizer sends fp32-state tensors to :data:`.adamw8bit.ADAMW_8BIT`). Never synchronizes
with a CUDA device."""

ADAMW_4BIT_NEAREST = nearest_variant(ADAMW_4BIT, _launch, _host)
""":data:`ADAMW_4BIT` storing bf16/fp16 params rounded to nearest-even (``bf16_rounding="nearest"``)."""
