"""Field test: Lightning Fabric with FSDP1 (``FSDPStrategy``) and FSDP2 (``ModelParallelStrategy``, ``fully_shard``)
checkpoints, on CPU with gloo, 2 processes (brief v2, part 2).

A user's Fabric loop (``SCRIPT``): ``fabric.setup_module``, our optimizer built over the wrapped module's params,
``fabric.setup_optimizers``, ``fabric.backward``; ``fabric.save(path, {"model", "optimizer", "step"})`` after
``SAVE_AT`` steps, then ``fabric.load`` in a NEW pair of processes and ``STEPS - SAVE_AT`` more steps. Checked on
each rank: the state right after the load equals the state at the save bit for bit (params, our own state: codes,
scales, step), and the resumed run ends where the straight run of ``STEPS`` steps does, bit for bit. Forms: FSDP1
``state_dict_type="sharded"`` and ``"full"``, FSDP2 ``save_distributed_checkpoint=True`` (sharded) and ``False``
(one full file). Optimizers: adamw_8bit and adamw_4bit (both strategies), CAME with int8 momentum (FSDP2; FSDP1
refuses it at construction with our message). A sharded FSDP1 checkpoint of 2 ranks also loads on 1 rank: moments
within half a code step of the saved ones (re-encoded on other block boundaries), like the full 2 -> 1 case of
``test_fsdp1``.

FSDP1 on CPU: Lightning's ``FSDPStrategy`` wraps with ``device_id=root_device.index`` (None on the CPU: FSDP1 then
picks CUDA) and Fabric refuses the plain class on the CPU; the script's ``CPUFSDPStrategy`` subclass wraps with
``device_id=cpu`` (as ``test_fsdp1``'s Trainer subclass does).
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from launched_scripts import run_script
from optim_helpers import snapshot_differences
from test_fsdp1 import REQUANT_BOUND

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore")]

SAVE_AT, STEPS = 3, 5
OPTIMIZERS = {  # case -> (registered name, kwargs)
    "adamw_8bit": ("adamw_8bit", {"lr": 1e-2}),
    "adamw_4bit": ("adamw_4bit", {"lr": 1e-2}),
    "came_int8": ("came", {"lr": 1e-3, "momentum_dtype": "int8"}),
}
FSDP1_CASES = ["adamw_8bit", "adamw_4bit"]
FSDP2_CASES = ["adamw_8bit", "adamw_4bit", "came_int8"]

SCRIPT = '''
import json
import os
import sys

import lightning as L
import torch
from lightning.fabric.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.fabric.strategies import fsdp as fabric_fsdp
from torch import nn

from lowmem_lightning.optim import build_optimizer
from lowmem_lightning.optim.sharding import local

OUT, STRATEGY, PHASE, KIND, WORLD = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
CASES = json.loads(sys.argv[6])  # case -> [registered name, kwargs]
SAVE_AT, STEPS = {save_at}, {steps}


class CPUFSDPStrategy(FSDPStrategy):
    """Fabric's FSDP1 strategy wrapping with device_id=cpu (Lightning passes root_device.index: None on the CPU)."""

    def setup_module(self, module):
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(module, cpu_offload=self.cpu_offload,
                                        mixed_precision=self.mixed_precision_config,
                                        sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"),
                                        **self._fsdp_kwargs)


def cpu_full_context(module, world_size, rank0_only=True):
    """Fabric's full state-dict context with offload_to_cpu=False: on CPU tensors its offload_to_cpu=True copies
    nothing and FSDP1 then crashes cloning the model's state dict (torch AdamW too; on a GPU it makes the copies)."""
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP.state_dict_type(module, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=rank0_only),
                                FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only))


if os.environ.get("FABRIC_FULL_OFFLOAD") != "1":  # set: Fabric's own context, to show the crash
    fabric_fsdp._get_full_state_dict_context = cpu_full_context


def parallelize(module, mesh):
    """FSDP2: each Linear, then the root, sharded over the data-parallel mesh."""
    from torch.distributed.fsdp import fully_shard

    for layer in module:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh["data_parallel"])
    return fully_shard(module, mesh=mesh["data_parallel"])


def strategy():
    if STRATEGY == "fsdp1":
        return CPUFSDPStrategy(state_dict_type=KIND)
    return ModelParallelStrategy(parallelize, data_parallel_size=WORLD, tensor_parallel_size=1,
                                 save_distributed_checkpoint=KIND == "sharded")


def model_and_optimizer(fabric, name, kwargs):
    torch.manual_seed(0)  # 16248 params; the 9600-element weight straddles the ranks (8-bit/4-bit state)
    model = fabric.setup_module(nn.Sequential(nn.Linear(32, 200), nn.Tanh(), nn.Linear(200, 48)))
    return model, fabric.setup_optimizers(build_optimizer(name, model.parameters(), **kwargs))


def train(fabric, model, optimizer, steps):
    for step in steps:
        g = torch.Generator().manual_seed(1000 * step + fabric.global_rank)
        x, y = torch.randn(8, 32, generator=g), torch.randn(8, 48, generator=g)
        fabric.backward(nn.functional.mse_loss(model(x), y))
        optimizer.step()
        optimizer.zero_grad()


def snapshot(model, optimizer):
    params = list(model.parameters())
    state = optimizer.optimizer.state
    return {{"params": [local(p).detach().clone() for p in params],
             "state": [{{k: local(v).clone() for k, v in state[p].items()}} if p in state else {{}} for p in params]}}


def full_fp32(model, optimizer):
    """FSDP1's full optimizer state dict on every rank (fp32 form, FQN keys): what a 2 -> 1 load must reproduce."""
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.state_dict_type(model._forward_module, StateDictType.FULL_STATE_DICT, FullStateDictConfig(),
                              FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=False)):
        osd = FSDP.optim_state_dict(model._forward_module, optimizer.optimizer)
    return {{fqn: {{k: v.clone() for k, v in s.items() if torch.is_tensor(v) and v.dim()}}
             for fqn, s in osd["state"].items()}}


def save_phase(fabric):
    result = {{}}
    for case, (name, kwargs) in CASES.items():
        model, optimizer = model_and_optimizer(fabric, name, kwargs)
        train(fabric, model, optimizer, range(STEPS))
        straight = snapshot(model, optimizer)
        model, optimizer = model_and_optimizer(fabric, name, kwargs)
        train(fabric, model, optimizer, range(SAVE_AT))
        state = {{"model": model, "optimizer": optimizer, "step": SAVE_AT}}
        fabric.save(os.path.join(OUT, f"{{case}}-{{KIND}}.ckpt"), state)
        result[case] = {{"straight": straight, "saved": snapshot(model, optimizer)}}
        if STRATEGY == "fsdp1" and KIND == "sharded":
            result[case]["full"] = full_fp32(model, optimizer)
    return result


def refusal(fabric):
    """CAME over FSDP1 params: the message it raises at construction (None if it accepts them)."""
    torch.manual_seed(0)
    model = fabric.setup_module(nn.Sequential(nn.Linear(32, 200), nn.Tanh(), nn.Linear(200, 48)))
    try:
        build_optimizer("came", model.parameters(), lr=1e-3, momentum_dtype="int8")
    except ValueError as err:
        return str(err)
    return None


def load_phase(fabric):
    result = {{}}
    for case, (name, kwargs) in CASES.items():
        model, optimizer = model_and_optimizer(fabric, name, kwargs)
        state = {{"model": model, "optimizer": optimizer, "step": 0}}
        fabric.load(os.path.join(OUT, f"{{case}}-{{KIND}}.ckpt"), state)
        loaded = snapshot(model, optimizer)
        full = full_fp32(model, optimizer) if WORLD == 1 else None
        train(fabric, model, optimizer, range(state["step"], STEPS))
        result[case] = {{"loaded": loaded, "resumed": snapshot(model, optimizer), "step": state["step"], "full": full,
                         "finite": all(bool(torch.isfinite(local(p)).all()) for p in model.parameters())}}
    return result


fabric = L.Fabric(accelerator="cpu", devices=WORLD, strategy=strategy())
fabric.launch()
torch.set_num_threads(1)
out = {{"save": save_phase, "load": load_phase, "refuse": refusal}}[PHASE](fabric)
torch.save(out, os.path.join(OUT, f"{{PHASE}}-{{KIND}}-world{{WORLD}}-rank{{fabric.global_rank}}.pt"))
fabric.barrier()
'''


def _run(folder, strategy: str, phase: str, kind: str, cases: list[str], world: int = 2) -> list[dict]:
    """Run SCRIPT (Fabric launches ``world`` processes); what each rank saved."""
    import json

    script = folder / "fabric_fsdp.py"
    script.write_text(textwrap.dedent(SCRIPT.format(save_at=SAVE_AT, steps=STEPS)))
    args = [str(folder), strategy, phase, kind, str(world), json.dumps({c: OPTIMIZERS[c] for c in cases})]
    run_script(script, *args, cwd=folder, timeout=600, port=True, quiet=True)
    return [torch.load(folder / f"{phase}-{kind}-world{world}-rank{r}.pt", weights_only=False) for r in range(world)]


def _check_resume(saves: list[dict], loads: list[dict], cases: list[str], where: str) -> None:
    for rank, (saved, loaded) in enumerate(zip(saves, loads)):
        for case in cases:
            at = f"{where} {case} rank {rank}"
            assert loaded[case]["step"] == SAVE_AT, at
            assert snapshot_differences(saved[case]["saved"], loaded[case]["loaded"]) == [], at
            assert snapshot_differences(saved[case]["straight"], loaded[case]["resumed"]) == [], at
            assert snapshot_differences(saved[case]["saved"], saved[case]["straight"]), f"{at}: no step after the save"
    quantized = [s for case in cases for s in saves[1][case]["saved"]["state"] if any(k.endswith("_codes") for k in s)]
    assert quantized, f"{where}: no quantized state on rank 1"


@pytest.fixture(scope="module")
def fsdp1(tmp_path_factory) -> dict:
    """FSDP1: sharded and full saves on 2 ranks, loads on 2 ranks, the sharded checkpoint loaded on 1 rank."""
    folder = tmp_path_factory.mktemp("fabric_fsdp1")
    out = {}
    for kind in ("sharded", "full"):
        out[kind] = (_run(folder, "fsdp1", "save", kind, FSDP1_CASES), _run(folder, "fsdp1", "load", kind, FSDP1_CASES))
    out["one"] = _run(folder, "fsdp1", "load", "sharded", FSDP1_CASES, world=1)[0]
    return out


@pytest.mark.slow  # ~60 s: 5 Fabric launches
@pytest.mark.parametrize("kind", ["sharded", "full"])
def test_fabric_fsdp1_save_load_in_new_processes_is_bit_exact(fsdp1, kind):
    """``state_dict_type="sharded"`` (a folder of shards) and ``"full"`` (one file, rank 0 writes, every rank
    reads): adamw_8bit and adamw_4bit resume bit for bit."""
    saves, loads = fsdp1[kind]
    _check_resume(saves, loads, FSDP1_CASES, f"FSDP1 {kind}")


def test_fabric_fsdp1_refuses_came_with_our_message(tmp_path):
    """CAME (int8 momentum) built over the params of Fabric's FSDP1 module (1 process, ~6 s) raises our message at
    construction: the param, why (1-D slices), what to use instead (FSDP2 for Fabric too, element-wise optimizers)."""
    from lowmem_lightning.optim.fsdp1 import fsdp1_refusal

    (message,) = _run(tmp_path, "fsdp1", "refuse", "sharded", [], world=1)
    assert message is not None and message.startswith("Invalid params for CAME: param group 0, param 0"), message
    assert message.endswith(fsdp1_refusal("X").split("X", 1)[1]), message
    assert "parallelize_fn for Fabric" in message


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory) -> dict:
    """FSDP2 (``fully_shard`` through Fabric's ModelParallelStrategy): sharded and full saves, loads on 2 ranks."""
    folder = tmp_path_factory.mktemp("fabric_fsdp2")
    return {kind: (_run(folder, "fsdp2", "save", kind, FSDP2_CASES), _run(folder, "fsdp2", "load", kind, FSDP2_CASES))
            for kind in ("sharded", "full")}


@pytest.mark.slow  # ~60 s: 4 Fabric launches of 2 processes
@pytest.mark.parametrize("kind", ["sharded", "full"])
def test_fabric_fsdp2_save_load_in_new_processes_is_bit_exact(fsdp2, kind):
    """``save_distributed_checkpoint=True`` (a folder of shards) and ``False`` (one full file): adamw_8bit,
    adamw_4bit and CAME int8 (factored rows/columns and int8 momentum of each shard) resume bit for bit."""
    saves, loads = fsdp2[kind]
    _check_resume(saves, loads, FSDP2_CASES, f"FSDP2 {kind}")


@pytest.mark.slow
def test_fabric_fsdp1_sharded_checkpoint_of_2_ranks_loads_on_1(fsdp1):
    """The 2-rank sharded checkpoint on 1 rank: each moment within half a code step of the saved one (the fp32 form
    of both, gathered to full tensors), the step counters kept, and 2 more steps run finite."""
    saved_full = fsdp1["sharded"][0][0]
    for case in FSDP1_CASES:
        one = fsdp1["one"][case]
        assert one["step"] == SAVE_AT and one["finite"], case
        bound = REQUANT_BOUND["4" if "4bit" in case else "8"]
        errors = {}
        for fqn, state in saved_full[case]["full"].items():
            for key, value in state.items():
                errors[f"{fqn}/{key}"] = float((one["full"][fqn][key] - value).abs().max() / value.abs().max())
        assert errors and max(errors.values()) <= bound, (case, errors)
        assert max(errors.values()) > 0, f"{case}: nothing re-encoded (the blocks did not move)"
