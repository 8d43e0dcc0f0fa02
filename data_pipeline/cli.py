"""Command line: `ebt data build SRC... --out DIR` and `ebt data verify DIR`.

`add_data_subcommand(subparsers)` registers `data` on the main `ebt` parser; every leaf parser sets
`func`, a callable taking the parsed namespace and returning an exit code. `python -m
data_pipeline build ...` runs the same commands without the `ebt` wrapper.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import List, Optional

from data_pipeline.config import DataConfig, default_cache_dir

# The commands import the pipeline (and torch) when they run, not when the parser is built.

FLAGS = {"sources": "SRC", "tokenizer": "--tokenizer", "seq_len": "--seq-len", "val_fraction": "--val-fraction",
         "shard_size_mb": "--shard-size-mb", "cache_dir": "--cache-dir", "text_field": "--text-field",
         "on_bad_record": "--on-bad-record"}


def _cli_error(exc: Exception) -> str:
    """A config error reworded with the flag that sets the key (`data.seq_len:` -> `--seq-len:`)."""
    message = str(exc)
    for key, flag in FLAGS.items():
        if message.startswith(f"data.{key}:"):
            return flag + message[len(f"data.{key}"):]
    return message


def _build(args: argparse.Namespace) -> int:
    from data_pipeline.build import build_shards
    from data_pipeline.manifest import SPLITS
    from data_pipeline.sources import resolve_sources
    from data_pipeline.tokenizer import load_tokenizer

    given = {key: getattr(args, key)
             for key in ("tokenizer", "seq_len", "val_fraction", "shard_size_mb", "text_field", "on_bad_record")}
    try:
        cfg = DataConfig(sources=list(args.sources), cache_dir=args.cache_dir,
                         **{key: value for key, value in given.items() if value is not None})
        if args.workers < 0:
            raise ValueError(f"--workers: must be >= 0, got {args.workers}")
        start = time.monotonic()
        sources = resolve_sources(cfg.sources)
        tokenizer = load_tokenizer(cfg.tokenizer, sources=sources, cache_dir=cfg.cache_dir, text_field=cfg.text_field,
                                   on_bad_record=cfg.on_bad_record)
        manifest = build_shards(sources, tokenizer, Path(args.out), seq_len=cfg.seq_len, val_fraction=cfg.val_fraction,
                                shard_size_mb=cfg.shard_size_mb, workers=args.workers, ray_address=args.ray_address,
                                progress=not args.quiet, text_field=cfg.text_field, on_bad_record=cfg.on_bad_record)
    except (ValueError, FileExistsError, RuntimeError, OSError) as exc:
        print(f"ebt data build: {_cli_error(exc)}", file=sys.stderr)
        return 2
    seconds = time.monotonic() - start
    tokens = sum(s["tokens"] for s in manifest.sources)
    print(f"wrote {args.out}: " + ", ".join(
        f"{split} {manifest.num_samples(split)} samples in {len(manifest.shards(split))} shards" for split in SPLITS))
    print(f"{tokens} tokens ({tokens / seconds:,.0f} tokens/s incl. tokenizer), vocab {tokenizer.vocab_size} "
          f"(tokenizer {tokenizer.fingerprint}), seq_len {manifest.seq_len}, manifest {manifest.fingerprint}")
    bad = sum(s.get("bad_records", 0) for s in manifest.sources)
    if bad:
        print(f"skipped {bad} bad records (--on-bad-record skip; counted per source in manifest.json)")
    return 0


def _verify(args: argparse.Namespace) -> int:
    """The scrub: every shard read whole, every member checked, and its sha256 against the manifest."""
    from data_pipeline.manifest import MANIFEST_FILE, SPLITS, parse_manifest
    from data_pipeline.prepare import storage_for
    from data_pipeline.shards import ShardError, check_size, verify_shard_bytes

    try:
        prepared_cfg = DataConfig(remote_retries=args.retries)
        storage = storage_for(args.dir, prepared_cfg)
        try:
            text = storage.read(MANIFEST_FILE).decode("utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"data.path: {args.dir} has no {MANIFEST_FILE}") from None
        manifest = parse_manifest(text, storage.where(MANIFEST_FILE))
    except (ValueError, OSError) as exc:
        print(f"ebt data verify: {exc}", file=sys.stderr)
        return 2
    damaged = 0
    for split in SPLITS:
        for info in manifest.shards(split):
            where = storage.where(info.name)
            try:
                check_size(where, storage.size(info.name), samples=info.samples, sample_len=manifest.sample_len,
                           dtype=manifest.dtype)
                verify_shard_bytes(storage.read(info.name), where, samples=info.samples, sample_len=manifest.sample_len,
                                   dtype=manifest.dtype, sha256=info.sha256, vocab_size=manifest.vocab_size)
            except ShardError as err:
                damaged += 1
                print(err)
            except OSError as err:
                print(f"ebt data verify: {err}", file=sys.stderr)
                return 2
    total = sum(len(manifest.shards(s)) for s in SPLITS)
    print(f"{args.dir}: {total - damaged} of {total} shards intact, {storage.bytes_read:,} bytes checked "
          f"(manifest {manifest.fingerprint})")
    return 1 if damaged else 0


def _add_commands(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="data_command", required=True, metavar="{build,verify}")
    build = commands.add_parser("build", help="tokenize text into webdataset shards + manifest.json",
                                description="Tokenize SRC (shakespeare, pydoc, text/JSONL/Parquet files or folders), pack into "
                                            "samples of seq_len + 1 tokens and write shards + manifest.json to DIR.")
    build.add_argument("sources", nargs="+", metavar="SRC",
                       help="shakespeare | pydoc | a file or folder (.jsonl[.gz|.zst], .parquet, or text)")
    build.add_argument("--out", required=True, metavar="DIR", help="output directory (must not hold a dataset)")
    build.add_argument("--workers", type=int, default=0, metavar="N",
                       help="Ray workers (0: this process only; N: a private local Ray with N CPUs, or at most "
                            "N tasks at a time on --ray-address)")
    build.add_argument("--ray-address", metavar="A", help="an existing Ray cluster (host:port) instead of a local one")
    build.add_argument("--tokenizer", metavar="T", help="bpe:N (trained on SRC), gpt2, or a tokenizer.json (default bpe:2048)")
    build.add_argument("--seq-len", type=int, metavar="N", help="tokens per sample seen by the model (default 128)")
    build.add_argument("--val-fraction", type=float, metavar="F", help="held-out fraction per source (default 0.02)")
    build.add_argument("--shard-size-mb", type=float, metavar="M", help="target shard size in MiB (default 4)")
    build.add_argument("--text-field", metavar="F", help="JSON field / Parquet column holding the text (default text)")
    build.add_argument("--on-bad-record", choices=("error", "skip"), help="a bad JSONL line or Parquet value: stop "
                       "naming it (default), or count and skip it")
    build.add_argument("--cache-dir", default=default_cache_dir(), metavar="D", help="where trained tokenizers are cached")
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    build.set_defaults(func=_build)
    verify = commands.add_parser("verify", help="scrub: check every shard of a directory or URL against its manifest",
                                 description="Reads every shard whole and checks each member and the shard's sha256 "
                                             "against manifest.json (readers check members only). Exit 1 if any "
                                             "shard is damaged, one line each.")
    verify.add_argument("dir", metavar="DIR", help="a dataset folder, an http(s):// URL or an fsspec URL")
    verify.add_argument("--retries", type=int, default=5, metavar="N", help="retries per remote read (default 5)")
    verify.set_defaults(func=_verify)


def add_data_subcommand(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Register `data` (with `build` and `verify`) on the `ebt` parser's subparsers."""
    parser = subparsers.add_parser("data", help="build and check tokenized shard datasets")
    _add_commands(parser)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """`python -m data_pipeline {build,verify} ...`"""
    parser = argparse.ArgumentParser(prog="python -m data_pipeline", description=__doc__.splitlines()[0])
    _add_commands(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)
