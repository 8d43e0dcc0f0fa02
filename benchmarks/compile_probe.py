"""Is `train.compile` (pretrain/compiled.py) exact and faster here? The training path itself:
one S1 unroll (2 steps, fused update, per-step backward) eager against the same unroll with the
compiled energy + dE/dh (inductor), on one thread with flush-to-zero.

Reports the cold-compile time (the first compiled unroll, wall), the eager / compiled CPU
times interleaved in rounds (benchmarks/rounds.py) with their within-round ratio, and the
largest parameter-gradient difference relative to each gradient's scale.

    python benchmarks/compile_probe.py                  # float32, V 512, D 128, 2 blocks
    python benchmarks/compile_probe.py --dtype float64  # the exactness check (another cold compile)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rounds import fmt, load_line, run_rounds, within_round_ratios  # noqa: E402

from pretrain.compiled import CompiledEnergyGrad  # noqa: E402
from pretrain.model import build_model  # noqa: E402
from pretrain.thinking import ThinkingConfig, unroll  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--backend", default="inductor")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = build_model(dict(dim=args.dim, num_layers=args.layers, num_heads=2, vocab_size=args.vocab,
                             max_seq_len=args.seq, step_size=500.0, learn_step_size=True)).to(dtype)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(1))
    cfg = ThinkingConfig(num_steps=2)
    compiled = CompiledEnergyGrad(model, backend=args.backend)

    def step(with_compile: bool):
        model.zero_grad(set_to_none=True)
        unroll(model, ids, cfg, generator=torch.Generator().manual_seed(2),
               compiled=compiled if with_compile else None)
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want = step(False)
    t0 = time.perf_counter()
    got = step(True)
    cold = time.perf_counter() - t0
    worst = max(((got[n] - want[n]).abs().max() / want[n].abs().max()).item() for n in want)
    samples, _ = run_rounds({"eager": lambda: step(False), "compiled": lambda: step(True)}, args.rounds, 1)
    print(f"\n{args.dtype}, V={args.vocab}, D {args.dim}, {args.layers} blocks, batch {args.batch} x {args.seq}, "
          f"S1 2 steps, backend {args.backend}, one thread, flush-to-zero")
    print(load_line(samples))
    print(f"cold compile (first compiled unroll, wall): {cold:.0f} s ({compiled.cold_seconds:.0f} s by torch's compile timers)")
    print(f"gradients: {len(got)} of {len(want)} present; max |compiled - eager| / scale = {worst:.2e}")
    print(f"eager {fmt(samples['eager'].cpu, 1e3)} ms, compiled {fmt(samples['compiled'].cpu, 1e3)} ms CPU per unroll; "
          f"eager / compiled within rounds {fmt(within_round_ratios(samples['eager'].cpu, samples['compiled'].cpu), digits=2)}x")


if __name__ == "__main__":
    main()
