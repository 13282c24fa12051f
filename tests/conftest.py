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
