"""Resharding (issue 5 acceptance): train 2 steps at one layout, save the layout-independent
sharded checkpoint, load it at another layout (tp <-> dp, with and without ZeRO) and run 3
more steps; they must equal an uninterrupted 5-step run at the new layout. Also: the full
model state read back from the shards equals the one gathered in memory, and loading the
optimizer state restores AdamW's moments and step count."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from parallel.apply import ParallelSettings as P
from parallel.apply import parallelize
from parallel.dims import build_dims
from parallel.reshard import gather_full_model_state, load_full_model_state, load_optimizer_state, save_sharded
from parallel.spawn import run_distributed
from parity import BATCH, SEQ, TINY_MODEL, recipe
from pretrain.model import build_model
from pretrain.thinking import unroll

pytestmark = pytest.mark.distributed


def _make(settings: P, state=None):
    dims = build_dims(tp=settings.tp, dp=settings.dp)
    torch.manual_seed(0)
    model = build_model(dict(TINY_MODEL, **recipe("s1", True)[0]))
    if state is not None:
        model.load_state_dict(state)
    opt = lambda m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)
    return parallelize(model, dims, settings, opt, clip=1.0)


def _train(pm, steps) -> list:
    thinking = recipe("s1", True)[1]
    dims = pm.dims
    rows = slice(dims.dp_rank * BATCH // dims.dp, (dims.dp_rank + 1) * BATCH // dims.dp)
    losses = []
    for step in steps:  # the data cursor is the step index
        data = torch.Generator().manual_seed(1000 + step)
        ids = torch.randint(0, TINY_MODEL["vocab_size"], (BATCH, SEQ + 1), generator=data)
        noise = torch.randn(BATCH, SEQ, TINY_MODEL["vocab_size"], generator=data)
        r = unroll(pm.module, ids[rows], thinking, initial_logits=pm.module.vocab_ops.shard(noise[rows]),
                   backward_fn=pm.backward_fn(True))
        loss = r.loss.detach().clone()
        dist.all_reduce(loss, group=dims.dp_group)
        losses.append(float(loss) / dims.dp)
        pm.clip_and_step(1.0)
    return losses


def _reshard_main(first: P, second: P, folder: str) -> None:
    pm = _make(first)
    _train(pm, range(2))
    save_sharded(pm, folder, extra={"data_cursor": 2})
    gathered = gather_full_model_state(pm.module, pm.dims)
    loaded = load_full_model_state(folder)
    assert gathered.keys() == loaded.keys()
    for name in gathered:
        assert torch.equal(gathered[name], loaded[name]), name

    resumed = _make(second, state=loaded)
    assert load_optimizer_state(resumed, folder) == 2
    resumed_losses = _train(resumed, range(2, 5))
    straight = _make(second)
    straight_losses = _train(straight, range(5))[2:]
    worst = 0.0
    for (name, a), (_, b) in zip(resumed.module.named_parameters(), straight.module.named_parameters()):
        diff = float((a - b).abs().max())
        worst = max(worst, diff)
        assert diff <= 1e-5 * max(1.0, float(b.abs().max())), f"{name}: {diff}"
    for a, b in zip(resumed_losses, straight_losses):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (resumed_losses, straight_losses)
    if dist.get_rank() == 0:
        Path(folder, "result.json").write_text(json.dumps({"max_weight_diff": worst, "losses": resumed_losses}))


@pytest.mark.parametrize("first,second", [
    (P(tp=2), P(dp=2, zero_stage=1)),
    (P(dp=2, zero_stage=2), P(tp=2)),
    (P(dp=2), P(tp=2, activation_checkpointing="block")),
], ids=["tp2->zero1", "zero2->tp2", "dp2->tp2+ac"])
def test_reshard_then_three_steps_equal_uninterrupted(first, second, tmp_path):
    run_distributed(_reshard_main, 2, first, second, str(tmp_path / "ckpt"))
    result = json.loads((tmp_path / "ckpt" / "result.json").read_text())
    print(first, "->", second, result)
    layout = json.loads((tmp_path / "ckpt" / "parallel.json").read_text())
    assert (layout["tp"], layout["dp"], layout["extra"]) == (first.tp, first.dp, {"data_cursor": 2})
