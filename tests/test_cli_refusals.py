"""Refusals before training, as a user meets them: a real ``lowmem`` process (``python -m
lowmem_lightning.cli``) in an empty directory exits with code 2 and one message, no traceback, and
leaves nothing on disk (no ``runs/``, no version directory, no ``config.yaml``).

One refusal is decided before ``fit`` starts (gradient release under gradient accumulation, checked on the
built Trainer), one inside ``fit`` after Lightning set the run up (Adafactor computing its own step
under the module's LR schedule, refused when the optimizer is built): the run's new directories are
removed then.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lowmem_lightning.cli import RECIPES_DIR

ENV = {**os.environ, "COLUMNS": "200"}


def _lowmem(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowmem_lightning.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=ENV)


def _assert_refused(proc: subprocess.CompletedProcess, cwd: Path, *needles: str) -> None:
    err = proc.stderr
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err and "Traceback" not in proc.stdout, err[-3000:]
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    left = sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*") if p.name != "recipe.yaml")
    assert left == [], left


def test_gradient_release_refusal_is_one_message_and_writes_nothing(tmp_path):
    proc = _lowmem(tmp_path, "fit", "--config", "tiny.yaml", "--step_in_backward", "true",
                   "--trainer.accumulate_grad_batches", "2")
    _assert_refused(proc, tmp_path, "step_in_backward=True", "set accumulate_grad_batches=1")


@pytest.mark.slow
def test_refusal_inside_fit_removes_what_the_run_created(tmp_path):
    text = (RECIPES_DIR / "tiny.yaml").read_text()
    text = text.replace("        optimizer: adamw_8bit\n        lr: 3.0e-3\n", "        optimizer: adafactor\n")
    assert "optimizer: adafactor" in text
    (tmp_path / "recipe.yaml").write_text(text)
    proc = _lowmem(tmp_path, "fit", "--config", "recipe.yaml")
    _assert_refused(proc, tmp_path, "adafactor", "LR scheduler")


def test_ckpt_path_last_without_checkpointing_is_refused(capsys, tmp_path, monkeypatch):
    from lowmem_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    code = main(["fit", "--config", "tiny.yaml", "--trainer.enable_checkpointing", "false", "--ckpt_path", "last"])
    err = capsys.readouterr().err
    assert code == 2 and "no ModelCheckpoint" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_misconfiguration_at_trainer_construction_is_a_short_error(capsys, tmp_path, monkeypatch):
    """Lightning's MisconfigurationException from the Trainer's constructor: exit 2, no traceback."""
    from lowmem_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    code = main(["fit", "--config", "tiny.yaml", "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                 "--trainer.enable_checkpointing", "false"])
    err = capsys.readouterr().err
    assert code == 2 and "enable_checkpointing=False" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


SUBCOMMAND_REFUSALS = {
    "unknown optimizer": (["--config", "tiny.yaml", "--optim", "bogus"], "Unknown optimizer 'bogus'"),
    "missing recipe": (["--config", "no_such_recipe.yaml"], "no_such_recipe.yaml"),
    "unknown key": (["--config", "tiny.yaml", "--trainer.bogus", "1"], "--trainer.bogus"),
    "--lr without an optimizer": (["--config", "tiny.yaml", "--trainer.callbacks", "[]", "--lr", "1e-3"],
                                  "--lr needs --optim NAME"),
}
"""Refusals made while the command line is read (the recipe, the parser, the ``--optim`` shortcut), each with
what its one message must say."""


@pytest.mark.parametrize("case", sorted(SUBCOMMAND_REFUSALS))
@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict", "estimate"])
def test_every_refusal_names_its_subcommand(subcommand, case, capsys, tmp_path, monkeypatch):
    """``lowmem estimate --optim bogus`` says ``lowmem estimate: error:``, not ``lowmem fit:`` (estimate parses
    the recipe as fit would); the same for each subcommand and each kind of refusal."""
    from lowmem_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    args, needle = SUBCOMMAND_REFUSALS[case]
    assert main([subcommand, *args]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"lowmem {subcommand}: error: "), errors
    assert needle in errors[0], errors[0]
