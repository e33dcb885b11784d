"""LowMemOptimizerCallback: put a low-memory optimizer into any Lightning project, and log its state.

Add it to the Trainer; nothing in the LightningModule changes::

    trainer = L.Trainer(callbacks=[LowMemOptimizerCallback("adamw_8bit", lr=3e-4)])

How the swap works. Every strategy (single device, DDP, FSDP, DeepSpeed) gets its optimizers by
calling the module's ``configure_optimizers`` from ``strategy.setup`` — after the model has been
converted to the precision's dtype, moved to its device and wrapped (DDP), and before
``on_fit_start``. So in ``setup("fit")``, which runs just before ``strategy.setup``, the callback wraps
the module's ``configure_optimizers`` (on the instance only, undone in ``teardown``): the module's
own method runs, and each optimizer it returned is rebuilt as the chosen one over the same param
groups (trainable params only), with its LR schedulers retargeted (see
:mod:`lowmem_lightning.callbacks.swap`). The strategy then sets up our optimizer exactly as it would
have set up the original, and checkpoint restore (which comes after ``on_fit_start``) loads into it.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lowmem_lightning.callbacks.report import (
    StateHistory,
    adamw_fp32_state_bytes,
    format_summary,
    summary_dict,
    write_plot,
)
from lowmem_lightning.callbacks.resume import save_on_sigterm, warn_if_not_resumable
from lowmem_lightning.callbacks.swap import (
    LR_KEYS,
    find_optimizers,
    find_schedulers,
    rebuild_param_groups,
    replace_optimizers,
    retarget_scheduler,
)
from lowmem_lightning.modules.base import validate_optimizer_args
from lowmem_lightning.optim import build_optimizer, optimizer_class, state_memory
from lowmem_lightning.optim.sharding import is_dtensor

__all__ = ["LowMemOptimizerCallback", "CONVERSIONS"]

MIB = 2**20

CONVERSIONS: frozenset[tuple[str, str]] = frozenset({("adamw", "adamw_8bit"), ("adamw", "paged_adamw_8bit")})
"""``(checkpoint optimizer, new optimizer)`` pairs whose states the new optimizer converts on load."""

_PACKAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_PEAK_PREFIXES = ("optim/state_", "memory/")  # metrics logged as the max since the last logged step


class _SwappingConfigureOptimizers:
    """Stands in for ``module.configure_optimizers`` during a fit: runs the original, then swaps."""

    def __init__(self, callback: LowMemOptimizerCallback, module: L.LightningModule, previous):
        self.callback = callback
        self.module = module
        self.previous = previous  # an instance attribute the module already had, else None

    def original(self):
        if self.previous is not None:
            return self.previous()
        return type(self.module).configure_optimizers(self.module)

    def __call__(self):
        return self.callback._swap(self.module, self.original())


class LowMemOptimizerCallback(L.Callback):
    """Replace the optimizers of any LightningModule with a low-memory one and log its state memory.

    On fit, every optimizer the module's ``configure_optimizers`` returns is rebuilt as ``optimizer``
    over the same param groups and per-group settings (``lr``, ``weight_decay``, customised keys),
    trainable params only (frozen params get no state). LR schedulers keep working and drive the new
    optimizer; with ``lr`` set, every group's LR and every scheduler's base LR are rescaled so that
    ``lr`` is the new base. A module whose ``configure_optimizers`` returns ``None`` gets one optimizer
    over all its trainable params.

    At every optimizer step it measures :func:`~lowmem_lightning.optim.state_memory` and logs, through
    the Trainer's loggers and at the Trainer's ``log_every_n_steps``, the maximum since the last logged
    step (so no spike is hidden) of: ``optim/state_MiB`` (also on the progress bar),
    ``optim/state_bytes_per_param``; for paged optimizers ``optim/state_MiB_device`` and
    ``optim/state_MiB_host``; on CUDA ``memory/allocated_MiB`` and ``memory/max_allocated_MiB``.
    It also logs the latest ``optim/effective_lr`` when the optimizer computes its step size
    (Adafactor, CAME: the largest over param groups) and, at logged steps, ``optim/skipped_updates``
    (tensor updates skipped so far for inf/NaN gradients). At the end of fit it prints a summary (state
    memory, bytes/param, saving vs fp32 AdamW on the same params; also in :attr:`summary`) and writes
    ``state_memory.png`` into the log dir when matplotlib is installed: state MiB per step (device and
    host for paged optimizers) against fp32 AdamW's, with the training and validation loss.

    Checkpoints carry the optimizers' (quantized) states; resuming with a different optimizer than
    the checkpoint's raises ``ValueError`` before any step, unless the new optimizer converts that
    state (fp32 ``adamw`` -> ``adamw_8bit``/``paged_adamw_8bit``). On SIGTERM (preemption) it saves
    ``last.ckpt`` into the ``ModelCheckpoint`` directory at the end of the current step before
    Lightning stops the run (:mod:`~lowmem_lightning.callbacks.resume`); when the run checkpoints and
    a training dataloader cannot save its position, it warns once that mid-epoch resume will not be
    exact. A failure to write the plot or print the summary is a warning naming the path and the
    error, never a failed fit.

    Args:
        optimizer: Registered optimizer name (``lowmem_lightning.optim.available_optimizers()``).
        lr: New base learning rate; ``None`` keeps the module's, except for an optimizer that computes
            its own step size (``adafactor``/``came`` with their default ``lr=None``), which then gets
            no lr (and a module LR scheduler is refused with a ``ValueError``).
        weight_decay: Weight decay for every param group (groups the module left at 0 while others
            decay stay at 0); ``None`` keeps the module's per-group values.
        optimizer_kwargs: Extra constructor arguments for the optimizer, e.g. ``{"betas": [0.9, 0.95]}``;
            they override per-group values. Must not repeat ``lr`` or ``weight_decay``.
        log_state_memory: Log the per-step metrics above.
        plot: Write ``state_memory.png`` (state MiB per step against fp32 AdamW's, train and val loss)
            into the log dir at the end of fit.
        print_summary: Print the end-of-fit summary (rank 0).
    """

    def __init__(
        self,
        optimizer: str = "adamw_8bit",
        lr: float | None = None,
        weight_decay: float | None = None,
        optimizer_kwargs: dict | None = None,
        log_state_memory: bool = True,
        plot: bool = True,
        print_summary: bool = True,
    ) -> None:
        kwargs, defaults = validate_optimizer_args(optimizer, lr, weight_decay, optimizer_kwargs)
        self.optimizer_name = optimizer
        self.lr = None if lr is None else float(lr)
        self.weight_decay = None if weight_decay is None else float(weight_decay)
        self.optimizer_kwargs = kwargs
        self.log_state_memory = bool(log_state_memory)
        self.plot = bool(plot)
        self.print_summary = bool(print_summary)
        self._defaults = defaults
        self.optimizers: list[torch.optim.Optimizer] = []
        """The optimizers built for the current (or last) fit."""
        self.summary: dict | None = None
        """End-of-fit numbers (MiB, bytes/param, saving vs fp32 AdamW); ``None`` before a fit ends."""
        self._patched: tuple[L.LightningModule, object] | None = None
        self._reset_history()

    # ------------------------------------------------------------------ swap
    def _explicit_kwargs(self) -> dict:
        extra = dict(self.optimizer_kwargs)
        if self.lr is not None:
            extra["lr"] = self.lr
        if self.weight_decay is not None:
            extra["weight_decay"] = self.weight_decay
        return extra

    def _check_dtypes(self, trainer: L.Trainer | None, params: list[torch.Tensor]) -> None:
        cls = optimizer_class(self.optimizer_name)
        if not cls.__module__.startswith("lowmem_lightning."):
            return
        allowed = tuple(getattr(cls, "_param_dtypes", _PACKAGE_DTYPES))
        bad = sorted({str(p.dtype) for p in params if p.dtype not in allowed})
        if bad:
            precision = getattr(trainer, "precision", None) if trainer is not None else None
            raise ValueError(
                f"Invalid optimizer={self.optimizer_name!r} for precision={precision!r}: it gives {', '.join(bad)} "
                f"params, and {cls.__name__} updates only {', '.join(str(d) for d in allowed)} params. Use "
                "precision '32-true', 'bf16-mixed', '16-mixed', 'bf16-true' or '16-true'."
            )

    def _build(self, trainer, groups) -> torch.optim.Optimizer:
        params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
        if not params:
            raise ValueError(
                f"LowMemOptimizerCallback(optimizer={self.optimizer_name!r}): the module has no trainable "
                "parameters (requires_grad=True); there is nothing to optimize."
            )
        self._check_dtypes(trainer, params)
        return build_optimizer(self.optimizer_name, groups, **self._explicit_kwargs())

    def _swap(self, module: L.LightningModule, config):
        """Rebuild every optimizer in ``config`` (a ``configure_optimizers`` result) and retarget its
        schedulers; returns a config of the same shape."""
        trainer = module._trainer
        olds = find_optimizers(config)
        if not olds:
            new = self._build(trainer, [p for p in module.parameters() if p.requires_grad])
            self.optimizers = [new]
            return new
        schedulers = find_schedulers(config)
        # computes its own step size (Adafactor's relative step); CAME with lr=None takes the module's lr
        own_step = self.lr is None and self._defaults.get("lr") is None and bool(self._defaults.get("relative_step"))
        if own_step and schedulers:
            raise ValueError(
                f"LowMemOptimizerCallback(optimizer={self.optimizer_name!r}) computes its own step size "
                f"(its lr is None), so the module's LR scheduler ({type(schedulers[0]).__name__}) cannot drive it. "
                "Give an lr (and, for adafactor, optimizer_kwargs={'relative_step': False}) to keep the schedule."
            )
        mapping, ratios = {}, {}
        for old in olds:
            groups, group_ratios = rebuild_param_groups(
                old, self._defaults, lr=self.lr, weight_decay=self.weight_decay,
                fixed_keys=frozenset(self.optimizer_kwargs),
            )
            if own_step:  # the optimizer computes its step size: the module's lr must not reach it
                groups = [{k: v for k, v in g.items() if k not in LR_KEYS} for g in groups]
            mapping[id(old)] = self._build(trainer, groups)
            ratios[id(old)] = group_ratios
        for scheduler in schedulers:
            key = id(scheduler.optimizer)
            if key in mapping:
                retarget_scheduler(scheduler, mapping[key], ratios[key])
        self.optimizers = list(mapping.values())
        return replace_optimizers(config, mapping)

    def _patch(self, module: L.LightningModule) -> None:
        self._unpatch()
        previous = module.__dict__.get("configure_optimizers")
        module.configure_optimizers = _SwappingConfigureOptimizers(self, module, previous)
        self._patched = (module, previous)

    def _unpatch(self) -> None:
        if self._patched is None:
            return
        module, previous = self._patched
        if previous is None:
            module.__dict__.pop("configure_optimizers", None)
        else:
            module.configure_optimizers = previous
        self._patched = None

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Wrap ``configure_optimizers`` for this fit (the strategy calls it next)."""
        if stage == "fit":
            _check_strategy(trainer.strategy, self.optimizer_name)
            self.optimizers = []
            self.summary = None
            self._patch(pl_module)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Give the module its own ``configure_optimizers`` back."""
        self._unpatch()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Undo the wrap when fit fails (Lightning skips ``teardown`` then). When Lightning stops the run
        for a SIGTERM that came after this callback's step-end check (during validation or a later
        callback), save the checkpoint now, at the step end where the run stopped."""
        try:
            if isinstance(exception, SIGTERMException) and trainer.state.stage == "train":
                self._save_on_sigterm(trainer)
        finally:
            self._unpatch()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Check the strategy built its optimizers through the module (so they are ours)."""
        if not self.optimizers:
            raise RuntimeError(
                f"LowMemOptimizerCallback: the strategy {type(trainer.strategy).__name__} set up its optimizers "
                "without calling the module's configure_optimizers, so the optimizer could not be replaced."
            )
        self._reset_history()
        self._last_global_step = trainer.global_step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Warn once when mid-epoch resume cannot be exact (a training dataloader without state)."""
        warn_if_not_resumable(trainer)

    # ------------------------------------------------------------------ logging
    def _reset_history(self) -> None:
        self._peak: dict[str, float] = {}
        self._steps: list[int] = []
        self._state_mib: list[float] = []
        self._host_mib: list[float] = []
        self._losses: list[float | None] = []
        self._val_losses: list[tuple[int, float]] = []
        self._val_name = "val_loss"
        self._pending_losses: list[tuple[int, torch.Tensor]] = []
        self._max_state_bytes = 0
        self._last_global_step = -1

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
        """Current metrics of the built optimizers (state memory summed over them), as logged per step.

        ``allow_sync=False`` leaves out values that need a device sync (an effective LR held only as a
        device tensor); the callback reads those at logged steps only."""
        memories = [state_memory(opt) for opt in self.optimizers]
        total = sum(m.total_bytes for m in memories)
        num_params = sum(m.num_params for m in memories)
        self._max_state_bytes = max(self._max_state_bytes, total)
        metrics = {
            "optim/state_MiB": total / MIB,
            "optim/state_bytes_per_param": total / num_params if num_params else 0.0,
        }
        if any(getattr(opt, "is_paged", False) for opt in self.optimizers):
            metrics["optim/state_MiB_device"] = sum(m.device_bytes for m in memories) / MIB
            metrics["optim/state_MiB_host"] = sum(m.host_bytes for m in memories) / MIB
        effective = self._effective_lr(allow_sync)
        if effective is not None:
            metrics["optim/effective_lr"] = effective
        device = self._device()
        if device is not None and device.type == "cuda":
            metrics["memory/allocated_MiB"] = torch.cuda.memory_allocated(device) / MIB
            metrics["memory/max_allocated_MiB"] = torch.cuda.max_memory_allocated(device) / MIB
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
            self._pending_losses.append((len(self._losses), loss.detach().float().reshape(())))
        self._losses.append(None)
        if len(self._pending_losses) >= 64:
            self._flush_losses()

    def _flush_losses(self) -> None:
        """Copy recorded losses to the host with one transfer (no sync per step)."""
        if not self._pending_losses:
            return
        values = torch.stack([loss for _, loss in self._pending_losses]).cpu().tolist()
        for (index, _), value in zip(self._pending_losses, values):
            self._losses[index] = value if math.isfinite(value) else None
        self._pending_losses = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        """After an optimizer step: measure, keep the max since the last logged step, log it; after
        SIGTERM, save a resumable checkpoint (Lightning then stops the run)."""
        self._log_step(trainer, pl_module, outputs)
        self._save_on_sigterm(trainer)

    def _save_on_sigterm(self, trainer: L.Trainer) -> None:
        if getattr(self, "_sigterm_saved_at", None) != trainer.global_step and save_on_sigterm(trainer):
            self._sigterm_saved_at = trainer.global_step

    def _log_step(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs) -> None:
        if trainer.global_step == self._last_global_step:
            return  # accumulating gradients: no optimizer step in this batch
        self._last_global_step = trainer.global_step
        will_log = self._will_log(trainer)
        metrics = self.measure(allow_sync=will_log)
        self._steps.append(trainer.global_step)
        self._state_mib.append(metrics["optim/state_MiB"])
        self._host_mib.append(metrics.get("optim/state_MiB_host", 0.0))
        self._record_loss(trainer, outputs)
        if not self.log_state_memory:
            return
        for key, value in metrics.items():
            keep_max = key.startswith(_PEAK_PREFIXES)
            self._peak[key] = max(self._peak.get(key, value), value) if keep_max else value
        to_logger = bool(trainer.loggers)
        for key, value in self._peak.items():
            pl_module.log(key, value, on_step=True, on_epoch=False, prog_bar=key == "optim/state_MiB",
                          logger=to_logger, batch_size=1)
        if will_log:
            skipped = [opt.skipped_updates for opt in self.optimizers if hasattr(opt, "skipped_updates")]
            if skipped:
                pl_module.log("optim/skipped_updates", float(sum(skipped)), on_step=True, on_epoch=False,
                              logger=to_logger, batch_size=1)
            self._peak = {}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Record the validation loss of this run (for the plot), at the current optimizer step."""
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        found = _validation_loss(trainer.callback_metrics)
        if found is not None:
            self._val_name = found[0]
            self._val_losses.append((trainer.global_step, found[1]))

    def _history(self) -> StateHistory:
        return StateHistory(self._steps, self._state_mib, self._host_mib, self._losses, self._val_losses,
                            self._val_name)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Summary (state memory, bytes/param, saving vs fp32 AdamW) and the PNG, on rank 0. A failure
        to write or print them is a warning (naming the path and the error), so fit still completes."""
        if not self.optimizers:
            return
        try:
            self._report(trainer)
        except Exception as err:  # noqa: BLE001 - the report is optional; the trained model is not
            where = getattr(err, "filename", None) or "the console"
            rank_zero_warn(f"LowMemOptimizerCallback: could not write the end-of-fit summary to {where}: "
                           f"{type(err).__name__}: {err}")

    def _report(self, trainer: L.Trainer) -> None:
        self._flush_losses()
        memories = [state_memory(opt) for opt in self.optimizers]
        total = type(memories[0])(
            sum(m.total_bytes for m in memories), sum(m.device_bytes for m in memories),
            sum(m.host_bytes for m in memories), sum(m.num_params for m in memories),
        )
        peak = max(self._max_state_bytes, total.total_bytes)
        sharded = any(is_dtensor(p) for opt in self.optimizers for g in opt.param_groups for p in g["params"])
        self.summary = summary_dict(
            self.optimizer_name, total, peak, adamw_fp32_state_bytes(self.optimizers), len(self._steps), sharded
        )
        plot_path = None
        if self.plot:
            log_dir = trainer.log_dir  # a broadcast under DDP: every rank must ask
            if trainer.is_global_zero and log_dir:
                try:
                    plot_path = write_plot(f"{log_dir}/state_memory.png", self._history(), self.summary)
                except Exception as err:  # noqa: BLE001 - a plot is never worth the run
                    rank_zero_warn(f"LowMemOptimizerCallback: could not write the plot {log_dir}/state_memory.png: "
                                   f"{type(err).__name__}: {err}")
        self.summary["plot"] = plot_path
        if self.print_summary:
            rank_zero_info(format_summary(self.summary, plot_path))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """What goes into checkpoints: the optimizer name and classes, to check a resume against."""
        return {
            "optimizer": self.optimizer_name,
            "classes": [f"{type(o).__module__}.{type(o).__qualname__}" for o in self.optimizers],
        }

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """Refuse (``ValueError``, before any step) to resume from a checkpoint of another optimizer,
        unless this one converts its state."""
        saved = (checkpoint.get("callbacks") or {}).get(self.state_key)
        name = saved.get("optimizer") if isinstance(saved, dict) else _infer_optimizer(checkpoint)
        if name is None or name == self.optimizer_name:
            return
        if (name, self.optimizer_name) in CONVERSIONS:
            rank_zero_info(
                f"LowMemOptimizerCallback: converting the checkpoint's {name!r} optimizer state to "
                f"{self.optimizer_name!r}."
            )
            return
        raise ValueError(
            f"Cannot resume: the checkpoint was trained with optimizer {name!r}, but "
            f"LowMemOptimizerCallback(optimizer={self.optimizer_name!r}) was given and cannot read its state. "
            f"Resume with optimizer={name!r}, or load only the weights (e.g. "
            "Module.load_from_checkpoint(path) and a new fit without ckpt_path) to switch optimizers."
        )


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


def _infer_optimizer(checkpoint: dict) -> str | None:
    """``"adamw"`` when the checkpoint's optimizer states look like torch Adam/AdamW, else ``None``."""
    states = checkpoint.get("optimizer_states") or []
    keys = set()
    for state in states:
        for per_param in (state.get("state") or {}).values():
            keys |= set(per_param)
    if keys and {"exp_avg", "exp_avg_sq", "step"} <= keys <= {"exp_avg", "exp_avg_sq", "step", "max_exp_avg_sq"}:
        return "adamw"
    return None


_WHOLE_TENSOR_OPTIMIZERS = ("adafactor", "came")
"""Optimizers whose update needs statistics over whole tensors (row/column means, RMS)."""


def _check_strategy(strategy, optimizer_name: str) -> None:
    """Refuse, before any work, a factored optimizer under FSDP1 (``strategy="fsdp"``).

    FSDP1 hands the optimizer flat 1-D slices of its flattened params, so Adafactor/CAME would factor
    nothing and take their RMS over a slice: a different algorithm, silently. FSDP2 (Lightning's
    ``ModelParallelStrategy`` + ``fully_shard``) hands over DTensors, whose statistics the optimizers
    complete across ranks.
    """
    try:
        from lightning.pytorch.strategies import FSDPStrategy
    except ImportError:  # pragma: no cover - every supported Lightning has it
        return
    if isinstance(strategy, FSDPStrategy) and optimizer_name in _WHOLE_TENSOR_OPTIMIZERS:
        raise ValueError(
            f"Invalid optimizer={optimizer_name!r} with strategy=FSDPStrategy (FSDP1): it shards flattened "
            "params, so Adafactor/CAME would see 1-D slices instead of whole matrices. Use "
            "ModelParallelStrategy with fully_shard in configure_model (FSDP2), or an element-wise optimizer "
            "(adamw_8bit, paged_adamw_8bit, sgd, adamw)."
        )
