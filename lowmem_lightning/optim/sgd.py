"""SGD with momentum, exactly ``torch.optim.SGD``'s semantics, with fp32 or 8-bit momentum."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..kernels.dispatch import dispatch
from ..kernels.rounding import BF16Rounding, is_stochastic
from ..kernels.sgd import SGD_FAMILY, SGD_NEAREST, SGDScalars, SGDTensors
from .base import LowMemOptimizer, StateSpec, check_drop_in_flags, step_spec
from .layout import MOMENTUM_DTYPES, MomentumDtype, convert_momentum, loaded_step, momentum_specs, quantized_momentum
from .sharding import block_state_head, local, shard_tensor_index
from .validation import check_choice, check_lr, check_non_negative

__all__ = ["SGD", "MOMENTUM_DTYPES"]


class SGD(LowMemOptimizer):
    """Stochastic gradient descent with momentum, dampening, Nesterov and coupled weight decay.

    Same arguments, defaults (except ``lr``'s default of 1e-3), errors and update as
    ``torch.optim.SGD``: the momentum buffer starts as the first (weight-decayed) gradient, then
    ``buf = momentum * buf + (1 - dampening) * d``; ``p -= lr * (d + momentum * buf)`` with Nesterov,
    ``p -= lr * buf`` without. The whole update of a tensor is one fused kernel
    (:mod:`lowmem_lightning.kernels.sgd`).

    Args:
        params: tensors or param-group dicts (fp32, bf16 or fp16 params; bf16/fp16 are written back
            with stochastic rounding). Grads may be any float dtype.
        lr: learning rate (>= 0); a float changed by an LR scheduler takes effect on the next step.
        momentum: momentum factor (>= 0); 0 keeps no momentum state.
        dampening: dampening of the momentum (>= 0).
        weight_decay: coupled L2 penalty added to the gradient (>= 0).
        nesterov: Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
        maximize: maximize the objective instead of minimizing it.
        momentum_dtype: ``"float32"`` (4 bytes/param, bit-for-bit the math of torch) or ``"int8"``
            (the signed block-wise 8-bit code: 1.016 bytes/param; tensors under 4096 elements keep
            fp32). A storage choice: ``load_state_dict`` keeps this optimizer's value and converts
            the loaded momentum to it.
        bf16_rounding: how bf16/fp16 params are written: ``"stochastic"`` (default) or ``"nearest"``
            (round-to-nearest-even, as torch.optim.SGD); a param-group setting kept in state dicts.
        quantize_state: ``False`` keeps the momentum of the group's params in fp32 even with ``"int8"`` (give
            the embeddings a group with it, as bitsandbytes' ``optim_bits=32``); a storage choice, like
            ``momentum_dtype``.
        foreach, fused, differentiable: torch.optim.SGD's switches, accepted as None/False (no-ops:
            the update is always one fused kernel); True raises.

    State per param: ``step`` (0-d fp32 counter of applied updates; it also seeds stochastic
    rounding) and, with momentum, ``momentum_buffer`` (fp32, the param's shape) or
    ``momentum_codes`` (int8, flat) + ``momentum_absmax`` (fp32, one per 256 elements).
    A gradient holding inf/NaN skips that tensor's update (params and state untouched) and is
    counted in :attr:`skipped_updates`. State dicts of ``torch.optim.SGD`` load directly.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        maximize: bool = False,
        momentum_dtype: MomentumDtype = "float32",
        *,
        bf16_rounding: BF16Rounding = "stochastic",
        quantize_state: bool = True,
        foreach: bool | None = None,
        fused: bool | None = None,
        differentiable: bool = False,
    ):
        check_drop_in_flags(foreach=foreach, fused=fused, differentiable=differentiable)
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            momentum_dtype=momentum_dtype,
            bf16_rounding=bf16_rounding,
            quantize_state=quantize_state,
        )
        super().__init__(params, defaults)

    def _check_group(self, group: dict) -> None:
        """Validate a param group like the constructor's arguments."""
        _check_hyperparameters(group)

    # ------------------------------------------------------------------ state
    @staticmethod
    def _quantized(param: torch.Tensor, group: dict) -> bool:
        return quantized_momentum(param, group)

    def _state_incomplete(self, state: dict, group: dict) -> bool:
        """A group given a momentum after its first steps gets its momentum buffer on the next step."""
        return group["momentum"] != 0 and not _has_momentum(state)

    def state_layout(self, param: torch.Tensor, group: dict | None = None) -> list[StateSpec]:
        """``step``; with momentum ``momentum_codes`` (int8) + ``momentum_absmax`` (fp32 per 256) for an int8
        momentum of >= 4096 elements, else an fp32 ``momentum_buffer`` of the param's (local) shape."""
        group = self._group_of(param) if group is None else group
        layout = [step_spec()]
        if group["momentum"] != 0:
            layout += momentum_specs(param, group, "momentum_buffer", "momentum")
        return layout

    def _convert_foreign_state(self, param: torch.Tensor, state: dict, group: dict) -> dict:
        """Accept torch.optim.SGD states and our own of the other ``momentum_dtype``.

        A torch state (``momentum_buffer`` only, possibly None or in the param's dtype) gets a step
        counter (1 when a buffer exists: the buffer is not re-initialized); a buffer is quantized or
        dequantized to this group's ``momentum_dtype``.
        """
        state = dict(state)
        had_momentum = any(isinstance(state.get(k), torch.Tensor) for k in ("momentum_buffer", "momentum_codes"))
        state["step"] = loaded_step(state.get("step"), 1.0 if had_momentum else 0.0)
        if group["momentum"] == 0:
            for key in ("momentum_buffer", "momentum_codes", "momentum_absmax"):
                state.pop(key, None)
            return state
        return convert_momentum(param, state, self._quantized(param, group), "momentum_buffer", "momentum")

    def _fp32_state(self, param: torch.Tensor, state: dict, group: dict) -> dict:
        """``state`` with int8 momentum codes decoded into ``torch.optim.SGD``'s fp32 ``momentum_buffer``."""
        return convert_momentum(param, state, False, "momentum_buffer", "momentum")

    # ------------------------------------------------------------------ step
    def _update_tensors(self, group: dict, items: list, states: list[dict], flags: list) -> None:
        """The fused update of one device's params (empty DTensor shards left out)."""
        live = [i for i, (_, param) in enumerate(items) if local(param).numel() > 0]
        shards = [local(items[i][1]) for i in live]  # the param itself (not .data: a new object per call)
        tensors = SGDTensors(
            shards,
            [local(items[i][1].grad) for i in live],
            [block_state_head(states[i].get("momentum_codes", states[i].get("momentum_buffer")), shard.numel(),
                              False) for i, shard in zip(live, shards)],
            [block_state_head(states[i].get("momentum_absmax"), shard.numel(), True) for i, shard in zip(live, shards)],
            [states[i]["step"] for i in live],
            [flags[i] for i in live],
            [shard_tensor_index(*items[i]) for i in live],
        )
        scalars = SGDScalars.of(group["lr"], group["weight_decay"], group["momentum"], group["dampening"],
                                group["nesterov"], group["maximize"])
        dispatch(SGD_FAMILY if is_stochastic(group["bf16_rounding"]) else SGD_NEAREST, tensors, scalars)


def _has_momentum(state: dict) -> bool:
    return "momentum_buffer" in state or "momentum_codes" in state


def _check_hyperparameters(group: dict) -> None:
    """Validate one group's hyperparameters (torch.optim.SGD's rules plus ``momentum_dtype``); lr, momentum,
    weight_decay and Nesterov refusals contain torch.optim.SGD's own words, then ours."""
    check_lr(group["lr"], torch_wording=True)
    check_non_negative(group["momentum"], "momentum", torch_wording=True)
    check_non_negative(group["dampening"], "dampening")  # torch.optim.SGD does not check it
    check_non_negative(group["weight_decay"], "weight_decay", torch_wording=True)
    for name in ("nesterov", "maximize"):
        if not isinstance(group[name], bool):
            raise TypeError(f"Invalid {name}={group[name]!r}: expected True or False.")
    check_choice(group["momentum_dtype"], MOMENTUM_DTYPES, "momentum_dtype")
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError(
            "Nesterov momentum requires a momentum and zero dampening "
            f"(got nesterov=True, momentum={group['momentum']!r}, dampening={group['dampening']!r})."
        )
