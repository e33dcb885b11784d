"""A rich progress bar that reads right in a plain 80x24 terminal, for step-bounded runs especially.

:class:`StepsAwareRichProgressBar` is Lightning's ``RichProgressBar`` with four changes:

* a run bounded by ``max_steps`` (``max_epochs`` unset or ``-1``) counts optimizer steps against
  ``max_steps`` over the whole run (``Epoch 1 ━━━━ 142/300 steps``), not the batches of the current
  epoch, and never prints a negative total (``Epoch 1/-2``);
* the metrics go on one line of their own below the bars, with short names (``loss 2.325 · state
  0.53 MiB · val_loss 2.332 (step 300)``), and a metric that validation logged carries the step it
  was computed at, so a stale value is never mistaken for a fresh one;
* while the bar is live, Lightning's log lines (``Trainer.fit stopped ...``) are printed through the
  bar's console, above it, instead of being overwritten by its next redraw;
* the bar stops when training ends, so what the callbacks print at the end of fit (the
  :class:`~lowmem_lightning.callbacks.LowMemOptimizerCallback` summary) comes after it and stays on screen.
"""

from __future__ import annotations

import logging
import math
import sys
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import BatchesProcessedColumn
from rich.file_proxy import FileProxy
from rich.text import Text

__all__ = ["StepsAwareRichProgressBar", "format_bar_metrics", "is_step_bounded"]

_LABELS: dict[str, tuple[str, str]] = {
    "train_loss": ("loss", "{:.3f}"),
    "loss": ("loss", "{:.3f}"),
    "val_loss": ("val_loss", "{:.3f}"),
    "optim/state_MiB": ("state", "{:.2f} MiB"),
    "optim/state_MiB_device": ("device", "{:.2f} MiB"),
    "optim/state_MiB_host": ("host", "{:.2f} MiB"),
    "optim/state_bytes_per_param": ("B/param", "{:.2f}"),
    "optim/effective_lr": ("lr", "{:.2e}"),
    "memory/allocated_MiB": ("alloc", "{:.0f} MiB"),
    "memory/max_allocated_MiB": ("peak", "{:.0f} MiB"),
}
"""Short progress-bar label and format of the metrics this package (and ``CausalLMModule``) logs."""

_HIDDEN = ("v_num",)  # the logger version: it is in the log dir printed at the end


def is_step_bounded(trainer: L.Trainer) -> bool:
    """True when only ``max_steps`` bounds the run (``max_steps > 0``, ``max_epochs`` ``None`` or ``-1``)."""
    max_epochs = trainer.max_epochs
    return trainer.max_steps is not None and trainer.max_steps > 0 and (max_epochs is None or max_epochs < 0)


def _format_value(name: str, value: Any) -> tuple[str, str]:
    label, fmt = _LABELS.get(name, (name.rsplit("/", 1)[-1], ""))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return label, str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return label, str(value)
    if fmt.startswith("{:.3f}") and 0 < abs(value) < 0.01:
        fmt = fmt.replace(".3f", ".3g", 1)  # a loss near zero keeps its digits (0.000213, not 0.000)
    if fmt:
        return label, fmt.format(value)
    return label, str(value) if isinstance(value, int) else f"{value:.4g}"


def format_bar_metrics(metrics: dict[str, Any], steps: dict[str, int] | None = None) -> str:
    """The metrics line of the bar: ``label value`` pairs joined by `` · `` (known metrics get short
    labels and units, e.g. ``optim/state_MiB`` -> ``state 0.53 MiB``; others the last part of their
    name, 4 significant digits); a name in ``steps`` gets `` (step N)``, the step it was computed at."""
    steps = steps or {}
    parts = []
    for name, value in metrics.items():
        if name in _HIDDEN:
            continue
        label, text = _format_value(name, value)
        if name in steps:
            text += f" (step {steps[name]})"
        parts.append(f"{label} {text}")
    return " · ".join(parts)


class _StepsProcessedColumn(BatchesProcessedColumn):
    """``done/total``, followed by the task's ``unit`` field (``steps``) when it has one."""

    def render(self, task):
        """Lightning's counter text plus the unit."""
        text = super().render(task)
        unit = task.fields.get("unit")
        if unit:
            text.append(f" {unit}")
        return text


class StepsAwareRichProgressBar(RichProgressBar):
    """Lightning's rich progress bar for 80-column terminals and step-bounded runs.

    A run bounded by ``max_steps`` only shows ``optimizer steps / max_steps`` over the whole run;
    metrics are one line below the bars with short names and units; validation metrics are labelled
    with the step they come from; log lines printed while it is live appear above it, and it stops
    when training ends so end-of-fit output stays on screen. Arguments are ``RichProgressBar``'s.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._metrics_text = ""
        self._metric_steps: dict[str, int] = {}
        self._before_validation: dict[str, Any] = {}
        self._rerouted: list[tuple[logging.StreamHandler, Any]] = []

    # ------------------------------------------------------------------ layout
    def configure_columns(self, trainer: L.Trainer) -> list:
        """Lightning's columns, with a batch counter that can say ``steps``."""
        columns = super().configure_columns(trainer)
        return [_StepsProcessedColumn(c.style) if type(c) is BatchesProcessedColumn else c for c in columns]

    def _init_progress(self, trainer: L.Trainer) -> None:
        started = self.progress is None or self._progress_stopped
        super()._init_progress(trainer)
        if not started or self.progress is None:
            return
        progress = self.progress
        progress.columns = tuple(c for c in progress.columns if c is not self._metric_component)
        progress.get_renderables = lambda: self._renderables(progress)
        self._route_logging_through_console()

    def _renderables(self, progress):
        yield progress.make_tasks_table(progress.tasks)
        trainer = self._trainer
        if self._metrics_text and trainer is not None and trainer.state.fn == "fit" and not trainer.sanity_checking:
            yield Text(self._metrics_text, style=self.theme.metrics, no_wrap=True, overflow="ellipsis")

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_epochs is not None and trainer.max_epochs >= 0 and not is_step_bounded(trainer):
            return super()._get_train_description(current_epoch)
        return f"{f'Epoch {current_epoch}':{len(self.validation_description)}}"

    # ------------------------------------------------------------------ step-bounded counting
    def _add_steps_task(self, trainer: L.Trainer) -> None:
        description = self._get_train_description(trainer.current_epoch)
        self.train_progress_bar_id = self._add_task(trainer.max_steps, description)
        self.progress.update(self.train_progress_bar_id, completed=trainer.global_step, unit="steps")

    def _initialize_train_progress_bar_id(self) -> None:
        if is_step_bounded(self.trainer):
            self._add_steps_task(self.trainer)
        else:
            super()._initialize_train_progress_bar_id()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Epoch-bounded runs: Lightning's bar. Step-bounded: one bar of optimizer steps for the whole run."""
        if not is_step_bounded(trainer):
            return super().on_train_epoch_start(trainer, pl_module)
        if self.is_disabled or self.progress is None:
            return None
        if self.train_progress_bar_id is None:
            self._add_steps_task(trainer)
        else:
            self.progress.update(
                self.train_progress_bar_id, total=trainer.max_steps, completed=trainer.global_step,
                description=self._get_train_description(trainer.current_epoch), visible=True,
            )
        self.refresh()
        return None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        """Step-bounded runs advance to ``trainer.global_step`` (optimizer steps, not batches)."""
        if not is_step_bounded(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()
        return None

    # ------------------------------------------------------------------ metrics
    def _update_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super()._update_metrics(trainer, pl_module)
        if self.is_enabled:
            self._metrics_text = format_bar_metrics(self.get_metrics(trainer, pl_module), self._metric_steps)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Remember the bar's metrics, to tell which ones this validation run logs."""
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._before_validation = dict(self.get_metrics(trainer, pl_module))
        super().on_validation_start(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Stamp the metrics validation logged (new, changed or named ``val*``) with the current step."""
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            for name, value in self.get_metrics(trainer, pl_module).items():
                fresh = name not in self._before_validation or self._before_validation[name] != value
                if name not in _HIDDEN and (fresh or name.startswith("val")):
                    self._metric_steps[name] = trainer.global_step
        super().on_validation_end(trainer, pl_module)

    # ------------------------------------------------------------------ end of training, log lines
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Stop the live display, so that end-of-fit output is printed below the final bar."""
        self._stop_progress()

    def _route_logging_through_console(self) -> None:
        """While the display redirects ``sys.stderr``, point Lightning's stream handlers at it too."""
        proxy = sys.stderr
        if not isinstance(proxy, FileProxy):
            return
        target = proxy.rich_proxied_file
        for name in ("lightning.pytorch", "lightning.fabric", "lightning_fabric", "lowmem_lightning", ""):
            for handler in logging.getLogger(name).handlers:
                if type(handler) is logging.StreamHandler and handler.stream is target:
                    handler.setStream(proxy)
                    self._rerouted.append((handler, target))

    def _stop_progress(self) -> None:
        for handler, stream in self._rerouted:
            handler.setStream(stream)
        self._rerouted = []
        super()._stop_progress()
