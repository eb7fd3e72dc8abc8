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


@pytest.fixture(scope="module")
def megatron_single_rank():
    """gloo world of one rank + megatron-core TP=PP=1; torn down only if created here."""
    import socket

    import torch
    from megatron.core import parallel_state

    created_pg = not torch.distributed.is_initialized()
    if created_pg:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(sock.getsockname()[1])
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    created_mp = not parallel_state.model_parallel_is_initialized()
    if created_mp:
        parallel_state.initialize_model_parallel(1, 1)
    yield parallel_state
    if created_mp:
        parallel_state.destroy_model_parallel()
    if created_pg:
        torch.distributed.destroy_process_group()
