"""FLOP accounting for tokens/s and MFU: the matmuls each training step really runs.

Counted: every matrix product (multiply-accumulate = 2 FLOPs) of the path the step takes,
with torch.utils.flop_counter's conventions, so `tests/unit/test_flops.py` can check the model
against `FlopCounterMode` to the FLOP: causal SDPA counts the full S x S square (4 S^2 D
forward; 10 S^2 D backward, the score recompute included, as torch's formulas do; a causal
kernel skips about half of it). Softmaxes, norms, RoPE, activations, the optimizer and
other elementwise work are left out. `counter_mapping()` gives FlopCounterMode the CPU flash
SDPA ops it otherwise counts as zero.

Per row of S tokens (P = 2 S V D, the vocabulary product):
* a prediction-stream energy evaluation F: per layer the q/k/v/o and SwiGLU products
  (8 S D^2 + 6 S D H), the two-stream attention core against the Lc = S + prefix context
  slots (4 S Lc D), the adaLN modulation (12 D^2), and the energy head 2 S D;
* its dE/dh (first order, w.r.t. activations only: autograd prunes the weight branches):
  the same products but the modulation's; the graph of both is what the outer backward
  differentiates, 2 products per recorded product whose gradient is needed (the energy
  head's forward product is not reached: the loss depends on dE/dh, not on E);
* the vocabulary products of one step: h = W_v2e p (P) and g = dE/dh @ W_v2e (P) always;
  with the second-order graph, the fused update (pretrain/model/vocab.py) adds r @ W_v2e^T
  and W_v2e's gradient (2P) and the outer backward W_v2e's gradient through h (P): 5P;
  the plain ops instead differentiate g = dE/dh @ W_v2e (2P) and h = W_v2e p (2P: p is a
  leaf that needs a gradient there): 6P;
* the context stream (Lc tokens, the last layer computes only k, v) forward, and backward
  (2x its products, SDPA by torch's formula) when a loss reaches it; it runs once per batch
  with `default` conditioning and `thinking.reuse_context`, else once per step;
* the Transformer++: 3x (its layers + the LM head's P); the fused LM-head cross-entropy
  runs the same three vocabulary products as the plain head.

MFU = counted FLOPs per second / the device's peak (`train.peak_flops`, else an estimate
from `peak_flops_estimate`).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from .model.config import ModelConfig

# Dense bf16 tensor-core peaks (FLOP/s) of common GPUs; fp32 runs use the TF32 figure / 2.
_GPU_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}


def _linears(cfg: ModelConfig, tokens: float) -> float:
    """q/k/v/o projections and SwiGLU of one block over `tokens` tokens (forward)."""
    d, h = cfg.dim, cfg.ffn_hidden
    return tokens * (8 * d * d + 6 * d * h)


def _modulation(cfg: ModelConfig) -> float:
    """adaLN modulation Linear(D, 6D) of one block, per row and evaluation (forward)."""
    return 12 * cfg.dim * cfg.dim if cfg.ebt_type == "adaln" else 0.0


def _context_forward(cfg: ModelConfig, length: int) -> float:
    """Context stream over `length` slots: all blocks but the last full, the last only k and v."""
    d = cfg.dim
    full = _linears(cfg, length) + 4 * length * length * d
    return (cfg.num_layers - 1) * full + 4 * length * d * d + cfg.num_layers * _modulation(cfg)


def _context_backward(cfg: ModelConfig, length: int) -> float:
    d = cfg.dim
    full = 2 * _linears(cfg, length) + 10 * length * length * d
    return (cfg.num_layers - 1) * full + 8 * length * d * d + cfg.num_layers * 2 * _modulation(cfg)


def _vocab_products(fused: bool, graph: bool, reached: bool, alpha_grad: bool) -> int:
    """Vocabulary products (units of P) of one thinking step: `graph` = it builds the
    second-order graph, `reached` = a loss backpropagates through it."""
    if not fused:
        return 6 if graph and reached else 2
    # h and g always; the fused op forms r @ W_v2e^T when u or alpha needs a gradient and
    # W_v2e's gradient when it does (in its forward, reached or not); W_v2e's gradient through h.
    return 2 + int(graph or alpha_grad) + int(graph) + int(graph and reached)


def ebt_step_flops(cfg: ModelConfig, seq_len: int, rows: int, num_steps: int, thinking: Optional[Any] = None) -> float:
    """FLOPs of one EBT training unroll (forward, dE/dh, outer backward) on `rows` sequences,
    following the path pretrain.thinking.unroll takes for `thinking` (a ThinkingConfig; None =
    its defaults, the S1 recipe)."""
    if thinking is None:
        from .thinking import ThinkingConfig

        thinking = ThinkingConfig()
    if cfg.attention != "two_stream":
        raise ValueError(f"pretrain.flops: model.attention={cfg.attention!r} is not modelled (two_stream only)")
    s, d, layers = seq_len, cfg.dim, cfg.num_layers
    vocab_p = 2 * s * (cfg.vocab_size or 0) * d
    prefix = 1 if cfg.ebt_type == "time_embed" else 0
    lc = s + prefix
    pred_fwd = layers * (_linears(cfg, s) + 4 * s * lc * d + _modulation(cfg)) + 2 * s * d
    grad_h = pred_fwd - layers * _modulation(cfg)
    # The outer backward: 2 products per reached product of both graphs; the energy head's
    # forward is not reached, its dE/dh product has one input (the head) needing a gradient.
    outer = 2 * (pred_fwd - 2 * s * d) + 2 * (grad_h - 2 * s * d) + 2 * s * d

    alpha_grad = bool(cfg.learn_step_size)
    reuse = thinking.reuse_context and cfg.ebt_type == "default"
    weights = [1.0 / num_steps if thinking.loss_on == "mean" else float(k == num_steps - 1) for k in range(num_steps)]
    # Which steps does a loss reach? Its own (weight > 0), and an earlier one whose y' keeps its
    # graph into a reached later step (no detach, not cut: pretrain.thinking.unroll's `cut`).
    second = [thinking.create_graph == "all" or k == num_steps - 1 for k in range(num_steps)]
    cut = [thinking.detach_between_steps or k == num_steps - 1 or (not second[k] and not alpha_grad)
           for k in range(num_steps)]
    reached = [False] * num_steps
    for k in reversed(range(num_steps)):
        reached[k] = weights[k] > 0 or (not cut[k] and k + 1 < num_steps and reached[k + 1])
    total = 0.0
    y_grad = False  # does this step's candidate carry a graph from the previous step?
    for k in range(num_steps):
        fused = thinking.fused_vocab and thinking.grad_wrt == "probs" and cut[k] and not y_grad
        second_order = second[k] and reached[k]
        body = pred_fwd + grad_h + (outer if second_order else 0.0)
        n_p = _vocab_products(fused, second[k], reached[k], alpha_grad)
        total += body + n_p * vocab_p
        if not reuse:
            total += _context_forward(cfg, lc) + (_context_backward(cfg, lc) if second_order else 0.0)
        y_grad = not cut[k]
    if reuse:
        graphs = any(g and r for g, r in zip(second, reached))
        total += _context_forward(cfg, lc) + (_context_backward(cfg, lc) if graphs else 0.0)
    return rows * total


def transformer_pp_step_flops(cfg: ModelConfig, seq_len: int, rows: int) -> float:
    """FLOPs of one Transformer++ training step (forward + backward) on `rows` sequences."""
    s, d = seq_len, cfg.dim
    layer = 3 * _linears(cfg, s) + (4 + 10) * s * s * d
    return rows * (cfg.num_layers * layer + 3 * 2 * s * d * (cfg.vocab_size or 0))


def counter_mapping() -> Dict[Any, Any]:
    """`FlopCounterMode(custom_mapping=...)` entries for the CPU flash SDPA ops (torch's own SDPA
    formulas), which FlopCounterMode otherwise counts as zero FLOPs."""
    from torch.utils import flop_counter as fc

    def forward(query, key, value, *_args, out_shape=None, **_kw) -> int:
        return fc.sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *_args, out_shape=None, **_kw) -> int:
        return fc.sdpa_backward_flop_count(grad_out, query, key, value)

    aten = torch.ops.aten
    return {aten._scaled_dot_product_flash_attention_for_cpu: forward,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}


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
