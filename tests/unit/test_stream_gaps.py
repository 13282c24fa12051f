"""The worker's guard against records skipped upstream (StreamWorker._skipped_ahead): Faust can drop
the rest of a fetched chunk when a rebalance interrupts its delivery, without seeking back. The
consumer here is a stand-in that records seeks: Faust's real one cannot be made to drop records on
demand (the scale-out/in integration test exercises the real thing)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from faust.types import TP

from streaming import app
from streaming.app import StreamWorker, WorkerOptions


class RecordingConsumer:
    def __init__(self, committed):
        self._committed_offset = committed
        self.seeks: list[tuple[TP, int]] = []

    async def seek(self, tp, offset):
        self.seeks.append((tp, offset))


def msg(offset, topic="imp", partition=0):
    return SimpleNamespace(topic=topic, partition=partition, offset=offset, acked=False)


def test_a_record_past_the_expected_offset_is_held_back_and_the_partition_sought_back():
    consumer = RecordingConsumer({TP("imp", 0): 169})
    worker = StreamWorker(SimpleNamespace(consumer=consumer), WorkerOptions("x", feast=False),
                          users=None, metrics=None)

    async def run(m):
        skipped = await worker._skipped_ahead(m)
        if not skipped:
            worker.offsets[(m.topic, m.partition)] = m.offset  # as handle_batch does
        return skipped

    # the first record after an assignment is 40 past the committed offset: held, not acked
    ahead = [msg(o) for o in (209, 210, 211)]
    assert [asyncio.run(run(m)) for m in ahead] == [True, True, True]
    assert consumer.seeks == [(TP("imp", 0), 169)]  # one seek, not one per record
    # the records come again from the committed offset, in order
    again = [msg(o) for o in range(169, 212)]
    assert not any(asyncio.run(run(m)) for m in again)
    assert worker.gaps == 1
    # a gap inside a running incarnation is caught the same way
    assert asyncio.run(run(msg(215))) is True
    assert consumer.seeks[-1] == (TP("imp", 0), 212)
    # offsets that hold no record (transaction markers): accepted once the seek is long past
    key = ("imp", 0)
    worker.rewinding[key] = (212, worker.rewinding[key][1] - app.REWIND_GIVE_UP_S - 1)
    assert asyncio.run(run(msg(216))) is False and worker.offsets[key] == 216
    assert len(consumer.seeks) == 2


def test_without_a_committed_offset_the_first_record_is_the_start():
    consumer = RecordingConsumer({})
    worker = StreamWorker(SimpleNamespace(consumer=consumer), WorkerOptions("x", feast=False),
                          users=None, metrics=None)
    assert asyncio.run(worker._skipped_ahead(msg(7, topic="clk"))) is False
    assert consumer.seeks == []


def test_records_held_back_are_not_acknowledged_with_their_batch():
    """``handle_batch`` returns what may be acknowledged: a record past a gap is not in it (an
    acknowledged offset would let the commit skip the records before it)."""
    import json
    import time

    from tests.unit.test_stream_poison import NullMetric, RecordingProducer

    consumer = RecordingConsumer({TP("imp", 0): 10})
    producer = RecordingProducer()
    metrics = SimpleNamespace(**{name: NullMetric() for name in (
        "events", "outcomes", "samples", "dlq", "late", "watermark", "batch_seconds")})
    worker = StreamWorker(SimpleNamespace(consumer=consumer, producer=producer),
                          WorkerOptions("x", feast=False), users={}, metrics=metrics)
    worker.type_of_topic = {"imp": "impression"}
    now = int(time.time() * 1000)

    def rec(offset):
        data = {"event_id": f"e{offset}", "schema_version": 1, "ts": now, "request_id": f"r{offset}",
                "user_id": "u1", "ad_id": "a", "position": 1, "bid": 1.0}
        return SimpleNamespace(topic="imp", partition=0, offset=offset, key=b"u1",
                               value=json.dumps(data).encode(), acked=False)

    batch = [rec(10), rec(11), rec(14), rec(15)]  # 12 and 13 were dropped upstream
    done = asyncio.run(worker.handle_batch(batch))
    assert [m.offset for m in done] == [10, 11]
    assert consumer.seeks == [(TP("imp", 0), 12)]
    assert worker.stats["impression"] == 2
