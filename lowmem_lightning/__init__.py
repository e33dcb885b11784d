"""lowmem-lightning: train with PyTorch Lightning on far less memory.

Optimizers by name (``adamw_8bit``, ``paged_adamw_8bit``, ``adafactor``, ``came``, ``sgd``, ``adamw``)
on the package's own Triton kernels, a Lightning callback that swaps them into any project, NF4
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
    "AdamW8bit": "lowmem_lightning.optim.adamw8bit",
    "PagedAdamW8bit": "lowmem_lightning.optim.paged",
    "SGD": "lowmem_lightning.optim.sgd",
    "Adafactor": "lowmem_lightning.optim.adafactor",
    "CAME": "lowmem_lightning.optim.came",
    "LowMemOptimizerCallback": "lowmem_lightning.callbacks.optimizer",
    "StateMemoryMonitor": "lowmem_lightning.callbacks.monitor",
    "GradientRelease": "lowmem_lightning.callbacks.release",
    "StepsAwareRichProgressBar": "lowmem_lightning.callbacks.progress",
    "LowMemModule": "lowmem_lightning.modules.base",
    "CausalLMModule": "lowmem_lightning.modules.causal_lm",
    "TextDataModule": "lowmem_lightning.data.text",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
