"""NF4 storage and reconstruction error: ours vs bitsandbytes' NF4, on the same weights.

    python benchmarks/nf4_study.py [--shape 4096x4096] [--std 0.02]

Prints bytes/param (codes + scales) and the mean squared reconstruction error of our NF4 (block 64,
double-quantized scales) and, when bitsandbytes is installed, its NF4 with the same settings and the
ratio ours / theirs. Weights are fp32 ``randn * std`` from seed 0.
"""

from __future__ import annotations

import argparse

import torch

from lowmem_lightning.kernels import nf4


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="4096x4096")
    parser.add_argument("--std", type=float, default=0.02)
    args = parser.parse_args(argv)
    shape = tuple(int(d) for d in args.shape.split("x"))
    torch.manual_seed(0)
    w = torch.randn(shape) * args.std
    ours = nf4.quantize_nf4(w)
    ours_mse = ((nf4.dequantize_nf4(ours) - w) ** 2).mean().item()
    print("| implementation | bytes/param | MSE |")
    print("|---|---:|---:|")
    print(f"| lowmem_lightning NF4 (block 64, double quant) | {ours.nbytes / w.numel():.5f} | {ours_mse:.4e} |")
    try:
        import bitsandbytes.functional as F
    except ImportError:
        print("| bitsandbytes NF4 | not installed | |")
        return
    q, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    bnb_mse = ((F.dequantize_4bit(q, state) - w) ** 2).mean().item()
    print(f"| bitsandbytes NF4 (block 64, double quant) | - | {bnb_mse:.4e} |")
    print(f"\nours / bitsandbytes MSE: {ours_mse / bnb_mse:.4f}")


if __name__ == "__main__":
    main()
