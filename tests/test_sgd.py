"""SGD: equality with torch.optim.SGD, 8-bit momentum, Triton kernel == reference, state dicts, guards."""

import copy
import re

import pytest
import torch

from lowmem_lightning.kernels import dispatch
from lowmem_lightning.kernels.codec import BLOCK_SIZE, MIN_QUANTIZED_NUMEL
from lowmem_lightning.kernels.rounding import index_seed_reference as sgd_seed_reference
from lowmem_lightning.kernels.rounding import step_seed
from lowmem_lightning.kernels.sgd import SGD_FAMILY, SGDScalars, SGDTensors, sgd_reference
from lowmem_lightning.optim import build_optimizer, state_memory
from lowmem_lightning.optim.sgd import SGD

SETTINGS = [
    dict(),
    dict(weight_decay=0.01),
    dict(maximize=True, weight_decay=0.1),
    dict(momentum=0.9),
    dict(momentum=0.9, weight_decay=0.05),
    dict(momentum=0.9, nesterov=True),
    dict(momentum=0.8, nesterov=True, weight_decay=0.01, maximize=True),
    dict(momentum=0.5, dampening=0.3),
    dict(momentum=0.99, dampening=0.9, weight_decay=1e-3),
]
SHAPES = [(64, 129), (257,), (5, 3, 7)]


def _grads(shapes, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) * 0.3 for s in shapes] for _ in range(steps)]


def _run(opt_factory, params0, grads):
    params = [torch.nn.Parameter(p.clone()) for p in params0]
    opt = opt_factory(params)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.to(p.dtype, copy=True)
        opt.step()
    return params, opt


@pytest.mark.parametrize("kwargs", SETTINGS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "plain")
def test_matches_torch_sgd(kwargs):
    params0 = [torch.randn(s) for s in SHAPES]
    grads = _grads(SHAPES, 25)
    ours, _ = _run(lambda ps: SGD(ps, lr=0.05, **kwargs), params0, grads)
    ref, _ = _run(lambda ps: torch.optim.SGD(ps, lr=0.05, **kwargs), params0, grads)
    for a, b in zip(ours, ref):
        # only fp32 rounding-order differences (torch fuses add-with-alpha into an FMA on CPU)
        torch.testing.assert_close(a.data, b.data, rtol=2e-6, atol=2e-6)


def test_matches_torch_sgd_with_param_groups_and_lr_change():
    params0 = [torch.randn(s) for s in SHAPES]
    grads = _grads(SHAPES, 20)

    def groups(ps):
        return [dict(params=ps[:1], momentum=0.9, nesterov=True), dict(params=ps[1:], lr=0.2, weight_decay=0.1)]

    def run(cls, **extra):
        params = [torch.nn.Parameter(p.clone()) for p in params0]
        opt = cls(groups(params), lr=0.05, momentum=0.5, **extra)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.to(p.dtype, copy=True)
            opt.step()
            sched.step()
        return params

    for a, b in zip(run(SGD), run(torch.optim.SGD)):
        torch.testing.assert_close(a.data, b.data, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("kwargs", [dict(momentum=0.9), dict(momentum=0.9, nesterov=True, weight_decay=0.01)])
def test_int8_momentum_close_to_fp32(kwargs):
    shapes = [(96, 100), (33,)]  # 9600 elements quantized, 33 kept fp32
    params0 = [torch.randn(s) * 0.1 for s in shapes]
    grads = _grads(shapes, 30)
    ours, opt = _run(lambda ps: SGD(ps, lr=0.01, momentum_dtype="int8", **kwargs), params0, grads)
    ref, _ = _run(lambda ps: torch.optim.SGD(ps, lr=0.01, **kwargs), params0, grads)
    state = opt.state[ours[0]]
    assert state["momentum_codes"].dtype == torch.int8 and "momentum_buffer" not in state
    assert opt.state[ours[1]]["momentum_buffer"].dtype == torch.float32
    d_ref = ref[0].data - params0[0]
    d_ours = ours[0].data - params0[0]
    rel = ((d_ours - d_ref).norm() / d_ref.norm()).item()
    cos = torch.nn.functional.cosine_similarity(d_ours.flatten(), d_ref.flatten(), dim=0).item()
    assert rel < 0.02 and cos > 0.9998, (rel, cos)
    torch.testing.assert_close(ours[1].data, ref[1].data, rtol=2e-6, atol=2e-6)


def _kernel_inputs(n, param_dtype, grad_dtype, mode, step_value, flag_value=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    param = torch.randn(n, generator=gen).to(param_dtype)
    grad = (torch.randn(n, generator=gen) * 0.5).to(grad_dtype)
    buf = absmax = None
    if mode == "fp32":
        buf = torch.randn(n, generator=gen) * 0.2
    elif mode == "int8":
        buf = torch.randint(-127, 128, (n,), dtype=torch.int8, generator=gen)
        absmax = torch.rand((n + BLOCK_SIZE - 1) // BLOCK_SIZE, generator=gen)
    return param, grad, buf, absmax, torch.tensor(step_value), torch.tensor(flag_value)


def _sgd_update(*tensors, **hp):
    """One dispatched SGD step over per-tensor lists (the order of :class:`SGDTensors`)."""
    dispatch.dispatch(SGD_FAMILY, SGDTensors(*tensors), SGDScalars.of(**hp))


HP = dict(lr=0.1, weight_decay=0.01, momentum=0.9, dampening=0.1, nesterov=False, maximize=True, tensor_index=3)


@pytest.mark.parametrize("mode", ["none", "fp32", "int8"])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1000, 4097])
def test_triton_kernel_matches_reference(force_triton, mode, param_dtype, n):
    grad_dtype = torch.bfloat16 if param_dtype == torch.float32 else param_dtype
    for step_value in (1.0, 7.0):  # 1: the tensor's first update (the counter already counts it)
        hp = dict(HP, nesterov=step_value > 1, dampening=0.0 if step_value > 1 else 0.1)
        param, grad, buf, absmax, step, flag = _kernel_inputs(n, param_dtype, grad_dtype, mode, step_value)
        index = hp.pop("tensor_index")
        want_p, want_buf, want_absmax = sgd_reference(param, grad, buf, absmax, step, flag, SGDScalars.of(**hp), index)
        _sgd_update([param], [grad], [buf], [absmax], [step], [flag], [index], **hp)
        assert torch.equal(param, want_p)
        if mode == "fp32":
            assert torch.equal(buf, want_buf)
        if mode == "int8":
            torch.testing.assert_close(absmax, want_absmax, rtol=0, atol=0)
            # identical fp32 operations on both sides: the stored codes agree exactly
            assert torch.equal(buf, want_buf)


@pytest.mark.parametrize("mode", ["fp32", "int8"])
def test_triton_kernel_skips_non_finite_flag(force_triton, mode):
    param, grad, buf, absmax, step, flag = _kernel_inputs(4097, torch.bfloat16, torch.float32, mode, 3.0, 0.0)
    before = [t.clone() for t in (param, buf, absmax) if t is not None]
    hp = dict(HP)
    _sgd_update([param], [grad], [buf], [absmax], [step], [flag], [hp.pop("tensor_index")], **hp)
    after = [t for t in (param, buf, absmax) if t is not None]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_seed_matches_step_seed():
    for step, index in [(0, 0), (5, 3), (123456, 999)]:
        assert int(sgd_seed_reference(torch.tensor(float(step)), index)) == step_seed(step, index)


def test_optimizer_on_triton_matches_cpu_path(force_triton, monkeypatch):
    shapes = [(40, 111), (17,), (4097,), (65, 70)]  # three 8-bit tensors share one launch, one fp32
    params0 = [torch.randn(s).to(torch.bfloat16) for s in shapes]
    grads = _grads(shapes, 3)
    kwargs = dict(lr=0.05, momentum=0.9, momentum_dtype="int8", weight_decay=0.01)
    triton_params, _ = _run(lambda ps: SGD(ps, **kwargs), params0, grads)
    dispatch.configure(force_triton=False)
    cpu_params, _ = _run(lambda ps: SGD(ps, **kwargs), params0, grads)
    for a, b in zip(triton_params, cpu_params):
        assert torch.equal(a.data, b.data)


def test_bf16_params_stochastic_rounding_keeps_small_updates():
    p0 = torch.ones(8192, dtype=torch.bfloat16)
    param = torch.nn.Parameter(p0.clone())
    opt = SGD([param], lr=1e-4)
    for _ in range(20):
        param.grad = torch.ones_like(param)
        opt.step()
    # 20 steps of 1e-4 = 2e-3 < half a bf16 ulp at 1.0 (3.9e-3): nearest rounding would lose all of it
    mean = param.data.float().mean().item()
    assert abs(mean - (1.0 - 2e-3)) < 3e-4, mean


@pytest.mark.parametrize("momentum_dtype", ["float32", "int8"])
def test_state_dict_round_trip_is_bit_exact(momentum_dtype):
    shapes = [(80, 70), (50,)]
    params0 = [torch.randn(s) for s in shapes]
    params0[0] = params0[0].to(torch.bfloat16)
    grads = _grads(shapes, 12)
    kwargs = dict(lr=0.05, momentum=0.9, dampening=0.1, momentum_dtype=momentum_dtype)
    full, _ = _run(lambda ps: SGD(ps, **kwargs), params0, grads)

    half, opt = _run(lambda ps: SGD(ps, **kwargs), params0, grads[:6])
    saved = copy.deepcopy(opt.state_dict())
    resumed = [torch.nn.Parameter(p.data.clone()) for p in half]
    opt2 = SGD(resumed, **kwargs)
    opt2.load_state_dict(saved)
    for step_grads in grads[6:]:
        for p, g in zip(resumed, step_grads):
            p.grad = g.to(p.dtype, copy=True)
        opt2.step()
    for a, b in zip(full, resumed):
        assert torch.equal(a.data, b.data)
    assert opt2.state[resumed[0]]["step"].item() == 12


def test_loads_torch_sgd_state_dict_and_switches_momentum_dtype():
    shapes = [(64, 80), (30,)]
    params0 = [torch.randn(s) for s in shapes]
    grads = _grads(shapes, 10)
    ref, ref_opt = _run(lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, dampening=0.2), params0, grads[:5])
    ours = [torch.nn.Parameter(p.data.clone()) for p in ref]
    opt = SGD(ours, lr=0.05, momentum=0.9, dampening=0.2)
    opt.load_state_dict(ref_opt.state_dict())
    for step_grads in grads[5:]:
        for a, b, g in zip(ref, ours, step_grads):
            a.grad, b.grad = g.clone(), g.clone()
        ref_opt.step()
        opt.step()
    for a, b in zip(ref, ours):
        torch.testing.assert_close(a.data, b.data, rtol=2e-6, atol=2e-6)
    # fp32 -> int8: the big buffer is quantized, the small one stays fp32
    opt8 = SGD([torch.nn.Parameter(p.data.clone()) for p in ours], lr=0.05, momentum=0.9, momentum_dtype="int8")
    opt8.load_state_dict(opt.state_dict())
    states = list(opt8.state.values())
    assert states[0]["momentum_codes"].numel() == 64 * 80 and "momentum_buffer" in states[1]


def test_rejects_mismatched_state_dict():
    opt = SGD([torch.nn.Parameter(torch.randn(10, 10))], momentum=0.9)
    bad = {"state": {0: {"step": torch.tensor(1.0), "momentum_buffer": torch.zeros(5)}},
           "param_groups": opt.state_dict()["param_groups"]}
    with pytest.raises(ValueError, match="momentum_buffer"):
        opt.load_state_dict(bad)


def test_non_finite_gradient_skips_tensor_update():
    a, b = torch.nn.Parameter(torch.randn(70, 80)), torch.nn.Parameter(torch.randn(30))
    opt = SGD([a, b], lr=0.1, momentum=0.9, momentum_dtype="int8")
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    opt.step()
    a0, b0 = a.data.clone(), b.data.clone()
    codes0 = opt.state[a]["momentum_codes"].clone()
    bad = torch.randn_like(a)
    bad[3, 4] = float("nan")
    a.grad, b.grad = bad, torch.randn_like(b)
    opt.step()
    assert torch.equal(a.data, a0) and torch.equal(opt.state[a]["momentum_codes"], codes0)
    assert not torch.equal(b.data, b0)
    assert opt.skipped_updates == 1
    assert opt.state[a]["step"].item() == 1 and opt.state[b]["step"].item() == 2


def test_state_memory_and_registry():
    big, small = torch.nn.Parameter(torch.randn(128, 256)), torch.nn.Parameter(torch.randn(100))
    for p in (big, small):
        p.grad = torch.randn_like(p)
    opt = build_optimizer("sgd", [big, small], lr=0.1, momentum=0.9, momentum_dtype="int8")
    assert isinstance(opt, SGD)
    opt.step()
    n = big.numel()
    expected = n + 4 * (n // BLOCK_SIZE) + 4 * small.numel() + 2 * 4  # codes + scales + fp32 buffer + steps
    assert state_memory(opt).total_bytes == expected
    assert MIN_QUANTIZED_NUMEL > small.numel()
    opt32 = SGD([torch.nn.Parameter(torch.randn(128, 256))], momentum=0.9)
    opt32.param_groups[0]["params"][0].grad = torch.randn(128, 256)
    opt32.step()
    assert state_memory(opt32).total_bytes == 4 * n + 4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1.0), "lr"),
        (dict(momentum=-0.1), "momentum"),
        (dict(dampening=-1.0), "dampening"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(nesterov=True), "Nesterov momentum requires a momentum and zero dampening"),
        (dict(nesterov=True, momentum=0.9, dampening=0.1), "Nesterov momentum requires"),
        (dict(momentum_dtype="int4"), "momentum_dtype"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SGD([torch.nn.Parameter(torch.randn(3))], **kwargs)


@pytest.mark.parametrize(
    "kwargs, torch_regex, ours",
    [  # torch's regexes: optim_error_inputs_func_sgd / get_error_inputs_for_all_optims and torch.optim.SGD itself
        (dict(lr=1e-2, momentum=-0.5), "Invalid momentum value: -0.5", r"momentum=-0.5: expected a finite number >= 0"),
        (dict(weight_decay=-0.5), "Invalid weight_decay value: -0.5", r"weight_decay=-0.5: expected a finite number"),
        (dict(lr=-1.0), "Invalid learning rate: -1.0", r"lr=-1.0: expected a finite number >= 0"),
        (dict(lr=torch.tensor([0.001, 0.001])), "Tensor lr must be 1-element", r"lr has 2 elements"),
        (dict(nesterov=True), "Nesterov momentum requires a momentum and zero dampening", r"momentum=0.0"),
    ],
    ids=["momentum", "weight_decay", "lr", "tensor_lr", "nesterov"],
)
def test_refusals_contain_torch_sgd_wording_and_ours(kwargs, torch_regex, ours):
    """SGD promises torch.optim.SGD's errors: each refusal holds torch's own words (so torch's OptimizerInfo
    error regexes match) and ours (argument, value, what is allowed), at construction and in a new group."""
    with pytest.raises(ValueError, match=torch_regex) as theirs:
        torch.optim.SGD([torch.nn.Parameter(torch.randn(3))], **kwargs)
    for build in (
        lambda: SGD([torch.nn.Parameter(torch.randn(3))], **kwargs),
        lambda: SGD([torch.nn.Parameter(torch.randn(3))]).add_param_group(
            {"params": [torch.nn.Parameter(torch.randn(3))], **kwargs}),
    ):
        with pytest.raises(ValueError, match=torch_regex) as info:
            build()
        assert str(theirs.value) in str(info.value)
        assert re.search(ours, str(info.value)), str(info.value)


def test_invalid_param_group_is_rejected():
    opt = SGD([torch.nn.Parameter(torch.randn(3))], lr=0.1)
    with pytest.raises(ValueError, match="momentum"):
        opt.add_param_group(dict(params=[torch.nn.Parameter(torch.randn(3))], momentum=-1.0))
    assert len(opt.param_groups) == 1
    with pytest.raises(TypeError, match="nesterov"):
        SGD([torch.nn.Parameter(torch.randn(3))], nesterov="yes")


@pytest.mark.slow  # torch.compile of the CPU path: ~25 s on 2 shared cores
def test_compiled_cpu_path_matches_eager(cpu_compile):
    shapes = [(40, 130), (9,)]
    params0 = [torch.randn(s) for s in shapes]
    grads = _grads(shapes, 4)
    kwargs = dict(lr=0.05, momentum=0.9, momentum_dtype="int8", nesterov=True)
    compiled, _ = _run(lambda ps: SGD(ps, **kwargs), params0, grads)
    ref, _ = _run(lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True), params0, grads)
    torch.testing.assert_close(compiled[1].data, ref[1].data, rtol=1e-5, atol=1e-5)
    rel = ((compiled[0].data - ref[0].data).norm() / (ref[0].data - params0[0]).norm()).item()
    assert rel < 0.02


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_8bit_momentum_cpu_path_equals_eager(monkeypatch, nesterov, dtype):
    # the compiled CPU step of 8-bit momentum reads the finite flag and the step on the host
    def run(mode):
        dispatch.configure(cpu_compile={"0": "never", "1": "always"}.get(mode, mode))
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(64, 256, dtype=dtype)) for _ in range(2)]
        opt = SGD(params, lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=0.01, momentum_dtype="int8")
        g = torch.Generator().manual_seed(1)
        for k in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).to(dtype)
            if k == 2:
                params[0].grad[0, 0] = float("nan")
            opt.step()
        return params, opt

    eager, eager_opt = run("0")
    compiled, compiled_opt = run("1")
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b.float(), a.float(), rtol=0, atol=1e-6)
    assert eager_opt.skipped_updates == compiled_opt.skipped_updates == 1


def test_dispatch_choice_is_explicit_and_scoped():
    # one function decides from (device, size, the caller's choice); overrides are scoped
    from lowmem_lightning.kernels import dispatch

    base = dispatch.settings()
    assert dispatch.choose("cpu", 10, eager=True) == "eager"
    with dispatch.override(cpu_compile="always"):
        assert dispatch.choose("cpu", 10) == "compiled"
        assert dispatch.choose("cpu", 10, eager=True) == "eager"
        with dispatch.override(force_triton=True):
            assert dispatch.choose("cpu", 10) == "triton"
    with dispatch.override(cpu_compile="auto", compile_min_numel=100):
        assert dispatch.choose("cpu", 99) == "eager"
        assert dispatch.choose("cpu", 100) == "compiled"
    assert dispatch.settings() == base
    assert dispatch.choose("cuda", 10) == "triton"
    assert dispatch.DispatchSettings.from_env({"LOWMEM_CPU_COMPILE": "0"}).cpu_compile == "never"
    with pytest.raises(ValueError, match="cpu_compile='sometimes'"):
        dispatch.configure(cpu_compile="sometimes")
