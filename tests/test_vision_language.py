"""Vision-language checkpoints fine-tuned on text, as users bring them: Ministral 3 / Mistral Small 3.x
(``Mistral3ForConditionalGeneration``), Qwen2.5-VL, Qwen3-VL, LLaVA, Gemma 3 (which transformers already builds as a
causal LM), Qwen3.5 and Llama 4 (whose ``AutoModelForCausalLM`` class is their language model alone).

Each is a tiny random model of its transformers 5 config class (vision tower included), written with ``save_pretrained``
in shards and a tokenizer, as a user's checkpoint directory. Before, ``lowmem fit`` and ``lowmem estimate`` refused all
but Gemma 3 and Qwen3.5 ("describes a model transformers cannot build as a causal LM"), Gemma 3's LoRA also landed on
its vision tower, and Qwen3.5 was built without its vision tower (a saved full fine-tune lost it, and its adapter named
other modules than the checkpoint's). Checked: the model is built with the checkpoint's own class; LoRA adapts the
language model only (peft's ``exclude_modules``); the vision tower and projector stay frozen (and as loaded) in a full
fine-tune; the adapter and the saved model load back as their users load them (``PeftModel.from_pretrained`` on
transformers' ``AutoModelForImageTextToText``); the estimate counts what the fit trains; one real ``lowmem fit``.
"""

from __future__ import annotations

import json
import shutil

import lightning as L
import pytest
import torch
import yaml
from lowmem_calls import run_qlora_recipe
from test_field_architectures import _tokenizer
from tiny_checkpoints import checkpoint_maker

from lowmem_lightning.cli import RECIPES_DIR
from lowmem_lightning.data import TextDataModule
from lowmem_lightning.modules.causal_lm import CausalLMModule, build_causal_lm
from lowmem_lightning.multimodal import causal_lm_auto_class, outside_language_model

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256, "vocab_size": 320,
        "pad_token_id": 256, "bos_token_id": 257, "eos_token_id": 258}
MROPE = {"rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}}
QWEN_VL_TOKENS = {"image_token_id": 300, "video_token_id": 301, "vision_start_token_id": 302}

GEMMA4_TOKENS = {"image_token_id": 300, "video_token_id": 301, "audio_token_id": 302, "boi_token_id": 303,
                 "eoi_token_id": 304, "boa_token_id": 305, "eoa_token_index": 306}

VLMS = {
    # name: (config class, its settings, the modules text does not pass through)
    "mistral3": ("Mistral3Config", {  # Ministral 3, Mistral Small 3.x: Pixtral vision + a Ministral 3 text model
        "text_config": {**TEXT, "model_type": "ministral3", "max_position_embeddings": 262144},  # its YaRN's
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                          "image_size": 32, "patch_size": 8, "head_dim": 16},
        "image_token_index": 300}, ["model.vision_tower", "model.multi_modal_projector"]),
    "qwen2_5_vl": ("Qwen2_5_VLConfig", {
        "text_config": {**TEXT, **MROPE},
        "vision_config": {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                          "out_hidden_size": 64, "fullatt_block_indexes": [0]}, **QWEN_VL_TOKENS}, ["model.visual"]),
    "qwen3_vl": ("Qwen3VLConfig", {
        "text_config": {**TEXT, **MROPE},
        "vision_config": {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                          "out_hidden_size": 64, "deepstack_visual_indexes": [0]}, **QWEN_VL_TOKENS}, ["model.visual"]),
    "llava": ("LlavaConfig", {
        "text_config": {**TEXT, "model_type": "llama"},
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                          "image_size": 32, "patch_size": 8},
        "image_token_index": 300}, ["model.vision_tower", "model.multi_modal_projector"]),
    "gemma3": ("Gemma3Config", {  # Gemma 3 4B and up: SigLIP vision, whose attention has q_proj / k_proj / v_proj
        "text_config": TEXT,
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                          "image_size": 32, "patch_size": 8},
        "mm_tokens_per_image": 4, "image_token_index": 300}, ["model.vision_tower", "model.multi_modal_projector"]),
    "qwen3_5": ("Qwen3_5Config", {  # Qwen3.5: AutoModelForCausalLM would build its language model alone
        "text_config": {**TEXT, "num_hidden_layers": 4, "linear_num_key_heads": 2, "linear_num_value_heads": 2,
                        "linear_key_head_dim": 8, "linear_value_head_dim": 8},
        "vision_config": {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                          "out_hidden_size": 64}, **QWEN_VL_TOKENS}, ["model.visual"]),
    "llama4": ("Llama4Config", {  # its language model at the top (language_model.model), beside the vision model
        "text_config": {**TEXT, "intermediate_size_mlp": 128, "num_local_experts": 4, "num_experts_per_tok": 1},
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                          "image_size": 32, "patch_size": 8, "vision_output_dim": 64, "projector_input_dim": 64,
                          "projector_output_dim": 64},
        "image_token_index": 300}, ["vision_model", "multi_modal_projector"]),
    "gemma4": ("Gemma4Config", {  # Gemma 4 E2B / E4B: per-layer input embeddings, an audio conformer and a vision tower
        "text_config": {**TEXT, "hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": 320,
                        "global_head_dim": 32, "sliding_window": 16},
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                          "num_key_value_heads": 2, "head_dim": 16, "patch_size": 4, "position_embedding_size": 64},
        "audio_config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                         "subsampling_conv_channels": [8, 4], "output_proj_dims": 32},  # clip ranges +-inf: unclipped
        **GEMMA4_TOKENS}, ["model.vision_tower", "model.audio_tower", "model.embed_vision", "model.embed_audio"]),
}
LINEAR_ATTENTION = {"qwen3_5"}  # packed documents cannot be kept apart through its layers: refused, so not asked
CLASSES = {"mistral3": "Mistral3ForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
           "qwen3_vl": "Qwen3VLForConditionalGeneration", "llava": "LlavaForConditionalGeneration",
           "gemma3": "Gemma3ForConditionalGeneration", "qwen3_5": "Qwen3_5ForConditionalGeneration",
           "llama4": "Llama4ForConditionalGeneration", "gemma4": "Gemma4ForConditionalGeneration"}
RECIPE_LORA = yaml.safe_load((RECIPES_DIR / "qlora_7b.yaml").read_text())["model"]["init_args"]["lora"]


def _config(name: str):
    import transformers

    cls, settings, _ = VLMS[name]
    return getattr(transformers, cls)(**settings)


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory):
    """``name -> directory`` of each vision-language checkpoint (sharded safetensors and a tokenizer), made once."""
    def build(name: str):
        config = _config(name)
        return causal_lm_auto_class(config).from_config(config)

    return checkpoint_maker(tmp_path_factory.mktemp("vlms"), build, lambda name, path: _tokenizer(path))


def _outside(name: str, module_name: str) -> bool:
    return any(module_name == o or module_name.startswith(o + ".") for o in VLMS[name][2])


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _fit(module: CausalLMModule, precision: str, name: str) -> list[float]:
    losses = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    data = TextDataModule("sample", seq_len=32, batch_size=2, val_fraction=0.02, seed=0,
                          isolate_documents=name not in LINEAR_ATTENTION)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, precision=precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[Losses()])
    trainer.fit(module, data)
    return losses


@pytest.mark.parametrize("name", list(VLMS))
def test_the_checkpoints_own_class_is_built_and_lora_adapts_its_language_model_only(name, vlm_dirs):
    """What ``lowmem estimate`` builds (meta) from the QLoRA recipe and from the full fine-tune: the checkpoint's own
    class (before: refused, but for Gemma 3); LoRA on the seven projections of the language model and nowhere in the
    vision tower or projector (Gemma 3's SigLIP and Pixtral have q_proj / k_proj / v_proj too); in a full fine-tune
    the vision parts are frozen, so the trainable count is the language model's."""
    from lowmem_lightning.estimate import count_model

    path = str(vlm_dirs(name))
    model = build_causal_lm(path, None, "nf4", RECIPE_LORA, device="meta", torch_dtype="bfloat16")
    base = _base(model)
    assert type(base).__name__ == CLASSES[name]
    assert outside_language_model(base) == VLMS[name][2]
    adapted = [n for n, m in base.named_modules() if hasattr(m, "lora_A")]
    # Qwen3.5: the MLP of its 4 layers, the attention of its full-attention layer, the 5 projections of its 3
    # linear-attention layers (the seven Llama names cover them)
    assert len(adapted) == (7 * TEXT["num_hidden_layers"] if name != "qwen3_5" else 3 * 4 + 4 + 3 * 5), adapted
    assert not [n for n in adapted if _outside(name, n)]
    assert model.peft_config["default"].exclude_modules
    assert not [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    full = build_causal_lm(path, None, None, None, device="meta", torch_dtype="bfloat16")
    outside = [n for n, p in full.named_parameters() if _outside(name, n)]
    assert outside and not [n for n, p in full.named_parameters() if _outside(name, n) and p.requires_grad]
    language = sum(p.numel() for n, p in full.named_parameters() if not _outside(name, n))
    assert count_model(full).trainable_params == language < count_model(full).params


@pytest.mark.parametrize("name", list(VLMS))
def test_qlora_recipe_trains_and_the_adapter_loads_on_transformers_own_model(name, vlm_dirs, tmp_path):
    """Two steps of the QLoRA recipe's settings on packed documents kept apart; the saved adapter loads with peft
    onto the checkpoint loaded by transformers (``AutoModelForImageTextToText``) with every adapter tensor as
    trained and none in the vision tower."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    path = vlm_dirs(name)
    module = CausalLMModule(model_name_or_path=str(path), quantize="nf4", lora=RECIPE_LORA, gradient_checkpointing=True,
                            torch_dtype="bfloat16", optimizer="adamw_8bit", lr=1e-2, save_dir=str(tmp_path / "adapter"))
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
    losses = _fit(module, "bf16-mixed", name)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses))), losses
    trained = {n: p for n, p in module.model.named_parameters() if "lora_" in n}
    assert any(not torch.equal(before[n], p) for n, p in trained.items() if "lora_B" in n)
    reloaded = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16),
                                         tmp_path / "adapter")
    theirs = {n: p for n, p in reloaded.named_parameters() if "lora_" in n}
    assert theirs.keys() == trained.keys()
    for key, tensor in trained.items():
        assert torch.equal(theirs[key].float(), tensor.float()), key


@pytest.mark.parametrize("name", list(VLMS))
def test_full_finetune_trains_the_language_model_and_keeps_the_vision_parts(name, vlm_dirs, tmp_path):
    """Two steps of a full fine-tune: the language model moves, the vision tower and projector stay as loaded; the
    saved model loads with transformers' ``AutoModelForImageTextToText`` with every tensor as trained."""
    from transformers import AutoModelForImageTextToText

    path = vlm_dirs(name)
    original = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16).state_dict()
    module = CausalLMModule(model_name_or_path=str(path), gradient_checkpointing=True, torch_dtype="bfloat16",
                            optimizer="adamw_8bit", lr=1e-3, save_dir=str(tmp_path / "model"))
    losses = _fit(module, "bf16-true", name)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses))), losses
    ours = module.model.state_dict()
    vision = [k for k in ours if _outside(name, k)]
    assert vision and all(torch.equal(ours[k], original[k]) for k in vision)
    assert any(not torch.equal(ours[k], original[k]) for k in ours if ".layers.0." in k and not _outside(name, k))
    saved = AutoModelForImageTextToText.from_pretrained(tmp_path / "model", dtype=torch.bfloat16)
    assert type(saved).__name__ == CLASSES[name]
    theirs = saved.state_dict()
    assert theirs.keys() == ours.keys()
    for key, tensor in ours.items():
        assert torch.equal(theirs[key], tensor), key


@pytest.mark.parametrize("name", ["qwen2_5_vl", "gemma4"])
def test_a_merged_qlora_export_keeps_the_checkpoints_vision_and_audio_towers(name, vlm_dirs, tmp_path):
    """``save_merged`` of the QLoRA recipe: the language model is the merge of the adapters into the dequantized NF4
    layers, and the vision (and Gemma 4's audio) towers and projectors, which text never ran through, are the
    checkpoint's own tensors (before: their NF4 approximation, dequantized)."""
    from transformers import AutoModelForImageTextToText

    path = vlm_dirs(name)
    module = CausalLMModule(model_name_or_path=str(path), quantize="nf4", lora=RECIPE_LORA, torch_dtype="bfloat16",
                            optimizer="adamw_8bit", lr=1e-2, save_dir=str(tmp_path / "merged"), save_merged=True)
    _fit(module, "bf16-mixed", name)
    original = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16).state_dict()
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged", dtype=torch.bfloat16).state_dict()
    assert merged.keys() == original.keys()
    towers = [key for key in original if _outside(name, key)]
    assert towers and all(torch.equal(merged[key], original[key]) for key in towers)
    assert not all(torch.equal(merged[key], original[key]) for key in original if ".q_proj." in key)


def test_clip_ranges_of_plus_minus_inf_load_and_a_nan_one_is_refused(vlm_dirs, tmp_path):
    """Gemma 4's audio layers keep their clamp ranges in buffers, +-inf where a layer is not clipped (transformers'
    initial value): the NF4 load refused such a checkpoint as holding non-finite weights (before). A buffer's +-inf
    now loads as stored; a nan there is still refused, naming it."""
    from quantized_releases import rewrite_shard

    from lowmem_lightning.quant import NonFiniteCheckpointError, load_pretrained_causal_lm

    path = tmp_path / "gemma4"
    shutil.copytree(vlm_dirs("gemma4"), path)
    key = "model.audio_tower.layers.0.self_attn.q_proj.input_max"
    model = load_pretrained_causal_lm(path, device="cpu")
    assert model.get_buffer(key).item() == float("inf")
    shard = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][key]
    rewrite_shard(path, shard, lambda tensors: tensors[key].fill_(float("nan")))
    with pytest.raises(NonFiniteCheckpointError, match=rf"holds nan/inf in 1 tensor: {key} in {shard}: 1 .*nan"):
        load_pretrained_causal_lm(path, device="cpu")


def test_a_model_needing_a_package_this_environment_lacks_is_refused_naming_it(capsys, monkeypatch, tmp_path):
    """Gemma 3n's vision tower is a timm model: without timm installed ``lowmem estimate`` (and fit) ended in
    transformers' ImportError traceback (before). Exit 2, one message naming the argument and the package."""
    import importlib.util

    import transformers
    from lowmem_calls import lowmem_in_process

    if importlib.util.find_spec("timm") is not None:
        pytest.skip("timm is installed here: Gemma 3n builds")
    text = {**TEXT, "num_hidden_layers": 4, "vocab_size_per_layer_input": 320, "hidden_size_per_layer_input": 8,
            "laurel_rank": 4, "activation_sparsity_pattern": [0.95, 0.95, 0.0, 0.0], "sliding_window": 16}
    transformers.Gemma3nConfig(text_config=text, audio_config={"hidden_size": 32, "conf_num_hidden_layers": 1},
                               vision_config={"hidden_size": 32}).save_pretrained(tmp_path / "gemma3n")
    done = lowmem_in_process(capsys, monkeypatch, tmp_path, "estimate", "--config", "qlora_7b.yaml",
                             "--model.model_name_or_path", str(tmp_path / "gemma3n"))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"lowmem estimate: error: Invalid model_name_or_path='{tmp_path / 'gemma3n'}': transformers cannot build this "
        "model in this environment: TimmWrapperModel requires the timm library but it was not found in your "
        "environment. You can install it with pip: `pip install timm`."], done.stderr


def test_lowmem_fit_and_estimate_on_a_ministral3_checkpoint(vlm_dirs, tmp_path):
    """The real commands on a Ministral 3 checkpoint (before: "describes a model transformers cannot build as a causal
    LM"): the QLoRA recipe trains and writes its adapter; the estimate gives its Ministral 3 text model's
    activations."""
    model = tmp_path / "ministral3"
    shutil.copytree(vlm_dirs("mistral3"), model)
    proc = run_qlora_recipe(model, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    adapter = tmp_path / "runs/qlora_7b/adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == set(RECIPE_LORA["target_modules"])
    assert config["exclude_modules"] == r"(model\.vision_tower|model\.multi_modal_projector)(\..*)?"
    proc = run_qlora_recipe(model, tmp_path, "estimate")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "activations" in proc.stdout and "not modelled" not in proc.stdout, proc.stdout


QWEN2_5_VL_7B = {  # Qwen/Qwen2.5-VL-7B-Instruct's config.json (8,292,166,656 params)
    "text_config": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                    "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 128000,
                    "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                    "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6}},
    "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                      "out_hidden_size": 3584, "fullatt_block_indexes": [7, 15, 23, 31]},
    "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652, "tie_word_embeddings": False}


def test_the_readme_figure_of_qwen2_5_vl_7b(capsys, monkeypatch, tmp_path):
    """README: Qwen2.5-VL-7B under ``qlora_7b.yaml`` (batch 1 x seq 512): LoRA 40.4M params on the language model,
    activations 1.05 GB, device total 7.27 GB, from its config on the meta device."""
    import transformers
    from lowmem_calls import lowmem_in_process

    transformers.Qwen2_5_VLConfig(**QWEN2_5_VL_7B).save_pretrained(tmp_path / "qwen2.5-vl-7b")
    done = lowmem_in_process(capsys, monkeypatch, tmp_path, "estimate", "--config", "qlora_7b.yaml",
                             "--model.model_name_or_path", str(tmp_path / "qwen2.5-vl-7b"), "--format", "json")
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    assert figures["params"] == 8_292_166_656 and figures["adapter_params"] == 40_370_176
    assert round(figures["activation_bytes"] / 1e9, 2) == 1.05
    done = lowmem_in_process(capsys, monkeypatch, tmp_path, "estimate", "--config", "qlora_7b.yaml",
                             "--model.model_name_or_path", str(tmp_path / "qwen2.5-vl-7b"))
    assert "total                7.271 GB" in done.stdout, done.stdout
