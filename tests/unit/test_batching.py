"""The offline harness and the online trainer make the same batch and report the same metrics on the
same requests: the offline path (trainer.data.build_streams → trainer.batching.collate_chunks /
collate_heldout → trainer.evaluate.evaluate_model) and the online path (the samples the joiner emits
for those requests, trainer.replay_samples → trainer.batching.collate_samples →
trainer.learner.OnlineLearner → trainer.prequential.summarize)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from streaming.replay.adlayer import load_requests
from trainer.batching import collate_chunks, collate_heldout, collate_samples
from trainer.data import IdMap, build_streams, chunk_streams
from trainer.evaluate import evaluate_model
from trainer.learner import OnlineLearner
from trainer.model.config import preset
from trainer.prequential import summarize
from trainer.replay_samples import samples_from_requests
from trainer.vocab import Vocab

MAX_LEN = 64  # longer than every history here: both paths see each request's whole history


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world():
    """Synthetic requests on whole seconds (the offline tokens' times are whole seconds, the
    samples' milliseconds: whole seconds make both exact), their samples, and the offline split."""
    reqs, cat = load_requests("synthetic", seed=3, limit=400)
    for r in reqs:
        r.ts = float(math.floor(r.ts))
        r.clicks = [(a, float(math.ceil(t))) for a, t in r.clicks]
        r.conversions = [(a, float(math.ceil(t)), v) for a, t, v in r.conversions]
    items, users = IdMap(), IdMap()
    streams, held = build_streams(reqs, cat, items, users, n_targets=1)
    samples = samples_from_requests(reqs, history_len=10**6)
    key = {(users.keys[u], q.ts) for u, _, q, _ in held}
    base, start = min(r.ts for r in reqs), samples[0].ts
    held_samples = [s for s in samples if (s.user_id, base + (s.ts - start) / 1000.0) in key]
    assert len(held_samples) == len(held) > 20
    return reqs, cat, items, users, streams, held, samples, held_samples


def _views(batch: dict, items: IdMap, users: IdMap) -> dict:
    """Per query: what it sees and what it is labelled with, independent of how queries share rows —
    its visible tokens (item keys, actions, times relative to its newest visible token), candidates,
    labels, seen flags and own clicked target. Keyed by (user, candidates)."""
    out = {}
    B, P = batch["pos"].shape
    for b in range(B):
        for p in range(P):
            if "pos_valid" in batch and not batch["pos_valid"][b, p]:
                continue
            pos = int(batch["pos"][b, p])
            vis = slice(0, pos)  # tokens 1..pos of [user; items] = items[:pos]
            it = batch["items"][b, vis]
            keep = it > 0
            t = batch["times"][b, vis][keep]
            c = batch["cand"][b, p]
            cv = c > 0
            lab = lambda k: batch[k][b, p][cv] if batch[k].dim() == 3 else batch[k][b][cv]  # noqa: E731
            tgt = batch["targets"][b, p, 1, 0] if "targets" in batch else batch["target"][b]
            v = {"items": [items.keys[i] for i in it[keep].tolist()], "actions": batch["actions"][b, vis][keep].tolist(),
                 "dt": (t - t[-1]).tolist() if len(t) else [], "device": int(batch["device"][b, p]),
                 "click": lab("click").tolist(), "conv": lab("conv").tolist(), "value": lab("value"),
                 "cand_seen": batch["cand_seen"][b, p][cv].tolist(),
                 # the clicked target where the request has a click (offline, a request without one
                 # is trained towards the user's next click; online it has none: by design)
                 "target": items.keys[int(tgt)] if lab("click").any() else None}
            out[(users.keys[int(batch["user"][b])], tuple(items.keys[i] for i in c[cv].tolist()))] = v
    return out


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        va, vb = a[k], b[k]
        torch.testing.assert_close(va.pop("value").double(), vb.pop("value").double())
        assert va == vb, k


def test_offline_and_online_batches_agree_on_the_same_requests(world):
    reqs, cat, items, users, streams, held, samples, held_samples = world
    # held-out requests: the evaluation batch and the online batch with one row per sample are equal
    off = collate_heldout(held, items, MAX_LEN, len(items))
    on = collate_samples(held_samples, Vocab(items, users), MAX_LEN, 1, np.random.default_rng(0), group=False)
    assert len(items) == len(Vocab(items, users).items)  # nothing new admitted: the same ids
    order = {(int(u), tuple(c)): b for b, (u, c) in enumerate(zip(off["user"], off["cand"][:, 0].tolist()))}
    perm = [order[(int(u), tuple(c))] for u, c in zip(on["user"], on["cand"][:, 0].tolist())]
    for k in ("user", "items", "actions", "times", "pos", "device", "cand", "cand_seen"):
        assert torch.equal(on[k], off[k][perm]), k
    for k in ("click", "conv"):
        assert torch.equal(on[k][:, 0], off[k][perm]), k
    torch.testing.assert_close(on["value"][:, 0], off["value"][perm].float())
    assert torch.equal(on["targets"][:, 0, 1, 0], off["target"][perm])
    # training requests: every query sees the same tokens and labels, however rows are shared
    train_samples = [s for s in samples if s not in held_samples]
    chunks = chunk_streams(streams, MAX_LEN)
    offline = _views(collate_chunks(chunks, MAX_LEN), items, users)
    online = _views(collate_samples(train_samples, Vocab(items, users), MAX_LEN, 1, np.random.default_rng(0),
                                    row_cost=2.0), items, users)
    assert len(offline) == len(train_samples)
    _same(offline, online)


def test_prequential_and_offline_metrics_agree_on_the_same_requests(world):
    reqs, cat, items, users, streams, held, samples, held_samples = world
    lr = OnlineLearner(preset("tiny", dropout=0.0), seed=0, group=False)
    lr.vocab = Vocab(items, users, min_capacity=lr.vocab.min_capacity)
    preds, _ = lr.step(held_samples, learn=False)  # scores before learning: the prequential record
    online = summarize([preds])
    hb = collate_heldout(held, items, lr.cfg.max_len, lr.model.item_table.shape[0])
    offline = evaluate_model(lr.model, [hb], torch.device("cpu"))
    for k in ("gauc", "vndcg@10", "logloss"):
        assert math.isfinite(online[k])
        assert online[k] == pytest.approx(offline[k], abs=1e-5), k
