"""Lion / Lion8bit: the Triton kernel (interpreter) equals the reference bit for bit, ``lion`` follows a plain
PyTorch Lion (decoupled weight decay), ``lion_8bit`` tracks it, the compiled CPU path equals the eager
one without recompiling per LR, state takes ~1.02 bytes/param, and each form loads the other's state dicts.
bitsandbytes is the oracle where installed (CUDA)."""

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

from lowmem_lightning.optim import build_optimizer, state_memory
from lowmem_lightning.optim.lion import Lion, Lion8bit

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
               (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("cls", [Lion, Lion8bit])
@pytest.mark.parametrize("param_dtype, grad_dtype", DTYPE_PAIRS)
def test_triton_kernel_equals_reference(cls, param_dtype, grad_dtype):
    """Three steps over odd shapes, one multi-tensor launch per group; a NaN gradient in step 2 leaves that
    tensor untouched on both paths. Params and every state tensor equal bit for bit."""
    assert_triton_kernel_equals_reference(lambda params: cls(params, lr=1e-2, weight_decay=0.1), param_dtype,
                                          grad_dtype)


def _plain_lion(params, grads, lr, betas, weight_decay, maximize=False):
    """Lion written out in plain PyTorch (Chen et al. 2023, Algorithm 2 with decoupled weight decay)."""
    beta1, beta2 = betas
    ps = [p.detach().clone().float() for p in params]
    ms = [torch.zeros_like(p) for p in ps]
    for step_grads in grads:
        for p, m, g in zip(ps, ms, step_grads):
            g = -g if maximize else g
            p.mul_(1 - lr * weight_decay)
            p.add_(torch.sign(beta1 * m + (1 - beta1) * g), alpha=-lr)
            m.mul_(beta2).add_((1 - beta2) * g)
    return ps


@pytest.mark.parametrize("maximize", [False, True])
def test_lion_follows_plain_pytorch_lion(maximize):
    grads = random_grads(ODD_SHAPES, 5, scale=0.1)
    params = seeded_params()
    train(Lion(params, lr=1e-2, betas=(0.8, 0.95), weight_decay=0.3, maximize=maximize), params, grads)
    expected = _plain_lion(seeded_params(), grads, 1e-2, (0.8, 0.95), 0.3, maximize)
    for p, q in zip(params, expected):
        torch.testing.assert_close(p.detach(), q, rtol=1e-6, atol=1e-6)


def test_weight_decay_is_decoupled_from_the_sign():
    """A coupled (L2) decay would turn sign(g + wd * p) positive here; Lion's decoupled decay keeps the
    direction of the gradient and shrinks the weight: p = p * (1 - lr * wd) + lr."""
    p = torch.nn.Parameter(torch.full((4,), 10.0))
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    p.grad = torch.full((4,), -1.0)
    opt.step()
    assert torch.equal(p.detach(), torch.full((4,), 10.0 * (1 - 0.1 * 0.5) + 0.1))


def test_lion_8bit_tracks_fp32_lion():
    """Distance of the 8-bit run from the fp32 run, relative to the distance moved (measured 0.014 on
    256x256 x 100 steps); and both approach the target."""
    full, target = quadratic_run("lion", lr=1e-2, weight_decay=0.1)
    eight, _ = quadratic_run("lion_8bit", lr=1e-2, weight_decay=0.1)
    assert float((full - eight).norm() / full.norm()) < 0.03
    assert float((eight - target).norm()) < 0.7 * float(target.norm())  # from 1.0 at the start


def test_state_layout_and_bytes_per_param():
    big, small = torch.nn.Parameter(torch.zeros(1024, 1024)), torch.nn.Parameter(torch.zeros(100))
    opt = Lion8bit([big, small])
    for p in (big, small):
        p.grad = torch.randn(p.shape)
    opt.step()
    assert {k: (v.dtype, tuple(v.shape)) for k, v in opt.state[big].items()} == {
        "step": (torch.float32, ()), "exp_avg_codes": (torch.int8, (1024 * 1024,)),
        "exp_avg_absmax": (torch.float32, (4096,))}
    assert set(opt.state[small]) == {"step", "exp_avg"} and opt.state[small]["exp_avg"].dtype == torch.float32
    only_big = Lion8bit([big])
    big.grad = torch.randn(big.shape)
    only_big.step()
    mem = state_memory(only_big)
    assert mem.total_bytes == 1024 * 1024 + 4096 * 4 + 4
    assert round(mem.bytes_per_param, 2) == 1.02
    fp32 = Lion([big])
    fp32.step()
    assert state_memory(fp32).total_bytes == 4 * 1024 * 1024 + 4


@pytest.mark.parametrize("source, target", [(Lion, Lion8bit), (Lion8bit, Lion)])
def test_each_form_loads_the_others_state_dict(source, target):
    """fp32 momentum is quantized on load into Lion8bit (codes equal to quantizing it), 8-bit codes are decoded
    into Lion; the next step then differs from the source's by no more than the 8-bit rounding."""
    grads = random_grads(ODD_SHAPES, 3, scale=0.1)
    params = seeded_params()
    opt = train(source(params, lr=1e-2), params, grads[:2])
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    loaded = target(twins, lr=1e-2)
    loaded.load_state_dict(opt.state_dict())
    assert set(loaded.state[twins[0]]) == ({"step", "exp_avg_codes", "exp_avg_absmax"} if target is Lion8bit
                                           else {"step", "exp_avg"})
    assert set(loaded.state[twins[2]]) == {"step", "exp_avg"}  # small: fp32 in both forms
    assert float(loaded.state[twins[0]]["step"]) == 2.0
    train(opt, params, grads[2:])
    train(loaded, twins, grads[2:])
    for p, q in zip(params, twins):
        p, q = p.detach(), q.detach()
        assert float((p - q).abs().max()) <= 2 * 1e-2 + 1e-6  # at most one flipped sign per element
        assert float((p - q).abs().mean()) < 1e-3


def test_another_optimizers_state_is_refused():
    params = seeded_params()
    opt = train(Lion8bit(params, lr=1e-2), params, random_grads(ODD_SHAPES, 1, scale=0.1))
    adamw = build_optimizer("adamw_8bit", [torch.nn.Parameter(p.detach().clone()) for p in params])
    with pytest.raises(ValueError, match="exp_avg_sq"):
        adamw.load_state_dict(opt.state_dict())


@pytest.mark.slow  # compiles the two bucket steps (~45 s on a loaded 2-core machine)
def test_compiled_cpu_path_equals_eager_and_does_not_recompile_per_lr(cpu_compile):
    assert_compiled_equals_eager_without_recompiling(lambda params: Lion8bit(params, lr=1e-2, weight_decay=0.1))


@pytest.mark.gpu
def test_bitsandbytes_lion_is_the_oracle():
    """bitsandbytes' Lion (32-bit) and Lion8bit on CUDA against ours, same hyperparameters and gradients."""
    bnb = pytest.importorskip("bitsandbytes")
    if not torch.cuda.is_available():
        pytest.skip("bitsandbytes' optimizers need CUDA")
    assert_matches_peer_on_cuda([(bnb.optim.Lion32bit, "lion", 1e-5), (bnb.optim.Lion8bit, "lion_8bit", 0.05)],
                                {"lr": 1e-3, "betas": (0.9, 0.99), "weight_decay": 0.1})
