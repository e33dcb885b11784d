"""FSDP2 runs resume across the AdamW family: a sharded checkpoint (``torch.distributed.checkpoint`` folder written
by Lightning's ``ModelParallelStrategy``) of ``adamw`` / ``adamw_8bit`` / ``adamw_4bit`` resumes with another member.

Each case runs one script on 2 gloo CPU processes (the strategy re-launches it as rank 1): 1 epoch (2 steps) with
the source optimizer, a sharded checkpoint, then a fit with the target optimizer from that checkpoint. Checked on
each rank, per param (its local shard), right after the restore: the target's moments are the source's decoded
moments within the target code's own rounding (the bounds of ``test_adamw_family_resume``; fp32 targets and the
small fp32-state params exactly), step counters kept; then the run trains 2 more steps. The model's first weight
(40 x 300) has 8-bit and 4-bit row forms of different widths, the second (120 x 40) of the same width (the
codes' form cannot be told from the shapes: it comes from the checkpoint's optimizer name). A checkpoint of an
optimizer the target cannot read is refused with a ``ValueError`` before any step (it used to fail inside the
distributed load with a size-mismatch or missing-key ``CheckpointException``).

Single-file checkpoints (``save_distributed_checkpoint=False``) convert the same way. Resharding (2 -> 1 process)
is checked at the optimizer level with the ranks of ``test_reshard``.
"""

from __future__ import annotations

import os
import textwrap

import pytest
import torch
from launched_scripts import run_script
from test_adamw_family_resume import _assert_4bit_of, _assert_8bit_of

from lowmem_lightning.kernels.adamw4bit import num_blocks4, packed_len
from lowmem_lightning.kernels.codec import num_blocks

SCRIPT = """
import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset

from lowmem_lightning.callbacks import LowMemOptimizerCallback
from lowmem_lightning.optim.adamw_convert import code_form, decoded_moments
from lowmem_lightning.optim.sharding import local


class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(300, 40), nn.Tanh(), nn.Linear(40, 120), nn.Tanh(), nn.Linear(120, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def configure_model(self):
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


def local_state(opt, param):
    \"\"\"The local tensors of param's state (fp32 moments of the shard's shape, or flat codes and scales).\"\"\"
    return {{k: local(v).detach().clone() for k, v in opt.state[param].items() if isinstance(v, torch.Tensor)}}


def source_moments(opt, param):
    state = local_state(opt, param)
    form = code_form(state)
    return {{"step": state["step"], **decoded_moments(param, state, form)}} if form else state


class Capture(L.Callback):
    \"\"\"Record every param's local optimizer state right after the restore (before any step).\"\"\"

    def on_train_start(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        self.state = {{n: local_state(opt, p) for n, p in pl_module.named_parameters()}}
        self.optimizer = type(opt).__name__


def fit(opt, root, max_epochs, ckpt_path=None, capture=None):
    torch.manual_seed(0)
    model = Net()
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=ModelParallelStrategy(
            data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint={distributed!r}),
        max_epochs=max_epochs, limit_train_batches=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
        callbacks=[LowMemOptimizerCallback(opt, lr=1e-2, weight_decay=0.1, print_summary=False),
                   *([capture] if capture else [])],
    )
    g = torch.Generator().manual_seed(2)
    x = torch.randn(32, 300, generator=g)
    trainer.fit(model, DataLoader(TensorDataset(x, torch.cos(x[:, :1])), batch_size=8), ckpt_path=ckpt_path)
    return trainer, model


out = {out!r}
first, model = fit({source!r}, out + "/first", 1)
first.save_checkpoint(out + "/epoch1.ckpt")
source = {{n: source_moments(first.optimizers[0], p) for n, p in model.named_parameters()}}
capture = Capture()
result = {{"source": source}}
try:
    resumed, model = fit({target!r}, out + "/resumed", 2, ckpt_path=out + "/epoch1.ckpt", capture=capture)
    result.update(target=capture.state, optimizer=capture.optimizer, global_step=resumed.global_step,
                  finite=all(bool(torch.isfinite(local(p)).all()) for p in model.parameters()))
    rank = resumed.global_rank
except ValueError as err:
    result.update(error=str(err), captured=hasattr(capture, "state"))
    rank = torch.distributed.get_rank()
torch.save(result, out + f"/rank{{rank}}.pt")
if torch.distributed.is_initialized():  # gloo's threads joined before exit
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
"""

CLASSES = {"adamw": "AdamW", "adamw_8bit": "AdamW8bit", "adamw_4bit": "AdamW4bit", "paged_adamw_8bit": "PagedAdamW8bit"}


def _run(tmp_path, source: str, target: str, distributed: bool = True) -> list[dict]:
    """Run SCRIPT on 2 processes (source fit, sharded checkpoint: a folder, or with ``distributed=False`` one
    file, target fit); return what each rank saved."""
    script = tmp_path / "family_resume.py"
    script.write_text(textwrap.dedent(SCRIPT.format(out=str(tmp_path), source=source, target=target,
                                                    distributed=distributed)))
    run_script(script, cwd=tmp_path, timeout=600, interpret=False)
    assert (tmp_path / "epoch1.ckpt").is_dir() == distributed  # a torch.distributed.checkpoint folder, or a file
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _head(state: dict, n: int, bits: int) -> dict:
    """``state``'s codes and scales cut to the ``n`` elements of the local shard (they are padded to whole blocks
    of the longest shard)."""
    codes, scales = (packed_len(n), num_blocks4(n)) if bits == 4 else (n, num_blocks(n))
    return {key: value[: scales if key.endswith("absmax") else codes] for key, value in state.items() if key != "step"}


def _assert_converted(source: dict, target: dict, target_name: str) -> None:
    """``target`` (a param's local state after the restore) holds ``source``'s decoded moments within the
    target code's rounding; fp32 state exactly; the step counter kept."""
    assert torch.equal(target["step"].float(), source["step"].float())
    m, v = source["exp_avg"].reshape(-1), source["exp_avg_sq"].reshape(-1)
    if "exp_avg" in target:  # fp32 target (torch AdamW, or a small param of any member): the decoded moments
        torch.testing.assert_close(target["exp_avg"].reshape(-1), m, rtol=0, atol=0)
        torch.testing.assert_close(target["exp_avg_sq"].reshape(-1), v, rtol=0, atol=0)
        return
    n = m.numel()
    if target_name == "adamw_4bit":
        _assert_4bit_of(m, v, _head(target, n, 4), n)
    else:
        _assert_8bit_of(m, v, _head(target, n, 8), n)


def _assert_resumed(ranks: list[dict], target: str) -> None:
    for result in ranks:
        assert "error" not in result, result.get("error")
        assert result["optimizer"] == CLASSES[target]
        assert result["global_step"] == 4 and result["finite"]
        assert set(result["target"]) == set(result["source"])
        quantized = [n for n, s in result["target"].items() if "exp_avg_codes" in s]
        assert quantized == ([] if target == "adamw" else ["net.0.weight", "net.2.weight"])
        for name, state in result["target"].items():
            _assert_converted(result["source"][name], state, target)


@pytest.mark.slow
def test_fsdp2_adamw_8bit_checkpoint_resumes_as_adamw_4bit(tmp_path):
    """The key direction, in the default suite: 8-bit codes decoded with their own scales, encoded in 4-bit."""
    _assert_resumed(_run(tmp_path, "adamw_8bit", "adamw_4bit"), "adamw_4bit")


@pytest.mark.slow
@pytest.mark.parametrize(("source", "target"), [
    ("adamw_4bit", "adamw_8bit"), ("adamw", "adamw_8bit"), ("adamw", "adamw_4bit"), ("adamw_8bit", "adamw"),
    ("adamw_4bit", "adamw"), ("paged_adamw_8bit", "adamw_4bit"), ("adamw_4bit", "paged_adamw_8bit"),
])
def test_fsdp2_checkpoint_resumes_across_the_adamw_family(tmp_path, source, target):
    _assert_resumed(_run(tmp_path, source, target), target)


@pytest.mark.slow
@pytest.mark.parametrize(("source", "target"), [("adamw_8bit", "adamw_4bit"), ("adamw_4bit", "adamw")])
def test_fsdp2_single_file_checkpoint_resumes_across_the_adamw_family(tmp_path, source, target):
    """``save_distributed_checkpoint=False``: the full state in one file, loaded into the same template."""
    _assert_resumed(_run(tmp_path, source, target, distributed=False), target)


@pytest.mark.slow
def test_fsdp2_checkpoint_of_an_unconvertible_optimizer_is_refused_before_any_step(tmp_path):
    for result in _run(tmp_path, "came", "adamw_8bit"):
        assert ": it was trained with optimizer 'came'" in result["error"]
        assert "optimizer='adamw_8bit'" in result["error"]
        assert not result["captured"]  # refused before training started


# ------------------------------------------------------------------------------------ resharded: 2 -> 1 process
def _save_source(rank: int, world: int, source: str, tmp: str) -> dict:
    """2 steps of ``source`` on ``world`` ranks, saved with ``torch.distributed.checkpoint``; the full state (row
    form) as a full state dict gathers it."""
    import test_reshard as harness
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from lowmem_lightning.optim import build_optimizer

    module = harness._module(harness._full_params(), world)
    opt = build_optimizer(source, module.parameters(), **harness.CASES[source])
    harness._train(module, opt, range(2))
    dcp.save({"optimizer_0": get_optimizer_state_dict(module, opt)}, checkpoint_id=os.path.join(tmp, "ckpt"))
    return {"state": harness._full_state(module, opt), "params": harness._gathered(module)}


def _load_target(rank: int, world: int, target: str, form: str, tmp: str, params: dict) -> dict:
    """A fresh ``target`` on ``world`` ranks loads the checkpoint of ``form`` as Lightning's ``ModelParallelStrategy``
    does (template, ``dcp.load``, set), prepared by ``prepare_sharded_load``; its local state per param."""
    import test_reshard as harness
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    from lowmem_lightning.optim import build_optimizer
    from lowmem_lightning.optim.adamw_convert import prepare_sharded_load

    module = harness._module(params, world)
    opt = build_optimizer(target, module.parameters(), **harness.CASES[target])
    prepare_sharded_load(opt, form)
    state = {"optimizer_0": get_optimizer_state_dict(module, opt)}
    dcp.load(state, checkpoint_id=os.path.join(tmp, "ckpt"))
    set_optimizer_state_dict(module, opt, state["optimizer_0"], options=StateDictOptions(cpu_offload=True))
    return {name: {k: v.to_local().clone() if hasattr(v, "to_local") else v.clone() for k, v in opt.state[p].items()}
            for name, p in module.named_parameters()}


@pytest.mark.parametrize(("source", "target", "form"), [("adamw_8bit", "adamw_4bit", "8-bit"),
                                                         ("adamw_4bit", "adamw_8bit", "4-bit")])
def test_sharded_state_of_another_form_loads_on_another_world_size(tmp_path, source, target, form):
    """Saved on 2 ranks, loaded on 1: the saved codes of each row decoded with their own (row-form) scales, then
    encoded with the target's codes, within its rounding, on every param (blocks moved or not, empty shards)."""
    import test_reshard as harness

    from lowmem_lightning.optim.reshard import CODEC4, CODEC8, decode_rows

    saved = harness._ranks(str(tmp_path / "save"), 2, _save_source, source, str(tmp_path))
    loaded = harness._ranks(str(tmp_path / "load"), 1, _load_target, target, form, str(tmp_path), saved["params"])
    codec = CODEC8 if form == "8-bit" else CODEC4
    for name, state in loaded.items():
        src = saved["state"][name]
        if "exp_avg_codes" in src:  # row form: codes of the param's shape, scales per row
            src = {"step": src["step"], **{key: decode_rows(src[f"{key}_codes"], src[f"{key}_absmax"], codec)
                                           for key in ("exp_avg", "exp_avg_sq")}}
        _assert_converted(src, state, target)
    assert {n for n, s in loaded.items() if "exp_avg_codes" in s} == {"even", "uneven", "flat", "wide"}


def _load_as_wrong_form(rank: int, world: int) -> dict:
    """An ``adamw_8bit`` state of FSDP2 params loaded as if it were 4-bit codes: what each param's load says."""
    import test_reshard as harness

    from lowmem_lightning.optim import build_optimizer
    from lowmem_lightning.optim.adamw_convert import prepare_sharded_load

    module = harness._module(harness._full_params(), world)
    opt = build_optimizer("adamw_8bit", module.parameters(), **harness.CASES["adamw_8bit"])
    harness._train(module, opt, range(2))
    saved = opt.state_dict()
    before = {name: {k: v.clone() for k, v in opt.state[p].items()} for name, p in module.named_parameters()}
    prepare_sharded_load(opt, "4-bit")
    try:
        opt.load_state_dict(saved)
        error = None
    except ValueError as err:
        error = str(err)
    unchanged = all(torch.equal(v, opt.state[p][k]) for name, p in module.named_parameters()
                    for k, v in before[name].items())
    return {"error": error, "unchanged": unchanged, "form_cleared": opt._incoming_form is None}


def test_sharded_codes_that_are_not_the_named_form_are_refused(tmp_path):
    """8-bit row-form codes read as 4-bit ones (a checkpoint whose callback state names the wrong optimizer):
    a ValueError naming the param's shape and what its codes and scales are, the state left as it was."""
    import test_reshard as harness

    result = harness._ranks(str(tmp_path), 1, _load_as_wrong_form)
    assert result["error"] is not None and result["error"].startswith("Invalid optimizer state dict: the 4-bit state")
    assert "scale rows" in result["error"] or "outside" in result["error"]
    assert result["unchanged"] and result["form_cleared"]
