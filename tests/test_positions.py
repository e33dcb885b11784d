"""Position ids past a model's position table: a GPT-2-class checkpoint (learned absolute positions) with ``seq_len``
above its ``n_positions`` is refused before any weight is read or step taken, naming ``seq_len`` (it failed at the
first forward with ``IndexError: index out of range in self``); a pretrained RoPE model past its
``max_position_embeddings`` gets a warning; the data's position ids are what is checked."""

from __future__ import annotations

import warnings

import lightning as L
import numpy as np
import pytest
import torch
from lowmem_calls import lowmem_in_process
from transformers import AutoConfig

from lowmem_lightning.data import TextDataModule
from lowmem_lightning.data.tokens import PackedBlocks, flat_positions
from lowmem_lightning.lowmem_warning import LowMemWarning
from lowmem_lightning.modules.causal_lm import CausalLMModule
from lowmem_lightning.modules.positions import learned_position_tables, position_problem

SMALL = {"gpt2": {"n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 64},
         "opt": {"hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                 "word_embed_proj_dim": 32, "max_position_embeddings": 64},
         "llama": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                   "num_key_value_heads": 2, "max_position_embeddings": 64}}


def _config(model_type: str):
    return AutoConfig.for_model(model_type, vocab_size=300, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                                **SMALL[model_type])


def _checkpoint(tmp_path, model_type: str) -> str:
    from transformers import AutoModelForCausalLM

    path = tmp_path / model_type
    AutoModelForCausalLM.from_config(_config(model_type)).save_pretrained(path)
    return str(path)


def _data(tmp_path, seq_len: int, **kwargs) -> TextDataModule:
    (tmp_path / "d.txt").write_text("the quick brown fox jumps over the lazy dog. " * 60)
    return TextDataModule(str(tmp_path / "d.txt"), seq_len=seq_len, batch_size=2, val_fraction=0.1, **kwargs)


def _trainer(tmp_path, steps: int = 2) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                     default_root_dir=tmp_path)


@pytest.mark.parametrize("model_type, table", [("gpt2", "transformer.wpe"), ("opt", "model.decoder.embed_positions")])
def test_learned_position_tables_are_found_on_the_meta_device(model_type, table):
    assert learned_position_tables(_config(model_type)) == [table]  # OPT's has 2 rows more than its limit
    assert learned_position_tables(_config("llama")) == []


def test_position_problem_refuses_a_short_table_and_warns_for_unscaled_rope():
    error, warning = position_problem(_config("gpt2"), max_position_id=127, seq_len=128, pretrained=True)
    assert warning is None and "Invalid seq_len=128" in error and "transformer.wpe" in error
    assert "max_position_embeddings=64" in error and "--data.seq_len 64" in error
    assert position_problem(_config("gpt2"), max_position_id=63, seq_len=128, pretrained=True) == (None, None)
    error, warning = position_problem(_config("llama"), max_position_id=127, seq_len=128, pretrained=True)
    assert error is None and "position ids up to 127" in warning and "max_position_embeddings=64" in warning
    assert position_problem(_config("llama"), 127, 128, pretrained=False) == (None, None)  # learned from scratch
    scaled = _config("llama")
    scaled.rope_parameters = {**scaled.rope_parameters, "rope_type": "linear", "factor": 2.0}
    assert position_problem(scaled, 127, 128, pretrained=True) == (None, None)


def test_max_position_id_of_blocks():
    ids = np.arange(20, dtype=np.int32)
    trained = np.ones(20, dtype=bool)
    # documents of 5, 9 and 6 tokens in blocks of 8: positions restart at each document and each block
    positions = flat_positions(np.array([0, 5, 14]), 20, 8)
    blocks = PackedBlocks(ids, trained, np.array([0, 8, 16]), np.array([8, 8, 4]), 8, 0, positions)
    assert blocks.max_position_id() == max(int(blocks["position_ids"].max()), 3)  # the padding runs 0..3
    assert blocks.select(torch.tensor([0, 1])).max_position_id() == 5  # shared arrays: an upper bound
    no_positions = PackedBlocks(ids, trained, np.array([0, 8, 16]), np.array([8, 8, 4]), 8, 0)
    assert no_positions.max_position_id() == 7


def test_text_data_module_says_its_positions(tmp_path):
    dm = _data(tmp_path, seq_len=32)
    assert dm.max_position_id() is None  # before the data is read
    dm.check_inputs()
    assert dm.max_position_id() == 31  # one long document: every block runs 0..31


@pytest.mark.parametrize("model_type", ["gpt2", "opt"])
def test_fit_refuses_seq_len_past_a_learned_table_before_any_step(tmp_path, model_type):
    module = CausalLMModule(model_name_or_path=_checkpoint(tmp_path, model_type), optimizer="adamw")
    trainer = _trainer(tmp_path)
    with pytest.raises(ValueError, match=r"Invalid seq_len=128 for this model: its learned position embeddings"):
        trainer.fit(module, datamodule=_data(tmp_path, seq_len=128))
    assert trainer.global_step == 0 and module.model is None  # refused before the checkpoint's weights were read


def test_fit_at_the_table_size_trains(tmp_path):
    module = CausalLMModule(model_name_or_path=_checkpoint(tmp_path, "gpt2"), optimizer="adamw")
    trainer = _trainer(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LowMemWarning)
        trainer.fit(module, datamodule=_data(tmp_path, seq_len=64))
    assert trainer.global_step == 2


def test_pretrained_rope_model_past_its_positions_warns_once(tmp_path):
    module = CausalLMModule(model_name_or_path=_checkpoint(tmp_path, "llama"), optimizer="adamw")
    with pytest.warns(LowMemWarning, match=r"position ids up to 127, past its max_position_embeddings=64") as seen:
        _trainer(tmp_path, steps=1).fit(module, datamodule=_data(tmp_path, seq_len=128))
    assert sum("max_position_embeddings" in str(w.message) for w in seen) == 1


def test_lowmem_fit_refuses_with_one_message_and_writes_nothing(tmp_path, capsys, monkeypatch):
    checkpoint = _checkpoint(tmp_path, "gpt2")
    work = tmp_path / "work"
    work.mkdir()
    result = lowmem_in_process(capsys, monkeypatch, work, "fit", "--config", "tiny.yaml",
                               "--model.model_name_or_path", checkpoint, "--model.config", "null",
                               "--data.seq_len", "128", "--trainer.max_steps", "2")
    assert result.returncode == 2, result.stderr
    assert "Invalid seq_len=128 for this model" in result.stderr and "--data.seq_len 64" in result.stderr
    assert "Traceback" not in result.stderr and "IndexError" not in result.stderr.replace("(IndexError)", "")
    assert list(work.iterdir()) == []


def test_blocks_are_not_read_when_seq_len_fits_the_table(tmp_path, monkeypatch):
    """No block of ``seq_len`` tokens can pass a table of ``seq_len`` or more rows: the data's positions (a pass
    over every token of a large memory-mapped cache) are not read then."""
    def unread(self):
        raise AssertionError("max_position_id read although seq_len fits")

    monkeypatch.setattr(TextDataModule, "max_position_id", unread)
    module = CausalLMModule(model_name_or_path=_checkpoint(tmp_path, "gpt2"), optimizer="adamw")
    trainer = _trainer(tmp_path, steps=1)
    trainer.fit(module, datamodule=_data(tmp_path, seq_len=64))
    assert trainer.global_step == 1
