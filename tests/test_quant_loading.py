"""Shard-by-shard loading of a Hugging Face checkpoint with NF4 quantization on the fly."""

import json
import weakref

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import lowmem_lightning.quant.loading as loading
from lowmem_lightning.quant import Linear4bit, load_pretrained_causal_lm, quantize_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny bf16 Llama (linear weights dominate) saved in several safetensors shards."""
    config = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path, max_shard_size="100KB")
    return path


def _ids():
    return torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))


def test_checkpoint_has_several_shards(checkpoint):
    files = loading.checkpoint_files(checkpoint)
    assert len(files) >= 3
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    assert {f.name for f in files} == set(index["weight_map"].values())


def test_sharded_nf4_load_equals_quantize_model_of_the_full_model(checkpoint):
    loaded = load_pretrained_causal_lm(checkpoint)
    full = quantize_model(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16))
    assert isinstance(loaded.model.layers[2].mlp.down_proj, Linear4bit)
    assert type(loaded.lm_head) is torch.nn.Linear  # skipped
    a, b = loaded.state_dict(), full.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert torch.equal(loaded.model.rotary_emb.inv_freq, full.model.rotary_emb.inv_freq)
    with torch.no_grad():
        assert torch.equal(loaded(_ids()).logits, full.eval()(_ids()).logits)


def test_full_precision_tensors_are_released_as_soon_as_they_are_quantized(checkpoint, monkeypatch):
    """Track every tensor read from the shards: at any time, the full-precision bytes still alive must
    be the unquantized tensors kept in the model plus one tensor, far below the whole checkpoint."""
    live: list[weakref.ref] = []
    sizes: dict[int, int] = {}
    peak = {"bytes": 0}
    real_safe_open = loading.safe_open

    class TrackingShard:
        def __init__(self, *args, **kwargs):
            self._shard = real_safe_open(*args, **kwargs)

        def __enter__(self):
            self._inner = self._shard.__enter__()
            return self

        def __exit__(self, *exc):
            return self._shard.__exit__(*exc)

        def keys(self):
            return self._inner.keys()

        def get_slice(self, key):
            return self._inner.get_slice(key)

        def get_tensor(self, key):
            tensor = self._inner.get_tensor(key)
            ref = weakref.ref(tensor)
            sizes[id(ref)] = tensor.numel() * tensor.element_size()
            live.append(ref)
            peak["bytes"] = max(peak["bytes"], sum(sizes[id(r)] for r in live if r() is not None))
            return tensor

    monkeypatch.setattr(loading, "safe_open", TrackingShard)
    model = load_pretrained_causal_lm(checkpoint)
    total = sum(sizes.values())
    kept = sum(
        p.numel() * p.element_size() for name, p in model.named_parameters() if "layers" not in name or "norm" in name
    )
    largest = max(sizes.values())
    assert sum(sizes[id(r)] for r in live if r() is not None) <= kept  # only unquantized tensors survive
    assert peak["bytes"] <= kept + largest
    assert kept + largest < 0.5 * total  # so the check above is far from "the whole bf16 model"
    four_bit = sum(m.nbytes for m in model.modules() if isinstance(m, Linear4bit))
    linear_bf16 = sum(2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, Linear4bit))
    assert four_bit / linear_bf16 < 0.26  # 4-bit storage is ~1/4 of bf16


def test_full_precision_load_and_single_file_checkpoint(checkpoint, tmp_path):
    loaded = load_pretrained_causal_lm(checkpoint, quantize=None, torch_dtype="float32")
    full = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    a, b = loaded.state_dict(), full.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full.save_pretrained(tmp_path)  # one file, no index
    single = load_pretrained_causal_lm(tmp_path, skip=("lm_head", "down_proj"), double_quant=False)
    assert type(single.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert single.model.layers[0].mlp.up_proj.double_quant is False


def test_bad_arguments_are_rejected(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_pretrained_causal_lm(tmp_path)
    with pytest.raises(ValueError, match="quantize='int8'"):
        load_pretrained_causal_lm(checkpoint, quantize="int8")
    with pytest.raises(ValueError, match="torch_dtype"):
        load_pretrained_causal_lm(checkpoint, torch_dtype="int8")
    with pytest.raises(ValueError, match="block_size"):
        load_pretrained_causal_lm(checkpoint, block_size=63)
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    with pytest.raises(ValueError, match="safetensors"):
        load_pretrained_causal_lm(tmp_path)


def test_base_model_checkpoint_tied_embeddings_obsolete_and_unknown_tensors(tmp_path):
    config = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=32, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    config.save_pretrained(tmp_path)
    # a base-model checkpoint: no "model." prefix, no lm_head (tied)
    state = {k.removeprefix("model."): v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    state["layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # old checkpoints carry these
    state["unrelated.extra"] = torch.ones(3)
    from safetensors.torch import save_file

    save_file(state, tmp_path / "model.safetensors")
    with pytest.warns(UserWarning, match="unrelated.extra") as record:
        loaded = load_pretrained_causal_lm(tmp_path)
    assert not any("inv_freq" in str(w.message) for w in record)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    expected = quantize_model(AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16))
    with torch.no_grad():
        assert torch.equal(loaded(_ids()).logits, expected(_ids()).logits)


def test_random_causal_lm_builds_nf4_on_the_device_without_a_dense_copy():
    from transformers import LlamaConfig

    from lowmem_lightning.quant import Linear4bit, random_causal_lm

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64)
    model = random_causal_lm(config, "nf4", torch.bfloat16, seed=3)
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 14 and not isinstance(model.lm_head, Linear4bit)  # 7 projections x 2 layers
    tensors = list(model.state_dict().values())
    assert all(t.device.type == "cpu" for t in tensors)
    assert torch.equal(model.model.norm.weight, torch.ones(64, dtype=torch.bfloat16))
    assert 0.015 < model.model.embed_tokens.weight.float().std().item() < 0.025
    again = random_causal_lm(config, "nf4", torch.bfloat16, seed=3)
    assert torch.equal(layers[0].qweight, next(m for m in again.modules() if isinstance(m, Linear4bit)).qweight)
    batch = torch.randint(0, 256, (1, 8))
    assert torch.isfinite(model(input_ids=batch, labels=batch).loss)
    with pytest.raises(ValueError, match="quantize"):
        random_causal_lm(config, "int4")
