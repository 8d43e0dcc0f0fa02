"""One GPU run: EBT (S1, 2 thinking steps) and Transformer++ training steps at the `small` size
(configs/model/small.yaml: 12 blocks, 12 heads, width 768), bf16 autocast, SDPA flash
attention in the context stream (the prediction stream keeps its twice-differentiable
attention). Prints tokens/s, MFU against the device's peak (pretrain/flops.py), peak memory,
and the longest context that still trains (one optimizer step, batch 1, doubling from
--seq until out of memory or --max-context). Everything stops by --budget-min (default 7.5).

    python benchmarks/gpu.py                       # on a CUDA machine
    python benchmarks/gpu.py --smoke               # the same code path on CPU, tiny, fp32 (a test)

Without a CUDA device (and without --smoke) it says so and measures nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch
from omegaconf import OmegaConf

from pretrain.flops import ebt_step_flops, peak_flops_estimate, transformer_pp_step_flops
from pretrain.model import build_model
from pretrain.thinking import ThinkingConfig, unroll

REPO = Path(__file__).resolve().parent.parent
S1 = ThinkingConfig(num_steps=2)
TINY = dict(dim=32, num_layers=2, num_heads=2)


def size_config(name: str) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "configs/model" / f"{name}.yaml"))
    return cfg.get("model", cfg)


def attention_context(device: torch.device):
    """Flash (or memory-efficient) SDPA for the context stream on CUDA; nothing on CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])


def train_step(kind: str, model, opt, ids, device, dtype) -> None:
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    with autocast, attention_context(device):
        if kind == "ebt":
            unroll(model, ids, S1, generator=torch.Generator().manual_seed(0))
        else:
            model.loss(ids[:, :-1], ids[:, 1:]).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def measure(kind: str, size: dict, vocab: int, batch: int, seq: int, steps: int, device, dtype) -> dict:
    torch.manual_seed(0)
    arch = dict(arch="ebt", ebt_type="default") if kind == "ebt" else dict(arch="transformer++")
    model = build_model(dict(size, **arch, vocab_size=vocab, max_seq_len=seq, context_attention="sdpa")).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab, (batch, seq + 1), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    train_step(kind, model, opt, ids, device, dtype)  # warm-up (cuBLAS/flash autotuning)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(kind, model, opt, ids, device, dtype)
    sync()
    seconds = (time.perf_counter() - t0) / steps
    flops = (ebt_step_flops(model.cfg, seq, batch, S1.num_steps, S1) if kind == "ebt"
             else transformer_pp_step_flops(model.cfg, seq, batch))
    peak = peak_flops_estimate(device, dtype)
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dict(seconds=seconds, tokens_s=batch * seq / seconds, mfu=flops / seconds / peak, mem_gb=mem,
                flops=flops)


def longest_context(size: dict, vocab: int, start: int, limit: int, device, dtype, deadline: float) -> tuple:
    """(longest context that trained, the first that did not or None, why it stopped)."""
    best, failed, why = None, None, f"reached --max-context {limit}"
    seq = start
    while seq <= limit:
        if time.perf_counter() > deadline:
            why = "time budget spent"
            break
        try:
            measure("ebt", size, vocab, 1, seq, 1, device, dtype)
            best = seq
        except torch.cuda.OutOfMemoryError:
            failed, why = seq, "out of memory"
            torch.cuda.empty_cache()
            break
        seq *= 2
    return best, failed, why


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="small", help="a configs/model/*.yaml name")
    ap.add_argument("--vocab", type=int, default=50277)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--max-context", type=int, default=16384)
    ap.add_argument("--budget-min", type=float, default=7.5)
    ap.add_argument("--smoke", action="store_true", help="run the code path on CPU at a tiny size, fp32")
    args = ap.parse_args(argv)
    if args.smoke:
        device, dtype, size = torch.device("cpu"), torch.float32, TINY
        args.vocab, args.batch, args.seq, args.steps, args.max_context = 64, 2, 8, 1, 16
    elif not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device here (torch.cuda.is_available() is False), so nothing was "
              "measured; run it on a GPU machine (or pass --smoke to exercise the code path on CPU).")
        return 0
    else:
        device, dtype, size = torch.device("cuda"), torch.bfloat16, size_config(args.size)
    start = time.perf_counter()
    deadline = start + args.budget_min * 60
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke)"
    print(f"\ndevice: {name}; size {args.size if not args.smoke else 'tiny'} {size}; V={args.vocab}; "
          f"batch {args.batch} x context {args.seq}; {dtype}; peak {peak_flops_estimate(device, dtype) / 1e12:.3g} "
          f"TFLOP/s (pretrain/flops.py)\n")
    print("| model | s/step | tokens/s | MFU | peak memory GiB |")
    print("|---|---|---|---|---|")
    rows = {}
    for kind in ("transformer++", "ebt"):
        r = measure(kind, size, args.vocab, args.batch, args.seq, args.steps, device, dtype)
        rows[kind] = r
        label = "EBT S1 2 steps" if kind == "ebt" else "Transformer++"
        print(f"| {label} | {r['seconds']:.3f} | {r['tokens_s']:.0f} | {r['mfu']:.1%} | {r['mem_gb']:.2f} |")
    print(f"\nEBT / Transformer++ time: {rows['ebt']['seconds'] / rows['transformer++']['seconds']:.2f}x")
    best, failed, why = longest_context(size, args.vocab, args.seq, args.max_context, device, dtype, deadline)
    print(f"longest context that trains (EBT S1, batch 1): {best} ({why}"
          + (f" at {failed}" if failed else "") + ")")
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
