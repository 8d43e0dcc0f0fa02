"""The S2 replay buffer: past sequences and the final candidate logits thinking reached on them.

Rows drawn from it start thinking from their stored logits instead of noise (EBT_SPEC recipe
table: 192 sequences, +50% rows). A ring of `capacity` slots, filled in order and then
overwritten oldest first; `sample` draws slot indices uniformly from the filled ones.

Memory is proportional to what is stored: a slot is allocated when it is first filled (one
(S+1) id row and one (S, V) logit row), never `capacity x S x V` up front (2.5 GB at
V = 50277, S = 64, 192 slots). Logits are kept in `dtype`: float32 (exact for float32
training, the default) or bfloat16 (half the memory and checkpoint bytes; rows then start
from rounded logits, see docs/performance.md for the measured effect on the loss).
`state_dict` holds only the filled slots, in the storage dtype, so a checkpoint carries
exactly what is stored and a resumed buffer samples the same rows.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def storage_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    """`thinking.replay_dtype` -> torch dtype (None keeps the logits' own dtype)."""
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"thinking.replay_dtype: {name!r} is not one of {tuple(DTYPES)}")
    return DTYPES[name]


class ReplayBuffer:
    """A ring buffer of (ids (S+1,), logits (S, V)) rows; checkpointable."""

    def __init__(self, capacity: int, dtype: Optional[str] = None) -> None:
        if capacity < 1:
            raise ValueError(f"thinking.replay_size: a replay buffer needs capacity >= 1, got {capacity}")
        self.capacity = capacity
        self.dtype_name = dtype
        self.dtype = storage_dtype(dtype)
        self._ids: List[torch.Tensor] = []
        self._logits: List[torch.Tensor] = []
        self.next = 0

    @property
    def size(self) -> int:
        return len(self._ids)

    def __len__(self) -> int:
        return self.size

    def nbytes(self) -> int:
        """Bytes held by the stored rows."""
        return sum(t.numel() * t.element_size() for t in self._ids + self._logits)

    def add(self, ids: torch.Tensor, logits: torch.Tensor) -> None:
        """Stores each row of ids (B, S+1) and logits (B, S, V), overwriting the oldest when full."""
        ids, logits = ids.detach(), logits.detach()
        for row in range(ids.shape[0]):
            # Copies: a view would keep the whole batch's (B, S, V) tensor alive.
            r_ids = ids[row].clone()
            r_logits = logits[row].to(self.dtype or logits.dtype, copy=True)
            if self.size < self.capacity:
                self._ids.append(r_ids)
                self._logits.append(r_logits)
            else:
                self._ids[self.next], self._logits[self.next] = r_ids, r_logits
            self.next = (self.next + 1) % self.capacity

    def sample(self, n: int, generator: Optional[torch.Generator]) -> Tuple[torch.Tensor, torch.Tensor]:
        """n rows drawn uniformly (with replacement) over the filled slots: (ids, logits) in the
        storage dtype."""
        if self.size == 0:
            raise ValueError("ReplayBuffer.sample: the buffer is empty")
        idx = torch.randint(0, self.size, (n,), generator=generator, device="cpu").tolist()
        return torch.stack([self._ids[i] for i in idx]), torch.stack([self._logits[i] for i in idx])

    def state_dict(self) -> dict:
        state = {"size": self.size, "next": self.next, "capacity": self.capacity, "dtype": self.dtype_name}
        if self.size:
            state.update(ids=torch.stack(self._ids), logits=torch.stack(self._logits))
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restores a `state_dict` (also the older layout that stored all `capacity` slots:
        only the first `size` are filled there)."""
        self.capacity, self.next = int(state["capacity"]), int(state["next"])
        size = int(state["size"])
        if "dtype" in state:
            self.dtype_name = state["dtype"]
            self.dtype = storage_dtype(self.dtype_name)
        if size == 0 or state.get("ids") is None:
            self._ids, self._logits = [], []
            return
        ids, logits = state["ids"][:size], state["logits"][:size]
        if self.dtype is not None:
            logits = logits.to(self.dtype)
        self._ids = [r.clone() for r in ids]
        self._logits = [r.clone() for r in logits]
