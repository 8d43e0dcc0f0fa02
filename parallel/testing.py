"""Running a function on N local gloo ranks, and the parity harness that compares a parallel
layout with the single-process model (DESIGN habit 4: same seed, same weights, same batch;
losses, dE/dy and all parameter gradients must match and none may be None).

Used by tests/distributed/test_parallel_*.py and benchmarks; on CPU only 127.0.0.1.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

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


_COLLECTIVES = (
    "all_reduce", "all_reduce_coalesced", "reduce", "reduce_scatter", "reduce_scatter_tensor",
    "all_gather", "all_gather_into_tensor", "broadcast",
)


@contextlib.contextmanager
def count_collectives() -> Iterator[Counter]:
    """Counts torch.distributed collective calls (ours and DeepSpeed's, which call through
    the same module attributes) made inside the block, by name."""
    counts: Counter = Counter()
    originals = {name: getattr(dist, name) for name in _COLLECTIVES if hasattr(dist, name)}

    def counting(name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        return run

    for name, fn in originals.items():
        setattr(dist, name, counting(name, fn))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


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
    collectives_per_step: Dict[str, int] = field(default_factory=dict)
    """Collective calls of the last optimizer step (unroll, backwards, sync, clip, update)."""


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
    micro_batches: int = 1,
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
    # Counting starts before DeepSpeed binds its collective functions, so it sees them all.
    counting = count_collectives()
    counts = counting.__enter__()
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
        y_par = pm.module.vocab_ops.shard(noise[rows]).clone().requires_grad_(True)
        (g_par,) = torch.autograd.grad(pm.module.energy(ids[rows, :-1], y_par).sum(), y_par)
        record("dE/dy", g_par, pm.module.vocab_ops.shard(g_ref[rows]))

        r_ref = unroll(ref, ids, thinking, generator=torch.Generator().manual_seed(step), initial_logits=noise)
        # This rank's rows, split into micro-batches; only the last one synchronises.
        local_ids, local_noise = ids[rows], pm.module.vocab_ops.shard(noise[rows])
        per_micro = local_ids.shape[0] // micro_batches
        before = Counter(counts)
        losses = []
        for m in range(micro_batches):
            part = slice(m * per_micro, (m + 1) * per_micro)
            r_par = unroll(
                pm.module, local_ids[part], thinking, generator=torch.Generator().manual_seed(step),
                initial_logits=local_noise[part], loss_scale=1.0 / micro_batches,
                backward_fn=pm.backward_fn(sync=m == micro_batches - 1),
            )
            losses.append(r_par.loss)
        in_unroll = counts - before
        loss = torch.stack(losses).mean()
        if dims.dp > 1:
            dist.all_reduce(loss, group=dims.dp_group)
            loss /= dims.dp
        record("loss", loss, r_ref.loss)
        for k, (a, b) in enumerate(zip(r_par.step_losses, r_ref.step_losses)):
            if dims.dp == 1 and micro_batches == 1:
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
        before_step = Counter(counts)
        norm = pm.clip_and_step(1.0)
        report.collectives_per_step = dict(in_unroll + (counts - before_step))
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        record("grad_norm", norm, ref_norm)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)

    counting.__exit__(None, None, None)
    ref_params = dict(ref.named_parameters())
    for name, p in pm.module.named_parameters():
        record(f"weight/{name}", p, _local(name, ref_params[name], dims, sharded))
    report.num_syncs = pm.num_syncs
    report.num_all_reduces = pm.num_all_reduces
    if out_file is not None and dist.get_rank() == 0:
        Path(out_file).write_text(json.dumps({"max_abs": report.max_abs, "max_rel": report.max_rel, "failures": report.failures,
                                              "num_syncs": report.num_syncs, "num_all_reduces": report.num_all_reduces,
                                              "collectives_per_step": report.collectives_per_step}))
    assert not report.failures, f"rank {dist.get_rank()} {settings}: " + "; ".join(report.failures)
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
            "max_rel": max(report.max_rel.values()),
            "max_abs_grad": max(v for k, v in report.max_abs.items() if k.startswith("grad/")),
            "max_abs_dE_dy": report.max_abs["dE/dy"],
            "max_abs_loss": report.max_abs["loss"],
            "max_abs_weight": max(v for k, v in report.max_abs.items() if k.startswith("weight/")),
            "syncs": report.num_syncs,
            "collectives_per_step": report.collectives_per_step,
        }
    if out_file is not None and dist.get_rank() == 0:
        Path(out_file).write_text(json.dumps(summary, indent=1))
