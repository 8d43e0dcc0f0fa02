"""pretrain/flops.py's model against torch.utils.flop_counter on the real step: every matmul the
EBT's unroll (fused and plain vocabulary ops, S1 and S2 recipes, every conditioning) and the
Transformer++'s step (fused LM-head CE and plain head) run, to the FLOP; and a negative
control: the model of the plain path does not pass for the fused one."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ebt_testlib import VARIANTS
from pretrain import flops
from pretrain.model import ModelConfig, build_model
from pretrain.thinking import ThinkingConfig, unroll

SIZE = dict(vocab_size=37, dim=16, num_heads=2, num_layers=2, max_seq_len=8, num_step_embeddings=3)
BATCH, SEQ = 3, 7
S1 = ThinkingConfig(num_steps=2)
S2 = ThinkingConfig(num_steps=2, num_steps_max=3, detach_between_steps=False, create_graph="last", loss_on="last",
                    step_size_jitter=2.0, langevin_std=3.0)
RECIPES = {
    "s1": (S1, 2), "s1_3_steps": (S1, 3), "s2": (S2, 2), "s2_3_steps": (S2, 3),
    "s1_loss_on_last": (dataclasses.replace(S1, loss_on="last"), 2),
    "s1_no_detach": (dataclasses.replace(S1, detach_between_steps=False), 2),
    "s1_no_reuse": (dataclasses.replace(S1, reuse_context=False), 2),
    "s1_logits": (dataclasses.replace(S1, grad_wrt="logits"), 2),
}


def _ids() -> torch.Tensor:
    return torch.randint(0, SIZE["vocab_size"], (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))


def _counted(fn) -> int:
    with FlopCounterMode(display=False, custom_mapping=flops.counter_mapping()) as counter:
        fn()
    return counter.get_total_flops()


# Every conditioning with both recipes; the other knobs (each changes which products run) on
# `default` only, to keep the test fast; learn_step_size on S1 and fixed on S2, as the recipes.
CASES = [(v, r, r.startswith("s1")) for v in VARIANTS for r in ("s1", "s2_3_steps")] + [
    ("default", r, learn) for r in sorted(set(RECIPES) - {"s1", "s2_3_steps"}) for learn in (True, False)]


@pytest.mark.parametrize("fused", (True, False))
@pytest.mark.parametrize("variant,recipe,learn_step_size", CASES)
def test_ebt_model_counts_every_matmul_of_the_unroll(variant, recipe, learn_step_size, fused):
    cfg, steps = RECIPES[recipe]
    cfg = dataclasses.replace(cfg, fused_vocab=fused)
    model = build_model(dict(SIZE, ebt_type=variant, learn_step_size=learn_step_size)).double()
    ids = _ids()
    got = _counted(lambda: unroll(model, ids, cfg, generator=torch.Generator().manual_seed(1), num_steps=steps))
    assert flops.ebt_step_flops(model.cfg, SEQ, BATCH, steps, cfg) == got


@pytest.mark.parametrize("fused", (True, False))
def test_transformer_pp_model_counts_its_step_with_sdpa(fused):
    model = build_model(dict(SIZE, arch="transformer++")).double()
    ids = _ids()

    def step():
        if fused:
            loss = model.loss(ids[:, :-1], ids[:, 1:])
        else:
            loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()

    got = _counted(step)
    assert got > 0 and flops.transformer_pp_step_flops(model.cfg, SEQ, BATCH) == got
    # Without the CPU flash formulas FlopCounterMode misses the attention: the mapping matters.
    with FlopCounterMode(display=False) as bare:
        step()
    assert bare.get_total_flops() < got


def test_negative_control_the_plain_path_model_overstates_the_fused_step():
    model = build_model(dict(SIZE, learn_step_size=True)).double()
    ids = _ids()
    got = _counted(lambda: unroll(model, ids, S1, generator=torch.Generator().manual_seed(1), num_steps=2))
    plain = flops.ebt_step_flops(model.cfg, SEQ, BATCH, 2, dataclasses.replace(S1, fused_vocab=False))
    # Two vocabulary products (2 * 2 S V D per row) fewer: one per thinking step.
    assert plain - got == 2 * 2 * BATCH * SEQ * SIZE["vocab_size"] * SIZE["dim"]


def test_flop_count_is_ebt_aware():
    cfg = ModelConfig(vocab_size=2048, dim=128, num_layers=2, num_heads=2, max_seq_len=64)
    base = flops.transformer_pp_step_flops(cfg, 64, 1)
    s1 = flops.ebt_step_flops(cfg, 64, 1, 2, S1)
    # EBT_SPEC section 5: ~8x a Transformer++ step for S1 with the plain ops; the fused update
    # runs 5 vocabulary products a step instead of 6 (at this V they are most of the step).
    assert 3 * base < s1 < 12 * base
    last = ThinkingConfig(num_steps=3, create_graph="last", loss_on="last")
    assert flops.ebt_step_flops(cfg, 64, 1, 3, ThinkingConfig(num_steps=3)) > flops.ebt_step_flops(cfg, 64, 1, 3, last)
    per_step = flops.ebt_step_flops(cfg, 64, 1, 2) - flops.ebt_step_flops(cfg, 64, 1, 1)
    stepwise_ctx = dataclasses.replace(cfg, ebt_type="time_embed")
    assert flops.ebt_step_flops(stepwise_ctx, 64, 1, 2) - flops.ebt_step_flops(stepwise_ctx, 64, 1, 1) > per_step
    assert flops.ebt_step_flops(cfg, 64, 4, 2) == pytest.approx(4 * flops.ebt_step_flops(cfg, 64, 1, 2))
    assert flops.mfu(1e9, 1.0, 1e10) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="model.attention"):
        flops.ebt_step_flops(dataclasses.replace(cfg, attention="reference"), 64, 1, 2)
