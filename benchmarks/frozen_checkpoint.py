"""What a LoRA run's checkpoint costs with the frozen base in it and without (``LowMemOptimizerCallback(
checkpoint_frozen=False)``).

The model is ``ema_update.py``'s: a Llama decoder (default hidden 1024, 8 layers, vocab 32000: 0.17 B params) in
bf16, frozen, with peft LoRA r=16 on its seven projections (fp32 adapters), in a user's own LightningModule (its own
AdamW) under ``LowMemOptimizerCallback("adamw_8bit")``, trained one step on the CPU. Measured for both settings: the
bytes of the checkpoint file, and the time of ``trainer.save_checkpoint`` (the frozen base's checksums included when
it is left out), interleaved over ``--repeats`` rounds (medians and the median of the per-round ratios: this machine is
noisy, a single run means little). The checkpoint left without the base is then loaded back into a new module with
``load_from_checkpoint`` and compared with the trained one.

    python benchmarks/frozen_checkpoint.py [--repeats 5] [--threads 1] [--hidden 1024] [--layers 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ema_update import add_model_arguments, lora_model  # noqa: E402


class LoraModule(L.LightningModule):
    """The user's module: ``lora_model(hidden, layers)`` (the same random base for the same sizes), AdamW."""

    def __init__(self, hidden: int, layers: int):
        super().__init__()
        self.save_hyperparameters()
        self.model = lora_model(hidden, layers)

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randint(0, 32000, (1, 32), generator=torch.Generator().manual_seed(0))))

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-4)


def trained(hidden: int, layers: int, frozen: bool) -> tuple[L.Trainer, LoraModule]:
    """One step of the module under the callback with ``checkpoint_frozen=frozen``."""
    from lowmem_lightning.callbacks import LowMemOptimizerCallback

    module = LoraModule(hidden, layers)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[
                            LowMemOptimizerCallback("adamw_8bit", plot=False, print_summary=False,
                                                    checkpoint_frozen=frozen)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module)
    return trainer, module


def seconds_to_save(trainer: L.Trainer, path: Path) -> float:
    start = time.perf_counter()
    trainer.save_checkpoint(path)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (default 5)")
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = {"whole": trained(args.hidden, args.layers, True), "frozen base left out": trained(args.hidden, args.layers,
                                                                                              False)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: Path(tmp) / f"{i}.ckpt" for i, name in enumerate(runs)}
        for _ in range(args.repeats):
            for name, (trainer, _) in runs.items():
                times[name].append(seconds_to_save(trainer, paths[name]))
        sizes = {name: path.stat().st_size for name, path in paths.items()}
        loaded = _load_back(paths["frozen base left out"], runs["frozen base left out"][1])
    ratios = [w / t for w, t in zip(times["whole"], times["frozen base left out"])]
    module = runs["whole"][1]
    trainable = sum(p.nbytes for p in module.parameters() if p.requires_grad)
    print(f"model: {sum(p.numel() for p in module.parameters()) / 1e9:.3f} B params; trainable {trainable:,} bytes")
    print("| checkpoint | file bytes | save ms (median) |")
    print("|---|---:|---:|")
    for name in runs:
        print(f"| {name} | {sizes[name]:,} | {1e3 * statistics.median(times[name]):.0f} |")
    print(f"whole / left out: bytes {sizes['whole'] / sizes['frozen base left out']:.1f}x, save time median "
          f"{statistics.median(ratios):.1f}x (rounds: {min(ratios):.1f}-{max(ratios):.1f}x, {args.repeats} rounds, "
          f"{args.threads} thread(s))")
    print(f"loaded back with load_from_checkpoint: equal to the trained module: {loaded}")
    return 0


def _load_back(path: Path, module: LoraModule) -> bool:
    """Whether ``load_from_checkpoint`` of ``path`` into a new module gives ``module``'s state exactly."""
    from lowmem_lightning.callbacks import load_from_checkpoint

    again = load_from_checkpoint(LoraModule, path, map_location="cpu")
    mine, theirs = module.state_dict(), again.state_dict()
    return mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


if __name__ == "__main__":
    raise SystemExit(main())
