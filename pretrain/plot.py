"""`ebt plot RUN_DIR`: PNG plots of a run from its metrics.jsonl and eval.jsonl.

training.png  training loss (first and last thinking step), validation CE, energy gap, lr
thinking.png  validation cross-entropy and energy after each thinking step, one line per
              evaluation (EBT runs only)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _records(path: Path) -> List[Dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(run_dir: str | Path, out: Optional[str | Path] = None) -> List[Path]:
    """Writes the PNGs of `run_dir` into `out` (default run_dir/plots); returns their paths."""
    run_dir = Path(run_dir)
    metrics = [r for r in _records(run_dir / "metrics.jsonl") if r.get("loss") is not None]
    evals = _records(run_dir / "eval.jsonl")
    if not metrics and not evals:
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl or eval.jsonl to plot (is it a run folder?)")
    out_dir = Path(out) if out is not None else run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [_training(metrics, evals, out_dir / "training.png", run_dir.name)]
    thinking = [e for e in evals if "val_ce_per_step" in e]
    if thinking:
        written.append(_thinking(thinking, out_dir / "thinking.png", run_dir.name))
    return written


def _training(metrics, evals, path: Path, title: str) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    steps = [m["step"] for m in metrics]
    ax = axes[0]
    if metrics and "energy_gap" in metrics[0]:
        ax.plot(steps, [m["loss_first"] for m in metrics], label="train CE, first thinking step", alpha=0.8)
        ax.plot(steps, [m["loss_last"] for m in metrics], label="train CE, last thinking step", alpha=0.8)
    else:
        ax.plot(steps, [m["loss"] for m in metrics], label="train CE")
    if evals:
        ax.plot([e["step"] for e in evals], [e["val_ce"] for e in evals], "o-", label="validation CE")
        ax.axhline(evals[-1]["unigram_entropy"], color="gray", ls="--", label="unigram entropy")
    ax.set(xlabel="step", ylabel="cross-entropy (nats)", title=f"{title}: loss")
    losses = [m["loss"] for m in metrics]
    if losses:  # the first steps of an EBT can be far above the rest; keep the useful range visible
        ax.set_ylim(top=max(sorted(losses)[len(losses) // 2] * 1.6, min(losses) + 1))
    ax.legend(fontsize=8)
    ax = axes[1]
    if metrics and "energy_gap" in metrics[0]:
        ax.plot(steps, [m["energy_gap"] for m in metrics])
        ax.set(xlabel="step", ylabel="energy first - last step", title="energy gap over thinking")
    else:
        ax.plot(steps, [m["grad_norm"] for m in metrics])
        ax.set(xlabel="step", ylabel="gradient norm", title="gradient norm")
    ax = axes[2]
    ax.plot(steps, [m["lr"] for m in metrics])
    ax.set(xlabel="step", ylabel="learning rate", title="schedule")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _thinking(evals, path: Path, title: str) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    cmap = plt.get_cmap("viridis")
    for i, e in enumerate(evals):
        color = cmap(i / max(1, len(evals) - 1))
        ks = list(range(len(e["val_ce_per_step"])))
        # index 0 is the initial noise candidate, whose CE dwarfs the rest: start at step 1
        axes[0].plot(ks[1:], e["val_ce_per_step"][1:], "o-", color=color, label=f"step {e['step']}")
        axes[1].plot(ks, e["val_energy_per_step"], "o-", color=color, label=f"step {e['step']}")
    trained = evals[-1]["trained_steps"]
    for ax in axes:
        ax.axvline(trained, color="gray", ls=":", label=f"trained steps ({trained})")
        ax.set_xlabel("thinking step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set(ylabel="validation cross-entropy (nats)", title=f"{title}: CE after each thinking step")
    axes[1].set(ylabel="mean energy", title="energy after each thinking step (0 = initial)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
