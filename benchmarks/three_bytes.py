"""Does "AdamW-quality training at ~3 bytes/param in total" hold? bf16 weights + 4-bit AdamW + gradient release.

The recipe: bf16 weights updated in place with stochastic rounding (2 B/param, no fp32 master copy), ``adamw_4bit``
(~1.06 B/param of state) and gradient release (each tensor stepped inside backward, its gradient freed: no gradient
buffer). The reference: fp32 weights + torch AdamW (4 weights + 4 gradients + 8 state = 16 B/param).

Every row trains the convergence study's tiny Llama (``benchmarks/convergence.py``: same init per seed, same data
order, same warmup + cosine lr schedule at fp32 AdamW's peak lr, no weight decay) and measures, besides its final
validation loss:

* ``weights``: bytes of the trainable params as stored (2 for bf16, 4 for fp32) per param;
* ``grads``: the most gradient bytes alive at once, sampled by a post-accumulate-grad hook registered before any
  release hook (so it sees each gradient before it is freed) and again after backward: every ``param.grad`` not
  None, summed. Without release that is the whole buffer; with release (``bucket_bytes=0``: one tensor at a time)
  the gradients not yet stepped;
* ``state``: :func:`lowmem_lightning.optim.state_memory` of the optimizer after training (peers' tensor subclasses
  through their inner tensors);
* ``estimate``: :func:`lowmem_lightning.estimate.estimate_memory` of the same model and setup (weights + gradients
  or the released bucket + state, buffers included), per param; "-" for peers it does not describe;
* ``step peak``: the profiled peak bytes one training step allocates above what is resident before it (activations,
  live gradients, the step's scratch), from torch's profiler memory events: activations are not in B/param.

The release row is the path a user takes outside Lightning (:class:`~lowmem_lightning.callbacks.GradientRelease`);
``--lightning-seeds`` also runs ``LowMemOptimizerCallback(step_in_backward=True)`` in a Lightning fit for those seeds
and checks that its final weights are bit-equal to the plain loop's (release is specified to equal a normal step).
Gradient release clips by value (clipping by norm needs every gradient at once), so the value-clipped fp32 AdamW row
is the second reference.

    python benchmarks/three_bytes.py --seeds 0,1,2 --save /tmp/tb.json
    python benchmarks/three_bytes.py --report /tmp/tb_a.json /tmp/tb_b.json   # merge runs made in two processes
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # loaded by path (tests): the sibling benchmark modules
    sys.path.insert(0, str(HERE))

import convergence as conv  # noqa: E402  (after the path fix above)
from profiler_peak import peak_bytes  # noqa: E402

from lowmem_lightning.rotary import keep_rotary_fp32  # noqa: E402

GOAL = 1.01
"""The bound: val loss within 1.01x of fp32 AdamW's (the one every convergence row of the project meets)."""

REFERENCE = "adamw_fp32"
"""The 16 B/param reference row."""

SAME_CLIP_REFERENCE = {"norm": REFERENCE, "value": "adamw_fp32_clipvalue", "none": "adamw_fp32_noclip",
                       "lagged_norm": REFERENCE}
"""The fp32 AdamW row with a row's own clipping (gradient release cannot clip by norm)."""


@dataclass(frozen=True)
class Row:
    """One setup: ``builder`` is a ``convergence.build`` key (or ``torchao_adamw``), ``bf16`` casts the model's
    params to bf16 (no fp32 master copy), ``clip`` is ``"norm"``, ``"value"`` (each at 1.0), ``"none"``
    or ``"lagged_norm"`` (:class:`LaggedNormClip`),
    ``release`` steps each tensor in backward, ``lightning`` runs it as
    ``LowMemOptimizerCallback(step_in_backward=True)`` in a fit."""

    name: str
    builder: str
    bf16: bool
    kwargs: dict = field(default_factory=dict)
    clip: str = "norm"
    release: bool = False
    lightning: bool = False
    what: str = ""


_WD0 = {"weight_decay": 0.0}
ROWS = [
    Row("adamw_fp32", "torch_adamw", False, what="fp32 weights + torch AdamW (reference)"),
    Row("adamw_fp32_clipvalue", "torch_adamw", False, clip="value", what="same, clipped by value"),
    Row("adamw_fp32_noclip", "torch_adamw", False, clip="none", what="same, not clipped"),
    Row("adamw_4bit_fp32", "ours:adamw_4bit", False, _WD0, what="fp32 weights + adamw_4bit"),
    Row("adamw_8bit_bf16", "ours:adamw_8bit", True, _WD0, what="bf16 (SR) + adamw_8bit"),
    Row("adamw_8bit_bf16_release", "ours:adamw_8bit", True, _WD0, "value", True,
        what="bf16 (SR) + adamw_8bit + release"),
    Row("adamw_4bit_bf16", "ours:adamw_4bit", True, _WD0, what="bf16 (SR) + adamw_4bit"),
    Row("adamw_4bit_bf16_release", "ours:adamw_4bit", True, _WD0, "value", True,
        what="bf16 (SR) + adamw_4bit + release (the ~3 B/param recipe)"),
    Row("adamw_4bit_bf16_release_noclip", "ours:adamw_4bit", True, _WD0, "none", True,
        what="same, not clipped"),
    Row("adamw_4bit_bf16_release_lagnorm", "ours:adamw_4bit", True, _WD0, "lagged_norm", True,
        what="same, clipped by the previous step's global norm (experiment: LaggedNormClip)"),
    Row("adamw_4bit_bf16_release_lightning", "ours:adamw_4bit", True, _WD0, "value", True, True,
        what="same, LowMemOptimizerCallback(step_in_backward=True) in a Lightning fit"),
    Row("adamw_4bit_bf16_nearest", "ours:adamw_4bit", True, {**_WD0, "bf16_rounding": "nearest"},
        what="bf16 (nearest) + adamw_4bit"),
    Row("torch_adamw_bf16", "torch_adamw", True, what="bf16 + torch AdamW (bf16 state, nearest)"),
    Row("torchao_adamw4bit_bf16", "torchao_adamw_4bit", True, {"bf16_stochastic_round": True},
        what="bf16 (SR) + torchao AdamW4bit"),
    Row("torchao_adamw_bf16", "torchao_adamw", True, {"bf16_stochastic_round": True},
        what="bf16 (SR) + torchao _AdamW (bf16 state)"),
    Row("bnb_adamw8bit_bf16", "bnb_adamw_8bit", True, what="bf16 + bitsandbytes AdamW8bit"),
]
"""The rows, in table order; ``--only`` picks some. Ours and the torch rows use no weight decay (``convergence.build``
gives the torch, torchao and bitsandbytes rows 0 too)."""

PLAIN_TWIN = {"adamw_4bit_bf16_release_lightning": "adamw_4bit_bf16_release"}
"""A Lightning row -> the plain-loop row whose final weights it must equal bit for bit."""


@dataclass
class RunResult:
    """One (row, seed) run: losses, measured bytes (per the module docstring) and a digest of the final weights."""

    row: str
    seed: int
    val: float
    val_fp32_eval: float
    params: int
    weight_bytes: int
    grad_peak_bytes: int
    grad_buffer_bytes: int
    state_bytes: int
    estimate_bytes: int | None
    step_peak_bytes: int | None
    weights_sha256: str
    seconds: float
    steps_norm_above_1: int | None = None
    """Steps whose global gradient norm exceeded the clip (1.0) before clipping (clip-by-norm rows only)."""

    @property
    def total_bytes(self) -> int:
        """Weights + peak live gradients + optimizer state (bytes)."""
        return self.weight_bytes + self.grad_peak_bytes + self.state_bytes


# ----------------------------------------------------------------------------------------- measuring
class GradMeter:
    """The most bytes of parameter gradients alive at once: every ``param.grad`` that is not None, summed.

    Sampled by a post-accumulate-grad hook on every param (register the meter before any release hook, so it
    fires first and sees each gradient before it is freed) and by :meth:`sample` (call it after backward)."""

    def __init__(self, params) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.peak_bytes = 0
        """Most gradient bytes seen alive at once (bytes)."""
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]

    def _on_grad(self, param: torch.Tensor) -> None:
        self.sample()

    def sample(self) -> int:
        """Bytes of the gradients alive now; updates :attr:`peak_bytes`."""
        live = sum(p.grad.numel() * p.grad.element_size() for p in self.params if p.grad is not None)
        self.peak_bytes = max(self.peak_bytes, live)
        return live

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


class LaggedNormClip:
    """Clipping by global norm that gradient release can do: each gradient, as it is accumulated, is scaled by
    ``min(1, max_norm / n)`` with ``n`` the global gradient norm of the *previous* step (1 on the first), and adds
    to this step's norm. A benchmark experiment, not a library feature; register it before any release hook."""

    def __init__(self, params, max_norm: float = 1.0) -> None:
        self.max_norm = max_norm
        self.scale = 1.0
        """The factor applied to this step's gradients."""
        self._sq = 0.0
        params = [p for p in params if p.requires_grad]
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params]

    @torch.no_grad()
    def _on_grad(self, param: torch.Tensor) -> None:
        self._sq += float(param.grad.float().square().sum())
        if self.scale != 1.0:
            param.grad.mul_(self.scale)

    def end_step(self) -> None:
        """Call after backward: this step's norm sets the next step's scale."""
        norm, self._sq = math.sqrt(self._sq), 0.0
        self.scale = min(1.0, self.max_norm / norm) if norm > 0 else 1.0

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def profiled_peak(fn) -> int:
    """Peak bytes allocated by ``fn()`` above what was allocated when it started (CPU profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return peak_bytes(prof)


def measured_state_bytes(opt, builder: str) -> int:
    """Optimizer state bytes: ``state_memory`` for ours and torch's, inner tensors of peers' subclasses."""
    if builder.startswith("ours:") or builder == "torch_adamw":
        from lowmem_lightning.optim import state_memory

        return state_memory(opt).total_bytes
    from optim_step import state_bytes

    return state_bytes(opt, ours=False)


def estimated_bytes(model: torch.nn.Module, row: Row) -> int | None:
    """``estimate_memory``'s weights + gradients (or released bucket, ``bucket_bytes=0``) + state for ``row``'s
    optimizer on ``model``; None for a peer the estimator does not describe."""
    from lowmem_lightning.estimate import estimate_memory

    if row.builder.startswith("ours:"):
        name = row.builder.split(":", 1)[1]
    elif row.builder == "torch_adamw":
        name = "adamw"
    else:
        return None
    est = estimate_memory(model, variants={}, configured=(name, {"lr": 1e-3, **row.kwargs}),
                          step_in_backward=row.release, bucket_bytes=0)
    return est.optimizers[est.configured_optimizer].total_device_bytes


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every param's bytes in order (equal digests: bit-equal weights)."""
    digest = hashlib.sha256()
    for param in model.parameters():
        digest.update(param.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def evaluate_fp32(model: torch.nn.Module, val: torch.Tensor, args) -> float:
    """Val loss of the same weights computed in fp32 (a bf16 model upcast on a copy)."""
    import copy

    return conv.evaluate(copy.deepcopy(model).float(), val, args)


# ----------------------------------------------------------------------------------------- training
def build(row: Row, model: torch.nn.Module, peak: float):
    """The row's optimizer over the model's params (ImportError when a peer is not installed)."""
    if row.builder == "torchao_adamw":
        from torchao.optim import _AdamW

        return _AdamW(model.parameters(), lr=peak, weight_decay=0.0, **row.kwargs)
    return conv.build(row.builder, model.parameters(), peak, dict(row.kwargs))


def lr_factor(step: int, args) -> float:
    """The convergence study's warmup + cosine schedule as a factor of the peak lr (one expression for the plain
    loop and Lightning's ``LambdaLR``, so both compute the same float)."""
    return conv.lr_at(step, args.steps, 1.0, args.warmup)


def _set_lr(opt, lr: float) -> None:
    for group in opt.param_groups:
        if isinstance(group["lr"], torch.Tensor):  # torchao keeps lr as a tensor
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def train_plain(row: Row, model, opt, data, args, seed: int, peak: float) -> tuple[GradMeter, int, int | None]:
    """``args.steps`` steps of the plain loop; returns the gradient meter, the profiled peak of the middle step and
    the number of steps clipping by norm scaled the gradients down (None for other rows)."""
    from lowmem_lightning.callbacks import GradientRelease

    meter = GradMeter(model.parameters())  # before the release hooks: it fires first
    clip_value = 1.0 if row.clip == "value" else None
    norms: list[torch.Tensor] = []
    lagged = LaggedNormClip(model.parameters()) if row.clip == "lagged_norm" else None  # before release too
    hooks = GradientRelease(opt, clip_value=clip_value, bucket_bytes=0).attach() if row.release else None

    def one_step(x):
        model(input_ids=x, labels=x).loss.backward()
        meter.sample()
        if lagged is not None:
            lagged.end_step()
        if hooks is not None:
            hooks.finish_step()
        elif row.clip == "value":
            torch.nn.utils.clip_grad_value_(model.parameters(), 1.0)
        elif row.clip == "norm":
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        opt.step()
        opt.zero_grad(set_to_none=True)

    step_peak = 0
    for step, (x, _) in enumerate(conv.batches(data, args.batch, args.seq, args.steps, seed)):
        _set_lr(opt, peak * lr_factor(step, args))
        if step == args.steps // 2:
            step_peak = profiled_peak(lambda: one_step(x))  # noqa: B023  (called at once)
        else:
            one_step(x)
    if hooks is not None:
        hooks.detach()
    if lagged is not None:
        lagged.remove()
    meter.remove()
    above = sum(int(n > 1.0) for n in norms) if row.clip == "norm" and not row.release else None
    return meter, step_peak, above


def train_lightning(row: Row, model, data, args, seed: int, peak: float) -> tuple[GradMeter, torch.optim.Optimizer]:
    """The same run as a user writes it: a LightningModule with torch AdamW + ``LambdaLR``, swapped by
    ``LowMemOptimizerCallback(row's optimizer, step_in_backward=True, bucket_bytes=0)``, ``bf16-true``, the
    row's clipping by value (at 1.0) or none. Returns the gradient meter (registered before the callback's hooks)
    and the optimizer built."""
    import lightning as L

    from lowmem_lightning.callbacks import LowMemOptimizerCallback

    meter = GradMeter(model.parameters())
    module = llama_module(model, peak, args)
    batches = [x for x, _ in conv.batches(data, args.batch, args.seq, args.steps, seed)]
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    name = row.builder.split(":", 1)[1]
    kwargs = {k: v for k, v in row.kwargs.items() if k not in ("weight_decay", "bf16_rounding")}
    callback = LowMemOptimizerCallback(name, weight_decay=row.kwargs.get("weight_decay"), optimizer_kwargs=kwargs,
                                       bf16_rounding=row.kwargs.get("bf16_rounding"), step_in_backward=True,
                                       bucket_bytes=0, log_state_memory=False, plot=False, print_summary=False)
    trainer = L.Trainer(max_steps=args.steps, precision="bf16-true" if row.bf16 else "32-true", accelerator="cpu",
                        devices=1, gradient_clip_val=1.0 if row.clip == "value" else None,
                        gradient_clip_algorithm="value", callbacks=[callback],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=args.out)
    trainer.fit(module, loader)
    meter.remove()
    return meter, callback.optimizers[0]


def llama_module(model: torch.nn.Module, peak: float, args):
    """``model`` in a LightningModule as a user writes it (lightning is imported here, on first use)."""
    import lightning as L

    class LlamaModule(L.LightningModule):
        """The tiny Llama as a user's LightningModule: torch AdamW (no weight decay) with the study's schedule."""

        def __init__(self, model, peak: float, args):
            super().__init__()
            self.model, self.peak, self.args = model, peak, args

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.model.parameters(), lr=self.peak, weight_decay=0.0)
            schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, self.args))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    return LlamaModule(model, peak, args)


def run_row(row: Row, seed: int, data, val, args) -> RunResult:
    """Train ``row`` for one seed and measure it."""
    model = conv.tiny_llama(seed, args.hidden, args.layers, args.seq)
    if row.bf16:  # bf16 weights, rotary frequencies kept fp32 (as from_pretrained and our callback keep them)
        model = model.to(torch.bfloat16)
        keep_rotary_fp32(model)
    peak = conv.LR["adamw"] * args.lr_scale
    estimate = estimated_bytes(model, row)
    start = time.perf_counter()
    if row.lightning:
        meter, opt = train_lightning(row, model, data, args, seed, peak)
        step_peak = above = None
    else:
        opt = build(row, model, peak)
        meter, step_peak, above = train_plain(row, model, opt, data, args, seed, peak)
    seconds = time.perf_counter() - start
    params = [p for p in model.parameters() if p.requires_grad]
    nbytes = sum(p.numel() * p.element_size() for p in params)
    return RunResult(row.name, seed, conv.evaluate(model, val, args), evaluate_fp32(model, val, args),
                     sum(p.numel() for p in params), nbytes, meter.peak_bytes, nbytes,
                     measured_state_bytes(opt, row.builder), estimate, step_peak, weights_digest(model), seconds,
                     above)


# ----------------------------------------------------------------------------------------- reporting
def check_twins(results: list[RunResult]) -> list[str]:
    """One line per Lightning run with a plain twin of the same seed: bit-equal weights or not."""
    by_key = {(r.row, r.seed): r for r in results}
    lines = []
    for twin, plain in PLAIN_TWIN.items():
        for (name, seed), res in sorted(by_key.items()):
            if name != twin or (plain, seed) not in by_key:
                continue
            other = by_key[(plain, seed)]
            same = res.weights_sha256 == other.weights_sha256
            lines.append(f"{twin} vs {plain}, seed {seed}: final weights {'bit-equal' if same else 'DIFFER'} "
                         f"(val {res.val:.6f} vs {other.val:.6f})")
    return lines


def _per_param(nbytes: int | None, params: int) -> str:
    return "-" if nbytes is None else f"{nbytes / params:.2f}"


def table(results: list[RunResult], notes: dict[str, str]) -> str:
    """Markdown: per row the measured bytes per param, the estimator's, the profiled step peak and the val loss
    over seeds against fp32 AdamW clipped by norm and with the row's own clipping (ratio of means over the same
    seeds; per-seed ratios against the same seed's reference)."""
    rows: dict[str, list[RunResult]] = {}
    for res in results:
        rows.setdefault(res.row, []).append(res)
    lines = ["| setup | weights | grads (peak) | state | **total B/param** | estimator | step peak MB (activations) | "
             "val loss mean ± sd (seeds) | per-seed vs fp32 AdamW | **vs fp32 AdamW** | vs fp32 AdamW, same clipping | "
             "val, fp32 eval |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|"]
    for row in ROWS:
        if row.name in rows:
            lines.append(_table_line(row, sorted(rows[row.name], key=lambda r: r.seed), rows))
        elif row.name in notes:
            lines.append(f"| {row.name} | {notes[row.name]} |" + " |" * 10)
    return "\n".join(lines)


def _table_line(row: Row, runs: list[RunResult], rows: dict[str, list[RunResult]]) -> str:
    ref = {r.seed: r.val for r in rows.get(REFERENCE, [])}
    first, vals = runs[0], [r.val for r in runs]
    mean = statistics.fmean(vals)
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    per_seed = ", ".join(f"{r.val / ref[r.seed]:.3f}" for r in runs if r.seed in ref) or "-"
    step_peak = "-" if first.step_peak_bytes is None else f"{first.step_peak_bytes / 1e6:.1f}"
    return (f"| {row.name} | {_per_param(first.weight_bytes, first.params)} | "
            f"{_per_param(first.grad_peak_bytes, first.params)} | {_per_param(first.state_bytes, first.params)} | "
            f"**{_per_param(first.total_bytes, first.params)}** | {_per_param(first.estimate_bytes, first.params)} | "
            f"{step_peak} | {mean:.4f} ± {sd:.4f} ({','.join(str(r.seed) for r in runs)}) | {per_seed} | "
            f"**{_ratio(mean, rows.get(REFERENCE), runs)}** | "
            f"{_ratio(mean, rows.get(SAME_CLIP_REFERENCE[row.clip]), runs)} | "
            f"{statistics.fmean(r.val_fp32_eval for r in runs):.4f} |")


def _ratio(mean: float, ref_runs: list[RunResult] | None, runs: list[RunResult]) -> str:
    """``mean`` over the reference's mean on the same seeds ("-" without them)."""
    if not ref_runs:
        return "-"
    seeds = {r.seed for r in runs}
    ref_vals = [r.val for r in ref_runs if r.seed in seeds]
    if len(ref_vals) != len(seeds):
        return "-"
    return f"{mean / statistics.fmean(ref_vals):.4f}x"


def verdict(results: list[RunResult]) -> list[str]:
    """Which rows meet the goal (mean val loss <= GOAL x fp32 AdamW's on the same seeds)."""
    by_row: dict[str, list[RunResult]] = {}
    for res in results:
        by_row.setdefault(res.row, []).append(res)
    ref = {r.seed: r.val for r in by_row.get(REFERENCE, [])}
    lines = []
    for name, runs in by_row.items():
        if name == REFERENCE or not all(r.seed in ref for r in runs):
            continue
        ratio = statistics.fmean(r.val for r in runs) / statistics.fmean(ref[r.seed] for r in runs)
        total = runs[0].total_bytes / runs[0].params
        lines.append(f"{name}: {total:.2f} B/param, {ratio:.4f}x fp32 AdamW -> "
                     f"{'meets' if ratio <= GOAL else 'MISSES'} the {GOAL}x goal")
    return lines


def report(results: list[RunResult], notes: dict[str, str], command: str) -> str:
    """The whole markdown report: command, table, twin checks, verdicts."""
    params = results[0].params if results else 0
    text = [f"# ~3 bytes/param study ({dt.date.today().isoformat()}, {conv.device_name()}, torch {torch.__version__})",
            "", f"Command: `{command}`", f"Model: tiny Llama, {params:,} params. Bytes per param, measured.", "",
            table(results, notes), ""]
    return "\n".join(text + check_twins(results) + [""] + verdict(results))


# ----------------------------------------------------------------------------------------- main
def _rows(only: list[str] | None) -> list[Row]:
    names = [row.name for row in ROWS]
    for name in only or []:
        if name not in names:
            raise SystemExit(f"--only: unknown row {name!r}; rows: {', '.join(names)}")
    return [row for row in ROWS if not only or row.name in only]


def run_all(args) -> tuple[list[RunResult], dict[str, str]]:
    """Every chosen row over its seeds (Lightning rows over ``--lightning-seeds``); peers that are missing noted."""
    train_data, val_data, _ = conv.stdlib_corpus(args.corpus_bytes)
    results, notes = [], {}
    for row in _rows(args.only):
        for seed in (args.lightning_seeds if row.lightning else args.seeds):
            try:
                res = run_row(row, seed, train_data, val_data, args)
            except ImportError as err:
                notes[row.name] = f"not available: {type(err).__name__}: {err}"[:120]
                break
            results.append(res)
            print(f"{row.name:34s} seed {seed}: val {res.val:.4f} (fp32 eval {res.val_fp32_eval:.4f}), "
                  f"{res.total_bytes / res.params:.2f} B/param, {res.seconds:.0f} s"
                  + ("" if res.steps_norm_above_1 is None else f", norm > 1 at {res.steps_norm_above_1} steps"),
                  flush=True)
    return results, notes


def _seeds(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be comma-separated ints, got {text!r}") from None


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options (model and data options are the convergence study's)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=_seeds, default=[0, 1, 2])
    parser.add_argument("--lightning-seeds", type=_seeds, default=[0],
                        help="seeds of the Lightning row (default 0; checked bit-equal to the plain release row)")
    conv.add_model_and_data_args(parser)
    parser.add_argument("--lr-scale", type=conv._positive_float, default=1.0, help="multiplies the peak lr (3e-3)")
    parser.add_argument("--only", type=lambda s: s.split(","), default=None, help="comma-separated row names")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", type=Path, default=HERE / "out", help="folder of three_bytes.md")
    parser.add_argument("--save", type=Path, default=None, help="write the runs as JSON (for --report)")
    parser.add_argument("--report", type=Path, nargs="+", default=None,
                        help="print the report of runs saved with --save (several files are merged); trains nothing")
    return parser.parse_args(argv)


SETTINGS = ("steps", "warmup", "batch", "seq", "hidden", "layers", "eval_batches", "corpus_bytes", "lr_scale")
"""Options that must match for saved runs to be compared in one report."""


def load_saved(paths: list[Path]) -> tuple[list[RunResult], dict[str, str]]:
    """Runs and notes of ``--save`` files; refuses files made with different :data:`SETTINGS` (a file without
    recorded settings is taken as it is)."""
    results, notes, settings = [], {}, {}
    for path in paths:
        saved = json.loads(path.read_text())
        for key, value in saved.get("settings", {}).items():
            if settings.setdefault(key, value) != value:
                raise SystemExit(f"--report: {path} has {key}={value!r}, another file {settings[key]!r}; "
                                 "report runs of the same settings together")
        results += [RunResult(**r) for r in saved["results"]]
        notes.update(saved["notes"])
    return results, notes


def main(argv=None) -> int:
    """Train the chosen rows (or merge saved runs), print and write the report."""
    args = parse_args(argv)
    command = "python benchmarks/three_bytes.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.report:
        results, notes = load_saved(args.report)
    else:
        torch.set_num_threads(args.threads)
        args.out.mkdir(parents=True, exist_ok=True)
        results, notes = run_all(args)
        if args.save is not None:
            settings = {key: getattr(args, key) for key in SETTINGS}
            args.save.write_text(json.dumps({"command": command, "settings": settings,
                                             "results": [asdict(r) for r in results], "notes": notes}, indent=1))
    text = report(results, notes, command)
    print(text)
    if not args.report:
        (args.out / "three_bytes.md").write_text(text + "\n")
    twins = check_twins(results)
    return 1 if any("DIFFER" in line for line in twins) else 0


if __name__ == "__main__":
    sys.exit(main())
