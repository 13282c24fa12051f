"""The producer-flush patch (streaming/faust_patches.py) on Faust's real ``ProducerBuffer``: the
upstream flush returns while a slow sender still holds messages; the drain waits for all of them.
The "channel" stands in for a Kafka topic: what is under test is the buffer, not the broker."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from streaming import faust_patches

SEND_S = 0.15  # one send slower than upstream's 0.1 s patience (a metadata wait, a loaded machine)


class SlowChannel:
    def __init__(self):
        self.published: list[int] = []

    async def publish_message(self, fut, wait: bool = False):
        await asyncio.sleep(SEND_S)  # simulated send latency, not synchronisation
        self.published.append(fut.n)


def _message(channel, n):
    msg = SimpleNamespace(channel=channel)
    return SimpleNamespace(message=msg, n=n)


async def _buffer():
    from faust.transport.producer import ProducerBuffer

    buf = ProducerBuffer()
    buf.app = SimpleNamespace(conf=SimpleNamespace(producer_threaded=False))
    await buf.start()
    return buf


@pytest.mark.parametrize("drain", ["upstream", "patched"])
def test_flush_returns_only_when_every_queued_message_was_handed_on(drain):
    async def run():
        buf = await _buffer()
        ch = SlowChannel()
        try:
            for n in range(4):
                buf.put(_message(ch, n))
            if drain == "upstream":
                await buf.flush()
            else:
                await faust_patches.drain_buffer(buf)
            return list(ch.published), buf.size
        finally:
            while not buf.pending.empty():  # what upstream left behind would fail its stop()
                buf.pending.get_nowait()
            await buf.stop()

    published, still_queued = asyncio.run(run())
    if drain == "upstream":  # the bug the patch exists for: it gave up with messages queued
        assert still_queued > 0 and len(published) < 4
    else:
        assert published == [0, 1, 2, 3] and still_queued == 0


def test_the_flush_patch_is_installed_on_the_pinned_faust():
    import faust
    from faust.transport.drivers import aiokafka as drv

    faust_patches.apply_all()
    assert faust.__version__ == faust_patches.FAUST_VERSION
    assert drv.Producer._oneranker_flush_patched
