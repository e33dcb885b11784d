"""Field walk: the run that goes wrong (inf/NaN gradients). Our optimizers skip those tensor updates and count them on
the device; before, nothing said so (a run whose every update was skipped ran to ``max_steps`` looking normal). Now
the monitor warns at the first skip (step, count, param names, what to check) and again when the count doubles, the
end-of-fit summary says ``skipped N tensor updates ... in K of M steps`` (also logged as
``optim_summary/skipped_updates``), and a run whose every update of ``stop_after_skipped_steps`` steps in a row was
skipped stops with one message and a checkpoint. The counters are read only at logged steps, epoch and fit end.
Lightning projects as users write them, gradient release, a GradScaler (16-mixed) run, and one real ``lowmem fit``.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lowmem_calls import LOWMEM
from optim_helpers import DispatchedOps
from torch.utils.data import DataLoader, TensorDataset

from lowmem_lightning.callbacks import LowMemOptimizerCallback, StateMemoryMonitor, skips
from lowmem_lightning.cli import RECIPES_DIR
from lowmem_lightning.lowmem_warning import LowMemWarning


class _Net(L.LightningModule):
    """A small regression net whose batch gets a NaN at the optimizer steps in ``nan_at`` (0-based batch index) and
    whose ``net.2`` gradient is made inf at the batches in ``inf_grad_at``."""

    def __init__(self, nan_at=(), inf_grad_at=()):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
        self.nan_at, self.inf_grad_at = set(nan_at), set(inf_grad_at)
        self._batch = 0

    def training_step(self, batch, batch_idx):
        (x,) = batch
        self._batch = self.trainer.global_step
        if self._batch in self.nan_at:
            x = x.clone()
            x[0, 0] = float("nan")
        loss = self.net(x).square().mean()
        self.log("train_loss", loss)
        return loss

    def on_after_backward(self):
        if self._batch in self.inf_grad_at:
            self.net[2].weight.grad.fill_(float("inf"))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def _loader():
    return DataLoader(TensorDataset(torch.randn(256, 8, generator=torch.Generator().manual_seed(0))), batch_size=4)


def _trainer(tmp_path, callbacks, steps, every=1, **kwargs):
    return L.Trainer(accelerator="cpu", max_steps=steps, callbacks=callbacks, log_every_n_steps=every,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                     logger=L.pytorch.loggers.CSVLogger(tmp_path, name="run"), **kwargs)


def _fit(tmp_path, module, callback, steps, every=1, ckpt_path=None, **kwargs):
    """Fit; returns the trainer and our warnings' messages."""
    trainer = _trainer(tmp_path, [callback], steps, every, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, _loader(), ckpt_path=ckpt_path)
    return trainer, [str(w.message) for w in caught if issubclass(w.category, LowMemWarning)
                     and "LowMemOptimizerCallback:" in str(w.message) and "skipped" in str(w.message)]


def _callback(**kwargs):
    return LowMemOptimizerCallback("adamw_8bit", plot=False, **kwargs)


def _rows(trainer) -> list[dict]:
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_nan_batches_warn_first_then_when_the_count_doubles_and_the_summary_counts_them(tmp_path, caplog):
    """NaN in the batches of steps 3..20 of 24 (each skips all 4 tensors). Before: no word (only the metric). Now: one
    warning naming step 4 (global step after it), the 4 tensors and their names, what to check; then one per doubling
    (8, 16, 32, 64 updates: 4 more), not one per step; the summary line and the logged summary figure."""
    callback = _callback(stop_after_skipped_steps=None)
    trainer, messages = _fit(tmp_path, _Net(nan_at=range(3, 21)), callback, steps=24)
    first, *later = messages
    assert first.startswith("LowMemOptimizerCallback: step 4 skipped 4 tensor update(s): their gradients held inf/NaN")
    assert "Not finite at step 4: net.0.weight, net.0.bias, net.2.weight and 1 more." in first
    assert "params and their optimizer state were left unchanged" in first and "'16-true' has no loss scaling" in first
    assert [m.split(":")[1].strip() for m in later] == [f"{n} tensor updates skipped so far for inf/NaN gradients, in "
                                                        f"{n // 4} steps (the first at step 4). Not finite at step "
                                                        f"{n // 4 + 3}" for n in (8, 16, 32, 64)]
    assert callback.summary["skipped_updates"] == 72 and callback.summary["skipped_steps"] == 18
    assert callback.summary["stopped_at_step"] is None and trainer.global_step == 24
    assert "  skipped 72 tensor updates (inf/NaN gradients) in 18 of 24 steps" in caplog.text
    rows = _rows(trainer)
    assert [float(r["optim_summary/skipped_updates"]) for r in rows if r["optim_summary/skipped_updates"]] == [72.0]
    assert max(float(r["optim/skipped_updates"]) for r in rows if r["optim/skipped_updates"]) == 72.0


def test_a_clean_run_says_nothing_and_a_torch_optimizer_logs_no_skip_figure(tmp_path, caplog):
    callback = _callback()
    _, messages = _fit(tmp_path / "ours", _Net(), callback, steps=6)
    assert messages == [] and callback.summary["skipped_updates"] == 0
    assert "adamw_8bit on 641" in caplog.text and "skipped" not in caplog.text
    monitor = StateMemoryMonitor(plot=False)
    trainer, _ = _fit(tmp_path / "torch", _Net(nan_at=range(6)), monitor, steps=6)
    assert "skipped_updates" not in monitor.summary  # torch's AdamW: no counter, no claim
    assert "optim_summary/skipped_updates" not in _rows(trainer)[0]


def _nan_weights_checkpoint(tmp_path) -> Path:
    """A checkpoint of 2 clean steps whose first weight then holds a NaN (what a diverged earlier run leaves)."""
    trainer, _ = _fit(tmp_path / "first", _Net(), _callback(), steps=2)
    path = tmp_path / "nan.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    ckpt["state_dict"]["net.0.weight"][0, 0] = float("nan")
    torch.save(ckpt, path)
    return path


def test_resuming_nan_weights_stops_after_the_steps_in_a_row_with_one_message_and_a_checkpoint(tmp_path, caplog):
    """Every update of every step skipped (NaN weights): before, the run went on to max_steps=40 with a NaN loss and
    no word. Now it stops at step 2 + 5 (log every step) with one message, Lightning's checkpoint of that step saved."""
    path = _nan_weights_checkpoint(tmp_path)
    callback = _callback(stop_after_skipped_steps=5)
    trainer, messages = _fit(tmp_path / "resumed", _Net(), callback, steps=40, ckpt_path=str(path))
    assert trainer.global_step == 7 and callback.summary["stopped_at_step"] == 7
    [stop] = [m for m in messages if "stopping the fit" in m]
    assert stop.startswith("LowMemOptimizerCallback: stopping the fit at step 7: every tensor update of the last 5 "
                           "optimizer steps was skipped for inf/NaN gradients, so nothing is being trained")
    assert "stop_after_skipped_steps=5 set this; None never stops." in stop
    assert "  skipped 20 tensor updates (inf/NaN gradients) in 5 of 5 steps\n  stopped at step 7: every update of " \
           "the last 5 steps skipped" in caplog.text
    [saved] = Path(trainer.checkpoint_callback.dirpath).iterdir()
    assert saved.name.endswith("-step=7.ckpt") and torch.load(saved, weights_only=False)["global_step"] == 7


def test_occasional_skips_never_stop_and_a_layer_that_overflows_each_step_is_named(tmp_path):
    """Steps that skip every other time (AMP-like) reset the count in a row: no stop with stop_after_skipped_steps=2.
    One layer whose gradient overflows at every step: 1 tensor per step, named, never a stop (others train)."""
    callback = _callback(stop_after_skipped_steps=2)
    trainer, messages = _fit(tmp_path / "every_other", _Net(nan_at=range(0, 12, 2)), callback, steps=12)
    assert trainer.global_step == 12 and callback.summary["skipped_steps"] == 6
    assert not any("stopping" in m for m in messages)
    callback = _callback(stop_after_skipped_steps=2)
    trainer, messages = _fit(tmp_path / "one_layer", _Net(inf_grad_at=range(12)), callback, steps=12)
    assert trainer.global_step == 12 and callback.summary["skipped_updates"] == 12
    assert "step 1 skipped 1 tensor update(s)" in messages[0] and "Not finite at step 1: net.2.weight." in messages[0]


def test_gradient_release_warns_counts_and_stops_the_same(tmp_path):
    """``step_in_backward``: the gradients are gone at the step's end (no names), the rest is the same."""
    callback = _callback(step_in_backward=True, stop_after_skipped_steps=3)
    trainer, messages = _fit(tmp_path, _Net(nan_at=range(2, 40)), callback, steps=40)
    assert messages[0].startswith("LowMemOptimizerCallback: step 3 skipped 4 tensor update(s)")
    assert "Not finite" not in messages[0]
    assert trainer.global_step == 5 and callback.summary["stopped_at_step"] == 5


class _NetWithAnUnusedParam(_Net):
    """``_Net`` with a trainable param its forward never uses (an unused head, a pooler): it gets no gradient, so no
    step updates it or skips it."""

    def __init__(self, nan_at=()):
        super().__init__(nan_at=nan_at)
        self.unused = torch.nn.Parameter(torch.zeros(3))


@pytest.mark.parametrize("step_in_backward", [False, True])
def test_a_trainable_param_without_a_gradient_does_not_hide_that_nothing_trains(tmp_path, step_in_backward):
    """NaN in every batch of a module with an unused trainable param: every update a step makes (4 tensors) is skipped,
    so the fit stops after 3 steps, with gradient release too. Before, under release the steps' expected updates were
    guessed as every trainable param (the gradients are freed), 5 > 4 skipped: the run was never stopped."""
    callback = _callback(step_in_backward=step_in_backward, stop_after_skipped_steps=3)
    trainer, _ = _fit(tmp_path, _NetWithAnUnusedParam(nan_at=range(40)), callback, steps=40)
    assert trainer.global_step == 3 and callback.summary["stopped_at_step"] == 3
    assert callback.summary["skipped_updates"] == 12 and callback.summary["skipped_steps"] == 3
    assert callback.optimizers[0].attempted_updates == callback.optimizers[0].skipped_updates == 12


def test_a_gradscaler_skip_is_not_ours(tmp_path):
    """``16-mixed`` (on the CPU Lightning turns it into bf16-mixed, so its plugin with a CPU GradScaler, as on a GPU):
    an inf gradient makes the GradScaler skip the step (it never calls ours): nothing counted, nothing said, no stop,
    although every step overflows."""
    from lightning.pytorch.plugins import MixedPrecision

    callback = _callback(stop_after_skipped_steps=2)
    amp = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer, messages = _fit(tmp_path, _Net(inf_grad_at=range(8)), callback, steps=8, plugins=[amp])
    assert trainer.global_step == 8 and messages == [] and callback.summary["skipped_updates"] == 0
    assert callback.optimizers[0].skipped_updates == 0
    assert trainer.precision_plugin.scaler.get_scale() < 2.0**16  # the scaler did skip (and backed off)


def test_the_counters_are_read_only_at_logged_steps_and_epoch_and_fit_end(tmp_path, monkeypatch):
    """No host read per step: with NaN at every step and log_every_n_steps=4, the one read function runs at steps
    4 and 8, then at the epoch's and the fit's end (10); recording a step dispatches no scalar read or copy."""
    reads = []
    real = skips._to_host

    def counting(counts):
        reads.append(trainer.global_step)
        return real(counts)

    monkeypatch.setattr(skips, "_to_host", counting)
    trainer = None
    callback = _callback(stop_after_skipped_steps=None)
    module = _Net(nan_at=range(10))
    trainer = _trainer(tmp_path, [callback], 10, every=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, _loader())
    assert reads == [4, 8, 10, 10]
    assert callback.summary["skipped_updates"] == 40

    watch = skips.SkipWatch(callback.optimizers, None)
    with DispatchedOps() as ops:
        watch.record(11)
    assert ops.names == ["aten.clone.default"]  # a device copy of the counter: no _local_scalar_dense, no _to_copy


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "100"])
def test_a_bad_stop_after_skipped_steps_is_refused_by_name(value):
    with pytest.raises(ValueError, match=rf"Invalid stop_after_skipped_steps={value!r}: expected an int >= 1"):
        _callback(stop_after_skipped_steps=value)


def test_lowmem_fit_with_a_diverging_lr_warns_stops_with_a_message_and_keeps_a_checkpoint(tmp_path):
    """The tiny recipe at ``--lr 1e6``: gradients turn NaN at step 4 on an Intel Xeon, at step 2 on an AMD EPYC (the
    first NaN step depends on the CPU's float arithmetic). Before: 8 steps, NaN loss, no word. Now: the warning at that
    step, one stop line two steps later (stop_after_skipped_steps: 3 in the recipe), the summary line, exit 1 (a job
    script sees the failure), no traceback, the checkpoint of the step it stopped at."""
    recipe = yaml.safe_load((RECIPES_DIR / "tiny.yaml").read_text())
    for callback in recipe["trainer"]["callbacks"]:
        callback["init_args"].update(plot=False, stop_after_skipped_steps=3)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(recipe))
    proc = subprocess.run([LOWMEM, "fit", "--config", "run.yaml", "--trainer.max_steps", "8", "--lr", "1e6",
                           "--trainer.limit_val_batches", "1", "--data.init_args.seq_len", "32",
                           "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    first = re.search(r"LowMemOptimizerCallback: step (\d+) skipped", proc.stderr)
    assert first and 2 <= int(first[1]) <= 5, proc.stderr[-3000:]  # diverged within a few steps
    stop = int(first[1]) + 2
    assert proc.stderr.count(f"stopping the fit at step {stop}") == 1
    assert f"in 3 of {stop} steps\n  stopped at step {stop}: every update of the last 3 steps skipped" in proc.stderr
    assert [p.name for p in (tmp_path / "runs/tiny/version_0/checkpoints").iterdir()] == [f"epoch=0-step={stop}.ckpt"]


def _torch_adamw(**kwargs):
    """The callback with torch's fp32 AdamW (``--optim adamw``): it applies a non-finite update."""
    return LowMemOptimizerCallback("adamw", lr=1e-3, plot=False, **kwargs)


def test_torch_adamw_whose_weights_turn_nan_stops_and_the_summary_says_so(tmp_path, caplog):
    """A NaN batch at step 3 makes torch's AdamW write NaN into every weight; each later loss is NaN. Before: the run
    went on to max_steps=200 (NaN steps are slow on a CPU) and the summary said nothing. Now the monitor, reading the
    losses it reads anyway (every 64 steps), sees 62 non-finite in a row (>= 5), reads the weights once, and stops at
    step 64 with one message naming the tensors; the summary says 4 of 4 hold inf/NaN since step 3."""
    callback = _torch_adamw(stop_after_skipped_steps=5)
    trainer = _trainer(tmp_path, [callback], 200)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(_Net(nan_at={2}), _loader())
    assert trainer.global_step == 64
    [stop] = [str(w.message) for w in caught if "stopping the fit" in str(w.message)]
    assert stop.startswith("LowMemOptimizerCallback: stopping the fit at step 64: the training loss was not finite in "
                           "each of the last 62 steps (since step 3) and 4 of 4 trainable tensors now hold inf/NaN "
                           "(net.0.weight, net.0.bias, net.2.weight and 1 more)")
    assert "Resume from a checkpoint saved before step 3" in stop and "stop_after_skipped_steps=5 set this" in stop
    summary = callback.summary
    assert (summary["lost_weights"], summary["trainable_tensors"], summary["loss_not_finite_since"],
            summary["lost_weights_stopped_at_step"]) == (4, 4, 3, 64)
    assert ("  weights not finite: 4 of 4 trainable tensors hold inf/NaN\n"
            "  (the training loss was not finite from step 3 on; stopped at step 64)") in caplog.text


def test_lost_weights_without_a_stop_are_said_at_the_end_and_nan_batches_with_finite_weights_are_not(tmp_path,
                                                                                                        caplog):
    """``stop_after_skipped_steps=None``: no stop, but the end of a torch-AdamW fit with NaN weights still says so.
    Our optimizer skipping NaN batches up to the last step keeps its weights finite: they are read, and no line
    claims they were lost."""
    callback = _torch_adamw(stop_after_skipped_steps=None)
    trainer = _trainer(tmp_path / "torch", [callback], 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(_Net(nan_at={5}), _loader())
    assert trainer.global_step == 10
    assert (callback.summary["lost_weights"], callback.summary["loss_not_finite_since"]) == (4, 6)
    assert callback.summary["lost_weights_stopped_at_step"] is None
    assert "  (the training loss was not finite from step 6 on)" in caplog.text
    caplog.clear()
    ours = _callback(stop_after_skipped_steps=None)
    trainer, _ = _fit(tmp_path / "ours", _Net(nan_at=range(5, 10)), ours, steps=10)
    assert ours.summary["lost_weights"] == 0 and ours.summary["trainable_tensors"] == 4  # read, all finite
    assert ours.summary["skipped_updates"] == 20 and "weights not finite" not in caplog.text


def test_lowmem_fit_exits_1_when_the_weights_end_not_finite():
    """``lowmem fit``'s exit code reads the callbacks' summaries: lost weights are a failed fit, as a stop for skipped
    updates is; a clean summary is not."""
    from types import SimpleNamespace

    from lowmem_lightning.cli.app import _stopped_untrained

    def cli(summary):
        return SimpleNamespace(trainer=SimpleNamespace(callbacks=[SimpleNamespace(summary=summary)]))

    assert _stopped_untrained(cli({"lost_weights": 4, "stopped_at_step": None}))
    assert not _stopped_untrained(cli({"lost_weights": 0, "stopped_at_step": None}))


@pytest.mark.slow
def test_lowmem_fit_optim_adamw_at_a_diverging_lr_stops_and_exits_1(tmp_path):
    """The tiny recipe with torch's AdamW (``--optim adamw``) at ``--lr 1e6``: the weights turn NaN within a few steps;
    the fit stops at the first loss read after 100 such steps (128), says why, and exits 1 (~45 s: NaN is slow)."""
    proc = subprocess.run([LOWMEM, "fit", "--config", "tiny.yaml", "--optim", "adamw", "--lr", "1e6",
                           "--trainer.max_steps", "300", "--trainer.limit_val_batches", "1",
                           "--data.init_args.seq_len", "16", "--data.init_args.batch_size", "2",
                           "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and proc.stderr.count("stopping the fit at step 128") == 1
    assert "weights not finite: 21 of 21 trainable tensors hold inf/NaN" in proc.stderr
