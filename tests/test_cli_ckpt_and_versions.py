"""Issue 25, deliverables 2 and 3: runs started together never share a run directory, and every bad
``--ckpt_path`` is exit 2 with one message naming the file and what is wrong, before anything is written.

* :func:`~lowmem_lightning.cli.resume.checkpoint_problem` on each bad-file kind (empty, truncated, random
  bytes, a plain state dict, a non-dict, a dict that is not a Lightning checkpoint, a directory) and on
  good ones (a Lightning checkpoint, a sharded checkpoint directory).
* ``lowmem fit`` in-process and as real subprocesses: refused with exit 2, one ``error:`` line, no
  traceback, nothing left in the working directory.
* A checkpoint saved from another model config: refused naming the differing keys; ``--model_from_ckpt
  true`` takes the checkpoint's model; an explicit ``--model.config.*`` is never silently overridden.
* :func:`~lowmem_lightning.cli.versions.claim_version_dir` skips a version another run created; two real
  ``lowmem fit`` processes started together get distinct version folders (``-m slow``).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from lowmem_lightning.cli import RECIPES_DIR
from lowmem_lightning.cli.app import _ParseOnlyCLI
from lowmem_lightning.cli.recipes import resolve_config_args, with_default_classes
from lowmem_lightning.cli.resume import UNSET, checkpoint_problem, model_differences
from lowmem_lightning.cli.versions import claim_version_dir

ENV = {**os.environ, "COLUMNS": "200"}
TINY = str(RECIPES_DIR / "tiny.yaml")
TINY_CONFIG = {"hidden_size": 96, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 4, "max_position_embeddings": 256}


def _lightning_ckpt(path: Path, **config_changes) -> Path:
    """A file shaped like a Lightning checkpoint of the tiny recipe's model (``config`` changed as given)."""
    hparams = {"config": {**TINY_CONFIG, **config_changes}, "model_name_or_path": None, "lr": 1e-4,
               "quantize": None, "lora": None, "_instantiator": "lightning.pytorch.cli.instantiate_module"}
    torch.save({"state_dict": {"w": torch.zeros(2)}, "pytorch-lightning_version": "2.6.0", "global_step": 4,
                "hyper_parameters": hparams, "optimizer_states": [], "lr_schedulers": [], "callbacks": {}}, path)
    return path


def _bad_file(kind: str, folder: Path) -> Path:
    """A bad ``--ckpt_path`` of the given kind, written into ``folder``."""
    path = folder / f"{kind}.ckpt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        whole = _lightning_ckpt(folder / "whole.ckpt").read_bytes()
        (folder / "whole.ckpt").unlink()
        path.write_bytes(whole[: len(whole) // 2])
    elif kind == "random":
        path.write_bytes(os.urandom(3000).replace(b"PK", b"QK"))
    elif kind == "state_dict":
        torch.save({"weight": torch.zeros(3, 3), "bias": torch.zeros(3)}, path)
    elif kind == "list":
        torch.save([torch.zeros(2)], path)
    elif kind == "foreign_dict":
        torch.save({"model": {"weight": torch.zeros(2)}, "epoch": 3}, path)
    elif kind == "directory":
        path.mkdir()
        (path / "model.pt").write_bytes(b"x")
    return path


EXPECTED = {
    "empty": "is empty (0 bytes)",
    "truncated": "is truncated",
    "random": "is not a checkpoint (3000 bytes that are not a torch.save archive)",
    "state_dict": "is a plain state dict (2 tensors saved with torch.save)",
    "list": "is not a Lightning checkpoint (it holds a list",
    "foreign_dict": "is not a Lightning checkpoint (no 'state_dict' or 'pytorch-lightning_version' entry; it has "
                    "'model', 'epoch')",
    "directory": "is a directory, not a checkpoint file",
}


# ------------------------------------------------------------------ the file check, in-process
@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_checkpoint_problem_names_the_file_and_what_is_wrong(kind, tmp_path):
    path = _bad_file(kind, tmp_path)
    problem, checkpoint = checkpoint_problem(str(path))
    assert checkpoint is None
    assert problem.startswith(f"ckpt_path={str(path)!r} ") and EXPECTED[kind] in problem, problem


def test_checkpoint_problem_accepts_checkpoints_and_sharded_directories(tmp_path):
    problem, checkpoint = checkpoint_problem(str(_lightning_ckpt(tmp_path / "good.ckpt")))
    assert problem is None and checkpoint["global_step"] == 4
    sharded = tmp_path / "sharded.ckpt"
    sharded.mkdir()
    (sharded / ".metadata").write_bytes(b"meta")
    assert checkpoint_problem(str(sharded)) == (None, None)
    problem, _ = checkpoint_problem(str(tmp_path / "missing.ckpt"))
    assert "no such checkpoint file" in problem


def test_model_differences_names_nested_keys_and_leaves_training_keys_out():
    saved = {"config": {"hidden_size": 64, "num_hidden_layers": 2, "rope_theta": 1e4}, "lr": 1.0, "quantize": None,
             "_x": 1}  # rope_theta: filled in by the module, the run does not set it
    run = {"config": {"hidden_size": 96, "num_hidden_layers": 2.0, "vocab_size": 256}, "lr": 3.0, "quantize": "nf4"}
    assert model_differences(saved, run) == [
        ("config.hidden_size", 64, 96), ("config.vocab_size", UNSET, 256), ("quantize", None, "nf4")]
    assert model_differences(saved, {**saved, "lr": 5.0}) == []


# ------------------------------------------------------------------ lowmem fit, in-process
def _main(tmp_path: Path, monkeypatch, capsys, *args: str) -> tuple[int, str]:
    from lowmem_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    code = main(["fit", "--config", "tiny.yaml", *args])
    return code, capsys.readouterr().err


def _assert_one_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_lowmem_fit_refuses_each_bad_ckpt_path_before_writing(kind, tmp_path, monkeypatch, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    path = _bad_file(kind, inputs)
    code, err = _main(tmp_path, monkeypatch, capsys, "--ckpt_path", str(path))
    _assert_one_error(code, err, str(path), EXPECTED[kind])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no runs/, no config.yaml


@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_other_subcommands_refuse_a_bad_ckpt_path_too(subcommand, tmp_path, monkeypatch, capsys):
    from lowmem_lightning.cli import main

    path = _bad_file("empty", tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    code = main([subcommand, "--config", "tiny.yaml", "--ckpt_path", str(path)])
    _assert_one_error(code, capsys.readouterr().err, str(path), EXPECTED["empty"])
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_checkpoint_of_another_model_config_is_refused_naming_the_keys(tmp_path, monkeypatch, capsys):
    ckpt = _lightning_ckpt(tmp_path / "other.ckpt", hidden_size=64, num_hidden_layers=3)
    code, err = _main(tmp_path, monkeypatch, capsys, "--ckpt_path", str(ckpt))
    _assert_one_error(code, err, "model.config.hidden_size=64 in the checkpoint, 96 in this run",
                      "model.config.num_hidden_layers=3 in the checkpoint, 2 in this run", "--model_from_ckpt true")
    assert "lr" not in err.split("this run's:", 1)[1].split(".", 1)[0]  # a training setting may differ
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.ckpt"]


def test_checkpoint_config_yaml_is_offered_when_saved_next_to_it(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "runs/tiny/version_0/checkpoints"
    folder.mkdir(parents=True)
    (folder.parent / "config.yaml").write_text("model: {}\n")
    ckpt = _lightning_ckpt(folder / "epoch=0-step=4.ckpt", hidden_size=64)
    code, err = _main(tmp_path, monkeypatch, capsys, "--ckpt_path", str(ckpt))
    _assert_one_error(code, err, f"--config {folder.parent / 'config.yaml'}")


def test_explicit_model_flag_is_never_overridden_by_the_checkpoint(tmp_path, monkeypatch, capsys):
    ckpt = _lightning_ckpt(tmp_path / "other.ckpt", hidden_size=64)
    code, err = _main(tmp_path, monkeypatch, capsys, "--ckpt_path", str(ckpt), "--model.config.hidden_size", "96")
    _assert_one_error(code, err, "model.config.hidden_size=64 in the checkpoint, 96 in this run")
    code, err = _main(tmp_path, monkeypatch, capsys, "--ckpt_path", str(ckpt), "--model_from_ckpt", "true",
                      "--model.config.hidden_size", "96")
    _assert_one_error(code, err, "--model.config.hidden_size 96 on the command line contradicts the checkpoint's "
                                 "model.config.hidden_size=64")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.ckpt"]


def test_ckpt_path_last_choosing_another_model_is_refused_leaving_no_version(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "runs/tiny/version_0/checkpoints"
    folder.mkdir(parents=True)
    ckpt = _lightning_ckpt(folder / "epoch=0-step=4.ckpt", hidden_size=64)
    code, err = _main(tmp_path, monkeypatch, capsys, "--ckpt_path", "last")
    _assert_one_error(code, err, f"ckpt_path='last' chose {ckpt.relative_to(tmp_path)}",
                      "model.config.hidden_size=64 in the checkpoint", "--model_from_ckpt true")
    assert sorted(p.name for p in (tmp_path / "runs/tiny").iterdir()) == ["version_0"]  # the claimed one removed


class _ParseAndCheck(_ParseOnlyCLI):
    """Parses, checks ``--ckpt_path`` and fixes up the config like ``lowmem fit``; builds nothing."""

    check_weights = True


def test_model_from_ckpt_takes_the_checkpoint_model_config(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    ckpt = _lightning_ckpt(tmp_path / "other.ckpt", hidden_size=64)
    args = with_default_classes(resolve_config_args(
        ["fit", "--config", TINY, "--ckpt_path", str(ckpt), "--model_from_ckpt", "true"]))
    init = _ParseAndCheck(args=args).config.fit.model.init_args
    assert init.config["hidden_size"] == 64 and init.config["num_hidden_layers"] == 2
    assert init.lr == 3e-3  # the run's training settings stay the run's
    assert "model.config.hidden_size=64 taken from" in capsys.readouterr().err
    same = _lightning_ckpt(tmp_path / "same.ckpt")
    args = with_default_classes(resolve_config_args(["fit", "--config", TINY, "--ckpt_path", str(same)]))
    assert _ParseAndCheck(args=args).config.fit.model.init_args.config["hidden_size"] == 96


# ------------------------------------------------------------------ real subprocesses
def _lowmem(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowmem_lightning.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=ENV)


@pytest.mark.parametrize("kind", ["truncated", pytest.param("mismatch", marks=pytest.mark.slow)])
def test_lowmem_process_refuses_bad_ckpt_path_with_exit_2(kind, tmp_path):
    """A real ``lowmem fit`` process refusing a bad ``--ckpt_path``. ``mismatch`` (another model config) is ``-m
    slow``: the default suite asserts its refusal in process
    (:func:`test_checkpoint_of_another_model_config_is_refused_naming_the_keys`) and a refusal as a real process
    here (``truncated``)."""
    ckpt = _lightning_ckpt(tmp_path / "m.ckpt", hidden_size=64) if kind == "mismatch" else _bad_file(kind, tmp_path)
    proc = _lowmem(tmp_path, "fit", "--config", "tiny.yaml", "--ckpt_path", str(ckpt))
    needle = "model.config.hidden_size=64 in the checkpoint" if kind == "mismatch" else EXPECTED[kind]
    _assert_one_error(proc.returncode, proc.stderr, str(ckpt), needle)
    assert [p.name for p in tmp_path.iterdir()] == [ckpt.name]


# ------------------------------------------------------------------ version folders
def test_claim_skips_a_version_created_by_another_run(tmp_path, capsys):
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(tmp_path / "runs", name="tiny")
    logger._get_next_version = lambda: 0  # both runs scanned before either created a folder
    (tmp_path / "runs/tiny/version_0").mkdir(parents=True)
    folder, created = claim_version_dir(logger)
    assert folder == tmp_path / "runs/tiny/version_1" == created and folder.is_dir()
    assert logger.version == 1 and logger.log_dir == str(folder)
    assert "version_0 was created by another run meanwhile" in capsys.readouterr().err
    fresh = CSVLogger(tmp_path / "new/runs", name="tiny")
    assert claim_version_dir(fresh) == (tmp_path / "new/runs/tiny/version_0", tmp_path / "new")
    assert claim_version_dir(fresh) is None  # version chosen already
    assert claim_version_dir(CSVLogger(tmp_path, name="x", version="mine")) is None


def _rows_by_step(metrics: Path) -> Counter:
    with metrics.open() as handle:
        rows = list(csv.DictReader(handle))
    return Counter((row["step"], tuple(k for k, v in row.items() if v and k != "step")) for row in rows)


@pytest.mark.slow
def test_two_runs_started_together_get_their_own_version_folders(tmp_path):
    cmd = [sys.executable, "-m", "lowmem_lightning.cli", "fit", "--config", "tiny.yaml", "--trainer.max_steps", "2",
           "--trainer.limit_val_batches", "1", "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
           "--trainer.callbacks.every_n_train_steps=2"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    versions = sorted(p.name for p in (tmp_path / "runs/tiny").iterdir())
    assert versions == ["version_0", "version_1"], versions
    named = []
    for out in outputs:
        named += [v for v in versions if f"runs/tiny/{v}/state_memory.png" in out]  # the summary's plot path
    assert sorted(named) == versions, outputs
    for version in versions:
        folder = tmp_path / "runs/tiny" / version
        counts = _rows_by_step(folder / "metrics.csv")
        assert counts and max(counts.values()) == 1, counts  # each row once: no second run writing into it
        assert sum(1 for step, _ in counts if step == "1") >= 1
        assert [p.name for p in (folder / "checkpoints").glob("*.ckpt")] == ["epoch=0-step=2.ckpt"]
        assert (folder / "config.yaml").is_file() and (folder / "state_memory.png").is_file()
    _check_real_checkpoint(tmp_path, tmp_path / "runs/tiny/version_0/checkpoints/epoch=0-step=2.ckpt")


def _check_real_checkpoint(cwd: Path, ckpt: Path) -> None:
    """A checkpoint ``lowmem fit`` wrote passes the check with its own config, and is refused with another."""
    problem, checkpoint = checkpoint_problem(str(ckpt))
    assert problem is None and checkpoint["hyper_parameters"]["config"]["hidden_size"] == 96
    saved_argv, sys.argv = sys.argv, sys.argv[:1]
    cwd_before = Path.cwd()
    os.chdir(cwd)
    try:
        args = with_default_classes(resolve_config_args(["fit", "--config", TINY, "--ckpt_path", str(ckpt)]))
        assert _ParseAndCheck(args=args).config.fit.model.init_args.config["hidden_size"] == 96
        with pytest.raises(SystemExit) as exit_info:
            _ParseAndCheck(args=[*args, "--model.config.hidden_size", "64"])
        assert exit_info.value.code == 2
    finally:
        os.chdir(cwd_before)
        sys.argv = saved_argv
