"""A checkpoint written on N processes resumes on M (2 -> 1, 2 -> 4, 4 -> 2), for every optimizer.

Phase 1 runs on N forked gloo ranks: FSDP2-style params (DTensors sharded along dim 0), 2 steps, the
optimizer state saved with ``torch.distributed.checkpoint`` (the calls Lightning's
``ModelParallelStrategy`` makes), then 2 more steps: the uninterrupted run. Phase 2 runs on M ranks:
the params after step 2, a fresh optimizer, the state loaded from that checkpoint, the same 2 steps.

Checked, per param (full tensors gathered on rank 0):

* right after the load, the state (decoded) equals the saved state exactly on every element whose
  block did not move, and within one code step of its new block elsewhere; fp32 state exactly;
* after the 2 resumed steps: element-wise optimizers (AdamW 8-bit, paged, SGD int8, torch AdamW)
  equal the uninterrupted run bit for bit where both runs have the same blocks ("even": 256-element
  rows, "small": fp32 state); other params, and Adafactor/CAME (their row/column sums are all-reduced
  in another order on another world size), within a stated fraction of the distance the params moved;
  AdamW 4-bit (m rounded stochastically with draws seeded per shard) within a larger stated fraction,
  bit for bit on "small" and "wide".
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from forked_ranks import forked_ranks

from lowmem_lightning.optim import build_optimizer
from lowmem_lightning.optim.reshard import CODEC4, CODEC8, decode_rows

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 4
PARAMS = {
    "even": (64, 256),  # 256-element rows: every world size of 1, 2, 4 cuts at block boundaries
    "uneven": (33, 300),  # shard boundaries inside blocks: blocks move
    "flat": (9000,),  # 1-D: 4500 / 2250 elements per shard
    "small": (70, 3),  # < 4096 elements: fp32 state
    "wide": (1, 5000),  # one row: the other ranks hold empty shards
}
CASES = {
    "adamw_8bit": dict(lr=1e-2, weight_decay=0.1),
    "paged_adamw_8bit": dict(lr=1e-2, weight_decay=0.1, gpu_budget_bytes=0),
    "sgd": dict(lr=1e-2, momentum=0.9, momentum_dtype="int8"),
    "adafactor": dict(beta1=0.9, momentum_dtype="int8"),
    "came": dict(lr=1e-2, momentum_dtype="int8"),
    "adamw": dict(lr=1e-2, weight_decay=0.1),
    "adamw_4bit": dict(lr=1e-2, weight_decay=0.1),
}
# adamw_4bit is element-wise too, but rounds m stochastically with a stream seeded per shard and element index
# within it: on another world size the rounding draws differ, so it is held to MOVED_FRACTION everywhere
ELEMENTWISE = ("adamw_8bit", "paged_adamw_8bit", "sgd", "adamw")
SAME_BLOCKS = ("even", "small", "wide")  # "wide": one row, held whole by one rank in every run
# bound on |resumed - uninterrupted| as a fraction of the largest distance a param moved in 4 steps
# (measured with the ranks of this file: see benchmarks/RESULTS.md, "Resharding")
MOVED_FRACTION = 0.02
# adamw_4bit: a stochastically rounded 4-bit m whose draws depend on the sharding (measured up to 0.24 on 2->1, where
# an uninterrupted 1-process run differs from the 2-process one by 0.46-0.56: benchmarks/RESULTS.md, "Resharding")
STOCHASTIC_M = {"adamw_4bit": 0.3}


def _full_params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=g) * 0.1 for name, shape in PARAMS.items()}


def _grads(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return {name: torch.randn(shape, generator=g) * 0.1 for name, shape in PARAMS.items()}


# ------------------------------------------------------------------------------------ ranks
def _ranks(tmp, world: int, fn, *args) -> dict:
    """Run ``fn(rank, world, *args)`` on ``world`` forked gloo ranks; return rank 0's result."""
    return forked_ranks(tmp, world, fn, world, *args)[0]


def _module(full: dict[str, torch.Tensor], world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    module = torch.nn.Module()
    for name, tensor in full.items():
        module.register_parameter(name, torch.nn.Parameter(distribute_tensor(tensor.clone(), mesh, [Shard(0)])))
    return module


def _train(module, opt, steps) -> None:
    from torch.distributed.tensor import distribute_tensor

    for step in steps:
        for name, grad in _grads(step).items():
            param = getattr(module, name)
            param.grad = distribute_tensor(grad, param.device_mesh, param.placements)
        opt.step()
        module.zero_grad(set_to_none=True)


def _gathered(module) -> dict[str, torch.Tensor]:
    return {name: p.full_tensor().detach().clone() for name, p in module.named_parameters()}


def _full_state(module, opt) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_optimizer_state_dict(module, opt, options=options).get("state", {})  # rank 0 only
    return copy.deepcopy(state)  # on one rank the full tensors can be the live state itself


def _save_phase(rank: int, world: int, case: str, tmp: str) -> dict:
    """The uninterrupted run on ``world`` ranks; the checkpoint after step 2 in ``tmp``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    module = _module(_full_params(), world)
    opt = build_optimizer(case, module.parameters(), **CASES[case])
    _train(module, opt, range(2))
    dcp.save({"optimizer_0": get_optimizer_state_dict(module, opt)}, checkpoint_id=os.path.join(tmp, "ckpt"))
    out = {"params2": _gathered(module), "state2": _full_state(module, opt)}
    groups = _groups(opt, module)  # a collective: every rank calls it
    if rank == 0:  # the single-file form (ModelParallelStrategy(save_distributed_checkpoint=False))
        torch.save({"state": out["state2"], "param_groups": groups}, os.path.join(tmp, "full.pt"))
    _train(module, opt, range(2, STEPS))
    out["final"] = _gathered(module)
    return out


def _groups(opt, module) -> list:
    """The param groups of a full optimizer state dict (params named by their FQN)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return copy.deepcopy(get_optimizer_state_dict(module, opt, options=options).get("param_groups", []))


def _load_phase(rank: int, world: int, case: str, tmp: str, params2: dict, how: str = "dcp") -> dict:
    """Lightning's load on ``world`` ranks, then 2 steps: ``"dcp"``: target from a fresh optimizer, ``dcp.load``,
    set; ``"full"``: the single file read on every rank, set with ``broadcast_from_rank0``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    module = _module(params2, world)
    opt = build_optimizer(case, module.parameters(), **CASES[case])
    if how == "full":
        full = torch.load(os.path.join(tmp, "full.pt"), mmap=True)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_optimizer_state_dict(module, opt, full, options=options)
    else:
        target = {"optimizer_0": get_optimizer_state_dict(module, opt)}
        dcp.load(target, checkpoint_id=os.path.join(tmp, "ckpt"))
        set_optimizer_state_dict(module, opt, target["optimizer_0"], options=StateDictOptions(cpu_offload=True))
    out = {"state2": _full_state(module, opt)}
    _train(module, opt, range(2, STEPS))
    out["final"] = _gathered(module)
    return out


# ------------------------------------------------------------------------------------ checks
def _check_state_after_load(saved: dict, loaded: dict, codec=CODEC8) -> dict[str, int]:
    """Loaded state vs saved state per param (codes in row form, of ``codec``); returns the number of elements
    whose block moved."""
    moved = {}
    assert saved.keys() == loaded.keys()
    for fqn, state in saved.items():
        assert state.keys() == loaded[fqn].keys(), fqn
        moved[fqn] = 0
        for key, value in state.items():
            other = loaded[fqn][key]
            if key.endswith("_absmax"):
                continue  # compared through the decoded codes
            if key.endswith("_codes"):
                rows_key = key[: -len("_codes")] + "_absmax"
                before = decode_rows(value, state[rows_key], codec)
                after = decode_rows(other, loaded[fqn][rows_key], codec)
                diff = (after - before).abs()
                changed = diff > 0
                moved[fqn] += int(changed.sum())
                # one code step of the new block (the scale each element now decodes with)
                top = codec.top[0] if other.dtype == torch.int8 else codec.top[1]
                scale = decode_rows(torch.full_like(other, top), loaded[fqn][rows_key], codec)
                step = codec.step(other.reshape(-1), scale)
                assert (diff <= step).all(), (fqn, key, float((diff / step.clamp_min(1e-30)).max()))
            else:
                torch.testing.assert_close(other, value, rtol=0, atol=0, msg=f"{fqn} {key}")
    return moved


def _reshard(tmp_path, case: str, before: int, after: int, how: str = "dcp") -> tuple[dict, dict, dict]:
    saved = _ranks(str(tmp_path / "save"), before, _save_phase, case, str(tmp_path))
    loaded = _ranks(str(tmp_path / "load"), after, _load_phase, case, str(tmp_path), saved["params2"], how)
    codec = CODEC4 if case == "adamw_4bit" else CODEC8
    return saved, loaded, _check_state_after_load(saved["state2"], loaded["state2"], codec)


def _check_training(case: str, saved: dict, loaded: dict, moved: dict[str, int]) -> dict[str, float]:
    """The resumed run against the uninterrupted one; returns |diff| / distance moved per param."""
    start = _full_params()
    ratios = {}
    for name in PARAMS:
        a, b = saved["final"][name], loaded["final"][name]
        distance = float((a - start[name]).abs().max())
        assert distance > 1e-4, name
        ratios[name] = float((b - a).abs().max()) / distance
        if (case in ELEMENTWISE and name in SAME_BLOCKS) or (case in STOCHASTIC_M and name in ("small", "wide")):
            assert moved.get(name, 0) == 0, name  # "small": fp32 state; "wide": one shard, same rounding draws
            torch.testing.assert_close(b, a, rtol=0, atol=0, msg=f"{case} {name}")
        else:
            assert ratios[name] < STOCHASTIC_M.get(case, MOVED_FRACTION), (case, name, ratios[name])
    return ratios


FAST = [("adamw_8bit", 2, 1), ("adamw_8bit", 2, 4), ("paged_adamw_8bit", 2, 1), ("sgd", 2, 1),
        ("adafactor", 2, 1), ("came", 2, 1), ("adamw", 2, 1), ("adamw_4bit", 2, 1)]
ALL = [(case, n, m) for case in CASES for n, m in ((2, 1), (2, 4), (4, 2))]


@pytest.mark.parametrize(
    "case,before,after",
    [c if c in FAST else pytest.param(*c, marks=pytest.mark.slow) for c in ALL],
)
def test_checkpoint_resumes_on_another_world_size(tmp_path, case, before, after):
    saved, loaded, moved = _reshard(tmp_path, case, before, after)
    ratios = _check_training(case, saved, loaded, moved)
    print(f"{case} {before}->{after}: moved elements {moved}, |resumed - straight| / distance {ratios}")
    if case != "adamw":
        assert moved["uneven"] > 0 or moved["flat"] > 0  # some blocks did move: the conversion was exercised


@pytest.mark.parametrize("before,after", [(2, 1), pytest.param(2, 4, marks=pytest.mark.slow)])
def test_full_checkpoint_resumes_on_another_world_size(tmp_path, before, after):
    """The single-file form (``save_distributed_checkpoint=False``: rank 0 gathers, every rank reads the file and
    ``set_optimizer_state_dict`` broadcasts it) loads on another world size as the sharded form does."""
    saved, loaded, moved = _reshard(tmp_path, "adamw_8bit", before, after, how="full")
    _check_training("adamw_8bit", saved, loaded, moved)
    assert moved["uneven"] > 0 and moved["even"] == 0


def test_4bit_row_form_refuses_8bit_codes():
    """Row-form codes outside the 4-bit range (an 8-bit checkpoint's) are refused by adamw_4bit with a clear
    message, not packed into wrong nibbles; in-range codes of the same layout load."""
    from lowmem_lightning.optim.reshard import row_width

    param = torch.nn.Parameter(torch.randn(64, 256))
    opt = build_optimizer("adamw_4bit", [param], lr=1e-2)
    rows = torch.zeros(64, row_width((64, 256), CODEC4.block))
    rows[:, 2] = 1.0
    rows[-1, 1] = 1.0
    for value, ok in ((7, True), (100, False)):
        state = {"step": torch.tensor(1.0), "exp_avg_codes": torch.full((64, 256), value, dtype=torch.int8),
                 "exp_avg_absmax": rows.clone(), "exp_avg_sq_codes": torch.full((64, 256), 3, dtype=torch.uint8),
                 "exp_avg_sq_absmax": rows.clone()}
        sd = {"state": {0: state}, "param_groups": opt.state_dict()["param_groups"]}
        if ok:
            opt.load_state_dict(sd)
            assert opt.state[param]["exp_avg_codes"].numel() == 64 * 256 // 2
            assert int(opt.state[param]["exp_avg_codes"][0]) == 7 | (7 << 4)
        else:
            with pytest.raises(ValueError, match="outside the 4-bit range"):
                opt.load_state_dict(sd)


# ------------------------------------------------------------------------------------ the forked ranks themselves
def _dies_or_hangs(rank: int, how: str) -> int:
    """Rank 1 aborts (as a C++ ``std::terminate`` does) or hangs after a first collective; rank 0 then waits for
    it in the runner's closing barrier."""
    torch.distributed.barrier()
    if rank == 1 and how == "abort":
        os.abort()
    if rank == 1 and how == "hang":
        import time

        time.sleep(3600)
    return rank


@pytest.mark.parametrize("how", ["abort", pytest.param("hang", marks=pytest.mark.slow)])  # hang: ~8 s of waiting
def test_forked_rank_that_dies_or_hangs_is_reported_with_its_stderr(tmp_path, how):
    """A rank killed by a signal (the flaky ``Fatal Python error: Aborted``) or hung is reported first, by rank,
    signal and its own stderr (faulthandler's stacks of every thread), not only by its peer's connection error;
    a hung rank is killed, not left behind."""
    from forked_ranks import run_forked_ranks

    timeout_s = 3 if how == "hang" else 30
    results, failed = run_forked_ranks(tmp_path, 2, _dies_or_hangs, how, timeout_s=timeout_s)
    assert results == [] and failed
    first = failed[0]
    if how == "abort":
        assert first.startswith("forked rank 1 died from SIGABRT (exit code -6)"), first
        assert "Fatal Python error: Aborted" in first and "_dies_or_hangs" in first, first
        assert any("Connection" in text or "rank 0" in text for text in failed[1:]), failed
    else:
        assert "forked rank 1 had not finished" in first and "killed" in first, first
        assert "_dies_or_hangs" in first, first  # the stacks dumped before the kill
