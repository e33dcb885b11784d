"""State layout as data: every state tensor an optimizer keeps for a parameter is a :class:`StateSpec`.

:meth:`~lowmem_lightning.optim.base.LowMemOptimizer.state_layout` returns them; state creation, state
dict validation, :func:`~lowmem_lightning.optim.state_memory`, sharding (``axes``), paging (``host``)
and ``lowmem estimate`` all read this one description.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["StateSpec", "step_spec", "codes_specs"]


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
        absmax: for ``codes``: the name of their block scales (one per 256 codes).
        signed: for ``codes``: signed (int8) or unsigned (uint8) code.
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


def codes_specs(prefix: str, numel: int, signed: bool, host: bool = False) -> list[StateSpec]:
    """``prefix_codes`` (``numel`` 8-bit codes) and ``prefix_absmax`` (fp32, one per 256 codes)."""
    blocks = -(-numel // 256)
    return [
        StateSpec(f"{prefix}_codes", (numel,), torch.int8 if signed else torch.uint8, "codes",
                  absmax=f"{prefix}_absmax", signed=signed, host=host),
        StateSpec(f"{prefix}_absmax", (blocks,), torch.float32, "absmax", host=host),
    ]
