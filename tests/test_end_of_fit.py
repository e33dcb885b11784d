"""End-of-fit work never costs the model: a failing plot or summary is a warning and fit completes;
``CausalLMModule`` saves its model when training ends, ahead of (and despite) any callback failure.
Also the one-line warning for a non-resumable user dataloader and SIGTERM without a checkpoint."""

from __future__ import annotations

import os
import signal

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

import lowmem_lightning.callbacks.monitor as monitor_module
from lowmem_lightning.callbacks import LowMemOptimizerCallback
from lowmem_lightning.data import TextDataModule
from lowmem_lightning.modules.causal_lm import CausalLMModule

TINY = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 2}


class Boom(L.Callback):
    """Raises in the hook named ``hook``."""

    def __init__(self, hook: str):
        self.hook = hook

    def __getattribute__(self, name):
        if name == object.__getattribute__(self, "hook"):
            def fail(*args, **kwargs):
                raise RuntimeError(f"boom in {name}")
            return fail
        return object.__getattribute__(self, name)


def _fit(tmp_path, *callbacks, logger=False, max_steps=3):
    (tmp_path / "d.txt").write_text("the quick brown fox jumps over the lazy dog " * 40)
    model = CausalLMModule(config=TINY, optimizer="adamw", lr=1e-3, save_dir=str(tmp_path / "model"))
    dm = TextDataModule(str(tmp_path / "d.txt"), seq_len=16, batch_size=4, val_fraction=0.0)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=logger, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[LowMemOptimizerCallback("adamw_8bit", lr=1e-3), *callbacks])
    trainer.fit(model, dm)
    return trainer


def test_plot_write_failure_is_a_warning_and_the_model_is_saved(tmp_path, monkeypatch, capsys):
    def full_disk(path, *args):
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(monitor_module, "write_plot", full_disk)
    after = Boom("never")  # a later callback's on_fit_end still runs
    seen = []
    after.on_fit_end = lambda trainer, module: seen.append("on_fit_end")
    with pytest.warns(UserWarning, match=r"could not write the plot .*state_memory.png: OSError: .*No space left"):
        trainer = _fit(tmp_path, after, logger=CSVLogger(tmp_path / "logs"))
    assert trainer.state.finished and seen == ["on_fit_end"]
    assert (tmp_path / "model" / "model.safetensors").is_file()
    callback = trainer.callbacks[0]
    assert callback.summary["plot"] is None and callback.summary["steps"] == 3


def test_odd_log_dir_plot_path_is_a_directory(tmp_path):
    logger = CSVLogger(tmp_path / "logs", version=0)
    (tmp_path / "logs" / "lightning_logs" / "version_0" / "state_memory.png").mkdir(parents=True)
    pytest.importorskip("matplotlib")
    with pytest.warns(UserWarning, match=r"could not write the plot .*version_0/state_memory.png: IsADirectoryError"):
        trainer = _fit(tmp_path, logger=logger)
    assert trainer.state.finished and (tmp_path / "model" / "model.safetensors").is_file()


def test_summary_print_failure_is_a_warning(tmp_path, monkeypatch):
    def broken(*args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(monitor_module, "rank_zero_info", broken)
    with pytest.warns(UserWarning, match=r"could not write the end-of-fit summary to the console: BrokenPipeError"):
        trainer = _fit(tmp_path)
    assert trainer.state.finished and (tmp_path / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("hook", ["on_fit_end", "on_train_end"])
def test_a_failing_callback_after_training_cannot_cost_the_model(tmp_path, hook):
    with pytest.raises(RuntimeError, match=f"boom in {hook}"):
        _fit(tmp_path, Boom(hook))
    assert (tmp_path / "model" / "model.safetensors").is_file()


def test_a_run_failing_mid_training_saves_no_model(tmp_path):
    with pytest.raises(RuntimeError, match="boom in on_train_batch_end"):
        _fit(tmp_path, Boom("on_train_batch_end"))
    assert not (tmp_path / "model").exists()


class _Regression(L.LightningModule):
    def __init__(self, loader):
        super().__init__()
        self.net, self.loader = torch.nn.Linear(4, 1), loader

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])

    def train_dataloader(self):
        return self.loader

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters())


def _regression_fit(tmp_path, loader_cls, checkpoint=True):
    x = torch.randn(32, 4)
    loader = loader_cls(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8, shuffle=True)
    callbacks = [LowMemOptimizerCallback("adamw_8bit", print_summary=False, plot=False)]
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, enable_checkpointing=checkpoint,
                        callbacks=callbacks + ([ModelCheckpoint(dirpath=tmp_path)] if checkpoint else []))
    trainer.fit(_Regression(loader))


def _resume_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "cannot save its position" in str(w.message)]


def test_plain_dataloader_gets_one_warning_line_when_the_run_checkpoints(tmp_path, recwarn):
    _regression_fit(tmp_path, DataLoader)
    [message] = _resume_warnings(recwarn)
    assert "\n" not in message and "DataLoader" in message and "StatefulDataLoader" in message


@pytest.mark.parametrize(("loader_cls", "checkpoint"), [(StatefulDataLoader, True), (DataLoader, False)])
def test_no_warning_for_a_resumable_loader_or_without_checkpoints(tmp_path, recwarn, loader_cls, checkpoint):
    _regression_fit(tmp_path, loader_cls, checkpoint)
    assert _resume_warnings(recwarn) == []


class _SigtermAt(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 1:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_without_a_checkpoint_callback_says_nothing_was_saved(tmp_path):
    with pytest.warns(UserWarning, match=r"SIGTERM received at step 2.*no checkpoint is saved"):
        with pytest.raises(SystemExit):
            _fit(tmp_path, _SigtermAt(), max_steps=5)
    assert not (tmp_path / "model").exists()


def test_summary_says_why_small_tensors_save_little(tmp_path):
    """Tensors under 4096 elements keep 32-bit state: on a model made mostly of them the summary says
    so (and how many params and bytes/param), instead of an unexplained small saving."""
    from lowmem_lightning.callbacks.report import format_summary

    trainer = _fit(tmp_path)
    (callback,) = [c for c in trainer.callbacks if isinstance(c, LowMemOptimizerCallback)]
    summary = callback.summary
    small = sum(p.numel() for p in trainer.lightning_module.parameters() if p.numel() < 4096)
    assert summary["small_params"] == small > 0
    assert summary["small_state_bytes"] >= 8 * small  # exp_avg + exp_avg_sq in fp32
    text = format_summary(summary, None)
    assert f"{small:,} params" in text and "under 4,096 elements" in text and "32-bit state" in text
    assert all(len(line) <= 80 for line in text.splitlines())
    big = {**summary, "small_params": 10, "small_state_bytes": 80}  # a negligible share: no note
    assert "under 4,096 elements" not in format_summary(big, None)


def test_summary_of_a_stateless_optimizer_claims_no_32_bit_state():
    """SGD without momentum keeps a step counter per tensor and nothing per element: the summary said its small
    tensors "keep 32-bit state (0.04 bytes/param there)"."""
    from lowmem_lightning.callbacks.report import format_summary

    summary = {"reporter": "LowMemOptimizerCallback", "optimizer": "sgd", "steps": 12, "sharded": False,
               "num_params": 271_392, "state_bytes": 228, "state_MiB": 228 / 2**20, "state_MiB_device": 228 / 2**20,
               "state_MiB_host": 0.0, "peak_state_MiB": 228 / 2**20, "bytes_per_param": 228 / 271_392,
               "adamw_fp32_MiB": 2.071, "adamw_fp32_bytes_per_param": 8.0, "saving_MiB": 2.07, "saving_pct": 100.0,
               "small_params": 480, "small_state_bytes": 20}  # 5 step counters, as `--optim sgd` on tiny.yaml
    assert "32-bit state" not in format_summary(summary, None)
    fp32 = {**summary, "small_state_bytes": 8 * 480 + 20}  # exp_avg + exp_avg_sq: the note stays
    assert "32-bit state (8.04 bytes/param there)" in format_summary(fp32, None)


def test_the_saved_model_is_readable_as_other_new_files_and_saving_draws_no_bar(tmp_path, capfd):
    """transformers 5 writes ``model.safetensors`` with mode 0600 (its config.json gets the umask's 0644), so a
    model saved for serving from another account could not be read there; and its "Writing model shards" bar
    drew over the run's output. The saved files get the mode any new file gets under the umask, without a bar."""
    import os

    old = os.umask(0o022)
    try:
        _fit(tmp_path)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "model").iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == 0o644, modes
    assert "Writing model shards" not in "".join(capfd.readouterr())


def test_a_run_that_wrote_no_checkpoint_says_so_in_the_summary(tmp_path):
    """`lowmem fit --config tiny.yaml --trainer.max_steps 4`: ModelCheckpoint saves after validation (every 100
    steps there), so the run wrote none, and `lowmem export --ckpt_path last` then said "no checkpoint" with no
    hint why. The summary says it; a run that wrote one, or has no ModelCheckpoint, does not."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lowmem_lightning.callbacks.monitor import no_checkpoint_note

    class _Stub:
        fast_dev_run, global_step, val_check_interval = False, 4, 100

        def __init__(self, callbacks):
            self.checkpoint_callbacks = callbacks

    unsaved = ModelCheckpoint(dirpath=tmp_path)
    note = no_checkpoint_note(_Stub([unsaved]))
    assert note.splitlines() == ["  no checkpoint written: ModelCheckpoint saves after validation",
                                 "  (every 100 steps here), which these 4 steps never reached"]
    every = no_checkpoint_note(_Stub([ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=200)]))
    assert every.splitlines() == ["  no checkpoint written: ModelCheckpoint saves every 200",
                                  "  steps (every_n_train_steps), which these 4 steps never reached"]
    assert no_checkpoint_note(_Stub([])) is None
    assert no_checkpoint_note(_Stub([ModelCheckpoint(dirpath=tmp_path, save_top_k=0)])) is None
    saved = ModelCheckpoint(dirpath=tmp_path)
    saved.best_model_path = str(tmp_path / "step=4.ckpt")
    assert no_checkpoint_note(_Stub([saved])) is None
    stub = _Stub([unsaved])
    stub.val_check_interval = 0.5
    assert no_checkpoint_note(stub).splitlines()[1] == "  which these 4 steps never reached"
