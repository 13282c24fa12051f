"""Three targeted fixes to faust-streaming 0.15.3 internals, applied by ``create_app``.

1. ``highwaters`` (correctness, Tansu): Tansu's ListOffsets answer is too low when batches hold
   several records, which would end Faust's changelog recovery early; the consumer's high
   watermarks are read from a fetch response instead (DESIGN §8).

2. ``_drain_messages`` (speed): the worker's source topics bypass Faust's per-message stream
   machinery (conductor → channel queue → stream iterator → ``take_events`` buffer → ack, about
   73 µs a message here, a ceiling of ~14k events/s): each fetch is handed to the worker as one
   list (``deliver_in_batches``), which tracks and acknowledges the messages through the
   consumer's own methods, so Faust's offsets, commits, gap tracking, ``wait_empty`` on a
   rebalance and table recovery work as before. Other topics (changelogs) go through the
   conductor as upstream, minus the two tasks per message of ``wait_first``.

3. ``Producer.flush`` (correctness, at-least-once): table writes go through Faust's producer
   buffer, and ``ProducerBuffer.flush`` gives up as soon as 0.1 s pass without a message leaving
   it. Faust flushes before it commits offsets, and the worker flushes before a rebalance's table
   recovery, so under CPU load (the loop late by 0.1 s, one send waiting on metadata) offsets were
   committed and changelogs read while state writes still sat in the buffer: a SIGKILL, or the
   recovery on the worker taking the partitions over, then lost acknowledged events (the
   scale-out/in test lost 1-13 samples in about half its runs on a loaded machine). The patched
   flush puts a marker behind everything queued and waits for the buffer's sender to reach it, so
   every earlier write has been handed to the Kafka producer, whose own flush then waits for the
   broker's acknowledgements.

All are version-pinned: a different Faust version gets none of them and a warning.
"""

from __future__ import annotations

import asyncio
import logging
import time

log = logging.getLogger(__name__)

FAUST_VERSION = "0.15.3"


def _version_ok(name: str) -> bool:
    import faust

    if faust.__version__ != FAUST_VERSION:
        log.warning("faust %s, not %s: not applying the %s patch", faust.__version__, FAUST_VERSION, name)
        return False
    return True


# ------------------------------------------------------------------------------------------------
# 1. High watermarks from a fetch response


async def fetch_highwaters(consumer, partitions) -> dict:
    """{tp: high watermark} as a fetch response reports it (correct on Tansu too)."""
    import aiokafka
    from aiokafka.structs import TopicPartition

    tps = [TopicPartition(tp.topic, tp.partition) for tp in partitions]
    if not tps:
        return {}
    low = await consumer.end_offsets(tps)
    probe = aiokafka.AIOKafkaConsumer(bootstrap_servers=consumer._client._bootstrap_servers,
                                      enable_auto_commit=False, group_id=None,
                                      client_id="oneranker-highwater-probe")
    await probe.start()
    try:
        probe.assign(tps)
        for tp in tps:
            probe.seek(tp, low[tp])
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            await probe.getmany(timeout_ms=100, max_records=1)
            if all(probe.highwater(tp) is not None for tp in tps):
                break
        return {tp: max(low[tp], probe.highwater(tp) or 0) for tp in tps}
    finally:
        await probe.stop()


def patch_highwaters() -> None:
    from faust.transport.drivers import aiokafka as drv

    if getattr(drv.AIOKafkaConsumerThread, "_oneranker_patched", False) or not _version_ok("highwaters"):
        return

    async def _highwaters(self, partitions):
        consumer = self._ensure_consumer()
        if self.consumer.in_transaction:
            return {tp: consumer.last_stable_offset(tp) for tp in partitions}
        result = await fetch_highwaters(consumer, list(partitions))
        by_key = {(k.topic, k.partition): v for k, v in result.items()}
        return {tp: by_key[(tp.topic, tp.partition)] for tp in partitions}

    drv.AIOKafkaConsumerThread._highwaters = _highwaters
    drv.AIOKafkaConsumerThread._oneranker_patched = True


# ------------------------------------------------------------------------------------------------
# 2. Record batches for the worker, not one stream event per message

BATCH_HANDLER_ATTR = "_oneranker_batch_handler"


def deliver_in_batches(app, topics, handler) -> None:
    """Hand every fetch of ``topics`` to ``await handler(messages)`` as one list, in the consumer's
    drain loop, instead of one stream event per message.

    The topics are registered with the app's conductor, so Faust still subscribes to them and owns
    assignment, rebalances, offsets and commits; the handler tracks, processes and acknowledges the
    messages itself (``Consumer.track_message`` / ``Consumer.ack``). ``handler`` runs in the drain
    task: the next fetch is prefetched by aiokafka meanwhile, and nothing else reads the topics."""
    for topic in topics:
        app.topics.add(topic)
    names = frozenset(name for topic in topics for name in topic.topics)
    setattr(app, BATCH_HANDLER_ATTR, (names, handler))


async def _drain_messages(self, fetcher) -> None:  # pragma: no cover (runs in the worker)
    """faust.transport.consumer.Consumer._drain_messages (0.15.3), two changes:

    * messages of the topics given to ``deliver_in_batches`` are collected per fetch and handed to
      its handler as one list;
    * other messages (table changelogs during recovery) go to the conductor's callback awaited
      directly, where upstream wraps each in ``wait_first(callback, suspend_flow.wait())``: two
      tasks and an ``asyncio.wait`` per message, about two thirds of a no-op agent's time here.
      The flag is checked before each delivery instead; a rebalance stops the flow before it
      suspends the app's flow control, so a delivery never starts into a suspended flow.
    The rest of a fetch seen after the stop is dropped, exactly as upstream (it is fetched again
    after the seek to the committed offsets)."""
    from faust.transport.consumer import CONSUMER_FETCHING

    callback = self.callback
    getmany = self.getmany
    batch_topics, handler = getattr(self.app, BATCH_HANDLER_ATTR, (frozenset(), None))
    consumer_should_stop = self._stopped.is_set
    fetcher_should_stop = fetcher._stopped.is_set
    flow_suspended = self.suspend_flow.is_set
    get_read_offset = self._read_offset.__getitem__
    set_read_offset = self._read_offset.__setitem__
    commit_every = self._commit_every
    acks_enabled_for = self.app.topics.acks_enabled_for
    yield_every = 100
    num_since_yield = 0
    sleep = asyncio.sleep
    try:
        while not (consumer_should_stop() or fetcher_should_stop()):
            self.diag.set_flag(CONSUMER_FETCHING)
            ait = getmany(timeout=1.0)
            await self.sleep(0)
            batch = []
            if not self.should_stop:
                async for tp, message in ait:
                    num_since_yield += 1
                    if num_since_yield > yield_every:
                        await sleep(0)
                        num_since_yield = 0
                    offset = message.offset
                    r_offset = get_read_offset(tp)
                    if r_offset is None or offset >= r_offset:
                        gap = offset - (r_offset or 0)
                        if gap > 1 and r_offset and acks_enabled_for(message.topic):
                            await self._add_gap(tp, r_offset + 1, offset)
                        if commit_every is not None and self._n_acked >= commit_every:
                            self._n_acked = 0
                            await self.commit()
                        if flow_suspended():
                            break  # a rebalance: the rest is fetched again after the seek
                        if message.topic in batch_topics:
                            batch.append(message)
                        else:
                            await callback(message)
                        set_read_offset(tp, offset)
            if batch:
                await handler(batch)
            self.diag.unset_flag(CONSUMER_FETCHING)
    except self.consumer_stopped_errors:
        if self.transport.app.should_stop:
            self.log.info("Broker stopped consumer, shutting down...")
            return
        raise
    except asyncio.CancelledError:
        if self.transport.app.should_stop:
            self.log.info("Consumer shutting down for user cancel.")
            return
        raise
    except Exception as exc:
        self.log.exception("Drain messages raised: %r", exc)
        raise
    finally:
        self.diag.unset_flag(CONSUMER_FETCHING)


def patch_drain() -> None:
    from faust.transport.consumer import Consumer

    if getattr(Consumer, "_oneranker_drain_patched", False) or not _version_ok("drain"):
        return
    Consumer._drain_messages = _drain_messages
    Consumer._oneranker_drain_patched = True


# ------------------------------------------------------------------------------------------------
# 3. A producer flush that really drains Faust's buffer

DRAIN_TIMEOUT_S = 60.0  # a sender stuck this long is a broken producer: fail loudly, commit nothing


class _DrainMarker:
    """Queued behind the buffer's messages; "sent" once the buffer's sender has handed every
    earlier message to the Kafka producer (the sender is one task, working in queue order)."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self.message = self  # the sender calls ``fut.message.channel.publish_message(fut, ...)``
        self.channel = self

    async def publish_message(self, fut, wait: bool = False) -> None:
        self.reached.set()


async def drain_buffer(buffer) -> None:
    """Return once every message put into Faust's ``ProducerBuffer`` before the call has been
    handed to the Kafka producer (upstream's ``flush`` may return with messages still queued)."""
    if buffer.app is not None and buffer.app.conf.producer_threaded:
        await buffer.flush()  # another queue, not used here
        return
    if buffer.state != "running":
        await buffer.flush()  # upstream raises if messages are stranded
        return
    marker = _DrainMarker()
    buffer.pending.put_nowait(marker)
    try:
        await asyncio.wait_for(marker.reached.wait(), timeout=DRAIN_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise RuntimeError(f"Faust's producer buffer did not drain in {DRAIN_TIMEOUT_S:.0f} s "
                           f"({buffer.size} messages queued)") from None


def patch_flush() -> None:
    from faust.transport.drivers import aiokafka as drv

    if getattr(drv.Producer, "_oneranker_flush_patched", False) or not _version_ok("flush"):
        return

    async def flush(self) -> None:
        await drain_buffer(self.buffer)
        if self._producer is not None:
            await self._producer.flush()
        for transaction_producer in self._transaction_producers.values():
            await transaction_producer.flush()

    drv.Producer.flush = flush
    drv.Producer._oneranker_flush_patched = True


def apply_all() -> None:
    patch_highwaters()
    patch_drain()
    patch_flush()
