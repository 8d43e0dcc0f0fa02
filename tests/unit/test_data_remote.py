"""Shards read over a real HTTP server on 127.0.0.1 (and through fsspec): the same samples in the
same order as from local disk, also while the server drops connections, answers 503, stalls and
truncates bodies; bounded retries that end in one line naming the URL; the local member cache;
each rank reads about its share of the bytes."""
import shutil
from collections import Counter
from pathlib import Path

import pytest

from data_pipeline import DataConfig, make_loader, open_dataset
from data_pipeline.build import build_shards
from data_pipeline.manifest import load_manifest
from data_pipeline.shards import END_OF_ARCHIVE, ShardError, read_shard
from data_pipeline.sources import resolve_sources
from data_pipeline.storage import RemoteReadError, coalesce
from data_pipeline.tokenizer import train_bpe
from data_testlib import pydoc_folder
from http_testlib import RangeServer

SEQ_LEN = 32


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("remote")
    sources = resolve_sources([str(pydoc_folder(root, 60_000))])
    tokenizer = train_bpe([t for s in sources for t in s.read_all()], 512)
    out = root / "shards"
    build_shards(sources, tokenizer, out, seq_len=SEQ_LEN, val_fraction=0.1, shard_size_mb=32 / 1024, progress=False)
    return out


def stream(location, *, world_size: int, batch: int, num_batches: int, num_workers: int = 0, **cfg):
    """Rows of `world_size` simulated ranks in global stream order, and each rank's storage counters."""
    per_rank, storages = [], []
    for rank in range(world_size):
        prepared = open_dataset(location, DataConfig(path=str(location), seq_len=SEQ_LEN, **cfg))
        before = prepared.storage.bytes_read
        loader = make_loader(prepared, "train", global_batch_size=batch, rank=rank, world_size=world_size, seed=0,
                             num_workers=num_workers)
        batches = []
        for b in loader:
            batches.append(b)
            if len(batches) == num_batches:
                break
        per_rank.append(batches)
        storages.append(prepared.storage.bytes_read - before)
    rows = [row.numpy().tobytes() for k in range(num_batches) for r in range(world_size) for row in per_rank[r][k]]
    return rows, storages


def test_http_with_injected_faults_gives_the_local_stream_exactly(dataset):
    n = load_manifest(dataset).num_samples("train")
    batch = 8
    num_batches = -(-n // batch) + 3  # one epoch and into the next
    local, _ = stream(dataset, world_size=2, batch=batch, num_batches=num_batches)
    assert Counter(local[:n]) == Counter(local[n:n] + local[:n])  # sanity: local is the reference
    faults = ["drop", "503", "truncate", "drop", "503", "truncate", "slow"]
    with RangeServer(dataset, faults, rate=0.2, fault_after=2, slow_s=0.5) as server:
        remote, _ = stream(server.url, world_size=2, batch=batch, num_batches=num_batches, num_workers=2,
                           remote_timeout_s=0.25, remote_backoff_s=0.01, remote_retries=12, readahead_mb=0.02)
    assert all(server.injected[f] > 0 for f in ("drop", "503", "truncate", "slow")), server.injected
    assert remote == local  # every sample once per epoch, nothing duplicated, the very same order
    assert len(set(remote[:n])) == n


def test_retries_are_bounded_and_end_in_one_line_naming_the_url(dataset):
    with RangeServer(dataset, ["503"], fault_after=2) as server:
        with pytest.raises(RemoteReadError) as err:
            stream(server.url, world_size=1, batch=8, num_batches=1, num_workers=1, remote_retries=2,
                   remote_backoff_s=0.01)
    message = str(err.value)
    assert "\n" not in message and message.startswith(server.url) and ".tar bytes " in message
    assert "HTTP 503 (gave up after 3 attempts)" in message
    assert server.gets >= 2 + 3  # manifest and tokenizer, then 3 attempts at each range


def test_a_url_that_404s_is_one_line_naming_it(dataset, tmp_path):
    with RangeServer(tmp_path) as server:
        with pytest.raises(FileNotFoundError, match=rf"^data\.path: {server.url}nowhere has no manifest\.json"):
            open_dataset(server.url + "nowhere", DataConfig(path=server.url + "nowhere", seq_len=SEQ_LEN))
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    name = load_manifest(copy).shards("train")[0].name
    (copy / name).unlink()
    with RangeServer(copy) as server:
        with pytest.raises(ShardError, match=rf"^damaged shard {server.url}{name}: missing: file not found$"):
            stream(server.url, world_size=1, batch=8, num_batches=load_manifest(copy).num_samples("train") // 8)


def test_remote_cache_serves_a_second_pass_from_disk(dataset, tmp_path):
    cfg = dict(remote_cache=str(tmp_path / "cache"))
    with RangeServer(dataset) as server:
        first, _ = stream(server.url, world_size=1, batch=8, num_batches=20, **cfg)
        sent = server.bytes_sent
        second, _ = stream(server.url, world_size=1, batch=8, num_batches=20, **cfg)
        assert second == first
        assert server.bytes_sent - sent < 64 * 1024  # only manifest.json and tokenizer.json again
    fingerprint = load_manifest(dataset).fingerprint
    assert any((tmp_path / "cache" / fingerprint).glob("train-*.tar.have"))


def test_the_scrub_reads_a_url_and_names_a_damaged_shard(dataset, tmp_path, capsys):
    from data_pipeline.cli import main

    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    info = load_manifest(copy).shards("val")[0]
    data = bytearray((copy / info.name).read_bytes())
    data[2000] ^= 1  # the padding after member 1's tokens: only the sha256 sees it
    (copy / info.name).write_bytes(bytes(data))
    with RangeServer(copy, ["503"], rate=0.3) as server:
        assert main(["verify", server.url, "--retries", "8"]) == 1
    out = capsys.readouterr().out
    assert f"damaged shard {server.url}{info.name}: bad checksum" in out
    total = sum(len(load_manifest(copy).shards(s)) for s in ("train", "val"))
    assert f"{total - 1} of {total} shards intact" in out


def test_a_plain_webdataset_pipeline_reads_our_shards_over_http(dataset):
    """webdataset (its curl URL opener and tar reader) sees standard samples: the same tokens."""
    wds = pytest.importorskip("webdataset", reason="webdataset is in the `dev` extra")
    manifest = load_manifest(dataset)
    info = manifest.shards("train")[1]
    expected = read_shard(dataset / info.name, samples=info.samples, sample_len=manifest.sample_len,
                          dtype=manifest.dtype, sha256=info.sha256, vocab_size=manifest.vocab_size)
    with RangeServer(dataset) as server:
        samples = list(wds.WebDataset(server.url + info.name, shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == [f"{info.name[:-4]}-{i:06d}" for i in range(info.samples)]
    assert all((s["tokens.npy"] == row).all() for s, row in zip(samples, expected))


def test_fsspec_url_reads_the_same_stream(dataset):
    local, _ = stream(dataset, world_size=2, batch=8, num_batches=10)
    via_fsspec, _ = stream(f"file://{dataset}", world_size=2, batch=8, num_batches=10, num_workers=1)
    assert via_fsspec == local


@pytest.mark.parametrize("world_size", [2, 4])
def test_each_rank_reads_its_share_of_the_bytes(dataset, world_size):
    manifest = load_manifest(dataset)
    shards = manifest.shards("train")
    data_bytes = sum(s.bytes for s in shards)
    n = manifest.num_samples("train")
    batch = 4 * world_size
    # readahead small against the epoch: the reader fetches its next ~5 windows, not further epochs
    _, per_rank = stream(dataset, world_size=world_size, batch=batch, num_batches=n // batch, readahead_mb=0.02)
    for got in per_rank:
        assert got <= 1.15 * data_bytes / world_size
        assert got >= 0.8 * (data_bytes - len(shards) * END_OF_ARCHIVE) / world_size


def test_coalesce_merges_touching_ranges_only():
    assert coalesce([(100, 10), (0, 50), (50, 50), (200, 5)]) == [(0, 110, [1, 2, 0]), (200, 5, [3])]
    assert coalesce([(0, 10), (20, 10)]) == [(0, 10, [0]), (20, 10, [1])]
