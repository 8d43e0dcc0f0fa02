"""Metric sinks beside the run folder's metrics.jsonl/eval.jsonl and TensorBoard: today the
optional Weights & Biases logger (`train.wandb=offline|online`).

The interface the trainer calls is two methods, so a sink is easy to wrap in a callback:

    sink = open_sink(cfg, main=rank == 0)
    sink.log_metrics(step, {"train/loss": 1.23, ...})   # flat name -> number
    sink.close()

`offline` needs no network: W&B writes the run under `<run_dir>/wandb/` (sync it later with
`wandb sync <run_dir>/wandb/offline-run-*`). A resumed run keeps its W&B run id (stored in
`<run_dir>/wandb/run_id`).
"""
from __future__ import annotations

import math
import os
import secrets
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Protocol

from .config import ConfigError, RunConfig, to_container


class MetricSink(Protocol):
    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


class NullSink:
    """No sink configured (or not rank 0)."""

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class WandbSink:
    """One W&B run per run folder; numbers only (None and non-finite values are dropped)."""

    def __init__(self, cfg: RunConfig) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError(f"train.wandb={cfg.train.wandb!r} needs W&B: pip install 'ebt-pretrain[wandb]'") from None
        folder = Path(cfg.run_dir) / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / "run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        self._run = wandb.init(
            project=cfg.train.wandb_project, name=Path(cfg.run_dir).name, id=run_id, resume="allow",
            dir=str(Path(cfg.run_dir).resolve()), mode=cfg.train.wandb, config=to_container(cfg),
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
        )

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        clean: Dict[str, Any] = {k: float(v) for k, v in metrics.items()
                                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if clean:
            self._run.log(clean, step=step)

    def close(self) -> None:
        self._run.finish()


def open_sink(cfg: RunConfig, main: bool) -> MetricSink:
    """The configured extra sink on rank 0 (W&B), else a NullSink."""
    if not main or cfg.train.wandb == "disabled":
        return NullSink()
    os.environ.setdefault("WANDB_SILENT", "true")
    return WandbSink(cfg)


def flatten(prefix: str, record: Mapping[str, Any]) -> Dict[str, float]:
    """`{prefix/key: number}` for a metrics record; a list of numbers (per thinking step)
    becomes `prefix/key_0`, `prefix/key_1`, ...; `step` and non-numbers are left out."""
    out: Dict[str, float] = {}
    for key, value in record.items():
        if key == "step":
            continue
        items = enumerate(value) if isinstance(value, (list, tuple)) else [(None, value)]
        for i, v in items:
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{prefix}/{key}" + ("" if i is None else f"_{i}")] = v
    return out
