"""Ahead-of-time compilation of every Triton kernel for NVIDIA targets, without a GPU.

The Triton interpreter accepts programs the compiler rejects, so each kernel family lists
``AOT_SPECS`` (kernel, signature, constexprs) and the test-suite compiles all of them to PTX and a
cubin for Ampere (sm_80) and Hopper (sm_90). Run ``python -m lowmem_lightning.kernels.aot`` to do
the same by hand. Must run in a process where ``TRITON_INTERPRET`` is unset.
"""

from __future__ import annotations

import importlib
import sys

KERNEL_MODULES = (
    "lowmem_lightning.kernels.codec",
    "lowmem_lightning.kernels.adamw8bit",
    "lowmem_lightning.kernels.sgd",
    "lowmem_lightning.kernels.adafactor",
    "lowmem_lightning.kernels.came",
    "lowmem_lightning.kernels.nf4",
)
"""Modules whose ``AOT_SPECS`` are compiled; a module that does not exist yet is skipped."""

ARCHES = (80, 90)


def compile_spec(kernel, signature: dict, constexprs: dict, arch: int):
    """Compile one kernel for ``sm_{arch}``; returns the compiled kernel (``.asm`` has ptx and cubin)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    full_signature = dict(signature)
    for name in constexprs:
        full_signature[name] = "constexpr"
    src = ASTSource(fn=kernel, signature=full_signature, constexprs=dict(constexprs))
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"enable_fp_fusion": False})


def iter_specs():
    """Yield ``(module_name, kernel_name, signature, constexprs)`` for every kernel of the package."""
    for module_name in KERNEL_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name == module_name:
                continue
            raise
        for kernel, signature, constexprs in getattr(module, "AOT_SPECS", ()):
            yield module_name, kernel, signature, constexprs


def main() -> int:
    """Compile every spec for every arch; print one line each; exit code 1 if any failed."""
    failures = 0
    for module_name, kernel, signature, constexprs in iter_specs():
        for arch in ARCHES:
            name = f"{module_name}.{kernel.fn.__name__ if hasattr(kernel, 'fn') else kernel.__name__}"
            try:
                compiled = compile_spec(kernel, signature, constexprs, arch)
                ok = bool(compiled.asm.get("ptx")) and bool(compiled.asm.get("cubin"))
                print(f"sm_{arch} {name} {constexprs}: {'ok' if ok else 'NO CUBIN'}")
                failures += not ok
            except Exception as err:  # report every failure, not just the first
                print(f"sm_{arch} {name} {constexprs}: FAILED {type(err).__name__}: {err}")
                failures += 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
