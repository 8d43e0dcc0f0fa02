"""Text -> tokens -> packed samples -> webdataset shards + manifest, in one process or on Ray.

The work is two maps whose items are fixed by the data alone, never by the number of workers:
(1) read and tokenize each unit of each source (sources.py: groups of text files, byte ranges of
JSONL files, Parquet row groups; every document encoded whole, followed by EOS), (2) encode each
planned shard into tar bytes and its sha256. The driver appends each unit's tokens, in order, to
the source's token file on disk, then packs the stream into samples of seq_len + 1 tokens taken
every seq_len tokens (neighbours share one token, so every next-token pair is a target exactly
once), holds out the last `val_fraction` of each source's samples as the validation split, and
cuts shards of about `shard_size_mb`, reading the stream back one shard at a time. Memory stays
bounded by a few units and shards, whatever the corpus size. Results come back in submission
order and the driver writes every file, so the output is byte-identical with 0, 1 or N workers.
Workers read their units themselves: on a multi-node cluster the sources must be on a file
system every node sees at the same path.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from data_pipeline.manifest import MANIFEST_FILE, Manifest, ShardInfo
from data_pipeline.shards import encode_shard, member_bytes
from data_pipeline.sources import Source, Unit, read_unit
from data_pipeline.tokenizer import TOKENIZER_FILE, TextTokenizer

log = logging.getLogger(__name__)

LOCAL_RAY_NODE_IP = "127.0.0.2"
LOCAL_RAY_OBJECT_STORE_BYTES = 512 * 1024 * 1024

# Each process (the driver, or a Ray worker) parses a tokenizer's JSON once.
_TOKENIZERS: Dict[str, TextTokenizer] = {}
ENCODE_BATCH_CHARS = 1 << 20
"""Text encoded per tokenizers call inside a unit: its Encoding objects cost ~50 bytes per token."""


@dataclass
class UnitTokens:
    """A unit's token stream (every document followed by EOS) and what reading it found."""

    tokens: np.ndarray
    documents: int
    bad: int
    first_bad: Optional[str]
    error: Optional[str]


def _tokenize_unit(tokenizer_json: str, fingerprint: str, unit: Unit, text_field: str,
                   on_bad_record: str) -> UnitTokens:
    """Read one unit where it runs and tokenize it, a bounded batch of documents at a time."""
    tok = _TOKENIZERS.get(fingerprint)
    if tok is None:
        tok = _TOKENIZERS[fingerprint] = TextTokenizer.from_json(tokenizer_json, fingerprint)
    found = read_unit(unit, text_field, on_bad_record)
    eos = np.array([tok.eos_id], dtype=tok.dtype)
    parts: List[np.ndarray] = []
    batch: List[str] = []
    size = 0
    for text in found.texts + [None]:  # type: ignore[list-item]
        if text is None or (batch and size + len(text) > ENCODE_BATCH_CHARS):
            for ids in tok.encode_batch(batch):
                parts += [ids, eos]
            batch, size = [], 0
        if text is not None:
            batch.append(text)
            size += len(text)
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=tok.dtype)
    return UnitTokens(tokens, len(found.texts), found.bad, found.first_bad, found.error)


class _Inline:
    """Runs the maps in this process."""

    def put(self, obj: Any) -> Any:
        return obj

    def map(self, fn: Callable, arg_lists: Iterable[tuple], bar: tqdm) -> Iterator[Any]:
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

    def map(self, fn: Callable, arg_lists: Iterable[tuple], bar: tqdm) -> Iterator[Any]:
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
    n = num_samples(len(stream), seq_len)
    return sample_rows(stream, 0, n, seq_len), len(stream) - (n * seq_len + 1 if n else 0)


def num_samples(stream_tokens: int, seq_len: int) -> int:
    """Samples of seq_len + 1 tokens, taken every seq_len tokens, that a stream of this length holds."""
    return max(0, (stream_tokens - 1) // seq_len)


def sample_rows(stream: np.ndarray, first: int, stop: int, seq_len: int) -> np.ndarray:
    """Samples first ... stop-1 of a token stream (sample i is tokens [i seq_len, i seq_len + seq_len + 1))."""
    part = stream[first * seq_len: stop * seq_len + 1]
    return np.ascontiguousarray(np.lib.stride_tricks.sliding_window_view(part, seq_len + 1)[::seq_len][: stop - first])


def num_val_samples(n: int, val_fraction: float) -> int:
    """The last ceil(val_fraction * n) samples of a source, keeping at least one for training."""
    return min(math.ceil(val_fraction * n), n - 1) if n >= 2 else 0


def _unigram_entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _output_folder(out_dir: Path) -> Path:
    """A private temporary folder beside `out_dir` to build in; `out_dir` must not exist or be empty."""
    if (out_dir / MANIFEST_FILE).exists():
        raise FileExistsError(f"--out: {out_dir} already holds a dataset ({MANIFEST_FILE}); choose another directory")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"--out: {out_dir} exists and is not an empty folder; choose another directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))


def _tokenize_source(ex: Any, tok_json: Any, tokenizer: TextTokenizer, source: Source, index: int, token_file: Path,
                     text_field: str, on_bad_record: str, progress: bool) -> Dict[str, Any]:
    """Append source `index`'s token stream to `token_file`, unit by unit; its statistics."""
    units = source.units(text_field)
    stats: Dict[str, Any] = {"documents": 0, "bad_records": 0, "first_bad_record": None, "tokens": 0}
    with open(token_file, "wb") as out, tqdm(total=len(units), desc=f"tokenize {index}", unit="unit",
                                             disable=not progress) as bar:
        args = ((tok_json, tokenizer.fingerprint, unit, text_field, on_bad_record) for unit in units)
        for result in ex.map(_tokenize_unit, args, bar):
            out.write(result.tokens.tobytes())
            stats["tokens"] += len(result.tokens)
            stats["documents"] += result.documents
            stats["bad_records"] += result.bad
            stats["first_bad_record"] = stats["first_bad_record"] or result.first_bad
            if result.error is not None:
                raise ValueError(result.error)
    if stats["bad_records"]:
        log.warning("data: skipped %d bad records of %s (on_bad_record=skip); first: %s", stats["bad_records"],
                    source.name, stats["first_bad_record"])
    return stats


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
    text_field: str = "text",
    on_bad_record: str = "error",
) -> Manifest:
    """Write the shards, `tokenizer.json` and (last) `manifest.json` of `sources` into `out_dir`.

    Everything is written into a temporary folder beside `out_dir` and renamed into place at the
    end, so a failed build leaves no `out_dir` behind. Memory stays bounded: each source's token
    stream goes to a file in that folder as units finish, and shards are cut from it one at a time.
    """
    out_dir = Path(out_dir)
    tmp = _output_folder(out_dir)
    try:
        manifest = _build_into(sources, tokenizer, tmp, seq_len=seq_len, val_fraction=val_fraction,
                               shard_size_mb=shard_size_mb, workers=workers, ray_address=ray_address,
                               progress=progress, text_field=text_field, on_bad_record=on_bad_record)
        os.chmod(tmp, 0o755)  # mkdtemp made it private
        if out_dir.is_dir():
            out_dir.rmdir()  # empty (checked above); a folder made meanwhile by someone else fails here
        os.rename(tmp, out_dir)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _build_into(sources: Sequence[Source], tokenizer: TextTokenizer, out_dir: Path, *, seq_len: int,
                val_fraction: float, shard_size_mb: float, workers: int, ray_address: Optional[str],
                progress: bool, text_field: str, on_bad_record: str) -> Manifest:
    dtype = tokenizer.dtype
    per_shard = max(1, int(shard_size_mb * 2**20) // member_bytes(seq_len + 1, dtype.str))
    shard_infos: Dict[str, List[ShardInfo]] = {"train": [], "val": []}
    source_meta = []
    counts = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    with executor(workers, ray_address) as ex:
        _TOKENIZERS[tokenizer.fingerprint] = tokenizer
        tok_json = ex.put(tokenizer.to_json())
        for i, source in enumerate(sources):
            token_file = out_dir / f".tokens-s{i:02d}.bin"
            stats = _tokenize_source(ex, tok_json, tokenizer, source, i, token_file, text_field, on_bad_record, progress)
            n = num_samples(stats["tokens"], seq_len)
            if n == 0:
                raise ValueError(f"data.sources: {source.name} has {stats['tokens']} tokens ({stats['documents']} documents), "
                                 f"fewer than one sample of seq_len + 1 = {seq_len + 1}")
            n_val = num_val_samples(n, val_fraction)
            plan = []
            for split, lo, hi in (("train", 0, n - n_val), ("val", n - n_val, n)):
                for k, first in enumerate(range(lo, hi, per_shard)):
                    plan.append((split, f"{split}-s{i:02d}-{k:05d}", first, min(first + per_shard, hi)))

            def shard_args() -> Iterator[Tuple[np.ndarray, str]]:
                # read, not memory-mapped: mapped pages of the token file would count as resident
                with open(token_file, "rb") as f:
                    for split, stem, first, stop in plan:
                        f.seek(first * seq_len * dtype.itemsize)
                        part = np.fromfile(f, dtype=dtype, count=(stop - first) * seq_len + 1)
                        rows = sample_rows(part, 0, stop - first, seq_len)
                        if split == "train":
                            counts[:] += np.bincount(rows[:, 1:].ravel(), minlength=tokenizer.vocab_size)
                        yield rows, stem

            with tqdm(total=len(plan), desc=f"write shards {i}", unit="shard", disable=not progress) as bar:
                for (split, stem, first, stop), (data, sha) in zip(plan, ex.map(encode_shard, shard_args(), bar)):
                    (out_dir / f"{stem}.tar").write_bytes(data)
                    shard_infos[split].append(ShardInfo(f"{stem}.tar", i, stop - first, len(data), sha))
            token_file.unlink()
            meta = {"name": source.name, "fingerprint": source.fingerprint, "documents": stats["documents"],
                    "tokens": stats["tokens"], "dropped_tokens": stats["tokens"] - (n * seq_len + 1),
                    "train_samples": n - n_val, "val_samples": n_val}
            if stats["bad_records"]:
                meta["bad_records"] = stats["bad_records"]
            source_meta.append(meta)

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
