"""Bad model files name themselves (issue 25, deliverable 6).

A tiny Llama saved with ``save_pretrained`` (several safetensors shards and an index) is copied and
damaged one way per test: truncated, emptied, zeroed or replaced bytes, a foreign file, a missing or
garbled ``config.json`` or index, a shard listed but missing, and weights holding nan / +-inf. Each
load must raise one exception type (``ModelFileError``, a ``ValueError``) whose message names the file
(or the tensor, its non-finite count and its file), return no model, and refuse header-level problems
before any weight is quantized. ``quantize_model`` / ``Linear4bit.from_linear`` refuse non-finite
in-memory weights naming the tensor and leave the model unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import lowmem_lightning.quant.loading as loading
from lowmem_lightning.quant import Linear4bit, load_pretrained_causal_lm, quantize_model
from lowmem_lightning.quant.linear4bit import NonFiniteWeightError
from lowmem_lightning.quant.loading import ModelFileError, NonFiniteCheckpointError

INDEX = "model.safetensors.index.json"
DOWN = "model.layers.1.mlp.down_proj.weight"


def _config(**overrides) -> LlamaConfig:
    settings = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=32)
    return LlamaConfig(**{**settings, **overrides})


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A tiny bf16 Llama in several shards plus the index, as save_pretrained writes it."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pristine")
    LlamaForCausalLM(_config()).to(torch.bfloat16).save_pretrained(path, max_shard_size="60KB")
    assert len(json.loads((path / INDEX).read_text())["weight_map"]) > 0
    return path


@pytest.fixture
def ckpt(pristine, tmp_path) -> Path:
    """A fresh copy of the pristine checkpoint for one test to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "model"))


@pytest.fixture
def quantized(monkeypatch) -> list[str]:
    """Records every ``Linear4bit.quantize_weight_`` call (to show refusals come before any quantization)."""
    calls: list[str] = []
    real = Linear4bit.quantize_weight_

    def spy(self, weight):
        calls.append(tuple(weight.shape))
        return real(self, weight)

    monkeypatch.setattr(Linear4bit, "quantize_weight_", spy)
    return calls


def _load(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``file``, copied (safetensors maps the file: rewriting it under a live map crashes)."""
    return {key: tensor.clone() for key, tensor in load_file(file).items()}


def _shard_of(path: Path, key: str) -> Path:
    return path / json.loads((path / INDEX).read_text())["weight_map"][key]


def _refused(path: Path, *needles: str, error=ModelFileError, **kwargs) -> ModelFileError:
    """Load ``path``; it must raise ``error`` (a ModelFileError) whose message holds every needle."""
    with pytest.raises(error) as info:
        load_pretrained_causal_lm(path, **kwargs)
    assert isinstance(info.value, ValueError)  # the CLI turns it into exit code 2
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))
    return info.value


def test_pristine_copy_loads(ckpt, quantized):
    model = load_pretrained_causal_lm(ckpt)
    assert isinstance(model.model.layers[1].mlp.down_proj, Linear4bit)
    assert len(quantized) == 14  # 7 projections x 2 layers


# ------------------------------------------------------------------ safetensors files


@pytest.mark.parametrize("damage, needle", [
    (lambda data: b"", "is empty (0 bytes)"),
    (lambda data: data[:-100], "is truncated: its header describes"),
    (lambda data: data[:40], "is not a safetensors file or is cut short"),
    (lambda data: data[:5], "has 5 bytes, too few"),
    (lambda data: data + b"\0" * 16, "has 16 bytes after the tensor data"),
    (lambda data: bytes(len(data)), "announce a 0-byte header"),
    (lambda data: data[:8] + b"#" * (len(data) - 8), "its header is not safetensors JSON"),
    (lambda data: os.urandom(len(data)), "is not a safetensors file"),
], ids=["empty", "truncated", "cut-in-header", "five-bytes", "trailing-bytes", "zeroed", "garbled-header", "random"])
def test_damaged_shard_names_the_file_before_any_quantization(ckpt, quantized, damage, needle):
    shard = _shard_of(ckpt, DOWN)
    shard.write_bytes(damage(shard.read_bytes()))
    err = _refused(ckpt, str(shard), needle)
    assert err.path == str(shard)
    assert quantized == []  # headers are all checked before any tensor is read


def test_damaged_last_shard_is_refused_before_the_first_is_quantized(ckpt, quantized):
    shards = loading.checkpoint_files(ckpt)
    assert len(shards) >= 3
    shards[-1].write_bytes(shards[-1].read_bytes()[:-1])
    _refused(ckpt, shards[-1].name, "is truncated", "(1 missing)")
    assert quantized == []


def test_pickle_file_in_place_of_a_shard_is_not_safetensors(ckpt, quantized):
    shard = _shard_of(ckpt, DOWN)
    torch.save(_load(shard), shard)  # a torch.save zip under the safetensors name
    _refused(ckpt, str(shard), "not a safetensors file")
    assert quantized == []


def test_foreign_safetensors_of_another_shape_names_file_and_tensor(tmp_path, pristine, quantized):
    """A valid safetensors of a wider model under this config.json: refused on the first wrong shape."""
    path = Path(shutil.copytree(pristine, tmp_path / "model"))
    for shard in loading.checkpoint_files(path):
        shard.unlink()
    (path / INDEX).unlink()
    LlamaForCausalLM(_config(hidden_size=128)).to(torch.bfloat16).save_pretrained(tmp_path / "wide")
    shutil.copy(tmp_path / "wide" / "model.safetensors", path / "model.safetensors")
    _refused(path, str(path / "model.safetensors"), "with shape", "(96, 128)", "describes needs (96, 64)")
    assert quantized == []


def test_foreign_safetensors_without_the_model_tensors_is_refused_up_front(ckpt, quantized):
    for shard in loading.checkpoint_files(ckpt):
        shard.unlink()
    (ckpt / INDEX).unlink()
    save_file({"transformer.h.0.attn.c_attn.weight": torch.ones(4, 4)}, ckpt / "model.safetensors")
    err = _refused(ckpt, f"Model file {ckpt / 'model.safetensors'} lacks", "tensors the model of config.json needs",
                   "model.embed_tokens.weight", "holds 1 tensors, 1 of them unused", "transformer.h.0.attn.c_attn")
    assert err.path == str(ckpt / "model.safetensors") and quantized == []


def test_integer_tensor_where_a_weight_belongs_is_refused(ckpt, quantized):
    shard = _shard_of(ckpt, DOWN)
    tensors = _load(shard)
    tensors[DOWN] = torch.zeros(tensors[DOWN].shape, dtype=torch.int32)
    save_file(tensors, shard, metadata={"format": "pt"})
    _refused(ckpt, str(shard), DOWN, "as I32")
    assert quantized == []


# ------------------------------------------------------------------ index and shards


def test_shard_listed_in_the_index_but_missing(ckpt, quantized):
    shard = _shard_of(ckpt, DOWN)
    shard.unlink()
    err = _refused(ckpt, f"Shard {shard} does not exist", f"{INDEX} lists it for")
    assert err.path == str(shard) and quantized == []


def test_shard_that_lacks_a_tensor_the_index_maps_to_it(ckpt, quantized):
    shard = _shard_of(ckpt, DOWN)
    tensors = _load(shard)
    del tensors[DOWN]
    save_file(tensors, shard, metadata={"format": "pt"})
    _refused(ckpt, f"Shard {shard} does not hold {DOWN!r}", f"which {INDEX} maps to it")
    assert quantized == []


@pytest.mark.parametrize("text, needle", [
    ("", "is empty"),
    ('{"metadata": {}, "weight_map": {"a": ', "is not valid JSON (Expecting value: line 1"),
    ('{"metadata": {}}', "has no 'weight_map'"),
    ('["model-00001-of-00003.safetensors"]', "holds a JSON list"),
    ('{"weight_map": {"model.norm.weight": "../elsewhere.safetensors"}}', "lists shards outside its directory"),
], ids=["empty", "garbled", "no-weight-map", "a-list", "escaping"])
def test_bad_index_names_the_index(ckpt, quantized, text, needle):
    (ckpt / INDEX).write_text(text)
    err = _refused(ckpt, str(ckpt / INDEX), needle)
    assert err.path == str(ckpt / INDEX) and quantized == []


def test_shards_without_index_and_pickle_only_directories(ckpt):
    (ckpt / INDEX).unlink()
    _refused(ckpt, f"Model directory {ckpt}", ".safetensors files", f"neither {INDEX}")
    for shard in ckpt.glob("*.safetensors"):
        shard.unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"PK")
    _refused(ckpt, "pickle weights", "pytorch_model.bin", "safe_serialization=True")


# ------------------------------------------------------------------ config.json and the directory


@pytest.mark.parametrize("text, needle", [
    (None, "config.json does not exist"),
    ("", "config.json is empty"),
    ('{"model_type": "llama", "hidden_size": 6', "config.json is not valid JSON"),
    ('{"hidden_size": 64}', "config.json cannot be read by transformers (ValueError: Unrecognized model"),
    ('{"model_type": "no_such_model"}', "config.json names model_type 'no_such_model', which transformers"),
    ('{"model_type": "llama", "hidden_size": 64, "num_attention_heads": 5, "vocab_size": 96}',
     "not a multiple of the number of attention heads (5)"),
    ('{"model_type": "clip_vision_model"}', "config.json describes a model transformers cannot build as a causal LM"),
], ids=["missing", "empty", "garbled", "no-model-type", "unknown-model-type", "inconsistent", "not-a-causal-lm"])
def test_bad_config_json_names_it(ckpt, quantized, text, needle):
    config = ckpt / "config.json"
    if text is None:
        config.unlink()
    else:
        config.write_text(text)
    err = _refused(ckpt, needle)
    assert err.path == str(config) and quantized == []
    assert len(str(err)) < 600  # transformers' list of every model type is not repeated


@pytest.mark.parametrize("quantization, method", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, "bitsandbytes"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128}, "awq"),  # MXFP4 and FP8 are read: test_mxfp4_*, test_fp8_*
    ({"quant_method": "gptq", "bits": 4}, "gptq"),
])
@pytest.mark.parametrize("quantize", ["nf4", None])
def test_a_checkpoint_stored_already_quantized_is_named_as_such(ckpt, quantized, quantization, method, quantize):
    """A config.json with a ``quantization_config`` (a 4-bit Hub upload, AWQ, GPTQ): refused naming it
    and its method before any tensor is read (before: "lacks N tensors ... a checkpoint of another model")."""
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "quantization_config": quantization}))
    err = _refused(ckpt, "declares a checkpoint stored already quantized", f"quant_method={method!r}",
                   "full-precision release", quantize=quantize)
    assert err.path == str(ckpt / "config.json") and quantized == []
    with pytest.raises(ModelFileError, match="stored already quantized"):
        loading.check_pretrained_checkpoint(ckpt)  # lowmem estimate refuses it as fit does


def test_config_of_another_size_is_refused_on_the_first_shape(ckpt, quantized):
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "intermediate_size": 192}))
    _refused(ckpt, "with shape", "describes needs", ".mlp.")
    assert quantized == []


def test_missing_directory_and_garbled_generation_config(ckpt, tmp_path):
    _refused(tmp_path / "nowhere", "Model directory", "does not exist")
    with pytest.raises(ModelFileError, match="is not a directory"):
        loading.checkpoint_files(ckpt / "config.json")
    (ckpt / "generation_config.json").write_text("{oops")
    _refused(ckpt, str(ckpt / "generation_config.json"))


# ------------------------------------------------------------------ non-finite weights


@pytest.mark.parametrize("value, kind", [(float("nan"), "1 nan"), (float("inf"), "1 +inf"), (-float("inf"), "1 -inf")])
def test_one_nonfinite_element_in_a_quantized_weight_is_named(ckpt, value, kind):
    shard = _shard_of(ckpt, DOWN)
    tensors = _load(shard)
    tensors[DOWN][5, 7] = value
    save_file(tensors, shard, metadata={"format": "pt"})
    err = _refused(ckpt, DOWN, f"in {shard.name}", f"1 non-finite element ({kind}) of {64 * 128}",
                   error=NonFiniteCheckpointError)
    assert isinstance(err, NonFiniteWeightError) and err.counts == {DOWN: 1} and err.path == str(shard)


@pytest.mark.parametrize("quantize", ["nf4", None])
def test_nonfinite_dense_weights_are_refused_too(ckpt, quantize):
    """Norms and embeddings stay dense, and a nan there is as fatal: every floating tensor is checked."""
    norm, embed = "model.norm.weight", "model.embed_tokens.weight"
    for key, count in ((norm, 1), (embed, 3)):
        shard = _shard_of(ckpt, key)
        tensors = _load(shard)
        tensors[key].view(-1)[:count] = float("nan")
        save_file(tensors, shard, metadata={"format": "pt"})
    err = _refused(ckpt, norm, embed, "in 2 tensors", "1 non-finite element (1 nan) of 64",
                   "3 non-finite elements (3 nan)", quantize=quantize, error=NonFiniteCheckpointError)
    assert err.counts == {norm: 1, embed: 3}


def test_finite_values_that_overflow_the_load_dtype_are_named(tmp_path):
    model = LlamaForCausalLM(_config(num_hidden_layers=1))
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, :2] = 1e6  # finite in float32, inf in float16
    model.save_pretrained(tmp_path)
    key = "model.layers.0.mlp.up_proj.weight"
    err = _refused(tmp_path, key, "2 non-finite elements (2 +inf)", "after conversion from torch.float32 to "
                   "torch.float16", torch_dtype="float16", error=NonFiniteCheckpointError)
    assert err.counts == {key: 2}
    assert load_pretrained_causal_lm(tmp_path, torch_dtype="bfloat16") is not None  # fits bfloat16


def test_nonfinite_flags_are_read_with_one_sync_after_the_last_shard(ckpt, monkeypatch):
    shard = _shard_of(ckpt, DOWN)
    tensors = _load(shard)
    tensors[DOWN][0, 0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    reads: list[int] = []
    real = loading._flagged
    monkeypatch.setattr(loading, "_flagged", lambda flags: reads.append(len(flags)) or real(flags))
    _refused(ckpt, DOWN, error=NonFiniteCheckpointError)
    floating = sum(len(_load(f)) for f in loading.checkpoint_files(ckpt))
    assert reads == [floating]  # one read of all flags, one flag per tensor


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nonfinite_flag_sees_any_position_dtype_and_layout(dtype):
    from lowmem_lightning.quant.linear4bit import _nonfinite_flag

    for n in (1, 63, 4097):
        for pos in (0, n // 2, n - 1):
            for value in (float("nan"), float("inf"), -float("inf")):
                t = torch.randn(n).to(dtype)
                t[pos] = value
                assert bool(_nonfinite_flag(t)), (n, pos, value)
        assert not bool(_nonfinite_flag(torch.randn(n).to(dtype) * 1e4))
    strided = torch.randn(50, 70).to(dtype).t()
    strided[3, 4] = float("nan")
    assert bool(_nonfinite_flag(strided)) and _nonfinite_flag(strided).shape == ()
    assert not bool(_nonfinite_flag(torch.empty(0, 5, dtype=dtype)))
    assert not bool(_nonfinite_flag(torch.tensor([2**31 - 1], dtype=torch.int32)))  # only floats can be nan


def test_what_the_check_prevents(ckpt):
    """Without the check one nan decodes to nan across the whole weight (double quantization)."""
    layer = Linear4bit._quantized_copy(torch.nn.Linear(128, 64, bias=False), 64, True, None)
    weight = torch.randn(64, 128, dtype=torch.bfloat16)
    weight[3, 3] = float("nan")
    layer.quantize_weight_(weight)
    assert (~torch.isfinite(layer.dequantize(torch.float32))).sum() >= 64


# ------------------------------------------------------------------ in-memory models


def test_quantize_model_refuses_nonfinite_weights_and_leaves_the_model_unchanged():
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config())
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[2, 2] = float("inf")
        model.model.layers[0].self_attn.q_proj.weight[0, :4] = float("nan")
        model.lm_head.weight[0, 0] = float("nan")  # skipped: kept dense, not quantized, not checked here
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteWeightError) as info:
        quantize_model(model)
    text = str(info.value)
    assert "quantize_model refused 2 tensors" in text and "Nothing was changed" in text
    assert f"{DOWN}: 1 non-finite element (1 +inf) of 8192" in text
    assert "model.layers.0.self_attn.q_proj.weight: 4 non-finite elements (4 nan) of 4096" in text
    assert info.value.counts == {DOWN: 1, "model.layers.0.self_attn.q_proj.weight": 4}
    assert not any(isinstance(m, Linear4bit) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(
        torch.allclose(after[k], before[k], rtol=0, atol=0, equal_nan=True) for k in before
    )


def test_from_linear_refuses_a_nonfinite_weight_or_bias():
    linear = torch.nn.Linear(128, 32)
    with torch.no_grad():
        linear.bias[1] = -float("inf")
    with pytest.raises(NonFiniteWeightError, match=r"linear.bias: 1 non-finite element \(1 -inf\) of 32"):
        Linear4bit.from_linear(linear)
    meta = Linear4bit.from_linear(torch.nn.Linear(128, 32, device="meta"))  # shapes only: nothing to check
    assert meta.qweight.is_meta


def test_quantize_model_keeps_finite_models_working():
    torch.manual_seed(0)
    model = quantize_model(LlamaForCausalLM(_config()))
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 14


# ------------------------------------------------------------------ CLI


@pytest.mark.slow
def test_cli_fit_on_a_bad_checkpoint_is_exit_2_naming_the_tensor(tmp_path):
    """``lowmem fit`` with a checkpoint holding a nan: exit 2, one message naming tensor and file."""
    torch.manual_seed(0)
    path = tmp_path / "model"
    LlamaForCausalLM(_config(vocab_size=260)).to(torch.bfloat16).save_pretrained(path)
    tensors = _load(path / "model.safetensors")
    tensors[DOWN][1, 1] = float("nan")
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    work = tmp_path / "run"
    work.mkdir()
    args = ["fit", "--config", "tiny.yaml", "--model.init_args.config", "null", "--model.init_args.model_name_or_path",
            str(path), "--model.init_args.quantize", "nf4", "--model.init_args.lora", '{"r": 4}',
            "--trainer.max_steps", "1"]
    proc = subprocess.run([sys.executable, "-m", "lowmem_lightning.cli", *args], cwd=work, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and DOWN in errors[0] and "model.safetensors" in errors[0], proc.stderr[-3000:]
