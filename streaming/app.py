"""The Faust worker: validate → dead-letter or join → samples, token sequences → Feast.

Topology (all topics keyed by user_id, same partition count, so partition p of every topic holds the
same users and is processed by the same worker):

* source: ``oneranker.impressions`` + ``oneranker.clicks`` + ``oneranker.conversions`` — every
  fetch of the three is handed to ``StreamWorker.on_records`` as one batch by the consumer's drain
  loop (``faust_patches.deliver_in_batches``): no Faust stream per message. Faust still runs the
  group (assignment, rebalances), offsets and commits, the changelogged table and its recovery.
* table ``users`` (changelogged): one JSON ``UserState`` per user (streaming/joiner.py), and under
  the reserved key ``WATERMARK_KEY + <p>`` the event-time watermark of partition p, written after
  the users of a batch INTO THE SAME changelog partition: Kafka keeps one partition's order, so a
  restored watermark never runs ahead of the restored states. (It used to live in a table of its
  own; a SIGKILL could deliver that topic's record but not the states', and re-delivered events
  then expired behind a watermark that was too new.)
* sinks: ``oneranker.samples`` (streaming/samples.py, key = user_id), ``oneranker.dlq`` (below),
  Feast online store (user_sequence + user_profile views, pushed in batches from a thread).

Dead-letter records (``oneranker.dlq``, built by streaming/dlq.py): key = the original key, value =
the ORIGINAL bytes (cut to a head, with size and sha256 in headers, past 64 KiB so that the dead
letter itself can never be refused); headers ``reason`` (a code from streaming/events.py),
``field``, ``detail``, ``event_type``, ``source_topic``, ``source_partition``, ``source_offset``.
A record whose handling raises for a reason nobody foresaw is dead-lettered as ``internal_error``
with the exception text, and the partition goes on (a poison record never stops it).

Crash safety (at-least-once; Tansu cannot do exactly-once): a batch's events are acknowledged only
after the batch is processed, and Faust flushes the producer (changelog, samples, dead letters) before
it commits any offset, so a commit never covers an output that was not delivered. Samples are
confirmed by the broker before the states that mark their requests closed go to the changelog, so a
restored state never claims a sample that was lost. A crash re-delivers the uncommitted events; the
restored state dedupes them by event id, so re-emission can only repeat a sample with the same
``sample_id``. Three rules close the remaining holes: a rebalance waits for the batch in flight and
flushes its writes before the table recovery reads the changelogs (a recovery reading an older
value would silently undo acknowledged events); a batch that fails is never acknowledged: the
process exits and the restart re-reads it; and a record that arrives past the next expected offset
(Faust dropped the ones before it) is neither processed nor acknowledged: the partition is sought
back (``_skipped_ahead``).

Faust internals patched (streaming/faust_patches.py): high watermarks read from a fetch response
(Tansu's ListOffsets is wrong), the drain loop handing each fetch of the source topics to the worker
as one batch instead of one stream event per message (speed: ~73 µs a message was Faust's), and
a producer flush that really drains Faust's buffer of table writes (upstream gives up after 0.1 s
without progress, so under load offsets were committed ahead of the state they covered).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import math
import os
import socket
import time
import weakref

import orjson
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oneranker import config
from streaming import events as contract
from streaming import faust_patches
from streaming.dlq import dead_letter
from streaming.joiner import EXPIRED, MIN_TS, JoinConfig, Joiner, PartitionClock

log = logging.getLogger(__name__)

DEFAULT_METRICS_PORT = int(os.environ.get("ONERANKER_STREAM_METRICS_PORT", "9102"))
DEFAULT_APP_ID = os.environ.get("ONERANKER_STREAM_APP_ID", "oneranker-stream")
WATERMARK_KEY = "\x00wm:"  # + partition: no user id has it (the schemas refuse control characters)
# After seeking back over a gap, records still queued from before the seek arrive first (a full
# stream buffer drains in seconds); a gap that persists this long is offsets that hold no record.
REWIND_GIVE_UP_S = 30.0


@dataclass
class WorkerOptions:
    bootstrap: str
    app_id: str = DEFAULT_APP_ID
    topic_suffix: str = ""  # appended to every project topic name (test/bench isolation)
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}")
    data_dir: Path | None = None  # default $ONERANKER_HOME/stream/<app_id>-<worker_id>
    store: str = "memory://"
    join: JoinConfig = field(default_factory=JoinConfig)
    idle_s: float = 2.0  # a topic-partition silent this long stops holding the watermark
    batch_size: int = 5000  # at most this many records per fetch, processed as one batch
    commit_interval_s: float = 1.0
    metrics_port: int | None = DEFAULT_METRICS_PORT  # None/0: no HTTP endpoint
    feast: bool = True
    feast_online: str | None = None
    push_interval_s: float = 0.5
    partitions: int = config.DEFAULT_PARTITIONS

    def topic(self, name: str) -> str:
        return name + self.topic_suffix

    @property
    def event_topics(self) -> dict[str, str]:
        return {self.topic(t): et for et, t in config.EVENT_TOPICS.items()}

    def resolved_data_dir(self) -> Path:
        return self.data_dir or config.settings().home / "stream" / f"{self.app_id}-{self.worker_id}"


# ------------------------------------------------------------------------------------------------
# Metrics


class Metrics:
    def __init__(self, port: int | None, bind: str):
        from prometheus_client import Counter as PCounter, Gauge, Histogram

        self.events = PCounter("oneranker_stream_events_total", "Valid events processed", ["type"])
        self.outcomes = PCounter("oneranker_stream_join_outcomes_total",
                                 "Join outcomes (applied, duplicate, late_click, late_conversion, …)",
                                 ["outcome"])
        self.samples = PCounter("oneranker_stream_samples_total", "Samples emitted")
        self.dlq = PCounter("oneranker_stream_dlq_total", "Events dead-lettered", ["reason"])
        self.late = PCounter("oneranker_stream_late_labels_total", "Labels after their window", ["type"])
        self.push_seconds = Histogram("oneranker_stream_feast_push_seconds", "Feast push latency",
                                      buckets=(0.01, 0.03, 0.1, 0.3, 1, 3, 10))
        self.push_rows = PCounter("oneranker_stream_feast_rows_total", "User rows pushed to Feast")
        self.push_errors = PCounter("oneranker_stream_feast_push_errors_total", "Failed Feast pushes")
        self.watermark = Gauge("oneranker_stream_watermark_ms", "Event-time watermark", ["partition"])
        self.pending = Gauge("oneranker_stream_pending_requests", "Requests waiting for their window")
        self.lag = Gauge("oneranker_stream_lag", "Fetch high watermark minus next offset", ["tp"])
        self.batch_seconds = Histogram("oneranker_stream_batch_seconds", "Batch processing time",
                                       buckets=(0.001, 0.01, 0.03, 0.1, 0.3, 1, 3))
        if port:
            from prometheus_client import start_http_server

            start_http_server(port, addr=bind)


# ------------------------------------------------------------------------------------------------
# Feast writer: coalesces the latest state per user, pushes from a child process

_CLIENT = None  # the child process's FeatureStoreClient


def _open_client(online: str | None, history_len: int) -> None:
    """Open (and if needed apply) the store: in the pusher's child process, once."""
    global _CLIENT
    import threading

    from features.store import USER_PUSH_SOURCE, FeatureStoreClient, apply, open_store

    parent = os.getppid()

    def exit_with_parent() -> None:  # a SIGKILLed worker cannot stop its child: it leaves by itself
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=exit_with_parent, name="exit-with-parent", daemon=True).start()
    logging.basicConfig(level=logging.WARNING)
    store = open_store(online=online)
    try:  # all of it: a worker killed during an apply can leave a partial registry
        store.get_data_source(USER_PUSH_SOURCE)
        store.get_feature_view("user_sequence")
        store.get_feature_view("user_profile")
    except Exception:
        log.info("feature store not applied yet: applying %s", config.settings().feature_repo)
        apply(online=online)
        store = open_store(online=online)
    _CLIENT = FeatureStoreClient(store, history_len=history_len)


def _push(rows) -> int:
    return _CLIENT.push_users(rows)


class FeastPusher:
    """Pushes the newest row per user to the Feast online store every ``push_interval_s``.

    The push runs in a child process: Feast's DataFrame → Arrow → protobuf conversion is Python
    work that, in a thread, held the GIL for about 40 % of the event loop's time. Rows not pushed
    yet are re-derived from the restored table after a crash (``StreamWorker.partition``)."""

    def __init__(self, opts: WorkerOptions, metrics: Metrics):
        self.opts, self.metrics = opts, metrics
        self.pending: dict[str, Any] = {}
        self.executor: concurrent.futures.ProcessPoolExecutor | None = None
        self.pushed_rows = 0

    def open(self) -> None:
        """Start the child and open (if needed, apply) the store in it, before the first event."""
        import multiprocessing

        # spawn, not fork: the worker has threads (Faust's consumer, aiokafka) by the time it
        # restarts a dead child
        self.executor = concurrent.futures.ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("spawn"), initializer=_open_client,
            initargs=(self.opts.feast_online, self.opts.join.history_len))
        self.executor.submit(int).result(timeout=300)  # the initializer has run
        log.info("feast online store ready")

    def offer(self, rows: dict[str, Any]) -> None:
        self.pending.update(rows)

    async def push_once(self) -> int:
        if not self.pending or self.executor is None:
            return 0
        rows, self.pending = list(self.pending.values()), {}
        loop = asyncio.get_running_loop()
        t = time.perf_counter()
        try:
            n = await loop.run_in_executor(self.executor, _push, rows)
        except concurrent.futures.process.BrokenProcessPool:
            log.error("the feast push process died: restarting it; %d rows kept", len(rows))
            self._requeue(rows)
            await loop.run_in_executor(None, self._restart)
            return 0
        except Exception:
            log.exception("feast push of %d rows failed; will retry with the next batch", len(rows))
            self._requeue(rows)
            return 0
        self.metrics.push_seconds.observe(time.perf_counter() - t)
        self.metrics.push_rows.inc(n)
        self.pushed_rows += n
        return n

    def _requeue(self, rows) -> None:
        self.metrics.push_errors.inc()
        for r in rows:
            self.pending.setdefault(r.user_id, r)  # a newer row offered meanwhile wins

    def _restart(self) -> None:
        old, self.executor = self.executor, None
        if old is not None:
            old.shutdown(wait=False, cancel_futures=True)
        self.open()

    async def run(self) -> None:
        if self.executor is None:
            await asyncio.get_running_loop().run_in_executor(None, self.open)
        while True:
            await asyncio.sleep(self.opts.push_interval_s)  # pacing, not synchronisation
            await self.push_once()

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=False)


# ------------------------------------------------------------------------------------------------
# The worker


class _Partition:
    def __init__(self, joiner: Joiner, clock: PartitionClock):
        self.joiner, self.clock = joiner, clock
        self.last_message = None  # table writes go to the changelog partition of this message


class StreamWorker:
    """Holds the per-partition joiners and does the I/O around them. Created by ``create_app``."""

    def __init__(self, app, opts: WorkerOptions, users, metrics: Metrics):
        self.app, self.opts, self.users = app, opts, users
        self.metrics = metrics
        self.type_of_topic = opts.event_topics
        self.samples_topic = opts.topic(config.TOPIC_SAMPLES)
        self.dlq_topic = opts.topic(config.TOPIC_DLQ)
        self.parts: dict[int, _Partition] = {}
        self.lock = asyncio.Lock()
        self.pusher = FeastPusher(opts, metrics) if opts.feast else None
        self.stats: Counter[str] = Counter()
        self.first_event_at: float | None = None
        self.last_event_at: float | None = None
        self.last_batch_done_at: float | None = None
        self.offsets: dict[tuple[str, int], int] = {}  # the last offset processed per topic-partition
        # topic-partition → (offset it was sought back to, when)
        self.rewinding: dict[tuple[str, int], tuple[int, float]] = {}
        self.gaps = 0

    # -- state ---------------------------------------------------------------------------------
    def reset(self) -> None:
        """After a rebalance the table is the truth again: rebuild joiners lazily."""
        self.parts.clear()
        self.offsets.clear()  # another worker may have moved these partitions on meanwhile
        self.rewinding.clear()

    @staticmethod
    def _decode(raw):
        # values are written as JSON bytes; a changelog recovery may hand them back decoded
        if raw is None or isinstance(raw, dict):
            return raw
        return orjson.loads(raw)

    def _load(self, user_id: str):
        return self._decode(self.users.get(user_id))

    def partition(self, p: int) -> _Partition:
        part = self.parts.get(p)
        if part is None:
            raw = self.users.get(f"{WATERMARK_KEY}{p}")
            wm = int(raw) if raw else MIN_TS
            joiner = Joiner(self.opts.join, load=self._load, watermark=wm, partition=p)
            states, rows = [], {}
            for key, raw_state in list(self.users.items()):
                if key.startswith(WATERMARK_KEY):
                    continue
                d = self._decode(raw_state)
                if not d or d.get("p") != p:
                    continue
                if d.get("pending") or d.get("orphans"):
                    states.append(d)
                if self.pusher is not None:
                    # re-sync Feast: pushes still queued when a previous worker died are not lost
                    rows[d["u"]] = self._row(d)
            joiner.index(states)
            if rows:
                self.pusher.offer(rows)
            clock = PartitionClock(list(self.type_of_topic), self.opts.join.allowed_lateness_ms,
                                   self.opts.idle_s, time.monotonic(), wm)
            part = self.parts[p] = _Partition(joiner, clock)
            log.info("partition %d: watermark %s, %d users with open requests", p, wm, len(states))
        return part

    def _row(self, d: dict):
        from features.store import UserRow
        from features.tokens import TokenSequence

        return UserRow(d["u"], TokenSequence.from_dict(d.get("seq"), max_len=self.opts.join.history_len),
                       dict(d.get("profile") or {}))

    def _next_offset(self, topic: str, p: int) -> int | None:
        """The next offset this worker has to process on topic-partition (topic, p): the last one it
        processed + 1, or, before its first record since the assignment, the committed offset
        (None when the group has none)."""
        done = self.offsets.get((topic, p))
        if done is not None:
            return done + 1
        from faust.types import TP

        return self.app.consumer._committed_offset.get(TP(topic, p))

    def _caught_up(self, p: int):
        """caught_up(topic) for partition p (``PartitionClock.current``): the monotonic time of the
        newest fetch response whose high watermark this worker had PROCESSED up to, or None while it
        has not (or cannot tell).

        Processed, not fetched: records handed to Faust's queues count as fetched long before the
        agent sees them, so after a rebalance a topic whose backlog was still queued looked idle, the
        watermark ran ahead on the other topics, and its events expired as too late (found by the
        scale-out/in test). Until this worker has processed a record of a topic-partition, the
        committed offset is where processing stands. And the time of that fetch, not "now": a topic
        silent since its last event is only known to be silent up to the last time the broker said
        so (a starved process would otherwise flush by the wall clock past events it has not read)."""
        try:
            consumer = self.app.consumer._thread._ensure_consumer()
            assignment = consumer._fetcher._subscriptions.subscription.assignment
        except Exception:
            return None
        from aiokafka.structs import TopicPartition

        # aiokafka stamps fetch responses with time.time() in ms; the clocks run on time.monotonic()
        wall_to_mono = time.monotonic() - time.time()

        def caught_up(topic: str) -> float | None:
            try:
                st = assignment.state_value(TopicPartition(topic, p))
            except Exception:
                return None
            if st is None:
                return math.inf  # not ours: holds nothing
            if st.highwater is None or st.timestamp is None:
                return None
            if (self._next_offset(topic, p) or 0) < st.highwater:
                return None
            return st.timestamp / 1000.0 + wall_to_mono

        return caught_up

    async def quiesce(self) -> None:
        """Partitions are being revoked: let any write in flight finish and reach the broker before
        the table recovery that follows reads the changelogs, then forget the joiners."""
        async with self.lock:
            await self.app.producer.flush()
            self.reset()

    # -- processing ------------------------------------------------------------------------------
    async def on_records(self, messages) -> None:
        """One fetch of the source topics, straight from the consumer's drain loop
        (``faust_patches.deliver_in_batches``), with the crash rule of at-least-once: a batch is
        acknowledged only after it was processed, and a batch that failed half-way is never
        acknowledged: the process exits (the supervisor restarts it and the batch is re-delivered).
        A cancellation (shutdown) lets the batch finish first, so its acknowledgement is true."""
        task = asyncio.ensure_future(self.handle_records(messages))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            await asyncio.wait([task])
            if task.cancelled() or task.exception() is not None:
                self._die(task.exception())
            raise
        except Exception as exc:
            self._die(exc)

    @staticmethod
    def _die(exc: BaseException | None) -> None:
        log.critical("batch failed, exiting without acknowledging it: %r", exc, exc_info=exc)
        logging.shutdown()
        os._exit(70)

    async def handle_records(self, messages) -> None:
        """Track ``messages`` with the consumer, process them, acknowledge what was processed.

        A fetch that meets a rebalance is dropped whole, untracked (the consumer seeks back to the
        committed offsets, so it comes again). The check and the tracking are one step (no await
        between them): once Faust has suspended the flow, nothing new is tracked, and what was
        tracked before is waited for by the rebalance's ``wait_empty``."""
        async with self.lock:
            app = self.app
            if not app.flow_control.is_active():
                return
            generation = app.consumer_generation_id
            consumer = app.consumer
            messages = [m for m in messages if m.generation_id == generation]
            if not messages:
                return
            # What a rebalance's wait_empty waits for: one tracked message per batch, acknowledged
            # after the whole batch (Consumer.track_message per message cost ~3 µs each).
            unacked = consumer._unacked_messages
            marker = messages[-1]
            unacked.add(marker)
            done = await self.handle_batch(messages)
            ack = consumer.ack
            for m in done:
                ack(m)
            unacked.discard(marker)  # acknowledged above, or held back by _skipped_ahead

    async def handle_batch(self, messages) -> list:
        """Validate, dead-letter or join ``messages`` (any topic-partitions, each in offset order),
        then advance the touched partitions: emit due samples, persist changed states. Returns the
        messages that may be acknowledged (all but those held back by ``_skipped_ahead``)."""
        done = []
        t = time.perf_counter()
        now = time.monotonic()
        self.stats["batches"] += 1
        self.last_event_at = time.time()
        if self.first_event_at is None:
            self.first_event_at = self.last_event_at
        touched: set[int] = set()
        outcomes: Counter[tuple[str, str]] = Counter()
        for msg in messages:
            if await self._skipped_ahead(msg):
                continue
            done.append(msg)
            etype = self.type_of_topic.get(msg.topic, "?")
            self.offsets[(msg.topic, msg.partition)] = msg.offset
            try:
                outcome = await self._handle_record(msg, etype, now)
            except Exception as exc:  # a poison record never stops a partition: park it, go on
                log.exception("record %s[%d]@%d failed", msg.topic, msg.partition, msg.offset)
                await self._dead_letter(msg, etype, contract.Rejection(
                    contract.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}"))
                continue
            if outcome is None:
                continue
            self.stats[etype] += 1
            outcomes[etype, outcome] += 1
            touched.add(msg.partition)
        for (etype, outcome), n in outcomes.items():  # one metrics update per batch
            self.metrics.events.labels(etype).inc(n)
            self.metrics.outcomes.labels(outcome).inc(n)
            if outcome.startswith("late_"):
                self.metrics.late.labels(outcome[5:]).inc(n)
        for p in touched:
            await self._advance(p, now)
        # Dead letters need no wait: Faust flushes the producer before it commits any offset.
        self.last_batch_done_at = time.time()
        self.metrics.batch_seconds.observe(time.perf_counter() - t)
        return done

    async def _skipped_ahead(self, msg) -> bool:
        """True when ``msg`` lies beyond a gap: records before it were never handed to this worker.

        Faust drops the rest of a fetched chunk when a rebalance interrupts its delivery, and does
        not always seek back (seen as a worker taking partitions over and starting 40 records past
        the committed offset: the records in between, acknowledged by nobody, were never joined).
        A record past the next expected offset (the last processed + 1, or the committed offset for
        the first one after an assignment) is therefore not processed, and never acknowledged (so
        no commit can cover it); the partition is sought back to the expected offset, and the
        records come again in order."""
        key = (msg.topic, msg.partition)
        expected = self._next_offset(msg.topic, msg.partition)
        if expected is None or msg.offset <= expected:
            self.rewinding.pop(key, None)
            return False
        since = self.rewinding.get(key)
        if since is not None and since[0] == expected and time.monotonic() - since[1] > REWIND_GIVE_UP_S:
            # Still no record at the expected offset long after the seek: those offsets hold none
            # (transaction markers from a transactional producer take offsets too). Go on.
            log.warning("%s[%d]: no record at offsets %d..%d after seeking back %.0f s ago: taking "
                        "them as empty", msg.topic, msg.partition, expected, msg.offset - 1,
                        REWIND_GIVE_UP_S)
            del self.rewinding[key]
            return False
        if since is None or since[0] != expected:
            self.rewinding[key] = (expected, time.monotonic())
            self.gaps += 1
            log.warning("%s[%d]: got offset %d, expected %d: records were skipped upstream; seeking "
                        "back", msg.topic, msg.partition, msg.offset, expected)
            from faust.types import TP

            await self.app.consumer.seek(TP(msg.topic, msg.partition), expected)
        return True

    async def _handle_record(self, msg, etype: str, now: float) -> str | None:
        """Validate one record and fold it into its partition's joiner: the join outcome, or None
        when the record went to the dead-letter topic instead."""
        result = contract.validate(msg.value, etype, key=msg.key)
        if isinstance(result, contract.Rejection):
            await self._dead_letter(msg, etype, result)
            return None
        data = result.data
        part = self.partition(msg.partition)
        part.last_message = msg
        part.clock.observe(msg.topic, data["ts"], now)
        outcome = part.joiner.process(etype, data)
        if outcome == EXPIRED:
            # Too old to dedupe, so it cannot be joined safely: parked, not dropped. After a crash it
            # may be a re-delivery of an event already applied (the detail says so).
            await self._dead_letter(msg, etype, contract.Rejection(
                contract.BEHIND_WATERMARK,
                f"event time {data['ts']} is {part.joiner.watermark - data['ts']} ms behind the "
                f"partition watermark {part.joiner.watermark} (retention "
                f"{self.opts.join.retention_ms} ms): not joined; if it was delivered before, "
                f"it was applied then", "ts"))
        return outcome

    async def _dead_letter(self, msg, etype: str, rej: contract.Rejection):
        """Send ``msg`` to the dead-letter topic. Its size is bounded (streaming/dlq.py), so the send
        cannot fail on the input it reports. No wait: Faust flushes the producer before it commits."""
        self.stats["dlq"] += 1
        self.metrics.dlq.labels(rej.reason).inc()
        letter = dead_letter(msg.key, msg.value, reason=rej.reason, detail=rej.detail, field=rej.field,
                             event_type=etype, source_topic=msg.topic, source_partition=msg.partition,
                             source_offset=msg.offset)
        return await self.app.producer.send(self.dlq_topic, letter.key, letter.value, None, None,
                                            letter.headers)

    async def _advance(self, p: int, now: float) -> None:
        """Advance partition p's watermark, emit due samples and persist changed states.

        Order matters for crash safety: the samples are confirmed by the broker BEFORE the states
        that record their requests as closed are written to the changelog. (Otherwise a crash
        between the two could restore "closed" without the sample ever having been delivered.)
        """
        part = self.parts[p]
        joiner = part.joiner
        samples = joiner.advance(part.clock.current(now, self._caught_up(p)))
        if samples:
            producer = self.app.producer
            sends = [await producer.send(self.samples_topic, s.user_id.encode(), s.to_json(),
                                         None, None, None) for s in samples]
            await asyncio.gather(*sends)  # raises on a failed delivery → the worker restarts
            self.stats["samples"] += len(samples)
            self.metrics.samples.inc(len(samples))
        dirty = joiner.take_dirty()
        if dirty or samples:
            self._persist(part, dirty)
        self.metrics.watermark.labels(str(p)).set(joiner.watermark if joiner.watermark > MIN_TS else 0)

    def _persist(self, part: _Partition, dirty: dict) -> None:
        from faust.events import Event
        from faust.streams import _current_event

        if part.last_message is None:
            return
        # Faust's tables send a write to the changelog partition of the current event's message
        event = Event(self.app, part.last_message.key, None, None, part.last_message)
        token = _current_event.set(weakref.ref(event))
        try:
            rows = {}
            for uid, st in dirty.items():
                self.users[uid] = contract.dumps(st.to_dict())
                if self.pusher is not None:
                    from features.store import UserRow

                    rows[uid] = UserRow(uid, st.seq.last(self.opts.join.history_len), dict(st.profile))
            # the watermark goes last: restored with it, every state it covers is restored too
            self.users[f"{WATERMARK_KEY}{part.joiner.partition}"] = str(part.joiner.watermark).encode()
            if rows:
                self.pusher.offer(rows)
        finally:
            _current_event.reset(token)

    async def tick(self) -> None:
        """Idle flush: advance watermarks by the wall clock when the topics go quiet."""
        async with self.lock:
            if self.app.rebalancing:  # states are being recovered: writing now would race them
                return
            now = time.monotonic()
            for p, part in list(self.parts.items()):
                if (part.last_message is not None
                        and part.clock.current(now, self._caught_up(p)) > part.joiner.watermark):
                    await self._advance(p, now)
            self.metrics.pending.set(sum(pt.joiner.pending_requests() for pt in self.parts.values()))
        self._update_lag()
        self._write_stats()

    def _update_lag(self) -> None:
        try:
            from faust.types import TP

            for (topic, p), off in self.offsets.items():
                hw = self.app.consumer.highwater(TP(topic, p))
                if hw is not None:
                    self.metrics.lag.labels(f"{topic}:{p}").set(max(0, hw - off - 1))
        except Exception:  # lag is best effort
            pass

    def _write_stats(self) -> None:
        d = self.opts.resolved_data_dir()
        outcomes: Counter[str] = Counter()
        for pt in self.parts.values():
            outcomes.update(pt.joiner.stats)
        doc = {"pid": os.getpid(), "stats": dict(self.stats), "outcomes": dict(outcomes), "first_event_at": self.first_event_at,
               "last_event_at": self.last_event_at, "last_batch_done_at": self.last_batch_done_at,
               "feast_rows": self.pusher.pushed_rows if self.pusher else 0,
               "feast_pending": len(self.pusher.pending) if self.pusher else 0,
               "watermarks": {p: pt.joiner.watermark for p, pt in self.parts.items()},
               "rebalances": getattr(self.app, "rebalancing_count", 0), "gaps_rewound": self.gaps}
        try:
            d.mkdir(parents=True, exist_ok=True)
            tmp = d / "stats.json.tmp"
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, d / "stats.json")
        except OSError:
            pass


def create_app(opts: WorkerOptions):
    """The Faust app for ``opts``: topics declared once, one batching agent, one table."""
    import faust

    faust_patches.apply_all()
    data_dir = opts.resolved_data_dir()
    data_dir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        opts.app_id,
        broker=[f"kafka://{h}" for h in opts.bootstrap.split(",")],
        store=opts.store,
        datadir=str(data_dir),
        processing_guarantee="at_least_once",  # Tansu cannot do exactly_once (DESIGN §8)
        broker_session_timeout=config.SESSION_TIMEOUT_MS / 1000,
        broker_heartbeat_interval=config.HEARTBEAT_INTERVAL_MS / 1000,
        broker_commit_interval=opts.commit_interval_s,
        broker_max_poll_records=opts.batch_size,  # one fetch = one batch (a state written once)
        stream_buffer_maxsize=65536,  # measured: +40 % events/s over the default 4096 here
        consumer_auto_offset_reset="earliest",
        topic_partitions=opts.partitions,
        topic_replication_factor=1,
        table_standby_replicas=0,
        recovery_consistency_check=False,
        # A rebalance waits for the batch in flight: otherwise the table recovery that follows it
        # could overwrite that batch's state writes with older changelog values while its offsets
        # still get committed (found as lost impressions after a SIGKILL + restart).
        stream_wait_empty=True,
        web_enabled=False,
        producer_linger_ms=5,
        producer_max_batch_size=256 * 1024,  # samples are ~3 KB: fewer, larger produce requests
        producer_max_request_size=config.PRODUCER_MAX_REQUEST_BYTES,  # what streaming/dlq.py sizes for
    )
    source = app.topic(*opts.event_topics, key_type=bytes, value_type=bytes,
                       key_serializer="raw", value_serializer="raw", partitions=opts.partitions)
    app.topic(opts.topic(config.TOPIC_SAMPLES), key_serializer="raw", value_serializer="raw",
              partitions=opts.partitions)
    app.topic(opts.topic(config.TOPIC_DLQ), key_serializer="raw", value_serializer="raw",
              partitions=opts.partitions)
    state_schema = faust.Schema(key_type=str, value_type=bytes, key_serializer="json",
                                value_serializer="raw")
    users = app.Table("users", default=None, schema=state_schema, partitions=opts.partitions,
                      help="user_id → UserState JSON (streaming/joiner.py)")
    metrics = Metrics(opts.metrics_port, config.settings().bind_host)
    worker = StreamWorker(app, opts, users, metrics)
    app.oneranker_worker = worker

    # The hot path: each fetch of the source topics goes to the worker as one batch, not through
    # a Faust stream (streaming/faust_patches.py §2); Faust keeps the group, offsets and tables.
    faust_patches.deliver_in_batches(app, [source], worker.on_records)

    @app.timer(max(0.1, min(1.0, opts.idle_s / 4)), name="idle_flush")
    async def idle_flush():
        await worker.tick()

    if worker.pusher is not None:
        @app.task
        async def feast_writer():
            await worker.pusher.run()

    @app.on_partitions_revoked.connect
    async def on_revoked(sender, revoked, **kwargs):
        await worker.quiesce()

    @app.on_partitions_assigned.connect
    async def on_assigned(sender, assigned, **kwargs):
        worker.reset()

    return app


def run_worker(opts: WorkerOptions, loglevel: str = "warning") -> None:
    """Run the worker until SIGTERM/SIGINT (blocking)."""
    from faust import Worker

    from oneranker.kafka import ensure_topics

    names = list(opts.event_topics) + [opts.topic(config.TOPIC_SAMPLES), opts.topic(config.TOPIC_DLQ)]
    ensure_topics(opts.bootstrap, names, partitions=opts.partitions)
    app = create_app(opts)
    if app.oneranker_worker.pusher is not None:
        app.oneranker_worker.pusher.open()  # ready before the first event (feast imports are slow)
    Worker(app, loglevel=loglevel, quiet=True).execute_from_commandline()
