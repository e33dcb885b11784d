"""The ``lowmem`` command for tests: :data:`LOWMEM`, the console script a real process runs (as users meet it), and
:func:`lowmem_in_process`, the same entry point (``lowmem_lightning.cli:main``) called in the test's process for the
cases where the process itself is not what is tested (no interpreter start-up and imports: ~5 s a call)."""

from __future__ import annotations

import contextlib
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
    the seed variables a fit's ``seed_everything`` sets are put back when the call returns
    (:func:`seed_environment_kept`)."""
    from lowmem_lightning.cli import main

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    if columns is not None:
        monkeypatch.setenv("COLUMNS", columns)
    capsys.readouterr()
    with seed_environment_kept():
        code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["lowmem", *args], code, out, err)


@contextlib.contextmanager
def seed_environment_kept():
    """Put ``PL_GLOBAL_SEED`` and ``PL_SEED_WORKERS`` back as they were when the block ends: a fit's
    ``seed_everything`` sets them in this process, and later launches from this pytest worker (a sampler's shuffle,
    a spawned rank) would inherit the seed."""
    before = {key: os.environ.get(key) for key in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")}
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
