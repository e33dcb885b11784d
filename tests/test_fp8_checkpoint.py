"""Fine-grained FP8 releases (``quant_method: fp8``: DeepSeek-V3, Qwen3-*-FP8, Ministral 3): each linear weight stored
as FP8 E4M3 codes with a scale per block in ``weight_scale_inv``.

Before, ``lowmem fit`` refused them ("declares a checkpoint stored already quantized"), and many recent models are
released in FP8 only. The loader decodes each weight as it streams (``code * scale`` in fp32, cast once) and stores it
in NF4 (or the load dtype), so the QLoRA recipe trains the FP8 release with no bf16 copy written first. Checked against
transformers' own decode (``FineGrainedFP8Config(dequantize=True)``): bit-equal in bf16 and fp32; the NF4 model equals
``quantize_model`` of transformers' load tensor for tensor; partial edge blocks and E8M0 (uint8) scales decode as
their formula says; MoE experts stored one FP8 tensor per expert (Qwen3-30B-A3B-FP8) decode into NF4 experts; a real
``lowmem fit --config qlora_7b.yaml`` and ``lowmem estimate`` run on it; a missing or misshapen scale, and a NaN scale,
are refused naming the tensor.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from lowmem_calls import run_qlora_recipe
from quantized_releases import CODES_SHARD, INDEX, SCALES_SHARD, rewrite_shard, write_release
from safetensors.torch import load_file, save_file

from lowmem_lightning.quant import Linear4bit, load_pretrained_causal_lm, quantize_model
from lowmem_lightning.quant.fp8 import decode_fp8
from lowmem_lightning.quant.loading import ModelFileError, NonFiniteCheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")

transformers = pytest.importorskip("transformers")

SIZES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 320, "max_position_embeddings": 256,
         "pad_token_id": 256, "bos_token_id": 257, "eos_token_id": 258, "tie_word_embeddings": False}
BLOCK = 32
QUANTIZATION = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                "weight_block_size": [BLOCK, BLOCK], "modules_to_not_convert": ["lm_head"]}
FP8_MAX = 448.0


def _encoded(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scales)`` of ``weight`` in FP8 E4M3 with one scale per ``BLOCK x BLOCK`` block (its amax / 448), as
    a fine-grained FP8 release stores it."""
    out, cols = weight.shape
    blocks = weight.float().reshape(out // BLOCK, BLOCK, cols // BLOCK, BLOCK)
    scales = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
    codes = (blocks / scales[:, None, :, None]).reshape(out, cols).to(torch.float8_e4m3fn)
    return codes, scales


def _write_fp8(model, path: Path) -> None:
    """``model`` saved as an FP8 release: its projections as FP8 codes and scales, the rest in bf16."""

    def encode(key: str, tensor: torch.Tensor):
        if not key.endswith("proj.weight"):
            return None
        codes, scales = _encoded(tensor)
        return {key: codes}, {f"{key}_scale_inv": scales}

    write_release(model, path, QUANTIZATION, encode)


@pytest.fixture(scope="module")
def fp8_release(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen3Config(**SIZES))
    path = tmp_path_factory.mktemp("qwen3_fp8") / "model"
    _write_fp8(model, path)
    return path


@pytest.fixture
def release(fp8_release, tmp_path) -> Path:
    """A copy of the release for one test to damage."""
    return Path(shutil.copytree(fp8_release, tmp_path / "model"))


def _transformers_decoded(path: Path, dtype: torch.dtype):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path), quantization_config=transformers.FineGrainedFP8Config(dequantize=True), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_full_precision_load_is_transformers_decode_bit_for_bit(fp8_release, dtype):
    ours = load_pretrained_causal_lm(fp8_release, quantize=None, torch_dtype=dtype).state_dict()
    theirs = _transformers_decoded(fp8_release, dtype).state_dict()
    assert ours.keys() == theirs.keys()
    for key, tensor in ours.items():
        assert torch.equal(tensor, theirs[key]), key


def test_nf4_load_equals_quantize_model_of_transformers_decoded_load(fp8_release):
    ours = load_pretrained_causal_lm(fp8_release, torch_dtype=torch.bfloat16)
    theirs = quantize_model(_transformers_decoded(fp8_release, torch.bfloat16), skip=("lm_head",))
    assert sum(isinstance(m, Linear4bit) for m in ours.modules()) == 7 * SIZES["num_hidden_layers"]
    mine, expected = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == expected.keys()
    for key, tensor in mine.items():
        assert torch.equal(tensor, expected[key]), key


def test_partial_edge_blocks_and_e8m0_scales_decode_as_their_formula():
    """A weight whose sides are not multiples of the block takes its edge block's scale (DeepSeek's reference
    dequantization; transformers refuses such grids); uint8 scales are E8M0 exponents, ``2 ** (s - 127)``."""
    gen = torch.Generator().manual_seed(0)
    codes = (torch.randn(80, 48, generator=gen) * 100).to(torch.float8_e4m3fn)
    scales = torch.rand(3, 2, generator=gen) + 0.5
    rows, cols = torch.arange(80)[:, None] // BLOCK, torch.arange(48)[None, :] // BLOCK
    expected = codes.float() * scales[rows, cols]
    assert torch.equal(decode_fp8(codes, scales, (BLOCK, BLOCK), torch.float32), expected)
    exponents = torch.randint(120, 135, (3, 2), dtype=torch.uint8, generator=gen)
    expected = codes.float() * torch.exp2(exponents.float() - 127)[rows, cols]
    assert torch.equal(decode_fp8(codes, exponents, (BLOCK, BLOCK), torch.bfloat16), expected.bfloat16())
    assert torch.equal(decode_fp8(codes, torch.tensor(0.25), None, torch.float32), codes.float() * 0.25)


def test_lowmem_fit_and_estimate_with_the_qlora_recipe(fp8_release, tmp_path):
    """The real commands on the release (before: refused as "stored already quantized"): the fit trains LoRA on the
    seven projections and saves the adapter; the estimate counts them in NF4, as the loaded model holds them."""
    from test_field_architectures import _tokenizer

    model = tmp_path / "qwen3-fp8"
    shutil.copytree(fp8_release, model)
    _tokenizer(model)
    proc = run_qlora_recipe(model, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    adapter = json.loads((tmp_path / "runs/qlora_7b/adapter/adapter_config.json").read_text())
    assert len(adapter["target_modules"]) == 7
    estimate = run_qlora_recipe(model, tmp_path, "estimate", "--format", "json")
    assert estimate.returncode == 0, estimate.stderr[-3000:]
    counted = json.loads(estimate.stdout)["frozen_bytes_by_dtype"]["nf4"]
    held = [m for m in load_pretrained_causal_lm(model).modules() if isinstance(m, Linear4bit)]
    assert counted == sum(b.numel() * b.element_size() for module in held for b in module.buffers(recurse=False))


def test_a_full_finetune_builds_the_release_decoded(fp8_release):
    """The full fine-tune's build (no NF4) loads through transformers with ``FineGrainedFP8Config(dequantize=True)``:
    plain linear layers holding the decoded weights, every one trainable (before: refused)."""
    from lowmem_lightning.modules.causal_lm import build_causal_lm

    model = build_causal_lm(str(fp8_release), None, None, None, device="cpu", torch_dtype="bfloat16")
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert all(p.requires_grad and p.dtype == torch.bfloat16 for p in model.parameters())
    theirs = _transformers_decoded(fp8_release, torch.bfloat16).state_dict()
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, theirs[key]), key


def test_per_tensor_scales_with_static_activation_scales_load_as_transformers_decodes(tmp_path):
    """The per-tensor layout (``weight_block_size: null``, ``activation_scheme: static``: one ``weight_scale_inv`` and
    one ``activation_scale`` per layer, some layers left in bf16 by ``modules_to_not_convert``): the weights decode as
    transformers decodes them, the activation scales are dropped without a warning."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.MistralConfig(**SIZES))
    model.config.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    quantization = {"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": None,
                    "modules_to_not_convert": ["model.layers.0.self_attn", "lm_head"]}
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_config": quantization}))
    stored = {}
    for key, tensor in model.state_dict().items():
        if key.endswith("proj.weight") and ".layers.0.self_attn." not in key:
            scale = tensor.abs().amax() / FP8_MAX
            stored[key] = (tensor / scale).to(torch.float8_e4m3fn)
            stored[key + "_scale_inv"] = scale.reshape(())
            stored[key.replace(".weight", ".activation_scale")] = torch.tensor(1.0)
        else:
            stored[key] = tensor.to(torch.bfloat16).contiguous()
    save_file(stored, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "tensors the model does not use" for the activation scales
        ours = load_pretrained_causal_lm(tmp_path, quantize=None, torch_dtype=torch.float32).state_dict()
    theirs = _transformers_decoded(tmp_path, torch.float32).state_dict()
    assert ours.keys() == theirs.keys()
    for key, tensor in ours.items():
        assert torch.equal(tensor, theirs[key]), key


MOE = {**SIZES, "moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2}


@pytest.fixture(scope="module")
def moe_release(tmp_path_factory) -> Path:
    """A Qwen3-MoE saved as an FP8 MoE release (Qwen3-30B-A3B-FP8's layout): transformers writes its experts one tensor
    per expert, and each expert's ``gate_proj`` / ``up_proj`` / ``down_proj`` is stored as FP8 with its scales."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen3MoeConfig(**MOE))
    path = tmp_path_factory.mktemp("qwen3_moe_fp8") / "model"
    model.save_pretrained(path)
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
        file.unlink()
    for index in path.glob(INDEX):
        index.unlink()
    stored = {}
    for key, tensor in tensors.items():
        if key.endswith("proj.weight"):
            stored[key], stored[key.replace(".weight", ".weight_scale_inv")] = _encoded(tensor)
        else:
            stored[key] = tensor.to(torch.bfloat16).contiguous()
    assert "model.layers.0.mlp.experts.3.down_proj.weight_scale_inv" in stored
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "quantization_config": QUANTIZATION}))
    save_file(stored, path / "model.safetensors", metadata={"format": "pt"})
    return path


def test_fp8_experts_stored_per_expert_decode_as_transformers_does(moe_release):
    """Each expert's FP8 parts are decoded with their scales and stacked into the 3-D experts parameters: bit-equal to
    transformers' decode in bf16, and equal to ``quantize_model`` of it with the experts in NF4
    (:class:`~lowmem_lightning.quant.Experts4bit`)."""
    from lowmem_lightning.quant import Experts4bit

    theirs = _transformers_decoded(moe_release, torch.bfloat16)
    dense = load_pretrained_causal_lm(moe_release, quantize=None, torch_dtype=torch.bfloat16).state_dict()
    for key, tensor in theirs.state_dict().items():
        assert torch.equal(dense[key], tensor), key
    ours = load_pretrained_causal_lm(moe_release, torch_dtype=torch.bfloat16)
    assert sum(isinstance(m, Experts4bit) for m in ours.modules()) == MOE["num_hidden_layers"]
    expected = quantize_model(theirs, skip=("lm_head",)).state_dict()
    mine = ours.state_dict()
    assert mine.keys() == expected.keys()
    for key, tensor in mine.items():
        assert torch.equal(tensor, expected[key]), key


def test_an_fp8_expert_without_its_scales_is_refused_naming_it(moe_release, tmp_path):
    path = Path(shutil.copytree(moe_release, tmp_path / "model"))
    part = "model.layers.1.mlp.experts.2.up_proj.weight"
    rewrite_shard(path, "model.safetensors", lambda tensors: tensors.pop(f"{part}_scale_inv"))
    with pytest.raises(ModelFileError, match=rf"holds '{part}' in FP8 but no '{part}_scale_inv'"):
        load_pretrained_causal_lm(path)


DOWN = "model.layers.1.mlp.down_proj.weight"


def test_a_nan_scale_is_refused_naming_the_tensor(release):
    def nan_scale(tensors):
        tensors[f"{DOWN}_scale_inv"][1, 2] = float("nan")

    rewrite_shard(release, SCALES_SHARD, nan_scale)
    with pytest.raises(NonFiniteCheckpointError) as info:
        load_pretrained_causal_lm(release)
    text = str(info.value)
    for needle in (DOWN, CODES_SHARD, "decoded from FP8", "1024 nan"):
        assert needle in text, (needle, text)


@pytest.mark.parametrize("damage, needles", [
    (lambda t: t.pop(f"{DOWN}_scale_inv"), (f"holds {DOWN!r} in FP8 but no {DOWN + '_scale_inv'!r}",)),
    (lambda t: t.__setitem__(f"{DOWN}_scale_inv", t[f"{DOWN}_scale_inv"][:, :2]),
     (f"{DOWN}_scale_inv", "(2, 2)", "are (2, 4)")),
])
def test_a_bad_fp8_scale_is_refused_before_any_weight_is_read(release, damage, needles):
    rewrite_shard(release, SCALES_SHARD, damage)
    with pytest.raises(ModelFileError) as info:
        load_pretrained_causal_lm(release)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


@pytest.mark.gpu
def test_on_cuda_the_release_loads_to_the_same_tensors_as_on_the_cpu(fp8_release, moe_release):
    """The loader on CUDA (each FP8 weight decoded on the device, quantized by the Triton kernel): every tensor equals
    the CPU load's, dense and MoE, and the decode itself equals the CPU decode bit for bit."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    for release in (fp8_release, moe_release):
        cpu = load_pretrained_causal_lm(release).state_dict()
        cuda = load_pretrained_causal_lm(release, device="cuda").state_dict()
        assert cpu.keys() == cuda.keys()
        for key, tensor in cpu.items():
            assert torch.equal(cuda[key].cpu(), tensor), key
    gen = torch.Generator().manual_seed(2)
    codes = (torch.randn(300, 200, generator=gen) * 50).to(torch.float8_e4m3fn)
    scales = torch.rand(3, 2, generator=gen)
    for dtype in (torch.bfloat16, torch.float32):
        on_cuda = decode_fp8(codes.cuda(), scales.cuda(), (128, 128), dtype).cpu()
        assert torch.equal(on_cuda, decode_fp8(codes, scales, (128, 128), dtype))
