"""Ahead-of-time compilation of every Triton kernel for NVIDIA targets, without a GPU.

The Triton interpreter accepts programs the compiler rejects, so each kernel family lists
``AOT_SPECS`` (kernel, signature, constexprs) and the test-suite compiles all of them to PTX and a
cubin for Ampere (sm_80) and Hopper (sm_90). :func:`signature_of` derives a signature from the
kernel's own parameter list, so a spec states only what differs from the defaults. Run
``python -m lowmem_lightning.kernels.aot`` to do the same by hand. Must run in a process where
``TRITON_INTERPRET`` is unset.
"""

from __future__ import annotations

import functools
import importlib
import re
import sys

KERNEL_MODULES = (
    "lowmem_lightning.kernels.codec",
    "lowmem_lightning.kernels.adamw8bit",
    "lowmem_lightning.kernels.sgd",
    "lowmem_lightning.kernels.factored",
    "lowmem_lightning.kernels.adafactor",
    "lowmem_lightning.kernels.came",
    "lowmem_lightning.kernels.nf4",
    "lowmem_lightning.kernels.muon",
    "lowmem_lightning.kernels.row_gather",
)
"""Modules whose ``AOT_SPECS`` are compiled; a module that does not exist yet is skipped."""

SEPARATELY_TESTED_MODULES = (
    "lowmem_lightning.kernels.adamw4bit",
    "lowmem_lightning.kernels.lion",
    "lowmem_lightning.kernels.ademamix",
)
"""Kernel families whose own tests compile their ``AOT_SPECS`` (``tests/test_adamw4bit.py``,
``tests/test_lion_ademamix_aot.py``): left out of :func:`compile_all`, included by ``iter_specs(everything=True)``
(the SASS and PTX count scripts)."""

ARCHES = (80, 90)

DEFAULT_POINTER = "*fp32"
"""Triton type of a parameter named ``*_ptr`` that :func:`signature_of` is not told about."""

DEFAULT_SCALAR = "fp32"
"""Triton type of any other runtime parameter that :func:`signature_of` is not told about."""


def runtime_params(kernel) -> list[str]:
    """Names of a ``@triton.jit`` kernel's non-constexpr parameters, in order (also under
    ``TRITON_INTERPRET=1``, where the kernel is an interpreted function without ``params``)."""
    import inspect

    fn = getattr(kernel, "fn", kernel)
    names = []
    for param in inspect.signature(fn).parameters.values():
        note = param.annotation
        if not (note is not inspect.Parameter.empty and "constexpr" in (note if isinstance(note, str) else repr(note))):
            names.append(param.name)
    return names


def signature_of(kernel, types: dict | None = None, **exact: str) -> dict:
    """The ``triton.compile`` signature of a ``@triton.jit`` kernel, from its own parameter list.

    Each runtime (non-constexpr) parameter gets, in this order: its keyword in ``exact`` (a name that
    is not a runtime parameter raises ``ValueError``, so a renamed argument cannot silently fall back
    to a default), its entry in ``types`` (a family's shared table of conventions, e.g. ``{"n": "i64",
    "R": "i32"}``; names the kernel lacks are ignored), :data:`DEFAULT_POINTER` when its name ends in
    ``_ptr``, else :data:`DEFAULT_SCALAR`. Constexpr parameters are left out (:func:`compile_spec`
    adds them). E.g. ``signature_of(kernel, INT_TYPES, g_ptr="*bf16", m_ptr="*i8")``.
    """
    runtime = runtime_params(kernel)
    unknown = sorted(set(exact) - set(runtime))
    if unknown:
        raise ValueError(f"Invalid types for {kernel.fn.__name__}: {unknown} are not runtime parameters "
                         f"(expected some of {runtime}).")
    types = {**(types or {}), **exact}
    return {name: types.get(name, DEFAULT_POINTER if name.endswith("_ptr") else DEFAULT_SCALAR) for name in runtime}


DTYPE_PAIRS = (("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "bf16"))
"""(param, grad) Triton dtypes compiled ahead of time."""


def dtype_variants(options) -> list:
    """``(param, grad, option)``: every option in fp32, and the last (the richest) for the other
    :data:`DTYPE_PAIRS`, so every constexpr variant and every dtype path compiles without the product."""
    options = tuple(options)
    return [("fp32", "fp32", opt) for opt in options] + [(p, g, options[-1]) for p, g in DTYPE_PAIRS[1:]]


def aligned_attrs(kernel, aligned) -> dict:
    """``ASTSource`` attrs declaring the parameters named in ``aligned`` divisible by 16 (pointers:
    16-byte aligned; ints: multiples of 16), as Triton's launcher specializes them at run time."""
    import inspect

    names = list(inspect.signature(getattr(kernel, "fn", kernel)).parameters)
    missing = sorted(set(aligned) - set(names))
    if missing:
        raise ValueError(f"Invalid aligned for {kernel.fn.__name__}: {missing} are not parameters.")
    return {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}


SIZE_PARAMS = ("n", "n_pairs", "R", "C", "num_blocks", "block_size", "row_elems")
"""Integer parameters that are multiples of 16 for an aligned LLM tensor (element counts, rows,
columns, NF4 blocks); :func:`aligned_params` declares them divisible with the pointers."""


def aligned_params(kernel, signature: dict) -> tuple[str, ...]:
    """The parameters Triton's launcher specializes as divisible by 16 when it is given 16-byte
    aligned tensors of multiple-of-16 sizes: every pointer and the :data:`SIZE_PARAMS` present."""
    return tuple(name for name in runtime_params(kernel)
                 if signature.get(name, "").startswith("*") or name in SIZE_PARAMS)


def with_aligned(specs) -> list:
    """Each ``(kernel, signature, constexprs[, options])`` twice: as is (the general case) and with
    :func:`aligned_params` declared divisible by 16 (what a GPU runs on aligned tensors)."""
    out = []
    for kernel, signature, constexprs, *options in specs:
        opts = options[0] if options else {}
        out.append((kernel, signature, constexprs, (), opts))
        out.append((kernel, signature, constexprs, aligned_params(kernel, signature), opts))
    return out


def constexpr_defaults(kernel) -> dict:
    """``{name: default}`` of the ``tl.constexpr`` parameters of ``kernel`` (a ``triton.jit`` function) that
    have a default: what a launch that leaves them out gets, and so what an AOT compile must use too."""
    import inspect

    import triton.language as tl

    params = inspect.signature(kernel.fn).parameters.values()
    return {p.name: p.default for p in params
            if p.default is not p.empty and p.annotation in (tl.constexpr, "tl.constexpr")}


def compile_spec(kernel, signature: dict, constexprs: dict, arch: int, aligned=(), options=None):
    """Compile one kernel for ``sm_{arch}``; returns the compiled kernel (``.asm`` has ptx and cubin).

    ``aligned``: parameter names compiled as divisible by 16 (see :func:`aligned_attrs`);
    ``options``: launch options such as ``{"num_warps": 1}`` (the launcher's, so the PTX is the one
    that runs)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = {**constexpr_defaults(kernel), **constexprs}  # e.g. STOCHASTIC=True unless a spec says otherwise
    full_signature = dict(signature)
    for name in constexprs:
        full_signature[name] = "constexpr"
    src = ASTSource(fn=kernel, signature=full_signature, constexprs=dict(constexprs),
                    attrs=aligned_attrs(kernel, aligned))
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"enable_fp_fusion": False, **(options or {})})


def iter_specs(everything: bool = False):
    """Yield ``(module_name, kernel, signature, constexprs, aligned, options)`` for every kernel of
    :data:`KERNEL_MODULES` (and of :data:`SEPARATELY_TESTED_MODULES` when ``everything``); a spec is
    ``(kernel, signature, constexprs[, aligned[, options]])``."""
    for module_name in KERNEL_MODULES + (SEPARATELY_TESTED_MODULES if everything else ()):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name == module_name:
                continue
            raise
        for kernel, signature, constexprs, *extra in getattr(module, "AOT_SPECS", ()):
            aligned = tuple(extra[0]) if extra else ()
            options = dict(extra[1]) if len(extra) > 1 else {}
            yield module_name, kernel, signature, constexprs, aligned, options


_ACCESS = re.compile(r"^\s*(?:@!?%p\d+\s+)?(ld|st)\.global((?:\.[A-Za-z0-9_:]+)*)\s", re.M)


def count_accesses(ptx: str) -> dict[str, int]:
    """``{"ld": n, "ld.v2": n, "ld.v4": n, "st": n, "st.v2": n, "st.v4": n}``: global loads/stores in
    ``ptx`` by vector width (``ld``/``st`` count scalar instructions; ``.v8`` counts as ``.v4``)."""
    counts = dict.fromkeys(("ld", "ld.v2", "ld.v4", "st", "st.v2", "st.v4"), 0)
    for op, suffixes in _ACCESS.findall(ptx):
        width = next((w for w in (".v2", ".v4", ".v8") if w in suffixes), "")
        counts[op + (width if width != ".v8" else ".v4")] += 1
    return counts


def _disassembler() -> list[str]:
    """The command that prints SASS from a cubin: ``nvdisasm -c`` from the triton wheel (else
    ``cuobjdump -sass``, else the same tools on ``PATH``); ``RuntimeError`` when there is none."""
    import os
    import shutil

    import triton

    wheel_bin = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for tool, args in (("nvdisasm", ["-c"]), ("cuobjdump", ["-sass"])):
        path = os.path.join(wheel_bin, tool)
        path = path if os.access(path, os.X_OK) else shutil.which(tool)
        if path:
            return [path, *args]
    raise RuntimeError(f"No SASS disassembler: neither nvdisasm nor cuobjdump in {wheel_bin} or on PATH.")


def disassemble(cubin: bytes, name: str = "kernel") -> str:
    """SASS text of a ``cubin`` (``nvdisasm -c`` from the triton wheel, else ``cuobjdump -sass``)."""
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        done = subprocess.run([*_disassembler(), f.name], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"Disassembling {name} failed: {done.stderr.strip()}")
    return done.stdout


def sass_of(kernel, signature: dict, constexprs: dict, arch: int = 90, aligned=(), options=None) -> str:
    """The SASS (``nvdisasm -c`` text) of one kernel compiled for ``sm_{arch}`` by :func:`compile_spec`
    (same ``aligned`` and ``options``); no GPU needed. :func:`sass_counts` summarises it."""
    compiled = compile_spec(kernel, signature, constexprs, arch, aligned, options)
    return disassemble(compiled.asm["cubin"], getattr(kernel, "fn", kernel).__name__)


TILE_CONSTEXPRS = ("ROWS", "BLOCK", "BLOCK_R", "BLOCK_C", "TILE", "SBLOCK", "GROUPS")
"""Constexprs whose product :func:`tile_elements` takes as the elements one program handles."""


def tile_elements(module, kernel, constexprs: dict) -> int:
    """Elements one program of ``kernel`` handles: ``module.SASS_TILE_ELEMENTS[kernel name](constexprs)``
    when the kernel's module declares it, else the product of the :data:`TILE_CONSTEXPRS` present
    (``ROWS * BLOCK``, ``BLOCK_R * BLOCK_C``, ...). Divided by ``32 * num_warps`` it gives the
    elements per thread that :func:`sass_counts`' ``main`` is divided by for instructions per element."""
    name = getattr(kernel, "fn", kernel).__name__
    override = getattr(module, "SASS_TILE_ELEMENTS", {}).get(name)
    if override is not None:
        return int(override(constexprs))
    out = 1
    for key in TILE_CONSTEXPRS:
        value = constexprs.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            out *= value
    return out


_SASS_LINE = re.compile(
    r"^\s*/\*([0-9a-f]+)\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)([^;]*);", re.M)
_SASS_LABEL = re.compile(r"^\s*([.$\w]+):\s*$", re.M)
_SASS_TARGET = re.compile(r"`\(([^)]+)\)")

SASS_COUNTED = ("CALL", "MUFU", "FCHK", "BRA", "BSSY", "LDG", "STG", "LDS", "STS", "SHFL", "BAR", "I2F", "F2I")
"""Opcodes :func:`sass_counts` counts one by one (every opcode is also in its ``"ops"`` entry)."""


def _sass_instructions(sass: str) -> tuple[list[tuple[int, str, str, str]], dict[str, int]]:
    """``(address, opcode, modifiers, operands)`` of each issued instruction of ``sass`` (nvdisasm or
    cuobjdump text), without ``NOP`` and the trailing ``BRA`` to itself; and ``{label: address}``."""
    labels = {}  # label -> address of the instruction after it
    pending = []
    out = []
    for line in sass.splitlines():
        label = _SASS_LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        ins = _SASS_LINE.match(line)
        if not ins:
            continue
        address = int(ins.group(1), 16)
        for name in pending:
            labels[name] = address
        pending = []
        opcode, mods, operands = ins.group(2), ins.group(3), ins.group(4)
        target = _SASS_TARGET.search(operands)
        if opcode == "NOP" or (opcode == "BRA" and target and labels.get(target.group(1)) == address):
            continue
        out.append((address, opcode, mods, operands))
    return out, labels


def sass_counts(sass: str) -> dict:
    """Issued-instruction counts of one kernel's SASS (static counts: a loop body counts once).

    Keys: ``instructions`` (all, without ``NOP`` and the final ``BRA`` to itself), ``main`` (those
    before the first subroutine a ``CALL`` targets, i.e. the kernel body without the slow-path
    routines ``div_rn``/``sqrt_rn`` call), ``subroutines`` (the rest), one key per opcode of
    :data:`SASS_COUNTED` (``CALL`` = slow-path calls in the body, ``MUFU`` = special-function unit ops,
    ``FCHK`` = the range checks before a slow-path division), ``LDG.64``/``LDG.128``/``STG.64``/``STG.128``
    (vector widths; ``LDG``/``STG`` count all widths) and ``ops`` (``{opcode: count}`` over all).
    """
    instructions, labels = _sass_instructions(sass)
    called = [labels[t.group(1)] for _, op, _, rest in instructions if op == "CALL"
              for t in [_SASS_TARGET.search(rest)] if t and t.group(1) in labels]
    body_end = min(called, default=None)
    counts = {"instructions": len(instructions),
              "main": sum(1 for a, *_ in instructions if body_end is None or a < body_end)}
    counts["subroutines"] = counts["instructions"] - counts["main"]
    ops: dict[str, int] = {}
    for _, op, mods, _ in instructions:
        ops[op] = ops.get(op, 0) + 1
        if op in ("LDG", "STG") and mods.split(".")[-1] in ("64", "128"):
            key = f"{op}.{mods.split('.')[-1]}"
            ops[key] = ops.get(key, 0) + 1
    for key in (*SASS_COUNTED, "LDG.64", "LDG.128", "STG.64", "STG.128"):
        counts[key] = ops.get(key, 0)
    counts["ops"] = ops
    return counts


@functools.lru_cache(maxsize=1)
def _all_specs() -> tuple:
    """:func:`iter_specs` as a tuple, built once per process."""
    return tuple(iter_specs())


def _compile_one(task: tuple[int, int]) -> dict:
    """Compile spec number ``task[0]`` of :func:`iter_specs` for ``sm_{task[1]}``; a JSON-able record."""
    index, arch = task
    module_name, kernel, signature, constexprs, aligned, options = _all_specs()[index]
    record = {
        "arch": arch, "module": module_name.rsplit(".", 1)[-1], "kernel": getattr(kernel, "fn", kernel).__name__,
        "constexprs": {k: str(v) for k, v in constexprs.items()}, "aligned": bool(aligned), "options": options,
    }
    try:
        compiled = compile_spec(kernel, signature, constexprs, arch, aligned, options)
        ok = bool(compiled.asm.get("ptx")) and bool(compiled.asm.get("cubin"))
        record.update(ok=ok, error="" if ok else "no cubin", counts=count_accesses(compiled.asm["ptx"]))
    except Exception as err:  # report every failure, not just the first
        record.update(ok=False, error=f"{type(err).__name__}: {err}", counts=None)
    return record


def _variant_features(spec: tuple) -> set[tuple[str, str, str]]:
    """What a spec exercises: ``(kernel, setting, value)`` for each constexpr, each signature entry, each option and
    the alignment."""
    _, kernel, signature, constexprs, aligned, options = spec
    name = getattr(kernel, "fn", kernel).__name__
    settings = [("aligned", bool(aligned)), *constexprs.items(), *(("sig:" + k, v) for k, v in signature.items()),
                *(("opt:" + k, v) for k, v in (options or {}).items())]
    return {(name, key, str(value)) for key, value in settings}


def covering_indices(specs: tuple) -> list[int]:
    """Indices of a subset of ``specs`` in which every kernel meets each of its constexpr values, signature types,
    options and both alignments at least once (greedy set cover: the spec adding the most unseen features first), a
    fraction of the specs. The combinations themselves are compiled for :data:`ARCHES` by default."""
    features = [_variant_features(spec) for spec in specs]
    wanted = set().union(*features) if features else set()
    chosen: list[int] = []
    seen: set = set()
    while seen != wanted:
        best = max((i for i in range(len(specs)) if i not in chosen), key=lambda i: len(features[i] - seen))
        chosen.append(best)
        seen |= features[best]
    return sorted(chosen)


def compile_all(jobs: int = 1, covering_arches: tuple[int, ...] = ()) -> list[dict]:
    """Compile every spec for every arch (``jobs`` processes); for an arch in ``covering_arches`` only the
    :func:`covering_indices` subset. One record each: ``arch``, ``module``, ``kernel``, ``constexprs`` (as strings),
    ``aligned``, ``options``, ``ok``, ``error`` and ``counts`` (:func:`count_accesses` of the PTX)."""
    every = range(len(_all_specs()))
    covering = covering_indices(_all_specs()) if covering_arches else []
    tasks = [(i, arch) for arch in ARCHES for i in (covering if arch in covering_arches else every)]
    if jobs <= 1:
        return [_compile_one(task) for task in tasks]
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_compile_one, tasks, chunksize=4))


def main(argv=None) -> int:
    """Compile every spec for every arch; print one line each (with the PTX access counts); exit code
    1 if any failed. ``--json PATH`` also writes the records of :func:`compile_all`."""
    import argparse
    import json
    import os

    parser = argparse.ArgumentParser(description="Compile every Triton kernel for sm_80 and sm_90.")
    parser.add_argument("--json", help="write the records (kernel, constexprs, aligned, counts) to this file")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compiler processes")
    parser.add_argument("--covering-arch", type=int, action="append", default=[], choices=ARCHES,
                        help="for this arch compile only a subset in which every kernel meets each of its settings "
                             "(constexpr values, dtypes, options, alignment) at least once; repeatable")
    args = parser.parse_args(argv)
    records = compile_all(args.jobs, tuple(args.covering_arch))
    for r in records:
        label = str(r["constexprs"]) + (" aligned" if r["aligned"] else "")
        label += f" {r['options']}" if r["options"] else ""
        status = "ok" if r["ok"] else f"FAILED {r['error']}"
        counts = " ".join(f"{k}={v}" for k, v in (r["counts"] or {}).items())
        print(f"sm_{r['arch']} {r['module']}.{r['kernel']} {label}: {status} {counts}".rstrip())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 1 if any(not r["ok"] for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
