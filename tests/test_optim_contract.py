"""torch.optim's generic optimizer contract, run over every registered optimizer.

A port of the behaviours torch checks for every optimizer (``torch.testing._internal.common_optimizers``
OptimizerInfo sample/error inputs and ``test/test_optim.py``): state-dict round trips (also through
``torch.load(weights_only=True)``), step / state-dict / load-state-dict hooks, closures, ``zero_grad``,
param groups, params without grads, named params, ``maximize``, tensor ``lr``, LR schedulers, deepcopy and
pickle, error inputs, dtype refusal, sparse gradients, torch's implementation switches; and for ours the
strict state-dict checks. ``adamw`` (torch's own class) runs the generic points as a control; points that
test our additions skip it with the reason.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

from lowmem_lightning.optim import available_optimizers, build_optimizer, optimizer_class

NAMES = available_optimizers()
OURS = [n for n in NAMES if n != "adamw"]
TORCH_ONLY = "adamw is torch.optim.AdamW itself: the point tests an addition of ours"

KWARGS = {  # small lr-driven settings for each registered name
    "adamw": dict(lr=1e-2),
    "adamw_8bit": dict(lr=1e-2),
    "adamw_4bit": dict(lr=1e-2),
    "paged_adamw_8bit": dict(lr=1e-2, gpu_budget_bytes=0),
    "sgd": dict(lr=1e-2, momentum=0.9),
    # no beta1 here: transformers' Adafactor keeps lr-scaled updates in its momentum, so lr=0 still moves
    "adafactor": dict(lr=1e-2, relative_step=False, scale_parameter=False),
    "came": dict(lr=1e-2),
    "lion": dict(lr=1e-3, weight_decay=0.1),
    "lion_8bit": dict(lr=1e-3, weight_decay=0.1),
    "ademamix": dict(lr=1e-2),
    "ademamix_8bit": dict(lr=1e-2, t_alpha=3, t_beta3=3),
    "muon": dict(lr=1e-2),  # (70, 70) and (5, 3) take Muon, (4097,) 8-bit AdamW: the hybrid in one optimizer
    "muon_8bit": dict(lr=1e-2),
}
VARIANTS = [(n, KWARGS[n]) for n in NAMES] + [  # + the other storage forms
    ("sgd", dict(lr=1e-2, momentum=0.9, momentum_dtype="int8", nesterov=True)),
    ("adafactor", dict(lr=1e-2, relative_step=False, beta1=0.9)),
    ("adafactor", dict(beta1=0.9, momentum_dtype="int8")),  # relative step, parameter scale
    ("adafactor", dict()),  # no momentum
    ("came", dict(lr=1e-2, momentum_dtype="int8", weight_decay=0.01)),
    ("muon", dict(lr=1e-2, nesterov=False, adjust_lr_fn="match_rms_adamw")),
]
SHAPES = [(70, 70), (4097,), (5, 3)]  # 8-bit state, 8-bit 1-D, fp32 (small) state


def _vid(variant) -> str:
    name, kwargs = variant
    return name + ("[" + ",".join(f"{k}={v}" for k, v in kwargs.items()) + "]" if kwargs else "")


def _params(shapes=SHAPES, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _grads(params, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen) for p in params]


def _step(opt, params, seed: int) -> None:
    for p, g in zip(params, _grads(params, seed)):
        p.grad = g
    opt.step()


def _kwargs(name: str) -> dict:
    return dict(KWARGS[name])


def _flat_keys(sd: dict):
    return (
        sorted((pid, sorted(s)) for pid, s in sd["state"].items()),
        [sorted(g) for g in sd["param_groups"]],
    )


# ---------------------------------------------------------------------------------------------- state dicts
@pytest.mark.parametrize("variant", VARIANTS, ids=_vid)
def test_state_dict_round_trip_through_weights_only_load(variant):
    """2 steps, save (torch.save), torch.load(weights_only=True) into a fresh optimizer: both step bit-identically,
    and the loaded optimizer's state_dict has the same keys as the saved one."""
    name, kwargs = variant
    params = _params()
    opt = build_optimizer(name, params, **kwargs)
    for seed in (1, 2):
        _step(opt, params, seed)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = build_optimizer(name, twins, **kwargs)
    opt2.load_state_dict(loaded)
    assert _flat_keys(opt2.state_dict()) == _flat_keys(opt.state_dict())
    assert sorted(opt2.defaults) == sorted(build_optimizer(name, _params(), **kwargs).defaults)
    for seed in (3, 4):
        _step(opt, params, seed)
        _step(opt2, twins, seed)
    for a, b in zip(params, twins):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_load_state_dict_keeps_key_set_and_reload_of_own_dict(name):
    """A load of the optimizer's own state dict changes no key, in the groups or in the defaults."""
    params = _params()
    opt = build_optimizer(name, params, **_kwargs(name))
    _step(opt, params, 1)
    keys, defaults = _flat_keys(opt.state_dict()), sorted(opt.defaults)
    opt.load_state_dict(opt.state_dict())
    assert _flat_keys(opt.state_dict()) == keys
    if name != "adamw":  # torch adds `differentiable` to AdamW's defaults on load; we do not
        assert sorted(opt.defaults) == defaults


@pytest.mark.parametrize("name", OURS)
def test_older_state_dict_without_newer_group_keys_gets_defaults(name):
    """A state dict missing group keys added later (maximize, momentum_dtype, weight_decay) loads with our defaults."""
    params = _params()
    opt = build_optimizer(name, params, **_kwargs(name))
    _step(opt, params, 1)
    sd = copy.deepcopy(opt.state_dict())
    for key in ("maximize", "momentum_dtype", "weight_decay"):
        sd["param_groups"][0].pop(key, None)
    fresh_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = build_optimizer(name, fresh_params, **_kwargs(name))
    fresh.load_state_dict(sd)
    assert _flat_keys(fresh.state_dict()) == _flat_keys(opt.state_dict())
    for key, value in fresh.defaults.items():
        if key in ("maximize", "momentum_dtype", "weight_decay"):
            assert fresh.param_groups[0][key] == value
    _step(fresh, fresh_params, 2)


FAMILIES = {  # one representative per state format; adamw_8bit and paged share one format
    "adamw_8bit": dict(lr=1e-2),
    "sgd": dict(lr=1e-2, momentum=0.9),
    "adafactor": dict(lr=1e-2, relative_step=False, beta1=0.9),
    "came": dict(lr=1e-2),
}


@pytest.mark.parametrize("target", list(FAMILIES))
@pytest.mark.parametrize("source", list(FAMILIES))
def test_another_optimizers_state_dict_is_refused_naming_both(source, target):
    if source == target:
        pytest.skip("same optimizer: covered by the round trips")
    params = _params()
    opt = build_optimizer(source, params, **FAMILIES[source])
    _step(opt, params, 1)
    dest = build_optimizer(target, [torch.nn.Parameter(p.detach().clone()) for p in params], **FAMILIES[target])
    with pytest.raises(ValueError) as info:
        dest.load_state_dict(opt.state_dict())
    message = str(info.value)
    assert type(dest).__name__ in message and type(opt).__name__ in message, message
    assert not dest.state  # unchanged


def test_came_state_dict_into_adafactor_is_refused_even_with_matching_group_keys():
    """The per-param key set alone tells CAME's state from Adafactor's (extra exp_avg_res_* keys)."""
    params = _params()
    came = build_optimizer("came", params, lr=1e-2)
    _step(came, params, 1)
    ada = build_optimizer("adafactor", [torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2,
                          relative_step=False, beta1=0.9)
    sd = came.state_dict()
    sd["param_groups"] = ada.state_dict()["param_groups"]
    with pytest.raises(ValueError, match=r"param 0 .*unexpected \['exp_avg_res_col', 'exp_avg_res_row'\]"):
        ada.load_state_dict(sd)


def _corrupt_cases(name: str, state: dict):
    """(key, bad value, message) for finite but impossible values of one param's state."""
    step = state["step"]
    yield "step", step * 0 - 5, "negative"
    yield "step", step * 0 + 2.5, "whole number"
    yield "step", torch.tensor(float("nan")), "inf or NaN"
    for key, value in state.items():
        if key.endswith("_absmax"):
            yield key, -value.abs() - 1, "negative"
            yield key, value + float("inf"), "inf or NaN"
        if key.endswith("_codes"):
            yield key, value.to(torch.int16), "expected torch"
            yield key, value[:-1], "expected torch"
        if key.startswith("exp_avg_sq") and not key.endswith(("_codes", "_absmax")):
            yield key, value * 0 - 1, "negative"


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v[0] != "adamw"], ids=_vid)
def test_finite_but_invalid_state_values_are_refused_naming_param_and_key(variant):
    name, kwargs = variant
    params = _params()
    opt = build_optimizer(name, params, **kwargs)
    _step(opt, params, 1)
    good = opt.state_dict()
    cases = list(_corrupt_cases(name, good["state"][0]))
    assert len(cases) >= 3
    for key, bad, message in cases:
        sd = copy.deepcopy(good)
        sd["state"][0][key] = bad
        with pytest.raises(ValueError, match=message) as info:
            opt.load_state_dict(sd)
        assert "param 0" in str(info.value) and repr(key) in str(info.value), str(info.value)
    extra = copy.deepcopy(good)
    extra["state"][0]["max_exp_avg_sq"] = torch.zeros(3)
    with pytest.raises(ValueError, match="max_exp_avg_sq"):
        opt.load_state_dict(extra)
    opt.load_state_dict(good)  # still loads its own


@pytest.mark.parametrize("name", OURS)
def test_load_refuses_invalid_group_hyperparameters(name):
    params = _params()
    opt = build_optimizer(name, params, **_kwargs(name))
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["lr"] = -1.0
    if name == "adafactor":
        sd["param_groups"][0]["relative_step"] = False
    with pytest.raises(ValueError, match="param group 0.*lr"):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == _kwargs(name)["lr"]


# ---------------------------------------------------------------------------------------------- hooks, closures
@pytest.mark.parametrize("name", NAMES)
def test_step_hooks_run_once_per_step_and_can_be_removed(name):
    params = _params()
    opt = build_optimizer(name, params, **_kwargs(name))
    calls = []
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    post = opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    _step(opt, params, 1)
    assert calls == ["pre", "post"]
    pre.remove()
    post.remove()
    _step(opt, params, 2)
    assert calls == ["pre", "post"]


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_and_load_state_dict_hooks(name):
    params = _params()
    opt = build_optimizer(name, params, **_kwargs(name))
    _step(opt, params, 1)
    seen = []
    opt.register_state_dict_pre_hook(lambda o: seen.append("sd_pre"))

    def post(o, sd):
        sd["extra_note"] = 1
        return sd

    opt.register_state_dict_post_hook(post)
    sd = opt.state_dict()
    assert seen == ["sd_pre"] and sd["extra_note"] == 1

    def load_pre(o, sd):
        sd = dict(sd)
        sd.pop("extra_note")
        seen.append("load_pre")
        return sd

    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(lambda o: seen.append("load_post"))
    opt.load_state_dict(sd)
    assert seen == ["sd_pre", "load_pre", "load_post"]


@pytest.mark.parametrize("name", NAMES)
def test_closure_runs_once_and_step_returns_its_loss(name):
    params = _params()
    opt = build_optimizer(name, params, **_kwargs(name))
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = sum((p * p).sum() for p in params)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert len(calls) == 1 and isinstance(loss, torch.Tensor) and loss.ndim == 0
    assert opt.step() is None


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_zero_grad(name, set_to_none):
    params = _params()
    opt = build_optimizer(name, params, **_kwargs(name))
    _step(opt, params, 1)
    opt.zero_grad(set_to_none=set_to_none)
    for p in params:
        assert p.grad is None if set_to_none else torch.count_nonzero(p.grad) == 0


# ---------------------------------------------------------------------------------------------- groups and grads
@pytest.mark.parametrize("name", NAMES)
def test_param_groups_with_their_own_lr_and_params_without_grad(name):
    """A group with lr=0 does not move (no weight decay either: it is scaled by lr); a param without a grad
    gets no state and does not move; the other group moves."""
    a, b, c = _params()
    kwargs = _kwargs(name)
    opt = build_optimizer(name, [{"params": [a, c]}, {"params": [b], "lr": 0.0}], **kwargs)
    before = [t.detach().clone() for t in (a, b, c)]
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    opt.step()
    assert not torch.equal(a, before[0])
    assert torch.equal(b, before[1])
    assert torch.equal(c, before[2]) and c not in opt.state


@pytest.mark.parametrize("name", NAMES)
def test_named_parameters(name):
    model = torch.nn.Sequential(torch.nn.Linear(70, 70), torch.nn.Linear(70, 3))
    opt = build_optimizer(name, model.named_parameters(), **_kwargs(name))
    model(torch.randn(4, 70)).sum().backward()
    opt.step()
    sd = opt.state_dict()
    assert sd["param_groups"][0]["param_names"] == [n for n, _ in model.named_parameters()]
    opt.load_state_dict(sd)


@pytest.mark.parametrize("name", NAMES)
def test_minimizes_a_quadratic(name):
    """torch's 'goes right direction': 30 steps on ||W x - y||^2 lower the loss."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(70, 70) * 0.1)
    x, y = torch.randn(70, 8), torch.randn(70, 8)
    opt = build_optimizer(name, [w], **_kwargs(name))
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = ((w @ x - y) ** 2).mean()
        loss.backward()
        first = float(loss.detach()) if first is None else first
        opt.step()
    assert float(((w @ x - y) ** 2).mean()) < first


@pytest.mark.parametrize("name", NAMES)
def test_maximize_equals_minimizing_the_negated_gradient(name):
    up, down = _params(), _params()
    opt_up = build_optimizer(name, up, maximize=True, **_kwargs(name))
    opt_down = build_optimizer(name, down, **_kwargs(name))
    for seed in (1, 2, 3):
        grads = _grads(up, seed)
        for p, q, g in zip(up, down, grads):
            p.grad, q.grad = g.clone(), -g
        opt_up.step()
        opt_down.step()
        for p, g in zip(up, grads):
            assert torch.equal(p.grad, g)  # the gradient is given back unchanged
    for p, q in zip(up, down):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", [n for n in OURS if n not in ("adamw_8bit", "paged_adamw_8bit", "sgd")])
def test_maximize_in_a_param_group(name):
    a, b = _params()[:2], _params()[:2]
    opt_a = build_optimizer(name, [{"params": a, "maximize": True}], **_kwargs(name))
    opt_b = build_optimizer(name, b, maximize=True, **_kwargs(name))
    for p, q, g in zip(a, b, _grads(a, 1)):
        p.grad, q.grad = g.clone(), g.clone()
    opt_a.step()
    opt_b.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", NAMES)
def test_tensor_lr_steps_as_float_lr(name):
    floats, tensors = _params(), _params()
    kwargs = _kwargs(name)
    opt_f = build_optimizer(name, floats, **kwargs)
    opt_t = build_optimizer(name, tensors, **{**kwargs, "lr": torch.tensor(kwargs["lr"])})
    for seed in (1, 2):
        _step(opt_f, floats, seed)
        _step(opt_t, tensors, seed)
    tolerance = 1e-6 if name == "adamw" else 0.0  # torch's AdamW takes another code path for a tensor lr
    for p, q in zip(floats, tensors):
        torch.testing.assert_close(p, q, rtol=tolerance, atol=tolerance)


SCHEDULERS = {
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
    "LambdaLR": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 / (epoch + 1)),
    "ReduceLROnPlateau": lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0),
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=6,
                                                                  cycle_momentum=False),
}


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("name", NAMES)
def test_lr_schedulers_drive_the_step_size(name, scheduler):
    """Each scheduler changes group['lr'] and the step uses it: a step after a scheduler-set lr=0 moves nothing."""
    params = _params()
    opt = build_optimizer(name, params, **_kwargs(name))
    sched = SCHEDULERS[scheduler](opt)
    lrs = []
    for seed in range(4):
        _step(opt, params, seed)
        sched.step(1.0) if scheduler == "ReduceLROnPlateau" else sched.step()
        lrs.append(float(opt.param_groups[0]["lr"]))
    assert len(set(lrs)) > 1, lrs
    opt.param_groups[0]["lr"] = 0.0
    before = [p.detach().clone() for p in params]
    _step(opt, params, 9)
    for p, b in zip(params, before):
        assert torch.equal(p, b)


# ---------------------------------------------------------------------------------------------- copies
def _twin_step(opt, twin, params, twin_params, seeds) -> None:
    for seed in seeds:
        _step(opt, params, seed)
        _step(twin, twin_params, seed)
    for a, b in zip(params, twin_params):
        assert a is not b and torch.equal(a, b)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("variant", VARIANTS, ids=_vid)
def test_deepcopy_and_pickle_step_bit_identically(variant, how):
    """A copy of a stepped optimizer (its own copies of the params) steps exactly as the original; every
    public attribute survives (paged: gpu_budget_bytes)."""
    name, kwargs = variant
    params = _params()
    opt = build_optimizer(name, params, **kwargs)
    _step(opt, params, 1)
    twin = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    public = {k: v for k, v in vars(opt).items() if not k.startswith("_")}
    assert {k: v for k, v in vars(twin).items() if not k.startswith("_")}.keys() == public.keys()
    if name == "paged_adamw_8bit":
        assert twin.gpu_budget_bytes == opt.gpu_budget_bytes == 0
    _twin_step(opt, twin, params, twin_params, (2, 3))
    if name != "adamw":  # torch's AdamW has no skip counter
        assert twin.skipped_updates == opt.skipped_updates


# ---------------------------------------------------------------------------------------------- errors
ERROR_INPUTS = {  # name -> [(kwargs, exception, message)], after torch's OptimizerInfo error inputs
    "adamw_8bit": [
        (dict(lr=-1e-2), ValueError, "lr"),
        (dict(lr=float("nan")), ValueError, "lr"),
        (dict(betas=(1.0, 0.0)), ValueError, r"betas\[0\]"),
        (dict(betas=(0.9, -0.1)), ValueError, r"betas\[1\]"),
        (dict(eps=-1.0), ValueError, "eps"),
        (dict(weight_decay=-1.0), ValueError, "weight_decay"),
        (dict(maximize="yes"), ValueError, "maximize"),
    ],
    "sgd": [
        (dict(lr=-1e-2), ValueError, "lr"),
        (dict(momentum=-0.5), ValueError, "momentum"),
        (dict(dampening=-1.0), ValueError, "dampening"),
        (dict(weight_decay=-0.5), ValueError, "weight_decay"),
        (dict(nesterov=True, momentum=0.0), ValueError, "Nesterov"),
        (dict(nesterov=True, momentum=0.9, dampening=0.5), ValueError, "Nesterov"),
        (dict(momentum_dtype="fp8"), ValueError, "momentum_dtype"),
    ],
    "adafactor": [
        (dict(lr=1e-2), ValueError, "relative_step"),
        (dict(lr=-1.0, relative_step=False), ValueError, "lr"),
        (dict(eps=(-1.0, 1e-3)), ValueError, "eps"),
        (dict(clip_threshold=0.0), ValueError, "clip_threshold"),
        (dict(decay_rate=0.5), ValueError, "decay_rate"),
        (dict(beta1=1.5), ValueError, "beta1"),
        (dict(weight_decay=-1.0), ValueError, "weight_decay"),
        (dict(warmup_init=True, relative_step=False, lr=1e-2), ValueError, "warmup_init"),
    ],
    "came": [
        (dict(lr=None), ValueError, "lr"),
        (dict(lr=-1e-2), ValueError, "lr"),
        (dict(lr=1e-2, betas=(0.9, 0.999)), ValueError, "betas"),
        (dict(lr=1e-2, betas=(0.9, 0.999, 1.0)), ValueError, r"betas\[2\]"),
        (dict(lr=1e-2, eps=(1e-30, -1.0)), ValueError, "eps"),
        (dict(lr=1e-2, weight_decay=-1.0), ValueError, "weight_decay"),
    ],
}
ERROR_INPUTS["lion"] = ERROR_INPUTS["lion_8bit"] = [
    (dict(lr=-1e-2), ValueError, "lr"),
    (dict(betas=(0.9, 1.0)), ValueError, r"betas\[1\]"),
    (dict(betas=(0.9, 0.99, 0.999)), ValueError, "betas"),
    (dict(weight_decay=-1.0), ValueError, "weight_decay"),
    (dict(maximize=1), ValueError, "maximize"),
]
ERROR_INPUTS["ademamix"] = ERROR_INPUTS["ademamix_8bit"] = [
    (dict(lr=-1e-2), ValueError, "lr"),
    (dict(betas=(0.9, 0.999)), ValueError, "betas"),
    (dict(betas=(0.9, 0.999, 1.0)), ValueError, r"betas\[2\]"),
    (dict(alpha=-1.0), ValueError, "alpha"),
    (dict(t_alpha=0), ValueError, "t_alpha"),
    (dict(t_beta3=2.5), ValueError, "t_beta3"),
    (dict(t_beta3=10, betas=(0.0, 0.999, 0.9999)), ValueError, "t_beta3"),
    (dict(eps=0.0), ValueError, "eps"),
    (dict(weight_decay=-1.0), ValueError, "weight_decay"),
]
ERROR_INPUTS["paged_adamw_8bit"] = ERROR_INPUTS["adamw_8bit"] + [
    (dict(gpu_budget_bytes=-1), ValueError, "gpu_budget_bytes")
]
ERROR_CASES = [(name, *case) for name, cases in ERROR_INPUTS.items() for case in cases]


@pytest.mark.parametrize("name, kwargs, error, message", ERROR_CASES, ids=lambda v: str(v)[:40])
def test_error_inputs_at_construction_and_in_add_param_group(name, kwargs, error, message):
    """Bad hyperparameters raise at construction, and in a param group added later (which is then not added)."""
    with pytest.raises(error, match=message):
        optimizer_class(name)(_params(), **kwargs)
    group_kwargs = {k: v for k, v in kwargs.items() if k != "gpu_budget_bytes"}
    if not group_kwargs or name == "adafactor" and "relative_step" in kwargs:
        return  # not a per-group option / a combination only the constructor sees
    base = {"came": dict(lr=1e-2)}.get(name, {})
    opt = optimizer_class(name)(_params()[:1], **base)
    with pytest.raises(error, match=message):
        opt.add_param_group({"params": _params()[1:], **group_kwargs})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("name", NAMES)
def test_generic_error_inputs(name):
    """torch's: params not an iterable, an empty list, a param in two groups."""
    cls = optimizer_class(name)
    kwargs = _kwargs(name)
    with pytest.raises(TypeError, match="iterable"):
        cls(torch.nn.Parameter(torch.randn(3)), **kwargs)
    with pytest.raises(ValueError, match="empty"):
        cls([], **kwargs)
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="more than one parameter group"):
        cls([{"params": [p]}, {"params": [p]}], **kwargs)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.float64, torch.int32])
@pytest.mark.parametrize("name", OURS)
def test_unsupported_param_dtypes_are_refused_before_any_step(name, dtype):
    param = torch.zeros(4, 3, dtype=dtype)
    cls = optimizer_class(name)
    with pytest.raises(TypeError, match=rf"param group 1, param 0 \(shape \(4, 3\)\) has dtype {dtype}"):
        cls([{"params": _params()[:1]}, {"params": [param]}], **_kwargs(name))
    opt = cls(_params()[:1], **_kwargs(name))
    with pytest.raises(TypeError, match=r"param group 1, param 0"):
        opt.add_param_group({"params": [param]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("name", OURS)
def test_sparse_gradient_raises_before_any_update(name):
    params = _params()
    opt = build_optimizer(name, [{"params": params[:2]}, {"params": params[2:]}], **_kwargs(name))
    before = [p.detach().clone() for p in params]
    params[0].grad, params[1].grad = torch.randn_like(params[0]), torch.randn_like(params[1])
    params[2].grad = torch.randn_like(params[2]).to_sparse()
    with pytest.raises(RuntimeError, match=r"sparse gradients: param group 1, param 0 \(shape \(5, 3\)\)"):
        opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    assert not opt.state


@pytest.mark.parametrize("name", OURS)
def test_torch_implementation_switches(name):
    """foreach/fused/differentiable (and capturable where torch has it) accepted as None/False, refused when True."""
    cls = optimizer_class(name)
    switches = ("foreach", "fused", "differentiable") + (() if name == "sgd" else ("capturable",))
    for switch in switches:
        for value in (None, False) if switch in ("foreach", "fused") else (False,):
            cls(_params(), **_kwargs(name), **{switch: value})
        with pytest.raises(ValueError, match=f"Invalid {switch}=True"):
            cls(_params(), **_kwargs(name), **{switch: True})
        opt = cls(_params()[:1], **_kwargs(name))
        with pytest.raises(ValueError, match=f"Invalid {switch}=True"):
            opt.add_param_group({"params": _params()[1:], switch: True})
        opt.add_param_group({"params": _params()[1:], switch: False})
        assert switch not in opt.param_groups[1]


@pytest.mark.parametrize("name", NAMES)
def test_repr_lists_the_groups(name):
    text = repr(build_optimizer(name, _params(), **_kwargs(name)))
    assert "Parameter Group 0" in text and "lr" in text
