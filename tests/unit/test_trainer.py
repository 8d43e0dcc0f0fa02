"""The trainer: optimizer groups, schedule, accumulation, the non-finite guard, evaluation,
run-folder outputs, the FLOP count and plots. Tiny models on Python's own pydoc text."""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import pretrain.train_module as train_module_mod
from pretrain.checkpoint import latest_checkpoint, list_checkpoints
from pretrain.config import load_config
from pretrain.plot import plot_run
from pretrain.trainer import NonFiniteError, Trainer, build_optimizer, lr_at, train


@pytest.fixture(scope="module")
def cache_dir(data_cache) -> str:
    return str(data_cache)


def tiny(tmp_path: Path, cache_dir: str, *overrides: str):
    return load_config(["test_tiny"], [f"run_dir={tmp_path / 'run'}", f"data.cache_dir={cache_dir}", *overrides])


def records(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_optimizer_groups(tmp_path, cache_dir):
    cfg = tiny(tmp_path, cache_dir)
    trainer = Trainer(cfg, log=lambda _: None)
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert set(groups) == {"decay", "no_decay", "alpha"}
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    assert [names[id(p)] for p in groups["alpha"]["params"]] == ["step_size"]
    assert groups["alpha"]["weight_decay"] == 0.0 and groups["alpha"]["lr_scale"] == cfg.optim.alpha_lr_multiplier
    assert all("norm" in names[id(p)] for p in groups["no_decay"]["params"])
    assert groups["no_decay"]["weight_decay"] == 0.0
    assert not any("norm" in names[id(p)] for p in groups["decay"]["params"])
    assert groups["decay"]["weight_decay"] == cfg.optim.weight_decay
    # a fixed alpha (S2) is not trained at all
    fixed = replace(cfg, model=replace(trainer.cfg.model, learn_step_size=False))
    from pretrain.model import build_model

    opt = build_optimizer(build_model(fixed.model), fixed)
    assert {g["name"] for g in opt.param_groups} == {"decay", "no_decay"}


def test_schedule_warmup_then_cosine_to_a_tenth(tmp_path, cache_dir):
    cfg = tiny(tmp_path, cache_dir, "train.max_steps=110", "optim.warmup_steps=10", "optim.lr=1.0")
    lrs = [lr_at(s, cfg) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, cfg) == pytest.approx(0.1)


def test_run_folder_outputs_and_eval_report(tmp_path, cache_dir):
    cfg = tiny(tmp_path, cache_dir, "train.eval_every=3")
    lines = []
    summary = train(cfg, log=lines.append)
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file() and "vocab_size: 512" in (run / "config.yaml").read_text()
    env = json.loads((run / "env.json").read_text())
    assert env["packages"]["torch"] and env["hosts"]
    metrics = records(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 7))
    assert all(math.isfinite(m["loss"]) for m in metrics)
    for key in ("loss_first", "loss_last", "energy_gap", "tokens_per_s", "mfu", "memory_gb", "lr", "alpha"):
        assert key in metrics[-1]
    evals = records(run / "eval.jsonl")
    assert [e["step"] for e in evals] == [3, 6]
    last = evals[-1]
    assert len(last["val_ce_per_step"]) == cfg.thinking.eval_steps + 1
    assert len(last["val_energy_per_step"]) == cfg.thinking.eval_steps + 1
    assert last["val_ce"] == last["val_ce_per_step"][cfg.thinking.num_steps]
    assert last["system2_gain"] == pytest.approx(last["val_ce_per_step"][2] - last["val_ce_per_step"][3])
    assert summary["eval"] == last and summary["step"] == 6
    assert list((run / "tensorboard").glob("events.*"))
    progress = [l for l in lines if l.startswith("step 6/6")]
    assert progress and all(s in progress[0] for s in ("loss", "first", "last", "E gap", "tok/s", "MFU", "mem", "ETA"))
    assert [s for s, _ in list_checkpoints(run)] == [4, 6]  # keep_last_k=2
    pngs = plot_run(run)
    assert {p.name for p in pngs} == {"training.png", "thinking.png"}
    assert all(p.stat().st_size > 1000 for p in pngs)


def test_grad_accumulation_matches_one_big_batch(tmp_path, cache_dir):
    """Transformer++ (no noise): 2 micro-batches of 2 give the same update as one batch of 4."""
    weights = []
    for accum in (1, 2):
        cfg = tiny(tmp_path / str(accum), cache_dir, "model.arch=transformer++", f"train.grad_accum={accum}",
                   "train.max_steps=2", "train.checkpoint_every=0")
        trainer = Trainer(cfg, log=lambda _: None)
        trainer.run()
        weights.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=1e-4, atol=1e-6)


def test_nonfinite_steps_are_skipped_then_the_run_stops_with_a_checkpoint(tmp_path, cache_dir, monkeypatch):
    real_unroll = train_module_mod.unroll
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        result = real_unroll(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2 or calls["n"] >= 4:  # step 2, then steps 4, 5, 6 ...
            result.loss = result.loss * float("nan")
        return result

    monkeypatch.setattr(train_module_mod, "unroll", poisoned)
    cfg = tiny(tmp_path, cache_dir, "train.max_consecutive_nonfinite=3", "train.max_steps=20",
               "train.checkpoint_every=0")
    lines = []
    trainer = Trainer(cfg, log=lines.append)
    good = {}

    with pytest.raises(NonFiniteError, match="3 consecutive steps with non-finite loss.*last good state saved"):
        real_step = trainer.optimizer.step

        def tracking_step(*a, **k):
            out = real_step(*a, **k)
            good.update({n: v.clone() for n, v in trainer.model.state_dict().items()})
            return out

        trainer.optimizer.step = tracking_step
        trainer.run()
    assert sum("skipped (non-finite loss)" in l for l in lines) == 4
    path = latest_checkpoint(tmp_path / "run")
    assert path.name == "step_00000006"
    meta = json.loads((path / "metadata.json").read_text())
    assert meta["reason"] == "nonfinite"
    from safetensors.torch import load_file

    saved = load_file(str(path / "model" / "model-tp0-of-1.safetensors"))
    for name, value in good.items():  # the weights after the last good step (3)
        assert torch.equal(saved[name], value), name
    skipped = [r for r in records(tmp_path / "run" / "metrics.jsonl") if r.get("skipped")]
    assert [r["step"] for r in skipped] == [2, 4, 5, 6]


def test_nonfinite_dE_dy_is_named(tmp_path, cache_dir, monkeypatch):
    real_unroll = train_module_mod.unroll

    def poisoned(*args, **kwargs):
        result = real_unroll(*args, **kwargs)
        result.nonfinite = torch.ones((), dtype=torch.bool)
        return result

    monkeypatch.setattr(train_module_mod, "unroll", poisoned)
    cfg = tiny(tmp_path, cache_dir, "train.max_consecutive_nonfinite=1")
    with pytest.raises(NonFiniteError, match="non-finite dE/dy"):
        Trainer(cfg, log=lambda _: None).run()



def _tpp_step_grads(model, fused: bool, ids: torch.Tensor, monkeypatch=None):
    """One TransformerPPTrainModule step (2 micro-batches) on a world of one: (loss, grads)."""
    from types import SimpleNamespace

    from pretrain.config import RunConfig
    from pretrain.thinking import ThinkingConfig
    from pretrain.train_module import LocalBatch, TransformerPPTrainModule

    cfg = RunConfig(thinking=ThinkingConfig(fused_vocab=fused))
    cfg = replace(cfg, train=replace(cfg.train, grad_accum=2, global_batch_size=ids.shape[0]))
    from parallel.dims import single_process_dims

    pm = SimpleNamespace(module=model, dims=single_process_dims(), backward=lambda loss, sync: loss.backward())
    module = TransformerPPTrainModule(pm, cfg, torch.device("cpu"), torch.float64)
    model.zero_grad(set_to_none=True)
    stats = module.train_step(LocalBatch(ids, 0, ids.shape[0]), 0)
    return stats.loss.item(), {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def test_transformer_pp_trains_through_the_fused_lm_head_exactly(monkeypatch):
    """thinking.fused_vocab (on by default) gives the Transformer++ the fused LM-head CE: the
    trainer's step takes it, and its loss and every parameter gradient equal the plain head's
    in float64 to 1e-10; a head that drops the hidden state's gradient is caught."""
    import pretrain.model.vocab as vocab
    from pretrain.model import build_model

    torch.manual_seed(0)
    model = build_model(dict(arch="transformer++", vocab_size=41, dim=16, num_heads=2, num_layers=2,
                             max_seq_len=8)).double()
    ids = torch.randint(0, 41, (6, 9), generator=torch.Generator().manual_seed(1))
    loss_plain, g_plain = _tpp_step_grads(model, False, ids)
    calls = []
    real = vocab.LocalVocab.linear_cross_entropy
    monkeypatch.setattr(vocab.LocalVocab, "linear_cross_entropy", lambda *a: calls.append(1) or real(*a))
    loss_fused, g_fused = _tpp_step_grads(model, True, ids)
    assert len(calls) == 2, "the trainer did not take the fused LM head on both micro-batches"
    assert abs(loss_fused - loss_plain) < 1e-10 * abs(loss_plain)
    assert all(g is not None for g in g_fused.values())
    for name, want in g_plain.items():
        assert (g_fused[name] - want).abs().max().item() < 1e-10 * want.abs().max().item(), name
    # Negative control: no gradient into the body through the head's input.
    monkeypatch.setattr(vocab.LocalVocab, "linear_cross_entropy", lambda self, h, w, t: real(self, h.detach(), w, t))
    loss_bad, g_bad = _tpp_step_grads(model, True, ids)
    assert abs(loss_bad - loss_plain) < 1e-10 * abs(loss_plain)
    missing = [n for n in g_plain if g_bad[n] is None]
    assert missing and all(not n.startswith("lm_head") for n in missing)
