"""`ebt launch local|slurm|ray CONFIG [key=value ...] [--dry-run]`.

CONFIG is a launch config (a name in configs/launch/ or a YAML path); overrides of launch keys
(`nodes=4`, `slurm.partition=gpu`) change the placement, any other override
(`train.max_steps=100`) goes to the run config of every rank. Everything is validated before a
scheduler is touched; errors are one line (exit code 2).
"""
from __future__ import annotations

import argparse

from . import BACKENDS


def cmd_launch(args: argparse.Namespace) -> int:
    from .config import LaunchError, plan_launch  # imports torch: only when a launch runs

    configs = [i for i in args.items if "=" not in i]
    overrides = [i for i in args.items if "=" in i]
    if len(configs) > 1:
        raise LaunchError(f"one launch config at most, got {', '.join(configs)}; put the experiment in `experiment=`")
    plan = plan_launch(args.backend, configs[0] if configs else None, overrides)
    if args.backend == "local":
        from .local import launch_local

        return launch_local(plan, dry_run=args.dry_run)
    if args.backend == "slurm":
        from .slurm import launch_slurm

        return launch_slurm(plan, dry_run=args.dry_run)
    from .ray import launch_ray

    return launch_ray(plan, dry_run=args.dry_run)


def add_launch_subcommand(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Register `launch` on the `ebt` parser's subparsers."""
    p = subparsers.add_parser(
        "launch",
        help="run a training config on this machine (torchrun), a Slurm cluster or a Ray cluster",
        description="Places the ranks of one training run: `local` runs torchrun here, `slurm` writes and submits an "
        "sbatch script, `ray` runs Ray Train workers. CONFIG is a launch config (configs/launch/NAME.yaml or a "
        "path); key=value overrides of launch keys change the placement, other overrides go to the run config.",
    )
    p.add_argument("backend", choices=BACKENDS, metavar="{local,slurm,ray}")
    p.add_argument("items", nargs="*", metavar="CONFIG | key=value", help="launch config, then overrides")
    p.add_argument("--dry-run", action="store_true", help="print the exact command/script and submit nothing")
    p.set_defaults(func=cmd_launch)
    return p


def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import load_sweep, run_sweep, summarize_sweep

    sweep = load_sweep(args.sweep)
    if not args.summary_only:
        run_sweep(sweep, dry_run=args.dry_run)
    if not args.dry_run:
        summarize_sweep(sweep)
    return 0


def add_sweep_subcommand(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "sweep", help="a scaling study: a grid of runs and power-law fits of loss vs N, C, D",
        description="Trains (or submits via Slurm/Ray) every unfinished run of SWEEP.yaml's grid (sizes x token "
        "budgets x families), skipping finished ones, then fits power laws of validation loss against non-embedding "
        "parameters, training FLOPs and tokens per family, prints the exponents and the EBT/Transformer++ "
        "scaling-rate ratio with its uncertainty, and writes summary.json and scaling.png into out_dir.",
    )
    p.add_argument("sweep", metavar="SWEEP.yaml")
    p.add_argument("--dry-run", action="store_true", help="print what would run or be submitted; train nothing")
    p.add_argument("--summary-only", action="store_true", help="fit and plot the finished runs; train nothing")
    p.set_defaults(func=cmd_sweep)
    return p
