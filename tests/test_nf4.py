"""NF4 kernels: the derived code matches QLoRA's table, Triton (interpreter) equals the reference bit for
bit, storage is <= 0.52 bytes/param, and reconstruction is no worse than bitsandbytes' NF4."""

import pytest
import torch

from lowmem_lightning.kernels import nf4

# Appendix E of Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs" (2023).
PAPER_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _weight(shape, dtype=torch.float32):
    return (torch.randn(shape) * (0.2 + torch.rand(shape) ** 3)).to(dtype)


def _mse(a, b):
    return ((a.float() - b.float()) ** 2).mean().item()


def test_code_is_derived_from_normal_quantiles_and_matches_the_paper():
    values = nf4.nf4_code_values()
    assert values.shape == (16,)
    assert torch.allclose(values, torch.tensor(PAPER_NF4, dtype=torch.float64), atol=1e-6, rtol=0)
    assert values[0] == -1.0 and values[15] == 1.0 and values[7] == 0.0  # exact zero, normalized
    assert (values > 0).sum() == 8 and (values < 0).sum() == 7  # asymmetric
    assert torch.all(values[1:] > values[:-1])


@pytest.mark.parametrize(
    "shape, dtype, block_size, double_quant",
    [
        ((33, 65), torch.float32, 64, True),
        ((1000, 3), torch.bfloat16, 64, True),
        ((7,), torch.float16, 64, True),
        ((129, 67), torch.bfloat16, 32, True),
        ((5, 300), torch.float32, 128, False),
        ((4097,), torch.bfloat16, 256, False),
    ],
)
def test_triton_equals_reference(force_triton, shape, dtype, block_size, double_quant):
    x = _weight(shape, dtype)
    ref = nf4.quantize_nf4_reference(x, block_size, double_quant)
    got = nf4.quantize_nf4(x, block_size, double_quant)
    assert got.packed.dtype == torch.uint8 and got.packed.numel() == (x.numel() + 1) // 2
    assert torch.equal(got.packed, ref.packed)  # every stored code identical
    for name in ("absmax", "qscale", "scale_step", "scale_mean"):
        a, b = getattr(got, name), getattr(ref, name)
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), name
    for out_dtype in (None, torch.float32, torch.bfloat16):
        dense = nf4.dequantize_nf4(got, out_dtype)
        assert dense.shape == x.shape and dense.dtype == (out_dtype or dtype)
        assert torch.equal(dense, nf4.dequantize_nf4_reference(ref, out_dtype))


def test_decoded_values_are_codes_times_block_scale_and_error_is_bounded():
    x = _weight((40, 64))
    w = nf4.quantize_nf4(x, double_quant=False)
    dense = nf4.dequantize_nf4(w).reshape(-1, 64)
    assert torch.equal(w.absmax, x.reshape(-1, 64).abs().amax(1))
    codes = torch.stack([w.packed >> 4, w.packed & 15], dim=1).reshape(-1, 64).long()
    assert torch.equal(dense, nf4.nf4_code()[codes] * w.absmax[:, None])
    max_half_gap = (nf4.nf4_code().diff().max() / 2).item()
    assert ((x.reshape(-1, 64) - dense).abs() / w.absmax[:, None]).max() <= max_half_gap + 1e-6


def test_double_quantized_scales_are_close_and_zero_blocks_stay_zero():
    x = _weight((300, 64))
    x[5] = 0.0  # one all-zero block
    w = nf4.quantize_nf4(x)
    assert w.double_quant and w.qscale.dtype == torch.int8 and w.scale_step.numel() == 2  # 300 blocks / 256
    scales = nf4.block_scales_reference(w)
    absmax = x.abs().amax(1)
    assert ((scales - absmax).abs() <= w.scale_step.max() / 2 + 1e-6).all()
    assert torch.all(nf4.dequantize_nf4(w)[5] == 0)


def test_storage_is_at_most_052_bytes_per_param():
    x = _weight((256, 1024))
    w = nf4.quantize_nf4(x)
    assert w.nbytes == nf4.nf4_storage_bytes(x.numel())
    assert w.nbytes / x.numel() <= 0.52
    assert nf4.nf4_storage_bytes(4096 * 4096) / 4096**2 == pytest.approx(0.51587, abs=1e-5)
    assert nf4.nf4_storage_bytes(4096 * 4096, double_quant=False) / 4096**2 == 0.5625


def test_matmul_is_dequantize_then_linear():
    w = nf4.quantize_nf4(_weight((24, 40)))
    x = torch.randn(3, 40)
    assert torch.equal(nf4.nf4_matmul(x, w), x @ nf4.dequantize_nf4(w, torch.float32).T)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="block_size=100"):
        nf4.quantize_nf4(torch.randn(8, 8), block_size=100)
    with pytest.raises(TypeError, match="x.dtype"):
        nf4.quantize_nf4(torch.ones(8, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="at least one element"):
        nf4.quantize_nf4(torch.ones(0))
    with pytest.raises(TypeError, match="double_quant"):
        nf4.quantize_nf4(torch.ones(8), double_quant=1)


def test_codes_identical_to_bitsandbytes_and_error_no_worse_with_double_quant():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(1)
    gaussian = torch.randn(256, 512)
    heavy = torch.randn(256, 512) * torch.rand(256, 512) ** 3
    for x in (gaussian, heavy):
        # Without double quantization both store the same absmax and the very same packed codes.
        packed, state = bnbf.quantize_4bit(x, blocksize=64, compress_statistics=False, quant_type="nf4")
        ours = nf4.quantize_nf4(x, double_quant=False)
        assert torch.equal(packed.flatten(), ours.packed)
        assert torch.equal(state.absmax, ours.absmax)
        # With double quantization (both ~0.516 B/param) our reconstruction error is no larger.
        packed, state = bnbf.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type="nf4")
        bnb_mse = _mse(bnbf.dequantize_4bit(packed, state), x)
        our_mse = _mse(nf4.dequantize_nf4(nf4.quantize_nf4(x)), x)
        assert our_mse <= bnb_mse, (our_mse, bnb_mse)
    assert torch.allclose(state.code.float(), nf4.nf4_code(), atol=1e-6, rtol=0)


def test_reference_encoder_in_chunks_gives_the_same_codes(monkeypatch):
    x = _weight((70, 64))
    whole = nf4.quantize_nf4_reference(x)
    monkeypatch.setattr(nf4, "_REFERENCE_CHUNK", 3 * 64)  # 3 blocks per step, last step partial
    assert torch.equal(nf4.quantize_nf4_reference(x).packed, whole.packed)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_kernels_equal_the_reference_on_the_same_device(dtype):
    x = _weight((1000, 4097), dtype).cuda()
    for block_size, double_quant in ((64, True), (128, False)):
        ref = nf4.quantize_nf4_reference(x, block_size, double_quant)  # torch ops on the GPU
        got = nf4.quantize_nf4(x, block_size, double_quant)  # Triton kernels
        assert torch.equal(got.packed, ref.packed)
        assert torch.equal(nf4.dequantize_nf4(got), nf4.dequantize_nf4_reference(ref))
