"""EBT-aware FLOP accounting for tokens/s and MFU.

What is counted (multiply-accumulate = 2 FLOPs; matmuls and attention only: softmax,
norms, RoPE, activations, the optimizer and the loss are left out as lower-order terms):

* A transformer layer over T query tokens, each attending to on average K keys:
  q/k/v/o projections 8*T*D^2, SwiGLU 6*T*D*H (H = ffn hidden), attention scores and
  weighted values 4*T*K*D.
* EBT, per thinking step, on the prediction stream (S predictions: the candidate
  embedding 2*S*V*D, the layers with prediction i seeing context x_1..x_i and itself,
  i.e. K = (S+1)/2 + 1, and the energy head 2*S*D). Call its forward F_p.
  - forward: F_p;
  - first-order backward for dE/dy: gradients w.r.t. activations only, ~F_p for the
    linear maps and 2x the attention core (dQ and dK/dV): call it B1 ~ F_p + attn_p;
  - second-order outer backward, on steps that build the graph (`create_graph`): it
    differentiates both recorded graphs, the forward's and the first backward's, each
    costing 2x its own FLOPs: 2*(F_p + B1). A step without create_graph (S2 truncation)
    contributes no parameter gradient through its energy and is counted as F_p + B1.
* EBT context stream (S tokens, causal, K = (S+1)/2): forward F_c plus its backward 2*F_c
  (the loss reaches it through the keys/values). With `default` conditioning and
  `reuse_context` it runs once per batch; otherwise once per thinking step.
* Transformer++: 3x (forward of the layers + the LM head 2*S*D*V).

MFU = counted FLOPs per second / the device's peak (`train.peak_flops`, else an estimate
from `peak_flops_estimate`).
"""
from __future__ import annotations

from typing import Optional

import torch

from .model.config import ModelConfig

# Dense bf16 tensor-core peaks (FLOP/s) of common GPUs; fp32 runs use the TF32 figure / 2.
_GPU_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}


def _layer_flops(cfg: ModelConfig, tokens: float, keys: float) -> float:
    d, h = cfg.dim, cfg.ffn_hidden
    return tokens * (8 * d * d + 6 * d * h) + 4 * tokens * keys * d


def _attention_flops(cfg: ModelConfig, tokens: float, keys: float) -> float:
    return 4 * tokens * keys * cfg.dim


def ebt_step_flops(
    cfg: ModelConfig,
    seq_len: int,
    rows: int,
    num_steps: int,
    create_graph: str = "all",
    reuse_context: bool = True,
) -> float:
    """FLOPs of one EBT training unroll (forward, dE/dy, outer backward) on `rows` sequences."""
    s, v, d, layers = seq_len, cfg.vocab_size or 0, cfg.dim, cfg.num_layers
    prefix = 1 if cfg.ebt_type == "time_embed" else 0
    pred_keys = (s + 1) / 2 + prefix + 1
    f_p = 2 * s * v * d + layers * _layer_flops(cfg, s, pred_keys) + 2 * s * d
    b1 = f_p + layers * _attention_flops(cfg, s, pred_keys)
    ctx_tokens = s + prefix
    f_c = layers * _layer_flops(cfg, ctx_tokens, (ctx_tokens + 1) / 2)
    context_runs = 1 if reuse_context and cfg.ebt_type == "default" else num_steps
    total = context_runs * 3 * f_c
    for k in range(num_steps):
        second_order = create_graph == "all" or k == num_steps - 1
        total += f_p + b1 + (2 * (f_p + b1) if second_order else 0.0)
    return rows * total


def transformer_pp_step_flops(cfg: ModelConfig, seq_len: int, rows: int) -> float:
    """FLOPs of one Transformer++ training step (forward + backward) on `rows` sequences."""
    s = seq_len
    forward = cfg.num_layers * _layer_flops(cfg, s, (s + 1) / 2) + 2 * s * cfg.dim * (cfg.vocab_size or 0)
    return rows * 3 * forward


def peak_flops_estimate(device: torch.device, dtype: torch.dtype) -> float:
    """A device's peak FLOP/s: a table of GPUs (by name), else CPU cores x 2.5 GHz x 32 fp32
    FLOPs/cycle (two AVX2 FMA units). An estimate: set `train.peak_flops` for a real figure."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in _GPU_PEAKS.items():
            if key in name:
                return peak if dtype == torch.bfloat16 else peak / 2
        return 100e12
    return torch.get_num_threads() * 2.5e9 * 32


def mfu(flops: float, seconds: float, peak: Optional[float]) -> float:
    """Model FLOPs utilisation in [0, 1] (0 when unknown)."""
    if not peak or seconds <= 0:
        return 0.0
    return flops / seconds / peak
