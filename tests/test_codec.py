"""The 8-bit state codec: Triton kernels (interpreter) store the same codes as the reference."""

import pytest
import torch

from lowmem_lightning.kernels import codec


@pytest.mark.parametrize("shape", [(4097,), (1000, 3), (7,), (256,), (3, 5, 300)])
@pytest.mark.parametrize("signed", [True, False])
def test_triton_codes_equal_reference(force_triton, shape, signed):
    x = torch.randn(shape) * torch.rand(shape) ** 4
    x = x if signed else x.abs()
    ref_codes, ref_absmax = codec.quantize_reference(x, signed)
    codes, absmax = codec.quantize_blockwise(x, signed)
    assert codes.dtype == (torch.int8 if signed else torch.uint8)
    assert torch.equal(codes, ref_codes)
    assert torch.equal(absmax, ref_absmax)
    assert torch.equal(codec.dequantize_blockwise(codes, absmax), codec.dequantize_reference(ref_codes, ref_absmax))


@pytest.mark.parametrize("signed", [True, False])
def test_round_trip_error_is_small_and_zero_blocks_stay_zero(signed):
    x = torch.randn(10_000)
    x = x if signed else x.abs()
    x[:256] = 0.0  # one all-zero block
    codes, absmax = codec.quantize_reference(x, signed)
    back = codec.dequantize_reference(codes, absmax)
    assert absmax.shape == (codec.num_blocks(x.numel()),)
    assert torch.all(back[:256] == 0)
    rel = (back - x).abs().amax() / x.abs().amax()
    assert rel < 0.01


def test_dynamic_range_keeps_tiny_second_moments_nonzero():
    # a value 1e-9 of its block maximum must not be flushed to zero by the unsigned code
    x = torch.full((256,), 1e-9)
    x[0] = 1.0
    codes, absmax = codec.quantize_reference(x, signed=False)
    assert (codec.dequantize_reference(codes, absmax)[1:] > 0).all()


def test_signed_code_is_symmetric():
    x = torch.linspace(-1, 1, 4096)
    codes, absmax = codec.quantize_reference(x, signed=True)
    neg_codes, _ = codec.quantize_reference(-x, signed=True)
    assert torch.equal(codes, -neg_codes)
    assert codes.min() == -127 and codes.max() == 127
