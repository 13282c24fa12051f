"""Poison records against the real worker on the real broker: bursts of malformed events, some of
them 2–5 MB, sent among valid traffic. Every malformed event reaches the dead-letter topic exactly
once with its reason (oversize originals cut to a head, their size and sha256 in headers), every
valid request gives its sample, and the worker never exits (a 2 MB event used to kill it: forwarding
its original bytes exceeded the producer's request limit, and every restart met it again)."""

from __future__ import annotations

import hashlib
import json
import random
import time
import uuid

import pytest

from oneranker import config
from oneranker.kafka import make_producer
from streaming.samples import Sample
from streaming.testing import TopicReader, WorkerProcess, wait_until

WORKER_ARGS = ["--click-window-ms", "1000", "--conversion-window-ms", "3000",
               "--allowed-lateness-ms", "300", "--flush-idle-s", "1.0", "--metrics-port", "0"]
MB = 1024 * 1024


def impression(now_ms: int, user: str, rid: str, **over) -> dict:
    d = {"event_id": f"{rid}:i", "schema_version": 1, "ts": now_ms, "request_id": rid,
         "user_id": user, "ad_id": "a1", "position": 1, "bid": 0.5, "context": {"device": "web"}}
    d.update(over)
    return {k: v for k, v in d.items() if v is not ...}


def malformed_classes(now_ms: int, user: str) -> dict[str, tuple[str, bytes]]:
    """name → (expected reason, raw value) for the impressions topic: the classes a new user tried,
    and the ones that used to raise out of the decoder."""
    def enc(**over):
        return json.dumps(impression(now_ms, user, "rx", **over)).encode()

    base = enc()
    deep = {"x": 1}
    for _ in range(31):
        deep = {"n": deep}
    return {
        "empty": ("not_json", b""),
        "whitespace": ("not_json", b"  \n\t "),
        "not_utf8": ("not_utf8", b'{"event_id": "\xff\xfe"}'),
        "not_object": ("not_object", b"[1, 2, 3]"),
        "truncated": ("not_json", base[: len(base) // 2]),
        "nan_bid": ("invalid_value", base.replace(b'"bid": 0.5', b'"bid": NaN')),
        "inf_bid": ("invalid_value", base.replace(b'"bid": 0.5', b'"bid": 1e400')),
        "huge_bid": ("invalid_value", enc(bid=1e300)),
        "negative_bid": ("negative_money", enc(bid=-0.5)),
        "string_ts": ("wrong_type", enc(ts="yesterday")),
        "bool_ts": ("wrong_type", enc(ts=True)),
        "negative_ts": ("invalid_value", enc(ts=-5)),
        "future_ts": ("ts_in_future", enc(ts=now_ms + 30 * 24 * 3600 * 1000)),
        "old_ts": ("ts_too_old", enc(ts=1000)),
        "null_event_id": ("wrong_type", enc(event_id=None)),
        "object_request_id": ("wrong_type", enc(request_id={"a": 1})),
        "array_ad_id": ("wrong_type", enc(ad_id=["a"])),
        "negative_position": ("invalid_value", enc(position=-1)),
        "unknown_schema_version": ("unknown_schema_version", enc(schema_version=9)),
        "empty_request_id": ("invalid_value", enc(request_id="")),
        "missing_field": ("missing_field", enc(bid=...)),
        "control_char_user": ("invalid_value", enc(user_id="u\x00x")),
        "huge_int": ("not_json", base.replace(b'"bid": 0.5', b'"bid": ' + b"9" * 5000)),
        "deep_nesting": ("not_json", b"[" * 8000 + b"]" * 8000),
        "oversize_2mb_user_id": ("oversize", enc(user_id="u" * (2 * MB))),
        "oversize_5mb_context": ("oversize", enc(context={"pad": "x" * (5 * MB)})),
        "bool_position": ("wrong_type", enc(position=True)),
        "string_bid": ("wrong_type", enc(bid="0.5")),
    } | {"nested_31_ok": ("", enc(context={"deep": deep}))}  # 31 levels inside context: VALID


@pytest.fixture(scope="module")
def worker(broker, tmp_path_factory):
    tag = uuid.uuid4().hex[:8]
    home = tmp_path_factory.mktemp("poison-home")
    w = WorkerProcess(broker, f"poison-{tag}", f".p{tag}", home, WORKER_ARGS)
    w.start()
    try:
        wait_until(w.stats, 90, what="worker ready")
        yield w
    finally:
        alive = w.alive()
        w.stop()
        assert alive, w.log()[-3000:]


def send_burst(broker: str, suffix: str, valid: list[dict], bad: list[tuple[bytes, bytes]], seed: int):
    """Valid impressions and (key, raw) malformed messages shuffled into one burst, one producer."""
    producer = make_producer(broker, max_request_size=8 * MB)
    items = [("v", d) for d in valid] + [("b", kb) for kb in bad]
    random.Random(seed).shuffle(items)
    topic = config.TOPIC_IMPRESSIONS + suffix
    for kind, item in items:
        if kind == "v":
            producer.send(topic, key=item["user_id"].encode(), value=json.dumps(item).encode())
        else:
            producer.send(topic, key=item[0], value=item[1])
    producer.flush()
    producer.close()


def check(broker: str, worker: WorkerProcess, valid: list[dict], bad: dict[bytes, tuple[str, bytes]]):
    """Every valid request's sample and every malformed record's dead letter, each exactly once."""
    want_rids = {d["request_id"] for d in valid}
    samples = TopicReader(broker, config.TOPIC_SAMPLES + worker.suffix)
    dlq = TopicReader(broker, config.TOPIC_DLQ + worker.suffix)
    try:
        def got_rids():
            return {Sample.from_json(r.value).request_id for r in samples.poll()} & want_rids

        wait_until(lambda: got_rids() == want_rids, 120, what=f"{len(want_rids)} samples")
        wait_until(lambda: bad.keys() <= {r.key for r in dlq.poll()}, 60, what=f"{len(bad)} dead letters")
        mine = [r for r in dlq.records if r.key in bad]
        keys = [r.key for r in mine]
        assert len(keys) == len(set(keys)), "a dead letter was sent twice"
        for rec in mine:
            reason, raw = bad[rec.key]
            h = {k: v.decode() for k, v in rec.headers}
            assert h["reason"] == reason, (rec.key, h)
            if len(raw) > config.DLQ_MAX_VALUE_BYTES:
                assert rec.value == raw[:config.DLQ_HEAD_BYTES] and h["truncated"] == "value"
                assert int(h["original_size"]) == len(raw)
                assert h["original_sha256"] == hashlib.sha256(raw).hexdigest()
            else:
                assert (rec.value or b"") == raw and "truncated" not in h
        assert not any(r.key in {d["user_id"].encode() for d in valid} for r in dlq.records)
        per_rid = [Sample.from_json(r.value).request_id for r in samples.records]
        assert all(per_rid.count(rid) == 1 for rid in want_rids), "a sample was emitted twice"
    finally:
        samples.close()
        dlq.close()
    assert worker.alive(), worker.log()[-3000:]
    assert "Traceback" not in worker.log(), worker.log()[-3000:]


def test_every_malformed_class_in_one_burst_among_valid_events(broker, worker):
    now = int(time.time() * 1000)
    tag = uuid.uuid4().hex[:6]
    classes = malformed_classes(now, f"bad-{tag}")
    ok = classes.pop("nested_31_ok")[1]
    valid = [impression(now, f"u{i}-{tag}", f"r{i}-{tag}") for i in range(30)]
    valid.append(json.loads(ok) | {"user_id": f"deep-{tag}", "request_id": f"deep-{tag}"})
    bad = {f"{tag}-{name}".encode(): (reason, raw) for name, (reason, raw) in classes.items()}
    assert len(bad) >= 24
    send_burst(broker, worker.suffix, valid, [(k, raw) for k, (_, raw) in bad.items()], seed=1)
    check(broker, worker, valid, bad)


def test_a_thousand_mixed_events_with_multi_megabyte_ones(broker, worker):
    now = int(time.time() * 1000)
    tag = uuid.uuid4().hex[:6]
    classes = list(malformed_classes(now, f"bad-{tag}").items())
    classes = [(n, c) for n, c in classes if n != "nested_31_ok" and not n.startswith("oversize")]
    rng = random.Random(7)
    bad: dict[bytes, tuple[str, bytes]] = {}
    for i in range(5):  # 2–5 MB events
        pad = "x" * rng.randint(2 * MB, 5 * MB)
        bad[f"{tag}-big-{i}".encode()] = ("oversize", json.dumps(
            impression(now, f"big-{tag}", f"big{i}", context={"pad": pad})).encode())
    for i in range(95):
        name, (reason, raw) = classes[i % len(classes)]
        bad[f"{tag}-{i}-{name}".encode()] = (reason, raw)
    valid = [impression(now, f"u{i % 97}-{tag}", f"r{i}-{tag}", event_id=f"{tag}:{i}") for i in range(900)]
    send_burst(broker, worker.suffix, valid, [(k, raw) for k, (_, raw) in bad.items()], seed=2)
    check(broker, worker, valid, bad)
