"""Muon through LowMemOptimizerCallback: the hybrid split by name, settings translated, resume, FSDP1 refused."""

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lowmem_lightning.callbacks import LowMemOptimizerCallback
from lowmem_lightning.callbacks.strategy_check import refuse_fsdp1


class TinyLM(L.LightningModule):
    """Embedding, two hidden matrices, a norm and an untied head: what the split must tell apart."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(40, 64)
        self.hidden = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64))
        self.norm = nn.LayerNorm(64)
        self.lm_head = nn.Linear(64, 40, bias=False)

    def training_step(self, batch, batch_idx):
        (idx,) = batch
        logits = self.lm_head(self.norm(self.hidden(self.embed_tokens(idx[:, :-1]))))
        return nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3, betas=(0.8, 0.99), eps=1e-6)


def _data():
    idx = torch.randint(0, 40, (32, 9), generator=torch.Generator().manual_seed(3))
    return DataLoader(TensorDataset(idx), batch_size=8)


def _fit(root, max_epochs: int, ckpt_path=None, name="muon_8bit"):
    torch.manual_seed(0)
    model = TinyLM()
    callback = LowMemOptimizerCallback(name, print_summary=False, plot=False)
    trainer = L.Trainer(accelerator="cpu", max_epochs=max_epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                        callbacks=[callback])
    trainer.fit(model, _data(), ckpt_path=ckpt_path)
    return trainer, model, callback


def test_callback_builds_the_hybrid_and_translates_adamw_settings(tmp_path):
    _, model, callback = _fit(tmp_path, 1)
    (opt,) = callback.optimizers
    assert type(opt).__name__ == "Muon8bit"
    muon = {n for n, p in model.named_parameters() if {"momentum_codes", "momentum_buffer"} & set(opt.state[p])}
    assert muon == {"hidden.0.weight", "hidden.2.weight"}
    for name in ("embed_tokens.weight", "lm_head.weight", "norm.weight", "hidden.0.bias"):
        assert {"exp_avg_codes", "exp_avg"} & set(opt.state[model.get_parameter(name)]), name
    group = opt.param_groups[0]
    assert group["lr"] == 3e-3 and group["momentum"] == 0.8  # AdamW's beta1 is the momentum coefficient
    assert group["adamw_betas"][1] == 0.99 and group["adamw_eps"] == 1e-6
    assert group["param_names"] == [n for n, _ in model.named_parameters()]


@pytest.mark.parametrize("name", ["muon", "muon_8bit"])
def test_resume_from_a_checkpoint_is_bit_exact(tmp_path, name):
    _, straight, _ = _fit(tmp_path / "straight", 2, name=name)
    first, _, _ = _fit(tmp_path / "first", 1, name=name)
    first.save_checkpoint(tmp_path / "epoch1.ckpt")
    _, resumed, _ = _fit(tmp_path / "resumed", 2, ckpt_path=tmp_path / "epoch1.ckpt", name=name)
    for (n, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("name", ["muon", "muon_8bit"])
def test_fsdp1_is_refused_before_any_work(name):
    from lightning.pytorch.strategies import FSDPStrategy

    with pytest.raises(ValueError, match=rf"optimizer='{name}' with strategy=FSDPStrategy.*ModelParallelStrategy"):
        refuse_fsdp1(FSDPStrategy(), name)
