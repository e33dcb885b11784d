"""Vision-language checkpoints fine-tuned on text: their language model trains, their vision parts are kept as-is.

Many checkpoints users fine-tune as language models are vision-language models: Ministral 3 and Mistral Small 3.x
(``Mistral3ForConditionalGeneration``), Qwen2.5-VL and Qwen3-VL, LLaVA, Gemma 3 (4B and up), Qwen3.5, Llama 4. For most
``AutoModelForCausalLM`` refuses the config, and for Qwen3.5 and Llama 4 it builds the language model alone; the class
that builds the whole checkpoint and predicts its next token is ``AutoModelForImageTextToText``'s
(:func:`causal_lm_auto_class`). Given text only, their forward is their language model's, with its loss.

The whole model is built and loaded, so a saved model (or an adapter, which names the modules of the whole model) is
the checkpoint's own format: it loads back with the class the checkpoint names, vision included. What text never
reaches stays frozen (:func:`freeze_outside_language_model`): the vision encoder and the projector into the text
embeddings (:func:`outside_language_model`), which no text batch gives a gradient, so no optimizer state is kept for
them and LoRA adapts the language model's layers only (:func:`outside_language_model_pattern`, peft's
``exclude_modules``).
"""

from __future__ import annotations

import re

from torch import nn

__all__ = ["as_causal_decoder", "causal_lm_auto_class", "freeze_outside_language_model", "is_vision_language",
           "language_model_modules", "outside_language_model", "outside_language_model_pattern", "text_config"]


def text_config(config):
    """The config that holds the text model's settings: a multimodal model's text config (``get_text_config()``),
    else ``config`` itself (a text model's, or an object that is not a transformers config)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def as_causal_decoder(config):
    """``config``, its text config set to ``is_decoder=True`` where its model type has that switch and it is off
    (BERT, RoBERTa and their kin, BigBird, RemBERT, RoFormer, Megatron-BERT, ELECTRA, Reformer, TrOCR, ...:
    transformers 5 builds their ``*ForCausalLM`` from an encoder checkpoint's ``is_decoder: false`` with attention to
    later tokens too, and only logs that ``is_decoder=True`` should be added, so next-token training would see the
    token it predicts). Types without the switch (Llama, ...) are left as they are. Returns ``config`` (changed in
    place), for the builders to call before ``from_config``."""
    text = text_config(config)
    if getattr(text, "is_decoder", None) is False:
        text.is_decoder = True
    return config


def is_vision_language(config) -> bool:
    """Whether transformers config ``config`` is a vision-language model's: it nests the text model's config (a
    ``text_config``, as ``get_text_config`` returns it) and has a ``vision_config``."""
    return text_config(config) is not config and getattr(config, "vision_config", None) is not None


def causal_lm_auto_class(config):
    """The transformers auto class that builds ``config`` as a model predicting the next token, whole:
    ``AutoModelForImageTextToText`` for a vision-language config it maps (Mistral 3, Qwen2.5-VL, Qwen3-VL, LLaVA,
    Gemma 3, and Qwen3.5 / Llama 4, whose ``AutoModelForCausalLM`` class would drop the vision weights: a saved model
    would lose them and an adapter would name other modules than the checkpoint's), else ``AutoModelForCausalLM``
    (which says why when it cannot build it: a ``model_type`` of remote code, an encoder), or, for a ``model_type``
    it does not map, the class ``config.architectures`` names where transformers has it (Mistral 4)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    if is_vision_language(config) and type(config) in AutoModelForImageTextToText._model_mapping:
        return AutoModelForImageTextToText
    if type(config) not in AutoModelForCausalLM._model_mapping:
        named = _named_architecture(config)
        if named is not None:
            return named
    return AutoModelForCausalLM


class _ArchitectureClass:
    """A transformers model class with the two auto-class calls the builders make (``from_config``,
    ``from_pretrained``), for a config whose ``model_type`` transformers' ``AutoModelForCausalLM`` does not map although
    transformers has the class its ``architectures`` names (Mistral 4's ``Mistral4ForCausalLM``)."""

    def __init__(self, cls):
        self.cls = cls

    def from_config(self, config, **kwargs):
        """``cls._from_config`` (what the auto class calls) without the auto class's ``trust_remote_code``."""
        kwargs.pop("trust_remote_code", None)
        return self.cls._from_config(config, **kwargs)

    def from_pretrained(self, *args, **kwargs):
        """``cls.from_pretrained`` without the auto class's ``trust_remote_code``."""
        kwargs.pop("trust_remote_code", None)
        return self.cls.from_pretrained(*args, **kwargs)


def _named_architecture(config) -> _ArchitectureClass | None:
    """The class ``config.architectures`` names when transformers has it and it predicts the next token
    (``...ForCausalLM`` / ``...ForConditionalGeneration``); ``None`` otherwise."""
    import transformers

    for name in getattr(config, "architectures", None) or ():
        if name.endswith(("ForCausalLM", "ForConditionalGeneration")) and hasattr(transformers, name):
            return _ArchitectureClass(getattr(transformers, name))
    return None


def outside_language_model(model: nn.Module) -> list[str]:
    """Qualified names of the modules of vision-language ``model`` that text does not pass through: the children of
    the modules enclosing its language model (``get_decoder()``) and output head that hold neither (the vision encoder,
    the multimodal projector). ``[]`` for a text-only model, or one that does not say where its language model is."""
    config = getattr(model, "config", None)
    get_decoder, get_head = getattr(model, "get_decoder", None), getattr(model, "get_output_embeddings", None)
    if config is None or not is_vision_language(config) or get_decoder is None or get_head is None:
        return []
    language = [module for module in (get_decoder(), get_head()) if module is not None and module is not model]
    names = {id(module): name for name, module in model.named_modules()}
    kept = [names[id(module)] for module in language if id(module) in names]

    def inside_kept(name: str) -> bool:
        return any(name == k or name.startswith(k + ".") for k in kept)

    enclosing = {prefix for name in kept for i in range(1, name.count(".") + 1)
                 if not inside_kept(prefix := name.rsplit(".", i)[0])} | {""}
    outside = []
    for name in sorted(enclosing):
        parent = model.get_submodule(name)
        for child, _ in parent.named_children():
            qualified = f"{name}.{child}" if name else child
            if qualified not in enclosing and qualified not in kept:
                outside.append(qualified)
    return outside


def language_model_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every named module of ``model`` (a peft model's base model, names as peft's) but those
    inside :func:`outside_language_model`: the modules text passes through (all of them in a text-only model)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    outside = outside_language_model(base)
    prefix = next((name for name, module in model.named_modules() if module is base), "")
    outside = tuple(f"{prefix}.{name}" if prefix else name for name in outside)
    return [(name, module) for name, module in model.named_modules()
            if name and not any(name == o or name.startswith(o + ".") for o in outside)]


def outside_language_model_pattern(model: nn.Module) -> str | None:
    """A regular expression that matches (``re.fullmatch``) the names of every module inside
    :func:`outside_language_model` of ``model``: peft's ``exclude_modules``, so that LoRA leaves them alone. ``None``
    when there are none."""
    outside = outside_language_model(model)
    if not outside:
        return None
    return "(" + "|".join(re.escape(name) for name in outside) + r")(\..*)?"


def freeze_outside_language_model(model: nn.Module) -> list[str]:
    """Stop gradients to every parameter of :func:`outside_language_model` of ``model``; returns those modules'
    names (``[]``: nothing frozen)."""
    outside = outside_language_model(model)
    for name in outside:
        model.get_submodule(name).requires_grad_(False)
    return outside
