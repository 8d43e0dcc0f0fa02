"""The S2 replay buffer: past sequences and the final candidate logits thinking reached on them.

Rows drawn from it start thinking from their stored logits instead of noise (EBT_SPEC recipe
table: 192 sequences, +50% rows). A ring of `capacity` slots, filled in order and then
overwritten oldest first; `sample` draws slot indices uniformly from the filled ones.

Memory is proportional to what is stored: a slot is allocated when it is first filled (one
(S+1) id row and one (S, V) logit row), never `capacity x S x V` up front. Logits are kept in
`dtype`: float32 (exact for float32 training, the default) or bfloat16 (half the bytes; rows
then start from rounded logits, see docs/performance.md for the measured effect on the loss).

Where the logit rows live (`thinking.replay_storage`):
* `memory`: tensors in this process;
* `disk`: one file of fixed-size slots, written with `os.pwrite` and read with `os.preadv`
  (never mapped), so the rows sit in the kernel's page cache, not in the process's memory.
  At V = 50277, S = 64 a full buffer of 192 rows is 2.47 GB of float32: this keeps an S2 run's
  resident memory near an S1 run's. The file is unlinked as soon as it is opened (the disk space
  comes back when the process ends, and no stale file is left), and it holds exactly the same
  float32 (or bfloat16) bytes as `memory` would: the storage changes nothing numerically;
* `auto` (the default): `disk` when a directory is given and the full buffer would exceed
  `AUTO_DISK_BYTES`, decided at the first row; else `memory`.
`state_dict` holds only the filled slots, in the storage dtype, so a checkpoint carries exactly
what is stored and a resumed buffer samples the same rows (with `disk`, the rows are read into
memory while the checkpoint is written).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Tuple

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
STORAGES = ("auto", "memory", "disk")
AUTO_DISK_BYTES = 1 << 30
"""`auto` keeps a buffer whose full capacity exceeds this many bytes on disk."""


def storage_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    """`thinking.replay_dtype` -> torch dtype (None keeps the logits' own dtype)."""
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"thinking.replay_dtype: {name!r} is not one of {tuple(DTYPES)}")
    return DTYPES[name]


class _MemoryRows:
    """Logit rows as tensors of this process."""

    def __init__(self) -> None:
        self.rows: List[torch.Tensor] = []

    def put(self, slot: int, row: torch.Tensor) -> None:
        if slot == len(self.rows):
            self.rows.append(row)
        else:
            self.rows[slot] = row

    def get(self, slots: List[int]) -> torch.Tensor:
        return torch.stack([self.rows[i] for i in slots])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.rows)


class _DiskRows:
    """Logit rows as fixed-size slots of an unlinked file, by pwrite/preadv (no mapping)."""

    def __init__(self, path: Path, shape: Tuple[int, ...], dtype: torch.dtype) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.unlink(path)
        self.shape, self.dtype = shape, dtype
        self.row_bytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        self.count = 0

    def put(self, slot: int, row: torch.Tensor) -> None:
        if tuple(row.shape) != self.shape or row.dtype != self.dtype:
            raise ValueError(f"ReplayBuffer: row {tuple(row.shape)} {row.dtype} does not fit the buffer's "
                             f"{self.shape} {self.dtype} slots")
        data = memoryview(row.contiguous().view(torch.uint8).numpy()).cast("B")
        done = 0
        while done < self.row_bytes:
            done += os.pwrite(self.fd, data[done:], slot * self.row_bytes + done)
        self.count = max(self.count, slot + 1)

    def get(self, slots: List[int]) -> torch.Tensor:
        out = torch.empty((len(slots), *self.shape), dtype=self.dtype)
        raw = out.view(torch.uint8).numpy().reshape(len(slots), self.row_bytes)
        for i, slot in enumerate(slots):
            view, done = memoryview(raw[i]), 0
            while done < self.row_bytes:
                got = os.preadv(self.fd, [view[done:]], slot * self.row_bytes + done)
                if got == 0:
                    raise OSError(f"ReplayBuffer: short read of slot {slot} from the replay file")
                done += got
        return out

    def nbytes(self) -> int:
        return self.count * self.row_bytes

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:
        self.close()


class ReplayBuffer:
    """A ring buffer of (ids (S+1,), logits (S, V)) rows; checkpointable.

    storage: `auto`, `memory` or `disk` (module docstring); `directory`: where a `disk` buffer
    puts its (immediately unlinked) file, `name` its file name (one per process)."""

    def __init__(self, capacity: int, dtype: Optional[str] = None, storage: str = "memory",
                 directory: Optional[Path] = None, name: str = "replay.bin") -> None:
        if capacity < 1:
            raise ValueError(f"thinking.replay_size: a replay buffer needs capacity >= 1, got {capacity}")
        if storage not in STORAGES:
            raise ValueError(f"thinking.replay_storage: {storage!r} is not one of {STORAGES}")
        if storage == "disk" and directory is None:
            raise ValueError("thinking.replay_storage: 'disk' needs a directory for the replay file")
        self.capacity = capacity
        self.dtype_name = dtype
        self.dtype = storage_dtype(dtype)
        self.storage = storage
        self.directory, self.name = (Path(directory) if directory is not None else None), name
        self._ids: List[torch.Tensor] = []
        self._rows = None  # _MemoryRows or _DiskRows, chosen at the first row
        self.next = 0

    @property
    def size(self) -> int:
        return len(self._ids)

    def __len__(self) -> int:
        return self.size

    @property
    def on_disk(self) -> bool:
        return isinstance(self._rows, _DiskRows)

    def nbytes(self) -> int:
        """Bytes of the stored rows (in memory, or in the file for `disk`)."""
        rows = self._rows.nbytes() if self._rows is not None else 0
        return rows + sum(t.numel() * t.element_size() for t in self._ids)

    def _open(self, shape: Tuple[int, ...], dtype: torch.dtype) -> None:
        full = self.capacity * torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        disk = self.storage == "disk" or (self.storage == "auto" and self.directory is not None
                                          and full > AUTO_DISK_BYTES)
        self._rows = _DiskRows(self.directory / self.name, tuple(shape), dtype) if disk else _MemoryRows()

    def add(self, ids: torch.Tensor, logits: torch.Tensor) -> None:
        """Stores each row of ids (B, S+1) and logits (B, S, V), overwriting the oldest when full."""
        ids, logits = ids.detach(), logits.detach()
        dtype = self.dtype or logits.dtype
        if self._rows is None:
            self._open(tuple(logits.shape[1:]), dtype)
        if self.on_disk:
            # Written from (at most) one converted copy of the batch: per-row copies of this size
            # fragment the C heap (each small id row splits a freed one) and stay resident.
            logits = logits.to(dtype).contiguous()
        for row in range(ids.shape[0]):
            r_ids = ids[row].clone()
            # In memory, copies: a view would keep the whole batch's (B, S, V) tensor alive.
            r_logits = logits[row] if self.on_disk else logits[row].to(dtype, copy=True)
            self._rows.put(self.next, r_logits)
            if self.size < self.capacity:
                self._ids.append(r_ids)
            else:
                self._ids[self.next] = r_ids
            self.next = (self.next + 1) % self.capacity

    def sample(self, n: int, generator: Optional[torch.Generator]) -> Tuple[torch.Tensor, torch.Tensor]:
        """n rows drawn uniformly (with replacement) over the filled slots: (ids, logits) in the
        storage dtype."""
        if self.size == 0:
            raise ValueError("ReplayBuffer.sample: the buffer is empty")
        idx = torch.randint(0, self.size, (n,), generator=generator, device="cpu").tolist()
        return torch.stack([self._ids[i] for i in idx]), self._rows.get(idx)

    def state_dict(self) -> dict:
        state = {"size": self.size, "next": self.next, "capacity": self.capacity, "dtype": self.dtype_name}
        if self.size:
            state.update(ids=torch.stack(self._ids), logits=self._rows.get(list(range(self.size))))
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restores a `state_dict` (also the older layout that stored all `capacity` slots:
        only the first `size` are filled there). The storage stays this buffer's own."""
        self.capacity, self.next = int(state["capacity"]), int(state["next"])
        size = int(state["size"])
        if "dtype" in state:
            self.dtype_name = state["dtype"]
            self.dtype = storage_dtype(self.dtype_name)
        if isinstance(self._rows, _DiskRows):
            self._rows.close()
        self._ids, self._rows = [], None
        if size == 0 or state.get("ids") is None:
            return
        ids, logits = state["ids"][:size], state["logits"][:size]
        if self.dtype is not None:
            logits = logits.to(self.dtype)
        self._ids = [r.clone() for r in ids]
        self._open(tuple(logits.shape[1:]), logits.dtype)
        logits = logits.contiguous()
        for slot in range(size):
            self._rows.put(slot, logits[slot] if self.on_disk else logits[slot].clone())
