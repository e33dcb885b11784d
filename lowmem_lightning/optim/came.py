"""CAME with the semantics of the authors' ``came-pytorch``, on our kernels, with fp32 or 8-bit momentum."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from ..kernels.came import CAME as CAME_FAMILY
from ..kernels.came import CAME_NEAREST, CAMEScalars, CAMETensors
from ..kernels.dispatch import dispatch
from ..kernels.rounding import BF16Rounding, is_stochastic
from .adafactor import factored_inputs, second_moment_specs
from .base import LowMemOptimizer, StateSpec, check_drop_in_flags, step_spec
from .layout import MOMENTUM_DTYPES, MomentumDtype, convert_momentum, loaded_step, momentum_specs, quantized_momentum
from .sharding import local, shard_tensor_index
from .validation import check_betas, check_bool, check_choice, check_eps_pair, check_non_negative, check_positive

__all__ = ["CAME"]


class CAME(LowMemOptimizer):
    """CAME (Luo et al., "CAME: Confidence-guided Adaptive Memory Efficient Optimization", ACL 2023).

    Same arguments, defaults and update as the official ``came_pytorch.CAME``; with fp32 params the
    updates match it to fp32 rounding. Tensors of >= 2 dims keep factored second-moment *and*
    instability (confidence) statistics over their last two dims: ``exp_avg_sq_row`` /
    ``exp_avg_res_row`` (``shape[:-1]``) and ``exp_avg_sq_col`` / ``exp_avg_res_col``
    (``shape[:-2] + shape[-1:]``), fp32, 8 * (rows + cols) bytes per matrix; no full-size
    instability tensor exists, even transiently. 1-D tensors keep a full ``exp_avg_sq`` and apply
    the momentum directly, as the official code does. Math and kernel passes:
    :mod:`lowmem_lightning.kernels.came`.

    Args:
        params: tensors or param-group dicts (fp32, bf16 or fp16; bf16/fp16 are written back with
            stochastic rounding). Grads may be any float dtype.
        lr: learning rate (required, >= 0: 0 is allowed as in torch.optim, e.g. a warm-up's start); an
            LR scheduler may change ``group["lr"]``.
        eps: ``(eps1, eps2)`` added to squared gradients and to the instability.
        clip_threshold: threshold on the RMS of the update (> 0).
        betas: ``(beta1, beta2, beta3)`` of the momentum, second moment and instability, in [0, 1).
        weight_decay: L2 penalty scaled by ``lr`` (>= 0).
        momentum_dtype: ``"float32"`` (``exp_avg``: about 4 bytes/param in all) or ``"int8"``
            (``exp_avg_codes`` int8 + ``exp_avg_absmax`` fp32 per 256 elements: about 1.02
            bytes/param in all; tensors under 4096 elements keep fp32). A storage choice:
            ``load_state_dict`` keeps this optimizer's value and converts the loaded momentum to it.
        maximize: ascend instead of descend (the kernels apply the gradient's sign, as AdamW's and
            SGD's do; the gradients are not touched; not in came-pytorch).
        bf16_rounding: how bf16/fp16 params are written: ``"stochastic"`` (default) or ``"nearest"``
            (round-to-nearest-even, as came-pytorch); a param-group setting kept in state dicts.
        quantize_state: ``False`` keeps the momentum of the group's params in fp32 even with ``"int8"`` (give
            the embeddings a group with it, as bitsandbytes' ``optim_bits=32``); a storage choice, like
            ``momentum_dtype``.
        foreach, fused, capturable, differentiable: torch.optim's switches, accepted as None/False
            (no-ops: the update is always our fused kernels with device step counters); True raises.

    ``group["effective_lr"]`` is set every step to ``float(group["lr"])``, the step size CAME
    applies (no device quantity is involved); :meth:`effective_lr` returns it per group.

    State per param: ``step`` (0-d fp32 counter of applied updates; a non-finite gradient skips
    the update and does not advance it; it also seeds stochastic rounding), the statistics above
    and the momentum. State dicts of ``came_pytorch.CAME`` load directly.
    """

    _whole_tensor_update = True  # factors and normalises whole matrices: FSDP1 flat params are refused

    def __init__(
        self,
        params: Iterable,
        lr: float | None = None,
        eps: tuple[float, float] = (1e-30, 1e-16),
        clip_threshold: float = 1.0,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
        weight_decay: float = 0.0,
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
        defaults = dict(
            lr=lr,
            eps=eps,
            clip_threshold=clip_threshold,
            betas=betas,
            weight_decay=weight_decay,
            momentum_dtype=momentum_dtype,
            maximize=maximize,
            bf16_rounding=bf16_rounding,
            quantize_state=quantize_state,
        )
        super().__init__(params, defaults)

    def _check_defaults(self, defaults: dict) -> None:
        """The constructor's hyperparameters; its ``lr`` may be None when every group brings its own."""
        _check_hyperparameters(defaults, lr_required=False)

    def _check_group(self, group: dict) -> None:
        """Validate a param group like the constructor's arguments (a group left without an lr included)."""
        _check_hyperparameters(group)

    def effective_lr(self) -> list[float]:
        """Step size per param group (``group["lr"]``, as a float; never syncs)."""
        return [float(group["lr"]) for group in self.param_groups]

    # ------------------------------------------------------------------ state
    def state_layout(self, param: torch.Tensor, group: dict | None = None) -> list[StateSpec]:
        """``step``, the momentum (:func:`.layout.momentum_specs`), and for >= 2-D params the factored
        second moment and instability (``exp_avg_{sq,res}_{row,col}``), else a full ``exp_avg_sq``; fp32."""
        group = self._group_of(param) if group is None else group
        shape = tuple(local(param).shape)
        layout = [step_spec(), *momentum_specs(param, group, "exp_avg", "exp_avg")]
        return layout + second_moment_specs(shape, "sq") + second_moment_specs(shape, "res")

    def _convert_foreign_state(self, param: torch.Tensor, state: dict, group: dict) -> dict:
        """Accept ``came_pytorch.CAME`` states (int ``step``, ``RMS``) and ours of either ``momentum_dtype``."""
        state = dict(state)
        state.pop("RMS", None)
        state["step"] = loaded_step(state.get("step"), 0.0)
        state = convert_momentum(param, state, quantized_momentum(param, group), "exp_avg",
                                 "exp_avg")
        for key, value in list(state.items()):
            if key.startswith("exp_avg_") and key not in ("exp_avg_codes", "exp_avg_absmax"):
                if isinstance(value, torch.Tensor):
                    state[key] = value.to(torch.float32)
        return state

    # ------------------------------------------------------------------ step
    def _finish_group(self, group: dict) -> None:
        group["effective_lr"] = float(group["lr"])

    def _update_tensors(self, group: dict, items: list, states: list[dict], flags: list) -> None:
        """One CAME update per tensor (the sharded form on the eager reference, completing sums across ranks)."""
        inputs = [factored_inputs(param, state) for (_, param), state in zip(items, states)]
        shards, grads, vs, vcs, ms, absmaxes, reduces = (list(field) for field in zip(*inputs))
        tensors = CAMETensors(
            shards, grads, vs, vcs, [state.get("exp_avg_res_row") for state in states],
            [state.get("exp_avg_res_col") for state in states], ms, absmaxes, [state["step"] for state in states],
            list(flags), [shard_tensor_index(index, param) for index, param in items], reduces,
        )
        scalars = CAMEScalars.of(group["lr"], group["eps"], group["clip_threshold"], group["betas"],
                                 group["weight_decay"], group["maximize"])
        dispatch(CAME_FAMILY if is_stochastic(group["bf16_rounding"]) else CAME_NEAREST, tensors, scalars)


def _check_hyperparameters(group: dict, lr_required: bool = True) -> None:
    """Validate one group's hyperparameters (each error names the argument, the value and what is allowed)."""
    lr = group["lr"]
    if lr is None and not lr_required:
        pass
    elif lr is None or isinstance(lr, bool) or not isinstance(lr, (int, float, torch.Tensor)) or not (
        math.isfinite(float(lr)) and float(lr) >= 0
    ):
        raise ValueError(f"Invalid lr={lr!r}: CAME requires a learning rate, a finite number >= 0.")
    check_eps_pair(group["eps"], ("eps[0]", "eps[1]"))
    check_positive(group["clip_threshold"], "clip_threshold")
    check_betas(group["betas"], count=3)
    check_non_negative(group["weight_decay"], "weight_decay")
    check_choice(group["momentum_dtype"], MOMENTUM_DTYPES, "momentum_dtype")
    check_bool(group.get("maximize", False), "maximize")
