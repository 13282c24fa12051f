"""Histories and the offline harness's examples (batches are made in trainer/batching.py).

* Ids: ``IdMap`` (trainer/vocab.py); 0 = padding, 1 = unknown/OOV.
* Histories come from ``features.tokens.TokenSequence`` (the streaming worker's builder):
  a request's history is ``seq.as_of(request.ts).last(max_len)`` — never anything after the request.
* Padding is on the LEFT: the newest token always sits at index L of the ``[user; items]`` layout,
  so inference reads one fixed position and ONNX sees no data-dependent indexing.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from features.tokens import Action, TokenSequence
from trainer.vocab import OOV, PAD, IdMap  # noqa: F401 - IdMap, PAD and OOV are part of this module's API

DEVICE_INDEX = {"ios": 1, "android": 2, "web": 3}  # 0 = unknown
# Value of a shown ad after the fact: the click's bid (what the platform earns) plus a share of the
# advertiser's conversion value. Used for value-weighted ranking losses and metrics.
CONV_VALUE_SHARE = 0.05


def history_arrays(seq: TokenSequence, items: IdMap, max_len: int):
    """A TokenSequence → (item idx, actions, event times) lists of its last ``max_len`` tokens."""
    s = seq.last(max_len)
    return items.lookup(s.item_ids), list(s.actions), list(s.event_times)


def pad_histories(histories: Sequence[tuple[Sequence[int], Sequence[int], Sequence[float]]], max_len: int,
                  ref_times: Sequence[float] | None = None, time_unit_s: float = 1.0):
    """Left-pad histories to numpy [B, max_len] (items, actions int64; times float32). Times become
    seconds relative to ``ref_times`` (default: each row's newest token), small enough for float32;
    ``time_unit_s``: the input's time unit per second (1000 for the samples' milliseconds)."""
    B = len(histories)
    items = np.zeros((B, max_len), np.int64)
    actions = np.zeros((B, max_len), np.int64)
    times = np.zeros((B, max_len), np.float32)
    for b, (it, ac, tm) in enumerate(histories):
        it, ac, tm = it[-max_len:], ac[-max_len:], tm[-max_len:]
        n = len(it)
        if n:
            items[b, max_len - n:] = it
            actions[b, max_len - n:] = ac
            ref = ref_times[b] if ref_times is not None else tm[-1]
            rel = np.asarray(tm, np.float64) - ref
            times[b, max_len - n:] = rel / time_unit_s if time_unit_s != 1.0 else rel
    return items, actions, times


def collate_histories(histories: Sequence[tuple[list[int], list[int], list[int]]], max_len: int,
                      ref_times: Sequence[float] | None = None, time_unit_s: float = 1.0):
    """``pad_histories`` as torch tensors (the serving encoder's and the next-item protocol's)."""
    return tuple(torch.from_numpy(a) for a in pad_histories(histories, max_len, ref_times, time_unit_s))


def last_position(items: torch.Tensor) -> torch.Tensor:
    """Query position of a left-padded batch [B, L] → [B, 1]: L if there is any history else 0 (user)."""
    L = items.shape[1]
    return torch.where(items[:, -1:] > 0, torch.full_like(items[:, -1:], L), torch.zeros_like(items[:, -1:]))


# ------------------------------------------------------------------------------------------
# Offline examples from the ad layer's requests (used by evaluate; the online trainer builds the
# same Query objects from samples: trainer.batching.sample_query).


@dataclass
class Query:
    """One request seen from its user's sequence: ``n_hist`` tokens precede it."""

    n_hist: int
    device: int
    cand: list[int]
    click: list[float]
    conv: list[float]
    value: list[float]
    targets: list[list[int]]  # per funnel stage (impression, click, conversion): future targets
    conv_values: list[float]  # values of the conversion-stage targets
    ts: float = 0.0
    bid: list[float] = field(default_factory=list)  # per candidate where known (the online samples)


@dataclass
class UserStream:
    user: int
    items: list[int]
    actions: list[int]
    times: list[int]
    queries: list[Query] = field(default_factory=list)
    _first: dict[int, int] | None = field(default=None, repr=False)

    def first_index(self, item: int) -> int:
        """Index of the item's first token in the stream (len(items) if it never occurs): a query
        with ``n_hist`` tokens before it has seen the item iff first_index(item) < n_hist."""
        if self._first is None:
            self._first = {}
            for i, it in enumerate(self.items):
                self._first.setdefault(it, i)
        return self._first.get(item, len(self.items))


@dataclass
class Chunk:
    """A training window: tokens [start, end) of a user's stream and the queries answered in it."""

    stream: UserStream
    start: int
    end: int
    queries: list[Query]


HISTORY_ACTIONS = (Action.CLICK, Action.CONVERSION)


def request_tokens(req, actions=HISTORY_ACTIONS):
    """(ad_id, action, int ts) tokens a request contributes to its user's sequence."""
    out = []
    if Action.IMPRESSION in actions:
        out += [(a, Action.IMPRESSION, int(req.ts)) for a in req.ads]
    if Action.CLICK in actions:
        out += [(a, Action.CLICK, int(np.ceil(t))) for a, t in req.clicks]
    if Action.CONVERSION in actions:
        out += [(a, Action.CONVERSION, int(np.ceil(t))) for a, t, _ in req.conversions]
    return out


def build_streams(requests, catalog, items: IdMap, users: IdMap, n_targets: int = 2,
                  actions=HISTORY_ACTIONS, holdout_last: bool = True, seed: int = 0):
    """Split by time with each user's last request held out.

    Returns (train streams, held-out list of (user idx, TokenSequence history, Query, seen item
    set)). Training streams hold only the training requests' tokens, built with TokenSequence.
    """
    rng = np.random.default_rng(seed)
    bid = dict(zip(catalog.ad_id, catalog.bid))
    by_user: dict[str, list] = {}
    for r in sorted(requests, key=lambda r: (r.ts, r.request_id)):
        by_user.setdefault(r.user_id, []).append(r)
    for a in catalog.ad_id:
        items.get_or_add(str(a))
    streams, held = [], []
    for uid, reqs in by_user.items():
        u = users.get_or_add(uid)
        train = reqs[:-1] if holdout_last and len(reqs) > 1 else reqs
        seq = TokenSequence(max_len=10**9)
        for r in train:
            for a, act, t in request_tokens(r, actions):
                seq.append(a, act, t)
        st = UserStream(u, items.lookup(seq.item_ids), list(seq.actions), list(seq.event_times))

        def query(j, rs):
            r = rs[j]
            clicked = {a for a, _ in r.clicks}
            conv = {a: v for a, _, v in r.conversions}
            cand = items.lookup(r.ads)
            click = [float(a in clicked) for a in r.ads]
            cv = [float(a in conv) for a in r.ads]
            value = [bid.get(a, 0.0) * c + CONV_VALUE_SHARE * conv.get(a, 0.0) for a, c in zip(r.ads, click)]
            fut_click, fut_conv, fut_val = [], [], []
            for r2 in rs[j:]:
                fut_click += [items.get(a) for a, _ in r2.clicks]
                for a, _, v in r2.conversions:
                    fut_conv.append(items.get(a))
                    fut_val.append(v)
                if len(fut_click) >= n_targets and len(fut_conv) >= n_targets:
                    break
            imp = list(rng.choice(cand, size=min(n_targets, len(cand)), replace=False)) if cand else []
            tg = [[int(x) for x in imp], fut_click[:n_targets], fut_conv[:n_targets]]
            tg = [t + [0] * (n_targets - len(t)) for t in tg]
            vals = fut_val[:n_targets] + [0.0] * (n_targets - len(fut_val[:n_targets]))
            return Query(0, DEVICE_INDEX.get(r.device, 0), cand, click, cv, value, tg, vals, r.ts)

        for j, r in enumerate(train):
            q = query(j, train)
            # Same as len(seq.as_of(r.ts)): tokens strictly before the request.
            q.n_hist = bisect.bisect_left(st.times, r.ts)
            st.queries.append(q)
        streams.append(st)
        if holdout_last and len(reqs) > 1:
            last = reqs[-1]
            q = query(len(reqs) - 1, reqs)
            hist = seq.as_of(last.ts)
            q.n_hist = len(hist)
            seen = set(items.lookup(hist.item_ids))
            held.append((u, hist, q, seen))
    return streams, held


def chunk_streams(streams: list[UserStream], max_len: int, stride: int | None = None) -> list[Chunk]:
    """Windows of ≤ max_len tokens ending every ``stride`` tokens (default max_len // 2); each query
    goes to exactly one window, which holds at least max_len - stride of its history."""
    stride = stride or max(1, max_len // 2)
    out = []
    for st in streams:
        n = len(st.items)
        ends = sorted(set(range(n, 0, -stride))) or [0]
        groups: dict[int, list[Query]] = {}
        for q in st.queries:
            groups.setdefault(min(bisect.bisect_left(ends, q.n_hist), len(ends) - 1), []).append(q)
        for k, qs in sorted(groups.items()):
            out.append(Chunk(st, max(0, ends[k] - max_len), ends[k], qs))
    return out
