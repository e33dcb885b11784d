"""Median time of one optimizer's eager CPU step on one tensor, for A/B runs of two checkouts.

    PYTHONPATH=<checkout> python benchmarks/step_ab.py N NAME [TAG]

One thread, ``cpu_compile="never"``, a tensor of ``N`` fp32 elements, 3 warm-up steps, then the median and
minimum of 15 timed ``opt.step()`` calls (ms). Run it alternately against two checkouts (``PYTHONPATH``) and
compare medians: the refactor check of issue 26 in ``benchmarks/RESULTS.md`` is such a run.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

SETTINGS = {"adamw_8bit": dict(lr=1e-3), "sgd": dict(lr=1e-2, momentum=0.9, momentum_dtype="int8")}
"""Optimizer name -> the keyword arguments it is built with."""


def main() -> None:
    """Parse ``N NAME [TAG]``, time the steps, print one line."""
    torch.set_num_threads(1)
    from lowmem_lightning.kernels import dispatch
    from lowmem_lightning.optim import build_optimizer

    dispatch.configure(cpu_compile="never")
    n, name = int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "adamw_8bit"
    tag = sys.argv[3] if len(sys.argv) > 3 else ""
    p = torch.nn.Parameter(torch.randn(n))
    p.grad = torch.randn(n) * 0.01
    opt = build_optimizer(name, [p], **SETTINGS[name])
    for _ in range(3):
        opt.step()
    times = []
    for _ in range(15):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    print(f"{tag} {name} {n}: median {statistics.median(times) * 1e3:.3f} ms min {min(times) * 1e3:.3f}")


if __name__ == "__main__":
    main()
