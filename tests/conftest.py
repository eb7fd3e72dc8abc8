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


@pytest.fixture(autouse=True)
def package_logger_restored():
    """An in-process run calls setup_logging, which gives the "megatron_ernie" logger its own stdout
    handler and stops propagation; left that way, every later test's caplog (on the root logger) sees
    nothing. Each test starts from, and leaves, the logger as the session found it."""
    import logging

    log = logging.getLogger("megatron_ernie")
    saved = (list(log.handlers), log.level, log.propagate)
    yield
    log.handlers[:] = saved[0]
    log.setLevel(saved[1])  # through setLevel, so the loggers' cached levels are cleared too
    log.propagate = saved[2]
