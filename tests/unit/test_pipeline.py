"""parallel.pipeline in one process: the stage split and its errors, the schedule, and the
whole thinking-aware pipeline simulated with every stage in this process (LocalTransport)
against pretrain.thinking.unroll in float64 - losses, per-step energies, final candidates and
every parameter gradient within 1e-12 of each tensor's own scale, for pp = 1..4, S1 and S2
(random step counts, noise, jitter, learnable or fixed alpha, replay), every conditioning
variant and both gradient targets. The negative control (received dE/dh not recorded by
autograd) fails the same check. The distributed version: tests/distributed/test_pipeline_parity.py."""
from __future__ import annotations

import pytest
import torch

import parallel.pipeline as pipeline
from parallel.dims import LayoutError
from pretrain.pipeline_draws import draw_microbatch  # noqa: E402
from parallel.pipeline import (
    EBTPipeline, Task, _dependencies, gpipe_schedule, interleaved_schedule, parameter_stage,
    schedule_bubble, schedule_table, simulate_pipeline, split_stages, stage_layer_ranges, validate_pipeline,
)
from pretrain.model import build_model
from pretrain.thinking import ReplayBuffer, ThinkingConfig, unroll

TINY = dict(vocab_size=13, dim=16, num_heads=2, num_layers=4, max_seq_len=8, context_attention="math")


def _recipe(name: str, learn: bool = False, wrt: str = "probs", replay: bool = False):
    if name == "s1":
        return dict(step_size=500.0, learn_step_size=True), ThinkingConfig(num_steps=2, grad_wrt=wrt)
    return dict(step_size=5.0, learn_step_size=learn), ThinkingConfig(
        num_steps=2, num_steps_max=3, detach_between_steps=False, create_graph="last", loss_on="last",
        step_size_jitter=2.0, langevin_std=3.0, grad_wrt=wrt,
        replay_size=8 if replay else 0, replay_fraction=0.5 if replay else 0.0)


def _compare(ebt_type, name, pp, micro, seeds, learn=False, wrt="probs", replay=False, schedule="interleaved"):
    """Worst relative difference, pipeline simulation vs unroll (one per micro-batch)."""
    overrides, thinking = _recipe(name, learn, wrt, replay)
    cfg = dict(TINY, ebt_type=ebt_type, **overrides)
    torch.manual_seed(0)
    ref = build_model(cfg).double()
    stages = []
    for s in range(pp):
        torch.manual_seed(0)
        stages.append(build_model(cfg).double())
        split_stages(stages[-1], pp, s)
    ids = torch.randint(0, 13, (4, 9), generator=torch.Generator().manual_seed(1))
    buffers = (ReplayBuffer(8), ReplayBuffer(8)) if replay else (None, None)
    for buf in buffers:
        if buf is not None:
            buf.add(ids, torch.randn(4, 8, 13, generator=torch.Generator().manual_seed(5)).double())
    per = 4 // micro
    refs, mbs = [], []
    for m in range(micro):
        part = ids[m * per:(m + 1) * per]
        refs.append(unroll(ref, part, thinking, generator=torch.Generator().manual_seed(seeds[m]), loss_scale=1 / micro,
                           replay=buffers[0]))
        mbs.append(draw_microbatch(stages[0], part, thinking, torch.Generator().manual_seed(seeds[m]), replay=buffers[1]))
    got = simulate_pipeline(stages, thinking, mbs, schedule=schedule)
    worst = {}

    def rel(key, a, b):
        scale, diff = float(b.detach().abs().max()), float((a.detach() - b.detach()).abs().max())
        worst[key] = max(worst.get(key, 0.0), diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")))

    rel("loss", got.loss, torch.stack([r.loss for r in refs]).mean())
    for m, r in enumerate(refs):
        assert got.num_steps[m] == r.num_steps
        rel("final_logits", got.final_logits[m], r.final_logits)
        for k in range(r.num_steps):
            rel("step_energy", got.step_energies[m][k], r.step_energies[k])
            rel("step_loss", got.step_losses[m][k], r.step_losses[k])
    ref_params = dict(ref.named_parameters())
    seen = set()
    for stage in stages:
        for n, p in stage.named_parameters():
            seen.add(n)
            if p.requires_grad:
                assert p.grad is not None, n
                rel(f"grad/{n}", p.grad, ref_params[n].grad)
    assert seen == set(ref_params)  # every parameter on exactly one stage
    return worst, got.num_steps


CASES = [
    ("default", "s1", 2, 2, [10, 11], {}),
    ("time_embed", "s1", 4, 1, [10], {}),
    ("adaln", "s1", 3, 2, [10, 11], {"wrt": "logits"}),
    ("default", "s2", 2, 2, [5, 6], {}),  # 3 and 2 thinking steps
    ("time_embed", "s2", 3, 2, [5, 6], {"learn": True}),  # learnable alpha: the candidate chain is cut
    ("adaln", "s2", 4, 2, [10, 11], {"wrt": "logits"}),
    ("default", "s2", 2, 1, [3], {"replay": True}),
    ("adaln", "s1", 1, 2, [10, 11], {}),
    ("default", "s1", 3, 2, [10, 11], {"schedule": "gpipe"}),
    ("time_embed", "s2", 2, 2, [5, 6], {"schedule": "gpipe"}),
]


@pytest.mark.parametrize("ebt_type,name,pp,micro,seeds,kw", CASES)
def test_simulated_pipeline_equals_unroll(ebt_type, name, pp, micro, seeds, kw):
    worst, steps = _compare(ebt_type, name, pp, micro, seeds, **kw)
    bad = {k: v for k, v in worst.items() if v > 1e-12}
    assert not bad, bad
    if (ebt_type, name, seeds) == ("default", "s2", [5, 6]):
        assert steps == [3, 2]


def test_negative_control_received_gradient_not_recorded(monkeypatch):
    monkeypatch.setattr(pipeline.EBTStage, "_gradient_leaf", lambda self, received, make_graph: received)
    worst, _ = _compare("default", "s1", 2, 1, [10])
    assert worst["loss"] < 1e-12 and worst["final_logits"] < 1e-12  # first order unaffected
    assert max(v for k, v in worst.items() if k.startswith("grad/")) > 0.1


def test_pp1_pipeline_is_unroll():
    overrides, thinking = _recipe("s1")
    torch.manual_seed(0)
    ref = build_model(dict(TINY, **overrides)).double()
    torch.manual_seed(0)
    model = build_model(dict(TINY, **overrides)).double()
    ids = torch.randint(0, 13, (2, 9), generator=torch.Generator().manual_seed(1))
    want = unroll(ref, ids, thinking, generator=torch.Generator().manual_seed(3))
    got = EBTPipeline(model, None, thinking, 1).run([draw_microbatch(model, ids, thinking, torch.Generator().manual_seed(3))])
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-13, atol=0)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14, msg=n)


def test_stage_split_and_its_errors():
    assert [list(r) for r in stage_layer_ranges(5, 2)] == [[0, 1], [2, 3, 4]]
    assert [list(r) for r in stage_layer_ranges(4, 3, [1, 1, 2])] == [[0], [1], [2, 3]]
    with pytest.raises(LayoutError, match=r"parallel.pp=3 exceeds model.num_layers=2"):
        stage_layer_ranges(2, 3)
    with pytest.raises(LayoutError, match=r"parallel.pp_layers=\[3, 2\]"):
        stage_layer_ranges(4, 2, [3, 2])
    with pytest.raises(LayoutError, match=r"parallel.pp_microbatches=3 does not divide the per-rank batch of 4"):
        validate_pipeline(2, 4, 3, 4)
    with pytest.raises(LayoutError, match=r"parallel.activation_checkpointing='step' is not supported with parallel.pp=2"):
        validate_pipeline(2, 4, 2, 4, options={"parallel.activation_checkpointing": "step"})
    with pytest.raises(LayoutError, match=r"model.attention='reference'"):
        validate_pipeline(2, 4, 2, 4, options={"model.attention": "reference"})
    validate_pipeline(1, 4, 1, 4, options={"model.attention": "reference"})  # pp=1 allows everything
    model = build_model(dict(TINY, ebt_type="adaln"))
    names = [n for n, _ in model.named_parameters()]
    stages = {n: parameter_stage(n, 4, 2) for n in names}
    assert stages["tok_embeddings.weight"] == stages["cand_embed.weight"] == stages["step_size"] == 0
    assert stages["energy_head.weight"] == stages["norm.weight"] == 1 and stages["layers.1.ffn.w_up.weight"] == 0
    info = split_stages(model, 2, 1)
    assert info.is_last and {n for n, _ in model.named_parameters()} == {n for n, s in stages.items() if s == 1}


@pytest.mark.parametrize("schedule", [gpipe_schedule, interleaved_schedule])
def test_schedule_is_a_valid_order_and_fills_the_pipeline(schedule):
    for p, m, steps, graph, shared in ((2, 1, [2], [[True, True]], True), (2, 4, [2, 3, 2, 3], None, False),
                                       (4, 8, [2] * 8, None, True)):
        graph = graph or [[k == n - 1 for k in range(n)] for n in steps]
        tasks = schedule(p, steps, graph, shared)
        assert sorted(tasks, key=str) == sorted(gpipe_schedule(p, steps, graph, shared), key=str)
        position = {t: i for i, t in enumerate(tasks)}
        for t in tasks:  # everything a task needs comes earlier in the order: no deadlock
            for dep in _dependencies(t, p, steps, graph, shared):
                assert position[dep] < position[t], (t, dep)
        # More micro-batches, smaller bubble, as GPipe's (p-1)/(m+p-1) predicts.
        assert schedule_bubble(tasks, p) <= schedule_bubble(schedule(p, steps[:1], graph[:1], shared), p) + 1e-9
    p, m = 4, 4
    plain = gpipe_schedule(p, [2] * m, [[True, True]] * m, True)
    assert schedule_bubble(interleaved_schedule(p, [2] * m, [[True, True]] * m, True), p) < 0.5 * schedule_bubble(plain, p)
    table = schedule_table(gpipe_schedule(2, [1, 1], [[True], [True]], True), 2)
    assert table.splitlines()[2].startswith("| 0 | F0.0 | F1.0 | . |") and "OD0.0" in table
    assert Task("F", 1, 0, 0).label() == "F0.0"
