"""Tokens/s of KV-cached against uncached EBT generation (greedy), at 2 and 8 thinking steps,
for prompt lengths 64 and 512, on CPU (or --device cuda).

Uncached is the public reference's behaviour: the whole prefix is re-run through the context
stream for every thinking step of every generated token. Cached runs each new token through
the context stream once and each thinking step through the prediction stream for one position.
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
            for use_cache in (True, False):
                engine.generate(prompt, 1, steps=steps, use_cache=use_cache)  # warm-up
                t0 = time.perf_counter()
                outputs[use_cache] = engine.generate(prompt, args.tokens, steps=steps, use_cache=use_cache)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                speeds[use_cache] = args.tokens / (time.perf_counter() - t0)
            same = outputs[True] == outputs[False]
            rows.append((prompt_len, steps, speeds[True], speeds[False], speeds[True] / speeds[False], same))
    print(f"\nEBT generation, {args.ebt_type} conditioning, {args.tokens} tokens, threads={args.threads}, "
          f"device={args.device}\n")
    print("| prompt | steps | cached tok/s | uncached tok/s | speed-up | same tokens |")
    print("|---|---|---|---|---|---|")
    for prompt_len, steps, cached, uncached, ratio, same in rows:
        print(f"| {prompt_len} | {steps} | {cached:.1f} | {uncached:.1f} | {ratio:.1f}x | {same} |")


if __name__ == "__main__":
    main()
