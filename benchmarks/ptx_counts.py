"""Global memory instructions in the ahead-of-time PTX of every Triton kernel (no GPU needed).

For each kernel of ``lowmem_lightning.kernels.aot.iter_specs()`` (its first spec: fp32 params and
grads), compile for ``sm_{arch}`` and count ``ld.global`` / ``st.global`` instructions by width:
scalar (``.b8``/``.b16``/``.b32``/``.b64``, no vector suffix) and vector (``.v2``/``.v4``). Scalar
byte-wide loads of 8-bit codes are the worst case for memory throughput; issue 15 asks for vector
access on aligned tensors, and this table is its before/after figure.

    python benchmarks/ptx_counts.py [--arch 90] [--all-specs]

Must run with ``TRITON_INTERPRET`` unset (compilation, not interpretation).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

_ACCESS = re.compile(r"^\s*(?:@!?%p\d+\s+)?(ld|st)\.global((?:\.[A-Za-z0-9_:]+)*)\s", re.M)


def count_accesses(ptx: str) -> dict[str, int]:
    """``{"ld": n, "ld.v2": n, "ld.v4": n, "st": n, "st.v2": n, "st.v4": n}``: global loads/stores in
    ``ptx`` by vector width (``ld``/``st`` count scalar instructions)."""
    counts = dict.fromkeys(("ld", "ld.v2", "ld.v4", "st", "st.v2", "st.v4"), 0)
    for op, suffixes in _ACCESS.findall(ptx):
        width = next((w for w in (".v2", ".v4", ".v8") if w in suffixes), "")
        key = op + (width if width != ".v8" else ".v4")
        counts[key] += 1
    return counts


def _rows(arch: int, all_specs: bool):
    from lowmem_lightning.kernels.aot import compile_spec, iter_specs

    seen = set()
    for module_name, kernel, signature, constexprs in iter_specs():
        name = kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__
        if name in seen and not all_specs:
            continue
        seen.add(name)
        try:
            ptx = compile_spec(kernel, signature, constexprs, arch).asm["ptx"]
        except Exception as err:  # one failure must not hide the other kernels' figures
            yield module_name.rsplit(".", 1)[-1], name, constexprs, None, f"{type(err).__name__}: {err}"
            continue
        yield module_name.rsplit(".", 1)[-1], name, constexprs, count_accesses(ptx), ""


def main(argv: list[str] | None = None) -> int:
    """Print a markdown table of global loads/stores per kernel; exit 1 if a kernel failed to compile."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability to compile for (80, 90)")
    parser.add_argument("--all-specs", action="store_true", help="every AOT spec, not the first per kernel")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 is set: unset it, this compiles the kernels")
    print(f"Global loads (ld) and stores (st) in the PTX for sm_{args.arch}, by vector width:\n")
    print("| family | kernel | constexprs | ld | ld.v2 | ld.v4 | st | st.v2 | st.v4 |")
    print("|---|---|---|---|---|---|---|---|---|")
    failed = 0
    for family, name, constexprs, counts, error in _rows(args.arch, args.all_specs):
        if counts is None:
            print(f"| {family} | {name} | {constexprs} | FAILED: {error} |")
            failed += 1
            continue
        cells = " | ".join(str(counts[k]) for k in ("ld", "ld.v2", "ld.v4", "st", "st.v2", "st.v4"))
        print(f"| {family} | {name} | {constexprs} | {cells} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
