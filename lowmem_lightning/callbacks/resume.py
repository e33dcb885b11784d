"""Resume compatibility: a checkpoint of another optimizer is refused before any step, and a new
learning rate given at resume applies. :class:`ResumeCompatibility` is the callback (one of the parts of
:class:`~lowmem_lightning.callbacks.LowMemOptimizerCallback`).

A checkpoint holds the optimizer's (quantized) state; another optimizer cannot read it, except where it
converts it (:data:`CONVERSIONS`): within the AdamW family every state converts into every other (fp32
``adamw``, ``adamw_8bit``, ``paged_adamw_8bit``, ``adamw_4bit``: the source codes are decoded to fp32 and
encoded with the target's own codes, step counters kept; :mod:`lowmem_lightning.optim.adamw_convert`), and
``lion``, ``ademamix`` and ``muon`` <-> their ``_8bit`` variants; a peer library's state (bitsandbytes, torchao,
came-pytorch, transformers' Adafactor) converts into ours of the same algorithm
(:mod:`lowmem_lightning.optim.peer_convert`). FSDP2 (``ModelParallelStrategy``) loads a
checkpoint into the optimizer's own ``state_dict()`` before :meth:`ResumeCompatibility.on_load_checkpoint` runs:
there a state-dict hook refuses an unconvertible checkpoint and presents the saved AdamW form's template, whose
codes the optimizer decodes with their own scales on load (any world size). A new
learning rate (:func:`apply_new_lr`): Lightning's restore brings back the checkpoint's param-group lrs and
scheduler base lrs, which are rescaled to the run's own (one line says so).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lowmem_lightning.callbacks.averaging import resume_from_training_weights
from lowmem_lightning.callbacks.swap import LR_KEYS
from lowmem_lightning.optim.adamw_convert import FORM_4BIT, FORM_8BIT, FORM_FP32, convert_on_load, prepare_sharded_load
from lowmem_lightning.optim.peer_convert import PEERS, conversion_note, converted_peer_state, identify_peer
from lowmem_lightning.optim.sharding import is_dtensor
from lowmem_lightning.optim.state_precision import check_checkpoint_groups

__all__ = [
    "ADAMW_FAMILY", "CONVERSIONS", "ResumeCompatibility", "RunLrAfterResume", "apply_new_lr", "base_lrs",
    "infer_optimizer", "checkpoint_optimizer", "refuse_missing_optimizer_callback", "refuse_weights_only",
    "START_FROM_WEIGHTS", "weights_only_problem",
]

ADAMW_FAMILY: dict[str, str] = {
    "adamw": "fp32 moments", "adamw_8bit": "8-bit codes", "paged_adamw_8bit": "8-bit codes in host pages",
    "adamw_4bit": "4-bit codes",
}
"""The AdamW family's optimizers, each with the form of its moments (every one loads every other's state)."""

_FORMS = {"adamw": FORM_FP32, "adamw_8bit": FORM_8BIT, "paged_adamw_8bit": FORM_8BIT, "adamw_4bit": FORM_4BIT}

CONVERSIONS: frozenset[tuple[str, str]] = frozenset({
    *((a, b) for a in ADAMW_FAMILY for b in ADAMW_FAMILY if a != b),
    *((a, b) for pair in (("lion", "lion_8bit"), ("ademamix", "ademamix_8bit"), ("muon", "muon_8bit"))
      for a, b in (pair, pair[::-1])),
})
"""``(checkpoint optimizer, new optimizer)`` pairs whose states the new optimizer converts on load (the AdamW
family, :data:`ADAMW_FAMILY`, every pair: decoded to fp32, encoded in the target's codes; Lion, AdEMAMix and Muon
quantize an fp32 state into their 8-bit codes and dequantize 8-bit codes into fp32, both ways)."""

OPTIMIZER_CALLBACK_KEY = "LowMemOptimizerCallback"
"""The ``state_key`` under which checkpoints hold what :class:`~lowmem_lightning.callbacks.LowMemOptimizerCallback`
built (``{"optimizer": name, "classes": [...]}``)."""


class RunLrAfterResume(L.Callback):
    """The run's own learning rate after a resume: Lightning's restore brings back the checkpoint's param-group and
    scheduler lrs, so a new lr (``--model.lr``, a module's or a callback's) would be silently replaced; the base
    lrs this run's configuration gave are applied again, the schedule keeping its position, said in one line
    (:func:`apply_new_lr`). The configured lrs are saved in the checkpoint (``configured_lrs``), so an lr the run
    moved itself (``ReduceLROnPlateau``, ``StochasticWeightAveraging``) is the schedule's position and stays.
    What ``lowmem fit`` adds to a fit without a LowMemOptimizerCallback (:class:`ResumeCompatibility` does it too)."""

    def __init__(self) -> None:
        self._built_lrs: list[list[float | None]] = []  # base lrs the run's configuration gave, before a restore
        self._saved_lrs: list[list[float | None]] | None = None  # the checkpointed run's configured base lrs

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Forget the configured lrs of an earlier fit's checkpoint (this fit's restore, if any, comes next)."""
        self._saved_lrs = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Refuse a weights-only checkpoint (:func:`refuse_weights_only`: Lightning calls no callback's
        ``on_load_checkpoint`` for a checkpoint without callback states); record the base lrs this run's
        configuration gave (the optimizer restore comes next)."""
        loaded = getattr(getattr(trainer, "_checkpoint_connector", None), "_loaded_checkpoint", None)
        if trainer.ckpt_path is not None and isinstance(loaded, dict) and loaded:
            refuse_weights_only(trainer, loaded)
        self._built_lrs = base_lrs(trainer.optimizers)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After a restore, the run's learning rate applies (the schedule keeps its position)."""
        if trainer.ckpt_path is not None:
            apply_new_lr(trainer, trainer.optimizers, self._built_lrs, self._saved_lrs)
        self._saved_lrs = None

    def state_dict(self) -> dict:
        """The base lrs this run's configuration gave (``configured_lrs``), which a resume compares with its own
        to tell a new lr from one the run moved (:func:`apply_new_lr`)."""
        return {"configured_lrs": self._built_lrs}

    def load_state_dict(self, state_dict: dict) -> None:
        """Take the checkpointed run's ``configured_lrs`` (restored before this fit's :meth:`on_train_start`)."""
        lrs = state_dict.get("configured_lrs")
        self._saved_lrs = lrs if isinstance(lrs, list) and lrs else None

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """A checkpoint a weight-averaging callback wrote, resumed without one, continues from its training weights
        (:func:`~lowmem_lightning.callbacks.averaging.resume_from_training_weights`; the module was loaded with the
        average before this hook: it is loaded again)."""
        if resume_from_training_weights(trainer, checkpoint):
            pl_module.load_state_dict(checkpoint["state_dict"], strict=pl_module.strict_loading)


class ResumeCompatibility(RunLrAfterResume):
    """Refuse (``ValueError``, before any step) to resume a checkpoint of another optimizer than ``optimizer``,
    unless it converts that state; after a restore, apply the run's learning rate (:func:`apply_new_lr`).

    Args:
        optimizer: Registered optimizer name the fit uses.
        saved_under: The checkpoint's ``callbacks`` key that names the optimizer it was trained with.
    """

    def __init__(self, optimizer: str, saved_under: str = OPTIMIZER_CALLBACK_KEY) -> None:
        super().__init__()
        self.optimizer_name = optimizer
        self.saved_under = saved_under
        self._hooks: list = []  # load-state-dict pre-hooks that decode 8/4-bit AdamW states for a torch AdamW
        self._sharded: dict[int, object] = {}  # id(optimizer) -> its loader of a sharded checkpoint of another form
        self._names: dict[str, str | None] = {}  # checkpoint path -> the optimizer it was trained with

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Record the base lrs this run's configuration gave (a checkpoint restore comes next); a torch AdamW
        (``adamw``) is made to decode an ``adamw_8bit`` / ``paged_adamw_8bit`` / ``adamw_4bit`` state on load."""
        super().on_fit_start(trainer, pl_module)
        if self.optimizer_name == "adamw":
            self._hooks = [convert_on_load(opt) for opt in trainer.optimizers
                           if isinstance(opt, torch.optim.Adam | torch.optim.AdamW)]
        if trainer.state.fn == "fit":
            self._sharded, self._names = {}, {}
            hook = functools.partial(self._present_sharded, trainer)
            self._hooks += [opt.register_state_dict_post_hook(hook) for opt in trainer.optimizers]

    def _present_sharded(self, trainer: L.Trainer, optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
        """State-dict post-hook until training starts. A sharded checkpoint (a ``torch.distributed.checkpoint``
        folder: ``ModelParallelStrategy``, FSDP2) is loaded into this optimizer's own ``state_dict()`` before
        :meth:`on_load_checkpoint` sees it: refuse one of an optimizer whose state this one cannot read
        (``ValueError``), and present another AdamW-family form's template, decoded and re-encoded on load
        (:func:`~lowmem_lightning.optim.adamw_convert.prepare_sharded_load`). The same for a single-file checkpoint
        of sharded (DTensor) params, which ``ModelParallelStrategy`` also loads into ``state_dict()``'s tensors.
        A checkpoint saved under another ``fp32_state`` (other param groups) is refused too
        (:func:`~lowmem_lightning.optim.state_precision.check_checkpoint_groups`)."""
        if not any(is_dtensor(p) for group in optimizer.param_groups for p in group["params"]):
            return state_dict
        if optimizer in trainer.optimizers:  # another fp32_state: refused before the load fails on missing keys
            check_checkpoint_groups(trainer.ckpt_path, trainer.optimizers.index(optimizer), optimizer)
        key = str(trainer.ckpt_path)
        if key not in self._names:
            self._names[key] = checkpoint_optimizer(trainer.ckpt_path, self.saved_under)
        name = self._names[key]
        if name is None or name == self.optimizer_name:
            return state_dict
        if (name, self.optimizer_name) not in CONVERSIONS:
            raise ValueError(_refusal(name, self.optimizer_name, trainer.ckpt_path))
        source, target = _FORMS.get(name), _FORMS.get(self.optimizer_name)
        if source is None or target is None or source == target:
            return state_dict
        if id(optimizer) not in self._sharded:  # once per fit: the load that follows removes the loader's hooks
            self._sharded[id(optimizer)] = loader = prepare_sharded_load(optimizer, source, present=False)
            self._hooks.append(loader)
        loader = self._sharded[id(optimizer)]
        return loader.present(optimizer, state_dict) if loader.handles else state_dict

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After a restore, the run's learning rate applies (the schedule keeps its position)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        super().on_train_start(trainer, pl_module)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """Refuse a checkpoint trained with an optimizer whose state this one cannot read (in ``fit`` only:
        validate, test and predict read the weights, not the optimizer state; no trainer: checked as in fit); see
        also :meth:`RunLrAfterResume.on_load_checkpoint`."""
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        if trainer is not None and trainer.state.fn != "fit":
            return
        saved = (checkpoint.get("callbacks") or {}).get(self.saved_under)
        if not isinstance(saved, dict) and self._convert_peer_states(checkpoint):
            return
        name = saved.get("optimizer") if isinstance(saved, dict) else infer_optimizer(checkpoint)
        if name is None or name == self.optimizer_name:
            return
        if (name, self.optimizer_name) in CONVERSIONS:
            rank_zero_info(f"LowMemOptimizerCallback: converting the checkpoint's {name!r} optimizer state to "
                           f"{self.optimizer_name!r}{_forms(name, self.optimizer_name)}.")
            return
        raise ValueError(_refusal(name, self.optimizer_name, getattr(trainer, "ckpt_path", None)))

    def _convert_peer_states(self, checkpoint: dict) -> bool:
        """Replace (in place) every optimizer state a peer library saved (bitsandbytes, torchao, came-pytorch,
        transformers' Adafactor: :func:`~lowmem_lightning.optim.peer_convert.identify_peer`) by one this run's
        optimizer loads, saying so in one line; ``ValueError`` (the refusal) when it runs another algorithm.
        Returns whether the checkpoint held a peer's state."""
        states = checkpoint.get("optimizer_states") or []
        kinds = [identify_peer(state) for state in states]
        found = list(dict.fromkeys(kind for kind in kinds if kind))
        if not found:
            return False
        for index, kind in enumerate(kinds):
            if kind:
                states[index] = converted_peer_state(states[index], kind, self.optimizer_name)
        notes = "; ".join(conversion_note(kind, self.optimizer_name) for kind in found)
        labels = " and ".join(PEERS[kind].label for kind in found)
        rank_zero_info(f"LowMemOptimizerCallback: converting the checkpoint's {labels} optimizer state to "
                       f"{self.optimizer_name!r} ({notes}).")
        return True


def _refusal(name: str, own: str, path=None) -> str:
    """Why a checkpoint of optimizer ``name`` cannot be resumed with ``own``, and what to do; ``path``, the file
    read (``--ckpt_path last`` chooses one the user did not type), is named when known."""
    which = f"Cannot resume from {path}: it" if path else "Cannot resume: the checkpoint"
    return (
        f"{which} was trained with optimizer {name!r}, but "
        f"LowMemOptimizerCallback(optimizer={own!r}) was given and cannot read its state. "
        f"Resume with optimizer={name!r} (lowmem fit: --optim {name}), or load only the weights (e.g. "
        "Module.load_from_checkpoint(path) and a new fit without ckpt_path) to switch optimizers."
    )


def checkpoint_optimizer(path, saved_under: str = OPTIMIZER_CALLBACK_KEY) -> str | None:
    """The optimizer the checkpoint at ``path`` was trained with: the name its ``LowMemOptimizerCallback`` state
    gives, else ``"adamw"`` when its optimizer state holds exactly torch AdamW's moments, else ``None`` (also for
    a missing path). ``path``: a file, or a sharded checkpoint folder (``torch.distributed.checkpoint``, as
    ``ModelParallelStrategy`` writes it: ``meta.pt`` beside the shards, read without the shards)."""
    path = Path(path) if path is not None else None
    if path is None or not (path.is_file() or (path / "meta.pt").is_file()):
        return None
    folder = path.is_dir()
    meta = torch.load(path / "meta.pt" if folder else path, map_location="cpu", mmap=not folder, weights_only=False)
    saved = (meta.get("callbacks") or {}).get(saved_under) if isinstance(meta, dict) else None
    if isinstance(saved, dict) and isinstance(saved.get("optimizer"), str):
        return saved["optimizer"]
    if not folder:
        return infer_optimizer(meta) if isinstance(meta, dict) else None
    from torch.distributed.checkpoint import FileSystemReader

    keys = {key.rsplit(".", 1)[-1] for key in FileSystemReader(str(path)).read_metadata().state_dict_metadata
            if key.startswith("optimizer_") and ".state." in key}
    return "adamw" if keys and {"exp_avg", "exp_avg_sq", "step"} <= keys <= {"exp_avg", "exp_avg_sq", "step",
                                                                              "max_exp_avg_sq"} else None


def _forms(source: str, target: str) -> str:
    """What converting ``source``'s state into ``target``'s does, in parentheses, for a pair of
    :data:`ADAMW_FAMILY` (e.g. `` (its 8-bit codes decoded to fp32, encoded into 4-bit codes; ...)``), else ``""``."""
    if source not in ADAMW_FAMILY or target not in ADAMW_FAMILY:
        return ""
    if "8-bit" in ADAMW_FAMILY[source] and "8-bit" in ADAMW_FAMILY[target]:
        return " (the same 8-bit codes)"
    decoded = "its fp32 moments" if source == "adamw" else f"its {ADAMW_FAMILY[source]} decoded to fp32"
    encoded = "kept as fp32 moments" if target == "adamw" else f"encoded into {ADAMW_FAMILY[target]}"
    return f" ({decoded}, {encoded}; step counters kept)"


def infer_optimizer(checkpoint: dict) -> str | None:
    """``"adamw"`` when the checkpoint's optimizer states look like torch Adam/AdamW, else ``None``."""
    states = checkpoint.get("optimizer_states") or []
    keys = set()
    for state in states:
        for per_param in (state.get("state") or {}).values():
            keys |= set(per_param)
    if keys and {"exp_avg", "exp_avg_sq", "step"} <= keys <= {"exp_avg", "exp_avg_sq", "step", "max_exp_avg_sq"}:
        return "adamw"
    return None


def base_lrs(optimizers: list[torch.optim.Optimizer]) -> list[list[float | None]]:
    """The base lr of every param group (``initial_lr`` when a scheduler set it, else ``lr``)."""
    return [[group.get("initial_lr", group.get("lr")) for group in opt.param_groups] for opt in optimizers]


def _scale_scheduler(scheduler, index: int, factor: float) -> None:
    for name in ("base_lrs", "max_lrs", "_last_lr"):
        values = getattr(scheduler, name, None)
        if isinstance(values, list) and index < len(values) and isinstance(values[index], (int, float)):
            values[index] *= factor


def apply_new_lr(trainer: L.Trainer, optimizers: list, built: list[list[float | None]],
                 saved: list[list[float | None]] | None = None) -> list[tuple[float, float]]:
    """After a checkpoint was restored: rescale every param group whose base lr this run's configuration
    changed, and its scheduler's base lrs, so the run's lr applies while the schedule keeps its position. Says so
    in one line; returns the ``(checkpoint lr, new lr)`` pairs changed.

    ``built``: the base lrs this run's configuration gave (:func:`base_lrs` before the restore); ``saved``: the
    ones the checkpointed run's configuration gave (recorded in the checkpoint, :class:`ResumeCompatibility`), whose
    ratio to ``built`` is the factor: an lr the run itself moved (``ReduceLROnPlateau``, ``StochasticWeightAveraging``'s
    ``initial_lr``, a tuner) is the schedule's position and stays. Without ``saved`` (a checkpoint that does not
    record it), the restored base lr is compared with ``built`` instead."""
    changed = []
    for index, (opt, now, wanted) in enumerate(zip(optimizers, base_lrs(optimizers), built)):
        before = saved[index] if saved is not None and index < len(saved) else now
        schedulers = [c.scheduler for c in trainer.lr_scheduler_configs if c.scheduler.optimizer is opt]
        for group_index, (group, old, new) in enumerate(zip(opt.param_groups, before, wanted)):
            if not _differs(old, new):
                continue
            factor = new / old
            for key in LR_KEYS:
                if isinstance(group.get(key), (int, float)):
                    group[key] *= factor
            for scheduler in schedulers:
                _scale_scheduler(scheduler, group_index, factor)
            changed.append((old, new))
    if changed:
        pairs = ", ".join(f"{old:g} -> {new:g}" for old, new in dict.fromkeys(changed))
        rank_zero_info(f"Resumed with a new learning rate: base lr {pairs} (the checkpoint's); the new lr applies "
                       "from this step on and the LR schedule keeps its position.")
    return changed


def _differs(old, new) -> bool:
    numbers = isinstance(old, (int, float)) and isinstance(new, (int, float))
    return numbers and old != 0 and new is not None and not math.isclose(old, new, rel_tol=1e-9, abs_tol=0.0)


def refuse_missing_optimizer_callback(trainer: L.Trainer | None, checkpoint: dict, own_optimizer: str | None) -> None:
    """Refuse (``ValueError``, before any step) to resume a checkpoint written with
    :class:`~lowmem_lightning.callbacks.LowMemOptimizerCallback` in a fit that has none, when the module's own
    optimizer (``own_optimizer``: its registered name, ``None`` if unknown) is not the one whose state the
    checkpoint holds: the module's optimizer would be handed that state and fail at its first step
    (torch AdamW: ``KeyError: 'exp_avg'``). Called from a module's ``on_load_checkpoint``; does nothing
    outside ``fit`` (weights-only loads, validate/test) or when the callback is present (it checks itself)."""
    if trainer is None or trainer.state.fn != "fit":
        return
    saved = [v for k, v in (checkpoint.get("callbacks") or {}).items()
             if str(k).startswith(OPTIMIZER_CALLBACK_KEY) and isinstance(v, dict)]
    if not saved:
        return
    from lowmem_lightning.callbacks.optimizer import LowMemOptimizerCallback

    if any(isinstance(callback, LowMemOptimizerCallback) for callback in trainer.callbacks):
        return
    name = saved[0].get("optimizer")
    if name is None or name == own_optimizer:
        return
    own = f"{own_optimizer!r}" if own_optimizer else "the module's configure_optimizers"
    raise ValueError(
        f"Cannot resume from {trainer.ckpt_path}: it was written with LowMemOptimizerCallback(optimizer={name!r}) "
        f"and holds that optimizer's state, but this fit has no LowMemOptimizerCallback, so the module's own "
        f"optimizer ({own}) would be given it. Resume with the callback: add LowMemOptimizerCallback({name!r}) to "
        f"the Trainer's callbacks (lowmem fit: --optim {name}), or load only the weights "
        "(Module.load_from_checkpoint(path), then a fit without ckpt_path)."
    )


START_FROM_WEIGHTS = ("to start a new fit from its weights, load them with Module.load_from_checkpoint(path) (or "
                      "model.load_state_dict(torch.load(path)['state_dict'])) and fit without ckpt_path")
"""How to use a weights-only checkpoint instead of resuming it (the end of :func:`weights_only_problem`'s sentence)."""


def weights_only_problem(checkpoint: dict) -> str | None:
    """Why ``checkpoint`` cannot resume a fit when it holds the weights only (``ModelCheckpoint(save_weights_only=
    True)``, ``trainer.save_checkpoint(path, weights_only=True)``: no ``optimizer_states``, ``lr_schedulers`` or
    ``callbacks``), else ``None``: one clause, ending with what to do instead (:data:`START_FROM_WEIGHTS`). A
    sharded or DeepSpeed checkpoint, whose optimizer state the strategy loads itself, still carries ``lr_schedulers``
    and ``callbacks`` and is not one."""
    if not isinstance(checkpoint, dict) or any(k in checkpoint for k in ("optimizer_states", "lr_schedulers",
                                                                        "callbacks")):
        return None
    return ("it holds the model weights only (saved with ModelCheckpoint(save_weights_only=True) or "
            "save_checkpoint(weights_only=True)) and no optimizer or LR scheduler state to continue from; "
            f"{START_FROM_WEIGHTS}")


def refuse_weights_only(trainer: L.Trainer | None, checkpoint: dict) -> None:
    """``ValueError`` (before any step, nothing written) when a fit resumes from a weights-only checkpoint
    (:func:`weights_only_problem`); Lightning would stop later with ``KeyError`` in its optimizer restore. Does
    nothing outside ``fit`` (validate, test and predict read only the weights) or without a trainer
    (``load_from_checkpoint``)."""
    if trainer is None or trainer.state.fn != "fit":
        return
    problem = weights_only_problem(checkpoint)
    if problem is not None:
        raise ValueError(f"Cannot resume from {trainer.ckpt_path or 'the checkpoint'}: {problem}.")
