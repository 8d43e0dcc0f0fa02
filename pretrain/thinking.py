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
from typing import Callable, List, Optional, Sequence

import torch

from .model.ebt import Context, EnergyTransformer
from .model.vocab import LOCAL_VOCAB

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
        if self.eval_steps < 1:
            raise bad("eval_steps", f"must be >= 1, got {self.eval_steps}")
        if self.loss_on == "mean" and self.create_graph == "last" and self.num_steps > 1:
            raise bad(
                "create_graph",
                "'last' with thinking.loss_on='mean' would train early steps without their second-order "
                "term; use loss_on='last' (S2) or create_graph='all' (S1)",
            )


# -- replay buffer --------------------------------------------------------------------------
class ReplayBuffer:
    """Past sequences and their final candidate logits (S2). Rows drawn from it start thinking
    from their stored logits instead of noise. A ring buffer; its state is checkpointable."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.ids: Optional[torch.Tensor] = None
        self.logits: Optional[torch.Tensor] = None
        self.size = 0
        self.next = 0

    def __len__(self) -> int:
        return self.size

    def add(self, ids: torch.Tensor, logits: torch.Tensor) -> None:
        ids, logits = ids.detach(), logits.detach()
        if self.ids is None:
            self.ids = ids.new_zeros((self.capacity, *ids.shape[1:]))
            self.logits = logits.new_zeros((self.capacity, *logits.shape[1:]))
        for row in range(ids.shape[0]):
            self.ids[self.next] = ids[row]
            self.logits[self.next] = logits[row]
            self.next = (self.next + 1) % self.capacity
            self.size = min(self.size + 1, self.capacity)

    def sample(self, n: int, generator: Optional[torch.Generator]):
        idx = torch.randint(0, self.size, (n,), generator=generator, device="cpu").to(self.ids.device)
        return self.ids[idx], self.logits[idx]

    def state_dict(self) -> dict:
        state = {"size": self.size, "next": self.next, "capacity": self.capacity}
        if self.ids is not None:
            state.update(ids=self.ids, logits=self.logits)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.capacity, self.size, self.next = int(state["capacity"]), int(state["size"]), int(state["next"])
        self.ids, self.logits = state.get("ids"), state.get("logits")


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
    """y + std * N(0, 1): the noise each thinking step adds to its candidate BEFORE the energy
    evaluation (training, `think()` and generation alike; EBT_SPEC section 2). Drawn over the
    full vocabulary, then sharded, so every layout sees the same candidate. std = 0 draws nothing."""
    if std <= 0:
        return y
    noise = draw_randn((*y.shape[:-1], vocab), generator, y.device, y.dtype)
    return y + vocab_ops.shard(noise) * std


def initial_candidates(batch: int, seq: int, vocab: int, cfg: ThinkingConfig, generator, device, dtype):
    if cfg.init == "zeros":
        return torch.zeros(batch, seq, vocab, device=device, dtype=dtype)
    return draw_randn((batch, seq, vocab), generator, device, dtype) * cfg.init_std


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


def unroll(
    model: EnergyTransformer,
    input_ids: torch.Tensor,
    cfg: ThinkingConfig,
    *,
    generator: Optional[torch.Generator] = None,
    replay: Optional[ReplayBuffer] = None,
    backward: bool = True,
    loss_scale: float = 1.0,
    num_steps: Optional[int] = None,
    initial_logits: Optional[torch.Tensor] = None,
    backward_fn: BackwardFn = _plain_backward,
) -> UnrollResult:
    """One training unroll on a batch of token ids (B, S+1).

    With `backward=True` gradients of `loss * loss_scale` are accumulated into the parameters
    (per step when allowed, else once at the end) and the returned loss is detached; with
    `backward=False` the loss keeps its graph (for tests and custom drivers).
    """
    context_ids, targets = input_ids[:, :-1], input_ids[:, 1:]
    dtype = model.energy_head.weight.dtype
    device = input_ids.device
    batch, seq = context_ids.shape
    vocab = model.vocab_size
    k_steps = num_steps if num_steps is not None else draw_num_steps(cfg, generator)

    vocab_ops = model.vocab_ops
    # Drawn over the full vocabulary, then sharded: every layout sees the same candidate.
    y = initial_logits if initial_logits is not None else vocab_ops.shard(
        initial_candidates(batch, seq, vocab, cfg, generator, device, dtype)
    )
    fresh_ids = input_ids
    if replay is not None and cfg.replay_fraction > 0 and len(replay) > 0:
        n_replay = int(round(cfg.replay_fraction * batch))
        if n_replay > 0:
            r_ids, r_logits = replay.sample(n_replay, generator)
            context_ids = torch.cat([context_ids, r_ids[:, :-1]])
            targets = torch.cat([targets, r_ids[:, 1:]])
            y = torch.cat([y, r_logits.to(dtype)])

    jitter = None
    if cfg.step_size_jitter > 1.0:
        s = cfg.step_size_jitter
        jitter = 1.0 / s + draw_rand((y.shape[0], seq, 1), generator, device, dtype) * (s - 1.0 / s)

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
        y = add_langevin_noise(y, cfg.langevin_std, vocab, vocab_ops, generator)
        if cfg.detach_between_steps:
            y = y.detach()
        if not y.requires_grad:
            y = y.requires_grad_(True)
        make_graph = cfg.create_graph == "all" or k == k_steps - 1
        step_context = context if reuse else model.prepare(context_ids, k)
        p = vocab_ops.probs(y)
        wrt = p if cfg.grad_wrt == "probs" else y
        energy = model.energy_from_probs(step_context, p, k)
        (g,) = torch.autograd.grad(energy.sum(), wrt, create_graph=make_graph)
        # alpha's (tiny) graph is rebuilt per step so a per-step backward can free it.
        alpha = model.effective_step_size() if jitter is None else model.effective_step_size() * jitter
        y = wrt - alpha * g
        if not make_graph and not model.step_size.requires_grad:
            # g is a constant and alpha is fixed: nothing trainable reaches y, so keeping its
            # chain (softmaxes of every earlier step) would only cost memory (S2 truncation).
            y = y.detach()
        nonfinite = nonfinite | ~torch.isfinite(g).all()
        step_energies.append(energy.detach().mean())
        loss_k = vocab_ops.cross_entropy(y, targets)
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
        num_rows=y.shape[0],
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

    def evaluate(y_now: torch.Tensor, step: int, need_grad: bool):
        nonlocal context
        with torch.no_grad():
            if context is None or not reuse:
                context = model.prepare(ids, step)
        with torch.enable_grad():
            y_leaf = y_now.detach().requires_grad_(need_grad)
            p = vocab_ops.probs(y_leaf)
            wrt = p if grad_wrt == "probs" else y_leaf
            energy = model.energy_from_probs(context, p, step)
            if not need_grad:
                return energy.detach(), None, None
            (g,) = torch.autograd.grad(energy.sum(), wrt)
        return energy.detach(), g.detach(), wrt.detach()

    def record_ce(y_now):
        if tgt is not None:
            ces.append(vocab_ops.cross_entropy(y_now.detach(), tgt).item())

    record_ce(y)
    prev_energy = None
    for k in range(steps):
        # As in training: noise moves the candidate first, then the step descends from there.
        y_start = add_langevin_noise(y, noise_std, model.vocab_size, vocab_ops, generator)
        energy, g, base = evaluate(y_start, k, need_grad=True)
        if prev_energy is not None and early_stop_tol is not None:
            stalled = (prev_energy - energy) < early_stop_tol
            active = active & ~stalled
        energies.append(energy)
        prev_energy = energy
        y_next = base - alpha * g
        y = torch.where(active.unsqueeze(-1), y_next, y)
        used = used + active.long()
        record_ce(y)
    final_energy, _, _ = evaluate(y, max(steps - 1, 0), need_grad=False)
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
