"""Exact resume, as a user would hit it: real `python -m pretrain` processes killed with
SIGKILL (at a random step, and in the middle of writing a checkpoint), then restarted on the
same run_dir. The restarted run must log the same losses and end with bitwise-identical
weights and optimizer state as an uninterrupted run."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretrain.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from pretrain.config import load_config
from pretrain.model import build_model
from pretrain.trainer import build_optimizer

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS = 14
# Slightly larger than test_tiny so a step lasts long enough to be interrupted.
OVERRIDES = [
    f"train.max_steps={MAX_STEPS}", "train.checkpoint_every=3", "train.keep_last_k=2", "train.log_every=1",
    "train.eval_every=0", "train.global_batch_size=8", "model.dim=64", "model.num_layers=2",
    "model.max_seq_len=32", "data.seq_len=32",
]


def command(run_dir: Path, cache_dir: Path) -> list:
    return [sys.executable, "-m", "pretrain", "pretrain", "test_tiny", f"run_dir={run_dir}",
            f"data.cache_dir={cache_dir}", *OVERRIDES]


def run_to_end(run_dir: Path, cache_dir: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command(run_dir, cache_dir), cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def losses(run_dir: Path) -> dict:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out[record["step"]] = record["loss"]
    return out


def final_state(run_dir: Path):
    path = latest_checkpoint(run_dir)
    assert path is not None and path.name == f"step_{MAX_STEPS:08d}"
    return (load_file(str(path / "model" / "model-tp0-of-1.safetensors")),
            load_file(str(path / "model" / "optim-tp0-of-1.safetensors")),
            torch.load(path / "trainer_state.pt", weights_only=True))


def assert_identical(a: Path, b: Path) -> None:
    assert losses(a) == losses(b)  # every step's loss, bit for bit (JSON floats round-trip exactly)
    (wa, oa, sa), (wb, ob, sb) = final_state(a), final_state(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    assert oa.keys() == ob.keys() and oa  # AdamW moments by parameter name
    for name in oa:
        assert torch.equal(oa[name], ob[name]), name
    assert sa.keys() == sb.keys()  # step, counters, RNG state, replay buffer
    for key in sa:
        if isinstance(sa[key], torch.Tensor):
            assert torch.equal(sa[key], sb[key]), key
        else:
            assert sa[key] == sb[key], key


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("resume_cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir) -> Path:
    run = tmp_path_factory.mktemp("reference") / "run"
    proc = run_to_end(run, cache_dir)
    assert proc.returncode == 0, proc.stderr
    assert sorted(losses(run)) == list(range(1, MAX_STEPS + 1))
    return run


def test_sigkill_at_a_random_step_then_resume_is_exact(tmp_path: Path, cache_dir: Path, reference: Path):
    run = tmp_path / "run"
    kill_after = random.Random().randint(4, MAX_STEPS - 2)
    proc = subprocess.Popen(command(run, cache_dir), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= kill_after:
            break
        time.sleep(0.002)
    assert proc.poll() is None, f"the run ended before step {kill_after}: {proc.stderr.read()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    steps_before = [s for s, _ in list_checkpoints(run)]
    assert steps_before and steps_before[-1] < MAX_STEPS, f"killed after step {kill_after}: {steps_before}"

    resumed = run_to_end(run, cache_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from" in resumed.stdout
    assert_identical(run, reference)


def test_sigkill_while_writing_a_checkpoint_leaves_a_loadable_latest(tmp_path: Path, cache_dir: Path, reference: Path):
    run = tmp_path / "run"
    proc = run_to_end(run, cache_dir, env={"EBT_CHECKPOINT_FAULT": "kill@9"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # step 9 was being written: only its temporary folder exists; the latest checkpoint is step 6
    assert [s for s, _ in list_checkpoints(run)] == [3, 6]
    assert list((run / "checkpoints").glob(".tmp-step_00000009-*"))
    latest = latest_checkpoint(run)
    cfg = load_config(["test_tiny"], [f"run_dir={run}", f"data.cache_dir={cache_dir}", *OVERRIDES,
                                      f"model.vocab_size={json.loads((latest / 'metadata.json').read_text())['config']['model']['vocab_size']}"])
    model = build_model(cfg.model)
    meta, state = load_checkpoint(latest, model=model, optimizer=build_optimizer(model, cfg))
    assert meta["step"] == 6 and state["step"] == 6

    resumed = run_to_end(run, cache_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert_identical(run, reference)
