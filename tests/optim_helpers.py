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
