"""Incremental (online) trainer: ``oneranker.samples`` → a continuously updated OneRanker.

Pieces (each usable without Kafka, so the offline online-vs-frozen comparison and the unit tests use
exactly the code the streaming trainer runs):

* ``Vocab``: growing id maps with preallocated capacity. New ads/users get the next row of a
  preallocated embedding table; when a table is full it grows ×2 by copying (the new rows get the
  model's init), and the optimizer state (AdamW exp_avg / exp_avg_sq) is padded with zeros and
  re-keyed to the new Parameter, so training continues exactly as if the table had always been big.
  Why not hashing: hashed rows collide, and a collision makes two ads indistinguishable in
  corpus retrieval and in the exporter's id map; a dense map stays exact, growth is rare (log2 of the
  corpus size times) and costs one copy. Checkpoints hold the tables TRIMMED to the used rows (so
  ``trainer.checkpoint.build_model`` gives the exporter a model without untrained rows); on resume
  the same grow path pads them back to capacity. ``max_users`` is the admission limit for users
  (beyond it new users share the OOV row); every ad is admitted (it must be rankable).
* ``collate_samples``: samples → one query per sample at the newest history position (the layout of
  trainer/data.py: left-padded history, P = 1), exposed ads as candidates, labels, and generation
  targets from the request's own clicks/conversions (the streaming analogue of build_streams' future
  targets); numpy, then one ``torch.from_numpy`` per field; pinned memory + non_blocking copies on CUDA.
* ``OnlineLearner.step``: test-then-train — the batch's forward pass runs with the weights from before
  the update (dropout is 0 in the online trainer, so train-mode outputs equal eval outputs); its
  pCTR / Step-3 scores / corpus top-10 are recorded as prequential predictions, then the combined
  OneRanker loss (trainer.losses.oneranker_loss, as trainer/evaluate.py uses) is back-propagated.
  bf16 autocast on CUDA.
* ``Prequential``: sliding windows (by samples) of those predictions → AUC, GAUC, logloss of pCTR,
  HR@10 of the clicked ad in full-corpus Step-2 retrieval (history items excluded), value-NDCG@10 of
  the exposed ads ranked by Step 3.
* ``StreamTrainer``: the Kafka loop (kafka-python consumer group, enable_auto_commit=False,
  session_timeout_ms=6000), dedupe by sample_id, micro-batches by size or time, checkpoints every N
  steps or T seconds, offsets committed to Kafka only after the checkpoint that holds them is
  written; on start it resumes from the newest valid checkpoint and seeks to ITS offsets.

Exactly-once learning: a checkpoint holds the model, the offsets of every record learned (or skipped
as a duplicate) and the recent sample ids; after a crash the model and offsets roll back together,
so the samples learned after the last checkpoint are learned again (once) into the restored model.
The learned-log (test mode) is written from checkpoints: after each checkpoint it appends the ids
learned since the previous one, tagged with the checkpoint step, and on resume it completes a tail
that a crash between checkpoint and append left missing — so the log lists exactly the samples the
durable model has learned.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn

from oneranker import config
from streaming.samples import Sample
from trainer import checkpoint as ckpt_mod
from trainer.clipping import clip_by_group
from trainer.data import CONV_VALUE_SHARE, DEVICE_INDEX, OOV, IdMap
from trainer.losses import oneranker_loss
from trainer.model.config import OneRankerConfig, preset as make_preset
from trainer.model.oneranker import OneRanker

log = logging.getLogger(__name__)

# Rows of these tensors are indexed by item / user id (the adapter to trainer/model/*: if the model
# renames its tables, only these two tuples change).
ITEM_ROWS = ("backbone.embed.item.weight", "item_log_bid", "item_log_pop")  # those the model has
USER_ROWS = ("backbone.embed.user.weight",)
ITEM_INIT_STD, USER_INIT_STD = 0.05, 0.02  # as TokenEmbedding initialises them
FORMAT = "online-v1"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ------------------------------------------------------------------------------------------
# Growing tables


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    *path, attr = name.split(".")
    mod = model
    for p in path:
        mod = getattr(mod, p)
    return mod, attr


@torch.no_grad()
def resize_rows(model: nn.Module, opt: torch.optim.Optimizer | None, name: str, rows: int,
                init_std: float = 0.0) -> None:
    """Resize the id-indexed tensor ``name`` (parameter or buffer) to ``rows`` rows in place: old rows
    are copied, new rows get N(0, init_std) (params) or 0 (buffers). The optimizer follows: its
    param reference is swapped and per-parameter state tensors of the old shape are zero-padded."""
    mod, attr = _owner(model, name)
    old = getattr(mod, attr)
    n = min(rows, old.shape[0])
    if isinstance(old, nn.Parameter):
        data = old.data.new_empty((rows, *old.shape[1:]))
        data.normal_(0.0, init_std) if init_std > 0 else data.zero_()
        data[:n] = old.data[:n]
        if attr == "weight" and getattr(mod, "padding_idx", None) is not None and n == 0:
            data[mod.padding_idx].zero_()
        new = nn.Parameter(data, requires_grad=old.requires_grad)
        setattr(mod, attr, new)
        if hasattr(mod, "num_embeddings"):
            mod.num_embeddings = rows
        if opt is not None:
            for g in opt.param_groups:
                g["params"] = [new if p is old else p for p in g["params"]]
            st = opt.state.pop(old, None)
            if st is not None:
                for k, v in list(st.items()):
                    if torch.is_tensor(v) and v.shape == old.shape:
                        pad = v.new_zeros((rows, *v.shape[1:]))
                        pad[:n] = v[:n]
                        st[k] = pad
                opt.state[new] = st
    else:
        data = old.new_zeros((rows, *old.shape[1:]))
        data[:n] = old[:n]
        mod._buffers[attr] = data


def id_init(keys: Sequence[str], d: int, std: float, salt: int = 0) -> torch.Tensor:
    """Initial embedding rows for newly admitted ids: N(0, std) seeded by the id itself, so a row's
    start does not depend on when (or in which process, before or after a resume) it was admitted."""
    import hashlib

    out = torch.empty(len(keys), d)
    g = torch.Generator()
    for j, k in enumerate(keys):
        g.manual_seed(int.from_bytes(hashlib.blake2b(f"{salt}:{k}".encode(), digest_size=8).digest(), "little") >> 1)
        out[j] = torch.randn(d, generator=g) * std
    return out


def set_table_sizes(model: OneRanker, opt, num_items: int | None = None, num_users: int | None = None) -> None:
    """Grow (or shrink) the item / user tables and keep every config object in the model in sync."""
    if num_items is not None and num_items != model.item_table.shape[0]:
        for name in ITEM_ROWS:
            mod, attr = _owner(model, name)
            if getattr(mod, attr, None) is not None:
                resize_rows(model, opt, name, num_items, ITEM_INIT_STD if name.endswith("weight") else 0.0)
    if num_users is not None and num_users != model.backbone.embed.user.weight.shape[0]:
        for name in USER_ROWS:
            resize_rows(model, opt, name, num_users, USER_INIT_STD)
    ni, nu = model.item_table.shape[0], model.backbone.embed.user.weight.shape[0]
    seen = set()
    for m in model.modules():
        c = getattr(m, "cfg", None)
        if isinstance(c, OneRankerConfig) and id(c) not in seen:
            seen.add(id(c))
            c.num_items, c.num_users = ni, nu


class Vocab:
    """Item and user id maps plus the capacity policy of the embedding tables."""

    def __init__(self, items: IdMap | None = None, users: IdMap | None = None, min_capacity: int = 1024,
                 max_users: int | None = None):
        self.items = items or IdMap()
        self.users = users or IdMap()
        self.min_capacity = min_capacity
        self.max_users = max_users
        self.new_items: list[tuple[int, str]] = []  # admitted since the learner last initialised rows
        self.new_users: list[tuple[int, str]] = []

    def item(self, key: str) -> int:
        key = str(key)
        i = self.items.index.get(key)
        if i is None:
            i = self.items.get_or_add(key)
            self.new_items.append((i, key))
        return i

    def user(self, key: str) -> int:
        key = str(key)
        i = self.users.index.get(key)
        if i is None:
            if self.max_users is not None and len(self.users) >= self.max_users:
                return OOV
            i = self.users.get_or_add(key)
            self.new_users.append((i, key))
        return i

    def capacity_for(self, used: int, current: int) -> int:
        cap = max(current, self.min_capacity)
        while cap < used:
            cap *= 2
        return cap


# ------------------------------------------------------------------------------------------
# Collation


def sample_labels(s: Sample) -> tuple[list[float], list[float], list[float]]:
    """click, conversion, value label per exposed ad (value as trainer.data: bid·click + share·GMV)."""
    click = [float(a.click) for a in s.ads]
    conv = [float(a.conversion) for a in s.ads]
    value = [a.bid * a.click + CONV_VALUE_SHARE * a.value for a in s.ads]
    return click, conv, value


def plan_rows(samples: Sequence[Sample], max_len: int, max_positions: int = 16) -> list[tuple[int, list[tuple[int, int]]]]:
    """Group a micro-batch's samples into sequence rows: the samples of one user whose histories are
    prefixes of a newer sample's history share that sample's row, each as a query at its own
    position (the model is causal, so a query at position p sees tokens ≤ p only — how
    trainer/evaluate.py supervises many requests per sequence). Step 1 then runs once per row
    instead of once per sample (ML-100k micro-batches of 64 hold ~3 users).

    A sample joins a row only if it sees at least min(its history, max_len // 2) tokens there;
    rows hold at most ``max_positions`` queries. Returns [(anchor sample index, [(sample index,
    visible token count m)])]; the anchor's own query sees its whole window."""
    import bisect

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
        rows = plan_rows(samples, max_len, size) if size > 1 else [
            (i, [(i, min(max_len, len((s.history or {}).get("item_ids") or [])))]) for i, s in enumerate(samples)]
        cost = len(rows) * (row_cost + max(len(m) for _, m in rows))
        if cost < best_cost:
            best_cost, best = cost, rows
    return best


def collate_samples(samples: Sequence[Sample], vocab: Vocab, max_len: int, n_targets: int,
                    rng: np.random.Generator, pin: bool = False, group: bool = True,
                    max_positions: int = 16, row_cost: float | None = None) -> dict[str, torch.Tensor]:
    """Samples → a batch in the layout of trainer.data.collate_chunks: rows [B] of left-padded
    history (see ``plan_rows``; with ``row_cost``, ``plan_rows_cheapest``; ``group=False``: one row
    per sample), queries [B, P] at positions
    ``pos`` with ``pos_valid``, exposed ads as candidates [B, P, C] with click/conversion/value
    labels, generation targets from the request's own clicks/conversions, ``cand_seen`` [B, P, C]
    (the ad is in the sample's whole history, which can be longer than max_len). Ids are admitted into
    ``vocab`` here. ``order`` [B, P] = the sample index of each query (-1 = padding)."""
    if not group:
        rows = [(i, [(i, min(max_len, len((s.history or {}).get("item_ids") or [])))]) for i, s in enumerate(samples)]
    elif row_cost is not None:
        rows = plan_rows_cheapest(samples, max_len, row_cost, max_positions)
    else:
        rows = plan_rows(samples, max_len, max_positions)
    B = len(rows)
    P = max(len(m) for _, m in rows)
    C = max(1, max(len(s.ads) for s in samples))
    items = np.zeros((B, max_len), np.int64)
    actions = np.zeros((B, max_len), np.int64)
    times = np.zeros((B, max_len), np.float32)
    user = np.zeros(B, np.int64)
    pos = np.zeros((B, P), np.int64)
    pvalid = np.zeros((B, P), bool)
    order = np.full((B, P), -1, np.int64)
    device = np.zeros((B, P), np.int64)
    cand = np.zeros((B, P, C), np.int64)
    lab = np.zeros((3, B, P, C), np.float32)
    tgt = np.zeros((B, P, 3, n_targets), np.int64)
    tval = np.zeros((B, P, n_targets), np.float32)
    bid = np.zeros((B, P, C), np.float32)
    cseen = np.zeros((B, P, C), bool)
    for b, (anchor, members) in enumerate(rows):
        s0 = samples[anchor]
        user[b] = vocab.user(s0.user_id)
        h = s0.history or {}
        ids = (h.get("item_ids") or [])[-max_len:]
        n = len(ids)
        if n:
            items[b, max_len - n:] = [vocab.item(x) for x in ids]
            actions[b, max_len - n:] = (h.get("actions") or [])[-n:]
            tm = np.asarray((h.get("event_times") or [])[-n:], np.float64)
            times[b, max_len - n:] = (tm - tm[-1]) / 1000.0  # seconds relative to the newest token
        for p, (i, m) in enumerate(members):
            s = samples[i]
            pos[b, p] = max_len - n + m if m > 0 else 0
            pvalid[b, p] = True
            order[b, p] = i
            device[b, p] = DEVICE_INDEX.get(str((s.context or {}).get("device", "")), 0)
            ads = s.ads[:C]
            cid = [vocab.item(a.ad_id) for a in ads]
            cand[b, p, : len(cid)] = cid
            click, conv, value = sample_labels(s)
            lab[0, b, p, : len(cid)] = click
            lab[1, b, p, : len(cid)] = conv
            lab[2, b, p, : len(cid)] = value
            bid[b, p, : len(cid)] = [a.bid for a in ads]
            seen = set((s.history or {}).get("item_ids") or [])  # the sample's whole feature-store history
            cseen[b, p, : len(cid)] = [a.ad_id in seen for a in ads]
            imp = rng.choice(cid, size=min(n_targets, len(cid)), replace=False) if cid else []
            clicked = [c for c, k in zip(cid, click) if k > 0][:n_targets]
            conv_ads = [(c, a.value) for c, a in zip(cid, ads) if a.conversion][:n_targets]
            tgt[b, p, 0, : len(imp)] = imp
            tgt[b, p, 1, : len(clicked)] = clicked
            tgt[b, p, 2, : len(conv_ads)] = [c for c, _ in conv_ads]
            tval[b, p, : len(conv_ads)] = [v for _, v in conv_ads]
    t = torch.from_numpy
    out = {"user": t(user), "items": t(items), "actions": t(actions), "times": t(times), "pos": t(pos),
           "pos_valid": t(pvalid), "device": t(device), "cand": t(cand),
           "click": t(lab[0]), "conv": t(lab[1]), "value": t(lab[2]), "targets": t(tgt),
           "target_values": t(tval), "bid": t(bid), "order": t(order), "cand_seen": t(cseen)}
    if pin:
        out = {k: v.pin_memory() for k, v in out.items()}
    return out


def to_device(batch: dict, dev: torch.device) -> dict:
    nb = dev.type == "cuda"
    return {k: v.to(dev, non_blocking=nb) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------
# Prequential metrics


def auc(score: np.ndarray, label: np.ndarray) -> float:
    """ROC AUC with ties counted half (Mann–Whitney on average ranks)."""
    pos = label > 0
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    ranks = np.empty(len(s), np.float64)
    _, start, counts = np.unique(s, return_index=True, return_counts=True)
    avg = start + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def gauc_rows(score: np.ndarray, label: np.ndarray, valid: np.ndarray) -> float:
    """Impression-weighted mean of per-request AUC, vectorised over rows [N, C]."""
    pos = (label > 0) & valid
    neg = (label <= 0) & valid
    gt = (score[:, :, None] > score[:, None, :]) + 0.5 * (score[:, :, None] == score[:, None, :])
    pairs = pos[:, :, None] & neg[:, None, :]
    npairs = pairs.sum((1, 2))
    ok = npairs > 0
    if not ok.any():
        return float("nan")
    a = (gt * pairs).sum((1, 2))[ok] / npairs[ok]
    w = valid.sum(1)[ok]
    return float((a * w).sum() / w.sum())


def value_ndcg_rows(score: np.ndarray, value: np.ndarray, valid: np.ndarray, k: int = 10) -> float:
    s = np.where(valid, score, -np.inf)
    v = np.where(valid, value, 0.0)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    disc = 1.0 / np.log2(np.arange(order.shape[1]) + 2.0)
    dcg = (np.take_along_axis(v, order, 1) * disc).sum(1)
    ideal = -np.sort(-v, axis=1)[:, :k]
    idcg = (ideal * disc[: ideal.shape[1]]).sum(1)
    ok = idcg > 0
    return float((dcg[ok] / idcg[ok]).mean()) if ok.any() else float("nan")


@dataclass
class BatchPreds:
    """Per-sample predictions made BEFORE learning from the batch. Arrays [B, C] / [B]."""

    ctr_logit: np.ndarray
    score: np.ndarray
    click: np.ndarray
    value: np.ndarray
    valid: np.ndarray
    hit10: np.ndarray  # 1/0 per sample with a click, NaN without

    def __len__(self) -> int:
        return len(self.hit10)


def _pad_cols(a: np.ndarray, C: int, fill) -> np.ndarray:
    if a.shape[1] == C:
        return a
    out = np.full((a.shape[0], C), fill, a.dtype)
    out[:, : a.shape[1]] = a
    return out


def summarize(preds: Sequence[BatchPreds]) -> dict[str, float]:
    """Metrics over a list of batches' predictions."""
    preds = [p for p in preds if len(p)]
    if not preds:
        return {"samples": 0}
    C = max(p.valid.shape[1] for p in preds)
    cat = {f: np.concatenate([_pad_cols(getattr(p, f), C, False if f == "valid" else 0.0) for p in preds])
           for f in ("ctr_logit", "score", "click", "value", "valid")}
    valid = cat["valid"]
    logit, click = cat["ctr_logit"][valid].astype(np.float64), cat["click"][valid]
    p = 1.0 / (1.0 + np.exp(-logit))
    eps = 1e-7
    ll = -(click * np.log(np.clip(p, eps, 1)) + (1 - click) * np.log(np.clip(1 - p, eps, 1))).mean()
    hits = np.concatenate([p_.hit10 for p_ in preds])
    hits = hits[~np.isnan(hits)]
    return {"samples": int(valid.shape[0]), "impressions": int(valid.sum()),
            "auc": auc(logit, click), "gauc": gauc_rows(cat["ctr_logit"], cat["click"], valid),
            "logloss": float(ll), "ctr": float(click.mean()) if len(click) else float("nan"),
            "mean_pctr": float(p.mean()) if len(p) else float("nan"),
            "hr@10": float(hits.mean()) if len(hits) else float("nan"),
            "vndcg@10": value_ndcg_rows(cat["score"], cat["value"], valid)}


class Prequential:
    """Sliding windows (in samples) over the latest batches' predictions."""

    def __init__(self, windows: Sequence[int] = (1000, 10000)):
        self.windows = sorted(windows)
        self.batches: collections.deque[BatchPreds] = collections.deque()
        self.n = 0
        self.total = 0

    def add(self, p: BatchPreds) -> None:
        self.batches.append(p)
        self.n += len(p)
        self.total += len(p)
        while self.batches and self.n - len(self.batches[0]) >= self.windows[-1]:
            self.n -= len(self.batches.popleft())

    def window(self, size: int) -> list[BatchPreds]:
        out, n = [], 0
        for b in reversed(self.batches):
            if n >= size:
                break
            out.append(b)
            n += len(b)
        return out[::-1]

    def summary(self) -> dict[str, dict]:
        return {f"w{w}": summarize(self.window(w)) for w in self.windows}


# ------------------------------------------------------------------------------------------
# The learner (no Kafka)


def make_optimizer(model: nn.Module, cfg: OneRankerConfig) -> torch.optim.AdamW:
    """AdamW with the fused kernel (CPU and CUDA): one pass over all parameters instead of a
    Python loop over ~120 tensors — 0.8 ms instead of 3.7 ms per step for the small preset."""
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


class OnlineLearner:
    """OneRanker + AdamW + growing vocab; ``step(samples)`` scores then learns one micro-batch."""

    def __init__(self, cfg: OneRankerConfig, device: str | torch.device = "cpu", seed: int = 0,
                 min_capacity: int = 1024, max_users: int | None = None, centroid_every: int = 100,
                 recent_ids: int = 200_000, recent_samples: int = 256, lr_warmup: int = 100,
                 lr_floor: float = 0.25, group: bool = True):
        self.dev = resolve_device(device) if isinstance(device, str) else device
        torch.manual_seed(seed)
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.gen = torch.Generator(device=self.dev).manual_seed(seed)
        self.vocab = Vocab(min_capacity=min_capacity, max_users=max_users)
        cap_i = self.vocab.capacity_for(2, 0)
        self.cfg = cfg.replace(num_items=cap_i, num_users=cap_i)
        self.model = OneRanker(self.cfg).to(self.dev)
        self.cfg = self.model.cfg
        self.opt = make_optimizer(self.model, cfg)
        self.clicks = torch.zeros(cap_i)  # per item, for the negatives' sampling distribution
        self.centroid_every = centroid_every
        self.lr_warmup, self.lr_floor = lr_warmup, lr_floor
        self.group = group
        self.step_no = 0
        self.samples_learned = 0
        self.trained_through_ts = 0
        self.recent_ids: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.max_recent_ids = recent_ids
        # Sample objects (or dicts from a resumed checkpoint): dataclass→dict conversion is deep
        # and cost ~15% of a step when done per learned sample, so it happens at checkpoint time.
        self.recent_samples: collections.deque[Sample | dict] = collections.deque(maxlen=recent_samples)
        self.bids: dict[str, float] = {}
        self.learned_since_ckpt: list[str] = []
        self.grow_events = 0
        self._centroids_ready = False
        self.amp = (torch.autocast("cuda", dtype=torch.bfloat16) if self.dev.type == "cuda" else nullcontext())
        # seconds per phase (on CUDA only the totals are exact: the phases are not synchronised);
        # compute_s = forward_s + score_s + learn_s
        self.timing = dict.fromkeys(("data_s", "centroids_s", "compute_s", "forward_s", "score_s", "learn_s"), 0.0)

    def lr_at(self, step: int) -> float:
        """Linear warm-up over ``lr_warmup`` steps, then inverse-sqrt decay to a floor of
        ``lr_floor`` × lr (an endless stream has no schedule end; the floor keeps it adapting)."""
        w = max(1, self.lr_warmup)
        f = (step + 1) / w if step < w else math.sqrt(w / (step + 1))
        return self.cfg.lr * max(f, self.lr_floor if step >= w else 0.0)

    # -- dedupe --------------------------------------------------------------------------
    def seen(self, sample_id: str) -> bool:
        return sample_id in self.recent_ids

    def remember(self, sample_id: str) -> None:
        self.recent_ids[sample_id] = None
        while len(self.recent_ids) > self.max_recent_ids:
            self.recent_ids.popitem(last=False)

    # -- vocab / tables ------------------------------------------------------------------
    def _ensure_capacity(self) -> None:
        ni, nu = len(self.vocab.items), len(self.vocab.users)
        cur_i, cur_u = self.model.item_table.shape[0], self.model.backbone.embed.user.weight.shape[0]
        new_i, new_u = self.vocab.capacity_for(ni, cur_i), self.vocab.capacity_for(nu, cur_u)
        if new_i != cur_i or new_u != cur_u:
            set_table_sizes(self.model, self.opt, new_i, new_u)
            self.grow_events += 1
            log.info("grew embedding tables: items %d→%d, users %d→%d", cur_i, new_i, cur_u, new_u)
        if self.clicks.shape[0] < new_i:
            c = torch.zeros(new_i)
            c[: self.clicks.shape[0]] = self.clicks
            self.clicks = c
        self._init_new_rows()

    @torch.no_grad()
    def _init_new_rows(self) -> None:
        """Rows of newly admitted ids start from an id-seeded init (and zero optimizer moments)."""
        for new, name, std, salt in ((self.vocab.new_items, ITEM_ROWS[0], ITEM_INIT_STD, self.seed),
                                     (self.vocab.new_users, USER_ROWS[0], USER_INIT_STD, self.seed + 1)):
            if not new:
                continue
            mod, attr = _owner(self.model, name)
            w = getattr(mod, attr)
            idx = torch.tensor([i for i, _ in new], device=w.device)
            w[idx] = id_init([k for _, k in new], w.shape[1], std, salt).to(w)
            for v in self.opt.state.get(w, {}).values():
                if torch.is_tensor(v) and v.shape == w.shape:
                    v[idx] = 0
            new.clear()

    def log_q(self) -> torch.Tensor:
        n = len(self.vocab.items)
        q = torch.zeros(self.clicks.shape[0])
        q[2:n] = (self.clicks[2:n] + 1.0) ** 0.75
        return torch.log((q / q.sum()).clamp(min=1e-12)).to(self.dev)

    @torch.no_grad()
    def refresh_centroids(self, iters: int = 3) -> None:
        """Fake-item centroids from the used rows of the item table (unused capacity rows are
        untrained filler). The first time: the model's k-means; afterwards WARM-STARTED Lloyd
        iterations from the current centroids, so the fake item tokens drift with the table instead
        of jumping to a fresh (re-seeded, re-ordered) clustering in the middle of the stream."""
        n, k = len(self.vocab.items), self.cfg.n_fake
        if not k or n - 2 < k:
            return
        table = self.model.item_table[:n].detach()
        if not self._centroids_ready:
            self.model.step2.refresh_centroids(table, seed=self.seed)
            self._centroids_ready = True
            return
        x = table[2:].float()
        c = self.model.step2.centroids[:k].float().clone()
        for _ in range(iters):
            assign = torch.cdist(x, c).argmin(1)
            tot = torch.zeros_like(c).index_add_(0, assign, x)
            cnt = torch.bincount(assign, minlength=k).unsqueeze(1).float()
            c = torch.where(cnt > 0, tot / cnt.clamp(min=1), c)
        self.model.step2.centroids[:k] = c.to(self.model.step2.centroids)

    # -- one micro-batch -----------------------------------------------------------------
    def _row_cost(self, samples: Sequence[Sample]) -> float:
        return step1_cost_in_slots(self.cfg, max((len(s.ads) for s in samples), default=1))

    def collate(self, samples: Sequence[Sample]) -> dict:
        t0 = time.perf_counter()
        batch = collate_samples(samples, self.vocab, self.cfg.max_len, self.cfg.n_targets, self.rng,
                                pin=self.dev.type == "cuda", group=self.group, row_cost=self._row_cost(samples))
        self._ensure_capacity()
        bid = batch.pop("bid")
        batch.pop("order")
        with torch.no_grad():
            cand = batch["cand"]
            ok = cand > 1
            lb = self.model.item_log_bid
            lb[cand[ok].to(lb.device)] = torch.log(bid[ok].clamp(min=1e-6)).to(lb)
        for s in samples:
            for a in s.ads:
                self.bids[a.ad_id] = a.bid
        out = to_device(batch, self.dev)
        self.timing["data_s"] += time.perf_counter() - t0
        return out

    @torch.no_grad()
    def _preds(self, out: dict, batch: dict, model=None, n_items: int | None = None) -> BatchPreds:
        """Per-query predictions (valid queries only) from the forward outputs [B, P, ...]."""
        model = model or self.model
        q = batch["pos_valid"]  # [B, P]
        cand = batch["cand"]  # [B, P, C]
        click = batch["click"]
        n = n_items or len(self.vocab.items)
        clicked = cand * (click > 0)
        has = (clicked > 0).any(-1)  # [B, P]; HR@10 is defined (not NaN) for these queries only
        hit10 = torch.full(has.shape, float("nan"), device=cand.device)
        if has.any():  # the corpus is scored for queries with a click only: same HR, less work
            rows, cols = has.nonzero(as_tuple=True)
            with self.amp:  # on CUDA the outputs are bf16: score the corpus under the same autocast
                corpus = model.corpus_scores(out["task"][rows, cols], out["s_target"][rows, cols]).float().mean(1)
            N = corpus.shape[-1]  # corpus [H, N] for the H clicked queries
            ar = torch.arange(N, device=corpus.device)
            corpus = corpus.masked_fill((ar < 2) | (ar >= min(n, N)), -1e9)
            L = batch["items"].shape[1]
            visible = torch.arange(1, L + 1, device=corpus.device).view(1, L) <= batch["pos"][rows, cols].unsqueeze(-1)
            seen = (batch["items"][rows] * visible).clamp(max=N - 1)  # [H, L] (0 = not seen)
            corpus.scatter_(1, seen, -1e9)  # history items the query sees are excluded
            top = corpus.topk(min(10, N), -1).indices  # [H, 10]
            hc = clicked[rows, cols]  # [H, C]
            hit = ((top.unsqueeze(-1) == hc.unsqueeze(-2)) & (hc.unsqueeze(-2) > 0)).any(-1).any(-1)
            hit10[rows, cols] = hit.float()
        score = out["score"] if "score" in out else out["gen_cand"].mean(2)
        ctr = out["ctr"] if "ctr" in out else score
        f = lambda x: x[q].float().cpu().numpy()  # noqa: E731
        return BatchPreds(f(ctr), f(score), f(click), f(batch["value"]), f(cand > 0).astype(bool), f(hit10))

    def step(self, samples: Sequence[Sample], learn: bool = True) -> tuple[BatchPreds, dict]:
        """Test-then-train on ``samples`` (already deduped). Returns (predictions before the update,
        loss parts)."""
        batch = self.collate(samples)
        t0 = time.perf_counter()
        if not self._centroids_ready or (self.centroid_every and self.step_no % self.centroid_every == 0):
            self.refresh_centroids()
        t1 = time.perf_counter()
        self.timing["centroids_s"] += t1 - t0
        self.model.train(learn)
        if self.cfg.popularity_feature:  # clicks learned so far: never this batch's
            self.model.set_item_log_pop(self.log_q())
        with self.amp:
            out = self.model(batch["user"], batch["items"], batch["actions"], batch["times"], batch["pos"],
                             batch["device"], batch["cand"],
                             seen=batch["cand_seen"] if self.model.cfg.full_history_seen else None)
        t2 = time.perf_counter()
        preds = self._preds(out, batch)
        t3 = time.perf_counter()
        parts: dict = {}
        if learn:
            self.clicks += torch.zeros_like(self.clicks).index_add_(
                0, batch["cand"].flatten().cpu(), batch["click"].flatten().cpu())
            with self.amp:
                loss, parts = oneranker_loss(self.model, out, batch, self.log_q(), self.gen)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            clip_by_group(self.model, self.cfg.clip_norm)  # ranker and the rest apart, as offline
            for g in self.opt.param_groups:
                g["lr"] = self.lr_at(self.step_no)
            self.opt.step()
            self.step_no += 1
            self.samples_learned += len(samples)
            for s in samples:
                self.remember(s.sample_id)
                self.learned_since_ckpt.append(s.sample_id)
                self.trained_through_ts = max(self.trained_through_ts, int(s.ts))
            self.recent_samples.extend(samples[-self.recent_samples.maxlen:])
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
        t4 = time.perf_counter()
        for k, v in (("forward_s", t2 - t1), ("score_s", t3 - t2), ("learn_s", t4 - t3), ("compute_s", t4 - t1)):
            self.timing[k] += v
        return preds, parts

    @torch.no_grad()
    def score_frozen(self, frozen: "OneRanker", n_items: int, n_users: int, samples: Sequence[Sample]) -> BatchPreds:
        """Predictions of a frozen copy with a fixed vocabulary (ids it never saw → OOV)."""
        batch = collate_samples(samples, self.vocab, self.cfg.max_len, self.cfg.n_targets, self.rng, group=self.group,
                                row_cost=self._row_cost(samples))
        batch.pop("bid")
        batch.pop("order")
        for k, lim in (("items", n_items), ("cand", n_items), ("user", n_users)):
            batch[k] = torch.where(batch[k] >= lim, torch.full_like(batch[k], OOV), batch[k])
        batch = to_device(batch, self.dev)
        frozen.eval()
        with self.amp:
            out = frozen(batch["user"], batch["items"], batch["actions"], batch["times"], batch["pos"],
                         batch["device"], batch["cand"])
        return self._preds(out, batch, frozen, n_items)  # corpus HR over the frozen model's own rows

    # -- checkpoint state ----------------------------------------------------------------
    def to_checkpoint(self, offsets: dict[str, int], metrics: dict, extra: dict | None = None) -> ckpt_mod.Checkpoint:
        """A checkpoint with the tables trimmed to the used rows (exporter-ready)."""
        ni, nu = len(self.vocab.items), len(self.vocab.users)
        rows = {n: ni for n in ITEM_ROWS} | {n: nu for n in USER_ROWS}
        state = {k: (v[: rows[k]] if k in rows else v).detach().cpu().clone()
                 for k, v in self.model.state_dict().items()}
        params = [p for g in self.opt.param_groups for p in g["params"]]
        pname = {id(p): n for n, p in self.model.named_parameters()}
        osd = self.opt.state_dict()
        trimmed = {}
        for idx, st in osd["state"].items():
            name = pname.get(id(params[idx]))
            r = rows.get(name)
            trimmed[idx] = {k: (v[:r].cpu().clone() if (r is not None and torch.is_tensor(v) and v.dim() > 0
                                                         and v.shape[0] == params[idx].shape[0]) else
                                (v.cpu().clone() if torch.is_tensor(v) else v)) for k, v in st.items()}
        osd = {"state": trimmed, "param_groups": osd["param_groups"]}
        cfg = self.cfg.to_dict() | {"num_items": ni, "num_users": nu}
        ex = {"format": FORMAT, "recent_ids": list(self.recent_ids), "recent_samples": [s.to_dict() if isinstance(s, Sample) else s for s in self.recent_samples],
              "catalog_bids": dict(self.bids), "click_counts": self.clicks[:ni].clone(),
              "learned_ids": list(self.learned_since_ckpt), "samples_learned": self.samples_learned,
              "capacity": {"items": self.model.item_table.shape[0],
                           "users": self.model.backbone.embed.user.weight.shape[0]},
              "rng": {"numpy": self.rng.bit_generator.state, "torch": self.gen.get_state()},
              "seed": self.seed}
        return ckpt_mod.Checkpoint(step=self.step_no, model_config=cfg, model_state=state,
                                   item_ids=self.vocab.items.to_dict(), user_ids=self.vocab.users.to_dict(),
                                   offsets=dict(offsets), trained_through_ts=self.trained_through_ts,
                                   metrics=metrics, optimizer_state=osd, extra=ex | (extra or {}))

    @classmethod
    def from_checkpoint(cls, ck: ckpt_mod.Checkpoint, device: str | torch.device = "cpu", **kw) -> "OnlineLearner":
        cfg = OneRankerConfig.from_dict(ck.model_config)
        ex = ck.extra or {}
        self = cls(cfg, device=device, seed=int(ex.get("seed", 0)), **kw)
        self.vocab.items, self.vocab.users = IdMap.from_dict(ck.item_ids), IdMap.from_dict(ck.user_ids)
        # build the trimmed model, load, then grow back to capacity (params + optimizer state)
        self.model = OneRanker(cfg).to(self.dev)
        exact = True
        try:
            self.model.load_state_dict(ck.model_state)
        except RuntimeError:
            # The model code gained/lost parameters since this checkpoint: keep what matches (new
            # parameters keep their init) and restart the optimizer moments, loudly.
            res = self.model.load_state_dict(ck.model_state, strict=False)
            log.warning("checkpoint %s is from another model version (missing %s, unexpected %s): "
                        "loaded non-strictly, optimizer state reset", ck.path, res.missing_keys,
                        res.unexpected_keys)
            exact = False
        self.cfg = self.model.cfg
        self.opt = make_optimizer(self.model, cfg)
        if ck.optimizer_state and exact:
            self.opt.load_state_dict(ck.optimizer_state)
            for g in self.opt.param_groups:  # a checkpoint's groups carry its writer's kernel choice
                g.update(fused=True, foreach=None)
        cap = ex.get("capacity") or {}
        set_table_sizes(self.model, self.opt, max(cap.get("items", 0), self.vocab.capacity_for(len(self.vocab.items), 0)),
                        max(cap.get("users", 0), self.vocab.capacity_for(len(self.vocab.users), 0)))
        self.clicks = torch.zeros(self.model.item_table.shape[0])
        cc = ex.get("click_counts")
        if cc is not None:
            self.clicks[: len(cc)] = torch.as_tensor(cc)
        self.step_no = ck.step
        self.samples_learned = int(ex.get("samples_learned", 0))
        self.trained_through_ts = ck.trained_through_ts
        for sid in ex.get("recent_ids", []):
            self.recent_ids[sid] = None
        for s in ex.get("recent_samples", []):
            self.recent_samples.append(s)
        self.bids = dict(ex.get("catalog_bids") or {})
        rng = ex.get("rng") or {}
        if "numpy" in rng:
            self.rng.bit_generator.state = rng["numpy"]
        if "torch" in rng and self.dev.type == "cpu":
            self.gen.set_state(rng["torch"])
        self._centroids_ready = True  # centroids are a buffer in the state
        return self


# ------------------------------------------------------------------------------------------
# Learned-log (test mode)


def append_learned(path: Path, step: int, ids: Iterable[str]) -> None:
    lines = "".join(f"{step}\t{i}\n" for i in ids)
    with open(path, "a") as f:
        f.write(lines)
        f.flush()
        os.fsync(f.fileno())


def read_learned(path: Path) -> list[tuple[int, str]]:
    """(checkpoint step, sample id) lines; a torn last line (no newline: killed mid-append) is ignored."""
    if not Path(path).exists():
        return []
    text = Path(path).read_text()
    lines = text.split("\n")[:-1]  # the part after the last newline is torn or empty
    out = []
    for line in lines:
        if "\t" in line:
            st, i = line.split("\t", 1)
            out.append((int(st), i))
    return out


def reconcile_learned(path: Path, ck: ckpt_mod.Checkpoint | None) -> None:
    """Make the log equal to what checkpoint ``ck`` holds: the lines of earlier checkpoints (each
    complete, since the next checkpoint is written only after the append), then exactly ``ck``'s
    ids — dropping a torn or partial append and lines of checkpoints that did not survive."""
    path = Path(path)
    rows = read_learned(path)
    step = ck.step if ck is not None else -1
    keep = [(s, i) for s, i in rows if s < step]
    if ck is not None:
        keep += [(step, i) for i in (ck.extra or {}).get("learned_ids", [])]
    text = "".join(f"{s}\t{i}\n" for s, i in keep)
    if not path.exists() or path.read_text() != text:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


# ------------------------------------------------------------------------------------------
# The Kafka loop


@dataclass
class TrainerOptions:
    bootstrap: str
    topic: str = config.TOPIC_SAMPLES
    group_id: str = "oneranker-trainer"
    checkpoint_dir: Path = Path(".oneranker/checkpoints")
    preset: str = "small"
    device: str = "auto"
    batch_size: int = 64
    max_batch_size: int | None = 256  # with a backlog, batches grow up to this
    max_wait_ms: int = 500
    checkpoint_every_steps: int = 200
    checkpoint_every_s: float = 60.0
    keep: int = 3
    metrics_port: int = config.DEFAULT_TRAINER_METRICS_PORT
    metrics_jsonl: Path | None = None
    metrics_every_s: float = 10.0
    windows: tuple[int, ...] = (1000, 10000)
    learned_log: Path | None = None
    max_samples: int | None = None
    exit_when_idle_s: float | None = None
    min_capacity: int = 1024
    max_users: int | None = None
    centroid_every: int = 100
    threads: int | None = 1  # measured: 2 threads on the shared 2-core box ran 12x slower than 1
    seed: int = 0
    overrides: dict = field(default_factory=dict)


class _Metrics:
    """Prometheus gauges/counters (prometheus_client), on a private registry."""

    def __init__(self, port: int):
        from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

        self.registry = CollectorRegistry()
        r = self.registry
        self.samples = Counter("oneranker_trainer_samples", "Samples learned", registry=r)
        self.dupes = Counter("oneranker_trainer_duplicates", "Samples skipped as duplicates", registry=r)
        self.bad = Counter("oneranker_trainer_invalid", "Records that are not valid samples", registry=r)
        self.steps = Counter("oneranker_trainer_steps", "Optimizer steps", registry=r)
        self.ckpts = Counter("oneranker_trainer_checkpoints", "Checkpoints written", registry=r)
        self.window = Gauge("oneranker_trainer_prequential", "Test-then-train metric over a sliding window",
                            ["metric", "window"], registry=r)
        self.loss = Gauge("oneranker_trainer_loss", "Last batch loss part", ["part"], registry=r)
        self.rate = Gauge("oneranker_trainer_samples_per_second", "Learning throughput", registry=r)
        self.items = Gauge("oneranker_trainer_vocab", "Ids in the growing maps", ["kind"], registry=r)
        self.through = Gauge("oneranker_trainer_trained_through_ts", "Newest event time learned (ms)", registry=r)
        self.port = None
        if port is not None and port >= 0:
            server, _ = start_http_server(port, addr=config.settings().bind_host, registry=r)
            self.port = server.server_port


def c_crc32c_available() -> bool:
    """Whether kafka-python can check record CRCs in C (the optional ``crc32c`` package). Without
    it kafka-python falls back to pure Python: 300 µs of CPU per 3.3 KB sample (measured, vs 16 µs
    without the check) — half of what the trainer can spend per sample at the replay's rate. Then
    the trainer skips the check, as librdkafka does by default (check.crcs=false): TCP checksums the
    hop, the broker checked the batch on produce, and most damage fails JSON decoding (counted as
    invalid). The project now depends on ``crc32c`` (≈ 12 µs per sample with the check); this
    fallback is for environments without it."""
    import importlib.util

    return importlib.util.find_spec("crc32c") is not None


class StreamTrainer:
    def __init__(self, opts: TrainerOptions):
        self.o = opts
        self.stop = False
        self.buffer: collections.deque = collections.deque()  # (partition, offset, raw value)
        self.offsets: dict[str, int] = {}  # "topic:partition" → next offset (learned or skipped)
        self.last_ckpt_step = -1
        self.last_ckpt_time = time.monotonic()
        self.last_record = time.monotonic()
        self.assigned_at: float | None = None
        self.consumer = None
        self.batch_sizes: list[int] = []  # since the last metrics line
        self.progress: list = []  # [wall time, offsets] per step since the last checkpoint
        # seconds spent per part of the loop (the learner's own phases are in OnlineLearner.timing)
        self.loop_time = dict.fromkeys(("poll_s", "decode_s", "metrics_s", "checkpoint_s"), 0.0)

    # -- setup -----------------------------------------------------------------------------
    def _learner(self) -> OnlineLearner:
        kw = dict(min_capacity=self.o.min_capacity, max_users=self.o.max_users, centroid_every=self.o.centroid_every)
        ck = ckpt_mod.latest(self.o.checkpoint_dir)
        if self.o.learned_log is not None:
            reconcile_learned(self.o.learned_log, ck)
        if ck is not None and (ck.extra or {}).get("format") == FORMAT:
            lr = OnlineLearner.from_checkpoint(ck, self.o.device, **kw)
            self.offsets = dict(ck.offsets)
            self.last_ckpt_step = ck.step
            log.info("resumed from %s: step %d, %d samples learned, offsets %s", ck.path, ck.step,
                     lr.samples_learned, ck.offsets)
            return lr
        # online: no dropout (single pass; train-mode outputs are the prequential predictions)
        cfg = make_preset(self.o.preset, **({"dropout": 0.0} | self.o.overrides))
        log.info("no checkpoint in %s: starting a fresh %s model", self.o.checkpoint_dir, self.o.preset)
        return OnlineLearner(cfg, self.o.device, seed=self.o.seed, **kw)

    def _consumer(self):
        from kafka import ConsumerRebalanceListener, KafkaConsumer

        trainer = self

        class Listener(ConsumerRebalanceListener):
            def on_partitions_revoked(self, revoked):
                gone = {tp.partition for tp in revoked}
                trainer.buffer = collections.deque(r for r in trainer.buffer if r[0] not in gone)

            def on_partitions_assigned(self, assigned):
                # The checkpoint (or what was learned since), never the group's committed offsets.
                for tp in assigned:
                    off = trainer.offsets.get(f"{tp.topic}:{tp.partition}")
                    if off is None:
                        trainer.consumer.seek_to_beginning(tp)
                    else:
                        trainer.consumer.seek(tp, off)
                trainer.buffer = collections.deque(r for r in trainer.buffer
                                                   if r[0] not in {tp.partition for tp in assigned})
                trainer.assigned_at = time.monotonic()
                log.info("assigned %s", sorted(tp.partition for tp in assigned))

        c = KafkaConsumer(
            bootstrap_servers=self.o.bootstrap, group_id=self.o.group_id, client_id="oneranker-trainer",
            enable_auto_commit=False, auto_offset_reset="earliest",
            session_timeout_ms=config.SESSION_TIMEOUT_MS, heartbeat_interval_ms=config.HEARTBEAT_INTERVAL_MS,
            max_poll_interval_ms=120_000, max_poll_records=max(500, 4 * self.o.batch_size),
            fetch_max_wait_ms=100, check_crcs=c_crc32c_available())
        self.consumer = c
        c.subscribe([self.o.topic], listener=Listener())
        return c

    # -- checkpoint + commit -----------------------------------------------------------------
    def checkpoint(self, lr: OnlineLearner, metrics: dict) -> None:
        if lr.step_no == self.last_ckpt_step and not lr.learned_since_ckpt:
            return
        t0 = time.perf_counter()
        ck = lr.to_checkpoint(self.offsets, metrics)
        ck.progress, self.progress = self.progress, []
        ckpt_mod.save(self.o.checkpoint_dir, ck, keep=self.o.keep)
        if self.o.learned_log is not None:
            append_learned(self.o.learned_log, ck.step, lr.learned_since_ckpt)
        lr.learned_since_ckpt = []
        self.last_ckpt_step, self.last_ckpt_time = lr.step_no, time.monotonic()
        self.prom.ckpts.inc()
        # Only now that the checkpoint holds them do the offsets go to Kafka.
        self._commit(ck.offsets)
        self.loop_time["checkpoint_s"] += time.perf_counter() - t0

    def _commit(self, offsets: dict[str, int]) -> None:
        from kafka import TopicPartition
        from kafka.structs import OffsetAndMetadata

        if self.consumer is None or not offsets:
            return
        mine = {tp.partition for tp in self.consumer.assignment()}
        req = {}
        for key, off in offsets.items():
            topic, p = key.rsplit(":", 1)
            if topic == self.o.topic and int(p) in mine:
                req[TopicPartition(topic, int(p))] = OffsetAndMetadata(off, "", -1)
        if not req:
            return
        try:
            self.consumer.commit(req)
        except Exception as exc:  # noqa: BLE001 - a failed commit is harmless: the checkpoint rules
            log.warning("offset commit failed (the checkpoint still holds them): %s", exc)

    # -- main loop ---------------------------------------------------------------------------
    def _take_batch(self, lr: OnlineLearner, n: int):
        samples, consumed, ids = [], [], set()
        while self.buffer and len(samples) < n:
            part, off, raw = self.buffer.popleft()
            consumed.append((part, off))
            try:
                s = Sample.from_json(raw)
            except Exception:  # noqa: BLE001
                self.prom.bad.inc()
                continue
            if lr.seen(s.sample_id) or s.sample_id in ids:
                self.prom.dupes.inc()
                continue
            ids.add(s.sample_id)
            samples.append(s)
        return samples, consumed

    def _advance(self, consumed) -> None:
        for part, off in consumed:
            key = f"{self.o.topic}:{part}"
            self.offsets[key] = max(self.offsets.get(key, 0), off + 1)

    def run(self) -> dict:
        if self.o.threads:
            torch.set_num_threads(self.o.threads)
        self.prom = _Metrics(self.o.metrics_port)
        lr = self._learner()
        pq = Prequential(self.o.windows)
        if self.last_ckpt_step < 0:
            # A fresh start writes its initial state at once: the exporter warms its graph on it
            # (never publishing it), so its first trace overlaps the first batches (exporter/export.py).
            self.checkpoint(lr, {})
        consumer = self._consumer()
        jsonl = open(self.o.metrics_jsonl, "a") if self.o.metrics_jsonl else None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: setattr(self, "stop", True))
        first_wait = None
        last_metrics = time.monotonic()
        t_start, n_start = time.monotonic(), lr.samples_learned
        parts: dict = {}
        summary: dict = {}
        learned_here = 0
        log.info("trainer on %s topic=%s group=%s device=%s metrics port=%s", self.o.bootstrap, self.o.topic,
                 self.o.group_id, lr.dev, self.prom.port)
        try:
            while not self.stop:
                max_batch = max(self.o.batch_size, self.o.max_batch_size or self.o.batch_size)
                t0 = time.perf_counter()
                recs = consumer.poll(timeout_ms=50 if self.buffer else 200,
                                     max_records=max(max_batch - len(self.buffer), 1))
                while recs:
                    for tp, rs in recs.items():
                        for r in rs:
                            self.buffer.append((tp.partition, r.offset, r.value))
                    self.last_record = time.monotonic()
                    # top up from what the fetcher already holds (no waiting): with a backlog one
                    # poll returns one fetch's worth, and full-size batches learn more samples/s
                    recs = (consumer.poll(timeout_ms=0, max_records=max_batch - len(self.buffer))
                            if len(self.buffer) < max_batch else None)
                now = time.monotonic()
                self.loop_time["poll_s"] += time.perf_counter() - t0
                if self.buffer and first_wait is None:
                    first_wait = now
                full = len(self.buffer) >= self.o.batch_size
                waited = first_wait is not None and (now - first_wait) * 1000 >= self.o.max_wait_ms
                if self.o.max_samples is not None:
                    left = self.o.max_samples - learned_here
                    full = full or (0 < left <= len(self.buffer))
                if self.buffer and (full or waited):
                    # behind the stream (a backlog): bigger batches, more samples/s on CPU
                    n = min(max(self.o.batch_size, len(self.buffer)), max_batch)
                    if self.o.max_samples is not None:
                        n = min(n, self.o.max_samples - learned_here)
                    t0 = time.perf_counter()
                    samples, consumed = self._take_batch(lr, n)
                    self.loop_time["decode_s"] += time.perf_counter() - t0
                    first_wait = now if self.buffer else None
                    if samples:
                        if learned_here == 0:  # rate from the first batch (not the group join)
                            t_start = time.monotonic()
                        preds, parts = lr.step(samples)
                        t0 = time.perf_counter()
                        pq.add(preds)
                        learned_here += len(samples)
                        self.batch_sizes.append(len(samples))
                        self.prom.samples.inc(len(samples))
                        self.prom.steps.inc()
                        for k, v in parts.items():
                            self.prom.loss.labels(k).set(v)
                        self.loop_time["metrics_s"] += time.perf_counter() - t0
                    self._advance(consumed)
                    if samples:
                        self.progress.append([round(time.time(), 3), dict(self.offsets)])
                now = time.monotonic()
                if now - last_metrics >= self.o.metrics_every_s and pq.total:
                    t0 = time.perf_counter()
                    summary = self._emit(lr, pq, parts, jsonl, learned_here / max(now - t_start, 1e-9))
                    self.loop_time["metrics_s"] += time.perf_counter() - t0
                    last_metrics = now
                due_steps = self.o.checkpoint_every_steps and lr.step_no - max(self.last_ckpt_step, 0) >= self.o.checkpoint_every_steps
                due_time = self.o.checkpoint_every_s and now - self.last_ckpt_time >= self.o.checkpoint_every_s
                if (due_steps or due_time) and lr.learned_since_ckpt:
                    self.checkpoint(lr, summary)
                if self.o.max_samples is not None and learned_here >= self.o.max_samples:
                    break
                if self.o.exit_when_idle_s is not None and not self.buffer and self.assigned_at is not None:
                    if now - max(self.last_record, self.assigned_at) >= self.o.exit_when_idle_s:
                        log.info("idle for %.1fs: exiting", self.o.exit_when_idle_s)
                        break
            rate = (lr.samples_learned - n_start) / max(time.monotonic() - t_start, 1e-9)
            summary = self._emit(lr, pq, parts, jsonl, rate) if pq.total else summary
            self.checkpoint(lr, summary)
        finally:
            consumer.close(autocommit=False)
            if jsonl:
                jsonl.close()
        return {"samples_learned": lr.samples_learned, "learned_this_run": learned_here, "step": lr.step_no,
                "offsets": self.offsets, "metrics": summary, "samples_per_s": round(rate, 1),
                "items": len(lr.vocab.items) - 2, "users": len(lr.vocab.users) - 2}

    def _emit(self, lr: OnlineLearner, pq: Prequential, parts: dict, jsonl, rate: float) -> dict:
        s = pq.summary()
        sizes, self.batch_sizes = self.batch_sizes, []
        rec = {"ts": time.time(), "step": lr.step_no, "samples_learned": lr.samples_learned,
               "mean_batch": round(sum(sizes) / len(sizes), 1) if sizes else None,  # grows under a backlog
               "trained_through_ts": lr.trained_through_ts, "samples_per_s": round(rate, 1), "loss": parts,
               "windows": s, "items": len(lr.vocab.items) - 2, "users": len(lr.vocab.users) - 2,
               "grow_events": lr.grow_events,
               "time_s": {k: round(v, 3) for k, v in (lr.timing | self.loop_time).items()}}
        for w, m in s.items():
            for k, v in m.items():
                if isinstance(v, float) and not math.isnan(v):
                    self.prom.window.labels(k, w).set(v)
        self.prom.rate.set(rate)
        self.prom.items.labels("items").set(len(lr.vocab.items) - 2)
        self.prom.items.labels("users").set(len(lr.vocab.users) - 2)
        self.prom.through.set(lr.trained_through_ts)
        if jsonl:
            jsonl.write(json.dumps(rec, default=float) + "\n")
            jsonl.flush()
        log.info("step %d learned %d (%.0f/s) %s", lr.step_no, lr.samples_learned, rate,
                 " ".join(f"{k}={v:.4f}" for k, v in s[f"w{self.o.windows[0]}"].items()
                          if isinstance(v, float)))
        return rec


def run_trainer(opts: TrainerOptions) -> dict:
    return StreamTrainer(opts).run()
