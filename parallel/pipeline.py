"""Thinking-aware pipeline parallelism: stages, point-to-point messages and the schedule that
keeps an EBT training step exact under second order.

An EBT step is, per micro-batch, K thinking steps followed by a second-order backward. The
candidate y enters at the first stage (W_v2e) and dE/dy is needed there, so each thinking
step is a round trip:

    F  (down, 0 -> p-1): activations of the prediction stream (and, when the conditioning
                         makes it step-dependent, the context stream and the adaLN vector)
    B  (up, p-1 -> 0):   dE/d(activation), computed with create_graph; stage 0 then updates
                         y = p - alpha * dE/dp and computes the step's loss

The outer backward runs over the same messages in reverse chronological order (DESIGN note
"Pipeline parallelism for thinking"):

    OD (down, 0 -> p-1): adjoint of each received *gradient*, sent forward to its sender
    OU (up, p-1 -> 0):   adjoint of each received *activation*, sent back to its sender
    CU (up):             the context stream's first-order backward (once per micro-batch when
                         the context is shared by all steps, else inside OU of its step)

How it stays exact. Each stage keeps only its own graph. Every received tensor becomes a
leaf (requiring grad when an adjoint is needed); every sent tensor becomes a *root*
(tensor, adjoint) on its sender once the adjoint arrives. When a stage must send the adjoint
of one of its leaves it first back-propagates its pending roots (one `autograd.backward`
call, gradients accumulating in the leaves and the parameters) and reads the leaf's `.grad`.
Backpropagation is linear, so splitting one backward into several calls over disjoint roots
gives the single-graph gradients, provided (1) each root is back-propagated exactly once and
(2) a leaf's adjoint is read only after every root that depends on it: reverse chronological
order guarantees (2), because everything computed from a leaf happened after it arrived.
Graphs are cut at every step's candidate as well (y_k becomes a leaf on stage 0, its adjoint a
root for step k-1's piece) and at the context stream's keys/values (leaves whose gradients
accumulate over the steps), so each piece of a graph is back-propagated once - except the
forward graph of a step on stages before the last: it is reached both from the recorded
dE/dh graph (OD) and from the activation's adjoint (OU), which arrives later. That second
traversal is the one extra cost against a single process (docs/parallel.md, measured).

Messages carry only tensors of shapes known from the micro-batch plan (rows, sequence length,
width): no Python objects on the wire in the hot loop. The plan (rows and number of thinking
steps of every micro-batch) is one int64 broadcast from stage 0 per optimizer step, so random
step counts (S2) are the same on all stages; all randomness (noise, jitter, replay) lives on
stage 0, where y lives (pretrain/pipeline_draws.py `draw_microbatch` draws it exactly as
pretrain.thinking.unroll does). `thinking` arguments are pretrain.thinking.ThinkingConfig
objects and `replay` a pretrain.replay.ReplayBuffer (duck-typed: parallel imports pretrain
only through pretrain.model).

The schedule is an explicit global task list (`gpipe_schedule`): each rank runs its own tasks
in that order, sends are non-blocking and receives blocking, so the run cannot deadlock.
Micro-batches fill the pipeline GPipe-style within each phase (F, B, OD, OU, CU of one
thinking step). `schedule_table` draws it.

The Transformer++ baseline is pipelined with the same stages and transport, ordinary GPipe
(one forward, one first-order backward per micro-batch): `TransformerPipeline`.
"""
from __future__ import annotations

import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from pretrain.model.ebt import EnergyTransformer
from pretrain.model.transformer_pp import TransformerPP

from .dims import LayoutError, ParallelDims

FIRST_STAGE_MODULES = ("tok_embeddings", "cand_embed", "step_embeddings", "step_size")
"""Parameters that live on the first stage (embeddings, W_v2e, step conditioning, alpha)."""
LAST_STAGE_MODULES = ("norm", "energy_head", "lm_head")
"""Parameters that live on the last stage (final norm, energy head / LM head)."""
UNSUPPORTED = {
    ("parallel.activation_checkpointing", "step"): "it wraps the whole-model energy call, which a stage never makes; "
                                                   "use 'block' or 'block_vjp'",
    ("model.attention", "reference"): "the masked full-sequence path has no context/prediction split to pipeline; "
                                      "use 'two_stream'",
}


# -- stages ------------------------------------------------------------------------------------
def stage_layer_ranges(num_layers: int, pp: int, layers_per_stage: Optional[Sequence[int]] = None) -> List[range]:
    """Contiguous blocks per stage. Balanced by layer count, the remainder going to the *last*
    stages (the first also holds W_v2e and the (B, S, V) candidate arithmetic), or as given by
    `parallel.pp_layers`."""
    if pp > num_layers:
        raise LayoutError(f"parallel.pp={pp} exceeds model.num_layers={num_layers}: every stage needs a block")
    if layers_per_stage:
        counts = [int(c) for c in layers_per_stage]
        if len(counts) != pp or min(counts) < 1 or sum(counts) != num_layers:
            raise LayoutError(
                f"parallel.pp_layers={counts}: needs {pp} counts (one per stage), each >= 1, summing to "
                f"model.num_layers={num_layers}"
            )
    else:
        base, rem = divmod(num_layers, pp)
        counts = [base + (1 if s >= pp - rem else 0) for s in range(pp)]
    starts = [sum(counts[:s]) for s in range(pp)]
    return [range(a, a + c) for a, c in zip(starts, counts)]


def parameter_stage(name: str, num_layers: int, pp: int, layers_per_stage: Optional[Sequence[int]] = None) -> int:
    """The stage that holds parameter (or buffer) `name` of the full model: a pure function of
    the name, so per-stage checkpoint shards can be assembled without building a model."""
    head = name.split(".", 1)[0]
    if head == "layers":
        index = int(name.split(".")[1])
        for stage, layers in enumerate(stage_layer_ranges(num_layers, pp, layers_per_stage)):
            if index in layers:
                return stage
        raise KeyError(f"{name}: layer {index} is outside model.num_layers={num_layers}")
    if head in FIRST_STAGE_MODULES:
        return 0
    if head in LAST_STAGE_MODULES:
        return pp - 1
    raise KeyError(f"{name}: no pipeline stage is defined for it")


def validate_pipeline(
    pp: int,
    num_layers: int,
    num_microbatches: int,
    batch_size: int,
    *,
    layers_per_stage: Optional[Sequence[int]] = None,
    options: Optional[Dict[str, object]] = None,
) -> None:
    """Start-up checks (before any process group exists), one line naming the key:
    pp larger than the layer count, a micro-batch count that does not divide the (per dp
    rank) batch, and options the pipeline does not support. `options` maps config keys to
    values, e.g. {"model.attention": "two_stream", "parallel.activation_checkpointing": "block"}."""
    if pp < 1:
        raise LayoutError(f"parallel.pp: must be >= 1, got {pp}")
    stage_layer_ranges(num_layers, pp, layers_per_stage)
    if num_microbatches < 1:
        raise LayoutError(f"parallel.pp_microbatches: must be >= 1, got {num_microbatches}")
    if batch_size % num_microbatches:
        raise LayoutError(
            f"parallel.pp_microbatches={num_microbatches} does not divide the per-rank batch of {batch_size} rows; "
            f"choose a divisor of it"
        )
    if pp > 1:
        for key, value in (options or {}).items():
            reason = UNSUPPORTED.get((key, value))
            if reason is not None:
                raise LayoutError(f"{key}={value!r} is not supported with parallel.pp={pp}: {reason}")


class _Absent(nn.Module):
    """Placeholder for a block that lives on another stage (keeps layer indices, hence
    parameter names, those of the full model)."""


@dataclass
class StageInfo:
    stage: int
    num_stages: int
    layers: range
    """Global indices of this stage's blocks."""
    layers_per_stage: List[int]

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1


def split_stages(model: nn.Module, pp: int, stage: int, layers_per_stage: Optional[Sequence[int]] = None) -> StageInfo:
    """Keeps only stage `stage`'s modules of a full (possibly already tensor-parallel) model,
    in place. Parameter names stay those of the full model; `model.pipeline_stage` records the
    split. Every rank must have built the same full model (same seed or checkpoint)."""
    if not isinstance(model, (EnergyTransformer, TransformerPP)):
        raise TypeError(f"split_stages: unsupported model {type(model).__name__}")
    ranges = stage_layer_ranges(model.cfg.num_layers, pp, layers_per_stage)
    info = StageInfo(stage, pp, ranges[stage], [len(r) for r in ranges])
    for index in range(model.cfg.num_layers):
        if index not in info.layers:
            model.layers[index] = _Absent()
    if not info.is_first:
        for name in FIRST_STAGE_MODULES:
            if hasattr(model, name):
                setattr(model, name, None)
    if not info.is_last:
        for name in LAST_STAGE_MODULES:
            if hasattr(model, name):
                setattr(model, name, None)
    model.pipeline_stage = info
    return info


def gather_stage_states(model: nn.Module, dims: ParallelDims) -> Dict[str, torch.Tensor]:
    """Every stage's state dict, on every rank of this pipeline (collective over the pp
    group): the full-depth model as this tp rank holds it. For what must see the whole model
    at once - evaluation, the checkpoint probe - not for the training step. Names and shapes
    are exchanged once (cached on the model); the tensors are broadcast from their stage."""
    local = model.state_dict()
    if dims.pp == 1:
        return {k: v.detach().clone() for k, v in local.items()}
    catalogue = getattr(model, "_pipeline_catalogue", None)
    if catalogue is None:
        mine = [(name, tuple(t.shape), str(t.dtype).replace("torch.", "")) for name, t in local.items()]
        stages: List[Any] = [None] * dims.pp
        dist.all_gather_object(stages, mine, group=dims.pp_group)
        catalogue, seen = [], set()
        for stage, entries in enumerate(stages):
            for name, shape, dtype in entries:
                if name not in seen:  # buffers every stage holds come from the first
                    seen.add(name)
                    catalogue.append((name, shape, getattr(torch, dtype), stage))
        model._pipeline_catalogue = catalogue
    device = next(iter(local.values())).device
    out: Dict[str, torch.Tensor] = {}
    for name, shape, dtype, stage in catalogue:
        tensor = local[name].detach().clone() if stage == dims.pp_rank else torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(tensor, src=dims.pp_ranks[stage], group=dims.pp_group)
        out[name] = tensor
    return out


# -- point-to-point transport ------------------------------------------------------------------------
Shape = Tuple[int, ...]


class Transport:
    """Moves lists of tensors between stages. `recv` knows the shapes ahead."""

    def send(self, tensors: Sequence[torch.Tensor], src: int, dst: int, tag: int = 0) -> None:
        raise NotImplementedError

    def recv(self, shapes: Sequence[Shape], dtype: torch.dtype, device: torch.device, src: int, dst: int,
             tag: int = 0) -> List[torch.Tensor]:
        """Blocks until the message with `tag` from `src` arrives (messages with one tag
        between two stages arrive in the order sent)."""
        raise NotImplementedError

    def broadcast_from_first(self, tensor: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def finish(self) -> None:
        """Waits for every outstanding send."""


class P2PTransport(Transport):
    """torch.distributed isend/recv between the ranks of this process's pipeline (gloo on CPU,
    nccl on GPU). Sends are non-blocking (their buffers are kept until `finish`); receives
    block. Messages between two ranks arrive in the order they were sent."""

    def __init__(self, dims: ParallelDims) -> None:
        self.dims = dims
        self._pending: List[Tuple[dist.Work, torch.Tensor]] = []
        self.wait_seconds = 0.0
        """Time spent blocked in receives (the measured bubble, with the compute split)."""
        self.num_messages = 0

    def send(self, tensors, src, dst, tag: int = 0) -> None:
        for t in tensors:
            buf = t.detach().contiguous()
            self._pending.append((dist.isend(buf, dst=self.dims.pp_ranks[dst], tag=tag), buf))
            self.num_messages += 1

    def recv(self, shapes, dtype, device, src, dst, tag: int = 0) -> List[torch.Tensor]:
        start = time.perf_counter()
        out = []
        for shape in shapes:
            buf = torch.empty(shape, dtype=dtype, device=device)
            dist.recv(buf, src=self.dims.pp_ranks[src], tag=tag)
            out.append(buf)
        self.wait_seconds += time.perf_counter() - start
        return out

    def broadcast_from_first(self, tensor):
        dist.broadcast(tensor, src=self.dims.pp_ranks[0], group=self.dims.pp_group)
        return tensor

    def all_reduce_sum(self, tensor):
        dist.all_reduce(tensor, group=self.dims.pp_group)
        return tensor

    def finish(self) -> None:
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()


class LocalTransport(Transport):
    """All stages in one process (the simulation the tests compare with the distributed run,
    and pp=1). Messages are copied, as a wire would."""

    def __init__(self) -> None:
        self.boxes: Dict[Tuple[int, int, int], deque] = defaultdict(deque)
        self.wait_seconds = 0.0
        self.num_messages = 0

    def send(self, tensors, src, dst, tag: int = 0) -> None:
        self.boxes[(src, dst, tag)].append([t.detach().clone() for t in tensors])
        self.num_messages += len(tensors)

    def recv(self, shapes, dtype, device, src, dst, tag: int = 0) -> List[torch.Tensor]:
        got = self.boxes[(src, dst, tag)].popleft()
        if [tuple(t.shape) for t in got] != [tuple(s) for s in shapes]:
            raise RuntimeError(f"pipeline message {src}->{dst}: shapes {[tuple(t.shape) for t in got]}, expected {shapes}")
        return got

    def broadcast_from_first(self, tensor):
        return tensor

    def all_reduce_sum(self, tensor):
        return tensor


# -- the schedule -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    kind: str
    """F, B, OD, OU, Y (stage-0 chain cut of a step without second order), CU."""
    stage: int
    micro: int
    step: int = -1

    def label(self) -> str:
        return f"{self.kind}{self.micro}" + (f".{self.step}" if self.step >= 0 else "")


def gpipe_schedule(num_stages: int, num_steps: Sequence[int], make_graph: Sequence[Sequence[bool]],
                   shared_context: bool) -> List[Task]:
    """The global task order: per thinking step, F then B over all micro-batches; then, in
    reverse step order, OD then OU (or Y where a step has no second order); then CU when the
    context stream is shared by the steps. Within a phase stage s runs micro-batches in order,
    so micro-batch m+1 occupies stage s while m is on stage s+1 (GPipe)."""
    p = num_stages
    micros = range(len(num_steps))
    tasks: List[Task] = []
    for k in range(max(num_steps)):
        live = [m for m in micros if k < num_steps[m]]
        tasks += [Task("F", s, m, k) for s in range(p) for m in live]
        tasks += [Task("B", s, m, k) for s in reversed(range(p - 1)) for m in live]
    for k in reversed(range(max(num_steps))):
        graph = [m for m in micros if k < num_steps[m] and make_graph[m][k]]
        tasks += [Task("OD", s, m, k) for s in range(p) for m in graph]
        tasks += [Task("OU", s, m, k) for s in reversed(range(p - 1)) for m in graph]
        tasks += [Task("Y", 0, m, k) for m in micros if k < num_steps[m] and not make_graph[m][k]]
    if shared_context:
        tasks += [Task("CU", s, m) for s in reversed(range(p)) for m in micros]
    return tasks


_KINDS = ("F", "B", "OD", "OU", "Y", "CU")


def message_tag(task: Task) -> int:
    """The p2p tag of the message `task` sends: its identity, so a stage can receive messages
    in another order than they were sent (the interleaved schedule does)."""
    return (_KINDS.index(task.kind) * 1024 + task.step + 1) * 65536 + task.micro


def _source(task: Task, num_stages: int) -> Optional[Task]:
    """The task whose message `task` waits for (None: needs no message)."""
    p, s = num_stages, task.stage
    if task.kind == "F":
        return Task("F", s - 1, task.micro, task.step) if s > 0 else None
    if task.kind == "B":
        return Task("F" if s + 1 == p - 1 else "B", s + 1, task.micro, task.step)
    if task.kind == "OD":
        return Task("OD", s - 1, task.micro, task.step) if s > 0 else None
    if task.kind == "OU":
        return Task("OD" if s + 1 == p - 1 else "OU", s + 1, task.micro, task.step)
    if task.kind == "CU":
        return Task("CU", s + 1, task.micro) if s < p - 1 else None
    return None


def _dependencies(task: Task, num_stages: int, num_steps: Sequence[int], make_graph: Sequence[Sequence[bool]],
                  shared_context: bool) -> List[Task]:
    """Every task `task` must follow: the message it receives, and the stage-local order the
    arithmetic needs (stage 0's candidate update before the next step; reverse chronological
    order of a micro-batch's outer backward; the context backward last)."""
    p, s, m, k = num_stages, task.stage, task.micro, task.step
    deps = [d for d in (_source(task, p),) if d is not None]
    last_fwd = Task("B" if p > 1 else "F", 0, m, num_steps[m] - 1)

    def outer_of(step: int, stage: int) -> Task:
        """The task that ends step `step`'s outer backward on `stage`."""
        if not make_graph[m][step]:
            return Task("Y", 0, m, step)
        return Task("OD" if stage == p - 1 else "OU", stage, m, step)

    if task.kind == "F" and s == 0 and k > 0:
        deps.append(Task("B" if p > 1 else "F", 0, m, k - 1))
    if task.kind in ("OD", "Y") and s == 0:
        deps.append(last_fwd)
        if k + 1 < num_steps[m]:
            deps.append(outer_of(k + 1, 0))
    if task.kind == "CU":
        deps += [outer_of(j, s) for j in range(num_steps[m]) if make_graph[m][j]] or [last_fwd]
    return deps


def interleaved_schedule(num_stages: int, num_steps: Sequence[int], make_graph: Sequence[Sequence[bool]],
                         shared_context: bool, cost: Optional[Callable[[Task], float]] = None) -> List[Task]:
    """The same tasks as `gpipe_schedule`, ordered by list scheduling: each stage runs, as
    soon as it is free, the ready task that can start first (ties: the lower micro-batch).
    Micro-batches then overlap *across* thinking steps - stage 0 starts micro-batch 0's step
    k+1 while micro-batch 1 is still in step k's round trip - instead of draining the pipeline
    at the end of every phase. The result is again a valid global order (a task is placed
    after everything it depends on), so it cannot deadlock."""
    cost = cost or fused_cost(num_stages)
    pool = gpipe_schedule(num_stages, num_steps, make_graph, shared_context)
    deps = {t: _dependencies(t, num_stages, num_steps, make_graph, shared_context) for t in pool}
    end: Dict[Task, float] = {}
    free = [0.0] * num_stages
    order: List[Task] = []
    rank = {t: i for i, t in enumerate(pool)}
    remaining = set(pool)
    while remaining:
        best = None
        for t in remaining:
            if all(d in end for d in deps[t]):
                start = max([free[t.stage]] + [end[d] for d in deps[t]])
                key = (start, t.micro, rank[t])
                if best is None or key < best[0]:
                    best = (key, t)
        (start, _, _), task = best
        end[task] = start + cost(task)
        free[task.stage] = end[task]
        order.append(task)
        remaining.remove(task)
    return order


SCHEDULES = {"gpipe": gpipe_schedule, "interleaved": interleaved_schedule}


def simulate_schedule(tasks: Sequence[Task], num_stages: int, cost: Callable[[Task], float]) -> Dict[Task, Tuple[float, float]]:
    """(start, end) of every task when each stage runs its tasks in order and a task also waits
    for the message it receives (zero transfer time)."""
    free = [0.0] * num_stages
    times: Dict[Task, Tuple[float, float]] = {}
    for task in tasks:
        src = _source(task, num_stages)
        start = max(free[task.stage], times[src][1] if src is not None else 0.0)
        times[task] = (start, start + cost(task))
        free[task.stage] = times[task][1]
    return times


def unit_cost(task: Task) -> float:
    """One unit per task (a stage's share of one pass); the last stage's F also runs the
    thinking backward, its OD also the OU part, so those take two. The chain cut Y is free."""
    return 0.0 if task.kind == "Y" else 1.0


def fused_cost(num_stages: int) -> Callable[[Task], float]:
    def cost(task: Task) -> float:
        fused = task.stage == num_stages - 1 and num_stages > 1 and task.kind in ("F", "OD")
        return unit_cost(task) * (2.0 if fused else 1.0)

    return cost


def schedule_bubble(tasks: Sequence[Task], num_stages: int, cost: Optional[Callable[[Task], float]] = None) -> float:
    """Idle fraction of the simulated schedule: 1 - busy / (stages x makespan)."""
    cost = cost or fused_cost(num_stages)
    times = simulate_schedule(tasks, num_stages, cost)
    span = max(end for _, end in times.values())
    busy = sum(end - start for start, end in times.values())
    return 1.0 - busy / (num_stages * span) if span > 0 else 0.0


def schedule_table(tasks: Sequence[Task], num_stages: int, cost: Optional[Callable[[Task], float]] = None) -> str:
    """The schedule as a markdown table: one row per stage, one column per unit of time, each
    cell the task running then (kind, micro-batch.step; `.` idle)."""
    cost = cost or fused_cost(num_stages)
    times = simulate_schedule(tasks, num_stages, cost)
    span = int(round(max(end for _, end in times.values())))
    grid = [["."] * span for _ in range(num_stages)]
    for task, (start, end) in times.items():
        for t in range(int(round(start)), int(round(end))):
            grid[task.stage][t] = task.label()
    header = "| stage | " + " | ".join(str(t) for t in range(span)) + " |"
    rule = "|---" * (span + 1) + "|"
    rows = [f"| {s} | " + " | ".join(row) + " |" for s, row in enumerate(grid)]
    return "\n".join([header, rule, *rows])


# -- inputs and outputs ----------------------------------------------------------------------------------
@dataclass
class MicroBatch:
    """One micro-batch with all of its random draws (only stage 0 reads the tensors)."""

    input_ids: torch.Tensor
    """(rows, S+1) token ids, replay rows included."""
    initial_logits: torch.Tensor
    """(rows, S, V or this tp rank's V-slice) initial candidate."""
    num_steps: int
    jitter: Optional[torch.Tensor] = None
    """(rows, S, 1) step-size multipliers (S2), or None."""
    noise: Optional[List[torch.Tensor]] = None
    """Per step (rows, S, V-slice) standard normal Langevin noise, or None."""
    fresh_rows: int = 0
    """Rows that came from the data (the rest from the replay buffer)."""


@dataclass
class PipelineResult:
    loss: torch.Tensor
    """Mean over micro-batches of each one's training loss (detached), on every stage."""
    micro_losses: List[torch.Tensor]
    step_losses: List[List[torch.Tensor]]
    """Per micro-batch, the cross-entropy after each step."""
    step_energies: List[List[torch.Tensor]]
    """Per micro-batch, the mean energy of the candidate each step started from."""
    nonfinite: torch.Tensor
    final_logits: Optional[List[torch.Tensor]] = None
    """Per micro-batch final candidate (stage 0 only)."""
    num_steps: List[int] = field(default_factory=list)
    compute_seconds: float = 0.0
    """Time this stage spent computing (wall time minus time blocked in receives)."""
    phase_seconds: Dict[str, float] = field(default_factory=dict)
    """Compute time of this stage by task kind (F, B, OD, OU, Y, CU)."""


BackpropFn = Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor]], None]
"""backprop(tensors, grads): one backward of the outer pass; the graph must be retained (a
step's forward graph is reached again by a later root)."""
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""loss_fn(y_next, targets, dE/dp) -> scalar: replaces the per-step cross-entropy (tests use
||dE/dp||^2 to check the pure second-order part on its own)."""


def _plain_backprop(tensors, grads) -> None:
    torch.autograd.backward(list(tensors), list(grads), retain_graph=True)


# -- one stage of the EBT pipeline ---------------------------------------------------------------
@dataclass
class _Context:
    kv: List[torch.Tensor]
    leaves: List[torch.Tensor]
    h_in: Optional[torch.Tensor] = None
    """Received context activations (leaf), stages > 0."""
    h_out: Optional[torch.Tensor] = None
    """Sent context activations, stages < p-1."""
    cond: Optional[torch.Tensor] = None
    """adaLN step vector (D,): a parameter row on stage 0, a received leaf elsewhere."""
    grad: bool = False
    """Whether the outer backward runs through it."""


@dataclass
class _Piece:
    """One thinking step of one micro-batch on this stage."""

    wrt: Optional[torch.Tensor] = None
    """The tensor dE/d(.) is taken with respect to: p or y on stage 0, the received leaf elsewhere."""
    h_out: Optional[torch.Tensor] = None
    g_leaf: Optional[torch.Tensor] = None
    """Received dE/d(h_out) (leaf), stages < p-1."""
    g_in: Optional[torch.Tensor] = None
    """Sent dE/d(h_in), stages > 0."""


class _MicroState:
    def __init__(self) -> None:
        self.pending: List[Tuple[torch.Tensor, torch.Tensor]] = []
        self.pieces: Dict[int, _Piece] = {}
        self.contexts: Dict[int, _Context] = {}
        self.y: Optional[torch.Tensor] = None
        self.y_pairs: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.loss_roots: Dict[int, torch.Tensor] = {}
        self.ctx_adjoints: Dict[int, List[torch.Tensor]] = {}
        self.total: Optional[torch.Tensor] = None
        self.nonfinite: Optional[torch.Tensor] = None
        self.step_losses: List[torch.Tensor] = []
        self.step_energies: List[torch.Tensor] = []


class EBTStage:
    """This process's stage of an EnergyTransformer that `split_stages` has cut, and the code
    for each task kind. One optimizer step's state lives in `begin`..`end`."""

    def __init__(self, model: EnergyTransformer, thinking: Any, transport: Transport,
                 backprop: BackpropFn = _plain_backprop, loss_fn: Optional[LossFn] = None) -> None:
        info = getattr(model, "pipeline_stage", None)
        if info is None:
            raise ValueError("EBTStage: split the model with split_stages first")
        if model.cfg.attention != "two_stream":
            raise LayoutError(f"model.attention={model.cfg.attention!r} is not supported with parallel.pp: "
                              f"{UNSUPPORTED[('model.attention', 'reference')]}")
        self.model = model
        self.info = info
        self.cfg = thinking
        self.transport = transport
        self.backprop_fn = backprop
        self.loss_fn = loss_fn
        self.num_backprops = 0

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return self.model.rope_cos.device

    @property
    def shared_context(self) -> bool:
        return not self.model.context_depends_on_step

    def _shapes(self, micro: int):
        rows, seq, _ = self.plan[micro]
        d = self.model.cfg.dim
        ctx_len = seq + self.model.num_prefix
        return (rows, seq, d), (rows, ctx_len, d), (d,)

    def _backprop(self, roots: Sequence[Tuple[torch.Tensor, Optional[torch.Tensor]]]) -> None:
        pairs = [(t, g) for t, g in roots if g is not None and t.requires_grad]
        if pairs:
            self.backprop_fn([t for t, _ in pairs], [g for _, g in pairs])
            self.num_backprops += 1

    def _flush(self, st: _MicroState) -> None:
        roots, st.pending = st.pending, []
        self._backprop(roots)

    def _send(self, tensors: Sequence[torch.Tensor], direction: int) -> None:
        self.transport.send(tensors, self.info.stage, self.info.stage + direction, self._send_tag)

    def _recv(self, shapes: Sequence[Shape]) -> List[torch.Tensor]:
        src = self._source_task
        return self.transport.recv(shapes, self.dtype, self.device, src.stage, self.info.stage, message_tag(src))

    @staticmethod
    def _grad_or_zeros(t: torch.Tensor) -> torch.Tensor:
        return t.grad if t.grad is not None else torch.zeros_like(t)

    def _gradient_leaf(self, received: torch.Tensor, make_graph: bool) -> torch.Tensor:
        """A received dE/dh: a leaf that records the second-order path when it is needed."""
        return received.requires_grad_(make_graph)

    # -- one optimizer step ------------------------------------------------------------------------
    def begin(self, micro_batches: Optional[Sequence[MicroBatch]], plan: torch.Tensor,
              loss_scale: float | Sequence[float]) -> None:
        """`loss_scale`: one factor for every micro-batch's loss, or one per micro-batch (the
        trainer weights each by its share of the global rows)."""
        self.micro_batches = micro_batches
        self.plan = [tuple(int(v) for v in row) for row in plan.tolist()]
        scales = [loss_scale] * len(self.plan) if isinstance(loss_scale, (int, float)) else list(loss_scale)
        if len(scales) != len(self.plan):
            raise ValueError(f"EBTStage: {len(scales)} loss scales for {len(self.plan)} micro-batches")
        self.loss_scales = scales
        self.states = [_MicroState() for _ in self.plan]
        for m, st in enumerate(self.states):
            if self.info.is_first:
                st.y = micro_batches[m].initial_logits
        self.num_backprops = 0

    def make_graph(self, micro: int, k: int) -> bool:
        return self.cfg.create_graph == "all" or k == self.plan[micro][2] - 1

    def _context(self, micro: int, k: int, received: Optional[List[torch.Tensor]]) -> _Context:
        """This stage's context stream for micro-batch `micro` (step `k` when it depends on the
        step): keys/values of its blocks, kept as leaves for the prediction stream."""
        model, info = self.model, self.info
        num_steps = self.plan[micro][2]
        grad = any(self.make_graph(micro, j) for j in range(num_steps)) if self.shared_context else self.make_graph(micro, k)
        idx = model.step_index(k)
        adaln = model.cfg.ebt_type == "adaln"
        ctx = _Context([], [], grad=grad)
        with torch.set_grad_enabled(grad):
            if info.is_first:
                ids = self.micro_batches[micro].input_ids[:, :-1]
                h = model.tok_embeddings(ids)
                if model.cfg.ebt_type == "time_embed":
                    h = torch.cat([model.step_embeddings.weight[idx].expand(h.shape[0], 1, -1), h], dim=1)
                if adaln:
                    ctx.cond = model.step_embeddings.weight[idx]
            else:
                h = received[1].requires_grad_(grad)
                ctx.h_in = h
                if adaln:
                    ctx.cond = received[2].requires_grad_(grad)
            cond = ctx.cond.expand(h.shape[0], -1) if adaln else None
            length = h.shape[1]
            cos, sin = model.rope_cos[:length], model.rope_sin[:length]
            for i in info.layers:
                need = i < model.cfg.num_layers - 1
                h, k_, v_ = model.layers[i].forward_context(h, cos, sin, model.cfg.context_attention, cond, need_output=need)
                ctx.kv += [k_, v_]
            ctx.leaves = [t.detach().requires_grad_(grad) for t in ctx.kv]
            ctx.h_out = h
        return ctx

    def forward(self, micro: int, k: int) -> None:
        """F: (stage 0: candidate update inputs) context if due, prediction blocks; send down,
        or on the last stage the energy and dE/dh_in (create_graph on graph steps), sent up."""
        model, info, st = self.model, self.info, self.states[micro]
        make_graph = self.make_graph(micro, k)
        h_shape, ctx_shape, cond_shape = self._shapes(micro)
        need_ctx = not self.shared_context or k == 0
        received = None
        if not info.is_first:
            shapes = [h_shape] + ([ctx_shape] if need_ctx else []) + (
                [cond_shape] if need_ctx and model.cfg.ebt_type == "adaln" else [])
            received = self._recv(shapes)
            if not need_ctx:
                received = received[:1]
            elif len(received) == 2:
                received = received + [None]
        if need_ctx:
            st.contexts[0 if self.shared_context else k] = self._context(micro, k, received)
        ctx = st.contexts[0 if self.shared_context else k]
        piece = _Piece()
        st.pieces[k] = piece
        if info.is_first:
            mb = self.micro_batches[micro]
            y = st.y
            if self.cfg.langevin_std > 0:
                y = y + mb.noise[k] * self.cfg.langevin_std
            if self.cfg.detach_between_steps:
                y = y.detach()
            if y.requires_grad and y.grad_fn is not None:
                # Cut the candidate chain: step k's piece starts from a leaf whose adjoint
                # becomes a root of step k-1's piece (each piece back-propagated once).
                leaf = y.detach().requires_grad_(True)
                st.y_pairs[k] = (y, leaf)
                y = leaf
            elif not y.requires_grad:
                y = y.detach().requires_grad_(True)
            st.y = y
            p = model.vocab_ops.probs(y)
            piece.wrt = p if self.cfg.grad_wrt == "probs" else y
            h = model.cand_embed(p)
        else:
            h = received[0].requires_grad_(True)
            piece.wrt = h
        num_pred = h.shape[1]
        first = 1 + model.num_prefix
        cos, sin = model.rope_cos[first:first + num_pred], model.rope_sin[first:first + num_pred]
        cond = ctx.cond.expand(h.shape[0], -1) if ctx.cond is not None else None
        for j, i in enumerate(info.layers):
            h = model.layers[i].forward_prediction(h, cos, sin, ctx.leaves[2 * j], ctx.leaves[2 * j + 1],
                                                   model.num_prefix, "two_stream", cond)
        if info.is_last:
            energy = model.energy_head(model.norm(h)).squeeze(-1)
            st.step_energies.append(energy.detach().mean())
            (g,) = torch.autograd.grad(energy.sum(), piece.wrt, create_graph=make_graph)
            if info.is_first:
                self._update(micro, k, g)
            else:
                piece.g_in = g
                self._send([g], -1)
        else:
            piece.h_out = h
            out = [h]
            if need_ctx:
                out.append(ctx.h_out)
                if ctx.cond is not None:
                    out.append(ctx.cond)
            self._send(out, +1)

    def _update(self, micro: int, k: int, g: torch.Tensor) -> None:
        """Stage 0: y_{k+1} = p - alpha * dE/dp (as pretrain.thinking.unroll), and the step's loss."""
        model, st, mb = self.model, self.states[micro], self.micro_batches[micro]
        make_graph = self.make_graph(micro, k)
        num_steps = self.plan[micro][2]
        piece = st.pieces[k]
        alpha = model.effective_step_size() if mb.jitter is None else model.effective_step_size() * mb.jitter
        y = piece.wrt - alpha * g
        if not make_graph and not model.step_size.requires_grad:
            y = y.detach()
        st.y = y
        bad = ~torch.isfinite(g).all()
        st.nonfinite = bad if st.nonfinite is None else st.nonfinite | bad
        targets = mb.input_ids[:, 1:]
        loss_k = model.vocab_ops.cross_entropy(y, targets) if self.loss_fn is None else self.loss_fn(y, targets, g)
        st.step_losses.append(loss_k.detach())
        weight = 1.0 / num_steps if self.cfg.loss_on == "mean" else float(k == num_steps - 1)
        if weight != 0.0:
            contribution = loss_k * weight
            st.total = contribution.detach() if st.total is None else st.total + contribution.detach()
            st.loss_roots[k] = contribution * self.loss_scales[micro]

    def backward(self, micro: int, k: int) -> None:
        """B: receive dE/dh_out, propagate through this stage's blocks (create_graph on graph
        steps), send dE/dh_in up; on stage 0 update the candidate."""
        info, st = self.info, self.states[micro]
        make_graph = self.make_graph(micro, k)
        h_shape, _, _ = self._shapes(micro)
        piece = st.pieces[k]
        (received,) = self._recv([h_shape])
        piece.g_leaf = self._gradient_leaf(received, make_graph)
        (g,) = torch.autograd.grad(piece.h_out, piece.wrt, grad_outputs=piece.g_leaf, create_graph=make_graph)
        if info.is_first:
            self._update(micro, k, g)
        else:
            piece.g_in = g
            self._send([g], -1)

    def outer_down(self, micro: int, k: int) -> None:
        """OD: the adjoint of dE/dh_in (from the stage below) becomes a root; back-propagate and
        send the adjoint of the received dE/dh_out down. On the last stage continue with OU."""
        info, st = self.info, self.states[micro]
        piece = st.pieces[k]
        if info.is_first:
            if k in st.loss_roots:
                st.pending.append((st.loss_roots.pop(k), torch.ones((), dtype=self.dtype, device=self.device)))
        else:
            h_shape, _, _ = self._shapes(micro)
            (adj,) = self._recv([h_shape])
            st.pending.append((piece.g_in, adj))
        self._flush(st)
        if info.is_last:
            self._finish_step(micro, k)
        else:
            self._send([self._grad_or_zeros(piece.g_leaf)], +1)

    def outer_up(self, micro: int, k: int) -> None:
        """OU: the adjoint of the sent activations arrives; back-propagate the step's piece."""
        info, st = self.info, self.states[micro]
        h_shape, ctx_shape, cond_shape = self._shapes(micro)
        piece = st.pieces[k]
        own_ctx = not self.shared_context
        shapes = [h_shape] + ([ctx_shape] if own_ctx else []) + (
            [cond_shape] if own_ctx and self.model.cfg.ebt_type == "adaln" else [])
        got = self._recv(shapes)
        st.pending.append((piece.h_out, got[0]))
        st.ctx_adjoints[k] = got[1:]
        self._flush(st)
        self._finish_step(micro, k)

    def _context_backward(self, st: _MicroState, ctx: _Context, adjoints: Sequence[torch.Tensor]) -> None:
        roots = [(t, leaf.grad) for t, leaf in zip(ctx.kv, ctx.leaves)]
        if not self.info.is_last and adjoints:
            roots.append((ctx.h_out, adjoints[0]))
            if ctx.cond is not None:
                roots.append((ctx.cond, adjoints[1]))
        self._backprop(roots)

    def _finish_step(self, micro: int, k: int) -> None:
        """After step k's piece is back-propagated: its own context's backward (step-dependent
        conditioning), the adjoints sent up, and on stage 0 the candidate chain's root."""
        info, st = self.info, self.states[micro]
        piece = st.pieces[k]
        out: List[torch.Tensor] = []
        if not self.shared_context:
            ctx = st.contexts[k]
            self._context_backward(st, ctx, st.ctx_adjoints.pop(k, []))
            if not info.is_first:
                out = [self._grad_or_zeros(ctx.h_in)] + ([self._grad_or_zeros(ctx.cond)] if ctx.cond is not None else [])
        if info.is_first:
            self._chain_root(st, k)
        else:
            self._send([self._grad_or_zeros(piece.wrt)] + out, -1)

    def _chain_root(self, st: _MicroState, k: int) -> None:
        pair = st.y_pairs.pop(k, None)
        if pair is not None and pair[1].grad is not None:
            st.pending.append((pair[0], pair[1].grad))

    def chain_only(self, micro: int, k: int) -> None:
        """Y: stage 0, a step without second order: back-propagate its piece (the candidate
        chain and its loss) to the adjoint of its starting candidate."""
        st = self.states[micro]
        if k in st.loss_roots:
            st.pending.append((st.loss_roots.pop(k), torch.ones((), dtype=self.dtype, device=self.device)))
        self._flush(st)
        self._chain_root(st, k)

    def context_up(self, micro: int) -> None:
        """CU: the shared context stream's backward, once per micro-batch (first order)."""
        info, st = self.info, self.states[micro]
        ctx = st.contexts[0]
        adjoints: List[torch.Tensor] = []
        if not info.is_last:
            _, ctx_shape, _ = self._shapes(micro)
            adjoints = self._recv([ctx_shape])
        self._flush(st)
        if ctx.grad:
            self._context_backward(st, ctx, adjoints)
        if not info.is_first:
            self._send([self._grad_or_zeros(ctx.h_in)], -1)

    def run_task(self, task: Task) -> None:
        self._send_tag = message_tag(task)
        self._source_task = _source(task, self.info.num_stages)
        if task.kind == "F":
            self.forward(task.micro, task.step)
        elif task.kind == "B":
            self.backward(task.micro, task.step)
        elif task.kind == "OD":
            self.outer_down(task.micro, task.step)
        elif task.kind == "OU":
            self.outer_up(task.micro, task.step)
        elif task.kind == "Y":
            self.chain_only(task.micro, task.step)
        elif task.kind == "CU":
            self.context_up(task.micro)
        else:  # pragma: no cover
            raise ValueError(task.kind)

    def end(self) -> Tuple[torch.Tensor, List[Optional[torch.Tensor]]]:
        """Flushes what is left, returns this stage's packed statistics and final candidates,
        and drops the step's graphs."""
        for st in self.states:
            self._flush(st)
        m = len(self.plan)
        k_max = max(row[2] for row in self.plan)
        stats = torch.zeros(m, 2 + 2 * k_max, dtype=torch.float64)
        finals: List[Optional[torch.Tensor]] = []
        for i, st in enumerate(self.states):
            if self.info.is_first:
                stats[i, 0] = float(st.total) if st.total is not None else 0.0
                stats[i, 1] = float(bool(st.nonfinite)) + float(st.total is not None and not torch.isfinite(st.total))
                stats[i, 2:2 + len(st.step_losses)] = torch.stack(st.step_losses).double().cpu()
                finals.append(st.y.detach())
            if self.info.is_last:
                stats[i, 2 + k_max:2 + k_max + len(st.step_energies)] = torch.stack(st.step_energies).double().cpu()
        self.states = []
        self.micro_batches = None
        return stats, finals


class EBTPipeline:
    """Runs one optimizer step's micro-batches of an EBT through the pipeline.

    Given a model that every rank built identically and `split_stages` cut to this rank's
    stage (parallel.apply does it, after tensor parallelism), `run` executes the thinking-aware
    schedule and leaves this stage's parameter gradients accumulated (scaled by
    `loss_scale`, default 1/num_microbatches). Only stage 0 reads the micro-batch tensors;
    other stages may pass None. `backprop(tensors, grads)` runs each backward of the outer
    pass (data parallelism passes ParallelModel's, which also keeps ZeRO's bookkeeping)."""

    def __init__(self, model: EnergyTransformer, dims: Optional[ParallelDims], thinking: Any,
                 num_microbatches: int, *, transport: Optional[Transport] = None,
                 backprop: BackpropFn = _plain_backprop, loss_fn: Optional[LossFn] = None,
                 schedule: str = "interleaved") -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"parallel.pp_schedule: {schedule!r} is not one of {tuple(SCHEDULES)}")
        self.schedule = schedule
        if getattr(model, "pipeline_stage", None) is None:
            split_stages(model, 1, 0)  # pp=1: the whole model is the one stage
        self.num_microbatches = num_microbatches
        self.transport = transport or (P2PTransport(dims) if dims is not None and dims.pp > 1 else LocalTransport())
        self.stage = EBTStage(model, thinking, self.transport, backprop, loss_fn)
        self.last_schedule: List[Task] = []

    def _plan(self, micro_batches: Optional[Sequence[MicroBatch]]) -> torch.Tensor:
        plan = torch.zeros(self.num_microbatches, 3, dtype=torch.long)
        if self.stage.info.is_first:
            if micro_batches is None or len(micro_batches) != self.num_microbatches:
                raise ValueError(f"stage 0 needs {self.num_microbatches} micro-batches (parallel.pp_microbatches)")
            for m, mb in enumerate(micro_batches):
                plan[m] = torch.tensor([mb.input_ids.shape[0], mb.input_ids.shape[1] - 1, mb.num_steps])
        return self.transport.broadcast_from_first(plan)

    def run(self, micro_batches: Optional[Sequence[MicroBatch]], loss_scale: Optional[float | Sequence[float]] = None,
            replay: Optional[Any] = None) -> PipelineResult:
        """One optimizer step's micro-batches. With `replay` (stage 0's buffer, S2) each
        micro-batch's fresh rows and final candidates are added unless the step is non-finite."""
        result = run_pipeline([self.stage], self.transport, micro_batches, self.num_microbatches, loss_scale,
                              plan_fn=self._plan, keep=self, schedule=self.schedule)
        if replay is not None and self.stage.info.is_first and self.stage.cfg.replay_size > 0 and not bool(result.nonfinite):
            for mb, final in zip(micro_batches, result.final_logits):
                replay.add(mb.input_ids[:mb.fresh_rows], final[:mb.fresh_rows])
        return result


def run_pipeline(stages: Sequence[EBTStage], transport: Transport, micro_batches, num_microbatches: int,
                 loss_scale: Optional[float | Sequence[float]], plan_fn=None, keep=None, schedule: str = "interleaved") -> PipelineResult:
    """Drives `stages` (this process's one stage, or every stage of a one-process simulation)
    through the schedule."""
    scale = 1.0 / num_microbatches if loss_scale is None else loss_scale
    if plan_fn is None:
        plan = torch.tensor([[mb.input_ids.shape[0], mb.input_ids.shape[1] - 1, mb.num_steps] for mb in micro_batches])
    else:
        plan = plan_fn(micro_batches)
    by_stage = {s.info.stage: s for s in stages}
    for s in stages:
        s.begin(micro_batches if s.info.is_first else None, plan, scale)
    ref = stages[0]
    num_stages = ref.info.num_stages
    make_graph = [[ref.make_graph(m, k) for k in range(int(plan[m, 2]))] for m in range(len(plan))]
    tasks = SCHEDULES[schedule](num_stages, [int(v) for v in plan[:, 2]], make_graph, ref.shared_context)
    if keep is not None:
        keep.last_schedule = tasks
    phase: Dict[str, float] = defaultdict(float)
    wait0 = getattr(transport, "wait_seconds", 0.0)
    start = time.perf_counter()
    for task in tasks:
        stage = by_stage.get(task.stage)
        if stage is None:
            continue
        t0, w0 = time.perf_counter(), getattr(transport, "wait_seconds", 0.0)
        stage.run_task(task)
        phase[task.kind] += time.perf_counter() - t0 - (getattr(transport, "wait_seconds", 0.0) - w0)
    stats = torch.zeros(0)
    finals = None
    for s in stages:
        part, fin = s.end()
        stats = part if stats.numel() == 0 else stats + part
        if s.info.is_first:
            finals = fin
    transport.finish()
    compute = time.perf_counter() - start - (getattr(transport, "wait_seconds", 0.0) - wait0)
    stats = transport.all_reduce_sum(stats)
    k_max = (stats.shape[1] - 2) // 2
    steps = [int(v) for v in plan[:, 2]]
    dtype = ref.dtype
    micro_losses = [stats[m, 0].to(dtype) for m in range(len(steps))]
    return PipelineResult(
        loss=torch.stack(micro_losses).mean(),
        micro_losses=micro_losses,
        step_losses=[[stats[m, 2 + k].to(dtype) for k in range(steps[m])] for m in range(len(steps))],
        step_energies=[[stats[m, 2 + k_max + k].to(dtype) for k in range(steps[m])] for m in range(len(steps))],
        nonfinite=(stats[:, 1] > 0).any(),
        final_logits=finals,
        num_steps=steps,
        compute_seconds=compute,
        phase_seconds=dict(phase),
    )


def simulate_pipeline(models: Sequence[EnergyTransformer], thinking: Any,
                      micro_batches: Sequence[MicroBatch], loss_scale: Optional[float] = None,
                      loss_fn: Optional[LossFn] = None, schedule: str = "interleaved") -> PipelineResult:
    """All stages in this process, exchanging messages through a LocalTransport: the same
    schedule and arithmetic as the distributed run. `models[s]` is a full model cut to stage s."""
    transport = LocalTransport()
    stages = [EBTStage(m, thinking, transport, loss_fn=loss_fn) for m in models]
    return run_pipeline(stages, transport, micro_batches, len(micro_batches), loss_scale, schedule=schedule)


# -- Transformer++: ordinary GPipe ------------------------------------------------------------------------
class TransformerPipeline:
    """GPipe for the first-order Transformer++ on the same stages and transport: all
    micro-batches forward (the last stage computes the loss and its backward at once), then all
    backward. Returns the mean loss (on every stage)."""

    def __init__(self, model: TransformerPP, dims: Optional[ParallelDims], num_microbatches: int,
                 *, transport: Optional[Transport] = None, backprop: BackpropFn = _plain_backprop) -> None:
        self.model = model
        self.info: StageInfo = model.pipeline_stage
        self.num_microbatches = num_microbatches
        self.transport = transport or (P2PTransport(dims) if dims is not None and dims.pp > 1 else LocalTransport())
        self.backprop = backprop

    def run(self, micro_batches: Sequence[torch.Tensor], loss_scale: Optional[float] = None) -> torch.Tensor:
        """micro_batches: (B, S+1) ids per micro-batch, on every stage (the last reads the targets)."""
        model, info, tr = self.model, self.info, self.transport
        scale = 1.0 / self.num_microbatches if loss_scale is None else loss_scale
        dtype = next(model.parameters()).dtype
        device = model.rope_cos.device
        saved = []
        losses = torch.zeros(len(micro_batches), dtype=torch.float64)
        for m, ids in enumerate(micro_batches):
            rows, s = ids.shape[0], ids.shape[1] - 1
            if info.is_first:
                h_in = None
                h = model.tok_embeddings(ids[:, :-1])
            else:
                (h_in,) = tr.recv([(rows, s, model.cfg.dim)], dtype, device, info.stage - 1, info.stage)
                h = h_in.requires_grad_(True)
            cos, sin = model.rope_cos[:s], model.rope_sin[:s]
            for i in info.layers:
                h, _, _ = model.layers[i].forward_context(h, cos, sin, model.cfg.context_attention)
            if info.is_last:
                loss = model.vocab_ops.cross_entropy(model.lm_head(model.norm(h)), ids[:, 1:])
                losses[m] = float(loss)
                self.backprop([loss * scale], [torch.ones((), dtype=dtype, device=device)])
                if not info.is_first:
                    tr.send([h_in.grad], info.stage, info.stage - 1)
            else:
                tr.send([h], info.stage, info.stage + 1)
            saved.append((h_in, h))
        if not info.is_last:
            for m, ids in enumerate(micro_batches):
                h_in, h_out = saved[m]
                (adj,) = tr.recv([tuple(h_out.shape)], dtype, device, info.stage + 1, info.stage)
                self.backprop([h_out], [adj])
                if not info.is_first:
                    tr.send([h_in.grad], info.stage, info.stage - 1)
        tr.finish()
        losses = tr.all_reduce_sum(losses)
        return losses.mean().to(dtype)
