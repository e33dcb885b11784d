#!/usr/bin/env bash
# Download the Python wheels the GPU machine lacks into .whl/ (git-ignored through .git/info/exclude), for
# `benchmarks/gpu_check.py` on the device (Python 3.12, x86_64; its image has torch 2.11, triton 3.6.0,
# lightning 2.6.6, transformers, peft, accelerate, matplotlib, safetensors, rich: /work/.library/device/KINDS.md).
#
# Missing there and carried: our package's jsonargparse[signatures] (+ docstring-parser, typeshed-client) and
# torchdata; bitsandbytes for the peer rows (qlora_7b, long_run, step_time); torchao (3.4 MB: its low-bit
# optimizers are Python; the first H200 run had 0.18.0 beside torch 2.11) and came-pytorch (6 kB) for the
# step_time peer rows; flashoptim (pure Python, 46 kB: Triton kernels compiled on the device; needs torch >= 2.6
# and triton >= 3.0, which the image has) for the FlashOptim rows of step_time and release. No triton wheel: the
# image's triton 3.6.0 is the one its torch 2.11 was built against, and our kernels ran under it (RESULTS.md,
# 2026-12-04).
#
#   bash benchmarks/device_wheels.sh          # then carry ".whl" in the device run (gpu_check.py docstring)
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
rm -rf .whl
WHEELS=(
  bitsandbytes==0.50.2
  jsonargparse==4.53.0
  docstring-parser==0.18.0
  typeshed-client==2.15.0
  torchdata==0.11.0
  flashoptim==0.1.4
  torchao==0.18.0
  came-pytorch==0.1.3
)
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${WHEELS[@]}"
ls -l .whl
total=$(du -sm .whl | cut -f1)
echo ".whl: ${total} MiB (the device run carries at most 64 MiB, working tree included)"
[ "$total" -lt 56 ] || { echo "too large to carry with the working tree" >&2; exit 1; }
