"""torch.compile of the thinking step (`train.compile`): the prediction stream's energy and its
dE/dh, compiled together so the second-order (outer) backward runs through compiled code.

The recipe (measured exact and 1.3-1.4x faster on this part, benchmarks/compile_probe.py):
`torch._dynamo.config.trace_autograd_ops = True` so dynamo traces the inner
`autograd.grad(..., create_graph=True)`, `fullgraph=True`, and every tensor the energy depends
on enters as a leaf created outside the compiled region (dynamo cannot trace an
`autograd.grad` whose graph reaches a tensor with an outside grad_fn). The leaves are the
embedded candidate h = W_v2e p and the context's keys/values; `LeafCarry` hands their
gradients back to the real tensors after each backward, so W_v2e, the context stream and the
parameters get exactly the gradients of the eager step (tests/unit/test_compiled.py).

Only the fused thinking step that builds the second-order graph is compiled (where the step's
time goes); the rest stays eager. Dynamo specialises on the step index (time_embed / adaln),
the row count and the context length, so each distinct one is one more cold compile; its
seconds are counted in `cold_seconds` and reported in the progress line.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .config import COMPILE_MODES
from .model.ebt import Context, EnergyTransformer

BackwardFn = Callable[[Sequence[torch.Tensor], Optional[Sequence[torch.Tensor]], bool], None]


def resolve(mode: str, device: torch.device) -> bool:
    """`train.compile` -> whether to compile. `auto` is off: on this project's CPU a cold
    compile takes minutes per distinct step signature (step index, rows, context length),
    which the ~1.5x on the S1 unroll repays only after hundreds of steps, more than the demo
    runs take (docs/performance.md); on CUDA it has not been measured (no GPU was lent), so
    it is not turned on there unmeasured either."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"train.compile: {mode!r} is not one of {COMPILE_MODES}")
    return mode == "true"


class CompiledEnergyGrad:
    """(context, h, step) -> (E (B, S), dE/dh with its second-order graph), compiled."""

    def __init__(self, model: EnergyTransformer, backend: str = "inductor") -> None:
        import torch._dynamo

        torch._dynamo.config.trace_autograd_ops = True
        self.model = model
        self._base = _compile_seconds()
        self.calls = 0
        self._fn = torch.compile(self._energy_grad, fullgraph=True, backend=backend)

    def _energy_grad(self, tensors: List[torch.Tensor], h: torch.Tensor, num_prefix: int, length: int,
                     step_index: int, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        context = Context(list(tensors), num_prefix, length, step_index)
        energy = self.model.energy_from_embedding(context, h, step)
        (u,) = torch.autograd.grad(energy.sum(), h, create_graph=True)
        return energy, u

    @property
    def cold_seconds(self) -> float:
        """Seconds this process spent compiling since this object was made (cold compiles):
        dynamo's capture and the forward's code, and the backward's code, which AOTAutograd
        compiles lazily at the first backward."""
        return _compile_seconds() - self._base

    def __call__(self, context: Context, h: torch.Tensor, step: int, carry: "LeafCarry"):
        tensors = [carry.leaf(t) for t in context.tensors]
        h_leaf = carry.leaf(h)
        # `default` conditioning ignores the step: one compiled graph serves every step.
        step = step if self.model.context_depends_on_step or self.model.cfg.ebt_type != "default" else 0
        self.calls += 1
        return self._fn(tensors, h_leaf, context.num_prefix, context.length, context.step_index, step)


def _compile_seconds() -> float:
    """torch's own compile timers: dynamo's compile (forward code included) + the lazy backward's."""
    from torch._dynamo.utils import compilation_time_metrics

    return sum(sum(compilation_time_metrics.get(key, ())) for key in ("_compile.compile_inner", "backward._backward_impl"))


class LeafCarry:
    """Leaves standing in for graph tensors inside the compiled region, and the backward that
    carries their gradients on into the real tensors' graphs."""

    def __init__(self) -> None:
        self.pairs: List[Tuple[torch.Tensor, torch.Tensor]] = []

    def leaf(self, t: torch.Tensor) -> torch.Tensor:
        if not t.requires_grad or t.grad_fn is None:
            return t  # already a leaf (the reused context's keys/values) or a constant
        leaf = t.detach().requires_grad_(True)
        self.pairs.append((t, leaf))
        return leaf

    def wrap(self, backward_fn: BackwardFn) -> BackwardFn:
        """A backward_fn that runs `backward_fn`, then carries the leaves' gradients into their
        tensors; the last of the two calls takes the caller's `is_last` (the gradient sync)."""

        def run(tensors, grads, is_last: bool) -> None:
            if not self.pairs:
                backward_fn(tensors, grads, is_last)
                return
            backward_fn(tensors, grads, False)
            ready = [(t, leaf.grad) for t, leaf in self.pairs if leaf.grad is not None]
            self.pairs = [(t, leaf) for t, leaf in self.pairs if leaf.grad is None]
            if not ready:
                # Nothing reached the leaves this time: a zero gradient keeps the sync on time.
                t, _ = self.pairs[-1]
                ready = [(t, torch.zeros_like(t))]
            backward_fn([t for t, _ in ready], [g for _, g in ready], is_last)

        return run
