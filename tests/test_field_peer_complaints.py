"""Peers' users' complaints as requirements: each test reproduces one reported situation against our library.

The issue each test follows is named in its docstring (``owner/repo#N``); the situation is the user's (their
shapes, arguments or sequence of calls, made small), the assertion is what the user expected. Complaints that do
not apply to us (a peer's install trouble, an optimizer we do not ship) are not here; the triage is in the
task report.
"""

from __future__ import annotations

import copy
import io
import pickle

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lowmem_lightning.optim import available_optimizers, build_optimizer, optimizer_class, state_memory
from lowmem_lightning.optim.adamw_convert import fp32_adamw_state_dict

OURS = [name for name in available_optimizers() if name != "adamw"]
QUANTIZED = ["adamw_8bit", "paged_adamw_8bit", "adamw_4bit", "lion_8bit", "ademamix_8bit", "muon_8bit"]
DECOUPLED_DECAY = ["adamw_8bit", "adamw_4bit", "lion_8bit", "ademamix_8bit", "came", "sgd"]


def _kwargs(name: str) -> dict:
    """Arguments that make every optimizer take a plain lr (Adafactor's default is its relative step)."""
    return {"lr": 1e-2, "relative_step": False} if name == "adafactor" else {"lr": 1e-2}


def _param(*shape, dtype=torch.float32, seed=0) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype))


def _steps(opt, params, steps, seed=1, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * scale).to(p.dtype)
        opt.step()


def _round_trip(state_dict: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, map_location="cpu")


# ---------------------------------------------------------------------------------------------- state dicts / resume
def test_state_saved_elsewhere_loads_onto_the_params_device():
    """pytorch/ao#1021: low-bit optimizer ``load_state_dict`` failed when the saved state's device differed from the
    params'. A state dict saved, then read back with ``map_location`` (the CPU leg here; the CUDA leg is
    ``test_state_saved_on_cpu_loads_onto_cuda``) loads, keeps its quantized dtypes and continues bit for bit."""
    params = [_param(80, 64), _param(30)]
    opt = build_optimizer("adamw_8bit", params, lr=1e-2)
    _steps(opt, params, 2)
    saved = _round_trip(opt.state_dict())
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    twin = build_optimizer("adamw_8bit", twins, lr=1e-2)
    twin.load_state_dict(saved)
    assert twin.state[twins[0]]["exp_avg_codes"].dtype == torch.int8
    _steps(opt, params, 2, seed=5)
    _steps(twin, twins, 2, seed=5)
    for a, b in zip(params, twins):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_state_saved_on_cpu_loads_onto_cuda():
    """pytorch/ao#1021, the CUDA leg: a state saved from a CPU run loads into an optimizer over CUDA params; every
    state tensor lands on the param's device and the next step is finite."""
    params = [_param(80, 64)]
    opt = build_optimizer("adamw_8bit", params, lr=1e-2)
    _steps(opt, params, 2)
    cuda_params = [nn.Parameter(params[0].detach().cuda())]
    cuda_opt = build_optimizer("adamw_8bit", cuda_params, lr=1e-2)
    cuda_opt.load_state_dict(_round_trip(opt.state_dict()))
    assert {v.device.type for v in cuda_opt.state[cuda_params[0]].values()} == {"cuda"}
    cuda_params[0].grad = torch.randn_like(cuda_params[0])
    cuda_opt.step()
    assert torch.isfinite(cuda_params[0]).all()


def test_paged_load_keeps_state_in_host_pages():
    """bitsandbytes-foundation/bitsandbytes#1344 (and its review: paged optimizers should re-create paged
    buffers on load): ``load_state_dict`` moved all state to the params' device (OOM). A paged state loaded into
    ``paged_adamw_8bit`` with no device budget stays in host pages: the same host bytes as before the save, no
    resident device buffer, and the next steps match the uninterrupted run bit for bit."""
    params = [_param(80, 64), _param(4100)]
    opt = build_optimizer("paged_adamw_8bit", params, lr=1e-2, gpu_budget_bytes=0)
    _steps(opt, params, 2)
    host_bytes = state_memory(opt).host_bytes
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    twin = build_optimizer("paged_adamw_8bit", twins, lr=1e-2, gpu_budget_bytes=0)
    twin.load_state_dict(_round_trip(opt.state_dict()))
    assert state_memory(twin).host_bytes == host_bytes > 0
    assert not twin._resident
    _steps(opt, params, 2, seed=3)
    _steps(twin, twins, 2, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(params, twins))


def test_group_count_mismatch_names_both_counts():
    """kohya-ss/sd-scripts#378: "loaded state dict contains a parameter group that doesn't match the size of
    optimizer's group" and the user did not understand why. Ours names the group and both sizes."""
    a, b = _param(5000), _param(5000)
    saved = build_optimizer("adamw_8bit", [a]).state_dict()
    with pytest.raises(ValueError, match=r"param group 0 holds 1 params, this optimizer's holds 2"):
        build_optimizer("adamw_8bit", [a, b]).load_state_dict(saved)
    saved = build_optimizer("adamw_8bit", [{"params": [a]}, {"params": [b]}]).state_dict()
    with pytest.raises(ValueError, match=r"it has 2 param groups, this optimizer has 1"):
        build_optimizer("adamw_8bit", [a, b]).load_state_dict(saved)


def test_resized_embedding_state_is_refused_naming_the_shapes():
    """huggingface/peft#859: resuming the optimizer after ``resize_token_embeddings`` failed deep inside the
    optimizer. Ours refuses the mismatched state at load, naming the param, the state key and both shapes."""
    emb = _param(100, 64)
    opt = build_optimizer("adamw_8bit", [emb])
    _steps(opt, [emb], 1)
    resized = _param(104, 64)
    with pytest.raises(ValueError, match=r"param 0 state 'exp_avg_codes'.*\(6400,\).*\(6656,\).*shape \(104, 64\)"):
        build_optimizer("adamw_8bit", [resized]).load_state_dict(opt.state_dict())


def test_state_without_step_is_refused_naming_the_missing_key():
    """pytorch/torchtitan#848: resuming raised a bare ``KeyError: 'step'``. A saved state missing its step
    counter is refused at load with a ``ValueError`` that lists the keys found and the missing one."""
    w = _param(5000)
    opt = build_optimizer("adamw_8bit", [w])
    _steps(opt, [w], 1)
    saved = opt.state_dict()
    del saved["state"][0]["step"]
    with pytest.raises(ValueError, match=r"missing \['step'\]"):
        build_optimizer("adamw_8bit", [_param(5000)]).load_state_dict(saved)


def test_param_without_state_at_save_resumes():
    """NVIDIA-NeMo/Automodel#2779: a param that had received no gradient when the checkpoint was saved had no
    state, and resuming failed (missing ``step``). Ours saves and loads such a state dict; both params then
    continue exactly as in the uninterrupted run, the late one starting its state at the resume."""
    for name in ("adamw_8bit", "lion_8bit", "ademamix_8bit", "adamw_4bit"):
        live, late = _param(5000), _param(64, 80, seed=1)
        opt = build_optimizer(name, [live, late], lr=1e-2)
        _steps(opt, [live], 2)
        assert late not in opt.state
        twins = [nn.Parameter(live.detach().clone()), nn.Parameter(late.detach().clone())]
        twin = build_optimizer(name, twins, lr=1e-2)
        twin.load_state_dict(_round_trip(opt.state_dict()))
        _steps(opt, [live, late], 2, seed=4)
        _steps(twin, twins, 2, seed=4)
        assert torch.equal(live, twins[0]) and torch.equal(late, twins[1]), name


def test_state_dict_of_an_older_release_without_newer_group_keys_loads():
    """bitsandbytes-foundation/bitsandbytes#1647 (unsloth#1080): resuming a checkpoint written by an older
    release failed after an upgrade. A state dict whose groups lack keys added later (``quantize_state``,
    ``bf16_rounding``) loads, takes the defaults for them and trains on."""
    w = _param(5000)
    opt = build_optimizer("adamw_8bit", [w])
    _steps(opt, [w], 1)
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        group.pop("quantize_state")
        group.pop("bf16_rounding")
    twin = build_optimizer("adamw_8bit", [w])
    twin.load_state_dict(saved)
    assert twin.param_groups[0]["quantize_state"] is True
    assert twin.param_groups[0]["bf16_rounding"] == "stochastic"
    _steps(twin, [w], 1)
    assert torch.isfinite(w).all()


@pytest.mark.parametrize("name", ["adamw_8bit", "came", "adafactor", "lion_8bit", "muon_8bit"])
def test_state_of_bf16_params_keeps_fp32_step_and_scales_through_a_checkpoint(name):
    """vllm-project/speculators#899: optimizer state checkpointed at the model's dtype (bf16) rounded the step
    counter (10000 -> a multiple of 64) and the moments, and resumed runs drifted. With bf16 params, ours saves and
    loads every state tensor in its own dtype: fp32 step counters exact past 256, fp32 block scales and small-
    tensor moments, integer codes (torch's own ``load_state_dict`` casts floating state to the param dtype)."""
    params = [_param(80, 64, dtype=torch.bfloat16), _param(30, dtype=torch.bfloat16)]
    opt = build_optimizer(name, params, **_kwargs(name))
    _steps(opt, params, 1)
    for state in opt.state.values():
        state["step"].fill_(10001.0)
    dtypes = {i: {k: v.dtype for k, v in opt.state[p].items()} for i, p in enumerate(params)}
    twin = build_optimizer(name, params, **_kwargs(name))
    twin.load_state_dict(_round_trip(opt.state_dict()))
    assert {i: {k: v.dtype for k, v in twin.state[p].items()} for i, p in enumerate(params)} == dtypes
    assert all(twin.state[p]["step"].item() == 10001.0 for p in params)
    assert torch.bfloat16 not in {dtype for per_param in dtypes.values() for dtype in per_param.values()}


def test_quantized_state_converts_for_torch_adamw():
    """bitsandbytes-foundation/bitsandbytes#782: users resumed a paged/8-bit checkpoint with torch's AdamW by
    renaming ``state1``/``state2`` by hand. :func:`fp32_adamw_state_dict` does it: torch AdamW loads the result
    and its next steps stay close to ours (the moments are decoded from 8 bits)."""
    params = [_param(80, 64)]
    opt = build_optimizer("paged_adamw_8bit", params, lr=1e-3, weight_decay=0.0)
    _steps(opt, params, 3)
    torch_params = [nn.Parameter(params[0].detach().clone())]
    torch_opt = torch.optim.AdamW(torch_params, lr=1e-3, weight_decay=0.0)
    torch_opt.load_state_dict(fp32_adamw_state_dict(_round_trip(opt.state_dict()), torch_opt))
    assert set(torch_opt.state[torch_params[0]]) >= {"exp_avg", "exp_avg_sq", "step"}
    start = params[0].detach().clone()
    _steps(opt, params, 2, seed=6)
    _steps(torch_opt, torch_params, 2, seed=6)
    ours, theirs = params[0] - start, torch_params[0].detach() - start
    assert (ours - theirs).norm() / theirs.norm() < 0.05


@pytest.mark.parametrize("name", OURS)
def test_optimizer_built_on_meta_params_refuses_to_step(name):
    """Lightning-AI/pytorch-lightning#19067: an optimizer set up before the model's meta-device weights were
    materialized references the placeholders; ``to_empty()`` replaces the params and training silently updates
    nothing (torch's AdamW steps without a word). Ours refuses the step, naming the param and what to do; an
    optimizer built after ``to_empty()`` trains."""
    with torch.device("meta"):
        model = nn.Linear(80, 64)
    early = build_optimizer(name, model.parameters(), **_kwargs(name))
    model.to_empty(device="cpu")
    nn.init.normal_(model.weight)
    model(torch.randn(2, 80)).sum().backward()
    with pytest.raises(RuntimeError, match=r"param group 0, param 0 \(shape \(64, 80\)\) is on the meta device.*"
                                           r"build the optimizer after the model is on its device"):
        early.step()
    late = build_optimizer(name, model.parameters(), **_kwargs(name))
    before = model.weight.detach().clone()
    late.step()
    assert not torch.equal(model.weight, before)


# ---------------------------------------------------------------------------------------------- param groups / args
def test_param_group_added_after_steps_trains_with_its_own_lr():
    """pytorch/ao#2574 (fixed by pytorch/ao#2606): ``add_param_group`` on a low-bit optimizer broke it. Ours:
    a group added after two steps gets its own lr, its own quantized state and survives a state-dict round trip."""
    old, new = _param(5000), _param(5000, seed=1)
    opt = build_optimizer("adamw_8bit", [old], lr=1e-3)
    _steps(opt, [old], 2)
    opt.add_param_group({"params": [new], "lr": 1e-2})
    before = new.detach().clone()
    _steps(opt, [old, new], 1, seed=2)
    moved = (new.detach() - before).abs().mean().item()
    assert moved == pytest.approx(1e-2, rel=0.05)  # Adam's first step moves ~lr per element
    assert opt.state[new]["exp_avg_codes"].dtype == torch.int8
    twin = build_optimizer("adamw_8bit", [old], lr=1e-3)
    twin.add_param_group({"params": [new], "lr": 5e-2})
    twin.load_state_dict(opt.state_dict())
    assert [g["lr"] for g in twin.param_groups] == [1e-3, 1e-2]


def test_torch_switches_from_trainer_configs_are_accepted_when_off_and_refused_when_on():
    """meta-pytorch/torchtune#2152: torchtune passed ``fused=True`` to bitsandbytes' AdamW8bit, which does not
    take it. Ours takes torch's ``fused``/``foreach``/``capturable``/``differentiable`` when None/False and
    refuses True with a message naming the flag, in the constructor and in ``add_param_group``."""
    for name in OURS:
        build_optimizer(name, [_param(64)], **_kwargs(name), fused=None, foreach=False)
        with pytest.raises(ValueError, match=r"Invalid fused=True: accepted only as None or False"):
            build_optimizer(name, [_param(64)], **_kwargs(name), fused=True)
    opt = build_optimizer("adamw_8bit", [_param(64)])
    with pytest.raises(ValueError, match=r"Invalid foreach=True"):
        opt.add_param_group({"params": [_param(64, seed=1)], "foreach": True})
    assert len(opt.param_groups) == 1


def test_arguments_a_peer_accepts_and_ignores_are_refused():
    """bitsandbytes-foundation/bitsandbytes#1261: 8-bit Adam accepted ``optim_bits`` and ``amsgrad`` and ignored
    them. Ours does not take them: the error names the argument and lists the ones the optimizer takes."""
    for bad in ({"amsgrad": True}, {"optim_bits": 32}):
        with pytest.raises(ValueError, match=rf"{next(iter(bad))}: AdamW8bit takes lr, betas, eps, weight_decay"):
            build_optimizer("adamw_8bit", [_param(64)], **bad)


def test_tensor_lr_equals_float_lr():
    """pytorch/pytorch#163093 (and #130467): tensor learning rates, as compiled-optimizer recipes use, behaved
    differently from floats. Ours: an lr given as a 0-d tensor steps exactly as the same float."""
    for name in OURS:
        if name == "adafactor":
            continue  # Adafactor's lr is None under its default relative step; relative_step=False is below
        runs = []
        for lr in (1e-2, torch.tensor(1e-2)):
            params = [_param(40, 130)]
            _steps(build_optimizer(name, params, lr=lr), params, 2)
            runs.append(params[0].detach())
        assert torch.equal(*runs), name
    runs = []
    for lr in (1e-2, torch.tensor(1e-2)):
        params = [_param(40, 130)]
        _steps(build_optimizer("adafactor", params, lr=lr, relative_step=False), params, 2)
        runs.append(params[0].detach())
    assert torch.equal(*runs)


def test_came_takes_its_paper_arguments_as_yaml_lists():
    """67372a/LoRA_Easy_Training_Scripts#61: CAME's ``eps=(1e-30, 1e-16)`` (official signature) was reported as
    an unrecognized argument. Ours takes the official ``eps``/``betas``/``weight_decay`` (as tuples or as the lists
    YAML gives) and refuses a wrong-length eps naming it."""
    w = _param(40, 130)
    opt = build_optimizer("came", [w], lr=2e-4, weight_decay=1e-2, eps=[1e-30, 1e-16], betas=[0.9, 0.999, 0.9999])
    _steps(opt, [w], 2)
    assert tuple(opt.param_groups[0]["eps"]) == (1e-30, 1e-16)
    assert torch.isfinite(w).all()
    with pytest.raises(ValueError, match=r"eps"):
        build_optimizer("came", [w], lr=2e-4, eps=1e-16)


# ---------------------------------------------------------------------------------------------- Adafactor rules
def test_adafactor_without_lr_uses_its_relative_step():
    """huggingface/transformers#11612: ``Adafactor(..., relative_step=True, warmup_init=True)`` without an lr (the
    documented recipe) raised ``TypeError: unsupported operand type(s) for *: 'NoneType' and 'float'``. Ours
    trains, and the step size it reports is the warm-up rule ``min(1e-6 t, 1/sqrt(t))``."""
    w = _param(40, 130)
    opt = build_optimizer("adafactor", [w], scale_parameter=False, relative_step=True, warmup_init=True)
    before = w.detach().clone()
    _steps(opt, [w], 3)
    assert not torch.equal(w, before)
    assert opt.effective_lr() == [pytest.approx(3e-6)]


def test_adafactor_recommended_t5_settings_get_an_error_that_says_what_to_do():
    """huggingface/transformers#7789: the documented T5 setting ``lr=1e-3, relative_step=False, warmup_init=True``
    raised "warmup_init requires relative_step=True" with no way forward. Ours keeps transformers' words (code
    matches them) and adds the values given and the settings that work."""
    w = _param(64)
    with pytest.raises(ValueError, match=r"`warmup_init=True` requires `relative_step=True` \(got warmup_init=True, "
                                         r"relative_step=False, lr=0.001\): .*warmup_init=False.*LR scheduler"):
        build_optimizer("adafactor", [w], lr=1e-3, relative_step=False, warmup_init=True)
    with pytest.raises(ValueError, match=r"Cannot combine manual `lr` and `relative_step=True` options \(got "
                                         r"lr=0.001, relative_step=True\): pass lr=None .* or relative_step=False"):
        build_optimizer("adafactor", [w], lr=1e-3)


def test_adafactor_with_an_lr_follows_an_lr_scheduler():
    """kohya-ss/sd-scripts#342: Adafactor with an LR scheduler raised ``KeyError: 'step'`` at the first
    ``lr_scheduler.step()``. Ours with ``relative_step=False``: a scheduler drives ``group["lr"]`` from the
    first step, and with ``scale_parameter=False`` the step size applied is that lr."""
    w = _param(40, 130)
    opt = build_optimizer("adafactor", [w], lr=1e-2, relative_step=False, scale_parameter=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    for _ in range(3):
        _steps(opt, [w], 1)
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 8)
    assert opt.effective_lr() == [pytest.approx(1e-2 / 4)]  # the lr of the last step taken


class _RelativeStepAdafactorProject(L.LightningModule):
    """A user's project: our Adafactor at its defaults (relative step, no lr) under a cosine schedule."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(16, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        opt = optimizer_class("adafactor")(self.parameters())
        return [opt], [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)]


def test_relative_step_adafactor_under_an_lr_scheduler_says_why_before_updating(tmp_path):
    """transformers' ``Adafactor(lr=None)`` under a torch LR scheduler fails inside the scheduler with ``TypeError:
    unsupported operand type(s) for -: 'NoneType' and 'float'`` (its answer is a special ``AdafactorSchedule``).
    Ours: the first ``step()`` refuses, naming the group and the settings that let a scheduler drive the lr, before
    any group is updated (the second group holds the scheduler's mark, the first is left as it was); in a
    Lightning project the fit stops with that message."""
    w, v = _param(40, 130), _param(64, seed=1)
    opt = build_optimizer("adafactor", [{"params": [w]}, {"params": [v]}])
    opt.param_groups[1]["initial_lr"] = None  # what LRScheduler.__init__ records
    before = w.detach().clone()
    with pytest.raises(ValueError, match=r"LR scheduler on Adafactor param group 1: lr=None \(relative_step=True.*"
                                         r"lr=1e-3, relative_step=False, scale_parameter=False.*or use no LR"):
        _steps(opt, [w, v], 1)
    assert torch.equal(w, before)

    x = torch.randn(8, 16)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"LR scheduler on Adafactor param group 0: lr=None"):
        trainer.fit(_RelativeStepAdafactorProject(), DataLoader(TensorDataset(x, x[:, :1]), batch_size=4))


# ---------------------------------------------------------------------------------------------- AdEMAMix
def test_ademamix_zero_warmup_is_refused_and_a_scheduled_state_round_trips():
    """bitsandbytes-foundation/bitsandbytes#1861 (fixes #1382): ``t_alpha=0`` / ``t_beta3=0`` divided by zero, and
    resumed AdEMAMix runs went NaN. Ours refuses 0 naming the argument; a state saved mid-warm-up resumes bit for
    bit and finite."""
    with pytest.raises(ValueError, match=r"Invalid t_alpha=0: expected None \(no warmup\) or an int > 0"):
        build_optimizer("ademamix_8bit", [_param(64)], t_alpha=0)
    for name in ("ademamix", "ademamix_8bit"):
        params = [_param(5000)]
        opt = build_optimizer(name, params, lr=1e-2, t_alpha=10, t_beta3=10)
        _steps(opt, params, 3)
        twins = [nn.Parameter(params[0].detach().clone())]
        twin = build_optimizer(name, twins, lr=1e-2, t_alpha=10, t_beta3=10)
        twin.load_state_dict(_round_trip(opt.state_dict()))
        _steps(opt, params, 3, seed=7)
        _steps(twin, twins, 3, seed=7)
        assert torch.equal(params[0], twins[0]) and torch.isfinite(twins[0]).all(), name


def test_ademamix_warmup_applies_in_32_and_8_bit():
    """bitsandbytes-foundation/bitsandbytes#2075: AdEMAMix32bit silently ran without its ``t_alpha``/``t_beta3``
    scheduler. Ours applies it in both forms: the first step with ``t_alpha=100`` is the unscheduled step with
    ``alpha / 100`` (the warm-up's first value), not the step with the full ``alpha``. A fast slow-EMA
    (``beta3=0.9``) makes the slow term large enough to see after one step."""
    for name in ("ademamix", "ademamix_8bit"):
        runs = {}
        for label, kwargs in (("scheduled", dict(alpha=5.0, t_alpha=100)), ("warm", dict(alpha=0.05)),
                              ("full", dict(alpha=5.0))):
            params = [_param(5000)]
            opt = build_optimizer(name, params, lr=1e-2, betas=(0.9, 0.999, 0.9), weight_decay=0.0, **kwargs)
            start = params[0].detach().clone()
            _steps(opt, params, 1)
            runs[label] = params[0].detach() - start
        torch.testing.assert_close(runs["scheduled"], runs["warm"], rtol=1e-5, atol=1e-7, msg=name)
        assert (runs["scheduled"] - runs["full"]).abs().max() > 1e-3, name


# ---------------------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("name", OURS)
def test_non_contiguous_params_and_grads_update_as_contiguous_ones(name):
    """bitsandbytes-foundation/bitsandbytes#1185 (fixed by #1187): non-contiguous params/gradients (from
    ``torch.chunk``, ``all_gather``, transposes) got a wrong update because the kernels assumed row-major input.
    Ours: a transposed param with a transposed gradient ends bit-identical to its contiguous copy."""
    w0, g0 = torch.randn(131, 97), torch.randn(131, 97)
    strided = nn.Parameter(w0.clone().t())
    dense = nn.Parameter(w0.t().contiguous())
    assert not strided.is_contiguous()
    opts = [build_optimizer(name, [p], **_kwargs(name)) for p in (strided, dense)]
    for _ in range(2):
        strided.grad, dense.grad = g0.clone().t(), g0.t().contiguous()
        for opt in opts:
            opt.step()
    assert torch.equal(strided.detach(), dense.detach())


def test_non_contiguous_param_through_the_triton_kernel(force_triton):
    """bitsandbytes-foundation/bitsandbytes#1185, on the Triton kernel (interpreted here): the same transposed
    param and gradient as above, through the 8-bit AdamW launcher, match the contiguous copy bit for bit."""
    w0, g0 = torch.randn(67, 61), torch.randn(67, 61)
    strided, dense = nn.Parameter(w0.clone().t()), nn.Parameter(w0.t().contiguous())
    opts = [build_optimizer("adamw_8bit", [p], lr=1e-2) for p in (strided, dense)]
    strided.grad, dense.grad = g0.clone().t(), g0.t().contiguous()
    for opt in opts:
        opt.step()
    assert torch.equal(strided.detach(), dense.detach())


def test_param_that_is_a_slice_of_a_larger_buffer_writes_into_it():
    """meta-pytorch/torchtune#1978: torchao's AdamW8bit failed on sharded/sliced params ("Mutations on
    non-contiguous inputs", uneven 1601-row shards). Ours: params that are views into one flat buffer (as FSDP1 /
    ZeRO flat buffers are), one with an odd row count, are updated in place in that buffer and match
    independent copies bit for bit; the bytes between them are untouched."""
    flat = torch.randn(1601 * 8 + 3 + 64 * 80)
    sharded = nn.Parameter(flat[: 1601 * 8].view(1601, 8))
    other = nn.Parameter(flat[1601 * 8 + 3:].view(64, 80))
    gap = flat[1601 * 8: 1601 * 8 + 3].clone()
    copies = [nn.Parameter(sharded.detach().clone()), nn.Parameter(other.detach().clone())]
    opt, ref = build_optimizer("adamw_8bit", [sharded, other]), build_optimizer("adamw_8bit", copies)
    _steps(opt, [sharded, other], 2)
    _steps(ref, copies, 2)
    assert sharded.data_ptr() == flat.data_ptr()
    assert torch.equal(flat[: 1601 * 8].view(1601, 8), copies[0].detach())
    assert torch.equal(flat[1601 * 8 + 3:].view(64, 80), copies[1].detach())
    assert torch.equal(flat[1601 * 8: 1601 * 8 + 3], gap)


@pytest.mark.parametrize("name", ["adamw_8bit", "lion_8bit", "ademamix_8bit", "adamw_4bit"])
def test_fp16_params_with_tiny_and_zero_gradients_stay_finite(name):
    """kohya-ss/sd-scripts#523 (and bitsandbytes-foundation/bitsandbytes#152): 8-bit AdamW on fp16 went to NaN
    loss. Ours on fp16 params, 60 steps of gradients around 1e-6 with one all-zero block (an absmax of 0):
    params stay finite and the zero block's params only decay."""
    w = nn.Parameter((torch.randn(8192) * 0.02).half())
    opt = build_optimizer(name, [w], lr=1e-4, weight_decay=0.0)
    zero_block = w.detach()[:256].clone()
    gen = torch.Generator().manual_seed(3)
    for _ in range(60):
        g = torch.randn(8192, generator=gen) * 1e-6
        g[:256] = 0.0
        w.grad = g.half()
        opt.step()
    assert torch.isfinite(w).all()
    assert torch.equal(w.detach()[:256], zero_block)
    assert all(torch.isfinite(v).all() for v in opt.state[w].values() if v.is_floating_point())


@pytest.mark.parametrize("name", DECOUPLED_DECAY)
def test_weight_decay_on_bf16_params_is_not_lost(name):
    """Nerogar/OneTrainer#996: with bf16 params, AdamW's weight decay (lr * wd = 1e-5 per step, far below bf16's
    resolution of 2^-8 near 1.0) was never applied. Ours does the decay in fp32 and rounds stochastically: after
    200 steps the mean weight has decayed by 200 * 1e-5 within the rounding noise; nearest rounding (asked
    for) keeps 1.0, which shows what stochastic rounding buys."""
    results = {}
    for rounding in ("stochastic", "nearest"):
        w = nn.Parameter(torch.ones(8192, dtype=torch.bfloat16))
        opt = build_optimizer(name, [w], lr=1e-3, weight_decay=0.01, bf16_rounding=rounding)
        for _ in range(200):
            w.grad = torch.zeros(8192, dtype=torch.bfloat16)
            opt.step()
        results[rounding] = w.float().mean().item()
    assert results["stochastic"] == pytest.approx(1 - 200 * 1e-5, abs=3e-4)
    assert results["nearest"] == 1.0


def test_small_bf16_updates_of_8bit_adamw_accumulate_like_fp32():
    """bitsandbytes-foundation/bitsandbytes#1165: 8-bit optimizers lost bf16 updates smaller than the weight's
    resolution (no stochastic rounding). Ours on bf16 weights of 1.0 with lr 1e-4 (each step ~1e-4, 1/80 of a
    bf16 ulp) and a constant gradient: after 100 steps the weights moved as the fp32 run did, on average."""
    grad = torch.full((8192,), 0.5)
    moved = {}
    for dtype in (torch.bfloat16, torch.float32):
        w = nn.Parameter(torch.ones(8192, dtype=dtype))
        opt = build_optimizer("adamw_8bit", [w], lr=1e-4, weight_decay=0.0)
        for _ in range(100):
            w.grad = grad.to(dtype)
            opt.step()
        moved[dtype] = 1 - w.float().mean().item()
    assert moved[torch.float32] == pytest.approx(1e-2, rel=0.01)
    assert moved[torch.bfloat16] == pytest.approx(moved[torch.float32], rel=0.03)


@pytest.mark.parametrize("name", QUANTIZED)
def test_small_tensors_keep_32_bit_state_and_the_threshold_is_4096(name):
    """bitsandbytes-foundation/bitsandbytes#1286 (from #1181): ``min_8bit_size`` was ignored, every tensor under
    4096 elements got 32-bit state whatever the setting. Ours: 4095 elements -> fp32 moments, 4096 -> codes;
    ``quantize_state=False`` (bitsandbytes' ``optim_bits=32``) keeps fp32 for the large one too."""
    def state_dtypes(numel, **kwargs):
        w = nn.Parameter(torch.randn(numel))  # 1-D: Muon's AdamW part keeps its state
        w.grad = torch.randn_like(w)
        opt = build_optimizer(name, [w], **kwargs)
        opt.step()
        return {v.dtype for k, v in opt.state[w].items() if k != "step"}

    assert state_dtypes(4095) == {torch.float32}
    assert state_dtypes(4096) & {torch.int8, torch.uint8}
    assert state_dtypes(4096, quantize_state=False) == {torch.float32}


def test_launch_table_keeps_sizes_above_int32():
    """NVIDIA/TransformerEngine#2918: ``multi_tensor_apply`` stored tensor sizes as int32, so a tensor of more than
    2^31 elements (an embedding of 19345706 x 128) got a negative size and an illegal memory access. Ours builds
    the launch table in int64 and the tile map in Python ints: a stand-in table for that embedding keeps its size,
    and its tiles cover it exactly (checked on sizes only; no such tensor is allocated)."""
    from lowmem_lightning.kernels.multitensor import launch_table, tile_map

    numel = 19345706 * 128
    assert numel > 2**31
    table = launch_table([[numel, 3], [0, 1]], torch.device("cpu"))
    assert table.dtype == torch.int64 and int(table[0, 0]) == numel
    tile = 2048
    owner, firsts, total = tile_map((4097, numel), torch.device("cpu"), tile)
    assert firsts == (0, 3) and total == 3 + -(-numel // tile)
    assert owner.dtype == torch.int32 and owner.numel() == total and int(owner[-1]) == 1
    assert (total - 1 - firsts[1]) * tile < numel <= (total - firsts[1]) * tile  # the last tile is the tensor's


# ---------------------------------------------------------------------------------------------- compile
def test_compiled_cpu_path_compiles_once_for_many_shapes(cpu_compile):
    """pytorch/ao#746 (tracked in pytorch/ao#754): compiling torchao's 8-bit AdamW took 12 minutes on a 7B model
    because each param shape compiled again. Ours: ten params of ten different shapes and a cosine schedule
    changing the lr every step compile one graph at the first step and none after."""
    from torch._dynamo.utils import counters

    params = [_param(4096 + 37 * i, seed=i) for i in range(6)] + [_param(17 + i, 300) for i in range(4)]
    opt = build_optimizer("adamw_8bit", params, lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    before = counters["stats"]["unique_graphs"]  # the counters are per process: other tests may have compiled
    _steps(opt, params, 1)
    sched.step()
    graphs = counters["stats"]["unique_graphs"]
    assert graphs - before <= 2  # one bucketed graph for all ten shapes (a second for the fp32-state path at most)
    for _ in range(3):
        _steps(opt, params, 1)
        sched.step()
    assert counters["stats"]["unique_graphs"] == graphs


# ---------------------------------------------------------------------------------------------- NF4 / modules
def test_linear4bit_deepcopies_and_pickles():
    """bitsandbytes-foundation/bitsandbytes#1060: ``Params4bit`` could not be deep-copied (accelerate and peft
    deepcopy models). Ours: a deep copy of an NF4 layer computes the same output, owns its buffers (changing the
    copy leaves the original alone) and a pickled layer computes the same output too."""
    from lowmem_lightning.quant import Linear4bit

    layer = Linear4bit.from_linear(nn.Linear(128, 64))
    x = torch.randn(3, 128)
    twin = copy.deepcopy(layer)
    assert torch.equal(twin(x), layer(x))
    assert {b.data_ptr() for b in twin.buffers()}.isdisjoint(b.data_ptr() for b in layer.buffers())
    reference = layer(x)
    for buffer in twin.buffers():
        buffer.zero_()
    assert torch.equal(layer(x), reference)
    assert torch.equal(pickle.loads(pickle.dumps(layer))(x), reference)


def test_low_mem_module_decays_matrices_only():
    """Lightning-AI/lit-llama#254: weight decay was applied to every param, LayerNorm weights and biases included.
    ``LowMemModule``'s groups decay the matrices only; biases and norm weights get 0, and with a zero gradient a
    norm weight stays exactly where it is while a matrix decays."""
    from lowmem_lightning.modules.base import LowMemModule

    class Block(LowMemModule):
        def __init__(self):
            super().__init__(optimizer="adamw_8bit", lr=1e-2, weight_decay=0.1)
            self.proj, self.norm = nn.Linear(80, 64), nn.LayerNorm(64)

    block = Block()
    groups = block.param_groups()
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in groups}
    assert by_decay[0.1] == {id(block.proj.weight)}
    assert by_decay[0.0] == {id(block.proj.bias), id(block.norm.weight), id(block.norm.bias)}
    opt = build_optimizer("adamw_8bit", groups, lr=1e-2)
    norm_before, proj_before = block.norm.weight.detach().clone(), block.proj.weight.detach().clone()
    for p in block.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(block.norm.weight, norm_before)
    torch.testing.assert_close(block.proj.weight.detach(), proj_before * (1 - 1e-2 * 0.1))


def test_module_with_nothing_trainable_is_refused_before_training():
    """huggingface/peft#760: after ``prepare_model_for_kbit_training`` froze every param, training went on with
    only "None of the inputs have requires_grad=True" as a hint. ``LowMemModule`` refuses a module with no
    trainable param when the optimizer is built, saying so."""
    from lowmem_lightning.modules.base import LowMemModule

    class Frozen(LowMemModule):
        def __init__(self):
            super().__init__(optimizer="adamw_8bit", lr=1e-3)
            self.net = nn.Linear(8, 8).requires_grad_(False)

    with pytest.raises(ValueError, match=r"Frozen has no trainable parameters"):
        Frozen().configure_optimizers()


def test_qlora_with_gradient_checkpointing_gives_lora_the_same_gradients():
    """artidoro/qlora#224 (and microsoft/LoRA#120): with gradient checkpointing on a frozen 4-bit base, "None of
    the inputs have requires_grad=True. Gradients will be None" and the LoRA weights never trained. Ours: a tiny
    Llama in NF4 with LoRA and ``gradient_checkpointing=True`` gives every LoRA weight the same gradient as
    without checkpointing, and warns nothing about missing gradients."""
    import warnings

    from lowmem_lightning.modules.causal_lm import CausalLMModule

    tiny = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 128}
    modules = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        module = CausalLMModule(config=tiny, quantize="nf4", lora={"r": 4}, gradient_checkpointing=checkpointing)
        module.configure_model()
        modules.append(module)
    modules[1].model.load_state_dict(modules[0].model.state_dict())
    batch = {"input_ids": torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(2))}
    batch["labels"] = batch["input_ids"].clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for module in modules:
            module.train()
            module(**batch).loss.backward()
    assert not [w for w in caught if "requires_grad" in str(w.message)]
    grads = [{n: p.grad for n, p in m.model.named_parameters() if p.requires_grad} for m in modules]
    assert grads[0] and all("lora_" in n for n in grads[0])
    for name, grad in grads[0].items():
        assert grads[1][name] is not None, name
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_lora_merge_and_unmerge_on_nf4_layers():
    """huggingface/peft#2501: ``merge_adapter()`` failed on a bitsandbytes 4-bit model (to merge, then unmerge
    later). Ours: merging LoRA into NF4 layers keeps the adapted outputs, and unmerging gives back the adapted
    outputs, and with the adapter disabled the base outputs, exactly."""
    from lowmem_lightning.quant import add_lora, quantize_model

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.v_proj = nn.Linear(64, 64), nn.Linear(64, 64)

        def forward(self, x):
            return self.v_proj(torch.tanh(self.q_proj(x)))

    model = add_lora(quantize_model(Block()), r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.05)
    x = torch.randn(3, 64)
    with torch.no_grad():
        with model.disable_adapter():
            base = model(x)
        adapted = model(x)
        model.merge_adapter()
        torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
        assert torch.equal(model(x), adapted)
        with model.disable_adapter():
            assert torch.equal(model(x), base)


def test_learning_rate_monitor_with_adafactor_relative_step_is_refused_before_training(tmp_path):
    """Lightning-AI/pytorch-lightning#12067: ``LearningRateMonitor`` logged a constant, wrong lr for Adafactor's
    relative step (its groups hold no real lr). With our callback, that pairing is refused before training with
    what to do; done that way (an lr and ``relative_step=False``), Adafactor runs on that lr and the monitor logs it.
    (An lr alone is refused naming ``lr`` and ``relative_step`` and both ways out: transformers' rule.)"""
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger

    from lowmem_lightning.callbacks import LowMemOptimizerCallback

    class Plain(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(16, 320)

        def training_step(self, batch, batch_idx):
            return self.net(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def fit(**kwargs):
        model = Plain()
        trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=CSVLogger(tmp_path), enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                            callbacks=[LowMemOptimizerCallback("adafactor", print_summary=False, plot=False, **kwargs),
                                       LearningRateMonitor("step")])
        before = model.net.weight.detach().clone()
        try:
            trainer.fit(model, DataLoader(TensorDataset(torch.randn(16, 16)), batch_size=8))
        finally:
            trained = not torch.equal(model.net.weight, before)
        return trainer, trained

    with pytest.raises(ValueError, match=r"LearningRateMonitor logs every param group's learning rate"):
        fit()
    with pytest.raises(ValueError, match=r"\(got lr=0.001, relative_step=True\): pass lr=None .* relative_step=False"):
        fit(lr=1e-3)
    trainer, trained = fit(lr=1e-3, optimizer_kwargs={"relative_step": False})  # what the refusal says to do
    assert trained and trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3)
    assert float(trainer.callback_metrics["lr-Adafactor"]) == pytest.approx(1e-3)


class _Net(L.LightningModule):
    """A 5120-element weight plus small tensors; AdamW and a per-step cosine schedule (the users' setting)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 320), nn.Tanh(), nn.Linear(320, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=12)
        return [opt], [{"scheduler": sched, "interval": "step"}]


def _fit(tmp_path, max_epochs, ckpt_path=None):
    from lowmem_lightning.callbacks import LowMemOptimizerCallback

    torch.manual_seed(0)
    x = torch.randn(24, 16, generator=torch.Generator().manual_seed(1))
    data = DataLoader(TensorDataset(x, torch.sin(x[:, :1])), batch_size=8)
    model = _Net()
    trainer = L.Trainer(accelerator="cpu", max_epochs=max_epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[LowMemOptimizerCallback("adamw_8bit", print_summary=False, plot=False)])
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer, model


def test_schedule_drives_the_swapped_optimizer_after_resume(tmp_path):
    """Lightning-AI/pytorch-lightning#12812 (also #5455, #4655): after resuming, ``scheduler.step()`` no longer
    changed the optimizer's lr, or the lr restarted from its initial value. With our optimizer swapped in, the
    resumed run's scheduler is bound to the optimizer that trains, and lr and weights after the resume equal
    the uninterrupted run's."""
    whole, whole_model = _fit(tmp_path / "whole", max_epochs=4)
    first, _ = _fit(tmp_path / "first", max_epochs=2)
    path = tmp_path / "half.ckpt"
    first.save_checkpoint(path)
    resumed, resumed_model = _fit(tmp_path / "resumed", max_epochs=4, ckpt_path=str(path))
    scheduler = resumed.lr_scheduler_configs[0].scheduler
    assert scheduler.optimizer is resumed.optimizers[0]
    assert type(resumed.optimizers[0]) is optimizer_class("adamw_8bit")
    assert resumed.optimizers[0].param_groups[0]["lr"] == pytest.approx(whole.optimizers[0].param_groups[0]["lr"])
    for a, b in zip(resumed_model.parameters(), whole_model.parameters()):
        assert torch.equal(a, b)
