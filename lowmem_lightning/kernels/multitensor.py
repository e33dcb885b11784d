"""One launch over many tensors: the launch table and the tile -> tensor map (:func:`launch_over`).

A multi-tensor kernel (AdamW, SGD, ...) gets an int64 table (one row per field, one column per
tensor: data pointers, sizes, first tile, seed offsets) and an int32 map from program id to the
tensor it updates; each program handles one tile of ``tile_elements`` elements of its tensor. Which
tensors share a launch is the family's ``launch_key`` (:func:`.dispatch.dispatch` groups them). The
table is copied to the device without a sync (pinned, non-blocking on CUDA).

Tensors whose data pointers are 16-byte aligned and whose sizes are multiples of 16 (:func:`is_aligned`,
almost every LLM tensor) go to the kernel's ``ALIGNED=True`` variant, which tells the compiler so
(``tl.multiple_of`` on the table-loaded pointers and the element count): its loads and stores are
vector instructions (``ld.global.v4``), where the general variant issues one scalar access per element.

Persistent launches (issue 24): a family that also has a persistent kernel (``persistent_kernel`` of
:func:`launch_over`, e.g. AdamW 8-bit) can run it on a grid of :func:`persistent_programs` programs
(``programs_per_sm`` per streaming multiprocessor) that loop over the tile table, each issuing the loads of
its next tile before it computes the current one (register double-buffering). It is off by default
(``programs_per_sm=0``: one program per tile) until a GPU run shows it faster; ``LOWMEM_PERSISTENT_PROGRAMS_PER_SM``
sets it once at import, :func:`configure_persistent` / :func:`persistent` change it. Both kernels compute
the same bits (``tests/test_persistent_kernel.py``).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .aot import signature_of
from .dispatch import triton_dtype

__all__ = ["PARAM_GRAD_DTYPE_PAIRS", "VECTOR_BYTES", "is_aligned", "launch_over", "tile_map",
           "launch_table", "kernel_inputs", "copy_back", "aot_spec", "as_fp32", "table_pointer", "tile_header",
           "tile_header_at", "PERSISTENT_TABLE_TYPES", "persistent_programs", "programs_per_sm",
           "configure_persistent", "persistent"]

PARAM_GRAD_DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float16),
    (torch.float16, torch.float32),
]
"""(param dtype, grad dtype) pairs the multi-tensor launchers are compiled for ahead of time."""

_KERNEL_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

VECTOR_BYTES = 16
"""Alignment (bytes) of data pointers and multiple of element counts the ``ALIGNED`` kernels assume."""


TABLE_TYPES = {"table_ptr": "*i64", "tile_owner_ptr": "*i32", "T": "i32"}
"""Triton types of the launch-table arguments every multi-tensor kernel starts with (the rest: fp32 scalars)."""

PERSISTENT_TABLE_TYPES = {**TABLE_TYPES, "num_tiles": "i32"}
"""The same for a persistent kernel, which also takes the number of tiles it loops over."""


def _programs_per_sm_from_env(env=os.environ) -> int:
    """``LOWMEM_PERSISTENT_PROGRAMS_PER_SM`` as an int >= 0 (default 0: persistent launches off)."""
    raw = env.get("LOWMEM_PERSISTENT_PROGRAMS_PER_SM", "0")
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"Invalid LOWMEM_PERSISTENT_PROGRAMS_PER_SM={raw!r}: expected an int >= 0 (0 = off).")
    return value


_programs_per_sm = _programs_per_sm_from_env()


def programs_per_sm() -> int:
    """Persistent programs per streaming multiprocessor in force (0: one program per tile)."""
    return _programs_per_sm


def configure_persistent(value: int) -> int:
    """Set the persistent programs per SM (an int >= 0; 0 turns persistent launches off); returns the previous
    value. ``ValueError`` names the argument otherwise."""
    global _programs_per_sm
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"Invalid programs_per_sm={value!r}: expected an int >= 0 (0 = one program per tile).")
    previous, _programs_per_sm = _programs_per_sm, value
    return previous


@contextlib.contextmanager
def persistent(value: int) -> Iterator[int]:
    """``with persistent(4): ...`` — :func:`configure_persistent` inside the block only."""
    previous = configure_persistent(value)
    try:
        yield value
    finally:
        configure_persistent(previous)


@functools.lru_cache(maxsize=16)
def _multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device``; 1 elsewhere (the interpreter runs programs one by one)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def persistent_programs(num_tiles: int, device: torch.device, per_sm: int | None = None) -> int:
    """Grid of a persistent launch over ``num_tiles`` tiles: ``per_sm`` (default :func:`programs_per_sm`) programs
    per multiprocessor of ``device`` (1 multiprocessor off CUDA), at most one per tile; 0 when ``per_sm`` is 0."""
    per_sm = _programs_per_sm if per_sm is None else per_sm
    return min(num_tiles, per_sm * _multiprocessors(torch.device(device)))


def aot_spec(kernel, param_dtype: torch.dtype, grad_dtype: torch.dtype, aligned: bool, **constexprs) -> tuple:
    """``(kernel, signature, constexprs)`` of one ahead-of-time variant of a multi-tensor ``kernel``: the
    signature derived from its parameter list (:func:`.aot.signature_of`), its dtypes and ``ALIGNED``."""
    dtypes = {"PARAM_DTYPE": triton_dtype(param_dtype), "GRAD_DTYPE": triton_dtype(grad_dtype)}
    return (kernel, signature_of(kernel, TABLE_TYPES), {**dtypes, **constexprs, "ALIGNED": aligned})


def is_aligned(*tensors: torch.Tensor | None) -> bool:
    """True when every tensor (None skipped) is contiguous, starts on a :data:`VECTOR_BYTES` boundary
    and has a multiple of 16 elements: the condition of the kernels' ``ALIGNED=True`` variant."""
    return all(
        t.is_contiguous() and t.data_ptr() % VECTOR_BYTES == 0 and t.numel() % 16 == 0
        for t in tensors if t is not None
    )


@functools.lru_cache(maxsize=64)
def tile_map(numels: tuple[int, ...], device: torch.device, tile_elements: int
             ) -> tuple[torch.Tensor, tuple[int, ...], int]:
    """``(owner, firsts, num_tiles)`` for tensors of ``numels`` elements cut into tiles of
    ``tile_elements``: ``owner`` (int32 on ``device``) maps each program to its tensor, ``firsts`` is the
    first tile of each tensor."""
    counts = [triton.cdiv(n, tile_elements) for n in numels]
    firsts, total = [], 0
    for count in counts:
        firsts.append(total)
        total += count
    owner = torch.repeat_interleave(torch.arange(len(counts), dtype=torch.int32), torch.tensor(counts))
    return owner.to(device), tuple(firsts), total


def launch_table(rows: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """The int64 ``(len(rows), T)`` launch table on ``device``; pinned and non-blocking on CUDA (no sync)."""
    table = torch.tensor([list(row) for row in rows], dtype=torch.int64)
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table.to(device)


def kernel_inputs(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> tuple[list, list]:
    """Contiguous params (copies where needed, see :func:`copy_back`) and contiguous fp32/bf16/fp16 grads."""
    grads = [g if g.dtype in _KERNEL_GRAD_DTYPES else g.float() for g in grads]
    return [p.contiguous() for p in params], [g.contiguous() for g in grads]


def copy_back(dst: torch.Tensor, work: torch.Tensor) -> None:
    """Write an updated ``work`` back into ``dst``: nothing when ``work`` is ``dst``'s own memory (``dst``
    or a view of it), else its first ``dst.numel()`` elements (a contiguous or zero-padded copy)."""
    if work.data_ptr() != dst.data_ptr():
        dst.copy_(work.reshape(-1)[:dst.numel()].view(dst.shape))


def launch_over(kernel, params, grads, state_rows, steps, flags, per_tensor, scalars: NamedTuple, tile_elements: int,
                persistent_kernel=None, **constexprs) -> None:
    """One launch of a multi-tensor ``kernel`` over ``params`` (one group), in place.

    The launch table's rows are: param and grad pointers, the kernel's ``state_rows`` (lists of
    ints, one per tensor: state pointers, 0 where absent), step and flag pointers, element counts,
    first tiles and ``per_tensor`` (an int per tensor: seed base or tensor index). The kernel is
    called as ``kernel[(tiles,)](table, owner, T, **scalars._asdict(), PARAM_DTYPE, GRAD_DTYPE,
    **constexprs)``: the scalars by name, so a NamedTuple whose fields do not name the kernel's
    arguments fails loudly. Non-contiguous params are updated through contiguous copies
    (:func:`kernel_inputs`, :func:`copy_back`). With a ``persistent_kernel`` (same arguments plus
    ``num_tiles`` after ``T``) and :func:`programs_per_sm` > 0, that kernel runs instead on
    :func:`persistent_programs` programs, each looping over tiles ``pid, pid + grid, ...``.
    """
    device = params[0].device
    work, grads = kernel_inputs(params, grads)
    numels = tuple(p.numel() for p in work)
    owner, firsts, num_tiles = tile_map(numels, device, tile_elements)
    if num_tiles == 0:
        return
    rows = [[p.data_ptr() for p in work], [g.data_ptr() for g in grads], *state_rows,
            [s.data_ptr() for s in steps], [f.data_ptr() for f in flags], numels, firsts,
            [int(x) for x in per_tensor]]
    table = launch_table(rows, device)
    dtypes = {"PARAM_DTYPE": triton_dtype(work[0].dtype), "GRAD_DTYPE": triton_dtype(grads[0].dtype)}
    programs = persistent_programs(num_tiles, device) if persistent_kernel is not None else 0
    if programs:
        persistent_kernel[(programs,)](table, owner, len(work), num_tiles, **scalars._asdict(), **dtypes,
                                       **constexprs, enable_fp_fusion=False)
    else:
        kernel[(num_tiles,)](table, owner, len(work), **scalars._asdict(), **dtypes, **constexprs,
                             enable_fp_fusion=False)
    for param, w in zip(params, work):
        copy_back(param, w)


# --------------------------------------------------------------------------------------------------
# The kernel side of the launch table (rows as laid out by launch_over)
# --------------------------------------------------------------------------------------------------


@triton.jit
def as_fp32(x):
    """A runtime scalar argument as fp32 (the interpreter passes Python floats through as float64)."""
    return tl.zeros((), dtype=tl.float32) + x


@triton.jit
def table_pointer(table_ptr, T, t, row, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The ``DTYPE`` pointer in field ``row`` of tensor ``t`` of a launch table with ``T`` columns; with
    ``ALIGNED`` the compiler is told it is 16-byte aligned (vector loads and stores)."""
    ptr = tl.load(table_ptr + row * T + t).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def tile_header(table_ptr, tile_owner_ptr, T, STATE_ROWS: tl.constexpr, PARAM_DTYPE: tl.constexpr,
                GRAD_DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """This program's tensor and tile: :func:`tile_header_at` of tile ``program_id(0)``."""
    return tile_header_at(table_ptr, tile_owner_ptr, T, tl.program_id(0), STATE_ROWS, PARAM_DTYPE, GRAD_DTYPE,
                          ALIGNED)


@triton.jit
def tile_header_at(table_ptr, tile_owner_ptr, T, tile_id, STATE_ROWS: tl.constexpr, PARAM_DTYPE: tl.constexpr,
                   GRAD_DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The tensor and tile of tile ``tile_id`` (of all tensors), read from the table :func:`launch_over` built.

    Returns ``(t, param_ptr, grad_ptr, step_ptr, n, n_write, tile, per_tensor)``: the tensor index, its
    param and grad pointers, its 0-d fp32 step, its element count ``n``, ``n_write`` (``n``, or 0 when
    its finite flag is 0: the update writes nothing), the tile's index inside the tensor and the
    tensor's ``per_tensor`` entry. ``STATE_ROWS``: how many state rows the kernel's table holds
    (read with :func:`table_pointer` at rows ``2 .. 1 + STATE_ROWS``). With ``ALIGNED``, ``n`` and
    ``n_write`` are known multiples of 16 and the param and grad pointers 16-byte aligned.
    """
    t = tl.load(tile_owner_ptr + tile_id).to(tl.int64)
    param_ptr = table_pointer(table_ptr, T, t, 0, PARAM_DTYPE, ALIGNED)
    grad_ptr = table_pointer(table_ptr, T, t, 1, GRAD_DTYPE, ALIGNED)
    step_ptr = table_pointer(table_ptr, T, t, 2 + STATE_ROWS, tl.float32, False)
    flag_ptr = table_pointer(table_ptr, T, t, 3 + STATE_ROWS, tl.float32, False)
    n = tl.load(table_ptr + (4 + STATE_ROWS) * T + t)
    first_tile = tl.load(table_ptr + (5 + STATE_ROWS) * T + t)
    per_tensor = tl.load(table_ptr + (6 + STATE_ROWS) * T + t)
    n_write = tl.where(tl.load(flag_ptr) != 0.0, n, 0)
    if ALIGNED:  # the launcher checked is_aligned: the masks are uniform over 16 elements
        n = tl.multiple_of(n, 16)
        n_write = tl.multiple_of(n_write, 16)
    return t, param_ptr, grad_ptr, step_ptr, n, n_write, tile_id - first_tile, per_tensor
