"""AdEMAMix / AdEMAMix8bit: the Triton kernel (interpreter) equals the reference bit for bit, with and without
the warmup schedules; ``ademamix`` follows a plain PyTorch AdEMAMix (the paper's Algorithm 1) and, with
``alpha=0``, torch's AdamW; ``ademamix_8bit`` tracks it; the compiled CPU path equals the eager one; state
takes ~3.05 bytes/param; each form loads the other's state dicts. bitsandbytes is the oracle where installed."""

import math

import pytest
import torch

from lowmem_lightning.kernels import dispatch
from lowmem_lightning.kernels.ademamix import AdEMAMixScalars, schedule_reference
from lowmem_lightning.optim import build_optimizer, state_memory
from lowmem_lightning.optim.ademamix import AdEMAMix, AdEMAMix8bit

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(4097,), (1000, 3), (7, 11)]  # 8-bit with a partial block, 8-bit 2-D, fp32 state (< 4096)
SCHEDULES = [dict(), dict(t_alpha=4, t_beta3=3)]


def _params(dtype=torch.float32, shapes=SHAPES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.5).to(dtype)) for s in shapes]


def _grads(shapes, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) * 0.1 for s in shapes] for _ in range(steps)]


def _train(opt, params, grads, grad_dtype=None, nan_at=None):
    for p in params:
        p.grad_dtype = None  # torch >= 2.10: allow a gradient dtype other than the param's
    for step, step_grads in enumerate(grads):
        for i, (p, g) in enumerate(zip(params, step_grads)):
            p.grad = g.to(grad_dtype or p.dtype, copy=True)
            if nan_at == (step, i):
                p.grad.view(-1)[5] = float("nan")
        opt.step()
    return opt


def _bits(t):
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=["constant", "warmups"])
@pytest.mark.parametrize("cls", [AdEMAMix, AdEMAMix8bit])
@pytest.mark.parametrize("param_dtype, grad_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                     (torch.float16, torch.float32)])
def test_triton_kernel_equals_reference(cls, schedule, param_dtype, grad_dtype):
    """Three steps over odd shapes; a NaN gradient in step 2 leaves that tensor (and its step counter, so its
    schedule) behind on both paths. Params and every state tensor equal bit for bit."""
    grads = _grads(SHAPES, 3)
    runs = []
    for force in (True, False):
        params = _params(param_dtype)
        with dispatch.override(force_triton=force):
            opt = _train(cls(params, lr=1e-2, weight_decay=0.1, **schedule), params, grads, grad_dtype, nan_at=(1, 1))
        runs.append((params, opt))
    (tri, opt_t), (ref, opt_r) = runs
    for p, q, p0 in zip(tri, ref, _params(param_dtype)):
        assert torch.equal(_bits(p), _bits(q)) and not torch.equal(p, p0)
        assert opt_t.state[p].keys() == opt_r.state[q].keys()
        for key, value in opt_r.state[q].items():
            assert torch.equal(_bits(opt_t.state[p][key]), _bits(value)), key
    assert opt_t.skipped_updates == opt_r.skipped_updates == 1


def _plain_ademamix(params, grads, lr, betas, alpha, eps, weight_decay, t_alpha=None, t_beta3=None):
    """AdEMAMix written out in plain PyTorch (Pagliardini et al. 2024, Algorithm 1 and the schedules of
    section 3), in float64."""
    beta1, beta2, beta3_end = betas
    ps = [p.detach().clone().double() for p in params]
    state = [[torch.zeros_like(p) for _ in range(3)] for p in ps]
    for t, step_grads in enumerate(grads, start=1):
        a = min(t * alpha / t_alpha, alpha) if t_alpha else alpha
        b3 = beta3_end
        if t_beta3:
            log1, log3 = math.log(beta1), math.log(beta3_end)
            b3 = min(math.exp(log1 * log3 / ((1 - t / t_beta3) * log3 + t / t_beta3 * log1)), beta3_end)
        for p, (m1, m2, nu), g in zip(ps, state, step_grads):
            g = g.double()
            m1.mul_(beta1).add_((1 - beta1) * g)
            m2.mul_(b3).add_((1 - b3) * g)
            nu.mul_(beta2).add_((1 - beta2) * g * g)
            denom = (nu / (1 - beta2 ** t)).sqrt() + eps
            p.sub_(lr * ((m1 / (1 - beta1 ** t) + a * m2) / denom + weight_decay * p))
    return ps


@pytest.mark.parametrize("schedule", [dict(), dict(t_alpha=5, t_beta3=4), dict(t_alpha=3), dict(t_beta3=6)])
def test_ademamix_follows_plain_pytorch_ademamix(schedule):
    grads = _grads(SHAPES, 8)
    params = _params()
    kwargs = dict(lr=1e-2, betas=(0.8, 0.99, 0.999), alpha=4.0, eps=1e-8, weight_decay=0.1)
    _train(AdEMAMix(params, **kwargs, **schedule), params, grads)
    expected = _plain_ademamix(_params(), grads, **kwargs, **schedule)
    for p, q in zip(params, expected):
        torch.testing.assert_close(p.detach().double(), q, rtol=1e-5, atol=1e-6)


def test_alpha_zero_is_adamw():
    """Without the slow EMA AdEMAMix is AdamW (decoupled weight decay, bias corrections): torch's AdamW."""
    grads = _grads(SHAPES, 6)
    ours, theirs = _params(), _params()
    _train(AdEMAMix(ours, lr=1e-2, betas=(0.9, 0.999, 0.9999), alpha=0.0, weight_decay=0.05), ours, grads)
    _train(torch.optim.AdamW(theirs, lr=1e-2, betas=(0.9, 0.999), weight_decay=0.05), theirs, grads)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


def test_schedules_start_low_and_reach_their_targets():
    s = AdEMAMixScalars.of(1e-3, (0.9, 0.999, 0.9999), 8.0, 1e-8, 0.0, False, t_alpha=100, t_beta3=200)
    values = schedule_reference(torch.tensor([0.0, 1.0, 50.0, 100.0, 200.0, 1000.0]), s)
    alpha, beta3 = values.unbind(-1)
    torch.testing.assert_close(alpha, torch.tensor([0.0, 0.08, 4.0, 8.0, 8.0, 8.0]))
    assert beta3[0] == pytest.approx(0.9, abs=1e-6) and beta3[4] == pytest.approx(0.9999, abs=1e-6)
    assert bool((beta3[1:] >= beta3[:-1]).all()) and float(beta3.max()) <= 0.9999 + 1e-7
    # the half-life of the beta3 EMA grows linearly in t (the paper's design of the schedule)
    half_life = math.log(0.5) / torch.log(beta3[:5].double())
    torch.testing.assert_close(half_life.diff()[1:] / torch.tensor([49.0, 50.0, 100.0], dtype=torch.float64),
                               torch.full((3,), float(half_life[4] - half_life[0]) / 200, dtype=torch.float64),
                               rtol=1e-3, atol=0)
    constant = schedule_reference(torch.tensor([1.0, 7.0]), s._replace(t_alpha=0.0, t_beta3=0.0))
    assert torch.equal(constant, torch.tensor([[8.0, 0.9999], [8.0, 0.9999]]))


def _quadratic_run(name, steps=60, shape=(128, 128), **kwargs):
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(shape, generator=gen)
    p = torch.nn.Parameter(torch.zeros(shape))
    opt = build_optimizer(name, [p], **kwargs)
    for _ in range(steps):
        p.grad = (p.detach() - target) + 0.5 * torch.randn(shape, generator=gen)
        opt.step()
    return p.detach(), target


@pytest.mark.parametrize("schedule", SCHEDULES, ids=["constant", "warmups"])
def test_ademamix_8bit_tracks_fp32_ademamix(schedule):
    """Distance of the 8-bit run from the fp32 run, relative to the distance moved (measured 0.011 on
    256x256 x 100 steps)."""
    full, target = _quadratic_run("ademamix", lr=1e-2, **schedule)
    eight, _ = _quadratic_run("ademamix_8bit", lr=1e-2, **schedule)
    assert float((full - eight).norm() / full.norm()) < 0.03
    assert float((eight - target).norm()) < 0.7 * float(target.norm())


def test_state_layout_and_bytes_per_param():
    big, small = torch.nn.Parameter(torch.zeros(1024, 1024)), torch.nn.Parameter(torch.zeros(100))
    opt = AdEMAMix8bit([big, small])
    for p in (big, small):
        p.grad = torch.randn(p.shape)
    opt.step()
    expected = {"step": (torch.float32, ())}
    for name, dtype in (("exp_avg", torch.int8), ("exp_avg_slow", torch.int8), ("exp_avg_sq", torch.uint8)):
        expected.update({f"{name}_codes": (dtype, (1024 * 1024,)), f"{name}_absmax": (torch.float32, (4096,))})
    assert {k: (v.dtype, tuple(v.shape)) for k, v in opt.state[big].items()} == expected
    assert set(opt.state[small]) == {"step", "exp_avg", "exp_avg_slow", "exp_avg_sq"}
    only_big = AdEMAMix8bit([big])
    big.grad = torch.randn(big.shape)
    only_big.step()
    mem = state_memory(only_big)
    assert mem.total_bytes == 3 * (1024 * 1024 + 4096 * 4) + 4
    assert round(mem.bytes_per_param, 2) == 3.05
    fp32 = AdEMAMix([big])
    fp32.step()
    assert state_memory(fp32).total_bytes == 12 * 1024 * 1024 + 4


@pytest.mark.parametrize("source, target", [(AdEMAMix, AdEMAMix8bit), (AdEMAMix8bit, AdEMAMix)])
def test_each_form_loads_the_others_state_dict(source, target):
    grads = _grads(SHAPES, 3)
    params = _params()
    opt = _train(source(params, lr=1e-2, t_alpha=4), params, grads[:2])
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    loaded = target(twins, lr=1e-2, t_alpha=4)
    loaded.load_state_dict(opt.state_dict())
    names = ("exp_avg", "exp_avg_slow", "exp_avg_sq")
    big_keys = {f"{n}_{s}" for n in names for s in ("codes", "absmax")} if target is AdEMAMix8bit else set(names)
    assert set(loaded.state[twins[0]]) == {"step"} | big_keys
    assert set(loaded.state[twins[2]]) == {"step", *names}
    _train(opt, params, grads[2:])
    _train(loaded, twins, grads[2:])
    for p, q in zip(params, twins):
        moved = float((p.detach() - q.detach()).abs().max())
        assert moved < 2e-3, moved  # one step of lr 1e-2 with moments within 8-bit rounding


@pytest.mark.slow  # compiles the two bucket steps (~60 s on a loaded 2-core machine)
def test_compiled_cpu_path_equals_eager_and_does_not_recompile_per_lr(cpu_compile):
    from torch._dynamo.utils import counters

    shapes = [(4097,), (300, 256), (30,)]
    grads = _grads(shapes, 4)
    results = []
    for mode in ("always", "never"):
        params = _params(torch.bfloat16, shapes)
        with dispatch.override(cpu_compile=mode):
            opt = AdEMAMix8bit(params, lr=1e-2, weight_decay=0.1, t_alpha=3, t_beta3=3)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
            for k, step_grads in enumerate(grads):
                _train(opt, params, [step_grads])
                sched.step()
                if k == 1:
                    graphs = counters["stats"]["unique_graphs"]
            if mode == "always":
                assert counters["stats"]["unique_graphs"] == graphs
        results.append((params, opt))
    (compiled, opt_c), (eager, opt_e) = results
    for p, q in zip(compiled, eager):
        assert torch.equal(_bits(p), _bits(q))
        for key, value in opt_e.state[q].items():
            assert torch.equal(opt_c.state[p][key], value), key


@pytest.mark.gpu
def test_bitsandbytes_ademamix_is_the_oracle():
    """bitsandbytes' AdEMAMix (32-bit) and AdEMAMix8bit on CUDA against ours (no schedules: bnb's default)."""
    bnb = pytest.importorskip("bitsandbytes")
    if not torch.cuda.is_available():
        pytest.skip("bitsandbytes' optimizers need CUDA")
    shape = (512, 256)
    grads = [[g.cuda() for g in step] for step in _grads([shape], 20)]
    start = _params(shapes=[shape])[0].cuda()
    for theirs, ours, tol in ((bnb.optim.AdEMAMix32bit, "ademamix", 1e-4), (bnb.optim.AdEMAMix8bit, "ademamix_8bit",
                                                                          0.05)):
        pa, pb = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
        _train(theirs([pa], lr=1e-3, weight_decay=0.01), [pa], grads)
        _train(build_optimizer(ours, [pb], lr=1e-3, weight_decay=0.01), [pb], grads)
        moved = float((pa.detach() - start).norm())
        assert float((pa.detach() - pb.detach()).norm()) <= tol * moved + 1e-6, ours
