"""Activation checkpointing of the thinking loop, non-reentrant only.

Reentrant checkpointing (torch's use_reentrant=True, Megatron's CheckpointFunction,
DeepSpeed's activation_checkpointing) raises inside the thinking loop: the inner
`torch.autograd.grad(create_graph=True)` needs the graph that reentrant checkpointing hides.
The non-reentrant implementation recomputes through saved-tensor hooks and is exact at any
order (tests/distributed/test_parallel_tp.py checks it against the plain model).

Modes (`parallel.activation_checkpointing`):
* `none`;
* `block`: every transformer block of both streams (and of the Transformer++ baseline) keeps
  only its input; its activations are recomputed when a backward needs them;
* `step`: the whole prediction stream of one energy evaluation (one thinking step) keeps
  only its inputs (the candidate, the cached context, the parameters);
* `block_vjp`: second-order-aware per-block checkpointing (below); context-stream blocks as
  in `block`.

Why `block` saves little in EBT training: dE/dy is taken with create_graph=True, and the
graph of dE/dy holds every recomputed activation of the blocks (the backward of silu,
softmax, RMSNorm... needs them), alive until the loss backward. `block_vjp` checkpoints
the vector-Jacobian product too: a prediction-stream block is an autograd.Function that
keeps only its inputs; its backward under create_graph returns another Function
(`_CheckpointedVJP`) that keeps only (inputs, incoming gradient) and recomputes the block
and its VJP, with graph, when the outer backward reaches it. Both graphs then hold
O(layers x hidden) tensors, and one block's full second-order graph exists at a time.
Cost: the block's forward runs about three more times.

Applied in place by wrapping bound methods, so the model class and its state dict stay as
they are.
"""
from __future__ import annotations

import functools
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

MODES = ("none", "block", "step", "block_vjp")


def _checkpointed(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def run(*args, **kwargs):
        # preserve_rng_state=False: blocks draw no random numbers (no dropout), and restoring
        # the RNG on every recompute would cost time for nothing.
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)

    return run


def _vjp(
    run: Callable, inputs: Sequence[torch.Tensor], params: List[nn.Parameter], grad_out: torch.Tensor,
    create_graph: bool,
) -> Tuple[List[Optional[torch.Tensor]], List[torch.Tensor], torch.Tensor]:
    """Recomputes run(*inputs) and its VJP with grad_out. Returns (grads for inputs+params,
    the fresh input leaves, the output)."""
    leaves = [t.detach().requires_grad_(t.requires_grad) for t in inputs]
    with torch.enable_grad():
        out = run(*leaves)
        wrt = [t for t in leaves if t.requires_grad] + [p for p in params if p.requires_grad]
        got = iter(torch.autograd.grad(out, wrt, grad_out, allow_unused=True, create_graph=create_graph))
    grads = [next(got) if t.requires_grad else None for t in leaves] + [
        next(got) if p.requires_grad else None for p in params
    ]
    return grads, leaves, out


class _CheckpointedBlock(torch.autograd.Function):
    """out = run(*inputs), keeping only the inputs. `params` are passed so the graph links
    to them; `run` reads them from the module."""

    @staticmethod
    def forward(ctx, run: Callable, num_inputs: int, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.run, ctx.num_inputs = run, num_inputs
        ctx.params = list(tensors[num_inputs:])
        ctx.save_for_backward(*tensors[:num_inputs])
        with torch.no_grad():
            return run(*tensors[:num_inputs])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        inputs = ctx.saved_tensors
        if torch.is_grad_enabled():
            # Inside autograd.grad(create_graph=True): the VJP must itself be differentiable,
            # and checkpointed, so the dE/dy graph keeps only (inputs, grad_out).
            grads = _CheckpointedVJP.apply(ctx.run, len(inputs), ctx.params, grad_out, *inputs, *ctx.params)
            grads = [g if needed else None for g, needed in zip(grads, ctx.needs_input_grad[2:])]
        else:
            grads, _, _ = _vjp(ctx.run, inputs, ctx.params, grad_out, create_graph=False)
        return (None, None, *grads)


class _CheckpointedVJP(torch.autograd.Function):
    """(grads of run w.r.t. inputs and params, contracted with grad_out), keeping only
    (inputs, grad_out); its backward recomputes the block with graph (Hessian-vector
    products against the incoming cotangents)."""

    @staticmethod
    def forward(ctx, run, num_inputs, params, grad_out, *tensors):
        ctx.run, ctx.num_inputs, ctx.params = run, num_inputs, params
        inputs = tensors[:num_inputs]
        ctx.save_for_backward(grad_out, *inputs)
        grads, _, _ = _vjp(run, inputs, params, grad_out, create_graph=False)
        # autograd.Function outputs must be tensors: zeros stand for "no gradient".
        return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, (*inputs, *params)))

    @staticmethod
    def backward(ctx, *cotangents):
        grad_out, *inputs = ctx.saved_tensors
        with torch.enable_grad():
            g = grad_out.detach().requires_grad_(True)
            grads, leaves, _ = _vjp(ctx.run, inputs, ctx.params, g, create_graph=True)
            pairs = [(gr, c) for gr, c in zip(grads, cotangents) if gr is not None and c is not None and gr.requires_grad]
            targets = [g] + [t for t in leaves if t.requires_grad] + [p for p in ctx.params if p.requires_grad]
            got = iter(torch.autograd.grad([a for a, _ in pairs], targets, [c for _, c in pairs], allow_unused=True)
                       if pairs else [None] * len(targets))
        d_grad_out = next(got)
        d_inputs = [next(got) if t.requires_grad else None for t in leaves]
        d_params = [next(got) if p.requires_grad else None for p in ctx.params]
        return (None, None, None, d_grad_out, *d_inputs, *d_params)


def _vjp_checkpointed_prediction(layer: nn.Module) -> Callable:
    """layer.forward_prediction as a _CheckpointedBlock (tensor arguments become inputs)."""
    forward = layer.forward_prediction
    params = [p for p in layer.parameters()]

    @functools.wraps(forward)
    def run(h, cos, sin, k_ctx, v_ctx, num_prefix, kernel, cond=None):
        tensors = [h, k_ctx, v_ctx] + ([cond] if cond is not None else [])

        def block(h_, k_, v_, *c):
            return forward(h_, cos, sin, k_, v_, num_prefix, kernel, c[0] if c else None)

        return _CheckpointedBlock.apply(block, len(tensors), *tensors, *params)

    return run


def apply_activation_checkpointing(model: nn.Module, mode: str) -> nn.Module:
    """Wraps the model's blocks (`block`) or its energy evaluation (`step`) in non-reentrant
    checkpoints, in place."""
    if mode not in MODES:
        raise ValueError(f"parallel.activation_checkpointing: {mode!r} is not one of {MODES}")
    if mode == "none":
        return model
    if mode == "block":
        for layer in model.layers:
            for name in ("forward_context", "forward_prediction", "forward_masked"):
                setattr(layer, name, _checkpointed(getattr(layer, name)))
    elif mode == "block_vjp":
        for layer in model.layers:
            layer.forward_context = _checkpointed(layer.forward_context)
            layer.forward_masked = _checkpointed(layer.forward_masked)
            layer.forward_prediction = _vjp_checkpointed_prediction(layer)
    elif mode == "step":
        if not hasattr(model, "energy_from_embedding"):
            raise ValueError("parallel.activation_checkpointing='step' needs an energy model; use 'block'")
        # energy_from_probs calls it too, so the plain and the fused thinking step both checkpoint.
        model.energy_from_embedding = _checkpointed(model.energy_from_embedding)
    model.activation_checkpointing = mode
    return model
