#!/usr/bin/env bash
# Check the newest releases a user gets today: build a venv with the newest torch that PyPI serves (a CUDA build,
# which also runs on the CPU) and the newest of every other dependency ("pip install torch -e .[dev] accelerate",
# no pins), and run the default suite there as CI runs it (-n 2, TRITON_DEFAULT_FP_FUSION=1, this venv's
# `lowmem` first on PATH). Prints the versions, pytest's summary, then PASS or FAIL as its last line; exits 0 / 1.
# Not part of the default suite: ~5.5 GB venv, ~2 minutes to install, the suite's ~11 minutes on 2 cores.
# CI pins torch==2.13.0 (the CPU build on this machine's disk); this machine's pip is capped at torch<=2.14.1 by
# /etc/xdg/pip/constraints.txt, which this script lifts for its own pip only (PIP_CONSTRAINT=/dev/null).
#
#   bash benchmarks/newest_versions.sh                    # python3.11, venv in /tmp/newver, removed at the end
#   NEWVER_PYTHON=/root/.pyenv/versions/3.13.0/bin/python bash benchmarks/newest_versions.sh   # another Python
#   NEWVER_VENV=/tmp/v NEWVER_KEEP=1 bash benchmarks/newest_versions.sh                         # keep the venv
#   NEWVER_TESTS="tests/test_cli.py" bash benchmarks/newest_versions.sh                         # a subset
#   NEWVER_PRE=1 bash benchmarks/newest_versions.sh   # the release candidates too (pip --pre): what users get next,
#     within the ranges we and our dependencies state (jsonargparse 5.0rc is outside ours, tokenizers 1.0rc outside
#     transformers')
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${NEWVER_PYTHON:-/root/.pyenv/versions/3.11.7/bin/python}"
VENV="${NEWVER_VENV:-/tmp/newver}"
TESTS="${NEWVER_TESTS:-}"
PRE=()
[ "${NEWVER_PRE:-0}" = 1 ] && PRE=(--pre)

fail() { echo "FAIL: $*"; exit 1; }

[ -x "$PYTHON" ] || fail "NEWVER_PYTHON=$PYTHON is not an executable python"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV" || fail "could not create the venv $VENV with $PYTHON"
[ "${NEWVER_KEEP:-0}" = 1 ] || trap 'rm -rf "$VENV"' EXIT
export PIP_CONSTRAINT=/dev/null
"$VENV/bin/python" -m pip install -q -U pip >/dev/null 2>&1
# pip's own lines (this machine's extra indexes, setuptools' editable-install notice) go to $VENV/pip.log
"$VENV/bin/python" -m pip install -q -U "${PRE[@]}" torch -e "$ROOT[dev]" accelerate >"$VENV/pip.log" 2>&1 \
  || { tail -n 20 "$VENV/pip.log"; fail "pip install"; }
"$VENV/bin/python" -m pip list 2>/dev/null | grep -iE "^(torch|triton|lightning|transformers|peft|torchdata|torchmetrics|safetensors|jsonargparse|jinja2|rich|bitsandbytes|torchao|accelerate|trl|datasets|huggingface[-_]hub|tokenizers|numpy) "
"$VENV/bin/python" -c "import sys, torch; print('Python', sys.version.split()[0], '| torch', torch.__version__)"

cd "$ROOT" || fail "cd $ROOT"
export PATH="$VENV/bin:$PATH" TRITON_DEFAULT_FP_FUSION=1
# shellcheck disable=SC2086
"$VENV/bin/python" -m pytest -q -n 2 -p no:cacheprovider $TESTS 2>&1 | tail -n 15
[ "${PIPESTATUS[0]}" = 0 ] && echo PASS || fail "the suite fails with the newest releases"
