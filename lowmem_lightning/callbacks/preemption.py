"""Surviving preemption: a checkpoint on SIGTERM that every rank agrees on, and a warning when
mid-epoch resume cannot be exact. :class:`PreemptionCheckpoint` is the callback (one of the parts of
:class:`~lowmem_lightning.callbacks.LowMemOptimizerCallback`); the functions take the Trainer and work
with any LightningModule.

SIGTERM. Lightning stops a run that received SIGTERM (``trainer.received_sigterm``) with
``SIGTERMException`` at the end of the current training step. :func:`save_on_sigterm`, called from
``on_train_batch_end`` once all ranks agreed to stop (below), saves a checkpoint at that step end
first, into the directory of the run's first ``ModelCheckpoint`` as ``last.ckpt`` (so
``ckpt_path="last"`` finds it as well as the explicit path). It is the same point where
``ModelCheckpoint(every_n_train_steps=N)`` saves, so resuming from it continues the run exactly like
resuming from a periodic checkpoint. Without a checkpoint callback nothing is saved (a warning says so).

Every rank stops at the same step (:class:`PreemptionStop`). Lightning's handler, called on the signalled
rank only, issues a collective from inside the signal handler and makes that rank alone stop at its next
step end; when the signal reaches one rank of a DDP/FSDP job the ranks' collectives no longer match and
the job hangs. So for the training loop the callback replaces it with a handler that only records the
signal; at each optimizer step boundary (the end of a gradient-accumulation window, so the saved state
is one an uninterrupted run also passes through) the ranks agree with one ``all_reduce(MAX)`` of that
flag (only when ``world_size > 1``), and when any rank saw the signal all of them set
``trainer.received_sigterm``, save the one checkpoint together and stop (exit 143 from ``lowmem fit``).
The handler is in place from the sanity check (or training start) to the end of training. A second
SIGTERM before the stop ends the process at once (the default action).
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_prefixed_message

from lowmem_lightning.callbacks.checkpoint_io import use_atomic_checkpoint_io
from lowmem_lightning.lowmem_warning import LowMemWarning

__all__ = [
    "SIGTERM_CHECKPOINT_NAME", "PreemptionCheckpoint", "PreemptionStop", "non_resumable_train_loaders",
    "save_on_sigterm", "warn_if_not_resumable",
]

SIGTERM_CHECKPOINT_NAME = "last.ckpt"
"""File name of the checkpoint written on SIGTERM, in the first ``ModelCheckpoint``'s directory."""


def _checkpoint_dir(trainer: L.Trainer) -> str | None:
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            return str(callback.dirpath)
    return None


def _adopt_as_last(trainer: L.Trainer, folder: str, path: str) -> None:
    """Record ``path`` as the ``last_model_path`` of each ``ModelCheckpoint(save_last=...)`` writing into ``folder``
    (before the save, so the checkpoint's callback state holds it): the resumed run then overwrites ``last.ckpt``
    with its own last checkpoint, instead of taking it for a stranger's file and writing ``last-v1.ckpt`` beside
    it (which left the stale step-N ``last.ckpt`` in the folder)."""
    for callback in trainer.checkpoint_callbacks:
        if (isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath
                and os.path.abspath(callback.dirpath) == os.path.abspath(folder)):
            callback.last_model_path = path


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
            "callback make preempted runs resumable).",
            category=LowMemWarning,
        )
        return None
    path = os.path.join(folder, SIGTERM_CHECKPOINT_NAME)
    _adopt_as_last(trainer, folder, path)
    trainer.save_checkpoint(path, weights_only=False)  # resumable; unset, Lightning logs that it defaulted
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
        "torchdata.stateful_dataloader.StatefulDataLoader (same arguments as DataLoader) for exact resume.",
        category=LowMemWarning,
    )
    return True


class PreemptionStop:
    """Owns SIGTERM during the training loop so that every rank stops at the same step boundary.

    :meth:`install` (at train start, after Lightning registered its handler) puts :meth:`_on_signal`
    in place, which only records the signal; :meth:`decide`, called at every training step end on
    every rank, returns whether the run stops now: at an optimizer step boundary (never inside a
    gradient-accumulation window), when any rank saw the signal (``all_reduce(MAX)`` of the local flag,
    one 1-element collective per optimizer step, only when ``world_size > 1``). It then sets
    ``trainer.received_sigterm`` on every rank, so Lightning's loops stop at the same point on all of them.
    """

    def __init__(self) -> None:
        self.seen = False
        self._previous = None
        self._told = False

    def install(self) -> bool:
        """Replace the SIGTERM handler (main thread only; again after Lightning registered its own, which
        happens between ``on_fit_start`` and the sanity check); returns whether ours is in place."""
        if threading.current_thread() is not threading.main_thread():
            return False
        if signal.getsignal(signal.SIGTERM) == self._on_signal:
            return True
        self.seen, self._told = False, False
        self._previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._on_signal)
        return True

    def uninstall(self) -> None:
        """Give back the handler :meth:`install` replaced, if ours is still the one in place."""
        main = threading.current_thread() is threading.main_thread()
        if main and signal.getsignal(signal.SIGTERM) == self._on_signal:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)

    def _on_signal(self, signum, frame) -> None:
        if self.seen:  # a second SIGTERM before the stop: the default action, now
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        self.seen = True  # no I/O, no collective in a signal handler: decide() acts at the next step boundary

    def decide(self, trainer: L.Trainer) -> bool:
        """At a training step end: whether all ranks stop now (then ``trainer.received_sigterm`` is set)."""
        if trainer.fit_loop.epoch_loop._should_accumulate():
            self._tell_deferred(trainer)
            return False
        stop = self.seen
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([int(stop)], dtype=torch.int32, device=trainer.strategy.root_device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item())
        if stop:
            trainer._signal_connector.received_sigterm = True
        return stop

    def _tell_deferred(self, trainer: L.Trainer) -> None:
        if not self.seen or self._told:
            return
        self._told = True
        left = trainer.accumulate_grad_batches - trainer.fit_loop.epoch_loop.batch_progress.current.ready % (
            trainer.accumulate_grad_batches)
        logging.getLogger("lightning.pytorch").info(rank_prefixed_message(
            f"SIGTERM received inside a gradient-accumulation window (accumulate_grad_batches="
            f"{trainer.accumulate_grad_batches}): finishing it ({left} more batch(es)) before saving, so the "
            "resumed run continues exactly.", trainer.global_rank))


class PreemptionCheckpoint(L.Callback):
    """Save ``last.ckpt`` when the run is preempted (SIGTERM), at a step end all ranks agree on; see the module doc.

    Also: checkpoints are written atomically for the fit unless the user chose a ``CheckpointIO``
    (:func:`~lowmem_lightning.callbacks.checkpoint_io.use_atomic_checkpoint_io`), and one warning says when a
    training dataloader cannot save its position (mid-epoch resume would not be exact).
    """

    def __init__(self) -> None:
        self.stop = PreemptionStop()
        """The SIGTERM handler of the training loop."""
        self._saved_at: int | None = None  # global step of the SIGTERM checkpoint already written

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Checkpoints of this fit (``ModelCheckpoint``'s and the SIGTERM one) are complete or absent."""
        if stage == "fit":
            use_atomic_checkpoint_io(trainer)

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """SIGTERM is handled by :class:`PreemptionStop` from here on (Lightning has just set its own)."""
        self.stop.install()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Warn once when mid-epoch resume cannot be exact; take SIGTERM (if no sanity check did)."""
        warn_if_not_resumable(trainer)
        self.stop.install()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        """At an optimizer step boundary all ranks agree whether to stop; if so, save (Lightning then stops)."""
        self.stop.decide(trainer)  # sets trainer.received_sigterm on every rank when any rank saw the signal
        self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Give SIGTERM back to Lightning's handler once the training loop is over."""
        self.stop.uninstall()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Give SIGTERM back."""
        self.stop.uninstall()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """When Lightning stops the run for a SIGTERM that came after this callback's step-end check (during
        validation or in a later callback), save the checkpoint now, at the step end where the run stopped."""
        try:
            if isinstance(exception, SIGTERMException) and trainer.state.stage == "train":
                self._save(trainer)
        finally:
            self.stop.uninstall()

    def _save(self, trainer: L.Trainer) -> None:
        if self._saved_at != trainer.global_step and save_on_sigterm(trainer):
            self._saved_at = trainer.global_step
