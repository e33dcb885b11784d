"""Stochastic rounding: Triton helper == PyTorch reference, unbiased, and small updates survive."""

import pytest
import torch
import triton
import triton.language as tl

from lowmem_lightning.kernels.rounding import round_param_reference, store_param


@triton.jit
def _round_kernel(x_ptr, out_ptr, seed, n, STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    store_param(out_ptr, x, offs, mask, seed, STOCHASTIC)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("stochastic", [True, False])
def test_triton_rounding_equals_reference(dtype, stochastic):
    x = torch.randn(4097) * torch.logspace(-6, 3, 4097)
    out = torch.empty(4097, dtype=dtype)
    _round_kernel[(triton.cdiv(4097, 1024),)](x, out, 1234, 4097, STOCHASTIC=stochastic, BLOCK=1024)
    ref = round_param_reference(x, dtype, seed=1234, stochastic=stochastic)
    assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nearest_rounding_matches_torch_cast(dtype):
    x = torch.randn(10_000) * 100
    assert torch.equal(round_param_reference(x, dtype, stochastic=False), x.to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_unbiased_and_keeps_small_updates(dtype):
    # 1 + 1e-4 is far below half an ulp of bf16 (2^-8) and of fp16 (2^-11): nearest rounding loses it
    x = torch.full((200_000,), 1.0 + 1e-4)
    nearest = round_param_reference(x, dtype, stochastic=False).float()
    assert torch.all(nearest == 1.0)
    rounded = round_param_reference(x, dtype, seed=7).float()
    assert abs(rounded.mean().item() - (1.0 + 1e-4)) < 2e-5
    neg = round_param_reference(-x, dtype, seed=7).float()
    assert abs(neg.mean().item() + (1.0 + 1e-4)) < 2e-5
    assert set(rounded.unique().tolist()) <= {1.0, 1.0 + torch.finfo(dtype).eps}


@pytest.mark.parametrize("shape", [(5, 256), (3, 4096), (2, 4097), (7,), (2, 3, 5), (1, 1)])
def test_flat_hash_start_equals_the_hash_of_element_indices(shape):
    """The bf16 rounding's hash of row-major indices (row term + loaded column table for 2-d CPU tensors, the
    plain index hash otherwise) has the high 16 bits of the kernel's hash of ``arange(numel)``, for a Python seed
    and per-row seeds anywhere in ``[0, 2**32)`` (folded bucket seeds)."""
    from lowmem_lightning.kernels.rounding import _flat_high16_reference, _hash_bits_reference

    offs = torch.arange(torch.Size(shape).numel()).view(shape)
    seeds = [0, 123456789, 2**31 - 1]
    if len(shape) == 2:
        seeds.append(torch.randint(0, 2**32, (shape[0], 1), generator=torch.Generator().manual_seed(3)))
    for seed in seeds:
        want = (_hash_bits_reference(offs, seed) >> 16) & 0xFFFF
        assert torch.equal(_flat_high16_reference(torch.Size(shape), seed, "cpu"), want)


def test_compiled_bf16_rounding_loads_its_column_table_and_keeps_the_bits():
    """Compiled (dynamic shapes, as the CPU bucket steps are), the bf16 rounding of a ``(rows, 256)`` operand stores
    the eager bits, and inductor's loop no longer assembles ``index * GOLDEN`` lane by lane (an
    ``Vectorized<int32_t>::arange`` per 16 elements was most of the rounding's cost, issue 24.6)."""
    from torch._inductor.utils import run_and_get_code

    def rounded(x, seeds):
        return round_param_reference(x, torch.bfloat16, seeds)

    x = torch.randn(6, 256) * 3
    seeds = torch.randint(0, 2**32, (6, 1), generator=torch.Generator().manual_seed(5))
    torch._dynamo.reset()
    got, codes = run_and_get_code(torch.compile(rounded, dynamic=True), x, seeds)
    assert torch.equal(got.view(torch.int16), rounded(x, seeds).view(torch.int16))
    code = "\n".join(codes)
    assert "at::vec::convert<at::BFloat16" in code, "the rounding loop was not vectorized"
    assert "::arange(" not in code
