"""Bit-exact resume of models with dropout: the random generators' states travel in every checkpoint
(:mod:`lowmem_lightning.callbacks.rng_state`) and ``TextDataModule``'s loaders draw their iterators' base seeds from
their own generator, not torch's global one.

Before, ``lowmem fit`` on a GPT-2 (dropout 0.1), SIGKILLed after its step-100 checkpoint and resumed with
``--ckpt_path last``, ended at step 300 with other weights and optimizer state than the uninterrupted run (a
dropout-free model resumed bit for bit): Lightning's checkpoints hold no generator state, and the validation run
between the checkpoint and the next step drew a base seed from the global generator."""

from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lowmem_lightning.callbacks import LowMemOptimizerCallback
from lowmem_lightning.callbacks.rng_state import RngStateCheckpoint, capture_rng_states, restore_rng_states
from lowmem_lightning.data import TextDataModule
from lowmem_lightning.modules.causal_lm import CausalLMModule

GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 64}  # dropout 0.1 throughout


def _draws() -> tuple:
    return torch.rand(3).tolist(), random.random(), float(np.random.rand())


def test_states_round_trip_and_load_with_weights_only(tmp_path):
    states = capture_rng_states()
    first = _draws()
    torch.save({"callbacks": {"RngStateCheckpoint": states}}, tmp_path / "c.ckpt")
    loaded = torch.load(tmp_path / "c.ckpt", weights_only=True)["callbacks"]["RngStateCheckpoint"]
    restore_rng_states(loaded)
    assert _draws() == first


def _fit_gpt2(root, steps: int, ckpt_path=None) -> dict:
    L.seed_everything(0)
    module = CausalLMModule(config=GPT2, optimizer="adamw_8bit", lr=1e-3)
    data = TextDataModule("sample", seq_len=32, batch_size=2, val_fraction=0.05)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, val_check_interval=2, limit_val_batches=1,
                        num_sanity_val_steps=0, default_root_dir=root,
                        callbacks=[ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2, save_top_k=-1)])
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return {key: value.clone() for key, value in module.state_dict().items()}


def test_causal_lm_with_dropout_resumes_bit_for_bit(tmp_path):
    whole = _fit_gpt2(tmp_path / "a", steps=4)
    _fit_gpt2(tmp_path / "b", steps=2)
    resumed = _fit_gpt2(tmp_path / "c", steps=4, ckpt_path=tmp_path / "b" / "ckpt" / "epoch=0-step=2.ckpt")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[key], resumed[key]) for key in whole)


class _Dropout(L.LightningModule):
    """A user's own module with dropout and its own optimizer, under LowMemOptimizerCallback."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.Dropout(0.5), nn.Linear(64, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        data = TensorDataset(torch.randn(64, 16, generator=torch.Generator().manual_seed(1)), torch.randn(64, 1))
        # its own generator: an iterator's base seed is not drawn from the global one (a plain loader's mid-epoch
        # position and shuffle are the user's to make resumable: a StatefulDataLoader, as TextDataModule's)
        return DataLoader(data, batch_size=8, generator=torch.Generator().manual_seed(2))


def _fit_own(root, steps: int, ckpt_path=None) -> dict:
    L.seed_everything(0)
    module = _Dropout()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root,
                        callbacks=[LowMemOptimizerCallback("adamw_8bit", plot=False, print_summary=False),
                                   ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=8, save_top_k=-1)])
    trainer.fit(module, ckpt_path=ckpt_path)
    assert any(isinstance(c, RngStateCheckpoint) for c in trainer.callbacks)
    return {key: value.clone() for key, value in module.state_dict().items()}


def test_a_users_module_with_dropout_under_the_callback_resumes_bit_for_bit(tmp_path):
    whole = _fit_own(tmp_path / "a", steps=12)  # 8 batches an epoch: the checkpoint at the end of the first
    _fit_own(tmp_path / "b", steps=8)
    resumed = _fit_own(tmp_path / "c", steps=12, ckpt_path=tmp_path / "b" / "ckpt" / "epoch=0-step=8.ckpt")
    assert all(torch.equal(whole[key], resumed[key]) for key in whole)
