"""The resumable training order and loader of ``TextDataModule``: :class:`EpochShuffleSampler` (each epoch's
shuffle from ``seed`` and the epoch alone, its position saved and restored) and :class:`TrainLoader` (a
``StatefulDataLoader`` that keeps its position when Lightning drops its iterator). Under DDP / FSDP2 each rank's
share: :mod:`~lowmem_lightning.data.distributed`."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

__all__ = ["EpochShuffleSampler", "TrainLoader"]


class EpochShuffleSampler(Sampler[int]):
    """Indices ``0..n-1`` in a new order each epoch: epoch ``e`` is a permutation drawn from a generator
    seeded by ``(seed, e)`` alone, so an epoch's order never depends on how the run got there.

    The single-process case (``rank`` 0 of ``num_replicas`` 1) of
    :class:`~lowmem_lightning.data.distributed.RankEpochShuffleSampler`: from position ``consumed`` of the epoch's
    order, what is left (padded with the head of the order to a multiple of ``num_replicas``, as
    ``DistributedSampler`` pads) is dealt out, rank ``r`` reading every ``num_replicas``-th index from ``r``.

    Resumable: ``state_dict()`` is ``{"epoch", "consumed", "world"}``: the epoch, the length of the prefix of its order
    read by all ranks together (``>= n``: the epoch is over), and the number of ranks that read it. After
    ``load_state_dict`` the next iteration continues that epoch after the prefix, dealt over this sampler's
    ``num_replicas`` (another world size than the state's re-deals the rest, none read twice or skipped but the
    padding). An epoch starts (or continues) when its first index is drawn, not when ``iter()`` is called, so an
    iterator made and never drawn from (Lightning drops the loader's iterator at the end of ``fit``; a
    ``state_dict()`` afterwards makes a new one) moves nothing. ``StatefulDataLoader`` saves and restores this state
    with its own.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self.rank, self.num_replicas = 0, 1
        self.epoch, self._start, self.yielded = -1, 0, 0  # no epoch started; this rank's indices since _start
        self._resume_at: int | None = None
        self._rest_empty = False  # the next iteration yields nothing (finish_epoch)
        self.resumed_from_world: int | None = None  # the state's world size when it differs from num_replicas
        self.on_load = None  # called with this sampler after each load_state_dict (to align the trainer's count)

    def permutation(self, epoch: int) -> list[int]:
        """The order of epoch ``epoch`` (``[n]`` indices)."""
        key = (self.seed * 1_000_003 + epoch) % 2**63
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(key)).tolist()

    def share(self, epoch: int, consumed: int) -> list[int]:
        """This rank's indices of epoch ``epoch`` after its first ``consumed`` (read by all ranks together):
        ``ceil((n - consumed) / num_replicas)`` of them."""
        order = self.permutation(epoch)
        rest = order[consumed:]
        rest += order[: -len(rest) % self.num_replicas]
        return rest[self.rank :: self.num_replicas]

    def __iter__(self):
        if self._rest_empty:  # the trainer ended this epoch at its limit_train_batches: nothing more of it
            self._rest_empty = False
            return
        consumed, self._resume_at = self._resume_at, None
        if consumed is None or consumed >= self.n or self.epoch < 0:  # a new epoch (also after one's end)
            self.epoch, consumed = self.epoch + 1, 0
        self._start, self.yielded = consumed, 0
        for index in self.share(self.epoch, consumed):
            self.yielded += 1
            yield index

    def __len__(self) -> int:
        return -(-self.n // self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        """Lightning's number of the epoch about to start (it calls this before each one). Taken only by a sampler that
        has neither begun an epoch nor loaded a state: a fit resumed from a checkpoint of a finished epoch under
        ``max_epochs``, whose loader state Lightning does not restore, then reads epoch ``epoch``'s order (it read
        epoch 0's again). Otherwise ignored: the epoch advances with each pass and is restored from the checkpoint."""
        if self.epoch < 0 and self._resume_at is None:
            self.epoch = epoch - 1

    @property
    def consumed(self) -> int:
        """Indices of the current epoch read by all ranks together (each rank is at the same place)."""
        return self._start + self.yielded * self.num_replicas

    def state_dict(self) -> dict:
        """``{"epoch": the epoch being read (-1 before the first), "consumed": its indices read by all ranks,
        "world": num_replicas}``."""
        return {"epoch": self.epoch, "consumed": self.consumed, "world": self.num_replicas}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (a :meth:`state_dict`; an older one, ``{"epoch", "yielded"}`` per rank, is taken
        as written by this world size) at the next iteration."""
        world = int(state.get("world", self.num_replicas))
        consumed = int(state["consumed"]) if "consumed" in state else int(state["yielded"]) * world
        self.epoch, self._start, self.yielded = int(state["epoch"]), consumed, 0
        self._resume_at = consumed
        self.resumed_from_world = world if world != self.num_replicas and 0 < consumed < self.n else None
        if self.on_load is not None:
            self.on_load(self)

    def end_epoch(self) -> None:
        """Take the loaded epoch as over (the trainer ended it before its last index: ``limit_train_batches``): the
        next iteration starts the next epoch, and :meth:`state_dict` says the epoch is read."""
        self._start, self.yielded, self._resume_at, self.resumed_from_world = self.n, 0, self.n, None

    def finish_epoch(self) -> None:
        """Take the loaded epoch as read now (the blocks read reach the trainer's ``limit_train_batches`` in this world
        size): the next iteration yields nothing, so the trainer's epoch ends, and the one after starts the next epoch;
        :meth:`state_dict` says the epoch is read."""
        self.end_epoch()
        self._rest_empty = True


class TrainLoader(StatefulDataLoader):
    """The training ``StatefulDataLoader``, which keeps its position when its iterator is dropped from outside.

    Lightning sets ``loader._iterator = None`` when ``fit`` ends (after shutting the workers down); a ``state_dict()``
    afterwards (``trainer.save_checkpoint`` after ``fit``) then made a new iterator, whose position was not the one
    the fit stopped at: with worker processes it counted the batches they had prefetched as read. Here the dropped
    iterator's state becomes the state the next iterator starts from, so ``state_dict()`` (and the next ``iter()``)
    continue where the dropped one stopped.
    """

    @property
    def _iterator(self):
        return self.__dict__.get("_live_iterator")

    @_iterator.setter
    def _iterator(self, iterator) -> None:
        dropped = self.__dict__.get("_live_iterator")
        if iterator is None and dropped is not None:
            self.next_iter_state = dropped.state_dict()
        self.__dict__["_live_iterator"] = iterator
