"""Helpers for the data-pipeline tests: real English text from Python's own pydoc topics."""
from __future__ import annotations

from pathlib import Path


def pydoc_folder(root: Path, limit_bytes: int) -> Path:
    """The first pydoc topics (real English text), one file each, about `limit_bytes` in all."""
    import pydoc_data.topics

    folder = root / "pydoc"
    folder.mkdir()
    size = 0
    for key in sorted(pydoc_data.topics.topics):
        text = pydoc_data.topics.topics[key]
        (folder / f"{key}.txt").write_text(text, encoding="utf-8")
        size += len(text)
        if size > limit_bytes:
            break
    return folder
