"""LightningModules: :class:`LowMemModule` (a base to subclass) and ``CausalLMModule`` (HF causal LM +
NF4 + LoRA). Imported lazily so ``import lowmem_lightning.modules`` stays cheap."""

from __future__ import annotations

import importlib

__all__ = ["LowMemModule", "CausalLMModule"]

_LAZY = {"LowMemModule": "base", "CausalLMModule": "causal_lm"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
