"""Tokens added to a pretrained model's tokenizer (ChatML's ``<|im_start|>`` / ``<|im_end|>`` on a base model):
``CausalLMModule(resize_embeddings=True)`` grows the input embeddings and output head to the tokenizer's length
(new rows: the mean of the old), the new rows train (with LoRA / QLoRA only they do, through peft's
``trainable_token_indices``), what ``save_dir`` gets reloads as users load it (``from_pretrained``; the adapter on
the base grown with ``resize_token_embeddings``) with the module's logits, ``load_from_checkpoint`` rebuilds the
shapes from the hyperparameters, ``lowmem estimate`` counts the trained rows, and without the option the refusal
names it. Tiny Llama (untied head) and Qwen2 (tied) checkpoints, a local BPE tokenizer; nothing is downloaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from chat_recipes import chat_recipe, run_lowmem
from lowmem_calls import lowmem_in_process, stderr_as_in_a_process
from test_data_chat import CHAT, CHATML
from tiny_tokenizers import bpe_tokenizer

from lowmem_lightning.cli import main
from lowmem_lightning.data import TextDataModule
from lowmem_lightning.modules.causal_lm import CausalLMModule

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 128}
ADDED = ["<|im_start|>", "<|im_end|>"]
BASE_VOCAB = 300
VOCAB = BASE_VOCAB + len(ADDED)


def _base_tokenizer():
    """A byte-level BPE tokenizer with no chat tokens (a base model's), built here."""
    return bpe_tokenizer(None, ["<|endoftext|>"], "<|endoftext|>",
                         "Hello there! Be brief. What is 2+2? It is 4. system user assistant", vocab_size=BASE_VOCAB)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """``chattok/``: the base tokenizer + ChatML special tokens and template, as a user saves it; ``llama/`` (untied)
    and ``qwen/`` (tied) checkpoints embedding the base tokenizer's 300 ids; ``chat.jsonl``."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("added")
    tok = _base_tokenizer()
    assert len(tok) == BASE_VOCAB
    tok.add_special_tokens({"additional_special_tokens": ADDED})
    tok.chat_template = CHATML
    tok.save_pretrained(root / "chattok")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY, vocab_size=BASE_VOCAB)).save_pretrained(root / "llama")
    Qwen2ForCausalLM(Qwen2Config(**TINY, vocab_size=BASE_VOCAB, tie_word_embeddings=True)).save_pretrained(
        root / "qwen")
    records = [{"messages": [*CHAT[:3], {"role": "user", "content": f"{i} + 2?"},
                             {"role": "assistant", "content": f"It is {i + 2}."}]} for i in range(24)]
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def _data(files: Path) -> TextDataModule:
    return TextDataModule(str(files / "chat.jsonl"), tokenizer=str(files / "chattok"), seq_len=32, batch_size=4,
                          val_fraction=0.0)


def _fit(module: CausalLMModule, files: Path, steps: int = 3) -> None:
    L.seed_everything(0)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, _data(files))


def _ids() -> torch.Tensor:
    """Token ids with both added tokens among old ones."""
    return torch.tensor([[BASE_VOCAB, 5, 17, BASE_VOCAB + 1, 40, BASE_VOCAB, 9, 3]])


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    return model.eval()(input_ids=_ids()).logits


def _checkpoint_rows(files: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights = load_file(files / name / "model.safetensors")
    return {"embed": weights["model.embed_tokens.weight"], "head": weights.get("lm_head.weight")}


def _trained_rows(layer) -> torch.Tensor:
    """The rows a peft-wrapped embedding / head computes with (its frozen rows with the trained ones in place)."""
    return layer.token_adapter.get_merged_weights(["default"]).detach()


@pytest.mark.parametrize(("name", "quantize"), [("llama", None), ("qwen", "nf4")])
def test_lora_trains_the_added_rows_only_and_the_adapter_reloads_on_the_resized_base(files, tmp_path, name,
                                                                                     quantize):
    """LoRA on the untied Llama, QLoRA (NF4) on the tied Qwen2: after 3 steps the added rows of the embedding (and
    of Llama's own head) moved from their start, the mean of the checkpoint's rows, and every old row is the
    checkpoint's; the hyperparameters hold the row count; the adapter loads with ``PeftModel.from_pretrained`` on the
    base grown with ``resize_token_embeddings`` with the module's logits exactly."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowmem_lightning.quant import load_pretrained_causal_lm

    module = CausalLMModule(model_name_or_path=str(files / name), quantize=quantize, lora={"r": 4},
                            resize_embeddings=True, save_dir=str(tmp_path / "adapter"), optimizer="adamw", lr=1e-2)
    _fit(module, files)
    assert module.hparams.resize_embeddings == VOCAB
    saved = _checkpoint_rows(files, name)
    layers = {"embed": module.model.get_input_embeddings()}
    if saved["head"] is not None:
        layers["head"] = module.model.get_output_embeddings()
    for key, layer in layers.items():
        rows, start = _trained_rows(layer), layer.token_adapter.trainable_tokens_original["default"]
        assert rows.shape[0] == VOCAB
        assert torch.equal(rows[:BASE_VOCAB], saved[key]), key
        torch.testing.assert_close(start, saved[key].mean(0).expand(len(ADDED), -1))
        assert (rows[BASE_VOCAB:] - start).abs().amin(dim=1).gt(0).all(), key  # every added row trained

    want = _logits(module.model)
    if quantize:
        base = load_pretrained_causal_lm(str(files / name), quantize="nf4", skip=("lm_head",),
                                         torch_dtype=torch.float32)
    else:
        base = AutoModelForCausalLM.from_pretrained(files / name, local_files_only=True)
    base.resize_token_embeddings(len(AutoTokenizer.from_pretrained(tmp_path / "adapter")))
    assert torch.equal(_logits(PeftModel.from_pretrained(base, tmp_path / "adapter")), want)


def test_full_finetune_of_a_tied_model_saves_a_model_from_pretrained_loads(files, tmp_path):
    """Full fine-tune of the tied Qwen2: the saved directory has 302 rows, the head still tied, and loads with
    ``from_pretrained`` with the module's logits; the added rows moved from the mean they started at."""
    from transformers import AutoModelForCausalLM

    module = CausalLMModule(model_name_or_path=str(files / "qwen"), resize_embeddings=True,
                            save_dir=str(tmp_path / "full"), optimizer="adamw", lr=1e-2)
    _fit(module, files)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "full", local_files_only=True)
    assert loaded.config.vocab_size == VOCAB and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(_logits(loaded), _logits(module.model))
    start = _checkpoint_rows(files, "qwen")["embed"].mean(0)
    assert (loaded.model.embed_tokens.weight[BASE_VOCAB:] - start).abs().amin(dim=1).gt(0).all()


def test_without_the_option_the_refusal_names_it_before_reading_weights(files, tmp_path):
    """A checkpoint directory holding only ``config.json``: the refusal is the vocabulary one, naming
    ``resize_embeddings`` (so it came before any weight was read); a model built from a config is told to set
    ``config['vocab_size']``."""
    (tmp_path / "config-only").mkdir()
    shutil.copy(files / "llama" / "config.json", tmp_path / "config-only")
    module = CausalLMModule(model_name_or_path=str(tmp_path / "config-only"), lora={"r": 4}, optimizer="adamw")
    with pytest.raises(ValueError, match=r"has 302 token ids but the model embeds only 300 \(resize_embeddings=False\)"
                                         r"; pass resize_embeddings=True \(--model.resize_embeddings true\)"):
        _fit(module, files)
    module = CausalLMModule(config={**TINY, "vocab_size": BASE_VOCAB}, optimizer="adamw")
    with pytest.raises(ValueError, match=r"embeds only 300; set config\['vocab_size'\] >= 302"):
        _fit(module, files)


@pytest.mark.parametrize("value", [0, -3, "yes", 2.5])
def test_bad_resize_embeddings_is_named(value):
    with pytest.raises(ValueError, match=rf"Invalid resize_embeddings={value!r}: expected True"):
        CausalLMModule(config=TINY, resize_embeddings=value)


def _recipe(files: Path, name: str, model: dict, steps: int) -> Path:
    """``files/name``: the tiny recipe on the chat data and tokenizer with ``model`` init args (its ``config``
    replaced), checkpoints every 2 steps into ``ckpts-NAME/`` (all kept)."""
    return chat_recipe(files, name, model, steps, "chattok")


_lowmem = run_lowmem


QLORA = {"quantize": "nf4", "lora": {"r": 4}, "resize_embeddings": True}


@pytest.fixture(scope="module")
def qlora_runs() -> dict:
    """The folders :func:`qlora_run` trained in (once per module)."""
    return {}


@pytest.fixture
def qlora_run(files, qlora_runs, capsys) -> Path:
    """``qlora.yaml`` (NF4 Llama + LoRA, resize_embeddings) trained 4 steps by ``lowmem fit``, once per module;
    adapter in ``qlora-adapter/``, checkpoints at steps 2 and 4 in ``ckpts-qlora/``. The run only makes the files the
    tests read, so it calls lowmem's entry point in this process (its stderr as a process's,
    :func:`lowmem_calls.stderr_as_in_a_process`); the -m slow resume runs real ``lowmem`` processes."""
    if files not in qlora_runs:
        _recipe(files, "qlora.yaml", {"model_name_or_path": str(files / "llama"), "save_dir": "qlora-adapter",
                                      **QLORA}, steps=4)
        with pytest.MonkeyPatch.context() as patch:
            stderr_as_in_a_process(patch)
            proc = lowmem_in_process(capsys, patch, files, "fit", "--config", "qlora.yaml", columns="200")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "grew from 300 to 302 rows" in proc.stderr
        qlora_runs[files] = proc
    return files


def test_lowmem_fit_qlora_adapter_reloads_with_the_checkpoints_logits(qlora_run):
    """``lowmem fit`` (QLoRA on the untied Llama): ``load_from_checkpoint`` (no data module) rebuilds 302 rows from
    the recorded hyperparameters, and the adapter ``save_dir`` got loads on the NF4 base grown to the tokenizer's
    length with that module's logits exactly."""
    from peft import PeftModel

    from lowmem_lightning.quant import load_pretrained_causal_lm

    files = qlora_run
    module = CausalLMModule.load_from_checkpoint(files / "ckpts-qlora" / "step=4.ckpt", map_location="cpu")
    assert module.hparams.resize_embeddings == VOCAB
    base = load_pretrained_causal_lm(str(files / "llama"), quantize="nf4", skip=("lm_head",), torch_dtype=torch.float32)
    base.resize_token_embeddings(VOCAB)
    assert torch.equal(_logits(PeftModel.from_pretrained(base, files / "qlora-adapter")), _logits(module.model))


@pytest.mark.slow
def test_lowmem_fit_resumes_bit_equal_and_exports_a_merged_model(qlora_run):
    """``lowmem fit --ckpt_path`` from the step-2 checkpoint rebuilds the same shapes and reaches the step-4 weights
    of the straight run bit for bit; ``lowmem export --save_merged true`` of that checkpoint writes a 302-row model
    that ``from_pretrained`` loads with the module's logits (fp32 merge rounding)."""
    from transformers import AutoModelForCausalLM

    files = qlora_run
    resumed = _recipe(files, "resumed.yaml", {"model_name_or_path": str(files / "llama"), **QLORA}, steps=4)
    _lowmem(files, "fit", "--config", resumed.name, "--ckpt_path", str(files / "ckpts-qlora" / "step=2.ckpt"))
    straight = torch.load(files / "ckpts-qlora" / "step=4.ckpt", map_location="cpu", weights_only=False)
    again = torch.load(files / "ckpts-resumed" / "step=4.ckpt", map_location="cpu", weights_only=False)
    assert straight["state_dict"].keys() == again["state_dict"].keys()
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, again["state_dict"][key]), key

    _lowmem(files, "export", "--config", "qlora.yaml", "--ckpt_path", str(files / "ckpts-qlora" / "step=4.ckpt"),
            "--save_dir", "merged", "--save_merged", "true")
    merged = AutoModelForCausalLM.from_pretrained(files / "merged", local_files_only=True)
    assert merged.config.vocab_size == VOCAB
    module = CausalLMModule.load_from_checkpoint(files / "ckpts-qlora" / "step=4.ckpt", map_location="cpu")
    torch.testing.assert_close(_logits(merged), _logits(module.model), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "qwen"])
def test_estimate_counts_the_added_rows_as_the_built_model_has_them(files, tmp_path, capsys, name):
    """``lowmem estimate`` of a QLoRA recipe with ``resize_embeddings``: its parameter and trainable counts are the
    built model's exactly, the trainable ones ``2 x 64`` per trained layer more than without the option (Llama: the
    embedding and the head; Qwen2: the tied pair, once), and AdamW's state covers them."""
    from lowmem_lightning.estimate import count_model
    from lowmem_lightning.modules.causal_lm import build_causal_lm

    built = build_causal_lm(str(files / name), quantize="nf4", lora={"r": 4}, vocab_size=VOCAB,
                            resize_embeddings=True)
    counts = {}
    for resize in (True, False):
        recipe = _recipe(files, f"estimate-{name}-{resize}.yaml",
                         {"model_name_or_path": str(files / name), **QLORA, "resize_embeddings": resize}, steps=4)
        assert main(["estimate", "--config", str(recipe), "--format", "json"]) == 0
        counts[resize] = json.loads(capsys.readouterr().out)
    assert counts[True]["params"] == count_model(built).params  # NF4 weights counted as the params they hold
    trainable = sum(p.numel() for p in built.parameters() if p.requires_grad)
    assert counts[True]["trainable_params"] == trainable
    layers = 2 if name == "llama" else 1
    assert trainable - counts[False]["trainable_params"] == layers * len(ADDED) * TINY["hidden_size"]
    extra_state = counts[True]["optimizers"]["adamw"]["state_bytes"] - counts[False]["optimizers"]["adamw"][
        "state_bytes"]
    assert extra_state == 8 * layers * len(ADDED) * TINY["hidden_size"] + 4 * layers  # m, v and a step per tensor
    # activations: what the trained rows keep at the peak (tests/test_token_rows_memory.py), under one copy of a head
    extra_activations = counts[True]["activation_bytes"] - counts[False]["activation_bytes"]
    assert "trained token rows" in counts[True]["activation_detail"]
    assert 0 < extra_activations < VOCAB * TINY["hidden_size"] * 2
