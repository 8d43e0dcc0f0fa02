"""The training loop: one road for every world size.

The loop owns the optimizer-step cadence and nothing model-specific:

    for each optimizer step t:
        batch   = this rank's rows of global batch t (data_pipeline: global order, one-integer cursor)
        lr      = warm-up then cosine (a pure function of t)
        stats   = train_module.train_step(batch, t)   # micro-batches, backwards, one gradient sync
        reduce  = one all-reduce: logged losses/energies, the dE/dy flag, the gradients' sum of squares
        skip?   = the callbacks' before_optimizer_step (the non-finite guard); all ranks agree
        step    = clip + optimizer step, or skip (weights and optimizer state untouched)
        callbacks.on_step_end: progress line, metrics, evaluation, checkpoint, preemption

The same code runs a single process (a world of one: `ParallelDims` is always built and
`parallel.parallelize` always applied; at tp = dp = 1 it changes nothing) and any tp/dp/ZeRO
layout under torchrun, Slurm or Ray. The model family's work is in pretrain.train_module,
cross-cutting work in pretrain.callbacks.

Exact resume: everything that decides the next step is in the checkpoint (one reshardable
format, pretrain.checkpoint): weights and AdamW moments, the step counter (the learning rate
and every random draw of the thinking loop are pure functions of it, so no generator state
is needed, and torch's global RNG is not used by training), the data cursor, the replay
buffer and the non-finite counters. Evaluation and the probe use their own
generators, so they never change the training trajectory.

Test hook: `EBT_GRAD_FAULT=nan@STEPS@RANK` (or `inf@...`; STEPS one step or a comma list)
adds NaN/Inf to one gradient of rank RANK during those optimizer steps (1-based), before any
synchronisation.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn as nn

from data_pipeline import make_loader, prepare_dataset
from data_pipeline.order import rank_slice

from . import distributed
from . import flops as flops_mod
from . import probe as probe_mod
from .callbacks import (
    Callback,
    JsonlSink,
    NonFiniteError,
    Progress,
    StepEvent,
    TensorBoardSink,
    WandbSinkCallback,
    default_callbacks,
)
from .checkpoint import (
    CheckpointError,
    check_model_state,
    clean_stale,
    latest_checkpoint,
    optimizer_param_names,
    read_full_model_state,
    read_metadata,
    read_optimizer_moments,
    read_trainer_state,
    save_checkpoint,
)
from .config import ConfigError, RunConfig, to_container, to_yaml
from .model import build_model
from .train_module import LocalBatch, StepStats, build_train_module

GRAD_FAULT_ENV = "EBT_GRAD_FAULT"

__all__ = ["Trainer", "train", "build_optimizer", "lr_at", "NonFiniteError"]


# -- optimizer and schedule -----------------------------------------------------------------
def build_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.AdamW:
    """AdamW with up to three groups: weights with decay; norms without decay; the step size
    alpha alone, without decay and with lr x `optim.alpha_lr_multiplier`. Each group carries
    `lr_scale`, which the schedule multiplies by the base learning rate."""
    oc = cfg.optim
    decay, no_decay, alpha = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name == "step_size":
            alpha.append(param)
        elif "norm" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": decay, "weight_decay": oc.weight_decay, "lr_scale": 1.0, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0, "name": "no_decay"},
    ]
    if alpha:
        groups.append({"params": alpha, "weight_decay": 0.0, "lr_scale": oc.alpha_lr_multiplier, "name": "alpha"})
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=oc.lr, betas=tuple(oc.betas), eps=oc.eps)


def lr_at(step: int, cfg: RunConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, cosine to lr*min_lr_ratio."""
    oc, total = cfg.optim, cfg.train.max_steps
    if step < oc.warmup_steps:
        return oc.lr * (step + 1) / oc.warmup_steps
    span = max(1, total - oc.warmup_steps)
    progress = min(1.0, (step - oc.warmup_steps) / span)
    floor = oc.lr * oc.min_lr_ratio
    return floor + (oc.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


# -- device and precision ----------------------------------------------------------------------
def select_device(cfg: RunConfig) -> torch.device:
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' requested but no CUDA device is available; use cpu or auto")
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device
    return torch.device(want)


def select_precision(cfg: RunConfig, device: torch.device) -> torch.dtype:
    """bf16 autocast only on a GPU that supports it; fp32 everywhere else."""
    bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if cfg.train.precision == "bf16" and not bf16_ok:
        raise ConfigError("train.precision: 'bf16' needs a CUDA GPU with bf16 support; use fp32 or auto")
    if cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and bf16_ok):
        return torch.bfloat16
    return torch.float32


def _grad_fault(step: int, rank: int) -> Optional[float]:
    spec = os.environ.get(GRAD_FAULT_ENV, "")
    try:
        kind, at, who = spec.split("@")
        if step in {int(s) for s in at.split(",")} and int(who) == rank:
            return {"nan": float("nan"), "inf": float("inf")}[kind]
    except (ValueError, KeyError):
        pass
    return None


# -- the trainer ----------------------------------------------------------------------------
class Trainer:
    """Builds everything a run needs from a validated RunConfig; `run()` trains to max_steps.

    Nothing is written to `run_dir` before the data, the model and any checkpoint to resume
    from have been checked, so a bad input leaves the disk as it was (beyond removing the
    temporary folders of an interrupted save)."""

    def __init__(self, cfg: RunConfig, log: Callable[[str], None] = print,
                 callbacks: Sequence[Callback] = ()) -> None:
        self.device = select_device(cfg)
        self.dims = distributed.init_dims(cfg, self.device)
        self.rank = self.dims.rank
        self.log = log if self.rank == 0 else (lambda _msg: None)
        # Thinking with a large step size drives candidate probabilities deep into the subnormal
        # range, where CPU arithmetic is 10-100x slower; flushing them to zero keeps steps fast.
        torch.set_flush_denormal(True)
        self.dtype = select_precision(cfg, self.device)
        self.prepared = prepare_dataset(cfg.data, rank=self.rank, world_size=self.dims.world_size)
        vocab = self.prepared.vocab_size
        if cfg.model.vocab_size is not None and cfg.model.vocab_size < vocab:
            raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} < the tokenizer's {vocab}; use null")
        if cfg.model.vocab_size is None:
            cfg = replace(cfg, model=replace(cfg.model, vocab_size=vocab))
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        tc = cfg.train

        from parallel.apply import parallelize
        from parallel.dims import LayoutError, check_model_fits

        try:
            check_model_fits(self.dims, cfg.model.num_heads, cfg.model.vocab_size, cfg.model.ffn_hidden)
        except LayoutError as err:
            raise ConfigError(str(err)) from None
        if self.rank == 0:
            clean_stale(self.run_dir)
        distributed.barrier(self.dims)
        torch.manual_seed(tc.seed)
        model = build_model(cfg.model).to(self.device)
        self.num_params = sum(p.numel() for p in model.parameters())
        # The optimizer's parameter order by name (an earlier single-process optimizer.pt indexes
        # by it); read before ZeRO replaces the optimizer's groups with flat partitions.
        self._optimizer_names = optimizer_param_names(model, build_optimizer(model, cfg))
        self.resume_path = latest_checkpoint(self.run_dir)
        self._resume_meta: Optional[Dict[str, Any]] = None
        if self.resume_path is not None:  # the full weights go in before parallelize slices them
            self._resume_meta = self._load_weights(self.resume_path, model)
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else None
        self.pm = parallelize(model, self.dims, cfg.parallel, lambda m: build_optimizer(m, cfg), clip=clip)
        self.model = self.pm.module
        self.optimizer = self.pm.optimizer
        self.module = build_train_module(self.pm, cfg, self.device, self.dtype)
        self.train_loader = make_loader(
            self.prepared, "train", global_batch_size=tc.global_batch_size, rank=self.dims.dp_rank,
            world_size=self.dims.dp, seed=cfg.data.seed, num_workers=cfg.data.num_workers,
            on_bad_shard=cfg.data.on_bad_shard,
        )
        self.probe_ids = probe_mod.probe_ids(vocab, cfg.data.seq_len)
        self.step = 0
        self.skipped = 0
        self.consecutive_nonfinite = 0
        self.grads_finite = True
        self.last_eval: Optional[Dict[str, Any]] = None
        self.resumed_from: Optional[Path] = None
        self.peak_flops = tc.peak_flops or flops_mod.peak_flops_estimate(self.device, self.dtype)
        self.callbacks: List[Callback] = default_callbacks() + list(callbacks)
        if self.resume_path is not None:
            self._resume(self.resume_path, self._resume_meta)

    @property
    def layout(self) -> Dict[str, int]:
        p = self.cfg.parallel
        return {"tp": p.tp, "dp": p.dp, "pp": p.pp, "zero_stage": p.zero_stage}

    def _callback(self, kind: type) -> Optional[Callback]:
        return next((cb for cb in self.callbacks if isinstance(cb, kind)), None)

    # -- outputs (the sinks are callbacks; these route records to them) -----------------------
    def emit_metrics(self, record: Dict[str, Any]) -> None:
        jsonl, tb, wandb = self._callback(JsonlSink), self._callback(TensorBoardSink), self._callback(WandbSinkCallback)
        if jsonl is not None:
            jsonl.write("metrics", record)
        if record.get("loss") is not None:
            if tb is not None:
                tb.scalars("train", record, record["step"])
            if wandb is not None:
                wandb.write("train", record)

    def emit_eval(self, record: Dict[str, Any]) -> None:
        jsonl, tb, wandb = self._callback(JsonlSink), self._callback(TensorBoardSink), self._callback(WandbSinkCallback)
        if jsonl is not None:
            jsonl.write("eval", record)
        if tb is not None:
            tb.scalars("eval", record, record["step"])
        if wandb is not None:
            wandb.write("eval", record)
        if "val_ce_per_step" in record:
            ces = " ".join(f"{c:.3f}" for c in record["val_ce_per_step"][1:])
            energies = " ".join(f"{e:.3f}" for e in record["val_energy_per_step"][1:])
            self.log(f"eval step {record['step']}: val CE {record['val_ce']:.4f} after {record['trained_steps']} steps"
                     f" | CE per thinking step {ces} | energy {energies}"
                     f" | System-2 gain ({record['eval_steps']} steps) {record['system2_gain']:+.4f}"
                     f" | unigram entropy {record['unigram_entropy']:.3f}")
        else:
            self.log(f"eval step {record['step']}: val CE {record['val_ce']:.4f}"
                     f" | unigram entropy {record['unigram_entropy']:.3f}")

    def pause(self, seconds: float) -> None:
        progress = self._callback(Progress)
        if progress is not None:
            progress.pause(seconds)

    # -- state ---------------------------------------------------------------------------
    def probe_values(self) -> List[List[float]]:
        """Energies (EBT) or target log-probabilities (Transformer++) on the fixed probe batch
        (collective under tp and pp)."""
        return self.module.probe_values(self.probe_ids)

    def _trainer_state(self) -> Dict[str, Any]:
        return {
            "step": self.step,
            "skipped": self.skipped,
            "consecutive_nonfinite": self.consecutive_nonfinite,
            **self.module.state_dict(),  # collective under tp (the replay buffer's full vocabulary)
        }

    def save(self, reason: str = "periodic") -> Path:
        """Checkpoints the current state, collectively (see pretrain.checkpoint for the format)."""
        meta = {
            "reason": reason,
            "world_size": self.dims.world_size,
            "layout": self.layout,
            "config": to_container(self.cfg),
            "data": self.train_loader.state_dict(),
            "probe": {"ids": self.probe_ids.tolist(), "values": self.probe_values()},  # collective under tp
            "skipped_steps": self.skipped,
        }
        return save_checkpoint(self.run_dir, self.step, pm=self.pm, trainer_state=self._trainer_state(),
                               metadata=meta, keep_last_k=self.cfg.train.keep_last_k)

    def _load_weights(self, path: Path, model: nn.Module) -> Dict[str, Any]:
        meta = read_metadata(path)
        tensors, source = read_full_model_state(path, meta)
        check_model_state(source, tensors, model)
        with torch.no_grad():
            model.load_state_dict({k: v.to(self.device) for k, v in tensors.items()}, strict=True)
        return meta

    def _resume(self, path: Path, meta: Dict[str, Any]) -> None:
        from parallel.reshard import load_optimizer_moments

        moments, opt_step = read_optimizer_moments(path, meta, self._optimizer_names)
        load_optimizer_moments(self.pm, moments, opt_step)
        state = read_trainer_state(path, meta)
        probe = meta.get("probe", {})
        if probe.get("ids") == self.probe_ids.tolist():
            saved, now = torch.tensor(probe["values"]), torch.tensor(self.probe_values())
            if not torch.allclose(saved, now, rtol=1e-3, atol=1e-3):
                raise CheckpointError(
                    f"{path}: probe energies after loading differ from the saved ones "
                    f"(max diff {(saved - now).abs().max().item():.3g}): corrupt weights or a different model code"
                )
        try:
            self.train_loader.load_state_dict(meta["data"])
            self.module.load_state_dict(state)
            self.step = int(state["step"])
            self.skipped = int(state["skipped"])
            self.consecutive_nonfinite = int(state["consecutive_nonfinite"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{path}: unusable trainer state ({type(err).__name__}: {err})") from None
        self.resumed_from = path

    # -- evaluation ----------------------------------------------------------------------
    def evaluate(self) -> Dict[str, Any]:
        """The train module's validation metrics at the current step (every rank computes
        them: tensor parallelism needs all; rank 0 writes)."""
        tc = self.cfg.train
        loader = make_loader(self.prepared, "val", global_batch_size=tc.global_batch_size, rank=0, world_size=1,
                             seed=self.cfg.data.seed, num_workers=0, on_bad_shard=self.cfg.data.on_bad_shard)
        record = self.module.evaluate(iter(loader), tc.eval_batches, self.step)
        if record.get("val_batches", 0) == 0:
            raise ConfigError("data.val_fraction: the validation split has no full batch; raise it or lower train.global_batch_size")
        return {"step": self.step, **record, "unigram_entropy": float(self.prepared.unigram_entropy)}

    # -- the loop ------------------------------------------------------------------------
    def _reduce(self, stats: StepStats) -> StepStats:
        """One all-reduce over the world: mean of the logged values (tp ranks hold identical
        ones; dp ranks differ), whether any rank saw a non-finite dE/dy, and the sum of the
        ranks' local gradient squares (NaN/Inf on any rank makes it non-finite)."""
        fields = ["loss", "loss_first", "loss_last"] + (["energy_first", "energy_last"] if stats.energy_first is not None else [])
        local = [getattr(stats, f).double().cpu() for f in fields]
        local += [stats.nonfinite_grad_input.double().cpu(), self.pm.local_grad_sq()]
        values = distributed.all_reduce_mean(torch.stack(local), self.dims)
        self.grads_finite = bool(torch.isfinite(values[-1]))
        return replace(stats, nonfinite_grad_input=values[-2] > 0,
                       **{f: values[i].float() for i, f in enumerate(fields)})

    def _optimizer_step(self, stats: StepStats, lr: float) -> StepEvent:
        reason = None
        for cb in self.callbacks:
            reason = reason or cb.before_optimizer_step(self, stats)
        grad_norm = float("nan")
        if reason is None:
            clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else None
            grad_norm = float(self.pm.clip_and_step(clip))  # global norm over the unsharded model
            self.pm.zero_grad()
            self.consecutive_nonfinite = 0
        else:
            self.pm.skip_step()
            self.skipped += 1
            self.consecutive_nonfinite += 1
        self.module.commit(reason is None)
        self.step += 1
        return StepEvent(step=self.step, stats=stats, lr=lr, grad_norm=grad_norm, skipped=reason)

    def _inject_fault(self) -> Optional[Any]:
        value = _grad_fault(self.step + 1, self.rank)
        if value is None:
            return None
        param = [p for p in self.model.parameters() if p.requires_grad][-1]
        return param.register_hook(lambda g: g + value)

    def _prepare_run_dir(self) -> None:
        if self.rank == 0:  # rank 0 writes the run folder's files
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))
        distributed.barrier(self.dims)

    def run(self) -> Dict[str, Any]:
        """Trains from the current step to `train.max_steps`; returns the run's summary."""
        cfg, tc = self.cfg, self.cfg.train
        self._prepare_run_dir()
        if self.resumed_from is not None:
            self.log(f"resuming from {self.resumed_from} (step {self.step})")
        self.log(
            f"{cfg.model.arch}: {self.num_params / 1e6:.2f}M parameters, vocab {cfg.model.vocab_size}, "
            f"seq {cfg.data.seq_len}, batch {tc.global_batch_size}, {tc.max_steps} steps, device {self.device}, "
            f"{str(self.dtype).replace('torch.', '')}, layout tp={self.dims.tp} dp={self.dims.dp} "
            f"pp={self.dims.pp} zero={cfg.parallel.zero_stage} on {self.dims.world_size} process(es), "
            f"unigram entropy {self.prepared.unigram_entropy:.3f} nats"
        )
        started = time.time()
        start_step = self.step
        per_rank = rank_slice(tc.global_batch_size, self.dims.dp_rank, self.dims.dp)
        batches: Iterator[torch.Tensor] = iter(self.train_loader)
        try:
            for cb in self.callbacks:
                cb.on_start(self)
            while self.step < tc.max_steps:
                ids = next(batches).to(self.device)
                lr = lr_at(self.step, cfg)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr * group["lr_scale"]
                hook = self._inject_fault()
                stats = self.module.train_step(LocalBatch(ids, per_rank.start, tc.global_batch_size), self.step)
                if hook is not None:
                    hook.remove()
                event = self._optimizer_step(self._reduce(stats), lr)
                for cb in self.callbacks:
                    cb.on_step_end(self, event)
        finally:
            for cb in self.callbacks:
                cb.on_close(self)
        summary = {
            "run_dir": str(self.run_dir),
            "step": self.step,
            "steps_this_run": self.step - start_step,
            "skipped_steps": self.skipped,
            "wall_seconds": round(time.time() - started, 1),
            "unigram_entropy": float(self.prepared.unigram_entropy),
            "eval": self.last_eval,
        }
        for cb in self.callbacks:
            cb.on_end(self, summary)
        if self.rank == 0:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary


def train(cfg: RunConfig, log: Callable[[str], None] = print, callbacks: Sequence[Callback] = ()) -> Dict[str, Any]:
    """Builds a Trainer (resuming when run_dir has checkpoints) and runs it; a multi-process run
    destroys its process group on the way out, whatever happens."""
    try:
        trainer = Trainer(cfg, log=log, callbacks=callbacks)
        if trainer.step >= cfg.train.max_steps:
            trainer.log(f"{cfg.run_dir}: already at step {trainer.step} = train.max_steps; nothing to do "
                        "(raise train.max_steps to continue, or use a new run_dir)")
        return trainer.run()
    finally:
        distributed.teardown()

