"""CPU buckets: many tensors' updates as few calls of a reference step function, each over a cache-sized
``(rows, width)`` block of memory.

The CPU path runs each optimizer's pure-PyTorch step function (the specification). Called once per
tensor it pays ~100 small ops (eager) or a compiled call's fixed overhead (guards, wrappers) per
tensor, which dominates small tensors; and one call over millions of elements no longer keeps its
passes in cache. Buckets fix both (sizes and timings: ``benchmarks/RESULTS.md``, "CPU path by size").

:func:`plan` cuts the tensors of one kind (param dtype, grad dtype, state layout) into *pieces* of
whole rows of ``width`` elements and groups them into :class:`Bucket` s of at most ``CHUNK_NUMEL``
elements: a big contiguous tensor's whole rows run **in place** (its own memory, seen as ``(rows,
width)``, chunk by chunk), its partial last row and every small tensor are **gathered** (copied, zero
padded to whole rows) into a shared buffer, stepped, and copied back. With ``width = 256`` every
quantization block (and its absmax) stays within one tensor, as in the per-tensor step.

Per-tensor scalars (bias corrections, first-step flags) are expanded to one value per row
(:meth:`Bucket.per_row`); the stochastic-rounding seed of a tensor is folded with the piece's
position (:meth:`Bucket.row_seeds`), so every element hashes as it would in the per-tensor step.
AdamW and SGD do both inside their compiled bucket step instead: one small per-tensor table built on
the host per step (:func:`per_tensor`), gathered per row by the plan's cached :attr:`Bucket.row_map`
(:func:`gather_rows`, :func:`fold_seeds`), so a step builds no per-row operand (the fixed cost per
step is what limits small tensors).
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Sequence

import numpy as np
import torch

from .rounding import _GOLDEN, _MASK32

__all__ = ["CHUNK_NUMEL", "IN_PLACE_MIN_NUMEL", "Bucket", "plan", "gather_rows", "fold_seeds", "per_tensor",
           "materialize", "staging"]

CHUNK_NUMEL = 2**18
"""Most elements of one bucket (one call of the step function): the largest call whose passes stay in a
1 MiB L2 cache (per-element cost by call size: ``benchmarks/RESULTS.md``, "CPU path by size")."""

IN_PLACE_MIN_NUMEL = 2**16
"""Contiguous tensors of at least this many elements run on their own memory (whole rows); smaller ones
are gathered (a copy in and out costs less than a compiled call of its own)."""


def _alias(tensor: torch.Tensor, offset: int, shape: tuple[int, int]) -> torch.Tensor:
    """A contiguous ``shape`` tensor on ``tensor``'s memory from flat element ``offset`` on, that is not a
    view (no ``_base``): a gathered buffer is not one either, and torch.compile guards on the
    difference (it would compile again)."""
    alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    return alias.set_(tensor.untyped_storage(), tensor.storage_offset() + offset, shape, (shape[1], 1))


class _Aliases:
    """The :func:`_alias` operands of one in-place bucket, one per source tensor, reused from step to step
    (building one costs two tensor ops).

    An entry is keyed by the source's ``id`` (with the offset and shape) and holds a weak reference to the
    source: it is dropped when the source is freed (so a dead tensor's memory is never kept), and rebuilt when
    the source now lives elsewhere (``.data`` or ``set_`` gave it other memory: a different data pointer) or
    changed dtype. Between such a change and the next step of the bucket the stale alias still holds the old
    memory."""

    def __init__(self):
        self._entries: dict[tuple, tuple] = {}

    def get(self, tensor: torch.Tensor, offset: int, shape: tuple[int, int]) -> torch.Tensor:
        """The alias of ``tensor`` from flat element ``offset`` on, of ``shape`` (cached, see the class)."""
        key, pointer = (id(tensor), offset, shape), tensor.data_ptr()
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is tensor and entry[1] == pointer and entry[2].dtype == tensor.dtype:
            return entry[2]
        alias = _alias(tensor, offset, shape)
        self._entries[key] = (weakref.ref(tensor, functools.partial(_forget, self._entries, key)), pointer, alias)
        return alias


def _forget(entries: dict, key: tuple, ref: weakref.ref) -> None:
    """Weak-reference callback: drop the entry of a freed tensor (unless a new one already replaced it)."""
    entry = entries.get(key)
    if entry is not None and entry[0] is ref:
        del entries[key]


class Bucket:
    """One call of a step function: ``pieces`` ``(tensor index, first element, elements)``, each from a
    row boundary of its tensor, laid out from row ``firsts[k]`` of a ``(rows, width)`` operand.
    ``in_place``: a single piece of whole rows of a contiguous tensor, stepped on the tensor's memory."""

    def __init__(self, pieces: tuple[tuple[int, int, int], ...], width: int, in_place: bool):
        self.pieces, self.width, self.in_place = pieces, width, in_place
        self._aliases = _Aliases() if in_place else None
        counts = [-(-numel // width) for _, _, numel in pieces]
        self.firsts = tuple(sum(counts[:k]) for k in range(len(counts)))
        self.rows = max(sum(counts), 2)  # torch.compile specializes sizes 0 and 1: pad rows hold zeros
        counts[-1] += self.rows - sum(counts)
        owner = torch.repeat_interleave(torch.arange(len(pieces)), torch.tensor(counts))  # row -> piece
        self._row_tensor = torch.tensor([index for index, _, _ in pieces]).index_select(0, owner)
        shift = torch.tensor([first * width - start for first, (_, start, _) in zip(self.firsts, pieces)])
        # (bucket position - position in the tensor) * GOLDEN per row, for the seed fold
        self._row_fold = (shift.index_select(0, owner) * _GOLDEN).view(self.rows, 1)
        self.row_map = torch.cat([self._row_tensor.view(-1, 1), self._row_fold & _MASK32], dim=1)
        """``(rows, 2)`` int64 per row: the group index of its tensor and its seed fold (mod 2**32), the operand
        of :func:`gather_rows` / :func:`fold_seeds` (built once per plan, reused every step)."""

    @property
    def numel(self) -> int:
        """Elements of one operand (rows x width, padding included)."""
        return self.rows * self.width

    def rows_of(self, tensors: Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
        """``(rows, width)`` operand from the group's ``tensors`` (indexed by the pieces): the tensor's
        own memory when in place and contiguous, else a zero-padded copy of every piece."""
        first = tensors[self.pieces[0][0]]
        if self.in_place and first.is_contiguous():
            return self._aliases.get(first, self.pieces[0][1], (self.rows, self.width))
        out = torch.zeros(self.rows, self.width, dtype=dtype or first.dtype, device=first.device)
        torch._foreach_copy_(self._slices(out), [self._source(tensors[i], s, n) for i, s, n in self.pieces])
        return out

    def scales_of(self, scales: Sequence[torch.Tensor]) -> torch.Tensor:
        """``(rows, 1)`` operand of per-row values (one per block: absmax) of the pieces' tensors."""
        first = scales[self.pieces[0][0]]
        if self.in_place and first.is_contiguous():
            return self._aliases.get(first, self.pieces[0][1] // self.width, (self.rows, 1))
        out = torch.zeros(self.rows, 1, dtype=first.dtype, device=first.device)
        flat = out.view(-1)
        rows = [-(-n // self.width) for _, _, n in self.pieces]
        torch._foreach_copy_([flat[f:f + r] for f, r in zip(self.firsts, rows)],
                             [scales[i].view(-1)[s // self.width:s // self.width + r]
                              for (i, s, _), r in zip(self.pieces, rows)])
        return out

    def write_back(self, tensors: Sequence[torch.Tensor], rows: torch.Tensor) -> None:
        """Copy each piece of the operand ``rows`` (from :meth:`rows_of`) back into its tensor (nothing
        when ``rows`` is the tensor's own memory)."""
        if self._is_alias(tensors, rows):
            return
        targets, sources = [], []
        for (i, start, numel), src in zip(self.pieces, self._slices(rows)):
            whole = start == 0 and numel == tensors[i].numel()
            targets.append(tensors[i] if whole else tensors[i].view(-1)[start:start + numel])
            sources.append(src.view(tensors[i].shape) if whole else src)
        torch._foreach_copy_(targets, sources)

    def write_back_scales(self, scales: Sequence[torch.Tensor], rows: torch.Tensor) -> None:
        """Copy each piece's rows of a ``(rows, 1)`` operand (from :meth:`scales_of`) back."""
        if self._is_alias(scales, rows):
            return
        flat = rows.view(-1)
        counts = [-(-n // self.width) for _, _, n in self.pieces]
        torch._foreach_copy_([scales[i].view(-1)[s // self.width:s // self.width + r]
                              for (i, s, _), r in zip(self.pieces, counts)],
                             [flat[f:f + r] for f, r in zip(self.firsts, counts)])

    def staging(self, device: torch.device | str) -> torch.Tensor:
        """An fp32 ``(rows, width)`` scratch operand (:func:`staging`) for a bf16 param's rounded values."""
        return staging(self.rows, self.width, device)

    def per_row(self, values: torch.Tensor) -> torch.Tensor:
        """``(rows, ...)``: per-tensor ``values`` (``(T, ...)``, indexed like the group) on each row."""
        return values.index_select(0, self._row_tensor.to(values.device))

    def row_seeds(self, seeds: torch.Tensor) -> torch.Tensor:
        """``(rows, 1)`` int64 stochastic-rounding seeds: tensor ``i``'s seed ``s_i`` folded with the shift
        ``d`` from an element's position in the tensor to its position in the bucket, ``(s_i - d *
        GOLDEN) mod 2**32``. The rounding hash mixes ``(position * GOLDEN + seed) mod 2**32``, so every
        element hashes as in the per-tensor step."""
        rows = self.per_row(seeds.to(torch.int64).view(-1, 1))
        return (rows - self._row_fold.to(seeds.device)).bitwise_and_(_MASK32)

    def _is_alias(self, tensors: Sequence[torch.Tensor], rows: torch.Tensor) -> bool:
        index, start, _ = self.pieces[0]
        return self.in_place and rows.data_ptr() == tensors[index].data_ptr() + start * rows.element_size()

    def _slices(self, rows: torch.Tensor) -> list[torch.Tensor]:
        flat = rows.view(-1)
        return [flat[f * self.width:f * self.width + n] for f, (_, _, n) in zip(self.firsts, self.pieces)]

    @staticmethod
    def _source(tensor: torch.Tensor, start: int, numel: int) -> torch.Tensor:
        flat = tensor.detach().reshape(-1)
        return flat if start == 0 and numel == flat.numel() else flat[start:start + numel]


def gather_rows(values: torch.Tensor, row_map: torch.Tensor) -> torch.Tensor:
    """``(rows, k)``: the per-tensor ``values`` ``(T, k)`` of each row's tensor (``row_map``: :attr:`Bucket.row_map`).
    Inside a compiled step the gather fuses into the elementwise kernel (no per-row operand built per step)."""
    return values.index_select(0, row_map[:, 0])


def fold_seeds(seeds: torch.Tensor, row_map: torch.Tensor) -> torch.Tensor:
    """``(rows, 1)`` int64: :meth:`Bucket.row_seeds` as graph operations, from ``seeds`` ``(rows,)`` (each row's
    tensor seed, any dtype holding the integer exactly: :func:`gather_rows` of a float64 step table) and
    :attr:`Bucket.row_map`: ``(s_i - d * GOLDEN) mod 2**32``, the fold pre-reduced mod 2**32."""
    return (seeds.to(torch.int64).view(-1, 1) - row_map[:, 1:]) & _MASK32


_STAGING = threading.local()
"""Per thread: ``{device: fp32 workspace, (device, rows, width): its (rows, width) alias}``."""


def staging(rows: int, width: int, device: torch.device | str) -> torch.Tensor:
    """An fp32 ``(rows, width)`` scratch tensor on ``device`` (contiguous, not a view, as every bucket operand), on one
    workspace per thread and device grown to the largest request (``rows * width * 4`` bytes, one bucket's worth:
    1 MiB at ``CHUNK_NUMEL``), reused from call to call: valid until the next request on the same thread (the buckets
    of a step run one after another). The bucket steps stage a bf16 param's rounded values in it
    (:func:`.rounding.write_param_reference`)."""
    cache = getattr(_STAGING, "cache", None)
    if cache is None:
        cache = _STAGING.cache = {}
    device = torch.device(device)
    key = (device, rows, width)
    alias = cache.get(key)
    if alias is None:
        store = cache.get(device)
        if store is None or store.numel() < rows * width:
            for old in [k for k in cache if isinstance(k, tuple) and k[0] == device]:  # aliases of the old workspace
                del cache[old]
            store = cache[device] = torch.empty(rows * width, dtype=torch.float32, device=device)
        alias = cache[key] = _alias(store, 0, (rows, width))
    return alias


def materialize(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself; inside a torch.compile'd step, a buffer of its own that inductor computes in a loop of its
    own (``prims.inductor_force_stride_order`` with the tensor's strides) instead of inlining its expression.

    Inductor inlines every pointwise value into each loop that reads it, and the C++ compiler cannot hoist the
    result out of the inner loop (a store through an int8/uint8 pointer may alias any load). So a per-row term of
    a ``(rows, width)`` bucket (a block's ``1 / absmax``, a gathered step size, a seed) was recomputed every 16
    elements, scalar divisions and square roots included, and a value read by two loops (AdamW's ``sqrt(v)``) was
    computed twice. Materialized, each is computed once and loaded (measured: ``benchmarks/RESULTS.md``,
    "bf16 CPU step: per-row terms and sqrt(v) materialized"). The same values either way, so the same bits."""
    if torch.compiler.is_compiling():
        return torch.ops.prims.inductor_force_stride_order(tensor, tensor.stride())
    return tensor


def per_tensor(values: Sequence, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """One tensor of per-tensor ``values`` (numbers or tuples of numbers, one entry per group tensor), padded with
    copies of the last entry to at least two rows: torch.compile specializes a size of 1, and a group of one
    tensor must not compile a graph of its own."""
    values = list(values)
    values += values[-1:] * (2 - len(values))
    as_numpy = _NUMPY_DTYPES.get(dtype)
    if as_numpy is not None and torch.device(device).type == "cpu":  # ~2x faster than torch.tensor, no tensor op
        return torch.from_numpy(np.array(values, dtype=as_numpy))
    return torch.tensor(values, dtype=dtype, device=device)


_NUMPY_DTYPES = {torch.float64: np.float64, torch.float32: np.float32, torch.int64: np.int64, torch.int32: np.int32}
"""The tables :func:`per_tensor` builds through numpy on the CPU (the same values as ``torch.tensor``)."""


def plan(tensors: Sequence[torch.Tensor], width: int) -> list[Bucket]:
    """The buckets of one step over ``tensors`` (the params of one kind; rows of ``width`` elements):
    in-place chunks of the whole rows of every contiguous tensor of at least ``IN_PLACE_MIN_NUMEL``
    elements, then the rest (partial last rows, small or non-contiguous tensors) gathered, in order,
    into buckets of at most ``CHUNK_NUMEL`` elements (a bigger non-contiguous tensor alone); a bucket
    that would gather only one contiguous tensor of whole rows runs in place instead."""
    return _plan(tuple((t.numel(), t.is_contiguous()) for t in tensors), width)


@functools.lru_cache(maxsize=64)
def _plan(shapes: tuple[tuple[int, bool], ...], width: int) -> list[Bucket]:
    chunk_rows = max(CHUNK_NUMEL // width, 2)
    buckets, gathered = [], []
    for index, (numel, contiguous) in enumerate(shapes):
        full = numel // width if contiguous and numel >= max(IN_PLACE_MIN_NUMEL, 2 * width) else 0
        parts = -(-full // chunk_rows)
        for k in range(parts):  # equal chunks (each >= 2 rows)
            lo, hi = full * k // parts, full * (k + 1) // parts
            buckets.append(Bucket(((index, lo * width, (hi - lo) * width),), width, True))
        if numel > full * width:
            gathered.append((index, full * width, numel - full * width))
    runs: list[list[tuple[int, int, int]]] = []
    for piece in gathered:
        if not runs or (sum(-(-n // width) for _, _, n in runs[-1]) + -(-piece[2] // width)) * width > CHUNK_NUMEL:
            runs.append([])
        runs[-1].append(piece)
    for run in runs:  # a run of one tensor's whole rows runs in place (no copies)
        index, start, numel = run[0]
        alone = len(run) == 1 and start == 0 and numel % width == 0 and numel >= 2 * width and shapes[index][1]
        buckets.append(Bucket(tuple(run), width, bool(alone)))
    return buckets
