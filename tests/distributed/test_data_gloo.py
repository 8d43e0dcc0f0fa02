"""Two real processes with a gloo process group: both call prepare_dataset on one shared cache at
once (one builds, the other waits), then each reads its rank's slice with a DataLoader worker; the
slices are disjoint and together exactly one epoch, and the cursors agree."""
import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from parallel.spawn import free_port

pytestmark = pytest.mark.distributed

WORLD_SIZE = 2
GLOBAL_BATCH = 16


def _rank_main(rank: int, port: int, text_dir: str, cache_dir: str, out_dir: str) -> None:
    from data_pipeline import DataConfig, make_loader, prepare_dataset

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        cfg = DataConfig(sources=[text_dir], tokenizer="bpe:512", seq_len=32, cache_dir=cache_dir, num_workers=1)
        prepared = prepare_dataset(cfg, rank=rank, world_size=WORLD_SIZE)
        loader = make_loader(prepared, "train", global_batch_size=GLOBAL_BATCH, rank=rank, world_size=WORLD_SIZE,
                             seed=cfg.seed, num_workers=cfg.num_workers)
        n = prepared.manifest.num_samples("train")
        rows = []
        for batch in loader:
            rows.append([row.tolist() for row in batch])
            if len(rows) * GLOBAL_BATCH >= n:
                break
        gathered = [None] * WORLD_SIZE
        dist.all_gather_object(gathered, {"rows": rows, "state": loader.state_dict(), "dir": str(prepared.dir)})
        if rank == 0:
            Path(out_dir, "result.json").write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_read_disjoint_complete_slices(tmp_path):
    import pydoc_data.topics

    from data_pipeline import DataConfig, prepare_dataset

    text_dir = tmp_path / "text"
    text_dir.mkdir()
    for key in sorted(pydoc_data.topics.topics)[:12]:
        (text_dir / f"{key}.txt").write_text(pydoc_data.topics.topics[key], encoding="utf-8")
    cache_dir = tmp_path / "cache"
    # fork: the ranks inherit the imported torch instead of paying its import again (seconds on 2 cores)
    mp.start_processes(_rank_main, args=(free_port(), str(text_dir), str(cache_dir), str(tmp_path)),
                       nprocs=WORLD_SIZE, start_method="fork")

    result = json.loads((tmp_path / "result.json").read_text())
    assert result[0]["dir"] == result[1]["dir"]
    assert [p.name for p in (cache_dir / "datasets").iterdir() if not p.name.startswith(".")] == [Path(result[0]["dir"]).name]
    assert result[0]["state"] == result[1]["state"]
    prepared = prepare_dataset(DataConfig(sources=[str(text_dir)], tokenizer="bpe:512", seq_len=32,
                                          cache_dir=str(cache_dir)))
    n = prepared.manifest.num_samples("train")
    everything: Counter = Counter()
    from data_pipeline.shards import read_shard

    for info in prepared.manifest.shards("train"):
        block = read_shard(prepared.dir / info.name, samples=info.samples, sample_len=33,
                           dtype=prepared.manifest.dtype, sha256=info.sha256, vocab_size=512)
        everything.update(tuple(row.tolist()) for row in block)
    per_rank = [[tuple(row) for batch in r["rows"] for row in batch] for r in result]
    assert len(per_rank[0]) == len(per_rank[1]) == len(result[0]["rows"]) * GLOBAL_BATCH // WORLD_SIZE
    stream = [row for k in range(len(result[0]["rows"])) for r in range(WORLD_SIZE) for row in result[r]["rows"][k]]
    epoch = Counter(tuple(row) for row in stream[:n])
    assert epoch == everything  # complete, and with the counts: nothing twice
    by_rank = [Counter(), Counter()]
    for position, row in enumerate(stream[:n]):
        by_rank[(position % GLOBAL_BATCH) // (GLOBAL_BATCH // WORLD_SIZE)][tuple(row)] += 1
    assert by_rank[0] + by_rank[1] == everything  # the two slices are disjoint and complete
    assert sum(by_rank[0].values()) - sum(by_rank[1].values()) in range(-GLOBAL_BATCH, GLOBAL_BATCH + 1)
