"""Exported snapshots rank exactly like the torch inference function (trainer.infer.rank_topk),
for the small preset (through the `oneranker export` CLI) and the paper preset (small corpus)."""

import json
import random

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from exporter.export import stage  # noqa: E402
from exporter.runtime import OnnxRanker  # noqa: E402
from exporter.store import SnapshotStore  # noqa: E402
from exporter.synthetic import make_checkpoint, make_model, make_users  # noqa: E402
from trainer import checkpoint  # noqa: E402
from trainer.infer import rank_topk  # noqa: E402


def _samples(users, num_items, seed=0):
    from streaming.samples import Sample, SampleAd, sample_id

    rng = random.Random(seed)
    out = []
    for j, (uid, seq) in enumerate(users.items()):
        ads = [f"a{rng.randrange(num_items - 2)}" for _ in range(8)]
        out.append(Sample(sample_id(uid, f"r{j}"), uid, f"r{j}", seq.event_times[-1] + 1, seq.to_dict(),
                          [SampleAd(p + 1, a, 1.0, click=int(p == 0)) for p, a in enumerate(dict.fromkeys(ads))],
                          {"device": "android"}).to_dict())
    return out


def _torch_vs_onnx(model, ranker, users, candidates=None):
    """Same features into rank_topk (torch) and the snapshot (onnxruntime)."""
    uids = list(users)
    feeds = ranker.encode([users[u] for u in uids], uids, [2] * len(uids),
                          [candidates] * len(uids) if candidates else None)
    # The snapshot's tables are padded to a power-of-two size; rows past the real ones are never
    # eligible, so the unpadded torch model sees the same request with the mask cut to its size.
    n_items = model.cfg.num_items
    # ``seen_ids`` = the whole given history's items (beyond max_len too) as an index list; torch
    # gets them as the dense mask, so the graph's index-list flag is checked against it
    seen = np.zeros((len(uids), ranker.num_items), dtype=bool)
    for b, row in enumerate(feeds["seen_ids"]):
        seen[b, row[row > 1]] = True
    eligible = ranker.eligibility_mask(feeds)
    assert not eligible[:, n_items:].any() and not seen[:, n_items:].any()
    for b, u in enumerate(uids):
        assert set(np.flatnonzero(seen[b]).tolist()) == set(ranker.items.lookup(users[u].item_ids)) - {0, 1}
    torch_feeds = {**feeds, "eligible": eligible[:, :n_items]}
    with torch.no_grad():
        names = ("user", "items", "actions", "times", "device", "eligible")
        t_ids, t_scores = rank_topk(model, *(torch.from_numpy(np.array(torch_feeds[n])) for n in names),
                                    k=ranker.top_k, seen=torch.from_numpy(seen[:, :n_items]))
    o_ids, o_scores = ranker.run(feeds)
    valid = t_scores.numpy() > -5e8
    assert np.abs(o_scores - t_scores.numpy())[valid].max() <= 1e-4
    # Same ids in the same order, except that two (numerically) tied scores may swap places.
    t_np = t_ids.numpy()
    for b, j in zip(*np.nonzero((o_ids != t_np) & valid)):
        row = t_scores[b].numpy()
        assert any(abs(row[j] - row[i]) <= 1e-5 for i in (j - 1, j + 1) if 0 <= i < row.shape[0]), (b, j)
        assert sorted(o_ids[b][valid[b]]) == sorted(t_np[b][valid[b]])
    # and the replica's per-request path gives the same top-10 as torch
    for b, u in enumerate(uids[:3]):
        got = ranker.rank(u, users[u], 10, candidates, device=2)
        want = [ranker.items.keys[int(i)] for i, ok in zip(t_ids[b, :10], valid[b, :10]) if ok]
        assert [a for a, _ in got] == want


def test_small_preset_cli_export_publishes_a_verified_snapshot(tmp_path):
    from oneranker.cli import app

    model = make_model("small", num_items=400, num_users=60, seed=1)
    users = make_users(60, 400, 4 * model.cfg.max_len, 24, seed=2)  # longer than Step 1 reads
    ckpt = make_checkpoint(model, 7, recent_samples=_samples(users, 400))
    checkpoint.save(tmp_path / "ckpt", ckpt)
    url = (tmp_path / "store").as_uri()
    runner = CliRunner()
    res = runner.invoke(app, ["export", "--checkpoint-dir", str(tmp_path / "ckpt"), "--store", url,
                              "--no-announce", "--json", str(tmp_path / "out.json")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out.json").read_text())[0]
    assert report["status"] == "published" and report["version"] == 1
    assert report["report"]["parity"]["ok"] and report["report"]["parity"]["rows"] >= 24
    store = SnapshotStore(url)
    m = store.manifest(1)
    assert m["checkpoint_step"] == 7 and m["trained_through"]["offsets"] == ckpt.offsets
    assert set(m["files"]) == {"model.onnx", "items.json", "users.json"}  # external_data=False
    assert m["metrics"]["holdout"]["n"] == 24 and store.current()["version"] == 1
    assert all(isinstance(d[0], str) for d in m["model"]["inputs"].values())  # dynamic batch
    ranker = OnnxRanker(tmp_path / "dl", store.fetch(1, tmp_path / "dl"), threads=1, want_cuda=False)
    # serving reads Feast's millisecond event times; the trainer learned on seconds: same unit here
    from trainer.batching import MS_PER_S

    uid, seq = next(iter(users.items()))
    tail = np.asarray(seq.event_times[-ranker.max_len:], np.float64)
    times = ranker.encode([seq], [uid], [2])["times"][0, -len(tail):]
    assert np.allclose(times, (tail - tail[-1]) / MS_PER_S, atol=1e-3)
    _torch_vs_onnx(model, ranker, users)
    _torch_vs_onnx(model, ranker, users, candidates=[f"a{i}" for i in range(0, 398, 7)])
    # the same checkpoint again: nothing to do
    res = runner.invoke(app, ["export", "--checkpoint-dir", str(tmp_path / "ckpt"), "--store", url, "--no-announce"])
    assert res.exit_code == 0 and "up_to_date" in res.output
    res = runner.invoke(app, ["snapshots", "list", "--store", url, "--json"])
    listing = json.loads(res.output)
    assert [s["version"] for s in listing["snapshots"]] == [1] and listing["snapshots"][0]["current"]


def test_paper_preset_parity_on_a_small_corpus(tmp_path):
    model = make_model("paper", num_items=600, num_users=40, seed=3)
    users = make_users(40, 600, model.cfg.max_len, 12, seed=4)
    ckpt = make_checkpoint(model, 1, recent_samples=_samples(users, 600))
    store = SnapshotStore(str(tmp_path / "store"))
    staged = stage(ckpt, store, threads=2)
    try:
        assert staged.result.status == "staged", staged.result.report
        p = staged.result.report["parity"]
        assert p["ok"] and p["topk_mismatch_rows"] == 0 and p["max_abs_diff"] <= 1e-4
        ranker = OnnxRanker(staged.dir, {**staged.manifest, "version": 0}, threads=2, want_cuda=False)
        assert ranker.top_k == 100 and ranker.max_len == 200
        _torch_vs_onnx(model, ranker, users)
    finally:
        staged.cleanup()


def test_a_snapshot_from_before_the_seen_input_still_serves(tmp_path):
    """Snapshots exported with the six older inputs (no ``seen``) load and rank as before."""
    from trainer.infer import ServingGraph, dynamic_shapes, example_inputs

    class SixInputs(ServingGraph):
        def forward(self, user, items, actions, times, device, eligible):
            return rank_topk(self.model, user, items, actions, times, device, eligible, self.k)

    model = make_model("small", num_items=300, num_users=40, seed=5)
    users = make_users(40, 300, model.cfg.max_len, 8, seed=6)
    staged = stage(make_checkpoint(model, 1, recent_samples=_samples(users, 300)),
                   SnapshotStore(str(tmp_path / "store")), threads=2)
    try:
        assert staged.result.status == "staged", staged.result.report
        onnx_model = next(staged.dir.glob("model.onnx"))
        padded = OnnxRanker(staged.dir, {**staged.manifest, "version": 0}, threads=1, want_cuda=False).num_items
        from exporter.graph_cache import with_bucketed_tables

        big = with_bucketed_tables(model)
        assert big.cfg.num_items == padded
        args = example_inputs(big.cfg, 2, big.cfg.max_len, torch.Generator().manual_seed(0))[:6]
        dyn = dynamic_shapes(big.cfg.max_len)
        torch.onnx.export(SixInputs(big.eval(), 10).eval(), args, dynamo=True,
                          dynamic_shapes=dyn[:5] + (dyn[4],), external_data=False).save(str(onnx_model))
        ranker = OnnxRanker(staged.dir, {**staged.manifest, "version": 0}, threads=1, want_cuda=False)
        assert tuple(ranker.input_names) == ("user", "items", "actions", "times", "device", "eligible")
        uid = next(iter(users))
        got = ranker.rank(uid, users[uid], 10)
        feeds = ranker.encode([users[uid]], [uid], [0])
        with torch.no_grad():
            t_ids, _ = rank_topk(big, *(torch.from_numpy(feeds[n]) for n in ranker.input_names), k=10)
        assert [a for a, _ in got] == [ranker.items.keys[int(i)] for i in t_ids[0][:len(got)]] and got
    finally:
        staged.cleanup()


def test_first_checkpoint_with_a_tiny_vocabulary_passes_parity(tmp_path):
    """The trainer's first checkpoints know ~130 of the catalog's ads: the exported table is padded
    to the catalog's size with zero rows that all score the same. Parity's random probes must not
    make those rows eligible (serving never does): each side picked another subset of the tie, and
    the first learned snapshot of 2 in 3 `oneranker up` runs was refused for it."""
    for seed in range(3):
        model = make_model("small", num_items=130, num_users=20, seed=seed)
        users = make_users(12, 130, model.cfg.max_len, 8, seed=seed)
        ckpt = make_checkpoint(model, 1, recent_samples=_samples(users, 130))
        staged = stage(ckpt, SnapshotStore(str(tmp_path / f"store{seed}")), threads=1, min_item_rows=1684)
        try:
            assert staged.result.status == "staged", staged.result.report
        finally:
            staged.cleanup()


def test_int8_corpus_snapshot_ranks_like_exact_scoring(tmp_path):
    """corpus_bits=8: the corpus scan is onnxruntime's MatMulNBits over an int8 table (a quarter of
    the fp32 bytes) and the graph rescores each head's shortlist exactly, so the snapshot passes the
    exporter's parity against exact torch scoring and ranks probe users as the fp32 snapshot does."""
    import onnx

    from exporter.quantize import CORPUS_INPUT

    model = make_model("small", num_items=3000, num_users=50, seed=1)
    users = make_users(40, 3000, model.cfg.max_len, 30, seed=1)
    ckpt = make_checkpoint(model, 1, recent_samples=_samples(users, 3000))
    staged = {bits: stage(ckpt, SnapshotStore(str(tmp_path / f"store{bits}")), threads=1, corpus_bits=bits,
                          gate_tolerance=1.0) for bits in (32, 8)}
    try:
        for bits, st in staged.items():
            assert st.result.status == "staged", st.result.report
            assert st.manifest["model"]["corpus_bits"] == bits
        q = staged[8].manifest["model"]
        assert q["shortlist"] == 2 * model.cfg.retrieve_n
        proto = onnx.load(str(staged[8].dir / "model.onnx"))
        scans = [n.op_type for n in proto.graph.node if any(i.startswith(CORPUS_INPUT) for i in n.input)]
        assert scans == ["MatMulNBits"]
        quantized = staged[8].result.report["export"]["quantized"]
        assert quantized["quantized_bytes"] < 0.35 * quantized["table_bytes"]  # int8 + a scale per 32
        assert quantized["bias_fused"]  # the rows never served: in the scan itself, no pass of their own
        assert staged[8].result.report["parity"]["topk_mismatch_rows"] == 0
        uids = list(users)
        exact, fast = (st.ranker.run(st.ranker.encode([users[u] for u in uids], uids))[0] for st in staged.values())
        assert (exact[:, :20] == fast[:, :20]).all(axis=1).mean() >= 0.99
    finally:
        for st in staged.values():
            st.cleanup()
