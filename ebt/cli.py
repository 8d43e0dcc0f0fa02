"""`ebt COMMAND ...`: pretrain, plot, data, export, generate, serve, eval, sweep, launch (also `python -m ebt`
and `python -m pretrain`).

Each package registers its own subcommands (`add_*_subcommand(s)`); this module builds the
parser, gives every command the same logging (ebt.log), injects what only the top layer may
know (the launchers' preemption handling into the trainer), and turns user errors into one
line on stderr with exit code 2 (set EBT_TRACEBACK=1 for the full traceback). A preempted run
exits with EXIT_PREEMPTED (75). Building the parser imports no torch, so `ebt --help` is
fast: each command imports what it needs when it runs.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    from data_pipeline.cli import add_data_subcommand
    from launchers.cli import add_launch_subcommand, add_sweep_subcommand
    from pretrain.cli import add_pretrain_subcommands
    from pretrain.inference_cli import add_inference_subcommands
    from pretrain.research_cli import add_eval_subcommand

    parser = argparse.ArgumentParser(prog="ebt", description="Energy-Based Transformer pretraining.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_pretrain_subcommands(sub, callbacks=_top_layer_callbacks)
    add_data_subcommand(sub)
    add_inference_subcommands(sub)
    add_eval_subcommand(sub)
    add_sweep_subcommand(sub)
    add_launch_subcommand(sub)
    return parser


def _top_layer_callbacks() -> list:
    """Trainer callbacks the packages below cannot create themselves."""
    from launchers.preemption import preemption_callback

    return [preemption_callback()]


def _user_errors() -> tuple:
    from data_pipeline import ShardError
    from launchers.config import LaunchError
    from pretrain.callbacks import NonFiniteError
    from pretrain.checkpoint import CheckpointError
    from pretrain.config import ConfigError
    from pretrain.export import ExportError

    return (ConfigError, CheckpointError, ExportError, NonFiniteError, ShardError, LaunchError, ValueError, OSError)


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


if __name__ == "__main__":
    sys.exit(main())
