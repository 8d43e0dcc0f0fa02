"""Peak memory per rank of one EBT training step under tensor parallelism and activation
checkpointing (issue 5). Prints a markdown table; results are recorded in docs/parallel.md.

Each configuration runs in freshly forked gloo ranks; a rank's figure is its resident-set
high-water mark during its first training step minus its resident size just before (model
and batch already in memory), i.e. the memory the step adds: activations, the second-order
graph, the (B, S, V) candidate tensors and the gradients. glibc is told to serve every
allocation above 64 KiB with mmap, so freed tensors leave the resident set at once and
the high-water mark follows live tensors rather than the allocator's cache. CPU only.

    python benchmarks/parallel_memory.py                  # default size, all configurations
    python benchmarks/parallel_memory.py --layers 8 --vocab 4096 --seq 128 --batch 4
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "distributed"))  # the parity harness's recipes

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from parallel.apply import ParallelSettings, parallelize  # noqa: E402
from parallel.dims import build_dims  # noqa: E402
from parallel.spawn import run_distributed  # noqa: E402
from parity import recipe  # noqa: E402
from pretrain.model import build_model  # noqa: E402
from pretrain.thinking import unroll  # noqa: E402


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rank_main(args: dict, settings: ParallelSettings, recipe_name: str, out_file: str) -> None:
    dims = build_dims(tp=settings.tp, dp=settings.dp)
    overrides, thinking = recipe(recipe_name, same_random_stream=True)
    cfg = dict(vocab_size=args["vocab"], dim=args["dim"], num_heads=args["heads"], num_layers=args["layers"],
               max_seq_len=args["seq"], context_attention="math", ebt_type="default", **overrides)
    torch.manual_seed(0)
    model = build_model(cfg)
    pm = parallelize(model, dims, settings, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-4))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args["vocab"], (args["batch"], args["seq"] + 1), generator=gen)
    noise = pm.module.vocab_ops.shard(torch.randn(args["batch"], args["seq"], args["vocab"], generator=gen))
    base = _rss_mb()
    start = time.perf_counter()
    unroll(pm.module, ids, thinking, initial_logits=noise, backward_fn=pm.backward_fn(True))
    seconds = time.perf_counter() - start
    peak = _peak_mb() - base
    grads = sum(p.numel() * p.element_size() for p in pm.module.parameters() if p.requires_grad) / 2**20
    row = torch.tensor([peak, seconds, peak - grads], dtype=torch.float64)
    rows = [torch.zeros_like(row) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, row)
    if dist.get_rank() == 0:
        Path(out_file).write_text(json.dumps([r.tolist() for r in rows]))


CONFIGS = [
    ("s1", ParallelSettings()),
    ("s1", ParallelSettings(activation_checkpointing="block")),
    ("s1", ParallelSettings(activation_checkpointing="block_vjp")),
    ("s1", ParallelSettings(tp=2, dp=1)),
    ("s1", ParallelSettings(tp=2, dp=1, activation_checkpointing="block_vjp")),
    ("s2", ParallelSettings()),
    ("s2", ParallelSettings(activation_checkpointing="block")),
    ("s2", ParallelSettings(activation_checkpointing="step")),
    ("s2", ParallelSettings(activation_checkpointing="block_vjp")),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--only", default=None, help="run only configurations whose checkpointing mode is in this comma list")
    args = vars(parser.parse_args())
    # M_MMAP_THRESHOLD = -3 (malloc.h): inherited by the forked ranks.
    ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)
    print(f"EBT {args}; step memory = RSS high-water during one training step minus RSS before it\n")
    print("| recipe | tp | checkpointing | step memory per rank (MB) | without gradients (MB) | step time (s) |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, settings in CONFIGS:
            if args["only"] and settings.activation_checkpointing not in args["only"].split(","):
                continue
            out = os.path.join(tmp, "row.json")
            run_distributed(_rank_main, settings.tp * settings.dp, args, settings, name, out)
            rows = json.loads(Path(out).read_text())
            mem = max(r[0] for r in rows)
            secs = max(r[1] for r in rows)
            act = max(r[2] for r in rows)
            print(f"| {name} | {settings.tp} | {settings.activation_checkpointing} | {mem:.0f} | {act:.0f} | {secs:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
