import itertools

import pytest

from msc_dist.data.plan import plan, rank_share, steps_per_epoch


def _expand(ranges):
    return [(r.url, i) for r in ranges for i in range(r.start, r.stop)]


@pytest.mark.parametrize("sizes", [[7, 20, 33], [1], [5, 0, 5], [100], [3, 3, 3, 3, 3, 3, 3]])
@pytest.mark.parametrize("world,workers", [(1, 1), (2, 1), (2, 3), (3, 4), (8, 2)])
@pytest.mark.parametrize("seed", [None, 11])
def test_plan_is_an_exact_partition(sizes, world, workers, seed):
    counts = [(f"s{i}", n) for i, n in enumerate(sizes)]
    every = [s for r in range(world) for w in range(workers) for s in _expand(plan(counts, world, r, workers, w, seed))]
    expected = [(u, i) for u, n in counts for i in range(n)]
    assert sorted(every) == sorted(expected)  # every sample exactly once
    for r in range(world):
        got = sum(len(_expand(plan(counts, world, r, workers, w, seed))) for w in range(workers))
        assert got == rank_share(sum(sizes), world, r)
        assert abs(got - sum(sizes) / world) < 1  # ranks differ by at most one sample


def test_fewer_shards_than_ranks_times_workers_still_feeds_every_rank():
    counts = [("only", 10)]
    for r in range(2):
        assert sum(len(_expand(plan(counts, 2, r, 4, w))) for w in range(4)) == 5
    assert steps_per_epoch(10, 2, 2) == 2


def test_shuffle_is_shared_by_ranks_and_changes_by_seed():
    counts = [(f"s{i}", 4) for i in range(10)]
    a = [plan(counts, 2, r, 1, 0, 5) for r in range(2)]
    b = [plan(counts, 2, r, 1, 0, 6) for r in range(2)]
    assert a != b
    assert set(itertools.chain(*map(_expand, a))) == set(itertools.chain(*map(_expand, b)))
