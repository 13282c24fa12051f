"""Kafka client helpers shared by every process (kafka-python; works with Apache Kafka and Tansu)."""

from __future__ import annotations

import logging
import time

from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from oneranker import config

log = logging.getLogger(__name__)


def wait_for_broker(bootstrap: str, timeout_s: float = 30.0) -> KafkaAdminClient:
    """An admin client once the broker answers; polls with a deadline."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    net_log = logging.getLogger("kafka")
    level = net_log.level
    net_log.setLevel(logging.CRITICAL)  # refused connections are expected while it starts
    try:
        while time.monotonic() < deadline:
            try:
                left_ms = max(200, int((deadline - time.monotonic()) * 1000))
                admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000,
                                         bootstrap_timeout_ms=min(left_ms, 5000),
                                         client_id="oneranker-admin")
                admin.list_topics()
                return admin
            except (KafkaError, OSError) as exc:
                last = exc
                time.sleep(0.2)
    finally:
        net_log.setLevel(level)
    raise TimeoutError(f"no Kafka broker answered at {bootstrap} within {timeout_s:.0f}s ({last})")


def ensure_topics(bootstrap: str, topics=config.ALL_TOPICS,
                  partitions: int = config.DEFAULT_PARTITIONS, timeout_s: float = 30.0) -> list[str]:
    """Create the missing topics with ``partitions`` partitions each; return the ones created.

    Topics that already exist with another partition count are reported: co-partitioning of the
    event topics (all keyed by user_id) needs equal counts.
    """
    admin = wait_for_broker(bootstrap, timeout_s)
    try:
        existing = set(admin.list_topics())
        missing = [t for t in topics if t not in existing]
        if missing:
            try:
                admin.create_topics([NewTopic(t, partitions, 1) for t in missing])
            except TopicAlreadyExistsError:
                pass  # created concurrently by another process: fine
        counts = {d["name"]: len(d["partitions"]) for d in admin.describe_topics(list(topics))}
        uneven = {t: n for t, n in counts.items() if n != partitions}
        if uneven:
            log.warning("topics with a partition count other than %d: %s", partitions, uneven)
        return missing
    finally:
        admin.close()


def make_producer(bootstrap: str, **overrides) -> KafkaProducer:
    """A throughput-tuned producer: acks from the leader, small linger for batching, keyed by user."""
    kwargs = dict(
        bootstrap_servers=bootstrap,
        acks=1,
        linger_ms=5,
        batch_size=256 * 1024,
        max_request_size=4 * 1024 * 1024,
        client_id="oneranker-producer",
    )
    kwargs.update(overrides)
    return KafkaProducer(**kwargs)
