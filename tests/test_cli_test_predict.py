"""``lowmem test`` and ``lowmem predict`` on the shipped CausalLMModule and TextDataModule (issue 25, 7): they used
to end in a MisconfigurationException (no test_step / predict_step, no dataloaders). Now ``test`` reports the
per-token loss and perplexity of the held-out blocks (``test_loss``, ``test_ppl``: the validation split, which a
model trained with the same data settings never saw) and ``predict`` prints one JSON line per held-out prompt,
``{"prompt", "continuation"}``: the first half of each held-out block and the model's greedy continuation.
Each runs the installed ``lowmem`` as a real process on a checkpoint written here.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lowmem_calls import LOWMEM

from lowmem_lightning.cli import parse_fit_config
from lowmem_lightning.data import TextDataModule
from lowmem_lightning.modules.causal_lm import CausalLMModule

ENV = {**os.environ, "COLUMNS": "200"}
BATCHES = 2


def _parts():
    cfg = parse_fit_config(["--config", "tiny.yaml"])
    model = CausalLMModule(**cfg.model.init_args.as_dict())
    data = TextDataModule(**cfg.data.init_args.as_dict())
    return model, data


def _trainer(root: Path, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=root, **kwargs)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny recipe's model after 3 steps, saved as a checkpoint, and its held-out loss on BATCHES batches."""
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model, data = _parts()
    trainer = _trainer(root, max_steps=3, limit_val_batches=0)
    trainer.fit(model, data)
    path = root / "three.ckpt"
    trainer.save_checkpoint(path)
    [metrics] = _trainer(root, limit_val_batches=BATCHES).validate(model, data, verbose=False)
    return path, metrics["val_loss"], data


def _lowmem(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([LOWMEM, *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=ENV)


@pytest.mark.slow
def test_lowmem_test_reports_the_held_out_loss_of_the_checkpoint(tmp_path, checkpoint):
    path, val_loss, _ = checkpoint
    proc = _lowmem(tmp_path, "test", "--config", "tiny.yaml", "--ckpt_path", str(path),
                   "--trainer.limit_test_batches", str(BATCHES))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test_loss" in proc.stdout and "test_ppl" in proc.stdout, proc.stdout
    assert "dirpath has changed" not in proc.stderr, proc.stderr  # ModelCheckpoint reload note: evaluation noise
    [metrics_csv] = (tmp_path / "runs").rglob("metrics.csv")
    [row] = [r for r in csv.DictReader(metrics_csv.open()) if r.get("test_loss")]
    assert float(row["test_loss"]) == pytest.approx(val_loss, rel=1e-5)  # the checkpoint's weights, the same blocks
    assert float(row["test_ppl"]) == pytest.approx(float(torch.exp(torch.tensor(val_loss))), rel=1e-5)


@pytest.mark.slow
def test_lowmem_predict_prints_a_continuation_per_held_out_prompt(tmp_path, checkpoint):
    path, _, data = checkpoint
    proc = _lowmem(tmp_path, "predict", "--config", "tiny.yaml", "--ckpt_path", str(path),
                   "--trainer.limit_predict_batches", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]  # stdout: JSON lines only (the bar is on stderr)
    assert "dirpath has changed" not in proc.stderr and "set_vital" not in proc.stderr, proc.stderr  # no noise
    batch = next(iter(data.predict_dataloader()))
    assert len(rows) == batch["input_ids"].shape[0]
    for row, ids in zip(rows, batch["input_ids"]):
        assert set(row) == {"prompt", "continuation"}
        assert row["prompt"] == data.tokenizer.decode(ids.tolist())
        assert isinstance(row["continuation"], str)


@pytest.fixture(scope="module")
def predicted(tmp_path_factory, checkpoint) -> tuple[Path, subprocess.CompletedProcess]:
    """One ``lowmem predict`` process on the checkpoint (one batch of 2 prompts, ``--model.predict_new_tokens 3``)
    in a folder whose ``runs/tiny/version_0`` holds an earlier run's ``metrics.csv``: the folder and the process.
    The two tests below assert their parts of this one run (one process start, about 8 s, instead of two)."""
    root = tmp_path_factory.mktemp("predict")
    (root / "runs/tiny/version_0").mkdir(parents=True)
    (root / "runs/tiny/version_0/metrics.csv").write_text("step\n")
    proc = _lowmem(root, "predict", "--config", "tiny.yaml", "--ckpt_path", str(checkpoint[0]),
                   "--trainer.limit_predict_batches", "1", "--trainer.enable_progress_bar", "false",
                   "--data.batch_size", "2", "--model.predict_new_tokens", "3")
    return root, proc


def test_lowmem_predict_leaves_no_new_version_folder(predicted):
    """Predict writes its results on stdout only: the logger's version folder it claimed (config.yaml and
    hparams.yaml in it, no results) is removed, so the next fit takes the next version number."""
    root, proc = predicted
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(proc.stdout.splitlines()) == 2  # the predictions
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == [
        "runs", "runs/tiny", "runs/tiny/version_0", "runs/tiny/version_0/metrics.csv"]


@pytest.mark.slow
def test_lowmem_test_without_held_out_data_is_refused(tmp_path):
    proc = _lowmem(tmp_path, "test", "--config", "tiny.yaml", "--data.val_fraction", "0")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "val_fraction=0" in errors[0], proc.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == []  # nothing written


def test_test_and_predict_steps_in_process(tmp_path):
    """The module's test/predict steps on the data module's loaders (one batch each, no subprocess)."""
    torch.manual_seed(0)
    model, data = _parts()
    [tested] = _trainer(tmp_path, limit_test_batches=1).test(model, data, verbose=False)
    assert set(tested) == {"test_loss", "test_ppl"} and tested["test_loss"] > 0
    assert tested["test_ppl"] == pytest.approx(float(torch.exp(torch.tensor(tested["test_loss"]))), rel=1e-5)
    model.predict_new_tokens = 4
    [rows] = _trainer(tmp_path, limit_predict_batches=1).predict(model, data)
    assert len(rows) == data.batch_size and all(set(r) == {"prompt", "continuation"} for r in rows)
    assert all(len(r["prompt"]) <= data.seq_len // 2 for r in rows)  # decoded from seq_len // 2 tokens


def test_predict_new_tokens_is_set_at_predict_time_and_refused_when_bad(tmp_path, checkpoint, predicted, capsys,
                                                                       monkeypatch):
    """``--model.predict_new_tokens`` on a checkpoint trained with the default 32: each continuation is at most that
    many tokens (no refusal for the differing hyperparameter); 0 is refused, exit 2, one line, nothing written.
    The run is the :func:`predicted` process; the refusal calls lowmem's entry point in this process (a predict
    refusal as a real process: :func:`test_ckpt_path_last_without_a_checkpoint_is_refused`)."""
    from lowmem_lightning.cli import main

    _, proc = predicted
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 2 and all(len(checkpoint[2].tokenizer.encode(r["continuation"])) <= 3 for r in rows)
    bad = tmp_path / "bad"
    bad.mkdir()
    monkeypatch.chdir(bad)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    monkeypatch.setenv("COLUMNS", ENV["COLUMNS"])
    capsys.readouterr()
    code = main(["predict", "--config", "tiny.yaml", "--ckpt_path", str(checkpoint[0]),
                 "--model.predict_new_tokens", "0"])
    proc = subprocess.CompletedProcess("lowmem", code, *capsys.readouterr())
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and "predict_new_tokens=0" in errors[0] and "integer >= 1" in errors[0]
    assert list(bad.rglob("*")) == []


def test_plain_text_continuations_stop_at_the_tokenizers_eos_not_the_configs(tmp_path, monkeypatch):
    """A model built from a config has the architecture's default eos id (Llama: 2, the byte 0x02 for the byte
    tokenizer); generation is given the data's eos (258) instead."""
    torch.manual_seed(0)
    model, data = _parts()
    model.predict_new_tokens = 2
    seen = []
    trainer = _trainer(tmp_path, limit_predict_batches=1)
    model.configure_model()
    generate = model.model.generate
    monkeypatch.setattr(model.model, "generate", lambda **kwargs: seen.append(kwargs) or generate(**kwargs))
    trainer.predict(model, data)
    assert model.model.generation_config.eos_token_id == 2 and seen[0]["eos_token_id"] == data.tokenizer.eos_token_id


def test_ckpt_path_last_evaluates_the_runs_newest_checkpoint(tmp_path, checkpoint):
    """``lowmem test --ckpt_path last`` takes the newest checkpoint of the run's ModelCheckpoint folders (here
    ``runs/tiny/version_0/checkpoints``) as ``fit --ckpt_path last`` and ``export`` do: its held-out loss is the
    checkpoint's. Lightning's own ``last`` looked in the new version folder only, found nothing and tested the
    untrained model (exit 0, one warning). About 10 s."""
    path, val_loss, _ = checkpoint
    folder = tmp_path / "runs/tiny/version_0/checkpoints"
    folder.mkdir(parents=True)
    shutil.copy(path, folder / "step=3.ckpt")
    proc = _lowmem(tmp_path, "test", "--config", "tiny.yaml", "--ckpt_path", "last",
                   "--trainer.limit_test_batches", str(BATCHES), "--trainer.enable_progress_bar", "false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--ckpt_path last: testing runs/tiny/version_0/checkpoints/step=3.ckpt." in proc.stderr, proc.stderr
    [metrics_csv] = (tmp_path / "runs").rglob("metrics.csv")
    [row] = [r for r in csv.DictReader(metrics_csv.open()) if r.get("test_loss")]
    assert float(row["test_loss"]) == pytest.approx(val_loss, rel=1e-5)


def test_ckpt_path_last_without_a_checkpoint_is_refused(tmp_path):
    """``lowmem predict --ckpt_path last`` where the run saved no checkpoint: exit 2, one message naming where it
    looked, nothing written (it used to predict with the untrained model). About 6 s."""
    proc = _lowmem(tmp_path, "predict", "--config", "tiny.yaml", "--ckpt_path", "last")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stdout == ""
    assert proc.stderr.splitlines()[0] == ("lowmem predict: error: ckpt_path='last': no checkpoint in "
                                           "runs/tiny/*/checkpoints; give a checkpoint file."), proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []
