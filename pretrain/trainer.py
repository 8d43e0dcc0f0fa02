"""The training loop of one run: data, model, AdamW groups, schedule, accumulation, clipping,
the non-finite guard, evaluation, logging and checkpoints with exact resume.

One optimizer step = one global batch from the data loader, split into `train.grad_accum`
micro-batches. The per-model work of a micro-batch lives in a small step object:
`EBTStep` (the thinking unroll of pretrain.thinking, with its own backward) and
`TransformerPPStep` (plain next-token cross-entropy).

Exact resume: everything that decides the next step is in the checkpoint: model and
optimizer state, the step counter (the learning rate is a pure function of it), the data
cursor, the thinking generator and torch's global RNG, the replay buffer and the non-finite
counters. Evaluation and the checkpoint probe use their own generators, so they never
change the training trajectory.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import resource
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
import torch.nn as nn

from data_pipeline import make_loader, prepare_dataset
from launchers.preemption import Preempted, stop_requested

from . import distributed
from . import flops as flops_mod
from . import probe as probe_mod
from .checkpoint import CheckpointError, is_sharded, latest_checkpoint, load_checkpoint, read_metadata, save_checkpoint
from .config import ConfigError, RunConfig, to_container, to_yaml
from .model import build_model
from .thinking import ReplayBuffer, cross_entropy, think, unroll

EVAL_SEED_OFFSET = 7919


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a NaN/Inf loss or dE/dy; the run stopped."""


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


# -- step objects ---------------------------------------------------------------------------
@dataclass
class StepStats:
    """What one optimizer step's micro-batches produced (tensors; no host sync yet)."""

    loss: torch.Tensor
    loss_first: torch.Tensor
    loss_last: torch.Tensor
    energy_first: Optional[torch.Tensor]
    energy_last: Optional[torch.Tensor]
    nonfinite_grad_input: torch.Tensor
    """NaN/Inf in dE/dy (EBT) - the loss is checked separately."""
    flops: float


class EBTStep:
    """A micro-batch of the EBT: `thinking.unroll` runs the thinking steps and the backward."""

    def __init__(self, model: nn.Module, cfg: RunConfig, generator: torch.Generator, replay: Optional[ReplayBuffer],
                 pm=None):
        self.model, self.cfg, self.generator, self.replay, self.pm = model, cfg, generator, replay, pm

    def __call__(self, micro_batches: List[torch.Tensor], autocast) -> StepStats:
        n = len(micro_batches)
        results = []
        flops = 0.0
        for i, ids in enumerate(micro_batches):
            # Multi-process: gradients are synchronised once, in the last micro-batch's last backward.
            extra = {} if self.pm is None else {"backward_fn": self.pm.backward_fn(sync=i == n - 1)}
            with autocast():
                r = unroll(self.model, ids, self.cfg.thinking, generator=self.generator, replay=self.replay,
                           loss_scale=1.0 / n, **extra)
            results.append(r)
            flops += flops_mod.ebt_step_flops(
                self.model.cfg, ids.shape[1] - 1, r.num_rows, r.num_steps,
                self.cfg.thinking.create_graph, self.cfg.thinking.reuse_context,
            )
        mean = lambda xs: torch.stack(xs).float().mean()  # noqa: E731
        return StepStats(
            loss=mean([r.loss for r in results]),
            loss_first=mean([r.step_losses[0] for r in results]),
            loss_last=mean([r.step_losses[-1] for r in results]),
            energy_first=mean([r.step_energies[0] for r in results]),
            energy_last=mean([r.step_energies[-1] for r in results]),
            # unroll folds the loss check into `nonfinite`; the trainer tells the two apart.
            nonfinite_grad_input=torch.stack([r.nonfinite for r in results]).any(),
            flops=flops,
        )


class TransformerPPStep:
    """A micro-batch of the Transformer++ baseline: next-token cross-entropy, first order."""

    def __init__(self, model: nn.Module, cfg: RunConfig, pm=None):
        self.model, self.cfg, self.pm = model, cfg, pm

    def __call__(self, micro_batches: List[torch.Tensor], autocast) -> StepStats:
        n = len(micro_batches)
        losses = []
        flops = 0.0
        for i, ids in enumerate(micro_batches):
            with autocast():
                logits = self.model(ids[:, :-1])
            loss = self.model.vocab_ops.cross_entropy(logits, ids[:, 1:])  # vocab-parallel under tp
            if self.pm is None:
                (loss / n).backward()
            else:
                self.pm.backward(loss / n, sync=i == n - 1)
            losses.append(loss.detach())
            flops += flops_mod.transformer_pp_step_flops(self.model.cfg, ids.shape[1] - 1, ids.shape[0])
        loss = torch.stack(losses).mean()
        return StepStats(loss, loss, loss, None, None, torch.zeros((), dtype=torch.bool), flops)


# -- helpers --------------------------------------------------------------------------------
def select_device(cfg: RunConfig) -> torch.device:
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' requested but no CUDA device is available; use cpu or auto")
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(want)


def select_precision(cfg: RunConfig, device: torch.device) -> torch.dtype:
    """bf16 autocast only on a GPU that supports it; fp32 everywhere else."""
    bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if cfg.train.precision == "bf16" and not bf16_ok:
        raise ConfigError("train.precision: 'bf16' needs a CUDA GPU with bf16 support; use fp32 or auto")
    if cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and bf16_ok):
        return torch.bfloat16
    return torch.float32


def _git_revision() -> Optional[str]:
    repo = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if rev.returncode:
        return None
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment_info(device: torch.device) -> Dict[str, Any]:
    """What env.json records: code revision, package versions, host and device."""
    versions = {}
    for pkg in ("ebt-pretrain", "torch", "omegaconf", "safetensors", "tokenizers", "webdataset", "numpy"):
        try:
            versions[pkg] = importlib_metadata.version(pkg)
        except importlib_metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "git_revision": _git_revision(),
        "packages": versions,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hosts": [socket.gethostname()],
        "world_size": 1,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads",
        "argv": sys.argv,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Drops records past `last_step` (written by a run that died after its last checkpoint)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by the kill
    path.write_text("".join(line + "\n" for line in keep))


# -- the trainer ----------------------------------------------------------------------------
class Trainer:
    """Builds everything a run needs from a validated RunConfig; `run()` trains to max_steps.

    Nothing is written to `run_dir` before the data, the model and any checkpoint to resume
    from have been checked, so a bad input leaves the disk as it was."""

    def __init__(self, cfg: RunConfig, log: Callable[[str], None] = print) -> None:
        self.device = select_device(cfg)
        # Multi-process runs (torchrun, `ebt launch`): the process group and the parallel layout.
        self.dims = None
        if distributed.requested(cfg):
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            self.dims = distributed.setup(cfg, self.device)
        self.rank = self.dims.rank if self.dims is not None else 0
        self.log = log if self.rank == 0 else (lambda _msg: None)
        # Thinking with a large step size drives candidate probabilities deep into the subnormal
        # range, where CPU arithmetic is 10-100x slower; flushing them to zero keeps steps fast.
        torch.set_flush_denormal(True)
        self.dtype = select_precision(cfg, self.device)
        world = self.dims.world_size if self.dims is not None else 1
        self.prepared = prepare_dataset(cfg.data, rank=self.rank, world_size=world)
        vocab = self.prepared.vocab_size
        if cfg.model.vocab_size is not None and cfg.model.vocab_size < vocab:
            raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} < the tokenizer's {vocab}; use null")
        if cfg.model.vocab_size is None:
            cfg = replace(cfg, model=replace(cfg.model, vocab_size=vocab))
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        tc = cfg.train

        torch.manual_seed(tc.seed)
        self.model = build_model(cfg.model).to(self.device)
        self.is_ebt = cfg.model.arch == "ebt"
        self.pm = None
        self._resume_meta: Optional[Dict[str, Any]] = None
        if self.dims is not None:
            from parallel.apply import parallelize
            from parallel.dims import check_model_fits

            check_model_fits(self.dims, cfg.model.num_heads, cfg.model.vocab_size, cfg.model.ffn_hidden)
            path = latest_checkpoint(self.run_dir)
            if path is not None:  # the full weights go in before parallelize slices them
                self._resume_meta = distributed.load_full_model(path, self.model)
            clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else None
            self.pm = parallelize(self.model, self.dims, cfg.parallel, lambda m: build_optimizer(m, cfg), clip=clip)
            self.model = self.pm.module
            self.optimizer = self.pm.optimizer
        else:
            self.optimizer = build_optimizer(self.model, cfg)
        self.generator = torch.Generator().manual_seed(tc.seed)
        th = cfg.thinking
        self.replay = ReplayBuffer(th.replay_size) if self.is_ebt and th.replay_size > 0 else None
        self.step_fn = (
            EBTStep(self.model, cfg, self.generator, self.replay, self.pm) if self.is_ebt
            else TransformerPPStep(self.model, cfg, self.pm)
        )
        dp_rank, dp = (self.dims.dp_rank, self.dims.dp) if self.dims is not None else (0, 1)
        self.train_loader = make_loader(
            self.prepared, "train", global_batch_size=tc.global_batch_size, rank=dp_rank, world_size=dp,
            seed=cfg.data.seed, num_workers=cfg.data.num_workers, on_bad_shard=cfg.data.on_bad_shard,
        )
        self.probe_ids = probe_mod.probe_ids(vocab, cfg.data.seq_len)
        self.step = 0
        self.skipped = 0
        self.consecutive_nonfinite = 0
        self.last_eval: Optional[Dict[str, Any]] = None
        self.resumed_from: Optional[Path] = None
        self.peak_flops = tc.peak_flops or flops_mod.peak_flops_estimate(self.device, self.dtype)
        self._resume()

    @property
    def layout(self) -> Dict[str, int]:
        p = self.cfg.parallel
        return {"tp": p.tp, "dp": p.dp, "zero_stage": p.zero_stage}

    # -- state ---------------------------------------------------------------------------
    def autocast(self):
        if self.dtype == torch.bfloat16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def probe_values(self) -> List[List[float]]:
        """Energies (EBT) or target log-probabilities (Transformer++) on the fixed probe batch."""
        return probe_mod.probe_values(self.model, self.probe_ids)

    def _trainer_state(self) -> Dict[str, Any]:
        return {
            "step": self.step,
            "skipped": self.skipped,
            "consecutive_nonfinite": self.consecutive_nonfinite,
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            "replay": self.replay.state_dict() if self.replay is not None else None,
        }

    def save(self, reason: str = "periodic") -> Path:
        """Checkpoints the current state (see pretrain.checkpoint for the layout)."""
        meta = {
            "reason": reason,
            "world_size": self.dims.world_size if self.dims is not None else 1,
            "layout": self.layout,
            "config": to_container(self.cfg),
            "data": self.train_loader.state_dict(),
            "probe": {"ids": self.probe_ids.tolist(), "values": self.probe_values()},  # collective under tp
            "skipped_steps": self.skipped,
        }
        if self.pm is not None:
            return distributed.save(self.pm, self.run_dir, self.step, self._trainer_state(), meta,
                                    self.cfg.train.keep_last_k)
        path = save_checkpoint(self.run_dir, self.step, model=self.model, optimizer=self.optimizer,
                               trainer_state=self._trainer_state(), metadata=meta, keep_last_k=self.cfg.train.keep_last_k)
        return path

    def _resume(self) -> None:
        path = latest_checkpoint(self.run_dir)
        if path is None:
            return
        own_state = True
        if self.pm is None and not is_sharded(read_metadata(path)):
            meta, state = load_checkpoint(path, model=self.model, optimizer=self.optimizer)
        elif self.pm is None:  # a multi-process run's checkpoint, resumed by one process
            meta = distributed.load_full_model(path, self.model)
            distributed.load_optimizer_unsharded(self.optimizer, self.model, path)
            state, own_state = distributed.load_trainer_state(path, meta, 0, False)
        else:  # weights were loaded before parallelize; the optimizer is resliced for this layout
            meta = self._resume_meta
            distributed.load_optimizer(self.pm, path, meta)
            state, own_state = distributed.load_trainer_state(path, meta, self.rank, meta.get("layout") == self.layout)
        probe = meta.get("probe", {})
        if probe.get("ids") == self.probe_ids.tolist():
            saved, now = torch.tensor(probe["values"]), torch.tensor(self.probe_values())
            if not torch.allclose(saved, now, rtol=1e-3, atol=1e-3):
                raise CheckpointError(
                    f"{path / 'model.safetensors'}: probe energies after loading differ from the saved ones "
                    f"(max diff {(saved - now).abs().max().item():.3g}): corrupt weights or a different model code"
                )
        try:
            self.train_loader.load_state_dict(meta["data"])
            self.generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            if self.device.type == "cuda" and state.get("cuda_rng"):
                torch.cuda.set_rng_state_all(state["cuda_rng"])
            if self.replay is not None and state.get("replay") is not None:
                if not own_state and state["replay"].get("size", 0):
                    raise CheckpointError(
                        f"{path}: the replay buffer is per rank and this run's layout {self.layout} differs from the "
                        f"checkpoint's {meta.get('layout')}: resume with the same layout"
                    )
                self.replay.load_state_dict(state["replay"])
            self.step = int(state["step"])
            self.skipped = int(state["skipped"])
            self.consecutive_nonfinite = int(state["consecutive_nonfinite"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{path / 'trainer_state.pt'}: unusable trainer state ({type(err).__name__}: {err})") from None
        self.resumed_from = path

    # -- evaluation ----------------------------------------------------------------------
    def evaluate(self) -> Dict[str, Any]:
        """Validation CE (and, for the EBT, CE and energy after each thinking step up to
        `thinking.eval_steps`, and the System-2 gain: CE after thinking.num_steps minus CE after
        thinking.eval_steps). `val_ce` is the CE after the most steps the model was trained with."""
        th, tc = self.cfg.thinking, self.cfg.train
        trained = th.num_steps_max or th.num_steps  # the most steps the model was trained to take
        steps = max(th.eval_steps, trained)
        loader = make_loader(self.prepared, "val", global_batch_size=tc.global_batch_size, rank=0, world_size=1,
                             seed=self.cfg.data.seed, num_workers=0, on_bad_shard=self.cfg.data.on_bad_shard)
        gen = torch.Generator().manual_seed(tc.seed + EVAL_SEED_OFFSET)
        ce_sum, energy_sum, batches = None, None, 0
        self.model.eval()
        for batch in islice(iter(loader), tc.eval_batches):
            ids = batch.to(self.device)
            ctx, tgt = ids[:, :-1], ids[:, 1:]
            with self.autocast():
                if self.is_ebt:
                    r = think(self.model, ctx, steps, generator=gen, targets=tgt, noise_std=th.eval_noise_std,
                              init=th.init, init_std=th.init_std, grad_wrt=th.grad_wrt)
                    ce = torch.tensor(r.ce_per_step, dtype=torch.float64)
                    energy = r.energies.double().mean(dim=(1, 2)).cpu()
                else:
                    with torch.no_grad():
                        ce = torch.tensor([cross_entropy(self.model(ctx), tgt).item()], dtype=torch.float64)
                    energy = None
            ce_sum = ce if ce_sum is None else ce_sum + ce
            if energy is not None:
                energy_sum = energy if energy_sum is None else energy_sum + energy
            batches += 1
        self.model.train()
        if batches == 0:
            raise ConfigError("data.val_fraction: the validation split has no full batch; raise it or lower train.global_batch_size")
        ce_steps = (ce_sum / batches).tolist()
        record: Dict[str, Any] = {"step": self.step, "val_batches": batches,
                                  "unigram_entropy": float(self.prepared.unigram_entropy)}
        if self.is_ebt:
            record.update(
                val_ce=ce_steps[trained],
                val_ce_per_step=ce_steps,
                val_energy_per_step=(energy_sum / batches).tolist(),
                trained_steps=trained,
                eval_steps=th.eval_steps,
                val_ce_first_step=ce_steps[1],
                val_ce_last_step=ce_steps[th.eval_steps],
                # System-2 gain: thinking for eval_steps instead of the recipe's thinking.num_steps
                system2_gain=ce_steps[th.num_steps] - ce_steps[th.eval_steps],
            )
        else:
            record.update(val_ce=ce_steps[0])
        return record

    # -- the loop ------------------------------------------------------------------------
    def _prepare_run_dir(self) -> None:
        if self.rank != 0:  # rank 0 writes the run folder's files
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))
        (self.run_dir / "env.json").write_text(json.dumps(environment_info(self.device), indent=1))
        for name in ("metrics.jsonl", "eval.jsonl"):
            _truncate_jsonl(self.run_dir / name, self.step)

    def run(self) -> Dict[str, Any]:
        """Trains from the current step to `train.max_steps`; returns the run's summary."""
        from torch.utils.tensorboard import SummaryWriter

        cfg, tc = self.cfg, self.cfg.train
        self._prepare_run_dir()
        if self.resumed_from is not None:
            self.log(f"resuming from {self.resumed_from} (step {self.step})")
        n_params = sum(p.numel() for p in self.model.parameters())
        self.log(
            f"{cfg.model.arch}: {n_params / 1e6:.2f}M parameters, vocab {cfg.model.vocab_size}, "
            f"seq {cfg.data.seq_len}, batch {tc.global_batch_size}, {tc.max_steps} steps, device {self.device}, "
            f"{str(self.dtype).replace('torch.', '')}, unigram entropy {self.prepared.unigram_entropy:.3f} nats"
        )
        main = self.rank == 0
        tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.step if self.step else None) if main \
            else _NullWriter()
        metrics = open(self.run_dir / "metrics.jsonl" if main else os.devnull, "a")
        evals = open(self.run_dir / "eval.jsonl" if main else os.devnull, "a")
        tokens_per_step = tc.global_batch_size * cfg.data.seq_len
        started = time.time()
        window_start, window_steps, window_flops, train_seconds = time.time(), 0, 0.0, 0.0
        steps_this_run = 0
        batches: Iterator[torch.Tensor] = iter(self.train_loader)
        try:
            while self.step < tc.max_steps:
                batch = next(batches).to(self.device)
                lr = lr_at(self.step, cfg)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr * group["lr_scale"]
                stats = self.step_fn(list(batch.tensor_split(tc.grad_accum)), self.autocast)
                clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
                if self.pm is None:
                    params = [p for g in self.optimizer.param_groups for p in g["params"]]
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
                    bad_loss, bad_input = not bool(torch.isfinite(stats.loss)), bool(stats.nonfinite_grad_input)
                else:  # every rank decides alike: flags and logged values are reduced over the world
                    stats = self._reduce_stats(stats)
                    bad_loss = not bool(torch.isfinite(stats.loss))
                    bad_input = bool(stats.nonfinite_grad_input)
                    grad_norm = torch.tensor(float("nan"))
                reason = None
                if bad_loss:
                    reason = "non-finite loss"
                elif bad_input:
                    reason = "non-finite dE/dy"
                elif self.pm is None and not bool(torch.isfinite(grad_norm)):
                    reason = "non-finite gradient norm"
                if reason is None:
                    if self.pm is None:
                        self.optimizer.step()
                    else:
                        grad_norm = self.pm.clip_and_step(clip)  # global norm over the unsharded model
                    self.consecutive_nonfinite = 0
                else:
                    self.skipped += 1
                    self.consecutive_nonfinite += 1
                if self.pm is None:
                    self.optimizer.zero_grad(set_to_none=True)
                else:
                    self.pm.zero_grad()
                self.step += 1
                steps_this_run += 1
                window_steps += 1
                window_flops += stats.flops
                if reason is not None:
                    self.log(f"step {self.step}: skipped ({reason}); {self.consecutive_nonfinite} in a row, "
                             f"{self.skipped} in total")
                    metrics.write(json.dumps({"step": self.step, "loss": None, "skipped": reason}) + "\n")
                    metrics.flush()
                    if self.consecutive_nonfinite >= tc.max_consecutive_nonfinite:
                        path = self.save(reason="nonfinite")
                        raise NonFiniteError(
                            f"{self.consecutive_nonfinite} consecutive steps with {reason} (train.max_consecutive_nonfinite="
                            f"{tc.max_consecutive_nonfinite}); last good state saved to {path}"
                        )

                if reason is None and (self.step % tc.log_every == 0 or self.step == tc.max_steps):
                    elapsed = time.time() - window_start
                    train_seconds += elapsed
                    record = self._progress(stats, grad_norm, lr, elapsed, window_steps, window_flops,
                                            tokens_per_step, steps_this_run, train_seconds)
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                    for key, value in record.items():
                        if isinstance(value, (int, float)) and key != "step" and value is not None:
                            tb.add_scalar(f"train/{key}", value, self.step)
                    window_start, window_steps, window_flops = time.time(), 0, 0.0

                at_end = self.step == tc.max_steps
                if (tc.eval_every and self.step % tc.eval_every == 0) or at_end:
                    pause = time.time()
                    self.last_eval = self.evaluate()
                    evals.write(json.dumps(self.last_eval) + "\n")
                    evals.flush()
                    self._log_eval(self.last_eval, tb)
                    window_start += time.time() - pause
                if (tc.checkpoint_every and self.step % tc.checkpoint_every == 0) or at_end:
                    pause = time.time()
                    path = self.save()
                    self.log(f"checkpoint {path}")
                    window_start += time.time() - pause
                if stop_requested(self.device):  # a scheduler's warning signal (launchers.preemption)
                    path = self.save(reason="preempted")
                    self.log(f"preempted: checkpoint {path}; exiting to be requeued")
                    raise Preempted(self.step, path)
        finally:
            metrics.close()
            evals.close()
            tb.close()
        summary = {
            "run_dir": str(self.run_dir),
            "step": self.step,
            "steps_this_run": steps_this_run,
            "skipped_steps": self.skipped,
            "wall_seconds": round(time.time() - started, 1),
            "unigram_entropy": float(self.prepared.unigram_entropy),
            "eval": self.last_eval,
        }
        if main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary

    def _reduce_stats(self, stats: StepStats) -> StepStats:
        """Mean over ranks of the logged values (tp ranks hold identical ones; dp ranks differ),
        and whether any rank saw a non-finite dE/dy (its 0/1 flag has a mean > 0): one all-reduce."""
        fields = ["loss", "loss_first", "loss_last"] + (["energy_first", "energy_last"] if stats.energy_first is not None else [])
        local = [getattr(stats, f).float().cpu() for f in fields] + [stats.nonfinite_grad_input.float().cpu()]
        values = distributed.all_reduce_mean(torch.stack(local))
        return replace(stats, nonfinite_grad_input=values[-1] > 0, **{f: values[i] for i, f in enumerate(fields)})

    def _progress(self, stats: StepStats, grad_norm, lr, elapsed, window_steps, window_flops,
                  tokens_per_step, steps_this_run, train_seconds) -> Dict[str, Any]:
        tc = self.cfg.train
        step_time = elapsed / max(1, window_steps)
        record: Dict[str, Any] = {
            "step": self.step,
            "loss": float(stats.loss),
            "loss_first": float(stats.loss_first),
            "loss_last": float(stats.loss_last),
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens_per_s": tokens_per_step * window_steps / max(elapsed, 1e-9),
            "mfu": flops_mod.mfu(window_flops, elapsed, self.peak_flops),
            "memory_gb": peak_memory_gb(self.device),
            "skipped_steps": self.skipped,
            "step_seconds": step_time,
        }
        if stats.energy_first is not None:
            record["energy_first"] = float(stats.energy_first)
            record["energy_last"] = float(stats.energy_last)
            record["energy_gap"] = record["energy_first"] - record["energy_last"]
            record["alpha"] = float(self.model.effective_step_size().detach())
        eta = (tc.max_steps - self.step) * (train_seconds / max(1, steps_this_run))
        line = (f"step {self.step}/{tc.max_steps} | loss {record['loss']:.4f}"
                f" (first {record['loss_first']:.4f} last {record['loss_last']:.4f})")
        if "energy_gap" in record:
            line += f" | E gap {record['energy_gap']:.3f} | alpha {record['alpha']:.3g}"
        line += (f" | lr {lr:.2e} | {record['tokens_per_s']:,.0f} tok/s | MFU {100 * record['mfu']:.2f}%"
                 f" | mem {record['memory_gb']:.2f} GB | ETA {_format_eta(eta)}")
        self.log(line)
        return record

    def _log_eval(self, record: Dict[str, Any], tb) -> None:
        if "val_ce_per_step" in record:
            ces = " ".join(f"{c:.3f}" for c in record["val_ce_per_step"][1:])
            energies = " ".join(f"{e:.3f}" for e in record["val_energy_per_step"][1:])
            self.log(f"eval step {record['step']}: val CE {record['val_ce']:.4f} after {record['trained_steps']} steps"
                     f" | CE per thinking step {ces} | energy {energies}"
                     f" | System-2 gain ({record['eval_steps']} steps) {record['system2_gain']:+.4f}"
                     f" | unigram entropy {record['unigram_entropy']:.3f}")
            for k, ce in enumerate(record["val_ce_per_step"]):
                tb.add_scalar(f"eval/ce_step{k}", ce, record["step"])
            for k, e in enumerate(record["val_energy_per_step"]):
                tb.add_scalar(f"eval/energy_step{k}", e, record["step"])
            tb.add_scalar("eval/system2_gain", record["system2_gain"], record["step"])
        else:
            self.log(f"eval step {record['step']}: val CE {record['val_ce']:.4f}"
                     f" | unigram entropy {record['unigram_entropy']:.3f}")
        tb.add_scalar("eval/val_ce", record["val_ce"], record["step"])


class _NullWriter:
    """TensorBoard stand-in on ranks other than 0."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def train(cfg: RunConfig, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Builds a Trainer (resuming when run_dir has checkpoints) and runs it; a multi-process run
    destroys its process group on the way out, whatever happens."""
    try:
        trainer = Trainer(cfg, log=log)
        if trainer.step >= cfg.train.max_steps:
            trainer.log(f"{cfg.run_dir}: already at step {trainer.step} = train.max_steps; nothing to do "
                        "(raise train.max_steps to continue, or use a new run_dir)")
        return trainer.run()
    finally:
        distributed.teardown()
