"""Issue 24 (2): the persistent AdamW 8-bit kernel and the finite check read from a clipping norm.

The persistent kernel (programs that loop over the tile table, loading the next tile before computing the
current one) runs under the Triton interpreter here and must store exactly the bits of the reference (and so
of the one-program-per-tile kernel, which ``test_adamw8bit.py`` holds to the reference): every
(param, grad) dtype pair, odd and aligned sizes, unaligned pointers, many tensors per launch, grids that make
one program walk across several tensors, a non-finite gradient in the middle of a launch.
"""

import sys

import pytest
import torch
from optim_helpers import bits, one_cpu_thread  # noqa: F401 (one_cpu_thread: autouse fixture)

from lowmem_lightning.kernels import adamw8bit as kernel
from lowmem_lightning.kernels import dispatch, multitensor
from lowmem_lightning.kernels.multitensor import PARAM_GRAD_DTYPE_PAIRS, persistent
from lowmem_lightning.optim.adamw8bit import AdamW8bit

# 8-bit state: odd (general kernel), multiples of 16 (aligned kernel); fp32 state below 4096 elements
SHAPES = [(4097,), (1000, 5), (4096,), (64, 80), (7, 11), (33,), (16, 16)]






def _params(dtype, shapes, seed=0, offset=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        n = torch.Size(shape).numel()
        if offset:  # a view one element into its storage: an unaligned data pointer
            flat = (torch.randn(n + 1, generator=g) * 0.5).to(dtype)[1:]
            out.append(torch.nn.Parameter(flat.view(shape)))
        else:
            out.append(torch.nn.Parameter((torch.randn(shape, generator=g) * 0.5).to(dtype)))
    return out


def _run(params, steps, grad_dtype, bad_at=None):
    """``steps`` AdamW8bit steps with seeded grads; ``bad_at=(step, index)`` puts an inf in one gradient."""
    opt = AdamW8bit(params, lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    for p in params:
        p.grad_dtype = None
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = (torch.randn(p.shape, generator=g) * 0.1).to(grad_dtype)
            if bad_at == (step, i):
                p.grad.view(-1)[3] = float("inf")
        opt.step()
    return opt


def _assert_same(params_a, opt_a, params_b, opt_b):
    for i, (a, b) in enumerate(zip(params_a, params_b)):
        assert torch.equal(bits(a), bits(b)), f"param {i} {tuple(a.shape)} differs"
        for key, value in opt_b.state[b].items():
            assert torch.equal(bits(opt_a.state[a][key]), bits(value)), f"param {i} state {key!r} differs"


class _Spy:
    """Records the grids a Triton kernel is launched with."""

    def __init__(self, fn):
        self.fn, self.grids = fn, []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return self.fn[grid]


def _persistent_vs_reference(monkeypatch, param_dtype, grad_dtype, shapes, per_sm, steps=2, bad_at=(1, 1),
                             offset=False):
    spy = _Spy(kernel._adamw8bit_persistent_kernel)
    monkeypatch.setattr(kernel, "_adamw8bit_persistent_kernel", spy)
    tri_params = _params(param_dtype, shapes, offset=offset)
    with dispatch.override(force_triton=True), persistent(per_sm):
        tri = _run(tri_params, steps, grad_dtype, bad_at)
    ref_params = _params(param_dtype, shapes, offset=offset)
    ref = _run(ref_params, steps, grad_dtype, bad_at)
    _assert_same(tri_params, tri, ref_params, ref)
    start = _params(param_dtype, shapes, offset=offset)
    moved = [i for i, (p, p0) in enumerate(zip(tri_params, start)) if not torch.equal(p, p0)]
    assert moved, "nothing was updated"
    assert spy.grids, "the persistent kernel was not launched"
    return spy.grids, tri


@pytest.mark.parametrize("param_dtype, grad_dtype", PARAM_GRAD_DTYPE_PAIRS)
def test_persistent_kernel_equals_reference_every_dtype_pair(monkeypatch, param_dtype, grad_dtype):
    # launch groups (quantized x aligned): 5 + 5, 4 + 5 tiles, 1 + 1 and 1 (fp32 state); 3 programs walk across
    # tensors in the 8-bit groups
    grids, opt = _persistent_vs_reference(monkeypatch, param_dtype, grad_dtype, SHAPES, per_sm=3)
    assert max(grids) == (3,) and min(grids) >= (1,), grids  # launches of fewer tiles get fewer programs
    assert opt.skipped_updates == 1


@pytest.mark.parametrize("per_sm", [1, 2, 64])
def test_grid_sizes_one_program_to_one_per_tile(monkeypatch, per_sm):
    # one program walks every tile; two alternate; 64 > tiles: one tile each (the grid is capped at the tiles).
    # Launch groups: unaligned 4097 + 5000 elements (5 + 5 tiles of 1024), aligned 4096 + 5120 (4 + 5 tiles)
    grids, _ = _persistent_vs_reference(monkeypatch, torch.bfloat16, torch.bfloat16, SHAPES[:4], per_sm=per_sm,
                                        steps=2, bad_at=(0, 2))
    assert set(grids) == {(min(per_sm, 10),), (min(per_sm, 9),)}, grids


def test_many_tensors_and_unaligned_pointers(monkeypatch):
    # 40 tensors of fp32 state (one tile each) and 3 quantized ones, every pointer one element off alignment:
    # each of the 3 programs skips over two tensors between its tiles
    shapes = [(17 + 13 * i,) for i in range(40)] + [(4096,), (4112,), (5000,)]
    grids, opt = _persistent_vs_reference(monkeypatch, torch.float32, torch.bfloat16, shapes, per_sm=3,
                                          bad_at=(1, 41), offset=True)
    assert max(grids) == (3,), grids
    assert all(p.data_ptr() % 16 for p in opt.param_groups[0]["params"])


def test_non_persistent_path_is_used_when_off(monkeypatch):
    spy = _Spy(kernel._adamw8bit_persistent_kernel)
    monkeypatch.setattr(kernel, "_adamw8bit_persistent_kernel", spy)
    params = _params(torch.float32, [(4096,)])
    with dispatch.override(force_triton=True), persistent(0):
        _run(params, 1, torch.float32)
    assert spy.grids == []


def test_persistent_setting_is_validated(monkeypatch):
    for bad in (-1, 1.5, True, "4"):
        with pytest.raises(ValueError, match=r"programs_per_sm=.*int >= 0"):
            multitensor.configure_persistent(bad)
    with pytest.raises(ValueError, match=r"LOWMEM_PERSISTENT_PROGRAMS_PER_SM='x'"):
        multitensor._programs_per_sm_from_env({"LOWMEM_PERSISTENT_PROGRAMS_PER_SM": "x"})
    assert multitensor._programs_per_sm_from_env({"LOWMEM_PERSISTENT_PROGRAMS_PER_SM": "4"}) == 4
    assert multitensor._programs_per_sm_from_env({}) == 0
    assert multitensor.persistent_programs(10, torch.device("cpu"), per_sm=4) == 4
    assert multitensor.persistent_programs(3, torch.device("cpu"), per_sm=4) == 3
    assert multitensor.persistent_programs(10, torch.device("cpu"), per_sm=0) == 0


# --------------------------------------------------------------------------------------------------
# The finite check read from the clipping norm: the gradient is read once by the step
# --------------------------------------------------------------------------------------------------

NORM_OPS = ("aten::linalg_vector_norm", "aten::_foreach_norm", "aten::norm")


def _norm_passes(fn) -> int:
    """Norm kernels run by ``fn()`` (each one reads a gradient, or all of them for ``_foreach_norm``)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for event in prof.events() if event.name in NORM_OPS)


def _clipped_setup(seed=0, bad=None):
    params = _params(torch.float32, [(4097,), (1000, 5), (7, 11)], seed=seed)
    opt = AdamW8bit(params, lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    for i, p in enumerate(params):
        p.grad = torch.randn(p.shape, generator=g) * 3.0
        if bad == i:
            p.grad.view(-1)[2] = float("inf")
    return params, opt


@pytest.mark.parametrize("triton", [False, True])
def test_step_after_clip_reads_no_gradient_for_the_check_and_matches(triton):
    with dispatch.override(force_triton=triton):
        params, opt = _clipped_setup()
        total = opt.clip_grad_norm_(1.0)
        assert _norm_passes(opt.step) == 0  # the step's only gradient read is its kernel's
        # the same clipped gradients stepped with the per-tensor check: same bits, one norm per gradient
        params2, opt2 = _clipped_setup()
        coef = torch.clamp(1.0 / (total + 1e-6), max=1.0)
        for p in params2:
            p.grad.mul_(coef)
        assert _norm_passes(opt2.step) == len(params2)
    assert float(total) > 1.0
    _assert_same(params, opt, params2, opt2)
    assert opt.skipped_updates == 0


def test_clip_grad_norm_reads_each_gradient_once_and_scales_like_torch():
    params, opt = _clipped_setup()
    reference = [p.grad.clone() for p in params]
    passes = _norm_passes(lambda: opt.clip_grad_norm_(1.0))
    assert passes == len(params) + 1  # one norm per gradient (CPU; one _foreach_norm on CUDA) and the total's
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in reference]))
    for g, g0 in zip((p.grad for p in params), reference):
        torch.testing.assert_close(g, g0 * (1.0 / (total + 1e-6)), rtol=1e-6, atol=0)


@pytest.mark.parametrize("triton", [False, True])
def test_non_finite_clip_norm_skips_the_whole_step(triton):
    with dispatch.override(force_triton=triton):
        params, opt = _clipped_setup(bad=1)
        before = [p.detach().clone() for p in params]
        grads = [p.grad.clone() for p in params]
        total = opt.clip_grad_norm_(1.0)
        assert not torch.isfinite(total)
        assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))  # not scaled: nothing to save
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before)), "a param moved"
    for p in params:
        state = opt.state[p]
        assert float(state["step"]) == 0.0
        for key, value in state.items():
            if key != "step":
                assert not value.any(), f"state {key!r} written"
    assert opt.skipped_updates == len(params)
    # the per-tensor check (no reused norm) skips only the bad tensor: the documented difference
    params2, opt2 = _clipped_setup(bad=1)
    opt2.step()
    assert opt2.skipped_updates == 1


def test_reused_norm_serves_one_step_and_torch_clip_norm_is_accepted():
    params, opt = _clipped_setup()
    opt.use_grad_norm(torch.nn.utils.clip_grad_norm_(params, 1.0))
    assert _norm_passes(opt.step) == 0
    assert _norm_passes(opt.step) == len(params)  # the next step checks each gradient again
    opt.use_grad_norm(float("nan"))
    before = [p.detach().clone() for p in params]
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert opt.skipped_updates == len(params)
    # step_params (gradient release) keeps the per-tensor check and leaves a pending norm for step()
    opt.use_grad_norm(float("inf"))
    opt.step_params(params[:1])
    assert opt.skipped_updates == len(params)
    opt.step()
    assert opt.skipped_updates == 2 * len(params)


def test_clip_and_norm_arguments_are_validated():
    params, opt = _clipped_setup()
    for bad in (0, -1.0, float("nan"), "1", True):
        with pytest.raises(ValueError, match=r"max_norm=.*a number > 0"):
            opt.clip_grad_norm_(bad)
    with pytest.raises(ValueError, match=r"total_norm.*shape \(2,\)"):
        opt.use_grad_norm(torch.ones(2))


# --------------------------------------------------------------------------------------------------
# The device-run hook: optim_step.py's persistent and clip rows, with the passes outside the update
# --------------------------------------------------------------------------------------------------


def test_optim_step_rows_time_the_persistent_kernel_and_count_extra_passes(monkeypatch, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "optim_step.py"
    spec = importlib.util.spec_from_file_location("optim_step_n1", path)
    optim_step = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, optim_step)  # dataclasses look their module up
    spec.loader.exec_module(optim_step)
    spy = _Spy(kernel._adamw8bit_persistent_kernel)
    monkeypatch.setattr(kernel, "_adamw8bit_persistent_kernel", spy)
    names = "adamw_8bit,adamw_8bit_persistent2,adamw_8bit_clip,torch_adamw_fused,torch_adamw_fused_clip"
    with dispatch.override(force_triton=True):  # the Triton kernels under the interpreter, as on a GPU
        assert optim_step.main(["--sizes", "8K", "--repeats", "1", "--warmup", "0", "--no-csv",
                                "--param-dtype", "bfloat16", "--optimizers", names]) == 0
    assert spy.grids and set(spy.grids) == {(2,)}  # 1 SM off CUDA: 2 programs, only in the persistent row
    text = capsys.readouterr().out
    header = next(line for line in text.splitlines() if line.startswith("| optimizer |"))
    column = [cell.strip() for cell in header.split("|")].index("extra MB")
    extra = {line.split("|")[1].strip(): line.split("|") for line in text.splitlines()
             if line.startswith("| ") and not line.startswith("| optimizer")}
    grad_mb = 8192 * 2 / 1e6
    assert float(extra["adamw_8bit"][column]) == pytest.approx(grad_mb, abs=0.01)  # the finite check's read
    assert float(extra["adamw_8bit_persistent2"][column]) == pytest.approx(grad_mb, abs=0.01)
    assert float(extra["adamw_8bit_clip"][column]) == pytest.approx(3 * grad_mb, abs=0.01)  # clip read + r/w, no check
    assert float(extra["torch_adamw_fused"][column]) == 0.0
    assert float(extra["torch_adamw_fused_clip"][column]) == pytest.approx(3 * grad_mb, abs=0.01)


def test_a_norm_is_not_reused_for_gradients_changed_after_it():
    # a norm left by a step that never ran (AMP's GradScaler skipped it) must not vouch for later gradients
    params, opt = _clipped_setup()
    opt.clip_grad_norm_(1.0)
    params[1].grad.view(-1)[0] = float("inf")  # changed in place after the norm: the per-tensor check runs
    assert _norm_passes(opt.step) == len(params)
    assert opt.skipped_updates == 1  # only the bad tensor, not the whole step
    opt.clip_grad_norm_(1.0)  # inf norm: a whole-step skip pending
    for p in params:
        p.grad = torch.ones_like(p)  # replaced gradients
    before = [p.detach().clone() for p in params]
    assert _norm_passes(opt.step) == len(params)
    assert not any(torch.equal(p, b) for p, b in zip(params, before))
    assert opt.skipped_updates == 1
