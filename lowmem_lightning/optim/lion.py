"""Lion with fp32 momentum (``lion``) or 8-bit block-wise momentum (``lion_8bit``, ~1.02 bytes/param).

The update math lives in :mod:`lowmem_lightning.kernels.lion`; this module keeps the state and calls
the launcher. :func:`moment_state` (shared with AdEMAMix) converts a moment between its fp32 and its
8-bit form, so each class loads the other's state dicts.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..kernels.codec import dequantize_reference, quantize_reference
from ..kernels.dispatch import dispatch
from ..kernels.lion import LION, LION_NEAREST, LionScalars, LionTensors
from ..kernels.rounding import BF16Rounding, is_stochastic, step_seed
from .base import LowMemOptimizer, StateSpec, check_drop_in_flags, codes_specs, step_spec
from .layout import loaded_step, quantizes_state
from .sharding import block_state_head, block_state_len, local, pad_block_state, shard_tensor_index
from .validation import check_betas, check_lr, check_non_negative

__all__ = ["Lion", "Lion8bit", "moment_state", "check_seed", "check_maximize"]


class Lion(LowMemOptimizer):
    """Lion (Chen et al. 2023): ``p -= lr * sign(beta1 * m + (1 - beta1) * g)``, then ``m = beta2 * m +
    (1 - beta2) * g``, with decoupled weight decay ``p *= 1 - lr * weight_decay`` (as the paper and
    bitsandbytes >= 0.50). Defaults are bitsandbytes' (``lr=1e-4``, ``betas=(0.9, 0.99)``, no weight
    decay); the paper advises an lr 3-10x smaller and a weight decay 3-10x larger than AdamW's.

    State per param: ``step`` (0-d fp32) and the momentum ``exp_avg`` in fp32 (4 bytes/param). The
    8-bit form is :class:`Lion8bit`.

    Args:
        params: tensors or param-group dicts; fp32, bf16 or fp16 (bf16/fp16 written back with
            stochastic rounding).
        lr: learning rate (>= 0); a change by an LR scheduler applies on the next step, no recompile.
        betas: ``(beta1, beta2)``, each in [0, 1): beta1 mixes the update direction, beta2 the momentum.
        weight_decay: decoupled weight decay coefficient (>= 0).
        maximize: ascend instead of descend.
        seed: base seed of the stochastic rounding (step ``t`` of tensor ``i`` uses
            ``rounding.step_seed(t, i, seed)``): runs and resumed runs are reproducible.
        bf16_rounding: how bf16/fp16 params are written: ``"stochastic"`` (default) or ``"nearest"``
            (round-to-nearest-even, bitsandbytes' behaviour); a param-group setting kept in state dicts.
        quantize_state: accepted for every param group as in the ``_8bit`` class (a storage choice); this class
            keeps fp32 state whatever its value.
        foreach, fused, capturable, differentiable: torch.optim's switches, accepted as None/False.

    A gradient holding inf/NaN (or whose squares overflow fp32) skips that tensor's update and is
    counted in :attr:`skipped_updates`. ``step()`` never synchronises with the device.
    """

    quantized_state = False
    """Whether params of >= ``MIN_QUANTIZED_NUMEL`` elements keep 8-bit momentum (:class:`Lion8bit`)."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
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
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize,
                                      bf16_rounding=bf16_rounding, quantize_state=quantize_state))

    def _check_group(self, group: dict) -> None:
        """Validate a param group like the constructor's arguments (``ValueError`` naming the argument)."""
        check_lr(group["lr"])
        check_betas(group["betas"])
        check_non_negative(group["weight_decay"], "weight_decay")
        check_maximize(group["maximize"])

    # ------------------------------------------------------------------ state
    def _is_quantized(self, param: torch.Tensor, group: dict | None) -> bool:
        """Whether ``param`` (in ``group``; None: its own) keeps 8-bit state: the 8-bit class and
        :func:`.layout.quantizes_state`."""
        return self.quantized_state and quantizes_state(param, self._layout_group(param, group))

    def state_layout(self, param: torch.Tensor, group: dict | None = None) -> list[StateSpec]:
        """``step``; ``exp_avg`` as int8 codes + fp32 absmax per 256 elements (8-bit, >= 4096 elements;
        padded to the shard layout for DTensors) or fp32 of the param's (local) shape."""
        if self._is_quantized(param, group):
            return [step_spec(), *codes_specs("exp_avg", block_state_len(param), True)]
        return [step_spec(), StateSpec("exp_avg", tuple(local(param).shape), torch.float32, "moment")]

    def _convert_foreign_state(self, param: torch.Tensor, state: dict, group: dict) -> dict:
        """Accept the other form's state (fp32 ``exp_avg`` <-> 8-bit codes): quantized or dequantized."""
        state = dict(state)
        state["step"] = loaded_step(state.get("step"))
        return moment_state(state, "exp_avg", param, self._is_quantized(param, group), signed=True)

    def _fp32_state(self, param: torch.Tensor, state: dict, group: dict) -> dict:
        """``state`` with 8-bit momentum codes decoded into :class:`Lion`'s fp32 ``exp_avg`` (:func:`moment_state`)."""
        return moment_state(state, "exp_avg", param, False, signed=True)

    # ------------------------------------------------------------------ step
    def _update_tensors(self, group: dict, items: list, states: list[dict], flags: list) -> None:
        """The fused update of one device's params (empty DTensor shards left out)."""
        live = [k for k, (_, param) in enumerate(items) if local(param).numel() > 0]
        shards = [local(items[k][1]) for k in live]
        quantized = ["exp_avg_codes" in states[k] for k in live]
        beta1, beta2 = group["betas"]
        tensors = LionTensors(
            shards,
            [local(items[k][1].grad) for k in live],
            [block_state_head(states[k]["exp_avg_codes"], s.numel(), False) if q else states[k]["exp_avg"]
             for k, s, q in zip(live, shards, quantized)],
            [block_state_head(states[k]["exp_avg_absmax"], s.numel(), True) if q else None
             for k, s, q in zip(live, shards, quantized)],
            [states[k]["step"] for k in live],
            [flags[k] for k in live],
            [step_seed(0, shard_tensor_index(*items[k]), self._seed) for k in live],
        )
        family = LION if is_stochastic(group["bf16_rounding"]) else LION_NEAREST
        dispatch(family, tensors, LionScalars.of(group["lr"], beta1, beta2, group["weight_decay"], group["maximize"]))


class Lion8bit(Lion):
    """:class:`Lion` with the momentum in the signed block-wise 8-bit code (:mod:`..kernels.codec`):
    ``exp_avg_codes`` (int8, one per element) + ``exp_avg_absmax`` (fp32 per 256 elements), 1.016
    bytes/param; params under 4096 elements (and of ``quantize_state=False`` groups) keep fp32 ``exp_avg``.
    Loads :class:`Lion` state dicts (quantizing the momentum) and vice versa."""

    quantized_state = True


def check_seed(seed) -> int:
    """``seed`` as an int; ``ValueError`` naming it otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"Invalid seed={seed!r}: expected an int.")
    return int(seed)


def check_maximize(maximize) -> None:
    """``ValueError`` unless ``maximize`` is True or False."""
    if not isinstance(maximize, bool):
        raise ValueError(f"Invalid maximize={maximize!r}: expected True or False.")


def moment_state(state: dict, key: str, param: torch.Tensor, quantized: bool, signed: bool) -> dict:
    """``state`` with moment ``key`` in the form a param needs: ``{key}_codes`` + ``{key}_absmax``
    (8-bit, flat, padded to :func:`.sharding.block_state_len`) when ``quantized``, else fp32 ``{key}`` of
    the (local) param's shape. The other form is converted (quantized with the ``signed`` or unsigned
    code, or decoded); a state already in the right form, or malformed, is left for the validation."""
    shard = local(param)
    n = shard.numel()
    codes, absmax = state.get(f"{key}_codes"), state.get(f"{key}_absmax")
    full = state.get(key)
    has_codes = isinstance(codes, torch.Tensor) and isinstance(absmax, torch.Tensor)
    if quantized and isinstance(full, torch.Tensor) and not has_codes and full.numel() == shard.numel():
        if not full.is_floating_point() or not torch.isfinite(full).all():
            return state  # refused by the validation (wrong dtype or non-finite values)
        new_codes, new_absmax = quantize_reference(full.detach().float(), signed=signed)
        state = {k: v for k, v in state.items() if k != key}
        state[f"{key}_codes"], state[f"{key}_absmax"] = pad_block_state(new_codes, new_absmax, block_state_len(param))
    elif not quantized and has_codes and full is None and codes.numel() >= shard.numel():
        state = {k: v for k, v in state.items() if k not in (f"{key}_codes", f"{key}_absmax")}
        state[key] = dequantize_reference(codes, absmax)[: shard.numel()].view(shard.shape).clone()
    elif not quantized and isinstance(full, torch.Tensor) and full.is_floating_point() and full.numel() == n:
        state[key] = full.detach().to(torch.float32).reshape(shard.shape)
    return state
