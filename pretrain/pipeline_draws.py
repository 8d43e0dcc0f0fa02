"""The random draws of one pipeline micro-batch (parallel.pipeline.MicroBatch), made on stage
0 exactly as pretrain.thinking.unroll makes them: the number of steps, the initial candidate,
the replay rows, the step-size jitter, then each step's Langevin noise. (Here rather than in
parallel/: parallel imports pretrain only through pretrain.model.)

Two sources of numbers, as for `unroll`:
  * `draws=KeyedDraws(...)` (the trainer): every number keyed by (step key, sample id), so a
    pipelined run draws exactly what one process, dp or tp draws; the caller passes the
    initial candidate (replay rows included) and the number of steps;
  * `generator` (tests, benchmarks): one generator in unroll's call order.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from parallel.pipeline import MicroBatch

from .replay import ReplayBuffer
from .thinking import Draws, GeneratorDraws, ThinkingConfig, draw_num_steps, step_size_jitter


def draw_microbatch(
    model: nn.Module,
    input_ids: torch.Tensor,
    cfg: ThinkingConfig,
    generator: Optional[torch.Generator] = None,
    *,
    draws: Optional[Draws] = None,
    replay: Optional[ReplayBuffer] = None,
    num_steps: Optional[int] = None,
    initial_logits: Optional[torch.Tensor] = None,
    fresh_rows: Optional[int] = None,
) -> MicroBatch:
    """Every random draw of one micro-batch, in the order pretrain.thinking.unroll makes them
    (so the same draws give the same trajectory). `input_ids` are all the micro-batch's rows
    (with `initial_logits` from the caller, replay rows included: `fresh_rows` says how many
    came from the data); `replay` appends buffer rows drawn with `generator` instead."""
    draws = draws if draws is not None else GeneratorDraws(generator)
    batch, seq = input_ids.shape[0], input_ids.shape[1] - 1
    dtype = next(p for p in model.parameters()).dtype
    device = input_ids.device
    vocab_ops = model.vocab_ops
    k_steps = num_steps if num_steps is not None else draw_num_steps(cfg, generator)
    y = initial_logits if initial_logits is not None else vocab_ops.shard(
        draws.initial((batch, seq, model.vocab_size), cfg, device, dtype)
    )
    ids = input_ids
    if replay is not None and cfg.replay_fraction > 0 and len(replay) > 0:
        n_replay = int(round(cfg.replay_fraction * batch))
        if n_replay > 0:
            r_ids, r_logits = replay.sample(n_replay, generator)
            ids = torch.cat([input_ids, r_ids])
            y = torch.cat([y, r_logits.to(dtype)])
    rows = y.shape[0]
    jitter = step_size_jitter(draws, cfg, rows, seq, device, dtype)
    noise = None
    if cfg.langevin_std > 0:
        noise = [vocab_ops.shard(draws.langevin(k, (rows, seq, model.vocab_size), device, dtype))
                 for k in range(k_steps)]
    return MicroBatch(ids, y, k_steps, jitter, noise, fresh_rows=batch if fresh_rows is None else fresh_rows)
