"""The one factory for process groups: named axes `dp` and `tp` (`pp` reserved).

Every module that communicates asks a `ParallelDims` for its group and rank
(`dims.tp_group`, `dims.dp_rank`); nothing else calls `dist.new_group`.

Rank layout (Megatron's): tensor parallelism is the fastest-varying axis, so the ranks of
one tensor-parallel group are consecutive (on a real cluster: on the same node, where the
per-layer all-reduces are cheapest), then data parallelism, then pipeline stages:

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

A layout that does not fit the launched processes fails at start-up with a message naming
the degrees, never as a hang in the first collective.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch.distributed as dist

AXES = ("pp", "dp", "tp")
"""Mesh axes, slowest-varying first."""


class LayoutError(ValueError):
    """A parallel layout that does not fit the world size or the model."""


@dataclass
class ParallelDims:
    """Degrees, this process's coordinates and its process groups.

    Build with `build_dims`; a world of one (no `torch.distributed`) is a valid layout whose
    groups are all None and whose collectives are skipped.
    """

    tp: int
    dp: int
    pp: int
    world_size: int
    rank: int
    tp_group: Optional[dist.ProcessGroup] = field(default=None, repr=False)
    dp_group: Optional[dist.ProcessGroup] = field(default=None, repr=False)
    tp_ranks: List[int] = field(default_factory=list)
    """Global ranks of this process's tensor-parallel group, in tp-rank order."""
    dp_ranks: List[int] = field(default_factory=list)
    """Global ranks of this process's data-parallel group, in dp-rank order."""

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        return f"tp={self.tp} x dp={self.dp} x pp={self.pp} (rank {self.rank}: tp_rank {self.tp_rank}, dp_rank {self.dp_rank})"


def rank_of(tp_rank: int, dp_rank: int, pp_rank: int, tp: int, dp: int) -> int:
    """The global rank at mesh coordinates (Megatron order: tp fastest)."""
    return pp_rank * (dp * tp) + dp_rank * tp + tp_rank


def validate_layout(tp: int, dp: int, pp: int, world_size: int) -> None:
    """Raises LayoutError naming the degrees when tp * dp * pp != world_size."""
    for name, value in (("tp", tp), ("dp", dp), ("pp", pp)):
        if value < 1:
            raise LayoutError(f"parallel.{name}: must be >= 1, got {value}")
    if pp != 1:
        raise LayoutError(f"parallel.pp={pp}: pipeline parallelism is reserved for later; use pp=1")
    if tp * dp * pp != world_size:
        raise LayoutError(
            f"parallel.tp={tp} x parallel.dp={dp} x pp={pp} = {tp * dp * pp} processes, but {world_size} were "
            f"launched (WORLD_SIZE); launch tp*dp processes (e.g. torchrun --nproc-per-node {tp * dp}) or change "
            f"parallel.tp / parallel.dp"
        )


def build_dims(tp: int = 1, dp: Optional[int] = None, pp: int = 1) -> ParallelDims:
    """The layout for this process. `dp=None` takes world_size // (tp * pp).

    Collective: every rank must call it with the same degrees (new_group is collective, so
    all groups are created on every rank in the same order)."""
    initialized = dist.is_available() and dist.is_initialized()
    world_size = dist.get_world_size() if initialized else 1
    rank = dist.get_rank() if initialized else 0
    if dp is None:
        if world_size % (tp * pp):
            raise LayoutError(f"world size {world_size} is not divisible by parallel.tp={tp} x pp={pp}")
        dp = world_size // (tp * pp)
    validate_layout(tp, dp, pp, world_size)
    dims = ParallelDims(tp=tp, dp=dp, pp=pp, world_size=world_size, rank=rank)
    tp_rank, dp_rank, pp_rank = dims.tp_rank, dims.dp_rank, dims.pp_rank
    dims.tp_ranks = [rank_of(t, dp_rank, pp_rank, tp, dp) for t in range(tp)]
    dims.dp_ranks = [rank_of(tp_rank, d, pp_rank, tp, dp) for d in range(dp)]
    if not initialized:
        return dims
    # new_group is collective over the whole world: create every group, keep our own.
    for p in range(pp):
        for d in range(dp):
            ranks = [rank_of(t, d, p, tp, dp) for t in range(tp)]
            group = dist.new_group(ranks)
            if rank in ranks:
                dims.tp_group = group
        for t in range(tp):
            ranks = [rank_of(t, d, p, tp, dp) for d in range(dp)]
            group = dist.new_group(ranks)
            if rank in ranks:
                dims.dp_group = group
    return dims


def single_process_dims() -> ParallelDims:
    """The layout of one process, whether or not torch.distributed is initialised."""
    return ParallelDims(tp=1, dp=1, pp=1, world_size=1, rank=0, tp_ranks=[0], dp_ranks=[0])


def check_model_fits(dims: ParallelDims, num_heads: int, vocab_size: int, ffn_hidden: int) -> None:
    """Derived invariants of tensor parallelism, with the key to change."""
    if num_heads % dims.tp:
        raise LayoutError(f"parallel.tp={dims.tp} does not divide model.num_heads={num_heads}; change one of them")
    if vocab_size < dims.tp or ffn_hidden < dims.tp:
        raise LayoutError(
            f"parallel.tp={dims.tp} exceeds the vocabulary ({vocab_size}) or the FFN width ({ffn_hidden}); lower parallel.tp"
        )
