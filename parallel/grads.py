"""Gradient synchronisation for data parallelism, and the tp-aware gradient norm.

Why not torch's DistributedDataParallel: its reducer is armed by `DDP.forward` and expects
one backward per forward that reaches every parameter. The thinking unroll runs one backward
per thinking step plus a final one through the cached context stream (which reaches only the
context-stream parameters), all inside one logical forward. Wrapping it would either
all-reduce K+1 times per micro-batch or wait forever for parameters the last backward never
touches. DDP's arithmetic is simple to do exactly instead: let every backward accumulate
into `.grad` locally, then at the end of the optimizer step's last backward all-reduce all
gradients in a few flat buckets over the dp group and divide by dp. That is one all-reduce
per bucket per optimizer step, whatever the number of thinking steps and micro-batches.
"""
from __future__ import annotations

import math
from typing import Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .dims import ParallelDims
from .plan import tp_shard_dim

DEFAULT_BUCKET_ELEMENTS = 2**25
"""Elements per flat all-reduce bucket (128 MiB of float32): a bounded extra buffer."""


class MissingGradientError(RuntimeError):
    """A trainable parameter got no gradient: data-parallel replicas would silently diverge."""


def broadcast_parameters(model: nn.Module, dims: ParallelDims) -> None:
    """Every dp replica starts from the dp-rank-0 weights (what DDP does at construction)."""
    if dims.dp == 1:
        return
    for tensor in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(tensor.data, src=dims.dp_ranks[0], group=dims.dp_group)


class DataParallelGrads:
    """Flat-bucket all-reduce (average) of all trainable gradients over the dp group."""

    def __init__(self, model: nn.Module, dims: ParallelDims, bucket_elements: int = DEFAULT_BUCKET_ELEMENTS) -> None:
        self.dims = dims
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.bucket_elements = bucket_elements
        self.num_all_reduces = 0
        """All-reduce calls issued so far (the docs' per-step communication count)."""

    def _buckets(self) -> List[List[torch.Tensor]]:
        buckets: List[List[torch.Tensor]] = [[]]
        size = 0
        for _, p in self.named:
            if buckets[-1] and (size + p.numel() > self.bucket_elements or p.grad.dtype != buckets[-1][0].dtype):
                buckets.append([])
                size = 0
            buckets[-1].append(p.grad)
            size += p.numel()
        return [b for b in buckets if b]

    def all_reduce(self) -> None:
        missing = [n for n, p in self.named if p.grad is None]
        if missing:
            raise MissingGradientError(
                f"no gradient for {missing[:3]}{'...' if len(missing) > 3 else ''}: every trainable parameter must "
                "receive a gradient each optimizer step (a structurally gradient-free parameter, e.g. a bias on the "
                "energy head, breaks data parallelism; remove it or freeze it)"
            )
        if self.dims.dp == 1:
            return
        for grads in self._buckets():
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=self.dims.dp_group)
            self.num_all_reduces += 1
            flat.div_(self.dims.dp)
            for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
                grad.copy_(synced)


def grad_norm_sq_parts(named: Iterable[Tuple[str, torch.nn.Parameter]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sum of squares over tp-sharded grads on this rank, over replicated grads)."""
    sharded = torch.zeros((), dtype=torch.float64)
    replicated = torch.zeros((), dtype=torch.float64)
    for name, p in named:
        if p.grad is None:
            continue
        sq = p.grad.detach().double().pow(2).sum().cpu()
        if tp_shard_dim(name) is not None:
            sharded += sq
        else:
            replicated += sq
    return sharded, replicated


def clip_grad_norm_(model: nn.Module, max_norm: Optional[float], dims: ParallelDims) -> torch.Tensor:
    """Global gradient norm of the full (unsharded) model, and clipping by it, on every rank.

    Sharded gradients' squares are summed over tp; replicated ones (norms, alpha, energy
    head) are identical on every tp rank and counted once; pipeline stages' sums add up. Call after the dp all-reduce.
    Returns the norm before clipping, in the gradients' dtype."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.grad is not None]
    is_tp = dims.tp > 1
    sharded, replicated = grad_norm_sq_parts(named if is_tp else [("", p) for _, p in named])
    if is_tp:
        dist.all_reduce(sharded, group=dims.tp_group)
    total = sharded + replicated
    if dims.pp > 1:
        # Pipeline stages hold disjoint parameters: their squares add up.
        dist.all_reduce(total, group=dims.pp_group)
    norm = torch.sqrt(total)
    if max_norm is not None and max_norm > 0 and math.isfinite(float(norm)):
        coef = min(1.0, max_norm / (float(norm) + 1e-6))
        if coef < 1.0:
            for _, p in named:
                p.grad.detach().mul_(coef)
    return norm.to(named[0][1].grad.dtype if named else torch.float32)
