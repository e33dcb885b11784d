"""Helpers shared by the optimizer-against-reference tests (Adafactor, CAME)."""

import torch


def mode_id(kwargs: dict) -> str:
    """A test id for a dict of optimizer arguments."""
    return ",".join(f"{k}={v}" for k, v in kwargs.items()) or "defaults"


def random_grads(shapes, steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    """``steps`` lists of gradients (N(0, 0.25)) for params of ``shapes``, from a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) * 0.5 for s in shapes] for _ in range(steps)]


def run_optimizer(factory, params0, grads, dtype=None):
    """Copies of ``params0`` (as ``dtype``) trained by ``factory(params)`` over ``grads``; returns ``(params, opt)``."""
    params = [torch.nn.Parameter(p.to(dtype or p.dtype, copy=True)) for p in params0]
    opt = factory(params)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.to(p.dtype, copy=True)
        opt.step()
    return params, opt


def assert_rel_close(ours, ref, rtol: float) -> None:
    """Every tensor of ``ours`` within ``rtol`` of ``ref`` in max-abs error relative to ``ref``'s max-abs."""
    for a, b in zip(ours, ref):
        err = ((a.detach().double() - b.detach().double()).abs().max() / b.detach().double().abs().max()).item()
        assert err <= rtol, f"shape {tuple(a.shape)}: relative error {err:.2e} > {rtol:.0e}"


def assert_non_finite_gradient_skips_that_tensor(factory, bad_value: float) -> None:
    """Step 1 normally; step 2 with ``bad_value`` in the first param's gradient: that param, its state and
    step counter stay as they were, the second param updates, and one skipped update is counted."""
    # (64, 80): 5120 elements in whole 256-blocks, so 8-bit momentum takes the split CPU path
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(64, 80), (300,)]]
    opt = factory(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    before = [p.detach().clone() for p in params]
    states = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    params[0].grad = torch.randn_like(params[0])
    params[0].grad[3, 4] = bad_value
    params[1].grad = torch.randn_like(params[1])
    opt.step()
    assert torch.equal(params[0].data, before[0])
    for key, value in states[0].items():
        assert torch.equal(opt.state[params[0]][key], value), key
    assert float(opt.state[params[0]]["step"]) == 1.0
    assert not torch.equal(params[1].data, before[1])
    assert float(opt.state[params[1]]["step"]) == 2.0
    assert opt.skipped_updates == 1


def assert_state_dict_round_trip_is_bit_exact(factory) -> None:
    """3 steps, state_dict into a fresh optimizer (same dtypes and values), 3 more steps: the params equal
    those of 6 uninterrupted steps bit for bit."""
    shapes = [(70, 70), (2, 33, 65), (5000,)]
    params0 = [torch.randn(s) for s in shapes]
    grads = random_grads(shapes, 6)
    straight, _ = run_optimizer(factory, params0, grads)
    first, opt = run_optimizer(factory, params0, grads[:3])
    saved = opt.state_dict()
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    opt2 = factory(resumed)
    opt2.load_state_dict(saved)
    for p, q in zip(first, resumed):
        for key, value in opt.state[p].items():
            assert opt2.state[q][key].dtype == value.dtype and torch.equal(opt2.state[q][key], value), key
    for step_grads in grads[3:]:
        for p, g in zip(resumed, step_grads):
            p.grad = g.clone()
        opt2.step()
    for a, b in zip(resumed, straight):
        assert torch.equal(a.data, b.data)


def assert_states_match(sa: dict, sb: dict) -> None:
    """Kernel state ``sa`` equals reference state ``sb``: int8 codes to one code on at most 1% of elements
    (fp32 summation order can move a value across a rounding boundary), fp32 to 5e-6 of the largest value."""
    for key in sa:
        a, b = sa[key], sb[key]
        assert a.dtype == b.dtype and a.shape == b.shape, key
        if a.dtype == torch.int8:
            diff = (a.int() - b.int()).abs()
            assert diff.max() <= 1 and (diff > 0).float().mean() <= 0.01, key
        else:
            err = ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()
            assert err <= 5e-6, f"{key}: difference {err:.1e} of the largest value"


def assert_maximize_equals_negated_gradient(factory, shapes=((40, 65), (4097,)), steps: int = 2) -> None:
    """``factory(params, maximize=True)`` stores exactly the bits of ``factory(params)`` fed the negated
    gradients (params and every state tensor), and gives the gradients back untouched."""
    gen = torch.Generator().manual_seed(5)
    start = [torch.randn(s, generator=gen) for s in shapes]
    up = [torch.nn.Parameter(p.clone()) for p in start]
    down = [torch.nn.Parameter(p.clone()) for p in start]
    opt_up, opt_down = factory(up, maximize=True), factory(down)
    for _ in range(steps):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for p, q, g in zip(up, down, grads):
            p.grad, q.grad = g.clone(), -g
        opt_up.step()
        opt_down.step()
        assert all(torch.equal(p.grad, g) for p, g in zip(up, grads)), "a gradient was changed"
    for p, q, p0 in zip(up, down, start):
        assert torch.equal(p, q) and not torch.equal(p, p0)
        for key, value in opt_down.state[q].items():
            assert torch.equal(opt_up.state[p][key], value), f"state {key!r} differs"
