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
from typing import Union

from data_pipeline.build import build_shards
from data_pipeline.cache import build_once
from data_pipeline.config import DataConfig
from data_pipeline.manifest import FORMAT, MANIFEST_FILE, Manifest, parse_manifest
from data_pipeline.sources import resolve_sources
from data_pipeline.storage import CachedStorage, LocalStorage, RemoteOptions, Storage, is_url, open_storage
from data_pipeline.tokenizer import TOKENIZER_FILE, TextTokenizer, load_tokenizer, tokenizer_from_json

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    """A shard directory ready to read: its manifest, its tokenizer, and the config that chose it."""

    dir: Union[Path, str]
    """The local folder, or the URL of a remote one."""
    manifest: Manifest
    tokenizer: TextTokenizer
    cfg: DataConfig
    storage: Storage
    """Where the shards are read from (local, HTTP, fsspec; cached or not)."""

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


def storage_for(location: Union[Path, str], cfg: DataConfig) -> Storage:
    """The storage of a dataset location under the `data.remote_*` settings."""
    if not is_url(str(location)):
        return LocalStorage(Path(location).expanduser())
    options = RemoteOptions(retries=cfg.remote_retries, timeout_s=cfg.remote_timeout_s,
                            backoff_s=cfg.remote_backoff_s, threads=cfg.remote_threads)
    return open_storage(str(location), options, cfg.remote_cache)


def open_dataset(directory: Union[Path, str], cfg: DataConfig) -> PreparedData:
    """A built directory (local or a URL); its tokenizer and seq_len must agree with its manifest and with `cfg`."""
    storage = storage_for(directory, cfg)
    local = isinstance(storage, LocalStorage)
    if local and not Path(storage.location).is_dir():
        raise FileNotFoundError(f"data.path: {directory} does not exist (build one with `ebt data build SRC... --out DIR`)")
    try:
        manifest_text = storage.read(MANIFEST_FILE).decode("utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"data.path: {directory} has no {MANIFEST_FILE} "
                                f"(build one with `ebt data build SRC... --out DIR`)") from None
    manifest = parse_manifest(manifest_text, storage.where(MANIFEST_FILE))
    if isinstance(storage, CachedStorage):
        storage.bind(manifest.fingerprint)
    tokenizer_file = manifest.tokenizer.get("file", TOKENIZER_FILE)
    try:
        tokenizer_text = storage.read(tokenizer_file).decode("utf-8")
    except FileNotFoundError:
        raise ValueError(f"data.path: {storage.where(tokenizer_file)} does not exist; rebuild the directory") from None
    tokenizer = tokenizer_from_json(tokenizer_text, storage.where(tokenizer_file))
    if tokenizer.fingerprint != manifest.tokenizer["fingerprint"]:
        raise ValueError(f"data.path: {storage.where(tokenizer_file)} has fingerprint {tokenizer.fingerprint}, "
                         f"but the shards were built with {manifest.tokenizer['fingerprint']}; rebuild the directory")
    if manifest.seq_len != cfg.seq_len:
        raise ValueError(f"data.seq_len: {cfg.seq_len}, but {directory} was built with seq_len {manifest.seq_len}")
    where: Union[Path, str] = Path(storage.location) if local else str(directory)
    return PreparedData(where, manifest, tokenizer, cfg, storage)


def prepare_dataset(cfg: DataConfig, *, rank: int = 0, world_size: int = 1) -> PreparedData:
    """The dataset of `cfg`: `cfg.path`, or the cached build of `cfg.sources` (built if missing)."""
    if cfg.path is not None:
        return open_dataset(cfg.path, cfg)
    sources = resolve_sources(cfg.sources)
    tokenizer = load_tokenizer(cfg.tokenizer, sources=sources, cache_dir=cfg.cache_dir, text_field=cfg.text_field,
                               on_bad_record=cfg.on_bad_record)
    recipe = {
        "format": FORMAT,
        "sources": [[s.name, s.fingerprint] for s in sources],
        "tokenizer": tokenizer.fingerprint,
        "seq_len": cfg.seq_len,
        "val_fraction": cfg.val_fraction,
        "shard_size_mb": cfg.shard_size_mb,
        "text_field": cfg.text_field,
        "on_bad_record": cfg.on_bad_record,
    }
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    final = Path(cfg.cache_dir).expanduser() / "datasets" / key

    def build(tmp: Path) -> None:
        log.info("rank %d/%d: building dataset %s from %s", rank, world_size, key, ", ".join(cfg.sources))
        build_shards(sources, tokenizer, tmp, seq_len=cfg.seq_len, val_fraction=cfg.val_fraction,
                     shard_size_mb=cfg.shard_size_mb, progress=rank == 0, text_field=cfg.text_field,
                     on_bad_record=cfg.on_bad_record)

    build_once(final, build, what=f"dataset {key} (rank {rank}/{world_size})")
    return open_dataset(final, cfg)
