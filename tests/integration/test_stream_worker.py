"""The real Faust worker on the real broker: a scripted sequence → exact samples; every malformed
input class → the dead-letter topic with its reason, while valid events keep flowing; Feast holds the
user's last tokens."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from features.tokens import Action
from oneranker import config
from streaming.broker import free_port
from streaming.samples import Sample, sample_id
from streaming.testing import TopicReader, WorkerProcess, publish, wait_until

WORKER_ARGS = ["--click-window-ms", "1000", "--conversion-window-ms", "5000",
               "--allowed-lateness-ms", "300", "--flush-idle-s", "1.0"]


def scripted(t0: int, u1: str, u2: str):
    """As tests/unit/test_joiner.py: a duplicate click, two conversions of one ad, a click after the
    click window, a conversion after its request closed."""
    def imp(rid, user, ad, pos, dt, bid):
        return "impression", {"event_id": f"{rid}:i{pos}", "schema_version": 1, "ts": t0 + dt,
                              "request_id": rid, "user_id": user, "ad_id": ad, "position": pos,
                              "bid": bid, "context": {"device": "web", "hour": 1}}

    def click(rid, user, ad, dt):
        return "click", {"event_id": f"{rid}:c:{ad}", "schema_version": 1, "ts": t0 + dt,
                         "request_id": rid, "user_id": user, "ad_id": ad}

    def conv(rid, user, ad, dt, value):
        return "conversion", {"event_id": f"{rid}:v:{ad}:{dt}", "schema_version": 1, "ts": t0 + dt,
                              "request_id": rid, "user_id": user, "ad_id": ad, "value": value}

    r1, r2, r3, r4 = (f"{u1}-r1", f"{u2}-r2", f"{u1}-r3", f"{u2}-r4")
    return [
        imp(r1, u1, "a", 1, 0, 0.5), imp(r1, u1, "b", 2, 0, 0.7), imp(r1, u1, "c", 3, 0, 0.9),
        click(r1, u1, "b", 200), click(r1, u1, "b", 200),
        imp(r2, u2, "a", 1, 300, 1.0), imp(r2, u2, "c", 2, 300, 1.1),
        conv(r1, u1, "b", 900, 10.0),
        click(r1, u1, "c", 1500),
        conv(r1, u1, "b", 2000, 5.5),
        imp(r3, u1, "d", 1, 2500, 0.3), imp(r3, u1, "a", 2, 2500, 0.5),
        click(r3, u1, "a", 2600),
        imp(r4, u2, "e", 1, 9000, 2.0),
        conv(r1, u1, "b", 9100, 3.0),  # r1 closed at ≈ t0+5000 (+ lateness): a late conversion
    ]


def malformed(now_ms: int, user: str) -> dict[str, bytes]:
    """One raw message per rejection class (sent to the impressions topic)."""
    good = {"event_id": "x", "schema_version": 1, "ts": now_ms, "request_id": "rx", "user_id": user,
            "ad_id": "a", "position": 1, "bid": 1.0}

    def enc(**over):
        d = {**good, **over}
        return json.dumps({k: v for k, v in d.items() if v is not ...}).encode()

    return {
        "not_json": b"{this is not json",
        "not_utf8": b'{"event_id": "\xff\xfe"}',
        "not_object": b"[1, 2, 3]",
        "missing_field": enc(bid=...),
        "wrong_type": enc(position="first"),
        "negative_money": enc(bid=-0.5),
        "ts_too_old": enc(ts=1000),
        "ts_in_future": enc(ts=now_ms + 30 * 24 * 3600 * 1000),
        "oversize": enc(context={"pad": "x" * (config.MAX_EVENT_BYTES + 10)}),
        "unknown_schema_version": enc(schema_version=7),
    }


@pytest.fixture(scope="module")
def run(broker, tmp_path_factory):
    """One worker; the scripted sequence, malformed messages in between, then more valid traffic."""
    import uuid

    from oneranker.kafka import make_producer

    tag = uuid.uuid4().hex[:8]
    suffix = f".t{tag}"
    home = tmp_path_factory.mktemp("stream-home")
    port = free_port()
    worker = WorkerProcess(broker, f"test-{tag}", suffix, home, WORKER_ARGS + ["--metrics-port", str(port)])
    worker.start()
    try:
        wait_until(worker.stats, 90, what="worker ready")  # the first idle tick writes stats.json
        u1, u2 = f"u1-{tag}", f"u2-{tag}"
        t0 = int(time.time() * 1000) + 300
        events = scripted(t0, u1, u2)
        producer = make_producer(broker)
        publish(broker, events[:8], suffix, pace=True, producer=producer)
        bad = malformed(int(time.time() * 1000), f"bad-{tag}")
        for reason, raw in bad.items():
            producer.send(config.TOPIC_IMPRESSIONS + suffix, key=f"bad-{tag}-{reason}".encode(), value=raw)
        producer.send(config.TOPIC_CONVERSIONS + suffix, key=b"neg", value=json.dumps(
            {"event_id": "n", "schema_version": 1, "ts": int(time.time() * 1000), "request_id": "r",
             "user_id": "neg", "ad_id": "a", "value": -3.0}).encode())
        producer.flush()
        # valid traffic keeps flowing after the bad messages (same topics, same partitions)
        while time.time() * 1000 < events[8][1]["ts"]:
            time.sleep(0.005)  # replay pacing
        publish(broker, events[8:], suffix, pace=True, producer=producer)
        producer.close()
        samples = TopicReader(broker, config.TOPIC_SAMPLES + suffix)
        recs = samples.until(lambda rs: len(rs) >= 4, 60, "4 samples")
        dlq = TopicReader(broker, config.TOPIC_DLQ + suffix)
        dlq_recs = dlq.until(lambda rs: len(rs) >= len(bad) + 1, 60, "dead letters")
        wait_until(lambda: (worker.stats() or {}).get("stats", {}).get("conversion", 0) >= 3, 30,
                   what="late conversion processed")
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        yield {"worker": worker, "samples": [Sample.from_json(r.value) for r in recs], "dlq": dlq_recs,
               "bad": bad, "u1": u1, "u2": u2, "t0": t0, "metrics": metrics, "home": home, "tag": tag}
        samples.close()
        dlq.close()
    finally:
        assert worker.alive(), worker.log()[-3000:]
        worker.stop()


def test_scripted_sequence_through_the_worker(run):
    u1, u2, t0 = run["u1"], run["u2"], run["t0"]
    by_rid = {s.request_id: s for s in run["samples"]}
    assert sorted(by_rid) == sorted([f"{u1}-r1", f"{u2}-r2", f"{u1}-r3", f"{u2}-r4"])
    assert len(run["samples"]) == 4  # one sample per request, no duplicates in a clean run
    r1 = by_rid[f"{u1}-r1"]
    assert r1.sample_id == sample_id(u1, f"{u1}-r1") and r1.ts == t0
    assert [(a.position, a.ad_id, a.bid, a.click, a.conversion, a.value) for a in r1.ads] == [
        (1, "a", 0.5, 0, 0, 0.0), (2, "b", 0.7, 1, 1, 15.5), (3, "c", 0.9, 0, 0, 0.0)]
    assert r1.late_labels == 1 and r1.history["item_ids"] == [] and r1.context == {"device": "web", "hour": 1}
    r3 = by_rid[f"{u1}-r3"]
    assert r3.history == {"item_ids": ["b", "b", "c", "b"],
                          "actions": [Action.CLICK, Action.CONVERSION, Action.CLICK, Action.CONVERSION],
                          "event_times": [t0 + 200, t0 + 900, t0 + 1500, t0 + 2000]}
    assert [(a.ad_id, a.click) for a in r3.ads] == [("d", 0), ("a", 1)]
    r2 = by_rid[f"{u2}-r2"]
    assert [(a.ad_id, a.click, a.conversion) for a in r2.ads] == [("a", 0, 0), ("c", 0, 0)]
    m = run["metrics"]
    assert 'oneranker_stream_join_outcomes_total{outcome="duplicate"} 1.0' in m
    assert 'oneranker_stream_late_labels_total{type="conversion"} 1.0' in m
    assert 'oneranker_stream_late_labels_total{type="click"} 1.0' in m


def test_every_malformed_class_lands_in_the_dlq_with_its_reason(run):
    by_key = {r.key.decode(): r for r in run["dlq"]}
    for reason, raw in run["bad"].items():
        rec = by_key[f"bad-{run['tag']}-{reason}"]
        headers = {k: v.decode() for k, v in rec.headers}
        assert headers["reason"] == reason
        assert rec.value == raw  # the original bytes, untouched
        assert headers["source_topic"] == config.TOPIC_IMPRESSIONS + run["worker"].suffix
        assert headers["event_type"] == "impression" and int(headers["source_offset"]) >= 0
    neg = {k: v.decode() for k, v in by_key["neg"].headers}
    assert neg["reason"] == "negative_money" and neg["field"] == "value"
    assert 'oneranker_stream_dlq_total{reason="oversize"} 1.0' in run["metrics"]
    # and the worker kept going: the samples after the bad messages came out (previous test)
    assert run["worker"].alive()


def test_feast_holds_the_users_last_tokens(run):
    from features.store import FeatureStoreClient, open_store

    client = FeatureStoreClient(open_store(home=run["home"]))
    t0 = run["t0"]
    want = {"item_ids": ["b", "b", "c", "b", "a", "b"],
            "actions": [2, 3, 2, 3, 2, 3],
            "event_times": [t0 + 200, t0 + 900, t0 + 1500, t0 + 2000, t0 + 2600, t0 + 9100]}
    got = wait_until(lambda: (lambda s: s if s.to_dict() == want else None)(
        client.get_user_sequences([run["u1"]])[run["u1"]]), 30, what="feast sequence")
    assert got.to_dict() == want
    prof = client.get_user_profiles([run["u1"]])[run["u1"]]
    assert prof["request_count"] == 2 and prof["click_count"] == 3 and prof["conversion_count"] == 3
    assert prof["total_value"] == pytest.approx(18.5)
