"""Megatron-style tensor parallelism that stays exact under double backward.

Owns: the conjugate collectives, the column/row-parallel attention and SwiGLU, the
vocabulary-parallel embedding, candidate embedding (W_v2e), LM head, softmax and
cross-entropy, and `tensor_parallelize`, which converts a built EnergyTransformer or
TransformerPP in place by slicing its full weights (same seed -> same model at every tp).

Why our own collectives (EBT_SPEC section 6, RECIPES.md): megatron-core's reduce has a
backward that is not itself differentiable and DTensor drops the second-order term at
plain-tensor boundaries. Here the two conjugate functions

    f = copy_to_tp:      forward identity,   backward all-reduce (calls g.apply)
    g = reduce_from_tp:  forward all-reduce, backward identity   (calls f.apply)

write their backward with the partner's `.apply`, so the backward graph built under
`create_graph=True` is again made of f and g and can be differentiated any number of times.

The invariant (Megatron's): a tensor outside a parallel region is replicated and its
gradient is the full gradient on every rank. A replicated tensor entering rank-local
computation goes through f (whose backward sums the partial gradients); a partial sum
leaving it goes through g. Two places in the EBT need f on something that is not a layer
input, because a replicated value is consumed by vocabulary-sharded arithmetic: the softmax
normaliser Z (p_local = e_local / Z) and the step size alpha (y_local - alpha * g_local).

Vocabulary shards may be uneven (rank r holds `shard_range(V, tp, r)`), so no padding of V.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from pretrain.model.ebt import EnergyTransformer
from pretrain.model.layers import apply_rope
from pretrain.model.transformer_pp import TransformerPP
from pretrain.model.vocab import fused_linear_cross_entropy, fused_update_cross_entropy

from .dims import ParallelDims, check_model_fits
from .plan import full_width, tp_shard_dim  # noqa: F401 - re-exported

Group = Optional[dist.ProcessGroup]


# -- conjugate collectives --------------------------------------------------------------------
class _CopyToTP(torch.autograd.Function):
    """f: identity forward, all-reduce backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _ReduceFromTP.apply(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """g: all-reduce (sum) forward, identity backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _CopyToTP.apply(grad, ctx.group), None


def copy_to_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """A replicated tensor entering rank-local computation (f)."""
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Sum of rank-local partial results, consumed by replicated computation (g)."""
    return _ReduceFromTP.apply(x, group)


def all_reduce_to_local(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Sum of partials consumed again by rank-local computation: f(g(x)), whose backward
    all-reduces the (partial) gradients as well."""
    return copy_to_tp(reduce_from_tp(x, group), group)


def _max_over_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Max without gradient: only used as a shift that softmax is invariant to."""
    out = x.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
    return out


def shard_range(size: int, parts: int, index: int) -> Tuple[int, int]:
    """[start, end) of part `index` when `size` is split into `parts` near-equal pieces
    (the first size % parts pieces are one longer)."""
    base, rem = divmod(size, parts)
    start = index * base + min(index, rem)
    return start, start + base + (1 if index < rem else 0)


def _slice(weight: torch.Tensor, dim: int, dims: ParallelDims) -> nn.Parameter:
    start, end = shard_range(weight.shape[dim], dims.tp, dims.tp_rank)
    piece = weight.detach().narrow(dim, start, end - start).clone()
    return nn.Parameter(piece, requires_grad=weight.requires_grad)


def _slice_param(weight: torch.Tensor, name: str, dims: ParallelDims) -> nn.Parameter:
    """This rank's slice of full parameter `name`, along the dim the plan gives."""
    dim = tp_shard_dim(name)
    if dim is None:
        raise KeyError(f"{name}: not in the tensor-parallel plan (parallel.plan.TP_PLAN)")
    return _slice(weight, dim, dims)


# -- layers -----------------------------------------------------------------------------------
class TPAttention(nn.Module):
    """Heads split over tp: wq/wk/wv column-parallel (their output rows), wo row-parallel
    (its input columns). Same method names as pretrain.model.layers.Attention, so Block runs
    unchanged; one f per call covers q, k and v."""

    def __init__(self, full: nn.Module, dims: ParallelDims, prefix: str) -> None:
        super().__init__()
        self.group = dims.tp_group
        self.num_heads = full.num_heads // dims.tp
        for name in ("wq", "wk", "wv", "wo"):
            weight = getattr(full, name).weight
            setattr(self, name, _linear_from(_slice_param(weight, f"{prefix}.{name}.weight", dims)))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, -1).transpose(1, 2)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        x = copy_to_tp(x, self.group)
        q = apply_rope(self._heads(self.wq(x)), cos, sin)
        k = apply_rope(self._heads(self.wk(x)), cos, sin)
        return q, k, self._heads(self.wv(x))

    def kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        x = copy_to_tp(x, self.group)
        return apply_rope(self._heads(self.wk(x)), cos, sin), self._heads(self.wv(x))

    def out(self, o: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = o.shape
        return reduce_from_tp(self.wo(o.transpose(1, 2).reshape(b, t, -1)), self.group)


class TPSwiGLU(nn.Module):
    """SwiGLU hidden units split over tp: w_gate/w_up column-parallel, w_down row-parallel."""

    def __init__(self, full: nn.Module, dims: ParallelDims, prefix: str) -> None:
        super().__init__()
        self.group = dims.tp_group
        for name in ("w_gate", "w_up", "w_down"):
            weight = getattr(full, name).weight
            setattr(self, name, _linear_from(_slice_param(weight, f"{prefix}.{name}.weight", dims)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = copy_to_tp(x, self.group)
        return reduce_from_tp(self.w_down(F.silu(self.w_gate(x)) * self.w_up(x)), self.group)


def _linear_from(weight: nn.Parameter) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    layer.weight = weight
    return layer


class VocabParallelEmbedding(nn.Module):
    """Input embedding with rows (token ids) split over tp; ids outside the shard give zero
    and the partial embeddings are summed (g)."""

    def __init__(self, full: nn.Embedding, dims: ParallelDims) -> None:
        super().__init__()
        self.group = dims.tp_group
        self.start, self.end = shard_range(full.weight.shape[0], dims.tp, dims.tp_rank)
        self.weight = _slice_param(full.weight, "tok_embeddings.weight", dims)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        inside = (ids >= self.start) & (ids < self.end)
        local = (ids - self.start).clamp(0, self.end - self.start - 1)
        out = F.embedding(local, self.weight) * inside.unsqueeze(-1).to(self.weight.dtype)
        return reduce_from_tp(out, self.group)


class VocabParallelCandidateEmbedding(nn.Module):
    """W_v2e (bias-free Linear V -> D) with its input columns split over tp: consumes the
    rank's V-slice of the candidate probabilities, partial products summed (g)."""

    def __init__(self, full: nn.Linear, dims: ParallelDims) -> None:
        super().__init__()
        self.group = dims.tp_group
        self.weight = _slice_param(full.weight, "cand_embed.weight", dims)

    def forward(self, probs_local: torch.Tensor) -> torch.Tensor:
        return reduce_from_tp(F.linear(probs_local, self.weight), self.group)


class VocabParallelLMHead(nn.Module):
    """Transformer++ LM head with output rows split over tp: returns the rank's V-slice of
    the logits (pair it with VocabParallel.cross_entropy)."""

    def __init__(self, full: nn.Linear, dims: ParallelDims) -> None:
        super().__init__()
        self.group = dims.tp_group
        self.weight = _slice_param(full.weight, "lm_head.weight", dims)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tp(h, self.group), self.weight)


# -- vocabulary-parallel candidate ops ------------------------------------------------------------
class VocabParallel:
    """`model.vocab_ops` under tp: each rank holds the V-slice `shard_range(V, tp, tp_rank)`
    of every (B, S, V) candidate. Same interface as pretrain.model.vocab.LocalVocab."""

    def __init__(self, vocab_size: int, dims: ParallelDims) -> None:
        self.vocab_size = vocab_size
        self.group = dims.tp_group
        self.tp = dims.tp
        self.start, self.end = shard_range(vocab_size, dims.tp, dims.tp_rank)

    @property
    def local_size(self) -> int:
        return self.end - self.start

    def local_width(self, vocab_size: int) -> int:
        return self.local_size

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        return full[..., self.start : self.end]

    def as_local(self, logits: torch.Tensor) -> torch.Tensor:
        """Full-V logits sliced to this rank's V-slice; a slice passes through."""
        return self.shard(logits) if logits.shape[-1] == self.vocab_size != self.local_size else logits

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """A replicated value consumed by V-sharded arithmetic (the step size alpha times the
        sharded dE/dp): its gradient is partial on every rank, so f."""
        return copy_to_tp(x, self.group)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """softmax over the full V in at least float32. Z feeds sharded arithmetic, so it
        takes f(g(.)): its gradient is partial on every rank and must be summed."""
        work = torch.promote_types(logits.dtype, torch.float32)
        y = logits.to(work)
        shifted = torch.exp(y - _max_over_tp(y.amax(-1, keepdim=True), self.group))
        z = all_reduce_to_local(shifted.sum(-1, keepdim=True), self.group)
        return (shifted / z).to(logits.dtype)

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean token CE over the full V (targets == -100 ignored), twice differentiable.
        logsumexp and the target logit are replicated after g, as is the loss."""
        work = torch.promote_types(logits.dtype, torch.float32)
        y = logits.to(work)
        shift = _max_over_tp(y.amax(-1, keepdim=True), self.group)
        sum_exp = reduce_from_tp(torch.exp(y - shift).sum(-1), self.group)
        lse = torch.log(sum_exp) + shift.squeeze(-1)
        inside = (targets >= self.start) & (targets < self.end)
        local = (targets - self.start).clamp(0, self.end - self.start - 1)
        target_logit = reduce_from_tp(y.gather(-1, local.unsqueeze(-1)).squeeze(-1) * inside.to(work), self.group)
        valid = (targets != -100).to(work)
        return ((lse - target_logit) * valid).sum() / valid.sum()

    def update_cross_entropy(self, probs, u, weight, alpha, targets):
        """The fused step end of pretrain.model.vocab on this rank's V-slice (probs, weight,
        y'); u, alpha, targets and the loss are replicated. alpha arrives through copy_to_tp
        (`_tp_effective_step_size`), which sums the Function's partial alpha gradients."""
        return fused_update_cross_entropy(probs, u, weight, alpha, targets, self.group, self.start)

    def linear_cross_entropy(self, hidden, weight, targets):
        """Fused LM-head CE on this rank's rows of the head (weight (V_local, D)), hidden replicated."""
        return fused_linear_cross_entropy(hidden, weight, targets, self.group, self.start)

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """The full-V tensor from every rank's slice (no gradient: inference and export)."""
        return gather_dim(local.detach(), -1, self.vocab_size, self.group, self.tp)


def gather_dim(local: torch.Tensor, dim: int, full_size: int, group: Group, parts: int) -> torch.Tensor:
    """Concatenate uneven `shard_range` slices of every rank of `group` along `dim`."""
    dim = dim % local.dim()
    longest = shard_range(full_size, parts, 0)
    width = longest[1] - longest[0]
    pad = [0, 0] * (local.dim() - dim - 1) + [0, width - local.shape[dim]]
    padded = F.pad(local, pad).contiguous()
    pieces = [torch.empty_like(padded) for _ in range(parts)]
    dist.all_gather(pieces, padded, group=group)
    sizes = [e - s for s, e in (shard_range(full_size, parts, r) for r in range(parts))]
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(pieces, sizes)], dim=dim)


# -- in-place conversion ---------------------------------------------------------------------------
def tensor_parallelize(model: nn.Module, dims: ParallelDims) -> nn.Module:
    """Converts a full EnergyTransformer or TransformerPP to this rank's tp shard, in place:
    its blocks' attention and SwiGLU, the embeddings and the candidate/vocabulary operations
    (`model.vocab_ops`, the model's one seam for V-sharded arithmetic) are replaced by their
    tp forms; the model's own methods are untouched.

    Every rank must hold the same full weights first (same seed, or a loaded checkpoint);
    parameter names are unchanged, sharded ones just hold their slice (parallel.plan).
    tp == 1 returns the model untouched."""
    if dims.tp == 1:
        return model
    if not isinstance(model, (EnergyTransformer, TransformerPP)):
        raise TypeError(f"tensor_parallelize: unsupported model {type(model).__name__}")
    cfg = model.cfg
    check_model_fits(dims, cfg.num_heads, cfg.vocab_size, cfg.ffn_hidden)
    for i, block in enumerate(model.layers):
        block.attn = TPAttention(block.attn, dims, f"layers.{i}.attn")
        block.ffn = TPSwiGLU(block.ffn, dims, f"layers.{i}.ffn")
    model.tok_embeddings = VocabParallelEmbedding(model.tok_embeddings, dims)
    model.vocab_ops = VocabParallel(cfg.vocab_size, dims)
    if isinstance(model, EnergyTransformer):
        model.cand_embed = VocabParallelCandidateEmbedding(model.cand_embed, dims)
    else:
        model.lm_head = VocabParallelLMHead(model.lm_head, dims)
    return model
