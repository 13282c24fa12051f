"""A poison record never stops a partition: a record whose handling raises for a reason nobody
foresaw goes to the dead-letter topic as ``internal_error`` with the exception text, and the records
after it are processed. The join is made to fail on one event by fault injection (a real bug cannot
be produced on demand); the worker, joiner and dead-letter builder are the real ones."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from types import SimpleNamespace

from oneranker import config
from streaming import events as contract
from streaming.app import StreamWorker, WorkerOptions
from streaming.joiner import Joiner


class RecordingProducer:
    def __init__(self):
        self.sent: list[tuple] = []

    async def send(self, topic, key, value, partition, timestamp, headers):
        self.sent.append((topic, key, value, headers))
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut


class NullMetric:
    def labels(self, *a):
        return self

    def inc(self, n=1):
        pass

    def set(self, v):
        pass

    def observe(self, v):
        pass


def record(offset, data=None, raw=None, key=b"u1"):
    value = raw if raw is not None else json.dumps(data).encode()
    return SimpleNamespace(topic=config.TOPIC_IMPRESSIONS, partition=0, offset=offset, key=key,
                           value=value, acked=False)


def test_a_record_that_raises_is_dead_lettered_and_the_partition_goes_on(monkeypatch):
    now = int(time.time() * 1000)

    def imp(eid):
        return {"event_id": eid, "schema_version": 1, "ts": now, "request_id": f"r-{eid}",
                "user_id": "u1", "ad_id": "a", "position": 1, "bid": 1.0}

    real = Joiner.process

    def process(self, etype, data):
        if data["event_id"] == "boom":
            raise KeyError("a bug in the join")
        return real(self, etype, data)

    monkeypatch.setattr(Joiner, "process", process)
    producer = RecordingProducer()
    app = SimpleNamespace(consumer=SimpleNamespace(_committed_offset={}), producer=producer)
    metrics = SimpleNamespace(**{name: NullMetric() for name in (
        "events", "outcomes", "samples", "dlq", "late", "watermark", "batch_seconds")})
    worker = StreamWorker(app, WorkerOptions("x", feast=False), users={}, metrics=metrics)
    batch = [record(0, imp("ok-1")), record(1, imp("boom")), record(2, raw=b"\xff"),
             record(3, imp("ok-2"))]
    done = asyncio.run(worker.handle_batch(batch))

    assert done == batch  # every record is acknowledged: the poison one too, once dead-lettered

    dead = [(value, {k: v.decode() for k, v in headers}) for topic, key, value, headers in producer.sent
            if topic == config.TOPIC_DLQ]
    reasons = Counter(h["reason"] for _, h in dead)
    assert reasons == Counter({contract.INTERNAL_ERROR: 1, contract.NOT_UTF8: 1})
    value, h = next(d for d in dead if d[1]["reason"] == contract.INTERNAL_ERROR)
    assert json.loads(value)["event_id"] == "boom" and h["source_offset"] == "1"
    assert "KeyError" in h["detail"] and "a bug in the join" in h["detail"]
    assert worker.stats["impression"] == 2  # the events on either side of the poison were joined
    assert worker.offsets[(config.TOPIC_IMPRESSIONS, 0)] == 3


def test_a_context_orjson_cannot_encode_is_kept_in_the_state():
    """An integer past 64 bits in the free-form context is valid JSON: the state that carries the
    open request is still written (Python's json takes over from orjson)."""
    now = int(time.time() * 1000)
    producer = RecordingProducer()
    app = SimpleNamespace(consumer=SimpleNamespace(_committed_offset={}), producer=producer)
    metrics = SimpleNamespace(**{name: NullMetric() for name in (
        "events", "outcomes", "samples", "dlq", "late", "watermark", "batch_seconds")})
    users = {}
    worker = StreamWorker(app, WorkerOptions("x", feast=False), users=users, metrics=metrics)
    data = {"event_id": "e1", "schema_version": 1, "ts": now, "request_id": "r1", "user_id": "u1",
            "ad_id": "a", "position": 1, "bid": 1.0, "context": {"campaign": 10**30}}
    done = asyncio.run(worker.handle_batch([record(0, data)]))
    assert len(done) == 1 and worker.stats["impression"] == 1 and worker.stats["dlq"] == 0
    state = json.loads(users["u1"])
    assert state["pending"]["r1"]["context"]["campaign"] == 10**30
