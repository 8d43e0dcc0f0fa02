"""Fixtures shared by the whole suite."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One data cache (tokenizers and shards of the shipped corpora) for every test that trains:
    each corpus/tokenizer pair is prepared once per session (data_pipeline caches by content)."""
    return tmp_path_factory.mktemp("data_cache")
