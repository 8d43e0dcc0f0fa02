"""The Transformer++ baseline: the same blocks as the EBT's context stream, causal attention,
an input embedding and an untied LM head. Trained first-order, so fused attention is fine."""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import ModelConfig
from .ebt import _init_weights
from .layers import Block, RMSNorm, rope_tables
from .vocab import LOCAL_VOCAB


class TransformerPP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size: must be set (or taken from the tokenizer) before building the model")
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(
            Block(cfg.dim, cfg.num_heads, cfg.ffn_hidden, cfg.norm_eps, adaln=False) for _ in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos.float(), persistent=False)
        self.register_buffer("rope_sin", sin.float(), persistent=False)
        self.vocab_ops = LOCAL_VOCAB  # tensor parallelism swaps in a vocab-parallel cross-entropy
        _init_weights(self, cfg.init_std)

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B,S) -> final normed hidden states (B,S,D), the LM head's input."""
        s = input_ids.shape[1]
        if s > self.cfg.max_seq_len:
            raise ValueError(f"context length {s} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        h = self.tok_embeddings(input_ids)
        cos, sin = self.rope_cos[:s], self.rope_sin[:s]
        for layer in self.layers:
            h, _, _ = layer.forward_context(h, cos, sin, self.cfg.context_attention)
        return self.norm(h)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B,S) -> next-token logits (B,S,V)."""
        return self.lm_head(self.hidden(input_ids))

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token CE without materialising the (B,S,V) logits (the fused, chunked LM
        head of pretrain/model/vocab.py; vocab-parallel under tp). Equals
        vocab_ops.cross_entropy(model(input_ids), targets)."""
        return self.vocab_ops.linear_cross_entropy(self.hidden(input_ids), self.lm_head.weight, targets)
