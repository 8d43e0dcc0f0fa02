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
from data_pipeline.build import build_shards
from data_pipeline.config import DataConfig
from data_pipeline.loader import ShardLoader, make_loader
from data_pipeline.manifest import Manifest, load_manifest
from data_pipeline.prepare import PreparedData, open_dataset, prepare_dataset
from data_pipeline.shards import ShardError
from data_pipeline.storage import RemoteReadError
from data_pipeline.tokenizer import TextTokenizer, load_tokenizer

__all__ = [
    "DataConfig", "Manifest", "PreparedData", "RemoteReadError", "ShardError", "ShardLoader", "TextTokenizer", "build_shards",
    "load_manifest", "load_tokenizer", "make_loader", "open_dataset", "prepare_dataset",
]
