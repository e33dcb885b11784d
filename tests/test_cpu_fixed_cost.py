"""The CPU step's fixed cost (issue 24.6): finite flags decided on the host, step counters advanced only where
the flag is set, cached in-place bucket aliases, and the tensor ops one small step issues around its bucket step.

The flags must equal those of the device form of the check (the fp32 norm of each gradient, compared on the
device) on inf, NaN and overflowing gradients; op counts are aten ops seen by ``torch.profiler`` in one
``step()`` whose bucket step itself is replaced by a no-op (what is left is the fixed cost).
"""

import gc
import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from lowmem_lightning.kernels import adamw8bit as adamw_kernel
from lowmem_lightning.kernels import cpu_buckets, dispatch
from lowmem_lightning.kernels.dispatch import HOST_APPLY, HOST_SKIP, host_flag, host_flag_values
from lowmem_lightning.optim import build_optimizer
from lowmem_lightning.optim.finite import _square_sum_norms


def _grad(dtype, fill, one=None, n=4097):
    g = torch.full((n,), fill)
    if one is not None:
        g[17] = one
    return g.to(dtype)


def _overflow_cases(dtype):
    """Gradients whose flag is 1 (finite sum of squares) or 0 (inf/NaN, a square or a sum above fp32's range)."""
    cases = [_grad(dtype, 1.0), _grad(dtype, 1.0, float("nan")), _grad(dtype, 1.0, float("inf")),
             _grad(dtype, 1.0, float("-inf")), _grad(dtype, 1.0, 60000.0)]
    if dtype != torch.float16:
        cases += [_grad(dtype, 1.0, 1e20), _grad(dtype, 1.0, 3e38), _grad(dtype, 1e19), _grad(dtype, 1e17),
                  _grad(dtype, 1.0, 1.8e19), _grad(dtype, 1.0, -2e19)]
    return cases


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_host_flags_equal_the_device_form_of_the_check(dtype):
    grads = _overflow_cases(dtype)
    params = [torch.nn.Parameter(torch.zeros(g.shape, dtype=dtype)) for g in grads]
    opt = build_optimizer("adamw_8bit", params, lr=1e-3)
    flags = opt._finite_flags(grads)
    want = _square_sum_norms(grads, fused=False).lt(math.inf).tolist()  # the form CUDA uses (one norm each)
    assert all(f is HOST_APPLY or f is HOST_SKIP for f in flags)
    assert host_flag_values(flags) == want
    assert [float(f) for f in flags] == [float(w) for w in want]
    assert opt.skipped_updates == want.count(False) > 0


def test_step_advances_only_the_counters_of_finite_gradients_and_counts_the_skips():
    grads = _overflow_cases(torch.float32)
    params = [torch.nn.Parameter(torch.randn(g.shape)) for g in grads]
    opt = build_optimizer("adamw_8bit", params, lr=1e-3)
    for p, g in zip(params, grads):
        p.grad = g
    before = [p.detach().clone() for p in params]
    opt.step()
    opt.step()
    ok = _square_sum_norms(grads, fused=False).isfinite().tolist()
    for p, was, good in zip(params, before, ok):
        step = opt.state[p]["step"]
        assert step.dtype == torch.float32 and step.shape == () and float(step) == (2.0 if good else 0.0)
        assert torch.equal(p.detach(), was) != good
    assert opt.skipped_updates == 2 * ok.count(False)
    saved = opt.state_dict()["state"]
    assert all(s["step"].dtype == torch.float32 and s["step"].dim() == 0 for s in saved.values())


@pytest.mark.parametrize("norm, applies", [(3.0, True), (float("inf"), False), (float("nan"), False)])
def test_reused_norm_on_the_cpu_decides_every_flag(norm, applies):
    params = [torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(7))]
    for p in params:
        p.grad = torch.randn_like(p)
    params[1].grad[0] = float("inf") if applies else 0.0  # ignored: the reused norm decides alone
    opt = build_optimizer("sgd", params, lr=0.1)
    before = [p.detach().clone() for p in params]
    opt.use_grad_norm(torch.tensor(norm))
    opt.step()
    for p, was in zip(params, before):
        assert float(opt.state[p]["step"]) == float(applies)
        assert torch.equal(p.detach(), was) != applies
    assert opt.skipped_updates == (0 if applies else 2)


def test_host_flag_values_know_only_the_shared_constants():
    assert host_flag(True) is HOST_APPLY and host_flag(False) is HOST_SKIP
    assert host_flag_values([HOST_APPLY, HOST_SKIP, HOST_APPLY]) == [True, False, True]
    assert host_flag_values([]) == []
    assert host_flag_values([HOST_APPLY, torch.ones(())]) is None  # a computed flag must be read


def test_dispatch_reads_computed_flags_and_host_flags_alike():
    """A bucketed family gets the same live tensors and steps from host flags as from computed flag tensors."""
    calls = []
    family = dispatch.Family("rec", launch=None, host=lambda t, s, backend, steps: calls.append(steps),
                             bucketed=True)

    from typing import NamedTuple

    class Tensors(NamedTuple):
        params: list
        steps: list
        flags: list

    steps = [torch.tensor(3.0), torch.tensor(5.0), torch.tensor(7.0)]
    with dispatch.override(cpu_compile="never"):
        dispatch.dispatch(family, Tensors([torch.zeros(4)] * 3, steps, [HOST_APPLY, HOST_SKIP, HOST_APPLY]), None)
        dispatch.dispatch(family, Tensors([torch.zeros(4)] * 3, steps,
                                          [torch.tensor(1.0), torch.tensor(0.0), torch.tensor(1.0)]), None)
    assert calls == [[3.0], [7.0], [3.0], [7.0]]  # no host_key: one call per live tensor, its step read


def _fixed_cost_ops(name: str, params: list, monkeypatch, **kwargs) -> list[str]:
    """The top-level aten ops (not those inside another) of the third ``step()`` of ``name`` over ``params``, its
    bucket steps replaced by no-ops."""
    monkeypatch.setattr(dispatch.HostStep, "on", lambda self, backend: lambda *args: None)
    opt = build_optimizer(name, params, **kwargs)
    for _ in range(2):
        opt.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.step()
    aten = [e for e in prof.events() if e.name.startswith("aten::")]
    return [e.name for e in aten if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]


@pytest.mark.parametrize("name, kwargs", [("adamw_8bit", {"lr": 1e-3}), ("sgd", {"lr": 1e-2, "momentum": 0.9})])
def test_a_small_step_issues_a_handful_of_ops_around_its_bucket_step(name, kwargs, monkeypatch):
    # one 4096-element tensor (one in-place bucket): the norm, its read, the counter's add and read, the
    # per-tensor table (from numpy) and the row map's .to; no stack/compare/sum for the flags, no alias built again
    param = torch.nn.Parameter(torch.randn(4096))
    param.grad = torch.randn(4096)
    ops = _fixed_cost_ops(name, [param], monkeypatch, **kwargs)
    assert len(ops) <= 6, ops  # before the host flags and cached aliases: 29 (adamw_8bit) and 23 (sgd)
    for absent in ("aten::stack", "aten::lt", "aten::sum", "aten::unbind", "aten::set_", "aten::empty"):
        assert absent not in ops, (absent, ops)
    assert ops.count("aten::linalg_vector_norm") == ops.count("aten::_foreach_add_") == 1


def test_the_flag_ops_do_not_grow_with_the_tensor_count(monkeypatch):
    params = [torch.nn.Parameter(torch.randn(n)) for n in (4096, 300, 7, 5000, 1)]
    for p in params:
        p.grad = torch.randn_like(p)
    ops = _fixed_cost_ops("adamw_8bit", params, monkeypatch, lr=1e-3)
    assert ops.count("aten::linalg_vector_norm") == len(params) and ops.count("aten::_foreach_add_") == 1
    assert "aten::stack" not in ops and "aten::lt" not in ops
    assert ops.count("aten::item") == 2 * len(params)  # each norm, each live counter: memory reads


def test_in_place_aliases_are_reused_rebuilt_when_the_storage_moves_and_dropped_with_their_tensor():
    cpu_buckets._plan.cache_clear()  # a bucket of its own (plans are shared by equal shapes)
    bucket = cpu_buckets.plan([torch.zeros(4096)], 256)[0]
    assert bucket.in_place
    source = torch.randn(4096)
    first = bucket.rows_of([source])
    assert bucket.rows_of([source]) is first and first.data_ptr() == source.data_ptr() and first._base is None
    first.add_(1.0)  # the alias is the tensor's memory
    assert torch.equal(source.view(16, 256), first)
    source.data = torch.randn(4096)  # new memory: a new alias
    second = bucket.rows_of([source])
    assert second is not first and second.data_ptr() == source.data_ptr()
    assert torch.equal(second, source.view(16, 256))
    scales = torch.rand(16)
    assert bucket.scales_of([scales]) is bucket.scales_of([scales])
    entries = bucket._aliases._entries
    key = (id(source), 0, (16, 256))
    assert len(entries) == 2 and key in entries
    del source, second, first
    gc.collect()
    assert list(entries) == [(id(scales), 0, (16, 1))]  # the freed tensor's entry (and its memory) are gone


def test_steps_follow_a_param_whose_storage_moves():
    """A param given new memory between steps (``.data =``) is stepped there, as if it had always lived there."""
    gen = torch.Generator().manual_seed(0)
    init, grads = torch.randn(4096, generator=gen), [torch.randn(4096, generator=gen) for _ in range(4)]
    for name, kwargs in (("sgd", {"lr": 0.1, "momentum": 0.9}), ("adamw_8bit", {"lr": 1e-2})):
        moved, kept = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
        opts = [build_optimizer(name, [p], **kwargs) for p in (moved, kept)]
        for k, g in enumerate(grads):
            if k == 2:
                old = moved.data
                moved.data = old.clone()
                old.fill_(0.0)  # the old memory: a stale alias would step this
            for p, opt in zip((moved, kept), opts):
                p.grad = g.clone()
                opt.step()
            assert torch.equal(moved.detach(), kept.detach()), (name, k)


def test_per_tensor_tables_equal_torch_tensor_bits():
    values = [(0.1, 1e-300, 2**40 + 1), (1 / 3, -0.0, 7), (float("inf"), 5e-324, 2**31 - 1)]
    for dtype in (torch.float64, torch.float32, torch.int64):
        rows = values if dtype != torch.int64 else [tuple(int(v) if math.isfinite(v) else 0 for v in r)
                                                     for r in values]
        got = cpu_buckets.per_tensor(rows, dtype)
        want = torch.tensor(rows, dtype=dtype)
        assert got.dtype == dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8)), dtype
    one = cpu_buckets.per_tensor([(1.0, 2.0)], torch.float64)
    assert one.tolist() == [[1.0, 2.0], [1.0, 2.0]]  # padded to two rows


def test_cached_graph_calls_dynamo_helpers_undecorated():
    helpers = dispatch._direct_globals(adamw_kernel.__dict__ | {dispatch._DYNAMO_UTILS: torch._dynamo.utils})
    utils = helpers[dispatch._DYNAMO_UTILS]
    for name in dispatch._PER_CALL_HELPERS:
        assert not hasattr(getattr(utils, name), "__wrapped__"), name
    assert utils.call_size(torch.zeros(3, 5), 1) == 5
    assert utils.counters is torch._dynamo.utils.counters  # anything else: the module's
    plain = {"x": 1}
    assert dispatch._direct_globals(plain) is plain
