"""Text -> tokens -> webdataset shards -> batches, with an exactly resumable global order; shards
read in per-rank byte ranges from a local folder, an http(s) URL or an fsspec URL.

The trainer's contract:
    prepared = prepare_dataset(cfg.data, rank=rank, world_size=world_size)
    loader = make_loader(prepared, "train", global_batch_size=B, rank=rank, world_size=W,
                         seed=cfg.data.seed, num_workers=cfg.data.num_workers,
                         on_bad_shard=cfg.data.on_bad_shard)
    loader.load_state_dict(checkpoint["data"])   # on resume
    for tokens in loader: ...                    # LongTensor (B // W, seq_len + 1)
    checkpoint["data"] = loader.state_dict()     # {"consumed": int, "fingerprint": str, ...}
See docs/data.md.
"""
from __future__ import annotations

import importlib
from typing import Any

# Resolved on first use (PEP 562) so that `import data_pipeline.cli` (the `ebt` parser) does
# not import torch: `ebt --help` stays fast.
_EXPORTS = {
    "build_shards": "build", "DataConfig": "config", "ShardLoader": "loader", "make_loader": "loader",
    "Manifest": "manifest", "load_manifest": "manifest", "PreparedData": "prepare", "open_dataset": "prepare",
    "prepare_dataset": "prepare", "ShardError": "shards", "RemoteReadError": "storage", "TextTokenizer": "tokenizer", "load_tokenizer": "tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'data_pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"data_pipeline.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
