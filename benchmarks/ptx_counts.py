"""Global memory instructions in the ahead-of-time PTX of every Triton kernel (no GPU needed).

For each kernel of ``lowmem_lightning.kernels.aot.iter_specs()`` (its first spec, fp32 params and
grads, in the general form and the aligned one: ``ALIGNED=True`` or aligned pointers/sizes), compile
for ``sm_{arch}`` and count ``ld.global`` / ``st.global`` instructions by width:
scalar (``.b8``/``.b16``/``.b32``/``.b64``, no vector suffix) and vector (``.v2``/``.v4``). Scalar
byte-wide loads of 8-bit codes are the worst case for memory throughput; issue 15 asks for vector
access on aligned tensors, and this table is its before/after figure.

    python benchmarks/ptx_counts.py [--arch 90] [--all-specs]

Must run with ``TRITON_INTERPRET`` unset (compilation, not interpretation).
"""

from __future__ import annotations

import argparse
import os
import sys


def _rows(arch: int, all_specs: bool):
    from lowmem_lightning.kernels.aot import compile_spec, count_accesses, iter_specs

    seen = set()
    for module_name, kernel, signature, constexprs, aligned, options in iter_specs(everything=True):
        name = kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__
        is_aligned = bool(aligned) or constexprs.get("ALIGNED") is True
        if (name, is_aligned) in seen and not all_specs:
            continue
        seen.add((name, is_aligned))
        shown = {k: v if isinstance(v, (bool, int)) else str(v) for k, v in constexprs.items() if k != "ALIGNED"}
        try:
            ptx = compile_spec(kernel, signature, constexprs, arch, aligned, options).asm["ptx"]
        except Exception as err:  # one failure must not hide the other kernels' figures
            yield module_name.rsplit(".", 1)[-1], name, shown, is_aligned, None, f"{type(err).__name__}: {err}"
            continue
        yield module_name.rsplit(".", 1)[-1], name, shown, is_aligned, count_accesses(ptx), ""


def main(argv: list[str] | None = None) -> int:
    """Print a markdown table of global loads/stores per kernel; exit 1 if a kernel failed to compile."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability to compile for (80, 90)")
    parser.add_argument("--all-specs", action="store_true", help="every AOT spec, not the first per kernel")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 is set: unset it, this compiles the kernels")
    print(f"Global loads (ld) and stores (st) in the PTX for sm_{args.arch}, by vector width:\n")
    print("| family | kernel | constexprs | aligned | ld | ld.v2 | ld.v4 | st | st.v2 | st.v4 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    failed = 0
    for family, name, constexprs, aligned, counts, error in _rows(args.arch, args.all_specs):
        if counts is None:
            print(f"| {family} | {name} | {constexprs} | {aligned} | FAILED: {error} |")
            failed += 1
            continue
        cells = " | ".join(str(counts[k]) for k in ("ld", "ld.v2", "ld.v4", "st", "st.v2", "st.v4"))
        print(f"| {family} | {name} | {constexprs} | {'yes' if aligned else 'no'} | {cells} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
