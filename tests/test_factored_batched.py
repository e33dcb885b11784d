"""Adafactor and CAME on Triton (interpreter): every pass is one launch for all tensors of a group.

A 12-tensor model (ten matrices of one statistics tile shape, two 1-D tensors, all of them aligned
and large enough for 8-bit momentum: one group each) steps in 5 + 3 (Adafactor) and 7 + 3 (CAME)
launches, the same counts as one tensor has, and every tensor of the batched launches equals the
reference run one tensor at a time: odd sizes (partial codec blocks,
partial 8-block update programs, partial row tiles), more than 32 row tiles (the finalize kernel's
two-level column sum), a 3-D batch of matrices, per-tensor step counters that differ after one
tensor's non-finite gradient was skipped, and the step size written by the group's first tensor.
"""

import pytest
import torch
from optim_helpers import assert_states_match, random_grads

from lowmem_lightning.kernels import adafactor as adafactor_kernels
from lowmem_lightning.kernels import came as came_kernels
from lowmem_lightning.kernels import dispatch, factored, factored_plan
from lowmem_lightning.optim.adafactor import Adafactor
from lowmem_lightning.optim.came import CAME

# ten matrices with 65..128 columns (one tile shape: 64 x 128), column counts multiples of 16, >= 4096
# elements (most fill part of one 64-row tile, two span two tiles, two are 3-D batches); two 1-D tensors: one
# launch group for the matrices, one for the vectors
ALIGNED_MODEL = [(33, 128), (43, 96), (2, 22, 96), (52, 80), (70, 112), (55, 80), (3, 15, 96), (48, 128),
                 (100, 80), (45, 112), (4096,), (5008,)]
# odd sizes: unaligned and aligned, fp32 momentum below 4096 elements: several groups
MODEL = [(33, 65), (130, 100), (2, 70, 96), (65, 128), (200, 72), (70, 70), (7, 120), (96, 80), (3, 9, 66),
         (40, 127), (4097,), (300,)]
TALL = [(2100, 65), (33, 65)]  # 33 row tiles of 64 rows: several FINALIZE_ROWS slabs of partials
# column counts multiples of 256: every codec block in one row (the update's ROW_BLOCKS variant)
ROW_BLOCK_MODEL = [(20, 256), (3, 17, 512), (33, 256), (4096,)]


class _Counting:
    """Stands in for a ``@triton.jit`` kernel: counts ``kernel[grid](...)`` launches, then launches it."""

    def __init__(self, kernel, log: list):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        self.log.append(self.kernel.fn.__name__)
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            if kwargs.get("ROW_BLOCKS"):
                self.log.append("ROW_BLOCKS")
            return launch(*args, **kwargs)

        return run


def _count_launches(monkeypatch) -> list:
    log: list = []
    names = {factored: ("sq_stats_kernel", "sq_finalize_kernel", "clip_stats_kernel", "full_stats_kernel",
                        "scalars_kernel"),
             adafactor_kernels: ("adafactor_update_kernel",),
             came_kernels: ("_res_stats_kernel", "_came_update_kernel")}
    for module, kernels in names.items():
        for name in kernels:
            monkeypatch.setattr(module, name, _Counting(getattr(module, name), log))
    return log


def _run(factory, shapes, grads, triton: bool, bad: tuple | None = None):
    """Train copies of fixed params over ``grads``; ``bad = (step, tensor)``: a NaN in that gradient."""
    gen = torch.Generator().manual_seed(7)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    start = [p.detach().clone() for p in params]
    opt = factory(params)
    with dispatch.override(force_triton=triton):
        for k, step_grads in enumerate(grads):
            for i, (p, g) in enumerate(zip(params, step_grads)):
                p.grad = g.clone()
                if bad == (k, i):
                    p.grad.view(-1)[5] = float("nan")
            opt.step()
    return params, opt, start


def _assert_same(shapes, grads, factory, bad=None):
    """Triton and the reference: states as :func:`assert_states_match`, except that with 8-bit momentum
    CAME's instability statistics get 1e-4 (a code rounded one step apart, allowed there, enters (u - m)^2
    of the next step); params within 1 ulp plus 2e-5 of how far they moved (summation order: the
    statistics differ by up to ~5e-6 relative, the factors are 1/sqrt of them), and with 8-bit momentum
    at most 0.1% of them, those downstream of such a code, within 1% of it."""
    ref, ref_opt, start = _run(factory, shapes, grads, triton=False, bad=bad)
    ours, opt, _ = _run(factory, shapes, grads, triton=True, bad=bad)
    for a, b, p0 in zip(ours, ref, start):
        sa, sb = opt.state[a], ref_opt.state[b]
        loose = {k for k in sa if k.startswith("exp_avg_res_")} if "exp_avg_codes" in sa else set()
        assert_states_match({k: v for k, v in sa.items() if k not in loose}, sb)
        for key in loose:
            assert ((sa[key] - sb[key]).abs().max() / sb[key].abs().max()).item() <= 1e-4, key
        moved = (b.detach() - p0).abs().max().item()
        diff = (a.detach() - b.detach()).abs()
        off = diff > 2e-5 * moved + 2**-23 * b.detach().abs()
        assert off.float().mean() <= (1e-3 if "exp_avg_codes" in sa else 0.0), (tuple(a.shape), int(off.sum()))
        assert diff.max() <= 1e-2 * moved, tuple(a.shape)
    return opt, ref_opt


ADAFACTOR_MODES = [dict(beta1=0.9, momentum_dtype="int8", weight_decay=0.1), dict(beta1=0.9), dict()]
CAME_MODES = [dict(lr=1e-2, momentum_dtype="int8", weight_decay=0.1), dict(lr=1e-2)]


@pytest.mark.parametrize("kwargs", ADAFACTOR_MODES, ids=["int8", "fp32", "no-momentum"])
def test_adafactor_step_is_five_launches_for_the_matrices_and_three_for_the_vectors(monkeypatch, kwargs):
    grads = random_grads(ALIGNED_MODEL, 1, seed=2)
    log = _count_launches(monkeypatch)
    _run(lambda ps: Adafactor(ps, **kwargs), ALIGNED_MODEL, grads, triton=True)
    assert sorted(log) == sorted(["sq_stats_kernel", "sq_finalize_kernel", "clip_stats_kernel", "scalars_kernel",
                                  "adafactor_update_kernel", "full_stats_kernel", "scalars_kernel",
                                  "adafactor_update_kernel"]), log


@pytest.mark.parametrize("kwargs", CAME_MODES, ids=["int8", "fp32"])
def test_came_step_is_seven_launches_for_the_matrices_and_three_for_the_vectors(monkeypatch, kwargs):
    grads = random_grads(ALIGNED_MODEL, 1, seed=2)
    log = _count_launches(monkeypatch)
    _run(lambda ps: CAME(ps, **kwargs), ALIGNED_MODEL, grads, triton=True)
    assert sorted(log) == sorted(["sq_stats_kernel", "sq_finalize_kernel", "clip_stats_kernel", "scalars_kernel",
                                  "_res_stats_kernel", "sq_finalize_kernel", "_came_update_kernel",
                                  "full_stats_kernel", "scalars_kernel", "_came_update_kernel"]), log


@pytest.mark.parametrize("kwargs", ADAFACTOR_MODES, ids=["int8", "fp32", "no-momentum"])
def test_adafactor_group_equals_the_reference_per_tensor(kwargs):
    # a NaN in tensor 3's first gradient: that tensor skips a step, so the group's step counters differ
    opt, ref_opt = _assert_same(MODEL, random_grads(MODEL, 2, seed=4), lambda ps: Adafactor(ps, **kwargs),
                                bad=(0, 3))
    assert [float(opt.state[p]["step"]) for p in opt.param_groups[0]["params"]][2:5] == [2.0, 1.0, 2.0]
    assert opt.effective_lr() == pytest.approx(ref_opt.effective_lr(), rel=1e-6)


@pytest.mark.parametrize("kwargs", CAME_MODES, ids=["int8", "fp32"])
def test_came_group_equals_the_reference_per_tensor(kwargs):
    # two steps: a third would feed a momentum code that rounded one step apart (allowed, fp32 summation
    # order) into (u - m)^2 and move that row's instability statistic by more than the fp32 tolerance
    _assert_same(MODEL, random_grads(MODEL, 2, seed=4), lambda ps: CAME(ps, **kwargs), bad=(0, 3))


def test_one_group_of_aligned_tensors_equals_the_reference_per_tensor():
    grads = random_grads(ALIGNED_MODEL, 2, seed=6)
    _assert_same(ALIGNED_MODEL, grads, lambda ps: CAME(ps, lr=1e-2, momentum_dtype="int8"), bad=(0, 1))
    _assert_same(ALIGNED_MODEL, grads, lambda ps: Adafactor(ps, beta1=0.9, momentum_dtype="int8"), bad=(0, 1))


@pytest.mark.parametrize("momentum_dtype", ["int8", "float32"])
def test_row_block_matrices_equal_the_reference(monkeypatch, momentum_dtype):
    grads = random_grads(ROW_BLOCK_MODEL, 2, seed=8)
    log = _count_launches(monkeypatch)
    _assert_same(ROW_BLOCK_MODEL, grads, lambda ps: CAME(ps, lr=1e-2, momentum_dtype=momentum_dtype), bad=(0, 2))
    assert log.count("_came_update_kernel") == 2 * 2  # (matrices, vectors) x 2 steps
    assert log.count("ROW_BLOCKS") == 2  # the matrices' update, 2 steps
    _assert_same(ROW_BLOCK_MODEL, grads, lambda ps: Adafactor(ps, beta1=0.9, momentum_dtype=momentum_dtype),
                 bad=(1, 0))


def test_many_row_tiles_sum_in_the_two_level_finalize():
    assert factored_plan.TILE_ELEMENTS // 128 * factored_plan.FINALIZE_ROWS < TALL[0][0]  # > one slab of partials
    _assert_same(TALL, random_grads(TALL, 2, seed=5), lambda ps: CAME(ps, lr=1e-2, momentum_dtype="int8"))


def test_group_key_splits_tile_shapes_dtypes_momentum_and_alignment():
    def key(shape, dtype=torch.float32, m=None, absmax=None):
        p = torch.zeros(shape, dtype=dtype)
        vc = torch.zeros(shape[-1]) if len(shape) > 1 else None
        return factored_plan.group_key(p, p, vc, m, absmax)

    assert key((33, 65)) == key((40, 127))[:-1] + (False,)  # same tile shape; 65, 127 columns: not aligned
    assert key((64, 128)) == key((96, 80))  # aligned both
    assert key((33, 65)) != key((33, 64))  # 64 columns: a 128 x 64 tile
    assert key((64, 128)) != key((64, 128), torch.bfloat16)
    assert key((64, 128)) != key((64, 128), m=torch.zeros(64, 128))
    assert key((64, 128), m=torch.zeros(64 * 128, dtype=torch.int8), absmax=torch.zeros(32))[5] == 2
    assert key((64, 256))[3:5] == ((64, 128), True) and key((64, 128))[3:5] == ((64, 128), False)
    assert key((4096,))[2:4] == (False, None)
