"""Sample streams for tests, benchmarks and the online-vs-frozen comparison, built offline.

``samples_from_requests`` turns the ad layer's requests (streaming.replay.adlayer) into the samples the
streaming joiner would emit for them: same contract (streaming.samples.Sample), same event clock as
``request_events`` (rebased to ``start_ms``, compressed by ``speed``), history = the user's click and
conversion tokens strictly before the request (features.tokens.TokenSequence, as the joiner's
DEFAULT_HISTORY_ACTIONS), labels inside the windows (the ad layer's clicks come 2–60 s and its
conversions at most 20 h after the impression, so at speed 1 every label lands inside the 1 h / 24 h
windows). Samples are ordered as the joiner closes them: by request time.

This is a direct construction rather than a run of streaming.joiner over the events so the trainer's
tests do not depend on the joiner's window/watermark machinery (owned and tested elsewhere).
"""

from __future__ import annotations

import time
from typing import Sequence

from features.tokens import Action, TokenSequence
from oneranker import config
from streaming.samples import Sample, SampleAd, sample_id

HISTORY_ACTIONS = (int(Action.CLICK), int(Action.CONVERSION))


def samples_from_requests(requests, start_ms: int = 1_700_000_000_000, speed: float = 1.0,
                          history_len: int = config.DEFAULT_HISTORY_LEN) -> list[Sample]:
    if not requests:
        return []
    reqs = sorted(requests, key=lambda r: (r.ts, r.request_id))
    base = reqs[0].ts

    def clock(ts: float) -> int:
        return start_ms + int(round((ts - base) * 1000.0 / speed))

    seqs: dict[str, TokenSequence] = {}
    out = []
    for r in reqs:
        seq = seqs.setdefault(r.user_id, TokenSequence(max_len=history_len))
        t = clock(r.ts)
        clicked = {a for a, _ in r.clicks}
        conv: dict[str, float] = {}
        for a, _, v in r.conversions:
            conv[a] = conv.get(a, 0.0) + v
        ads = [SampleAd(i + 1, a, float(b), int(a in clicked), int(a in conv), float(round(conv.get(a, 0.0), 6)))
               for i, (a, b) in enumerate(zip(r.ads, r.bids))]
        out.append(Sample(sample_id(r.user_id, r.request_id), r.user_id, r.request_id, t,
                          seq.as_of(t).to_dict(), ads, {"device": r.device, "hour": int((r.ts // 3600) % 24)},
                          0, t))
        for a, ts in r.clicks:
            seq.append(a, Action.CLICK, clock(ts))
        for a, ts, _ in r.conversions:
            seq.append(a, Action.CONVERSION, clock(ts))
    return out


def load_samples(dataset: str = "movielens-100k", limit: int | None = None, seed: int = 0,
                 speed: float = 1.0, start_ms: int | None = None, history_len: int = config.DEFAULT_HISTORY_LEN,
                 ) -> tuple[list[Sample], dict]:
    """(samples, info) for a dataset; info has the replay's sample rate at ``speed``."""
    from streaming.replay.adlayer import load_requests

    requests, catalog = load_requests(dataset, seed=seed, limit=limit)
    samples = samples_from_requests(requests, int(time.time() * 1000) if start_ms is None else start_ms,
                                    speed, history_len)
    span_s = (max(r.ts for r in requests) - min(r.ts for r in requests)) / speed if requests else 0.0
    info = {"dataset": dataset, "samples": len(samples), "ads": len(catalog),
            "users": len({r.user_id for r in requests}), "replay_span_s": round(span_s, 1),
            "replay_samples_per_s": round(len(samples) / span_s, 1) if span_s else None, "speed": speed}
    return samples, info


def publish_samples(samples: Sequence[Sample], bootstrap: str, topic: str = config.TOPIC_SAMPLES,
                    duplicate_every: int = 0) -> int:
    """Send samples (key = user_id, as the contract says); every ``duplicate_every``-th sample is sent
    twice (at-least-once delivery). Returns the number of records sent."""
    from oneranker.kafka import make_producer

    prod = make_producer(bootstrap)
    n = 0
    try:
        for i, s in enumerate(samples):
            raw = s.to_json()
            for _ in range(2 if duplicate_every and i % duplicate_every == 0 else 1):
                prod.send(topic, key=s.user_id.encode(), value=raw)
                n += 1
        prod.flush()
    finally:
        prod.close()
    return n
