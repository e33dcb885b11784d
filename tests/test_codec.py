"""The 8-bit state codec: Triton kernels (interpreter) store the same codes as the reference."""

from fractions import Fraction

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


# --------------------------------------------------------------------------------------------------
# The branch-free correctly rounded helpers (interpreter path; the GPU path is the same instruction
# sequence as ptxas' own sqrt.rn / div.rn fast paths, pinned by tests/test_kernels_sass.py)
# --------------------------------------------------------------------------------------------------

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _fast_ops_kernel(a_ptr, b_ptr, rcp_ptr, sqrt_ptr, div_ptr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    a = tl.load(a_ptr + offs)
    b = tl.load(b_ptr + offs)
    tl.store(rcp_ptr + offs, codec.rcp_rn(b))
    tl.store(sqrt_ptr + offs, codec.sqrt_rn_fast(b))
    tl.store(div_ptr + offs, codec.div_rn_fast(a, b))


def _fast_ops(a, b, block):
    outs = [torch.empty_like(b) for _ in range(3)]
    _fast_ops_kernel[(triton.cdiv(b.numel(), block),)](a, b, *outs, BLOCK=block)
    return outs


def _check_fast_ops(stride: int):
    # fp32 significands with both exponent parities ([1, 4)), then scaled towards the range ends
    b = torch.arange(0x3F800000, 0x40800000, stride, dtype=torch.int32).view(torch.float32)
    b = b[: b.numel() - b.numel() % 16384]
    a = (torch.rand(b.shape, generator=torch.Generator().manual_seed(1)) + 0.5) * torch.where(
        torch.arange(b.numel()) % 2 == 0, 1.0, -1.0)
    for scale in (1.0, 2.0 ** -100, 2.0 ** -60, 2.0 ** 60, 2.0 ** 124):  # exact scalings, inside each range
        sb, sa = b * scale, a * 1e3
        rcp, root, quot = _fast_ops(sa, sb, block=16384)
        assert torch.equal(rcp, 1.0 / sb), scale
        assert torch.equal(root, codec.sqrt_rn_reference(sb)), scale
        assert torch.equal(quot, sa / sb), scale


def test_branch_free_rcp_sqrt_div_are_correctly_rounded():
    _check_fast_ops(stride=61)


@pytest.mark.slow
def test_branch_free_rcp_sqrt_div_are_correctly_rounded_for_every_significand():
    _check_fast_ops(stride=1)


@triton.jit
def _fma_emulation_kernel(a_ptr, b_ptr, c_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, codec._fma_interpreted(tl.load(a_ptr + offs), tl.load(b_ptr + offs),
                                                    tl.load(c_ptr + offs)))


def _fp32_rn(x: Fraction) -> float:
    """The fp32 nearest to the exact rational ``x``, ties to even."""
    import numpy as np

    guess = np.float32(float(x))
    candidates = [np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf))]
    best = min(candidates, key=lambda f: (abs(Fraction(float(f)) - x), int(np.float32(f).view(np.int32)) & 1))
    return float(best)


def test_fma_emulation_rounds_once():
    # the interpreter fallback of codec.fma (triton 3.6's interpreter rounds tl.fma twice): against the exact
    # a * b + c rounded once, on products cancelled by their own rounding (c = -RN(a * b): the exact error term),
    # sums near ties, and random operands
    gen = torch.Generator().manual_seed(5)
    n = 2048
    a = torch.rand(n, generator=gen) * 2 + 0.5
    b = (torch.rand(n, generator=gen) * 2 + 0.5) * torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)
    c = torch.randn(n, generator=gen)
    c[: n // 2] = -(a[: n // 2] * b[: n // 2])  # cancellation: the result is the product's rounding error
    c[n // 2: 3 * n // 4] *= 2.0 ** -24  # tiny addends: near-ties of the product's last bit
    out = torch.empty(n)
    _fma_emulation_kernel[(1,)](a, b, c, out, BLOCK=n)
    exact = [_fp32_rn(Fraction(x) * Fraction(y) + Fraction(z)) for x, y, z in zip(a.tolist(), b.tolist(), c.tolist())]
    assert out.tolist() == exact
    assert (out[: n // 2] != 0).float().mean() > 0.9  # the cancellation cases really test the error term


def _previous_codes(x, absmax, signed):
    """The code before issue 24: correctly rounded x / absmax, sqrt (twice for v), round half away."""
    r = x / torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    if signed:
        q = torch.floor(codec.sqrt_rn_reference(r.abs()) * 127.0 + 0.5).clamp(max=127.0)
        return torch.where(r < 0, -q, q)
    return torch.floor(codec.sqrt_rn_reference(codec.sqrt_rn_reference(r)) * 255.0 + 0.5).clamp(max=255.0)


@pytest.mark.parametrize("signed", [True, False])
def test_codes_differ_from_the_exact_quotient_code_by_one_step_on_a_tiny_fraction(signed):
    # the scale is a multiplication by RN(1 / absmax) (and v goes through sqrt(v) * RN(1 / sqrt(vmax))),
    # rounding ties to even: measured 1 (signed) / 28 (unsigned) of 4M codes move by one step
    x = torch.randn(1 << 22, generator=torch.Generator().manual_seed(3)) * torch.rand(1 << 22) ** 4
    x = x if signed else x.abs()
    codes, absmax = codec.quantize_reference(x, signed)
    old = _previous_codes(x.view(-1, 256), absmax.view(-1, 1), signed).view(-1)
    diff = (codes.to(torch.float32) - old).abs()
    assert diff.max() <= 1
    assert (diff > 0).float().mean() < (1e-5 if signed else 1e-4)
    assert codes.to(torch.float32).abs().max() == (127 if signed else 255)


def test_round_to_int_is_round_half_even_like_torch_round():
    y = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 126.5, 127.49998, -126.5, 254.5, 3.4999998])
    out = torch.empty(y.shape, dtype=torch.int32)
    _round_kernel[(1,)](y, out, y.numel(), BLOCK=16)
    assert torch.equal(out, torch.round(y).to(torch.int32))


@triton.jit
def _round_kernel(y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, codec.round_to_int(tl.load(y_ptr + offs, mask=offs < n)), mask=offs < n)
