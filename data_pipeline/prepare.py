"""`prepare_dataset`: from a `data:` config to a verified shard directory, building it on first use.

With `data.path` the prebuilt directory is opened. Otherwise the dataset is built from
`data.sources` into `<cache_dir>/datasets/<key>`, where the key hashes everything that decides
the bytes (sources, tokenizer fingerprint, packing), so a changed input gets a new directory and an
unchanged one is reused. Several ranks may call it at once: one builds, the others wait on the lock
(see cache.py). Either way the tokenizer is loaded from the directory and checked against the
manifest, so what the trainer gets is exactly what the shards were built with.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.build import build_shards
from data_pipeline.cache import build_once
from data_pipeline.config import DataConfig
from data_pipeline.manifest import FORMAT, Manifest, load_manifest
from data_pipeline.sources import resolve_sources
from data_pipeline.tokenizer import TextTokenizer, load_tokenizer, tokenizer_from_file

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    """A shard directory ready to read: its manifest, its tokenizer, and the config that chose it."""

    dir: Path
    manifest: Manifest
    tokenizer: TextTokenizer
    cfg: DataConfig

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def seq_len(self) -> int:
        return self.manifest.seq_len

    @property
    def unigram_entropy(self) -> float:
        """Entropy (nats/token) of the training targets' token frequencies: the loss of the best
        model that ignores context, a yardstick for training curves."""
        return float(self.manifest.stats["unigram_entropy"])


def open_dataset(directory: Path, cfg: DataConfig) -> PreparedData:
    """A built directory; its tokenizer and seq_len must agree with its manifest and with `cfg`."""
    manifest = load_manifest(directory)
    tokenizer = tokenizer_from_file(directory / manifest.tokenizer["file"])
    if tokenizer.fingerprint != manifest.tokenizer["fingerprint"]:
        raise ValueError(f"data.path: {directory / manifest.tokenizer['file']} has fingerprint {tokenizer.fingerprint}, "
                         f"but the shards were built with {manifest.tokenizer['fingerprint']}; rebuild the directory")
    if manifest.seq_len != cfg.seq_len:
        raise ValueError(f"data.seq_len: {cfg.seq_len}, but {directory} was built with seq_len {manifest.seq_len}")
    return PreparedData(directory, manifest, tokenizer, cfg)


def prepare_dataset(cfg: DataConfig, *, rank: int = 0, world_size: int = 1) -> PreparedData:
    """The dataset of `cfg`: `cfg.path`, or the cached build of `cfg.sources` (built if missing)."""
    if cfg.path is not None:
        return open_dataset(Path(cfg.path).expanduser(), cfg)
    sources = resolve_sources(cfg.sources)
    tokenizer = load_tokenizer(cfg.tokenizer, sources=sources, cache_dir=cfg.cache_dir)
    recipe = {
        "format": FORMAT,
        "sources": [[s.name, s.fingerprint] for s in sources],
        "tokenizer": tokenizer.fingerprint,
        "seq_len": cfg.seq_len,
        "val_fraction": cfg.val_fraction,
        "shard_size_mb": cfg.shard_size_mb,
    }
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    final = Path(cfg.cache_dir).expanduser() / "datasets" / key

    def build(tmp: Path) -> None:
        log.info("rank %d/%d: building dataset %s from %s", rank, world_size, key, ", ".join(cfg.sources))
        build_shards(sources, tokenizer, tmp, seq_len=cfg.seq_len, val_fraction=cfg.val_fraction,
                     shard_size_mb=cfg.shard_size_mb, progress=rank == 0)

    build_once(final, build, what=f"dataset {key} (rank {rank}/{world_size})")
    return open_dataset(final, cfg)
