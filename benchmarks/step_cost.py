"""Time and memory of one training step: EBT (S1 and the real S2 recipe) against the
Transformer++ baseline of the same size, interleaved in rounds, on CPU (or --device cuda).

What it does, and why:
* flush-to-zero (`torch.set_flush_denormal(True)`) as the trainer sets it: without it the GEMMs
  of a fresh model meet subnormal operands and run ~3x slower;
* every configuration runs once per round (A B C A B C ...), after `--warmup` untimed rounds;
  times are medians over rounds with interquartile ranges [q1-q3], of CPU time (this process
  only) and of wall time; ratios to the Transformer++ are taken within a round, then their
  median, so a load swing on a shared machine cancels out;
* the matmul rate is measured in every round, on the step's largest GEMM shape
  ((B*S) x D x max(V, 4D)); "floor" is the step's matmul FLOPs (counted by
  torch.utils.flop_counter on one step, with pretrain.flops.counter_mapping for CPU's SDPA)
  at that round's rate, and "floor %" the fraction of the step's CPU time it is: the rest is
  elementwise work, softmaxes and dispatch overhead. The FLOPs of pretrain/flops.py's model
  (what tokens/s and MFU use; tests/unit/test_flops.py proves it equal to the count) beside;
* fair settings: `fused` rows give the EBT the fused candidate update of
  pretrain/model/vocab.py and the Transformer++ the same fused, chunked LM-head
  cross-entropy (`TransformerPP.loss`); `unfused` rows are both without (the plain ops). Each
  EBT row's ratio is to the Transformer++ on the same settings;
* S2 rows are configs/recipe/s2.yaml (time_embed, fixed alpha 5 redrawn per token in
  [2.5, 10], Langevin noise 3, no detach, second-order graph on the last step, replay buffer
  of 192 adding 50% rows), at 2 and at 3 steps (the recipe draws 2 or 3 per batch);
* saved MB: the peak of distinct storages autograd holds for backward (`saved_tensors_hooks`);
  `--rss` also runs each EBT configuration alone in a fresh process in steady state (the S2
  replay buffer filled to its 192 rows first) and reports its peak RSS (VmHWM), S2 with
  `--replay-storage` (default auto: on disk at V = 50277) and with the rows in memory.

    python benchmarks/step_cost.py                      # V = 50277 (GPT-2 + 20), D 128, 2 blocks
    python benchmarks/step_cost.py --vocab 512          # the body-dominated tiny config
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rounds import fmt, load_line, quartiles, run_rounds, within_round_ratios  # noqa: E402

from pretrain.flops import counter_mapping, ebt_step_flops, transformer_pp_step_flops  # noqa: E402
from pretrain.model import build_model  # noqa: E402
from pretrain.replay import ReplayBuffer  # noqa: E402
from pretrain.thinking import ThinkingConfig, unroll  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
S1 = ThinkingConfig(num_steps=2)


def s2_recipe() -> tuple:
    """(model overrides, ThinkingConfig) of configs/recipe/s2.yaml."""
    recipe = OmegaConf.to_container(OmegaConf.load(REPO / "configs/recipe/s2.yaml"))
    return recipe["model"], ThinkingConfig(**recipe["thinking"])


@dataclasses.dataclass
class Row:
    name: str
    kind: str  # "tpp" or "ebt"
    fused: bool
    model: dict
    thinking: ThinkingConfig | None = None
    steps: int = 0
    baseline: str = ""


def rows(args) -> list:
    s2_model, s2 = s2_recipe()
    out = []
    for fused in (True, False):
        tag = "fused" if fused else "unfused"
        base = f"T++ {tag}"
        out.append(Row(base, "tpp", fused, dict(arch="transformer++")))
        for variant in ("default", "time_embed"):
            out.append(Row(f"EBT S1 {variant} {tag}", "ebt", fused,
                           dict(ebt_type=variant, step_size=500.0, learn_step_size=True),
                           dataclasses.replace(S1, fused_vocab=fused), 2, base))
        for n in (2, 3):
            out.append(Row(f"EBT S2 {tag} {n} steps", "ebt", fused, dict(s2_model),
                           dataclasses.replace(s2, fused_vocab=fused, replay_dtype=args.replay_dtype), n, base))
    return [r for r in out if not args.only or any(o in r.name for o in args.only.split(","))]


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


def make_step(row: Row, size: dict, batch: int, seq: int, device: torch.device, storage: str = "memory",
              directory: Path | None = None):
    """(step function, model, rows per step) for one configuration; an S2 step function's
    `replay` attribute is its buffer (`storage` under `directory`)."""
    torch.manual_seed(0)
    model = build_model(dict(size, **row.model)).to(device)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.vocab_size, (batch, seq + 1), generator=gen).to(device)
    if row.kind == "tpp":
        def step():
            model.zero_grad(set_to_none=True)
            if row.fused:
                loss = model.loss(ids[:, :-1], ids[:, 1:])
            else:
                loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1).float(), ids[:, 1:].flatten())
            loss.backward()
        return step, model, batch
    cfg = row.thinking
    replay = (ReplayBuffer(cfg.replay_size, cfg.replay_dtype, storage, directory, f"{row.name}.bin".replace(" ", "_"))
              if cfg.replay_size else None)
    if replay is not None:
        # The buffer is never empty in steady state: every step adds 50% rows from it.
        with torch.no_grad():
            replay.add(ids, torch.randn(batch, seq, model.vocab_size, generator=gen).to(device))
    extra = int(round(cfg.replay_fraction * batch)) if replay is not None else 0

    def step():
        model.zero_grad(set_to_none=True)
        unroll(model, ids, cfg, generator=gen, replay=replay, num_steps=row.steps)
    step.replay = replay
    return step, model, batch + extra


def matmul_rate(n: int, k: int, m: int, device: torch.device) -> float:
    """FLOP/s of an (n x k) @ (k x m) product in this process's CPU time (wall time on CUDA),
    best of 5 runs of 4 products: what the step's CPU times are compared with."""
    a, b = torch.randn(n, k, device=device), torch.randn(k, m, device=device)
    a @ b
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    best = float("inf")
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = clock()
        for _ in range(4):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, clock() - t0)
    return 4 * 2 * n * k * m / best


def model_flops(row: Row, model, seq: int, n_rows: int) -> float:
    if row.kind == "tpp":
        return transformer_pp_step_flops(model.cfg, seq, n_rows)
    return ebt_step_flops(model.cfg, seq, n_rows, row.steps, row.thinking)


def rss_child(args) -> None:
    """Runs one configuration alone in steady state (an S2 replay buffer filled to capacity
    first, as after 192 / 8 = 24 optimizer steps), 2 steps, and prints its peak RSS in MB as
    JSON (Linux)."""
    row = next(r for r in rows(args) if r.name == args.rss_child)
    with tempfile.TemporaryDirectory(dir=args.replay_dir) as tmp:
        step, model, _ = make_step(row, size_of(args), args.batch, args.seq, torch.device(args.device),
                                   args.replay_storage, Path(tmp))
        replay = getattr(step, "replay", None)
        gen = torch.Generator().manual_seed(1)
        while replay is not None and len(replay) < replay.capacity:
            n = min(args.batch, replay.capacity - len(replay))
            ids = torch.randint(0, model.vocab_size, (n, args.seq + 1), generator=gen)
            replay.add(ids, torch.randn(n, args.seq, model.vocab_size, generator=gen))
        for _ in range(2):
            step()
    # VmHWM, not ru_maxrss: the latter includes the parent's RSS copied at fork, before exec.
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
    print(json.dumps({"rss_mb": int(hwm.split()[1]) / 1024}))


def peak_rss(args, name: str, storage: str) -> float:
    cmd = ([sys.executable, __file__, "--rss-child", name] + [a for a in sys.argv[1:] if a != "--rss"]
           + ["--replay-storage", storage])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["rss_mb"]


def size_of(args) -> dict:
    return dict(dim=args.dim, num_layers=args.layers, num_heads=args.heads, vocab_size=args.vocab,
                max_seq_len=args.seq)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=50277)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", default="", help="comma-separated substrings of row names to keep")
    ap.add_argument("--replay-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--replay-storage", default="auto", choices=["auto", "memory", "disk"],
                    help="thinking.replay_storage of the S2 rows (the --rss column; 'memory' is measured beside)")
    ap.add_argument("--replay-dir", default=None, help="where disk replay files go (default: the system temp dir)")
    ap.add_argument("--rss", action="store_true", help="also measure each EBT row's peak RSS in a fresh process")
    ap.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    if args.rss_child:
        return rss_child(args)
    device = torch.device(args.device)
    size = size_of(args)
    table = rows(args)
    replay_dir = tempfile.TemporaryDirectory(dir=args.replay_dir)
    built = {r.name: make_step(r, size, args.batch, args.seq, device, args.replay_storage, Path(replay_dir.name))
             for r in table}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n_mm = args.batch * args.seq
    rate_shape = (n_mm, args.dim, max(args.vocab, 4 * args.dim))
    samples, rates = run_rounds({n: b[0] for n, b in built.items()}, args.rounds, args.warmup, sync,
                                per_round=lambda: matmul_rate(*rate_shape, device))

    results = {}
    for r in table:
        step, model, n_rows = built[r.name]
        meter = SavedTensorMeter()
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
            step()
        with FlopCounterMode(display=False, custom_mapping=counter_mapping()) as counter:
            step()
        flops = counter.get_total_flops()
        s = samples[r.name]
        floors = [flops / rate / c for rate, c in zip(rates, s.cpu)]
        replay = r.kind == "ebt" and r.thinking.replay_size > 0
        results[r.name] = dict(row=r, rows=n_rows, saved=meter.peak, flops=flops,
                               model_flops=model_flops(r, model, args.seq, n_rows), floor=floors,
                               rss=peak_rss(args, r.name, args.replay_storage) if args.rss and r.kind == "ebt" else None,
                               rss_memory=peak_rss(args, r.name, "memory") if args.rss and replay else None)

    print(f"\nV={args.vocab} D={args.dim} layers={args.layers} heads={args.heads} batch={args.batch} "
          f"seq={args.seq} threads={args.threads} device={device} rounds={args.rounds} (+{args.warmup} warm-up)"
          f" flush-to-zero on")
    print(f"matmul rate ({rate_shape[0]}x{rate_shape[1]}x{rate_shape[2]}), per round: "
          f"{fmt(rates, 1e-9)} GFLOP/s")
    print(load_line(samples) + "\n")
    head = ("| config | rows | CPU ms | wall ms | x T++ CPU | x T++ wall | saved MB | x T++ saved | "
            "GFLOP counted | GFLOP flops.py | floor % |"
            + (f" peak RSS MB (replay {args.replay_storage}) | peak RSS MB (replay memory) |" if args.rss else ""))
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for r in table:
        res, s = results[r.name], samples[r.name]
        if r.baseline:
            b = samples[r.baseline]
            x_cpu = fmt(within_round_ratios(s.cpu, b.cpu), digits=2)
            x_wall = fmt(within_round_ratios(s.wall, b.wall), digits=2)
            x_mem = f"{res['saved'] / results[r.baseline]['saved']:.2f}"
        else:
            x_cpu = x_wall = x_mem = "1"
        line = (f"| {r.name} | {res['rows']} | {fmt(s.cpu, 1e3)} | {fmt(s.wall, 1e3)} | {x_cpu} | {x_wall} | "
                f"{res['saved'] / 2**20:.1f} | {x_mem} | {res['flops'] / 1e9:.2f} | {res['model_flops'] / 1e9:.2f} | "
                f"{quartiles(res['floor'])[1]:.0%} |")
        if args.rss:
            line += "".join(f" {res[k]:.0f} |" if res[k] is not None else " - |" for k in ("rss", "rss_memory"))
        print(line)


if __name__ == "__main__":
    main()
