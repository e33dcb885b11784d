"""A preempted distributed job stops, it never hangs (issue 25, deliverable 4).

A script trains the DDP test's model on 2 gloo CPU processes (the strategy re-launches it as rank 1,
the way users run DDP) with the callback and a ``ModelCheckpoint``; one rank sends SIGTERM to itself at
a chosen batch, so the signal reaches that rank only. Every rank must then stop at the same optimizer
step, save one ``last.ckpt`` together and exit 143. Each rank writes its pid and, on the way out, its
exit code; the whole process group runs under a hard time limit, so a hang fails the test.

Checked for DDP (with gradient accumulation: the signal lands inside a window and the stop waits for its
end) and FSDP2 (Lightning's ``ModelParallelStrategy`` with ``fully_shard``, a sharded checkpoint folder),
with the signal sent to rank 0 and to rank 1. The default suite runs DDP with rank 1 signalled (the case
that hung for good); the others run with ``-m slow``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from launched_scripts import launch_env

SCRIPT = """
import os
import signal
import sys

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn

sys.path.insert(0, {tests_dir!r})
from test_ddp import GLOBAL_BATCH, Net, _data
from lowmem_lightning.callbacks import LowMemOptimizerCallback

OUT = {out!r}


class SignalRank(L.Callback):
    def __init__(self, rank, batch):
        self.rank, self.batch = rank, batch

    def on_train_start(self, trainer, pl_module):
        with open(os.path.join(OUT, f"pid{{trainer.global_rank}}"), "w") as f:
            f.write(str(os.getpid()))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.fit_loop.total_batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGTERM)


def strategy():
    if {fsdp2!r}:
        from lightning.pytorch.strategies import ModelParallelStrategy
        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    return "ddp"


class ShardedNet(Net):
    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


model = ShardedNet() if {fsdp2!r} else Net()
trainer = L.Trainer(
    accelerator="cpu", devices=2, strategy=strategy(), max_epochs=4, accumulate_grad_batches={accumulate},
    logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=OUT,
    callbacks=[LowMemOptimizerCallback("adamw_8bit", lr=1e-2, print_summary=False, plot=False),
               ModelCheckpoint(dirpath=os.path.join(OUT, "ckpt"), save_top_k=0),
               SignalRank({rank}, {batch})],
)
code = 0
try:
    trainer.fit(model, _data(GLOBAL_BATCH // 2, distributed=True))
except SIGTERMException:
    code = 143
with open(os.path.join(OUT, f"exit{{trainer.global_rank}}"), "w") as f:
    f.write(f"{{code}} {{trainer.global_step}}")
sys.exit(code)
"""

LIMIT_S = 150
"""Hard limit for the whole job (both ranks); a run takes ~10-20 s on a busy 2-core machine."""


def _run(tmp_path, rank: int, batch: int, accumulate: int = 1, fsdp2: bool = False) -> subprocess.CompletedProcess:
    """Run SCRIPT in its own process group; kill the group and fail if any rank outlives LIMIT_S."""
    script = tmp_path / "preempt.py"
    script.write_text(textwrap.dedent(SCRIPT.format(
        tests_dir=os.path.dirname(__file__), out=str(tmp_path), rank=rank, batch=batch, accumulate=accumulate,
        fsdp2=fsdp2,
    )))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=launch_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + LIMIT_S
    try:
        out, err = proc.communicate(timeout=LIMIT_S)
        while time.monotonic() < deadline and _alive(tmp_path / "pid1"):
            time.sleep(0.2)  # rank 1 is rank 0's child, not waited for: give it until the deadline
        assert not _alive(tmp_path / "pid1"), f"rank 1 still running after rank 0 exited\n{err[-3000:]}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the job hung: still running after {LIMIT_S} s (SIGTERM to rank {rank})\n{err[-3000:]}")
    finally:
        _kill_group(proc.pid)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _alive(pid_file) -> bool:
    """Whether the pid in ``pid_file`` runs (a zombie, exited but not yet reaped, does not)."""
    if not pid_file.exists():
        return False
    try:
        with open(f"/proc/{int(pid_file.read_text())}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _exits(tmp_path) -> list[tuple[int, int]]:
    """``(exit code, global_step)`` each rank recorded."""
    return [tuple(int(v) for v in (tmp_path / f"exit{r}").read_text().split()) for r in (0, 1)]


@pytest.mark.parametrize("rank", [pytest.param(0, marks=pytest.mark.slow), 1])  # ~12 s each on an idle machine
def test_ddp_sigterm_on_one_rank_stops_every_rank_at_a_window_end(tmp_path, rank):
    # 4 batches per epoch per rank, accumulate 2: batch 4 opens step 3's window (epoch 1, mid-epoch)
    result = _run(tmp_path, rank, batch=4, accumulate=2)
    assert result.returncode == 143, result.stderr[-3000:]
    assert _exits(tmp_path) == [(143, 3), (143, 3)]
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert (checkpoint["global_step"], checkpoint["epoch"]) == (3, 1)
    assert checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["ready"] == 2  # epoch 1: 4, 5
    assert "finishing it (1 more batch(es)) before saving" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1])
def test_fsdp2_sigterm_on_one_rank_stops_every_rank(tmp_path, rank):
    result = _run(tmp_path, rank, batch=5, fsdp2=True)
    assert result.returncode == 143, result.stderr[-3000:]
    assert _exits(tmp_path) == [(143, 6), (143, 6)]
    folder = tmp_path / "ckpt" / "last.ckpt"
    assert folder.is_dir() and (folder / "meta.pt").is_file()  # one sharded checkpoint, written by both ranks
    assert torch.load(folder / "meta.pt", weights_only=False)["global_step"] == 6


SIGNAL_CALLBACK = """
import os
import signal

import lightning as L


class SignalRank(L.Callback):
    def __init__(self, rank: int = 1, batch: int = 5):
        self.rank, self.batch = rank, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.fit_loop.total_batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGTERM)
"""
"""The callback of the CLI test, written next to the run as sigrank.py (loaded by ``--trainer.callbacks+=``)."""


@pytest.mark.slow
def test_lowmem_fit_under_ddp_stops_with_143_when_rank_1_is_signalled(tmp_path):
    """The real CLI (``strategy: ddp``, 2 gloo processes: Lightning re-runs the command line as rank 1)."""
    sys.path.insert(0, os.path.dirname(__file__))
    from test_resume_midepoch import CONFIG, _write_data

    data = _write_data(tmp_path / "words.txt")
    (tmp_path / "sigrank.py").write_text(SIGNAL_CALLBACK)
    config = CONFIG.format(root=tmp_path, data=data, max_steps=40).replace("devices: 1", "devices: 2\n  strategy: ddp")
    (tmp_path / "run.yaml").write_text(config)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.path.dirname(os.path.dirname(__file__))])}
    env.pop("PL_GLOBAL_SEED", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "lowmem_lightning.cli", "fit", "--config", "run.yaml",
         "--trainer.callbacks+=sigrank.SignalRank", "--trainer.callbacks.rank=1"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        pytest.fail("lowmem fit under DDP hung after SIGTERM to rank 1")
    finally:
        _kill_group(proc.pid)
    assert proc.returncode == 143, err[-3000:]
    # 15 batches per epoch on one process -> 8 per rank (DistributedSampler pads); batch 5 ends step 6
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["global_step"] == 6
    assert f"--ckpt_path {tmp_path / 'ckpt' / 'last.ckpt'}" in err


SECOND_SIGTERM = """
import os, signal, sys
import lightning as L
sys.path.insert(0, {tests_dir!r})
from test_ddp import Net, _data
from lowmem_lightning.callbacks import LowMemOptimizerCallback


class TwoSignals(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # recorded: the stop waits for this step's end
            os.kill(os.getpid(), signal.SIGTERM)  # insisted: the default action, now
            print("still running after the second SIGTERM", flush=True)


trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir={out!r},
                    callbacks=[LowMemOptimizerCallback("sgd", lr=1e-2, print_summary=False, plot=False), TwoSignals()])
trainer.fit(Net(), _data(8, distributed=False))
"""


def test_a_second_sigterm_ends_the_process_at_once(tmp_path):
    script = tmp_path / "two.py"
    script.write_text(SECOND_SIGTERM.format(tests_dir=os.path.dirname(__file__), out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=LIMIT_S)
    assert proc.returncode == -signal.SIGTERM, proc.stderr[-3000:]
    assert "still running" not in proc.stdout
