"""Bookkeeping shared by the package's optimizers (no update math lives here).

* **Non-finite guard** (:mod:`.finite`, mixed in): a 0/1 finite flag per gradient on the device, no host
  sync; kernels leave params and state untouched where it is 0; :attr:`LowMemOptimizer.skipped_updates`
  counts the skipped updates. After :meth:`~LowMemOptimizer.clip_grad_norm_` (or
  :meth:`~LowMemOptimizer.use_grad_norm`) the next ``step()`` reuses that total norm for the check.
* **Step counters** are 0-d fp32 tensors on the param's device (like torch's ``capturable`` mode):
  they advance by the finite flag, so a skipped update does not advance the bias correction, and
  device kernels read them from memory (no ``.item()``, no sync); on the CPU, flags checked on the host
  advance only the live counters (one ``_foreach_add_``) and the host path reads them (a memory read).
* **Sharded params** (DTensor, FSDP2): updates and state cover the local shard;
  :meth:`~LowMemOptimizer.state_dict` presents that state as DTensors (:mod:`.sharding`).
* **State dicts** keep the dtypes of quantized state (torch's ``Optimizer.load_state_dict`` casts
  every floating state tensor to the param dtype, which would turn fp32 block scales of a bf16 param
  into bf16) and are validated: a state that does not fit its parameter raises ``ValueError``.
"""

from __future__ import annotations

import inspect
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence

import torch

from ..kernels.dispatch import host_flag_values
from .finite import FiniteGuard
from .finite import _square_sum_norms as _square_sum_norms  # noqa: F401  (tests import it from here)
from .fsdp1 import check_not_fsdp1, fp32_presented, is_fsdp1_flat
from .layout import QUANTIZE_STATE, StateSpec, check_quantize_state, codes_specs, step_spec
from .sharding import is_dtensor, unwrap_state, wrap_state
from .state_io import hold, private_copy, release, storage_ids
from .validation import check_bf16_rounding

__all__ = ["LowMemOptimizer", "StateSpec", "codes_specs", "step_spec", "DROP_IN_FLAGS", "check_drop_in_flags"]

DROP_IN_FLAGS = ("foreach", "fused", "capturable", "differentiable")
"""torch.optim implementation switches accepted as no-ops when None/False (our kernels are always fused,
step counters always live on the device, and no optimizer step is differentiable)."""


def check_drop_in_flags(**flags) -> None:
    """Accept torch.optim's ``foreach``/``fused``/``capturable``/``differentiable`` when None or False;
    ``ValueError`` naming the flag when one is True (or anything else)."""
    for name, value in flags.items():
        if value is not None and value is not False:
            raise ValueError(
                f"Invalid {name}={value!r}: accepted only as None or False (a no-op here: the update is always "
                "one fused kernel with device-side step counters, and it is not differentiable)."
            )


_NOT_HYPERPARAMETERS = {"self", "params", "seed", "gpu_budget_bytes", "page_prefetch", *DROP_IN_FLAGS}


def _check_rounding(group: dict, where: str = "") -> None:
    """``ValueError`` naming ``bf16_rounding`` when a group holds a value other than "stochastic"/"nearest", or
    ``quantize_state`` (:data:`.layout.QUANTIZE_STATE`) when it holds anything but True/False (``where`` says which
    group, e.g. " in param group 1")."""
    if "bf16_rounding" in group:
        check_bf16_rounding(group["bf16_rounding"])
    if QUANTIZE_STATE in group:
        check_quantize_state(group[QUANTIZE_STATE], where)


def hyperparameter_names(cls: type) -> set[str]:
    """The param-group keys ``cls`` takes as constructor arguments (its signature, less params and switches)."""
    try:
        parameters = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):
        return set()
    return {p.name for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)} - _NOT_HYPERPARAMETERS


class LowMemOptimizer(FiniteGuard, torch.optim.Optimizer):
    """Base class: non-finite guard, device step counters, dtype-preserving validated state dicts.

    The base class owns :meth:`step` (and :meth:`step_params`, the per-tensor form gradient release
    uses): it checks the gradients, groups the params that have one by device, computes the finite
    flags, creates missing state from :meth:`state_layout`, advances the step counters by the flags
    and only then hands each device's tensors to the subclass's :meth:`_update_tensors` (so every
    kernel reads the counter of the step it applies: 1 on the first update). Subclasses implement
    :meth:`state_layout` (the state tensors a param carries, as data: used to create state, to
    validate loaded state dicts and to size state) and :meth:`_update_tensors` (call the kernel), and
    may override :meth:`_begin_group` / :meth:`_finish_group` (per-group bookkeeping around the
    updates, e.g. Adafactor's step size), :meth:`_convert_foreign_state` to accept another
    optimizer's state (e.g. torch AdamW -> 8-bit), :meth:`_check_group` to validate a param group's
    hyperparameters (constructor, ``add_param_group`` and ``load_state_dict`` all run it) and
    :attr:`_param_dtypes`.

    ``copy.deepcopy`` and ``pickle`` keep every attribute (seeds, counters, options), so a copy steps
    exactly as the original; hooks are not copied (as in torch).
    """

    _param_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
    """Param dtypes the kernels update; others are refused at construction and in ``add_param_group``."""

    is_paged: bool = False
    """Whether state lives in host pages between updates (the specs of :meth:`state_layout` with
    ``host=True``); the one notion of "paged" that state sizing and logging read."""

    _foreign_group_keys: frozenset[str] = frozenset()
    """Group keys of another optimizer whose state dicts this class converts (e.g. torch AdamW's
    ``amsgrad``); accepted on load and dropped."""

    _storage_keys: tuple[str, ...] = ("momentum_dtype", QUANTIZE_STATE)
    """Group keys that choose how state is stored, where the optimizer has them: a load keeps this
    optimizer's value and converts the loaded state to it."""

    _transient_attributes: tuple[str, ...] = ()
    """Caches of device resources, dropped by deepcopy/pickle (re-created by :meth:`_reset_transient`)."""

    _whole_tensor_update: bool = False
    """Whether the update needs whole tensors (Adafactor, CAME, Muon): FSDP1's flat params are refused
    (:func:`.fsdp1.check_not_fsdp1`)."""

    def __init__(self, params: Iterable, defaults: dict):
        self._check_defaults(dict(defaults))  # bad hyperparameters fail before any param is looked at
        _check_rounding(defaults)
        self._skipped: dict[torch.device, torch.Tensor] = {}
        self._attempted: dict[str, int] = {"updates": 0}  # updates checked (FiniteGuard.attempted_updates)
        self._pending_norm: dict = {}  # "norm": (total norm, gradients' fingerprint) the next step() reuses
        self._step_norm: torch.Tensor | None = None  # ... while that step() runs
        self._released_groups: set[int] = set()
        self._param_slots: dict[int, tuple[int, int, int]] = {}  # id -> (group, global index, position)
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ copy / pickle
    def __getstate__(self) -> dict:
        """Every attribute except hooks and device-resource caches (torch keeps only defaults/state/groups)."""
        hooks = {name for name in self.__dict__ if name.startswith("_optimizer_") and name.endswith("_hooks")}
        skip = hooks | set(self._transient_attributes) | {"_opt_called"}
        return {name: value for name, value in self.__dict__.items() if name not in skip}

    def __setstate__(self, state: dict) -> None:
        """Restore the attributes; hooks start empty and transient caches fresh."""
        differentiable = "differentiable" in state.get("defaults", {})
        super().__setstate__(state)
        if not differentiable:
            self.defaults.pop("differentiable", None)  # torch adds it; our groups do not carry it
        self.__dict__.setdefault("_skipped", {})
        self.__dict__.setdefault("_attempted", {"updates": 0})
        self.__dict__.pop("_grad_norm", None)  # pickled before the norm moved into _pending_norm
        self.__dict__.setdefault("_pending_norm", {})
        self.__dict__.setdefault("_step_norm", None)
        self.__dict__.setdefault("_released_groups", set())
        self.__dict__["_param_slots"] = {}
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        self._reset_transient()

    def _reset_transient(self) -> None:
        """Re-create the attributes listed in :attr:`_transient_attributes` (default: none)."""

    # ------------------------------------------------------------------ param groups
    def _check_group(self, group: dict) -> None:
        """Validate one param group's hyperparameters (``ValueError`` naming the argument); default: none."""

    def _check_defaults(self, defaults: dict) -> None:
        """Validate the constructor's hyperparameters, before any param is looked at (default: as a group)."""
        self._check_group(defaults)

    def add_param_group(self, param_group: dict) -> None:
        """Add a param group, validated as the constructor's arguments are; an invalid group is not added.

        Raises ``ValueError`` naming the argument (hyperparameters, torch's switches set to True) or
        ``TypeError`` naming the group index, param index, shape and dtype of an unsupported param.
        """
        if isinstance(param_group, dict):
            check_drop_in_flags(**{k: param_group[k] for k in DROP_IN_FLAGS if k in param_group})
            param_group = {k: v for k, v in param_group.items() if k not in DROP_IN_FLAGS}
        super().add_param_group(param_group)
        try:
            group = self.param_groups[-1]
            self._check_params(len(self.param_groups) - 1, group["params"])
            self._check_group(group)
            _check_rounding(group, f" in param group {len(self.param_groups) - 1}")
        except (ValueError, TypeError):
            self.param_groups.pop()
            raise

    def _check_params(self, group_index: int, params: Sequence[torch.Tensor]) -> None:
        """``TypeError`` for a param whose dtype the kernels do not update (complex, integer, float64...);
        ``ValueError`` for an FSDP1 flat param given to a whole-tensor optimizer (:attr:`_whole_tensor_update`)."""
        if self._whole_tensor_update:
            check_not_fsdp1(type(self).__name__, group_index, params)
        for index, param in enumerate(params):
            if param.dtype not in self._param_dtypes:
                allowed = ", ".join(map(str, self._param_dtypes))
                raise TypeError(
                    f"Invalid params: param group {group_index}, param {index} (shape {tuple(param.shape)}) has "
                    f"dtype {param.dtype}; {type(self).__name__} updates {allowed} params."
                )

    # ------------------------------------------------------------------ step
    @torch.compiler.disable  # torch.compile(opt.step) or a compiled train step: run as is (see the docstring)
    @torch.no_grad()
    def step(self, closure=None):
        """One update of every param that has a gradient; returns ``closure()``'s loss if given.

        Never synchronises with the device: the finite flags, step counters and stochastic-rounding
        seeds stay on it. Gradients are checked before anything is updated (see :meth:`_check_grads`).
        The update is already fused kernels (compiled on the CPU where :mod:`..kernels.dispatch` says), so
        ``torch.compile`` does not trace into it: under ``torch.compile(opt.step)`` (torch's compiled-optimizer
        recipe) or a compiled function that calls it, it runs as called eagerly (dynamo traced the Python
        bookkeeping and specialised on every step count: 3 steps of a 17k-param model had not finished in 15 min).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_grads()
        pending = self._pending_norm.pop("norm", None)  # a reused norm serves this one step, if still current
        self._step_norm = pending[0] if pending is not None and pending[1] == self._grad_fingerprint() else None
        try:
            for group, per_device in self._params_by_device():
                if per_device:
                    self._step_group(group, per_device)
                    self._finish_group(group)
        finally:
            self._step_norm = None
        return loss

    @torch.no_grad()
    def step_params(self, params: Iterable[torch.Tensor]) -> None:
        """Update only ``params`` (each in this optimizer, each with a gradient) exactly as :meth:`step`
        would update them, leaving every other param and its state untouched.

        This is the per-tensor step of gradient release (the update runs in backward as soon as a
        gradient is ready). Per-group bookkeeping that :meth:`step` does once after the updates
        (e.g. Adafactor's reported step size) waits for :meth:`finish_step`, called once per training
        step after the last ``step_params``. ``ValueError`` names a param that is not in the optimizer
        or has no gradient.
        """
        chosen: dict[int, dict[torch.device, list[tuple[int, torch.Tensor]]]] = defaultdict(lambda: defaultdict(list))
        for param in params:
            group_index, index, position = self._slot_of(param)
            if param.grad is None:
                raise ValueError(f"step_params: param {index} (shape {tuple(param.shape)}) has no gradient.")
            self._check_grad(group_index, position, param)
            chosen[group_index][param.device].append((index, param))
        for group_index, per_device in chosen.items():
            self._step_group(self.param_groups[group_index], list(per_device.values()))
            self._released_groups.add(group_index)

    def finish_step(self) -> None:
        """Close a training step made of :meth:`step_params` calls: run the per-group bookkeeping
        :meth:`step` runs after its updates, for every group updated since the last call."""
        for group_index in sorted(self._released_groups):
            self._finish_group(self.param_groups[group_index])
        self._released_groups.clear()

    def _slot_of(self, param: torch.Tensor) -> tuple[int, int, int]:
        """``(group index, global index, position in the group)`` of ``param`` (cached; rebuilt when the
        param groups changed)."""
        slot = self._param_slots.get(id(param))
        if slot is None or not self._slot_holds(slot, param):
            self._param_slots = {}
            index = 0
            for group_index, group in enumerate(self.param_groups):
                for position, p in enumerate(group["params"]):
                    self._param_slots[id(p)] = (group_index, index, position)
                    index += 1
            slot = self._param_slots.get(id(param))
            if slot is None:
                raise ValueError(f"step_params: a param of shape {tuple(param.shape)} is not in this optimizer.")
        return slot

    def _slot_holds(self, slot: tuple[int, int, int], param: torch.Tensor) -> bool:
        group_index, _, position = slot
        if group_index >= len(self.param_groups):
            return False
        params = self.param_groups[group_index]["params"]
        return position < len(params) and params[position] is param

    def _step_group(self, group: dict, per_device: list[list[tuple[int, torch.Tensor]]]) -> None:
        """Per device: finite flags, state, step counters advanced by the flags, then the update."""
        self._begin_group(group, per_device)
        for items in per_device:
            flags = self._finite_flags([param.grad for _, param in items])
            states = [self._init_state(param, group) for _, param in items]
            _advance_steps([state["step"] for state in states], flags)
            self._update_tensors(group, items, states, flags)

    def _begin_group(self, group: dict, per_device: list[list[tuple[int, torch.Tensor]]]) -> None:
        """Before a group's updates (default: nothing)."""

    def _finish_group(self, group: dict) -> None:
        """After a group's updates, once per training step (default: nothing)."""

    def _update_tensors(self, group: dict, items: list[tuple[int, torch.Tensor]], states: list[dict],
                        flags: list[torch.Tensor]) -> None:
        """Apply the update to ``items`` (``(global index, param)`` pairs on one device, each with a
        gradient), whose ``states`` exist and whose step counters already count this step; ``flags``:
        0-d fp32 finite flags (0 = leave the param and its state untouched). Subclasses implement it."""
        raise NotImplementedError(f"{type(self).__name__} does not implement _update_tensors.")

    def _params_by_device(self) -> Iterator[tuple[dict, list[list[tuple[int, torch.Tensor]]]]]:
        """Yield ``(group, per_device)`` for every param group, where ``per_device`` lists, per device, the
        ``(global_index, param)`` pairs of the params that have a gradient (the global index counts
        every param of every group, so it is stable across steps)."""
        index = 0
        groups = []
        for group in self.param_groups:
            by_device: dict[torch.device, list[tuple[int, torch.Tensor]]] = defaultdict(list)
            for param in group["params"]:
                if param.grad is not None:
                    by_device[param.device].append((index, param))
                index += 1
            groups.append((group, list(by_device.values())))
        yield from groups

    def _check_grads(self) -> None:
        """Before any update: ``RuntimeError`` naming the param of a sparse gradient or of a gradient whose
        shape or kind does not match its param (so a step never applies to some params and then raises), or a
        param on the meta device (:meth:`_refuse_meta`)."""
        for group_index, group in enumerate(self.param_groups):
            for position, param in enumerate(group["params"]):
                if param.is_meta:
                    self._refuse_meta(group_index, position, param)
                if param.grad is not None:
                    self._check_grad(group_index, position, param)

    def _refuse_meta(self, group_index: int, position: int, param: torch.Tensor) -> None:
        """``RuntimeError`` for a meta-device param at ``step()``: an optimizer built before the model's weights
        were materialized holds placeholders that ``to_empty()`` / FSDP / Fabric's ``empty_init`` replaced, so
        it would silently train nothing (Lightning-AI/pytorch-lightning#19067)."""
        raise RuntimeError(
            f"{type(self).__name__}.step(): param group {group_index}, param {position} (shape "
            f"{tuple(param.shape)}) is on the meta device, which holds no data. The optimizer was built before the "
            "model's weights were materialized (to_empty(), FSDP or Fabric empty_init replace the params, so it "
            "would update placeholders and train nothing): build the optimizer after the model is on its device."
        )

    def _check_grad(self, group_index: int, position: int, param: torch.Tensor) -> None:
        """``RuntimeError`` unless ``param.grad`` is a dense floating gradient of the param's shape."""
        grad = param.grad
        where = f"param group {group_index}, param {position} (shape {tuple(param.shape)})"
        if grad.is_sparse:
            raise RuntimeError(
                f"{type(self).__name__} does not support sparse gradients: {where} has a sparse gradient "
                "(use torch.optim.SparseAdam or a dense gradient)."
            )
        if not grad.is_floating_point() or grad.is_complex():
            raise RuntimeError(f"{type(self).__name__}: {where} has a gradient of dtype {grad.dtype}.")
        if grad.shape != param.shape:
            raise RuntimeError(f"{type(self).__name__}: {where} has a gradient of shape {tuple(grad.shape)}.")

    def _init_state(self, param: torch.Tensor, group: dict) -> dict:
        """``param``'s state, its missing tensors created from :meth:`state_layout` (zeros; the step
        counter a 0-d fp32 zero on the param's device) on first use and when :meth:`_state_incomplete`."""
        state = self.state[param]
        if "step" in state and not self._state_incomplete(state, group):
            return state
        for spec in self.state_layout(param, group):
            if spec.name not in state:
                state[spec.name] = self._new_state_tensor(spec, param)
        return state

    def _state_incomplete(self, state: dict, group: dict) -> bool:
        """Whether a stepped param's state lacks a tensor its group now needs (default: never)."""
        return False

    def _new_state_tensor(self, spec: StateSpec, param: torch.Tensor) -> torch.Tensor:
        """Zeros for ``spec`` on the param's device (paged optimizers put ``host`` specs in host pages)."""
        return torch.zeros(spec.shape, dtype=spec.dtype, device=param.device)

    # ------------------------------------------------------------------ state layout
    def state_layout(self, param: torch.Tensor, group: dict | None = None) -> list[StateSpec]:
        """The state tensors this optimizer keeps for ``param`` (in ``group``, default: the param's own
        group), as :class:`StateSpec` data: name, shape, dtype, role, codes/absmax pairing, host or device.

        It is the single description of the state: state creation, ``load_state_dict`` validation and
        state sizing read it. Subclasses override it; the base class keeps only ``step``.
        """
        return [step_spec()]

    def _axes_of(self, param: torch.Tensor, group: dict | None = None) -> dict[str, StateSpec]:
        """``{state name: StateSpec}`` of ``param``'s state (axes and codes/absmax pairs: what :mod:`.sharding`
        needs to present it)."""
        return {spec.name: spec for spec in self.state_layout(param, group)}

    def _saved_axes(self, param: torch.Tensor, group: dict, state: dict) -> dict[str, StateSpec]:
        """The layout that reads ``state`` saved for the DTensor ``param``: :meth:`_axes_of` of ``group``, or of the
        other ``quantize_state`` when the saved keys are that setting's (a checkpoint saved with the other one:
        read as it was presented, then converted by :meth:`_convert_foreign_state`)."""
        layout = self._axes_of(param, group)
        saved = set(state) - {"shard_layout"}
        if not is_dtensor(param) or saved <= set(layout) or QUANTIZE_STATE not in group:
            return layout
        other = self._axes_of(param, {**group, QUANTIZE_STATE: not group[QUANTIZE_STATE]})
        return other if saved <= set(other) else layout

    def _layout_group(self, param: torch.Tensor, group: dict | None) -> dict:
        """``group``, or when None the param group holding ``param`` (:attr:`defaults` for a param not in this
        optimizer: what :meth:`state_layout` describes it with)."""
        if group is not None:
            return group
        try:
            return self.param_groups[self._slot_of(param)[0]]  # cached by id: no scan per call
        except ValueError:
            return self.defaults

    def _group_of(self, param: torch.Tensor) -> dict:
        for group in self.param_groups:
            if any(p is param for p in group["params"]):
                return group
        raise ValueError(f"param of shape {tuple(param.shape)} is not in this optimizer.")

    def _convert_foreign_state(self, param: torch.Tensor, state: dict, group: dict) -> dict:
        """Turn a state saved by another optimizer into ours; default: return it unchanged."""
        return state

    def _fp32_state(self, param: torch.Tensor, state: dict, group: dict) -> dict:
        """``state`` (a copy of ``param``'s) in its fp32 form: codes decoded into fp32 tensors of the param's local
        shape under the fp32 optimizer's names (what ``load_state_dict`` converts back). Default: the state
        :meth:`_convert_foreign_state` gives for ``group`` with its storage keys at their unquantized values
        (``momentum_dtype="float32"``, ``quantize_state=False``), unchanged for an optimizer without them."""
        unquantized = {key: value for key, value in _UNQUANTIZED_STORAGE.items() if key in group}
        return self._convert_foreign_state(param, state, {**group, **unquantized}) if unquantized else state

    @torch.no_grad()
    def decoded_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        """``param``'s optimizer state as readable fp32 tensors, for logging (e.g. the norm of ``exp_avg``).

        ``opt.state[param]`` holds what the kernels store: 8-bit or 4-bit codes with fp32 block scales
        (``exp_avg_codes`` + ``exp_avg_absmax``) for quantized state, whose raw values mean nothing alone. This
        returns the same state decoded, under the names of the fp32 form of the optimizer (``exp_avg`` and
        ``exp_avg_sq`` of ``torch.optim.AdamW`` for ``adamw_8bit``/``adamw_4bit``, ``momentum_buffer`` for
        ``sgd``/``muon_8bit``, Adafactor's and CAME's row/column statistics as they are): fp32 tensors of the
        param's shape (of the local shard for a DTensor param), plus the 0-d ``step``. The values are those the
        next step reads. Copies: changing them changes nothing; each decoded moment costs 4 bytes per element
        while it lives. Empty before the param's first update (as ``opt.state[param]`` is); ``ValueError`` for
        a tensor that is not one of this optimizer's params.
        """
        try:
            group = self._group_of(param)
        except ValueError as err:
            raise ValueError(f"Invalid param for decoded_state: {err}") from None
        stored = self.state.get(param, {})
        copies = {key: value.clone() if isinstance(value, torch.Tensor) else value for key, value in stored.items()}
        return self._fp32_state(param, copies, group) if copies else {}

    def state_dict(self) -> dict:
        """torch's state dict; the state of a DTensor param is presented as DTensors (see :mod:`.sharding`), that
        of an FSDP1 param in its fp32 form (:func:`.fsdp1.fp32_presented`)."""
        out = super().state_dict()
        params = [p for group in self.param_groups for p in group["params"]]
        if any(is_dtensor(p) for p in params):
            out["state"] = {pid: wrap_state(params[pid], state, self._axes_of(params[pid]))
                            for pid, state in out["state"].items()}
        elif any(is_fsdp1_flat(p) for p in params):
            out = fp32_presented(self, out)
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict strictly, keeping saved state dtypes and converting foreign states.

        Refused with ``ValueError`` (and the optimizer left unchanged): a dict that is not an optimizer
        state dict, another optimizer's (group keys of another class: the message names both), a
        different number of groups or params, invalid hyperparameters, and per param a state whose key
        set differs from :meth:`state_layout` or whose values cannot be ours (wrong shape or dtype, inf
        or NaN, a negative block scale or second moment, a negative or fractional step), naming the
        param index and key. Group keys added in later releases and missing from the dict get this
        optimizer's defaults; storage choices (``momentum_dtype``) stay this optimizer's and the state
        is converted to them. After the load, ``state_dict()`` has the same keys as before it.
        """
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            keys = sorted(map(str, state_dict)) if isinstance(state_dict, dict) else "-"
            raise ValueError(
                "Invalid optimizer state dict: expected a dict with keys 'state' and 'param_groups', "
                f"got {type(state_dict).__name__} with keys {keys}."
            )
        own = storage_ids(t for state in self.state.values() if isinstance(state, dict) for t in state.values())
        saved = private_copy(state_dict, own)  # this optimizer's own tensors (a DCP load's target) adopted
        saved_groups = saved["param_groups"]
        if not isinstance(saved_groups, list) or len(saved_groups) != len(self.param_groups):
            count = len(saved_groups) if isinstance(saved_groups, list) else type(saved_groups).__name__
            raise ValueError(
                f"Invalid optimizer state dict: it has {count} param groups, this optimizer has "
                f"{len(self.param_groups)}.{_split_hint(saved_groups, self.param_groups)}"
            )
        try:
            by_id, converted = self._checked_state(saved)
        except ValueError as err:
            raise ValueError(f"{err}{self._origin_hint(saved_groups)}") from err
        saved["state"] = hold(converted)  # past torch's cast of every state tensor to the param dtype
        defaults = dict(self.defaults)
        super().load_state_dict(saved)
        release(self.state)
        self.defaults.clear()
        self.defaults.update(defaults)  # torch's load adds `differentiable`
        self._restore_dtypes(by_id, converted)

    def _origin_hint(self, saved_groups: list) -> str:
        """A note naming the class whose hyperparameters the saved group keys match best, when not this one."""
        keys = set(saved_groups[0]) if saved_groups and isinstance(saved_groups[0], dict) else set()
        owners = _likely_owners(keys)
        related = {cls.__name__ for cls in type(self).__mro__} | {sub.__name__ for sub in type(self).__subclasses__()}
        if not owners or related & set(owners):
            return ""
        return f" (its param groups look like a {' or '.join(owners)} state dict's; this optimizer is a " \
               f"{type(self).__name__})"

    def _checked_state(self, saved: dict) -> tuple[dict, dict]:
        """``(by_id, converted)``: params and completed groups per saved param id, and the converted, validated
        states; ``ValueError`` at the first problem."""
        saved_groups = saved["param_groups"]
        by_id = {}
        for index, (group, saved_group) in enumerate(zip(self.param_groups, saved_groups)):
            saved_groups[index] = saved_group = self._loaded_group(index, group, saved_group)
            if len(group["params"]) != len(saved_group["params"]):
                raise ValueError(
                    f"Invalid optimizer state dict: param group {index} holds "
                    f"{len(saved_group['params'])} params, this optimizer's holds {len(group['params'])}."
                )
            for param, pid in zip(group["params"], saved_group["params"]):
                by_id[pid] = (param, saved_group)
        converted = {}
        for pid, state in saved["state"].items():
            if pid not in by_id:
                raise ValueError(f"Invalid optimizer state dict: state for unknown param id {pid!r}.")
            param, group = by_id[pid]
            if not isinstance(state, dict):
                raise ValueError(f"Invalid optimizer state dict: param {pid!r} state is a {type(state).__name__}.")
            local_state = unwrap_state(param, dict(state), pid, self._saved_axes(param, group, state))
            state = self._convert_foreign_state(param, local_state, group)
            state = {key: value for key, value in state.items() if value is not None}  # torch SGD's None buffer
            self._validate_state(pid, param, group, state)
            converted[pid] = state
        return by_id, converted

    def _loaded_group(self, index: int, group: dict, saved_group) -> dict:
        """A saved param group checked and completed for this optimizer (see :meth:`load_state_dict`)."""
        name = type(self).__name__
        if not isinstance(saved_group, dict) or not isinstance(saved_group.get("params"), list):
            raise ValueError(f"Invalid optimizer state dict: param group {index} is not a dict with a 'params' list.")
        ours = set(self.defaults)
        foreign = set(saved_group) & (_all_hyperparameter_names() - ours - self._foreign_group_keys)
        if foreign:
            raise ValueError(
                f"Invalid optimizer state dict: param group {index} has keys {sorted(foreign)} that {name} does not "
                f"use ({name} groups have keys {sorted(ours)})."
            )
        merged = {**self.defaults, **saved_group}
        for key in set(self._storage_keys) & set(group):
            merged[key] = group[key]
        try:
            self._check_group(merged)
            _check_rounding(merged)
        except (ValueError, TypeError) as err:
            raise ValueError(f"Invalid optimizer state dict: param group {index}: {err}") from err
        for key in (*DROP_IN_FLAGS, *self._foreign_group_keys):
            if key not in self.defaults:
                merged.pop(key, None)
        return merged

    def _validate_state(self, pid, param: torch.Tensor, group: dict, state: dict) -> None:
        """``ValueError`` naming ``pid`` and the key unless ``state`` is exactly :meth:`state_layout`'s."""
        layout = self.state_layout(param, group)
        names = {spec.name for spec in layout}
        present = {key for key, value in state.items() if value is not None}
        if present != names:
            missing, extra = sorted(names - present), sorted(present - names)
            parts = ([f"missing {missing}"] if missing else []) + ([f"unexpected {extra}"] if extra else [])
            detail = "; ".join(parts)
            raise ValueError(
                f"Invalid optimizer state dict: param {pid!r} (shape {tuple(param.shape)}) has state keys "
                f"{sorted(present)}; {type(self).__name__} keeps {sorted(names)} for it ({detail})."
            )
        for spec in layout:
            self._validate_value(pid, param, spec, state[spec.name])

    @staticmethod
    def _validate_value(pid, param: torch.Tensor, spec: StateSpec, value) -> None:
        where = f"Invalid optimizer state dict: param {pid!r} state {spec.name!r}"
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{where} is a {type(value).__name__}; expected a {spec.dtype} tensor of shape {spec.shape}."
            )
        if tuple(value.shape) != tuple(spec.shape) or value.dtype != spec.dtype:
            raise ValueError(
                f"{where} is {value.dtype} {tuple(value.shape)}, expected {spec.dtype} {tuple(spec.shape)} for a "
                f"param of shape {tuple(param.shape)}."
            )
        if not value.is_floating_point():
            return
        if not torch.isfinite(value).all():
            raise ValueError(f"{where} holds inf or NaN.")
        if spec.role in ("step", "absmax", "square") and (value < 0).any():
            raise ValueError(f"{where} holds negative values (min {float(value.min())}); expected values >= 0.")
        if spec.role == "step" and float(value) != math.floor(float(value)):
            raise ValueError(f"{where} is {float(value)}; expected a whole number of steps >= 0.")

    def _restore_dtypes(self, by_id: dict, saved_state: dict) -> None:
        for pid, state in saved_state.items():
            param, _ = by_id[pid]
            loaded = self.state[param]
            device = param.device
            for key, value in state.items():
                current = loaded.get(key)
                if isinstance(value, torch.Tensor) and (current.dtype != value.dtype or current.device != device):
                    loaded[key] = value.to(device=device)


_UNQUANTIZED_STORAGE = {"momentum_dtype": "float32", QUANTIZE_STATE: False}
"""The storage keys' values that keep state in fp32 (the form :meth:`LowMemOptimizer._fp32_state` decodes into)."""


def _advance_steps(steps: list[torch.Tensor], flags: list[torch.Tensor]) -> None:
    """Add each finite flag to its step counter: one ``_foreach_add_`` of the flags on a device; for flags checked
    on the host (:func:`~lowmem_lightning.kernels.dispatch.host_flag`) one ``_foreach_add_`` of 1 on the live
    counters only (the same fp32 sums), none when every tensor skips."""
    apply = host_flag_values(flags)
    if apply is None:
        torch._foreach_add_(steps, flags)
        return
    live = [step for step, good in zip(steps, apply) if good]
    if live:
        torch._foreach_add_(live, 1.0)


def _split_hint(saved_groups, groups: list[dict]) -> str:
    """A hint when either side has ``quantize_state=False`` groups: ``fp32_state`` (the callback's, the module's)
    splits param groups, so a checkpoint resumes only under the same ``fp32_state``."""
    saved = [g for g in saved_groups if isinstance(g, dict)] if isinstance(saved_groups, list) else []
    if not any(g.get(QUANTIZE_STATE) is False for g in [*saved, *groups]):
        return ""
    return (" Groups with quantize_state=False are what fp32_state (LowMemOptimizerCallback, LowMemModule) splits off: "
            "resume with the fp32_state the checkpoint was saved with.")


def _all_hyperparameter_names() -> set[str]:
    """Group keys of every registered optimizer (ours and torch's)."""
    from .registry import available_optimizers, optimizer_class

    names: set[str] = set()
    for name in available_optimizers():
        names |= hyperparameter_names(optimizer_class(name))
    return names


def _likely_owners(keys: set[str]) -> list[str]:
    """The registered optimizer classes whose hyperparameters best match a saved group's ``keys`` (all of them
    on a tie: AdamW8bit and AdamW4bit share their hyperparameter names), sorted; empty when none matches."""
    from .registry import available_optimizers, optimizer_class

    best, best_score = set(), 0.0
    for name in available_optimizers():
        cls = optimizer_class(name)
        names = hyperparameter_names(cls)
        score = len(names & keys) / max(1, len(names | (keys & _all_hyperparameter_names())))
        if score > best_score:
            best, best_score = {cls.__name__}, score
        elif score == best_score and score > 0:
            best.add(cls.__name__)
    return sorted(best)
