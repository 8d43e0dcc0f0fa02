"""Multi-process runs for the trainer: the process group from the launcher's environment, the
parallel layout, and collective checkpoints that reload under any other layout.

Every launcher (torchrun, Slurm, Ray) ends in `ebt pretrain` on every rank with RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set; `setup` initialises torch.distributed
from them (gloo on CPU, nccl on GPU) and builds the `parallel.dims` layout, which must multiply
to the world size.

A checkpoint of a multi-process run is the usual step folder, written collectively:
    model/               parallel.reshard's layout-independent shards + parallel.json (model and AdamW)
    trainer_state_rankNNNNN.pt   per rank: generators, counters, replay buffer
    metadata.json        rank 0, last: step, layout, config, data cursor, probe, checksums
Resuming rebuilds the full model from the shards (whatever layout wrote them), lets
`parallelize` slice it for the new layout, and reslices the optimizer moments.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist

from .checkpoint import (
    OPTIMIZER_FILE,
    STATE_FILE,
    CheckpointError,
    _torch_load,
    begin_checkpoint,
    check_model_state,
    finalize_checkpoint,
    is_sharded,
    read_full_model_state,
    read_metadata,
)
from .config import ConfigError, RunConfig


def requested(cfg: RunConfig) -> bool:
    """Whether this run is multi-process (by the environment or by the layout)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or cfg.parallel.world_size > 1


def setup(cfg: RunConfig, device: torch.device):
    """Initialises the process group (if the launcher has not) and returns the layout."""
    from parallel.dims import LayoutError, build_dims

    world = int(os.environ.get("WORLD_SIZE", "1"))
    layout = cfg.parallel.world_size
    if world != layout:
        raise ConfigError(
            f"parallel.tp x parallel.dp x parallel.pp = {cfg.parallel.tp} x {cfg.parallel.dp} x {cfg.parallel.pp} = "
            f"{layout} but WORLD_SIZE={world}: launch {layout} processes (torchrun --nproc-per-node {layout}) or "
            f"change parallel.dp"
        )
    if cfg.parallel.pp > 1:
        raise ConfigError(
            f"parallel.pp={cfg.parallel.pp}: the trainer does not drive pipeline stages yet (the pipeline itself is "
            f"parallel/pipeline.py, see docs/parallel.md); use parallel.pp=1"
        )
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise ConfigError("WORLD_SIZE > 1 needs MASTER_ADDR/MASTER_PORT: start ranks with torchrun or `ebt launch`")
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
    try:
        return build_dims(cfg.parallel.tp, cfg.parallel.dp)
    except LayoutError as err:
        raise ConfigError(str(err)) from None


def teardown() -> None:
    """Every rank destroys its group before exiting (a rank leaving with an open gloo group can abort)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def state_file(rank: int) -> str:
    return f"trainer_state_rank{rank:05d}.pt"


def save(pm, run_dir: Path, step: int, trainer_state: Dict[str, Any], metadata: Dict[str, Any],
         keep_last_k: int) -> Path:
    """Collective: every rank calls it; returns the final folder on every rank."""
    from parallel.reshard import save_sharded

    rank = dist.get_rank()
    root = Path(run_dir) / "checkpoints"
    tmp = root / f".tmp-step_{step:08d}-collective"
    final = root / f"step_{step:08d}"
    if rank == 0:
        tmp, final = begin_checkpoint(run_dir, step, "collective")
    dist.barrier()
    save_sharded(pm, tmp / "model")
    torch.save(trainer_state, tmp / state_file(rank))
    dist.barrier()
    if rank == 0:
        finalize_checkpoint(run_dir, tmp, final, step, metadata, keep_last_k)
    dist.barrier()
    return final


def load_full_model(path: Path, model: torch.nn.Module) -> Dict[str, Any]:
    """Validates checkpoint `path` (any layout) and loads the full weights into the unsharded
    `model`. Returns the metadata."""
    meta = read_metadata(path)
    tensors, source = read_full_model_state(path, meta)
    check_model_state(source, tensors, model)
    with torch.no_grad():
        model.load_state_dict(tensors, strict=True)
    return meta


def load_optimizer(pm, path: Path, meta: Dict[str, Any]) -> None:
    """AdamW moments resliced for this layout (sharded checkpoints), or a single-process
    checkpoint's optimizer.pt where the layout keeps full parameters (tp=1, no ZeRO)."""
    from parallel.reshard import load_optimizer_state

    if is_sharded(meta):
        load_optimizer_state(pm, path / "model")
        return
    if pm.dims.tp > 1 or pm.zero_stage:
        raise CheckpointError(
            f"{path / OPTIMIZER_FILE}: a single-process checkpoint resumes only with parallel.tp=1 and zero_stage=0"
        )
    pm.optimizer.load_state_dict(_torch_load(path / OPTIMIZER_FILE))


def load_optimizer_unsharded(optimizer: torch.optim.Optimizer, model: torch.nn.Module, path: Path) -> None:
    """A single process resuming a sharded checkpoint: the full AdamW moments into its optimizer."""
    from types import SimpleNamespace

    from parallel.reshard import load_optimizer_state

    # load_optimizer_state needs only these attributes of a ParallelModel (tp=1: no reslicing).
    single = SimpleNamespace(optimizer=optimizer, module=model, engine=None, dims=SimpleNamespace(tp=1))
    load_optimizer_state(single, path / "model")


def load_trainer_state(path: Path, meta: Dict[str, Any], rank: int, same_layout: bool) -> Tuple[Dict[str, Any], bool]:
    """This rank's trainer state (own file when the layout is unchanged, else rank 0's), and
    whether it is this rank's own (the replay buffer is per rank and only then reusable)."""
    if not is_sharded(meta):
        return _torch_load(path / STATE_FILE), rank == 0 and same_layout
    own = path / state_file(rank)
    if same_layout and own.is_file():
        return _torch_load(own), True
    return _torch_load(path / state_file(0)), False


def all_reduce_mean(values: torch.Tensor, group: Optional[Any] = None) -> torch.Tensor:
    """Mean over the group's ranks, returned on the CPU (nccl reduces only CUDA tensors)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    out = values.detach().to(device=device, dtype=torch.float32, copy=True)  # never reduce the caller's tensor
    dist.all_reduce(out, group=group)
    return (out / dist.get_world_size(group)).cpu()
