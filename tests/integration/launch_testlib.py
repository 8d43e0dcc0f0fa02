"""Shared pieces of the launcher integration tests (tests/integration/test_launch_*.py).

The reference: the tiny experiment of configs/launch/test_tiny_2x1.yaml launched on this machine
with torchrun (`ebt launch local`, 1 node x NODES processes: the same world size as the
NODES-node x 1-process Slurm and Ray layouts; NODES is 2, see `_nodes`). Its per-step losses and final weights are what the Slurm and Ray
runs must reproduce. It is computed once per pytest session and shared through the session's
base temp folder.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest

REPO = Path(__file__).resolve().parents[2]
LAYOUT = "test_tiny_2x1"
MAX_STEPS = 40
"""train.max_steps of that launch config (the tests interrupt runs mid-way)."""


def ebt(*args: str, env: Optional[Dict[str, str]] = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m pretrain ARGS` (the `ebt` CLI) with this interpreter's bin/ first on PATH."""
    full_env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                **(env or {})}
    return subprocess.run([sys.executable, "-m", "pretrain", *args], capture_output=True, text=True,
                          env=full_env, cwd=REPO, timeout=timeout)


def multi_rank_refusal() -> Optional[str]:
    """Why the trainer cannot run 2 ranks yet (the distributed-training issue), or None."""
    from pretrain.config import ConfigError, load_config

    try:
        load_config(["test_tiny"], ["parallel.dp=2"])
    except ConfigError as err:
        return str(err)
    return None


def _nodes() -> int:
    """2 (the acceptance layout) unless EBT_LAUNCH_TEST_NODES says otherwise, or the trainer
    cannot run 2 ranks yet: then 1, so the launch paths (submission, placement, preemption,
    requeue, worker kill, resume) are still exercised for real, with a warning saying so."""
    if "EBT_LAUNCH_TEST_NODES" in os.environ:
        return int(os.environ["EBT_LAUNCH_TEST_NODES"])
    reason = multi_rank_refusal()
    if reason is None:
        return 2
    warnings.warn(f"launcher integration tests run 1 rank per job: the trainer refuses 2 ranks ({reason})")
    return 1


NODES = _nodes()
"""Nodes of the Slurm/Ray runs (1 process each) = processes of the torchrun reference."""


def require_multi_rank() -> None:
    reason = multi_rank_refusal() if NODES > 1 else None
    if reason is not None:
        pytest.skip(f"EBT_LAUNCH_TEST_NODES={NODES} but the trainer refuses several ranks: {reason}")


def losses(run_dir: Path) -> List[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in sorted(records, key=lambda r: r["step"])]


def final_checkpoint(run_dir: Path) -> Path:
    path = run_dir / "checkpoints" / f"step_{MAX_STEPS:08d}"
    assert (path / "metadata.json").is_file(), f"no final checkpoint in {run_dir}"
    return path


def weights(run_dir: Path) -> Dict[str, "object"]:
    """Every tensor of every safetensors file of the final checkpoint, keyed by file/name (the
    layout of a checkpoint may be one file or one per rank: compare whatever is there)."""
    from safetensors.torch import load_file

    ckpt = final_checkpoint(run_dir)
    out = {}
    for path in sorted(ckpt.rglob("*.safetensors")):
        for name, tensor in load_file(str(path)).items():
            out[f"{path.relative_to(ckpt)}/{name}"] = tensor
    assert out, f"no safetensors in {ckpt}"
    return out


def assert_same_weights(run_dir: Path, reference: Path) -> None:
    import torch

    got, want = weights(run_dir), weights(reference)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), f"{key} differs from the uninterrupted run"


def reference_run(base: Path) -> Path:
    """The uninterrupted torchrun run (computed once per session)."""
    run_dir = base / "launch-reference"
    if (run_dir / "summary.json").is_file():
        return run_dir
    proc = ebt("launch", "local", LAYOUT, "nodes=1", f"procs_per_node={NODES}", f"cpus_per_node={NODES}",
               f"run_dir={run_dir}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(losses(run_dir)) == MAX_STEPS
    return run_dir


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def resumed_steps(log_text: str) -> List[int]:
    """Steps the run resumed from, from the trainer's `resuming from ... (step N)` lines."""
    import re

    return [int(m) for m in re.findall(r"resuming from \S+ \(step (\d+)\)", log_text)]
