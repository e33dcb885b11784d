"""The plan of a factored optimizer's step over a group of tensors (:mod:`.factored`, :mod:`.adafactor`,
:mod:`.came`).

Host side of the Triton passes: which tensors share the launches of one group (:func:`group_key`), and
the group's plan (:func:`plan_group`): an int64 launch table with one column per tensor (rows ``F_*``:
pointers, sizes, offsets into one fp32 scratch, fp32 constants as bit patterns), a tile -> tensor map
per pass (:func:`.multitensor.tile_map`) and the scratch. The Triton side of the same table: the
accessors every pass's kernels read it with (:func:`tfield`, :func:`owner_of`, ...). The tile geometry
of every pass (statistics tiles, finalize, 1-D and update blocks) lives here because the plan counts
programs from it. Last, the layout of the host step (the CPU path): kernel-layout views of a tensor and
the step's control flow, written once for both optimizers.

File order: geometry and table rows, Triton accessors, group key and plan, host-step layout.
"""

from __future__ import annotations

import functools
import math
import struct
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .codec import BLOCK_SIZE
from .dispatch import triton_dtype
from .multitensor import copy_back, is_aligned, launch_table, tile_map

__all__ = ["TILES", "UPDATE_ROWS", "UPDATE_WARPS", "STATS_WARPS", "TABLE_ROWS", "tile_shape", "factored_shape",
           "state_views", "run_host_step", "write_back", "GroupPlan", "plan_group", "group_key", "split_reciprocal",
           "tfield", "tfloat", "owner_of", "sizes_of", "index_floats", "shard_key"]


TILE_ELEMENTS = 8192
"""Elements of one (BLOCK_R x BLOCK_C) tile of the row/column statistics kernels (64 x 128 for wide
matrices: 4 / 64 = 0.06 B/param of column partials, and 64 times fewer partial rows than elements)."""

TILES = ((64, 128), (128, 64), (256, 32), (512, 16))
"""(BLOCK_R, BLOCK_C) variants of the statistics kernels: BLOCK_C follows the column count so narrow
matrices (1000 x 3) do not run mostly-masked tiles."""

STATS_WARPS = 8
"""Warps per program of the row-tile statistics kernels (32 elements per thread of a 64 x 128 tile)."""

FINALIZE_BLOCK = 256
"""Columns (and rows) per program of the finalize kernel (:data:`FINALIZE_WARPS` warps: 4 consecutive
columns per thread, so its per-column loads and stores are vectors)."""

FINALIZE_ROWS = 8
"""Column partials the finalize kernel adds at once (a ``FINALIZE_ROWS x FINALIZE_BLOCK`` tile per
iteration, summed over its rows at the end: a two-level sum, not ``n_rt`` dependent adds per column)."""

FINALIZE_WARPS = 2
"""Warps per program of the finalize kernel."""

UPDATE_ROWS = 8
"""Codec blocks (of 256 elements) per program of the update kernels: 2048 elements, 8 times fewer
programs than one block each; the 8-bit momentum's per-block absmax is a row reduction of the tile."""

UPDATE_WARPS = 4
"""Warps per program of the update kernels (16 elements per thread, moved as vectors when aligned)."""

FLAT_BLOCK = 1024
"""Elements per program of the 1-D statistics kernel."""

# Rows of the int64 launch table (one column per tensor of a group), see :func:`plan_group`. Float
# entries (``1 / C``, ``1 / R`` as hi + lo, ``sqrt(numel)``) are stored as their fp32 bit patterns.
F_P, F_G, F_V, F_VC, F_M, F_ABSMAX, F_STEP, F_FLAG, F_SR, F_SC = (tl.constexpr(i) for i in range(10))
F_N, F_R, F_C, F_NRT, F_RT, F_CP, F_ROFF, F_COFF, F_FIN, F_UPD = (tl.constexpr(i) for i in range(10, 20))
F_TIDX, F_ELR, F_INVC_HI, F_INVC_LO, F_INVR_HI, F_INVR_LO, F_SQRTN, F_NPART = (tl.constexpr(i) for i in range(20, 28))
F_RG = tl.constexpr(28)  # the global row count (the divisor of mean_R; R itself for an unsharded tensor)
TABLE_ROWS = 29


# --------------------------------------------------------------------------------------------------
# Triton accessors of the launch table (used by every pass's kernels)
# --------------------------------------------------------------------------------------------------


@triton.jit
def tfield(table_ptr, T, t, F: tl.constexpr):
    """Entry ``F`` (a row of the launch table, int64) of tensor ``t``."""
    return tl.load(table_ptr + F * T + t)


@triton.jit
def tfield16(table_ptr, T, t, F: tl.constexpr):
    """Entry ``F`` of tensor ``t``, a known multiple of 16 (a region offset that starts on 16 elements, an
    aligned element count). The hint sits on the load itself: ``tl.multiple_of`` on a helper's return value
    annotates the call, and triton 3.6 (the device image's) drops it when it inlines the helper (3.9 keeps it),
    so the masked accesses lost their vector width there."""
    return tl.multiple_of(tl.load(table_ptr + F * T + t), 16)


@triton.jit
def tfloat(table_ptr, T, t, F: tl.constexpr):
    """Entry ``F`` of tensor ``t`` read as the fp32 whose bit pattern it holds."""
    return tl.load(table_ptr + F * T + t).to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def owner_of(owner_ptr, table_ptr, T, F_FIRST: tl.constexpr):
    """``(t, local)``: the tensor this program works on (the pass's tile -> tensor map) and its tile
    index inside that tensor (the program id minus the tensor's first tile, table row ``F_FIRST``)."""
    pid = tl.program_id(0)
    t = tl.load(owner_ptr + pid).to(tl.int64)
    return t, pid - tfield(table_ptr, T, t, F_FIRST).to(tl.int32)


@triton.jit
def sizes_of(table_ptr, T, t, ALIGNED: tl.constexpr):
    """``(R, C, n_rt)`` of tensor ``t`` (int32; ``C`` a known multiple of 16 when ``ALIGNED``)."""
    C = tfield(table_ptr, T, t, F_C).to(tl.int32)
    if ALIGNED:
        C = tl.multiple_of(C, 16)
    return tfield(table_ptr, T, t, F_R).to(tl.int32), C, tfield(table_ptr, T, t, F_NRT).to(tl.int32)


@triton.jit
def index_floats(table_ptr, T, t):
    """``(1/C hi, 1/C lo, 1/R hi, 1/R lo)`` of tensor ``t``: what :func:`row_of` divides by."""
    return (tfloat(table_ptr, T, t, F_INVC_HI), tfloat(table_ptr, T, t, F_INVC_LO),
            tfloat(table_ptr, T, t, F_INVR_HI), tfloat(table_ptr, T, t, F_INVR_LO))


# --------------------------------------------------------------------------------------------------
# Geometry, group key and launch plan of a group (host side of the Triton passes)
# --------------------------------------------------------------------------------------------------


def tile_shape(cols: int) -> tuple[int, int]:
    """``(BLOCK_R, BLOCK_C)`` for a matrix of ``cols`` columns (one of :data:`TILES`)."""
    block_c = min(128, max(16, triton.next_power_of_2(cols)))
    return TILE_ELEMENTS // block_c, block_c


def factored_shape(shape: torch.Size | tuple) -> tuple[int, int, int]:
    """``(B, R, C)`` view of a tensor of >= 2 dims: leading dims flattened into a batch ``B``."""
    return (math.prod(shape[:-2]), shape[-2], shape[-1])


@functools.lru_cache(maxsize=4096)
def split_reciprocal(d: int) -> tuple[float, float]:
    """``1 / d`` as two fp32 values ``(hi, lo)``, ``hi + lo`` within ``2**-48`` of it (for :func:`row_of`)."""
    hi = float(torch.tensor(1.0 / d, dtype=torch.float32))
    return hi, float(torch.tensor(1.0 / d - hi, dtype=torch.float32))


def _fp32_bits(x: float) -> int:
    """The bit pattern (as a signed int32) of ``x`` rounded to fp32: how the launch table holds floats."""
    return struct.unpack("<i", struct.pack("<f", x))[0]


def _kernel_grad(grad: torch.Tensor) -> torch.Tensor:
    return grad if grad.dtype in (torch.float32, torch.bfloat16, torch.float16) else grad.float()


def group_key(param: torch.Tensor, grad: torch.Tensor, vc: torch.Tensor | None, m: torch.Tensor | None,
              absmax: torch.Tensor | None) -> tuple:
    """What must be equal for tensors to share the launches of one group (:func:`plan_group`): param and
    kernel grad dtypes, factored or flat, the statistics tile shape (from the column count), whether every
    codec block lies in one row (``C % 256 == 0``, the update's ``ROW_BLOCKS``), the momentum form (none,
    fp32, int8) and, last, alignment (16-byte pointers, sizes and column counts multiples of 16)."""
    factored = vc is not None
    cols = param.shape[-1] if factored else 1
    aligned = is_aligned(param, grad, m) and (not factored or cols % 16 == 0)
    momentum = 0 if m is None else (2 if absmax is not None else 1)
    return (param.dtype, _kernel_grad(grad).dtype, factored, tile_shape(cols) if factored else None,
            factored and cols % BLOCK_SIZE == 0, momentum, aligned)


class GroupPlan(NamedTuple):
    """The launch table, tile maps and scratch of one group of tensors (:func:`plan_group`).

    ``table``: int64 ``(TABLE_ROWS, T)`` on the device (rows ``F_*``). ``rows``/``fin``/``upd``:
    ``(tile map, programs)`` of the row-tile (or 1-D tile) passes, the finalize pass and the update
    pass. ``ws``: fp32 scratch views ``colpart``, ``rsum``, ``psq``, ``usq``, ``rf``, ``cf``, ``scal``
    (4 per tensor), ``srf``, ``scf``. ``works``/``params``: the contiguous params the kernels update and
    the params they belong to (:meth:`copy_back`). ``grads``: the contiguous fp32/bf16/fp16 gradients the table
    points to, held for as long as the plan (a non-contiguous gradient, e.g. a ``channels_last`` conv's, is read
    from a copy that must outlive the launches). ``reduce``: None, or for a group of sharded tensors
    (:func:`shard_key`) the ``over_all`` of their ``SumReduce``, which :meth:`complete` applies to the
    partial sums between passes."""

    table: torch.Tensor
    T: int
    rows: tuple
    fin: tuple
    upd: tuple
    ws: dict
    factored: bool
    tile: tuple
    row_blocks: bool
    aligned: bool
    param_dtype: object
    grad_dtype: object
    works: list
    params: list
    grads: list
    reduce: object = None

    def complete(self, *names: str) -> None:
        """Sum the scratch regions ``names`` (adjacent in ``ws``, in its order) across the ranks of a sharded
        group: one ``all_reduce`` over the span they cover; nothing for an unsharded group. Every rank's
        regions have the same layout (:func:`plan_group` pads the partials to the longest shard)."""
        if self.reduce is None:
            return
        first, last = self.ws[names[0]], self.ws[names[-1]]
        start = first.storage_offset()
        span = last.storage_offset() + last.numel() - start
        self.reduce(first.as_strided((span,), (1,)))

    def copy_back(self) -> None:
        """Write params that were updated through contiguous copies back."""
        for param, work in zip(self.params, self.works):
            copy_back(param, work)


def _sizes(work: torch.Tensor, factored: bool, reduce=None) -> dict:
    """Per-tensor counts of a group: batch, rows, columns, row tiles, partials, programs, scratch sizes.

    A sharded tensor (``reduce`` set) has as many row tiles (1-D: blocks) as the longest shard any rank holds
    (``reduce.longest`` rows or elements; the extra programs see only masked rows and store zero partials), so
    the partials line up across ranks and one ``all_reduce`` completes them; ``RG`` and ``sqrt_n`` are then
    the global row count and the square root of the global element count."""
    n = work.numel()
    upd = triton.cdiv(n, UPDATE_ROWS * BLOCK_SIZE)
    sqrt_n = math.sqrt(n if reduce is None else reduce.numel)
    if reduce is not None and (work.shape[-2] if factored else n) > reduce.longest:
        raise ValueError(f"Invalid shard: a local shard of shape {tuple(work.shape)} holds more than "
                         f"reduce.longest={reduce.longest} {'rows' if factored else 'elements'}, the most any rank "
                         "may hold (torch.chunk's split); its partial sums would not line up across ranks.")
    if not factored:
        parts = triton.cdiv(n if reduce is None else reduce.longest, FLAT_BLOCK)
        return dict(n=n, B=1, R=1, C=1, RG=1, n_rt=parts, parts=parts, cp=0, fin=0, rf=0, cf=0, upd=upd,
                    sqrt_n=sqrt_n)
    B, R, C = factored_shape(work.shape)
    block_r, _ = tile_shape(C)
    n_rt = triton.cdiv(R if reduce is None else reduce.longest, block_r)
    return dict(n=n, B=B, R=R, C=C, RG=R if reduce is None else reduce.rows, n_rt=n_rt, parts=B * n_rt,
                cp=B * n_rt * C, fin=B * triton.cdiv(max(R, C), FINALIZE_BLOCK), rf=B * R, cf=B * C, upd=upd,
                sqrt_n=sqrt_n)


def _offsets(counts: list[int]) -> tuple[list[int], int]:
    """Running offsets of regions of ``counts`` elements, each rounded up to 16 (aligned starts); total."""
    out, total = [], 0
    for count in counts:
        out.append(total)
        total += -(-count // 16) * 16
    return out, total


def _workspace(sizes: list[dict], T: int, device) -> tuple[dict, dict]:
    """One fp32 scratch allocation for a group, cut into its regions; and each tensor's region offsets."""
    cp_off, cp_total = _offsets([s["cp"] for s in sizes])
    rf_off, rf_total = _offsets([s["rf"] for s in sizes])
    cf_off, cf_total = _offsets([s["cf"] for s in sizes])
    _, parts = _offsets([sum(s["parts"] for s in sizes)])
    lengths = {"colpart": cp_total, "rsum": parts, "psq": parts, "usq": parts, "rf": rf_total, "cf": cf_total,
               "scal": -(-4 * T // 16) * 16, "srf": rf_total, "scf": cf_total}
    buf = torch.empty(sum(lengths.values()), dtype=torch.float32, device=device)
    ws, start = {}, 0
    for name, length in lengths.items():
        ws[name] = buf.narrow(0, start, length)
        start += length
    return ws, {"cp": cp_off, "rf": rf_off, "cf": cf_off}


def plan_group(params, grads, vs, vcs, ms, absmaxes, steps, flags, tensor_indices, write_elr=None, srs=None,
               scs=None, reduces=None) -> GroupPlan:
    """The launch table of one group of tensors (one :func:`group_key`): contiguous params and grads (copies
    where needed, kept in the plan),
    pointers, sizes, per-pass tile maps (:func:`.multitensor.tile_map`) and one scratch allocation.
    ``write_elr[i]``: tensor ``i`` writes the step size (Adafactor); ``srs``/``scs``: CAME's instability
    statistics; ``reduces``: the ``SumReduce`` of each tensor, all set (one :func:`shard_key`: a sharded
    group, its partials padded and completed across ranks, :meth:`GroupPlan.complete`) or all None.
    No device synchronisation: the table is copied without one (:func:`.multitensor.launch_table`)."""
    device = params[0].device
    factored = vcs[0] is not None
    works = [p.contiguous() for p in params]
    grads = [_kernel_grad(g).contiguous() for g in grads]
    reduces = reduces or [None] * len(works)
    sizes = [_sizes(w, factored, r) for w, r in zip(works, reduces)]
    T = len(works)
    rows_owner, rt_first, n_rows = tile_map(tuple(s["parts"] for s in sizes), device, 1)
    fin_owner, fin_first, n_fin = tile_map(tuple(s["fin"] for s in sizes), device, 1)
    upd_owner, upd_first, n_upd = tile_map(tuple(s["upd"] for s in sizes), device, 1)
    ws, offs = _workspace(sizes, T, device)
    dummy = [f.data_ptr() for f in flags]

    def ptrs(tensors):
        return [dummy[i] if x is None else x.data_ptr() for i, x in enumerate(tensors)]

    inv = [(*split_reciprocal(s["C"]), *split_reciprocal(max(s["R"], 1))) for s in sizes]  # R = 0: an empty shard
    table = [
        [w.data_ptr() for w in works], [g.data_ptr() for g in grads], ptrs(vs), ptrs(vcs), ptrs(ms), ptrs(absmaxes),
        ptrs(steps), ptrs(flags), ptrs(srs or [None] * T), ptrs(scs or [None] * T),
        [s["n"] for s in sizes], [s["R"] for s in sizes], [s["C"] for s in sizes], [s["n_rt"] for s in sizes],
        list(rt_first), offs["cp"], offs["rf"], offs["cf"], list(fin_first), list(upd_first),
        [int(i) for i in tensor_indices], [int(bool(x)) for x in (write_elr or [False] * T)],
        *([_fp32_bits(x[k]) for x in inv] for k in range(4)),
        [_fp32_bits(s["sqrt_n"]) for s in sizes], [s["parts"] for s in sizes], [s["RG"] for s in sizes],
    ]
    assert len(table) == TABLE_ROWS
    aligned = all(group_key(p, g, vc, m, a)[-1] for p, g, vc, m, a in zip(params, grads, vcs, ms, absmaxes))
    return GroupPlan(launch_table(table, device), T, (rows_owner, n_rows), (fin_owner, n_fin), (upd_owner, n_upd),
                     ws, factored, tile_shape(sizes[0]["C"]) if factored else (1, FLAT_BLOCK),
                     factored and sizes[0]["C"] % BLOCK_SIZE == 0, aligned,
                     triton_dtype(works[0].dtype), triton_dtype(grads[0].dtype), works, list(params), grads,
                     None if reduces[0] is None else reduces[0].over_all)


def shard_key(reduce, key: tuple) -> tuple | None:
    """The launch key of a sharded tensor (``reduce``, its ``SumReduce``; ``key`` its :func:`group_key`) whose
    sums the Triton passes can complete across ranks, or None (columns or a batch dim split: the eager
    reference). The key leaves out alignment, which differs between shards, so that every rank forms the same
    groups (their collectives pair up); :func:`plan_group` still picks the aligned variant per rank."""
    if reduce.longest < 0:
        return None
    return ("sharded", reduce.group, *key[:-1])


# --------------------------------------------------------------------------------------------------
# Layout and control flow of the host step (the CPU path)
# --------------------------------------------------------------------------------------------------


def write_back(dsts, srcs) -> None:
    """``dst.copy_(src)`` for each pair whose ``dst`` is not None (a step function's outputs into the state)."""
    for dst, src in zip(dsts, srcs, strict=True):
        if dst is not None:
            dst.copy_(src)


def state_views(param: torch.Tensor, grad: torch.Tensor, v: torch.Tensor, vc: torch.Tensor | None,
                m: torch.Tensor | None) -> tuple:
    """Contiguous ``(work_param, grad, v, vc, m)`` views in the kernel layout (``(B, R, C)`` or flat); a
    non-contiguous param is worked on as a copy (:func:`.multitensor.copy_back` writes it back)."""
    work = param.contiguous()
    if vc is not None:
        shape3 = factored_shape(param.shape)
        return (work.view(shape3), grad.reshape(shape3).contiguous(), v.view(shape3[:2]), vc.view(shape3[0], -1),
                None if m is None else m.view(shape3))
    return (work.view(-1), grad.reshape(-1).contiguous(), v.view(-1), None, None if m is None else m.view(-1))


def run_host_step(whole: dict, direction: dict, rest, *, backend: str, factored: bool, quantized: bool,
                  flag: torch.Tensor, reduce, whole_args: tuple, direction_args: tuple) -> None:
    """The control flow of a factored optimizer's host step (Adafactor, CAME), written once.

    ``whole[factored]`` (:class:`.dispatch.HostStep` per layout): the step in one graph, eager with
    ``reduce`` appended for a sharded tensor, else on ``backend``. 8-bit momentum splits it (inductor
    fused the block codec with the row/column reductions several times slower): ``direction[factored]``,
    then, if the flag (a CPU tensor: no device sync) is set, ``rest(backend, out)`` on its output.
    """
    if reduce is not None:
        whole[factored].eager(*whole_args, reduce)
    elif quantized:
        out = direction[factored].on(backend)(*direction_args)
        if flag.item():
            rest(backend, out)
    else:
        whole[factored].on(backend)(*whole_args)
