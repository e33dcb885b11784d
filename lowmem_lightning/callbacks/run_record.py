"""What a run trained with, and what its optimizer state came to, in the Trainer's loggers, where runs are compared.

A project that uses :class:`~lowmem_lightning.callbacks.LowMemOptimizerCallback` keeps its own
``configure_optimizers`` and ``save_hyperparameters()``: its ``hparams.yaml`` says torch ``AdamW`` while the run
trained ``adamw_8bit``. So the callback records the optimizer that trained, once per fit at its start, as
hyperparameters under :data:`HPARAM_PREFIX` (``lowmem/optimizer``, ``lowmem/lr``, ...: :func:`optimizer_hparams`),
next to the user's and never over them (:func:`record_hparams`), and the state-memory monitor logs the end-of-fit
summary's figures once, at the last step, as metrics named in :data:`SUMMARY_METRICS` (:func:`log_summary`).

TensorBoard's hparams dashboard reads the first hparams record of a run (later ones are ignored), and Lightning
writes the module's after the callbacks' ``on_fit_start``: so for a ``TensorBoardLogger`` the callback writes, in
its ``on_fit_start``, one record of the module's (and datamodule's) hyperparameters and ours, whose metric columns
are ``hp_metric`` and the summary metrics. It does not when the user writes their own record
(``TensorBoardLogger(default_hp_metric=False)``, Lightning's documented way to choose the dashboard's metrics, or
``Trainer(enable_autolog_hparams=False)``): ours then go to ``hparams.yaml`` only.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
from lightning.pytorch.loggers import TensorBoardLogger

from lowmem_lightning.callbacks.translate import as_float

__all__ = ["HPARAM_PREFIX", "SUMMARY_METRICS", "optimizer_hparams", "record_hparams", "summary_metrics",
           "log_summary"]

HPARAM_PREFIX = "lowmem/"
"""The prefix of every hyperparameter the callback records (the user's own keep their names)."""

SUMMARY_METRICS: dict[str, str] = {
    "optim_summary/state_MiB": "state_MiB",
    "optim_summary/peak_state_MiB": "peak_state_MiB",
    "optim_summary/bytes_per_param": "bytes_per_param",
    "optim_summary/adamw_fp32_MiB": "adamw_fp32_MiB",
    "optim_summary/saving_pct": "saving_pct",
    "optim_summary/skipped_updates": "skipped_updates",
}
"""Metric name -> key of the end-of-fit summary (:func:`~lowmem_lightning.callbacks.report.summary_dict`): MiB of
optimizer state at the end and at its peak, bytes per trainable param, what fp32 AdamW would hold (MiB), the
saving against it (percent) and the tensor updates skipped in the fit for inf/NaN gradients (our optimizers only:
a summary without the key logs no such metric)."""


def _joined(names: list[str]) -> str:
    """The distinct ``names`` in order, joined with ``+`` (``"AdamW"``, ``"AdamW+SGD"``)."""
    return "+".join(dict.fromkeys(names))


def _largest(optimizers: list[torch.optim.Optimizer], key: str) -> float | None:
    """The largest ``key`` over the param groups (``initial_lr`` where a scheduler set it, for ``lr``), or None."""
    values = [group.get("initial_lr", group.get(key)) if key == "lr" else group.get(key)
              for optimizer in optimizers for group in optimizer.param_groups]
    numbers = [number for number in map(as_float, values) if number is not None]
    return max(numbers) if numbers else None


def optimizer_hparams(name: str, optimizers: list[torch.optim.Optimizer], replaced: list[str],
                      arguments: dict[str, Any]) -> dict[str, Any]:
    """The hyperparameters that say what trained, each under :data:`HPARAM_PREFIX`.

    ``optimizer`` (the registered ``name``), ``optimizer_class`` (the classes built, ``+``-joined), ``replaced`` (the
    classes of the module's optimizers they replaced; ``"none"`` when ``configure_optimizers`` returned none),
    ``lr`` and ``weight_decay`` (the largest over the param groups as built: the base of the schedule, before any
    step), and the callback's other ``arguments`` as given (``optimizer_kwargs``, ``step_in_backward``, ...)."""
    params = {
        "optimizer": name,
        "optimizer_class": _joined([type(o).__name__ for o in optimizers]),
        "replaced": _joined(replaced) or "none",
        "lr": _largest(optimizers, "lr"),
        "weight_decay": _largest(optimizers, "weight_decay"),
        **arguments,
    }
    return {f"{HPARAM_PREFIX}{key}": value for key, value in params.items()}


def _user_hparams(trainer: L.Trainer) -> dict[str, Any]:
    """The hyperparameters Lightning logs for this fit after ``on_fit_start``: the module's ``hparams_initial`` and
    the datamodule's (each unless it turned logging off), without LightningCLI's ``_class_path``."""
    merged: dict[str, Any] = {}
    for owner in (trainer.lightning_module, trainer.datamodule):
        if owner is not None and getattr(owner, "_log_hyperparams", False):
            merged.update(owner.hparams_initial)
    merged.pop("_class_path", None)
    return merged


def _writes_dashboard_record(trainer: L.Trainer, logger: TensorBoardLogger) -> bool:
    """Whether Lightning will write this TensorBoard run's hparams record for the user (so ours may come first)."""
    return bool(getattr(trainer, "enable_autolog_hparams", True)) and bool(getattr(logger, "_default_hp_metric", True))


def _record_in_tensorboard(trainer: L.Trainer, logger: TensorBoardLogger, params: dict[str, Any]) -> None:
    """``params`` into ``logger.hparams`` (its ``hparams.yaml``) and, when the user leaves the record to Lightning,
    the run's first hparams record: the user's hyperparameters and ``params``, with ``hp_metric`` and
    :data:`SUMMARY_METRICS` as its metric columns."""
    logger.hparams.update(params)
    if not _writes_dashboard_record(trainer, logger):
        return
    from torch.utils.tensorboard.summary import hparams

    flat = logger._sanitize_params(_flatten_dict(_convert_params({**_user_hparams(trainer), **params})))
    columns = dict.fromkeys(["hp_metric", *SUMMARY_METRICS], 0.0)  # only the names are written
    writer = logger.experiment._get_file_writer()
    for record in hparams(flat, columns):
        writer.add_summary(record)


def record_hparams(trainer: L.Trainer, params: dict[str, Any]) -> None:
    """Record ``params`` (namespaced keys, :func:`optimizer_hparams`) in every logger of the Trainer, on rank 0, at
    fit start: ``log_hyperparams`` merges them with the user's; a ``TensorBoardLogger`` also gets them in the
    dashboard's record (:func:`_record_in_tensorboard`)."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            _record_in_tensorboard(trainer, logger, params)
        else:
            logger.log_hyperparams(params)


def summary_metrics(summary: dict) -> dict[str, float]:
    """The end-of-fit summary's figures as metrics (:data:`SUMMARY_METRICS`)."""
    return {metric: float(summary[key]) for metric, key in SUMMARY_METRICS.items() if key in summary}


def log_summary(trainer: L.Trainer, summary: dict, skip: frozenset[str] = frozenset()) -> None:
    """Log :func:`summary_metrics` (but the names in ``skip``: the module logs them itself) once, at the fit's last
    global step, to every logger of the Trainer (rank 0)."""
    metrics = {name: value for name, value in summary_metrics(summary).items() if name not in skip}
    if not trainer.is_global_zero or not metrics:
        return
    step = max(trainer.global_step - 1, 0)  # the step Lightning logged the last optimizer step's metrics at
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
        logger.save()
