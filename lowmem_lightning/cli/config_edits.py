"""Small edits and look-ups on a parsed ``lowmem`` config: the LowMemOptimizerCallback entries of
``trainer.callbacks``, flags given on the command line, ``--model.config.*`` strings typed like YAML,
and model paths made absolute for comparison with a checkpoint's."""

from __future__ import annotations

import contextlib
import importlib
from pathlib import Path
from typing import Any

from jsonargparse import Namespace

__all__ = ["OPTIMIZER_CALLBACK", "PATH_KEYS", "import_class", "number", "is_optimizer_callback", "optimizer_entries",
           "flag_given", "init_args", "typed", "type_model_config", "real_paths", "atomic_sharded_strategy"]

OPTIMIZER_CALLBACK = "lowmem_lightning.callbacks.optimizer.LowMemOptimizerCallback"
"""``class_path`` of the callback that ``--optim`` adds or overrides."""
PATH_KEYS = (("model", "model_name_or_path"), ("data", "data_path"), ("data", "tokenizer"))
"""``(group, init arg)`` of the paths a recipe may give relative to its own file."""


def import_class(class_path: str) -> type | None:
    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return None


def number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def is_optimizer_callback(entry: Any) -> bool:
    class_path = entry.get("class_path") if isinstance(entry, (dict, Namespace)) else None
    if not isinstance(class_path, str):
        return False
    cls = import_class(class_path)
    target = import_class(OPTIMIZER_CALLBACK)
    return cls is not None and target is not None and isinstance(cls, type) and issubclass(cls, target)


def optimizer_entries(cfg: Namespace) -> list:
    """The LowMemOptimizerCallback entries of a parsed config's ``trainer.callbacks``."""
    callbacks = cfg.trainer.get("callbacks") or []
    return [c for c in (callbacks if isinstance(callbacks, list) else [callbacks]) if is_optimizer_callback(c)]


def flag_given(args: list[str], group: str, key: str) -> bool:
    """Whether ``--GROUP.KEY`` (or ``--GROUP.init_args.KEY``) is on the command line ``args``."""
    names = (f"--{group}.{key}", f"--{group}.init_args.{key}")
    return any(arg in names or arg.startswith(tuple(n + "=" for n in names)) for arg in args)


def init_args(entry: Namespace) -> Namespace:
    if entry.get("init_args") is None:
        entry["init_args"] = Namespace()
    return entry["init_args"]


_LITERALS = {"true": True, "false": False, "null": None, "none": None}


def typed(value: Any) -> Any:
    """A command-line string as the number / bool / None it spells (``'64'`` -> 64, ``'1e-5'`` ->
    1e-05, ``'true'`` -> True); any other value unchanged."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.lower() in _LITERALS:
        return _LITERALS[text.lower()]
    for convert in (int, float):
        with contextlib.suppress(ValueError):
            return convert(text)
    return value


def type_model_config(cfg: Namespace) -> None:
    """``--model.config.hidden_size 64`` arrives as the string ``'64'`` (the argument is a dict):
    give such values the types a YAML recipe gives them (int, float, bool, None)."""
    init = (cfg.get("model") or Namespace()).get("init_args")
    config = init.get("config") if isinstance(init, Namespace) else None
    if isinstance(config, dict):
        init["config"] = {key: typed(value) for key, value in config.items()}


def real_paths(values: dict) -> dict:
    """Model init args ``values`` with each path of :data:`PATH_KEYS` that exists as its resolved absolute path
    (a checkpoint saved from another directory names the same weights)."""
    out = dict(values)
    for group, key in PATH_KEYS:
        value = out.get(key) if group == "model" else None
        if isinstance(value, str) and value and Path(value).expanduser().exists():
            out[key] = str(Path(value).expanduser().resolve())
    return out


def atomic_sharded_strategy(cfg: Namespace) -> None:
    """A ``trainer.strategy`` given as Lightning's ``ModelParallelStrategy`` becomes
    :class:`~lowmem_lightning.callbacks.checkpoint_io.AtomicModelParallelStrategy` (same arguments), whose sharded
    checkpoints appear atomically."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = (cfg.get("trainer") or Namespace()).get("strategy")
    class_path = strategy.get("class_path") if isinstance(strategy, (dict, Namespace)) else None
    if isinstance(class_path, str) and import_class(class_path) is ModelParallelStrategy:
        strategy["class_path"] = "lowmem_lightning.callbacks.checkpoint_io.AtomicModelParallelStrategy"

