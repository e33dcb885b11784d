"""Stochastic rounding of fp32 results into bf16 / fp16 parameters, identical on Triton and PyTorch.

Round-to-nearest loses every update smaller than half a unit in the last place (ulp): a bf16 weight
of 1.0 has an ulp of 2^-7, so an Adam step of lr=1e-4 never moves it. Stochastic rounding (Gupta et
al., "Deep Learning with Limited Numerical Precision", ICML 2015) rounds up with probability equal
to the distance to the lower neighbour in ulps, so ``E[round(x)] = x`` and small updates survive on
average. It replaces an fp32 master copy (2-4 extra bytes/param).

Randomness is a counter-based hash (the murmur3 32-bit finaliser) of ``(element index, seed)``, the
same integer arithmetic in Triton and in PyTorch, so the kernel and the reference round identically
and a run is reproducible from its seed. Optimizers derive ``seed`` from the step and tensor index,
by one formula (:func:`step_seed`) in two forms: AdamW passes a per-tensor base with the user's seed
folded in (``step_seed(0, i, base)``, advanced on the device by :func:`device_seed` /
:func:`seed_reference`); SGD, Adafactor and CAME pass the tensor index alone (:func:`index_seed` /
:func:`index_seed_reference`, base seed 0).

* bf16 (exact SR, integer-only): ``bits(x) + r16`` then truncate the low 16 bits, where ``r16`` is a
  uniform 16-bit random integer. The sign-magnitude layout makes this round the magnitude up with
  probability ``frac`` for either sign. Non-stochastic bf16 stores use integer round-to-nearest-even
  (the Triton interpreter's own bf16 cast truncates, the GPU's rounds: integers agree everywhere).
* fp16 (exact SR): take the two fp16 neighbours ``lo <= |x| <= hi`` (round to nearest, then step one
  code down or up), and pick ``hi`` when ``u < (|x| - lo) / (hi - lo)``, ``u`` uniform in [0, 1). The
  difference and the division by a power of two are exact in fp32, so both sides agree bit for bit
  (the kernel multiplies by the reciprocal built from the exponent bits: the same exact quotient,
  without a per-element ``div_rn`` and its slow-path call).

Mode switch (``bf16_rounding`` on every optimizer, :data:`BF16_ROUNDINGS`): ``"stochastic"`` (the
default, above) or ``"nearest"``: round-to-nearest-even, bitsandbytes' behaviour (its 8-bit optimizers
cast with ``.to(dtype)``), for users who want its bits or its relative-error bounds. In the kernels it
is the ``STOCHASTIC`` constexpr of :func:`store_param` (a compile-time branch, so the default kernel is
unchanged); in the references the ``stochastic`` argument (nearest = plain ``.to(dtype)``). A family
gets its nearest form from :func:`nearest_variant`.

File order: Triton helpers, PyTorch reference, mode switch.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal, get_args

import torch
import triton
import triton.language as tl

from .codec import neg

__all__ = [
    "hash_uniform",
    "store_param",
    "hash_uniform_reference",
    "round_param_reference",
    "masked_reference",
    "write_param_reference",
    "step_seed",
    "device_seed",
    "index_seed",
    "seed_reference",
    "index_seed_reference",
    "SEED_STEP",
    "SEED_INDEX",
    "SEED_BASE",
    "SEED_MASK",
    "BF16_ROUNDINGS",
    "BF16Rounding",
    "is_stochastic",
    "nearest_variant",
]

_GOLDEN = 2654435761
_MIX1 = 2246822507
_MIX2 = 3266489909
_MASK32 = 0xFFFFFFFF


SEED_STEP = 7_919
"""Seed stride per optimizer step (a prime): ``seed = (offset + step * SEED_STEP) & SEED_MASK``."""
SEED_INDEX = 104_729
"""Seed stride per tensor index (a prime): the offset of tensor ``i`` is ``i * SEED_INDEX``."""
SEED_BASE = 1_000_003
"""Seed stride per user base seed (a prime)."""
SEED_MASK = 0x7FFFFFFF
"""Seeds are 31-bit non-negative ints."""
_SEED_STEP = tl.constexpr(SEED_STEP)
_SEED_INDEX = tl.constexpr(SEED_INDEX)


def step_seed(step: int, tensor_index: int, base_seed: int = 0) -> int:
    """Seed (31-bit int) for the stochastic rounding of tensor ``tensor_index`` at optimizer step ``step``:
    ``(base_seed * SEED_BASE + step * SEED_STEP + tensor_index * SEED_INDEX) & SEED_MASK``."""
    return (base_seed * SEED_BASE + step * SEED_STEP + tensor_index * SEED_INDEX) & SEED_MASK


# --------------------------------------------------------------------------------------------------
# Triton helpers
# --------------------------------------------------------------------------------------------------


@triton.jit
def device_seed(step, offset):
    """Seed of fp32 step counter ``step`` (a loaded scalar): ``(step * SEED_STEP + offset) & SEED_MASK``,
    ``offset`` = ``step_seed(0, tensor_index, base_seed)`` (int64), so it equals :func:`step_seed`."""
    return (step.to(tl.int64) * _SEED_STEP + offset.to(tl.int64)) & 0x7FFFFFFF


@triton.jit
def index_seed(step, tensor_index):
    """:func:`device_seed` of tensor ``tensor_index`` with base seed 0 (``step_seed(step, tensor_index)``)."""
    return device_seed(step, tensor_index.to(tl.int64) * _SEED_INDEX)


@triton.jit
def _hash_bits(offs, seed):
    h = offs.to(tl.uint32) * tl.full((), 2654435761, tl.uint32) + seed.to(tl.uint32)
    h = h ^ (h >> 16)
    h = h * tl.full((), 2246822507, tl.uint32)
    h = h ^ (h >> 13)
    h = h * tl.full((), 3266489909, tl.uint32)
    return h ^ (h >> 16)


@triton.jit
def hash_uniform(offs, seed):
    """Uniform fp32 in [0, 1) from element indices ``offs`` and an int ``seed`` (24 random bits)."""
    return (_hash_bits(offs, seed) >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def _to_bf16(x, offs, seed, STOCHASTIC: tl.constexpr):
    bits = x.to(tl.uint32, bitcast=True)
    if STOCHASTIC:
        bits = bits + (_hash_bits(offs, seed) >> 16)
    else:
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _pow2_reciprocal(d):
    """``1 / d`` for a normal fp32 power of two ``d`` (exact, from the exponent bits: no division)."""
    return (0x7F000000 - d.to(tl.int32, bitcast=True)).to(tl.float32, bitcast=True)


@triton.jit
def _to_fp16(x, offs, seed, STOCHASTIC: tl.constexpr):
    if STOCHASTIC:
        a = tl.abs(x)
        nearest = a.to(tl.float16)
        near32 = nearest.to(tl.float32)
        near_bits = nearest.to(tl.int16, bitcast=True)
        other = tl.where(near32 > a, near_bits - 1, near_bits + 1).to(tl.float16, bitcast=True).to(tl.float32)
        lo = tl.minimum(near32, other)
        hi = tl.maximum(near32, other)
        p = (a - lo) * _pow2_reciprocal(hi - lo)  # == (a - lo) / (hi - lo), exact: a power-of-two divisor
        r = tl.where(hash_uniform(offs, seed) < p, hi, lo)
        r = tl.where(near32 == a, a, r)
        return tl.where(x < 0.0, neg(r), r).to(tl.float16)
    return x.to(tl.float16)


@triton.jit
def store_param(ptr, x, offs, mask, seed, STOCHASTIC: tl.constexpr):
    """Store fp32 ``x`` into a param buffer of dtype fp32, bf16 or fp16 (stochastically rounded if asked)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        tl.store(ptr + offs, _to_bf16(x, offs, seed, STOCHASTIC), mask=mask)
    elif ptr.dtype.element_ty == tl.float16:
        tl.store(ptr + offs, _to_fp16(x, offs, seed, STOCHASTIC), mask=mask)
    else:
        tl.store(ptr + offs, x, mask=mask)


# --------------------------------------------------------------------------------------------------
# PyTorch reference
# --------------------------------------------------------------------------------------------------


def seed_reference(step: torch.Tensor, offset: torch.Tensor | int) -> torch.Tensor:
    """Reference of :func:`device_seed` (int64 tensor of ``step``'s shape)."""
    offset = offset.to(torch.int64) if isinstance(offset, torch.Tensor) else offset
    return (step.to(torch.int64) * SEED_STEP + offset) & SEED_MASK


def index_seed_reference(step: torch.Tensor, tensor_index: torch.Tensor | int) -> torch.Tensor:
    """Reference of :func:`index_seed`: ``step_seed(step, tensor_index)`` computed on the device."""
    index = tensor_index.to(torch.int64) if isinstance(tensor_index, torch.Tensor) else tensor_index
    return seed_reference(step, index * SEED_INDEX)


def _as_int32(value: int) -> int:
    """The int32 of the low 32 bits of ``value`` (two's complement)."""
    return ((value & _MASK32) ^ 0x80000000) - 0x80000000


_GOLDEN_I32, _MIX1_I32, _MIX2_I32 = _as_int32(_GOLDEN), _as_int32(_MIX1), _as_int32(_MIX2)
_HIGH16 = _as_int32(0xFFFF0000)


def _seed_int32(seed: int | torch.Tensor):
    """``seed`` mod 2**32 as int32 (a Python int, or a tensor of any integer dtype)."""
    if isinstance(seed, torch.Tensor):
        return seed if seed.dtype == torch.int32 else seed.to(torch.int32)  # low 32 bits, two's complement
    return _as_int32(int(seed))


def _hash_bits_reference(offs: torch.Tensor, seed: int | torch.Tensor) -> torch.Tensor:
    """:func:`_hash_bits` as int32 tensors: the uint32 hash's 32 bits in two's complement. Every product and sum
    wraps mod 2**32 in int32 exactly as in uint32, and a logical right shift is the arithmetic one masked to the
    remaining bits, so the bits are the kernel's. int32, not int64: inductor vectorizes it on the CPU (an int64
    form ran ~25 ns per element compiled, against ~2 for the rest of a bf16 AdamW step)."""
    h = _premix(offs.to(torch.int32) * _GOLDEN_I32 + _seed_int32(seed))
    return h ^ ((h >> 16) & 0xFFFF)


def _premix(h: torch.Tensor) -> torch.Tensor:
    """The hash's mixing of its int32 start ``h = offs * GOLDEN + seed`` up to (not including) its last
    ``h ^ (h >>> 16)``, which leaves the high 16 bits as they are: the bf16 rounding reads only those
    (:func:`_flat_high16_reference`), so it skips that step (3 ops per element)."""
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * _MIX1_I32
    h = h ^ ((h >> 13) & 0x7FFFF)
    return h * _MIX2_I32


_COLUMN_TABLE = ((torch.arange(4096, dtype=torch.int64) * _GOLDEN) & _MASK32).to(torch.int32)
"""``column * GOLDEN`` mod 2**32 (int32) for columns ``0..4095``: the column part of the hash start of a 2-d
tensor, a loaded vector in a compiled loop. Built in the graph it is folded into an index expression, and the
compiled loop assembled that vector lane by lane (~40 instructions per 16 elements, most of the rounding's cost)."""


def _flat_start(shape: torch.Size, seed, device) -> torch.Tensor:
    """``arange(numel).view(shape) * GOLDEN + seed`` (int32, mod 2**32), the hash start of row-major element
    indices: for a 2-d CPU tensor of at most 4096 columns as ``row * width * GOLDEN + seed`` (per row) plus
    ``column * GOLDEN`` (:data:`_COLUMN_TABLE`), the same bits."""
    seed = _seed_int32(seed)
    if len(shape) == 2 and torch.device(device).type == "cpu" and shape[1] <= _COLUMN_TABLE.numel():
        rows, width = shape
        row_start = (torch.arange(rows, dtype=torch.int32, device=device) * width * _GOLDEN_I32).view(rows, 1)
        return _COLUMN_TABLE[:width].view(1, width) + (row_start + seed)
    numel = 1
    for size in shape:
        numel *= size
    return _arange(numel, device).view(shape).to(torch.int32) * _GOLDEN_I32 + seed


def _flat_high16_reference(shape: torch.Size, seed, device) -> torch.Tensor:
    """``_hash_bits(offs, seed) >> 16`` of the kernel for row-major element indices ``offs`` of ``shape``, int32
    in ``[0, 65536)``: the high 16 bits of the pre-mix (:func:`_premix`)."""
    return (_premix(_flat_start(shape, seed, device)) >> 16) & 0xFFFF


def hash_uniform_reference(offs: torch.Tensor, seed: int | torch.Tensor) -> torch.Tensor:
    """Reference of :func:`hash_uniform`."""
    return ((_hash_bits_reference(offs, seed) >> 8) & 0xFFFFFF).to(torch.float32) * (1.0 / 16777216.0)


def _bf16_reference(x: torch.Tensor, offs: torch.Tensor | None, seed, stochastic: bool) -> torch.Tensor:
    """:func:`_to_bf16` of contiguous ``x``; ``offs=None``: row-major element indices (:func:`_flat_start`)."""
    # the rounded value as an fp32 with zero low bits: exactly a bf16, so the cast is exact (a NaN param comes out
    # as the canonical NaN, where the kernel keeps its payload)
    return _bf16_rounded_reference(x, offs, seed, stochastic).to(torch.bfloat16)


def _bf16_rounded_reference(x: torch.Tensor, offs: torch.Tensor | None, seed, stochastic: bool) -> torch.Tensor:
    """fp32 ``x`` rounded to bf16 as :func:`_bf16_reference` does, returned as fp32 (the bf16 bits in the high half,
    zeros below: every value exactly a bf16)."""
    bits = x.view(torch.int32)
    if stochastic:
        if offs is None:
            high16 = _flat_high16_reference(x.shape, seed, x.device)
        else:
            high16 = (_premix(offs.to(torch.int32) * _GOLDEN_I32 + _seed_int32(seed)) >> 16) & 0xFFFF
        bits = bits + high16  # wraps mod 2**32 as the uint32 sum
    else:
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
    # No int16 in the graph: inductor does not vectorize a loop holding one (the whole fused step ran scalar, ~25 ns
    # per element).
    return (bits & _HIGH16).view(torch.float32)


def _fp16_reference(x: torch.Tensor, offs: torch.Tensor, seed, stochastic: bool) -> torch.Tensor:
    if not stochastic:
        return x.to(torch.float16)
    a = x.abs()
    nearest = a.to(torch.float16)
    near32 = nearest.to(torch.float32)
    near_bits = nearest.view(torch.int16)
    other = torch.where(near32 > a, near_bits - 1, near_bits + 1).view(torch.float16).to(torch.float32)
    lo = torch.minimum(near32, other)
    hi = torch.maximum(near32, other)
    r = torch.where(hash_uniform_reference(offs, seed) < (a - lo) / (hi - lo), hi, lo)
    r = torch.where(near32 == a, a, r)
    return torch.where(x < 0, -r, r).to(torch.float16)


def _arange(n: int, device) -> torch.Tensor:
    """Element indices ``0..n-1`` for the hash: int32 (what it computes in) when they fit."""
    return torch.arange(n, device=device, dtype=torch.int32 if n <= 2**31 else torch.int64)


def round_param_reference(
    x: torch.Tensor, dtype: torch.dtype, seed: int | torch.Tensor = 0, stochastic: bool = True, offs=None
) -> torch.Tensor:
    """Round fp32 ``x`` to ``dtype`` exactly as :func:`store_param` does.

    ``offs`` are the element indices used for the hash (default: ``arange`` over the flattened
    tensor). fp32 is returned unchanged.
    """
    if dtype == torch.float32:
        return x
    if dtype == torch.bfloat16:
        return _bf16_reference(x.contiguous(), offs, seed, stochastic)
    if offs is None:
        offs = _arange(x.numel(), x.device).view(x.shape)
    if dtype == torch.float16:
        return _fp16_reference(x, offs, seed, stochastic)
    raise TypeError(f"param dtype must be float32, bfloat16 or float16, got {dtype}")


def masked_reference(ok: torch.Tensor | None, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new`` where ``ok``, else ``old``; ``ok=None``: the caller checked on the host that the update
    applies, so no ``where`` on mutated state enters a compiled graph (measured 4x slower with it)."""
    return new if ok is None else torch.where(ok, new, old)


def write_param_reference(param: torch.Tensor, new_p: torch.Tensor, ok: torch.Tensor | None, seed,
                          stochastic: bool = True, staging: torch.Tensor | None = None) -> None:
    """Write fp32 ``new_p`` into contiguous ``param`` (same shape) as :func:`store_param` does (bf16/fp16
    stochastically rounded with ``seed``, element indices in flat order, or rounded to nearest-even
    when ``stochastic`` is False) where ``ok``.

    ``staging`` (bf16 ``param``, ``ok`` None): an fp32 tensor of ``param``'s shape that receives the rounded values
    instead (each exactly a bf16); the caller then copies it into ``param`` (``param.copy_(staging)``: the same
    bits) outside its compiled graph. In a compiled CPU loop, which inductor tiles for fp32, a bf16 store is a
    masked half-width vector store after a software rounding, slow on AMD Zen 4; ATen's copy stores whole
    vectors (``benchmarks/RESULTS.md``, "bf16 CPU step: per-row terms and sqrt(v) materialized, bf16 params
    staged")."""
    if staging is not None:
        if param.dtype != torch.bfloat16 or ok is not None:
            raise ValueError(f"staging is for bf16 params checked on the host (ok=None), got a {param.dtype} param "
                             f"and ok={'None' if ok is None else 'a tensor'}")
        staging.copy_(_bf16_rounded_reference(new_p.contiguous(), None, seed, stochastic))
        return
    if param.dtype != torch.float32:  # element indices in flat order: round_param_reference's default
        new_p = round_param_reference(new_p, param.dtype, seed, stochastic)
    param.copy_(masked_reference(ok, new_p, param))


# --------------------------------------------------------------------------------------------------
# Mode switch
# --------------------------------------------------------------------------------------------------

BF16Rounding = Literal["stochastic", "nearest"]
"""The type of every optimizer's ``bf16_rounding`` option: how bf16/fp16 params are written (see the module
docstring)."""

BF16_ROUNDINGS = get_args(BF16Rounding)
"""The values of every optimizer's ``bf16_rounding`` option (default ``"stochastic"``)."""


def is_stochastic(bf16_rounding: str) -> bool:
    """True for ``"stochastic"``, False for ``"nearest"``; ``ValueError`` naming the option otherwise."""
    if bf16_rounding not in BF16_ROUNDINGS:
        raise ValueError(
            f"Invalid bf16_rounding={bf16_rounding!r}: expected one of {', '.join(map(repr, BF16_ROUNDINGS))}."
        )
    return bf16_rounding == "stochastic"


def nearest_variant(family, launch, host):
    """``family`` (a :class:`.dispatch.Family` whose ``launch`` / ``host`` take a ``stochastic`` keyword,
    default True) with both bound to ``stochastic=False``: the same kernels and references storing
    bf16/fp16 params rounded to nearest-even. Named ``<name>_nearest``."""
    return dataclasses.replace(family, name=f"{family.name}_nearest",
                               launch=functools.partial(launch, stochastic=False),
                               host=functools.partial(host, stochastic=False))
