"""Attribution join, pure (no I/O): impressions + clicks + conversions → request-level samples.

* ``UserState`` — one user's join state: pending requests (each with the user's history snapshot
  taken AS OF the request), labels that arrived before their impressions ("orphans"), event ids seen
  recently (dedupe), recently closed requests, the token sequence and profile counters. It round-trips
  through plain JSON (``to_dict``/``from_dict``) so the Faust worker keeps it in a changelogged table.
* ``Joiner`` — the users of one partition (one event-time clock) plus a deadline heap, so that a
  watermark advance closes every due request, including those of users who went quiet.
* ``PartitionClock`` — the watermark of one partition across the three event topics: the minimum of
  the per-topic maximum event times (topics the broker shows silent for ``idle_s`` wall seconds stop
  holding it back), minus the allowed lateness; when every topic is idle it advances with the wall
  clock, so the last windows of a replay close.

Semantics (DESIGN §3): event time only; a request closes when the watermark passes
``ts + max(click window, conversion window)`` and its sample is then emitted exactly once per state
(re-delivery after a crash repeats it with the same ``sample_id``). Labels after their window, or for a
closed request, are counted as late, never silently dropped. Events older than ``watermark -
retention`` (or than the horizon below which their user's state pruned its event ids) are counted
as expired (too old to be deduplicated), or as late when their request is closed already (its
sample is out; not applied again). Duplicate event ids are ignored.
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping

from features.tokens import ACTION_OF_EVENT, Action, TokenSequence
from oneranker import config
from streaming.samples import Sample, SampleAd, sample_id

MIN_TS = -(2**62)
DEFAULT_ALLOWED_LATENESS_MS = 2000
DEFAULT_HISTORY_ACTIONS = (int(Action.CLICK), int(Action.CONVERSION))  # as trainer/data.py

# Outcomes of ``UserState.apply`` (also the names of the joiner's counters).
APPLIED = "applied"
DUPLICATE = "duplicate"
EXPIRED = "expired"
LATE_IMPRESSION = "late_impression"
LATE_CLICK = "late_click"
LATE_CONVERSION = "late_conversion"
ORPHAN = "orphan"  # label before its request's impressions: held until they come
ORPHAN_DROPPED = "orphan_dropped"  # … and they never came within the retention
UNMATCHED = "unmatched"  # label for an ad the request did not show
LATE_OF = {"impression": LATE_IMPRESSION, "click": LATE_CLICK, "conversion": LATE_CONVERSION}


# The state keeps this many times history_len tokens, so that the history of a request still open
# survives up to history_len newer tokens arriving inside its window (a sample's history is cut
# from the sequence when the request closes).
STATE_HISTORY_FACTOR = 2


@dataclass(frozen=True)
class JoinConfig:
    click_window_ms: int = config.CLICK_WINDOW_MS
    conversion_window_ms: int = config.CONVERSION_WINDOW_MS
    allowed_lateness_ms: int = DEFAULT_ALLOWED_LATENESS_MS
    history_len: int = config.DEFAULT_HISTORY_LEN
    history_actions: tuple[int, ...] = DEFAULT_HISTORY_ACTIONS

    def scaled(self, scale: float) -> "JoinConfig":
        """Windows multiplied by ``scale`` (a replay at speed S uses scale 1/S)."""
        return replace(self, click_window_ms=max(1, int(round(self.click_window_ms * scale))),
                       conversion_window_ms=max(1, int(round(self.conversion_window_ms * scale))))

    @property
    def close_after_ms(self) -> int:
        return max(self.click_window_ms, self.conversion_window_ms)

    @property
    def retention_ms(self) -> int:
        """How long (event time, behind the watermark) ids are remembered for dedupe."""
        return self.close_after_ms + self.allowed_lateness_ms


@dataclass
class UserState:
    user_id: str
    seq: TokenSequence
    pending: dict[str, dict] = field(default_factory=dict)
    orphans: dict[str, list] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)
    closed: dict[str, int] = field(default_factory=dict)
    profile: dict[str, Any] = field(default_factory=lambda: {
        "request_count": 0, "click_count": 0, "conversion_count": 0, "total_value": 0.0,
        "last_event_ts": 0})
    partition: int | None = None
    # Event time below which this state no longer remembers event ids (it pruned ``seen`` there).
    # Dedupe must not depend on the partition watermark alone: a state is written to the changelog
    # before the watermark that pruned it, so after a crash the restored watermark can be older than
    # the prune, and an event whose id was pruned but whose token is in ``seq`` would be applied
    # again (seen as a duplicated token in a sample's history after SIGKILLs). With the horizon in
    # the state itself, every stored state answers "applied already?" on its own: an event is in
    # ``seen`` or older than ``horizon``, whatever order the changelog, offsets and re-delivery take.
    horizon: int = MIN_TS

    @classmethod
    def new(cls, user_id: str, history_len: int = config.DEFAULT_HISTORY_LEN) -> "UserState":
        return cls(user_id, TokenSequence(max_len=STATE_HISTORY_FACTOR * history_len))

    # -- persistence -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"u": self.user_id, "seq": self.seq.to_dict(), "pending": self.pending,
                "orphans": self.orphans, "seen": self.seen, "closed": self.closed,
                "profile": self.profile, "p": self.partition, "h": self.horizon}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], history_len: int = config.DEFAULT_HISTORY_LEN) -> "UserState":
        return cls(d["u"], TokenSequence.from_dict(d.get("seq"), max_len=STATE_HISTORY_FACTOR * history_len),
                   dict(d.get("pending") or {}), dict(d.get("orphans") or {}),
                   dict(d.get("seen") or {}), dict(d.get("closed") or {}),
                   dict(d.get("profile") or cls.new("").profile), d.get("p"), int(d.get("h", MIN_TS)))

    # -- the join ----------------------------------------------------------------------------
    def deadlines(self, cfg: JoinConfig) -> list[int]:
        return [r["ts"] + cfg.close_after_ms for r in self.pending.values()]

    def apply(self, event_type: str, data: Mapping[str, Any], watermark: int, cfg: JoinConfig) -> str:
        """Apply one validated event given the current watermark; return its outcome."""
        eid, ts = data["event_id"], int(data["ts"])
        if eid in self.seen:
            return DUPLICATE
        if ts + cfg.retention_ms < watermark or ts < self.horizon:
            # Too old to dedupe. Its request, if closed, already has its sample: late (most often a
            # re-delivery after a crash or a rebalance, so nothing is applied twice). Otherwise it
            # cannot be joined: expired (the worker dead-letters it).
            if data["request_id"] in self.closed:
                return LATE_OF.get(event_type, LATE_CLICK)
            return EXPIRED
        self.seen[eid] = ts
        action = int(ACTION_OF_EVENT[event_type])
        ad = data["ad_id"]
        if action in cfg.history_actions:
            # A token that arrives after a later request was opened (topics are consumed
            # independently) still belongs to that request's history: event time decides, and
            # a request's history is cut from the sequence when it closes (see ``close``).
            self.seq.append(ad, action, ts)
        prof = self.profile
        prof["last_event_ts"] = max(int(prof.get("last_event_ts") or 0), ts)
        if event_type == "click":
            prof["click_count"] += 1
        elif event_type == "conversion":
            prof["conversion_count"] += 1
            prof["total_value"] = round(float(prof["total_value"]) + float(data["value"]), 6)
        rid = data["request_id"]
        if event_type == "impression":
            return self._impression(rid, data, ts)
        if rid in self.closed:
            return LATE_CLICK if event_type == "click" else LATE_CONVERSION
        req = self.pending.get(rid)
        if req is None or ad not in {a for a, _ in req["ads"].values()}:
            # the request, or this ad's impression, has not arrived yet: hold the label
            self.orphans.setdefault(rid, []).append(
                [event_type, ad, ts, float(data.get("value", 0.0))])
            return ORPHAN
        return self._label(req, event_type, ad, ts, float(data.get("value", 0.0)), cfg)

    def _impression(self, rid: str, data: Mapping[str, Any], ts: int) -> str:
        if rid in self.closed:
            return LATE_IMPRESSION
        req = self.pending.get(rid)
        if req is None:
            req = self.pending[rid] = {
                "ts": ts, "ads": {}, "clicks": {}, "convs": {}, "late": 0,
                "context": dict(data.get("context") or {}),
            }
            self.profile["request_count"] += 1
        req["ads"].setdefault(str(int(data["position"])), [data["ad_id"], float(data["bid"])])
        return APPLIED

    def attach_orphans(self, rid: str, cfg: JoinConfig, ad: str | None = None) -> list[str]:
        """Labels that came before their ad's impression, now that the impression is here (labels
        for ads not shown (yet) wait; at close they count as unmatched). ``ad``: the ad whose
        impression just arrived, the only one that can make a waiting label ready."""
        req = self.pending.get(rid)
        labels = self.orphans.get(rid)
        if req is None or not labels:
            return []
        if ad is not None and not any(l[1] == ad for l in labels):
            return []
        shown = {a for a, _ in req["ads"].values()}
        ready = [l for l in labels if l[1] in shown]
        if not ready:
            return []
        rest = [l for l in labels if l[1] not in shown]
        if rest:
            self.orphans[rid] = rest
        else:
            del self.orphans[rid]
        return [self._label(req, et, ad, ts, val, cfg) for et, ad, ts, val in ready]

    def _label(self, req: dict, event_type: str, ad: str, ts: int, value: float, cfg: JoinConfig) -> str:
        if ad not in {a for a, _ in req["ads"].values()}:
            return UNMATCHED
        if event_type == "click":
            if ts - req["ts"] > cfg.click_window_ms:
                req["late"] += 1
                return LATE_CLICK
            prev = req["clicks"].get(ad)
            req["clicks"][ad] = ts if prev is None else min(prev, ts)
            return APPLIED
        if ts - req["ts"] > cfg.conversion_window_ms:
            req["late"] += 1
            return LATE_CONVERSION
        count, total = req["convs"].get(ad, (0, 0.0))
        req["convs"][ad] = [count + 1, round(total + value, 6)]
        return APPLIED

    def close(self, watermark: int, cfg: JoinConfig) -> tuple[list[Sample], Counter]:
        """Close every request whose window the watermark passed; prune old ids.

        Returns (samples, counts of labels given up: unmatched, orphan_dropped)."""
        samples = []
        gone: Counter[str] = Counter()
        for rid in [r for r, q in self.pending.items() if q["ts"] + cfg.close_after_ms <= watermark]:
            req = self.pending.pop(rid)
            gone[UNMATCHED] += len(self.orphans.pop(rid, ()))
            self.closed[rid] = req["ts"]
            ads = []
            for pos, (ad, bid) in sorted(req["ads"].items(), key=lambda kv: int(kv[0])):
                conv = req["convs"].get(ad)
                ads.append(SampleAd(int(pos), ad, bid, int(ad in req["clicks"]), int(conv is not None),
                                    float(conv[1]) if conv else 0.0))
            # The history as of the request: every token strictly before it, cut now rather than
            # copied when the request opened, so a heavy user's open requests do not each carry
            # a copy (that made single table records exceed the broker's message size).
            history = req.get("history") or self.seq.as_of(req["ts"]).last(cfg.history_len).to_dict()
            samples.append(Sample(sample_id(self.user_id, rid), self.user_id, rid, req["ts"],
                                  history, ads, req["context"], req["late"], watermark))
        horizon = watermark - cfg.retention_ms
        if self.seen and min(self.seen.values()) < horizon:
            self.seen = {e: t for e, t in self.seen.items() if t >= horizon}
            self.horizon = max(self.horizon, horizon)
        # Closed ids are kept one window longer than seen ids, so labels that come after the
        # window (but not absurdly late) are recognised as late rather than as orphans.
        closed_horizon = horizon - cfg.close_after_ms
        if self.closed and min(self.closed.values()) < closed_horizon:
            self.closed = {r: t for r, t in self.closed.items() if t >= closed_horizon}
        for rid in [r for r, labels in self.orphans.items() if max(l[2] for l in labels) <= horizon]:
            gone[ORPHAN_DROPPED] += len(self.orphans.pop(rid))
        return samples, gone

    def next_deadline(self, cfg: JoinConfig) -> int | None:
        ds = self.deadlines(cfg)
        if self.orphans:
            ds.append(max(max(l[2] for l in ls) for ls in self.orphans.values()) + cfg.retention_ms)
        return min(ds) if ds else None


class Joiner:
    """The users of one partition and its watermark. Pure; the Faust worker persists the states.

    ``load(user_id)`` returns a stored state dict (or None); ``take_dirty()`` hands back the states
    changed since the last call, for the caller to persist.
    """

    def __init__(self, cfg: JoinConfig | None = None, load: Callable[[str], Mapping | None] | None = None,
                 watermark: int = MIN_TS, partition: int | None = None):
        self.cfg = cfg or JoinConfig()
        self.load = load
        self.watermark = watermark
        self.partition = partition
        self.users: dict[str, UserState] = {}
        self.dirty: set[str] = set()
        self.stats: Counter[str] = Counter()
        self._heap: list[tuple[int, str]] = []
        self._scheduled: dict[str, int] = {}  # user → the earliest deadline in the heap

    def _schedule(self, user_id: str, deadline: int | None) -> None:
        if deadline is not None and deadline < self._scheduled.get(user_id, 2**63):
            self._scheduled[user_id] = deadline
            heapq.heappush(self._heap, (deadline, user_id))

    def state(self, user_id: str) -> UserState:
        st = self.users.get(user_id)
        if st is None:
            stored = self.load(user_id) if self.load else None
            st = (UserState.from_dict(stored, self.cfg.history_len) if stored
                  else UserState.new(user_id, self.cfg.history_len))
            st.partition = self.partition
            self.users[user_id] = st
        return st

    def index(self, states: Iterable[Mapping[str, Any]]) -> None:
        """Schedule the deadlines of stored states (after a restart or a rebalance)."""
        for d in states:
            st = UserState.from_dict(d, self.cfg.history_len)
            self._schedule(st.user_id, st.next_deadline(self.cfg))

    def process(self, event_type: str, data: Mapping[str, Any]) -> str:
        """Apply one validated event at the current watermark (which it does not move)."""
        st = self.state(data["user_id"])
        outcome = st.apply(event_type, data, self.watermark, self.cfg)
        self.stats[outcome] += 1
        if outcome in (DUPLICATE, EXPIRED):
            return outcome
        self.dirty.add(st.user_id)
        if event_type == "impression" and outcome == APPLIED:
            for o in st.attach_orphans(data["request_id"], self.cfg, data["ad_id"]):
                self.stats[o] += 1
            # only this request's deadline is new; an earlier scheduled one stays (and re-plans)
            self._schedule(st.user_id, st.pending[data["request_id"]]["ts"] + self.cfg.close_after_ms)
        elif st.user_id not in self._scheduled:
            # a label only adds a deadline; one already scheduled recomputes the rest when it fires
            self._schedule(st.user_id, st.next_deadline(self.cfg))
        return outcome

    def advance(self, watermark: int) -> list[Sample]:
        """Move the watermark forward (never back) and emit every sample that is now due."""
        if watermark > self.watermark:
            self.watermark = watermark
        out: list[Sample] = []
        heap = self._heap
        while heap and heap[0][0] <= self.watermark:
            deadline, uid = heapq.heappop(heap)
            if self._scheduled.get(uid) != deadline:
                continue  # superseded by an earlier deadline that was handled already
            del self._scheduled[uid]
            st = self.state(uid)
            samples, gone = st.close(self.watermark, self.cfg)
            if samples or gone:
                self.dirty.add(uid)
            self.stats["samples"] += len(samples)
            self.stats.update(gone)
            out += samples
            nxt = st.next_deadline(self.cfg)
            if nxt is not None and nxt > self.watermark:
                self._schedule(uid, nxt)
        return out

    def feed(self, event_type: str, data: Mapping[str, Any]) -> list[Sample]:
        """Process one event and advance the watermark to its ts minus the allowed lateness
        (the single-stream clock: handy for tests and offline use)."""
        self.process(event_type, data)
        return self.advance(int(data["ts"]) - self.cfg.allowed_lateness_ms)

    def flush(self) -> list[Sample]:
        """Close everything still pending (end of a bounded stream). Closing a user's earliest
        deadline can schedule a later one (an orphan's expiry before an open request), so advance
        until nothing is scheduled; each round moves the watermark strictly forward."""
        out: list[Sample] = []
        while self._heap:
            out += self.advance(max(d for d, _ in self._heap) + 1)
        return out

    def pending_requests(self) -> int:
        return sum(len(s.pending) for s in self.users.values())

    def take_dirty(self) -> dict[str, UserState]:
        out = {u: self.users[u] for u in self.dirty}
        self.dirty = set()
        return out


class PartitionClock:
    """Event-time watermark of one partition fed by several topics (see the module docstring).

    ``now`` is wall-clock seconds (monotonic), passed in so the logic stays testable.
    """

    def __init__(self, topics: Iterable[str], allowed_lateness_ms: int, idle_s: float, now: float,
                 watermark: int = MIN_TS):
        self.topics = tuple(topics)
        self.lateness = allowed_lateness_ms
        self.idle_s = idle_s
        self.started = now
        self.max_ts: dict[str, int] = {}
        self.last_seen: dict[str, float] = {}
        self.watermark = watermark

    def observe(self, topic: str, ts: int, now: float) -> None:
        if ts > self.max_ts.get(topic, MIN_TS):
            self.max_ts[topic] = ts
        self.last_seen[topic] = now

    def current(self, now: float, caught_up: Callable[[str], float | None] | None = None) -> int:
        """The watermark at wall time ``now``.

        ``caught_up(topic)`` is the wall time (the clock of ``now``) of the newest fetch response that
        showed this worker had processed every record of that topic-partition, or None while it is
        behind or cannot tell. A topic is idle only over a span the broker confirmed empty: from its
        last event to that fetch. Measured against ``now`` alone, a pause of the process (starved of
        CPU, a long batch, a rebalance) looked like silence, the wall-clock flush ran ahead and the
        events produced meanwhile expired when they were finally read. Without ``caught_up`` (tests,
        offline) a topic counts as caught up at ``now``."""
        holds, quiet = [], []
        for t in self.topics:
            seen_until = caught_up(t) if caught_up is not None else now
            if seen_until is None:  # behind: holds however long it has been silent (a restart)
                holds.append(self.max_ts.get(t, MIN_TS))
                continue
            seen_until = min(now, seen_until)
            quiet.append(seen_until)
            if t in self.max_ts:
                if seen_until - self.last_seen[t] < self.idle_s:
                    holds.append(self.max_ts[t])
            elif seen_until - self.started < self.idle_s:
                holds.append(MIN_TS)  # not heard from yet: it may still be catching up
        if holds:
            candidate = min(holds) - self.lateness if min(holds) > MIN_TS else MIN_TS
        elif self.max_ts:
            # Every topic is idle: event time follows the wall clock from the last event on, up to
            # the oldest confirmation that nothing new has arrived.
            idle_ms = int(round((min(quiet) - max(self.last_seen.values())) * 1000))
            candidate = max(self.max_ts.values()) + idle_ms - self.lateness
        else:
            candidate = MIN_TS
        if candidate > self.watermark:
            self.watermark = candidate
        return self.watermark
