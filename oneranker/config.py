"""The one place for topics, ports, paths and their environment variables.

Every process reads its defaults from here; flags override them. Nothing else hard-codes a host,
a topic name or a path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

# --- Kafka topics (all keyed by user_id and created with the same partition count) ---
TOPIC_IMPRESSIONS = "oneranker.impressions"
TOPIC_CLICKS = "oneranker.clicks"
TOPIC_CONVERSIONS = "oneranker.conversions"
TOPIC_SAMPLES = "oneranker.samples"
TOPIC_DLQ = "oneranker.dlq"
TOPIC_SNAPSHOTS = "oneranker.snapshots"

EVENT_TOPICS = {
    "impression": TOPIC_IMPRESSIONS,
    "click": TOPIC_CLICKS,
    "conversion": TOPIC_CONVERSIONS,
}
ALL_TOPICS = (
    TOPIC_IMPRESSIONS,
    TOPIC_CLICKS,
    TOPIC_CONVERSIONS,
    TOPIC_SAMPLES,
    TOPIC_DLQ,
    TOPIC_SNAPSHOTS,
)
# Tansu auto-creates topics with 4 partitions and cannot add partitions later, so we match it.
DEFAULT_PARTITIONS = 4

# --- Ports (bound to 127.0.0.1 unless ONERANKER_BIND says otherwise) ---
DEFAULT_BROKER_PORT = 9092
DEFAULT_STREAM_WEB_PORT = 6066
DEFAULT_TRAINER_METRICS_PORT = 9101
DEFAULT_SERVE_PORT = 8100

# --- Event contract and message-size limits (bytes) ---
# These must agree with the broker and the producers. Kafka's defaults: message.max.bytes ≈ 1 MiB on
# the broker, max.request.size 1 MiB in producers; a producer configured for more (a 5 MB record) is
# still read (fetches always return at least one record) and dead-lettered as oversize.
MAX_EVENT_BYTES = int(os.environ.get("ONERANKER_MAX_EVENT_BYTES", 16 * 1024))  # larger: `oversize`
MAX_KEY_BYTES = 1024  # a key is a user_id (≤ 128 characters): larger is `oversize` (field "key")
# The worker's producer refuses requests larger than this (Faust/aiokafka's default, 1,000,000).
PRODUCER_MAX_REQUEST_BYTES = 1_000_000
# A dead letter carries the original bytes up to this size; a larger original is cut to its first
# DLQ_HEAD_BYTES with headers giving its size and sha256 (so the DLQ can never fail on its input).
DLQ_MAX_VALUE_BYTES = int(os.environ.get("ONERANKER_DLQ_MAX_BYTES", 64 * 1024))
DLQ_HEAD_BYTES = 4096
MAX_EVENT_AGE_MS = 400 * 24 * 3600 * 1000  # older than this is "absurdly far in the past"
MAX_EVENT_FUTURE_MS = 24 * 3600 * 1000  # newer than now + this is "absurdly far in the future"

# --- Attribution windows (event time) ---
CLICK_WINDOW_MS = 3600 * 1000
CONVERSION_WINDOW_MS = 24 * 3600 * 1000

# --- Token sequences ---
DEFAULT_HISTORY_LEN = 200

# Broker session timeouts: Tansu joins take ~session_timeout/2, so keep them short (DESIGN §8).
SESSION_TIMEOUT_MS = 6000
HEARTBEAT_INTERVAL_MS = 2000


def _env(name: str, default: str) -> str:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


@dataclass
class Settings:
    """Process-wide settings, taken from ONERANKER_* environment variables."""

    bootstrap_servers: str = field(
        default_factory=lambda: _env("ONERANKER_KAFKA", f"127.0.0.1:{DEFAULT_BROKER_PORT}")
    )
    bind_host: str = field(default_factory=lambda: _env("ONERANKER_BIND", "127.0.0.1"))
    home: Path = field(default_factory=lambda: Path(_env("ONERANKER_HOME", ".oneranker")).resolve())
    cache_dir: Path = field(
        default_factory=lambda: Path(
            _env("ONERANKER_CACHE", str(Path.home() / ".cache" / "oneranker"))
        )
    )
    feature_repo: Path = field(
        default_factory=lambda: Path(
            _env("ONERANKER_FEATURE_REPO", str(Path(__file__).resolve().parent.parent / "features" / "repo"))
        )
    )
    snapshot_store: str = field(default_factory=lambda: _env("ONERANKER_SNAPSHOT_STORE", ""))

    @property
    def snapshot_store_url(self) -> str:
        return self.snapshot_store or (self.home / "snapshots").as_uri()


def settings() -> Settings:
    return Settings()
