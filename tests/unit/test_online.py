"""Online learner: growing tables with optimizer state, collation, prequential metrics, checkpoint
round trip (trimmed tables, resume equals continuing), learned-log reconciliation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streaming.samples import Sample, SampleAd, sample_id
from trainer import checkpoint as ck
from trainer.batching import collate_samples
from trainer.learned_log import append_learned, read_learned, reconcile_learned
from trainer.learner import OnlineLearner
from trainer.metrics import auc, gauc
from trainer.model.config import preset
from trainer.prequential import BatchPreds, Prequential, summarize
from trainer.vocab import Vocab, resize_rows


def make_samples(n: int, n_ads: int = 40, n_users: int = 12, seed: int = 0, prefix: str = "") -> list[Sample]:
    rng = np.random.default_rng(seed)
    hist: dict[str, list] = {}
    out = []
    for r in range(n):
        u = f"u{prefix}{rng.integers(n_users)}"
        ads = [f"a{prefix}{x}" for x in rng.choice(n_ads, 5, replace=False)]
        click = int(rng.integers(5))
        h = hist.setdefault(u, [])
        ts = 1_700_000_000_000 + 1000 * r
        sa = [SampleAd(i + 1, a, float(1 + i), int(i == click), int(i == click and r % 3 == 0),
                       10.0 if (i == click and r % 3 == 0) else 0.0) for i, a in enumerate(ads)]
        out.append(Sample(sample_id(u, f"r{prefix}{r}"), u, f"r{prefix}{r}", ts,
                          {"item_ids": [x for x, _, _ in h], "actions": [y for _, y, _ in h],
                           "event_times": [t for _, _, t in h]}, sa, {"device": "ios"}))
        h.append((ads[click], 2, ts + 10))
    return out


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(**kw):
    return preset("tiny", dropout=0.0, **kw)


def test_metrics_match_definitions():
    s = np.array([0.1, 0.4, 0.35, 0.8])
    y = np.array([0, 0, 1, 1])
    assert auc(s, y) == pytest.approx(0.75)
    assert auc(np.zeros(4), y) == pytest.approx(0.5)
    sc = np.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    lab = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert gauc(sc, lab, np.ones_like(sc, bool)) == pytest.approx(0.5)
    pq = Prequential(windows=(4, 8))
    for _ in range(5):
        pq.add(summarize_input := BatchPreds(
            sc, sc, lab, lab, np.ones_like(sc, bool), np.array([1.0, np.nan])))
    assert pq.n <= 8 + 2
    assert summarize(pq.window(4))["samples"] == 4
    assert summarize([summarize_input])["hr@10"] == 1.0


def test_collate_layout():
    ss = make_samples(6)
    v = Vocab()
    b = collate_samples(ss, v, max_len=4, n_targets=2, rng=np.random.default_rng(0), group=False)
    assert b["items"].shape == (6, 4) and b["cand"].shape == (6, 1, 5)
    assert b["pos"][0, 0] == 0  # first sample: no history → query at the user token
    last = ss[-1]
    if last.history["item_ids"]:
        assert b["pos"][-1, 0] == 4 and b["items"][-1, -1] == v.items.get(last.history["item_ids"][-1])
    clicked = [v.items.get(a.ad_id) for a in ss[0].ads if a.click]
    assert b["targets"][0, 0, 1, 0] == clicked[0]
    assert b["click"].sum() == 6
    for r, s in enumerate(ss):  # seen flags from the sample's whole history, not the max_len window
        assert b["cand_seen"][r, 0].tolist() == [a.ad_id in s.history["item_ids"] for a in s.ads]


@pytest.mark.parametrize("row_cost", [None, 0.5, 2.0, 50.0])
def test_grouped_rows_put_each_query_after_its_own_history(row_cost):
    ss = make_samples(64, n_users=3)
    v = Vocab()
    L = 8
    b = collate_samples(ss, v, max_len=L, n_targets=2, rng=np.random.default_rng(0), group=True, row_cost=row_cost)
    assert int(b["pos_valid"].sum()) == 64
    if row_cost is None or row_cost >= 50:  # rows are expensive: they are shared
        assert b["items"].shape[0] < 64
    assert sorted(b["order"][b["pos_valid"]].tolist()) == list(range(64))
    for r in range(b["items"].shape[0]):
        for p in range(b["pos"].shape[1]):
            if not b["pos_valid"][r, p]:
                continue
            s = ss[int(b["order"][r, p])]
            hist = s.history["item_ids"]
            pos = int(b["pos"][r, p])
            seen = [x for x in b["items"][r, :pos].tolist() if x > 0]  # tokens at 1..pos
            assert seen == [v.items.get(x) for x in hist[len(hist) - len(seen):]] if seen else True
            assert len(seen) == min(len(hist), L) or len(seen) >= L // 2
            assert b["cand"][r, p].tolist() == [v.items.get(a.ad_id) for a in s.ads]


def test_cheapest_row_plan_costs_no_more_than_fixed_sizes():
    from trainer.batching import plan_rows, plan_rows_cheapest

    ss = make_samples(200, n_users=5)
    cost = lambda rows, c: len(rows) * (c + max(len(m) for _, m in rows))  # noqa: E731
    for c in (0.5, 2.0, 8.0):
        best = plan_rows_cheapest(ss, 8, c)
        assert sorted(i for _, m in best for i, _ in m) == list(range(200))  # every sample once
        for size in (1, 2, 4, 8, 16):
            assert cost(best, c) <= cost(plan_rows(ss, 8, size), c)


def test_grow_keeps_rows_and_optimizer_state():
    lr = OnlineLearner(tiny(popularity_feature=True), min_capacity=16)
    ss = make_samples(40, n_ads=10, n_users=4)
    lr.step(ss[:20])
    w = lr.model.item_table.detach().clone()
    p_old = lr.model.backbone.embed.item.weight
    st = {k: v.clone() for k, v in lr.opt.state[p_old].items()}
    # many new ads → the item table must grow past 16 rows
    lr.step(make_samples(20, n_ads=60, n_users=4, seed=1, prefix="x"))
    p_new = lr.model.backbone.embed.item.weight
    assert p_new.shape[0] >= len(lr.vocab.items) > 16 and lr.grow_events >= 1
    assert lr.model.cfg.num_items == p_new.shape[0] and lr.model.step2.cfg.num_items == p_new.shape[0]
    assert p_old not in lr.opt.state and p_new in lr.opt.state
    assert any(p is p_new for g in lr.opt.param_groups for p in g["params"])
    assert lr.opt.state[p_new]["exp_avg"].shape == p_new.shape
    # the old rows were copied (the padding row never gets a gradient, so it is unchanged)
    assert torch.equal(lr.model.item_table[0].detach(), w[0])
    assert st["exp_avg"].shape[0] == 16
    assert lr.model.item_log_pop.shape[0] == p_new.shape[0]  # the click-share rows grew too
    lr.step(ss[20:])  # and training continues
    # Step 3's click-share feature follows the clicks learned before each step
    from trainer.model.oneranker import centred_log_share

    before = centred_log_share(lr.log_q(), p_new.shape[0])
    lr.step(ss[:5])
    assert torch.allclose(lr.model.item_log_pop, before) and lr.model.item_log_pop.abs().sum() > 0


def test_resize_rows_pads_state():
    m = torch.nn.Embedding(4, 3)
    opt = torch.optim.AdamW(m.parameters())
    m(torch.tensor([1, 2])).sum().backward()
    opt.step()
    old = m.weight.detach().clone()
    ea = opt.state[m.weight]["exp_avg"].clone()
    holder = torch.nn.Module()
    holder.e = m
    resize_rows(holder, opt, "e.weight", 8, 0.1)
    assert m.weight.shape == (8, 3) and torch.equal(m.weight[:4].detach(), old)
    assert torch.equal(opt.state[m.weight]["exp_avg"][:4], ea) and opt.state[m.weight]["exp_avg"][4:].abs().sum() == 0


def test_checkpoint_roundtrip_resume_equals_continue(tmp_path):
    torch.manual_seed(0)
    ss = make_samples(60)
    a = OnlineLearner(tiny(), min_capacity=16, centroid_every=0)
    for i in range(0, 30, 10):
        a.step(ss[i:i + 10])
    c = a.to_checkpoint({"t:0": 30}, {"m": 1})
    ck.save(tmp_path, c)
    # exporter view: trimmed tables, loadable by build_model
    got = ck.latest(tmp_path)
    assert got.model_config["num_items"] == len(a.vocab.items)
    model = ck.build_model(got)
    assert model.item_table.shape[0] == len(a.vocab.items)
    assert len(got.extra["recent_samples"]) == 30 and got.extra["catalog_bids"]
    b = OnlineLearner.from_checkpoint(got, min_capacity=16, centroid_every=0)
    assert b.model.item_table.shape == a.model.item_table.shape
    assert all(b.seen(s.sample_id) for s in ss[:30]) and not b.seen(ss[30].sample_id)
    for i in range(30, 60, 10):
        pa, _ = a.step(ss[i:i + 10])
        pb, _ = b.step(ss[i:i + 10])
        np.testing.assert_allclose(pa.ctr_logit, pb.ctr_logit, rtol=1e-4, atol=1e-5)
    ni, nu = len(a.vocab.items), len(a.vocab.users)
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        if "item" in ka:  # rows not admitted yet are untrained filler
            va, vb = va[:ni], vb[:ni]
        if "user" in ka:
            va, vb = va[:nu], vb[:nu]
        torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-5, msg=ka)


def test_learned_log_reconcile(tmp_path):
    log = tmp_path / "learned.tsv"
    append_learned(log, 5, ["a", "b"])
    append_learned(log, 9, ["c"])
    lr = OnlineLearner(tiny(), min_capacity=16)
    c = lr.to_checkpoint({}, {})
    c.step, c.extra["learned_ids"] = 5, ["a", "b"]
    reconcile_learned(log, c)  # step 9's lines belong to a lost checkpoint
    assert read_learned(log) == [(5, "a"), (5, "b")]
    c.step, c.extra["learned_ids"] = 7, ["d"]
    reconcile_learned(log, c)  # crash between checkpoint 7 and its log append
    assert [i for _, i in read_learned(log)] == ["a", "b", "d"]
    reconcile_learned(log, c)  # idempotent
    assert len(read_learned(log)) == 3
    with open(log, "a") as f:  # killed mid-append of checkpoint 7's ids: torn line
        f.write("7\td\n7\tpart")
    assert [i for _, i in read_learned(log)] == ["a", "b", "d", "d"]
    reconcile_learned(log, c)
    assert [i for _, i in read_learned(log)] == ["a", "b", "d"]


def test_prequential_improves_on_learnable_stream():
    """A stream whose click depends on the ad only: test-then-train AUC rises well above 0.5."""
    rng = np.random.default_rng(0)
    good = {f"a{i}" for i in range(10)}
    ss = []
    for r in range(1200):
        ads = [f"a{x}" for x in rng.choice(40, 6, replace=False)]
        sa = [SampleAd(i + 1, a, 1.0, int(a in good and rng.random() < 0.7), 0, 0.0) for i, a in enumerate(ads)]
        ss.append(Sample(f"s{r}", f"u{r % 7}", f"r{r}", r, {"item_ids": [], "actions": [], "event_times": []}, sa, {}))
    lr = OnlineLearner(tiny(lr=5e-3), min_capacity=64, lr_warmup=1, lr_floor=1.0)
    preds = [lr.step(ss[i:i + 32])[0] for i in range(0, len(ss), 32)]
    assert summarize(preds[-10:])["auc"] > 0.75


def test_bf16_autocast_step_runs_on_cpu():
    """The CUDA learner's bf16 autocast path, forced on CPU: forward, scoring and the update."""
    ss = make_samples(96)
    lr = OnlineLearner(tiny(full_history_seen=True), min_capacity=64)
    lr.amp = torch.autocast("cpu", dtype=torch.bfloat16)
    for i in range(0, 96, 32):
        preds, parts = lr.step(ss[i:i + 32])
    assert parts and all(np.isfinite(v) for v in parts.values())
    assert lr.samples_learned == 96 and np.isfinite(preds.score).all()


def test_prometheus_endpoint_serves_window_metrics():
    import urllib.request

    from trainer.stream_loop import _Metrics

    m = _Metrics(0)
    m.window.labels("auc", "w1000").set(0.61)
    m.samples.inc(5)
    body = urllib.request.urlopen(f"http://127.0.0.1:{m.port}/metrics", timeout=5).read().decode()
    assert 'oneranker_trainer_prequential{metric="auc",window="w1000"} 0.61' in body
    assert "oneranker_trainer_samples_total 5.0" in body


def test_keepup_summary_lag_and_verdict():
    """Lag = produced − learned at each trainer metrics line; keeps up = rate while backlogged above
    the arrival rate, and caught up soon after the replay ends."""
    from trainer.keepup import summarize_run

    produced_at = [100 + i / 1000 for i in range(10_000)]  # 1000 samples/s for 10 s
    split = {"forward_s": 1.0, "learn_s": 2.0, "compute_s": 3.0, "poll_s": 1.0}

    def run(learned):
        metrics = [{"ts": t, "samples_learned": n, "mean_batch": 64.0, "time_s": split} for t, n in learned]
        return summarize_run(1, 100.0, 110.0, produced_at, metrics, [(100.0, 1.5), (105.0, 2.5)], True, 10.0, "")

    fast = run([(102, 1000), (104, 3200), (106, 5400), (108, 7600), (110, 9800), (111, 10_000)])
    assert [x["lag"] for x in fast["series"]] == [1001, 801, 601, 401, 200, 0]
    assert fast["learn_per_s_backlogged"] == 1100.0 and fast["produce_per_s"] == 1000.0
    assert fast["lag_max"] == 1001 and fast["caught_up_after_replay_s"] == 1.0 and fast["keeps_up"]
    assert fast["time_split"] == {"forward": 0.25, "learn": 0.5, "poll": 0.25} and fast["load1_max"] == 2.5
    slow = run([(102, 1000), (104, 2800), (106, 4600), (108, 6400), (110, 8200), (112, 10_000)])
    assert slow["lag_max"] == 1800 and slow["learn_per_s_backlogged"] == 900.0 and not slow["keeps_up"]
