"""A checkpoint with new weights but the same shapes re-uses the traced graph, and the re-used graph
still matches the torch inference function (the exporter's parity check is the safety net)."""

import numpy as np
import onnxruntime as ort
import torch

from exporter.graph_cache import GraphCache
from trainer.infer import example_inputs, rank_topk, seen_index
from trainer.model.config import preset
from trainer.model.oneranker import OneRanker


def run_both(model, path, cfg):
    args = example_inputs(cfg, 3, 12, torch.Generator().manual_seed(1))
    with torch.no_grad():  # the model's own corpus scores and the dense seen mask
        ids, scores = rank_topk(model.eval(), *args[:6], k=10, seen=args[6])
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    # the serving graph takes the eligible ads as candidates: an index list per row (0-padded)
    rows = [torch.nonzero(r[2:]).flatten() + 2 for r in args[5]]
    cand = torch.zeros(3, max(len(r) for r in rows), dtype=torch.int64)
    for b, r in enumerate(rows):
        cand[b, : len(r)] = r
    feed = {n: a.numpy() for n, a in zip(names, (*args[:5], cand, seen_index(args[6])))}
    o_ids, o_scores = sess.run(None, feed)
    return ids.numpy(), scores.numpy(), o_ids, o_scores


def test_same_shapes_reuse_the_trace_and_keep_parity(tmp_path):
    torch.manual_seed(0)
    cfg = preset("small", num_items=300, num_users=50, max_len=16)
    cache = GraphCache()
    first = OneRanker(cfg)
    assert cache.export(first, str(tmp_path / "a.onnx"), 10) == "traced"
    second = OneRanker(cfg)  # other weights, same shapes
    with torch.no_grad():
        second.item_table.mul_(3.0)
    assert cache.export(second, str(tmp_path / "b.onnx"), 10) == "reused"
    ids, scores, o_ids, o_scores = run_both(second, str(tmp_path / "b.onnx"), cfg)
    np.testing.assert_array_equal(ids, o_ids)
    assert np.abs(scores - o_scores).max() <= 1e-4
    # ... and the re-used graph really carries the new weights, not the template's.
    _, first_scores, _, _ = run_both(first, str(tmp_path / "a.onnx"), cfg)
    assert np.abs(first_scores - o_scores).max() > 1e-3
    bigger = OneRanker(preset("small", num_items=400, num_users=50, max_len=16))
    assert cache.export(bigger, str(tmp_path / "c.onnx"), 10) == "traced"
    assert (cache.traces, cache.reuses) == (2, 1)


def test_bucketed_tables_rank_exactly_like_the_original():
    from exporter.graph_cache import bucket, with_bucketed_tables

    assert (bucket(10), bucket(1024), bucket(1025), bucket(5000)) == (1024, 1024, 2048, 8192)
    torch.manual_seed(0)
    cfg = preset("small", num_items=700, num_users=40, max_len=16)
    model = OneRanker(cfg).eval()
    padded = with_bucketed_tables(model)
    assert (padded.cfg.num_items, padded.cfg.num_users) == (1024, 1024)
    user, items, actions, times, device, eligible, seen = example_inputs(cfg, 3, 12, torch.Generator().manual_seed(2))
    wide = torch.zeros(3, 1024, dtype=torch.bool)
    wide[:, :700] = eligible  # rows no ad id maps to are never eligible (the runtime's mask)
    wide_seen = torch.zeros(3, 1024, dtype=torch.bool)
    wide_seen[:, :700] = seen
    with torch.no_grad():
        a_ids, a_scores = rank_topk(model, user, items, actions, times, device, eligible, k=10, seen=seen)
        b_ids, b_scores = rank_topk(padded, user, items, actions, times, device, wide, k=10, seen=wide_seen)
    assert torch.equal(a_ids, b_ids)
    assert torch.allclose(a_scores, b_scores, atol=1e-5)
