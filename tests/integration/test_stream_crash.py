"""Crash safety: SIGKILL the worker three times during a replay and restart it each time. Nothing is
lost (every request's sample_id comes out, exactly the uninterrupted run's set), duplicates are only
repeated sample_ids of identical requests, and Feast ends with every user's last N tokens. Both tests
run with every core busy (the ``cpu_load`` fixture): the races they guard against show under load.
Every copy of a sample is checked against the uninterrupted run (its history token by token and its
labels), not only the first: a re-delivered event folded in twice shows as a duplicated token."""

from __future__ import annotations

import threading
import time
import uuid
from collections import defaultdict

import pytest

from streaming.joiner import JoinConfig, Joiner
from streaming.replay.adlayer import load_requests, request_events
from streaming.samples import Sample, sample_id
from streaming.testing import TopicReader, WorkerProcess, publish, running, wait_until
from oneranker import config

CLICK_MS, CONV_MS, LATENESS_MS = 500, 2000, 300
WORKER_ARGS = ["--click-window-ms", str(CLICK_MS), "--conversion-window-ms", str(CONV_MS),
               "--allowed-lateness-ms", str(LATENESS_MS), "--flush-idle-s", "1.0",
               "--metrics-port", "0"]
N_REQUESTS = 250
REPLAY_SECONDS = 60.0  # a restart takes 10-20 s here (imports, Feast, the killed member times out)
# Three kills, each after the restarted worker is processing again: with every core busy a restart
# took up to 30 s, and a 60 s replay ended before the third kill.
SIGKILL_REPLAY_SECONDS = 110.0


def replay(tag: str, seconds: float = REPLAY_SECONDS):
    requests, _ = load_requests("synthetic", seed=5, limit=N_REQUESTS)
    speed = (max(r.ts for r in requests) - min(r.ts for r in requests)) / seconds
    events = request_events(requests, int(time.time() * 1000) + 1000, speed)
    for _, d in events:  # unique ids per run: topics and Feast are shared with other tests
        d["user_id"] = f"{tag}-{d['user_id']}"
        d["request_id"] = f"{tag}-{d['request_id']}"
        d["event_id"] = f"{tag}-{d['event_id']}"
    return requests, events


def reference(events):
    """The uninterrupted run, computed by the same pure joiner over the whole stream."""
    j = Joiner(JoinConfig(CLICK_MS, CONV_MS, LATENESS_MS))
    out = []
    for et, d in events:
        out += j.feed(et, d)
    out += j.flush()
    return {s.sample_id: s for s in out}, {u: st.seq for u, st in j.users.items()}


@pytest.mark.slow
@pytest.mark.usefixtures("cpu_load")
def test_sigkill_three_times_loses_nothing(broker, tmp_path):
    tag = uuid.uuid4().hex[:8]
    suffix = f".k{tag}"
    requests, events = replay(tag, SIGKILL_REPLAY_SECONDS)
    want, sequences = reference(events)
    assert set(want) == {sample_id(f"{tag}-{r.user_id}", f"{tag}-{r.request_id}") for r in requests}

    worker = WorkerProcess(broker, f"crash-{tag}", suffix, tmp_path, WORKER_ARGS).start()
    try:
        _run(broker, tag, suffix, requests, events, want, sequences, worker, tmp_path)
    finally:
        worker.kill()


def _run(broker, tag, suffix, requests, events, want, sequences, worker, tmp_path):
    wait_until(worker.stats, 90, what="worker ready")
    sent = [0]
    pub = threading.Thread(target=publish, args=(broker, events, suffix, True),
                           kwargs={"progress": sent}, daemon=True)
    pub.start()
    kills = []
    for k in range(3):
        # kill at 10 %, 30 % and 50 % of the replay, once this incarnation has really been working
        wait_until(lambda: sent[0] >= (0.1 + 0.2 * k) * len(events), 60, what=f"replay at kill {k}")
        wait_until(lambda: ((worker.stats() or {}).get("stats", {}).get("impression", 0) >= 50), 90,
                   what=f"worker incarnation {k} processing")
        kills.append((sent[0], worker.stats()["stats"]))
        children = worker.children()
        assert children, "the worker's Feast pusher process is missing"
        worker.kill()
        # a SIGKILLed worker cannot stop its child: the child notices and leaves by itself
        wait_until(lambda: not any(running(pid) for pid in children), 30, what="orphaned children gone")
        worker.start()
    assert pub.is_alive(), "the replay ended before the third kill: make it longer"
    pub.join()
    got = _check_samples(broker, suffix, want, [worker])
    print(f"\n{len(got)} samples, {len(set(s.sample_id for s in got))} distinct; kills at {kills}")
    _check_feast(tmp_path, got, sequences)


@pytest.mark.slow
@pytest.mark.usefixtures("cpu_load")
def test_scale_out_and_in_during_replay_loses_nothing(broker, tmp_path):
    """A second worker joins the group mid-replay (its partitions' states move to it through the
    changelog) and is SIGKILLed later (they move back). Every rebalance happens while the first
    worker is busy with a backlog: a state write racing the table recovery would lose events."""
    tag = uuid.uuid4().hex[:8]
    suffix = f".r{tag}"
    requests, events = replay(tag)
    want, sequences = reference(events)
    app_id = f"rebalance-{tag}"
    first = WorkerProcess(broker, app_id, suffix, tmp_path, WORKER_ARGS, worker_id="a").start()
    second = WorkerProcess(broker, app_id, suffix, tmp_path, WORKER_ARGS, worker_id="b")
    try:
        wait_until(first.stats, 90, what="first worker ready")
        sent = [0]
        pub = threading.Thread(target=publish, args=(broker, events, suffix, True),
                               kwargs={"progress": sent}, daemon=True)
        pub.start()
        wait_until(lambda: sent[0] >= 0.15 * len(events), 60, what="replay at 15 %")
        second.start()
        wait_until(lambda: ((second.stats() or {}).get("stats", {}).get("impression", 0) >= 50), 90,
                   what="second worker processing its partitions")
        second.kill()
        assert pub.is_alive(), "the replay ended before the scale-in: make it longer"
        pub.join()
        got = _check_samples(broker, suffix, want, [first])
        _check_feast(tmp_path, got, sequences)
    finally:
        first.kill()
        second.kill()


def _check_samples(broker, suffix, want, workers) -> list:
    """Every wanted sample arrives, nothing else does, and copies are the same request again."""
    reader = TopicReader(broker, config.TOPIC_SAMPLES + suffix)
    try:
        try:
            recs = reader.until(lambda rs: {Sample.from_json(r.value).sample_id for r in rs} >= set(want),
                                150, "every sample after the restarts")
        except TimeoutError:
            seen = {Sample.from_json(r.value).sample_id for r in reader.records}
            missing = [want[i] for i in set(want) - seen]
            raise AssertionError(f"{len(missing)} samples missing, e.g. {missing[:3]}; "
                                 f"worker stats {[w.stats() for w in workers]}; their users' dead "
                                 f"letters {_dead_letters(broker, suffix, {m.user_id for m in missing})}"
                                 ) from None
        # anything else still on its way would show up now
        t_end = time.monotonic() + 2.0
        while time.monotonic() < t_end:
            reader.poll()
        recs = reader.records
    finally:
        reader.close()
        alive = [w.alive() for w in workers]
        logs = [w.log() for w in workers]
        for w in workers:
            w.stop()
    assert all(alive), "\n".join(log[-3000:] for log in logs)

    got = [Sample.from_json(r.value) for r in recs]
    copies = defaultdict(list)
    for s in got:
        copies[s.sample_id].append(s)
    assert set(copies) == set(want)  # nothing lost, nothing invented
    for sid, ss in copies.items():  # a duplicate is the same request again, same id
        shape = {(s.user_id, s.request_id, s.ts, tuple((a.position, a.ad_id, a.bid) for a in s.ads),
                  tuple(s.history["event_times"])) for s in ss}
        assert len(shape) == 1, sid
        ref = want[sid]
        for copy in ss:
            assert (copy.user_id, copy.request_id, copy.ts) == (ref.user_id, ref.request_id, ref.ts)
            assert copy.history == ref.history, sid
            assert [(a.click, a.conversion, a.value) for a in copy.ads] == \
                [(a.click, a.conversion, a.value) for a in ref.ads], sid
    return got


def _dead_letters(broker, suffix, users) -> list:
    """(headers, value) of the dead letters of ``users`` (diagnostics for a failed run)."""
    reader = TopicReader(broker, config.TOPIC_DLQ + suffix)
    try:
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            reader.poll()
        return [(dict((k, v.decode()) for k, v in r.headers), r.value.decode("utf-8", "replace"))
                for r in reader.records if r.key and r.key.decode("utf-8", "replace") in users]
    finally:
        reader.close()


def _check_feast(tmp_path, got, sequences) -> None:
    """Feast ends with every sampled user's last N tokens."""
    from features.store import FeatureStoreClient, open_store

    client = FeatureStoreClient(open_store(home=tmp_path))
    users = sorted({s.user_id for s in got})
    want_seq = {u: sequences[u].last(config.DEFAULT_HISTORY_LEN).to_dict() for u in users}
    wait_until(lambda: {u: s.to_dict() for u, s in client.get_user_sequences(users).items()} == want_seq,
               30, what="feast sequences")
