"""AdEMAMix with fp32 moments (``ademamix``) or 8-bit block-wise moments (``ademamix_8bit``, ~3.05
bytes/param).

The update math lives in :mod:`lowmem_lightning.kernels.ademamix`; this module keeps the state and
calls the launcher.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..kernels.ademamix import ADEMAMIX, ADEMAMIX_NEAREST, AdEMAMixScalars, AdEMAMixTensors
from ..kernels.dispatch import dispatch
from ..kernels.rounding import BF16Rounding, is_stochastic, step_seed
from .base import LowMemOptimizer, StateSpec, check_drop_in_flags, codes_specs, step_spec
from .layout import loaded_step, quantizes_state
from .lion import check_maximize, check_seed, moment_state
from .sharding import block_state_head, block_state_len, local, shard_tensor_index
from .validation import check_betas, check_eps, check_lr, check_non_negative

__all__ = ["AdEMAMix", "AdEMAMix8bit"]

_MOMENTS = (("exp_avg", True), ("exp_avg_slow", True), ("exp_avg_sq", False))
"""State names of m1, m2 and nu, and whether each is signed (its 8-bit code)."""


class AdEMAMix(LowMemOptimizer):
    """AdEMAMix (Pagliardini et al. 2024, bitsandbytes' semantics): Adam's bias-corrected fast EMA ``m1``
    plus ``alpha`` times a slow EMA ``m2`` (beta3, uncorrected), over Adam's denominator, with decoupled
    weight decay; optional warmups of ``alpha`` (``t_alpha`` steps) and ``beta3`` (``t_beta3`` steps) as
    in the paper. Formula: :mod:`lowmem_lightning.kernels.ademamix`.

    State per param: ``step`` (0-d fp32), ``exp_avg`` (m1), ``exp_avg_slow`` (m2), ``exp_avg_sq`` (nu),
    all fp32 (12 bytes/param). The 8-bit form is :class:`AdEMAMix8bit`.

    Args:
        params: tensors or param-group dicts; fp32, bf16 or fp16 (bf16/fp16 written back with
            stochastic rounding).
        lr: learning rate (>= 0); a change by an LR scheduler applies on the next step, no recompile.
        betas: ``(beta1, beta2, beta3)``, each in [0, 1): fast EMA, second moment, slow EMA.
        alpha: weight of the slow EMA (>= 0).
        t_alpha: steps of the linear ``alpha`` warmup (an int > 0), or None for none (the default).
        t_beta3: steps of the ``beta3`` warmup from ``beta1`` (an int > 0; needs beta1, beta3 > 0), or None.
        eps: added to the denominator (> 0).
        weight_decay: decoupled weight decay coefficient (>= 0).
        maximize: ascend instead of descend.
        seed: base seed of the stochastic rounding (runs and resumed runs are reproducible).
        bf16_rounding: how bf16/fp16 params are written: ``"stochastic"`` (default) or ``"nearest"``
            (round-to-nearest-even, bitsandbytes' behaviour); a param-group setting kept in state dicts.
        quantize_state: accepted for every param group as in the ``_8bit`` class (a storage choice); this class
            keeps fp32 state whatever its value.
        foreach, fused, capturable, differentiable: torch.optim's switches, accepted as None/False.

    A gradient holding inf/NaN (or whose squares overflow fp32) skips that tensor's update and is
    counted in :attr:`skipped_updates`. ``step()`` never synchronises with the device.
    """

    quantized_state = False
    """Whether params of >= ``MIN_QUANTIZED_NUMEL`` elements keep 8-bit moments (:class:`AdEMAMix8bit`)."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
        alpha: float = 5.0,
        t_alpha: int | None = None,
        t_beta3: int | None = None,
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        maximize: bool = False,
        seed: int = 0,
        bf16_rounding: BF16Rounding = "stochastic",
        quantize_state: bool = True,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ):
        check_drop_in_flags(foreach=foreach, fused=fused, capturable=capturable, differentiable=differentiable)
        self._seed = check_seed(seed)
        betas = tuple(betas) if isinstance(betas, (list, tuple)) else betas
        defaults = dict(lr=lr, betas=betas, alpha=alpha, t_alpha=t_alpha, t_beta3=t_beta3, eps=eps,
                        weight_decay=weight_decay, maximize=maximize, bf16_rounding=bf16_rounding,
                        quantize_state=quantize_state)
        super().__init__(params, defaults)

    def _check_group(self, group: dict) -> None:
        """Validate a param group like the constructor's arguments (``ValueError`` naming the argument)."""
        check_lr(group["lr"])
        check_betas(group["betas"], count=3)
        check_non_negative(group["alpha"], "alpha")
        for name in ("t_alpha", "t_beta3"):
            value = group[name]
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"Invalid {name}={value!r}: expected None (no warmup) or an int > 0 (steps).")
        if group["t_beta3"] is not None and min(group["betas"][0], group["betas"][2]) <= 0:
            raise ValueError(f"Invalid betas={tuple(group['betas'])!r} with t_beta3={group['t_beta3']!r}: the beta3 "
                             "warmup interpolates log(beta1) and log(beta3), so both must be > 0.")
        check_eps(group["eps"])
        check_non_negative(group["weight_decay"], "weight_decay")
        check_maximize(group["maximize"])

    # ------------------------------------------------------------------ state
    def _is_quantized(self, param: torch.Tensor, group: dict | None) -> bool:
        """Whether ``param`` (in ``group``; None: its own) keeps 8-bit state: the 8-bit class and
        :func:`.layout.quantizes_state`."""
        return self.quantized_state and quantizes_state(param, self._layout_group(param, group))

    def state_layout(self, param: torch.Tensor, group: dict | None = None) -> list[StateSpec]:
        """``step``; ``exp_avg``, ``exp_avg_slow`` (signed) and ``exp_avg_sq`` (unsigned) as 8-bit codes +
        fp32 absmax per 256 elements (8-bit, >= 4096 elements; padded to the shard layout for DTensors),
        else fp32 of the param's (local) shape."""
        if self._is_quantized(param, group):
            n = block_state_len(param)
            return [step_spec(), *(spec for name, signed in _MOMENTS for spec in codes_specs(name, n, signed))]
        shape = tuple(local(param).shape)
        return [step_spec(), *(StateSpec(name, shape, torch.float32, "moment" if signed else "square")
                               for name, signed in _MOMENTS)]

    def _convert_foreign_state(self, param: torch.Tensor, state: dict, group: dict) -> dict:
        """Accept the other form's state (fp32 moments <-> 8-bit codes): quantized or dequantized."""
        state = dict(state)
        state["step"] = loaded_step(state.get("step"))
        for name, signed in _MOMENTS:
            state = moment_state(state, name, param, self._is_quantized(param, group), signed)
        return state

    def _fp32_state(self, param: torch.Tensor, state: dict, group: dict) -> dict:
        """``state`` with 8-bit codes decoded into :class:`AdEMAMix`'s fp32 moments (:func:`.lion.moment_state`)."""
        for name, signed in _MOMENTS:
            state = moment_state(state, name, param, False, signed)
        return state

    # ------------------------------------------------------------------ step
    def _update_tensors(self, group: dict, items: list, states: list[dict], flags: list) -> None:
        """The fused update of one device's params (empty DTensor shards left out)."""
        live = [k for k, (_, param) in enumerate(items) if local(param).numel() > 0]
        shards = [local(items[k][1]) for k in live]
        fields = []
        for name, _ in _MOMENTS:
            codes, scales = [], []
            for k, shard in zip(live, shards):
                quantized = f"{name}_codes" in states[k]
                codes.append(block_state_head(states[k][f"{name}_codes"], shard.numel(), False) if quantized
                             else states[k][name])
                scales.append(block_state_head(states[k][f"{name}_absmax"], shard.numel(), True) if quantized
                              else None)
            fields += [codes, scales]
        tensors = AdEMAMixTensors(
            shards, [local(items[k][1].grad) for k in live], *fields, [states[k]["step"] for k in live],
            [flags[k] for k in live], [step_seed(0, shard_tensor_index(*items[k]), self._seed) for k in live])
        scalars = AdEMAMixScalars.of(group["lr"], group["betas"], group["alpha"], group["eps"],
                                     group["weight_decay"], group["maximize"], group["t_alpha"], group["t_beta3"])
        dispatch(ADEMAMIX if is_stochastic(group["bf16_rounding"]) else ADEMAMIX_NEAREST, tensors, scalars)


class AdEMAMix8bit(AdEMAMix):
    """:class:`AdEMAMix` with ``exp_avg`` and ``exp_avg_slow`` in the signed and ``exp_avg_sq`` in the
    unsigned block-wise 8-bit code (:mod:`..kernels.codec`): ``*_codes`` (one byte per element) +
    ``*_absmax`` (fp32 per 256 elements), 3.05 bytes/param; params under 4096 elements (and of
    ``quantize_state=False`` groups) keep fp32 moments. Loads :class:`AdEMAMix` state dicts (quantizing the
    moments) and vice versa."""

    quantized_state = True
