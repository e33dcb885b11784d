"""A refused ``lowmem fit --ckpt_path`` prints its one message and nothing before it: the warnings Lightning and
our modules raise while the resume is set up (Lightning's "Checkpoint directory ... exists and is not empty" and
"Be aware that when using `ckpt_path`, callbacks ...", ``TextDataModule``'s "the data changed since the
checkpoint") come before ``ResumeCompatibility`` refuses a checkpoint of another optimizer. They are held with
Lightning's set-up lines (:class:`~lowmem_lightning.cli.held_logs.HeldLogs`), printed in order once the run
starts and dropped on a refusal.

Each case resumes a ``lion`` checkpoint with ``--optim adafactor``; the checkpoint is made once per module by a
10-step ``lion`` run. The first case is a real ``lowmem`` process (``python -m lowmem_lightning.cli``); the others call
its entry point in this process (:func:`lowmem_calls.lowmem_in_process`), whose stderr shows what a process's does
(:func:`process_stderr`).
"""

from __future__ import annotations

import logging
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import test_resume_midepoch as midepoch
import torch
from lowmem_calls import lowmem_in_process, seed_environment_kept, stderr_as_in_a_process

from lowmem_lightning.cli.held_logs import HeldLogs

REFUSAL = "lowmem fit: error: Cannot resume from "
TRAINED = ".ckpt: it was trained with optimizer 'lion', but "
HINT = "(nothing was trained or written; LOWMEM_TRACEBACK=1 shows where it was raised)"
"""The second line of a refusal raised inside ``fit``: part of the one message (app.py ``_run_subcommand``)."""


@pytest.fixture(scope="module")
def lion_run(tmp_path_factory) -> Path:
    """A finished 10-step ``lowmem fit --optim lion`` run: ``ckpt/step=10.ckpt``, its data ``words.txt``. The run
    is only what the refusals resume, so it calls ``lowmem``'s entry point in this process (the first refusal is a
    real process): no interpreter start-up and imports (~5 s)."""
    from lowmem_lightning.cli import main

    root = tmp_path_factory.mktemp("lion_run")
    data = midepoch._write_data(root / "words.txt")
    midepoch._lowmem_config(root, data, max_steps=10)
    with pytest.MonkeyPatch.context() as patch, seed_environment_kept():
        patch.chdir(root)
        patch.setattr(sys, "argv", sys.argv[:1])
        assert main(["fit", "--config", str(root / "run.yaml"), "--optim", "lion"]) == 0
    assert (root / "ckpt" / "step=10.ckpt").is_file()
    return root


@pytest.fixture
def process_stderr(capsys, monkeypatch):
    """This process's stderr (capsys's) gets what a ``lowmem`` process prints there
    (:func:`lowmem_calls.stderr_as_in_a_process`), so a line printed before the refusal is seen."""
    stderr_as_in_a_process(monkeypatch)


def _in_process(capsys, monkeypatch, root: Path, data: Path, *extra: str, max_steps: int):
    """``test_resume_midepoch._lowmem``'s ``lowmem fit`` (its ``run.yaml`` in ``root``) by the entry point in this
    process."""
    config = midepoch._lowmem_config(root, data, max_steps)
    return lowmem_in_process(capsys, monkeypatch, root, "fit", "--config", str(config), *extra)


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _assert_only_the_refusal(proc, root: Path, before: list[str]) -> None:
    """Exit 2; stdout empty; stderr is the refusal's message and nothing else (no warning before it)."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert lines[:1] and lines[0].startswith(REFUSAL) and TRAINED in lines[0], proc.stderr
    assert "optimizer='adafactor'" in lines[0], proc.stderr
    assert lines[1:] == [HINT], proc.stderr
    assert _files(root) == before  # nothing written (run.yaml is rewritten with the same text)


def test_resume_in_its_own_run_folder(lion_run, tmp_path):
    """The run's folder: ModelCheckpoint's directory exists and is not empty (Lightning warns at setup)."""
    root = tmp_path / "run"
    shutil.copytree(lion_run, root)
    before = _files(root)
    proc = midepoch._lowmem(root, root / "words.txt", "--optim", "adafactor",
                            "--ckpt_path", str(root / "ckpt" / "step=10.ckpt"), max_steps=12)
    _assert_only_the_refusal(proc, root, before)


def test_resume_from_another_run_folder_with_other_checkpointing(lion_run, tmp_path, process_stderr, capsys,
                                                                monkeypatch):
    """A new folder whose recipe checkpoints every 5 steps: Lightning warns the checkpoint's ModelCheckpoint
    (every 10 steps) is not among the callbacks, right before the callbacks' ``on_load_checkpoint``. In process."""
    (tmp_path / "run.yaml").touch()
    before = _files(tmp_path)
    proc = _in_process(capsys, monkeypatch, tmp_path, lion_run / "words.txt", "--optim", "adafactor",
                       "--trainer.callbacks.every_n_train_steps", "5",
                       "--ckpt_path", str(lion_run / "ckpt" / "step=10.ckpt"), max_steps=12)
    _assert_only_the_refusal(proc, tmp_path, before)


def test_resume_after_the_data_changed(lion_run, tmp_path, process_stderr, capsys, monkeypatch):
    """The checkpoint's data fingerprint differs from the file now: TextDataModule warns while the data module is
    restored, before the callbacks (and the refusal). In process."""
    checkpoint = torch.load(lion_run / "ckpt" / "step=10.ckpt", map_location="cpu", weights_only=False)
    saved = [v["data_files"] for v in checkpoint.values() if isinstance(v, dict) and "data_files" in v]
    assert len(saved) == 1 and len(saved[0]) == 1
    for print_ in saved[0].values():
        print_["size"] += 1
    torch.save(checkpoint, tmp_path / "edited.ckpt")
    (tmp_path / "run.yaml").touch()
    before = _files(tmp_path)
    proc = _in_process(capsys, monkeypatch, tmp_path, lion_run / "words.txt", "--optim", "adafactor",
                       "--ckpt_path", str(tmp_path / "edited.ckpt"), max_steps=12)
    _assert_only_the_refusal(proc, tmp_path, before)


@pytest.mark.slow
def test_a_resume_that_runs_still_prints_the_held_warning_once(lion_run, tmp_path):
    """The same optimizer resumes: the warning held during set-up comes once, after Lightning's set-up lines."""
    proc = midepoch._lowmem(tmp_path, lion_run / "words.txt", "--optim", "lion",
                            "--trainer.callbacks.every_n_train_steps", "5",
                            "--ckpt_path", str(lion_run / "ckpt" / "step=10.ckpt"), max_steps=12)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    assert err.count("Be aware that when using `ckpt_path`") == 1, err
    assert err.index("GPU available:") < err.index("Be aware that when using `ckpt_path`"), err


@pytest.fixture
def shown():
    """Warnings shown (``warnings.showwarning``) during the test, as ``[message text]``; every warning shown."""
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        out: list[str] = []
        warnings.showwarning = lambda message, *args, **kwargs: out.append(str(message))
        yield out


def test_held_warnings_are_released_in_order_with_the_log_records(shown, lightning_stream):
    order: list[str] = []
    warnings.showwarning = lambda message, *args, **kwargs: order.append(f"warning {message}")
    lightning_stream.write = lambda text: order.append(f"log {text.strip()}") if text.strip() else None
    held = HeldLogs().hold()
    logging.getLogger("lightning.pytorch.trainer").info("Seed set to 42")
    warnings.warn("Checkpoint directory exists and is not empty.", UserWarning, stacklevel=1)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").info("GPU available: False, used: False")
    assert order == []
    held.release()
    assert order == ["log Seed set to 42", "warning Checkpoint directory exists and is not empty.",
                     "log GPU available: False, used: False"]
    warnings.warn("after the start", UserWarning, stacklevel=1)
    assert order[-1] == "warning after the start"  # shown at once: no longer held


def test_held_warnings_are_dropped_on_a_refusal(shown):
    held = HeldLogs().hold()
    warnings.warn("the data changed since the checkpoint", UserWarning, stacklevel=1)
    held.discard()
    held.release()  # a second stop does nothing
    assert shown == []
    warnings.warn("printed at once", UserWarning, stacklevel=1)
    assert shown == ["printed at once"]


def test_a_showwarning_restored_over_the_hold_still_passes_warnings_through(shown):
    """Code that saved ``warnings.showwarning`` while holding (``catch_warnings``) may put the holder back after the
    hold ended: a warning then is shown, not kept."""
    held = HeldLogs().hold()
    holder = warnings.showwarning
    held.release()
    warnings.showwarning = holder
    warnings.warn("shown", UserWarning, stacklevel=1)
    assert shown == ["shown"]
