"""The one `logging` setup of every `ebt` command: INFO to stdout, and under torchrun (or any
launcher that sets WORLD_SIZE > 1) each line prefixed with the rank that wrote it.

The trainer's progress and evaluation lines go through the `pretrain.trainer` logger; the
data pipeline's messages through `data_pipeline.*`. Set EBT_LOG_LEVEL (DEBUG, WARNING, ...)
to change the level.
"""
from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATEFMT = "%H:%M:%S"


def rank_prefix() -> str:
    """`[rank R/W] ` in a multi-process run, else empty."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return f"[rank {os.environ.get('RANK', '0')}/{world}] " if world > 1 else ""


def setup_logging(level: str | None = None) -> None:
    """Configures the root logger once per process (a second call replaces the first)."""
    name = (level or os.environ.get("EBT_LOG_LEVEL") or "INFO").upper()
    numeric = logging.getLevelName(name)
    if not isinstance(numeric, int):
        raise ValueError(f"EBT_LOG_LEVEL: {name!r} is not a logging level (DEBUG, INFO, WARNING, ERROR)")
    handler = logging.StreamHandler(sys.stdout)  # the training log, beside `done:`; errors go to stderr
    handler.setFormatter(logging.Formatter(rank_prefix() + FORMAT, DATEFMT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    # Third-party chatter below WARNING is noise next to the training log.
    for noisy in ("urllib3", "filelock", "matplotlib", "PIL", "httpx", "wandb"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
