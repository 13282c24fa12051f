"""`export --watch` logic: every newer checkpoint is exported and published; a refused one is not
retried; retention keeps the newest few."""

import contextlib
import threading

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from exporter.export import watch  # noqa: E402
from exporter.store import SnapshotStore  # noqa: E402
from exporter.synthetic import make_checkpoint, make_model  # noqa: E402
from oneranker.polling import wait_for  # noqa: E402
from trainer import checkpoint  # noqa: E402


@contextlib.contextmanager
def watching(ckdir, store, **kw):
    """``watch`` in a thread for the duration of the block; yields the list of its results."""
    results = []
    stop = threading.Event()
    t = threading.Thread(target=watch, args=(ckdir, store, stop, 0.2),
                         kwargs=dict(on_result=results.append, threads=1, **kw), daemon=True)
    t.start()
    try:
        yield results
    finally:
        stop.set()
        t.join(timeout=60)


def test_watch_exports_each_new_checkpoint(tmp_path):
    store = SnapshotStore(str(tmp_path / "store"))
    model = make_model("tiny", num_items=80, num_users=10)
    ckdir = tmp_path / "ckpt"
    checkpoint.save(ckdir, make_checkpoint(model, 1))
    announced = []
    with watching(ckdir, store, announce=announced.append, keep=1) as results:
        wait_for(lambda: len(results) >= 1, 120)
        checkpoint.save(ckdir, make_checkpoint(model, 2, noise=1e-7))
        wait_for(lambda: len(results) >= 2, 120)
    assert [(r.status, r.version) for r in results] == [("published", 1), ("published", 2)]
    assert [a["version"] for a in announced] == [1, 2] and announced[1]["url"].endswith("/v00000002")
    assert store.versions() == [2] and store.current()["version"] == 2  # keep=1
    assert store.manifest(2)["checkpoint_step"] == 2
    # idle, the exporter asked the trainer for its newest weights; the trainer takes the request once
    assert checkpoint.take_checkpoint_request(ckdir) and not checkpoint.take_checkpoint_request(ckdir)
    phases = results[1].report["phases_s"]
    assert {"load", "export", "session", "parity", "gate", "publish"} <= set(phases)


def test_an_untrained_checkpoint_warms_the_graph_and_a_catalog_sized_table_keeps_it(tmp_path):
    """The trainer's initial checkpoint is traced but never published; with the item table padded
    to the catalog's size, a later checkpoint whose ids filled more of it re-uses that trace."""
    store = SnapshotStore(str(tmp_path / "store"))
    ckdir = tmp_path / "ckpt"
    first = make_checkpoint(make_model("tiny", num_items=40, num_users=10), 0)
    first.extra["samples_learned"] = 0
    checkpoint.save(ckdir, first)
    with watching(ckdir, store, keep=2, min_item_rows=1500) as results:
        wait_for(lambda: len(results) >= 1, 180)
        assert [r.status for r in results] == ["warmed"] and store.versions() == []
        checkpoint.save(ckdir, make_checkpoint(make_model("tiny", num_items=1400, num_users=10), 1))
        wait_for(lambda: len(results) >= 2, 180)
    assert [r.status for r in results] == ["warmed", "published"]
    assert results[0].report["export"]["graph"] == "traced"
    assert results[1].report["export"]["graph"] == "reused"  # 1,400 ids, still inside the padded table
    assert store.manifest(1)["model"]["num_items"] == 2048
