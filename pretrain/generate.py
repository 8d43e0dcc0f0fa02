"""Inference with System-2 thinking: next-token prediction by energy minimisation, best-of-G,
early stop, text generation with sampling controls, and a KV cache for the context stream.

The context stream never depends on the candidate, so its keys/values are cached across
generated tokens: appending a token runs the blocks on that token only. With `default`
conditioning one cache serves every thinking step; with `time_embed`/`adaln` the context
depends on the step, so there is one cache per distinct step embedding (each still grows by
one token per generated token). Each thinking step then costs a prediction-stream pass for one
position against the cached keys/values.

Three modes, all giving the same tokens (tests check it):
  * `kv` (default): the cache above;
  * `recompute`: no cache; the context stream is re-run over the whole prefix for every step
    of every token, and only the next position is predicted;
  * `reference`: what the public reference does: the full energy model (context stream and a
    prediction for every position) over the whole prefix for every step of every token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .model.ebt import EnergyTransformer
from .thinking import add_langevin_noise, descend, draw_randn

KV = List[Tuple[torch.Tensor, torch.Tensor]]
MODES = ("kv", "recompute", "reference")


@dataclass
class ThinkingDefaults:
    """Inference defaults shipped with an export (`thinking.json`)."""

    steps: int = 2
    step_size: Optional[float] = None
    """None: the model's learned alpha."""
    noise_std: float = 0.0
    num_samples: int = 1
    early_stop_tol: Optional[float] = None


class ContextCache:
    """Keys/values of the context stream for each step-condition key, and the token ids."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids
        self.kv: Dict[int, KV] = {}


@dataclass
class NextToken:
    logits: torch.Tensor
    """(B, V) thought-out logits of the next token (best of G)."""
    energies: torch.Tensor
    """(steps + 1, B) energy before each step and after the last, of the chosen sample."""
    steps_used: torch.Tensor
    """(B,) updates applied (fewer than `steps` under early stop)."""


class EBTInference:
    """Thinking and generation on a trained EnergyTransformer (float32/float64, any device)."""

    def __init__(self, model: EnergyTransformer, defaults: Optional[ThinkingDefaults] = None) -> None:
        if not isinstance(model, EnergyTransformer):
            raise TypeError(f"EBTInference needs an EnergyTransformer, got {type(model).__name__}")
        self.model = model.eval()
        self.defaults = defaults or ThinkingDefaults()

    # -- context stream with a KV cache ---------------------------------------------------
    def _key(self, step: int) -> int:
        return self.model.step_index(step) if self.model.context_depends_on_step else 0

    def _run_context(self, new_ids: torch.Tensor, past: Optional[KV], key: int) -> KV:
        """Runs new tokens through the context stream on top of `past` (None: from scratch)."""
        model = self.model
        batch = new_ids.shape[0]
        h = model.tok_embeddings(new_ids)
        start = 0 if past is None else past[0][0].shape[2]
        if past is None and model.cfg.ebt_type == "time_embed":
            h = torch.cat([model.step_embeddings.weight[key].expand(batch, 1, -1), h], dim=1)
        end = start + h.shape[1]
        cos, sin = model.rope_cos[start:end], model.rope_sin[start:end]
        cond = model._cond(key, batch)
        out: KV = []
        last = len(model.layers) - 1
        for i, layer in enumerate(model.layers):
            if past is None:
                empty = h.new_zeros(batch, model.cfg.num_heads, 0, model.cfg.head_dim)
                pk, pv = empty, empty
            else:
                pk, pv = past[i]
            h, k, v = layer.forward_context_incremental(h, cos, sin, pk, pv, cond, need_output=i < last)
            out.append((k, v))
        return out

    def _check_length(self, length: int) -> None:
        if length > self.model.cfg.max_seq_len:
            raise ValueError(
                f"context of {length} tokens exceeds the model's max_seq_len={self.model.cfg.max_seq_len}"
            )

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> ContextCache:
        self._check_length(ids.shape[1])
        return ContextCache(ids)

    @torch.no_grad()
    def extend(self, cache: ContextCache, new_ids: torch.Tensor) -> ContextCache:
        """Appends tokens: every existing per-step cache is extended by those tokens only."""
        ids = torch.cat([cache.ids, new_ids], dim=1)
        self._check_length(ids.shape[1])
        out = ContextCache(ids)
        out.kv = {key: self._run_context(new_ids, kv, key) for key, kv in cache.kv.items()}
        return out

    def _kv_for(self, cache: ContextCache, step: int, use_cache: bool = True) -> KV:
        key = self._key(step)
        if not use_cache:
            with torch.no_grad():
                return self._run_context(cache.ids, None, key)
        if key not in cache.kv:
            with torch.no_grad():
                cache.kv[key] = self._run_context(cache.ids, None, key)
        return cache.kv[key]

    # -- the prediction stream for the next position ---------------------------------------
    def _energy_next(self, kv: KV, probs: torch.Tensor, step: int) -> torch.Tensor:
        """Energy (N,) of candidates probs (N,1,V) for the token after the context; kv rows
        are repeated to N = G * B (sample-major) when G > 1."""
        model = self.model
        length = kv[0][0].shape[2]  # context slots, step token included
        reps = probs.shape[0] // kv[0][0].shape[0]
        h = model.cand_embed(probs)
        cos, sin = model.rope_cos[length : length + 1], model.rope_sin[length : length + 1]
        cond = model._cond(model.step_index(step), probs.shape[0])
        for i, layer in enumerate(model.layers):
            k, v = kv[i]
            if reps > 1:
                k, v = k.repeat(reps, 1, 1, 1), v.repeat(reps, 1, 1, 1)
            # One prediction that sees every context slot: visibility offset = length - 1.
            h = layer.forward_prediction(h, cos, sin, k, v, length - 1, "two_stream", cond)
        return model.energy_head(model.norm(h))[:, 0, 0]

    def _energy_reference(self, ids: torch.Tensor, probs: torch.Tensor, step: int) -> torch.Tensor:
        """The reference's way: the whole model over the prefix, a candidate at every position
        (uniform before the last: positions are independent, so only the last one matters)."""
        model = self.model
        ids = ids.repeat(probs.shape[0] // ids.shape[0], 1)
        before = probs.new_full((probs.shape[0], ids.shape[1] - 1, probs.shape[-1]), 1.0 / model.vocab_size)
        full = torch.cat([before, probs], dim=1)
        with torch.no_grad():
            context = model.prepare(ids, step)
        return model.energy_from_probs(context, full, step)[:, -1]

    def _energy(self, cache: ContextCache, probs: torch.Tensor, step: int, mode: str) -> torch.Tensor:
        if mode == "reference":
            return self._energy_reference(cache.ids, probs, step)
        return self._energy_next(self._kv_for(cache, step, mode == "kv"), probs, step)

    def next_token(
        self,
        cache: ContextCache,
        *,
        steps: Optional[int] = None,
        num_samples: Optional[int] = None,
        step_size: Optional[float] = None,
        noise_std: Optional[float] = None,
        early_stop_tol: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
        mode: str = "kv",
        score_final: bool = True,
    ) -> NextToken:
        """Thinks out the next token. `score_final=False` skips the energy of the final candidate
        (only needed to pick among G > 1 samples or to report it): `energies` then has `steps` rows."""
        d = self.defaults
        steps = d.steps if steps is None else steps
        num_samples = d.num_samples if num_samples is None else num_samples
        noise_std = d.noise_std if noise_std is None else noise_std
        early_stop_tol = d.early_stop_tol if early_stop_tol is None else early_stop_tol
        step_size = d.step_size if step_size is None else step_size
        if steps < 0 or num_samples < 1:
            raise ValueError(f"steps must be >= 0 and samples >= 1, got {steps}, {num_samples}")
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        score_final = score_final or num_samples > 1 or steps == 0
        model = self.model
        vocab_ops = model.vocab_ops
        dtype = model.energy_head.weight.dtype
        device = cache.ids.device
        batch = cache.ids.shape[0]
        rows = batch * num_samples
        y = vocab_ops.shard(draw_randn((rows, 1, model.vocab_size), generator, device, dtype))
        alpha = model.effective_step_size().detach() if step_size is None else torch.tensor(step_size, dtype=dtype)
        active = torch.ones(rows, dtype=torch.bool, device=device)
        used = torch.zeros(rows, dtype=torch.long, device=device)
        energies: List[torch.Tensor] = []
        prev = None
        for k in range(steps):
            y_in = add_langevin_noise(y, noise_std, model.vocab_size, vocab_ops, generator)  # as in training
            with torch.enable_grad():
                energy, _, y_next = descend(vocab_ops, lambda p: self._energy(cache, p, k, mode),
                                            y_in.detach().requires_grad_(True), alpha)
            energy, y_next = energy.detach(), y_next.detach()
            if early_stop_tol is None:
                y = y_next
            else:
                if prev is not None:
                    active = active & ((prev - energy) >= early_stop_tol)
                y = torch.where(active[:, None, None], y_next, y)
                used = used + active.long()
            energies.append(energy)
            prev = energy
        if early_stop_tol is None:
            used = used + steps
        if score_final:
            last = max(steps - 1, 0)  # the final candidate is scored on the last step's landscape
            with torch.no_grad():
                final = self._energy(cache, vocab_ops.probs(y), last, mode)
            energies.append(final)
            best = final.view(num_samples, batch).argmin(0)  # (B,)
        else:
            best = torch.zeros(batch, dtype=torch.long, device=device)
        pick = best * batch + torch.arange(batch, device=device)
        stacked = torch.stack(energies)[:, pick]
        return NextToken(logits=y[pick, 0], energies=stacked, steps_used=used[pick])

    # -- generation ---------------------------------------------------------------------------
    def generate_iter(
        self,
        prompt_ids: Sequence[int],
        max_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        mode: str = "kv",
        stop_id: Optional[int] = None,
        **think_kwargs,
    ) -> Iterator[int]:
        """Yields generated token ids one at a time (greedy when temperature == 0)."""
        if len(prompt_ids) == 0:
            raise ValueError("prompt must contain at least one token")
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        device = self.model.energy_head.weight.device
        generator = torch.Generator().manual_seed(seed)
        limit = self.model.cfg.max_seq_len
        ids = torch.tensor([list(prompt_ids)[-limit:]], dtype=torch.long, device=device)
        cache = self.prefill(ids)
        for _ in range(max_tokens):
            result = self.next_token(cache, generator=generator, mode=mode, score_final=False, **think_kwargs)
            token = sample(result.logits[0], temperature, top_k, top_p, generator)
            yield token
            if stop_id is not None and token == stop_id:
                return
            new = torch.tensor([[token]], dtype=torch.long, device=device)
            if cache.ids.shape[1] + 1 > limit:
                # Window full: positions shift, so the cache is rebuilt on the last `limit` tokens.
                cache = self.prefill(torch.cat([cache.ids, new], dim=1)[:, -limit:])
            else:
                cache = self.extend(cache, new) if mode == "kv" else ContextCache(torch.cat([cache.ids, new], dim=1))

    def generate(self, prompt_ids: Sequence[int], max_tokens: int, **kwargs) -> List[int]:
        return list(self.generate_iter(prompt_ids, max_tokens, **kwargs))

    @torch.no_grad()
    def score(self, context_ids: torch.Tensor, continuation_ids: torch.Tensor, step: int = 0) -> torch.Tensor:
        """Energy (B, S) of given tokens as one-hot candidates: the model's compatibility score of
        continuation token i+1 after context tokens 1..i (lower is better)."""
        model = self.model
        probs = torch.nn.functional.one_hot(continuation_ids, model.vocab_size).to(model.energy_head.weight.dtype)
        return model.energy_from_probs(model.prepare(context_ids, step), probs, step)


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator) -> int:
    """One token id from (V,) logits: greedy at temperature 0, else top-k/top-p sampling."""
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
    if temperature == 0:
        return int(logits.argmax())
    scaled = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(scaled, min(top_k, scaled.numel())).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))

