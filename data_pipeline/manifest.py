"""`manifest.json`: what a shard directory holds, and the fingerprint that identifies it.

The manifest lists, per split, every shard (name, source, sample count, size, sha256) in a fixed
order, plus the tokenizer's fingerprint, the packing settings and per-source statistics. It holds
no timestamps, hosts or worker counts, so the same inputs always give the same bytes. Its
fingerprint (a hash of its canonical JSON) is what a checkpoint's data cursor is tied to; it is
written last by the builder, so a directory with a manifest is complete.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List

MANIFEST_FILE = "manifest.json"
FORMAT = "ebt-shards/1"
SPLITS = ("train", "val")


@dataclass(frozen=True)
class ShardInfo:
    name: str
    """File name inside the dataset directory, `<split>-s<source>-<index>.tar`."""
    source: int
    """Index into `Manifest.sources`."""
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    seq_len: int
    """Model sequence length; every sample holds seq_len + 1 tokens."""
    dtype: str
    """Numpy dtype string of the stored ids (`<u2` or `<u4`)."""
    tokenizer: Dict[str, Any]
    """fingerprint, origin, vocab_size, eos_id, file."""
    packing: Dict[str, Any]
    """How text became samples: eos placement, stride, val_fraction, shard_size_mb."""
    sources: List[Dict[str, Any]]
    """Per source: name, fingerprint, documents, tokens, train/val samples, dropped tail tokens."""
    splits: Dict[str, List[ShardInfo]]
    stats: Dict[str, Any] = field(default_factory=dict)
    """train_tokens and unigram_entropy (nats/token of the training split)."""

    @property
    def sample_len(self) -> int:
        return self.seq_len + 1

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer["vocab_size"])

    def shards(self, split: str) -> List[ShardInfo]:
        return self.splits.get(split, [])

    def num_samples(self, split: str) -> int:
        return sum(s.samples for s in self.shards(split))

    def _content(self) -> Dict[str, Any]:
        content = asdict(self)
        content["format"] = FORMAT
        return content

    @property
    def fingerprint(self) -> str:
        canonical = json.dumps(self._content(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def to_json(self) -> str:
        content = self._content()
        content["fingerprint"] = self.fingerprint
        return json.dumps(content, indent=1, sort_keys=True) + "\n"

    def save(self, directory: Path) -> Path:
        """Write `directory/manifest.json` atomically (write, then rename)."""
        path = Path(directory) / MANIFEST_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.to_json(), encoding="utf-8")
        tmp.replace(path)
        return path


def load_manifest(directory: Path) -> Manifest:
    """The manifest of a local shard directory; a missing, foreign or edited one is a one-line error."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        what = "does not exist" if not Path(directory).exists() else f"has no {MANIFEST_FILE}"
        raise FileNotFoundError(f"data.path: {directory} {what} (build one with `ebt data build SRC... --out DIR`)")
    return parse_manifest(path.read_text(encoding="utf-8"), str(path))


def parse_manifest(text: str, where: str) -> Manifest:
    """A manifest from its JSON text (`where` names the file or URL in messages)."""
    try:
        raw = json.loads(text)
        if raw.get("format") != FORMAT:
            raise ValueError(f"format {raw.get('format')!r} is not {FORMAT!r}")
        manifest = Manifest(
            seq_len=int(raw["seq_len"]),
            dtype=str(raw["dtype"]),
            tokenizer=dict(raw["tokenizer"]),
            packing=dict(raw["packing"]),
            sources=list(raw["sources"]),
            splits={k: [ShardInfo(**s) for s in v] for k, v in raw["splits"].items()},
            stats=dict(raw.get("stats", {})),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"data.path: {where} is not a valid manifest ({exc})") from None
    if raw.get("fingerprint") != manifest.fingerprint:
        raise ValueError(
            f"data.path: {where} was edited after it was built (fingerprint {raw.get('fingerprint')} "
            f"recorded, content hashes to {manifest.fingerprint}); rebuild it"
        )
    return manifest
