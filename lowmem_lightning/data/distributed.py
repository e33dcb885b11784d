"""The resumable epoch shuffle on several processes: each rank's part of the order, saved with its position.

Lightning wraps a custom sampler in its ``DistributedSamplerWrapper`` under DDP / FSDP2, which hides the
sampler's ``state_dict``: a resumed run then restarted the inner shuffle at epoch 0 and fast-forwarded
through the wrong order, so a mid-epoch resume of a 2-process run read other batches than the
uninterrupted run. :class:`RankEpochShuffleSampler` is itself a ``DistributedSampler`` (so Lightning
leaves it alone): epoch ``e``'s permutation of :class:`~lowmem_lightning.data.loader.EpochShuffleSampler`,
padded to a multiple of the number of ranks by repeating its head (as ``DistributedSampler`` pads), and
rank ``r`` reads every ``world``-th index from ``r``. Its state (epoch, indices read by all ranks together,
world size) travels in the checkpoint with the loader's, and every rank is at the same position, so the one
state Lightning saves (rank 0's) resumes every rank exactly.

On another number of processes a mid-epoch state resumes at the same place of the epoch: the indices not yet
read are dealt over the new ranks (:meth:`~lowmem_lightning.data.loader.EpochShuffleSampler.share`), and
:func:`align_epoch_progress` sets Lightning's count of the epoch's batches so that the epoch ends when they do.

A checkpoint written after ``fit`` stopped at the end of an epoch (``max_steps`` reached on its last batch; or on the
last batch ``limit_train_batches`` allows) is resumed as the start of the next epoch (:func:`align_with_fit_loop`):
Lightning's own loop, told by the checkpoint that it is restarting on the epoch's last batch, read one more batch
in it and then started another epoch, skipping the rest of the one in between (Lightning issue #19617).
"""

from __future__ import annotations

import functools

from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DistributedSampler

from .loader import EpochShuffleSampler

__all__ = ["RankEpochShuffleSampler", "align_epoch_progress", "align_with_fit_loop", "epoch_batches",
           "epoch_sampler", "fit_ended_at_epoch_end"]


class RankEpochShuffleSampler(EpochShuffleSampler, DistributedSampler):
    """Rank ``rank``'s share (of ``world``) of each epoch's :class:`EpochShuffleSampler` order: ``ceil(n / world)``
    indices per epoch, resumable from ``state_dict()`` like the single-process sampler (also from a state another
    world size wrote)."""

    def __init__(self, n: int, seed: int, rank: int, world: int):
        if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
            raise ValueError(f"Invalid rank={rank!r} of world={world!r}: expected 0 <= rank < world, world >= 1.")
        EpochShuffleSampler.__init__(self, n, seed)
        self.rank, self.num_replicas = rank, world
        self.num_samples = len(self)
        self.total_size = self.num_samples * world
        self.shuffle, self.drop_last = True, False  # what Lightning reads of a DistributedSampler
        # set_epoch is EpochShuffleSampler's (Lightning calls it on every DistributedSampler)


def epoch_batches(length: int, limit: int | float) -> int:
    """The batches per rank Lightning reads of an epoch of ``length`` batches under ``limit_train_batches=limit`` (an
    int: at most that many; a float: that fraction, rounded down), as its fit loop counts them."""
    return min(length, limit) if isinstance(limit, int) else int(length * limit)


def align_epoch_progress(trainer, batch_size: int, sampler: EpochShuffleSampler) -> None:
    """After ``sampler`` loaded a mid-epoch state of another world size: set the fit loop's count of this epoch's
    batches (per rank, ``trainer.fit_loop.epoch_loop.batch_progress.current``, restored from the checkpoint in the
    saving run's terms) to ``len(loader)`` minus the batches of ``batch_size`` left to this rank, so Lightning
    ends the epoch (its last-batch validation and accumulation included) exactly when the re-dealt indices end,
    neither cutting them short nor waiting for more; under ``limit_train_batches`` it ends at that limit, and when
    the blocks already read reach it the epoch ends without another batch (the sampler's rest of it is empty;
    Lightning, counting past the limit, read on to the epoch's end). Says what was resumed (rank 0)."""
    left = -(-(sampler.n - sampler.consumed) // sampler.num_replicas)
    batches_left = -(-left // batch_size)
    length = -(-len(sampler) // batch_size)
    target = length - batches_left
    limit = epoch_batches(length, getattr(trainer, "limit_train_batches", 1.0))
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    delta = target - progress.processed
    for field in ("ready", "started", "processed", "completed"):
        setattr(progress, field, getattr(progress, field) + delta)
    said = (f"Resuming epoch {sampler.epoch} at block {sampler.consumed} of {sampler.n}, read by "
            f"{sampler.resumed_from_world} process(es)")
    if target >= limit:
        sampler.finish_epoch()
        rank_zero_info(f"{said}: no fewer than this run's {sampler.num_replicas} read in an epoch under "
                       f"limit_train_batches ({limit} batch(es) of {batch_size} each), so that epoch ends and the next "
                       "one starts.")
        return
    limited = f"; limit_train_batches ends it after batch {limit - 1}" if limit < length else ""
    rank_zero_info(
        f"{said}; this run's {sampler.num_replicas} read the other {sampler.n - sampler.consumed} ({left} each, "
        f"{batches_left} batch(es)), counted as batches {target}..{target + batches_left - 1} of the epoch's "
        f"{length}{limited}."
    )


def fit_ended_at_epoch_end(trainer) -> bool:
    """Whether the fit loop restored from a checkpoint stopped on the last batch of an epoch and counted that epoch
    as done (a checkpoint written after ``fit`` returned or at ``on_train_end``: ``max_steps`` reached on the
    epoch's last batch). Then its next epoch starts on resume; a checkpoint of the epoch's end written inside the
    epoch (``on_train_epoch_end``, ``on_train_batch_end``) is not this case: Lightning's loop starts the next epoch
    of those itself (:func:`align_with_fit_loop` ends the sampler's epoch with it)."""
    epochs = trainer.fit_loop.epoch_progress.current
    batches = trainer.fit_loop.epoch_loop.batch_progress
    return bool(batches.is_last_batch) and epochs.ready == epochs.started == epochs.processed == epochs.completed > 0


def start_epoch_count(trainer) -> None:
    """Set the fit loop's per-epoch counts to the start of an epoch, as Lightning does for an epoch it begins (and for
    a checkpoint of an epoch's last batch end), so its next epoch counts from batch 0."""
    epoch_loop = trainer.fit_loop.epoch_loop
    epoch_loop.batch_progress.reset_on_run()
    epoch_loop.scheduler_progress.reset_on_run()
    epoch_loop.automatic_optimization.optim_progress.reset_on_run()
    epoch_loop.val_loop.batch_progress.total.reset()


def end_sampler_epoch(sampler: EpochShuffleSampler) -> None:
    """End ``sampler``'s loaded epoch when it still had indices that ``limit_train_batches`` kept the epoch from
    reading, so its next iterator starts the next epoch's order, as the fit loop does."""
    if sampler.epoch >= 0 and sampler.consumed < sampler.n:
        sampler.end_epoch()


def align_with_fit_loop(trainer, batch_size: int, sampler: EpochShuffleSampler) -> None:
    """After ``sampler`` loaded a checkpoint's state, make Lightning's count of the epoch's batches and the sampler's
    position agree: when the fit stopped at an epoch's end (:func:`fit_ended_at_epoch_end`), both start the next
    epoch (the sampler also when it had indices left that ``limit_train_batches`` kept the epoch from reading); from
    an epoch's last batch saved inside the epoch, Lightning's loop starts the next epoch and the sampler does too;
    else a mid-epoch state of another world size sets the count by the indices left (:func:`align_epoch_progress`).
    Only while the fit loop restarts from a checkpoint: a state loaded at another time (``state_dict()`` of a loader
    whose iterator ``fit`` dropped makes a new one from its saved state) changes nothing."""
    if not trainer.fit_loop.restarting:
        return
    if fit_ended_at_epoch_end(trainer):
        end_sampler_epoch(sampler)
        start_epoch_count(trainer)
    elif trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:  # Lightning ends that epoch itself
        end_sampler_epoch(sampler)
    elif sampler.resumed_from_world is not None:
        align_epoch_progress(trainer, batch_size, sampler)


def epoch_sampler(n: int, seed: int, trainer=None, batch_size: int = 1) -> EpochShuffleSampler:
    """The training sampler for ``n`` blocks: :class:`RankEpochShuffleSampler` when ``trainer`` runs a strategy
    that shards the data (its ``distributed_sampler_kwargs``: ranks and replicas; also one replica, which
    Lightning would otherwise wrap and hide) and uses Lightning's distributed sampling, else the single-process
    :class:`EpochShuffleSampler`. With a ``trainer`` and the loader's ``batch_size``, a resume on another world size
    is aligned with the fit loop (:func:`align_with_fit_loop`)."""
    strategy = getattr(trainer, "strategy", None)
    kwargs = getattr(strategy, "distributed_sampler_kwargs", None)
    connector = getattr(trainer, "_accelerator_connector", None)
    if not kwargs or not getattr(connector, "use_distributed_sampler", True):
        sampler = EpochShuffleSampler(n, seed)
    else:
        sampler = RankEpochShuffleSampler(n, seed, int(kwargs["rank"]), int(kwargs["num_replicas"]))
    if trainer is not None:
        sampler.on_load = functools.partial(align_with_fit_loop, trainer, batch_size)
    return sampler
