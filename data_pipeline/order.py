"""The global sample order: a pure function of (seed, epoch, manifest), computed by arithmetic.

The training stream is the infinite sequence of positions 0, 1, 2, ...; position p lies in epoch
p // N at offset p % N, where N = `epoch_size`. Within an epoch:

1. Mixture. Source s owns k_s of the N offsets (k_s = its sample count n_s when no weights are
   given, so N = sum n_s and every sample is seen once per epoch; else k_s is proportional to its
   weight, N still sum n_s). Offsets are dealt to sources by a balanced binary split: at every node
   of a tree over the sources, offset p goes left iff floor((p+1)*L/T) > floor(p*L/T), where L of
   the node's T offsets belong to the left subtree. That spreads every source evenly over the epoch
   (each global batch holds close to its share) and maps an offset to (source, j) in O(log S).
2. Per-source stream. Source s consumes its own infinite stream: mixture epoch e takes positions
   e*k_s ... e*k_s + k_s - 1 of it. Position q of a source stream is in source-epoch q // n_s; that
   epoch visits the source's shards in a permuted order and each shard's samples in a shuffled
   order, both keyed by (seed, source, source-epoch[, shard]).

Permutations are argsorts of splitmix64 hashes, so they depend on nothing but integers (not on
numpy's generator versions). A consumer that has read `c` samples resumes at position `c`; with any
number of ranks, since ranks only split each global batch's rows (see `rank_slice`).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

MASK64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_SHARD_ORDER, _SAMPLE_ORDER = 1, 2


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 of every element of a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def hash_key(*parts: int) -> int:
    """A 64-bit key from a tuple of non-negative integers (splitmix64 chained, in Python ints)."""
    h = 0
    for part in parts:
        z = ((h ^ (part & MASK64)) + int(_GOLDEN)) & MASK64
        z = ((z ^ (z >> 30)) * int(_M1)) & MASK64
        z = ((z ^ (z >> 27)) * int(_M2)) & MASK64
        h = z ^ (z >> 31)
    return h


@lru_cache(maxsize=256)
def permutation(n: int, *key: int) -> np.ndarray:
    """A pseudo-random permutation of range(n) determined by `key` (read-only, cached)."""
    salted = mix64(np.arange(n, dtype=np.uint64) ^ np.uint64(hash_key(*key)))
    perm = np.argsort(salted, kind="stable")
    perm.setflags(write=False)
    return perm


def mixture_counts(sizes: Sequence[int], weights: Optional[Sequence[float]]) -> List[int]:
    """Samples each source contributes to one epoch of sum(sizes) samples (largest remainder, each >= 1)."""
    if weights is None:
        return [int(n) for n in sizes]
    total = int(sum(sizes))
    share = np.asarray(weights, dtype=np.float64) / float(sum(weights)) * total
    counts = np.floor(share).astype(np.int64)
    for i in np.argsort(-(share - counts), kind="stable")[: total - int(counts.sum())]:
        counts[i] += 1
    counts = np.maximum(counts, 1)
    while counts.sum() > total:  # only when a tiny weight was lifted to 1
        counts[int(np.argmax(counts))] -= 1
    return [int(c) for c in counts]


def _deal(offsets: np.ndarray, counts: Sequence[int], lo: int, hi: int) -> Tuple[np.ndarray, np.ndarray]:
    """(source, index within that source's share) of every offset of an epoch, for sources lo..hi-1."""
    if hi - lo == 1:
        return np.full(offsets.shape, lo, dtype=np.int64), offsets
    mid = (lo + hi) // 2
    n_left, total = sum(counts[lo:mid]), sum(counts[lo:hi])
    before = offsets * n_left // total
    left = (offsets + 1) * n_left // total > before
    src, idx = np.empty_like(offsets), np.empty_like(offsets)
    src[left], idx[left] = _deal(before[left], counts, lo, mid)
    src[~left], idx[~left] = _deal((offsets - before)[~left], counts, mid, hi)
    return src, idx


def _groups(values: np.ndarray) -> Iterator[Tuple[int, np.ndarray]]:
    """(value, indices where it occurs) for each distinct value, in increasing order of value."""
    if values.size and values[0] == values[-1] and (values == values[0]).all():
        yield int(values[0]), np.arange(values.size)
        return
    by_value = np.argsort(values, kind="stable")
    sorted_values = values[by_value]
    bounds = [0, *(np.flatnonzero(np.diff(sorted_values)) + 1).tolist(), values.size]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        yield int(sorted_values[lo]), by_value[lo:hi]


class GlobalOrder:
    """Maps stream positions to (shard, sample within shard) for one split of a manifest."""

    def __init__(self, shard_sources: Sequence[int], shard_samples: Sequence[int], seed: int,
                 weights: Optional[Sequence[float]] = None) -> None:
        shard_sources = np.asarray(shard_sources, dtype=np.int64)
        self.shard_samples = np.asarray(shard_samples, dtype=np.int64)
        self.seed = seed
        self.sources = [int(s) for s in np.unique(shard_sources)]
        """Manifest source ids present in this split; mixture slot i draws from sources[i]."""
        if not self.sources:
            raise ValueError("the split has no shards")
        if weights is not None and len(weights) != len(self.sources):
            raise ValueError(f"data.weights: {len(weights)} weights for {len(self.sources)} sources")
        self.source_shards = [np.flatnonzero(shard_sources == s) for s in self.sources]
        self.source_sizes = [int(self.shard_samples[ids].sum()) for ids in self.source_shards]
        if min(self.source_sizes) == 0:
            raise ValueError(f"every source needs samples, got sizes {self.source_sizes}")
        self.counts = mixture_counts(self.source_sizes, weights)
        self.epoch_size = int(sum(self.counts))

    def locate(self, start: int, stop: int) -> Tuple[np.ndarray, np.ndarray]:
        """(shard index, sample index within the shard) of stream positions start ... stop-1."""
        return self.locate_at(np.arange(start, stop, dtype=np.int64))

    def locate_at(self, positions: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(shard index, sample index within the shard) of any int64 array of stream positions."""
        shard, sample = np.empty_like(positions), np.empty_like(positions)
        epochs, offsets = np.divmod(positions, self.epoch_size)
        if len(self.counts) == 1:
            src, j = np.zeros_like(offsets), offsets
        else:
            src, j = _deal(offsets, self.counts, 0, len(self.counts))
        for s in range(len(self.counts)):
            pick = np.flatnonzero(src == s)
            if not pick.size:
                continue
            q = epochs[pick] * self.counts[s] + j[pick]
            source_epochs, r = np.divmod(q, self.source_sizes[s])
            for se, here in _groups(source_epochs):
                shard[pick[here]], sample[pick[here]] = self._within_source(s, se, r[here])
        return shard, sample

    def _within_source(self, slot: int, source_epoch: int, r: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        ids = self.source_shards[slot]
        source = self.sources[slot]
        visit = ids[permutation(len(ids), self.seed, _SHARD_ORDER, source, source_epoch)]
        ends = np.cumsum(self.shard_samples[visit])
        k = np.searchsorted(ends, r, side="right")
        shard = visit[k]
        local = r - (ends[k] - self.shard_samples[shard])
        sample = np.empty_like(local)
        for sh, here in _groups(shard):
            perm = permutation(int(self.shard_samples[sh]), self.seed, _SAMPLE_ORDER, source, source_epoch, sh)
            sample[here] = perm[local[here]]
        return shard, sample


def rank_slice(global_batch_size: int, rank: int, world_size: int) -> slice:
    """The rows of a global batch that a data-parallel rank reads: a contiguous 1/world_size."""
    per_rank = global_batch_size // world_size
    return slice(rank * per_rank, (rank + 1) * per_rank)
