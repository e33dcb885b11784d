"""Checkpoints with the swapped-in optimizer: quantized state inside, bit-exact resume, optimizer changes."""

import logging
import os
import signal

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lowmem_lightning.callbacks import LowMemOptimizerCallback
from lowmem_lightning.modules.base import LowMemModule
from lowmem_lightning.optim import optimizer_class

OPT = "adamw_8bit"


class Net(L.LightningModule):
    """A 5120-element weight (quantized state) plus small tensors (32-bit state), AdamW + StepLR."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 80), nn.Tanh(), nn.Linear(80, 64), nn.Tanh(), nn.Linear(64, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-3)
        return [opt], [{"scheduler": torch.optim.lr_scheduler.StepLR(opt, 2, 0.7), "interval": "step"}]


def _data():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(24, 16, generator=g)
    return DataLoader(TensorDataset(x, torch.sin(x[:, :1])), batch_size=8)  # 3 steps per epoch


def _fit(tmp_path, max_epochs, optimizer=OPT, ckpt_path=None, callbacks=True, lr=2e-3, accumulate=1, extra=()):
    torch.manual_seed(0)
    model = Net()
    ours = [LowMemOptimizerCallback(optimizer, lr=lr, print_summary=False, plot=False)] if callbacks else []
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=max_epochs, logger=False, enable_checkpointing=bool(extra),
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        accumulate_grad_batches=accumulate, callbacks=[*ours, *extra],
    )
    try:
        trainer.fit(model, _data(), ckpt_path=ckpt_path)
    except SIGTERMException:
        pass
    return trainer, model


def test_resume_is_bit_exact_and_checkpoint_holds_quantized_state(tmp_path):
    _, straight = _fit(tmp_path / "a", max_epochs=2)

    first, _ = _fit(tmp_path / "b", max_epochs=1)
    path = tmp_path / "epoch1.ckpt"
    first.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    states = checkpoint["optimizer_states"][0]["state"]
    dtypes = {value.dtype for state in states.values() for value in state.values()}
    assert {torch.int8, torch.uint8} <= dtypes  # 8-bit codes travel in the checkpoint
    assert checkpoint["callbacks"]["LowMemOptimizerCallback"]["optimizer"] == OPT

    resumed_trainer, resumed = _fit(tmp_path / "c", max_epochs=2, ckpt_path=path)
    assert resumed_trainer.global_step == 6
    assert type(resumed_trainer.optimizers[0]) is optimizer_class(OPT)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert resumed_trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(2e-3 * 0.7**3)


def test_resume_with_another_optimizer_is_a_clear_error(tmp_path):
    first, _ = _fit(tmp_path, max_epochs=1)
    path = tmp_path / "epoch1.ckpt"
    first.save_checkpoint(path)
    with pytest.raises(ValueError, match=r"trained with optimizer 'adamw_8bit'.*optimizer='sgd'.*Resume with"):
        _fit(tmp_path, max_epochs=2, optimizer="sgd", ckpt_path=path)


def test_plain_torch_adamw_checkpoint_is_recognised(tmp_path):
    first, _ = _fit(tmp_path, max_epochs=1, callbacks=False)  # the module's own torch AdamW
    path = tmp_path / "plain.ckpt"
    first.save_checkpoint(path)
    with pytest.raises(ValueError, match="trained with optimizer 'adamw'"):
        _fit(tmp_path, max_epochs=2, optimizer="sgd", ckpt_path=path)


def test_fp32_adamw_checkpoint_converts_to_8bit(tmp_path):
    first, _ = _fit(tmp_path, max_epochs=1, optimizer="adamw")
    path = tmp_path / "fp32.ckpt"
    first.save_checkpoint(path)
    fp32_states = first.optimizers[0].state_dict()["state"]
    trainer, model = _fit(tmp_path, max_epochs=2, optimizer=OPT, ckpt_path=path)
    assert trainer.global_step == 6
    opt = trainer.optimizers[0]
    assert type(opt) is optimizer_class(OPT)
    dtypes = {v.dtype for state in opt.state.values() for v in state.values()}
    assert torch.uint8 in dtypes
    assert len(opt.state) == len(fp32_states)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_resume_with_a_new_lr_applies_it_and_says_so(tmp_path, caplog):
    """The checkpoint's param groups and StepLR carry lr 2e-3; resuming with lr=1e-3 trains at 1e-3 from
    there, on the same schedule position (Lightning's restore alone would bring back 2e-3)."""
    first, _ = _fit(tmp_path, max_epochs=1)
    path = tmp_path / "epoch1.ckpt"
    first.save_checkpoint(path)
    trainer, _ = _fit(tmp_path, max_epochs=2, lr=1e-3, ckpt_path=path)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3 * 0.7**3)
    assert trainer.lr_scheduler_configs[0].scheduler.base_lrs == [pytest.approx(1e-3)]
    assert "Resumed with a new learning rate: base lr 0.002 -> 0.001" in caplog.text
    caplog.clear()
    _fit(tmp_path, max_epochs=2, ckpt_path=path)  # the same lr: nothing to say
    assert "new learning rate" not in caplog.text


class _SigtermAtBatch(L.Callback):
    def __init__(self, batch):
        self.batch = batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.fit_loop.total_batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_inside_an_accumulation_window_finishes_it(tmp_path):
    """3 batches per epoch, accumulate_grad_batches=3: SIGTERM at batch 4 (the middle of step 2's window)
    stops after batch 5, the window's end; resuming from last.ckpt ends exactly where the straight run does."""
    _, straight = _fit(tmp_path / "a", max_epochs=3, accumulate=3)
    handler = signal.getsignal(signal.SIGTERM)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "b", save_top_k=0)
    stopped, _ = _fit(tmp_path / "b", max_epochs=3, accumulate=3, extra=[ckpt, _SigtermAtBatch(4)])
    assert stopped.global_step == 2 and stopped.fit_loop.total_batch_idx == 5
    assert signal.getsignal(signal.SIGTERM) == handler  # the fit's SIGTERM handler is given back
    path = tmp_path / "b" / "last.ckpt"
    assert torch.load(path, weights_only=False)["global_step"] == 2
    resumed, model = _fit(tmp_path / "c", max_epochs=3, accumulate=3, ckpt_path=path)
    assert resumed.global_step == 3
    for a, b in zip(straight.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_sigterm_checkpoint_prints_no_weights_only_chatter(tmp_path, caplog):
    """The SIGTERM save says what it saved and how to resume, and not Lightning's "`weights_only` was not set,
    defaulting to `False`." (logged by ``trainer.save_checkpoint`` without ``weights_only``; the lowmem command
    shows it on the final screen, right above the resume line)."""
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=0)
    with caplog.at_level(logging.INFO):
        _fit(tmp_path, max_epochs=3, extra=[ckpt, _SigtermAtBatch(4)])
    assert "SIGTERM received: saved a resumable checkpoint" in caplog.text
    assert "weights_only" not in caplog.text, caplog.text
    assert "optimizer_states" in torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)  # resumable


class LowMemNet(LowMemModule):
    """The same network as a LowMemModule whose own optimizer is ``optimizer``."""

    def __init__(self, optimizer="sgd"):
        super().__init__(optimizer=optimizer, lr=1e-2)
        self.net = nn.Sequential(nn.Linear(16, 80), nn.Tanh(), nn.Linear(80, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)


def _fit_lowmem(root, optimizer, callback, ckpt_path=None, max_epochs=1):
    torch.manual_seed(0)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=max_epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
        callbacks=[LowMemOptimizerCallback(callback, lr=2e-3, print_summary=False, plot=False)] if callback else [],
    )
    trainer.fit(LowMemNet(optimizer), _data(), ckpt_path=ckpt_path)
    return trainer


def test_checkpoint_of_the_callback_resumed_without_it_says_how(tmp_path):
    """Written with LowMemOptimizerCallback('adamw_8bit') over the module's sgd; resumed without the callback,
    the module's sgd would get 8-bit AdamW state: refused before any step, naming the optimizer and the fix."""
    path = tmp_path / "cb.ckpt"
    _fit_lowmem(tmp_path, "sgd", "adamw_8bit").save_checkpoint(path)
    match = r"LowMemOptimizerCallback\(optimizer='adamw_8bit'\).*no LowMemOptimizerCallback.*'sgd'.*--optim adamw_8bit"
    with pytest.raises(ValueError, match=match):
        _fit_lowmem(tmp_path, "sgd", None, ckpt_path=path, max_epochs=2)
    assert _fit_lowmem(tmp_path, "sgd", "adamw_8bit", ckpt_path=path, max_epochs=2).global_step == 6  # with it
    assert _fit_lowmem(tmp_path, "adamw_8bit", None, ckpt_path=path, max_epochs=2).global_step == 6  # same state


def test_failed_sigterm_save_leaves_no_last_ckpt_and_no_resume_command(tmp_path, monkeypatch, caplog):
    """A SIGTERM checkpoint that cannot be written (the disk fills after 100 bytes) ends the fit with one
    CheckpointWriteError naming last.ckpt; no last.ckpt (empty or partial) nor temporary file is left, and the
    'Resume with --ckpt_path' line, which would name a file that does not exist, is not printed."""
    import errno

    from lowmem_lightning.callbacks.checkpoint_io import CheckpointWriteError

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=0)
    with pytest.raises(CheckpointWriteError, match=r"last\.ckpt.*full"):
        _fit(tmp_path, max_epochs=3, extra=[ckpt, _SigtermAtBatch(4)])
    assert list((tmp_path / "ckpt").iterdir()) == []
    assert "--ckpt_path" not in caplog.text


class _ValNet(Net):
    def validation_step(self, batch, batch_idx):
        return self.training_step(batch, batch_idx)


class _SigtermInSanityCheck(L.Callback):
    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if trainer.sanity_checking and batch_idx == 0:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_during_the_sanity_check_stops_at_the_first_step_with_a_checkpoint(tmp_path):
    """The callback's handler is in place from the sanity check on (Lightning's alone stops that rank inside
    the sanity check, before any step or checkpoint, and out of step with the other ranks)."""
    torch.manual_seed(0)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=2, default_root_dir=tmp_path,
        callbacks=[LowMemOptimizerCallback(OPT, lr=2e-3, print_summary=False, plot=False),
                   ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=0), _SigtermInSanityCheck()],
    )
    with pytest.raises(SIGTERMException):
        trainer.fit(_ValNet(), _data(), _data())
    assert trainer.global_step == 1
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["global_step"] == 1
