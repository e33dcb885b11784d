"""AdEMAMix / AdEMAMix8bit: the Triton kernel (interpreter) equals the reference bit for bit, with and without
the warmup schedules; ``ademamix`` follows a plain PyTorch AdEMAMix (the paper's Algorithm 1) and, with
``alpha=0``, torch's AdamW; ``ademamix_8bit`` tracks it; the compiled CPU path equals the eager one; state
takes ~3.05 bytes/param; each form loads the other's state dicts. bitsandbytes is the oracle where installed."""

import math

import pytest
import torch
from optim_helpers import (
    ODD_SHAPES,
    assert_compiled_equals_eager_without_recompiling,
    assert_matches_peer_on_cuda,
    assert_triton_kernel_equals_reference,
    quadratic_run,
    random_grads,
    seeded_params,
    train,
)

from lowmem_lightning.kernels.ademamix import AdEMAMixScalars, schedule_reference
from lowmem_lightning.optim import state_memory
from lowmem_lightning.optim.ademamix import AdEMAMix, AdEMAMix8bit

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEDULES = [dict(), dict(t_alpha=4, t_beta3=3)]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=["constant", "warmups"])
@pytest.mark.parametrize("cls", [AdEMAMix, AdEMAMix8bit])
@pytest.mark.parametrize("param_dtype, grad_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                     (torch.float16, torch.float32)])
def test_triton_kernel_equals_reference(cls, schedule, param_dtype, grad_dtype):
    """Three steps over odd shapes; a NaN gradient in step 2 leaves that tensor (and its step counter, so its
    schedule) behind on both paths. Params and every state tensor equal bit for bit."""
    assert_triton_kernel_equals_reference(lambda params: cls(params, lr=1e-2, weight_decay=0.1, **schedule),
                                          param_dtype, grad_dtype)


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
    grads = random_grads(ODD_SHAPES, 8, scale=0.1)
    params = seeded_params()
    kwargs = dict(lr=1e-2, betas=(0.8, 0.99, 0.999), alpha=4.0, eps=1e-8, weight_decay=0.1)
    train(AdEMAMix(params, **kwargs, **schedule), params, grads)
    expected = _plain_ademamix(seeded_params(), grads, **kwargs, **schedule)
    for p, q in zip(params, expected):
        torch.testing.assert_close(p.detach().double(), q, rtol=1e-5, atol=1e-6)


def test_alpha_zero_is_adamw():
    """Without the slow EMA AdEMAMix is AdamW (decoupled weight decay, bias corrections): torch's AdamW."""
    grads = random_grads(ODD_SHAPES, 6, scale=0.1)
    ours, theirs = seeded_params(), seeded_params()
    train(AdEMAMix(ours, lr=1e-2, betas=(0.9, 0.999, 0.9999), alpha=0.0, weight_decay=0.05), ours, grads)
    train(torch.optim.AdamW(theirs, lr=1e-2, betas=(0.9, 0.999), weight_decay=0.05), theirs, grads)
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


@pytest.mark.parametrize("schedule", SCHEDULES, ids=["constant", "warmups"])
def test_ademamix_8bit_tracks_fp32_ademamix(schedule):
    """Distance of the 8-bit run from the fp32 run, relative to the distance moved (measured 0.011 on
    256x256 x 100 steps)."""
    full, target = quadratic_run("ademamix", lr=1e-2, **schedule)
    eight, _ = quadratic_run("ademamix_8bit", lr=1e-2, **schedule)
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
    grads = random_grads(ODD_SHAPES, 3, scale=0.1)
    params = seeded_params()
    opt = train(source(params, lr=1e-2, t_alpha=4), params, grads[:2])
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    loaded = target(twins, lr=1e-2, t_alpha=4)
    loaded.load_state_dict(opt.state_dict())
    names = ("exp_avg", "exp_avg_slow", "exp_avg_sq")
    big_keys = {f"{n}_{s}" for n in names for s in ("codes", "absmax")} if target is AdEMAMix8bit else set(names)
    assert set(loaded.state[twins[0]]) == {"step"} | big_keys
    assert set(loaded.state[twins[2]]) == {"step", *names}
    train(opt, params, grads[2:])
    train(loaded, twins, grads[2:])
    for p, q in zip(params, twins):
        moved = float((p.detach() - q.detach()).abs().max())
        assert moved < 2e-3, moved  # one step of lr 1e-2 with moments within 8-bit rounding


@pytest.mark.slow  # compiles the two bucket steps (~60 s on a loaded 2-core machine)
def test_compiled_cpu_path_equals_eager_and_does_not_recompile_per_lr(cpu_compile):
    assert_compiled_equals_eager_without_recompiling(
        lambda params: AdEMAMix8bit(params, lr=1e-2, weight_decay=0.1, t_alpha=3, t_beta3=3))


@pytest.mark.gpu
def test_bitsandbytes_ademamix_is_the_oracle():
    """bitsandbytes' AdEMAMix (32-bit) and AdEMAMix8bit on CUDA against ours (no schedules: bnb's default)."""
    bnb = pytest.importorskip("bitsandbytes")
    if not torch.cuda.is_available():
        pytest.skip("bitsandbytes' optimizers need CUDA")
    assert_matches_peer_on_cuda([(bnb.optim.AdEMAMix32bit, "ademamix", 1e-4),
                                 (bnb.optim.AdEMAMix8bit, "ademamix_8bit", 0.05)], {"lr": 1e-3, "weight_decay": 0.01})
