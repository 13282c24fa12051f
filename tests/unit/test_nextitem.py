"""The next-item protocol: leave-last-out split without leakage, metrics on hand-computed examples
(ties count against the target), and an end-to-end run where learned models must beat popularity."""

import math

import numpy as np
import pytest
import torch

from streaming.replay.datasets import load_file
from trainer.metrics import rank_metrics
from trainer.nextitem import nextitem_main
from trainer.nextitem_data import collate_eval, collate_windows, split_interactions, training_windows
from trainer.nextitem_metrics import full_corpus_ranks, sample_negatives_for_users, sampled_ranks


def write_csv(path, n_users=60, n_items=40, length=14, seed=0):
    """Item i is always followed by item i+1 (mod n_items); each user starts somewhere at random."""
    rng = np.random.default_rng(seed)
    lines = ["user_id,item_id,timestamp"]
    for u in range(n_users):
        start = int(rng.integers(n_items))
        n = length + int(rng.integers(-3, 4))
        for k in range(n):
            lines.append(f"u{u},m{(start + k) % n_items:03d},{1000 * u + 10 * k}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def split(tmp_path):
    return split_interactions(load_file(write_csv(tmp_path / "seq.csv")))


def test_split_is_leave_last_out_in_time_order(tmp_path):
    p = tmp_path / "s.csv"
    # rows out of time order; user b has only 2 interactions (training only)
    p.write_text("user_id,item_id,timestamp\na,x,30\na,y,10\na,z,20\na,w,40\nb,x,5\nb,y,6\n")
    s = split_interactions(load_file(p))
    a = s.users.get("a")
    i = s.user.index(a)
    names = [s.items.keys[k] for k in s.seqs[i]]
    assert names == ["y", "z", "x", "w"]
    assert [s.items.keys[k] for k in s.train_seq(i)] == ["y", "z"]
    hist, _, tgt = s.eval_input(i, "valid")
    assert [s.items.keys[k] for k in hist] == ["y", "z"] and s.items.keys[tgt] == "x"
    hist, _, tgt = s.eval_input(i, "test")
    assert [s.items.keys[k] for k in hist] == ["y", "z", "x"] and s.items.keys[tgt] == "w"
    assert s.eval_rows() == [i]


@pytest.mark.parametrize("max_len,stride", [(5, None), (5, 2), (5, 1), (50, None)])
def test_no_leakage_and_every_training_target_once(split, max_len, stride):
    windows = training_windows(split, max_len, stride)
    b = collate_windows(split, windows, max_len, n_targets=2)
    seen_targets: dict[int, list[int]] = {}
    for k, w in enumerate(windows):
        s = split.seqs[w.row]
        test_item, valid_item = s[-1], s[-2]
        inputs = b["items"][k][b["items"][k] > 0].tolist()
        assert inputs == split.train_seq(w.row)[w.a:w.b]
        # the held-out items sit at the end of the sequence: positions len-2, len-1 never appear
        assert w.b <= len(s) - 3
        tg = b["targets"][k][b["pos_valid"][k]]  # [P, 3, n_t]
        seen_targets.setdefault(w.row, []).extend(tg[:, 1, 0].tolist())
        assert test_item not in inputs and valid_item not in inputs  # the synthetic items never repeat
        assert test_item not in tg.flatten().tolist() and valid_item not in tg.flatten().tolist()
        # the query at each position reads exactly the tokens before its target
        for p in range(int(b["pos_valid"][k].sum())):
            pos = int(b["pos"][k, p])
            assert b["items"][k, pos - 1] == split.train_seq(w.row)[w.c + p]
            assert tg[p, 1, 0] == split.train_seq(w.row)[w.c + p + 1]
    for r, tg in seen_targets.items():  # every training target once per epoch, in order
        assert sorted(tg) == sorted(split.train_seq(r)[1:])
    if stride == 1:  # one prefix per target, read with all of its last max_len tokens
        assert all(w.b - w.c == 1 and w.b - w.a == min(w.b, max_len) for w in windows)


def test_eval_batches_exclude_earlier_items_but_never_the_target(split):
    rows = split.eval_rows()
    for which in ("valid", "test"):
        b = collate_eval(split, rows, 8, which)
        for k, r in enumerate(rows):
            hist, _, tgt = split.eval_input(r, which)
            assert int(b["target"][k]) == tgt and not b["excluded"][k, tgt]
            assert b["excluded"][k, hist].all() and b["excluded"][k, :2].all()
            assert int(b["excluded"][k].sum()) == len(set(hist) - {tgt}) + 2
            if which == "valid":
                assert split.seqs[r][-1] not in b["items"][k].tolist()


def test_full_corpus_ranks_hand_computed_with_ties_against_the_target():
    scores = torch.tensor([[0., 0., 5., 3., 4., 1.],
                           [0., 0., 1., 1., 1., 1.],
                           [0., 0., 9., 2., 1., 0.]])
    target = torch.tensor([3, 4, 2])
    excl = torch.zeros(3, 6, dtype=torch.bool)
    excl[:, :2] = True
    excl[0, 2] = True  # item 2 (score 5) is an earlier item of user 0
    ranks = full_corpus_ranks(scores, target, excl)
    # user 0: only item 4 (4 > 3) ranks above; user 1: 3 ties ahead; user 2: best
    assert ranks.tolist() == [1, 3, 0]
    m = rank_metrics(ranks, hr_ks=(1, 2), ndcg_ks=(2,))
    assert m["hr@1"] == pytest.approx(1 / 3) and m["hr@2"] == pytest.approx(2 / 3)
    assert m["ndcg@2"] == pytest.approx((1 / math.log2(3) + 1.0) / 3)
    assert m["mrr"] == pytest.approx((1 / 2 + 1 / 4 + 1) / 3)


def test_constant_scores_get_no_hits():
    scores = torch.zeros(4, 30)
    excl = torch.zeros(4, 30, dtype=torch.bool)
    excl[:, :2] = True
    ranks = full_corpus_ranks(scores, torch.tensor([2, 10, 20, 29]), excl)
    assert (ranks == 27).all()
    assert rank_metrics(ranks)["hr@10"] == 0.0


def test_sampled_negatives_exclude_interacted_and_rank_ties_against_target():
    neg = sample_negatives_for_users([{2, 3, 4}, {5}], 2, 120, m=100, seed=1)
    assert neg.shape == (2, 100)
    assert not set(neg[0].tolist()) & {0, 1, 2, 3, 4} and 5 not in neg[1].tolist()
    assert all(len(set(r.tolist())) == 100 for r in neg)
    scores = torch.arange(120, dtype=torch.float).unsqueeze(0).repeat(2, 1)
    scores[1, 50] = scores[1, 60]  # a tie with the target
    r = sampled_ranks(scores, torch.tensor([119, 60]), torch.tensor([[10, 20, 30], [50, 70, 5]]))
    assert r.tolist() == [0, 2]
    with pytest.raises(ValueError):
        sample_negatives_for_users([set(range(2, 110))], 2, 120, m=100)


def test_end_to_end_learned_models_beat_popularity_on_sequential_data(tmp_path):
    csv = write_csv(tmp_path / "chain.csv", n_users=100, n_items=130, length=14)
    res = nextitem_main(dataset=str(csv), models="popularity,sasrec,oneranker-gen-only", preset="tiny",
                        epochs=20, patience=20, threads=1, show=False, out=str(tmp_path / "r.json"),
                        lr=1e-2, max_len=8, batch_size=16)
    m = res["models"]
    pop = m["popularity"]["hr@10"]
    assert pop < 0.5
    for name in ("sasrec", "oneranker-gen-only"):
        assert m[name]["hr@10"] > pop + 0.3, (name, m[name]["hr@10"], pop)
        assert m[name]["best_epoch"] >= 1 and m[name]["train_seconds"] >= 0
    assert {"hr@1", "hr@5", "hr@50", "ndcg@10", "ndcg@50", "s100_hr@10", "s100_ndcg@10"} <= m["sasrec"].keys()
    assert (tmp_path / "r.json").exists()


def test_cli_runs_the_next_item_protocol(tmp_path):
    from typer.testing import CliRunner

    from oneranker.cli import app
    from trainer.evaluate import main

    help_text = CliRunner().invoke(app, ["evaluate", "--help"], terminal_width=200).output
    assert "--protocol" in help_text and "next-item" in help_text
    csv = write_csv(tmp_path / "c.csv", n_users=30, n_items=130, length=8)
    out = tmp_path / "n.json"
    main(["--protocol", "next-item", "--dataset", str(csv), "--models", "popularity,sasrec", "--preset", "tiny",
          "--epochs", "1", "--seeds", "0,1", "--threads", "1", "--out", str(out)])
    import json

    res = json.loads(out.read_text())
    assert res["protocol"] == "next-item" and res["summary"]["seeds"] == [0, 1]
    assert set(res["summary"]["models"]) == {"popularity", "sasrec"}
    assert res["summary"]["models"]["sasrec"]["hr@10"]["n"] == 2


def test_position_subsampling_keeps_targets_aligned_and_state_loss_runs(split):
    from trainer.losses import state_loss
    from trainer.model.config import preset
    from trainer.model.oneranker import OneRanker
    from trainer.nextitem import oneranker_step_loss, subsample_positions

    windows = training_windows(split, 8)
    b = collate_windows(split, windows[:6], 8)
    sub = subsample_positions(b, 3, torch.Generator().manual_seed(0))
    assert sub["pos"].shape == (6, 3) and sub["targets"].shape == (6, 3, 3, 1)
    for k in range(6):
        pairs = {(int(p), int(t)) for p, t, v in zip(b["pos"][k], b["targets"][k, :, 1, 0], b["pos_valid"][k]) if v}
        got = {(int(p), int(t)) for p, t, v in zip(sub["pos"][k], sub["targets"][k, :, 1, 0], sub["pos_valid"][k]) if v}
        assert got <= pairs and len(got) == min(3, len(pairs))
    cfg = preset("tiny", num_items=split.num_items, num_users=len(split.users), n_targets=1, num_negatives=0,
                 train_positions=3, state_weight=1.0, use_step3=False, use_dc_loss=False)
    model = OneRanker(cfg)
    log_q = torch.zeros(split.num_items)
    loss = oneranker_step_loss(model, b, cfg, log_q, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and model.item_table.grad is not None
    out = model(b["user"], b["items"], b["actions"], b["times"], b["pos"], b["device"])
    s = state_loss(model, out["h1"], b["pos"], b["targets"][:, :, 1] * b["pos_valid"].unsqueeze(-1), log_q, 0)
    assert abs(float(s) - math.log(split.num_items - 2)) < 1.0  # ≈ uniform at initialisation
