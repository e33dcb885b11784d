"""Resuming a checkpoint written after ``fit`` ended at ``max_steps`` in the middle of an epoch ("train N more
steps"): ``trainer.save_checkpoint`` after ``fit`` returns, and ``lowmem fit --trainer.max_steps 20`` then
``--trainer.max_steps 40 --ckpt_path last``. The longer run resumed must equal one uninterrupted run of as many
steps: params, optimizer state and logged losses. (Lightning drops the loader's iterator when ``fit`` ends, and a
``state_dict()`` afterwards builds a new one: the shuffle sampler used to start the next epoch right there, so the
checkpoint said ``{'epoch': 2, 'yielded': 0}`` and the resumed run skipped the rest of epoch 1.)

Also a fit that stopped on an epoch's last batch (step 30; step 24 with ``limit_train_batches=12``): Lightning's loop,
restored as "restarting on the epoch's last batch", read one more batch in that epoch and then started another,
skipping the rest of the one in between (Lightning issue #19617); now the resumed run starts the next epoch at its
first batch, numbered as the uninterrupted run numbers it. A fit that stopped mid-epoch is numbered as Lightning
numbers it (a plain ``LightningModule`` with a ``StatefulDataLoader`` too): the stopped epoch counts as done, so the
rest of it and every later epoch carry the next number (step 20 is epoch 2, batch 5 after the resume; epoch 1, batch 5
in one run).

Data and model of ``tests/test_resume_midepoch.py``: 60 training blocks, batch 4, 15 steps per epoch; step 20 is
batch 5 of epoch 1. A constant LR after warmup (``scheduler=None``): a cosine schedule is drawn over ``max_steps``,
so a 20-step run and a 40-step run differ by design.
"""

from __future__ import annotations

import csv
import logging

import lightning as L
import pytest
import torch
from lowmem_calls import lowmem_in_process
from test_resume_midepoch import _load, _losses, _lowmem, _lowmem_config, _max_diff, _optimizer_states, _write_data

from lowmem_lightning.callbacks import LowMemOptimizerCallback
from lowmem_lightning.data import TextDataModule
from lowmem_lightning.modules.causal_lm import CausalLMModule

CONSTANT_LR = ["--model.scheduler=null"]


class RecordBatches(L.Callback):
    """Keeps the sum of each training batch's ``input_ids`` (which blocks were read, in order) and, per batch,
    ``(global_step, current_epoch, batch_idx)`` (how Lightning numbers it)."""

    def __init__(self):
        self.sums: list[int] = []
        self.places: list[tuple[int, int, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.sums.append(int(batch["input_ids"].sum()))
        self.places.append((trainer.global_step, trainer.current_epoch, batch_idx))


def _fit(root, data, max_steps, ckpt_path=None, num_workers=0, limit_train_batches=1.0, max_epochs=None,
         checkpoint_every=None):
    L.seed_everything(7)
    model = CausalLMModule(config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                   "num_attention_heads": 2, "num_key_value_heads": 2}, lr=3e-3, warmup_steps=2)
    record = RecordBatches()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=max_steps, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=checkpoint_every is not None,
        default_root_dir=root, callbacks=[
            LowMemOptimizerCallback("adamw_8bit", lr=3e-3, plot=False, print_summary=False), record,
            *_step_checkpoints(root, checkpoint_every)],
        limit_train_batches=limit_train_batches, max_epochs=max_epochs,
    )
    dm = TextDataModule(str(data), seq_len=32, batch_size=4, val_fraction=0.05, num_workers=num_workers)
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    return model, trainer, record


def _step_checkpoints(root, every):
    """A ``ModelCheckpoint`` writing ``root/step=N.ckpt`` every ``every`` steps (none when ``every`` is None)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    return [] if every is None else [ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=every,
                                                     save_top_k=-1)]


def test_checkpoint_of_the_last_batch_limit_train_batches_allows_resumes_as_one_run(tmp_path):
    """A ``ModelCheckpoint(every_n_train_steps)`` written on the last batch ``limit_train_batches`` lets an epoch read
    (inside the epoch: Lightning starts the next one on resume) resumes as one run: the sampler starts the next epoch's
    order too (before, it read on in the stopped epoch's order, which one run never reads: params 0.017 apart with the
    tiny recipe)."""
    data = _write_data(tmp_path / "words.txt")
    straight, _, straight_record = _fit(tmp_path / "a", data, max_steps=18, limit_train_batches=12)
    _fit(tmp_path / "b", data, max_steps=12, limit_train_batches=12, checkpoint_every=12)
    resumed, _, record = _fit(tmp_path / "c", data, max_steps=18, ckpt_path=tmp_path / "b" / "step=12.ckpt",
                              limit_train_batches=12)
    assert record.sums == straight_record.sums[12:]
    assert _max_diff(resumed.state_dict(), straight.state_dict()) == 0


@pytest.mark.parametrize(("stop", "limit", "num_workers", "sampler_state"), [
    (20, 1.0, 0, {"epoch": 1, "consumed": 20, "world": 1}),  # mid-epoch: batch 5 of epoch 1
    (20, 1.0, 2, {"epoch": 1, "consumed": 20, "world": 1}),
    (30, 1.0, 0, {"epoch": 1, "consumed": 60, "world": 1}),  # epoch 1's last batch
    (24, 12, 0, {"epoch": 1, "consumed": 48, "world": 1}),  # the last batch limit_train_batches lets epoch 1 read
], ids=["mid_epoch", "mid_epoch_2_workers", "epoch_end", "epoch_end_of_limit_train_batches"])
def test_checkpoint_saved_after_fit_ended_resumes_where_it_stopped(tmp_path, stop, limit, num_workers, sampler_state):
    """Also with 2 worker processes, whose prefetched batches a new iterator counted as read (the sampler state was
    epoch 2 with nothing read; with workers, epoch 1 after the prefetched batches)."""
    data = _write_data(tmp_path / "words.txt")
    straight, straight_trainer, straight_record = _fit(tmp_path / "a", data, max_steps=40, num_workers=num_workers,
                                                       limit_train_batches=limit)
    _, first, first_record = _fit(tmp_path / "b", data, max_steps=stop, num_workers=num_workers,
                                  limit_train_batches=limit)
    first.save_checkpoint(tmp_path / "after_fit.ckpt")
    assert first_record.sums == straight_record.sums[:stop]
    resumed, trainer, record = _fit(tmp_path / "c", data, max_steps=40, ckpt_path=tmp_path / "after_fit.ckpt",
                                    num_workers=num_workers, limit_train_batches=limit)
    assert trainer.global_step == 40 and record.sums == straight_record.sums[stop:]
    loader = _load(tmp_path / "after_fit.ckpt")["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    main = loader["_snapshot"]["_main_snapshot"] if num_workers else loader
    assert main["_sampler_iter_state"]["sampler_state"] == sampler_state
    ended_mid_epoch = sampler_state["consumed"] == stop  # Lightning counts the stopped epoch as done: one more
    assert record.places == [(step, epoch + ended_mid_epoch, batch)
                             for step, epoch, batch in straight_record.places[stop:]]
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


def test_a_fit_of_2_epochs_resumed_for_a_third_reads_the_third_epochs_order(tmp_path):
    """``max_epochs=2``, ``trainer.save_checkpoint`` after the fit, then ``max_epochs=3`` from it (epoch-based:
    Lightning does not restore the loader's state of a finished epoch, but tells the sampler the epoch it starts): the
    batches, Lightning's numbering, params and optimizer state equal one 3-epoch run's (the resumed run read epoch 0's
    order again: params differed)."""
    data = _write_data(tmp_path / "words.txt")
    straight, straight_trainer, straight_record = _fit(tmp_path / "a", data, max_steps=-1, max_epochs=3)
    _, first, _ = _fit(tmp_path / "b", data, max_steps=-1, max_epochs=2)
    first.save_checkpoint(tmp_path / "two_epochs.ckpt")
    resumed, trainer, record = _fit(tmp_path / "c", data, max_steps=-1, max_epochs=3,
                                    ckpt_path=tmp_path / "two_epochs.ckpt")
    assert trainer.global_step == 45 and record.sums == straight_record.sums[30:]
    assert record.places == straight_record.places[30:]
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    states = [t.optimizers[0].state_dict()["state"] for t in (straight_trainer, trainer)]
    assert _max_diff(*states) == 0


def test_lowmem_fit_resumed_with_a_longer_cosine_schedule_says_how_the_lr_changes(tmp_path, capsys, caplog,
                                                                                  monkeypatch):
    """``--trainer.max_steps 8``, then ``--trainer.max_steps 12 --ckpt_path last`` with ``scheduler: cosine``: the
    schedule is drawn over each run's own length (``trainer.estimated_stepping_batches``, as Lightning and HF Trainer
    do), so the lr jumps back up from the 8-step cosine's end; one line names both lengths and the lr of the first two
    resumed steps, and Lightning's ``LearningRateMonitor`` logs those very lrs at steps 8 and 9. The 8-step run only
    makes the checkpoint, so it calls ``lowmem``'s entry point in this process; the resume, whose output is checked,
    is a real ``lowmem`` process."""
    from lowmem_lightning.modules.base import warmup_cosine_factor

    data = _write_data(tmp_path / "words.txt")
    root = tmp_path / "run"
    args = ["--trainer.callbacks.save_last=true", "--trainer.limit_val_batches=0",
            "--trainer.callbacks+=lightning.pytorch.callbacks.LearningRateMonitor"]
    config = _lowmem_config(root, data, max_steps=8)
    with caplog.at_level(logging.INFO):
        first = lowmem_in_process(capsys, monkeypatch, root, "fit", "--config", str(config), *args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "cosine LR schedule" not in first.stdout + first.stderr + caplog.text
    more = _lowmem(root, data, *args, "--ckpt_path", "last", max_steps=12)
    assert more.returncode == 0, more.stderr[-3000:]
    before, after = 3e-3 * warmup_cosine_factor(5, 8, 0.1)(8), 3e-3 * warmup_cosine_factor(5, 12, 0.1)(9)
    assert before == pytest.approx(3e-4) and after > 2 * before  # the 8-step cosine ended at min_lr; the 12 goes up
    line = (f"CausalLMModule: the cosine LR schedule is 12 steps long in this run, 8 in the checkpoint's "
            f"(trainer.estimated_stepping_batches): step 8 runs at lr {before:.3g} (the checkpoint's schedule), "
            f"step 9 at {after:.3g} (this run's).")
    assert (more.stdout + more.stderr).count(line) == 1, (more.stdout + more.stderr)[-3000:]
    rows = list(csv.DictReader(open(max(root.glob("logs/version_*/metrics.csv")))))
    logged = {int(r["step"]): float(r["lr-AdamW8bit/pg1"]) for r in rows if r.get("lr-AdamW8bit/pg1")}
    assert logged[8] == pytest.approx(before, rel=1e-6) and logged[9] == pytest.approx(after, rel=1e-6)
