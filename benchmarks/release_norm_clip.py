"""Cost of clipping by the global norm under gradient release: two backward passes (LOMO) against one.

``GradientRelease(clip_norm=...)`` (what ``LowMemOptimizerCallback(step_in_backward=True)`` builds when the Trainer
clips by norm) runs backward twice per step over a retained graph: the first pass takes each gradient's norm and
frees it, the second updates each tensor with its clipped gradient. On a small Llama (transformers, from a config;
``release_step.tiny_llama``) this measures, for one optimizer:

* the peak bytes allocated during one training step (torch's CPU profiler, ``profiler_peak.peak_bytes``, above what
  was allocated when the step began: activations, gradients, optimizer temporaries; weights and state excluded) of a
  normal step with norm clipping (``clip_grad_norm_`` handing its norm to the step, as Lightning's clipping does
  through ``ClipNormReuse``), of release without clipping and of release with norm clipping, and the peak inside
  each of the latter's two passes (on the same scale);
* the step time of release with norm clipping over release without it, and over the normal step with clipping:
  copies of the model step in turn (order alternating every step), medians of ``--repeats`` steps, their ratios.

    python benchmarks/release_norm_clip.py --hidden 512 --layers 8 --repeats 10

``--dry-run`` runs one tiny step of each setup and checks that the normal step with clipping and the two-pass
release train the same params, bit for bit (no timing). ``--device cuda`` (``--dtype bfloat16`` for bf16 weights)
measures on a GPU: peaks from the CUDA allocator (``max_memory_allocated`` above the step's start, reset between
the passes), steps synchronized; the device check:

    python benchmarks/release_norm_clip.py --device cuda --dtype bfloat16 --dry-run
    python benchmarks/release_norm_clip.py --device cuda --dtype bfloat16 --hidden 2048 --layers 12 --vocab 32000 \
        --seq 256 --bucket-bytes 26214400 --checkpointing --warmup 2 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from profiler_peak import peak_bytes  # noqa: E402
from release_step import tiny_llama  # noqa: E402

from lowmem_lightning.callbacks.release import GradientRelease  # noqa: E402
from lowmem_lightning.optim import build_optimizer  # noqa: E402

PASSES = ("norm_pass", "update_pass")
"""Profiler ranges (``record_function``) of the two backward passes of a ``release_clip`` step."""

SETUPS = ("normal_clip", "release", "release_clip")
"""A normal step with norm clipping, release without clipping, release with norm clipping (two passes)."""


class Setup:
    """One model copy and optimizer stepped one way (:data:`SETUPS`)."""

    def __init__(self, kind: str, args: argparse.Namespace):
        if kind not in SETUPS:
            raise ValueError(f"Invalid setup {kind!r}: expected one of {', '.join(SETUPS)}.")
        self.kind, self.clip, self.device = kind, args.clip, torch.device(args.device)
        self.model = tiny_llama(args.hidden, args.layers, vocab=args.vocab).to(self.device, getattr(torch, args.dtype))
        self.cuda_pass_peaks: list[int] = []  # CUDA: the peaks inside the two passes of the last step
        self.cuda_readings: list[int] = []  # CUDA: every peak read since start()
        self._base = 0
        if args.checkpointing:  # transformers' activation checkpointing, non-reentrant (as CausalLMModule sets it)
            kwargs = {"use_reentrant": False}
            if hasattr(self.model, "activation_checkpointing_enable"):
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:  # transformers < 5
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            self.model.train()
        self.opt = build_optimizer(args.optimizer, self.model.parameters(), lr=args.lr)
        clip_norm = args.clip if kind == "release_clip" else None
        self.hooks = None if kind == "normal_clip" else GradientRelease(
            self.opt, bucket_bytes=args.bucket_bytes, clip_norm=clip_norm).attach()

    def _cuda_peak(self) -> int:
        """CUDA: the most bytes allocated since the last call (or :meth:`start`) above the step's start; 0 elsewhere."""
        if self.device.type != "cuda":
            return 0
        peak = torch.cuda.max_memory_allocated(self.device) - self._base
        torch.cuda.reset_peak_memory_stats(self.device)
        self.cuda_readings.append(peak)
        return peak

    def start(self) -> None:
        """CUDA: note what is allocated now (the step's start) and reset the allocator's peak."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.cuda_readings, self.cuda_pass_peaks = [], []

    def sync(self) -> None:
        """CUDA: wait for the step's kernels."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self, batch: torch.Tensor) -> None:
        """One training step (forward, backward(s), update)."""
        loss = self.model(input_ids=batch, labels=batch).loss
        if self.kind == "normal_clip":
            loss.backward()
            self.opt.use_grad_norm(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip))
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            return
        if self.kind == "release_clip":
            self._cuda_peak()  # the forward's, apart from the passes'
            with record_function(PASSES[0]), self.hooks.norm_pass():
                loss.backward(retain_graph=True)
            first = self._cuda_peak()
            with record_function(PASSES[1]):
                loss.backward()
                self.hooks.finish_step()
            self.cuda_pass_peaks = [first, self._cuda_peak()]
            return
        loss.backward()
        self.hooks.finish_step()


def pass_peaks(prof) -> list[int]:
    """The most bytes allocated at once inside each of the :data:`PASSES` ranges of ``prof`` (a finished
    ``torch.profiler.profile(profile_memory=True)``), above what was allocated when the profile began (the
    running sum of ``peak_bytes``, read inside each range); 0 for a range that is absent."""
    events = list(prof.profiler.kineto_results.events())
    memory = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
    ranges = {e.name(): (e.start_ns(), e.end_ns()) for e in events if e.name() in PASSES}
    peaks = dict.fromkeys(PASSES, 0)
    live = 0
    for event in memory:
        live += event.nbytes()
        for name, (begin, end) in ranges.items():
            if begin <= event.start_ns() <= end:
                peaks[name] = max(peaks[name], live)
    return [peaks[name] for name in PASSES]


def step_peak(setup: Setup, batch: torch.Tensor) -> tuple[int, list[int]]:
    """Peak bytes allocated during one step of ``setup`` (its state already exists), and the peak inside each of
    its two backward passes (zeros for a one-pass setup), both above what was allocated when the step began."""
    if setup.device.type == "cuda":
        setup.start()
        setup.step(batch)
        setup.sync()
        setup._cuda_peak()
        return max(setup.cuda_readings), list(setup.cuda_pass_peaks or [0, 0])
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        setup.step(batch)
    return peak_bytes(prof), pass_peaks(prof)


def measure(args: argparse.Namespace) -> dict:
    """Peaks (bytes) and median step times (ms) of every setup, and the time ratios."""
    setups = {kind: Setup(kind, args) for kind in SETUPS}
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(args.device) for _ in range(4)]
    for setup in setups.values():  # state exists before anything is measured
        setup.step(batches[0])
    measured = {kind: step_peak(setup, batches[1]) for kind, setup in setups.items()}
    peaks = {kind: peak for kind, (peak, _) in measured.items()}
    times: dict[str, list[float]] = {kind: [] for kind in SETUPS}
    order = list(SETUPS)
    for i in range(args.warmup + args.repeats):
        batch = batches[i % len(batches)]
        for kind in order if i % 2 == 0 else order[::-1]:
            setups[kind].sync()
            begin = time.perf_counter()
            setups[kind].step(batch)
            setups[kind].sync()
            if i >= args.warmup:
                times[kind].append((time.perf_counter() - begin) * 1e3)
    ms = {kind: statistics.median(t) for kind, t in times.items()} if args.repeats else {}
    grads = sum(p.numel() * p.element_size() for p in setups["release"].model.parameters())
    return {"params": sum(p.numel() for p in setups["release"].model.parameters()), "grad_bytes": grads,
            "peaks": peaks, "pass_peaks": measured["release_clip"][1], "ms": ms}


def markdown(result: dict, args: argparse.Namespace) -> str:
    """The result as two markdown tables (MiB; ms and ratios)."""
    mib = 2**20
    peaks, (first, second) = result["peaks"], result["pass_peaks"]
    checkpointing = ", activation checkpointing" if args.checkpointing else ""
    lines = [f"{result['params'] / 1e6:.1f}M params ({result['grad_bytes'] / mib:.1f} MiB of gradients), "
             f"{args.optimizer}, {args.device} {args.dtype}, bucket_bytes={args.bucket_bytes}, "
             f"batch {args.batch}x{args.seq}, clip {args.clip}{checkpointing}",
             "", "| setup | step peak MiB (above the step's start) |", "|---|---:|"]
    names = {"normal_clip": "normal step, clip_grad_norm_", "release": "release, no clipping",
             "release_clip": "release + clipping by norm (two passes)"}
    lines += [f"| {names[k]} | {peaks[k] / mib:.2f} |" for k in SETUPS]
    lines += [f"| - inside its norm pass | {first / mib:.2f} |", f"| - inside its update pass | {second / mib:.2f} |"]
    if result["ms"]:
        ms = result["ms"]
        lines += ["", "| setup | median step ms |", "|---|---:|"]
        lines += [f"| {names[k]} | {ms[k]:.1f} |" for k in SETUPS]
        lines += ["", f"two-pass / one-pass release: {ms['release_clip'] / ms['release']:.3f}; "
                      f"two-pass / normal step with clipping: {ms['release_clip'] / ms['normal_clip']:.3f}"]
    return "\n".join(lines)


def dry_run(args: argparse.Namespace) -> None:
    """One tiny step of each setup: the normal step with clipping and the two-pass release train the same params."""
    args.hidden, args.layers, args.vocab, args.batch, args.seq = 64, 2, 64, 1, 8
    batch = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    batch = batch.to(args.device)
    for checkpointing in (False, True):
        args.checkpointing = checkpointing
        setups = {kind: Setup(kind, args) for kind in SETUPS}
        for setup in setups.values():
            setup.step(batch)
        same = all(torch.equal(a, b) for a, b in zip(setups["normal_clip"].model.parameters(),
                                                      setups["release_clip"].model.parameters()))
        print(f"dry run ({args.device}, {args.dtype}, checkpointing {checkpointing}): two-pass release equals "
              f"the normal step with clipping: {same}")
        if not same:
            raise SystemExit(1)


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line arguments (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", default="adamw_8bit", help="a registered optimizer name")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--clip", type=float, default=1.0, help="max total gradient norm")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--bucket-bytes", type=int, default=0, help="the release's bucket (0: each tensor alone)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", help="the weights' dtype (float32, bfloat16)")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing (non-reentrant)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per setup (0: peaks only)")
    parser.add_argument("--dry-run", action="store_true", help="one tiny step of each setup, no timing")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    """Print the tables (or run the dry run)."""
    args = parse_args(argv)
    if args.dry_run:
        dry_run(args)
        return
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(markdown(measure(args), args))


if __name__ == "__main__":
    main()
