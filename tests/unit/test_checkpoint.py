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
    STATE_FILE,
    CheckpointError,
    clean_stale,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)

MODEL_FILE = "model/model-tp0-of-1.safetensors"
OPTIMIZER_FILE = "model/optim-tp0-of-1.safetensors"
LAYOUT_FILE = "model/parallel.json"
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "legacy_single_process_checkpoint" / "step_00000002"
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
    files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    assert files == sorted([METADATA, MODEL_FILE, OPTIMIZER_FILE, LAYOUT_FILE, STATE_FILE])
    meta = json.loads((path / METADATA).read_text())
    assert meta["step"] == 12 and meta["data"] == {"cursor": 12}
    assert set(meta["files"]) == {MODEL_FILE, OPTIMIZER_FILE, LAYOUT_FILE, STATE_FILE}
    # metadata.json is the last file written
    assert (path / METADATA).stat().st_mtime_ns >= max((path / f).stat().st_mtime_ns for f in meta["files"])
    weights = load_file(str(path / MODEL_FILE))
    assert torch.equal(weights["energy_head.weight"], model.energy_head.weight)
    moments = load_file(str(path / OPTIMIZER_FILE))
    # every parameter the optimizer holds state for (alpha got no gradient from the energy alone)
    assert set(moments) == {f"{n}.{k}" for n, p in model.named_parameters() if p in opt.state
                            for k in ("exp_avg", "exp_avg_sq")}
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
    (fake / "model.safetensors").write_bytes(b"partial")
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
    _expect_error(path, r"model-tp0-of-1\.safetensors: truncated or corrupt")


def test_corrupt_bytes_same_size(tmp_path: Path):
    model, opt = trained_pair()
    path = save(tmp_path, 1, model, opt)
    data = bytearray((path / OPTIMIZER_FILE).read_bytes())
    data[-20] ^= 0xFF
    (path / OPTIMIZER_FILE).write_bytes(bytes(data))
    _expect_error(path, r"optim-tp0-of-1\.safetensors: corrupt \(sha256")


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
    _expect_error(path, r"/model: .* has shape .*different model shape", model=tiny_model(dim=32))
    deeper = build_model(ModelConfig(vocab_size=40, dim=16, num_layers=2, num_heads=2, max_seq_len=8))
    _expect_error(path, r"/model: a different model \(missing 'layers\.1", model=deeper)


def test_a_checkpoint_of_the_earlier_single_process_format_still_loads(tmp_path: Path):
    # tests/fixtures/legacy_single_process_checkpoint: written by this repository before the
    # one-format change (model.safetensors + optimizer.pt + trainer_state.pt), test_tiny, step 2.
    from pretrain.config import config_from_dict
    from pretrain.trainer import build_optimizer

    meta = json.loads((FIXTURE / METADATA).read_text())
    assert "model.safetensors" in meta["files"] and "optimizer.pt" in meta["files"]
    cfg = config_from_dict(meta["config"])
    model = build_model(cfg.model)
    opt = build_optimizer(model, cfg)
    meta, state = load_checkpoint(FIXTURE, model=model, optimizer=opt)
    assert meta["step"] == 2 and state["step"] == 2
    saved = load_file(str(FIXTURE / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    legacy = torch.load(FIXTURE / "optimizer.pt", weights_only=True)
    params = [p for g in opt.param_groups for p in g["params"]]
    for index, p in enumerate(params):
        assert torch.equal(opt.state[p]["exp_avg"], legacy["state"][index]["exp_avg"])
        assert torch.equal(opt.state[p]["exp_avg_sq"], legacy["state"][index]["exp_avg_sq"])


def test_every_written_directory_is_fsynced(tmp_path: Path, monkeypatch):
    import pretrain.checkpoint as ckpt

    synced = []
    real = ckpt._fsync_dir
    monkeypatch.setattr(ckpt, "_fsync_dir", lambda p: (synced.append(Path(p)), real(p)))
    model, opt = trained_pair()
    path = save(tmp_path, 3, model, opt)
    # the run folder (checkpoints/ was created in it), checkpoints/, the step folder and model/
    for folder in (tmp_path, tmp_path / "checkpoints", path.parent / f".tmp-{path.name}-collective",
                   path.parent / f".tmp-{path.name}-collective" / "model"):
        assert folder in synced, folder


def test_resaving_a_step_always_leaves_a_loadable_checkpoint(tmp_path: Path, monkeypatch):
    import pretrain.checkpoint as ckpt

    model, opt = trained_pair()
    save(tmp_path, 4, model, opt, keep=1)
    seen = []
    real_rename = Path.rename

    def watching_rename(self, target):
        out = real_rename(self, target)
        # after every rename of the re-save, some complete checkpoint of step 4 is listed
        found = dict(list_checkpoints(tmp_path))
        seen.append(4 in found and (found[4] / METADATA).is_file())
        return out

    monkeypatch.setattr(Path, "rename", watching_rename)
    save(tmp_path, 4, model, opt, keep=1)
    monkeypatch.setattr(Path, "rename", real_rename)
    assert seen and all(seen)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4]
    # a re-save killed between its two renames: step_N.replaced is the checkpoint, and the
    # start-up clean-up puts it back
    root = tmp_path / "checkpoints"
    (root / "step_00000004").rename(root / "step_00000004.replaced")
    assert latest_checkpoint(tmp_path) == root / "step_00000004.replaced"
    (root / ".tmp-step_00000006-collective").mkdir()
    clean_stale(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004"]
    meta, state = load_checkpoint(root / "step_00000004", model=model, optimizer=opt)
    assert meta["step"] == 4
