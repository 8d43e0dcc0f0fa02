"""The thinking loop: the lean execution paths equal the literal one, the recipes train on
real text, and inference thinking (more steps, best-of-G, early stop) does what it says."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from ebt_testlib import VARIANTS, model_pair, param_grads, pydoc_bytes, text_batches
from pretrain.model import build_model
from pretrain.thinking import ReplayBuffer, ThinkingConfig, cross_entropy, think, unroll

S1 = ThinkingConfig(num_steps=3)
S2 = ThinkingConfig(
    num_steps=2,
    num_steps_max=3,
    detach_between_steps=False,
    create_graph="last",
    loss_on="last",
    step_size_jitter=2.0,
    langevin_std=3.0,
    replay_size=8,
    replay_fraction=0.5,
)
RECIPES = {"s1": S1, "s2": S2}


def _plain(cfg: ThinkingConfig) -> ThinkingConfig:
    return dataclasses.replace(cfg, per_step_backward=False, reuse_context=False, fused_vocab=False)


def _run(model, ids, cfg, seed, replay_rows=None):
    replay = None
    if cfg.replay_size:
        replay = ReplayBuffer(cfg.replay_size)
        if replay_rows is not None:
            replay.add(*replay_rows)
    return unroll(model, ids, cfg, generator=torch.Generator().manual_seed(seed), replay=replay)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("learn_alpha", (True, False))
def test_lean_paths_equal_plain_path(variant, recipe, learn_alpha):
    """5(a) per-step backward and 5(b) context reuse + two-stream attention give the loss and
    parameter gradients of the literal path (reference attention, one backward) to 1e-10."""
    cfg = RECIPES[recipe]
    ref, fast = model_pair(seed=11, ebt_type=variant, learn_step_size=learn_alpha)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 13, (4, 7), generator=g)
    rows = (torch.randint(0, 13, (3, 7), generator=g), torch.randn(3, 6, 13, generator=g, dtype=torch.float64))
    plain = _run(ref, ids, _plain(cfg), seed=5, replay_rows=rows)
    lean = _run(fast, ids, cfg, seed=5, replay_rows=rows)
    assert plain.num_steps == lean.num_steps
    assert plain.num_rows == lean.num_rows == (6 if cfg.replay_size else 4)
    assert abs(plain.loss.item() - lean.loss.item()) < 1e-10
    g_plain, g_lean = param_grads(ref), param_grads(fast)
    assert all(v is not None for v in g_lean.values()), [n for n, v in g_lean.items() if v is None]
    assert all(v is not None for v in g_plain.values())
    for name in g_plain:
        assert (g_plain[name] - g_lean[name]).abs().max().item() < 1e-10, name
    if learn_alpha:
        assert "step_size" in g_lean and g_lean["step_size"].abs().item() > 0


def test_each_lean_path_alone_is_exact():
    ref, fast = model_pair(seed=4)
    ids = torch.randint(0, 13, (2, 7), generator=torch.Generator().manual_seed(0))
    _run(ref, ids, _plain(S1), seed=1)
    expected = param_grads(ref)
    for per_step, reuse in ((True, False), (False, True)):
        fast.zero_grad(set_to_none=True)
        _run(fast, ids, dataclasses.replace(S1, per_step_backward=per_step, reuse_context=reuse), seed=1)
        for name, grad in param_grads(fast).items():
            assert (grad - expected[name]).abs().max().item() < 1e-10, (per_step, reuse, name)


def test_fused_context_attention_is_exact_for_training():
    """The context stream needs only first-order gradients, so SDPA's fused kernels there give
    the same first- and second-order training gradients as explicit math attention."""
    _, math_model = model_pair(seed=8, context_attention="math")
    _, sdpa_model = model_pair(seed=8, context_attention="sdpa")
    ids = torch.randint(0, 13, (3, 7), generator=torch.Generator().manual_seed(3))
    a = _run(math_model, ids, S1, seed=2)
    b = _run(sdpa_model, ids, S1, seed=2)
    assert abs(a.loss.item() - b.loss.item()) < 1e-12
    ga, gb = param_grads(math_model), param_grads(sdpa_model)
    for name in ga:
        assert (ga[name] - gb[name]).abs().max().item() < 1e-10, name


def _optimizer(model, lr, alpha_mult):
    alpha = [p for n, p in model.named_parameters() if n == "step_size" and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if n != "step_size" and p.requires_grad]
    groups = [{"params": rest, "lr": lr, "weight_decay": 0.01}]
    if alpha:
        groups.append({"params": alpha, "lr": lr * alpha_mult, "weight_decay": 0.0})
    return torch.optim.AdamW(groups)


def _train(model, cfg, data, steps, lr=3e-3, alpha_mult=1500.0, batch=16, seq=32, seed=0):
    opt = _optimizer(model, lr, alpha_mult)
    gen = torch.Generator().manual_seed(seed)
    replay = ReplayBuffer(cfg.replay_size) if cfg.replay_size else None
    losses = []
    for _ in range(steps):
        ids = text_batches(data, batch, seq, gen)
        res = unroll(model, ids, cfg, generator=gen, replay=replay)
        assert not res.nonfinite.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(res.loss.item())
    return losses


def _byte_model(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=256, dim=64, num_heads=2, num_layers=2, max_seq_len=64)
    cfg.update(overrides)
    return build_model(cfg)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_train_on_real_text_and_alpha_follows_its_multiplier(recipe):
    data = pydoc_bytes()
    learn = recipe == "s1"
    model = _byte_model(step_size=500.0 if learn else 5.0, learn_step_size=learn)
    cfg = dataclasses.replace(RECIPES[recipe], replay_size=64) if recipe == "s2" else RECIPES[recipe]
    alpha0 = model.step_size.item()
    losses = _train(model, cfg, data, steps=12, lr=1e-3)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    moved = abs(model.step_size.item() - alpha0)
    if learn:
        # Adam moves a parameter by ~lr per step: alpha's group has lr * 1500 = 1.5
        assert 1.5 <= moved <= 1.5 * 12 * 1.05
    else:
        assert moved == 0.0


def test_best_of_g_keeps_lowest_energy_candidate_per_position():
    _, model = model_pair(seed=9)
    ids = torch.randint(0, 13, (2, 6), generator=torch.Generator().manual_seed(1))
    num_samples = 4
    best = think(model, ids, steps=2, num_samples=num_samples, generator=torch.Generator().manual_seed(3))
    # The same noise, all samples kept: rows are sample-major copies of the batch.
    every = think(model, ids.repeat(num_samples, 1), steps=2, generator=torch.Generator().manual_seed(3))
    final = every.energies[-1].view(num_samples, 2, 6)
    logits = every.logits.view(num_samples, 2, 6, -1)
    winner = final.argmin(0)
    for b in range(2):
        for s in range(6):
            assert torch.equal(best.logits[b, s], logits[winner[b, s], b, s])
            assert best.energies[-1, b, s] == final.min(0).values[b, s]
    assert (best.energies[-1] <= final[0]).all()
    # and the chosen candidates' energies are what the model says they are
    with torch.no_grad():
        check = model.energy(ids, best.logits, step=1)
    assert torch.allclose(check, best.energies[-1], atol=1e-12)


def test_early_stop_per_position_reports_steps_used():
    _, model = model_pair(seed=2)
    ids = torch.randint(0, 13, (2, 6), generator=torch.Generator().manual_seed(1))
    full = think(model, ids, steps=6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(full.steps_used, torch.full_like(full.steps_used, 6))
    gaps = (full.energies[:-1] - full.energies[1:]).abs()
    tol = gaps.median().item()
    early = think(model, ids, steps=6, early_stop_tol=tol, generator=torch.Generator().manual_seed(0))
    assert early.steps_used.min() < 6 and early.steps_used.max() <= 6
    frozen = early.steps_used < 6
    # a frozen position keeps its energy from the step it stopped on
    assert torch.equal(early.energies[-1][frozen], early.energies[-2][frozen])


def test_more_inference_steps_than_trained_reuse_last_step_embedding():
    _, model = model_pair(seed=1, ebt_type="time_embed", num_step_embeddings=2)
    ids = torch.randint(0, 13, (1, 5), generator=torch.Generator().manual_seed(1))
    res = think(model, ids, steps=5, generator=torch.Generator().manual_seed(0))
    assert res.energies.shape == (6, 1, 5)
    with torch.no_grad():
        assert torch.equal(model.energy(ids, res.logits, step=7), model.energy(ids, res.logits, step=1))


def test_replay_buffer_rows_start_from_stored_logits_and_roundtrip():
    buf = ReplayBuffer(3)
    ids = torch.arange(4 * 5).view(4, 5)
    logits = torch.randn(4, 4, 7)
    buf.add(ids, logits)
    assert len(buf) == 3 and torch.equal(buf.state_dict()["ids"][0], ids[3])  # ring buffer overwrote the oldest
    again = ReplayBuffer(1)
    again.load_state_dict(buf.state_dict())
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a, b = buf.sample(5, g1), again.sample(5, g2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_thinking_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"thinking\.create_graph"):
        ThinkingConfig(create_graph="sometimes")
    with pytest.raises(ValueError, match=r"thinking\.num_steps_max"):
        ThinkingConfig(num_steps=3, num_steps_max=2)
    with pytest.raises(ValueError, match=r"thinking\.replay_size"):
        ThinkingConfig(replay_fraction=0.5)


def test_thinking_helps_after_a_short_real_training_run():
    """S1 (with `time_embed`, as the reference scripts) on Python's documentation (bytes); on
    held-out text the cross-entropy after the last thinking step is below the one after the first."""
    data = pydoc_bytes()
    split = int(data.numel() * 0.9)
    train, held_out = data[:split], data[split:]
    model = _byte_model(seed=0, ebt_type="time_embed")
    _train(model, ThinkingConfig(num_steps=2), train, steps=150, lr=3e-3, batch=16, seq=32)
    ids = text_batches(held_out, 128, 32, torch.Generator().manual_seed(123))
    res = think(model, ids[:, :-1], steps=2, targets=ids[:, 1:], generator=torch.Generator().manual_seed(0))
    ce = res.ce_per_step
    assert ce[2] < ce[1] < ce[0], ce


def test_keyed_draws_are_per_sample_and_layout_invariant():
    from pretrain.thinking import KeyedDraws, StepKey

    cfg = ThinkingConfig()
    key = StepKey(seed=3, step=7)
    whole = KeyedDraws(key, [0, 1, 2, 3])
    init = whole.initial((4, 5, 11), cfg, "cpu", torch.float64)
    # two samples of one batch get different noise
    assert not torch.equal(init[0], init[1])
    # a rank holding rows 2..3 draws exactly what one process draws for them
    part = KeyedDraws(key, [2, 3])
    assert torch.equal(part.initial((2, 5, 11), cfg, "cpu", torch.float64), init[2:])
    assert torch.equal(part.langevin(1, (2, 5, 11), "cpu", torch.float64),
                       whole.langevin(1, (4, 5, 11), "cpu", torch.float64)[2:])
    assert torch.equal(part.jitter((2, 5, 1), "cpu", torch.float64), whole.jitter((4, 5, 1), "cpu", torch.float64)[2:])
    # other steps, other thinking steps, other seeds: other numbers
    assert not torch.equal(KeyedDraws(StepKey(3, 8), [0]).initial((1, 5, 11), cfg, "cpu", torch.float64), init[:1])
    assert not torch.equal(whole.langevin(0, (4, 5, 11), "cpu", torch.float64),
                           whole.langevin(1, (4, 5, 11), "cpu", torch.float64))
    assert not torch.equal(KeyedDraws(StepKey(4, 7), [0]).initial((1, 5, 11), cfg, "cpu", torch.float64), init[:1])
    # the number of thinking steps is one draw per optimizer step, covering its range
    s2 = ThinkingConfig(num_steps=2, num_steps_max=3, detach_between_steps=False, create_graph="last", loss_on="last")
    counts = {StepKey(0, t).num_steps(s2) for t in range(40)}
    assert counts == {2, 3} and StepKey(0, 5).num_steps(s2) == StepKey(0, 5).num_steps(s2)


def _reference_think(model, ids, steps, alpha, noise_std, seed, noise_first=True):
    """The literal inference loop, written out: per step, the candidate gets its Langevin noise
    BEFORE the energy evaluation (as in training), then y <- p - alpha dE/dp. `noise_first=False`
    is the old, wrong placement (noise added to the result of the step): the negative control."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(*ids.shape, model.vocab_size, generator=gen, dtype=torch.float64)
    for k in range(steps):
        if noise_first:
            y = y + torch.randn(y.shape, generator=gen, dtype=torch.float64) * noise_std
        p = torch.softmax(y, -1).requires_grad_(True)
        energy = model.energy_from_probs(model.prepare(ids, k), p, k)
        (g,) = torch.autograd.grad(energy.sum(), p)
        y = (p - alpha * g).detach()
        if not noise_first:
            y = y + torch.randn(y.shape, generator=gen, dtype=torch.float64) * noise_std
    return y


@pytest.mark.parametrize("variant", VARIANTS)
def test_inference_noise_is_added_before_each_energy_evaluation(variant):
    _, model = model_pair(seed=4, ebt_type=variant)
    ids = torch.randint(0, 13, (2, 6), generator=torch.Generator().manual_seed(1))
    got = think(model, ids, steps=3, noise_std=0.7, generator=torch.Generator().manual_seed(5)).logits
    want = _reference_think(model, ids, 3, 5.0, 0.7, seed=5)
    assert (got - want).abs().max().item() < 1e-12 * max(1.0, want.abs().max().item())
    wrong = _reference_think(model, ids, 3, 5.0, 0.7, seed=5, noise_first=False)
    assert (got - wrong).abs().max().item() > 1e-2  # the check tells the two placements apart
