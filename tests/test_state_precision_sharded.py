"""``fp32_state`` under data-parallel and sharded (FSDP2) training, 2 gloo CPU processes.

What ``fp32_state`` promises for checkpoints: an optimizer state dict of either setting loads into the other,
converted (``test_state_precision``, plain and DTensor shards); a Lightning checkpoint resumes only with the
``fp32_state`` it was saved with (the param groups differ), refused with a hint naming ``fp32_state`` otherwise.
Checked here:

* DDP (``ddp_fork``): 2 processes with ``fp32_state="embeddings"`` end where 1 process does on the same global
  batches (the tolerance of ``test_ddp``), and the embedding keeps 32-bit state on every rank;
* FSDP2 (Lightning's ``ModelParallelStrategy`` re-launching a script as rank 1, ``fully_shard``), a sharded
  (``torch.distributed.checkpoint``) checkpoint: resumed with the same ``fp32_state`` it ends bit for bit where
  the uninterrupted run does; resumed with the other setting (unset, or set where the checkpoint had none) it is
  refused with a ``ValueError`` naming both param-group layouts and ``fp32_state``, before any step, and the
  refused run (a CSV logger, a checkpoint every step) writes no checkpoint and no metrics: only the hyperparameters
  the logger writes at fit start, which this strategy's restore comes after (Lightning's order for every strategy
  that restores after setup: FSDP, DeepSpeed too); the single-file form (``save_distributed_checkpoint=False``) is
  refused the same way.
"""

from __future__ import annotations

import os
import textwrap

import lightning as L
import pytest
import torch
from launched_scripts import run_script
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lowmem_lightning.callbacks import LowMemOptimizerCallback

VOCAB, WIDTH, HIDDEN = 300, 32, 160  # embedding 9600 and first Linear 5120 elements: quantized by default
SAMPLES, GLOBAL_BATCH = 64, 16
FP32_KEYS = ["exp_avg", "exp_avg_sq", "step"]


class EmbedNet(L.LightningModule):
    """Token ids -> embedding (mean over the sequence) -> MLP -> one value; SGD, swapped by the callback."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.net = nn.Sequential(nn.Linear(WIDTH, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 1))

    def training_step(self, batch, batch_idx):
        tokens, target = batch
        return nn.functional.mse_loss(self.net(self.embed(tokens).mean(1)), target)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def dataset() -> TensorDataset:
    """4 global batches of 8 token ids each, a target per sample."""
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, VOCAB, (SAMPLES, 8), generator=g)
    return TensorDataset(tokens, torch.cos(tokens[:, :1].float() / 50))


class RecordState(L.Callback):
    """Saves each rank's optimizer state layout at the end of training: ``{param name: sorted state keys}``."""

    def __init__(self, out):
        self.out = out

    def on_train_end(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        layout = {name: sorted(opt.state[p]) for name, p in pl_module.named_parameters()}
        dtypes = {name: {k: v.dtype for k, v in opt.state[p].items()} for name, p in pl_module.named_parameters()}
        torch.save({"layout": layout, "dtypes": dtypes}, os.path.join(self.out, f"state{trainer.global_rank}.pt"))


def _ddp_fit(root, strategy: str, devices: int):
    torch.manual_seed(0)
    model = EmbedNet()
    root.mkdir(parents=True, exist_ok=True)
    callback = LowMemOptimizerCallback("adamw_8bit", lr=1e-2, fp32_state="embeddings", print_summary=False)
    trainer = L.Trainer(accelerator="cpu", strategy=strategy, devices=devices, max_steps=4, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=root, callbacks=[callback, RecordState(str(root))])
    data = dataset()
    if devices > 1:  # Lightning shards it with a shuffling DistributedSampler (seed 0): rank r takes perm[r::2]
        loader = DataLoader(data, batch_size=GLOBAL_BATCH // devices)
    else:  # the same global batches in one process: perm[16k:16k+16]
        perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()
        loader = DataLoader(data, batch_size=GLOBAL_BATCH, sampler=perm)
    trainer.fit(model, loader)
    return model


def test_ddp_with_fp32_state_two_processes_match_one(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # Lightning gives each forked rank 1 thread (test_ddp)
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # would reseed the DistributedSampler's shuffle
    single = _ddp_fit(tmp_path / "single", "auto", 1)
    ddp = _ddp_fit(tmp_path / "ddp", "ddp_fork", 2)
    torch.manual_seed(0)
    start = EmbedNet()
    moved = {}
    for (name, a), b, s in zip(single.named_parameters(), ddp.parameters(), start.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=2e-5, msg=name)
        moved[name] = (a - s).abs().max().item()
    assert min(moved.values()) > 1e-3, moved  # every param trained, the embedding included
    records = [torch.load(tmp_path / "single" / "state0.pt")]
    records += [torch.load(tmp_path / "ddp" / f"state{rank}.pt") for rank in range(2)]
    for record in records:  # the embedding 32-bit, the first Linear's weight 8-bit, on every rank
        assert record["layout"]["embed.weight"] == FP32_KEYS
        assert set(record["dtypes"]["embed.weight"].values()) == {torch.float32}
        assert "exp_avg_codes" in record["layout"]["net.0.weight"]


SCRIPT = """
import os
import sys

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader

sys.path.insert(0, {tests_dir!r})
from test_state_precision_sharded import EmbedNet, GLOBAL_BATCH, dataset
from lowmem_lightning.callbacks import LowMemOptimizerCallback
from lowmem_lightning.optim.sharding import local


class ShardedNet(EmbedNet):
    def configure_model(self):
        mesh = self.device_mesh["data_parallel"]
        for layer in (self.embed, self.net[0], self.net[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)


class Capture(L.Callback):
    \"\"\"Each param's local optimizer state right after the restore, before any step.\"\"\"

    def on_train_start(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        self.state = {{n: {{k: local(v).detach().clone() for k, v in opt.state[p].items()}}
                       for n, p in pl_module.named_parameters()}}


def fit(root, fp32_state, max_epochs, ckpt_path=None, extra=(), distributed=True, **trainer_kwargs):
    torch.manual_seed(0)
    trainer_kwargs = {{"logger": False, "enable_checkpointing": False, **trainer_kwargs}}
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                     save_distributed_checkpoint=distributed)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy,
        max_epochs=max_epochs, limit_train_batches=2, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=root, **trainer_kwargs,
        callbacks=[LowMemOptimizerCallback("adamw_8bit", lr=1e-2, weight_decay=0.1, fp32_state=fp32_state,
                                           print_summary=False), *extra],
    )
    model = ShardedNet()
    trainer.fit(model, DataLoader(dataset(), batch_size=GLOBAL_BATCH // 2), ckpt_path=ckpt_path)
    return trainer, model


def gathered(model):
    return {{n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}}


def listing(folder):
    return sorted((os.path.relpath(os.path.join(d, f), folder), os.path.getsize(os.path.join(d, f)))
                  for d, _, files in os.walk(folder) for f in files)


def refused(root, fp32_state, ckpt):
    \"\"\"A resume with another fp32_state: the error, whether a step began, the files the run wrote, and whether
    the checkpoint is as it was.\"\"\"
    capture, before = Capture(), listing(ckpt)
    checkpoints = ModelCheckpoint(dirpath=root + "/checkpoints", every_n_train_steps=1)
    try:
        fit(root, fp32_state, 2, ckpt_path=ckpt, extra=(capture, checkpoints), logger=CSVLogger(root),
            enable_checkpointing=True)
        error = None
    except ValueError as err:
        error = str(err)
    written = listing(root) if os.path.isdir(root) else []
    return {{"error": error, "stepped": hasattr(capture, "state"), "written": written,
            "checkpoint_kept": listing(ckpt) == before}}


out = {out!r}
EMB = ["embeddings"]
straight, model = fit(out + "/straight", EMB, 2)
result = {{"straight": gathered(model)}}
first, model = fit(out + "/first", EMB, 1)
first.save_checkpoint(out + "/fp32.ckpt")
capture = Capture()
resumed, model = fit(out + "/resumed", EMB, 2, ckpt_path=out + "/fp32.ckpt", extra=(capture,))
result.update(resumed=gathered(model), restored=capture.state, global_step=resumed.global_step)
result["unset"] = refused(out + "/unset", None, out + "/fp32.ckpt")
plain, _ = fit(out + "/plain", None, 1)
plain.save_checkpoint(out + "/plain.ckpt")
result["set"] = refused(out + "/set", EMB, out + "/plain.ckpt")
result["sharded"] = os.path.isdir(out + "/fp32.ckpt") and os.path.isdir(out + "/plain.ckpt")
single, _ = fit(out + "/single", EMB, 1, distributed=False)
single.save_checkpoint(out + "/fp32_file.ckpt")  # the single-file form: one file, full tensors
result["unset_file"] = refused(out + "/unset_file", None, out + "/fp32_file.ckpt")
result["file"] = os.path.isfile(out + "/fp32_file.ckpt")
torch.save(result, out + f"/rank{{torch.distributed.get_rank()}}.pt")
torch.distributed.barrier()  # gloo's threads joined before exit
torch.distributed.destroy_process_group()
"""


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory) -> list[dict]:
    """SCRIPT on 2 processes (the strategy re-launches it as rank 1); what each rank saved."""
    out = tmp_path_factory.mktemp("fp32_state_fsdp2")
    script = out / "run.py"
    script.write_text(textwrap.dedent(SCRIPT.format(tests_dir=os.path.dirname(__file__), out=str(out))))
    run_script(script, cwd=out, timeout=900, tail=6000, interpret=False)
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


@pytest.mark.slow
def test_fsdp2_sharded_checkpoint_resumes_bit_exact_with_the_same_fp32_state(fsdp2_run):
    for rank, result in enumerate(fsdp2_run):
        assert result["sharded"], "the checkpoints are torch.distributed.checkpoint folders"
        assert result["global_step"] == 4
        restored = result["restored"]
        assert sorted(restored["embed.weight"]) == FP32_KEYS, rank  # the embedding's shard kept 32-bit state
        assert all(v.dtype == torch.float32 for v in restored["embed.weight"].values())
        assert float(restored["embed.weight"]["step"]) == 2.0
        assert "exp_avg_codes" in restored["net.0.weight"], rank
        for name, final in result["straight"].items():
            assert torch.equal(result["resumed"][name], final), (rank, name)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["unset", "set", "unset_file"])
def test_fsdp2_sharded_checkpoint_of_the_other_fp32_state_is_refused(fsdp2_run, case):
    """``unset``: saved with fp32_state=["embeddings"], resumed without (it failed inside the distributed load:
    ``Missing key in checkpoint state_dict: optimizer_0.state.embed.weight.exp_avg_codes``); ``set``: the other
    way round; ``unset_file``: the single-file form (``save_distributed_checkpoint=False``)."""
    saved, resumed = ("1 param group (5 params)", "2 param groups (4 params; 1 param with quantize_state=False)")
    if case != "set":
        saved, resumed = resumed, saved
    for result in fsdp2_run:
        assert result["file"] if case == "unset_file" else result["sharded"]
        refusal = result[case]
        assert refusal["error"] is not None, "the resume was not refused"
        assert f"has {saved}, this run's AdamW8bit has {resumed}" in refusal["error"], refusal["error"]
        assert "resume with the fp32_state the checkpoint was saved with" in refusal["error"]
        assert not refusal["stepped"], "refused after training had started"
        # the run's hyperparameters (LowMemOptimizerCallback's lowmem/*) reach the logger at fit start, before
        # ModelParallelStrategy restores the checkpoint: the one file the refused run writes
        assert [name for name, _ in refusal["written"]] in ([], ["lightning_logs/version_0/hparams.yaml"]), \
            refusal["written"]
        assert refusal["checkpoint_kept"]
