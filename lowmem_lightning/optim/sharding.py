"""Sharded parameters (``torch.distributed.tensor.DTensor``: FSDP2, tensor parallelism).

An optimizer given DTensor params updates each rank's **local shard** in place, with the same
kernels as for plain tensors, and keeps its state for the local shard only:

* **Element-wise optimizers** (AdamW 8-bit, paged, SGD) need nothing from other ranks: the update
  of an element depends on that element alone. Block-wise 8-bit state is laid out per shard (blocks
  of 256 over the local shard, flattened), padded to the same length on every rank so it can be
  saved as one evenly sharded tensor.
* **Factored optimizers** (Adafactor, CAME) take row/column means, the RMS of the update and the
  RMS of the param over the *whole* tensor. For a sharded tensor these sums are completed with
  ``all_reduce`` over the mesh dims that shard it (:func:`sum_reduce`), so the update equals the
  unsharded one up to fp32 summation order. Those tensors run the eager PyTorch reference (a few
  small collectives per tensor per step), not the Triton kernels.
* **Non-finite guard.** The per-tensor finite flags are combined with ``all_reduce(MIN)`` over the
  sharding groups (:func:`agree_on_flags`, one collective per step and mesh), so every rank skips or
  applies a tensor's update together and step counters stay identical.

State dicts (``optimizer.state_dict()``) present the state of a DTensor param as DTensors, so
``torch.distributed.checkpoint`` (what Lightning's ``ModelParallelStrategy`` uses) saves every
rank's shard and reshards it on load (:func:`wrap_state`, :func:`unwrap_state`):

=================  ==================================================================
``StateSpec.axes`` DTensor presented
=================  ==================================================================
``"blocks"``       codes: flat, ``(shards * L,)``, ``Shard(0)`` on each mesh dim that shards
                   the param (``L``: padded local length, :func:`block_state_len`); their
                   absmax: flat, ``(shards * L / 256,)``, same placements
``"row"``          ``shape[:-1]``: the param's placements, ``Replicate`` where it shards dim -1
``"col"``          ``shape[:-2] + shape[-1:]``: ``Replicate`` where the param shards dim -2
``"scalar"``       a plain tensor (``step``: identical on every rank)
``"param"``        the param's shape and placements (fp32 moments of small tensors, ...)
=================  ==================================================================

The axes come from the optimizer's ``state_layout()`` (no key-name conventions are parsed).
Block-wise state depends on where the shard boundaries fall, so it can only be loaded by a run
sharded the same way; the state dict carries ``shard_layout`` to check that with a clear message.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch

from ..kernels.codec import BLOCK_SIZE

__all__ = [
    "SumReduce",
    "agree_on_flags",
    "block_state_head",
    "block_state_len",
    "is_dtensor",
    "local",
    "pad_block_state",
    "shard_rank",
    "shard_tensor_index",
    "sum_reduce",
    "unwrap_state",
    "wrap_state",
]

try:  # torch >= 2.5 exposes the public module; keep imports lazy-safe for builds without distributed
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - torch built without distributed support
    DTensor = Replicate = Shard = None


def is_dtensor(tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a sharded or replicated distributed tensor)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (sharing its memory: in-place updates reach the DTensor), else ``tensor``."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def _check_placements(param) -> None:
    for placement in param.placements:
        if not (placement.is_shard() or placement.is_replicate()):
            raise TypeError(
                f"Invalid params: a DTensor parameter of shape {tuple(param.shape)} has placement {placement}; "
                "the optimizers accept Shard and Replicate placements (FSDP2, tensor parallel), not Partial."
            )


def _shard_mesh_dims(param) -> list[tuple[int, int]]:
    """``(mesh_dim, tensor_dim)`` for every mesh dim that shards ``param``."""
    _check_placements(param)
    return [(i, p.dim % param.ndim) for i, p in enumerate(param.placements) if p.is_shard()]


def num_shards(param) -> int:
    """Number of distinct local shards of ``param`` (product of the sizes of the mesh dims that shard it)."""
    if not is_dtensor(param):
        return 1
    return math.prod(param.device_mesh.size(i) for i, _ in _shard_mesh_dims(param))


def shard_rank(param) -> int:
    """This rank's shard index among :func:`num_shards` (0 for plain tensors), row-major over the mesh dims."""
    if not is_dtensor(param):
        return 0
    index = 0
    mesh = param.device_mesh
    for i, _ in _shard_mesh_dims(param):
        index = index * mesh.size(i) + mesh.get_local_rank(i)
    return index


def block_state_len(param: torch.Tensor) -> int:
    """Length (elements) of flat block-wise state for ``param``'s local shard.

    Plain tensors: ``param.numel()``. DTensors: the largest local shard any rank can hold (each
    sharded dim split by ``ceil``, as ``torch.chunk`` does) rounded up to whole blocks of 256, the
    same on every rank; the local shard uses its first ``local(param).numel()`` elements.
    """
    if not is_dtensor(param):
        return param.numel()
    shape = list(param.shape)
    for mesh_dim, dim in _shard_mesh_dims(param):
        shape[dim] = -(-shape[dim] // param.device_mesh.size(mesh_dim))
    longest = math.prod(shape)
    length = -(-longest // BLOCK_SIZE) * BLOCK_SIZE
    if local(param).numel() > length:
        raise TypeError(
            f"Invalid params: a DTensor parameter of shape {tuple(param.shape)} with placements {param.placements} "
            f"has a local shard of {local(param).numel()} elements, more than the {longest} expected from even "
            "chunking; this sharding is not supported by the 8-bit state layout."
        )
    return length


def block_state_head(state: torch.Tensor | None, numel: int, scales: bool) -> torch.Tensor | None:
    """The leading part of flat block-wise state (codes, or with ``scales`` the per-block absmax) that
    covers ``numel`` param elements: the kernels' view of a shard's padded state. Other state unchanged."""
    if state is None or state.dim() != 1:
        return state
    length = -(-numel // BLOCK_SIZE) if scales else numel
    return state if state.numel() == length else state[:length]


def pad_block_state(codes: torch.Tensor, absmax: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat ``codes`` and their ``absmax`` zero-padded to ``length`` elements (:func:`block_state_len`)."""
    if codes.numel() == length:
        return codes, absmax
    codes = torch.nn.functional.pad(codes.reshape(-1), (0, length - codes.numel()))
    return codes, torch.nn.functional.pad(absmax, (0, -(-length // BLOCK_SIZE) - absmax.numel()))


def shard_tensor_index(tensor_index: int, param: torch.Tensor) -> int:
    """The index that seeds ``param``'s stochastic rounding: ``tensor_index`` for a plain tensor, mixed
    with the shard index for a DTensor so shards do not reuse one random stream."""
    return tensor_index + (shard_rank(param) << 20)


# ---------------------------------------------------------------------------------------- collectives
def _groups(param, mesh_dims: Iterable[int]) -> list:
    mesh = param.device_mesh
    return [mesh.get_group(i) for i in mesh_dims]


def _all_reduce_sum(groups: Sequence) -> Callable[[torch.Tensor], torch.Tensor]:
    def reduce(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        for group in groups:
            torch.distributed.all_reduce(tensor, group=group)
        return tensor

    return reduce


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class SumReduce(NamedTuple):
    """How sums over a sharded tensor viewed as ``(B, R, C)`` (or flat) are completed across ranks.

    ``over_rows`` completes a sum taken over the R axis (column statistics, ``mean_R``),
    ``over_cols`` one over the C axis (row statistics), ``over_all`` one over every element (RMS);
    each returns the summed tensor (``all_reduce`` in place). ``rows``/``cols`` are the global R and C
    (1 for flat tensors), ``numel`` the global element count.
    """

    over_rows: Callable[[torch.Tensor], torch.Tensor]
    over_cols: Callable[[torch.Tensor], torch.Tensor]
    over_all: Callable[[torch.Tensor], torch.Tensor]
    rows: int
    cols: int
    numel: int


def sum_reduce(param: torch.Tensor) -> SumReduce | None:
    """The :class:`SumReduce` of a DTensor param sharded over at least one mesh dim; None otherwise.

    With ``ndim >= 2`` the R axis is dim -2 and C is dim -1 (the factored dims); leading dims are a
    batch whose sharding needs only ``over_all``.
    """
    if not is_dtensor(param):
        return None
    sharded = _shard_mesh_dims(param)
    if not sharded:
        return None
    ndim = param.ndim
    every = _all_reduce_sum(_groups(param, [i for i, _ in sharded]))
    if ndim < 2:
        return SumReduce(_identity, _identity, every, 1, 1, param.numel())
    over_rows = [i for i, dim in sharded if dim == ndim - 2]
    over_cols = [i for i, dim in sharded if dim == ndim - 1]
    return SumReduce(
        _all_reduce_sum(_groups(param, over_rows)) if over_rows else _identity,
        _all_reduce_sum(_groups(param, over_cols)) if over_cols else _identity,
        every,
        param.shape[-2],
        param.shape[-1],
        param.numel(),
    )


def agree_on_flags(flags: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Make the finite flags of DTensor params agree across the ranks that shard them (``all_reduce(MIN)``).

    One collective per distinct sharding group (normally one per step); ``flags`` (fp32, one per
    param) is updated in place and returned. Every rank must call it with the same params, as SPMD
    training does.
    """
    groups: dict[int, object] = {}
    for param in params:
        if is_dtensor(param):
            for group in _groups(param, [i for i, _ in _shard_mesh_dims(param)]):
                groups.setdefault(id(group), group)
    for group in groups.values():
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN, group=group)
    return flags


# ---------------------------------------------------------------------------------------- state dicts
def _spec(param, axes: str, value: torch.Tensor) -> tuple[list, tuple[int, ...]] | None:
    """``(placements, global shape)`` of the DTensor presenting a state tensor of ``param`` whose
    ``StateSpec.axes`` is ``axes``; None = kept plain (0-d)."""
    ndim = param.ndim
    if axes == "scalar" or value.dim() == 0:
        return None
    if axes == "blocks":
        placements = [Shard(0) if p.is_shard() else Replicate() for p in param.placements]
        return placements, (value.numel() * num_shards(param),)
    if axes == "param":
        return list(param.placements), tuple(param.shape)
    shape = tuple(param.shape)
    if axes == "row":
        drop, global_shape = ndim - 1, shape[:-1]
    elif axes == "col":
        drop, global_shape = ndim - 2, shape[:-2] + shape[-1:]
    else:
        raise ValueError(f"Invalid state axes {axes!r}: expected scalar, param, blocks, row or col.")
    placements = []
    for p in param.placements:
        if not p.is_shard() or p.dim % ndim == drop:
            placements.append(Replicate())
        else:
            dim = p.dim % ndim
            placements.append(Shard(dim - 1 if (axes == "col" and dim == ndim - 1) else dim))
    return placements, global_shape


def _contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(stride))


def wrap_state(param: torch.Tensor, state: dict, axes: dict[str, str]) -> dict:
    """A copy of ``state`` (local tensors of a DTensor ``param``) with every tensor presented as a DTensor.

    ``axes``: ``{state name: StateSpec.axes}`` from the optimizer's ``state_layout`` (a name missing
    from it is presented like the param). Adds ``shard_layout`` = ``(num_shards, block_state_len)``
    when block-wise state is present. Plain params: ``state`` unchanged.
    """
    if not is_dtensor(param):
        return state
    out = {}
    for key, value in state.items():
        spec = _spec(param, axes.get(key, "param"), value) if isinstance(value, torch.Tensor) else None
        if spec is None:
            out[key] = value
            continue
        placements, shape = spec
        out[key] = DTensor.from_local(
            value, param.device_mesh, placements, run_check=False, shape=torch.Size(shape),
            stride=_contiguous_stride(shape),
        )
    if any(axes.get(key) == "blocks" for key in state):
        out["shard_layout"] = [num_shards(param), block_state_len(param)]
    return out


def unwrap_state(param: torch.Tensor, state: dict, pid, axes: dict[str, str]) -> dict:
    """Inverse of :func:`wrap_state`: local tensors, after checking the saved ``shard_layout``.

    ``axes`` as for :func:`wrap_state`. Raises ``ValueError`` when the checkpoint's block-wise state
    was laid out for another sharding.
    """
    state = dict(state)
    layout = state.pop("shard_layout", None)
    if is_dtensor(param) and any(axes.get(key) == "blocks" for key in state):
        expected = [num_shards(param), block_state_len(param)]
        if layout is not None and [int(x) for x in layout] != expected:
            raise ValueError(
                f"Invalid optimizer state dict: param {pid!r} (shape {tuple(param.shape)}) has 8-bit state laid "
                f"out for {int(layout[0])} shards of {int(layout[1])} elements, but this run shards it into "
                f"{expected[0]} shards of {expected[1]}; resume with the same sharding (world size and mesh)."
            )
    return {key: (value.to_local() if is_dtensor(value) else value) for key, value in state.items()}
