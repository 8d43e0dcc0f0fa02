"""Tokens/s of KV-cached against uncached EBT generation (greedy), at 2 and 8 thinking steps,
for prompt lengths 64 and 512, on CPU (or --device cuda), interleaved in rounds.

Three modes of `EBTInference.generate` (they produce the same tokens; the table checks it):
  kv         each new token runs through the context stream once; each thinking step is a
             prediction-stream pass for one position against the cache;
  recompute  no cache: the context stream re-runs over the whole prefix every step, and only
             the next position is predicted (a no-cache baseline smarter than the reference);
  reference  no cache, the public reference's way: the whole energy model (context stream and
             a prediction at every position) over the whole prefix every step of every token.
Speed does not depend on the weights, so a freshly initialised model of the default
experiment's shape is used (4xs body, vocabulary 2048), with a context window of 640.

As benchmarks/step_cost.py: flush-to-zero as in training, every (prompt, steps, mode) cell
once per round after a warm-up round, CPU-time and wall-time medians with interquartile
ranges, speed-ups taken within a round (benchmarks/rounds.py).

    python benchmarks/generate_speed.py [--tokens 16] [--rounds 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rounds import fmt, load_line, run_rounds, within_round_ratios  # noqa: E402

from pretrain.generate import EBTInference  # noqa: E402
from pretrain.model import build_model  # noqa: E402

MODES = ("kv", "recompute", "reference")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
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
    outputs: dict = {}
    cells = {}
    for prompt_len in (64, 512):
        prompt = torch.randint(0, 2048, (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
        for steps in (2, 8):
            for mode in MODES:
                key = (prompt_len, steps, mode)

                def run(prompt=prompt, steps=steps, mode=mode, key=key):
                    outputs[key] = engine.generate(prompt, args.tokens, steps=steps, mode=mode)

                cells[key] = run
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    samples, _ = run_rounds(cells, args.rounds, args.warmup, sync)

    print(f"\nEBT generation, {args.ebt_type} conditioning, {args.tokens} tokens, threads={args.threads}, "
          f"device={args.device}, rounds={args.rounds} (+{args.warmup} warm-up), flush-to-zero on")
    print(load_line(samples) + "\n")
    print("| prompt | steps | kv tok/s | recompute tok/s | reference tok/s | kv vs reference | kv vs recompute "
          "| same tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for prompt_len in (64, 512):
        for steps in (2, 8):
            s = {m: samples[(prompt_len, steps, m)] for m in MODES}
            speed = {m: fmt([args.tokens / c for c in s[m].cpu]) for m in MODES}
            vs_ref = fmt(within_round_ratios(s["reference"].cpu, s["kv"].cpu))
            vs_rec = fmt(within_round_ratios(s["recompute"].cpu, s["kv"].cpu))
            same = outputs[(prompt_len, steps, "kv")] == outputs[(prompt_len, steps, "recompute")] \
                == outputs[(prompt_len, steps, "reference")]
            print(f"| {prompt_len} | {steps} | {speed['kv']} | {speed['recompute']} | {speed['reference']} | "
                  f"{vs_ref}x | {vs_rec}x | {same} |")
    print("\ntok/s from CPU time (median [IQR] over rounds); speed-ups are within-round CPU-time ratios.")


if __name__ == "__main__":
    main()
