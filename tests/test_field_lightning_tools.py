"""Lightning's own tools met the way a project meets them: a LightningModule with its own torch AdamW (HF-style
decay / no-decay groups at different lrs, its own LR scheduler) swapped by ``LowMemOptimizerCallback``, next to
``Tuner.lr_find`` / ``scale_batch_size``, ``StochasticWeightAveraging``, ``EarlyStopping`` + resume,
``GradientAccumulationScheduler``, ``ModelPruning``, ``LearningRateMonitor``, the schedulers users bring, OneCycleLR
cycling momentum, ``torch.compile`` and validate/test before fit. Each is compared with the same project without the
callback (torch AdamW): the same lrs, steps and momentum trajectories, and resume equal to an uninterrupted run.
Combinations that cannot work are refused before any step, naming the tool, the optimizer and what to do."""

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import (
    EarlyStopping,
    GradientAccumulationScheduler,
    LearningRateFinder,
    LearningRateMonitor,
    ModelCheckpoint,
    ModelPruning,
    StochasticWeightAveraging,
    Timer,
)
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.tuner import Tuner
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lowmem_lightning.callbacks import LowMemOptimizerCallback
from lowmem_lightning.optim import optimizer_class

pytestmark = pytest.mark.usefixtures("one_thread")
S = torch.optim.lr_scheduler


class Project(L.LightningModule):
    """A user's module: its own AdamW over decay (matrices) / no-decay (biases, LayerNorm) groups, the no-decay
    group at half the lr, and ``schedule(opt)`` (a scheduler or a Lightning scheduler dict) when given."""

    def __init__(self, lr=3e-3, schedule=None, n=128, batch_size=16):
        super().__init__()
        torch.manual_seed(0)
        self.lr, self.schedule, self.batch_size = lr, schedule, batch_size
        self.body = nn.Sequential(nn.Linear(16, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 64), nn.GELU())
        self.head = nn.Linear(64, 4)
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

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.x[:32], self.y[:32]), batch_size=32)

    def test_dataloader(self):
        return self.val_dataloader()

    def configure_optimizers(self):
        named = list(self.named_parameters())
        no_decay = [p for n, p in named if n.endswith("bias") or n.startswith("body.1.")]
        decay = [p for n, p in named if not (n.endswith("bias") or n.startswith("body.1."))]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                                 {"params": no_decay, "weight_decay": 0.0, "lr": self.lr / 2}], lr=self.lr)
        if self.schedule is None:
            return opt
        scheduler = self.schedule(opt)
        config = scheduler if isinstance(scheduler, dict) else {"scheduler": scheduler, "interval": "step"}
        return {"optimizer": opt, "lr_scheduler": config}


class Seen(L.Callback):
    """Per training batch: the lr of every group, the first group's beta1/momentum, and the loss."""

    def __init__(self):
        self.lrs, self.beta1, self.losses = [], [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        groups = trainer.optimizers[0].param_groups
        self.lrs.append(tuple(round(g["lr"], 12) for g in groups))
        self.beta1.append(round(float(groups[0]["betas"][0] if "betas" in groups[0] else groups[0]["momentum"]), 9))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


class StopAfter(L.Callback):
    """Stop the fit at the end of epoch ``epochs - 1`` (a preemption / early stop at an epoch boundary)."""

    def __init__(self, epochs):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, module):
        if trainer.current_epoch + 1 == self.epochs:
            trainer.should_stop = True


def _callback(optimizer, **kwargs):
    return LowMemOptimizerCallback(optimizer, log_state_memory=False, plot=False, print_summary=False, **kwargs)


def _trainer(optimizer, callbacks=(), root=None, **kwargs):
    """A CPU Trainer; ``optimizer``: None (the module's torch AdamW), a name (the callback) or a callback."""
    callbacks = list(callbacks)
    if optimizer is not None:
        callbacks.append(_callback(optimizer) if isinstance(optimizer, str) else optimizer)
    kwargs.setdefault("max_epochs", 1)
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    return L.Trainer(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=callbacks, default_root_dir=root, **kwargs)


def _fit(optimizer, module=None, callbacks=(), root=None, ckpt_path=None, **kwargs):
    module = module or Project()
    seen = Seen()
    trainer = _trainer(optimizer, [*callbacks, seen], root, **kwargs)
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer, module, seen


def _max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a.parameters(), b.parameters()))


# ------------------------------------------------------------------ Tuner


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "adamw_4bit", "lion_8bit"])
def test_lr_find_searches_with_ours_then_the_fit_trains_at_its_suggestion(tmp_path, optimizer):
    """Tuner.lr_find runs its search with the swapped optimizer (Lion: the suggestion within ~2x of AdamW's, its
    sign update moving every element by lr; benchmarks/lr_find_field.py), writes the suggestion to the module, and
    the fit after it trains ours at that lr (the module's configure_optimizers runs again: no-decay at half)."""
    suggestions = {}
    for name in (None, optimizer):
        module = Project(n=512)
        trainer = _trainer(name, root=tmp_path)
        finder = Tuner(trainer).lr_find(module, min_lr=1e-5, max_lr=1.0, num_training=30)
        suggestions[name] = finder.suggestion()
        assert module.lr == suggestions[name]
        seen = Seen()
        trainer.callbacks.append(seen)
        trainer.fit(module)
        assert type(trainer.optimizers[0]) is (torch.optim.AdamW if name is None else optimizer_class(optimizer))
        assert seen.lrs[0] == pytest.approx((suggestions[name], suggestions[name] / 2), rel=1e-9)
        assert sum(seen.losses[-4:]) < sum(seen.losses[:4])
    ratio = suggestions[optimizer] / suggestions[None]
    assert 0.25 <= ratio <= 4, suggestions


def test_lr_find_with_a_callback_lr_is_refused_and_update_attr_false_is_not(tmp_path):
    """The callback's own lr would override what lr_find writes to the module (silently: the next fit trained at
    the callback's lr): refused before the search, saying both ways out, leaving the Trainer without the Tuner's
    finder (as the Tuner leaves it); update_attr=False searches."""
    trainer = _trainer(_callback("adamw_4bit", lr=5e-2), root=tmp_path)
    with pytest.raises(ValueError, match=r"LowMemOptimizerCallback\(optimizer='adamw_4bit', lr=0.05\).*"
                                         r"Tuner.lr_find\(update_attr=True\).*leave the callback's lr unset.*"
                                         r"update_attr=False"):
        Tuner(trainer).lr_find(Project(n=256), num_training=10)
    trainer.fit(Project())  # the Tuner's finder is gone from the Trainer: a plain fit is not refused again
    assert trainer.global_step == 8 and trainer.optimizers[0].param_groups[0]["lr"] == 5e-2
    trainer = _trainer(_callback("adamw_4bit", lr=5e-2), root=tmp_path)
    module = Project(n=512)
    finder = Tuner(trainer).lr_find(module, num_training=30, update_attr=False)
    assert finder.suggestion() is not None and module.lr == 3e-3


@pytest.mark.parametrize("mode", ["power", "binsearch"])
def test_scale_batch_size_finds_what_torch_adamw_finds_and_the_fit_starts_fresh(tmp_path, mode):
    found = {}
    for name in (None, "adamw_4bit"):
        module = Project(n=128, batch_size=4)
        trainer = _trainer(name, root=tmp_path)
        found[name] = Tuner(trainer).scale_batch_size(module, mode=mode, steps_per_trial=1, init_val=4, max_trials=3)
        trainer.fit(module)
        steps = {int(float(s["step"])) for s in trainer.optimizers[0].state.values()}
        assert steps == {trainer.global_step} and trainer.global_step == -(-128 // found[name])
    assert found[None] == found["adamw_4bit"] == module.batch_size


# ------------------------------------------------------------------ SWA, EarlyStopping, resume


def _swa():
    return StochasticWeightAveraging(swa_lrs=1e-3, swa_epoch_start=2, annealing_epochs=2)


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "came", "lion_8bit", "muon"])
def test_swa_anneals_and_averages_as_with_torch_adamw(optimizer):
    """SWALR drives our optimizer through the same lrs as torch AdamW's, per group, and the fit ends on the average."""
    torch_trainer, _, reference = _fit(None, callbacks=[_swa()], max_epochs=4)
    swa = _swa()
    _, module, seen = _fit(optimizer, callbacks=[swa], max_epochs=4)
    assert seen.lrs == reference.lrs and seen.lrs[-1] == (1e-3, 1e-3)
    assert int(swa.n_averaged) == 3
    assert all(torch.equal(a, b) for a, b in zip(module.parameters(), swa._average_model.parameters()))


@pytest.mark.parametrize("tool", ["swa", "plateau"])
def test_resume_keeps_an_lr_the_run_moved(tmp_path, tool):
    """A run stopped at an epoch end and resumed from last.ckpt goes through the lrs torch AdamW's does: SWA's
    initial_lr and ReduceLROnPlateau's reduced lr stay (the resume rescaled them back to the configured lr, a 3x /
    4x jump). Under SWA the resumed run ends as the uninterrupted one. (A plateau step at the epoch the checkpoint
    was saved is skipped by Lightning's restart, with torch AdamW too.)"""
    def run(optimizer, root, stop=None, ckpt_path=None):
        schedule = (lambda opt: {"scheduler": S.ReduceLROnPlateau(opt, patience=0, factor=0.5, threshold=10.0),
                                 "monitor": "val_loss", "interval": "epoch"}) if tool == "plateau" else None
        callbacks = [_swa()] if tool == "swa" else []
        callbacks += [ModelCheckpoint(dirpath=root, save_last=True)] + ([StopAfter(stop)] if stop else [])
        return _fit(optimizer, Project(schedule=schedule), callbacks, root, ckpt_path, max_epochs=4,
                    enable_checkpointing=True)

    lrs = {}
    for optimizer in (None, "adamw_8bit"):
        _, _, first = run(optimizer, tmp_path / str(optimizer), stop=2)
        _, resumed, second = run(optimizer, tmp_path / str(optimizer), ckpt_path="last")
        lrs[optimizer] = first.lrs + second.lrs
    assert lrs["adamw_8bit"] == lrs[None] and len(set(lrs[None])) > 2
    if tool == "swa":
        _, whole, seen = run("adamw_8bit", tmp_path / "whole")
        assert seen.lrs == lrs[None] and _max_diff(whole, resumed) == 0.0


def test_the_cli_lr_after_resume_keeps_swa_lrs_too(tmp_path):
    """``lowmem fit`` without --optim resumes through RunLrAfterResume (a new --model.lr applies): it rescaled
    SWA's initial_lr back to the configured lr as the callback did; now the resumed run ends as the uninterrupted
    one."""
    from lowmem_lightning.cli.resume_args import RunLrAfterResume

    def run(root, stop=None, ckpt_path=None):
        callbacks = [_swa(), RunLrAfterResume(), ModelCheckpoint(dirpath=root, save_last=True)]
        return _fit(None, Project(), callbacks + ([StopAfter(stop)] if stop else []), root, ckpt_path,
                    max_epochs=4, enable_checkpointing=True)

    _, whole, seen = run(tmp_path / "a")
    _, _, first = run(tmp_path / "b", stop=2)
    _, resumed, second = run(tmp_path / "b", ckpt_path="last")
    assert first.lrs + second.lrs == seen.lrs and _max_diff(whole, resumed) == 0.0


def test_a_new_lr_at_resume_still_applies_on_top_of_a_reduced_lr(tmp_path):
    """The checkpoint records the lrs its run configured; a resume with a new callback lr rescales by new /
    configured (here 1/4), so the plateau's reduction is kept and the new lr applies."""
    def run(lr, stop=None, ckpt_path=None):
        schedule = lambda opt: {"scheduler": S.ReduceLROnPlateau(opt, patience=0, factor=0.5,  # noqa: E731
                                                                 threshold=10.0),
                                "monitor": "val_loss", "interval": "epoch"}
        callbacks = [ModelCheckpoint(dirpath=tmp_path, save_last=True)] + ([StopAfter(stop)] if stop else [])
        return _fit(_callback("adamw_4bit", lr=lr), Project(schedule=schedule), callbacks, tmp_path, ckpt_path,
                    max_epochs=3, enable_checkpointing=True)

    _, _, first = run(4e-3, stop=2)
    assert first.lrs[0] == (4e-3, 2e-3) and first.lrs[-1] == (2e-3, 1e-3)  # reduced after epoch 0
    _, _, second = run(1e-3, ckpt_path="last")
    assert second.lrs[0] == (5e-4, 2.5e-4)


def test_early_stopping_then_resume_from_last_continues_as_one_run(tmp_path):
    schedule = lambda opt: S.CosineAnnealingLR(opt, T_max=32)  # noqa: E731

    def run(root, stopping, ckpt_path=None):
        return _fit("adamw_4bit", Project(schedule=schedule), [stopping, ModelCheckpoint(dirpath=root, save_last=True)],
                    root, ckpt_path, max_epochs=4, enable_checkpointing=True)

    first, _, _ = run(tmp_path / "b", EarlyStopping("val_loss", patience=0, min_delta=10.0))
    assert first.current_epoch == 2 and first.global_step == 16  # stopped early
    resumed, module, _ = run(tmp_path / "b", EarlyStopping("val_loss", patience=10), ckpt_path="last")
    whole, reference, _ = run(tmp_path / "a", EarlyStopping("val_loss", patience=10))
    assert resumed.global_step == whole.global_step == 32
    assert {int(float(s["step"])) for s in resumed.optimizers[0].state.values()} == {32}
    assert _max_diff(module, reference) == 0.0


# ------------------------------------------------------------------ accumulation, pruning, monitor


def test_gradient_accumulation_scheduler_steps_as_with_torch_adamw():
    gas = lambda: GradientAccumulationScheduler({0: 1, 1: 4})  # noqa: E731
    reference, _, torch_seen = _fit(None, callbacks=[gas()], max_epochs=2)
    trainer, _, seen = _fit("adamw_8bit", callbacks=[gas()], max_epochs=2)
    assert trainer.global_step == reference.global_step == 8 + 2
    assert {int(float(s["step"])) for s in trainer.optimizers[0].state.values()} == {10}
    assert seen.losses == pytest.approx(torch_seen.losses, abs=2e-3)


def test_gradient_release_refuses_a_gradient_accumulation_scheduler():
    """step_in_backward steps inside every backward: with accumulation from epoch 1 on it stepped on every micro-
    batch (16 optimizer steps for Lightning's 10), silently; refused before training."""
    trainer = _trainer(_callback("adamw_8bit", step_in_backward=True),
                       [GradientAccumulationScheduler({0: 1, 1: 4})], max_epochs=2)
    with pytest.raises(ValueError, match=r"step_in_backward=True\) cannot run: GradientAccumulationScheduler\("
                                         r"scheduling=\{0: 1, 1: 4\}\).*remove it.*step_in_backward=False"):
        trainer.fit(Project())


@pytest.mark.parametrize("optimizer", ["adamw_4bit", "muon"])
def test_model_pruning_with_lottery_ticket_resets_trains_our_optimizer(optimizer):
    """ModelPruning renames each weight to weight_orig (the same Parameter, so the optimizer keeps its state)
    and, with the lottery-ticket reset, gives weight_orig new memory (.data =) each epoch: our updates land in it
    (the loss falls within each epoch), and the pruned weights stay zero."""
    pruning = ModelPruning("l1_unstructured", amount=0.3)
    trainer, module, seen = _fit(optimizer, callbacks=[pruning], max_epochs=3)
    zeros = float((module.body[0].weight == 0).float().mean())
    assert zeros > 0.2
    for epoch in range(3):
        losses = seen.losses[epoch * 8:(epoch + 1) * 8]
        assert sum(losses[-3:]) < sum(losses[:3]), (epoch, losses)


def test_timer_stops_the_fit_and_every_optimizer_step_counted():
    timer = Timer(duration={"seconds": 1})
    trainer, _, seen = _fit("lion_8bit", callbacks=[timer], max_epochs=10_000)
    assert 0 < trainer.current_epoch < 10_000 and timer.time_elapsed("train") >= 1.0
    assert {int(float(s["step"])) for s in trainer.optimizers[0].state.values()} == {trainer.global_step}
    assert sum(seen.losses[-4:]) < sum(seen.losses[:4])


def test_learning_rate_monitor_logs_the_same_metrics_as_with_torch_adamw(tmp_path):
    """Several param groups, a StepLR, momentum and weight decay logged: the same names and values."""
    def logged(optimizer, root):
        monitor = LearningRateMonitor(logging_interval="step", log_momentum=True, log_weight_decay=True)
        _fit(optimizer, Project(schedule=lambda opt: S.StepLR(opt, 3, 0.5)), [monitor], logger=CSVLogger(root),
             log_every_n_steps=1)
        rows = list(csv.DictReader(open(next(root.rglob("metrics.csv")))))
        return [{k: v for k, v in row.items() if k.startswith("lr-") and v} for row in rows]

    reference = logged(None, tmp_path / "torch")
    assert "lr-AdamW/pg2" in reference[0] and "lr-AdamW/pg2-momentum" in reference[0]
    for optimizer in ("adamw_8bit", "came", "lion_8bit"):
        assert logged(optimizer, tmp_path / optimizer) == reference


# ------------------------------------------------------------------ schedulers users bring


def _hf_cosine(opt):
    transformers = pytest.importorskip("transformers")
    return transformers.get_cosine_schedule_with_warmup(opt, num_warmup_steps=3, num_training_steps=16)


def _hf_linear(opt):
    transformers = pytest.importorskip("transformers")
    return transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps=3, num_training_steps=16)


SCHEDULES = {
    "hf_cosine_warmup": _hf_cosine,
    "hf_linear_warmup": _hf_linear,
    "CosineAnnealingWarmRestarts": lambda opt: S.CosineAnnealingWarmRestarts(opt, T_0=3, T_mult=2),
    "SequentialLR": lambda opt: S.SequentialLR(opt, [S.LinearLR(opt, 0.1, 1.0, total_iters=4),
                                                     S.CosineAnnealingLR(opt, T_max=12)], milestones=[4]),
    "ChainedScheduler": lambda opt: S.ChainedScheduler([S.LinearLR(opt, 0.1, 1.0, total_iters=4),
                                                        S.ExponentialLR(opt, 0.9)]),
    "ReduceLROnPlateau": lambda opt: {"scheduler": S.ReduceLROnPlateau(opt, patience=0, threshold=10.0, eps=0.0),
                                      "monitor": "train_loss", "interval": "step"},
}


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedulers_users_bring_drive_ours_as_they_drive_torch_adamw(schedule):
    """The per-group lr of every step equals torch AdamW's; with a callback lr the whole schedule is rescaled."""
    _, _, reference = _fit(None, Project(schedule=SCHEDULES[schedule]), max_epochs=2)
    for optimizer in ("adamw_4bit", "lion_8bit"):
        _, _, seen = _fit(optimizer, Project(schedule=SCHEDULES[schedule]), max_epochs=2)
        assert seen.lrs == reference.lrs
    _, _, scaled = _fit(_callback("came", lr=1e-3), Project(schedule=SCHEDULES[schedule]), max_epochs=2)
    assert scaled.lrs == [pytest.approx((a / 3, b / 3), rel=1e-9) for a, b in reference.lrs]


@pytest.mark.parametrize("optimizer", ["adamw_4bit", "lion_8bit", "ademamix_8bit", "came", "muon"])
def test_one_cycle_cycles_the_new_optimizers_momentum_as_torch_adamw_betas(optimizer):
    schedule = lambda opt: S.OneCycleLR(opt, max_lr=[3e-3, 1.5e-3], total_steps=16)  # noqa: E731
    _, _, reference = _fit(None, Project(schedule=schedule))
    _, _, seen = _fit(optimizer, Project(schedule=schedule))
    assert seen.lrs == reference.lrs and seen.beta1 == reference.beta1
    assert min(seen.beta1) == pytest.approx(0.85, abs=1e-3) and seen.beta1[0] == pytest.approx(0.95, abs=1e-3)


def test_hf_groups_with_a_callback_lr_resume_on_the_same_schedule(tmp_path):
    """Decay / no-decay groups at lr and lr/2 under an HF warmup-cosine schedule, rebased to the callback's lr:
    the ratio is kept, and a run stopped after epoch 1 and resumed ends as the uninterrupted one."""
    def run(root, stop=None, ckpt_path=None):
        callbacks = [ModelCheckpoint(dirpath=root, save_last=True)] + ([StopAfter(stop)] if stop else [])
        return _fit(_callback("adamw_8bit", lr=1e-3), Project(schedule=_hf_cosine), callbacks, root, ckpt_path,
                    max_epochs=2, enable_checkpointing=True)

    _, whole, seen = run(tmp_path / "a")
    assert max(seen.lrs) == (1e-3, 5e-4)
    _, _, first = run(tmp_path / "b", stop=1)
    _, resumed, second = run(tmp_path / "b", ckpt_path="last")
    assert first.lrs + second.lrs == seen.lrs and _max_diff(whole, resumed) == 0.0


# ------------------------------------------------------------------ compile, validate/test first


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_submodule_and_validate_test_before_fit(backend):
    """validate/test before fit build no optimizer and leave the module's configure_optimizers alone; the fit
    after them swaps and trains a module whose body is torch.compile'd (its params renamed body._orig_mod.*), as
    torch AdamW trains it uncompiled. The default suite traces with dynamo only (inductor compiles for ~10 s)."""
    torch._dynamo.reset()
    module = Project()
    module.body = torch.compile(module.body, backend=backend)
    trainer = _trainer("adamw_8bit", [seen := Seen()], max_epochs=2)
    before = trainer.validate(module, verbose=False)[0]["val_loss"]
    trainer.test(module, verbose=False)
    assert not trainer.optimizers and "configure_optimizers" not in module.__dict__
    trainer.fit(module)
    assert type(trainer.optimizers[0]).__name__ == "AdamW8bit"
    assert trainer.validate(module, verbose=False)[0]["val_loss"] < before
    _, _, reference = _fit(None, max_epochs=2)
    assert seen.losses == pytest.approx(reference.losses, abs=5e-3)


def test_muon_keeps_a_compiled_head_out_of_the_muon_update():
    from lowmem_lightning.optim.muon import uses_muon

    matrix = torch.zeros(4, 4)
    assert not uses_muon(matrix, "lm_head._orig_mod.weight")
    assert not uses_muon(matrix, "net._orig_mod.lm_head.weight")
    assert uses_muon(matrix, "blocks.0._orig_mod.fc.weight")


# ------------------------------------------------------------------ refusals for an optimizer without an lr


@pytest.mark.parametrize("tool", ["lr_find", "swa", "lr_monitor"])
def test_an_optimizer_computing_its_own_step_size_refuses_lightning_lr_tools(tmp_path, tool):
    """adafactor with relative_step and no lr: lr_find swept an lr it ignores, SWALR failed with a TypeError on
    None, LearningRateMonitor with 'Could not infer dtype of NoneType'; now one message before any step."""
    callback = _callback("adafactor")
    names = {"lr_find": "LearningRateFinder", "swa": "StochasticWeightAveraging", "lr_monitor": "LearningRateMonitor"}
    extra = {"swa": [StochasticWeightAveraging(swa_lrs=1e-3)], "lr_monitor": [LearningRateMonitor()]}.get(tool, [])
    trainer = _trainer(callback, extra, root=tmp_path, max_epochs=2, logger=CSVLogger(tmp_path))
    pattern = (r"optimizer='adafactor'\) computes its own step size.*" + names[tool]
               + r".*optimizer_kwargs=\{'relative_step': False\}.*remove " + names[tool])
    with pytest.raises(ValueError, match=pattern):
        Tuner(trainer).lr_find(Project(), num_training=5) if tool == "lr_find" else trainer.fit(Project())
    assert not any(isinstance(c, LearningRateFinder) for c in trainer.callbacks)


# ------------------------------------------------------------------ CausalLMModule


def _causal_lm():
    from lowmem_lightning.data import TextDataModule
    from lowmem_lightning.modules import CausalLMModule

    config = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 2}
    module = CausalLMModule(config=config, optimizer="adamw_4bit", lr=3e-3)
    return module, TextDataModule("sample", seq_len=32, batch_size=4, val_fraction=0.02, seed=0)


def test_causal_lm_module_gives_swa_its_model(tmp_path, monkeypatch):
    """CausalLMModule builds its model in configure_model, after SWA copied the module in setup: the average held
    no weights, averaged nothing and transferred nothing (the fit ended on its last weights, silently). The copy is
    made on SWA's device (its default, the CPU)."""
    from lowmem_lightning.modules import causal_lm

    module, data = _causal_lm()
    swa = StochasticWeightAveraging(swa_lrs=1e-3, swa_epoch_start=1)
    devices = []
    copy_on = causal_lm._copy_on
    monkeypatch.setattr(causal_lm, "_copy_on", lambda model, device: devices.append(device) or copy_on(model, device))
    trainer = _trainer(None, [swa], root=tmp_path, max_epochs=3, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(module, data)
    assert devices == [torch.device("cpu")]
    average = list(swa._average_model.parameters())
    assert int(swa.n_averaged) == 3 and len(average) == len(list(module.parameters())) > 0
    assert all(torch.equal(a, b) for a, b in zip(module.parameters(), average))


def test_swas_copy_of_the_model_is_made_on_swas_device():
    """SWA keeps its average on the CPU by default and moves it there at its first epoch: the copy of a model built
    on the GPU, made there, held a second model (a QLoRA's NF4 base) on the GPU until then. Each tensor is now made on
    SWA's device directly (here the meta device stands for it: the copy holds no tensor on the model's own device),
    tied weights stay tied, and a copy on the same device equals the model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowmem_lightning.modules.causal_lm import _copy_on
    from lowmem_lightning.quant import quantize_model

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, tie_word_embeddings=True)
    model = quantize_model(LlamaForCausalLM(config))
    away = _copy_on(model, "meta")
    tensors = [*away.parameters(), *away.buffers()]
    assert tensors and all(t.device.type == "meta" for t in tensors)
    assert away.lm_head.weight is away.model.embed_tokens.weight
    assert [n for n, p in away.named_parameters() if p.requires_grad] == [
        n for n, p in model.named_parameters() if p.requires_grad]
    here = _copy_on(model, "cpu")
    assert all(torch.equal(a, b) and a.data_ptr() != b.data_ptr()
               for a, b in zip([*here.parameters(), *here.buffers()], [*model.parameters(), *model.buffers()]))


def test_causal_lm_module_gives_model_pruning_its_layers(tmp_path):
    """ModelPruning collects its layers in setup, before configure_model: it found none and failed at its first
    pruning (torch.cat of an empty list); now it prunes every linear layer of the model."""
    module, data = _causal_lm()
    pruning = ModelPruning("l1_unstructured", amount=0.3)
    trainer = _trainer(None, [pruning], root=tmp_path, max_epochs=2, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, data)
    weight = module.model.model.layers[0].mlp.up_proj.weight
    assert len(pruning._parameters_to_prune) > 4 and float((weight == 0).float().mean()) > 0.2


def test_causal_lm_module_lr_find_and_scale_batch_size_then_fit(tmp_path):
    """LowMemModule's ``lr`` is the attribute lr_find updates, TextDataModule's ``batch_size`` the one
    scale_batch_size does: both tuners run on our optimizer and the fit after them uses what they found."""
    module, data = _causal_lm()
    trainer = _trainer(None, root=tmp_path, max_steps=2, limit_val_batches=1)
    finder = Tuner(trainer).lr_find(module, data, min_lr=1e-5, max_lr=1.0, num_training=20)
    size = Tuner(trainer).scale_batch_size(module, data, steps_per_trial=1, max_trials=2)
    trainer.fit(module, data)
    assert module.lr == finder.suggestion() and size == data.batch_size == 4  # 2 -> 4 (max_trials=2)
    assert trainer.optimizers[0].param_groups[0]["lr"] == module.lr and trainer.global_step == 2


def test_lr_find_field_benchmark_runs_and_8bit_adamw_matches_torch(capsys):
    """benchmarks/lr_find_field.py (the RESULTS figures) on one seed: adamw_8bit's suggestion is torch AdamW's."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "lr_find_field.py"
    spec = importlib.util.spec_from_file_location("bench_lr_find_field", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = dict(bench.main(["--seeds", "1", "--steps", "40", "--rows", "torch", "adamw_8bit"]))
    assert results["adamw_8bit"] == results["torch"] and results["torch"][0] > 0
    assert "/ torch AdamW" in capsys.readouterr().out
