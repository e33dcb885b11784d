"""Block-wise 8-bit state of a sharded param, presented so a checkpoint loads on another world size.

A DTensor param's 8-bit state is kept per local shard: flat codes with one fp32 scale per block of
256 *local* elements (:func:`~.sharding.block_state_len`), or for ``aligned`` state (Muon's momentum) of
the whole tensor's elements, the shard starting ``head`` elements into its first block
(:func:`~.sharding.aligned_blocks`; such a checkpoint resumes bit for bit on any world size: every block of
the loading run lies within one saved block and keeps its codes and scale). Where the blocks fall depends on
the sharding, so the raw buffers cannot be resharded by ``torch.distributed.checkpoint`` (DCP). For
params sharded only along dim 0 (FSDP2's ``Shard(0)``, replicated mesh dims allowed) the state dict
presents each codes/scales pair in a **row form** whose global shape depends on the param alone:

* codes: int8/uint8 of the param's shape and placements (one code per element, so DCP moves them to
  any sharding exactly);
* scales (``rows``): fp32 ``(shape[0], 2 + W)`` with the param's placements. Row ``i`` (``C`` =
  elements per dim-0 slice) holds ``phase`` = the offset of its first element inside its block,
  ``last`` = 1 on the last row of a shard (where a block may end early), then the scales of the
  ``W`` blocks it can intersect (:func:`row_width`), in order, zero-padded.

Loading (:func:`blocks_from_rows`) rebuilds this run's local layout. Every block of the new layout
that covers exactly one saved block (same elements) keeps its codes and scale bit for bit: all
blocks when the world size is unchanged, and when shard boundaries fall on block boundaries in both
runs (e.g. ``shape[1:]`` a multiple of 256 elements). Other blocks are decoded with their saved
scales and re-encoded (:func:`~lowmem_lightning.kernels.codec.quantize_blockwise`): each value moves
by at most one code step of its new block. No full-precision copy of the state exists at any time:
the conversion runs per tensor, in passes of :data:`CHUNK` elements, so its temporaries stay a few
times ``CHUNK`` whatever the tensor's size.

4-bit state (AdamW 4-bit: blocks of 128, two codes per byte) takes the same form through :data:`CODEC4`:
on save its codes are unpacked to one per element (m as int8 -7..7, v as uint8 0..15: a copy the size
of the param in bytes), the rows hold scales of 128-element blocks, and on load the codes are packed
again; moved blocks are decoded with the 4-bit code and re-encoded (m rounded to the nearest level).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from ..kernels.adamw4bit import (
    BLOCK4,
    decode_m4_reference,
    decode_v4_reference,
    pack_nibbles_reference,
    quantize4_reference,
    unpack_nibbles_reference,
)
from ..kernels.codec import (
    BLOCK_SIZE,
    decode_signed_reference,
    decode_unsigned_reference,
    quantize_blockwise,
)

__all__ = [
    "CODEC4",
    "CODEC8",
    "Codec",
    "blocks_from_rows",
    "code_step",
    "decode_rows",
    "row_width",
    "rows_from_blocks",
    "slice_numel",
]

_META = 2  # phase, last


class Codec(NamedTuple):
    """A block-wise code as the row form handles it: codes are one per element (int8 = signed, uint8 =
    unsigned), ``block`` elements per fp32 scale.

    ``decode(codes, scale)``: fp32 values (``scale`` per element); ``encode(values, signed)``: ``(codes,
    absmax)`` of flat fp32 values, one code per element, one scale per ``block``; ``step(codes, scale)``:
    per element, an upper bound on the distance to a neighbouring code's value (one code step);
    ``top``: ``(signed, unsigned)`` code whose value is the block scale; ``pack`` / ``unpack``: the
    optimizer's stored codes from / to one code per element (identity for 8-bit codes)."""

    block: int
    decode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    encode: Callable[[torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor]]
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    top: tuple[int, int]
    pack: Callable[[torch.Tensor], torch.Tensor]
    unpack: Callable[[torch.Tensor, int, bool], torch.Tensor]


def slice_numel(shape: tuple[int, ...] | torch.Size) -> int:
    """Elements per dim-0 slice (``C``) of a param of ``shape``: ``prod(shape[1:])`` (1 for a 1-D param)."""
    return math.prod(shape[1:])


def row_width(shape: tuple[int, ...] | torch.Size, block: int = BLOCK_SIZE) -> int:
    """Columns of the row form's scales tensor: 2 + the most blocks of ``block`` (256) that ``C`` consecutive
    elements of one shard can intersect (1 for ``C`` = 1, else ``(C - 1) // block + 2``)."""
    c = max(1, slice_numel(shape))
    return _META + (1 if c == 1 else (c - 1) // block + 2)


def rows_from_blocks(absmax: torch.Tensor, local_shape: tuple[int, ...], width: int,
                     block: int = BLOCK_SIZE, head: int = 0) -> torch.Tensor:
    """The row form (fp32 ``(local_shape[0], width)``) of a local shard's block ``absmax`` (blocks of
    ``block`` (256) over the shard's flat elements, the first block starting ``head`` elements before the
    shard's first element: 0 for blocks per shard, :func:`~.sharding.aligned_blocks` for the whole tensor's)."""
    rows, c = (local_shape[0] if local_shape else 1), slice_numel(local_shape)
    out = torch.zeros(rows, width, dtype=torch.float32, device=absmax.device)
    if rows == 0 or c == 0:
        return out
    start = head + torch.arange(rows, device=absmax.device, dtype=torch.int64) * c  # (rows,) position of each row
    first, last = start // block, (start + c - 1) // block
    index = first[:, None] + torch.arange(width - _META, device=absmax.device)[None, :]  # (rows, W)
    valid = index <= last[:, None]
    out[:, 0] = (start % block).to(torch.float32)
    out[-1, 1] = 1.0
    out[:, _META:] = torch.where(valid, absmax[index.clamp(max=absmax.numel() - 1)], 0.0)
    return out


def _layout_unchanged(rows: torch.Tensor, c: int, block: int, head: int = 0) -> bool:
    """Whether the saved rows were laid out exactly as this shard would lay them out (same phases, the
    shard's last row the only one marked last)."""
    n = rows.shape[0]
    phase = (head + torch.arange(n, dtype=torch.int64, device=rows.device) * c) % block
    last = torch.zeros(n, dtype=torch.float32, device=rows.device)
    if n:
        last[-1] = 1.0
    return bool(torch.equal(rows[:, 0], phase.to(torch.float32)) and torch.equal(rows[:, 1], last))


def _saved_scale_at(rows: torch.Tensor, flat: torch.Tensor, c: int, block: int) -> torch.Tensor:
    """The saved block scale of the local flat elements ``flat`` (int64 indices)."""
    i, col = flat // c, flat % c
    j = (rows[i, 0].to(torch.int64) + col) // block
    return rows[i, _META + j]


CHUNK = 1 << 15
"""Elements converted per pass (a multiple of 256 and 128): bounds the temporaries of a conversion."""


def _boundaries(rows: torch.Tensor, flat: torch.Tensor, c: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bool ``(starts, ends)`` of the local flat elements ``flat``: a saved block starts / ends there."""
    i, col = flat // c, flat % c
    pos = rows[i, 0].to(torch.int64) + col
    starts = pos % block == 0
    ends = ((pos + 1) % block == 0) | ((rows[i, 1] > 0) & (col == c - 1))
    return starts, ends


def _exact_blocks(rows: torch.Tensor, flat: torch.Tensor, c: int, block: int, lead: int = 0,
                  within: bool = False) -> torch.Tensor:
    """bool, one per block of ``block`` of ``flat`` (consecutive local elements, the first block missing its
    first ``lead`` elements): the blocks of the local layout whose codes and saved scale are kept. ``within``
    False: those that cover exactly one saved block; True: those whose elements all lie in one saved block (a
    scale that decodes them exactly, e.g. a block of the whole tensor split between shards)."""
    starts, ends = _boundaries(rows, flat, c, block)
    blocks = -(-(lead + flat.numel()) // block)
    pad = blocks * block - lead - flat.numel()
    starts = torch.nn.functional.pad(starts, (lead, pad)).view(blocks, block)
    ends = torch.nn.functional.pad(ends, (lead, pad)).view(blocks, block)
    head = torch.zeros((blocks,), dtype=torch.int64, device=flat.device)
    head[0] = lead
    tail = torch.full((blocks,), block - 1, dtype=torch.int64, device=flat.device)
    tail[-1] = lead + flat.numel() - 1 - (blocks - 1) * block
    if within:  # no saved block starts after a block's first element or ends before its last
        position = torch.arange(block, device=flat.device)[None, :]
        inside_start = starts & (position > head[:, None])
        inside_end = ends & (position < tail[:, None])
        return ~(inside_start.any(1) | inside_end.any(1))
    return starts.gather(1, head[:, None]).squeeze(1) & ends.gather(1, tail[:, None]).squeeze(1) & (ends.sum(1) == 1)


def blocks_from_rows(codes: torch.Tensor, rows: torch.Tensor, length: int, codec: Codec | None = None,
                     head: int = 0, within: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
    """This shard's flat ``(codes, absmax)``, padded to ``length`` elements, from its row form.

    Args:
        codes: the local shard's codes, of its shape, one per element (int8 signed or uint8 unsigned code);
            the codes of moved blocks are re-encoded **in place** (the result's codes are this tensor's elements).
        rows: the local rows of the saved scales (see the module docstring).
        length: the padded local length of this run (:func:`~.sharding.block_state_len`).
        codec: the code (:data:`CODEC8`, the default, or :data:`CODEC4`); the result's codes are still one
            per element (``codec.pack`` stores them).
        head: where the shard's first element sits in the first block of this run's layout (0: blocks per
            shard; :func:`~.sharding.aligned_blocks`: the whole tensor's blocks), zero codes before it.
        within: keep the codes and saved scale of every block whose elements all lie in one saved block (for
            blocks of the whole tensor, split between shards); False: only of blocks that cover exactly one.

    Returns ``(codes, absmax)`` and ``moved``: the number of elements whose block changed (decoded and
    re-encoded; 0 when every block is kept bit for bit). Works in passes of :data:`CHUNK` elements, so
    its temporaries stay a few times ``CHUNK`` whatever the tensor's size. ``ValueError`` when ``rows``
    does not fit.
    """
    codec = codec or CODEC8
    block, shape = codec.block, tuple(codes.shape)
    n, c = codes.numel(), slice_numel(shape)
    if rows.dim() != 2 or rows.shape[0] != (shape[0] if shape else 1) or rows.shape[1] != row_width(shape, block):
        raise ValueError(
            f"Invalid optimizer state dict: block scales in row form are {tuple(rows.shape)}, expected "
            f"({shape[0] if shape else 1}, {row_width(shape, block)}) for codes of shape {shape}."
        )
    flat = codes.reshape(-1)
    if n == 0:
        return _padded(flat, torch.zeros(0, device=codes.device), length, block) + (0,)
    first = (torch.arange(-(-(head + n) // block), dtype=torch.int64, device=codes.device) * block - head).clamp(min=0)
    absmax = _saved_scale_at(rows, first, c, block)  # right for every block kept
    if _layout_unchanged(rows, c, block, head):
        return _padded(flat, absmax, length, block, head) + (0,)
    moved = 0
    for start in range(0, head + n, CHUNK):  # positions of this run's layout
        lead = head if start == 0 else 0
        elements = torch.arange(max(0, start - head), min(n, start + CHUNK - head), dtype=torch.int64,
                                device=codes.device)
        exact = _exact_blocks(rows, elements, c, block, lead, within)
        if bool(exact.all()):
            continue
        part = flat[elements[0]: elements[-1] + 1]
        values = codec.decode(part, _saved_scale_at(rows, elements, c, block))
        new_codes, new_absmax = codec.encode(torch.nn.functional.pad(values, (lead, 0)), codes.dtype == torch.int8)
        kept = exact.repeat_interleave(block)[lead: lead + part.numel()]
        part.copy_(torch.where(kept, part, new_codes[lead:]))
        scales = absmax[start // block: start // block + exact.numel()]
        scales.copy_(torch.where(exact, scales, new_absmax))
        moved += part.numel() - int(kept.sum())
    return _padded(flat, absmax, length, block, head) + (moved,)


def decode_rows(codes: torch.Tensor, rows: torch.Tensor, codec: Codec | None = None) -> torch.Tensor:
    """fp32 values (flat) of codes in row form (codes of a shard's or the whole param's shape, one per element,
    and their rows) in ``codec`` (default :data:`CODEC8`)."""
    codec = codec or CODEC8
    c = slice_numel(tuple(codes.shape))
    flat = codes.reshape(-1)
    return codec.decode(flat, _saved_scale_at(rows, torch.arange(flat.numel(), device=codes.device), c, codec.block))


def code_step(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32, per element: the larger distance from the decoded value of ``codes`` (int8 signed or uint8
    unsigned code) to that of a neighbouring code, with block scale ``scale`` (broadcast): one code step."""
    if codes.dtype == torch.int8:
        c = codes.to(torch.float32).abs()
        return (2 * c + 1) / 127.0**2 * scale
    c = codes.to(torch.float32)
    return ((c + 1) ** 4 - c**4) / 255.0**4 * scale


def _decode(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    if codes.dtype == torch.int8:
        return decode_signed_reference(codes, scale)
    if codes.dtype == torch.uint8:
        return decode_unsigned_reference(codes, scale)
    raise ValueError(f"Invalid optimizer state dict: 8-bit codes of dtype {codes.dtype}; expected int8 or uint8.")


def _encode(values: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_blockwise(values, signed=signed)


def _identity(codes: torch.Tensor, *_) -> torch.Tensor:
    return codes


# 4-bit codes (:mod:`lowmem_lightning.kernels.adamw4bit`): in row form one code per element, m as int8 -7..7
# (the int4 two's complement sign-extended), v as uint8 0..15; stored two per byte, low nibble first.
def _decode4(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    if codes.dtype == torch.int8:
        return decode_m4_reference(codes.to(torch.int32) & 15, scale)
    if codes.dtype == torch.uint8:
        return decode_v4_reference(codes.to(torch.int32), scale)
    raise ValueError(f"Invalid optimizer state dict: 4-bit codes of dtype {codes.dtype}; expected int8 or uint8.")


def _unpack4(packed: torch.Tensor, numel: int, signed: bool) -> torch.Tensor:
    """One code per element (int8 -7..7 when ``signed``, else uint8 0..15) of the first ``numel`` elements
    of 4-bit ``packed`` bytes."""
    nibbles = unpack_nibbles_reference(packed.reshape(-1)[: -(-numel // 2)])[:numel]
    return ((nibbles ^ 8) - 8).to(torch.int8) if signed else nibbles.to(torch.uint8)


def _pack4(codes: torch.Tensor) -> torch.Tensor:
    """Bytes of two 4-bit codes (low nibble first) of flat codes, one per element (inverse of :func:`_unpack4`)."""
    nibbles = codes.reshape(-1).to(torch.int32) & 15
    return pack_nibbles_reference(torch.nn.functional.pad(nibbles, (0, nibbles.numel() % 2)))


def _encode4(values: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    packed, absmax = quantize4_reference(values, signed)
    return _unpack4(packed, values.numel(), signed), absmax


def _step4(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    if codes.dtype == torch.int8:  # levels (k / 7)**2
        c = codes.to(torch.float32).abs()
        return (2 * c + 1) / 49.0 * scale
    c = codes.to(torch.float32) + 1  # levels ((k + 1) / 16)**4
    return ((c + 1) ** 4 - c**4) / 16.0**4 * scale


CODEC8 = Codec(BLOCK_SIZE, _decode, _encode, code_step, (127, 255), _identity, _identity)
"""The 8-bit block-wise codes of :mod:`lowmem_lightning.kernels.codec` (blocks of 256, one code per byte)."""

CODEC4 = Codec(BLOCK4, _decode4, _encode4, _step4, (7, 15), _pack4, _unpack4)
"""The 4-bit codes of :mod:`lowmem_lightning.kernels.adamw4bit` (blocks of 128, two codes per byte)."""


def _padded(codes: torch.Tensor, absmax: torch.Tensor, length: int, block: int,
            head: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat codes, ``head`` zero codes before them, and absmax zero-padded to ``length`` elements; a view of the
    codes' own buffer when that buffer already has ``length`` elements with the codes at ``head`` (a DCP load
    wrote into this optimizer's state: no copy)."""
    blocks = -(-length // block)
    base = codes._base
    if (codes.numel() < length and base is not None and base.dim() == 1 and base.numel() == length
            and base.dtype == codes.dtype and codes.data_ptr() == base.data_ptr() + head * base.element_size()):
        codes = base
    elif codes.numel() != length:
        codes = torch.nn.functional.pad(codes.reshape(-1), (head, length - head - codes.numel()))
    if absmax.numel() != blocks:
        absmax = torch.nn.functional.pad(absmax, (0, blocks - absmax.numel()))
    return codes.reshape(-1), absmax.contiguous()
