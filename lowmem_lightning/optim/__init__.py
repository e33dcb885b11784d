"""Optimizers with low-memory state. Build them by name with :func:`build_optimizer`."""

from .registry import OPTIMIZERS, available_optimizers, build_optimizer, optimizer_class, register_optimizer

__all__ = [
    "OPTIMIZERS",
    "StateMemory",
    "available_optimizers",
    "build_optimizer",
    "convert_on_load",
    "optimizer_class",
    "register_optimizer",
    "state_memory",
    "AdamW8bit",
    "AdamW4bit",
    "PagedAdamW8bit",
    "SGD",
    "Adafactor",
    "CAME",
    "Lion",
    "Lion8bit",
    "AdEMAMix",
    "AdEMAMix8bit",
    "Muon",
    "Muon8bit",
]

_LAZY = {  # imported on first use: the registry's names are read without torch (``lowmem --help``)
    "convert_on_load": "adamw_convert",
    "StateMemory": "memory",
    "state_memory": "memory",
    "AdamW8bit": "adamw8bit",
    "AdamW4bit": "adamw4bit",
    "PagedAdamW8bit": "paged",
    "SGD": "sgd",
    "Adafactor": "adafactor",
    "CAME": "came",
    "Lion": "lion",
    "Lion8bit": "lion",
    "AdEMAMix": "ademamix",
    "AdEMAMix8bit": "ademamix",
    "Muon": "muon",
    "Muon8bit": "muon",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
