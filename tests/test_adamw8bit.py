"""AdamW8bit: the Triton kernel (interpreter) equals the reference bit for bit, the optimizer tracks
torch.optim.AdamW, non-finite gradients are skipped, LR schedules apply without recompiling, bf16
params keep small updates, and the state takes ~2.03 bytes/param."""

import math
import re

import pytest
import torch
from optim_helpers import bits, one_cpu_thread  # noqa: F401 (one_cpu_thread: autouse fixture)

from lowmem_lightning.kernels import adamw8bit as kernel
from lowmem_lightning.kernels import dispatch
from lowmem_lightning.kernels.dispatch import pack, unpack
from lowmem_lightning.kernels.rounding import step_seed
from lowmem_lightning.optim import build_optimizer, state_memory
from lowmem_lightning.optim.adamw8bit import AdamW8bit

ODD_SHAPES = [(4097,), (1000, 3), (3, 5, 300), (7, 11)]  # the last one keeps fp32 state (< 4096 elements)






def _make_params(dtype, shapes=ODD_SHAPES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=g) * 0.5).to(dtype)) for s in shapes]


def _run(params, steps, grad_dtype=torch.float32, nan_at=None, **kwargs):
    """``steps`` AdamW8bit steps with seeded grads; ``nan_at=(step, index)`` poisons one gradient."""
    opt = AdamW8bit(params, **{"lr": 1e-2, "weight_decay": 0.1, **kwargs})
    g = torch.Generator().manual_seed(1)
    for p in params:
        if p.dtype != grad_dtype:
            if not hasattr(p, "grad_dtype"):
                pytest.skip(f"torch {torch.__version__} refuses a {grad_dtype} grad on a {p.dtype} param "
                            "(Tensor.grad_dtype, which allows it, is torch >= 2.10)")
            p.grad_dtype = None  # torch >= 2.10 checks that grads match the param dtype unless told not to
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = (torch.randn(p.shape, generator=g) * 0.1).to(grad_dtype)
            if nan_at == (step, i):
                p.grad.view(-1)[5] = float("nan")
        opt.step()
    return opt


@pytest.mark.parametrize(
    "param_dtype, grad_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float16, torch.bfloat16),
    ],
)
def test_triton_kernel_equals_reference(monkeypatch, param_dtype, grad_dtype):
    # Two steps over odd shapes in one multi-tensor launch per group; the second step has a NaN
    # gradient in one tensor, which the kernel must leave untouched while its neighbours update.
    dispatch.configure(force_triton=True)
    tri_params = _make_params(param_dtype)
    tri = _run(tri_params, 2, grad_dtype, nan_at=(1, 1))
    dispatch.configure(force_triton=False)
    ref_params = _make_params(param_dtype)
    ref = _run(ref_params, 2, grad_dtype, nan_at=(1, 1))
    start = _make_params(param_dtype)
    for p_tri, p_ref, p0 in zip(tri_params, ref_params, start):
        assert torch.equal(bits(p_tri), bits(p_ref)), "params differ"
        assert not torch.equal(p_tri, p0)
        for key, value in ref.state[p_ref].items():
            assert torch.equal(bits(tri.state[p_tri][key]), bits(value)), f"state {key!r} differs"
    assert tri.skipped_updates == ref.skipped_updates == 1
    assert tri.state[tri_params[1]]["step"].item() == 1.0


def test_launch_groups_tensors_by_dtype(monkeypatch):
    # one launch per (quantized, param dtype, grad dtype): 4 tensors of two kinds -> 2 launches
    calls = []
    real = kernel._adamw8bit_kernel

    class Spy:
        def __getitem__(self, grid):
            calls.append(grid)
            return real[grid]

    monkeypatch.setattr(kernel, "_adamw8bit_kernel", Spy())
    dispatch.configure(force_triton=True)
    params = _make_params(torch.float32, [(4097,), (4100,), (10,), (20,)])
    _run(params, 1)
    assert len(calls) == 2
    assert sorted(calls) == sorted([(5 + 5,), (1 + 1,)])  # tiles of 4 blocks of 256: 17 blocks -> 5 tiles


def _update_metrics(steps: int, shape=(1024, 1024)):
    """Relative error and cosine of AdamW8bit's parameter update against torch.optim.AdamW (fp32)."""
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(shape, generator=gen) * 0.1
    grads = torch.Generator().manual_seed(1)
    p8, p32 = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    opt8 = AdamW8bit([p8], lr=1e-3, weight_decay=0.0)
    opt32 = torch.optim.AdamW([p32], lr=1e-3, weight_decay=0.0, foreach=True)
    for _ in range(steps):
        grad = torch.randn(shape, generator=grads) * 0.01
        p8.grad, p32.grad = grad, grad.clone()
        opt8.step()
        opt32.step()
    d8, d32 = (p8.detach() - p0).flatten(), (p32.detach() - p0).flatten()
    rel = ((d8 - d32).norm() / d32.norm()).item()
    cos = torch.nn.functional.cosine_similarity(d8, d32, dim=0).item()
    return rel, cos


@pytest.mark.slow
def test_tracks_torch_adamw_1024x1024_200_steps(cpu_compile):
    # bitsandbytes AdamW8bit: 0.0232 / 0.99976 here; ours measured 0.0183 / 0.99985 (compiled CPU path)
    rel, cos = _update_metrics(200)
    assert rel <= 0.023
    assert cos >= 0.9998


def test_tracks_torch_adamw_small_fast():
    # same setup on 64x1024 for 60 steps (measured 0.0142 / 0.99990, eager reference); the full problem is slow
    rel, cos = _update_metrics(60, shape=(64, 1024))
    assert rel <= 0.02
    assert cos >= 0.9998


def test_nonfinite_gradient_skips_only_that_tensor():
    params = _make_params(torch.float32, [(4097,), (50,), (300, 20)])
    opt = AdamW8bit(params, lr=1e-2)
    for p in params:
        p.grad = torch.randn(p.shape) * 0.1
    opt.step()
    before = [p.detach().clone() for p in params]
    state_before = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    for i, p in enumerate(params):
        p.grad = torch.randn(p.shape) * 0.1
        if i in (0, 1):
            p.grad.view(-1)[-1] = float("inf") if i == 0 else float("nan")
    opt.step()
    for i in (0, 1):  # skipped: params and every state tensor bit-identical, step not advanced
        assert torch.equal(params[i], before[i])
        for key, value in state_before[i].items():
            assert torch.equal(bits(opt.state[params[i]][key]), bits(value)), key
    assert not torch.equal(params[2], before[2])  # the neighbour in the same step still updates
    assert opt.state[params[2]]["step"].item() == 2.0
    assert opt.skipped_updates == 2
    for p in params:
        p.grad = torch.randn(p.shape) * 0.1
    opt.step()
    assert not torch.equal(params[0], before[0]) and opt.state[params[0]]["step"].item() == 2.0
    assert opt.skipped_updates == 2


def test_matches_plain_adamw_math_on_first_step_and_maximize():
    # step 1 of AdamW is sign-like: m/sqrt(v) = g/|g|; 8-bit state cannot change that
    p = torch.nn.Parameter(torch.randn(64, 80))
    q = torch.nn.Parameter(p.detach().clone())
    p.grad = torch.randn(64, 80)
    q.grad = p.grad.clone()
    AdamW8bit([p], lr=0.1, weight_decay=0.0).step()
    torch.optim.AdamW([q], lr=0.1, weight_decay=0.0).step()
    torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    r = torch.nn.Parameter(torch.zeros(64, 80))
    r.grad = torch.ones(64, 80)
    AdamW8bit([r], lr=0.1, maximize=True).step()
    assert torch.allclose(r.detach(), torch.full_like(r, 0.1), atol=1e-6)


def test_lr_scheduler_takes_effect_next_step():
    params = _make_params(torch.float32, [(4097,), (40,)])
    opt = AdamW8bit(params, lr=1e-2, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: [1.0, 0.0, 1.0][min(step, 2)])
    deltas = []
    for _ in range(3):
        before = [p.detach().clone() for p in params]
        for p in params:
            p.grad = torch.randn(p.shape)
        opt.step()
        sched.step()
        deltas.append(sum((p.detach() - b).abs().sum().item() for p, b in zip(params, before)))
    assert deltas[0] > 0 and deltas[1] == 0.0 and deltas[2] > 0


def test_hyperparameters_are_runtime_kernel_arguments():
    # Triton specializes constexprs (and small-int properties of int args), never float args, so an
    # LR schedule cannot add a compiled variant; only block sizes and mode switches are constexpr
    # (STOCHASTIC is the bf16_rounding mode)
    import inspect

    import triton

    fn = kernel._adamw8bit_kernel.fn  # the Python function, under the interpreter and the compiler alike
    constexprs = {
        name for name, p in inspect.signature(fn).parameters.items() if "constexpr" in str(p.annotation)
    }
    assert constexprs == {"PARAM_DTYPE", "GRAD_DTYPE", "QUANTIZED", "ROWS", "BLOCK", "ALIGNED", "STOCHASTIC"}
    mangled = {triton.runtime.jit.mangle_type(lr) for lr in (1e-3, 3e-4, 0.1, 1.0, 0.0)}
    assert mangled == {"fp32"}


def test_compiled_cpu_path_does_not_recompile_on_lr_change(cpu_compile):
    from torch._dynamo.utils import counters

    params = _make_params(torch.float32, [(4096,), (17, 256)])  # two sizes, one compiled graph
    opt = AdamW8bit(params, lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    def one_step():
        for p in params:
            p.grad = torch.randn(p.shape)
        opt.step()
        sched.step()

    one_step()
    compiled = counters["stats"]["unique_graphs"]
    for _ in range(3):
        one_step()
    assert counters["stats"]["unique_graphs"] == compiled
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 16)


def test_compiled_cpu_path_matches_eager(monkeypatch):
    eager_params = _make_params(torch.float32, [(4097,), (30,)])
    _run(eager_params, 3)
    dispatch.configure(cpu_compile="always")
    compiled_params = _make_params(torch.float32, [(4097,), (30,)])
    _run(compiled_params, 3)
    for a, b in zip(compiled_params, eager_params):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_cpu_path_skips_non_finite_and_matches_eager(monkeypatch, dtype):
    # the compiled CPU step reads the finite flag on the host and has its own scalar handling
    dispatch.configure(cpu_compile="always")
    params = [torch.nn.Parameter(torch.randn(8192, dtype=dtype)) for _ in range(2)]
    opt = AdamW8bit(params, lr=1e-2)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    before = [p.detach().clone() for p in params]
    state_before = {k: v.clone() for k, v in opt.state[params[0]].items()}
    params[0].grad[5] = float("nan")
    params[1].grad = torch.randn_like(params[1])
    opt.step()
    assert torch.equal(params[0], before[0])
    assert all(torch.equal(v, state_before[k]) for k, v in opt.state[params[0]].items())
    assert not torch.equal(params[1], before[1])
    assert opt.skipped_updates == 1
    eager = [torch.nn.Parameter(p.detach().clone()) for p in params]
    dispatch.configure(cpu_compile="never")
    reference = AdamW8bit(eager, lr=1e-2)
    reference.load_state_dict(opt.state_dict())
    for p, q in zip(params, eager):
        g = torch.randn_like(p)
        p.grad, q.grad = g.clone(), g.clone()
    dispatch.configure(cpu_compile="always")
    opt.step()
    dispatch.configure(cpu_compile="never")
    reference.step()
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for p, q in zip(params, eager):
        torch.testing.assert_close(p.float(), q.float(), rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_keep_small_updates(dtype):
    # lr=1e-4 moves a weight of 1.0 by ~1e-4 per step: far below half an ulp of bf16 (2^-8) and of
    # fp16 (2^-11); nearest rounding would lose all of it, stochastic rounding keeps it on average
    p = torch.nn.Parameter(torch.ones(8192, dtype=dtype))
    opt = AdamW8bit([p], lr=1e-4, weight_decay=0.0)
    for _ in range(50):
        p.grad = torch.ones(8192, dtype=dtype)
        opt.step()
    moved = 1.0 - p.detach().float().mean().item()
    assert moved == pytest.approx(50 * 1e-4, rel=0.1)


def test_stochastic_rounding_seed_matches_step_seed():
    for step in (1, 2, 1000, 2**23):
        for index in (0, 3, 977):
            base = step_seed(0, index, 5)
            expected = step_seed(step, index, 5)
            scalars = unpack(kernel.AdamWScalars, pack(kernel.AdamWScalars.of(1e-3, 0.9, 0.999, 1e-8, 0.0, False)))
            _, seed = kernel.step_terms_reference(scalars, torch.tensor(float(step)), torch.tensor(base))
            got = seed.item()
            assert got == expected


def test_state_layout_and_bytes_per_param():
    big = torch.nn.Parameter(torch.zeros(1024, 1024))
    small = torch.nn.Parameter(torch.zeros(100))
    opt = build_optimizer("adamw_8bit", [big, small], lr=1e-3)
    for p in (big, small):
        p.grad = torch.randn(p.shape)
    opt.step()
    state = opt.state[big]
    assert state["exp_avg_codes"].dtype == torch.int8 and state["exp_avg_codes"].shape == (1024 * 1024,)
    assert state["exp_avg_sq_codes"].dtype == torch.uint8
    assert state["exp_avg_absmax"].shape == state["exp_avg_sq_absmax"].shape == (4096,)
    assert state["step"].shape == () and state["step"].dtype == torch.float32
    assert set(opt.state[small]) == {"step", "exp_avg", "exp_avg_sq"}
    assert opt.state[small]["exp_avg"].dtype == torch.float32
    only_big = AdamW8bit([big])
    big.grad = torch.randn(big.shape)
    only_big.step()
    mem = state_memory(only_big)
    assert mem.total_bytes == 2 * 1024 * 1024 + 2 * 4096 * 4 + 4
    assert mem.bytes_per_param <= 2.04
    assert mem.host_bytes == 0


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"lr": -1e-3}, "lr"),
        ({"lr": math.nan}, "lr"),
        ({"betas": (1.0, 0.999)}, "betas[0]"),
        ({"betas": (0.9, -0.1)}, "betas[1]"),
        ({"betas": (0.9,)}, "betas"),
        ({"eps": 0.0}, "eps"),
        ({"weight_decay": -0.1}, "weight_decay"),
    ],
)
def test_invalid_hyperparameters_raise(kwargs, name):
    with pytest.raises(ValueError, match=re.escape(f"Invalid {name}=")):
        AdamW8bit([torch.nn.Parameter(torch.zeros(3))], **kwargs)


def test_invalid_param_dtype_raises():
    with pytest.raises(TypeError, match="float64"):
        AdamW8bit([torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))])
