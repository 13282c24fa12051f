"""The exporter's gate decision (exporter.export.gate): a paired test over per-request metrics that
refuses a candidate confidently worse than serving, and says when more requests could not change
its decision (the sequential gate stops there)."""

import random

from exporter.export import GATE_Z, gate


def _metrics(hits, aucs):
    mean = lambda xs: sum(x for x in xs if x is not None) / max(1, sum(x is not None for x in xs))  # noqa: E731
    return {"hr@10": mean(hits), "gauc": mean(aucs), "per_request": {"hr@10": hits, "gauc": aucs}}


def test_same_rankings_settle_at_once_and_pass():
    rng = random.Random(0)
    hits = [float(rng.random() < 0.3) for _ in range(128)]
    aucs = [rng.random() for _ in range(128)]
    ok, settled, notes = gate(_metrics(hits, aucs), _metrics(hits, aucs), 0.02)
    assert ok and settled, notes


def test_noisy_but_equal_candidate_is_not_settled_on_few_requests_and_passes():
    a, b = [1.0, 0.0] * 20, [0.0, 1.0] * 20  # same HR@10, different requests hit
    auc = [0.7] * 40
    ok, settled, notes = gate(_metrics(a, auc), _metrics(b, auc), 0.02)
    assert ok and not settled, notes  # ±z·SE is far wider than the tolerance: look at more requests


def test_confidently_worse_candidate_is_refused_and_settled():
    rng = random.Random(2)
    serving = [float(rng.random() < 0.6) for _ in range(128)]
    worse = [0.0 if h and rng.random() < 0.8 else h for h in serving]
    auc = [0.7] * 128
    ok, settled, notes = gate(_metrics(worse, auc), _metrics(serving, auc), 0.02)
    assert not ok and settled
    assert any("worse by more than tolerance" in n for n in notes) and f"{GATE_Z:g}" in notes[0]


def test_nothing_serving_passes():
    assert gate({"hr@10": 0.1}, None, 0.02)[:2] == (True, True)
