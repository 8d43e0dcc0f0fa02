"""The EBT energy is the published function: no leaks, the two-stream attention equals the
naive per-position view, gradients match finite differences, and double backward is exact."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from ebt_testlib import VARIANTS, model_pair, tiny_model_cfg
from pretrain.model import build_model, candidate_probs
from pretrain.model.layers import apply_rope

ATTENTIONS = ("reference", "two_stream")


def _setup(variant, attention, seed=0, batch=2, seq=6):
    ref, fast = model_pair(seed, ebt_type=variant)
    model = ref if attention == "reference" else fast
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, 13, (batch, seq), generator=g)
    y = torch.randn(batch, seq, 13, generator=g, dtype=torch.float64)
    return model, ids, y


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_no_leak_from_future_context_or_other_candidates(variant, attention):
    model, ids, y = _setup(variant, attention)
    seq = ids.shape[1]
    with torch.no_grad():
        base = model.energy(ids, y, step=1)
        for i in range(seq):
            later = ids.clone()
            later[:, i + 1 :] = (later[:, i + 1 :] + 5) % 13  # x_{i+2}.. in 1-based numbering
            assert torch.equal(model.energy(later, y, step=1)[:, i], base[:, i])
            for j in range(seq):
                if j == i:
                    continue
                other = y.clone()
                other[:, j] = torch.randn_like(other[:, j]) * 3
                assert torch.equal(model.energy(ids, other, step=1)[:, i], base[:, i])
        # and the candidate at i does move the energy at i (the test is not vacuous)
        moved = y.clone()
        moved[:, 0] = moved[:, 0] * -4
        assert not torch.equal(model.energy(ids, moved, step=1)[:, 0], base[:, 0])


def _naive_energy(model, ids, y, step):
    """For every i, plain causal attention over [step?, x_1..x_i, p_i] at natural positions."""
    cfg = model.cfg
    idx = model.step_index(step)
    probs = candidate_probs(y)
    out = torch.empty(ids.shape, dtype=y.dtype)
    for b in range(ids.shape[0]):
        for i in range(ids.shape[1]):
            toks = [model.tok_embeddings.weight[ids[b, j]] for j in range(i + 1)]
            if cfg.ebt_type == "time_embed":
                toks = [model.step_embeddings.weight[idx]] + toks
            toks.append(model.cand_embed.weight @ probs[b, i])
            h = torch.stack(toks).unsqueeze(0)  # (1, T, D)
            t = h.shape[1]
            cos, sin = model.rope_cos[:t], model.rope_sin[:t]
            for layer in model.layers:
                mods = [None] * 6
                if cfg.ebt_type == "adaln":
                    c = model.step_embeddings.weight[idx]
                    mods = list(layer.modulation(F.silu(c)).chunk(6))
                x = layer.attn_norm(h)
                if mods[0] is not None:
                    x = x * (1 + mods[1]) + mods[0]
                heads = lambda z: z.view(1, t, cfg.num_heads, -1).transpose(1, 2)
                q = apply_rope(heads(layer.attn.wq(x)), cos, sin)
                k = apply_rope(heads(layer.attn.wk(x)), cos, sin)
                v = heads(layer.attn.wv(x))
                scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
                scores = scores + torch.full((t, t), float("-inf"), dtype=scores.dtype).triu(1)
                o = (scores.softmax(-1) @ v).transpose(1, 2).reshape(1, t, -1)
                a = layer.attn.wo(o)
                h = h + (a if mods[2] is None else a * (1 + mods[2]))
                x = layer.ffn_norm(h)
                if mods[3] is not None:
                    x = x * (1 + mods[4]) + mods[3]
                f = layer.ffn(x)
                h = h + (f if mods[5] is None else f * (1 + mods[5]))
            out[b, i] = model.energy_head(model.norm(h[0, -1])).squeeze()
    return out


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_two_stream_attention_equals_naive_per_position(variant, attention):
    model, ids, y = _setup(variant, attention, seed=3)
    # perturb the adaLN modulation away from its zero init so it is exercised
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        fast = model.energy(ids, y, step=2)
        naive = _naive_energy(model, ids, y, step=2)
    assert (fast - naive).abs().max().item() < 1e-6


@pytest.mark.parametrize("variant", VARIANTS)
def test_dE_dy_matches_central_finite_differences(variant):
    model, ids, y = _setup(variant, "two_stream", seed=5, batch=1, seq=4)
    y = y.requires_grad_(True)
    (grad,) = torch.autograd.grad(model.energy(ids, y, step=0).sum(), y)
    g = torch.Generator().manual_seed(0)
    eps = 1e-6
    for _ in range(12):
        coord = tuple(int(torch.randint(0, n, (1,), generator=g)) for n in y.shape)
        with torch.no_grad():
            up, down = y.clone(), y.clone()
            up[coord] += eps
            down[coord] -= eps
            fd = (model.energy(ids, up).sum() - model.energy(ids, down).sum()) / (2 * eps)
        assert abs(fd.item() - grad[coord].item()) < 1e-8 * max(1.0, abs(fd.item()))


@pytest.mark.parametrize(
    "variant,grad_wrt", [(v, "probs") for v in VARIANTS] + [("default", "logits")]
)
def test_gradgradcheck_one_full_thinking_step(variant, grad_wrt):
    """y_1 = p_0 - alpha dE/dp_0 as a function of (y_0, attention and head weights): its
    gradient (the training backward) and its gradient's gradient are exact."""
    torch.manual_seed(7)
    cfg = tiny_model_cfg(vocab_size=5, dim=4, num_layers=1, ebt_type=variant, context_attention="math")
    model = build_model(cfg).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ids = torch.randint(0, 5, (1, 3))
    names = ["layers.0.attn.wk.weight", "cand_embed.weight", "energy_head.weight"]
    if variant != "default":
        names.append("step_embeddings.weight")

    wrapper = _ProbEnergy(model)

    def one_step(y0, *weights):
        params = {f"model.{n}": w for n, w in zip(names, weights)}
        p = candidate_probs(y0)
        wrt = p if grad_wrt == "probs" else y0
        energy = functional_call(wrapper, params, (ids, p), {"step": 1})
        (g,) = torch.autograd.grad(energy.sum(), wrt, create_graph=True)
        return wrt - 5.0 * g

    y0 = torch.randn(1, 3, 5, dtype=torch.float64, requires_grad=True)
    weights = [dict(model.named_parameters())[n].detach().clone().requires_grad_(True) for n in names]
    inputs = (y0, *weights)
    assert torch.autograd.gradcheck(one_step, inputs, eps=1e-6, atol=1e-6)
    assert torch.autograd.gradgradcheck(one_step, inputs, eps=1e-6, atol=1e-5)


class _ProbEnergy(torch.nn.Module):
    """Wraps an EBT so functional_call can evaluate E(x, p) on probabilities."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, probs, step=0):
        return self.model.energy_from_probs(self.model.prepare(ids, step), probs, step)


def test_transformer_pp_is_causal_and_shares_the_blocks():
    torch.manual_seed(0)
    base = tiny_model_cfg(arch="transformer++")
    model = build_model(base).double()
    ebt = build_model(tiny_model_cfg())
    assert type(model.layers[0]) is type(ebt.layers[0])
    assert model.lm_head.weight.data_ptr() != model.tok_embeddings.weight.data_ptr()  # untied
    ids = torch.randint(0, 13, (2, 8))
    with torch.no_grad():
        logits = model(ids)
        later = ids.clone()
        later[:, 5:] = (later[:, 5:] + 1) % 13
        assert torch.equal(model(later)[:, :5], logits[:, :5])


def test_build_model_rejects_bad_config_with_the_key():
    with pytest.raises(ValueError, match=r"model\.num_heads"):
        build_model(tiny_model_cfg(num_heads=3))
    with pytest.raises(ValueError, match=r"model\.dimm: unknown key \(did you mean 'dim'\?\)"):
        build_model(dict(tiny_model_cfg(), dimm=4))
    with pytest.raises(ValueError, match=r"model\.ebt_type"):
        build_model(tiny_model_cfg(ebt_type="film"))


def test_energy_rejects_wrong_shapes():
    model = build_model(tiny_model_cfg())
    with pytest.raises(ValueError, match="candidate_logits must be"):
        model.energy(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, 12))
    with pytest.raises(ValueError, match="max_seq_len"):
        model.energy(torch.zeros(1, 9, dtype=torch.long), torch.zeros(1, 9, 13))


def test_adaln_step_embeddings_get_exactly_zero_gradient_at_init_and_learn_after_one_step():
    """The adaLN modulation starts at zero, so at initialisation the step embeddings' gradient is
    exactly 0 (a step-0 comparison of it would be 0 vs 0) while the modulation's is not; one
    optimizer step moves the modulation and from then on the embeddings learn (the same check
    then sees a non-zero gradient: it is not blind)."""
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg(ebt_type="adaln", num_step_embeddings=2)).double()
    ids = torch.randint(0, 13, (2, 6))
    y = torch.randn(2, 6, 13, dtype=torch.float64)

    def grads():
        model.zero_grad(set_to_none=True)
        yl = y.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(model.energy(ids, yl, step=1).sum(), yl, create_graph=True)
        (yl - 5.0 * g).square().sum().backward()  # a second-order training-style loss
        return model.step_embeddings.weight.grad, model.layers[0].modulation.weight.grad

    emb, mod = grads()
    assert torch.count_nonzero(emb) == 0 and mod.abs().max() > 0
    torch.optim.SGD(model.parameters(), lr=1e-2).step()
    emb, _ = grads()
    assert emb[1].abs().max() > 0  # the embedding of the step used is learning now
