"""``--ckpt_path last``: the newest checkpoint of the run's ``ModelCheckpoint`` directories, by step.

Lightning's own ``ckpt_path="last"`` looks only for ``last*.ckpt`` (written with ``save_last=True``)
in the directory of the *current* run, which for a ``ModelCheckpoint`` without ``dirpath`` is the
logger's new version (``runs/tiny/version_3/checkpoints``): a restarted job finds nothing there and
trains from step 0. Here "the run's directory" is, for each ``ModelCheckpoint`` of the Trainer:

* its ``dirpath`` when set (the same folder across restarts), else
* every ``*/checkpoints`` folder under the first logger's ``save_dir/name`` (``runs/tiny/version_*/
  checkpoints``: each restart logs to a new version and resumes from the newest checkpoint of any
  earlier one), or only the version's folder when the logger's ``version`` was chosen (``version: 3`` or
  ``version: ablation``: every restart logs there, and another version is another run), or
  ``default_root_dir/checkpoints`` without a logger,

and the checkpoint resumed is the one with the highest global step: read from Lightning's
``step=N`` in the file name, else from the checkpoint's ``global_step`` (loaded memory-mapped);
files cut short by a kill (not a complete zip archive) are skipped.
"""

from __future__ import annotations

import glob
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Candidate", "checkpoint_dirs", "checkpoint_step", "newest_checkpoint"]

_STEP = re.compile(r"(?:^|[-_])step=(\d+)")


@dataclass(frozen=True)
class Candidate:
    """A checkpoint found for ``--ckpt_path last``: its path, global step and modification time (s)."""

    path: str
    step: int
    mtime: float


def checkpoint_dirs(trainer, chosen_version: int | str | None = None) -> list[str]:
    """Glob patterns of the directories holding the checkpoints of ``trainer``'s ``ModelCheckpoint``
    callbacks across restarts (see the module docstring); ``[]`` when it has none. ``chosen_version``: the
    first logger's ``version`` as the user configured it (``None``: not chosen, Lightning numbers each start)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    out = []
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint):
            continue
        if callback.dirpath:
            out.append(glob.escape(str(callback.dirpath)))
        elif trainer.loggers:
            logger = trainer.loggers[0]
            save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
            root = glob.escape(os.path.join(str(save_dir), str(logger.name or "")))
            folder = "*" if chosen_version is None else glob.escape(_version_folder(chosen_version))
            out.append(os.path.join(root, folder, "checkpoints"))
        else:
            out.append(glob.escape(os.path.join(str(trainer.default_root_dir), "checkpoints")))
    return list(dict.fromkeys(out))


def _version_folder(version: int | str) -> str:
    """Lightning's folder name of a logger version: ``3`` -> ``version_3``, ``"ablation"`` -> ``ablation``."""
    return version if isinstance(version, str) else f"version_{version}"


def _complete(path: Path) -> bool:
    """A checkpoint file written to the end (torch.save's zip archive has its central directory), or a
    sharded checkpoint directory."""
    return path.is_dir() or zipfile.is_zipfile(path)


def checkpoint_step(path: str | Path) -> int | None:
    """The global step of a checkpoint: ``step=N`` in its name, else its ``global_step`` entry; ``None``
    when it cannot be read."""
    path = Path(path)
    match = _STEP.search(path.stem)
    if match:
        return int(match.group(1))
    if path.is_dir():
        return None
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception:  # noqa: BLE001 - any unreadable file is simply not a candidate
        return None
    step = checkpoint.get("global_step") if isinstance(checkpoint, dict) else None
    return step if isinstance(step, int) else None


def newest_checkpoint(dirs: list[str]) -> tuple[Candidate | None, int]:
    """The checkpoint of highest step (then newest file) under ``dirs`` (folders or glob patterns), and
    how many complete checkpoints were found. A symbolic link to a checkpoint found there too (``last.ckpt`` of
    ``ModelCheckpoint(save_last="link")``) is the same checkpoint: the file itself is named; a dangling link is
    skipped."""
    found, seen = [], set()
    for pattern in dirs:
        for folder in sorted(glob.glob(pattern)):
            for path in sorted(Path(folder).glob("*.ckpt"), key=lambda p: (p.is_symlink(), p.name)):
                real = os.path.realpath(path)
                if real in seen or not _complete(path):
                    continue
                seen.add(real)
                step = checkpoint_step(path)
                if step is not None:
                    found.append(Candidate(str(path), step, path.stat().st_mtime))
    if not found:
        return None, 0
    return max(found, key=lambda c: (c.step, c.mtime)), len(found)
