"""The global sample order as arithmetic: bijective per epoch, deterministic, sliced exactly by ranks
and workers, resumable at any position. About a million simulated samples, no files."""
import time

import numpy as np
import pytest

from data_pipeline.order import GlobalOrder, mixture_counts, permutation, rank_slice


def _shards(num_shards: int, total: int, num_sources: int = 1, seed: int = 0):
    rng = np.random.default_rng(seed)
    sizes = rng.multinomial(total - num_shards, np.ones(num_shards) / num_shards) + 1
    sources = np.arange(num_shards) % num_sources
    return sources, sizes


def _distinct(ids: np.ndarray) -> int:
    """Number of distinct values (np.unique is slow on millions of values with numpy 2.4)."""
    ordered = np.sort(ids)
    return int(ordered.size and 1 + np.count_nonzero(np.diff(ordered)))


def _ids(order: GlobalOrder, start: int, stop: int) -> np.ndarray:
    shard, sample = order.locate(start, stop)
    return shard * 1_000_000 + sample


def test_one_epoch_is_a_bijection_over_a_million_samples():
    sources, sizes = _shards(1000, 1_000_000)
    order = GlobalOrder(sources, sizes, seed=3)
    t = time.perf_counter()
    ids = _ids(order, 0, order.epoch_size)
    elapsed = time.perf_counter() - t
    expected = np.concatenate([s * 1_000_000 + np.arange(n) for s, n in enumerate(sizes)])
    assert order.epoch_size == 1_000_000
    assert np.array_equal(np.sort(ids), expected)
    assert elapsed < 5.0


@pytest.fixture(scope="module")
def two_epochs():
    """A three-source order over ~1M samples and the ids of its first two epochs."""
    sources, sizes = _shards(997, 1_000_003, num_sources=3)
    order = GlobalOrder(sources, sizes, seed=11)
    return order, _ids(order, 0, 2 * order.epoch_size)


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
@pytest.mark.parametrize("num_workers", [1, 2, 3])
def test_ranks_and_workers_partition_two_epochs_of_a_million(two_epochs, world_size, num_workers):
    order, stream = two_epochs
    n = order.epoch_size
    batch = 48 * world_size
    num_windows = 2 * n // batch
    windows = stream[: num_windows * batch].reshape(num_windows, batch)
    seen = []
    for rank in range(world_size):
        for worker in range(num_workers):
            seen.append(windows[worker::num_workers, rank_slice(batch, rank, world_size)].ravel())
    seen = np.concatenate(seen)
    assert seen.size == windows.size
    assert np.array_equal(np.sort(seen), np.sort(windows.ravel()))
    assert _distinct(stream[:n]) == n and _distinct(stream[n:]) == n  # each epoch exact-once


def test_resume_at_any_position_with_other_batch_continues_exactly(two_epochs):
    order, stream = two_epochs
    n = order.epoch_size
    rng = np.random.default_rng(0)
    for consumed in [1, n - 1, n, *rng.integers(1, 2 * n - 1000, size=8).tolist()]:
        new_batch = int(rng.integers(1, 1000))
        after = _ids(order, consumed, min(consumed + new_batch, 2 * n))
        assert np.array_equal(after, stream[consumed:consumed + len(after)])
        epoch = (consumed // n) * n
        union = np.concatenate([stream[epoch:consumed], _ids(order, consumed, epoch + n)])
        assert _distinct(union) == n  # before + after the restart = exactly that epoch


def test_windowed_locate_matches_bulk_locate():
    sources, sizes = _shards(50, 20_000, num_sources=3)
    order = GlobalOrder(sources, sizes, seed=2, weights=[1.0, 2.0, 0.5])
    bulk = _ids(order, 0, 3 * order.epoch_size)
    for start in range(0, 3 * order.epoch_size - 77, 77):
        assert np.array_equal(_ids(order, start, start + 77), bulk[start:start + 77])


def test_same_seed_same_order_other_seed_other_order():
    sources, sizes = _shards(40, 10_000)
    a = _ids(GlobalOrder(sources, sizes, seed=1), 0, 20_000)
    b = _ids(GlobalOrder(sources, sizes, seed=1), 0, 20_000)
    c = _ids(GlobalOrder(sources, sizes, seed=2), 0, 20_000)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a[:10_000], a[10_000:])  # epochs differ


def test_permutation_is_pinned():
    # pure integer arithmetic: this must never change, or old checkpoints would resume elsewhere
    assert permutation(8, 0, 1, 0, 0).tolist() == [1, 2, 4, 7, 5, 6, 3, 0]
    assert sorted(permutation(1000, 9).tolist()) == list(range(1000))


def test_mixture_weights_give_shares_and_spread_evenly():
    sources, sizes = _shards(30, 30_000, num_sources=3)
    order = GlobalOrder(sources, sizes, seed=0, weights=[3.0, 1.0, 1.0])
    assert mixture_counts([10, 10, 10], [3.0, 1.0, 1.0]) == [18, 6, 6]
    shard, _ = order.locate(0, order.epoch_size)
    share = np.bincount(sources[shard], minlength=3) / order.epoch_size
    assert np.allclose(share, [0.6, 0.2, 0.2], atol=1e-4)
    batch = sources[shard[:1000]].reshape(10, 100)
    for row in batch:  # every batch of 100 holds its share within one sample
        assert abs((row == 0).sum() - 60) <= 1
    # the large source is spread over epochs: each of its source-epochs is still exact-once
    s0 = np.flatnonzero(sources == 0)
    n0 = int(sizes[s0].sum())
    ids = []
    for start in range(0, 10 * order.epoch_size, order.epoch_size):
        sh, sa = order.locate(start, start + order.epoch_size)
        ids.append((sh * 1_000_000 + sa)[sources[sh] == 0])
    ids = np.concatenate(ids)[:n0]
    assert _distinct(ids) == n0


def test_unweighted_sources_are_each_seen_once_per_epoch():
    sources, sizes = _shards(31, 9_000, num_sources=3)
    order = GlobalOrder(sources, sizes, seed=4)
    ids = _ids(order, 0, order.epoch_size)
    assert _distinct(ids) == order.epoch_size == 9_000


def test_rank_slice():
    assert [rank_slice(8, r, 4) for r in range(4)] == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
