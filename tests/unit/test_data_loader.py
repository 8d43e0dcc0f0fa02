"""The streaming reader on real shards of real text (Python's pydoc topics): exact-once over epochs
with simulated ranks and real DataLoader workers, exact resume (also with another rank count and
batch size), determinism, damaged shards under `error` and `skip`, the val split, refusals."""
import logging
import shutil
from collections import Counter
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch

from data_pipeline import DataConfig, ShardError, make_loader, open_dataset
from data_pipeline.build import build_shards
from data_pipeline.cli import main
from data_pipeline.manifest import load_manifest
from data_pipeline.shards import BLOCK, member_bytes, read_shard
from data_pipeline.sources import resolve_sources
from data_pipeline.tokenizer import train_bpe
from data_testlib import pydoc_folder

SEQ_LEN = 32


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loader")
    sources = resolve_sources([str(pydoc_folder(root, 120_000))])
    tokenizer = train_bpe([t for s in sources for t in s.read_all()], 512)
    out = root / "shards"
    build_shards(sources, tokenizer, out, seq_len=SEQ_LEN, val_fraction=0.1, shard_size_mb=64 / 1024, progress=False)
    return out


def rows_of(directory: Path, split: str) -> Counter:
    """Every sample of a split, as a multiset of byte strings."""
    manifest = load_manifest(directory)
    out: Counter = Counter()
    for info in manifest.shards(split):
        block = read_shard(directory / info.name, samples=info.samples, sample_len=manifest.sample_len,
                           dtype=manifest.dtype, sha256=info.sha256, vocab_size=manifest.vocab_size)
        out.update(row.astype(np.int64).tobytes() for row in block)
    return out


def cfg_for(directory: Path, **kw) -> DataConfig:
    return DataConfig(path=str(directory), seq_len=SEQ_LEN, **kw)


def read_global_stream(directory: Path, *, world_size: int, global_batch_size: int, num_batches: int,
                       num_workers: int = 2, state=None, seed: int = 0, cfg=None, on_bad_shard="error"):
    """Simulate `world_size` ranks: each reads `num_batches`; returns the rows in global stream order
    (window by window, rank by rank) and each rank's final state."""
    prepared = open_dataset(directory, cfg or cfg_for(directory))
    per_rank: List[List[torch.Tensor]] = []
    states = []
    for rank in range(world_size):
        loader = make_loader(prepared, "train", global_batch_size=global_batch_size, rank=rank, world_size=world_size,
                             seed=seed, num_workers=num_workers, on_bad_shard=on_bad_shard)
        if state is not None:
            loader.load_state_dict(state)
        batches = []
        for batch in loader:
            assert batch.shape == (global_batch_size // world_size, SEQ_LEN + 1) and batch.dtype == torch.long
            batches.append(batch)
            if len(batches) == num_batches:
                break
        per_rank.append(batches)
        states.append(loader.state_dict())
    stream = [row.numpy().tobytes() for k in range(num_batches) for r in range(world_size) for row in per_rank[r][k]]
    return stream, states


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_every_sample_exactly_once_per_epoch_over_two_epochs(dataset, world_size):
    everything = rows_of(dataset, "train")
    n = sum(everything.values())
    batch = 12 * world_size
    num_batches = -(-2 * n // batch)
    stream, states = read_global_stream(dataset, world_size=world_size, global_batch_size=batch,
                                        num_batches=num_batches)
    assert Counter(stream[:n]) == everything
    assert Counter(stream[n:2 * n]) == everything
    assert stream[:n] != stream[n:2 * n]  # each epoch has its own order
    assert {s["consumed"] for s in states} == {num_batches * batch}  # one cursor, the same on every rank


@pytest.mark.parametrize("before_ranks,after_ranks", [(2, 2), (2, 4), (4, 1)])
def test_restart_anywhere_with_other_rank_count_completes_the_epoch_exactly(dataset, before_ranks, after_ranks):
    everything = rows_of(dataset, "train")
    n = sum(everything.values())
    before, states = read_global_stream(dataset, world_size=before_ranks, global_batch_size=6 * before_ranks,
                                        num_batches=37)
    consumed = states[0]["consumed"]
    assert consumed == 37 * 6 * before_ranks < n
    new_batch = 10 * after_ranks
    after, _ = read_global_stream(dataset, world_size=after_ranks, global_batch_size=new_batch,
                                  num_batches=-(-(n - consumed) // new_batch), state=states[0])
    assert Counter(before + after[: n - consumed]) == everything
    uninterrupted, _ = read_global_stream(dataset, world_size=1, global_batch_size=n, num_batches=1, num_workers=0)
    assert before + after[: n - consumed] == uninterrupted  # the very same order, not just the same set


def test_same_seed_same_stream_other_seed_other_stream(dataset):
    a, _ = read_global_stream(dataset, world_size=2, global_batch_size=8, num_batches=20, num_workers=0, seed=7)
    b, _ = read_global_stream(dataset, world_size=2, global_batch_size=8, num_batches=20, num_workers=2, seed=7)
    c, _ = read_global_stream(dataset, world_size=2, global_batch_size=8, num_batches=20, num_workers=0, seed=8)
    assert a == b
    assert a != c


def test_val_is_one_finite_pass_over_the_val_split(dataset):
    prepared = open_dataset(dataset, cfg_for(dataset))
    val = rows_of(dataset, "val")
    loader = make_loader(prepared, "val", global_batch_size=8, rank=0, world_size=1, seed=0, num_workers=2)
    first = [row.numpy().tobytes() for batch in loader for row in batch]
    second = [row.numpy().tobytes() for batch in loader for row in batch]
    assert len(first) == len(loader) * 8 == sum(val.values()) // 8 * 8
    assert first == second
    assert not Counter(first) - val


def _damage(directory: Path, kind: str) -> str:
    """Damage the second train shard in place; return its name."""
    manifest = load_manifest(directory)
    info = manifest.shards("train")[1]
    path = directory / info.name
    data = bytearray(path.read_bytes())
    stride = member_bytes(manifest.sample_len, manifest.dtype)
    if kind == "bad checksum":  # flip the lowest bit of a token id: still a valid id
        data[3 * stride + BLOCK + 128 + 10] ^= 1
    elif kind == "undecodable sample":  # break the .npy magic of sample 5
        data[5 * stride + BLOCK + 1] ^= 0xFF
    elif kind == "missing":
        path.unlink()
        return info.name
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))
    return info.name


@pytest.mark.parametrize("kind", ["missing", "truncated tar", "undecodable sample"])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_damage_is_named_under_error(dataset, tmp_path, kind, num_workers):
    copy = tmp_path / "shards"
    shutil.copytree(dataset, copy)
    name = _damage(copy, kind)
    with pytest.raises(ShardError, match=rf"damaged shard .*{name}: {kind}") as err:
        read_global_stream(copy, world_size=1, global_batch_size=64, num_batches=100, num_workers=num_workers)
    assert err.value.kind == kind and "\n" not in str(err.value)
    if kind == "undecodable sample":
        assert f"{name[:-4]}-000005.tokens.npy" in str(err.value)


def test_a_flipped_token_bit_passes_member_checks_and_is_found_by_the_scrub(dataset, tmp_path, capsys):
    """Range reads check each member's headers and id range, not the shard's sha256 (that would mean
    reading the whole shard): a flipped bit that leaves a valid id is read as is (the negative
    control of the per-member checks), and `ebt data verify` names the shard."""
    copy = tmp_path / "shards"
    shutil.copytree(dataset, copy)
    name = _damage(copy, "bad checksum")
    stream, _ = read_global_stream(copy, world_size=2, global_batch_size=16, num_batches=40, num_workers=0)
    clean, _ = read_global_stream(dataset, world_size=2, global_batch_size=16, num_batches=40, num_workers=0)
    assert sum(a != b for a, b in zip(stream, clean)) <= 1  # that one sample, if it was drawn
    assert main(["verify", str(copy)]) == 1
    out = capsys.readouterr().out
    assert f"damaged shard {copy / name}: bad checksum" in out and "1 damaged" not in out


@pytest.mark.parametrize("kind", ["bad checksum", "truncated tar", "undecodable sample", "missing"])
def test_skip_delivers_every_other_sample_exactly_once(dataset, tmp_path, kind, caplog):
    copy = tmp_path / "shards"
    shutil.copytree(dataset, copy)
    name = _damage(copy, kind)
    manifest = load_manifest(dataset)
    lost_info = manifest.shards("train")[1]
    everything = rows_of(dataset, "train")
    block = read_shard(dataset / lost_info.name, samples=lost_info.samples, sample_len=manifest.sample_len,
                       dtype=manifest.dtype, sha256=lost_info.sha256, vocab_size=manifest.vocab_size)
    expected = everything - Counter(row.astype(np.int64).tobytes() for row in block)
    healthy = sum(expected.values())
    batch = 16
    cfg = cfg_for(copy)
    with caplog.at_level(logging.WARNING, logger="data_pipeline.loader"):
        prepared = open_dataset(copy, cfg)
        loaders = [make_loader(prepared, "train", global_batch_size=batch, rank=r, world_size=2, seed=0,
                               num_workers=2, on_bad_shard="skip") for r in range(2)]
        per_rank = []
        for loader in loaders:
            rows = []
            for b in loader:
                rows.append(b)
                if len(rows) * batch >= healthy:
                    break
            per_rank.append(rows)
    stream = [row.numpy().tobytes() for k in range(len(per_rank[0])) for r in range(2) for row in per_rank[r][k]]
    assert Counter(stream[:healthy]) == expected
    assert all(loader.skipped_samples == lost_info.samples for loader in loaders)
    assert all(list(loader.damaged_shards) == [name] for loader in loaders)
    assert loaders[0].state_dict()["skipped_samples"] == lost_info.samples
    warnings = [r.getMessage() for r in caplog.records if name in r.getMessage()]
    assert len(warnings) == 2 and kind in warnings[0]  # once per rank, never silent


def test_resume_refuses_another_manifest_or_seed_unless_allowed(dataset, tmp_path):
    _, states = read_global_stream(dataset, world_size=1, global_batch_size=8, num_batches=3, num_workers=0)
    state = states[0]
    prepared = open_dataset(dataset, cfg_for(dataset))
    other = make_loader(prepared, "train", global_batch_size=8, rank=0, world_size=1, seed=1)
    with pytest.raises(ValueError, match=r"data\.seed .*data\.allow_manifest_change=true"):
        other.load_state_dict(state)
    changed = dict(state, fingerprint="0123456789abcdef")
    loader = make_loader(prepared, "train", global_batch_size=8, rank=0, world_size=1, seed=0)
    with pytest.raises(ValueError, match=r"manifest '0123456789abcdef'.*exact-once resume is impossible"):
        loader.load_state_dict(changed)
    with pytest.raises(ValueError, match=r"tokenizer"):
        loader.load_state_dict(dict(state, tokenizer="feedfacefeedface"))
    lenient = open_dataset(dataset, cfg_for(dataset, allow_manifest_change=True))
    loader = make_loader(lenient, "train", global_batch_size=8, rank=0, world_size=1, seed=0)
    loader.load_state_dict(changed)
    assert loader.state_dict()["consumed"] == 24


@pytest.mark.parametrize("kwargs,match", [
    (dict(split="test"), r"^split: 'test' is not one of"),
    (dict(global_batch_size=10, world_size=4, rank=0), r"^global_batch_size: 10 is not a positive multiple of world_size=4"),
    (dict(rank=2, world_size=2), r"^rank: 2 is not in \[0, world_size=2\)"),
    (dict(on_bad_shard="ignore"), r"^data\.on_bad_shard: 'ignore'"),
    (dict(split="val", global_batch_size=4096), r"^global_batch_size: 4096 exceeds the \d+ samples of the val split"),
])
def test_bad_loader_arguments_name_the_argument(dataset, kwargs, match):
    prepared = open_dataset(dataset, cfg_for(dataset))
    args = dict(split="train", global_batch_size=8, rank=0, world_size=1, seed=0) | kwargs
    split = args.pop("split")
    with pytest.raises(ValueError, match=match):
        make_loader(prepared, split, **args)


def test_train_loader_reports_its_epoch_and_is_infinite(dataset):
    prepared = open_dataset(dataset, cfg_for(dataset))
    loader = make_loader(prepared, "train", global_batch_size=64, rank=0, world_size=1, seed=0)
    n = prepared.manifest.num_samples("train")
    for i, _ in enumerate(loader):
        if (i + 1) * 64 > 2 * n:
            break
    assert loader.epoch == 2
    with pytest.raises(TypeError, match="infinite"):
        len(loader)
