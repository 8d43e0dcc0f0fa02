"""Tokens/s of KV-cached against uncached EBT generation (greedy), at 2 and 8 thinking steps,
for prompt lengths 64 and 512, on CPU (or --device cuda).

Three modes of `EBTInference.generate` (they produce the same tokens; the table checks it):
  kv         each new token runs through the context stream once; each thinking step is a
             prediction-stream pass for one position against the cache;
  recompute  no cache: the context stream re-runs over the whole prefix every step, and only
             the next position is predicted (a no-cache baseline smarter than the reference);
  reference  no cache, the public reference's way: the whole energy model (context stream and
             a prediction at every position) over the whole prefix every step of every token.
Speed does not depend on the weights, so a freshly initialised model of the default
experiment's shape is used (4xs body, vocabulary 2048), with a context window of 640.

    python benchmarks/generate_speed.py [--tokens 16] [--threads 2]
"""
from __future__ import annotations

import argparse
import time

import torch

from pretrain.generate import EBTInference
from pretrain.model import build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ebt-type", default="default", choices=["default", "time_embed", "adaln"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    model = build_model(dict(dim=128, num_layers=2, num_heads=2, vocab_size=2048, max_seq_len=640,
                             ebt_type=args.ebt_type)).to(args.device)
    for p in model.parameters():
        p.requires_grad_(False)
    engine = EBTInference(model)
    rows = []
    for prompt_len in (64, 512):
        prompt = torch.randint(0, 2048, (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
        for steps in (2, 8):
            speeds = {}
            outputs = {}
            for mode in ("kv", "recompute", "reference"):
                engine.generate(prompt, 1, steps=steps, mode=mode)  # warm-up
                t0 = time.perf_counter()
                outputs[mode] = engine.generate(prompt, args.tokens, steps=steps, mode=mode)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                speeds[mode] = args.tokens / (time.perf_counter() - t0)
            same = outputs["kv"] == outputs["recompute"] == outputs["reference"]
            rows.append((prompt_len, steps, speeds, same))
    print(f"\nEBT generation, {args.ebt_type} conditioning, {args.tokens} tokens, threads={args.threads}, "
          f"device={args.device}\n")
    print("| prompt | steps | kv tok/s | recompute tok/s | reference tok/s | kv vs reference | kv vs recompute "
          "| same tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for prompt_len, steps, sp, same in rows:
        print(f"| {prompt_len} | {steps} | {sp['kv']:.1f} | {sp['recompute']:.1f} | {sp['reference']:.1f} | "
              f"{sp['kv'] / sp['reference']:.1f}x | {sp['kv'] / sp['recompute']:.1f}x | {same} |")


if __name__ == "__main__":
    main()
