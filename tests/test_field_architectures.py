"""Bring your own model: the QLoRA and full fine-tune recipes on architectures other than Llama.

Each architecture is a tiny random model built from its transformers 5 config class (2 layers, hidden 64, vocab
320) and written with ``save_pretrained`` in shards, as a user's checkpoint directory. The recipes' settings are
used as ``lowmem fit`` uses them (``qlora_7b.yaml``'s ``lora`` block, NF4, bf16 weights, checkpointing) on a
couple of steps of the shipped sample data through the byte tokenizer. Checked: the loss is finite and the LoRA
adapters move; LoRA sits on the architecture's own linear projections (Phi-3's fused ``qkv_proj`` /
``gate_up_proj``, GPT-NeoX's ``query_key_value`` ... : the recipe's seven Llama names mean every linear layer)
and every other linear layer is NF4; tied embeddings stay tied; the saved adapter / model reloads as users
load it (``PeftModel.from_pretrained`` on the NF4 base, ``AutoModelForCausalLM.from_pretrained``) with the
trained logits; MoE checkpoints stored per expert load with their experts in NF4 (``Experts4bit``) and train under
the recipe; the estimate counts what the model holds. One real ``lowmem fit --config qlora_7b.yaml``
runs on Phi-3 with the tokenizer read from the model directory.
"""

from __future__ import annotations

import json
import shutil
import warnings
from importlib.metadata import version
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lowmem_calls import run_qlora_recipe
from packaging.version import Version
from tiny_checkpoints import checkpoint_maker
from torch import nn

from lowmem_lightning.cli import RECIPES_DIR
from lowmem_lightning.data import TextDataModule
from lowmem_lightning.lowmem_warning import LowMemWarning
from lowmem_lightning.modules.causal_lm import CausalLMModule, build_causal_lm
from lowmem_lightning.quant import Linear4bit
from lowmem_lightning.quant.convert import CLAMPED_WEIGHT_LAYERS

pytestmark = pytest.mark.usefixtures("one_thread")

LLAMA = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
ATTENTION = frozenset({"q_proj", "k_proj", "v_proj", "o_proj"})
SIZES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 256, "vocab_size": 320, "pad_token_id": 256,
         "bos_token_id": 257, "eos_token_id": 258}
MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 32}

ARCHS = {
    # name: (transformers config class, settings beyond SIZES, leaf names LoRA lands on under the recipe)
    "mistral": ("MistralConfig", {}, LLAMA),
    "qwen2.5-tied": ("Qwen2Config", {"tie_word_embeddings": True}, LLAMA),  # Qwen2.5-0.5B, SmolLM: tied
    "qwen3": ("Qwen3Config", {"head_dim": 16}, LLAMA),
    "gemma2": ("Gemma2Config", {"head_dim": 16}, LLAMA),  # tied by default
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16}, LLAMA),
    "phi3": ("Phi3Config", {}, frozenset({"qkv_proj", "o_proj", "gate_up_proj", "down_proj"})),
    "gpt_neox": ("GPTNeoXConfig", {"num_key_value_heads": None},
                 frozenset({"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"})),
    "olmo2": ("Olmo2Config", {}, LLAMA),  # norms after the attention and the MLP, q/k norms
    "exaone4": ("Exaone4Config", {"sliding_window": 32}, LLAMA),  # OLMo 2's norms, q/k norms per head, windows
    "glm4": ("Glm4Config", {"head_dim": 16}, frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj",
                                                        "down_proj"})),  # GLM-4-0414: a fused gate_up_proj
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}, ATTENTION),
    "qwen2_moe": ("Qwen2MoeConfig", {"num_experts": 4, **MOE, "shared_expert_intermediate_size": 64}, LLAMA),
    "qwen3_moe": ("Qwen3MoeConfig", {"num_experts": 4, **MOE, "head_dim": 16}, ATTENTION),
    "olmoe": ("OlmoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 32}, ATTENTION),
    "gpt_oss": ("GptOssConfig", {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16,
                                 "sliding_window": 32},
                ATTENTION),  # experts stored 3-D (and, on the Hub, in MXFP4: tests/test_mxfp4_checkpoint.py)
}
MOES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]  # stored one tensor per expert, as the Hub holds them
STACKED_MOES = ["gpt_oss"]  # experts stored as 3-D tensors
DENSE = [name for name in ARCHS if name not in MOES + STACKED_MOES]
RECIPE = yaml.safe_load((RECIPES_DIR / "qlora_7b.yaml").read_text())["model"]["init_args"]
RECIPE_LORA = RECIPE["lora"]
PEFT_ADAPTS_LINEAR_MOE_NAMES = Version(version("peft")) >= Version("0.22")
"""peft 0.22 fixed its issue 3711: gate/up/down_proj of linear layers stay targets on models with 3-D experts."""


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """``name -> directory`` of each architecture's tiny checkpoint, written on first use (sharded safetensors)."""
    import transformers

    def build(name: str) -> nn.Module:
        cls, extra, _ = ARCHS[name]
        settings = {k: v for k, v in {**SIZES, **extra}.items() if v is not None}
        return transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**settings))

    return checkpoint_maker(tmp_path_factory.mktemp("archs"), build)


def _lora_leaves(model: nn.Module) -> set[str]:
    return {name.rpartition(".")[2] for name, module in model.named_modules() if hasattr(module, "lora_A")}


def _dense_linears(model: nn.Module) -> list[str]:
    """Plain ``nn.Linear`` layers left in a quantized model, adapters, the output head and MoE routers (kept dense:
    :func:`~lowmem_lightning.quant.router_names`) aside."""
    from lowmem_lightning.quant import router_names

    routers = set(router_names(model))
    return [name for name, module in model.named_modules() if type(module) is nn.Linear and "lora_" not in name
            and not name.endswith("lm_head") and name not in routers]


def _fit(module: CausalLMModule, precision: str) -> list[float]:
    losses = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    data = TextDataModule("sample", seq_len=32, batch_size=2, val_fraction=0.02, seed=0, pack=False)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, precision=precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[Losses()])
    trainer.fit(module, data)
    return losses


def _ids() -> torch.Tensor:
    return torch.randint(0, 259, (1, 12), generator=torch.Generator().manual_seed(1))


def _assert_same_tensors(reloaded: nn.Module, trained: nn.Module) -> None:
    """Every saved tensor (NF4 codes and scales, adapters, weights) of ``reloaded`` equals ``trained``'s. Logits are
    not compared: the trained model's rotary ``inv_freq`` buffer (not saved) went to bf16 with its ``.to(bfloat16)``
    (``CausalLMModule`` loading a checkpoint, Lightning's bf16-true), a bf16 load keeps it fp32."""
    theirs, ours = reloaded.state_dict(), trained.state_dict()
    assert theirs.keys() == ours.keys()
    for key, tensor in ours.items():
        assert torch.equal(theirs[key], tensor), key


@pytest.mark.parametrize("name", list(ARCHS))
def test_the_recipes_lora_lands_on_the_architectures_linear_projections(name, model_dirs):
    """What ``lowmem estimate`` builds (meta) from the QLoRA recipe: LoRA on every linear projection of the
    architecture under its own names, NF4 everywhere else but the head, one warning where the names differ from
    Llama's, parameter counts equal to the checkpoint's."""
    from transformers import AutoModelForCausalLM

    from lowmem_lightning.estimate import count_model, model_activation_bytes

    path = model_dirs(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build_causal_lm(str(path), None, "nf4", RECIPE_LORA, device="meta", torch_dtype="bfloat16")
    expected = ARCHS[name][2]
    assert _lora_leaves(model) == expected
    assert _dense_linears(model) == []
    said = [str(w.message) for w in caught
            if issubclass(w.category, LowMemWarning) and "target_modules" in str(w.message)]
    assert len(said) == (expected != LLAMA), said
    if said:
        assert all(leaf in said[0] for leaf in expected) and "all-linear" in said[0]
    count = count_model(model)
    assert count.params == AutoModelForCausalLM.from_pretrained(path).num_parameters()
    assert count.trainable_params == count.adapter_params > 0
    nbytes, detail = model_activation_bytes(model, 1, 64, True, "bf16-mixed", "cpu")
    model_type = model.config.model_type
    if model_type in ("mistral", "qwen2", "qwen3", "gemma3_text", "gemma2", "olmo2",
                      "exaone4"):  # Llama's layer (+ norms, ...)
        assert nbytes > 0 and "LoRA r=16 on 7 projections" in detail, detail
        assert ("eager attention" in detail) == (model_type == "gemma2"), detail  # Gemma 2 runs eagerly only
    elif model_type in ("phi3", "gpt_neox"):  # the recipe's seven names became its four (fused) projections
        assert nbytes > 0 and "LoRA r=16 on 4 projections" in detail, detail
    elif model_type == "glm4":  # the seven names became its six (gate_up_proj fused)
        assert nbytes > 0 and "LoRA r=16 on 6 projections" in detail, detail
    elif model_type in ("mixtral", "qwen3_moe", "olmoe"):  # NF4 experts, LoRA on the attention: the MoE formula's
        assert nbytes > 0 and "LoRA r=16 on 4 projections" in detail, detail
    elif model_type == "gpt_oss":  # the MoE formula's with gpt-oss's terms, under the eager attention it runs with
        assert nbytes > 0 and "LoRA r=16 on 4 projections" in detail and "eager attention" in detail, detail
    elif model_type == "qwen2_moe":  # the seven names adapt its attention and shared expert: the MoE formula's
        assert nbytes > 0 and "LoRA r=16 on 7 projections" in detail, detail
    else:
        assert nbytes is None and detail.startswith(f"not modelled for model_type {model_type!r}"), detail


@pytest.mark.parametrize("name", list(ARCHS))
def test_full_finetune_estimate_models_the_layers_it_was_fitted_to_only(name, model_dirs):
    """The activation formula is fitted to Llama's decoder layer, with terms of their own for Phi-3's fused projections,
    GPT-NeoX's parallel block, Gemma 2's norms and soft-capping (under its eager attention), OLMo 2's, EXAONE 4's
    and GLM-4's norms: every dense architecture here gets a figure; the MoE ones, fully trained, are said not
    modelled rather than guessed."""
    from lowmem_lightning.estimate import activation_bytes, model_activation_bytes

    model = build_causal_lm(str(model_dirs(name)), None, None, None, device="meta", torch_dtype="bfloat16")
    nbytes, detail = model_activation_bytes(model, 2, 64, True, "bf16-true")
    if model.config.model_type in ("mistral", "qwen2", "qwen3", "gemma3_text", "phi3", "gemma2", "gpt_neox", "olmo2",
                                   "glm4", "exaone4"):
        assert nbytes == activation_bytes(model.config, 2, 64, 2, True,
                                          attention=model.config._attn_implementation), detail
    else:
        assert nbytes is None and detail.startswith("not modelled for"), detail


HYBRIDS = {
    # model type: (settings, the projections added to the seven Llama names, the blocks named)
    "qwen3_5_text": ({"linear_num_key_heads": 2, "linear_num_value_heads": 2, "linear_key_head_dim": 8,
                      "linear_value_head_dim": 8}, ["in_proj_a", "in_proj_b", "in_proj_qkv", "in_proj_z", "out_proj"],
                     "linear_attn"),
    "qwen3_next": ({"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                    "shared_expert_intermediate_size": 32, "linear_num_key_heads": 2, "linear_num_value_heads": 2,
                    "linear_key_head_dim": 8, "linear_value_head_dim": 8}, ["in_proj_ba", "in_proj_qkvz", "out_proj"],
                   "linear_attn"),
    "falcon_h1": ({}, ["in_proj"], "mamba"),  # attention and Mamba in every layer; peft refuses Mamba's out_proj
}


@pytest.mark.parametrize("model_type", list(HYBRIDS))
def test_the_seven_llama_names_cover_the_linear_attention_of_hybrid_models(model_type):
    """Qwen3.5 and Qwen3-Next have q/k/v/o_proj in one layer of four: the seven names matched there, and their
    linear-attention layers (three of four) got no adapter without a word (TuFT #149 reports the same of its target
    map). The blocks that hold none of the seven get their projections added, named in one warning; NF4 and LoRA
    land on them."""
    settings, added, block = HYBRIDS[model_type]
    config = {**SIZES, "num_hidden_layers": 4, "head_dim": 16, **settings, "model_type": model_type}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build_causal_lm(None, config, "nf4", RECIPE_LORA, device="meta", torch_dtype="bfloat16")
    said = [str(w.message) for w in caught if "LoRA target_modules" in str(w.message)]
    expected = [f"LoRA target_modules: this {model_type} model's {block} blocks hold none of the seven Llama "
                f"projections; the seven are taken to cover their projections too: {', '.join(added)}."]
    shared_expert = {"gate_proj", "up_proj", "down_proj"}
    if model_type == "qwen3_next" and not PEFT_ADAPTS_LINEAR_MOE_NAMES:
        # peft before 0.22 takes its shared expert's gate/up/down_proj for transformers 4's expert names
        expected.append("LoRA target_modules: peft put no adapter on the linear layers down_proj, gate_proj, up_proj "
                        "of this qwen3_next model: it reads these names as transformers 4's mixture-of-experts "
                        "projections (moved to target_parameters), so they stay frozen (peft issue 3711, fixed in "
                        "peft 0.22: upgrade peft to adapt them; an adapter holding them would not load back in this "
                        "peft either).")
        assert not shared_expert & _lora_leaves(model)
    elif model_type == "qwen3_next":  # peft 0.22 keeps names of linear layers as target_modules (its #3711 fix)
        assert shared_expert <= _lora_leaves(model)
    assert said == expected, said
    assert set(added) <= set(model.peft_config["default"].target_modules) & _lora_leaves(model)
    assert _dense_linears(model) == []


PER_POSITION = {
    # model type: (settings, the linear layers of its decoder layers that act on each position alone)
    "gemma4_text": ({"hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": 320, "global_head_dim": 32,
                     "enable_moe_block": True, "num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 32},
                    {"per_layer_input_gate", "per_layer_projection"}),  # Gemma 4: its input gate (its router: dense)
    "gemma3n_text": ({"hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": 320, "laurel_rank": 4,
                      "altup_num_inputs": 2, "num_kv_shared_layers": 2},
                     {"per_layer_input_gate", "per_layer_projection", "linear_left", "linear_right",
                      "correction_coefs", "prediction_coefs", "modality_router"}),  # Gemma 3n: AltUp, Laurel
}


@pytest.mark.parametrize("model_type", list(PER_POSITION))
def test_the_seven_llama_names_leave_blocks_that_mix_no_tokens_alone(model_type):
    """Gemma 4 and Gemma 3n hold, beside their Llama-named attention and MLP, linear layers that act on each position
    alone (per-layer input gates, Gemma 4's MoE router, Gemma 3n's AltUp and Laurel blocks). The seven names used to
    be widened to them as to a hybrid's unreached mixer, with a warning; they are no token mixer, so the recipe's LoRA
    stays on the seven and says nothing."""
    settings, per_position = PER_POSITION[model_type]
    config = {**SIZES, "num_hidden_layers": 4, "head_dim": 16, "sliding_window": 16, **settings,
              "model_type": model_type}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build_causal_lm(None, config, "nf4", RECIPE_LORA, device="meta", torch_dtype="bfloat16")
    assert not [str(w.message) for w in caught if "LoRA target_modules" in str(w.message)]
    assert _lora_leaves(model) == LLAMA
    held = {name.rpartition(".")[2] for name, module in model.named_modules() if isinstance(module, Linear4bit)}
    assert per_position - set(CLAMPED_WEIGHT_LAYERS) <= held  # Gemma 3n's AltUp coefficients stay dense (below)
    routers = [module for name, module in model.named_modules() if name.endswith("router.proj")]
    assert all(type(module) is nn.Linear for module in routers) and len(routers) == (4 if "enable_moe_block" in settings
                                                                                     else 0)


@pytest.mark.parametrize("name, hosted", [("mistral", "model.embed_tokens"), ("phi3", "model.embed_tokens"),
                                          ("gpt_neox", "gpt_neox.embed_in"), ("mixtral", "model.embed_tokens"),
                                          ("gpt_oss", "model.embed_tokens"), ("qwen2.5-tied", None)])
def test_host_embeddings_holds_the_untied_input_embedding_and_trains_the_same(model_dirs, name, hosted):
    """``host_embeddings`` under the QLoRA recipe: the untied input embedding (by whatever name) goes to host memory,
    a tied one stays; logits and LoRA gradients are those of the build without it, bit for bit."""
    from lowmem_lightning.quant import HostEmbedding

    runs, path = [], str(model_dirs(name))  # written (drawing random weights) before the seeded builds
    for host in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)  # the LoRA initialisation
            model = build_causal_lm(path, quantize="nf4", lora=RECIPE_LORA, device="cpu", torch_dtype="bfloat16",
                                    host_embeddings=host)
        torch.manual_seed(1)  # the recipe's LoRA dropout
        out = model(input_ids=_ids(), labels=_ids())
        out.loss.backward()
        held = [n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, HostEmbedding)]
        runs.append((out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, held))
    (logits, grads, _), (host_logits, host_grads, held) = runs
    assert held == ([hosted] if hosted else [])
    assert torch.equal(logits, host_logits) and all(torch.equal(grads[n], host_grads[n]) for n in grads)


def test_gemma3n_qlora_trains_with_its_altup_coefficients_dense(tmp_path):
    """Gemma 3n clamps its AltUp coefficient weights while training (``prediction_coefs.weight.data.clamp_``,
    ``correction_coefs.weight.clamp``). Under the QLoRA recipe they were NF4, whose layer holds no weight tensor: the
    first training forward raised ``AttributeError: 'NF4WeightHandle' has no attribute 'clamp_'`` (bitsandbytes' NF4
    would clamp its packed codes). Now they stay dense in the fit's build and in the estimate's meta build, and a
    forward + backward in training mode gives a finite loss and LoRA gradients."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = PER_POSITION["gemma3n_text"][0]
    config = AutoConfig.for_model("gemma3n_text", **{**SIZES, "num_hidden_layers": 4, "head_dim": 16,
                                                     "sliding_window": 16, **settings})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tmp_path / "gemma3n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_causal_lm(str(tmp_path / "gemma3n"), quantize="nf4", lora=RECIPE_LORA, device="cpu",
                                torch_dtype="bfloat16")
        meta = build_causal_lm(str(tmp_path / "gemma3n"), quantize="nf4", lora=RECIPE_LORA, device="meta",
                               torch_dtype="bfloat16")
    clamped = [name for name, _ in model.named_modules() if name.endswith(CLAMPED_WEIGHT_LAYERS)]
    assert len(clamped) == 2 * 4
    for built in (model, meta):
        assert all(type(built.get_submodule(name)) is nn.Linear for name in clamped)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    loss = model.train()(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n)


def test_gemma3n_from_a_config_draws_each_module_with_its_own_models_init():
    """A QLoRA model built from a Gemma 3n config (``lowmem fit --model.config``) draws its weights module by module
    with transformers' ``_init_weights``. It used the causal LM's, and Gemma 3n's text model initializes its per-layer
    projection scale from its own ``hidden_size``, which the causal LM lacks: the build raised ``AttributeError:
    'Gemma3nForCausalLM' object has no attribute 'hidden_size'``. Now each module is drawn by the innermost model
    holding it, as transformers dispatches: the constants equal transformers' ``from_config``'s."""
    from transformers import AutoModelForCausalLM

    from lowmem_lightning.modules.causal_lm import make_config

    config = {**SIZES, "num_hidden_layers": 4, "head_dim": 16, "sliding_window": 16,
              **PER_POSITION["gemma3n_text"][0], "model_type": "gemma3n_text"}
    ours = build_causal_lm(None, config, "nf4", RECIPE_LORA, device="cpu", torch_dtype="float32").get_base_model()
    theirs = AutoModelForCausalLM.from_config(make_config(config))
    buffers = dict(ours.named_buffers())
    floating = {name: b for name, b in theirs.named_buffers() if b.is_floating_point()}
    assert floating and all(torch.equal(b, buffers[name]) for name, b in floating.items())
    constants = {name: p for name, p in theirs.named_parameters() if p.numel() > 1 and p.std() == 0}
    assert constants and all(torch.equal(p, ours.get_parameter(name)) for name, p in constants.items())


def test_all_linear_leaves_out_what_peft_refuses_on_mamba_models():
    """Nemotron-H (Mamba, attention and MLP layers; no gate_proj) takes the seven names as all its linear layers:
    that list held the Mamba mixer's ``out_proj``, which peft refuses on Mamba models, so the build failed with
    peft's error (before). Now it is left out, as for ``all-linear`` given directly."""
    config = {**SIZES, "num_hidden_layers": 4, "head_dim": 16, "model_type": "nemotron_h"}
    for targets in (RECIPE_LORA["target_modules"], "all-linear"):
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            model = build_causal_lm(None, config, "nf4", {**RECIPE_LORA, "target_modules": targets}, device="meta",
                                    torch_dtype="bfloat16")
        assert "out_proj" not in _lora_leaves(model) and "in_proj" in _lora_leaves(model)


def test_target_names_the_model_lacks_are_refused_naming_its_linear_layers(model_dirs):
    """Any other list with a name no module carries is refused (peft adapts the names it finds, silently)."""
    lora = {**RECIPE_LORA, "target_modules": ["qkv_proj", "v_proj"]}
    with pytest.raises(ValueError, match=r"Invalid target_modules=\['qkv_proj', 'v_proj'\]: 'v_proj' names no module "
                       r"of this phi3 model; its linear layers are down_proj, gate_up_proj, o_proj, qkv_proj"):
        build_causal_lm(str(model_dirs("phi3")), None, "nf4", lora, device="meta")


def test_transformers_4_expert_names_are_refused_saying_where_the_experts_went(model_dirs):
    """A QLoRA Mixtral tutorial of transformers 4 adapts ``w1, w2, w3`` (the per-expert linear layers, gone in
    transformers 5): refused naming them, the model's linear layers, and that its experts are 3-D parameters."""
    lora = {**RECIPE_LORA, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"]}
    with pytest.raises(ValueError, match=r"'w1', 'w2', 'w3' name no module of this mixtral model; its linear layers "
                       r"are k_proj, o_proj, q_proj, v_proj: .* Its MoE experts \(model\.layers\.0\.mlp\.experts, "
                       r"\.\.\.\) are 3-D parameters in transformers 5, not linear layers"):
        build_causal_lm(str(model_dirs("mixtral")), None, "nf4", lora, device="meta")


@pytest.mark.parametrize("name", DENSE + MOES + STACKED_MOES)
def test_qlora_recipe_trains_and_its_adapter_reloads(name, model_dirs, tmp_path):
    from peft import PeftModel

    from lowmem_lightning.quant import load_pretrained_causal_lm

    path = model_dirs(name)
    module = CausalLMModule(model_name_or_path=str(path), quantize="nf4", lora=RECIPE_LORA, gradient_checkpointing=True,
                            torch_dtype="bfloat16", optimizer="adamw_8bit", lr=1e-2, save_dir=str(tmp_path / "adapter"))
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
    losses = _fit(module, "bf16-mixed")
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses))), losses
    model = module.model
    assert _lora_leaves(model) == ARCHS[name][2] and _dense_linears(model) == []
    assert any(isinstance(m, Linear4bit) for m in model.modules())
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if "lora_B" in n)
    base = model.get_base_model()
    assert (base.lm_head.weight is base.get_input_embeddings().weight) == base.config.tie_word_embeddings
    reloaded = PeftModel.from_pretrained(load_pretrained_causal_lm(path, torch_dtype=torch.bfloat16),
                                         tmp_path / "adapter")
    _assert_same_tensors(reloaded, model)


@pytest.mark.parametrize("name", DENSE + MOES + STACKED_MOES)
def test_full_finetune_trains_keeps_ties_and_reloads(name, model_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    path = model_dirs(name)
    module = CausalLMModule(model_name_or_path=str(path), gradient_checkpointing=True, torch_dtype="bfloat16",
                            optimizer="adamw_8bit", lr=1e-3, save_dir=str(tmp_path / "model"))
    losses = _fit(module, "bf16-true")
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses))), losses
    model = module.model
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == model.config.tie_word_embeddings
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.bfloat16)
    assert (saved.lm_head.weight is saved.get_input_embeddings().weight) == model.config.tie_word_embeddings
    _assert_same_tensors(saved, model)


@pytest.mark.parametrize("name", ["gpt_neox"])
def test_checkpoint_keys_are_renamed_as_transformers_renames_them(name, model_dirs):
    """Pythia / GPT-NeoX checkpoints store the head as ``embed_out``; the NF4 loader reads it as ``lm_head``."""
    from transformers import AutoModelForCausalLM

    from lowmem_lightning.quant import load_pretrained_causal_lm

    path = model_dirs(name)
    assert "embed_out.weight" in json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    ours = load_pretrained_causal_lm(path, quantize=None, torch_dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(ours(input_ids=_ids()).logits, theirs(input_ids=_ids()).logits)


@pytest.mark.parametrize("name", MOES)
def test_moe_checkpoints_stored_per_expert_load_with_nf4_experts(name, model_dirs):
    """A checkpoint as the Hub holds MoE models (one tensor per expert and projection: Mixtral's ``w1``/``w3``/``w2``,
    Qwen-MoE's ``gate_proj``/``up_proj``/``down_proj``) loads shard by shard with its experts in NF4: every tensor
    equals ``quantize_model`` of transformers' own load (which stacks them into 3-D parameters), and no expert stays
    in bf16 (before: refused)."""
    from transformers import AutoModelForCausalLM

    from lowmem_lightning.quant import Experts4bit, load_pretrained_causal_lm, quantize_model

    path = model_dirs(name)
    assert any(".experts.0." in key for key in json.loads((path / "model.safetensors.index.json").read_text())[
        "weight_map"])
    ours = load_pretrained_causal_lm(path, torch_dtype=torch.bfloat16)
    theirs = quantize_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16), skip=("lm_head",))
    _assert_same_tensors(ours, theirs)
    experts = [m for m in ours.modules() if isinstance(m, Experts4bit)]
    assert len(experts) == SIZES["num_hidden_layers"]
    assert not [n for n, p in ours.named_parameters() if p.dim() == 3]


@pytest.mark.parametrize("name", MOES)
def test_lowmem_estimate_counts_the_nf4_experts_fit_loads(name, model_dirs, capsys):
    """``lowmem estimate`` of the QLoRA recipe on an MoE checkpoint: it estimates (before: the loader's refusal), with
    the frozen NF4 bytes of the experts the fit's model holds."""
    from lowmem_lightning.cli import main
    from lowmem_lightning.estimate import count_model

    path = model_dirs(name)
    module = CausalLMModule(model_name_or_path=str(path), quantize="nf4", lora=RECIPE_LORA, torch_dtype="bfloat16")
    module.configure_model()
    planned = count_model(build_causal_lm(str(path), None, "nf4", RECIPE_LORA, device="meta",
                                          torch_dtype="bfloat16"))
    loaded = count_model(module.model)
    assert planned.frozen_bytes_by_dtype["nf4"] == loaded.frozen_bytes_by_dtype["nf4"]
    assert planned.params == loaded.params
    assert not [n for n, p in module.model.named_parameters() if p.dim() == 3]  # no expert left in bf16
    capsys.readouterr()
    assert main(["estimate", "--config", "qlora_7b.yaml", "--model.model_name_or_path", str(path)]) == 0
    assert "trainable params" in capsys.readouterr().out


def test_the_lora_target_warning_comes_once_per_command_from_rank_zero(model_dirs, monkeypatch):
    """``lowmem estimate`` builds its model once (one warning raised, even with every warning shown); a rank other than
    0 (``rank_zero_only.rank``) builds the model of ``lowmem fit`` without repeating it."""
    from lightning.pytorch.utilities import rank_zero_only

    from lowmem_lightning.cli import main

    path = str(model_dirs("phi3"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["estimate", "--config", "qlora_7b.yaml", "--model.model_name_or_path", path]) == 0
    assert sum("LoRA target_modules" in str(w.message) for w in caught) == 1
    for rank, expected in ((1, 0), (0, 1)):
        monkeypatch.setattr(rank_zero_only, "rank", rank)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            CausalLMModule(model_name_or_path=path, quantize="nf4", lora=RECIPE_LORA).configure_model()
        assert sum("LoRA target_modules" in str(w.message) for w in caught) == expected, rank


def _tokenizer(path: Path) -> None:
    """A byte-level BPE tokenizer of 259 ids (no merges) saved into ``path``, as a checkpoint ships one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(sorted(alphabet))}
    vocab.update({"<pad>": 256, "<s>": 257, "</s>": 258})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.save_pretrained(path)


PHI3_WARNING = "lowmem: warning: LoRA target_modules: this phi3 model has no q_proj, k_proj, v_proj, gate_proj, up_proj"


@pytest.mark.parametrize("strategy", ["auto", pytest.param("ddp_spawn", marks=pytest.mark.slow)])
def test_lowmem_fit_qlora_recipe_on_phi3(strategy, model_dirs, tmp_path):
    """The real command on the fused-projection architecture, tokenizer read from the model directory; the LoRA
    target warning once per command, also when two ranks build the model (ddp_spawn, -m slow: ~17 s)."""
    model = tmp_path / "phi3"
    shutil.copytree(model_dirs("phi3"), model)
    _tokenizer(model)
    args = ["--trainer.strategy", strategy]
    if strategy != "auto":
        args += ["--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    proc = run_qlora_recipe(model, tmp_path, "fit", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count(PHI3_WARNING) == 1, proc.stderr[-3000:]
    config = json.loads((tmp_path / "runs/qlora_7b/adapter/adapter_config.json").read_text())
    assert set(config["target_modules"]) == ARCHS["phi3"][2]
    metrics = (next((tmp_path / "runs/qlora_7b").glob("version_*")) / "metrics.csv").read_text()
    assert "val_loss" in metrics.splitlines()[0]


MISTRAL4 = {**SIZES, "moe_intermediate_size": 32, "n_routed_experts": 4, "num_experts_per_tok": 2, "kv_lora_rank": 16,
            "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16}


def test_a_class_transformers_has_but_does_not_map_is_built_from_architectures(tmp_path):
    """transformers 5 has ``Mistral4ForCausalLM`` but its ``AutoModelForCausalLM`` does not map ``mistral4``: a Mistral
    4 checkpoint was refused (and ``lowmem estimate`` printed transformers' list of every model type). The class its
    ``config.json`` names in ``architectures`` builds it: the NF4 load equals ``quantize_model`` of transformers' own
    load of that class; without ``architectures`` the refusal is short."""
    import transformers

    from lowmem_lightning.quant import load_pretrained_causal_lm, quantize_model

    torch.manual_seed(0)
    model = transformers.Mistral4ForCausalLM._from_config(transformers.Mistral4Config(**MISTRAL4))
    model.config.architectures = ["Mistral4ForCausalLM"]
    model.save_pretrained(tmp_path / "mistral4", max_shard_size="100KB")
    ours = load_pretrained_causal_lm(tmp_path / "mistral4", device="cpu")
    theirs = quantize_model(transformers.Mistral4ForCausalLM.from_pretrained(tmp_path / "mistral4",
                                                                             dtype=torch.bfloat16), skip=("lm_head",))
    assert type(ours) is type(theirs)
    tokens = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=tokens).logits, theirs(input_ids=tokens).logits, rtol=0, atol=0)
    config = transformers.Mistral4Config(**MISTRAL4)
    config.architectures = None
    with pytest.raises(ValueError, match=r"^Invalid config of model_type 'mistral4': transformers cannot build it as a "
                                         r"causal LM \(ValueError: Unrecognized configuration class") as caught:
        build_causal_lm(None, config.to_dict(), "nf4", RECIPE_LORA, device="meta", torch_dtype="bfloat16")
    assert len(str(caught.value)) < 400
