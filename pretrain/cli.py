"""The training subcommands of `ebt` (registered by ebt.cli): `pretrain` and `plot`. The
parser imports nothing heavy; each command imports what it runs."""
from __future__ import annotations

import argparse
import logging
import os
from typing import Callable, List, Sequence


def _split_items(items: Sequence[str]):
    configs = [i for i in items if "=" not in i]
    overrides = [i for i in items if "=" in i]
    return configs, overrides


def cmd_pretrain(args: argparse.Namespace, callbacks: Callable[[], List] = list) -> int:
    from .config import load_config, to_yaml
    from .trainer import train

    configs, overrides = _split_items(args.items)
    cfg = load_config(configs, overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    summary = train(cfg, log=logging.getLogger("pretrain.trainer").info, callbacks=callbacks())
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


def add_pretrain_subcommands(sub: "argparse._SubParsersAction", callbacks: Callable[[], List] = list) -> None:
    """Registers `pretrain` and `plot`; `callbacks()` gives extra trainer callbacks (the entry
    point passes the launchers' preemption handling)."""
    p = sub.add_parser(
        "pretrain",
        help="train a model (EBT or Transformer++) from a config",
        description="Train from the default experiment, or from CONFIG (a YAML path or the name of a file in "
        "configs/experiments/), with key=value overrides. Choose shipped configs by name: model=NAME "
        "(configs/model/), recipe=NAME (configs/recipe/), experiment=NAME. A run_dir holding checkpoints is resumed.",
    )
    p.add_argument("items", nargs="*", metavar="CONFIG | key=value", help="config files/names, then overrides")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=lambda args: cmd_pretrain(args, callbacks))

    p = sub.add_parser("plot", help="write PNG plots of a run", description="Writes training curves and energy/CE "
                       "per thinking step of RUN_DIR as PNG files (into RUN_DIR/plots by default).")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/plots)")
    p.set_defaults(func=cmd_plot)

