"""Every registered optimizer goes through the callback: swapped in, trained, its metrics logged."""

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lowmem_lightning.callbacks import LowMemOptimizerCallback
from lowmem_lightning.optim import available_optimizers, optimizer_class, state_memory

OWN_STEP = ("adafactor",)  # lr=None by default: it computes its step size


class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 80), nn.Tanh(), nn.Linear(80, 64), nn.Tanh(), nn.Linear(64, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("name", available_optimizers())
def test_each_optimizer_trains_through_the_callback(tmp_path, name):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(24, 16, generator=g)
    model = Net()
    before = [p.detach().clone() for p in model.parameters()]
    logger = CSVLogger(tmp_path)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, logger=logger, log_every_n_steps=1, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[LowMemOptimizerCallback(name, lr=None if name in OWN_STEP else 1e-2, print_summary=False)],
    )
    trainer.fit(model, DataLoader(TensorDataset(x, torch.sin(x[:, :1])), batch_size=8))
    opt = trainer.optimizers[0]
    assert type(opt) is optimizer_class(name)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("optim/state_MiB")]
    assert len(rows) == 3
    assert float(rows[-1]["optim/state_MiB"]) * 2**20 == pytest.approx(state_memory(opt).total_bytes)
    has_effective_lr = any("effective_lr" in g or "effective_lr_tensor" in g for g in opt.param_groups)
    assert bool(rows[-1].get("optim/effective_lr")) == has_effective_lr
    assert bool(rows[-1].get("optim/state_MiB_host")) == bool(getattr(opt, "is_paged", False))
    if name in ("adafactor", "came"):
        assert has_effective_lr


def test_own_step_size_optimizer_refuses_a_module_scheduler(tmp_path):
    class Scheduled(Net):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, 2)]

    g = torch.Generator().manual_seed(4)
    x = torch.randn(8, 16, generator=g)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[LowMemOptimizerCallback("adafactor", print_summary=False)],
    )
    with pytest.raises(ValueError, match="computes its own step size.*StepLR"):
        trainer.fit(Scheduled(), DataLoader(TensorDataset(x, x[:, :1]), batch_size=8))


@pytest.mark.parametrize("name", ["came", "adamw_8bit", "sgd"])
def test_lr_none_keeps_the_module_learning_rate(tmp_path, name):
    # CAME needs an lr: with the callback's lr=None it takes the module's (0.1 here), per group
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(4))
    callback = LowMemOptimizerCallback(name, print_summary=False, plot=False)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[callback],
    )
    trainer.fit(Net(), DataLoader(TensorDataset(x, x[:, :1]), batch_size=8))
    assert type(trainer.optimizers[0]) is optimizer_class(name)
    assert [g["lr"] for g in trainer.optimizers[0].param_groups] == [0.1]


def test_came_without_any_learning_rate_is_refused():
    from lowmem_lightning.optim import build_optimizer

    with pytest.raises(ValueError, match="Invalid lr=None: CAME requires a learning rate"):
        build_optimizer("came", [nn.Parameter(torch.zeros(3))])
