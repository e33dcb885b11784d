"""QLoRA on a model whose bulk is neither linear layers nor experts of transformers' experts interface: Llama 4 holds
its MoE experts as 3-D parameters of its own class (``feed_forward.experts.gate_up_proj``), which NF4 leaves in bf16.
gpt-oss did until its experts got NF4 (``Experts4bit``: 98% of gpt-oss-120b's weights, 229 GB, had stayed bf16
with nothing said). One warning names the share, the bytes and the largest tensors, from ``quantize_model``, from
the shard loader before any tensor is read, and so in ``lowmem estimate`` and ``lowmem fit``. A dense model, and
gpt-oss now, say nothing."""

from __future__ import annotations

import warnings

import torch
import transformers

from lowmem_lightning.lowmem_warning import LowMemWarning
from lowmem_lightning.quant import load_pretrained_causal_lm, loading, quantize_model
from lowmem_lightning.quant.convert import unquantized_matrices

SIZES = {"hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 320}


def _meta_model(config_class: str, **extra) -> torch.nn.Module:
    config = getattr(transformers, config_class)(**SIZES, **extra)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)


LLAMA4 = {"num_local_experts": 4, "intermediate_size_mlp": 64}


def _said(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, LowMemWarning) and "covers linear" in str(
        w.message)]


def test_quantizing_llama4_says_its_experts_stay_bf16():
    model = _meta_model("Llama4TextConfig", **LLAMA4)
    found, total = unquantized_matrices(model)
    experts = sum(p.numel() for name, p in found if ".experts." in name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize_model(model)
    said = _said(caught)
    assert len(said) == 1, said
    share = sum(p.numel() for _, p in unquantized_matrices(model)[0]) / unquantized_matrices(model)[1]
    assert experts > 0.5 * total and f"{share:.0%} of this llama4_text model's weights" in said[0]
    assert "experts.gate_up_proj" in said[0] and "bfloat16" in said[0] and " GB" in said[0]


def test_gpt_oss_experts_are_nf4_and_nothing_is_said():
    from lowmem_lightning.quant import Experts4bit

    model = _meta_model("GptOssConfig", num_local_experts=4, num_experts_per_tok=2)
    before = unquantized_matrices(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize_model(model)
    assert _said(caught) == []
    found, total = unquantized_matrices(model)
    assert total == before[1] and [name for name, _ in found] == [n for n, _ in before[0] if "experts" not in n]
    assert all(isinstance(layer.mlp.experts, Experts4bit) for layer in model.model.layers)


def test_a_dense_model_and_a_small_share_say_nothing():
    for model in (_meta_model("LlamaConfig"), _meta_model("Qwen3Config")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quantize_model(model)
        assert _said(caught) == []
        assert unquantized_matrices(model)[0] == []


def test_the_shard_loader_says_it_before_reading_a_tensor(tmp_path, monkeypatch):
    config = transformers.Llama4TextConfig(**SIZES, **LLAMA4)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    stream, seen = loading._stream, []

    def recorded(*args, **kwargs):
        seen.append(len(_said(caught)))
        return stream(*args, **kwargs)

    monkeypatch.setattr(loading, "_stream", recorded)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_pretrained_causal_lm(tmp_path, quantize="nf4")
    assert seen == [1] and len(_said(caught)) == 1
    assert model.model.layers[0].feed_forward.experts.gate_up_proj.dtype == torch.bfloat16


def test_without_nf4_nothing_is_said(tmp_path):
    config = transformers.Llama4TextConfig(**SIZES, **LLAMA4)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_pretrained_causal_lm(tmp_path, quantize=None)
    assert _said(caught) == []
