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
