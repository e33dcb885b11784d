"""AdamW with 4-bit block-wise quantized moments: about 1.06 bytes of state per parameter.

The update math and the codes live in :mod:`lowmem_lightning.kernels.adamw4bit` (Triton on CUDA, the
bucketed PyTorch reference on CPU); this module keeps the state and calls :func:`.dispatch.dispatch`.
Everything else (hyperparameters, the non-finite guard, foreign ``torch.optim.AdamW`` and 8-bit state
dicts, sharded params) is :class:`~lowmem_lightning.optim.adamw8bit.AdamW8bit`'s.
"""

from __future__ import annotations

import torch

from ..kernels.adamw4bit import ADAMW_4BIT, ADAMW_4BIT_NEAREST, num_blocks4, packed_len, quantize4_reference
from ..kernels.adamw8bit import ADAMW_8BIT, ADAMW_8BIT_NEAREST, AdamWScalars, AdamWTensors
from ..kernels.dispatch import dispatch
from .adamw8bit import AdamW8bit, _full_moment
from .adamw_convert import FORM_4BIT, FORM_8BIT, code_form, decoded_row_form, with_decoded_moments
from .base import StateSpec, step_spec
from .sharding import block_state_len, local

__all__ = ["AdamW4bit", "codes4_specs"]


def codes4_specs(prefix: str, numel: int, signed: bool) -> list[StateSpec]:
    """``prefix_codes`` (``packed_len(numel)`` uint8 bytes, two 4-bit codes each) and ``prefix_absmax``
    (fp32, one per :data:`~lowmem_lightning.kernels.adamw4bit.BLOCK4` elements).

    The codes name their ``absmax`` partner with ``bits=4``: a sharded (FSDP2) param's state is then
    presented in :mod:`.reshard`'s row form with the codes unpacked to one per element, so it resumes on
    another world size."""
    return [
        StateSpec(f"{prefix}_codes", (packed_len(numel),), torch.uint8, "codes", absmax=f"{prefix}_absmax",
                  signed=signed, bits=4),
        StateSpec(f"{prefix}_absmax", (num_blocks4(numel),), torch.float32, "absmax"),
    ]


class AdamW4bit(AdamW8bit):
    """AdamW (Loshchilov & Hutter, ICLR 2019; ``torch.optim.AdamW`` semantics) with 4-bit moments
    (Li et al., "Memory Efficient Optimizers with 4-bit States", NeurIPS 2023; codes of our own).

    Per parameter with at least 4096 elements the state is ``step`` (0-d fp32), ``exp_avg_codes`` and
    ``exp_avg_sq_codes`` (uint8, two 4-bit codes per byte) and ``exp_avg_absmax`` / ``exp_avg_sq_absmax``
    (fp32, one per block of 128): ``1 + 8/128 = 1.0625`` bytes per element. m is rounded
    to the nearest level, or stochastically (unbiased) where the nearest would keep the element's code (a
    stalled EMA step), v to the nearest level of a code without zero
    (:mod:`lowmem_lightning.kernels.adamw4bit`). Smaller parameters, and those of groups with
    ``quantize_state=False``, keep fp32 ``exp_avg`` / ``exp_avg_sq`` like ``torch.optim.AdamW``.

    Arguments, the non-finite guard, ``skipped_updates``, seeds and state-dict rules are those of
    :class:`~lowmem_lightning.optim.adamw8bit.AdamW8bit` (the seed also drives the stochastic
    rounding of m, so a run and its resumed copy store the same codes). ``load_state_dict`` accepts
    our own state dicts, ``torch.optim.AdamW``'s and ``adamw_8bit`` / ``paged_adamw_8bit``'s (their
    codes decoded to fp32, then quantized into the 4-bit codes on load).
    """

    def state_layout(self, param: torch.Tensor, group: dict | None = None) -> list[StateSpec]:
        """``step``; 4-bit ``exp_avg`` / ``exp_avg_sq`` codes + fp32 absmax per 128 elements for params of
        >= 4096 elements in a group that quantizes (:func:`.layout.quantizes_state`; padded to the shard layout
        for DTensors), fp32 moments of the param's (local) shape otherwise."""
        if self._is_quantized(param, group):
            n = block_state_len(param)
            return [step_spec(), *codes4_specs("exp_avg", n, True), *codes4_specs("exp_avg_sq", n, False)]
        shape = tuple(local(param).shape)
        return [step_spec(), StateSpec("exp_avg", shape, torch.float32, "moment"),
                StateSpec("exp_avg_sq", shape, torch.float32, "square")]

    _moment_form = FORM_4BIT

    def _convert_foreign_state(self, param: torch.Tensor, state: dict, group: dict) -> dict:
        """Accept ``torch.optim.AdamW`` state (full ``exp_avg``/``exp_avg_sq``) and ``adamw_8bit`` /
        ``paged_adamw_8bit`` codes (decoded to fp32 by :mod:`.adamw_convert`): 4-bit codes or fp32."""
        state = decoded_row_form(param, state, self._incoming_form)  # a sharded state of another form
        quantized = self._is_quantized(param, group)
        if quantized and code_form(state) == FORM_8BIT:
            state = with_decoded_moments(param, state, FORM_8BIT)
        codes = state.get("exp_avg_codes")
        if isinstance(codes, torch.Tensor) and codes.dtype == torch.int8:
            raise ValueError(
                "Invalid optimizer state dict: its 'exp_avg_codes' are int8, the 8-bit codes of an AdamW8bit state "
                "dict, but their lengths or their scales' are not those of an AdamW8bit state of this param "
                f"({codes.numel()} codes for a param of {param.numel()} elements), so they cannot be converted "
                "into AdamW4bit's uint8 bytes of two 4-bit codes. Load it into the adamw_8bit it was saved from."
            )
        if "exp_avg" not in state or not quantized:
            return super()._convert_foreign_state(param, state, group)
        if "max_exp_avg_sq" in state:
            raise ValueError(
                "Invalid optimizer state dict: it holds 'max_exp_avg_sq' (AMSGrad), which AdamW4bit does not support."
            )
        full = {key: _full_moment(local(param), state, key) for key in ("exp_avg", "exp_avg_sq")}
        rest = super()._convert_foreign_state(param, {k: v for k, v in state.items() if k not in full}, group)
        return self._quantized_state(param, rest, full)

    @staticmethod
    def _quantized_state(param: torch.Tensor, state: dict, full: dict) -> dict:
        """``state`` with the fp32 moments ``full`` quantized into 4-bit codes (padded to the shard layout)."""
        if (full["exp_avg_sq"] < 0).any():
            raise ValueError("Invalid optimizer state dict: 'exp_avg_sq' holds negative values.")
        length = block_state_len(param)
        for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            codes, absmax = quantize4_reference(full[key], signed)
            state[f"{key}_codes"] = _pad(codes, packed_len(length))
            state[f"{key}_absmax"] = _pad(absmax, num_blocks4(length))
        return state

    def _update(self, work: dict, flags: list, hyper: AdamWScalars) -> None:
        """Quantized tensors through the 4-bit family, fp32-state ones through the 8-bit family's fp32 path.

        Block-wise state longer than the param (a DTensor shard's padded state) is cut to the param's blocks.
        """
        quantized = [i for i, absmax in enumerate(work["m_absmax"]) if absmax is not None]
        small = [i for i, absmax in enumerate(work["m_absmax"]) if absmax is None]
        stochastic = work["stochastic"][0] if work["stochastic"] else True
        families = (ADAMW_4BIT, ADAMW_8BIT) if stochastic else (ADAMW_4BIT_NEAREST, ADAMW_8BIT_NEAREST)
        for family, idx in zip(families, (quantized, small)):
            if idx:
                dispatch(family, self._tensors(work, flags, idx), hyper)

    @staticmethod
    def _tensors(work: dict, flags: list, idx: list[int]) -> AdamWTensors:
        def head(key: str, i: int, scales: bool):
            state, numel = work[key][i], work["params"][i].numel()
            if work["m_absmax"][i] is None:
                return state
            length = num_blocks4(numel) if scales else packed_len(numel)
            return state if state.numel() == length else state[:length]

        return AdamWTensors(
            [work["params"][i] for i in idx], [work["grads"][i] for i in idx],
            [head("m", i, False) for i in idx], [head("m_absmax", i, True) for i in idx],
            [head("v", i, False) for i in idx], [head("v_absmax", i, True) for i in idx],
            [work["steps"][i] for i in idx], [flags[i] for i in idx], [work["seeds"][i] for i in idx],
        )


def _pad(flat: torch.Tensor, length: int) -> torch.Tensor:
    """``flat`` zero-padded to ``length`` elements (a DTensor shard's padded block-wise state: shards are
    padded to whole 256-element blocks, so to whole bytes and whole 128-element blocks)."""
    return flat if flat.numel() == length else torch.nn.functional.pad(flat, (0, length - flat.numel()))

