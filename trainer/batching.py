"""The one way a training or evaluation batch is made, for the offline harness (trainer/evaluate.py)
and the online trainer (trainer/learner.py) alike.

Both describe a batch as ``Row`` objects — one user's token window (left-padded, newest token at
index L of the ``[user; items]`` layout) and the queries answered in it, each a ``Query`` at the
number of window tokens it may see — and ``assemble`` turns rows into tensors:

* offline (``collate_chunks``): a chunk of a user's stream and the requests answered in it, with
  generation targets from the user's future clicks/conversions (trainer.data.build_streams);
  ``collate_heldout``: one query per held-out request at the newest position;
* online (``collate_samples``): samples → rows (``plan_rows``: the samples of one user whose
  histories are prefixes of a newer sample's history share that sample's row), queries from the
  samples (``sample_query``: exposed ads as candidates with click/conversion/value labels,
  generation targets from the request's own clicks/conversions — the streaming analogue of
  build_streams' future targets). Ids are admitted into the learner's ``Vocab`` here.

Histories are padded by ``trainer.data.pad_histories``, the function the exporter's and the
serving replicas' request encoder (exporter/runtime.py) uses too.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import numpy as np
import torch

from streaming.samples import Sample
from trainer.data import CONV_VALUE_SHARE, DEVICE_INDEX, Chunk, IdMap, Query, history_arrays, pad_histories
from trainer.model.config import OneRankerConfig

MS_PER_S = 1000.0  # samples carry event times in milliseconds; the model reads seconds


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def to_device(batch: dict, dev: torch.device) -> dict:
    nb = dev.type == "cuda"
    return {k: v.to(dev, non_blocking=nb) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------
# Rows → tensors


class Slot(NamedTuple):
    """A query in a row: it sees the newest ``m`` tokens of the row's window that precede it
    (0: only the user token)."""

    m: int
    query: Query
    cand_seen: Sequence[bool]  # per candidate: in the user's whole history before the request
    index: int = -1  # the query's index in the caller's input (the samples' order), -1: none


@dataclass
class Row:
    """A sequence row: the user, the token window (item idx, actions, event times; its newest
    ``max_len`` tokens are used) and the queries answered in it."""

    user: int
    history: tuple[Sequence[int], Sequence[int], Sequence[float]]
    slots: list[Slot] = field(default_factory=list)


def assemble(rows: Sequence[Row], max_len: int, time_unit_s: float = 1.0) -> dict[str, torch.Tensor]:
    """Rows → the batch: ``user`` [B], left-padded ``items``/``actions``/``times`` [B, L], queries
    [B, P] at positions ``pos`` with ``pos_valid``, ``device``, candidates ``cand`` [B, P, C] with
    ``click``/``conv``/``value`` labels, ``bid`` and ``cand_seen``, generation ``targets``
    [B, P, 3, T] with ``target_values`` [B, P, T], and ``order`` [B, P] (each query's input index,
    -1 = padding). Numpy first, then one ``torch.from_numpy`` per field."""
    items, actions, times = pad_histories([r.history for r in rows], max_len, time_unit_s=time_unit_s)
    B, P = len(rows), max(len(r.slots) for r in rows)
    C = max(1, max(len(s.query.cand) for r in rows for s in r.slots))
    T = len(rows[0].slots[0].query.conv_values)
    user = np.fromiter((r.user for r in rows), np.int64, B)
    pos = np.zeros((B, P), np.int64)
    pvalid = np.zeros((B, P), bool)
    order = np.full((B, P), -1, np.int64)
    device = np.zeros((B, P), np.int64)
    cand = np.zeros((B, P, C), np.int64)
    lab = np.zeros((3, B, P, C), np.float32)
    tgt = np.zeros((B, P, 3, T), np.int64)
    tval = np.zeros((B, P, T), np.float32)
    bid = np.zeros((B, P, C), np.float32)
    cseen = np.zeros((B, P, C), bool)
    for b, r in enumerate(rows):
        n = min(len(r.history[0]), max_len)
        for p, (m, q, seen, index) in enumerate(r.slots):
            k = len(q.cand)
            pos[b, p] = max_len - n + m if m > 0 else 0
            pvalid[b, p] = True
            order[b, p] = index
            device[b, p] = q.device
            cand[b, p, :k] = q.cand
            cseen[b, p, :k] = seen
            lab[0, b, p, :k] = q.click
            lab[1, b, p, :k] = q.conv
            lab[2, b, p, :k] = q.value
            bid[b, p, :len(q.bid)] = q.bid
            tgt[b, p] = q.targets
            tval[b, p] = q.conv_values
    t = torch.from_numpy
    return {"user": t(user), "items": t(items), "actions": t(actions), "times": t(times), "pos": t(pos),
            "pos_valid": t(pvalid), "device": t(device), "cand": t(cand),
            "click": t(lab[0]), "conv": t(lab[1]), "value": t(lab[2]), "targets": t(tgt),
            "target_values": t(tval), "bid": t(bid), "order": t(order), "cand_seen": t(cseen)}


# ------------------------------------------------------------------------------------------
# Offline: chunks of the ad layer's request streams


def collate_chunks(chunks: Sequence[Chunk], max_len: int, n_positions: int = 0,
                   rng: np.random.Generator | None = None) -> dict[str, torch.Tensor]:
    """Training batch. Queries per chunk: all of them, or a random ``n_positions`` subset.
    ``cand_seen`` [B,P,C]: the candidate is anywhere in the user's history before the request
    (the whole stream, not only the chunk's window), as the held-out batches compute it."""
    rows, index = [], 0
    for c in chunks:
        s, qs = c.stream, c.queries
        if n_positions and len(qs) > n_positions:
            rng = rng or np.random.default_rng()
            qs = [qs[i] for i in sorted(rng.choice(len(qs), n_positions, replace=False))]
        row = Row(s.user, (s.items[c.start:c.end], s.actions[c.start:c.end], s.times[c.start:c.end]))
        for q in qs:  # m: tokens of this chunk before the request
            row.slots.append(Slot(q.n_hist - c.start, q, [s.first_index(i) < q.n_hist for i in q.cand], index))
            index += 1
        rows.append(row)
    return assemble(rows, max_len)


HELDOUT_DROP = ("pos_valid", "targets", "target_values", "bid", "order")


def collate_heldout(held, items: IdMap, max_len: int, num_items: int) -> dict[str, torch.Tensor]:
    """Held-out requests → one query each at the newest position (``pos`` [B, 1]), plus the exposed
    candidates ``cand`` [B, 1, C] with labels [B, C], the clicked ``target``, the seen-item mask
    ``seen`` [B, num_items] (True = already seen: the whole history, not only its last max_len
    tokens) and the candidates' share of it, ``cand_seen`` [B, 1, C]."""
    rows = []
    for u, h, q, s in held:
        hist = history_arrays(h, items, max_len)
        rows.append(Row(u, hist, [Slot(len(hist[0]), q, [i in s for i in q.cand])]))
    out = {k: v for k, v in assemble(rows, max_len).items() if k not in HELDOUT_DROP}
    for k in ("click", "conv", "value"):
        out[k] = out[k][:, 0]
    seen = torch.zeros(len(held), num_items, dtype=torch.bool)
    for b, (_, _, _, s) in enumerate(held):
        seen[b, list(s)] = True
    seen[:, :2] = True
    out["target"] = torch.tensor([q.targets[1][0] for _, _, q, _ in held])
    out["seen"] = seen
    return out


# ------------------------------------------------------------------------------------------
# Online: samples of the stream


def sample_labels(s: Sample) -> tuple[list[float], list[float], list[float]]:
    """click, conversion, value label per exposed ad (value as trainer.data: bid·click + share·GMV)."""
    click = [float(a.click) for a in s.ads]
    conv = [float(a.conversion) for a in s.ads]
    value = [a.bid * a.click + CONV_VALUE_SHARE * a.value for a in s.ads]
    return click, conv, value


def sample_query(s: Sample, vocab, n_targets: int, rng: np.random.Generator) -> Query:
    """A sample as a ``Query``: its exposed ads (admitted into ``vocab``) as candidates with labels
    and bids; generation targets ``n_targets`` random exposed ads (impression stage) and the
    request's own clicked and converted ads (with the conversions' values)."""
    h = s.history or {}
    cid = [vocab.item(a.ad_id) for a in s.ads]
    click, conv, value = sample_labels(s)
    imp = rng.choice(cid, size=min(n_targets, len(cid)), replace=False).tolist() if cid else []
    clicked = [c for c, k in zip(cid, click) if k > 0][:n_targets]
    conv_ads = [(c, a.value) for c, a in zip(cid, s.ads) if a.conversion][:n_targets]
    pad = lambda x, fill=0: list(x) + [fill] * (n_targets - len(x))  # noqa: E731
    return Query(len(h.get("item_ids") or []), DEVICE_INDEX.get(str((s.context or {}).get("device", "")), 0),
                 cid, click, conv, value, [pad(imp), pad(clicked), pad([c for c, _ in conv_ads])],
                 pad([v for _, v in conv_ads], 0.0), s.ts, [a.bid for a in s.ads])


def plan_rows(samples: Sequence[Sample], max_len: int, max_positions: int = 16) -> list[tuple[int, list[tuple[int, int]]]]:
    """Group a micro-batch's samples into sequence rows: the samples of one user whose histories are
    prefixes of a newer sample's history share that sample's row, each as a query at its own
    position (the model is causal, so a query at position p sees tokens ≤ p only — how
    trainer/evaluate.py supervises many requests per sequence). Step 1 then runs once per row
    instead of once per sample (ML-100k micro-batches of 64 hold ~3 users).

    A sample joins a row only if it sees at least min(its history, max_len // 2) tokens there;
    rows hold at most ``max_positions`` queries. Returns [(anchor sample index, [(sample index,
    visible token count m)])]; the anchor's own query sees its whole window."""
    by_user: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_user.setdefault(s.user_id, []).append(i)
    rows = []
    for idx in by_user.values():
        idx = sorted(idx, key=lambda i: (samples[i].ts, i))
        while idx:
            anchor = idx.pop()  # newest remaining
            h = samples[anchor].history or {}
            a_ids, a_times = h.get("item_ids") or [], h.get("event_times") or []
            n_win = min(len(a_ids), max_len)
            start = len(a_ids) - n_win
            members = [(anchor, n_win)]
            rest = []  # newest first, like the scan
            for j in range(len(idx) - 1, -1, -1):
                if len(members) == max_positions:  # the row is full: the older ones wait
                    rest.extend(idx[j::-1])
                    break
                i = idx[j]
                o = samples[i].history or {}
                o_ids, o_times = o.get("item_ids") or [], o.get("event_times") or []
                k = bisect.bisect_left(a_times, samples[i].ts)  # anchor tokens before this request
                m = k - start
                need = min(len(o_ids), max_len // 2)
                # it sees m of its own tokens, no token it did not have, and at least `need`
                ok = (need <= m <= len(o_ids)
                      and (m == 0 or (o_ids[-m:] == a_ids[k - m:k] and o_times[-m:] == a_times[k - m:k])))
                if ok:
                    members.append((i, m))
                else:
                    rest.append(i)
            idx = rest[::-1]  # oldest first again
            rows.append((anchor, members))
    return rows


def one_row_per_sample(samples: Sequence[Sample], max_len: int) -> list[tuple[int, list[tuple[int, int]]]]:
    return [(i, [(i, min(max_len, len((s.history or {}).get("item_ids") or [])))]) for i, s in enumerate(samples)]


def step1_cost_in_slots(cfg: OneRankerConfig, n_cand: int) -> float:
    """Step 1's work per sequence row relative to Steps 2–3's work per query slot, in token·layer
    units: a row runs ``n_layers`` HSTU blocks over 1 + max_len tokens; a slot of the [B, P] query
    grid (used or padding, the model computes both) runs ``n_step2_layers`` decoder layers over the
    task + fake tokens and ``n_step3_layers`` over T_r + the candidates. Small preset: ≈ 2."""
    slot = (cfg.n_tasks + cfg.n_fake) * cfg.n_step2_layers + (1 + n_cand) * cfg.n_step3_layers * cfg.use_step3
    return (cfg.max_len + 1) * cfg.n_layers / max(slot, 1)


def plan_rows_cheapest(samples: Sequence[Sample], max_len: int, row_cost: float,
                       max_positions: int = 16) -> list[tuple[int, list[tuple[int, int]]]]:
    """``plan_rows`` at the row size (1, 2, 4, … up to ``max_positions`` queries) whose padded
    [B, P] layout costs least: each row costs ``row_cost`` (``step1_cost_in_slots``) plus one unit
    per slot of the grid, used or not. Why: P is the longest row's length, so one heavy user makes
    every other row pay for P slots — on ML-100k micro-batches a fixed P = 16 left ~80% of the slots
    empty and ran slower than one row per sample. Smaller rows also let their members see more of
    their own history (each row re-anchors at its newest sample)."""
    sizes = sorted({1 << i for i in range(max_positions.bit_length()) if 1 << i <= max_positions} | {max_positions})
    best_cost, best = math.inf, []
    for size in sizes:
        rows = plan_rows(samples, max_len, size) if size > 1 else one_row_per_sample(samples, max_len)
        cost = len(rows) * (row_cost + max(len(m) for _, m in rows))
        if cost < best_cost:
            best_cost, best = cost, rows
    return best


def collate_samples(samples: Sequence[Sample], vocab, max_len: int, n_targets: int,
                    rng: np.random.Generator, pin: bool = False, group: bool = True,
                    max_positions: int = 16, row_cost: float | None = None) -> dict[str, torch.Tensor]:
    """Samples → the ``assemble`` batch: rows per ``plan_rows`` (with ``row_cost``,
    ``plan_rows_cheapest``; ``group=False``: one row per sample), each sample a query
    (``sample_query``) whose ``cand_seen`` is from the sample's whole history (which can be longer
    than max_len); ``order`` [B, P] = the sample index of each query. Ids are admitted into
    ``vocab`` (a trainer.vocab.Vocab) here: per row the user, the window, then the queries' ads."""
    if not group:
        plan = one_row_per_sample(samples, max_len)
    elif row_cost is not None:
        plan = plan_rows_cheapest(samples, max_len, row_cost, max_positions)
    else:
        plan = plan_rows(samples, max_len, max_positions)
    rows = []
    for anchor, members in plan:
        s0 = samples[anchor]
        user = vocab.user(s0.user_id)
        h = s0.history or {}
        ids = (h.get("item_ids") or [])[-max_len:]
        n = len(ids)
        hist = ([vocab.item(x) for x in ids], (h.get("actions") or [])[-n:] if n else [],
                (h.get("event_times") or [])[-n:] if n else [])
        row = Row(user, hist)
        for i, m in members:
            s = samples[i]
            seen = set((s.history or {}).get("item_ids") or [])  # the sample's whole feature-store history
            row.slots.append(Slot(m, sample_query(s, vocab, n_targets, rng), [a.ad_id in seen for a in s.ads], i))
        rows.append(row)
    out = assemble(rows, max_len, time_unit_s=MS_PER_S)
    if pin:
        out = {k: v.pin_memory() for k, v in out.items()}
    return out
