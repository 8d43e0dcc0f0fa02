"""Thinking-aware pipeline parallelism on CPU (issue 11): per-stage parameter and activation
memory, step time and the measured bubble at pp = 1/2/4 with 1/2/4/8 micro-batches, against
the analytic GPipe bubble (p-1)/(m+p-1) and the simulated bubble of both schedules; and what
the outer (second-order) backward costs against the single-process one. Prints markdown
tables; results are recorded in docs/parallel.md. Not a test.

Two parts:
* in one process (`--part cost`): every stage simulated in this process (LocalTransport), so
  nothing waits and the time per task kind is pure compute; pp = 1/2/4 interleaved in
  rounds, ratios taken within a round. The outer backward's extra work at pp > 1 is the
  second traversal of each non-last stage's forward graph (parallel/pipeline.py docstring);
* in gloo ranks (`--part pipeline`): pp ranks per configuration, one thread each; a stage's
  compute time is its wall time minus the time it sat in receives, and the measured bubble
  is 1 - sum(compute) / (pp x step time). Micro-batch counts are interleaved in rounds.
  With more ranks than cores (pp=4 on 2 cores) ranks also wait for a core, which counts as
  compute here: the bubble is then under-, the step time over-stated.

Activation memory: bytes of the distinct non-parameter tensors autograd saves during the
step (saved-tensor hooks; all of a step's graphs stay alive until its end).

    python benchmarks/pipeline.py                       # both parts, default size
    python benchmarks/pipeline.py --part cost --rounds 5
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from parallel.dims import build_dims  # noqa: E402
from pretrain.pipeline_draws import draw_microbatch  # noqa: E402
from parallel.pipeline import (  # noqa: E402
    EBTPipeline, gpipe_schedule, interleaved_schedule, schedule_bubble, simulate_pipeline,
    split_stages,
)
from parallel.spawn import run_distributed  # noqa: E402
from pretrain.model import build_model  # noqa: E402
from pretrain.thinking import ThinkingConfig, unroll  # noqa: E402

OUTER = ("OD", "OU", "Y", "CU")


def model_cfg(args) -> dict:
    return dict(vocab_size=args.vocab, dim=args.dim, num_heads=4, num_layers=args.layers, max_seq_len=args.seq,
                context_attention="math", step_size=500.0)


class SavedBytes:
    """Distinct non-parameter storages autograd saves inside the block."""

    def __init__(self, params) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in params}
        self.seen: Dict[int, int] = {}

    def pack(self, t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.params:
            self.seen[ptr] = t.untyped_storage().nbytes()
        return t

    def __enter__(self):
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)

    @property
    def mb(self) -> float:
        return sum(self.seen.values()) / 2**20


def _micro_batches(model, ids, thinking, m):
    per = ids.shape[0] // m
    return [draw_microbatch(model, ids[i * per:(i + 1) * per], thinking, torch.Generator().manual_seed(i), num_steps=2)
            for i in range(m)]


# -- part 1: cost of the outer backward, all stages in one process --------------------------------------
def cost_part(args) -> None:
    torch.set_num_threads(1)
    thinking = ThinkingConfig(num_steps=2)
    cfg = model_cfg(args)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    totals: Dict[str, List[Dict[str, float]]] = {}
    for r in range(args.rounds + 1):  # round 0 warms up
        torch.manual_seed(0)
        ref = build_model(cfg)
        start = time.perf_counter()
        unroll(ref, ids, thinking, generator=torch.Generator().manual_seed(0))
        totals.setdefault("unroll", []).append({"total": time.perf_counter() - start})
        for pp in (1, 2, 4):
            stages = []
            for s in range(pp):
                torch.manual_seed(0)
                stages.append(build_model(cfg))
                split_stages(stages[-1], pp, s)
            mbs = _micro_batches(stages[0], ids, thinking, 1)
            start = time.perf_counter()
            result = simulate_pipeline(stages, thinking, mbs)
            row = dict(result.phase_seconds)
            row["total"] = time.perf_counter() - start
            totals.setdefault(f"pp={pp}", []).append(row)
        if r == 0:
            totals.clear()
    print(f"\nOne process, every stage simulated (S1, 2 steps, {args.layers} layers, D={args.dim}, V={args.vocab}, "
          f"S={args.seq}, batch {args.batch}); time relative to pp=1 within each round, median of {args.rounds}:\n")
    print("| layout | thinking F+B | outer backward OD+OU+CU | whole step | whole step / unroll |")
    print("|---|---|---|---|---|")
    for pp in (1, 2, 4):
        rel_fwd, rel_out, rel_tot, rel_unroll = [], [], [], []
        for r in range(args.rounds):
            base, row = totals["pp=1"][r], totals[f"pp={pp}"][r]
            fwd = lambda x: x.get("F", 0) + x.get("B", 0)  # noqa: E731
            out = lambda x: sum(x.get(k, 0) for k in OUTER)  # noqa: E731
            rel_fwd.append(fwd(row) / fwd(base))
            rel_out.append(out(row) / out(base))
            rel_tot.append(row["total"] / base["total"])
            rel_unroll.append(row["total"] / totals["unroll"][r]["total"])
        med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
        print(f"| pp={pp} | {med(rel_fwd):.2f} | {med(rel_out):.2f} | {med(rel_tot):.2f} | {med(rel_unroll):.2f} |")


class MatmulFlops(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts 2*m*n*k for every (batched) matrix product that runs, backward ones included.
    (torch.utils.flop_counter's module tracker refuses autograd.grad inside its scope.)"""

    OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
           torch.ops.aten.baddbmm.default}

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.OPS:
            a, b = (args[1], args[2]) if func in (torch.ops.aten.addmm.default, torch.ops.aten.baddbmm.default) else args[:2]
            batch = a.shape[0] if a.dim() == 3 else 1
            self.flops += 2 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]
        return out

    def get_total_flops(self) -> int:
        return self.flops


def flops_part(args) -> None:
    """Matmul FLOPs per task kind: deterministic, unlike time."""
    import parallel.pipeline as pipeline

    thinking = ThinkingConfig(num_steps=2)
    cfg = model_cfg(args)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    ref = build_model(cfg)
    with MatmulFlops() as counter:
        unroll(ref, ids, thinking, generator=torch.Generator().manual_seed(0))
    unroll_flops = counter.get_total_flops()
    original = pipeline.EBTStage.run_task
    rows = {}
    for pp in (1, 2, 4):
        per_kind: Dict[str, int] = {}

        def counted(self, task, per_kind=per_kind):
            with MatmulFlops() as c:
                original(self, task)
            per_kind[task.kind] = per_kind.get(task.kind, 0) + c.get_total_flops()

        stages = []
        for s in range(pp):
            torch.manual_seed(0)
            stages.append(build_model(cfg))
            split_stages(stages[-1], pp, s)
        pipeline.EBTStage.run_task = counted
        try:
            simulate_pipeline(stages, thinking, _micro_batches(stages[0], ids, thinking, 1))
        finally:
            pipeline.EBTStage.run_task = original
        rows[pp] = per_kind
    print(f"\nMatmul FLOPs of one step relative to pp=1 (same model; thinking = F+B, outer = OD+OU+CU); "
          f"single-process unroll = {unroll_flops / 1e9:.3f} GFLOP:\n")
    print("| layout | thinking F+B | outer backward | whole step | whole step / unroll |")
    print("|---|---|---|---|---|")
    fwd = lambda x: x.get("F", 0) + x.get("B", 0)  # noqa: E731
    out = lambda x: sum(x.get(k, 0) for k in OUTER)  # noqa: E731
    for pp, row in rows.items():
        print(f"| pp={pp} | {fwd(row) / fwd(rows[1]):.3f} | {out(row) / out(rows[1]):.3f} | "
              f"{sum(row.values()) / sum(rows[1].values()):.3f} | {sum(row.values()) / unroll_flops:.3f} |")


# -- part 2: the distributed pipeline -------------------------------------------------------------------
def _rank_main(args_dict: dict, pp: int, out_file: str) -> None:
    args = argparse.Namespace(**args_dict)
    dims = build_dims(tp=1, dp=1, pp=pp)
    thinking = ThinkingConfig(num_steps=2)
    torch.manual_seed(0)
    model = build_model(model_cfg(args))
    if pp > 1:
        split_stages(model, pp, dims.pp_rank)
    param_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    rows = []
    micro_counts = (1, 2, 4, 8)
    for r in range(args.rounds + 1):  # round 0 warms up
        for m in micro_counts:
            for schedule in ("gpipe", "interleaved"):
                pipe = EBTPipeline(model, dims, thinking, m, schedule=schedule)
                mbs = _micro_batches(model, ids, thinking, m) if dims.pp_rank == 0 else None
                if dist.is_initialized():
                    dist.barrier()
                saved = SavedBytes(model.parameters())
                start = time.perf_counter()
                with saved:
                    result = pipe.run(mbs)
                wall = time.perf_counter() - start
                model.zero_grad(set_to_none=True)
                if r > 0:
                    rows.append(dict(round=r, m=m, schedule=schedule, wall=wall, compute=result.compute_seconds,
                                     act_mb=saved.mb, param_mb=param_mb, stage=dims.pp_rank))
    gathered = [None] * dims.world_size
    if dist.is_initialized():
        dist.all_gather_object(gathered, rows)
    else:
        gathered = [rows]
    if dims.rank == 0:
        Path(out_file).write_text(json.dumps(sum(gathered, [])))


def pipeline_part(args) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import megatron.core.parallel_state  # noqa: F401  (forked ranks inherit the import)
    print(f"\nGloo ranks, one thread each (S1, 2 steps, {args.layers} layers, D={args.dim}, V={args.vocab}, "
          f"S={args.seq}, batch {args.batch}), median over {args.rounds} rounds:\n")
    print("| pp | micro-batches | schedule | step (s) | measured bubble | simulated bubble | analytic (p-1)/(m+p-1) "
          "| params per stage (MB) | activations per stage (MB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for pp in (1, 2, 4):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rows.json")
            run_distributed(_rank_main, pp, vars(args), pp, out)
            rows = json.loads(Path(out).read_text())
        for m in (1, 2, 4, 8):
            for schedule in ("gpipe", "interleaved"):
                mine = [r for r in rows if r["m"] == m and r["schedule"] == schedule]
                walls, bubbles = [], []
                for rnd in sorted({r["round"] for r in mine}):
                    rr = [r for r in mine if r["round"] == rnd]
                    wall = max(r["wall"] for r in rr)
                    walls.append(wall)
                    bubbles.append(1 - sum(r["compute"] for r in rr) / (pp * wall))
                med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
                graph = [[True, True]] * m
                build = gpipe_schedule if schedule == "gpipe" else interleaved_schedule
                simulated = schedule_bubble(build(pp, [2] * m, graph, True), pp)
                per_stage = sorted({(r["stage"], round(r["param_mb"], 2), round(r["act_mb"], 1)) for r in mine
                                    if r["round"] == 1})
                params = " / ".join(f"{p:.2f}" for _, p, _ in per_stage)
                acts = " / ".join(f"{a:.1f}" for _, _, a in per_stage)
                print(f"| {pp} | {m} | {schedule} | {med(walls):.3f} | {max(0.0, med(bubbles)):.2f} | {simulated:.2f} | "
                      f"{(pp - 1) / (m + pp - 1):.2f} | {params} | {acts} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("cost", "pipeline", "both"), default="both")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.part in ("cost", "both"):
        flops_part(args)
        cost_part(args)
    if args.part in ("pipeline", "both"):
        pipeline_part(args)


if __name__ == "__main__":
    main()
