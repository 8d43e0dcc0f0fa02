"""Every parallel layout against the single-process model: gloo ranks on 127.0.0.1, a tiny
model, full S1 and S2 training steps through the trainer's train module (S2 with random 2-3
steps, Langevin noise, step-size jitter and replay, drawn layout-invariantly): losses, dE/dy
and every parameter gradient within 1e-5 (float32) relative to each tensor's own scale, no
gradient None, and the weights still equal after 3 optimizer steps. Every layout has a
float64 case, exact to 1e-10 (observed ~1e-15), which shows the float32 differences are rounding.

All checks run inside the ranks (tests/distributed/parity.py); a mismatch raises there and
fails the spawn. Each test starts one set of ranks for several cases, because process
start-up (and DeepSpeed's import) dominates on two cores.
"""
from __future__ import annotations

import json

import pytest
import torch

from parallel.apply import ParallelSettings as P
from parallel.spawn import run_distributed
from parity import ParityCase as C
from parity import parity_cases

F64 = dict(dtype=torch.float64, tol=1e-10)
# DeepSpeed keeps ZeRO's master partitions (and so the reduced gradients and the update) in
# float32 whatever the model's dtype: a float64 ZeRO run is exact to float32 rounding only.
F64_ZERO = dict(dtype=torch.float64, tol=1e-6)

pytestmark = pytest.mark.distributed

LAYOUTS = {
    "tp2": (2, [
        C(P(tp=2), "s1", "default"),
        C(P(tp=2), "s2", "time_embed"),
        C(P(tp=2), "s1", "adaln"),
        C(P(tp=2), "s1", "default", **F64),
        C(P(tp=2), "s2", "default", **F64),
    ]),
    "dp2": (2, [
        C(P(dp=2), "s1", "default", micro_batches=2),
        C(P(dp=2), "s2", "time_embed"),
        C(P(dp=2), "s2", "default", **F64),
    ]),
    "zero1": (2, [
        C(P(dp=2, zero_stage=1), "s1", "default", micro_batches=2),
        C(P(dp=2, zero_stage=1), "s2", "time_embed"),
        C(P(dp=2, zero_stage=1), "s2", "adaln", **F64_ZERO),
    ]),
    "zero2": (2, [
        C(P(dp=2, zero_stage=2), "s1", "default"),
        C(P(dp=2, zero_stage=2), "s2", "time_embed", micro_batches=2),
        C(P(dp=2, zero_stage=2), "s1", "default", **F64_ZERO),
    ]),
    "tp2_checkpointing": (2, [
        C(P(tp=2, activation_checkpointing="block"), "s1", "default"),
        C(P(tp=2, activation_checkpointing="step"), "s2", "time_embed"),
        C(P(tp=2, activation_checkpointing="block_vjp"), "s1", "default"),
        C(P(tp=2, activation_checkpointing="block_vjp"), "s2", "time_embed"),
        C(P(tp=2, activation_checkpointing="block_vjp"), "s2", "default", **F64),
    ]),
    "tp2_dp2": (4, [
        C(P(tp=2, dp=2), "s1", "default"),
        C(P(tp=2, dp=2, zero_stage=1), "s2", "default"),
        C(P(tp=2, dp=2), "s2", "time_embed", **F64),
    ]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout, tmp_path):
    world_size, cases = LAYOUTS[layout]
    out = tmp_path / "summary.json"
    run_distributed(parity_cases, world_size, cases, str(out))
    summary = json.loads(out.read_text())
    for label, row in summary.items():
        print(label, row)
        zero = "zero=0" not in label
        tol = (1e-6 if zero else 1e-10) if "float64" in label else 1e-5
        assert row["max_rel"] <= tol
        assert row["max_rel_weight"] <= (tol if "float64" in label else 3e-5)  # see parity.py (AdamW)
        # Gradient communication once per optimizer step, however many backwards.
        assert row["syncs"] == 3
