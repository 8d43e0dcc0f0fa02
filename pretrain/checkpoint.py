"""Atomic, self-describing, reshardable checkpoints: one format for every layout.

Layout: `run_dir/checkpoints/step_XXXXXXXX/` holding
  model/               parallel.reshard's layout-independent shards: `parallel.json` (layout
                       written at, full shape and tp split dim of every tensor) and per tp
                       rank `model-tp{r}-of-{T}.safetensors` + `optim-tp{r}-of-{T}.safetensors`
                       (AdamW moments by parameter name). One process writes one shard.
  trainer_state.pt     rank 0: counters and the EBT replay buffer (full vocabulary);
                       layout-free, since training randomness is keyed by sample, not rank
  metadata.json        written last: step, layout, the resolved config, the data cursor, the
                       size and sha256 of every file above, and energies on a fixed probe batch
Any layout (one process, tp, dp, ZeRO) resumes any other: the full weights are read before
`parallelize` slices them, the AdamW moments are resliced after (`load_optimizer_moments`).
Checkpoints of earlier versions of this repository (single process: model.safetensors +
optimizer.pt + trainer_state.pt; multi-process: trainer_state_rankNNNNN.pt) still load.

Durability: a checkpoint is written into `checkpoints/.tmp-step_XXXXXXXX-collective/`, every
file and every directory written is fsynced, metadata.json is written last and the folder
renamed when complete, so a crash leaves at most a temporary folder (never a checkpoint:
neither is any folder without metadata.json); `clean_stale` removes those at start.
Re-saving a step renames the old folder to `step_XXXXXXXX.replaced` first, which
`list_checkpoints` accepts while `step_XXXXXXXX` is missing: there is no moment without a
loadable checkpoint.

Loading validates everything (metadata, sizes, checksums, tensor names and shapes) before it
touches the model or the optimizer, and raises `CheckpointError` with a one-line message
naming the file. Loading never changes anything on disk.

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
from safetensors.torch import load_file

FORMAT_VERSION = 1
METADATA = "metadata.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
"""Earlier single-process checkpoints: the torch optimizer state dict (read, never written)."""
STATE_FILE = "trainer_state.pt"
SHARDS_DIR = "model"
_STEP_DIR = re.compile(r"^step_(\d{8,})(\.replaced)?$")
REPLACED = ".replaced"
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
    found: Dict[int, Path] = {}
    for child in sorted(root.iterdir(), key=lambda p: p.name):
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and (child / METADATA).is_file():
            step = int(match.group(1))
            # step_N wins over step_N.replaced (the copy kept while step_N is re-saved)
            if step not in found or not match.group(2):
                found[step] = child
    return sorted(found.items())


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


def clean_stale(run_dir: str | Path) -> None:
    """Removes what an interrupted save left (temporary folders), and finishes an interrupted
    re-save: `step_N.replaced` goes back to `step_N` if that is missing, else away. Rank 0
    calls it at start, before any rank reads or writes checkpoints."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in root.glob(f"step_*{REPLACED}"):
        current = root / old.name[: -len(REPLACED)]
        if current.is_dir() and (current / METADATA).is_file():
            shutil.rmtree(old, ignore_errors=True)
        else:
            if current.exists():
                shutil.rmtree(current, ignore_errors=True)
            old.rename(current)
    _fsync_dir(root)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    trainer_state: Dict[str, Any],
    metadata: Dict[str, Any],
    keep_last_k: int,
    pm=None,
    model: Optional[torch.nn.Module] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
) -> Path:
    """Writes step `step` atomically and prunes to the newest `keep_last_k` checkpoints.

    Collective over the world when `pm` (a parallel.apply.ParallelModel) is given: every rank
    calls it and gets the final folder. A plain `model` + `optimizer` is saved as a world of
    one. `metadata` (JSON-serialisable: config, data cursor, probe, ...) is completed with the
    step, format version and file checksums and written last; `trainer_state` by rank 0."""
    from parallel.apply import single_process
    from parallel.reshard import save_sharded

    import torch.distributed as dist

    if pm is None:
        pm = single_process(model, optimizer)
    rank = pm.dims.rank
    root = checkpoint_dir(run_dir)
    tmp, final = root / f".tmp-step_{step:08d}-collective", root / f"step_{step:08d}"
    if rank == 0:
        tmp, final = begin_checkpoint(run_dir, step, "collective")
    if pm.dims.world_size > 1:
        dist.barrier()
    save_sharded(pm, tmp / SHARDS_DIR)  # collective; ends with a barrier
    if rank == 0:
        _fault(step)
        torch.save(trainer_state, tmp / STATE_FILE)
        finalize_checkpoint(run_dir, tmp, final, step, metadata, keep_last_k)
    if pm.dims.world_size > 1:
        dist.barrier()
    return final


def begin_checkpoint(run_dir: str | Path, step: int, suffix: str) -> Tuple[Path, Path]:
    """(temporary folder, final folder) for step `step`; stale temporaries are removed."""
    root = checkpoint_dir(run_dir)
    created = not root.is_dir()
    root.mkdir(parents=True, exist_ok=True)
    if created:
        _fsync_dir(root.parent)
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
    for folder in sorted(p for p in tmp.rglob("*") if p.is_dir()):
        _fsync_dir(folder)
    meta = {"format": FORMAT_VERSION, "step": step, **metadata, "files": files}
    with open(tmp / METADATA, "w") as fh:
        json.dump(meta, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(tmp)

    root = final.parent
    if final.exists():  # re-saving a step (e.g. the final state after a resume at max_steps)
        # The old folder stays a checkpoint (list_checkpoints reads step_N.replaced while
        # step_N is missing) until the new one is in place.
        old = root / f"{final.name}{REPLACED}"
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
        _fsync_dir(root)
        tmp.rename(final)
        _fsync_dir(root)
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
"""Present in every checkpoint of this format (absent in earlier single-process ones)."""


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


def read_optimizer_moments(path: Path, meta: Dict[str, Any], names: List[str]) -> Tuple[Dict[str, torch.Tensor], int]:
    """The full (unsharded) AdamW moments {"<param>.exp_avg": t, "<param>.exp_avg_sq": t} and
    the optimizer step of a checkpoint of any layout. `names` are the trainable parameters in
    the optimizer's group order (an earlier single-process optimizer.pt indexes them so)."""
    if is_sharded(meta):
        from parallel.reshard import load_full_optimizer_state, read_layout

        folder = path / SHARDS_DIR
        try:
            return load_full_optimizer_state(folder), int(read_layout(folder)["optimizer_step"])
        except (SafetensorError, OSError, KeyError, ValueError) as err:
            raise CheckpointError(f"{folder}: optimizer shards cannot be read ({type(err).__name__}: {err})") from None
    state = _torch_load(path / OPTIMIZER_FILE)
    try:
        order = [i for group in state["param_groups"] for i in group["params"]]
        if len(order) != len(names):
            raise CheckpointError(
                f"{path / OPTIMIZER_FILE}: {len(order)} optimized parameters, the model has {len(names)} "
                "(a different model or recipe: use a new run_dir)"
            )
        out: Dict[str, torch.Tensor] = {}
        step = 0
        for index, name in zip(order, names):
            entry = state["state"].get(index)
            if entry is None:
                continue
            step = max(step, int(entry["step"]))
            out[f"{name}.exp_avg"], out[f"{name}.exp_avg_sq"] = entry["exp_avg"], entry["exp_avg_sq"]
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{path / OPTIMIZER_FILE}: unusable optimizer state ({type(err).__name__}: {err})") from None
    return out, step


def read_trainer_state(path: Path, meta: Dict[str, Any]) -> Dict[str, Any]:
    """The trainer state (this format and earlier single-process ones: trainer_state.pt;
    earlier multi-process ones: rank 0's trainer_state_rank00000.pt)."""
    legacy_rank0 = path / "trainer_state_rank00000.pt"
    return _torch_load(legacy_rank0 if legacy_rank0.is_file() and not (path / STATE_FILE).is_file() else path / STATE_FILE)


def optimizer_param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> List[str]:
    """Names of the optimizer's parameters in its group order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def load_checkpoint(
    path: str | Path, *, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None
) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """A single process: validates checkpoint `path` (any layout) against `model`, then loads
    the full weights (and the AdamW moments into `optimizer`). Returns (metadata,
    trainer_state). Nothing is modified unless every check passes."""
    from parallel.apply import single_process
    from parallel.reshard import load_optimizer_moments

    path = Path(path)
    meta = read_metadata(path)
    tensors, source = read_full_model_state(path, meta)
    check_model_state(source, tensors, model)
    moments = step = None
    if optimizer is not None:
        moments, step = read_optimizer_moments(path, meta, optimizer_param_names(model, optimizer))
    trainer_state = read_trainer_state(path, meta)
    expected = model.state_dict()
    with torch.no_grad():
        model.load_state_dict({k: v.to(expected[k].device) for k, v in tensors.items()}, strict=True)
    if optimizer is not None:
        load_optimizer_moments(single_process(model, optimizer), moments, step)
    return meta, trainer_state
