#!/usr/bin/env bash
# Check that the comparison peers are optional: build a venv as CI does (torch==2.13.0, "pip install -e .[dev]"),
# uninstall the peers (bitsandbytes, torchao, came-pytorch, flashoptim), and run the default suite there as CI runs
# it (-n 2, TRITON_DEFAULT_FP_FUSION=1, this venv's `lowmem` first on PATH): the tests that compare with a peer must
# skip, and nothing else may fail. Prints pytest's summary, then PASS or FAIL as its last line; exits 0 / 1.
# Not part of the default suite: a ~3 GB venv, ~2 minutes to install, the suite's ~12 minutes on 2 cores.
#
#   bash benchmarks/without_peers.sh                                              # venv in /tmp/nopeers, removed
#   NOPEERS_VENV=/tmp/v NOPEERS_KEEP=1 NOPEERS_TESTS="tests/test_peft_native.py" bash benchmarks/without_peers.sh
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${NOPEERS_PYTHON:-python3}"
VENV="${NOPEERS_VENV:-/tmp/nopeers}"
TESTS="${NOPEERS_TESTS:-}"
PEERS=(bitsandbytes torchao came-pytorch flashoptim)

fail() { echo "FAIL: $*"; exit 1; }

rm -rf "$VENV"
"$PYTHON" -m venv "$VENV" || fail "could not create the venv $VENV with $PYTHON"
[ "${NOPEERS_KEEP:-0}" = 1 ] || trap 'rm -rf "$VENV"' EXIT
"$VENV/bin/python" -m pip install -q -U pip >/dev/null 2>&1
# pip's own lines (this machine's extra indexes, setuptools' editable-install notice) go to $VENV/pip.log
{ "$VENV/bin/python" -m pip install -q torch==2.13.0 && "$VENV/bin/python" -m pip install -q -e "$ROOT[dev]" \
  && "$VENV/bin/python" -m pip uninstall -q -y "${PEERS[@]}"; } >"$VENV/pip.log" 2>&1 \
  || { tail -n 20 "$VENV/pip.log"; fail "pip install / uninstall"; }
for module in bitsandbytes torchao came_pytorch flashoptim; do
  "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$module') is not None)" \
    || fail "$module is still importable"
done
echo "peers uninstalled: ${PEERS[*]}"

cd "$ROOT" || fail "cd $ROOT"
export PATH="$VENV/bin:$PATH" TRITON_DEFAULT_FP_FUSION=1
# shellcheck disable=SC2086
"$VENV/bin/python" -m pytest -q -n 2 -p no:cacheprovider $TESTS 2>&1 | tail -n 15
[ "${PIPESTATUS[0]}" = 0 ] && echo PASS || fail "the suite fails without the peers"
