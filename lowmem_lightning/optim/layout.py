"""State layout as data: every state tensor an optimizer keeps for a parameter is a :class:`StateSpec`.

:meth:`~lowmem_lightning.optim.base.LowMemOptimizer.state_layout` returns them; state creation, state
dict validation, :func:`~lowmem_lightning.optim.state_memory`, sharding (``axes``), paging (``host``)
and ``lowmem estimate`` all read this one description.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch

__all__ = ["StateSpec", "step_spec", "codes_specs", "MOMENTUM_DTYPES", "MomentumDtype", "quantized_momentum",
           "momentum_specs", "loaded_step", "convert_momentum", "QUANTIZE_STATE", "quantizes_state",
           "check_quantize_state"]


@dataclass(frozen=True)
class StateSpec:
    """One state tensor an optimizer keeps for one parameter (what
    :meth:`~lowmem_lightning.optim.base.LowMemOptimizer.state_layout` lists).

    Attributes:
        name: the key in ``optimizer.state[param]`` and in state dicts.
        shape: its shape (for a DTensor param: of the local shard's state).
        dtype: its dtype.
        role: ``"step"`` (0-d fp32 update counter, an integer >= 0), ``"codes"`` (8-bit block-wise
            codes), ``"absmax"`` (fp32 block scales of codes, >= 0), ``"moment"`` (a signed fp32
            statistic, e.g. a momentum) or ``"square"`` (a non-negative fp32 statistic: second moments,
            row/column means, CAME's instability).
        absmax: for ``codes``: the name of their block scales (one per 256 codes, 128 for 4-bit codes).
        signed: for ``codes``: signed (int8) or unsigned (uint8) code.
        bits: for ``codes``: 8 (one code per byte, a scale per 256) or 4 (two codes per byte, a scale per
            128: :mod:`lowmem_lightning.kernels.adamw4bit`); says how :mod:`.reshard` presents them.
        aligned: for ``codes`` of a sharded param: blocks follow the whole tensor's flat index
            (:func:`.sharding.aligned_blocks`: the local state starts ``head`` elements into its first block), not
            the local shard's (False, the default: blocks of 256 from the shard's first element).
        host: kept in host memory between updates (paged optimizers), not on the param's device.
        axes: how it relates to the param's dims, which says how a sharded param's state is
            presented (:mod:`lowmem_lightning.optim.sharding`): ``"scalar"`` (0-d), ``"param"`` (the param's shape),
            ``"blocks"`` (flat block-wise codes or their scales), ``"row"`` (the param's shape without
            its last dim: a statistic reduced over columns) or ``"col"`` (without dim -2). Default:
            from the role (step: scalar; codes, absmax: blocks; others: param).
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    role: str
    absmax: str | None = None
    signed: bool = True
    host: bool = False
    axes: str = ""
    bits: int = 8
    aligned: bool = False

    def __post_init__(self):
        if not self.axes:
            default = {"step": "scalar", "codes": "blocks", "absmax": "blocks"}.get(self.role, "param")
            object.__setattr__(self, "axes", default)

    @property
    def nbytes(self) -> int:
        """Bytes this tensor takes."""
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def step_spec() -> StateSpec:
    """The 0-d fp32 step counter every optimizer of the package keeps."""
    return StateSpec("step", (), torch.float32, "step")


def codes_specs(prefix: str, numel: int, signed: bool, host: bool = False, aligned: bool = False) -> list[StateSpec]:
    """``prefix_codes`` (``numel`` 8-bit codes) and ``prefix_absmax`` (fp32, one per 256 codes); ``aligned``: see
    :class:`StateSpec`."""
    blocks = -(-numel // 256)
    return [
        StateSpec(f"{prefix}_codes", (numel,), torch.int8 if signed else torch.uint8, "codes",
                  absmax=f"{prefix}_absmax", signed=signed, host=host, aligned=aligned),
        StateSpec(f"{prefix}_absmax", (blocks,), torch.float32, "absmax", host=host),
    ]


# --------------------------------------------------------------------------------------------------
# Which params keep quantized state: the one rule
# --------------------------------------------------------------------------------------------------

QUANTIZE_STATE = "quantize_state"
"""The param-group key (and constructor argument) that lets a group keep 32-bit state: ``True`` (default) quantizes
the state of its params of >= 4096 elements, ``False`` keeps every one of its params in the fp32 state that params
under 4096 elements have (same update math, same kernels): bitsandbytes' ``optim_bits=32`` override, which HF
``Trainer`` applies to every ``nn.Embedding`` under a bitsandbytes 8-bit optimizer."""


def quantizes_state(param: torch.Tensor, group: dict | None = None) -> bool:
    """Whether ``param`` (in param group ``group``) keeps quantized state in an optimizer that quantizes: its
    whole tensor has at least ``MIN_QUANTIZED_NUMEL`` (4096) elements and the group's :data:`QUANTIZE_STATE`
    is not False (absent: True). Every optimizer of the package decides its layout with this function."""
    from ..kernels.codec import MIN_QUANTIZED_NUMEL

    return param.numel() >= MIN_QUANTIZED_NUMEL and (group is None or group.get(QUANTIZE_STATE, True) is not False)


def check_quantize_state(value, where: str = "") -> None:
    """``ValueError`` unless ``value`` is True or False; the message names ``where`` (e.g. " in param group 1")."""
    if not isinstance(value, bool):
        raise ValueError(
            f"Invalid {QUANTIZE_STATE}={value!r}{where}: expected True (quantized state for params of >= 4096 "
            "elements, the default) or False (32-bit state for every param of the group)."
        )


# --------------------------------------------------------------------------------------------------
# Momentum storage (SGD, Adafactor, CAME) and loaded state
# --------------------------------------------------------------------------------------------------

MomentumDtype = Literal["float32", "int8"]
"""How a momentum buffer is stored: ``"float32"``, or ``"int8"`` (block-wise 8-bit codes and absmax)."""

MOMENTUM_DTYPES = get_args(MomentumDtype)
"""Allowed values of ``momentum_dtype``."""


def quantized_momentum(param: torch.Tensor, group: dict) -> bool:
    """Whether ``param``'s momentum is stored in the 8-bit code: the group's ``momentum_dtype`` is ``"int8"`` and
    :func:`quantizes_state` (>= 4096 elements, ``quantize_state`` not False)."""
    return group["momentum_dtype"] == "int8" and quantizes_state(param, group)


def momentum_specs(param: torch.Tensor, group: dict, buffer_key: str, codes_prefix: str) -> list[StateSpec]:
    """The specs of a momentum of ``param`` in ``group``: ``{codes_prefix}_codes`` (int8) +
    ``{codes_prefix}_absmax`` (fp32 per 256) when :func:`quantized_momentum`, an fp32 ``buffer_key`` of the
    param's shape otherwise. The choice follows the whole tensor's size; the shapes cover a DTensor's local shard."""
    from .sharding import block_state_len, local  # sharding imports this module

    if quantized_momentum(param, group):
        return codes_specs(codes_prefix, block_state_len(param), signed=True)
    return [StateSpec(buffer_key, tuple(local(param).shape), torch.float32, "moment")]


def loaded_step(value, default: float | None = None) -> torch.Tensor | None:
    """A loaded ``step`` as the package's 0-d fp32 counter: Python numbers (torch's and transformers' state
    dicts) and one-element tensors are converted, ``default`` stands in when absent (None: stays absent);
    anything else is returned as is, for the state validation to refuse with a clear message."""
    if value is None:
        return None if default is None else torch.tensor(float(default), dtype=torch.float32)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float32)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.detach().reshape(()).to(torch.float32)
    return value


def convert_momentum(param: torch.Tensor, state: dict, quantized: bool, buffer_key: str, codes_prefix: str) -> dict:
    """``state`` (a copy) with its loaded momentum in this optimizer's form: an fp32 ``buffer_key`` or
    ``{codes_prefix}_codes`` + ``_absmax``. Codes that are already in the wanted form are kept bit for bit;
    otherwise codes are dequantized and a buffer quantized (or cast to fp32) as ``quantized`` says. A
    buffer that does not fit the param is kept for the state validation to refuse."""
    from ..kernels.codec import dequantize_reference, quantize_reference
    from .sharding import block_state_len, local, pad_block_state

    state = dict(state)
    buffer = state.pop(buffer_key, None)
    codes, absmax = state.pop(f"{codes_prefix}_codes", None), state.pop(f"{codes_prefix}_absmax", None)
    shard = local(param)
    if isinstance(codes, torch.Tensor) and isinstance(absmax, torch.Tensor) and buffer is None:
        if quantized:
            state[f"{codes_prefix}_codes"], state[f"{codes_prefix}_absmax"] = codes, absmax
            return state
        if codes.numel() == block_state_len(param):
            buffer = dequantize_reference(codes, absmax)[: shard.numel()].view(shard.shape)
    if buffer is None:
        return state
    if not isinstance(buffer, torch.Tensor) or buffer.numel() != shard.numel():
        state[buffer_key] = buffer
    elif quantized:
        codes, absmax = quantize_reference(buffer.float(), signed=True)
        state[f"{codes_prefix}_codes"], state[f"{codes_prefix}_absmax"] = pad_block_state(codes, absmax,
                                                                                         block_state_len(param))
    else:
        state[buffer_key] = buffer.to(torch.float32).reshape(shard.shape)
    return state
