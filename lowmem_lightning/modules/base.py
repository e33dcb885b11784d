"""LowMemModule: a LightningModule whose optimizer and LR schedule are constructor arguments.

A subclass writes ``forward`` and ``training_step`` (and ``validation_step`` if it wants) and calls
``super().__init__(optimizer=..., lr=..., ...)``; ``configure_optimizers`` is done here:

* the optimizer is built by name through :func:`lowmem_lightning.optim.build_optimizer`;
* weight decay applies to matrices only: 1-D params (biases, LayerNorm/RMSNorm weights) and scalars
  go to a second param group with ``weight_decay=0``; frozen params (``requires_grad=False``) are
  left out, so they get no optimizer state;
* gradient clipping by norm hands its norm to the optimizer's finite check (one gradient read less per
  step; :meth:`LowMemModule.configure_gradient_clipping`);
* an optional per-step schedule: linear warmup over ``warmup_steps`` optimizer steps, then constant
  (``scheduler=None``) or cosine decay to ``min_lr_ratio * lr`` at the last step
  (``scheduler="cosine"``, last step = ``trainer.estimated_stepping_batches``). Its length is recorded in
  checkpoints; a run resumed with another length (a larger ``max_steps``) follows its own length, as Lightning and
  HF Trainer do, and says so in one line with the lr before and after (:meth:`LowMemModule.on_train_start`).

Every argument is type-hinted and documented so LightningCLI / jsonargparse expose it in YAML and on
the command line, and everything is validated in the constructor (``ValueError`` naming the argument,
the value and what is allowed) before any model is trained.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Literal, get_args

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lowmem_lightning.callbacks.averaging import AverageSharesFrozen
from lowmem_lightning.callbacks.frozen_checkpoint import LeaveOutFrozenBase
from lowmem_lightning.callbacks.interrupt import InterruptAtStepEnd
from lowmem_lightning.callbacks.model_summary import count_nf4_in_model_summaries
from lowmem_lightning.callbacks.rng_state import RngStateCheckpoint
from lowmem_lightning.callbacks.train_mode import CheckpointingModeCheck, warn_checkpointing_in_eval_mode
from lowmem_lightning.kept_fp32 import fp32_originals, restore_fp32
from lowmem_lightning.lowmem_warning import LowMemWarning
from lowmem_lightning.optim import build_optimizer, optimizer_class
from lowmem_lightning.optim.state_precision import (
    check_fp32_state,
    fp32_state_params,
    split_param_groups,
    unmatched_message,
)
from lowmem_lightning.optim.validation import check_choice, validate_optimizer_args
from lowmem_lightning.rotary import keep_rotary_fp32

__all__ = ["LowMemModule", "SCHEDULERS", "Scheduler", "decay_param_groups", "validate_optimizer_args",
           "warmup_cosine_factor"]

Scheduler = Literal["cosine"]
"""The LR schedules ``LowMemModule(scheduler=...)`` names (or ``None``: a constant lr after the warmup):
``"cosine"``, a cosine decay to ``min_lr_ratio * lr`` over the run's optimizer steps."""

SCHEDULERS: tuple[str | None, ...] = (None, *get_args(Scheduler))
"""Values accepted for ``LowMemModule(scheduler=...)``."""

SCHEDULE_KEY = "lowmem_lr_schedule"
"""The checkpoint key of the LR schedule a fit ran (:meth:`LowMemModule.on_save_checkpoint`): ``{"scheduler",
"warmup_steps", "total_steps" (optimizer steps; ``None`` without cosine decay), "min_lr_ratio"}``."""


def decay_param_groups(
    named_params: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float
) -> list[dict]:
    """Split trainable params into a decayed group (>= 2-D) and a no-decay group (biases, norms, scalars).

    Params with ``requires_grad=False`` are skipped. Empty groups are dropped. Each group dict holds
    ``params`` and ``weight_decay``.
    """
    decay: list[tuple[str, torch.Tensor]] = []
    no_decay: list[tuple[str, torch.Tensor]] = []
    for name, param in named_params:
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append((name, param))
    groups = []
    for members, wd in ((decay, weight_decay), (no_decay, 0.0)):
        if members:
            groups.append({"params": [p for _, p in members], "weight_decay": wd})
    return groups


def warmup_cosine_factor(
    warmup_steps: int, total_steps: int | None, min_lr_ratio: float
) -> Callable[[int], float]:
    """LR multiplier per optimizer step ``s`` (0-based), for ``torch.optim.lr_scheduler.LambdaLR``.

    * ``s < warmup_steps``: ``(s + 1) / (warmup_steps + 1)`` (linear ramp that never starts at 0);
    * then, with ``total_steps=None``: ``1``;
    * then, with ``total_steps=T``: ``r + (1 - r) * 0.5 * (1 + cos(pi * p))`` where ``r = min_lr_ratio``
      and ``p = (s - warmup_steps) / max(1, T - 1 - warmup_steps)`` clamped to [0, 1], so the last
      step (``s = T - 1``) runs at ``min_lr_ratio * lr``.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if total_steps is None:
            return 1.0
        progress = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps)))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class LowMemModule(L.LightningModule):
    """LightningModule base class with a low-memory optimizer and an optional warmup+cosine schedule.

    Subclass it, call ``super().__init__(...)`` with (some of) the arguments below, build your network,
    and write ``forward``/``training_step``. ``configure_optimizers`` is provided. To record the
    arguments in checkpoints (``load_from_checkpoint``), call ``self.save_hyperparameters()`` in your
    subclass's ``__init__``.

    Args:
        optimizer: Registered optimizer name, e.g. ``adamw_8bit``, ``paged_adamw_8bit``, ``adafactor``,
            ``came``, ``sgd``, ``adamw`` (see ``lowmem_lightning.optim.available_optimizers()``).
        lr: Peak learning rate (reached after warmup), > 0.
        weight_decay: Decoupled weight decay for params with 2 or more dims; biases, norm weights and
            other 1-D params get 0.
        optimizer_kwargs: Extra keyword arguments for the optimizer's constructor (e.g.
            ``{"betas": [0.9, 0.95]}``); must not repeat ``lr`` or ``weight_decay``.
        warmup_steps: Optimizer steps of linear LR warmup (0 = none).
        scheduler: ``"cosine"`` for cosine decay after warmup down to ``min_lr_ratio * lr`` at the last
            step (``trainer.estimated_stepping_batches``), or ``None`` for a constant LR after warmup.
        min_lr_ratio: Final LR of the cosine schedule as a fraction of ``lr``, in [0, 1].
        fp32_state: Params whose optimizer state stays 32-bit (bitsandbytes' ``optim_bits=32``, HF Trainer's rule
            for embeddings): a module class or its path (``"torch.nn.Embedding"``), ``"embeddings"``, name patterns
            (``"*embed_tokens*"``, ``"lm_head"``) or a list; they get param groups of their own with
            ``quantize_state=False`` (:mod:`lowmem_lightning.optim.state_precision`). ``None``: the optimizer's rule.
        checkpoint_frozen: Whether checkpoints hold the frozen weights too (default). ``False``, for a LoRA /
            frozen-backbone subclass: they leave out the frozen tensors unchanged since the module was built, and a
            resume takes them back from the module as your code builds it, refused (``ValueError`` naming a tensor)
            when they differ (:mod:`~lowmem_lightning.callbacks.frozen_checkpoint`; its ``load_from_checkpoint``
            loads one outside a Trainer). ``CausalLMModule`` has its own, rebuilding from ``model_name_or_path``.
    """

    def __init__(
        self,
        optimizer: str = "adamw_8bit",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer_kwargs: dict | None = None,
        warmup_steps: int = 0,
        scheduler: Scheduler | None = None,
        min_lr_ratio: float = 0.1,
        fp32_state: str | list[str] | None = None,
        checkpoint_frozen: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(checkpoint_frozen, bool):
            raise ValueError(f"Invalid checkpoint_frozen={checkpoint_frozen!r}: expected True (checkpoints hold the "
                             "frozen weights too) or False (they leave out those unchanged since the build).")
        self._leave_out_frozen = not checkpoint_frozen
        self._fp32_state = check_fp32_state(optimizer, fp32_state, type(self).__name__)
        self.fp32_state = fp32_state
        if lr is None:
            raise ValueError(f"Invalid lr={lr!r}: expected a finite number >= 0.")
        if weight_decay is None:
            raise ValueError(f"Invalid weight_decay={weight_decay!r}: expected a finite number >= 0.")
        kwargs, _ = validate_optimizer_args(optimizer, lr, weight_decay, optimizer_kwargs)
        if float(lr) == 0.0:
            raise ValueError(f"Invalid lr={lr!r}: expected a number > 0 (the peak learning rate; 0 would train "
                             "nothing: to freeze params, set requires_grad=False).")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"Invalid warmup_steps={warmup_steps!r}: expected an integer >= 0 (optimizer steps).")
        check_choice(scheduler, SCHEDULERS, "scheduler")
        if (
            isinstance(min_lr_ratio, bool)
            or not isinstance(min_lr_ratio, (int, float))
            or not 0.0 <= min_lr_ratio <= 1.0
        ):
            raise ValueError(f"Invalid min_lr_ratio={min_lr_ratio!r}: expected a number in [0, 1].")
        self.optimizer_name = optimizer
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.optimizer_kwargs = kwargs
        self.warmup_steps = warmup_steps
        self.scheduler_name = scheduler
        self.min_lr_ratio = float(min_lr_ratio)
        self._schedule: dict | None = None  # the schedule configure_optimizers built (SCHEDULE_KEY)
        self._checkpoint_schedule: dict | None = None  # the one of the checkpoint this fit resumes

    def param_groups(self) -> list[dict]:
        """Param groups for the optimizer: decayed matrices and undecayed 1-D params (trainable only).

        Override to add groups of your own (e.g. a different ``lr`` for a head); keep ``params`` and
        ``weight_decay`` in each.
        """
        groups = decay_param_groups(self.named_parameters(), self.weight_decay)
        if not groups:
            raise ValueError(
                f"{type(self).__name__} has no trainable parameters (every param has requires_grad=False); "
                "there is nothing to optimize."
            )
        return groups

    def _total_steps(self) -> int | None:
        if self.scheduler_name != "cosine":
            return None
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError(
                "scheduler='cosine' needs a finite number of optimizer steps: set the Trainer's "
                "max_steps or max_epochs (trainer.estimated_stepping_batches is infinite)."
            )
        return int(total)

    def _apply(self, fn, *args, **kwargs):
        """Every cast and move of the module (``to``, ``bfloat16()``, Lightning's ``bf16-true`` conversion), with
        rotary position frequencies kept fp32 (:func:`~lowmem_lightning.rotary.keep_rotary_fp32`) and the tensors
        transformers keeps in fp32, such as MoE routers (:mod:`lowmem_lightning.kept_fp32`)."""
        originals = fp32_originals(self)
        out = super()._apply(fn, *args, **kwargs)
        restore_fp32(self, originals)
        keep_rotary_fp32(self)
        return out

    def configure_callbacks(self) -> list:
        """:class:`~lowmem_lightning.callbacks.InterruptAtStepEnd`: a Ctrl+C inside a training step stops the fit when
        that step is done, as under ``LowMemOptimizerCallback`` (a notebook's interrupted model and optimizer are a
        step's, and a checkpoint saved then resumes exactly), and
        :class:`~lowmem_lightning.callbacks.rng_state.RngStateCheckpoint`: the random generators' states travel in
        every checkpoint, so dropout draws the same masks after a resume, and
        :class:`~lowmem_lightning.callbacks.averaging.AverageSharesFrozen`: a weight-averaging callback's average
        shares, not copies, what does not train, and
        :class:`~lowmem_lightning.callbacks.frozen_checkpoint.LeaveOutFrozenBase`: with ``checkpoint_frozen=False``
        checkpoints leave out the frozen base (and one that did resumes in any case). A subclass overriding this hook
        adds to ``super().configure_callbacks()``."""
        return [InterruptAtStepEnd(), RngStateCheckpoint(), AverageSharesFrozen(),
                LeaveOutFrozenBase(leave_out=self._leave_out_frozen)]

    def setup(self, stage: str) -> None:
        """The Trainer's model summary counts the model's NF4 weights
        (:func:`~lowmem_lightning.callbacks.model_summary.count_nf4_in_model_summaries`). A subclass overriding this
        hook calls ``super().setup(stage)``."""
        if self._trainer is not None:
            count_nf4_in_model_summaries(self._trainer)

    def on_train_start(self) -> None:
        """Warn when layers with gradient checkpointing are in eval mode, where transformers skips it (a model a
        subclass loaded with ``from_pretrained``: :func:`~lowmem_lightning.callbacks.train_mode.
        warn_checkpointing_in_eval_mode`), unless the Trainer runs a ``CheckpointingModeCheck`` (a
        ``LowMemOptimizerCallback``'s part), which has said it already: one warning per fit. A subclass overriding
        this hook calls ``super().on_train_start()``."""
        callbacks = self._trainer.callbacks if self._trainer is not None else []
        if not any(isinstance(callback, CheckpointingModeCheck) for callback in callbacks):
            warn_checkpointing_in_eval_mode(self)
        self._say_schedule_length_changed()

    def _say_schedule_length_changed(self) -> None:
        """On a resume, one info line when this run's cosine schedule has another length (optimizer steps) than the
        checkpoint's run had: both lengths, the lr the first resumed step runs at (restored with the optimizer: the
        checkpoint's schedule) and the lr of the next step on (this run's schedule)."""
        saved, self._checkpoint_schedule = self._checkpoint_schedule, None
        ours = self._schedule
        if saved is None or ours is None or not saved.get("scheduler") == ours["scheduler"] == "cosine":
            return
        if saved.get("total_steps") == ours["total_steps"] or not self.trainer.lr_scheduler_configs:
            return
        scheduler = self.trainer.lr_scheduler_configs[0].scheduler
        step = self.trainer.global_step
        before = scheduler.optimizer.param_groups[0]["lr"]
        after = scheduler.base_lrs[0] * scheduler.lr_lambdas[0](scheduler.last_epoch + 1)
        rank_zero_info(
            f"{type(self).__name__}: the cosine LR schedule is {ours['total_steps']} steps long in this run, "
            f"{saved.get('total_steps')} in the checkpoint's (trainer.estimated_stepping_batches): step {step} runs "
            f"at lr {before:.3g} (the checkpoint's schedule), step {step + 1} at {after:.3g} (this run's)."
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Record the LR schedule this fit runs (its length in optimizer steps) under :data:`SCHEDULE_KEY`, so a
        resume can tell when its own differs. A subclass overriding this hook calls ``super().on_save_checkpoint``."""
        if self._schedule is not None:
            checkpoint[SCHEDULE_KEY] = dict(self._schedule)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse, with a message saying how to resume, a checkpoint whose optimizer state came from a
        ``LowMemOptimizerCallback`` absent from this fit (:func:`~lowmem_lightning.callbacks.resume.
        refuse_missing_optimizer_callback`), or a fit resumed from a weights-only checkpoint (:func:`~lowmem_lightning.
        callbacks.resume.refuse_weights_only`: a ``ValueError`` saying how to start from its weights). A fit's resume
        keeps the checkpoint's LR schedule (:data:`SCHEDULE_KEY`) to compare with its own at :meth:`on_train_start`;
        one a weight-averaging callback wrote, resumed without one, continues from its training weights
        (:func:`~lowmem_lightning.callbacks.averaging.resume_from_training_weights`)."""
        from lowmem_lightning.callbacks.averaging import resume_from_training_weights
        from lowmem_lightning.callbacks.resume import refuse_missing_optimizer_callback, refuse_weights_only

        resume_from_training_weights(self._trainer, checkpoint)
        refuse_weights_only(self._trainer, checkpoint)
        refuse_missing_optimizer_callback(self._trainer, checkpoint, self.optimizer_name)
        if self._trainer is not None and self._trainer.state.fn == "fit":  # a resume (not load_from_checkpoint)
            self._checkpoint_schedule = checkpoint.get(SCHEDULE_KEY)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's gradient clipping, exactly (same checks, same clipped gradients under every precision); when
        it clips by norm for one of this package's optimizers, the total norm is handed to the optimizer, whose
        next step then skips its own finite-check pass over the gradients (a whole-step skip when the norm is
        inf/NaN): :mod:`lowmem_lightning.callbacks.clip_norm`. Any other optimizer keeps Lightning's path."""
        from lowmem_lightning.callbacks.clip_norm import clip_norm_reused

        with clip_norm_reused(self.trainer.precision_plugin):
            self.clip_gradients(
                optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm
            )

    def _fp32_state_groups(self, groups: list[dict]) -> list[dict]:
        """``groups`` with the params ``fp32_state`` selects in ``quantize_state=False`` groups; a warning names an
        entry that selects none."""
        if self._fp32_state is None:
            return groups
        ids, unmatched = fp32_state_params(self, self._fp32_state)
        if unmatched:
            rank_zero_warn(unmatched_message(type(self).__name__, self.fp32_state, unmatched, self),
                           category=LowMemWarning)
        return split_param_groups(groups, ids)[0]

    def configure_optimizers(self):
        """Build the named optimizer over :meth:`param_groups`, plus a per-step LambdaLR when a
        warmup or cosine schedule was asked for. A param it cannot update (a ``sparse=True`` embedding's weight; a
        complex param for this package's optimizers) is refused with a ``ValueError`` naming it
        (:func:`~lowmem_lightning.callbacks.param_checks.unsupported_params`). For ``muon``/``muon_8bit`` every param
        goes in with its ``named_parameters()`` name, so the embeddings and the output head take the AdamW part
        (:func:`~lowmem_lightning.optim.muon.uses_muon`)."""
        groups = self._fp32_state_groups(self.param_groups())
        from lowmem_lightning.callbacks.param_checks import unsupported_params

        reason = unsupported_params(self.optimizer_name, optimizer_class(self.optimizer_name),
                                    [p for g in groups for p in g["params"]], self)
        if reason is not None:
            raise ValueError(reason)
        name_groups = getattr(optimizer_class(self.optimizer_name), "with_param_names", None)
        if name_groups is not None:  # Muon: embeddings and the head are found by name (they take AdamW)
            groups = name_groups(groups, self.named_parameters())
        optimizer = build_optimizer(
            self.optimizer_name, groups, lr=self.lr, weight_decay=self.weight_decay, **self.optimizer_kwargs,
        )
        if callable(getattr(optimizer, "remember_names", None)):
            optimizer.remember_names(self.named_parameters())  # for groups added later (BackboneFinetuning)
        if self.warmup_steps == 0 and self.scheduler_name is None:
            self._schedule = None
            return optimizer
        total_steps = self._total_steps()
        self._schedule = {"scheduler": self.scheduler_name, "warmup_steps": self.warmup_steps,
                          "total_steps": total_steps, "min_lr_ratio": self.min_lr_ratio}
        factor = warmup_cosine_factor(self.warmup_steps, total_steps, self.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
