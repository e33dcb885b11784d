"""Checkpoints with the swapped-in optimizer: quantized state inside, bit-exact resume, optimizer changes."""

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lowmem_lightning.callbacks import LowMemOptimizerCallback
from lowmem_lightning.optim import optimizer_class

OPT = "adamw_8bit"


class Net(L.LightningModule):
    """A 5120-element weight (quantized state) plus small tensors (32-bit state), AdamW + StepLR."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 80), nn.Tanh(), nn.Linear(80, 64), nn.Tanh(), nn.Linear(64, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-3)
        return [opt], [{"scheduler": torch.optim.lr_scheduler.StepLR(opt, 2, 0.7), "interval": "step"}]


def _data():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(24, 16, generator=g)
    return DataLoader(TensorDataset(x, torch.sin(x[:, :1])), batch_size=8)  # 3 steps per epoch


def _fit(tmp_path, max_epochs, optimizer=OPT, ckpt_path=None, callbacks=True):
    torch.manual_seed(0)
    model = Net()
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=max_epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[LowMemOptimizerCallback(optimizer, lr=2e-3, print_summary=False)] if callbacks else [],
    )
    trainer.fit(model, _data(), ckpt_path=ckpt_path)
    return trainer, model


def test_resume_is_bit_exact_and_checkpoint_holds_quantized_state(tmp_path):
    _, straight = _fit(tmp_path / "a", max_epochs=2)

    first, _ = _fit(tmp_path / "b", max_epochs=1)
    path = tmp_path / "epoch1.ckpt"
    first.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    states = checkpoint["optimizer_states"][0]["state"]
    dtypes = {value.dtype for state in states.values() for value in state.values()}
    assert {torch.int8, torch.uint8} <= dtypes  # 8-bit codes travel in the checkpoint
    assert checkpoint["callbacks"]["LowMemOptimizerCallback"]["optimizer"] == OPT

    resumed_trainer, resumed = _fit(tmp_path / "c", max_epochs=2, ckpt_path=path)
    assert resumed_trainer.global_step == 6
    assert type(resumed_trainer.optimizers[0]) is optimizer_class(OPT)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert resumed_trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(2e-3 * 0.7**3)


def test_resume_with_another_optimizer_is_a_clear_error(tmp_path):
    first, _ = _fit(tmp_path, max_epochs=1)
    path = tmp_path / "epoch1.ckpt"
    first.save_checkpoint(path)
    with pytest.raises(ValueError, match=r"trained with optimizer 'adamw_8bit'.*optimizer='sgd'.*Resume with"):
        _fit(tmp_path, max_epochs=2, optimizer="sgd", ckpt_path=path)


def test_plain_torch_adamw_checkpoint_is_recognised(tmp_path):
    first, _ = _fit(tmp_path, max_epochs=1, callbacks=False)  # the module's own torch AdamW
    path = tmp_path / "plain.ckpt"
    first.save_checkpoint(path)
    with pytest.raises(ValueError, match="trained with optimizer 'adamw'"):
        _fit(tmp_path, max_epochs=2, optimizer="sgd", ckpt_path=path)


def test_fp32_adamw_checkpoint_converts_to_8bit(tmp_path):
    first, _ = _fit(tmp_path, max_epochs=1, optimizer="adamw")
    path = tmp_path / "fp32.ckpt"
    first.save_checkpoint(path)
    fp32_states = first.optimizers[0].state_dict()["state"]
    trainer, model = _fit(tmp_path, max_epochs=2, optimizer=OPT, ckpt_path=path)
    assert trainer.global_step == 6
    opt = trainer.optimizers[0]
    assert type(opt) is optimizer_class(OPT)
    dtypes = {v.dtype for state in opt.state.values() for v in state.values()}
    assert torch.uint8 in dtypes
    assert len(opt.state) == len(fp32_states)
    assert all(torch.isfinite(p).all() for p in model.parameters())
