"""Our next-item split (trainer/nextitem_data.py) as RecBole atomic files.

``<dir>/<name>/<name>.inter`` holds ``user_id:token item_id:token timestamp:float``: every user's
interactions in OUR time order with timestamp = the interaction's position in that order (0, 1, …),
so RecBole's ordering (``order: TO``) cannot reorder ties, and its leave-one-out split
(``split: {LS: valid_and_test}``) takes each user's last item as test and the second-to-last as
validation: our split. The config written by recbole_sasrec.py filters nothing (no interval, no
k-core, no duplicate removal).

Where RecBole's leave-one-out differs from ours (only users with fewer than 4 interactions;
``split_differences`` counts them):

* sequential models (SASRec): RecBole's split runs over the n - 1 augmented prefixes of a user;
  with n = 3 it has 2 prefixes, keeps 1 for training (predict item 2 from item 1) and 1 for test, so
  the user has NO validation target and item 2 is a training target (ours: trained on nothing,
  validated on item 2, tested on item 3). n = 2: training-only in both. Test targets are the same.
* general models (Pop): RecBole splits the n interactions; with n = 2 it trains on item 1 and TESTS
  item 2 (ours: training-only, both items counted in popularity). n ≥ 3: the same as ours.

recbole_sasrec.py scores the test targets itself with OUR protocol on OUR evaluated users (those
with ≥ 3 interactions, in this file's ``users.json``), so the evaluated-user sets match exactly; the
remaining differences are the training data of the n = 2 (Pop) and n = 3 (SASRec) users.
"""

from __future__ import annotations

import json
from pathlib import Path

from trainer.nextitem_data import NextItemSplit


def split_differences(split: NextItemSplit) -> dict:
    """Users whose RecBole leave-one-out treatment differs from ours (see the module docstring)."""
    n = [len(s) for s in split.seqs]
    return {"users_n1": sum(x == 1 for x in n), "users_n2": sum(x == 2 for x in n),
            "users_n3": sum(x == 3 for x in n),
            "note": "n=2: RecBole Pop tests them, we do not (scored on our users only); "
                    "n=3: RecBole SASRec has no validation target for them and trains on it."}


def write_atomic(split: NextItemSplit, out_dir: str | Path, name: str = "peer") -> Path:
    """Write ``<out_dir>/<name>/<name>.inter`` (tokens: ``u<our user index>``, ``i<our item
    index>``) and ``users.json`` (our evaluated users, sizes, the split differences); returns the
    data dir (RecBole's ``data_path`` is its parent)."""
    d = Path(out_dir) / name
    d.mkdir(parents=True, exist_ok=True)
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for r, seq in enumerate(split.seqs):
        for k, it in enumerate(seq):
            lines.append(f"u{split.user[r]}\ti{it}\t{k}")
    (d / f"{name}.inter").write_text("\n".join(lines) + "\n")
    info = {"eval_users": [f"u{split.user[r]}" for r in split.eval_rows()],
            "n_users": len(split.seqs), "n_items": split.num_items - 2,
            "n_interactions": sum(len(s) for s in split.seqs), "differences": split_differences(split)}
    (d / "users.json").write_text(json.dumps(info))
    return d
