"""Checkpoints written after a weight-averaging callback ended the fit still resume from the training weights.

Lightning's ``WeightAveraging`` (``EMAWeightAveraging``, 2.6) saves the average as the checkpoint's ``state_dict``
and the module's weights as ``current_model_state``, which a resume loads into the module. At ``on_train_end`` it
copies the average into the module (the training weights are gone), and only then does
``ModelCheckpoint.on_train_end`` write ``last.ckpt`` when ``save_last`` found nothing saved yet (``save_top_k=0``,
or a run shorter than the save interval); a ``trainer.save_checkpoint`` after ``fit`` does the same. Such a
checkpoint holds the average twice, and a resume from it (``lowmem fit --ckpt_path last``) continues training
from the averaged weights with the optimizer state of the training ones. Checkpoints saved during training
(``every_n_train_steps``, epoch end, validation end) are not affected: the training weights are in the module.

:class:`KeepTrainingWeights` (put right before each averaging callback by :func:`keep_training_weights`, from
``LowMemOptimizerCallback.on_fit_start``) copies to the CPU, at ``on_train_end`` before the averaging callback
overwrites them, the params and buffers the copy will change, and puts them back into a checkpoint saved after
that, where the averaging callback moves them to ``current_model_state``: the resume is that of an
uninterrupted run.

The SIGTERM checkpoint (:class:`~.preemption.PreemptionCheckpoint`, saved in ``on_train_batch_end``) must come
after the averaging callback's ``on_train_batch_end``, which folds that step into the average: saved before it,
the resumed run never averaged the step it stopped at (its average differed from the uninterrupted run's while
its training weights matched). :func:`serve_weight_averaging` moves it after the last averaging callback.
"""

from __future__ import annotations

import itertools

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging

from lowmem_lightning.callbacks.preemption import PreemptionCheckpoint

__all__ = ["KeepTrainingWeights", "keep_training_weights", "serve_weight_averaging"]


class KeepTrainingWeights(L.Callback):
    """Keeps the training weights that ``averaging`` overwrites with the average at ``on_train_end`` and writes
    them into the ``state_dict`` of a checkpoint saved afterwards (``averaging`` then moves them to
    ``current_model_state``). Must come right before ``averaging`` in ``trainer.callbacks``.

    Args:
        averaging: the ``WeightAveraging`` callback whose end-of-fit copy is undone in checkpoints.
    """

    def __init__(self, averaging: WeightAveraging) -> None:
        self.averaging = averaging
        """The weight-averaging callback this one serves."""
        self.kept: dict[str, torch.Tensor] = {}
        """The training values (on the CPU) of the params and buffers the end-of-fit copy changed, by name."""

    @property
    def state_key(self) -> str:
        """Unique per averaging callback (Lightning requires unique keys); nothing is saved under it."""
        return f"{type(self).__name__}[{self.averaging.state_key}]"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Forget what a previous fit kept."""
        self.kept = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Copy to the CPU each param and buffer that differs from the average about to be copied over it."""
        average = self.averaging._average_model
        if average is None:
            return
        pairs = zip(itertools.chain(average.module.parameters(), average.module.buffers()),
                    itertools.chain(pl_module.named_parameters(), pl_module.named_buffers()))
        self.kept = {name: value.detach().to("cpu", copy=True)
                     for averaged, (name, value) in pairs if not torch.equal(averaged, value.to(averaged.device))}

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """Put the kept training values into ``checkpoint["state_dict"]`` (only while the averaging callback
        holds an average, i.e. it moves ``state_dict`` to ``current_model_state`` next)."""
        if not self.kept or self.averaging._average_model is None:
            return
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {name: self.kept.get(name, value) for name, value in state.items()}


def keep_training_weights(trainer: L.Trainer) -> None:
    """Put a :class:`KeepTrainingWeights` right before each ``WeightAveraging`` callback of ``trainer`` that has
    none yet (a new list: safe while Lightning iterates the old one)."""
    callbacks = list(trainer.callbacks)
    served = {id(c.averaging) for c in callbacks if isinstance(c, KeepTrainingWeights)}
    ordered: list[L.Callback] = []
    for callback in callbacks:
        if isinstance(callback, WeightAveraging) and id(callback) not in served:
            ordered.append(KeepTrainingWeights(callback))
        ordered.append(callback)
    if len(ordered) != len(callbacks):
        trainer.callbacks = ordered


def serve_weight_averaging(trainer: L.Trainer) -> None:
    """With a ``WeightAveraging`` callback in ``trainer``: a :class:`KeepTrainingWeights` right before each, and
    each :class:`~.preemption.PreemptionCheckpoint` right after the last one (so the SIGTERM checkpoint holds the
    average of the step it stops at). Replaces ``trainer.callbacks`` with a new list when it changes anything."""
    keep_training_weights(trainer)
    callbacks = list(trainer.callbacks)
    last = max((i for i, c in enumerate(callbacks) if isinstance(c, WeightAveraging)), default=0)
    early = [c for c in callbacks[:last] if isinstance(c, PreemptionCheckpoint)]  # none without averaging
    if early:
        kept = [c for c in callbacks if not any(c is e for e in early)]
        position = next(i for i, c in enumerate(kept) if c is callbacks[last]) + 1
        trainer.callbacks = kept[:position] + early + kept[position:]
