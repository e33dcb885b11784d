"""Embedding rows a pretrained checkpoint never trained, for the tokens a fine-tune meets.

A base checkpoint can hold rows for tokens its pretraining never saw: Llama-3-8B's chat markers
(``<|start_header_id|>``, ``<|end_header_id|>``, ``<|eot_id|>``) and reserved special tokens are zero or near-zero
rows of ``embed_tokens`` and ``lm_head``; Qwen2's embedding is padded past its tokenizer (151936 rows for ~151665
ids), so tokens a user adds land in padding rows. Under LoRA those rows are frozen: the model never learns to read
or emit the token.

The rule (:func:`untrained_token_ids`): a token's row is untrained when its L2 norm is at most
:data:`UNTRAINED_NORM_FRACTION` of the median row norm of its layer, in the input embedding or in an untied output
head. Training moves every row a token is read or predicted through, and weight decay alone shrinks a row toward
zero; a row a thousand times shorter than the typical one has carried no signal (an exact zero, or bf16's ~1e-23
left by decay), while the rarest trained tokens stay within a small factor of the median. A token untrained in
either layer is untrained in both (the data never held it), so both rows are treated. Only the ids given are
looked at: the data module's special tokens that occur in its data (``special_tokens_in_data``), not the
hundreds of reserved tokens no batch holds.

Ids past the checkpoint's own tokenizer: an embedding padded past its tokenizer (Qwen2) has rows no token of
pretraining ever selected, and a checkpoint may have left them at their random initialization (norms like any
trained row). When the checkpoint folder or Hub snapshot ships its tokenizer (``tokenizer.json``), every id at or
past that tokenizer's length (:func:`checkpoint_tokenizer_length`) is untrained whatever its norm; without one, the
norm rule alone decides. Trained rows are those neither rule flags; their mean (:func:`trained_row_mean`) is where
untrained rows and rows ``resize_embeddings`` grows start.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from lowmem_lightning.lowmem_warning import LowMemWarning

__all__ = ["UNTRAINED_NORM_FRACTION", "untrained_token_ids", "initialize_untrained_rows", "trained_row_mean",
           "checkpoint_tokenizer_length", "describe_tokens"]

UNTRAINED_NORM_FRACTION = 1e-3
"""A row whose L2 norm is at most this fraction of its layer's median row norm counts as untrained."""

_CHUNK_ROWS = 8192
"""Rows whose norms are computed at once (an fp32 copy of a chunk, never of the whole matrix)."""


def _token_layers(model: nn.Module) -> list[torch.Tensor]:
    """The weights of ``model``'s input embedding and, when it has its own, output head (a tied head once)."""
    weights = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not weights[0]:
        weights.append(head.weight)
    return weights


@torch.no_grad()
def _row_norms(weight: torch.Tensor) -> torch.Tensor:
    """``[rows]`` fp32 L2 norm of each row of ``weight``, computed ``_CHUNK_ROWS`` rows at a time."""
    return torch.cat([torch.linalg.vector_norm(weight[i:i + _CHUNK_ROWS], dim=1, dtype=torch.float32)
                      for i in range(0, weight.shape[0], _CHUNK_ROWS)])


def _untrained_mask(weight: torch.Tensor, seen_rows: int | None = None) -> torch.Tensor:
    """``[rows]`` bool: the rows of ``weight`` whose norm is at most ``UNTRAINED_NORM_FRACTION`` of the median, and
    every row from ``seen_rows`` on (ids past the checkpoint's tokenizer; ``None``: none)."""
    norms = _row_norms(weight)
    mask = norms <= UNTRAINED_NORM_FRACTION * norms.median()
    if seen_rows is not None:
        mask[seen_rows:] = True
    return mask


def checkpoint_tokenizer_length(model_name_or_path: str | Path) -> int | None:
    """The number of ids (added tokens included) of the tokenizer that checkpoint ``model_name_or_path`` (a local
    directory or Hub repo id, resolved as its weights are) ships as ``tokenizer.json``: ids from there on were never
    produced in pretraining. ``None`` when it ships none, or one this ``tokenizers`` cannot read (a
    ``LowMemWarning`` says so: the norm rule alone then decides). Reads that file only, never the weights."""
    from tokenizers import Tokenizer

    from lowmem_lightning.hub import resolve_pretrained

    path = resolve_pretrained(model_name_or_path, "model_name_or_path", need="weights") / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        return Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
    except Exception as err:  # tokenizers raises a bare Exception for a file it cannot parse
        warnings.warn(f"model_name_or_path={str(model_name_or_path)!r}: its tokenizer.json cannot be read "
                      f"({str(err).strip()}), so which ids pretraining never produced is unknown: their rows are "
                      "judged by their norms alone.", LowMemWarning, stacklevel=2)
        return None


def untrained_token_ids(model: nn.Module, ids: Iterable[int], seen_rows: int | None = None) -> list[int]:
    """The ids among ``ids`` (those inside the input embedding's rows) whose input-embedding row or untied output-head
    row is untrained by the module's rule (norm <= ``UNTRAINED_NORM_FRACTION`` x the layer's median row norm), or
    that are at or past ``seen_rows`` (the checkpoint tokenizer's length, :func:`checkpoint_tokenizer_length`;
    ``None``: the norm rule alone), sorted. ``model`` holds real weights (not meta)."""
    rows = model.get_input_embeddings().weight.shape[0]
    wanted = sorted({int(i) for i in ids if 0 <= int(i) < rows})
    if not wanted:
        return []
    index = torch.tensor(wanted)
    flagged = torch.zeros(len(wanted), dtype=torch.bool)
    for weight in _token_layers(model):
        flagged |= _untrained_mask(weight, seen_rows)[index.to(weight.device)].cpu()
    return index[flagged].tolist()


@torch.no_grad()
def trained_row_mean(weight: torch.Tensor, seen_rows: int | None = None) -> torch.Tensor:
    """``[hidden]`` fp32 mean of the rows of ``weight`` that are trained: neither near zero by the module's norm
    rule nor at or past ``seen_rows`` (zeros when none is), summed ``_CHUNK_ROWS`` rows at a time."""
    trained = ~_untrained_mask(weight, seen_rows)
    total = torch.zeros(weight.shape[1], dtype=torch.float32, device=weight.device)
    for i in range(0, weight.shape[0], _CHUNK_ROWS):
        total += weight[i:i + _CHUNK_ROWS][trained[i:i + _CHUNK_ROWS]].float().sum(dim=0)
    return total / trained.sum().clamp(min=1)


@torch.no_grad()
def initialize_untrained_rows(model: nn.Module, ids: list[int], seen_rows: int | None = None) -> None:
    """Set the rows ``ids`` of the input embedding and of an untied output head to the mean of the layer's trained
    rows (:func:`trained_row_mean` with ``seen_rows``), as the rows ``resize_embeddings`` grows start."""
    if not ids:
        return
    for weight in _token_layers(model):
        weight[torch.tensor(ids, device=weight.device)] = trained_row_mean(weight, seen_rows).to(weight.dtype)


def describe_tokens(ids: list[int], names: Mapping[int, str] | None, shown: int = 5) -> str:
    """``"'<|eot_id|>' (128009), ... and N more"``: the first ``shown`` of ``ids`` by name (id alone without one)."""
    names = names or {}
    parts = [f"{names[i]!r} ({i})" if i in names else f"id {i}" for i in ids[:shown]]
    more = f" and {len(ids) - shown} more" if len(ids) > shown else ""
    return ", ".join(parts) + more
