"""The bucketed CPU path (kernels/cpu_buckets.py) against the per-tensor reference, eager and compiled.

The oracle below is the per-tensor eager step as it ran before bucketing (one call of the step
function per tensor, partial blocks zero-padded, the finite flag applied by ``where``), which is bit
for bit the Triton kernel (test_adamw8bit.py / test_sgd.py). The bucketed path must store the same
bits, eager and compiled, for many odd-sized tensors of mixed kinds in one call.
"""

import functools

import pytest
import torch
from torch._dynamo.utils import counters

from lowmem_lightning.kernels import adamw8bit as adamw_kernel
from lowmem_lightning.kernels import cpu_buckets, dispatch
from lowmem_lightning.kernels import sgd as sgd_kernel
from lowmem_lightning.kernels.codec import BLOCK_SIZE, MIN_QUANTIZED_NUMEL, quantize_reference
from lowmem_lightning.kernels.dispatch import pack, unpack
from lowmem_lightning.kernels.rounding import round_param_reference, step_seed

# quantized (>= 4096) and fp32-state sizes, some a multiple of 256, one a scalar. With the small chunks
# of the fixture below, 4096 and up run their whole rows in place in chunks of 16 rows and gather their
# last partial row; the rest share gathered buckets.
SIZES = [4096, 4097, 5000, 70007, 1, 3, 255, 1000, 4095, 8192]
NAN_AT = 2  # the tensor whose gradient holds a NaN
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    """Buckets of 4096 elements and in-place tensors from 1024: many chunks and buckets on small sizes."""
    monkeypatch.setattr(cpu_buckets, "CHUNK_NUMEL", 4096)
    monkeypatch.setattr(cpu_buckets, "IN_PLACE_MIN_NUMEL", 1024)
    cpu_buckets._plan.cache_clear()
    yield
    cpu_buckets._plan.cache_clear()


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The stored bits (NaN equals NaN, -0 differs from 0)."""
    as_int = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}.get(t.dtype)
    return t if as_int is None else t.view(as_int)


def _assert_same(got: list, want: list, what: str) -> None:
    for i, (a, b) in enumerate(zip(got, want)):
        if a is None:
            assert b is None
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}[{i}]"
        mismatch = int((_bits(a) != _bits(b)).sum())
        assert mismatch == 0, f"{what}[{i}] ({a.numel()} elements): {mismatch} differ"


# --------------------------------------------------------------------------------------------------
# AdamW
# --------------------------------------------------------------------------------------------------


def _adamw_state(sizes, seed=0, bf16=True):
    """Params (bf16 and fp32 alternating, or all fp32; some 2-d, one non-contiguous), grads (one NaN),
    state with non-zero moments, per-tensor step counters that differ, flags from the grads."""
    gen = torch.Generator().manual_seed(seed)
    params, grads, ms, m_abs, vs, v_abs, steps = [], [], [], [], [], [], []
    for i, n in enumerate(sizes):
        dtype = torch.bfloat16 if i % 2 and bf16 else torch.float32
        p = torch.randn(n, generator=gen).to(dtype)
        if n == 70007:
            p = p.view(7, 10001)
        if n == 8192:
            p = torch.randn(128, 64, generator=gen).to(dtype).t()  # non-contiguous
        params.append(p)
        g = torch.randn(n, generator=gen) * 0.1
        g[0] = float("nan") if i == NAN_AT else g[0]
        grads.append(g.view(p.shape))
        m, v = torch.randn(n, generator=gen) * 0.01, torch.rand(n, generator=gen) * 1e-4
        if n >= MIN_QUANTIZED_NUMEL:
            (mc, ma), (vc, va) = quantize_reference(m, True), quantize_reference(v, False)
            ms.append(mc), m_abs.append(ma), vs.append(vc), v_abs.append(va)
        else:
            ms.append(m.view(p.shape).clone()), m_abs.append(None), vs.append(v.view(p.shape).clone())
            v_abs.append(None)
        steps.append(torch.tensor(float(1 + i % 3)))
    flags = [torch.isfinite(g).all().float() for g in grads]
    seeds = [step_seed(0, i, 7) for i in range(len(sizes))]
    return [params, grads, ms, m_abs, vs, v_abs, steps, flags, seeds]


def _clone(state):
    return [[t.clone() if isinstance(t, torch.Tensor) else t for t in seq] for seq in state]


def _adamw_per_tensor(params, grads, ms, m_abs, vs, v_abs, steps, flags, seed_bases, maximize):
    """The per-tensor eager reference (the CPU path before bucketing)."""
    scalars = unpack(adamw_kernel.AdamWScalars, pack(adamw_kernel.AdamWScalars.of(**HYPER, maximize=maximize)))
    for i, param in enumerate(params):
        terms, seeds = adamw_kernel.step_terms_reference(scalars, steps[i].view(1), torch.tensor([seed_bases[i]]))
        work = param.contiguous()
        if m_abs[i] is None:
            adamw_kernel.adamw32_step(work.view(-1), grads[i].reshape(-1), ms[i].view(-1), vs[i].view(-1),
                                      flags[i] > 0, scalars, terms[0, 0], terms[0, 1], seeds[0])
        else:
            n, pad = work.numel(), (-work.numel()) % BLOCK_SIZE
            p, g, m, v = (torch.nn.functional.pad(t.reshape(-1), (0, pad)).view(-1, BLOCK_SIZE)
                          for t in (work, grads[i], ms[i], vs[i]))
            adamw_kernel.adamw8bit_step(p, g, m, m_abs[i].view(-1, 1), v, v_abs[i].view(-1, 1), flags[i] > 0,
                                        scalars, terms[0, 0], terms[0, 1], seeds[0])
            work.view(-1).copy_(p.view(-1)[:n]), ms[i].copy_(m.view(-1)[:n]), vs[i].copy_(v.view(-1)[:n])
        param.copy_(work)


def _adamw_bucketed(state, maximize):
    dispatch.dispatch(adamw_kernel.ADAMW_8BIT, adamw_kernel.AdamWTensors(*state),
                      adamw_kernel.AdamWScalars.of(**HYPER, maximize=maximize))


@pytest.mark.parametrize("maximize", [False, True])
def test_adamw_bucketed_eager_equals_per_tensor_reference(maximize):
    start = _adamw_state(SIZES)
    want, got = _clone(start), _clone(start)
    _adamw_per_tensor(*want, maximize)
    with dispatch.override(cpu_compile="never"):
        _adamw_bucketed(got, maximize)
    for k, name in enumerate(("params", "grads", "exp_avg", "exp_avg_absmax", "exp_avg_sq", "exp_avg_sq_absmax")):
        _assert_same(got[k], want[k], name)
    # the NaN tensor is untouched, every other one moved
    assert torch.equal(_bits(got[0][NAN_AT]), _bits(start[0][NAN_AT]))
    assert torch.equal(got[2][NAN_AT], start[2][NAN_AT]) and torch.equal(got[3][NAN_AT], start[3][NAN_AT])
    assert all(not torch.equal(got[0][i], start[0][i]) for i in range(len(SIZES)) if i != NAN_AT)


def test_adamw_bucketed_compiled_equals_reference_and_never_recompiles():
    # one compiled graph per (quantized, param dtype, grad dtype): fp32 params here (bf16 compiled: the
    # optimizer test below), sizes that change between calls (other tensors, in place or not) must not
    # recompile
    with dispatch.override(cpu_compile="always"):
        for round_, sizes in enumerate((SIZES, [4352, 8192, 4100, 17, 900, 2], SIZES[3:] + [12800])):
            start = _adamw_state(sizes, seed=round_, bf16=False)
            want, got = _clone(start), _clone(start)
            _adamw_per_tensor(*want, False)
            _adamw_bucketed(got, False)
            for k in range(6):
                _assert_same(got[k], want[k], f"round {round_}, operand {k}")
            if round_ == 0:
                graphs = counters["stats"]["unique_graphs"]
        assert counters["stats"]["unique_graphs"] == graphs, "a new size compiled a new graph"


def test_adamw_optimizer_same_bits_eager_and_compiled_over_steps():
    # whole optimizer, several steps with a NaN step in one tensor: the two CPU backends agree bit for bit
    def run(mode):
        gen = torch.Generator().manual_seed(3)
        params = [torch.nn.Parameter(torch.randn(n, generator=gen).to(dt))
                  for n, dt in ((5000, torch.bfloat16), (300, torch.float32), (4096, torch.float32))]
        opt = adamw_kernel_optimizer(params)
        with dispatch.override(cpu_compile=mode):
            for k in range(3):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
                params[1].grad[0] = float("nan") if k == 1 else params[1].grad[0]
                opt.step()
        return params, opt

    eager, compiled = run("never"), run("always")
    _assert_same([p.detach() for p in compiled[0]], [p.detach() for p in eager[0]], "params")
    for p, q in zip(compiled[0], eager[0]):
        for key, value in eager[1].state[q].items():
            _assert_same([compiled[1].state[p][key]], [value], key)
    assert compiled[1].skipped_updates == eager[1].skipped_updates == 1


def adamw_kernel_optimizer(params):
    from lowmem_lightning.optim import AdamW8bit

    return AdamW8bit(params, lr=1e-2, weight_decay=0.1, seed=5)


# --------------------------------------------------------------------------------------------------
# SGD
# --------------------------------------------------------------------------------------------------


def _sgd_state(mode, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params, grads, bufs, absmaxes, steps = [], [], [], [], []
    for i, n in enumerate(SIZES):
        dtype = torch.bfloat16 if i % 2 else torch.float32
        params.append(torch.randn(n, generator=gen).to(dtype))
        g = torch.randn(n, generator=gen) * 0.1
        g[0] = float("nan") if i == NAN_AT else g[0]
        grads.append(g)
        buf = torch.randn(n, generator=gen) * 0.01
        if mode == "plain":
            bufs.append(None), absmaxes.append(None)
        elif mode == "int8" and n >= MIN_QUANTIZED_NUMEL:
            codes, absmax = quantize_reference(buf, True)
            bufs.append(codes), absmaxes.append(absmax)
        else:
            bufs.append(buf), absmaxes.append(None)
        steps.append(torch.tensor(float(1 + i % 2)))  # some tensors on their first step
    flags = [torch.isfinite(g).all().float() for g in grads]
    return [params, grads, bufs, absmaxes, steps, flags, list(range(3, 3 + len(SIZES)))]


SGD_HYPER = dict(lr=0.05, weight_decay=0.01, momentum=0.9, dampening=0.1, nesterov=True, maximize=True)


def _sgd_per_tensor(params, grads, bufs, absmaxes, steps, flags, indices):
    for i in range(len(params)):
        new_p, new_buf, new_absmax = sgd_kernel.sgd_reference(params[i], grads[i], bufs[i], absmaxes[i], steps[i],
                                                              flags[i], sgd_kernel.SGDScalars.of(**SGD_HYPER),
                                                              indices[i])
        params[i].copy_(new_p)
        if bufs[i] is not None:
            bufs[i].copy_(new_buf)
        if absmaxes[i] is not None:
            absmaxes[i].copy_(new_absmax)


def _sgd_bucketed(state):
    dispatch.dispatch(sgd_kernel.SGD_FAMILY, sgd_kernel.SGDTensors(*state), sgd_kernel.SGDScalars.of(**SGD_HYPER))


@pytest.mark.parametrize("mode", ["plain", "fp32", "int8"])
def test_sgd_bucketed_eager_equals_per_tensor_reference(mode):
    start = _sgd_state(mode)
    want, got = _clone(start), _clone(start)
    _sgd_per_tensor(*want)
    with dispatch.override(cpu_compile="never"):
        _sgd_bucketed(got)
    for k, name in enumerate(("params", "grads", "bufs", "absmaxes")):
        _assert_same(got[k], want[k], name)
    assert torch.equal(_bits(got[0][NAN_AT]), _bits(start[0][NAN_AT]))


@pytest.mark.slow  # three more compiled graphs (~15 s each on 2 shared cores)
def test_sgd_bucketed_compiled_equals_reference_and_never_recompiles():
    with dispatch.override(cpu_compile="always"):
        for mode in ("plain", "fp32", "int8"):
            for round_ in range(2):
                start = _sgd_state(mode, seed=round_)
                if round_:
                    start = [seq[2:] for seq in start]  # other sizes
                want, got = _clone(start), _clone(start)
                _sgd_per_tensor(*want)
                _sgd_bucketed(got)
                for k in range(4):
                    _assert_same(got[k], want[k], f"{mode}, round {round_}, operand {k}")
                if round_ == 0:
                    graphs = counters["stats"]["unique_graphs"]
            assert counters["stats"]["unique_graphs"] == graphs, f"{mode}: a new size compiled a new graph"


# --------------------------------------------------------------------------------------------------
# Buckets and the compile choice
# --------------------------------------------------------------------------------------------------


def test_plan_runs_big_tensors_in_place_and_gathers_the_rest():
    big = cpu_buckets.CHUNK_NUMEL * 2 + 256 * 3 + 10  # 3 chunks of whole rows + a partial row
    tensors = [torch.empty(big), torch.empty(1000), torch.empty(30, 40).t(), torch.empty(cpu_buckets.CHUNK_NUMEL),
               torch.empty(900)]
    buckets = cpu_buckets.plan(tensors, 256)
    in_place = [b.pieces for b in buckets if b.in_place]
    rows = (big // 256) // 3  # three equal chunks of <= CHUNK_NUMEL // 256 rows
    assert [p[0][0] for p in in_place] == [0, 0, 0, 3]
    assert sum(p[0][2] for p in in_place[:3]) == (big // 256) * 256 and in_place[0][0][2] == rows * 256
    gathered = [b.pieces for b in buckets if not b.in_place]
    assert gathered == [((0, (big // 256) * 256, 10), (1, 0, 1000), (2, 0, 1200), (4, 0, 900))]  # transposed too
    assert all(b.numel <= cpu_buckets.CHUNK_NUMEL for b in buckets)
    alone = cpu_buckets.plan([torch.empty(512)], 256)  # a lone tensor of whole rows: in place
    assert len(alone) == 1 and alone[0].in_place


def test_row_seeds_fold_the_offset_into_the_seed():
    # the bf16 stochastic rounding of tensor 1 at its bucket offset equals its own, with its own seed
    layout = cpu_buckets.Bucket(((0, 0, 300), (1, 0, 1000)), 256, False)
    seeds = torch.tensor([11, 123456789])
    x = torch.randn(1000) * 3
    bucket_x = torch.zeros(layout.rows, 256)
    bucket_x.view(-1)[512:1512] = x
    offs = torch.arange(layout.numel).view(layout.rows, 256)
    rounded = round_param_reference(bucket_x, torch.bfloat16, layout.row_seeds(seeds), True, offs)
    assert torch.equal(_bits(rounded.view(-1)[512:1512]), _bits(round_param_reference(x, torch.bfloat16, 123456789)))
    assert layout.rows == 6 and layout.firsts == (0, 2)


def test_bucket_in_place_and_gathered_round_trip():
    one = torch.randn(1024)
    layout = cpu_buckets.Bucket(((0, 512, 512),), 256, True)
    rows = layout.rows_of([one])
    assert rows.data_ptr() == one[512:].data_ptr() and rows._base is None  # in place: no copy, not a view
    two = [torch.randn(3, 5), torch.randn(300)]
    layout = cpu_buckets.Bucket(((0, 0, 15), (1, 0, 300)), 256, False)
    rows = layout.rows_of(two)
    assert rows.shape == (3, 256) and rows.view(-1)[15:256].abs().sum() == 0
    rows.mul_(2)
    expected = [t * 2 for t in two]
    layout.write_back(two, rows)
    assert all(torch.equal(a, b) for a, b in zip(two, expected))


def test_choose_bucket_auto_compiles_big_calls_and_after_enough_eager_work(monkeypatch):
    monkeypatch.setattr(dispatch, "_eager_bucket_numel", 0)
    with dispatch.override(cpu_compile="auto", compile_min_numel=100, compile_after_numel=250):
        assert dispatch.choose_bucket(100) == "compiled"
        assert [dispatch.choose_bucket(99) for _ in range(4)] == ["eager", "eager", "eager", "compiled"]
    with dispatch.override(cpu_compile="never"):
        assert dispatch.choose_bucket(10**9) == "eager"
    with dispatch.override(cpu_compile="always"):
        assert dispatch.choose_bucket(1) == "compiled"
    with pytest.raises(ValueError, match="compile_after_numel=-1"):
        dispatch.configure(compile_after_numel=-1)
    assert dispatch.DispatchSettings.from_env({"LOWMEM_CPU_COMPILE_AFTER_NUMEL": "7"}).compile_after_numel == 7


def test_compile_choice_is_made_once_per_group_on_its_total(monkeypatch):
    # buckets are at most CHUNK_NUMEL elements, but "auto" must see the step's total of each kind
    # (else a 4M-element model would never reach compile_min_numel)
    seen = []
    monkeypatch.setattr(dispatch, "choose_bucket", lambda numel: seen.append(numel) or "eager")
    sizes = [cpu_buckets.CHUNK_NUMEL * 3 + 300, 1, 4096, 3, 5000, 7]  # even: fp32, odd: bf16; tensor 2: NaN
    _adamw_bucketed(_adamw_state(sizes), False)
    assert sorted(seen) == [1 + 3 + 7, cpu_buckets.CHUNK_NUMEL * 3 + 300 + 5000]  # bf16 fp32-state, fp32 8-bit


# --------------------------------------------------------------------------------------------------
# Fixed cost per step: host step terms, the cached compiled graph, the int32 rounding hash
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lr, beta1, beta2", [(1e-3, 0.9, 0.999), (3e-4, 0.95, 0.98), (0.1, 0.0, 0.5),
                                              (1e-2, 0.99, 0.9999)])
def test_host_step_terms_equal_the_reference_bit_for_bit(lr, beta1, beta2):
    # the host computes the bias terms with numpy fp32 scalars from cached squares; the reference with torch
    steps = list(range(1, 2000)) + [2**k + d for k in range(11, 24) for d in (-1, 0, 1)]
    scalars = unpack(adamw_kernel.AdamWScalars, pack(adamw_kernel.AdamWScalars.of(lr, beta1, beta2, 1e-8, 0.0, False)))
    want, _ = adamw_kernel.step_terms_reference(scalars, torch.tensor(steps, dtype=torch.float32),
                                                torch.zeros(len(steps), dtype=torch.int64))
    got = torch.tensor([adamw_kernel._host_terms(lr, beta1, beta2, s) for s in steps], dtype=torch.float32)
    _assert_same([got], [want], "terms")
    hp = pack(adamw_kernel.AdamWScalars.of(lr, beta1, beta2, 1e-8, 0.0, False))
    terms, seeds = adamw_kernel._step_terms([float(s) for s in steps[:50]], list(range(50)), hp)
    _assert_same([terms], [want[:50]], "_step_terms")
    assert seeds.tolist() == [step_seed(s, 0) + i & 0x7FFFFFFF for i, s in enumerate(steps[:50])]
    last = adamw_kernel._host_terms(lr, beta1, beta2, 2**24 - 1)  # its block of steps runs past 2**24
    want_last, _ = adamw_kernel.step_terms_reference(scalars, torch.tensor([2.0**24 - 1]),
                                                     torch.zeros(1, dtype=torch.int64))
    _assert_same([torch.tensor([last], dtype=torch.float32)], [want_last], "last exact step")
    with pytest.raises(ValueError, match="step=16777216: .* in \\[0, 2\\*\\*24\\)"):
        adamw_kernel._host_terms(lr, beta1, beta2, 2**24)


def _double_plus_row_max(x, y, out):
    """A small host step for the HostStep tests: ``out = 2 x + (row maxima of y)``, in place."""
    out.copy_(x * 2 + y.amax(dim=1, keepdim=True))


def test_host_step_compiles_once_for_every_size_and_runs_its_cached_graph():
    step = dispatch.HostStep(dispatch.per_layout(_double_plus_row_max)[False].eager)  # a code object of its own
    before = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        for rows in (256, 16, 6, 2, 300):  # a first size equal to the width must not become a symbol of both
            x, y, out = torch.randn(rows, 256), torch.randn(rows, 256), torch.empty(rows, 256)
            step.on("compiled")(x, y, out)
            assert torch.equal(out, x * 2 + y.amax(dim=1, keepdim=True)), rows
        assert counters["stats"]["unique_graphs"] == before + 1
        assert len(step._cached) == 1 and step._cached[0].matches((x, y, out))
        # a call its guards refuse (another dtype) goes through torch.compile, which compiles a second graph;
        # then both graphs run cached, each for its own dtype
        x64, y64, out64 = (torch.randn(8, 256, dtype=torch.float64) for _ in range(3))
        assert not step._cached[0].matches((x64, y64, out64))
        with torch.enable_grad():  # the guards check the grad mode too
            assert not step._cached[0].matches((torch.randn(4, 256), torch.randn(4, 256), torch.empty(4, 256)))
        step.on("compiled")(x64, y64, out64)
        assert torch.equal(out64, x64 * 2 + y64.amax(dim=1, keepdim=True))
        assert counters["stats"]["unique_graphs"] == before + 2 and len(step._cached) == 2
        for args in ((x64, y64, out64), (x, y, out)):
            assert sum(graph.matches(args) for graph in step._cached) == 1
            calls = [0]

            def counted(*a, _code, _calls=calls):
                _calls[0] += 1
                return _code(*a)
            graphs = [dispatch._CachedGraph(functools.partial(counted, _code=g.code), g._guards, g._names)
                      for g in step._cached]
            step._cached = tuple(graphs)
            args[2].zero_()
            step.on("compiled")(*args)
            assert calls == [1] and torch.equal(args[2], args[0] * 2 + args[1].amax(dim=1, keepdim=True))


def _hash_int64(offs, seed):
    """The murmur3 finaliser in int64 arithmetic masked to 32 bits (the reference's form before int32)."""
    mask = 0xFFFFFFFF
    h = (offs.to(torch.int64) * 2654435761 + seed) & mask
    h = h ^ (h >> 16)
    h = (h * 2246822507) & mask
    h = h ^ (h >> 13)
    h = (h * 3266489909) & mask
    return h ^ (h >> 16)


def test_int32_hash_equals_the_uint32_hash():
    from lowmem_lightning.kernels.rounding import _hash_bits_reference, hash_uniform_reference

    gen = torch.Generator().manual_seed(0)
    offs = torch.cat([torch.arange(5000), torch.randint(0, 2**31 - 1, (5000,), generator=gen)])
    for seed in (0, 1234, 2**31 - 1, 2**31 + 5, 2**32 - 1):
        want = _hash_int64(offs, seed)
        got = _hash_bits_reference(offs, seed)
        assert got.dtype == torch.int32
        assert torch.equal(got.to(torch.int64) & 0xFFFFFFFF, want), seed
        as_tensor = _hash_bits_reference(offs, torch.full((offs.numel(),), seed, dtype=torch.int64))
        assert torch.equal(as_tensor, got), seed
        assert torch.equal(hash_uniform_reference(offs, seed), (want >> 8).to(torch.float32) / 16777216.0)


def test_encode_signed_scaled_equals_the_codec_reference():
    """The 8-bit bucket step encodes m from the per-block reciprocal it computed once per row: the same codes as
    ``encode_signed_reference`` (zeros, sign flips, blocks under ``SCALE_FLOOR``, tiny and huge scales)."""
    from lowmem_lightning.kernels.codec import (
        SCALE_FLOOR,
        block_scale_rcp_reference,
        encode_signed_reference,
        encode_signed_scaled_reference,
    )

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, BLOCK_SIZE, generator=gen) * torch.logspace(-40, 30, 64).view(-1, 1)
    x[0] = 0.0
    x[1, ::2] = -x[1, ::2]
    x[2] = SCALE_FLOOR / 4
    absmax = x.abs().amax(dim=1, keepdim=True)
    got = encode_signed_scaled_reference(x, block_scale_rcp_reference(absmax))
    want = encode_signed_reference(x, absmax)
    assert got.dtype == torch.int8 and torch.equal(got, want)
    assert int((want != 0).sum()) > 60 * BLOCK_SIZE  # the test is not all zeros


def _inner_loops(code: str) -> str:
    """The text of every inner (``x1``) loop of inductor's generated C++ (each up to the next outer loop or the end
    of the kernel's source)."""
    parts = code.split("for(int64_t x1")[1:]
    return "\n".join(part.split("for(int64_t x0")[0].split("''')")[0] for part in parts)


@pytest.mark.parametrize("hoist", [False, True])
def test_materialize_computes_a_per_row_term_once_per_row_when_compiled(hoist):
    """Eager, ``materialize`` is the tensor itself. Compiled (dynamic shapes, as the bucket steps), the same bits;
    a per-row term it wraps (here a square root and a division) leaves the inner loop over the row's elements,
    where inductor recomputes it every 16 elements otherwise (issue 24.6)."""
    from torch._inductor.utils import run_and_get_code

    from lowmem_lightning.kernels.codec import sqrt_floor_reference  # correctly rounded eager and compiled

    def scaled(x, s):
        inv = 1.0 / sqrt_floor_reference(s.abs())
        return x * (cpu_buckets.materialize(inv) if hoist else inv)

    x, s = torch.randn(8, BLOCK_SIZE), torch.randn(8, 1)
    assert cpu_buckets.materialize(x) is x
    torch._dynamo.reset()
    got, codes = run_and_get_code(torch.compile(scaled, dynamic=True), x, s)
    assert torch.equal(got, scaled(x, s))
    inner = _inner_loops("\n".join(codes))
    assert inner, "no inner loop found in the generated code"
    assert ("sqrt" in inner) == (not hoist)


def test_staging_is_one_reused_fp32_workspace_per_thread():
    """The bf16 staging operand: fp32, contiguous, not a view (as every bucket operand: torch.compile guards on the
    difference), the same tensor for the same shape, one workspace shared by shapes (grown to the largest), and
    another one on another thread. Run on fresh threads: earlier tests may have grown this thread's workspace."""
    import threading

    def on_a_fresh_thread(fn):
        out, errors = [], []

        def run():
            try:
                out.append(fn())
            except BaseException as err:  # re-raised on the test's thread
                errors.append(err)
        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        if errors:
            raise errors[0]
        return out[0]

    def grows_and_reuses():
        a = cpu_buckets.staging(4, BLOCK_SIZE, "cpu")
        assert a.dtype == torch.float32 and a.shape == (4, BLOCK_SIZE) and a.is_contiguous() and a._base is None
        assert cpu_buckets.staging(4, BLOCK_SIZE, "cpu") is a
        b = cpu_buckets.staging(2, BLOCK_SIZE, "cpu")
        assert b.data_ptr() == a.data_ptr()
        big = cpu_buckets.staging(64, BLOCK_SIZE, "cpu")  # grows: the smaller shapes' aliases are rebuilt
        again = cpu_buckets.staging(4, BLOCK_SIZE, "cpu")
        assert again is not a and again.data_ptr() == big.data_ptr()
        return again

    again = on_a_fresh_thread(grows_and_reuses)
    other = on_a_fresh_thread(lambda: cpu_buckets.staging(4, BLOCK_SIZE, "cpu"))
    assert other.data_ptr() != again.data_ptr()
    layout = cpu_buckets.plan([torch.empty(3 * BLOCK_SIZE)], BLOCK_SIZE)[0]
    assert layout.staging("cpu").shape == (layout.rows, BLOCK_SIZE)


def test_cpu_sizes_benchmark_reports_every_optimizer_and_dtype(capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import cpu_sizes

    rows = cpu_sizes.main(["--cases", "4096", "--optimizers", "adamw_8bit,sgd_int8", "--dtype", "float32,bfloat16",
                           "--compile", "never", "--pairs", "2", "--warmup", "0"])
    assert [(r["optimizer"], r["dtype"]) for r in rows] == [("adamw_8bit", "float32"), ("adamw_8bit", "bfloat16"),
                                                             ("sgd_int8", "float32"), ("sgd_int8", "bfloat16")]
    assert all(r["ratio"] > 0 and r["numel"] == 4096 and r["load"] >= 0 for r in rows)
    assert "largest ratio: adamw_8bit float32" in capsys.readouterr().out
    rows = cpu_sizes.main(["--cases", "4096", "--compile", "never", "--pairs", "2", "--warmup", "0", "--clock", "wall"])
    assert [r["ratio"] > 0 for r in rows] == [True]
    assert "wall clock" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cpu_sizes.main(["--dtype", "float16"])
    with pytest.raises(SystemExit):
        cpu_sizes.main(["--clock", "cycles"])
