"""Running a function on N local ranks (forked, gloo, 127.0.0.1) and counting the collectives
it makes: the plumbing of the multi-process tests and benchmarks. Imports nothing outside
`parallel`; the parity harness that compares layouts with one process lives in
tests/distributed/parity.py.
"""
from __future__ import annotations

import contextlib
import functools
import os
import socket
import traceback
from collections import Counter
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


# -- launching ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world_size: int, port: int, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
    )
    # Ranks share two cores: one thread each avoids oversubscription (and is deterministic).
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(*args)
    except Exception:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args: Any) -> None:
    """Runs fn(*args) on `world_size` forked gloo ranks; raises if any rank raises."""
    # fork: ranks inherit the imported torch instead of paying its import again.
    mp.start_processes(_entry, args=(fn, world_size, free_port(), args), nprocs=world_size, start_method="fork")


_COLLECTIVES = (
    "all_reduce", "all_reduce_coalesced", "reduce", "reduce_scatter", "reduce_scatter_tensor",
    "all_gather", "all_gather_into_tensor", "broadcast",
)


@contextlib.contextmanager
def count_collectives() -> Iterator[Counter]:
    """Counts torch.distributed collective calls (ours and DeepSpeed's, which call through
    the same module attributes) made inside the block, by name."""
    counts: Counter = Counter()
    originals = {name: getattr(dist, name) for name in _COLLECTIVES if hasattr(dist, name)}

    def counting(name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        return run

    for name, fn in originals.items():
        setattr(dist, name, counting(name, fn))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
