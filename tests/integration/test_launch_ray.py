"""`ebt launch ray` against a real 2-node Ray cluster on loopback (scripts/cluster/ray_up.sh).

The tiny experiment runs as 2 Ray Train workers, one per node (STRICT_SPREAD). Mid-run, the
process of the last rank is killed with SIGKILL (a real crash, no chance to clean up); Ray restarts
the worker group, the entry point resumes from the run folder's latest checkpoint, and the run
ends with the same final weights (and per-step losses) as the uninterrupted torchrun run.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch_testlib import (
    LAYOUT, MAX_STEPS, NODES, REPO, assert_same_weights, losses, reference_run, require_multi_rank, resumed_steps,
    wait_for,
)

pytestmark = pytest.mark.integration
pytest.importorskip("ray.train", reason="Ray is in the `cluster` extra (pip install 'ebt-pretrain[cluster]')")


@pytest.fixture(scope="module")
def ray_cluster():
    """A running 2-node Ray (head 127.0.0.2, worker 127.0.0.3); yields its client environment."""
    require_multi_rank()
    cluster_dir = f"/tmp/ebt-ray-test-{os.getpid()}"  # short: Ray's socket paths must fit 107 bytes
    env = {"RAY_LOCAL_DIR": cluster_dir, "RAY_LOCAL_PYTHON": sys.executable, "RAY_LOCAL_WORKERS": "1",
           "RAY_LOCAL_CPUS": "1", "RAY_LOCAL_PORT": "26379"}
    up = subprocess.run(["bash", str(REPO / "scripts/cluster/ray_up.sh")], env={**os.environ, **env},
                        capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        yield {"RAY_ADDRESS": "127.0.0.2:26379", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    finally:
        subprocess.run(["bash", str(REPO / "scripts/cluster/ray_down.sh"), "--purge"], env={**os.environ, **env},
                       capture_output=True, text=True, timeout=300)


def test_killed_worker_resumes_from_checkpoint_with_same_final_weights(ray_cluster, tmp_path, tmp_path_factory):
    reference = reference_run(tmp_path_factory.getbasetemp())
    run_dir = tmp_path / "run"
    log = tmp_path / "launch.log"
    env = {**os.environ, **ray_cluster, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pretrain", "launch", "ray", LAYOUT, f"nodes={NODES}", f"run_dir={run_dir}",
             f"ray.address={ray_cluster['RAY_ADDRESS']}"],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        try:
            wait_for(lambda: (run_dir / "checkpoints" / "step_00000004" / "metadata.json").is_file(), 300,
                     "the first checkpoint")
            pid = int((run_dir / "launch" / f"ray-rank{NODES - 1}.pid").read_text())
            os.kill(pid, signal.SIGKILL)
            killed_at = time.time()
            code = proc.wait(timeout=400)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert code == 0, text[-5000:]
    resumed = resumed_steps(text)
    assert resumed and 4 <= resumed[0] < MAX_STEPS, f"no mid-run resume: {resumed}\n{text[-5000:]}"
    assert (run_dir / "launch" / f"ray-rank{NODES - 1}.pid").read_text().strip() != str(pid)  # a new worker process
    assert time.time() - killed_at < 400
    assert_same_weights(run_dir, reference)
    assert losses(run_dir) == losses(reference)
