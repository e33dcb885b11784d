"""Packed blocks of several documents, kept apart through ``position_ids`` (what ``TextDataModule`` makes with
``isolate_documents=True``), as a Hugging Face causal LM must be called to honour them.

Transformers 5 (``masking_utils``) reads a restart of ``position_ids`` as a document boundary and builds a
block-diagonal causal mask, but only when ``attention_mask`` is None and no cache is passed or made (hence
``use_cache=False``), and only for the attention implementations whose mask it builds: ``sdpa`` and ``eager``
(a ``[batch, 1, seq, seq]`` mask) and ``flex_attention`` (a block mask). The ``flash_attention_*``
implementations find the documents from ``position_ids`` only in one flattened row (batch size 1), so a
``[batch, seq]`` batch is flattened into ``[1, batch * seq]`` for them (as ``DataCollatorWithFlattening``
does); any other implementation (a kernel registered by name) gets no mask at all and is refused.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MASKED_ATTENTION", "FLATTENED_ATTENTION", "attention_implementation", "packed_call"]

MASKED_ATTENTION = ("sdpa", "eager", "flex_attention")
"""Attention implementations for which transformers builds the block-diagonal mask of packed documents from
``position_ids`` at any batch size."""

FLATTENED_ATTENTION = ("flash_attention_2", "flash_attention_3", "flash_attention_4")
"""Attention implementations that keep documents apart only in a batch of one row (varlen from ``position_ids``)."""

IGNORE_INDEX = -100


def attention_implementation(model: nn.Module) -> str | None:
    """The ``config._attn_implementation`` of ``model`` (a peft model's base config), or ``None`` if it has none."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def _flatten(input_ids: torch.Tensor, labels: torch.Tensor | None, position_ids: torch.Tensor) -> dict:
    """``[batch, seq]`` inputs as one ``[1, batch * seq]`` row; each row's first label becomes -100, so no row's
    first token is predicted from the previous row's last one (the model shifts labels across the joined rows)."""
    flat = {"input_ids": input_ids.reshape(1, -1), "position_ids": position_ids.reshape(1, -1)}
    if labels is not None:
        flat["labels"] = labels.clone()
        flat["labels"][:, 0] = IGNORE_INDEX
        flat["labels"] = flat["labels"].reshape(1, -1)
    return flat


def packed_call(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor | None, position_ids: torch.Tensor):
    """``model``'s output for packed documents (``position_ids`` restarting at each document, no attention mask),
    with ``use_cache=False``: flattened to one row for the ``flash_attention_*`` implementations (the logits come
    back as ``[batch, seq, vocab]``; the loss, a mean over target tokens, is the same). ``ValueError`` naming the
    implementation when it would let documents attend to each other."""
    implementation = attention_implementation(model)
    if implementation in MASKED_ATTENTION or (implementation in FLATTENED_ATTENTION and input_ids.shape[0] == 1):
        return model(input_ids=input_ids, labels=labels, position_ids=position_ids, use_cache=False)
    if implementation in FLATTENED_ATTENTION:
        out = model(**_flatten(input_ids, labels, position_ids), use_cache=False)
        out.logits = out.logits.view(*input_ids.shape, -1)
        return out
    allowed = ", ".join(MASKED_ATTENTION + FLATTENED_ATTENTION)
    raise ValueError(
        f"Invalid attention implementation {implementation!r} for packed documents (batches with position_ids, "
        f"TextDataModule's isolate_documents=True): transformers builds no per-document mask for it, so the "
        f"documents of a block would attend to each other. Use one of {allowed} "
        "(model.set_attn_implementation('sdpa')), or set isolate_documents=False."
    )
