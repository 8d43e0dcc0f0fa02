"""The compiled thinking step (pretrain/compiled.py) against the eager one in float64: losses and
parameter gradients (which carry the second-order term) of S1 and S2 unrolls to 1e-10, no
gradient None; a negative control (the leaves' gradients not carried on) that the same check
catches; and the `train.compile` switch.

Compiled with dynamo + AOTAutograd (`backend="aot_eager"`): the same graph capture, the traced
inner autograd.grad and the joint forward/backward graphs that inductor then turns into code,
in ~10 s a graph. Inductor's own code generation takes minutes a graph on this CPU (too slow
for the suite); its float64 exactness is measured by `benchmarks/compile_probe.py --dtype
float64` (docs/performance.md)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import pretrain.compiled as compiled_mod
from ebt_testlib import model_pair, param_grads
from pretrain.compiled import CompiledEnergyGrad, resolve
from pretrain.thinking import ThinkingConfig, unroll

S1 = ThinkingConfig(num_steps=2)
S2 = ThinkingConfig(num_steps=2, detach_between_steps=False, create_graph="last", loss_on="last",
                    step_size_jitter=2.0, langevin_std=3.0)


def _grads(model, ids, cfg, compiled=None):
    model.zero_grad(set_to_none=True)
    res = unroll(model, ids, cfg, generator=torch.Generator().manual_seed(5), compiled=compiled)
    return res.loss.item(), {n: None if g is None else g.clone() for n, g in param_grads(model).items()}


def _check(model, cfg, compiled):
    ids = torch.randint(0, 13, (3, 7), generator=torch.Generator().manual_seed(1))
    loss_eager, want = _grads(model, ids, cfg)
    loss, got = _grads(model, ids, cfg, compiled)
    return loss_eager, want, loss, got


@pytest.mark.parametrize("variant,recipe", [("default", "s1"), ("time_embed", "s2")])
def test_compiled_step_equals_the_eager_step(variant, recipe):
    cfg = S1 if recipe == "s1" else S2
    _, model = model_pair(seed=3, ebt_type=variant, learn_step_size=recipe == "s1", num_layers=1)
    compiled = CompiledEnergyGrad(model, backend="aot_eager")
    loss_eager, want, loss, got = _check(model, cfg, compiled)
    assert compiled.calls == (2 if recipe == "s1" else 1) and compiled.cold_seconds > 0
    assert abs(loss - loss_eager) < 1e-10
    assert all(g is not None for g in got.values())
    for name, w in want.items():
        assert (got[name] - w).abs().max().item() < 1e-10 * max(1.0, w.abs().max().item()), name


def test_negative_control_leaf_gradients_not_carried_are_caught(monkeypatch):
    """Without the carry, W_v2e (and, per step, the context stream) miss their gradients."""
    _, model = model_pair(seed=3, ebt_type="time_embed", learn_step_size=True, num_layers=1)
    monkeypatch.setattr(compiled_mod.LeafCarry, "wrap", lambda self, fn: fn)
    compiled = CompiledEnergyGrad(model, backend="aot_eager")
    _, want, _, got = _check(model, S1, compiled)
    assert compiled.calls == 2
    worst = max((got[n] - want[n]).abs().max().item() / want[n].abs().max().item()
                for n in want if got[n] is not None)
    assert got["cand_embed.weight"] is None or worst > 1e-3


def test_compile_switch():
    assert resolve("true", torch.device("cpu")) and not resolve("false", torch.device("cpu"))
    assert not resolve("auto", torch.device("cpu"))
    with pytest.raises(ValueError, match=r"train\.compile"):
        resolve("yes", torch.device("cpu"))
    _, model = model_pair(seed=3)
    with pytest.raises(ValueError, match="backward=True"):
        unroll(model, torch.zeros(1, 4, dtype=torch.long), dataclasses.replace(S1), backward=False,
               compiled=CompiledEnergyGrad(model, backend="aot_eager"))


def test_train_compile_true_trains_through_the_compiled_step_and_reports_its_compile(tmp_path, data_cache,
                                                                                   monkeypatch):
    """`train.compile=true` wires the compiled step into the trainer (aot_eager here: see the
    module docstring): the same losses as the eager run, and the cold compile in the progress
    line and the metrics."""
    import json

    from pretrain.config import load_config
    from pretrain.trainer import train

    real_init = CompiledEnergyGrad.__init__
    monkeypatch.setattr(CompiledEnergyGrad, "__init__", lambda self, model, backend="inductor":
                        real_init(self, model, backend="aot_eager"))
    losses, lines = {}, []
    for mode in ("false", "true"):
        cfg = load_config(["test_tiny"], [f"run_dir={tmp_path / mode}", f"data.cache_dir={data_cache}",
                                          "train.max_steps=2", "train.checkpoint_every=0", f"train.compile={mode}"])
        train(cfg, log=lines.append if mode == "true" else (lambda _: None))
        metrics = [json.loads(l) for l in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
        losses[mode] = [m["loss"] for m in metrics]
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-5, abs=0)
    assert metrics[0]["compile_seconds"] > 0
    assert any("cold compile" in l for l in lines if l.startswith("step 1/2"))
