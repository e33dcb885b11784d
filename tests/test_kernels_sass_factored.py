"""Factored optimizers (Adafactor, CAME, their shared statistics) and NF4: no slow-path CALL in the
sm_90 SASS, fewer instructions per element, and the branch-free arithmetic that replaced the calls
equal to the reference bit for bit.

SASS: compiled without a GPU in a subprocess with ``TRITON_INTERPRET`` unset (:func:`.aot.sass_of`,
``nvdisasm`` from the triton wheel); "per element" is the kernel body (loops counted once) divided by
the elements one thread handles, as in ``benchmarks/sass_counts.py``. Before issue 24 (same method,
aligned, fp32): ``adafactor_update_kernel`` factored with 8-bit momentum 181.6 per element and 66
CALLs, ``_came_update_kernel`` factored 8-bit 271.0 / 106, ``_res_stats_kernel`` 60.1-95.4 / 22-52,
``clip_stats_kernel`` 29.1-37.6 / 11-20, ``sq_stats_kernel`` 27-36 / 2-4, ``_nf4_unpack_kernel`` 24.4
per weight / 8 (64-bit divisions), ``_nf4_pack_kernel`` 189 per weight / 24. After (2026-12-04): 78.8,
92.5, 36.8-45.6, 15.8-17.8, 25.8-33.8, 16.1 and 47.8, no CALL (table in ``benchmarks/RESULTS.md``,
"Issue 24: factored optimizers and NF4"). Batched (one launch per pass for a group, 64-row statistics
tiles, 8 codec blocks per update program, 2026-12-04): 75.4 / 85.4 (bf16), 89.6 / 97.9 (bf16), 37.2-39.6,
19.1 (section "Issue 24.3: factored optimizers batched"). The bounds below hold these with a margin.

Numerics (interpreter): :func:`.factored.inv_sqrt` equals :func:`.factored.inv_sqrt_reference` on
every fp32 significand at exponents across the whole range (zero and subnormal inputs included),
:func:`.factored.div_rn` equals torch's division, :func:`.factored.row_of` equals integer division,
and NF4 blocks of tiny, subnormal, huge and zero scales quantize as the reference does.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from lowmem_lightning.kernels import nf4
from lowmem_lightning.kernels.factored import div_rn, inv_sqrt, inv_sqrt_reference, row_of
from lowmem_lightning.kernels.factored_plan import split_reciprocal

ROOT = Path(__file__).resolve().parents[1]

_SASS = textwrap.dedent('''
    import json, sys
    from lowmem_lightning.kernels import adafactor, came, factored, nf4
    from lowmem_lightning.kernels.aot import sass_counts, sass_of, tile_elements

    want = json.loads(sys.argv[1])  # [[kernel name, {constexpr: value}, grad/param dtype or null], ...]
    rows = []
    for module in (factored, adafactor, came, nf4):
        for kernel, signature, constexprs, aligned, options in module.AOT_SPECS:
            name = kernel.fn.__name__
            dtypes = {v for k, v in signature.items() if k in ("g_ptr", "p_ptr", "x_ptr", "out_ptr")}
            dtypes |= {f"*{constexprs[k]}" for k in ("PARAM_DTYPE", "GRAD_DTYPE") if k in constexprs}
            for wname, wcx, wdtype in want:
                if (name == wname and aligned and all(constexprs.get(k) == v for k, v in wcx.items())
                        and (wdtype is None or dtypes == {wdtype})):
                    counts = sass_counts(sass_of(kernel, signature, constexprs, 90, aligned, options))
                    per_thread = tile_elements(module, kernel, constexprs) / (32 * options.get("num_warps", 4))
                    rows.append({"kernel": name, "constexprs": {k: str(v) for k, v in constexprs.items()},
                                 "dtypes": sorted(dtypes), "CALL": counts["CALL"],
                                 "per_elem": counts["main"] / per_thread})
    json.dump(rows, sys.stdout)
''')

# (kernel, constexprs, dtype of the grad/param/weight pointers or None): the richest aligned variants
HOT = [
    ("adafactor_update_kernel", {"FACTORED": True, "MOMENTUM": 2}, "*fp32"),
    ("adafactor_update_kernel", {"FACTORED": True, "MOMENTUM": 2}, "*bf16"),
    ("_came_update_kernel", {"FACTORED": True, "QUANTIZED": True}, "*bf16"),
    ("_res_stats_kernel", {"QUANTIZED": True, "BLOCK_R": 64, "BLOCK_C": 128}, "*fp32"),
    ("clip_stats_kernel", {"BLOCK_R": 64, "BLOCK_C": 128}, "*fp32"),
    ("_nf4_pack_kernel", {"DOUBLE": True, "BLOCK": 64}, "*bf16"),
    ("_nf4_unpack_kernel", {"DOUBLE": True, "BLOCK": 64}, "*bf16"),
]

PER_ELEMENT_BOUND = {
    # kernel: instructions per element of the aligned variants above (before issue 24 in parentheses)
    "adafactor_update_kernel": 90.0,  # (181.6 fp32, 187.9 bf16)
    "_came_update_kernel": 105.0,  # (277.9 bf16)
    "_res_stats_kernel": 50.0,  # (60.1 at 16 x 128, up to 95.4)
    "clip_stats_kernel": 20.0,  # (31.6)
    "_nf4_pack_kernel": 60.0,  # per weight (189.7)
    "_nf4_unpack_kernel": 18.0,  # per weight (25.6)
}


def _sass_rows(tmp_path, want) -> list[dict]:
    script = tmp_path / "sass_rows.py"
    script.write_text(_SASS)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script), json.dumps(want)], env=env, capture_output=True,
                          text=True, timeout=1200, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


ALLOWED_CALLS = {
    # one scalar tl.div_rn per program, not per element: the double-quantization step max|d| / 127 of
    # 256 scales, kept correctly rounded for subnormal quotients too
    "_nf4_scale_quantize_kernel": 1,
}


def _failures(rows, bounds: bool) -> list[str]:
    out = []
    for r in rows:
        label = f"{r['kernel']} {r['constexprs']} {r['dtypes']}"
        if r["CALL"] > ALLOWED_CALLS.get(r["kernel"], 0):
            out.append(f"{label}: {r['CALL']} slow-path CALLs")
        bound = PER_ELEMENT_BOUND.get(r["kernel"])
        if bounds and bound is not None and r["per_elem"] > bound:
            out.append(f"{label}: {r['per_elem']:.1f} instructions per element > {bound}")
    return out


def test_hot_factored_and_nf4_kernels_have_no_call(tmp_path):
    rows = _sass_rows(tmp_path, HOT)
    assert {r["kernel"] for r in rows} == {k for k, _, _ in HOT}, rows
    failures = _failures(rows, bounds=True)
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_every_aligned_variant_of_the_factored_and_nf4_kernels_has_no_call(tmp_path):
    names = ("sq_stats_kernel", "sq_finalize_kernel", "clip_stats_kernel", "full_stats_kernel",
             "adafactor_update_kernel", "_res_stats_kernel", "_came_update_kernel", "_nf4_absmax_kernel",
             "_nf4_scale_quantize_kernel", "_nf4_pack_kernel", "_nf4_unpack_kernel")
    rows = _sass_rows(tmp_path, [(name, {}, None) for name in names])
    assert {r["kernel"] for r in rows} == set(names)
    assert len(rows) >= 60, len(rows)
    failures = _failures(rows, bounds=False)
    assert not failures, "\n".join(failures)


# --------------------------------------------------------------------------------------------------
# The branch-free helpers under the interpreter (the conftest sets TRITON_INTERPRET=1)
# --------------------------------------------------------------------------------------------------


@triton.jit
def _unary_probe(x_ptr, y_ptr, o_ptr, n, OP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=1.0)
    if OP == 0:
        out = inv_sqrt(x)
    else:
        out = div_rn(x, tl.load(y_ptr + offs, mask=mask, other=1.0))
    tl.store(o_ptr + offs, out, mask=mask)


def _run(op: int, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    out = torch.empty_like(x)
    block = 1 << 16
    _unary_probe[(triton.cdiv(x.numel(), block),)](x, x if y is None else y, out, x.numel(), OP=op, BLOCK=block)
    return out


def _significands(exponent: int, stride: int = 1) -> torch.Tensor:
    """fp32 values ``2**exponent * [1, 2)``: every ``stride``-th significand."""
    bits = torch.arange(0, 1 << 23, stride, dtype=torch.int32) | ((exponent + 127) << 23)
    return bits.view(torch.float32)


@pytest.mark.parametrize("exponent", [0, 1, -100, -101, -126, 126, 127])
def test_inv_sqrt_equals_the_reference_on_every_significand(exponent):
    x = _significands(exponent, stride=1 if exponent in (0, 1) else 7)
    got = _run(0, x)
    want = inv_sqrt_reference(x)
    bad = (got.view(torch.int32) != want.view(torch.int32)).nonzero().flatten()
    assert bad.numel() == 0, f"{bad.numel()} differ, e.g. x={x[bad[:3]].tolist()} {got[bad[:3]]} {want[bad[:3]]}"


def test_inv_sqrt_below_the_floor_and_at_the_edges():
    x = torch.tensor([0.0, 1e-45, 1e-40, 2.0 ** -126, 7e-31, 8e-31, 1e-30, 3.4e38, 1.0, 4.0], dtype=torch.float32)
    got = _run(0, x)
    assert torch.equal(got.view(torch.int32), inv_sqrt_reference(x).view(torch.int32)), (got, inv_sqrt_reference(x))
    assert got[0] == got[1] == got[2] == got[3]  # floored at the smallest normal, not inf


def test_div_rn_equals_torch_division():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(1 << 18, generator=gen) * torch.exp2(torch.randint(-60, 60, (1 << 18,), generator=gen).float())
    b = torch.rand(1 << 18, generator=gen) * torch.exp2(torch.randint(-60, 60, (1 << 18,), generator=gen).float())
    b = b + 1e-30
    a[:4] = torch.tensor([0.0, float("inf"), 1.0, 3.0])  # zero, an overflowed sum, the all-ones significand
    b[:4] = torch.tensor([3.0, 7.0, 2.0 - 2.0 ** -23, 2.0 - 2.0 ** -23])
    got = _run(1, a, b)
    assert torch.equal(got.view(torch.int32), (a / b).view(torch.int32))


@triton.jit
def _row_probe(offs_ptr, out_ptr, inv_hi, inv_lo, n, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    tl.store(out_ptr + idx, row_of(tl.load(offs_ptr + idx, mask=mask, other=0), inv_hi, inv_lo), mask=mask)


@pytest.mark.parametrize("divisor", [1, 3, 7, 255, 256, 4097, 12289, 50257, 151936, (1 << 20) + 1, (1 << 31) - 1])
def test_row_of_is_integer_division(divisor):
    gen = torch.Generator().manual_seed(divisor)
    offs = torch.randint(0, 1 << 45, (4096,), generator=gen, dtype=torch.int64)
    near = torch.arange(1, 40, dtype=torch.int64) * divisor  # both sides of multiples of the divisor
    offs = torch.cat([offs, near - 1, near, torch.tensor([0, (1 << 45) - 1])])
    out = torch.empty_like(offs)
    _row_probe[(triton.cdiv(offs.numel(), 1024),)](offs, out, *split_reciprocal(divisor), offs.numel(), BLOCK=1024)
    assert torch.equal(out, offs // divisor)


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_blocks_of_extreme_scales_quantize_as_the_reference(force_triton, double_quant):
    gen = torch.Generator().manual_seed(1)
    blocks = torch.randn(12, 64, generator=gen)
    scales = torch.tensor([1.0, 1e-38, 1e-42, 0.0, 1e37, 3e38 / 4, 2.0 ** -100, 2.0 ** 100, 1e-20, 1e20, 5.0, 1e-3])
    x = (blocks * scales[:, None]).reshape(-1)
    x[7] = 0.0
    ref = nf4.quantize_nf4_reference(x, 64, double_quant)
    got = nf4.quantize_nf4(x, 64, double_quant)
    assert torch.equal(got.packed, ref.packed)
    if double_quant:
        assert torch.equal(got.qscale, ref.qscale) and torch.equal(got.scale_step, ref.scale_step)
