"""The effect of storing the S2 replay buffer in bfloat16 instead of float32 on training loss.

Two identical S2 runs (configs/recipe/s2.yaml's thinking section, replay buffer of 64) on real
English text (Python's own pydoc topics, as bytes), same seeds, differing only in
`thinking.replay_dtype`. Prints the buffer's bytes and the loss curves' difference.

    python benchmarks/replay_dtype.py [--steps 40]
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch
from omegaconf import OmegaConf
from pydoc_data.topics import topics

from pretrain.model import build_model
from pretrain.replay import ReplayBuffer
from pretrain.thinking import ThinkingConfig, unroll

REPO = Path(__file__).resolve().parent.parent


def run(dtype: str, steps: int, data: torch.Tensor, batch: int, seq: int) -> tuple:
    recipe = OmegaConf.to_container(OmegaConf.load(REPO / "configs/recipe/s2.yaml"))
    cfg = dataclasses.replace(ThinkingConfig(**recipe["thinking"]), replay_size=64, replay_dtype=dtype)
    torch.manual_seed(0)
    model = build_model(dict(recipe["model"], vocab_size=256, dim=64, num_heads=2, num_layers=2, max_seq_len=seq))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    replay = ReplayBuffer(cfg.replay_size, cfg.replay_dtype)
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=gen)
        ids = torch.stack([data[s : s + seq + 1] for s in starts.tolist()])
        res = unroll(model, ids, cfg, generator=gen, replay=replay)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(res.loss.item())
    return losses, replay.nbytes()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    text = "\n\n".join(topics[k] for k in sorted(topics))
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    f32, bytes32 = run("float32", args.steps, data, args.batch, args.seq)
    b16, bytes16 = run("bfloat16", args.steps, data, args.batch, args.seq)
    last = max(1, args.steps // 4)
    diffs = [abs(a - b) for a, b in zip(f32, b16)]
    print(f"\nS2 recipe, V 256, D 64, 2 blocks, batch {args.batch} x {args.seq}, {args.steps} steps, replay 64")
    print("| replay dtype | buffer MB | first loss | mean loss, last quarter | final loss |")
    print("|---|---|---|---|---|")
    for name, losses, nbytes in (("float32", f32, bytes32), ("bfloat16", b16, bytes16)):
        print(f"| {name} | {nbytes / 2**20:.2f} | {losses[0]:.4f} | {sum(losses[-last:]) / last:.4f} | {losses[-1]:.4f} |")
    print(f"max |loss difference| over the run: {max(diffs):.4f}; mean: {sum(diffs) / len(diffs):.4f}")


if __name__ == "__main__":
    main()
