"""Is torch.compile of the thinking update exact and faster here? A probe, not a training path.

Compiles one energy evaluation and its dE/dh (h = W_v2e p, the prediction stream's input)
with `torch._dynamo.config.trace_autograd_ops = True` and `fullgraph=True`, the candidate
created as a leaf outside the compiled function (docs/performance.md cites the recipe), then
backpropagates a loss of (E, dE/dh) into the parameters (the second-order pass of training).
Reports the cold-compile time, the eager/compiled CPU times interleaved in rounds and the
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
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rounds import fmt, load_line, run_rounds, within_round_ratios  # noqa: E402

from pretrain.model import build_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    torch._dynamo.config.trace_autograd_ops = True
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = build_model(dict(dim=128, num_layers=2, num_heads=2, vocab_size=args.vocab, max_seq_len=64)).to(dtype)
    ids = torch.randint(0, args.vocab, (8, 64))
    context = model.prepare(ids, 0)
    context = context.replace_tensors([t.detach() for t in context.tensors])
    h0 = torch.randn(8, 64, 128, generator=torch.Generator().manual_seed(1), dtype=dtype)

    def energy_grad(h):
        energy = model.energy_from_embedding(context, h, 0)
        (u,) = torch.autograd.grad(energy.sum(), h, create_graph=True)
        return energy, u

    def outer(fn):
        model.zero_grad(set_to_none=True)
        energy, u = fn(h0.clone().requires_grad_(True))
        (u.square().sum() + energy.sum()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want = outer(energy_grad)
    compiled = torch.compile(energy_grad, fullgraph=True)
    t0 = time.perf_counter()
    got = outer(compiled)
    cold = time.perf_counter() - t0
    worst = max(((got[n] - want[n]).abs().max() / want[n].abs().max()).item() for n in want)
    samples, _ = run_rounds({"eager": lambda: outer(energy_grad), "compiled": lambda: outer(compiled)},
                            args.rounds, 1)
    print(f"\n{args.dtype}, V={args.vocab}, D 128, 2 blocks, batch 8 x 64, one thread, flush-to-zero")
    print(load_line(samples))
    print(f"cold compile (first call, wall): {cold:.0f} s")
    print(f"gradients: {len(got)} of {len(want)} present; max |compiled - eager| / scale = {worst:.2e}")
    print(f"eager {fmt(samples['eager'].cpu, 1e3)} ms, compiled {fmt(samples['compiled'].cpu, 1e3)} ms CPU; "
          f"eager / compiled within rounds {fmt(within_round_ratios(samples['eager'].cpu, samples['compiled'].cpu), digits=2)}x")


if __name__ == "__main__":
    main()
