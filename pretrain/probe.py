"""The fixed probe batch by which checkpoints and exports prove their weights: energies of a
fixed noise candidate (EBT) or target log-probabilities (Transformer++) on fixed token ids."""
from __future__ import annotations

from typing import List

import torch

PROBE_SEED = 1234
PROBE_ROWS = 2
PROBE_LEN = 16


def probe_ids(vocab_size: int, seq_len: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(PROBE_SEED)
    return torch.randint(0, vocab_size, (PROBE_ROWS, min(PROBE_LEN, seq_len) + 1), generator=gen)


@torch.no_grad()
def probe_values(model: torch.nn.Module, ids: torch.Tensor) -> List[List[float]]:
    """Energies (EBT) or target log-probabilities (Transformer++) on a probe batch (B, S+1)."""
    device = next(model.parameters()).device
    ids = ids.to(device)
    ctx, tgt = ids[:, :-1], ids[:, 1:]
    was_training = model.training
    model.eval()
    if hasattr(model, "energy"):
        gen = torch.Generator().manual_seed(PROBE_SEED)
        noise = torch.randn(*ctx.shape, model.vocab_size, generator=gen).to(device, model.energy_head.weight.dtype)
        values = model.energy(ctx, noise)  # full-V logits: tensor-parallel energy() slices them itself
    else:
        logits = model.vocab_ops.gather(model(ctx))  # the full vocabulary under tensor parallelism
        values = torch.log_softmax(logits.float(), -1).gather(-1, tgt[..., None])[..., 0]
    model.train(was_training)
    return values.float().cpu().tolist()
