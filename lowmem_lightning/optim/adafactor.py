"""Adafactor with the semantics of ``transformers.optimization.Adafactor`` on our kernels; fp32 or 8-bit momentum."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from ..kernels.adafactor import ADAFACTOR, AdafactorHyper, AdafactorModes, AdafactorTensors, step_size_reference
from ..kernels.dispatch import dispatch
from ..kernels.rounding import BF16Rounding, is_stochastic
from .base import LowMemOptimizer, StateSpec, check_drop_in_flags, step_spec
from .layout import MOMENTUM_DTYPES, MomentumDtype, convert_momentum, loaded_step, momentum_specs, quantized_momentum
from .sharding import (
    block_state_head,
    is_dtensor,
    local,
    shard_tensor_index,
    sum_reduce,
)
from .validation import check_bool, check_choice, check_eps_pair, check_lr, check_non_negative, check_positive

__all__ = ["Adafactor", "MOMENTUM_DTYPES", "second_moment_specs"]


class Adafactor(LowMemOptimizer):
    """Adafactor (Shazeer & Stern, ICML 2018) exactly as ``transformers.optimization.Adafactor``.

    Same arguments, defaults and errors as transformers; with fp32 params the updates match it to
    fp32 rounding. Tensors of >= 2 dims keep a factored second moment over their last two dims
    (``exp_avg_sq_row``: ``shape[:-1]``, ``exp_avg_sq_col``: ``shape[:-2] + shape[-1:]``, fp32):
    4 * (rows + cols) bytes per matrix; other tensors keep a full ``exp_avg_sq``. The math and the
    kernel passes are documented in :mod:`lowmem_lightning.kernels.adafactor`.

    Args:
        params: tensors or param-group dicts (fp32, bf16 or fp16; bf16/fp16 are written back with
            stochastic rounding). Grads may be any float dtype.
        lr: external learning rate; requires ``relative_step=False`` (then an LR scheduler may
            change ``group["lr"]``), must be None with ``relative_step=True``.
        eps: ``(eps1, eps2)``: added to squared gradients; lower bound of the parameter RMS scale.
        clip_threshold: threshold on the RMS of the update (> 0).
        decay_rate: second-moment decay exponent (<= 0): ``beta2_t = 1 - t ** decay_rate``.
        beta1: momentum coefficient in [0, 1), or None for no momentum.
        weight_decay: decoupled-by-``lr_t`` L2 penalty (>= 0).
        scale_parameter: scale the step size by ``max(eps2, RMS(param))``.
        relative_step: step size ``min(1e-2, 1/sqrt(t))`` (``min(1e-6 t, 1/sqrt(t))`` with
            ``warmup_init``) instead of ``lr``.
        warmup_init: linear warm-up of the relative step (requires ``relative_step=True``).
        momentum_dtype: ``"float32"`` (``exp_avg``, 4 bytes/param) or ``"int8"`` (``exp_avg_codes``
            int8 + ``exp_avg_absmax`` fp32 per 256 elements: 1.016 bytes/param; tensors under 4096
            elements keep fp32). Only used with ``beta1``. A storage choice: ``load_state_dict``
            keeps this optimizer's value and converts the loaded momentum to it.
        maximize: ascend instead of descend (the kernels apply the gradient's sign, as AdamW's and
            SGD's do; the gradients are not touched; not in transformers).
        bf16_rounding: how bf16/fp16 params are written: ``"stochastic"`` (default) or ``"nearest"``
            (round-to-nearest-even, as transformers' Adafactor); a param-group setting kept in state dicts.
        quantize_state: ``False`` keeps the momentum of the group's params in fp32 even with ``"int8"`` (give
            the embeddings a group with it, as bitsandbytes' ``optim_bits=32``); a storage choice, like
            ``momentum_dtype``.
        foreach, fused, capturable, differentiable: torch.optim's switches, accepted as None/False
            (no-ops: the update is always our fused kernels with device step counters); True raises.

    Learning rate seen by Lightning (``group["lr"]`` is None under relative step): every step,
    ``group["effective_lr_tensor"]`` (0-d fp32 on the params' device) receives the step size
    ``lr_t`` applied to the group's first param with a gradient, computed on the device exactly as
    transformers' ``_get_lr`` (and ``AdafactorSchedule``) does, without a host sync.
    ``group["effective_lr"]`` is the same value as a Python float when the host knows it without a
    sync: ``lr`` when ``relative_step=False`` and ``scale_parameter=False``; ``min(1e-2, 1/sqrt(t))``
    (or the warm-up form) when ``relative_step=True`` and ``scale_parameter=False``, with ``t`` the
    number of ``step()`` calls that updated the group (``group["host_step"]``; it runs ahead of the
    device counter by the group first param's skipped non-finite updates). With ``scale_parameter``
    it depends on the param RMS, a device quantity, and the key is absent (a logger that reads
    ``group["effective_lr"]`` when present never syncs); :meth:`effective_lr` returns a float per
    group in every case (reading the tensor, one sync, for those groups).

    State per param: ``step`` (0-d fp32 counter of applied updates; a non-finite gradient skips the
    update and does not advance it), the second moment as above and, with ``beta1``, the momentum.
    State dicts of transformers' Adafactor load directly (``RMS`` is recomputed each step).
    """

    _whole_tensor_update = True  # factors and normalises whole matrices: FSDP1 flat params are refused

    def __init__(
        self,
        params: Iterable,
        lr: float | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
        momentum_dtype: MomentumDtype = "float32",
        *,
        maximize: bool = False,
        bf16_rounding: BF16Rounding = "stochastic",
        quantize_state: bool = True,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ):
        check_drop_in_flags(foreach=foreach, fused=fused, capturable=capturable, differentiable=differentiable)
        _check_step_rule(lr, relative_step, warmup_init)
        defaults = dict(
            lr=lr,
            eps=eps,
            clip_threshold=clip_threshold,
            decay_rate=decay_rate,
            beta1=beta1,
            weight_decay=weight_decay,
            scale_parameter=scale_parameter,
            relative_step=relative_step,
            warmup_init=warmup_init,
            momentum_dtype=momentum_dtype,
            maximize=maximize,
            bf16_rounding=bf16_rounding,
            quantize_state=quantize_state,
        )
        super().__init__(params, defaults)

    def _check_defaults(self, defaults: dict) -> None:
        """The constructor's hyperparameters; with ``relative_step=False`` its ``lr`` may be None when every group
        brings its own (``LowMemOptimizerCallback`` keeping the module's learning rates)."""
        _check_hyperparameters(defaults, lr_required=False)

    def _check_group(self, group: dict) -> None:
        """Validate a param group like the constructor's arguments (a group left without an lr included)."""
        _check_hyperparameters(group)

    # ------------------------------------------------------------------ effective learning rate
    def effective_lr(self) -> list[float]:
        """Step size applied per param group at the last step (float; may sync with the device).

        Before the first step: the step size the first step would apply.
        """
        out = []
        for group in self.param_groups:
            value = group.get("effective_lr")
            tensor = group.get("effective_lr_tensor")
            if value is None and tensor is not None:
                value = float(tensor)
            elif value is None:
                value = _host_lr(group, max(1, group.get("host_step", 0)))
                if group["scale_parameter"] and group["params"]:
                    p = group["params"][0].detach().float()
                    norm = p.norm()
                    norm = norm.full_tensor() if is_dtensor(norm) else norm
                    rms = float(norm / math.sqrt(max(1, p.numel())))
                    value = max(group["eps"][1], rms) * value
            out.append(float(value))
        return out

    # ------------------------------------------------------------------ state
    def state_layout(self, param: torch.Tensor, group: dict | None = None) -> list[StateSpec]:
        """``step``; with ``beta1`` the momentum (:func:`.layout.momentum_specs`); for >= 2-D params the factored
        ``exp_avg_sq_row`` (``shape[:-1]``) and ``exp_avg_sq_col`` (``shape[:-2] + shape[-1:]``), else a
        full ``exp_avg_sq``; all fp32 (shapes of the local shard for DTensors)."""
        group = self._group_of(param) if group is None else group
        shape = tuple(local(param).shape)
        layout = [step_spec()]
        if group["beta1"] is not None:
            layout += momentum_specs(param, group, "exp_avg", "exp_avg")
        return layout + second_moment_specs(shape, "sq")

    def _convert_foreign_state(self, param: torch.Tensor, state: dict, group: dict) -> dict:
        """Accept transformers' Adafactor states (int ``step``, ``RMS``, state in the grad dtype) and ours."""
        state = dict(state)
        state.pop("RMS", None)
        state["step"] = loaded_step(state.get("step"), 0.0)
        if group["beta1"] is not None:
            quantized = quantized_momentum(param, group)
            state = convert_momentum(param, state, quantized, "exp_avg", "exp_avg")
        for key in ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"):
            if isinstance(state.get(key), torch.Tensor):
                state[key] = state[key].to(torch.float32)
        return state

    # ------------------------------------------------------------------ step
    def _begin_group(self, group: dict, per_device: list) -> None:
        """The group's device step size (written by the first tensor's update) lives on the first device. Every
        group is checked for an LR scheduler it cannot take before the first is updated."""
        _check_no_lr_schedule(self.param_groups)
        _effective_lr_tensor(group, per_device[0][0][1])

    def _finish_group(self, group: dict) -> None:
        """Count the step on the host; the reported step size (see :meth:`effective_lr`)."""
        group["host_step"] = group.get("host_step", 0) + 1
        if group["scale_parameter"]:
            group.pop("effective_lr", None)  # a device quantity: effective_lr_tensor / effective_lr()
        else:
            group["effective_lr"] = _host_lr(group, group["host_step"])

    def _update_tensors(self, group: dict, items: list, states: list[dict], flags: list) -> None:
        """One Adafactor update per tensor (the sharded form on the eager reference, completing sums across
        ranks); the first tensor on the step size's device also writes the group's step size."""
        elr = group["effective_lr_tensor"]
        inputs = [factored_inputs(param, state) for (_, param), state in zip(items, states)]
        tensors = AdafactorTensors(
            *zip(*(inp[:6] for inp in inputs)),
            [state["step"] for state in states],
            list(flags),
            [elr if i == 0 and elr.device == param.device else None for i, (_, param) in enumerate(items)],
            [shard_tensor_index(index, param) for index, param in items],
            [inp[6] for inp in inputs],
        )
        hyper = AdafactorHyper.of(group["lr"], group["eps"], group["clip_threshold"], group["decay_rate"],
                                  group["beta1"], group["weight_decay"], group["relative_step"], group["warmup_init"],
                                  group["scale_parameter"], group["maximize"],
                                  stochastic=is_stochastic(group["bf16_rounding"]))
        dispatch(ADAFACTOR, tensors, hyper)


def factored_inputs(param: torch.Tensor, state: dict) -> tuple:
    """``(shard, grad, v, vc, m, absmax, reduce)`` of one factored update: ``param``'s local shard and
    gradient, its second moment (``v`` the rows and ``vc`` the columns when factored, else ``v`` full
    and ``vc`` None), its momentum (fp32 or codes, cut to the shard's blocks; None without momentum)
    with its absmax, and the ``SumReduce`` of a sharded param (None otherwise)."""
    factored = "exp_avg_sq_row" in state
    shard = local(param.data if isinstance(param, torch.nn.Parameter) else param)
    return (
        shard,
        local(param.grad),
        state["exp_avg_sq_row"] if factored else state["exp_avg_sq"],
        state.get("exp_avg_sq_col"),
        block_state_head(state.get("exp_avg_codes", state.get("exp_avg")), shard.numel(), False),
        block_state_head(state.get("exp_avg_absmax"), shard.numel(), True),
        sum_reduce(param),
    )


def _effective_lr_tensor(group: dict, param: torch.Tensor) -> torch.Tensor:
    tensor = group.get("effective_lr_tensor")
    if not isinstance(tensor, torch.Tensor) or tensor.device != param.device or tensor.dtype != torch.float32:
        tensor = torch.zeros((), dtype=torch.float32, device=param.device)
        group["effective_lr_tensor"] = tensor
    return tensor


def _host_lr(group: dict, t: int) -> float:
    """Step size before the RMS scale at step ``t`` (:func:`~..kernels.adafactor.step_size_reference`, the
    rule the kernels apply, in fp32): ``lr``, or the relative step."""
    modes = AdafactorModes(group["relative_step"], group["warmup_init"], group["scale_parameter"])
    return float(step_size_reference(group["lr"], torch.tensor(float(t)), modes))


def second_moment_specs(shape: tuple[int, ...], kind: str) -> list[StateSpec]:
    """Factored ``exp_avg_{kind}_row`` / ``_col`` statistics of a >= 2-D ``shape`` (a full ``exp_avg_sq`` for
    fewer dims when ``kind == "sq"``; nothing for CAME's instability of a 1-D param): fp32, >= 0."""
    if len(shape) >= 2:
        return [StateSpec(f"exp_avg_{kind}_row", shape[:-1], torch.float32, "square", axes="row"),
                StateSpec(f"exp_avg_{kind}_col", shape[:-2] + shape[-1:], torch.float32, "square", axes="col")]
    return [StateSpec("exp_avg_sq", shape, torch.float32, "square")] if kind == "sq" else []


def _check_step_rule(lr, relative_step, warmup_init) -> None:
    """transformers' combination rules of ``lr`` / ``relative_step`` / ``warmup_init`` (its messages first, so code
    matching them keeps working), each followed by the values given and the settings that are allowed."""
    if lr is not None and relative_step:
        raise ValueError(
            f"Cannot combine manual `lr` and `relative_step=True` options (got lr={lr!r}, relative_step=True): "
            "pass lr=None to use Adafactor's own relative step size, or relative_step=False (and "
            "scale_parameter=False for the lr to be the step size) to use lr."
        )
    if warmup_init and not relative_step:
        raise ValueError(
            f"`warmup_init=True` requires `relative_step=True` (got warmup_init=True, relative_step={relative_step!r}"
            f"{'' if lr is None else f', lr={lr!r}'}): warmup_init warms up the relative step size; with an lr of "
            "your own, pass warmup_init=False and warm up with an LR scheduler (transformers' recommended "
            "lr=1e-3, relative_step=False, warmup_init=True cannot be combined)."
        )


def _check_no_lr_schedule(groups: list[dict]) -> None:
    """Refuse an LR scheduler on a group that has no lr to schedule (``lr=None``, Adafactor's relative step).

    torch's ``LRScheduler`` records ``initial_lr`` (here ``None``) in every group it is built on, then fails at its
    first arithmetic on it with ``TypeError: unsupported operand type(s) ... 'NoneType'`` (transformers' Adafactor
    gives the same); the first ``step()`` of this optimizer comes before that and says why, with the fix."""
    index = next((i for i, group in enumerate(groups) if group["lr"] is None and "initial_lr" in group), None)
    if index is not None:
        raise ValueError(
            f"Invalid LR scheduler on Adafactor param group {index}: lr=None (relative_step=True: Adafactor computes "
            "its own step size), so the scheduler has no lr to schedule and would fail at its next step with a "
            "TypeError. Give Adafactor an lr for the scheduler to drive (e.g. lr=1e-3, relative_step=False, "
            "scale_parameter=False, warmup_init=False), or use no LR scheduler."
        )


def _check_hyperparameters(group: dict, lr_required: bool = True) -> None:
    """Validate one group's hyperparameters (transformers' combination rules plus value checks); ``lr_required``
    False lets ``lr=None`` pass with ``relative_step=False`` (defaults whose groups bring their own lr)."""
    for name in ("scale_parameter", "relative_step", "warmup_init"):
        check_bool(group[name], name)
    _check_step_rule(group["lr"], group["relative_step"], group["warmup_init"])
    if group["lr"] is None and not group["relative_step"] and lr_required:
        raise ValueError("Invalid lr=None with relative_step=False: give a learning rate (a finite number >= 0).")
    check_lr(group["lr"], allow_none=True)
    check_eps_pair(group["eps"], ("eps[0]", "eps[1]"))
    check_positive(group["clip_threshold"], "clip_threshold")
    decay = group["decay_rate"]
    if not isinstance(decay, (int, float)) or isinstance(decay, bool) or not -math.inf < decay <= 0:
        raise ValueError(f"Invalid decay_rate={decay!r}: expected a finite number <= 0 (default -0.8).")
    beta1 = group["beta1"]
    if beta1 is not None and (not isinstance(beta1, (int, float)) or isinstance(beta1, bool) or not 0 <= beta1 < 1):
        raise ValueError(f"Invalid beta1={beta1!r}: expected None or a number in [0, 1).")
    check_non_negative(group["weight_decay"], "weight_decay")
    check_choice(group["momentum_dtype"], MOMENTUM_DTYPES, "momentum_dtype")
    check_bool(group.get("maximize", False), "maximize")
