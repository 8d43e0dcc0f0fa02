"""The System-2 curve of a trained EBT: held-out cross-entropy against the number of inference
thinking steps (1..8) and against best-of-G self-verification (G = 1, 2, 4).

Reads the latest checkpoint of RUN_DIR (or a checkpoint folder), evaluates on the run's
validation split, prints a markdown table and writes a PNG.

    python benchmarks/system2_curve.py runs/default --out docs/system2_curve.png
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from data_pipeline import DataConfig, make_loader, prepare_dataset
from pretrain.checkpoint import read_metadata
from pretrain.export import _model_config, consolidated_state, resolve_checkpoint
from pretrain.model import build_model
from pretrain.thinking import think


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("source", metavar="RUN_DIR|CHECKPOINT")
    ap.add_argument("--out", default="docs/system2_curve.png")
    ap.add_argument("--batches", type=int, default=4, help="validation batches of --batch-size sequences")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)

    checkpoint = resolve_checkpoint(args.source)
    meta = read_metadata(checkpoint)
    state = consolidated_state(checkpoint, meta)
    model = build_model(_model_config(meta, state))
    model.load_state_dict(state)
    model.eval()
    prepared = prepare_dataset(DataConfig(**meta["config"]["data"]))
    loader = make_loader(prepared, "val", global_batch_size=args.batch_size, rank=0, world_size=1, seed=0)
    batches = [b for _, b in zip(range(args.batches), loader)]
    thinking = meta["config"]["thinking"]
    trained_steps = thinking.get("num_steps_max") or thinking["num_steps"]  # the most steps trained

    def mean_ce(steps: int, samples: int) -> list:
        totals = None
        for i, ids in enumerate(batches):
            res = think(model, ids[:, :-1], steps, num_samples=samples, targets=ids[:, 1:],
                        generator=torch.Generator().manual_seed(i))
            ce = torch.tensor(res.ce_per_step) if samples == 1 else torch.tensor([res.ce_per_step[-1]])
            totals = ce if totals is None else totals + ce
        return (totals / len(batches)).tolist()

    by_step = mean_ce(args.max_steps, 1)  # index k: CE after k steps (0 = the noise start)
    best_of = {}
    for g in (1, 2, 4):
        # best-of-G picks per position by final energy; CE of the chosen candidates
        chosen = []
        for i, ids in enumerate(batches):
            res = think(model, ids[:, :-1], trained_steps, num_samples=g, generator=torch.Generator().manual_seed(i))
            chosen.append(model.vocab_ops.cross_entropy(res.logits, ids[:, 1:]).item())
        best_of[g] = sum(chosen) / len(chosen)

    print(f"\n{checkpoint} (trained with {trained_steps} thinking steps), {len(batches)} x {args.batch_size} "
          f"validation sequences of {prepared.seq_len} tokens\n")
    print("| inference steps | " + " | ".join(str(k) for k in range(1, args.max_steps + 1)) + " |")
    print("|---" * (args.max_steps + 1) + "|")
    print("| val CE | " + " | ".join(f"{c:.4f}" for c in by_step[1:]) + " |")
    print(f"\n| best-of-G ({trained_steps} steps) | G=1 | G=2 | G=4 |\n|---|---|---|---|")
    print("| val CE | " + " | ".join(f"{best_of[g]:.4f}" for g in (1, 2, 4)) + " |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    steps = list(range(1, args.max_steps + 1))
    a.plot(steps, by_step[1:], marker="o")
    a.axvline(trained_steps, color="grey", linestyle=":", label="trained steps")
    a.set_xlabel("inference thinking steps")
    a.set_ylabel("validation cross-entropy (nats)")
    a.set_title("Thinking longer")
    a.legend()
    b.plot([1, 2, 4], [best_of[g] for g in (1, 2, 4)], marker="o")
    b.set_xscale("log", base=2)
    b.set_xlabel("G (best-of-G by energy)")
    b.set_title(f"Self-verification ({trained_steps} steps)")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
