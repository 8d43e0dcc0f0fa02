"""`ebt launch slurm` against a real Slurm: 2 emulated nodes on this machine (scripts/cluster/).

- A 2-node x 1-process job of the tiny experiment completes, in both script modes (torchrun
  per node with c10d rendezvous; one srun task per rank), with per-step losses and final
  weights equal to the same run launched locally with torchrun.
- Preemption: `scancel --batch --signal=USR1` mid-run (what `#SBATCH --signal=B:USR1@N` does
  before the time limit) -> the ranks checkpoint, the script requeues the job, the job resumes
  from the run folder and ends with the same final weights as the uninterrupted run.

The fixture installs Slurm and munge with apt-get when missing (root, as in CI) and stops
every daemon it started.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict

import pytest

from launch_testlib import (
    LAYOUT, MAX_STEPS, NODES, REPO, assert_same_weights, ebt, losses, reference_run, require_multi_rank,
    resumed_steps, wait_for,
)

pytestmark = pytest.mark.integration
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> Dict[str, str]:
    """A running 2-node Slurm; yields the environment its clients need."""
    if os.geteuid() != 0 and shutil.which("slurmd") is None:
        pytest.skip("a local Slurm needs root (slurmd, munged, apt-get) and this user is not root")
    if shutil.which("apt-get") is None and shutil.which("slurmd") is None:
        pytest.skip("Slurm is not installed and there is no apt-get to install it")
    require_multi_rank()
    # short, world-searchable path: munged checks every parent of its socket
    cluster_dir = f"/tmp/ebt-slurm-test-{os.getpid()}"
    env = {"SLURM_LOCAL_DIR": cluster_dir, "SLURM_LOCAL_NODES": "2", "SLURM_LOCAL_PORT": "16817",
           "SLURM_CONF": f"{cluster_dir}/etc/slurm.conf"}
    up = subprocess.run(["bash", str(REPO / "scripts/cluster/slurm_up.sh")], env={**os.environ, **env},
                        capture_output=True, text=True, timeout=600)
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        yield env
    finally:
        subprocess.run(["bash", str(REPO / "scripts/cluster/slurm_down.sh"), "--purge"], env={**os.environ, **env},
                       capture_output=True, text=True, timeout=300)


def _job_state(job_id: str, env: Dict[str, str]) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                         env={**os.environ, **env}).stdout
    match = re.search(r"JobState=(\w+)", out)
    return match.group(1) if match else "UNKNOWN"


def _submit(env: Dict[str, str], *overrides: str) -> tuple:
    proc = ebt("launch", "slurm", LAYOUT, f"nodes={NODES}", *overrides, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = re.search(r"submitted batch job (\d+)", proc.stdout).group(1)
    log = Path(re.search(r"log:\s+(\S+)", proc.stdout).group(1))
    return job_id, log


def _wait_done(job_id: str, env: Dict[str, str], log: Path, timeout: float = 300) -> str:
    wait_for(lambda: _job_state(job_id, env) in TERMINAL, timeout, f"job {job_id} to finish", interval=0.5)
    state = _job_state(job_id, env)
    assert state == "COMPLETED", f"job {job_id}: {state}\n" + (log.read_text()[-4000:] if log.exists() else "no log")
    return state


@pytest.mark.parametrize("mode", ["torchrun", "srun"])
def test_two_node_job_matches_local_torchrun(slurm, tmp_path, tmp_path_factory, mode):
    reference = reference_run(tmp_path_factory.getbasetemp())
    run_dir = tmp_path / "run"
    job_id, log = _submit(slurm, f"run_dir={run_dir}", f"slurm.mode={mode}")
    _wait_done(job_id, slurm, log)
    text = log.read_text()
    nodelist = "node[1-2]" if NODES == 2 else "node1"
    assert f"on {nodelist}," in text, text[-2000:]  # really placed on the emulated nodes
    assert losses(run_dir) == losses(reference)
    assert_same_weights(run_dir, reference)


def test_preemption_signal_checkpoints_requeues_and_resumes(slurm, tmp_path, tmp_path_factory):
    reference = reference_run(tmp_path_factory.getbasetemp())
    run_dir = tmp_path / "run"
    job_id, log = _submit(slurm, f"run_dir={run_dir}")
    wait_for(lambda: (run_dir / "checkpoints" / "step_00000004" / "metadata.json").is_file(), 240,
             "the first checkpoint")
    signal = subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], capture_output=True, text=True,
                            env={**os.environ, **slurm})
    assert signal.returncode == 0, signal.stderr
    _wait_done(job_id, slurm, log)
    text = log.read_text()
    assert "got USR1" in text and "requeueing job" in text, text[-4000:]
    assert "restart 1 on" in text, text[-4000:]
    resumed = resumed_steps(text)
    assert resumed and 4 <= resumed[0] < MAX_STEPS, f"no mid-run resume in the log: {resumed}\n{text[-4000:]}"
    assert_same_weights(run_dir, reference)
    assert losses(run_dir) == losses(reference)
