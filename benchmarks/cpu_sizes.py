"""CPU optimizer step by tensor size: ours / torch foreach, interleaved in one process (issue 24.6).

For each case (one tensor of a given size, or a small model's parameter list) our optimizer and its
torch peer (``torch.optim.AdamW(foreach=True)``, ``torch.optim.SGD(foreach=True)``) each get their own
copy of the params and fixed gradients; after the warm-up steps they alternate A, B, A, B, ... and
the figure is the **median of the per-pair ratios** ours / torch, so load from other processes on a
shared machine hits both sides of a pair alike. ``--clock process`` (the default) times the process's CPU
time (time on the core, not time waiting for one); ``--clock wall`` the elapsed time. Each row prints the
1-minute load average at its end.

With ``--dtype bfloat16`` params and grads are bf16 on both sides: the peer is torch's foreach step on bf16
params, its state (``exp_avg``, ``exp_avg_sq``, momentum) bf16 too, every op rounded to nearest in bf16; ours
keeps 8-bit state (or fp32 momentum) and writes the param with stochastic rounding.

The first step of ours is timed alone ("first s"): it holds torch.compile's compile time when the compiled
path runs (``--compile always``, or ``auto`` once it decides to compile; see ``kernels/dispatch.py``).

Run twice and compare: the ratios are stable to a few percent when the machine is quiet.

    python benchmarks/cpu_sizes.py                       # 1 thread, adamw_8bit, compiled CPU path
    python benchmarks/cpu_sizes.py --compile never --optimizers adamw_8bit,sgd,sgd_int8
    python benchmarks/cpu_sizes.py --threads 2 --cases 262144,model
    python benchmarks/cpu_sizes.py --optimizers adamw_8bit,sgd,sgd_int8 --dtype float32,bfloat16   # issue 24.6

The last line prints the largest ratio of each (optimizer, dtype): the issue's goal is <= 1.5 at every size.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

SINGLE = ["4096", "16384", "65536", "262144", "1000000", "1048576", "4194304"]
CASES = SINGLE + ["model"]

PEERS: dict[str, tuple[str, dict, Callable]] = {
    "adamw_8bit": ("adamw_8bit", {"lr": 1e-3, "weight_decay": 0.01},
                   lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, foreach=True)),
    "sgd": ("sgd", {"lr": 1e-2, "momentum": 0.9},
            lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, foreach=True)),
    "sgd_int8": ("sgd", {"lr": 1e-2, "momentum": 0.9, "momentum_dtype": "int8"},
                 lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, foreach=True)),
}
"""Our optimizer name -> (registry name, its arguments, the torch peer over the same params)."""


def model_shapes(layers: int = 12, width: int = 256, vocab: int = 4096, context: int = 512) -> list[tuple]:
    """Parameter shapes of a small GPT-style transformer (``layers`` blocks of attention + 4x MLP, with
    biases and two LayerNorms each, token and position embeddings, final LayerNorm): 10.6M params in
    substantially sub-2**20 tensors (the largest, the token embedding, is exactly 2**20)."""
    block = [(3 * width, width), (3 * width,), (width, width), (width,), (4 * width, width), (4 * width,),
             (width, 4 * width), (width,), (width,), (width,), (width,), (width,)]
    return [(vocab, width), (context, width)] + block * layers + [(width,), (width,)]


def case_shapes(case: str) -> list[tuple]:
    """Shapes of a case: ``"model"`` (:func:`model_shapes`) or one tensor of ``int(case)`` elements."""
    return model_shapes() if case == "model" else [(int(case),)]


def make_params(shapes: list[tuple], dtype: torch.dtype, seed: int = 0) -> list[torch.nn.Parameter]:
    """Params of ``shapes`` with fixed random gradients (the same values for every optimizer)."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype))
        p.grad = (torch.randn(shape, generator=gen) * 0.01).to(dtype)
        params.append(p)
    return params


CLOCKS = {"process": time.process_time, "wall": time.perf_counter}
"""``--clock`` choices: the process's CPU time, or elapsed time."""


def interleaved(ours: Callable, peer: Callable, pairs: int, clock: Callable[[], float] = time.process_time
                ) -> tuple[float, float, float]:
    """``(median of ours/peer per pair, median ours s, median peer s)`` over ``pairs`` A, B pairs timed by ``clock``."""
    ratios, a_times, b_times = [], [], []
    for _ in range(pairs):
        t0 = clock()
        ours()
        t1 = clock()
        peer()
        t2 = clock()
        ratios.append((t1 - t0) / (t2 - t1))
        a_times.append(t1 - t0)
        b_times.append(t2 - t1)
    return statistics.median(ratios), statistics.median(a_times), statistics.median(b_times)


def run_case(name: str, case: str, dtype: torch.dtype, warmup: int, pairs: int, clock: str = "process") -> dict:
    """One row: first-step time of ours (wall clock), then the interleaved ratio against the torch peer."""
    from lowmem_lightning.optim import build_optimizer

    registry_name, kwargs, peer_factory = PEERS[name]
    shapes = case_shapes(case)
    ours = build_optimizer(registry_name, make_params(shapes, dtype), **kwargs)
    peer = peer_factory(make_params(shapes, dtype))
    t0 = time.perf_counter()
    ours.step()
    first = time.perf_counter() - t0
    for _ in range(warmup):
        ours.step()
        peer.step()
    if pairs == 0:
        pairs = 30 if sum(torch.Size(s).numel() for s in shapes) < 2**21 else 10
    ratio, a, b = interleaved(ours.step, peer.step, pairs, CLOCKS[clock])
    numel = sum(torch.Size(s).numel() for s in shapes)
    return dict(optimizer=name, case=case, tensors=len(shapes), numel=numel, first_s=first, ratio=ratio,
                ours_ms=a * 1e3, peer_ms=b * 1e3, pairs=pairs, load=os.getloadavg()[0])


def main(argv: list[str] | None = None) -> list[dict]:
    """Parse the command line, run every (optimizer, case) and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)} or any size")
    parser.add_argument("--optimizers", default="adamw_8bit", help=f"comma list of {', '.join(PEERS)}")
    parser.add_argument("--compile", default="always", choices=("auto", "always", "never"),
                        help="our CPU path's torch.compile setting (dispatch.cpu_compile)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--dtype", default="float32", help="comma list of param and grad dtypes: float32, bfloat16")
    parser.add_argument("--warmup", type=int, default=3, help="steps of each after ours' first step")
    parser.add_argument("--pairs", type=int, default=0, help="timed A, B pairs (0: 30 below 2M elements, else 10)")
    parser.add_argument("--clock", default="process", choices=tuple(CLOCKS),
                        help="process: the process's CPU time (default); wall: elapsed time")
    args = parser.parse_args(argv)
    for name in args.optimizers.split(","):
        if name not in PEERS:
            parser.error(f"Invalid --optimizers entry {name!r}: expected one of {', '.join(PEERS)}.")
    for name in args.dtype.split(","):
        if name not in ("float32", "bfloat16"):
            parser.error(f"Invalid --dtype entry {name!r}: expected float32 or bfloat16.")

    from lowmem_lightning.kernels import dispatch

    torch.set_num_threads(args.threads)
    dispatch.configure(cpu_compile=args.compile)
    print(f"torch {torch.__version__}, {args.threads} thread(s), params/grads {args.dtype}, "
          f"our CPU path cpu_compile={args.compile}, {args.clock} clock; "
          "ratio = median over pairs of ours / torch foreach")
    print("\n| optimizer | dtype | case | tensors | elements | first step s | ours / torch | ours ms | torch ms "
          "| load |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name in args.optimizers.split(","):
        for dtype_name in args.dtype.split(","):
            for case in args.cases.split(","):
                row = run_case(name, case, getattr(torch, dtype_name), args.warmup, args.pairs, args.clock)
                row["dtype"] = dtype_name
                rows.append(row)
                print(f"| {name} | {dtype_name} | {case} | {row['tensors']} | {row['numel']:,} | "
                      f"{row['first_s']:.2f} | {row['ratio']:.2f} | {row['ours_ms']:.3f} | {row['peer_ms']:.3f} | "
                      f"{row['load']:.1f} |", flush=True)
    worst = {}
    for row in rows:
        key = f"{row['optimizer']} {row['dtype']}"
        worst[key] = max(worst.get(key, (0.0, "")), (row["ratio"], row["case"]))
    print("\nlargest ratio: " + "; ".join(f"{k} {r:.2f} ({c})" for k, (r, c) in worst.items()))
    return rows


if __name__ == "__main__":
    main()
