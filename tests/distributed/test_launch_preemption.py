"""The preemption decision is collective: 2 real gloo processes, only rank 1 receives USR1 (as
when a scheduler's signal reaches the ranks at different moments), and both ranks stop after the
same step, so neither is left waiting in a collective the other never joins."""
import json
import os
import signal
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from parallel.spawn import free_port

pytestmark = pytest.mark.distributed

WORLD_SIZE = 2
SIGNAL_AT = 3


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    from launchers import preemption

    preemption.install(["USR1"])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        stopped_at = None
        for step in range(1, 10):
            if rank == 1 and step == SIGNAL_AT:
                os.kill(os.getpid(), signal.SIGUSR1)
            if preemption.stop_requested():
                stopped_at = step
                break
        Path(out_dir, f"rank{rank}.json").write_text(
            json.dumps({"stopped_at": stopped_at, "received": preemption.requested()}))
    finally:
        dist.destroy_process_group()


def test_all_ranks_stop_after_the_same_step(tmp_path):
    mp.spawn(_rank_main, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    assert [r["stopped_at"] for r in results] == [SIGNAL_AT, SIGNAL_AT]
    assert [r["received"] for r in results] == [False, True]  # rank 0 stops on rank 1's signal
