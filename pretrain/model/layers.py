"""Building blocks shared by the EBT and the Transformer++ baseline: RMSNorm, RoPE, SwiGLU,
multi-head attention projections and the pre-norm block (optionally adaLN-modulated).

A block can run three ways: over a full sequence with an explicit mask (reference path and
the naive checks), as the causal context stream (returning its keys/values for the
prediction stream), or as the prediction stream attending to cached context keys/values.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import CONTEXT_KERNELS, PREDICTION_KERNELS, masked_attention


class RMSNorm(nn.Module):
    """Weight-only RMSNorm (no bias: an additive constant would be gradient-free in dE/dy)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        work = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(work)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


def rope_tables(max_positions: int, head_dim: int, theta: float) -> Tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B,H,T,d); cos/sin (T, d/2) already gathered at the tokens' positions."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Attention(nn.Module):
    """Bias-free q/k/v/o projections; the attention arithmetic lives in attention.py."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, -1).transpose(1, 2)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        q = apply_rope(self._heads(self.wq(x)), cos, sin)
        k = apply_rope(self._heads(self.wk(x)), cos, sin)
        return q, k, self._heads(self.wv(x))

    def kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        return apply_rope(self._heads(self.wk(x)), cos, sin), self._heads(self.wv(x))

    def out(self, o: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = o.shape
        return self.wo(o.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    """Pre-norm block: h + attn(norm(h)), then h + ffn(norm(h)).

    With `adaln`, a conditioning vector c (B, D) gives shift/scale/gate per sub-layer
    (DiT-style). The modulation starts at zero and the gates enter as (1 + gate), so the block
    starts as a plain pre-norm block. Consequence at initialisation: the modulation weights get
    a gradient (through silu(c)), but the step embeddings c get EXACTLY ZERO, since every path
    from c to the energy runs through the zero modulation matrix; they start learning after the
    first optimizer step has moved the modulation. Tests that compare their gradients must move
    the modulation off zero first (tests/unit/test_model_exactness.py does).
    """

    def __init__(self, dim: int, num_heads: int, ffn_hidden: int, eps: float, adaln: bool) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(dim, eps)
        self.attn = Attention(dim, num_heads)
        self.ffn_norm = RMSNorm(dim, eps)
        self.ffn = SwiGLU(dim, ffn_hidden)
        self.modulation: Optional[nn.Linear] = None
        if adaln:
            self.modulation = nn.Linear(dim, 6 * dim, bias=False)

    # -- conditioning helpers -------------------------------------------------------------
    def _mods(self, cond: Optional[torch.Tensor]):
        if self.modulation is None or cond is None:
            return None
        return self.modulation(F.silu(cond)).unsqueeze(1).chunk(6, dim=-1)

    @staticmethod
    def _modulate(x: torch.Tensor, shift, scale) -> torch.Tensor:
        return x if shift is None else x * (1 + scale) + shift

    @staticmethod
    def _gate(x: torch.Tensor, gate) -> torch.Tensor:
        return x if gate is None else x * (1 + gate)

    def _attn_in(self, h, mods):
        return self._modulate(self.attn_norm(h), *(mods[0:2] if mods else (None, None)))

    def _ffn_residual(self, h, mods):
        x = self._modulate(self.ffn_norm(h), *(mods[3:5] if mods else (None, None)))
        return h + self._gate(self.ffn(x), mods[5] if mods else None)

    def _attn_residual(self, h, o, mods):
        return h + self._gate(self.attn.out(o), mods[2] if mods else None)

    # -- three ways to run ----------------------------------------------------------------
    def forward_masked(self, h, cos, sin, allowed, cond=None):
        """Full sequence with an explicit (T, T) visibility mask: the readable reference."""
        mods = self._mods(cond)
        q, k, v = self.attn.qkv(self._attn_in(h, mods), cos, sin)
        h = self._attn_residual(h, masked_attention(q, k, v, allowed), mods)
        return self._ffn_residual(h, mods)

    def forward_context(self, h, cos, sin, kernel: str, cond=None, need_output: bool = True):
        """Causal context stream. Returns (h_out or None, k, v) with RoPE applied to k.
        The last block's context output is never read by the prediction stream, so it is
        skipped with `need_output=False`."""
        mods = self._mods(cond)
        x = self._attn_in(h, mods)
        if not need_output:
            k, v = self.attn.kv(x, cos, sin)
            return None, k, v
        q, k, v = self.attn.qkv(x, cos, sin)
        h = self._attn_residual(h, CONTEXT_KERNELS[kernel](q, k, v), mods)
        return self._ffn_residual(h, mods), k, v

    def forward_context_incremental(self, h, cos, sin, past_k, past_v, cond=None, need_output: bool = True):
        """Context stream for new tokens h (B,n,D) given cached keys/values (B,H,T,d) of the
        tokens before them (inference KV cache). Returns (h_out or None, k_all, v_all)."""
        mods = self._mods(cond)
        x = self._attn_in(h, mods)
        if not need_output:
            k, v = self.attn.kv(x, cos, sin)
            return None, torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        q, k, v = self.attn.qkv(x, cos, sin)
        k_all, v_all = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        n, past = h.shape[1], past_k.shape[2]
        allowed = torch.arange(past + n, device=h.device)[None, :] <= torch.arange(n, device=h.device)[:, None] + past
        h = self._attn_residual(h, masked_attention(q, k_all, v_all, allowed), mods)
        return self._ffn_residual(h, mods), k_all, v_all

    def forward_prediction(self, h, cos, sin, k_ctx, v_ctx, num_prefix: int, kernel: str, cond=None):
        """Prediction stream: each prediction attends to its visible context and itself."""
        mods = self._mods(cond)
        q, k, v = self.attn.qkv(self._attn_in(h, mods), cos, sin)
        o = PREDICTION_KERNELS[kernel](q, k, v, k_ctx, v_ctx, num_prefix)
        h = self._attn_residual(h, o, mods)
        return self._ffn_residual(h, mods)
