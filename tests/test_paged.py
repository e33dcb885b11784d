"""PagedAdamW8bit: bit-identical to AdamW8bit whatever the paging (tiny budget, no prefetch, state
dict round trips), state reported as host pages + device buffers, budget respected."""

import copy
import io

import pytest
import torch
from optim_helpers import one_cpu_thread  # noqa: F401 (autouse fixture)

from lowmem_lightning.optim import build_optimizer, state_memory
from lowmem_lightning.optim.adamw8bit import AdamW8bit
from lowmem_lightning.optim.paged import PageAction, PagedAdamW8bit, plan_paging

SHAPES = [(4097,), (100, 50), (30,), (64, 80), (5000,)]  # (30,) keeps fp32 state on the device


DTYPES = [torch.float32, torch.float32, torch.float32, torch.bfloat16, torch.float32]  # bf16: stochastic rounding


def _page_bytes(n: int) -> int:
    """Host bytes of one quantized tensor: int8 + uint8 codes and two fp32 absmax per 256 elements."""
    return 2 * n + 2 * 4 * ((n + 255) // 256)


QUANTIZED_NUMELS = [4097, 5000, 5120, 5000]


def _params(device="cpu"):
    g = torch.Generator().manual_seed(0)
    return [
        torch.nn.Parameter((torch.randn(s, generator=g) * 0.1).to(device=device, dtype=d))
        for s, d in zip(SHAPES, DTYPES)
    ]


def _grads(params, gen, nan_step=False):
    for i, p in enumerate(params):
        p.grad = (torch.randn(p.shape, generator=gen) * 0.1).to(device=p.device, dtype=p.dtype)
        if nan_step and i == 0:
            p.grad.view(-1)[0] = float("nan")


def _train(opt, params, steps, gen, nan_at=None):
    for step in range(steps):
        _grads(params, gen, nan_step=step == nan_at)
        opt.step()


def _assert_same(params_a, opt_a, params_b, opt_b):
    for opt in (opt_a, opt_b):
        if isinstance(opt, PagedAdamW8bit):
            opt.flush_pages()  # resident buffers are written back only on eviction
    for a, b in zip(params_a, params_b):
        assert torch.equal(a.detach().reshape(-1).view(torch.uint8), b.detach().reshape(-1).view(torch.uint8))
    for a, b in zip(params_a, params_b):
        sa, sb = opt_a.state[a], opt_b.state[b]
        assert set(sa) == set(sb)
        for key in sa:
            assert torch.equal(sa[key].cpu(), sb[key].cpu()), key


def _reference(steps=4, nan_at=2):
    params = _params()
    opt = AdamW8bit(params, lr=1e-2, weight_decay=0.05)
    _train(opt, params, steps, torch.Generator().manual_seed(1), nan_at)
    return params, opt


@pytest.mark.parametrize(
    "budget, prefetch",
    [(0, True), (_page_bytes(4097), False), (None, True)],
    ids=["evict-everything", "one-page-no-prefetch", "auto-resident"],
)
def test_paged_equals_unpaged_bit_for_bit(budget, prefetch):
    ref_params, ref_opt = _reference()
    params = _params()
    opt = PagedAdamW8bit(params, lr=1e-2, weight_decay=0.05, gpu_budget_bytes=budget, page_prefetch=prefetch)
    _train(opt, params, 4, torch.Generator().manual_seed(1), nan_at=2)
    _assert_same(params, opt, ref_params, ref_opt)
    assert opt.skipped_updates == ref_opt.skipped_updates == 1
    assert opt.is_paged


def test_budget_bounds_resident_state():
    params = _params()
    budget = _page_bytes(5000)
    opt = PagedAdamW8bit(params, gpu_budget_bytes=budget)
    _train(opt, params, 2, torch.Generator().manual_seed(1))
    resident = sum(r.nbytes for r in opt._resident.values())
    assert resident <= budget
    assert list(opt._resident) == [params[0]]  # the first that fits stays resident, the rest is streamed
    params_all = _params()
    opt_all = PagedAdamW8bit(params_all, gpu_budget_bytes=10**9)
    _train(opt_all, params_all, 2, torch.Generator().manual_seed(1))
    assert len(opt_all._resident) == 4  # every quantized tensor


def test_state_memory_reports_host_pages_and_device_buffers():
    params = _params()
    opt = PagedAdamW8bit(params, gpu_budget_bytes=0)
    _train(opt, params, 1, torch.Generator().manual_seed(1))
    mem = state_memory(opt)
    pages = sum(_page_bytes(n) for n in QUANTIZED_NUMELS)
    assert mem.host_bytes == pages
    small = 2 * 4 * 30  # fp32 exp_avg + exp_avg_sq of the tensor under 4096 elements
    steps = 4 * len(SHAPES)
    resident = sum(r.nbytes for r in opt._resident.values())
    assert mem.device_bytes == small + steps + resident
    unpaged = AdamW8bit(_params())
    _train(unpaged, unpaged.param_groups[0]["params"], 1, torch.Generator().manual_seed(1))
    assert state_memory(unpaged).total_bytes == pages + small + steps


@pytest.mark.parametrize("save_from, load_into", [(PagedAdamW8bit, PagedAdamW8bit), (PagedAdamW8bit, AdamW8bit),
                                                  (AdamW8bit, PagedAdamW8bit)])
def test_state_dict_round_trip_is_bit_identical(save_from, load_into):
    ref_params, ref_opt = _reference(steps=5, nan_at=None)
    gen = torch.Generator().manual_seed(1)
    params = _params()
    first = save_from(params, lr=1e-2, weight_decay=0.05)
    _train(first, params, 3, gen)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    saved_params = copy.deepcopy([p.detach() for p in params])
    resumed_params = [torch.nn.Parameter(p.clone()) for p in saved_params]
    second = load_into(resumed_params, lr=0.5)  # hyperparameters come from the state dict
    second.load_state_dict(torch.load(buffer))
    _train(second, resumed_params, 2, gen)
    _assert_same(resumed_params, second, ref_params, ref_opt)


def test_invalid_budget_raises():
    for bad in (-1, 1.5, True, "1GB"):
        with pytest.raises(ValueError, match="gpu_budget_bytes"):
            PagedAdamW8bit([torch.nn.Parameter(torch.zeros(3))], gpu_budget_bytes=bad)


def test_registry_builds_paged():
    opt = build_optimizer("paged_adamw_8bit", [torch.nn.Parameter(torch.zeros(5000))], lr=1e-3, gpu_budget_bytes=0)
    assert isinstance(opt, PagedAdamW8bit) and opt.gpu_budget_bytes == 0


# torch's AdamW OptimizerInfo inputs on CPU (optim_inputs_func_adam, amsgrad left out: not ours), each with
# the global "cliquey" flags off as _get_optim_inputs_including_global_cliquey_kwargs adds them
TORCH_ADAMW_INPUTS = [
    {**kwargs, "foreach": False, "fused": False, "differentiable": False}
    for kwargs in ({}, {"lr": 0.01}, {"weight_decay": 0.1}, {"weight_decay": 0.1, "maximize": True},
                   {"lr": torch.tensor(0.01)})
]


def _torch_load_post_hook(optimizer):
    """torch's test_optim.py post-hook: writes two non-dict, non-param entries into ``optimizer.state``."""
    optimizer.state["ran_load_state_dict_pre_hook2"] = optimizer.param_groups[0]["lr"] == 0.003
    optimizer.state["ran_load_state_dict_post_hook"] = True


def _torch_load_pre_hook2(optimizer, state_dict):
    """torch's test_optim.py pre-hook returning a modified deep copy of the state dict."""
    state_dict = copy.deepcopy(state_dict)
    state_dict["param_groups"][0]["lr"] = 0.003
    return state_dict


@pytest.mark.parametrize("with_pre_hook", [False, True], ids=["post_hook", "pre_post_hook"])
@pytest.mark.parametrize("shape, steps", [((2, 3), 0), ((2, 3), 2), ((70, 70), 2)], ids=["torch", "fp32", "8bit"])
@pytest.mark.parametrize("cls", [AdamW8bit, PagedAdamW8bit])
def test_torch_load_state_dict_hook_bodies_with_non_dict_state_entries(cls, shape, steps, with_pre_hook):
    """torch's test_load_state_dict_post_hook / test_load_state_dict_pre_post_hook bodies over its AdamW inputs
    (torch's own: a fresh (2, 3) param, no step), also after steps with fp32 and paged 8-bit state: the load
    succeeds, the hooks' entries are there, the param's state is intact (pages on the host) and the
    optimizer still steps and reports its memory."""
    for kwargs in TORCH_ADAMW_INPUTS:
        param = torch.rand(*shape, requires_grad=True)
        opt = cls([param], **copy.deepcopy(kwargs))
        for _ in range(steps):
            param.grad = torch.rand_like(param)
            opt.step()
        before = {key: value.clone() for key, value in opt.state.get(param, {}).items()}  # no entry created
        if with_pre_hook:
            opt.register_load_state_dict_pre_hook(_torch_load_pre_hook2)
        opt.register_load_state_dict_post_hook(_torch_load_post_hook)
        opt.load_state_dict(opt.state_dict())
        assert bool(opt.state["ran_load_state_dict_pre_hook2"]) is with_pre_hook, kwargs  # a tensor for a tensor lr
        assert opt.state["ran_load_state_dict_post_hook"] is True
        assert set(opt.state[param]) == set(before)
        for key, value in before.items():
            assert torch.equal(opt.state[param][key], value), key
            assert opt.state[param][key].device == param.device
        param.grad = torch.rand_like(param)
        opt.step()
        assert int(opt.state[param]["step"]) == steps + 1
        assert state_memory(opt).total_bytes > 0


def test_paged_deepcopy_and_pickle_keep_non_dict_state_entries():
    """A paged optimizer whose ``state`` holds a hook's entry still deep-copies and pickles (its residency caches
    are rebuilt from the params' states only)."""
    params = _params()
    opt = PagedAdamW8bit(params, gpu_budget_bytes=0)
    _train(opt, params, 1, torch.Generator().manual_seed(1))
    opt.state["note"] = True
    twin = copy.deepcopy(opt)
    assert twin.state["note"] is True
    buffer = io.BytesIO()
    torch.save(opt, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=False).state["note"] is True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("budget", [0, None])
def test_cuda_paging_is_bit_identical_and_keeps_pages_pinned(budget):
    def run(cls, **kw):
        params = _params("cuda")
        opt = cls(params, lr=1e-2, weight_decay=0.05, **kw)
        _train(opt, params, 6, torch.Generator().manual_seed(1), nan_at=3)
        return params, opt

    ref_params, ref_opt = run(AdamW8bit)
    params, opt = run(PagedAdamW8bit, gpu_budget_bytes=budget)
    opt.state_dict()  # drains the copy stream
    _assert_same(params, opt, ref_params, ref_opt)
    for p in params:
        state = opt.state[p]
        if "exp_avg_codes" in state:
            assert state["exp_avg_codes"].device.type == "cpu" and state["exp_avg_codes"].is_pinned()
            assert state["step"].is_cuda
    mem = state_memory(opt)
    assert mem.host_bytes > 0 and mem.device_bytes > 0


# ---------------------------------------------------------------------------------------------- paging plan
def _replay(plan, nbytes, resident):
    """Run a plan on a model of the device: the resident set after it, the peak bytes on the device during it,
    the keys fetched and the keys evicted (checking every update touches only resident keys)."""
    on_device = dict.fromkeys(resident)
    peak = sum(nbytes[k] for k in on_device)
    fetched, evicted = [], []
    for action in plan:
        if action.kind == "fetch":
            assert action.keys[0] not in on_device
            on_device[action.keys[0]] = None
            fetched += action.keys
        elif action.kind == "evict":
            for key in action.keys:
                del on_device[key]
            evicted += action.keys
        else:
            assert all(k in on_device for k in action.keys), action
        peak = max(peak, sum(nbytes[k] for k in on_device))
    return list(on_device), peak, fetched, evicted


def _act(kind, *keys):
    return PageAction(kind, keys)


SIZES = {"a": 40, "b": 30, "c": 20, "d": 10}


def test_plan_fits_keeps_everything_resident_and_updates_in_one_call():
    order = list(SIZES)
    first = plan_paging(order, SIZES, [], budget=100)
    after, peak, fetched, evicted = _replay(first, SIZES, [])
    assert fetched == order and evicted == [] and sorted(after) == sorted(order) and peak == 100
    assert plan_paging(order, SIZES, after, budget=100) == [PageAction("update", tuple(order))]


def test_plan_half_budget_keeps_a_prefix_and_streams_the_rest_with_prefetch():
    order = list(SIZES)
    warm = _replay(plan_paging(order, SIZES, [], budget=50), SIZES, [])[0]
    assert warm == ["a", "d"]  # a fits (40), b and c would not, d still does
    plan = plan_paging(order, SIZES, warm, budget=50)
    assert plan == [_act("fetch", "b"), _act("update", "a", "d"),  # b's copy is issued before the batch: overlap
                    _act("fetch", "c"), _act("update", "b"), _act("evict", "b"),  # c prefetched before b's update
                    _act("update", "c"), _act("evict", "c")]
    after, peak, fetched, evicted = _replay(plan, SIZES, warm)
    assert after == ["a", "d"] and fetched == ["b", "c"] and evicted == ["b", "c"]
    assert peak <= 50 + 30 + 20  # kept + the two largest streamed


def test_plan_without_prefetch_fetches_just_before_each_update():
    plan = plan_paging(["c", "d"], SIZES, [], budget=0, prefetch=False)
    assert plan == [PageAction("fetch", ("c",)), PageAction("update", ("c",)), PageAction("evict", ("c",)),
                    PageAction("fetch", ("d",)), PageAction("update", ("d",)), PageAction("evict", ("d",))]


def test_plan_evicts_idle_residents_first_and_keeps_those_that_fit():
    # d and a resident; this step only updates b and c: a (idle) must go to make room, d (idle, small) stays
    plan = plan_paging(["b", "c"], SIZES, ["a", "d"], budget=60)
    assert plan[0] == PageAction("evict", ("a",))
    after, peak, _, _ = _replay(plan, SIZES, ["a", "d"])
    assert sorted(after) == ["b", "c", "d"] and peak <= 60 + 40
    with pytest.raises(ValueError, match="budget"):
        plan_paging(["a"], SIZES, [], budget=-1)


def _stats_step(opt, params, gen):
    before = dict(opt.paging_stats)
    _grads(params, gen)
    opt.step()
    return {k: opt.paging_stats[k] - before[k] for k in before}


@pytest.mark.parametrize("budget_part", [1.0, 0.5], ids=["fits", "half"])
def test_paging_traffic_and_bit_identity_over_many_steps(budget_part):
    """Budget covering the state: after the first step no copy at all and one update call per step. Half of
    it: only the streamed (evicted) tensors are copied, once each way per step. Both bit-identical to
    AdamW8bit over 12 steps with a skipped one."""
    total = sum(_page_bytes(n) for n in QUANTIZED_NUMELS)
    budget = int(total * budget_part)
    ref_params = _params()
    ref_opt = AdamW8bit(ref_params, lr=1e-2, weight_decay=0.05)
    params = _params()
    opt = PagedAdamW8bit(params, lr=1e-2, weight_decay=0.05, gpu_budget_bytes=budget)
    gen_ref, gen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    kept = []
    for step in range(12):
        _grads(ref_params, gen_ref, nan_step=step == 5)
        ref_opt.step()
        before = dict(opt.paging_stats)
        _grads(params, gen, nan_step=step == 5)
        opt.step()
        delta = {k: opt.paging_stats[k] - before[k] for k in before}
        if step == 0:
            assert delta["to_device_copies"] == 4 and delta["to_device_bytes"] == total
            kept = [p for p in opt._resident]
            continue
        streamed = [_page_bytes(p.numel()) for p in params if p.numel() >= 4096 and all(p is not k for k in kept)]
        assert delta["to_host_bytes"] == delta["to_device_bytes"] == sum(streamed)
        assert delta["to_host_copies"] == delta["to_device_copies"] == len(streamed)
        assert delta["update_calls"] == (1 if kept else 0) + len(streamed)
    if budget_part == 1.0:
        assert len(kept) == 4 and opt.paging_stats["to_host_copies"] == 0
    else:
        assert 0 < len(kept) < 4 and sum(r.nbytes for r in opt._resident.values()) <= budget
    assert opt.skipped_updates == ref_opt.skipped_updates == 1
    _assert_same(params, opt, ref_params, ref_opt)


@pytest.mark.parametrize("load_into", [PagedAdamW8bit, AdamW8bit])
def test_state_dict_mid_run_sees_resident_state(load_into):
    """Resident buffers updated since their fetch are in state_dict (flushed), and the run continues bit for
    bit after a load, from the saved dict and in the original optimizer."""
    ref_params, ref_opt = _reference(steps=7, nan_at=None)
    gen = torch.Generator().manual_seed(1)
    params = _params()
    opt = PagedAdamW8bit(params, lr=1e-2, weight_decay=0.05, gpu_budget_bytes=10**9)
    _train(opt, params, 4, gen)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    assert opt.paging_stats["to_host_copies"] == 4 and len(opt._resident) == 4  # flushed, still resident
    buffer.seek(0)
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    second = load_into(resumed_params, lr=0.5)
    second.load_state_dict(torch.load(buffer))
    gen_copy = copy.deepcopy(gen)
    _train(second, resumed_params, 3, gen)
    _assert_same(resumed_params, second, ref_params, ref_opt)
    _train(opt, params, 3, gen_copy)  # the original keeps going from its resident buffers
    _assert_same(params, opt, ref_params, ref_opt)


def test_deepcopy_of_a_resident_optimizer_steps_identically():
    """deepcopy flushes the resident buffers first: the copy (which starts with nothing resident) steps as the
    original does."""
    params = _params()
    opt = PagedAdamW8bit(params, lr=1e-2, gpu_budget_bytes=10**9)
    _train(opt, params, 2, torch.Generator().manual_seed(1))
    twin = copy.deepcopy(opt)
    assert not twin._resident and len(opt._resident) == 4
    twin_params = twin.param_groups[0]["params"]
    _train(opt, params, 2, torch.Generator().manual_seed(2))
    _train(twin, twin_params, 2, torch.Generator().manual_seed(2))
    _assert_same(params, opt, twin_params, twin)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_resident_state_moves_no_bytes_after_warm_up_and_stays_bit_identical():
    """A budget covering the state on CUDA: after the first step no copy either way and one update call per
    step; state_dict (which flushes through the side stream) and params equal AdamW8bit's."""
    params = _params("cuda")
    opt = PagedAdamW8bit(params, lr=1e-2, weight_decay=0.05, gpu_budget_bytes=10**9)
    ref_params = _params("cuda")
    ref_opt = AdamW8bit(ref_params, lr=1e-2, weight_decay=0.05)
    gen, gen_ref = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    _train(opt, params, 1, gen)
    _train(ref_opt, ref_params, 1, gen_ref)
    before = dict(opt.paging_stats)
    _train(opt, params, 5, gen, nan_at=2)
    _train(ref_opt, ref_params, 5, gen_ref, nan_at=2)
    delta = {k: opt.paging_stats[k] - before[k] for k in before}
    assert delta == {"to_device_copies": 0, "to_device_bytes": 0, "to_host_copies": 0, "to_host_bytes": 0,
                     "update_calls": 5}
    _assert_same(params, opt, ref_params, ref_opt)
