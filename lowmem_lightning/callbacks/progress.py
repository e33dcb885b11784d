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
from lightning.pytorch.callbacks.progress.rich_progress import BatchesProcessedColumn, MetricsTextColumn
from rich.file_proxy import FileProxy
from rich.text import Text

from lowmem_lightning.callbacks.monitor import METRICS

__all__ = ["StepsAwareRichProgressBar", "format_bar_metrics", "is_step_bounded"]

_LABELS: dict[str, tuple[str, str]] = {
    "train_loss": ("loss", "{:.3f}"),
    "loss": ("loss", "{:.3f}"),
    "val_loss": ("val_loss", "{:.3f}"),
    **{metric.name: (metric.label, metric.fmt) for metric in METRICS},
}
"""Short progress-bar label and format of the losses modules log and of the monitor's metrics."""

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
    metrics (``get_metrics``) are one line below the bars with short names and units; validation metrics
    are labelled with the step they come from; log lines printed while it is live appear above it, and it
    stops when training ends so end-of-fit output stays on screen. Arguments are ``RichProgressBar``'s.
    Built on the public hooks and rich's ``Progress`` API; no private ``RichProgressBar`` method is overridden.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._metrics_text = ""
        self._metric_steps: dict[str, int] = {}
        self._before_validation: dict[str, Any] = {}
        self._rerouted: list[tuple[logging.StreamHandler, Any]] = []
        self._arranged: object | None = None  # the rich Progress whose display this bar arranged

    # ------------------------------------------------------------------ layout
    def configure_columns(self, trainer: L.Trainer) -> list:
        """Lightning's columns, with a batch counter that can say ``steps``."""
        columns = super().configure_columns(trainer)
        return [_StepsProcessedColumn(c.style) if type(c) is BatchesProcessedColumn else c for c in columns]

    def _arrange(self) -> None:
        """Once per rich display Lightning starts: metrics on their own line, log lines through its console."""
        progress = self.progress
        if progress is None or progress is self._arranged:
            return
        self._arranged = progress
        progress.columns = tuple(c for c in progress.columns if not isinstance(c, MetricsTextColumn))
        progress.get_renderables = lambda: self._renderables(progress)
        self._restore_logging()
        self._route_logging_through_console()

    def _renderables(self, progress):
        yield progress.make_tasks_table(progress.tasks)
        trainer = self.trainer
        if self._metrics_text and trainer.state.fn == "fit" and not trainer.sanity_checking:
            yield Text(self._metrics_text, style=self.theme.metrics, no_wrap=True, overflow="ellipsis")

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Lightning starts the display; arrange it."""
        super().on_sanity_check_start(trainer, pl_module)
        self._arrange()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Lightning starts the display; arrange it."""
        super().on_train_start(trainer, pl_module)
        self._arrange()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Remember the bar's metrics, to tell which ones this validation run logs; arrange the display."""
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._before_validation = dict(self.get_metrics(trainer, pl_module))
        super().on_validation_start(trainer, pl_module)
        self._arrange()

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Lightning starts the display; arrange it."""
        super().on_test_start(trainer, pl_module)
        self._arrange()

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Lightning starts the display; arrange it."""
        super().on_predict_start(trainer, pl_module)
        self._arrange()

    # ------------------------------------------------------------------ step-bounded counting
    def _epoch_description(self, trainer: L.Trainer) -> str:
        return f"{f'Epoch {trainer.current_epoch}':{len(self.validation_description)}}"

    def _add_steps_task(self, trainer: L.Trainer) -> None:
        description = self._epoch_description(trainer)
        styled = f"[{self.theme.description}]{description}" if self.theme.description else description
        self.train_progress_bar_id = self.progress.add_task(styled, total=trainer.max_steps,
                                                            completed=trainer.global_step, unit="steps")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Epoch-bounded runs: Lightning's bar (``Epoch N``, no negative total under ``max_epochs=-1``).
        Step-bounded: one bar of optimizer steps for the whole run."""
        if not is_step_bounded(trainer):
            super().on_train_epoch_start(trainer, pl_module)
            self._arrange()  # a new display when ``leave=True``
            if trainer.max_epochs is not None and trainer.max_epochs < 0 and self.progress is not None:
                self.progress.update(self.train_progress_bar_id, description=self._epoch_description(trainer))
            return
        if self.is_disabled or self.progress is None:
            return
        if self.train_progress_bar_id is None:
            self._add_steps_task(trainer)
        else:
            self.progress.update(
                self.train_progress_bar_id, total=trainer.max_steps, completed=trainer.global_step,
                description=self._epoch_description(trainer), visible=True,
            )
        self.refresh()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        """Step-bounded runs advance to ``trainer.global_step`` (optimizer steps, not batches)."""
        if not is_step_bounded(trainer):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        elif self.is_enabled and self.progress is not None:
            if self.train_progress_bar_id is None:  # a mid-epoch resume starts without the epoch-start hook
                self._add_steps_task(trainer)
            self.progress.update(self.train_progress_bar_id, completed=trainer.global_step, visible=True)
        self._update_metrics_line(trainer, pl_module)
        self.refresh()

    # ------------------------------------------------------------------ metrics
    def _update_metrics_line(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.is_enabled:
            self._metrics_text = format_bar_metrics(self.get_metrics(trainer, pl_module), self._metric_steps)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The metrics line shows the epoch-end metrics."""
        super().on_train_epoch_end(trainer, pl_module)
        self._update_metrics_line(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Stamp the metrics validation logged (new, changed or named ``val*``) with the current step."""
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            for name, value in self.get_metrics(trainer, pl_module).items():
                fresh = name not in self._before_validation or self._before_validation[name] != value
                if name not in _HIDDEN and (fresh or name.startswith("val")):
                    self._metric_steps[name] = trainer.global_step
        super().on_validation_end(trainer, pl_module)
        if trainer.state.fn == "fit":
            self._update_metrics_line(trainer, pl_module)

    # ------------------------------------------------------------------ end of training, log lines
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Stop the live display, so that end-of-fit output is printed below the final bar (Lightning marks
        it stopped at ``teardown``)."""
        if self.progress is not None:
            self.progress.stop()
        self._restore_logging()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Lightning stops the display; log lines go to their own streams again."""
        super().teardown(trainer, pl_module, stage)
        self._restore_logging()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Lightning stops the display; log lines go to their own streams again."""
        super().on_exception(trainer, pl_module, exception)
        self._restore_logging()

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

    def _restore_logging(self) -> None:
        for handler, stream in self._rerouted:
            handler.setStream(stream)
        self._rerouted = []
