"""The `ebt` command line as a user meets it: real subprocesses, one-line errors (exit 2, no
traceback) that name the bad thing and leave the disk as it was."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def ebt(*args: str, cwd: Path = REPO, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    env.pop("EBT_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", "pretrain", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def snapshot(root: Path) -> dict:
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("ebt pretrain: error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def cache_dir(data_cache) -> Path:
    return data_cache


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, cache_dir) -> Path:
    """A finished tiny EBT run (6 steps, checkpoints at 4 and 6), made through the CLI."""
    run = tmp_path_factory.mktemp("cli") / "run"
    proc = ebt("pretrain", "test_tiny", f"run_dir={run}", f"data.cache_dir={cache_dir}")
    assert proc.returncode == 0, proc.stderr
    assert "done:" in proc.stdout and "val CE" in proc.stdout
    return run


def test_unknown_config_key(tmp_path: Path):
    proc = ebt("pretrain", "test_tiny", f"run_dir={tmp_path / 'run'}", "train.max_step=5")
    assert_one_line_error(proc, "'train.max_step'", "did you mean 'train.max_steps'")
    assert not (tmp_path / "run").exists()


def test_wrong_type(tmp_path: Path):
    proc = ebt("pretrain", "test_tiny", f"run_dir={tmp_path / 'run'}", "train.max_steps=many")
    assert_one_line_error(proc, "train.max_steps", "'many'")
    assert not (tmp_path / "run").exists()


def test_unknown_key_in_yaml(tmp_path: Path):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("defaults: [" + str(REPO / "configs/experiments/test_tiny.yaml") + "]\nmodel:\n  dimm: 8\n")
    proc = ebt("pretrain", str(cfg), f"run_dir={tmp_path / 'run'}")
    assert_one_line_error(proc, "exp.yaml", "'model.dimm'", "did you mean 'model.dim'")


def test_missing_data_path(tmp_path: Path, cache_dir: Path):
    before = snapshot(cache_dir)
    missing = tmp_path / "no_such_shards"
    proc = ebt("pretrain", "test_tiny", f"run_dir={tmp_path / 'run'}", f"data.path={missing}",
               f"data.cache_dir={cache_dir}")
    assert_one_line_error(proc, str(missing))
    assert not (tmp_path / "run").exists() and not missing.exists()
    assert snapshot(cache_dir) == before


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_checkpoint(tmp_path: Path, trained_run: Path, cache_dir: Path):
    run = _copy_run(trained_run, tmp_path / "run")
    model = run / "checkpoints" / "step_00000006" / "model" / "model-tp0-of-1.safetensors"
    model.write_bytes(model.read_bytes()[:100])
    before = snapshot(run)
    proc = ebt("pretrain", "test_tiny", f"run_dir={run}", "train.max_steps=8", f"data.cache_dir={cache_dir}")
    assert_one_line_error(proc, str(model), "truncated")
    assert snapshot(run) == before


def test_corrupt_checkpoint_metadata(tmp_path: Path, trained_run: Path, cache_dir: Path):
    run = _copy_run(trained_run, tmp_path / "run")
    meta = run / "checkpoints" / "step_00000006" / "metadata.json"
    meta.write_text(meta.read_text()[:40])
    before = snapshot(run)
    proc = ebt("pretrain", "test_tiny", f"run_dir={run}", "train.max_steps=8", f"data.cache_dir={cache_dir}")
    assert_one_line_error(proc, str(meta), "corrupt metadata")
    assert snapshot(run) == before


def test_checkpoint_from_a_different_model_shape(tmp_path: Path, trained_run: Path, cache_dir: Path):
    run = _copy_run(trained_run, tmp_path / "run")
    before = snapshot(run)
    proc = ebt("pretrain", "test_tiny", f"run_dir={run}", "model.dim=64", "train.max_steps=8",
               f"data.cache_dir={cache_dir}")
    assert_one_line_error(proc, "step_00000006/model", "different model shape", ", 64)")
    assert snapshot(run) == before


def test_finished_run_is_not_retrained_and_can_be_plotted(tmp_path: Path, trained_run: Path, cache_dir: Path):
    run = _copy_run(trained_run, tmp_path / "run")
    weights = (run / "checkpoints" / "step_00000006" / "model" / "model-tp0-of-1.safetensors").read_bytes()
    proc = ebt("pretrain", "test_tiny", f"run_dir={run}", f"data.cache_dir={cache_dir}")
    assert proc.returncode == 0, proc.stderr
    assert "nothing to do" in proc.stdout
    assert (run / "checkpoints" / "step_00000006" / "model" / "model-tp0-of-1.safetensors").read_bytes() == weights
    proc = ebt("plot", str(run))
    assert proc.returncode == 0, proc.stderr
    assert {Path(p).name for p in proc.stdout.split()} == {"training.png", "thinking.png"}
    metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("step" in m and "loss" in m for m in metrics)


def test_print_config_and_subcommands():
    proc = ebt("pretrain", "--print-config", "train.max_steps=3")
    assert proc.returncode == 0 and "max_steps: 3" in proc.stdout and "sources:" in proc.stdout
    assert ebt("data", "--help").returncode == 0
    assert ebt("--help").returncode == 0
    exe = Path(sys.executable).parent / "ebt"
    assert exe.is_file(), "the `ebt` entry point is installed next to the interpreter"
    proc = subprocess.run([str(exe), "pretrain", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "key=value" in proc.stdout


def test_the_parser_imports_no_torch():
    """`ebt --help` stays fast: building the whole parser (every subcommand) imports no torch."""
    code = ("import sys, ebt.cli; ebt.cli.build_parser(); "
            "heavy = sorted(m for m in ('torch', 'numpy', 'omegaconf', 'safetensors') if m in sys.modules); "
            "assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    proc = ebt("--help")
    assert proc.returncode == 0 and all(c in proc.stdout for c in ("pretrain", "data", "export", "serve", "launch"))


def test_group_choice_on_the_command_line():
    proc = ebt("pretrain", "--print-config", "model=3xs", "recipe=s1")
    assert proc.returncode == 0, proc.stderr
    assert "num_layers: 4" in proc.stdout and "loss_on: mean" in proc.stdout
    assert_one_line_error(ebt("pretrain", "--print-config", "model=huge"), "model 'huge'", "available: 3xs, 4xs")
