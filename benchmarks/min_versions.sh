#!/usr/bin/env bash
# Check that the dependency floors in pyproject.toml are true: build a venv with every dependency at its floor
# (each "name>=X" of [project].dependencies installed as "name==X"), install lowmem-lightning into it without deps,
# and run a representative subset of the suite there (single process, TRITON_INTERPRET=1 as tests/conftest.py sets).
# Prints PASS or FAIL as its last line and exits 0 / 1. Not part of the default suite (builds a ~5.5 GB venv:
# PyPI's torch wheels are CUDA builds, ~3 minutes to install).
#
#   bash benchmarks/min_versions.sh                       # python3.11, venv in /tmp/minver, removed at the end
#   MINVER_PYTHON=/root/.pyenv/versions/3.10.13/bin/python bash benchmarks/min_versions.sh   # requires-python floor
#   MINVER_VENV=/tmp/v MINVER_KEEP=1 bash benchmarks/min_versions.sh                            # keep the venv
#   MINVER_TESTS="tests/test_cli.py" bash benchmarks/min_versions.sh                            # another subset
#   MINVER_OVERRIDE="transformers==5.20.2" bash benchmarks/min_versions.sh   # one dependency at another version
#     (space-separated pins replace the floors of those names; pip resolves what they need beyond our dependencies)
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${MINVER_PYTHON:-/root/.pyenv/versions/3.11.7/bin/python}"
VENV="${MINVER_VENV:-/tmp/minver}"
TESTS="${MINVER_TESTS:-tests/test_adamw8bit.py tests/test_callback.py tests/test_causal_lm.py tests/test_cli.py
  tests/test_data.py tests/test_peft_lora.py tests/test_fsdp2.py tests/test_kernels_dispatch.py tests/test_added_tokens.py
  tests/test_kernels_aot.py tests/test_nf4_experts.py tests/test_jsonargparse_range.py tests/test_unknown_model_type.py}"
# aot: every Triton kernel compiles for sm_80/sm_90 with the floor triton (no GPU needed); nf4_experts: MoE experts in
# NF4 (transformers' experts interface with has_gate from 5.3; save_pretrained of NF4 experts from 5.21);
# jsonargparse_range: our jsonargparse range inside the floor Lightning's; unknown_model_type: the floor transformers'
# model types

fail() { echo "FAIL: $*"; exit 1; }

[ -x "$PYTHON" ] || fail "MINVER_PYTHON=$PYTHON is not an executable python"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV" || fail "could not create the venv $VENV with $PYTHON"
[ "${MINVER_KEEP:-0}" = 1 ] || trap 'rm -rf "$VENV"' EXIT
"$VENV/bin/python" -m pip install -q -U pip tomli >/dev/null 2>&1  # tomli: Python 3.10 has no tomllib
# pyproject's ">=" floors as "==" pins, one per line
mapfile -t PINS < <("$VENV/bin/python" - "$ROOT/pyproject.toml" <<'EOF'
import re, sys
try:
    import tomllib
except ImportError:
    import tomli as tomllib
for dep in tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]:
    print(re.sub(r">=", "==", dep.split(";")[0].split(",")[0].strip()))
EOF
)
[ "${#PINS[@]}" -gt 0 ] || fail "no dependencies read from $ROOT/pyproject.toml"
for pin in ${MINVER_OVERRIDE:-}; do
  name="${pin%%[=<>!~]*}"
  found=0
  for i in "${!PINS[@]}"; do
    if [ "${PINS[$i]%%[=<>!~\[]*}" = "$name" ]; then PINS[$i]="$pin"; found=1; fi
  done
  [ "$found" = 1 ] || fail "MINVER_OVERRIDE=$pin names no dependency of pyproject.toml"
done
echo "floors: ${PINS[*]}"
"$VENV/bin/python" -m pip install -q "${PINS[@]}" pytest pytest-xdist || fail "pip cannot install the floors together"
"$VENV/bin/python" -m pip install -q --no-deps -e "$ROOT" >/dev/null || fail "pip install -e $ROOT --no-deps"
"$VENV/bin/python" -m pip list 2>/dev/null | grep -iE "^(torch|triton|lightning|transformers|peft|torchdata|torchmetrics|safetensors|jsonargparse|jinja2|rich) "

cd "$ROOT" || fail "cd $ROOT"
# shellcheck disable=SC2086
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -rs $TESTS && echo PASS || fail "the subset fails at the floors"
