"""``oneranker bench stream``: the worker's processed events/s next to the raw consume rate of a plain
aiokafka consumer reading the same topics in the same run.

One fixed synthetic stream (seed 7) is published once to its own suffixed topics. Each run then
(1) reads the three event topics from the beginning with a bare aiokafka consumer (no group, no
decoding) and (2) starts a fresh worker (new app id: empty state, offsets from the beginning) as a
child process and times it from its first batch to the end of the batch that completes the stream
(validation, join, table changelog, samples, Feast pushes in its thread — everything it does in
production), and (3) runs a no-op Faust agent on the same topics with the same settings, to show
how much of the gap is Faust's per-message stream machinery rather than the worker's own work. All
numbers are medians over the runs.
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
            "feast_rows": st.get("feast_rows", 0), "batches": st["stats"].get("batches", 0)}


def inprocess_rate(events: list[tuple[str, dict]], speed: float, batch: int = 5000) -> float:
    """The worker's own work per event without Kafka or Faust: decode + validate each raw event,
    fold it into one joiner, advance the watermark and encode samples and changed states once
    per batch of ``batch`` (as the worker does per fetch). events/s: the ceiling a single Python
    process running this work could reach, whatever the transport."""
    from streaming import events as contract
    from streaming.joiner import MIN_TS, JoinConfig, Joiner

    raws = [(et, contract.encode(d), d["user_id"].encode()) for et, d in events]
    joiner = Joiner(JoinConfig(allowed_lateness_ms=2000).scaled(1 / speed), load=lambda u: None,
                    watermark=MIN_TS, partition=0)
    t = time.perf_counter()
    for i in range(0, len(raws), batch):
        newest = MIN_TS
        for et, value, key in raws[i:i + batch]:
            ev = contract.validate(value, et, key=key)
            joiner.process(et, ev.data)
            newest = max(newest, ev.data["ts"])
        for sample in joiner.advance(newest - 2000):
            sample.to_json()
        for st in joiner.take_dirty().values():
            contract.dumps(st.to_dict())
    return len(raws) / (time.perf_counter() - t)


def noop_faust_main(bootstrap: str, suffix: str, expect: int, out: str) -> None:
    """A Faust agent that only counts (same topics, same settings, same take_events batching, same
    Faust patches as the worker): the ceiling any Faust worker can reach here. Writes its events/s
    to ``out`` and exits."""
    import faust

    from streaming import faust_patches

    faust_patches.apply_all()

    app = faust.App(f"bench-noop-{uuid.uuid4().hex[:8]}", broker=f"kafka://{bootstrap}",
                    store="memory://", datadir=tempfile.mkdtemp(prefix="oneranker-noop-"),
                    broker_session_timeout=config.SESSION_TIMEOUT_MS / 1000,
                    broker_heartbeat_interval=config.HEARTBEAT_INTERVAL_MS / 1000,
                    consumer_auto_offset_reset="earliest", web_enabled=False,
                    broker_max_poll_records=5000, stream_buffer_maxsize=65536, stream_wait_empty=False)
    source = app.topic(*[t + suffix for t in config.EVENT_TOPICS.values()], key_type=bytes,
                       value_type=bytes, key_serializer="raw", value_serializer="raw")
    state = {"n": 0, "t0": None}

    @app.agent(source)
    async def count(stream):
        async for events in stream.take_events(2000, 0.2):
            state["t0"] = state["t0"] or time.perf_counter()
            state["n"] += len(events)
            if state["n"] >= expect:
                Path(out).write_text(str(state["n"] / (time.perf_counter() - state["t0"])))
                os._exit(0)

    import sys

    sys.argv = ["noop", "worker", "-l", "warn"]
    app.main()


def _noop_run(bootstrap: str, suffix: str, expect: int) -> float:
    import subprocess
    import sys

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "rate"
        code = (f"from streaming.bench import noop_faust_main; "
                f"noop_faust_main({bootstrap!r}, {suffix!r}, {expect}, {str(out)!r})")
        subprocess.run([sys.executable, "-c", code], timeout=300, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        return float(out.read_text())


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
        raw, worker, noop, inproc, load = [], [], [], [], []
        with tempfile.TemporaryDirectory(prefix="oneranker-bench-") as home:
            for _ in range(runs):
                load.append(os.getloadavg())
                raw.append(asyncio.run(_raw_consume(bootstrap, topics, len(events))))
                worker.append(_worker_run(bootstrap, suffix, len(events), speed, Path(home), feast))
                noop.append(_noop_run(bootstrap, suffix, len(events)))
                inproc.append(inprocess_rate(events, speed))
        raw_med = statistics.median(raw)
        noop_med = statistics.median(noop)
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
            "noop_faust_events_per_s": [round(x, 1) for x in noop],
            "noop_faust_median": round(noop_med, 1),
            "noop_faust_ratio": round(noop_med / raw_med, 4),
            "worker_vs_noop_faust": round(worker_med / noop_med, 4),
            "inprocess_events_per_s": [round(x, 1) for x in inproc],
            "inprocess_median": round(statistics.median(inproc), 1),
            "inprocess_ratio": round(statistics.median(inproc) / raw_med, 4),
            "worker_vs_inprocess": round(worker_med / statistics.median(inproc), 4),
            "load_average_at_runs": [[round(x, 2) for x in la] for la in load],
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
    table.add_column("µs/event", justify="right")
    table.add_column("runs", justify="right")

    def us(rate: float) -> str:
        return f"{1e6 / rate:.1f}"

    table.add_row("raw aiokafka consumer", f"{result['raw_consume_median']:,.0f}",
                  us(result["raw_consume_median"]),
                  ", ".join(f"{x:,.0f}" for x in result["raw_consume_events_per_s"]))
    table.add_row("oneranker stream worker", f"{result['worker_events_per_s_median']:,.0f}",
                  us(result["worker_events_per_s_median"]),
                  ", ".join(f"{w['events_per_s']:,.0f}" for w in result["worker_runs"]))
    table.add_row("no-op Faust stream agent (take_events)", f"{result['noop_faust_median']:,.0f}",
                  us(result["noop_faust_median"]),
                  ", ".join(f"{x:,.0f}" for x in result["noop_faust_events_per_s"]))
    table.add_row("worker's own work in-process (no Kafka)", f"{result['inprocess_median']:,.0f}",
                  us(result["inprocess_median"]),
                  ", ".join(f"{x:,.0f}" for x in result["inprocess_events_per_s"]))
    table.add_row("ratio worker / raw", f"{result['ratio']:.3f}", "", "")
    table.add_row("ratio no-op Faust / raw", f"{result['noop_faust_ratio']:.3f}", "", "")
    table.add_row("ratio worker / no-op Faust", f"{result['worker_vs_noop_faust']:.3f}", "", "")
    table.add_row("ratio in-process / raw (one process's ceiling)", f"{result['inprocess_ratio']:.3f}",
                  "", "")
    table.add_row("ratio worker / in-process", f"{result['worker_vs_inprocess']:.3f}", "", "")
    Console().print(table)
