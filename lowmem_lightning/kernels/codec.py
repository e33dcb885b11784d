"""Block-wise 8-bit code for optimizer states (the "power-companding" code).

A state tensor is flattened and cut into blocks of ``BLOCK_SIZE`` = 256 consecutive elements; each
block stores one fp32 scale (its absolute maximum) and one byte per element, so a state costs
``1 + 4/256 = 1.015625`` bytes per element.

Two codes, both closed-form (no table lookup, cheap on CPU and GPU):

* **signed** (first moments, momentum): ``x = s * RN(1 / absmax)`` in [-1, 1], ``y = sign(x) *
  sqrt(|x|)``, ``code = round_half_even(127 * y)`` as int8 in [-127, 127]; decode ``y = code / 127``,
  ``s = y * |y| * absmax``.
* **unsigned** (second moments, >= 0): ``x = sqrt(s) * RN(1 / sqrt(absmax))`` in [0, 1], ``y =
  sqrt(x)`` (= ``(s / absmax) ** (1/4)``), ``code = round_half_even(255 * y)`` as uint8; decode ``y =
  code / 255``, ``s = (y * y) ** 2 * absmax``.

Square-root inputs are floored at :data:`SQRT_FLOOR` (2**-100) and scales at :data:`SCALE_FLOOR`
(codes unaffected: the smallest non-zero code needs 1.5e-11 of the block maximum).

Why these: companding spends the 8 bits where optimizer states live (many values far below the
block maximum), like bitsandbytes' dynamic-tree code (Dettmers et al., "8-bit Optimizers via
Block-wise Quantization", ICLR 2022) and FlashOptim's companding. The smallest non-zero magnitude
relative to the block maximum is (0.5/127)^2 = 1.6e-5 for the signed code and (0.5/255)^4 =
1.5e-11 for the unsigned code, so a second moment is practically never flushed to zero while its
first moment is not (the failure that makes 8-bit Adam explode). Its accuracy against bitsandbytes'
code is measured by ``benchmarks/codec_study.py`` (figures in ``benchmarks/RESULTS.md``).

Exactness contract: the Triton helpers below and the PyTorch reference perform the same fp32
operations in the same order, and launchers disable FMA contraction, so both store identical codes.
Every reciprocal and square root is correctly rounded. On the GPU they are branch-free
(:func:`rcp_rn`, :func:`div_rn_fast`, :func:`sqrt_rn_fast`): the exact instruction sequences of
ptxas' IEEE ``div.rn.f32`` / ``sqrt.rn.f32`` fast paths (one MUFU op, then FMA Newton/Markstein
steps; pinned by ``tests/test_kernels_sass.py``) without the per-element range check and slow-path
``CALL``, which only inputs outside the ranges used here would take. Under the interpreter the same
steps start from numpy's correctly rounded values and are checked against torch for every fp32
significand (``tests/test_codec.py``). Scaling by a per-block reciprocal (not a per-element quotient)
and rounding ties to even with the magic number ``1.5 * 2**23`` (one FADD) make a code differ from
the exact-quotient, round-half-away code of earlier versions by one step on ~1e-6 of elements.

This file holds, in order: Triton device helpers (imported by every fused optimizer kernel), the
standalone quantize/dequantize Triton kernels, their PyTorch reference, and the launchers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .aot import signature_of, with_aligned
from .dispatch import choose

__all__ = [
    "BLOCK_SIZE",
    "MIN_QUANTIZED_NUMEL",
    "num_blocks",
    "block_rows",
    "quantize_reference",
    "dequantize_reference",
    "quantize_blockwise",
    "dequantize_blockwise",
    "encode_signed",
    "decode_signed",
    "encode_unsigned",
    "decode_unsigned",
    "sqrt_rn_reference",
    "sqrt_floor_reference",
    "block_scale_rcp_reference",
    "encode_signed_scaled_reference",
    "encode_unsigned_roots_reference",
    "rcp_rn",
    "div_rn_fast",
    "sqrt_rn_fast",
    "sqrt_floor",
    "round_to_int",
    "block_scale_rcp",
    "encode_signed_scaled",
    "encode_unsigned_roots",
    "SQRT_FLOOR",
    "SCALE_FLOOR",
]

BLOCK_SIZE = 256
"""Elements per quantization block (one fp32 absmax each)."""

MIN_QUANTIZED_NUMEL = 4096
"""Tensors with fewer elements keep fp32 state (as bitsandbytes and torchao do)."""

SIGNED_LEVELS = 127.0
UNSIGNED_LEVELS = 255.0

SQRT_FLOOR = 2.0 ** -100
"""Inputs of every square root are floored here (``sqrt(max(x, SQRT_FLOOR))``): keeps the branch-free
square root in its exact range (``>= 2**-101``). Codes never see it (the smallest non-zero code needs
``x >= 1.5e-11`` of its block maximum); AdamW's denominator sees ``sqrt(v) >= 2**-50 = 8.9e-16``."""

SCALE_FLOOR = 2.0 ** -126
"""Block scales are floored at the smallest normal fp32 before their reciprocal (exact range of
:func:`rcp_rn`); a block whose absmax is below it is all but zero."""

MAGIC_ROUND = 12582912.0
"""``1.5 * 2**23``: ``(y + MAGIC_ROUND) - MAGIC_ROUND`` is ``y`` rounded to nearest, ties to even."""

_SQRT_FLOOR = tl.constexpr(SQRT_FLOOR)
_SCALE_FLOOR = tl.constexpr(SCALE_FLOOR)
_MAGIC = tl.constexpr(MAGIC_ROUND)
_MAGIC_BITS = tl.constexpr(0x4B400000)
_INTERPRETED = tl.constexpr(bool(triton.knobs.runtime.interpret))
"""Whether ``@triton.jit`` builds interpreted functions (triton's own switch, ``TRITON_INTERPRET``,
read as this module's kernels are decorated): the interpreter cannot run inline PTX (:func:`_rcp_approx`)."""


def _interpreter_has_exact_fma() -> bool:
    """Whether triton's interpreter rounds ``tl.fma`` once: it has a native fp32 fma (``fma_fp32``, triton >= 3.7);
    triton 3.6's computes ``a * b + c`` in fp32 and rounds twice."""
    try:
        from triton._C.libtriton import interpreter
    except ImportError:
        return False
    return hasattr(interpreter, "fma_fp32")


_EMULATE_FMA = tl.constexpr(bool(triton.knobs.runtime.interpret) and not _interpreter_has_exact_fma())
"""Whether :func:`fma` emulates a single rounding in fp64 steps (an interpreter without an exact fma)."""


def num_blocks(numel: int, block_size: int = BLOCK_SIZE) -> int:
    """Number of quantization blocks (one fp32 scale each) for a tensor of ``numel`` elements."""
    return (numel + block_size - 1) // block_size


# --------------------------------------------------------------------------------------------------
# Triton device helpers: called from inside fused kernels. ``x`` is fp32, ``absmax`` fp32 (>= 0).
# --------------------------------------------------------------------------------------------------


@triton.jit
def neg(x):
    """``-x`` for fp32 ``x`` as a negation ptxas folds into the instruction that reads it (``neg.f32``, an
    operand modifier of FFMA/FMUL/FADD). ``x * -1.0`` is exact and LLVM turns it into ``fneg`` under every
    triton; the unary minus is not portable: triton 3.6 (the device image's) lowers a float's ``-x`` to ``0 - x``,
    an FADD that stays in the SASS (and makes ``-(+0)`` +0), triton 3.9 to ``fneg``."""
    return x * -1.0


@triton.jit
def _fma_interpreted(a, b, c):
    """``a * b + c`` of fp32 operands rounded once to fp32, in numpy-backed fp64 steps (interpreter only).

    The product is exact in fp64 (24 + 24 bits); the fp64 sum is made round-to-odd from its exact error
    (TwoSum), and round-to-odd at 53 bits then rounded to 24 is the correctly rounded result (Boldo and
    Melquiond, "Emulation of FMA and correctly rounded sums: proved algorithms using rounding to odd", IEEE TC
    2008)."""
    p = tl.cast(a, tl.float64) * tl.cast(b, tl.float64)
    c64 = tl.cast(c, tl.float64)
    s = p + c64
    finite = tl.abs(s) <= 1.7976931348623157e308  # then p and c64 are finite too; inf and NaN pass through
    p, c64, t = tl.where(finite, p, 0.0), tl.where(finite, c64, 0.0), tl.where(finite, s, 0.0)
    z = t - p
    err = (p - (t - z)) + (c64 - z)  # exact: p + c64 == s + err
    bits = s.to(tl.int64, bitcast=True)
    inexact = (err != 0.0) & ((bits & 1) == 0)
    away = (err > 0.0) == (s > 0.0)  # the exact sum lies beyond s, away from zero: the odd neighbour is there
    bits = tl.where(inexact, tl.where(away, bits + 1, bits - 1), bits)
    return bits.to(tl.float64, bitcast=True).to(tl.float32)


@triton.jit
def fma(a, b, c):
    """fp32 ``a * b + c`` rounded once: ``tl.fma`` (FFMA) when compiled and under an interpreter whose fma is
    exact (triton 3.9); under triton 3.6's interpreter, which computes ``tl.fma`` as ``a * b + c`` in fp32 and
    rounds twice, an exact emulation (:func:`_fma_interpreted`, ~20 numpy steps): the Newton/Markstein steps of
    :func:`rcp_rn`, :func:`div_rn_fast` and :func:`sqrt_rn_fast` are correctly rounded only with a single
    rounding."""
    if _EMULATE_FMA:
        return _fma_interpreted(a, b, c)
    else:
        return tl.fma(a, b, c)


@triton.jit
def _rcp_approx(b):
    """An approximation of ``1 / b`` for the refinements below: on the GPU the raw ``MUFU.RCP``
    (``rcp.approx.ftz.f32``, max error 1 ulp), under the interpreter the numpy quotient."""
    if _INTERPRETED:
        return 1.0 / b
    else:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [b], dtype=tl.float32,
                                         is_pure=True, pack=1)


@triton.jit
def rcp_rn(b):
    """Correctly rounded fp32 ``1 / b`` for normal ``|b|`` in ``[2**-126, 2**126]``, branch-free.

    ``y = rcp(b); e = fma(-b, y, 1); y = fma(y, e, y); r = fma(-b, y, 1); y = fma(r, y, y)``: the
    instruction sequence ptxas emits for the fast path of ``div.rn.f32(1, b)`` (MUFU.RCP, two FFMA of
    Newton refinement, the Markstein residual and correction), which PTX specifies as IEEE-754
    correctly rounded; the slow path (``FCHK`` + ``CALL``) only serves operands outside this range.
    Markstein (IBM J. Res. Dev. 34(1), 1990): with ``y`` = RN(1/b) and the exact FMA residual, the
    last step returns RN(1/b). The interpreter starts from the numpy quotient RN(1/b) itself (checked
    for every fp32 significand by ``tests/test_codec.py``). Mirrored by torch's ``1 / b``.
    """
    y = _rcp_approx(b)
    e = fma(neg(b), y, 1.0)
    y = fma(y, e, y)
    r = fma(neg(b), y, 1.0)
    return fma(r, y, y)


@triton.jit
def div_rn_fast(a, b):
    """Correctly rounded fp32 ``a / b``, branch-free, when ``b`` and ``a / b`` are normal (or ``a == 0``).

    The fast path of ptxas' ``div.rn.f32``: ``y`` = refined reciprocal (as in :func:`rcp_rn`), ``q = a
    * y``, ``r = fma(-b, q, a)`` (exact), ``q = fma(r, y, q)`` = RN(a / b) by Markstein's theorem.
    Mirrored by torch's ``a / b``.
    """
    y = _rcp_approx(b)
    e = fma(neg(b), y, 1.0)
    y = fma(y, e, y)
    q = a * y
    r = fma(neg(b), q, a)
    return fma(r, y, q)


@triton.jit
def sqrt_rn_fast(x):
    """Correctly rounded fp32 ``sqrt(x)`` for ``x`` in ``[2**-101, FLT_MAX]``, branch-free.

    ``s = rsqrt(x); y = x * s; r = fma(-y, y, x); y = fma(r, s / 2, y)``: the instruction sequence
    ptxas emits for the fast path of ``sqrt.rn.f32`` (MUFU.RSQ, residual, one correction), which PTX
    specifies as correctly rounded; the slow path (a branch and a ``CALL``) only serves inputs below
    ``2**-101``, zero, negative, infinite or NaN. Callers floor their input at :data:`SQRT_FLOOR`. Under
    the interpreter ``rsqrt`` is ``1 / np.sqrt`` (checked for every fp32 significand and both exponent
    parities by ``tests/test_codec.py``). Mirrored by :func:`sqrt_rn_reference`.
    """
    s = tl.math.rsqrt(x)
    y = x * s
    r = fma(neg(y), y, x)
    return fma(r, s * 0.5, y)


@triton.jit
def sqrt_floor(x):
    """``sqrt(max(x, SQRT_FLOOR))`` correctly rounded (the square root every kernel of the package uses)."""
    return sqrt_rn_fast(tl.maximum(x, _SQRT_FLOOR))


@triton.jit
def round_to_int(y):
    """fp32 ``y`` (``|y| < 2**22``) rounded to the nearest integer, ties to even, as int32: the magic
    number ``1.5 * 2**23`` added in fp32 leaves ``round(y)`` in the low mantissa bits (one FADD, and
    the int8/uint8 store keeps the low byte). Mirrored by ``torch.round``."""
    return (y + _MAGIC).to(tl.int32, bitcast=True) - _MAGIC_BITS


@triton.jit
def block_scale_rcp(absmax):
    """``RN(1 / max(absmax, SCALE_FLOOR))``: the reciprocal a block's values are multiplied by before
    encoding (computed on the absmax's own shape, i.e. once per block and thread, not per element)."""
    return rcp_rn(tl.maximum(absmax, _SCALE_FLOOR))


@triton.jit
def encode_signed_scaled(x, inv_absmax):
    """fp32 values -> int8 codes of the signed code, given :func:`block_scale_rcp` of the block absmax."""
    r = x * inv_absmax
    y = sqrt_floor(tl.abs(r)) * 127.0
    return round_to_int(tl.where(r < 0.0, neg(y), y)).to(tl.int8)


@triton.jit
def encode_signed(x, absmax):
    """fp32 values -> int8 codes of the signed code, given the block absmax (broadcastable)."""
    return encode_signed_scaled(x, block_scale_rcp(absmax))


@triton.jit
def decode_signed(code, absmax):
    """int8 codes -> fp32 values of the signed code."""
    y = code.to(tl.float32) * (1.0 / 127.0)
    return y * tl.abs(y) * absmax


@triton.jit
def encode_unsigned_roots(root, inv_root_max):
    """uint8 codes of the unsigned code from ``root`` = :func:`sqrt_floor` of the values and
    ``inv_root_max`` = :func:`rcp_rn` of the block's largest root (a kernel that already needs
    ``sqrt(v)``, as AdamW's denominator does, reuses it: one square root per element, not two)."""
    y = sqrt_floor(root * inv_root_max) * 255.0
    return round_to_int(y).to(tl.uint8)


@triton.jit
def encode_unsigned(x, absmax):
    """fp32 values (>= 0) -> uint8 codes of the unsigned code."""
    return encode_unsigned_roots(sqrt_floor(x), rcp_rn(sqrt_floor(absmax)))


@triton.jit
def decode_unsigned(code, absmax):
    """uint8 codes -> fp32 values of the unsigned code."""
    y = code.to(tl.float32) * (1.0 / 255.0)
    y = y * y
    return y * y * absmax


# --------------------------------------------------------------------------------------------------
# Standalone kernels: one program per block of BLOCK elements.
# --------------------------------------------------------------------------------------------------


@triton.jit
def _quantize_kernel(x_ptr, code_ptr, absmax_ptr, n, SIGNED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if SIGNED:
        absmax = tl.max(tl.abs(x), axis=0)
        code = encode_signed(x, absmax)
    else:
        absmax = tl.max(x, axis=0)
        code = encode_unsigned(x, absmax)
    tl.store(code_ptr + offs, code, mask=mask)
    tl.store(absmax_ptr + pid, absmax)


@triton.jit
def _dequantize_kernel(code_ptr, absmax_ptr, out_ptr, n, SIGNED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    absmax = tl.load(absmax_ptr + pid)
    code = tl.load(code_ptr + offs, mask=mask, other=0)
    if SIGNED:
        x = decode_signed(code, absmax)
    else:
        x = decode_unsigned(code, absmax)
    tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=mask)


NUM_WARPS = 1
"""Warps per program of the standalone kernels: 8 elements per thread, so a block's codes move as
8-byte vectors and its fp32 values as 16-byte ones (4 warps gave 2 elements, scalar accesses)."""

AOT_SPECS = with_aligned([
    (kernel, signature_of(kernel, {"n": "i64"}, code_ptr="*i8" if signed else "*u8"),
     {"SIGNED": signed, "BLOCK": BLOCK_SIZE}, {"num_warps": NUM_WARPS})
    for kernel in (_quantize_kernel, _dequantize_kernel) for signed in (True, False)
])
"""(kernel, signature, constexprs, aligned, options) compiled ahead of time for sm_80 and sm_90 by the
tests: each kernel in the general form and with aligned pointers and sizes (what a GPU runs on
aligned tensors)."""


# --------------------------------------------------------------------------------------------------
# PyTorch reference (the specification, the CPU path and the test oracle).
# --------------------------------------------------------------------------------------------------


def block_rows(t: torch.Tensor, pad: bool = True, block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """``t``'s elements as ``(blocks, block_size)`` rows, the layout of every block-wise step: a view of a
    contiguous ``t`` that holds whole blocks; else a zero-padded copy (``pad=True``; write it back with
    :func:`.multitensor.copy_back`), or ``t`` itself (``pad=False``: the caller takes the partial-block path)."""
    n = t.numel()
    if n % block_size == 0:
        return t.reshape(-1, block_size)
    if not pad:
        return t
    return torch.nn.functional.pad(t.reshape(-1), (0, (-n) % block_size)).view(-1, block_size)


def sqrt_rn_reference(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 square root (the ``tl.sqrt_rn`` of the kernels).

    ``torch.sqrt`` on CPU fp32 is not always correctly rounded (measured: 0.6% of values off by one
    ulp with the vectorized kernel), which would flip codes at rounding boundaries. The square root
    of the fp64 value rounded once to fp32 is correctly rounded (53 >= 2 * 24 + 2 bits). Code
    compiled by torch.compile (inductor: hardware ``sqrtps``/``std::sqrt``, measured correctly
    rounded on 1M values) uses the fp32 square root directly.
    """
    if torch.compiler.is_compiling():
        return torch.sqrt(x)
    return torch.sqrt(x.to(torch.float64)).to(torch.float32)


def sqrt_floor_reference(x: torch.Tensor) -> torch.Tensor:
    """Reference of :func:`sqrt_floor`: correctly rounded ``sqrt(max(x, SQRT_FLOOR))``."""
    return sqrt_rn_reference(x.clamp(min=SQRT_FLOOR))


def block_scale_rcp_reference(absmax: torch.Tensor) -> torch.Tensor:
    """Reference of :func:`block_scale_rcp`: ``1 / max(absmax, SCALE_FLOOR)`` (IEEE division, as the kernel)."""
    return 1.0 / absmax.clamp(min=SCALE_FLOOR)


def encode_signed_reference(x: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """Reference of :func:`encode_signed`: fp32 ``x`` and broadcastable ``absmax`` -> int8 codes.

    ``code = round_half_even(127 * sign(r) * sqrt(|r|))`` with ``r = x * RN(1 / absmax)``: never above
    127 in magnitude (``|r| <= (1 + 2**-24)**2``, so ``127 * sqrt(|r|) < 127.5``)."""
    return encode_signed_scaled_reference(x, block_scale_rcp_reference(absmax))


def encode_signed_scaled_reference(x: torch.Tensor, inv_absmax: torch.Tensor) -> torch.Tensor:
    """Reference of :func:`encode_signed_scaled`: :func:`encode_signed_reference` given the blocks' reciprocal
    scale ``inv_absmax`` (:func:`block_scale_rcp_reference` of the absmax), for a caller that computes it once."""
    r = x * inv_absmax
    y = sqrt_floor_reference(r.abs()) * SIGNED_LEVELS
    return torch.round(torch.where(r < 0, -y, y)).to(torch.int8)


def decode_signed_reference(code: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """Reference of :func:`decode_signed`: int8 codes -> fp32 values."""
    y = code.to(torch.float32) * (1.0 / 127.0)
    return y * y.abs() * absmax


def encode_unsigned_roots_reference(root: torch.Tensor, inv_root_max: torch.Tensor) -> torch.Tensor:
    """Reference of :func:`encode_unsigned_roots`: ``round_half_even(255 * sqrt(root * inv_root_max))``."""
    return torch.round(sqrt_floor_reference(root * inv_root_max) * UNSIGNED_LEVELS).to(torch.uint8)


def encode_unsigned_reference(x: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """Reference of :func:`encode_unsigned`: fp32 ``x`` >= 0 -> uint8 codes, ``round_half_even(255 *
    sqrt(sqrt(x) * RN(1 / sqrt(absmax))))`` (square roots of inputs floored at :data:`SQRT_FLOOR`)."""
    return encode_unsigned_roots_reference(sqrt_floor_reference(x), 1.0 / sqrt_floor_reference(absmax))


def decode_unsigned_reference(code: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """Reference of :func:`decode_unsigned`: uint8 codes -> fp32 values."""
    y = code.to(torch.float32) * (1.0 / 255.0)
    y = y * y
    return y * y * absmax


def quantize_reference(
    x: torch.Tensor, signed: bool, block_size: int = BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` (any shape, any float dtype) block-wise.

    Returns ``(codes, absmax)``: codes flat int8 (signed) or uint8 (unsigned) with ``x.numel()``
    elements, absmax fp32 with ``num_blocks(x.numel())`` elements.
    """
    n = x.numel()
    blocks = block_rows(x.detach().reshape(-1).to(torch.float32), True, block_size)  # (nb, B)
    absmax = (blocks.abs() if signed else blocks).amax(dim=1, keepdim=True)  # (nb, 1)
    codes = encode_signed_reference(blocks, absmax) if signed else encode_unsigned_reference(blocks, absmax)
    return codes.reshape(-1)[:n].contiguous(), absmax.reshape(-1)


def dequantize_reference(
    codes: torch.Tensor, absmax: torch.Tensor, block_size: int = BLOCK_SIZE
) -> torch.Tensor:
    """Inverse of :func:`quantize_reference`: flat codes + absmax -> flat fp32 values."""
    n = codes.numel()
    blocks = block_rows(codes.reshape(-1), True, block_size)
    scale = absmax.reshape(-1, 1).to(torch.float32)
    if codes.dtype == torch.int8:
        values = decode_signed_reference(blocks, scale)
    elif codes.dtype == torch.uint8:
        values = decode_unsigned_reference(blocks, scale)
    else:
        raise TypeError(f"codes must be int8 (signed) or uint8 (unsigned), got {codes.dtype}")
    return values.reshape(-1)[:n]


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def quantize_blockwise(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` into ``(codes, absmax)``; Triton on CUDA, the reference elsewhere."""
    if choose(x.device, x.numel()) != "triton":
        return quantize_reference(x, signed)
    flat = x.detach().reshape(-1).to(torch.float32).contiguous()
    n = flat.numel()
    nb = num_blocks(n)
    codes = torch.empty(n, dtype=torch.int8 if signed else torch.uint8, device=x.device)
    absmax = torch.empty(nb, dtype=torch.float32, device=x.device)
    if n:
        _quantize_kernel[(nb,)](flat, codes, absmax, n, SIGNED=signed, BLOCK=BLOCK_SIZE, num_warps=NUM_WARPS,
                                enable_fp_fusion=False)
    return codes, absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """Flat fp32 values of ``(codes, absmax)``; Triton on CUDA, the reference elsewhere."""
    if choose(codes.device, codes.numel()) != "triton":
        return dequantize_reference(codes, absmax)
    flat = codes.reshape(-1).contiguous()
    n = flat.numel()
    out = torch.empty(n, dtype=torch.float32, device=codes.device)
    if n:
        signed = codes.dtype == torch.int8
        _dequantize_kernel[(num_blocks(n),)](
            flat, absmax.contiguous(), out, n, SIGNED=signed, BLOCK=BLOCK_SIZE, num_warps=NUM_WARPS,
            enable_fp_fusion=False,
        )
    return out
