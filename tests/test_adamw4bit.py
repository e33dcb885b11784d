"""adamw_4bit: the Triton kernel (interpreter) against the reference, the codes, accuracy on the codec
study's noisy quadratic, the state layout and bytes, strict and converted state dicts, bit-exact
resume, the overflow guard and the compiled CPU path."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from lowmem_lightning.kernels import adamw4bit as kernel
from lowmem_lightning.kernels import dispatch
from lowmem_lightning.optim import build_optimizer, state_memory
from lowmem_lightning.optim.adamw4bit import AdamW4bit

ODD_SHAPES = [(4097,), (1000, 5), (96, 128), (7, 3)]  # odd 1-D, odd 2-D, aligned, fp32-state (small)


@pytest.fixture(autouse=True)
def _one_cpu_thread(one_thread):
    """Every test on one intra-op thread (the shared conftest fixture)."""
    yield


def _params(dtype=torch.float32, shapes=ODD_SHAPES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).to(dtype)) for s in shapes]


def _run(params, steps, grad_dtype=torch.float32, inf_at=None, opt=None, first=0, **kwargs):
    opt = opt or AdamW4bit(params, lr=1e-2, weight_decay=0.1, seed=3, **kwargs)
    for p in params:
        if p.dtype != grad_dtype:
            p.grad_dtype = None  # torch >= 2.10 checks that grads match the param dtype unless told not to
    for step in range(first, first + steps):
        gen = torch.Generator().manual_seed(100 + step)
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * 0.01).to(grad_dtype)
        if inf_at == step:
            params[1].grad.view(-1)[3] = float("inf")
        opt.step()
    return opt


def _assert_same(params_a, opt_a, params_b, opt_b):
    for i, (a, b) in enumerate(zip(params_a, params_b)):
        assert torch.equal(a.view(torch.int8) if a.dtype != torch.float32 else a,
                           b.view(torch.int8) if b.dtype != torch.float32 else b), f"param {i}"
        sa, sb = opt_a.state[a], opt_b.state[b]
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"param {i} state {key}: {(sa[key] != sb[key]).sum()} differ"


@pytest.mark.parametrize("param_dtype,grad_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                    (torch.float16, torch.float32)])
def test_triton_kernel_stores_the_reference_codes(param_dtype, grad_dtype):
    """Interpreter vs reference: every param bit, code byte and absmax equal (no tolerance), including
    a tensor skipped for an inf gradient at step 1."""
    ref_params = _params(param_dtype)
    ref = _run(ref_params, 3, grad_dtype, inf_at=1)
    tri_params = _params(param_dtype)
    with dispatch.override(force_triton=True):
        tri = _run(tri_params, 3, grad_dtype, inf_at=1)
    _assert_same(ref_params, ref, tri_params, tri)
    assert ref.skipped_updates == tri.skipped_updates == 1


def test_state_layout_two_codes_per_byte_and_bytes_per_param():
    params = _params(shapes=[(256, 256)])
    opt = _run(params, 1)
    state = opt.state[params[0]]
    assert state["exp_avg_codes"].dtype == state["exp_avg_sq_codes"].dtype == torch.uint8
    assert state["exp_avg_codes"].shape == (256 * 256 // 2,)
    assert state["exp_avg_absmax"].shape == state["exp_avg_sq_absmax"].shape == (256 * 256 // 128,)
    memory = state_memory(opt)
    assert memory.bytes_per_param == pytest.approx(1 + 8 / 128, abs=1e-3)  # + the 4-byte step counter
    assert 1.0625 <= memory.bytes_per_param < 1.0626


def test_m_code_is_unbiased_and_v_code_never_decodes_zero():
    x = torch.linspace(-1, 1, 1001).repeat(4000, 1)  # (4000, 1001): the block absmax is 1
    u = kernel.hash_uniform_reference(torch.arange(x.numel()).view(x.shape), 12345)
    decoded = kernel.decode_m4_reference(kernel.encode_m4_reference(x, torch.ones(1), u), torch.ones(1))
    assert (decoded.mean(0) - x[0]).abs().max() < 0.01  # E[decode(encode(x))] = x (4000 draws per value)
    nearest = kernel.decode_m4_reference(kernel.encode_m4_reference(x[:1], torch.ones(1), None), torch.ones(1))
    levels = torch.tensor([(k / 7) ** 2 for k in range(8)])
    assert torch.equal((nearest.abs().unsqueeze(-1) - levels).abs().argmin(-1),
                       (x[:1].abs().unsqueeze(-1) - levels).abs().argmin(-1))
    v = torch.cat([torch.zeros(1), torch.logspace(-30, 0, 127)])  # one block, max 1
    codes, absmax = kernel.quantize4_reference(v, signed=False)
    back = kernel.dequantize4_reference(codes, absmax, v.numel(), signed=False)
    assert back.min() == pytest.approx((1 / 16) ** 4)  # the lowest level, never 0
    assert back[-1] == 1.0
    big = v > 0.01
    assert ((back[big] / v[big]) ** 0.25 - 1).abs().max() < 1 / 16 / 0.3  # within half a level of the root


def test_m_code_rounds_to_nearest_unless_that_keeps_the_previous_code():
    """The stall-aware m rounding: where the nearest code differs from the previous one it is taken; where it
    equals it (a stalled EMA step) the code is the unbiased stochastic one."""
    x = torch.linspace(-1, 1, 1001).repeat(4000, 1)
    u = kernel.hash_uniform_reference(torch.arange(x.numel()).view(x.shape), 777)
    one = torch.ones(1)
    nearest = kernel.encode_m4_reference(x, one, None)
    stochastic = kernel.encode_m4_reference(x, one, u)
    assert torch.equal(kernel.encode_m4_reference(x, one, u, previous=(nearest + 1) & 15), nearest)
    stalled = kernel.encode_m4_reference(x, one, u, previous=nearest)
    assert torch.equal(stalled, stochastic) and not torch.equal(stalled, nearest)
    assert (kernel.decode_m4_reference(stalled, one).mean(0) - x[0]).abs().max() < 0.01
    mixed = torch.where(torch.arange(1001) % 2 == 0, nearest, (nearest + 1) & 15)  # stalled on even columns
    out = kernel.encode_m4_reference(x, one, u, previous=mixed)
    assert torch.equal(out[:, 0::2], stochastic[:, 0::2]) and torch.equal(out[:, 1::2], nearest[:, 1::2])


@pytest.mark.parametrize("shape", [(3, 128), (77,), (5, 6, 2)])
def test_pack_and_unpack_nibbles_round_trip(shape):
    """Element ``2j`` in the low nibble of byte ``j``, ``2j + 1`` in the high one, every byte checked (the
    packers reinterpret int16 views on little-endian hosts); non-contiguous inputs too."""
    nibbles = torch.randint(0, 16, shape[:-1] + (2 * shape[-1],), dtype=torch.int32)
    packed = kernel.pack_nibbles_reference(nibbles)
    assert packed.shape == shape and packed.dtype == torch.uint8
    assert torch.equal(packed, (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).to(torch.uint8))
    assert torch.equal(kernel.unpack_nibbles_reference(packed), nibbles)
    strided = torch.randint(0, 256, shape[:-1] + (2 * shape[-1],), dtype=torch.uint8)[..., ::2]
    unpacked = kernel.unpack_nibbles_reference(strided)
    assert torch.equal(unpacked[..., 0::2], strided.to(torch.int32) & 15)
    assert torch.equal(unpacked[..., 1::2], strided.to(torch.int32) >> 4)
    wide = torch.zeros(shape[:-1] + (4 * shape[-1],), dtype=torch.int32)
    wide[..., ::2] = unpacked
    assert torch.equal(kernel.pack_nibbles_reference(wide[..., ::2]), strided)


@pytest.mark.parametrize("offset", range(9))
def test_nibbles_read_as_int64_words_at_any_storage_offset(offset):
    """The int64-word unpack (rows of a multiple of 8 bytes) and fold pack give the bytes of the interleaving
    form; a view starting off a word boundary (a state tensor inside a larger buffer) takes the int16 path."""
    buffer = torch.randint(0, 256, (offset + 6 * 64,), dtype=torch.uint8)
    codes = buffer[offset:].view(6, 64)
    expected = torch.stack([codes.to(torch.int32) & 15, codes.to(torch.int32) >> 4], dim=-1).flatten(-2)
    assert torch.equal(kernel.unpack_nibbles_reference(codes), expected)
    assert torch.equal(kernel.pack_nibbles_reference(expected), codes)
    nibble_bytes = torch.zeros(offset + expected.numel(), dtype=torch.uint8)[offset:].view(expected.shape)
    assert torch.equal(kernel.pack_nibbles_reference(nibble_bytes.copy_(expected)), codes)


@pytest.mark.slow
def test_compiled_step_with_state_codes_off_word_boundaries():
    """State codes that are views starting off an 8-byte boundary: the compiled bucket step (which reads codes
    as int64 words) steps a copy and writes it back, bit for bit as eager (compiles once, ~1 min)."""
    def shifted(opt):
        for state in opt.state.values():
            for key in ("exp_avg_codes", "exp_avg_sq_codes"):
                if key in state:
                    buffer = torch.zeros(state[key].numel() + 3, dtype=torch.uint8)
                    state[key] = buffer[3:].copy_(state[key])
        return opt

    shapes = [(300, 301), (65536 * 2 + 77,)]
    eager_params, compiled_params = _params(shapes=shapes), _params(shapes=shapes)
    eager = _run(eager_params, 2, opt=shifted(_run(eager_params, 1)), first=1)
    with dispatch.override(cpu_compile="always"):
        compiled = _run(compiled_params, 2, opt=shifted(_run(compiled_params, 1)), first=1)
    assert all(s["exp_avg_codes"].storage_offset() == 3 for s in compiled.state.values() if "exp_avg_codes" in s)
    _assert_same(eager_params, eager, compiled_params, compiled)


def _noisy_quadratic(size: int, steps: int, build):
    """The codec study's noisy quadratic: ``g = h * (p - target) + 0.01 h * noise``, ``h = r_i c_j``
    log-normal (sigma 0.5); returns ``||p - p_adamw|| / ||p_adamw - p0||``."""
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(size, size, generator=gen) * 0.1
    h = torch.exp(0.5 * torch.randn(size, 1, generator=gen)) * torch.exp(0.5 * torch.randn(1, size, generator=gen))
    target = torch.randn(size, size, generator=gen) * 0.1
    finals = []
    for make in (lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.0), build):
        param = torch.nn.Parameter(p0.clone())
        opt = make([param])
        noise = torch.Generator().manual_seed(1)
        for _ in range(steps):
            param.grad = h * (param.detach() - target) + 0.01 * h * torch.randn(size, size, generator=noise)
            opt.step()
        finals.append(param.detach())
    ref, ours = finals
    return float((ours - ref).norm() / (ref - p0).norm())


def test_noisy_quadratic_error_is_a_third_of_torchaos_scheme():
    """256x256, 200 steps: torchao's AdamW4bit scheme (dynamic-exponent m, linear v without zero,
    round to nearest) measures 0.384 here (RESULTS.md); ours must stay under a third of it."""
    error = _noisy_quadratic(256, 200, lambda ps: AdamW4bit(ps, lr=1e-3, weight_decay=0.0))
    assert error < 0.384 / 3, error


def _codec_study():
    """``benchmarks/codec_study.py`` as a module (it is a script, not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "codec_study.py"
    spec = importlib.util.spec_from_file_location("bench_codec_study_4bit", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_codec_study_stall_release_spans_nearest_and_the_stall_aware_rule():
    """The study's damped stall release (issue 29.4): the same m twice stalls every element; with release ``p``
    a stalled element moves with ``p`` times the frequency of ``p = 1`` (the stall-aware rule), ``p = 0`` is
    round-to-nearest, and a ``p`` outside [0, 1] is refused."""
    cs = _codec_study()
    power2 = torch.tensor([(1 if k > 0 else -1) * (k / 7) ** 2 for k in range(-7, 8)])
    m = torch.randn(512, 128, generator=torch.Generator().manual_seed(0))
    nearest = cs._block_round_trip(m, power2, cs._nearest_level, True)
    moved = {}
    for p in (1.0, 0.25, 0.0):
        code = cs.StallAwareLevels(power2, seed=3, release=p)
        assert torch.equal(code(m), nearest)  # no previous codes: nearest
        moved[p] = float((code(m) != nearest).float().mean())
    assert moved[0.0] == 0.0
    assert moved[1.0] > 0.2, moved
    assert abs(moved[0.25] / moved[1.0] - 0.25) < 0.02, moved
    with pytest.raises(ValueError, match="release must be a probability in \\[0, 1\\], got 1.5"):
        cs.StallAwareLevels(power2, seed=3, release=1.5)


def test_torch_adamw_state_dict_is_quantized_and_8bit_converted():
    from lowmem_lightning.callbacks import CONVERSIONS

    assert ("adamw", "adamw_4bit") in CONVERSIONS  # the callback lets a fp32 AdamW checkpoint resume as 4-bit
    params = _params()
    torch_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    source = torch.optim.AdamW(torch_params, lr=1e-2, weight_decay=0.1)
    for p in torch_params:
        p.grad = torch.randn_like(p) * 0.01
    source.step()
    opt = AdamW4bit(params, lr=1e-2, weight_decay=0.1)
    opt.load_state_dict(source.state_dict())
    state = opt.state[params[0]]
    m = kernel.dequantize4_reference(state["exp_avg_codes"], state["exp_avg_absmax"], params[0].numel(), True)
    v = kernel.dequantize4_reference(state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"], params[0].numel(), False)
    full = source.state[torch_params[0]]
    assert (m - full["exp_avg"]).abs().max() <= full["exp_avg"].abs().max() * (1 - (6 / 7) ** 2) / 2 + 1e-9
    scale = state["exp_avg_sq_absmax"].repeat_interleave(128)[:v.numel()].view(v.shape)
    levels, exact = 16 * (v / scale) ** 0.25, 16 * (full["exp_avg_sq"] / scale) ** 0.25  # in units of a level
    assert ((levels - exact).abs()[exact >= 1] <= 0.5 + 1e-4).all()  # the nearer level of the root
    assert torch.allclose(levels[exact < 1], torch.ones(1))  # the lowest level, never 0
    assert torch.equal(opt.state[params[3]]["exp_avg"], full_small := source.state[torch_params[3]]["exp_avg"])
    assert full_small.dtype == torch.float32
    eight = build_optimizer("adamw_8bit", [torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2)
    _run(list(eight.param_groups[0]["params"]), 1, opt=eight)
    fresh = AdamW4bit(_params(), lr=1e-2)
    fresh.load_state_dict(eight.state_dict())  # decoded, re-encoded (tests/test_adamw_family_resume.py: how well)
    assert fresh.state_dict()["state"][0]["exp_avg_codes"].dtype == torch.uint8


def test_resume_from_a_state_dict_is_bit_exact():
    straight_params = _params(torch.bfloat16)
    straight = _run(straight_params, 4)
    first_params = _params(torch.bfloat16)
    first = _run(first_params, 2)
    saved = copy.deepcopy(first.state_dict())
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in first_params]
    resumed = AdamW4bit(resumed_params, lr=1e-2, weight_decay=0.1, seed=3)
    resumed.load_state_dict(saved)
    _run(resumed_params, 2, opt=resumed, first=2)
    _assert_same(straight_params, straight, resumed_params, resumed)


def test_overflowing_finite_gradient_is_skipped_and_state_untouched():
    params = _params()
    opt = _run(params, 1)
    before = [p.detach().clone() for p in params]
    state = {k: v.clone() for k, v in opt.state[params[0]].items()}
    for p in params:
        p.grad = torch.zeros_like(p)
    params[0].grad.view(-1)[5] = 3e19  # finite, but g * g overflows fp32
    opt.step()
    assert torch.equal(params[0], before[0])
    assert all(torch.equal(opt.state[params[0]][k], v) for k, v in state.items())
    assert opt.skipped_updates == 1
    assert not torch.equal(params[1], before[1])  # the others stepped


def test_gradient_release_steps_like_step():
    a, b = _params(), _params()
    opt_a, opt_b = AdamW4bit(a, lr=1e-2, seed=3), AdamW4bit(b, lr=1e-2, seed=3)
    for step in range(2):
        for p, q in zip(a, b):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step)) * 0.01
            q.grad = p.grad.clone()
        opt_a.step()
        for q in b:
            opt_b.step_params([q])
        opt_b.finish_step()
    _assert_same(a, opt_a, b, opt_b)


@pytest.mark.slow
def test_compiled_cpu_path_matches_eager():
    """torch.compile'd bucket step (inductor) == eager reference, bit for bit (compiles once, ~1 min)."""
    eager_params = _params(torch.bfloat16, shapes=[(300, 301), (4097,), (65536 * 2 + 77,)])
    eager = _run(eager_params, 2)
    compiled_params = _params(torch.bfloat16, shapes=[(300, 301), (4097,), (65536 * 2 + 77,)])
    with dispatch.override(cpu_compile="always"):
        compiled = _run(compiled_params, 2)
    _assert_same(eager_params, eager, compiled_params, compiled)


def test_invalid_hyperparameters_raise_naming_the_argument():
    with pytest.raises(ValueError, match="lr"):
        AdamW4bit(_params(), lr=-1.0)
    with pytest.raises(ValueError, match="beta"):
        AdamW4bit(_params(), betas=(0.9, 1.5))


def test_estimate_row_matches_the_optimizer_and_the_decision_rule_takes_it_after_8bit():
    from torch import nn

    from lowmem_lightning.estimate import estimate_memory

    model = nn.Sequential(*[nn.Linear(128, 128) for _ in range(12)])
    free = estimate_memory(model, bucket_bytes=0)
    rows = {name: row.total_device_bytes for name, row in free.optimizers.items()}
    released = {name: row.released_device_bytes for name, row in free.optimizers.items()}
    real = [torch.nn.Parameter(torch.randn(p.shape)) for p in model.parameters()]
    opt = _run(real, 1)
    assert free.optimizers["adamw_4bit"].device_state_bytes == state_memory(opt).total_bytes
    assert rows["adamw_8bit"] > rows["adamw_4bit"]

    def pick(budget):
        return estimate_memory(model, budget_bytes=budget, bucket_bytes=0).recommendation

    assert pick(rows["adamw_8bit"]) == "adamw_8bit"
    assert pick(rows["adamw_8bit"] - 1) == "adamw_4bit"  # AdamW itself at ~1.06 B/param
    assert pick(rows["adamw_4bit"] - 1) == "adamw_8bit + step_in_backward"
    assert pick(released["adamw_8bit"] - 1) == "adamw_4bit + step_in_backward"


@pytest.mark.slow
def test_fsdp2_trains_shards_and_resumes_bit_exact(tmp_path, monkeypatch):
    """FSDP2 (ModelParallelStrategy, 2 gloo processes, tests/test_fsdp2.py's script): each rank keeps 4-bit
    state for its shard, and a run resumed from the sharded checkpoint ends bit for bit where the straight
    run does (the stochastic rounding of m is seeded per shard and step)."""
    import test_fsdp2

    monkeypatch.setitem(test_fsdp2.OPTIMIZERS, "adamw_4bit", ("AdamW4bit", 1.0, 4.5, True))
    ranks = test_fsdp2._run_script(tmp_path, "adamw_4bit", "cpu", 2)
    for result in ranks:
        assert result["optimizer"] == "AdamW4bit" and result["param_types"] == ["DTensor"]
        assert result["global_step"] == 4
        for a, b in zip(result["straight"], result["resumed"]):
            assert torch.equal(a, b)
        assert 1.0 < result["bytes_per_param"] < 4.5, result
    single = sum(p.numel() for p in test_fsdp2._single_process_model(tmp_path, "adamw_4bit").parameters())
    assert ranks[0]["num_params"] + ranks[1]["num_params"] == single


_AOT_SCRIPT = """
import json, sys
from lowmem_lightning.kernels import adamw4bit
from lowmem_lightning.kernels.aot import aligned_params, compile_spec, count_accesses, disassemble, sass_counts
wanted = set(json.loads(sys.argv[1]))
out = []
for kernel, signature, constexprs in adamw4bit.AOT_SPECS:
    key = f"{constexprs['PARAM_DTYPE']}/{constexprs['GRAD_DTYPE']}/{constexprs['ALIGNED']}"
    if wanted and key not in wanted:
        continue
    aligned = aligned_params(kernel, signature) if constexprs["ALIGNED"] else ()
    for arch in (80, 90):
        compiled = compile_spec(kernel, signature, constexprs, arch, aligned)
        sass = sass_counts(disassemble(compiled.asm["cubin"], "_adamw4bit_kernel"))
        out.append({"key": key, "arch": arch, "access": count_accesses(compiled.asm["ptx"]), "CALL": sass["CALL"],
                    "main": sass["main"]})
print(json.dumps(out))
"""


def _compile_aot(keys: list[str]) -> list[dict]:
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, json.dumps(keys)], env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check_aot(records: list[dict]) -> None:
    assert {r["arch"] for r in records} == {80, 90}
    for r in records:
        assert r["CALL"] == 0, r  # branch-free element math: no slow-path CALL in the SASS
        if r["key"].endswith("/True"):  # aligned: params, grads, codes move as vectors, not scalars
            assert r["access"]["ld.v4"] >= 2 and r["access"]["st.v4"] >= 1, r


def test_kernel_compiles_for_sm80_and_sm90_without_slow_path_calls():
    records = _compile_aot(["bf16/bf16/True"])  # the variant bf16 training runs; every variant: the slow test
    assert len(records) == 2
    _check_aot(records)


@pytest.mark.slow
def test_every_kernel_variant_compiles_for_sm80_and_sm90_without_slow_path_calls():
    records = _compile_aot([])
    assert len(records) == 2 * len(kernel.AOT_SPECS) == 2 * 14
    _check_aot(records)
