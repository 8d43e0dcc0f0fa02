"""KV-cached inference equals recomputation: energies of the next position, and the tokens of
greedy generation."""
from __future__ import annotations

import pytest
import torch

from ebt_testlib import VARIANTS
from pretrain.generate import EBTInference, sample
from pretrain.model import build_model


def _model(variant, dtype=torch.float64, max_seq_len=96, seed=0):
    torch.manual_seed(seed)
    model = build_model(
        dict(vocab_size=31, dim=32, num_heads=4, num_layers=2, max_seq_len=max_seq_len, ebt_type=variant,
             step_size=5.0, num_step_embeddings=2)
    ).to(dtype)
    with torch.no_grad():  # move adaLN off its zero init so the conditioning is exercised
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _wrong_rope_offset(model) -> None:
    """The bug the cache tests must catch: appended tokens rotated one position too far."""
    for layer in model.layers:
        original = layer.forward_context_incremental

        def shifted(h, cos, sin, past_k, past_v, cond=None, need_output=True, _original=original):
            start = past_k.shape[2]
            if start > 0:
                n = h.shape[1]
                cos, sin = model.rope_cos[start + 1 : start + 1 + n], model.rope_sin[start + 1 : start + 1 + n]
            return _original(h, cos, sin, past_k, past_v, cond, need_output)

        layer.forward_context_incremental = shifted


def _incremental_calls(engine) -> list:
    """Records the number of new tokens of every context-stream call made on top of a cache."""
    calls, original = [], engine._run_context

    def counting(new_ids, past, key):
        if past is not None:
            calls.append(new_ids.shape[1])
        return original(new_ids, past, key)

    engine._run_context = counting
    return calls


def _extended_energies(model, variant):
    engine = EBTInference(model)
    calls = _incremental_calls(engine)
    ids = torch.randint(0, 31, (2, 9), generator=torch.Generator().manual_seed(1))
    cache = engine.prefill(ids[:, :5])
    for step in range(3):
        engine._kv_for(cache, step, True)  # the per-step caches exist before the tokens arrive
    for t in range(5, 9):
        cache = engine.extend(cache, ids[:, t : t + 1])
    # the cache was really extended one token at a time, never rebuilt
    assert calls and set(calls) == {1} and len(calls) == 4 * len(cache.kv)
    assert all(kv[0][0].shape[2] == 9 + (variant == "time_embed") for kv in cache.kv.values())
    probs = torch.softmax(torch.randn(2, 1, 31, dtype=torch.float64, generator=torch.Generator().manual_seed(2)), -1)
    out = []
    for step in range(3):
        cached = engine._energy_next(engine._kv_for(cache, step, True), probs, step)
        full_probs = torch.cat([torch.full((2, 8, 31), 1 / 31, dtype=torch.float64), probs], dim=1)
        with torch.no_grad():
            full = model.energy_from_probs(model.prepare(ids, step), full_probs, step)[:, -1]
        out.append((cached - full).abs().max().item())
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_next_position_energy_equals_full_model(variant):
    assert max(_extended_energies(_model(variant), variant)) < 1e-10


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_wrong_rope_offset_in_the_cached_path_is_caught(variant):
    model = _model(variant)
    _wrong_rope_offset(model)
    assert max(_extended_energies(model, variant)) > 1e-6


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_next_position_energy_equals_full_model_after_prefill_only(variant):
    model = _model(variant)
    engine = EBTInference(model)
    ids = torch.randint(0, 31, (2, 9), generator=torch.Generator().manual_seed(1))
    cache = engine.prefill(ids[:, :5])
    for t in range(5, 9):
        cache = engine.extend(cache, ids[:, t : t + 1])
    probs = torch.softmax(torch.randn(2, 1, 31, dtype=torch.float64), -1)
    for step in range(3):
        cached = engine._energy_next(engine._kv_for(cache, step, True), probs, step)
        # the full model: p_S (which predicts x_{S+1}) is the last prediction of the context
        full_probs = torch.cat([torch.full((2, 8, 31), 1 / 31, dtype=torch.float64), probs], dim=1)
        with torch.no_grad():
            full = model.energy_from_probs(model.prepare(ids, step), full_probs, step)[:, -1]
        assert (cached - full).abs().max().item() < 1e-10


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_generation_gives_exactly_the_uncached_tokens(variant):
    model = _model(variant, dtype=torch.float32)
    engine = EBTInference(model)
    calls = _incremental_calls(engine)
    prompt = torch.randint(0, 31, (12,), generator=torch.Generator().manual_seed(2)).tolist()
    kwargs = dict(steps=3, seed=7, temperature=4.0)  # sampled: the tokens are not degenerate
    cached = engine.generate(prompt, 64, mode="kv", **kwargs)
    assert len(cached) == 64 and len(set(cached)) >= 16, cached
    assert len(calls) >= 63 and set(calls) == {1}  # every new token went through the cache
    assert engine.generate(prompt, 64, mode="recompute", **kwargs) == cached
    assert engine.generate(prompt, 64, mode="reference", **kwargs) == cached


def test_a_wrong_rope_offset_changes_the_cached_tokens():
    model = _model("default", dtype=torch.float32)
    prompt = torch.randint(0, 31, (12,), generator=torch.Generator().manual_seed(2)).tolist()
    kwargs = dict(steps=3, seed=7, temperature=4.0)
    reference = EBTInference(model).generate(prompt, 64, mode="recompute", **kwargs)
    _wrong_rope_offset(model)
    assert EBTInference(model).generate(prompt, 64, mode="kv", **kwargs) != reference


def test_generation_past_the_context_window_and_best_of_g():
    model = _model("time_embed", dtype=torch.float32, max_seq_len=16)
    engine = EBTInference(model)
    out = engine.generate([1, 2, 3], 30, steps=2, num_samples=3, seed=1)
    assert len(out) == 30 and all(0 <= t < 31 for t in out)


def test_early_stop_and_sampling_controls():
    model = _model("default", dtype=torch.float32)
    engine = EBTInference(model)
    cache = engine.prefill(torch.tensor([[1, 2, 3, 4]]))
    res = engine.next_token(cache, steps=8, early_stop_tol=1e9, generator=torch.Generator().manual_seed(0))
    assert res.steps_used.item() == 1 and res.energies.shape == (9, 1)
    lean = engine.next_token(cache, steps=8, score_final=False, generator=torch.Generator().manual_seed(0))
    assert lean.steps_used.item() == 8 and lean.energies.shape == (8, 1)
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0])
    g = torch.Generator().manual_seed(0)
    assert sample(logits, 0.0, 0, 1.0, g) == 1
    draws = {sample(logits, 1.0, 2, 1.0, g) for _ in range(50)}
    assert draws == {1, 2}
    assert {sample(logits, 1.0, 0, 0.3, g) for _ in range(20)} == {1}
    with pytest.raises(ValueError, match="top_p"):
        sample(logits, 1.0, 0, 0.0, g)


@pytest.mark.parametrize("mode", ("kv", "reference"))
def test_generation_noise_is_added_before_each_energy_evaluation(mode):
    """next_token with Langevin noise against the literal loop on the full model: noise moves the
    candidate first, then y <- p - alpha dE/dp (as in training); the old placement (noise after
    the step) is the negative control."""
    model = _model("time_embed")
    engine = EBTInference(model)
    ids = torch.randint(0, 31, (2, 7), generator=torch.Generator().manual_seed(3))
    got = engine.next_token(engine.prefill(ids), steps=3, noise_std=0.5, mode=mode,
                            generator=torch.Generator().manual_seed(9)).logits

    def literal(noise_first: bool) -> torch.Tensor:
        gen = torch.Generator().manual_seed(9)
        y = torch.randn(2, 1, 31, generator=gen, dtype=torch.float64)
        before = torch.full((2, 6, 31), 1 / 31, dtype=torch.float64)
        for k in range(3):
            if noise_first:
                y = y + torch.randn(y.shape, generator=gen, dtype=torch.float64) * 0.5
            p = torch.softmax(y, -1).requires_grad_(True)
            energy = model.energy_from_probs(model.prepare(ids, k), torch.cat([before, p], 1), k)[:, -1]
            (g,) = torch.autograd.grad(energy.sum(), p)
            y = (p - model.effective_step_size().detach() * g).detach()
            if not noise_first:
                y = y + torch.randn(y.shape, generator=gen, dtype=torch.float64) * 0.5
        return y[:, 0]

    want = literal(noise_first=True)
    assert (got - want).abs().max().item() < 1e-10 * max(1.0, want.abs().max().item())
    assert (got - literal(noise_first=False)).abs().max().item() > 1e-2
