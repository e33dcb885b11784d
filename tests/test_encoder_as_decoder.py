"""Encoder families trained as causal LMs. transformers 5 builds ``RobertaForCausalLM`` (BERT, BigBird, RemBERT, ...)
from an encoder checkpoint's ``is_decoder: false`` with attention to later tokens too, and only logs that
``is_decoder=True`` should be added: next-token training would see the very token it predicts. Every builder of the
package sets the switch (:func:`~lowmem_lightning.multimodal.as_causal_decoder`)."""

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lowmem_lightning.modules.causal_lm import build_causal_lm
from lowmem_lightning.multimodal import as_causal_decoder
from lowmem_lightning.quant import load_pretrained_causal_lm

pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
        "vocab_size": 300}


def _benchmark():
    """``benchmarks/encoder_as_decoder.py``, whose ``later_token_effect`` the tests measure with."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "encoder_as_decoder.py"
    spec = importlib.util.spec_from_file_location("bench_encoder_as_decoder", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_sees_later_tokens = _benchmark().later_token_effect


@pytest.mark.parametrize("model_type", ["roberta", "bert", "megatron-bert", "rembert"])
def test_a_config_built_encoder_family_predicts_from_earlier_tokens_only(model_type):
    config = AutoConfig.for_model(model_type, **ARCH)
    torch.manual_seed(0)
    assert _sees_later_tokens(AutoModelForCausalLM.from_config(config)) > 1e-4  # transformers' own build
    model = build_causal_lm(config={"model_type": model_type, **ARCH}, device="cpu")
    assert model.config.is_decoder is True
    assert _sees_later_tokens(model) == 0.0


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_an_encoder_checkpoint_loads_as_a_causal_decoder(tmp_path, quantize):
    """A saved RoBERTa (``is_decoder: false`` in its config.json, as roberta-base's) loaded dense or in NF4."""
    config = AutoConfig.for_model("roberta", **ARCH)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    model = build_causal_lm(model_name_or_path=str(tmp_path), quantize=quantize, device="cpu",
                            lora={"r": 4, "target_modules": ["query", "value"]} if quantize else None)
    assert _sees_later_tokens(model) == 0.0
    assert _sees_later_tokens(load_pretrained_causal_lm(str(tmp_path), quantize="nf4")) == 0.0


def test_a_model_type_without_the_switch_is_left_as_it_is():
    config = AutoConfig.for_model("llama", **ARCH)
    assert as_causal_decoder(config) is config and not hasattr(config, "is_decoder")
