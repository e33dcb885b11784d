#!/usr/bin/env bash
# Rehearse the device session on the CPU, in the device's own software: Python 3.12, torch 2.11.0, triton 3.6.0,
# lightning 2.6.6, transformers 5.17.0, peft 0.21.0 (/work/.library/device/KINDS.md), with our extra wheels from
# .whl/ installed the way gpu_check.py's docstring installs them (pip --no-index --no-deps --target, PYTHONPATH).
# Every Triton kernel is compiled for sm_80/sm_90 by triton 3.6 (AOT specs, vector-access checks, SASS counts),
# the kernel tests run under that triton's interpreter, and gpu_check.py --dry-run runs every part the device
# commands use, so an incompatibility with the device's versions shows up here and not in the 15 device minutes.
#
#   bash benchmarks/device_rehearsal.sh /tmp/rehearsal             # builds (or reuses) /tmp/rehearsal/venv
#   REHEARSAL_QUICK=1 bash benchmarks/device_rehearsal.sh /tmp/rehearsal   # compile checks + dry-run only
#
# Needs network for the first build (torch 2.11 from PyPI is the CUDA build, ~530 MB, plus nvidia-* wheels: a few
# GB on disk; a CPU is enough to run it). Not part of the test-suite. Prints one verdict line per check (PASS/FAIL,
# seconds, log file) and exits 1 if any failed. Logs: DIR/logs/. Leaves /work/main/.venv alone.
set -uo pipefail
[ $# -ge 1 ] || { echo "usage: $0 DIR (the venv is built or reused in DIR/venv)" >&2; exit 2; }
DIR="$(mkdir -p "$1" && cd "$1" && pwd)"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python312() {  # PYTHON312 if set, else the first of python3.12 on PATH and pyenv's 3.12.x that runs as Python 3.12
  # (a pyenv shim is on PATH even where no 3.12 is selected, and fails: "pyenv: python3.12: command not found")
  local candidate candidates=("$(command -v python3.12)" /root/.pyenv/versions/3.12.*/bin/python3.12)
  [ -n "${PYTHON312:-}" ] && candidates=("$PYTHON312")
  for candidate in "${candidates[@]}"; do
    [ -n "$candidate" ] && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null \
      && { echo "$candidate"; return; }
  done
}
PY312="$(python312)"
PINS=(torch==2.11.0 triton==3.6.0 lightning==2.6.6 pytorch-lightning==2.6.6 transformers==5.17.0 peft==0.21.0
      accelerate==1.15.0 safetensors==0.8.0 numpy==2.3.5 matplotlib rich tensorboard pytest pytest-xdist pytest-timeout)
# numpy 2.3, not the image's 2.5.2: triton 3.6's interpreter turns a loaded loop bound into a Python int with
# int() of a 1-element array, which numpy >= 2.4 refuses (triton 3.9 squeezes it first). Only the interpreter runs
# (kernel tests, --dry-run) need it; the device compiles its kernels.
LOGS="$DIR/logs"
mkdir -p "$LOGS"
FAILED=0
SUMMARY=()

verdict() {  # verdict NAME SECONDS RC LOG: one line, kept for the summary
  local line
  if [ "$3" -eq 0 ]; then line="PASS $1 (${2}s)"; else line="FAIL $1 (rc=$3, ${2}s, log $4)"; FAILED=1; fi
  SUMMARY+=("$line")
  echo "$line"
}

check() {  # check NAME COMMAND...: run in the rehearsal environment, log to DIR/logs/NAME.log
  local name="$1" start rc
  shift
  start=$(date +%s)
  (cd "$ROOT" && "$@") > "$LOGS/$name.log" 2>&1
  rc=$?
  verdict "$name" "$(( $(date +%s) - start ))" "$rc" "$LOGS/$name.log"
}

# 1. the venv (reused when its pins are already there)
if [ ! -x "$DIR/venv/bin/python" ]; then
  [ -n "$PY312" ] || { echo "no Python 3.12 that runs (set PYTHON312=/path/to/python3.12)" >&2; exit 2; }
  "$PY312" -m venv "$DIR/venv" || exit 2
fi
VPY="$DIR/venv/bin/python"
if ! "$VPY" - "${PINS[@]}" <<'EOF' 2>/dev/null; then
import importlib.metadata as md, sys
def has(pin):
    name, _, want = pin.partition("==")
    try:
        return md.version(name).split("+")[0] == want if want else bool(md.version(name))
    except md.PackageNotFoundError:
        return False
sys.exit(not all(map(has, sys.argv[1:])))
EOF
  echo "installing ${PINS[*]} into $DIR/venv (log $LOGS/pip.log)"
  "$VPY" -m pip install "${PINS[@]}" > "$LOGS/pip.log" 2>&1 || { echo "FAIL pip install (log $LOGS/pip.log)"; exit 1; }
fi

# 2. our wheels, the device way (gpu_check.py's install line), and our package from the checkout (no copy)
[ -d "$ROOT/.whl" ] && ls "$ROOT"/.whl/*.whl > /dev/null 2>&1 || (cd "$ROOT" && bash benchmarks/device_wheels.sh) \
  || { echo "FAIL device_wheels.sh" >&2; exit 1; }
rm -rf "$DIR/site"
"$VPY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$DIR/site" \
  "$ROOT"/.whl/*.whl > "$LOGS/wheels.log" 2>&1 || { echo "FAIL .whl install (log $LOGS/wheels.log)"; exit 1; }
export PYTHONPATH="$DIR/site:$ROOT"
export PYTHONDONTWRITEBYTECODE=1 TRITON_CACHE_DIR="$DIR/triton-cache" OMP_NUM_THREADS=1
unset TRITON_INTERPRET
VERSIONS=$("$VPY" - <<'EOF'
import importlib.metadata as md, sys
names = ["torch", "triton", "lightning", "transformers", "peft", "accelerate", "safetensors", "numpy", "bitsandbytes",
         "jsonargparse", "torchdata", "torchao", "flashoptim", "came-pytorch"]
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "missing"
print(f"python {sys.version.split()[0]} " + " ".join(f"{n} {version(n)}" for n in names))
EOF
)
echo "versions: $VERSIONS"

# 3. compile checks (TRITON_INTERPRET unset): every AOT spec for sm_80/sm_90, vector accesses, SASS
check aot "$VPY" -m lowmem_lightning.kernels.aot --json "$LOGS/aot.json"
check aot_tests "$VPY" -m pytest -q -p no:cacheprovider tests/test_kernels_aot.py tests/test_lion_ademamix_aot.py \
  tests/test_kernels_sass.py tests/test_kernels_sass_factored.py
check aot_tests_adamw4bit "$VPY" -m pytest -q -p no:cacheprovider tests/test_adamw4bit.py -k compiles_for_sm80
check sass_counts "$VPY" benchmarks/sass_counts.py --aligned-only --json "$LOGS/sass_counts.json"

# 4. the kernel tests under triton 3.6's interpreter (conftest sets TRITON_INTERPRET=1), file by file
if [ -z "${REHEARSAL_QUICK:-}" ]; then
  for f in test_codec test_rounding test_bf16_rounding test_adamw8bit test_persistent_kernel test_adamw4bit test_sgd \
           test_adafactor test_came test_factored_batched test_kernels_aligned test_kernels_dispatch test_nf4 \
           test_linear4bit test_lion test_ademamix test_lion_ademamix_integration test_muon test_overflow_guard; do
    [ -f "$ROOT/tests/$f.py" ] && check "interp_$f" "$VPY" -m pytest -q -p no:cacheprovider "tests/$f.py"
  done
fi

# 5. gpu_check.py --dry-run, every part the device commands use, and the -m gpu tests' collection
for part in kernels step_time paged release gpu_tests sync full_ft_7b qlora_7b long_run packing; do
  check "dry_run_$part" "$VPY" benchmarks/gpu_check.py --dry-run --budget-scale 4 --parts "$part" --results "$LOGS/dry_run_$part.md" \
    --out-dir "$DIR/dry_run_$part"
done
check collect_gpu "$VPY" -m pytest -q -p no:cacheprovider --collect-only -m gpu tests

echo "---- device rehearsal: $VERSIONS"
printf '%s\n' "${SUMMARY[@]}"
[ "$FAILED" -eq 0 ] && echo "verdict: PASS (all ${#SUMMARY[@]} checks)" || echo "verdict: FAIL"
exit "$FAILED"
