"""Sharded parameters (``torch.distributed.tensor.DTensor``: FSDP2, tensor parallelism).

An optimizer given DTensor params updates each rank's **local shard** in place, with the same
kernels as for plain tensors, and keeps its state for the local shard only:

* **Element-wise optimizers** (AdamW 8-bit and 4-bit, paged, SGD) need nothing from other ranks: the update
  of an element depends on that element alone. Block-wise 8-bit state is laid out per shard (blocks
  of 256 over the local shard, flattened), padded to the same length on every rank; state dicts
  present it so a checkpoint loads on another world size (row form, below).
* **Factored optimizers** (Adafactor, CAME) take row/column means, the RMS of the update and the
  RMS of the param over the *whole* tensor. For a sharded tensor these sums are completed with
  ``all_reduce`` over the mesh dims that shard it (:func:`sum_reduce`), so the update equals the
  unsharded one up to fp32 summation order. On the Triton kernels a matrix split by rows (FSDP2's
  ``Shard(0)``) or a 1-D tensor runs the usual passes, each pass's per-tile partial sums completed
  by one ``all_reduce`` per group of tensors (:func:`..kernels.factored_plan.shard_key`); a tensor
  split along its columns or a batch dim runs the eager PyTorch reference (a few small collectives
  per tensor per step).
* **Non-finite guard.** The per-tensor finite flags are combined with ``all_reduce(MIN)`` over the
  sharding groups (:func:`agree_on_flags`, one collective per step and mesh), so every rank skips or
  applies a tensor's update together and step counters stay identical.

State dicts (``optimizer.state_dict()``) present the state of a DTensor param as DTensors, so
``torch.distributed.checkpoint`` (what Lightning's ``ModelParallelStrategy`` uses) saves every
rank's shard and reshards it on load (:func:`wrap_state`, :func:`unwrap_state`):

=================  ==================================================================
``StateSpec.axes`` DTensor presented
=================  ==================================================================
``"blocks"``       params sharded along dim 0 only (FSDP2; :func:`row_form`): codes of the
                   param's shape and placements, their absmax as per-row scales
                   ``(shape[0], 2 + W)`` with the param's placements (:mod:`.reshard`; 4-bit
                   codes unpacked to one per element): a checkpoint loads on any world
                   size. Other shardings: codes flat, ``(shards * L,)``, ``Shard(0)`` on
                   each mesh dim that shards the param
                   (``L``: padded local length, :func:`block_state_len`); their absmax flat,
                   ``(shards * L / 256,)``, same placements
``"row"``          ``shape[:-1]``: the param's placements, ``Replicate`` where it shards dim -1
``"col"``          ``shape[:-2] + shape[-1:]``: ``Replicate`` where the param shards dim -2
``"scalar"``       a plain tensor (``step``: identical on every rank)
``"param"``        the param's shape and placements (fp32 moments of small tensors, ...)
=================  ==================================================================

The axes and the codes/absmax pairs come from the optimizer's ``state_layout()`` (no key-name
conventions are parsed). Flat block-wise state depends on where the shard boundaries fall, so it
can only be loaded by a run sharded the same way; it carries ``shard_layout`` to check that with a
clear message. Row-form state is converted to the loading run's layout: bit for bit where blocks
coincide, re-encoded (at most one code step) where they moved.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import NamedTuple

import torch

from ..kernels.codec import BLOCK_SIZE
from .layout import StateSpec
from .reshard import CODEC4, CODEC8, Codec, blocks_from_rows, row_width, rows_from_blocks

__all__ = [
    "AlignedBlocks",
    "SumReduce",
    "agree_on_block_max",
    "agree_on_flags",
    "aligned_blocks",
    "block_state_head",
    "block_state_len",
    "is_dtensor",
    "local",
    "row_form",
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


class AlignedBlocks(NamedTuple):
    """Where a param's local shard sits among the 256-element blocks of the **whole** tensor's flat index (what
    :func:`aligned_blocks` returns), for block-wise state kept in those global blocks (Muon's 8-bit momentum):
    a shard then holds exactly the blocks a single process would, a block split between ranks in part.

    ``head``: elements of the local shard's first block that precede it (0..255; local element ``i`` sits at
    position ``head + i`` of the flat state); ``length``: the padded local state length (elements, a multiple of
    256), the same on every rank; ``first_block``: the global index of the local state's first block;
    ``shared``: the global indices of the blocks split between two or more ranks' shards (ascending; the same on
    every rank), whose absmax the ranks agree on with one ``all_reduce(MAX)``. Plain tensors and DTensors that
    are not :func:`row_form` (split along another dim: no contiguous global run): ``head`` 0, ``length``
    :func:`block_state_len`, no shared blocks (blocks per local shard)."""

    head: int
    length: int
    first_block: int
    shared: tuple[int, ...]


def aligned_blocks(param: torch.Tensor) -> AlignedBlocks:
    """The :class:`AlignedBlocks` of ``param``'s local shard (dim-0 chunks as DTensor's ``Shard(0)`` cuts them:
    ``torch.chunk`` per mesh dim, row-major over the mesh dims, as :func:`shard_rank` counts)."""
    if not row_form(param) or num_shards(param) == 1:
        return AlignedBlocks(0, block_state_len(param), 0, ())
    per_row = math.prod(param.shape[1:])
    chunks = _dim0_chunks(param)
    start, stop = chunks[shard_rank(param)]
    if (stop - start) * per_row != local(param).numel():
        raise TypeError(
            f"Invalid params: a DTensor parameter of shape {tuple(param.shape)} with placements {param.placements} "
            f"has a local shard of {local(param).numel()} elements, not the {(stop - start) * per_row} of rows "
            f"{start}..{stop} expected from even chunking; this sharding is not supported by the 8-bit state layout."
        )
    ends = [(a * per_row % BLOCK_SIZE + (b - a) * per_row) for a, b in chunks if b > a]
    length = max((-(-end // BLOCK_SIZE) * BLOCK_SIZE for end in ends), default=0)
    shared = sorted({a * per_row // BLOCK_SIZE for a, b in chunks if b > a and a * per_row % BLOCK_SIZE})
    offset = start * per_row
    return AlignedBlocks(offset % BLOCK_SIZE, length, offset // BLOCK_SIZE, tuple(shared))


def _dim0_chunks(param) -> list[tuple[int, int]]:
    """``(first row, end row)`` of every shard of a dim-0-sharded DTensor ``param``, in :func:`shard_rank` order."""
    chunks = [(0, param.shape[0])]
    for mesh_dim, _ in _shard_mesh_dims(param):
        parts = param.device_mesh.size(mesh_dim)
        chunks = [(min(b, a + i * size), min(b, a + (i + 1) * size))
                  for a, b in chunks for size in [-(-(b - a) // parts)] for i in range(parts)]
    return chunks


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

    For the Triton kernels (:mod:`..kernels.factored_plan`), which complete their per-tile partial sums
    with one ``over_all`` per pass: ``longest`` is the most local rows (a tensor of >= 2 dims sharded
    along dim -2 only, FSDP2's ``Shard(0)`` of a matrix) or elements (1-D) any rank holds, the same on
    every rank; -1 where columns or batch dims are split (those run the eager reference). ``group`` is
    hashable and equal for tensors whose ``over_all`` is the same collective (mesh and mesh dims).
    """

    over_rows: Callable[[torch.Tensor], torch.Tensor]
    over_cols: Callable[[torch.Tensor], torch.Tensor]
    over_all: Callable[[torch.Tensor], torch.Tensor]
    rows: int
    cols: int
    numel: int
    longest: int = -1
    group: Hashable = None


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
    group = (param.device_mesh, tuple(i for i, _ in sharded))
    if ndim < 2:
        return SumReduce(_identity, _identity, every, 1, 1, param.numel(), _longest(param, sharded, 0), group)
    over_rows = [i for i, dim in sharded if dim == ndim - 2]
    over_cols = [i for i, dim in sharded if dim == ndim - 1]
    return SumReduce(
        _all_reduce_sum(_groups(param, over_rows)) if over_rows else _identity,
        _all_reduce_sum(_groups(param, over_cols)) if over_cols else _identity,
        every,
        param.shape[-2],
        param.shape[-1],
        param.numel(),
        _longest(param, sharded, ndim - 2) if len(over_rows) == len(sharded) else -1,
        group,
    )


def _longest(param, sharded: list[tuple[int, int]], dim: int) -> int:
    """The most entries along ``dim`` (the only sharded tensor dim) a rank's shard can hold: split by ``ceil``
    per mesh dim, as ``torch.chunk`` does (:func:`block_state_len` alike)."""
    size = param.shape[dim]
    for mesh_dim, _ in sharded:
        size = -(-size // param.device_mesh.size(mesh_dim))
    return size


def agree_on_flags(flags: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Make the finite flags of DTensor params agree across the ranks that shard them (``all_reduce(MIN)``).

    One collective per distinct sharding group (normally one per step); ``flags`` (fp32, one per
    param) is updated in place and returned. Every rank must call it with the same params, as SPMD
    training does.
    """
    return _reduce_over_sharding_groups(flags, params, torch.distributed.ReduceOp.MIN)


def agree_on_block_max(values: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """The maximum over the ranks that shard ``params`` of ``values`` (fp32, each rank's largest ``|momentum|`` in
    its part of the blocks split between shards, :attr:`AlignedBlocks.shared`), in place (``all_reduce(MAX)``,
    one per distinct sharding group); every rank must call it with the same params and ``values``' length."""
    return _reduce_over_sharding_groups(values, params, torch.distributed.ReduceOp.MAX)


def _reduce_over_sharding_groups(tensor: torch.Tensor, params: Sequence[torch.Tensor], op) -> torch.Tensor:
    """``tensor`` all-reduced in place with ``op`` over every process group that shards one of ``params``."""
    groups: dict[int, object] = {}
    for param in params:
        if is_dtensor(param):
            for group in _groups(param, [i for i, _ in _shard_mesh_dims(param)]):
                groups.setdefault(id(group), group)
    for group in groups.values():
        torch.distributed.all_reduce(tensor, op=op, group=group)
    return tensor


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


def row_form(param: torch.Tensor) -> bool:
    """Whether ``param``'s block-wise state is presented in the row form of :mod:`.reshard` (a DTensor of at
    least one dim sharded along dim 0 only: FSDP2), which a checkpoint can load on any world size."""
    if not is_dtensor(param) or param.ndim == 0:
        return False
    _check_placements(param)
    return all(p.is_replicate() or p.dim % param.ndim == 0 for p in param.placements)


def _normalized(layout: Mapping[str, StateSpec | str]) -> tuple[dict[str, str], dict[str, str]]:
    """``({name: axes}, {codes name: absmax name})`` of a layout given as specs or as plain axes strings."""
    axes = {name: (spec.axes if isinstance(spec, StateSpec) else spec) for name, spec in layout.items()}
    pairs = {name: spec.absmax for name, spec in layout.items()
             if isinstance(spec, StateSpec) and spec.role == "codes" and spec.absmax}
    return axes, pairs


def _codec(layout: Mapping[str, StateSpec | str], codes_key: str) -> tuple[Codec, bool]:
    """``(codec, signed)`` of the codes ``codes_key`` (:data:`.reshard.CODEC4` for 4-bit codes)."""
    spec = layout[codes_key]
    return (CODEC4 if spec.bits == 4 else CODEC8), spec.signed


def _blocks_of(param, layout: Mapping[str, StateSpec | str], codes_key: str) -> AlignedBlocks:
    """Where the codes ``codes_key`` of ``param`` keep their blocks: :func:`aligned_blocks` when their spec is
    ``aligned``, else blocks per local shard (``head`` 0, :func:`block_state_len`)."""
    spec = layout[codes_key]
    if isinstance(spec, StateSpec) and spec.aligned:
        return aligned_blocks(param)
    return AlignedBlocks(0, block_state_len(param), 0, ())


def _as_dtensor(param, value: torch.Tensor, placements, shape) -> torch.Tensor:
    return DTensor.from_local(value, param.device_mesh, placements, run_check=False, shape=torch.Size(shape),
                              stride=_contiguous_stride(shape))


def wrap_state(param: torch.Tensor, state: dict, layout: Mapping[str, StateSpec | str]) -> dict:
    """A copy of ``state`` (local tensors of a DTensor ``param``) with every tensor presented as a DTensor.

    ``layout``: ``{state name: StateSpec}`` from the optimizer's ``state_layout`` (or ``{name: axes}``;
    a name missing from it is presented like the param). Block-wise pairs of a :func:`row_form` param
    are presented in row form (codes of the param's shape, scales per row: :mod:`.reshard`), which loads
    on any world size; other block-wise state is presented flat and gets ``shard_layout`` =
    ``(num_shards, block_state_len)``. Plain params: ``state`` unchanged.
    """
    if not is_dtensor(param):
        return state
    axes, pairs = _normalized(layout)
    rows = row_form(param)
    out, in_rows = {}, set()
    for key, value in state.items():
        if rows and key in pairs and pairs[key] in state:
            out.update(_row_form_pair(param, key, value, pairs[key], state[pairs[key]], *_codec(layout, key),
                                      _blocks_of(param, layout, key).head))
            in_rows |= {key, pairs[key]}
        elif key not in in_rows:
            spec = _spec(param, axes.get(key, "param"), value) if isinstance(value, torch.Tensor) else None
            out[key] = value if spec is None else _as_dtensor(param, value, *spec)
    if any(axes.get(key) == "blocks" and key not in in_rows for key in state):
        out["shard_layout"] = [num_shards(param), block_state_len(param)]
    return out


def _row_form_pair(param, codes_key: str, codes: torch.Tensor, absmax_key: str, absmax: torch.Tensor,
                   codec: Codec, signed: bool, head: int = 0) -> dict:
    """``{codes_key: codes of the param's shape, absmax_key: scales per row}`` as DTensors (8-bit codes: views,
    and one small ``(rows, width)`` tensor; 4-bit codes are unpacked to one per element, a copy); ``head``: the
    local shard's first element sits at that position of the flat state (:class:`AlignedBlocks`)."""
    shard = local(param)
    shape = tuple(shard.shape)
    codes = codec.unpack(codes, head + shard.numel(), signed)[head: head + shard.numel()].view(shape)
    scales = rows_from_blocks(absmax, shape, row_width(tuple(param.shape), codec.block), codec.block, head)
    placements = list(param.placements)
    return {
        codes_key: _as_dtensor(param, codes, placements, tuple(param.shape)),
        absmax_key: _as_dtensor(param, scales, placements, (param.shape[0], scales.shape[1])),
    }


def _check_codes(codes: torch.Tensor, codec: Codec, pid, key: str) -> None:
    """``ValueError`` when codes in row form cannot be ``codec``'s (4-bit codes: int8 -8..7 or uint8 0..15)."""
    if codec is not CODEC4 or codes.numel() == 0:
        return
    low, high = (-8, 7) if codes.dtype == torch.int8 else (0, 15)
    if codes.dtype not in (torch.int8, torch.uint8) or int(codes.min()) < low or int(codes.max()) > high:
        raise ValueError(
            f"Invalid optimizer state dict: param {pid!r} state {key!r} holds {codes.dtype} codes outside the 4-bit "
            f"range {low}..{high} (8-bit codes? load an AdamW8bit state dict into adamw_8bit)."
        )


def unwrap_state(param: torch.Tensor, state: dict, pid, layout: Mapping[str, StateSpec | str]) -> dict:
    """Inverse of :func:`wrap_state`: local tensors in this run's layout.

    Block-wise pairs saved in row form are converted to this run's shard layout (:func:`.reshard.blocks_from_rows`:
    bit for bit where blocks coincide, re-encoded where they moved), whatever world size saved them;
    also into a plain param (a full checkpoint of a sharded run loaded on one process). Flat block-wise
    state is checked against the saved ``shard_layout``: ``ValueError`` when it was laid out for another sharding.
    """
    axes, pairs = _normalized(layout)
    state = {key: (value.to_local() if is_dtensor(value) else value) for key, value in state.items()}
    saved = state.pop("shard_layout", None)
    for codes_key, absmax_key in pairs.items():
        codes, scales = state.get(codes_key), state.get(absmax_key)
        if isinstance(codes, torch.Tensor) and isinstance(scales, torch.Tensor) and scales.dim() == 2:
            if tuple(codes.shape) != tuple(local(param).shape):
                raise ValueError(
                    f"Invalid optimizer state dict: param {pid!r} state {codes_key!r} is {tuple(codes.shape)} in row "
                    f"form, expected this run's shard shape {tuple(local(param).shape)}."
                )
            codec = _codec(layout, codes_key)[0]
            _check_codes(codes, codec, pid, codes_key)
            blocks = _blocks_of(param, layout, codes_key)
            aligned = getattr(layout[codes_key], "aligned", False)
            flat, state[absmax_key], _ = blocks_from_rows(codes, scales, blocks.length, codec, blocks.head, aligned)
            state[codes_key] = codec.pack(flat)
    flat = [key for key in state if axes.get(key) == "blocks" and isinstance(state[key], torch.Tensor)
            and key not in pairs.values() and not row_form(param)]
    if is_dtensor(param) and flat and saved is not None:
        expected = [num_shards(param), block_state_len(param)]
        if [int(x) for x in saved] != expected:
            raise ValueError(
                f"Invalid optimizer state dict: param {pid!r} (shape {tuple(param.shape)}) has 8-bit state laid "
                f"out for {int(saved[0])} shards of {int(saved[1])} elements, but this run shards it into "
                f"{expected[0]} shards of {expected[1]}; resume with the same sharding (world size and mesh): "
                "only params sharded along dim 0 (FSDP2) load on another sharding."
            )
    return state
