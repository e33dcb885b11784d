"""On a CUDA device: this session's changes that only a GPU exercises for real (skipped without CUDA; run by
``benchmarks/gpu_check.py --parts gpu_tests``).

* Adafactor/CAME's Triton launches read a channels_last conv's gradient through a contiguous copy the plan
  (:class:`~lowmem_lightning.kernels.factored_plan.GroupPlan` ``grads``) holds: before, the copy was freed when the
  plan was built, and CUDA's caching allocator hands a freed block to the next allocation of its size. The tests
  allocate and fill such tensors right after each plan is built, before its launches.
* ``muon_8bit`` takes a conv filter as the matrix ``[out, in * k * k]``
  (:func:`~lowmem_lightning.optim.muon.matrix_shape`) on the device's kernels, without a host sync inside ``step()``.
* :class:`~lowmem_lightning.callbacks.InterruptAtStepEnd` (in ``LowMemOptimizerCallback`` and in
  ``LowMemModule.configure_callbacks``) adds no host sync to a Lightning training step.
"""

from __future__ import annotations

import contextlib
import warnings

import lightning as L
import pytest
import torch
from optim_helpers import bits, in_memory_format, torch_muon_on_filter_matrices

from lowmem_lightning import LowMemModule, LowMemOptimizerCallback
from lowmem_lightning.callbacks import InterruptAtStepEnd
from lowmem_lightning.kernels import adafactor as adafactor_kernels
from lowmem_lightning.kernels import came as came_kernels
from lowmem_lightning.optim import build_optimizer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEVICE = "cuda"

SYNC_MESSAGE = "called a synchronizing CUDA operation"
"""What torch says (warning or error) for a host sync under ``torch.cuda.set_sync_debug_mode``."""

FILTERS = [(66, 7, 3, 3), (8, 1, 3, 3), (40, 16, 3, 3)]
"""channels_last conv filters of one launch group (3 columns): 4158 elements (8-bit momentum, a partial block),
a depthwise one (32-bit state), 5760 elements."""


@contextlib.contextmanager
def host_syncs_raise():
    """Inside: a host synchronisation with the device raises (``torch.cuda.set_sync_debug_mode("error")``)."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)



@pytest.fixture
def reuse_freed_blocks(monkeypatch):
    """Right after each Adafactor/CAME launch plan is built: tensors of its gradients' sizes allocated and filled
    with NaN, kept until the test ends (a gradient copy freed before the launches would be one of them).
    Yields the list of plans seen."""
    plans, junk = [], []

    def wrap(plan_group):
        def plan_then_allocate(params, grads, *args, **kwargs):
            plan = plan_group(params, grads, *args, **kwargs)
            plans.append(plan)
            junk.extend(torch.full(g.shape, float("nan"), dtype=g.dtype, device=g.device) for g in grads)
            return plan
        return plan_then_allocate

    for module in (adafactor_kernels, came_kernels):
        monkeypatch.setattr(module, "plan_group", wrap(module.plan_group))
    yield plans
    junk.clear()


FACTORED = {
    "adafactor": dict(lr=1e-2, relative_step=False, beta1=0.9),
    "came": dict(lr=1e-3),
}


@pytest.mark.parametrize("momentum_dtype", ["float32", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(FACTORED))
def test_factored_triton_step_on_channels_last_filters_equals_contiguous(reuse_freed_blocks, name, dtype,
                                                                        momentum_dtype):
    """Adafactor/CAME on channels_last filters (their grads channels_last too) equal the same optimizer on
    contiguous copies given the same grads, params and state bit for bit after 3 steps, with NaN-filled tensors of
    the gradient copies' sizes allocated between each plan and its launches."""
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen).to(dtype) for s in FILTERS]
    grads = [[torch.randn(s, generator=gen).to(dtype) for s in FILTERS] for _ in range(3)]
    runs = []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        params = [torch.nn.Parameter(in_memory_format(p, memory_format).to(DEVICE)) for p in start]
        opt = build_optimizer(name, [(f"conv{i}.weight", p) for i, p in enumerate(params)],
                              momentum_dtype=momentum_dtype, **FACTORED[name])
        for step in grads:
            for p, g in zip(params, step):
                p.grad = in_memory_format(g, memory_format).to(DEVICE)
            opt.step()
        runs.append((params, opt))
    # one plan per group, step and format: the Triton path ran (int8: the depthwise filter's 32-bit state is a group)
    assert len(reuse_freed_blocks) == (12 if momentum_dtype == "int8" else 6)
    (dense, opt_d), (last, opt_l) = runs
    for p, q, p0 in zip(dense, last, start):
        assert q.is_contiguous(memory_format=torch.channels_last)
        assert torch.isfinite(p).all() and not torch.equal(p.detach().cpu(), p0)
        assert torch.equal(bits(p), bits(q.contiguous()))
        assert opt_d.state[p].keys() == opt_l.state[q].keys()
        for key, value in opt_d.state[p].items():
            assert torch.equal(bits(value), bits(opt_l.state[q][key])), key


CONV_SHAPES = [(66, 7, 3, 3), (8, 1, 3, 3), (24, 8, 1, 1), (12, 5, 3)]
"""A 3x3 conv of 4158 elements (8-bit momentum, a partial block), a depthwise one, a 1x1 and a Conv1d."""


def test_muon_8bit_steps_conv_filters_as_torch_muon_steps_their_matrices_without_host_sync():
    """``muon_8bit`` on conv filters (both memory formats) within 5% of the params' movement of ``torch.optim.Muon``
    on the flattened matrices ``[out, in * k * k]`` after 4 steps (the CPU test's tolerance,
    tests/test_field_vision.py); steps after the first (which allocates the state) never synchronise with the host."""
    start, grads, flat = torch_muon_on_filter_matrices(CONV_SHAPES, device=DEVICE)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        ours = [torch.nn.Parameter(in_memory_format(p, memory_format)) for p in start]
        opt = build_optimizer("muon_8bit", [(f"conv{i}.weight", p) for i, p in enumerate(ours)], lr=0.02,
                              weight_decay=0.1)
        assert len(opt.muon_params()) == len(ours)
        for i, step in enumerate(grads):
            for p, g in zip(ours, step):
                p.grad = in_memory_format(g, memory_format)
            with host_syncs_raise() if i else contextlib.nullcontext():
                opt.step()
        for p, q, p0 in zip(ours, flat, start):
            moved = (q.detach().reshape(p0.shape) - p0).abs().max()
            assert moved > 0 and (p.detach().reshape(q.shape) - q.detach()).abs().max() <= 0.05 * moved


class HostSyncsRaiseInSteps(L.Callback):
    """From each training batch's start (after the first: it allocates the optimizer's state) to the module's
    ``on_train_batch_end`` (after every callback's): torch's sync debug mode ``warn``, its warning turned into an
    error. :attr:`guarded` counts the steps so checked."""

    def __init__(self) -> None:
        self.guarded = 0
        self._caught = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        """Host syncs raise from here (batches after the first)."""
        if batch_idx == 0:
            return
        self._caught = warnings.catch_warnings()
        self._caught.__enter__()
        warnings.filterwarnings("error", message=SYNC_MESSAGE)
        torch.cuda.set_sync_debug_mode("warn")
        self.guarded += 1

    def end(self) -> None:
        """Host syncs are allowed again."""
        if self._caught is not None:
            torch.cuda.set_sync_debug_mode(0)
            self._caught.__exit__(None, None, None)
            self._caught = None


class StepChecks:
    """The training step of both modules: a small MLP's loss; records that InterruptAtStepEnd held the step."""

    def build(self, guard: HostSyncsRaiseInSteps) -> None:
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 4))
        self.guard = guard
        self.steps_held = 0

    def training_step(self, batch, batch_idx):
        x, y = batch
        holders = [c for c in self.trainer.callbacks if isinstance(c, InterruptAtStepEnd) and c._in_step]
        self.steps_held += bool(holders)
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.guard.end()


class UserModule(StepChecks, L.LightningModule):
    """A user's own LightningModule (its AdamW swapped by the callback)."""

    def __init__(self, guard):
        super().__init__()
        self.build(guard)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class SubclassModule(StepChecks, LowMemModule):
    """A ``LowMemModule`` subclass alone (``configure_callbacks``' InterruptAtStepEnd)."""

    def __init__(self, guard):
        super().__init__(optimizer="adamw_8bit", lr=1e-3)
        self.build(guard)


@pytest.mark.parametrize("how", ["callback", "lowmem_module"])
def test_a_bf16_mixed_fit_holds_ctrl_c_in_its_steps_without_host_sync(tmp_path, how):
    """A Lightning fit in bf16-mixed on the device (adamw_8bit: LowMemOptimizerCallback on a user's module, or a
    LowMemModule subclass alone): InterruptAtStepEnd holds every step, and from a batch's start to its end (after the
    first step) nothing synchronises with the host (sync debug ``warn`` raised as an error)."""
    guard = HostSyncsRaiseInSteps()
    model = UserModule(guard) if how == "callback" else SubclassModule(guard)
    callbacks = [guard] + ([LowMemOptimizerCallback("adamw_8bit", plot=False, print_summary=False)]
                           if how == "callback" else [])
    gen = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(24, 64, generator=gen), torch.randint(0, 4, (24,), generator=gen))
    trainer = L.Trainer(accelerator=DEVICE, devices=1, precision="bf16-mixed", max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, callbacks=callbacks)
    try:
        trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=8))
    finally:
        guard.end()
    assert trainer.global_step == 3 and guard.guarded == 2 and model.steps_held == 3
    assert type(trainer.optimizers[0]).__name__ == "AdamW8bit"
