"""Ids, offline examples and collation.

* ``IdMap``: string id → contiguous index; 0 = padding, 1 = unknown/OOV; grows with ``get_or_add``;
  saved/loaded as a plain ``{key: index}`` dict.
* Histories come from ``features.tokens.TokenSequence`` (the streaming worker's builder):
  a request's history is ``seq.as_of(request.ts).last(max_len)`` — never anything after the request.
* Padding is on the LEFT: the newest token always sits at index L of the ``[user; items]`` layout,
  so inference reads one fixed position and ONNX sees no data-dependent indexing.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch

from features.tokens import Action, TokenSequence

PAD, OOV = 0, 1
DEVICE_INDEX = {"ios": 1, "android": 2, "web": 3}  # 0 = unknown
# Value of a shown ad after the fact: the click's bid (what the platform earns) plus a share of the
# advertiser's conversion value. Used for value-weighted ranking losses and metrics.
CONV_VALUE_SHARE = 0.05


class IdMap:
    """String id ↔ contiguous index. Index 0 is padding, 1 is unknown/OOV."""

    def __init__(self, index: dict[str, int] | None = None):
        self.index: dict[str, int] = {}
        self.keys: list[str | None] = [None, None]
        for k, i in sorted((index or {}).items(), key=lambda kv: kv[1]):
            self.index[k] = i
            while len(self.keys) <= i:
                self.keys.append(None)
            self.keys[i] = k

    def __len__(self) -> int:
        return len(self.keys)

    def get_or_add(self, key: str) -> int:
        i = self.index.get(key)
        if i is None:
            i = self.index[key] = len(self.keys)
            self.keys.append(key)
        return i

    def get(self, key: str) -> int:
        return self.index.get(key, OOV)

    def lookup(self, keys: Iterable[str]) -> list[int]:
        return [self.index.get(k, OOV) for k in keys]

    def to_dict(self) -> dict[str, int]:
        return dict(self.index)

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> "IdMap":
        return cls({str(k): int(v) for k, v in d.items()})


def history_arrays(seq: TokenSequence, items: IdMap, max_len: int):
    """A TokenSequence → (item idx, actions, event times) lists of its last ``max_len`` tokens."""
    s = seq.last(max_len)
    return items.lookup(s.item_ids), list(s.actions), list(s.event_times)


def collate_histories(histories: Sequence[tuple[list[int], list[int], list[int]]], max_len: int,
                      ref_times: Sequence[float] | None = None):
    """Left-pad histories to [B, max_len]. Times become float seconds relative to ``ref_times``
    (default: each row's newest token), small enough for float32."""
    B = len(histories)
    items = np.zeros((B, max_len), np.int64)
    actions = np.zeros((B, max_len), np.int64)
    times = np.zeros((B, max_len), np.float64)
    for b, (it, ac, tm) in enumerate(histories):
        it, ac, tm = it[-max_len:], ac[-max_len:], tm[-max_len:]
        n = len(it)
        if n:
            items[b, max_len - n:] = it
            actions[b, max_len - n:] = ac
            ref = ref_times[b] if ref_times is not None else tm[-1]
            times[b, max_len - n:] = np.asarray(tm, np.float64) - ref
    return torch.from_numpy(items), torch.from_numpy(actions), torch.from_numpy(times.astype(np.float32))


def last_position(items: torch.Tensor) -> torch.Tensor:
    """Query position of a left-padded batch [B, L] → [B, 1]: L if there is any history else 0 (user)."""
    L = items.shape[1]
    return torch.where(items[:, -1:] > 0, torch.full_like(items[:, -1:], L), torch.zeros_like(items[:, -1:]))


def pad_candidates(cands: Sequence[Sequence[int]], width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad candidate lists → ids [B, C] (0 = padding) and a validity mask [B, C]."""
    width = width or max(1, max(len(c) for c in cands))
    ids = np.zeros((len(cands), width), np.int64)
    for b, c in enumerate(cands):
        ids[b, : len(c)] = c[:width]
    t = torch.from_numpy(ids)
    return t, t > 0


# ------------------------------------------------------------------------------------------
# Offline examples from the ad layer's requests (used by evaluate; the streaming trainer builds
# the same Query objects from samples).


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


def collate_chunks(chunks: Sequence[Chunk], max_len: int, n_positions: int = 0,
                   rng: np.random.Generator | None = None) -> dict[str, torch.Tensor]:
    """Training batch. Queries per chunk: all of them, or a random ``n_positions`` subset.
    ``cand_seen`` [B,P,C]: the candidate is anywhere in the user's history before the request
    (the whole stream, not only the chunk's window), as the held-out batches compute it."""
    hist = []
    for c in chunks:
        s = c.stream
        hist.append((s.items[c.start:c.end], s.actions[c.start:c.end], s.times[c.start:c.end]))
    items, actions, times = collate_histories(hist, max_len)
    qsets = []
    for c in chunks:
        qs = c.queries
        if n_positions and len(qs) > n_positions:
            rng = rng or np.random.default_rng()
            qs = [qs[i] for i in sorted(rng.choice(len(qs), n_positions, replace=False))]
        qsets.append(qs)
    B, P = len(chunks), max(len(q) for q in qsets)
    C = max(len(q.cand) for qs in qsets for q in qs)
    T = len(qsets[0][0].conv_values)
    pos = np.zeros((B, P), np.int64)
    pvalid = np.zeros((B, P), bool)
    device = np.zeros((B, P), np.int64)
    cand = np.zeros((B, P, C), np.int64)
    lab = np.zeros((3, B, P, C), np.float32)
    tgt = np.zeros((B, P, 3, T), np.int64)
    tval = np.zeros((B, P, T), np.float32)
    cseen = np.zeros((B, P, C), bool)
    for b, (c, qs) in enumerate(zip(chunks, qsets)):
        n = c.end - c.start
        for p, q in enumerate(qs):
            m = q.n_hist - c.start  # tokens of this chunk before the request
            pos[b, p] = max_len - n + m if m > 0 else 0
            pvalid[b, p] = True
            device[b, p] = q.device
            cand[b, p, : len(q.cand)] = q.cand
            cseen[b, p, : len(q.cand)] = [c.stream.first_index(i) < q.n_hist for i in q.cand]
            lab[0, b, p, : len(q.cand)] = q.click
            lab[1, b, p, : len(q.cand)] = q.conv
            lab[2, b, p, : len(q.cand)] = q.value
            tgt[b, p] = q.targets
            tval[b, p] = q.conv_values
    t = torch.from_numpy
    return {"user": torch.tensor([c.stream.user for c in chunks]), "items": items, "actions": actions,
            "times": times, "pos": t(pos), "pos_valid": t(pvalid), "device": t(device), "cand": t(cand),
            "click": t(lab[0]), "conv": t(lab[1]), "value": t(lab[2]), "targets": t(tgt),
            "target_values": t(tval), "cand_seen": t(cseen)}


def collate_heldout(held, items: IdMap, max_len: int, num_items: int) -> dict[str, torch.Tensor]:
    """Held-out requests → one query each at the newest position, plus the exposed candidates,
    the clicked target, the seen-item mask [B, num_items] (True = already seen: the whole
    history, not only its last max_len tokens) and the candidates' share of it, cand_seen [B,1,C]."""
    hist = [history_arrays(h, items, max_len) for _, h, _, _ in held]
    it, ac, tm = collate_histories(hist, max_len)
    cand, _ = pad_candidates([q.cand for _, _, q, _ in held])
    C = cand.shape[1]

    def lab(f):
        return torch.tensor([getattr(q, f) + [0.0] * (C - len(q.cand)) for _, _, q, _ in held])

    cand_seen = torch.tensor([[i in s for i in q.cand] + [False] * (C - len(q.cand)) for _, _, q, s in held])
    seen = torch.zeros(len(held), num_items, dtype=torch.bool)
    for b, (_, _, _, s) in enumerate(held):
        seen[b, list(s)] = True
    seen[:, :2] = True
    target = torch.tensor([q.targets[1][0] for _, _, q, _ in held])
    return {"user": torch.tensor([u for u, _, _, _ in held]), "items": it, "actions": ac, "times": tm,
            "pos": last_position(it), "device": torch.tensor([[q.device] for _, _, q, _ in held]),
            "cand": cand.unsqueeze(1), "click": lab("click"), "conv": lab("conv"), "value": lab("value"),
            "target": target, "seen": seen, "cand_seen": cand_seen.unsqueeze(1)}
