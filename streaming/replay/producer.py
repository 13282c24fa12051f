"""Publish a replay's events to Kafka (key = user_id), paced by their event time, and read them back."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

from kafka import KafkaConsumer, TopicPartition
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from oneranker import config
from oneranker.kafka import make_producer
from streaming import events as contract


@dataclass
class StreamSummary:
    """What a stream of events contained, and how fast it moved."""

    events: int = 0
    by_type: dict[str, int] = field(default_factory=dict)
    users: int = 0
    ads: int = 0
    requests: int = 0
    seconds: float = 0.0
    events_per_s: float = 0.0
    failed: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


class _Tally:
    def __init__(self) -> None:
        self.by_type: Counter[str] = Counter()
        self.users: set[str] = set()
        self.ads: set[str] = set()
        self.requests: set[str] = set()

    def add(self, event_type: str, data: dict) -> None:
        self.by_type[event_type] += 1
        self.users.add(data.get("user_id"))
        self.ads.add(data.get("ad_id"))
        self.requests.add(data.get("request_id"))

    def summary(self, seconds: float, failed: int = 0) -> StreamSummary:
        n = sum(self.by_type.values())
        return StreamSummary(n, dict(self.by_type), len(self.users), len(self.ads), len(self.requests),
                             round(seconds, 3), round(n / seconds, 1) if seconds > 0 else 0.0, failed)


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]:>9} ev/s"), TimeRemainingColumn(), transient=False)


def publish(events: list[tuple[str, dict]], bootstrap: str, pace: bool = True,
            show_progress: bool = True,
            on_sent: Callable[[int, str, dict], None] | None = None,
            stop: threading.Event | None = None) -> StreamSummary:
    """Send ``events`` (sorted by ts) to their topics. With ``pace`` the sends follow event time
    (already compressed by the replay speed); without it they go as fast as the producer can.
    ``on_sent(i, event_type, data)`` runs after each send is queued; setting ``stop`` ends early."""
    producer = make_producer(bootstrap)
    tally = _Tally()
    failed = 0

    def on_error(_exc: BaseException) -> None:
        nonlocal failed
        failed += 1

    start = time.monotonic()
    ts0 = events[0][1]["ts"] if events else 0
    with _progress() as progress:
        task = progress.add_task("producing", total=len(events), rate="-", visible=show_progress)
        for i, (event_type, data) in enumerate(events):
            if stop is not None and stop.is_set():
                break
            if pace:
                ahead = (data["ts"] - ts0) / 1000.0 - (time.monotonic() - start)
                if ahead > 0.002:
                    time.sleep(ahead)  # pacing the replay clock, not synchronisation
            producer.send(config.EVENT_TOPICS[event_type], key=data["user_id"].encode(),
                          value=contract.encode(data)).add_errback(on_error)
            tally.add(event_type, data)
            if on_sent is not None:
                on_sent(i, event_type, data)
            if i % 5000 == 4999:
                elapsed = time.monotonic() - start
                progress.update(task, completed=i + 1, rate=f"{(i + 1) / elapsed:,.0f}")
        producer.flush()
        elapsed = time.monotonic() - start
        progress.update(task, completed=sum(tally.by_type.values()), rate=f"{len(events) / max(elapsed, 1e-9):,.0f}")
    producer.close()
    return tally.summary(elapsed, failed)


def consume_all(bootstrap: str, topics: Iterable[str] = tuple(config.EVENT_TOPICS.values()),
                expect: int | None = None, idle_s: float = 5.0, timeout_s: float = 600.0,
                decode: bool = True) -> tuple[StreamSummary, list[tuple[str, bytes]]]:
    """Read ``topics`` from the beginning without a consumer group until ``expect`` messages have
    arrived or none arrived for ``idle_s`` (end offsets are unreliable on Tansu, DESIGN §8).
    Returns the summary (time measured from the first to the last message) and, when ``decode``
    is False, the raw (topic, value) pairs."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                             auto_offset_reset="earliest", fetch_max_bytes=16 * 1024 * 1024,
                             max_partition_fetch_bytes=4 * 1024 * 1024, client_id="oneranker-summary")
    parts = []
    for t in topics:
        ps = consumer.partitions_for_topic(t) or set()
        parts += [TopicPartition(t, p) for p in sorted(ps)]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    type_of_topic = {v: k for k, v in config.EVENT_TOPICS.items()}
    tally, raw = _Tally(), []
    first = last = None
    n = 0
    deadline = time.monotonic() + timeout_s
    idle_deadline = time.monotonic() + idle_s
    while time.monotonic() < min(deadline, idle_deadline) and (expect is None or n < expect):
        batch = consumer.poll(timeout_ms=200, max_records=20000)
        now = time.monotonic()
        if not batch:
            continue
        idle_deadline = now + idle_s
        first = first or now
        last = now
        for tp, records in batch.items():
            for rec in records:
                n += 1
                if decode:
                    result = contract.validate(rec.value, type_of_topic.get(tp.topic, "?"))
                    if isinstance(result, contract.Event):
                        tally.add(result.type, result.data)
                    else:
                        tally.by_type[f"invalid:{result.reason}"] += 1
                else:
                    raw.append((tp.topic, rec.value))
                    tally.by_type[type_of_topic.get(tp.topic, tp.topic)] += 1
    consumer.close()
    seconds = (last - first) if first and last and last > first else 0.0
    return tally.summary(seconds), raw
