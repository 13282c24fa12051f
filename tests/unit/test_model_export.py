"""The serving graph (trainer/infer.py) exports to ONNX with dynamic batch/history and matches torch."""

import numpy as np
import pytest
import torch

from trainer.infer import ServingGraph, export_onnx, serving_inputs
from trainer.model.config import preset
from trainer.model.oneranker import OneRanker

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def test_small_preset_exports_and_matches_onnxruntime(tmp_path):
    torch.manual_seed(0)
    cfg = preset("small", num_items=300, num_users=50)
    m = OneRanker(cfg).eval()
    m.refresh_centroids()
    m.set_item_bids(torch.rand(cfg.num_items) + 0.5)
    path = str(tmp_path / "model.onnx")
    export_onnx(m, path, batch=2, seq_len=cfg.max_len)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert sess.get_providers() == ["CPUExecutionProvider"]
    shapes = {i.name: i.shape for i in sess.get_inputs()}
    assert tuple(shapes) == ("user", "items", "actions", "times", "device", "candidates", "seen_ids")
    assert all(not isinstance(s[0], int) for s in shapes.values())  # batch stayed dynamic (trap 1)
    graph = ServingGraph(m)
    for B, L, seed in ((3, cfg.max_len, 1), (1, 7, 2), (5, 20, 3)):  # other sizes than the example
        args = serving_inputs(cfg, B, L, torch.Generator().manual_seed(seed))
        with torch.no_grad():
            ids, scores = graph(*args)
        feeds = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)}
        o_ids, o_scores = sess.run(None, feeds)
        np.testing.assert_array_equal(o_ids, ids.numpy())
        assert np.abs(o_scores - scores.numpy()).max() <= 1e-4
