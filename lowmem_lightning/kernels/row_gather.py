"""Rows of a table held in host memory, gathered for token ids on the GPU: the lookup of a frozen embedding kept
out of device memory.

**The formula.** For ids ``i`` (any shape) and a table ``T`` of ``n_rows x row_elems``:
``out[..., :] = T[i, :]`` when ``0 <= i < n_rows``, else a row of NaN (the kernel cannot raise without a host sync;
a NaN row makes the loss NaN, which a run sees at once, where reading past the table would not be seen at all).
``out`` is on the ids' device, in the table's dtype.

**Where the table lives.** Page-locked host memory that the GPU maps into its address space (CUDA's unified virtual
addressing: a kernel reads it through the same pointer over PCIe or NVLink-C2C, no copy of the whole table, no sync).
Triton's launcher resolves such a pointer with ``cuPointerGetAttribute(..., DEVICE_POINTER)``, so the kernel takes the
table as it takes a device tensor. Only the rows the batch uses cross the bus: ``ids.numel() * row_elems`` elements a
forward pass. This is the idea of Gemma 3n's per-layer embeddings, designed to be "offloaded from accelerator memory"
(Google, *Gemma 3n*, 2025), and of the UVA offload of vLLM.

This file holds, in order: the Triton kernel, the PyTorch reference, the launcher.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .aot import signature_of, with_aligned
from .dispatch import choose

__all__ = ["gather_rows", "gather_rows_reference", "ROW_BLOCK"]

ROW_BLOCK = 1024
"""Elements of one row a program copies (2 KiB of bf16): a row of ``row_elems`` takes ``ceil(row_elems / 1024)``
programs, each one contiguous run of vector loads and stores."""


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------


@triton.jit
def _gather_rows_kernel(table_ptr, ids_ptr, out_ptr, n_rows, row_elems, BLOCK: tl.constexpr):
    """``out[t, c] = table[ids[t], c]`` for the ``BLOCK`` columns ``c`` of program ``(t, chunk)``; NaN when
    ``ids[t]`` is outside ``[0, n_rows)`` (nothing is read then)."""
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    row = tl.load(ids_ptr + token).to(tl.int64)
    valid = (row >= 0) & (row < n_rows)
    row = tl.where(valid, row, 0)
    readable = tl.where(valid, row_elems, 0)  # no column of an invalid id is read
    values = tl.load(table_ptr + row * row_elems + cols, mask=cols < readable, other=float("nan"))
    tl.store(out_ptr + token * row_elems + cols, values, mask=cols < row_elems)


_TYPES = {"ids_ptr": "*i64", "n_rows": "i64", "row_elems": "i64"}
"""Triton types of the gather kernel's arguments that are not ``*fp32`` pointers."""

AOT_SPECS = with_aligned([
    (_gather_rows_kernel, signature_of(_gather_rows_kernel, _TYPES, table_ptr=ty, out_ptr=ty), {"BLOCK": ROW_BLOCK})
    for ty in ("*bf16", "*fp16", "*fp32")
])
"""(kernel, signature, constexprs) triples compiled ahead of time for sm_80 and sm_90 by the tests."""

SASS_TILE_ELEMENTS = {"_gather_rows_kernel": lambda cx: cx["BLOCK"]}
"""Elements one program of the gather kernel copies, for :func:`.aot.tile_elements`."""


# --------------------------------------------------------------------------------------------------
# PyTorch reference (the specification, the CPU path and the test oracle)
# --------------------------------------------------------------------------------------------------


def gather_rows_reference(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``table[ids]`` with a NaN row for each id outside ``[0, len(table))``, on the table's device."""
    flat = ids.reshape(-1).to(table.device)
    valid = (flat >= 0) & (flat < table.shape[0])
    rows = table.index_select(0, torch.where(valid, flat, torch.zeros_like(flat)))
    rows = rows.masked_fill(~valid[:, None], float("nan"))
    return rows.view(*ids.shape, table.shape[1])


# --------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------


def _check(table: torch.Tensor, ids: torch.Tensor) -> None:
    if table.dim() != 2 or not table.is_floating_point() or not table.is_contiguous():
        raise ValueError(f"Invalid table of shape {tuple(table.shape)} ({table.dtype}): expected a contiguous 2-d "
                         "floating tensor (rows x row elements).")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"Invalid ids dtype {ids.dtype}: expected torch.int64 or torch.int32 token ids.")


def gather_rows(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The rows ``table[ids]`` (shape ``ids.shape + (row_elems,)``, the table's dtype) on the ids' device.

    CUDA ids and a table in page-locked host memory (or on the GPU): one Triton launch, reading only the rows named
    (:func:`.dispatch.choose`). Elsewhere the reference, on the table's device, moved to the ids' (a host sync where
    the ids are on another device). Ids outside the table give NaN rows on both paths."""
    _check(table, ids)
    if choose(ids.device, ids.numel()) != "triton":
        return gather_rows_reference(table, ids).to(ids.device)
    flat = ids.reshape(-1).to(torch.int64).contiguous()
    out = torch.empty(flat.numel(), table.shape[1], dtype=table.dtype, device=ids.device)
    if flat.numel():
        grid = (flat.numel(), triton.cdiv(table.shape[1], ROW_BLOCK))
        _gather_rows_kernel[grid](table, flat, out, table.shape[0], table.shape[1], BLOCK=ROW_BLOCK)
    return out.view(*ids.shape, table.shape[1])
