"""The sm_90 SASS of the hot element-wise kernels: no per-element slow-path CALL, bounded instructions.

Compiled without a GPU (``benchmarks/sass_counts.py`` in a subprocess with ``TRITON_INTERPRET``
unset; ``nvdisasm`` ships in the triton wheel). "Per element" is the kernel body (the instructions
before the first slow-path subroutine, loops counted once) divided by the elements one thread
handles (``ROWS * BLOCK / (32 * num_warps)``): it includes the fixed per-program work. Before issue
24 (2026-12-04, same method) the aligned kernels issued: AdamW 8-bit bf16 199.8 per element with 66
CALLs, fp32 ~190 with 66; SGD 8-bit momentum bf16 86.4 with 16; quantize 46.5 (signed) / 58.6
(unsigned) with 16 / 24. The bounds below are about half of those.

A second check pins the exactness argument of :mod:`lowmem_lightning.kernels.codec`: the branch-free
square root and reciprocal compile to exactly the instruction sequences of ptxas' own correctly
rounded ``sqrt.rn.f32`` / ``div.rn.f32`` fast paths.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PER_ELEMENT_BOUND = {
    # (kernel, param dtype or None, quantized or None): max instructions per element, aligned variant
    ("_adamw8bit_kernel", "bf16", True): 105.0,  # before 199.8
    ("_adamw8bit_kernel", "fp32", True): 100.0,  # before 190
    ("_sgd_kernel", "bf16", True): 62.0,  # before 86.4 (SGD's own math is a few instructions)
    ("_sgd_kernel", "fp32", True): 56.0,
    ("_quantize_kernel", None, None): 26.0,  # before 46.5 / 58.6
    ("_dequantize_kernel", None, None): 16.0,
}


def _env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _sass_rows(tmp_path, *args) -> list[dict]:
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sass_counts.py"), "--json", str(out), *args],
                          env=_env(), capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert proc.returncode == 0 and out.exists(), proc.stdout + proc.stderr
    return json.loads(out.read_text())


HOT_KERNELS = ("_adamw8bit_kernel", "_sgd_kernel", "_quantize_kernel", "_dequantize_kernel",
               "_adamw8bit_persistent_kernel")


@pytest.fixture(scope="module")
def hot_rows(tmp_path_factory) -> list[dict]:
    """The rows of every aligned spec of :data:`HOT_KERNELS` with bf16 gradients and 8-bit state, from one
    ``sass_counts.py`` process for the module's tests (a spec is selected by its own constexprs, so each test's
    kernels get the rows a process of their own would give)."""
    return _sass_rows(tmp_path_factory.mktemp("sass"), "--kernels", *HOT_KERNELS, "--all-specs", "--aligned-only",
                      "--match", "GRAD_DTYPE=bf16", "--match", "QUANTIZED=True")


def _of(rows: list[dict], *kernels: str) -> list[dict]:
    return [r for r in rows if r["kernel"] in kernels]


def _check(rows, bounds: bool):
    failures = []
    for r in rows:
        label = f"{r['kernel']} {r['constexprs']} aligned={r['aligned']}"
        if r["CALL"]:
            failures.append(f"{label}: {r['CALL']} slow-path CALLs")
        key = (r["kernel"], r["constexprs"].get("PARAM_DTYPE"),
               {"True": True, "False": False}.get(r["constexprs"].get("QUANTIZED")))
        bound = PER_ELEMENT_BOUND.get(key)
        if bounds and r["aligned"] and bound is not None and r["per elem"] > bound:
            failures.append(f"{label}: {r['per elem']:.1f} instructions per element > {bound}")
    return failures


def test_hot_kernels_have_no_call_and_half_the_instructions(hot_rows):
    rows = _of(hot_rows, "_adamw8bit_kernel", "_sgd_kernel", "_quantize_kernel", "_dequantize_kernel")
    kernels = {(r["kernel"], r["constexprs"].get("PARAM_DTYPE")) for r in rows}
    assert {("_adamw8bit_kernel", "bf16"), ("_adamw8bit_kernel", "fp32"), ("_sgd_kernel", "bf16"),
            ("_sgd_kernel", "fp32"), ("_quantize_kernel", None), ("_dequantize_kernel", None)} <= kernels, kernels
    failures = _check(rows, bounds=True)
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_every_variant_of_the_elementwise_kernels_has_no_call(tmp_path):
    rows = _sass_rows(tmp_path, "--kernels", "_adamw8bit_kernel", "_sgd_kernel", "_quantize_kernel",
                      "_dequantize_kernel", "--all-specs")
    assert len(rows) >= 2 * (14 + 21 + 4), len(rows)
    failures = _check(rows, bounds=True)
    assert not failures, "\n".join(failures)


_PROBE = textwrap.dedent('''
    import json, sys
    import triton
    import triton.language as tl
    from lowmem_lightning.kernels.aot import compile_spec, disassemble, _sass_instructions
    from lowmem_lightning.kernels.codec import rcp_rn, sqrt_rn_fast

    @triton.jit
    def probe(x_ptr, o_ptr, OP: tl.constexpr):
        offs = tl.arange(0, 128)
        x = tl.load(x_ptr + offs)
        if OP == 0:
            y = sqrt_rn_fast(x)
        else:
            y = rcp_rn(x)
        tl.store(o_ptr + offs, y)

    out = {}
    for op in (0, 1):
        c = compile_spec(probe, {"x_ptr": "*fp32", "o_ptr": "*fp32"}, {"OP": op}, 90, ("x_ptr", "o_ptr"),
                         {"num_warps": 4})
        ins, _ = _sass_instructions(disassemble(c.asm["cubin"]))
        out[op] = [o + m for _, o, m, _ in ins if o in ("MUFU", "FMUL", "FFMA", "FADD")]
    json.dump(out, sys.stdout)
''')


def test_branch_free_sqrt_and_reciprocal_are_ptxas_fast_paths(tmp_path):
    probe = tmp_path / "probe.py"  # @triton.jit needs its source in a file
    probe.write_text(_PROBE)
    proc = subprocess.run([sys.executable, str(probe)], env=_env(), capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    ops = json.loads(proc.stdout)
    # sqrt.rn.f32 fast path: MUFU.RSQ; y = x * r; h = r * 0.5; e = fma(-y, y, x); fma(e, h, y)
    assert ops["0"] == ["MUFU.RSQ", "FMUL", "FMUL", "FFMA", "FFMA"], ops["0"]
    # div.rn.f32(1, b) fast path: MUFU.RCP; two Newton FFMA; Markstein residual and correction
    assert ops["1"] == ["MUFU.RCP", "FFMA", "FFMA", "FFMA", "FFMA"], ops["1"]


def test_persistent_adamw_loads_the_next_tile_under_the_current_math(hot_rows):
    # issue 24 (2): in the loop of the persistent kernel the next tile's data loads (param, grad, two code words,
    # two block scales) are issued before the current tile's math, and no instruction reads their results before
    # that math ends (no stall on them inside an iteration); a steady-state tile costs fewer instructions than a
    # one-tile program of the non-persistent kernel
    rows = _of(hot_rows, "_adamw8bit_kernel", "_adamw8bit_persistent_kernel")
    by = {(r["kernel"], r["constexprs"]["PARAM_DTYPE"]): r for r in rows}
    for dtype in ("bf16", "fp32"):
        loop, single = by[("_adamw8bit_persistent_kernel", dtype)], by[("_adamw8bit_kernel", dtype)]
        assert loop["CALL"] == 0 and loop["LDGSTS"] == 0, loop
        assert loop["LDG<math"] >= 6, loop
        assert loop["LDG waited"] == 0, loop
        assert loop["steady/elem"] < single["per elem"], (loop["steady/elem"], single["per elem"])


_LOOP_SASS = """
.L_x_0:
        /*0000*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0010*/                   PRMT R8, R5, 0x7610, R8 ;
        /*0020*/                   MUFU.RSQ R9, R10 ;
        /*0030*/              @P0 BRA `(.L_x_1) ;
        /*0040*/                   LDG.E R11, desc[UR4][R12.64] ;
.L_x_1:
        /*0050*/                   LDG.E.64 R14, desc[UR4][R2.64] ;
        /*0060*/                   MUFU.RCP R9, R9 ;
        /*0070*/                   MOV R16, R14 ;
        /*0080*/                   BRA `(.L_x_0) ;
"""


def test_loop_overlap_counts_loads_waited_on_inside_an_iteration():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from sass_counts import loop_overlap
    finally:
        sys.path.pop(0)
    # R4..R7 is read by the PRMT before the last MUFU: waited; R14 is read by the MOV after it: overlapped;
    # the load behind the forward branch is not steady state
    assert loop_overlap(_LOOP_SASS) == {"loop": 9, "steady": 8, "LDG<math": 1, "LDG waited": 1, "LDGSTS": 0}
    assert loop_overlap("        /*0000*/ EXIT ;\n")["loop"] is None
