"""Thinking: energy minimisation over the candidate, for training (unrolled, differentiated
through) and for inference (more steps, best-of-G, early stop).

Training step k (EBT_SPEC section 2, reference semantics with `grad_wrt="probs"`):

    p_k = softmax(y_k);  E_k = E(x, p_k, step=k);  g_k = dE_k/dp_k  (create_graph for 2nd order)
    y_{k+1} = p_k - alpha_t * g_k          (treated as logits again)
    loss_k = CE(log_softmax(y_{k+1}), targets)

Two execution paths beyond the literal one, both exactly equal to it (tests prove it):

* per-step backward: when y is detached between steps (S1), step k's loss depends on the
  parameters only through step k's graph, so `loss_k.backward()` runs as soon as the step ends
  and that graph is freed: peak memory does not grow with the number of steps;
* context reuse: with `default` conditioning the context stream is computed once per batch.
  Under per-step backward its keys/values enter each step as detached leaves whose gradients
  accumulate; one backward through the context stream runs after the last step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, List, Optional, Sequence

import torch

from .model.ebt import Context, EnergyTransformer
from .model.vocab import LOCAL_VOCAB
from .replay import DTYPES as REPLAY_DTYPES
from .replay import STORAGES as REPLAY_STORAGES
from .replay import ReplayBuffer

if TYPE_CHECKING:
    from .compiled import CompiledEnergyGrad

CREATE_GRAPH = ("all", "last")
LOSS_ON = ("mean", "last")
INITS = ("noise", "zeros")
GRAD_WRT = ("probs", "logits")


@dataclass
class ThinkingConfig:
    """The `thinking:` section: every knob of the S1 and S2 recipes."""

    num_steps: int = 2
    """Thinking steps per training batch."""
    num_steps_max: Optional[int] = None
    """If set, each batch draws its number of steps uniformly from [num_steps, num_steps_max] (S2: 2..3)."""
    detach_between_steps: bool = True
    """Detach y between steps (S1); no detach in S2."""
    create_graph: str = "all"
    """Build the second-order graph on `all` steps (S1) or only the `last` (S2 truncation)."""
    loss_on: str = "mean"
    """Loss is the `mean` over steps (S1) or the `last` step's (S2)."""
    step_size_jitter: float = 1.0
    """s >= 1: alpha is redrawn per token uniformly in [alpha/s, alpha*s] during training (S2: 2)."""
    langevin_std: float = 0.0
    """Std of Gaussian noise added to y before each training step (S2: 3.0)."""
    init: str = "noise"
    """Initial candidate: `noise` (N(0, init_std^2) logits) or `zeros`."""
    init_std: float = 1.0
    """Std of the initial noise."""
    grad_wrt: str = "probs"
    """Differentiate E w.r.t. `probs` (the reference: y' = p - alpha dE/dp) or `logits`."""
    replay_size: int = 0
    """Replay buffer capacity in sequences (S2: 192); 0 disables it."""
    replay_fraction: float = 0.0
    """Rows added to each batch from the buffer, as a fraction of the batch (S2: 0.5)."""
    replay_dtype: str = "float32"
    """Storage dtype of the buffer's logits: `float32` (exact for float32 training) or `bfloat16` (half the bytes)."""
    replay_storage: str = "auto"
    """Where the buffer's logit rows live: `memory`, `disk` (a file under run_dir read and written
    with pread/pwrite: page cache, not process memory; same bytes) or `auto` (disk when a full
    buffer would exceed 1 GiB, e.g. 2.47 GB at V 50277; pretrain/replay.py)."""
    eval_steps: int = 3
    """Thinking steps at evaluation; the System-2 gain compares them with `num_steps`."""
    eval_noise_std: float = 0.0
    """Langevin noise at evaluation and inference, added to the candidate before each step's
    energy evaluation exactly as in training (S2: = langevin_std, so evaluation thinks on the
    landscape the model was trained on; without it the extra steps oscillate, docs/results.md)."""
    per_step_backward: bool = True
    """Backpropagate each step's loss when it ends (only when steps are detached; exact)."""
    reuse_context: bool = True
    """Compute the context stream once per batch when the conditioning allows (exact)."""
    fused_vocab: bool = True
    """End each step with the fused, chunked candidate update + cross-entropy of
    pretrain/model/vocab.py when it applies (grad_wrt='probs', the step's y' needs no graph); exact.
    The one switch for both families: a Transformer++ run (model.arch=transformer++) trains
    through the same Function as its fused LM-head cross-entropy when it is on."""

    @property
    def trained_steps(self) -> int:
        """The most thinking steps a training batch takes (S2: num_steps_max)."""
        return self.num_steps_max or self.num_steps

    def __post_init__(self) -> None:
        def bad(key: str, msg: str) -> ValueError:
            return ValueError(f"thinking.{key}: {msg}")

        if self.num_steps < 1:
            raise bad("num_steps", f"must be >= 1, got {self.num_steps}")
        if self.num_steps_max is not None and self.num_steps_max < self.num_steps:
            raise bad("num_steps_max", f"{self.num_steps_max} < thinking.num_steps={self.num_steps}")
        if self.create_graph not in CREATE_GRAPH:
            raise bad("create_graph", f"{self.create_graph!r} is not one of {CREATE_GRAPH}")
        if self.loss_on not in LOSS_ON:
            raise bad("loss_on", f"{self.loss_on!r} is not one of {LOSS_ON}")
        if self.init not in INITS:
            raise bad("init", f"{self.init!r} is not one of {INITS}")
        if self.grad_wrt not in GRAD_WRT:
            raise bad("grad_wrt", f"{self.grad_wrt!r} is not one of {GRAD_WRT}")
        if self.step_size_jitter < 1.0:
            raise bad("step_size_jitter", f"must be >= 1 (1 disables it), got {self.step_size_jitter}")
        if self.langevin_std < 0 or self.init_std < 0 or self.eval_noise_std < 0:
            raise bad("langevin_std", "noise standard deviations must be >= 0")
        if self.replay_size < 0 or not 0.0 <= self.replay_fraction <= 1.0:
            raise bad("replay_fraction", "replay_size must be >= 0 and replay_fraction in [0, 1]")
        if self.replay_fraction > 0 and self.replay_size == 0:
            raise bad("replay_size", "replay_fraction > 0 needs thinking.replay_size > 0")
        if self.replay_storage not in REPLAY_STORAGES:
            raise bad("replay_storage", f"{self.replay_storage!r} is not one of {REPLAY_STORAGES}")
        if self.replay_dtype not in REPLAY_DTYPES:
            raise bad("replay_dtype", f"{self.replay_dtype!r} is not one of {tuple(REPLAY_DTYPES)}")
        if self.eval_steps < 1:
            raise bad("eval_steps", f"must be >= 1, got {self.eval_steps}")
        if self.loss_on == "mean" and self.create_graph == "last" and self.num_steps > 1:
            raise bad(
                "create_graph",
                "'last' with thinking.loss_on='mean' would train early steps without their second-order "
                "term; use loss_on='last' (S2) or create_graph='all' (S1)",
            )


# -- randomness ---------------------------------------------------------------------------------
_MASK64 = (1 << 64) - 1


def mix_seed(*parts: int) -> int:
    """A 63-bit generator seed that is a pure function of integer parts (splitmix64 rounds)."""
    x = 0x9E3779B97F4A7C15
    for part in parts:
        x = ((x ^ (int(part) & _MASK64)) + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x & ((1 << 63) - 1)


STREAM_INIT, STREAM_JITTER, STREAM_LANGEVIN, STREAM_NUM_STEPS, STREAM_REPLAY = range(5)


@dataclass(frozen=True)
class StepKey:
    """The randomness of one optimizer step: every draw is a pure function of (seed, optimizer
    step, what is drawn, global sample index), never of the rank. So a data-parallel run draws
    exactly what one process draws for the same sample, different samples get independent
    noise, and a run resumed under another layout continues the same trajectory."""

    seed: int
    step: int

    def generator(self, stream: int, *index: int) -> torch.Generator:
        return torch.Generator().manual_seed(mix_seed(self.seed, self.step, stream, *index))

    def num_steps(self, cfg: "ThinkingConfig") -> int:
        """The step's number of thinking steps (one draw for the whole global batch)."""
        return draw_num_steps(cfg, self.generator(STREAM_NUM_STEPS))


class Draws:
    """Where the unroll's random numbers come from: initial candidates, step-size jitter and
    Langevin noise. Full-vocabulary tensors (the caller shards them)."""

    def initial(self, shape, cfg: "ThinkingConfig", device, dtype) -> torch.Tensor:
        raise NotImplementedError

    def jitter(self, shape, device, dtype) -> torch.Tensor:
        raise NotImplementedError

    def langevin(self, step: int, shape, device, dtype) -> torch.Tensor:
        raise NotImplementedError


class GeneratorDraws(Draws):
    """Everything from one generator, in call order (single-process tools and tests)."""

    def __init__(self, generator: Optional[torch.Generator]) -> None:
        self.generator = generator

    def initial(self, shape, cfg, device, dtype):
        if cfg.init == "zeros":
            return torch.zeros(shape, device=device, dtype=dtype)
        return draw_randn(shape, self.generator, device, dtype) * cfg.init_std

    def jitter(self, shape, device, dtype):
        return draw_rand(shape, self.generator, device, dtype)

    def langevin(self, step, shape, device, dtype):
        return draw_randn(shape, self.generator, device, dtype)


class KeyedDraws(Draws):
    """Row r's numbers from its own generators, keyed by (step key, stream, sample_ids[r]):
    the training path. `sample_ids` are global: the row's position in the optimizer step's
    global batch (fresh rows) or a replay slot id (see pretrain.train_module)."""

    def __init__(self, key: StepKey, sample_ids: Sequence[int]) -> None:
        self.key, self.sample_ids = key, list(sample_ids)

    def _rows(self, stream: int, extra: tuple, shape, device, dtype, normal: bool) -> torch.Tensor:
        if shape[0] != len(self.sample_ids):
            raise ValueError(f"KeyedDraws: {shape[0]} rows requested for {len(self.sample_ids)} sample ids")
        draw = torch.randn if normal else torch.rand
        rows = [draw((1, *shape[1:]), generator=self.key.generator(stream, sid, *extra), dtype=dtype)
                for sid in self.sample_ids]
        return torch.cat(rows).to(device)

    def initial(self, shape, cfg, device, dtype):
        if cfg.init == "zeros":
            return torch.zeros(shape, device=device, dtype=dtype)
        return self._rows(STREAM_INIT, (), shape, device, dtype, True) * cfg.init_std

    def jitter(self, shape, device, dtype):
        return self._rows(STREAM_JITTER, (), shape, device, dtype, False)

    def langevin(self, step, shape, device, dtype):
        return self._rows(STREAM_LANGEVIN, (step,), shape, device, dtype, True)


# -- the thinking update (one place: training, think() and generation) --------------------------
def descend(vocab_ops, energy_of: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor, alpha,
            *, grad_wrt: str = "probs", create_graph: bool = False):
    """One thinking step from candidate logits `y` (which must require grad):

        p = softmax(y);  E = energy_of(p);  g = dE/d(p or y);  y' = (p or y) - alpha * g

    Returns (E, g, y'). With `create_graph` the gradient keeps its graph (second order).
    Langevin noise, when used, is added to `y` by the caller *before* this call, in training
    and at inference alike."""
    p = vocab_ops.probs(y)
    wrt = p if grad_wrt == "probs" else y
    energy = energy_of(p)
    (g,) = torch.autograd.grad(energy.sum(), wrt, create_graph=create_graph)
    return energy, g, wrt - alpha * g


# -- training unroll ------------------------------------------------------------------------
@dataclass
class UnrollResult:
    loss: torch.Tensor
    """The training loss (detached when the backward already ran)."""
    step_losses: List[torch.Tensor]
    """Detached cross-entropy after each step."""
    step_energies: List[torch.Tensor]
    """Detached mean energy of the candidate each step started from."""
    final_logits: torch.Tensor
    nonfinite: torch.Tensor
    """Bool tensor: a loss or dE/dy was NaN/Inf (checked without a host sync)."""
    num_steps: int = 0
    num_rows: int = 0
    extra: dict = field(default_factory=dict)


def _generator_device(generator: Optional[torch.Generator]) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def draw_randn(shape, generator, device, dtype) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device, then moved to `device` (CPU
    generators stay reproducible whatever device the model is on)."""
    return torch.randn(shape, generator=generator, device=_generator_device(generator), dtype=dtype).to(device)


def draw_rand(shape, generator, device, dtype) -> torch.Tensor:
    """Uniform [0, 1) noise, drawn like `draw_randn`."""
    return torch.rand(shape, generator=generator, device=_generator_device(generator), dtype=dtype).to(device)


def add_langevin_noise(y: torch.Tensor, std: float, vocab: int, vocab_ops, generator) -> torch.Tensor:
    """y + std * N(0, 1) from one generator: the noise each inference thinking step adds to its
    candidate BEFORE the energy evaluation, as training does (`think()` and generation; the
    training unroll draws the same placement from its keyed `Draws`). Drawn over the full
    vocabulary, then sharded, so every layout sees the same candidate. std = 0 draws nothing."""
    if std <= 0:
        return y
    noise = draw_randn((*y.shape[:-1], vocab), generator, y.device, y.dtype)
    return y + vocab_ops.shard(noise) * std


def initial_candidates(batch: int, seq: int, vocab: int, cfg: ThinkingConfig, generator, device, dtype):
    return GeneratorDraws(generator).initial((batch, seq, vocab), cfg, device, dtype)


cross_entropy = LOCAL_VOCAB.cross_entropy

BackwardFn = Callable[[Sequence[torch.Tensor], Optional[Sequence[torch.Tensor]], bool], None]
"""backward_fn(tensors, grad_tensors, is_last): runs one backward of the unroll. Data
parallelism passes one that synchronises gradients only when `is_last` (one all-reduce per
optimizer step however many per-step backwards the unroll makes)."""


def _plain_backward(tensors, grad_tensors, is_last) -> None:
    torch.autograd.backward(list(tensors), None if grad_tensors is None else list(grad_tensors))


def draw_num_steps(cfg: ThinkingConfig, generator) -> int:
    if cfg.num_steps_max is None or cfg.num_steps_max == cfg.num_steps:
        return cfg.num_steps
    return int(torch.randint(cfg.num_steps, cfg.num_steps_max + 1, (1,), generator=generator).item())


def step_size_jitter(draws: Draws, cfg: ThinkingConfig, rows: int, seq: int, device, dtype) -> Optional[torch.Tensor]:
    """(rows, seq, 1) per-token step-size multipliers, uniform in [1/s, s] for
    s = thinking.step_size_jitter (S2), or None when there is no jitter."""
    if cfg.step_size_jitter <= 1.0:
        return None
    s = cfg.step_size_jitter
    return 1.0 / s + draws.jitter((rows, seq, 1), device, dtype) * (s - 1.0 / s)


def unroll(
    model: EnergyTransformer,
    input_ids: torch.Tensor,
    cfg: ThinkingConfig,
    *,
    generator: Optional[torch.Generator] = None,
    draws: Optional[Draws] = None,
    replay: Optional[ReplayBuffer] = None,
    backward: bool = True,
    loss_scale: float = 1.0,
    num_steps: Optional[int] = None,
    initial_logits: Optional[torch.Tensor] = None,
    backward_fn: BackwardFn = _plain_backward,
    compiled: Optional["CompiledEnergyGrad"] = None,
) -> UnrollResult:
    """One training unroll on a batch of token ids (B, S+1).

    Random numbers come from `draws` (the trainer's KeyedDraws), else from `generator` in
    call order. `initial_logits` (this rank's vocabulary slice) replaces the initial draw;
    `replay` (single-process convenience) appends buffer rows drawn with `generator` and
    stores the final candidates; the trainer does replay over the global batch instead
    (pretrain.train_module). With `backward=True` gradients of `loss * loss_scale` are
    accumulated into the parameters (per step when allowed, else once at the end) and the
    returned loss is detached; with `backward=False` the loss keeps its graph.
    `compiled` (pretrain.compiled, `train.compile`): the fused second-order steps' energy and
    dE/dh run through it (needs `backward=True`: its leaves' gradients are carried on there).
    """
    carry = None
    if compiled is not None:
        if not backward:
            raise ValueError("unroll: a compiled thinking step needs backward=True (it carries leaf gradients)")
        from .compiled import LeafCarry

        carry = LeafCarry()
        backward_fn = carry.wrap(backward_fn)
    context_ids, targets = input_ids[:, :-1], input_ids[:, 1:]
    dtype = model.energy_head.weight.dtype
    device = input_ids.device
    batch, seq = context_ids.shape
    vocab = model.vocab_size
    draws = draws if draws is not None else GeneratorDraws(generator)
    k_steps = num_steps if num_steps is not None else draw_num_steps(cfg, generator)

    vocab_ops = model.vocab_ops
    # Drawn over the full vocabulary, then sharded: every layout sees the same candidate.
    y = initial_logits if initial_logits is not None else vocab_ops.shard(
        draws.initial((batch, seq, vocab), cfg, device, dtype)
    )
    fresh_ids = input_ids
    if replay is not None and cfg.replay_fraction > 0 and len(replay) > 0:
        n_replay = int(round(cfg.replay_fraction * batch))
        if n_replay > 0:
            r_ids, r_logits = replay.sample(n_replay, generator)
            context_ids = torch.cat([context_ids, r_ids[:, :-1]])
            targets = torch.cat([targets, r_ids[:, 1:]])
            y = torch.cat([y, r_logits.to(dtype)])
    rows = y.shape[0]

    jitter = step_size_jitter(draws, cfg, rows, seq, device, dtype)

    reuse = cfg.reuse_context and not model.context_depends_on_step
    per_step = backward and cfg.detach_between_steps and cfg.per_step_backward
    context: Optional[Context] = model.prepare(context_ids, 0) if reuse else None
    context_graph: Optional[Context] = None
    if reuse and per_step:
        context_graph = context
        context = context.replace_tensors([t.detach().requires_grad_(t.requires_grad) for t in context.tensors])

    weights = [1.0 / k_steps if cfg.loss_on == "mean" else float(k == k_steps - 1) for k in range(k_steps)]
    total: Optional[torch.Tensor] = None
    step_losses: List[torch.Tensor] = []
    step_energies: List[torch.Tensor] = []
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)

    last_backward = k_steps - 1 if context_graph is None else k_steps
    for k in range(k_steps):
        if cfg.langevin_std > 0:
            y = y + vocab_ops.shard(draws.langevin(k, (rows, seq, vocab), device, dtype)) * cfg.langevin_std
        if cfg.detach_between_steps:
            y = y.detach()
        make_graph = cfg.create_graph == "all" or k == k_steps - 1
        step_context = context if reuse else model.prepare(context_ids, k)
        # alpha's (tiny) graph is rebuilt per step so a per-step backward can free it.
        alpha = model.effective_step_size() if jitter is None else model.effective_step_size() * jitter
        # y' keeps no graph when it is detached next (S1), is the last step's, or when g is a
        # constant and alpha fixed (S2 truncation: nothing trainable reaches it).
        cut = cfg.detach_between_steps or k == k_steps - 1 or (not make_graph and not alpha.requires_grad)
        if cfg.fused_vocab and cfg.grad_wrt == "probs" and cut and not y.requires_grad:
            # Fused step (pretrain/model/vocab.py): dE/dh of h = W_v2e p, then g = dE/dh @ W_v2e,
            # y' and its CE in one chunked pass. p needs no gradient (y is a constant here).
            with torch.no_grad():
                p = vocab_ops.probs(y)
            h = model.cand_embed(p)
            if carry is not None and make_graph:
                energy, u = compiled(step_context, h, k, carry)
            else:
                energy = model.energy_from_embedding(step_context, h, k)
                (u,) = torch.autograd.grad(energy.sum(), h, create_graph=make_graph)
            # Without create_graph g is a constant on the plain path: W_v2e must not get its term.
            w = model.cand_embed.weight if make_graph else model.cand_embed.weight.detach()
            loss_k, y, finite = vocab_ops.update_cross_entropy(p, u, w, alpha, targets)
            nonfinite = nonfinite | ~finite
        else:
            if not y.requires_grad:
                y = y.requires_grad_(True)
            energy, g, y = descend(vocab_ops, lambda p: model.energy_from_probs(step_context, p, k), y, alpha,
                                   grad_wrt=cfg.grad_wrt, create_graph=make_graph)
            if cut and not cfg.detach_between_steps and k < k_steps - 1:
                y = y.detach()
            nonfinite = nonfinite | ~torch.isfinite(g).all()
            loss_k = vocab_ops.cross_entropy(y, targets)
        step_energies.append(energy.detach().mean())
        step_losses.append(loss_k.detach())
        if weights[k] == 0.0:
            continue
        contribution = loss_k * weights[k]
        if per_step:
            backward_fn([contribution * loss_scale], None, k == last_backward)
            total = contribution.detach() if total is None else total + contribution.detach()
        else:
            total = contribution if total is None else total + contribution

    nonfinite = nonfinite | ~torch.isfinite(total)
    if context_graph is not None:
        pairs = [(t, leaf.grad) for t, leaf in zip(context_graph.tensors, context.tensors) if leaf.grad is not None]
        if pairs:
            backward_fn([t for t, _ in pairs], [g for _, g in pairs], True)
    elif backward and not per_step:
        backward_fn([total * loss_scale], None, True)
        total = total.detach()

    final = y.detach()
    if replay is not None and cfg.replay_size > 0 and not bool(nonfinite):
        # A step the trainer will skip must not leave NaN rows that later batches start from.
        replay.add(fresh_ids, final[:batch])
    return UnrollResult(
        loss=total,
        step_losses=step_losses,
        step_energies=step_energies,
        final_logits=final,
        nonfinite=nonfinite,
        num_steps=k_steps,
        num_rows=rows,
    )


# -- inference ------------------------------------------------------------------------------
@dataclass
class ThinkResult:
    logits: torch.Tensor
    """(B, S, V) final candidate logits (best of G per position)."""
    energies: torch.Tensor
    """(steps + 1, B, S) energy of the candidate before each step and after the last."""
    steps_used: torch.Tensor
    """(B, S) number of updates applied per position (fewer than `steps` under early stop)."""
    ce_per_step: Optional[List[float]] = None
    """Mean cross-entropy after each step (and of the initial candidate first), if targets given."""


def think(
    model: EnergyTransformer,
    context_ids: torch.Tensor,
    steps: int,
    *,
    step_size: Optional[float] = None,
    noise_std: float = 0.0,
    num_samples: int = 1,
    early_stop_tol: Optional[float] = None,
    init: str = "noise",
    init_std: float = 1.0,
    grad_wrt: str = "probs",
    generator: Optional[torch.Generator] = None,
    targets: Optional[torch.Tensor] = None,
) -> ThinkResult:
    """Inference-time thinking: `steps` updates (any number; extra steps reuse the last step
    embedding), optional alpha/noise overrides (the noise moves the candidate before each
    step's energy evaluation, as in training), best-of-`num_samples` by final energy per
    position, and per-position early stop once the energy falls by less than `early_stop_tol`.
    No parameter gradients are computed."""
    if steps < 0 or num_samples < 1:
        raise ValueError(f"think: steps must be >= 0 and num_samples >= 1, got {steps}, {num_samples}")
    batch, seq = context_ids.shape
    g_batch = batch * num_samples
    ids = context_ids.repeat(num_samples, 1)
    tgt = targets.repeat(num_samples, 1) if targets is not None else None
    dtype = model.energy_head.weight.dtype
    cfg = ThinkingConfig(init=init, init_std=init_std)
    vocab_ops = model.vocab_ops
    y = vocab_ops.shard(initial_candidates(g_batch, seq, model.vocab_size, cfg, generator, context_ids.device, dtype))
    with torch.no_grad():
        alpha = model.effective_step_size().detach() if step_size is None else torch.tensor(step_size, dtype=dtype)
    reuse = not model.context_depends_on_step
    context = None
    active = torch.ones(g_batch, seq, dtype=torch.bool, device=context_ids.device)
    used = torch.zeros(g_batch, seq, dtype=torch.long, device=context_ids.device)
    energies: List[torch.Tensor] = []
    ces: List[float] = []

    def prepared(step: int) -> Context:
        nonlocal context
        with torch.no_grad():
            if context is None or not reuse:
                context = model.prepare(ids, step)
        return context

    def record_ce(y_now):
        if tgt is not None:
            ces.append(vocab_ops.cross_entropy(y_now.detach(), tgt).item())

    record_ce(y)
    prev_energy = None
    for k in range(steps):
        y_in = add_langevin_noise(y, noise_std, model.vocab_size, vocab_ops, generator)  # as in training
        ctx = prepared(k)
        with torch.enable_grad():
            energy, _, y_next = descend(vocab_ops, lambda p: model.energy_from_probs(ctx, p, k),
                                        y_in.detach().requires_grad_(True), alpha, grad_wrt=grad_wrt)
        energy, y_next = energy.detach(), y_next.detach()
        if prev_energy is not None and early_stop_tol is not None:
            stalled = (prev_energy - energy) < early_stop_tol
            active = active & ~stalled
        energies.append(energy)
        prev_energy = energy
        y = torch.where(active.unsqueeze(-1), y_next, y)
        used = used + active.long()
        record_ce(y)
    last = max(steps - 1, 0)
    with torch.no_grad():
        final_energy = model.energy_from_probs(prepared(last), vocab_ops.probs(y), last)
    energies.append(final_energy)

    energies_t = torch.stack(energies)  # (steps+1, G*B, S)
    y = y.view(num_samples, batch, seq, -1)
    used = used.view(num_samples, batch, seq)
    per_sample_final = final_energy.view(num_samples, batch, seq)
    best = per_sample_final.argmin(dim=0)  # (B, S)
    logits = torch.gather(y, 0, best[None, :, :, None].expand(1, batch, seq, y.shape[-1]))[0]
    steps_used = torch.gather(used, 0, best[None])[0]
    energies_best = torch.gather(
        energies_t.view(-1, num_samples, batch, seq), 1, best[None, None].expand(energies_t.shape[0], 1, batch, seq)
    )[:, 0]
    return ThinkResult(logits=logits, energies=energies_best, steps_used=steps_used, ce_per_step=ces or None)
