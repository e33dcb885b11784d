"""gpt-oss as the Hub holds it: experts stored in MXFP4 (``*_blocks`` / ``*_scales``, ``quant_method: mxfp4``).

The loader decodes each expert as it streams and stores it in NF4 (or the load dtype), so the QLoRA recipe trains
the Hub release directly, no bf16 copy written first. Checked against transformers' own decode
(``Mxfp4Config(dequantize=True)``): the decoded values are bit-equal in bf16, fp16 and fp32, the NF4 model equals
``quantize_model`` of transformers' load tensor for tensor, ``quantize: null`` loads the decoded experts on a CPU
(transformers' default would fetch GPU kernels from the Hub); a real ``lowmem fit --config qlora_7b.yaml`` and
``lowmem estimate`` run on it; a bad MXFP4 tensor (missing, of another dtype or shape, a NaN scale) is refused naming
it; other pre-quantized formats stay refused (``tests/test_bad_model_files.py``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from lowmem_calls import run_qlora_recipe
from quantized_releases import CODES_SHARD, SCALES_SHARD, rewrite_shard, write_release

from lowmem_lightning.quant import Experts4bit, Linear4bit, load_pretrained_causal_lm, quantize_model
from lowmem_lightning.quant.loading import ModelFileError, NonFiniteCheckpointError
from lowmem_lightning.quant.mxfp4 import FP4_E2M1_VALUES, decode_mxfp4

pytestmark = pytest.mark.usefixtures("one_thread")

transformers = pytest.importorskip("transformers")

SIZES = {"hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2,
         "vocab_size": 320, "max_position_embeddings": 256, "pad_token_id": 256, "bos_token_id": 257,
         "eos_token_id": 258, "sliding_window": 32}
QUANTIZATION = {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                           "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"}  # the Hub's


def _encoded(param: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random MXFP4 ``(blocks, scales)`` storing an ``(experts, in, out)`` parameter: every code, scales 2**-8..2**0."""
    experts, rows_in, out = param.shape
    blocks = torch.randint(0, 256, (experts, out, rows_in // 32, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(119, 128, (experts, out, rows_in // 32), dtype=torch.uint8, generator=gen)
    return blocks, scales


def _write_mxfp4(model, path: Path) -> None:
    """``model`` saved as gpt-oss's Hub release is: experts as MXFP4 blocks and scales, the rest in bf16."""
    gen = torch.Generator().manual_seed(1)

    def encode(key: str, tensor: torch.Tensor):
        if not key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            return None
        blocks, scales = _encoded(tensor, gen)
        return {f"{key}_blocks": blocks}, {f"{key}_scales": scales}

    write_release(model, path, QUANTIZATION, encode)


@pytest.fixture(scope="module")
def hub_release(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.GptOssConfig(**SIZES))
    path = tmp_path_factory.mktemp("gpt_oss") / "model"
    _write_mxfp4(model, path)
    return path


@pytest.fixture
def release(hub_release, tmp_path) -> Path:
    """A copy of the release for one test to damage."""
    return Path(shutil.copytree(hub_release, tmp_path / "model"))


def _transformers_decoded(path: Path, dtype: torch.dtype = torch.bfloat16):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path), quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_decode_is_transformers_decode_bit_for_bit(dtype):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 5, 4, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(0, 255, (3, 5, 4), dtype=torch.uint8, generator=gen)  # 2**-127..2**127: over/underflow
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # (experts, in, out)
    ours = torch.stack([decode_mxfp4(b, s, dtype).t() for b, s in zip(blocks, scales)])
    bits = torch.int32 if dtype == torch.float32 else torch.int16  # bit patterns: inf and nan compared too
    assert ours.dtype == dtype and torch.equal(ours.contiguous().view(bits), theirs.view(bits))
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))


def test_every_code_decodes_to_its_e2m1_value_times_its_scale():
    codes = torch.arange(256, dtype=torch.uint8).view(16, 1, 16)  # every byte: every pair of codes
    scales = torch.tensor([120, 127, 128, 133] * 4, dtype=torch.uint8).view(16, 1)
    values = decode_mxfp4(codes, scales, torch.float32)
    for row in range(16):
        for column in range(32):
            byte = int(codes[row, 0, column // 2])
            code = byte & 0x0F if column % 2 == 0 else byte >> 4
            expected = FP4_E2M1_VALUES[code] * 2.0 ** (int(scales[row, 0]) - 127)
            assert values[row, column].item() == expected


def test_nf4_load_equals_quantize_model_of_transformers_decoded_load(hub_release):
    ours = load_pretrained_causal_lm(hub_release)
    theirs = quantize_model(_transformers_decoded(hub_release), skip=("lm_head",))
    assert type(ours.model.layers[0].mlp.experts).__name__ == "GptOssExperts4bit"
    mine, reference = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == reference.keys()
    for key, tensor in reference.items():
        assert torch.equal(mine[key], tensor), key
    assert getattr(ours.config, "quantization_config", None) is None  # the weights are no longer MXFP4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_full_precision_load_holds_the_decoded_experts(hub_release, dtype):
    from lowmem_lightning.modules.causal_lm import build_causal_lm

    theirs = _transformers_decoded(hub_release, dtype)
    name = str(dtype).removeprefix("torch.")
    loaded = [load_pretrained_causal_lm(hub_release, quantize=None, torch_dtype=dtype),
              build_causal_lm(str(hub_release), None, None, None, torch_dtype=name)]  # transformers, dequantized
    for model in loaded:
        for layer, reference in zip(model.model.layers, theirs.model.layers):
            assert torch.equal(layer.mlp.experts.gate_up_proj, reference.mlp.experts.gate_up_proj)
            assert torch.equal(layer.mlp.experts.down_proj, reference.mlp.experts.down_proj)
        assert getattr(model.config, "quantization_config", None) is None


def test_lowmem_fit_and_estimate_with_the_qlora_recipe(hub_release, tmp_path):
    """The real commands on the release, tokenizer read from the model directory: the fit trains LoRA on the
    attention and saves the adapter; the estimate counts the experts in NF4 (what the loaded model holds)."""
    from test_field_architectures import _tokenizer

    model = tmp_path / "gpt-oss"
    shutil.copytree(hub_release, model)
    _tokenizer(model)
    proc = run_qlora_recipe(model, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    adapter = json.loads((tmp_path / "runs/qlora_7b/adapter/adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    estimate = run_qlora_recipe(model, tmp_path, "estimate", "--format", "json")
    assert estimate.returncode == 0, estimate.stderr[-3000:]
    counted = json.loads(estimate.stdout)["frozen_bytes_by_dtype"]["nf4"]
    loaded = load_pretrained_causal_lm(model)
    held = [module for module in loaded.modules() if isinstance(module, Linear4bit | Experts4bit)]
    assert any(isinstance(module, Experts4bit) for module in held)
    assert counted == sum(b.numel() * b.element_size() for module in held for b in module.buffers(recurse=False))


BLOCKS_SHARD = CODES_SHARD
DOWN = "model.layers.1.mlp.experts.down_proj"


def test_a_nan_scale_is_refused_naming_the_tensor(release):
    def nan_scale(tensors):
        tensors[f"{DOWN}_scales"][2, 5, 1] = 255  # the format's NaN

    rewrite_shard(release, SCALES_SHARD, nan_scale)
    with pytest.raises(NonFiniteCheckpointError) as info:
        load_pretrained_causal_lm(release)
    text = str(info.value)
    for needle in (DOWN, f"{DOWN}_blocks", BLOCKS_SHARD, "decoded from MXFP4", "a scale of 255"):
        assert needle in text, (needle, text)


@pytest.mark.parametrize("damage, needles", [
    (lambda t: t.pop(f"{DOWN}_scales"), ("no scales tensor", f"{DOWN}_blocks")),
    (lambda t: t.__setitem__(f"{DOWN}_scales", t[f"{DOWN}_scales"].to(torch.int16)), ("I16", "U8 (uint8)")),
    (lambda t: t.__setitem__(f"{DOWN}_scales", t[f"{DOWN}_scales"][:, :32]), ("(4, 32, 2)", "(4, 64, 2)")),
])
def test_a_bad_mxfp4_tensor_is_refused_before_any_weight_is_read(release, damage, needles):
    rewrite_shard(release, SCALES_SHARD, damage)
    with pytest.raises(ModelFileError) as info:
        load_pretrained_causal_lm(release)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


GPT_OSS_20B = {"num_hidden_layers": 24, "num_local_experts": 32, "num_experts_per_tok": 4, "hidden_size": 2880,
               "intermediate_size": 2880, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64,
               "vocab_size": 201088, "sliding_window": 128}  # openai/gpt-oss-20b's config.json


def test_the_readme_figure_of_gpt_oss_20b_frozen_weights(capsys, monkeypatch, tmp_path):
    """README: "frozen weights 12.5 GB" of gpt-oss-20b under the QLoRA recipe, from its config (as the Hub's, MXFP4
    declared) on the meta device."""
    from lowmem_calls import lowmem_in_process

    transformers.GptOssConfig(**GPT_OSS_20B).save_pretrained(tmp_path / "gpt-oss-20b")
    config = json.loads((tmp_path / "gpt-oss-20b/config.json").read_text())
    (tmp_path / "gpt-oss-20b/config.json").write_text(json.dumps({**config, "quantization_config": QUANTIZATION}))
    done = lowmem_in_process(capsys, monkeypatch, tmp_path, "estimate", "--config", "qlora_7b.yaml",
                             "--model.model_name_or_path", str(tmp_path / "gpt-oss-20b"), "--format", "json")
    assert done.returncode == 0, done.err
    assert round(json.loads(done.stdout)["frozen_bytes"] / 1e9, 1) == 12.5


@pytest.mark.gpu
def test_on_cuda_the_release_loads_to_the_same_tensors_as_on_the_cpu(hub_release):
    """The loader on CUDA (each expert decoded on the device, quantized by the Triton kernel): every tensor equals the
    CPU load's, and the decode itself equals the CPU decode bit for bit."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cpu = load_pretrained_causal_lm(hub_release).state_dict()
    cuda = load_pretrained_causal_lm(hub_release, device="cuda").state_dict()
    assert cpu.keys() == cuda.keys()
    for key, tensor in cpu.items():
        assert torch.equal(cuda[key].cpu(), tensor), key
    gen = torch.Generator().manual_seed(2)
    blocks = torch.randint(0, 256, (64, 8, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(0, 255, (64, 8), dtype=torch.uint8, generator=gen)
    for dtype in (torch.bfloat16, torch.float32):
        on_cuda = decode_mxfp4(blocks.cuda(), scales.cuda(), dtype).cpu()
        assert torch.equal(on_cuda.view(torch.uint8), decode_mxfp4(blocks, scales, dtype).view(torch.uint8))
