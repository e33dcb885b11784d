"""LowMemOptimizerCallback: put a low-memory optimizer into any Lightning project, and log its state.

Add it to the Trainer; nothing in the LightningModule changes::

    trainer = L.Trainer(callbacks=[LowMemOptimizerCallback("adamw_8bit", lr=3e-4)])

Its own job is the swap. Every strategy (single device, DDP, FSDP, DeepSpeed) gets its optimizers by
calling the module's ``configure_optimizers`` from ``strategy.setup`` — after the model has been
converted to the precision's dtype, moved to its device and wrapped (DDP), and before
``on_fit_start``. So in ``setup("fit")``, which runs just before ``strategy.setup``, the callback wraps
the module's ``configure_optimizers`` (on the instance only, undone in ``teardown``): the module's
own method runs, and each optimizer it returned is rebuilt as the chosen one over the same param
groups, with its LR schedulers retargeted (:mod:`lowmem_lightning.callbacks.swap`). The strategy then
sets up our optimizer exactly as it would have set up the original, and checkpoint restore (which comes
after ``on_fit_start``) loads into it.

Every other job is a callback of its own, which ``setup`` puts into ``trainer.callbacks`` right after
this one (:attr:`LowMemOptimizerCallback.parts`), so the Trainer calls each of their hooks itself, as it
does for any callback (a forwarder would have to know every hook; a part in ``trainer.callbacks`` is seen,
ordered and checkpointed by Lightning like the user's own): :class:`~.strategy_check.FSDP1Check`,
:class:`~.release.GradientReleaseCallback` (``step_in_backward``), :class:`~.monitor.StateMemoryMonitor`,
:class:`~.preemption.PreemptionCheckpoint`, :class:`~.interrupt.InterruptAtStepEnd` (a Ctrl+C inside a training
step stops the fit when that step is done), :class:`~.resume.ResumeCompatibility` and
:class:`~.clip_norm.ClipNormReuse` (norm clipping hands its norm to our optimizer's finite check) and
:class:`~.rotary.KeepRotaryFp32` (a Hugging Face model's rotary frequencies back in fp32 after a bf16 cast) and
:class:`~.train_mode.CheckpointingModeCheck` (a warning when gradient checkpointing is on in modules in eval mode) and
:class:`~.averaging.AverageSharesFrozen` (a weight average shares, not copies, the frozen base).
"""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lowmem_lightning.callbacks.averaging import AverageSharesFrozen, serve_weight_averaging
from lowmem_lightning.callbacks.clip_norm import ClipNormReuse
from lowmem_lightning.callbacks.frozen_checkpoint import LeaveOutFrozenBase
from lowmem_lightning.callbacks.interrupt import InterruptAtStepEnd
from lowmem_lightning.callbacks.lr_tools import drop_tuner_finders, lr_find_refusal, own_step_refusal
from lowmem_lightning.callbacks.model_summary import count_nf4_in_model_summaries
from lowmem_lightning.callbacks.monitor import StateMemoryMonitor
from lowmem_lightning.callbacks.param_checks import averaged_codes_refusal, unsupported_params, upcast_frozen_note
from lowmem_lightning.callbacks.preemption import PreemptionCheckpoint
from lowmem_lightning.callbacks.release import DEFAULT_BUCKET_BYTES, GradientReleaseCallback
from lowmem_lightning.callbacks.resume import ResumeCompatibility
from lowmem_lightning.callbacks.rng_state import RngStateCheckpoint
from lowmem_lightning.callbacks.rotary import KeepRotaryFp32
from lowmem_lightning.callbacks.run_record import optimizer_hparams, record_hparams
from lowmem_lightning.callbacks.skips import STOP_AFTER_SKIPPED_STEPS
from lowmem_lightning.callbacks.strategy_check import FSDP1Check
from lowmem_lightning.callbacks.swap import (
    LR_KEYS,
    expand_scheduler_groups,
    find_optimizers,
    find_schedulers,
    momentum_schedulers,
    momentum_slot,
    rebuild_param_groups,
    replace_optimizers,
    retarget_scheduler,
)
from lowmem_lightning.callbacks.train_mode import CheckpointingModeCheck
from lowmem_lightning.callbacks.translate import translate_group
from lowmem_lightning.lowmem_warning import LowMemWarning
from lowmem_lightning.optim import build_optimizer, optimizer_class
from lowmem_lightning.optim.registry import optimizer_keywords
from lowmem_lightning.optim.state_precision import (
    check_fp32_state,
    fp32_state_params,
    split_param_groups,
    unmatched_message,
)
from lowmem_lightning.optim.validation import check_bf16_rounding, validate_optimizer_args

__all__ = ["LowMemOptimizerCallback", "keep_scheduler_names", "lr_kind"]

_PACKAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def lr_kind(cls: type) -> str:
    """``"SGD"`` when the optimizer class's lr scales the raw gradient (torch's ``SGD``/``ASGD``, our ``sgd``), else
    ``"adaptive"`` (the lr is the size of a normalized step: Adam and its kin, Adafactor, CAME, Lion, Muon, ...).
    The two take learning rates orders of magnitude apart."""
    return "SGD" if issubclass(cls, (torch.optim.SGD, torch.optim.ASGD, optimizer_class("sgd"))) else "adaptive"


_LR_MEANS = {"SGD": "scales the raw gradient", "adaptive": "is the size of a normalized step"}


def _takes(optimizer: str, argument: str) -> bool:
    """Whether the registered optimizer ``optimizer``'s constructor takes ``argument``."""
    return argument in optimizer_keywords(optimizer)


def _with_bf16_rounding(optimizer: str, optimizer_kwargs, bf16_rounding: str | None):
    """``optimizer_kwargs`` with the callback's ``bf16_rounding`` added; ``ValueError`` naming it for a value other
    than "stochastic"/"nearest", an optimizer that does not take it, or one also given in ``optimizer_kwargs``."""
    if bf16_rounding is None:
        return optimizer_kwargs
    check_bf16_rounding(bf16_rounding)
    if isinstance(optimizer, str) and not _takes(optimizer, "bf16_rounding"):
        raise ValueError(
            f"Invalid bf16_rounding={bf16_rounding!r} for optimizer={optimizer!r}: "
            f"{getattr(optimizer_class(optimizer), '__name__', optimizer)} does not take it (it is not one of this "
            "package's optimizers, which write bf16/fp16 params with it); leave bf16_rounding unset."
        )
    if isinstance(optimizer_kwargs, dict) and "bf16_rounding" in optimizer_kwargs:
        raise ValueError(
            f"Invalid bf16_rounding={bf16_rounding!r}: optimizer_kwargs gives bf16_rounding="
            f"{optimizer_kwargs['bf16_rounding']!r} too; give it once."
        )
    return {**(optimizer_kwargs or {}), "bf16_rounding": bf16_rounding}


def _check_bucket_bytes(bucket_bytes, step_in_backward: bool) -> int:
    """The release's bucket size: ``DEFAULT_BUCKET_BYTES`` for ``None``; ``ValueError`` naming it for anything but
    an int >= 0, or for one given without ``step_in_backward=True`` (it would do nothing)."""
    if bucket_bytes is None:
        return DEFAULT_BUCKET_BYTES
    if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 0:
        raise ValueError(f"Invalid bucket_bytes={bucket_bytes!r}: expected an int >= 0 (bytes of gradients updated "
                         "together inside backward; 0: each tensor alone) or None (25 MiB).")
    if not step_in_backward:
        raise ValueError(f"Invalid bucket_bytes={bucket_bytes!r} with step_in_backward=False: buckets are the "
                         "gradient release's; set step_in_backward=True, or leave bucket_bytes unset.")
    return bucket_bytes


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
    over the same param groups, frozen params included (they get no state until they receive a
    gradient, so a param unfrozen later, as fine-tuning schedules do, trains as under the module's own
    optimizer). Per-group settings are translated by meaning (:mod:`~lowmem_lightning.callbacks.translate`:
    AdamW's ``betas[0]`` becomes SGD's ``momentum``, CAME's ``betas[0]``, Adafactor's ``beta1``, ...);
    one warning per fit names every chosen setting that was dropped or changes meaning (coupled L2 ->
    decoupled weight decay, ``amsgrad``, ``nesterov``, ...). A setting left at the module optimizer's
    default takes the new optimizer's own default, so an LLM's ``AdamW(betas=(0.9, 0.95))`` becomes
    ``adamw_4bit`` ``(0.9, 0.95)``, ``ademamix`` ``(0.9, 0.95, 0.9999)`` (the slow EMA and ``alpha`` keep
    AdEMAMix's defaults), ``lion`` ``(0.9, 0.99)`` (Lion keeps no second moment: its ``betas[1]`` is the momentum's
    own decay; AdamW's 0.95 is dropped, warned) and ``muon`` ``momentum=0.95`` with ``adamw_betas=(0.9, 0.95)``
    for the params its AdamW part updates; a chosen ``betas[0]`` (0.8) becomes Lion's ``betas[0]`` and Muon's
    ``momentum``. The lr is carried as it is; into ``lion``/``muon`` (and out of them) the warning says how the
    same lr moves the params differently and what to set (Lion: the paper's 3-10x smaller lr; Muon:
    ``optimizer_kwargs={"adjust_lr_fn": "match_rms_adamw"}`` keeps AdamW's lr and weight decay meaningful). For
    Muon the warning also says when no trainable param takes the Muon update, and that a momentum-cycling
    scheduler cycles only Muon's ``momentum``, not its AdamW part's ``adamw_betas[0]``. LR schedulers keep working
    and drive the
    new optimizer (``OneCycleLR``/``CyclicLR`` cycling momentum drive its ``betas[0]`` or ``momentum``;
    refused with a ``ValueError`` before training when it has neither); with ``lr`` set, every group's
    LR and every scheduler's base LR are rescaled so that ``lr`` is the new base. Scheduler configs keep
    the metric names Lightning's ``LearningRateMonitor`` gave them with the module's optimizer
    (``lr-AdamW``). A module whose ``configure_optimizers`` returns ``None`` gets one optimizer over all
    its trainable params.

    At ``setup`` it puts its :attr:`parts` into ``trainer.callbacks`` right after itself, each a callback with
    one job: refuse ``adafactor``/``came`` under FSDP1; with ``step_in_backward``, the gradient-release
    lifecycle; log the state memory of the built optimizers per step, print a summary and write
    ``state_memory.png`` at the end of fit (:attr:`monitor`, a
    :class:`~lowmem_lightning.callbacks.StateMemoryMonitor`: its docstring lists the metrics); save
    ``last.ckpt`` on SIGTERM at a step end all ranks agree on (:mod:`~lowmem_lightning.callbacks.preemption`);
    stop a fit Ctrl+C interrupts inside a training step when that step is done, so the interrupted model and
    optimizer are a step's and a checkpoint saved then resumes exactly (:mod:`~lowmem_lightning.callbacks.interrupt`);
    refuse, before any step, to resume a checkpoint of another optimizer than this one unless it converts
    that state (every pair of ``adamw``, ``adamw_8bit``, ``paged_adamw_8bit``, ``adamw_4bit``; ``lion``, ``ademamix``,
    ``muon`` <-> their ``_8bit`` variants), and apply a new ``lr`` at resume
    (:mod:`~lowmem_lightning.callbacks.resume`); give a Hugging Face model's rotary position frequencies back their
    fp32 values after a ``bf16-true`` cast (:mod:`~lowmem_lightning.callbacks.rotary`); let a weight-averaging
    callback's average (``EMAWeightAveraging``) share, not copy, what does not train
    (:class:`~lowmem_lightning.callbacks.averaging.AverageSharesFrozen`); with ``checkpoint_frozen=False``, leave the
    frozen base out of checkpoints (:class:`~lowmem_lightning.callbacks.frozen_checkpoint.LeaveOutFrozenBase`).

    Args:
        optimizer: Registered optimizer name (``lowmem_lightning.optim.available_optimizers()``).
        lr: New base learning rate (> 0); ``None`` keeps the module's, except for an optimizer that computes
            its own step size (``adafactor``/``came`` with their default ``lr=None``), which then gets
            no lr (and a module LR scheduler is refused with a ``ValueError``).
        weight_decay: Weight decay for every param group (groups the module left at 0 while others
            decay stay at 0); ``None`` keeps the module's per-group values.
        optimizer_kwargs: Extra constructor arguments for the optimizer, e.g. ``{"betas": [0.9, 0.95]}``;
            they override per-group values. Must not repeat ``lr`` or ``weight_decay``.
        log_state_memory: Log the monitor's per-step metrics.
        plot: Write ``state_memory.png`` (state MiB per step against fp32 AdamW's, train and val loss)
            into the log dir at the end of fit.
        print_summary: Print the end-of-fit summary (rank 0).
        step_in_backward: Gradient release (:mod:`~lowmem_lightning.callbacks.release`): update every
            trainable tensor inside backward as soon as its gradient is accumulated, then free that
            gradient, so no gradient buffer exists. The result equals a normal step's; LR schedulers,
            ``skipped_updates``, logging, checkpoints and resume work unchanged. Clipping by value is
            applied per tensor; clipping by norm runs backward twice per step over the retained graph
            (LOMO: the first pass takes the gradient norms and frees the gradients, the second updates
            with the clipped gradients), which a line logged at fit start says. Refused with a
            ``ValueError`` before training under ``accumulate_grad_batches > 1``, ``16-mixed``, manual
            optimization and multi-process strategies.
        bucket_bytes: With ``step_in_backward``: the gradients ready in backward are updated together, in one
            optimizer call, once they reach this many bytes (an int >= 0; 0 updates each tensor alone, fewest
            gradients alive; ``None``: 25 MiB, DDP's bucket size). ``lowmem estimate`` counts the fullest bucket.
            Refused without ``step_in_backward=True``.
        bf16_rounding: How the optimizer writes bf16/fp16 params: ``"stochastic"`` (small updates survive on
            average) or ``"nearest"``; ``None`` keeps the optimizer's default (``"stochastic"``). Taken by every
            optimizer of this package, not by torch's ``adamw``; not to be repeated in ``optimizer_kwargs``.
        fp32_state: Params whose optimizer state stays 32-bit while the rest is quantized (bitsandbytes'
            ``optim_bits=32`` override; HF Trainer applies it to every ``nn.Embedding`` under a bitsandbytes
            8-bit optimizer): a module class (``torch.nn.Embedding``), its import path (``"torch.nn.Embedding"``,
            as YAML gives it), ``"embeddings"`` (``nn.Embedding`` and ``nn.EmbeddingBag``), a pattern matched against
            param and module names (``"*embed_tokens*"``, ``"lm_head"``), or a list of these. Each param group
            holding such params is split: they move to a group of their own with ``quantize_state=False`` and
            every other key of the group, and LR schedulers get an entry for it (the same schedule). An entry that
            selects no param is warned about once per fit. Taken by every optimizer of this package, not by
            torch's ``adamw``. A checkpoint resumes only with the same ``fp32_state`` (the group count differs).
        stop_after_skipped_steps: Stop the fit, with one message, once every tensor update of this many optimizer
            steps in a row was skipped for inf/NaN gradients (nothing is being trained); an int >= 1 or ``None``
            (never). Skips are also warned about (the first, then each doubling of their count) and counted in
            the end-of-fit summary (:mod:`~lowmem_lightning.callbacks.skips`).
        checkpoint_frozen: Whether the module's checkpoints hold its frozen weights too (default). ``False``, for a
            LoRA / QLoRA / frozen-backbone module: every checkpoint it writes leaves out the frozen tensors unchanged
            since the module was built, with their checksums, and a resume takes them back from the module as the
            run builds it, refused (``ValueError`` naming a tensor) when they differ
            (:mod:`~lowmem_lightning.callbacks.frozen_checkpoint`; ``load_from_checkpoint`` there loads one outside a
            Trainer). Checkpoints stay whole under sharded strategies.

    With ``lr=None`` the module's learning rate is kept; when the swap crosses between SGD and an adaptive
    optimizer (:func:`lr_kind`: their learning rates differ by orders of magnitude), one warning names both
    optimizers and that lr.
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
        step_in_backward: bool = False,
        bucket_bytes: int | None = None,
        bf16_rounding: Literal["stochastic", "nearest"] | None = None,
        fp32_state: str | list[str] | None = None,
        stop_after_skipped_steps: int | None = STOP_AFTER_SKIPPED_STEPS,
        checkpoint_frozen: bool = True,
    ) -> None:
        optimizer_kwargs = _with_bf16_rounding(optimizer, optimizer_kwargs, bf16_rounding)
        self._fp32_state = check_fp32_state(optimizer, fp32_state)
        self.fp32_state = fp32_state
        """The params kept in 32-bit state, as given (None: the optimizer's rule alone)."""
        kwargs, defaults = validate_optimizer_args(optimizer, lr, weight_decay, optimizer_kwargs)
        if lr is not None and float(lr) == 0.0:
            raise ValueError(
                f"Invalid lr={lr!r} for LowMemOptimizerCallback(optimizer={optimizer!r}): expected a number > 0 "
                "(the new base of every param group's and LR scheduler's learning rate: 0 would train nothing) "
                "or None (keep the module's)."
            )
        self.optimizer_name = optimizer
        self.lr = None if lr is None else float(lr)
        self.weight_decay = None if weight_decay is None else float(weight_decay)
        self.optimizer_kwargs = kwargs
        if not isinstance(step_in_backward, bool):
            raise ValueError(f"Invalid step_in_backward={step_in_backward!r}: expected True or False.")
        self.step_in_backward = step_in_backward
        if not isinstance(checkpoint_frozen, bool):
            raise ValueError(f"Invalid checkpoint_frozen={checkpoint_frozen!r}: expected True (checkpoints hold the "
                             "frozen weights too) or False (they leave out those unchanged since the build).")
        self.checkpoint_frozen = checkpoint_frozen
        """Whether checkpoints hold the frozen weights too (``False``: :class:`~.frozen_checkpoint.LeaveOutFrozenBase`
        leaves them out)."""
        self.bucket_bytes = _check_bucket_bytes(bucket_bytes, step_in_backward)
        """Bytes of gradients updated together inside backward (with ``step_in_backward``)."""
        self.bf16_rounding = bf16_rounding
        """How bf16/fp16 params are written (``None``: the optimizer's default); also in ``optimizer_kwargs``."""
        self.monitor = StateMemoryMonitor(log_state_memory, plot, print_summary, stop_after_skipped_steps)
        """The state-memory monitor of the built optimizers (metrics, summary, plot)."""
        self.release = GradientReleaseCallback(self.bucket_bytes) if step_in_backward else None
        """The gradient-release part (``None`` unless ``step_in_backward``)."""
        self.parts: tuple[L.Callback, ...] = (
            FSDP1Check(optimizer),
            *([self.release] if self.release is not None else []),
            self.monitor,
            PreemptionCheckpoint(),
            InterruptAtStepEnd(),
            ResumeCompatibility(optimizer, saved_under=self.state_key),
            ClipNormReuse(),
            KeepRotaryFp32(),
            CheckpointingModeCheck(),
            RngStateCheckpoint(),
            AverageSharesFrozen(),
            LeaveOutFrozenBase(leave_out=not checkpoint_frozen),
        )
        """The callbacks with the other jobs, put into ``trainer.callbacks`` after this one at ``setup``."""
        self.optimizers: list[torch.optim.Optimizer] = []
        """The optimizers built for the current (or last) fit."""
        self._defaults = defaults
        self._patched: tuple[L.LightningModule, object] | None = None
        self._origins: dict[int, type] = {}  # id(new optimizer) -> class of the module's optimizer it replaced

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
        reason = unsupported_params(self.optimizer_name, optimizer_class(self.optimizer_name), params,
                                    self._patched[0] if self._patched is not None else None)
        if reason is not None:
            raise ValueError(reason)
        self._check_dtypes(trainer, [p for p in params if p.requires_grad])
        name_groups = getattr(optimizer_class(self.optimizer_name), "with_param_names", None)
        if name_groups is not None and self._patched is not None:  # Muon: embeddings and head found by name
            groups = name_groups(list(groups), self._patched[0].named_parameters())
        new = build_optimizer(self.optimizer_name, groups, **self._explicit_kwargs())
        if callable(getattr(new, "remember_names", None)) and self._patched is not None:
            new.remember_names(self._patched[0].named_parameters())  # for groups added later (BackboneFinetuning)
        return new

    def _keeps(self, notes: list[str]):
        """``keep(param)`` for :func:`rebuild_param_groups`: trainable params, and frozen ones the new
        optimizer could update once unfrozen; a note names frozen float params it could not."""
        cls = optimizer_class(self.optimizer_name)
        allowed = tuple(getattr(cls, "_param_dtypes", ())) or None
        left_out: dict[str, int] = {}

        def keep(param: torch.Tensor) -> bool:
            if param.requires_grad or (param.is_floating_point() and (allowed is None or param.dtype in allowed)):
                return True
            if param.is_floating_point():  # integer storage (packed NF4 codes) can never be unfrozen
                left_out[str(param.dtype)] = left_out.get(str(param.dtype), 0) + 1
            return False

        def report() -> None:
            for dtype, count in left_out.items():
                notes.append(f"{count} frozen {dtype} param(s) left out: {cls.__name__} cannot update {dtype} "
                             "params, so they would not train if unfrozen later")

        return keep, report

    def _step_sizes(self, old: torch.optim.Optimizer, groups: list[dict], notes: list[str]) -> tuple[list[dict], bool]:
        """Groups whose optimizer computes its own step size (Adafactor's ``relative_step``, no callback lr)
        lose their LR keys (a note names the module's lr); a group left without any lr for an optimizer
        that needs one is refused. Returns the groups and whether any computes its own step size."""
        name, target = self.optimizer_name, optimizer_class(self.optimizer_name).__name__
        own_any = False
        for index, group in enumerate(groups):
            own = self.lr is None and self._defaults.get("lr") is None and bool(
                group.get("relative_step", self._defaults.get("relative_step")))
            if own:
                own_any = True
                if group.get("lr") is not None:
                    notes.append(f"{type(old).__name__} lr={group['lr']!r} dropped: {target} computes its own "
                                 "step size (relative_step=True); give the callback lr=... and "
                                 "optimizer_kwargs={'relative_step': False} to keep a learning rate")
                groups[index] = {k: v for k, v in group.items() if k not in LR_KEYS}
            elif self.lr is None and group.get("lr", self._defaults.get("lr")) is None:
                raise ValueError(
                    f"LowMemOptimizerCallback(optimizer={name!r}) needs a learning rate, and the module's "
                    f"{type(old).__name__} has none (lr=None: it computes its own step size). Give one: "
                    f"LowMemOptimizerCallback({name!r}, lr=...)."
                )
        return groups, own_any

    def _check_momentum_schedulers(self, cycling: list) -> None:
        """Refuse a scheduler that cycles momentum when the new optimizer has no key it can write."""
        cls = optimizer_class(self.optimizer_name)
        if cycling and momentum_slot(cls, self._defaults) is None:
            raise ValueError(
                f"LowMemOptimizerCallback(optimizer={self.optimizer_name!r}): the module's "
                f"{type(cycling[0]).__name__} cycles momentum (cycle_momentum=True), and {cls.__name__} has no "
                "momentum or betas[0] for it to drive. Create the scheduler with cycle_momentum=False, or pick an "
                "optimizer with momentum (adamw_8bit, paged_adamw_8bit, came, sgd, adamw)."
            )

    def _split(self, groups: list, fp32_ids: set[int]) -> tuple[list, list[int]]:
        """``groups`` with the params of ``fp32_ids`` in ``quantize_state=False`` groups, and each new group's source
        index (:func:`~lowmem_lightning.optim.state_precision.split_param_groups`); unchanged without ``fp32_state``."""
        if self._fp32_state is None or not fp32_ids:
            return list(groups), list(range(len(groups)))
        return split_param_groups(groups, fp32_ids)

    def _fp32_ids(self, module: torch.nn.Module) -> set[int]:
        """Ids of ``module``'s params ``fp32_state`` selects; one warning naming every entry that selects none."""
        if self._fp32_state is None:
            return set()
        ids, unmatched = fp32_state_params(module, self._fp32_state)
        if unmatched:
            rank_zero_warn(unmatched_message(type(self).__name__, self.fp32_state, unmatched, module),
                           category=LowMemWarning)
        return ids

    def _rebuild(self, trainer, old: torch.optim.Optimizer, driven: frozenset[str], notes: list[str],
                 fp32_ids: set[int] = frozenset()):
        """The new optimizer for ``old``, its per-group LR factors, whether it computes its own step size and each
        new group's source group (``fp32_state`` splits groups)."""
        keep, report = self._keeps(notes)
        groups, ratios, translations = rebuild_param_groups(
            old, optimizer_class(self.optimizer_name), self._defaults, lr=self.lr, weight_decay=self.weight_decay,
            fixed_keys=frozenset(self.optimizer_kwargs), keep=keep, driven=driven,
        )
        report()
        start = len(notes)
        for translation in translations:
            notes.extend(f"{type(old).__name__} {note}" for note in translation.warned)
        groups, own_step = self._step_sizes(old, groups, notes)
        groups, origin = self._split(groups, fp32_ids)
        ratios = [ratios[i] for i in origin]
        new = self._build(trainer, groups)
        if _muon_without_hidden(new):  # only its AdamW part runs: the lr keeps AdamW's meaning
            notes[start:] = [n for n in notes[start:]
                             if not (n.startswith(f"{type(old).__name__} lr=") and " changes meaning: " in n)]
        self._adopt_defaults(old, new, own_step)
        return new, ratios, own_step, origin

    def _adopt_defaults(self, old: torch.optim.Optimizer, new: torch.optim.Optimizer, own_step: bool) -> None:
        """Give ``new.defaults`` the module's optimizer's defaults, translated like its groups, so a param group
        added later (``add_param_group``: Lightning's ``BackboneFinetuning``, user code) gets what the module's
        optimizer would have given it; arguments given to the callback keep precedence."""
        skip = frozenset(self.optimizer_kwargs) | frozenset(LR_KEYS)
        if self.weight_decay is not None:
            skip |= {"weight_decay", "l2"}
        translation = translate_group(type(old), old.defaults, type(new), dict(new.defaults), skip=skip)
        new.defaults.update({k: v for k, v in translation.values.items() if k in new.defaults})
        if self.lr is None and not own_step and old.defaults.get("lr") is not None and "lr" in new.defaults:
            new.defaults["lr"] = old.defaults["lr"]

    def _swap(self, module: L.LightningModule, config):
        """Rebuild every optimizer in ``config`` (a ``configure_optimizers`` result) and retarget its
        schedulers; returns a config of the same shape. Warns once about every setting that was
        dropped or changed meaning (:mod:`~lowmem_lightning.callbacks.translate`)."""
        trainer = module._trainer
        self._origins = {}
        olds = find_optimizers(config)
        if not olds:
            self._refuse_lr_tools(trainer, self.lr is None and self._defaults.get("lr") is None
                                  and bool(self._defaults.get("relative_step")))
            trainable = [p for p in module.parameters() if p.requires_grad]
            new = self._build(trainer, self._split(trainable, self._fp32_ids(module))[0] if trainable else trainable)
            self.optimizers = [new]
            for note in _muon_notes(new, [], module):
                rank_zero_warn(f"LowMemOptimizerCallback(optimizer={self.optimizer_name!r}): {note}.",
                               category=LowMemWarning)
            return new
        schedulers = find_schedulers(config)
        cycling = momentum_schedulers(schedulers)
        self._check_momentum_schedulers(cycling)
        mapping, ratios, origins, notes, own_step = {}, {}, {}, [], False
        fp32_ids = self._fp32_ids(module)
        for old in olds:
            driven = frozenset({"beta1"}) if any(s.optimizer is old for s in cycling) else frozenset()
            mapping[id(old)], ratios[id(old)], own, origins[id(old)] = self._rebuild(trainer, old, driven, notes,
                                                                                      fp32_ids)
            own_step = own_step or own
            self._origins[id(mapping[id(old)])] = type(old)
            notes.extend(_muon_notes(mapping[id(old)], [s for s in cycling if s.optimizer is old], module))
        if own_step and schedulers:
            raise ValueError(
                f"LowMemOptimizerCallback(optimizer={self.optimizer_name!r}) computes its own step size "
                f"(its lr is None), so the module's LR scheduler ({type(schedulers[0]).__name__}) cannot drive it. "
                "Keep the module's lr and schedule with optimizer_kwargs={'relative_step': False, "
                "'scale_parameter': False} (the lr is then the step size, as AdamW's), or give the callback an lr "
                "with them."
            )
        self._refuse_lr_tools(trainer, own_step)
        for scheduler in schedulers:
            key = id(scheduler.optimizer)
            if key in mapping:
                expand_scheduler_groups(scheduler, origins[key])
                retarget_scheduler(scheduler, mapping[key], ratios[key])
        self.optimizers = list(mapping.values())
        self._warn_translation(notes, None if own_step else self._lr_kind_note(olds))
        return replace_optimizers(config, mapping)

    def _refuse_lr_tools(self, trainer, own_step: bool) -> None:
        """``ValueError`` when the optimizer computes its own step size (``own_step``) and one of Lightning's
        learning-rate tools is in the Trainer (:func:`~lowmem_lightning.callbacks.lr_tools.own_step_refusal`)."""
        reason = own_step_refusal(trainer.callbacks, self.optimizer_name) if own_step and trainer else None
        if reason is not None:
            drop_tuner_finders(trainer.callbacks)
            raise ValueError(reason + ".")

    def _lr_kind_note(self, olds: list[torch.optim.Optimizer]) -> str | None:
        """The note for a module lr kept (no callback ``lr``) across SGD <-> adaptive (:func:`lr_kind`), or None."""
        target = optimizer_class(self.optimizer_name)
        crossed = [old for old in olds if lr_kind(type(old)) != lr_kind(target)]
        if self.lr is not None or not crossed:
            return None
        lrs = sorted({float(g.get("initial_lr", g["lr"])) for old in crossed for g in old.param_groups
                      if g.get("lr") is not None})
        source, lr = type(crossed[0]).__name__, ", ".join(f"{v:g}" for v in lrs)
        return (
            f"LowMemOptimizerCallback(optimizer={self.optimizer_name!r}) keeps the module's {source} lr={lr} for "
            f"{target.__name__}: {source}'s lr {_LR_MEANS[lr_kind(type(crossed[0]))]}, "
            f"{target.__name__}'s {_LR_MEANS[lr_kind(target)]}, so their learning rates differ by orders of "
            f"magnitude. Give the callback its own: LowMemOptimizerCallback({self.optimizer_name!r}, lr=...)."
        )

    def _warn_translation(self, notes: list[str], lr_note: str | None = None) -> None:
        """One warning for the swap: every setting of the module's optimizers that was dropped or changed
        meaning, and the lr kept across SGD <-> adaptive (``lr_note``) after them."""
        unique = list(dict.fromkeys(notes))
        if not unique:
            if lr_note is not None:
                rank_zero_warn(lr_note, category=LowMemWarning)
            return
        target = optimizer_class(self.optimizer_name).__name__
        rank_zero_warn(
            f"LowMemOptimizerCallback(optimizer={self.optimizer_name!r}) rebuilt the module's optimizer as {target}; "
            "settings it could not carry as they were:\n" + "\n".join(f"  - {note}" for note in unique)
            + f"\nSet {target}'s own values with LowMemOptimizerCallback(lr=..., weight_decay=..., "
            "optimizer_kwargs={...})." + ("" if lr_note is None else "\n" + lr_note),
            category=LowMemWarning,
        )

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
        """Put the :attr:`parts` into ``trainer.callbacks`` right after this callback (once; the Trainer
        then calls their ``setup`` in the same pass), and for ``fit`` wrap ``configure_optimizers``
        (the strategy calls it next); the model summary counts NF4 weights
        (:func:`~lowmem_lightning.callbacks.model_summary.count_nf4_in_model_summaries`)."""
        _insert_after(trainer.callbacks, self, self.parts)
        count_nf4_in_model_summaries(trainer)
        if stage == "fit":
            reason = lr_find_refusal(trainer.callbacks, self.optimizer_name, self.lr)
            if reason is not None:
                drop_tuner_finders(trainer.callbacks)
                raise ValueError(reason + ".")
            self.optimizers = []
            self._patch(pl_module)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Check the strategy built its optimizers through the module (so they are ours); hand them to the monitor; name
        every LR scheduler config the module left unnamed as Lightning's ``LearningRateMonitor`` would have named it
        for the module's own optimizer (``lr-AdamW``, not ``lr-AdamW8bit``): see :func:`keep_scheduler_names`;
        record :meth:`recorded_hparams` in the loggers
        (:func:`~lowmem_lightning.callbacks.run_record.record_hparams`). A weight-averaging callback that would
        average the module's NF4 codes is refused
        (:func:`~lowmem_lightning.callbacks.param_checks.averaged_codes_refusal`); one that is not gets a
        :class:`~.averaging.KeepTrainingWeights` (a checkpoint saved after its end-of-fit copy resumes from the
        training weights, not the average) and the SIGTERM checkpoint after its step-end update
        (:func:`~.averaging.serve_weight_averaging`). A QLoRA model whose frozen weights were cast up to fp32 around
        16-bit NF4 layers gets a warning (:func:`~lowmem_lightning.callbacks.param_checks.upcast_frozen_note`)."""
        reason = averaged_codes_refusal(pl_module)
        if reason is not None:
            raise ValueError(reason)
        note = upcast_frozen_note(pl_module)
        if note is not None:
            rank_zero_warn(note, category=LowMemWarning)
        serve_weight_averaging(trainer)
        if not self.optimizers:
            raise RuntimeError(
                f"LowMemOptimizerCallback: the strategy {type(trainer.strategy).__name__} set up its optimizers "
                "without calling the module's configure_optimizers, so the optimizer could not be replaced."
            )
        self.monitor.track(self.optimizers, self.optimizer_name, type(self).__name__)
        keep_scheduler_names(trainer.lr_scheduler_configs, self._origins)
        record_hparams(trainer, self.recorded_hparams())

    def recorded_hparams(self) -> dict:
        """What this fit trains with, as the ``lowmem/*`` hyperparameters recorded in the Trainer's loggers at fit
        start (:func:`~lowmem_lightning.callbacks.run_record.optimizer_hparams`): the optimizer's name and class,
        the module's optimizer class it replaced, lr and weight decay as built, and this callback's other arguments."""
        replaced = [self._origins[id(o)].__name__ for o in self.optimizers if id(o) in self._origins]
        kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in self.optimizer_kwargs.items()}
        fp32_state = list(self.fp32_state) if isinstance(self.fp32_state, (list, tuple)) else self.fp32_state
        return optimizer_hparams(self.optimizer_name, self.optimizers, replaced, {
            "optimizer_kwargs": kwargs, "step_in_backward": self.step_in_backward, "fp32_state": fp32_state})

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Give the module its own ``configure_optimizers`` back."""
        self._unpatch()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Give the module its own ``configure_optimizers`` back (Lightning skips ``teardown`` after an exception)."""
        self._unpatch()

    @property
    def releases(self) -> list:
        """The gradient-release hooks of the current fit (one per optimizer; empty unless ``step_in_backward``)."""
        return self.release.releases if self.release is not None else []

    @property
    def summary(self) -> dict | None:
        """End-of-fit numbers (MiB, bytes/param, saving vs fp32 AdamW); ``None`` before a fit ends."""
        return self.monitor.summary

    def measure(self, allow_sync: bool = True) -> dict[str, float]:
        """Current metrics of the built optimizers, as logged per step (:meth:`StateMemoryMonitor.measure`)."""
        return self.monitor.measure(allow_sync)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """What goes into checkpoints: the optimizer name and classes, which
        :class:`~lowmem_lightning.callbacks.resume.ResumeCompatibility` checks a resume against."""
        return {
            "optimizer": self.optimizer_name,
            "classes": [f"{type(o).__module__}.{type(o).__qualname__}" for o in self.optimizers],
        }


def _muon_without_hidden(new: torch.optim.Optimizer) -> bool:
    """Whether ``new`` is a Muon hybrid none of whose trainable params takes the Muon update."""
    muon_params = getattr(new, "muon_params", None)
    return callable(muon_params) and not any(p.requires_grad for p in muon_params())


def _embedding_tables(module: torch.nn.Module, ids: set[int]) -> list[str]:
    """The ``named_parameters()`` names of the ``nn.Embedding``/``nn.EmbeddingBag`` weights of ``module`` whose id is
    in ``ids``, each once (a table shared by several modules, T5's ``shared`` / ``embed_tokens``, by its first name)."""
    tables = {id(m.weight) for m in module.modules() if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag))}
    return [name for name, param in module.named_parameters() if id(param) in tables & ids]


def _muon_notes(new: torch.optim.Optimizer, cycling: list, module: torch.nn.Module | None = None) -> list[str]:
    """Notes for a Muon hybrid (``muon``/``muon_8bit``; none for other optimizers): no trainable param takes
    the Muon update (all went to its AdamW part); trainable ``nn.Embedding`` weights of ``module`` whose names do
    not mark them take it (T5's ``shared``, ``relative_attention_bias``); a scheduler in ``cycling`` (``OneCycleLR``/
    ``CyclicLR`` with ``cycle_momentum``) drives the Muon momentum only, not the AdamW part's ``adamw_betas[0]``."""
    if not callable(getattr(new, "muon_params", None)):
        return []
    notes, target = [], type(new).__name__
    muon = {id(p) for p in new.muon_params() if p.requires_grad}
    tables = _embedding_tables(module, muon) if module is not None else []
    if tables:
        notes.append(f"{target} gives the Muon update (for hidden matrices) to the nn.Embedding weight(s) "
                     f"{', '.join(tables[:4])}{' ...' if len(tables) > 4 else ''}: their "
                     "names do not mark them as embeddings. Put them in a param group of their own with "
                     "use_muon=False in configure_optimizers (the key is carried into the new optimizer)")
    if _muon_without_hidden(new):
        notes.append(f"{target} gives none of its trainable params the Muon update (it takes 2-D hidden "
                     "matrices; embeddings, the output head, norms, biases and other params take its 8-bit AdamW "
                     "part): every one is updated by AdamW (expected when another optimizer holds the hidden "
                     "matrices; otherwise pick adamw_8bit, or give a param group use_muon=True)")
    for scheduler in cycling:
        beta1 = new.defaults["adamw_betas"][0]
        notes.append(f"{type(scheduler).__name__} cycles {target}'s momentum, which only its hidden matrices use: "
                     f"the params it updates with AdamW (embeddings, head, norms, biases) keep adamw_betas[0]="
                     f"{beta1!r} through the cycle")
    return notes


def _insert_after(callbacks: list[L.Callback], anchor: L.Callback, parts: tuple[L.Callback, ...]) -> None:
    """Put the ``parts`` not yet in ``callbacks`` right after ``anchor``, in order (in place: Lightning iterates
    this list, so parts inserted during a hook's pass get that hook too)."""
    missing = [part for part in parts if not any(part is c for c in callbacks)]
    if not missing:
        return
    position = next(i for i, c in enumerate(callbacks) if c is anchor) + 1
    callbacks[position:position] = missing


def keep_scheduler_names(configs: list, origins: dict[int, type]) -> None:
    """Give each LR scheduler config the name ``LearningRateMonitor`` would have logged it under with the
    module's own optimizers, so its metrics keep their names (``lr-AdamW``, ``lr-AdamW-1``, ...).

    ``LearningRateMonitor`` names a config ``config.name`` when set (Lightning's documented way: the
    ``"name"`` key of the scheduler dict), else ``"lr-" + type(optimizer).__name__``, with ``-{k}`` for
    the k-th further unnamed config of the same optimizer class (a named config of a class seen
    unnamed before gets the suffix too). This replays that rule with the classes of the module's
    optimizers (``origins``: id of our optimizer -> the class it replaced) and writes the result into
    every config, which the monitor then uses as it is. An optimizer without a scheduler cannot be
    named this way (the monitor uses its class name): its metric becomes ``lr-<our class>``.
    """
    seen: dict[type, int] = {}
    names = []
    for config in configs:
        cls = origins.get(id(config.scheduler.optimizer))
        if cls is None:
            return  # not all ours: leave Lightning's naming alone
        name = config.name if config.name is not None else f"lr-{cls.__name__}"
        if config.name is None:
            seen[cls] = seen.get(cls, 0) + 1
        if seen.get(cls, 0) > 1:
            name += f"-{seen[cls] - 1}"
        names.append(name)
    for config, name in zip(configs, names):
        config.name = name
