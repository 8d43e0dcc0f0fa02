"""`ebt eval RUN_OR_EXPORT`: the System-2 evaluation of a trained EBT, in distribution and out of it.

For the run's validation split and for named out-of-distribution (OOD) text sets, tokenized with
the run's own tokenizer, it measures
  * the System-2 curve: cross-entropy and mean energy after 0..N inference thinking steps
    (thinking from noise, the model's own step size, and the run's inference Langevin noise
    `thinking.eval_noise_std`, added before each step's energy evaluation as in training;
    `--noise-std` overrides it);
  * self-verification: best-of-G by final energy (G = 1, 2, 4 by default) at the trained number
    of steps;
  * early stop: per-position stop once the energy falls by less than a tolerance, with the
    mean number of steps it used;
  * the Transformer++ twin's CE on the very same token windows, when `--twin` names one;
and reports the System-2 gain per set (CE after the trained steps minus CE after N steps) next to
the in-distribution gain. Output: a markdown table on stdout, `eval.json` and `system2.png`.

OOD sets ship with Python (nothing to install, no network): `pydoc` (the standard library's
documentation topics, technical English prose) and `pysource` (the standard library's own Python
source code). `shakespeare` (the training corpus itself, all of it, not the validation split) and
any text file or folder path are accepted too.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from .research_cli import DEFAULT_OOD, OOD_SETS  # noqa: F401 - the named sets (light module: the parser)
MAX_OOD_CHARS = 2_000_000
"""Text read per OOD set: enough for many more windows than an evaluation takes."""
EVAL_SEED = 1234


# -- loading a run or an export ---------------------------------------------------------------
@dataclass
class Evaluated:
    """A model ready to evaluate and what is needed to feed it."""

    name: str
    model: torch.nn.Module
    is_ebt: bool
    tokenizer: Any
    seq_len: int
    trained_steps: int
    """The most thinking steps one training batch took (S2: num_steps_max)."""
    data_cfg: Optional[Dict[str, Any]]
    """The run's data section (None for an export whose source run is gone)."""
    noise_std: float = 0.0
    """The run's inference noise (thinking.eval_noise_std; an export's thinking.json noise_std)."""


def _trained_steps(thinking: Dict[str, Any]) -> int:
    return int(thinking.get("num_steps_max") or thinking.get("num_steps") or 1)


def load_for_eval(source: str | Path) -> Evaluated:
    """A run folder, a checkpoint folder or a serving export; anything else is a one-line
    ValueError naming the path."""
    from .checkpoint import read_metadata
    from .export import MANIFEST, ExportError, _model_config, consolidated_state, load_export, resolve_checkpoint
    from .model import build_model
    from .model.ebt import EnergyTransformer

    path = Path(source)
    if not path.exists():
        raise ValueError(f"{path}: no such run folder, checkpoint or export")
    if (path / MANIFEST).is_file():
        export = load_export(path)
        meta = None
        ckpt = Path(export.manifest.get("source", {}).get("checkpoint", ""))
        if ckpt.name and (ckpt / "metadata.json").is_file():
            meta = read_metadata(ckpt)  # the source run's data and thinking config, when still there
        raw = json.loads((path / "thinking.json").read_text())
        trained = _trained_steps(meta["config"]["thinking"]) if meta else int(raw.get("trained_steps") or 1)
        return Evaluated(str(path), export.model, isinstance(export.model, EnergyTransformer), export.tokenizer(),
                         export.config.max_seq_len, trained, meta["config"]["data"] if meta else None,
                         float(export.thinking.noise_std))
    try:
        checkpoint = resolve_checkpoint(path)
    except ExportError:
        raise ValueError(f"{path}: not a run folder (no complete checkpoint), a checkpoint or an export") from None
    meta = read_metadata(checkpoint)
    state = consolidated_state(checkpoint, meta)
    model = build_model(_model_config(meta, state))
    model.load_state_dict(state)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    from data_pipeline import DataConfig, prepare_dataset

    data_cfg = meta["config"]["data"]
    prepared = prepare_dataset(DataConfig(**data_cfg))  # offline: cached, or rebuilt from packaged text
    thinking = meta["config"].get("thinking", {})
    return Evaluated(str(path), model, isinstance(model, EnergyTransformer), prepared.tokenizer, prepared.seq_len,
                     _trained_steps(thinking), data_cfg, float(thinking.get("eval_noise_std", 0.0)))


# -- the evaluation sets ---------------------------------------------------------------------
def _ood_texts(name: str) -> List[str]:
    from data_pipeline.sources import resolve_sources

    if name == "pysource":
        lib = Path(os.__file__).parent
        return [p.read_text(encoding="utf-8", errors="replace") for p in sorted(lib.glob("*.py"))]
    if name in ("pydoc", "shakespeare") or Path(name).expanduser().exists():
        return list(resolve_sources([name])[0].read_all())
    raise ValueError(f"--ood: unknown set {name!r} (known: {', '.join(OOD_SETS)}, or a text file/folder path)")


def ood_windows(name: str, tokenizer, seq_len: int, count: int) -> torch.Tensor:
    """`count` windows of seq_len + 1 token ids of OOD set `name`, spread evenly over the set
    (documents joined by the tokenizer's end-of-sequence id, as the training data is packed)."""
    ids: List[int] = []
    chars = 0
    for text in _ood_texts(name):
        if chars >= MAX_OOD_CHARS:
            break
        ids.extend(tokenizer.encode(text))
        ids.append(tokenizer.eos_id)
        chars += len(text)
    span = seq_len + 1
    if len(ids) < span * count:
        raise ValueError(f"--ood: set {name!r} has {len(ids)} tokens, fewer than {count} windows of {span}")
    starts = torch.linspace(0, len(ids) - span, count).long().tolist()
    flat = torch.tensor(ids, dtype=torch.long)
    return torch.stack([flat[s : s + span] for s in starts])


def val_windows(data_cfg: Dict[str, Any], count: int) -> torch.Tensor:
    from data_pipeline import DataConfig, make_loader, prepare_dataset

    prepared = prepare_dataset(DataConfig(**data_cfg))
    loader = make_loader(prepared, "val", global_batch_size=1, rank=0, world_size=1, seed=int(data_cfg.get("seed", 0)))
    rows = [b for _, b in zip(range(count), loader)]
    if len(rows) < count:
        raise ValueError(f"--batches: the validation split has {len(rows)} sequences, fewer than {count}")
    return torch.cat(rows)


# -- measuring -------------------------------------------------------------------------------
@dataclass
class SetResult:
    name: str
    sequences: int
    ce_per_step: List[float]
    """CE after 0..N steps (index 0: the noise start)."""
    energy_per_step: List[float]
    best_of: Dict[int, float]
    """G -> CE of the lowest-energy of G candidates, at the trained number of steps."""
    early_stop_ce: float
    early_stop_steps: float
    """Mean steps used per position under early stop (of at most N)."""
    twin_ce: Optional[float] = None
    extra: Dict[str, Any] = field(default_factory=dict)


def _batches(windows: torch.Tensor, batch_size: int) -> List[torch.Tensor]:
    return [windows[i : i + batch_size] for i in range(0, windows.shape[0], batch_size)]


def measure_set(ev: Evaluated, name: str, windows: torch.Tensor, *, steps: int, samples: Sequence[int],
                early_stop_tol: float, batch_size: int, twin: Optional[Evaluated] = None,
                noise_std: float = 0.0) -> SetResult:
    """Every System-2 quantity of one set, as means over its windows (weighted by rows)."""
    from .thinking import cross_entropy, think

    model = ev.model
    trained = min(ev.trained_steps, steps)
    ce = torch.zeros(steps + 1, dtype=torch.float64)
    energy = torch.zeros(steps + 1, dtype=torch.float64)
    best = {g: 0.0 for g in samples}
    es_ce, es_steps, twin_ce, rows = 0.0, 0.0, 0.0, 0
    for i, ids in enumerate(_batches(windows, batch_size)):
        ctx, tgt = ids[:, :-1], ids[:, 1:]
        n = ids.shape[0]
        seed = EVAL_SEED + i  # the same starting noise for every measurement of this batch
        r = think(model, ctx, steps, targets=tgt, noise_std=noise_std, generator=torch.Generator().manual_seed(seed))
        ce += torch.tensor(r.ce_per_step, dtype=torch.float64) * n
        energy += r.energies.double().mean(dim=(1, 2)) * n
        for g in samples:
            chosen = think(model, ctx, trained, num_samples=g, noise_std=noise_std,
                           generator=torch.Generator().manual_seed(seed))
            best[g] += cross_entropy(chosen.logits, tgt).item() * n
        stop = think(model, ctx, steps, early_stop_tol=early_stop_tol, noise_std=noise_std,
                     generator=torch.Generator().manual_seed(seed))
        es_ce += cross_entropy(stop.logits, tgt).item() * n
        es_steps += stop.steps_used.double().mean().item() * n
        if twin is not None:
            with torch.no_grad():
                twin_ce += cross_entropy(twin.model(ctx), tgt).item() * n
        rows += n
    return SetResult(
        name=name, sequences=rows, ce_per_step=(ce / rows).tolist(), energy_per_step=(energy / rows).tolist(),
        best_of={g: v / rows for g, v in best.items()}, early_stop_ce=es_ce / rows, early_stop_steps=es_steps / rows,
        twin_ce=twin_ce / rows if twin is not None else None,
    )


def summarize(res: SetResult, trained: int, steps: int) -> Dict[str, Any]:
    """The derived numbers: the System-2 gain (CE after the trained steps minus after N), the
    thinking-longer condition (CE after 2x the trained steps <= CE after the trained steps) and
    the self-verification gain (CE at G=1 minus the best G)."""
    ce = res.ce_per_step
    out: Dict[str, Any] = {"system2_gain": ce[trained] - ce[steps]}
    if 2 * trained <= steps:
        out["ce_after_2x_trained"] = ce[2 * trained]
        out["longer_does_not_hurt"] = ce[2 * trained] <= ce[trained]
    if res.best_of:
        g_max = max(res.best_of)
        out["best_of_gain"] = res.best_of[min(res.best_of)] - res.best_of[g_max]
        out["best_of_lowers_ce"] = res.best_of[g_max] < res.best_of[min(res.best_of)]
    return out


# -- reporting -------------------------------------------------------------------------------
def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def format_table(results: List[SetResult], summaries: List[Dict[str, Any]], trained: int, steps: int) -> str:
    lines = ["| set | " + " | ".join(f"CE@{k}" for k in range(1, steps + 1)) + " |", "|---" * (steps + 1) + "|"]
    for r in results:
        cells = [f"**{c:.4f}**" if k == trained else f"{c:.4f}" for k, c in enumerate(r.ce_per_step) if k >= 1]
        lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
    lines += ["", "| set | energy@0 | " + " | ".join(f"E@{k}" for k in range(1, steps + 1)) + " |",
              "|---" * (steps + 2) + "|"]
    for r in results:
        lines.append(f"| {r.name} | " + " | ".join(f"{e:.4f}" for e in r.energy_per_step) + " |")
    gs = sorted(results[0].best_of)
    lines += ["", f"| set | System-2 gain ({trained}->{steps} steps) | gain / in-dist. gain | "
              + " | ".join(f"best-of-{g}" for g in gs)
              + " | early stop CE (mean steps) | Transformer++ twin CE |", "|---" * (5 + len(gs)) + "|"]
    base = summaries[0]["system2_gain"]
    for r, s in zip(results, summaries):
        ratio = f"{s['system2_gain'] / base:.2f}" if abs(base) > 1e-12 else "n/a"
        twin = f"{r.twin_ce:.4f}" if r.twin_ce is not None else "-"
        lines.append(f"| {r.name} | {s['system2_gain']:+.4f} | {ratio} | "
                     + " | ".join(f"{r.best_of[g]:.4f}" for g in gs)
                     + f" | {r.early_stop_ce:.4f} ({r.early_stop_steps:.2f}) | {twin} |")
    return "\n".join(lines)


def plot_results(results: List[SetResult], trained: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4))
    for r in results:
        steps = list(range(len(r.ce_per_step)))
        a.plot(steps[1:], r.ce_per_step[1:], marker="o", label=r.name)
        b.plot(steps, r.energy_per_step, marker="o", label=r.name)
        gs = sorted(r.best_of)
        c.plot(gs, [r.best_of[g] for g in gs], marker="o", label=r.name)
        if r.twin_ce is not None:
            a.axhline(r.twin_ce, linestyle="--", linewidth=0.8, color=a.lines[-1].get_color())
    for ax in (a, b):
        ax.axvline(trained, color="grey", linestyle=":")
        ax.set_xlabel("inference thinking steps")
    a.set_ylabel("cross-entropy (nats/token); dashed: Transformer++ twin")
    a.set_title("System-2 curve")
    b.set_ylabel("mean energy")
    b.set_title("Energy per step")
    c.set_xscale("log", base=2)
    c.set_xlabel(f"G (best-of-G by energy, {trained} steps)")
    c.set_ylabel("cross-entropy")
    c.set_title("Self-verification")
    a.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def run_eval(source: str, *, ood: Sequence[str] = DEFAULT_OOD, steps: int = 8, samples: Sequence[int] = (1, 2, 4),
             early_stop_tol: float = 0.01, batches: int = 4, batch_size: int = 16, twin: Optional[str] = None,
             out: Optional[str] = None, noise_std: Optional[float] = None, log=print) -> Dict[str, Any]:
    """Evaluates `source` (see module doc); returns the JSON record it writes."""
    if steps < 1 or batches < 1 or batch_size < 1 or not samples or min(samples) < 1:
        raise ValueError(f"--steps, --batches, --batch-size and every --samples value must be >= 1")
    if noise_std is not None and noise_std < 0:
        raise ValueError(f"--noise-std: must be >= 0, got {noise_std}")
    if len(set(ood)) != len(ood):
        raise ValueError(f"--ood: a set is named twice in {list(ood)}")
    for name in ood:  # every name checked before any work
        if name not in OOD_SETS and not Path(name).expanduser().exists():
            raise ValueError(f"--ood: unknown set {name!r} (known: {', '.join(OOD_SETS)}, or a text file/folder path)")
    ev = load_for_eval(source)
    if not ev.is_ebt:
        raise ValueError(f"{source}: is a Transformer++ model; evaluate an EBT and pass it as --twin")
    noise_std = ev.noise_std if noise_std is None else noise_std
    twin_ev = None
    if twin is not None:
        twin_ev = load_for_eval(twin)
        if twin_ev.is_ebt:
            raise ValueError(f"--twin: {twin} is an EBT, not a Transformer++ model")
        if twin_ev.tokenizer.fingerprint != ev.tokenizer.fingerprint:
            raise ValueError(f"--twin: {twin} uses another tokenizer than {source}; CEs would not be comparable")
    count = batches * batch_size
    sets: List[tuple] = []
    if ev.data_cfg is not None:
        sets.append(("val (in-dist.)", val_windows(ev.data_cfg, count)))
    else:
        log(f"eval: {source} is an export whose source run is gone: no validation split, OOD sets only")
    for name in ood:
        sets.append((name, ood_windows(name, ev.tokenizer, ev.seq_len, count)))
    torch.set_flush_denormal(True)
    trained = min(ev.trained_steps, steps)
    results = []
    for name, windows in sets:
        log(f"eval: {name}: {windows.shape[0]} sequences of {windows.shape[1] - 1} tokens")
        results.append(measure_set(ev, name, windows, steps=steps, samples=sorted(set(samples)),
                                   early_stop_tol=early_stop_tol, batch_size=batch_size, twin=twin_ev,
                                   noise_std=noise_std))
    summaries = [summarize(r, trained, steps) for r in results]
    out_dir = Path(out) if out is not None else Path(source) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "source": str(source), "twin": twin, "trained_steps": trained, "steps": steps,
        "early_stop_tol": early_stop_tol, "noise_std": noise_std, "sets": [
            dict(name=r.name, sequences=r.sequences, ce_per_step=r.ce_per_step, energy_per_step=r.energy_per_step,
                 best_of={str(g): v for g, v in r.best_of.items()}, early_stop_ce=r.early_stop_ce,
                 early_stop_steps=r.early_stop_steps, twin_ce=r.twin_ce, **s)
            for r, s in zip(results, summaries)
        ],
    }
    table = format_table(results, summaries, trained, steps)
    print(f"\n{source}: trained with up to {trained} thinking steps; CE after k steps (bold: trained)\n")
    print(table)
    for r, s in zip(results, summaries):
        if "longer_does_not_hurt" in s:
            print(f"{r.name}: CE after {2 * trained} steps {s['ce_after_2x_trained']:.4f} vs after {trained} "
                  f"{r.ce_per_step[trained]:.4f}: thinking longer {'does not hurt' if s['longer_does_not_hurt'] else 'HURTS'}; "
                  f"best-of-{max(r.best_of)} {'lowers' if s.get('best_of_lowers_ce') else 'does NOT lower'} CE "
                  f"by {s.get('best_of_gain', 0.0):+.4f}")
    _atomic_write(out_dir / "eval.json", json.dumps(record, indent=1).encode())
    plot_results(results, trained, out_dir / "system2.png")
    print(f"\nwrote {out_dir / 'eval.json'} and {out_dir / 'system2.png'}")
    sys.stdout.flush()
    return record
