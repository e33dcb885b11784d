"""Issued instructions in the sm_90 SASS of every Triton kernel, per element (no GPU needed).

For each spec of ``lowmem_lightning.kernels.aot.iter_specs()`` (by default the first per kernel in
the general form and the aligned one; ``--all-specs`` every one), compile it, disassemble the cubin
with the ``nvdisasm`` shipped in the triton wheel (:func:`lowmem_lightning.kernels.aot.sass_of`) and
print one markdown row: static instruction counts (:func:`~lowmem_lightning.kernels.aot.sass_counts`),
slow-path ``CALL``s, ``MUFU``, ``FCHK``, global loads/stores (all widths, and how many are 128-bit),
``BRA``, and instructions per element.

How "per element" is computed (static counts, a crude but stated model):

* ``main`` = the instructions of the kernel body, i.e. before the first slow-path subroutine a
  ``CALL`` targets (``NOP`` and the final ``BRA`` to itself left out). A loop body counts once and a
  branch's both sides count, so this is the straight-line cost of one program per thread.
* elements per thread = :func:`~lowmem_lightning.kernels.aot.tile_elements` (``ROWS * BLOCK``, ...)
  / (32 * ``num_warps``).
* ``per elem`` = ``main`` / elements per thread: includes the fixed per-program work (table loads,
  step scalars, reductions) spread over the tile's elements, so it is an upper bound of the marginal
  cost.
* ``--slope`` also compiles each kernel with ``ROWS`` doubled (kernels that have it) and reports the
  marginal cost ``(main(2 ROWS) - main(ROWS)) / extra elements per thread`` and the fixed part
  ``main - marginal * elements per thread``.

Persistent kernels (a name containing ``persistent``: programs that loop over tiles) also get the loop
analysis of :func:`loop_overlap`, from the outermost loop of the SASS: ``loop`` (its body, static),
``steady`` (the body less the blocks a forward branch inside it can skip: step scalars, table reads when a
tile starts another tensor), ``steady/elem`` (``steady`` / elements per thread: the marginal cost of a tile),
``LDG<math`` (global loads issued before the first ``MUFU`` of the steady body: the next tile's loads) and
``LDG waited`` (loads whose result an instruction reads before the last ``MUFU`` of the same iteration: the
warp stalls on those before its math ends; 0 = every load's latency runs under the current tile's math),
``LDGSTS`` (``cp.async`` copies; the register double buffer uses none). ``REG`` is the registers per thread
(``cuobjdump -res-usage``) and ``CTA/SM`` the programs one SM holds at once by registers alone (65536 registers,
allocated per warp in units of 256; at most 64 warps): what bounds a persistent grid's programs per SM.

    python benchmarks/sass_counts.py [--arch 90] [--all-specs] [--kernels adamw8bit sgd] [--aligned-only] \\
        [--match PARAM_DTYPE=bf16 --match QUANTIZED=True] [--slope] [--json out.json]

Must run with ``TRITON_INTERPRET`` unset (compilation, not interpretation).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys

COLUMNS = ("instr", "main", "CALL", "MUFU", "FCHK", "LDG", "LDG.128", "STG", "STG.128", "BRA", "elem/thr",
           "per elem", "slope", "fixed", "REG", "CTA/SM", "loop", "steady", "steady/elem", "LDG<math", "LDG waited",
           "LDGSTS")

LOOP_KEYS = ("loop", "steady", "LDG<math", "LDG waited", "LDGSTS")
"""The keys :func:`loop_overlap` returns."""

_REG = re.compile(r"\bR(\d+)(\.64)?\b")
_WIDTH = {"128": 4, "64": 2}
_NO_DESTINATION = ("STG", "STS", "ST", "BRA", "EXIT", "BAR", "RED", "ATOM", "CALL", "RET")


def _registers(operand: str) -> set[int]:
    """General registers an operand names (``R8.64`` names R8 and R9)."""
    out = set()
    for number, wide in _REG.findall(operand):
        out.update(range(int(number), int(number) + (2 if wide else 1)))
    return out


def _writes_reads(op: str, mods: str, operands: str) -> tuple[set[int], set[int]]:
    """``(written, read)`` registers of one SASS instruction (the first operand is the destination, except for
    stores and control flow); a load's destination spans its width (``LDG.E.128 R4``: R4..R7)."""
    parts = [p.strip() for p in operands.split(",")]
    if op in _NO_DESTINATION or not parts or not parts[0]:
        return set(), set().union(*(_registers(p) for p in parts)) if parts else set()
    written = _registers(parts[0])
    width = _WIDTH.get(mods.split(".")[-1], 1) if op in ("LDG", "LDS", "LDL") else 1
    if written and width > 1:
        written = set(range(min(written), min(written) + width))
    return written, set().union(*(_registers(p) for p in parts[1:])) if parts[1:] else set()


def _shown(constexprs: dict) -> dict:
    return {k: v if isinstance(v, (bool, int)) else str(v) for k, v in constexprs.items()}


def _selected(name: str, family: str, constexprs: dict, kernels: list[str], match: list[str]) -> bool:
    """``name`` or its ``family`` (module) is one of ``kernels`` (if any) and every ``KEY=VALUE`` of
    ``match`` holds (a spec without that constexpr passes: ``--match PARAM_DTYPE=bf16`` keeps the codec
    kernels)."""
    if kernels and name not in kernels and family not in kernels:
        return False
    shown = {k: str(v) for k, v in _shown(constexprs).items()}
    return all(shown.get(key, value) == value for key, value in (m.split("=", 1) for m in match))


def measure(module_name, kernel, signature, constexprs, aligned, options, arch: int, slope: bool) -> dict:
    """One row: :func:`sass_counts` of the kernel's SASS plus ``elem/thr``, ``per elem`` and, with
    ``slope``, the marginal ``slope`` and ``fixed`` instructions (see the module docstring)."""
    from lowmem_lightning.kernels.aot import compile_spec, disassemble, sass_counts, tile_elements

    module = importlib.import_module(module_name)
    compiled = compile_spec(kernel, signature, constexprs, arch, aligned, options)
    threads = 32 * compiled.metadata.num_warps
    per_thread = tile_elements(module, kernel, constexprs) / threads
    sass = disassemble(compiled.asm["cubin"])
    counts = sass_counts(sass)
    row = {**counts, "instr": counts["instructions"], "elem/thr": per_thread,
           "per elem": counts["main"] / per_thread, "slope": None, "fixed": None,
           **dict.fromkeys(LOOP_KEYS), "steady/elem": None}
    row["REG"] = registers(compiled.asm["cubin"])
    row["CTA/SM"] = resident_programs(row["REG"], compiled.metadata.num_warps)
    if "persistent" in getattr(kernel, "fn", kernel).__name__:
        row.update(loop_overlap(sass))
        row["steady/elem"] = row["steady"] / per_thread if row["steady"] is not None else None
    if slope and isinstance(constexprs.get("ROWS"), int):
        bigger = {**constexprs, "ROWS": 2 * constexprs["ROWS"]}
        compiled2 = compile_spec(kernel, signature, bigger, arch, aligned, options)
        main2 = sass_counts(disassemble(compiled2.asm["cubin"]))["main"]
        extra = tile_elements(module, kernel, bigger) / (32 * compiled2.metadata.num_warps) - per_thread
        row["slope"] = (main2 - counts["main"]) / extra
        row["fixed"] = counts["main"] - row["slope"] * per_thread
    return row


def loop_overlap(sass: str) -> dict:
    """The outermost loop of a persistent kernel's SASS: ``loop``, ``steady``, ``LDG<math``, ``LDG waited`` and
    ``LDGSTS`` as the module docstring defines them (``None`` for each when the SASS has no loop)."""
    from lowmem_lightning.kernels.aot import _sass_instructions

    instructions, labels = _sass_instructions(sass)
    target_of = {}
    for address, op, _, operands in instructions:
        match = re.search(r"`\(([^)]+)\)", operands) if op == "BRA" else None
        if match and match.group(1) in labels:
            target_of[address] = labels[match.group(1)]
    back = [(a, t) for a, t in target_of.items() if t <= a]
    if not back:
        return dict.fromkeys(LOOP_KEYS)
    end, start = max(back, key=lambda at: at[0] - at[1])
    body = [ins for ins in instructions if start <= ins[0] <= end]
    skipped = [(a, t) for a, t in target_of.items() if start <= a < t <= end]
    steady = [ins for ins in body if not any(a < ins[0] < t for a, t in skipped)]
    mufu = [a for a, op, _, _ in steady if op == "MUFU"]
    first_math, last_math = (min(mufu), max(mufu)) if mufu else (end, end)
    loads = [ins for ins in steady if ins[1] == "LDG"]
    waited = 0
    for address, op, mods, operands in loads:
        pending, _ = _writes_reads(op, mods, operands)
        for later in steady:
            if later[0] <= address or not pending:
                continue
            written, read = _writes_reads(*later[1:])
            if pending & read:
                waited += later[0] < last_math
                break
            pending -= written
    return {"loop": len(body), "steady": len(steady), "LDG<math": sum(a < first_math for a, *_ in loads),
            "LDG waited": waited, "LDGSTS": sum(1 for _, op, _, _ in body if op == "LDGSTS")}


def registers(cubin: bytes) -> int | None:
    """Registers per thread of the kernel in ``cubin`` (``cuobjdump -res-usage`` from the triton wheel), or None."""
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.access(tool, os.X_OK):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    match = re.search(r"REG:(\d+)", out)
    return int(match.group(1)) if match else None


def resident_programs(regs: int | None, warps: int) -> int | None:
    """Programs of ``warps`` warps an SM (sm_80/sm_90: 65536 registers, 64 warps) holds by registers alone."""
    if not regs:
        return None
    per_warp = -(-regs * 32 // 256) * 256
    return min(65536 // (per_warp * warps), 64 // warps)


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> int:
    """Print a markdown table of SASS counts per kernel; exit 1 if a kernel failed to compile."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability to compile for (80, 90)")
    parser.add_argument("--all-specs", action="store_true", help="every AOT spec, not the first per kernel")
    parser.add_argument("--kernels", nargs="*", default=[],
                        help="only these kernels (names, or families: adamw8bit sgd codec ...)")
    parser.add_argument("--match", action="append", default=[],
                        help="only specs with constexpr KEY=VALUE (specs without KEY pass)")
    parser.add_argument("--aligned-only", action="store_true", help="only the aligned variants")
    parser.add_argument("--slope", action="store_true", help="also compile with ROWS doubled: marginal cost")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 is set: unset it, this compiles the kernels")
    if any("=" not in m for m in args.match):
        parser.error(f"--match takes KEY=VALUE, got {args.match}")
    from lowmem_lightning.kernels.aot import iter_specs

    print(f"SASS for sm_{args.arch} (static counts; per elem = main / elements per thread):\n")
    print("| family | kernel | constexprs | aligned | " + " | ".join(COLUMNS) + " |")
    print("|---|---|---|---|" + "---|" * len(COLUMNS))
    seen, rows, failed = set(), [], 0
    for module_name, kernel, signature, constexprs, aligned, options in iter_specs(everything=True):
        name = getattr(kernel, "fn", kernel).__name__
        is_aligned = bool(aligned) or constexprs.get("ALIGNED") is True
        family = module_name.rsplit(".", 1)[-1]
        if not _selected(name, family, constexprs, args.kernels, args.match) or (args.aligned_only and not is_aligned):
            continue
        if (name, is_aligned) in seen and not args.all_specs:
            continue
        seen.add((name, is_aligned))
        shown = {k: v for k, v in _shown(constexprs).items() if k != "ALIGNED"}
        head = f"| {family} | {name} | {shown} | {'yes' if is_aligned else 'no'} |"
        try:
            row = measure(module_name, kernel, signature, constexprs, aligned, options, args.arch, args.slope)
        except Exception as err:  # one failure must not hide the other kernels' figures
            print(f"{head} FAILED: {type(err).__name__}: {err} |", flush=True)
            failed += 1
            continue
        print(head + " " + " | ".join(_cell(row[c]) for c in COLUMNS) + " |", flush=True)
        rows.append({"family": family, "kernel": name, "constexprs": {k: str(v) for k, v in shown.items()},
                     "aligned": is_aligned, **{k: v for k, v in row.items() if k != "ops"}})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
