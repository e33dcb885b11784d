"""Plug a low-memory optimizer into a Lightning project you already have: add one callback.

The LightningModule below is ordinary (it configures torch's SGD with a StepLR schedule and knows
nothing about lowmem-lightning). ``LowMemOptimizerCallback`` swaps its optimizer for 8-bit AdamW,
keeps the schedule (now over ``lr=3e-3``), logs the optimizer-state memory of every step to
``metrics.csv`` and prints a summary at the end (plus ``state_memory.png`` when matplotlib is installed).

    python examples/plug_into_existing_project.py --out runs/plug --max-steps 40

Runs on CPU in well under a minute.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lowmem_lightning import LowMemOptimizerCallback, StepsAwareRichProgressBar


class DigitsClassifier(L.LightningModule):
    """An ordinary LightningModule: a 64 -> 256 -> 256 -> 10 MLP classifier with SGD + StepLR."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 256), nn.LayerNorm(256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.5)
        return [opt], [{"scheduler": sched, "interval": "step"}]


def synthetic_digits(n: int = 2048, seed: int = 0) -> TensorDataset:
    """10 noisy prototype 8x8 'images' (64 features each) with their class labels."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(10, 64, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return TensorDataset(prototypes[labels] + 0.8 * torch.randn(n, 64, generator=g), labels)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/plug_into_existing_project", help="log directory")
    parser.add_argument("--max-steps", type=int, default=40, help="optimizer steps")
    parser.add_argument("--optimizer", default="adamw_8bit", help="registered optimizer name")
    args = parser.parse_args(argv)

    L.seed_everything(0, verbose=False)
    callback = LowMemOptimizerCallback(optimizer=args.optimizer, lr=3e-3, weight_decay=0.01)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=args.max_steps, log_every_n_steps=1, enable_checkpointing=False,
        logger=CSVLogger(args.out, name="plug"), enable_model_summary=False,
        callbacks=[callback, StepsAwareRichProgressBar()],  # counts optimizer steps against max_steps
    )
    trainer.fit(DigitsClassifier(), DataLoader(synthetic_digits(), batch_size=64, shuffle=True))
    print(f"metrics: {trainer.logger.log_dir}/metrics.csv")
    return callback.summary


if __name__ == "__main__":
    from lowmem_lightning.cli import quiet_known_noise

    quiet_known_noise()  # optional: hide the known third-party notices, as the lowmem command does
    main()
