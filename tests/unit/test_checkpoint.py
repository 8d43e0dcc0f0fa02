"""Checkpoint layout, atomicity, pruning and validation (pretrain.checkpoint)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretrain.checkpoint import (
    METADATA,
    MODEL_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from pretrain.model import ModelConfig, build_model


def tiny_model(dim: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(vocab_size=40, dim=dim, num_layers=1, num_heads=2, max_seq_len=8))


def trained_pair(dim: int = 16, seed: int = 0):
    model = tiny_model(dim, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    energy = model.energy(torch.randint(0, 40, (2, 8)), torch.randn(2, 8, 40)).sum()
    energy.backward()
    opt.step()
    return model, opt


def save(run_dir: Path, step: int, model, opt, keep: int = 3) -> Path:
    state = {"step": step, "generator": torch.Generator().manual_seed(step).get_state()}
    return save_checkpoint(run_dir, step, model=model, optimizer=opt, trainer_state=state,
                           metadata={"config": {"run_dir": str(run_dir)}, "data": {"cursor": step}}, keep_last_k=keep)


def snapshot(root: Path) -> dict:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_layout_metadata_last_and_weights_only_loading(tmp_path: Path):
    model, opt = trained_pair()
    path = save(tmp_path, 12, model, opt)
    assert path == tmp_path / "checkpoints" / "step_00000012"
    assert sorted(p.name for p in path.iterdir()) == sorted([METADATA, MODEL_FILE, OPTIMIZER_FILE, STATE_FILE])
    meta = json.loads((path / METADATA).read_text())
    assert meta["step"] == 12 and meta["data"] == {"cursor": 12}
    assert set(meta["files"]) == {MODEL_FILE, OPTIMIZER_FILE, STATE_FILE}
    # metadata.json is the last file written
    assert (path / METADATA).stat().st_mtime_ns >= max((path / f).stat().st_mtime_ns for f in meta["files"])
    weights = load_file(str(path / MODEL_FILE))
    assert torch.equal(weights["energy_head.weight"], model.energy_head.weight)
    torch.load(path / OPTIMIZER_FILE, weights_only=True)
    torch.load(path / STATE_FILE, weights_only=True)


def test_round_trip_restores_model_and_optimizer_exactly(tmp_path: Path):
    model, opt = trained_pair(seed=0)
    path = save(tmp_path, 1, model, opt)
    other, other_opt = trained_pair(seed=1)
    meta, state = load_checkpoint(path, model=other, optimizer=other_opt)
    assert meta["step"] == 1 and state["step"] == 1
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), name
    sa, sb = opt.state_dict()["state"], other_opt.state_dict()["state"]
    for key in sa:
        assert torch.equal(sa[key]["exp_avg"], sb[key]["exp_avg"])


def test_keep_last_k_and_folders_without_metadata_are_not_checkpoints(tmp_path: Path):
    model, opt = trained_pair()
    for step in (2, 4, 6, 8):
        save(tmp_path, step, model, opt, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [6, 8]
    fake = tmp_path / "checkpoints" / "step_00000010"
    fake.mkdir()
    (fake / MODEL_FILE).write_bytes(b"partial")
    (tmp_path / "checkpoints" / ".tmp-step_00000012-1").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_00000008"
    save(tmp_path, 10, model, opt, keep=2)  # replaces the metadata-less folder, removes the temp one
    assert [s for s, _ in list_checkpoints(tmp_path)] == [8, 10]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def _expect_error(path: Path, match: str, model=None) -> None:
    model, opt = (model, None) if model is not None else trained_pair(seed=3)
    before_weights = {k: v.clone() for k, v in model.state_dict().items()}
    root = path.parent.parent
    before = snapshot(root)
    with pytest.raises(CheckpointError, match=match) as err:
        load_checkpoint(path, model=model, optimizer=opt)
    assert "\n" not in str(err.value)
    assert snapshot(root) == before  # nothing changed on disk
    for name, value in model.state_dict().items():  # nor in the model
        assert torch.equal(value, before_weights[name])


def test_truncated_model_file(tmp_path: Path):
    model, opt = trained_pair()
    path = save(tmp_path, 1, model, opt)
    data = (path / MODEL_FILE).read_bytes()
    (path / MODEL_FILE).write_bytes(data[: len(data) // 2])
    _expect_error(path, r"model\.safetensors: truncated or corrupt")


def test_corrupt_bytes_same_size(tmp_path: Path):
    model, opt = trained_pair()
    path = save(tmp_path, 1, model, opt)
    data = bytearray((path / OPTIMIZER_FILE).read_bytes())
    data[-20] ^= 0xFF
    (path / OPTIMIZER_FILE).write_bytes(bytes(data))
    _expect_error(path, r"optimizer\.pt: corrupt \(sha256")


def test_corrupt_metadata(tmp_path: Path):
    model, opt = trained_pair()
    path = save(tmp_path, 1, model, opt)
    (path / METADATA).write_text('{"format": 1, "step": ')
    _expect_error(path, r"metadata\.json: corrupt metadata")


def test_missing_file(tmp_path: Path):
    model, opt = trained_pair()
    path = save(tmp_path, 1, model, opt)
    (path / STATE_FILE).unlink()
    _expect_error(path, r"trainer_state\.pt: missing")


def test_different_model_shape(tmp_path: Path):
    model, opt = trained_pair(dim=16)
    path = save(tmp_path, 1, model, opt)
    _expect_error(path, r"model\.safetensors: .* has shape .*different model shape", model=tiny_model(dim=32))
    deeper = build_model(ModelConfig(vocab_size=40, dim=16, num_layers=2, num_heads=2, max_seq_len=8))
    _expect_error(path, r"model\.safetensors: a different model \(missing 'layers\.1", model=deeper)
