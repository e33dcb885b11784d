"""Write a model as a LowMemModule subclass: forward + training_step, the rest is constructor arguments.

The optimizer (by name, with its kwargs), weight decay (matrices only; biases and norm weights are
excluded through param groups) and a warmup + cosine schedule are arguments of ``LowMemModule``, so
they also appear in LightningCLI / YAML. The callback here only logs the state memory per step
(it rebuilds the same optimizer the module asked for).

    python examples/subclass_lowmem_module.py --out runs/subclass --max-steps 40

Runs on CPU in well under a minute.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lowmem_lightning import LowMemModule, LowMemOptimizerCallback, StepsAwareRichProgressBar


class TinyCharModel(LowMemModule):
    """Predict the next byte of a repeating text from the previous 16 bytes (embedding + MLP)."""

    def __init__(self, context: int = 16, width: int = 64, **optim_args):
        super().__init__(**optim_args)
        self.save_hyperparameters()
        self.embed = nn.Embedding(256, 16)
        self.mlp = nn.Sequential(
            nn.Flatten(), nn.Linear(context * 16, width), nn.LayerNorm(width), nn.GELU(), nn.Linear(width, 256)
        )

    def forward(self, x):  # x: (batch, context) int64 bytes -> (batch, 256) logits
        return self.mlp(self.embed(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss


def byte_windows(context: int = 16) -> TensorDataset:
    """(context bytes, next byte) pairs from a short repeated text."""
    text = ("Low-memory training keeps optimizer state in 8 bits. " * 40).encode()
    data = torch.tensor(list(text), dtype=torch.long)
    idx = torch.arange(len(data) - context)
    x = data[idx[:, None] + torch.arange(context)]
    return TensorDataset(x, data[idx + context])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/subclass_lowmem_module", help="log directory")
    parser.add_argument("--max-steps", type=int, default=40, help="optimizer steps")
    parser.add_argument("--optimizer", default="adamw_8bit", help="registered optimizer name")
    args = parser.parse_args(argv)

    L.seed_everything(0, verbose=False)
    model = TinyCharModel(
        optimizer=args.optimizer, lr=3e-3, weight_decay=0.05, warmup_steps=max(1, args.max_steps // 10),
        scheduler="cosine", min_lr_ratio=0.1,
    )
    callback = LowMemOptimizerCallback(optimizer=args.optimizer)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=args.max_steps, log_every_n_steps=1, enable_checkpointing=False,
        logger=CSVLogger(args.out, name="subclass"), enable_model_summary=False,
        callbacks=[callback, StepsAwareRichProgressBar()],  # counts optimizer steps against max_steps
    )
    trainer.fit(model, DataLoader(byte_windows(), batch_size=64, shuffle=True))
    print(f"metrics: {trainer.logger.log_dir}/metrics.csv")
    return callback.summary


if __name__ == "__main__":
    from lowmem_lightning.cli import quiet_known_noise

    quiet_known_noise()  # optional: hide the known third-party notices, as the lowmem command does
    main()
