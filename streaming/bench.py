"""``oneranker bench stream``: the worker's processed events/s next to the raw consume rate of a plain
aiokafka consumer reading the same topics in the same run.

One fixed synthetic stream (seed 7) is published once to its own suffixed topics. Each run then
(1) reads the three event topics from the beginning with a bare aiokafka consumer (no group, no
decoding) and (2) starts a fresh worker (new app id: empty state, offsets from the beginning) as a
child process and times it from its first batch to the end of the batch that completes the stream
(validation, join, table changelog, samples, Feast pushes in its thread — everything it does in
production). Both numbers are medians over the runs.
"""

from __future__ import annotations

import asyncio
import os
import platform
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from oneranker import config

SPEED_SECONDS = 120.0  # the stream's event time spans this many seconds


def _stream(n_requests: int):
    from streaming.replay.adlayer import load_requests, request_events

    requests, _ = load_requests("synthetic", seed=7, limit=n_requests)
    span = max(r.ts for r in requests) - min(r.ts for r in requests)
    speed = span / SPEED_SECONDS
    start = int(time.time() * 1000) - int(SPEED_SECONDS * 1000) - 60_000  # all in the recent past
    return request_events(requests, start, speed), speed


async def _raw_consume(bootstrap: str, topics: list[str], expect: int, timeout_s: float = 120.0) -> float:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest", max_partition_fetch_bytes=4 * 1024 * 1024,
                                fetch_max_bytes=16 * 1024 * 1024)
    await consumer.start()
    try:
        tps = []
        for t in topics:
            tps += [TopicPartition(t, p) for p in sorted(consumer.partitions_for_topic(t) or [])]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        n = 0
        start = time.perf_counter()
        deadline = time.monotonic() + timeout_s
        while n < expect and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500, max_records=20000)
            n += sum(len(v) for v in batch.values())
        elapsed = time.perf_counter() - start
    finally:
        await consumer.stop()
    if n < expect:
        raise RuntimeError(f"raw consumer read {n} of {expect} events")
    return n / elapsed


def _worker_run(bootstrap: str, suffix: str, expect: int, speed: float, home: Path, feast: bool) -> dict:
    from streaming.testing import WorkerProcess, wait_until

    args = ["--speed", str(speed), "--metrics-port", "0", "--allowed-lateness-ms", "2000"]
    if not feast:
        args.append("--no-feast")
    worker = WorkerProcess(bootstrap, f"bench-{uuid.uuid4().hex[:8]}", suffix, home, args).start()
    try:
        def done():
            st = worker.stats()
            if not st:
                if not worker.alive():
                    raise RuntimeError("worker died:\n" + worker.log()[-2000:])
                return None
            s = st["stats"]
            n = sum(s.get(k, 0) for k in ("impression", "click", "conversion", "dlq"))
            return st if n >= expect else None

        st = wait_until(done, 600, what="worker processed the stream")
    finally:
        worker.stop()
    seconds = st["last_batch_done_at"] - st["first_event_at"]
    return {"events_per_s": expect / seconds, "seconds": seconds, "samples": st["stats"].get("samples", 0),
            "feast_rows": st.get("feast_rows", 0)}


def run_bench(bootstrap: str | None = None, quick: bool = False, runs: int | None = None,
              n_requests: int | None = None, feast: bool = True) -> dict:
    from streaming.broker import EmbeddedBroker, free_port
    from streaming.testing import publish

    runs = runs or 3
    n_requests = n_requests or (2000 if quick else 6000)
    broker = None
    if bootstrap is None:
        broker = EmbeddedBroker(port=free_port()).start()
        bootstrap = broker.bootstrap
    try:
        from oneranker.kafka import ensure_topics

        events, speed = _stream(n_requests)
        suffix = f".bench{uuid.uuid4().hex[:8]}"
        topics = [t + suffix for t in config.EVENT_TOPICS.values()]
        ensure_topics(bootstrap, topics + [config.TOPIC_SAMPLES + suffix, config.TOPIC_DLQ + suffix])
        t = time.perf_counter()
        publish(bootstrap, events, suffix, pace=False)
        publish_s = time.perf_counter() - t
        raw, worker = [], []
        with tempfile.TemporaryDirectory(prefix="oneranker-bench-") as home:
            for _ in range(runs):
                raw.append(asyncio.run(_raw_consume(bootstrap, topics, len(events))))
                worker.append(_worker_run(bootstrap, suffix, len(events), speed, Path(home), feast))
        raw_med = statistics.median(raw)
        worker_med = statistics.median(w["events_per_s"] for w in worker)
        return {
            "events": len(events), "requests": n_requests, "runs": runs, "speed": round(speed, 1),
            "feast": feast, "publish_events_per_s": round(len(events) / publish_s, 1),
            "raw_consume_events_per_s": [round(x, 1) for x in raw],
            "raw_consume_median": round(raw_med, 1),
            "worker_runs": [{k: round(v, 3) if isinstance(v, float) else v for k, v in w.items()}
                            for w in worker],
            "worker_events_per_s_median": round(worker_med, 1),
            "ratio": round(worker_med / raw_med, 4),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "platform": platform.platform()},
            "broker": "embedded tansu" if broker else bootstrap,
        }
    finally:
        if broker is not None:
            broker.stop()


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"stream bench: {result['events']:,} events, {result['runs']} runs (median)")
    table.add_column("reader")
    table.add_column("events/s (median)", justify="right")
    table.add_column("runs", justify="right")
    table.add_row("raw aiokafka consumer", f"{result['raw_consume_median']:,.0f}",
                  ", ".join(f"{x:,.0f}" for x in result["raw_consume_events_per_s"]))
    table.add_row("oneranker stream worker", f"{result['worker_events_per_s_median']:,.0f}",
                  ", ".join(f"{w['events_per_s']:,.0f}" for w in result["worker_runs"]))
    table.add_row("ratio worker / raw", f"{result['ratio']:.3f}", "")
    Console().print(table)
