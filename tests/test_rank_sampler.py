"""Each rank's share of the resumable epoch shuffle (``lowmem_lightning.data.distributed``), without processes."""

from types import SimpleNamespace

import pytest
from torch.utils.data import DistributedSampler

from lowmem_lightning.data.distributed import RankEpochShuffleSampler, epoch_sampler
from lowmem_lightning.data.loader import EpochShuffleSampler


def test_ranks_share_each_epochs_order_and_lightning_leaves_them_alone():
    n, world = 61, 2  # odd: the shorter rank is padded with the epoch's first index, as DistributedSampler pads
    single = EpochShuffleSampler(n, seed=3)
    ranks = [RankEpochShuffleSampler(n, 3, r, world) for r in range(world)]
    assert all(isinstance(s, DistributedSampler) for s in ranks)  # so Lightning does not wrap (and hide) them
    for _ in range(3):
        order = list(single)
        parts = [list(s) for s in ranks]
        assert [len(p) for p in parts] == [31, 31]
        assert [i for pair in zip(*parts) for i in pair] == order + order[:1]
        assert parts[0] != parts[1]


@pytest.mark.parametrize("stop", [0, 5, 31, 40])
def test_a_rank_resumes_from_its_state_at_any_position(stop):
    reference = RankEpochShuffleSampler(60, 7, 1, 2)
    expected = list(reference) + list(reference)  # 2 epochs of 30
    sampler = RankEpochShuffleSampler(60, 7, 1, 2)
    seen, it = [], iter(sampler)
    for _ in range(min(stop, 30)):
        seen.append(next(it))
    if stop > 30:
        it = iter(sampler)
        for _ in range(stop - 30):
            seen.append(next(it))
    fresh = RankEpochShuffleSampler(60, 7, 1, 2)
    fresh.load_state_dict(sampler.state_dict())
    fresh.set_epoch(99)  # Lightning's call each epoch: the epoch comes from the state, not from it
    rest = list(fresh)
    if stop < 30:
        rest += list(fresh)
    assert seen + rest == expected


def test_epoch_sampler_follows_the_strategy():
    def trainer(kwargs, use=True):
        return SimpleNamespace(strategy=SimpleNamespace(distributed_sampler_kwargs=kwargs),
                               _accelerator_connector=SimpleNamespace(use_distributed_sampler=use))

    assert type(epoch_sampler(10, 0, None)) is EpochShuffleSampler
    assert type(epoch_sampler(10, 0, trainer(None))) is EpochShuffleSampler
    assert type(epoch_sampler(10, 0, trainer({"num_replicas": 2, "rank": 1}, use=False))) is EpochShuffleSampler
    sampler = epoch_sampler(10, 0, trainer({"num_replicas": 2, "rank": 1}))
    assert isinstance(sampler, RankEpochShuffleSampler) and (sampler.rank, sampler.num_replicas) == (1, 2)
    with pytest.raises(ValueError, match=r"Invalid rank=2 of world=2"):
        RankEpochShuffleSampler(10, 0, 2, 2)
