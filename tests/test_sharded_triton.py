"""Sharded (DTensor, FSDP2's ``Shard(0)``) Adafactor and CAME on the Triton kernels (interpreter, forced).

On 2 and 3 forked gloo ranks every rank steps the same sharded params twice from the same start: once on the
Triton passes (their per-tile partial sums completed across ranks between passes) and once on the eager
reference (which completes its sums itself). The two must keep the same state (kernel-vs-reference
tolerance: fp32 to 5e-6 of the largest value, int8 codes to one code on at most 1%) and params, and the
gathered params must match one process stepping the whole tensors. Shapes: rows not divisible by the ranks,
a matrix of one row (the other ranks hold none) and a 1-D tensor; bf16 params with stochastic rounding;
3 steps.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from forked_ranks import forked_ranks
from optim_helpers import assert_states_match

from lowmem_lightning.kernels import adafactor, came, dispatch
from lowmem_lightning.optim import build_optimizer

SHAPES = {"odd": (67, 70), "one_row": (1, 300), "flat": (4500,), "cols": (20, 70)}
"""Rows not divisible by 2 or 3 (int8 momentum: >= 4096 elements), one row (the other ranks hold none), 1-D,
and a matrix split along its columns (tensor parallel; it keeps the eager reference, in the same steps)."""
SHARD_DIM = {"cols": 1}
STEPS = 3

CASES = {
    "adafactor_int8": ("adafactor", dict(beta1=0.9, momentum_dtype="int8", weight_decay=0.1), torch.float32),
    "adafactor_bf16": ("adafactor", dict(beta1=0.9, relative_step=False, lr=1e-2), torch.bfloat16),
    "came_int8": ("came", dict(lr=1e-2, momentum_dtype="int8", weight_decay=0.01), torch.float32),
    "came_bf16": ("came", dict(lr=1e-2), torch.bfloat16),
}
"""name -> (optimizer, arguments, param dtype): 8-bit and fp32 momentum, each once with bf16 params."""


def _full(seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """Params (``scale=1``, as the kernel-vs-reference tests draw them) or gradients of :data:`SHAPES`."""
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) * scale for name, shape in SHAPES.items()}


def _run(world: int, case: str, triton: bool, monkey) -> tuple[dict, list[dict]]:
    """Gathered params and this rank's state after STEPS steps of ``case`` on sharded params."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    name, kwargs, dtype = CASES[case]
    mesh = init_device_mesh("cpu", (world,))
    params = {n: torch.nn.Parameter(distribute_tensor(t.to(dtype), mesh, [Shard(SHARD_DIM.get(n, 0))]))
              for n, t in _full(0, 1.0).items()}
    opt = build_optimizer(name, list(params.values()), **kwargs)
    with dispatch.override(force_triton=triton), monkey(triton):
        for step in range(STEPS):
            for n, g in _full(100 + step).items():
                params[n].grad = distribute_tensor(g.to(dtype), mesh, params[n].placements)
            opt.step()
    states = [{k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor) and v.numel()}
              for p in params.values()]
    return {n: p.full_tensor().detach().clone() for n, p in params.items()}, states


class _HostStepsFail:
    """With ``triton``, the factored host steps raise for tensors split by rows or 1-D: those must take the
    Triton passes (a columns split runs the reference)."""

    def __init__(self, triton: bool):
        self.triton, self.saved = triton, []

    def __enter__(self):
        if self.triton:
            for module in (adafactor, came):
                self.saved.append((module, module.run_host_step))
                module.run_host_step = self._checked(module.run_host_step)

    @staticmethod
    def _checked(host_step):
        def run(*args, reduce, **kwargs):
            assert reduce is not None and reduce.longest < 0, "a sharded tensor ran the reference, not the passes"
            return host_step(*args, reduce=reduce, **kwargs)

        return run

    def __exit__(self, *exc):
        for module, fn in self.saved:
            module.run_host_step = fn


def _rank(rank: int, world: int) -> dict:
    out = {}
    for case in CASES:
        out[case] = {kind: _run(world, case, kind == "triton", _HostStepsFail) for kind in ("triton", "eager")}
    return out


def _plain(case: str) -> dict[str, torch.Tensor]:
    """One process stepping the whole tensors (the reference path)."""
    name, kwargs, dtype = CASES[case]
    params = {n: torch.nn.Parameter(t.to(dtype)) for n, t in _full(0, 1.0).items()}
    opt = build_optimizer(name, list(params.values()), **kwargs)
    for step in range(STEPS):
        for n, g in _full(100 + step).items():
            params[n].grad = g.to(dtype)
        opt.step()
    return {n: p.detach() for n, p in params.items()}


@pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")
@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_sharded_triton_step_equals_the_sharded_reference_and_the_unsharded_step(tmp_path, world):
    ranks = forked_ranks(tmp_path, world, _rank, world)
    start = _full(0, 1.0)
    for case, (_, kwargs, dtype) in CASES.items():
        unsharded = _plain(case)
        for result in ranks:
            (tri, tri_states), (ref, ref_states) = result[case]["triton"], result[case]["eager"]
            for sa, sb in zip(tri_states, ref_states):
                assert_states_match(sa, sb)
            for n in SHAPES:
                assert (tri[n].float() - start[n]).abs().max() > 1e-4, (case, n)  # the params moved
                if dtype == torch.float32:
                    torch.testing.assert_close(tri[n], ref[n], rtol=1e-6, atol=1e-7, msg=f"{case} {n}")
                else:  # stochastic rounding of (nearly) identical fp32 values: (nearly) identical bits
                    assert (tri[n] != ref[n]).float().mean() <= 1e-3, (case, n)
                    torch.testing.assert_close(tri[n].float(), ref[n].float(), rtol=2**-7, atol=0)
                moved = (unsharded[n].float() - start[n]).abs().max()
                if kwargs.get("momentum_dtype") == "int8" and n != "one_row":
                    # 8-bit momentum blocks follow the shard: well under 2% of the distance moved (test_sharded.py)
                    assert (tri[n] - unsharded[n]).abs().max() < 0.02 * moved, (case, n)
                elif dtype == torch.float32:
                    torch.testing.assert_close(tri[n], unsharded[n], rtol=2e-5, atol=1e-6, msg=f"{case} {n}")
                else:  # each shard rounds from its own random stream: a few bf16 ulps along the way
                    ulp = 2.0**-7 * (unsharded[n].float().abs() + moved)
                    assert ((tri[n].float() - unsharded[n].float()).abs() <= 2 * STEPS * ulp).all(), (case, n)
