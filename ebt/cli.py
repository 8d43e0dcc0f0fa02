"""The `ebt` command line (also `python -m pretrain` and `python -m ebt`).

The parser is assembled from each package's registration function (`pretrain.cli`,
`pretrain.inference_cli`, `data_pipeline.cli`, `launchers.cli`); building it imports no torch,
so `ebt --help` is fast: each command imports what it needs when it runs. Every command gets
the same logging (ebt.log). User errors are one line on stderr and exit code 2; set
EBT_TRACEBACK=1 to see the full traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    from data_pipeline.cli import add_data_subcommand
    from launchers.cli import add_launch_subcommand
    from pretrain.cli import add_pretrain_subcommands
    from pretrain.inference_cli import add_inference_subcommands

    parser = argparse.ArgumentParser(prog="ebt", description="Energy-Based Transformer pretraining.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_pretrain_subcommands(sub)
    add_data_subcommand(sub)
    add_inference_subcommands(sub)
    add_launch_subcommand(sub)
    return parser


def _user_errors() -> tuple:
    from data_pipeline import ShardError
    from pretrain.checkpoint import CheckpointError
    from pretrain.config import ConfigError
    from pretrain.export import ExportError
    from pretrain.trainer import NonFiniteError

    return (ConfigError, CheckpointError, ExportError, NonFiniteError, ShardError, ValueError, OSError)


def main(argv: Optional[List[str]] = None) -> int:
    from launchers.preemption import EXIT_PREEMPTED, Preempted, install_from_env

    from .log import setup_logging

    install_from_env()  # before torch is imported: a requeued job can be signalled at once
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        setup_logging()
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("ebt: interrupted", file=sys.stderr)
        return 130
    except Preempted as err:
        print(f"ebt {args.command}: {err}", file=sys.stderr)
        return EXIT_PREEMPTED
    except _user_errors() as err:
        if os.environ.get("EBT_TRACEBACK"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"ebt {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
