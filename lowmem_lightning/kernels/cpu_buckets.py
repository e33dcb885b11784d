"""CPU buckets: many tensors' updates as one call of a reference step function.

The CPU path runs each optimizer's pure-PyTorch step function (the specification). Called once per
tensor it costs ~100 small ops per tensor (eager) or one compiled call with ~50-100 us of fixed
overhead per tensor (torch.compile's guards and wrappers), which made every tensor under ~2**20
elements 3-18x slower than ``torch.optim.AdamW(foreach=True)``. Here the tensors of one step that share
a kind (param dtype, grad dtype, state layout) are gathered into one zero-padded ``(rows, width)``
buffer per operand, the step function runs once over it (one compiled graph for every bucket size:
the row count is dynamic, the width static), and the results are copied back.

Layout: tensor ``i`` occupies ``ceil(numel_i / width)`` whole rows, so with ``width = 256`` every
quantization block (and its absmax) belongs to one tensor, exactly as in the per-tensor step. Per-tensor
scalars (bias corrections, first-step flags) are expanded to one value per row; the stochastic-rounding
seed of tensor ``i`` is folded with its offset in the bucket (:func:`Bucket.row_seeds`), so the hash of
every element equals the per-tensor one. A bucket of one contiguous tensor whose size is a multiple
of ``width`` runs in place on views (no copies).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from .rounding import _GOLDEN, _MASK32

__all__ = ["BUCKET_NUMEL", "Bucket", "split"]

BUCKET_NUMEL = 2**22
"""Most elements gathered into one bucket (bigger tensors form a bucket alone): bounds the transient
buffers (param, grad and state copies, ~10-16 bytes per element) to ~64 MiB."""


def _alias(tensor: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A contiguous ``shape`` tensor on ``tensor``'s memory that is not a view (no ``_base``): a gathered
    buffer is not one either, and torch.compile guards on the difference (it would compile again)."""
    alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    return alias.set_(tensor.untyped_storage(), tensor.storage_offset(), shape, (shape[1], 1))


def split(numels: Sequence[int], limit: int = BUCKET_NUMEL) -> list[list[int]]:
    """Positions ``0..len(numels)-1`` cut, in order, into runs of at most ``limit`` elements (a run
    holds at least one position, so a bigger tensor is a run alone)."""
    runs: list[list[int]] = []
    total = limit
    for position, numel in enumerate(numels):
        if total + numel > limit:
            runs.append([])
            total = 0
        runs[-1].append(position)
        total += numel
    return runs


@functools.lru_cache(maxsize=64)
def _layout(numels: tuple[int, ...], width: int) -> tuple[tuple[int, ...], int, torch.Tensor, torch.Tensor]:
    """``(first row of each tensor, rows in all, row -> tensor index (rows,), first element of each
    tensor (T,))``. At least 2 rows (torch.compile specializes sizes 0 and 1): pad rows belong to the
    last tensor and hold zeros."""
    counts = [-(-n // width) for n in numels]
    firsts, row = [], 0
    for count in counts:
        firsts.append(row)
        row += count
    rows = max(row, 2)
    counts[-1] += rows - row
    owner = torch.repeat_interleave(torch.arange(len(numels)), torch.tensor(counts))
    start = torch.tensor(firsts, dtype=torch.int64) * width
    return tuple(firsts), rows, owner, start


class Bucket:
    """The ``(rows, width)`` layout of tensors of ``numels`` elements (see the module docstring)."""

    def __init__(self, numels: Sequence[int], width: int):
        self.numels = tuple(int(n) for n in numels)
        self.width = width
        self.firsts, self.rows, self.owner, self.start = _layout(self.numels, width)

    @property
    def numel(self) -> int:
        """Elements of one operand of the bucket (rows x width, padding included)."""
        return self.rows * self.width

    def _in_place(self, tensors: Sequence[torch.Tensor]) -> bool:
        return len(tensors) == 1 and self.numel == self.numels[0] and tensors[0].is_contiguous()

    def rows_of(self, tensors: Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
        """``(rows, width)``: the tensors (any shapes, flat order) one after another, each from its first
        row, zeros elsewhere; a view of the tensor itself for one contiguous tensor that fills its rows.
        ``dtype`` defaults to the tensors' own."""
        if self._in_place(tensors):
            return _alias(tensors[0], (self.rows, self.width))
        out = torch.zeros(self.rows, self.width, dtype=dtype or tensors[0].dtype, device=tensors[0].device)
        torch._foreach_copy_(self._slices(out), [t.detach().reshape(-1) for t in tensors])
        return out

    def scales_of(self, scales: Sequence[torch.Tensor]) -> torch.Tensor:
        """``(rows, 1)``: per-row values (one per block: absmax) of each tensor, at its rows."""
        if len(scales) == 1 and scales[0].numel() == self.rows and scales[0].is_contiguous():
            return _alias(scales[0], (self.rows, 1))
        out = torch.zeros(self.rows, 1, dtype=scales[0].dtype, device=scales[0].device)
        flat = out.view(-1)
        torch._foreach_copy_([flat[f:f + s.numel()] for f, s in zip(self.firsts, scales)], list(scales))
        return out

    def write_back(self, tensors: Sequence[torch.Tensor], rows: torch.Tensor) -> None:
        """Copy each tensor's part of ``rows`` (from :meth:`rows_of`) back into it (nothing when in place)."""
        if rows.data_ptr() == tensors[0].data_ptr():
            return
        torch._foreach_copy_(list(tensors), [s.view(t.shape) for s, t in zip(self._slices(rows), tensors)])

    def write_back_scales(self, scales: Sequence[torch.Tensor], rows: torch.Tensor) -> None:
        """Copy each tensor's rows of a ``(rows, 1)`` buffer (from :meth:`scales_of`) back into it."""
        if rows.data_ptr() == scales[0].data_ptr():
            return
        flat = rows.view(-1)
        torch._foreach_copy_(list(scales), [flat[f:f + s.numel()] for f, s in zip(self.firsts, scales)])

    def per_row(self, values: torch.Tensor) -> torch.Tensor:
        """``(rows, ...)``: per-tensor ``values`` (``(T, ...)``) repeated on each tensor's rows."""
        return values.index_select(0, self.owner.to(values.device))

    def row_seeds(self, seeds: torch.Tensor) -> torch.Tensor:
        """``(rows, 1)`` int64 stochastic-rounding seeds: tensor ``i``'s seed ``s_i`` folded with its first
        element ``o_i`` in the bucket, ``(s_i - o_i * GOLDEN) mod 2**32``. The rounding hash mixes
        ``(index * GOLDEN + seed) mod 2**32``, so bucket index ``o_i + k`` with the folded seed hashes as
        index ``k`` of tensor ``i`` with ``s_i``: the same bits as the per-tensor step."""
        folded = (seeds.to(torch.int64) - self.start.to(seeds.device) * _GOLDEN) & _MASK32
        return self.per_row(folded).view(self.rows, 1)

    def _slices(self, rows: torch.Tensor) -> list[torch.Tensor]:
        flat = rows.view(-1)
        return [flat[f * self.width:f * self.width + n] for f, n in zip(self.firsts, self.numels)]
