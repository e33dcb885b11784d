"""FSDP2 through Lightning's ModelParallelStrategy on CPU (gloo, 2 processes), with the callback.

The module shards itself with ``fully_shard`` in ``configure_model`` (the FSDP2 way); the callback
swaps its SGD for 8-bit AdamW, which then updates each rank's shard of the DTensor params. The script
(the strategy re-launches it as rank 1, as users run it) trains 2 epochs straight, then 1 epoch,
saves a checkpoint (per-rank shards, or one full file) and resumes it for the second epoch. Checked:

* the first epoch matches one process on the same global batches (the DDP test's data order);
* the 8-bit state is per shard: each rank holds half of it, and the logged bytes/param are ~2.03;
* the resumed run ends bit for bit where the straight run does.
"""

import os
import sys
import textwrap

import pytest
import torch
from launched_scripts import run_script

SCRIPT = """
import sys
import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, {tests_dir!r})
from test_ddp import GLOBAL_BATCH, Net, _data
from lowmem_lightning.callbacks import LowMemOptimizerCallback
from lowmem_lightning.optim import state_memory


class ShardedNet(Net):
    def configure_model(self):
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


def fit(root, max_epochs, ckpt_path=None):
    torch.manual_seed(0)
    model = ShardedNet()
    trainer = L.Trainer(
        accelerator={accelerator!r}, devices={devices},
        strategy=ModelParallelStrategy(data_parallel_size={devices}, tensor_parallel_size=1,
                                       save_distributed_checkpoint={distributed_ckpt!r}),
        max_epochs=max_epochs, limit_train_batches=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
        callbacks=[LowMemOptimizerCallback({opt!r}, lr=1e-2, print_summary=max_epochs == 2 and ckpt_path is None)],
    )
    trainer.fit(model, _data(GLOBAL_BATCH // {devices}, distributed=True), ckpt_path=ckpt_path)
    return trainer, model


out = {out!r}
straight, model = fit(out + "/straight", 2)
optimizer = straight.optimizers[0]
memory = state_memory(optimizer)
full = [p.full_tensor().detach().cpu().clone() for p in model.parameters()]
first, model = fit(out + "/first", 1)
first.save_checkpoint(out + "/epoch1.ckpt")
epoch1 = [p.full_tensor().detach().cpu().clone() for p in model.parameters()]
resumed, model = fit(out + "/resumed", 2, ckpt_path=out + "/epoch1.ckpt")
again = [p.full_tensor().detach().cpu().clone() for p in model.parameters()]
torch.save(
    {{
        "straight": full, "resumed": again, "epoch1": epoch1, "optimizer": type(optimizer).__name__,
        "param_types": sorted({{type(p).__name__ for p in model.parameters()}}),
        "state_bytes": memory.total_bytes, "num_params": memory.num_params,
        "bytes_per_param": memory.bytes_per_param, "global_step": resumed.global_step,
    }},
    out + f"/rank{{straight.global_rank}}.pt",
)
if torch.distributed.is_initialized():  # gloo's threads joined before exit (else a rare abort at teardown)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
"""


# expected optimizer class, bounds on this rank's state bytes per local element (the 16- to 80-element
# tensors keep fp32 state, which lifts the average above the large tensors' figure), and the checkpoint
# form: a folder with one shard per rank (torch.distributed.checkpoint) or one file assembled on rank 0
OPTIMIZERS = {"adamw_8bit": ("AdamW8bit", 2.0, 4.5, True), "came": ("CAME", 4.0, 6.0, False)}


def _run_script(tmp_path, opt: str, accelerator: str, devices: int) -> list[dict]:
    """Run SCRIPT (the strategy launches the other ranks); return what each rank saved."""
    script = tmp_path / "run_fsdp2.py"
    script.write_text(textwrap.dedent(SCRIPT.format(
        tests_dir=os.path.dirname(__file__), out=str(tmp_path), opt=opt, distributed_ckpt=OPTIMIZERS[opt][3],
        accelerator=accelerator, devices=devices,
    )))
    run_script(script, cwd=tmp_path, timeout=600, interpret=False)  # on CUDA the compiled kernels run
    assert (tmp_path / "epoch1.ckpt").is_dir() == OPTIMIZERS[opt][3]
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(devices)]


@pytest.mark.parametrize("opt", [pytest.param(opt, marks=[] if opt == "adamw_8bit" else pytest.mark.slow)
                                 for opt in OPTIMIZERS])
def test_fsdp2_model_parallel_strategy_trains_shards_and_resumes(tmp_path, opt, monkeypatch):
    ranks = _run_script(tmp_path, opt, "cpu", 2)
    for result in ranks:
        assert result["optimizer"] == OPTIMIZERS[opt][0]
        assert result["param_types"] == ["DTensor"]
        assert result["global_step"] == 4
        for a, b in zip(result["straight"], result["resumed"]):
            torch.testing.assert_close(b, a, rtol=0, atol=0)  # bit-exact resume from the sharded checkpoint
    # each rank keeps state for its half of the params only
    single = _single_process_model(tmp_path, opt)
    assert ranks[0]["num_params"] + ranks[1]["num_params"] == sum(p.numel() for p in single.parameters())
    for result in ranks:
        assert OPTIMIZERS[opt][1] < result["bytes_per_param"] < OPTIMIZERS[opt][2], result
    for a, b in zip(single.parameters(), ranks[0]["epoch1"]):
        torch.testing.assert_close(b, a.detach(), rtol=1e-4, atol=2e-5)


def _single_process_model(tmp_path, opt):
    """The first epoch (2 global batches) on one process, without sharding."""
    sys.path.insert(0, os.path.dirname(__file__))
    import lightning as L
    from test_ddp import GLOBAL_BATCH, Net, _data

    from lowmem_lightning.callbacks import LowMemOptimizerCallback

    torch.manual_seed(0)
    model = Net()
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path / "single",
        callbacks=[LowMemOptimizerCallback(opt, lr=1e-2, print_summary=False)],
    )
    trainer.fit(model, _data(GLOBAL_BATCH, distributed=False))
    return model


@pytest.mark.parametrize("opt", ["adafactor", "came"])
def test_factored_optimizers_refuse_fsdp1_before_any_work(opt):
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from lowmem_lightning.callbacks.strategy_check import refuse_fsdp1

    with pytest.raises(ValueError, match=rf"optimizer='{opt}' with strategy=FSDPStrategy.*ModelParallelStrategy"):
        refuse_fsdp1(FSDPStrategy(), opt)
    refuse_fsdp1(FSDPStrategy(), "adamw_8bit")  # element-wise: fine on flat shards
    refuse_fsdp1(DDPStrategy(), opt)


@pytest.mark.gpu
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_fsdp2_on_cuda_trains_shards_and_resumes(tmp_path, opt):
    """The same run on the GPUs there are (up to 2): Triton kernels on the shards of element-wise optimizers,
    the all-reduced reference for CAME's sharded tensors, and a bit-exact resume."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    devices = min(2, torch.cuda.device_count())
    for result in _run_script(tmp_path, opt, "cuda", devices):
        assert result["optimizer"] == OPTIMIZERS[opt][0]
        assert result["param_types"] == ["DTensor"]
        assert OPTIMIZERS[opt][1] < result["bytes_per_param"] < OPTIMIZERS[opt][2], result
        for a, b in zip(result["straight"], result["resumed"]):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
