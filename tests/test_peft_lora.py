"""peft LoRA on Linear4bit: plain get_peft_model works with a per-config registration (no global patch),
adapters train, merge_and_unload gives dense
layers with the adapter model's outputs, save_pretrained writes the adapter."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lowmem_lightning.quant import (
    LLAMA_TARGET_MODULES,
    Linear4bit,
    LoraLinear4bit,
    add_lora,
    load_lora,
    quantize_model,
    register_peft_custom_module,
)

VOCAB = 64


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_llama(dtype=torch.float32, device=None):
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )
    with torch.device(device or "cpu"):
        model = LlamaForCausalLM(config)
    return quantize_model(model.to(dtype))


def _lora_params(model, r):
    return sum(r * (m.in_features + m.out_features) for m in model.modules() if isinstance(m, Linear4bit))


def _batch():
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))


def test_plain_get_peft_model_wraps_all_seven_projections():
    model = _tiny_llama()
    expected = _lora_params(model, 4)
    peft_model = get_peft_model(
        model, register_peft_custom_module(LoraConfig(r=4, lora_alpha=8, target_modules=list(LLAMA_TARGET_MODULES)))
    )
    wrapped = [m for m in peft_model.modules() if isinstance(m, LoraLinear4bit)]
    assert len(wrapped) == 2 * 7
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == expected
    assert all(p.dtype == torch.float32 for p in trainable.values())
    # a fresh adapter (B = 0) leaves the 4-bit model's output unchanged
    ids = _batch()
    with torch.no_grad():
        with peft_model.disable_adapter():
            base = peft_model(ids).logits
        assert torch.equal(peft_model(ids).logits, base)


def _train(peft_model, steps=8, lr=2e-2):
    ids = _batch()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = peft_model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_adapters_train_and_the_4bit_base_stays_frozen():
    peft_model = add_lora(_tiny_llama(), r=4, alpha=8)
    frozen = {k: v.clone() for k, v in peft_model.state_dict().items() if "lora_" not in k}
    losses = _train(peft_model)
    assert losses[-1] < losses[0] * 0.9
    state = peft_model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())


def test_merge_and_unload_returns_dense_layers_with_the_same_outputs():
    peft_model = add_lora(_tiny_llama(torch.bfloat16), r=4, alpha=8)
    _train(peft_model, steps=4)
    ids = _batch()
    lora_q = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    expected_q = (lora_q.base_layer.dequantize(torch.float32) + lora_q.get_delta_weight("default")).bfloat16()
    with torch.no_grad():
        adapted = peft_model(ids).logits.float()
        with peft_model.disable_adapter():
            base = peft_model(ids).logits.float()
        merged = peft_model.merge_and_unload()
        out = merged(ids).logits.float()
    assert not any(isinstance(m, (Linear4bit, LoraLinear4bit)) for m in merged.modules())
    q_proj = merged.model.layers[0].self_attn.q_proj
    assert type(q_proj) is nn.Linear and q_proj.weight.dtype == torch.bfloat16
    assert torch.equal(q_proj.weight, expected_q)  # dequantized base + B @ A * scale, rounded once to bf16
    # the merged model's outputs equal the adapter model's within bf16 rounding; the adapters' own effect
    # on the outputs is many times larger than that difference
    merge_error = (out - adapted).norm() / adapted.norm()
    assert merge_error < 1e-2
    assert (adapted - base).norm() / adapted.norm() > 5 * merge_error


def test_merge_is_exact_in_fp32_and_unmerge_restores_the_4bit_layer():
    peft_model = add_lora(_tiny_llama(), r=4, alpha=8)
    _train(peft_model, steps=3)
    layer = peft_model.base_model.model.model.layers[1].mlp.down_proj
    codes = layer.base_layer.qweight.clone()
    x = torch.randn(3, 128)
    with torch.no_grad():
        before = layer(x)
        layer.merge()
        assert type(layer.base_layer) is nn.Linear and layer.merged
        expected = layer.get_base_layer().weight
        assert torch.allclose(layer(x), before, atol=1e-5)
        layer.unmerge()
    assert isinstance(layer.base_layer, Linear4bit) and torch.equal(layer.base_layer.qweight, codes)
    assert expected.dtype == torch.float32


def test_save_pretrained_writes_the_adapter_and_it_reloads(tmp_path):
    base = _tiny_llama()
    peft_model = add_lora(copy.deepcopy(base), r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    _train(peft_model, steps=3)
    peft_model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "adapter_config.json").is_file()
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and all("lora_A" in k or "lora_B" in k for k in saved)
    reloaded = load_lora(base, tmp_path)
    assert isinstance(reloaded, PeftModel)
    ids = _batch()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, peft_model(ids).logits)


def test_bf16_adapters_when_asked_and_meta_models_count_parameters():
    peft_model = add_lora(_tiny_llama(torch.bfloat16), r=2, adapter_dtype=torch.bfloat16)
    assert {p.dtype for p in peft_model.parameters() if p.requires_grad} == {torch.bfloat16}
    assert peft_model(_batch()).logits.dtype == torch.bfloat16
    meta = _tiny_llama(torch.bfloat16, device="meta")
    expected = _lora_params(meta, 16)
    meta_peft = add_lora(meta, r=16, alpha=32)
    trainable = [p for p in meta_peft.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == expected
    assert all(p.device.type == "meta" for p in trainable)


def test_unsupported_options_and_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="alora_invocation_tokens"):
        get_peft_model(_tiny_llama(), register_peft_custom_module(
            LoraConfig(target_modules=["q_proj"], alora_invocation_tokens=[1, 2], task_type="CAUSAL_LM")))
    with pytest.raises(ValueError, match="r=0"):
        add_lora(_tiny_llama(), r=0)
    with pytest.raises(ValueError, match="dropout=1.5"):
        add_lora(_tiny_llama(), dropout=1.5)
    with pytest.raises(ValueError, match="target_modules"):
        add_lora(_tiny_llama(), target_modules="q_proj")
    with pytest.raises(ValueError, match="adapter_dtype"):
        add_lora(_tiny_llama(), adapter_dtype=torch.int8)


def _variant_settings() -> list[tuple[str, object]]:
    """(option, value) of each LoRA variant this peft has, built with its defaults (0.19: DoRA, aLoRA, BD-LoRA ...)."""
    from peft.tuners.lora import config as lora_config

    settings = [("alora_invocation_tokens", [1, 2])]  # DoRA is supported (tests/test_qdora.py)
    variants = (("use_bdlora", "BdLoraConfig", {}), ("velora_config", "VeloraConfig", {"num_groups": 4}),
                ("kasa_config", "KasaConfig", {}), ("monteclora_config", "MontecloraConfig", {}))
    for option, cls, kwargs in variants:
        if hasattr(lora_config, cls) and option in LoraConfig.__dataclass_fields__:
            settings.append((option, getattr(lora_config, cls)(**kwargs)))
    return settings


@pytest.mark.parametrize("option, value", _variant_settings(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_lora_variant_is_refused_on_4bit_layers_not_trained_as_plain_lora(option, value):
    """peft 0.21 and 0.22 added variants (BD-LoRA, KaSA, MonteCLoRA) that a 4-bit layer registered with
    ``register_peft_custom_module`` used to ignore without a word: it trained plain LoRA where the user asked for one of
    them. Each variant of the installed peft is now refused, naming the option."""
    config = LoraConfig(target_modules=["q_proj"], task_type="CAUSAL_LM", **{option: value})
    with pytest.raises(ValueError, match=rf"Invalid {option}=.* only plain LoRA and DoRA \(use_dora=True\) are"):
        get_peft_model(_tiny_llama(), register_peft_custom_module(config))


def test_import_and_load_patch_no_third_party_class(tmp_path):
    # importing the package and building a model on meta leave peft's and torch's classes as they were
    import lowmem_lightning  # noqa: F401
    import lowmem_lightning.quant  # noqa: F401
    from lowmem_lightning.quant.loading import _parameters_on_meta

    original_post_init = LoraConfig.__dict__["__post_init__"]
    original_register = nn.Module.__dict__["register_parameter"]
    assert getattr(original_post_init, "__module__", "").startswith("peft")
    assert original_register.__module__ == "torch.nn.modules.module"
    with _parameters_on_meta():
        layer = nn.Linear(3, 4)
        assert nn.Module.register_parameter is original_register
    assert layer.weight.device.type == "meta"
    assert nn.Linear(3, 4).weight.device.type == "cpu"  # the hook is gone after the block
    assert LoraConfig.__dict__["__post_init__"] is original_post_init
    assert nn.Module.__dict__["register_parameter"] is original_register
    assert LoraConfig(target_modules=["q_proj"])._custom_modules is None
