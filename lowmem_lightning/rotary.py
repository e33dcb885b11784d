"""Rotary position frequencies kept in fp32 when a model's weights are cast to bf16 / fp16.

A Hugging Face rotary embedding (``LlamaRotaryEmbedding`` and its kin) holds its inverse frequencies as
non-persistent buffers (``inv_freq``, ``original_inv_freq``; Gemma 3 one pair per layer type), computed in fp32 at
construction; ``from_pretrained(dtype=torch.bfloat16)`` keeps them fp32. A ``module.to(torch.bfloat16)`` casts
every floating buffer, these too: Lightning's ``precision="bf16-true"`` does exactly that, and so did our model
builders. Rounded to bf16 (8 significant bits), ``inv_freq`` turns the rotation angle ``position * inv_freq`` of
a 128-wide head by up to 1.25 rad at position 1024 and 5 rad at 4096: the fine-tune trains on other positions than
the pretrained model used, and the model it saves (``save_pretrained`` writes no such buffer) is served with the
fp32 frequencies it never trained with.

:func:`keep_rotary_fp32` puts the fp32 values back: each rotary module whose frequency buffers are not fp32 is
rebuilt from its ``config`` on the CPU (its own ``__init__`` computes every buffer in fp32) and the buffers are
copied to the device they were on. :class:`~lowmem_lightning.modules.base.LowMemModule` calls it after every cast
of the module (``_apply``), ``CausalLMModule`` after building its model, and ``LowMemOptimizerCallback`` (its
:class:`~lowmem_lightning.callbacks.rotary.KeepRotaryFp32` part) for any project's module at the start of fit,
validation, test and predict (Lightning casts the module just before). Torch and Lightning only: no layer of
this package below it, so every layer may use it.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["keep_rotary_fp32", "rotary_buffers"]


def rotary_buffers(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(module, buffer name)`` of every rotary frequency buffer in ``model``: buffers whose name ends in
    ``inv_freq`` in modules whose class name holds ``RotaryEmbedding`` (transformers' naming)."""
    return [(module, name) for module in model.modules() if "RotaryEmbedding" in type(module).__name__
            for name, buffer in module._buffers.items() if buffer is not None and name.endswith("inv_freq")]


def _fresh_fp32(module: nn.Module) -> nn.Module | None:
    """A new module of ``module``'s class built on the CPU from its ``config`` (fp32 buffers), or ``None`` when it
    cannot be rebuilt so (no ``config``, another constructor)."""
    config = getattr(module, "config", None)
    if config is None:
        return None
    try:
        with torch.device("cpu"):
            return type(module)(config)
    except Exception:  # a custom rotary class with another signature: left as it is
        return None


@torch.no_grad()
def keep_rotary_fp32(model: nn.Module) -> int:
    """Give every rotary frequency buffer of ``model`` that is not fp32 its fp32 values again, on its device;
    returns how many buffers were restored (0 when all were fp32 already: the common case costs one walk over
    the modules). Meta buffers become fp32 meta buffers."""
    restored = 0
    fresh_of: dict[int, nn.Module | None] = {}
    for module, name in rotary_buffers(model):
        buffer = module._buffers[name]
        if buffer.dtype == torch.float32:
            continue
        if id(module) not in fresh_of:
            fresh_of[id(module)] = _fresh_fp32(module)
        fresh = fresh_of[id(module)]
        value = None if fresh is None else fresh._buffers.get(name)
        if value is None or value.shape != buffer.shape:
            continue
        module._buffers[name] = value.to(buffer.device)
        restored += 1
    return restored
