"""LowMemModule: constructor validation, weight-decay param groups, warmup+cosine schedule, training."""

import math

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lowmem_lightning.modules import LowMemModule
from lowmem_lightning.modules.base import warmup_cosine_factor


class TinyRegressor(LowMemModule):
    """4 -> 16 -> 1 MLP with a LayerNorm and one frozen layer."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 1))
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss


def _loader(n=64, batch_size=8):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    y = x.sum(dim=1, keepdim=True) * 0.5
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def _trainer(tmp_path, **kwargs):
    opts = dict(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )
    opts.update(kwargs)
    return L.Trainer(**opts)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"optimizer": "adam_9bit"}, "optimizer"),
        ({"lr": -1.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"optimizer_kwargs": [0.9]}, "optimizer_kwargs"),
        ({"optimizer_kwargs": {"lr": 0.1}}, "optimizer_kwargs"),
        ({"optimizer": "adamw", "optimizer_kwargs": {"betas": (1.5, 0.9)}}, "beta"),
        ({"optimizer": "adamw", "optimizer_kwargs": {"bogus": 1}}, "bogus"),
        ({"warmup_steps": -3}, "warmup_steps"),
        ({"warmup_steps": 2.5}, "warmup_steps"),
        ({"scheduler": "linear"}, "scheduler"),
        ({"min_lr_ratio": 1.5}, "min_lr_ratio"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, argument):
    kwargs = {"optimizer": "adamw", **kwargs}
    with pytest.raises(ValueError, match=argument):
        LowMemModule(**kwargs)


def test_unknown_optimizer_lists_the_allowed_names():
    with pytest.raises(ValueError, match="adamw_8bit.*came|came.*adamw_8bit"):
        LowMemModule(optimizer="nope")


def test_param_groups_exclude_biases_norms_and_frozen_params():
    model = TinyRegressor(optimizer="adamw", weight_decay=0.1)
    groups = model.param_groups()
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    decayed = {id(p) for p in groups[0]["params"]}
    plain = {id(p) for p in groups[1]["params"]}
    assert decayed == {id(model.net[0].weight), id(model.net[3].weight)}
    assert plain == {id(model.net[0].bias), id(model.net[1].weight), id(model.net[1].bias), id(model.net[3].bias)}
    frozen = {id(p) for p in model.frozen.parameters()}
    assert not frozen & (decayed | plain)


def test_configure_optimizers_without_schedule_returns_the_named_optimizer():
    model = TinyRegressor(optimizer="adamw", lr=3e-3, weight_decay=0.05)
    opt = model.configure_optimizers()
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["lr"] for g in opt.param_groups] == [3e-3, 3e-3]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]


def test_warmup_cosine_factor_shape():
    f = warmup_cosine_factor(warmup_steps=3, total_steps=12, min_lr_ratio=0.1)
    assert [f(s) for s in range(3)] == pytest.approx([0.25, 0.5, 0.75])
    assert f(3) == pytest.approx(1.0)
    assert f(7) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(11) == pytest.approx(0.1)
    assert f(50) == pytest.approx(0.1)
    constant = warmup_cosine_factor(warmup_steps=2, total_steps=None, min_lr_ratio=0.1)
    assert [constant(s) for s in (0, 1, 2, 100)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])


class _LRRecorder(L.Callback):
    def __init__(self):
        self.lrs = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])


def test_warmup_cosine_schedule_runs_per_optimizer_step(tmp_path):
    model = TinyRegressor(optimizer="adamw", lr=1e-2, warmup_steps=2, scheduler="cosine", min_lr_ratio=0.2)
    recorder = _LRRecorder()
    # 64 samples / 8 = 8 batches, accumulate 2 -> 4 optimizer steps per epoch, 2 epochs -> 8 steps
    trainer = _trainer(tmp_path, max_epochs=2, accumulate_grad_batches=2, callbacks=[recorder])
    trainer.fit(model, _loader())
    assert trainer.global_step == 8
    expected = [1e-2 * warmup_cosine_factor(2, 8, 0.2)(s) for s in range(8)]
    assert recorder.lrs == pytest.approx(expected)
    assert recorder.lrs[-1] == pytest.approx(2e-3)


def test_cosine_without_step_limit_is_a_clear_error(tmp_path):
    model = TinyRegressor(optimizer="adamw", scheduler="cosine")
    trainer = _trainer(tmp_path, max_epochs=-1, max_steps=-1)
    with pytest.raises(ValueError, match="max_steps or max_epochs"):
        trainer.fit(model, _loader())


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit"])
def test_subclass_trains_and_frozen_params_get_no_state(tmp_path, optimizer):
    model = TinyRegressor(optimizer=optimizer, lr=1e-2, weight_decay=0.01)
    frozen_before = model.frozen.weight.detach().clone()
    x, y = next(iter(_loader(n=64, batch_size=64)))
    with torch.no_grad():
        before = nn.functional.mse_loss(model(x), y).item()
    trainer = _trainer(tmp_path, max_epochs=6)
    trainer.fit(model, _loader())
    with torch.no_grad():
        after = nn.functional.mse_loss(model(x), y).item()
    assert after < 0.5 * before
    assert torch.equal(model.frozen.weight, frozen_before)
    opt = trainer.optimizers[0]
    assert type(opt).__name__ == {"adamw": "AdamW", "adamw_8bit": "AdamW8bit"}[optimizer]
    assert all(p.requires_grad for g in opt.param_groups for p in g["params"])
    assert model.frozen.weight not in opt.state


def test_constructor_arguments_are_visible_to_jsonargparse():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(LowMemModule, "model")
    cfg = parser.parse_args(
        ["--model.optimizer=adamw", "--model.lr=0.02", "--model.scheduler=cosine", "--model.warmup_steps=5",
         "--model.optimizer_kwargs={\"betas\": [0.9, 0.95]}"]
    )
    assert cfg.model.optimizer == "adamw"
    assert cfg.model.lr == 0.02
    assert cfg.model.scheduler == "cosine"
    assert cfg.model.warmup_steps == 5
    assert cfg.model.optimizer_kwargs == {"betas": [0.9, 0.95]}
    help_text = parser.format_help()
    assert "Registered optimizer name" in help_text
    assert "min_lr_ratio" in help_text
