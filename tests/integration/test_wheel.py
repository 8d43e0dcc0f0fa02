"""The project as a wheel: built from a copy of the tracked sources, installed into a fresh
virtual environment (no system site-packages, no PYTHONPATH: only what the wheel declares),
then `ebt` run from an unrelated directory. This is what catches configs missing from the
wheel, a CONFIG_ROOT that points into a source tree, or an undeclared dependency.

One venv serves every check; pip's cache is reused, and torch comes from the local wheel that
`pip install torch==2.13.0` finds on this machine (docs/user_guide.md, "Installing")."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _tracked_copy(dest: Path) -> Path:
    """The files git tracks (what a clean clone has), so local build outputs never leak in."""
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def _clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "EBT_TRACEBACK")}
    return {**env, "PIP_NO_INPUT": "1", "OMP_NUM_THREADS": "1", **extra}


def _run(cmd: list, cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_wheel_installs_into_a_fresh_venv_and_trains_from_another_directory(tmp_path: Path):
    env = _clean_env()
    src = _tracked_copy(tmp_path / "src")
    started = time.monotonic()
    # The build backend of the running interpreter (setuptools, wheel): no isolated build env to fetch.
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist",
          src], tmp_path, env)
    (wheel,) = (tmp_path / "dist").glob("ebt_pretrain-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], tmp_path, env)
    python, ebt = venv / "bin" / "python", venv / "bin" / "ebt"
    # --no-compile: byte-compiling torch's sources at install time is most of the install.
    _run([python, "-m", "pip", "install", "-q", "--no-compile", wheel, "torch==2.13.0"], tmp_path, env, timeout=900)
    installed = time.monotonic() - started
    shutil.rmtree(src)  # nothing may still read the sources

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run([python, "-c", "import configs, pretrain.config as c; print(c.CONFIG_ROOT)"], elsewhere, env)
    assert str(venv) in where.stdout and "site-packages" in where.stdout, where.stdout

    proc = _run([ebt, "pretrain", "--print-config", "default"], elsewhere, env)
    assert "sources:\n  - shakespeare" in proc.stdout and "num_steps_max: 4" in proc.stdout

    proc = _run([ebt, "pretrain", "test_tiny", "train.max_steps=2", "run_dir=run",
                 f"data.cache_dir={tmp_path / 'cache'}"], elsewhere, env)
    assert "done: run at step 2" in proc.stdout, proc.stdout
    assert "pretrain.trainer: step 2/2 |" in proc.stdout  # the progress line goes through logging
    assert (elsewhere / "run" / "checkpoints" / "step_00000002" / "metadata.json").is_file()
    assert (elsewhere / "run" / "metrics.jsonl").read_text().count("\n") == 2
    print(f"wheel build + venv + install: {installed:.0f} s")
