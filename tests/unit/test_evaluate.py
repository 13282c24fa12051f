"""Data plumbing (id maps, histories as of the request, collation) and an evaluate smoke run."""

import json

import pytest
import torch

from features.tokens import Action, TokenSequence
from streaming.replay.adlayer import load_requests
from trainer.batching import collate_chunks, collate_heldout
from trainer.data import IdMap, build_streams, chunk_streams, collate_histories, last_position, request_tokens
from trainer.evaluate import evaluate_main


def test_idmap_reserves_pad_and_oov_and_round_trips():
    m = IdMap()
    assert m.get_or_add("a") == 2 and m.get_or_add("b") == 3 and m.get_or_add("a") == 2
    assert m.get("zzz") == 1 and len(m) == 4
    m2 = IdMap.from_dict(json.loads(json.dumps(m.to_dict())))
    assert m2.to_dict() == {"a": 2, "b": 3} and m2.get_or_add("c") == 4


def test_histories_are_left_padded_and_relative_in_time():
    items, actions, times = collate_histories([([5, 6], [2, 3], [100, 160]), ([], [], [])], max_len=4)
    assert items.tolist() == [[0, 0, 5, 6], [0, 0, 0, 0]]
    assert times[0].tolist() == [0, 0, -60, 0]
    assert last_position(items).tolist() == [[4], [0]]


def test_heldout_history_is_tokensequence_as_of_the_request_and_training_never_sees_it():
    reqs, cat = load_requests("synthetic", limit=600)
    items, users = IdMap(), IdMap()
    streams, held = build_streams(reqs, cat, items, users)
    by_user = {}
    for r in sorted(reqs, key=lambda r: (r.ts, r.request_id)):
        by_user.setdefault(r.user_id, []).append(r)
    for u, hist, q, seen in held[:20]:
        uid = users.keys[u]
        seq = TokenSequence(max_len=10**9)
        for r in by_user[uid]:  # every event of the user, even after the request
            for a, act, t in request_tokens(r):
                seq.append(a, act, t)
        assert hist.to_dict() == seq.as_of(q.ts).to_dict()
        assert all(t < q.ts for t in hist.event_times)
    # a training query's history length is exactly len(TokenSequence.as_of(ts))
    st = streams[0]
    seq = TokenSequence(st_items := [str(i) for i in st.items], st.actions, st.times, 10**9)
    for q in st.queries:
        assert q.n_hist == len(seq.as_of(q.ts))
    # the held-out request is not a training query
    held_ts = {(u, q.ts) for u, _, q, _ in held}
    assert not any((s.user, q.ts) in held_ts and q.n_hist >= len(s.items) and False for s in streams for q in s.queries)
    n_train = sum(len(s.queries) for s in streams)
    assert n_train + len(held) == len(reqs)


def test_chunks_give_every_query_to_one_window_with_its_recent_history():
    reqs, cat = load_requests("synthetic", limit=800)
    streams, _ = build_streams(reqs, cat, IdMap(), IdMap())
    chunks = chunk_streams(streams, max_len=8)
    assert sum(len(c.queries) for c in chunks) == sum(len(s.queries) for s in streams)
    for c in chunks:
        assert c.end - c.start <= 8
        for q in c.queries:
            assert c.start <= q.n_hist <= c.end
            assert q.n_hist - c.start >= min(q.n_hist, 4)  # at least max_len - stride tokens of context
    b = collate_chunks(chunks[:5], 8, n_positions=3)
    assert b["pos"].shape[1] <= 3 and (b["pos"] <= 8).all()
    # the position's token is the newest history token before the request
    c, p = chunks[0], 0
    q = c.queries[p] if len(c.queries) <= 3 else None
    if q is not None and q.n_hist > c.start:
        tok = b["items"][0, b["pos"][0, 0] - 1]
        assert tok == c.stream.items[q.n_hist - 1]


def test_evaluate_main_smoke(tmp_path):
    out = tmp_path / "eval.json"
    res = evaluate_main("synthetic", "popularity,sasrec,cascade,oneranker,oneranker-gen-only", "tiny", epochs=1,
                        device="cpu", out=str(out), seed=0, limit=600, show=False, batch_size=256)
    data = json.loads(out.read_text())
    assert set(data["models"]) == {"popularity", "sasrec", "cascade", "oneranker", "oneranker-gen-only"}
    r = data["models"]["oneranker"]
    for k in ("hr@1", "hr@5", "hr@10", "hr@50", "ndcg@10", "ndcg@50", "vndcg@10", "revenue@3", "gauc",
              "logloss", "train_seconds"):
        assert k in r
    assert 0 <= r["hr@10"] <= 1 and "overlap@10" in r["consistency"]
    assert "consistency" not in data["models"]["oneranker-gen-only"]
    # the harness's peak lr (chosen on the validation split) for every model unless --set lr overrides it
    from trainer.evaluate import EVAL_DEFAULTS
    assert data["models"]["sasrec"]["lr"] == r["lr"] == data["config"]["lr"] == EVAL_DEFAULTS["lr"]
    assert data["config"]["rank_retrieved"] == 20 and r["train_loss"]["list_cover"] >= 0
    assert data["config"]["popularity_feature"] is True and data["config"]["full_history_seen"] is True
    assert res["models"]["popularity"]["logloss"] is None


def test_valid_split_holds_out_the_second_to_last_request_and_never_trains_on_the_last(tmp_path):
    reqs, _ = load_requests("synthetic", limit=600)
    by_user = {}
    for r in sorted(reqs, key=lambda r: (r.ts, r.request_id)):
        by_user.setdefault(r.user_id, []).append(r)
    res = evaluate_main("synthetic", "popularity", "tiny", epochs=1, device="cpu", seed=0, limit=600, show=False,
                        split="valid")
    assert res["split"] == "valid"
    # every user with ≥ 3 requests is held out on its second-to-last one, and the last is gone
    assert res["n_heldout"] == sum(len(v) >= 3 for v in by_user.values())
    assert res["n_train_requests"] + res["n_heldout"] == len(reqs) - len(by_user)


def test_ranker_and_generator_are_clipped_separately():
    from trainer.evaluate import clip_groups
    from trainer.model.baselines import Cascade, SASRec
    from trainer.model.config import preset
    from trainer.model.oneranker import OneRanker

    cfg = preset("tiny", num_items=40, num_users=10)
    m = OneRanker(cfg)
    ranker, rest = clip_groups(m)
    assert {id(p) for p in ranker} == {id(p) for p in m.ranker.parameters()}
    assert len(ranker) + len(rest) == len(list(m.parameters()))
    assert len(clip_groups(OneRanker(cfg.replace(use_step3=False)))) == 1
    assert len(clip_groups(SASRec(cfg))) == 1 and len(clip_groups(Cascade(cfg))) == 2


def test_candidate_seen_flags_cover_the_whole_history_not_the_window():
    reqs, cat = load_requests("synthetic", limit=1500)
    items = IdMap()
    streams, held = build_streams(reqs, cat, items, IdMap())
    chunks = chunk_streams(streams, max_len=4)
    b = collate_chunks(chunks, 4)
    beyond = 0
    for r, c in enumerate(chunks):
        for p, q in enumerate(c.queries):
            want = [i in c.stream.items[:q.n_hist] for i in q.cand]
            assert b["cand_seen"][r, p, : len(q.cand)].tolist() == want
            beyond += sum(w and i not in c.stream.items[c.start:q.n_hist] for w, i in zip(want, q.cand))
    assert beyond > 0  # the flags do reach past the 4-token window
    hb = collate_heldout(held, items, 4, len(items))
    for r, (_, _, q, seen) in enumerate(held):
        assert hb["cand_seen"][r, 0, : len(q.cand)].tolist() == [i in seen for i in q.cand]


def test_bf16_autocast_path_trains_and_evaluates_on_cpu(tmp_path):
    """The CUDA run's reduced-precision training path (bf16 autocast), forced on CPU."""
    from trainer.evaluate import autocast

    cpu = torch.device("cpu")
    with autocast(cpu, True):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast(cpu):  # default: CUDA only
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    res = evaluate_main("synthetic", "sasrec,cascade,oneranker", "tiny", epochs=1, device="cpu", seed=0,
                        limit=600, show=False, batch_size=256, bf16=True)
    assert res["bf16"] is True
    for r in res["models"].values():
        assert all(torch.isfinite(torch.tensor(v)) for v in r["train_loss"].values())
        assert 0 <= r["hr@10"] <= 1 and 0 < r["vndcg@10"] <= 1


def test_several_seeds_give_a_mean_sd_summary_and_the_gain_per_seed(tmp_path):
    from trainer.evaluate import evaluate_seeds

    out = tmp_path / "eval.json"
    summary = evaluate_seeds([0, 1], out=str(out), dataset="synthetic", models="oneranker,oneranker-gen-only",
                             preset="tiny", epochs=1, device="cpu", limit=600, show=False, batch_size=256)
    runs = [json.loads((tmp_path / f"eval_seed{s}.json").read_text()) for s in (0, 1)]
    assert [r["seed"] for r in runs] == [0, 1] == summary["seeds"]
    v = [r["models"]["oneranker"]["vndcg@10"] for r in runs]
    assert summary["models"]["oneranker"]["vndcg@10"]["mean"] == pytest.approx(sum(v) / 2)
    gains = [r["models"]["oneranker"]["vndcg@10"] / r["models"]["oneranker-gen-only"]["vndcg@10"] - 1 for r in runs]
    assert summary["vndcg@10_gain_full_vs_gen_only"]["per_seed"] == pytest.approx(gains)
    assert json.loads(out.read_text())["summary"]["seeds"] == [0, 1]
