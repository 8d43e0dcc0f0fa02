"""The random draws of one pipeline micro-batch (parallel.pipeline.MicroBatch), made on stage
0 exactly as pretrain.thinking.unroll makes them from one generator: the number of steps,
the initial candidate, the replay rows, the step-size jitter, then each step's Langevin
noise. (Here rather than in parallel/: parallel imports pretrain only through pretrain.model.)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from parallel.pipeline import MicroBatch

from .replay import ReplayBuffer
from .thinking import ThinkingConfig, draw_num_steps, draw_rand, draw_randn, initial_candidates


def draw_microbatch(
    model: nn.Module,
    input_ids: torch.Tensor,
    cfg: ThinkingConfig,
    generator: Optional[torch.Generator],
    *,
    replay: Optional[ReplayBuffer] = None,
    num_steps: Optional[int] = None,
    initial_logits: Optional[torch.Tensor] = None,
) -> MicroBatch:
    """Every random draw of one micro-batch, in the order pretrain.thinking.unroll makes them
    (so the same generator gives the same trajectory): the number of steps, the initial
    candidate, the replay rows, the step-size jitter, then each step's Langevin noise."""
    context_ids = input_ids[:, :-1]
    batch, seq = context_ids.shape
    dtype = next(p for p in model.parameters()).dtype
    device = input_ids.device
    vocab_ops = model.vocab_ops
    k_steps = num_steps if num_steps is not None else draw_num_steps(cfg, generator)
    y = initial_logits if initial_logits is not None else vocab_ops.shard(
        initial_candidates(batch, seq, model.vocab_size, cfg, generator, device, dtype)
    )
    ids = input_ids
    if replay is not None and cfg.replay_fraction > 0 and len(replay) > 0:
        n_replay = int(round(cfg.replay_fraction * batch))
        if n_replay > 0:
            r_ids, r_logits = replay.sample(n_replay, generator)
            ids = torch.cat([input_ids, r_ids])
            y = torch.cat([y, r_logits.to(dtype)])
    jitter = None
    if cfg.step_size_jitter > 1.0:
        s = cfg.step_size_jitter
        jitter = 1.0 / s + draw_rand((y.shape[0], seq, 1), generator, device, dtype) * (s - 1.0 / s)
    noise = None
    if cfg.langevin_std > 0:
        noise = [vocab_ops.shard(draw_randn((y.shape[0], seq, model.vocab_size), generator, device, dtype))
                 for _ in range(k_steps)]
    return MicroBatch(ids, y, k_steps, jitter, noise, fresh_rows=batch)
