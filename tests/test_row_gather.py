"""The row-gather kernel (the lookup of an embedding table held in host memory) equals its reference, which equals
``table[ids]``; ids outside the table give NaN rows on both paths (run through Triton's interpreter)."""

import pytest
import torch

from lowmem_lightning.kernels import dispatch
from lowmem_lightning.kernels.row_gather import ROW_BLOCK, gather_rows, gather_rows_reference


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("row_elems", [8, 1000, ROW_BLOCK + 40])
def test_kernel_equals_reference_and_indexing(force_triton, dtype, row_elems):
    """Odd row lengths (one partial chunk, a full and a partial one), ids of two dtypes and shapes, repeats."""
    generator = torch.Generator().manual_seed(row_elems)
    table = torch.randn(37, row_elems, generator=generator).to(dtype)
    for ids in (torch.randint(0, 37, (2, 5), generator=generator),
                torch.tensor([36, 0, 0, 17], dtype=torch.int32)):
        got = gather_rows(table, ids)
        assert got.shape == (*ids.shape, row_elems) and got.dtype == dtype
        assert torch.equal(got, gather_rows_reference(table, ids))
        assert torch.equal(got, table[ids.long()])


def test_ids_outside_the_table_give_nan_rows_on_both_paths(force_triton):
    """The kernel cannot raise without a host sync: an id below 0 or past the last row reads nothing and gives a NaN
    row (a NaN loss, seen at once), the others their rows."""
    table = torch.arange(12, dtype=torch.float32).view(4, 3)
    ids = torch.tensor([[1, -1], [4, 3]])
    kernel = gather_rows(table, ids)
    with dispatch.override(force_triton=False):
        reference = gather_rows(table, ids)
    for got in (kernel, reference):
        assert torch.isnan(got[0, 1]).all() and torch.isnan(got[1, 0]).all()
        assert torch.equal(got[0, 0], table[1]) and torch.equal(got[1, 1], table[3])


def test_no_ids_no_rows(force_triton):
    table = torch.randn(5, 16)
    assert gather_rows(table, torch.empty(0, 7, dtype=torch.long)).shape == (0, 7, 16)


@pytest.mark.parametrize("table, ids, error, words", [
    (torch.randn(4, 3).t(), torch.tensor([0]), ValueError, "contiguous 2-d floating"),
    (torch.arange(12).view(4, 3), torch.tensor([0]), ValueError, "contiguous 2-d floating"),
    (torch.randn(4, 3), torch.tensor([0.0]), TypeError, "int64 or torch.int32"),
])
def test_bad_inputs_are_named(table, ids, error, words):
    with pytest.raises(error, match=words):
        gather_rows(table, ids)
