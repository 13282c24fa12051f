"""Shared fixtures: a real embedded broker (Tansu) per test session, unique topics per test."""

from __future__ import annotations

import os
import uuid

import pytest

from streaming.broker import EmbeddedBroker, free_port


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    """A real Kafka-compatible broker on a free port, or the one named by ONERANKER_TEST_KAFKA."""
    external = os.environ.get("ONERANKER_TEST_KAFKA")
    if external:
        yield external
        return
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(port=free_port(), log_path=log) as b:
        yield b.bootstrap


@pytest.fixture
def unique():
    """A short unique suffix for topic and group names, so tests sharing a broker never collide."""
    return uuid.uuid4().hex[:8]


# A busy loop that ends by itself (never outlives a test run by much, even if the test is killed).
_BUSY = "import time\nend = time.monotonic() + {s}\nwhile time.monotonic() < end:\n    pass\n"


@pytest.fixture
def cpu_load():
    """Busy processes on every core for the duration of the test, the way CI machines are loaded:
    crash, rebalance and timing tests run under it, so a race that load exposes fails in the suite
    rather than by chance. ONERANKER_TEST_LOAD sets the number of processes (0: none)."""
    import subprocess
    import sys

    n = int(os.environ.get("ONERANKER_TEST_LOAD", os.cpu_count() or 2))
    procs = [subprocess.Popen([sys.executable, "-c", _BUSY.format(s=1200)]) for _ in range(n)]
    try:
        yield n
    finally:
        for p in procs:
            p.kill()
            p.wait()


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test (restored after): on a shared 2-core machine two threads
    contend and run ~10x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
