"""The byte format of one shard, and the checks that find damage in it.

A shard is a plain webdataset tar (USTAR headers, byte for byte what `webdataset.TarWriter` writes
with a fixed owner, mode and mtime, so the bytes depend only on the tokens): sample `i` of shard `STEM.tar` is
the member `STEM-{i:06d}.tokens.npy`, a 1-D `.npy` array of `sample_len` token ids. Any webdataset
pipeline can read it (`WebDataset(url).decode()` gives `sample["tokens.npy"]`).

Because every member has the same size, member i is bytes [i * member_bytes, (i + 1) * member_bytes)
of the file: a reader fetches just the members it needs (`check_members` checks each one: tar
header checksum, name, size, type, `.npy` header, token range) and views their tokens without a
copy. Only the size of the file is checked for the shard as a whole (missing, truncated); the
shard's sha256 against the manifest is checked where whole shards are read (`verify_shard_bytes`:
`ebt data verify`, and readers under on_bad_shard=skip). Damage is a one-line `ShardError` naming
the shard (and the sample).
"""
from __future__ import annotations

import hashlib
import io
import tarfile
from functools import lru_cache
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
SAMPLE_EXT = "tokens.npy"
BLOCK = 512
END_OF_ARCHIVE = 2 * BLOCK
DAMAGE_KINDS = ("missing", "truncated tar", "undecodable sample", "bad checksum")


class ShardError(RuntimeError):
    """A damaged shard: `kind` is one of DAMAGE_KINDS, `shard` its path; the message is one line."""

    def __init__(self, message: str, shard: str, kind: str) -> None:
        super().__init__(message)
        self.shard = shard
        self.kind = kind


@lru_cache(maxsize=16)
def npy_header(sample_len: int, dtype: str) -> bytes:
    """The `.npy` header every sample of this length and dtype starts with."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.zeros(sample_len, dtype=dtype), allow_pickle=False)
    return buf.getvalue()[: -sample_len * np.dtype(dtype).itemsize]


def member_bytes(sample_len: int, dtype: str) -> int:
    """Bytes one sample takes in the tar: its header block plus its data padded to 512."""
    data = len(npy_header(sample_len, dtype)) + sample_len * np.dtype(dtype).itemsize
    return BLOCK + -(-data // BLOCK) * BLOCK


def _tar_header(name: str, size: int) -> bytes:
    """The header block `webdataset.TarWriter(mtime=0, user="", group="", mode=0o444)` writes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o444, "", ""
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def encode_shard(tokens: np.ndarray, stem: str) -> Tuple[bytes, str]:
    """The tar bytes of a shard holding the rows of `tokens` (n, sample_len), and their sha256.

    The bytes are exactly what `webdataset.TarWriter` writes for these samples (a test checks it);
    they are assembled as one array because every member differs only in its name's digits and
    its header checksum, which is ~100x faster than writing member by member.
    """
    n, sample_len = tokens.shape
    npy = npy_header(sample_len, tokens.dtype.str)
    size = len(npy) + sample_len * tokens.dtype.itemsize
    stride = member_bytes(sample_len, tokens.dtype.str)
    total = -(-(n * stride + END_OF_ARCHIVE) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE
    out = np.zeros(total, dtype=np.uint8)
    members = out[: n * stride].reshape(n, stride)
    name = f"{stem}-{0:06d}.{SAMPLE_EXT}"
    members[:, :BLOCK] = np.frombuffer(_tar_header(name, size), dtype=np.uint8)
    digits_at = len(stem) + 1
    index = np.arange(n, dtype=np.int64)
    for k in range(6):
        members[:, digits_at + k] = ord("0") + index // 10 ** (5 - k) % 10
    members[:, 148:156] = ord(" ")
    checksum = members[:, :BLOCK].sum(axis=1, dtype=np.int64)
    for k in range(6):
        members[:, 148 + k] = ord("0") + checksum // 8 ** (5 - k) % 8
    members[:, 154] = 0
    members[:, BLOCK:BLOCK + len(npy)] = np.frombuffer(npy, dtype=np.uint8)
    members[:, BLOCK + len(npy):BLOCK + size] = np.ascontiguousarray(tokens).view(np.uint8).reshape(n, size - len(npy))
    data = out.tobytes()
    return data, hashlib.sha256(data).hexdigest()


def _digits(fields: np.ndarray, base: int) -> np.ndarray:
    """Values of fixed-width digit fields, one per row (a non-digit gives a wrong value, not an error)."""
    digits = fields.astype(np.int64) - ord("0")
    return digits @ (base ** np.arange(fields.shape[1] - 1, -1, -1, dtype=np.int64))


def _first_bad(mask: np.ndarray) -> Optional[int]:
    bad = np.flatnonzero(mask)
    return int(bad[0]) if bad.size else None


def _damaged(where: str, kind: str, detail: str) -> ShardError:
    return ShardError(f"damaged shard {where}: {kind}: {detail}", where, kind)


def check_members(members: np.ndarray, indices: np.ndarray, *, where: str, sample_len: int, dtype: str,
                  vocab_size: int) -> np.ndarray:
    """The (k, sample_len) tokens of k members (rows of `members`, uint8 (k, member_bytes)) that are
    samples `indices` of the shard at `where`, after checking each one: tar header checksum, member
    name, size and type, `.npy` header, token ids below `vocab_size`. A zero-copy view."""
    headers = members[:, :BLOCK]
    stored_sum = _digits(headers[:, 148:154], 8)
    actual_sum = headers.sum(axis=1, dtype=np.int64) - headers[:, 148:156].sum(axis=1, dtype=np.int64) + 8 * ord(" ")
    stem = where.rsplit("/", 1)[-1][: -len(".tar")]
    prefix = np.frombuffer(f"{stem}-".encode(), dtype=np.uint8)
    suffix = np.frombuffer(f".{SAMPLE_EXT}\0".encode(), dtype=np.uint8)
    p, s = len(prefix), len(suffix)
    npy = np.frombuffer(npy_header(sample_len, dtype), dtype=np.uint8)
    size_field = np.frombuffer(b"%011o\0" % (len(npy) + sample_len * np.dtype(dtype).itemsize), dtype=np.uint8)
    checks = (
        ("tar header checksum", stored_sum != actual_sum),
        ("member name", (headers[:, :p] != prefix).any(axis=1)
         | (_digits(headers[:, p:p + 6], 10) != indices)
         | (headers[:, p + 6:p + 6 + s] != suffix).any(axis=1)),
        ("member size", (headers[:, 124:136] != size_field).any(axis=1)),
        ("member type", headers[:, 156] != ord("0")),
        (".npy header", (members[:, BLOCK:BLOCK + len(npy)] != npy).any(axis=1)),
    )
    for what, bad in checks:
        row = _first_bad(bad)
        if row is not None:
            raise _damaged(where, "undecodable sample", f"{stem}-{int(indices[row]):06d}.{SAMPLE_EXT}: wrong {what}")
    start = BLOCK + len(npy)
    tokens = members[:, start:start + sample_len * np.dtype(dtype).itemsize].view(dtype)
    row = _first_bad(tokens.max(axis=1) >= vocab_size) if len(tokens) else None
    if row is not None:
        raise _damaged(where, "undecodable sample",
                       f"{stem}-{int(indices[row]):06d}.{SAMPLE_EXT}: token id >= vocab size {vocab_size}")
    return tokens


def check_size(where: str, size: Optional[int], *, samples: int, sample_len: int, dtype: str) -> None:
    """The checks every reader can make from the file's size alone: missing, or truncated."""
    if size is None:
        raise _damaged(where, "missing", "file not found")
    stride = member_bytes(sample_len, dtype)
    if size < samples * stride + END_OF_ARCHIVE:
        complete = min(samples, size // stride)
        raise _damaged(where, "truncated tar", f"{size} bytes hold {complete} of {samples} samples and no end-of-archive")


def verify_shard_bytes(data: bytes, where: str, *, samples: int, sample_len: int, dtype: str, sha256: str,
                       vocab_size: int) -> np.ndarray:
    """The (samples, sample_len) token block of a whole shard's bytes, after every check including sha256."""
    check_size(where, len(data), samples=samples, sample_len=sample_len, dtype=dtype)
    stride = member_bytes(sample_len, dtype)
    members = np.frombuffer(data, dtype=np.uint8, count=samples * stride).reshape(samples, stride)
    tokens = check_members(members, np.arange(samples), where=where, sample_len=sample_len, dtype=dtype,
                           vocab_size=vocab_size)
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise _damaged(where, "bad checksum", f"sha256 {digest[:16]}... but the manifest says {sha256[:16]}...")
    return tokens


def read_shard(
    path: Path, *, samples: int, sample_len: int, dtype: str, sha256: str, vocab_size: int
) -> np.ndarray:
    """The (samples, sample_len) token block of a local shard file, after checking it for every kind of damage."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise _damaged(str(path), "missing", "file not found") from None
    return verify_shard_bytes(data, str(path), samples=samples, sample_len=sample_len, dtype=dtype, sha256=sha256,
                              vocab_size=vocab_size)
