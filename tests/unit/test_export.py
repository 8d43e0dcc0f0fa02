"""Serving export: consolidate a real checkpoint, reload it with checksum and probe checks,
refuse tampering (the server is tested in tests/unit/test_serve.py)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretrain.checkpoint import latest_checkpoint
from ebt.cli import main as ebt_main
from pretrain.config import load_config
from pretrain.export import ExportError, export_checkpoint, load_export
from pretrain.generate import EBTInference
from pretrain.trainer import train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    cfg = load_config(["test_tiny"], [f"run_dir={root / 'run'}", f"data.cache_dir={root / 'cache'}",
                                      "train.max_steps=2", "model.max_seq_len=48"])
    train(cfg)
    return root / "run"


@pytest.fixture(scope="module")
def export_dir(run_dir, tmp_path_factory) -> Path:
    return export_checkpoint(run_dir, tmp_path_factory.mktemp("exports") / "tiny", log=lambda *_: None)


def test_export_holds_the_checkpoint_weights_and_reloads_verified(run_dir, export_dir):
    assert sorted(p.name for p in export_dir.iterdir()) == [
        "attention.py", "config.json", "config.py", "configuration_ebt.py", "ebt.py", "export.json",
        "generation_config.json", "layers.py", "model.safetensors", "modeling_ebt.py", "thinking.json",
        "tokenizer.json", "tokenizer_config.json", "vocab.py"]
    ckpt = load_file(str(latest_checkpoint(run_dir) / "model" / "model-tp0-of-1.safetensors"))
    exported = load_file(str(export_dir / "model.safetensors"))
    assert ckpt.keys() == exported.keys()
    assert all(torch.equal(ckpt[k].float(), exported[k]) for k in ckpt)
    loaded = load_export(export_dir)
    assert loaded.thinking.step_size == pytest.approx(float(ckpt["step_size"]))
    tok = loaded.tokenizer()
    assert tok.decode(tok.encode("To be, or not to be")) == "To be, or not to be"
    assert not any(p.requires_grad for p in loaded.model.parameters())
    text = EBTInference(loaded.model).generate(tok.encode("The"), 5, steps=2)
    assert len(text) == 5


@pytest.mark.parametrize("victim", ["model.safetensors", "config.json", "thinking.json", "tokenizer.json",
                                    "modeling_ebt.py", "generation_config.json"])
def test_a_tampered_export_is_refused(export_dir, tmp_path, victim):
    copy = tmp_path / "copy"
    shutil.copytree(export_dir, copy)
    data = bytearray((copy / victim).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / victim).write_bytes(bytes(data))
    with pytest.raises(ExportError, match=rf"{victim}: sha256 does not match export.json"):
        load_export(copy)


def test_export_refuses_a_non_empty_destination_and_a_missing_source(run_dir, export_dir, tmp_path):
    with pytest.raises(ExportError, match="already exists and is not empty"):
        export_checkpoint(run_dir, export_dir)
    with pytest.raises(ExportError, match="no such run folder"):
        export_checkpoint(tmp_path / "nope", tmp_path / "out")


def test_export_command_line(run_dir, tmp_path, capsys):
    assert ebt_main(["export", str(run_dir), "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "export.json").is_file()
    assert ebt_main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such run folder" in err[0]
