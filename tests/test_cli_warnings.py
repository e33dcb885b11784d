"""The package's own warnings: real ``warnings`` of category :class:`~lowmem_lightning.LowMemWarning` for Python
users (filterable by category), one ``lowmem: warning: MESSAGE`` line each in the ``lowmem`` command."""

from __future__ import annotations

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from launched_scripts import launch_env

import lowmem_lightning
from lowmem_lightning import LowMemWarning
from lowmem_lightning.callbacks.release import DEFAULT_BUCKET_BYTES, GradientRelease
from lowmem_lightning.cli.messages import our_warnings_in_one_line
from lowmem_lightning.optim import build_optimizer

PACKAGE = Path(lowmem_lightning.__file__).parent


def _one_bucket_release() -> None:
    """Gradient release over a small model whose gradients all fit in the default bucket (it warns)."""
    model = torch.nn.Linear(64, 64)
    GradientRelease(build_optimizer("adamw_8bit", model.parameters(), lr=1e-3), bucket_bytes=DEFAULT_BUCKET_BYTES)


def test_our_warning_is_a_lowmem_warning_a_user_can_filter():
    with pytest.warns(LowMemWarning, match="fit in one bucket"):
        _one_bucket_release()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=LowMemWarning)
        _one_bucket_release()
    assert caught == []


def _warning_calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in ("warn", "rank_zero_warn", "warn_explicit"):
                yield node


def test_every_warning_the_package_raises_is_a_lowmem_warning():
    """Each ``warnings.warn`` / ``rank_zero_warn`` in lowmem_lightning/ names LowMemWarning as its category (so the
    command shows it in one line and a user filters all of ours by one category)."""
    missing = []
    for path in PACKAGE.rglob("*.py"):
        for call in _warning_calls(ast.parse(path.read_text(), str(path))):
            named = [*call.args[1:2], *(k.value for k in call.keywords if k.arg == "category")]
            if not any(isinstance(n, ast.Name) and n.id == "LowMemWarning" for n in named):
                missing.append(f"{path.relative_to(PACKAGE)}:{call.lineno}")
    assert missing == []


def test_one_line_in_the_command_other_warnings_unchanged():
    """While installed, ours format as one ``lowmem: warning:`` line; others as before; restore puts it back."""
    before = warnings.formatwarning
    restore = our_warnings_in_one_line()
    try:
        ours = warnings.formatwarning("ours\n  - detail", LowMemWarning, "release.py", 150, "source line")
        theirs = warnings.formatwarning("theirs", UserWarning, "x.py", 3, "source line")
    finally:
        restore()
    assert ours == "lowmem: warning: ours\n  - detail\n"
    assert theirs == before("theirs", UserWarning, "x.py", 3, "source line")
    assert warnings.formatwarning is before


def test_lowmem_fit_prints_the_one_bucket_warning_as_one_line(tmp_path):
    """A real ``lowmem fit`` with gradient release on the tiny recipe (all gradients in one 25 MiB bucket)."""
    proc = subprocess.run(
        [sys.executable, "-m", "lowmem_lightning.cli", "fit", "--config", "tiny.yaml", "--step_in_backward", "true",
         "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_checkpointing", "false", "--trainer.default_root_dir", str(tmp_path),
         "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.callbacks.plot", "false"],
        cwd=tmp_path, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [line for line in proc.stderr.splitlines() if "fit in one bucket" in line]
    assert len(said) == 1 and said[0].startswith("lowmem: warning: Gradient release with bucket_bytes="), proc.stderr
    assert "release.py" not in proc.stderr and "UserWarning" not in proc.stderr, proc.stderr
