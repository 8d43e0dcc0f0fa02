"""The parity harness: a parallel layout against the single-process model (same seed, same
weights, same batch). Losses, dE/dy and every parameter gradient (which hold the
second-order terms of the thinking loop) at every optimizer step, and the weights at the
end, each within `tol` relative to ITS OWN scale (max |reference|); no gradient may be None.

Both sides run the trainer's own train module (pretrain.train_module.EBTTrainModule) on the
real S1 / S2 recipes, so the random draws (initial candidates, Langevin noise, step-size
jitter, the random number of steps, replay picks) are the layout-invariant keyed ones: a dp
rank draws exactly what the single process draws for the same rows. The single process is a
world of one inside the same rank (no collectives), built from the same seed.
"""
from __future__ import annotations

import json
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from parallel.apply import ParallelModel, ParallelSettings, parallelize, single_process
from parallel.dims import build_dims
from parallel.plan import tp_shard_dim
from parallel.spawn import count_collectives
from parallel.tensor import shard_range
from pretrain.model import build_model
from pretrain.thinking import ThinkingConfig
from pretrain.train_module import EBTTrainModule, LocalBatch

TINY_MODEL = dict(vocab_size=13, dim=16, num_heads=2, num_layers=2, max_seq_len=8, context_attention="math")
"""V=13 splits unevenly over tp=2 (7 + 6), which the vocabulary shards must handle."""
BATCH, SEQ = 4, 8


def recipe(name: str, same_random_stream: bool = True) -> tuple[dict, ThinkingConfig]:
    """(model overrides, thinking config) for S1 or S2 (S2 in full: random 2-3 steps, Langevin
    noise, step-size jitter, a replay buffer). `same_random_stream` is kept for callers that
    drive `unroll` with one generator: the keyed draws make it irrelevant to the harness."""
    if name == "s1":
        return dict(step_size=500.0, learn_step_size=True), ThinkingConfig(num_steps=2)
    if name == "s2":
        return dict(step_size=5.0, learn_step_size=False), ThinkingConfig(
            num_steps=2, num_steps_max=3, detach_between_steps=False, create_graph="last", loss_on="last",
            step_size_jitter=2.0, langevin_std=3.0, replay_size=8, replay_fraction=0.5,
        )
    raise ValueError(name)


def module_config(thinking: ThinkingConfig, model_cfg, grad_accum: int, seed: int = 0):
    """The parts of a RunConfig a train module reads."""
    return SimpleNamespace(thinking=thinking, model=model_cfg,
                           train=SimpleNamespace(seed=seed, grad_accum=grad_accum, compile="false"),
                           data=SimpleNamespace(seq_len=SEQ), run_dir=tempfile.gettempdir())


@dataclass
class ParityReport:
    max_abs: Dict[str, float] = field(default_factory=dict)
    """Largest |parallel - single| per quantity."""
    max_rel: Dict[str, float] = field(default_factory=dict)
    """The same divided by the quantity's own scale (max |single|): what `tol` bounds."""
    failures: List[str] = field(default_factory=list)
    num_syncs: int = 0
    num_all_reduces: int = 0
    collectives_per_step: Dict[str, int] = field(default_factory=dict)
    """Collective calls of the last optimizer step (unroll, backwards, sync, clip, update)."""


def _local(name: str, full: torch.Tensor, tp: int, tp_rank: int) -> torch.Tensor:
    dim = tp_shard_dim(name) if tp > 1 else None
    if dim is None:
        return full
    start, end = shard_range(full.shape[dim], tp, tp_rank)
    return full.narrow(dim, start, end - start)


def _full_grad(pm: ParallelModel, param: torch.nn.Parameter) -> Optional[torch.Tensor]:
    if pm.engine is None:
        return param.grad
    from deepspeed.utils import safe_get_full_grad

    return safe_get_full_grad(param)


def compare(report: ParityReport, key: str, got: torch.Tensor, want: torch.Tensor, tol: float, where: str) -> None:
    """|got - want| <= tol x max|want| (the tensor's own scale); a zero reference must be met exactly."""
    got, want = got.detach().double().reshape(want.shape), want.detach().double()
    diff = float((got - want).abs().max()) if want.numel() else 0.0
    scale = float(want.abs().max()) if want.numel() else 0.0
    rel = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
    report.max_abs[key] = max(report.max_abs.get(key, 0.0), diff)
    report.max_rel[key] = max(report.max_rel.get(key, 0.0), rel)
    if not rel <= tol:
        report.failures.append(f"{where} {key}: max |diff| {diff:.3g} vs its scale {scale:.3g} (rel {rel:.3g} > {tol:g})")


def parity_check(
    settings: ParallelSettings,
    recipe_name: str,
    ebt_type: str = "time_embed",
    num_steps: int = 3,
    tol: float = 1e-5,
    out_file: Optional[str] = None,
    model_overrides: Optional[dict] = None,
    dtype: torch.dtype = torch.float32,
    micro_batches: int = 1,
) -> ParityReport:
    """On every rank: the single-process model on the whole batch and the parallel model on
    this rank's share, `num_steps` optimizer steps of AdamW with clipping through the
    trainer's train module. Raises AssertionError listing every mismatch."""
    dims = build_dims(tp=settings.tp, dp=settings.dp)
    overrides, thinking = recipe(recipe_name)
    model_cfg = dict(TINY_MODEL, ebt_type=ebt_type, **overrides, **(model_overrides or {}))
    torch.manual_seed(0)
    ref = build_model(model_cfg).to(dtype)
    torch.manual_seed(0)
    model = build_model(model_cfg).to(dtype)

    def adamw(m: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)

    ref_opt = adamw(ref)
    ref_pm = single_process(ref, ref_opt)
    ref_module = EBTTrainModule(ref_pm, module_config(thinking, ref.cfg, 1), torch.device("cpu"), dtype)
    # Counting starts before DeepSpeed binds its collective functions, so it sees them all.
    counting = count_collectives()
    counts = counting.__enter__()
    pm = parallelize(model, dims, settings, adamw, clip=1.0)
    module = EBTTrainModule(pm, module_config(thinking, model.cfg, micro_batches), torch.device("cpu"), dtype)
    rows = slice(dims.dp_rank * BATCH // dims.dp, (dims.dp_rank + 1) * BATCH // dims.dp)
    report = ParityReport()
    data = torch.Generator().manual_seed(1234)
    tp, tp_rank = dims.tp, dims.tp_rank

    for step in range(num_steps):
        where = f"step {step}"
        ids = torch.randint(0, TINY_MODEL["vocab_size"], (BATCH, SEQ + 1), generator=data)
        noise = torch.randn(BATCH, SEQ, TINY_MODEL["vocab_size"], generator=data).to(dtype)
        # dE/dy at a candidate (first order, no parameter gradients kept).
        y_ref = noise.clone().requires_grad_(True)
        (g_ref,) = torch.autograd.grad(ref.energy(ids[:, :-1], y_ref).sum(), y_ref)
        y_par = pm.module.vocab_ops.shard(noise[rows]).clone().requires_grad_(True)
        (g_par,) = torch.autograd.grad(pm.module.energy(ids[rows, :-1], y_par).sum(), y_par)
        compare(report, "dE/dy", g_par, pm.module.vocab_ops.shard(g_ref[rows]), tol, where)

        s_ref = ref_module.train_step(LocalBatch(ids, 0, BATCH), step)
        before = Counter(counts)
        s_par = module.train_step(LocalBatch(ids[rows], rows.start, BATCH), step)
        in_step = counts - before
        loss = s_par.loss.clone().double()
        if dims.dp > 1:
            dist.all_reduce(loss, group=dims.dp_group)
            loss /= dims.dp
        compare(report, "loss", loss, s_ref.loss, tol, where)
        ref_params = dict(ref.named_parameters())
        for name, p in pm.module.named_parameters():
            if not p.requires_grad:
                continue
            got, want = _full_grad(pm, p), ref_params[name].grad
            if got is None or want is None:
                report.failures.append(f"grad of {name} is None (parallel {got is None}, single {want is None})")
                continue
            compare(report, f"grad/{name}", got, _local(name, want, tp, tp_rank), tol, where)
        before_step = Counter(counts)
        norm = pm.clip_and_step(1.0)
        report.collectives_per_step = dict(in_step + (counts - before_step))
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        compare(report, "grad_norm", norm, ref_norm, tol, where)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        pm.zero_grad()
        ref_module.commit(True)
        module.commit(True)

    counting.__exit__(None, None, None)
    ref_params = dict(ref.named_parameters())
    # AdamW divides by sqrt(v) + eps: for weights that start at zero (adaln's modulation) and
    # have tiny gradients, float32 rounding of the gradient is amplified in the update, so the
    # weights after 3 steps get 3x the float32 tolerance; the float64 cases bound them at 1e-10.
    weight_tol = tol * 3 if dtype == torch.float32 else tol
    for name, p in pm.module.named_parameters():
        compare(report, f"weight/{name}", p, _local(name, ref_params[name], tp, tp_rank), weight_tol, "end")
    report.num_syncs = pm.num_syncs
    report.num_all_reduces = pm.num_all_reduces
    if out_file is not None and dist.get_rank() == 0:
        Path(out_file).write_text(json.dumps({"max_abs": report.max_abs, "max_rel": report.max_rel, "failures": report.failures,
                                              "num_syncs": report.num_syncs, "num_all_reduces": report.num_all_reduces,
                                              "collectives_per_step": report.collectives_per_step}))
    assert not report.failures, f"rank {dist.get_rank()} {settings}: " + "; ".join(report.failures[:6])
    return report


@dataclass
class ParityCase:
    settings: ParallelSettings
    recipe: str
    ebt_type: str = "default"
    micro_batches: int = 1
    dtype: torch.dtype = torch.float32
    tol: float = 1e-5

    def label(self) -> str:
        s = self.settings
        dtype = str(self.dtype).replace("torch.", "")
        return (f"tp={s.tp} dp={s.dp} zero={s.zero_stage} ac={s.activation_checkpointing} {self.recipe} "
                f"{self.ebt_type} micro={self.micro_batches} {dtype}")


def parity_cases(cases: List[ParityCase], out_file: Optional[str] = None) -> None:
    """Runs several parity checks in one set of ranks (process start-up dominates on CPU);
    rank 0 writes {label: summary} to `out_file`."""
    summary = {}
    for case in cases:
        report = parity_check(case.settings, case.recipe, case.ebt_type, tol=case.tol, dtype=case.dtype,
                              micro_batches=case.micro_batches)
        summary[case.label()] = {
            "max_rel": max(v for k, v in report.max_rel.items() if not k.startswith("weight/")),
            "max_rel_weight": max(v for k, v in report.max_rel.items() if k.startswith("weight/")),
            "max_abs_grad": max(v for k, v in report.max_abs.items() if k.startswith("grad/")),
            "max_abs_dE_dy": report.max_abs["dE/dy"],
            "max_abs_loss": report.max_abs["loss"],
            "max_abs_weight": max(v for k, v in report.max_abs.items() if k.startswith("weight/")),
            "syncs": report.num_syncs,
            "collectives_per_step": report.collectives_per_step,
        }
    if out_file is not None and dist.get_rank() == 0:
        Path(out_file).write_text(json.dumps(summary, indent=1))
