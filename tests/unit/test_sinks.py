"""The optional W&B sink: an offline run (no network) writes its run files under run_dir/wandb/
with the metrics the JSONL log has; TensorBoard and the JSONL files are written as before."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pretrain.config import ConfigError, load_config
from pretrain.sinks import NullSink, flatten, open_sink
from pretrain.trainer import train

pytest.importorskip("wandb", reason="W&B is the optional extra `wandb` (scripts/test.sh installs it)")


def logged_items(wandb_file: Path) -> set:
    """(key, value) of every history/summary item in a .wandb file, read independently of W&B:
    each item is a protobuf message `key` (field 2) + `value_json` (field 16); a tiny run's
    records fit one 32 KiB log block, so no record is split."""
    data = wandb_file.read_bytes()
    assert data.startswith(b":W&B"), data[:8]
    pattern = re.compile(rb"\x12([\x01-\x7f])", re.S)
    items = set()
    for m in pattern.finditer(data):
        key_end = m.end() + m.group(1)[0]
        key, rest = data[m.end():key_end], data[key_end:key_end + 2 + 128]
        if rest[:2] == b"\x82\x01" and len(rest) > 2:
            value = rest[3:3 + rest[2]]
            try:
                items.add((key.decode(), json.loads(value)))
            except (UnicodeDecodeError, ValueError):
                continue
    return items


def test_offline_wandb_run_writes_its_files(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc, ~/.config/wandb of the user
    run = tmp_path / "run"
    cfg = load_config(["test_tiny"], [f"run_dir={run}", "train.max_steps=2", "train.wandb=offline",
                                      f"data.cache_dir={tmp_path / 'cache'}"])
    train(cfg, log=lambda _msg: None)
    (offline,) = (run / "wandb").glob("offline-run-*")
    run_id = (run / "wandb" / "run_id").read_text().strip()
    items = logged_items(offline / f"run-{run_id}.wandb")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2
    for record in metrics:  # every step's numbers, exactly as metrics.jsonl has them
        for key in ("loss", "loss_first", "loss_last", "lr", "energy_gap"):
            assert (f"train/{key}", record[key]) in items, key
    evaluation = json.loads((run / "eval.jsonl").read_text().splitlines()[-1])
    assert ("eval/val_ce", evaluation["val_ce"]) in items
    assert ("eval/val_ce_per_step_1", evaluation["val_ce_per_step"][1]) in items
    assert ("train/loss", metrics[-1]["loss"] + 1e-3) not in items  # the check can fail
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))  # TensorBoard still written


def test_sink_selection_and_flattening():
    cfg = load_config(["test_tiny"])
    assert isinstance(open_sink(cfg, main=True), NullSink)  # off by default
    assert flatten("eval", {"step": 3, "val_ce": 1.5, "ce": [2.0, 1.0], "note": "x", "ok": True}) == {
        "eval/val_ce": 1.5, "eval/ce_0": 2.0, "eval/ce_1": 1.0}
    with pytest.raises(ConfigError, match=r"train\.wandb: 'loud' is not one of \('disabled', 'offline', 'online'\)"):
        load_config(["test_tiny"], ["train.wandb=loud"])
    assert load_config(["test_tiny"], ["train.wandb=disabled"]).train.wandb == "disabled"
