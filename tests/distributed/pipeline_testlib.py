"""The pipeline parity harness: a pipeline layout (pp, with tp or dp/ZeRO) against the
single-process model, inside gloo ranks (tests/distributed/test_pipeline_parity.py).

Same seed, same weights, same batch and the same random draws (each micro-batch's generator
is seeded by its global index): the single process runs pretrain.thinking.unroll on every
micro-batch of the global batch; each pipeline runs parallel.pipeline.EBTPipeline on its dp
share. Compared, each relative to the tensor's own largest magnitude: the loss, every step's
loss and energy, the final candidate (the first-order path: forward and dE/dy across the
stages), every parameter gradient (the second-order path), the gradient norm, and after the
last optimizer step every weight. A gradient that is None fails.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from parallel.apply import ParallelSettings, parallelize
from parallel.dims import build_dims
from parallel.pipeline import EBTPipeline, TransformerPipeline
from pretrain.pipeline_draws import draw_microbatch
from parallel.reshard import local_slice
from parallel.tensor import reduce_from_tp
from pretrain.model import build_model
from pretrain.model.vocab import LOCAL_VOCAB
from pretrain.thinking import ReplayBuffer, ThinkingConfig, unroll

TINY = dict(vocab_size=13, dim=16, num_heads=2, num_layers=4, max_seq_len=8, context_attention="math")
"""Four blocks (two per stage at pp=2); V=13 splits unevenly over tp=2."""
BATCH, SEQ = 4, 8


def recipe(name: str, replay: bool = False) -> tuple[dict, ThinkingConfig]:
    """S1: 2 steps, detached, second order on every step, mean loss, learnable alpha=500.
    S2: 2-3 random steps, no detach, second order on the last step, Langevin noise 3.0,
    step-size jitter x2, fixed alpha=5, optionally the replay buffer."""
    if name == "s1":
        return dict(step_size=500.0, learn_step_size=True), ThinkingConfig(num_steps=2)
    if name == "s2":
        return dict(step_size=5.0, learn_step_size=False), ThinkingConfig(
            num_steps=2, num_steps_max=3, detach_between_steps=False, create_graph="last", loss_on="last",
            step_size_jitter=2.0, langevin_std=3.0,
            replay_size=16 if replay else 0, replay_fraction=0.5 if replay else 0.0,
        )
    raise ValueError(name)


@dataclass
class Case:
    tp: int = 1
    dp: int = 1
    pp: int = 2
    zero_stage: int = 0
    recipe: str = "s1"
    ebt_type: str = "default"
    micro_batches: int = 2
    replay: bool = False
    dtype: str = "float64"
    objective: str = "loss"
    """`loss` (the training loss, 3 optimizer steps) or `grad_sq` (||dE/dp||^2 after one step:
    its parameter gradient is purely second order)."""
    activation_checkpointing: str = "none"
    schedule: str = "interleaved"

    @property
    def tol(self) -> float:
        return 1e-12 if self.dtype == "float64" else 1e-5

    def label(self) -> str:
        return (f"pp={self.pp} tp={self.tp} dp={self.dp} zero={self.zero_stage} {self.recipe} {self.ebt_type} "
                f"micro={self.micro_batches}{' replay' if self.replay else ''} {self.dtype} {self.objective}"
                f"{' ac=' + self.activation_checkpointing if self.activation_checkpointing != 'none' else ''}"
                f" {self.schedule}")


@dataclass
class Report:
    max_rel: Dict[str, float] = field(default_factory=dict)
    failures: List[str] = field(default_factory=list)
    num_steps: List[List[int]] = field(default_factory=list)


def _grad_sq(group):
    def loss_fn(y, targets, g):
        sq = (g * g).sum()
        return reduce_from_tp(sq, group) if group is not None else sq

    return loss_fn


def _reference_grad_sq(model, ids, y0) -> torch.Tensor:
    """||dE/dp||^2 at p = softmax(y0), one energy evaluation, backward into the parameters."""
    y = y0.detach().requires_grad_(True)
    p = LOCAL_VOCAB.probs(y)
    energy = model.energy_from_probs(model.prepare(ids[:, :-1], 0), p, 0)
    (g,) = torch.autograd.grad(energy.sum(), p, create_graph=True)
    loss = (g * g).sum()
    loss.backward()
    return loss.detach()


def pipeline_parity(case: Case) -> Report:
    dims = build_dims(tp=case.tp, dp=case.dp, pp=case.pp)
    dtype = getattr(torch, case.dtype)
    overrides, thinking = recipe(case.recipe, case.replay)
    if case.objective == "grad_sq":
        # One energy evaluation; alpha does not enter ||dE/dp||^2, so it is not trained.
        thinking = ThinkingConfig(num_steps=1)
        overrides = dict(overrides, learn_step_size=False)
    cfg = dict(TINY, ebt_type=case.ebt_type, **overrides)
    torch.manual_seed(0)
    ref = build_model(cfg).to(dtype)
    torch.manual_seed(0)
    model = build_model(cfg).to(dtype)

    def adamw(m):
        return torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)

    ref_opt = adamw(ref)
    settings = ParallelSettings(tp=case.tp, dp=case.dp, pp=case.pp, zero_stage=case.zero_stage,
                                activation_checkpointing=case.activation_checkpointing)
    pm = parallelize(model, dims, settings, adamw, clip=1.0)
    loss_fn = _grad_sq(dims.tp_group if case.tp > 1 else None) if case.objective == "grad_sq" else None
    pipe = EBTPipeline(pm.module, dims, thinking, case.micro_batches, backprop=pm.pipeline_backprop, loss_fn=loss_fn,
                       schedule=case.schedule)
    report = Report()
    rows_per_rank = BATCH // case.dp
    per_micro = rows_per_rank // case.micro_batches
    total_micro = case.micro_batches * case.dp
    data = torch.Generator().manual_seed(1234)
    ref_replay = pipe_replay = None
    if case.replay:
        stored_ids = torch.randint(0, TINY["vocab_size"], (BATCH, SEQ + 1), generator=data)
        stored = torch.randn(BATCH, SEQ, TINY["vocab_size"], generator=data).to(dtype)
        ref_replay, pipe_replay = ReplayBuffer(16), ReplayBuffer(16)
        ref_replay.add(stored_ids, stored)
        pipe_replay.add(stored_ids, pm.module.vocab_ops.shard(stored) if dims.is_first_stage else stored)

    def record(key: str, got: torch.Tensor, want: torch.Tensor, step: int) -> None:
        diff = float((got.detach().double() - want.detach().double()).abs().max()) if want.numel() else 0.0
        scale = float(want.detach().double().abs().max()) if want.numel() else 0.0
        if want.dim() == 0 and case.dtype == "float32":
            # A logged mean (energy, loss) can sit near zero by cancellation of O(1) terms:
            # float32 resolves it to ~1e-8 absolute, so its scale is floored at 1.
            scale = max(scale, 1.0)
        rel = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
        report.max_rel[key] = max(report.max_rel.get(key, 0.0), rel)
        if rel > case.tol:
            report.failures.append(f"step {step} {key}: rel {rel:.3g} (max |diff| {diff:.3g}, scale {scale:.3g})")

    num_opt_steps = 1 if case.objective == "grad_sq" else 3
    ref_params = dict(ref.named_parameters())
    for step in range(num_opt_steps):
        ids = torch.randint(0, TINY["vocab_size"], (BATCH, SEQ + 1), generator=data)
        noise = torch.randn(BATCH, SEQ, TINY["vocab_size"], generator=data).to(dtype)
        ref_results, mbs = [], []
        for g_micro in range(total_micro):
            part = slice(g_micro * per_micro, (g_micro + 1) * per_micro)
            seed = 1000 * step + g_micro
            if case.objective == "grad_sq":
                ref_results.append(_reference_grad_sq(ref, ids[part], noise[part]))
            else:
                ref_results.append(unroll(ref, ids[part], thinking, generator=torch.Generator().manual_seed(seed),
                                          replay=ref_replay, loss_scale=1.0 / total_micro))
            if g_micro // case.micro_batches == dims.dp_rank and dims.is_first_stage:
                init = pm.module.vocab_ops.shard(noise[part]) if case.objective == "grad_sq" else None
                mbs.append(draw_microbatch(pm.module, ids[part], thinking, torch.Generator().manual_seed(seed),
                                           replay=pipe_replay, initial_logits=init, num_steps=1 if init is not None else None))
        if case.objective == "grad_sq":
            for p in ref.parameters():  # one backward per micro-batch summed: scale like the pipeline
                if p.grad is not None:
                    p.grad /= total_micro
        result = pipe.run(mbs if dims.is_first_stage else None, replay=pipe_replay)
        pm.sync_gradients()
        mine = ref_results[dims.dp_rank * case.micro_batches:(dims.dp_rank + 1) * case.micro_batches]
        if case.objective == "loss":
            report.num_steps.append(result.num_steps)
            for m, r in enumerate(mine):
                if result.num_steps[m] != r.num_steps:
                    report.failures.append(f"step {step} micro {m}: {result.num_steps[m]} thinking steps, single {r.num_steps}")
                    continue
                record("loss", result.micro_losses[m], r.loss, step)
                for k in range(r.num_steps):
                    record(f"step_loss[{k}]", result.step_losses[m][k], r.step_losses[k], step)
                    record(f"step_energy[{k}]", result.step_energies[m][k], r.step_energies[k], step)
                if dims.is_first_stage:
                    record("final_logits", result.final_logits[m], pm.module.vocab_ops.shard(r.final_logits), step)
        for name, p in pm.module.named_parameters():
            if not p.requires_grad:
                continue
            got = p.grad if pm.engine is None else _zero_full_grad(p)
            want = ref_params[name].grad
            if got is None or want is None:
                report.failures.append(f"grad of {name} is None (pipeline {got is None}, single {want is None})")
                continue
            record(f"grad/{name}", got, local_slice(name, want, dims), step)
        if case.objective == "grad_sq":
            break
        norm = pm.clip_and_step(1.0)
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        record("grad_norm", norm, ref_norm, step)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
    if case.objective == "loss":
        for name, p in pm.module.named_parameters():
            record(f"weight/{name}", p, local_slice(name, ref_params[name], dims), num_opt_steps)
    return report


def _zero_full_grad(param):
    from deepspeed.utils import safe_get_full_grad

    return safe_get_full_grad(param)


def transformer_pp_parity(pp: int, tp: int, dtype: str) -> Report:
    """Transformer++ under the GPipe schedule against one process: loss and every gradient."""
    dims = build_dims(tp=tp, dp=1, pp=pp)
    dt = getattr(torch, dtype)
    cfg = dict(TINY, arch="transformer++")
    torch.manual_seed(0)
    ref = build_model(cfg).to(dt)
    torch.manual_seed(0)
    model = build_model(cfg).to(dt)
    pm = parallelize(model, dims, ParallelSettings(tp=tp, pp=pp), lambda m: torch.optim.SGD(m.parameters(), lr=0.1))
    ids = torch.randint(0, TINY["vocab_size"], (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(3))
    micro = [ids[:2], ids[2:]]
    want = sum(LOCAL_VOCAB.cross_entropy(ref(m[:, :-1]), m[:, 1:]) / 2 for m in micro)
    want.backward()
    got = TransformerPipeline(pm.module, dims, 2, backprop=pm.pipeline_backprop).run(micro)
    tol = 1e-12 if dtype == "float64" else 1e-5
    report = Report()
    ref_params = dict(ref.named_parameters())

    def record(key, a, b):
        rel = float((a.detach() - b.detach()).abs().max()) / float(b.detach().abs().max())
        report.max_rel[key] = rel
        if rel > tol:
            report.failures.append(f"{key}: rel {rel:.3g}")

    record("loss", got, want)
    for name, p in pm.module.named_parameters():
        if p.grad is None:
            report.failures.append(f"grad of {name} is None")
            continue
        record(f"grad/{name}", p.grad, local_slice(name, ref_params[name].grad, dims))
    return report


def run_cases(cases: List[Case], out_file: str, transformer: Optional[List[tuple]] = None) -> None:
    """Runs the cases in one set of ranks; rank 0 writes {label: {max_rel, failures}}. A
    failing case is recorded, not raised, so one run reports every case."""
    summary = {}
    for case in cases:
        report = pipeline_parity(case)
        summary[case.label()] = _summarise(report)
    for args in transformer or []:
        summary[f"transformer++ pp={args[0]} tp={args[1]} {args[2]}"] = _summarise(transformer_pp_parity(*args))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, summary)
    if dist.get_rank() == 0:
        merged = {}
        for rank_summary in gathered:
            for label, row in rank_summary.items():
                entry = merged.setdefault(label, {"max_rel": 0.0, "failures": [], "num_steps": row["num_steps"]})
                entry["max_rel"] = max(entry["max_rel"], row["max_rel"])
                entry["failures"] += row["failures"][:5]
        Path(out_file).write_text(json.dumps(merged, indent=1))


def _summarise(report: Report) -> dict:
    return {"max_rel": max(report.max_rel.values(), default=0.0), "failures": report.failures,
            "num_steps": report.num_steps}


def negative_control(out_file: str) -> None:
    """The same check with a p2p whose backward autograd does not record: the received dE/dh
    is a constant (no leaf requiring grad, so no adjoint flows back to the later stages)."""
    import parallel.pipeline as pipeline

    original = pipeline.EBTStage._gradient_leaf
    pipeline.EBTStage._gradient_leaf = lambda self, received, make_graph: received
    try:
        run_cases([Case(recipe="s1", ebt_type="default", micro_batches=1)], out_file)
    finally:
        pipeline.EBTStage._gradient_leaf = original
