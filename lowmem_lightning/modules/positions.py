"""Whether a causal LM can take the position ids its data gives it, decided from the model's config before any
weight is read.

A model with a learned table of absolute positions (GPT-2's ``wpe``, OPT's and BioGPT's ``embed_positions``,
GPT-Neo, StarCoder's GPTBigCode) has ``max_position_embeddings`` rows: a position id past them fails the forward
with ``IndexError: index out of range in self`` at the first step, so :func:`position_problem` refuses it first,
naming ``seq_len``. A RoPE model computes any position; a checkpoint pretrained up to ``max_position_embeddings``
with unscaled RoPE (``rope_type`` ``"default"``) meets positions it never saw, which :func:`position_problem`
says in a warning. A model built from an architecture config learns its positions from scratch: no warning.
"""

from __future__ import annotations

import torch
from torch import nn

from lowmem_lightning.multimodal import causal_lm_auto_class, text_config
from lowmem_lightning.remote_code import remote_code_trusted

__all__ = ["position_limit", "learned_position_tables", "position_problem"]

POSITION_TABLE_OFFSETS = range(0, 3)
"""Extra rows a learned position table may have beyond ``max_position_embeddings`` (OPT and BioGPT: 2)."""


def position_limit(cfg) -> int | None:
    """The model's ``max_position_embeddings`` (GPT-2's ``n_positions``; a multimodal model's text config), or
    ``None`` when its config does not give an integer."""
    limit = getattr(text_config(cfg), "max_position_embeddings", None)
    return limit if isinstance(limit, int) and not isinstance(limit, bool) else None


def learned_position_tables(cfg) -> list[str] | None:
    """The names of the model's learned absolute-position tables: ``nn.Embedding`` layers other than the input
    embeddings with :func:`position_limit` rows (up to :data:`POSITION_TABLE_OFFSETS` more), found on a build of
    ``cfg`` on the meta device (no memory, no weights). ``None`` when transformers cannot build it."""
    limit = position_limit(cfg)
    try:
        with torch.device("meta"):
            model = causal_lm_auto_class(cfg).from_config(cfg, trust_remote_code=remote_code_trusted())
    except Exception:  # noqa: BLE001 - a model transformers cannot build here (remote code): not decidable
        return None
    tokens = model.get_input_embeddings()
    return [name for name, layer in model.named_modules()
            if isinstance(layer, nn.Embedding) and layer is not tokens
            and limit is not None and layer.num_embeddings - limit in POSITION_TABLE_OFFSETS]


def _unscaled_rope(cfg) -> bool:
    """Whether ``cfg`` gives RoPE parameters without a scaling (``rope_type`` ``"default"``)."""
    text = text_config(cfg)
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None)
    return isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) in (None, "default")


def position_problem(cfg, max_position_id: int, seq_len: int, pretrained: bool) -> tuple[str | None, str | None]:
    """``(error, warning)`` for a model of config ``cfg`` given position ids up to ``max_position_id`` by blocks of
    ``seq_len`` tokens: the error (a learned position table too short: the forward would fail) names ``seq_len``
    and the most it may be; the warning (a ``pretrained`` checkpoint with unscaled RoPE past its
    ``max_position_embeddings``) says what it meets. ``(None, None)`` when the positions fit."""
    limit = position_limit(cfg)
    if limit is None or max_position_id < limit:
        return None, None
    tables = learned_position_tables(cfg)
    if tables:
        return (f"Invalid seq_len={seq_len} for this model: its learned position embeddings ({', '.join(tables)}) "
                f"hold max_position_embeddings={limit} positions (ids 0-{limit - 1}), but the data's blocks give it "
                f"position ids up to {max_position_id}, so its forward would fail (IndexError) at the first step. "
                f"Set seq_len to {limit} or less (--data.seq_len {limit})."), None
    if pretrained and _unscaled_rope(cfg):
        return None, (f"CausalLMModule: the data's blocks give the model position ids up to {max_position_id}, past "
                      f"its max_position_embeddings={limit} with unscaled RoPE (rope_type 'default'): it was not "
                      f"pretrained on those positions and may do worse on them. Set seq_len to {limit} or less "
                      f"(--data.seq_len {limit}), or train a checkpoint whose config scales RoPE.")
    return None, None
