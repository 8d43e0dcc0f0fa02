"""Every parallel layout against the single-process model (issue 5 acceptance): gloo ranks
on 127.0.0.1, a tiny model, a full S1 and S2 training step: losses, dE/dy and every
parameter gradient within 1e-5 (float32, relative to each tensor's scale), no gradient None,
and the weights still equal after 3 optimizer steps. One float64 case shows the float32
differences are rounding (exact to ~1e-12).

All checks run inside the ranks (parallel.testing.parity_check); a mismatch raises there
and fails the spawn. Each test starts one set of ranks for several cases, because process
start-up (and DeepSpeed's import) dominates on two cores.
"""
from __future__ import annotations

import json

import pytest
import torch

from parallel.apply import ParallelSettings as P
from parallel.testing import ParityCase as C
from parallel.testing import parity_cases, run_distributed

pytestmark = pytest.mark.distributed

LAYOUTS = {
    "tp2": (2, [
        C(P(tp=2), "s1", "default"),
        C(P(tp=2), "s2", "time_embed"),
        C(P(tp=2), "s1", "adaln"),
        C(P(tp=2), "s1", "default", dtype=torch.float64, tol=1e-10),
    ]),
    "dp2": (2, [
        C(P(dp=2), "s1", "default", micro_batches=2),
        C(P(dp=2), "s2", "time_embed"),
    ]),
    "zero1": (2, [
        C(P(dp=2, zero_stage=1), "s1", "default", micro_batches=2),
        C(P(dp=2, zero_stage=1), "s2", "time_embed"),
    ]),
    "zero2": (2, [
        C(P(dp=2, zero_stage=2), "s1", "default"),
        C(P(dp=2, zero_stage=2), "s2", "time_embed", micro_batches=2),
    ]),
    "tp2_checkpointing": (2, [
        C(P(tp=2, activation_checkpointing="block"), "s1", "default"),
        C(P(tp=2, activation_checkpointing="step"), "s2", "time_embed"),
        C(P(tp=2, activation_checkpointing="block_vjp"), "s1", "default"),
        C(P(tp=2, activation_checkpointing="block_vjp"), "s2", "time_embed"),
    ]),
    "tp2_dp2": (4, [
        C(P(tp=2, dp=2), "s1", "default"),
        C(P(tp=2, dp=2, zero_stage=1), "s1", "default"),
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
        assert row["max_rel"] <= (1e-10 if "float64" in label else 1e-5)
        # Gradient communication once per optimizer step, however many backwards.
        assert row["syncs"] == 3
