"""`ebt launch local`: the run's processes on this machine, through torchrun.

This module owns the torchrun command line and the environment every rank gets from any
launcher (`rank_environment`). torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT and starts `python -m pretrain pretrain ...`: the same entry point the Slurm and
Ray launchers end in.
"""
from __future__ import annotations

import os
import shlex
import subprocess
from typing import Dict, List

from .config import LaunchPlan
from .preemption import ENV_VAR as PREEMPT_ENV

PREEMPT_SIGNALS = "USR1"
"""The signal every launcher treats as "checkpoint and exit": Slurm's `--signal` default
choice, and one that nothing else sends to a training process."""
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
"""Signals torchrun forwards to its workers; USR1 is not among its defaults, and unhandled it
would kill torchrun itself (and with it the workers, without a checkpoint)."""


def rank_environment(plan: LaunchPlan) -> Dict[str, str]:
    """Variables every rank gets on top of the launcher's own (the config's `env` wins)."""
    env = {PREEMPT_ENV: PREEMPT_SIGNALS, "PYTHONUNBUFFERED": "1"}
    threads = plan.launch.threads_per_proc()
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    env.update({str(k): str(v) for k, v in plan.launch.env.items()})
    return env


def torchrun_args(plan: LaunchPlan, nnodes: str, rendezvous: List[str]) -> List[str]:
    """`python -m torch.distributed.run ... -m pretrain pretrain ...` with the given node count
    and rendezvous options (local: standalone; Slurm: c10d on the first node)."""
    lc = plan.launch
    return [
        lc.interpreter, "-m", "torch.distributed.run",
        f"--nnodes={nnodes}", f"--nproc-per-node={lc.num_procs_per_node}",
        *rendezvous,
        "--max-restarts=0",  # restarts belong to the scheduler (requeue) and resume from run_dir
        f"--signals-to-handle={TORCHRUN_SIGNALS}",
        "-m", "pretrain", *plan.pretrain_args,
    ]


def local_command(plan: LaunchPlan) -> List[str]:
    return torchrun_args(plan, "1", ["--standalone"])


def describe(plan: LaunchPlan) -> str:
    """The exact shell command `ebt launch local` runs."""
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in rank_environment(plan).items())
    return f"{env} {shlex.join(local_command(plan))}"


def launch_local(plan: LaunchPlan, dry_run: bool = False) -> int:
    """Runs torchrun in the foreground; returns its exit code."""
    if dry_run:
        print(describe(plan))
        return 0
    lc = plan.launch
    print(f"ebt launch local: {lc.world_size} process(es) on this machine; run folder {plan.run_dir}", flush=True)
    env = {**os.environ, **rank_environment(plan)}
    return subprocess.call(local_command(plan), env=env)
