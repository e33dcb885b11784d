"""Checkpoints written after a weight-averaging callback ended the fit still resume from the training weights.

Lightning's ``WeightAveraging`` (``EMAWeightAveraging``, 2.6) saves the average as the checkpoint's ``state_dict``
and the module's weights as ``current_model_state``, which a resume loads into the module. At ``on_train_end`` it
copies the average into the module (the training weights are gone), and only then does
``ModelCheckpoint.on_train_end`` write ``last.ckpt`` when ``save_last`` found nothing saved yet (``save_top_k=0``,
or a run shorter than the save interval); a ``trainer.save_checkpoint`` after ``fit`` does the same. Such a
checkpoint holds the average twice, and a resume from it (``lowmem fit --ckpt_path last``) continues training
from the averaged weights with the optimizer state of the training ones. Checkpoints saved during training
(``every_n_train_steps``, epoch end, validation end) are not affected: the training weights are in the module.

:class:`KeepTrainingWeights` (put right before each averaging callback by :func:`keep_training_weights`, from
``LowMemOptimizerCallback.on_fit_start``) copies to the CPU, at ``on_train_end`` before the averaging callback
overwrites them, the params and buffers the copy will change, and puts them back into a checkpoint saved after
that, where the averaging callback moves them to ``current_model_state``: the resume is that of an
uninterrupted run.

The SIGTERM checkpoint (:class:`~.preemption.PreemptionCheckpoint`, saved in ``on_train_batch_end``) must come
after the averaging callback's ``on_train_batch_end``, which folds that step into the average: saved before it,
the resumed run never averaged the step it stopped at (its average differed from the uninterrupted run's while
its training weights matched). :func:`serve_weight_averaging` moves it after the last averaging callback.

The average is a deep copy of the whole module (torch's ``AveragedModel``), made in the averaging callback's
``setup`` on the device the module is built on: for a LoRA / QLoRA run a second frozen base (3.9 GB of NF4 codes and
embeddings for a 7B), held on the device for the whole fit, copied from the model at every update
(``use_buffers=False``), and written into every checkpoint beside the module's own. :class:`AverageSharesFrozen`
lets the copy share, rather than copy, what does not train: submodules without a trainable param (NF4 layers, frozen
embeddings and norms, host-held embedding tables), and the frozen params and the buffers not averaged of the others
(with ``use_buffers=True`` the persistent buffers outside NF4 layers are averaged, a BatchNorm's statistics; NF4
codes and scales, a frozen weight, and non-persistent buffers, derived state, are shared). The average of a tensor
that does not change is that tensor (:class:`AverageOfItself`), so the averages of what trains are bit-equal to the
full copy's, and ``torch.save`` writes a shared tensor once. The frozen tensors stay exactly the base's, where the
full copy's average of them drifts by rounding (EMA's ``0.8 * w + 0.2 * w`` is not always ``w`` in floating point)
and the end-of-fit copy writes that drift into the module's frozen weights.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import sys
import types
from dataclasses import dataclass, field

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_swa_multi_avg_fn

from lowmem_lightning.callbacks.preemption import PreemptionCheckpoint
from lowmem_lightning.optim.sharding import is_dtensor

__all__ = ["AverageOfItself", "AverageSharesFrozen", "EMAFunction", "EMAMultiFunction", "KeepTrainingWeights",
           "SharedAverageUpdate", "SharedParts", "ema_decay", "keep_training_weights", "picklable_averaging",
           "quantized_layer_kinds", "resume_from_training_weights", "serve_weight_averaging", "shareable_parts",
           "swap_unshared"]


class KeepTrainingWeights(L.Callback):
    """Keeps the training weights that ``averaging`` overwrites with the average at ``on_train_end`` and writes
    them into the ``state_dict`` of a checkpoint saved afterwards (``averaging`` then moves them to
    ``current_model_state``). Must come right before ``averaging`` in ``trainer.callbacks``.

    Args:
        averaging: the ``WeightAveraging`` callback whose end-of-fit copy is undone in checkpoints.
    """

    def __init__(self, averaging: WeightAveraging) -> None:
        self.averaging = averaging
        """The weight-averaging callback this one serves."""
        self.kept: dict[str, torch.Tensor] = {}
        """The training values (on the CPU) of the params and buffers the end-of-fit copy changed, by name."""

    @property
    def state_key(self) -> str:
        """Unique per averaging callback (Lightning requires unique keys); nothing is saved under it."""
        return f"{type(self).__name__}[{self.averaging.state_key}]"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Forget what a previous fit kept."""
        self.kept = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Copy to the CPU each param and buffer that differs from the average about to be copied over it."""
        average = self.averaging._average_model
        if average is None:
            return
        pairs = zip(itertools.chain(average.module.parameters(), average.module.buffers()),
                    itertools.chain(pl_module.named_parameters(), pl_module.named_buffers()))
        self.kept = {name: value.detach().to("cpu", copy=True)
                     for averaged, (name, value) in pairs if not torch.equal(averaged, value.to(averaged.device))}

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """Put the kept training values into ``checkpoint["state_dict"]`` (only while the averaging callback
        holds an average, i.e. it moves ``state_dict`` to ``current_model_state`` next)."""
        if not self.kept or self.averaging._average_model is None:
            return
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {name: self.kept.get(name, value) for name, value in state.items()}


def keep_training_weights(trainer: L.Trainer) -> None:
    """Put a :class:`KeepTrainingWeights` right before each ``WeightAveraging`` callback of ``trainer`` that has
    none yet (a new list: safe while Lightning iterates the old one)."""
    callbacks = list(trainer.callbacks)
    served = {id(c.averaging) for c in callbacks if isinstance(c, KeepTrainingWeights)}
    ordered: list[L.Callback] = []
    for callback in callbacks:
        if isinstance(callback, WeightAveraging) and id(callback) not in served:
            ordered.append(KeepTrainingWeights(callback))
        ordered.append(callback)
    if len(ordered) != len(callbacks):
        trainer.callbacks = ordered


def serve_weight_averaging(trainer: L.Trainer) -> None:
    """With a ``WeightAveraging`` callback in ``trainer``: a :class:`KeepTrainingWeights` right before each, and
    each :class:`~.preemption.PreemptionCheckpoint` right after the last one (so the SIGTERM checkpoint holds the
    average of the step it stops at). Replaces ``trainer.callbacks`` with a new list when it changes anything."""
    keep_training_weights(trainer)
    callbacks = list(trainer.callbacks)
    last = max((i for i, c in enumerate(callbacks) if isinstance(c, WeightAveraging)), default=0)
    early = [c for c in callbacks[:last] if isinstance(c, PreemptionCheckpoint)]  # none without averaging
    if early:
        kept = [c for c in callbacks if not any(c is e for e in early)]
        position = next(i for i, c in enumerate(kept) if c is callbacks[last]) + 1
        trainer.callbacks = kept[:position] + early + kept[position:]


@dataclass
class SharedParts:
    """Dotted names (relative to the module) of what a weight average shares with the module it averages."""

    modules: list[str] = field(default_factory=list)
    """Submodules without a trainable param (nor, when buffers are averaged, a buffer averaged as a statistic): shared
    whole."""
    params: list[str] = field(default_factory=list)
    """Frozen params of the other submodules."""
    buffers: list[str] = field(default_factory=list)
    """Buffers of the other submodules that are not averaged (all of them with ``use_buffers=False``: they follow the
    model; else the non-persistent ones)."""

    def objects(self, module: nn.Module) -> list:
        """The submodules, params and buffers of ``module`` these names stand for."""
        return ([module.get_submodule(n) for n in self.modules] + [module.get_parameter(n) for n in self.params]
                + [module.get_buffer(n) for n in self.buffers])


def quantized_layer_kinds() -> tuple[type, ...]:
    """The NF4 layer classes (``Linear4bit``, ``Experts4bit``) among the imported modules (none is built before its
    module is imported; nothing is imported here)."""
    found = (getattr(sys.modules.get("lowmem_lightning.quant.linear4bit"), "Linear4bit", None),
             getattr(sys.modules.get("lowmem_lightning.quant.experts"), "Experts4bit", None))
    return tuple(kind for kind in found if kind is not None)


def _averaged_buffers(module: nn.Module, kinds: tuple[type, ...]) -> list[str]:
    """Names of ``module``'s own buffers that an average with ``use_buffers=True`` averages as statistics: the
    persistent ones, but none of an NF4 layer (its codes and scales are a frozen weight, destroyed if averaged as
    numbers). A non-persistent buffer (rotary frequencies) is derived state, which averaging only blurs by rounding."""
    if isinstance(module, kinds):
        return []
    return [n for n, b in module._buffers.items() if b is not None and n not in module._non_persistent_buffers_set]


def _holds_nothing_averaged(module: nn.Module, use_buffers: bool) -> bool:
    """No trainable param in ``module``, and (when buffers are averaged) no buffer averaged as a statistic
    (:func:`_averaged_buffers`)."""
    if any(p.requires_grad for p in module.parameters()):
        return False
    kinds = quantized_layer_kinds()
    return not use_buffers or not any(_averaged_buffers(m, kinds) for m in module.modules())


def shareable_parts(module: nn.Module, use_buffers: bool) -> SharedParts:
    """What an average of ``module`` may share with it (:class:`SharedParts`): the largest submodules holding no
    trainable param (nor, when ``use_buffers``, a buffer averaged as a statistic: :func:`_averaged_buffers`), and
    elsewhere the frozen params and the buffers not averaged."""
    parts, kinds = SharedParts(), quantized_layer_kinds()

    def walk(owner: nn.Module, prefix: str) -> None:
        for name, child in owner.named_children():
            if _holds_nothing_averaged(child, use_buffers):
                parts.modules.append(prefix + name)
            else:
                walk(child, f"{prefix}{name}.")
        parts.params.extend(prefix + n for n, p in owner._parameters.items() if p is not None and not p.requires_grad)
        averaged = _averaged_buffers(owner, kinds) if use_buffers else []
        parts.buffers.extend(prefix + n for n, b in owner._buffers.items() if b is not None and n not in averaged)

    walk(module, "")
    return parts


def _split(name: str) -> tuple[str, str]:
    owner, _, leaf = name.rpartition(".")
    return owner, leaf


def share_parts(average: nn.Module, module: nn.Module, parts: SharedParts) -> None:
    """Point ``average`` (a copy of ``module``) at ``module``'s own objects for ``parts``, dropping its copies."""
    for name in parts.modules:
        average.set_submodule(name, module.get_submodule(name))
    for name in parts.params:
        owner, leaf = _split(name)
        average.get_submodule(owner)._parameters[leaf] = module.get_parameter(name)
    for name in parts.buffers:
        owner, leaf = _split(name)
        average.get_submodule(owner)._buffers[leaf] = module.get_buffer(name)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape
            and a.stride() == b.stride())


class AverageOfItself:
    """An ``AveragedModel`` averaging function (``avg_fn`` or ``multi_avg_fn``) that leaves a shared tensor (the
    average's is the model's) as it is: the average of a tensor that does not change is that tensor, while
    ``0.8 * w + 0.2 * w`` in floating point is ``w`` give or take a rounding, which written into a shared tensor would
    change the frozen weight. The other pairs go to ``inner``."""

    def __init__(self, inner, multi: bool) -> None:
        self.inner = inner
        """The averaging function wrapped."""
        self.multi = multi
        """Whether ``inner`` takes lists of tensors (``multi_avg_fn``) or one pair (``avg_fn``)."""

    def __call__(self, averaged, current, n_averaged):
        if not self.multi:
            return averaged if _same_memory(averaged, current) else self.inner(averaged, current, n_averaged)
        pairs = [(a, c) for a, c in zip(averaged, current) if not _same_memory(a, c)]
        if pairs:
            self.inner([a for a, _ in pairs], [c for _, c in pairs], n_averaged)
        return None


def _unshared_pairs(average: nn.Module, module: nn.Module, params: bool = True, buffers: bool = True) -> list[tuple]:
    """``(average's, module's)`` pairs of their params and / or buffers, in order, without those that are one
    tensor (shared)."""
    def tensors(owner: nn.Module):
        return itertools.chain(owner.parameters() if params else (), owner.buffers() if buffers else ())

    return [(a, m) for a, m in zip(tensors(average), tensors(module)) if not _same_memory(a, m)]


class SharedAverageUpdate:
    """``AveragedModel.update_parameters`` of an average that shares the module's frozen parts: torch's update (copy
    at the first, then ``avg_fn`` / ``multi_avg_fn`` per device and dtype, buffers copied unless averaged,
    ``n_averaged + 1``) over the pairs of tensors it does not share, listed once. torch's walks both module trees
    at every update (``parameters()``, ``buffers()``), which for a peft model is most of an update's time; a shared
    pair needs nothing (its average is itself). :meth:`relist` after the sharing changes."""

    def __init__(self, average: AveragedModel) -> None:
        self.average = average
        """The average updated."""
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._model_id: int | None = None

    def relist(self) -> None:
        """List the pairs again at the next update."""
        self._pairs = None

    def _list(self, model: nn.Module) -> None:
        average = self.average
        self._pairs = _unshared_pairs(average.module, model, params=True, buffers=average.use_buffers)
        self._buffers = [] if average.use_buffers else _unshared_pairs(average.module, model, params=False)
        self._model_id = id(model)

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> None:
        if self._pairs is None or self._model_id != id(model):
            self._list(model)
        average = self.average
        pairs = [(a.detach(), m.detach().to(a.device)) for a, m in self._pairs]
        if average.n_averaged == 0:
            for mine, theirs in pairs:
                mine.copy_(theirs)
        elif pairs:
            self._average(pairs)
        for mine, theirs in self._buffers:
            mine.detach().copy_(theirs.detach().to(mine.device))
        average.n_averaged += 1

    def _average(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        average = self.average
        if average.avg_fn is not None and average.multi_avg_fn is None:
            for mine, theirs in pairs:
                mine.copy_(average.avg_fn(mine, theirs, average.n_averaged.to(mine.device)))
            return
        groups: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for mine, theirs in pairs:
            groups.setdefault((mine.device, mine.dtype), []).append((mine, theirs))
        function = average.multi_avg_fn or get_swa_multi_avg_fn()
        for (device, _), group in groups.items():
            function([a for a, _ in group], [m for _, m in group], average.n_averaged.to(device))


def _average_shared_as_themselves(average: AveragedModel) -> None:
    """Wrap ``average``'s averaging function in :class:`AverageOfItself` (once); an EMA of one tensor at a time
    (``EMAWeightAveraging``'s) becomes :class:`EMAMultiFunction`, the same bits in a few multi-tensor calls; the
    update lists the pairs it averages once (:class:`SharedAverageUpdate`)."""
    update = average.__dict__.get("update_parameters")
    if isinstance(update, SharedAverageUpdate):
        update.relist()
    else:
        average.update_parameters = SharedAverageUpdate(average)
    if isinstance(average.avg_fn, AverageOfItself) or isinstance(average.multi_avg_fn, AverageOfItself):
        return
    decay = ema_decay(average.avg_fn)
    if decay is not None:
        average.avg_fn, average.multi_avg_fn = None, EMAMultiFunction(decay)
    if average.avg_fn is not None:
        average.avg_fn = AverageOfItself(average.avg_fn, multi=False)
    else:
        average.multi_avg_fn = AverageOfItself(average.multi_avg_fn or get_swa_multi_avg_fn(), multi=True)


def _sharing_copy(module: nn.Module, parts: SharedParts) -> nn.Module:
    """``copy.deepcopy(module)`` whose ``parts`` are ``module``'s own objects, never copied."""
    return copy.deepcopy(module, {id(obj): obj for obj in parts.objects(module)})


class AverageSharesFrozen(L.Callback):
    """Makes the average of each ``WeightAveraging`` callback (Lightning's ``EMAWeightAveraging``) share with the
    module what does not train (:func:`shareable_parts`) instead of copying it: for a QLoRA run the average holds the
    LoRA weights alone, not a second NF4 base.

    Listed before an averaging callback (``LowMemOptimizerCallback`` puts it right after itself), it has the
    averaging's copy of the module share from the start (the module's ``copy.deepcopy`` answers with a sharing copy,
    once per averaging callback that has not copied yet); otherwise the copy's frozen parts are dropped at this
    callback's ``setup``. At ``on_fit_start`` (the module has been moved to its device) what is shareable is shared
    again. A shared param that later trains (``BackboneFinetuning`` unfreezing a backbone) gets its own copy in the
    average at the first training batch that trains it, with the value a full copy would hold there (an average of
    a tensor that did not change is that tensor). An average kept on another device than the module's
    (``device=``) or of a sharded module is left as Lightning builds it. A shared average updates over the pairs
    it does not share (:class:`SharedAverageUpdate`) and swaps only those for validation (:func:`swap_unshared`).
    With several instances in the Trainer
    (``LowMemModule`` returns one from ``configure_callbacks``, the optimizer callback brings one) the first listed
    does the work.
    """

    def __init__(self) -> None:
        self.shared: dict[int, SharedParts] = {}
        """What each averaging callback's average shares, by ``id`` of the callback."""
        self._watched: list[nn.Parameter] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Have each averaging callback listed after this one (its ``setup``, which copies the module, comes next in
        this pass; at every fit, a notebook's second one too) make a sharing copy; trim the copies made before."""
        if stage != "fit" or not self._first(trainer):
            return
        position = next(i for i, c in enumerate(trainer.callbacks) if c is self)
        later = [c for c in trainer.callbacks[position + 1:]
                 if isinstance(c, WeightAveraging) and _may_share(c, pl_module)]
        if later:
            _copy_sharing(pl_module, len(later))
        self._share_all(trainer, pl_module)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Stop answering copies of the module; share again what the module's move to its device separated; put a
        :class:`KeepTrainingWeights` before each averaging callback that has none (:func:`keep_training_weights`:
        ``LowMemOptimizerCallback`` did at its own ``on_fit_start``; a ``LowMemModule`` without it gets them here)."""
        if self._first(trainer):
            _stop_copying_sharing(pl_module)
            self._share_all(trainer, pl_module)
            keep_training_weights(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """A fit stopped before ``on_fit_start`` leaves no sharing copy behind."""
        _stop_copying_sharing(pl_module)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """As :meth:`on_exception`."""
        _stop_copying_sharing(pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        """Give each average its own copy of a shared param that trains from this batch on."""
        if any(p.requires_grad for p in self._watched):
            for averaging in _averagings(trainer):
                if id(averaging) in self.shared:
                    self._unshare_trained(averaging, pl_module)
            self._watch(trainer, pl_module)

    def _first(self, trainer: L.Trainer) -> bool:
        return next(c for c in trainer.callbacks if isinstance(c, AverageSharesFrozen)) is self

    def _share_all(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for averaging in _averagings(trainer):
            if averaging._average_model is not None and _may_share(averaging, pl_module):
                parts = shareable_parts(pl_module, averaging._use_buffers)
                share_parts(averaging._average_model.module, pl_module, parts)
                _average_shared_as_themselves(averaging._average_model)
                averaging._swap_models = types.MethodType(swap_unshared, averaging)
                self.shared[id(averaging)] = parts
        self._watch(trainer, pl_module)

    def _watch(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        watched = {}
        for averaging in _averagings(trainer):
            parts = self.shared.get(id(averaging))
            if parts is not None:
                for obj in parts.objects(pl_module):
                    for param in obj.parameters() if isinstance(obj, nn.Module) else [obj]:
                        if isinstance(param, nn.Parameter):
                            watched[id(param)] = param
        self._watched = list(watched.values())

    def _unshare_trained(self, averaging: WeightAveraging, pl_module: L.LightningModule) -> None:
        average, parts = averaging._average_model.module, self.shared[id(averaging)]
        kept = SharedParts(buffers=list(parts.buffers))
        for name in parts.modules:
            child = pl_module.get_submodule(name)
            if _holds_nothing_averaged(child, averaging._use_buffers):
                kept.modules.append(name)
                continue
            inner = shareable_parts(child, averaging._use_buffers)
            average.set_submodule(name, _sharing_copy(child, inner))
            kept.modules += [f"{name}.{n}" for n in inner.modules]
            kept.params += [f"{name}.{n}" for n in inner.params]
            kept.buffers += [f"{name}.{n}" for n in inner.buffers]
        for name in parts.params:
            param = pl_module.get_parameter(name)
            if param.requires_grad:
                owner, leaf = _split(name)
                average.get_submodule(owner)._parameters[leaf] = copy.deepcopy(param)
            else:
                kept.params.append(name)
        self.shared[id(averaging)] = kept
        update = averaging._average_model.__dict__.get("update_parameters")
        if isinstance(update, SharedAverageUpdate):
            update.relist()  # the params just copied are averaged from now on


def swap_unshared(averaging: WeightAveraging, pl_module: L.LightningModule) -> None:
    """``WeightAveraging._swap_models`` (the average into the module for validation, and back) without the tensors
    the average shares with the module: Lightning's clones each pair's average first, for a shared tensor a copy of
    it swapped with itself (the whole frozen base read and written three times per swap, two swaps per validation,
    and the largest frozen tensor allocated once more)."""
    for mine, theirs in _unshared_pairs(averaging._average_model.module, pl_module):
        kept = mine.data.clone()
        mine.data.copy_(theirs.data)
        theirs.data.copy_(kept)


def _averagings(trainer: L.Trainer) -> list[WeightAveraging]:
    return [c for c in trainer.callbacks if isinstance(c, WeightAveraging)]


def _may_share(averaging: WeightAveraging, pl_module: L.LightningModule) -> bool:
    """Whether ``averaging``'s average may share ``pl_module``'s frozen parts: it lives on the module's device (a
    move of the average to another would move the shared parts, the module's, with it) and the module is not sharded
    (DTensor params)."""
    device = getattr(averaging, "_device", None)
    if device is not None:
        device, own = torch.device(device), pl_module.device
        if device.type != own.type or (device.index is not None and device.index != own.index):
            return False
    return not any(is_dtensor(p) for p in pl_module.parameters())


def _copy_sharing(pl_module: L.LightningModule, copies: int) -> None:
    """Make the next ``copies`` deep copies of ``pl_module`` (the averaging callbacks' ``AveragedModel``) share its
    frozen parts: each copy reads :func:`shareable_parts` then (buffers shared only where averaging skips them)."""
    use_buffers = any(a._use_buffers for a in _averagings(pl_module.trainer))
    remaining = [copies]

    def __deepcopy__(memo: dict) -> nn.Module:
        del pl_module.__dict__["__deepcopy__"]
        try:
            if not any(is_dtensor(p) for p in pl_module.parameters()):  # sharded by configure_model: a plain copy
                parts = shareable_parts(pl_module, use_buffers)
                memo.update({id(obj): obj for obj in parts.objects(pl_module)})
            # functions set on the instance (LowMemOptimizerCallback's configure_optimizers wrapper, whose closure
            # reaches the callback and, at a second fit, the first fit's optimizers and their state) stay shared
            memo.update({id(v): v for v in vars(pl_module).values() if callable(v) and not isinstance(v, nn.Module)})
            return copy.deepcopy(pl_module, memo)
        finally:
            remaining[0] -= 1
            if remaining[0] > 0:
                pl_module.__dict__["__deepcopy__"] = __deepcopy__

    pl_module.__dict__["__deepcopy__"] = __deepcopy__


def _stop_copying_sharing(pl_module: nn.Module) -> None:
    """Remove what :func:`_copy_sharing` installed (if still there)."""
    pl_module.__dict__.pop("__deepcopy__", None)


class EMAFunction:
    """torch's ``get_ema_avg_fn(decay)`` (what ``EMAWeightAveraging`` averages with), as an object that pickles:
    ``decay * ema + (1 - decay) * current``, the same operations in the same order, so the same bits."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        """Weight of the running average, in [0, 1]."""

    @torch.no_grad()
    def __call__(self, ema_param: torch.Tensor, current_param: torch.Tensor, num_averaged) -> torch.Tensor:
        return self.decay * ema_param + (1 - self.decay) * current_param


class EMAMultiFunction(EMAFunction):
    """:class:`EMAFunction` over lists of tensors (an ``AveragedModel``'s ``multi_avg_fn``: one list per device and
    dtype): ``decay * ema + (1 - decay) * current`` in three multi-tensor calls (16-bit lists: and a multi-tensor
    copy) instead of four calls per tensor, the same operations per element, so the same bits. Lists of non-floating
    tensors (a BatchNorm's ``num_batches_tracked`` under ``use_buffers=True``) go one tensor at a time, as
    :class:`EMAFunction`."""

    @torch.no_grad()
    def __call__(self, ema_params: list[torch.Tensor], current_params: list[torch.Tensor], num_averaged) -> None:
        if not ema_params[0].is_floating_point():
            for ema, current in zip(ema_params, current_params):
                ema.copy_(super().__call__(ema, current, num_averaged))
            return
        scaled = torch._foreach_mul(current_params, 1 - self.decay)
        if ema_params[0].dtype in (torch.float32, torch.float64):
            torch._foreach_mul_(ema_params, self.decay)
            torch._foreach_add_(ema_params, scaled)
            return
        # 16-bit: the in-place multiply by a Python scalar rounds otherwise than ``decay * ema`` (measured on the CPU
        # for 0.9, 0.95, 0.7 in bf16): the product goes to a new list first
        averaged = torch._foreach_mul(ema_params, self.decay)
        torch._foreach_add_(averaged, scaled)
        torch._foreach_copy_(ema_params, averaged)


def ema_decay(function) -> float | None:
    """The decay of an EMA averaging function of one tensor at a time (:class:`EMAFunction`, or the closure torch's
    ``get_ema_avg_fn`` returns); ``None`` for any other function."""
    if type(function) is EMAFunction:
        return function.decay
    if getattr(function, "__qualname__", "") != "get_ema_avg_fn.<locals>.ema_update":
        return None
    inner = inspect.unwrap(function)  # through torch.no_grad()'s wrapper
    cells = dict(zip(inner.__code__.co_freevars, (c.cell_contents for c in inner.__closure__ or ())))
    decay = cells.get("decay")
    return decay if isinstance(decay, (int, float)) and not isinstance(decay, bool) else None


def picklable_averaging(callbacks) -> int:
    """Give each ``EMAWeightAveraging`` in ``callbacks`` an :class:`EMAFunction` in place of torch's local
    ``get_ema_avg_fn`` closure, which cannot be pickled: a Trainer that starts its ranks in new processes
    (``ddp_spawn``, TPU) pickles its callbacks and failed with "Can't pickle local object
    'get_ema_avg_fn.<locals>.ema_update'". Returns how many it replaced."""
    replaced = 0
    for callback in callbacks:
        kwargs = getattr(callback, "_kwargs", None) if isinstance(callback, WeightAveraging) else None
        function = (kwargs or {}).get("avg_fn")
        if type(function) is not EMAFunction and ema_decay(function) is not None:
            kwargs["avg_fn"] = EMAFunction(ema_decay(function))
            replaced += 1
    return replaced


def resume_from_training_weights(trainer: L.Trainer | None, checkpoint: dict) -> bool:
    """In a fit with no weight-averaging callback, have a checkpoint that one wrote resume from its training weights:
    ``checkpoint["state_dict"]`` (the average) becomes ``checkpoint["current_model_state"]`` (the training weights),
    the average and its state are dropped, and one line says so. Lightning alone loads the average into the module
    and trains it on with the optimizer state of the training weights, silently. Returns whether it did; nothing for
    a checkpoint without training weights apart, outside ``fit`` (evaluation and ``load_from_checkpoint`` read the
    average) or with an averaging callback (which loads both itself)."""
    if trainer is None or trainer.state.fn != "fit" or not isinstance(checkpoint.get("current_model_state"), dict):
        return False
    if any(isinstance(callback, WeightAveraging) for callback in trainer.callbacks):
        return False
    checkpoint["state_dict"] = checkpoint.pop("current_model_state")
    checkpoint.pop("averaging_state", None)
    rank_zero_info("The checkpoint holds a weight average (its state_dict) and the training weights "
                   "(current_model_state), and this fit has no weight-averaging callback: it resumes from the training "
                   "weights; the average is left behind.")
    return True
