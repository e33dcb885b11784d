"""Block-wise 8-bit state of a sharded param, presented so a checkpoint loads on another world size.

A DTensor param's 8-bit state is kept per local shard: flat codes with one fp32 scale per block of
256 *local* elements (:func:`~.sharding.block_state_len`). Where the blocks fall depends on the
sharding, so the raw buffers cannot be resharded by ``torch.distributed.checkpoint`` (DCP). For
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
"""

from __future__ import annotations

import math

import torch

from ..kernels.codec import (
    BLOCK_SIZE,
    decode_signed_reference,
    decode_unsigned_reference,
    quantize_blockwise,
)

__all__ = ["blocks_from_rows", "code_step", "decode_rows", "row_width", "rows_from_blocks", "slice_numel"]

_META = 2  # phase, last


def slice_numel(shape: tuple[int, ...] | torch.Size) -> int:
    """Elements per dim-0 slice (``C``) of a param of ``shape``: ``prod(shape[1:])`` (1 for a 1-D param)."""
    return math.prod(shape[1:])


def row_width(shape: tuple[int, ...] | torch.Size) -> int:
    """Columns of the row form's scales tensor: 2 + the most blocks of 256 that ``C`` consecutive
    elements of one shard can intersect (1 for ``C`` = 1, else ``(C - 1) // 256 + 2``)."""
    c = max(1, slice_numel(shape))
    return _META + (1 if c == 1 else (c - 1) // BLOCK_SIZE + 2)


def rows_from_blocks(absmax: torch.Tensor, local_shape: tuple[int, ...], width: int) -> torch.Tensor:
    """The row form (fp32 ``(local_shape[0], width)``) of a local shard's block ``absmax`` (blocks of
    256 over the shard's flat elements, from its first element)."""
    rows, c = (local_shape[0] if local_shape else 1), slice_numel(local_shape)
    out = torch.zeros(rows, width, dtype=torch.float32, device=absmax.device)
    if rows == 0 or c == 0:
        return out
    start = torch.arange(rows, device=absmax.device, dtype=torch.int64) * c  # (rows,) flat offset of each row
    first, last = start // BLOCK_SIZE, (start + c - 1) // BLOCK_SIZE
    index = first[:, None] + torch.arange(width - _META, device=absmax.device)[None, :]  # (rows, W)
    valid = index <= last[:, None]
    out[:, 0] = (start % BLOCK_SIZE).to(torch.float32)
    out[-1, 1] = 1.0
    out[:, _META:] = torch.where(valid, absmax[index.clamp(max=absmax.numel() - 1)], 0.0)
    return out


def _layout_unchanged(rows: torch.Tensor, c: int) -> bool:
    """Whether the saved rows were laid out exactly as this shard would lay them out (same phases, the
    shard's last row the only one marked last)."""
    n = rows.shape[0]
    phase = (torch.arange(n, dtype=torch.int64, device=rows.device) * c) % BLOCK_SIZE
    last = torch.zeros(n, dtype=torch.float32, device=rows.device)
    if n:
        last[-1] = 1.0
    return bool(torch.equal(rows[:, 0], phase.to(torch.float32)) and torch.equal(rows[:, 1], last))


def _saved_scale_at(rows: torch.Tensor, flat: torch.Tensor, c: int) -> torch.Tensor:
    """The saved block scale of the local flat elements ``flat`` (int64 indices)."""
    i, col = flat // c, flat % c
    j = (rows[i, 0].to(torch.int64) + col) // BLOCK_SIZE
    return rows[i, _META + j]


CHUNK = 1 << 15
"""Elements converted per pass (a multiple of 256): bounds the temporaries of a conversion."""


def _boundaries(rows: torch.Tensor, flat: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bool ``(starts, ends)`` of the local flat elements ``flat``: a saved block starts / ends there."""
    i, col = flat // c, flat % c
    pos = rows[i, 0].to(torch.int64) + col
    starts = pos % BLOCK_SIZE == 0
    ends = ((pos + 1) % BLOCK_SIZE == 0) | ((rows[i, 1] > 0) & (col == c - 1))
    return starts, ends


def _exact_blocks(rows: torch.Tensor, flat: torch.Tensor, c: int) -> torch.Tensor:
    """bool, one per block of 256 of ``flat`` (consecutive local elements from a block start): the blocks
    of the local layout that cover exactly one saved block."""
    starts, ends = _boundaries(rows, flat, c)
    blocks = -(-flat.numel() // BLOCK_SIZE)
    pad = blocks * BLOCK_SIZE - flat.numel()
    starts = torch.nn.functional.pad(starts, (0, pad)).view(blocks, BLOCK_SIZE)
    ends = torch.nn.functional.pad(ends, (0, pad)).view(blocks, BLOCK_SIZE)
    tail = torch.full((blocks,), BLOCK_SIZE - 1, dtype=torch.int64, device=flat.device)
    tail[-1] = flat.numel() - 1 - (blocks - 1) * BLOCK_SIZE
    return starts[:, 0] & ends.gather(1, tail[:, None]).squeeze(1) & (ends.sum(1) == 1)


def blocks_from_rows(codes: torch.Tensor, rows: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """This shard's flat ``(codes, absmax)``, padded to ``length`` elements, from its row form.

    Args:
        codes: the local shard's codes, of its shape (int8 signed or uint8 unsigned code); the codes of
            moved blocks are re-encoded **in place** (the result's codes are this tensor's elements).
        rows: the local rows of the saved scales (see the module docstring).
        length: the padded local length of this run (:func:`~.sharding.block_state_len`).

    Returns ``(codes, absmax, moved)``: ``moved`` counts the elements whose block changed (decoded and
    re-encoded; 0 when every block is kept bit for bit). Works in passes of :data:`CHUNK` elements, so
    its temporaries stay a few times ``CHUNK`` whatever the tensor's size. ``ValueError`` when ``rows``
    does not fit.
    """
    shape = tuple(codes.shape)
    n, c = codes.numel(), slice_numel(shape)
    if rows.dim() != 2 or rows.shape[0] != (shape[0] if shape else 1) or rows.shape[1] != row_width(shape):
        raise ValueError(
            f"Invalid optimizer state dict: block scales in row form are {tuple(rows.shape)}, expected "
            f"({shape[0] if shape else 1}, {row_width(shape)}) for codes of shape {shape}."
        )
    flat = codes.reshape(-1)
    if n == 0:
        return _padded(flat, torch.zeros(0, device=codes.device), length) + (0,)
    first = torch.arange(-(-n // BLOCK_SIZE), dtype=torch.int64, device=codes.device) * BLOCK_SIZE
    absmax = _saved_scale_at(rows, first, c)  # right for every block that covers one saved block
    if _layout_unchanged(rows, c):
        return _padded(flat, absmax, length) + (0,)
    moved = 0
    for start in range(0, n, CHUNK):
        elements = torch.arange(start, min(n, start + CHUNK), dtype=torch.int64, device=codes.device)
        exact = _exact_blocks(rows, elements, c)
        if bool(exact.all()):
            continue
        part = flat[elements[0]: elements[-1] + 1]
        values = _decode(part, _saved_scale_at(rows, elements, c))
        new_codes, new_absmax = quantize_blockwise(values, signed=codes.dtype == torch.int8)
        kept = exact.repeat_interleave(BLOCK_SIZE)[: part.numel()]
        part.copy_(torch.where(kept, part, new_codes))
        scales = absmax[start // BLOCK_SIZE: start // BLOCK_SIZE + exact.numel()]
        scales.copy_(torch.where(exact, scales, new_absmax))
        moved += part.numel() - int(kept.sum())
    return _padded(flat, absmax, length) + (moved,)


def decode_rows(codes: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """fp32 values (flat) of codes in row form (codes of a shard's or the whole param's shape, and their rows)."""
    c = slice_numel(tuple(codes.shape))
    flat = codes.reshape(-1)
    return _decode(flat, _saved_scale_at(rows, torch.arange(flat.numel(), device=codes.device), c))


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


def _padded(codes: torch.Tensor, absmax: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat codes and absmax zero-padded to ``length`` elements; a view of the codes' own buffer when that
    buffer already has ``length`` elements (a DCP load wrote into this optimizer's state: no copy)."""
    blocks = -(-length // BLOCK_SIZE)
    base = codes._base
    if (codes.numel() < length and base is not None and base.dim() == 1 and base.numel() == length
            and base.dtype == codes.dtype and base.data_ptr() == codes.data_ptr()):
        codes = base
    elif codes.numel() != length:
        codes = torch.nn.functional.pad(codes.reshape(-1), (0, length - codes.numel()))
    if absmax.numel() != blocks:
        absmax = torch.nn.functional.pad(absmax, (0, blocks - absmax.numel()))
    return codes.reshape(-1), absmax.contiguous()
