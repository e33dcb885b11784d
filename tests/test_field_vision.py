"""A vision user's existing Lightning project meets lowmem-lightning (tests/vision_project.py: conv nets and a ViT,
the module's own AdamW + OneCycleLR/CosineAnnealingLR, bf16-mixed, ModelCheckpoint on val_acc), the callback added
as the README says.

Measured with the project's own fp32 torch AdamW (3 epochs, 48 steps, seed 0): best val_acc 0.785 (CNN) and 0.883
(ViT); chance is 0.25. Every registered optimizer must reach :data:`LEARNED` (the lowest seen, CAME on the ViT,
0.656; muon_8bit on the CNN 0.762).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from optim_helpers import (  # noqa: F401  (one_cpu_thread: autouse, one intra-op thread)
    bits,
    in_memory_format,
    one_cpu_thread,
    torch_muon_on_filter_matrices,
)
from vision_project import ImageClassifier, loaders

from lowmem_lightning import LowMemOptimizerCallback
from lowmem_lightning.kernels import dispatch
from lowmem_lightning.optim import available_optimizers, build_optimizer, state_memory
from lowmem_lightning.optim.muon import uses_muon

LEARNED = 0.55
"""Best val_acc every optimizer must reach (fp32 AdamW: 0.785 CNN, 0.883 ViT; chance 0.25)."""

EPOCHS = 3
STEPS = EPOCHS * 16  # 1024 training images, batch 64

CALLBACK_ARGS = {
    # the README's ways for optimizers whose lr means something else than AdamW's
    "sgd": dict(lr=0.05),
    "adafactor": dict(optimizer_kwargs={"relative_step": False, "scale_parameter": False}),  # the module's lr
    "muon": dict(optimizer_kwargs={"adjust_lr_fn": "match_rms_adamw"}),
    "muon_8bit": dict(optimizer_kwargs={"adjust_lr_fn": "match_rms_adamw"}),
}
"""How the user adds each optimizer (the others: ``LowMemOptimizerCallback(name)``, the module's lr kept)."""

CONV_SHAPES = [(66, 7, 3, 3), (8, 1, 3, 3), (24, 8, 1, 1), (12, 5, 3)]
"""A 3x3 conv of 4158 elements (8-/4-bit state, a partial block), a depthwise one, a 1x1 and a Conv1d."""


def fit(tmp_path: Path, arch: str, optimizer: str | None, *, channels_last: bool = False, **callback_args):
    """The project's fit with ``LowMemOptimizerCallback(optimizer, ...)`` added (None: the module's AdamW).
    Returns ``(best val_acc, trainer, module, checkpoint callback)``."""
    L.seed_everything(0, verbose=False)
    model = ImageClassifier(arch, channels_last=channels_last, cycle_momentum=optimizer != "adafactor")
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_acc", mode="max")
    callbacks = [checkpoint]
    if optimizer is not None:
        args = {**CALLBACK_ARGS.get(optimizer, {}), **callback_args}
        callbacks.append(LowMemOptimizerCallback(optimizer, print_summary=False, plot=False, **args))
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", max_epochs=EPOCHS, callbacks=callbacks,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(model, *loaders())
    return float(checkpoint.best_model_score), trainer, model, checkpoint


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
    """The CNN in channels_last trained with muon_8bit (conv filters on Muon, the rest on 8-bit AdamW)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fit(tmp_path_factory.mktemp("cnn"), "resnet", "muon_8bit", channels_last=True)
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------- whole fits
def test_the_channels_last_cnn_learns_with_muon_8bit_and_checkpoints_its_best(cnn_run):
    best, trainer, model, checkpoint = cnn_run
    assert best >= LEARNED
    assert trainer.global_step == STEPS
    saved = torch.load(checkpoint.best_model_path, weights_only=False)
    assert saved["callbacks"][next(k for k in saved["callbacks"] if k.startswith("ModelCheckpoint"))][
        "best_model_score"] == pytest.approx(best)
    # the checkpoint loads into the same project built in the standard memory format
    reloaded = ImageClassifier("resnet")
    reloaded.load_state_dict(saved["state_dict"])
    x = loaders()[1].dataset.tensors[0][:8]
    trained = ImageClassifier("resnet", channels_last=True)
    trained.load_state_dict(saved["state_dict"])
    assert torch.allclose(reloaded.eval()(x), trained.eval()(x), atol=1e-5)


def test_batchnorm_running_stats_update_under_the_callback(cnn_run):
    _, trainer, model, _ = cnn_run
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 3
    for norm in norms:
        assert int(norm.num_batches_tracked) == STEPS
        assert not torch.allclose(norm.running_mean, torch.zeros_like(norm.running_mean))
        assert not torch.allclose(norm.running_var, torch.ones_like(norm.running_var))
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not any(id(b) in optimized for b in model.buffers())


def test_muon_takes_the_conv_filters_and_leaves_the_rest_to_adamw(cnn_run):
    _, trainer, model, _ = cnn_run
    opt = trainer.optimizers[0]
    names = {id(p): n.removeprefix("net.") for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in opt.muon_params()) == [
        "across_width.weight", "depthwise.weight", "down.weight", "pointwise.weight", "stem.0.weight"]
    down, depthwise = model.net.down.weight, model.net.depthwise.weight
    assert down.is_contiguous(memory_format=torch.channels_last)
    # 4608 elements: 8-bit momentum; under 4096 elements fp32, as everywhere
    assert opt.state[down]["momentum_codes"].dtype == torch.int8
    assert opt.state[depthwise]["momentum_buffer"].shape == depthwise.shape
    head = opt.state[model.net.head.weight]
    assert set(head) == {"step", "exp_avg", "exp_avg_sq"}  # AdamW, fp32 under 4096 elements


def test_lowmem_estimate_of_the_project_counts_the_fits_state(cnn_run, tmp_path):
    """``lowmem estimate`` takes any LightningModule: its muon_8bit state is what the fit's optimizer holds."""
    _, trainer, model, _ = cnn_run
    (tmp_path / "recipe.yaml").write_text(
        "model:\n  class_path: vision_project.ImageClassifier\n  init_args: {arch: resnet}\n"
        "trainer:\n  precision: bf16-mixed\n  callbacks:\n"
        "    - class_path: lowmem_lightning.LowMemOptimizerCallback\n      init_args: {optimizer: muon_8bit}\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "lowmem_lightning.cli", "estimate", "-c", "recipe.yaml",
                           "--format", "json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    estimate = json.loads(proc.stdout)
    assert estimate["params"] == sum(p.numel() for p in model.parameters())
    assert estimate["optimizers"]["muon_8bit"]["state_bytes"] == state_memory(trainer.optimizers[0]).total_bytes


def test_gradient_release_trains_the_cnn_and_its_batchnorm(tmp_path):
    best, trainer, model, _ = fit(tmp_path, "resnet", "adamw_8bit", step_in_backward=True,
                                 bucket_bytes=0)
    assert best >= LEARNED
    assert all(int(m.num_batches_tracked) == STEPS for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert all(p.grad is None for p in model.parameters())
    state = trainer.optimizers[0].state  # 8-bit moments from 4096 elements, fp32 below, as without release
    assert state[model.net.down.weight]["exp_avg_codes"].dtype == torch.int8  # 4608 elements
    assert state[model.net.across_width.weight]["exp_avg"].dtype == torch.float32  # 3072 elements


TORCH_ADAMW = {"resnet": 0.785, "vit": 0.883}
"""Best val_acc of the project's own fp32 torch AdamW (no callback), the reference :data:`LEARNED` sits under."""


def test_adafactor_with_relative_step_false_keeps_the_modules_lr_and_schedule(tmp_path):
    """``LowMemOptimizerCallback("adafactor", optimizer_kwargs={"relative_step": False, ...})`` without an lr keeps
    the module's (3e-3 in both groups) under its CosineAnnealingLR, as ``lr=None`` does for every optimizer (was
    refused at construction: 'Invalid lr=None with relative_step=False')."""
    best, trainer, _, _ = fit(tmp_path, "vit", "adafactor")
    assert best >= LEARNED
    opt, scheduler = trainer.optimizers[0], trainer.lr_scheduler_configs[0].scheduler
    assert type(opt).__name__ == "Adafactor" and scheduler.optimizer is opt
    assert [group["initial_lr"] for group in opt.param_groups] == [3e-3, 3e-3]
    assert opt.param_groups[0]["lr"] == pytest.approx(scheduler.get_last_lr()[0]) and opt.param_groups[0]["lr"] < 1e-4


def test_adafactor_at_its_relative_step_under_the_modules_schedule_is_refused_with_the_fix(tmp_path):
    """Plain ``LowMemOptimizerCallback("adafactor")`` (relative step, no lr) cannot follow the ViT's cosine schedule:
    refused before any step, naming the settings the test above trains with."""
    with pytest.raises(ValueError, match=r"CosineAnnealingLR\) cannot drive it\. Keep the module's lr and schedule "
                       r"with optimizer_kwargs=\{'relative_step': False, 'scale_parameter': False\}"):
        fit(tmp_path, "vit", "adafactor", optimizer_kwargs={})
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet", "vit"])
@pytest.mark.parametrize("optimizer", [None, *available_optimizers()], ids=lambda n: n or "torch_adamw")
def test_every_optimizer_trains_the_project(tmp_path, arch, optimizer):
    best, trainer, _, _ = fit(tmp_path, arch, optimizer)
    assert best >= LEARNED, f"{optimizer} on {arch}: best val_acc {best:.3f}"
    assert trainer.global_step == STEPS
    if optimizer is None:
        assert best == pytest.approx(TORCH_ADAMW[arch], abs=0.03)


# ------------------------------------------------------------------------------- Muon on filters and tokens
def test_muon_split_of_the_vit_and_the_cnn_by_name():
    vit = dict(ImageClassifier("vit").net.named_parameters())
    muon = sorted(n for n, p in vit.items() if uses_muon(p, n))
    assert muon == ["attn.in_proj_weight", "attn.out_proj.weight", "mlp.0.weight", "mlp.2.weight"]
    # the patch embedding (a conv named embed), cls token [1, 1, D] and position embedding [1, N, D]: AdamW
    assert not any(uses_muon(vit[n], n) for n in ("patch_embed.weight", "cls_token", "pos_embed", "head.weight"))
    cnn = dict(ImageClassifier("resnet").net.named_parameters())
    assert uses_muon(cnn["down.weight"], "down.weight") and uses_muon(cnn["across_width.weight"], "x.weight")
    assert not uses_muon(cnn["down.weight"], None)  # unnamed: a filter cannot be told from a [1, N, D] token
    assert not uses_muon(cnn["pointwise.bias"], "pointwise.bias")


@pytest.mark.parametrize("name", ["muon", "muon_8bit"])
def test_muon_steps_a_filter_as_torch_muon_steps_its_flattened_matrix(name):
    """Keller Jordan's recipe: a conv filter [out, in, k, k] is the matrix [out, in * k * k]; ``muon`` equals
    ``torch.optim.Muon`` on that matrix bit for bit, in both memory formats; ``muon_8bit`` within its 8-bit
    momentum's error."""
    start, grads, flat = torch_muon_on_filter_matrices(CONV_SHAPES)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        ours = [torch.nn.Parameter(in_memory_format(p, memory_format)) for p in start]
        opt = build_optimizer(name, [(f"conv{i}.weight", p) for i, p in enumerate(ours)], lr=0.02, weight_decay=0.1)
        assert len(opt.muon_params()) == len(ours)
        for step in grads:
            for p, g in zip(ours, step):
                p.grad = in_memory_format(g, memory_format)
            opt.step()
        for p, q, p0 in zip(ours, flat, start):
            if name == "muon":
                assert torch.equal(p.detach().reshape(q.shape), q.detach())
            else:
                moved = (q.detach().reshape(p0.shape) - p0).abs().max()
                assert (p.detach().reshape(q.shape) - q.detach()).abs().max() <= 0.05 * moved


def test_use_muon_true_takes_filters_and_refuses_vectors():
    conv, bias = torch.nn.Parameter(torch.randn(8, 4, 3, 3)), torch.nn.Parameter(torch.zeros(8))
    opt = build_optimizer("muon", [{"params": [conv], "use_muon": True}], lr=0.02)
    assert opt.muon_params() == [conv]
    with pytest.raises(ValueError, match=r"use_muon=True .* shape \(8,\): Muon updates matrices"):
        build_optimizer("muon", [{"params": [bias], "use_muon": True}], lr=0.02)


# ------------------------------------------------------------------- Adafactor and CAME on 4-D conv weights
def test_adafactor_factors_conv_weights_as_transformers_does():
    transformers_optimization = pytest.importorskip("transformers.optimization")
    kwargs = dict(lr=1e-2, relative_step=False, scale_parameter=False, warmup_init=False)
    ours, opt = _trained(lambda ps: build_optimizer("adafactor", ps, **kwargs))
    theirs, ref = _trained(lambda ps: transformers_optimization.Adafactor(ps, **kwargs))
    conv = ours[0]  # 3x3: 3 row + 3 column statistics per (out, in) pair, 2/3 of the weight's elements
    assert 3 * sum(v.numel() for k, v in opt.state[conv].items() if k != "step") == 2 * conv.numel()
    for p, q in zip(ours, theirs):
        assert {k: v.shape for k, v in opt.state[p].items() if k != "step"} == {
            k: v.shape for k, v in ref.state[q].items() if k not in ("step", "RMS")}
        assert (p.detach() - q.detach()).abs().max() <= 1e-5 * q.detach().abs().max()


def test_came_factors_conv_weights_as_the_official_came_does():
    ours, opt = _trained(lambda ps: build_optimizer("came", ps, lr=1e-3))
    try:
        from came_pytorch import CAME
    except ImportError:
        CAME = _OfficialCAME
    theirs, ref = _trained(lambda ps: CAME(ps, lr=1e-3))
    for p, q in zip(ours, theirs):
        assert {k: v.shape for k, v in opt.state[p].items() if k != "step"} == {
            k: v.shape for k, v in ref.state[q].items() if k not in ("step", "RMS")}
        assert (p.detach() - q.detach()).abs().max() <= 1e-5 * q.detach().abs().max()


class _OfficialCAME(torch.optim.Optimizer):
    """The official CAME's step (came-pytorch, Luo et al. 2023) as its README's defaults run it: factored over the
    last two dims of every >= 2-D param, for when came-pytorch is not installed."""

    def __init__(self, params, lr, eps=(1e-30, 1e-16), clip_threshold=1.0, betas=(0.9, 0.999, 0.9999)):
        super().__init__(params, dict(lr=lr, eps=eps, clip_threshold=clip_threshold, betas=betas))

    @staticmethod
    def _approx(row, col):
        return (row / row.mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1) * col.unsqueeze(-2).rsqrt()

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2, beta3 = group["betas"]
            for p in group["params"]:
                grad, state, factored = p.grad, self.state[p], p.ndim >= 2
                if not state:
                    state["step"], state["exp_avg"] = 0, torch.zeros_like(p)
                    if factored:
                        for kind in ("sq", "res"):
                            state[f"exp_avg_{kind}_row"] = p.new_zeros(p.shape[:-1])
                            state[f"exp_avg_{kind}_col"] = p.new_zeros(p.shape[:-2] + p.shape[-1:])
                    else:
                        state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                update = grad**2 + group["eps"][0]
                if factored:
                    state["exp_avg_sq_row"].mul_(beta2).add_(update.mean(dim=-1), alpha=1 - beta2)
                    state["exp_avg_sq_col"].mul_(beta2).add_(update.mean(dim=-2), alpha=1 - beta2)
                    update = self._approx(state["exp_avg_sq_row"], state["exp_avg_sq_col"]).mul_(grad)
                else:
                    update = state["exp_avg_sq"].mul_(beta2).add_(update, alpha=1 - beta2).rsqrt().mul_(grad)
                rms = update.norm(2) / math.sqrt(update.numel())
                update.div_((rms / group["clip_threshold"]).clamp_(min=1.0))
                exp_avg = state["exp_avg"].mul_(beta1).add_(update, alpha=1 - beta1)
                if factored:
                    res = (update - exp_avg) ** 2 + group["eps"][1]
                    state["exp_avg_res_row"].mul_(beta3).add_(res.mean(dim=-1), alpha=1 - beta3)
                    state["exp_avg_res_col"].mul_(beta3).add_(res.mean(dim=-2), alpha=1 - beta3)
                    update = self._approx(state["exp_avg_res_row"], state["exp_avg_res_col"]).mul_(exp_avg)
                else:
                    update = exp_avg.clone()
                p.add_(update, alpha=-group["lr"])


def _trained(factory, steps: int = 20):
    """Params of :data:`CONV_SHAPES` (seed 0) after ``steps`` steps of ``factory(params)`` over seeded gradients."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in CONV_SHAPES]
    opt = factory(params)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 0.5
        opt.step()
    return params, opt


# ----------------------------------------------------------------------------------------------- channels_last
FILTERS = [(66, 7, 3, 3), (8, 1, 3, 3)]
"""channels_last filters: 4158 elements (quantized state, blocks across channels) and a depthwise one."""

OPTIMIZER_ARGS = {"sgd": dict(lr=0.1, momentum=0.9), "adafactor": dict(lr=1e-2, relative_step=False),
                  "muon": dict(lr=0.02), "muon_8bit": dict(lr=0.02)}



def _run_formats(name: str, dtype: torch.dtype, shapes=FILTERS, steps: int = 2):
    """``name`` over the same start and gradients on contiguous and channels_last params (named ``convI.weight``):
    ``[(params, optimizer)]`` for the two formats, and the start."""
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    grads = [[torch.randn(s, generator=gen).to(dtype) for s in shapes] for _ in range(steps)]
    runs = []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        params = [torch.nn.Parameter(in_memory_format(p, memory_format)) for p in start]
        opt = build_optimizer(name, [(f"conv{i}.weight", p) for i, p in enumerate(params)],
                              **OPTIMIZER_ARGS.get(name, dict(lr=1e-2)))
        for step in grads:
            for p, g in zip(params, step):
                p.grad = in_memory_format(g, memory_format)
            opt.step()
        runs.append((params, opt))
    return runs, start


def _assert_same_update(runs, start) -> None:
    """Both runs hold the same params (bit for bit, each in its own format) and state (codes included: the
    8-/4-bit blocks cover the same elements), and the params moved."""
    (dense, opt_d), (last, opt_l) = runs
    for p, q, p0 in zip(dense, last, start):
        assert q.is_contiguous(memory_format=torch.channels_last) or q.ndim != 4
        assert torch.equal(bits(p), bits(q.contiguous())) and not torch.equal(p.detach(), p0)
        assert opt_d.state[p].keys() == opt_l.state[q].keys()
        for key, value in opt_d.state[p].items():
            assert torch.equal(bits(value), bits(opt_l.state[q][key])), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", available_optimizers())
def test_channels_last_params_step_as_contiguous_ones(name, dtype):
    _assert_same_update(*_run_formats(name, dtype))


@pytest.mark.parametrize("name", available_optimizers())
def test_a_channels_last_state_dict_loads_into_a_contiguous_model(name):
    """Saved from channels_last params, loaded for contiguous ones (and back): the next step is the same."""
    (dense, opt_d), (last, opt_l) = _run_formats(name, torch.float32)[0]
    gen = torch.Generator().manual_seed(5)
    grads = [torch.randn(p.shape, generator=gen) for p in dense]
    swapped = []
    for params, saved, memory_format in ((dense, opt_l, torch.contiguous_format),
                                         (last, opt_d, torch.channels_last)):
        copies = [torch.nn.Parameter(in_memory_format(p.detach(), memory_format)) for p in params]
        opt = build_optimizer(name, [(f"conv{i}.weight", p) for i, p in enumerate(copies)],
                              **OPTIMIZER_ARGS.get(name, dict(lr=1e-2)))
        opt.load_state_dict(saved.state_dict())
        for p, g in zip(copies, grads):
            p.grad = in_memory_format(g, memory_format)
        opt.step()
        swapped.append(copies)
    for p, q in zip(*swapped):
        assert torch.equal(bits(p), bits(q.contiguous()))


TRITON_DEFAULT = ("adafactor", "came", "adamw_8bit", "muon_8bit")
"""Checked on the Triton kernels in the default run: the factored pair (whose launch read a freed copy of a
channels_last gradient) and two 8-bit block codecs; the rest under -m slow."""


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in TRITON_DEFAULT else pytest.mark.slow)
                                  for n in available_optimizers()])
def test_channels_last_on_the_triton_kernels(force_triton, name):
    factored = name in ("adafactor", "came")  # many small launches: one filter, one step (interpreter: ~1 s)
    _assert_same_update(*_run_formats(name, torch.float32, [(4, 3, 3, 5)] if factored else FILTERS,
                                      steps=1 if factored else 2))
    assert dispatch.settings().force_triton


# ----------------------------------------------------------------------------------------------- FSDP2
FSDP2_SCRIPT = '''
import json, os, sys, torch, torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from lowmem_lightning.optim import build_optimizer


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 9, 3, padding=1), nn.ReLU(), nn.Conv2d(9, 66, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(66, 4))


def run(rank, world):
    dist.init_process_group("gloo", rank=rank, world_size=world)
    sharded, plain = model(), model()
    fully_shard(sharded, mesh=init_device_mesh("cpu", (world,)))
    opts = [build_optimizer("muon", list(m.named_parameters()), lr=0.02) for m in (sharded, plain)]
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 4, (8,), generator=gen)
        for m, opt in zip((sharded, plain), opts):
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
            opt.zero_grad()
    diffs = {n: float((p.full_tensor() - q).abs().max()) for (n, p), q in zip(sharded.named_parameters(),
                                                                              plain.parameters())}
    if rank == 0:
        json.dump({"diffs": diffs, "muon": len(opts[0].muon_params())}, open("result.json", "w"))
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.multiprocessing.spawn(run, args=(2,), nprocs=2)
'''


@pytest.mark.slow
def test_muon_conv_filters_under_fsdp2_equal_one_process(tmp_path):
    """Two gloo ranks, each holding half of every filter's output channels: Newton–Schulz of the gathered
    [out, in*k*k] matrix, each rank's shard applied; the params equal one unsharded process's bit for bit."""
    from launched_scripts import run_script

    (tmp_path / "fsdp2_conv.py").write_text(FSDP2_SCRIPT)
    run_script(tmp_path / "fsdp2_conv.py", cwd=tmp_path, port=True, timeout=300)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["muon"] == 3  # two filters and the (unnamed-head) Linear
    assert result["diffs"] == dict.fromkeys(result["diffs"], 0.0)


@pytest.mark.parametrize("name", ["muon", "muon_8bit"])
def test_a_muon_checkpoint_from_before_filters_took_muon_resumes(name):
    """State saved when conv filters took the AdamW part loads: their momentum starts from the saved first moment
    (one LowMemWarning says so), the second moment is dropped, the step is kept, and training goes on."""
    from lowmem_lightning import LowMemWarning
    from lowmem_lightning.kernels.codec import dequantize_reference

    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in FILTERS]
    named = [(f"conv{i}.weight", p) for i, p in enumerate(params)]
    before = build_optimizer(name, [{"params": named, "use_muon": False}], lr=0.02)  # the old split
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        before.step()
    saved = before.state_dict()
    saved["param_groups"][0]["use_muon"] = None  # as the default group was saved
    first = [before.state[p].get("exp_avg") for p in params]
    first = [m if m is not None else dequantize_reference(before.state[p]["exp_avg_codes"],
             before.state[p]["exp_avg_absmax"])[: p.numel()].view(p.shape) for m, p in zip(first, params)]
    now = build_optimizer(name, named, lr=0.02)
    with pytest.warns(LowMemWarning, match="its momentum starts from the saved first moment"):
        now.load_state_dict(saved)
    for p, m in zip(params, first):
        state = now.state[p]
        assert float(state["step"]) == 2 and "exp_avg_sq" not in state and "exp_avg_sq_codes" not in state
        momentum = state.get("momentum_buffer")
        if momentum is None:
            momentum = dequantize_reference(state["momentum_codes"], state["momentum_absmax"])[: p.numel()]
        assert torch.allclose(momentum.reshape(p.shape), m, atol=0.02 * float(m.abs().max()))
    start = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    now.step()
    assert all(not torch.equal(p.detach(), p0) and torch.isfinite(p).all() for p, p0 in zip(params, start))


def test_unnamed_conv_filters_are_said_to_take_adamw():
    """``build_optimizer("muon", cnn.parameters())`` (no names): one warning says the filters take AdamW and how
    names give them Muon; ``named_parameters()`` is quiet about them."""
    import warnings

    from lowmem_lightning import LowMemWarning

    cnn = ImageClassifier("resnet").net
    with pytest.warns(LowMemWarning, match=r"1 2-D param\(s\) without names.*; and 5 3- to 5-D param\(s\) without "
                      r"names, which take AdamW: convolution filters take Muon only when named"):
        opt = build_optimizer("muon", cnn.parameters(), lr=0.02)
    assert len(opt.muon_params()) == 1  # the head only
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_optimizer("muon", cnn.named_parameters(), lr=0.02)
