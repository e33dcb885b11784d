"""Finite gradients of any magnitude: an update whose ``g * g`` (or its row/column/tensor sums) would overflow
fp32 is skipped like an inf/NaN gradient, for every optimizer, param dtype and execution path."""

import pytest
import torch

from lowmem_lightning.optim import build_optimizer

# adamw (torch.optim.AdamW itself) is left out: torch has no skip; it stays finite by its own math
CONFIGS = [
    ("adamw_8bit", {}),
    ("paged_adamw_8bit", {"gpu_budget_bytes": 0}),
    ("adafactor", {}),
    ("adafactor", {"lr": 1e-2, "relative_step": False, "scale_parameter": False, "beta1": 0.9}),
    ("adafactor", {"beta1": 0.9, "momentum_dtype": "int8"}),
    ("came", {"lr": 1e-3}),
    ("came", {"lr": 1e-3, "momentum_dtype": "int8"}),
    ("sgd", {"lr": 0.1}),
    ("sgd", {"lr": 0.1, "momentum": 0.9}),
    ("sgd", {"lr": 0.1, "momentum": 0.9, "momentum_dtype": "int8"}),
]
SHAPES = [(70, 70), (4097,), (9, 13), (4097,)]  # the last one always gets a normal gradient
# three bad steps: each bad tensor sees each kind once (single 1e20, single 3e38, the whole tensor at 1e19)
BAD = [("one", 1e20), ("one", 3e38), ("all", 1e19)]
SCHEDULE = [(0, 2, 1), (1, 0, 2), (2, 1, 0)]


def _config_id(config) -> str:
    name, kwargs = config
    return name + ("[" + ",".join(f"{k}={v}" for k, v in kwargs.items()) + "]" if kwargs else "")


def _bad_grad(param: torch.Tensor, kind: str, value: float) -> torch.Tensor:
    grad = torch.randn_like(param, dtype=torch.float32)
    if kind == "one":
        grad.view(-1)[param.numel() // 2] = value
    else:
        grad.fill_(value)
    return grad.to(param.dtype)  # fp16 grads turn the huge values into inf: covered too


def _states(opt, params):
    return [{k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)} for p in params]


def _assert_all_finite(opt, params) -> None:
    for i, p in enumerate(params):
        assert torch.isfinite(p.detach().float()).all(), f"param {i} not finite"
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                assert torch.isfinite(value).all(), f"param {i} state {key} not finite"


def check_overflow_guard(name: str, kwargs: dict, dtype: torch.dtype) -> None:
    """4 steps: normal, then 3 with a huge finite gradient on params 0-2: those updates are skipped,
    param 3 updates, every value stays finite, and the optimizer reloads its own state dict."""
    params = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in SHAPES]
    opt = build_optimizer(name, params, **kwargs)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    for n_bad, schedule in enumerate(SCHEDULE, start=1):
        before, states = [p.detach().clone() for p in params], _states(opt, params)
        for i, kind_index in enumerate(schedule):
            params[i].grad = _bad_grad(params[i], *BAD[kind_index])
        params[3].grad = torch.randn_like(params[3])
        opt.step()
        for i in range(3):
            assert torch.equal(params[i].data, before[i]), f"bad step {n_bad}: param {i} changed"
            for key, value in states[i].items():
                assert torch.equal(opt.state[params[i]][key], value), f"bad step {n_bad}: param {i} state {key}"
        assert not torch.equal(params[3].data, before[3])
        assert opt.skipped_updates == 3 * n_bad
        _assert_all_finite(opt, params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    _assert_all_finite(opt, params)
    assert float(opt.state[params[0]]["step"]) == 2.0 and float(opt.state[params[3]]["step"]) == 5.0
    fresh = build_optimizer(name, [torch.nn.Parameter(p.detach().clone()) for p in params], **kwargs)
    fresh.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_huge_finite_gradient_is_skipped_eager(config, dtype):
    check_overflow_guard(*config, dtype)


@pytest.mark.slow  # ~15 s of torch.compile per case; the flag is the same one the eager path gets
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_huge_finite_gradient_is_skipped_compiled(config, dtype, cpu_compile):
    check_overflow_guard(*config, dtype)


# the interpreter runs ~100k elements/s: by default one fp32 case per kernel family, the rest marked slow
_TRITON_DEFAULT = {0, 4, 6, 9}  # adamw_8bit, adafactor int8 momentum, came int8 momentum, sgd int8 momentum
TRITON_CASES = [
    pytest.param(config, dtype, id=f"{_config_id(config)}-{dtype}",
                 marks=() if i in _TRITON_DEFAULT and dtype == torch.float32 else pytest.mark.slow)
    for i, config in enumerate(CONFIGS)
    for dtype in (torch.float32, torch.bfloat16, torch.float16)
]


@pytest.mark.parametrize("config, dtype", TRITON_CASES)
def test_huge_finite_gradient_is_skipped_triton(config, dtype, force_triton):
    check_overflow_guard(*config, dtype)


def test_moderate_large_gradient_still_applies():
    """The guard does not skip large gradients whose squares stay in fp32 range (|g| = 1e15 on 4900 elements)."""
    param = torch.nn.Parameter(torch.randn(70, 70))
    opt = build_optimizer("adamw_8bit", [param])
    param.grad = torch.full_like(param, 1e15)
    before = param.detach().clone()
    opt.step()
    assert opt.skipped_updates == 0 and not torch.equal(param.data, before)


def _wide_range_grads(kind: str) -> torch.Tensor:
    """Finite gradients whose squares fit fp32 but whose row statistics span > 2**126: a zero row and column
    next to 1e10 (the zero row's ``vr / mean(vr)`` underflows to 0), or 1e18 next to 1e-10 and 1e-30."""
    if kind == "zero_row":
        g = torch.full((70, 70), 1e10)
        g[3], g[:, 5] = 0.0, 0.0
    else:
        g = torch.full((70, 70), 1e-30)
        g[0, 0], g[1, 1], g[5:9, 10:20] = 1e18, 1e-10, 3e17
    return g


FACTORED = [c for c in CONFIGS if c[0] in ("adafactor", "came")]


@pytest.mark.parametrize("path", ["eager", "triton"])
@pytest.mark.parametrize("kind", ["zero_row", "wide"])
@pytest.mark.parametrize("config", FACTORED, ids=_config_id)
def test_factored_statistics_of_a_wide_range_gradient_stay_finite(config, kind, path, monkeypatch):
    """Adafactor/CAME apply such a gradient (it is not skipped) and every param and state value stays finite
    (the row/column factors are capped where a statistic underflowed; transformers' Adafactor turns NaN)."""
    if path == "triton":
        monkeypatch.setenv("LOWMEM_FORCE_TRITON", "1")
    name, kwargs = config
    param = torch.nn.Parameter(torch.randn(70, 70))
    opt = build_optimizer(name, [param], **kwargs)
    for _ in range(2):
        param.grad = _wide_range_grads(kind)
        opt.step()
    param.grad = torch.randn_like(param)
    opt.step()
    assert opt.skipped_updates == 0
    _assert_all_finite(opt, [param])


@pytest.mark.parametrize("fused", [False, True], ids=["per_tensor", "foreach"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_flag_reduction_is_inf_exactly_when_squares_overflow(dtype, fused):
    """Both forms of the guard's reduction (CPU per tensor, the fused one CUDA uses): inf for inf/NaN, for a
    square above fp32's range and for a sum of squares above it; finite for large gradients that fit."""
    from lowmem_lightning.optim.base import _square_sum_norms

    def grad(fill, one=None):
        g = torch.full((4097,), fill)
        if one is not None:
            g[17] = one
        return g.to(dtype)

    cases = [grad(1.0), grad(1.0, float("nan")), grad(1.0, float("inf")), grad(1.0, 60000.0)]
    expect = [True, False, False, True]
    if dtype != torch.float16:  # fp16 cannot hold the large values (they are inf, caught above)
        cases += [grad(1.0, 1e20), grad(1.0, 3e38), grad(1e19), grad(1e17), grad(1.0, 1.8e19)]
        expect += [False, False, False, True, True]
    flags = _square_sum_norms(cases, fused).isfinite().tolist()
    assert flags == expect
