"""Resuming a checkpoint written after ``fit`` ended at ``max_steps`` in the middle of an epoch ("train N more
steps"): ``trainer.save_checkpoint`` after ``fit`` returns, and ``lowmem fit --trainer.max_steps 20`` then
``--trainer.max_steps 40 --ckpt_path last``. The longer run resumed must equal one uninterrupted run of as many
steps: params, optimizer state and logged losses. (Lightning drops the loader's iterator when ``fit`` ends, and a
``state_dict()`` afterwards builds a new one: the shuffle sampler used to start the next epoch right there, so the
checkpoint said ``{'epoch': 2, 'yielded': 0}`` and the resumed run skipped the rest of epoch 1.)

Data and model of ``tests/test_resume_midepoch.py``: 60 training blocks, batch 4, 15 steps per epoch; step 20 is
batch 5 of epoch 1. A constant LR after warmup (``scheduler=None``): a cosine schedule is drawn over ``max_steps``,
so a 20-step run and a 40-step run differ by design.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from test_resume_midepoch import _load, _losses, _lowmem, _max_diff, _optimizer_states, _write_data

from lowmem_lightning.callbacks import LowMemOptimizerCallback
from lowmem_lightning.data import TextDataModule
from lowmem_lightning.modules.causal_lm import CausalLMModule

CONSTANT_LR = ["--model.scheduler=null"]


class RecordBatches(L.Callback):
    """Keeps the sum of each training batch's ``input_ids`` (which blocks were read, in order)."""

    def __init__(self):
        self.sums: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.sums.append(int(batch["input_ids"].sum()))


def _fit(root, data, max_steps, ckpt_path=None, num_workers=0):
    L.seed_everything(7)
    model = CausalLMModule(config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                   "num_attention_heads": 2, "num_key_value_heads": 2}, lr=3e-3, warmup_steps=2)
    record = RecordBatches()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=max_steps, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, default_root_dir=root,
        callbacks=[LowMemOptimizerCallback("adamw_8bit", lr=3e-3, plot=False, print_summary=False), record],
    )
    dm = TextDataModule(str(data), seq_len=32, batch_size=4, val_fraction=0.05, num_workers=num_workers)
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    return model, trainer, record.sums


@pytest.mark.parametrize("num_workers", [0, 2])
def test_checkpoint_saved_after_fit_ended_mid_epoch_resumes_where_it_stopped(tmp_path, num_workers):
    """Also with 2 worker processes, whose prefetched batches a new iterator counted as read."""
    data = _write_data(tmp_path / "words.txt")
    straight, straight_trainer, straight_batches = _fit(tmp_path / "a", data, max_steps=40, num_workers=num_workers)
    _, first, first_batches = _fit(tmp_path / "b", data, max_steps=20, num_workers=num_workers)
    first.save_checkpoint(tmp_path / "after_fit.ckpt")
    assert first_batches == straight_batches[:20]
    resumed, trainer, batches = _fit(tmp_path / "c", data, max_steps=40, ckpt_path=tmp_path / "after_fit.ckpt",
                                     num_workers=num_workers)
    assert trainer.global_step == 40 and batches == straight_batches[20:]
    loader = _load(tmp_path / "after_fit.ckpt")["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    main = loader["_snapshot"]["_main_snapshot"] if num_workers else loader
    # batch 5 of epoch 1 (was epoch 2 with nothing read; with workers, epoch 1 after the prefetched batches)
    assert main["_sampler_iter_state"]["sampler_state"] == {"epoch": 1, "consumed": 20, "world": 1}
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    states = [t.optimizers[0].state_dict()["state"] for t in (straight_trainer, trainer)]
    assert _max_diff(*states) == 0


@pytest.mark.slow
def test_lowmem_fit_extended_with_more_steps_equals_one_longer_run(tmp_path):
    """The user flow: ``--trainer.max_steps 20``, then ``--trainer.max_steps 40 --ckpt_path last`` (the newest
    checkpoint: ``last.ckpt`` of ``save_last``, written at the end of the first fit, step 20) equals one 40-step
    ``lowmem fit``: params, optimizer state, and every loss both log."""
    data = _write_data(tmp_path / "words.txt")
    save_last = ["--trainer.callbacks.save_last=true"]  # the config's ModelCheckpoint (every 10 steps) + last.ckpt
    straight = _lowmem(tmp_path / "straight", data, *CONSTANT_LR, *save_last)
    assert straight.returncode == 0, straight.stderr[-3000:]
    root = tmp_path / "extended"
    first = _lowmem(root, data, *CONSTANT_LR, *save_last, max_steps=20)
    assert first.returncode == 0, first.stderr[-3000:]
    assert _load(root / "ckpt" / "last.ckpt")["global_step"] == 20
    more = _lowmem(root, data, *CONSTANT_LR, *save_last, "--ckpt_path", "last")
    assert more.returncode == 0, more.stderr[-3000:]
    assert "resuming from" in more.stdout + more.stderr
    final_ref, final = (_load(r / "ckpt" / "step=40.ckpt") for r in (tmp_path / "straight", root))
    assert _max_diff(final_ref["state_dict"], final["state_dict"]) == 0.0
    assert _max_diff(_optimizer_states(final_ref), _optimizer_states(final)) == 0.0
    losses_ref, losses = _losses(tmp_path / "straight"), _losses(root)
    assert sorted(losses) == [s for s in sorted(losses_ref) if s >= 20] and losses == {s: losses_ref[s] for s in losses}
