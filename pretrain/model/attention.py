"""Attention kernels, and the seam where fused GPU kernels plug in.

Two kinds of attention exist in an EBT, with different differentiability needs:

* the **context stream** (plain causal self-attention over x_1..x_S and the step token) never
  depends on the candidate y, so dE/dy never traverses it and training needs only its
  first-order gradient: any SDPA backend (flash included) is exact there;
* the **prediction stream** (p_i attends to the visible context keys and to itself) lies on
  the path of dE/dy and must be twice differentiable: only explicit softmax attention, SDPA's
  MATH backend, or a kernel written with its own double backward.

`PREDICTION_KERNELS` / `CONTEXT_KERNELS` map config names to implementations; a fused kernel
registers itself with `register_prediction_kernel` after it passes `tests/unit/test_attention.py`.
"""
from __future__ import annotations

import math
from typing import Callable, Dict

import torch
import torch.nn.functional as F


def _softmax_fp32(scores: torch.Tensor) -> torch.Tensor:
    """Softmax in at least float32 (float64 stays float64), cast back to the input dtype."""
    work = torch.promote_types(scores.dtype, torch.float32)
    return torch.softmax(scores.to(work), dim=-1).to(scores.dtype)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Readable reference: softmax(q k^T / sqrt(d) masked) v. q (B,H,Tq,d), k/v (B,H,Tk,d),
    allowed (Tq, Tk) bool. Differentiable to any order."""
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.matmul(_softmax_fp32(scores), v)


def causal_mask(length: int, device: torch.device) -> torch.Tensor:
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


def causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Fused causal attention (flash on GPU). First-order differentiable only."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def causal_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return masked_attention(q, k, v, causal_mask(q.shape[-2], q.device))


def prediction_visibility(num_pred: int, num_ctx: int, num_prefix: int, device: torch.device) -> torch.Tensor:
    """(S, Lc) bool: prediction i (0-based) sees context slots 0..i+num_prefix, i.e. the step
    token (if any) and x_1..x_{i+1} in 1-based token numbering."""
    rows = torch.arange(num_pred, device=device).unsqueeze(1)
    cols = torch.arange(num_ctx, device=device).unsqueeze(0)
    return cols <= rows + num_prefix


def two_stream_attention(
    q: torch.Tensor,
    k_self: torch.Tensor,
    v_self: torch.Tensor,
    k_ctx: torch.Tensor,
    v_ctx: torch.Tensor,
    num_prefix: int,
) -> torch.Tensor:
    """Prediction-stream attention without materialising the 2S x 2S pattern.

    q, k_self, v_self: (B,H,S,d) for the predictions; k_ctx, v_ctx: (B,H,Lc,d) cached context.
    Scores are (S, Lc) against the context plus one diagonal self score per prediction, so the
    work is S*(Lc+1) instead of (Lc+S)^2. Explicit ops only: differentiable to any order.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores_ctx = torch.matmul(q, k_ctx.transpose(-1, -2)) * scale
    if num_prefix < k_ctx.shape[-2] - 1:  # row 0 sees slots 0..num_prefix: else all see all
        visible = prediction_visibility(q.shape[-2], k_ctx.shape[-2], num_prefix, q.device)
        scores_ctx = scores_ctx.masked_fill(~visible, float("-inf"))
    score_self = (q * k_self).sum(-1, keepdim=True) * scale
    probs = _softmax_fp32(torch.cat([scores_ctx, score_self], dim=-1))
    probs_ctx, prob_self = probs[..., :-1], probs[..., -1:]
    return torch.matmul(probs_ctx, v_ctx) + prob_self * v_self


PredictionKernel = Callable[..., torch.Tensor]
ContextKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

PREDICTION_KERNELS: Dict[str, PredictionKernel] = {"two_stream": two_stream_attention}
CONTEXT_KERNELS: Dict[str, ContextKernel] = {"sdpa": causal_sdpa, "math": causal_math}


def register_prediction_kernel(name: str, fn: PredictionKernel) -> None:
    """Adds a prediction-stream kernel (same signature as `two_stream_attention`). It must
    support double backward; prove it with the tests before selecting it in a config."""
    PREDICTION_KERNELS[name] = fn
