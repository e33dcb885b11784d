"""lowmem-lightning: train with PyTorch Lightning on far less memory.

Optimizers by name (``adamw_8bit``, ``adamw_4bit``, ``paged_adamw_8bit``, ``adafactor``, ``came``, ``lion_8bit``,
``ademamix_8bit``, ``muon_8bit``, ``sgd``, ``adamw``; ``available_optimizers()`` lists them all) on the package's own
Triton kernels, each class also importable from the top level (``lowmem_lightning.AdamW4bit``, the
``class_path`` a LightningCLI YAML names), a Lightning callback that swaps them into any project, NF4
QLoRA without bitsandbytes, and the ``lowmem`` CLI.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "build_optimizer": "lowmem_lightning.optim.registry",
    "available_optimizers": "lowmem_lightning.optim.registry",
    "state_memory": "lowmem_lightning.optim.memory",
    "StateMemory": "lowmem_lightning.optim.memory",
    "optimizer_class": "lowmem_lightning.optim.registry",
    "AdamW8bit": "lowmem_lightning.optim.adamw8bit",
    "AdamW4bit": "lowmem_lightning.optim.adamw4bit",
    "PagedAdamW8bit": "lowmem_lightning.optim.paged",
    "SGD": "lowmem_lightning.optim.sgd",
    "Adafactor": "lowmem_lightning.optim.adafactor",
    "CAME": "lowmem_lightning.optim.came",
    "Lion": "lowmem_lightning.optim.lion",
    "Lion8bit": "lowmem_lightning.optim.lion",
    "AdEMAMix": "lowmem_lightning.optim.ademamix",
    "AdEMAMix8bit": "lowmem_lightning.optim.ademamix",
    "Muon": "lowmem_lightning.optim.muon",
    "Muon8bit": "lowmem_lightning.optim.muon",
    "LowMemOptimizerCallback": "lowmem_lightning.callbacks.optimizer",
    "StateMemoryMonitor": "lowmem_lightning.callbacks.monitor",
    "GradientRelease": "lowmem_lightning.callbacks.release",
    "StepsAwareRichProgressBar": "lowmem_lightning.callbacks.progress",
    "LowMemModule": "lowmem_lightning.modules.base",
    "CausalLMModule": "lowmem_lightning.modules.causal_lm",
    "TextDataModule": "lowmem_lightning.data.text",
    "LowMemWarning": "lowmem_lightning.lowmem_warning",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's names and the lazily imported ones (tab completion sees ``AdamW4bit`` before its import)."""
    return sorted({*globals(), *_LAZY})
