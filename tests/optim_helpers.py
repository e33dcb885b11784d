"""Helpers shared by the optimizer-against-reference tests (Adafactor, CAME, Muon, Lion, AdEMAMix)."""

import pytest
import torch

from lowmem_lightning.kernels import dispatch
from lowmem_lightning.optim import build_optimizer
from lowmem_lightning.optim.muon import matrix_shape

ODD_SHAPES = [(4097,), (1000, 3), (7, 11)]
"""8-bit state with a partial block, 8-bit 2-D, fp32 state (< 4096 elements)."""


def count_state_once(monkeypatch) -> None:
    """Make :func:`lowmem_lightning.estimate.estimate_memory` count each optimizer's state over a model once in this
    test: a memo over ``optimizer_state_bytes`` (the same name, params, fp32 ids and kwargs give the same bytes) is
    monkeypatched in. For tests that call ``estimate_memory`` on one model at many budgets: the budget changes only the
    verdicts and the advice (``recommend`` still runs at every call), not the state bytes."""
    from lowmem_lightning import estimate as estimate_module

    count = estimate_module.optimizer_state_bytes
    counted: dict = {}

    def count_once(name, params, fp32_ids=frozenset(), **kwargs):
        key = (name, tuple(id(p) for _, p in params), frozenset(fp32_ids), repr(sorted(kwargs.items())))
        if key not in counted:
            counted[key] = count(name, params, fp32_ids, **kwargs)
        return counted[key]

    monkeypatch.setattr(estimate_module, "optimizer_state_bytes", count_once)


def mode_id(kwargs: dict) -> str:
    """A test id for a dict of optimizer arguments."""
    return ",".join(f"{k}={v}" for k, v in kwargs.items()) or "defaults"


def random_grads(shapes, steps: int, seed: int = 1, scale: float = 0.5) -> list[list[torch.Tensor]]:
    """``steps`` lists of gradients (N(0, scale**2), 0.25 by default) for params of ``shapes``, from a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) * scale for s in shapes] for _ in range(steps)]


def seeded_params(dtype=torch.float32, shapes=ODD_SHAPES, seed: int = 0) -> list[torch.nn.Parameter]:
    """Params of ``shapes`` drawn from N(0, 0.25) with a fixed seed, in ``dtype``: the same values at every call."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.5).to(dtype)) for s in shapes]


def train(opt, params, grads, grad_dtype=None, nan_at=None):
    """Step ``opt`` once per entry of ``grads`` (cast to ``grad_dtype``, else each param's dtype); ``nan_at=(step,
    index)`` puts a NaN into that param's gradient at that step. Returns ``opt``."""
    for p in params:
        p.grad_dtype = None  # torch >= 2.10: allow a gradient dtype other than the param's
    for step, step_grads in enumerate(grads):
        for i, (p, g) in enumerate(zip(params, step_grads)):
            p.grad = g.to(grad_dtype or p.dtype, copy=True)
            if nan_at == (step, i):
                p.grad.view(-1)[5] = float("nan")
        opt.step()
    return opt


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """One intra-op thread for every test of a module that imports this (autouse) fixture: on a shared 2-core
    machine OpenMP oversubscription made steps 10-50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def in_memory_format(t: torch.Tensor, memory_format) -> torch.Tensor:
    """A copy of ``t`` in ``memory_format`` (``torch.channels_last`` applies to 4-D tensors; others stay
    contiguous)."""
    return t.clone(memory_format=memory_format if t.ndim == 4 else torch.contiguous_format)


def torch_muon_on_filter_matrices(shapes, steps: int = 4, device: str = "cpu"):
    """``(start, grads, reference)``: seeded conv filters of ``shapes``, ``steps`` rounds of seeded gradients, and
    the params ``torch.optim.Muon`` (lr 0.02, weight decay 0.1) reaches on their ``[out, in * k...]`` matrices
    (:func:`~lowmem_lightning.optim.muon.matrix_shape`), Keller Jordan's recipe for filters."""
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen).to(device) for s in shapes]
    grads = [[torch.randn(s, generator=gen).to(device) for s in shapes] for _ in range(steps)]
    flat = [torch.nn.Parameter(p.reshape(matrix_shape(p.shape)).clone()) for p in start]
    reference = torch.optim.Muon(flat, lr=0.02, weight_decay=0.1)
    for step in grads:
        for p, g in zip(flat, step):
            p.grad = g.reshape(p.shape)
        reference.step()
    return start, grads, flat


class DispatchedOps:
    """A context manager that records the name of every aten op dispatched inside it (``names``), e.g. to show a
    step does no ``_local_scalar_dense`` (a host read) or ``lift_fresh`` (a tensor made from a Python list)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        names: list[str] = []

        class _Recorder(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                names.append(str(func))
                return func(*args, **(kwargs or {}))

        self.names, self._mode = names, _Recorder()

    def __enter__(self) -> "DispatchedOps":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t`` (any dtype), flat: equal bits compare equal, NaNs included."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def assert_triton_kernel_equals_reference(factory, param_dtype, grad_dtype) -> None:
    """Three steps of ``factory(params)`` over :data:`ODD_SHAPES` through the Triton kernel (interpreter) and
    through the reference, a NaN gradient in step 2 on the second param: params and every state tensor equal
    bit for bit, every param moved, one skipped update on each path."""
    grads = random_grads(ODD_SHAPES, 3, scale=0.1)
    runs = []
    for force in (True, False):
        params = seeded_params(param_dtype)
        with dispatch.override(force_triton=force):
            opt = train(factory(params), params, grads, grad_dtype, nan_at=(1, 1))
        runs.append((params, opt))
    (tri, opt_t), (ref, opt_r) = runs
    for p, q, p0 in zip(tri, ref, seeded_params(param_dtype)):
        assert torch.equal(bits(p), bits(q)) and not torch.equal(p, p0)
        assert opt_t.state[p].keys() == opt_r.state[q].keys()
        for key, value in opt_r.state[q].items():
            assert torch.equal(bits(opt_t.state[p][key]), bits(value)), key
    assert opt_t.skipped_updates == opt_r.skipped_updates == 1


def assert_compiled_equals_eager_without_recompiling(factory) -> None:
    """Four steps of ``factory(params)`` on bf16 params under a StepLR that halves the lr each step, with the CPU
    path compiled and eager: no graph compiled after step 2 (an lr change recompiles nothing), and params and
    state equal bit for bit."""
    from torch._dynamo.utils import counters

    shapes = [(4097,), (300, 256), (30,)]
    grads = random_grads(shapes, 4, scale=0.1)
    results = []
    for mode in ("always", "never"):
        params = seeded_params(torch.bfloat16, shapes)
        with dispatch.override(cpu_compile=mode):
            opt = factory(params)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
            for k, step_grads in enumerate(grads):
                train(opt, params, [step_grads])
                sched.step()
                if k == 1:
                    graphs = counters["stats"]["unique_graphs"]
            if mode == "always":
                assert counters["stats"]["unique_graphs"] == graphs
        results.append((params, opt))
    (compiled, opt_c), (eager, opt_e) = results
    for p, q in zip(compiled, eager):
        assert torch.equal(bits(p), bits(q))
        for key, value in opt_e.state[q].items():
            assert torch.equal(opt_c.state[p][key], value), key


def quadratic_run(name: str, steps: int = 60, shape=(128, 128), **kwargs):
    """Registered optimizer ``name`` (with ``kwargs``) pulling a zero param towards a random target under noisy
    gradients, ``steps`` steps; returns ``(param, target)``."""
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(shape, generator=gen)
    p = torch.nn.Parameter(torch.zeros(shape))
    opt = build_optimizer(name, [p], **kwargs)
    for _ in range(steps):
        p.grad = (p.detach() - target) + 0.5 * torch.randn(shape, generator=gen)
        opt.step()
    return p.detach(), target


def assert_matches_peer_on_cuda(pairs, kwargs: dict, shape=(512, 256), steps: int = 20) -> None:
    """For each ``(peer class, our registered name, tol)``: both trained on CUDA from the same start over the same
    gradients with ``kwargs``; the distance between them is at most ``tol`` times the distance the peer moved."""
    grads = [[g.cuda() for g in step] for step in random_grads([shape], steps, scale=0.1)]
    start = seeded_params(shapes=[shape])[0].detach().cuda()
    for theirs, ours, tol in pairs:
        pa, pb = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
        train(theirs([pa], **kwargs), [pa], grads)
        train(build_optimizer(ours, [pb], **kwargs), [pb], grads)
        moved = float((pa.detach() - start).norm())
        assert float((pa.detach() - pb.detach()).norm()) <= tol * moved + 1e-6, ours


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


def snapshot_differences(a: dict, b: dict) -> list[str]:
    """What differs, bit for bit, between two ``{"params": [tensors], "state": [dict of tensors per param]}``
    snapshots: one line per param or state tensor that differs (empty: equal)."""
    out = [f"param {i}: {_tensor_difference(x, y)}" for i, (x, y) in enumerate(zip(a["params"], b["params"]))
           if not _bit_equal(x, y)]
    for i, (x, y) in enumerate(zip(a["state"], b["state"])):
        if sorted(x) != sorted(y):
            out.append(f"state {i}: keys {sorted(x)} != {sorted(y)}")
            continue
        out += [f"state {i} {k}: {_tensor_difference(x[k], y[k])}" for k in x if not _bit_equal(x[k], y[k])]
    return out


def _bit_equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)


def _tensor_difference(x: torch.Tensor, y: torch.Tensor) -> str:
    if x.dtype != y.dtype or x.shape != y.shape:
        return f"{x.dtype} {tuple(x.shape)} vs {y.dtype} {tuple(y.shape)}"
    return f"{int((x != y).sum())} elements differ"
