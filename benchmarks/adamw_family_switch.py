"""Switching optimizers mid-run inside the AdamW family: 8 steps ``adamw_8bit``, then 8 steps ``adamw_4bit``
loaded from its state dict (the moments decoded and re-encoded), against 16 uninterrupted steps of each and a
control conversion that loses the moments (step counters kept). A 96x128 least-squares problem per seed; CPU.

Run: ``python benchmarks/adamw_family_switch.py [--seeds 5] [--lr 3e-3]``; prints one row per seed (final MSE
losses and the switched run's relative distance to the uninterrupted 4-bit one)."""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

from lowmem_lightning.optim import build_optimizer


def _problem(seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 128, generator=gen)
    return x, x @ (torch.randn(128, 96, generator=gen) * 0.1), nn.Parameter(torch.zeros(96, 128))


def _train(opt, w, x, y, steps: int) -> float:
    for _ in range(steps):
        w.grad = None
        nn.functional.mse_loss(x @ w.T, y).backward()
        opt.step()
    return float(nn.functional.mse_loss(x @ w.T, y).detach())


def _switched(seed: int, lr: float, lose_moments: bool) -> float:
    x, y, w = _problem(seed)
    eight = build_optimizer("adamw_8bit", [w], lr=lr, weight_decay=0.0)
    _train(eight, w, x, y, 8)
    saved = copy.deepcopy(eight.state_dict())
    if lose_moments:
        for state in saved["state"].values():
            for key, value in state.items():
                if key != "step":
                    value.zero_()
    four = build_optimizer("adamw_4bit", [w], lr=lr, weight_decay=0.0)
    four.load_state_dict(saved)
    return _train(four, w, x, y, 8)


def _straight(seed: int, lr: float, name: str) -> float:
    x, y, w = _problem(seed)
    return _train(build_optimizer(name, [w], lr=lr, weight_decay=0.0), w, x, y, 16)


def main() -> None:
    """Print one row per seed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    print("seed | 8->4 switched | 4-bit x16 | 8-bit x16 | moments lost | switched vs 4-bit | 8-bit vs 4-bit | "
          "lost vs 4-bit")
    for seed in range(args.seeds):
        sw, lost = _switched(seed, args.lr, False), _switched(seed, args.lr, True)
        s4, s8 = _straight(seed, args.lr, "adamw_4bit"), _straight(seed, args.lr, "adamw_8bit")
        rel = [abs(a - s4) / s4 for a in (sw, s8, lost)]
        print(f"{seed} | {sw:.4f} | {s4:.4f} | {s8:.4f} | {lost:.4f} | " + " | ".join(f"{r:.3f}" for r in rel))


if __name__ == "__main__":
    main()
