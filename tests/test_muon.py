"""Muon (``muon``, ``muon_8bit``): torch.optim.Muon parity, the 8-bit distance, the fused kernel against its
reference, batched Newton–Schulz, the hybrid split, state dicts, resume, skips, release, clipping.

Distances stated here (and in the issue note): ``muon`` equals ``torch.optim.Muon`` bit for bit on the CPU
over 12 steps; ``muon_8bit`` stays within 2% (relative Frobenius distance of the parameter displacement)
of it over 30 steps on matrices with 8-bit momentum.
"""

import math
import sys
from pathlib import Path

import pytest
import torch
from torch.optim._muon import _zeropower_via_newtonschulz

from lowmem_lightning.kernels import dispatch
from lowmem_lightning.kernels.codec import quantize_reference
from lowmem_lightning.kernels.muon import NS_COEFFICIENTS, muon_momentum, newton_schulz
from lowmem_lightning.optim import build_optimizer, state_memory
from lowmem_lightning.optim.muon import Muon, Muon8bit, uses_muon

sys.path.insert(0, str(Path(__file__).parent))
from optim_helpers import (  # noqa: E402
    assert_non_finite_gradient_skips_that_tensor,
    assert_state_dict_round_trip_is_bit_exact,
    random_grads,
)

SHAPES = [(96, 40), (40, 96), (64, 64), (4097, 3), (96, 40)]  # tall, wide, square, very tall; a repeated shape
MODES = [
    {},
    {"nesterov": False},
    {"adjust_lr_fn": "match_rms_adamw", "weight_decay": 0.0},
    {"adjust_lr_fn": "original", "momentum": 0.9, "ns_steps": 3, "eps": 1e-5,
     "ns_coefficients": (3.0, -3.2, 1.2)},
]


def _run(factory, params0, grads, clip=None):
    params = [torch.nn.Parameter(p.clone()) for p in params0]
    opt = factory(params)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
    return params, opt


@pytest.mark.parametrize("kwargs", MODES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "defaults")
def test_muon_equals_torch_muon_bit_for_bit(kwargs):
    params0 = [torch.randn(s) for s in SHAPES]
    grads = random_grads(SHAPES, 12)
    ours, opt = _run(lambda p: build_optimizer("muon", p, lr=0.02, **kwargs), params0, grads)
    ref, _ = _run(lambda p: torch.optim.Muon(p, lr=0.02, **kwargs), params0, grads)
    assert isinstance(opt, Muon)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b), tuple(a.shape)


def test_muon_with_clipping_and_a_scheduler_equals_torch_muon():
    params0 = [torch.randn(s) for s in SHAPES[:3]]
    grads = random_grads(SHAPES[:3], 12)
    runs = []
    for factory in (lambda p: build_optimizer("muon", p, lr=0.05), lambda p: torch.optim.Muon(p, lr=0.05)):
        params = [torch.nn.Parameter(p.clone()) for p in params0]
        opt = factory(params)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=12)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
        runs.append(params)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def _displacement_distance(ours, ref, start) -> float:
    num = sum(float((a.detach() - b.detach()).double().square().sum()) for a, b in zip(ours, ref))
    den = sum(float((b.detach() - s).double().square().sum()) for b, s in zip(ref, start))
    return math.sqrt(num / den)


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_8bit_within_two_percent_of_torch_muon(nesterov):
    shapes = [(128, 64), (64, 128), (4097, 3), (64, 64)]  # 8-bit momentum from 4096 elements
    params0 = [torch.randn(s) for s in shapes]
    grads = random_grads(shapes, 30)
    ours, opt = _run(lambda p: build_optimizer("muon_8bit", p, lr=0.02, nesterov=nesterov), params0, grads)
    ref, _ = _run(lambda p: torch.optim.Muon(p, lr=0.02, nesterov=nesterov), params0, grads)
    assert isinstance(opt, Muon8bit) and "momentum_codes" in opt.state[ours[0]]
    distance = _displacement_distance(ours, ref, params0)
    assert distance < 0.02, distance
    fp32, _ = _run(lambda p: build_optimizer("muon", p, lr=0.02, nesterov=nesterov), params0, grads)
    assert _displacement_distance(fp32, ref, params0) == 0.0


def test_muon_8bit_state_is_about_1_02_bytes_per_param():
    params = [torch.nn.Parameter(torch.randn(1024, 512)), torch.nn.Parameter(torch.randn(512, 1024))]
    opt = build_optimizer("muon_8bit", params, lr=0.02)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    memory = state_memory(opt)
    assert 1.015 <= memory.bytes_per_param <= 1.02, memory
    assert opt.state[params[0]]["momentum_codes"].dtype == torch.int8


# ---------------------------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("shape", [(4, 64, 64), (3, 96, 40), (2, 40, 96), (1, 4097, 3), (1, 40, 96)])
@pytest.mark.parametrize("steps", [5, 4, 1])
def test_batched_newton_schulz_equals_torch_per_matrix(shape, steps):
    """Batched (and one-matrix) Newton–Schulz, products written into reused buffers, equals torch's loop bit for
    bit for wide and tall (transposed) matrices and an odd or even number of steps; the input is not changed."""
    x = torch.randn(shape)
    before = x.clone()
    ours = newton_schulz(x, NS_COEFFICIENTS, steps, 1e-7)
    assert ours.dtype == torch.bfloat16 and ours.shape == x.shape
    assert torch.equal(x, before)
    for a, m in zip(ours, x):
        assert torch.equal(a, _zeropower_via_newtonschulz(m, NS_COEFFICIENTS, steps, 1e-7))


def _momentum_inputs(n: int, quantized: bool, grad_dtype: torch.dtype):
    gen = torch.Generator().manual_seed(n)
    grad = torch.randn(n, generator=gen).to(grad_dtype)
    if quantized:
        codes, absmax = quantize_reference(torch.randn(n, generator=gen), signed=True)
        return grad, codes, absmax
    return grad, torch.randn(n, generator=gen), None


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "int8"])
@pytest.mark.parametrize(("n", "grad_dtype"), [(4097 * 3, torch.float32), (1000, torch.bfloat16),
                                               (5000, torch.float16), (4096, torch.float32)])
@pytest.mark.parametrize(("momentum", "nesterov", "maximize"), [(0.95, True, False), (0.3, False, True)])
def test_triton_kernel_equals_reference_bit_for_bit(force_triton, quantized, n, grad_dtype, momentum, nesterov,
                                                    maximize):
    """The fused momentum + quantization kernel (interpreter) stores the reference's codes, scales, fp32
    momentum and bf16 U exactly, for both branches of torch's lerp (momentum 0.95 and 0.3)."""
    grad, buf, absmax = _momentum_inputs(n, quantized, grad_dtype)
    runs = []
    for triton in (False, True):
        b, a = buf.clone(), None if absmax is None else absmax.clone()
        out = torch.empty(n, dtype=torch.bfloat16)
        with dispatch.override(force_triton=triton):
            muon_momentum([grad], [b], [a], [torch.tensor(2.0)], [torch.tensor(1.0)], [out], momentum=momentum,
                          nesterov=nesterov, maximize=maximize)
        runs.append((b, a, out))
    (b0, a0, u0), (b1, a1, u1) = runs
    assert torch.equal(b0, b1) and torch.equal(u0, u1)
    assert a0 is None or torch.equal(a0, a1)


def _hard_momentum_inputs(blocks: int, seed: int, weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 grad ``(blocks, 256)`` and 8-bit momentum whose blocks hold what an encode finds hard: all zeros,
    values 1e-30 of the block maximum (codes 0), signed zeros, huge and tiny scales, and 64 blocks whose new
    momentum (``weight * grad`` from a zero momentum, block maximum ~1) sweeps +-64 ulps around every
    boundary between two codes, ``((k + 1/2) / 127)**2`` (where a square root one ulp off changes codes)."""
    from lowmem_lightning.kernels.codec import BLOCK_SIZE

    gen = torch.Generator().manual_seed(seed)
    mom = torch.randn(blocks, BLOCK_SIZE, generator=gen) * torch.logspace(-30, 30, blocks).view(-1, 1)
    mom[0] = 0.0
    mom[1, ::2] = -0.0
    mom[2, 1:] *= 1e-30
    mom[3] = (torch.arange(BLOCK_SIZE) - 127.5) / 127.5  # halves of code steps after the lerp's scaling
    grad = torch.randn(blocks, BLOCK_SIZE, generator=gen) * torch.logspace(20, -20, blocks).view(-1, 1)
    grad[0] = 0.0
    grad[4] = 0.0  # momentum * (1 - w) only
    bounds = (((torch.arange(127, dtype=torch.float64) + 0.5) / 127) ** 2).float().view(torch.int32)
    sweep = (bounds.view(-1, 1) + torch.arange(-64, 64, dtype=torch.int32)).view(torch.float32).view(64, -1)
    mom[5:69] = 0.0
    grad[5:69, 0] = 1.0 / weight  # the block maximum
    grad[5:69, 1:] = torch.nn.functional.pad(sweep, (0, BLOCK_SIZE - 1 - sweep.size(1)), value=0.5) / weight
    codes, absmax = quantize_reference(mom.reshape(-1), signed=True)
    return grad, codes.view(blocks, BLOCK_SIZE), absmax.view(blocks, 1)


@pytest.mark.parametrize(("momentum", "nesterov"), [(0.95, True), (0.3, False), (0.5, True)])
@pytest.mark.parametrize("seed", [0, 1])
def test_fast_8bit_host_step_equals_the_reference(momentum, nesterov, seed):
    """The CPU's 8-bit momentum step (numpy square root, fewer passes) stores the specification's codes and
    scales and writes its U bit for bit, on random blocks and on the hard ones (zeros, signed zeros, code 0,
    exact cancellation, scales 1e-30..1e30), for both branches of torch's lerp."""
    from lowmem_lightning.kernels.muon import MuonScalars, muon_momentum_8bit_host, muon_momentum_reference

    scalars = MuonScalars.of(momentum, nesterov, False)
    grad, codes, absmax = _hard_momentum_inputs(300, seed, scalars.weight_buf)
    ref_codes, ref_absmax = codes.clone(), absmax.clone()
    u_ref = muon_momentum_reference(grad, ref_codes, ref_absmax, *scalars).to(torch.bfloat16)
    out = torch.empty(grad.shape, dtype=torch.bfloat16)
    muon_momentum_8bit_host(grad, codes, absmax, out, scalars.weight_buf, scalars.weight_nesterov, nesterov)
    assert not torch.equal(codes, _hard_momentum_inputs(300, seed, scalars.weight_buf)[1])  # the step changed it
    assert torch.equal(codes, ref_codes), f"{int((codes != ref_codes).sum())} codes differ"
    assert torch.equal(absmax.view(torch.int32), ref_absmax.view(torch.int32))  # bits: +0.0 stays +0.0
    assert torch.equal(out.view(torch.int16), u_ref.view(torch.int16))


def test_fast_8bit_host_step_with_a_reused_workspace_equals_the_reference():
    """The 8-bit host step writes the same bits through one scratch reused, dirty, over matrices of two sizes
    (as ``_host`` passes it) as without one."""
    from lowmem_lightning.kernels.codec import BLOCK_SIZE
    from lowmem_lightning.kernels.muon import MuonScalars, muon_momentum_8bit_host

    scalars = MuonScalars.of(0.95, True, False)
    work = torch.full((3 * 300 * BLOCK_SIZE,), float("nan"))
    for blocks, seed in ((300, 0), (120, 1), (300, 2)):
        grad, codes, absmax = _hard_momentum_inputs(blocks, seed, scalars.weight_buf)
        ref_codes, ref_absmax = codes.clone(), absmax.clone()
        out, ref_out = (torch.empty(grad.shape, dtype=torch.bfloat16) for _ in range(2))
        muon_momentum_8bit_host(grad, ref_codes, ref_absmax, ref_out, *scalars[:2], True)
        muon_momentum_8bit_host(grad, codes, absmax, out, *scalars[:2], True, work)
        assert torch.equal(codes, ref_codes) and torch.equal(absmax.view(torch.int32), ref_absmax.view(torch.int32))
        assert torch.equal(out.view(torch.int16), ref_out.view(torch.int16))


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "int8"])
def test_triton_kernel_leaves_momentum_untouched_when_flag_is_zero(force_triton, quantized):
    grad, buf, absmax = _momentum_inputs(4097, quantized, torch.float32)
    b, a = buf.clone(), None if absmax is None else absmax.clone()
    muon_momentum([grad], [b], [a], [torch.tensor(2.0)], [torch.tensor(0.0)], [torch.empty(4097, dtype=torch.bfloat16)],
                  momentum=0.95, nesterov=True)
    assert torch.equal(b, buf) and (a is None or torch.equal(a, absmax))


def test_optimizer_on_triton_equals_cpu_path(force_triton):
    shapes = [(96, 64), (33, 7), (300,)]
    params0 = [torch.randn(s) for s in shapes]
    grads = random_grads(shapes, 3)
    ours, _ = _run(lambda p: build_optimizer("muon_8bit", p, lr=0.02), params0, grads)
    with dispatch.override(force_triton=False):
        ref, _ = _run(lambda p: build_optimizer("muon_8bit", p, lr=0.02), params0, grads)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- the hybrid
class _LM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(50, 64)
        self.block = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 64))
        self.norm = torch.nn.LayerNorm(64)
        self.lm_head = torch.nn.Linear(64, 50, bias=False)

    def forward(self, idx):
        return self.lm_head(self.norm(self.block(self.embed_tokens(idx))))


def _lm_step(model, opt, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 50, (4, 9), generator=gen)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten()).backward()
    opt.step()


def test_uses_muon_finds_embeddings_and_head_by_name():
    w = torch.zeros(4, 4)
    assert uses_muon(w, "model.layers.0.self_attn.q_proj.weight")
    assert not uses_muon(w, "model.embed_tokens.weight")
    assert not uses_muon(w, "transformer.wte.weight")
    assert not uses_muon(w, "lm_head.weight") and not uses_muon(w, "output.weight")
    assert not uses_muon(torch.zeros(4), "model.layers.0.mlp.up_proj.bias")
    assert uses_muon(w) and not uses_muon(torch.zeros(2, 2, 2))
    assert not uses_muon(w, "model.layers.0.q_proj.weight", use_muon=False)
    assert uses_muon(w, "lm_head.weight", use_muon=True)


def test_hybrid_split_from_named_parameters_in_one_optimizer():
    model = _LM()
    opt = build_optimizer("muon_8bit", model.named_parameters(), lr=0.02)
    _lm_step(model, opt, 0)
    muon = {n for n, p in model.named_parameters() if "momentum_codes" in opt.state[p]
            or "momentum_buffer" in opt.state[p]}
    assert muon == {"block.0.weight", "block.2.weight"}
    adam = {n for n, p in model.named_parameters() if {"exp_avg_sq_codes", "exp_avg_sq"} & set(opt.state[p])}
    assert adam == {n for n, _ in model.named_parameters()} - muon
    sd = opt.state_dict()
    assert len(sd["param_groups"]) == 1 and len(sd["state"]) == len(list(model.parameters()))


def test_adamw_part_equals_adamw_8bit():
    """The non-Muon params take exactly AdamW8bit's update with adamw_betas and adamw_eps."""
    model, twin = _LM(), _LM()
    twin.load_state_dict(model.state_dict())
    opt = build_optimizer("muon_8bit", [{"params": list(model.parameters()), "use_muon": False}], lr=1e-3,
                          adamw_betas=(0.8, 0.9), adamw_eps=1e-7, weight_decay=0.01)
    ref = build_optimizer("adamw_8bit", twin.parameters(), lr=1e-3, betas=(0.8, 0.9), eps=1e-7, weight_decay=0.01)
    for seed in range(3):
        _lm_step(model, opt, seed)
        _lm_step(twin, ref, seed)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_named_groups_override_the_split():
    model = _LM()
    hidden = [model.block[0].weight, model.block[2].weight]
    rest = [p for p in model.parameters() if all(p is not h for h in hidden)]
    opt = build_optimizer("muon", [{"params": hidden, "use_muon": True, "lr": 0.02},
                                   {"params": rest, "use_muon": False, "lr": 3e-4}])
    _lm_step(model, opt, 0)
    assert "momentum_buffer" in opt.state[hidden[0]] and "exp_avg" in opt.state[model.lm_head.weight]
    with pytest.raises(ValueError, match=r"use_muon=True .* shape \(64,\).*2-D"):
        build_optimizer("muon", [{"params": [model.norm.weight], "use_muon": True}])


# ---------------------------------------------------------------------------------------------- bookkeeping
@pytest.mark.parametrize("name", ["muon", "muon_8bit"])
def test_state_dict_round_trip_is_bit_exact(name):
    assert_state_dict_round_trip_is_bit_exact(lambda p: build_optimizer(name, p, lr=0.02))


@pytest.mark.parametrize("name", ["muon", "muon_8bit"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e30])
def test_non_finite_gradient_skips_that_tensor(name, bad):
    assert_non_finite_gradient_skips_that_tensor(lambda p: build_optimizer(name, p, lr=0.02), bad)


def test_loads_a_torch_muon_state_dict_into_both_momentum_dtypes():
    """3 torch.optim.Muon steps, its state dict loaded, 3 of ours: ``muon`` ends where 6 torch steps do, bit for
    bit; ``muon_8bit`` (the momentum quantized on load) within 2%."""
    shapes = [(96, 64), (4097, 3)]
    params0 = [torch.randn(s) for s in shapes]
    grads = random_grads(shapes, 6)
    straight, _ = _run(lambda p: torch.optim.Muon(p, lr=0.02), params0, grads)
    first, torch_opt = _run(lambda p: torch.optim.Muon(p, lr=0.02), params0, grads[:3])
    for name in ("muon", "muon_8bit"):
        params = [torch.nn.Parameter(p.detach().clone()) for p in first]
        opt = build_optimizer(name, params, lr=0.02)
        opt.load_state_dict(torch_opt.state_dict())
        assert float(opt.state[params[0]]["step"]) == 1.0
        assert ("momentum_codes" in opt.state[params[0]]) == (name == "muon_8bit")
        for step_grads in grads[3:]:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        distance = _displacement_distance(params, straight, params0)
        assert distance == 0.0 if name == "muon" else distance < 0.02, (name, distance)


def test_load_refuses_a_state_of_the_wrong_shape():
    params = [torch.nn.Parameter(torch.randn(64, 64))]
    opt = build_optimizer("muon", params, lr=0.02)
    params[0].grad = torch.randn(64, 64)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["momentum_buffer"] = torch.zeros(64, 63)
    with pytest.raises(ValueError, match=r"param 0 state 'momentum_buffer' is torch.float32 \(64, 63\)"):
        opt.load_state_dict(sd)


@pytest.mark.parametrize("name", ["muon", "muon_8bit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gradient_release_equals_a_normal_step(name, dtype):
    from test_gradient_release import _assert_same_run, _train

    _assert_same_run(_train(name, {"lr": 0.02}, dtype, release=False), _train(name, {"lr": 0.02}, dtype, release=True))


def test_bf16_params_keep_small_updates_on_average():
    p = torch.nn.Parameter(torch.ones(64, 64, dtype=torch.bfloat16))
    opt = build_optimizer("muon", [p], lr=1e-4, weight_decay=0.0)
    total = torch.zeros(64, 64)
    for _ in range(20):
        p.grad = torch.ones(64, 64, dtype=torch.bfloat16)
        before = p.detach().float()
        opt.step()
        total += p.detach().float() - before
    assert total.abs().sum() > 0  # 1e-4 * O is far below bf16's half ulp at 1.0 (2**-8): only SR moves it


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"lr": -1.0}, r"Invalid learning rate: -1.0"),
    ({"momentum": -0.1}, r"momentum"),
    ({"ns_steps": 100}, r"Invalid ns_steps=100: expected an int in \[0, 100\)"),
    ({"ns_coefficients": (1.0, 2.0)}, r"Invalid ns_coefficients=\(1.0, 2.0\)"),
    ({"adjust_lr_fn": "rms"}, r"Invalid adjust_lr_fn='rms': expected one of None, 'original', 'match_rms_adamw'"),
    ({"momentum_dtype": "int4"}, r"Invalid momentum_dtype='int4'"),
    ({"adamw_betas": (0.9, 1.0)}, r"adamw_betas"),
    ({"use_muon": "yes"}, r"Invalid use_muon='yes'"),
])
def test_invalid_arguments_are_refused_naming_them(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build_optimizer("muon", [torch.nn.Parameter(torch.randn(8, 8))], **kwargs)


@pytest.mark.parametrize("name", ["muon", "muon_8bit"])
def test_lowmem_estimate_row_equals_the_real_hybrid_state(name):
    """``lowmem estimate``'s muon rows (built from the model's names, on the meta device) = state_memory of
    the optimizer the callback builds, after one step."""
    from lowmem_lightning.estimate import OPTIMIZER_VARIANTS, estimate_memory

    with torch.device("meta"):
        meta = _LM()
    row = estimate_memory(meta).optimizers[name]
    model = _LM()
    opt = build_optimizer(name, model.named_parameters(), **OPTIMIZER_VARIANTS[name][1])
    _lm_step(model, opt, 0)
    assert row.state_bytes == state_memory(opt).total_bytes


@pytest.mark.slow  # two torch.compile graphs: ~30-60 s on a loaded 2-core machine
@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "int8"])
@pytest.mark.parametrize(("n", "maximize"), [(4097 * 3, False), (2**14, True)])
def test_compiled_cpu_path_equals_eager(cpu_compile, quantized, n, maximize):
    """The compiled host step (one fused pass: decode, lerp, encode, nesterov lerp, bf16 U) stores the eager
    step's momentum (codes and scales) and writes its U, bit for bit (maximizing too). fp32 momentum: the fused
    step is called directly (the CPU runs fp32 momentum eagerly whatever ``cpu_compile`` says)."""
    from lowmem_lightning.kernels.muon import MuonScalars, _fp_contraction, _host_momentum

    grad, buf, absmax = _momentum_inputs(n, quantized, torch.float32)
    runs = []
    for mode in ("never", "always"):
        b, a, out = buf.clone(), None if absmax is None else absmax.clone(), torch.empty(n, dtype=torch.bfloat16)
        if quantized or mode == "never":
            with dispatch.override(cpu_compile=mode):
                muon_momentum([grad], [b], [a], [torch.tensor(2.0)], [torch.tensor(1.0)], [out], momentum=0.95,
                              nesterov=True, maximize=maximize)
        else:
            scalars = MuonScalars.of(0.95, True, maximize)
            with _fp_contraction():
                _host_momentum(grad, b, None, out, scalars, dispatch.pack(scalars))
        runs.append((b, a, out))
    assert not torch.equal(runs[0][0], buf)
    for x, y in zip(*runs):
        assert x is None or torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("flag", [1.0, 0.0])
def test_apply_kernel_equals_reference(force_triton, dtype, flag):
    """The fused update (decoupled decay, step, stochastic rounding) writes the reference's params: fp32
    within one ulp (the kernel's fma), bf16/fp16 the same values but where that ulp crosses a rounding
    draw; nothing where the flag is 0."""
    from lowmem_lightning.kernels.muon import muon_apply

    gen = torch.Generator().manual_seed(4)
    param = torch.randn(97, 45, generator=gen).to(dtype)
    update = torch.randn(97, 45, generator=gen).to(torch.bfloat16)
    runs = []
    for triton in (False, True):
        p = param.clone()
        with dispatch.override(force_triton=triton):
            muon_apply([p], [update], [torch.tensor(flag)], [torch.tensor(3.0)], [7], [0.013], lr=0.01,
                       weight_decay=0.1)
        runs.append(p)
    if flag == 0.0:
        assert torch.equal(runs[1], param) and torch.equal(runs[0], param)
        return
    assert not torch.equal(runs[1], param)
    if dtype == torch.float32:
        torch.testing.assert_close(runs[1], runs[0], rtol=2e-7, atol=0)
    else:
        assert (runs[1] != runs[0]).float().mean() < 1e-3


@pytest.mark.slow  # torch.compile of the fused steps: ~20-40 s on a loaded 2-core machine
@pytest.mark.parametrize("kwargs", MODES[:3], ids=["defaults", "no-nesterov", "match_rms_adamw"])
def test_compiled_muon_equals_torch_muon_bit_for_bit(cpu_compile, kwargs):
    """With ``cpu_compile="always"`` (the CPU keeps fp32 momentum eager; the fused fp32 pass is checked in
    ``test_compiled_cpu_path_equals_eager``) ``muon`` still equals ``torch.optim.Muon`` bit for bit, momentum
    included, on odd shapes whose flat lengths leave a vector tail."""
    params0 = [torch.randn(s) for s in SHAPES]
    grads = random_grads(SHAPES, 6)
    ours, opt = _run(lambda p: build_optimizer("muon", p, lr=0.02, **kwargs), params0, grads)
    ref, ref_opt = _run(lambda p: torch.optim.Muon(p, lr=0.02, **kwargs), params0, grads)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b), tuple(a.shape)
        # the momentum too: a lerp rounded twice changes it long before a bf16 U shows it
        assert torch.equal(opt.state[a]["momentum_buffer"], ref_opt.state[b]["momentum_buffer"]), tuple(a.shape)


@pytest.mark.slow  # torch.compile of the fused 8-bit step
@pytest.mark.parametrize(("momentum", "nesterov"), [(0.95, True), (0.3, False)])
def test_compiled_8bit_step_equals_the_reference_on_hard_blocks(cpu_compile, momentum, nesterov):
    """The compiled 8-bit step stores the specification's codes and scales and writes its U bit for bit on the
    hard blocks (code-boundary sweep: the compiled square root must be the correctly rounded one)."""
    from lowmem_lightning.kernels.muon import MuonScalars, muon_momentum_reference

    scalars = MuonScalars.of(momentum, nesterov, False)
    grad, codes, absmax = _hard_momentum_inputs(300, 0, scalars.weight_buf)
    ref_codes, ref_absmax = codes.clone(), absmax.clone()
    u_ref = muon_momentum_reference(grad, ref_codes, ref_absmax, *scalars).to(torch.bfloat16)
    out = torch.empty(grad.numel(), dtype=torch.bfloat16)
    muon_momentum([grad.reshape(-1)], [codes.view(-1)], [absmax.view(-1)], [torch.tensor(2.0)], [torch.tensor(1.0)],
                  [out], momentum=momentum, nesterov=nesterov)
    assert torch.equal(codes, ref_codes), f"{int((codes != ref_codes).sum())} codes differ"
    assert torch.equal(absmax.view(torch.int32), ref_absmax.view(torch.int32))
    assert torch.equal(out.view(torch.int16), u_ref.view(torch.int16).view(-1))


def test_cpu_backend_choice_per_momentum_dtype():
    """On the CPU fp32 momentum runs eagerly whatever ``cpu_compile`` says; 8-bit momentum compiles under
    ``"auto"`` from ``MUON_COMPILE_MIN_NUMEL`` elements per batch, below that it keeps what dispatch chose
    (``"never"`` keeps it eager, ``"always"`` compiled)."""
    from lowmem_lightning.kernels.muon import MUON_COMPILE_MIN_NUMEL, MuonTensors, _host_backend

    def tensors(quantized, n=MUON_COMPILE_MIN_NUMEL):
        absmax = torch.zeros(n // 256) if quantized else None
        return MuonTensors([torch.empty(n, dtype=torch.bfloat16)], [torch.zeros(n)], [torch.zeros(n)],
                           [absmax], [torch.tensor(1.0)], [torch.tensor(1.0)])

    for mode in ("auto", "always", "never"):
        with dispatch.override(cpu_compile=mode):
            assert _host_backend(tensors(False), "compiled") == "eager"
            assert _host_backend(tensors(False), "eager") == "eager"
            assert _host_backend(tensors(True), "eager") == ("compiled" if mode == "auto" else "eager")
            assert _host_backend(tensors(True, 4096), "eager") == "eager"
            assert _host_backend(tensors(True), "compiled") == "compiled"


@pytest.mark.parametrize("shape", [(3, 40, 96), (2, 96, 40), (1, 64, 64), (1, 97, 31)])
def test_newton_schulz_in_a_scratch_equals_fresh_buffers(shape):
    """``newton_schulz`` with a ``work`` scratch (dirty, larger than needed) gives the bits of fresh buffers, wide,
    tall and single matrices; a scratch too small or not bf16 is refused naming what it needs."""
    from lowmem_lightning.kernels.muon import ns_work_numel

    x = torch.randn(shape).bfloat16()
    work = torch.full((ns_work_numel(shape) + 7,), float("nan"), dtype=torch.bfloat16)
    assert torch.equal(newton_schulz(x.clone(), work=work), newton_schulz(x.clone()))
    for bad in (work[:ns_work_numel(shape) - 1], work.float()):
        with pytest.raises(ValueError, match="bf16 scratch of at least"):
            newton_schulz(x, work=bad)


def test_cpu_optimizer_keeps_one_newton_schulz_scratch_across_steps():
    """The CPU optimizer reuses one scratch for every batch and step (no fresh multi-MiB buffers per step) and
    still equals ``torch.optim.Muon``; a deep copy starts without it."""
    import copy

    shapes = [(64, 64), (64, 64), (48, 80), (80, 48)]
    params0 = [torch.randn(s) for s in shapes]
    grads = random_grads(shapes, 3)
    ours, opt = _run(lambda p: build_optimizer("muon", p, lr=0.02), params0, grads[:2])
    scratch = opt._ns_work
    assert scratch is not None and scratch.dtype == torch.bfloat16
    for p, g in zip(ours, grads[2]):
        p.grad = g.clone()
    opt.step()
    assert opt._ns_work is scratch
    ref, _ = _run(lambda p: torch.optim.Muon(p, lr=0.02), params0, grads)
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))
    assert copy.deepcopy(opt)._ns_work is None


@pytest.mark.parametrize("name", ["muon", "muon_8bit"])
def test_unnamed_matrices_warn_once_and_named_ones_do_not(name):
    """``model.parameters()`` (or HF Trainer's optimizer_cls_and_kwargs) gives Muon no names: the embedding takes
    the Muon update, so the user is told once; named params, or groups that decide use_muon, stay quiet."""
    import warnings

    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    with pytest.warns(UserWarning, match=r"2 2-D param\(s\) without names.*named_parameters\(\)"):
        build_optimizer(name, model.parameters(), lr=0.02)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_optimizer(name, model.named_parameters(), lr=0.02)
        build_optimizer(name, [{"params": [model[0].weight], "use_muon": False},
                               {"params": [model[1].weight], "use_muon": True}], lr=0.02)
