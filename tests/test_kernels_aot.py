"""Every Triton kernel of the package compiles ahead of time for Ampere (sm_80) and Hopper (sm_90),
and on aligned tensors every hot kernel moves each of its streams with vector loads and stores.

The interpreter used by the other kernel tests is more permissive than the compiler, so the kernels
are compiled by ``python -m lowmem_lightning.kernels.aot`` in a subprocess with ``TRITON_INTERPRET``
unset (once for both tests). The PTX of the aligned variants (``ALIGNED=True`` multi-tensor kernels;
plain-pointer kernels compiled with the divisibility Triton's launcher gives aligned tensors) is
what a GPU runs on almost every LLM tensor: there, ``ld.global.v2/v4`` and ``st.global.v2/v4`` are
our proxy for memory bandwidth without a GPU.

The default run compiles every spec for sm_90 (what the H100/H200 runs, and what the SASS tests read) and, for
sm_80, the subset in which every kernel meets each of its settings at least once
(:func:`~lowmem_lightning.kernels.aot.covering_indices`, under a third of the specs): on a cold Triton cache (a fresh
CI machine) compiling every spec for both arches was the suite's longest setup. ``-m slow`` compiles every spec for
sm_80 too.
"""

import json
import os
import subprocess
import sys

import pytest

from lowmem_lightning.kernels.aot import _all_specs, covering_indices


def _compiled(tmp_path_factory, *args: str) -> tuple[list[dict], subprocess.CompletedProcess]:
    """``python -m lowmem_lightning.kernels.aot ARGS --json FILE`` (interpreter off): its records and process."""
    out = tmp_path_factory.mktemp("aot") / "records.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "lowmem_lightning.kernels.aot", *args, "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert out.exists(), proc.stdout + proc.stderr
    return json.loads(out.read_text()), proc


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return _compiled(tmp_path_factory, "--covering-arch", "80")


def _assert_all_compiled(recs: list[dict], proc: subprocess.CompletedProcess) -> None:
    failed = [f"sm_{r['arch']} {r['kernel']} {r['constexprs']}: {r['error']}" for r in recs if not r["ok"]]
    assert not failed, "\n".join(failed)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {r["arch"] for r in recs} == {80, 90}
    assert any(r["aligned"] for r in recs) and any(not r["aligned"] for r in recs)


def test_all_kernels_compile_for_sm80_and_sm90(records):
    """Every spec for sm_90; for sm_80 every kernel, with each of its settings (the covering subset)."""
    recs, proc = records
    _assert_all_compiled(recs, proc)
    by_arch = {arch: [r for r in recs if r["arch"] == arch] for arch in (80, 90)}
    assert len(by_arch[90]) == len(_all_specs())
    assert len(by_arch[80]) == len(covering_indices(_all_specs())) < len(by_arch[90])
    assert {r["kernel"] for r in by_arch[80]} == {r["kernel"] for r in by_arch[90]}
    for kernel in {r["kernel"] for r in by_arch[90]}:
        seen_80 = {(k, v) for r in by_arch[80] if r["kernel"] == kernel for k, v in r["constexprs"].items()}
        seen_90 = {(k, v) for r in by_arch[90] if r["kernel"] == kernel for k, v in r["constexprs"].items()}
        assert seen_80 == seen_90, (kernel, seen_90 - seen_80)
        assert {r["aligned"] for r in by_arch[80] if r["kernel"] == kernel} == \
            {r["aligned"] for r in by_arch[90] if r["kernel"] == kernel}, kernel


@pytest.mark.slow
def test_every_spec_compiles_for_sm80_too(tmp_path_factory):
    """The whole cross product of settings for sm_80 as well (sm_90's compiles come from the Triton cache)."""
    recs, proc = _compiled(tmp_path_factory)
    _assert_all_compiled(recs, proc)
    assert len([r for r in recs if r["arch"] == 80]) == len(_all_specs())


def test_the_covering_subset_meets_every_setting_of_every_kernel():
    """Without compiling: each kernel's constexpr values, signature types, options and alignments in the full list
    are all in the subset; and it is a proper subset."""
    specs = _all_specs()
    chosen = [specs[i] for i in covering_indices(specs)]

    def settings(spec_list):
        found = set()
        for _, kernel, signature, constexprs, aligned, options in spec_list:
            name = getattr(kernel, "fn", kernel).__name__
            found.add((name, "aligned", bool(aligned)))
            found |= {(name, k, str(v)) for k, v in [*constexprs.items(), *signature.items(),
                                                       *(options or {}).items()]}
        return found

    assert settings(chosen) == settings(specs)
    assert 0 < len(chosen) < len(specs) / 3


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
    if k in ("_quantize_kernel", "_dequantize_kernel", "_nf4_pack_kernel", "_nf4_unpack_kernel", "_gather_rows_kernel"):
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
    hot = {r["kernel"] for r in recs if r["arch"] == arch and r["aligned"] and _streams(r) is not None}
    assert checked >= (50 if arch == 90 else len(hot)) and len(hot) >= 12, (checked, hot)
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
