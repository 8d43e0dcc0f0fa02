"""Running a function on N local gloo ranks, and the parity harness that compares a parallel
layout with the single-process model (DESIGN habit 4: same seed, same weights, same batch;
losses, dE/dy and all parameter gradients must match and none may be None).

Used by tests/distributed/test_parallel_*.py and benchmarks; on CPU only 127.0.0.1.
"""
from __future__ import annotations

import json
import os
import socket
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain.model import build_model
from pretrain.thinking import ThinkingConfig, unroll

from .apply import ParallelModel, ParallelSettings, parallelize
from .dims import ParallelDims, build_dims
from .tensor import shard_range, tp_shard_dim


# -- launching ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world_size: int, port: int, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
    )
    # Ranks share two cores: one thread each avoids oversubscription (and is deterministic).
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(*args)
    except Exception:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args: Any) -> None:
    """Runs fn(*args) on `world_size` forked gloo ranks; raises if any rank raises."""
    # fork: ranks inherit the imported torch instead of paying its import again.
    mp.start_processes(_entry, args=(fn, world_size, free_port(), args), nprocs=world_size, start_method="fork")


# -- the parity harness ------------------------------------------------------------------------------
TINY_MODEL = dict(vocab_size=13, dim=16, num_heads=2, num_layers=2, max_seq_len=8, context_attention="math")
"""V=13 splits unevenly over tp=2 (7 + 6), which the vocabulary shards must handle."""
BATCH, SEQ = 4, 8


def recipe(name: str, same_random_stream: bool) -> tuple[dict, ThinkingConfig]:
    """(model overrides, thinking config) for S1 or S2. With data parallelism every rank
    draws its own Langevin noise and step-size jitter, which cannot equal one process's
    draws on the whole batch, so those two are switched off there (the structure of S2 -
    no detach, second order on the last step only, loss on the last step - stays)."""
    if name == "s1":
        return dict(step_size=500.0, learn_step_size=True), ThinkingConfig(num_steps=2)
    if name == "s2":
        noise = same_random_stream
        return dict(step_size=5.0, learn_step_size=False), ThinkingConfig(
            num_steps=2, detach_between_steps=False, create_graph="last", loss_on="last",
            step_size_jitter=2.0 if noise else 1.0, langevin_std=3.0 if noise else 0.0,
        )
    raise ValueError(name)


@dataclass
class ParityReport:
    max_abs: Dict[str, float] = field(default_factory=dict)
    """Largest |parallel - single| per quantity: loss, dE/dy, grads, weights after the steps."""
    max_rel: Dict[str, float] = field(default_factory=dict)
    """The same divided by max(1, largest |single|) of the quantity: what `tol` bounds."""
    failures: List[str] = field(default_factory=list)
    num_syncs: int = 0
    num_all_reduces: int = 0


def _local(name: str, full: torch.Tensor, dims: ParallelDims, sharded: bool) -> torch.Tensor:
    dim = tp_shard_dim(name) if sharded else None
    if dim is None:
        return full
    start, end = shard_range(full.shape[dim], dims.tp, dims.tp_rank)
    return full.narrow(dim, start, end - start)


def _full_grad(pm: ParallelModel, param: torch.nn.Parameter) -> Optional[torch.Tensor]:
    if pm.engine is None:
        return param.grad
    from deepspeed.utils import safe_get_full_grad

    return safe_get_full_grad(param)


def parity_check(
    settings: ParallelSettings,
    recipe_name: str,
    ebt_type: str = "time_embed",
    num_steps: int = 3,
    tol: float = 1e-5,
    out_file: Optional[str] = None,
    model_overrides: Optional[dict] = None,
    dtype: torch.dtype = torch.float32,
) -> ParityReport:
    """On every rank: the single-process model on the whole batch and the parallel model on
    this rank's share, `num_steps` optimizer steps of AdamW with clipping. Compares losses,
    dE/dy at the initial candidate and every parameter gradient at every step, and the
    weights at the end, each within `tol` x max(1, its largest magnitude). Raises
    AssertionError listing every mismatch."""
    dims = build_dims(tp=settings.tp, dp=settings.dp)
    overrides, thinking = recipe(recipe_name, same_random_stream=dims.dp == 1)
    model_cfg = dict(TINY_MODEL, ebt_type=ebt_type, **overrides, **(model_overrides or {}))
    torch.manual_seed(0)
    ref = build_model(model_cfg).to(dtype)
    torch.manual_seed(0)
    model = build_model(model_cfg).to(dtype)

    def adamw(m: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)

    ref_opt = adamw(ref)
    pm = parallelize(model, dims, settings, adamw, clip=1.0)
    sharded = dims.tp > 1
    rows = slice(dims.dp_rank * BATCH // dims.dp, (dims.dp_rank + 1) * BATCH // dims.dp)
    report = ParityReport()
    data = torch.Generator().manual_seed(1234)

    def record(key: str, got: torch.Tensor, want: torch.Tensor) -> None:
        # Tolerance relative to the tensor's scale: S1's alpha=500 makes gradients reach
        # hundreds, where float32's own resolution is ~6e-5.
        diff = float((got.detach().double() - want.detach().double()).abs().max()) if got.numel() else 0.0
        scale = max(1.0, float(want.detach().abs().max()) if want.numel() else 0.0)
        report.max_abs[key] = max(report.max_abs.get(key, 0.0), diff)
        report.max_rel[key] = max(report.max_rel.get(key, 0.0), diff / scale)
        if diff > tol * scale:
            report.failures.append(f"step {step} {key}: max |diff| {diff:.3g} (max |value| {scale:.3g})")

    for step in range(num_steps):
        ids = torch.randint(0, TINY_MODEL["vocab_size"], (BATCH, SEQ + 1), generator=data)
        noise = torch.randn(BATCH, SEQ, TINY_MODEL["vocab_size"], generator=data).to(dtype)
        # dE/dy at the initial candidate (first order, no parameter gradients kept).
        y_ref = noise.clone().requires_grad_(True)
        (g_ref,) = torch.autograd.grad(ref.energy(ids[:, :-1], y_ref).sum(), y_ref)
        y_par = pm.module.vocab_ops.shard(noise[rows]).clone().requires_grad_(True) if hasattr(pm.module, "vocab_ops") else None
        (g_par,) = torch.autograd.grad(pm.module.energy(ids[rows, :-1], y_par).sum(), y_par)
        record("dE/dy", g_par, pm.module.vocab_ops.shard(g_ref[rows]))

        r_ref = unroll(ref, ids, thinking, generator=torch.Generator().manual_seed(step), initial_logits=noise)
        r_par = unroll(
            pm.module, ids[rows], thinking, generator=torch.Generator().manual_seed(step),
            initial_logits=pm.module.vocab_ops.shard(noise[rows]), backward_fn=pm.backward_fn(sync=True),
        )
        loss = r_par.loss.detach().clone()
        if dims.dp > 1:
            dist.all_reduce(loss, group=dims.dp_group)
            loss /= dims.dp
        record("loss", loss, r_ref.loss)
        for k, (a, b) in enumerate(zip(r_par.step_losses, r_ref.step_losses)):
            if dims.dp == 1:
                record(f"step_loss[{k}]", a, b)
        ref_params = dict(ref.named_parameters())
        for name, p in pm.module.named_parameters():
            if not p.requires_grad:
                continue
            got = _full_grad(pm, p)
            want = ref_params[name].grad
            if got is None or want is None:
                report.failures.append(f"grad of {name} is None (parallel {got is None}, single {want is None})")
                continue
            record(f"grad/{name}", got, _local(name, want, dims, sharded))
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        pm.clip_and_step(1.0)

    ref_params = dict(ref.named_parameters())
    for name, p in pm.module.named_parameters():
        record(f"weight/{name}", p, _local(name, ref_params[name], dims, sharded))
    report.num_syncs = pm.num_syncs
    report.num_all_reduces = pm.num_all_reduces
    if out_file is not None and dist.get_rank() == 0:
        Path(out_file).write_text(json.dumps({"max_abs": report.max_abs, "max_rel": report.max_rel, "failures": report.failures,
                                              "num_syncs": report.num_syncs, "num_all_reduces": report.num_all_reduces}))
    assert not report.failures, f"rank {dist.get_rank()} {settings}: " + "; ".join(report.failures)
    return report
