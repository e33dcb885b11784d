"""Lightning's learning-rate tools next to :class:`~lowmem_lightning.callbacks.LowMemOptimizerCallback`: the
combinations that cannot do what the tool promises are refused before any step, with what to do instead.

* ``Tuner.lr_find`` (a ``LearningRateFinder`` that ends the fit after the search) writes its suggestion to the
  module's ``lr`` attribute for the next fit (``update_attr=True``, its default); a callback given its own ``lr``
  sets every group's lr in that fit, so the suggestion would be silently dropped (:func:`lr_find_refusal`).
* An optimizer that computes its own step size (``adafactor`` with ``relative_step=True`` and no lr) has no
  learning rate for ``LearningRateFinder`` to sweep (its suggestion would change nothing),
  ``StochasticWeightAveraging`` to anneal (torch's ``SWALR`` fails on a group whose lr is ``None``) or
  ``LearningRateMonitor`` to log (it fails making a tensor of ``None``) (:func:`own_step_refusal`).
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import LearningRateFinder, LearningRateMonitor, StochasticWeightAveraging

__all__ = ["drop_tuner_finders", "lr_find_refusal", "own_step_refusal"]

_OWN_STEP_TOOLS: tuple[tuple[type, str], ...] = (
    (LearningRateFinder, "LearningRateFinder (Tuner.lr_find) sweeps the learning rate, which this optimizer does "
                         "not use: its suggestion would change nothing"),
    (StochasticWeightAveraging, "StochasticWeightAveraging anneals the learning rate to swa_lrs (torch's SWALR), "
                                "and the param groups have none"),
    (LearningRateMonitor, "LearningRateMonitor logs every param group's learning rate, and the param groups have "
                          "none"),
)


def lr_find_refusal(callbacks: list[L.Callback], optimizer: str, lr: float | None) -> str | None:
    """Why ``LowMemOptimizerCallback(optimizer, lr=lr)`` refuses this fit's ``Tuner.lr_find`` (None: it does not).

    Refused: a callback ``lr`` with a ``LearningRateFinder`` among ``callbacks`` that ends the fit after its
    search (``Tuner.lr_find``) and writes the suggestion to the module (``update_attr=True``): the fit after it
    would train at the callback's ``lr``. A ``LearningRateFinder`` kept as a callback of the fit sets the
    suggestion on the optimizer it searched with, and is not refused."""
    if lr is None:
        return None
    for callback in callbacks:
        if (isinstance(callback, LearningRateFinder) and getattr(callback, "_early_exit", False)
                and getattr(callback, "_update_attr", False)):
            return (
                f"LowMemOptimizerCallback(optimizer={optimizer!r}, lr={lr!r}) sets the learning rate of every fit, so "
                "the lr that Tuner.lr_find(update_attr=True) writes to the module for the next fit would not be "
                f"used: that fit would train at lr={lr!r}. Either leave the callback's lr unset (it then keeps the "
                "module's lr, which lr_find updates), or call Tuner(trainer).lr_find(model, update_attr=False) and "
                "build the callback with lr=<lr_finder.suggestion()> for the fit"
            )
    return None


def drop_tuner_finders(callbacks: list[L.Callback]) -> None:
    """Remove, in place, the ``LearningRateFinder`` that ``Tuner.lr_find`` put first in the Trainer's callbacks for
    its fit (it ends that fit): the Tuner removes it only when the fit returns, so after a refusal it would stay and
    run again, and be refused again, in the next ``trainer.fit`` of the same Trainer."""
    callbacks[:] = [c for c in callbacks
                    if not (isinstance(c, LearningRateFinder) and getattr(c, "_early_exit", False))]


def own_step_refusal(callbacks: list[L.Callback], optimizer: str) -> str | None:
    """Why an optimizer that computes its own step size (no lr: ``adafactor``'s ``relative_step``) cannot run
    with one of Lightning's learning-rate tools among ``callbacks`` (None: none is there)."""
    for callback in callbacks:
        for kind, why in _OWN_STEP_TOOLS:
            if isinstance(callback, kind):
                return (
                    f"LowMemOptimizerCallback(optimizer={optimizer!r}) computes its own step size (lr=None, "
                    f"relative_step=True), so the param groups have no learning rate; {why}. Give the callback an "
                    f"lr (LowMemOptimizerCallback({optimizer!r}, lr=..., optimizer_kwargs={{'relative_step': "
                    f"False}})), or remove {kind.__name__} from the Trainer"
                )
    return None
