"""Shared fixtures: the corpus/tokenizer cache every multi-process test reuses."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> str:
    """One corpus/tokenizer cache for the whole session (built on first use)."""
    path = os.environ.get("ERNIE_TEST_DATA_CACHE") or str(tmp_path_factory.mktemp("data-cache"))
    os.environ["ERNIE_DATA_CACHE"] = path
    return path
