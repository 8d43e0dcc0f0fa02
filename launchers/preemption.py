"""Preemption: a scheduler's warning signal -> a checkpoint -> exit with `EXIT_PREEMPTED`.

This module owns the training side of preemption; the launchers own the other side (the
Slurm batch script forwards `--signal=B:USR1@N` to the ranks and requeues the job).

- `install_from_env()` runs first thing in the `ebt` CLI, before torch is imported: the
  launchers set `EBT_PREEMPT_SIGNALS=USR1` for every rank, and after a requeue the signal can
  arrive at once, when USR1's default action (terminate) would kill the rank without a
  checkpoint. Without the variable nothing is installed and a plain run is unchanged.
- The handler only records the signal. The trainer asks `stop_requested(device)` once per
  optimizer step. Ranks receive the signal at different moments, so the answer is an
  all-reduce (MAX) over the world: every rank stops after the same step, writes the same
  (collective) checkpoint and exits, instead of one rank leaving while the others wait in the
  next collective.
- `Preempted` carries the step; the CLI turns it into exit code `EXIT_PREEMPTED` (75,
  EX_TEMPFAIL: "try again later"), which the batch script reads as "requeue me".
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Any, Iterable, List, Optional

ENV_VAR = "EBT_PREEMPT_SIGNALS"
"""Comma-separated signal names (e.g. `USR1`) that mean "checkpoint and exit"."""
EXIT_PREEMPTED = 75

_received: List[int] = []
_installed: List[int] = []


class Preempted(Exception):
    """Training stopped at a step boundary on a preemption signal, after a checkpoint."""

    def __init__(self, step: int, checkpoint: Any = None) -> None:
        super().__init__(f"preempted at step {step}; checkpoint {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


def _record(signum: int, _frame: Any) -> None:
    _received.append(signum)


def install(names: Iterable[str]) -> List[int]:
    """Installs the recording handler for each named signal (`USR1`, `SIGUSR1`, `TERM`, ...).
    Outside the main thread (e.g. a Ray Train worker) nothing is installed: Python delivers
    signals to the main thread only, and `signal.signal` refuses other threads."""
    if threading.current_thread() is not threading.main_thread():
        return []
    numbers = []
    for name in names:
        name = name.strip().upper()
        if not name:
            continue
        sig = getattr(signal, name if name.startswith("SIG") else f"SIG{name}", None)
        if not isinstance(sig, signal.Signals):
            raise ValueError(f"{ENV_VAR}: unknown signal {name!r}")
        signal.signal(sig, _record)
        numbers.append(int(sig))
    _installed.extend(numbers)
    return numbers


def install_from_env() -> List[int]:
    """Installs handlers for the signals named in $EBT_PREEMPT_SIGNALS (none if unset)."""
    return install(os.environ.get(ENV_VAR, "").split(","))


def requested() -> bool:
    """Whether this process has received a preemption signal."""
    return bool(_received)


def stop_requested(device: Optional[Any] = None) -> bool:
    """Whether any rank has received a preemption signal. Collective when a process group is
    initialised and handlers are installed (the launchers install them on every rank, so all
    ranks take the same branch); free otherwise."""
    if not _installed:
        return False
    flag = 1 if _received else 0
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if device is None or dist.get_backend() != "nccl":
            device = torch.device("cpu")
        t = torch.tensor([flag], dtype=torch.int32, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        flag = int(t.item())
    return bool(flag)


def reset() -> None:
    """Restores the default handlers and forgets received signals (tests run several
    trainings in one process)."""
    for signum in _installed:
        signal.signal(signum, signal.SIG_DFL)
    _installed.clear()
    _received.clear()


def preemption_callback():
    """The trainer callback the `ebt` entry point injects: after every optimizer step, if any
    rank was signalled, checkpoint (collectively) and raise `Preempted`."""
    from pretrain.callbacks import Callback

    class PreemptionCallback(Callback):
        def on_step_end(self, trainer, event) -> None:
            if stop_requested(trainer.device):
                path = trainer.save(reason="preempted")
                trainer.log(f"preempted: checkpoint {path}; exiting to be requeued")
                raise Preempted(trainer.step, path)

    return PreemptionCallback()
