"""The `ebt` command line (also `python -m pretrain`): `pretrain`, `plot`, and `data` (registered
by data_pipeline). User errors are one line on stderr and exit code 2; set EBT_TRACEBACK=1 to
see the full traceback."""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence

EXIT_USAGE = 2


def _split_items(items: Sequence[str]):
    configs = [i for i in items if "=" not in i]
    overrides = [i for i in items if "=" in i]
    return configs, overrides


def cmd_pretrain(args: argparse.Namespace) -> int:
    from .config import load_config, to_yaml
    from .trainer import train

    configs, overrides = _split_items(args.items)
    cfg = load_config(configs, overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    summary = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    ev = summary.get("eval") or {}
    line = f"done: {summary['run_dir']} at step {summary['step']}"
    if "val_ce" in ev:
        line += f", val CE {ev['val_ce']:.4f} (unigram entropy {ev['unigram_entropy']:.4f})"
    if "val_ce_per_step" in ev:
        line += (f", CE after thinking step 1: {ev['val_ce_first_step']:.4f}, after step {ev['eval_steps']}:"
                 f" {ev['val_ce_last_step']:.4f}")
    print(line, flush=True)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .plot import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ebt", description="Energy-Based Transformer pretraining.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "pretrain",
        help="train a model (EBT or Transformer++) from a config",
        description="Train from the default experiment, or from CONFIG (a YAML path or the name of a file in "
        "configs/experiments/), with key=value overrides. A run_dir holding checkpoints is resumed.",
    )
    p.add_argument("items", nargs="*", metavar="CONFIG | key=value", help="config files/names, then overrides")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("plot", help="write PNG plots of a run", description="Writes training curves and energy/CE "
                       "per thinking step of RUN_DIR as PNG files (into RUN_DIR/plots by default).")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/plots)")
    p.set_defaults(func=cmd_plot)

    from data_pipeline.cli import add_data_subcommand

    add_data_subcommand(sub)
    from .inference_cli import add_inference_subcommands

    add_inference_subcommands(sub)
    from launchers.cli import add_launch_subcommand

    add_launch_subcommand(sub)
    from .evaluate import add_eval_subcommand; add_eval_subcommand(sub)  # noqa: E702 (the lead moves this to ebt/cli.py)
    from .sweep import add_sweep_subcommand; add_sweep_subcommand(sub)  # noqa: E702 (the lead moves this to ebt/cli.py)
    return parser


def _user_errors() -> tuple:
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .export import ExportError
    from .trainer import NonFiniteError
    from data_pipeline import ShardError

    return (ConfigError, CheckpointError, ExportError, NonFiniteError, ShardError, ValueError, OSError)


def main(argv: Optional[List[str]] = None) -> int:
    from launchers.preemption import EXIT_PREEMPTED, Preempted, install_from_env

    install_from_env()  # before torch is imported: a requeued job can be signalled at once
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
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

