"""Where a dataset's files live, and how byte ranges of them are read: a local folder, an
`http(s)://` URL, or any other fsspec URL (`s3://...` when its driver is installed).

Every reader asks for `(file, [(offset, length), ...])` and gets exactly those bytes back, so a rank
reads only the members it needs. Remote reads retry connection errors, timeouts, truncated bodies
and HTTP 5xx/429 a bounded number of times with exponential backoff, then fail with one line naming
the URL (`RemoteReadError`); a missing file is `FileNotFoundError` at once. HTTP ranges are fetched
by a few threads in parallel, each with its own keep-alive connection. Every storage counts the
bytes and requests it served (`bytes_read`, `requests`) so benchmarks can measure per-rank I/O.

With `cache_dir` set, remote member bytes are also kept on local disk: one sparse file per shard
plus one flag byte per member (`<cache_dir>/<manifest fingerprint>/<shard>` and `.have`). The flag
is written after the bytes, one byte with pwrite, so concurrent readers (ranks, DataLoader workers)
never see a flag for bytes that are not there; readers still check every member they get.
"""
from __future__ import annotations

import http.client
import logging
import os
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

log = logging.getLogger(__name__)

Range = Tuple[int, int]
"""(offset, length) in bytes."""


class RemoteReadError(OSError):
    """A remote read that still failed after every retry; the message is one line naming the URL."""


@dataclass(frozen=True)
class RemoteOptions:
    """How remote reads behave (from `data.remote_*`)."""

    retries: int = 5
    timeout_s: float = 30.0
    backoff_s: float = 0.2
    threads: int = 4


def is_url(location: str) -> bool:
    """True for `scheme://...` (http, https, s3, gs, file, memory, ...), False for a local path."""
    scheme = urllib.parse.urlsplit(str(location)).scheme
    return len(scheme) > 1 and "://" in str(location)


def coalesce(ranges: Sequence[Range]) -> List[Tuple[int, int, List[int]]]:
    """Merge ranges (after sorting) that touch or overlap into larger reads.

    Returns (offset, length, indices of the input ranges inside it) per merged read.
    """
    order = sorted(range(len(ranges)), key=lambda i: ranges[i][0])
    merged: List[Tuple[int, int, List[int]]] = []
    for i in order:
        off, length = ranges[i]
        if merged and off <= merged[-1][0] + merged[-1][1]:
            start, size, members = merged[-1]
            merged[-1] = (start, max(size, off + length - start), members + [i])
        else:
            merged.append((off, length, [i]))
    return merged


class Storage:
    """Byte ranges of the files of one dataset location; subclasses implement `_read_runs` and `size`."""

    location: str

    def __init__(self) -> None:
        self.bytes_read = 0
        self.requests = 0
        self._lock = threading.Lock()

    def _count(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_read += nbytes
            self.requests += 1

    def where(self, name: str) -> str:
        """The file's full path or URL, for messages."""
        raise NotImplementedError

    def size(self, name: str) -> Optional[int]:
        """The file's size in bytes, or None if it does not exist."""
        raise NotImplementedError

    def _read_runs(self, name: str, runs: Sequence[Range]) -> List[bytes]:
        raise NotImplementedError

    def read_ranges(self, name: str, ranges: Sequence[Range]) -> List[bytes]:
        """The bytes of each range of `name` (in the order given), read as coalesced runs."""
        merged = coalesce(ranges)
        runs = self._read_runs(name, [(off, length) for off, length, _ in merged])
        out: List[bytes] = [b""] * len(ranges)
        for (start, _, members), data in zip(merged, runs):
            view = memoryview(data)
            for i in members:
                off, length = ranges[i]
                out[i] = view[off - start: off - start + length]
        return out

    def read(self, name: str) -> bytes:
        """The whole file; FileNotFoundError naming it if it is not there."""
        size = self.size(name)
        if size is None:
            raise FileNotFoundError(f"{self.where(name)} does not exist")
        return bytes(self._read_runs(name, [(0, size)])[0]) if size else b""

    def __getstate__(self) -> Dict[str, Any]:  # DataLoader workers get a copy without locks/connections
        state = dict(self.__dict__)
        state.pop("_lock", None)
        state.pop("_local", None)
        state.pop("_pool", None)
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class LocalStorage(Storage):
    """A folder on a local (or mounted network) file system: os.pread per coalesced run."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = Path(root)
        self.location = str(self.root)

    def where(self, name: str) -> str:
        return str(self.root / name)

    def size(self, name: str) -> Optional[int]:
        try:
            return (self.root / name).stat().st_size
        except FileNotFoundError:
            return None

    def _read_runs(self, name: str, runs: Sequence[Range]) -> List[bytes]:
        fd = os.open(self.root / name, os.O_RDONLY)
        try:
            out = []
            for off, length in runs:
                data = os.pread(fd, length, off)
                self._count(len(data))
                out.append(data)
            return out
        finally:
            os.close(fd)


class _Retrying(Storage):
    """Bounded retries with exponential backoff around one attempt at a run."""

    options: RemoteOptions

    def _attempt(self, name: str, run: Range) -> bytes:
        raise NotImplementedError

    def _with_retries(self, what: str, attempt: Any) -> Any:
        last = ""
        for k in range(self.options.retries + 1):
            try:
                return attempt()
            except FileNotFoundError:
                raise
            except _Transient as err:
                last = str(err)
            except (OSError, http.client.HTTPException) as err:  # connection reset, timeout, short body, ...
                last = f"{type(err).__name__}: {err}".rstrip(": ")
            if k < self.options.retries:
                time.sleep(min(self.options.backoff_s * 2 ** k, 10.0))
        raise RemoteReadError(f"{what}: {last} (gave up after {self.options.retries + 1} attempts)")

    def _read_runs(self, name: str, runs: Sequence[Range]) -> List[bytes]:
        def one(run: Range) -> bytes:
            data = self._with_retries(f"{self.where(name)} bytes {run[0]}-{run[0] + run[1] - 1}",
                                      lambda: self._attempt(name, run))
            self._count(len(data))
            return data

        if len(runs) <= 1 or self.options.threads <= 1:
            return [one(run) for run in runs]
        pool = self._per_process("_pool", lambda: ThreadPoolExecutor(self.options.threads, thread_name_prefix="ebt-io"))
        return list(pool.map(one, runs))

    def _per_process(self, key: str, make: Any) -> Any:
        """An object of this process only: a forked DataLoader worker must not share the parent's
        connections (two processes on one socket read each other's responses) or thread pool."""
        with self._lock:
            held = self.__dict__.get(key)
            if held is None or held[0] != os.getpid():
                held = self.__dict__[key] = (os.getpid(), make())
            return held[1]


class _Transient(Exception):
    """A response worth retrying (5xx, 429, a body of the wrong length)."""


class HttpStorage(_Retrying):
    """Files under an http(s):// base URL, read with `Range: bytes=a-b` on keep-alive connections."""

    def __init__(self, base_url: str, options: RemoteOptions) -> None:
        super().__init__()
        self.location = base_url if base_url.endswith("/") else base_url + "/"
        self.options = options
        parts = urllib.parse.urlsplit(self.location)
        self._https, self._host, self._prefix = parts.scheme == "https", parts.netloc, parts.path

    def where(self, name: str) -> str:
        return self.location + urllib.parse.quote(name)

    def _connection(self) -> http.client.HTTPConnection:
        local = self._per_process("_local", threading.local)
        conn = getattr(local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            conn = local.conn = cls(self._host, timeout=self.options.timeout_s)
        return conn

    def _drop_connection(self) -> None:
        local = self._per_process("_local", threading.local)
        conn = getattr(local, "conn", None)
        if conn is not None:
            conn.close()
            local.conn = None

    def _request(self, method: str, name: str, headers: Dict[str, str]) -> Tuple[int, Dict[str, str], bytes]:
        conn = self._connection()
        try:
            conn.request(method, self._prefix + urllib.parse.quote(name), headers=headers)
            response = conn.getresponse()
            body = response.read()
            result = response.status, {k.lower(): v for k, v in response.getheaders()}, body
            if response.will_close:
                self._drop_connection()
        except BaseException:
            self._drop_connection()
            raise
        status = result[0]
        if status == 404 or status == 410:
            raise FileNotFoundError(f"{self.where(name)}: HTTP {status} (not found)")
        if status >= 500 or status == 429:
            raise _Transient(f"HTTP {status}")
        if status >= 400:
            raise RemoteReadError(f"{self.where(name)}: HTTP {status}")
        return result

    def size(self, name: str) -> Optional[int]:
        try:
            _, headers, _ = self._with_retries(self.where(name), lambda: self._request("HEAD", name, {}))
        except FileNotFoundError:
            return None
        if "content-length" not in headers:
            raise RemoteReadError(f"{self.where(name)}: the server sent no Content-Length")
        return int(headers["content-length"])

    def _attempt(self, name: str, run: Range) -> bytes:
        off, length = run
        status, headers, body = self._request("GET", name, {"Range": f"bytes={off}-{off + length - 1}"})
        if status == 200:  # the server ignored Range and sent the whole file
            body = body[off:off + length]
        elif status != 206 or not headers.get("content-range", "").startswith(f"bytes {off}-{off + length - 1}/"):
            raise RemoteReadError(f"{self.where(name)}: asked for bytes {off}-{off + length - 1}, got HTTP {status} "
                                  f"{headers.get('content-range', 'without Content-Range')}")
        if len(body) != length:
            raise _Transient(f"{len(body)} of {length} bytes (truncated body)")
        return body


class FsspecStorage(_Retrying):
    """Files under any fsspec URL (`s3://bucket/dir`, `gs://...`, `file:///...`, `memory://...`)."""

    def __init__(self, url: str, options: RemoteOptions) -> None:
        super().__init__()
        import fsspec

        try:
            self.fs, self.root = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as exc:
            raise ValueError(f"data.path: {url}: fsspec cannot open it ({exc})") from None
        self.location = url.rstrip("/") + "/"
        self.options = options

    def where(self, name: str) -> str:
        return self.location + name

    def size(self, name: str) -> Optional[int]:
        path = f"{self.root.rstrip('/')}/{name}"
        try:
            return int(self._with_retries(self.where(name), lambda: self.fs.size(path)))
        except FileNotFoundError:
            return None

    def _attempt(self, name: str, run: Range) -> bytes:
        off, length = run
        data = self.fs.cat_file(f"{self.root.rstrip('/')}/{name}", start=off, end=off + length)
        if len(data) != length:
            raise _Transient(f"{len(data)} of {length} bytes (short read)")
        return data


class CachedStorage(Storage):
    """Another storage's member ranges, kept in a local sparse file per shard (see the module docstring).

    Only `read_members` is cached (fixed-size members, one flag byte each); other reads pass through.
    `bind(fingerprint)` picks the manifest's own folder under `cache_root` once the manifest is known.
    """

    def __init__(self, inner: Storage, cache_root: Path) -> None:
        super().__init__()
        self.inner = inner
        self.location = inner.location
        self.cache_root = Path(cache_root)
        self.cache_dir: Optional[Path] = None

    def bind(self, fingerprint: str) -> None:
        self.cache_dir = self.cache_root / fingerprint
        self.cache_dir.mkdir(parents=True, exist_ok=True)

    def where(self, name: str) -> str:
        return self.inner.where(name)

    def size(self, name: str) -> Optional[int]:
        return self.inner.size(name)

    def _read_runs(self, name: str, runs: Sequence[Range]) -> List[bytes]:
        data = self.inner._read_runs(name, runs)
        self._count(sum(len(d) for d in data))
        return data

    def read_members(self, name: str, stride: int, indices: Sequence[int], count: int) -> List[bytes]:
        """Members `indices` (each `stride` bytes at `i * stride`) of a shard of `count` members."""
        if self.cache_dir is None:
            raise RuntimeError("CachedStorage.bind(fingerprint) must be called before reading members")
        fd = os.open(self.cache_dir / name, os.O_RDWR | os.O_CREAT, 0o644)
        flags = os.open(self.cache_dir / f"{name}.have", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            have = os.pread(flags, count, 0).ljust(count, b"\0")
            missing = [i for i in indices if have[i] != 1]
            fetched = dict(zip(missing, self.inner.read_ranges(name, [(i * stride, stride) for i in missing])))
            for i, data in fetched.items():
                os.pwrite(fd, data, i * stride)
            if fetched:
                os.fsync(fd)  # the bytes are on disk before any flag says so
                for i in fetched:
                    os.pwrite(flags, b"\1", i)
            out = [fetched[i] if i in fetched else os.pread(fd, stride, i * stride) for i in indices]
            self._count(sum(len(d) for d in out))
            return out
        finally:
            os.close(fd)
            os.close(flags)


def open_storage(location: str, options: RemoteOptions = RemoteOptions(), cache_dir: Optional[str] = None) -> Storage:
    """The storage of `data.path`: a local folder, an http(s) URL, or another fsspec URL.

    `cache_dir` (remote locations only) keeps fetched members on local disk: see CachedStorage.
    """
    if not is_url(location):
        return LocalStorage(Path(location).expanduser())
    scheme = urllib.parse.urlsplit(location).scheme
    inner: Storage = HttpStorage(location, options) if scheme in ("http", "https") else FsspecStorage(location, options)
    return inner if cache_dir is None else CachedStorage(inner, Path(cache_dir).expanduser())


def member_runs(indices: np.ndarray) -> List[Tuple[int, int]]:
    """(first, count) of each run of consecutive values in sorted, distinct `indices`."""
    if not len(indices):
        return []
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(indices)]])
    return [(int(indices[a]), int(b - a)) for a, b in zip(starts, stops)]


def shard_members(storage: Storage, name: str, stride: int, indices: np.ndarray, count: int) -> np.ndarray:
    """Members `indices` (sorted, distinct) of shard `name`, member i being bytes [i * stride, (i + 1) * stride),
    as a uint8 (len(indices), stride) array; each run of consecutive members is one read."""
    if isinstance(storage, CachedStorage):
        data = storage.read_members(name, stride, indices.tolist(), count)
        return np.frombuffer(b"".join(data), dtype=np.uint8).reshape(len(indices), stride)
    runs = member_runs(indices)
    blocks = storage._read_runs(name, [(first * stride, n * stride) for first, n in runs])
    joined = blocks[0] if len(blocks) == 1 else b"".join(blocks)
    return np.frombuffer(joined, dtype=np.uint8).reshape(len(indices), stride)
