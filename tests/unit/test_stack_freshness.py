"""Freshness: a followed request is served once a replica's snapshot covers its sample's offset."""

from prometheus_client import CollectorRegistry, Histogram

from deploy.stack import Freshness


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
