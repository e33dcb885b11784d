"""Every Triton kernel of the package compiles ahead of time for Ampere (sm_80) and Hopper (sm_90).

The interpreter used by the other kernel tests is more permissive than the compiler, so this test
runs ``python -m lowmem_lightning.kernels.aot`` in a subprocess with ``TRITON_INTERPRET`` unset.
"""

import os
import subprocess
import sys


def test_all_kernels_compile_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "lowmem_lightning.kernels.aot"], env=env, capture_output=True, text=True, timeout=900
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("sm_")]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert any(line.startswith("sm_80") for line in lines) and any(line.startswith("sm_90") for line in lines)
    assert all(line.endswith(": ok") for line in lines), "\n".join(lines)
