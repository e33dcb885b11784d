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

and the checkpoint resumed is the newest *resumable* one, by global step: read from Lightning's
``step=N`` in the file name, else from the checkpoint's ``global_step``; files cut short by a kill (not a
complete zip archive) are skipped, and so are weights-only checkpoints (``ModelCheckpoint(save_weights_only=True)``,
e.g. a "best" file kept for export beside the full ones: no optimizer state to resume). Telling one costs no
tensor read: the file is loaded memory-mapped (its pickle only; the tensors stay on disk), a sharded
checkpoint folder by its ``meta.pt``, and only the newest files are probed, down to the first resumable one.
"""

from __future__ import annotations

import glob
import os
import re
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

__all__ = ["Candidate", "checkpoint_dirs", "checkpoint_step", "newest_checkpoint", "newest_any_checkpoint",
           "recorded_best", "refusal", "resume_notice"]

_STEP = re.compile(r"(?:^|[-_])step=(\d+)")


@dataclass(frozen=True)
class Candidate:
    """A checkpoint found for ``--ckpt_path last``: its path, global step and modification time (s);
    ``weights_only``: it holds the weights only (no resumable checkpoint was found: this is the newest weights-only
    one); ``skipped``: the newer weights-only checkpoints passed over for it, newest first."""

    path: str
    step: int
    mtime: float
    weights_only: bool = False
    skipped: tuple[str, ...] = ()


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


def _named_step(path: Path) -> int | None:
    """Lightning's ``step=N`` in a checkpoint's name, else ``None``."""
    match = _STEP.search(path.stem)
    return int(match.group(1)) if match else None


def _metadata(path: Path) -> dict | None:
    """A checkpoint's entries without reading its tensors: a file is loaded memory-mapped (its pickle is read, the
    tensors are mapped, not read), a sharded folder by its ``meta.pt`` (everything
    but the weight and optimizer shards). Loaded with ``weights_only=True`` first, else as Lightning's loader would
    (hyper-parameters of a user's class); ``None`` when unreadable or a folder without ``meta.pt`` (DeepSpeed)."""
    import torch

    file = path / "meta.pt" if path.is_dir() else path
    if not file.is_file():
        return None
    for safe in (True, False):
        try:
            loaded = torch.load(file, map_location="cpu", mmap=True, weights_only=safe)
        except Exception:  # noqa: BLE001 - any unreadable file is simply not a candidate
            continue
        return loaded if isinstance(loaded, dict) else None
    return None


def checkpoint_step(path: str | Path) -> int | None:
    """The global step of a checkpoint (a file, or a sharded folder with ``meta.pt``): ``step=N`` in its name, else
    its ``global_step`` entry; ``None`` when it cannot be read."""
    path = Path(path)
    step = _named_step(path)
    return step if step is not None else _stored_step(_metadata(path))


def _stored_step(metadata: dict | None) -> int | None:
    step = metadata.get("global_step") if isinstance(metadata, dict) else None
    return step if isinstance(step, int) else None


def _checkpoints(dirs: list[str]) -> list[Path]:
    """The complete checkpoints (``*.ckpt``) under ``dirs`` (folders or glob patterns), each once: a symbolic link to
    one found there too (``last.ckpt`` of ``ModelCheckpoint(save_last="link")``) is the same checkpoint, the file
    itself is kept; a dangling link is skipped."""
    out, seen = [], set()
    for pattern in dirs:
        for folder in sorted(glob.glob(pattern)):
            for path in sorted(Path(folder).glob("*.ckpt"), key=lambda p: (p.is_symlink(), p.name)):
                real = os.path.realpath(path)
                if real not in seen and _complete(path):
                    seen.add(real)
                    out.append(path)
    return out


def newest_checkpoint(dirs: list[str]) -> tuple[Candidate | None, int]:
    """The resumable checkpoint of highest step (then newest file) under ``dirs`` (folders or glob patterns), and
    how many complete checkpoints were found there. Weights-only checkpoints (no optimizer or LR scheduler state,
    :func:`~lowmem_lightning.callbacks.resume.weights_only_problem`) are passed over, named in the result's
    ``skipped``; when every one is weights-only, the newest is returned with ``weights_only=True`` (to refuse,
    naming it). Only names without ``step=N`` and the files from the newest down to the first resumable one are
    read (memory-mapped, no tensor read). ``(None, 0)`` when there is no checkpoint."""
    from lowmem_lightning.callbacks.resume import weights_only_problem

    probed: dict[Path, dict | None] = {}

    def metadata(path: Path) -> dict | None:
        if path not in probed:
            probed[path] = _metadata(path)
        return probed[path]

    found = []
    for path in _checkpoints(dirs):
        step = _named_step(path)
        step = step if step is not None else _stored_step(metadata(path))
        if step is not None:
            found.append(Candidate(str(path), step, path.stat().st_mtime))
    found.sort(key=lambda c: (c.step, c.mtime), reverse=True)
    skipped: list[str] = []
    for candidate in found:
        if weights_only_problem(metadata(Path(candidate.path))) is None:
            return replace(candidate, skipped=tuple(skipped)), len(found)
        skipped.append(candidate.path)
    return (replace(found[0], weights_only=True), len(found)) if found else (None, 0)


def newest_any_checkpoint(dirs: list[str]) -> str | None:
    """The complete checkpoint of highest step (then newest file) under ``dirs``, full or weights-only (``lowmem
    export`` needs the weights only); ``None`` when there is none. Reads no tensor (as :func:`newest_checkpoint`)."""
    found = [(step, path.stat().st_mtime, str(path)) for path in _checkpoints(dirs)
             if (step := checkpoint_step(path)) is not None]
    return max(found)[2] if found else None


def recorded_best(dirs: list[str]) -> str | None:
    """The ``best_model_path`` that the newest full checkpoint under ``dirs`` recorded for a ``ModelCheckpoint`` with a
    ``monitor`` (its callback state), when that file still exists (:func:`_beside`); ``None`` otherwise. Weights-only
    checkpoints hold no callback state and are passed over; only the newest files are read (memory-mapped), down to
    the first with one."""
    found = sorted(((step, path.stat().st_mtime, path) for path in _checkpoints(dirs)
                    if (step := checkpoint_step(path)) is not None), key=lambda item: item[:2], reverse=True)
    for _, _, path in found:
        states = (_metadata(path) or {}).get("callbacks")
        if not isinstance(states, dict):
            continue
        best = [state.get("best_model_path") for key, state in states.items()
                if str(key).startswith("ModelCheckpoint") and isinstance(state, dict) and state.get("monitor")]
        best = [b for b in best if isinstance(b, str) and b]
        if best:  # the newest record decides: an older one named a best that is no longer the best
            return _beside(best[0], path)
    return None


def _beside(recorded: str, checkpoint: Path) -> str | None:
    """A recorded checkpoint path as found now: as recorded, else the file of that name in ``checkpoint``'s folder
    (a path recorded relative to the directory the fit ran in, or a folder moved since); ``None`` when neither is."""
    for candidate in (Path(recorded), checkpoint.parent / Path(recorded).name):
        if candidate.is_file():
            return str(candidate)
    return None


def resume_notice(found: Candidate, count: int, where: str) -> str:
    """The one line ``--ckpt_path last`` prints for the checkpoint it resumes (``where``: the folders searched),
    naming the newer weights-only checkpoints it skipped, if any."""
    plural = "s" if count > 1 else ""
    if not found.skipped:
        return (f"--ckpt_path last: resuming from {found.path} (step {found.step}, the newest of {count} "
                f"checkpoint{plural} in {where}).")
    n = len(found.skipped)
    names = ", ".join(found.skipped[:3]) + (f" and {n - 3} more" if n > 3 else "")
    return (f"--ckpt_path last: resuming from {found.path} (step {found.step}, the newest resumable of {count} "
            f"checkpoint{plural} in {where}); skipped {n} newer weights-only checkpoint{'s' if n > 1 else ''} "
            f"(save_weights_only=True: no optimizer state to resume): {names}.")


def refusal(found: Candidate, count: int, where: str) -> str:
    """Why ``--ckpt_path last`` refuses when every checkpoint it found (``count``, ``found`` the newest) holds the
    weights only, and how to start a new fit from the newest one's weights: one sentence."""
    from lowmem_lightning.callbacks.resume import START_FROM_WEIGHTS

    every = "the only checkpoint there holds" if count == 1 else f"all {count} checkpoints there hold"
    return (f"ckpt_path='last' found no resumable checkpoint in {where}: {every} the model weights only "
            f"(ModelCheckpoint(save_weights_only=True): no optimizer or LR scheduler state), the newest being "
            f"{found.path} (step {found.step}); {START_FROM_WEIGHTS}, or save full checkpoints too (a ModelCheckpoint "
            "without save_weights_only) to resume later.")
