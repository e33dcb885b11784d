"""A mid-epoch checkpoint resumed on another number of processes (2 -> 1 and 1 -> 2, DDP on gloo CPU ranks)
continues the epoch from the global position: the blocks not yet read by all ranks together are dealt over the
new ranks, none read twice or skipped in that epoch, and Lightning's epoch ends when they do (the next epoch
starts with its own full order). The sampler alone runs in the default suite; the ``lowmem fit`` round trips
(each 2-process run takes a while on 2 CPU cores) are marked slow.

Data of ``tests/test_resume_midepoch.py``: 60 training blocks, batch 4: one process reads 15 batches per epoch,
each of 2 ranks 8 (30 blocks: the last batch holds 2).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
from test_resume_midepoch import _load, _lowmem, _write_data

from lowmem_lightning.data.distributed import RankEpochShuffleSampler
from lowmem_lightning.data.loader import EpochShuffleSampler


def _read(sampler, count: int) -> list[int]:
    it = iter(sampler)
    return [next(it) for _ in range(count)]


def _ranks(n: int, world: int) -> list[EpochShuffleSampler]:
    return [RankEpochShuffleSampler(n, 5, r, world) for r in range(world)] if world > 1 else [EpochShuffleSampler(n, 5)]


@pytest.mark.parametrize(("n", "saved", "resumed", "per_rank"), [(60, 2, 1, 12), (60, 1, 2, 21), (61, 2, 3, 7),
                                                                  (61, 3, 2, 10), (60, 4, 1, 9)])
def test_a_mid_epoch_state_resumes_on_another_world_size_from_the_global_position(n, saved, resumed, per_rank):
    """Ranks of ``saved`` read ``per_rank`` indices each; ranks of ``resumed`` loading rank 0's state read the rest
    of that epoch: together every index once, plus the padding that evens out the ranks (the head of the epoch's
    order, fewer than ``resumed`` indices, as ``DistributedSampler`` pads); the next epoch is whole."""
    before = _ranks(n, saved)
    read = [i for s in before for i in _read(s, per_rank)]
    state = before[0].state_dict()
    after = _ranks(n, resumed)
    for s in after:
        s.load_state_dict(state)
    rest = [list(s) for s in after]
    order = EpochShuffleSampler(n, 5).permutation(0)
    padding = order[: -(n - per_rank * saved) % resumed]
    assert sorted(read + [i for r in rest for i in r]) == sorted(list(range(n)) + padding)
    assert len({len(r) for r in rest}) == 1 and len(rest[0]) == -(-(n - per_rank * saved) // resumed)
    assert state == {"epoch": 0, "consumed": per_rank * saved, "world": saved}
    assert all(s.resumed_from_world == saved for s in after)
    assert [s.state_dict() for s in after] == [{"epoch": 0, "consumed": n + len(padding), "world": resumed}] * resumed
    next_epoch = [i for s in after for i in s]
    assert sorted(next_epoch) == sorted(list(range(n)) + EpochShuffleSampler(n, 5).permutation(1)[: -n % resumed])


def test_a_state_of_the_same_world_size_or_an_older_checkpoint_resumes_as_before():
    reference = RankEpochShuffleSampler(60, 7, 1, 2)
    expected = list(reference)
    for state in ({"epoch": 0, "consumed": 20, "world": 2}, {"epoch": 0, "yielded": 10}):  # older: per-rank count
        sampler = RankEpochShuffleSampler(60, 7, 1, 2)
        sampler.load_state_dict(state)
        assert sampler.resumed_from_world is None and list(sampler) == expected[10:]


@pytest.mark.parametrize(("saved", "resumed", "consumed", "counted"), [(2, 1, 16, 4), (1, 2, 20, 3), (2, 2, 16, 2)])
def test_lightning_counts_the_epochs_batches_so_it_ends_with_the_re_dealt_blocks(caplog, saved, resumed, consumed,
                                                                                 counted):
    """With a trainer, the sampler moves the fit loop's count of the epoch's batches (per rank, as the saving run
    counted them: 2 batches of 4 here) to ``len(loader)`` minus this rank's batches left; the same world size leaves it
    alone. 60 blocks, batch 4: 2 -> 1 at block 16: 44 left = 11 batches of 15; 1 -> 2 at block 20: 20 each = 5 of 8."""
    from types import SimpleNamespace

    from lowmem_lightning.data.distributed import epoch_sampler

    current = SimpleNamespace(ready=2, started=2, processed=2, completed=1)  # saved at a batch end: completed lags
    epochs = SimpleNamespace(ready=2, started=2, processed=1, completed=1)  # in epoch 1
    loop = SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=SimpleNamespace(current=current,
                                                                                      is_last_batch=False)),
                           epoch_progress=SimpleNamespace(current=epochs), restarting=True)
    strategy = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": resumed, "rank": 0})
    trainer = SimpleNamespace(fit_loop=loop, strategy=strategy,
                              _accelerator_connector=SimpleNamespace(use_distributed_sampler=True))
    sampler = epoch_sampler(60, 0, trainer, batch_size=4)
    with caplog.at_level("INFO"):
        sampler.load_state_dict({"epoch": 1, "consumed": consumed, "world": saved})
    assert vars(current) == {"ready": counted, "started": counted, "processed": counted, "completed": counted - 1}
    left = -(-(60 - consumed) // resumed)
    assert (f"this run's {resumed} read the other {60 - consumed} ({left} each" in caplog.text) == (saved != resumed)


@pytest.mark.parametrize(("limit", "consumed", "rest", "said"), [
    (6, 16, 44, "counted as batches 4..14 of the epoch's 15; limit_train_batches ends it after batch 5."),
    (0.4, 16, 44, "counted as batches 4..14 of the epoch's 15; limit_train_batches ends it after batch 5."),
    (6, 32, 0, "32 of 60, read by 2 process(es): no fewer than this run's 1 read in an epoch under "
               "limit_train_batches (6 batch(es) of 4 each), so that epoch ends and the next one starts."),
    (6, 24, 0, "24 of 60, read by 2 process(es): no fewer than this run's 1 read in an epoch under "
               "limit_train_batches (6 batch(es) of 4 each), so that epoch ends and the next one starts."),
], ids=["below_6", "below_0.4", "past_6", "at_6"])
def test_under_limit_train_batches_a_re_dealt_epoch_ends_at_this_runs_limit(caplog, limit, consumed, rest, said):
    """2 -> 1 process with ``limit_train_batches`` (6 batches of 4 per rank and epoch; 0.4 of 15 = 6 too): the
    blocks both ranks read count against this run's limit. Below it, Lightning reads on to the limit (the sampler
    holds the rest of the epoch; Lightning stops at batch 5); at or past it (32 or 24 blocks read: batch 8 or 6 of
    15), the rest of the epoch is empty, so Lightning's epoch ends without another batch and the next iteration is
    the next epoch, whole. (Before, Lightning counted past its limit and read all 28 blocks left.)"""
    from types import SimpleNamespace

    from lowmem_lightning.data.distributed import epoch_sampler

    current = SimpleNamespace(ready=2, started=2, processed=2, completed=1)
    epochs = SimpleNamespace(ready=2, started=2, processed=1, completed=1)
    loop = SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=SimpleNamespace(current=current,
                                                                                      is_last_batch=False)),
                           epoch_progress=SimpleNamespace(current=epochs), restarting=True)
    trainer = SimpleNamespace(fit_loop=loop, limit_train_batches=limit,
                              strategy=SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 1, "rank": 0}),
                              _accelerator_connector=SimpleNamespace(use_distributed_sampler=True))
    sampler = epoch_sampler(60, 0, trainer, batch_size=4)
    with caplog.at_level("INFO"):
        sampler.load_state_dict({"epoch": 1, "consumed": consumed, "world": 2})
    assert said in caplog.text
    assert list(sampler) == EpochShuffleSampler(60, 0).permutation(1)[consumed:][:rest]
    assert sampler.state_dict() == {"epoch": 1, "consumed": 60, "world": 1}
    assert list(sampler) == EpochShuffleSampler(60, 0).permutation(2)


class RecordBlocks(L.Callback):
    """Appends, per training batch, ``[global_step, epoch, [block indices]]`` to ``{path}.rank{R}.jsonl`` (the
    blocks found by their tokens in the data module's training set)."""

    def __init__(self, path: str = ""):
        self.path, self.index = path, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.index is None:
            blocks = trainer.datamodule.train_dataset
            self.index = {tuple(blocks[i]["input_ids"].tolist()): i for i in range(len(blocks))}
            assert len(self.index) == len(blocks)  # every block told apart by its tokens
        rows = [self.index[tuple(row.tolist())] for row in batch["input_ids"]]
        with open(f"{self.path}.rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps([trainer.global_step, trainer.current_epoch, rows]) + "\n")


RUNS = {
    "1": [],
    "ddp1": ["--trainer.devices=1", "--trainer.strategy=ddp"],  # Lightning would wrap (and hide) a plain sampler
    "ddp2": ["--trainer.devices=2", "--trainer.strategy=ddp"],
    **{f"fsdp2_{n}": [f"--trainer.devices={n}", "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
                      f"--trainer.strategy.data_parallel_size={n}", "--trainer.strategy.tensor_parallel_size=1",
                      "--model.class_path=test_distributed_resume.FSDP2CausalLM"] for n in (1, 2)},
}


def _fit(root: Path, data: Path, run: str, max_steps: int, *extra: str):
    record = ["--trainer.callbacks+=test_resume_world_size.RecordBlocks", f"--trainer.callbacks.path={root}/blocks"]
    result = _lowmem(root, data, *RUNS[run], *extra, *record, "--trainer.limit_val_batches=0",
                     "--model.scheduler=null", max_steps=max_steps)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _blocks(root: Path) -> list[tuple[int, int, list[int]]]:
    return [tuple(json.loads(line)) for f in sorted(root.glob("blocks.rank*.jsonl")) for line in open(f)]


def _first_run_blocks(root: Path, at: int) -> list[tuple[int, int, list[int]]]:
    """The records of the steps before ``at`` (what the checkpoint's run had read); the files move to ``first/``."""
    first = [record for record in _blocks(root) if record[0] < at]
    (root / "first").mkdir()
    for f in root.glob("blocks.rank*.jsonl"):
        f.rename(root / "first" / f.name)
    return first


@pytest.mark.slow
@pytest.mark.parametrize(("saved", "resumed", "stop", "at", "batches_left", "workers"), [
    ("ddp2", "1", 12, 10, 11, 0), ("1", "ddp2", 5, 5, 5, 0), ("ddp2", "ddp1", 12, 10, 11, 0),
    ("fsdp2_2", "fsdp2_1", 12, 10, 11, 0), ("fsdp2_1", "fsdp2_2", 5, 5, 5, 0),
    ("ddp2", "1", 12, 10, 11, 2), ("1", "ddp2", 5, 5, 5, 2)])
def test_lowmem_fit_resumed_on_another_number_of_processes_reads_the_rest_of_the_epoch(
        tmp_path, saved, resumed, stop, at, batches_left, workers):
    """``stop`` steps on ``saved`` processes, then ``--ckpt_path last.ckpt`` (``save_last``: the step-10 one, or, at
    step 5, the one written at the end of the fit; mid-epoch either way) on ``resumed`` processes for
    ``batches_left`` + 2 more steps: the epoch's blocks are all read exactly once, its last ``batches_left``
    batches (per rank) by the resumed run, which then starts the next epoch. (Under FSDP2 the checkpoint is a
    sharded folder, resharded by the load.) Also with ``workers`` loader worker processes in both runs."""
    extra = [f"--data.init_args.num_workers={workers}"]
    data = _write_data(tmp_path / "words.txt")
    root = tmp_path / "run"
    _fit(root, data, saved, stop, *extra, "--trainer.callbacks.save_last=true")
    ckpt = root / "ckpt" / "last.ckpt"
    assert ckpt.is_dir() or _load(ckpt)["global_step"] == at
    first = _first_run_blocks(root, at)
    second = _fit(root, data, resumed, at + batches_left + 2, *extra, "--ckpt_path", str(ckpt))
    then = _blocks(root)
    epoch = first[-1][1]
    read_before = [b for _, e, rows in first if e == epoch for b in rows]
    read_after = [b for step, _, rows in then if step < at + batches_left for b in rows]
    assert sorted(read_before + read_after) == list(range(60))  # the epoch: every block once, none skipped
    ranks = int(RUNS[resumed][0][-1]) if RUNS[resumed] else 1
    assert sorted(s for s, _, _ in then) == sorted(list(range(at, at + batches_left + 2)) * ranks)
    # Lightning's epoch ends with the re-dealt blocks: the 2 steps after them are the next epoch (Lightning counts a
    # checkpoint written at the end of a fit as in the next epoch already: its own numbering, not compared here)
    epochs = {step: e for step, e, _ in then}
    last = at + batches_left - 1
    assert epochs[last + 1] == epochs[last + 2] == epochs[last] + 1
    assert f"this run's {ranks} read the other" in second.stdout + second.stderr


ACCUMULATE = ("--trainer.accumulate_grad_batches=2",)
LIMIT = ("--trainer.limit_train_batches=6",)


@pytest.mark.slow
@pytest.mark.parametrize(("saved", "resumed", "at", "extra", "epoch_blocks", "steps_left"), [
    ("ddp2", "1", 6, ACCUMULATE, 60, 4),  # block 32: 28 left = 7 batches, steps of 2 + 2 + 2 + 1
    ("1", "ddp2", 9, ACCUMULATE, 60, 4),  # block 8: 52 left = 7 batches each, steps of 1 + 2 + 2 + 2
    ("ddp2", "1", 8, LIMIT, 24, 2),  # block 16: this run's epoch is 6 batches of 4, 2 of them left
    ("1", "ddp2", 8, LIMIT, 48, 5),  # block 8: 6 batches of 4 on each of 2 ranks, 5 left
    ("ddp2", "1", 10, LIMIT, 32, 0),  # block 32: past this run's 24, the next epoch starts at once
], ids=["accumulate_2_to_1", "accumulate_1_to_2", "limit_2_to_1", "limit_1_to_2", "limit_2_to_1_past_it"])
def test_resumed_on_another_number_of_processes_with_accumulation_or_a_batch_limit(
        tmp_path, saved, resumed, at, extra, epoch_blocks, steps_left):
    """``at`` steps on ``saved`` processes (``last.ckpt`` at the end of the fit, mid-epoch), then ``--ckpt_path`` on
    ``resumed`` ones for ``steps_left`` + 2 more optimizer steps: the epoch's blocks are read once each, none twice,
    ``epoch_blocks`` of them (all 60, or as many as ``limit_train_batches`` lets this run's ranks read in an epoch,
    counting those read before); the resumed run makes ``steps_left`` optimizer steps in it (Lightning's rule: a step
    every 2 batches counted from the epoch's start, and one at its last batch), then 2 in the next epoch, which
    starts at the head of its order (``TextDataModule``'s seed 42)."""
    data = _write_data(tmp_path / "words.txt")
    root = tmp_path / "run"
    _fit(root, data, saved, at, *extra, "--trainer.callbacks.save_last=true")
    ckpt = root / "ckpt" / "last.ckpt"
    assert _load(ckpt)["global_step"] == at
    first = _first_run_blocks(root, at)
    _fit(root, data, resumed, at + steps_left + 2, *extra, "--ckpt_path", str(ckpt))
    then = _blocks(root)
    epoch = first[-1][1]
    read = [b for _, e, rows in first if e == epoch for b in rows]
    read += [b for step, _, rows in then if step < at + steps_left for b in rows]
    assert len(read) == len(set(read)) == epoch_blocks
    assert sorted({step for step, _, _ in then}) == list(range(at, at + steps_left + 2))
    epochs = {step: e for step, e, _ in then}
    assert len({epochs[at + steps_left], epochs[at + steps_left + 1]}) == 1
    assert all(epochs[step] < epochs[at + steps_left] for step in range(at, at + steps_left))
    following = [b for step, _, rows in then if step >= at + steps_left for b in rows]  # the next epoch's first
    assert sorted(following) == sorted(EpochShuffleSampler(60, 42).permutation(epoch + 1)[:len(following)])
