"""peft as peft users write it, on our NF4 model: the bitsandbytes QLoRA recipe
(quantize -> prepare_model_for_kbit_training -> get_peft_model -> train -> save_pretrained ->
PeftModel.from_pretrained -> merge_and_unload) with no registration, no config of ours, no patching."""

import copy
import inspect
import json
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.tuners.lora import Linear as PeftLoraLinear
from transformers import LlamaForCausalLM

import lowmem_lightning.quant.convert as convert_module
from lowmem_lightning.quant import (
    LLAMA_TARGET_MODULES,
    Linear4bit,
    LoraLinear4bit,
    add_lora,
    load_lora,
    load_pretrained_causal_lm,
    quantize_model,
)

VOCAB = 128


pytestmark = pytest.mark.usefixtures("one_thread")


def _base(dense, dtype=torch.float32):
    return quantize_model(copy.deepcopy(dense).to(dtype))


def _config(**kwargs):
    kwargs = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": list(LLAMA_TARGET_MODULES),
              "task_type": "CAUSAL_LM", **kwargs}
    return LoraConfig(**kwargs)


def _ids():
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))


def _train(model, steps=5, lr=1e-2):
    ids = _ids()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model.eval(), losses


@torch.no_grad()
def _logits(model):
    return model(input_ids=_ids()).logits.float()


def _nf4_buffers(model):
    return {f"{n}.{b}": t for n, m in model.named_modules() if isinstance(m, Linear4bit)
            for b, t in m.named_buffers(recurse=False)}


def test_qlora_recipe_as_written_trains_saves_reloads_and_merges(dense_llama, tmp_path):
    model = prepare_model_for_kbit_training(_base(dense_llama))
    peft_model = get_peft_model(model, _config())
    wrapped = [m for m in peft_model.modules() if isinstance(m, PeftLoraLinear)]
    assert len(wrapped) == 2 * 7 and all(isinstance(m.base_layer, Linear4bit) for m in wrapped)
    assert all(m.base_layer.is_quantized for m in wrapped)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)

    frozen = {k: v.clone() for k, v in peft_model.state_dict().items() if "lora_" not in k}
    lora = {k: v.clone() for k, v in peft_model.state_dict().items() if "lora_" in k}
    peft_model, losses = _train(peft_model)
    assert losses[-1] < losses[0]
    state = peft_model.state_dict()
    assert any("qweight" in k for k in frozen)  # the NF4 codes are part of what must not move
    assert all(torch.equal(state[k], v) for k, v in frozen.items())
    assert all(not torch.equal(state[k], v) for k, v in lora.items() if "lora_B" in k)
    adapted = _logits(peft_model)

    peft_model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == sorted(LLAMA_TARGET_MODULES)
    fresh = prepare_model_for_kbit_training(_base(dense_llama))
    reloaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
    assert torch.equal(_logits(reloaded), adapted)

    with torch.no_grad():
        with peft_model.disable_adapter():
            base = _logits(peft_model)
    q_lora = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    expected_q = q_lora.base_layer.dequantize(torch.float32) + q_lora.get_delta_weight("default")
    merged = peft_model.merge_and_unload()
    q_proj = merged.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, Linear4bit) and not q_proj.is_quantized
    assert set(q_proj.state_dict()) == {"weight"} and torch.equal(q_proj.weight, expected_q)
    assert not any(isinstance(m, PeftLoraLinear) for m in merged.modules())
    out = _logits(merged)
    # add_lora's fp32 merge tolerance (1e-5), on the logits; the adapters moved them far more than that
    assert torch.allclose(out, adapted, atol=1e-5, rtol=0)
    assert (adapted - base).abs().max() > 100 * (out - adapted).abs().max()


@pytest.mark.usefixtures("bitsandbytes_flag")
def test_prepare_model_for_kbit_training_keeps_nf4_storage_and_turns_on_checkpointing(dense_llama):
    model = _base(dense_llama, torch.bfloat16)
    assert model.is_loaded_in_4bit
    before = {k: (t, t.clone()) for k, t in _nf4_buffers(model).items()}
    prepared = prepare_model_for_kbit_training(model)
    assert prepared is model and model.is_gradient_checkpointing
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in model.parameters())  # bf16 -> fp32
    after = _nf4_buffers(model)
    assert after.keys() == before.keys()
    for key, (tensor, value) in before.items():  # the same tensors, neither cast nor dequantized
        assert after[key] is tensor and torch.equal(tensor, value) and tensor.dtype == value.dtype
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert layers and all(m.is_quantized and m.weight_dtype == torch.bfloat16 for m in layers)
    assert model.get_input_embeddings()(_ids()).requires_grad  # input grads for reentrant checkpointing

    peft_model = get_peft_model(model, _config(lora_dropout=0.0))
    peft_model.train()
    loss = peft_model(input_ids=_ids(), labels=_ids()).loss
    loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert torch.isfinite(loss) and len(grads) == 2 * 2 * 7 and all(g is not None for g in grads.values())
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)  # (A's is 0 while B is 0)


@pytest.mark.parametrize("safe_merge", [False, True])
def test_bf16_merge_rounds_once_as_add_lora_does(dense_llama, safe_merge):
    peft_model, _ = _train(get_peft_model(_base(dense_llama, torch.bfloat16), _config(lora_dropout=0.0)), steps=4)
    adapted = _logits(peft_model)
    with peft_model.disable_adapter():
        base = _logits(peft_model)
    down = peft_model.base_model.model.model.layers[1].mlp.down_proj
    expected = (down.base_layer.dequantize(torch.float32) + down.get_delta_weight("default")).bfloat16()
    merged = peft_model.merge_and_unload(safe_merge=safe_merge)
    weight = merged.model.layers[1].mlp.down_proj.weight
    assert weight.dtype == torch.bfloat16 and not weight.requires_grad
    assert torch.equal(weight, expected)  # dequantized base + B @ A * scale in fp32, rounded once to bf16
    out = _logits(merged)
    merge_error = (out - adapted).norm() / adapted.norm()
    assert merge_error < 1e-2  # add_lora's bf16 tolerance
    assert (adapted - base).norm() / adapted.norm() > 5 * merge_error


def test_unload_gives_back_the_exact_4bit_layers(dense_llama):
    model = _base(dense_llama)
    codes = {k: t.clone() for k, t in _nf4_buffers(model).items()}
    before = _logits(model)
    peft_model, _ = _train(get_peft_model(model, _config(target_modules=["q_proj", "v_proj"])), steps=2)
    unloaded = peft_model.unload()
    assert all(m.is_quantized for m in unloaded.modules() if isinstance(m, Linear4bit))
    after = _nf4_buffers(unloaded)
    assert after.keys() == codes.keys() and all(torch.equal(after[k], v) for k, v in codes.items())
    assert torch.equal(_logits(unloaded), before)


def test_adapters_move_between_peft_native_and_add_lora(dense_llama, tmp_path):
    native, _ = _train(get_peft_model(_base(dense_llama), _config(lora_dropout=0.0)), steps=2)
    native.save_pretrained(tmp_path / "native")
    ours = load_lora(_base(dense_llama), tmp_path / "native").eval()
    assert sum(isinstance(m, LoraLinear4bit) for m in ours.modules()) == 14
    assert torch.allclose(_logits(ours), _logits(native), atol=1e-6, rtol=0)

    ours, _ = _train(add_lora(_base(dense_llama), r=4, alpha=8), steps=2)
    ours.save_pretrained(tmp_path / "ours")
    native = PeftModel.from_pretrained(_base(dense_llama), tmp_path / "ours").eval()
    assert sum(isinstance(m, PeftLoraLinear) for m in native.modules()) == 14
    assert torch.allclose(_logits(native), _logits(ours), atol=1e-6, rtol=0)


@pytest.mark.usefixtures("bitsandbytes_flag")
def test_all_linear_and_a_loaded_checkpoint(dense_llama, tmp_path):
    copy.deepcopy(dense_llama).to(torch.bfloat16).save_pretrained(tmp_path)
    model = load_pretrained_causal_lm(tmp_path)
    assert model.is_loaded_in_4bit
    peft_model = get_peft_model(prepare_model_for_kbit_training(model), _config(target_modules="all-linear"))
    wrapped = {n.rpartition(".")[2] for n, m in peft_model.named_modules() if isinstance(m, PeftLoraLinear)}
    assert wrapped == set(LLAMA_TARGET_MODULES)  # every 4-bit layer, not the (skipped, dense) lm_head
    _, losses = _train(peft_model, steps=2)
    assert all(torch.isfinite(torch.tensor(losses)))


def test_merged_model_is_no_longer_4bit_and_exports_without_bitsandbytes(dense_llama, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # a machine without bitsandbytes
    model = _base(dense_llama)
    monkeypatch.setattr(convert_module, "_WARNED_NO_BITSANDBYTES", [])
    with pytest.warns(UserWarning, match="gradient_checkpointing_enable"):
        assert not model.is_loaded_in_4bit  # else transformers' num_parameters() would import bitsandbytes
    assert model.num_parameters() > 0  # what the HF Trainer calls every step
    monkeypatch.delitem(sys.modules, "bitsandbytes")
    monkeypatch.setattr(convert_module, "_bitsandbytes_installed", lambda: True)  # a machine with it
    assert model.is_loaded_in_4bit
    partial = get_peft_model(model, _config(target_modules=["q_proj"])).merge_and_unload()
    assert partial.is_loaded_in_4bit  # k, v, o, gate, up, down are still 4-bit
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)

    merged = get_peft_model(_base(dense_llama), _config()).merge_and_unload()
    assert not merged.is_loaded_in_4bit
    merged.save_pretrained(tmp_path, max_shard_size="100KB")  # sharded: calls num_parameters()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    plain = LlamaForCausalLM.from_pretrained(tmp_path).eval()  # a plain transformers model, no NF4 left
    assert not any(isinstance(m, Linear4bit) for m in plain.modules())
    assert torch.equal(_logits(plain), _logits(merged.eval()))


def test_weight_reading_options_fail_loudly_not_silently(dense_llama):
    with pytest.raises(TypeError, match="NF4WeightHandle"):
        get_peft_model(_base(dense_llama), _config(use_dora=True))
    with pytest.raises(AttributeError, match="dequantize"):
        get_peft_model(_base(dense_llama), _config(init_lora_weights="pissa"))


_SNAPSHOT = """
import peft
import peft.mapping_func
import torch.nn
from peft.tuners.lora import LoraConfig, LoraLayer, LoraModel, Linear
from transformers import LlamaConfig, LlamaForCausalLM

config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
LlamaForCausalLM(config)  # transformers' own first-use addition (nn.Module.smart_apply) happens before the snapshot

def snapshot():
    spaces = [peft, peft.mapping_func, peft.tuners.lora.layer, peft.tuners.lora.model, peft.tuners.tuners_utils,
              peft.utils.other, LoraConfig, LoraLayer, LoraModel, Linear, peft.PeftModel,
              peft.tuners.tuners_utils.BaseTuner, peft.tuners.tuners_utils.BaseTunerLayer, torch.nn.Linear,
              torch.nn.Module]
    return {(getattr(s, "__name__", repr(s)), k): id(v) for s in spaces for k, v in vars(s).items()}

before = snapshot()
create = LoraModel.__dict__["_create_new_module"]
import lowmem_lightning, lowmem_lightning.quant, lowmem_lightning.quant.lora, lowmem_lightning.quant.loading
model = lowmem_lightning.quant.quantize_model(LlamaForCausalLM(config))
peft.get_peft_model(peft.prepare_model_for_kbit_training(model), LoraConfig(target_modules=["q_proj"]))
after = snapshot()
changed = sorted(str(k) for k in before.keys() | after.keys() if before.get(k) != after.get(k))
assert not changed, changed
assert LoraModel.__dict__["_create_new_module"] is create
assert LoraConfig(target_modules=["q_proj"])._custom_modules is None
print("unchanged", len(before))
"""


def _peft_namespaces():
    import peft.mapping_func
    import peft.tuners.lora.layer
    import peft.tuners.lora.model
    import peft.tuners.tuners_utils
    import peft.utils.other

    return [peft, peft.mapping_func, peft.tuners.lora.layer, peft.tuners.lora.model, peft.tuners.tuners_utils,
            peft.utils.other, LoraConfig, PeftModel, PeftLoraLinear, peft.tuners.lora.LoraModel,
            peft.tuners.lora.LoraLayer, peft.tuners.tuners_utils.BaseTuner, peft.tuners.tuners_utils.BaseTunerLayer]


def test_peft_dispatch_is_peft_own_after_using_the_package(dense_llama):
    # in-process (the package is already imported here): peft's LoRA machinery holds only peft's functions
    from peft.tuners.lora import model as lora_model
    from peft.tuners.lora.layer import dispatch_default

    get_peft_model(prepare_model_for_kbit_training(_base(dense_llama)), _config(target_modules=["q_proj"]))
    create = lora_model.LoraModel.__dict__["_create_new_module"]
    assert isinstance(create, staticmethod) and create.__func__.__module__ == "peft.tuners.lora.model"
    assert lora_model.dispatch_default is dispatch_default and dispatch_default.__module__ == "peft.tuners.lora.layer"
    for space in _peft_namespaces():
        for name, value in vars(space).items():
            func = getattr(value, "__func__", value)
            for layer in (func, inspect.unwrap(func) if callable(func) else func):
                assert not str(getattr(layer, "__module__", "")).startswith("lowmem_lightning"), (space, name)
    assert LoraConfig(target_modules=["q_proj"])._custom_modules is None


@pytest.mark.slow
def test_importing_and_using_the_package_changes_no_peft_or_torch_class():
    # a fresh process: every attribute of peft's LoRA classes and modules (and of nn.Linear / nn.Module)
    # is the same object before ``import lowmem_lightning`` and after quantizing and wrapping a model
    result = subprocess.run([sys.executable, "-c", _SNAPSHOT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "unchanged" in result.stdout
