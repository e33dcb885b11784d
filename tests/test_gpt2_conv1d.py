"""GPT-2's linear layers are transformers ``Conv1D`` (``y = x @ W + b``, ``W`` stored (in, out)), not ``nn.Linear``.

Before: QLoRA on a GPT-2 checkpoint quantized none of them (the base stayed bf16, silently: the memory promise
gone), the recipe's target names were refused with "its linear layers are (none)" and ``all-linear`` failed inside
peft. Now every ``Conv1D`` becomes an NF4 :class:`Linear4bit` (``conv1d=True``) by ``quantize_model`` and by the
shard-by-shard loader alike (the checkpoint's (in, out) weight transposed on the way in), LoRA lands on them, and
the merged export (:func:`dequantize_model`) writes ``Conv1D`` weights back, loadable by
``AutoModelForCausalLM.from_pretrained``. Also checked: a merged export whose adapters sit on some layers only
(LoRA on ``q_proj`` alone) is a whole dense model (the other layers were written as NF4 buffers that
``from_pretrained`` dropped, loading random weights in their place)."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from lowmem_lightning.data import TextDataModule
from lowmem_lightning.modules.causal_lm import CausalLMModule
from lowmem_lightning.quant import (
    Linear4bit,
    dequantize_model,
    load_pretrained_causal_lm,
    quantize_model,
    resolve_target_modules,
)

CONV1D_NAMES = {"c_attn", "c_proj", "c_fc"}


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=300, bos_token_id=0,
                        eos_token_id=0)
    path = tmp_path_factory.mktemp("gpt2") / "model"
    GPT2LMHeadModel(config).save_pretrained(path, max_shard_size="100KB")
    return path


def _ids() -> torch.Tensor:
    return torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(1))


def _layers(model) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules() if name.rpartition(".")[2] in CONV1D_NAMES}


def test_quantize_model_makes_every_conv1d_nf4_and_dequantize_gives_conv1d_back(gpt2_dir):
    dense = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    quantized = quantize_model(copy.deepcopy(dense))
    layers = _layers(quantized)
    assert len(layers) == 8 and all(isinstance(m, Linear4bit) and m.conv1d for m in layers.values())
    before = _layers(dense)["transformer.h.0.attn.c_attn"]
    after = layers["transformer.h.0.attn.c_attn"]
    assert (after.in_features, after.out_features) == tuple(before.weight.shape) == (64, 192)
    error = (after.dequantize(torch.float32).t() - before.weight).abs().max() / before.weight.abs().max()
    assert error < 0.2  # NF4: ~3 bits of a block's range; a transposed weight would be far off
    ids = _ids()
    with torch.no_grad():
        logits_4bit = quantized(ids).logits
        back = dequantize_model(quantized)
        assert all(type(m) is Conv1D for m in _layers(back).values())
        assert torch.equal(back(ids).logits, logits_4bit)  # the same weights, in Conv1D's layout
        assert (back(ids).logits - dense(ids).logits).abs().max() < 0.5


def test_the_shard_loader_quantizes_conv1d_as_quantize_model_does(gpt2_dir):
    streamed = load_pretrained_causal_lm(str(gpt2_dir), quantize="nf4", torch_dtype=torch.float32, skip=("lm_head",))
    whole = quantize_model(AutoModelForCausalLM.from_pretrained(gpt2_dir))
    for name, layer in _layers(streamed).items():
        assert isinstance(layer, Linear4bit) and layer.conv1d, name
        assert torch.equal(layer.qweight, _layers(whole)[name].qweight), name
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, whole(ids).logits)


def test_the_recipes_lora_targets_name_gpt2s_conv1d_layers(gpt2_dir):
    model = quantize_model(AutoModelForCausalLM.from_pretrained(gpt2_dir))
    assert sorted(resolve_target_modules(model, "all-linear")) == sorted(CONV1D_NAMES)
    dense = AutoModelForCausalLM.from_pretrained(gpt2_dir)  # LoRA without NF4: peft's Conv1D layer
    with pytest.warns(UserWarning, match="taken as all of its linear layers"):
        targets = resolve_target_modules(dense, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"])
    assert sorted(targets) == sorted(CONV1D_NAMES)


def _fit(module, tmp_path, steps=3):
    data = TextDataModule("sample", seq_len=32, batch_size=2, val_fraction=0.02, seed=0, pack=False)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(module, data)
    return trainer


@pytest.mark.parametrize("quantize", ["nf4", None])
def test_lora_on_gpt2_trains_and_the_merged_export_loads_as_gpt2(gpt2_dir, tmp_path, quantize):
    lora = {"r": 4, "alpha": 8, "target_modules": "all-linear"}
    module = CausalLMModule(model_name_or_path=str(gpt2_dir), quantize=quantize, lora=lora, optimizer="adamw",
                            lr=1e-2, save_dir=str(tmp_path / "merged"), save_merged=True)
    _fit(module, tmp_path)
    layers = _layers(module.model)
    assert layers and all(type(m) is Conv1D for m in layers.values())  # dense Conv1D, merged
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = _ids()
    module.model.eval()  # GPT-2's dropout; from_pretrained gives an eval model
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, module.model(ids).logits)
        base = AutoModelForCausalLM.from_pretrained(gpt2_dir)
        assert not torch.allclose(reloaded(ids).logits, base(ids).logits)  # the adapters trained and merged


def test_qlora_adapter_on_gpt2_reloads_on_the_nf4_base(gpt2_dir, tmp_path):
    from peft import PeftModel

    module = CausalLMModule(model_name_or_path=str(gpt2_dir), quantize="nf4", torch_dtype="float32",
                            lora={"r": 4, "alpha": 8}, optimizer="adamw", lr=1e-2, save_dir=str(tmp_path / "a"))
    _fit(module, tmp_path)
    assert sum(isinstance(m, Linear4bit) and m.conv1d for m in module.model.modules()) == 8
    base = quantize_model(AutoModelForCausalLM.from_pretrained(gpt2_dir), skip=("lm_head",))
    reloaded = PeftModel.from_pretrained(base, tmp_path / "a")
    ids = _ids()
    module.model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, module.model(ids).logits)


def test_merged_export_with_adapters_on_some_layers_is_a_whole_dense_model(tmp_path):
    config = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 2, "max_position_embeddings": 64}
    module = CausalLMModule(config=config, quantize="nf4", torch_dtype="float32",
                            lora={"r": 4, "alpha": 8, "target_modules": ["q_proj"]}, optimizer="adamw", lr=1e-2,
                            save_dir=str(tmp_path / "merged"), save_merged=True)
    _fit(module, tmp_path, steps=2)
    assert not any(isinstance(m, Linear4bit) for m in module.model.modules())
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = _ids()
    module.model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, module.model(ids).logits)
