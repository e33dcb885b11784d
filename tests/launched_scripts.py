"""Run a test's script in a fresh Python process, as a user's ``python train.py`` runs: Lightning or Fabric
launches the other ranks from it (gloo on CPU), and each rank saves what the test compares.

:func:`run_script` runs it to the end and fails the test with the tail of its stderr unless it exits 0;
:func:`launch_env` is the environment it gets (for a test that starts the process itself).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    """A TCP port free right now (the OS picks it), for a rendezvous that needs ``MASTER_PORT``."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_env(*, port: bool = False, quiet: bool = False, interpret: bool = True) -> dict[str, str]:
    """This process's environment for a launched script: rendezvous on 127.0.0.1 (``port``: on a free
    ``MASTER_PORT``, else the launcher picks one), one intra-op thread, the CPU path uncompiled
    (``LOWMEM_CPU_COMPILE=0``), ``quiet``: Python warnings off. ``PL_GLOBAL_SEED`` is dropped: left by an earlier
    ``seed_everything`` in this pytest worker, it would reseed the script's sampler shuffle. ``interpret=False``
    drops ``TRITON_INTERPRET`` (on CUDA the compiled kernels run)."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1", "LOWMEM_CPU_COMPILE": "0"}
    if port:
        env["MASTER_PORT"] = str(free_port())
    if quiet:
        env["PYTHONWARNINGS"] = "ignore"
    env.pop("PL_GLOBAL_SEED", None)
    if not interpret:
        env.pop("TRITON_INTERPRET", None)
    return env


def run_script(script: Path, *args: str, cwd: Path, timeout: float = 600, tail: int = 4000,
               **env_options: bool) -> subprocess.CompletedProcess:
    """Run ``python script *args`` in ``cwd`` with :func:`launch_env` (``env_options``: its keywords) to the end
    (``timeout`` seconds at most); the test fails with the last ``tail`` characters of its stderr unless it exits
    0. Returns the finished process (stdout and stderr as text)."""
    proc = subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=launch_env(**env_options),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-tail:]
    return proc
