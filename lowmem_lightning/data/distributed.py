"""The resumable epoch shuffle on several processes: each rank's part of the order, saved with its position.

Lightning wraps a custom sampler in its ``DistributedSamplerWrapper`` under DDP / FSDP2, which hides the
sampler's ``state_dict``: a resumed run then restarted the inner shuffle at epoch 0 and fast-forwarded
through the wrong order, so a mid-epoch resume of a 2-process run read other batches than the
uninterrupted run. :class:`RankEpochShuffleSampler` is itself a ``DistributedSampler`` (so Lightning
leaves it alone): epoch ``e``'s permutation of :class:`~lowmem_lightning.data.text.EpochShuffleSampler`,
padded to a multiple of the number of ranks by repeating its head (as ``DistributedSampler`` pads), and
rank ``r`` reads every ``world``-th index from ``r``. Its state (epoch, indices handed out) travels in
the checkpoint with the loader's, and every rank is at the same position, so the one state Lightning
saves (rank 0's) resumes every rank exactly.
"""

from __future__ import annotations

from torch.utils.data import DistributedSampler

from .text import EpochShuffleSampler

__all__ = ["RankEpochShuffleSampler", "epoch_sampler"]


class RankEpochShuffleSampler(EpochShuffleSampler, DistributedSampler):
    """Rank ``rank``'s share (of ``world``) of each epoch's :class:`EpochShuffleSampler` order: ``ceil(n / world)``
    indices per epoch, resumable from ``state_dict()`` like the single-process sampler."""

    def __init__(self, n: int, seed: int, rank: int, world: int):
        if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
            raise ValueError(f"Invalid rank={rank!r} of world={world!r}: expected 0 <= rank < world, world >= 1.")
        EpochShuffleSampler.__init__(self, n, seed)
        self.rank, self.num_replicas = rank, world
        self.num_samples = -(-n // world)
        self.total_size = self.num_samples * world
        self.shuffle, self.drop_last = True, False  # what Lightning reads of a DistributedSampler

    def permutation(self, epoch: int) -> list[int]:
        """This rank's indices of epoch ``epoch`` (``num_samples`` of them)."""
        order = super().permutation(epoch)
        order += order[: self.total_size - len(order)]
        return order[self.rank :: self.num_replicas]

    def __iter__(self):
        start, self._resume_at = self._resume_at, None
        if start is None or start >= self.num_samples:  # a new epoch (also after a state saved at an epoch's end)
            self.epoch, start = self.epoch + 1, 0
        self.yielded = start
        return self._indices(self.permutation(self.epoch)[start:])

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Ignored: the epoch advances with each pass and is restored from the checkpoint (Lightning calls this
        on every ``DistributedSampler``)."""


def epoch_sampler(n: int, seed: int, trainer=None) -> EpochShuffleSampler:
    """The training sampler for ``n`` blocks: :class:`RankEpochShuffleSampler` when ``trainer`` runs a strategy
    that shards the data (its ``distributed_sampler_kwargs``: ranks and replicas) and uses Lightning's
    distributed sampling, else the single-process :class:`EpochShuffleSampler`."""
    strategy = getattr(trainer, "strategy", None)
    kwargs = getattr(strategy, "distributed_sampler_kwargs", None)
    connector = getattr(trainer, "_accelerator_connector", None)
    if not kwargs or not getattr(connector, "use_distributed_sampler", True) or kwargs.get("num_replicas", 1) <= 1:
        return EpochShuffleSampler(n, seed)
    return RankEpochShuffleSampler(n, seed, int(kwargs["rank"]), int(kwargs["num_replicas"]))
