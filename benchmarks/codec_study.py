"""Which 8-bit code for optimizer states? The measurement behind ``lowmem_lightning.kernels.codec``.

Three measurements, every candidate code quantizing block-wise (256 elements, one fp32 absmax per
block, round half away from zero) in pure PyTorch:

1. **Accuracy** on the 1024x1024, 200-step AdamW problem (``p0 = randn * 0.1``, gradients
   ``randn * 0.01`` from a fixed generator, lr 1e-3, betas (0.9, 0.999), eps 1e-8, no weight decay):
   8-bit AdamW (m and v re-quantized after every step, the update using the fp32 values before
   quantization, as our kernel does) against fp32 ``torch.optim.AdamW``. Metrics with
   ``d = p_final - p0``: relative update error ``||d8 - d32|| / ||d32||``, update cosine, and the
   element-wise mean relative parameter error ``mean(|p8 - p32| / |p32|)``. bitsandbytes' AdamW8bit
   (dynamic-tree code) and the package's own AdamW8bit are measured on the same problem when present.
2. **Dynamic range**: the fraction of non-zero second-moment (and first-moment) elements that a code
   flushes to zero on a heavy-tailed state (per-element gradient scales log-normal, sigma 2, EMAs
   over 100 steps), and the fraction of elements whose m survives while v is flushed, where the
   AdamW update ``m / (sqrt(v) + eps)`` explodes.
3. **Speed**: quantize + dequantize throughput on the CPU (eager PyTorch), million elements/s.

Candidates (``x`` = value / block absmax; signed code for m, unsigned for v):

* ``linear``: ``x`` itself (absmax linear), 127 / 255 levels.
* ``flash``: FlashOptim-style companding ``2x / (1 + |x|)`` for m, ``sqrt(x)`` for v.
* ``power`` (ours): ``sign(x) sqrt|x|`` for m, ``x ** (1/4)`` for v.
* ``cbrt``: ``sign(x) |x| ** (1/3)`` for m, ``x ** (1/4)`` for v.

    python benchmarks/codec_study.py                 # full study (~1-2 min on 2 cores)
    python benchmarks/codec_study.py --size 128 --steps 20 --throughput-numel 64K --no-compile  # smoke
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("LOWMEM_CPU_COMPILE", "0")  # one 200-step run: compiling would cost more than it saves

import torch  # noqa: E402

BLOCK = 256
SIGNED_LEVELS, UNSIGNED_LEVELS = 127.0, 255.0


@dataclass(frozen=True)
class Code:
    """A companding code: ``enc``/``dec`` map normalized values of m (signed) and v (unsigned) to [-1, 1]."""

    name: str
    enc_m: Callable[[torch.Tensor], torch.Tensor]
    dec_m: Callable[[torch.Tensor], torch.Tensor]
    enc_v: Callable[[torch.Tensor], torch.Tensor]
    dec_v: Callable[[torch.Tensor], torch.Tensor]


CODES = [
    Code("linear", lambda x: x, lambda y: y, lambda x: x, lambda y: y),
    Code("flash", lambda x: 2 * x / (1 + x.abs()), lambda y: y / (2 - y.abs()), torch.sqrt, lambda y: y * y),
    Code("power (ours)", lambda x: x.sign() * x.abs().sqrt(), lambda y: y * y.abs(),
         lambda x: x.sqrt().sqrt(), lambda y: (y * y) ** 2),
    Code("cbrt", lambda x: x.sign() * x.abs().pow(1 / 3), lambda y: y.sign() * y.abs() ** 3,
         lambda x: x.sqrt().sqrt(), lambda y: (y * y) ** 2),
]


def _blocks(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1)
    pad = (-flat.numel()) % BLOCK
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, BLOCK)


def quantize(x: torch.Tensor, code: Code, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise quantize ``x`` with ``code``: (int codes as int16 (nb, 256), absmax (nb, 1))."""
    blocks = _blocks(x)
    absmax = (blocks.abs() if signed else blocks).amax(dim=1, keepdim=True)
    normalized = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    y = code.enc_m(normalized) if signed else code.enc_v(normalized.clamp(min=0))
    levels = SIGNED_LEVELS if signed else UNSIGNED_LEVELS
    q = torch.floor(y.abs() * levels + 0.5).clamp(max=levels)
    return (torch.where(y < 0, -q, q)).to(torch.int16), absmax


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, code: Code, signed: bool, like: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize`, reshaped like ``like``."""
    y = codes.to(torch.float32) / (SIGNED_LEVELS if signed else UNSIGNED_LEVELS)
    values = (code.dec_m(y) if signed else code.dec_v(y)) * absmax
    return values.reshape(-1)[: like.numel()].view(like.shape)


def round_trip(x: torch.Tensor, code: Code, signed: bool) -> torch.Tensor:
    """``dequantize(quantize(x))``."""
    return dequantize(*quantize(x, code, signed), code, signed, x)


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _bnb():
    try:
        with _quiet():
            import bitsandbytes
        return bitsandbytes
    except Exception:
        return None


# --------------------------------------------------------------------------------------------------
# 1. Accuracy on the AdamW problem
# --------------------------------------------------------------------------------------------------


def make_problem(size: int, steps: int):
    """(p0, gradient iterator factory): the fixed problem of the study."""
    p0 = torch.randn(size, size, generator=torch.Generator().manual_seed(0)) * 0.1

    def grads():
        gen = torch.Generator().manual_seed(1)
        for _ in range(steps):
            yield torch.randn(size, size, generator=gen) * 0.01

    return p0, grads


def run_optimizer(build: Callable, p0: torch.Tensor, grads) -> torch.Tensor:
    """Final params after running ``build([param])`` over the gradient sequence."""
    param = torch.nn.Parameter(p0.clone())
    with _quiet():
        optimizer = build([param])
        for g in grads():
            param.grad = g
            optimizer.step()
    return param.detach().clone()


def run_simulated(code: Code, p0: torch.Tensor, grads, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8) -> torch.Tensor:
    """AdamW in fp32 with m and v re-quantized by ``code`` after every step (the update uses fp32 m, v)."""
    p = p0.clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    for t, g in enumerate(grads(), 1):
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        denom = (v / (1 - beta2**t)).sqrt() + eps
        p = p - lr * (m / (1 - beta1**t)) / denom
        m, v = round_trip(m, code, signed=True), round_trip(v, code, signed=False)
    return p


def accuracy_metrics(p8: torch.Tensor, p32: torch.Tensor, p0: torch.Tensor) -> dict:
    """Relative update error, update cosine and mean relative parameter error of ``p8`` against ``p32``."""
    d8, d32 = (p8 - p0).flatten(), (p32 - p0).flatten()
    return {
        "rel_update_error": ((d8 - d32).norm() / d32.norm()).item(),
        "update_cosine": torch.nn.functional.cosine_similarity(d8, d32, dim=0).item(),
        "mean_rel_param_error": ((p8 - p32).abs() / p32.abs().clamp(min=1e-12)).mean().item(),
    }


def accuracy_study(size: int, steps: int) -> list[tuple[str, dict]]:
    """Every candidate (and bitsandbytes / the package when present) against fp32 AdamW."""
    p0, grads = make_problem(size, steps)
    p32 = run_optimizer(lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.0), p0, grads)
    rows = []
    bnb = _bnb()
    if bnb is not None:
        p8 = run_optimizer(lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3, weight_decay=0.0), p0, grads)
        rows.append(("bitsandbytes AdamW8bit (dynamic tree)", accuracy_metrics(p8, p32, p0)))
    for code in CODES:
        rows.append((code.name, accuracy_metrics(run_simulated(code, p0, grads), p32, p0)))
    try:
        from lowmem_lightning.optim import build_optimizer

        p8 = run_optimizer(lambda ps: build_optimizer("adamw_8bit", ps, lr=1e-3, weight_decay=0.0), p0, grads)
        rows.append(("lowmem_lightning adamw_8bit (package)", accuracy_metrics(p8, p32, p0)))
    except ImportError:
        pass
    return rows


# --------------------------------------------------------------------------------------------------
# 2. Dynamic range
# --------------------------------------------------------------------------------------------------


def heavy_tailed_state(numel: int, steps: int = 100, sigma: float = 2.0, beta1=0.9, beta2=0.999):
    """(m, v) after ``steps`` EMA steps of gradients with log-normal per-element scales (sigma ``sigma``)."""
    gen = torch.Generator().manual_seed(2)
    scale = torch.exp(sigma * torch.randn(numel, generator=gen))
    m, v = torch.zeros(numel), torch.zeros(numel)
    for _ in range(steps):
        g = torch.randn(numel, generator=gen) * scale
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
    return m, v


def flush_metrics(m: torch.Tensor, v: torch.Tensor, m_hat: torch.Tensor, v_hat: torch.Tensor) -> dict:
    """Fractions of non-zero elements decoded as exactly 0, and of elements with m kept but v flushed."""
    return {
        "v_flushed": ((v_hat == 0) & (v > 0)).float().mean().item(),
        "m_flushed": ((m_hat == 0) & (m != 0)).float().mean().item(),
        "m_kept_v_flushed": ((m_hat != 0) & (v_hat == 0)).float().mean().item(),
    }


def dynamic_range_study(numel: int) -> list[tuple[str, dict]]:
    m, v = heavy_tailed_state(numel)
    rows = [(code.name, flush_metrics(m, v, round_trip(m, code, True), round_trip(v, code, False))) for code in CODES]
    bnb = _bnb()
    if bnb is not None:
        F = bnb.functional
        with _quiet():
            qm, sm = F.quantize_blockwise(m, code=F.create_dynamic_map(signed=True), blocksize=BLOCK)
            qv, sv = F.quantize_blockwise(v, code=F.create_dynamic_map(signed=False), blocksize=BLOCK)
            m_hat, v_hat = F.dequantize_blockwise(qm, sm), F.dequantize_blockwise(qv, sv)
        rows.insert(0, ("bitsandbytes dynamic tree", flush_metrics(m, v, m_hat, v_hat)))
    return rows


# --------------------------------------------------------------------------------------------------
# 3. Throughput
# --------------------------------------------------------------------------------------------------


def _median_seconds(fn: Callable[[], object], repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def throughput_study(numel: int, compiled: bool = True) -> list[tuple[str, dict]]:
    """Million elements/s of quantize + dequantize (signed m, unsigned v) on the CPU.

    Candidates run eager PyTorch; the package's codec also runs under ``torch.compile`` (as our CPU
    optimizer path does) when ``compiled``; bitsandbytes runs its CPU backend.
    """
    gen = torch.Generator().manual_seed(3)
    m = torch.randn(numel, generator=gen)
    v = torch.rand(numel, generator=gen) ** 4
    rows = []
    for code in CODES:
        ts = _median_seconds(lambda c=code: round_trip(m, c, True))
        tu = _median_seconds(lambda c=code: round_trip(v, c, False))
        rows.append((code.name, {"signed_Melem_s": numel / ts / 1e6, "unsigned_Melem_s": numel / tu / 1e6}))
    from lowmem_lightning.kernels.codec import dequantize_reference, quantize_reference

    ts = _median_seconds(lambda: dequantize_reference(*quantize_reference(m, True)))
    tu = _median_seconds(lambda: dequantize_reference(*quantize_reference(v, False)))
    rows.append(("power (package codec, exact reference)",
                 {"signed_Melem_s": numel / ts / 1e6, "unsigned_Melem_s": numel / tu / 1e6}))
    if compiled:
        fn = torch.compile(lambda x, signed: dequantize_reference(*quantize_reference(x, signed)), dynamic=True)
        ts = _median_seconds(lambda: fn(m, True))
        tu = _median_seconds(lambda: fn(v, False))
        rows.append(("power (package codec, torch.compile)",
                     {"signed_Melem_s": numel / ts / 1e6, "unsigned_Melem_s": numel / tu / 1e6}))
    bnb = _bnb()
    if bnb is not None:
        F = bnb.functional
        with _quiet():
            cs, cu = F.create_dynamic_map(signed=True), F.create_dynamic_map(signed=False)
            ts = _median_seconds(lambda: F.dequantize_blockwise(*F.quantize_blockwise(m, code=cs, blocksize=BLOCK)))
            tu = _median_seconds(lambda: F.dequantize_blockwise(*F.quantize_blockwise(v, code=cu, blocksize=BLOCK)))
        rows.insert(0, ("bitsandbytes dynamic tree (CPU backend)",
                        {"signed_Melem_s": numel / ts / 1e6, "unsigned_Melem_s": numel / tu / 1e6}))
    return rows


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def markdown(rows: list[tuple[str, dict]], formats: dict[str, str]) -> str:
    """Markdown table with one column per metric of ``formats`` (metric -> format spec)."""
    lines = ["| code | " + " | ".join(formats) + " |", "|---|" + "---:|" * len(formats)]
    for name, metrics in rows:
        lines.append(f"| {name} | " + " | ".join(format(metrics[k], f) for k, f in formats.items()) + " |")
    return "\n".join(lines)


def parse_numel(text: str) -> int:
    units = {"K": 2**10, "M": 2**20}
    text = text.strip().upper()
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="side of the square AdamW problem")
    parser.add_argument("--steps", type=int, default=200, help="AdamW steps")
    parser.add_argument("--state-numel", default="4M", help="elements of the heavy-tailed state")
    parser.add_argument("--throughput-numel", default="4M", help="elements quantized per throughput call")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile throughput row")
    parser.add_argument("--only", default="accuracy,range,throughput", help="comma list of sections to run")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    import triton

    command = " ".join(argv if argv is not None else sys.argv[1:])
    out = [
        f"# 8-bit state code study ({dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC)",
        "",
        f"- command: `python benchmarks/codec_study.py {command}`",
        f"- torch {torch.__version__}, triton {triton.__version__}, {torch.get_num_threads()} CPU threads",
    ]
    print("\n".join(out), flush=True)
    sections = [
        (f"### Accuracy: {args.size}x{args.size} AdamW, {args.steps} steps, against fp32 torch.optim.AdamW",
         lambda: accuracy_study(args.size, args.steps),
         {"rel_update_error": ".4f", "update_cosine": ".6f", "mean_rel_param_error": ".4f"}),
        (f"### Dynamic range: heavy-tailed state ({args.state_numel} elements, log-normal scales, sigma 2)",
         lambda: dynamic_range_study(parse_numel(args.state_numel)),
         {"v_flushed": ".2e", "m_flushed": ".2e", "m_kept_v_flushed": ".2e"}),
        (f"### Throughput: quantize + dequantize of {args.throughput_numel} elements, CPU (eager PyTorch unless noted)",
         lambda: throughput_study(parse_numel(args.throughput_numel), compiled=not args.no_compile),
         {"signed_Melem_s": ".1f", "unsigned_Melem_s": ".1f"}),
    ]
    keys = ("accuracy", "range", "throughput")
    wanted = {k.strip() for k in args.only.split(",")}
    if not wanted <= set(keys):
        parser.error(f"--only: expected names from {', '.join(keys)}, got {args.only!r}")
    for key, (title, study, formats) in zip(keys, sections):
        if key not in wanted:
            continue
        section = ["", title, "", markdown(study(), formats)]
        print("\n".join(section), flush=True)
        out += section
    if args.markdown:
        args.markdown.write_text("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
