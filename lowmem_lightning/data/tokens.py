"""Compact token storage of ``TextDataModule``: encoded records and the blocks cut from them, ~7 bytes per token.

:class:`EncodedRecords` holds every record's tokens in two flat arrays, int32 ids and a bool "trained" flag (the
label is the id where it is set, -100 elsewhere), with each record's start and length; :class:`RecordsBuilder`
fills it chunk by chunk (one chunk's arrays at a time, never a Python list of all tokens). :class:`PackedBlocks`
cuts blocks out of it without copying a token: each block is a span (start, length <= ``seq_len``) of the flat
arrays, plus, for isolated documents, one flat int16 array of positions. ``PackedBlocks.row`` builds one block's
int64 ``input_ids``, ``labels``, ``attention_mask`` / ``position_ids`` (right-padded) when a loader asks for it, the
values the earlier int64 ``[n_blocks, seq_len]`` tensors held; indexing a ``PackedBlocks`` by key builds that
tensor for all its blocks (for inspection, tests and the small held-out set).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["IGNORE_INDEX", "EncodedRecords", "RecordsBuilder", "PackedBlocks", "segment_sum", "segment_index",
           "flat_positions", "position_dtype"]

IGNORE_INDEX = -100
"""Label of tokens left out of the loss (prompt, bos, padding); PyTorch's cross-entropy default."""

_CHUNK_TOKENS = 1 << 20
"""Tokens per step of the chunked per-token passes (positions, coverage): a few MiB of temporaries each."""


def segment_sum(values: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """``[n]`` int64: the sum of ``values[starts[i]:ends[i]]`` for each ``i`` (0 for an empty span). Spans are taken
    in order of their start, about ``_CHUNK_TOKENS`` tokens of ``values`` at a time (widened to int64 and summed by
    ``np.add.reduceat`` over the interleaved bounds), so no int64 copy of all of ``values`` is made."""
    starts, ends = np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)
    sums = np.zeros(starts.size, dtype=np.int64)
    order = np.argsort(starts, kind="stable")
    sorted_starts = starts[order]
    i = 0
    while i < order.size:
        j = max(i + 1, int(np.searchsorted(sorted_starts, sorted_starts[i] + _CHUNK_TOKENS)))
        spans = order[i:j]
        low, high = int(sorted_starts[i]), max(int(ends[spans].max()), int(sorted_starts[i]))
        piece = np.zeros(high - low + 1, dtype=np.int64)  # one more: reduceat's bounds must be < its length
        piece[:-1] = values[low:high]
        bounds = np.empty(2 * spans.size, dtype=np.int64)
        bounds[0::2], bounds[1::2] = starts[spans] - low, np.maximum(ends[spans], starts[spans]) - low
        bounds = np.minimum(bounds, high - low)
        sums[spans] = np.where(ends[spans] > starts[spans], np.add.reduceat(piece, bounds)[0::2], 0)
        i = j
    return sums


def segment_index(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``[sum(lengths)]`` int64: ``starts[i] + k`` for ``k < lengths[i]``, for each ``i`` in order (the indices of
    the spans ``[starts[i], starts[i] + lengths[i])`` one after the other)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    piece_starts = np.zeros(lengths.size, dtype=np.int64)
    np.cumsum(lengths[:-1], out=piece_starts[1:])
    return np.repeat(np.asarray(starts, dtype=np.int64) - piece_starts, lengths) + np.arange(int(lengths.sum()))


@dataclass
class EncodedRecords:
    """Tokenized records, flat: ``ids`` (int32) and ``trained`` (bool: the loss covers the token) of every record
    one after the other, record ``i`` being ``ids[starts[i] : starts[i] + lengths[i]]`` (``lengths`` int64; 0 for a
    record left out; :meth:`with_lengths` shortens records without copying a token)."""

    ids: np.ndarray
    trained: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return int(self.starts.size)

    @property
    def n_tokens(self) -> int:
        """Tokens of the records as they stand (after :meth:`with_lengths`)."""
        return int(self.lengths.sum())

    def record(self, i: int) -> tuple[list[int], list[int]]:
        """``(ids, labels)`` of record ``i`` as lists (labels -100 where not trained), as ``encode_document`` gives."""
        span = slice(int(self.starts[i]), int(self.starts[i] + self.lengths[i]))
        ids = self.ids[span].astype(np.int64)
        return ids.tolist(), np.where(self.trained[span], ids, IGNORE_INDEX).tolist()

    def trained_counts(self, limit: int | None = None, skip_first: bool = False) -> np.ndarray:
        """``[n]`` int64: trained tokens of each record (of its first ``limit`` tokens; ``skip_first``: not counting
        its first token, which a causal LM never predicts)."""
        ends = self.starts + (self.lengths if limit is None else np.minimum(self.lengths, limit))
        return segment_sum(self.trained, self.starts + skip_first, np.maximum(ends, self.starts + skip_first))

    def with_lengths(self, lengths: np.ndarray) -> EncodedRecords:
        """The same records cut to ``lengths`` tokens each (<= their lengths; 0 leaves one out), sharing the arrays."""
        return EncodedRecords(self.ids, self.trained, self.starts, np.asarray(lengths, dtype=np.int64))

    def laid_end_to_end(self) -> EncodedRecords:
        """The records with each one starting where the one before it ends: ``self``, or a copy of the tokens kept
        when :meth:`with_lengths` cut some short."""
        ends = self.starts + self.lengths
        if np.array_equal(self.starts[1:], ends[:-1]) and (len(self) == 0 or self.starts[0] == 0):
            return self
        index = segment_index(self.starts, self.lengths)
        starts = np.zeros(len(self), dtype=np.int64)
        np.cumsum(self.lengths[:-1], out=starts[1:])
        return EncodedRecords(self.ids[index], self.trained[index], starts, self.lengths)

    @classmethod
    def from_pairs(cls, pairs: list[tuple[list[int], list[int]]]) -> EncodedRecords:
        """Records given as ``(ids, labels)`` lists (labels -100 where not trained), as ``encode_document`` gives."""
        builder = RecordsBuilder()
        for ids, labels in pairs:
            builder.add_record(np.asarray(ids, dtype=np.int32), np.asarray(labels) != IGNORE_INDEX)
        return builder.finish()


class RecordsBuilder:
    """Collects records into an :class:`EncodedRecords`: :meth:`add_record` (one record's arrays) or :meth:`add_flat`
    (many records already concatenated, with their lengths), copied into one buffer per array that grows in place
    (``ndarray.resize``: ``realloc``, which moves no bytes for a large buffer), so the tokens are held once, not once
    in pieces and again joined."""

    def __init__(self) -> None:
        self._ids = np.zeros(0, dtype=np.int32)
        self._trained = np.zeros(0, dtype=np.bool_)
        self._lengths: list[np.ndarray] = []
        self.n_records = 0
        self.n_tokens = 0

    def add_record(self, ids: np.ndarray, trained: np.ndarray) -> None:
        """Append one record: its token ``ids`` and ``trained`` flags (equal lengths)."""
        self.add_flat(ids, trained, np.array([len(ids)], dtype=np.int64))

    def add_flat(self, ids: np.ndarray, trained: np.ndarray, lengths: np.ndarray) -> None:
        """Append records whose tokens are ``ids`` / ``trained`` one after the other, ``lengths`` tokens each."""
        end = self.n_tokens + len(ids)
        if end > self._ids.size:
            capacity = max(end, self._ids.size * 3 // 2, 1 << 16)
            self._ids.resize(capacity, refcheck=False)
            self._trained.resize(capacity, refcheck=False)
        self._ids[self.n_tokens:end], self._trained[self.n_tokens:end] = ids, trained
        self._lengths.append(np.asarray(lengths, dtype=np.int64))
        self.n_records += len(lengths)
        self.n_tokens = end

    def finish(self) -> EncodedRecords:
        """The records added, in order, in one :class:`EncodedRecords`; the builder starts empty again."""
        ids, trained = self._ids, self._trained
        ids.resize(self.n_tokens, refcheck=False)
        trained.resize(self.n_tokens, refcheck=False)
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, dtype=np.int64)
        self.__init__()
        starts = np.zeros(lengths.size, dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        return EncodedRecords(ids, trained, starts, lengths)


def position_dtype(seq_len: int) -> np.dtype:
    """The smallest signed integer type that holds the positions ``0 .. seq_len - 1``."""
    return np.dtype(np.int16) if seq_len <= np.iinfo(np.int16).max + 1 else np.dtype(np.int32)


def flat_positions(doc_starts: np.ndarray, n_tokens: int, seq_len: int) -> np.ndarray:
    """``[n_tokens]`` positions (:func:`position_dtype`) of a packed stream whose documents start at ``doc_starts``
    (sorted, the first 0), cut into ``seq_len``-token blocks: each token's offset from the later of its document's
    start and its block's start. Computed ``_CHUNK_TOKENS`` tokens at a time."""
    out = np.empty(n_tokens, dtype=position_dtype(seq_len))
    for a in range(0, n_tokens, _CHUNK_TOKENS):
        index = np.arange(a, min(n_tokens, a + _CHUNK_TOKENS), dtype=np.int64)
        doc_start = doc_starts[np.searchsorted(doc_starts, index, side="right") - 1]
        out[a:a + index.size] = index - np.maximum(doc_start, index - index % seq_len)
    return out


class PackedBlocks(Mapping):
    """Blocks of ``seq_len`` tokens as spans of flat token arrays (see the module docstring).

    Args:
        ids: ``[n_tokens]`` int32 token ids.
        trained: ``[n_tokens]`` bool: the token's label is its id (else -100).
        starts: ``[n_blocks]`` int64: where each block's tokens start in ``ids``.
        lengths: ``[n_blocks]`` int64: each block's tokens (1 .. ``seq_len``); the rest of the block is padding
            (``pad_id``, label -100, ``attention_mask`` 0).
        seq_len: Tokens per block.
        pad_id: The padding token id.
        positions: ``[n_tokens]`` positions (int16, or int32 past 32768) for isolated documents, or ``None``; the
            padding of a block continues them as one more document (0, 1, ... from the padding's first column).

    A ``Mapping`` from ``input_ids``, ``labels``, ``attention_mask`` (and ``position_ids``) to the ``[n_blocks,
    seq_len]`` int64 tensor of all blocks, built on each access; :meth:`row` builds one block's, :meth:`select` takes
    blocks (sharing the arrays). ``len()`` is the number of keys, as for a dict; :attr:`n_blocks` counts blocks.
    """

    def __init__(self, ids: np.ndarray, trained: np.ndarray, starts: np.ndarray, lengths: np.ndarray, seq_len: int,
                 pad_id: int, positions: np.ndarray | None = None):
        self.ids, self.trained, self.positions = torch.from_numpy(ids), torch.from_numpy(trained), (
            None if positions is None else torch.from_numpy(positions))
        self.starts = torch.as_tensor(starts, dtype=torch.long)
        self.lengths = torch.as_tensor(lengths, dtype=torch.long)
        self.seq_len, self.pad_id = seq_len, pad_id
        self._columns = torch.arange(seq_len)

    @property
    def n_blocks(self) -> int:
        """Number of blocks."""
        return int(self.starts.numel())

    @property
    def nbytes(self) -> int:
        """Bytes of the token arrays (shared by every selection of these blocks) and of the block spans."""
        arrays = [self.ids, self.trained, self.starts, self.lengths] + ([self.positions] if self.has_positions else [])
        return sum(a.numel() * a.element_size() for a in arrays)

    @property
    def has_positions(self) -> bool:
        """Whether the blocks carry ``position_ids`` (isolated documents)."""
        return self.positions is not None

    def max_position_id(self) -> int:
        """The largest position id a block gives the model: ``seq_len - 1`` without ``position_ids`` (the model
        counts 0 ... ``seq_len - 1``), else the largest stored position (of every block sharing the arrays: an
        upper bound for a selection) or padding position (the padding restarts at 0)."""
        if not self.has_positions:
            return self.seq_len - 1
        stored = int(self.positions.max()) if self.positions.numel() else 0
        padding = self.seq_len - int(self.lengths.min()) - 1 if self.n_blocks else 0
        return max(stored, padding)

    def keys_order(self) -> tuple[str, ...]:
        """The keys, in the order the int64 blocks had them."""
        return ("input_ids", "labels", "attention_mask") + (("position_ids",) if self.has_positions else ())

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_order())

    def __len__(self) -> int:
        return len(self.keys_order())

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.keys_order():
            raise KeyError(key)
        return self.gather(self._columns.expand(self.n_blocks, -1) + self.starts[:, None], self.lengths, key)

    def gather(self, index: torch.Tensor, lengths: torch.Tensor, key: str) -> torch.Tensor:
        """``key``'s int64 values for token indices ``index`` (``[..., seq_len]``: a block's start + its columns) of
        blocks with ``lengths`` tokens (``[...]``)."""
        used = self._columns < lengths[..., None]
        index = torch.where(used, index, 0)
        if key == "attention_mask":
            return used.long()
        if key == "position_ids":
            padding = self._columns - lengths[..., None]
            return torch.where(used, self.positions[index].long(), padding)
        ids = torch.where(used, self.ids[index].long(), self.pad_id)
        if key == "input_ids":
            return ids
        return torch.where(used & self.trained[index], ids, IGNORE_INDEX)

    def row(self, i: int, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Block ``i``'s ``[seq_len]`` int64 tensors of ``keys``."""
        start, length = self.starts[i], self.lengths[i]
        return {key: self.gather(self._columns + start, length, key) for key in keys}

    def select(self, index: torch.Tensor) -> PackedBlocks:
        """The blocks ``index`` (indices or a bool mask), in that order, sharing the token arrays."""
        chosen = PackedBlocks.__new__(PackedBlocks)
        chosen.__dict__.update(self.__dict__)
        chosen.starts, chosen.lengths = self.starts[index], self.lengths[index]
        return chosen

    def head(self, width: int) -> PackedBlocks:
        """The first ``width`` columns of each block (``width <= seq_len``), sharing the token arrays: the same
        values as ``self[key][:, :width]`` for every key, without building the full tensors."""
        chosen = self.select(slice(None))
        chosen.seq_len, chosen._columns = width, self._columns[:width]
        chosen.lengths = self.lengths.clamp(max=width)
        return chosen

    def has_targets(self) -> torch.Tensor:
        """``[n_blocks]`` bool: the block has a trained token after its first (position 0 is never predicted)."""
        starts = self.starts.numpy()
        return torch.from_numpy(segment_sum(self.trained.numpy(), starts + 1, starts + self.lengths.numpy()) > 0)

    def used_ids(self) -> torch.Tensor:
        """The sorted distinct token ids in the blocks (padding left out)."""
        ids, seen = self.ids.numpy(), set()
        order = torch.argsort(self.starts).tolist()
        starts, lengths = self.starts.tolist(), self.lengths.tolist()
        pieces, size = [], 0
        for k, i in enumerate(order):
            pieces.append(ids[starts[i]:starts[i] + lengths[i]])
            size += lengths[i]
            if size >= _CHUNK_TOKENS or k == len(order) - 1:
                seen.update(np.unique(np.concatenate(pieces)).tolist())
                pieces, size = [], 0
        return torch.tensor(sorted(seen), dtype=torch.long)
