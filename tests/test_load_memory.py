"""Loading a checkpoint holds the state once, plus one tensor's worth of temporaries (issue 30, 3).

Measured: the peak of live CPU tensor memory during the load above what was live before it, from
the allocator's own events (``torch.profiler`` with ``profile_memory=True``: every allocation and
free of the CPU allocator, each op's self bytes in time order; :func:`peak_above_start`). The method
is checked to see a copy: a ``copy.deepcopy`` of the state dict measures at least the state's bytes.

* one process, ``optimizer.load_state_dict(torch.load(...))``: the new state is one private copy of
  the loaded tensors (kept apart from the caller's dict, as before), so the peak above the start is
  at most the state's bytes plus the largest param's fp32 size (before this change: a deepcopy of
  the state dict plus torch's cast of every 8-bit code to fp32, ~5x the state);
* 2 gloo ranks, Lightning's ``ModelParallelStrategy`` load (target from the fresh optimizer,
  ``dcp.load``, ``set_optimizer_state_dict``): DCP writes into the optimizer's own state, which is
  adopted, so the peak above the start is at most one local shard's fp32 size; also when the
  checkpoint of 2 ranks loads on 1 and moved blocks are re-encoded.
"""

from __future__ import annotations

import copy
import io
import os

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from lowmem_lightning.optim import build_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(1024, 1024), (300, 700), (5000,), (40, 3)]
OPTIMIZERS = ["adamw_8bit", "paged_adamw_8bit"]


def peak_above_start(fn) -> tuple[int, int]:
    """``(peak, end)``: bytes of CPU tensor memory live above the start, at the peak and at the end, while
    ``fn()`` runs (allocator events of ``torch.profiler``: each op's self bytes, in start-time order)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak, live


def _state_bytes(opt) -> int:
    return sum(t.to_local().nbytes if hasattr(t, "to_local") else t.nbytes
               for state in opt.state.values() for t in state.values() if isinstance(t, torch.Tensor))


def _stepped(name: str, params: list[torch.Tensor]):
    opt = build_optimizer(name, params, lr=1e-2)
    for step in range(2):
        g = torch.Generator().manual_seed(step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return opt


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_single_process_load_holds_the_state_once(name):
    params = [torch.nn.Parameter(torch.randn(shape) * 0.1) for shape in SHAPES]
    opt = _stepped(name, params)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer)  # a checkpoint read from disk
    state = _state_bytes(opt)
    largest = 4 * max(p.numel() for p in params)
    copied, _ = peak_above_start(lambda: copy.deepcopy(saved))
    assert copied >= state  # the method sees a copy of the state
    fresh = build_optimizer(name, [torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2)
    peak, end = peak_above_start(lambda: fresh.load_state_dict(saved))
    print(f"{name}: state {state} B, largest fp32 param {largest} B, load peak {peak} B, kept {end} B")
    assert peak <= state + largest, (peak, state, largest)
    for before, after in zip(opt.state.values(), fresh.state.values()):
        for key, value in before.items():
            assert torch.equal(after[key], value), key


# ------------------------------------------------------------------------------------ sharded
def _module(world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    module = torch.nn.Module()
    for i, shape in enumerate(SHAPES):
        full = torch.randn(shape, generator=torch.Generator().manual_seed(i)) * 0.1
        module.register_parameter(f"p{i}", torch.nn.Parameter(distribute_tensor(full, mesh, [Shard(0)])))
    return module


def _save(rank: int, world: int, name: str, tmp: str) -> dict:
    """2 steps on ``world`` ranks, the optimizer saved with DCP; returns rank 0's state (for comparison)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    from torch.distributed.tensor import distribute_tensor

    module = _module(world)
    opt = build_optimizer(name, module.parameters(), lr=1e-2)
    for step in range(2):
        for p in module.parameters():
            grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
            p.grad = distribute_tensor(grad, p.device_mesh, p.placements)
        opt.step()
    dcp.save({"optimizer_0": get_optimizer_state_dict(module, opt)}, checkpoint_id=os.path.join(tmp, "ckpt"))
    return {"state": [{k: v.clone() for k, v in opt.state[p].items()} for p in module.parameters()]}


def _load(rank: int, world: int, name: str, tmp: str) -> dict:
    """Lightning's load on ``world`` ranks, measured (the fresh optimizer's state exists before: the target)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    module = _module(world)
    fresh = build_optimizer(name, module.parameters(), lr=1e-2)
    target = {"optimizer_0": get_optimizer_state_dict(module, fresh)}

    def load():
        dcp.load(target, checkpoint_id=os.path.join(tmp, "ckpt"))
        set_optimizer_state_dict(module, fresh, target["optimizer_0"], options=StateDictOptions(cpu_offload=True))

    peak, end = peak_above_start(load)
    return {"peak": peak, "end": end, "state": _state_bytes(fresh),
            "largest": 4 * max(p.to_local().numel() for p in module.parameters()),
            "loaded": [{k: v.clone() for k, v in fresh.state[p].items()} for p in module.parameters()]}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_sharded_load_adopts_what_dcp_wrote(tmp_path, name):
    """Same world size (2 ranks): the loaded state equals the saved one; peak under one local shard's fp32."""
    import test_reshard

    saved = test_reshard._ranks(str(tmp_path / "save"), 2, _save, name, str(tmp_path))
    result = test_reshard._ranks(str(tmp_path / "load"), 2, _load, name, str(tmp_path))
    print(f"{name} 2->2 rank 0: { {k: v for k, v in result.items() if k != 'loaded'} }")
    for before, after in zip(saved["state"], result["loaded"]):
        assert before.keys() == after.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert result["peak"] <= result["largest"], result


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_resharded_load_stays_under_one_tensor(tmp_path, name):
    """2 ranks -> 1: blocks of the (300, 700) and 1-D params move and are re-encoded in passes of 64K
    elements; the peak stays under the largest param's fp32 size."""
    import test_reshard

    test_reshard._ranks(str(tmp_path / "save"), 2, _save, name, str(tmp_path))
    result = test_reshard._ranks(str(tmp_path / "load"), 1, _load, name, str(tmp_path))
    print(f"{name} 2->1: { {k: v for k, v in result.items() if k != 'loaded'} }")
    assert result["peak"] <= result["largest"], result
