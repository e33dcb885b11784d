"""The tensors transformers keeps in fp32 whatever the model's dtype, kept fp32 through every cast of the model.

A transformers model class may list modules or parameters that stay fp32 when the model is loaded in bf16 or fp16
(``_keep_in_fp32_modules_strict``: the MoE routers and score-correction biases of DeepSeek-V2/V3, GLM-4.5, ERNIE 4.5
MoE, Nemotron-H, Kimi Linear) or in fp16 only (``_keep_in_fp32_modules``: gpt-oss's norms): ``from_pretrained(dtype=
torch.bfloat16)`` and ``from_config(dtype=...)`` build and load them in fp32 (matched as transformers matches them:
``re.search`` of each pattern, ``*`` as ``.*``, on the parameter's qualified name inside the class's model). A plain
``module.to(torch.bfloat16)`` casts them too: Lightning's ``precision="bf16-true"`` does, and so did our full
fine-tune builder. A router rounded to 8 significant bits picks other experts on near ties than the released model
does, and a DeepSeek score-correction bias stored in fp32 loses the precision its top-k selection needs.

:func:`fp32_originals` takes the fp32 tensors before a cast and :func:`restore_fp32` puts them back after it (moved
to the device the cast chose): :class:`~lowmem_lightning.modules.base.LowMemModule` does so around every cast of the
module (``_apply``), and :func:`cast_keeping_fp32` casts a model so. Torch only: no layer of this package below it.
"""

from __future__ import annotations

import re

import torch
from torch import nn

__all__ = ["cast_keeping_fp32", "fp32_originals", "kept_fp32_modules", "kept_fp32_names", "restore_fp32"]

HALF = (torch.bfloat16, torch.float16)
"""The dtypes the strict list keeps fp32 against (``_keep_in_fp32_modules_strict``); the other list
(``_keep_in_fp32_modules``) only against ``torch.float16``."""


def _pattern(globs) -> re.Pattern | None:
    """transformers' match of keep-in-fp32 entries: one alternation, ``*`` as ``.*``, searched in the name."""
    globs = sorted(globs or ())
    return re.compile("|".join(f"(?:{glob.replace('*', '.*')})" for glob in globs)) if globs else None


def kept_fp32_names(model: nn.Module) -> dict[str, bool]:
    """``{qualified name: strict}`` of the parameters and buffers of ``model`` that transformers keeps in fp32:
    those of each transformers model inside ``model`` (``model`` itself, or the one a peft or Lightning module wraps)
    whose name within it matches its class's keep-in-fp32 entries. ``strict``: kept against bf16 and fp16; else
    against fp16 only. ``{}`` for a model that keeps none (most)."""
    kept: dict[str, bool] = {}
    for prefix, module in model.named_modules():
        strict = _pattern(getattr(module, "_keep_in_fp32_modules_strict", None))
        loose = _pattern(getattr(module, "_keep_in_fp32_modules", None))
        if strict is None and loose is None:
            continue
        tensors = [*module.named_parameters(), *module.named_buffers()]
        for name, _ in tensors:
            qualified = f"{prefix}.{name}" if prefix else name
            if strict is not None and strict.search(name):
                kept[qualified] = True
            elif loose is not None and loose.search(name) and qualified not in kept:
                kept[qualified] = False
    return kept


def kept_fp32_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that own parameters transformers keeps in fp32 (a DeepSeek-V3 MoE layer's
    ``mlp.gate``). FSDP2 wants one dtype per ``fully_shard`` group ("FSDP expects uniform original parameter dtype"):
    shard each of these on its own before the decoder layer around it."""
    params = dict(model.named_parameters())
    owners = dict.fromkeys(name.rpartition(".")[0] for name in kept_fp32_names(model) if name in params)
    return [model.get_submodule(owner) for owner in owners]


def fp32_originals(model: nn.Module) -> dict[str, tuple[torch.Tensor, bool]]:
    """``{qualified name: (its fp32 tensor now, strict)}`` for the :func:`kept_fp32_names` of ``model`` that are fp32
    now: references, no copy (a cast makes new tensors and leaves these as they were)."""
    kept = kept_fp32_names(model)
    if not kept:
        return {}
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    return {name: (tensors[name].data, strict) for name, strict in kept.items()
            if name in tensors and tensors[name].dtype == torch.float32}


def restore_fp32(model: nn.Module, originals: dict[str, tuple[torch.Tensor, bool]]) -> int:
    """Put back the fp32 values of :func:`fp32_originals` whose tensor a cast turned into a dtype transformers keeps
    them fp32 against (on the device the cast moved it to); returns how many."""
    restored = 0
    for name, (original, strict) in originals.items():
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        current = module._parameters.get(leaf)
        current = module._buffers.get(leaf) if current is None else current
        if current is None or current.dtype not in (HALF if strict else (torch.float16,)):
            continue
        value = original.to(current.device)
        if leaf in module._parameters:
            current.data = value  # the same Parameter object, as a cast keeps it (an optimizer may hold it)
        else:
            module._buffers[leaf] = value
        restored += 1
    return restored


def cast_keeping_fp32(model: nn.Module, dtype: torch.dtype, device: torch.device | str | None = None) -> nn.Module:
    """``model.to(device, dtype)`` with the tensors transformers keeps in fp32 left fp32; returns ``model``."""
    originals = fp32_originals(model)
    model.to(device=device, dtype=dtype)
    restore_fp32(model, originals)
    return model
