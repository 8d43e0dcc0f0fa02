"""Operations on the (B, S, V) candidate, owned by the model so tensor parallelism can shard V.

The thinking loop never calls softmax or cross-entropy on the candidate directly: it asks
`model.vocab_ops`. Single process: `LocalVocab`. Tensor parallelism replaces it with a
vocabulary-parallel implementation (each rank holds a V/tp slice of y, its softmax and the
matching columns of W_v2e), which must be twice differentiable.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class LocalVocab:
    """The whole vocabulary on this process."""

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """softmax over V in at least float32, returned in the logits' dtype."""
        work = torch.promote_types(logits.dtype, torch.float32)
        return torch.softmax(logits.to(work), dim=-1).to(logits.dtype)

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean token CE in at least float32; targets < 0 (-100) are padding."""
        work = torch.promote_types(logits.dtype, torch.float32)
        return F.cross_entropy(logits.to(work).flatten(0, 1), targets.flatten(), ignore_index=-100)

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        """This process's slice of a full-vocabulary tensor (last dim)."""
        return full

    def local_width(self, vocab_size: int) -> int:
        """Width of this process's slice of a V-wide tensor."""
        return vocab_size

    def as_local(self, logits: torch.Tensor) -> torch.Tensor:
        """Full-V logits as this process's slice (the whole of them here)."""
        return logits

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """A replicated value entering vocabulary arithmetic (identity on one process)."""
        return x

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """The full-V tensor (it already is one here)."""
        return local.detach()


LOCAL_VOCAB = LocalVocab()
