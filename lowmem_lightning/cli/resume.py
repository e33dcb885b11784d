"""``--ckpt_path FILE`` checked before anything is built: the file is a complete Lightning checkpoint, and
the model it was saved from is the model of this run.

:func:`checkpoint_problem` names what is wrong with a file (missing, a directory that is not a sharded
checkpoint, empty, cut short, not a ``torch.save`` archive, unreadable, a plain state dict, not a
Lightning checkpoint); it loads the file memory-mapped with ``weights_only=True`` (what Lightning's own
loader uses), so no tensor is read into memory. :func:`model_differences` compares the checkpoint's
``hyper_parameters`` with the run's model init args, key by key (``config.hidden_size``), leaving out
:data:`TRAINING_KEYS`, which a resumed run may change.

LightningCLI, given ``--ckpt_path``, replaces the run's model arguments by the checkpoint's (a recipe, or an
explicit ``--model.config.*``, silently overridden). ``lowmem`` does not: a checkpoint of another model
is refused naming the differing keys, unless ``--model_from_ckpt true`` asks for the checkpoint's model
arguments (and then an explicit ``--model.*`` that contradicts them is refused too).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

__all__ = ["CKPT_KEYWORDS", "TRAINING_KEYS", "RESOLVED_ON_BUILD", "UNSET", "is_file_path", "checkpoint_problem",
           "file_problem", "load_checkpoint", "model_differences", "flatten", "saved_config_next_to"]

CKPT_KEYWORDS = ("last", "best", "hpc")
"""``--ckpt_path`` values Lightning (or :mod:`~lowmem_lightning.cli.last`) resolves itself."""

TRAINING_KEYS = frozenset({
    "optimizer", "lr", "weight_decay", "optimizer_kwargs", "warmup_steps", "scheduler", "min_lr_ratio",
    "save_dir", "save_merged", "gradient_checkpointing", "predict_new_tokens", "host_embeddings",
    "checkpoint_frozen",
})
"""Model init args that set how the model is trained, saved or used, not what it is: a resumed run may differ (where
its frozen embedding tables live; whether its checkpoints hold the frozen base: either kind of checkpoint loads)."""

RESOLVED_ON_BUILD = {"resize_embeddings": True, "untrained_token_ids": None}
"""Model init args that ``CausalLMModule`` replaces by what they resolved to when it built the model, with the run
value that resolves: ``resize_embeddings=True`` -> the number of embedding rows it grew to, ``untrained_token_ids=
None`` -> the list of token ids whose untrained rows it trains. A run's value matches a checkpoint's resolved one
(the same tokenizer, data and checkpoint resolve it the same)."""

_ZIP_MAGIC = b"PK\x03\x04"
_LIGHTNING_KEYS = ("state_dict", "pytorch-lightning_version")


def is_file_path(ckpt_path: Any) -> bool:
    """Whether ``ckpt_path`` names a local path (not ``None``, a keyword, a URL or a ``registry:`` name)."""
    return (isinstance(ckpt_path, str) and bool(ckpt_path) and ckpt_path not in CKPT_KEYWORDS
            and "://" not in ckpt_path and not ckpt_path.startswith("registry:"))


def _is_sharded_dir(path: Path) -> bool:
    """A ``torch.distributed.checkpoint`` directory (Lightning's FSDP/ModelParallel sharded checkpoint)."""
    return (path / ".metadata").is_file()


def file_problem(path: Path) -> str | None:
    """What is wrong with ``path`` as a checkpoint file without loading it, or ``None``."""
    if not path.exists():
        return "no such file"
    if path.is_dir():
        if _is_sharded_dir(path):
            return None
        return "is a directory, not a checkpoint file (nor a sharded checkpoint directory with a .metadata file)"
    if not path.is_file():
        return "is not a regular file"
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(4)
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    if size == 0:
        return "is empty (0 bytes)"
    if zipfile.is_zipfile(path):
        return None
    if head == _ZIP_MAGIC:
        return f"is truncated ({size} bytes: a torch.save archive whose end is missing, e.g. a save cut short)"
    return f"is not a checkpoint ({size} bytes that are not a torch.save archive)"


def load_checkpoint(path: Path) -> Any:
    """The checkpoint at ``path`` loaded memory-mapped on the CPU with ``weights_only=True``."""
    import torch

    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def _content_problem(checkpoint: Any) -> str | None:
    if not isinstance(checkpoint, dict):
        return f"is not a Lightning checkpoint (it holds a {type(checkpoint).__name__}, not a dict)"
    if all(key in checkpoint for key in _LIGHTNING_KEYS):
        return None
    import torch

    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return (f"is a plain state dict ({len(checkpoint)} tensors saved with torch.save), not a Lightning "
                "checkpoint (no 'state_dict' or 'pytorch-lightning_version' entry): load it into the model, "
                "e.g. with model.load_state_dict, instead of resuming from it")
    keys = ", ".join(repr(k) for k in list(checkpoint)[:5]) or "no entries"
    return f"is not a Lightning checkpoint (no 'state_dict' or 'pytorch-lightning_version' entry; it has {keys})"


def checkpoint_problem(ckpt_path: str, resume: bool = False) -> tuple[str | None, dict | None]:
    """``(problem, checkpoint)``: why ``ckpt_path`` cannot be resumed from (a sentence naming the file),
    else ``None`` and the loaded checkpoint (memory-mapped; ``None`` for a sharded directory). ``resume``: the file
    is to resume a fit, so one holding the weights only (``ModelCheckpoint(save_weights_only=True)``) is a problem
    too (:func:`~lowmem_lightning.callbacks.resume.weights_only_problem`); validate, test and predict read it."""
    path = Path(ckpt_path).expanduser()
    where = f"ckpt_path={ckpt_path!r}"
    problem = file_problem(path)
    if problem == "no such file":
        return (f"{where}: no such checkpoint file ({path.resolve()}); give the path of a saved .ckpt, or 'last' "
                "for the newest checkpoint of the run's ModelCheckpoint directory."), None
    if problem is not None:
        return f"{where} {problem}.", None
    if path.is_dir():
        return None, None
    try:
        checkpoint = load_checkpoint(path)
    except Exception as err:  # noqa: BLE001 - any failure to load is the file's problem, named below
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return f"{where} cannot be loaded as a checkpoint ({type(err).__name__}: {first[:300]}).", None
    problem = _content_problem(checkpoint)
    if problem is None and resume:
        from lowmem_lightning.callbacks.resume import weights_only_problem

        problem = weights_only_problem(checkpoint)
        problem = None if problem is None else f"cannot be resumed: {problem}"
    return (f"{where} {problem}.", None) if problem else (None, checkpoint)


def flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict of dotted keys (``{"config": {"a": 1}}`` -> ``{"config.a": 1}``)."""
    if not isinstance(values, dict) or (prefix and not values):
        return {prefix: values} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in values.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


UNSET = "<unset>"
"""Shown for a key that one side of :func:`model_differences` does not have."""


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _resolved_from(saved: Any, run: Any, key: str) -> bool:
    """Whether ``saved`` is what the run's unresolved value of :data:`RESOLVED_ON_BUILD` key ``key`` resolves to (a
    row count for ``resize_embeddings=True``, a list of ids for ``untrained_token_ids=None``)."""
    if key not in RESOLVED_ON_BUILD or run is not RESOLVED_ON_BUILD[key]:
        return False
    if key == "untrained_token_ids":
        return isinstance(saved, list)
    return isinstance(saved, int) and not isinstance(saved, bool)


def model_differences(saved: dict, run: dict) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, run value)`` for every model init arg, flattened to dotted keys, whose value in
    the checkpoint's ``hyper_parameters`` (``saved``) differs from this run's (``run``); keys under
    :data:`TRAINING_KEYS` and top-level keys absent from either side are left out. Inside a nested dict, a
    key the run does not set is left out (the module fills it as it did for the checkpoint: ``config.vocab_size``
    from the data), one only the run sets is a difference. A nested dict present on one side only (``config``
    given, or ``None``) is compared as a whole."""
    saved = {k: v for k, v in saved.items() if not str(k).startswith("_") and k not in TRAINING_KEYS}
    run = {k: v for k, v in run.items() if k not in TRAINING_KEYS}
    out = []
    for key in sorted(set(saved) & set(run)):
        a, b = saved[key], run[key]
        if isinstance(a, dict) and isinstance(b, dict):
            fa, fb = flatten(a, key), flatten(b, key)
            out += [(k, fa.get(k, UNSET), fb[k]) for k in sorted(fb) if not _same(fa.get(k, UNSET), fb[k])]
        elif not _same(a, b) and not _resolved_from(a, b, key):
            out.append((key, a, b))
    return out


def saved_config_next_to(ckpt_path: str) -> Path | None:
    """The ``config.yaml`` LightningCLI saved for the run that wrote ``ckpt_path`` (``version_N/config.yaml``
    for ``version_N/checkpoints/x.ckpt``), when it exists."""
    path = Path(ckpt_path).expanduser().absolute()
    for folder in (path.parent, path.parent.parent):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    return None
