"""Optimizers on DTensor (sharded) params, as FSDP2 and tensor parallelism hand them over.

Two ranks (gloo, forked) each hold a shard of the same params and receive shards of the same
gradients; the gathered result is compared with one process updating plain tensors:

* element-wise optimizers (AdamW 8-bit, paged, SGD 8-bit): bit for bit equal to the same optimizer
  run on each shard as a plain tensor (their block-wise state is laid out per shard), and bit for
  bit equal to the unsharded run when the shards hold whole blocks;
* Adafactor and CAME (row/column statistics and RMS over the whole tensor, completed with
  all_reduce): equal to the unsharded run to fp32 summation order, whether rows or columns are split
  (with 8-bit momentum, whose blocks follow the shard, within 2% of the distance moved);
* an empty local shard (more ranks than rows) and a resume through torch.distributed.checkpoint
  (full and sharded state dicts) continue bit for bit; a checkpoint laid out for another sharding
  is refused with a clear message.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
from forked_ranks import forked_ranks

from lowmem_lightning.optim import build_optimizer, state_memory

WORLD = 2
STEPS = 4

# name -> (full shape, sharded dim)
PARAMS = {
    "even": ((64, 256), 0),  # each shard 32 x 256: whole blocks of 256
    "uneven": ((33, 300), 0),  # 17 and 16 rows
    "cols": ((40, 300), 1),  # columns split: 150 each
    "flat": ((9000,), 0),
    "small": ((70, 3), 0),  # < 4096 elements: fp32 state
    "empty": ((1, 5000), 0),  # rank 1 holds no rows
}

CASES = {
    "adamw_8bit": dict(lr=1e-2, weight_decay=0.1),
    "paged_adamw_8bit": dict(lr=1e-2, weight_decay=0.1, gpu_budget_bytes=0),
    "sgd": dict(lr=1e-2, momentum=0.9, momentum_dtype="int8", nesterov=True),
    "adafactor": dict(beta1=0.9, momentum_dtype="int8"),
    "adafactor_lr": dict(lr=1e-2, relative_step=False, scale_parameter=False, beta1=None),
    "came": dict(lr=1e-2, momentum_dtype="int8", weight_decay=0.01),
    "came_fp32": dict(lr=1e-2),
}
ELEMENTWISE = ("adamw_8bit", "paged_adamw_8bit", "sgd")


def _optimizer_name(case: str) -> str:
    return case.split("_lr")[0].split("_fp32")[0]


def _full_params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=g) * 0.1 for name, (shape, _) in PARAMS.items()}


def _full_grads(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return {name: torch.randn(shape, generator=g) * 0.1 for name, (shape, _) in PARAMS.items()}


# ------------------------------------------------------------------------------------ rank side
def _ranks(tmp_path, fn, *args) -> list[dict]:
    """Run ``fn(rank, *args)`` on WORLD forked gloo ranks; return what each rank returned."""
    return forked_ranks(tmp_path, WORLD, fn, *args)


def _module(full: dict[str, torch.Tensor], mesh_2d: bool = False, dtype: torch.dtype = torch.float32):
    """The params as DTensors sharded over the WORLD ranks; ``mesh_2d``: on a (1, WORLD) mesh, replicated
    over its first dim (the HSDP / FSDP+TP layout, with one replica)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1, WORLD) if mesh_2d else (WORLD,))
    module = torch.nn.Module()
    for name, tensor in full.items():
        placement = [Replicate()] * mesh_2d + [Shard(PARAMS[name][1])]
        sharded = distribute_tensor(tensor.clone().to(dtype), mesh, placement)
        module.register_parameter(name, torch.nn.Parameter(sharded))
    return module


def _set_grads(module, step: int) -> None:
    from torch.distributed.tensor import distribute_tensor

    for name, grad in _full_grads(step).items():
        param = getattr(module, name)
        param.grad = distribute_tensor(grad.to(param.dtype), param.device_mesh, param.placements)


def _train(module, opt, steps: range) -> None:
    for step in steps:
        _set_grads(module, step)
        opt.step()


def _gathered(module) -> dict[str, torch.Tensor]:
    return {name: p.full_tensor().detach().clone() for name, p in module.named_parameters()}


def _train_sharded(rank: int, case: str, mesh_2d: bool = False, dtype: torch.dtype = torch.float32) -> dict:
    module = _module(_full_params(), mesh_2d, dtype)
    opt = build_optimizer(_optimizer_name(case), module.parameters(), **CASES[case])
    _train(module, opt, range(STEPS))
    local_numel = sum(p.to_local().numel() for p in module.parameters())
    memory = state_memory(opt)
    return {"params": _gathered(module), "num_params": memory.num_params, "local_numel": local_numel}


def _resume(rank: int, case: str, how: str, tmp: str) -> dict:
    """Train 2 steps, checkpoint, train 2 more (run A); restore params + optimizer, train 2 (run B)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    name, kwargs = _optimizer_name(case), CASES[case]
    module = _module(_full_params())
    opt = build_optimizer(name, module.parameters(), **kwargs)
    _train(module, opt, range(2))
    snapshot = {n: p.to_local().clone() for n, p in module.named_parameters()}
    # "full": rank 0 gathers everything (what a single-file checkpoint holds) and broadcasts it on load
    options = StateDictOptions(full_state_dict=how == "full", cpu_offload=True, broadcast_from_rank0=how == "full")
    saved = get_optimizer_state_dict(module, opt, options=options)
    if how == "dcp":
        dcp.save({"optim": saved}, checkpoint_id=os.path.join(tmp, "ckpt"))
    else:  # what torch.save would write (the state dict shares memory with the live state)
        saved = copy.deepcopy(saved)
    _train(module, opt, range(2, STEPS))
    run_a = _gathered(module)

    with torch.no_grad():
        for n, p in module.named_parameters():
            p.to_local().copy_(snapshot[n])
    module.zero_grad(set_to_none=True)  # as after a restart (torch's loader initialises the state only then)
    fresh = build_optimizer(name, module.parameters(), **kwargs)
    if how == "dcp":
        target = {"optim": get_optimizer_state_dict(module, fresh, options=options)}
        dcp.load(target, checkpoint_id=os.path.join(tmp, "ckpt"))
        saved = target["optim"]
    set_optimizer_state_dict(module, fresh, saved, options=options)
    _train(module, fresh, range(2, STEPS))
    out = {"a": run_a, "b": _gathered(module)}
    if how == "full":  # a checkpoint from another sharding is refused, the optimizer left as it was
        for state in saved.get("state", {}).values():  # rank 0 holds the full dict, broadcast on load
            if "shard_layout" in state:
                state["shard_layout"] = [4, state["shard_layout"][1] // 2]
        try:
            set_optimizer_state_dict(module, fresh, saved, options=options)
            out["error"] = None
        except ValueError as err:
            out["error"] = str(err)
    return out


# ------------------------------------------------------------------------------------ single process
def _train_plain(case: str, split: bool, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The unsharded run; with ``split``, every param is cut into its WORLD shards, each a plain param."""
    full = {n: t.to(dtype) for n, t in _full_params().items()}
    pieces = {n: list(torch.chunk(t, WORLD, dim=PARAMS[n][1])) if split else [t] for n, t in full.items()}
    params = {n: [torch.nn.Parameter(p.clone()) for p in ps if p.numel()] for n, ps in pieces.items()}
    opt = build_optimizer(_optimizer_name(case), [p for ps in params.values() for p in ps], **CASES[case])
    for step in range(STEPS):
        grads = _full_grads(step)
        for n, ps in params.items():
            chunks = torch.chunk(grads[n], WORLD, dim=PARAMS[n][1]) if split else [grads[n]]
            for p, g in zip(ps, [c for c in chunks if c.numel()]):
                p.grad = g.clone().to(dtype)
        opt.step()
    return {n: torch.cat([p.detach() for p in ps], dim=PARAMS[n][1]) for n, ps in params.items()}


@pytest.fixture(autouse=True)
def _needs_distributed():
    if not dist.is_available():
        pytest.skip("torch built without torch.distributed")


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_update_matches_unsharded(tmp_path, case):
    ranks = _ranks(tmp_path, _train_sharded, case)
    got = ranks[0]["params"]
    torch.testing.assert_close(ranks[1]["params"], got, rtol=0, atol=0)  # every rank sees the same full tensors
    unsharded = _train_plain(case, split=False)
    start = _full_params()
    for name in PARAMS:
        assert (got[name] - start[name]).abs().max() > 1e-4, name  # the params moved
    if case in ELEMENTWISE:
        per_shard = _train_plain(case, split=True)
        for name in PARAMS:
            if name == "small" and case != "sgd":
                continue  # 210 elements: fp32 state either way, compared below
            expected = per_shard[name] if name != "small" else unsharded[name]
            torch.testing.assert_close(got[name], expected, rtol=0, atol=0, msg=f"{case} {name}")
        # whole blocks per shard: the same blocks as the unsharded tensor, so the same result bit for bit
        torch.testing.assert_close(got["even"], unsharded["even"], rtol=0, atol=0)
        torch.testing.assert_close(got["small"], unsharded["small"], rtol=0, atol=0)
    else:
        int8 = CASES[case].get("momentum_dtype") == "int8"
        for name in PARAMS:
            if int8 and name in ("even", "uneven", "cols", "flat"):
                # 8-bit momentum blocks follow the shard, not the whole tensor: the quantization error
                # differs, by well under 2% of the distance the params moved. Even whole-block shards
                # ("even") can flip a momentum code: the all-reduced row/column sums round differently
                # from the single-process sums (measured 0.36% of the distance moved, adafactor)
                moved = (unsharded[name] - start[name]).abs().max()
                assert (got[name] - unsharded[name]).abs().max() < 0.02 * moved, f"{case} {name}"
            else:
                torch.testing.assert_close(got[name], unsharded[name], rtol=2e-5, atol=1e-6, msg=f"{case} {name}")
    # state memory counts this rank's shard only
    assert [r["num_params"] for r in ranks] == [r["local_numel"] for r in ranks]


@pytest.mark.parametrize("case,how", [("adamw_8bit", "full"), ("adamw_8bit", "dcp"), ("came", "full"),
                                      ("adafactor", "dcp"), ("sgd", "dcp")])
def test_resume_through_distributed_checkpoint_is_bit_exact(tmp_path, case, how):
    ranks = _ranks(tmp_path, _resume, case, how, str(tmp_path))
    for result in ranks:
        for name in PARAMS:
            torch.testing.assert_close(result["b"][name], result["a"][name], rtol=0, atol=0, msg=name)
        if how == "full" and case == "adamw_8bit":
            assert result["error"] is not None and "resume with the same sharding" in result["error"]


@pytest.mark.parametrize("case", ["adamw_8bit", "came"])
def test_replicated_mesh_dim_is_ignored(tmp_path, case):
    """A (1, 2) mesh, replicated over dim 0 and sharded over dim 1: the same result as the 1-D mesh."""
    flat = _ranks(tmp_path / "flat", _train_sharded, case)[0]["params"]
    two_d = _ranks(tmp_path / "two_d", _train_sharded, case, True)[0]["params"]
    for name in PARAMS:
        torch.testing.assert_close(two_d[name], flat[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("case", ["adamw_8bit", "adafactor"])
def test_bf16_shards_match_the_unsharded_bf16_run_to_rounding_noise(tmp_path, case):
    """bf16 DTensor params: each shard is updated in fp32 and written back with stochastic rounding from
    its own stream, so the result differs from the unsharded bf16 run by rounding noise only, and
    updates below half an ulp still land."""
    ranks = _ranks(tmp_path, _train_sharded, case, False, torch.bfloat16)
    got = ranks[0]["params"]
    unsharded = _train_plain(case, split=False, dtype=torch.bfloat16)
    start = _full_params()
    for name in ("even", "small", "empty"):  # shards holding the unsharded run's 8-bit blocks exactly
        assert got[name].dtype == torch.bfloat16
        # bf16 spacing (upper bound) along the way: an element may have moved away and back (or through
        # zero, where its final ulp is tiny), by at most the largest distance any element moved
        reach = (unsharded[name].float() - start[name]).abs().max()
        ulp = 2.0**-7 * (torch.stack([got[name].float(), unsharded[name].float(), start[name]]).abs().amax(0) + reach)
        error = (got[name].float() - unsharded[name].float()).abs()
        # each of the two runs rounds each of its STEPS updates up or down: at most 2 * STEPS ulps apart
        assert (error <= 2 * STEPS * ulp).all(), (name, float((error / ulp).max()))
        assert error.mean() < 0.5 * ulp.mean()  # and typically far less
        changed = (got[name] != start[name].to(torch.bfloat16)).float().mean()
        assert changed > 0.1, (name, float(changed))
