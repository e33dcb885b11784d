"""The ``lowmem`` command for tests: :data:`LOWMEM`, the console script a real process runs (as users meet it), and
:func:`lowmem_in_process`, the same entry point (``lowmem_lightning.cli:main``) called in the test's process for the
cases where the process itself is not what is tested (no interpreter start-up and imports: ~5 s a call)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import warnings
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


class _StderrHandler(logging.StreamHandler):
    """A stream handler writing to ``sys.stderr`` as it is when a record is written (capsys replaces it per test
    phase), as Lightning's handler in a process writes to the process's stderr."""

    @property
    def stream(self):
        """The current ``sys.stderr``."""
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def stderr_as_in_a_process(monkeypatch) -> None:
    """Until ``monkeypatch`` undoes it, ``sys.stderr`` (capsys's, in a test) gets what a ``lowmem`` process prints
    there, for :func:`lowmem_in_process` calls whose printed lines are checked: Lightning's loggers
    (``lightning.pytorch``, ``lightning.fabric``: Lightning's set-up lines and the package's ``rank_zero_info``
    notes) write through a stream handler of their own at INFO and do not propagate, as Lightning sets them up in a
    process where nothing configured logging (under pytest they propagate to its log capture instead), and a warning
    the filters let through is printed by ``warnings.showwarning`` (pytest records it instead)."""
    from lowmem_lightning.cli.held_logs import LIGHTNING_LOGGERS

    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        monkeypatch.setattr(logger, "handlers", [_StderrHandler()])
        monkeypatch.setattr(logger, "propagate", False)
        monkeypatch.setattr(logger, "level", logging.INFO)

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    monkeypatch.setattr(warnings, "showwarning", show)


QLORA_TWO_STEPS = ["--trainer.max_steps", "2", "--trainer.accumulate_grad_batches", "1", "--trainer.val_check_interval",
                   "2", "--trainer.limit_val_batches", "1", "--data.init_args.seq_len", "32",
                   "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
"""``lowmem fit --config qlora_7b.yaml`` options for two steps of 32 tokens on a tiny checkpoint, validated once."""


def run_qlora_recipe(model: Path, cwd: Path, subcommand: str = "fit", *args: str) -> subprocess.CompletedProcess:
    """A real ``lowmem SUBCOMMAND --config qlora_7b.yaml --model.model_name_or_path MODEL`` process in ``cwd``
    (``fit``: :data:`QLORA_TWO_STEPS`; then ``args``), 200 columns wide, its output captured."""
    steps = QLORA_TWO_STEPS if subcommand == "fit" else []
    command = [LOWMEM, subcommand, "--config", "qlora_7b.yaml", "--model.model_name_or_path", str(model), *steps, *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})
