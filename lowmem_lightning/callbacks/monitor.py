"""StateMemoryMonitor: log the optimizer-state memory of any fit per step, summarise and plot it.

It works with any optimizer (ours or torch's) and needs nothing else::

    trainer = L.Trainer(callbacks=[StateMemoryMonitor()])

:class:`~lowmem_lightning.callbacks.LowMemOptimizerCallback` puts one into ``trainer.callbacks`` and hands
it the optimizers it builds (:meth:`StateMemoryMonitor.track`), so its metrics, summary and plot are this
monitor's. The metric names are written once, in :data:`METRICS`.
"""

from __future__ import annotations

import math
import multiprocessing
from multiprocessing.connection import Connection
from typing import NamedTuple

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lowmem_lightning.callbacks.report import (
    StateHistory,
    adamw_fp32_state_bytes,
    format_summary,
    small_tensor_summary,
    summary_dict,
    write_plot,
)
from lowmem_lightning.callbacks.run_record import SUMMARY_METRICS, log_summary
from lowmem_lightning.callbacks.skips import (
    STOP_AFTER_SKIPPED_STEPS,
    LostWeights,
    SkipWatch,
    check_stop_after_skipped_steps,
)
from lowmem_lightning.lowmem_warning import LowMemWarning
from lowmem_lightning.optim import StateMemory, state_memory
from lowmem_lightning.optim.registry import OPTIMIZERS, optimizer_class
from lowmem_lightning.optim.sharding import is_dtensor

__all__ = ["METRICS", "Metric", "StateMemoryMonitor"]

MIB = 2**20


class Metric(NamedTuple):
    """One metric the monitor logs: its logged ``name``, whether it is logged as the maximum since the last
    logged step (``peak``; else the latest value), and its short progress-bar ``label`` and ``fmt``."""

    name: str
    peak: bool
    label: str
    fmt: str


STATE_MIB = Metric("optim/state_MiB", True, "state", "{:.2f} MiB")
STATE_BYTES_PER_PARAM = Metric("optim/state_bytes_per_param", True, "B/param", "{:.2f}")
STATE_MIB_DEVICE = Metric("optim/state_MiB_device", True, "device", "{:.2f} MiB")
STATE_MIB_HOST = Metric("optim/state_MiB_host", True, "host", "{:.2f} MiB")
EFFECTIVE_LR = Metric("optim/effective_lr", False, "lr", "{:.2e}")
ALLOCATED_MIB = Metric("memory/allocated_MiB", True, "alloc", "{:.0f} MiB")
MAX_ALLOCATED_MIB = Metric("memory/max_allocated_MiB", True, "peak", "{:.0f} MiB")
SKIPPED_UPDATES = Metric("optim/skipped_updates", False, "skipped_updates", "")

METRICS: tuple[Metric, ...] = (STATE_MIB, STATE_BYTES_PER_PARAM, STATE_MIB_DEVICE, STATE_MIB_HOST, EFFECTIVE_LR,
                               ALLOCATED_MIB, MAX_ALLOCATED_MIB, SKIPPED_UPDATES)
"""Every metric :class:`StateMemoryMonitor` logs: the one place their names are written (the progress bar reads
its labels from here)."""

_PEAKS = frozenset(m.name for m in METRICS if m.peak)


class StateMemoryMonitor(L.Callback):
    """Log optimizer-state memory at every optimizer step; print a summary and write a plot at the end.

    At every optimizer step it measures :func:`~lowmem_lightning.optim.state_memory` of the fit's
    optimizers (summed) and logs, through the Trainer's loggers and at the Trainer's
    ``log_every_n_steps``, the maximum since the last logged step (so no spike is hidden) of:
    ``optim/state_MiB`` (also on the progress bar), ``optim/state_bytes_per_param``; for paged
    optimizers ``optim/state_MiB_device`` and ``optim/state_MiB_host``; on CUDA
    ``memory/allocated_MiB`` and ``memory/max_allocated_MiB``. It also logs the latest
    ``optim/effective_lr`` when the optimizer computes its step size (Adafactor, CAME: the largest
    over param groups) and, at logged steps, ``optim/skipped_updates`` (tensor updates skipped so far
    for inf/NaN gradients; our optimizers only). Measuring never synchronises with the device except
    at logged steps (an effective LR held as a device tensor, the skipped-update counts) and at epoch ends.

    Skipped updates (:mod:`~lowmem_lightning.callbacks.skips`): one warning the first time any are seen (the step,
    how many, the param names when known, what to check), again each time their count doubles; the summary says
    ``skipped N tensor updates ... in K of M steps``; and the fit stops (``trainer.should_stop``, with one message)
    once every update of ``stop_after_skipped_steps`` optimizer steps in a row was skipped. Seen at logged steps and
    epoch ends, so the warning and the stop come at the first of those after the skips.

    At the end of fit it prints a summary (state memory, bytes/param, saving vs fp32 AdamW on the same params; also in
    :attr:`summary`), logs its figures once to the Trainer's loggers, at the last step, as
    ``optim_summary/state_MiB``, ``peak_state_MiB``, ``bytes_per_param``, ``adamw_fp32_MiB`` and ``saving_pct``
    (with ``log_state_memory``; :data:`~lowmem_lightning.callbacks.run_record.SUMMARY_METRICS`) and writes
    ``state_memory.png`` into the log dir when matplotlib is installed: state MiB per step (device and host for
    paged optimizers) against fp32 AdamW's, with the training and validation loss. A failure to write the plot or
    print the summary is a warning naming the path and the error, never a failed fit. Under ``Trainer(barebones=True)``
    (Lightning's raw-speed mode: no logging, no model summary, nothing written) the summary is kept in :attr:`summary`
    but neither printed nor plotted; the warnings and the stop on skipped updates stay.

    Under ``strategy="ddp_spawn"`` (ranks started as new processes that receive a pickled copy of this
    callback) the fit runs in those processes: after ``trainer.fit`` returns, rank 0's :attr:`summary` is sent
    back to this process, while :attr:`optimizers` and :attr:`history` stay as they were here (empty), as
    Lightning's ``trainer.global_step`` does. With ``ddp_fork``/``ddp_notebook`` (forked, nothing pickled) the
    summary stays in the ranks; it is printed by rank 0 in every case.

    Args:
        log_state_memory: Log the per-step metrics above.
        plot: Write ``state_memory.png`` into the log dir at the end of fit.
        print_summary: Print the end-of-fit summary (rank 0).
        stop_after_skipped_steps: Stop the fit once every tensor update of this many optimizer steps in a row was
            skipped for inf/NaN gradients (an int >= 1; default 100); ``None`` never stops.
    """

    def __init__(self, log_state_memory: bool = True, plot: bool = True, print_summary: bool = True,
                 stop_after_skipped_steps: int | None = STOP_AFTER_SKIPPED_STEPS) -> None:
        self.stop_after_skipped_steps = check_stop_after_skipped_steps(stop_after_skipped_steps)
        self.log_state_memory = bool(log_state_memory)
        self.plot = bool(plot)
        self.print_summary = bool(print_summary)
        self._log_dir: str | None = None  # where the plot goes, asked at fit start
        self.optimizers: list[torch.optim.Optimizer] = []
        """The optimizers measured in the current (or last) fit."""
        self._summary: dict | None = None
        self._summary_reader: Connection | None = None  # here: rank 0's summary of a ddp_spawn fit arrives on it
        self._summary_writer: Connection | None = None  # in a spawned rank: where rank 0 sends its summary
        self.history = StateHistory()
        """What the current (or last) fit recorded per optimizer step (state MiB, losses): the plot's data."""
        self._tracked: tuple[list[torch.optim.Optimizer], str, str] | None = None
        self._peak: dict[str, float] = {}  # metric -> value to log: the max since the last logged step
        self._pending_losses: list[tuple[int, torch.Tensor]] = []  # (index in history.losses, device scalar)
        self._max_state_bytes = 0
        self._last_global_step = -1
        self._resumed = False  # the current fit restored a checkpoint (trainer.ckpt_path)
        self._taken: frozenset[str] | None = None  # our metric names the module logs itself (seen at the first step)
        self._skips = SkipWatch([], None)  # the skipped-update counts of the current fit
        self._lost = LostWeights(None)  # the current fit's non-finite losses, and its weights when they stay so

    def track(self, optimizers: list[torch.optim.Optimizer], name: str, reporter: str) -> None:
        """Measure ``optimizers`` (called ``name`` in the summary, whose header names ``reporter``)
        instead of the Trainer's, from the next ``on_fit_start``: how a callback that builds the
        optimizers composes this monitor."""
        self._tracked = (list(optimizers), name, reporter)

    @property
    def summary(self) -> dict | None:
        """End-of-fit numbers (MiB, bytes/param, saving vs fp32 AdamW); ``None`` before a fit ends. After a
        ``ddp_spawn`` fit, rank 0's, sent back from its process."""
        reader = self._summary_reader
        while reader is not None and reader.poll():
            self._summary = reader.recv()
        return self._summary

    @summary.setter
    def summary(self, value: dict | None) -> None:
        self._summary = value

    def __getstate__(self) -> dict:
        """The state pickled: pipes left out, except into a process being spawned (``ddp_spawn``), which gets the
        sending end of a pipe whose receiving end :attr:`summary` reads here. All ranks are pickled before any
        can finish its fit (they meet at process-group start), so the last fit's summary is dropped here first."""
        state = {**self.__dict__, "_summary_reader": None, "_summary_writer": None}
        if multiprocessing.context.get_spawning_popen() is not None:
            if self._summary_reader is None:
                self._summary_reader, self._summary_writer = multiprocessing.Pipe(duplex=False)
            _ = self.summary  # anything a previous launch sent
            self._summary = state["_summary"] = None
            state["_summary_writer"] = self._summary_writer
        return state

    def _send_summary(self, trainer: L.Trainer) -> None:
        """In rank 0 of a ``ddp_spawn`` fit: the summary to the process that started the ranks."""
        if self._summary_writer is None or not trainer.is_global_zero:
            return
        try:
            self._summary_writer.send(self._summary)
        except OSError as err:  # the starting process is gone: nobody to read it
            rank_zero_warn(f"{self._reporter}: could not send the end-of-fit summary to the process that started "
                           f"the ranks: {type(err).__name__}: {err}", category=LowMemWarning)

    @property
    def _reporter(self) -> str:
        return self._tracked[2] if self._tracked else type(self).__name__

    def _optimizer_name(self) -> str:
        if self._tracked:
            return self._tracked[1]
        names = []
        for opt in self.optimizers:
            registered = [n for n in sorted(OPTIMIZERS) if _class_or_none(n) is type(opt)]
            names.append(registered[0] if registered else type(opt).__name__)
        return "+".join(dict.fromkeys(names)) or "none"

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """A new fit: no summary yet."""
        if stage == "fit":
            self.summary = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Take the fit's optimizers (the strategy has built them) and start a new history; with ``plot``, ask
        for the log dir here, not at the end of fit (see :meth:`_report`)."""
        # trainer.log_dir is a broadcast under DDP (every rank must ask). Asked as the last collective of the fit,
        # its gloo work object could still be released on gloo's thread while a ddp_spawn rank's interpreter was
        # exiting: that thread, taking the GIL during finalization, aborted the rank (SIGABRT, "terminate called
        # without an active exception"; a core dump showed ~AsyncBroadcastWork -> take_gil -> pthread_exit).
        self._log_dir = trainer.log_dir if self.plot and not trainer.barebones else None
        self.optimizers = list(self._tracked[0]) if self._tracked else list(trainer.optimizers)
        self.history = StateHistory()
        self._peak, self._pending_losses, self._max_state_bytes = {}, [], 0
        self._last_global_step = trainer.global_step
        self._resumed = trainer.ckpt_path is not None
        self._taken = None
        self._skips = SkipWatch(self.optimizers, self.stop_after_skipped_steps)
        self._lost = LostWeights(self.stop_after_skipped_steps)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        """After an optimizer step: measure, keep the max since the last logged step, log it."""
        self._log_step(trainer, pl_module, outputs)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Read the skipped-update counts of the epoch's last steps (warn, stop when due)."""
        self._skips.check(trainer, self._reporter)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Record the validation loss of this run (for the plot), at the current optimizer step."""
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        found = _validation_loss(trainer.callback_metrics)
        if found is not None:
            self.history.val_name = found[0]
            self.history.val_losses.append((trainer.global_step, found[1]))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Summary (state memory, bytes/param, saving vs fp32 AdamW) and the PNG, on rank 0. A failure
        to write or print them is a warning (naming the path and the error), so fit still completes."""
        if not self.optimizers:
            return
        try:
            self._report(trainer)
        except Exception as err:  # noqa: BLE001 - the report is optional; the trained model is not
            where = getattr(err, "filename", None) or "the console"
            rank_zero_warn(f"{self._reporter}: could not write the end-of-fit summary to {where}: "
                           f"{type(err).__name__}: {err}", category=LowMemWarning)
        self._send_summary(trainer)

    # ------------------------------------------------------------------ measuring
    def _effective_lr(self, allow_sync: bool) -> float | None:
        """Largest step size over param groups: ``group["effective_lr"]`` (a float, free) or, when
        ``allow_sync``, ``group["effective_lr_tensor"]`` (a device scalar: one sync for all groups)."""
        groups = [g for opt in self.optimizers for g in opt.param_groups]
        floats = [float(g["effective_lr"]) for g in groups if g.get("effective_lr") is not None]
        if floats:
            return max(floats)
        tensors = [g["effective_lr_tensor"] for g in groups if isinstance(g.get("effective_lr_tensor"), torch.Tensor)]
        if tensors and allow_sync:
            return float(torch.stack([t.detach().float().reshape(()) for t in tensors]).max())
        return None

    def measure(self, allow_sync: bool = True) -> dict[str, float]:
        """Current metrics of the optimizers (state memory summed over them), as logged per step.

        ``allow_sync=False`` leaves out values that need a device sync (an effective LR held only as a
        device tensor); the monitor reads those at logged steps only."""
        memories = [state_memory(opt) for opt in self.optimizers]
        total = sum(m.total_bytes for m in memories)
        num_params = sum(m.num_params for m in memories)
        self._max_state_bytes = max(self._max_state_bytes, total)
        metrics = {
            STATE_MIB.name: total / MIB,
            STATE_BYTES_PER_PARAM.name: total / num_params if num_params else 0.0,
        }
        if any(getattr(opt, "is_paged", False) for opt in self.optimizers):
            metrics[STATE_MIB_DEVICE.name] = sum(m.device_bytes for m in memories) / MIB
            metrics[STATE_MIB_HOST.name] = sum(m.host_bytes for m in memories) / MIB
        effective = self._effective_lr(allow_sync)
        if effective is not None:
            metrics[EFFECTIVE_LR.name] = effective
        device = self._device()
        if device is not None and device.type == "cuda":
            metrics[ALLOCATED_MIB.name] = torch.cuda.memory_allocated(device) / MIB
            metrics[MAX_ALLOCATED_MIB.name] = torch.cuda.max_memory_allocated(device) / MIB
        return metrics

    def _device(self) -> torch.device | None:
        for opt in self.optimizers:
            for group in opt.param_groups:
                for param in group["params"]:
                    return param.device
        return None

    @staticmethod
    def _will_log(trainer: L.Trainer) -> bool:
        connector = getattr(trainer, "_logger_connector", None)
        try:
            return bool(connector.should_update_logs)
        except Exception:  # noqa: BLE001 - private API moved: log every n optimizer steps
            return trainer.log_every_n_steps > 0 and trainer.global_step % trainer.log_every_n_steps == 0

    def _record_loss(self, trainer: L.Trainer, outputs) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            if trainer.lightning_module.automatic_optimization:
                loss = loss.detach() * trainer.accumulate_grad_batches  # Lightning divides it for backward
            self._pending_losses.append((len(self.history.losses), loss.detach().float().reshape(())))
        self.history.losses.append(None)
        if len(self._pending_losses) >= 64:
            self._flush_losses()
            self._lost.check(trainer, self.optimizers, self._reporter)

    def _flush_losses(self) -> None:
        """Copy recorded losses to the host with one transfer (no sync per step)."""
        if not self._pending_losses:
            return
        values = torch.stack([loss for _, loss in self._pending_losses]).cpu().tolist()
        for (index, _), value in zip(self._pending_losses, values):
            finite = math.isfinite(value)
            self.history.losses[index] = value if finite else None
            self._lost.add(self.history.steps[index], finite)
        self._pending_losses = []

    def _log_step(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs) -> None:
        if trainer.global_step == self._last_global_step:
            return  # accumulating gradients: no optimizer step in this batch
        self._last_global_step = trainer.global_step
        will_log = self._will_log(trainer)
        metrics = self.measure(allow_sync=will_log)
        self.history.steps.append(trainer.global_step)
        self.history.state_mib.append(metrics[STATE_MIB.name])
        self.history.host_mib.append(metrics.get(STATE_MIB_HOST.name, 0.0))
        self._record_loss(trainer, outputs)
        self._skips.record(trainer.global_step)
        if will_log or self._skips.full:
            self._skips.check(trainer, self._reporter)
        if not self.log_state_memory:
            return
        if self._taken is None:
            self._taken = self._names_the_module_logs(trainer)
        for key, value in metrics.items():
            self._peak[key] = max(self._peak.get(key, value), value) if key in _PEAKS else value
        to_logger = bool(trainer.loggers)
        for key, value in self._peak.items():
            if key in self._taken:
                continue
            pl_module.log(key, value, on_step=True, on_epoch=False, prog_bar=key == STATE_MIB.name,
                          logger=to_logger, batch_size=1)
        if will_log:
            if self._skips.tracked and SKIPPED_UPDATES.name not in self._taken:  # read by check() above
                pl_module.log(SKIPPED_UPDATES.name, self._skips.logged_total(), on_step=True, on_epoch=False,
                              logger=to_logger, batch_size=1)
            self._peak = {}

    def _names_the_module_logs(self, trainer: L.Trainer) -> frozenset[str]:
        """The names of :data:`METRICS` and the summary's metrics that the module (or another hook than the callbacks'
        ``on_train_batch_end``) logged in this batch itself: a name logged twice reaches the logger with one value,
        ours, silently. The monitor leaves such a name to the module, said in one warning."""
        results = trainer._results  # Lightning's results of this loop, keyed "<hook>.<name>"
        logged = {key.split(".", 1)[1] for key in (results.keys() if results is not None else ())
                  if "." in key and not key.startswith("on_train_batch_end.")}
        taken = frozenset(logged & ({m.name for m in METRICS} | set(SUMMARY_METRICS)))
        if taken:
            names = ", ".join(sorted(taken))
            rank_zero_warn(f"{self._reporter}: the module logs {names} itself, as the monitor would; the monitor "
                           "leaves the name to the module and does not log its own value (it would replace the "
                           "module's in the logger, silently). Rename the module's metric to see both.",
                           category=LowMemWarning)
        return taken

    # ------------------------------------------------------------------ report
    def _report(self, trainer: L.Trainer) -> None:
        self._flush_losses()
        memories = [state_memory(opt) for opt in self.optimizers]
        total = StateMemory(
            sum(m.total_bytes for m in memories), sum(m.device_bytes for m in memories),
            sum(m.host_bytes for m in memories), sum(m.num_params for m in memories),
        )
        peak = max(self._max_state_bytes, total.total_bytes)
        sharded = any(is_dtensor(p) for opt in self.optimizers for g in opt.param_groups for p in g["params"])
        self.summary = summary_dict(  # the global step: a resumed run counts the checkpoint's steps too
            self._optimizer_name(), total, peak, adamw_fp32_state_bytes(self.optimizers), trainer.global_step,
            sharded, reporter=self._reporter,
        )
        self.summary["steps_this_run"] = len(self.history.steps)
        self.summary["resumed"] = self._resumed  # False: a later step count from an earlier fit of this Trainer
        self.summary.update(small_tensor_summary(self.optimizers))  # why tensors under 4096 elements cost more
        self._skips.check(trainer, self._reporter)
        self.summary.update(self._skips.summary())
        self._lost.final(self.optimizers, trainer.lightning_module)
        self.summary.update(self._lost.summary())
        if self.log_state_memory:
            log_summary(trainer, self.summary, skip=self._taken or frozenset())
        plot_path = None
        if self.plot:
            log_dir = self._log_dir  # asked at fit start (on_fit_start)
            if trainer.is_global_zero and log_dir:
                try:
                    plot_path = write_plot(f"{log_dir}/state_memory.png", self.history, self.summary)
                except Exception as err:  # noqa: BLE001 - a plot is never worth the run
                    rank_zero_warn(f"{self._reporter}: could not write the plot {log_dir}/state_memory.png: "
                                   f"{type(err).__name__}: {err}", category=LowMemWarning)
        self.summary["plot"] = plot_path
        self.summary["checkpoint_note"] = no_checkpoint_note(trainer)
        if self.print_summary and not trainer.barebones:
            rank_zero_info(format_summary(self.summary, plot_path))


def no_checkpoint_note(trainer: L.Trainer) -> str | None:
    """Two summary lines when a ``ModelCheckpoint`` of ``trainer`` (``save_top_k`` not 0) is on but this fit wrote
    (and resumed from) no checkpoint, naming when it saves (every ``every_n_train_steps`` steps, or after validation,
    every ``val_check_interval`` steps): a run shorter than that writes none, and ``lowmem export`` /
    ``--ckpt_path last`` then find none. ``None`` otherwise (and under ``fast_dev_run``, which Lightning says saves
    nothing)."""
    callbacks = [cb for cb in trainer.checkpoint_callbacks if getattr(cb, "save_top_k", 1) != 0]
    if not callbacks or trainer.global_step == 0 or trainer.fast_dev_run:
        return None
    if any(getattr(cb, "best_model_path", "") or getattr(cb, "last_model_path", "") for cb in callbacks):
        return None
    every = getattr(callbacks[0], "_every_n_train_steps", 0) or 0
    interval = trainer.val_check_interval
    if every > 0:
        first, second = f"every {every:,}", "steps (every_n_train_steps), which"
    elif isinstance(interval, int) and not isinstance(interval, bool):
        first, second = "after validation", f"(every {interval:,} steps here), which"
    else:
        first, second = "after validation,", "which"
    return (f"  no checkpoint written: ModelCheckpoint saves {first}\n"
            f"  {second} these {trainer.global_step:,} steps never reached")


def _class_or_none(name: str):
    try:
        return optimizer_class(name)
    except (ImportError, ValueError):  # an optional optimizer that cannot be imported here
        return None


def _validation_loss(metrics: dict) -> tuple[str, float] | None:
    """``(name, value)`` of the validation loss among ``trainer.callback_metrics``: ``val_loss``,
    ``val/loss``, else the first finite scalar whose name has ``val`` and ``loss``."""
    names = [n for n in ("val_loss", "val/loss") if n in metrics]
    names += [n for n in metrics if "val" in n and "loss" in n and n not in names]
    for name in names:
        value = metrics[name]
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = float(value)
        if isinstance(value, (int, float)) and math.isfinite(value):
            return name, float(value)
    return None
