"""The exporter's quality gate with real onnxruntime sessions: a copy of the serving snapshot passes,
a re-initialised model is refused, and the serving side of the gate re-scores only the holdout
samples that are new since the serving snapshot's own gate (the rest come from its cache), with the
same figures as scoring everything again."""

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from exporter import export as ex  # noqa: E402
from exporter.runtime import OnnxRanker  # noqa: E402
from exporter.store import SnapshotStore  # noqa: E402
from exporter.synthetic import labelled_samples, make_checkpoint, make_model, make_users  # noqa: E402

N_ITEMS, N_USERS = 200, 60


def test_gate_accepts_a_copy_refuses_a_reinitialised_model_and_rescores_only_new_samples(tmp_path):
    store = SnapshotStore(str(tmp_path / "store"))
    base = make_model("tiny", num_items=N_ITEMS, num_users=N_USERS, seed=0)
    users = make_users(N_USERS, N_ITEMS, base.cfg.max_len, 50, seed=1)
    assert ex.export_checkpoint(make_checkpoint(base, 1), store, threads=1).version == 1
    v1 = OnnxRanker(tmp_path / "v1", store.fetch(1, tmp_path / "v1"), threads=1, want_cuda=False)
    holdout = labelled_samples(v1, users)  # v1's own top-1 clicked: HR@10 = GAUC = 1 for v1
    old, new = holdout[:40], holdout[40:]
    assert len(new) >= 5

    # v2: a copy of v1 gated on the first 40 samples (v1 scored in full: nothing cached for it yet)
    r2 = ex.export_checkpoint(make_checkpoint(base, 2, old), store, threads=1)
    assert r2.status == "published" and r2.version == 2, r2.report
    assert r2.report["gate"]["ok"] and r2.report["gate"]["serving"]["scored"] == len(old)

    # v3: a copy again, on a holdout that moved on by a few samples: v2 (serving) re-scores only those
    r3 = ex.export_checkpoint(make_checkpoint(base, 3, holdout), store, threads=1)
    assert r3.status == "published" and r3.version == 3, r3.report
    serving, cand = r3.report["gate"]["serving"], r3.report["gate"]["candidate"]
    assert serving["scored"] == len(new) and cand["scored"] == len(holdout)
    fresh = ex.holdout_metrics(v1, holdout)  # v2 = v1's weights: scoring all of it again agrees
    assert (serving["hr@10"], serving["gauc"]) == pytest.approx((fresh["hr@10"], fresh["gauc"]), abs=1e-12)
    assert fresh["hr@10"] == 1.0 and fresh["gauc"] > 0.9

    # a re-initialised model (same shapes, new random weights) is refused and never published
    bad = make_model("tiny", num_items=N_ITEMS, num_users=N_USERS, seed=99)
    r4 = ex.export_checkpoint(make_checkpoint(bad, 4, holdout), store, threads=1)
    assert r4.status == "gate_failed" and r4.version is None, r4.report
    assert "worse by more than tolerance" in " ".join(r4.report["gate"]["notes"])
    assert store.versions()[-1] == 3 and store.current()["version"] == 3
