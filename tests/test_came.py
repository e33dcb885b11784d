"""CAME: equality with the official came-pytorch, Triton kernels == reference, factored confidence
statistics, 8-bit momentum, LR schedulers, state dicts, non-finite guard, memory, argument errors."""

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
from lowmem_lightning.optim.came import CAME

MODES = [
    dict(lr=1e-3),
    dict(lr=1e-2, weight_decay=0.1),
    dict(lr=3e-3, betas=(0.8, 0.99, 0.999), clip_threshold=0.5, eps=(1e-30, 1e-12)),
]
SHAPES = [(33, 65), (3, 5, 17), (4097,), (7,)]  # factored, conv-like 3-D, 1-D large, 1-D small


@pytest.mark.parametrize("kwargs", MODES, ids=mode_id)
def test_matches_official_came_after_50_steps(kwargs):
    came_pytorch = pytest.importorskip("came_pytorch")
    params0 = [torch.randn(s) for s in SHAPES]
    grads = random_grads(SHAPES, 50)
    ours, opt = run_optimizer(lambda ps: CAME(ps, **kwargs), params0, grads)
    ref, _ = run_optimizer(lambda ps: came_pytorch.CAME(ps, **kwargs), params0, grads)
    assert_rel_close(ours, ref, 1e-5)
    # stricter: relative to how far the params moved, not to their size
    for a, b, p0 in zip(ours, ref, params0):
        assert (a.detach() - b.detach()).abs().max() <= 1e-4 * (b.detach() - p0).abs().max()
    assert opt.effective_lr() == [kwargs["lr"]]


def test_confidence_statistics_are_factored():
    p = torch.nn.Parameter(torch.randn(2, 40, 50))
    opt = CAME([p], lr=1e-3)
    p.grad = torch.randn_like(p)
    opt.step()
    shapes = {k: tuple(v.shape) for k, v in opt.state[p].items()}
    assert shapes == {
        "step": (),
        "exp_avg": (2, 40, 50),
        "exp_avg_sq_row": (2, 40),
        "exp_avg_sq_col": (2, 50),
        "exp_avg_res_row": (2, 40),
        "exp_avg_res_col": (2, 50),
    }


def test_int8_momentum_tracks_fp32_momentum():
    shapes = [(70, 70), (3, 40, 41), (5000,), (9, 9)]
    params0 = [torch.randn(s) for s in shapes]
    grads = random_grads(shapes, 30)
    ours, opt = run_optimizer(lambda ps: build_optimizer("came", ps, lr=1e-2, momentum_dtype="int8"), params0, grads)
    ref, _ = run_optimizer(lambda ps: CAME(ps, lr=1e-2), params0, grads)
    for p in ours:
        state = opt.state[p]
        if p.numel() >= 4096:
            assert state["exp_avg_codes"].dtype == torch.int8 and "exp_avg" not in state
        else:
            assert state["exp_avg"].dtype == torch.float32
    for a, b, p0 in zip(ours, ref, params0):
        assert (a.detach() - b.detach()).norm() / (b.detach() - p0).norm() < 0.03


KERNEL_SHAPES = [(33, 65), (1000, 3), (3, 5, 17), (4097,), (2, 40, 65)]  # the last: factored 8-bit momentum
KERNEL_MODES = [
    (torch.float32, dict(lr=1e-2, momentum_dtype="int8", weight_decay=0.1)),
    (torch.bfloat16, dict(lr=1e-2)),
]


KERNEL_CASES = [
    pytest.param(shape, dtype, kwargs, id=f"{name}-{shape}")
    for (dtype, kwargs), name in zip(KERNEL_MODES, ["fp32-int8-wd", "bf16-fp32mom"])
    for shape in (KERNEL_SHAPES if dtype == torch.float32 else KERNEL_SHAPES[::2])
]


@pytest.mark.parametrize("shape,dtype,kwargs", KERNEL_CASES)
def test_triton_kernels_match_reference(force_triton, monkeypatch, shape, dtype, kwargs):
    p0 = torch.randn(shape)
    grads = random_grads([shape], 2, seed=3)
    dispatch.configure(force_triton=False)
    (ref,), ref_opt = run_optimizer(lambda ps: CAME(ps, **kwargs), [p0], grads, dtype)
    dispatch.configure(force_triton=True)
    (ours,), opt = run_optimizer(lambda ps: CAME(ps, **kwargs), [p0], grads, dtype)
    assert_states_match(ref_opt.state[ref], opt.state[ours])
    if dtype == torch.float32:
        torch.testing.assert_close(ours.data, ref.data, rtol=1e-6, atol=1e-7)
    else:  # stochastic rounding of (nearly) identical fp32 values: (nearly) identical bits
        assert (ours.data != ref.data).float().mean() <= 1e-3
        torch.testing.assert_close(ours.data.float(), ref.data.float(), rtol=2**-7, atol=0)


@pytest.mark.parametrize("momentum_dtype", ["float32", "int8"])
@pytest.mark.parametrize("triton_path", [False, True], ids=["reference", "triton"])
def test_non_finite_gradient_skips_that_tensor(force_triton, monkeypatch, triton_path, momentum_dtype):
    dispatch.configure(force_triton=triton_path)
    factory = lambda ps: CAME(ps, lr=1e-2, momentum_dtype=momentum_dtype)  # noqa: E731
    assert_non_finite_gradient_skips_that_tensor(factory, float("nan"))


@pytest.mark.parametrize("momentum_dtype", ["float32", "int8"])
def test_state_dict_round_trip_is_bit_exact(momentum_dtype):
    kwargs = dict(lr=1e-2, momentum_dtype=momentum_dtype, weight_decay=0.01)
    assert_state_dict_round_trip_is_bit_exact(lambda ps: CAME(ps, **kwargs))



def test_loads_official_state_and_switches_momentum_dtype():
    came_pytorch = pytest.importorskip("came_pytorch")
    shapes = [(70, 70), (4097,), (7,)]
    params0 = [torch.randn(s) for s in shapes]
    grads = random_grads(shapes, 8)
    ref, ref_opt = run_optimizer(lambda ps: came_pytorch.CAME(ps, lr=1e-2), params0, grads[:4])
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    opt = CAME(ours, lr=1e-2)
    opt.load_state_dict(ref_opt.state_dict())
    quant = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    opt8 = CAME(quant, lr=1e-2, momentum_dtype="int8")
    opt8.load_state_dict(ref_opt.state_dict())
    assert opt8.state[quant[0]]["exp_avg_codes"].dtype == torch.int8
    for step_grads in grads[4:]:
        for p, q, r, g in zip(ref, ours, quant, step_grads):
            p.grad, q.grad, r.grad = g.clone(), g.clone(), g.clone()
        ref_opt.step()
        opt.step()
        opt8.step()
    assert_rel_close(ours, ref, 1e-5)
    assert_rel_close(quant, ref, 1e-2)


def test_lr_scheduler_changes_the_step_size():
    came_pytorch = pytest.importorskip("came_pytorch")
    shapes = [(33, 65), (4097,)]
    params0 = [torch.randn(s) for s in shapes]
    grads = random_grads(shapes, 10)

    def train(cls):
        params = [torch.nn.Parameter(p.clone()) for p in params0]
        opt = cls(params, lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
        lrs = []
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
            lrs.append(opt.param_groups[0].get("effective_lr"))
            sched.step()
        return params, lrs

    ours, lrs = train(CAME)
    ref, _ = train(came_pytorch.CAME)
    assert_rel_close(ours, ref, 1e-5)
    assert lrs == pytest.approx([1e-2 / (1 + i) for i in range(10)])


@pytest.mark.parametrize("momentum_dtype,limit", [("float32", 4.05), ("int8", 1.1)])
def test_state_memory_bytes_per_param(momentum_dtype, limit):
    rows, cols = 1024, 2048
    p = torch.nn.Parameter(torch.zeros(rows, cols))
    opt = CAME([p], lr=1e-3, momentum_dtype=momentum_dtype)
    p.grad = torch.randn_like(p)
    opt.step()
    n = rows * cols
    momentum = 4 * n if momentum_dtype == "float32" else n + 4 * math.ceil(n / BLOCK_SIZE)
    memory = state_memory(opt)
    assert memory.total_bytes == momentum + 2 * 4 * (rows + cols) + 4  # + sq/res row/col stats + step
    assert memory.bytes_per_param <= limit


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(), "lr=None"),
        (dict(lr=-1.0), "lr=-1.0"),  # lr=0 is allowed, as in torch.optim (came-pytorch refuses it)
        (dict(lr=1e-3, betas=(0.9, 0.999)), "betas="),
        (dict(lr=1e-3, betas=(0.9, 1.5, 0.9)), r"betas\[1\]=1.5"),
        (dict(lr=1e-3, eps=(1e-30, -1.0)), r"eps\[1\]=-1.0"),
        (dict(lr=1e-3, clip_threshold=0), "clip_threshold=0"),
        (dict(lr=1e-3, weight_decay=-1), "weight_decay=-1"),
        (dict(lr=1e-3, momentum_dtype="bf16"), "momentum_dtype='bf16'"),
    ],
)
def test_invalid_arguments_raise_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CAME([torch.nn.Parameter(torch.zeros(2, 2))], **kwargs)


@pytest.mark.slow
def test_compiled_cpu_path_matches_official(cpu_compile):
    came_pytorch = pytest.importorskip("came_pytorch")
    shapes = [(33, 65), (3, 5, 17), (4097,)]
    params0 = [torch.randn(s) for s in shapes]
    grads = random_grads(shapes, 3)
    compiled, _ = run_optimizer(lambda ps: CAME(ps, lr=1e-2), params0, grads)
    ref, _ = run_optimizer(lambda ps: came_pytorch.CAME(ps, lr=1e-2), params0, grads)
    assert_rel_close(compiled, ref, 1e-5)


@pytest.mark.parametrize("momentum_dtype", ["float32", "int8"])
@pytest.mark.parametrize("triton_path", [False, True], ids=["reference", "triton"])
def test_maximize_is_the_kernels_gradient_sign(force_triton, triton_path, momentum_dtype):
    # the sign is folded into a per-tensor scalar of the kernels (as AdamW's and SGD's grad_sign): the
    # same bits as minimizing the negated gradient, factored and flat, and the gradients stay untouched
    dispatch.configure(force_triton=triton_path)
    assert_maximize_equals_negated_gradient(lambda ps, **extra: CAME(
        ps, lr=1e-2, momentum_dtype=momentum_dtype, **extra))
