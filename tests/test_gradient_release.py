"""Gradient release (step_in_backward): each tensor updated in backward, its gradient freed at once.

Same result as a normal step (bit for bit on CPU, fp32 and bf16 params), gradients gone by the end of
backward, the step's peak memory lower by about the gradient buffer, and the refusals.
"""

import warnings

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.checkpoint import checkpoint

from lowmem_lightning.callbacks.release import DEFAULT_BUCKET_BYTES, GradientRelease
from lowmem_lightning.optim import build_optimizer

CONFIGS = [
    ("adamw_8bit", {"lr": 1e-3}),
    ("paged_adamw_8bit", {"lr": 1e-3}),
    ("adafactor", {}),
    ("adafactor", {"beta1": 0.9, "momentum_dtype": "int8"}),
    ("adafactor", {"lr": 1e-3, "relative_step": False, "scale_parameter": False}),
    ("came", {"lr": 1e-3}),
    ("came", {"lr": 1e-3, "momentum_dtype": "int8"}),
    ("sgd", {"lr": 1e-2}),
    ("sgd", {"lr": 1e-2, "momentum": 0.9, "momentum_dtype": "int8", "nesterov": True}),
    ("adamw", {"lr": 1e-3}),
]
IDS = [name + "".join(f"-{k}={v}" for k, v in kw.items() if k != "lr") for name, kw in CONFIGS]


def _model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    # 64x80 weights: 5120 elements, quantized 8-bit state; biases and the norm keep fp32 state
    model = torch.nn.Sequential(torch.nn.Linear(80, 64), torch.nn.LayerNorm(64), torch.nn.GELU(),
                                torch.nn.Linear(64, 80), torch.nn.Linear(80, 8))
    return model.to(dtype)


def _batches(steps: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 80, generator=gen).to(dtype), torch.randn(16, 8, generator=gen).to(dtype))
            for _ in range(steps)]


def _loss(model, batch):
    x, y = batch
    return (model(x).float() - y.float()).square().mean()


def _train(name, kwargs, dtype, release: bool, steps: int = 4, clip_value=None, bucket_bytes=DEFAULT_BUCKET_BYTES):
    model = _model(dtype)
    opt = build_optimizer(name, model.parameters(), **kwargs)
    hooks = GradientRelease(opt, clip_value=clip_value, bucket_bytes=bucket_bytes).attach() if release else None
    for batch in _batches(steps, dtype):
        opt.zero_grad(set_to_none=True)
        _loss(model, batch).backward()
        if hooks is not None:
            assert all(p.grad is None for p in model.parameters())
            hooks.finish_step()
        elif clip_value is not None:
            torch.nn.utils.clip_grad_value_(model.parameters(), clip_value)
        opt.step()  # a no-op after release: every gradient is None
    return model, opt


def _assert_same_run(a, b) -> None:
    (model_a, opt_a), (model_b, opt_b) = a, b
    for (name, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(pa, pb), name
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert sa.keys() == sb.keys()
        for key in sa:
            if isinstance(sa[key], torch.Tensor):
                assert torch.equal(sa[key], sb[key]), key
    for ga, gb in zip(opt_a.param_groups, opt_b.param_groups):
        for key in ("effective_lr", "host_step"):
            assert ga.get(key) == gb.get(key), key
    if hasattr(opt_a, "effective_lr"):
        assert opt_a.effective_lr() == opt_b.effective_lr()


@pytest.mark.parametrize(("name", "kwargs"), CONFIGS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_release_equals_a_normal_step_bit_for_bit(name, kwargs, dtype):
    if name == "adamw" and dtype == torch.bfloat16:
        pytest.skip("torch AdamW on bf16 params is not one of our paths")
    _assert_same_run(_train(name, kwargs, dtype, release=False), _train(name, kwargs, dtype, release=True))


@pytest.mark.parametrize(("name", "kwargs"), [CONFIGS[0], CONFIGS[5], CONFIGS[7]], ids=[IDS[0], IDS[5], IDS[7]])
def test_clipping_by_value_is_applied_per_tensor(name, kwargs):
    normal = _train(name, kwargs, torch.float32, release=False, clip_value=0.01)
    _assert_same_run(normal, _train(name, kwargs, torch.float32, release=True, clip_value=0.01))
    assert not torch.equal(normal[0][0].weight, _train(name, kwargs, torch.float32, release=False)[0][0].weight)


def test_non_finite_gradient_skips_that_tensor_only():
    model = _model(torch.float32)
    opt = build_optimizer("adamw_8bit", model.parameters(), lr=1e-3)
    GradientRelease(opt).attach()
    first = model[0].weight
    first.register_hook(lambda g: torch.full_like(g, float("nan")))  # runs before accumulation
    before = first.detach().clone()
    _loss(model, _batches(1, torch.float32)[0]).backward()
    assert torch.equal(first, before) and opt.skipped_updates == 1
    assert float(opt.state[model[3].weight]["step"]) == 1.0


def test_detach_restores_normal_gradients():
    model = _model(torch.float32)
    opt = build_optimizer("came", model.parameters(), lr=1e-3)
    hooks = GradientRelease(opt).attach()
    assert hooks.attached and len(hooks.params()) == len(list(model.parameters()))
    hooks.detach()
    _loss(model, _batches(1, torch.float32)[0]).backward()
    assert all(p.grad is not None for p in model.parameters()) and hooks.updates == 0


@pytest.mark.parametrize("bucket_tensors", [0, 1, 3], ids=["per-tensor", "bucket-1-weight", "bucket-3-weights"])
def test_live_gradient_bytes_stay_within_the_bucket_plus_one_tensor(bucket_tensors):
    """Counted at every gradient's arrival: the released gradients alive never exceed ``bucket_bytes`` plus the
    tensor that closes the bucket (with 0, one tensor: per-tensor release)."""
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(6)])
    params = list(model.parameters())
    largest = max(p.numel() * p.element_size() for p in params)
    total = sum(p.numel() * p.element_size() for p in params)
    live = []

    def measure(_):
        live.append(sum(q.grad.numel() * q.grad.element_size() for q in params if q.grad is not None))

    for p in params:  # registered first: runs before the release hook of the same param
        p.register_post_accumulate_grad_hook(measure)
    opt = build_optimizer("adamw_8bit", params, lr=1e-3)
    x = torch.randn(8, 256)
    model(x).square().mean().backward()
    assert max(live) == total and sum(p.grad.numel() for p in params) == sum(p.numel() for p in params)
    opt.zero_grad(set_to_none=True)
    live.clear()
    bucket_bytes = bucket_tensors * 256 * 256 * 4
    hooks = GradientRelease(opt, bucket_bytes=bucket_bytes).attach()
    model(x).square().mean().backward()
    assert max(live) <= bucket_bytes + largest and hooks.peak_bucket_bytes <= bucket_bytes + largest
    assert all(p.grad is None for p in params) and hooks.updates == len(params)
    # buckets close on weight + bias pairs: 12 tensors -> 12, 6, or 2 closed by size + the rest at the end
    assert hooks.bucket_steps == {0: 12, 1: 6, 3: 2}[bucket_tensors]
    print(f"bucket {bucket_bytes} B: peak live gradient bytes {max(live)}, largest tensor {largest}, "
          f"all gradients {total}, optimizer calls {hooks.bucket_steps}")


def _step_peak_bytes(release: bool, bucket_bytes: int = 0) -> tuple[int, int]:
    """CPU peak bytes allocated during one training step (profiler memory events) and the grad bytes."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(8)])
    opt = build_optimizer("adamw_8bit", model.parameters(), lr=1e-3)
    hooks = GradientRelease(opt, bucket_bytes=bucket_bytes).attach() if release else None
    x = torch.randn(4, 512)

    def step():
        model(x).square().mean().backward()
        if hooks is not None:
            hooks.finish_step()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # state exists before the measured step
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    return _profiled_peak(prof), sum(p.numel() * 4 for p in model.parameters())


def _profiled_peak(prof) -> int:
    """``benchmarks/profiler_peak.peak_bytes``: the benchmarks' measure of the same peak."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from profiler_peak import peak_bytes

    return peak_bytes(prof)


@pytest.mark.parametrize("bucket_tensors", [0, 2], ids=["per-tensor", "bucket-2-weights"])
def test_step_peak_memory_drops_by_about_the_gradient_buffer(bucket_tensors):
    largest = 512 * 512 * 4
    normal, grad_bytes = _step_peak_bytes(release=False)
    released, _ = _step_peak_bytes(release=True, bucket_bytes=bucket_tensors * largest)
    assert normal - released >= grad_bytes - bucket_tensors * largest - 2 * largest, (normal, released, grad_bytes)


class _SharedBlocks(torch.nn.Module):
    """Two blocks that share one Linear (tied weights), each under reentrant activation checkpointing, between an
    input and a head layer that are not checkpointed (so the blocks' input requires grad)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(80, 64)
        self.shared = torch.nn.Linear(64, 64)
        self.own = torch.nn.ModuleList([torch.nn.Linear(64, 64) for _ in range(2)])
        self.head = torch.nn.Linear(64, 8)
        self.reuse_own = False  # use own[0] in both blocks (the structure changes)

    def block(self, h, own):
        return torch.tanh(own(self.shared(h)))

    def forward(self, x):
        h = self.inp(x)
        for own in self.own:
            h = checkpoint(self.block, h, self.own[0] if self.reuse_own else own, use_reentrant=True)
        return self.head(h)


def _train_shared(name, kwargs, release: bool, watch: bool = True, steps: int = 4, alive=None):
    model = _SharedBlocks()
    opt = build_optimizer(name, model.parameters(), **kwargs)
    hooks = GradientRelease(opt).attach() if release else None
    for batch in _batches(steps, torch.float32):
        opt.zero_grad(set_to_none=True)
        loss = _loss(model, batch)
        if hooks is not None and watch:
            hooks.watch(loss)
        loss.backward()
        if alive is not None:
            alive.append(sorted(n for n, p in model.named_parameters() if p.grad is not None))
        if hooks is not None:
            hooks.finish_step()
        opt.step()
    return model, opt


# adafactor with its own step size is left out: its reported step size (effective_lr) is written by the last
# tensor stepped, which under held-back updates is not the group's first param (the updates themselves agree)
SHARED = [CONFIGS[0], CONFIGS[4], CONFIGS[5], CONFIGS[8], CONFIGS[9]]


@pytest.mark.parametrize(("name", "kwargs"), SHARED, ids=[IDS[CONFIGS.index(c)] for c in SHARED])
def test_shared_weight_under_reentrant_checkpointing_equals_a_normal_step(name, kwargs):
    alive = []
    released = _train_shared(name, kwargs, release=True, alive=alive)
    _assert_same_run(_train_shared(name, kwargs, release=False), released)
    # step 1 holds back every param whose gradient came in a nested pass; later steps only the shared one
    checkpointed = ["own.0.bias", "own.0.weight", "own.1.bias", "own.1.weight", "shared.bias", "shared.weight"]
    assert alive == [checkpointed] + [["shared.bias", "shared.weight"]] * 3


def test_without_watching_the_loss_a_second_gradient_is_an_error_not_a_partial_update():
    with pytest.raises(RuntimeError, match="second gradient in one backward.*watch\\(loss\\)"):
        _train_shared("sgd", {"lr": 1e-2}, release=True, watch=False)


def test_a_param_whose_gradient_starts_arriving_twice_stops_the_step():
    model = _SharedBlocks()
    opt = build_optimizer("adamw_8bit", model.parameters(), lr=1e-3)
    hooks = GradientRelease(opt).attach()
    for step, batch in enumerate(_batches(3, torch.float32)):
        model.reuse_own = step == 2  # own[0] now runs in both blocks: released in backward since step 2
        loss = _loss(model, batch)
        hooks.watch(loss)
        if step < 2:
            loss.backward()
            hooks.finish_step()
        else:
            with pytest.raises(RuntimeError, match="second gradient in one backward.*use_reentrant=False"):
                loss.backward()


BUCKETED = [CONFIGS[0], CONFIGS[1], CONFIGS[2], CONFIGS[5], CONFIGS[7], CONFIGS[9]]


@pytest.mark.parametrize("bucket_bytes", [0, 64 * 80 * 4 + 1], ids=["per-tensor", "bucket-1-weight"])
@pytest.mark.parametrize(("name", "kwargs"), BUCKETED, ids=[IDS[CONFIGS.index(c)] for c in BUCKETED])
def test_bucketed_release_equals_a_normal_step_bit_for_bit(name, kwargs, bucket_bytes):
    """Per tensor, buckets that close after a weight and its neighbours, and (the other test) the whole model in
    one bucket at the end of backward: all the same bits as a normal step."""
    normal = _train(name, kwargs, torch.float32, release=False)
    _assert_same_run(normal, _train(name, kwargs, torch.float32, release=True, bucket_bytes=bucket_bytes))


@pytest.mark.parametrize(("bucket_bytes", "expected"), [(0, 8), (DEFAULT_BUCKET_BYTES, 1)], ids=["per-tensor", "25MiB"])
def test_one_finite_check_and_one_kernel_call_per_bucket(monkeypatch, bucket_bytes, expected):
    """A bucket is one optimizer call: one finite check over its gradients and one dispatch call (one launch
    per dtype group on CUDA), not one of each per tensor (8 tensors here)."""
    from lowmem_lightning.optim import adamw8bit as adamw_module

    calls = {"kernel": 0, "tensors": 0}
    update = adamw_module.dispatch

    def counting_update(family, tensors, scalars):
        calls["kernel"] += 1
        calls["tensors"] += len(tensors.params)
        return update(family, tensors, scalars)

    monkeypatch.setattr(adamw_module, "dispatch", counting_update)
    model = _model(torch.float32)
    opt = build_optimizer("adamw_8bit", model.parameters(), lr=1e-3)
    checks = []
    finite_flags = opt._finite_flags
    opt._finite_flags = lambda grads: checks.append(len(grads)) or finite_flags(grads)
    hooks = GradientRelease(opt, bucket_bytes=bucket_bytes).attach()
    _loss(model, _batches(1, torch.float32)[0]).backward()
    assert hooks.bucket_steps == len(checks) == calls["kernel"] == expected
    assert sum(checks) == calls["tensors"] == hooks.updates == 8


def test_invalid_bucket_bytes_raises():
    opt = build_optimizer("sgd", _model(torch.float32).parameters(), lr=1e-2)
    for bad in (-1, 1.5, True, "25MB"):
        with pytest.raises(ValueError, match="bucket_bytes"):
            GradientRelease(opt, bucket_bytes=bad)


class _SharedAfterBlock(torch.nn.Module):
    """A weight used inside a reentrant-checkpointed block and again after it: its outer gradient arrives first
    (the later use), then the nested pass adds to it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(80, 64)
        self.shared = torch.nn.Linear(64, 64)
        self.head = torch.nn.Linear(64, 8)

    def forward(self, x):
        h = checkpoint(lambda t: torch.tanh(self.shared(t)), self.inp(x), use_reentrant=True)
        return self.head(self.shared(h))


def _train_after_block(bucket_bytes, release: bool, steps: int = 3):
    model = _SharedAfterBlock()
    opt = build_optimizer("adamw_8bit", model.parameters(), lr=1e-3)
    hooks = GradientRelease(opt, bucket_bytes=bucket_bytes).attach() if release else None
    for batch in _batches(steps, torch.float32):
        opt.zero_grad(set_to_none=True)
        loss = _loss(model, batch)
        if hooks is not None:
            hooks.watch(loss)
        loss.backward()
        if hooks is not None:
            hooks.finish_step()
        opt.step()
    return model, opt


def test_a_second_gradient_while_in_the_bucket_is_held_back_whole():
    """Per tensor, the outer gradient is stepped at once and the nested one cannot be made right (an error);
    with a bucket the param is still waiting when the nested gradient arrives, so it is held back and updated
    with its whole gradient, exactly as a normal step."""
    with pytest.raises(RuntimeError, match="second gradient in one backward"):
        _train_after_block(0, release=True)
    _assert_same_run(_train_after_block(0, release=False), _train_after_block(DEFAULT_BUCKET_BYTES, release=True))


@pytest.mark.parametrize(("bucket_bytes", "warns"), [(DEFAULT_BUCKET_BYTES, True), (0, False), (1024, False)])
def test_warns_when_every_gradient_fits_in_one_bucket(bucket_bytes, warns):
    """One bucket holding every gradient closes only when backward ends: release then saves no memory, said once."""
    model = _model(torch.float32)
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert 1024 < grad_bytes < DEFAULT_BUCKET_BYTES
    opt = build_optimizer("adamw_8bit", model.parameters(), lr=1e-3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        GradientRelease(opt, bucket_bytes=bucket_bytes)
    said = [str(w.message) for w in caught if "fit in one bucket" in str(w.message)]
    assert len(said) == (1 if warns else 0), said
    if warns:
        assert f"bucket_bytes={bucket_bytes}" in said[0] and "bucket_bytes=0" in said[0]
        assert caught[0].filename == __file__  # points at the caller that built the release
