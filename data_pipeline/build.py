"""Text -> tokens -> packed samples -> webdataset shards + manifest, in one process or on Ray.

The work is two maps whose items are fixed by the data alone, never by the number of workers:
(1) tokenize groups of whole documents (about `TOKENIZE_TASK_BYTES` of text each), (2) encode each
planned shard into tar bytes and its sha256. Between them the driver packs every source's token
stream (each document followed by EOS) into samples of seq_len + 1 tokens taken every seq_len tokens
(neighbours share one token, so every next-token pair is a target exactly once), holds out the last
`val_fraction` of each source's samples as the validation split, and cuts shards of about
`shard_size_mb`. Results come back in submission order and the driver writes every file, so the
output is byte-identical with 0, 1 or N workers, and workers need no shared file system.

With `workers >= 1` the maps run as Ray tasks: on the cluster at `ray_address`, or on a private
local Ray that this module starts on loopback (node address 127.0.0.2, its own temp dir, token
auth off, as docs/data.md explains) and stops when done, stopping nothing it did not start.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
from collections import deque
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from data_pipeline.manifest import MANIFEST_FILE, Manifest, ShardInfo
from data_pipeline.shards import encode_shard, member_bytes
from data_pipeline.sources import Source
from data_pipeline.tokenizer import TOKENIZER_FILE, TextTokenizer

log = logging.getLogger(__name__)

TOKENIZE_TASK_BYTES = 256 * 1024
LOCAL_RAY_NODE_IP = "127.0.0.2"
LOCAL_RAY_OBJECT_STORE_BYTES = 512 * 1024 * 1024

# Each process (the driver, or a Ray worker) parses a tokenizer's JSON once.
_TOKENIZERS: Dict[str, TextTokenizer] = {}


def _tokenize(tokenizer_json: str, fingerprint: str, texts: List[str]) -> List[np.ndarray]:
    tok = _TOKENIZERS.get(fingerprint)
    if tok is None:
        tok = _TOKENIZERS[fingerprint] = TextTokenizer.from_json(tokenizer_json, fingerprint)
    return tok.encode_batch(texts)


class _Inline:
    """Runs the maps in this process."""

    def put(self, obj: Any) -> Any:
        return obj

    def map(self, fn: Callable, arg_lists: Sequence[tuple], bar: tqdm) -> Iterator[Any]:
        for args in arg_lists:
            result = fn(*args)
            bar.update()
            yield result


class _Ray:
    """Runs the maps as Ray tasks, at most `in_flight` at a time, results in submission order."""

    def __init__(self, ray: Any, in_flight: int) -> None:
        self.ray = ray
        self.in_flight = in_flight

    def put(self, obj: Any) -> Any:
        return self.ray.put(obj)

    def map(self, fn: Callable, arg_lists: Sequence[tuple], bar: tqdm) -> Iterator[Any]:
        task = self.ray.remote(num_cpus=1, max_retries=2)(fn)
        pending: deque = deque()
        for args in arg_lists:
            if len(pending) >= self.in_flight:
                yield self._next(pending, bar)
            pending.append(task.remote(*args))
        while pending:
            yield self._next(pending, bar)

    def _next(self, pending: deque, bar: tqdm) -> Any:
        result = self.ray.get(pending.popleft())
        bar.update()
        return result


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Set environment variables (inherited by the Ray processes started inside), then restore them."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def executor(workers: int, ray_address: Optional[str] = None) -> Iterator[Any]:
    """In-process maps (`workers == 0`, no address), or Ray tasks on a cluster or a private local Ray."""
    if workers == 0 and ray_address is None:
        yield _Inline()
        return
    try:
        import ray
    except ImportError:
        raise RuntimeError("--workers/--ray-address need Ray: pip install 'ebt-pretrain[cluster]'") from None
    if ray.is_initialized():  # e.g. inside a Ray Train worker: use it, leave it running
        yield _Ray(ray, 2 * max(workers, 1))
        return
    project_root = str(Path(__file__).resolve().parent.parent)
    python_path = os.pathsep.join(p for p in (project_root, os.environ.get("PYTHONPATH")) if p)
    env = {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"), "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": python_path}
    if ray_address is not None:
        with _environ(**env):
            ray.init(address=ray_address, log_to_driver=False, configure_logging=False)
            try:
                cpus = int(ray.cluster_resources().get("CPU", 1))
                yield _Ray(ray, 2 * (workers or cpus))
            finally:
                ray.shutdown()  # disconnects; the cluster keeps running
        return
    temp_dir = tempfile.mkdtemp(prefix="ebt-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    try:
        with _environ(**env):
            ray.init(address="local", num_cpus=workers, num_gpus=0, _node_ip_address=LOCAL_RAY_NODE_IP,
                     _temp_dir=temp_dir, include_dashboard=False, log_to_driver=False,
                     configure_logging=False, object_store_memory=LOCAL_RAY_OBJECT_STORE_BYTES)
            try:
                log.info("started a local Ray with %d worker(s) on %s (temp dir %s)", workers, LOCAL_RAY_NODE_IP, temp_dir)
                yield _Ray(ray, 2 * workers)
            finally:
                ray.shutdown()  # stops exactly the processes this ray.init started
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


def pack(docs: Sequence[np.ndarray], eos_id: int, seq_len: int) -> Tuple[np.ndarray, int]:
    """Samples (n, seq_len + 1) cut every seq_len tokens from docs joined by EOS, and the tokens
    of the stream (each document followed by EOS) that did not fill a last sample."""
    dtype = docs[0].dtype if docs else np.dtype(np.uint16)
    stream = np.concatenate([part for doc in docs for part in (doc, np.array([eos_id], dtype=dtype))])
    n = (len(stream) - 1) // seq_len
    windows = np.lib.stride_tricks.sliding_window_view(stream, seq_len + 1)[::seq_len][:n]
    return np.ascontiguousarray(windows), len(stream) - (n * seq_len + 1 if n else 0)


def num_val_samples(n: int, val_fraction: float) -> int:
    """The last ceil(val_fraction * n) samples of a source, keeping at least one for training."""
    return min(math.ceil(val_fraction * n), n - 1) if n >= 2 else 0


def _task_groups(texts: Sequence[str]) -> List[List[str]]:
    """Consecutive whole documents, about TOKENIZE_TASK_BYTES of text per group."""
    groups: List[List[str]] = [[]]
    size = 0
    for text in texts:
        if groups[-1] and size + len(text) > TOKENIZE_TASK_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(text)
        size += len(text)
    return [g for g in groups if g]


def _unigram_entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def build_shards(
    sources: Sequence[Source],
    tokenizer: TextTokenizer,
    out_dir: Path,
    *,
    seq_len: int,
    val_fraction: float = 0.02,
    shard_size_mb: float = 4.0,
    workers: int = 0,
    ray_address: Optional[str] = None,
    progress: bool = True,
) -> Manifest:
    """Write the shards, `tokenizer.json` and (last) `manifest.json` of `sources` into `out_dir`."""
    out_dir = Path(out_dir)
    if (out_dir / MANIFEST_FILE).exists():
        raise FileExistsError(f"--out: {out_dir} already holds a dataset ({MANIFEST_FILE}); choose another directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = tokenizer.dtype
    texts = [list(source.read_all()) for source in sources]
    groups = [(i, g) for i, source_texts in enumerate(texts) for g in _task_groups(source_texts)]

    with executor(workers, ray_address) as ex:
        _TOKENIZERS[tokenizer.fingerprint] = tokenizer
        tok_json = ex.put(tokenizer.to_json())
        docs: List[List[np.ndarray]] = [[] for _ in sources]
        with tqdm(total=len(groups), desc="tokenize", unit="task", disable=not progress) as bar:
            args = [(tok_json, tokenizer.fingerprint, g) for _, g in groups]
            for (i, _), arrays in zip(groups, ex.map(_tokenize, args, bar)):
                docs[i].extend(arrays)

        per_shard = max(1, int(shard_size_mb * 2**20) // member_bytes(seq_len + 1, dtype.str))
        plan: List[Tuple[str, str, int, np.ndarray]] = []
        source_meta = []
        counts = np.zeros(tokenizer.vocab_size, dtype=np.int64)
        for i, (source, source_docs) in enumerate(zip(sources, docs)):
            samples, dropped = pack(source_docs, tokenizer.eos_id, seq_len)
            if len(samples) == 0:
                raise ValueError(f"data.sources: {source.name} has fewer than seq_len + 1 = {seq_len + 1} tokens")
            n_val = num_val_samples(len(samples), val_fraction)
            splits = {"train": samples[: len(samples) - n_val], "val": samples[len(samples) - n_val:]}
            counts += np.bincount(splits["train"][:, 1:].ravel(), minlength=tokenizer.vocab_size)
            for split, rows in splits.items():
                for k, start in enumerate(range(0, len(rows), per_shard)):
                    plan.append((split, f"{split}-s{i:02d}-{k:05d}", i, rows[start:start + per_shard]))
            source_meta.append({
                "name": source.name, "fingerprint": source.fingerprint, "documents": len(source.documents),
                "tokens": int(sum(len(d) + 1 for d in source_docs)), "dropped_tokens": dropped,
                "train_samples": len(splits["train"]), "val_samples": n_val,
            })

        shard_infos: Dict[str, List[ShardInfo]] = {"train": [], "val": []}
        with tqdm(total=len(plan), desc="write shards", unit="shard", disable=not progress) as bar:
            encoded = ex.map(encode_shard, [(rows, stem) for _, stem, _, rows in plan], bar)
            for (split, stem, source_index, rows), (data, sha) in zip(plan, encoded):
                (out_dir / f"{stem}.tar").write_bytes(data)
                shard_infos[split].append(ShardInfo(f"{stem}.tar", source_index, len(rows), len(data), sha))

    tokenizer.save(out_dir)
    manifest = Manifest(
        seq_len=seq_len,
        dtype=dtype.str,
        tokenizer={"fingerprint": tokenizer.fingerprint, "origin": tokenizer.origin,
                   "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "file": TOKENIZER_FILE},
        packing={"eos": "after every document", "sample_len": seq_len + 1, "stride": seq_len,
                 "val_fraction": val_fraction, "val_rule": "last samples of each source",
                 "shard_size_mb": shard_size_mb},
        sources=source_meta,
        splits=shard_infos,
        stats={"train_tokens": int(counts.sum()), "unigram_entropy": _unigram_entropy(counts)},
    )
    manifest.save(out_dir)
    return manifest
