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
  only its inputs (the candidate, the cached context, the parameters).

Applied in place by wrapping bound methods, so the model class and its state dict stay as
they are.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch.nn as nn
from torch.utils.checkpoint import checkpoint

MODES = ("none", "block", "step")


def _checkpointed(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def run(*args, **kwargs):
        # preserve_rng_state=False: blocks draw no random numbers (no dropout), and restoring
        # the RNG on every recompute would cost time for nothing.
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)

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
    elif mode == "step":
        if not hasattr(model, "energy_from_probs"):
            raise ValueError("parallel.activation_checkpointing='step' needs an energy model; use 'block'")
        model.energy_from_probs = _checkpointed(model.energy_from_probs)
    model.activation_checkpointing = mode
    return model
