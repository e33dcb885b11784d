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

FlashOptim rows (:data:`FLASHOPTIM_ROWS`, CUDA only: elsewhere a row that says "skipped" and why): its
``FlashAdamW`` with the AdamW hyperparameters of ``adamw_8bit`` (``optim_step.FLASHOPTIM_ADAMW``), the normal
step against its own ``enable_gradient_release`` (a hook per parameter steps it and frees its gradient;
``step()`` and ``zero_grad()`` are then no-ops). ``--gpu-check-size`` is ``gpu_check.py``'s ``release`` model
(hidden 2048, 12 layers, vocabulary 32000, head dim 128, batch 1, seq 256, bf16 weights):

    python benchmarks/release_step.py --device cuda --gpu-check-size --optimizers adamw_8bit,flashoptim_adamw \
        --warmup 2 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import optim_step  # noqa: E402

from lowmem_lightning.callbacks.release import DEFAULT_BUCKET_BYTES, GradientRelease  # noqa: E402
from lowmem_lightning.optim import build_optimizer  # noqa: E402

LR = {"adamw_8bit": 1e-3, "paged_adamw_8bit": 1e-3, "came": 1e-4, "sgd": 1e-2, "adamw": 1e-3, "adafactor": None,
      "flashoptim_adamw": 1e-3, "flashoptim_adamw_nomaster": 1e-3}

FLASHOPTIM_ROWS = {"flashoptim_adamw": 24, "flashoptim_adamw_nomaster": None}
"""Row name -> FlashAdamW's ``master_weight_bits`` (24: its default, int8 error bits beside bf16 weights)."""

GPU_CHECK_SIZE = {"hidden": 2048, "layers": 12, "vocab": 32000, "head_dim": 128, "batch": 1, "seq": 256,
                  "dtype": "bfloat16"}
"""``gpu_check.py``'s ``release`` model and batch (735M params), set by ``--gpu-check-size``."""


class PeerUnavailable(Exception):
    """A peer row that cannot run here; the message says why."""


def flashoptim_optimizer(model: torch.nn.Module, name: str, lr: float, release: bool, **overrides):
    """``(FlashAdamW over model's trainable params, its gradient-release handle or None)`` for FlashOptim row
    ``name``: :data:`FLASHOPTIM_ROWS`' master-weight bits and ``optim_step.FLASHOPTIM_ADAMW`` with ``lr``;
    ``overrides`` replace FlashAdamW arguments (e.g. its unquantized, unfused CPU path in tests). Raises
    :class:`PeerUnavailable` when flashoptim is not installed or cannot run on these params (CUDA only)."""
    if name not in FLASHOPTIM_ROWS:
        raise ValueError(f"Invalid FlashOptim row {name!r}: expected one of {', '.join(FLASHOPTIM_ROWS)}")
    try:
        import flashoptim
    except ImportError as err:
        raise PeerUnavailable(f"not available: `flashoptim` not installed (pip install -e .[bench]): {err}") from err
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = {**optim_step.flashoptim_kwargs(FLASHOPTIM_ROWS[name]), "lr": lr, **overrides}
    reason = None if overrides else optim_step.flashoptim_skip_reason(params, kwargs["master_weight_bits"])
    if reason:
        raise PeerUnavailable(reason)
    opt = flashoptim.FlashAdamW(params, **kwargs)
    return opt, (flashoptim.enable_gradient_release(model, opt) if release else None)


def tiny_llama(hidden: int, layers: int, seed: int = 0, vocab: int = 256, head_dim: int = 64):
    """A Llama of ``layers`` blocks of width ``hidden`` (``vocab`` tokens, heads of ``head_dim``), fixed init."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // head_dim),
                         max_position_embeddings=1024)
    return LlamaForCausalLM(config)


class Run:
    """One model + optimizer, stepped normally or with gradient release."""

    def __init__(self, name: str, release: bool, args):
        self.device = torch.device(getattr(args, "device", "cpu"))
        dtype = getattr(torch, getattr(args, "dtype", "float32"))
        self.model = tiny_llama(args.hidden, args.layers, vocab=getattr(args, "vocab", 256),
                                head_dim=getattr(args, "head_dim", 64)).to(device=self.device, dtype=dtype)
        lr = LR.get(name, 1e-3)
        self.flash_release = None
        self.hooks = None
        if name in FLASHOPTIM_ROWS:
            self.opt, self.flash_release = flashoptim_optimizer(self.model, name, lr, release)
            return
        kwargs = {} if lr is None else {"lr": lr}
        self.opt = build_optimizer(name, self.model.parameters(), **kwargs)
        self.hooks = GradientRelease(self.opt, bucket_bytes=args.bucket_bytes).attach() if release else None

    def step(self, batch: torch.Tensor) -> float:
        """One training step; returns its wall time in ms (CUDA: synchronized at the end)."""
        begin = time.perf_counter()
        self.model(input_ids=batch, labels=batch).loss.backward()
        if self.hooks is not None:
            self.hooks.finish_step()
        if self.flash_release is None:  # FlashOptim's release stepped every param in backward and freed its grad
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return (time.perf_counter() - begin) * 1e3


def measure(name: str, args) -> dict:
    """Median step ms of the normal and the released run (alternating steps) and their ratio; a peer that cannot
    run here gives ``{"optimizer", "note"}``."""
    try:
        normal, released = Run(name, False, args), Run(name, True, args)
    except PeerUnavailable as err:
        return {"optimizer": name, "note": str(err)}
    gen = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {"normal": [], "released": []}
    for i in range(args.warmup + args.repeats):
        batch = torch.randint(0, getattr(args, "vocab", 256), (args.batch, args.seq), generator=gen).to(normal.device)
        order = [("normal", normal), ("released", released)]
        for key, run in order if i % 2 == 0 else order[::-1]:
            elapsed = run.step(batch)
            if i >= args.warmup:
                times[key].append(elapsed)
    tensors = sum(1 for p in normal.model.parameters() if p.requires_grad)
    params = sum(p.numel() for p in normal.model.parameters())
    a, b = statistics.median(times["normal"]), statistics.median(times["released"])
    return {"optimizer": name, "params": params, "tensors": tensors, "normal_ms": a, "released_ms": b,
            "ratio": b / a, "note": ""}


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
    """The rows as a markdown table (a row that could not run: dashes and its note)."""
    lines = ["| optimizer | params | tensors | normal step (ms) | released step (ms) | released / normal | note |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "ratio" not in r:
            lines.append(f"| {r['optimizer']} | - | - | - | - | - | {r['note']} |")
            continue
        lines.append(f"| {r['optimizer']} | {r['params'] / 1e6:.1f}M | {r['tensors']} | {r['normal_ms']:.1f} | "
                     f"{r['released_ms']:.1f} | {r['ratio']:.3f} | {r['note']} |")
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
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="model weights' dtype")
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--gpu-check-size", action="store_true",
                        help=f"gpu_check.py's release model and batch: {GPU_CHECK_SIZE}")
    args = parser.parse_args(argv)
    if args.gpu_check_size:
        for key, value in GPU_CHECK_SIZE.items():
            setattr(args, key, value)
    flash = [n for n in args.optimizers.split(",") if n in FLASHOPTIM_ROWS]
    if args.count and flash:
        parser.error(f"--count counts our GradientRelease only; --optimizers has FlashOptim rows {flash}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    return args


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
