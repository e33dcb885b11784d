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
# 4. Accuracy of 4-bit codes (issue 29: adamw_4bit), next to torchao's AdamW4bit and the 8-bit codes
# --------------------------------------------------------------------------------------------------

BLOCK4 = 128


def noisy_quadratic(size: int):
    """``(p0, grad_fn)`` of the noisy quadratic: ``g = h * (p - target) + 0.01 h * noise`` with ``h = r_i c_j``
    (``r, c`` log-normal, sigma 0.5: rows and columns of different curvature), ``p0, target = randn * 0.1``."""
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(size, size, generator=gen) * 0.1
    h = torch.exp(0.5 * torch.randn(size, 1, generator=gen)) * torch.exp(0.5 * torch.randn(1, size, generator=gen))
    target = torch.randn(size, size, generator=gen) * 0.1
    return p0, lambda p, noise: h * (p - target) + 0.01 * h * torch.randn(size, size, generator=noise)


def pure_noise(size: int):
    """``(p0, grad_fn)`` of the 8-bit study's problem: gradients ``randn * 0.01`` whatever the params."""
    p0 = torch.randn(size, size, generator=torch.Generator().manual_seed(0)) * 0.1
    return p0, lambda p, noise: torch.randn(size, size, generator=noise) * 0.01


def real_gradients(steps: int, layer: int = 1, seed: int = 0):
    """``(p0, grad_fn)`` replaying the gradients of the convergence study's model (``benchmarks/convergence.py``:
    its default tiny Llama, corpus and batches, fp32 ``torch.optim.AdamW`` at lr 3e-3 with its warmup/cosine
    schedule, gradients clipped at norm 1) seen by the matrices of decoder layer ``layer`` and the LM head over
    ``steps`` steps, as one ``(-1, 128)`` tensor (every matrix a whole number of 128-element rows). Open loop:
    ``grad_fn`` returns step ``t``'s recorded gradient whatever the params, so the error of a code is the error
    of its updates on real gradient statistics (heavy tails, per-row scales, changing magnitude)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import convergence as conv

    args = argparse.Namespace(batch=16, seq=128, warmup=30, steps=steps)
    train, _, _ = conv.stdlib_corpus(4_000_000)
    model = conv.tiny_llama(seed, 128, 2, args.seq)
    watched = [p for n, p in model.named_parameters()
               if (f"layers.{layer}." in n and p.dim() == 2) or n == "lm_head.weight"]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    p0 = torch.cat([p.detach().reshape(-1, BLOCK4) for p in watched]).clone()
    recorded = []
    for step, (x, _) in enumerate(conv.batches(train, args.batch, args.seq, steps, seed)):
        for group in opt.param_groups:
            group["lr"] = conv.lr_at(step, steps, 3e-3, args.warmup)
        model(input_ids=x, labels=x).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        recorded.append(torch.cat([p.grad.reshape(-1, BLOCK4) for p in watched]).clone())
        opt.step()
        opt.zero_grad(set_to_none=True)
    return p0, _Replay(recorded)


class _Replay:
    """``grad_fn`` of recorded gradients: step ``t`` of a run returns ``recorded[t]``; a run is recognised by
    its noise generator (every run of :func:`run_simulated4` / :func:`run_optimizer4` makes a new one)."""

    def __init__(self, recorded: list[torch.Tensor]):
        self.recorded, self.noise, self.t = recorded, None, 0

    def __call__(self, p: torch.Tensor, noise: torch.Generator) -> torch.Tensor:
        if noise is not self.noise:
            self.noise, self.t = noise, 0
        self.t += 1
        return self.recorded[self.t - 1]


def _nearest_level(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Each value of ``x`` replaced by the nearer of its two neighbouring ``levels`` (sorted; ties up)."""
    idx = torch.bucketize(x, levels).clamp(1, len(levels) - 1)
    lo, hi = levels[idx - 1], levels[idx]
    return torch.where(x - lo >= (hi - lo) * 0.5, hi, lo)


def _stochastic_level(gen: torch.Generator) -> Callable:
    """Rounding to one of the two neighbouring levels with the probabilities that make it unbiased."""
    def rounding(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        idx = torch.bucketize(x, levels).clamp(1, len(levels) - 1)
        lo, hi = levels[idx - 1], levels[idx]
        return torch.where(torch.rand(x.shape, generator=gen) * (hi - lo) < x - lo, hi, lo)
    return rounding


class StallAwareLevels:
    """Block-wise round trip onto signed ``levels`` that rounds to the nearer level unless that would store
    the code the element already had, and then stochastically (unbiased) between the two neighbours: the
    rounding of our m code (``lowmem_lightning.kernels.adamw4bit``). Round-to-nearest loses an EMA step
    smaller than half a level (the code stalls); stochastic rounding everywhere keeps every step but adds
    its variance to every element every step, which the EMA accumulates (``1 / (1 - beta1**2)``). ``release``
    (``p`` in [0, 1]): a stalled element is released only where its uniform ``u < p`` and then rounded
    stochastically with ``u / p`` (``u * (hi - lo) < (x - lo) * p``); 1 is the rule above, 0 nearest everywhere.
    Holds the previous codes: :meth:`fresh` gives an instance for a new run."""

    def __init__(self, levels: torch.Tensor, seed: int, release: float = 1.0):
        if not 0.0 <= release <= 1.0:
            raise ValueError(f"release must be a probability in [0, 1], got {release!r}")
        self.levels, self.seed, self.release = levels, seed, release
        self.gen, self.codes = torch.Generator().manual_seed(seed), None

    def fresh(self) -> StallAwareLevels:
        """A new instance (no previous codes, the generator reset)."""
        return StallAwareLevels(self.levels, self.seed, self.release)

    def __call__(self, m: torch.Tensor) -> torch.Tensor:
        blocks = m.reshape(-1, BLOCK4)
        scale = blocks.abs().amax(1, keepdim=True).clamp(min=1e-30)
        x = blocks / scale
        idx = torch.bucketize(x, self.levels).clamp(1, len(self.levels) - 1)
        lo, hi = self.levels[idx - 1], self.levels[idx]
        nearest = torch.where(x - lo >= (hi - lo) * 0.5, idx, idx - 1)
        u = torch.rand(x.shape, generator=self.gen)
        stochastic = torch.where(u * (hi - lo) < (x - lo) * self.release, idx, idx - 1)
        released = (nearest == self.codes) & (u < self.release) if self.codes is not None else None
        self.codes = nearest if released is None else torch.where(released, stochastic, nearest)
        return (self.levels[self.codes] * scale).view_as(m)


def _power4_nearest(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Our v rounding: the nearer level of the fourth root, ``(clamp(round(16 x**(1/4)), 1, 16) / 16)**4``."""
    return (torch.round(x.clamp(min=0) ** 0.25 * 16).clamp(1, 16) / 16) ** 4


def _block_round_trip(x: torch.Tensor, levels: torch.Tensor, rounding: Callable, signed: bool) -> torch.Tensor:
    """``x`` through block-wise (``BLOCK4`` elements, absmax) quantization onto normalized ``levels``."""
    blocks = x.reshape(-1, BLOCK4)
    scale = (blocks.abs() if signed else blocks).amax(1, keepdim=True).clamp(min=1e-30)
    return (rounding(blocks / scale, levels) * scale).view_as(x)


def _rank1_round_trip(v: torch.Tensor, levels: torch.Tensor, rounding: Callable) -> torch.Tensor:
    """``v`` (2-D, >= 0) through rank-1 normalization (Li et al. 2023: scale ``min(row max, column max)``)."""
    scale = torch.minimum(v.amax(1, keepdim=True), v.amax(0, keepdim=True)).clamp(min=1e-30)
    return rounding(v / scale, levels) * scale


def _dynamic_map4() -> torch.Tensor:
    """The 16 values of the signed dynamic-exponent map with 3 exponent bits that torchao's AdamW4bit uses
    for m (bitsandbytes' ``create_dynamic_map(True, 3, 4)`` without its zero padding; Dettmers 2016),
    rebuilt here so the study needs no torchao."""
    values = []
    for i in range(3):  # exponent i: 2**i fractions (bin centres of linspace(0.1, 1)) at scale 10**(i - 2)
        fractions = torch.linspace(0.1, 1, 2**i + 1)
        values += (10.0 ** (i - 2) * (fractions[:-1] + fractions[1:]) / 2).tolist()
    return torch.tensor(sorted(values + [-x for x in values] + [0.0, 1.0]), dtype=torch.float32)


def codes4(seed: int = 7) -> tuple[dict, dict]:
    """``(m codes, v codes)``: name -> round trip of a state tensor through one 4-bit code."""
    sr = _stochastic_level(torch.Generator().manual_seed(seed))
    de, linear_nz = _dynamic_map4(), torch.arange(1, 17, dtype=torch.float32) / 16
    power2 = torch.tensor([(1 if k > 0 else -1) * (k / 7) ** 2 for k in range(-7, 8)])
    power4_nz = (torch.arange(1, 17, dtype=torch.float32) / 16) ** 4
    m_codes = {
        "fp32": lambda m: m,
        "dynamic exponent (torchao, paper)": lambda m: _block_round_trip(m, de, _nearest_level, True),
        "power-2, nearest": lambda m: _block_round_trip(m, power2, _nearest_level, True),
        "dynamic exponent, stochastic": lambda m: _block_round_trip(m, de, sr, True),
        "power-2, stochastic": lambda m: _block_round_trip(m, power2, sr, True),
        "power-2, stochastic where nearest stalls (ours)": StallAwareLevels(power2, seed),
        # study-only (issue 29.4): a stalled element released with probability 1/2, 1/4 (RESULTS.md)
        "power-2, stall released with p = 1/2": StallAwareLevels(power2, seed, 0.5),
        "power-2, stall released with p = 1/4": StallAwareLevels(power2, seed, 0.25),
    }
    v_codes = {
        "fp32": lambda v: v,
        "linear without zero (torchao)": lambda v: _block_round_trip(v, linear_nz, _nearest_level, False),
        "linear without zero, rank-1 (paper)": lambda v: _rank1_round_trip(v, linear_nz, _nearest_level),
        "power-4 without zero, rank-1": lambda v: _rank1_round_trip(v, power4_nz, _power4_nearest),
        "power-4 without zero (ours)": lambda v: _block_round_trip(v, power4_nz, _power4_nearest, False),
    }
    return m_codes, v_codes


def run_simulated4(m_code: Callable, v_code: Callable, p0: torch.Tensor, grad_fn, steps: int,
                   lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8) -> torch.Tensor:
    """AdamW in fp32 with m and v re-quantized after every step (the update uses the fp32 values)."""
    noise = torch.Generator().manual_seed(1)
    m_code, v_code = (code.fresh() if hasattr(code, "fresh") else code for code in (m_code, v_code))  # stateful
    p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    for t in range(1, steps + 1):
        g = grad_fn(p, noise)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        p = p - lr / (1 - beta1**t) * m / ((v / (1 - beta2**t)).sqrt() + eps)
        m, v = m_code(m), v_code(v)
    return p


def run_optimizer4(build: Callable, p0: torch.Tensor, grad_fn, steps: int) -> torch.Tensor:
    """Final params of ``build([param])`` on ``grad_fn``'s gradients."""
    noise = torch.Generator().manual_seed(1)
    param = torch.nn.Parameter(p0.clone())
    with _quiet():
        optimizer = build([param])
        for _ in range(steps):
            param.grad = grad_fn(param.detach(), noise)
            optimizer.step()
    return param.detach().clone()


def _peer_optimizers() -> list[tuple[str, Callable]]:
    peers = []
    try:
        with _quiet():
            import torchao.optim as ao
        peers += [("torchao AdamW4bit", ao.AdamW4bit), ("torchao AdamW8bit", ao.AdamW8bit)]
    except Exception:  # noqa: BLE001 - an optional peer (errors of its native extensions included)
        pass
    bnb = _bnb()
    if bnb is not None:
        peers.append(("bitsandbytes AdamW8bit", bnb.optim.AdamW8bit))
    return peers


CODE_PAIRS4 = [
    ("dynamic exponent (torchao, paper)", "linear without zero (torchao)"),
    ("dynamic exponent (torchao, paper)", "linear without zero, rank-1 (paper)"),
    ("power-2, stochastic", "power-4 without zero (ours)"),
    ("power-2, stochastic where nearest stalls (ours)", "power-4 without zero, rank-1"),
    ("power-2, stochastic where nearest stalls (ours)", "power-4 without zero (ours)"),
    # study-only swaps of one moment's code between ours and torchao's (issue 29.4 ablation, RESULTS.md)
    ("power-2, stochastic where nearest stalls (ours)", "linear without zero (torchao)"),
    ("dynamic exponent (torchao, paper)", "power-4 without zero (ours)"),
    ("power-2, nearest", "power-4 without zero (ours)"),
    # study-only damped stall release of m, between ours (p = 1) and nearest (p = 0) (issue 29.4, RESULTS.md)
    ("power-2, stall released with p = 1/2", "power-4 without zero (ours)"),
    ("power-2, stall released with p = 1/4", "power-4 without zero (ours)"),
]
"""(m code, v code) pairs simulated together: torchao's scheme, the paper's, the earlier all-stochastic m, ours
with and without rank-1, ours with one moment's code swapped (torchao's v, torchao's m, nearest m), and ours with
the stall released with probability 1/2 and 1/4."""


PROBLEMS4 = ("noisy_quadratic", "pure_noise", "real_gradients")
"""The problems of :func:`accuracy4_study` (the last replays recorded gradients: :func:`real_gradients`)."""


def accuracy4_study(size: int, steps: int, problems4: tuple[str, ...] = PROBLEMS4) -> list[tuple[str, dict]]:
    """``||p - p32|| / ||p32 - p0||`` against fp32 ``torch.optim.AdamW`` on the noisy quadratic, on pure
    noise and on the convergence model's recorded gradients: peers' optimizers, each 4-bit code alone (the
    other moment fp32), code pairs, and the package."""
    makers = {"noisy_quadratic": lambda: noisy_quadratic(size), "pure_noise": lambda: pure_noise(size),
              "real_gradients": lambda: real_gradients(steps)}
    problems = {key: makers[key]() for key in problems4}
    refs = {key: run_optimizer4(lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.0), *problem, steps)
            for key, problem in problems.items()}

    def row(name: str, final_of: Callable) -> tuple[str, dict]:
        metrics = {}
        for key, (p0, grad_fn) in problems.items():
            metrics[key] = float((final_of(p0, grad_fn) - refs[key]).norm() / (refs[key] - p0).norm())
        return name, metrics

    rows = [row(name, lambda p0, fn, c=cls: run_optimizer4(lambda ps: c(ps, lr=1e-3, weight_decay=0.0), p0, fn,
                                                             steps)) for name, cls in _peer_optimizers()]
    m_codes, v_codes = codes4()
    pairs = [(m, "fp32") for m in m_codes if m != "fp32"] + [("fp32", v) for v in v_codes if v != "fp32"] + CODE_PAIRS4
    for m_name, v_name in pairs:
        rows.append(row(f"simulated: m {m_name} / v {v_name}",
                        lambda p0, fn, a=m_codes[m_name], b=v_codes[v_name]: run_simulated4(a, b, p0, fn, steps)))
    from lowmem_lightning.optim import build_optimizer

    for name in ("adamw_4bit", "adamw_8bit"):
        rows.append(row(f"lowmem_lightning {name} (package)", lambda p0, fn, n=name: run_optimizer4(
            lambda ps: build_optimizer(n, ps, lr=1e-3, weight_decay=0.0), p0, fn, steps)))
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
    parser.add_argument("--only", default="accuracy,range,throughput,accuracy4", help="comma list of sections to run")
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
        (f"### 4-bit codes: {args.size}x{args.size} AdamW, {args.steps} steps, ||p - p_fp32|| / ||p_fp32 - p0||",
         lambda: accuracy4_study(args.size, args.steps),
         {"noisy_quadratic": ".4f", "pure_noise": ".4f", "real_gradients": ".4f"}),
    ]
    keys = ("accuracy", "range", "throughput", "accuracy4")
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
