"""Ahead-of-time compilation of every Triton kernel for NVIDIA targets, without a GPU.

The Triton interpreter accepts programs the compiler rejects, so each kernel family lists
``AOT_SPECS`` (kernel, signature, constexprs) and the test-suite compiles all of them to PTX and a
cubin for Ampere (sm_80) and Hopper (sm_90). :func:`signature_of` derives a signature from the
kernel's own parameter list, so a spec states only what differs from the defaults. Run
``python -m lowmem_lightning.kernels.aot`` to do the same by hand. Must run in a process where
``TRITON_INTERPRET`` is unset.
"""

from __future__ import annotations

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
)
"""Modules whose ``AOT_SPECS`` are compiled; a module that does not exist yet is skipped."""

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


def compile_spec(kernel, signature: dict, constexprs: dict, arch: int, aligned=()):
    """Compile one kernel for ``sm_{arch}``; returns the compiled kernel (``.asm`` has ptx and cubin).

    ``aligned``: parameter names compiled as divisible by 16 (see :func:`aligned_attrs`)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    full_signature = dict(signature)
    for name in constexprs:
        full_signature[name] = "constexpr"
    src = ASTSource(fn=kernel, signature=full_signature, constexprs=dict(constexprs),
                    attrs=aligned_attrs(kernel, aligned))
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"enable_fp_fusion": False})


def iter_specs():
    """Yield ``(module_name, kernel, signature, constexprs, aligned)`` for every kernel of the package
    (a spec is ``(kernel, signature, constexprs)`` or ``(kernel, signature, constexprs, aligned)``)."""
    for module_name in KERNEL_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name == module_name:
                continue
            raise
        for kernel, signature, constexprs, *aligned in getattr(module, "AOT_SPECS", ()):
            yield module_name, kernel, signature, constexprs, tuple(aligned[0]) if aligned else ()


_ACCESS = re.compile(r"^\s*(?:@!?%p\d+\s+)?(ld|st)\.global((?:\.[A-Za-z0-9_:]+)*)\s", re.M)


def count_accesses(ptx: str) -> dict[str, int]:
    """``{"ld": n, "ld.v2": n, "ld.v4": n, "st": n, "st.v2": n, "st.v4": n}``: global loads/stores in
    ``ptx`` by vector width (``ld``/``st`` count scalar instructions; ``.v8`` counts as ``.v4``)."""
    counts = dict.fromkeys(("ld", "ld.v2", "ld.v4", "st", "st.v2", "st.v4"), 0)
    for op, suffixes in _ACCESS.findall(ptx):
        width = next((w for w in (".v2", ".v4", ".v8") if w in suffixes), "")
        counts[op + (width if width != ".v8" else ".v4")] += 1
    return counts


def main() -> int:
    """Compile every spec for every arch; print one line each; exit code 1 if any failed."""
    failures = 0
    for module_name, kernel, signature, constexprs, aligned in iter_specs():
        for arch in ARCHES:
            name = f"{module_name}.{kernel.fn.__name__ if hasattr(kernel, 'fn') else kernel.__name__}"
            try:
                compiled = compile_spec(kernel, signature, constexprs, arch, aligned)
                ok = bool(compiled.asm.get("ptx")) and bool(compiled.asm.get("cubin"))
                print(f"sm_{arch} {name} {constexprs}: {'ok' if ok else 'NO CUBIN'}")
                failures += not ok
            except Exception as err:  # report every failure, not just the first
                print(f"sm_{arch} {name} {constexprs}: FAILED {type(err).__name__}: {err}")
                failures += 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
