"""Field walk: a researcher comparing optimizers under Lightning's loggers.

Their own project (``save_hyperparameters()``, torch ``AdamW`` in ``configure_optimizers``) with
``LowMemOptimizerCallback`` under ``TensorBoardLogger`` and ``CSVLogger`` at once and ``LearningRateMonitor``; a sweep
of trials in one process, a new Trainer each; ``lowmem fit`` with TensorBoard and CSV loggers from the YAML. What
TensorBoard shows is read from the event files as its dashboards read them (the hparams dashboard keeps a run's first
record: ``plugin_event_accumulator`` keeps the first metadata of a tag).
"""

from __future__ import annotations

import csv
import gc
import tracemalloc
import weakref
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from chat_recipes import run_lowmem
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lowmem_calls import lowmem_in_process
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lowmem_lightning import LowMemOptimizerCallback
from lowmem_lightning.callbacks.run_record import SUMMARY_METRICS, summary_metrics

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing import event_accumulator, plugin_event_accumulator  # noqa: E402
from tensorboard.plugins.hparams import metadata as hparams_metadata  # noqa: E402
from tensorboard.plugins.hparams import plugin_data_pb2  # noqa: E402


class Project(L.LightningModule):
    """A user's module: its hyperparameters saved, torch AdamW with a per-step StepLR, a val loss."""

    def __init__(self, lr: float = 1e-3, weight_decay: float = 0.01, width: int = 32):
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, width))
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        loss = nn.functional.mse_loss(self(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.mse_loss(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        return [opt], [{"scheduler": torch.optim.lr_scheduler.StepLR(opt, 2, 0.5), "interval": "step"}]


def _data():
    x = torch.randn(48, 16, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, x[:, :1].tanh()), batch_size=8)


def _fit(module, callbacks, logger, **kwargs):
    opts = dict(accelerator="cpu", max_steps=4, logger=logger, callbacks=callbacks, log_every_n_steps=1,
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                limit_val_batches=1, val_check_interval=2)
    trainer = L.Trainer(**{**opts, **kwargs})
    trainer.fit(module, _data(), _data())
    return trainer


def dashboard_record(run_dir: Path) -> tuple[dict, list[str]]:
    """What TensorBoard's hparams dashboard shows for the run in ``run_dir`` (its first record), and its metrics."""
    acc = plugin_event_accumulator.EventAccumulator(str(run_dir))
    acc.Reload()
    content = acc.PluginTagToContent(hparams_metadata.PLUGIN_NAME)
    start = plugin_data_pb2.HParamsPluginData.FromString(content[hparams_metadata.SESSION_START_INFO_TAG])
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content[hparams_metadata.EXPERIMENT_TAG])
    hparams = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.session_start_info.hparams.items()}
    return hparams, [m.name.tag for m in experiment.experiment.metric_infos]


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the run in ``run_dir``: ``[(step, value), ...]``."""
    acc = event_accumulator.EventAccumulator(str(run_dir), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def csv_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_both_loggers_record_the_optimizer_that_trained_and_the_summary(tmp_path):
    """Before: hparams.yaml and TensorBoard's hparams dashboard held only the module's ``lr``/``weight_decay`` (its
    torch AdamW), and the end-of-fit figures were printed only. Now both loggers hold ``lowmem/*`` (the module's own
    keys unchanged) and the summary's figures once, at the last step; the dashboard's metric columns show them."""
    tb, csv_logger = TensorBoardLogger(tmp_path, name="tb"), CSVLogger(tmp_path, name="csv")
    callback = LowMemOptimizerCallback("adamw_8bit", lr=3e-3, optimizer_kwargs={"betas": (0.9, 0.95)},
                                       print_summary=False)
    monitor = LearningRateMonitor(logging_interval="step", log_momentum=True)
    trainer = _fit(Project(lr=1e-3), [callback, monitor], [tb, csv_logger])
    ours = {"lowmem/optimizer": "adamw_8bit", "lowmem/optimizer_class": "AdamW8bit", "lowmem/replaced": "AdamW",
            "lowmem/lr": 3e-3, "lowmem/weight_decay": 0.01, "lowmem/step_in_backward": False}
    for logger in (tb, csv_logger):
        saved = yaml.safe_load((Path(logger.log_dir) / "hparams.yaml").read_text())
        assert saved == {"lr": 1e-3, "weight_decay": 0.01, "width": 32, **ours, "lowmem/fp32_state": None,
                         "lowmem/optimizer_kwargs": {"betas": [0.9, 0.95]}}
    shown, columns = dashboard_record(Path(tb.log_dir))
    assert shown["lr"] == pytest.approx(1e-3) and shown["width"] == 32
    assert {k: shown[k] for k in ours} == pytest.approx({**ours, "lowmem/step_in_backward": 0})  # torch: bool->number
    assert shown["lowmem/optimizer_kwargs/betas"] == "[0.9, 0.95]"
    assert columns == ["hp_metric", *SUMMARY_METRICS]
    expected = summary_metrics(callback.summary)
    assert expected["optim_summary/bytes_per_param"] == pytest.approx(callback.summary["bytes_per_param"])
    logged = scalars(Path(tb.log_dir))
    assert {name: logged[name] for name in SUMMARY_METRICS} == {
        name: [(trainer.global_step - 1, pytest.approx(value))] for name, value in expected.items()}
    assert [step for step, _ in logged["optim/state_MiB"]] == list(range(4))  # per step, as before
    assert "lr-AdamW" in logged and "lr-AdamW-momentum" in logged
    rows = [r for r in csv_rows(Path(csv_logger.log_dir)) if r["optim_summary/state_MiB"]]
    assert len(rows) == 1 and int(rows[0]["step"]) == trainer.global_step - 1
    assert {name: float(rows[0][name]) for name in SUMMARY_METRICS} == pytest.approx(expected)


class OwnDashboard(Project):
    """Lightning's documented way to choose TensorBoard's hparams metrics: ``default_hp_metric=False`` and one
    ``log_hyperparams`` call with the metrics at train start."""

    def on_train_start(self):
        self.logger.log_hyperparams(self.hparams, {"hp/val_loss": 0.0})


def test_a_users_own_dashboard_record_stays_theirs(tmp_path):
    """With ``default_hp_metric=False`` the user writes the run's hparams record: ours stay out of it (they would
    take its place: TensorBoard keeps the first) and go to hparams.yaml."""
    tb = TensorBoardLogger(tmp_path, default_hp_metric=False)
    _fit(OwnDashboard(), [LowMemOptimizerCallback("lion_8bit", lr=1e-4, print_summary=False)], tb)
    shown, columns = dashboard_record(Path(tb.log_dir))
    assert columns == ["hp/val_loss"] and set(shown) == {"lr", "weight_decay", "width"}
    saved = yaml.safe_load((Path(tb.log_dir) / "hparams.yaml").read_text())
    assert saved["lowmem/optimizer"] == "lion_8bit" and saved["lr"] == 1e-3


def test_no_logger_and_log_state_memory_false_log_nothing(tmp_path):
    """``logger=False`` fits as before; ``log_state_memory=False`` logs no summary metrics (the hparams still)."""
    _fit(Project(), [LowMemOptimizerCallback("came", print_summary=False, plot=False)], False)
    logger = CSVLogger(tmp_path)
    _fit(Project(), [LowMemOptimizerCallback("came", log_state_memory=False, print_summary=False)], logger)
    assert not any(k.startswith(("optim/", "optim_summary/")) for k in csv_rows(Path(logger.log_dir))[0])
    assert yaml.safe_load((Path(logger.log_dir) / "hparams.yaml").read_text())["lowmem/optimizer"] == "came"


class LogsOurNames(Project):
    def training_step(self, batch, batch_idx):
        self.log("optim/state_MiB", 123.0)
        self.log("optim_summary/saving_pct", 7.0)
        return super().training_step(batch, batch_idx)


def test_a_metric_name_the_module_logs_itself_stays_the_modules(tmp_path):
    """Before: the module's own ``optim/state_MiB`` reached the logger as the monitor's value, silently (logged later
    in the same step). Now the monitor leaves such a name to the module (per step and in the summary), in one
    warning; its other metrics are logged as before."""
    logger = CSVLogger(tmp_path)
    with pytest.warns(UserWarning, match=r"the module logs optim/state_MiB, optim_summary/saving_pct itself") as seen:
        _fit(LogsOurNames(), [LowMemOptimizerCallback("adamw_8bit", print_summary=False, plot=False)], logger)
    assert sum("logs optim/state_MiB" in str(w.message) for w in seen) == 1
    rows = csv_rows(Path(logger.log_dir))
    assert {r["optim/state_MiB"] for r in rows if r["train_loss"]} == {"123.0"}
    assert {r["optim_summary/saving_pct"] for r in rows if r["train_loss"]} == {"7.0"}
    assert all(r["optim/state_bytes_per_param"] for r in rows if r["train_loss"])
    (summary,) = [r for r in rows if r["optim_summary/state_MiB"]]
    assert not summary["optim_summary/saving_pct"]


class TwoGroups(Project):
    def configure_optimizers(self):
        return torch.optim.AdamW([{"params": self.body.parameters()},
                                  {"params": self.head.parameters(), "lr": 3e-4}], lr=1e-3)


@pytest.mark.parametrize("optimizer, kwargs, momentum", [
    ("adafactor", {"relative_step": False, "scale_parameter": False}, 0.0),  # no beta1: Lightning logs 0
    ("muon_8bit", {}, 0.95),  # Muon's momentum, in both groups (the head's AdamW part uses adamw_betas[0])
])
def test_learning_rate_monitor_with_momentum_logs_every_group(tmp_path, optimizer, kwargs, momentum):
    """``LearningRateMonitor(log_momentum=True)`` on groups without ``betas``: each group's lr and momentum."""
    logger = CSVLogger(tmp_path)
    callback = LowMemOptimizerCallback(optimizer, lr=1e-3, optimizer_kwargs=kwargs, print_summary=False, plot=False)
    _fit(TwoGroups(), [callback, LearningRateMonitor("step", log_momentum=True)], logger)
    rows = csv_rows(Path(logger.log_dir))
    name = f"lr-{type(callback.optimizers[0]).__name__}"
    last = {k: float(next(r[k] for r in reversed(rows) if r[k])) for k in rows[0] if k.startswith(name)}
    assert last == {f"{name}/pg1": 1e-3, f"{name}/pg1-momentum": momentum,
                    f"{name}/pg2": 3e-4, f"{name}/pg2-momentum": momentum}


SWEEP = [("adamw_8bit", 1e-3), ("muon", 2e-2), ("came", 1e-3), ("lion_8bit", 1e-4), ("muon_8bit", 2e-2),
         ("adamw_4bit", 1e-3)]


def _trial(root: Path, optimizer: str, lr: float) -> tuple[dict, str, list]:
    """One sweep trial as a user's loop writes it: a new module, callback and Trainer, both loggers; returns the
    summary, the TensorBoard run dir and weak references to what the trial built."""
    callback = LowMemOptimizerCallback(optimizer, lr=lr, print_summary=False, plot=False)
    module = Project(lr=lr, width=128)  # a 128x128 matrix: quantized state (4096 elements or more)
    loggers = [TensorBoardLogger(root, name="sweep"), CSVLogger(root, name="sweep_csv")]
    trainer = _fit(module, [callback, LearningRateMonitor("step")], loggers, max_steps=5, limit_val_batches=0)
    refs = [weakref.ref(x) for x in (trainer, callback, callback.monitor, callback.optimizers[0], module)]
    return callback.summary, trainer.log_dir, refs


def test_a_sweep_in_one_process_keeps_each_trial_apart_and_frees_it(tmp_path):
    """Six trials (8-bit, 4-bit, Muon, CAME, Lion), then two again: each its own version dir with its optimizer's
    hparams and summary; nothing of an earlier trial alive after gc; traced memory flat once every optimizer ran."""
    tracemalloc.start()
    try:
        seen, traced = [], []
        for optimizer, lr in SWEEP + SWEEP[:2]:
            summary, run_dir, refs = _trial(tmp_path, optimizer, lr)
            gc.collect()
            assert [r() for r in refs] == [None] * len(refs), optimizer
            traced.append(tracemalloc.get_traced_memory()[0])
            seen.append((optimizer, summary, Path(run_dir)))
    finally:
        tracemalloc.stop()
    assert [run.name for _, _, run in seen] == [f"version_{i}" for i in range(len(seen))]
    for optimizer, summary, run in seen:
        assert summary["optimizer"] == optimizer and summary["steps"] == 5
        assert dashboard_record(run)[0]["lowmem/optimizer"] == optimizer
        assert scalars(run)["optim_summary/bytes_per_param"] == [(4, pytest.approx(summary["bytes_per_param"]))]
        saved = yaml.safe_load((tmp_path / "sweep_csv" / run.name / "hparams.yaml").read_text())
        assert saved["lowmem/optimizer"] == optimizer and saved["lr"] == dict(SWEEP)[optimizer]
    per_param = {optimizer: summary["bytes_per_param"] for optimizer, summary, _ in seen}
    assert per_param["adamw_4bit"] < per_param["adamw_8bit"] < per_param["came"]
    assert [s["bytes_per_param"] for _, s, _ in seen[-2:]] == [s["bytes_per_param"] for _, s, _ in seen[:2]]
    assert traced[-1] - traced[len(SWEEP) - 1] < 2**19  # the repeated trials left nothing behind (measured ~4 KiB)


TB_AND_CSV = {"trainer": {"logger": [
    {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "runs", "name": "tb"}},
    {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs", "name": "csv"}},
]}}
SMALL = ["--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1", "--data.init_args.seq_len", "32",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def test_lowmem_fit_with_two_loggers_records_the_optim_choice_and_resumes_last(tmp_path, capsys, monkeypatch):
    """``lowmem fit --optim came`` with TensorBoard and CSV loggers from the YAML: config.yaml, checkpoints and the plot
    in the first logger's version dir, each logger's hparams say ``came`` (the module's own ``optimizer`` hparam,
    unused beside the callback, still says the recipe's ``adamw_8bit``), and ``--ckpt_path last`` resumes from it
    into version_1 of both. The first fit, checked by the files it writes, calls ``lowmem``'s entry point in this
    process; the resume, whose printed summary is checked too, is a real ``lowmem`` process."""
    (tmp_path / "loggers.yaml").write_text(yaml.safe_dump(TB_AND_CSV))
    args = ["fit", "--config", "tiny.yaml", "--config", "loggers.yaml", *SMALL, "--optim", "came", "--lr", "3e-3"]
    done = lowmem_in_process(capsys, monkeypatch, tmp_path, *args, "--trainer.max_steps", "2", columns="200")
    assert done.returncode == 0, done.stderr[-3000:]
    first = tmp_path / "runs/tb/version_0"
    assert {p.name for p in first.iterdir()} >= {"config.yaml", "hparams.yaml", "checkpoints", "state_memory.png"}
    for run in (first, tmp_path / "runs/csv/version_0"):
        saved = yaml.safe_load((run / "hparams.yaml").read_text())
        assert (saved["lowmem/optimizer"], saved["lowmem/lr"], saved["optimizer"]) == ("came", 3e-3, "adamw_8bit")
    assert dashboard_record(first)[0]["lowmem/optimizer"] == "came"
    resumed = run_lowmem(tmp_path, *args, "--trainer.max_steps", "4", "--ckpt_path", "last")
    assert "(resumed: 2 of these 4 steps made by this run)" in resumed.stdout + resumed.stderr
    assert scalars(tmp_path / "runs/tb/version_1")["optim_summary/bytes_per_param"][0][0] == 3
    assert [r["step"] for r in csv_rows(tmp_path / "runs/csv/version_1") if r["optim_summary/state_MiB"]] == ["3"]
