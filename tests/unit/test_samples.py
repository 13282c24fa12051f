"""The sample contract's hand-written to_dict stays equal to dataclasses.asdict (a new field that
is not serialised would otherwise vanish silently) and round-trips through JSON."""

from dataclasses import asdict

from streaming.samples import Sample, SampleAd, sample_id


def _sample() -> Sample:
    return Sample(sample_id("u1", "r1"), "u1", "r1", 1_764_000_000_000,
                  history={"item_ids": ["a", "b"], "actions": [2, 3], "event_times": [1, 2]},
                  ads=[SampleAd(1, "a", 0.5, 1, 1, 3.5), SampleAd(2, "b", 0.25)],
                  context={"device": "ios", "hour": 3}, late_labels=1, closed_at=1_764_000_100_000)


def test_to_dict_is_asdict():
    s = _sample()
    assert s.to_dict() == asdict(s)


def test_to_dict_copies_mutable_parts():
    s = _sample()
    d = s.to_dict()
    d["history"]["item_ids"].append("c")
    d["ads"][0]["click"] = 0
    d["context"]["hour"] = 4
    assert s.history["item_ids"] == ["a", "b"] and s.ads[0].click == 1 and s.context["hour"] == 3


def test_json_round_trip():
    s = _sample()
    assert Sample.from_json(s.to_json()) == s
