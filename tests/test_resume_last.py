"""``--ckpt_path last`` serves the first start and every restart of a preemptible job, and the README's
``ModelCheckpoint`` entry works pasted into every bundled recipe.

The end-to-end test (``-m slow``: two ``lowmem`` processes, 64 s on the loaded 2-core machine) is a
real ``lowmem fit`` process on the tiny recipe (with the README's entry
pasted in, every 10 steps instead of 100): started with ``--ckpt_path last`` (no checkpoint yet: one
line, fresh start), killed with SIGKILL as soon as a checkpoint file is complete, restarted with the
identical command: it resumes from that checkpoint in a new ``version_N`` and its first logged step
continues the count.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lowmem_lightning.cli import RECIPES_DIR, bundled_recipes, parse_fit_config
from lowmem_lightning.cli.last import checkpoint_dirs, checkpoint_step, newest_checkpoint

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_checkpoint_entry() -> str:
    """The YAML block of the README's "Resume and preemption" section (a ``trainer.callbacks`` entry)."""
    section = README.read_text().split("## Resume and preemption", 1)[1]
    return re.search(r"```yaml\n(.*?)```", section, re.S).group(1)


def paste_into(recipe_text: str, entry: str) -> str:
    """The recipe with ``entry`` added to its ``trainer.callbacks`` list, as a user pastes it."""
    assert "\n  callbacks:\n" in recipe_text
    return recipe_text.replace("\n  callbacks:\n", "\n  callbacks:\n" + entry, 1)


# ------------------------------------------------------------------ the README's entry in every recipe
@pytest.mark.parametrize("recipe", bundled_recipes())
def test_readme_checkpoint_entry_pasted_into_every_recipe_builds_a_trainer(recipe, tmp_path):
    from lightning.pytorch.cli import instantiate_class

    path = tmp_path / recipe
    path.write_text(paste_into((RECIPES_DIR / recipe).read_text(), readme_checkpoint_entry()))
    cfg = parse_fit_config(["--config", str(path)])
    callbacks = [instantiate_class((), c.as_dict()) for c in cfg.trainer.callbacks]
    assert any(isinstance(c, ModelCheckpoint) and c._every_n_train_steps == 100 for c in callbacks)
    # what raised MisconfigurationException when the recipes set enable_checkpointing: false
    trainer = L.Trainer(callbacks=callbacks, enable_checkpointing=cfg.trainer.enable_checkpointing, logger=False,
                        accelerator="cpu", devices=1, default_root_dir=tmp_path)
    assert trainer.checkpoint_callbacks


# ------------------------------------------------------------------ choosing the checkpoint
def _save(path: Path, step: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step, "state_dict": {}}, path)


def test_newest_checkpoint_by_step_across_versions_skipping_cut_files(tmp_path):
    _save(tmp_path / "logs/version_0/checkpoints/step=100.ckpt", 100)
    _save(tmp_path / "logs/version_0/checkpoints/epoch=0-step=150.ckpt", 150)
    _save(tmp_path / "logs/version_1/checkpoints/step=90.ckpt", 90)  # a newer file of a lower step
    _save(tmp_path / "logs/version_1/checkpoints/last.ckpt", 120)  # no step in the name: read inside
    cut = tmp_path / "logs/version_1/checkpoints/step=200.ckpt"
    data = (tmp_path / "logs/version_0/checkpoints/step=100.ckpt").read_bytes()
    cut.write_bytes(data[: len(data) // 2])  # killed while writing
    assert not zipfile.is_zipfile(cut)
    assert checkpoint_step(tmp_path / "logs/version_1/checkpoints/last.ckpt") == 120
    found, count = newest_checkpoint([str(tmp_path / "logs" / "*" / "checkpoints")])
    assert (Path(found.path).name, found.step, count) == ("epoch=0-step=150.ckpt", 150, 4)
    assert newest_checkpoint([str(tmp_path / "nothing")]) == (None, 0)


def test_checkpoint_dirs_are_the_dirpath_or_every_version_of_the_logger(tmp_path):
    logger = CSVLogger(save_dir=str(tmp_path / "runs"), name="tiny")
    trainer = L.Trainer(logger=logger, callbacks=[ModelCheckpoint(), ModelCheckpoint(dirpath=str(tmp_path / "c"),
                                                                                     every_n_train_steps=5)],
                        accelerator="cpu", devices=1, default_root_dir=tmp_path)
    assert checkpoint_dirs(trainer) == [os.path.join(str(tmp_path / "runs" / "tiny"), "*", "checkpoints"),
                                        str(tmp_path / "c")]
    trainer = L.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu", devices=1)
    assert checkpoint_dirs(trainer) == []
    for version, folder in ((3, "version_3"), ("ablation[1]", "ablation[[]1]")):  # chosen: that run's folder only
        logger = CSVLogger(save_dir=str(tmp_path / "runs"), name="tiny", version=version)
        trainer = L.Trainer(logger=logger, accelerator="cpu", devices=1, default_root_dir=tmp_path)
        assert checkpoint_dirs(trainer, version) == [os.path.join(str(tmp_path / "runs" / "tiny"), folder,
                                                                  "checkpoints")]


def test_a_chosen_logger_version_resumes_only_its_own_checkpoints(tmp_path, monkeypatch, capsys):
    """``lowmem fit --trainer.logger.init_args.version kill --ckpt_path last``: the restart resumes that run's
    newest checkpoint, not a newer one of another version under the same name (before: a finished version_0 at
    step 6 was "resumed" by a run of 6 steps, which trained 0 steps)."""
    from lowmem_lightning.cli import main

    entry = readme_checkpoint_entry().replace("every_n_train_steps: 100", "every_n_train_steps: 2")
    (tmp_path / "recipe.yaml").write_text(paste_into((RECIPES_DIR / "tiny.yaml").read_text(), entry))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    args = [a if a != "30" else "{steps}" for a in _command(tmp_path)[3:]]
    assert main([a.format(steps=6) for a in args]) == 0  # version_0, newest step 6
    capsys.readouterr()
    chosen = args + ["--trainer.logger.init_args.version", "kill"]
    assert main([a.format(steps=4) for a in chosen]) == 0
    assert "--ckpt_path last: no checkpoint yet in runs/tiny/kill/checkpoints" in capsys.readouterr().err
    assert main([a.format(steps=6) for a in chosen]) == 0
    assert "resuming from runs/tiny/kill/checkpoints/step=4.ckpt (step 4, the newest of 2" in capsys.readouterr().err
    assert _train_steps(tmp_path / "runs/tiny/kill/metrics.csv")[-2:] == [4, 5]


# ------------------------------------------------------------------ a real preemptible job
def _command(cwd: Path) -> list[str]:
    return [sys.executable, "-m", "lowmem_lightning.cli", "fit", "--config", "recipe.yaml", "--ckpt_path", "last",
            "--trainer.max_steps", "30", "--trainer.limit_val_batches", "0", "--data.init_args.seq_len", "32",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def _train_steps(metrics: Path) -> list[int]:
    return [int(r["step"]) for r in csv.DictReader(metrics.open()) if r.get("train_loss")]


def test_second_start_resumes_from_the_newest_step_in_process(tmp_path, monkeypatch, capsys, recwarn):
    """The same flow in one process (default suite): a first fit checkpoints, the next continues."""
    from lowmem_lightning.cli import main

    entry = readme_checkpoint_entry().replace("every_n_train_steps: 100", "every_n_train_steps: 3")
    (tmp_path / "recipe.yaml").write_text(paste_into((RECIPES_DIR / "tiny.yaml").read_text(), entry))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    args = [a if a != "30" else "{steps}" for a in _command(tmp_path)[3:]]  # lowmem's own arguments
    assert main([a.format(steps=6) for a in args]) == 0
    assert "no checkpoint yet" in capsys.readouterr().err
    assert main([a.format(steps=8) for a in args]) == 0
    err = capsys.readouterr().err
    assert "resuming from runs/tiny/version_0/checkpoints/step=6.ckpt (step 6, the newest of 2" in err
    assert _train_steps(tmp_path / "runs/tiny/version_1/metrics.csv") == [6, 7]
    # ModelCheckpoint's "dirpath has changed" note says nothing new when the resume comes from another version
    assert not [w for w in recwarn if "dirpath has changed" in str(w.message)], [str(w.message) for w in recwarn]


@pytest.mark.slow
def test_sigkilled_job_resumes_with_the_identical_command(tmp_path):
    entry = readme_checkpoint_entry().replace("every_n_train_steps: 100", "every_n_train_steps: 10")
    (tmp_path / "recipe.yaml").write_text(paste_into((RECIPES_DIR / "tiny.yaml").read_text(), entry))
    env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(_command(tmp_path), cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env)
    ckpt = tmp_path / "runs/tiny/version_0/checkpoints/step=10.ckpt"
    deadline = time.monotonic() + 240
    while not (ckpt.is_file() and zipfile.is_zipfile(ckpt)) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    log.close()
    first_out = (tmp_path / "first.log").read_text()
    assert first.returncode == -signal.SIGKILL, first_out[-3000:]
    assert "--ckpt_path last: no checkpoint yet" in first_out and "starting a fresh run" in first_out
    killed_at = max(_train_steps(tmp_path / "runs/tiny/version_0/metrics.csv") or [-1])
    assert killed_at < 29, "the first run finished before it was killed"

    second = subprocess.run(_command(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    assert "dirpath has changed" not in out, out[-3000:]  # a resume from an earlier version folder: no such note
    newest = max(int(p.stem.split("=")[1]) for p in (tmp_path / "runs/tiny/version_0/checkpoints").glob("step=*"))
    assert f"--ckpt_path last: resuming from runs/tiny/version_0/checkpoints/step={newest}.ckpt (step {newest}" in out
    steps = _train_steps(tmp_path / "runs/tiny/version_1/metrics.csv")
    assert steps[0] == newest and steps[-1] == 29  # continues the step count (0-based logging), not from 0
