"""Adafactor: equality with transformers' Adafactor, Triton kernels == reference, 8-bit momentum,
effective LR, LR schedulers, state dicts, non-finite guard, exact state memory, argument errors."""

import math

import pytest
import torch
from optim_helpers import (
    assert_maximize_equals_negated_gradient,
    assert_non_finite_gradient_skips_that_tensor,
    assert_rel_close,
    assert_state_dict_round_trip_is_bit_exact,
    assert_states_match,
    mode_id,
    random_grads,
    run_optimizer,
)

from lowmem_lightning.kernels import dispatch
from lowmem_lightning.kernels.codec import BLOCK_SIZE
from lowmem_lightning.optim import build_optimizer, state_memory
from lowmem_lightning.optim.adafactor import Adafactor

transformers_optimization = pytest.importorskip("transformers.optimization")
HFAdafactor = transformers_optimization.Adafactor

MODES = [
    dict(),  # relative step + parameter scale (transformers' defaults)
    dict(warmup_init=True),
    dict(scale_parameter=False),
    dict(relative_step=False, lr=1e-2),
    dict(relative_step=False, scale_parameter=False, lr=3e-3),
    dict(beta1=0.9),
    dict(beta1=0.9, relative_step=False, scale_parameter=False, lr=1e-2),
    dict(weight_decay=0.1),
    dict(beta1=0.8, weight_decay=0.05, relative_step=False, lr=1e-2, clip_threshold=0.5, decay_rate=-0.6),
]
SHAPES = [(33, 65), (3, 5, 17), (4097,), (7,)]  # factored, conv-like 3-D, 1-D large, 1-D small


@pytest.mark.parametrize("kwargs", MODES, ids=mode_id)
def test_matches_transformers_adafactor_after_50_steps(kwargs):
    params0 = [torch.randn(s) for s in SHAPES]
    grads = random_grads(SHAPES, 50)
    ours, opt = run_optimizer(lambda ps: Adafactor(ps, **kwargs), params0, grads)
    ref, ref_opt = run_optimizer(lambda ps: HFAdafactor(ps, **kwargs), params0, grads)
    assert_rel_close(ours, ref, 1e-5)
    # the step size we report is the one transformers applies (its AdafactorSchedule's value)
    expected_lr = ref_opt._get_lr(ref_opt.param_groups[0], ref_opt.state[ref[0]])
    assert opt.effective_lr()[0] == pytest.approx(float(expected_lr), rel=1e-5)
    assert float(opt.param_groups[0]["effective_lr_tensor"]) == pytest.approx(float(expected_lr), rel=1e-5)


def test_int8_momentum_tracks_fp32_momentum_and_stores_codes():
    shapes = [(70, 70), (3, 40, 41), (5000,), (9, 9)]
    params0 = [torch.randn(s) for s in shapes]
    grads = random_grads(shapes, 30)
    int8 = lambda ps: build_optimizer("adafactor", ps, beta1=0.9, momentum_dtype="int8")  # noqa: E731
    ours, opt = run_optimizer(int8, params0, grads)
    ref, _ = run_optimizer(lambda ps: Adafactor(ps, beta1=0.9), params0, grads)
    for p in ours:
        state = opt.state[p]
        if p.numel() >= 4096:
            assert state["exp_avg_codes"].dtype == torch.int8 and "exp_avg" not in state
            assert state["exp_avg_absmax"].shape == (math.ceil(p.numel() / BLOCK_SIZE),)
        else:
            assert state["exp_avg"].dtype == torch.float32 and "exp_avg_codes" not in state
    for a, b, p0 in zip(ours, ref, params0):
        moved = (b.detach() - p0).norm()
        assert (a.detach() - b.detach()).norm() / moved < 0.03


KERNEL_SHAPES = [(33, 65), (1000, 3), (3, 5, 17), (4097,), (2, 40, 65)]  # the last: factored 8-bit momentum
KERNEL_MODES = [
    (torch.float32, dict(beta1=0.9, momentum_dtype="int8", weight_decay=0.1)),
    (torch.bfloat16, dict(beta1=0.9, relative_step=False, scale_parameter=False, lr=1e-2)),
    (torch.float16, dict(warmup_init=True)),
]


KERNEL_CASES = [
    pytest.param(shape, dtype, kwargs, id=f"{name}-{shape}")
    for (dtype, kwargs), name in zip(KERNEL_MODES, ["fp32-int8", "bf16-fp32mom", "fp16-warmup"])
    for shape in {torch.float32: KERNEL_SHAPES, torch.bfloat16: KERNEL_SHAPES[:4], torch.float16: [(33, 65)]}[dtype]
]


@pytest.mark.parametrize("shape,dtype,kwargs", KERNEL_CASES)
def test_triton_kernels_match_reference(force_triton, monkeypatch, shape, dtype, kwargs):
    p0 = torch.randn(shape)
    grads = random_grads([shape], 2, seed=3)
    dispatch.configure(force_triton=False)
    (ref,), ref_opt = run_optimizer(lambda ps: Adafactor(ps, **kwargs), [p0], grads, dtype)
    dispatch.configure(force_triton=True)
    (ours,), opt = run_optimizer(lambda ps: Adafactor(ps, **kwargs), [p0], grads, dtype)
    assert_states_match(ref_opt.state[ref], opt.state[ours])
    if dtype == torch.float32:
        torch.testing.assert_close(ours.data, ref.data, rtol=1e-6, atol=1e-7)
    else:  # stochastic rounding of (nearly) identical fp32 values: (nearly) identical bits
        assert (ours.data != ref.data).float().mean() <= 1e-3
        torch.testing.assert_close(ours.data.float(), ref.data.float(), rtol=2**-7, atol=0)
    assert opt.effective_lr() == pytest.approx(ref_opt.effective_lr(), rel=1e-6)


@pytest.mark.parametrize("momentum_dtype", ["float32", "int8"])
@pytest.mark.parametrize("triton_path", [False, True], ids=["reference", "triton"])
def test_non_finite_gradient_skips_that_tensor(force_triton, monkeypatch, triton_path, momentum_dtype):
    dispatch.configure(force_triton=triton_path)
    factory = lambda ps: Adafactor(ps, beta1=0.9, momentum_dtype=momentum_dtype)  # noqa: E731
    assert_non_finite_gradient_skips_that_tensor(factory, float("inf"))


@pytest.mark.parametrize("momentum_dtype", ["float32", "int8"])
def test_state_dict_round_trip_is_bit_exact(momentum_dtype):
    kwargs = dict(beta1=0.9, momentum_dtype=momentum_dtype, weight_decay=0.01)
    assert_state_dict_round_trip_is_bit_exact(lambda ps: Adafactor(ps, **kwargs))



def test_loads_transformers_state_and_continues_identically():
    params0 = [torch.randn(s) for s in SHAPES]
    grads = random_grads(SHAPES, 8)
    kwargs = dict(beta1=0.9)
    ref, ref_opt = run_optimizer(lambda ps: HFAdafactor(ps, **kwargs), params0, grads[:4])
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    opt = Adafactor(ours, **kwargs)
    opt.load_state_dict(ref_opt.state_dict())
    for step_grads in grads[4:]:
        for p, q, g in zip(ref, ours, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        ref_opt.step()
        opt.step()
    assert_rel_close(ours, ref, 1e-5)


def test_rejects_a_state_dict_that_does_not_fit():
    p = torch.nn.Parameter(torch.randn(8, 8))
    opt = Adafactor([p])
    p.grad = torch.randn_like(p)
    opt.step()
    saved = opt.state_dict()
    other = Adafactor([torch.nn.Parameter(torch.randn(8, 9))])
    with pytest.raises(ValueError, match="exp_avg_sq_col"):
        other.load_state_dict(saved)


def test_lr_scheduler_drives_the_step_size_without_relative_step():
    shapes = [(33, 65), (4097,)]
    params0 = [torch.randn(s) for s in shapes]
    grads = random_grads(shapes, 12)
    kwargs = dict(relative_step=False, scale_parameter=False, lr=1e-2, beta1=0.9)

    def train(cls):
        params = [torch.nn.Parameter(p.clone()) for p in params0]
        opt = cls(params, **kwargs)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        lrs = []
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
            sched.step()
            lrs.append(opt.param_groups[0]["effective_lr"] if cls is Adafactor else None)
        return params, lrs

    ours, lrs = train(Adafactor)
    ref, _ = train(HFAdafactor)
    assert_rel_close(ours, ref, 1e-5)
    assert lrs == pytest.approx([1e-2 * 0.5 ** (i // 3) for i in range(12)])


def test_effective_lr_is_a_float_where_the_host_knows_it():
    p = torch.nn.Parameter(torch.randn(16, 16))
    opt = Adafactor([p], scale_parameter=False)
    for t in range(1, 4):
        p.grad = torch.randn_like(p)
        opt.step()
        assert opt.param_groups[0]["effective_lr"] == pytest.approx(min(1e-2, 1 / math.sqrt(t)))
    opt = Adafactor([p], warmup_init=True, scale_parameter=False)
    for t in range(1, 4):
        p.grad = torch.randn_like(p)
        opt.step()
        assert opt.param_groups[0]["effective_lr"] == pytest.approx(1e-6 * t)
        assert float(opt.param_groups[0]["effective_lr_tensor"]) == pytest.approx(1e-6 * t, rel=1e-6)
    opt = Adafactor([p])  # scale_parameter: depends on RMS(p), a device quantity
    rms = float(p.detach().norm() / 16)
    assert opt.effective_lr() == pytest.approx([1e-2 * rms], rel=1e-5)  # before the first step
    p.grad = torch.randn_like(p)
    opt.step()
    assert "effective_lr" not in opt.param_groups[0]  # device quantity: no float, no sync
    assert opt.param_groups[0]["effective_lr_tensor"].shape == ()
    assert opt.effective_lr() == pytest.approx([1e-2 * rms], rel=1e-5)


def test_state_memory_is_exact():
    n = 2048
    p = torch.nn.Parameter(torch.zeros(n, n))
    opt = Adafactor([p])
    p.grad = torch.randn(n, n)
    opt.step()
    assert set(opt.state[p]) == {"step", "exp_avg_sq_row", "exp_avg_sq_col"}
    assert state_memory(opt).total_bytes == 4 * (n + n) + 4  # row + column statistics + step counter

    q = torch.nn.Parameter(torch.zeros(3, 64, 96))  # conv-like: batch of 3 factored matrices
    opt = Adafactor([q], beta1=0.9, momentum_dtype="int8", relative_step=False, lr=1e-3)
    q.grad = torch.randn_like(q)
    opt.step()
    numel = q.numel()
    expected = 4 * 3 * (64 + 96) + numel + 4 * math.ceil(numel / BLOCK_SIZE) + 4
    assert state_memory(opt).total_bytes == expected


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=1e-3), "Cannot combine manual `lr` and `relative_step=True`"),
        (dict(relative_step=False, warmup_init=True, lr=1e-3), "`warmup_init=True` requires `relative_step=True`"),
        (dict(relative_step=False), "lr=None with relative_step=False"),
        (dict(relative_step=False, lr=-1.0), "lr=-1.0"),
        (dict(eps=(1e-30,)), "eps="),
        (dict(eps=(1e-30, float("nan"))), r"eps\[1\]"),
        (dict(clip_threshold=0.0), "clip_threshold=0.0"),
        (dict(decay_rate=0.5), "decay_rate=0.5"),
        (dict(beta1=1.0), "beta1=1.0"),
        (dict(weight_decay=-0.1), "weight_decay=-0.1"),
        (dict(momentum_dtype="int4"), "momentum_dtype='int4'"),
    ],
)
def test_invalid_arguments_raise_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Adafactor([torch.nn.Parameter(torch.zeros(2, 2))], **kwargs)


def test_invalid_flag_type_and_param_group():
    with pytest.raises(TypeError, match="scale_parameter"):
        Adafactor([torch.nn.Parameter(torch.zeros(2))], scale_parameter="yes")
    opt = Adafactor([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="momentum_dtype"):
        opt.add_param_group(dict(params=[torch.nn.Parameter(torch.zeros(2))], momentum_dtype="fp8"))
    assert len(opt.param_groups) == 1


@pytest.mark.slow
def test_compiled_cpu_path_matches_eager(cpu_compile):
    shapes = [(33, 65), (3, 5, 17), (4097,)]
    params0 = [torch.randn(s) for s in shapes]
    grads = random_grads(shapes, 3)
    kwargs = dict(beta1=0.9, momentum_dtype="int8")
    compiled, _ = run_optimizer(lambda ps: Adafactor(ps, **kwargs), params0, grads)
    ref, _ = run_optimizer(lambda ps: HFAdafactor(ps, beta1=0.9), params0, grads)
    for a, b, p0 in zip(compiled, ref, params0):
        assert (a.detach() - b.detach()).norm() / (b.detach() - p0).norm() < 0.03


@pytest.mark.parametrize("momentum_dtype", ["float32", "int8"])
@pytest.mark.parametrize("triton_path", [False, True], ids=["reference", "triton"])
def test_maximize_is_the_kernels_gradient_sign(force_triton, triton_path, momentum_dtype):
    # the sign is folded into a per-tensor scalar of the kernels (as AdamW's and SGD's grad_sign): the
    # same bits as minimizing the negated gradient, factored and flat, and the gradients stay untouched
    dispatch.configure(force_triton=triton_path)
    assert_maximize_equals_negated_gradient(lambda ps, **extra: Adafactor(
        ps, beta1=0.9, momentum_dtype=momentum_dtype, **extra))
