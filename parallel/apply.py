"""`parallelize(model, dims, settings, build_optimizer)`: the one ordered function that turns a
plain model into its parallel form, and the handle the training step drives.

Order, on one screen:
  1. tensor parallelism  (parallel.tensor: slice weights, vocab-parallel candidate ops)
  2. activation checkpointing  (parallel.checkpointing: non-reentrant, block or step)
  3. (compile: not applied; see docs/parallel.md)
  3b. pipeline stages (parallel.pipeline.split_stages, pp > 1): keep this stage's modules
  4. data parallelism: the optimizer is built on the final parameters, then either the
     flat-bucket gradient all-reduce (zero_stage 0) or a DeepSpeed ZeRO-1/2 engine.

Gradient communication is once per optimizer step however many backwards the thinking
unroll makes (one per step plus the context stream's) and however many micro-batches the
step accumulates. `ParallelModel.backward_fn(sync)` is the unroll's `backward_fn`; `sync`
is True only for the optimizer step's last micro-batch, and inside it only the unroll's last
backward (`is_last`) communicates:
  * zero_stage 0: every backward accumulates into `.grad`; the last one is followed by the
    dp all-reduce (one call per 128 MiB bucket);
  * ZeRO-1/2: DeepSpeed reduces inside per-parameter gradient hooks (ZeRO-2 at every
    backward). All backwards of the optimizer step run through `engine.backward` inside
    one `engine.coalesce_grad_reduction()` block, opened at the step's first backward and
    closed after its last: the hooks leave gradients local, and closing the block reduces
    every gradient once. Cost under ZeRO-2: full local gradients live until then.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence

import torch
import torch.nn as nn

from .checkpointing import apply_activation_checkpointing
from .dims import ParallelDims, single_process_dims
from .grads import DataParallelGrads, broadcast_parameters, clip_grad_norm_
from .pipeline import split_stages
from .tensor import tensor_parallelize
from .zero import build_zero_engine, check_zero_stage

BackwardFn = Callable[[Sequence[torch.Tensor], Optional[Sequence[torch.Tensor]], bool], None]


@dataclass
class ParallelSettings:
    """The `parallel:` knobs this package reads (any object with these attributes works)."""

    tp: int = 1
    dp: int = 1
    zero_stage: int = 0
    activation_checkpointing: str = "none"
    pp: int = 1
    pp_layers: Optional[List[int]] = None
    """Blocks per pipeline stage (None: balanced by layer count)."""


def _as_scalar(tensors: Sequence[torch.Tensor], grads: Optional[Sequence[torch.Tensor]]) -> torch.Tensor:
    """A scalar whose backward is exactly `autograd.backward(tensors, grads)` (for APIs that
    take only a scalar loss): sum_i <t_i, g_i> with g_i constant."""
    if grads is None:
        return sum(t.sum() for t in tensors)
    return sum((t * g.detach()).sum() for t, g in zip(tensors, grads))


class ParallelModel:
    """The parallel model and how to run its backward, synchronise and step."""

    def __init__(self, module: nn.Module, dims: ParallelDims, optimizer, engine, zero_stage: int) -> None:
        self.module = module
        """The model to hand to `unroll` / call: tp-sharded, checkpointed, never wrapped."""
        self.dims = dims
        self.engine = engine
        self.zero_stage = zero_stage
        self.optimizer = engine.optimizer if engine is not None else optimizer
        """Set learning rates on `optimizer.param_groups` (the client AdamW's groups under ZeRO)."""
        self.grads = DataParallelGrads(module, dims) if engine is None else None
        self.params: List[nn.Parameter] = [p for p in module.parameters() if p.requires_grad]
        self.num_syncs = 0
        """Gradient synchronisations so far (one per optimizer step is the contract)."""
        self._coalescing: Optional[contextlib.ExitStack] = None

    @property
    def num_all_reduces(self) -> int:
        """Data-parallel gradient all-reduce calls so far (zero_stage 0)."""
        return self.grads.num_all_reduces if self.grads is not None else 0

    def backward_fn(self, sync: bool = True) -> BackwardFn:
        """The unroll's backward_fn for one micro-batch; `sync` on its optimizer step's last."""

        def run(tensors, grads, is_last: bool) -> None:
            tensors = list(tensors)
            final = is_last and sync
            if self.engine is None:
                torch.autograd.backward(tensors, None if grads is None else list(grads))
                if final:
                    self.sync_gradients()
                return
            # ZeRO: DeepSpeed's coalescing block spans the optimizer step's backwards; its
            # hooks leave gradients local inside it, and closing it reduces once.
            if self._coalescing is None:
                self._coalescing = contextlib.ExitStack()
                self._coalescing.enter_context(self.engine.coalesce_grad_reduction())
            self.engine.backward(_as_scalar(tensors, grads), scale_wrt_gas=False)
            if final:
                self.sync_gradients()

        return run

    def pipeline_backprop(self, tensors: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
        """One backward of the pipeline's outer pass (parallel.pipeline): the graph is retained
        (a step's forward graph is reached again by a later root) and nothing is synchronised;
        call `sync_gradients` after the optimizer step's last micro-batch."""
        if self.engine is None:
            torch.autograd.backward(list(tensors), list(grads), retain_graph=True)
            return
        if self._coalescing is None:
            self._coalescing = contextlib.ExitStack()
            self._coalescing.enter_context(self.engine.coalesce_grad_reduction())
        self.engine.backward(_as_scalar(tensors, grads), retain_graph=True, scale_wrt_gas=False)

    def sync_gradients(self) -> None:
        """The optimizer step's one gradient communication over dp (all-reduce, or closing
        ZeRO's coalescing block)."""
        if self.engine is None:
            self.grads.all_reduce()
        elif self._coalescing is not None:
            self._coalescing.close()
            self._coalescing = None
        self.num_syncs += 1

    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        """One scalar-loss backward (a Transformer++ micro-batch, or an unroll without per-step backward)."""
        self.backward_fn(sync)([loss], None, True)

    def local_grad_sq(self) -> torch.Tensor:
        """Sum of squares (float64, on the CPU) of the gradients this rank holds after the
        step's synchronisation: the full gradients (zero_stage 0) or this rank's ZeRO
        partition. NaN/Inf anywhere on any rank shows up in the world sum of these, which is
        what the trainer's non-finite guard reduces (before any optimizer step)."""
        total = torch.zeros((), dtype=torch.float64)
        for grad in self._local_grads():
            total += grad.detach().double().pow(2).sum().cpu()
        return total

    def _local_grads(self) -> List[torch.Tensor]:
        if self.engine is None:
            return [p.grad for p in self.params if p.grad is not None]
        out: List[torch.Tensor] = []
        for group in getattr(self.engine.optimizer, "averaged_gradients", {}).values():
            if group is None:
                continue
            flat = getattr(group, "flat_partition", None)
            if flat is not None:
                out.append(flat)
            elif isinstance(group, torch.Tensor):
                out.append(group)
            else:
                out.extend(g for g in group if g is not None)
        return out

    def skip_step(self) -> None:
        """Drops this step's gradients without touching weights or optimizer state (the
        non-finite guard's skip). Under ZeRO it clears DeepSpeed's reduced partitions the way
        DeepSpeed's own overflow path does, so the next step starts clean."""
        if self.engine is None:
            self.optimizer.zero_grad(set_to_none=True)
            return
        zero = self.engine.optimizer
        self.engine.zero_grad()
        for key in list(getattr(zero, "averaged_gradients", {}).keys()):
            zero.averaged_gradients[key] = None
            if hasattr(zero, "all_grad_tensors"):
                zero.all_grad_tensors[key] = None
        release = getattr(zero, "_release_preflattened_grad_buffers", None)
        if release is not None:
            release()

    def clip_and_step(self, max_norm: Optional[float]) -> torch.Tensor:
        """Global-norm clipping (over the full, unsharded model) and the optimizer step;
        clears the gradients. Returns the norm before clipping. Under ZeRO the clip value
        given to `parallelize` is used (DeepSpeed clips inside its step)."""
        if self.engine is None:
            norm = clip_grad_norm_(self.module, max_norm, self.dims)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            return norm
        self.engine.step()
        _relink_zero_optimizer_state(self.engine.optimizer)
        norm = self.engine.get_global_grad_norm()
        return torch.tensor(float("nan") if norm is None else float(norm))

    def zero_grad(self) -> None:
        if self.engine is None:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.engine.zero_grad()


def _relink_zero_optimizer_state(zero) -> None:
    """DeepSpeed 0.19.8 links each parameter's view of the AdamW state after the *first*
    parameter group's first step, before the other groups have any state: parameters of
    later groups (the norms, alpha) are never linked, and reading their state (checkpoints)
    fails with "exp_avg not found in optimizer state fragment". Relink once every group has
    stepped."""
    if getattr(zero, "_ebt_state_relinked", False) or not hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        return
    base = zero.optimizer
    if all(group in base.state and base.state[group] for group in zero.single_partition_of_fp32_groups):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
        zero._ebt_state_relinked = True


def single_process(module: nn.Module, optimizer: torch.optim.Optimizer) -> ParallelModel:
    """A world of one around an existing model and optimizer (what `parallelize` gives at
    tp = dp = 1 without a process group)."""
    return ParallelModel(module, single_process_dims(), optimizer, None, 0)


def parallelize(
    model: nn.Module,
    dims: ParallelDims,
    settings: Any,
    build_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    clip: Optional[float] = None,
) -> ParallelModel:
    """TP -> activation checkpointing -> DP/ZeRO, in place on `model` (which every rank must
    have built identically: same seed or same checkpoint). `build_optimizer` receives the
    final (sharded) module; `clip` is the gradient-clipping norm ZeRO applies."""
    stage = int(getattr(settings, "zero_stage", 0))
    check_zero_stage(stage)
    if (settings.tp, settings.dp) != (dims.tp, dims.dp):
        raise ValueError(f"parallel settings tp={settings.tp}, dp={settings.dp} differ from the process groups ({dims.describe()})")
    if int(getattr(settings, "pp", 1)) != dims.pp:
        raise ValueError(f"parallel settings pp={settings.pp} differ from the process groups ({dims.describe()})")
    tensor_parallelize(model, dims)
    apply_activation_checkpointing(model, getattr(settings, "activation_checkpointing", "none"))
    if dims.pp > 1:
        split_stages(model, dims.pp, dims.pp_rank, getattr(settings, "pp_layers", None))
    optimizer = build_optimizer(model)
    if stage == 0:
        broadcast_parameters(model, dims)
        return ParallelModel(model, dims, optimizer, None, 0)
    engine = build_zero_engine(model, optimizer, dims, stage, clip)
    return ParallelModel(model, dims, optimizer, engine, stage)
