"""The swapped-in optimizer under Lightning precisions, gradient clipping and accumulation."""

import math

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lowmem_lightning.callbacks import LowMemOptimizerCallback
from lowmem_lightning.optim import optimizer_class

OPT = "adamw_8bit"
CLIP = 0.05


class Net(L.LightningModule):
    """16 -> 80 -> 64 -> 1 MLP (a 5120-element weight, so 8-bit optimizers quantize its state)."""

    def __init__(self, inf_at_step: int | None = None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 80), nn.GELU(), nn.Linear(80, 64), nn.GELU(), nn.Linear(64, 1))
        self.inf_at_step = inf_at_step

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x).float(), y.float())
        if self.inf_at_step is not None and self.trainer.global_step == self.inf_at_step:
            loss = loss * float("inf")
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def _data(n=64, batch_size=8):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 16, generator=g) * 3
    return DataLoader(TensorDataset(x, x[:, :1] * 4.0), batch_size=batch_size)


class ClipProbe(L.Callback):
    """Records the grad size Lightning sees before clipping and the one the optimizer steps with."""

    def __init__(self, algorithm):
        self.algorithm = algorithm
        self.before, self.at_step = [], []

    def _size(self, params):
        grads = [p.grad.float() for p in params if p.grad is not None]
        if self.algorithm == "norm":
            return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
        return max(g.abs().max().item() for g in grads)

    def on_fit_start(self, trainer, pl_module):
        # Lightning runs forward/backward/clipping in the closure it hands to optimizer.step (or, with a
        # GradScaler, before calling step without one): measure right after it, before the update
        opt = trainer.optimizers[0]
        step = opt.step

        def measured_step(closure=None, **kwargs):
            loss = closure() if closure is not None else None
            self.at_step.append(self._size(pl_module.parameters()))
            return step(closure=None if closure is None else (lambda: loss), **kwargs)

        opt.step = measured_step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before.append(self._size(pl_module.parameters()))


def _fit(tmp_path, model, precision, algorithm):
    probe = ClipProbe(algorithm)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision=precision, max_steps=4, accumulate_grad_batches=2,
        gradient_clip_val=CLIP, gradient_clip_algorithm=algorithm, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[LowMemOptimizerCallback(OPT, lr=1e-2, print_summary=False), probe],
    )
    trainer.fit(model, _data())
    return trainer, probe


@pytest.mark.parametrize("algorithm", ["norm", "value"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
def test_precision_clipping_and_accumulation(tmp_path, precision, algorithm):
    model = Net()
    start = [p.detach().clone() for p in model.parameters()]
    trainer, probe = _fit(tmp_path, model, precision, algorithm)
    opt = trainer.optimizers[0]
    assert type(opt) is optimizer_class(OPT)
    assert trainer.global_step == 4 and len(probe.at_step) == 4  # 8 batches, 2 per step
    # clipping was needed and was applied to the grads the optimizer used
    assert max(probe.before) > 2 * CLIP
    tol = 1.02 if precision == "bf16-true" else 1.0001
    assert max(probe.at_step) <= CLIP * tol
    assert not getattr(opt, "_step_supports_amp_scaling", False)
    expected_dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    for before, param in zip(start, model.parameters()):
        assert param.dtype == expected_dtype
        assert torch.isfinite(param).all()
        assert not torch.equal(param.float(), before.float())  # bf16 params too: nothing lost to rounding
    assert all(len(s) > 0 for s in opt.state.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="16-mixed needs CUDA")
@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_16_mixed_unscales_before_clipping_and_skips_inf_steps(tmp_path, algorithm):
    model = Net(inf_at_step=2)
    snapshots = {}

    class Snap(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            snapshots[trainer.global_step] = [p.detach().clone() for p in pl_module.parameters()]

    trainer, probe = _fit_gpu(tmp_path, model, algorithm, Snap())
    opt = trainer.optimizers[0]
    assert type(opt) is optimizer_class(OPT)
    # the step with inf grads was skipped by the GradScaler: params unchanged across it
    assert all(torch.equal(a, b) for a, b in zip(snapshots[2], snapshots[3]))
    # grads were unscaled before clipping: the optimizer saw them at the clip size, not clip / scale
    finite = [s for s in probe.at_step if math.isfinite(s)]
    assert finite and max(finite) <= CLIP * 1.001 and min(finite) > 0.5 * CLIP


def _fit_gpu(tmp_path, model, algorithm, extra):
    probe = ClipProbe(algorithm)
    trainer = L.Trainer(
        accelerator="cuda", devices=1, precision="16-mixed", max_steps=5, accumulate_grad_batches=2,
        gradient_clip_val=CLIP, gradient_clip_algorithm=algorithm, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[LowMemOptimizerCallback(OPT, lr=1e-2, print_summary=False), probe, extra],
    )
    trainer.fit(model, _data(n=80))
    return trainer, probe


def test_torch_adamw_on_bf16_params_warns_that_small_updates_are_lost():
    """``--optim adamw`` (torch's AdamW) on bf16-true weights kept its moments in bf16 and rounded every update to
    nearest: on a full fine-tune at lr 2e-5 only 0.8% of the weights had moved after 5 steps (6.0% with
    ``adamw_8bit``'s stochastic rounding), and nothing said so. One LowMemWarning says it; fp32 params and this
    package's optimizers (which round stochastically) get none."""
    import warnings

    from lowmem_lightning.lowmem_warning import LowMemWarning
    from lowmem_lightning.optim.registry import build_optimizer

    bf16 = torch.nn.Parameter(torch.zeros(8, 8, dtype=torch.bfloat16))
    with pytest.warns(LowMemWarning, match=r"'adamw' \(torch.optim.AdamW\) steps 64 bfloat16 params.*2\^-9"):
        build_optimizer("adamw", [bf16], lr=2e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LowMemWarning)
        build_optimizer("adamw", [torch.nn.Parameter(torch.zeros(8, 8))], lr=2e-5)
        build_optimizer("adamw_8bit", [bf16], lr=2e-5)
        build_optimizer("adamw", [torch.nn.Parameter(torch.zeros(8, 8, dtype=torch.bfloat16), requires_grad=False),
                                  torch.nn.Parameter(torch.zeros(4))], lr=2e-5)
