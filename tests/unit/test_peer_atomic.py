"""trainer/peer: our next-item split written as RecBole atomic files is the split RecBole's
leave-one-out reads back (RecBole's logic re-done in plain Python: CI has no .venv-recbole), ties
in the original timestamps keep our order, and `oneranker bench quality --help` works."""

import math

import pytest

import numpy as np
from typer.testing import CliRunner

from oneranker.cli import app
from streaming.replay.datasets import load_file
from trainer.nextitem_data import split_interactions
from trainer.peer.atomic import split_differences, write_atomic
# RecBole's order (``order: TO`` sorts by timestamp, stably), as the peer script reads it back
from trainer.peer.recbole_sasrec import history_by_user as recbole_view, read_inter as read_atomic
from trainer.peer.bench import our_config, recbole_budget


def write_csv(path, n_users=40, seed=0):
    """Users with 1..12 interactions over 30 items; coarse timestamps so many tie within a user."""
    rng = np.random.default_rng(seed)
    lines = ["user_id,item_id,timestamp"]
    for u in range(n_users):
        n = 1 + u % 12
        for _ in range(n):
            lines.append(f"u{u},m{int(rng.integers(30)):02d},{int(rng.integers(5))}")
    rng.shuffle(lines[1:])
    path.write_text("\n".join(lines) + "\n")
    return path


def leave_one_out(index: list, leave_one_num: int = 2) -> list[list]:
    """RecBole 1.2's Dataset._split_index_by_leave_one_out for one group → [train, valid, test]."""
    nxt = [[] for _ in range(leave_one_num + 1)]
    legal = min(leave_one_num, len(index) - 1)
    pr = len(index) - legal
    nxt[0].extend(index[:pr])
    for i in range(legal):
        nxt[-legal + i].append(index[pr])
        pr += 1
    return nxt


def test_atomic_files_reproduce_our_split(tmp_path):
    split = split_interactions(load_file(write_csv(tmp_path / "d.csv")))
    d = write_atomic(split, tmp_path / "atomic", "peer")
    seqs = recbole_view(d / "peer.inter")
    assert len(seqs) == len(split.seqs) and sum(map(len, seqs.values())) == sum(map(len, split.seqs))
    item = lambda tok: int(tok[1:])  # noqa: E731 - tokens are i<our item index>
    for r, seq in enumerate(split.seqs):
        got = [item(t) for t in seqs[f"u{split.user[r]}"]]
        assert got == seq  # the same items in the same order
        # General models (Pop): leave-one-out over the interactions.
        train, valid, test = leave_one_out(list(range(len(got))))
        # Sequential models (SASRec): over the n - 1 augmented prefixes (target = item k, k ≥ 1).
        s_train, s_valid, s_test = leave_one_out(list(range(1, len(got))))
        if len(seq) >= 3:
            for which, idx in (("valid", valid), ("test", test)):
                hist, _, target = split.eval_input(r, which)
                assert [got[idx[0]]] == [target] and got[:idx[0]] == hist
            assert [got[i] for i in train] == split.train_seq(r)
            if len(seq) >= 4:  # sequential: the same targets, and training targets = ours
                assert s_valid == valid and s_test == test
                assert [got[k] for k in s_train] == split.train_seq(r)[1:]
        else:
            assert r not in split.eval_rows()
    diff = split_differences(split)
    assert diff["users_n3"] == sum(len(s) == 3 for s in split.seqs) > 0
    import json
    info = json.loads((d / "users.json").read_text())
    assert info["eval_users"] == [f"u{split.user[r]}" for r in split.eval_rows()]


def test_ties_keep_our_order(tmp_path):
    p = tmp_path / "t.csv"
    # All of a's interactions share one timestamp except the last: our split keeps the data order.
    p.write_text("user_id,item_id,timestamp\na,z,5\na,x,5\na,y,5\na,w,9\nb,x,1\nb,y,1\nb,z,1\n")
    split = split_interactions(load_file(p))
    d = write_atomic(split, tmp_path / "atomic", "peer")
    rows = read_atomic(d / "peer.inter")
    for r, seq in enumerate(split.seqs):
        toks = rows[f"u{split.user[r]}"]
        assert [t for _, t in toks] == list(range(len(seq)))  # position timestamps: no ties left
        assert [int(i[1:]) for i, _ in sorted(toks, key=lambda x: x[1])] == seq
    # The original timestamps tied (RecBole could have ordered them its own way); ours is kept.
    a = split.user.index(split.users.get("a"))
    assert split.times[a][:3] == [5, 5, 5] and len(set(split.times[split.user.index(split.users.get("b"))])) == 1


@pytest.mark.parametrize("overrides", [{}, {"window_stride": 0, "batch_size": 16}])
def test_recbole_budget_matches_our_steps(tmp_path, overrides):
    split = split_interactions(load_file(write_csv(tmp_path / "d.csv", n_users=60)))
    cfg = our_config(split, "small", overrides)
    rb, budget = recbole_budget(split, cfg, 8, 3)
    assert rb["hidden_size"] == cfg.d_model and rb["MAX_ITEM_LIST_LENGTH"] == cfg.max_len
    assert rb["stopping_step"] == 2 and rb["epochs"] == 8 and rb["learning_rate"] == cfg.lr
    # RecBole's training rows = one per training target; the same number of steps per epoch as ours.
    assert budget["training_targets"] == sum(max(0, len(split.train_seq(i)) - 1) for i in range(len(split.seqs)))
    assert math.ceil(budget["training_targets"] / rb["train_batch_size"]) == budget["our_steps_per_epoch"]
    if cfg.window_stride == 1:  # one prefix per target, as RecBole: the same batch size
        assert budget["our_windows"] == budget["training_targets"] and rb["train_batch_size"] == min(cfg.batch_size, budget["training_targets"])
    else:  # disjoint windows: several targets per window, so RecBole's batch is larger
        assert budget["our_windows"] < budget["training_targets"] and rb["train_batch_size"] > cfg.batch_size


def test_bench_quality_help():
    result = CliRunner().invoke(app, ["bench", "quality", "--help"])
    assert result.exit_code == 0, result.output
    assert "--ours-from" in result.output and "RecBole" in result.output
