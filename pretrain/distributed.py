"""The process group of a run, from the launcher's environment, and the layout on it.

Every launcher (torchrun, Slurm, Ray) ends in `ebt pretrain` on every rank with RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set; a plain `ebt pretrain` is a world
of one. `init_dims` checks the layout against the world (parallel.dims.validate_layout, the
one place that check lives), initialises torch.distributed when the world has more than
one rank (gloo on CPU, nccl on GPU), and always returns a `ParallelDims`: the trainer has
one road for every world size.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch
import torch.distributed as dist

from .config import ConfigError, RunConfig


def init_dims(cfg: RunConfig, device: torch.device):
    """The run's ParallelDims (a world of one included), process group initialised if needed."""
    from parallel.dims import LayoutError, build_dims, validate_layout

    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        validate_layout(cfg.parallel.tp, cfg.parallel.dp, cfg.parallel.pp, world)
    except LayoutError as err:
        raise ConfigError(str(err)) from None
    if world > 1 and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise ConfigError("WORLD_SIZE > 1 needs MASTER_ADDR/MASTER_PORT: start ranks with torchrun or `ebt launch`")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return build_dims(cfg.parallel.tp, cfg.parallel.dp, cfg.parallel.pp)
    except LayoutError as err:
        raise ConfigError(str(err)) from None


def teardown() -> None:
    """Every rank destroys its group before exiting (a rank leaving with an open gloo group can abort)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(dims) -> None:
    if dims.world_size > 1:
        dist.barrier()


def all_reduce_mean(values: torch.Tensor, dims, group: Optional[Any] = None) -> torch.Tensor:
    """Mean over the group's ranks (the world by default), returned on the CPU; the caller's
    tensor is never modified. A world of one returns a copy. nccl reduces only CUDA tensors."""
    out = values.detach().to(dtype=torch.float64, copy=True)
    if dims.world_size == 1:
        return out.cpu()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    out = out.to(device)
    dist.all_reduce(out, group=group)
    return (out / dist.get_world_size(group)).cpu()
