"""The autoregressive energy transformer (EBT_SPEC section 2).

Data flow of one energy evaluation E(x, y):

    context ids x (B,S) --embed--> [step token?] x_1..x_S   (context stream, causal)
    candidate probs p (B,S,V) --W_v2e--> p_1..p_S             (prediction stream)
    prediction i attends to: step token, x_1..x_i, itself  ->  RMSNorm -> Linear(D->1) -> (B,S)

RoPE positions: context slot c at position c (the step token, when present, is slot 0);
prediction p_i sits at the position of the token it predicts, one past x_i.

`prepare()` runs the context stream and returns a `Context`; `energy_from_probs()` runs the
prediction stream against it. With `default` conditioning the context does not depend on the
thinking step, so the thinking loop prepares it once per batch and every step reuses it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List

import torch
import torch.nn as nn

from .attention import prediction_visibility
from .config import ModelConfig
from .layers import Block, RMSNorm, rope_tables
from .vocab import LOCAL_VOCAB


@dataclass
class Context:
    """The context stream's contribution to every energy evaluation of one batch.

    `tensors` are the per-layer keys and values [k_0, v_0, k_1, v_1, ...] (two_stream mode), or
    the embedded context [h_0] (reference mode). They are the only way the candidate's energy
    depends on the context, so the thinking loop may detach them into leaves, accumulate their
    gradients over steps and backpropagate the context stream once (`replace_tensors`).
    """

    tensors: List[torch.Tensor]
    num_prefix: int
    length: int
    step_index: int

    def replace_tensors(self, tensors: List[torch.Tensor]) -> "Context":
        return replace(self, tensors=list(tensors))


def _init_weights(module: nn.Module, std: float) -> None:
    for name, p in module.named_parameters():
        if name.endswith("step_size"):
            continue
        if "norm" in name:
            nn.init.ones_(p)
        elif "modulation" in name:
            nn.init.zeros_(p)
        else:
            nn.init.normal_(p, mean=0.0, std=std)


class EnergyTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size: must be set (or taken from the tokenizer) before building the model")
        self.cfg = cfg
        v, d = cfg.vocab_size, cfg.dim
        self.tok_embeddings = nn.Embedding(v, d)
        self.cand_embed = nn.Linear(v, d, bias=False)
        self.step_embeddings = nn.Embedding(cfg.num_step_embeddings, d) if cfg.ebt_type != "default" else None
        adaln = cfg.ebt_type == "adaln"
        self.layers = nn.ModuleList(
            Block(d, cfg.num_heads, cfg.ffn_hidden, cfg.norm_eps, adaln) for _ in range(cfg.num_layers)
        )
        self.norm = RMSNorm(d, cfg.norm_eps)
        self.energy_head = nn.Linear(d, 1, bias=False)
        self.step_size = nn.Parameter(torch.tensor(float(cfg.step_size)), requires_grad=cfg.learn_step_size)
        cos, sin = rope_tables(cfg.max_seq_len + 2, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos.float(), persistent=False)
        self.register_buffer("rope_sin", sin.float(), persistent=False)
        self.vocab_ops = LOCAL_VOCAB
        _init_weights(self, cfg.init_std)

    # -- properties the thinking loop relies on ----------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def context_depends_on_step(self) -> bool:
        return self.cfg.ebt_type != "default"

    @property
    def num_prefix(self) -> int:
        return 1 if self.cfg.ebt_type == "time_embed" else 0

    def step_index(self, step: int) -> int:
        """Steps beyond the trained ones reuse the last step embedding."""
        return min(int(step), self.cfg.num_step_embeddings - 1)

    def effective_step_size(self) -> torch.Tensor:
        """alpha clamped >= step_size_min, as it enters the candidate's (maybe V-sharded) update."""
        return self.vocab_ops.enter(self.step_size.clamp(min=self.cfg.step_size_min))

    # -- the two streams ----------------------------------------------------------------
    def _cond(self, step_index: int, batch: int):
        if self.cfg.ebt_type != "adaln":
            return None
        return self.step_embeddings.weight[step_index].expand(batch, -1)

    def _check_ids(self, ids: torch.Tensor) -> None:
        if ids.dim() != 2 or ids.dtype != torch.long:
            raise ValueError(f"context_ids must be (B, S) int64, got {tuple(ids.shape)} {ids.dtype}")
        if ids.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"context length {ids.shape[1]} exceeds model.max_seq_len={self.cfg.max_seq_len}")

    def prepare(self, context_ids: torch.Tensor, step: int = 0) -> Context:
        """Runs the context stream (embedding, step token, all blocks but the last's output)."""
        self._check_ids(context_ids)
        idx = self.step_index(step)
        batch = context_ids.shape[0]
        h = self.tok_embeddings(context_ids)
        if self.cfg.ebt_type == "time_embed":
            h = torch.cat([self.step_embeddings.weight[idx].expand(batch, 1, -1), h], dim=1)
        length = h.shape[1]
        if self.cfg.attention == "reference":
            return Context([h], self.num_prefix, length, idx)
        cos, sin = self.rope_cos[:length], self.rope_sin[:length]
        cond = self._cond(idx, batch)
        kv: List[torch.Tensor] = []
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            h, k, v = layer.forward_context(h, cos, sin, self.cfg.context_attention, cond, need_output=i < last)
            kv += [k, v]
        return Context(kv, self.num_prefix, length, idx)

    def energy_from_probs(self, context: Context, probs: torch.Tensor, step: int = 0) -> torch.Tensor:
        """Energies (B, S) of candidate distributions probs (B, S, V) given a prepared context."""
        return self.energy_from_embedding(context, self.cand_embed(probs), step)

    def energy_from_embedding(self, context: Context, h: torch.Tensor, step: int = 0) -> torch.Tensor:
        """Energies (B, S) of embedded candidates h = W_v2e p (B, S, D): the fused thinking
        step differentiates E with respect to h, and forms dE/dp = dE/dh @ W_v2e itself."""
        idx = self.step_index(step)
        if self.context_depends_on_step and context.step_index != idx:
            raise ValueError(
                f"context prepared for step {context.step_index} used at step {idx}: with "
                f"model.ebt_type={self.cfg.ebt_type!r} the context stream depends on the step"
            )
        batch, num_pred, _ = h.shape
        if num_pred + context.num_prefix != context.length:
            raise ValueError(f"candidate covers {num_pred} positions, context has {context.length - context.num_prefix}")
        first = 1 + context.num_prefix
        cos, sin = self.rope_cos[first : first + num_pred], self.rope_sin[first : first + num_pred]
        cond = self._cond(idx, batch)
        if self.cfg.attention == "reference":
            h = self._reference_prediction(context, h, cos, sin, cond)
        else:
            for i, layer in enumerate(self.layers):
                k_ctx, v_ctx = context.tensors[2 * i], context.tensors[2 * i + 1]
                h = layer.forward_prediction(h, cos, sin, k_ctx, v_ctx, context.num_prefix, "two_stream", cond)
        return self.energy_head(self.norm(h)).squeeze(-1)

    def _reference_prediction(self, context: Context, e, cos_p, sin_p, cond):
        """One masked pass over [step?, x_1..x_S, p_1..p_S] (the spec written out literally)."""
        h_ctx = context.tensors[0]
        lc, s = context.length, e.shape[1]
        h = torch.cat([h_ctx, e], dim=1)
        cos = torch.cat([self.rope_cos[:lc], cos_p])
        sin = torch.cat([self.rope_sin[:lc], sin_p])
        allowed = torch.zeros(lc + s, lc + s, dtype=torch.bool, device=e.device)
        allowed[:lc, :lc] = torch.ones(lc, lc, dtype=torch.bool, device=e.device).tril()
        allowed[lc:, :lc] = prediction_visibility(s, lc, context.num_prefix, e.device)
        allowed[lc:, lc:] = torch.eye(s, dtype=torch.bool, device=e.device)
        for layer in self.layers:
            h = layer.forward_masked(h, cos, sin, allowed, cond)
        return h[:, lc:]

    # -- public API -------------------------------------------------------------------------
    def energy(self, context_ids: torch.Tensor, candidate_logits: torch.Tensor, step: int = 0) -> torch.Tensor:
        """E(x, y): context_ids (B,S) int64, candidate_logits (B,S,V) -> energies (B,S).
        The softmax and the candidate embedding are applied inside."""
        widths = (self.vocab_size, self.vocab_ops.local_width(self.vocab_size))  # full V, or this rank's slice
        if candidate_logits.shape[:2] != context_ids.shape or candidate_logits.shape[-1] not in widths:
            raise ValueError(
                f"candidate_logits must be (B, S, V)={(*context_ids.shape, self.vocab_size)}, "
                f"got {tuple(candidate_logits.shape)}"
            )
        probs = self.vocab_ops.probs(self.vocab_ops.as_local(candidate_logits))
        return self.energy_from_probs(self.prepare(context_ids, step), probs, step)

    def forward(self, context_ids: torch.Tensor, candidate_logits: torch.Tensor, step: int = 0) -> torch.Tensor:
        return self.energy(context_ids, candidate_logits, step)


candidate_probs = LOCAL_VOCAB.probs
