"""Cost of gradient release: a training step with ``step_in_backward`` against a normal step.

Gradient release (``lowmem_lightning.callbacks.release``) updates each tensor inside backward, so
the optimizer runs once per tensor instead of once per step (one launch per tensor on CUDA, one
Python round trip per tensor everywhere). This measures what that costs on a whole training step
(forward + backward + optimizer) of a small Llama (transformers, built from a config): for each
optimizer, two copies of the model train side by side, the normal step and the released one
alternating, and the ratio of their median step times is reported (same process, same data, so
machine noise hits both alike). ``--repeats`` timed steps after ``--warmup``.

    python benchmarks/release_step.py --optimizers adamw_8bit,came,sgd --repeats 30

``--bucket-bytes`` sets the release's bucket (0: each tensor alone). ``--count`` times nothing: for
each optimizer, one backward per bucket size (0 and ``--bucket-bytes``) counting the optimizer calls
made in backward and the peak bytes of gradients alive (summed over ``.grad`` at every gradient's
arrival), against a normal step's (every gradient alive at the end of backward).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowmem_lightning.callbacks.release import DEFAULT_BUCKET_BYTES, GradientRelease  # noqa: E402
from lowmem_lightning.optim import build_optimizer  # noqa: E402

LR = {"adamw_8bit": 1e-3, "paged_adamw_8bit": 1e-3, "came": 1e-4, "sgd": 1e-2, "adamw": 1e-3, "adafactor": None}


def tiny_llama(hidden: int, layers: int, seed: int = 0):
    """A Llama of ``layers`` blocks of width ``hidden`` (byte vocabulary), fixed init."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         max_position_embeddings=1024)
    return LlamaForCausalLM(config)


class Run:
    """One model + optimizer, stepped normally or with gradient release."""

    def __init__(self, name: str, release: bool, args):
        self.model = tiny_llama(args.hidden, args.layers)
        lr = LR.get(name, 1e-3)
        kwargs = {} if lr is None else {"lr": lr}
        self.opt = build_optimizer(name, self.model.parameters(), **kwargs)
        self.hooks = GradientRelease(self.opt, bucket_bytes=args.bucket_bytes).attach() if release else None

    def step(self, batch: torch.Tensor) -> float:
        """One training step; returns its wall time in ms."""
        begin = time.perf_counter()
        self.model(input_ids=batch, labels=batch).loss.backward()
        if self.hooks is not None:
            self.hooks.finish_step()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return (time.perf_counter() - begin) * 1e3


def measure(name: str, args) -> dict:
    """Median step ms of the normal and the released run (alternating steps) and their ratio."""
    normal, released = Run(name, False, args), Run(name, True, args)
    gen = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {"normal": [], "released": []}
    for i in range(args.warmup + args.repeats):
        batch = torch.randint(0, 256, (args.batch, args.seq), generator=gen)
        order = [("normal", normal), ("released", released)]
        for key, run in order if i % 2 == 0 else order[::-1]:
            elapsed = run.step(batch)
            if i >= args.warmup:
                times[key].append(elapsed)
    tensors = sum(1 for p in normal.model.parameters() if p.requires_grad)
    params = sum(p.numel() for p in normal.model.parameters())
    a, b = statistics.median(times["normal"]), statistics.median(times["released"])
    return {"optimizer": name, "params": params, "tensors": tensors, "normal_ms": a, "released_ms": b,
            "ratio": b / a}


def count(name: str, args) -> list[dict]:
    """Per bucket size (None: a normal step): optimizer calls in backward and peak gradient bytes alive."""
    rows = []
    batch = torch.randint(0, 256, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    for bucket_bytes in (None, 0, args.bucket_bytes):
        run = Run(name, False, args)
        params = [p for p in run.model.parameters() if p.requires_grad]
        live = [0]

        def measure(_, params=params, live=live):
            live[0] = max(live[0], sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None))

        for p in params:  # registered before the release hooks: counts the gradient that just arrived
            p.register_post_accumulate_grad_hook(measure)
        hooks = None if bucket_bytes is None else GradientRelease(run.opt, bucket_bytes=bucket_bytes).attach()
        run.model(input_ids=batch, labels=batch).loss.backward()
        calls = 1 if hooks is None else hooks.bucket_steps
        if hooks is not None:
            hooks.finish_step()
        rows.append({"optimizer": name, "step": "normal" if hooks is None else f"released, bucket {bucket_bytes} B",
                     "tensors": len(params), "calls": calls, "peak_grad_bytes": live[0],
                     "largest": max(p.numel() * p.element_size() for p in params),
                     "all_grad_bytes": sum(p.numel() * p.element_size() for p in params)})
    return rows


def count_markdown(rows: list[dict]) -> str:
    """The counting rows as a markdown table (MiB)."""
    lines = ["| optimizer | step | tensors | optimizer calls | peak gradient MiB alive | largest tensor MiB "
             "| all gradients MiB |", "|---|---|---:|---:|---:|---:|---:|"]
    mib = 2**20
    for r in rows:
        lines.append(f"| {r['optimizer']} | {r['step']} | {r['tensors']} | {r['calls']} | "
                     f"{r['peak_grad_bytes'] / mib:.2f} | {r['largest'] / mib:.2f} | {r['all_grad_bytes'] / mib:.2f} |")
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    lines = ["| optimizer | params | tensors | normal step (ms) | released step (ms) | released / normal |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['optimizer']} | {r['params'] / 1e6:.1f}M | {r['tensors']} | {r['normal_ms']:.1f} | "
                     f"{r['released_ms']:.1f} | {r['ratio']:.3f} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizers", default="adamw_8bit,came,sgd", help="comma-separated registered names")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--bucket-bytes", type=int, default=DEFAULT_BUCKET_BYTES,
                        help="gradient release bucket in bytes (0: each tensor alone)")
    parser.add_argument("--count", action="store_true", help="count calls and gradient bytes, time nothing")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f"command: python benchmarks/release_step.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    if args.count:
        print(count_markdown([row for name in args.optimizers.split(",") for row in count(name, args)]))
        return 0
    rows = [measure(name, args) for name in args.optimizers.split(",")]
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
