"""Atomic, self-describing checkpoints and their validation (single process for now).

Layout: `run_dir/checkpoints/step_XXXXXXXX/` holding
  model.safetensors    the model's state dict
  optimizer.pt         the optimizer's state dict (torch.save; loads with weights_only=True)
  trainer_state.pt     RNG states, replay buffer, counters (same)
  metadata.json        written last: step, layout, the resolved config, the data cursor, the
                       size and sha256 of every file above, and energies on a fixed probe batch
A checkpoint is written into `checkpoints/.tmp-step_XXXXXXXX-<pid>/` and renamed when
complete, so a crash while saving leaves at most a temporary folder, which is not a
checkpoint (neither is any folder without metadata.json) and is removed by the next save.

Loading validates everything (metadata, sizes, checksums, tensor names and shapes) before it
touches the model or the optimizer, and raises `CheckpointError` with a one-line message
naming the file. Loading never changes anything on disk.

Multi-process runs write the same folder collectively (pretrain/distributed.py): the model and
optimizer as layout-independent shards under `model/` (parallel.reshard) and one
`trainer_state_rankNNNNN.pt` per rank; metadata.json lists and checksums every file.

Test hook: with the environment variable `EBT_CHECKPOINT_FAULT=kill@STEP` the process
SIGKILLs itself in the middle of saving step STEP (model written, metadata not yet).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
METADATA = "metadata.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
FAULT_ENV = "EBT_CHECKPOINT_FAULT"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the file."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> List[Tuple[int, Path]]:
    """Complete checkpoints (folders named step_N holding metadata.json), oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and (child / METADATA).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fault(step: int) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if spec == f"kill@{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: Dict[str, Any],
    metadata: Dict[str, Any],
    keep_last_k: int,
) -> Path:
    """Writes step `step` atomically and prunes to the newest `keep_last_k` checkpoints.

    `metadata` (JSON-serialisable: config, data cursor, probe, ...) is completed with the step,
    format version and file checksums and written last."""
    tmp, final = begin_checkpoint(run_dir, step, str(os.getpid()))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / MODEL_FILE), metadata={"step": str(step)})
    _fault(step)
    torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
    torch.save(trainer_state, tmp / STATE_FILE)
    return finalize_checkpoint(run_dir, tmp, final, step, metadata, keep_last_k)


def begin_checkpoint(run_dir: str | Path, step: int, suffix: str) -> Tuple[Path, Path]:
    """(temporary folder, final folder) for step `step`; stale temporaries are removed."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a save that was killed
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-{final.name}-{suffix}"
    tmp.mkdir()
    return tmp, final


def finalize_checkpoint(run_dir: str | Path, tmp: Path, final: Path, step: int, metadata: Dict[str, Any],
                        keep_last_k: int) -> Path:
    """Checksums every file under `tmp`, writes metadata.json last, renames `tmp` to `final`
    and prunes to the newest `keep_last_k` checkpoints."""
    files = {}
    for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
        _fsync_file(file)
        files[file.relative_to(tmp).as_posix()] = {"bytes": file.stat().st_size, "sha256": _sha256(file)}
    meta = {"format": FORMAT_VERSION, "step": step, **metadata, "files": files}
    with open(tmp / METADATA, "w") as fh:
        json.dump(meta, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(tmp)

    root = final.parent
    if final.exists():  # re-saving a step (e.g. the final state after a resume at max_steps)
        old = root / f".tmp-old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync_dir(root)

    for _, path in list_checkpoints(run_dir)[:-keep_last_k]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def read_metadata(path: str | Path) -> Dict[str, Any]:
    """The metadata of a checkpoint folder, checked for presence and well-formedness."""
    meta_path = Path(path) / METADATA
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path}: missing: {path} is not a complete checkpoint")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{meta_path}: corrupt metadata ({type(err).__name__}: {err})") from None
    for key in ("format", "step", "files", "config"):
        if not isinstance(meta, dict) or key not in meta:
            raise CheckpointError(f"{meta_path}: corrupt metadata (no {key!r})")
    if meta["format"] != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: format {meta['format']} is not {FORMAT_VERSION}")
    return meta


SHARDED_LAYOUT = "model/parallel.json"  # parallel.reshard.LAYOUT_FILE inside model/
"""Present in checkpoints of multi-process runs (parallel.reshard's layout-independent shards)."""


def is_sharded(meta: Dict[str, Any]) -> bool:
    return SHARDED_LAYOUT in meta.get("files", {})


def verify_files(path: Path, meta: Dict[str, Any]) -> None:
    """Every file metadata.json lists is present with its recorded size and sha256."""
    required = (SHARDED_LAYOUT,) if is_sharded(meta) else (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE)
    for name in required:
        if name not in meta["files"]:
            raise CheckpointError(f"{path / METADATA}: corrupt metadata (no entry for {name})")
    for name, info in meta["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing from the checkpoint")
        size = file.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"{file}: truncated or corrupt ({size} bytes, expected {info['bytes']})")
        if _sha256(file) != info["sha256"]:
            raise CheckpointError(f"{file}: corrupt (sha256 does not match metadata.json)")


def read_full_model_state(path: Path, meta: Dict[str, Any]) -> Tuple[Dict[str, torch.Tensor], Path]:
    """The full (unsharded) weights of a checkpoint of any layout, after checking every file it
    lists: model.safetensors, or the tensor-parallel shards under model/ reassembled. Returns
    (tensors, the file or folder they came from)."""
    verify_files(path, meta)
    source = path / "model" if is_sharded(meta) else path / MODEL_FILE
    try:
        if is_sharded(meta):
            from parallel.reshard import load_full_model_state

            return load_full_model_state(source), source
        return load_file(str(source)), source
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        raise CheckpointError(f"{source}: cannot be read ({type(err).__name__}: {err})") from None


def check_model_state(source: Path, tensors: Dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """The saved tensors have exactly the names and shapes of `model` (built from the config)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise CheckpointError(
            f"{source}: a different model ({what}); it was saved with another model config: "
            "use a new run_dir or the checkpoint's config"
        )
    for name, tensor in expected.items():
        if tuple(tensors[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{source}: {name} has shape {tuple(tensors[name].shape)}, the model built from the config "
                f"has {tuple(tensor.shape)}: the checkpoint is from a different model shape (use a new run_dir)"
            )


def _torch_load(file: Path) -> Any:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same to the user
        raise CheckpointError(f"{file}: cannot be loaded ({type(err).__name__}: {str(err).splitlines()[0]})") from None


def load_checkpoint(
    path: str | Path, *, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None
) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Validates checkpoint `path` against `model`, then loads model (and optimizer) state.

    Returns (metadata, trainer_state). Nothing is modified unless every check passes."""
    path = Path(path)
    meta = read_metadata(path)
    verify_files(path, meta)
    if is_sharded(meta):
        raise CheckpointError(
            f"{path}: written by a {meta.get('world_size', '?')}-process run ({meta.get('layout')}); resume it with "
            "torchrun and a parallel layout, or export it with `ebt export`"
        )
    model_file = path / MODEL_FILE
    try:
        tensors = load_file(str(model_file))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{model_file}: cannot be read ({err})") from None
    check_model_state(model_file, tensors, model)
    expected = model.state_dict()
    optim_state = _torch_load(path / OPTIMIZER_FILE) if optimizer is not None else None
    trainer_state = _torch_load(path / STATE_FILE)
    if optimizer is not None:
        groups = optim_state.get("param_groups", []) if isinstance(optim_state, dict) else []
        sizes = [len(g["params"]) for g in groups]
        if sizes != [len(g["params"]) for g in optimizer.param_groups]:
            raise CheckpointError(
                f"{path / OPTIMIZER_FILE}: parameter groups {sizes} do not match the model's "
                f"{[len(g['params']) for g in optimizer.param_groups]}"
            )
    with torch.no_grad():
        model.load_state_dict({k: v.to(expected[k].device) for k, v in tensors.items()}, strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(optim_state)
    return meta, trainer_state
