"""Sharded checkpoints (``ModelParallelStrategy(save_distributed_checkpoint=True)``, torch.distributed.checkpoint)
appear atomically (issue 25, 1): written into a temporary directory next to the final one and swapped in, so a
half-written checkpoint never carries the final name and the previous one is kept until the new one is complete.

The swap logic is tested in one process with a stand-in strategy (fast); the real thing with 2 gloo CPU processes
under FSDP2, with a failure injected inside torch.distributed.checkpoint on rank 1 and another in rank 0's metadata
file, then a resume from the checkpoint that survived (slow).
"""

from __future__ import annotations

import errno
import json
import os
import textwrap
from pathlib import Path

import pytest
from launched_scripts import run_script

from lowmem_lightning.callbacks.checkpoint_io import CheckpointWriteError, atomic_sharded_save


class _OneRank:
    """The strategy calls :func:`atomic_sharded_save` makes, for a single process."""

    global_rank = 0

    def broadcast(self, obj):
        return obj

    def reduce_boolean_decision(self, decision, all=True):
        return decision

    def barrier(self, name=None):
        pass


def _writer(files: dict[str, str], fail_after: int | None = None):
    """A ``save(checkpoint, path)`` writing ``files`` into directory ``path``; raising ENOSPC after ``fail_after``."""
    def save(checkpoint, path):
        os.makedirs(path, exist_ok=True)
        for i, (name, text) in enumerate(files.items()):
            if fail_after is not None and i == fail_after:
                raise OSError(errno.ENOSPC, "No space left on device")
            Path(path, name).write_text(text)
    return save


def _tree(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in folder.iterdir()}


def test_sharded_save_swaps_a_complete_directory_in(tmp_path):
    final = tmp_path / "epoch=0-step=2.ckpt"
    atomic_sharded_save(_OneRank(), _writer({"__0_0.distcp": "a", ".metadata": "m1"}), {}, final)
    assert _tree(final) == {"__0_0.distcp": "a", ".metadata": "m1"}
    atomic_sharded_save(_OneRank(), _writer({"__0_0.distcp": "b", ".metadata": "m2"}), {}, final)
    assert _tree(final) == {"__0_0.distcp": "b", ".metadata": "m2"}  # replaced whole, nothing written in place
    assert sorted(p.name for p in tmp_path.iterdir()) == [final.name]  # no temporary or old directory left


def test_a_failed_sharded_save_keeps_the_previous_checkpoint_and_no_temp(tmp_path):
    final = tmp_path / "last.ckpt"
    atomic_sharded_save(_OneRank(), _writer({"__0_0.distcp": "old", ".metadata": "old"}), {}, final)
    with pytest.raises(CheckpointWriteError, match=r"sharded checkpoint .*last\.ckpt: the file system is full"):
        atomic_sharded_save(_OneRank(), _writer({"__0_0.distcp": "new", ".metadata": "new"}, fail_after=1), {}, final)
    assert _tree(final) == {"__0_0.distcp": "old", ".metadata": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_a_failed_first_sharded_save_leaves_no_directory(tmp_path):
    final = tmp_path / "epoch=0-step=2.ckpt"
    with pytest.raises(CheckpointWriteError):
        atomic_sharded_save(_OneRank(), _writer({"a": "1", "b": "2"}, fail_after=1), {}, final)
    assert list(tmp_path.iterdir()) == []


def test_an_error_that_is_not_an_os_error_propagates_unchanged(tmp_path):
    def save(checkpoint, path):
        os.makedirs(path)
        raise KeyError("state")

    with pytest.raises(KeyError):
        atomic_sharded_save(_OneRank(), save, {}, tmp_path / "x.ckpt")
    assert list(tmp_path.iterdir()) == []


SCRIPT = """
import errno, json, os, sys
import lightning as L
import torch
from torch import nn
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, {tests_dir!r})
from test_ddp import GLOBAL_BATCH, Net, _data
from lowmem_lightning.callbacks.checkpoint_io import AtomicModelParallelStrategy


class ShardedNet(Net):
    def configure_model(self):
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


def trainer(root, max_epochs):
    return L.Trainer(
        accelerator="cpu", devices=2, max_epochs=max_epochs, limit_train_batches=2, logger=False,
        strategy=AtomicModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                             save_distributed_checkpoint=True),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)


out = {out!r}
ckpt = os.path.join(out, "model.ckpt")
torch.manual_seed(0)
first = trainer(out + "/first", 1)
first.fit(ShardedNet(), _data(GLOBAL_BATCH // 2, distributed=True))
rank = first.global_rank
first.save_checkpoint(ckpt)
if rank == 0:
    open(os.path.join(ckpt, "marker"), "w").write("first save")  # only the first save's directory has it
first.strategy.barrier()
report = {{}}


def look(label):
    first.strategy.barrier()
    report[label + "_final"] = sorted(os.listdir(ckpt)) if os.path.isdir(ckpt) else None
    report[label + "_siblings"] = sorted(n for n in os.listdir(out) if n.startswith(".model.ckpt"))


def attempt(label):
    try:
        first.save_checkpoint(ckpt)
        report[label] = "saved"
    except BaseException as err:  # torch.distributed.checkpoint's CheckpointException is a BaseException
        report[label] = type(err).__name__ + ": " + str(err)
    look(label)


# 1. rank 1's shard write fails inside torch.distributed.checkpoint, after its files were written
write_data = FileSystemWriter.write_data
def failing_write(self, plan, planner):
    write_data(self, plan, planner).wait()
    raise OSError(errno.ENOSPC, "No space left on device (injected)")
if rank == 1:
    FileSystemWriter.write_data = failing_write
attempt("dcp_failure")
FileSystemWriter.write_data = write_data

# 2. rank 0 cannot write the metadata file, after every shard was written
save = torch.save
def failing_save(obj, f, *args, **kwargs):
    if str(f).endswith("meta.pt"):
        raise OSError(errno.ENOSPC, "No space left on device (injected)")
    return save(obj, f, *args, **kwargs)
if rank == 0:
    torch.save = failing_save
attempt("meta_failure")
torch.save = save

# 3. the checkpoint that survived resumes
resumed = trainer(out + "/resumed", 2)
resumed.fit(ShardedNet(), _data(GLOBAL_BATCH // 2, distributed=True), ckpt_path=ckpt)
report["resumed_global_step"] = resumed.global_step

# 4. a save that succeeds replaces the directory whole
attempt("overwrite")
with open(os.path.join(out, f"report{{rank}}.json"), "w") as f:
    json.dump(report, f)
"""


@pytest.mark.slow
def test_fsdp2_sharded_checkpoint_is_atomic_under_injected_failures(tmp_path):
    script = tmp_path / "run_sharded_save.py"
    script.write_text(textwrap.dedent(SCRIPT.format(tests_dir=os.path.dirname(__file__), out=str(tmp_path))))
    run_script(script, cwd=tmp_path, timeout=600)
    reports = [json.loads((tmp_path / f"report{r}.json").read_text()) for r in range(2)]
    first_save = [".metadata", "__0_0.distcp", "__1_0.distcp", "marker", "meta.pt"]
    for report in reports:
        # a failure on either rank ends the save on both, naming the checkpoint; the first save stays whole
        assert report["dcp_failure"] != "saved" and report["meta_failure"] != "saved", report
        for label in ("dcp_failure", "meta_failure"):
            assert "CheckpointWriteError" in report[label] and "model.ckpt" in report[label], report
        for label in ("dcp_failure", "meta_failure"):
            assert report[label + "_final"] == first_save, (label, report)
            assert report[label + "_siblings"] == [], (label, report)  # no temporary directory left
        assert report["resumed_global_step"] == 4
        assert report["overwrite"] == "saved"
        assert report["overwrite_final"] == [n for n in first_save if n != "marker"], report
        assert report["overwrite_siblings"] == [], report
