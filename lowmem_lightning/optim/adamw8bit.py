"""AdamW with 8-bit block-wise quantized moments: about 2.03 bytes of state per parameter.

The update math lives in :mod:`lowmem_lightning.kernels.adamw8bit` (Triton on CUDA, the compiled
PyTorch reference on CPU); this module only keeps the state and calls the launcher.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..kernels.adamw8bit import ADAMW_8BIT, ADAMW_8BIT_NEAREST, AdamWScalars, AdamWTensors
from ..kernels.codec import quantize_blockwise
from ..kernels.dispatch import dispatch
from ..kernels.rounding import BF16Rounding, is_stochastic, step_seed
from .adamw_convert import (
    FORM_8BIT,
    code_form,
    decoded_row_form,
    form_layout,
    read_layout,
    with_decoded_moments,
)
from .base import LowMemOptimizer, StateSpec, check_drop_in_flags, codes_specs, step_spec
from .layout import loaded_step, quantizes_state
from .sharding import block_state_head, block_state_len, is_dtensor, local, pad_block_state, shard_tensor_index
from .validation import check_betas, check_eps, check_lr, check_non_negative

__all__ = ["AdamW8bit"]


class AdamW8bit(LowMemOptimizer):
    """AdamW (Loshchilov & Hutter, ICLR 2019; ``torch.optim.AdamW`` semantics) with 8-bit moments.

    Per parameter with at least 4096 elements the state is ``step`` (0-d fp32), ``exp_avg_codes``
    (int8, one per element), ``exp_avg_absmax`` (fp32, one per block of 256), ``exp_avg_sq_codes``
    (uint8) and ``exp_avg_sq_absmax``: 2 + 8/256 = 2.03 bytes per element. Smaller parameters, and those of
    groups with ``quantize_state=False``, keep fp32 ``exp_avg`` / ``exp_avg_sq`` like ``torch.optim.AdamW``.

    Args:
        params: tensors or param-group dicts; fp32, bf16 or fp16 (bf16/fp16 are written back with
            stochastic rounding, so updates below half an ulp survive on average).
        lr: learning rate (>= 0); a float changed by any LR scheduler applies on the next step
            without recompiling anything.
        betas: ``(beta1, beta2)``, each in [0, 1).
        eps: added to the denominator (> 0).
        weight_decay: decoupled weight decay coefficient (>= 0).
        maximize: ascend instead of descend.
        quantize_state: ``False`` keeps 32-bit state for every param (of a param group: give the embeddings a
            group with ``quantize_state=False``, as bitsandbytes' ``optim_bits=32`` override), the fp32 state
            params under 4096 elements keep; a storage choice: a load keeps this optimizer's value and converts.
        foreach, fused, capturable, differentiable: torch.optim's switches, accepted as None/False
            (no-ops: the update is always one fused kernel with device step counters); True raises.
        seed: base seed of the stochastic rounding; step ``t`` of tensor ``i`` rounds with
            ``rounding.step_seed(t, i, seed)``, so runs (and resumed runs) are reproducible.
        bf16_rounding: how bf16/fp16 params are written: ``"stochastic"`` (default) or ``"nearest"``
            (round-to-nearest-even, bitsandbytes' behaviour: updates below half an ulp are lost). A
            param-group setting, saved in the state dict's param groups.

    A gradient holding inf/NaN skips that tensor's update for the step (params, state and its step
    counter untouched) and is counted in :attr:`skipped_updates`. After :meth:`clip_grad_norm_` (or
    :meth:`use_grad_norm`) the step reuses that total norm instead of reading every gradient for the check:
    a non-finite norm skips the whole step. ``step()`` never synchronises with the device. On CUDA
    ``kernels.multitensor.persistent(k)`` (or ``LOWMEM_PERSISTENT_PROGRAMS_PER_SM=k``) runs the persistent
    kernel (``k`` programs per SM looping over the tiles), the same bits as the default one-program-per-tile one.
    ``load_state_dict`` also accepts a ``torch.optim.AdamW`` state dict and quantizes it.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
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
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"Invalid seed={seed!r}: expected an int.")
        self._seed = int(seed)
        betas = tuple(betas) if isinstance(betas, (list, tuple)) else betas
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize,
                        bf16_rounding=bf16_rounding, quantize_state=quantize_state)
        super().__init__(params, defaults)

    _foreign_group_keys = frozenset({"amsgrad", "decoupled_weight_decay"})  # torch.optim.AdamW / Adam state dicts

    _moment_form = FORM_8BIT
    """The :func:`.adamw_convert.code_form` of this class's quantized state (the other form is converted on load)."""

    def _check_group(self, group: dict) -> None:
        """Validate a param group like the constructor's arguments (``ValueError`` naming the argument)."""
        if group.get("amsgrad"):
            raise ValueError(f"Invalid amsgrad={group['amsgrad']!r}: {type(self).__name__} does not support AMSGrad.")
        _check_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"], group["maximize"])

    # ------------------------------------------------------------------ state layout
    def _is_quantized(self, param: torch.Tensor, group: dict | None) -> bool:
        """:func:`.layout.quantizes_state` of ``param`` in ``group`` (None: its own group)."""
        return quantizes_state(param, self._layout_group(param, group))

    def state_layout(self, param: torch.Tensor, group: dict | None = None) -> list[StateSpec]:
        """``step``; 8-bit ``exp_avg`` (signed) and ``exp_avg_sq`` (unsigned) codes + fp32 absmax per 256
        elements for params of >= 4096 elements in a group that quantizes (:func:`.layout.quantizes_state`;
        padded to the shard layout for DTensors), fp32 ``exp_avg``/``exp_avg_sq`` of the param's (local) shape
        otherwise."""
        if self._is_quantized(param, group):
            n, host = block_state_len(param), self.is_paged
            return [step_spec(), *codes_specs("exp_avg", n, True, host), *codes_specs("exp_avg_sq", n, False, host)]
        shape = tuple(local(param).shape)
        return [step_spec(), StateSpec("exp_avg", shape, torch.float32, "moment"),
                StateSpec("exp_avg_sq", shape, torch.float32, "square")]


    def _convert_foreign_state(self, param: torch.Tensor, state: dict, group: dict) -> dict:
        """Accept ``torch.optim.AdamW`` state (full ``exp_avg``/``exp_avg_sq``): quantize or cast to fp32; and
        codes of another form (``adamw_4bit``'s), or codes where the group keeps fp32 state (saved with the other
        ``quantize_state``): decoded to fp32 (:mod:`.adamw_convert`), then quantized into this class's codes or
        kept as fp32 moments."""
        if "max_exp_avg_sq" in state:
            raise ValueError(
                "Invalid optimizer state dict: it holds 'max_exp_avg_sq' (AMSGrad), which AdamW8bit does not support."
            )
        state = decoded_row_form(param, dict(state), self._incoming_form)  # a sharded state of another form
        if "step" in state:
            state["step"] = loaded_step(state["step"])
        quantized, form = self._is_quantized(param, group), code_form(state)
        if form is not None and (form != self._moment_form or not quantized):
            state = with_decoded_moments(param, state, form)  # other codes -> fp32 -> this class's codes below
        if "exp_avg" not in state:
            return state
        full = {key: _full_moment(local(param), state, key) for key in ("exp_avg", "exp_avg_sq")}
        if not quantized:
            state.update(full)
            return state
        if (full["exp_avg_sq"] < 0).any():
            raise ValueError("Invalid optimizer state dict: 'exp_avg_sq' holds negative values.")
        length = block_state_len(param)  # a DTensor's local shard pads to the same length on every rank
        codes_m, absmax_m = pad_block_state(*quantize_blockwise(full["exp_avg"], signed=True), length)
        codes_v, absmax_v = pad_block_state(*quantize_blockwise(full["exp_avg_sq"], signed=False), length)
        del state["exp_avg"], state["exp_avg_sq"]
        state.update(exp_avg_codes=codes_m, exp_avg_absmax=absmax_m, exp_avg_sq_codes=codes_v,
                     exp_avg_sq_absmax=absmax_v)
        return state

    def _fp32_state(self, param: torch.Tensor, state: dict, group: dict) -> dict:
        """``state`` with its codes (8-bit or 4-bit) decoded into ``torch.optim.AdamW``'s fp32 ``exp_avg`` /
        ``exp_avg_sq`` of the param's local shape (:func:`.adamw_convert.with_decoded_moments`)."""
        form = code_form(state)
        return with_decoded_moments(param, state, form) if form else state

    def load_state_dict(self, state_dict: dict) -> None:
        """Load our own or a ``torch.optim.AdamW`` state dict (quantizing its moments), strictly as
        :meth:`LowMemOptimizer.load_state_dict` describes; AMSGrad state is refused. After
        :func:`.adamw_convert.prepare_sharded_load` the DTensor params' state is read in the form it names."""
        self._loading = True
        try:
            super().load_state_dict(state_dict)
        finally:
            self._loading = False
            self._incoming_form = None

    _incoming_form: str | None = None  # the form of the sharded state the next load reads (prepare_sharded_load)
    _loading = False

    def _axes_of(self, param: torch.Tensor, group: dict | None = None) -> dict[str, StateSpec]:
        """The layout that presents ``param``'s state; from :func:`.adamw_convert.prepare_sharded_load` to the end
        of the next load, that of the sharded state's AdamW form (its template presented, its codes read with
        their own scales)."""
        if self._incoming_form is not None and is_dtensor(param):
            return (read_layout if self._loading else form_layout)(param, self._incoming_form)
        return super()._axes_of(param, group)

    # ------------------------------------------------------------------ step
    def _update_tensors(self, group: dict, items: list, states: list[dict], flags: list) -> None:
        """The fused update of one device's params (empty DTensor shards left out)."""
        rows, kept = [], []
        for (index, param), state, flag in zip(items, states, flags):
            shard = local(param)  # the tensor updated: a DTensor's local shard
            if shard.numel() == 0:
                continue
            if "exp_avg_codes" in state:
                moments = (state["exp_avg_codes"], state["exp_avg_absmax"], state["exp_avg_sq_codes"],
                           state["exp_avg_sq_absmax"])
            else:
                moments = (state["exp_avg"], None, state["exp_avg_sq"], None)
            seed = step_seed(0, shard_tensor_index(index, param), self._seed)
            rows.append((shard, local(param.grad), *moments, state["step"], seed, param))  # param: the key of state
            kept.append(flag)
        if rows:
            work = dict(zip(_WORK_KEYS, map(list, zip(*rows))))
            work["stochastic"] = [is_stochastic(group["bf16_rounding"])] * len(rows)
            self._update(work, kept, self._hyper(group))

    @staticmethod
    def _hyper(group: dict) -> AdamWScalars:
        beta1, beta2 = group["betas"]
        return AdamWScalars.of(group["lr"], beta1, beta2, group["eps"], group["weight_decay"], group["maximize"])

    def _update(self, work: dict, flags: list, hyper: AdamWScalars) -> None:
        """Run the fused update (paged optimizers override to stage state around it).

        Block-wise state longer than the param (a DTensor shard's padded state) is cut to the param's blocks;
        ``work["stochastic"]`` (one group: all equal) picks the rounding mode's family.
        """
        numels = [p.numel() for p in work["params"]]
        m, m_absmax, v, v_absmax = (
            [block_state_head(t, n, scales) for t, n in zip(work[key], numels)]
            for key, scales in (("m", False), ("m_absmax", True), ("v", False), ("v_absmax", True))
        )
        tensors = AdamWTensors(work["params"], work["grads"], m, m_absmax, v, v_absmax, work["steps"], flags,
                               work["seeds"])
        dispatch(ADAMW_8BIT if work["stochastic"][0] else ADAMW_8BIT_NEAREST, tensors, hyper)


_WORK_KEYS = ("params", "grads", "m", "m_absmax", "v", "v_absmax", "steps", "seeds", "owners")
"""The per-tensor lists of the ``work`` dict :meth:`AdamW8bit._update` gets (with ``stochastic``), in row order."""


def _check_hyperparameters(lr, betas, eps, weight_decay, maximize) -> None:
    check_lr(lr)
    check_betas(betas)
    check_eps(eps)
    check_non_negative(weight_decay, "weight_decay")
    if not isinstance(maximize, bool):
        raise ValueError(f"Invalid maximize={maximize!r}: expected True or False.")


def _full_moment(param: torch.Tensor, state: dict, key: str) -> torch.Tensor:
    value = state.get(key)
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(param.shape):
        got = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(
            f"Invalid optimizer state dict: state {key!r} for a param of shape {tuple(param.shape)} is {got}; "
            f"expected a tensor of shape {tuple(param.shape)}."
        )
    if not value.is_floating_point():
        raise ValueError(f"Invalid optimizer state dict: state {key!r} is {value.dtype}, expected a floating tensor.")
    if not torch.isfinite(value).all():
        raise ValueError(f"Invalid optimizer state dict: state {key!r} holds inf or NaN.")
    return value.detach().to(device=param.device, dtype=torch.float32).contiguous()
