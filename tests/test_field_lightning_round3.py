"""Field test, round 3: what a real project does next with ``LowMemOptimizerCallback`` / ``LowMemModule`` /
``CausalLMModule``, each against the same project under torch's AdamW (the user's baseline).

1. ``EMAWeightAveraging`` (Lightning 2.6): the average is the EMA of the trajectory under ours as under AdamW, resume
   is bit-exact with the averaged model's state, ``lowmem fit`` takes it in YAML; over an NF4 model its default
   ``use_buffers=True`` (which averaged the packed 4-bit codes into garbage) is refused before any step.
2. ``strategy="ddp_spawn"``: the callback and a ``LowMemModule`` are pickled into 2 gloo processes, the trained
   weights come back, the checkpoint resumes.
3. ``ModelCheckpoint(save_last="link")``: ``ckpt_path="last"`` resumes bit-exactly; removing the checkpoint the
   link points to re-points it first (no dangling ``last.ckpt``); a save onto the link replaces the link, not
   its target; a weights-only checkpoint is refused for a resume with one clear sentence (``lowmem fit``: exit 2).
4. Modules users write: ``nn.LazyLinear``, ``nn.Embedding(sparse=True)`` and complex params (refused by name
   before training), tied params, a param unfrozen in ``on_train_epoch_start``.
5. ``detect_anomaly``, ``deterministic``, ``max_time`` stop + resume, ``validate/test/predict(ckpt_path="best")``,
   ``load_from_checkpoint`` in a new process (NF4 + LoRA) and ``torch.load(weights_only=True)`` of our checkpoints.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lowmem_lightning.callbacks import LowMemOptimizerCallback
from lowmem_lightning.callbacks.checkpoint_io import AtomicCheckpointIO
from lowmem_lightning.modules import LowMemModule
from lowmem_lightning.optim import available_optimizers

pytestmark = pytest.mark.usefixtures("one_thread")
HERE = Path(__file__).resolve().parent
CAME_INT8 = ("came", {"momentum_dtype": "int8"})


class Project(L.LightningModule):
    """A user's module with its own torch AdamW: matrices decayed, biases not; logs train/val/test loss."""

    def __init__(self, n: int = 128, hidden: int = 64, stateful: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.stateful = stateful
        self.body = nn.Sequential(nn.Linear(16, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU())
        self.head = nn.Linear(hidden, 4)
        generator = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 16, generator=generator)
        self.y = (self.x @ torch.randn(16, 4, generator=generator)).argmax(1)

    def forward(self, x):
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        loss = nn.functional.cross_entropy(self(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def test_step(self, batch, batch_idx):
        self.log("test_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def train_dataloader(self):
        if self.stateful:
            from torchdata.stateful_dataloader import StatefulDataLoader

            return StatefulDataLoader(TensorDataset(self.x, self.y), batch_size=16)
        return DataLoader(TensorDataset(self.x, self.y), batch_size=16)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.x[:32], self.y[:32]), batch_size=32)

    test_dataloader = val_dataloader
    predict_dataloader = val_dataloader

    def configure_optimizers(self):
        decay = [p for n, p in self.named_parameters() if not n.endswith("bias")]
        no_decay = [p for n, p in self.named_parameters() if n.endswith("bias")]
        return torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                 lr=3e-3)


class Trajectory(L.Callback):
    """The params after every optimizer step (put before the averaging callback: it sees the step's result)."""

    def __init__(self):
        self.steps: list[list[torch.Tensor]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.steps.append([p.detach().clone() for p in module.parameters()])


def _callback(optimizer: str | tuple | None, **kwargs):
    if optimizer is None:
        return []
    name, extra = optimizer if isinstance(optimizer, tuple) else (optimizer, {})
    return [LowMemOptimizerCallback(name, optimizer_kwargs=extra or None, log_state_memory=False, plot=False,
                                    print_summary=False, **kwargs)]


def _trainer(optimizer, callbacks=(), root=None, **kwargs) -> L.Trainer:
    """A CPU Trainer; ``optimizer``: None (the module's torch AdamW), a name, or ``(name, optimizer_kwargs)``."""
    kwargs.setdefault("max_epochs", 1)
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    return L.Trainer(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=[*_callback(optimizer), *callbacks], default_root_dir=root, **kwargs)


def _ema(trajectory: list[list[torch.Tensor]], decay: float) -> list[torch.Tensor]:
    """torch's EMA over the trajectory: the first update copies, then ``decay * ema + (1 - decay) * param``."""
    average = [t.clone() for t in trajectory[0]]
    for params in trajectory[1:]:
        average = [decay * a + (1 - decay) * p for a, p in zip(average, params)]
    return average


def _equal(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def _same_tensors(a, b) -> list:
    """Names of the entries of two (nested) state dicts that differ (tensors bitwise; other values by ==)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"keys {sorted(map(str, set(a) ^ set(b)))}"]
        return [f"{k}.{d}" for k in a for d in _same_tensors(a[k], b[k])]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return ["len"] if len(a) != len(b) else [f"{i}.{d}" for i, (x, y) in enumerate(zip(a, b))
                                                 for d in _same_tensors(x, y)]
    if isinstance(a, torch.Tensor):
        return [] if isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b) else ["tensor"]
    return [] if a == b else ["value"]


# ------------------------------------------------------------------ 1. EMAWeightAveraging


@pytest.mark.parametrize("optimizer", ["adamw_8bit", CAME_INT8], ids=["adamw_8bit", "came_int8"])
def test_ema_averages_the_trajectory_under_ours_as_under_torch_adamw(optimizer):
    """The averaged model (copied into the module at the end of fit) is exactly torch's EMA of the params after each
    step, under ours as under the module's AdamW: the averaging is the same, only the trajectory differs (for
    adamw_8bit by no more than the trajectories do)."""
    averaged, trajectories = {}, {}
    for label, name in (("torch", None), ("ours", optimizer)):
        module, trajectory = Project(), Trajectory()
        trainer = _trainer(name, [trajectory, EMAWeightAveraging(decay=0.8)], max_epochs=2)
        trainer.fit(module)
        assert trainer.global_step == len(trajectory.steps) == 16
        averaged[label] = [p.detach().clone() for p in module.parameters()]
        assert _equal(averaged[label], _ema(trajectory.steps, 0.8))
        assert not _equal(averaged[label], trajectory.steps[-1])  # the average, not the last weights
        trajectories[label] = trajectory.steps
    assert type(trainer.optimizers[0]).__module__.startswith("lowmem_lightning.")
    if optimizer == "adamw_8bit":
        apart = max(_max_diff(a, b) for a, b in zip(trajectories["torch"], trajectories["ours"]))
        assert 0 < _max_diff(averaged["torch"], averaged["ours"]) <= apart


@pytest.mark.parametrize("optimizer", ["adamw_8bit", CAME_INT8], ids=["adamw_8bit", "came_int8"])
def test_ema_checkpoint_resume_is_bit_exact(tmp_path, optimizer):
    """2 epochs straight = 1 epoch, checkpoint, resume 1 epoch: the averaged weights (``state_dict``), the current
    ones (``current_model_state``), the averaging state and the optimizer's quantized state, bit for bit. (The
    checkpoints are those of each epoch end. The ``last.ckpt`` that ``ModelCheckpoint(save_last=True, save_top_k=0)``
    writes in ``on_train_end``, after ``EMAWeightAveraging`` copied the average into the model, resumes exactly under
    our callback too: tests/test_ema_resume.py.)"""
    runs = {}
    for label, stops in (("straight", (2,)), ("resumed", (1, 2))):
        folder, ckpt = tmp_path / label, None
        for epochs in stops:
            checkpoint = ModelCheckpoint(dirpath=folder, save_last=True, save_top_k=-1)
            trainer = _trainer(optimizer, [EMAWeightAveraging(decay=0.8), checkpoint], max_epochs=epochs,
                               enable_checkpointing=True)
            trainer.fit(Project(), ckpt_path=ckpt)
            ckpt = folder / "last.ckpt"
        runs[label] = torch.load(ckpt, weights_only=True)
    straight, resumed = runs["straight"], runs["resumed"]
    assert straight["global_step"] == resumed["global_step"] == 16
    for key in ("state_dict", "current_model_state", "averaging_state", "optimizer_states"):
        assert not _same_tensors(straight[key], resumed[key]), key
    assert _same_tensors(straight["state_dict"], straight["current_model_state"])  # two models were saved


def _tiny_llama(**kwargs):
    from lowmem_lightning.modules.causal_lm import CausalLMModule

    config = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 2, "max_position_embeddings": 64}
    return CausalLMModule(config=config, lr=3e-3, **kwargs)


def _text(seq_len=16):
    from lowmem_lightning.data import TextDataModule

    return TextDataModule("sample", seq_len=seq_len, batch_size=2, val_fraction=0.02, seed=0)


def _lm_trainer(callbacks, steps=3, **kwargs):
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                     val_check_interval=steps, num_sanity_val_steps=0, callbacks=callbacks, **kwargs)


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit"])
@pytest.mark.parametrize("use_buffers", [True, False])
def test_ema_over_an_nf4_model_leaves_the_base_and_averages_the_adapters(optimizer, use_buffers):
    """QLoRA + ``EMAWeightAveraging()``: its default ``use_buffers=True`` averaged the packed NF4 codes (uint8) and
    int8 scales of its copy and wrote them back into the frozen base (before: 40 of its buffers changed after 5 steps,
    the model destroyed; under torch's AdamW too), so it was refused. The average now shares the NF4 layers, and a
    shared layer averaged with itself stays as it is: with either setting the base is bit-for-bit untouched and the
    LoRA adapters are the EMA of their trajectory."""
    module = _tiny_llama(quantize="nf4", lora={"r": 4}, optimizer=optimizer)
    module.configure_model()
    base = {n: b.clone() for n, b in module.model.named_buffers()}
    trajectory = Trajectory()
    _lm_trainer([trajectory, EMAWeightAveraging(decay=0.8, use_buffers=use_buffers)]).fit(module, _text())
    assert not _same_tensors(base, dict(module.model.named_buffers()))
    trainable = [i for i, p in enumerate(module.parameters()) if p.requires_grad]
    want = _ema([[step[i] for i in trainable] for step in trajectory.steps], 0.8)
    assert _equal([p for p in module.parameters() if p.requires_grad], want)


def test_ema_kept_on_another_device_over_an_nf4_model_is_refused_with_buffers():
    """An average kept on another device (``device=``) holds copies of the NF4 layers, which ``use_buffers=True``
    would average as numbers: refused before any step, naming ``use_buffers=False``."""
    module = _tiny_llama(quantize="nf4", lora={"r": 4}, optimizer="adamw_8bit")
    trainer = _lm_trainer([EMAWeightAveraging(decay=0.8, device="meta")])
    with pytest.raises(ValueError, match=r"EMAWeightAveraging\(use_buffers=True\) cannot average a model with "
                                         r"NF4-quantized layers .* Pass use_buffers=False"):
        trainer.fit(module, _text())
    assert trainer.global_step == 0


class OwnQLoRA(L.LightningModule):
    """A user's own QLoRA module (no LowMemModule): our ``quantize_model`` under peft's ``get_peft_model``."""

    def __init__(self):
        super().__init__()
        from peft import LoraConfig, get_peft_model

        from lowmem_lightning.quant import quantize_model

        torch.manual_seed(0)
        body = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 4))
        self.net = get_peft_model(quantize_model(body, skip=("4",)),
                                  LoraConfig(r=4, target_modules=["0", "2"], lora_alpha=8))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(32, 16, generator=g)
        return DataLoader(TensorDataset(x, x[:, :4].argmax(1)), batch_size=8)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)


def test_ema_over_a_users_own_nf4_module_leaves_its_base_under_the_callback():
    """The same for any module the callback trains (here the user's own QLoRA module), not only ``CausalLMModule``:
    with the default ``use_buffers=True`` and with ``False`` the NF4 base stays bit for bit."""
    for use_buffers in (True, False):
        module = OwnQLoRA()
        base = {n: b.clone() for n, b in module.named_buffers()}
        assert base, "quantize_model left no NF4 buffers"
        trainer = _trainer("adamw_8bit", [EMAWeightAveraging(decay=0.8, use_buffers=use_buffers)], max_steps=2)
        trainer.fit(module)
        assert trainer.global_step == 2 and not _same_tensors(base, dict(module.named_buffers()))


def test_lowmem_fit_with_ema_and_a_linked_last_in_yaml_resumes(tmp_path, monkeypatch, capsys):
    """The tiny recipe with ``EMAWeightAveraging`` and ``ModelCheckpoint(save_last="link")`` pasted into its
    callbacks: ``lowmem fit`` trains, ``last.ckpt`` is a link to the newest checkpoint (no copy) holding the averaged
    and the current model, and ``--ckpt_path last`` resumes from it."""
    from lowmem_lightning.cli import RECIPES_DIR, main

    recipe = yaml.safe_load((RECIPES_DIR / "tiny.yaml").read_text())
    recipe["trainer"]["callbacks"] += [
        {"class_path": "lightning.pytorch.callbacks.EMAWeightAveraging", "init_args": {"decay": 0.9}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": "ckpts", "filename": "{step}", "every_n_train_steps": 2, "save_top_k": 1,
                       "save_last": "link"}},
    ]
    (tmp_path / "ema.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    args = ["fit", "--config", "ema.yaml", "--trainer.limit_val_batches", "0", "--data.init_args.seq_len", "32",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--ckpt_path", "last", "--trainer.max_steps"]
    assert main([*args, "4"]) == 0
    last = tmp_path / "ckpts" / "last.ckpt"
    assert last.is_symlink() and os.readlink(last) == "step=4.ckpt"
    saved = torch.load(last, weights_only=True)
    assert {"current_model_state", "averaging_state"} <= set(saved) and saved["global_step"] == 4
    assert _same_tensors(saved["state_dict"], saved["current_model_state"])  # the average and the current model
    capsys.readouterr()
    assert main([*args, "6"]) == 0
    # the link and its target are one checkpoint, named by its file
    assert f"resuming from {tmp_path}/ckpts/step=4.ckpt (step 4, the newest of 1 checkpoint" in capsys.readouterr().err
    assert os.readlink(last) == "step=6.ckpt" and sorted(p.name for p in last.parent.iterdir()) == [
        "last.ckpt", "step=4.ckpt", "step=6.ckpt"]  # top-1, and the file resumed from (Lightning keeps it)
    assert torch.load(last, weights_only=True)["global_step"] == 6


# ------------------------------------------------------------------ 2. ddp_spawn


class Regressor(LowMemModule):
    """A ``LowMemModule`` a user writes (importable: ``ddp_spawn`` pickles it into the processes it starts)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 80), nn.Tanh(), nn.Linear(80, 64), nn.Tanh(), nn.Linear(64, 1))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        loss = nn.functional.mse_loss(self(batch[0]), batch[1])
        self.log("train_loss", loss, sync_dist=True)
        return loss


def _spawn_data(devices: int):
    """4 global batches of 16; under DDP each rank reads its DistributedSampler half (seed 0, shuffled), so one
    process reading ``perm`` in order sees the same global batches."""
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(64, 16, generator=generator)
    dataset = TensorDataset(x, torch.cos(x[:, :1]))
    if devices > 1:
        return DataLoader(dataset, batch_size=16 // devices)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0)).tolist()
    return DataLoader(dataset, batch_size=16, sampler=perm)


def _spawn_fit(module, devices, root, callbacks=(), ckpt_path=None, steps=4, **kwargs):
    strategy = "ddp_spawn" if devices > 1 else "auto"
    trainer = L.Trainer(accelerator="cpu", strategy=strategy, devices=devices, max_steps=steps, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                        callbacks=list(callbacks), **kwargs)
    trainer.fit(module, _spawn_data(devices), ckpt_path=ckpt_path)
    return trainer



@pytest.mark.slow
def test_ddp_spawn_with_the_callback_brings_the_trained_weights_back(tmp_path, gloo_env):
    """``ddp_spawn`` pickles the module, the Trainer and the callback (with its parts: monitor, plot) into 2 gloo
    processes; the weights rank 0 trained come back into this process's module, equal to one process on the same
    global batches (as the module's SGD under torch does), and so do the logged metrics. (Before: rank 1 aborted at
    exit in 5 of ~35 runs, SIGABRT after "fit stopped", the monitor's log-dir broadcast being the fit's last
    collective: StateMemoryMonitor.on_fit_start.)"""
    def fit(devices):
        module = Regressor(optimizer="sgd", lr=0.1)
        callback = LowMemOptimizerCallback("adamw_8bit", lr=1e-2, print_summary=False)  # monitor and plot on
        trainer = _spawn_fit(module, devices, tmp_path / str(devices), [callback], enable_checkpointing=False)
        return trainer, module

    _, single = fit(1)
    trainer, spawned = fit(2)
    start = Regressor(optimizer="sgd", lr=0.1)
    assert trainer.world_size == 2 and "train_loss" in trainer.callback_metrics
    for a, b in zip(single.parameters(), spawned.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=2e-5)
    assert _max_diff(list(single.parameters()), list(start.parameters())) > 1e-3  # the weights moved


@pytest.mark.slow
def test_ddp_spawn_lowmem_module_checkpoint_resumes_exactly(tmp_path, gloo_env):
    """A ``LowMemModule`` (adamw_8bit) under ``ddp_spawn``: 1 epoch (4 steps), checkpoint, resume to 8 in new
    processes equals 8 straight (bit for bit); the checkpoint also resumes in one process (16 s on the loaded
    2-core machine)."""
    every = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, every_n_train_steps=4, save_top_k=-1)
    straight = Regressor(optimizer="adamw_8bit", lr=1e-2)
    _spawn_fit(straight, 2, tmp_path / "a", [ModelCheckpoint(dirpath=tmp_path / "a")], steps=8)
    _spawn_fit(Regressor(optimizer="adamw_8bit", lr=1e-2), 2, tmp_path / "b", [every], steps=4)
    assert torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)["global_step"] == 4
    resumed = Regressor(optimizer="adamw_8bit", lr=1e-2)
    _spawn_fit(resumed, 2, tmp_path / "b", [ModelCheckpoint(dirpath=tmp_path / "b", filename="end")], steps=8,
               ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    # the main process's Trainer keeps no loop state from the spawned ones (Lightning returns weights and metrics)
    assert torch.load(tmp_path / "b" / "end.ckpt", weights_only=True)["global_step"] == 8
    assert _equal(list(straight.parameters()), list(resumed.parameters()))
    alone = Regressor(optimizer="adamw_8bit", lr=1e-2)
    assert _spawn_fit(alone, 1, tmp_path / "c", ckpt_path=str(tmp_path / "ck" / "last.ckpt"), steps=6,
                      enable_checkpointing=False).global_step == 6


# ------------------------------------------------------------------ 3. linked last.ckpt, weights-only files


@pytest.mark.parametrize("save_last", ["link", True])
def test_save_last_resumes_bit_exactly_from_last(tmp_path, save_last):
    """``ModelCheckpoint(save_last=..., every_n_train_steps=2, save_top_k=1)``: ``last.ckpt`` is a link (no copy) to
    the newest file with ``"link"``, a checkpoint of its own with ``True``; ``Trainer.fit(ckpt_path="last")`` resumes
    from it, and 6 + 4 steps equal 10 straight."""
    def fit(root, steps, ckpt_path=None):
        link = ModelCheckpoint(dirpath=root, save_last=save_last, every_n_train_steps=2, save_top_k=1)
        trainer = _trainer("adamw_8bit", [link], max_steps=steps, max_epochs=-1, enable_checkpointing=True, root=root)
        module = Project(stateful=True)  # a StatefulDataLoader: the step-6 checkpoint is mid-epoch
        trainer.fit(module, ckpt_path=ckpt_path)
        return trainer, module

    _, straight = fit(tmp_path / "a", 10)
    fit(tmp_path / "b", 6)
    last = tmp_path / "b" / "last.ckpt"
    assert last.is_symlink() == (save_last == "link")
    assert last.is_file() and torch.load(last, weights_only=True)["global_step"] == 6
    trainer, resumed = fit(tmp_path / "b", 10, ckpt_path="last")
    assert trainer.global_step == 10 and _equal(list(straight.parameters()), list(resumed.parameters()))
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)  # the callback installed it: saves and
    # removals (the top-1 rotation) went through it
    assert last.is_symlink() == (save_last == "link") and torch.load(last, weights_only=True)["global_step"] == 10
    if save_last == "link":
        assert os.readlink(last) == "epoch=1-step=10.ckpt"



class _TermAtStep(L.Callback):
    """Sends this process SIGTERM at the start of the batch after ``step`` optimizer steps."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), __import__("signal").SIGTERM)


@pytest.mark.parametrize("ckpt_path", ["last", "file"])
def test_sigterm_last_ckpt_is_overwritten_by_the_resumed_run(tmp_path, ckpt_path):
    """SIGTERM saves ``last.ckpt`` into the folder of ``ModelCheckpoint(save_last=True, save_top_k=0)``; the resumed run
    ends with that one ``last.ckpt`` at its final step, equal to the straight run's (before: the resumed run took it
    for a stranger's file and wrote ``last-v1.ckpt`` beside it, leaving the stale step-3 ``last.ckpt``)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    def fit(root, callbacks=(), ckpt=None):
        checkpoint = ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0)
        trainer = _trainer("adamw_8bit", [checkpoint, *callbacks], max_steps=6, max_epochs=-1,
                           enable_checkpointing=True)
        trainer.fit(Project(stateful=True), ckpt_path=ckpt)

    fit(tmp_path / "straight")
    with pytest.raises(SIGTERMException):
        fit(tmp_path / "stopped", [_TermAtStep(2)])
    last = tmp_path / "stopped" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    fit(tmp_path / "stopped", ckpt="last" if ckpt_path == "last" else str(last))
    assert sorted(p.name for p in (tmp_path / "stopped").iterdir()) == ["last.ckpt"]
    straight, resumed = (torch.load(tmp_path / run / "last.ckpt", weights_only=True) for run in ("straight", "stopped"))
    assert straight["global_step"] == resumed["global_step"] == 6
    for key in ("state_dict", "optimizer_states"):
        assert not _same_tensors(straight[key], resumed[key]), key

def _saved(io, path, step):
    io.save_checkpoint({"global_step": step}, str(path))


def test_removing_the_linked_checkpoint_repoints_the_link_first(tmp_path):
    """Lightning's top-1 rotation removes the old file before it re-links ``last.ckpt`` (before: a kill between the
    two left a dangling ``last.ckpt``, on which ``ckpt_path="last"`` fails): the removal re-points the link to the
    newest checkpoint saved in that folder first, atomically; with none, the link goes with its target."""
    io = AtomicCheckpointIO()
    _saved(io, tmp_path / "step=2.ckpt", 2)
    os.symlink("step=2.ckpt", tmp_path / "last.ckpt")
    _saved(io, tmp_path / "step=4.ckpt", 4)
    io.remove_checkpoint(str(tmp_path / "step=2.ckpt"))
    last = tmp_path / "last.ckpt"
    assert last.is_symlink() and os.readlink(last) == "step=4.ckpt"
    assert torch.load(last, weights_only=True) == {"global_step": 4}
    io.remove_checkpoint(str(tmp_path / "step=4.ckpt"))  # nothing newer: no link left pointing nowhere
    assert not os.path.lexists(last) and sorted(os.listdir(tmp_path)) == []


def test_a_save_onto_the_link_replaces_the_link_not_its_target(tmp_path):
    """A save onto ``last.ckpt`` while it links a top-k file (``save_last=True`` after a ``"link"`` run, the SIGTERM
    checkpoint): the link becomes the new file; the file it pointed to keeps its own step (a write through the
    link, as an ``open(path, "wb")`` does, overwrote it)."""
    io = AtomicCheckpointIO()
    _saved(io, tmp_path / "step=2.ckpt", 2)
    os.symlink("step=2.ckpt", tmp_path / "last.ckpt")
    _saved(io, tmp_path / "last.ckpt", 3)
    assert not (tmp_path / "last.ckpt").is_symlink()
    assert torch.load(tmp_path / "step=2.ckpt", weights_only=True) == {"global_step": 2}
    assert torch.load(tmp_path / "last.ckpt", weights_only=True) == {"global_step": 3}


def _weights_only(root: Path, module: L.LightningModule, optimizer) -> Path:
    checkpoint = ModelCheckpoint(dirpath=root, save_weights_only=True, every_n_train_steps=4, save_top_k=-1)
    trainer = _trainer(optimizer, [checkpoint], max_steps=4, enable_checkpointing=True, root=root)
    trainer.fit(module, None if isinstance(module, Project) else _spawn_data(1))
    return root / "epoch=0-step=4.ckpt"


@pytest.mark.parametrize("how", ["callback", "lowmem_module"])
def test_resuming_a_weights_only_checkpoint_is_refused_clearly(tmp_path, how):
    """``ModelCheckpoint(save_weights_only=True)`` then ``fit(ckpt_path=that file)``: before, Lightning's ``KeyError``
    from deep in its optimizer restore; now one ``ValueError`` naming the file and how to start from its weights,
    before any step, nothing written (a user's module with the callback; a ``LowMemModule`` alone). ``validate``
    reads the same file."""
    make, optimizer = (Project, "adamw_8bit") if how == "callback" else (
        lambda: Regressor(optimizer="adamw_8bit"), None)
    path = _weights_only(tmp_path / "ck", make(), optimizer)
    before = {p.name: p.read_bytes() for p in path.parent.iterdir()}
    trainer = _trainer(optimizer, max_steps=8, root=tmp_path)
    with pytest.raises(ValueError, match=rf"Cannot resume from {path}: it holds the model weights only .* no "
                                         r"optimizer or LR scheduler state .*\.load_from_checkpoint\(path\)"):
        trainer.fit(make(), None if how == "callback" else _spawn_data(1), ckpt_path=str(path))
    assert trainer.global_step == 0
    assert {p.name: p.read_bytes() for p in path.parent.iterdir()} == before
    if how == "callback":
        assert _trainer(optimizer).validate(make(), ckpt_path=str(path), verbose=False)[0]["val_loss"] > 0


def test_lowmem_fit_refuses_a_weights_only_ckpt_path_in_one_line(tmp_path, monkeypatch, capsys):
    """``lowmem fit --ckpt_path <weights-only file>``: exit 2, one ``error:`` line naming the file and the way out,
    nothing created; ``lowmem validate`` takes the same file."""
    from lowmem_lightning.cli import RECIPES_DIR, main

    recipe = yaml.safe_load((RECIPES_DIR / "tiny.yaml").read_text())
    recipe["trainer"]["callbacks"].append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {
        "dirpath": "ckpts", "filename": "{step}", "every_n_train_steps": 2, "save_weights_only": True}})
    (tmp_path / "wo.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    small = ["--config", "wo.yaml", "--trainer.limit_val_batches", "1", "--data.init_args.seq_len", "32",
             "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    assert main(["fit", *small, "--trainer.max_steps", "2"]) == 0
    capsys.readouterr()
    runs = sorted(p.name for p in (tmp_path / "runs" / "tiny").iterdir())
    code = main(["fit", *small, "--trainer.max_steps", "4", "--ckpt_path", "ckpts/step=2.ckpt"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and "Traceback" not in err and len(errors) == 1, err
    assert "ckpt_path='ckpts/step=2.ckpt' cannot be resumed: it holds the model weights only" in errors[0]
    assert sorted(p.name for p in (tmp_path / "runs" / "tiny").iterdir()) == runs
    assert main(["validate", *small, "--ckpt_path", "ckpts/step=2.ckpt"]) == 0


# ------------------------------------------------------------------ 4. modules users write


class Written(L.LightningModule):
    """Modules users write, each with its own torch AdamW: ``kind`` picks the feature."""

    def __init__(self, kind: str):
        super().__init__()
        _layers(self, kind)

    def forward(self, x):
        if self.kind == "sparse":
            return self.head(self.table((x.abs() * 30).long().clamp(max=99)[:, 0]))
        if self.kind.startswith("complex"):
            w = self.w if self.kind == "complex" else torch.view_as_complex(self.w)
            return self.head((x.to(torch.cfloat) @ w).abs())
        if self.kind == "tied":
            return self.head(torch.tanh(self.b(torch.tanh(self.a(torch.tanh(self.inp(x)))))))
        return self.head(torch.tanh(self.body(x)))

    def training_step(self, batch, batch_idx):
        return nn.functional.mse_loss(self(batch[0]), batch[1])

    def on_train_epoch_start(self):
        if self.kind == "unfreeze" and self.current_epoch == 1:
            self.body.requires_grad_(True)

    def train_dataloader(self):
        x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
        return DataLoader(TensorDataset(x, x.sum(1, keepdim=True).sin()), batch_size=16)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _layers(module: nn.Module, kind: str) -> None:
    """The layers of ``Written(kind)``, seeded."""
    torch.manual_seed(0)
    module.kind = kind
    module.head = nn.Linear(96, 1)
    if kind == "lazy":  # the optimizer is built over uninitialized params (before the first forward)
        module.body = nn.LazyLinear(96)
    elif kind == "sparse":
        module.table = nn.Embedding(100, 96, sparse=True)
    elif kind in ("complex", "complex_as_real"):
        w = torch.randn(16, 96, dtype=torch.cfloat) / 4
        module.w = nn.Parameter(w if kind == "complex" else torch.view_as_real(w))
    elif kind == "tied":  # one weight shared by two layers
        module.a, module.b = nn.Linear(96, 96), nn.Linear(96, 96)
        module.b.weight = module.a.weight
        module.inp = nn.Linear(16, 96)
    elif kind == "unfreeze":  # frozen at start, unfrozen by the user in on_train_epoch_start
        module.body = nn.Linear(16, 96).requires_grad_(False)


class LowMemWritten(LowMemModule):
    """``Written(kind)`` as a ``LowMemModule`` (adamw_8bit): the same layers and steps, our configure_optimizers."""

    forward, training_step, train_dataloader = Written.forward, Written.training_step, Written.train_dataloader

    def __init__(self, kind: str):
        super().__init__(optimizer="adamw_8bit", lr=1e-2)
        _layers(self, kind)


def _written(kind, optimizer):
    module = Written(kind)
    trainer = _trainer(optimizer, max_epochs=2)
    trainer.fit(module)
    return trainer, module


@pytest.mark.parametrize("kind", ["lazy", "tied", "unfreeze"])
def test_written_modules_train_as_under_torch_adamw(kind):
    """``nn.LazyLinear`` (16x96 + 96x1: the 1536-element weight keeps fp32 state, the rule for < 4096), a weight tied
    between two layers (one state, updated once per step with both layers' gradients), a layer unfrozen at epoch 1:
    ours follows torch's AdamW within 8-bit noise (adamw_8bit; the same algorithm: the tied 96x96 weight, 8-bit state,
    2.1e-3 from torch's after moving 7.4e-2), every trainable param moves."""
    _, torch_module = _written(kind, None)
    trainer, ours = _written(kind, "adamw_8bit")
    start = Written(kind)
    if kind == "lazy":
        start(torch.zeros(1, 16))  # materialize with the same initialization
    opt = trainer.optimizers[0]
    assert len(opt.state) == len(list(ours.parameters()))  # the tied weight once; the unfrozen one has state
    moved = {n: (p - s).abs().max().item() for (n, p), s in zip(ours.named_parameters(), start.parameters())}
    apart = {n: (p - q).abs().max().item() for (n, p), q in zip(ours.named_parameters(), torch_module.parameters())}
    assert min(moved.values()) > 1e-3, moved
    assert all(apart[n] <= 0.05 * moved[n] for n in moved), (apart, moved)  # 8-bit noise: <= 5% of the movement
    if kind == "tied":
        assert ours.a.weight is ours.b.weight and len(list(ours.parameters())) == 7  # the tied weight once


@pytest.mark.parametrize("how", ["callback", "lowmem_module"])
def test_sparse_embedding_is_refused_by_name_before_training(how):
    """``nn.Embedding(sparse=True)``: before, a ``RuntimeError`` at the first step naming "param group 0, param 0"
    (torch's AdamW: at its first step too, naming no param); now a ``ValueError`` naming ``table.weight`` and the
    fix when the optimizer is built, the params untouched."""
    if how == "callback":
        module, trainer = Written("sparse"), _trainer("adamw_8bit")
    else:
        module, trainer = LowMemWritten("sparse"), _trainer(None)
    start = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(ValueError, match=r"Invalid optimizer='adamw_8bit' for param 'table.weight': its "
                                         r"Embedding\(sparse=True\) gives it sparse gradients, which AdamW8bit "
                                         r"cannot update .* sparse=False"):
        trainer.fit(module, module.train_dataloader())
    assert trainer.global_step == 0 and _equal(start, list(module.parameters()))


@pytest.mark.parametrize("how", ["callback", "lowmem_module"])
def test_complex_param_is_refused_by_name_and_its_real_view_trains_as_torch_adamw(how):
    """A complex param: torch's AdamW updates it as its real view; ours refused it with a message about precision
    (wrong: the precision was 32-true). Now a ``ValueError`` naming ``w`` and the way the message offers
    (``view_as_real``), which trains as torch's AdamW on the complex param does (the same numbers: fp32 state);
    ``optimizer="adamw"`` through the callback is torch's AdamW itself."""
    module = Written("complex") if how == "callback" else LowMemWritten("complex")
    trainer = _trainer("adamw_8bit" if how == "callback" else None)
    with pytest.raises(ValueError, match=r"Invalid optimizer='adamw_8bit' for param 'w' \(torch.complex64\): "
                                         r"AdamW8bit updates real floating-point params only .*torch\.view_as_real"):
        trainer.fit(module)
    assert trainer.global_step == 0
    if how == "lowmem_module":
        return
    _, torch_complex = _written("complex", None)
    _, ours_real = _written("complex_as_real", "adamw_8bit")
    _, torch_via_callback = _written("complex", "adamw")
    torch.testing.assert_close(torch.view_as_real(torch_complex.w), ours_real.w, rtol=0, atol=1e-5)
    assert _equal(list(torch_complex.parameters()), list(torch_via_callback.parameters()))


# ------------------------------------------------------------------ 5. Trainer flags, best, loading


def _params_after(optimizer, **kwargs):
    module = Project()
    _trainer(optimizer, max_epochs=2, **kwargs).fit(module)
    return [p.detach().clone() for p in module.parameters()]


def test_detect_anomaly_and_deterministic_change_nothing():
    """``Trainer(detect_anomaly=True)`` and ``Trainer(deterministic=True)`` train ours bit for bit as without them
    (as they leave torch's AdamW unchanged); two deterministic runs are equal."""
    plain = _params_after("adamw_8bit")
    assert _equal(plain, _params_after("adamw_8bit", detect_anomaly=True))
    assert _equal(plain, _params_after("adamw_8bit", deterministic=True))
    assert _equal(_params_after(None), _params_after(None, deterministic=True))


def test_barebones_trains_as_without_it_and_writes_and_prints_nothing(tmp_path, monkeypatch, capsys):
    """``Trainer(barebones=True)`` (Lightning's raw-speed mode: no logging, no model summary, nothing written) trains
    ours as it trains without it; the callback keeps its summary in ``monitor.summary`` but prints no summary and
    writes no ``state_memory.png`` (it did, into the working directory)."""
    monkeypatch.chdir(tmp_path)
    module, callback = Project(), LowMemOptimizerCallback("adamw_8bit")
    L.Trainer(accelerator="cpu", devices=1, max_epochs=2, barebones=True, callbacks=[callback]).fit(module)
    assert _equal([p.detach() for p in module.parameters()], _params_after("adamw_8bit"))
    assert list(tmp_path.iterdir()) == []
    assert "LowMemOptimizerCallback" not in capsys.readouterr().out
    assert callback.monitor.summary["bytes_per_param"] > 0


def test_max_time_stop_then_resume_continues_exactly(tmp_path, monkeypatch):
    """``Trainer(max_time=...)`` stops mid-epoch (a clock that advances 1 s per reading: the stop step is fixed);
    the fit resumed from its ``last.ckpt`` with more time reaches step 20 with the weights of 20 straight steps."""
    from lightning.pytorch.callbacks import timer

    clock = iter(range(10**6))
    monkeypatch.setattr(timer.time, "monotonic", lambda: float(next(clock)))

    def fit(root, ckpt_path=None, **limits):
        module = Project(stateful=True)
        checkpoint = ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0)
        trainer = _trainer("adamw_8bit", [checkpoint], max_epochs=-1, enable_checkpointing=True, **limits)
        trainer.fit(module, ckpt_path=ckpt_path)
        return trainer, module

    stopped, _ = fit(tmp_path / "a", max_time={"seconds": 12})
    assert 0 < stopped.global_step < 20 and stopped.global_step % 8  # stopped by the time, mid-epoch
    assert torch.load(tmp_path / "a" / "last.ckpt", weights_only=True)["global_step"] == stopped.global_step
    trainer, resumed = fit(tmp_path / "a", ckpt_path="last", max_time={"hours": 1}, max_steps=20)
    _, straight = fit(tmp_path / "b", max_steps=20)
    assert trainer.global_step == 20 and _equal(list(straight.parameters()), list(resumed.parameters()))


def test_validate_test_predict_from_best_after_a_fit_with_the_callback(tmp_path):
    """After a fit with the callback and ``ModelCheckpoint(monitor="val_loss")``, ``validate/test/predict(ckpt_path=
    "best")`` use the best checkpoint's weights (the same numbers as the module loaded from it), as after a fit with
    torch's AdamW; no optimizer is built or restored."""
    module = Project()
    best = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=1)
    trainer = _trainer("adamw_8bit", [best], max_epochs=3, enable_checkpointing=True)
    trainer.fit(module)
    loaded = Project()
    loaded.load_state_dict(torch.load(best.best_model_path, weights_only=True)["state_dict"])
    with torch.no_grad():
        want = nn.functional.cross_entropy(loaded(loaded.x[:32]), loaded.y[:32]).item()
        logits = loaded(loaded.x[:32])
    assert trainer.validate(module, ckpt_path="best", verbose=False)[0]["val_loss"] == pytest.approx(want, rel=1e-6)
    assert trainer.test(module, ckpt_path="best", verbose=False)[0]["test_loss"] == pytest.approx(want, rel=1e-6)
    torch.testing.assert_close(trainer.predict(module, ckpt_path="best")[0], logits)


LOAD_IN_NEW_PROCESS = """
import sys, torch
sys.path.insert(0, {tests!r})
from lowmem_lightning.modules.causal_lm import CausalLMModule
from test_field_lightning_round3 import Regressor
regressor = Regressor.load_from_checkpoint({regressor!r}).eval()
lm = CausalLMModule.load_from_checkpoint({lm!r}).eval()
with torch.no_grad():
    torch.save({{"regressor": regressor(torch.ones(2, 16)), "lm": lm(torch.arange(8)[None]).logits,
                "hparams": dict(regressor.hparams), "lm_type": type(lm.model).__name__}}, {out!r})
"""


def test_load_from_checkpoint_in_a_new_process_and_weights_only_torch_load(tmp_path):
    """A ``LowMemModule`` and an NF4 + LoRA ``CausalLMModule`` trained with adamw_8bit, loaded for inference with
    ``load_from_checkpoint`` in a new process: the same hparams and outputs. Both checkpoints (8-bit optimizer state
    included) load with ``torch.load(weights_only=True)``, torch's default since 2.6."""
    regressor = Regressor(optimizer="adamw_8bit", lr=1e-2)
    trainer = _trainer(None, max_steps=2)
    trainer.fit(regressor, _spawn_data(1))
    trainer.save_checkpoint(tmp_path / "regressor.ckpt")
    lm = _tiny_llama(quantize="nf4", lora={"r": 4}, optimizer="adamw")
    trainer = _lm_trainer(_callback("adamw_8bit"), steps=2)
    trainer.fit(lm, _text())
    trainer.save_checkpoint(tmp_path / "lm.ckpt")
    for name in ("regressor", "lm"):
        saved = torch.load(tmp_path / f"{name}.ckpt", weights_only=True)
        assert saved["optimizer_states"][0]["state"] and saved["hyper_parameters"]
    script = LOAD_IN_NEW_PROCESS.format(tests=str(HERE), regressor=str(tmp_path / "regressor.ckpt"),
                                        lm=str(tmp_path / "lm.ckpt"), out=str(tmp_path / "out.pt"))
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    regressor.eval()
    lm.eval()
    with torch.no_grad():
        assert torch.equal(out["regressor"], regressor(torch.ones(2, 16)))
        assert torch.equal(out["lm"], lm(torch.arange(8)[None]).logits)
    assert out["hparams"] == dict(regressor.hparams) and out["lm_type"] == "PeftModelForCausalLM"


@pytest.mark.parametrize("optimizer", sorted(set(available_optimizers())))
def test_every_optimizers_checkpoint_loads_with_weights_only(tmp_path, optimizer):
    """``torch.load(path, weights_only=True)`` (torch's default since 2.6; Lightning's loader) reads a checkpoint of
    every registered optimizer: nothing outside torch's allowlist (no class, no dtype object) in its state."""
    module = Project(n=32)
    callback = LowMemOptimizerCallback(optimizer, lr=None if optimizer == "adafactor" else 1e-3,
                                       log_state_memory=False, plot=False, print_summary=False)
    trainer = _trainer(None, [callback])
    trainer.fit(module)
    trainer.save_checkpoint(tmp_path / "x.ckpt")
    saved = torch.load(tmp_path / "x.ckpt", weights_only=True)
    assert saved["callbacks"]["LowMemOptimizerCallback"]["optimizer"] == optimizer
    assert len(saved["optimizer_states"][0]["state"]) == len(list(module.parameters()))
