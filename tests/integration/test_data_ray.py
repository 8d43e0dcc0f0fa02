"""`data build` on a real local Ray: 1 and 2 Ray workers write the same bytes as the in-process
path. The command starts its own Ray on loopback (127.0.0.2, private temp dir) and must stop every
process it started, and nothing else."""
import subprocess
from pathlib import Path

import pytest

from data_pipeline.cli import main

pytestmark = pytest.mark.integration
ray = pytest.importorskip("ray", reason="Ray is in the `cluster` extra")


def _ray_pids() -> set:
    """Processes of any private Ray that `data build` starts (their command lines name its temp dir)."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if "/tmp/ebt-ray-" in line}


def test_build_with_1_and_2_ray_workers_is_byte_identical(tmp_path):
    import pydoc_data.topics

    text = tmp_path / "text"
    text.mkdir()
    for key in sorted(pydoc_data.topics.topics)[:40]:
        (text / f"{key}.txt").write_text(pydoc_data.topics.topics[key], encoding="utf-8")
    before, temp_dirs = _ray_pids(), set(Path("/tmp").glob("ebt-ray-*"))
    outs = {}
    for workers in (0, 1, 2):
        outs[workers] = tmp_path / f"w{workers}"
        args = ["build", str(text), "--out", str(outs[workers]), "--workers", str(workers), "--tokenizer", "bpe:512",
                "--seq-len", "32", "--shard-size-mb", "0.25", "--cache-dir", str(tmp_path / "cache"), "--quiet"]
        assert main(args) == 0
        assert _ray_pids() <= before  # the local Ray it started is gone
    names = sorted(p.name for p in outs[0].iterdir())
    assert len([n for n in names if n.endswith(".tar")]) >= 4  # enough shards for the tasks to interleave
    for workers in (1, 2):
        assert sorted(p.name for p in outs[workers].iterdir()) == names
        for name in names:
            assert (outs[workers] / name).read_bytes() == (outs[0] / name).read_bytes(), (workers, name)
    assert set(Path("/tmp").glob("ebt-ray-*")) <= temp_dirs  # and so is its temp dir
