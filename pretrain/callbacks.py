"""Cross-cutting work of a training run, as callbacks the trainer loop calls at fixed points:
console progress, metrics JSONL, TensorBoard, evaluation, checkpointing, env.json and the
non-finite guard. Preemption is a callback too, but the entry point injects it (launchers
own scheduler signals; pretrain never imports launchers).

Hooks, in the order the loop calls them:
  on_start(trainer)                      after resume, before the first step
  before_optimizer_step(trainer, stats)  -> a reason to skip the step, or None
  on_step_end(trainer, event)            after every optimizer step (skipped or not)
  on_end(trainer, summary)               after the last step
  on_close(trainer)                      always (a finally): close files
Only rank 0 writes files; every rank runs every callback (evaluation and checkpoints are
collective under tensor parallelism).
"""
from __future__ import annotations

import json
import os
import platform
import resource
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import torch
import torch.distributed as dist

from . import flops as flops_mod

if TYPE_CHECKING:
    from .trainer import Trainer
    from .train_module import StepStats


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a NaN/Inf loss, dE/dy or gradient; the run stopped."""


@dataclass
class StepEvent:
    """What the loop reports after each optimizer step."""

    step: int
    """Optimizer steps done (1-based after the step)."""
    stats: "StepStats"
    lr: float
    grad_norm: float
    skipped: Optional[str]
    """The reason the step was skipped, or None."""
    extra: Dict[str, Any] = field(default_factory=dict)


class Callback:
    def on_start(self, trainer: "Trainer") -> None:
        pass

    def before_optimizer_step(self, trainer: "Trainer", stats: "StepStats") -> Optional[str]:
        return None

    def on_step_end(self, trainer: "Trainer", event: StepEvent) -> None:
        pass

    def on_end(self, trainer: "Trainer", summary: Dict[str, Any]) -> None:
        pass

    def on_close(self, trainer: "Trainer") -> None:
        pass


# -- the non-finite guard ---------------------------------------------------------------------
class NonFiniteGuard(Callback):
    """Skips a step whose loss, dE/dy or gradients are NaN/Inf on ANY rank, in every layout:
    the decision comes from one all-reduce (pretrain.trainer folds the flags into the
    logged-values reduction), so all ranks agree; the optimizer never runs on such a step
    (under ZeRO the check is before DeepSpeed's step), so weights and optimizer state are
    untouched. Stops the run after `train.max_consecutive_nonfinite` skips in a row."""

    def before_optimizer_step(self, trainer, stats) -> Optional[str]:
        if not bool(torch.isfinite(stats.loss)):
            return "non-finite loss"
        if bool(stats.nonfinite_grad_input):
            return "non-finite dE/dy"
        if not trainer.grads_finite:
            return "non-finite gradient"
        return None

    def on_step_end(self, trainer, event) -> None:
        if event.skipped is None:
            return
        tc = trainer.cfg.train
        trainer.log(f"step {event.step}: skipped ({event.skipped}); {trainer.consecutive_nonfinite} in a row, "
                    f"{trainer.skipped} in total")
        if trainer.consecutive_nonfinite >= tc.max_consecutive_nonfinite:
            path = trainer.save(reason="nonfinite")
            raise NonFiniteError(
                f"{trainer.consecutive_nonfinite} consecutive steps with {event.skipped} "
                f"(train.max_consecutive_nonfinite={tc.max_consecutive_nonfinite}); last good state saved to {path}"
            )


# -- progress, JSONL, TensorBoard ---------------------------------------------------------------
def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def truncate_jsonl(path: Path, last_step: int) -> None:
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


class Progress(Callback):
    """Every `train.log_every` steps (and the last): one progress line and one metrics record,
    handed to the sinks (console via trainer.log, metrics.jsonl, TensorBoard). tokens/s counts
    the whole world; `tokens_per_s_per_device` and MFU are per device (this rank's FLOPs over
    its own peak; under tp a rank computes 1/tp of the model)."""

    def __init__(self) -> None:
        self.window_start = time.time()
        self.window_steps = 0
        self.window_flops = 0.0
        self.train_seconds = 0.0
        self.steps_this_run = 0
        self.compile_seconds = 0.0

    def on_start(self, trainer) -> None:
        self.window_start = time.time()

    def pause(self, seconds: float) -> None:
        """Time spent in evaluation/checkpoints is not training time."""
        self.window_start += seconds

    def on_step_end(self, trainer, event) -> None:
        tc, cfg = trainer.cfg.train, trainer.cfg
        self.steps_this_run += 1
        self.window_steps += 1
        self.window_flops += event.stats.flops
        self.compile_seconds += event.stats.compile_seconds
        if event.skipped is not None:
            trainer.emit_metrics({"step": event.step, "loss": None, "skipped": event.skipped})
            return
        if not (event.step % tc.log_every == 0 or event.step == tc.max_steps):
            return
        elapsed = time.time() - self.window_start
        self.train_seconds += elapsed
        stats = event.stats
        tokens = tc.global_batch_size * cfg.data.seq_len * self.window_steps
        world = trainer.dims.world_size
        record: Dict[str, Any] = {
            "step": event.step,
            "loss": float(stats.loss),
            "loss_first": float(stats.loss_first),
            "loss_last": float(stats.loss_last),
            "lr": event.lr,
            "grad_norm": float(event.grad_norm),
            "tokens_per_s": tokens / max(elapsed, 1e-9),
            "tokens_per_s_per_device": tokens / world / max(elapsed, 1e-9),
            "mfu": flops_mod.mfu(self.window_flops, elapsed, trainer.peak_flops),
            "memory_gb": peak_memory_gb(trainer.device),
            "skipped_steps": trainer.skipped,
            "step_seconds": elapsed / max(1, self.window_steps),
        }
        if trainer.cfg.train.compile == "true":
            record["compile_seconds"] = self.compile_seconds
        if stats.energy_first is not None:
            record["energy_first"] = float(stats.energy_first)
            record["energy_last"] = float(stats.energy_last)
            record["energy_gap"] = record["energy_first"] - record["energy_last"]
            if getattr(trainer.model, "step_size", None) is not None:  # pipeline: stage 0 holds alpha (rank 0 logs)
                record["alpha"] = float(trainer.model.effective_step_size().detach())
        eta = (tc.max_steps - event.step) * (self.train_seconds / max(1, self.steps_this_run))
        line = (f"step {event.step}/{tc.max_steps} | loss {record['loss']:.4f}"
                f" (first {record['loss_first']:.4f} last {record['loss_last']:.4f})")
        if "energy_gap" in record:
            line += f" | E gap {record['energy_gap']:.3f}" + (f" | alpha {record['alpha']:.3g}" if "alpha" in record else "")
        line += (f" | lr {event.lr:.2e} | {record['tokens_per_s']:,.0f} tok/s | MFU {100 * record['mfu']:.2f}%"
                 f" | mem {record['memory_gb']:.2f} GB | ETA {format_eta(eta)}")
        if "compile_seconds" in record:
            line += f" | cold compile {record['compile_seconds']:.0f} s so far"
        trainer.log(line)
        trainer.emit_metrics(record)
        self.window_start, self.window_steps, self.window_flops = time.time(), 0, 0.0


class JsonlSink(Callback):
    """metrics.jsonl and eval.jsonl in the run folder (rank 0), truncated to the resumed step."""

    def __init__(self) -> None:
        self.files: Dict[str, Any] = {}

    def on_start(self, trainer) -> None:
        if trainer.rank != 0:
            return
        for name in ("metrics", "eval"):
            path = trainer.run_dir / f"{name}.jsonl"
            truncate_jsonl(path, trainer.step)
            self.files[name] = open(path, "a")

    def write(self, name: str, record: Dict[str, Any]) -> None:
        fh = self.files.get(name)
        if fh is not None:
            fh.write(json.dumps(record) + "\n")
            fh.flush()

    def on_close(self, trainer) -> None:
        for fh in self.files.values():
            fh.close()
        self.files = {}


class TensorBoardSink(Callback):
    """Scalars under train/* and eval/* (rank 0)."""

    def __init__(self) -> None:
        self.writer = None

    def on_start(self, trainer) -> None:
        if trainer.rank != 0:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(trainer.run_dir / "tensorboard"), purge_step=trainer.step or None)

    def scalars(self, prefix: str, record: Dict[str, Any], step: int) -> None:
        if self.writer is None:
            return
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                self.writer.add_scalar(f"{prefix}/{key}", value, step)
            elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
                for k, v in enumerate(value):
                    self.writer.add_scalar(f"{prefix}/{key}/{k}", v, step)

    def on_close(self, trainer) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbSinkCallback(Callback):
    """Weights & Biases (`train.wandb`: disabled | offline | online; pretrain/sinks.py), rank 0."""

    def __init__(self) -> None:
        self.sink = None

    def on_start(self, trainer) -> None:
        from .sinks import open_sink

        self.sink = open_sink(trainer.cfg, trainer.rank == 0)

    def write(self, prefix: str, record: Dict[str, Any]) -> None:
        from .sinks import flatten

        if self.sink is not None:
            self.sink.log_metrics(record["step"], flatten(prefix, record))

    def on_close(self, trainer) -> None:
        if self.sink is not None:
            self.sink.close()
            self.sink = None


# -- evaluation and checkpoints -------------------------------------------------------------------
class Evaluation(Callback):
    """Every `train.eval_every` steps and at the end: the train module's evaluation on the
    validation split, to eval.jsonl, TensorBoard and the console."""

    def on_step_end(self, trainer, event) -> None:
        tc = trainer.cfg.train
        if (tc.eval_every and event.step % tc.eval_every == 0) or event.step == tc.max_steps:
            started = time.time()
            record = trainer.evaluate()
            trainer.last_eval = record
            trainer.emit_eval(record)
            trainer.pause(time.time() - started)


class Checkpointing(Callback):
    """Every `train.checkpoint_every` steps and at the end (collective)."""

    def on_step_end(self, trainer, event) -> None:
        tc = trainer.cfg.train
        if (tc.checkpoint_every and event.step % tc.checkpoint_every == 0) or event.step == tc.max_steps:
            started = time.time()
            path = trainer.save()
            trainer.log(f"checkpoint {path}")
            trainer.pause(time.time() - started)


# -- env.json -------------------------------------------------------------------------------------
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


def environment_info(trainer) -> Dict[str, Any]:
    """What env.json records: code revision, package versions, the world (hosts, layout) and device.
    Collective: gathers every rank's host name."""
    versions = {}
    for pkg in ("ebt-pretrain", "torch", "omegaconf", "safetensors", "tokenizers", "webdataset", "numpy", "deepspeed"):
        try:
            versions[pkg] = importlib_metadata.version(pkg)
        except importlib_metadata.PackageNotFoundError:
            versions[pkg] = None
    dims = trainer.dims
    hosts: List[str] = [socket.gethostname()]
    if dims.world_size > 1:
        gathered: List[Any] = [None] * dims.world_size
        dist.all_gather_object(gathered, hosts[0])
        hosts = list(gathered)
    device = trainer.device
    return {
        "git_revision": _git_revision(),
        "packages": versions,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "world_size": dims.world_size,
        "layout": trainer.layout,
        "hosts": sorted(set(hosts)),
        "rank_hosts": hosts,
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads",
        "peak_flops_per_device": trainer.peak_flops,
        "argv": sys.argv,
        "pid": os.getpid(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


class EnvJson(Callback):
    def on_start(self, trainer) -> None:
        info = environment_info(trainer)  # every rank: the host gather is collective
        if trainer.rank == 0:
            (trainer.run_dir / "env.json").write_text(json.dumps(info, indent=1))


def default_callbacks() -> List[Callback]:
    """The callbacks every run has, in call order (the guard last: when it stops the run, the
    skipped step is already recorded)."""
    return [Progress(), JsonlSink(), TensorBoardSink(), WandbSinkCallback(), EnvJson(), Evaluation(), Checkpointing(),
            NonFiniteGuard()]
