"""`oneranker produce` / `summarize` against the real embedded broker."""

import json
import os
import subprocess
import sys
from collections import Counter

import jsonschema
from kafka import KafkaConsumer, TopicPartition

from oneranker import config
from streaming import events as ev
from streaming.replay.adlayer import load_requests, request_events

START = 1_790_000_000_000
SEED = 4242  # request ids are "r4242-…": other tests on the shared broker cannot collide


def oneranker(*args, env=None):
    return subprocess.run([sys.executable, "-m", "oneranker.cli", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=300)


def read_topic(bootstrap, topic, predicate, expect, timeout_s=60.0):
    """All records of ``topic`` matching ``predicate``; polls until ``expect`` arrived or deadline."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                             enable_auto_commit=False)
    parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    import time

    out, deadline = [], time.monotonic() + timeout_s
    while len(out) < expect and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500).values():
            out += [r for r in records if predicate(r)]
    consumer.close()
    return out


def test_produce_publishes_the_seeded_stream_byte_for_byte(broker, tmp_path):
    limit = 150
    result = oneranker("produce", "--dataset", "movielens-100k", "--limit", str(limit), "--seed", str(SEED),
                       "--start-ms", str(START), "--no-pace", "--bootstrap-servers", broker,
                       "--catalog-out", str(tmp_path / "catalog.parquet"), "--json", str(tmp_path / "s.json"))
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    expected = request_events(load_requests("movielens-100k", seed=SEED, limit=limit)[0], START, 100000.0)
    assert summary["events"] == len(expected) and summary["failed"] == 0
    assert summary["requests"] == limit
    want = Counter()
    for event_type, data in expected:
        want[(config.EVENT_TOPICS[event_type], data["user_id"].encode(), ev.encode(data))] += 1

    got = Counter()
    mine = lambda r: json.loads(r.value).get("request_id", "").startswith(f"r{SEED}-")
    for event_type, topic in config.EVENT_TOPICS.items():
        n = sum(1 for t, _ in expected if t == event_type)
        records = read_topic(broker, topic, mine, n)
        validator = jsonschema.Draft202012Validator(ev.schema(event_type))
        for r in records:
            validator.validate(json.loads(r.value))  # every produced event validates against its schema
            got[(topic, r.key, r.value)] += 1
    assert got == want  # same seed → same bytes, keyed by user_id, on the right topics
    assert (tmp_path / "catalog.parquet").exists()


def test_summarize_honours_the_env_bootstrap(broker, tmp_path):
    result = oneranker("summarize", "--idle", "2", "--json", str(tmp_path / "c.json"),
                       env={"ONERANKER_KAFKA": broker})
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "c.json").read_text())["events"] >= 0


def test_unreachable_bootstrap_fails_clearly():
    result = oneranker("produce", "--dataset", "synthetic", "--limit", "5", "--no-pace",
                       "--bootstrap-servers", "127.0.0.1:1", "--connect-timeout", "1")
    assert result.returncode == 2
    assert "no Kafka broker answered at 127.0.0.1:1" in result.stdout
