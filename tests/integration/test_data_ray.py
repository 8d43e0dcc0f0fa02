"""`data build` on a real local Ray: 1 and 2 Ray workers write the same bytes as the in-process
path, for a text folder, a .jsonl.zst file cut into several byte ranges and a Parquet file of
several row groups (the workers read their units themselves). The command starts its own Ray on loopback (127.0.0.2, private temp dir) and must stop every
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


def test_build_with_1_and_2_ray_workers_is_byte_identical(tmp_path, monkeypatch):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    import pydoc_data.topics
    import zstandard

    import data_pipeline.sources as sources_module

    text = tmp_path / "text"
    text.mkdir()
    keys = sorted(pydoc_data.topics.topics)
    for key in keys[:40]:
        (text / f"{key}.txt").write_text(pydoc_data.topics.topics[key], encoding="utf-8")
    later = [pydoc_data.topics.topics[k] for k in keys[40:100]]
    lines = "".join(json.dumps({"text": t}) + "\n" for t in later[:30]).encode()
    (text / "more.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(pa.table({"text": later[30:]}), text / "more.parquet", row_group_size=4)
    monkeypatch.setattr(sources_module, "UNIT_BYTES", 5_000)  # units are planned by the driver
    monkeypatch.setattr(sources_module, "COMPRESSED_UNIT_BYTES", 20_000)
    units = sources_module.resolve_sources([str(text)])[0].units()
    assert sum(u.kind == "jsonl" for u in units) >= 3 and sum(u.kind == "parquet" for u in units) >= 3
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
