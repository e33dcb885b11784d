"""Checks of a run's inputs and outputs made before anything is built: the checkpoint to resume
from exists, and every directory the run will write can be created and written; and the undoing of
what a run refused before training wrote (:func:`new_paths`, :func:`remove_new_paths`)."""

from __future__ import annotations

import fnmatch
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from jsonargparse import Namespace

__all__ = ["ckpt_path_problem", "output_dirs", "unwritable", "new_paths", "remove_new_paths", "SETUP_FILES",
           "EVALUATION_SETUP_FILES",
           "TRAINER_MINIMUMS", "trainer_setting_problem", "seed_problem"]

_CKPT_KEYWORDS = ("last", "best", "hpc")


def ckpt_path_problem(ckpt_path: Any) -> str | None:
    """Why ``--ckpt_path`` cannot be resumed from (no such file or directory), or ``None``."""
    if not isinstance(ckpt_path, str) or ckpt_path in _CKPT_KEYWORDS or "://" in ckpt_path:
        return None
    if ckpt_path.startswith("registry:") or Path(ckpt_path).expanduser().exists():
        return None
    return (f"ckpt_path={ckpt_path!r}: no such checkpoint file ({Path(ckpt_path).expanduser().resolve()}); "
            "give the path of a saved .ckpt, or 'last' for the newest checkpoint of the run's ModelCheckpoint "
            "directory.")


TRAINER_MINIMUMS: dict[str, tuple[float, bool, tuple[int, ...]]] = {
    "min_epochs": (0, False, ()),
    "min_steps": (0, False, ()),
    "check_val_every_n_epoch": (1, False, ()),
    "num_sanity_val_steps": (0, False, (-1,)),
    "log_every_n_steps": (0, False, ()),
    "accumulate_grad_batches": (1, False, ()),
    "gradient_clip_val": (0, False, ()),
    "val_check_interval": (0, True, ()),
}
"""Trainer counts Lightning takes without checking (a negative one is silently ignored or divides by zero
later): ``name: (minimum, minimum excluded, sentinels allowed)``."""


def trainer_setting_problem(trainer: Any) -> str | None:
    """The first :data:`TRAINER_MINIMUMS` setting of ``trainer`` (the parsed ``trainer`` group) out of range, or
    ``None``."""
    for name, (low, strict, sentinels) in TRAINER_MINIMUMS.items():
        value = trainer.get(name) if trainer is not None else None
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value in sentinels:
            continue
        if value != value or (value <= low if strict else value < low):  # NaN, or below the minimum
            extra = f" or {' or '.join(map(str, sentinels))}" if sentinels else ""
            bound = f"> {low}" if strict else f">= {low}"
            return f"Invalid trainer.{name}={value!r}: expected a number {bound}{extra}."
    return None


SEED_RANGE = (0, 2**32 - 1)
"""Seeds ``seed_everything`` accepts (numpy's range)."""


def seed_problem(seed: Any) -> str | None:
    """Why ``seed_everything`` cannot take ``seed`` (an int outside :data:`SEED_RANGE`), or ``None``."""
    if isinstance(seed, bool) or not isinstance(seed, int) or SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        return None
    return (f"Invalid seed_everything={seed}: expected true, false or an integer in [{SEED_RANGE[0]}, "
            f"{SEED_RANGE[1]}].")


def _entries(value: Any) -> list:
    if value is None or isinstance(value, bool):
        return []
    return list(value) if isinstance(value, list) else [value]


def output_dirs(cfg: Namespace) -> list[tuple[str, str]]:
    """``(argument, path)`` of every directory the run will write: the Trainer's root, each logger's
    ``save_dir``, each callback's ``dirpath`` and the model's ``save_dir``."""
    trainer = cfg.get("trainer") or Namespace()
    out = [("trainer.default_root_dir", trainer.get("default_root_dir"))]
    for group in ("logger", "callbacks"):
        for entry in _entries(trainer.get(group)):
            init = entry.get("init_args") if isinstance(entry, (dict, Namespace)) else None
            for key in ("save_dir", "dirpath"):
                if isinstance(init, (dict, Namespace)) and isinstance(init.get(key), str):
                    name = str(entry.get("class_path", group)).rsplit(".", 1)[-1]
                    out.append((f"trainer.{group} {name}.{key}", init.get(key)))
    model = (cfg.get("model") or Namespace()).get("init_args")
    if isinstance(model, (dict, Namespace)):
        out.append(("model.save_dir", model.get("save_dir")))
    return [(name, path) for name, path in out if isinstance(path, str) and path and "://" not in path]


def unwritable(name: str, path: str) -> str | None:
    """Why directory ``path`` (given as argument ``name``) cannot be created or written, or ``None``."""
    target = Path(path).expanduser().absolute()
    try:  # a name the file system cannot hold (longer than its NAME_MAX) fails every look-up of the path
        probe = _nearest_existing(target)
    except OSError as err:
        return f"{name}={path!r}: cannot create the directory ({err.strerror}); choose another directory."
    if not probe.is_dir():
        return f"{name}={path!r}: cannot create the directory, {probe} is a file; choose another directory."
    refusal = _write_refusal(probe)
    if refusal is None:
        return None
    if probe == target:
        what = f"the directory {target} is not writable" if refusal == NO_WRITE_PERMISSION else (
            f"cannot write in {target}: {refusal}")
    else:
        what = f"cannot create {target}: " + (f"{probe} is not writable" if refusal == NO_WRITE_PERMISSION
                                              else refusal)
    return f"{name}={path!r}: {what}; choose a writable directory."


NO_WRITE_PERMISSION = "no write permission"
""":func:`_write_refusal`'s answer when the permissions alone refuse a new entry."""


def _write_refusal(folder: Path) -> str | None:
    """Why no entry can be created in the existing directory ``folder``: :data:`NO_WRITE_PERMISSION`, or the
    system's reason when only a real attempt tells ("No such file or directory" in ``/proc``), or ``None``. The
    attempt leaves nothing behind."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return NO_WRITE_PERMISSION
    try:  # root passes os.access everywhere, yet /proc, /sys and the like refuse a new entry
        os.rmdir(tempfile.mkdtemp(prefix=".lowmem-write-check-", dir=folder))
    except OSError as err:
        return err.strerror or str(err)
    return None


def _nearest_existing(path: Path) -> Path:
    """``path`` itself, or the nearest of its parents that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


SETUP_FILES = ("config.yaml", "hparams.yaml", "metrics.csv", "events.out.tfevents.*")
"""Files (name patterns) a fit writes before its first training step (LightningCLI's config, the logger's files)."""


def new_paths(paths: list[str]) -> list[Path]:
    """For each directory in ``paths``, the outermost of it and its parents that does not exist yet
    (what creating it would create); directories that exist are left out."""
    out = []
    for path in paths:
        target = Path(path).expanduser().absolute()
        if target.exists():
            continue
        while not target.parent.exists() and target.parent != target:
            target = target.parent
        if target not in out:
            out.append(target)
    return out


EVALUATION_SETUP_FILES = ("config.yaml", "hparams.yaml")
"""Files an evaluation (``lowmem validate``, ``test``, ``predict``) writes that hold none of its results: the config
and the model's hyperparameters, both already in the checkpoint's own run. Its ``metrics.csv`` holds its results."""


def _only_setup_files(folder: Path, setup_files: tuple[str, ...]) -> bool:
    return all(p.is_dir() or any(fnmatch.fnmatchcase(p.name, name) for name in setup_files)
               for p in folder.rglob("*"))


def remove_new_paths(created: list[Path], setup_files: tuple[str, ...] = SETUP_FILES) -> list[Path]:
    """Remove the directories of ``created`` (from :func:`new_paths` before a run) that now exist and
    hold nothing but empty folders and ``setup_files`` (:data:`SETUP_FILES`: a refused fit's; after an evaluation,
    :data:`EVALUATION_SETUP_FILES`); returns those removed."""
    removed = []
    for folder in created:
        if folder.is_dir() and _only_setup_files(folder, setup_files):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed
