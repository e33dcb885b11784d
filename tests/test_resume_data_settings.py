"""A resume (``trainer.fit(..., ckpt_path=...)``, as ``lowmem fit --ckpt_path`` runs it) with another tokenizer or
another data setting that changes the blocks says so in the data module's one warning, as changed data files do;
the same settings say nothing, and a checkpoint written before these were kept resumes silently."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from tiny_tokenizers import word_tokenizer

from lowmem_lightning.data import TextDataModule

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
DATA = {"seq_len": 32, "batch_size": 4, "val_fraction": 0.1}


def _corpus(folder: Path) -> Path:
    """Plain text and instruction records (with and without ``input``), so every setting shapes the blocks."""
    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    words = [WORDS[i] for i in torch.randint(len(WORDS), (1200,), generator=generator)]
    (folder / "text.txt").write_text(" ".join(words))
    records = [{"instruction": " ".join(words[i:i + 3]), "input": words[i + 3] if i % 2 else "",
                "output": " ".join(words[i + 4:i + 12])} for i in range(0, 400, 13)]
    (folder / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def _fit(root: Path, data: Path, max_steps: int, ckpt_path: Path | None = None, **data_kwargs) -> str:
    """The tiny model fitted through ``trainer.fit``; returns the data module's resume warning ('' when none)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lowmem_lightning.callbacks import LowMemOptimizerCallback
    from lowmem_lightning.modules.causal_lm import CausalLMModule

    L.seed_everything(7, verbose=False)
    model = CausalLMModule(config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                   "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 300}, lr=1e-3)
    dm = TextDataModule(str(data), **{**DATA, **data_kwargs})
    trainer = L.Trainer(
        accelerator="cpu", max_steps=max_steps, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
        callbacks=[LowMemOptimizerCallback("adamw_8bit", lr=1e-3, plot=False, print_summary=False),
                   ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=2, save_top_k=-1)],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, dm, ckpt_path=ckpt_path)
    assert trainer.global_step == max_steps
    return "\n".join(str(w.message) for w in caught if "data changed since the checkpoint" in str(w.message))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, Path, Path]:
    """``(data folder, tokenizer folder, step=2.ckpt)`` of a 2-step fit with the byte tokenizer."""
    root = tmp_path_factory.mktemp("resume_data")
    data = _corpus(root / "data")
    tokenizer = word_tokenizer(root / "words_tok", WORDS)
    assert _fit(root / "run", data, max_steps=2) == ""
    return data, tokenizer, root / "run" / "step=2.ckpt"


@pytest.mark.parametrize(("change", "said"), [
    ({}, None),
    ({"tokenizer": "TOKENIZER"}, "tokenizer: tokenizer='byte' (sha256 "),
    ({"prompt_template": "Q: {instruction} {input} A: "}, "prompt_template: '### Instruction:\\n{instr"),
    ({"prompt_template_no_input": "Q: {instruction} A: "}, "prompt_template_no_input: '### Instruction"),
    ({"seq_len": 24}, "seq_len: 32 -> 24"),
    ({"pack": False}, "pack: True -> False"),
    ({"isolate_documents": False}, "isolate_documents: True -> False"),
    ({"val_fraction": 0.2}, "val_fraction: 0.1 -> 0.2"),
    ({"seed": 3}, "seed: 42 -> 3"),
], ids=lambda v: next(iter(v), "same") if isinstance(v, dict) else None)
def test_a_resume_with_another_data_setting_says_so(saved, tmp_path, change, said):
    data, tokenizer, ckpt = saved
    change = {k: str(tokenizer) if v == "TOKENIZER" else v for k, v in change.items()}
    message = _fit(tmp_path, data, max_steps=3, ckpt_path=ckpt, **change)
    if said is None:
        assert message == ""
        return
    assert said in message and "position in the epoch applies to other blocks" in message
    assert message.count("\n  - ") == 1 + ("pack" in change), message  # pack=False also ends isolation
    if "tokenizer" in change:
        assert f"-> tokenizer='{tokenizer}'" in message and "token ids stand for other text" in message


def test_an_evaluation_of_the_checkpoint_with_another_split_says_its_held_out_blocks_differ(saved):
    """``trainer.validate(..., ckpt_path=...)`` restores the data module's state too: another ``seed`` holds out other
    blocks, some of them trained on by the checkpoint's run."""
    from lowmem_lightning.modules.causal_lm import CausalLMModule

    data, _, ckpt = saved
    model = CausalLMModule(config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                   "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 300})
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.validate(model, TextDataModule(str(data), **{**DATA, "seed": 3}), ckpt_path=ckpt, verbose=False)
    said = [str(w.message) for w in caught if "data changed since the checkpoint" in str(w.message)]
    assert len(said) == 1 and "seed: 42 -> 3" in said[0], said
    assert "the held-out blocks this run evaluates are not the ones the checkpoint's run held out" in said[0]


def test_a_checkpoint_without_the_settings_resumes_silently(saved, tmp_path):
    """A checkpoint written before the tokenizer and settings were kept (its data files only) says nothing."""
    data, _, ckpt = saved
    old = torch.load(ckpt, weights_only=True)
    state = old["TextDataModule"]
    assert {"tokenizer", "settings"} <= set(state)
    old["TextDataModule"] = {"data_files": state["data_files"]}
    torch.save(old, tmp_path / "old.ckpt")
    assert _fit(tmp_path, data, max_steps=3, ckpt_path=tmp_path / "old.ckpt", seq_len=24, seed=3) == ""


def test_the_tokenizer_fingerprint_is_its_files_not_its_folder(tmp_path):
    """The same tokenizer files in another folder are the same tokenizer; one more word in the vocabulary is not;
    an edited chat template alone is not a tokenizer change (the chat template has its own entry)."""
    data = _corpus(tmp_path / "data")
    first = word_tokenizer(tmp_path / "a", WORDS)
    state = TextDataModule(str(data), tokenizer=str(first), **DATA).state_dict()
    copy = Path(shutil.copytree(first, tmp_path / "copy"))
    config = json.loads((copy / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "{{ messages }}"}))
    other = word_tokenizer(tmp_path / "b", [*WORDS, "iota"])

    def said(tokenizer: Path) -> str:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            TextDataModule(str(data), tokenizer=str(tokenizer), **DATA).load_state_dict(state)
        return "\n".join(str(w.message) for w in caught)

    assert said(copy) == ""
    assert f"tokenizer: tokenizer='{first}'" in said(other)
