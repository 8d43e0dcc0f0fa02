"""The fused, chunked vocabulary ops (pretrain/model/vocab.py) against the plain ops in float64:
the op alone (loss, y', every input gradient, several chunks, padding), the thinking step
that uses it (losses and first- and second-order parameter gradients of S1 and S2 unrolls),
the Transformer++'s fused LM head, and a negative control the same checks catch."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import pretrain.model.vocab as vocab
from ebt_testlib import VARIANTS, model_pair, param_grads
from pretrain.model import build_model
from pretrain.model.vocab import LOCAL_VOCAB, fused_linear_cross_entropy, fused_update_cross_entropy
from pretrain.thinking import ThinkingConfig, unroll

S1 = ThinkingConfig(num_steps=2)
S2 = ThinkingConfig(num_steps=2, num_steps_max=3, detach_between_steps=False, create_graph="last", loss_on="last",
                    step_size_jitter=2.0, langevin_std=3.0)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-300)).item()


def _inputs(per_row_alpha: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, s, v, d = 3, 5, 37, 4
    p = torch.softmax(torch.randn(b, s, v, generator=g, dtype=torch.float64), -1).requires_grad_(True)
    u = torch.randn(b, s, d, generator=g, dtype=torch.float64).requires_grad_(True)
    w = torch.randn(d, v, generator=g, dtype=torch.float64).requires_grad_(True)
    shape = (b, s, 1) if per_row_alpha else ()
    alpha = (torch.rand(shape, generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
    targets = torch.randint(0, v, (b, s), generator=g)
    targets[0, :2] = -100  # padding is ignored
    return p, u, w, alpha, targets


@pytest.mark.parametrize("per_row_alpha", (False, True))
def test_update_cross_entropy_equals_plain_ops(per_row_alpha, monkeypatch):
    monkeypatch.setattr(vocab, "CHUNK_ELEMENTS", 37 * 4)  # 4 rows a chunk: 15 rows -> 4 chunks
    p, u, w, alpha, targets = _inputs(per_row_alpha)
    y_ref = p - alpha * (u @ w)
    loss_ref = F.cross_entropy(y_ref.flatten(0, 1), targets.flatten(), ignore_index=-100)
    grads_ref = torch.autograd.grad(loss_ref, (p, u, w, alpha))
    loss, y, finite = fused_update_cross_entropy(p, u, w, alpha, targets)
    assert finite.item()
    grads = torch.autograd.grad(loss * 1.0, (p, u, w, alpha))
    assert abs(loss.item() - loss_ref.item()) < 1e-12
    assert not y.requires_grad and _rel(y, y_ref.detach()) < 1e-14
    for name, got, want in zip("p u w alpha".split(), grads, grads_ref):
        assert got.shape == want.shape and _rel(got, want) < 1e-12, name


def test_update_cross_entropy_passes_gradcheck_and_refuses_double_backward():
    p, u, w, alpha, targets = _inputs(True, seed=1)
    assert torch.autograd.gradcheck(lambda *x: fused_update_cross_entropy(*x, targets)[0], (p, u, w, alpha))
    loss, _, _ = fused_update_cross_entropy(p, u, w, alpha, targets)
    scale = torch.ones((), dtype=torch.float64, requires_grad=True)
    (gu,) = torch.autograd.grad(loss, u, grad_outputs=scale, create_graph=True)
    # Its backward is once-differentiable: a second derivative through it must fail loudly.
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        gu.sum().backward()


def test_linear_cross_entropy_equals_lm_head_then_cross_entropy(monkeypatch):
    monkeypatch.setattr(vocab, "CHUNK_ELEMENTS", 37 * 3)
    torch.manual_seed(0)
    model = build_model(dict(arch="transformer++", vocab_size=37, dim=16, num_heads=2, num_layers=2,
                             max_seq_len=8)).double()
    ids = torch.randint(0, 37, (3, 9))
    targets = ids[:, 1:].clone()
    targets[1, 3] = -100
    ref = LOCAL_VOCAB.cross_entropy(model(ids[:, :-1]), targets)
    ref.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    got = model.loss(ids[:, :-1], targets)
    got.backward()
    assert abs(got.item() - ref.item()) < 1e-12
    for n, p in model.named_parameters():
        assert _rel(p.grad, want[n]) < 1e-12, n
    h = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 5, (2, 3))
    assert torch.autograd.gradcheck(lambda a, b: fused_linear_cross_entropy(a, b, t), (h, w))


def _unroll_grads(model, ids, cfg, seed=5):
    model.zero_grad(set_to_none=True)
    res = unroll(model, ids, cfg, generator=torch.Generator().manual_seed(seed))
    return res.loss.item(), param_grads(model)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("recipe", ("s1", "s2"))
def test_fused_step_equals_plain_step_and_is_taken(variant, recipe, monkeypatch):
    """Losses and parameter gradients (which carry the second-order term) of the unroll with
    the fused step equal the plain step's to 1e-10; and the fused op really ran."""
    cfg = S1 if recipe == "s1" else S2
    _, model = model_pair(seed=3, ebt_type=variant, learn_step_size=recipe == "s1")
    ids = torch.randint(0, 13, (3, 7), generator=torch.Generator().manual_seed(1))
    loss_plain, g_plain = _unroll_grads(model, ids, dataclasses.replace(cfg, fused_vocab=False))
    calls = []
    real = vocab.LocalVocab.update_cross_entropy
    monkeypatch.setattr(vocab.LocalVocab, "update_cross_entropy", lambda *a: calls.append(1) or real(*a))
    loss_fused, g_fused = _unroll_grads(model, ids, cfg)
    assert calls, "the fused step did not run"
    assert abs(loss_plain - loss_fused) < 1e-10
    assert all(v is not None for v in g_fused.values())
    for name, want in g_plain.items():
        assert (g_fused[name] - want).abs().max().item() < 1e-10 * max(1.0, want.abs().max().item()), name


def test_negative_control_dropping_the_second_order_term_is_caught(monkeypatch):
    """A fused step that forgets u's graph (no gradient into dE/dh: the Hessian term) keeps the
    loss but changes the parameter gradients far beyond the tolerance the tests above use."""
    _, model = model_pair(seed=3, learn_step_size=True)
    ids = torch.randint(0, 13, (3, 7), generator=torch.Generator().manual_seed(1))
    loss_plain, g_plain = _unroll_grads(model, ids, dataclasses.replace(S1, fused_vocab=False))
    real = vocab.LocalVocab.update_cross_entropy
    monkeypatch.setattr(vocab.LocalVocab, "update_cross_entropy",
                        lambda self, p, u, w, a, t: real(self, p, u.detach(), w, a, t))
    loss_bad, g_bad = _unroll_grads(model, ids, S1)
    assert abs(loss_plain - loss_bad) < 1e-10
    worst = max((g_bad[n] - g_plain[n]).abs().max().item() for n in g_plain if g_bad[n] is not None)
    assert worst > 1e-6


def test_nonfinite_candidates_are_flagged():
    p, u, w, alpha, targets = _inputs(False, seed=2)
    with torch.no_grad():
        u[1, 2, 0] = float("inf")
    assert not fused_update_cross_entropy(p.detach(), u.detach(), w.detach(), alpha.detach(), targets)[2].item()
