"""Linear4bit: frozen NF4 linear layer (forward/backward, dtypes, autocast, memory, state_dict) and
quantize_model."""

import pytest
import torch
from torch import nn

from lowmem_lightning.kernels import dispatch, nf4
from lowmem_lightning.quant import Linear4bit, linear4bit_bytes, quantize_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _linear(in_features=96, out_features=40, bias=True, dtype=torch.float32):
    return nn.Linear(in_features, out_features, bias=bias).to(dtype)


def test_from_linear_stores_only_codes_scales_and_bias():
    linear = _linear()
    layer = Linear4bit.from_linear(linear)
    assert (layer.in_features, layer.out_features, layer.weight_dtype) == (96, 40, torch.float32)
    assert set(layer.state_dict()) == {"qweight", "qscale", "scale_step", "scale_mean", "bias"}
    assert not any(p.requires_grad for p in layer.parameters())
    assert [name for name, _ in layer.named_parameters()] == ["bias"]
    assert layer.qweight.dtype == torch.uint8 and layer.qweight.numel() == 96 * 40 // 2
    plain = Linear4bit.from_linear(linear, block_size=128, double_quant=False)
    assert set(plain.state_dict()) == {"qweight", "absmax", "bias"}
    assert torch.equal(layer.dequantize(), nf4.dequantize_nf4(nf4.quantize_nf4(linear.weight)))


def test_storage_bytes_per_param():
    layer = Linear4bit.from_linear(_linear(512, 256, bias=False))
    assert layer.nbytes == linear4bit_bytes(512, 256)
    assert layer.nbytes / (512 * 256) <= 0.52
    assert linear4bit_bytes(4096, 4096) / 4096**2 <= 0.52
    dense = 512 * 256 * 4
    assert layer.nbytes < dense / 7.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_and_input_gradient(dtype):
    linear = _linear(dtype=dtype)
    layer = Linear4bit.from_linear(linear)
    x = torch.randn(2, 3, 96, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (2, 3, 40)
    w = layer.dequantize()
    assert w.dtype == dtype
    expected = x.detach() @ w.T + linear.bias.detach()
    assert torch.allclose(y.float(), expected.float(), atol=1e-2 if dtype != torch.float32 else 1e-5)
    # close to the original full-precision layer (4-bit error)
    ref = linear(x.detach()).float()
    assert (y.float() - ref).norm() / ref.norm() < 0.15
    grad = torch.randn_like(y)
    y.backward(grad)
    assert torch.allclose(x.grad.float(), (grad @ w).float(), atol=1e-2 if dtype != torch.float32 else 1e-5)


def test_backward_keeps_no_dense_weight():
    layer = Linear4bit.from_linear(_linear(256, 128, bias=False))
    x = torch.randn(4, 256, requires_grad=True)
    saved = []
    pack = lambda t: saved.append(t.numel() * t.element_size()) or t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    assert sum(saved) < 256 * 128 * 4 // 4  # not even a quarter of the fp32 weight is saved


def test_autocast_and_compute_dtype():
    linear = _linear()
    x = torch.randn(5, 96)
    layer = Linear4bit.from_linear(linear)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), layer(x), atol=0.05, rtol=0.02)
    bf16_compute = Linear4bit.from_linear(linear, compute_dtype=torch.bfloat16)
    out = bf16_compute(x)
    assert out.dtype == torch.float32  # the input's dtype
    w = bf16_compute.dequantize(torch.bfloat16)
    assert torch.equal(out, (x.bfloat16() @ w.T + linear.bias.bfloat16()).float())


def test_triton_forward_equals_reference(force_triton, monkeypatch):
    layer = Linear4bit.from_linear(_linear(33, 17))
    x = torch.randn(3, 33)
    y = layer(x)
    dispatch.configure(force_triton=False)
    reference = Linear4bit.from_linear(_linear(33, 17))
    reference.load_state_dict(layer.state_dict())
    assert torch.equal(reference(x), y)


def test_state_dict_round_trip_and_full_precision_load():
    linear = _linear(dtype=torch.bfloat16)
    layer = Linear4bit.from_linear(linear)
    fresh = Linear4bit(96, 40, weight_dtype=torch.bfloat16)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(4, 96, dtype=torch.bfloat16)
    assert torch.equal(fresh(x), layer(x))
    from_dense = Linear4bit(96, 40, weight_dtype=torch.bfloat16)
    from_dense.load_state_dict(linear.state_dict())  # an nn.Linear checkpoint is quantized on load
    assert torch.equal(from_dense.dequantize(), layer.dequantize())


def test_to_dtype_keeps_codes_and_fp32_scales():
    layer = Linear4bit.from_linear(_linear())
    before = {k: v.clone() for k, v in layer.state_dict().items() if k != "bias"}
    layer.to(torch.bfloat16)
    assert layer.weight_dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    assert layer.scale_step.dtype == torch.float32 and layer.scale_mean.dtype == torch.float32
    assert all(torch.equal(before[k], layer.state_dict()[k]) for k in before)
    assert layer.dequantize().dtype == torch.bfloat16


def test_quantize_model_in_place_with_skip():
    model = nn.Sequential()
    model.add_module("body", nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)))
    model.add_module("lm_head", nn.Linear(16, 8))
    x = torch.randn(2, 16)
    reference = model(x)
    out = quantize_model(model)
    assert out is model
    assert isinstance(model.body[0], Linear4bit) and isinstance(model.body[2], Linear4bit)
    assert type(model.lm_head) is nn.Linear
    assert (model(x) - reference).norm() / reference.norm() < 0.2
    quantize_model(model, skip=())
    assert isinstance(model.lm_head, Linear4bit)


def test_quantize_model_on_meta_gives_shape_only_layers():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4096, 1024))
    quantize_model(model)
    layer = model[0]
    assert layer.qweight.device.type == "meta" and layer.nbytes == linear4bit_bytes(4096, 1024) + 1024 * 4


@pytest.mark.usefixtures("bitsandbytes_flag")
def test_an_nn_linear_whose_weight_is_a_handle_on_the_codes():
    layer = Linear4bit.from_linear(_linear(dtype=torch.bfloat16))
    assert isinstance(layer, nn.Linear) and layer.is_quantized
    handle = layer.weight
    assert (handle.shape, handle.dtype, handle.device, handle.requires_grad) == (
        torch.Size((40, 96)), torch.bfloat16, torch.device("cpu"), False)
    assert handle.numel() == 40 * 96 and handle.size(1) == 96
    assert [name for name, _ in layer.named_parameters()] == ["bias"]  # nothing dense was made
    with pytest.raises(TypeError, match="dequantize"):
        nn.init.normal_(handle)
    with pytest.raises(TypeError, match="dequantize"):
        torch.matmul(torch.randn(2, 96), handle)
    with pytest.raises(AttributeError, match="dequantize"):
        handle.to(torch.float32)
    model = nn.Sequential(nn.Linear(96, 40))
    quantize_model(model)
    first = model[0]
    assert quantize_model(model)[0] is first  # a Linear4bit is never quantized again
    assert quantize_model(nn.Sequential(nn.ReLU())).__dict__.get("is_loaded_in_4bit") is None
    assert model.is_loaded_in_4bit and repr(model.is_loaded_in_4bit) == "True"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_merge_makes_the_layer_dense_without_loss(dtype):
    linear = _linear(dtype=dtype)
    layer = Linear4bit.from_linear(linear)
    codes = layer.state_dict()
    delta = torch.randn(40, 96, generator=torch.Generator().manual_seed(0)) * 1e-2
    expected = (layer.dequantize(torch.float32) + delta).to(dtype)
    layer.weight.data += delta  # what peft's LoRA merge does
    assert not layer.is_quantized and isinstance(layer.weight, nn.Parameter) and not layer.weight.requires_grad
    assert layer.weight.dtype == dtype and torch.equal(layer.weight, expected)
    assert set(layer.state_dict()) == {"weight", "bias"}  # nn.Linear's, the NF4 buffers are gone
    assert layer.nbytes == (40 * 96 + 40) * expected.element_size()
    x = torch.randn(3, 96, dtype=dtype)
    assert torch.allclose(layer(x).float(), (x @ expected.T + linear.bias.detach()).float(), atol=1e-5)
    assert torch.equal(layer.dequantize(), expected)

    again = Linear4bit.from_linear(linear)
    again.weight.data = again.weight.data.clone() + delta  # peft's safe_merge: a dense fp32 copy, assigned back
    assert torch.equal(again.weight, expected)
    third = Linear4bit.from_linear(linear)
    merged = third.weight.data.clone() + delta
    returned = third.weight.data.copy_(merged)  # peft >= 0.22's safe_merge writes back with copy_
    assert returned is third.weight and not third.is_quantized and torch.equal(third.weight, expected)
    merged.zero_()  # copy_ copies: the caller's tensor is not the layer's weight
    assert torch.equal(third.weight, expected)
    with pytest.raises(TypeError, match=r"src=list"):
        Linear4bit.from_linear(linear).weight.data.copy_([0.0])

    layer.to(torch.float16)
    assert layer.weight.dtype == torch.float16 and layer.weight_dtype == torch.float16
    layer.quantize_weight_(linear.weight.detach())  # back to 4-bit: the same codes as before the merge
    assert layer.is_quantized and set(layer.state_dict()) == set(codes)
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in codes.items() if k != "bias")
    with pytest.raises(ValueError, match=r"delta of shape \(96, 40\)"):
        layer.weight.data += delta.T


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="block_size=48"):
        Linear4bit.from_linear(_linear(), block_size=48)
    with pytest.raises(ValueError, match="compute_dtype"):
        Linear4bit.from_linear(_linear(), compute_dtype=torch.int8)
    with pytest.raises(TypeError, match="nn.Linear"):
        Linear4bit.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="in_features=0"):
        Linear4bit(0, 4)
    with pytest.raises(ValueError, match="last dim 96"):
        Linear4bit.from_linear(_linear())(torch.randn(2, 95))
    with pytest.raises(TypeError, match="skip"):
        quantize_model(nn.Linear(2, 2), skip=[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_forward_backward_use_the_triton_weight():
    linear = _linear(4096, 1024, dtype=torch.bfloat16).cuda()
    layer = Linear4bit.from_linear(linear)
    w = nf4.dequantize_nf4_reference(layer.nf4_weight())
    assert torch.equal(layer.dequantize(), w)
    x = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, x.detach() @ w.T + linear.bias.detach())
    y.float().sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(y) @ w)
