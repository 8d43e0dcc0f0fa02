"""`ebt sweep SWEEP.yaml`: a scaling study. A grid of runs (model sizes x token budgets x model
families, e.g. EBT and Transformer++), trained one after another on this machine or submitted
through the Slurm / Ray launchers (`launchers/`), then a summary that fits power laws

    L(X) = a * X^(-alpha)       (least squares on log L vs log X, per family)

of the final validation loss against non-embedding parameters N (runs at the largest token
budget), training FLOPs C (all runs; counted as in `pretrain.flops`) and training tokens D (runs
of the largest size). It prints the exponents alpha with their standard errors, the EBT /
Transformer++ scaling-rate ratio alpha_EBT / alpha_T++ with its uncertainty (delta method from
the fits' standard errors, and a bootstrap over runs), and draws the curves.

Resumable: a run whose `summary.json` reports the budgeted step count is finished and never
rerun; an interrupted run resumes from its last checkpoint (the trainer resumes any run folder
holding checkpoints). The sweep file:

    out_dir: runs/sweeps/NAME        # one folder per run below it: FAMILY-SIZE-TOKENS
    experiment: default              # base experiment of every run (name or YAML path)
    overrides: [key=value, ...]      # for every run
    families: {ebt: [...], transformerpp: [model.arch=transformer++]}   # overrides per family
    sizes: {s: [model.dim=32, ...], m: [...]}                           # overrides per size
    tokens: [65536, 131072]          # training tokens per run: max_steps = tokens / (batch x seq_len)
    launcher: {backend: local}       # or {backend: slurm|ray, config: NAME, overrides: [...]}
    bootstrap: 1000                  # bootstrap resamples for the ratio's interval
"""
from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from pretrain.config import ConfigError

SWEEP_KEYS = ("out_dir", "experiment", "overrides", "families", "sizes", "tokens", "launcher", "bootstrap")
LAUNCHER_KEYS = ("backend", "config", "overrides")
BACKENDS = ("local", "slurm", "ray")
EMBEDDING_PARAMS = ("tok_embeddings.weight", "cand_embed.weight", "lm_head.weight")
"""Vocabulary-sized matrices: left out of N, as in the scaling-law literature (at tiny widths
they would dominate the count and hide the body's size)."""


class SweepError(ConfigError):
    """A sweep file that cannot be run; the message is one line naming the key."""


# -- the sweep file ----------------------------------------------------------------------------
@dataclass
class RunSpec:
    name: str
    family: str
    size: str
    tokens: int
    overrides: List[str]
    run_dir: Path
    max_steps: int = 0
    arch: str = ""


@dataclass
class Sweep:
    path: Path
    out_dir: Path
    experiment: str
    runs: List[RunSpec]
    backend: str = "local"
    launch_config: Optional[str] = None
    launch_overrides: List[str] = field(default_factory=list)
    bootstrap: int = 1000


def _str_list(value: Any, where: str) -> List[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise SweepError(f"{where}: must be a list of key=value strings, got {value!r}")
    return list(value)


def _named_lists(value: Any, where: str) -> Dict[str, List[str]]:
    if not isinstance(value, dict):
        raise SweepError(f"{where}: must be a mapping of name -> list of key=value overrides, got {value!r}")
    return {str(k): _str_list(v, f"{where}.{k}") for k, v in value.items()}


def load_sweep(path: str | Path) -> Sweep:
    """Reads and validates a sweep file; every run's config is loaded (and so validated) before
    anything trains. Errors are one-line SweepErrors naming the key."""
    import yaml

    from pretrain.config import load_config

    path = Path(path)
    if not path.is_file():
        raise SweepError(f"{path}: no such sweep file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise SweepError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: must be a mapping of sweep keys")
    unknown = sorted(set(raw) - set(SWEEP_KEYS))
    if unknown:
        raise SweepError(f"{path}: unknown sweep key {unknown[0]!r} (known: {', '.join(SWEEP_KEYS)})")
    for key in ("out_dir", "families", "sizes", "tokens"):
        if key not in raw:
            raise SweepError(f"{path}: {key}: missing")
    families = _named_lists(raw["families"], "families")
    sizes = _named_lists(raw["sizes"], "sizes")
    tokens = raw["tokens"]
    if not isinstance(tokens, list) or not all(isinstance(t, int) and t > 0 for t in tokens):
        raise SweepError(f"{path}: tokens: must be a list of positive integers, got {tokens!r}")
    if not families or not sizes or not tokens:
        empty = [k for k, v in (("families", families), ("sizes", sizes), ("tokens", tokens)) if not v]
        raise SweepError(f"{path}: empty grid: {', '.join(empty)} has no entry, so the sweep has no run")
    launcher = raw.get("launcher") or {"backend": "local"}
    if not isinstance(launcher, dict) or set(launcher) - set(LAUNCHER_KEYS):
        bad = sorted(set(launcher) - set(LAUNCHER_KEYS)) if isinstance(launcher, dict) else [repr(launcher)]
        raise SweepError(f"{path}: launcher: unknown key {bad[0]!r} (known: {', '.join(LAUNCHER_KEYS)})")
    backend = launcher.get("backend", "local")
    if backend not in BACKENDS:
        raise SweepError(f"{path}: launcher.backend: {backend!r} is not one of {BACKENDS}")
    bootstrap = raw.get("bootstrap", 1000)
    if not isinstance(bootstrap, int) or bootstrap < 0:
        raise SweepError(f"{path}: bootstrap: must be an integer >= 0, got {bootstrap!r}")
    experiment = str(raw.get("experiment", "default"))
    common = _str_list(raw.get("overrides"), "overrides")
    out_dir = Path(str(raw["out_dir"]))
    runs = []
    for family, f_over in families.items():
        for size, s_over in sizes.items():
            overrides = common + f_over + s_over
            # One load (and validation) per (family, size): a budget only sets train.max_steps,
            # whose one check (>= 1) is made here.
            try:
                cfg = load_config([experiment], overrides)
            except ConfigError as err:
                raise SweepError(f"{path}: run {family}-{size}-{tokens[0]}: {err}") from None
            per_step = cfg.train.global_batch_size * cfg.data.seq_len
            for budget in tokens:
                name = f"{family}-{size}-{budget}"
                steps = budget // per_step
                if steps < 1:
                    raise SweepError(f"{path}: tokens: {budget} is less than one step of {per_step} tokens "
                                     f"(train.global_batch_size x data.seq_len) for run {name}")
                spec = RunSpec(name, family, size, budget, overrides + [f"train.max_steps={steps}"],
                               out_dir / name, steps, cfg.model.arch)
                spec.overrides.append(f"run_dir={spec.run_dir}")
                runs.append(spec)
    return Sweep(path, out_dir, experiment, runs, backend, launcher.get("config"),
                 _str_list(launcher.get("overrides"), "launcher.overrides"), bootstrap)


# -- running ---------------------------------------------------------------------------------
def run_summary(run: RunSpec) -> Optional[Dict[str, Any]]:
    """The run's own summary.json if it finished its budget, else None."""
    path = run.run_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # torn by an interruption: the run resumes from its checkpoint
    if int(summary.get("step", 0)) < run.max_steps or not (summary.get("eval") or {}).get("val_ce"):
        return None
    return summary


def _train_local(run: RunSpec, experiment: str, log_dir: Path) -> None:
    """Trains one run in this process (a run folder with checkpoints resumes); its log lines go
    to log_dir/NAME.log. Ctrl-C stops it like `ebt pretrain` (the last checkpoint stays)."""
    from pretrain.config import load_config
    from pretrain.trainer import train

    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"{run.name}.log", "a") as out:
        def log(line: str) -> None:
            out.write(line + "\n")
            out.flush()

        train(load_config([experiment], run.overrides), log=log)


def _launch(run: RunSpec, sweep: Sweep, dry_run: bool) -> None:
    from .config import plan_launch

    # The run's experiment and overrides go to every rank; the launch config places the ranks.
    overrides = [f"experiment={sweep.experiment}", *sweep.launch_overrides, *run.overrides]
    plan = plan_launch(sweep.backend, sweep.launch_config, overrides)
    if sweep.backend == "slurm":
        from .slurm import launch_slurm

        launch_slurm(plan, dry_run=dry_run)
    else:
        from .ray import launch_ray

        if launch_ray(plan, dry_run=dry_run):
            raise SweepError(f"run {run.name}: the Ray launch failed")


def run_sweep(sweep: Sweep, *, dry_run: bool = False, log=print) -> List[RunSpec]:
    """Trains (or submits) every unfinished run; returns the runs this call started."""
    started = []
    for i, run in enumerate(sweep.runs, 1):
        tag = f"sweep [{i}/{len(sweep.runs)}] {run.name}"
        if run_summary(run) is not None:
            log(f"{tag}: finished, skipped")
            continue
        if sweep.backend == "local":
            if dry_run:
                log(f"{tag}: would run: ebt pretrain {sweep.experiment} {' '.join(run.overrides)}")
                continue
            log(f"{tag}: training {run.max_steps} steps ({run.tokens} tokens)")
            _train_local(run, sweep.experiment, sweep.out_dir / "logs")
        else:
            log(f"{tag}: {'would submit' if dry_run else 'submitting'} via {sweep.backend}")
            _launch(run, sweep, dry_run)
        started.append(run)
    return started


# -- measuring the runs ----------------------------------------------------------------------
def run_point(run: RunSpec) -> Dict[str, Any]:
    """N (non-embedding params), C (training FLOPs), D (tokens) and L (final val CE) of a finished run."""
    from pretrain.checkpoint import read_metadata
    from pretrain.export import resolve_checkpoint
    from pretrain.flops import ebt_step_flops, transformer_pp_step_flops
    from pretrain.model import ModelConfig
    from pretrain.thinking import ThinkingConfig

    summary = run_summary(run)
    checkpoint = resolve_checkpoint(run.run_dir)
    meta = read_metadata(checkpoint)
    cfg = meta["config"]
    from safetensors import safe_open

    shapes: Dict[str, Tuple[int, ...]] = {}
    for f in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(f), "pt") as handle:
            for key in handle.keys():
                shapes.setdefault(key, tuple(handle.get_slice(key).get_shape()))
    total = sum(math.prod(s) for k, s in shapes.items() if k != "step_size")
    non_embedding = sum(math.prod(s) for k, s in shapes.items() if k not in EMBEDDING_PARAMS and k != "step_size")
    model_cfg = dict(cfg["model"])
    model_cfg["vocab_size"] = model_cfg.get("vocab_size") or shapes["tok_embeddings.weight"][0]
    mc = ModelConfig(**model_cfg)
    batch, seq, steps = cfg["train"]["global_batch_size"], cfg["data"]["seq_len"], int(summary["step"])
    if mc.arch == "ebt":
        th = cfg["thinking"]
        rows = batch + int(round(th.get("replay_fraction", 0.0) * batch))
        lo, hi = th["num_steps"], th.get("num_steps_max") or th["num_steps"]
        thinking = ThinkingConfig(**{k: v for k, v in th.items() if k in {f.name for f in fields(ThinkingConfig)}})
        per_step = sum(ebt_step_flops(mc, seq, rows, k, thinking) for k in range(lo, hi + 1)) / (hi - lo + 1)
    else:
        per_step = transformer_pp_step_flops(mc, seq, batch)
    return dict(name=run.name, family=run.family, size=run.size, arch=mc.arch, params=total,
                non_embedding_params=non_embedding, flops=per_step * steps, tokens=batch * seq * steps,
                val_loss=float(summary["eval"]["val_ce"]), wall_seconds=summary.get("wall_seconds"))


@dataclass
class PowerLaw:
    """log L = intercept - alpha * log X, fitted by least squares."""

    alpha: float
    alpha_se: float
    """Standard error of alpha (nan with 2 points: no residual degrees of freedom)."""
    intercept: float
    points: int


def fit_power_law(x: Sequence[float], loss: Sequence[float]) -> PowerLaw:
    lx, ly = np.log(np.asarray(x, dtype=float)), np.log(np.asarray(loss, dtype=float))
    n = lx.size
    if n < 2 or np.ptp(lx) == 0:
        raise ValueError(f"a power-law fit needs at least 2 distinct x values, got {n} point(s)")
    sxx = float(((lx - lx.mean()) ** 2).sum())
    slope = float(((lx - lx.mean()) * (ly - ly.mean())).sum() / sxx)
    intercept = float(ly.mean() - slope * lx.mean())
    resid = ly - (intercept + slope * lx)
    se = math.sqrt(float((resid ** 2).sum()) / (n - 2) / sxx) if n > 2 else float("nan")
    return PowerLaw(-slope, se, intercept, n)


def _subset(points: List[Dict[str, Any]], axis: str) -> List[Dict[str, Any]]:
    """Runs entering the fit against `axis`: N at the largest budget, D at the largest size,
    C over all runs (so the other variable is held fixed where the grid allows)."""
    if axis == "non_embedding_params":
        top = max(p["tokens"] for p in points)
        return [p for p in points if p["tokens"] == top]
    if axis == "tokens":
        top = max(p["non_embedding_params"] for p in points)
        return [p for p in points if p["non_embedding_params"] == top]
    return points


AXES = {"non_embedding_params": "N (non-embedding parameters)", "flops": "C (training FLOPs)", "tokens": "D (tokens)"}


def fit_family(points: List[Dict[str, Any]]) -> Dict[str, Optional[PowerLaw]]:
    out: Dict[str, Optional[PowerLaw]] = {}
    for axis in AXES:
        sub = _subset(points, axis)
        try:
            out[axis] = fit_power_law([p[axis] for p in sub], [p["val_loss"] for p in sub])
        except ValueError:
            out[axis] = None
    return out


def rate_ratio(ebt: List[Dict[str, Any]], base: List[Dict[str, Any]], axis: str, resamples: int,
               seed: int = 0) -> Dict[str, float]:
    """alpha_EBT / alpha_base on `axis`: the point estimate, its delta-method standard error and
    a 90% bootstrap interval (runs resampled with replacement within each family)."""
    a, b = _subset(ebt, axis), _subset(base, axis)
    fa = fit_power_law([p[axis] for p in a], [p["val_loss"] for p in a])
    fb = fit_power_law([p[axis] for p in b], [p["val_loss"] for p in b])
    ratio = fa.alpha / fb.alpha
    se = abs(ratio) * math.sqrt((fa.alpha_se / fa.alpha) ** 2 + (fb.alpha_se / fb.alpha) ** 2)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        ra = [a[i] for i in rng.integers(0, len(a), len(a))]
        rb = [b[i] for i in rng.integers(0, len(b), len(b))]
        try:
            ga = fit_power_law([p[axis] for p in ra], [p["val_loss"] for p in ra])
            gb = fit_power_law([p[axis] for p in rb], [p["val_loss"] for p in rb])
        except ValueError:
            continue  # a resample with one distinct x has no slope
        if gb.alpha != 0:
            draws.append(ga.alpha / gb.alpha)
    lo, hi = (float(np.percentile(draws, 5)), float(np.percentile(draws, 95))) if draws else (float("nan"),) * 2
    return dict(ratio=ratio, se=se, boot_lo=lo, boot_hi=hi, boot_draws=len(draws))


def summarize_sweep(sweep: Sweep, log=print) -> Dict[str, Any]:
    """Fits, table, summary.json and scaling.png for the runs that have finished."""
    points = [run_point(r) for r in sweep.runs if run_summary(r) is not None]
    missing = [r.name for r in sweep.runs if run_summary(r) is None]
    if missing:
        log(f"sweep: {len(missing)} run(s) not finished yet: {', '.join(missing)}")
    families: Dict[str, List[Dict[str, Any]]] = {}
    for p in points:
        families.setdefault(p["family"], []).append(p)
    fits = {f: fit_family(ps) for f, ps in families.items()}
    lines = ["| run | arch | non-emb. params | FLOPs | tokens | val loss | wall s |", "|---|---|---|---|---|---|---|"]
    for p in points:
        lines.append(f"| {p['name']} | {p['arch']} | {p['non_embedding_params']:,} | {p['flops']:.3g} | "
                     f"{p['tokens']:,} | {p['val_loss']:.4f} | {p['wall_seconds']} |")
    lines += ["", "| family | " + " | ".join(f"alpha_{k} (+- se, points)" for k in ("N", "C", "D")) + " |",
              "|---|---|---|---|"]
    for fam, fit in fits.items():
        cells = [f"{f.alpha:.4f} (+- {f.alpha_se:.4f}, {f.points})" if f else "n/a" for f in fit.values()]
        lines.append(f"| {fam} | " + " | ".join(cells) + " |")
    ratios: Dict[str, Dict[str, float]] = {}
    ebt = [f for f, ps in families.items() if ps[0]["arch"] == "ebt"]
    base = [f for f, ps in families.items() if ps[0]["arch"] == "transformer++"]
    if len(ebt) == 1 and len(base) == 1:
        lines += ["", f"| scaling-rate ratio alpha_{ebt[0]} / alpha_{base[0]} | ratio | delta-method se | "
                  "90% bootstrap interval |", "|---|---|---|---|"]
        for axis, label in AXES.items():
            try:
                r = rate_ratio(families[ebt[0]], families[base[0]], axis, sweep.bootstrap)
            except ValueError:
                continue
            ratios[axis] = r
            lines.append(f"| vs {label} | {r['ratio']:.3f} | {r['se']:.3f} | [{r['boot_lo']:.3f}, {r['boot_hi']:.3f}] |")
    print("\n".join(lines))
    record = {"sweep": str(sweep.path), "runs": points, "missing": missing,
              "fits": {f: {k: (vars(v) if v else None) for k, v in fit.items()} for f, fit in fits.items()},
              "ratios": ratios}
    sweep.out_dir.mkdir(parents=True, exist_ok=True)
    tmp = sweep.out_dir / f".summary.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, sweep.out_dir / "summary.json")
    if points:
        _plot(families, fits, sweep.out_dir / "scaling.png")
        log(f"wrote {sweep.out_dir / 'summary.json'} and {sweep.out_dir / 'scaling.png'}")
    return record


def _plot(families, fits, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (axis, label) in zip(axes, AXES.items()):
        for fam, ps in families.items():
            sub = _subset(ps, axis)
            pts = ax.scatter([p[axis] for p in ps], [p["val_loss"] for p in ps], alpha=0.35)
            color = pts.get_facecolor()[0]
            ax.scatter([p[axis] for p in sub], [p["val_loss"] for p in sub], color=color, label=fam)
            fit = fits[fam][axis]
            if fit is not None:
                xs = np.geomspace(min(p[axis] for p in sub), max(p[axis] for p in sub), 20)
                ax.plot(xs, np.exp(fit.intercept) * xs ** (-fit.alpha), color=color,
                        label=f"{fam}: alpha={fit.alpha:.3f}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("final validation loss (nats/token)")
        ax.legend(fontsize=8)
    axes[0].set_title("vs parameters (largest budget)")
    axes[1].set_title("vs training FLOPs (all runs)")
    axes[2].set_title("vs tokens (largest size)")
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
