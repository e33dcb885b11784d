"""``EMAWeightAveraging`` + ``ModelCheckpoint(save_last=True, save_top_k=0)``: resume from ``last.ckpt``.

Lightning 2.6's ``WeightAveraging`` copies the average into the module at ``on_train_end``; ``ModelCheckpoint``
writes ``last.ckpt`` after that when nothing was saved during the fit (``save_top_k=0``), so the checkpoint's
``current_model_state`` (what a resume loads into the module) is the average, not the training weights (reported
on Lightning's PR #20545: "the non-averaged weights are not saved at the end of training"). Under torch's AdamW
alone a resume from it does not continue the run; with ``LowMemOptimizerCallback`` (its
:class:`~lowmem_lightning.callbacks.averaging.KeepTrainingWeights` part) it does, bit for bit, in process and
through ``lowmem fit --ckpt_path last`` in real subprocesses. Checkpoints saved during training (step, epoch and
validation ends) always held the training weights.

The SIGTERM checkpoint of ``PreemptionCheckpoint`` (saved in ``on_train_batch_end``) came before the averaging
callback's update of that step when ``LowMemOptimizerCallback`` was listed first (as in the recipes): the resumed
run's training weights matched the uninterrupted run's but its average missed the step it stopped at.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from test_field_lightning_round3 import Project, Trajectory, _ema, _equal, _same_tensors, _trainer
from test_resume_midepoch import SignalAtBatch, _fit_api, _write_data
from tiny_checkpoints import same_contents
from torch import nn

from lowmem_lightning.callbacks.averaging import KeepTrainingWeights
from lowmem_lightning.callbacks.preemption import PreemptionCheckpoint

pytestmark = pytest.mark.usefixtures("one_thread")
SAVED = ("state_dict", "current_model_state", "averaging_state", "optimizer_states")


def _fit(folder: Path, optimizer, steps: int, ckpt=None, trajectory=None):
    checkpoint = ModelCheckpoint(dirpath=folder, save_last=True, save_top_k=0)
    callbacks = [*([trajectory] if trajectory else []), EMAWeightAveraging(decay=0.8), checkpoint]
    trainer = _trainer(optimizer, callbacks, max_steps=steps, max_epochs=-1, enable_checkpointing=True)
    trainer.fit(Project(stateful=True), ckpt_path=ckpt)
    return trainer


def _straight_and_resumed(tmp_path: Path, optimizer) -> tuple[dict, dict]:
    """``last.ckpt`` after 6 steps straight, and after 3 steps + a resume from ``last.ckpt`` to step 6."""
    _fit(tmp_path / "straight", optimizer, 6)
    _fit(tmp_path / "resumed", optimizer, 3)
    _fit(tmp_path / "resumed", optimizer, 6, ckpt="last")
    load = lambda run: torch.load(tmp_path / run / "last.ckpt", weights_only=True)  # noqa: E731
    return load("straight"), load("resumed")


def test_last_ckpt_at_fit_end_holds_the_average_twice_under_torch_adamw(tmp_path):
    """Lightning's behaviour without our callback: the end-of-fit ``last.ckpt`` has no training weights, and a
    resume from it ends elsewhere than the uninterrupted run."""
    trajectory = Trajectory()
    _fit(tmp_path / "run", None, 3, trajectory=trajectory)
    saved = torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 3
    average = _ema(trajectory.steps, 0.8)
    assert _equal(list(saved["current_model_state"].values()), average)
    assert not _equal(list(saved["current_model_state"].values()), trajectory.steps[-1])
    straight, resumed = _straight_and_resumed(tmp_path, None)
    assert straight["global_step"] == resumed["global_step"] == 6
    assert _same_tensors(straight["current_model_state"], resumed["current_model_state"])


@pytest.mark.parametrize("optimizer", ["adamw_8bit", ("came", {"momentum_dtype": "int8"})], ids=["adamw_8bit", "came"])
def test_last_ckpt_at_fit_end_resumes_exactly_with_our_callback(tmp_path, optimizer):
    """With ``LowMemOptimizerCallback`` the end-of-fit ``last.ckpt`` holds the average as ``state_dict`` and the
    training weights as ``current_model_state``, and 3 steps + resume = 6 steps straight, bit for bit."""
    straight, resumed = _straight_and_resumed(tmp_path, optimizer)
    assert straight["global_step"] == resumed["global_step"] == 6
    for key in SAVED:
        assert not _same_tensors(straight[key], resumed[key]), key
    trajectory = Trajectory()
    trainer = _fit(tmp_path / "run", optimizer, 3, trajectory=trajectory)
    saved = torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)
    assert _equal(list(saved["state_dict"].values()), _ema(trajectory.steps, 0.8))
    assert _equal(list(saved["current_model_state"].values()), trajectory.steps[-1])
    assert _equal(list(trainer.lightning_module.parameters()), _ema(trajectory.steps, 0.8))  # module: the average
    keepers = [c for c in trainer.callbacks if isinstance(c, KeepTrainingWeights)]
    assert len(keepers) == 1 and trainer.callbacks[trainer.callbacks.index(keepers[0]) + 1] is keepers[0].averaging


def test_save_checkpoint_after_fit_keeps_the_training_weights(tmp_path):
    """``trainer.save_checkpoint`` after ``fit`` (the module holds the average): the training weights too."""
    trajectory = Trajectory()
    trainer = _trainer("adamw_8bit", [trajectory, EMAWeightAveraging(decay=0.8)], max_steps=4, max_epochs=-1)
    trainer.fit(Project())
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    saved = torch.load(tmp_path / "after.ckpt", weights_only=True)
    assert _equal(list(saved["current_model_state"].values()), trajectory.steps[-1])
    assert _equal(list(saved["state_dict"].values()), _ema(trajectory.steps, 0.8))


def test_sigterm_checkpoint_holds_the_average_of_the_step_it_stops_at(tmp_path):
    """SIGTERM at batch 3: the stop saves ``last.ckpt`` at step 4 after ``EMAWeightAveraging`` averaged step 4, and
    the resumed run ends bit for bit where 6 steps straight end, the average included (before: ``state_dict`` and
    ``averaging_state`` differed, the training weights and optimizer state did not)."""
    data = _write_data(tmp_path / "words.txt")
    ends = {}
    for run, steps, signal_at, ckpt in (("straight", 6, None, None), ("stopped", 6, 3, None),
                                        ("resumed", 6, None, tmp_path / "stopped" / "last.ckpt")):
        extra = [EMAWeightAveraging(decay=0.8), *([SignalAtBatch(signal_at)] if signal_at is not None else [])]
        _, trainer = _fit_api(tmp_path / run, data, max_steps=steps, ckpt_path=ckpt, extra=extra)
        if run == "stopped":
            assert trainer.global_step == 4
            assert torch.load(tmp_path / run / "last.ckpt", weights_only=True)["global_step"] == 4
            stopped = list(trainer.callbacks)
            continue
        trainer.save_checkpoint(tmp_path / f"{run}.ckpt")
        ends[run] = torch.load(tmp_path / f"{run}.ckpt", weights_only=True)
    assert ends["straight"]["global_step"] == ends["resumed"]["global_step"] == 6
    for key in SAVED:
        assert not _same_tensors(ends["straight"][key], ends["resumed"][key]), key
    averaging = next(i for i, c in enumerate(stopped) if isinstance(c, EMAWeightAveraging))
    assert isinstance(stopped[averaging + 1], PreemptionCheckpoint)


# ------------------------------------------------------------------ lowmem fit, real processes
def _lowmem_fit(cwd: Path, steps: int) -> str:
    command = [sys.executable, "-m", "lowmem_lightning.cli", "fit", "--config", "ema.yaml", "--ckpt_path", "last",
               "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0", "--data.init_args.seq_len",
               "32", "--data.init_args.batch_size", "2", "--trainer.enable_progress_bar", "false",
               "--trainer.enable_model_summary", "false", "--trainer.logger", "false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done.stdout + done.stderr


def _ema_recipe(folder: Path) -> None:
    from lowmem_lightning.cli import RECIPES_DIR

    recipe = yaml.safe_load((RECIPES_DIR / "tiny.yaml").read_text())
    recipe["trainer"]["callbacks"][0]["init_args"]["plot"] = False
    recipe["trainer"]["callbacks"] += [
        {"class_path": "lightning.pytorch.callbacks.EMAWeightAveraging", "init_args": {"decay": 0.9}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": "ckpts", "save_last": True, "save_top_k": 0}},
    ]
    folder.mkdir()
    (folder / "ema.yaml").write_text(yaml.safe_dump(recipe))


@pytest.mark.slow
def test_lowmem_fit_stopped_and_resumed_with_ckpt_path_last_ends_where_the_straight_run_ends(tmp_path):
    """``lowmem fit`` (tiny recipe + EMA + ``ModelCheckpoint(save_last=True, save_top_k=0)``) stopped at step 3
    and restarted with ``--ckpt_path last`` to step 6 ends bit for bit where 6 steps straight end (before: its
    ``current_model_state`` and averaged weights differed: it had continued from the average)."""
    for run in ("straight", "resumed"):
        _ema_recipe(tmp_path / run)
    _lowmem_fit(tmp_path / "straight", 6)
    _lowmem_fit(tmp_path / "resumed", 3)
    first = torch.load(tmp_path / "resumed/ckpts/last.ckpt", weights_only=True)
    out = _lowmem_fit(tmp_path / "resumed", 6)
    assert f"--ckpt_path last: resuming from {tmp_path}/resumed/ckpts/last.ckpt (step 3" in out, out[-3000:]
    straight, resumed = (torch.load(tmp_path / run / "ckpts/last.ckpt", weights_only=True)
                         for run in ("straight", "resumed"))
    assert straight["global_step"] == resumed["global_step"] == 6
    for key in SAVED:
        assert not _same_tensors(straight[key], resumed[key]), key
    # the step-3 checkpoint held two models: the average and the training weights
    assert first["global_step"] == 3 and _same_tensors(first["state_dict"], first["current_model_state"])


def test_without_weight_averaging_the_callback_list_is_left_alone():
    """No ``WeightAveraging``: ``serve_weight_averaging`` neither adds a part nor moves ``PreemptionCheckpoint``."""
    import lightning as L

    from lowmem_lightning.callbacks.averaging import serve_weight_averaging

    trainer = L.Trainer(callbacks=[PreemptionCheckpoint(), L.Callback()], logger=False, enable_checkpointing=False)
    before = trainer.callbacks
    serve_weight_averaging(trainer)
    assert trainer.callbacks is before


def _weights_and_state(trainer: L.Trainer, module: L.LightningModule) -> tuple[dict, dict]:
    return ({k: v.clone() for k, v in module.state_dict().items()}, copy.deepcopy(trainer.optimizers[0].state_dict()))


@pytest.mark.parametrize("optimizer", ["adamw_8bit", None])
def test_a_resume_without_the_averaging_callback_continues_the_training_weights(tmp_path, optimizer, caplog):
    """A checkpoint ``EMAWeightAveraging`` wrote (``state_dict``: the average), resumed in a fit without it: Lightning
    loaded the average into the module and trained it on with the training weights' optimizer state, silently (a
    jump in the loss, another run). Now the fit resumes from the training weights (``current_model_state``), one line
    says so, and 3 steps with EMA + 3 resumed without end bit for bit where 6 steps without EMA end: under
    ``LowMemOptimizerCallback``, and under a ``LowMemModule``'s own optimizer (no callback)."""
    import logging

    from lowmem_lightning.modules import LowMemModule

    class Own(LowMemModule):
        def __init__(self):
            super().__init__(optimizer="adamw_8bit", lr=3e-3)
            self.project = Project(stateful=True)

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self.project(batch[0]), batch[1])

        def train_dataloader(self):
            return self.project.train_dataloader()

    make = Project if optimizer is not None else Own

    def fit(steps, callbacks=(), ckpt=None, run="straight"):
        module = make(stateful=True) if make is Project else make()
        saving = ModelCheckpoint(dirpath=tmp_path / run, save_last=True, save_top_k=0)
        trainer = _trainer(optimizer, [*callbacks, saving], max_steps=steps, max_epochs=-1, enable_checkpointing=True)
        trainer.fit(module, ckpt_path=ckpt)
        return _weights_and_state(trainer, module)

    straight = fit(6)
    fit(3, [EMAWeightAveraging(decay=0.5)], run="ema")
    saved = torch.load(tmp_path / "ema" / "last.ckpt", weights_only=True)
    assert _same_tensors(saved["state_dict"], saved["current_model_state"])  # the average is not the weights
    with caplog.at_level(logging.INFO):
        resumed = fit(6, ckpt=str(tmp_path / "ema" / "last.ckpt"), run="resumed")
    assert "this fit has no weight-averaging callback: it resumes from the training weights" in caplog.text
    assert not _same_tensors(straight[0], resumed[0])
    assert same_contents(straight[1], resumed[1])
