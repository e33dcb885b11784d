"""QLoRA on a model whose bulk is not in linear layers: gpt-oss holds its MoE experts as 3-D parameters
(``experts.gate_up_proj``, ``experts.down_proj``), which NF4 (linear layers only) leaves in bf16. A user asking for
4 bits got ~98% of gpt-oss-120b's weights in bf16 (229 GB) with nothing said; now one warning names the share, the
bytes and the largest tensors, from ``quantize_model``, from the shard loader before any tensor is read, and so in
``lowmem estimate`` and ``lowmem fit``. A dense model says nothing."""

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


def _said(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, LowMemWarning) and "covers linear" in str(
        w.message)]


def test_quantizing_gpt_oss_says_its_experts_stay_bf16():
    model = _meta_model("GptOssConfig", num_local_experts=4, num_experts_per_tok=2)
    found, total = unquantized_matrices(model)
    experts = sum(p.numel() for name, p in found if ".experts." in name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize_model(model)
    said = _said(caught)
    assert len(said) == 1, said
    share = sum(p.numel() for _, p in unquantized_matrices(model)[0]) / unquantized_matrices(model)[1]
    assert experts > 0.5 * total and f"{share:.0%} of this gpt_oss model's weights" in said[0]
    assert "experts.gate_up_proj" in said[0] and "bfloat16" in said[0] and " GB" in said[0]


def test_a_dense_model_and_a_small_share_say_nothing():
    for model in (_meta_model("LlamaConfig"), _meta_model("Qwen3Config")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quantize_model(model)
        assert _said(caught) == []
        assert unquantized_matrices(model)[0] == []


def test_the_shard_loader_says_it_before_reading_a_tensor(tmp_path, monkeypatch):
    config = transformers.GptOssConfig(**SIZES, num_local_experts=4, num_experts_per_tok=2)
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
    assert model.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16


def test_without_nf4_nothing_is_said(tmp_path):
    config = transformers.GptOssConfig(**SIZES, num_local_experts=4, num_experts_per_tok=2)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_pretrained_causal_lm(tmp_path, quantize=None)
    assert _said(caught) == []
