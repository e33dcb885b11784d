"""Every Triton kernel of the package compiles ahead of time for Ampere (sm_80) and Hopper (sm_90),
and on aligned tensors every hot kernel moves each of its streams with vector loads and stores.

The interpreter used by the other kernel tests is more permissive than the compiler, so the kernels
are compiled by ``python -m lowmem_lightning.kernels.aot`` in a subprocess with ``TRITON_INTERPRET``
unset (once for both tests). The PTX of the aligned variants (``ALIGNED=True`` multi-tensor kernels;
plain-pointer kernels compiled with the divisibility Triton's launcher gives aligned tensors) is
what a GPU runs on almost every LLM tensor: there, ``ld.global.v2/v4`` and ``st.global.v2/v4`` are
our proxy for memory bandwidth without a GPU.
"""

import json
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "records.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "lowmem_lightning.kernels.aot", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert out.exists(), proc.stdout + proc.stderr
    return json.loads(out.read_text()), proc


def test_all_kernels_compile_for_sm80_and_sm90(records):
    recs, proc = records
    failed = [f"sm_{r['arch']} {r['kernel']} {r['constexprs']}: {r['error']}" for r in recs if not r["ok"]]
    assert not failed, "\n".join(failed)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {r["arch"] for r in recs} == {80, 90}
    assert any(r["aligned"] for r in recs) and any(not r["aligned"] for r in recs)


def _true(r, name):
    return r["constexprs"].get(name) in ("True", "1", "2")


def _streams(r):
    """(load streams, store streams) moved element by element (one vector access each at least);
    None for kernels that are not hot or whose accesses are per row/column statistics."""
    k = r["kernel"]
    if k == "_adamw8bit_kernel":
        return 4, 3  # param, grad, m, v / param, m, v (codes or fp32)
    if k == "_sgd_kernel":
        return (3, 2) if _true(r, "MOMENTUM") else (2, 1)
    if k == "_muon_momentum_kernel":
        return 2, 2  # grad, momentum (codes or fp32) / bf16 U, momentum
    if k == "adafactor_update_kernel":
        momentum = _true(r, "MOMENTUM")
        unfactored = not _true(r, "FACTORED")
        return 2 + momentum + unfactored, 1 + momentum
    if k == "_came_update_kernel":
        return 3 + (not _true(r, "FACTORED")), 2  # param, grad, m (+ v) / param, m
    if k in ("_quantize_kernel", "_dequantize_kernel", "_nf4_pack_kernel", "_nf4_unpack_kernel"):
        return 1, 1
    if k in ("_nf4_absmax_kernel", "sq_stats_kernel", "clip_stats_kernel", "_res_stats_kernel"):
        return 1, 0  # the gradient (or weight) tile; row/column partial sums are small
    if k == "full_stats_kernel":
        return 1 + _true(r, "WITH_PSQ"), 1
    if k == "sq_finalize_kernel":
        return 1, 1
    return None


@pytest.mark.parametrize("arch", [80, 90])
def test_aligned_hot_kernels_use_vector_loads_and_stores(records, arch):
    recs, _ = records
    checked, short = 0, []
    for r in recs:
        streams = _streams(r)
        if r["arch"] != arch or not r["aligned"] or not r["ok"] or streams is None:
            continue
        c = r["counts"]
        loads, stores = c["ld.v2"] + c["ld.v4"], c["st.v2"] + c["st.v4"]
        checked += 1
        if loads < streams[0] or stores < streams[1]:
            short.append(f"{r['kernel']} {r['constexprs']}: {loads} vector loads for {streams[0]} streams, "
                         f"{stores} vector stores for {streams[1]}; counts {c}")
    assert checked >= 50, checked
    assert not short, "\n".join(short)


def test_general_multitensor_variant_stays_scalar_and_aligned_one_is_not(records):
    # the ALIGNED constexpr is what turns the table-loaded pointers into vector accesses
    recs, _ = records
    for kernel in ("_adamw8bit_kernel", "_sgd_kernel"):
        pairs = {}
        for r in recs:
            if r["kernel"] == kernel and r["arch"] == 90 and r["constexprs"]["PARAM_DTYPE"] == "fp32" \
                    and r["constexprs"]["GRAD_DTYPE"] == "fp32":
                key = tuple(sorted((k, v) for k, v in r["constexprs"].items() if k != "ALIGNED"))
                pairs.setdefault(key, {})[r["constexprs"]["ALIGNED"]] = r["counts"]
        assert pairs
        for counts in pairs.values():
            general, aligned = counts["False"], counts["True"]
            assert general["ld.v4"] + general["ld.v2"] == 0
            assert aligned["ld"] < general["ld"] and aligned["ld.v4"] > 0
