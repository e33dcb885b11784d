"""LowMemOptimizerCallback: optimizer swap, param groups, schedulers, logging, summary, errors."""

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lowmem_lightning.callbacks import LowMemOptimizerCallback
from lowmem_lightning.optim import optimizer_class, state_memory
from lowmem_lightning.optim import registry as optim_registry

OPT = "adamw_8bit"  # the optimizer the tests swap in


def _data(n=48, batch_size=8):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 6, generator=g)
    y = torch.tanh(x[:, :2].sum(1, keepdim=True))
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


class Plain(L.LightningModule):
    """An ordinary LightningModule: SGD + a per-step StepLR, one frozen layer, a LayerNorm."""

    def __init__(self, configure="steplr"):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 32), nn.LayerNorm(32), nn.ReLU())
        self.head = nn.Linear(32, 1)
        self.frozen = nn.Linear(6, 6)
        self.frozen.requires_grad_(False)
        self.configure = configure

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.head(self.body(x + 0 * self.frozen(x))), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        if self.configure == "none":
            return None
        if self.configure == "groups":
            return torch.optim.AdamW(
                [
                    {"params": self.body.parameters(), "lr": 1e-2, "weight_decay": 0.1, "betas": (0.8, 0.99)},
                    {"params": self.head.parameters(), "lr": 1e-3, "weight_decay": 0.0},
                    {"params": self.frozen.parameters()},
                ],
                lr=1e-2,
            )
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        return [opt], [{"scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5), "interval": "step"}]


class _LRs(L.Callback):
    def __init__(self):
        self.lrs = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])


def _trainer(tmp_path, callbacks, **kwargs):
    opts = dict(
        accelerator="cpu", max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks,
    )
    opts.update(kwargs)
    return L.Trainer(**opts)


def test_steplr_is_retargeted_with_the_callback_lr_as_base(tmp_path):
    lrs = _LRs()
    callback = LowMemOptimizerCallback(OPT, lr=1e-3, print_summary=False)
    model = Plain()
    trainer = _trainer(tmp_path, [callback, lrs])
    trainer.fit(model, _data())
    opt = trainer.optimizers[0]
    assert type(opt) is optimizer_class(OPT)
    assert lrs.lrs == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4, 2.5e-4])
    assert opt.param_groups[0]["lr"] == pytest.approx(1.25e-4)
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is opt
    # frozen params stay in the optimizer (they may be unfrozen later) but get no state while frozen
    frozen = {id(p) for p in model.frozen.parameters()}
    assert frozen <= {id(p) for g in opt.param_groups for p in g["params"]}
    assert len(opt.state) == 6 and not frozen & {id(p) for p in opt.state}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert state_memory(opt).num_params == trainable  # what has state or trains, not the frozen layer
    # the module got its own configure_optimizers back
    assert "configure_optimizers" not in model.__dict__
    assert isinstance(model.configure_optimizers()[0][0], torch.optim.SGD)


def test_lr_none_keeps_the_module_schedule(tmp_path):
    lrs = _LRs()
    trainer = _trainer(tmp_path, [LowMemOptimizerCallback(OPT, print_summary=False), lrs], max_steps=4)
    trainer.fit(Plain(), _data())
    assert lrs.lrs == pytest.approx([0.1, 0.1, 0.05, 0.05])


def test_param_groups_and_their_settings_are_kept(tmp_path):
    callback = LowMemOptimizerCallback(
        OPT, lr=2e-3, weight_decay=0.05, optimizer_kwargs={"eps": 1e-6}, print_summary=False
    )
    model = Plain(configure="groups")
    trainer = _trainer(tmp_path, [callback], max_steps=2)
    trainer.fit(model, _data())
    groups = trainer.optimizers[0].param_groups
    assert len(groups) == 3
    assert [g["lr"] for g in groups] == pytest.approx([2e-3, 2e-4, 2e-3])  # per-group ratios kept
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0, 0.05]  # the no-decay group stays at 0
    assert [g["eps"] for g in groups] == [1e-6] * 3
    assert tuple(groups[0]["betas"]) == (0.8, 0.99)  # chosen per group by the module: kept
    assert len(groups[2]["params"]) == 2  # all frozen: kept for a later unfreeze, no state
    assert not {id(p) for p in groups[2]["params"]} & {id(p) for p in trainer.optimizers[0].state}
    assert sum(len(g["params"]) for g in groups) == 8


def test_module_without_optimizer_gets_one(tmp_path):
    model = Plain(configure="none")
    before = model.head.weight.detach().clone()
    trainer = _trainer(tmp_path, [LowMemOptimizerCallback(OPT, lr=1e-2, print_summary=False)], max_steps=3)
    trainer.fit(model, _data())
    opt = trainer.optimizers[0]
    assert type(opt) is optimizer_class(OPT)
    assert opt.param_groups[0]["lr"] == 1e-2
    assert sum(len(g["params"]) for g in opt.param_groups) == 6
    assert not torch.equal(model.head.weight, before)


def test_lightning_demo_transformer_trains_unchanged(tmp_path, monkeypatch):
    from lightning.pytorch.demos.transformer import LightningTransformer, WikiText2

    # the demo reads ./data/wikitext-2.txt (downloading it with `requests` if absent): give it a tiny local
    # file and keep the dataset from importing `requests` (not a dependency). The module is untouched.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(WikiText2, "download", staticmethod(lambda destination: None))
    (tmp_path / "data").mkdir()
    words = [f"w{i % 37}" for i in range(900)]
    (tmp_path / "data" / "wikitext-2.txt").write_text("\n".join(" ".join(words[i:i + 15]) for i in range(0, 900, 15)))
    vocab = WikiText2(download=False).vocab_size
    model = LightningTransformer(vocab_size=vocab)
    model.model.train()
    callback = LowMemOptimizerCallback(OPT, lr=3e-3, print_summary=False)
    trainer = _trainer(tmp_path, [callback], max_steps=2, limit_train_batches=2)
    trainer.fit(model)
    opt = trainer.optimizers[0]
    assert type(opt) is optimizer_class(OPT)
    assert opt.param_groups[0]["lr"] == 3e-3
    assert state_memory(opt).total_bytes > 0
    assert callback.summary["steps"] == 2


class _Instrumented(torch.optim.SGD):
    """SGD whose state spikes to 4 KiB at its 2nd step, with a computed step size and a paged flag."""

    is_paged = True

    def __init__(self, params, lr=0.1, weight_decay=0.0):
        super().__init__(params, lr=lr, weight_decay=weight_decay)
        self.calls = 0
        self.skipped_updates = 0

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        self.calls += 1
        first = self.param_groups[0]["params"][0]
        self.state[first]["spike"] = torch.zeros(1024 if self.calls == 2 else 1)
        for group in self.param_groups:
            group["effective_lr"] = 0.5 / self.calls
        return loss


def _rows(logger):
    with open(f"{logger.log_dir}/metrics.csv") as f:
        return list(csv.DictReader(f))


def test_logs_every_step_with_log_every_n_steps_1(tmp_path):
    logger = CSVLogger(tmp_path)
    callback = LowMemOptimizerCallback(OPT, print_summary=False)
    trainer = _trainer(tmp_path, [callback], logger=logger, log_every_n_steps=1, accumulate_grad_batches=2)
    trainer.fit(Plain(), _data(n=96))
    rows = [r for r in _rows(logger) if r.get("optim/state_MiB")]
    assert [int(r["step"]) for r in rows] == list(range(6))
    expected = state_memory(trainer.optimizers[0])
    assert float(rows[-1]["optim/state_MiB"]) == pytest.approx(expected.total_bytes / 2**20)
    assert float(rows[-1]["optim/state_bytes_per_param"]) == pytest.approx(expected.bytes_per_param)
    assert all(r["train_loss"] for r in rows)  # same row as the module's own step metrics
    assert "optim/state_MiB" in trainer.progress_bar_metrics
    assert "optim/state_MiB_host" not in rows[0]  # not paged


def test_logged_value_is_the_max_since_the_last_logged_step(tmp_path, monkeypatch):
    monkeypatch.setitem(optim_registry._CLASSES, "instrumented", _Instrumented)
    logger = CSVLogger(tmp_path)
    callback = LowMemOptimizerCallback("instrumented", print_summary=False)
    trainer = _trainer(tmp_path, [callback], logger=logger, log_every_n_steps=3)
    trainer.fit(Plain(configure="none"), _data())
    rows = {int(r["step"]): r for r in _rows(logger) if r.get("optim/state_MiB")}
    assert sorted(rows) == [2, 5]  # logged after optimizer steps 3 and 6
    opt = trainer.optimizers[0]
    small = state_memory(opt).total_bytes
    assert float(rows[5]["optim/state_MiB"]) * 2**20 == pytest.approx(small)
    # the spike at step 2 (4 KiB instead of 4 bytes) is what step 3's row reports
    assert float(rows[2]["optim/state_MiB"]) * 2**20 == pytest.approx(small - 4 + 4096)
    assert float(rows[2]["optim/state_MiB_device"]) == float(rows[2]["optim/state_MiB"])
    assert float(rows[2]["optim/state_MiB_host"]) == 0.0
    assert float(rows[2]["optim/effective_lr"]) == pytest.approx(0.5 / 3)  # latest, not max
    assert float(rows[5]["optim/effective_lr"]) == pytest.approx(0.5 / 6)
    assert float(rows[5]["optim/skipped_updates"]) == 0.0


def test_summary_and_plot(tmp_path, caplog):
    pytest.importorskip("matplotlib")
    logger = CSVLogger(tmp_path)
    callback = LowMemOptimizerCallback("adamw", log_state_memory=False)
    trainer = _trainer(tmp_path, [callback], logger=logger, max_steps=3)
    trainer.fit(Plain(), _data())
    summary = callback.summary
    # torch AdamW holds exactly what the fp32-AdamW baseline counts: the baseline is right
    assert summary["state_bytes"] == state_memory(trainer.optimizers[0]).total_bytes
    assert summary["saving_MiB"] == 0.0
    assert summary["adamw_fp32_bytes_per_param"] == pytest.approx(summary["bytes_per_param"])
    assert summary["steps"] == 3
    png = tmp_path / "lightning_logs" / "version_0" / "state_memory.png"
    assert summary["plot"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "fp32 AdamW would hold" in caplog.text


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"optimizer": "adamw8"}, "optimizer"),
        ({"lr": -1e-3}, "lr"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"optimizer_kwargs": {"lr": 1.0}}, "optimizer_kwargs"),
        ({"optimizer_kwargs": "betas"}, "optimizer_kwargs"),
        ({"optimizer": "adamw", "optimizer_kwargs": {"betas": (0.9, 2.0)}}, "beta"),
        ({"optimizer": "adamw", "optimizer_kwargs": {"no_such_argument": 1}}, "no_such_argument"),
        ({"bf16_rounding": "up"}, "Invalid bf16_rounding='up'"),
        ({"optimizer": "adamw", "bf16_rounding": "nearest"}, "bf16_rounding='nearest' for optimizer='adamw'"),
        ({"bf16_rounding": "nearest", "optimizer_kwargs": {"bf16_rounding": "stochastic"}}, "give it once"),
        ({"bucket_bytes": -1, "step_in_backward": True}, "Invalid bucket_bytes=-1"),
        ({"bucket_bytes": 2.5, "step_in_backward": True}, "Invalid bucket_bytes=2.5"),
        ({"bucket_bytes": True, "step_in_backward": True}, "Invalid bucket_bytes=True"),
        ({"bucket_bytes": 0}, "bucket_bytes=0 with step_in_backward=False"),
    ],
)
def test_bad_arguments_fail_in_the_constructor(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        LowMemOptimizerCallback(**kwargs)


def test_unknown_name_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="expected one of .*adamw_8bit"):
        LowMemOptimizerCallback("lamb")  # not registered ("lion" is, since issue 29)


def test_unsupported_param_dtype_fails_before_the_first_step(tmp_path):
    model = Plain()
    before = model.head.weight.detach().clone()
    trainer = _trainer(tmp_path, [LowMemOptimizerCallback("sgd")], precision="64-true")
    with pytest.raises(ValueError, match="precision='64-true'.*torch.float64"):
        trainer.fit(model, _data())
    assert torch.equal(model.head.weight.float(), before)
    assert "configure_optimizers" not in model.__dict__


def test_callback_arguments_are_visible_to_jsonargparse():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(LowMemOptimizerCallback, "cb")
    cfg = parser.parse_args(["--cb.optimizer=sgd", "--cb.lr=0.01", '--cb.optimizer_kwargs={"momentum": 0.9}',
                             "--cb.bf16_rounding=nearest", "--cb.step_in_backward=true", "--cb.bucket_bytes=0"])
    assert (cfg.cb.optimizer, cfg.cb.lr, cfg.cb.weight_decay) == ("sgd", 0.01, None)
    assert cfg.cb.optimizer_kwargs == {"momentum": 0.9}
    assert (cfg.cb.bf16_rounding, cfg.cb.bucket_bytes) == ("nearest", 0)
    assert "Registered optimizer name" in parser.format_help() and "DDP's bucket size" in parser.format_help()
    assert parser.parse_args([]).cb.bucket_bytes is None


def test_bf16_rounding_argument_reaches_every_param_group(tmp_path):
    """``bf16_rounding`` is the callback's own argument (as lr and weight_decay are): the built optimizer's groups
    carry it, and the module's own groups cannot override it."""
    callback = LowMemOptimizerCallback(OPT, lr=1e-2, bf16_rounding="nearest", print_summary=False)
    assert callback.bf16_rounding == "nearest" and callback.optimizer_kwargs == {"bf16_rounding": "nearest"}
    trainer = _trainer(tmp_path, [callback], max_steps=2, precision="bf16-true")
    trainer.fit(Plain(configure="groups"), _data())
    assert [g["bf16_rounding"] for g in trainer.optimizers[0].param_groups] == ["nearest"] * 3
    default = _trainer(tmp_path, [LowMemOptimizerCallback(OPT, lr=1e-2, print_summary=False)], max_steps=1,
                       precision="bf16-true")
    default.fit(Plain(configure="groups"), _data())
    assert [g["bf16_rounding"] for g in default.optimizers[0].param_groups] == ["stochastic"] * 3


class _Releases(L.Callback):
    """The bucket size and the fullest bucket of each gradient release during training."""

    def __init__(self, callback):
        self.callback, self.seen = callback, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen += [(r.bucket_bytes, r.peak_bucket_bytes) for r in self.callback.releases]


@pytest.mark.parametrize("bucket_bytes, expected", [(None, 25 * 2**20), (0, 0), (600, 600)])
def test_bucket_bytes_argument_sizes_the_release_buckets(tmp_path, bucket_bytes, expected):
    """The fullest bucket: every gradient with 25 MiB buckets (this model's 4.6 KB of them), the largest tensor
    alone with 0, and with 600 bytes the tensors up to and including the one that reaches 600."""
    callback = LowMemOptimizerCallback(OPT, lr=1e-2, step_in_backward=True, bucket_bytes=bucket_bytes,
                                       print_summary=False)
    releases = _Releases(callback)
    model = Plain(configure="none")
    _trainer(tmp_path, [callback, releases], max_steps=2).fit(model, _data())
    sizes = [p.numel() * 4 for p in model.parameters() if p.requires_grad]  # fp32, backward: reverse order
    fullest = {None: sum(sizes), 0: max(sizes), 600: 33 * 4 + 32 * 4 + 32 * 4 + 32 * 4 + 32 * 6 * 4}[bucket_bytes]
    assert releases.seen and all(seen == (expected, fullest) for seen in releases.seen), releases.seen


@pytest.mark.parametrize("configure, name, lr, warned", [
    ("steplr", "adamw_8bit", None, "module's SGD lr=0.1 for AdamW8bit"),  # SGD -> adaptive
    ("groups", "sgd", None, "module's AdamW lr=0.001, 0.01 for SGD"),  # adaptive -> SGD, each group's lr
    ("steplr", "sgd", None, None),  # SGD -> SGD
    ("groups", "came", None, None),  # adaptive -> adaptive
    ("steplr", "adamw_8bit", 1e-3, None),  # the callback's own lr
])
def test_lr_kept_across_sgd_and_adaptive_is_warned_once(tmp_path, configure, name, lr, warned):
    import warnings

    callback = LowMemOptimizerCallback(name, lr=lr, print_summary=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, [callback], max_steps=1).fit(Plain(configure=configure), _data())
    found = [str(w.message) for w in caught if "learning rates differ" in str(w.message)]
    if warned is None:
        assert found == []
    else:
        assert len(found) == 1 and warned in found[0] and f"LowMemOptimizerCallback('{name}', lr=...)" in found[0]


class Unfreezes(L.LightningModule):
    """A backbone frozen when configure_optimizers runs and unfrozen at epoch 1 (as fine-tuning schedules do)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Linear(6, 16)
        self.head = nn.Linear(16, 1)
        self.backbone.requires_grad_(False)
        self.backbone_state_at_epoch_end: list[int] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.head(torch.tanh(self.backbone(x))), y)

    def on_train_epoch_start(self):
        if self.current_epoch == 1:
            self.backbone.requires_grad_(True)

    def on_train_epoch_end(self):
        opt = self.trainer.optimizers[0]
        self.backbone_state_at_epoch_end.append(sum(p in opt.state for p in self.backbone.parameters()))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _fit_unfreezing(tmp_path, callbacks):
    model = Unfreezes()
    before = model.backbone.weight.detach().clone()
    trainer = _trainer(tmp_path, callbacks, max_steps=-1, max_epochs=2)
    trainer.fit(model, _data(n=32))
    return model, before, trainer


def test_params_unfrozen_later_train_as_under_the_modules_own_optimizer(tmp_path):
    own, before, _ = _fit_unfreezing(tmp_path, [])
    same_type, _, _ = _fit_unfreezing(tmp_path, [LowMemOptimizerCallback("adamw", print_summary=False, plot=False)])
    assert not torch.equal(own.backbone.weight, before)  # the module's own AdamW trains it from epoch 1
    for a, b in zip(own.parameters(), same_type.parameters()):
        assert torch.equal(a, b)  # the swapped-in torch AdamW: the very same run
    callback = LowMemOptimizerCallback(OPT, print_summary=False, plot=False)
    ours, _, trainer = _fit_unfreezing(tmp_path, [callback])
    assert not torch.equal(ours.backbone.weight, before)  # 8-bit AdamW trains it too
    assert ours.backbone_state_at_epoch_end == [0, 2]  # no state while frozen, state once it trains
    opt = trainer.optimizers[0]
    assert state_memory(opt).num_params == sum(p.numel() for p in ours.parameters())
    assert callback.summary["num_params"] == sum(p.numel() for p in ours.parameters())


class WithBackbone(L.LightningModule):
    """Lightning's BackboneFinetuning example: a ``backbone`` frozen at fit start, unfrozen at epoch 1."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(6, 16), nn.Tanh())
        self.head = nn.Linear(16, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.head(self.backbone(x)), y)

    def configure_optimizers(self):
        return torch.optim.Adam(filter(lambda p: p.requires_grad, self.parameters()), lr=1e-2)


@pytest.mark.parametrize("name", ["adamw", OPT])
def test_backbone_finetuning_unfreezes_into_the_swapped_optimizer(tmp_path, name):
    from lightning.pytorch.callbacks import BackboneFinetuning

    def fit(callbacks):
        model = WithBackbone()
        trainer = _trainer(tmp_path, [*callbacks, BackboneFinetuning(unfreeze_backbone_at_epoch=1)],
                           max_steps=-1, max_epochs=2)
        trainer.fit(model, _data(n=32))
        return model, trainer

    before = WithBackbone().backbone[0].weight.detach().clone()
    own, _ = fit([])
    swapped, trainer = fit([LowMemOptimizerCallback(name, print_summary=False, plot=False)])
    assert not torch.equal(swapped.backbone[0].weight, before)  # the backbone trained after epoch 1
    added = trainer.optimizers[0].param_groups[1]  # BackboneFinetuning's group: the module's Adam defaults
    assert (added["lr"], added["weight_decay"]) == (1e-3, 0.0)  # lr 1e-2 / 10; Adam's decay 0, not AdamW's 0.01
    if name == "adamw":  # Adam without weight decay is AdamW without weight decay: the very same run
        for a, b in zip(own.parameters(), swapped.parameters()):
            assert torch.equal(a, b)
