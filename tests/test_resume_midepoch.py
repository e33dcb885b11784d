"""Exact mid-epoch resume, the way a user meets it: a real ``lowmem fit`` process is stopped by a real
signal (SIGKILL, SIGTERM, SIGINT) in the middle of an epoch after a checkpoint exists, resumed with
``--ckpt_path``, and its final params, optimizer state and logged losses are compared, bit for bit,
with one uninterrupted run. The same through the Python API with ``trainer.fit(ckpt_path=...)``.

The signal is sent by the process to itself at a chosen step (``SignalAt``, a callback importable
from this file) so the tests are deterministic: a kill from outside lands at a random step.

Run shape: 60 training blocks of 32 tokens, batch 4 -> 15 steps per epoch, 40 steps (epochs 0-2),
checkpoints every 10 steps (step 30 is an epoch end; 10 and 20 are mid-epoch), validation each epoch.
Each ``lowmem fit`` process takes several seconds, so the default suite runs the SIGKILL and mid-step
SIGTERM cases; SIGINT, SIGTERM after the step-end hook and the epoch-end resume run with ``-m slow``.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
MAX_STEPS = 40

CONFIG = """\
seed_everything: 7
trainer:
  accelerator: cpu
  devices: 1
  precision: 32-true
  max_steps: {max_steps}
  limit_val_batches: 2
  num_sanity_val_steps: 0
  log_every_n_steps: 1
  gradient_clip_val: 1.0
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {root}
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args:
      save_dir: {root}
      name: logs
  callbacks:
    - class_path: lowmem_lightning.callbacks.LowMemOptimizerCallback
      init_args:
        optimizer: adamw_8bit
        lr: 3.0e-3
        plot: false
        print_summary: false
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        dirpath: {root}/ckpt
        filename: "{{step}}"
        every_n_train_steps: 10
        save_top_k: -1
model:
  class_path: lowmem_lightning.modules.causal_lm.CausalLMModule
  init_args:
    config:
      hidden_size: 32
      intermediate_size: 64
      num_hidden_layers: 1
      num_attention_heads: 2
      num_key_value_heads: 2
      max_position_embeddings: 64
    lr: 3.0e-3
    warmup_steps: 5
    scheduler: cosine
    save_dir: {root}/model
data:
  class_path: lowmem_lightning.data.text.TextDataModule
  init_args:
    data_path: {data}
    seq_len: 32
    batch_size: 4
    val_fraction: 0.05
"""


class SignalAt(L.Callback):
    """Send ``signal`` to this process when ``global_step == step`` (test helper).

    Args:
        step: Global step (optimizer steps done) at which the signal is sent.
        signal: Signal name, e.g. ``SIGKILL``, ``SIGTERM``, ``SIGINT``.
        hook: ``"end"``: at the end of that step (after the optimizer callback's step-end hook);
            ``"start"``: at the start of the next batch (so it lands in the middle of a step).
    """

    def __init__(self, step: int = 25, signal: str = "SIGTERM", hook: str = "end"):
        self.step, self.signal, self.hook = step, signal, hook

    def _maybe_send(self, trainer, hook):
        if hook == self.hook and trainer.global_step == self.step:
            os.kill(os.getpid(), getattr(signal, self.signal))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._maybe_send(trainer, "start")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._maybe_send(trainer, "end")


def _write_data(path: Path) -> Path:
    # 63 blocks of 32 byte-tokens: 3 for validation, 60 for training (15 batches of 4)
    words = " ".join(f"w{i % 97}" for i in range(700))
    path.write_text(words[: 63 * 32 - 2])
    return path


def _lowmem_config(root: Path, data: Path, max_steps: int = MAX_STEPS) -> Path:
    """``root/run.yaml``: :data:`CONFIG` for ``data``, logging and checkpointing under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    config = root / "run.yaml"
    config.write_text(CONFIG.format(root=root, data=data, max_steps=max_steps))
    return config


def _lowmem(root: Path, data: Path, *extra: str, max_steps: int = MAX_STEPS) -> subprocess.CompletedProcess:
    config = _lowmem_config(root, data, max_steps)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "lowmem_lightning.cli", "fit", "--config", str(config), *extra],
        capture_output=True, text=True, env=env, timeout=300, cwd=root,
    )


def _signal_args(name: str, step: int, hook: str) -> list[str]:
    return ["--trainer.callbacks+=test_resume_midepoch.SignalAt", f"--trainer.callbacks.step={step}",
            f"--trainer.callbacks.signal={name}", f"--trainer.callbacks.hook={hook}"]


def _losses(root: Path) -> dict[int, str]:
    """``step -> train_loss`` (as logged, text) of the run's latest CSV log."""
    versions = sorted(root.glob("logs/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    out = {}
    with open(versions[-1]) as f:
        for row in csv.DictReader(f):
            if row.get("train_loss"):
                out[int(row["step"])] = row["train_loss"]
    return out


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _max_diff(a, b) -> float:
    """Largest |a - b| over matching tensors of two nested structures (inf when structure differs)."""
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
            return float("inf")
        return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    if isinstance(a, dict):
        if not isinstance(b, dict) or set(a) != set(b):
            return float("inf")
        return max([_max_diff(a[k], b[k]) for k in a] or [0.0])
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return float("inf")
        return max([_max_diff(x, y) for x, y in zip(a, b)] or [0.0])
    return 0.0 if a == b else float("inf")


def _optimizer_states(checkpoint: dict) -> list:
    """The checkpoint's optimizer states without the ``differentiable: False`` that torch's
    ``Optimizer.load_state_dict`` adds to every param group of a loaded optimizer (metadata only)."""
    states = checkpoint["optimizer_states"]
    for state in states:
        for group in state["param_groups"]:
            if group.get("differentiable") is False:
                del group["differentiable"]
    return states


def _assert_same_run(ref: Path, resumed: Path, resumed_at: int) -> None:
    name = f"step={MAX_STEPS}.ckpt"
    final_ref, final = _load(ref / "ckpt" / name), _load(resumed / "ckpt" / name)
    params = _max_diff(final_ref["state_dict"], final["state_dict"])
    optim = _max_diff(_optimizer_states(final_ref), _optimizer_states(final))
    print(f"max |diff| params {params}, optimizer state {optim}")
    assert params == 0.0 and optim == 0.0
    # same place in the data: epoch and step (Lightning's internal progress counters are not compared: after
    # a resume from an epoch's last step it counts that epoch as started twice)
    assert (final_ref["epoch"], final_ref["global_step"]) == (final["epoch"], final["global_step"])
    losses_ref, losses = _losses(ref), _losses(resumed)  # the resumed run logs steps resumed_at..MAX_STEPS-1
    assert sorted(losses) == [s for s in sorted(losses_ref) if s >= resumed_at]
    assert len(losses) >= MAX_STEPS - resumed_at - 1
    assert losses == {s: losses_ref[s] for s in losses}
    from safetensors.torch import load_file

    saved_ref, saved = (load_file(root / "model" / "model.safetensors") for root in (ref, resumed))
    assert saved_ref.keys() == saved.keys() and all(torch.equal(saved_ref[k], saved[k]) for k in saved)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return _write_data(tmp_path_factory.mktemp("data") / "words.txt")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data) -> Path:
    """One uninterrupted 40-step run."""
    root = tmp_path_factory.mktemp("reference")
    result = _lowmem(root, data)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


@pytest.mark.parametrize(
    ("name", "hook", "stop_at", "resume_from", "code"),
    [
        ("SIGKILL", "end", 23, 20, -signal.SIGKILL),
        pytest.param("SIGINT", "end", 24, 20, 1, marks=pytest.mark.slow),
        ("SIGTERM", "start", 26, None, 143),  # mid-step: saved at that step's end by the callback
        # sent at step 25's end, after the callback's step-end check: the stop is at the next boundary, step 26
        pytest.param("SIGTERM", "end", 26, None, 143, marks=pytest.mark.slow),
    ],
)
def test_killed_mid_epoch_run_resumes_bit_exact(tmp_path, data, reference, name, hook, stop_at, resume_from, code):
    send_at = stop_at - 1 if name == "SIGTERM" or hook == "start" else stop_at  # SIGTERM: stops at a step end
    killed = _lowmem(tmp_path, data, *_signal_args(name, send_at, hook))
    assert killed.returncode == code, killed.stderr[-3000:]
    saved = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert f"step={MAX_STEPS}.ckpt" not in saved
    assert "Traceback" not in killed.stderr
    if resume_from is None:  # SIGTERM: a checkpoint of the very step it stopped at
        ckpt = tmp_path / "ckpt" / "last.ckpt"
        assert _load(ckpt)["global_step"] == stop_at
        resume_from = stop_at
        assert f"--ckpt_path {ckpt}" in killed.stdout + killed.stderr
    else:
        ckpt = tmp_path / "ckpt" / f"step={resume_from}.ckpt"
    assert not (tmp_path / "model").exists()  # a stopped run does not pass for a finished one
    resumed = _lowmem(tmp_path, data, "--ckpt_path", str(ckpt))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "not resumable" not in resumed.stderr and "cannot save its position" not in resumed.stderr
    assert "cosine LR schedule" not in resumed.stdout + resumed.stderr  # the same length: nothing to say
    _assert_same_run(reference, tmp_path, resume_from)


@pytest.mark.slow
def test_resume_at_an_epoch_end_checkpoint(tmp_path, data, reference):
    """Step 30 is the last batch of epoch 1: the resumed run starts epoch 2 with its new order."""
    first = _lowmem(tmp_path, data, *_signal_args("SIGKILL", 32, "end"))
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    resumed = _lowmem(tmp_path, data, "--ckpt_path", str(tmp_path / "ckpt" / "step=30.ckpt"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_run(reference, tmp_path, 30)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_resumes_from_any_batch_with_a_new_order_each_epoch(tmp_path, num_workers):
    """The data module's loader alone: a state saved after any batch (mid-epoch, epoch end) continues
    the exact sequence of batches, and every epoch has its own order; also with worker processes."""
    from lowmem_lightning.data import TextDataModule

    dm = TextDataModule(str(_write_data(tmp_path / "words.txt")), seq_len=32, batch_size=4, val_fraction=0.05,
                        num_workers=num_workers)

    def batches(loader, n):
        out = []
        while len(out) < n:
            for batch in loader:
                out.append(batch["input_ids"].sum().item())
                if len(out) == n:
                    break
        return out, loader.state_dict()

    reference, _ = batches(dm.train_dataloader(), 45)  # 3 epochs of 15
    assert reference[:15] != reference[15:30] != reference[30:]
    for stop in (1, 7, 15, 22, 30):
        loader = dm.train_dataloader()
        it, seen = iter(loader), []
        for _ in range(min(stop, 15)):
            seen.append(next(it)["input_ids"].sum().item())
        if stop > 15:  # second epoch
            it, seen = iter(loader), seen[:15]
            for _ in range(stop - 15):
                seen.append(next(it)["input_ids"].sum().item())
        state = loader.state_dict()
        fresh = dm.train_dataloader()
        fresh.load_state_dict(state)
        rest, _ = batches(fresh, 45 - stop)
        assert seen + rest == reference, stop


def test_python_api_fit_with_ckpt_path_is_bit_exact(tmp_path):
    """``trainer.fit(model, dm, ckpt_path=...)`` from a mid-epoch step checkpoint equals the straight run."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lowmem_lightning.callbacks import LowMemOptimizerCallback
    from lowmem_lightning.data import TextDataModule
    from lowmem_lightning.modules.causal_lm import CausalLMModule

    data = _write_data(tmp_path / "words.txt")

    def fit(root, ckpt_path=None):
        L.seed_everything(7)
        model = CausalLMModule(config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "num_key_value_heads": 2}, lr=3e-3,
                               warmup_steps=5, scheduler="cosine")
        dm = TextDataModule(str(data), seq_len=32, batch_size=4, val_fraction=0.05)
        trainer = L.Trainer(
            accelerator="cpu", max_steps=25, limit_val_batches=2, num_sanity_val_steps=0, logger=False,
            enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0, default_root_dir=root,
            callbacks=[LowMemOptimizerCallback("adamw_8bit", lr=3e-3, plot=False, print_summary=False),
                       ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=8, save_top_k=-1)],
        )
        trainer.fit(model, dm, ckpt_path=ckpt_path)
        return model, trainer

    straight, trainer = fit(tmp_path / "a")
    assert str(data.resolve()) in _load(tmp_path / "a" / "step=16.ckpt")["TextDataModule"]["data_files"]
    resumed, resumed_trainer = fit(tmp_path / "b", ckpt_path=tmp_path / "a" / "step=16.ckpt")  # epoch 1, batch 2
    assert resumed_trainer.global_step == 25
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    states = [t.optimizers[0].state_dict()["state"] for t in (trainer, resumed_trainer)]
    assert _max_diff(*states) == 0


class SignalAtBatch(L.Callback):
    """Send SIGTERM to this process at the start of training batch ``batch`` (counted over epochs)."""

    def __init__(self, batch: int):
        self.batch = batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.fit_loop.total_batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGTERM)


def _fit_api(root, data, max_steps, ckpt_path=None, accumulate=1, extra=(), save=True):
    """The test model through ``trainer.fit``; returns the module and the trainer (SIGTERM stops are caught)."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lowmem_lightning.callbacks import LowMemOptimizerCallback
    from lowmem_lightning.data import TextDataModule
    from lowmem_lightning.modules.causal_lm import CausalLMModule

    L.seed_everything(7)
    model = CausalLMModule(config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                   "num_attention_heads": 2, "num_key_value_heads": 2}, lr=3e-3,
                           warmup_steps=2, scheduler="cosine")
    dm = TextDataModule(str(data), seq_len=32, batch_size=4, val_fraction=0.05)
    callbacks = [LowMemOptimizerCallback("adamw_8bit", lr=3e-3, plot=False, print_summary=False), *extra]
    if save:
        callbacks.append(ModelCheckpoint(dirpath=root, save_top_k=0))
    trainer = L.Trainer(
        accelerator="cpu", max_steps=max_steps, accumulate_grad_batches=accumulate, limit_val_batches=0,
        num_sanity_val_steps=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
        gradient_clip_val=1.0, default_root_dir=root, callbacks=callbacks,
    )
    try:
        trainer.fit(model, dm, ckpt_path=ckpt_path)
    except SIGTERMException:
        pass
    return model, trainer


@pytest.mark.slow
def test_sigterm_inside_an_accumulation_window_resumes_exactly(tmp_path, caplog):
    """accumulate_grad_batches=3: SIGTERM at batch 7, the middle of step 3's window (batches 6-8). The stop
    waits for the window's end, so last.ckpt is step 3 after batch 8, and the resumed run ends bit for bit
    where the uninterrupted run does (a stop at batch 7 itself ended ~1e-2 away)."""
    data = _write_data(tmp_path / "words.txt")
    straight, trainer = _fit_api(tmp_path / "a", data, max_steps=5, accumulate=3, save=False)
    _, stopped = _fit_api(tmp_path / "b", data, max_steps=5, accumulate=3, extra=[SignalAtBatch(7)])
    ckpt = tmp_path / "b" / "last.ckpt"
    assert stopped.global_step == 3 and _load(ckpt)["global_step"] == 3
    assert "finishing it (1 more batch(es)) before saving" in caplog.text
    resumed, resumed_trainer = _fit_api(tmp_path / "c", data, max_steps=5, accumulate=3, ckpt_path=ckpt)
    assert resumed_trainer.global_step == 5
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    states = [t.optimizers[0].state_dict()["state"] for t in (trainer, resumed_trainer)]
    assert _max_diff(*states) == 0


def test_data_files_changed_since_the_checkpoint_are_named(tmp_path, recwarn):
    """The data module's checkpoint state fingerprints each data file; a resume warns naming the files
    that changed (appended, edited in place at the same size, removed, added), and nothing when none did."""
    import warnings

    from lowmem_lightning.data import TextDataModule

    folder = tmp_path / "corpus"
    folder.mkdir()
    a, b, c = (_write_data(folder / f"{name}.txt") for name in "abc")
    state = TextDataModule(str(folder), seq_len=32, batch_size=4).state_dict()

    def changes() -> str:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            TextDataModule(str(folder), seq_len=32, batch_size=4).load_state_dict(state)
        return "\n".join(str(w.message) for w in caught if "data changed" in str(w.message))

    assert changes() == ""
    a.write_text(a.read_text() + " more")
    text = b.read_text()
    b.write_text(text[::-1])  # same size, new content
    c.unlink()
    (folder / "d.txt").write_text("new words " * 50)
    said = changes()
    assert f"{a.resolve()}: size {len(text)} -> {len(text) + 5} bytes" in said
    assert f"{b.resolve()}: content changed (same size)" in said
    assert f"{c.resolve()}: no longer in the data" in said
    assert f"{(folder / 'd.txt').resolve()}: new since the checkpoint" in said
