"""LowMemOptimizerCallback(step_in_backward=True) in real Lightning fits.

The module is unchanged; for the same seed and data the weights after N steps equal a normal fit's
bit for bit (every registered optimizer, fp32 and bf16-true), with an LR schedule, clipping by value,
a NaN batch, a checkpoint and a resume; the refusals come before any step; hooks are gone after fit.
"""

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lowmem_lightning.callbacks import LowMemOptimizerCallback, StateMemoryMonitor, release_refusal

CONFIGS = [
    ("adamw_8bit", {}),
    ("paged_adamw_8bit", {}),
    ("adafactor", {"optimizer_kwargs": {"beta1": 0.9, "momentum_dtype": "int8"}, "lr": None}),
    ("adafactor", {"lr": None}),
    ("came", {}),
    ("came", {"optimizer_kwargs": {"momentum_dtype": "int8"}}),
    ("sgd", {"lr": 1e-2, "optimizer_kwargs": {"momentum": 0.9, "momentum_dtype": "int8"}}),
    ("adamw", {}),
]
IDS = [f"{name}-{i}" for i, (name, _) in enumerate(CONFIGS)]


class Net(L.LightningModule):
    """An ordinary module: AdamW with a per-step StepLR (or none), a frozen layer, a NaN batch on request."""

    def __init__(self, schedule: bool = True, nan_batch: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(24, 48), nn.LayerNorm(48), nn.GELU(), nn.Linear(48, 32))
        self.head = nn.Linear(32, 4)
        self.frozen = nn.Linear(24, 24)
        self.frozen.requires_grad_(False)
        self.schedule = schedule
        self.nan_batch = nan_batch
        self.grads_after_backward: list[int] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.head(self.body(x + 0 * self.frozen(x)))
        loss = (out.float() - y.float()).square().mean()
        if batch_idx == self.nan_batch:
            loss = loss * float("nan")
        return loss

    def on_after_backward(self):
        self.grads_after_backward.append(sum(p.grad is not None for p in self.parameters()))

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-3)
        if not self.schedule:
            return opt
        return [opt], [{"scheduler": torch.optim.lr_scheduler.StepLR(opt, 2, 0.5), "interval": "step"}]


def _data(n=48):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 24, generator=g)
    return DataLoader(TensorDataset(x, torch.tanh(x[:, :4])), batch_size=8)


def _trainer(callback, max_steps=5, **kwargs) -> L.Trainer:
    options = dict(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    options.update(kwargs)
    return L.Trainer(callbacks=[callback], **options)


def _fit(name, kwargs, release: bool, module=None, **trainer_kwargs):
    module = module or Net(schedule=kwargs.get("lr", 1.0) is not None)  # Adafactor's own step size: no schedule
    callback = LowMemOptimizerCallback(name, print_summary=False, plot=False, step_in_backward=release, **kwargs)
    trainer = _trainer(callback, **trainer_kwargs)
    trainer.fit(module, _data())
    return module, callback


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name


@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=IDS)
def test_release_fit_equals_a_normal_fit(name, kwargs):
    normal, _ = _fit(name, kwargs, release=False)
    released, callback = _fit(name, kwargs, release=True)
    _assert_same_weights(normal, released)
    assert released.grads_after_backward == [0] * 5  # no gradient alive at the end of backward
    assert normal.grads_after_backward == [8] * 5
    assert callback.releases == []  # detached at teardown
    assert not any(p.requires_grad and p.grad is not None for p in released.parameters())


@pytest.mark.parametrize("name", ["adamw_8bit", "came", "adafactor"])
def test_release_in_bf16_true_equals_a_normal_fit(name):
    kwargs = {"lr": None} if name == "adafactor" else {}
    normal, _ = _fit(name, kwargs, release=False, precision="bf16-true")
    released, _ = _fit(name, kwargs, release=True, precision="bf16-true")
    assert next(released.parameters()).dtype == torch.bfloat16
    _assert_same_weights(normal, released)


def test_release_follows_the_lr_schedule_and_metrics_are_logged():
    lrs = []

    class LRs(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    module, callback = Net(), LowMemOptimizerCallback("adamw_8bit", lr=4e-3, print_summary=False, plot=False,
                                                      step_in_backward=True)
    trainer = L.Trainer(callbacks=[callback, LRs()], max_steps=6, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, _data())
    assert lrs == pytest.approx([4e-3, 2e-3, 2e-3, 1e-3, 1e-3, 5e-4])
    assert "optim/state_MiB" in trainer.callback_metrics
    assert callback.summary is not None and callback.summary["steps"] == 6


def test_clipping_by_value_in_the_hook_equals_lightning_clipping():
    clip = dict(gradient_clip_val=0.02, gradient_clip_algorithm="value")
    normal, _ = _fit("adamw_8bit", {}, release=False, **clip)
    released, _ = _fit("adamw_8bit", {}, release=True, **clip)
    unclipped, _ = _fit("adamw_8bit", {}, release=True)
    _assert_same_weights(normal, released)
    assert not torch.equal(unclipped.head.weight, released.head.weight)  # the clip did act


def test_nan_batch_is_skipped_and_counted_like_a_normal_step():
    normal, cb_normal = _fit("adamw_8bit", {}, release=False, module=Net(nan_batch=2))
    released, cb_released = _fit("adamw_8bit", {}, release=True, module=Net(nan_batch=2))
    _assert_same_weights(normal, released)
    assert cb_released.optimizers[0].skipped_updates == cb_normal.optimizers[0].skipped_updates == 8


def test_checkpoint_and_resume_with_release_is_bit_exact(tmp_path):
    # the checkpoint closes an epoch (3 steps), so a plain DataLoader resumes exactly
    straight = Net()
    callback = LowMemOptimizerCallback("came", optimizer_kwargs={"momentum_dtype": "int8"}, print_summary=False,
                                       plot=False, step_in_backward=True)
    _trainer(callback, max_steps=-1, max_epochs=2).fit(straight, _data(24))
    callback = LowMemOptimizerCallback("came", optimizer_kwargs={"momentum_dtype": "int8"}, print_summary=False,
                                       plot=False, step_in_backward=True)
    first = _trainer(callback, max_steps=-1, max_epochs=1)
    first.fit(Net(), _data(24))
    first.save_checkpoint(tmp_path / "step3.ckpt")
    resumed = Net()
    callback = LowMemOptimizerCallback("came", optimizer_kwargs={"momentum_dtype": "int8"}, print_summary=False,
                                       plot=False, step_in_backward=True)
    _trainer(callback, max_steps=-1, max_epochs=2).fit(resumed, _data(24), ckpt_path=tmp_path / "step3.ckpt")
    _assert_same_weights(straight, resumed)
    # a checkpoint of a released run resumes in a normal run, and the other way round
    normal = Net()
    callback = LowMemOptimizerCallback("came", optimizer_kwargs={"momentum_dtype": "int8"}, print_summary=False,
                                       plot=False)
    _trainer(callback, max_steps=-1, max_epochs=2).fit(normal, _data(24), ckpt_path=tmp_path / "step3.ckpt")
    _assert_same_weights(straight, normal)


class Manual(Net):
    def __init__(self):
        super().__init__(schedule=False)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(super().training_step(batch, batch_idx))
        opt.step()


@pytest.mark.parametrize("module,trainer_kwargs,match", [
    (Net, {"accumulate_grad_batches": 2}, r"accumulate_grad_batches=2 .* set accumulate_grad_batches=1"),
    (Manual, {}, r"the module uses manual optimization .* set step_in_backward=False"),
], ids=["accumulate", "manual"])  # clipping by norm runs (two backward passes): tests/test_release_norm_clip.py
def test_refused_before_any_step(module, trainer_kwargs, match):
    model = module()
    before = [p.detach().clone() for p in model.parameters()]
    callback = LowMemOptimizerCallback("adamw_8bit", step_in_backward=True, print_summary=False, plot=False)
    with pytest.raises(ValueError, match=r"step_in_backward=True\) cannot run: " + match):
        _trainer(callback, **trainer_kwargs).fit(model, _data())
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)
    assert "configure_optimizers" not in model.__dict__  # nothing left patched


def _fake_trainer(**overrides):
    from lightning.pytorch.strategies import SingleDeviceStrategy

    trainer = dict(accumulate_grad_batches=1, gradient_clip_val=None, gradient_clip_algorithm="norm",
                   precision="bf16-mixed", strategy=SingleDeviceStrategy(torch.device("cpu")), world_size=1)
    trainer.update(overrides)
    return SimpleNamespace(**trainer)


def test_refusals_of_16_mixed_and_multi_process_strategies():
    from lightning.pytorch.strategies import DDPStrategy

    module = SimpleNamespace(automatic_optimization=True)
    assert release_refusal(_fake_trainer(), module) is None
    assert "GradScaler" in release_refusal(_fake_trainer(precision="16-mixed"), module)
    message = release_refusal(_fake_trainer(strategy=DDPStrategy(), world_size=2), module)
    assert message.startswith("strategy DDPStrategy (world size 2)") and "one device" in message


def test_step_in_backward_must_be_a_bool():
    with pytest.raises(ValueError, match=r"Invalid step_in_backward='yes': expected True or False"):
        LowMemOptimizerCallback("adamw_8bit", step_in_backward="yes")


def test_monitor_alone_logs_a_torch_optimizer_and_the_callback_logs_each_metric_once():
    seen = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            seen.append(dict(trainer.callback_metrics))

    monitor = StateMemoryMonitor(print_summary=False, plot=False)
    module = Net(schedule=False)
    trainer = L.Trainer(callbacks=[monitor, Record()], max_steps=3, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, _data())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    # torch AdamW: exp_avg + exp_avg_sq (fp32) per element and a 4-byte step per tensor
    assert monitor.summary["optimizer"] == "adamw" and monitor.summary["reporter"] == "StateMemoryMonitor"
    assert monitor.summary["state_bytes"] == 8 * trainable + 4 * 8
    assert float(seen[-1]["optim/state_MiB"]) == pytest.approx((8 * trainable + 32) / 2**20)
    with_callback = LowMemOptimizerCallback("adamw_8bit", print_summary=False, plot=False)
    assert isinstance(with_callback.monitor, StateMemoryMonitor)
    trainer = L.Trainer(callbacks=[with_callback], max_steps=2, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Net(schedule=False), _data())  # a metric logged twice in a step would raise in Lightning
    assert with_callback.summary["reporter"] == "LowMemOptimizerCallback"
    assert with_callback.summary["optimizer"] == "adamw_8bit"


class SharedBlocks(Net):
    """Two blocks sharing one Linear, each under reentrant activation checkpointing (the loss reaches the shared
    weight through two nested backward passes)."""

    def __init__(self):
        super().__init__(schedule=True)
        torch.manual_seed(0)
        self.shared = nn.Linear(32, 32)
        self.blocks = nn.ModuleList([nn.Linear(32, 32) for _ in range(2)])

    def training_step(self, batch, batch_idx):
        from torch.utils.checkpoint import checkpoint

        x, y = batch
        h = self.body(x)
        for block in self.blocks:
            h = checkpoint(lambda t, block=block: torch.tanh(block(self.shared(t))), h, use_reentrant=True)
        return (self.head(h).float() - y.float()).square().mean()


@pytest.mark.parametrize("name,kwargs", [CONFIGS[0], CONFIGS[4], CONFIGS[6]], ids=[IDS[0], IDS[4], IDS[6]])
def test_release_with_a_weight_shared_by_reentrant_checkpointed_blocks_equals_a_normal_fit(name, kwargs):
    normal, _ = _fit(name, kwargs, release=False, module=SharedBlocks())
    released, _ = _fit(name, kwargs, release=True, module=SharedBlocks())
    _assert_same_weights(normal, released)
    assert released.grads_after_backward == [0] * 5  # the held-back shared weight is updated after backward too


class UnfreezesAtEpoch1(Net):
    """The frozen layer is unfrozen at epoch 1 (a fine-tuning schedule) and trains from then on."""

    def on_train_epoch_start(self):
        if self.current_epoch == 1:
            self.frozen.requires_grad_(True)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return (self.head(self.body(torch.tanh(self.frozen(x)))).float() - y.float()).square().mean()


def test_release_trains_params_unfrozen_later_like_a_normal_fit():
    normal, _ = _fit("adamw_8bit", {}, release=False, module=UnfreezesAtEpoch1(), max_steps=-1, max_epochs=2)
    before = UnfreezesAtEpoch1().frozen.weight.detach().clone()
    released, _ = _fit("adamw_8bit", {}, release=True, module=UnfreezesAtEpoch1(), max_steps=-1, max_epochs=2)
    _assert_same_weights(normal, released)
    assert not torch.equal(released.frozen.weight, before)  # it trained once unfrozen
    assert released.grads_after_backward == [0] * 12  # and its gradients were released in backward too
