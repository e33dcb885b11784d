"""The ``lowmem`` command for tests: :data:`LOWMEM`, the console script a real process runs (as users meet it), and
:func:`lowmem_in_process`, the same entry point (``lowmem_lightning.cli:main``) called in the test's process for the
cases where the process itself is not what is tested (no interpreter start-up and imports: ~5 s a call)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

LOWMEM = shutil.which("lowmem") or str(Path(sys.executable).parent / "lowmem")
"""The ``lowmem`` console script of this environment."""


def lowmem_in_process(capsys, monkeypatch, cwd: Path, *args: str, columns: str | None = None
                      ) -> subprocess.CompletedProcess:
    """``lowmem ARGS`` run in ``cwd`` by the console script's entry point in this process (``sys.argv`` as a bare
    ``lowmem``; ``columns``: the terminal width ``COLUMNS`` says), its exit code and output as a
    :class:`subprocess.CompletedProcess`. ``monkeypatch`` puts the directory and environment back after the test;
    ``PL_GLOBAL_SEED``, which a fit's ``seed_everything`` sets, is put back as it was when the call returns."""
    from lowmem_lightning.cli import main

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    if columns is not None:
        monkeypatch.setenv("COLUMNS", columns)
    capsys.readouterr()
    seed = os.environ.get("PL_GLOBAL_SEED")
    try:
        code = main(list(args))
    finally:  # a fit's seed_everything must not reseed later launches from this worker
        if seed is None:
            os.environ.pop("PL_GLOBAL_SEED", None)
        else:
            os.environ["PL_GLOBAL_SEED"] = seed
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["lowmem", *args], code, out, err)
