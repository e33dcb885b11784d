"""Optimizer step benchmark: median step time, state bytes/param and achieved bandwidth, ours vs peers.

For each ``--sizes`` entry the parameters are split into ``--matrices`` equal matrices (4M = 4 x
1024x1024) with fixed gradients, and every optimizer runs ``--warmup`` + ``--repeats`` steps on its
own copy; all rows of a size run in the same process, so the ratios to torch AdamW (foreach) are
like for like.

* **time**: median of the timed steps (CUDA: ``torch.cuda.Event`` pairs; CPU: ``perf_counter``).
  The first step is reported separately ("first step s"): it contains torch.compile's compile time
  for our CPU path (see LOWMEM_CPU_COMPILE in kernels/dispatch.py) and for torchao's optimizers.
* **state B/param**: ours through ``lowmem_lightning.optim.state_memory`` (real storage of every
  state tensor); peers by summing the bytes of every distinct storage in ``optimizer.state``
  (tensor subclasses such as torchao's ``OptimState8bit`` counted through their inner tensors).
* **bytes moved** (:func:`step_bytes`): what the step must move at the least, from the tensors
  themselves: every param read and written (its dtype's bytes), every gradient read, and every state
  tensor the optimizer holds (its real storage: codes, absmax, factored rows/columns, fp32 moments)
  read and written once. fp32 AdamW: 4+4+4 + 2*8 = 28 B/param; 8-bit AdamW with fp32 params and
  bf16 grads: 8 + 2 + 2 * 2.03 = 14.06 B/param (as DESIGN.md). Factored optimizers re-read the
  gradient (row/column statistics, then the update), so their figure is a lower bound.
* **alg. MB** (:func:`algorithm_bytes`, factored optimizers only): what their exact algorithm must move
  at the least, the passes included (:data:`ALGORITHM_PASSES`: Adafactor and CAME read the gradient
  three times, CAME its momentum twice, CAME int8 the gradient four times; ``scale_parameter`` reads
  the param once more); **% of copy (alg.)** is that over the median time against the same copy: the
  figure the kernels can reach 100% of (issue 24's goal: >= 80%).
* **GB/s** = bytes moved / median step time; **% of copy** = that against a device-to-device copy of
  the same byte count measured in the same run, right after the row (read + write bytes / median
  time of 10 copies): the bandwidth this device actually gives a streaming kernel now, so "close to
  the limit" is a number. On CUDA the specified peak (table below) is printed in the header.
* **extra MB** (:func:`extra_bytes`): gradient passes outside the update that the step's time
  includes: our optimizers' finite check reads every gradient once more (``_foreach_norm``) unless a
  clipping norm is reused (:meth:`~lowmem_lightning.optim.base.LowMemOptimizer.clip_grad_norm_`); the
  ``*_clip`` rows clip to norm 1.0 before each step (a norm read, then a scaling read + write of every
  gradient). **% of copy (all passes)** counts those bytes too. Rows ``adamw_8bit_persistent{2,4,8}`` run the
  persistent kernel with that many programs per SM (:func:`lowmem_lightning.kernels.multitensor.persistent`),
  ``adamw_8bit`` the one-program-per-tile kernel (unless ``LOWMEM_PERSISTENT_PROGRAMS_PER_SM`` is set).

Peers are an optional extra (``pip install -e .[bench]``); a missing peer or one of our optimizers
not in the registry yet gives a row that says so. FlashOptim (``flashoptim_adamw``: its default 24-bit master
weights, an int8 error-correction tensor beside bf16/fp16 params; ``flashoptim_adamw_nomaster``:
``master_weight_bits=None``) runs on CUDA only: elsewhere its rows say "skipped" and why; its state is counted
from its own containers (8-bit codes + fp16 scales per 32 elements, and the error bits) like every peer's.
Output: a markdown table (stdout, and ``--markdown`` if given) and CSV rows appended to ``benchmarks/results.csv``.

    python benchmarks/optim_step.py --device cpu --sizes 4M,16M --repeats 20
    python benchmarks/optim_step.py --device cuda --sizes 64M,1G --grad-dtype bfloat16
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import gc
import io
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script from a checkout (no install), e.g. on the device
    sys.path.insert(0, str(HERE.parent))
CSV_HEADER = ["date", "benchmark", "device", "torch", "optimizer", "metric", "value", "seeds", "steps"]
"""Long format shared with benchmarks/convergence.py: one row per (optimizer, metric)."""

SIZE_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "B": 2**30}

PEAK_BANDWIDTH_TBS = {
    "H200": 4.8,
    "H100 SXM": 3.35,
    "H100 80GB HBM3": 3.35,
    "H100 NVL": 3.9,
    "H100 PCIe": 2.0,
    "A100-SXM4-80GB": 2.039,
    "A100-SXM4-40GB": 1.555,
    "A100 80GB PCIe": 1.935,
    "A100-PCIE-40GB": 1.555,
    "L40S": 0.864,
    "L4": 0.3,
    "A10G": 0.6,
    "RTX 4090": 1.008,
}
"""Specified peak memory bandwidth (TB/s) by a substring of ``torch.cuda.get_device_name()``."""

BASELINE = "torch_adamw_foreach"

ALGORITHM_PASSES = {
    "adafactor": (2, 0), "adafactor_beta1": (2, 0), "adafactor_beta1_int8": (2, 0), "hf_adafactor": (2, 0),
    "hf_adafactor_beta1": (2, 0), "came": (2, 1), "came_pytorch": (2, 1), "came_int8": (3, 1),
}
"""Row name -> (extra gradient reads, extra momentum reads) the exact algorithm needs beyond
:func:`step_bytes`' one read each: two global reductions in sequence before the update (statistics,
rms of the update) make three reads of the gradient; CAME's confidence statistics need every new
momentum before the update reads it again; 8-bit CAME's update multiplies the fp32 momentum before
quantization, recomputed from the gradient and the old codes (a fourth gradient read). A param group
with ``scale_parameter`` adds one param read (rms(p)). O(rows + cols) statistics traffic left out."""


class Unavailable(Exception):
    """Raised by a row's builder when the optimizer cannot run here (the reason is the message)."""


@dataclass(frozen=True)
class Row:
    """One benchmarked optimizer: ``build(params)`` returns it; ``ours`` selects the memory counter."""

    name: str
    build: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]
    ours: bool
    extra_passes: int | None = None
    """Full gradient passes (reads or writes) outside the update per step (:func:`extra_bytes`); None: 1 for
    ours (the finite check), 0 for peers."""


# --------------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------------


def _ours(name: str, **kwargs) -> Callable:
    def build(params):
        from lowmem_lightning.optim import build_optimizer, optimizer_class

        try:
            optimizer_class(name)
        except ImportError as err:
            raise Unavailable(f"not available: `{name}` is not implemented yet ({err.name})") from err
        except ValueError as err:
            raise Unavailable(f"not available: `{name}` is not in the registry") from err
        return build_optimizer(name, params, **kwargs)

    return build


def _peer(module: str, factory: Callable) -> Callable:
    def build(params):
        try:
            with _quiet():
                mod = __import__(module, fromlist=["_"])
        except Exception as err:  # ImportError, or a peer whose import fails on this machine
            raise Unavailable(f"not available: `{module}` not installed (pip install -e .[bench]): {err}") from err
        return factory(mod, params)

    return build


def _bnb(name: str):
    return _peer("bitsandbytes", lambda bnb, ps: getattr(bnb.optim, name)(ps, lr=1e-3, weight_decay=0.01))


def _torchao(name: str):
    return _peer("torchao.optim", lambda ao, ps: getattr(ao, name)(ps, lr=1e-3, weight_decay=0.01))


FLASHOPTIM_ADAMW = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
"""Hyperparameters of the FlashOptim rows: those of the ``adamw_8bit`` row (its lr and weight decay, our registry's
betas and eps); FlashAdamW applies them as torch's AdamW does (decoupled decay ``p *= 1 - lr * wd``, bias-corrected
moments, eps added to ``sqrt(v_hat)``)."""


def flashoptim_kwargs(master_weight_bits: int | None) -> dict:
    """Keyword arguments of ``flashoptim.FlashAdamW`` for a row: :data:`FLASHOPTIM_ADAMW` and the master-weight
    setting (24: its default, an int8 error-correction tensor per bf16/fp16 param; None: none); its own defaults
    otherwise (8-bit states, fused Triton step, no numerics check)."""
    if master_weight_bits not in (None, 24, 32):
        raise ValueError(f"Invalid master_weight_bits {master_weight_bits!r}: expected None, 24 or 32")
    return {**FLASHOPTIM_ADAMW, "master_weight_bits": master_weight_bits}


def flashoptim_skip_reason(params, master_weight_bits: int | None) -> str | None:
    """Why FlashOptim cannot run on ``params`` (None when it can): master weights of 24/32 bits only apply to
    bf16/fp16 params (FlashAdamW refuses them for all-fp32 params), and its 8-bit states, error bits and fused
    step need CUDA tensors."""
    if master_weight_bits is not None and all(p.dtype == torch.float32 for p in params):
        return (f"not applicable: master_weight_bits={master_weight_bits} corrects bf16/fp16 params; these are "
                "float32 (flashoptim_adamw_nomaster is the fp32 row)")
    devices = sorted({p.device.type for p in params} - {"cuda"})
    if devices:
        return f"skipped: FlashOptim is CUDA only (8-bit states, error bits, fused Triton step); params on {devices[0]}"
    return None


def _flashoptim(master_weight_bits: int | None) -> Callable:
    def factory(flashoptim, params):
        reason = flashoptim_skip_reason(params, master_weight_bits)
        if reason:
            raise Unavailable(reason)
        return flashoptim.FlashAdamW(params, **flashoptim_kwargs(master_weight_bits))

    return _peer("flashoptim", factory)


def _hf_adafactor(**kwargs):
    return _peer(
        "transformers.optimization",
        lambda tr, ps: tr.Adafactor(ps, lr=1e-3, relative_step=False, scale_parameter=False, **kwargs),
    )


CLIP_NORM = 1.0
"""``max_norm`` of the ``*_clip`` rows."""


def _wrapped_step(build: Callable, per_sm: int | None = None, clip: bool = False) -> Callable:
    """``build`` with its optimizer's ``step`` run under ``persistent(per_sm)`` (when given) and after clipping
    the gradients to :data:`CLIP_NORM` (when ``clip``: ours through its ``clip_grad_norm_``, whose norm the step
    reuses for its finite check; peers through ``torch.nn.utils.clip_grad_norm_``)."""

    def wrapped(params):
        optimizer = build(params)
        step = optimizer.step

        def run(closure=None):
            if clip and hasattr(optimizer, "clip_grad_norm_"):
                optimizer.clip_grad_norm_(CLIP_NORM)
            elif clip:
                torch.nn.utils.clip_grad_norm_(params, CLIP_NORM, foreach=True)
            if per_sm is None:
                return step(closure)
            from lowmem_lightning.kernels.multitensor import persistent

            with persistent(per_sm):
                return step(closure)

        optimizer.step = run
        return optimizer

    return wrapped


ADAFACTOR = dict(lr=1e-3, relative_step=False, scale_parameter=False)

ROWS = [
    Row(BASELINE, lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, foreach=True), False),
    Row("torch_adamw_fused", lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, fused=True), False),
    Row("adamw_8bit", _ours("adamw_8bit", lr=1e-3, weight_decay=0.01), True),
    *(Row(f"adamw_8bit_persistent{k}", _wrapped_step(_ours("adamw_8bit", lr=1e-3, weight_decay=0.01), per_sm=k),
          True) for k in (2, 4, 8)),
    Row("torch_adamw_fused_clip", _wrapped_step(lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01,
                                                                             fused=True), clip=True), False, 3),
    Row("adamw_8bit_clip", _wrapped_step(_ours("adamw_8bit", lr=1e-3, weight_decay=0.01), clip=True), True, 3),
    Row("adamw_8bit_persistent4_clip", _wrapped_step(_ours("adamw_8bit", lr=1e-3, weight_decay=0.01), per_sm=4,
                                                     clip=True), True, 3),
    Row("paged_adamw_8bit", _ours("paged_adamw_8bit", lr=1e-3, weight_decay=0.01), True),
    Row("adamw_4bit", _ours("adamw_4bit", lr=1e-3, weight_decay=0.01), True),
    Row("bnb_adamw_8bit", _bnb("AdamW8bit"), False),
    Row("bnb_paged_adamw_8bit", _bnb("PagedAdamW8bit"), False),
    Row("torchao_adamw_8bit", _torchao("AdamW8bit"), False),
    Row("torchao_adamw_4bit", _torchao("AdamW4bit"), False),
    Row("flashoptim_adamw", _flashoptim(24), False),
    Row("flashoptim_adamw_nomaster", _flashoptim(None), False),
    Row("torch_sgd_foreach", lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, foreach=True), False),
    Row("sgd", _ours("sgd", lr=1e-3, momentum=0.9), True),
    Row("sgd_int8", _ours("sgd", lr=1e-3, momentum=0.9, momentum_dtype="int8"), True),
    Row("torch_adafactor", lambda ps: torch.optim.Adafactor(ps, lr=1e-3), False),
    Row("hf_adafactor", _hf_adafactor(), False),
    Row("adafactor", _ours("adafactor", **ADAFACTOR), True),
    Row("hf_adafactor_beta1", _hf_adafactor(beta1=0.9), False),
    Row("adafactor_beta1", _ours("adafactor", beta1=0.9, **ADAFACTOR), True),
    Row("adafactor_beta1_int8", _ours("adafactor", beta1=0.9, momentum_dtype="int8", **ADAFACTOR), True),
    Row("came_pytorch", _peer("came_pytorch", lambda cp, ps: cp.CAME(ps, lr=1e-4, weight_decay=0.01)), False),
    Row("came", _ours("came", lr=1e-4, weight_decay=0.01), True),
    Row("came_int8", _ours("came", lr=1e-4, weight_decay=0.01, momentum_dtype="int8"), True),
    Row("lion", _ours("lion", lr=1e-4, weight_decay=0.1), True),
    Row("lion_8bit", _ours("lion_8bit", lr=1e-4, weight_decay=0.1), True),
    Row("bnb_lion_8bit", _bnb("Lion8bit"), False),
    Row("ademamix", _ours("ademamix", lr=1e-3, weight_decay=0.01), True),
    Row("ademamix_8bit", _ours("ademamix_8bit", lr=1e-3, weight_decay=0.01), True),
    Row("bnb_ademamix_8bit", _bnb("AdEMAMix8bit"), False),
    Row("torch_muon", lambda ps: torch.optim.Muon(ps, lr=2e-2, weight_decay=0.01), False),
    Row("muon", _ours("muon", lr=2e-2, weight_decay=0.01), True),
    Row("muon_8bit", _ours("muon_8bit", lr=2e-2, weight_decay=0.01), True),
]
"""Every row, baseline first; ``--optimizers`` selects a subset by name."""


# --------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet():
    """Silence the import-time chatter of some peers (warnings and prints)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def parse_size(text: str) -> int:
    """``"4M"`` -> 4 * 2**20 parameters (units K, M, G/B are powers of 1024)."""
    text = text.strip().upper()
    unit = text[-1] if text and text[-1] in SIZE_UNITS and not text[-1].isdigit() else ""
    number = text[: len(text) - len(unit)]
    try:
        value = float(number) * SIZE_UNITS[unit]
    except ValueError:
        raise ValueError(f"Invalid size {text!r}: expected a number with an optional K, M or G suffix") from None
    if value < 1:
        raise ValueError(f"Invalid size {text!r}: expected at least one parameter")
    return int(value)


def size_label(numel: int) -> str:
    """Inverse of :func:`parse_size` for round sizes (4194304 -> ``"4M"``)."""
    for unit in ("G", "M", "K"):
        if numel % SIZE_UNITS[unit] == 0:
            return f"{numel // SIZE_UNITS[unit]}{unit}"
    return str(numel)


def matrix_shapes(total: int, count: int) -> list[tuple[int, int]]:
    """``count`` equal matrices holding ``total`` elements (square when possible, else rows x 1024)."""
    per = total // count
    if per < 1:
        raise ValueError(f"Invalid size {total}: too small for {count} matrices")
    side = math.isqrt(per)
    if side * side == per:
        return [(side, side)] * count
    cols = 1024 if per % 1024 == 0 else per
    return [(per // cols, cols)] * count


def state_bytes(optimizer: torch.optim.Optimizer, ours: bool) -> int:
    """Bytes of optimizer state: ``state_memory`` for ours, distinct storages of every state tensor for peers
    (FlashOptim's moment containers through their codes and scales, or their plain tensor)."""
    if ours:
        from lowmem_lightning.optim import state_memory

        return state_memory(optimizer).total_bytes
    seen: set = set()
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            for tensor in _leaf_tensors(value):
                key = (tensor.device, tensor.untyped_storage().data_ptr())
                if key not in seen:
                    seen.add(key)
                    total += tensor.untyped_storage().nbytes()
    return total


def _leaf_tensors(value) -> list[torch.Tensor]:
    if _is_flashoptim_state(value):  # FlashOptim's 8-bit-or-plain container of one moment
        return [value.quantized, value.scales] if value.is_quantized() else [value.data]
    if not isinstance(value, torch.Tensor):
        return []
    flatten = getattr(value, "__tensor_flatten__", None)
    if callable(flatten) and type(value) is not torch.Tensor and type(value) is not torch.nn.Parameter:
        names, _ = flatten()
        return [leaf for name in names for leaf in _leaf_tensors(getattr(value, name))]
    return [value]


def _is_flashoptim_state(value) -> bool:
    """True for FlashOptim's moment container (not a tensor: int8/uint8 codes + fp16 scales, or a plain tensor)."""
    return not isinstance(value, torch.Tensor) and all(  # on the class: its properties assert when read unset
        hasattr(type(value), name) for name in ("is_quantized", "quantized", "scales", "kernel_tensor"))


def flashoptim_state_bytes_per_param(param_dtype: torch.dtype, master_weight_bits: int | None,
                                     group: int = 32) -> float:
    """FlashAdamW's state bytes per param from its source (flashoptim 0.1.4), for comparison with the measured
    figure: m and v as 8-bit codes with one fp16 scale per ``group`` elements each, plus error-correction bits of
    ``master_weight_bits / 8`` bytes less the param's own (int8 for bf16 + 24 bits, int16 for + 32; none for fp32
    params or None). Per-tensor step counters left out."""
    moments = 2 * (1 + 2 / group)
    own = torch.empty((), dtype=param_dtype).element_size()
    correction = 0 if master_weight_bits is None else max(master_weight_bits // 8 - own, 0)
    return moments + correction


class Timer:
    """Times one call: CUDA events on a GPU, ``perf_counter`` on the CPU (milliseconds)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        begin = time.perf_counter()
        fn()
        return (time.perf_counter() - begin) * 1e3


@dataclass
class Result:
    """One row's measurement (``note`` set and numbers None when the optimizer could not run)."""

    name: str
    numel: int
    median_ms: float | None = None
    first_step_s: float | None = None
    bytes_per_param: float | None = None
    gbps: float | None = None
    moved_bytes: int | None = None
    copy_gbps: float | None = None
    note: str = ""
    extra_bytes: int | None = None
    alg_bytes: int | None = None

    @property
    def pct_of_copy(self) -> float | None:
        """Achieved bandwidth as % of the same-size device copy."""
        return 100 * self.gbps / self.copy_gbps if self.gbps and self.copy_gbps else None

    @property
    def pct_of_copy_all(self) -> float | None:
        """Bytes moved plus :attr:`extra_bytes` (passes outside the update) per median step, as % of the copy."""
        if self.extra_bytes is None or not (self.moved_bytes and self.median_ms and self.copy_gbps):
            return None
        return 100 * (self.moved_bytes + self.extra_bytes) / (self.median_ms / 1e3) / 1e9 / self.copy_gbps

    @property
    def pct_of_copy_alg(self) -> float | None:
        """Bytes the algorithm must move (:func:`algorithm_bytes`) per median step, as % of the same copy."""
        if not (self.alg_bytes and self.median_ms and self.copy_gbps):
            return None
        return 100 * self.alg_bytes / (self.median_ms / 1e3) / 1e9 / self.copy_gbps


def bench_row(row: Row, base: list[torch.Tensor], grads: list[torch.Tensor], args, device) -> Result:
    """Build ``row`` on a fresh copy of the params, time its steps, measure its state."""
    numel = sum(p.numel() for p in base)
    params = [torch.nn.Parameter(p.clone()) for p in base]
    for p, g in zip(params, grads):
        if g.dtype != p.dtype:
            p.grad_dtype = None  # torch >= 2.10 checks that grads match the param dtype unless told not to
        p.grad = g.clone()
    try:
        with _quiet():
            optimizer = row.build(params)
    except Unavailable as err:
        return Result(row.name, numel, note=str(err))
    timer = Timer(device)
    try:
        with _quiet():
            first_ms = timer(optimizer.step)
            for _ in range(args.warmup):
                optimizer.step()
            times = [timer(optimizer.step) for _ in range(args.repeats)]
    except Exception as err:  # a peer that does not run on this device
        return Result(row.name, numel, note=f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}")
    median = statistics.median(times)
    state = state_bytes(optimizer, row.ours)
    moved = step_bytes(params, grads, state)
    alg = algorithm_bytes(row.name, optimizer, grads, moved)
    del optimizer, params
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Result(row.name, numel, median, first_ms / 1e3, state / numel, moved / (median / 1e3) / 1e9,
                  moved, copy_bandwidth(device, nbytes=moved), alg_bytes=alg)


def step_bytes(params, grads, state_nbytes: int) -> int:
    """Least bytes one step moves: params read + written, gradients read, ``state_nbytes`` of state
    read + written (each tensor at its own dtype's size)."""
    weights = sum(p.numel() * p.element_size() for p in params)
    gradients = sum(g.numel() * g.element_size() for g in grads)
    return 2 * weights + gradients + 2 * state_nbytes


def algorithm_bytes(name: str, optimizer: torch.optim.Optimizer, grads, moved: int) -> int | None:
    """Least bytes the exact algorithm of row ``name`` moves per step (:data:`ALGORITHM_PASSES`): ``moved``
    (:func:`step_bytes`) plus its extra gradient and momentum reads (momentum: the storage of every
    ``exp_avg``/``exp_avg_codes``/``exp_avg_absmax`` state tensor) and, under ``scale_parameter``, one more
    param read; None for rows without an entry."""
    extra = ALGORITHM_PASSES.get(name)
    if extra is None:
        return None
    grad_reads, momentum_reads = extra
    gradients = sum(g.numel() * g.element_size() for g in grads)
    momentum = sum(v.untyped_storage().nbytes() for state in optimizer.state.values() for k, v in state.items()
                   if k in ("exp_avg", "exp_avg_codes", "exp_avg_absmax") and isinstance(v, torch.Tensor))
    params = sum(p.numel() * p.element_size() for group in optimizer.param_groups if group.get("scale_parameter")
                 for p in group["params"])
    return moved + grad_reads * gradients + momentum_reads * momentum + params


def extra_bytes(row: Row, grads) -> int:
    """Bytes of the full gradient passes outside the update that ``row``'s step makes (:attr:`Row.extra_passes`)."""
    passes = row.extra_passes if row.extra_passes is not None else (1 if row.ours else 0)
    return passes * sum(g.numel() * g.element_size() for g in grads)


def copy_bandwidth(device: torch.device, nbytes: int = 2**28) -> float:
    """Measured device-to-device copy bandwidth in GB/s for a copy that moves ``nbytes`` in all
    (``nbytes / 2`` read, as many written; read + write bytes / median time of 10 copies)."""
    src = torch.empty(max(nbytes // 2, 16), dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    timer = Timer(device)
    dst.copy_(src)
    times = [timer(lambda: dst.copy_(src)) for _ in range(10)]
    return 2 * src.numel() / (statistics.median(times) / 1e3) / 1e9


def device_description(device: torch.device) -> tuple[str, float | None]:
    """(device name, specified peak bandwidth in GB/s or None)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((tbs * 1e3 for key, tbs in PEAK_BANDWIDTH_TBS.items() if key in name), None)
        return name, peak
    return f"CPU {_cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads", None


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else the machine type."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(results: list[Result]) -> str:
    """Markdown table of one size's results with ratios to the baseline row."""
    base = next((r for r in results if r.name == BASELINE and r.median_ms), None)
    lines = [
        "| optimizer | params | median step (ms) | x torch AdamW foreach | first step (s) | state B/param "
        "| MB moved | GB/s | copy GB/s | % of copy | alg. MB | % of copy (alg.) | extra MB | % of copy (all passes) "
        "| note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        ratio = r.median_ms / base.median_ms if base and r.median_ms else None
        moved = r.moved_bytes / 1e6 if r.moved_bytes else None
        lines.append(
            f"| {r.name} | {size_label(r.numel)} | {_fmt(r.median_ms, '.2f')} | {_fmt(ratio, '.2f')} "
            f"| {_fmt(r.first_step_s, '.2f')} | {_fmt(r.bytes_per_param, '.3f')} | {_fmt(moved, '.2f')} "
            f"| {_fmt(r.gbps, '.3g')} | {_fmt(r.copy_gbps, '.3g')} | {_fmt(r.pct_of_copy, '.0f')} "
            f"| {_fmt(r.alg_bytes / 1e6 if r.alg_bytes else None, '.2f')} | {_fmt(r.pct_of_copy_alg, '.0f')} "
            f"| {_fmt(r.extra_bytes / 1e6 if r.extra_bytes is not None else None, '.2f')} "
            f"| {_fmt(r.pct_of_copy_all, '.0f')} | {r.note} |"
        )
    return "\n".join(lines)


def append_csv(path: Path, results: list[Result], device_name: str, args) -> int:
    """Append one row per (optimizer, metric) to ``path``; returns the number of rows written."""
    import triton

    new = not path.exists() or path.stat().st_size == 0
    today = dt.date.today().isoformat()
    rows = 0
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(CSV_HEADER)
        for r in results:
            bench = f"optim_step {size_label(r.numel)} {args.param_dtype}/{args.grad_dtype or args.param_dtype}"
            device = f"{device_name}; triton {triton.__version__}"
            metrics = {"median_ms": r.median_ms, "first_step_s": r.first_step_s,
                       "state_bytes_per_param": r.bytes_per_param, "gb_per_s": r.gbps,
                       "bytes_moved": r.moved_bytes, "copy_gb_per_s": r.copy_gbps, "pct_of_copy": r.pct_of_copy,
                       "algorithm_bytes": r.alg_bytes, "pct_of_copy_algorithm": r.pct_of_copy_alg}
            metrics.update(extra_bytes=r.extra_bytes, pct_of_copy_all_passes=r.pct_of_copy_all)
            for metric, value in metrics.items():
                if value is None:
                    continue
                writer.writerow([today, bench, device, torch.__version__, r.name, metric, f"{value:.6g}", "",
                                 args.repeats])
                rows += 1
            if r.median_ms is None:
                writer.writerow([today, bench, device, torch.__version__, r.name, "unavailable", r.note, "", 0])
                rows += 1
    return rows


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def select_rows(names: str | None) -> list[Row]:
    """Rows named in the comma list ``names`` (all when None); the baseline is always included first."""
    if not names:
        return list(ROWS)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = {row.name: row for row in ROWS}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise SystemExit(f"Unknown optimizer(s) {unknown}: expected names from {', '.join(known)}")
    return [known[BASELINE]] + [known[n] for n in wanted if n != BASELINE]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--sizes", default="4M", help="comma list of total param counts, e.g. 4M,64M,1G")
    parser.add_argument("--optimizers", default=None, help="comma list of row names (default: all)")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per row (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after the first one")
    parser.add_argument("--matrices", type=int, default=4, help="matrices each size is split into")
    parser.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--grad-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="gradient dtype (default: the param dtype)")
    parser.add_argument("--csv", type=Path, default=HERE / "results.csv", help="CSV to append to")
    parser.add_argument("--no-csv", action="store_true", help="do not append CSV rows")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the markdown report here")
    parser.add_argument("--list", action="store_true", help="print the row names and exit")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.matrices < 1:
        parser.error("--repeats and --matrices must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        print("\n".join(row.name for row in ROWS))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device available", file=sys.stderr)
        return 2
    import triton

    device = torch.device(args.device)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    rows = select_rows(args.optimizers)
    param_dtype = getattr(torch, args.param_dtype)
    grad_dtype = getattr(torch, args.grad_dtype or args.param_dtype)
    name, peak = device_description(device)
    compile_mode = f"LOWMEM_CPU_COMPILE={os.environ.get('LOWMEM_CPU_COMPILE', 'auto (default)')}"
    header = [
        f"# optimizer step benchmark ({dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC)",
        "",
        f"- device: {name}; torch {torch.__version__}, triton {triton.__version__}",
        f"- command: `python benchmarks/optim_step.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- params {args.param_dtype}, grads {grad_dtype}, {args.matrices} matrices per size, "
        f"{args.warmup} warmup + {args.repeats} timed steps (median); our CPU path: {compile_mode}",
        "- % of copy: achieved GB/s against a device-to-device copy of the same byte count, measured"
        f" after each row{f' (specified peak of this device: {peak:.0f} GB/s)' if peak else ''}",
    ]
    print("\n".join(header), flush=True)
    report = list(header)
    for total in sizes:
        shapes = matrix_shapes(total, args.matrices)
        gen = torch.Generator().manual_seed(0)
        base = [(torch.randn(s, generator=gen) * 0.02).to(device=device, dtype=param_dtype) for s in shapes]
        grads = [(torch.randn(s, generator=gen) * 1e-3).to(device=device, dtype=grad_dtype) for s in shapes]
        results = []
        for row in rows:
            results.append(bench_row(row, base, grads, args, device))
            r = results[-1]
            r.extra_bytes = extra_bytes(row, grads) if r.median_ms else None
            if not args.no_csv:  # row by row, so an interrupted run keeps what it measured
                append_csv(args.csv, [r], name, args)
            print(f"  {size_label(r.numel)} {r.name:24s} {_fmt(r.median_ms, '9.2f')} ms  first step "
                  f"{_fmt(r.first_step_s, '.1f')} s  {_fmt(r.bytes_per_param, '.3f')} B/param  {r.note}",
                  file=sys.stderr, flush=True)
        table = markdown_table(results)
        section = ["", f"## {size_label(sum(p.numel() for p in base))} params ({len(shapes)} x {shapes[0]})", "",
                   table]
        print("\n".join(section), flush=True)
        report += section
    if args.markdown:
        args.markdown.write_text("\n".join(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
