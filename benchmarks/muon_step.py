"""Muon step benchmark: ours (``muon``, ``muon_8bit``) against ``torch.optim.Muon`` in the same process.

The params are a transformer's hidden matrices (``--shapes``: ``ROWSxCOLS:COUNT`` items, e.g. the q/k/v/o and
MLP matrices of a few layers), fp32 (or ``--dtype bfloat16``) with fixed gradients of the same dtype. Rows
run in rounds, in alternating order (A B C, then C B A, ...), each round timing ``--repeats`` steps of every
row after ``--warmup`` steps; the ratio ours / torch is taken per round and the median over rounds is
reported (a loaded machine slows whole rounds, not one row), and the fastest single step of each row over
all rounds with its ratio (load only ever adds time: the least disturbed estimate on a shared machine).
Also reported: state bytes/param (``state_memory`` for ours, storage of ``optimizer.state`` for torch) and,
with ``--check``, the parity of the run:

* the fused momentum kernel (Triton on CUDA) against the eager reference on the CPU copy: codes, scales,
  fp32 momentum and bf16 ``U`` equal (count of differing elements);
* ``muon`` and ``muon_8bit`` against ``torch.optim.Muon`` after ``--check-steps`` steps on the device:
  relative Frobenius distance of the parameter displacement.

    python benchmarks/muon_step.py --device cpu --shapes 256x256:8,256x688:4 --rounds 3 --repeats 5
    python benchmarks/muon_step.py --device cuda --shapes 2048x2048:16,2048x5632:8 --check
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROWS = ("torch_muon", "muon", "muon_8bit")
"""Benchmark rows: ``torch.optim.Muon`` (the peer) and ours."""


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"256x256:8,256x688:4"`` -> eight (256, 256) and four (256, 688) shapes."""
    shapes = []
    for item in text.split(","):
        dims, _, count = item.partition(":")
        rows, cols = (int(v) for v in dims.lower().split("x"))
        shapes += [(rows, cols)] * int(count or 1)
    return shapes


def build(row: str, params, lr: float):
    """The optimizer of ``row`` over ``params`` (torch.optim.Muon's defaults otherwise)."""
    if row == "torch_muon":
        return torch.optim.Muon(params, lr=lr)
    from lowmem_lightning.optim import build_optimizer

    return build_optimizer(row, params, lr=lr)


def state_bytes_per_param(opt, params) -> float:
    """State bytes per param element: ``state_memory`` for ours, distinct storages for torch's."""
    if type(opt).__module__.startswith("lowmem_lightning"):
        from lowmem_lightning.optim import state_memory

        return state_memory(opt).bytes_per_param
    seen, total = set(), 0
    for state in opt.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() not in seen:
                seen.add(value.untyped_storage().data_ptr())
                total += value.untyped_storage().nbytes()
    return total / sum(p.numel() for p in params)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
"""``--clock`` choices: wall time, or this process's CPU time (user + system, all threads: on a CPU shared with
other jobs it leaves out the time spent waiting for a core; meaningless for CUDA, whose work is not ours)."""


def time_steps(opt, device: torch.device, repeats: int, clock=time.perf_counter) -> list[float]:
    """Seconds (of ``clock``) of each of ``repeats`` steps (synchronized per step on CUDA)."""
    times = []
    for _ in range(repeats):
        _sync(device)
        start = clock()
        opt.step()
        _sync(device)
        times.append(clock() - start)
    return times


def setup(row: str, base: list[torch.Tensor], grads: list[torch.Tensor], lr: float):
    params = [torch.nn.Parameter(b.clone()) for b in base]
    for p, g in zip(params, grads):
        p.grad = g
    return params, build(row, params, lr)


def benchmark(args, device: torch.device) -> dict:
    """``{"times": {row: [median step s per round]}, "fastest": {row: fastest step s of all rounds}}`` plus
    bytes/param, rows alternated per round."""
    gen = torch.Generator().manual_seed(0)
    shapes = parse_shapes(args.shapes)
    dtype = getattr(torch, args.dtype)
    base = [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]
    built = {row: setup(row, base, grads, args.lr) for row in ROWS}
    for _, opt in built.values():
        for _ in range(args.warmup):
            opt.step()
    times = {row: [] for row in ROWS}
    fastest = {row: float("inf") for row in ROWS}
    for r in range(args.rounds):
        for row in ROWS if r % 2 == 0 else tuple(reversed(ROWS)):
            steps = time_steps(built[row][1], device, args.repeats, CLOCKS[args.clock])
            times[row].append(statistics.median(steps))
            fastest[row] = min(fastest[row], *steps)
    bpp = {row: state_bytes_per_param(opt, params) for row, (params, opt) in built.items()}
    return {"times": times, "fastest": fastest, "bytes_per_param": bpp, "numel": sum(b.numel() for b in base)}


def check_kernel(device: torch.device) -> dict:
    """Fused momentum kernel on ``device`` against the eager reference on CPU copies: differing elements."""
    from lowmem_lightning.kernels.codec import quantize_reference
    from lowmem_lightning.kernels.muon import muon_momentum

    gen = torch.Generator().manual_seed(1)
    out = {}
    for quantized in (False, True):
        for n in (4097 * 3, 2**20 + 17):
            grad = torch.randn(n, generator=gen)
            if quantized:
                buf, absmax = quantize_reference(torch.randn(n, generator=gen), signed=True)
            else:
                buf, absmax = torch.randn(n, generator=gen), None
            runs = []
            for dev in (torch.device("cpu"), device):
                b = buf.clone().to(dev)
                a = None if absmax is None else absmax.clone().to(dev)
                u = torch.empty(n, dtype=torch.bfloat16, device=dev)
                muon_momentum([grad.to(dev)], [b], [a], [torch.tensor(2.0, device=dev)],
                              [torch.tensor(1.0, device=dev)], [u], momentum=0.95, nesterov=True)
                runs.append((b.cpu(), None if a is None else a.cpu(), u.cpu()))
            (b0, a0, u0), (b1, a1, u1) = runs
            key = f"{'int8' if quantized else 'fp32'} n={n}"
            out[key] = {"momentum": int((b0 != b1).sum()), "absmax": 0 if a0 is None else int((a0 != a1).sum()),
                        "U": int((u0 != u1).sum())}
    return out


def check_parity(device: torch.device, shapes: list[tuple[int, int]], steps: int, lr: float) -> dict:
    """Relative distance of ours to torch.optim.Muon after ``steps`` steps on ``device``."""
    gen = torch.Generator().manual_seed(2)
    base = [torch.randn(s, generator=gen).to(device) for s in shapes]
    grads = [[torch.randn(s, generator=gen).to(device) for s in shapes] for _ in range(steps)]
    finals = {}
    for row in ROWS:
        params = [torch.nn.Parameter(b.clone()) for b in base]
        opt = build(row, params, lr)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g
            opt.step()
        finals[row] = params
    ref = finals["torch_muon"]
    den = sum(float((r.detach() - b).double().square().sum()) for r, b in zip(ref, base))
    return {row: (sum(float((a.detach() - r.detach()).double().square().sum()) for a, r in zip(finals[row], ref))
                  / den) ** 0.5 for row in ROWS[1:]}


def time_newton_schulz(args) -> dict:
    """Fastest time (``--clock``) of Newton–Schulz over each same-shape group of ``--shapes`` (bf16 on the CPU):
    torch.optim.Muon's per-matrix loop, and :func:`newton_schulz` on batches of each size in ``--ns-batches``."""
    from torch.optim._muon import _zeropower_via_newtonschulz

    from lowmem_lightning.kernels.muon import NS_COEFFICIENTS, newton_schulz

    clock, gen, out = CLOCKS[args.clock], torch.Generator().manual_seed(3), {}
    for shape in dict.fromkeys(parse_shapes(args.shapes)):
        n = parse_shapes(args.shapes).count(shape)
        stack = torch.randn(n, *shape, generator=gen).bfloat16()
        runs = {"loop": lambda stack=stack: [_zeropower_via_newtonschulz(m, NS_COEFFICIENTS, 5, 1e-7) for m in stack]}
        for b in (int(v) for v in args.ns_batches.split(",")):
            runs[f"batch {b}"] = lambda b=b, s=stack: [newton_schulz(s[i:i + b]) for i in range(0, len(s), b)]
        best = {name: float("inf") for name in runs}
        for _ in range(args.rounds):
            for name, fn in runs.items():
                start = clock()
                fn()
                best[name] = min(best[name], clock() - start)
        out[f"{shape[0]}x{shape[1]} x{n}"] = {name: round(t * 1e3, 1) for name, t in best.items()}
    return out


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", default="256x256:8,256x688:4", help="ROWSxCOLS:COUNT,...")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="param and gradient dtype (bf16: ours rounds stochastically, torch rounds to nearest)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--clock", default="wall", choices=tuple(CLOCKS),
                        help="wall time, or the process's CPU time (CPU runs on a shared machine)")
    parser.add_argument("--ns-batches", default=None,
                        help="only time Newton-Schulz per shape group: torch's loop vs batches of these sizes (1,8,48)")
    parser.add_argument("--check", action="store_true", help="kernel and torch.optim.Muon parity on the device")
    parser.add_argument("--check-steps", type=int, default=20)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    print(f"# Muon step ({device}, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock)")
    print(f"command: python benchmarks/muon_step.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    if args.ns_batches:
        print("Newton-Schulz, fastest of rounds (ms):", time_newton_schulz(args))
        return 0
    result = benchmark(args, device)
    torch_times = result["times"]["torch_muon"]
    print(f"{result['numel']:,} params; median step per round (s), ratio to torch.optim.Muon per round")
    print("| row | state B/param | step s (rounds) | x torch.optim.Muon (median of rounds) | fastest step s, x torch |")
    print("|---|---|---|---|---|")
    for row in ROWS:
        t = result["times"][row]
        ratios = [a / b for a, b in zip(t, torch_times)]
        fast = result["fastest"][row]
        print(f"| {row} | {result['bytes_per_param'][row]:.3f} | {', '.join(f'{x:.4f}' for x in t)} | "
              f"{statistics.median(ratios):.3f} ({', '.join(f'{x:.2f}' for x in ratios)}) | "
              f"{fast:.4f}, {fast / result['fastest']['torch_muon']:.3f} |")
    if args.check:
        print("kernel vs reference (differing elements):", check_kernel(device))
        shapes = parse_shapes(args.shapes)[:4]
        print(f"distance to torch.optim.Muon after {args.check_steps} steps:",
              check_parity(device, shapes, args.check_steps, args.lr))
    return 0


if __name__ == "__main__":
    sys.exit(main())
