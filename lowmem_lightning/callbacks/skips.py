"""Tensor updates our optimizers skipped for inf/NaN gradients, told to the user: a part of
:class:`~lowmem_lightning.callbacks.StateMemoryMonitor`.

Our optimizers leave a param and its state unchanged when its gradient is not finite and count it on the device
(:attr:`~lowmem_lightning.optim.finite.FiniteGuard.skipped_updates`). A run whose every update is skipped (a NaN in
the data, fp16 without loss scaling, a far too high lr, a checkpoint with NaN weights) would otherwise run to
``max_steps`` looking normal. :class:`SkipWatch` keeps, at every optimizer step, a device copy of the counter (no
host sync) and the optimizers' host count of updates attempted
(:attr:`~lowmem_lightning.optim.finite.FiniteGuard.attempted_updates`), and reads the copies in one transfer only where
the monitor reads the counter anyway (its logged steps), at each epoch's end and at the end of fit (and after
:data:`PENDING_LIMIT` unread steps, so memory stays bounded). From them it knows, per step, how many of the updates
it attempted were skipped, and:

* warns the first time any were (the step, how many tensors, a few param names when the step read is the one that
  skipped, what it means and what to check), and again each time the count doubles (rate-limited: AMP-style
  occasional skips do not flood the log);
* gives the end-of-fit summary ``skipped N tensor updates ... in K of M steps``;
* stops the fit (``trainer.should_stop``: the loop ends after this step, checkpoints are saved as at any end of
  training, the summary is printed; ``lowmem fit`` says the message and exits with code 1,
  :data:`~lowmem_lightning.cli.app.UNTRAINED_EXIT_CODE`) once every update of the last ``stop_after_skipped_steps``
  optimizer steps in a row was skipped: nothing is being trained.

A ``GradScaler`` (``16-mixed``) that skips a step never calls the optimizer's ``step``: nothing is counted here.

An optimizer that applies a non-finite update (torch's ``AdamW``, ``--optim adamw``) leaves inf/NaN in the weights,
and every later loss is NaN: :class:`LostWeights` watches the training loss the monitor reads anyway and, when it has
not been finite for ``stop_after_skipped_steps`` recorded steps in a row, reads the weights once; if they hold inf/NaN
the fit stops the same way (one process or DDP; with sharded params, FSDP or DTensor, only the end-of-fit check
runs: a rank sees its shard alone, and the ranks must stop alike without a collective). At the end of a fit whose
last loss was not finite, the summary says how many trainable tensors hold inf/NaN, and ``lowmem fit`` exits with
code 1.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_warn

from lowmem_lightning.lowmem_warning import LowMemWarning
from lowmem_lightning.optim.finite import _square_sum_norms
from lowmem_lightning.optim.sharding import is_dtensor, local

__all__ = ["STOP_AFTER_SKIPPED_STEPS", "PENDING_LIMIT", "SkipWatch", "LostWeights", "check_stop_after_skipped_steps"]

STOP_AFTER_SKIPPED_STEPS = 100
"""Default: stop a fit once every tensor update of this many optimizer steps in a row was skipped. A GradScaler's or
an occasional overflow skips one step here and there; 100 steps with nothing trained at all is a broken run (NaN
weights or data, a diverged lr), and still short next to a real fit's thousands of steps."""

PENDING_LIMIT = 1024
"""Unread per-step counter copies (0-d tensors) kept at most; one read of them all when reached."""

NAMES_SHOWN = 3
"""Param names a warning lists at most."""

CHECKS = ("check the loss and the data (a NaN or inf in a batch), the learning rate (too high diverges), the "
          "precision ('16-true' has no loss scaling, so fp16 gradients overflow; '16-mixed' scales the loss with a "
          "GradScaler; 'bf16-mixed' has fp32's range) and the weights of a checkpoint resumed (inf/NaN)")
"""What a user checks when gradients are not finite, said by every message here."""


def check_stop_after_skipped_steps(value: int | None) -> int | None:
    """``value`` if it is an int >= 1 or ``None``; else a ``ValueError`` naming the argument, the value and what is
    allowed."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ValueError(f"Invalid stop_after_skipped_steps={value!r}: expected an int >= 1 (stop the fit once every "
                     "tensor update of that many optimizer steps in a row was skipped for inf/NaN gradients) or None "
                     "(never stop).")


def _trainable_params(optimizers: list[torch.optim.Optimizer]) -> list[torch.Tensor]:
    """The params of ``optimizers``' groups that require a gradient."""
    return [p for o in optimizers for g in o.param_groups for p in g["params"] if p.requires_grad]


def _to_host(counts: list[torch.Tensor]) -> list[float]:
    """The values of ``counts`` (0-d tensors, on one device or several) read in one transfer per device."""
    if not counts:
        return []
    device = counts[0].device
    if all(c.device == device for c in counts):
        return torch.stack(counts).cpu().tolist()
    return [float(c) for c in counts]


class SkipWatch:
    """The skipped-update counts of ``optimizers`` per optimizer step (see the module doc). ``stop_after``: see
    :data:`STOP_AFTER_SKIPPED_STEPS` (``None``: never stop)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer], stop_after: int | None) -> None:
        self.optimizers = [o for o in optimizers if hasattr(o, "skipped_updates_tensor")]
        """The optimizers with a skipped-update counter (ours); torch's have none."""
        self._counted_only = [o for o in optimizers if hasattr(o, "skipped_updates") and o not in self.optimizers]
        # another optimizer with a ``skipped_updates`` count alone: read for the logged metric, not watched
        self.stop_after = stop_after
        self.total = 0.0
        """The optimizers' counter as last read (updates skipped so far, earlier fits of the same optimizers too)."""
        self.skipped = 0
        """Tensor updates skipped in this fit's steps read so far."""
        self.skipped_steps = 0
        """Optimizer steps (read so far) that skipped at least one tensor update."""
        self.stopped_at: int | None = None
        """The step at which this watch stopped the fit, if it did."""
        self._streak = 0  # steps in a row whose every update was skipped
        self._first: tuple[int, int] | None = None  # (step, updates skipped in it) of the first skip
        self._warned_at = 0  # self.skipped at the last warning
        self._attempted = 0  # the optimizers' attempted_updates as last read
        self._pending: list[tuple[int | None, torch.Tensor | None, int]] = []  # (step, count copy, attempted_updates)
        if self.optimizers:
            self._pending.append((None, self._count(), self._attempted_now()))  # the counts before this fit's steps

    @property
    def tracked(self) -> bool:
        """Whether any optimizer counts skipped updates (:meth:`logged_total` has a value)."""
        return bool(self.optimizers or self._counted_only)

    def logged_total(self) -> float:
        """``optim/skipped_updates``: :attr:`total` as last read, plus the ``skipped_updates`` of optimizers that
        only count (read now)."""
        return self.total + float(sum(o.skipped_updates for o in self._counted_only))

    @property
    def full(self) -> bool:
        """Whether :data:`PENDING_LIMIT` steps wait to be read."""
        return len(self._pending) >= PENDING_LIMIT

    def _count(self) -> torch.Tensor | None:
        copies = [t for t in (o.skipped_updates_tensor() for o in self.optimizers) if t is not None]
        if not copies:
            return None
        total = copies[0]
        for copy in copies[1:]:
            total = total + copy.to(total.device, non_blocking=True)
        return total

    def _attempted_now(self) -> int:
        """The optimizers' tensor updates attempted so far (a host count, no sync)."""
        return sum(o.attempted_updates for o in self.optimizers)


    def record(self, step: int) -> None:
        """After optimizer step ``step``: keep a device copy of the skip counters and the attempted-update count (no
        host sync)."""
        if self.optimizers:
            self._pending.append((step, self._count(), self._attempted_now()))

    def check(self, trainer: L.Trainer, reporter: str) -> None:
        """Read the copies kept since the last read (one transfer), count, warn, and stop the fit when due."""
        pending, self._pending = self._pending, []
        values = iter(_to_host([c for _, c, _ in pending if c is not None]))
        last_delta, last_step = 0.0, None
        for step, count, attempted in pending:
            value = next(values) if count is not None else 0.0
            delta, self.total = value - self.total, value
            tried, self._attempted = attempted - self._attempted, attempted
            if step is None:
                continue
            last_delta, last_step = delta, step
            self._count_step(step, int(delta), tried)
        if self.skipped and (not self._warned_at or self.skipped >= 2 * self._warned_at):
            self._warn(trainer, reporter, names_now=last_delta > 0 and last_step == trainer.global_step)
        if self.stop_after is not None and self._streak >= self.stop_after and self.stopped_at is None:
            self._stop(trainer, reporter)

    def _count_step(self, step: int, skipped: int, attempted: int) -> None:
        """Step ``step`` skipped ``skipped`` of the ``attempted`` tensor updates it set out to make."""
        if skipped <= 0:
            self._streak = 0
            return
        self.skipped += skipped
        self.skipped_steps += 1
        self._first = self._first or (step, skipped)
        self._streak = self._streak + 1 if skipped >= attempted else 0

    def _warn(self, trainer: L.Trainer, reporter: str, names_now: bool) -> None:
        names = _nonfinite_names(_trainable_params(self.optimizers), trainer.lightning_module) if names_now else []
        shown = _shown(names)
        now = f" Not finite at step {trainer.global_step}: {shown}." if shown else ""
        if not self._warned_at:
            step, count = self._first
            message = (f"{reporter}: step {step} skipped {count} tensor update(s): their gradients held inf/NaN "
                       f"(or overflow fp32 when squared), so those params and their optimizer state were left "
                       f"unchanged.{now} To fix it, {CHECKS}. Further skips are counted (optim/skipped_updates, the "
                       "end-of-fit summary) and warned again when their count doubles.")
        else:
            message = (f"{reporter}: {self.skipped:,} tensor updates skipped so far for inf/NaN gradients, in "
                       f"{self.skipped_steps:,} steps (the first at step {self._first[0]}).{now}")
        self._warned_at = self.skipped
        rank_zero_warn(message, category=LowMemWarning)

    def _stop(self, trainer: L.Trainer, reporter: str) -> None:
        self.stopped_at = trainer.global_step
        trainer.should_stop = True
        rank_zero_warn(f"{reporter}: stopping the fit at step {trainer.global_step}: every tensor update of the last "
                       f"{self._streak} optimizer steps was skipped for inf/NaN gradients, so nothing is being "
                       f"trained (the params are those of before these steps). To fix it, {CHECKS}. "
                       f"stop_after_skipped_steps={self.stop_after} set this; None never stops.",
                       category=LowMemWarning)

    def summary(self) -> dict:
        """The figures for the end-of-fit summary: ``skipped_updates`` (this fit), ``skipped_steps``,
        ``stopped_at_step`` (``None`` unless this watch stopped the fit) and ``stop_after_skipped_steps``; empty when
        no optimizer has a counter."""
        if not self.optimizers:
            return {}
        return {"skipped_updates": self.skipped, "skipped_steps": self.skipped_steps,
                "stopped_at_step": self.stopped_at, "stop_after_skipped_steps": self.stop_after}


def _nonfinite_names(params: list[torch.Tensor], module: torch.nn.Module | None) -> list[str]:
    """Names (in ``module``) of the ``params`` whose gradient's fp32 sum of squares is not finite, as the
    optimizer's guard decides (one host read)."""
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return []
    finite = _square_sum_norms([local(p.grad) for p in with_grad], fused=False).isfinite().tolist()
    return _names_where_not(with_grad, finite, module)


def _nonfinite_weight_names(params: list[torch.Tensor], module: torch.nn.Module | None) -> list[str]:
    """Names (in ``module``) of the ``params`` (this rank's part of a sharded one) holding an inf or NaN (one host
    read per device)."""
    flags = [torch.isfinite(local(p.detach())).all() for p in params]
    devices = {flag.device for flag in flags}
    finite = (torch.stack(flags).tolist() if len(devices) == 1
              else [bool(flag) for flag in flags])
    return _names_where_not(params, finite, module)


def _names_where_not(params: list[torch.Tensor], finite: list[bool], module: torch.nn.Module | None) -> list[str]:
    """The names (in ``module``; else ``<param SHAPE>``) of the ``params`` whose ``finite`` flag is False."""
    names = {id(p): n for n, p in module.named_parameters()} if module is not None else {}
    return [names.get(id(p), f"<param {tuple(p.shape)}>") for p, ok in zip(params, finite) if not ok]


def _whole_weights_on_every_rank(trainer: L.Trainer, params: list[torch.Tensor]) -> bool:
    """Whether each rank holds the whole ``params`` (one process, or DDP), so every rank reading its own decides alike
    with no collective; not with sharded params (DTensor, FSDP's flat shards, DeepSpeed)."""
    if any(is_dtensor(p) for p in params):
        return False
    if trainer.world_size == 1:
        return True
    strategy = trainer.strategy
    return isinstance(strategy, DDPStrategy) and not isinstance(strategy, DeepSpeedStrategy)


def _shown(names: list[str]) -> str:
    """At most :data:`NAMES_SHOWN` of ``names``, and how many more."""
    more = f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else ""
    return ", ".join(names[:NAMES_SHOWN]) + more


class LostWeights:
    """The training loss not finite step after step because the weights hold inf/NaN (see the module doc).

    :meth:`add` takes each recorded loss's finiteness (the monitor reads losses in batches: no sync of its own);
    :meth:`check` reads the weights once the loss has not been finite for ``stop_after`` steps in a row (again when
    that streak doubles) and stops the fit if they hold inf/NaN; :meth:`final` reads them at the end of a fit whose last
    loss was not finite. ``stop_after`` ``None``: never stop."""

    def __init__(self, stop_after: int | None) -> None:
        self.stop_after = stop_after
        self.streak = 0
        """Recorded steps in a row (up to the last read) whose training loss was not finite."""
        self.since: int | None = None
        """The first step of that streak."""
        self.stopped_at: int | None = None
        """The step at which the fit was stopped for lost weights, if it was."""
        self.lost: list[str] = []
        """Names of the trainable params that held inf/NaN at the last read of the weights."""
        self.trainable = 0
        """Trainable params read then."""
        self._read_at = 0  # the streak at the last read of the weights

    def add(self, step: int, finite: bool) -> None:
        """The training loss of optimizer step ``step`` was (not) finite."""
        if finite:
            self.streak, self.since = 0, None
            self._read_at = 0
            return
        self.streak += 1
        self.since = step if self.since is None else self.since

    def check(self, trainer: L.Trainer, optimizers: list[torch.optim.Optimizer], reporter: str) -> None:
        """Stop the fit when the loss has not been finite for ``stop_after`` steps and the weights of ``optimizers``
        hold inf/NaN (the params are gathered only then)."""
        if (self.stop_after is None or self.stopped_at is not None or self.streak < self.stop_after
                or self.streak < 2 * self._read_at):
            return
        params = _trainable_params(optimizers)
        if not _whole_weights_on_every_rank(trainer, params):
            return
        self._read_at = self.streak
        self._read(params, trainer.lightning_module)
        if not self.lost:
            return
        self.stopped_at = trainer.global_step
        trainer.should_stop = True
        rank_zero_warn(f"{reporter}: stopping the fit at step {trainer.global_step}: the training loss was not finite "
                       f"in each of the last {self.streak} steps (since step {self.since}) and {len(self.lost)} of "
                       f"{self.trainable} trainable tensors now hold inf/NaN ({_shown(self.lost)}): the optimizer "
                       f"applied a non-finite update, and no later step can bring these weights back. Resume from a "
                       f"checkpoint saved before step {self.since}, or use one of this package's optimizers (they "
                       f"skip such updates). To fix the cause, {CHECKS}. stop_after_skipped_steps={self.stop_after} "
                       "set this; None never stops.", category=LowMemWarning)

    def final(self, optimizers: list[torch.optim.Optimizer], module: torch.nn.Module | None) -> None:
        """At the end of fit: when the last loss recorded was not finite, read the weights of ``optimizers`` (this
        rank's part)."""
        if self.streak:
            self._read(_trainable_params(optimizers), module)

    def _read(self, params: list[torch.Tensor], module: torch.nn.Module | None) -> None:
        self.trainable = len(params)
        self.lost = _nonfinite_weight_names(params, module) if params else []

    def summary(self) -> dict:
        """``lost_weights`` (trainable tensors holding inf/NaN at the end, 0 when not read or none),
        ``trainable_tensors``, ``loss_not_finite_since`` and ``lost_weights_stopped_at_step``."""
        return {"lost_weights": len(self.lost), "trainable_tensors": self.trainable,
                "loss_not_finite_since": self.since if self.lost else None,
                "lost_weights_stopped_at_step": self.stopped_at}
