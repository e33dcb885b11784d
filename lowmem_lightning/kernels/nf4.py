"""4-bit NormalFloat (NF4) weights with double-quantized block scales (Dettmers et al., QLoRA, 2023).

**The code.** NF4 has 16 values, built as in the QLoRA paper: 8 quantiles of N(0, 1) on the positive
side and 7 on the negative side, taken at evenly spaced probabilities between ``0.5`` and
``delta = 1 - (1/(2*15) + 1/(2*16)) / 2`` (so the code is asymmetric with an exact zero), each side
normalized by its largest quantile so the values span [-1, 1]. ``nf4_code_values()`` derives them
(``torch.special.ndtri`` in float64); the tests check them against the table published in the paper.

**Quantizing a weight** of ``n`` elements (flattened, row-major) with block size ``B`` (64):

1. ``absmax[b] = max |w|`` over each block of ``B`` consecutive elements (fp32).
2. Double quantization (paper, section 3): ``mean = absmax.mean()``; ``d = absmax - mean`` is cut into
   groups of 256 scales; each group stores an fp32 step ``step = max|d| / 127`` and one int8 per
   scale, ``q = round_half_away(d / step)``. The scale used to decode block ``b`` is
   ``scale[b] = q[b] * step[b // 256] + mean``. Without double quantization ``scale = absmax``.
3. Each weight gets the index of the nearest code value to ``w / scale[b]`` (counting the 15
   midpoints between neighbouring values that it exceeds). The codes are chosen against the
   *decoded* scale, so the 8-bit scale error is partly absorbed by the 4-bit choice.
4. Two codes per byte: element ``2i`` in the high nibble, element ``2i + 1`` in the low nibble.

Decoding is ``w = NF4[code] * scale[b]``. Storage per weight with ``B = 64`` and double quantization:
``0.5 + 1/64 + 4/(64*256)`` bytes, plus 4 bytes per tensor = ~0.5159 bytes/param
(``nf4_storage_bytes``).

**Exactness contract.** The Triton kernels and the PyTorch reference perform the same fp32 operations
in the same order (FMA contraction disabled by the launchers), so both store identical codes and
decode identical values. Every division is the IEEE quotient: per weight and per scale through the
branch-free ``_ratio`` (:func:`.codec.div_rn_fast`, no slow-path ``CALL`` in the SASS; see its
docstring for why the codes are those of the exact quotient for every input), the one step per 256
scales through ``tl.div_rn``. The block size is a constexpr, so a weight's block is a shift. The mean
of the absmax is taken by ``torch.mean`` on both paths.

This file holds, in order: the Triton kernels, the PyTorch reference, the launchers.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .aot import signature_of, with_aligned
from .codec import div_rn_fast, neg
from .dispatch import choose

__all__ = [
    "NF4Weight",
    "BLOCK_SIZES",
    "SCALE_BLOCK",
    "nf4_code_values",
    "nf4_code",
    "nf4_storage_bytes",
    "quantize_nf4",
    "dequantize_nf4",
    "nf4_matmul",
    "quantize_nf4_reference",
    "dequantize_nf4_reference",
]

BLOCK_SIZES = (32, 64, 128, 256)
"""Supported weight block sizes (elements per fp32/8-bit scale); QLoRA uses 64."""

SCALE_BLOCK = 256
"""Block scales per second-level (fp32) step in double quantization, as in the paper."""

_ABSMAX_TILE = 4096  # elements per program of the absmax kernel
_PAIR_TILE = 1024  # bytes (= 2 weights each) per program of the pack / unpack kernels
_REFERENCE_CHUNK = 1 << 22  # elements per step of the reference encoder (bounds its scratch memory)


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _ratio(a, b):
    """``a / b`` (``b != 0``) as the reference divides, branch-free: :func:`.codec.div_rn_fast` (the IEEE
    quotient when ``b`` and ``a / b`` are normal numbers). A ``|b|`` outside ``[2**-100, 2**100]`` is
    first brought inside by multiplying both operands by ``2**64`` or ``2**-64`` (exact for ``b``; the
    quotient is unchanged unless ``a`` underflows, and then it is far below the smallest midpoint of
    either code, 0.04). A quotient below the normal range may come out one subnormal ulp away: it
    picks the same code. One beyond the fp32 range (NaN from the FMA residual) becomes ``+-1e30``,
    which picks the same saturated code as the reference's infinity."""
    mag = tl.abs(b)
    k = tl.where(mag < 7.888609052210118e-31, 18446744073709551616.0, tl.where(mag > 1.2676506002282294e30,
                                                                            5.421010862427522e-20, 1.0))
    q = div_rn_fast(a * k, b * k)
    return tl.where(q == q, q, tl.where((a < 0.0) != (b < 0.0), -1e30, 1e30))


@triton.jit
def _nf4_absmax_kernel(x_ptr, absmax_ptr, n, num_blocks, BLOCK: tl.constexpr, GROUPS: tl.constexpr):
    """absmax[b] = max |x| over block b; one program covers GROUPS blocks of BLOCK elements."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * GROUPS + tl.arange(0, GROUPS)  # block ids
    offs = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(absmax_ptr + rows, tl.max(tl.abs(x), axis=1), mask=rows < num_blocks)


@triton.jit
def _nf4_scale_quantize_kernel(absmax_ptr, mean_ptr, qscale_ptr, step_ptr, num_blocks, SBLOCK: tl.constexpr):
    """Double quantization: int8 codes of ``absmax - mean`` per group of SBLOCK scales, fp32 step."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * SBLOCK + tl.arange(0, SBLOCK)
    mask = offs < num_blocks
    mean = tl.load(mean_ptr)
    d = tl.where(mask, tl.load(absmax_ptr + offs, mask=mask, other=0.0) - mean, 0.0)
    step = tl.div_rn(tl.max(tl.abs(d), axis=0), 127.0)  # one per program: the IEEE quotient
    r = _ratio(d, tl.where(step > 0.0, step, 1.0))
    q = tl.minimum(tl.floor(tl.abs(r) + 0.5), 127.0)
    q = tl.where(r < 0.0, neg(q), q)
    tl.store(qscale_ptr + offs, q.to(tl.int8), mask=mask)
    tl.store(step_ptr + pid, step)


@triton.jit
def _nf4_block_scale(block, mask, absmax_ptr, qscale_ptr, step_ptr, mean_ptr, DOUBLE: tl.constexpr):
    """Decoded fp32 scale of each weight's block: q * step + mean (double) or the stored absmax."""
    if DOUBLE:
        q = tl.load(qscale_ptr + block, mask=mask, other=0).to(tl.float32)
        step = tl.load(step_ptr + block // 256, mask=mask, other=0.0)  # 256 == SCALE_BLOCK
        scale = q * step + tl.load(mean_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return scale


@triton.jit
def _nf4_encode(x, scale, mid_ptr):
    """Index of the nearest NF4 value to ``r = x / scale``: how many of the 15 ascending midpoints ``r``
    exceeds (the reference's ``searchsorted``), by a branch-free binary search: four comparisons, the
    thresholds gathered from the 15-entry table (L1-resident) instead of comparing with all 15."""
    r = _ratio(x, tl.where(scale != 0.0, scale, 1.0))
    k = tl.where(r > tl.load(mid_ptr + 7), 8, 0)
    k += tl.where(r > tl.load(mid_ptr + (k + 3)), 4, 0)
    k += tl.where(r > tl.load(mid_ptr + (k + 1)), 2, 0)
    return k + tl.where(r > tl.load(mid_ptr + k), 1, 0)


@triton.jit
def _cast_rne(v, dtype: tl.constexpr):
    """fp32 -> ``dtype`` rounding to nearest even, as torch does. bf16 is rounded on the integer bits
    (the interpreter's own fp32->bf16 cast truncates; on the GPU both ways give the same bits)."""
    if dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = v.to(dtype)
    return out


@triton.jit
def _nf4_pack_kernel(
    x_ptr, absmax_ptr, qscale_ptr, step_ptr, mean_ptr, mid_ptr, packed_ptr, n, n_pairs,
    BLOCK: tl.constexpr, DOUBLE: tl.constexpr, TILE: tl.constexpr,
):
    """Write one byte per pair of weights: code(x[2i]) << 4 | code(x[2i+1]).

    The weights are read as one contiguous run of ``2 * TILE`` elements and split into even and odd
    lanes in registers (a vector load when aligned; strided even/odd loads compile to scalar ones)."""
    pid = tl.program_id(0)
    pairs = pid.to(tl.int64) * TILE + tl.arange(0, TILE)
    even = pairs * 2
    mask_e = pairs < n_pairs  # == even < n; uniform over 16 pairs when n_pairs is a multiple of 16
    elems = pid.to(tl.int64) * (2 * TILE) + tl.arange(0, 2 * TILE)
    scale = _nf4_block_scale(even // BLOCK, mask_e, absmax_ptr, qscale_ptr, step_ptr, mean_ptr, DOUBLE)
    x = tl.load(x_ptr + elems, mask=elems < n, other=0.0).to(tl.float32)
    x_e, x_o = tl.split(tl.reshape(x, (TILE, 2)))
    byte = (_nf4_encode(x_e, scale, mid_ptr) << 4) | _nf4_encode(x_o, scale, mid_ptr)
    tl.store(packed_ptr + pairs, byte.to(tl.uint8), mask=mask_e)


@triton.jit
def _nf4_unpack_kernel(
    packed_ptr, absmax_ptr, qscale_ptr, step_ptr, mean_ptr, code_ptr, out_ptr, n, n_pairs,
    BLOCK: tl.constexpr, DOUBLE: tl.constexpr, TILE: tl.constexpr,
):
    """out[2i] = NF4[byte >> 4] * scale, out[2i+1] = NF4[byte & 15] * scale, cast to out's dtype.

    Even and odd values are interleaved in registers and written as one contiguous run of
    ``2 * TILE`` elements (a vector store when aligned)."""
    pid = tl.program_id(0)
    pairs = pid.to(tl.int64) * TILE + tl.arange(0, TILE)
    even = pairs * 2
    mask_e = pairs < n_pairs  # == even < n; uniform over 16 pairs when n_pairs is a multiple of 16
    scale = _nf4_block_scale(even // BLOCK, mask_e, absmax_ptr, qscale_ptr, step_ptr, mean_ptr, DOUBLE)
    byte = tl.load(packed_ptr + pairs, mask=mask_e, other=0).to(tl.int32)
    v_e = _cast_rne(tl.load(code_ptr + (byte >> 4)) * scale, out_ptr.dtype.element_ty)
    v_o = _cast_rne(tl.load(code_ptr + (byte & 15)) * scale, out_ptr.dtype.element_ty)
    out = tl.reshape(tl.join(v_e, v_o), (2 * TILE,))
    elems = pid.to(tl.int64) * (2 * TILE) + tl.arange(0, 2 * TILE)
    tl.store(out_ptr + elems, out, mask=elems < n)


_DTYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}


_NF4_TYPES = {"n": "i64", "n_pairs": "i64", "num_blocks": "i64", "qscale_ptr": "*i8",
              "packed_ptr": "*u8"}
"""Triton types of the NF4 kernels' arguments that are not ``*fp32`` pointers or fp32 scalars."""


def _aot_specs() -> list:
    specs = [
        (_nf4_absmax_kernel, signature_of(_nf4_absmax_kernel, _NF4_TYPES, x_ptr=ty),
         {"BLOCK": block, "GROUPS": _ABSMAX_TILE // block})
        for block in BLOCK_SIZES for ty in (("*bf16",) if block != 64 else ("*fp32", "*bf16", "*fp16"))
    ]
    specs.append((_nf4_scale_quantize_kernel, signature_of(_nf4_scale_quantize_kernel, _NF4_TYPES),
                  {"SBLOCK": SCALE_BLOCK}))
    # the block size is a constexpr (a shift, not a 64-bit division): QLoRA's 64 in every dtype, the
    # others in bf16
    variants = [(True, ty, 64) for ty in ("*fp32", "*bf16", "*fp16")] + [(True, "*bf16", 32)]
    variants += [(False, "*bf16", block) for block in (64, 128, 256)]
    for double, ty, block in variants:
        constexprs = {"BLOCK": block, "DOUBLE": double, "TILE": _PAIR_TILE}
        specs.append((_nf4_pack_kernel, signature_of(_nf4_pack_kernel, _NF4_TYPES, x_ptr=ty), constexprs))
        specs.append((_nf4_unpack_kernel, signature_of(_nf4_unpack_kernel, _NF4_TYPES, out_ptr=ty), constexprs))
    return specs


AOT_SPECS = with_aligned(_aot_specs())
"""(kernel, signature, constexprs) triples compiled ahead of time for sm_80 and sm_90 by the tests."""

SASS_TILE_ELEMENTS = {"_nf4_pack_kernel": lambda cx: 2 * cx["TILE"], "_nf4_unpack_kernel": lambda cx: 2 * cx["TILE"]}
"""Weights one program of the pack/unpack kernels handles (``TILE`` bytes = two weights each), for
:func:`.aot.tile_elements` (instructions per weight in ``benchmarks/sass_counts.py``)."""


# --------------------------------------------------------------------------------------------------
# PyTorch reference (the specification, the CPU path and the test oracle)
# --------------------------------------------------------------------------------------------------


def nf4_code_values() -> torch.Tensor:
    """Derive the 16 NF4 values (float64, ascending) from N(0, 1) quantiles, as in QLoRA.

    ``delta = 1 - (1/30 + 1/32) / 2``; positive side ``ndtri(linspace(delta, 0.5, 9))[:8]``, negative
    side ``-ndtri(linspace(delta, 0.5, 8))[:7]``, plus an exact 0, all divided by ``ndtri(delta)``.
    """
    delta = 1.0 - (1.0 / (2 * 15) + 1.0 / (2 * 16)) / 2.0
    positive = torch.special.ndtri(torch.linspace(delta, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(delta, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return values / values.abs().max()


@functools.cache
def _tables_cpu() -> tuple[torch.Tensor, torch.Tensor]:
    values = nf4_code_values()
    mids = torch.cat([(values[:-1] + values[1:]) / 2, torch.tensor([math.inf], dtype=torch.float64)])
    return values.to(torch.float32), mids.to(torch.float32)


@functools.cache
def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    values, mids = _tables_cpu()
    return values.to(device), mids.to(device)


@functools.cache
def _byte_table(device: torch.device) -> torch.Tensor:
    """(256, 2) fp32: the two NF4 values packed in each byte (high nibble first)."""
    values = _tables(device)[0]
    byte = torch.arange(256, device=device)
    return torch.stack([values[byte >> 4], values[byte & 15]], dim=1)


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 NF4 values as fp32, ascending (index = stored 4-bit code)."""
    return _tables(torch.device(device))[0]


def nf4_storage_bytes(numel: int, block_size: int = 64, double_quant: bool = True) -> int:
    """Bytes that ``quantize_nf4`` stores for a weight of ``numel`` elements (codes + all scales).

    ``ceil(numel/2)`` code bytes, plus per block either one int8 (double quantization: plus 4 bytes
    per 256 blocks and 4 bytes of mean) or one fp32 absmax.
    """
    _check_block_size(block_size)
    blocks = -(-numel // block_size)
    if double_quant:
        return -(-numel // 2) + blocks + 4 * -(-blocks // SCALE_BLOCK) + 4
    return -(-numel // 2) + 4 * blocks


@dataclass
class NF4Weight:
    """A weight in NF4: packed codes and block scales, plus what is needed to rebuild it.

    ``packed``: uint8, ``ceil(numel/2)`` bytes. With double quantization ``qscale`` (int8, one per
    block), ``scale_step`` (fp32, one per 256 blocks) and ``scale_mean`` (fp32, one element) are set
    and ``absmax`` is None; without it ``absmax`` (fp32, one per block) is set and the others are None.
    ``shape`` and ``dtype`` are those of the original weight.
    """

    packed: torch.Tensor
    absmax: torch.Tensor | None
    qscale: torch.Tensor | None
    scale_step: torch.Tensor | None
    scale_mean: torch.Tensor | None
    shape: torch.Size
    dtype: torch.dtype
    block_size: int

    @property
    def double_quant(self) -> bool:
        """Whether the block scales are themselves 8-bit quantized."""
        return self.qscale is not None

    @property
    def numel(self) -> int:
        """Number of weight elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of every stored tensor (codes and scales)."""
        tensors = (self.packed, self.absmax, self.qscale, self.scale_step, self.scale_mean)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _blocks(flat: torch.Tensor, block_size: int) -> torch.Tensor:
    pad = (-flat.numel()) % block_size
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, block_size) if pad else flat.view(-1, block_size)


def absmax_reference(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """fp32 max |x| of each block of ``block_size`` consecutive elements of flattened ``x``."""
    return _blocks(x.detach().reshape(-1).to(torch.float32), block_size).abs().amax(dim=1)


def scale_mean(absmax: torch.Tensor) -> torch.Tensor:
    """Mean of the block scales as a one-element fp32 tensor (shared by the Triton and reference paths)."""
    return absmax.mean(dtype=torch.float32).reshape(1)


def quantize_scales_reference(absmax: torch.Tensor, mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Double quantization of the block scales: ``(qscale int8 [nb], step fp32 [ceil(nb/256)])``."""
    d = _blocks(absmax - mean, SCALE_BLOCK)  # (groups, 256), padding is 0
    amax = d.abs().amax(dim=1, keepdim=True)
    # a tensor divisor: torch on CUDA divides by a Python scalar as a * (1 / b), up to 1 ulp away from the
    # IEEE quotient the kernel computes (tl.div_rn); found by the H200 run of gpu_check (fp32 weights)
    step = amax / torch.full_like(amax, 127.0)
    r = d / torch.where(step > 0, step, torch.ones_like(step))
    q = torch.floor(r.abs() + 0.5).clamp_(max=127.0)
    q = torch.where(r < 0, -q, q)
    return q.reshape(-1)[: absmax.numel()].to(torch.int8), step.reshape(-1)


def block_scales_reference(w: NF4Weight) -> torch.Tensor:
    """fp32 decoding scale of every block: ``q * step[b // 256] + mean``, or ``absmax``."""
    if not w.double_quant:
        return w.absmax
    step = w.scale_step.repeat_interleave(SCALE_BLOCK)[: w.qscale.numel()]
    return w.qscale.to(torch.float32) * step + w.scale_mean


def encode_reference(x: torch.Tensor, scale: torch.Tensor, block_size: int) -> torch.Tensor:
    """uint8 NF4 index (0..15, unpacked) of every element of flat fp32 ``x`` given per-block ``scale``.

    Works through ``_REFERENCE_CHUNK`` elements at a time so a large weight needs little scratch memory.
    """
    _, mids = _tables(x.device)
    blocks = _blocks(x, block_size)  # (nb, B)
    s = scale.reshape(-1, 1)
    s = torch.where(s != 0, s, torch.ones_like(s))
    codes = torch.empty(blocks.shape, dtype=torch.uint8, device=x.device)
    rows = max(1, _REFERENCE_CHUNK // block_size)
    for start in range(0, blocks.shape[0], rows):
        r = blocks[start : start + rows] / s[start : start + rows]
        # index = number of midpoints strictly below r
        codes[start : start + rows] = torch.searchsorted(mids[:15], r.contiguous(), out_int32=True).to(torch.uint8)
    return codes.reshape(-1)[: x.numel()]


def pack_reference(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, element 2i in the high nibble (odd length: last low nibble is 7 = 0.0)."""
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), 7)])
    pairs = codes.view(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def quantize_nf4_reference(x: torch.Tensor, block_size: int = 64, double_quant: bool = True) -> NF4Weight:
    """Reference NF4 quantization of ``x`` (any shape, any float dtype); see the module docstring."""
    flat = x.detach().reshape(-1).to(torch.float32)
    absmax = absmax_reference(flat, block_size)
    w = NF4Weight(None, absmax, None, None, None, x.shape, x.dtype, block_size)
    if double_quant:
        w.scale_mean = scale_mean(absmax)
        w.qscale, w.scale_step = quantize_scales_reference(absmax, w.scale_mean)
        w.absmax = None
    w.packed = pack_reference(encode_reference(flat, block_scales_reference(w), block_size))
    return w


def dequantize_nf4_reference(w: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Reference decoding ``NF4[code] * scale[block]`` (fp32 math), reshaped to ``w.shape``, cast to ``dtype``."""
    pairs = _byte_table(w.packed.device).index_select(0, w.packed.int())  # (bytes, 2): NF4[hi], NF4[lo]
    blocks = _blocks(pairs.reshape(-1)[: w.numel], w.block_size)
    out = (blocks * block_scales_reference(w).reshape(-1, 1)).reshape(-1)[: w.numel]
    return out.to(dtype or w.dtype).reshape(w.shape)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def _check_block_size(block_size) -> None:
    if isinstance(block_size, bool) or block_size not in BLOCK_SIZES:
        raise ValueError(f"Invalid block_size={block_size!r}: expected one of {', '.join(map(str, BLOCK_SIZES))}.")


def _check_float(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
    if x.dtype not in _DTYPES:
        raise TypeError(f"Invalid {name}.dtype={x.dtype}: expected one of float32, bfloat16, float16.")
    if x.numel() == 0:
        raise ValueError(f"Invalid {name} with shape {tuple(x.shape)}: expected at least one element.")


def _scale_args(w: NF4Weight) -> tuple:
    dummy_f = w.absmax if w.absmax is not None else w.scale_step
    dummy_q = w.qscale if w.qscale is not None else w.packed.view(torch.int8)
    if w.double_quant:
        return dummy_f, w.qscale, w.scale_step, w.scale_mean
    return w.absmax, dummy_q, dummy_f, dummy_f


def _quantize_triton(x: torch.Tensor, block_size: int, double_quant: bool) -> NF4Weight:
    flat = x.detach().reshape(-1).contiguous()
    n = flat.numel()
    nb = -(-n // block_size)
    absmax = torch.empty(nb, dtype=torch.float32, device=x.device)
    groups = _ABSMAX_TILE // block_size
    _nf4_absmax_kernel[(triton.cdiv(nb, groups),)](
        flat, absmax, n, nb, BLOCK=block_size, GROUPS=groups, enable_fp_fusion=False
    )
    w = NF4Weight(None, absmax, None, None, None, x.shape, x.dtype, block_size)
    if double_quant:
        w.scale_mean = scale_mean(absmax)
        w.qscale = torch.empty(nb, dtype=torch.int8, device=x.device)
        w.scale_step = torch.empty(triton.cdiv(nb, SCALE_BLOCK), dtype=torch.float32, device=x.device)
        _nf4_scale_quantize_kernel[(w.scale_step.numel(),)](
            absmax, w.scale_mean, w.qscale, w.scale_step, nb, SBLOCK=SCALE_BLOCK, enable_fp_fusion=False
        )
        w.absmax = None
    w.packed = torch.empty(-(-n // 2), dtype=torch.uint8, device=x.device)
    _, mids = _tables(x.device)
    _nf4_pack_kernel[(triton.cdiv(w.packed.numel(), _PAIR_TILE),)](
        flat, *_scale_args(w), mids, w.packed, n, w.packed.numel(),
        BLOCK=block_size, DOUBLE=double_quant, TILE=_PAIR_TILE, enable_fp_fusion=False,
    )
    return w


def quantize_nf4(x: torch.Tensor, block_size: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize ``x`` (fp32 / bf16 / fp16, any shape) to NF4 on its own device.

    Triton kernels on CUDA (:func:`.dispatch.choose`), the PyTorch reference elsewhere; both produce
    identical codes. ``block_size``: elements per scale, one of ``BLOCK_SIZES``. Returns an
    :class:`NF4Weight` of ~0.516 bytes per element (block 64, ``double_quant=True``).
    """
    _check_float(x, "x")
    _check_block_size(block_size)
    if not isinstance(double_quant, bool):
        raise TypeError(f"Invalid double_quant={double_quant!r}: expected True or False.")
    if choose(x.device, x.numel()) == "triton":
        return _quantize_triton(x, block_size, double_quant)
    return quantize_nf4_reference(x, block_size, double_quant)


def dequantize_nf4(w: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decode ``w`` to a dense tensor of ``w.shape`` in ``dtype`` (default: the original dtype).

    Triton on CUDA (one launch), the PyTorch reference elsewhere; the math is fp32 and the values
    are identical on both paths.
    """
    dtype = dtype or w.dtype
    if dtype not in _DTYPES:
        raise TypeError(f"Invalid dtype={dtype}: expected one of float32, bfloat16, float16.")
    if choose(w.packed.device, w.packed.numel()) != "triton":
        return dequantize_nf4_reference(w, dtype)
    n = w.numel
    out = torch.empty(n, dtype=dtype, device=w.packed.device)
    values, _ = _tables(w.packed.device)
    _nf4_unpack_kernel[(triton.cdiv(w.packed.numel(), _PAIR_TILE),)](
        w.packed, *_scale_args(w), values, out, n, w.packed.numel(),
        BLOCK=w.block_size, DOUBLE=w.double_quant, TILE=_PAIR_TILE, enable_fp_fusion=False,
    )
    return out.view(w.shape)


def nf4_matmul(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` with ``W`` (out, in) decoded from NF4 in ``x.dtype``: dequantize, then matmul.

    The dense weight is a temporary of ``out * in`` elements in ``x.dtype``, freed on return.
    """
    return torch.nn.functional.linear(x, dequantize_nf4(w, x.dtype), bias)
