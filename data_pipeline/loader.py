"""The streaming reader: global batches in the global order, one rank's rows, a one-integer cursor.

The stream is cut into global batches ("windows") of `global_batch_size` healthy samples, taken in
order from stream position `consumed` on (see order.py). Rank r of W takes rows
`rank_slice(B, r, W)` of every window; DataLoader worker w of n produces windows w, w+n, w+2n, ...
and the DataLoader hands them back in that order, so the batches a rank sees do not depend on n.
A worker reads only its rank's rows: the members of its next windows (up to `data.readahead_mb`),
one read per run of consecutive members, each member checked (see shards.py), so per-rank I/O is
its share of the dataset, from local disk, HTTP or fsspec (storage.py).

The cursor is the count of stream positions consumed by all ranks together: it is the same on every
rank, goes into checkpoints as one integer, and resuming with any rank count, worker count or batch
size continues at exactly that position. It is tied to the manifest, tokenizer, seed and mixture
by fingerprints: a mismatch on resume is refused unless `data.allow_manifest_change`.

Damaged shards: with `on_bad_shard="error"` the first one found (a missing or short file, a
member that fails its checks) stops the run with its name and the kind of damage. With `"skip"`
its positions are passed over (a window extends until it holds B healthy samples). That decision
must be identical on every rank without any communication, so under `skip` every rank reads and
checks (sha256 included) every shard its windows touch, as before range reads: the price of
skipping is whole-dataset I/O per rank. Each damaged shard is logged once and the samples lost are
counted in `skipped_samples`.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.config import BAD_SHARD_POLICIES
from data_pipeline.manifest import SPLITS, Manifest
from data_pipeline.order import GlobalOrder, rank_slice
from data_pipeline.shards import ShardError, check_members, check_size, member_bytes, verify_shard_bytes
from data_pipeline.storage import RemoteReadError, Storage, shard_members

if TYPE_CHECKING:
    from data_pipeline.prepare import PreparedData

log = logging.getLogger(__name__)


class ShardReader:
    """One process's view of one split's shards: which are healthy, and the rows it asks for.

    `on_bad_shard="error"`: a shard's health is its size (one stat or HEAD per shard, the same
    answer on every rank), and `rows` reads only the members asked for, checking each one.
    `"skip"`: a skip decision must be the same on every rank and ranks do not talk to each other,
    so every rank reads and checks whole shards (sha256 included) as they come, a few kept in memory.
    """

    def __init__(self, storage: Storage, manifest: Manifest, split: str, on_bad_shard: str) -> None:
        self.storage = storage
        self.manifest = manifest
        self.infos = manifest.shards(split)
        self.on_bad_shard = on_bad_shard
        self.stride = member_bytes(manifest.sample_len, manifest.dtype)
        self.damaged: Dict[int, str] = {}
        self._sized: set = set()
        self._blocks: "OrderedDict[int, np.ndarray]" = OrderedDict()
        self._capacity = 2 * len(manifest.sources) + 2

    def _check(self, index: int) -> Optional[np.ndarray]:
        info = self.infos[index]
        where = self.storage.where(info.name)
        m = self.manifest
        check_size(where, self.storage.size(info.name), samples=info.samples, sample_len=m.sample_len, dtype=m.dtype)
        if self.on_bad_shard == "error":
            return None
        return verify_shard_bytes(self.storage.read(info.name), where, samples=info.samples, sample_len=m.sample_len,
                                  dtype=m.dtype, sha256=info.sha256, vocab_size=m.vocab_size)

    def healthy(self, index: int) -> bool:
        """Whether shard `index` can be read; under `error` a damaged one raises its ShardError."""
        if index in self.damaged:
            return False
        if index in self._blocks:
            self._blocks.move_to_end(index)
            return True
        if index in self._sized:
            return True
        try:
            block = self._check(index)
        except ShardError as err:
            if self.on_bad_shard == "error":
                raise
            self.damaged[index] = str(err)
            return False
        if block is None:
            self._sized.add(index)
        else:
            self._blocks[index] = block
            if len(self._blocks) > self._capacity:
                self._blocks.popitem(last=False)
        return True

    def rows(self, shards: np.ndarray, samples: np.ndarray) -> np.ndarray:
        """The int64 (k, sample_len) tokens of samples `samples[i]` of shards `shards[i]`."""
        m = self.manifest
        out = np.empty((len(shards), m.sample_len), dtype=np.int64)
        for shard in np.unique(shards).tolist():
            here = shards == shard
            block = self._blocks.get(shard)
            if block is None and self.on_bad_shard == "skip":
                self.healthy(shard)  # evicted since its window was formed: read it again
                block = self._blocks[shard]
            if block is not None:
                out[here] = block[samples[here]]
                continue
            info = self.infos[shard]
            wanted, back = np.unique(samples[here], return_inverse=True)
            members = shard_members(self.storage, info.name, self.stride, wanted, info.samples)
            tokens = check_members(members, wanted, where=self.storage.where(info.name), sample_len=m.sample_len,
                                   dtype=m.dtype, vocab_size=m.vocab_size)
            out[here] = tokens[back]
        return out


@dataclass
class Window:
    """One global batch: where its healthy samples live, and the stream position after it."""

    shards: np.ndarray
    samples: np.ndarray
    end: int
    damaged: Tuple[Tuple[str, str], ...]
    """(file name, message) of the damaged shards this window passed over."""


def windows(order: GlobalOrder, reader: ShardReader, start: int, global_batch_size: int,
            stop: Optional[int] = None) -> Iterator[Window]:
    """Consecutive global batches from stream position `start` (until `stop`, dropping a partial one)."""
    cursor = start
    while True:
        shards: List[np.ndarray] = []
        samples: List[np.ndarray] = []
        damaged: Dict[str, str] = {}
        have, fruitless = 0, 0
        while have < global_batch_size:
            take = global_batch_size - have if stop is None else min(global_batch_size - have, stop - cursor)
            if take <= 0:
                return
            sh, sa = order.locate(cursor, cursor + take)
            cursor += take
            ok = np.ones(take, dtype=bool)
            for shard in np.unique(sh).tolist():
                if not reader.healthy(shard):
                    ok &= sh != shard
                    damaged[reader.infos[shard].name] = reader.damaged[shard]
            shards.append(sh[ok])
            samples.append(sa[ok])
            have += int(ok.sum())
            fruitless = 0 if ok.any() else fruitless + take
            if fruitless > order.epoch_size:
                raise ShardError(f"no healthy shard left in {reader.storage.location} ({len(reader.damaged)} damaged; "
                                 f"last: {reader.damaged[int(sh[-1])]})", reader.storage.location, "all damaged")
        yield Window(np.concatenate(shards), np.concatenate(samples), cursor, tuple(damaged.items()))


class _RankStream(IterableDataset):
    """One rank's batches from stream position `start`; inside a DataLoader worker, its share of them.

    Reads ahead: the rows of its next windows (about `readahead_bytes` of members) are fetched in one
    go, coalesced per shard, so reads stay large and remote reads run in parallel.
    Yields (tokens or None, stream position after the batch, damaged-shard messages, error or None):
    an error travels as data, so the training process can raise it as one clean line.
    """

    def __init__(self, storage: Storage, manifest: Manifest, split: str, order: GlobalOrder, start: int,
                 global_batch_size: int, rank: int, world_size: int, on_bad_shard: str,
                 stop: Optional[int], readahead_bytes: int) -> None:
        self.storage, self.manifest, self.split, self.order = storage, manifest, split, order
        self.start, self.global_batch_size, self.stop = start, global_batch_size, stop
        self.rows = rank_slice(global_batch_size, rank, world_size)
        self.on_bad_shard = on_bad_shard
        per_window = (self.rows.stop - self.rows.start) * member_bytes(manifest.sample_len, manifest.dtype)
        # under skip the rows come from whole shards already in memory: reading ahead would only
        # let them be evicted (and read again) before their windows are served
        self.ahead = 1 if on_bad_shard == "skip" else max(1, readahead_bytes // per_window)

    def _batches(self, reader: ShardReader, mine: List[Window]) -> Iterator[Tuple[torch.Tensor, Window]]:
        shards = np.concatenate([w.shards[self.rows] for w in mine])
        samples = np.concatenate([w.samples[self.rows] for w in mine])
        rows = reader.rows(shards, samples)
        per = self.rows.stop - self.rows.start
        for k, window in enumerate(mine):
            yield torch.from_numpy(rows[k * per:(k + 1) * per]), window

    def _rank_positions(self, reader: ShardReader, worker: int, num_workers: int) -> Iterator[Tuple[torch.Tensor, int]]:
        """Under on_bad_shard=error every window is exactly B consecutive positions (damage stops
        the run), so the rank locates just its own rows of its next windows, in one vector call."""
        size, per = self.global_batch_size, self.rows.stop - self.rows.start
        columns = np.arange(self.rows.start, self.rows.stop, dtype=np.int64)
        first, ahead = worker, 1
        while True:
            ks = first + num_workers * np.arange(ahead, dtype=np.int64)
            if self.stop is not None:  # a last partial window is left out
                ks = ks[self.start + (ks + 1) * size <= self.stop]
                if not len(ks):
                    return
            shards, samples = self.order.locate_at((self.start + ks[:, None] * size + columns).ravel())
            for shard in np.unique(shards).tolist():
                reader.healthy(shard)
            rows = reader.rows(shards, samples)
            for j, k in enumerate(ks.tolist()):
                yield torch.from_numpy(rows[j * per:(j + 1) * per]), self.start + (k + 1) * size
            first, ahead = int(ks[-1]) + num_workers, min(2 * ahead, self.ahead)

    def __iter__(self) -> Iterator[Tuple[Optional[torch.Tensor], int, Tuple[Tuple[str, str], ...],
                                         Optional[Tuple[str, Tuple[str, ...]]]]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = ShardReader(self.storage, self.manifest, self.split, self.on_bad_shard)
        try:
            if self.on_bad_shard == "error":
                for tokens, end in self._rank_positions(reader, worker, num_workers):
                    yield tokens, end, (), None
                return
            mine: List[Window] = []
            ahead = 1  # then doubling up to self.ahead: the first batch comes after one window's reads
            for k, window in enumerate(windows(self.order, reader, self.start, self.global_batch_size, self.stop)):
                if k % num_workers == worker:
                    mine.append(window)
                if len(mine) == ahead:
                    for tokens, w in self._batches(reader, mine):
                        yield tokens, w.end, w.damaged, None
                    mine = []
                    ahead = min(2 * ahead, self.ahead)
            if mine:
                for tokens, w in self._batches(reader, mine):
                    yield tokens, w.end, w.damaged, None
        except ShardError as err:
            yield None, -1, (), ("ShardError", (str(err), err.shard, err.kind))
        except RemoteReadError as err:
            yield None, -1, (), ("RemoteReadError", (str(err),))


_ERRORS = {"ShardError": ShardError, "RemoteReadError": RemoteReadError}


class ShardLoader:
    """Iterable of LongTensor batches (global_batch_size // world_size, seq_len + 1) for one rank.

    `train` is infinite and each `iter()` continues from the cursor; `val` is one finite pass of
    len(loader) batches from its start (a last partial global batch is left out).
    """

    def __init__(self, storage: Storage, manifest: Manifest, split: str, *, global_batch_size: int, rank: int,
                 world_size: int, seed: int, num_workers: int, on_bad_shard: str,
                 weights: Optional[Sequence[float]], allow_manifest_change: bool, readahead_bytes: int) -> None:
        infos = manifest.shards(split)
        self.storage, self.manifest, self.split = storage, manifest, split
        self.directory = storage.location
        self.readahead_bytes = readahead_bytes
        self.global_batch_size, self.rank, self.world_size = global_batch_size, rank, world_size
        self.seed, self.num_workers, self.on_bad_shard = seed, num_workers, on_bad_shard
        self.weights = list(weights) if weights is not None else None
        self.allow_manifest_change = allow_manifest_change
        self.order = GlobalOrder([s.source for s in infos], [s.samples for s in infos], seed, self.weights)
        self.consumed = 0
        """Stream positions consumed by all ranks together (damaged ones included)."""
        self.skipped_samples = 0
        self.damaged_shards: Dict[str, str] = {}
        """Damaged shards seen (under `skip`): file name -> message."""

    @property
    def epoch(self) -> int:
        return self.consumed // self.order.epoch_size

    def __len__(self) -> int:
        if self.split == "train":
            raise TypeError("the train loader is infinite")
        return self.order.epoch_size // self.global_batch_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        start = self.consumed if self.split == "train" else 0
        stop = None if self.split == "train" else self.order.epoch_size
        stream = _RankStream(self.storage, self.manifest, self.split, self.order, start, self.global_batch_size,
                             self.rank, self.world_size, self.on_bad_shard, stop, self.readahead_bytes)
        batches = DataLoader(stream, batch_size=None, num_workers=self.num_workers) if self.num_workers else stream
        previous = start
        for tokens, end, damaged, error in batches:
            if error is not None:
                raise _ERRORS[error[0]](*error[1])
            for name, message in damaged:
                if name not in self.damaged_shards:
                    self.damaged_shards[name] = message
                    log.warning("data: skipping (on_bad_shard=skip) %s", message)
            self.skipped_samples += end - previous - self.global_batch_size
            previous = end
            self.consumed = end
            yield tokens

    def state_dict(self) -> Dict[str, Any]:
        """The cursor and what it is valid for; JSON-serialisable."""
        return {
            "consumed": self.consumed,
            "fingerprint": self.manifest.fingerprint,
            "tokenizer": self.manifest.tokenizer["fingerprint"],
            "seed": self.seed,
            "weights": self.weights,
            "split": self.split,
            "epoch_size": self.order.epoch_size,
            "skipped_samples": self.skipped_samples,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue from a saved cursor; call before iterating. Refuses a cursor of another data setup."""
        now = self.state_dict()
        changes = [
            ("tokenizer", "tokenizer", "the token ids differ"),
            ("fingerprint", "manifest", "the shards differ"),
            ("seed", "data.seed", "the sample order differs"),
            ("weights", "data.weights", "the mixture differs"),
        ]
        for key, what, why in changes:
            if state.get(key) != now[key]:
                message = (f"data: the checkpoint's cursor was saved for {what} {state.get(key)!r}, this run has "
                           f"{now[key]!r} ({self.directory}): {why}, so exact-once resume is impossible")
                if not self.allow_manifest_change:
                    raise ValueError(message + "; set data.allow_manifest_change=true to continue anyway")
                log.warning("%s; continuing at sample %d (data.allow_manifest_change=true)", message, state["consumed"])
        self.consumed = int(state["consumed"])
        self.skipped_samples = int(state.get("skipped_samples", 0))


def make_loader(prepared: "PreparedData", split: str, *, global_batch_size: int, rank: int, world_size: int, seed: int,
                num_workers: int = 0, on_bad_shard: str = "error") -> ShardLoader:
    """A resumable loader over one split of `prepared` for one data-parallel rank.

    Mixture weights and `allow_manifest_change` come from `prepared.cfg`; weights apply to `train`
    only (`val` is every validation sample once).
    """
    if split not in SPLITS:
        raise ValueError(f"split: {split!r} is not one of {SPLITS}")
    if on_bad_shard not in BAD_SHARD_POLICIES:
        raise ValueError(f"data.on_bad_shard: {on_bad_shard!r} is not one of {BAD_SHARD_POLICIES}")
    if num_workers < 0:
        raise ValueError(f"data.num_workers: must be >= 0, got {num_workers}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank: {rank} is not in [0, world_size={world_size})")
    if global_batch_size < 1 or global_batch_size % world_size:
        raise ValueError(f"global_batch_size: {global_batch_size} is not a positive multiple of world_size={world_size}")
    manifest = prepared.manifest
    if not manifest.shards(split):
        raise ValueError(f"data.val_fraction: {prepared.dir} has no {split!r} split (it was built with val_fraction=0)")
    weights = prepared.cfg.weights if split == "train" else None
    if weights is not None and len(weights) != len(manifest.sources):
        raise ValueError(f"data.weights: {len(weights)} weights for the {len(manifest.sources)} sources of {prepared.dir}")
    if split == "val" and manifest.num_samples("val") < global_batch_size:
        raise ValueError(f"global_batch_size: {global_batch_size} exceeds the {manifest.num_samples('val')} samples "
                         f"of the val split of {prepared.dir}; lower it or raise data.val_fraction")
    return ShardLoader(prepared.storage, manifest, split, global_batch_size=global_batch_size, rank=rank,
                       world_size=world_size, seed=seed, num_workers=num_workers, on_bad_shard=on_bad_shard,
                       weights=weights, allow_manifest_change=prepared.cfg.allow_manifest_change,
                       readahead_bytes=int(prepared.cfg.readahead_mb * 2**20))
