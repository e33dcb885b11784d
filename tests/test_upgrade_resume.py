"""Upgrading the library mid-project loses nothing: a checkpoint the previous release point (commit ``ad090de``) wrote
with ``lowmem fit`` resumes under the current code exactly as the current code's own uninterrupted run goes on
(params and optimizer state bit for bit), for 8-bit AdamW, CAME with int8 momentum, 8-bit Muon and Adafactor, from
a mid-epoch checkpoint and from one written at an epoch's end (the sampler's state and the epoch-end alignment
changed since). The old code runs from a ``git worktree`` of that commit in ``tmp_path``; without ``git`` or the
commit (a shallow clone) the test is skipped, saying why."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lowmem_lightning.cli import RECIPES_DIR

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
RELEASE_POINT = "ad090de"
EPOCH_BATCHES = 6  # limit_train_batches: an epoch of 6 steps, so its end comes quickly


def old_worktree(tmp_path: Path) -> Path:
    """A detached worktree of :data:`RELEASE_POINT` in ``tmp_path`` (skips the test without git or the commit)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed: the old release's code cannot be checked out")
    known = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{RELEASE_POINT}^{{commit}}"],
                           capture_output=True)
    if known.returncode != 0:
        pytest.skip(f"commit {RELEASE_POINT} is not in this clone (shallow?): git fetch --unshallow to run this test")
    path = tmp_path / "old-lowmem"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), RELEASE_POINT],
                   check=True, capture_output=True)
    return path


@pytest.fixture
def old_code(tmp_path):
    path = old_worktree(tmp_path)
    yield path
    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)], capture_output=True)


def recipe(folder: Path, optimizer: str, kwargs: dict, every: int) -> Path:
    """``folder/cfg.yaml``: ``tiny.yaml`` with ``optimizer`` (``kwargs``), a constant lr after the warmup (so a run
    stopped early and one run straight share their schedule), epochs of :data:`EPOCH_BATCHES` steps, no validation,
    and checkpoints every ``every`` steps into ``folder/steps`` (the README's entry)."""
    cfg = yaml.safe_load((RECIPES_DIR / "tiny.yaml").read_text())
    cfg["trainer"].update({"limit_train_batches": EPOCH_BATCHES, "limit_val_batches": 0, "logger": False,
                           "enable_progress_bar": False, "enable_model_summary": False,
                           "default_root_dir": str(folder)})
    callback = cfg["trainer"]["callbacks"][0]["init_args"]
    callback.update({"optimizer": optimizer, "optimizer_kwargs": kwargs, "plot": False})
    cfg["trainer"]["callbacks"] += [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(folder / "steps"), "filename": "{step}", "every_n_train_steps": every,
                       "save_top_k": -1}}]
    cfg["model"]["init_args"]["scheduler"] = None
    folder.mkdir(parents=True)
    (folder / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return folder / "cfg.yaml"


def lowmem_fit(code: Path, folder: Path, steps: int, *extra: str) -> None:
    """``python -m lowmem_lightning.cli fit`` of ``folder``'s recipe to ``steps`` steps on the code in ``code`` (run
    from ``folder``, so that ``code`` comes first on the path), asserted to exit 0."""
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1", "LOWMEM_CPU_COMPILE": "0",
           "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "lowmem_lightning.cli", "fit", "--config", "cfg.yaml",
                           "--trainer.max_steps", str(steps), *extra],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def tensors(obj, prefix: str = ""):
    """``(path, value)`` of every tensor and plain value in a checkpoint's nested dicts and lists."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from tensors(value, f"{prefix}/{key}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from tensors(value, f"{prefix}/{i}")
    else:
        yield prefix, obj


def assert_same_training_state(resumed: Path, straight: Path) -> None:
    """The params and the optimizer state of two checkpoints are equal bit for bit (hyperparameters included)."""
    a, b = (torch.load(p, map_location="cpu", weights_only=False) for p in (resumed, straight))
    for key in ("state_dict", "optimizer_states"):
        left, right = dict(tensors(a[key])), dict(tensors(b[key]))
        assert left.keys() == right.keys(), f"{key}: {sorted(set(left) ^ set(right))}"
        for name, value in left.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, right[name]), f"{key}{name}: max |diff| " \
                    f"{(value.double() - right[name].double()).abs().max().item():.3g}"
            else:
                assert value == right[name], f"{key}{name}: {value!r} != {right[name]!r}"


CASES = [  # (optimizer, its kwargs, where the old run stops)
    ("adamw_8bit", {}, "mid-epoch"),
    ("came", {"momentum_dtype": "int8"}, "epoch-end"),
    ("muon_8bit", {}, "mid-epoch"),
    ("adafactor", {"relative_step": False, "scale_parameter": False}, "epoch-end"),
]


@pytest.mark.parametrize(("optimizer", "kwargs", "stop"), CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_a_checkpoint_of_the_previous_release_resumes_as_one_current_run(old_code, tmp_path, optimizer, kwargs, stop):
    first, last = (4, 8) if stop == "mid-epoch" else (EPOCH_BATCHES, EPOCH_BATCHES + 3)
    old = tmp_path / "old"
    recipe(old, optimizer, kwargs, every=first)
    lowmem_fit(old_code, old, first)
    saved = old / "steps" / f"step={first}.ckpt"  # epoch-end: written on the epoch's last batch, as max_steps ends

    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    for folder in (resumed, straight):
        recipe(folder, optimizer, kwargs, every=last)
    lowmem_fit(REPO, resumed, last, "--ckpt_path", str(saved))
    lowmem_fit(REPO, straight, last)
    assert_same_training_state(resumed / "steps" / f"step={last}.ckpt", straight / "steps" / f"step={last}.ckpt")
