"""Lightning's norm clipping hands its norm to our optimizer (issue 24.2 follow-up): the step's finite check reads
no gradient, the clipped gradients and the trained params are a plain Lightning run's, bit for bit.

Gradient passes are counted with the profiler: on the CPU, torch's ``clip_grad_norm_`` runs one ``vector_norm``
per gradient (inside its ``_foreach_norm``) plus one for the total (N + 1), and the step's own finite check one
more per gradient (N).
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lowmem_lightning.callbacks import LowMemOptimizerCallback, clip_norm
from lowmem_lightning.callbacks.clip_norm import ClipNormReuse, clip_norm_reused, route_clip_norm
from lowmem_lightning.modules import LowMemModule
from lowmem_lightning.optim import build_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")

NORM_OPS = ("aten::linalg_vector_norm", "aten::_foreach_norm", "aten::norm")
STEPS = 3
CLIP = 0.05  # far below the gradients' norm: every step scales them


def _body() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 80), nn.Tanh(), nn.Linear(80, 1))  # 4 tensors, one of 5120 (8-bit state)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(12, 64, generator=g), torch.randn(12, 1, generator=g)), batch_size=4)


class _Net(LowMemModule):
    """Our module; ``inf_at``: the optimizer step at which one gradient gets an inf after backward."""

    def __init__(self, optimizer: str = "adamw_8bit", inf_at: int | None = None):
        super().__init__(optimizer=optimizer, lr=1e-2, weight_decay=0.1)
        self.body = _body()
        self.inf_at = inf_at
        self.last_grads: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return (self.body(x).float() - y).square().mean() * 10.0

    def on_after_backward(self):
        if self.trainer.global_step == self.inf_at:
            self.body[2].bias.grad.fill_(float("inf"))

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)  # runs the closure, clips, steps
        self.last_grads = [p.grad.clone() for p in self.body.parameters()]


class _PlainLightningNet(_Net):
    """The same module clipping through Lightning's own ``configure_gradient_clipping`` (norm not reused)."""

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        L.LightningModule.configure_gradient_clipping(self, optimizer, gradient_clip_val, gradient_clip_algorithm)


def _fit(module: L.LightningModule, precision="32-true", plugins=None, callbacks=(), accelerator="cpu"
         ) -> tuple[L.Trainer, int]:
    """Fit ``STEPS`` steps with norm clipping; returns the trainer and the norm kernels run during the fit."""
    trainer = L.Trainer(accelerator=accelerator, max_steps=STEPS, gradient_clip_val=CLIP, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        precision=None if plugins else precision, plugins=plugins, callbacks=list(callbacks))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:  # host-side op calls
        trainer.fit(module, _loader())
    return trainer, _gradient_reads(prof.events())


def _gradient_reads(events) -> int:
    """Norm kernels that read a tensor themselves (a CPU ``_foreach_norm`` runs one ``vector_norm`` per tensor
    inside it: those are counted, not the wrapper)."""
    norms = [e for e in events if e.name in NORM_OPS]
    return sum(1 for e in norms if not any(child.name in NORM_OPS for child in e.cpu_children))


def _assert_same_params_and_grads(a: _Net, b: _Net) -> None:
    for pa, pb in zip(a.body.parameters(), b.body.parameters()):
        assert torch.equal(pa, pb)
    assert len(a.last_grads) == len(b.last_grads) == 4
    for ga, gb in zip(a.last_grads, b.last_grads):
        assert torch.equal(ga, gb)


def _scaler_plugins(device: str = "cpu"):
    return [MixedPrecision("16-mixed", device, scaler=torch.amp.GradScaler(device, init_scale=16.0))]  # no overflow


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true", "16-mixed"])
def test_module_reuses_the_clip_norm_and_trains_as_plain_lightning(precision):
    plugins = _scaler_plugins if precision == "16-mixed" else lambda: None
    ours, plain = _Net(), _PlainLightningNet()
    trainer, ours_passes = _fit(ours, precision, plugins())
    plain_trainer, plain_passes = _fit(plain, precision, plugins())
    n = 4
    assert ours_passes == STEPS * (n + 1)  # the clipping's only: the step read no gradient for its check
    assert plain_passes == STEPS * (2 * n + 1)
    _assert_same_params_and_grads(ours, plain)
    assert trainer.optimizers[0].skipped_updates == plain_trainer.optimizers[0].skipped_updates == 0
    assert "clip_grad_by_norm" not in vars(trainer.precision_plugin)  # routed only during each clipping call
    if precision == "16-mixed":
        assert trainer.precision_plugin.scaler is not None


def test_non_finite_gradient_under_clipping_skips_the_whole_step_and_counts_it():
    module = _Net(inf_at=1)
    seen = []

    class _Watch(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append([p.detach().clone() for p in pl_module.body.parameters()])

    trainer, _ = _fit(module, callbacks=[_Watch()])
    assert trainer.optimizers[0].skipped_updates == 4  # every tensor of step 1, though only one had an inf
    assert all(torch.equal(a, b) for a, b in zip(seen[0], seen[1]))  # nothing moved at step 1
    assert not all(torch.equal(a, b) for a, b in zip(seen[1], seen[2]))  # step 2 applied
    assert all(torch.isfinite(p).all() for p in module.body.parameters())


def test_grad_scaler_skip_leaves_no_stale_norm_and_matches_plain_lightning():
    ours, plain = _Net(inf_at=1), _PlainLightningNet(inf_at=1)
    trainer, _ = _fit(ours, plugins=_scaler_plugins())
    plain_trainer, _ = _fit(plain, plugins=_scaler_plugins())
    assert trainer.precision_plugin.scaler.get_scale() == 8.0  # the scaler saw the inf and skipped step 1
    _assert_same_params_and_grads(ours, plain)
    assert trainer.optimizers[0].skipped_updates == 0  # the scaler skipped it, not our check


def test_zero_grad_drops_a_norm_no_step_consumed():
    """A norm left by a step the scaler skipped must not vouch for the next gradients, even when they are the
    same tensor at the same version (a freed gradient's address reused): ``zero_grad`` drops it."""
    param = nn.Parameter(torch.ones(8))
    opt = build_optimizer("adamw_8bit", [param], lr=0.1)
    grad = torch.full((8,), 0.5)
    param.grad = grad
    opt.use_grad_norm(float("inf"))  # the step that would have used it never runs
    opt.zero_grad()
    param.grad = grad  # same identity, same version as when the norm was handed over
    opt.step()
    assert opt.skipped_updates == 0 and not torch.equal(param.detach(), torch.ones(8))


def test_a_plain_torch_optimizer_keeps_lightnings_path(monkeypatch):
    calls = []
    stock = Precision.clip_grad_by_norm

    def spy(self, optimizer, clip_val):
        calls.append(type(optimizer).__name__)
        return stock(self, optimizer, clip_val)

    monkeypatch.setattr(Precision, "clip_grad_by_norm", spy)
    ours, plain = _Net("adamw"), _PlainLightningNet("adamw")
    _, ours_passes = _fit(ours)
    _, plain_passes = _fit(plain)
    assert calls == ["AdamW"] * (2 * STEPS)
    assert ours_passes == plain_passes == STEPS * 5
    _assert_same_params_and_grads(ours, plain)


class _UserModule(L.LightningModule):
    """An existing project's module: torch AdamW, its own clipping override (left alone by the callback)."""

    def __init__(self):
        super().__init__()
        self.body = _body()
        self.clip_calls = 0
        self.last_grads: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return (self.body(x) - y).square().mean() * 10.0

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.clip_calls += 1
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm="norm")

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        self.last_grads = [p.grad.clone() for p in self.body.parameters()]

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)


def _callback():
    return LowMemOptimizerCallback("adamw_8bit", log_state_memory=False, plot=False, print_summary=False)


def test_callback_routes_the_plugin_for_the_fit_and_restores_it(monkeypatch):
    ours = _UserModule()
    trainer, ours_passes = _fit(ours, callbacks=[_callback()])
    assert ours.clip_calls == STEPS  # the module's override ran, untouched
    assert "clip_grad_by_norm" not in vars(trainer.precision_plugin)  # restored at teardown
    monkeypatch.setattr(clip_norm, "route_clip_norm", lambda plugin: False)  # the callback without the routing
    plain = _UserModule()
    _, plain_passes = _fit(plain, callbacks=[_callback()])
    assert ours_passes == STEPS * 5 and plain_passes == STEPS * 9
    _assert_same_params_and_grads(ours, plain)


def test_only_the_stock_norm_clipping_is_routed_and_only_once():
    class OwnClipping(Precision):
        def clip_grad_by_norm(self, optimizer, clip_val):
            """A plugin's own norm clipping (as FSDP's): not ours to route."""

    assert route_clip_norm(OwnClipping()) is False
    plugin = Precision()
    with clip_norm_reused(plugin):
        routed = vars(plugin)["clip_grad_by_norm"]
        with clip_norm_reused(plugin):  # nested (the module inside the callback's fit): routed once
            assert vars(plugin)["clip_grad_by_norm"] is routed
        assert vars(plugin)["clip_grad_by_norm"] is routed
    assert "clip_grad_by_norm" not in vars(plugin)
    part = ClipNormReuse()
    part.setup(types_trainer(plugin), None, "fit")
    assert "clip_grad_by_norm" in vars(plugin)
    part.on_exception(None, None, RuntimeError())
    assert "clip_grad_by_norm" not in vars(plugin)


def types_trainer(plugin):
    """A stand-in for the Trainer: the part reads only ``precision_plugin``."""
    return type("T", (), {"precision_plugin": plugin})()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_cuda_fit_reuses_the_clip_norm_and_trains_as_plain_lightning(precision):
    """On CUDA torch's clipping reads every gradient in one ``_foreach_norm`` (+ the total's ``vector_norm``) and
    the step's own check is one more ``_foreach_norm``: 2 norm kernels per step instead of 3, same bits."""
    plugins = (lambda: _scaler_plugins("cuda")) if precision == "16-mixed" else lambda: None
    ours, plain = _Net(), _PlainLightningNet()
    trainer, ours_passes = _fit(ours, precision, plugins(), accelerator="cuda")
    plain_trainer, plain_passes = _fit(plain, precision, plugins(), accelerator="cuda")
    assert (ours_passes, plain_passes) == (STEPS * 2, STEPS * 3)
    _assert_same_params_and_grads(ours, plain)
    assert trainer.optimizers[0].skipped_updates == plain_trainer.optimizers[0].skipped_updates == 0
