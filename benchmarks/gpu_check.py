"""GPU acceptance in one command: kernels vs references, no host sync, step times, paging, QLoRA 7B, release.

Each part runs in its own subprocess with its own time limit, so a crash, a CUDA fault or a hang in
one part is reported and the others still run; the whole check is sized for well under 10 minutes
on an H100/H200, and each part's results are printed as it finishes. The results go into a dated
section (device, torch/triton versions, per-part status and tables) appended to
``benchmarks/RESULTS.md`` (``--results``).

Parts (``--parts`` selects some):

* ``kernels``: every optimizer's Triton path against its reference (the same step on CPU copies) on
  odd shapes in fp32/bf16/fp16: 8-bit codes equal, largest param difference.
* ``gpu_tests``: the test-suite's ``pytest -m gpu`` with the kernels compiled (not interpreted), one
  line per test (on a timeout: those finished by then).
* ``sync``: ``step()`` of every optimizer under ``torch.cuda.set_sync_debug_mode("error")``.
* ``step_time``: ``benchmarks/optim_step.py`` at 64M and 1B params (fp32 params + bf16 grads; bf16
  params) against torch AdamW fused/foreach and the peers that are installed (bitsandbytes, torchao,
  transformers' Adafactor, the official CAME, FlashOptim's FlashAdamW with its 24-bit master weights (bf16
  params only) and without), with bytes moved and % of a same-size device copy.
* ``paged``: ``paged_adamw_8bit`` with a small ``gpu_budget_bytes`` against ``adamw_8bit``: step time
  and peak device memory.
* ``qlora_7b``: a Llama-2-7B-architecture model with random weights created directly in NF4 on the
  GPU (:func:`lowmem_lightning.quant.random_causal_lm`), LoRA r=16 on all projections, seq 512,
  batch 1, gradient checkpointing, ``paged_adamw_8bit``, bf16: peak memory of a full training step
  (goal <= 6 GB) and step time, beside ``lowmem_lightning.estimate``'s figure for the same step (activations
  included, :func:`qlora_estimate`; goal within 10%); bitsandbytes' NF4 + peft the same way when installed.
* ``qdora_7b``: the ``qlora_7b`` step with DoRA (``add_lora(use_dora=True)``, QDoRA; LoRA dropout 0.05, so the
  base runs again on the dropped input) against bitsandbytes' NF4 + peft's DoRA the same way: peak memory and step
  time of both (goal: ours not above theirs in either), and the estimate beside our peak (goal within 10%; its DoRA
  terms are fitted on the CPU).
* ``qlora_moe``: QLoRA of Mixtral-8x7B (random weights created in NF4 on the GPU, experts too:
  ``Experts4bit``), LoRA r=16 on the attention, seq 512, batch 1, checkpointing, ``paged_adamw_8bit``, bf16
  autocast: peak memory of a step beside ``lowmem_lightning.estimate``'s figure (goal within 10%;
  :func:`qlora_moe_estimate`: 25.1 GB), step time, kernel time by family (how much of it is the experts' decode).
* ``release``: peak device memory of a training step with and without gradient release (and with release
  clipping by norm: two backward passes, must not raise the peak); FlashOptim's
  FlashAdamW (24-bit master weights) the same way with its own ``enable_gradient_release``, when installed.
* ``full_ft_7b``: ``configs/full_finetune_7b.yaml`` as ``lowmem fit`` runs it (Lightning ``Trainer`` with
  the recipe's bf16-true precision and clipping, ``CausalLMModule`` with gradient checkpointing and the
  Llama-2-7B architecture, random bf16 weights created on the device by ``configure_model``, the recipe's
  ``LowMemOptimizerCallback``: CAME int8 momentum + gradient release) under a 24 GiB cap
  (``torch.cuda.set_per_process_memory_fraction``), then ``adamw_8bit`` + release under the cap its
  estimate needs; six steps on a fixed batch at seq 1024, else 512 or 256 (each attempt a fresh process,
  the default allocator first, then expandable segments). Peak allocated/reserved, tokens/s, loss per
  step (must fall), the estimator's figure (:mod:`lowmem_lightning.estimate`, activations included) and
  their ratio (must be within 10%).
* ``packing``: what ``TextDataModule``'s ``isolate_documents=True`` (the default with packing) costs: the 1B
  recipe's model (TinyLlama-1.1B architecture, bf16, gradient checkpointing) at seq 2048, forward + backward
  over the module's own packed batches of log-normal documents, plain causal sdpa vs documents kept apart
  (sdpa's masked path) vs ``flash_attention_2`` (varlen; skipped with the reason when ``flash_attn`` is not
  installed): median step, peak memory beside the estimator's, which attention kernels ran.
* ``host_embeddings``: a Gemma 3n E4B-sized per-layer embedding table (4.7 GB bf16) page-locked in host memory and
  read by the Triton row gather through unified addressing: rows equal to the host's, the device memory it takes,
  lookup time against the same table on the device; a tiny Gemma 3n QLoRA model with and without
  ``host_embeddings``: equal logits.
* ``ema``: a weight average's update (``EMAWeightAveraging`` under ``LowMemOptimizerCallback``) at the 7B
  architecture with LoRA: Lightning's full copy, the shared average with torch's update, ours (``ema_update.py``).
* ``long_run``: a 113M-param causal LM (124M class) for a few minutes with fp32 AdamW, ``adamw_8bit``,
  bitsandbytes AdamW8bit (when installed), CAME and CAME int8: held-out loss within 1.01x of each
  reference, a table and ``long_run.png`` (``--out-dir``).

``--dry-run`` runs the same code paths on the CPU at toy sizes (Triton kernels under the
interpreter); the test-suite runs it, so the first GPU run cannot fail on a typo.

Before a device session, here: ``bash benchmarks/device_rehearsal.sh /tmp/rehearsal``. It builds (or reuses) a
venv in the device image's versions (Python 3.12, torch 2.11.0, triton 3.6.0, lightning 2.6.6, transformers
5.17.0, peft 0.21.0), installs ``.whl/`` with the install line below, compiles every kernel for sm_80/sm_90 with
triton 3.6 (AOT, vector accesses, SASS), runs the kernel tests under its interpreter and every part below with
``--dry-run``, and prints one PASS/FAIL line per check: kernels written since the last GPU run were only ever
compiled by the development machine's triton 3.9.

    python benchmarks/gpu_check.py                       # on the GPU machine
    python benchmarks/gpu_check.py --dry-run --results /tmp/r.md

The next device session (one H200, Python 3.12, 15 minutes of device time in all): first, here,
``bash benchmarks/device_wheels.sh`` (bitsandbytes, jsonargparse + its two, torchdata, flashoptim, torchao,
came-pytorch into ``.whl/``, 46 MiB; the image's own triton 3.6.0 matches its torch 2.11 and stays), then one
``run`` with ``carry: [".whl"]``, ``timeout_s: 600`` and the command::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site || exit; set -o pipefail; PYTHONUNBUFFERED=1 \
        python3 benchmarks/gpu_check.py --parts full_ft_7b,qlora_7b,long_run --results $OUT/gpu_section.md \
        --out-dir $OUT 2>&1 | tee $OUT/log.txt

(550 s of part budgets, :data:`BUDGET_S`); ``$OUT/gpu_section.md`` is the dated section for RESULTS.md.

Later commands, each a ``run`` of its own with the same install line (part budgets at most 560 s each,
:data:`BUDGET_S`; a cold start takes minutes of a session's 15, so the first command fills one session):

2. issue 24 (kernel speed), ``timeout_s`` 560::

    export LOWMEM_PERSISTENT_PROGRAMS_PER_SM=4; python3 benchmarks/gpu_check.py --results $OUT/gpu_section.md \
        --parts kernels,step_time,paged,release,gpu_tests --out-dir $OUT 2>&1 | tee $OUT/log.txt

   (560 s of part budgets with the FlashOptim rows: ``step_time`` +40 s, ``release`` +45 s, their Triton JIT and
   autotuned quantizer and two more 735M models, +15 s for the release row clipping by norm, ``gpu_tests`` +20 s for
   tests/test_gpu_session_changes.py; ``step_time`` runs the persistent-kernel rows at 1G in both dtypes, so no
   optim_step loop follows).
3. what document isolation costs, host syncs, and a weight average's update (125 s of part budgets: it fits the
   minutes a session has left after command 1 or 2 on a warm machine, ``timeout_s`` 210)::

    python3 benchmarks/gpu_check.py --results $OUT/gpu_section.md --parts packing,sync,ema --out-dir $OUT \
        2>&1 | tee $OUT/log.txt

``packing`` (40 s: imports, the 1.1B model built on the device, 6 steps of 4 x 2048 tokens per row, at most
3 rows) is in no earlier command: the first one's budget is full.
4. QLoRA of Mixtral-8x7B with NF4 experts (120 s of part budget; an H100's 80 GB hold its 25 GB), and
   ``host_embeddings`` (75 s; ``timeout_s`` 260 for both: a Gemma 3n E4B-sized per-layer table read from host
   memory; must show rows equal to the host's, ~0 GB of device memory for the table, equal tiny-Gemma-3n logits,
   and a QLoRA step whose peak drops by the 0.53 GB input embedding at the same step time)::

    python3 benchmarks/gpu_check.py --results $OUT/gpu_section.md --parts qlora_moe,host_embeddings --out-dir $OUT \
        2>&1 | tee $OUT/log.txt

5. QDoRA against bitsandbytes + peft's DoRA at Llama-2-7B shape (110 s of part budget, ``timeout_s`` 170; sized from
   ``qlora_7b``'s 34 s for our row, DoRA's extra decode per layer and forward, and the bitsandbytes row at ~2x)::

    python3 benchmarks/gpu_check.py --results $OUT/gpu_section.md --parts qdora_7b --out-dir $OUT \
        2>&1 | tee $OUT/log.txt
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

BUDGET_S = {"kernels": 70, "gpu_tests": 120, "sync": 25, "step_time": 230, "paged": 25, "qlora_7b": 100,
            "release": 115, "full_ft_7b": 270, "long_run": 180, "packing": 40, "qlora_moe": 120, "host_embeddings": 75,
            "ema": 60, "qdora_7b": 110}
"""Wall-clock limit of each part in seconds. Measured on an H200 (2026-12-04, cold Triton cache): kernels
55 s, gpu_tests 81, sync 15, step_time 126 (warm cache; 150 s was not enough cold), paged 11, qlora_7b 34
(ours only), release 45. Not yet run on a GPU, sized from arithmetic: full_ft_7b (two rows, each a fresh
process: imports ~15 s, a 7B built on the device, Triton compiles, 6 steps of ~1 s; a second attempt
only if the first did not fit), qlora_7b with the bitsandbytes row (~2x ours), long_run (5 x 900 steps
of a 113M model at ~25 ms, and five evaluations). The set of :data:`RECOMMENDED_PARTS` adds up to 550 s
(9.2 minutes). FlashOptim's rows, sized from its source and a CPU compile of its kernels for sm_90 (0.5-0.6 s
each, triton 3.9), not yet run: ``step_time`` +40 s (three step-kernel variants, its autotuned 6-config
quantizer for each new size and dtype, six 64M/1G rows), ``release`` +45 s (two more 735M
models); the release row clipping by norm (two backward passes, a third 735M model) +15 s. ``packing``, not yet
run: imports ~15 s, the 1.1B model built on the device (fp32, then bf16) ~5 s, then per row 5 steps and one
profiled of 4 x 2048 tokens at ~0.2 s (6 x 1.1B x 8192 flops x 4/3 for the recomputation, ~400 TFLOP/s; the masked
path slower, up to ~3x if sdpa falls back to its math kernel) and the profiler's start, ~5 s. ``gpu_tests`` +20 s,
not yet run, for tests/test_gpu_session_changes.py (11 tests): Adafactor/CAME on 3-column filters in fp32/bf16 x
fp32/int8 momentum, ~28 kernel variants at ~0.5 s each (fewer cold when ``kernels`` ran first), muon_8bit's
4 steps ~2 s, two 3-step Lightning fits ~3 s each. ``qlora_moe``, not yet run: imports ~15 s, Mixtral-8x7B's 46.7B
weights drawn and quantized on the device one tensor at a time (~47 GB of fp32 draws at ~1 TB/s, ~10 s with the
Triton quantize), 5 steps at seq 512 (per layer each of the 8 experts decoded three times: forward, the checkpoint's
recompute, backward; ~0.5-2 s a step) and one profiled. ``host_embeddings``, not yet run: imports ~15 s, a 4.7 GB
bf16 host table filled (~3 s) and page-locked (~1-2 s), 12 lookups of 294 MB of rows (at PCIe 5 rates ~15 ms each),
the same table copied to the device, two tiny Gemma 3n builds, two builds of a 4-layer Llama with a 128k vocabulary
drawn in NF4 on the device (~5 s each) and 6 steps of 4096 tokens each. ``ema``, not yet run: imports ~15 s, a
6.7B bf16 Llama drawn on the device in fp32 then cast (~5 s, 40 GB at the peak), its full copy (13.5 GB), then 3
rounds of 3 updates of three averages (the full copy's ~3 passes over 13.5 GB, ~15 ms each)."""

RECOMMENDED_PARTS = ("full_ft_7b", "qlora_7b", "long_run")
"""The parts the next device session runs, in one command (the module docstring has it)."""

OPTIMIZERS = {
    "adamw_8bit": {"lr": 1e-3},
    "paged_adamw_8bit": {"lr": 1e-3},
    "sgd": {"lr": 1e-2, "momentum": 0.9, "momentum_dtype": "int8"},
    "adafactor": {"beta1": 0.9, "momentum_dtype": "int8"},
    "came": {"lr": 1e-3, "momentum_dtype": "int8"},
    "adamw": {"lr": 1e-3},
}
"""Optimizers checked by the kernel and sync parts, with their 8-bit momentum where they have one."""

ODD_SHAPES = [(4097,), (1000, 3), (3, 5, 300), (33, 65), (64, 80), (4096,)]


# --------------------------------------------------------------------------------------------------
# Parts: each returns markdown lines and raises on failure
# --------------------------------------------------------------------------------------------------


def _device(dry: bool):
    import torch

    return torch.device("cpu" if dry else "cuda")


def _step_pair(name: str, shape, dtype, device, triton: bool, seed: int = 0):
    """Two steps of optimizer ``name`` on one tensor of ``shape``; returns (param, state) on the CPU."""
    import torch

    from lowmem_lightning.kernels import dispatch
    from lowmem_lightning.optim import build_optimizer

    gen = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.5).to(device=device, dtype=dtype))
    grads = [(torch.randn(shape, generator=gen) * 0.1).to(device=device, dtype=dtype) for _ in range(2)]
    with dispatch.override(force_triton=triton):
        opt = build_optimizer(name, [p], **OPTIMIZERS[name])
        for g in grads:
            p.grad = g
            opt.step()
    state = {k: v.detach().cpu() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
    return p.detach().cpu(), state


GROUP_SHAPES = [(256, 512), (3, 64, 256), (96, 1024), (200, 112), (64, 80), (4096,), (5008,)]
"""A model for the batched factored launches (:func:`_group_rows`): matrices with ``C % 256 == 0`` (the
update's ``ROW_BLOCKS``) and without, 1-D tensors; every tensor aligned, >= 4096 elements."""


def _group_rows(device, dry: bool) -> tuple[list[str], list[str]]:
    """Adafactor and CAME (int8 momentum) stepping :data:`GROUP_SHAPES` together (one launch per pass per
    group, issue 24.3) on the device vs the reference on CPU copies: table rows and failures."""
    import torch

    from lowmem_lightning.kernels import dispatch
    from lowmem_lightning.optim import build_optimizer

    shapes = GROUP_SHAPES[-3:] if dry else GROUP_SHAPES
    lines, failures = [], []
    for name in ("adafactor", "came"):
        runs = []
        for dev, triton in ((device, True), (torch.device("cpu"), False)):
            gen = torch.Generator().manual_seed(3)
            ps = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.5).to(dev)) for s in shapes]
            grads = [[(torch.randn(s, generator=gen) * 0.1).to(dev) for s in shapes] for _ in range(2)]
            with dispatch.override(force_triton=triton):
                opt = build_optimizer(name, ps, **OPTIMIZERS[name])
                for step in grads:
                    for p, g in zip(ps, step):
                        p.grad = g
                    opt.step()
            runs.append(([p.detach().cpu() for p in ps], [opt.state[p] for p in ps]))
        (dev_ps, dev_states), (ref_ps, ref_states) = runs
        worst = max((a - b).abs().max().item() for a, b in zip(dev_ps, ref_ps))
        codes = [(sd["exp_avg_codes"].cpu().int() - sr["exp_avg_codes"].int()).abs()
                 for sd, sr in zip(dev_states, ref_states) if "exp_avg_codes" in sr]
        differing, total = sum(int((c > 0).sum()) for c in codes), sum(c.numel() for c in codes)
        code_step = max((int(c.max()) for c in codes), default=0)
        ok = code_step <= 1 and differing <= 1e-3 * max(total, 1) and worst <= 1e-4  # a wrong offset: ~1e-2
        failures += [] if ok else [f"{name} group"]
        lines.append(f"| {name} (one group, {len(shapes)} tensors) | float32 | {len(shapes)} | {differing} of {total} "
                     f"| {code_step} | {worst:.3g} | {'ok' if ok else 'MISMATCH'} |")
    return lines, failures


def part_kernels(dry: bool) -> list[str]:
    """Triton path on the device vs the reference path on CPU copies, then ``pytest -m gpu``."""
    import torch

    device = _device(dry)
    lines = ["| optimizer | dtype | shapes | 8-bit codes differing | largest code step | max abs param diff "
             "| result |", "|---|---|---:|---:|---:|---:|---|"]
    failures = []
    # dry: one 1-D tensor with a partial 8-bit block and one odd matrix run every row's code; the 3-D and the
    # aligned shapes are the GPU's (the suite's kernel tests cover them under the interpreter)
    shapes = ODD_SHAPES if not dry else ODD_SHAPES[:2]
    for name in ("adamw_8bit", "sgd", "adafactor", "came"):
        # AdamW and SGD equal their references bit for bit; the factored optimizers' row/column sums
        # run in another order than the reference's, so a code may land one step away (<= 0.1%)
        exact = name in ("adamw_8bit", "sgd")
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            differing, total, code_step, worst = 0, 0, 0, 0.0
            for shape in shapes:
                p_dev, s_dev = _step_pair(name, shape, dtype, device, triton=True)
                p_ref, s_ref = _step_pair(name, shape, dtype, torch.device("cpu"), triton=False)
                worst = max(worst, (p_dev.float() - p_ref.float()).abs().max().item())
                for key, ref in s_ref.items():
                    if ref.dtype in (torch.int8, torch.uint8):
                        diff = (s_dev[key].int() - ref.int()).abs()
                        differing += int((diff > 0).sum())
                        total += diff.numel()
                        code_step = max(code_step, int(diff.max()))
            tolerance = (0.0 if exact else 1e-6) if dtype == torch.float32 else 1e-2
            codes_ok = differing == 0 if exact else (code_step <= 1 and differing <= 1e-3 * max(total, 1))
            ok = codes_ok and worst <= tolerance
            failures += [] if ok else [f"{name} {dtype}"]
            lines.append(f"| {name} | {str(dtype).split('.')[-1]} | {len(shapes)} | {differing} of {total} "
                         f"| {code_step} | {worst:.3g} | {'ok' if ok else 'MISMATCH'} |")
    group_lines, group_failures = _group_rows(device, dry)
    lines += group_lines
    failures += group_failures
    if failures:
        raise AssertionError("kernels differ from their references: " + ", ".join(failures) + "\n" + "\n".join(lines))
    return lines


def _files_with_gpu_tests() -> list[str]:
    """The test files that mark a test ``gpu``: what the dry run collects (the default suite already collects
    every file, so collecting the rest again here would only repeat it)."""
    return sorted(str(path.relative_to(ROOT)) for path in (ROOT / "tests").glob("test_*.py")
                  if "pytest.mark.gpu" in path.read_text())


def part_gpu_tests(dry: bool) -> list[str]:
    """``pytest -m gpu`` with Triton compiling for the GPU (the test-suite's conftest turns the interpreter
    on unless ``TRITON_INTERPRET`` is set: here it is set to 0). One line per test; on a timeout, the
    tests finished by then."""
    cmd = [sys.executable, "-m", "pytest", "-v", "-m", "gpu", "-p", "no:cacheprovider", "--color=no", "--tb=short"]
    if dry:  # the suite's gpu tests skip without CUDA: check the files that hold them collect them
        cmd += ["--collect-only", "-q", *_files_with_gpu_tests()]
    env = {**os.environ, "TRITON_INTERPRET": "1" if dry else "0"}
    limit = float(os.environ.get("GPU_CHECK_PART_BUDGET_S", BUDGET_S["gpu_tests"])) - 10
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(limit, 1))
        out, status = proc.stdout, f"exit {proc.returncode}"
        failed = proc.returncode not in (0, 5)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        status, failed = f"TIMEOUT after {limit:.0f} s", True
    text = out.strip().splitlines()
    words = (" PASSED", " FAILED", " SKIPPED", " ERROR")
    verdicts = [line for line in text if line.startswith("tests/") and any(word in line for word in words)]
    failures = text[next((i for i, line in enumerate(text) if "= FAILURES =" in line), len(text)):]
    lines = [f"`pytest -m gpu` ({'collect only, no GPU' if dry else 'compiled kernels'}): {status}", "", "```",
             *verdicts, *(failures[:80] if failed else []), *text[-1:], "```"]
    if failed:
        raise AssertionError("\n".join(lines))
    return lines


def part_sync(dry: bool) -> list[str]:
    """``step()`` of every optimizer with host synchronisation turned into an error: a fresh optimizer's second step,
    and the first step after a resume as Lightning does it (state dict saved, loaded on the CPU into a new optimizer,
    every state tensor moved to the device by Lightning's ``_optimizer_to_device``, step counters included)."""
    import torch

    from lowmem_lightning.optim import build_optimizer

    device = _device(dry)
    lines = ["| optimizer | host sync inside step() | after a Lightning-style resume |", "|---|---|---|"]
    failures = []
    for name, kwargs in OPTIMIZERS.items():
        params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in ((256, 512), (4097,), (64,))]
        opt = build_optimizer(name, params, **kwargs)
        for p in params:
            p.grad = torch.randn_like(p) * 0.01
        opt.step()  # the first step allocates state (may sync once)
        fresh = _sync_verdict(opt, dry)
        resumed = _sync_verdict(_resumed(opt, name, params, kwargs, device), dry)
        failures += [f"{name} ({when})" for when, verdict in (("fresh", fresh), ("resumed", resumed))
                     if verdict != "none"]
        shown = (fresh, resumed) if not dry else ("n/a on CPU (code path ran)",) * 2
        lines.append(f"| {name} | {shown[0]} | {shown[1]} |")
    if failures:
        raise AssertionError("host sync in step(): " + ", ".join(failures) + "\n" + "\n".join(lines))
    return lines


def _resumed(opt, name: str, params: list, kwargs: dict, device):
    """A new optimizer of ``name`` over ``params`` holding ``opt``'s state as a Lightning resume leaves it: the
    checkpoint's state dict read to the CPU, loaded, then moved to ``device``."""
    import io

    import torch
    from lightning.fabric.utilities.optimizer import _optimizer_to_device

    from lowmem_lightning.optim import build_optimizer

    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed = build_optimizer(name, params, **kwargs)
    resumed.load_state_dict(torch.load(buffer, map_location="cpu", weights_only=False))
    _optimizer_to_device(resumed, device)
    return resumed


def _sync_verdict(opt, dry: bool) -> str:
    """``"none"``, or ``"SYNC: ..."`` when ``opt.step()`` synchronised with the host (an error in sync debug mode)."""
    import torch

    try:
        if not dry:
            torch.cuda.set_sync_debug_mode("error")
        opt.step()
    except RuntimeError as err:
        return f"SYNC: {str(err).splitlines()[0][:100]}"
    finally:
        if not dry:
            torch.cuda.set_sync_debug_mode(0)
    return "none"


def part_step_time(dry: bool) -> list[str]:
    """optim_step.py at 64M and 1B params, fp32 params + bf16 grads and bf16 params."""
    sys.path.insert(0, str(HERE))
    import optim_step

    sizes = "64K" if dry else "64M,1G"
    runs = [["--grad-dtype", "bfloat16"], ["--param-dtype", "bfloat16"]]
    lines = []
    for extra in runs:
        with tempfile.TemporaryDirectory() as tmp:
            md = Path(tmp) / "step.md"
            argv = ["--device", "cpu" if dry else "cuda", "--sizes", sizes, "--repeats", "2" if dry else "10",
                    "--warmup", "0" if dry else "2", "--no-csv", "--markdown", str(md), *extra]
            if dry:  # the FlashOptim rows: their skip reason (CUDA only, or not installed)
                argv += ["--optimizers", "adamw_8bit,came_int8,torch_adamw_fused,adamw_8bit_persistent4,"
                         "adamw_8bit_clip,flashoptim_adamw,flashoptim_adamw_nomaster"]
            if optim_step.main(argv) != 0:
                raise AssertionError(f"optim_step.py {' '.join(argv)} failed")
            lines += [line for line in md.read_text().splitlines() if not line.startswith("# ")] + [""]
    return lines


def _peak_step(build, steps: int, device) -> tuple[float, float]:
    """(peak device memory in GB, median step ms) of ``steps`` training steps of ``build()``'s
    ``(step_fn)``; CPU: (0, ms). The peak counts from what was allocated before ``build`` (a previous
    row's leftovers are collected first and not charged to this one)."""
    import gc

    import torch

    cuda = device.type == "cuda"
    gc.collect()
    baseline = 0
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    step = build()
    times = []
    for _ in range(steps):
        begin = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - begin) * 1e3)
    peak = (torch.cuda.max_memory_allocated() - baseline) / 1e9 if cuda else 0.0
    return peak, statistics.median(times[1:] or times)


def part_paged(dry: bool) -> list[str]:
    """paged_adamw_8bit against adamw_8bit: a budget that covers the state (goal <= 1.25x adamw_8bit, no host
    traffic after warm-up) and a small one (host<->device bytes per step as % of the measured pinned copy
    bandwidth, the copies serial on one side stream); peak memory and step time."""
    import torch

    from lowmem_lightning.optim import build_optimizer

    device = _device(dry)
    shapes = [(128, 128)] * 4 if dry else [(4096, 4096)] * 32  # 537M params on the GPU
    state = sum(2 * a * b + 8 * ((a * b + 255) // 256) for a, b in shapes)
    h2d, d2h = _pinned_bandwidth(device, 2**20 if dry else 2**28)
    lines = [f"pinned copy bandwidth: host->device {h2d:.1f} GB/s, device->host {d2h:.1f} GB/s; "
             f"state {state / 1e9:.2f} GB",
             "",
             "| optimizer | params | gpu_budget_bytes | peak memory (GB) | median step (ms) | vs adamw_8bit "
             "| copied per step (MB) | % of pinned bandwidth |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    base_ms = None
    for name, kwargs in (("adamw_8bit", {}), ("paged_adamw_8bit", {"gpu_budget_bytes": state}),
                         ("paged_adamw_8bit", {"gpu_budget_bytes": 2**16 if dry else 64 * 2**20})):
        def build(name=name, kwargs=kwargs):
            params = [torch.nn.Parameter(torch.randn(s, device=device, dtype=torch.bfloat16) * 0.02) for s in shapes]
            for p in params:
                p.grad = torch.randn_like(p) * 1e-3
            build.opt = opt = build_optimizer(name, params, lr=1e-3, **kwargs)
            return opt.step
        steps = 3 if dry else 6
        peak, ms = _peak_step(build, steps, device)
        base_ms = base_ms or ms
        numel = sum(a * b for a, b in shapes)
        row = (f"| {name} | {numel / 1e6:.0f}M | {kwargs.get('gpu_budget_bytes', '-')} | {peak:.2f} | {ms:.1f} "
               f"| {ms / base_ms:.2f}x |")
        stats = getattr(build.opt, "paging_stats", None)
        if stats is None:
            lines.append(row + " - | - |")
        else:  # the first step fetches everything; the later ones are the steady state
            to_dev = (stats["to_device_bytes"] - state) / (steps - 1)
            to_host = stats["to_host_bytes"] / (steps - 1)
            floor_ms = (to_dev / (h2d * 1e9) + to_host / (d2h * 1e9)) * 1e3
            lines.append(row + f" {(to_dev + to_host) / 1e6:.1f} | {100 * floor_ms / ms:.0f}% |")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return lines


def _pinned_bandwidth(device, nbytes: int) -> tuple[float, float]:
    """(host->device, device->host) GB/s of ``nbytes`` copies between a pinned host buffer and the device
    (median of 5, non_blocking, synchronised); on CPU a plain copy."""
    import torch

    cuda = device.type == "cuda"
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    rates = []
    for dst, src in ((dev, host), (host, dev)):
        times = []
        for _ in range(6):
            if cuda:
                torch.cuda.synchronize()
            begin = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - begin)
        rates.append(nbytes / max(statistics.median(times[1:]), 1e-9) / 1e9)
    return rates[0], rates[1]


def _llama_config(dry: bool):
    from transformers import LlamaConfig

    if dry:
        return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                           num_attention_heads=2, max_position_embeddings=128)
    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)


def _dense_params(config) -> int:
    """Parameters of ``config``'s model before quantization (counted on the meta device)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


def _qlora_step(model, device, seq: int, optimizer: str):
    """A step function: forward + backward + optimizer of a LoRA model on one random sequence."""
    import torch

    from lowmem_lightning.optim import build_optimizer

    trainable = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "torch_adamw":
        opt = torch.optim.AdamW(trainable, lr=1e-4)
    elif optimizer == "bnb_paged_adamw_8bit":
        import bitsandbytes as bnb

        opt = bnb.optim.PagedAdamW8bit(trainable, lr=1e-4)
    else:
        opt = build_optimizer(optimizer, trainable, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, model.config.vocab_size, (1, seq), generator=gen).to(device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def qlora_estimate(dry: bool, seq: int, config=None, targets=None, dora: bool = False) -> dict:
    """``lowmem_lightning.estimate``'s figure (bytes) for the part's own step: the same architecture (``config``,
    default :func:`_llama_config`'s) on the meta device, NF4 base in bf16, LoRA r=16 alpha 32 dropout 0 on
    ``targets`` (default the seven projections; fp32 adapters; ``dora``: DoRA with dropout 0.05, as
    :func:`part_qdora_7b` trains), bf16 autocast, checkpointing, batch 1 x ``seq``,
    ``paged_adamw_8bit``: weights, gradients, optimizer state on the device, activations
    (:func:`~lowmem_lightning.estimate.lora_activation_bytes`, CUDA decode transient) and their total; ``detail``
    says what the activations are of."""
    from lowmem_lightning.estimate import estimate_memory, model_activation_bytes
    from lowmem_lightning.modules.causal_lm import build_causal_lm
    from lowmem_lightning.quant import LLAMA_TARGET_MODULES

    config = _llama_config(dry) if config is None else config
    arch = {"model_type": config.model_type, **config.to_diff_dict()}
    arch = {key: value for key, value in arch.items() if not key.startswith("_") and key not in (
        "architectures", "transformers_version", "dtype", "torch_dtype")}
    lora = {"r": 16, "alpha": 32, "dropout": 0.05 if dora else 0.0,
            "target_modules": targets or list(LLAMA_TARGET_MODULES), "use_dora": dora}
    model = build_causal_lm(None, arch, "nf4", lora, device="meta", torch_dtype="bfloat16")
    activations, detail = model_activation_bytes(model, 1, seq, True, "bf16-mixed", device="cuda")
    est = estimate_memory(model, configured=("paged_adamw_8bit", {}), gradient_checkpointing=True,
                          activations=activations or 0, activation_detail=detail)
    row = est.optimizers[est.configured_optimizer]
    return {"weights": est.model.frozen_bytes + est.model.trainable_bytes, "gradients": est.gradient_device_bytes,
            "state": row.device_state_bytes, "activations": activations or 0, "total": row.total_device_bytes,
            "detail": detail}


def _qlora_estimate_line(est: dict, peak_gb: float, dry: bool) -> str:
    """The estimate beside the measured peak (GB = 10**9 bytes), with their ratio (goal: within 10%)."""
    parts = ", ".join(f"{key} {est[key] / 1e9:.3f}" for key in ("weights", "gradients", "state", "activations"))
    ratio = "n/a (CPU)" if dry or not peak_gb else f"{peak_gb * 1e9 / est['total']:.3f} (goal: 0.90-1.10)"
    return (f"Estimate (lowmem_lightning.estimate, activations {est['detail']}): {est['total'] / 1e9:.3f} GB "
            f"= {parts}; measured / estimate {ratio}.")


def part_qlora_7b(dry: bool) -> list[str]:
    """QLoRA at Llama-2-7B shape, NF4 created on the device: peak memory of a training step, step time."""
    import torch

    from lowmem_lightning.modules.causal_lm import _enable_checkpointing
    from lowmem_lightning.quant import add_lora, random_causal_lm

    device = _device(dry)
    seq = 32 if dry else 512
    config = _llama_config(dry)
    lines = ["| stack | params | peak memory of a step (GB) | median step (ms) | goal |", "|---|---:|---:|---:|---|"]

    def ours():
        model = random_causal_lm(config, "nf4", torch.bfloat16, device=device)
        model = add_lora(model, r=16, alpha=32)
        _enable_checkpointing(model)
        model.train()
        ours.step = _qlora_step(model, device, seq, "paged_adamw_8bit")
        return ours.step

    deadline, begin = _part_deadline(), time.perf_counter()
    peak, ms = _peak_step(ours, 3 if dry else 4, device)
    profile = _kernel_shares(ours.step, device)
    ours_s = time.perf_counter() - begin
    del ours.step  # freed before the peer's row is built
    verdict = "n/a (CPU)" if dry else ("met" if peak <= 6.0 else "MISSED")
    lines.append(f"| lowmem NF4 + peft LoRA r=16, paged_adamw_8bit | {_dense_params(config) / 1e9:.2f}B "
                 f"| {peak:.2f} | {ms:.0f} "
                 f"| <= 6 GB: {verdict} |")
    lines += ["", _qlora_estimate_line(qlora_estimate(dry, seq), peak, dry), "", profile, ""]
    if not _installed("bitsandbytes"):
        lines.append("| bitsandbytes NF4 + peft | - | - | - | skipped: bitsandbytes not installed |")
        return lines
    if time.perf_counter() + 1.5 * ours_s > deadline:  # a timed-out part would lose our row too
        raise AssertionError("\n".join(["no time left in the part's budget for the bitsandbytes row", *lines]))
    theirs = _bnb_qlora_row(config, device, seq)
    lines.append(theirs[0])
    if theirs[1] is not None:
        mem = f"{peak / theirs[1][0]:.3f}x" if theirs[1][0] else "n/a (CPU)"
        lines += ["", f"ours / bitsandbytes: peak memory {mem}, step time {ms / theirs[1][1]:.3f}x "
                  "(goal: <= 1 for both)"]
    return lines


def _mixtral_config(dry: bool):
    from transformers import MixtralConfig

    if dry:
        return MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                             max_position_embeddings=128)
    return MixtralConfig()  # Mixtral-8x7B: 8 experts of 14336, top-2, 32 layers of 4096, vocab 32000


def qlora_moe_estimate(dry: bool, seq: int) -> dict:
    """:func:`qlora_estimate` of :func:`part_qlora_moe`'s step: Mixtral's architecture on the meta device, NF4 base
    and experts in bf16, LoRA r=16 alpha 32 dropout 0 on every linear layer (the attention: its experts are no linear
    layers), bf16 autocast, checkpointing, batch 1 x ``seq``, ``paged_adamw_8bit``."""
    return qlora_estimate(dry, seq, _mixtral_config(dry), "all-linear")


def part_qlora_moe(dry: bool) -> list[str]:
    """QLoRA of Mixtral-8x7B with NF4 experts (``Experts4bit``), created on the device: peak memory of a training
    step beside ``lowmem estimate``'s figure, step time, kernel time by family. bitsandbytes has no row: its 4-bit
    layers cover linear layers only, and Mixtral's experts are 3-D parameters in transformers 5 (bitsandbytes#1849)."""
    import torch

    from lowmem_lightning.modules.causal_lm import _enable_checkpointing
    from lowmem_lightning.quant import Experts4bit, add_lora, random_causal_lm

    device = _device(dry)
    seq = 32 if dry else 512
    config = _mixtral_config(dry)

    def ours():
        model = random_causal_lm(config, "nf4", torch.bfloat16, device=device)
        assert sum(isinstance(m, Experts4bit) for m in model.modules()) == config.num_hidden_layers
        model = add_lora(model, r=16, alpha=32, target_modules="all-linear")
        _enable_checkpointing(model)
        model.train()
        ours.step = _qlora_step(model, device, seq, "paged_adamw_8bit")
        return ours.step

    peak, ms = _peak_step(ours, 3 if dry else 4, device)
    profile = _kernel_shares(ours.step, device)
    del ours.step
    est = qlora_moe_estimate(dry, seq)
    verdict = "n/a (CPU)" if dry else ("met" if peak * 1e9 <= 1.10 * est["total"] else "MISSED")
    return ["| stack | params | peak memory of a step (GB) | median step (ms) | goal |", "|---|---:|---:|---:|---|",
            f"| lowmem NF4 (experts too) + peft LoRA r=16 on the attention, paged_adamw_8bit "
            f"| {_dense_params(config) / 1e9:.2f}B | {peak:.2f} | {ms:.0f} | within 10% of the estimate: {verdict} |",
            "", _qlora_estimate_line(est, peak, dry), "", profile, ""]


KERNEL_FAMILIES = {"NF4 dequantize/quantize (ours)": ("nf4",), "GEMM": ("gemm", "cutlass", "xmma", "nvjet", "matmul"),
                   "attention": ("flash", "attention", "fmha"), "optimizer": ("adamw", "paged", "codec")}
"""Kernel-name words that put a GPU kernel in a family for :func:`_kernel_shares` (first match wins)."""


def _gpu_kernel_times(step, device) -> list[tuple[str, float]] | None:
    """One more ``step()`` under torch's profiler: ``(kernel name, GPU microseconds)`` of each kernel it launched;
    ``None`` on CPU (the step still runs under the profiler: the code path is exercised)."""
    import torch

    cuda = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    if not cuda:
        return None
    return [(e.name, e.device_time_total) for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def _kernel_shares(step, device) -> str:
    """The share of GPU kernel time in each of :data:`KERNEL_FAMILIES` over one more ``step()``
    (:func:`_gpu_kernel_times`): is the NF4 dequantize + GEMM path the bottleneck, and by how much."""
    try:
        kernels = _gpu_kernel_times(step, device)
    except Exception as err:  # the profile is a diagnosis: its failure must not cost the part's table
        return f"Kernel time by family: profile failed ({type(err).__name__}: {str(err)[:100]})."
    if kernels is None:
        return "Kernel time by family: n/a on CPU (one step profiled)."
    total = sum(t for _, t in kernels)
    shares = dict.fromkeys([*KERNEL_FAMILIES, "other"], 0.0)
    for name, t in kernels:
        name = name.lower()
        family = next((f for f, words in KERNEL_FAMILIES.items() if any(w in name for w in words)), "other")
        shares[family] += t
    parts = ", ".join(f"{family} {100 * t / max(total, 1e-9):.1f}%" for family, t in shares.items())
    return f"Kernel time by family, one step of ours ({total / 1e3:.0f} ms of GPU kernels): {parts}."


def _bnb_random_causal_lm(config, device):
    """transformers' model of ``config`` with bitsandbytes NF4 linears (double quant, bf16 compute; not
    ``lm_head``), random weights made tensor by tensor on ``device`` as :func:`random_causal_lm` does
    for ours: the device never holds the bf16 model (``from_config`` cannot quantize, and
    ``from_pretrained`` needs a checkpoint on disk)."""
    import bitsandbytes as bnb
    import torch
    from accelerate import init_empty_weights
    from torch import nn
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(shape):
        return torch.randn(shape, device=device, generator=gen).mul_(0.02).to(torch.bfloat16)

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and name != "lm_head":
                linear = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                           compute_dtype=torch.bfloat16, compress_statistics=True,
                                           quant_type="nf4", device="meta")
                weight = bnb.nn.Params4bit(randn((child.out_features, child.in_features)), requires_grad=False,
                                           compress_statistics=True, quant_type="nf4")
                linear.weight = weight.to(device)  # quantized here, the bf16 copy dropped
                setattr(parent, name, linear)
    for module_name, module in model.named_modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.device.type == "meta":
                value = (torch.ones(param.shape, device=device, dtype=torch.bfloat16) if "norm" in module_name
                         else torch.zeros(param.shape, device=device, dtype=torch.bfloat16) if name == "bias"
                         else randn(param.shape))
                setattr(module, name, nn.Parameter(value, requires_grad=param.requires_grad))
        for name, buffer in list(module.named_buffers(recurse=False)):
            module._buffers[name] = buffer.to(device)
    return model


def _bnb_qlora_row(config, device, seq: int, use_dora: bool = False) -> tuple[str, tuple[float, float] | None]:
    """The same step on bitsandbytes' NF4 + peft LoRA (r=16, alpha 32, the seven projections, as ours; with
    ``use_dora`` peft's DoRA, LoRA dropout 0.05) with bitsandbytes' paged 8-bit AdamW on the adapters: ``(table row,
    (peak GB, ms) or None on failure)``."""
    import torch
    from peft import LoraConfig, get_peft_model

    from lowmem_lightning.quant import LLAMA_TARGET_MODULES

    kind = "DoRA" if use_dora else "LoRA"

    def build():
        lora = LoraConfig(r=16, lora_alpha=32, target_modules=list(LLAMA_TARGET_MODULES), use_dora=use_dora,
                          lora_dropout=0.05 if use_dora else 0.0)
        model = get_peft_model(_bnb_random_causal_lm(config, device), lora)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        return _qlora_step(model, device, seq, "bnb_paged_adamw_8bit")

    try:
        peak, ms = _peak_step(build, 3 if device.type == "cpu" else 4, device)
    except Exception as err:  # a bitsandbytes / transformers combination that cannot run here
        return f"| bitsandbytes NF4 + peft | - | - | - | failed: {type(err).__name__}: {str(err)[:80]} |", None
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return (f"| bitsandbytes NF4 + peft {kind} r=16, bitsandbytes PagedAdamW8bit | {_dense_params(config) / 1e9:.2f}B "
            f"| {peak:.2f} | {ms:.0f} | reference |"), (peak, ms)


def part_qdora_7b(dry: bool) -> list[str]:
    """QDoRA at Llama-2-7B shape (``add_lora(use_dora=True)``, dropout 0.05), NF4 created on the device, against
    bitsandbytes' NF4 + peft's DoRA: peak memory of a training step and step time of both."""
    import torch

    from lowmem_lightning.modules.causal_lm import _enable_checkpointing
    from lowmem_lightning.quant import add_lora, random_causal_lm

    device = _device(dry)
    seq, config = (32 if dry else 512), _llama_config(dry)
    lines = ["| stack | params | peak memory of a step (GB) | median step (ms) | goal |", "|---|---:|---:|---:|---|"]

    def ours():
        model = random_causal_lm(config, "nf4", torch.bfloat16, device=device)
        model = add_lora(model, r=16, alpha=32, dropout=0.05, use_dora=True)
        _enable_checkpointing(model)
        ours.step = _qlora_step(model.train(), device, seq, "paged_adamw_8bit")
        return ours.step

    deadline, begin = _part_deadline(), time.perf_counter()
    peak, ms = _peak_step(ours, 3 if dry else 4, device)
    ours_s = time.perf_counter() - begin
    del ours.step
    lines.append(f"| lowmem NF4 + QDoRA r=16, paged_adamw_8bit | {_dense_params(config) / 1e9:.2f}B | {peak:.2f} "
                 f"| {ms:.0f} | not above bitsandbytes' |")
    lines += ["", _qlora_estimate_line(qlora_estimate(dry, seq, dora=True), peak, dry), ""]
    if not _installed("bitsandbytes"):
        return [*lines, "| bitsandbytes NF4 + peft DoRA | - | - | - | skipped: bitsandbytes not installed |"]
    if time.perf_counter() + 1.5 * ours_s > deadline:
        raise AssertionError("\n".join(["no time left in the part's budget for the bitsandbytes row", *lines]))
    row, measured = _bnb_qlora_row(config, device, seq, use_dora=True)
    lines.append(row)
    if measured is not None:
        mem = f"{peak / measured[0]:.3f}x" if measured[0] else "n/a (CPU)"
        lines += ["", f"ours / bitsandbytes + peft DoRA: peak memory {mem}, step time {ms / measured[1]:.3f}x "
                  "(goal: <= 1 for both)"]
    return lines


def part_release(dry: bool) -> list[str]:
    """Peak device memory of a training step with and without gradient release (adamw_8bit, bf16)."""
    from lowmem_lightning.callbacks.release import DEFAULT_BUCKET_BYTES, GradientRelease
    from lowmem_lightning.optim import build_optimizer

    device = _device(dry)
    lines = ["| step | params | peak memory (GB) | median step (ms) | optimizer calls per step | bucket_bytes |",
             "|---|---:|---:|---:|---:|---:|"]
    # per-tensor release (bucket_bytes=0) measured 2.1x a normal step on 2026-12-04: not re-run (part time budget)
    # the third row: clipping by norm under release (LOMO's two backward passes, the first only takes norms)
    for release, bucket_bytes, clip in ((False, 0, None), (True, DEFAULT_BUCKET_BYTES, None),
                                        (True, DEFAULT_BUCKET_BYTES, 1.0)):
        def build(release=release, bucket_bytes=bucket_bytes, clip=clip):
            model, batch = _release_model(dry, device)
            build.params = sum(p.numel() for p in model.parameters())
            opt = build_optimizer("adamw_8bit", model.parameters(), lr=1e-4)
            build.hooks = hooks = GradientRelease(
                opt, bucket_bytes=bucket_bytes, clip_norm=clip).attach() if release else None

            def step():
                loss = model(input_ids=batch, labels=batch).loss
                if clip is not None:
                    with hooks.norm_pass():
                        loss.backward(retain_graph=True)
                loss.backward()
                if hooks is not None:
                    hooks.finish_step()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return step
        steps = 3 if dry else 5
        peak, ms = _peak_step(build, steps, device)
        label = ("released + norm clip (two backward passes)" if clip else "released (step_in_backward)") \
            if release else "normal"
        calls = build.hooks.bucket_steps / steps if release else 1
        lines.append(f"| {label} | {build.params / 1e6:.0f}M | {peak:.2f} | {ms:.1f} | {calls:.0f} "
                     f"| {bucket_bytes if release else '-'} |")
    return lines + _flashoptim_release_rows(dry, device)


def _release_model(dry: bool, device):
    """``(model, batch)`` of the ``release`` part: a Llama (hidden 2048, 12 layers, vocabulary 32000, head dim
    128: 735M params; dry: hidden 64, 2 layers, 256 tokens) in bf16 on ``device``, fixed init, one sequence of
    256 tokens (dry: 16)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers = (64, 2) if dry else (2048, 12)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000 if not dry else 256, hidden_size=hidden,
                         intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 128), max_position_embeddings=1024)
    model = LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16)
    return model, torch.randint(0, config.vocab_size, (1, 256 if not dry else 16), device=device)


FLASHOPTIM_RELEASE_LABELS = ("FlashOptim normal (FlashAdamW, 24-bit master: +1 B/param error bits)",
                             "FlashOptim released (enable_gradient_release)")


def _flashoptim_release_rows(dry: bool, device) -> list[str]:
    """FlashOptim's FlashAdamW (its default 24-bit master weights, lr 1e-4 as ours) on the ``release`` model:
    its normal step and its own gradient release (a hook per tensor steps it in backward, ``step()`` a no-op),
    peak memory and median step beside ours; optimizer calls per step counted (``step_param`` per tensor when
    released). One line with the reason when it cannot run (not installed, CUDA only)."""
    sys.path.insert(0, str(HERE))
    import release_step

    lines = []
    steps = 3 if dry else 5
    for release, label in zip((False, True), FLASHOPTIM_RELEASE_LABELS):
        row = {"calls": [0]}  # what the row's build made: its optimizer (hooks hold it weakly), params, calls

        def build(release=release, row=row):
            model, batch = _release_model(dry, device)
            row["params"] = sum(p.numel() for p in model.parameters())
            row["opt"], handle = release_step.flashoptim_optimizer(model, "flashoptim_adamw", 1e-4, release)
            if handle is not None:
                _count_calls(row["opt"], "step_param", row["calls"])

            def step(opt=row["opt"]):
                model(input_ids=batch, labels=batch).loss.backward()
                if handle is None:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            return step
        try:
            peak, ms = _peak_step(build, steps, device)
        except release_step.PeerUnavailable as err:
            return [f"| FlashOptim FlashAdamW (24-bit master), normal and released | - | - | - | - | {err} |"]
        calls = row["calls"][0] / steps if release else 1
        lines.append(f"| {label} | {row['params'] / 1e6:.0f}M | {peak:.2f} | {ms:.1f} | {calls:.0f} "
                     f"| {'per tensor' if release else '-'} |")
        row.clear()  # the optimizer, and through it the model, before the next row's build
    return lines


def _count_calls(obj, method: str, counter: list[int]) -> None:
    """Wrap ``obj.method`` (an instance attribute shadows the class's) so each call adds one to ``counter[0]``."""
    inner = getattr(obj, method)

    def counted(*args, **kwargs):
        counter[0] += 1
        return inner(*args, **kwargs)

    setattr(obj, method, counted)


# --------------------------------------------------------------------------------------------------
# full_ft_7b: the recipe's full fine-tune of a 7B through Lightning, under a memory cap
# --------------------------------------------------------------------------------------------------

GIB = 2**30

FULL_FT_RECIPE = "full_finetune_7b.yaml"
FULL_FT_ROWS = {
    "recipe": ({}, 24 * GIB),
    "adamw_8bit": ({"optimizer": "adamw_8bit", "optimizer_kwargs": {"betas": [0.9, 0.95]}}, None),
}
"""``row -> (LowMemOptimizerCallback settings over the recipe's, memory cap in bytes)``: the recipe as
shipped (CAME with int8 momentum, gradient release) under 24 GiB, and the 8-bit AdamW the recipe names as
its alternative, with release, under the cap its own estimate needs (None: :func:`_full_ft_cap`)."""

FULL_FT_ATTEMPTS = ((1024, ""), (1024, "expandable_segments:True"), (512, "expandable_segments:True"),
                    (256, "expandable_segments:True"))
"""``(seq, PYTORCH_CUDA_ALLOC_CONF)`` tried in turn until one fits: the allocator as users get it, then
with expandable segments (no fragmentation between cached blocks), then shorter sequences."""

FULL_FT_STEPS = 6
FULL_FT_LR = 1e-4
"""Steps on one fixed batch (the first compiles kernels and allocates state; timed: the rest) and a
constant LR with no warmup: the recipe's 1e-5 after 100 warmup steps would not move the loss in six."""


def _full_ft_arch(dry: bool) -> dict:
    """The architecture dict ``CausalLMModule(config=...)`` builds: the recipe's ``config.json`` (dry: a toy)."""
    if dry:
        return {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 172,
                "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 2048}
    return _config_json_arch(Path(_parsed_recipe().model.init_args.model_name_or_path))


def _config_json_arch(directory: Path) -> dict:
    """The architecture dict ``CausalLMModule(config=...)`` builds from ``directory/config.json`` (a recipe's
    architecture-only model folder), without the keys that name a checkpoint rather than a shape."""
    arch = json.loads((directory / "config.json").read_text())
    drop = ("architectures", "torch_dtype", "dtype", "transformers_version", "_name_or_path")
    return {k: v for k, v in arch.items() if k not in drop}


@functools.lru_cache(maxsize=1)
def _parsed_recipe():
    from lowmem_lightning.cli.app import parse_fit_config

    return parse_fit_config(["--config", FULL_FT_RECIPE])


def _full_ft_settings(row: str) -> tuple[dict, dict, dict]:
    """``(trainer args, LowMemOptimizerCallback args, CausalLMModule args)`` of the recipe as ``lowmem fit``
    parses it, with ``row``'s optimizer settings over the callback's."""
    cfg = _parsed_recipe()
    entries = [c for c in cfg.trainer.callbacks if c.class_path.endswith("LowMemOptimizerCallback")]
    callback = {**entries[0].init_args.as_dict(), **FULL_FT_ROWS[row][0], "plot": False, "print_summary": False}
    keys = ("precision", "accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm")
    trainer = {key: cfg.trainer[key] for key in keys}
    init = cfg.model.init_args
    module = {"gradient_checkpointing": init.gradient_checkpointing, "torch_dtype": init.torch_dtype,
              "weight_decay": init.weight_decay}
    return trainer, callback, module


def full_ft_estimate(row: str, seq: int, dry: bool) -> dict:
    """The estimator's bytes for ``row`` at ``seq`` (batch 1): weights, state, released gradients,
    activations (:func:`~lowmem_lightning.estimate.activation_bytes`) and their total."""
    return dict(_full_ft_estimate(row, seq, dry))


@functools.lru_cache(maxsize=8)
def _full_ft_estimate(row: str, seq: int, dry: bool) -> dict:
    import torch

    from lowmem_lightning.estimate import activation_bytes, estimate_memory
    from lowmem_lightning.modules.causal_lm import build_causal_lm

    _, callback, module = _full_ft_settings(row)
    arch = _full_ft_arch(dry)
    meta = build_causal_lm(None, arch, device="meta", torch_dtype=module["torch_dtype"])
    dtype_bytes = torch.finfo(getattr(torch, module["torch_dtype"])).bits // 8
    acts = activation_bytes(arch, 1, seq, dtype_bytes, module["gradient_checkpointing"])
    est = estimate_memory(meta, configured=(callback["optimizer"], callback["optimizer_kwargs"] or {}),
                          step_in_backward=callback["step_in_backward"], gradient_checkpointing=True,
                          activations=acts)
    opt = est.optimizers[est.configured_optimizer]
    return {"weights": est.model.trainable_bytes + est.model.frozen_bytes, "state": opt.device_state_bytes,
            "gradients": est.gradient_device_bytes, "activations": acts, "total": opt.total_device_bytes}


def _full_ft_cap(row: str) -> int:
    """The memory cap of ``row``: its fixed cap, else its seq-1024 estimate + 5% rounded up to a GiB."""
    cap = FULL_FT_ROWS[row][1]
    return cap if cap is not None else -(-int(1.05 * full_ft_estimate(row, 1024, False)["total"]) // GIB) * GIB


class _FixedBatches:
    """``steps`` copies of one random batch ``{input_ids, labels, attention_mask}`` of shape (1, seq)."""

    def __init__(self, vocab: int, seq: int, steps: int):
        import torch

        ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(0))
        self.batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> dict:
        return {k: v.clone() for k, v in self.batch.items()}


def _step_meter(optimizer_callback):
    """A Lightning callback that times each training step (synchronised), keeps its loss, notes at train
    start how every weight was created (dtype, device), and at each step the release's bucket size and
    the fullest bucket of gradients so far (``optimizer_callback.releases``)."""
    import lightning as L
    import torch

    class StepMeter(L.Callback):
        def __init__(self):
            self.times, self.losses, self.start_bytes, self.weights = [], [], 0, ""
            self.buckets, self.fullest_bucket, self.between_steps = [], 0, 0

        def _sync(self, module):
            if module.device.type == "cuda":
                torch.cuda.synchronize()

        def on_train_start(self, trainer, module):
            kinds = {(p.dtype, p.device.type) for p in module.parameters()}
            self.weights = ", ".join(sorted(f"{str(d).split('.')[-1]} on {t}" for d, t in kinds))
            self.start_bytes = torch.cuda.memory_allocated() if module.device.type == "cuda" else 0

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self._sync(module)
            self._begin = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self._sync(module)
            self.times.append(time.perf_counter() - self._begin)
            self.losses.append(float(outputs["loss"]))
            self.buckets = [r.bucket_bytes for r in optimizer_callback.releases]
            self.fullest_bucket = max([r.peak_bucket_bytes for r in optimizer_callback.releases], default=0)
            if module.device.type == "cuda":  # weights + optimizer state: released gradients are gone by now
                self.between_steps = torch.cuda.memory_allocated()

    return StepMeter()


def full_ft_row(row: str, seq: int, dry: bool) -> dict:
    """One training run of ``row`` at ``seq`` through Lightning: ``Trainer`` (the recipe's precision and
    clipping) + ``CausalLMModule`` (random init on the device, gradient checkpointing) +
    ``LowMemOptimizerCallback`` (the recipe's, with the row's optimizer); capped on the GPU. Returns the
    measurements, ``{"oom": True, ...}`` when it did not fit."""
    import resource

    import lightning as L
    import torch

    from lowmem_lightning.callbacks import LowMemOptimizerCallback
    from lowmem_lightning.modules.causal_lm import CausalLMModule

    trainer_args, callback_args, module_args = _full_ft_settings(row)
    cap = 0 if dry else _full_ft_cap(row)
    if not dry:
        torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(0).total_memory)
    arch = _full_ft_arch(dry)
    steps = 3 if dry else FULL_FT_STEPS
    callback = LowMemOptimizerCallback(**callback_args)
    meter = _step_meter(callback)
    module = CausalLMModule(config=arch, lr=FULL_FT_LR, warmup_steps=0, scheduler=None, **module_args)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(accelerator="cpu" if dry else "gpu", devices=1, max_steps=steps, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, num_sanity_val_steps=0, callbacks=[callback, meter],
                            default_root_dir=tmp, **trainer_args)
        loader = torch.utils.data.DataLoader(_FixedBatches(arch["vocab_size"], seq, steps), batch_size=None)
        try:
            trainer.fit(module, train_dataloaders=loader)
        except torch.OutOfMemoryError as err:
            return {"oom": True, "error": str(err).splitlines()[0][:300], "cap": cap}
    cuda = not dry
    timed = meter.times[1:] or meter.times
    return {
        "oom": False, "row": row, "seq": seq, "cap": cap, "losses": meter.losses, "weights": meter.weights,
        "optimizer": callback.optimizer_name, "release": callback.step_in_backward,
        "buckets": meter.buckets, "fullest_bucket": meter.fullest_bucket,
        "peak_allocated": torch.cuda.max_memory_allocated() if cuda else 0,
        "peak_reserved": torch.cuda.max_memory_reserved() if cuda else 0,
        "start_allocated": meter.start_bytes, "between_steps": meter.between_steps,
        "step_s": statistics.median(timed),
        "host_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "estimate": full_ft_estimate(row, seq, dry),
    }


def _spawn_row(argv: list[str], dry: bool, timeout: float, env_extra: dict | None = None) -> dict:
    """Run ``gpu_check.py --row ...`` in a fresh process (its own CUDA context, cap and allocator); its JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--out", str(out)] + (["--dry-run"] if dry else [])
        env = {**os.environ, **(env_extra or {})}
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            return {"error": f"TIMEOUT after {timeout:.0f} s"}
        if not out.exists():
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-4:])
            return {"error": f"exit {proc.returncode}: {tail[-600:]}"}
        return json.loads(out.read_text())


def _part_deadline() -> float:
    """When this part's time is up (the driver's budget, less 10 s to write the results)."""
    return time.perf_counter() + float(os.environ.get("GPU_CHECK_PART_BUDGET_S", "600")) - 10


def part_full_ft_7b(dry: bool) -> list[str]:
    """The recipe's 7B full fine-tune (and adamw_8bit + release) through Lightning under a memory cap, at
    the longest seq of 1024/512/256 that fits: peak memory against the estimator's, tokens/s, losses."""
    deadline = _part_deadline()
    lines = ["| row | optimizer | cap (GiB) | seq | allocator | weights created | peak allocated (GB) "
             "| peak reserved (GB) | estimate (GB) | measured / estimate | allocated between steps (GB) "
             "| weights + state estimate (GB) | tokens/s | loss per step | host peak RSS (GB) |",
             "|---|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    notes, failures = [], []
    rows = list(FULL_FT_ROWS)
    for index, row in enumerate(rows):
        result, tried = None, []
        for seq, alloc in ((32, ""),) if dry else FULL_FT_ATTEMPTS:
            share = (deadline - time.perf_counter()) / (len(rows) - index)
            result = _spawn_row(["--row", row, "--seq", str(seq)], dry, share,
                                {"PYTORCH_CUDA_ALLOC_CONF": alloc} if alloc else {})
            tried.append(f"seq {seq} {alloc or 'default allocator'}: "
                         + ("fit" if not result.get("oom") and "error" not in result
                            else result.get("error", "out of memory")[:160]))
            if not result.get("oom"):
                break
        notes.append(f"- {row}: " + "; ".join(tried))
        if result is None or result.get("oom") or "error" in result:
            failures.append(f"{row}: did not run at any seq")
            continue
        lines.append(_full_ft_line(row, result, dry, alloc))
        failures += _full_ft_verdicts(row, result, dry)
    lines += ["", "Attempts (seq, allocator):", *notes, "",
              "Estimate = weights + optimizer state + released gradients (fullest 25 MiB bucket) + activations "
              "(`lowmem_lightning.estimate.activation_bytes`); GB = 10^9 bytes."]
    if failures:
        raise AssertionError("; ".join(failures) + "\n" + "\n".join(lines))
    return lines


def _full_ft_line(row: str, r: dict, dry: bool, alloc: str) -> str:
    est = r["estimate"]
    ratio = r["peak_allocated"] / est["total"] if not dry else float("nan")
    losses = " -> ".join(f"{x:.3f}" for x in r["losses"])
    detail = (f"{est['total'] / 1e9:.2f} (w {est['weights'] / 1e9:.2f} + s {est['state'] / 1e9:.2f} "
              f"+ g {est['gradients'] / 1e9:.3f} [fullest bucket measured {r['fullest_bucket'] / 1e9:.3f}] "
              f"+ a {est['activations'] / 1e9:.2f})")
    return (f"| {row} | {r['optimizer']}{' + release' if r['release'] else ''} | {r['cap'] / GIB:.0f} | {r['seq']} "
            f"| {alloc or 'default'} | {r['weights']} | {r['peak_allocated'] / 1e9:.2f} "
            f"| {r['peak_reserved'] / 1e9:.2f} "
            f"| {detail} | {ratio:.3f} | {r['between_steps'] / 1e9:.2f} | {(est['weights'] + est['state']) / 1e9:.2f} "
            f"| {r['seq'] / r['step_s']:.0f} | {losses} | {r['host_peak_rss'] / 1e9:.2f} |")


def _full_ft_verdicts(row: str, r: dict, dry: bool) -> list[str]:
    """What ``row``'s result breaks: the loss must fall, bf16 weights, the peak within 10% of the estimate."""
    out = []
    if not r["losses"][-1] < r["losses"][0]:
        out.append(f"{row}: loss did not fall ({r['losses']})")
    if "bfloat16" not in r["weights"] or "float32" in r["weights"]:
        out.append(f"{row}: weights were created as {r['weights']}, not bf16")
    if not dry and abs(r["peak_allocated"] / r["estimate"]["total"] - 1) > 0.10:
        out.append(f"{row}: peak {r['peak_allocated'] / 1e9:.2f} GB is not within 10% of the estimate "
                   f"{r['estimate']['total'] / 1e9:.2f} GB")
    return out


# --------------------------------------------------------------------------------------------------
# long_run: a 124M-class causal LM for a few minutes, every 8-bit optimizer against its reference
# --------------------------------------------------------------------------------------------------

LONG_RUN_ROWS = [
    ("adamw", "torch_adamw", None, {}),
    ("adamw_8bit", "ours:adamw_8bit", "adamw", {}),
    ("bnb_adamw_8bit", "bnb_adamw_8bit", "adamw", {}),
    ("came", "ours:came", None, {}),
    ("came_int8", "ours:came", "came", {"momentum_dtype": "int8"}),
]
"""``(name, convergence.py builder, reference row, kwargs)``: fp32 AdamW, ours and bitsandbytes' 8-bit
AdamW against it; CAME with int8 momentum against CAME with fp32 momentum (same algorithm)."""

LONG_RUN_LR = {"adamw": 6e-4, "came": 2e-4}
"""Peak LR per family at this size (warmup then cosine to 10%, as ``convergence.py``)."""

LONG_RUN_SIZE = {"hidden": 768, "layers": 12, "heads": 12, "intermediate": 3072, "seq": 512, "batch": 8,
                 "steps": 900, "warmup": 60, "eval_batches": 40, "corpus_bytes": 12_000_000}
"""The GPU run: a 113M-param Llama (byte vocabulary, so nearly all of it in the 12 blocks: the 124M
GPT-2 class) on 900 steps of 8 x 512 bytes (3.7M tokens, a third of the 12 MB of training text, so the
held-out loss measures learning, not memorising; ~25 ms a step at ~130 TFLOP/s)."""

LONG_RUN_DRY = {"hidden": 32, "layers": 1, "heads": 2, "intermediate": 64, "seq": 16, "batch": 2, "steps": 4,
                "warmup": 1, "eval_batches": 1, "corpus_bytes": 100_000}

LONG_RUN_BOUND = 1.01
"""Held-out loss of each row over its reference's: the bound the CPU study holds (``convergence.py``)."""


def _long_run_model(size: dict, device):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=size["hidden"], intermediate_size=size["intermediate"],
                         num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
                         num_key_value_heads=size["heads"], max_position_embeddings=size["seq"],
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(device)


def _long_run_train(name: str, builder: str, kwargs: dict, data, size: dict, device) -> dict:
    """Train one row from the same init and batches; the loss curve, held-out loss and ms per step."""
    import torch

    sys.path.insert(0, str(HERE))
    import convergence

    model = _long_run_model(size, device)
    peak = LONG_RUN_LR[convergence.family(builder)]
    opt = convergence.build(builder, model.parameters(), peak, dict(kwargs))
    train, val = data
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    curve, begin = [], time.perf_counter()
    for step, (x, _) in enumerate(convergence.batches(train, size["batch"], size["seq"], size["steps"], 0)):
        for group in opt.param_groups:
            group["lr"] = convergence.lr_at(step, size["steps"], peak, size["warmup"])
        x = x.to(device, non_blocking=True)
        with autocast:
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        curve.append(loss.detach())
    curve = [float(v) for v in torch.stack(curve).cpu()]  # one sync at the end, not one per step
    seconds = time.perf_counter() - begin
    model.eval()
    with torch.no_grad(), autocast:
        fixed = convergence.batches(val, size["batch"], size["seq"], size["eval_batches"], 1234)
        held_out = statistics.fmean(float(model(input_ids=x.to(device), labels=x.to(device)).loss) for x, _ in fixed)
    return {"curve": curve, "held_out": held_out, "ms_per_step": 1e3 * seconds / size["steps"]}


def _out_dir() -> Path:
    """Where parts write files (PNG): ``GPU_CHECK_OUT`` (the device's ``$OUT``), else ``benchmarks/out``."""
    path = Path(os.environ.get("GPU_CHECK_OUT") or HERE / "out")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported (peers are optional: their rows skip when absent)."""
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _ratio(run: dict, reference: dict | None) -> str:
    return "-" if reference is None else f"{run['held_out'] / reference['held_out']:.4f}x"


def part_long_run(dry: bool) -> list[str]:
    """A 113M-param causal LM on the standard library's .py files (the corpus of the CPU study) with each
    row of :data:`LONG_RUN_ROWS`: held-out loss against its reference (bound 1.01x), curves as a PNG."""
    import torch

    sys.path.insert(0, str(HERE))
    import convergence

    device = _device(dry)
    size = LONG_RUN_DRY if dry else LONG_RUN_SIZE
    deadline = _part_deadline() - 15  # room for the plot
    train, val, _ = convergence.stdlib_corpus(size["corpus_bytes"])
    results, skipped, longest = {}, {}, 0.0
    for name, builder, _, kwargs in LONG_RUN_ROWS:
        if builder.startswith("bnb") and not _installed("bitsandbytes"):
            skipped[name] = "skipped: bitsandbytes not installed"
            continue
        if time.perf_counter() + 1.2 * longest > deadline:  # a timed-out part loses every row: keep those done
            skipped[name] = "FAILED: skipped, the part's time budget would run out"
            continue
        begin = time.perf_counter()
        try:
            results[name] = _long_run_train(name, builder, kwargs, (train, val), size, device)
        except Exception as err:  # one row's failure (a peer's build, say) leaves the others to run
            skipped[name] = f"FAILED: {type(err).__name__}: {str(err).splitlines()[0][:100]}"
        longest = max(longest, time.perf_counter() - begin)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    params = sum(p.numel() for p in _long_run_model(size, torch.device("meta")).parameters())
    lines = [f"{params / 1e6:.1f}M params, {size['steps']} steps of {size['batch']} x {size['seq']} bytes "
             f"({train.numel() / 1e6:.1f}M train / {val.numel() / 1e6:.2f}M held-out bytes of stdlib .py files), "
             f"bf16 autocast on the GPU, clip 1.0, warmup {size['warmup']} + cosine", "",
             "| row | reference | final train loss (last 5%) | held-out loss | vs reference | vs fp32 AdamW "
             "| ms/step | within 1.01x |", "|---|---|---:|---:|---:|---:|---:|---|"]
    failures = []
    for name, _, ref, _ in LONG_RUN_ROWS:
        if name in skipped:
            lines.append(f"| {name} | {ref or '-'} | - | - | - | - | - | {skipped[name]} |")
            failures += [f"{name} {skipped[name]}"] if skipped[name].startswith("FAILED") else []
            continue
        r = results[name]
        tail = r["curve"][-max(1, len(r["curve"]) // 20):]
        ratio = r["held_out"] / results[ref]["held_out"] if ref in results else None
        ok = "-" if ratio is None else ("yes" if ratio <= LONG_RUN_BOUND else "NO")
        failures += [f"{name} {ratio:.4f}x {ref}"] if ok == "NO" and not dry else []
        shown = "-" if ratio is None else f"{ratio:.4f}x"
        lines.append(f"| {name} | {ref or '-'} | {statistics.fmean(tail):.4f} | {r['held_out']:.4f} | {shown} | "
                     f"{_ratio(r, results.get('adamw'))} | {r['ms_per_step']:.1f} | {ok} |")
    png = _out_dir() / "long_run.png"
    convergence.plot({name: r["curve"] for name, r in results.items()}, png)
    lines += ["", f"Loss curves: `{png.name}` (written to {png.parent})."]
    if failures:
        raise AssertionError("long_run: above 1.01x the reference or failed: " + ", ".join(failures) + "\n"
                             + "\n".join(lines))
    return lines


# --------------------------------------------------------------------------------------------------
# packing: what keeping packed documents apart costs a training step
# --------------------------------------------------------------------------------------------------

PACKING_MODEL = ROOT / "configs" / "tinyllama-1.1b"
"""The model of ``configs/full_finetune_1b.yaml`` (TinyLlama-1.1B's architecture: 22 layers, hidden 2048, 4 KV
heads), built as that recipe builds it: bf16 weights (``bf16-true``), gradient checkpointing, sdpa attention."""

PACKING_SIZE = {"seq": 2048, "batch": 4, "steps": 5, "median_tokens": 400, "sigma": 1.0}
"""Blocks of ``seq`` tokens, ``batch`` per step, ``steps`` steps per row (the first not timed), of documents whose
lengths are drawn log-normally (median ``median_tokens`` tokens, log-sd ``sigma``: a few tokens to several
thousand, as instruction and chat data; the file drawn holds 103 documents, 576 tokens on average, and its batches
4.3 document starts per 2048-token block, a block's first token included)."""

PACKING_DRY = {"seq": 64, "batch": 2, "steps": 3, "median_tokens": 12, "sigma": 1.0}

PACKING_ROWS = (("sdpa", False), ("sdpa", True), ("flash_attention_2", True))
"""``(attn_implementation, isolate_documents)`` of each row: plain causal attention over whole blocks (batches
with ``attention_mask``), documents kept apart under sdpa (``position_ids``, no mask: transformers builds the
block-diagonal mask, so sdpa cannot take its flash kernel), and under FlashAttention-2 (varlen from the
``position_ids`` of the batch flattened to one row, ``packed_call``) where ``flash_attn`` is installed."""


def _packing_corpus(directory: Path, size: dict) -> Path:
    """A JSONL file of ``{"text": ...}`` records (random lowercase words) of log-normal lengths (bytes: tokens of
    the byte tokenizer) with enough tokens for ``steps + 1`` batches; the same file for every seed-0 call."""
    import random
    import string

    rng = random.Random(0)
    needed, total, records = 1.2 * (size["steps"] + 1) * size["batch"] * size["seq"], 0, []
    while total < needed:
        n = min(max(4, round(rng.lognormvariate(0.0, size["sigma"]) * size["median_tokens"])), 4 * size["seq"])
        records.append(json.dumps({"text": "".join(rng.choices(string.ascii_lowercase + " ", k=n))}))
        total += n + 2  # bos and eos
    path = directory / "documents.jsonl"
    path.write_text("\n".join(records) + "\n")
    return path


def _packed_batches(path: Path, size: dict, isolate: bool) -> list[dict]:
    """``steps`` training batches of ``TextDataModule`` (byte tokenizer, ``pack=True``, no validation) over
    ``path``, in its shuffled order: ``position_ids`` with ``isolate`` (documents kept apart), else
    ``attention_mask``."""
    from lowmem_lightning.data.text import TextDataModule

    data = TextDataModule(str(path), tokenizer="byte", seq_len=size["seq"], batch_size=size["batch"],
                          val_fraction=0.0, isolate_documents=isolate)
    batches = []
    for batch in data.train_dataloader():
        batches.append(batch)
        if len(batches) == size["steps"]:
            return batches
    raise AssertionError(f"{path} gave {len(batches)} batches of {size['batch']} x {size['seq']}, "
                         f"not {size['steps']}")


def _packing_module(arch: dict, device):
    """``CausalLMModule`` as ``configs/full_finetune_1b.yaml`` makes it (bf16 weights, gradient checkpointing),
    its model built on ``device`` by ``configure_model``: its ``forward`` is what a fit calls with each batch."""
    import torch

    from lowmem_lightning.modules.causal_lm import CausalLMModule

    module = CausalLMModule(config=arch, gradient_checkpointing=True, torch_dtype="bfloat16")
    torch.manual_seed(0)  # the same weights in every run
    with torch.device(device):
        module.configure_model()
    return module.train()


def _attention_kernels(step, device) -> str:
    """The attention kernels of one more ``step()`` (GPU kernel names with flash / fmha / attention / softmax),
    longest first, with their share of the step's GPU kernel time: which path sdpa took."""
    kernels = _gpu_kernel_times(step, device)
    if kernels is None:
        return "n/a on CPU"
    total, found = sum(t for _, t in kernels), {}
    for name, t in kernels:
        if any(word in name.lower() for word in ("flash", "fmha", "attention", "softmax")):
            found[name] = found.get(name, 0.0) + t
    ranked = sorted(found.items(), key=lambda item: -item[1])[:3]
    return "; ".join(f"{name[:60]} {100 * t / max(total, 1e-9):.0f}%" for name, t in ranked) or "none found"


def _packing_row(module, batches: list[dict], implementation: str, device) -> dict:
    """Forward + backward of ``module`` over ``batches`` under ``implementation``: peak memory over the
    weights (GB), median step (ms, the first step not counted), the losses, the attention kernels."""
    import torch

    module.model.set_attn_implementation(implementation)
    moved = [{k: v.to(device) for k, v in batch.items()} for batch in batches]
    losses = []

    def build():
        batches = itertools.cycle(moved)

        def step():
            loss = module(**next(batches)).loss
            loss.backward()
            module.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        build.step = step
        return step

    peak, ms = _peak_step(build, len(moved), device)
    kernels = _attention_kernels(build.step, device)  # one more step: the first batch again
    losses = [float(v) for v in torch.stack(losses[:len(moved)])]  # one sync, after the timed steps
    if not all(map(math.isfinite, losses)):
        raise AssertionError(f"{implementation}: a loss is not finite: {losses}")
    return {"peak": peak, "ms": ms, "losses": losses, "kernels": kernels}


def _packing_skip_reason(implementation: str) -> str | None:
    """Why ``implementation`` cannot run here (``flash_attention_2`` needs the ``flash_attn`` package and CUDA)."""
    if implementation != "flash_attention_2":
        return None
    if not _installed("flash_attn"):
        return "skipped: flash_attn not installed"
    import torch

    return None if torch.cuda.is_available() else "skipped: CUDA only"


def _packing_attempt(module, batches: list[dict], implementation: str, device) -> dict:
    """:func:`_packing_row`, or ``{"reason": ...}`` when ``implementation`` is skipped here or, being optional (not
    sdpa), fails: its row says why and the others stand. An sdpa row's failure fails the part."""
    reason = _packing_skip_reason(implementation)
    if reason is not None:
        return {"reason": reason}
    if implementation == "sdpa":
        return _packing_row(module, batches, implementation, device)
    try:
        return _packing_row(module, batches, implementation, device)
    except Exception as err:
        return {"reason": f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"}


def part_packing(dry: bool) -> list[str]:
    """What ``TextDataModule``'s ``isolate_documents=True`` (the default with packing) costs a step of the 1B
    recipe's model at seq 2048: step time and peak memory of forward + backward over the same packed documents
    with plain causal attention and with each document kept apart (:data:`PACKING_ROWS`), beside
    ``lowmem_lightning.estimate``'s activations + gradients for the same batch."""
    from lowmem_lightning.estimate import activation_bytes

    device = _device(dry)
    size = PACKING_DRY if dry else PACKING_SIZE
    arch = ({"model_type": "llama", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 172,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "max_position_embeddings": 128} if dry else _config_json_arch(PACKING_MODEL))
    with tempfile.TemporaryDirectory() as tmp:
        path = _packing_corpus(Path(tmp), size)
        batches = {isolate: _packed_batches(path, size, isolate) for isolate in (False, True)}
    isolated = batches[True][0]
    if "attention_mask" in isolated or "position_ids" not in isolated:
        raise AssertionError(f"isolate_documents=True batches carry {sorted(isolated)}: not packed documents")
    starts = statistics.fmean(int((b["position_ids"] == 0).sum()) / b["position_ids"].shape[0] for b in batches[True])
    module = _packing_module(arch, device)
    params = sum(p.numel() for p in module.parameters())
    lines = [f"{params / 1e6:.1f}M params ({'toy Llama' if dry else PACKING_MODEL.name}), bf16 weights, gradient "
             f"checkpointing; {size['steps']} batches of {size['batch']} x {size['seq']} tokens from "
             f"TextDataModule (byte tokenizer, pack=True), documents of log-normal length (median "
             f"{size['median_tokens']} tokens): {starts:.1f} document starts per block (a block's first token "
             "counts as one: a document cut there restarts its positions). Forward + "
             "backward (the optimizer step is the same for every row and left out); peak memory above the weights.",
             "", "| attention | isolate_documents | batch keys | peak memory (GB) | estimate: activations + gradients "
             "(GB) | median step (ms) | vs plain causal | first loss | attention kernels (share of GPU time) |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    rows = {}
    for implementation, isolate in PACKING_ROWS:
        keys = ", ".join(k for k in batches[isolate][0] if k != "labels")
        r = rows[implementation, isolate] = _packing_attempt(module, batches[isolate], implementation, device)
        if "reason" in r:
            lines.append(f"| {implementation} | {isolate} | {keys} | - | - | - | - | - | {r['reason']} |")
            continue
        estimate = "-" if implementation != "sdpa" else \
            f"{(activation_bytes(arch, size['batch'], size['seq'], 2, True, isolate) + 2 * params) / 1e9:.3f}"
        lines.append(f"| {implementation} | {isolate} | {keys} | {r['peak']:.3f} | {estimate} | {r['ms']:.1f} "
                     f"| {r['ms'] / rows['sdpa', False]['ms']:.2f}x | {r['losses'][0]:.4f} | {r['kernels']} |")
    plain, kept = rows["sdpa", False], rows["sdpa", True]
    predicted = sum(activation_bytes(arch, size["batch"], size["seq"], 2, True, i) * (1 if i else -1)
                    for i in (True, False))
    return lines + ["", f"Keeping documents apart under sdpa: {kept['ms'] - plain['ms']:+.1f} ms per step "
                    f"({100 * (kept['ms'] / plain['ms'] - 1):+.0f}%), {(kept['peak'] - plain['peak']) * 1e3:+.1f} MB "
                    f"of peak memory; lowmem estimate adds {predicted / 1e6:.1f} MB for it "
                    "(estimate.document_mask_terms)."]


HOST_TABLE = {"rows": 262144, "row_elems": 35 * 256, "batch": 8, "seq": 2048}
"""The ``host_embeddings`` part's table: Gemma 3n E4B's per-layer embeddings (transformers' ``Gemma3nTextConfig``
defaults: 262144 rows of 35 layers x 256), 4.7 GB in bf16, looked up for 8 x 2048 tokens."""

HOST_TABLE_DRY = {"rows": 1024, "row_elems": 3 * 256, "batch": 2, "seq": 64}


def _host_table(rows: int, row_elems: int):
    """A bf16 host table of ``rows x row_elems``, each row distinct (a random block of 64 rows repeated, plus the row
    index in its first column), drawn quickly: 2.35B random host values would take longer than the part."""
    import torch

    table = torch.empty(rows, row_elems, dtype=torch.bfloat16)
    block = torch.randn(64, row_elems, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    table.view(-1, 64, row_elems)[:] = block  # rows: a multiple of 64
    table[:, 0] = torch.arange(rows, dtype=torch.float32).to(torch.bfloat16)
    return table


def _median_ms(fn, device, runs: int = 6) -> float:
    """Median milliseconds of ``fn()`` (synchronised on CUDA), the first call left out."""
    import torch

    times = []
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        begin = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times[1:])


def part_host_embeddings(dry: bool) -> list[str]:
    """``host_embeddings``: a Gemma 3n E4B-sized per-layer table page-locked in host memory (:data:`HOST_TABLE`) and
    read by the Triton gather through unified addressing: rows equal the host's, the device memory it takes (goal: none
    of the table), lookup time of a batch against the same table on the device; then a tiny Gemma 3n QLoRA model built
    with and without it on the device: equal logits."""
    import torch

    from lowmem_lightning.quant.host_embeddings import HostEmbedding

    device, size = _device(dry), HOST_TABLE_DRY if dry else HOST_TABLE
    table = _host_table(size["rows"], size["row_elems"])
    cuda = device.type == "cuda"
    before = torch.cuda.memory_allocated() if cuda else 0
    hosted = HostEmbedding(table).to(device)  # page-locked on CUDA, its first and last rows read back and compared
    taken = (torch.cuda.memory_allocated() - before) / 1e9 if cuda else 0.0
    ids = torch.randint(0, size["rows"], (size["batch"], size["seq"]), generator=torch.Generator().manual_seed(1))
    rows = hosted(ids.to(device))
    if not torch.equal(rows.cpu(), table[ids]):
        raise AssertionError("host_embeddings: the rows gathered on the device differ from the host table's")
    host_ms, device_ms = _lookup_times(hosted, table, ids.to(device), device)
    moved = ids.numel() * size["row_elems"] * 2
    h2d, _ = _pinned_bandwidth(device, moved)
    del rows
    logits_equal = _tiny_gemma3n_host_logits_equal(device)
    steps = {host: _host_embeddings_step(device, dry, host) for host in (False, True)}
    if taken > 0.01 or not logits_equal:
        raise AssertionError(f"host_embeddings: the hosted table took {taken:.3f} GB of device memory (goal: none); "
                             f"tiny Gemma 3n logits equal with and without it: {logits_equal}")
    return [f"table {size['rows']} x {size['row_elems']} bf16 ({table.numel() * 2 / 1e9:.2f} GB) in host memory; "
            f"{ids.numel()} ids ({moved / 1e6:.0f} MB of rows) a lookup", "",
            "| what | value |", "|---|---:|",
            f"| device memory the hosted table takes (GB) | {taken:.3f} |",
            f"| lookup, table in host memory (ms) | {host_ms:.2f} |",
            f"| lookup, table on the device (ms) | {device_ms:.2f} |",
            f"| rows read from the host (GB/s) | {moved / max(host_ms, 1e-6) / 1e6:.1f} |",
            f"| pinned host->device copy of the same bytes (GB/s) | {h2d:.1f} |",
            f"| tiny Gemma 3n QLoRA logits equal with and without host_embeddings | {logits_equal} |",
            "", f"QLoRA training step ({_step_model(HOST_STEP_DRY if dry else HOST_STEP)}; adamw_8bit, bf16 "
            "autocast, NF4 base, LoRA r=16 on the seven projections):", "",
            "| host_embeddings | peak memory (GB) | median step (ms) |", "|---|---:|---:|",
            *(f"| {host} | {peak:.3f} | {ms:.1f} |" for host, (peak, ms) in steps.items())]


HOST_STEP = {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 4,
             "num_attention_heads": 16, "num_key_value_heads": 4, "seq": 4096}
"""The step row's model: a Llama with a Llama-3-sized untied vocabulary (its input embedding 0.53 GB in bf16), 4
layers, QLoRA r=16 on the seven projections, one sequence of ``seq`` tokens."""

HOST_STEP_DRY = {"vocab_size": 320, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "seq": 32}


def _step_model(size: dict) -> str:
    return (f"Llama, vocabulary {size['vocab_size']} untied, hidden {size['hidden_size']}, "
            f"{size['num_hidden_layers']} layers, one sequence of {size['seq']} tokens")


def _host_embeddings_step(device, dry: bool, host: bool) -> tuple[float, float]:
    """(peak device memory in GB during the steps, weights included; median step ms) of :data:`HOST_STEP`'s QLoRA step,
    its input embedding in host memory or not: the peak must drop by the table's bytes, the step time stay. The peak
    is counted from after the build (a model built from a config draws its table on the device before it moves)."""
    import gc

    import torch

    from lowmem_lightning.modules.causal_lm import build_causal_lm

    size = dict(HOST_STEP_DRY if dry else HOST_STEP)
    seq = size.pop("seq")
    model = build_causal_lm(config={**size, "tie_word_embeddings": False}, quantize="nf4", lora={"r": 16, "alpha": 32},
                            device=device, torch_dtype="bfloat16", host_embeddings=host)
    step = _qlora_step(model, device, seq, "adamw_8bit")
    cuda = device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    ms = _median_ms(step, device, runs=6)
    peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else 0.0
    return peak, ms


def _lookup_times(hosted, table, ids, device) -> tuple[float, float]:
    """Median ms of ``hosted(ids)`` and of the same lookup with ``table`` copied to the device (freed on return)."""
    import torch

    on_device = torch.nn.Embedding.from_pretrained(table.to(device), freeze=True)
    return _median_ms(lambda: hosted(ids), device), _median_ms(lambda: on_device(ids), device)


def _tiny_gemma3n_host_logits_equal(device) -> bool:
    """A tiny Gemma 3n checkpoint (per-layer input embeddings; in the device image's transformers, which may predate
    Gemma 4) loaded for QLoRA on ``device`` with and without ``host_embeddings``: whether their logits on one batch
    are equal."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "gemma3n_text", hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=320, num_hidden_layers=4, head_dim=16, sliding_window=8, num_kv_shared_layers=2, laurel_rank=4,
        altup_num_inputs=2, hidden_size_per_layer_input=8, vocab_size_per_layer_input=320)
    from lowmem_lightning.modules.causal_lm import build_causal_lm
    from lowmem_lightning.quant.host_embeddings import host_table_bytes

    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(2)).to(device)
    logits = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tmp)
        for host in (False, True):
            model = build_causal_lm(tmp, quantize="nf4", lora={"r": 4}, device=device, torch_dtype="bfloat16",
                                    host_embeddings=host)
            if host_table_bytes(model) == 0 and host:
                raise AssertionError("host_embeddings: the tiny Gemma 3n's per-layer table was not put in host memory")
            with torch.no_grad():
                logits.append(model(input_ids=ids).logits.float().cpu())
    return torch.equal(*logits)


def part_ema(dry: bool) -> list[str]:
    """``benchmarks/ema_update.py`` on the device at the 7B architecture (hidden 4096, 32 layers, bf16, LoRA r=16 on
    the seven projections: the ``qlora_7b`` recipe's 448 adapters): ms per update of Lightning's full copy, of the
    shared average with torch's update (one tensor at a time, both module trees walked) and of ours (pairs listed
    once, multi-tensor EMA); fails unless the last two average bit-equal. Dry run: its toy size on the CPU."""
    import contextlib
    import io

    sys.path.insert(0, str(HERE))
    import ema_update

    args = (["--hidden", "64", "--layers", "1", "--repeats", "1", "--updates", "1"] if dry else
            ["--hidden", "4096", "--layers", "32", "--repeats", "3", "--updates", "3", "--device", "cuda"])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        ema_update.main(args)
    lines = printed.getvalue().splitlines()
    if "averages bit-equal: True" not in printed.getvalue():
        raise AssertionError("ema: the shared averages differ\n" + "\n".join(lines))
    return [f"`python benchmarks/ema_update.py {' '.join(args)}`", "", *lines]


PARTS = {"kernels": part_kernels, "gpu_tests": part_gpu_tests, "sync": part_sync, "step_time": part_step_time,
         "paged": part_paged, "qlora_7b": part_qlora_7b, "release": part_release, "full_ft_7b": part_full_ft_7b,
         "long_run": part_long_run, "packing": part_packing, "qlora_moe": part_qlora_moe,
         "host_embeddings": part_host_embeddings, "ema": part_ema, "qdora_7b": part_qdora_7b}


# --------------------------------------------------------------------------------------------------
# Driver: one subprocess per part, a dated section in RESULTS.md
# --------------------------------------------------------------------------------------------------


def run_part(name: str, dry: bool, out: Path) -> None:
    """Child mode: run one part, write ``{"lines": [...]}`` or ``{"error": ...}`` to ``out``."""
    sys.path.insert(0, str(ROOT))
    try:
        result = {"lines": PARTS[name](dry)}
    except Exception as err:
        import traceback

        result = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-3000:]}
    out.write_text(json.dumps(result))


def run_row(row: str, seq: int, dry: bool, out: Path) -> None:
    """Row mode (a process per attempt of ``full_ft_7b``): write :func:`full_ft_row`'s JSON to ``out``."""
    sys.path.insert(0, str(ROOT))
    try:
        result = full_ft_row(row, seq, dry)
    except RuntimeError as err:  # an out-of-memory error raised through another layer
        if "out of memory" not in str(err):
            raise
        result = {"oom": True, "error": str(err).splitlines()[0][:300]}
    out.write_text(json.dumps(result))


def spawn_part(name: str, dry: bool, budget_s: float) -> dict:
    """Run part ``name`` in a subprocess within ``budget_s``; ``{"status", "seconds", "lines"}``."""
    env = {**os.environ, "GPU_CHECK_PART_BUDGET_S": str(budget_s)}
    if dry:
        env["TRITON_INTERPRET"] = "1"  # before triton is imported in the child: kernels on CPU tensors
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "part.json"
        begin = time.perf_counter()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--out", str(out)]
        cmd += ["--dry-run"] if dry else []
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=budget_s)
        except subprocess.TimeoutExpired:
            return {"status": f"TIMEOUT after {budget_s:.0f} s", "seconds": budget_s, "lines": []}
        seconds = time.perf_counter() - begin
        if not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            return {"status": f"CRASHED (exit {proc.returncode})", "seconds": seconds,
                    "lines": ["```", *tail, "```"]}
        result = json.loads(out.read_text())
    if "error" in result:  # the part's own message (its tables, failing tests), then where it was raised
        message = result["error"].splitlines()
        return {"status": f"FAILED: {message[0][:200]}", "seconds": seconds,
                "lines": [*message[1:120], "", "```", *result["trace"].splitlines()[-8:], "```"]}
    return {"status": "ok", "seconds": seconds, "lines": result["lines"]}


def environment(dry: bool) -> str:
    """Device name and versions, without initialising CUDA in this (parent) process."""
    code = ("import torch, triton; "
            "name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU (no CUDA device)'; "
            "print(f'{name}; torch {torch.__version__}, triton {triton.__version__}')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return (proc.stdout.strip() or "unknown device") + ("; --dry-run (toy sizes on CPU)" if dry else "")


def section(results: dict, env: str, argv: list[str]) -> str:
    """The dated markdown section for RESULTS.md."""
    now = dt.datetime.now(dt.timezone.utc)
    lines = [f"## GPU acceptance run ({now:%Y-%m-%d %H:%M} UTC)", "",
             f"- device: {env}", f"- command: `python benchmarks/gpu_check.py {' '.join(argv)}`".rstrip(), ""]
    lines += ["| part | status | seconds |", "|---|---|---:|"]
    lines += [f"| {name} | {r['status']} | {r['seconds']:.0f} |" for name, r in results.items()]
    for name, r in results.items():
        lines += ["", f"### {name}", "", *r["lines"]]
    return "\n".join(lines) + "\n"


def _cuda_available() -> bool:
    """Whether torch sees a CUDA device (imported here: the parent process needs torch for nothing else)."""
    import torch

    return torch.cuda.is_available()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the same code paths on CPU at toy sizes")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    parser.add_argument("--results", type=Path, default=None,
                        help="markdown file the dated section is appended to (default: benchmarks/RESULTS.md; "
                             "with --dry-run, nothing unless given)")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every part's time limit")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="folder for the files parts write (long_run's PNG); default benchmarks/out")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.out_dir is not None:
        os.environ["GPU_CHECK_OUT"] = str(args.out_dir.resolve())  # read by the parts' processes
    if args.child:
        run_part(args.child, args.dry_run, args.out)
        return 0
    if args.row:
        run_row(args.row, args.seq, args.dry_run, args.out)
        return 0
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown --parts {unknown}: expected some of {', '.join(PARTS)}")
    if not args.dry_run and not _cuda_available():
        parser.error("no CUDA device here (torch.cuda.is_available() is False): the parts measure a GPU, so nothing "
                     "was run and nothing written; use --dry-run for the same code paths on CPU at toy sizes")
    env = environment(args.dry_run)
    print(f"gpu_check on {env}", flush=True)
    results = {}
    for name in parts:
        results[name] = spawn_part(name, args.dry_run, BUDGET_S[name] * args.budget_scale)
        print(f"\n### {name}: {results[name]['status']} ({results[name]['seconds']:.0f} s)\n", flush=True)
        print("\n".join(results[name]["lines"]), flush=True)  # as it comes: a killed run still shows it
    text = section(results, env, sys.argv[1:] if argv is None else list(argv))
    target = args.results or (None if args.dry_run else HERE / "RESULTS.md")
    if target is not None:
        with target.open("a") as f:
            f.write("\n" + text)
        print(f"\nsection appended to {target}")
    return 0 if all(r["status"] == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
