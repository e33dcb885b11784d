"""The end-of-fit plot (state memory against fp32 AdamW, train and val loss), the summary text, and
the progress bar's step counting and metrics line."""

from __future__ import annotations

import re

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lowmem_lightning.callbacks import LowMemOptimizerCallback, StepsAwareRichProgressBar
from lowmem_lightning.callbacks.progress import format_bar_metrics
from lowmem_lightning.callbacks.report import StateHistory, build_figure, format_summary, write_plot

SUMMARY = {
    "optimizer": "paged_adamw_8bit", "steps": 4, "sharded": False, "num_params": 1000, "state_bytes": 2048,
    "state_MiB": 0.5, "state_MiB_device": 0.1, "state_MiB_host": 0.4, "peak_state_MiB": 0.5,
    "bytes_per_param": 2.05, "adamw_fp32_MiB": 2.0, "adamw_fp32_bytes_per_param": 8.0, "saving_MiB": 1.5,
    "saving_pct": 75.0,
}


def _history(host=(0.4, 0.4, 0.4, 0.4)):
    return StateHistory(steps=[1, 2, 3, 4], state_mib=[0.5] * 4, host_mib=list(host), losses=[3.0, None, 2.0, 1.5],
                        val_losses=[(2, 2.5), (4, 1.8)], val_name="val_loss")


def _labels(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_figure_paged_state_against_fp32_adamw_with_losses():
    pytest.importorskip("matplotlib")
    fig = build_figure(_history(), SUMMARY)
    state, loss = fig.axes
    title = fig._suptitle.get_text()
    assert "paged_adamw_8bit" in title and "2.05 bytes/param" in title and "75.0% less" in title
    labels = _labels(state)
    assert labels == ["paged_adamw_8bit on device: 0.100 MiB", "paged_adamw_8bit on host: 0.400 MiB",
                      "fp32 AdamW on the same params: 2.000 MiB, 8.00 bytes/param"]
    (baseline,) = state.get_lines()
    assert list(baseline.get_ydata()) == [2.0, 2.0]
    assert len(state.collections) == 2  # device and host, stacked
    assert state.get_ylim()[0] == 0 and state.get_ylim()[1] > 2.0
    lines = {line.get_label(): line for line in loss.get_lines()}
    assert list(lines["train loss"].get_xdata()) == [1, 3, 4]  # the step without a loss is left out
    assert list(lines["val loss"].get_xdata()) == [2, 4] and list(lines["val loss"].get_ydata()) == [2.5, 1.8]
    assert loss.get_xlabel() == "optimizer step"
    fig.canvas.draw()
    ticks = [t for t in loss.get_xticks() if loss.get_xlim()[0] <= t <= loss.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks  # 4 steps: no "1.5" step


def test_figure_of_a_device_optimizer_has_one_state_line():
    pytest.importorskip("matplotlib")
    summary = {**SUMMARY, "optimizer": "came", "state_MiB_host": 0.0}
    history = _history(host=(0.0,) * 4)
    history.losses = [None] * 4
    history.val_losses = []
    fig = build_figure(history, summary)
    (state,) = fig.axes  # no loss: no loss panel
    assert _labels(state) == ["came: 0.500 MiB, 2.05 bytes/param",
                              "fp32 AdamW on the same params: 2.000 MiB, 8.00 bytes/param"]
    assert list(state.get_lines()[0].get_ydata()) == [0.5] * 4


def test_write_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = write_plot(str(tmp_path / "a" / "state_memory.png"), _history(), SUMMARY)
    assert path is not None and open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert write_plot(str(tmp_path / "b.png"), StateHistory(), SUMMARY) is None


def test_summary_lines_fit_80_columns():
    text = format_summary({**SUMMARY, "num_params": 39_976_960, "steps": 100_000, "state_MiB": 78.13,
                           "peak_state_MiB": 78.13, "adamw_fp32_MiB": 305.0}, plot_path=None)
    lines = text.splitlines()
    assert lines[0] == "LowMemOptimizerCallback: paged_adamw_8bit on 39,976,960 trainable params"
    assert lines[1] == "  state after 100,000 steps: 78.13 MiB (2.05 bytes/param), peak 78.13 MiB"
    assert lines[2] == "  on device 0.100 MiB, on host 0.400 MiB"
    assert lines[3] == "  fp32 AdamW would hold 305.0 MiB (8.00 bytes/param): saving 75.0%"
    assert max(map(len, lines)) <= 80


def test_bar_metrics_are_short_and_val_metrics_carry_their_step():
    metrics = {"v_num": 0, "train_loss": 2.3251, "optim/state_MiB": 0.5286, "val_loss": 2.332, "acc": 0.912345}
    text = format_bar_metrics(metrics, {"val_loss": 200})
    assert text == "loss 2.325 · state 0.53 MiB · val_loss 2.332 (step 200) · acc 0.9123"
    assert format_bar_metrics({"train_loss": 0.000213}) == "loss 0.000213"


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        loss = nn.functional.mse_loss(self.net(batch[0]), batch[1])
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.mse_loss(self.net(batch[0]), batch[1]), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader(n=24):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)  # 3 batches per epoch


def test_step_bounded_bar_counts_optimizer_steps_over_epochs_and_stamps_val(tmp_path):
    bar = StepsAwareRichProgressBar()
    callback = LowMemOptimizerCallback("adamw_8bit", print_summary=False, plot=False)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=7, accumulate_grad_batches=1, val_check_interval=2,
        check_val_every_n_epoch=None, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path, callbacks=[callback, bar],
    )
    trainer.fit(_Tiny(), _loader(), _loader(8))
    task = bar.progress.tasks[bar.train_progress_bar_id]
    assert (task.completed, task.total, task.fields.get("unit")) == (7, 7, "steps")  # not the 1/3 batches of epoch 2
    assert task.description.strip() == "Epoch 2"
    assert "/-" not in task.description
    assert re.search(r"^loss \d+\.\d{3} · state \d+\.\d\d MiB · ", bar._metrics_text)
    assert "val_loss" in bar._metrics_text and "(step 6)" in bar._metrics_text  # last validation: step 6
    assert [s for s, _ in callback.monitor.history.val_losses] == [2, 4, 6]


def test_epoch_bounded_bar_keeps_lightning_counting(tmp_path):
    bar = StepsAwareRichProgressBar()
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path, callbacks=[bar],
    )
    trainer.fit(_Tiny(), _loader())
    task = bar.progress.tasks[bar.train_progress_bar_id]
    assert (task.completed, task.total) == (3, 3)
    assert task.description.strip() == "Epoch 1/1"
