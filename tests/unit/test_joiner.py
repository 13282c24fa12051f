"""The attribution join (streaming/joiner.py), pure: scripted event sequences → exact samples."""

from __future__ import annotations

import json

from features.tokens import Action
from streaming.joiner import (DUPLICATE, EXPIRED, LATE_CLICK, LATE_CONVERSION, LATE_IMPRESSION, ORPHAN, JoinConfig, Joiner,
                              STATE_HISTORY_FACTOR, PartitionClock, UserState)
from streaming.samples import Sample, sample_id

CFG = JoinConfig(click_window_ms=1000, conversion_window_ms=5000, allowed_lateness_ms=100)
T0 = 1_700_000_000_000


def imp(rid, user, ad, pos, ts, bid=1.0, eid=None):
    return "impression", {"event_id": eid or f"{rid}:i{pos}", "schema_version": 1, "ts": ts,
                          "request_id": rid, "user_id": user, "ad_id": ad, "position": pos, "bid": bid,
                          "context": {"device": "ios", "hour": 3}}


def click(rid, user, ad, ts, eid=None):
    return "click", {"event_id": eid or f"{rid}:c:{ad}", "schema_version": 1, "ts": ts,
                     "request_id": rid, "user_id": user, "ad_id": ad}


def conv(rid, user, ad, ts, value, eid=None):
    return "conversion", {"event_id": eid or f"{rid}:v:{ad}:{ts}", "schema_version": 1, "ts": ts,
                          "request_id": rid, "user_id": user, "ad_id": ad, "value": value}


def script():
    """Two requests of u1 and one of u2; a duplicate click, a second conversion, a late conversion."""
    return [
        imp("r1", "u1", "a", 1, T0, 0.5), imp("r1", "u1", "b", 2, T0, 0.7), imp("r1", "u1", "c", 3, T0, 0.9),
        click("r1", "u1", "b", T0 + 200),
        click("r1", "u1", "b", T0 + 200),  # duplicate (same event_id)
        imp("r2", "u2", "a", 1, T0 + 300), imp("r2", "u2", "c", 2, T0 + 300),
        conv("r1", "u1", "b", T0 + 900, 10.0),
        click("r1", "u1", "c", T0 + 1500),  # after the 1 s click window: late label
        conv("r1", "u1", "b", T0 + 2000, 5.5),  # a second conversion of b: values add up
        imp("r3", "u1", "d", 1, T0 + 2500), imp("r3", "u1", "a", 2, T0 + 2500),
        click("r3", "u1", "a", T0 + 2600),
        # far later traffic of u2 moves the watermark past r1 and r3
        imp("r4", "u2", "e", 1, T0 + 9000),
        conv("r1", "u1", "b", T0 + 9100, 3.0),  # r1 already closed: a late conversion
        imp("r5", "u2", "e", 1, T0 + 20000),
    ]


def run(events, joiner=None):
    j = joiner or Joiner(CFG)
    out = []
    for et, data in events:
        out += j.feed(et, data)
    return j, out


def test_scripted_sequence_gives_exact_samples():
    j, samples = run(script())
    by_rid = {s.request_id: s for s in samples}
    assert sorted(s.request_id for s in samples) == ["r1", "r2", "r3", "r4"]  # r5 still open
    r1 = by_rid["r1"]
    assert r1.sample_id == sample_id("u1", "r1") and r1.user_id == "u1" and r1.ts == T0
    assert [(a.position, a.ad_id, a.bid) for a in r1.ads] == [(1, "a", 0.5), (2, "b", 0.7), (3, "c", 0.9)]
    assert [a.click for a in r1.ads] == [0, 1, 0]  # c's click came after the click window
    assert [a.conversion for a in r1.ads] == [0, 1, 0]
    assert [a.value for a in r1.ads] == [0.0, 15.5, 0.0]
    assert r1.late_labels == 1
    assert r1.history == {"item_ids": [], "actions": [], "event_times": []}
    assert r1.context == {"device": "ios", "hour": 3}
    # r3's history: u1's click/conversion tokens strictly before r3 (impressions are not tokens
    # by default) — the late click at T0+1500 is still behaviour, so it is in the history.
    r3 = by_rid["r3"]
    assert r3.history == {
        "item_ids": ["b", "b", "c", "b"],
        "actions": [Action.CLICK, Action.CONVERSION, Action.CLICK, Action.CONVERSION],
        "event_times": [T0 + 200, T0 + 900, T0 + 1500, T0 + 2000]}
    assert [(a.ad_id, a.click) for a in r3.ads] == [("d", 0), ("a", 1)]
    assert by_rid["r2"].history["item_ids"] == [] and [a.click for a in by_rid["r2"].ads] == [0, 0]
    assert j.stats[DUPLICATE] == 1
    assert j.stats[LATE_CONVERSION] == 1  # the conversion of the closed r1
    assert j.stats["late_click"] == 1
    # the sequence keeps everything, including the late conversion, in event-time order
    u1 = j.state("u1").seq
    assert u1.event_times == sorted(u1.event_times) and u1.item_ids[-1] == "b" and len(u1) == 6
    # flushing at the end closes r5
    assert [s.request_id for s in j.flush()] == ["r5"]


def test_history_never_contains_the_request_or_later_tokens():
    j, samples = run(script())
    for s in samples + j.flush():
        assert all(t < s.ts for t in s.history["event_times"])


def test_duplicates_anywhere_change_nothing():
    events = script()
    doubled = []
    for e in events:
        doubled += [e, e]
    _, once = run(events)
    j2, twice = run(doubled)
    assert [s.to_json() for s in once] == [s.to_json() for s in twice]
    assert j2.stats[DUPLICATE] == len(events) + 1  # the script has one of its own


def test_labels_before_impressions_are_held_and_attached():
    ev = [click("r9", "u3", "x", T0 + 50), conv("r9", "u3", "x", T0 + 60, 2.0),
          imp("r9", "u3", "x", 1, T0), imp("r9", "u3", "y", 2, T0)]
    j = Joiner(CFG)
    for et, data in ev:
        j.process(et, data)  # all arrive before the watermark moves
    assert j.stats[ORPHAN] == 2
    (s,) = j.advance(T0 + 10_000)
    assert [(a.ad_id, a.click, a.conversion, a.value) for a in s.ads] == [("x", 1, 1, 2.0), ("y", 0, 0, 0.0)]


def test_label_for_an_ad_whose_impression_comes_later_still_counts():
    j = Joiner(CFG)
    j.process(*imp("r", "u", "a", 1, T0))
    j.process(*click("r", "u", "b", T0 + 10))  # b's impression not processed yet
    j.process(*imp("r", "u", "b", 2, T0))
    j.process(*click("r", "u", "zz", T0 + 10))  # an ad the request never showed
    (s,) = j.advance(T0 + 10_000)
    assert [(a.ad_id, a.click) for a in s.ads] == [("a", 0), ("b", 1)]
    assert j.stats["unmatched"] == 1


def test_a_token_processed_after_a_later_request_still_lands_in_its_history():
    j = Joiner(CFG)
    j.process(*imp("r1", "u", "a", 1, T0))
    j.process(*imp("r2", "u", "b", 1, T0 + 500))  # impressions topic ran ahead…
    j.process(*click("r1", "u", "a", T0 + 100))  # …of the clicks topic
    j.process(*click("r2", "u", "b", T0 + 600))  # after r2: not in its history
    by = {s.request_id: s for s in j.advance(T0 + 100_000)}
    assert by["r2"].history["event_times"] == [T0 + 100]
    assert by["r1"].history["event_times"] == []


def test_quiet_user_closes_on_the_partition_watermark():
    j = Joiner(CFG)
    j.feed(*imp("q1", "quiet", "a", 1, T0))
    assert j.feed(*imp("z1", "busy", "a", 1, T0 + 4000)) == []
    out = j.feed(*imp("z2", "busy", "a", 1, T0 + 6000))  # watermark T0+5900 ≥ T0 + 5000
    assert [s.request_id for s in out] == ["q1"]


def test_events_far_behind_the_watermark_are_expired_not_applied():
    j = Joiner(CFG)
    j.feed(*imp("n1", "u", "a", 1, T0 + 100_000))
    assert j.process(*click("old", "u", "a", T0)) == EXPIRED
    assert len(j.state("u").seq) == 0


def test_a_closed_requests_events_behind_the_retention_are_late_and_not_applied_again():
    """A crash re-delivers events whose ids were pruned: when their request is closed (its sample
    is out) they are late, not expired (which the worker would dead-letter), and change nothing."""
    j = Joiner(CFG)
    j.feed(*imp("r1", "u", "a", 1, T0))
    j.feed(*click("r1", "u", "a", T0 + 100))
    j.feed(*imp("later", "u", "b", 1, T0 + CFG.retention_ms + 3000))  # r1 closes, ids pruned
    before = j.state("u").to_dict()
    assert "r1" in j.state("u").closed and "r1:c:a" not in j.state("u").seen
    assert j.process(*click("r1", "u", "a", T0 + 100)) == LATE_CLICK
    assert j.process(*imp("r1", "u", "a", 1, T0)) == LATE_IMPRESSION
    assert j.state("u").to_dict() == before


def test_a_state_restored_with_an_older_watermark_never_applies_an_event_twice():
    """The changelog holds a user's state (its ids pruned under a newer watermark) but not the
    watermark written after it (a SIGKILL between the two): the restored partition starts from an
    older watermark. Re-delivered events whose ids were pruned must still not be folded in again
    (they were: the same token twice in a sample's history after SIGKILLs under load)."""
    j = Joiner(CFG)
    j.feed(*imp("r1", "u", "a", 1, T0))
    j.feed(*click("r1", "u", "a", T0 + 100))
    old_watermark = j.watermark
    j.feed(*imp("later", "u", "b", 1, T0 + CFG.retention_ms + 3000))  # r1 closes, its ids pruned
    stored = json.loads(json.dumps(j.state("u").to_dict()))
    assert "r1:c:a" not in stored["seen"] and stored["seq"]["item_ids"] == ["a"]

    restored = Joiner(CFG, load={"u": stored}.get, watermark=old_watermark)
    restored.index([stored])
    for et, data in [imp("r1", "u", "a", 1, T0), click("r1", "u", "a", T0 + 100),
                     imp("later", "u", "b", 1, T0 + CFG.retention_ms + 3000)]:
        restored.process(et, data)
    st = restored.state("u")
    assert st.seq.to_dict()["item_ids"] == ["a"]  # the click's token once, not twice
    assert st.profile["click_count"] == 1 and st.profile["request_count"] == 2
    samples = restored.flush()  # r1's sample was out before the crash; "later" is still open
    assert [x.request_id for x in samples] == ["later"] and samples[0].history["item_ids"] == ["a"]


def test_state_round_trips_through_json_mid_stream():
    events = script()
    j1, out1 = run(events)
    # same stream, but the state is saved/reloaded (as the worker's table does) after every event
    store: dict = {}
    out2 = []
    wm = None
    for et, data in events:
        j = Joiner(CFG, load=store.get, watermark=wm if wm is not None else -(2**62))
        j.index(store.values())
        out2 += j.feed(et, data)
        for uid, st in j.take_dirty().items():
            store[uid] = json.loads(json.dumps(st.to_dict()))
        wm = j.watermark
    assert [s.to_json() for s in out1] == [s.to_json() for s in out2]


def test_sample_json_round_trip_and_id_determinism():
    _, samples = run(script())
    for s in samples:
        again = Sample.from_json(s.to_json())
        assert again == s and again.history_sequence().to_dict() == s.history
    assert sample_id("u1", "r1") == sample_id("u1", "r1") != sample_id("u1", "r2")


def test_windows_scale_with_replay_speed():
    cfg = JoinConfig().scaled(1 / 1000)
    assert cfg.click_window_ms == 3600 and cfg.conversion_window_ms == 86400


def test_userstate_history_len_caps_snapshots():
    cfg = JoinConfig(click_window_ms=10, conversion_window_ms=10, allowed_lateness_ms=0, history_len=3)
    j = Joiner(cfg)
    for i in range(6):
        j.feed(*click(f"c{i}", "u", f"a{i}", T0 + i))
    j.feed(*imp("r", "u", "z", 1, T0 + 100))
    (s,) = j.flush()
    assert s.history["item_ids"] == ["a3", "a4", "a5"]
    # The state keeps STATE_HISTORY_FACTOR × history_len tokens (histories are cut at close).
    kept = UserState.from_dict(j.state("u").to_dict(), 3).seq.item_ids
    assert kept == ["a0", "a1", "a2", "a3", "a4", "a5"][-STATE_HISTORY_FACTOR * 3:]


def test_open_requests_do_not_copy_the_history_and_keep_it_as_of_their_time():
    cfg = JoinConfig(click_window_ms=1000, conversion_window_ms=1000, allowed_lateness_ms=0, history_len=3)
    j = Joiner(cfg)
    for i in range(3):
        j.feed(*click(f"c{i}", "u", f"a{i}", T0 + i))
    for r in range(50):  # a heavy user: many requests open at once
        j.feed(*imp(f"r{r}", "u", f"z{r}", 1, T0 + 10 + r))
    for i in range(3):  # newer tokens inside the open windows must not leak into older requests
        j.feed(*click(f"n{i}", "u", f"b{i}", T0 + 20 + i))
    state = j.state("u").to_dict()
    assert all("history" not in req for req in state["pending"].values())
    samples = {s.request_id: s for s in j.flush()}
    assert samples["r0"].history["item_ids"] == ["a0", "a1", "a2"]
    assert samples["r11"].history["item_ids"] == ["a1", "a2", "b0"]
    assert samples["r49"].history["item_ids"] == ["b0", "b1", "b2"]


def test_partition_clock_min_over_topics_idle_and_wall_clock_flush():
    c = PartitionClock(["i", "c", "v"], allowed_lateness_ms=100, idle_s=2.0, now=0.0)
    c.observe("i", T0 + 5000, now=0.1)
    assert c.current(0.2) == -(2**62)  # c and v not heard from yet (still within idle_s)
    c.observe("c", T0 + 3000, now=0.3)
    assert c.current(2.05) == T0 + 2900  # v never came: stops holding after idle_s; min(i, c)
    c.observe("c", T0 + 6000, now=2.6)
    assert c.current(2.7) == T0 + 5900  # i is idle since 0.1 → only c holds
    # all idle: the watermark follows the wall clock from the newest event
    assert c.current(5.6) == T0 + 6000 + 3000 - 100
    # never moves back
    c.observe("i", T0, now=6.0)
    assert c.current(6.0) == T0 + 6000 + 3000 - 100


def test_partition_clock_a_topic_with_a_backlog_holds_however_long_it_is_silent():
    c = PartitionClock(["i", "c"], allowed_lateness_ms=0, idle_s=1.0, now=0.0)
    c.observe("c", T0 + 40_000, now=0.1)  # restart: clicks fetched far ahead of impressions
    caught_up = {"i": None, "c": 5.0}
    assert c.current(5.0, caught_up.get) == -(2**62)  # impressions never seen, still behind
    c.observe("i", T0 + 1000, now=5.1)
    assert c.current(9.0, caught_up.get) == T0 + 1000  # held at the impressions' event time
    caught_up.update(i=9.0, c=9.0)
    assert c.current(9.0, caught_up.get) > T0 + 40_000  # caught up and silent: wall clock


def test_partition_clock_idle_time_counts_only_up_to_the_last_confirming_fetch():
    """A process paused for 10 s (starved, a long batch) has no fetch newer than the pause: the
    silence is not confirmed, so neither topic stops holding and the wall-clock flush waits."""
    c = PartitionClock(["i", "c"], allowed_lateness_ms=0, idle_s=1.0, now=0.0)
    c.observe("i", T0 + 1000, now=0.5)
    c.observe("c", T0 + 900, now=0.5)
    last_fetch = {"i": 0.6, "c": 0.6}
    assert c.current(10.6, last_fetch.get) == T0 + 900  # as with events 0.1 s ago
    c.observe("c", T0 + 1200, now=10.7)  # the fetch after the pause brings a click …
    last_fetch.update(i=10.7, c=10.7)
    assert c.current(10.7, last_fetch.get) == T0 + 1200  # … impressions now confirmed silent
    # once the broker confirms both silent for idle_s, the flush follows the confirmed span only
    last_fetch.update(i=12.0, c=12.0)
    assert c.current(30.0, last_fetch.get) == T0 + 1200 + 1300
    assert c.current(30.0) == T0 + 1200 + 19_300  # no fetch information: the wall clock (tests)