"""The trainer under torchrun: a tp=2 run and a pp=2 run of the default experiment reproduce the
single-process run, a tp=2 checkpoint resumes in one process, and exports of the same weights from a single-process and a tp=2
checkpoint are identical. Real processes (torchrun, gloo on CPU), the tiny experiment. (dp and
ZeRO, resume across dp/ZeRO layouts: tests/distributed/test_trainer_one_road.py.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretrain.checkpoint import latest_checkpoint
from pretrain.export import export_checkpoint

pytestmark = pytest.mark.distributed
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def run(tmp: Path, name: str, *overrides: str, nproc: int = 1, max_steps: int = 4, experiment: str = "test_tiny",
        cache: Path | None = None) -> Path:
    run_dir = tmp / name
    args = ["-m", "pretrain", "pretrain", experiment, f"run_dir={run_dir}", f"data.cache_dir={cache or tmp / 'cache'}",
            f"train.max_steps={max_steps}", "train.checkpoint_every=2", *overrides]
    cmd = [TORCHRUN, "--standalone", f"--nproc-per-node={nproc}", *args] if nproc > 1 else [sys.executable, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


def losses(run_dir: Path):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir: Path, tmp: Path):
    out = tmp / f"export-{run_dir.name}-{len(list(tmp.glob('export-*')))}"
    out = export_checkpoint(run_dir, out, log=lambda *_: None)
    return load_file(str(out / "model.safetensors")), out


def close(a: dict, b: dict, rel: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        scale = max(1.0, a[k].abs().max().item())
        assert (a[k] - b[k]).abs().max().item() <= rel * scale, k


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("layouts")


@pytest.fixture(scope="module")
def single(tmp) -> Path:
    return run(tmp, "single")


def test_tp2_under_torchrun_reproduces_the_single_process_run(tmp, single):
    tp2 = run(tmp, "tp2", "parallel.tp=2", nproc=2)
    a, b = losses(single), losses(tp2)
    assert len(a) == len(b) == 4
    assert all(abs(x - y) <= 1e-5 * max(1.0, abs(x)) for x, y in zip(a, b)), (a, b)
    close(weights(single, tmp)[0], weights(tp2, tmp)[0])
    meta = json.loads((latest_checkpoint(tp2) / "metadata.json").read_text())
    assert meta["layout"] == {"tp": 2, "dp": 1, "pp": 1, "zero_stage": 0} and meta["world_size"] == 2
    env = json.loads((tp2 / "env.json").read_text())  # the real world, not a hard-coded 1
    assert env["world_size"] == 2 and env["layout"]["tp"] == 2 and len(env["rank_hosts"]) == 2
    assert env["backend"] == "gloo" and env["hosts"]


def test_a_tp2_checkpoint_resumes_in_one_process_exactly(tmp, single):
    resumed = run(tmp, "tp2-then-single", "parallel.tp=2", nproc=2, max_steps=2)
    run_dir = run(tmp, "tp2-then-single", max_steps=4)  # same folder: resumes from step 2
    assert run_dir == resumed
    close(weights(single, tmp)[0], weights(resumed, tmp)[0])


def test_exports_of_the_same_weights_from_one_process_and_tp2_are_identical(tmp):
    # lr 1e-30: one optimizer step leaves the initial weights exactly (the update rounds away).
    a = run(tmp, "lr0-single", "optim.lr=1e-30", max_steps=1)
    b = run(tmp, "lr0-tp2", "optim.lr=1e-30", "parallel.tp=2", nproc=2, max_steps=1)
    wa, ea = weights(a, tmp)
    wb, eb = weights(b, tmp)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (ea / "model.safetensors").read_bytes() == (eb / "model.safetensors").read_bytes()


def test_default_experiment_at_pp2_under_torchrun_reproduces_the_single_process_losses(tmp, data_cache):
    # The default experiment (4xs body, S2 recipe with replay, Shakespeare), shortened.
    small = ["train.global_batch_size=8", "data.seq_len=32", "model.max_seq_len=32", "train.eval_every=0",
             "train.log_every=1"]
    a = run(tmp, "default-single", *small, max_steps=3, experiment="default", cache=data_cache)
    b = run(tmp, "default-pp2", *small, "parallel.pp=2", "parallel.pp_microbatches=2", nproc=2, max_steps=3,
            experiment="default", cache=data_cache)
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) == 3
    assert all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(la, lb)), (la, lb)
    meta = json.loads((latest_checkpoint(b) / "metadata.json").read_text())
    assert meta["layout"]["pp"] == 2 and len(list((latest_checkpoint(b) / "model").glob("model-pp*"))) == 2
