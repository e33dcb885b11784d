"""``lowmem fit`` and ``LowMemOptimizerCallback`` under ``strategy="ddp_spawn"`` / ``"ddp"`` (2 gloo CPU ranks), as a
user runs them end to end.

* ``lowmem fit ... --trainer.strategy ddp_spawn`` ran nothing before ("cannot pickle '_thread.RLock' object": the
  set-up logs the command holds travelled with the Trainer to the spawned ranks); now it trains, prints the
  end-of-fit summary once, writes one ``state_memory.png`` and a sane ``metrics.csv``, with no third-party noise
  per rank; ``--ckpt_path last`` continues the step count and equals an uninterrupted 2-rank run bit for bit.
* ``ddp``: the command's own notices (``--ckpt_path last: resuming from ...``) print once, not once per rank.
* In process, ``trainer.fit`` under ``ddp_spawn``: ``callback.summary`` is rank 0's, sent back to the main process.
"""

from __future__ import annotations

import copy
import csv
import os
import pickle
import subprocess
from pathlib import Path

import lightning as L
import pytest
import torch
from lowmem_calls import LOWMEM
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lowmem_lightning.callbacks import LowMemOptimizerCallback, StateMemoryMonitor
from lowmem_lightning.cli import RECIPES_DIR

ENV = {**os.environ, "COLUMNS": "200"}
SMALL = ["--config", str(RECIPES_DIR / "tiny.yaml"), "--trainer.devices", "2", "--trainer.accelerator", "cpu",
         "--data.init_args.seq_len", "32", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
NOISE = ("Traceback", "Error", "error:", "Failed to load", "Tip:", "deprecated", "The dirpath has changed",
         "terminate called", "core dumped")
HEADER = "LowMemOptimizerCallback: adamw_8bit on"


def _fit(cwd: Path, strategy: str, steps: int, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([LOWMEM, "fit", *SMALL, "--trainer.strategy", strategy, "--trainer.max_steps", str(steps),
                           *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _train_rows(metrics: Path) -> list[dict]:
    with metrics.open() as f:
        return [row for row in csv.DictReader(f) if row.get("train_loss")]


def _assert_clean(proc: subprocess.CompletedProcess, steps: int) -> None:
    """Exit 0, the summary once (rank 0) for ``steps`` steps, no warning or error text from any rank."""
    out = proc.stdout + proc.stderr
    assert out.count(HEADER) == 1, out[-3000:]
    assert f"state after {steps} steps" in out
    found = [word for word in NOISE if word in out]
    assert not found, (found, out[-3000:])


@pytest.mark.parametrize("strategy", ["ddp_spawn", *(pytest.param(s, marks=pytest.mark.slow)
                                                      for s in ("ddp_fork", "ddp"))])
def test_lowmem_fit_ddp_spawn_runs_once_and_cleanly(tmp_path, strategy):
    """4 steps over 2 gloo ranks: exit 0, one summary (rank 0's), one plot and a metrics.csv with steps 0..3, no
    noise (the known third-party messages are dropped in the spawned ranks too), the seed said once; the same with
    the ranks forked (``ddp_fork``) or started as new ``lowmem`` processes (``ddp``). 15-20 s each on the loaded
    2-core machine."""
    proc = _fit(tmp_path, strategy, 4)
    _assert_clean(proc, 4)
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in proc.stderr  # two ranks really ran
    seeds = [line for line in proc.stderr.splitlines() if "Seed set to" in line]
    assert seeds == ["Seed set to 42"], seeds  # once, not '[rank: 1] Seed set to 42' from a ddp rank too
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("state_memory.png")) == [
        "runs/tiny/version_0/state_memory.png"]
    rows = _train_rows(tmp_path / "runs/tiny/version_0/metrics.csv")
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]
    assert all(float(r["optim/state_bytes_per_param"]) < 2.1 for r in rows)  # 8-bit state, not fp32 (8.0)


def test_lowmem_fit_ddp_spawn_with_ema_weight_averaging(tmp_path):
    """``--trainer.callbacks+=EMAWeightAveraging`` under ``ddp_spawn``: Lightning pickles the Trainer to start the
    ranks, and the callback's averaging function (torch's local ``get_ema_avg_fn`` closure) could not be pickled:
    "Can't pickle local object 'get_ema_avg_fn.<locals>.ema_update'", a traceback and nothing run. Now it trains, and
    the average differs from the training weights in the last checkpoint."""
    proc = _fit(tmp_path, "ddp_spawn", 4, "--trainer.callbacks+=lightning.pytorch.callbacks.EMAWeightAveraging",
                "--trainer.callbacks.init_args.decay", "0.5")
    _assert_clean(proc, 4)
    checkpoint = torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=False)
    assert checkpoint["global_step"] == 4 and "current_model_state" in checkpoint
    assert not all(torch.equal(a, checkpoint["current_model_state"][k]) for k, a in checkpoint["state_dict"].items())


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp"])
def test_lowmem_fit_resumes_last_under_two_ranks_bit_exactly(tmp_path, strategy):
    """2 + 2 steps with ``--ckpt_path last`` equal 4 straight (train and validation losses, bit for bit); the
    resumed run counts on from step 2; the command's notice and Lightning's restore lines print once."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _fit(tmp_path / "a", strategy, 4)
    _fit(tmp_path / "b", strategy, 2)
    proc = _fit(tmp_path / "b", strategy, 4, "--ckpt_path", "last")
    _assert_clean(proc, 4)
    assert proc.stderr.count("--ckpt_path last: resuming from") == 1
    assert "(resumed: 2 of these 4 steps made by this run)" in proc.stderr
    straight = _train_rows(tmp_path / "a/runs/tiny/version_0/metrics.csv")
    resumed = _train_rows(tmp_path / "b/runs/tiny/version_1/metrics.csv")
    assert [int(r["step"]) for r in resumed] == [2, 3]
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in straight[2:]]

    def val(path):
        with path.open() as f:
            return [row["val_loss"] for row in csv.DictReader(f) if row.get("val_loss")]

    assert val(tmp_path / "b/runs/tiny/version_1/metrics.csv") == val(tmp_path / "a/runs/tiny/version_0/metrics.csv")[
        1:]


# ------------------------------------------------------------------ in process: the summary comes back


class Regressor(L.LightningModule):
    """A small module (importable: ``ddp_spawn`` pickles it into the ranks); the callback replaces its optimizer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 80), nn.Tanh(), nn.Linear(80, 64), nn.Tanh(), nn.Linear(64, 1))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        loss = nn.functional.mse_loss(self(batch[0]), batch[1])
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _spawn_fit(callback, root: Path, steps: int) -> L.Trainer:
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(2))
    trainer = L.Trainer(accelerator="cpu", strategy="ddp_spawn", devices=2, max_steps=steps, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=root, callbacks=[callback])
    trainer.fit(Regressor(), DataLoader(TensorDataset(x, torch.cos(x[:, :1])), batch_size=8))
    return trainer



def test_ddp_spawn_fit_sends_the_summary_back_to_the_main_process(tmp_path, gloo_env):
    """After ``trainer.fit`` under ``ddp_spawn``, ``callback.summary`` here is rank 0's (it was ``None``: the fit ran
    in the spawned copies). About 10 s on the loaded 2-core machine."""
    callback = LowMemOptimizerCallback("adamw_8bit", lr=1e-2, print_summary=False, plot=False)
    _spawn_fit(callback, tmp_path / "a", 3)
    summary = callback.summary
    assert summary is not None, "the summary did not come back from rank 0"
    num_params = sum(p.numel() for p in Regressor().parameters())
    assert (summary["optimizer"], summary["steps"], summary["steps_this_run"]) == ("adamw_8bit", 3, 3)
    assert summary["num_params"] == num_params and summary["reporter"] == "LowMemOptimizerCallback"
    assert 0 < summary["state_bytes"] < summary["adamw_fp32_MiB"] * 2**20
    assert callback.optimizers == [] and callback.monitor.history.steps == []  # documented: they stay in the ranks


@pytest.mark.slow
def test_a_second_ddp_spawn_fit_replaces_the_summary(tmp_path, gloo_env):
    """The same callback in a second ``ddp_spawn`` fit (a new Trainer): its summary replaces the first one's."""
    callback = LowMemOptimizerCallback("adamw_8bit", lr=1e-2, print_summary=False, plot=False)
    _spawn_fit(callback, tmp_path / "a", 3)
    assert callback.summary["steps"] == 3
    _spawn_fit(callback, tmp_path / "b", 2)
    assert callback.summary["steps"] == 2 and callback.summary is callback.monitor.summary


def test_monitor_pickles_without_pipes_outside_a_spawn():
    """Pickled or deep-copied anywhere but into a spawned process, the monitor carries no pipe and keeps its
    summary; a summary set here is what :attr:`summary` returns."""
    monitor = StateMemoryMonitor()
    monitor.summary = {"steps": 5}
    for clone in (pickle.loads(pickle.dumps(monitor)), copy.deepcopy(monitor)):
        assert clone.summary == {"steps": 5}
        assert clone._summary_reader is None and clone._summary_writer is None


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_fork"])
def test_a_refusal_in_a_spawned_rank_is_one_message(tmp_path, strategy):
    """A refusal raised inside the ranks before the run starts (adafactor's own step size under the module's LR
    schedule): exit 2, the refusal's one message and nothing else (the set-up lines of the command and of the ranks
    are held and dropped, as with one process; the rank sends its refusal's kind and message, no traceback text),
    no run folder. About 8 s."""
    text = (RECIPES_DIR / "tiny.yaml").read_text()
    text = text.replace("        optimizer: adamw_8bit\n        lr: 3.0e-3\n", "        optimizer: adafactor\n")
    (tmp_path / "recipe.yaml").write_text(text)
    args = [arg if arg != str(RECIPES_DIR / "tiny.yaml") else "recipe.yaml" for arg in SMALL]
    proc = subprocess.run([LOWMEM, "fit", *args, "--trainer.strategy", strategy, "--trainer.max_steps", "2"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 2 and proc.stdout == "", proc.stderr
    assert lines[0].startswith("lowmem fit: error: LowMemOptimizerCallback(optimizer='adafactor') computes its own "
                               "step size"), proc.stderr
    assert lines[1] == "(nothing was trained or written; LOWMEM_TRACEBACK=1 shows where it was raised)"
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_rank_that_fails_before_its_run_shows_the_setup_lines_first(tmp_path):
    """A rank failing before its run starts with an error that is not a refusal (a callback's RuntimeError): the
    held set-up lines print once, the command's first ("Seed set to"), then the ranks', then the traceback."""
    (tmp_path / "boom.py").write_text("import lightning as L\n\n\nclass Boom(L.Callback):\n"
                                      "    def setup(self, trainer, pl_module, stage):\n"
                                      "        raise RuntimeError('boom in setup')\n")
    proc = subprocess.run([LOWMEM, "fit", *SMALL, "--trainer.strategy", "ddp_spawn", "--trainer.max_steps", "2",
                           "--trainer.callbacks+=boom.Boom"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**ENV, "PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 1, proc.stderr[-3000:]
    err = proc.stderr
    assert err.count("Seed set to 42") == 1 and "RuntimeError: boom in setup" in err, err[-3000:]
    assert err.index("Seed set to 42") < err.index("Initializing distributed: GLOBAL_RANK: 0") < err.index(
        "Traceback"), err[-3000:]


def _checkpoint_transformers_warns_about(path: Path) -> Path:
    """A tiny Llama checkpoint (``save_pretrained``) holding one tensor the architecture has no place for: loading it,
    transformers logs a ``LOAD REPORT`` warning (``model.extra.weight | UNEXPECTED``)."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=64, vocab_size=259)
    LlamaForCausalLM(config).save_pretrained(path)
    weights = load_file(path / "model.safetensors")
    save_file({**weights, "model.extra.weight": torch.zeros(2)}, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("rank", [0, 1])
def test_transformers_build_messages_come_from_rank_zero_only(tmp_path, monkeypatch, rank):
    """CausalLMModule.configure_model on a rank other than 0 drops transformers' warnings about the checkpoint (every
    rank loads the same files: rank 0 says it once), and leaves transformers' verbosity and progress bars as found."""
    import logging

    from lightning.pytorch.utilities import rank_zero_only
    from transformers.utils import logging as hf_logging

    from lowmem_lightning.modules import CausalLMModule

    path = _checkpoint_transformers_warns_about(tmp_path / "checkpoint")
    monkeypatch.setattr(rank_zero_only, "rank", rank)
    before = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("transformers").addHandler(handler)
    try:
        CausalLMModule(model_name_or_path=str(path)).configure_model()
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    reports = [r for r in records if "LOAD REPORT" in r.getMessage() and "model.extra.weight" in r.getMessage()]
    assert len(reports) == (1 if rank == 0 else 0), [r.getMessage()[:80] for r in records]
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == before


@pytest.mark.slow
def test_lowmem_fit_ddp_spawn_shows_transformers_load_report_once(tmp_path):
    """``lowmem fit --trainer.strategy ddp_spawn`` from a checkpoint transformers warns about: its load report and
    its "Loading weights" bar come once (rank 0), not once per rank. About 35 s on the loaded 2-core machine."""
    path = _checkpoint_transformers_warns_about(tmp_path / "checkpoint")
    proc = _fit(tmp_path, "ddp_spawn", 2, "--model.init_args.config", "null", "--model.init_args.model_name_or_path",
                str(path))
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in proc.stderr  # two ranks really ran
    assert proc.stderr.count("LOAD REPORT") == 1, proc.stderr[-3000:]
    assert proc.stderr.count("Loading weights:   0%") == 1, proc.stderr[-3000:]
