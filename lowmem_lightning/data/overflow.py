"""Records that each get their own blocks (``TextDataModule(pack=False)``): what happens to one longer than
``seq_len`` (``overflow``), and batches padded only to their longest record (:func:`collate_trimmed`).

``overflow`` decides, per record longer than ``seq_len`` tokens:

- ``"split"``: cut it into ``seq_len``-token blocks (a later block starts without the earlier tokens);
- ``"truncate"``: keep its first ``seq_len`` tokens (labels follow), as TRL's ``max_length`` does; a record whose
  kept tokens hold no target (the prompt fills them) is dropped, as its block would only give a NaN loss;
- ``"drop"``: leave it out, as axolotl does;
- ``None`` (the default): split plain-text records (``.txt`` files, ``{"text"}``), whose every token is trained
  anyway, and truncate records with a prompt (instruction and chat records), whose later blocks would train
  replies on a block that no longer holds the question.

:func:`fit_records` applies it and counts what it cost (:class:`OverflowReport`, said in one warning).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch.utils.data import default_collate

from lowmem_lightning.data.tokens import EncodedRecords

__all__ = ["Overflow", "OVERFLOW_CHOICES", "OverflowReport", "check_overflow", "fit_records", "collate_trimmed"]

Overflow = Literal["split", "truncate", "drop"]
"""The values ``TextDataModule(overflow=...)`` accepts besides ``None``."""

OVERFLOW_CHOICES = ("split", "truncate", "drop")
"""The values of :data:`Overflow`, in order."""

def check_overflow(overflow, pack: bool) -> None:
    """``ValueError`` naming ``overflow``, its value and the choices when it is none of :data:`OVERFLOW_CHOICES` or
    ``None``, or when it is set with ``pack=True`` (packed records are concatenated before they are cut, so no record
    has blocks of its own to split, truncate or drop)."""
    if overflow is not None and overflow not in OVERFLOW_CHOICES:
        raise ValueError(f"Invalid overflow={overflow!r}: expected one of {', '.join(map(repr, OVERFLOW_CHOICES))} "
                         "or None (split plain text, truncate records with a prompt).")
    if overflow is not None and pack:
        raise ValueError(f"Invalid overflow={overflow!r} with pack=True: overflow decides what happens to a record "
                         "longer than seq_len when each record gets its own blocks (pack=False); packed records are "
                         "concatenated and cut at seq_len. Set pack=False or leave overflow unset (None).")


@dataclass
class OverflowReport:
    """What :func:`fit_records` did: ``records`` read, ``long`` of them over ``seq_len`` tokens, ``truncated`` and
    ``dropped`` of those, and the trained tokens (labels other than -100) of all records (``trained``) and of those
    it left out (``lost``)."""

    records: int = 0
    long: int = 0
    truncated: int = 0
    dropped: int = 0
    trained: int = 0
    lost: int = 0

    def message(self, overflow: str | None, seq_len: int) -> str | None:
        """One line saying what was truncated or dropped, the trained tokens that cost, and the setting that decided
        it; ``None`` when nothing was."""
        if not (self.truncated or self.dropped):
            return None
        split = self.long - self.truncated - self.dropped
        done = [f"truncated {self.truncated} to their first {seq_len} tokens"] if self.truncated else []
        why = "" if overflow == "drop" else f" whose first {seq_len} tokens hold no trained token"
        done += [f"dropped {self.dropped}{why}"] if self.dropped else []
        done += [f"split {split} (plain text) into blocks"] if split else []
        setting = ("overflow=None (the default: plain text is split, records with a prompt are truncated)"
                   if overflow is None else f"overflow={overflow!r}")
        share = 100 * self.lost / max(self.trained, 1)
        return (f"TextDataModule: {self.long} of {self.records} records are longer than seq_len={seq_len} tokens; "
                f"{setting} {', '.join(done)}, which cost {self.lost} of {self.trained} trained tokens "
                f"({share:.1f}%); raise seq_len, or set overflow to {_others(overflow)}.")


def _others(overflow: str | None) -> str:
    """The choices of ``overflow`` other than the one in use, in words, for :meth:`OverflowReport.message`."""
    words = {"split": "'split' (later blocks of a record lack its start)", "truncate": "'truncate'", "drop": "'drop'"}
    others = [words[choice] for choice in OVERFLOW_CHOICES if choice != overflow]
    return ", ".join(others[:-1]) + " or " + others[-1]


def fit_records(
    encoded: EncodedRecords, prompted: np.ndarray, seq_len: int, overflow: str | None
) -> tuple[EncodedRecords, OverflowReport]:
    """``(kept, report)``: the encoded records after ``overflow`` (see the module docstring) treated those longer
    than ``seq_len``: ``kept`` shares ``encoded``'s arrays, each record cut to the tokens kept (``seq_len`` when
    truncated, 0 when dropped); ``prompted[i]`` says record ``i`` has a prompt (instruction or chat), which
    ``overflow=None`` truncates rather than splits. A truncated record whose first ``seq_len`` tokens hold no target
    (a trained token after the first, which a causal LM never predicts) is dropped."""
    prompted = np.asarray(prompted, dtype=np.bool_)
    trained = encoded.trained_counts()
    long = encoded.lengths > seq_len
    truncate = long & (prompted if overflow is None else np.full(len(encoded), overflow == "truncate"))
    drop = long & (overflow == "drop")
    kept_trained = encoded.trained_counts(limit=seq_len)
    targets = encoded.trained_counts(limit=seq_len, skip_first=True)
    truncated = truncate & (targets > 0)
    drop |= truncate & ~truncated
    lengths = np.where(truncated, seq_len, np.where(drop, 0, encoded.lengths))
    report = OverflowReport(records=len(encoded), long=int(long.sum()), truncated=int(truncated.sum()),
                            dropped=int(drop.sum()), trained=int(trained.sum()),
                            lost=int((trained - kept_trained)[truncated].sum() + trained[drop].sum()))
    return encoded.with_lengths(lengths), report


WIDTH_MULTIPLE = 8
"""Trimmed batches are a multiple of this many columns wide (or the full ``seq_len``): tensor-core friendly matrix
shapes, and at most ``seq_len / 8`` distinct widths for a compiled model to specialise on."""


def collate_trimmed(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``default_collate`` of ``items`` (dicts of ``[seq_len]`` tensors with an ``attention_mask``), less the leading
    and trailing columns whose ``attention_mask`` is 0 in every row, keeping the width a multiple of
    :data:`WIDTH_MULTIPLE` (or ``seq_len``): a batch of right-padded records is as wide as its longest record rounded
    up, a batch of left-padded prompts (their last column used) as its longest prompt rounded up, the extra columns
    taken on the left. The columns left out are padding (labels -100) that no kept token attends to, so the loss is
    the same."""
    batch = default_collate(items)
    used = batch["attention_mask"].any(dim=0).nonzero()
    if used.numel() == 0:
        return batch
    first, last, columns = int(used[0]), int(used[-1]) + 1, batch["attention_mask"].shape[1]
    width = min(columns, -(-(last - first) // WIDTH_MULTIPLE) * WIDTH_MULTIPLE)
    first, last = (columns - width, columns) if last == columns else (first, min(columns, first + width))
    first = min(first, last - width)
    return {key: value[:, first:last] for key, value in batch.items()}
