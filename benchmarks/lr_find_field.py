"""Lightning's ``Tuner.lr_find`` on one small task, as a project meets it: a LightningModule with its own torch
AdamW, searched once as it is and once per optimizer that ``LowMemOptimizerCallback`` swaps in (and, for CAME and
Lion, once with a peer implementation as the module's own optimizer). Prints, per optimizer, the suggestion of each
data seed, their geometric mean, and its ratio to torch AdamW's: how far the tuner's advice moves with the
optimizer.

The task: a 2-layer MLP (32 -> 128 -> 128 -> 4, LayerNorm) classifying a fixed random linear labelling of 2048
Gaussian points, batch 32, no shuffling; the search runs ``num_training`` steps from 1e-6 to 1 (exponential),
Lightning's default suggestion (steepest smoothed-loss descent).

    python benchmarks/lr_find_field.py                 # all rows, 3 seeds (~1 min on one CPU thread)
    python benchmarks/lr_find_field.py --seeds 1 --rows torch adamw_8bit --steps 40   # a quick look
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import tempfile
import warnings

import lightning as L
import torch
from lightning.pytorch.tuner import Tuner
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lowmem_lightning.callbacks import LowMemOptimizerCallback

OURS = ["adamw_8bit", "adamw_4bit", "came", "lion", "lion_8bit", "ademamix_8bit", "muon", "muon_8bit", "muon_rms"]
VARIANTS = {"muon_rms": ("muon", {"adjust_lr_fn": "match_rms_adamw"})}
"""Rows of ours with optimizer_kwargs: name -> (optimizer, kwargs)."""
PEERS = {"came_pytorch": ("came_pytorch", "CAME"), "bnb_lion8bit": ("bitsandbytes.optim", "Lion8bit")}
"""Peer rows: the module's own optimizer is the peer's class (skipped when it is not installed)."""


class Task(L.LightningModule):
    """The tiny classification task; ``optimizer_factory(params, lr)`` is the module's own optimizer."""

    def __init__(self, seed: int, optimizer_factory=None, lr: float = 1e-3):
        super().__init__()
        torch.manual_seed(seed)
        self.lr = lr
        self.factory = optimizer_factory or (lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=0.01))
        self.net = nn.Sequential(nn.Linear(32, 128), nn.LayerNorm(128), nn.GELU(), nn.Linear(128, 128), nn.GELU(),
                                 nn.Linear(128, 4))
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(2048, 32, generator=generator)
        self.y = (self.x @ torch.randn(32, 4, generator=generator)).argmax(1)

    def training_step(self, batch, batch_idx):
        """Cross-entropy of the batch."""
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def train_dataloader(self):
        """The 2048 points in a fixed order, batch 32."""
        return DataLoader(TensorDataset(self.x, self.y), batch_size=32, shuffle=False)

    def configure_optimizers(self):
        """The module's own optimizer over every param."""
        return self.factory(self.parameters(), self.lr)


def _peer_factory(row: str):
    module_name, class_name = PEERS[row]
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except ImportError:
        return None
    return lambda params, lr: cls(params, lr=lr)


def suggestion(row: str, seed: int, steps: int) -> float | None:
    """The lr ``Tuner.lr_find`` suggests for ``row`` (torch, one of :data:`OURS` or :data:`PEERS`) on seed ``seed``."""
    factory, callbacks = None, []
    if row in PEERS:
        factory = _peer_factory(row)
        if factory is None:
            return None
    elif row != "torch":
        name, kwargs = VARIANTS.get(row, (row, None))
        callbacks = [LowMemOptimizerCallback(name, optimizer_kwargs=kwargs, log_state_memory=False, plot=False,
                                             print_summary=False)]
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                            default_root_dir=root)
        finder = Tuner(trainer).lr_find(Task(seed, factory), min_lr=1e-6, max_lr=1.0, num_training=steps)
    return finder.suggestion()


def main(argv: list[str] | None = None) -> list[tuple[str, list[float | None]]]:
    """Run the rows, print the table; returns ``(row, suggestions per seed)``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="data/init seeds per row")
    parser.add_argument("--steps", type=int, default=60, help="lr_find num_training (<= 64 batches)")
    parser.add_argument("--rows", nargs="*", default=["torch", *OURS, *PEERS], help="rows to run")
    args = parser.parse_args(argv)
    results = [(row, [suggestion(row, seed, args.steps) for seed in range(args.seeds)]) for row in args.rows]
    reference = _geomean(dict(results).get("torch", []))
    print(f"{'optimizer':<16} {'suggestions per seed':<40} {'geomean':>10} {'/ torch AdamW':>14}")
    for row, values in results:
        mean = _geomean(values)
        ratio = f"{mean / reference:.2f}" if mean and reference else "-"
        shown = ", ".join("skipped" if v is None else f"{v:.2e}" for v in values)
        print(f"{row:<16} {shown:<40} {mean or float('nan'):>10.2e} {ratio:>14}")
    return results


def _geomean(values: list[float | None]) -> float | None:
    values = [v for v in values if v]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    main()
