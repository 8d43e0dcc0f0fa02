"""Time and memory of one training step: EBT (S1, S2; 1..8 thinking steps) against the
Transformer++ baseline of the same size, on CPU (or on a GPU with --device cuda).

Memory is measured as the peak of *saved-tensor* bytes (what autograd keeps alive for the
backward; the quantity that grows with thinking steps), counted once per storage through
`torch.autograd.graph.saved_tensors_hooks`. On CUDA the allocator's peak is reported too.

Arithmetic vs overhead: FLOPs of a step are counted with `torch.utils.flop_counter` (every
matmul of the forward, the dE/dy backward and the second-order backward); divided by the
measured matmul rate of this machine they give the time the arithmetic needs at that rate;
the remainder of the measured time is overhead (elementwise ops, softmax, dispatch, autograd).

    python benchmarks/step_cost.py                 # the tiny config of the issue, one thread
    python benchmarks/step_cost.py --size xxs      # xxs with vocab 50k (S1 2 steps vs Transformer++)
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
import weakref

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from pretrain.model import build_model
from pretrain.thinking import ThinkingConfig, unroll

SIZES = {
    "tiny": dict(dim=128, num_layers=2, num_heads=2, vocab_size=512, max_seq_len=64),
    "xxs": dict(dim=384, num_layers=6, num_heads=6, vocab_size=50257, max_seq_len=64),
}
S1 = ThinkingConfig(num_steps=2)
S2 = ThinkingConfig(num_steps=2, detach_between_steps=False, create_graph="last", loss_on="last",
                    step_size_jitter=2.0, langevin_std=3.0)
PLAIN = dict(per_step_backward=False, reuse_context=False)


class SavedTensorMeter:
    """Peak bytes of distinct storages held by autograd for backward."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self.refs: dict = {}

    def _release(self, key, nbytes):
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.live -= nbytes

    def pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if key not in self.refs:
            self.refs[key] = 0
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        self.refs[key] += 1
        # Detached: holding the tensor itself would keep its grad_fn (the saving node) alive
        # through a cycle Python cannot collect. Autograd re-attaches metadata on unpack.
        holder = _Holder(t.detach())
        weakref.finalize(holder, self._release, key, nbytes)
        return holder

    @staticmethod
    def unpack(holder):
        return holder.tensor


class _Holder:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, t):
        self.tensor = t


def make_step(kind: str, model, thinking: ThinkingConfig | None, batch, seq, device):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.vocab_size, (batch, seq + 1), generator=gen).to(device)
    if kind == "transformer++":
        def step():
            logits = model(ids[:, :-1])
            F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
    else:
        def step():
            unroll(model, ids, thinking, generator=gen)
    return step


def measure(step, device, repeats: int):
    step()  # warm-up
    model_sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(repeats):
        model_sync()
        t0 = time.perf_counter()
        step()
        model_sync()
        times.append(time.perf_counter() - t0)
    meter = SavedTensorMeter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        step()
    with FlopCounterMode(display=False) as counter:
        step()
    cuda_peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return statistics.median(times), meter.peak, counter.get_total_flops(), cuda_peak


def matmul_rate(dim: int, device) -> float:
    a = torch.randn(512, dim, device=device)
    b = torch.randn(dim, dim, device=device)
    for _ in range(3):
        a @ b
    n = 20
    t0 = time.perf_counter()
    for _ in range(n):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * 512 * dim * dim * n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", default="1,2,4,8")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    size = SIZES[args.size]
    step_counts = [int(s) for s in args.steps.split(",")]

    rows = []
    base = build_model(dict(size, arch="transformer++")).to(device)
    t_base, m_base, f_base, c_base = measure(make_step("transformer++", base, None, args.batch, args.seq, device),
                                             device, args.repeats)
    rows.append(("transformer++", "-", "-", t_base, m_base, f_base, c_base))
    configs = []
    for variant in ("default", "time_embed"):
        for recipe_name, recipe in (("S1", S1), ("S2", S2)):
            for n in step_counts:
                configs.append((variant, recipe_name, dataclasses.replace(recipe, num_steps=n), n, "lean"))
        configs.append((variant, "S1", S1, 2, "plain"))
    for variant, recipe_name, recipe, n, path in configs:
        model = build_model(dict(size, ebt_type=variant, attention="two_stream" if path == "lean" else "reference",
                                 learn_step_size=recipe_name == "S1")).to(device)
        cfg = recipe if path == "lean" else dataclasses.replace(recipe, **PLAIN)
        t, m, f, c = measure(make_step("ebt", model, cfg, args.batch, args.seq, device), device, args.repeats)
        rows.append((f"ebt {variant} {path}", recipe_name, n, t, m, f, c))

    rate = matmul_rate(size["dim"], device)
    print(f"\nsize={args.size} {size} batch={args.batch} seq={args.seq} threads={args.threads} device={device}")
    print(f"measured matmul rate: {rate / 1e9:.1f} GFLOP/s\n")
    header = "| model | recipe | steps | ms/step | x T++ time | saved MB | x T++ mem | GFLOP | arith ms | overhead |"
    print(header)
    print("|---" * 10 + "|")
    for name, recipe, n, t, m, f, c in rows:
        arith = f / rate
        print(f"| {name} | {recipe} | {n} | {t * 1e3:.1f} | {t / t_base:.2f} | {m / 2**20:.1f} | "
              f"{m / m_base:.2f} | {f / 1e9:.2f} | {arith * 1e3:.1f} | {max(0.0, 1 - arith / t):.0%} |")


if __name__ == "__main__":
    main()
