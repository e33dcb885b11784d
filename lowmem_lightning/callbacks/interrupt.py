"""Ctrl+C during a training step stops the fit when that optimizer step is done: a part of
:class:`~lowmem_lightning.callbacks.LowMemOptimizerCallback`.

SIGINT (Ctrl+C in a terminal, Jupyter's stop button) makes Python raise ``KeyboardInterrupt`` wherever the main
thread is; Lightning catches it, marks the run ``trainer.interrupted`` and ends the fit (``SystemExit(1)``). In the
middle of a step that leaves a state no uninterrupted run passes through: under gradient release
(``step_in_backward``) the tensors updated so far in backward carry this step's update and the others do not; an
optimizer step cut between its tensors does the same; and the batch being trained is counted as read by a resumable
loader, so ``trainer.save_checkpoint(...)`` then ``fit(ckpt_path=...)`` skips it.

:class:`InterruptAtStepEnd` holds a SIGINT that arrives between the start of a training batch and the end of its
optimizer step (the last batch of a gradient-accumulation window) and raises ``KeyboardInterrupt`` at that step's
``on_train_batch_end``, where Lightning counts the step as done: the model and optimizer are those of an
uninterrupted run after that step, and a checkpoint saved then resumes bit for bit. A second Ctrl+C before the step
ends interrupts at once (a stuck step can still be stopped). A SIGINT outside a training step (validation, data
loading between steps) interrupts at once, as without the callback. Only in the main thread of a single-process run
whose SIGINT handler is a Python callable (Python's own, IPython's); an ignored or default-action SIGINT is left
alone.
"""

from __future__ import annotations

import signal
import threading

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

__all__ = ["InterruptAtStepEnd"]


class InterruptAtStepEnd(L.Callback):
    """Delay a Ctrl+C (SIGINT) that arrives inside a training step to the end of that optimizer step; see the
    module doc. :attr:`held` is whether one is waiting now."""

    def __init__(self) -> None:
        self.held = False
        """Whether a SIGINT arrived in the current step and waits for its end."""
        self._previous = None  # the SIGINT handler replaced (called to deliver the held interrupt)
        self._in_step = False  # between on_train_batch_start and the end of the optimizer step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Take SIGINT for the training loop (single process, main thread, a Python handler in place, no other
        :class:`InterruptAtStepEnd` holding it already)."""
        if trainer.world_size != 1 or threading.current_thread() is not threading.main_thread():
            return
        current = signal.getsignal(signal.SIGINT)
        if callable(current) and not isinstance(getattr(current, "__self__", None), InterruptAtStepEnd):
            self._previous, self.held, self._in_step = current, False, False
            signal.signal(signal.SIGINT, self._on_signal)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        """A step begins: a SIGINT from now on waits for its end."""
        self._in_step = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        """At an optimizer step's end (not inside an accumulation window): deliver a held SIGINT."""
        if trainer.fit_loop.epoch_loop._should_accumulate():
            return
        self._in_step = False
        if self.held:
            self.held = False
            rank_zero_info(f"Ctrl+C received during step {trainer.global_step}: stopped after it, so the model and "
                           "optimizer are that step's (a checkpoint saved now resumes exactly).")
            self._previous(signal.SIGINT, None)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Give SIGINT back once the training loop is over."""
        self._uninstall()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Give SIGINT back."""
        self._uninstall()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Give SIGINT back (Lightning skips ``teardown`` hooks after an exception)."""
        self._uninstall()

    def _on_signal(self, signum, frame) -> None:
        if self._in_step and not self.held:
            self.held = True  # no I/O in a signal handler: the step end says it
            return
        self.held = False
        self._previous(signum, frame)

    def _uninstall(self) -> None:
        self._in_step, self.held = False, False
        main = threading.current_thread() is threading.main_thread()
        if main and signal.getsignal(signal.SIGINT) == self._on_signal:
            signal.signal(signal.SIGINT, self._previous)
