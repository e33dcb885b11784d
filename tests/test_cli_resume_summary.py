"""A resumed run (issue 25, 5 leftovers): a new module lr applies without the LowMemOptimizerCallback (the ``lowmem``
CLI adds :class:`~lowmem_lightning.cli.resume_args.RunLrAfterResume` then), and the end-of-fit summary counts the
global step, saying how many of the steps this process made."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_lowmem_module import TinyRegressor, _loader  # noqa: E402

from lowmem_lightning.callbacks import LowMemOptimizerCallback  # noqa: E402
from lowmem_lightning.cli.resume_args import RunLrAfterResume  # noqa: E402


def _trainer(root: Path, steps: int, callbacks=()) -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                     callbacks=list(callbacks))


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    trainer = _trainer(tmp_path, 3)
    trainer.fit(TinyRegressor(optimizer="adamw_8bit", lr=1e-2, warmup_steps=2, scheduler="cosine"), _loader())
    path = tmp_path / "three.ckpt"
    trainer.save_checkpoint(path)
    return path


def _resume(tmp_path, checkpoint, lr, callbacks) -> tuple[L.Trainer, list[float]]:
    seen = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = _trainer(tmp_path / "resumed", 6, [*callbacks, Record()])
    module = TinyRegressor(optimizer="adamw_8bit", lr=lr, warmup_steps=2, scheduler="cosine")
    trainer.fit(module, _loader(), ckpt_path=checkpoint)
    return trainer, seen


def test_a_new_module_lr_applies_after_resume(tmp_path, checkpoint):
    _, old = _resume(tmp_path, checkpoint, 1e-2, [RunLrAfterResume()])
    _, without = _resume(tmp_path, checkpoint, 5e-3, [])
    _, new = _resume(tmp_path, checkpoint, 5e-3, [RunLrAfterResume()])
    assert without == old  # Lightning's restore alone keeps the checkpoint's lr: the new one would be lost
    assert new == pytest.approx([x / 2 for x in old])  # the new lr, at the schedule's restored position


def test_the_summary_of_a_resumed_run_counts_the_global_step(tmp_path, checkpoint, caplog):
    callback = LowMemOptimizerCallback("adamw_8bit", lr=1e-2, print_summary=True)
    trainer, _ = _resume(tmp_path, checkpoint, 1e-2, [callback])
    assert trainer.global_step == 6
    assert callback.summary["steps"] == 6 and callback.summary["steps_this_run"] == 3
    text = caplog.text  # the summary is logged through Lightning's rank_zero_info
    assert "state after 6 steps" in text and "(resumed: 3 of these 6 steps made by this run)" in text, text
