"""Block-wise 8-bit code for optimizer states (the "power-companding" code).

A state tensor is flattened and cut into blocks of ``BLOCK_SIZE`` = 256 consecutive elements; each
block stores one fp32 scale (its absolute maximum) and one byte per element, so a state costs
``1 + 4/256 = 1.015625`` bytes per element.

Two codes, both closed-form (no table lookup, cheap on CPU and GPU):

* **signed** (first moments, momentum): ``x = s / absmax`` in [-1, 1], ``y = sign(x) * sqrt(|x|)``,
  ``code = round_half_away(127 * y)`` as int8 in [-127, 127]; decode ``y = code / 127``,
  ``s = y * |y| * absmax``.
* **unsigned** (second moments, >= 0): ``x = s / absmax`` in [0, 1], ``y = x ** (1/4)``,
  ``code = round_half_away(255 * y)`` as uint8; decode ``y = code / 255``, ``s = (y * y) ** 2 * absmax``.

Why these: companding spends the 8 bits where optimizer states live (many values far below the
block maximum), like bitsandbytes' dynamic-tree code (Dettmers et al., "8-bit Optimizers via
Block-wise Quantization", ICLR 2022) and FlashOptim's companding. The smallest non-zero magnitude
relative to the block maximum is (0.5/127)^2 = 1.6e-5 for the signed code and (0.5/255)^4 =
1.5e-11 for the unsigned code, so a second moment is practically never flushed to zero while its
first moment is not (the failure that makes 8-bit Adam explode). Measured on the 1024x1024,
200-step AdamW problem of ``tests/test_adamw8bit.py``: relative update error 0.018 and update
cosine 0.99986, against 0.023 / 0.99976 for bitsandbytes' AdamW8bit (see ``benchmarks/codec_study.py``).

Exactness contract: the Triton helpers below and the PyTorch reference perform the same fp32
operations in the same order with correctly rounded division and square root (``tl.div_rn``,
``tl.sqrt_rn``), and launchers disable FMA contraction, so both store identical codes.

This file holds, in order: Triton device helpers (imported by every fused optimizer kernel), the
standalone quantize/dequantize Triton kernels, their PyTorch reference, and the launchers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .aot import signature_of, with_aligned
from .dispatch import use_triton

__all__ = [
    "BLOCK_SIZE",
    "MIN_QUANTIZED_NUMEL",
    "num_blocks",
    "quantize_reference",
    "dequantize_reference",
    "quantize_blockwise",
    "dequantize_blockwise",
    "encode_signed",
    "decode_signed",
    "encode_unsigned",
    "decode_unsigned",
    "sqrt_rn_reference",
]

BLOCK_SIZE = 256
"""Elements per quantization block (one fp32 absmax each)."""

MIN_QUANTIZED_NUMEL = 4096
"""Tensors with fewer elements keep fp32 state (as bitsandbytes and torchao do)."""

SIGNED_LEVELS = 127.0
UNSIGNED_LEVELS = 255.0


def num_blocks(numel: int, block_size: int = BLOCK_SIZE) -> int:
    """Number of quantization blocks (one fp32 scale each) for a tensor of ``numel`` elements."""
    return (numel + block_size - 1) // block_size


# --------------------------------------------------------------------------------------------------
# Triton device helpers: called from inside fused kernels. ``x`` is fp32, ``absmax`` fp32 (> 0 or 0).
# --------------------------------------------------------------------------------------------------


@triton.jit
def _safe_scale(absmax):
    return tl.where(absmax > 0.0, absmax, 1.0)


@triton.jit
def encode_signed(x, absmax):
    """fp32 values -> int8 codes of the signed code, given the block absmax (broadcastable)."""
    r = tl.div_rn(x, _safe_scale(absmax))
    y = tl.sqrt_rn(tl.abs(r)) * 127.0
    q = tl.floor(y + 0.5)
    q = tl.minimum(q, 127.0)
    q = tl.where(r < 0.0, -q, q)
    return q.to(tl.int8)


@triton.jit
def decode_signed(code, absmax):
    """int8 codes -> fp32 values of the signed code."""
    y = code.to(tl.float32) * (1.0 / 127.0)
    return y * tl.abs(y) * absmax


@triton.jit
def encode_unsigned(x, absmax):
    """fp32 values (>= 0) -> uint8 codes of the unsigned code."""
    r = tl.div_rn(x, _safe_scale(absmax))
    y = tl.sqrt_rn(tl.sqrt_rn(tl.maximum(r, 0.0))) * 255.0
    q = tl.floor(y + 0.5)
    q = tl.minimum(q, 255.0)
    return q.to(tl.uint8)


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


def _pad_to_blocks(flat: torch.Tensor, block_size: int) -> torch.Tensor:
    pad = (-flat.numel()) % block_size
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, block_size)


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


def encode_signed_reference(x: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """Reference of :func:`encode_signed`: fp32 ``x`` and broadcastable ``absmax`` -> int8 codes."""
    r = x / torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    q = torch.floor(sqrt_rn_reference(r.abs()) * SIGNED_LEVELS + 0.5).clamp_(max=SIGNED_LEVELS)
    return torch.where(r < 0, -q, q).to(torch.int8)


def decode_signed_reference(code: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """Reference of :func:`decode_signed`: int8 codes -> fp32 values."""
    y = code.to(torch.float32) * (1.0 / 127.0)
    return y * y.abs() * absmax


def encode_unsigned_reference(x: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """Reference of :func:`encode_unsigned`: fp32 ``x`` >= 0 -> uint8 codes."""
    r = x / torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    y = sqrt_rn_reference(sqrt_rn_reference(r.clamp(min=0.0))) * UNSIGNED_LEVELS
    return torch.floor(y + 0.5).clamp_(max=UNSIGNED_LEVELS).to(torch.uint8)


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
    blocks = _pad_to_blocks(x.detach().reshape(-1).to(torch.float32), block_size)  # (nb, B)
    absmax = (blocks.abs() if signed else blocks).amax(dim=1, keepdim=True)  # (nb, 1)
    codes = encode_signed_reference(blocks, absmax) if signed else encode_unsigned_reference(blocks, absmax)
    return codes.reshape(-1)[:n].contiguous(), absmax.reshape(-1)


def dequantize_reference(
    codes: torch.Tensor, absmax: torch.Tensor, block_size: int = BLOCK_SIZE
) -> torch.Tensor:
    """Inverse of :func:`quantize_reference`: flat codes + absmax -> flat fp32 values."""
    n = codes.numel()
    blocks = _pad_to_blocks(codes.reshape(-1), block_size)
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
    if not use_triton(x):
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
    if not use_triton(codes):
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
