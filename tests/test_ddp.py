"""DDP on CPU (gloo, 2 processes) with the swapped-in optimizer matches 1 process on the same global batch.

The fast test forks the 2 ranks (``ddp_fork``: DDPStrategy with a fork launcher; rank 0's weights come
back to this process). The slow one runs a script under ``strategy="ddp"``, which re-launches it as
rank 1, the way users run DDP.
"""

import os
import textwrap

import lightning as L
import pytest
import torch
from launched_scripts import run_script
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lowmem_lightning.callbacks import LowMemOptimizerCallback

OPT = "adamw_8bit"
GLOBAL_BATCH = 16


class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 80), nn.Tanh(), nn.Linear(80, 64), nn.Tanh(), nn.Linear(64, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _data(batch_size, distributed):
    """4 global batches. Under DDP Lightning shards the data with a shuffling DistributedSampler (seed 0):
    rank r takes ``perm[r::2]``, so global batch k is ``perm[16k:16k+16]``; 1 process reads that order."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4 * GLOBAL_BATCH, 16, generator=g)
    dataset = TensorDataset(x, torch.cos(x[:, :1]))
    if distributed:
        return DataLoader(dataset, batch_size=batch_size)
    perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    return DataLoader(dataset, batch_size=batch_size, sampler=perm)


def _fit(tmp_path, strategy, devices):
    torch.manual_seed(0)
    model = Net()
    trainer = L.Trainer(
        accelerator="cpu", strategy=strategy, devices=devices, max_steps=4, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, callbacks=[LowMemOptimizerCallback(OPT, lr=1e-2, print_summary=False)],
    )
    trainer.fit(model, _data(GLOBAL_BATCH // devices, distributed=devices > 1))
    return trainer, model


def test_ddp_two_processes_match_one(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    # Lightning gives each forked rank 1 thread unless OMP_NUM_THREADS is set; a forked child that
    # inherits a multi-threaded OpenMP pool from this process can hang
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    # the DistributedSampler seeds its shuffle from PL_GLOBAL_SEED, which any earlier seed_everything leaves set
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    _, single = _fit(tmp_path / "single", "auto", 1)
    trainer, ddp = _fit(tmp_path / "ddp", "ddp_fork", 2)
    assert trainer.world_size == 2
    torch.manual_seed(0)
    start = Net()
    moved = 0.0
    for a, b, s in zip(single.parameters(), ddp.parameters(), start.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=2e-5)
        moved = max(moved, (a - s).abs().max().item())
    assert moved > 1e-3  # training moved the weights, so the comparison means something


SCRIPT = """
import sys
import lightning as L
import torch
sys.path.insert(0, {tests_dir!r})
from test_ddp import _fit

trainer, model = _fit({out!r}, "ddp", 2)
if trainer.global_rank == 0:
    params = [p.detach() for p in model.parameters()]
    torch.save({{"params": params, "optimizer": type(trainer.optimizers[0]).__name__}}, {out!r} + "/ddp.pt")
"""


@pytest.mark.slow
def test_ddp_strategy_script_matches_one_process(tmp_path):
    script = tmp_path / "run_ddp.py"
    script.write_text(textwrap.dedent(SCRIPT.format(tests_dir=os.path.dirname(__file__), out=str(tmp_path))))
    run_script(script, cwd=tmp_path, timeout=600)
    result = torch.load(tmp_path / "ddp.pt")
    _, single = _fit(tmp_path / "single", "auto", 1)
    assert result["optimizer"] == "AdamW8bit"
    for a, b in zip(single.parameters(), result["params"]):
        torch.testing.assert_close(b, a.detach(), rtol=1e-4, atol=2e-5)
