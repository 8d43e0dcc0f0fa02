"""The tensor-parallel plan: which parameters are split over tp, along which tensor dim, and
which model dimension that dim has in full. Data, not code: the tp layers (parallel.tensor)
slice their weights by it, the resharder (parallel.reshard) gathers and reslices checkpoints
by it, the gradient norm (parallel.grads) and DeepSpeed's model-parallel flags
(parallel.zero) count sharded gradients by it. A parameter the plan does not name is
replicated on every tp rank.

Parameter names are those of pretrain.model (EnergyTransformer and TransformerPP share
them); the plan is a pure function of the name, so a checkpoint can be resharded without
building a model.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Tuple


@dataclass(frozen=True)
class ShardRule:
    pattern: str
    """Regular expression matched (re.search) against the full parameter name."""
    dim: int
    """Tensor dim split over tp (0: output rows / embedding rows, 1: input columns)."""
    width: str
    """The ModelConfig attribute that is this dim's full size (uneven splits are allowed)."""


TP_PLAN: Tuple[ShardRule, ...] = (
    ShardRule(r"(^|\.)tok_embeddings\.weight$", 0, "vocab_size"),  # vocabulary-parallel embedding
    ShardRule(r"(^|\.)cand_embed\.weight$", 1, "vocab_size"),      # W_v2e consumes the V-slice of p
    ShardRule(r"(^|\.)lm_head\.weight$", 0, "vocab_size"),         # Transformer++: V-slice of logits
    ShardRule(r"\.attn\.w[qkv]\.weight$", 0, "dim"),               # column-parallel: heads
    ShardRule(r"\.attn\.wo\.weight$", 1, "dim"),                   # row-parallel
    ShardRule(r"\.ffn\.w_(gate|up)\.weight$", 0, "ffn_hidden"),    # column-parallel: hidden units
    ShardRule(r"\.ffn\.w_down\.weight$", 1, "ffn_hidden"),         # row-parallel
)

_COMPILED = tuple((re.compile(rule.pattern), rule) for rule in TP_PLAN)


def rule_for(name: str) -> Optional[ShardRule]:
    for pattern, rule in _COMPILED:
        if pattern.search(name):
            return rule
    return None


def tp_shard_dim(name: str) -> Optional[int]:
    """The tensor dim along which parameter `name` is split over tp, or None (replicated)."""
    rule = rule_for(name)
    return None if rule is None else rule.dim


def full_width(name: str, cfg) -> int:
    """The unsharded size of the split dim of parameter `name` (a local slice alone cannot tell
    an uneven split apart)."""
    rule = rule_for(name)
    if rule is None:
        raise KeyError(f"{name} is not split over tp")
    return int(getattr(cfg, rule.width))
