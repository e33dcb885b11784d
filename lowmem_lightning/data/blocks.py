"""Encoded records cut into ``seq_len``-token blocks (:func:`pack_blocks`: packed or one record at a time; isolated
documents' positions, :func:`document_position_ids`), which blocks each record reaches (:func:`record_blocks`), the
train/val split (:func:`split_indices`) and the blocks as a dataset of int64 rows (:class:`TokenBlocks`)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from lowmem_lightning.data.tokens import IGNORE_INDEX, EncodedRecords, PackedBlocks, flat_positions

__all__ = ["pack_blocks", "document_position_ids", "record_blocks", "split_indices", "trainable_blocks",
           "TokenBlocks"]


def document_position_ids(lengths: list[int], seq_len: int) -> torch.Tensor:
    """``[n_blocks, seq_len]`` int64 positions of a packed stream of documents of ``lengths`` tokens cut into
    ``seq_len``-token blocks: each token's offset from the start of its document, counted from the block's
    start for a document that began in an earlier block, so positions restart at 0 at every document start
    and every block start; the padding after the last document (up to the block's end) counts as one more
    document. Transformers reads a restart as a document boundary (``find_packed_sequence_indices``).
    (:func:`~lowmem_lightning.data.tokens.flat_positions` computes them as stored.)"""
    n_blocks = max(1, -(-sum(lengths) // seq_len))
    starts = np.cumsum([0, *lengths], dtype=np.int64)
    starts = np.unique(starts[starts < n_blocks * seq_len])  # a document (or the padding) starts at each
    return torch.from_numpy(flat_positions(starts, n_blocks * seq_len, seq_len)).long().view(n_blocks, seq_len)


def record_blocks(lengths: list[int], seq_len: int, pack: bool) -> list[range]:
    """The indices of the blocks :func:`pack_blocks` puts each record's tokens in, for records of ``lengths`` tokens
    (0: a record left out): packed, the blocks a record's span of the concatenated stream reaches; not packed, the
    record's own blocks (one per ``seq_len`` tokens, after those of the records before it)."""
    spans, start = [], 0
    for n in lengths:
        if pack:
            spans.append(range(start // seq_len, (start + n - 1) // seq_len + 1) if n else range(0))
            start += n
        else:
            blocks = -(-n // seq_len)
            spans.append(range(start, start + blocks))
            start += blocks
    return spans


def pack_blocks(
    encoded: EncodedRecords | list[tuple[list[int], list[int]]], seq_len: int, pad_id: int, pack: bool = True,
    isolate_documents: bool = False,
) -> PackedBlocks:
    """Blocks of ``seq_len`` tokens from encoded documents (:class:`EncodedRecords`, or ``(ids, labels)`` lists), as
    :class:`~lowmem_lightning.data.tokens.PackedBlocks`: spans of the records' arrays (no token copied), read as
    ``input_ids``, ``labels``, ``attention_mask`` ``[n_blocks, seq_len]`` int64 tensors. ``pack=True`` concatenates
    all documents first (one padded block at most); ``pack=False`` cuts each document on its own (one padded block
    per document; a record of length 0 has none). ``isolate_documents`` (with ``pack=True``) adds ``position_ids``
    (:func:`document_position_ids`) and sets the label of each token at position 0 to -100: the first token of a
    document is not predicted from the previous document's last token."""
    if not isinstance(encoded, EncodedRecords):
        encoded = EncodedRecords.from_pairs(encoded)
    if encoded.n_tokens == 0:
        raise ValueError("No tokens to train on: every document is empty.")
    if pack:
        return _packed_stream(encoded, seq_len, pad_id, isolate_documents)
    blocks_per_record = -(-encoded.lengths // seq_len)
    record = np.repeat(np.arange(len(encoded)), blocks_per_record)
    first_block = np.cumsum(blocks_per_record) - blocks_per_record
    offset = (np.arange(record.size) - first_block[record]) * seq_len  # the block's start inside its record
    lengths = np.minimum(seq_len, encoded.lengths[record] - offset)
    return PackedBlocks(encoded.ids, encoded.trained, encoded.starts[record] + offset, lengths, seq_len, pad_id)


def _packed_stream(encoded: EncodedRecords, seq_len: int, pad_id: int, isolate: bool) -> PackedBlocks:
    """:func:`pack_blocks` with ``pack=True``: the records, laid end to end, cut every ``seq_len`` tokens."""
    encoded = encoded.laid_end_to_end()
    n = encoded.n_tokens
    starts = np.arange(0, n, seq_len, dtype=np.int64)
    lengths = np.minimum(seq_len, n - starts)
    if not isolate:
        return PackedBlocks(encoded.ids, encoded.trained, starts, lengths, seq_len, pad_id)
    positions = flat_positions(encoded.starts[encoded.lengths > 0], n, seq_len)
    trained = encoded.trained & (positions != 0)  # a document's (and a block's) first token is not predicted
    return PackedBlocks(encoded.ids, trained, starts, lengths, seq_len, pad_id, positions)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, val)`` block indices: a permutation of ``range(n)`` seeded by ``seed`` puts
    ``round(val_fraction * n)`` blocks (at least 1 when ``val_fraction > 0``) in validation."""
    n_val = 0 if val_fraction == 0 else max(1, round(val_fraction * n))
    if n_val >= n:
        raise ValueError(
            f"Too little data for val_fraction={val_fraction}: {n} block(s) of seq_len tokens leave none "
            "for training; lower val_fraction or seq_len, or add data."
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def trainable_blocks(labels: torch.Tensor) -> torch.Tensor:
    """``[n_blocks]`` bool: the block has at least one target token. A causal LM predicts token
    ``t + 1`` from position ``t``, so the label at position 0 is never a target; a block whose other
    labels are all -100 (prompt, padding) contributes no loss term and, batched alone, a NaN loss."""
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=1)


class TokenBlocks(Dataset):
    """Rows of packed blocks: item ``i`` is ``{key: blocks[key][i]}`` for each key of ``keys`` (default: every
    key of ``blocks``: ``input_ids``, ``labels``, ``attention_mask`` and, for isolated documents,
    ``position_ids``), each ``[seq_len]`` int64. ``blocks`` holds them all, whichever ``keys`` the items carry: a dict
    of ``[n, seq_len]`` tensors, or :class:`~lowmem_lightning.data.tokens.PackedBlocks` (what ``TextDataModule``
    keeps: ~7 bytes per token), whose item is built when asked for, with the same keys, dtypes and values."""

    def __init__(self, blocks: PackedBlocks | dict[str, torch.Tensor], keys: tuple[str, ...] | None = None):
        self.blocks = blocks
        self.keys = tuple(blocks) if keys is None else keys

    def __len__(self) -> int:
        if isinstance(self.blocks, PackedBlocks):
            return self.blocks.n_blocks
        return self.blocks["input_ids"].shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if isinstance(self.blocks, PackedBlocks):
            return self.blocks.row(i, self.keys)
        return {k: self.blocks[k][i] for k in self.keys}
