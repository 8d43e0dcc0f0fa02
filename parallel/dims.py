"""The one factory for process groups: named axes `tp`, `dp` and `pp`.

Every module that communicates asks a `ParallelDims` for its group and rank
(`dims.tp_group`, `dims.dp_rank`, `dims.pp_group`); nothing else creates groups.

With more than one process the groups come from megatron-core's
`parallel_state.initialize_model_parallel` (it runs on gloo), so the layout is Megatron's and
Megatron tools that read `parallel_state` see the same groups. Only the process groups are
taken from Megatron: its tensor-parallel mappings and pipeline schedules are not
twice differentiable and stay out of the training step (parallel.tensor, parallel.pipeline).
A world of one needs neither torch.distributed nor megatron-core.

Rank layout (Megatron's default order `tp-cp-ep-dp-pp`): tensor parallelism is the
fastest-varying axis, so the ranks of one tensor-parallel group are consecutive (on a real
cluster: on the same node, where the per-layer all-reduces are cheapest), then data
parallelism, then pipeline stages:

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

`build_dims` checks Megatron's groups against this formula, and
tests/unit/test_pipeline_dims.py pins it against Megatron's own RankGenerator. A layout that
does not fit the launched processes fails at start-up with a message naming the degrees,
never as a hang in the first collective.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import List, Optional

import torch.distributed as dist

AXES = ("pp", "dp", "tp")
"""Mesh axes, slowest-varying first."""
MEGATRON_ORDER = "tp-cp-ep-dp-pp"
"""Megatron's axis order (fastest first) that `rank_of` reproduces."""


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
    pp_group: Optional[dist.ProcessGroup] = field(default=None, repr=False)
    model_parallel_group: Optional[dist.ProcessGroup] = field(default=None, repr=False)
    """The tp x pp ranks holding one model replica (Megatron's model-parallel group)."""
    tp_ranks: List[int] = field(default_factory=list)
    """Global ranks of this process's tensor-parallel group, in tp-rank order."""
    dp_ranks: List[int] = field(default_factory=list)
    """Global ranks of this process's data-parallel group, in dp-rank order."""
    pp_ranks: List[int] = field(default_factory=list)
    """Global ranks of this process's pipeline, stage 0 first."""

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
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        return (f"tp={self.tp} x dp={self.dp} x pp={self.pp} (rank {self.rank}: tp_rank {self.tp_rank}, "
                f"dp_rank {self.dp_rank}, pp_rank {self.pp_rank})")


def rank_of(tp_rank: int, dp_rank: int, pp_rank: int, tp: int, dp: int) -> int:
    """The global rank at mesh coordinates (Megatron order: tp fastest, pp slowest)."""
    return pp_rank * (dp * tp) + dp_rank * tp + tp_rank


def validate_layout(tp: int, dp: int, pp: int, world_size: int) -> None:
    """Raises LayoutError naming the degrees when tp * dp * pp != world_size."""
    for name, value in (("tp", tp), ("dp", dp), ("pp", pp)):
        if value < 1:
            raise LayoutError(f"parallel.{name}: must be >= 1, got {value}")
    if tp * dp * pp != world_size:
        raise LayoutError(
            f"parallel.tp={tp} x parallel.dp={dp} x parallel.pp={pp} = {tp * dp * pp} processes, but {world_size} "
            f"were launched (WORLD_SIZE); launch tp*dp*pp processes (e.g. torchrun --nproc-per-node "
            f"{tp * dp * pp}) or change parallel.tp / parallel.dp / parallel.pp"
        )


def _megatron_groups(dims: ParallelDims) -> None:
    """Creates the groups with megatron-core's parallel_state and checks they follow `rank_of`."""
    with warnings.catch_warnings():
        # Its import warns that Transformer Engine / Apex are absent: we use neither.
        warnings.simplefilter("ignore")
        from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=dims.tp, pipeline_model_parallel_size=dims.pp, order=MEGATRON_ORDER,
        create_gloo_process_groups=False,
    )
    dims.tp_group = parallel_state.get_tensor_model_parallel_group()
    dims.dp_group = parallel_state.get_data_parallel_group()
    dims.pp_group = parallel_state.get_pipeline_model_parallel_group()
    dims.model_parallel_group = parallel_state.get_model_parallel_group()
    got = {
        "tp": dist.get_process_group_ranks(dims.tp_group),
        "dp": dist.get_process_group_ranks(dims.dp_group),
        "pp": dist.get_process_group_ranks(dims.pp_group),
    }
    want = {"tp": dims.tp_ranks, "dp": dims.dp_ranks, "pp": dims.pp_ranks}
    if got != want:  # pragma: no cover - a megatron-core release with another layout
        raise LayoutError(f"megatron-core's process groups {got} differ from the documented layout {want}")


def build_dims(tp: int = 1, dp: Optional[int] = None, pp: int = 1) -> ParallelDims:
    """The layout for this process. `dp=None` takes world_size // (tp * pp).

    Collective: every rank must call it with the same degrees. Calling it again replaces the
    previous groups (megatron-core keeps them in module globals)."""
    initialized = dist.is_available() and dist.is_initialized()
    world_size = dist.get_world_size() if initialized else 1
    rank = dist.get_rank() if initialized else 0
    if dp is None:
        if world_size % (tp * pp):
            raise LayoutError(f"world size {world_size} is not divisible by parallel.tp={tp} x parallel.pp={pp}")
        dp = world_size // (tp * pp)
    validate_layout(tp, dp, pp, world_size)
    dims = ParallelDims(tp=tp, dp=dp, pp=pp, world_size=world_size, rank=rank)
    tp_rank, dp_rank, pp_rank = dims.tp_rank, dims.dp_rank, dims.pp_rank
    dims.tp_ranks = [rank_of(t, dp_rank, pp_rank, tp, dp) for t in range(tp)]
    dims.dp_ranks = [rank_of(tp_rank, d, pp_rank, tp, dp) for d in range(dp)]
    dims.pp_ranks = [rank_of(tp_rank, dp_rank, p, tp, dp) for p in range(pp)]
    if world_size > 1:
        _megatron_groups(dims)
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
