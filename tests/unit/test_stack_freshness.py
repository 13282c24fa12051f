"""Freshness: a followed request is served once a replica's snapshot covers its sample's offset."""

from prometheus_client import CollectorRegistry, Histogram

from deploy.freshness import Freshness


def test_served_when_trained_through_offsets_cover_the_sample():
    registry = CollectorRegistry()
    hist = Histogram("fresh", "test", registry=registry)
    f = Freshness(histogram=hist)
    f.produced = {"r1": 100.0, "r2": 101.0, "r3": 102.0}
    f.sample_at = {"r1": (0, 5), "r2": (1, 0), "r3": (0, 9)}
    f.on_version(110.0, {0: 6})  # covers offsets 0..5 of partition 0 only
    assert f.served == {"r1": 110.0}
    f.on_version(120.0, {0: 10, 1: 1})
    assert f.served == {"r1": 110.0, "r2": 120.0, "r3": 120.0}  # r1 keeps its first time
    assert f.seconds() == [10.0, 18.0, 19.0]
    summary = f.summary()
    assert summary["served"] == summary["followed"] == 3 and summary["p50_s"] == 18.0
    assert registry.get_sample_value("fresh_count") == 3
    assert registry.get_sample_value("fresh_sum") == 47.0


def test_stages_split_the_time_between_production_and_serving():
    f = Freshness()
    f.produced = {"r1": 100.0, "r2": 100.0}
    f.sample_at = {"r1": (0, 5), "r2": (1, 0)}
    f.sample_time = {"r1": 106.0, "r2": 107.0}
    key = "oneranker.samples:"
    f.on_checkpoint({"created": 110.0, "offsets": {key + "0": 6},
                     "progress": [[108.0, {key + "0": 3}], [109.0, {key + "0": 6, "other.topic:1": 9}]]})
    f.on_checkpoint({"created": 115.0, "offsets": {key + "0": 6, key + "1": 1},
                     "progress": [[114.0, {key + "0": 6, key + "1": 1}]]})
    f.on_snapshot({"created": 117.0, "published": 120.0,
                   "trained_through": {"offsets": {key + "0": 6, key + "1": 1}}})
    f.on_version(121.0, {0: 6, 1: 1})
    stages = f.stages()
    # r1: window 6, learn 3 (the second step covers offset 5), checkpoint 1, export 7, validate 3, swap 1
    # r2: window 7, learn 7 (learned at 114), checkpoint 1, export 2, validate 3, swap 1
    assert {s: (q["n"], q["mean_s"]) for s, q in stages.items()} == {
        "window": (2, 6.5), "learn": (2, 5.0), "checkpoint": (2, 1.0), "export": (2, 4.5),
        "validate": (2, 3.0), "swap": (2, 1.0)}
    assert f.summary()["p50_s"] == 21.0 and f.summary()["stages"]["swap"]["p50_s"] == 1.0
