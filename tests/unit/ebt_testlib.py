"""Helpers for the EBT core tests: tiny configs, weight-sharing model pairs, real text."""
from __future__ import annotations

import torch

from pretrain.model import build_model

VARIANTS = ("default", "time_embed", "adaln")


def tiny_model_cfg(**overrides) -> dict:
    cfg = dict(vocab_size=13, dim=16, num_heads=2, num_layers=2, max_seq_len=8, step_size=5.0)
    cfg.update(overrides)
    return cfg


def model_pair(seed: int = 0, dtype=torch.float64, **overrides):
    """(reference-attention model, two-stream model) with identical weights."""
    torch.manual_seed(seed)
    ref = build_model(tiny_model_cfg(attention="reference", **overrides)).to(dtype)
    fast = build_model(tiny_model_cfg(attention="two_stream", **overrides)).to(dtype)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def param_grads(model) -> dict:
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def pydoc_bytes() -> torch.Tensor:
    """Python's own documentation (stdlib pydoc_data), as byte ids: real English text."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def text_batches(data: torch.Tensor, batch: int, seq: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=generator)
    return torch.stack([data[s : s + seq + 1] for s in starts.tolist()])
