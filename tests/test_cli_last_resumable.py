"""``lowmem fit --ckpt_path last`` resumes the newest *resumable* checkpoint.

A project may keep a weights-only checkpoint (``ModelCheckpoint(save_weights_only=True)``, e.g. for export) beside
full ones. When the weights-only file is the newest, ``last`` used to pick it and be refused although a resumable
checkpoint existed; now it is skipped (named in the one resume line), and ``last`` is refused (exit 2, one line)
only when every checkpoint is weights-only. Telling a weights-only file reads no tensor (memory-mapped load, a
sharded folder's ``meta.pt``), and only the newest files are probed. The refusal of an explicit weights-only
``--ckpt_path`` is one sentence. Through a real ``lowmem`` process on the tiny recipe, a few steps each.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from lowmem_calls import LOWMEM, lowmem_in_process

from lowmem_lightning.cli import RECIPES_DIR
from lowmem_lightning.cli import last as last_module
from lowmem_lightning.cli.last import newest_checkpoint, refusal, resume_notice

ENV = {**os.environ, "COLUMNS": "200"}
SMALL = ["--trainer.limit_val_batches", "1", "--data.init_args.seq_len", "32", "--trainer.enable_progress_bar",
         "false", "--trainer.enable_model_summary", "false"]


def _config(root: Path, full: bool) -> None:
    """``run.yaml`` in ``root``: the tiny recipe (no plot) with a weights-only ModelCheckpoint every 2 steps and,
    when ``full``, a full one every 3 steps, both in ``ckpts``."""
    recipe = yaml.safe_load((RECIPES_DIR / "tiny.yaml").read_text())
    callbacks = recipe["trainer"]["callbacks"]
    for callback in callbacks:
        if callback["class_path"].endswith("LowMemOptimizerCallback"):
            callback["init_args"]["plot"] = False
    kinds = [("wo-{step}", 2, True)] + ([("full-{step}", 3, False)] if full else [])
    for filename, every, weights_only in kinds:
        callbacks.append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {
            "dirpath": "ckpts", "filename": filename, "every_n_train_steps": every, "save_top_k": -1,
            "save_weights_only": weights_only}})
    (root / "run.yaml").write_text(yaml.safe_dump(recipe))


def _fit(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([LOWMEM, "fit", "--config", "run.yaml", *SMALL, *args], cwd=root, capture_output=True,
                          text=True, timeout=600, env=ENV)


def _lines(err: str, marker: str) -> list[str]:
    return [line for line in err.splitlines() if marker in line]


def _first_step(metrics: Path) -> int:
    with metrics.open() as f:
        return min(int(row["step"]) for row in csv.DictReader(f) if row["step"])


def test_last_skips_a_newer_weights_only_checkpoint_and_resumes_the_full_one(tmp_path, capsys, monkeypatch):
    """Weights-only files at steps 2 and 4, a full one at step 3: ``--ckpt_path last`` resumes step 3 (before: it
    chose step 4 and was refused), and its one line names the skipped file. The first fit only writes the
    checkpoints, so it calls ``lowmem``'s entry point in this process; the resume is a real ``lowmem`` process."""
    _config(tmp_path, full=True)
    first = lowmem_in_process(capsys, monkeypatch, tmp_path, "fit", "--config", "run.yaml", *SMALL,
                              "--trainer.max_steps", "4", "--ckpt_path", "last", columns=ENV["COLUMNS"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert len(_lines(first.stderr, "no checkpoint yet")) == 1
    assert sorted(p.name for p in (tmp_path / "ckpts").iterdir()) == ["full-step=3.ckpt", "wo-step=2.ckpt",
                                                                      "wo-step=4.ckpt"]
    second = _fit(tmp_path, "--trainer.max_steps", "5", "--ckpt_path", "last")
    assert second.returncode == 0, second.stderr[-3000:]
    [line] = _lines(second.stderr, "--ckpt_path last:")
    ckpts = tmp_path / "ckpts"
    assert f"resuming from {ckpts}/full-step=3.ckpt (step 3, the newest resumable of 3 checkpoints" in line, line
    assert f"skipped 1 newer weights-only checkpoint (save_weights_only=True: no optimizer state to resume): " \
           f"{ckpts}/wo-step=4.ckpt." in line, line
    assert _first_step(tmp_path / "runs" / "tiny" / "version_1" / "metrics.csv") == 3  # continued from step 3


@pytest.mark.slow
def test_last_refuses_in_one_line_when_every_checkpoint_is_weights_only(tmp_path):
    """Only weights-only checkpoints: ``--ckpt_path last`` exits 2 with one line naming the newest and how to start
    from its weights, nothing created; an explicit weights-only ``--ckpt_path`` is refused in one sentence that
    says "cannot be resumed" once (before: twice-worded, two sentences)."""
    _config(tmp_path, full=False)
    for step in (2, 4):  # as ModelCheckpoint(save_weights_only=True) writes them (what is checked: no fit needed)
        _save(tmp_path / "ckpts" / f"wo-step={step}.ckpt", step, full=False)
    refused = _fit(tmp_path, "--trainer.max_steps", "6", "--ckpt_path", "last")
    [line] = _lines(refused.stderr, "error:")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    newest = tmp_path / "ckpts" / "wo-step=4.ckpt"
    assert f"ckpt_path='last' found no resumable checkpoint in {tmp_path / 'ckpts'}: all 2 checkpoints there hold " \
           f"the model weights only" in line, line
    assert f"the newest being {newest} (step 4); to start a new fit from its weights, load them with " \
           "Module.load_from_checkpoint(path)" in line, line
    assert not (tmp_path / "runs").exists()  # nothing created
    explicit = _fit(tmp_path, "--trainer.max_steps", "6", "--ckpt_path", "ckpts/wo-step=4.ckpt")
    [line] = _lines(explicit.stderr, "error:")
    assert explicit.returncode == 2, explicit.stderr[-3000:]
    message = line.split("error: ", 1)[1]
    assert message.startswith("ckpt_path='ckpts/wo-step=4.ckpt' cannot be resumed: it holds the model weights only")
    assert message.count("resum") == 1 and message.endswith("and fit without ckpt_path."), message
    assert not re.search(r"[.:]\s+[A-Z]", message), message  # one sentence
    assert not (tmp_path / "runs").exists()  # nothing created


# ------------------------------------------------------------------ choosing, in process
def _save(path: Path, step: int, full: bool, tensor: torch.Tensor | None = None) -> None:
    """A Lightning-like checkpoint: weights (``tensor`` or a small one), and when ``full`` the optimizer state."""
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {"global_step": step, "pytorch-lightning_version": "2.6.6",
                  "state_dict": {"w": tensor if tensor is not None else torch.zeros(4)}}
    if full:
        checkpoint.update(optimizer_states=[{"state": {}, "param_groups": []}], lr_schedulers=[], callbacks={})
    if path.suffix == ".ckpt" and path.name.startswith("sharded"):  # a DCP folder: its non-tensor part in meta.pt
        path.mkdir(parents=True)
        checkpoint.pop("state_dict")
        checkpoint.pop("optimizer_states", None)
        path = path / "meta.pt"
    torch.save(checkpoint, path)


def _read_bytes() -> int:
    return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["rchar"])


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="counts bytes read from /proc/self/io")
def test_newest_resumable_is_found_without_reading_tensors_and_probes_only_the_newest(tmp_path, monkeypatch):
    """Weights-only files (named by step, a 32 MiB one; unnamed ``best.ckpt``; a sharded folder) newer than a full
    one: the full one is chosen, the others are ``skipped`` newest first; the big file's tensor is not read; an
    older full file is never opened. Every checkpoint weights-only: the newest comes back ``weights_only``."""
    import lowmem_lightning.callbacks.resume  # noqa: F401 - imported before bytes are counted

    _save(tmp_path / "old-step=1.ckpt", 1, full=True)
    _save(tmp_path / "full-step=3.ckpt", 3, full=True)
    _save(tmp_path / "wo-step=4.ckpt", 4, full=False, tensor=torch.ones(8 * 2**20))  # 32 MiB
    _save(tmp_path / "best.ckpt", 5, full=False)
    _save(tmp_path / "sharded-wo.ckpt", 6, full=False)
    probed = []
    metadata = last_module._metadata
    monkeypatch.setattr(last_module, "_metadata", lambda path: probed.append(path.name) or metadata(path))
    before = _read_bytes()
    found, count = newest_checkpoint([str(tmp_path)])
    assert _read_bytes() - before < 4 * 2**20  # the 32 MiB tensor stays on disk
    assert (Path(found.path).name, found.step, found.weights_only, count) == ("full-step=3.ckpt", 3, False, 5)
    assert [Path(p).name for p in found.skipped] == ["sharded-wo.ckpt", "best.ckpt", "wo-step=4.ckpt"]
    assert "old-step=1.ckpt" not in probed and probed.count("best.ckpt") == 1
    line = resume_notice(found, count, "here")
    assert "the newest resumable of 5 checkpoints in here); skipped 3 newer weights-only checkpoints" in line
    for name in ("old-step=1.ckpt", "full-step=3.ckpt"):
        (tmp_path / name).unlink()
    found, count = newest_checkpoint([str(tmp_path)])
    assert (Path(found.path).name, found.step, found.weights_only, count) == ("sharded-wo.ckpt", 6, True, 3)
    assert "all 3 checkpoints there hold the model weights only" in refusal(found, count, "here")
