"""Surviving preemption: a checkpoint on SIGTERM, and a warning when mid-epoch resume cannot be exact.

Used by :class:`~lowmem_lightning.callbacks.LowMemOptimizerCallback`; the functions take the Trainer
and work with any LightningModule.

SIGTERM. Lightning's own handler (installed by every ``Trainer.fit``) only records the signal
(``trainer.received_sigterm``) and stops the run with ``SIGTERMException`` at the end of the current
training step. :func:`save_on_sigterm`, called from ``on_train_batch_end``, saves a checkpoint at that
step end first, into the directory of the run's first ``ModelCheckpoint`` as ``last.ckpt`` (so
``ckpt_path="last"`` finds it as well as the explicit path). It is the same point where
``ModelCheckpoint(every_n_train_steps=N)`` saves, so resuming from it continues the run exactly like
resuming from a periodic checkpoint. Without a checkpoint callback nothing is saved (a warning says so).
"""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

__all__ = ["SIGTERM_CHECKPOINT_NAME", "save_on_sigterm", "non_resumable_train_loaders", "warn_if_not_resumable"]

SIGTERM_CHECKPOINT_NAME = "last.ckpt"
"""File name of the checkpoint written on SIGTERM, in the first ``ModelCheckpoint``'s directory."""


def _checkpoint_dir(trainer: L.Trainer) -> str | None:
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            return str(callback.dirpath)
    return None


def save_on_sigterm(trainer: L.Trainer) -> str | None:
    """If the run has received SIGTERM, save a resumable checkpoint now (a training step end) and
    return its path; ``None`` when no SIGTERM came or no ``ModelCheckpoint`` is configured (warned).
    Call on every rank (saving is collective under DDP/FSDP)."""
    if not getattr(trainer, "received_sigterm", False):
        return None
    folder = _checkpoint_dir(trainer)
    if folder is None:
        rank_zero_warn(
            f"SIGTERM received at step {trainer.global_step}: the run stops now, and no checkpoint is saved "
            "because no ModelCheckpoint is configured (enable_checkpointing: true and a ModelCheckpoint "
            "callback make preempted runs resumable)."
        )
        return None
    path = os.path.join(folder, SIGTERM_CHECKPOINT_NAME)
    trainer.save_checkpoint(path)
    rank_zero_info(
        f"SIGTERM received: saved a resumable checkpoint at step {trainer.global_step} to {path}; the run stops "
        f"now. Resume with --ckpt_path {path} (lowmem fit) or trainer.fit(..., ckpt_path={path!r})."
    )
    return path


def _is_stateful(loader) -> bool:
    return callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))


def non_resumable_train_loaders(trainer: L.Trainer) -> list[str]:
    """Class names of the training dataloaders that cannot save their position (no ``state_dict`` /
    ``load_state_dict``), so a mid-epoch resume restarts their epoch instead of continuing it."""
    combined = getattr(trainer.fit_loop, "_combined_loader", None)
    loaders = combined.flattened if combined is not None else []
    return [type(loader).__name__ for loader in loaders if not _is_stateful(loader)]


def warn_if_not_resumable(trainer: L.Trainer) -> bool:
    """Warn, in one line, when the run saves or resumes checkpoints and a training dataloader is not
    resumable; returns whether it warned."""
    if not trainer.checkpoint_callbacks and trainer.ckpt_path is None:
        return False
    names = non_resumable_train_loaders(trainer)
    if not names:
        return False
    rank_zero_warn(
        f"The training dataloader ({', '.join(sorted(set(names)))}) cannot save its position, so resuming from a "
        "mid-epoch checkpoint will not be exact (the rest of the epoch is not the same batches); use "
        "torchdata.stateful_dataloader.StatefulDataLoader (same arguments as DataLoader) for exact resume."
    )
    return True
