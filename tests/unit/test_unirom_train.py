"""UniROM auction helpers (GSP, ex-post regret) and a tiny run of every training stage and of the
offline harness's evaluation on the synthetic ad world."""

import numpy as np
import torch

from streaming.replay.adlayer import load_requests
from tests.unit.test_unirom_model import one_thread  # noqa: F401 - autouse fixture: one torch thread
from trainer.unirom_auction import expost_regret, gsp
from trainer.unirom_eval import evaluate, fit_unirom
from trainer.unirom_train import build_data, collate, drop_and_refill


def test_gsp_orders_by_ecpm_and_charges_the_next_ecpm():
    ctr = torch.tensor([[0.1, 0.2, 0.05, 0.3]])
    bids = torch.tensor([[2.0, 2.0, 10.0, 0.5]])  # eCPM 0.2, 0.4, 0.5, 0.15
    slots, pay = gsp(ctr, bids, torch.ones(1, 4, dtype=torch.bool), 2)
    assert slots.tolist() == [[2, 1]]
    torch.testing.assert_close(pay, torch.tensor([[0.4 / 0.05, 0.2 / 0.2]]))
    assert (pay <= bids.gather(1, slots)).all()


def _const_ctr(rows, slots):
    return torch.full(slots.shape, 0.1)


def test_regret_is_zero_for_second_price_and_positive_for_first_price():
    rng = np.random.default_rng(0)
    bids = torch.from_numpy(rng.lognormal(0, 0.5, (64, 8))).float()
    who = torch.arange(8).expand(64, -1)
    ones = torch.ones(8, dtype=torch.bool)

    def second(rows, b):  # one slot, constant pCTR: GSP = Vickrey, truthful bidding is optimal
        return gsp(torch.full_like(b, 0.1), b, ones.expand_as(b), 1)

    def first(rows, b):
        s, _ = gsp(torch.full_like(b, 0.1), b, ones.expand_as(b), 1)
        return s, b.gather(1, s)

    r2, u2 = expost_regret(second, _const_ctr, bids, who)
    r1, _ = expost_regret(first, _const_ctr, bids, who)
    assert float(r2.max()) < 1e-6 and float(u2.sum()) > 0
    assert float(r1.max()) > 1e-3


def test_drop_and_refill_takes_the_best_unplaced_ad():
    slots = torch.tensor([[3, 1, 4]])
    z = torch.zeros(1, 6, 3)
    z[0, 5, 2] = 5.0
    z[0, 3, 2] = 9.0  # placed already: not a refill
    assert drop_and_refill(slots, z).tolist() == [[[1, 4, 5], [3, 4, 5], [3, 1, 5]]]


def test_every_stage_runs_and_the_harness_reports_every_metric():
    requests, catalog = load_requests("synthetic", seed=0, limit=400)
    data = build_data(requests, catalog, max_len=10)
    data.held = data.held[:6]
    data.held_raw = data.held_raw[:6]
    b = collate(data.train[:4], data, 10, 5, np.random.default_rng(0))
    assert b["cand"].shape[1] == b["label"].shape[1] == max(len(r.exposed) for r in data.train[:4]) + 5
    tiny = dict(d_model=8, n_layers=1, n_clusters=4, head_hidden=(8,), batch_size=64, n_unexposed=5, max_len=10,
                n_slots=2)
    epochs = {"pretrain": 0.1, "evaluator": 0.1, "rlaf": 0.1, "payment": 0.1}
    model, info = fit_unirom(data, 0, epochs, log=lambda *_: None, **tiny)
    judge, _ = fit_unirom(data, 1, epochs, log=lambda *_: None, full=False, **tiny)
    assert {"pretrain", "evaluator", "rlaf", "payment"} <= info.keys()
    out = evaluate({"unirom": ("unirom", model), "unirom-no-aucformer": ("gsp", model)}, judge, data, 2,
                   log=lambda *_: None)
    for r in out.values():
        assert {"recall@50", "auc", "ectr", "erpm", "ic", "ir_violations"} <= r.keys()
        assert r["ir_violations"] == 0 and r["ic"] >= 0 and np.isfinite(r["erpm"])


def test_oneranker_evaluate_dispatches_auction_models_to_the_unirom_harness(monkeypatch):
    from typer.testing import CliRunner

    import trainer.unirom_eval as ue
    from oneranker.cli import app

    seen = {}
    monkeypatch.setattr(ue, "run", lambda *a, **kw: seen.update(args=a, kw=kw))
    r = CliRunner().invoke(app, ["evaluate", "--models", "mca,unirom,unirom-no-gcf,unirom-no-aucformer",
                                 "--limit", "500", "--seeds", "0,1", "--epochs", "2"])
    assert r.exit_code == 0, r.output
    assert seen["args"] == ("mca,unirom,unirom-no-gcf,unirom-no-aucformer", "movielens-100k", 500, "0,1")
    assert seen["kw"]["mca_epochs"] == 2
    r = CliRunner().invoke(app, ["evaluate", "--models", "mca,oneranker"])
    assert r.exit_code != 0 and "apart" in r.output
