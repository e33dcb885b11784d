"""Packed blocks of several documents, kept apart through ``position_ids`` (what ``TextDataModule`` makes with
``isolate_documents=True``), as a Hugging Face causal LM must be called to honour them.

Transformers 5 (``masking_utils``) reads a restart of ``position_ids`` as a document boundary and builds a
block-diagonal causal mask, but only when ``attention_mask`` is None and no cache is passed or made (hence
``use_cache=False``), and only for the attention implementations whose mask it builds: ``sdpa`` and ``eager``
(a ``[batch, 1, seq, seq]`` mask) and ``flex_attention`` (a block mask). The ``flash_attention_*``
implementations find the documents from ``position_ids`` only in one flattened row (batch size 1), so a
``[batch, seq]`` batch is flattened into ``[1, batch * seq]`` for them (as ``DataCollatorWithFlattening``
does); any other implementation (a kernel registered by name) gets no mask at all and is refused. Some models'
forward builds its masks without the positions (transformers 5: gpt-oss, AFMoE, OPT, BLOOM, XGLM; BioGPT from an
all-ones mask of its own), which would let the documents see each other: :func:`packed_call` hands the positions to
the mask factories their modeling modules call (:func:`_positions_given`).

Models with multimodal rotary positions (``mrope_section``: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5, GLM-4V, ...)
take ``position_ids`` as ``[4, batch, seq]``: the text positions (which the mask is built from), then one row per
rotary section (time, height, width), all equal for text. Given ``[batch, seq]``, Qwen2-VL, Qwen2.5-VL and GLM-4V
widen it to the three rotary rows only and build no document mask, so :func:`packed_call` passes the four rows.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import sys
import weakref

import torch
from torch import nn

from lowmem_lightning.multimodal import language_model_modules, text_config

__all__ = ["FLATTENED_ATTENTION", "KEPT_APART_LAYER_TYPES", "MASKED_ATTENTION", "PER_POSITION_LAYER_TYPES",
           "RECURRENT_MODEL_TYPES", "attention_implementation", "layers_across_documents", "packed_call",
           "packed_documents_problem", "position_offset", "uses_multimodal_rotary", "builds_masks_without_positions"]

MASKED_ATTENTION = ("sdpa", "eager", "flex_attention")
"""Attention implementations for which transformers builds the block-diagonal mask of packed documents from
``position_ids`` at any batch size."""

FLATTENED_ATTENTION = ("flash_attention_2", "flash_attention_3", "flash_attention_4")
"""Attention implementations that keep documents apart only in a batch of one row (varlen from ``position_ids``)."""

IGNORE_INDEX = -100

_PROBLEMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""model -> :func:`packed_documents_problem` of it, as :func:`packed_call` found it at its first call."""


def attention_implementation(model: nn.Module) -> str | None:
    """The ``config._attn_implementation`` of ``model`` (a peft model's base config), or ``None`` if it has none."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


KEPT_APART_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
"""``layer_types`` entries whose attention masks transformers builds per document from restarting ``position_ids``."""

PER_POSITION_LAYER_TYPES = ("moe", "mlp", "sparse", "dense")
"""``layer_types`` entries of layers that mix no tokens (Nemotron-H's MoE and MLP layers, listed among its mixers;
transformers' MLP kinds): nothing of one document reaches another through them."""


RECURRENT_MODEL_TYPES = {"rwkv": "RWKV time-mixing", "xlstm": "xLSTM"}
"""``model_type -> name of its layers`` for recurrent models whose config lists no ``layer_types``: every layer carries
state from one document of a packed block into the next."""


def layers_across_documents(config, model: nn.Module | None = None) -> list[str]:
    """What mixes tokens without an attention mask in the model of transformers config ``config`` (or in ``model``),
    so that no ``position_ids`` keep the documents of a packed block apart: the text config's ``layer_types`` entries
    other than :data:`KEPT_APART_LAYER_TYPES` and :data:`PER_POSITION_LAYER_TYPES` (the linear-attention /
    state-space layers of Qwen3.5, Qwen3-Next, Falcon-H1, Jamba, Nemotron-H, ...: their recurrent state and causal
    convolution run through the whole block in transformers' PyTorch path), every layer of a
    :data:`RECURRENT_MODEL_TYPES` model (RWKV, xLSTM: no ``layer_types``), and, where it lists none, the
    ``nn.Conv1d`` token convolutions of ``model``'s language model (not those of an audio or vision tower: Gemma 4's
    audio conformer). Each as ``"<type> layers (<count> of <layers>)"``; ``[]`` for attention-only models."""
    text = text_config(config)
    types = getattr(text, "layer_types", None)
    types = list(types) if isinstance(types, (list, tuple)) else []
    found = [f"{kind} layers ({types.count(kind)} of {len(types)})"
             for kind in dict.fromkeys(types) if kind not in KEPT_APART_LAYER_TYPES + PER_POSITION_LAYER_TYPES]
    recurrent = RECURRENT_MODEL_TYPES.get(getattr(text, "model_type", None))
    if recurrent and not found:
        layers = getattr(text, "num_hidden_layers", None)
        found = [f"{recurrent} layers ({layers} of {layers})"]
    if not found and model is not None:
        convs = [name for name, module in language_model_modules(model) if isinstance(module, nn.Conv1d)]
        if convs:
            found = [f"token convolutions ({convs[0]}, ...: {len(convs)} in all)"]
    return found


def builds_masks_without_positions(model: nn.Module) -> bool:
    """Whether ``model``'s language model builds its attention masks without transformers' mask factories
    (:data:`MASK_FACTORIES`: no modeling module of its classes has one; transformers 5's OpenAI GPT, XLM, CPM-Ant, a
    model's own code), so that no ``position_ids`` can keep packed documents apart under the attention
    implementations whose mask transformers builds (:data:`MASKED_ATTENTION`)."""
    if attention_implementation(model) not in MASKED_ATTENTION:
        return False
    namespaces = {type(module).__module__ for _, module in language_model_modules(model)}
    return not any(hasattr(sys.modules.get(name), factory) for name in namespaces for factory in MASK_FACTORIES)


def packed_documents_problem(config, model: nn.Module | None = None) -> str | None:
    """Why the model of ``config`` (``model``, when built) cannot keep packed documents apart
    (:func:`layers_across_documents`, :func:`builds_masks_without_positions`), said as a refusal of
    ``isolate_documents=True`` with what to set instead; ``None`` when it can."""
    kind = getattr(config, "model_type", None) or type(model).__name__
    found = layers_across_documents(config, model)
    if not found and model is not None and builds_masks_without_positions(model):
        return (
            f"Invalid isolate_documents=True for this {kind} model: it builds its attention mask without transformers' "
            "mask functions, which alone read a restart of position_ids as a document boundary, so the documents of a "
            f"packed block would attend to each other. {_INSTEAD}"
        )
    if not found:
        return None
    return (
        f"Invalid isolate_documents=True for this {kind} model: its {', '.join(found)} carry state from one "
        "document of a packed block into the next (only attention layers are masked per document), so the documents "
        f"would not be kept apart. {_INSTEAD}"
    )


_INSTEAD = ("Set --data.init_args.isolate_documents false (packed documents then see each other, as plain packing "
            "does) or --data.init_args.pack false (one document per block).")


def uses_multimodal_rotary(model: nn.Module) -> bool:
    """Whether ``model``'s text config gives multimodal rotary sections (``rope_parameters["mrope_section"]``)."""
    config = getattr(model, "config", None)
    text = text_config(config)
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None)
    return isinstance(rope, dict) and rope.get("mrope_section") is not None


def position_offset(model: nn.Module) -> int:
    """Where ``model``'s own positions start: ``padding_idx + 1`` for the RoBERTa family (RoBERTa, XLM-R, CamemBERT,
    Data2Vec-text, RoBERTa-PreLayerNorm, ...: an input embedding that numbers positions after its padding index,
    ``create_position_ids_from_input_ids``, and takes given ``position_ids`` as they are), else 0."""
    for _, module in language_model_modules(model):
        padding = getattr(module, "padding_idx", None)
        if hasattr(module, "create_position_ids_from_input_ids") and isinstance(padding, int):
            return padding + 1
    return 0


_OFFSETS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""model -> :func:`position_offset` of it, found at :func:`packed_call`'s first call."""


def _with_text_row(model: nn.Module, position_ids: torch.Tensor) -> torch.Tensor:
    """``[batch, seq]`` text ``position_ids`` (restarting at 0 in each document) as ``model`` takes them: shifted to
    where its positions start (:func:`position_offset`), and as ``[4, batch, seq]`` (text, time, height, width: all
    equal) for :func:`uses_multimodal_rotary`."""
    offset = _OFFSETS.get(model, 0)
    position_ids = position_ids + offset if offset else position_ids
    if not uses_multimodal_rotary(model):
        return position_ids
    return position_ids[None].expand(4, *position_ids.shape)


def _flatten(input_ids: torch.Tensor, labels: torch.Tensor | None, position_ids: torch.Tensor) -> dict:
    """``[batch, seq]`` inputs as one ``[1, batch * seq]`` row; each row's first label becomes -100, so no row's
    first token is predicted from the previous row's last one (the model shifts labels across the joined rows)."""
    flat = {"input_ids": input_ids.reshape(1, -1), "position_ids": position_ids.reshape(1, -1)}
    if labels is not None:
        flat["labels"] = labels.clone()
        flat["labels"][:, 0] = IGNORE_INDEX
        flat["labels"] = flat["labels"].reshape(1, -1)
    return flat


MASK_FACTORIES = ("create_causal_mask", "create_sliding_window_causal_mask", "create_chunked_causal_mask")
"""transformers' mask factories (``masking_utils``) that read a restart of ``position_ids`` as a document boundary."""

_DOCUMENT_POSITIONS: contextvars.ContextVar = contextvars.ContextVar("lowmem_document_positions", default=None)
"""The ``[batch, seq]`` ``position_ids`` of the packed block :func:`packed_call` is running, else None."""


def _positions_given(create):
    """Mask factory ``create`` given the packed block's ``position_ids`` (:data:`_DOCUMENT_POSITIONS`) where its caller
    passes none, and no ``[batch, seq]`` attention mask: gpt-oss's, AFMoE's, OPT's and BLOOM's forward (transformers 5)
    build their masks without the positions, BioGPT's from an all-ones mask it makes (a packed block is called with no
    mask, so one that reaches the factory holds no padding), and transformers reads document boundaries only from
    positions without a mask: without this the documents of a block would attend to each other."""
    signature = inspect.signature(create)

    @functools.wraps(create)
    def create_mask(*args, **kwargs):
        positions = _DOCUMENT_POSITIONS.get()
        if positions is None:
            return create(*args, **kwargs)
        bound = signature.bind_partial(*args, **kwargs)
        if bound.arguments.get("position_ids") is None:
            bound.arguments["position_ids"] = positions
        mask = bound.arguments.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            bound.arguments["attention_mask"] = None
        return create(*bound.args, **bound.kwargs)

    create_mask.lowmem_positions_given = True
    return create_mask


def _give_positions_to_mask_factories(model: nn.Module) -> None:
    """Wrap the :data:`MASK_FACTORIES` that the modeling modules of ``model``'s classes call (:func:`_positions_given`;
    once per module, outside :func:`packed_call` they call through unchanged)."""
    for module_name in dict.fromkeys(type(m).__module__ for m in model.modules()):
        namespace = sys.modules.get(module_name)
        for name in MASK_FACTORIES:
            factory = getattr(namespace, name, None)
            if callable(factory) and not getattr(factory, "lowmem_positions_given", False):
                setattr(namespace, name, _positions_given(factory))


def _masked_call(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor | None, position_ids: torch.Tensor):
    """``model`` called on a packed block under an attention whose mask transformers builds (:data:`MASKED_ATTENTION`),
    the block's ``position_ids`` handed to its mask factories too (:func:`_positions_given`)."""
    token = _DOCUMENT_POSITIONS.set(position_ids)
    try:
        return model(input_ids=input_ids, labels=labels, position_ids=_with_text_row(model, position_ids),
                     use_cache=False)
    finally:
        _DOCUMENT_POSITIONS.reset(token)


def packed_call(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor | None, position_ids: torch.Tensor):
    """``model``'s output for packed documents (``position_ids`` restarting at each document, no attention mask),
    with ``use_cache=False``: flattened to one row for the ``flash_attention_*`` implementations (the logits come
    back as ``[batch, seq, vocab]``; the loss, a mean over target tokens, is the same). ``ValueError`` naming the
    implementation when it would let documents attend to each other, or naming the layers that carry state from one
    document into the next (:func:`packed_documents_problem`)."""
    if model not in _PROBLEMS:  # once per model: not a walk over its modules at every step
        _PROBLEMS[model] = packed_documents_problem(getattr(model, "config", None), model)
        _OFFSETS[model] = position_offset(model)
        _give_positions_to_mask_factories(model)
    if _PROBLEMS[model]:
        raise ValueError(_PROBLEMS[model])
    implementation = attention_implementation(model)
    if implementation in MASKED_ATTENTION:
        return _masked_call(model, input_ids, labels, position_ids)
    if implementation in FLATTENED_ATTENTION and input_ids.shape[0] == 1:
        return model(input_ids=input_ids, labels=labels, position_ids=_with_text_row(model, position_ids),
                     use_cache=False)
    if implementation in FLATTENED_ATTENTION:
        flat = _flatten(input_ids, labels, position_ids)
        flat["position_ids"] = _with_text_row(model, flat["position_ids"])
        out = model(**flat, use_cache=False)
        out.logits = out.logits.view(*input_ids.shape, -1)
        return out
    allowed = ", ".join(MASKED_ATTENTION + FLATTENED_ATTENTION)
    raise ValueError(
        f"Invalid attention implementation {implementation!r} for packed documents (batches with position_ids, "
        f"TextDataModule's isolate_documents=True): transformers builds no per-document mask for it, so the "
        f"documents of a block would attend to each other. Use one of {allowed} "
        "(model.set_attn_implementation('sdpa')), or set isolate_documents=False."
    )
