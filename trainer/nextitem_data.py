"""Data of the next-item protocol (trainer/nextitem.py): leave-last-out split and batches.

Each user's interactions in time order: the last item is the test target, the second-to-last the
validation target, the rest is training. Training cuts a user's training sequence into windows of
at most ``max_len`` input tokens and supervises every position of a window with the next item(s)
(all-position causal supervision, as SASRec and HSTU train). Windows end every ``stride`` tokens
from the end of the sequence backwards; a window supervises only the positions no later window
does, so every training target is learned exactly once per epoch and, when stride < max_len, with
at least max_len - stride tokens of context. Targets never reach past the training sequence, so the
validation and test items are never a training input nor a training target.

Batches use the layout of trainer/data.py ([user; items] left-padded, query positions ``pos`` in
1..L) so the same models train on them: every token is a click (action 2), no device context.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from features.tokens import Action
from trainer.data import IdMap, collate_histories, last_position


@dataclass
class NextItemSplit:
    items: IdMap
    users: IdMap
    user: list[int]  # user index per sequence
    seqs: list[list[int]]  # item indices in time order, the whole history
    times: list[list[int]]  # event times (s)

    @property
    def num_items(self) -> int:
        return len(self.items)

    def train_seq(self, i: int) -> list[int]:
        """The training part of sequence i: everything but the last two items (users with fewer
        than 3 interactions are training-only, as in SASRec's preprocessing)."""
        s = self.seqs[i]
        return s[:-2] if len(s) >= 3 else s

    def eval_rows(self) -> list[int]:
        return [i for i, s in enumerate(self.seqs) if len(s) >= 3]

    def eval_input(self, i: int, split: str) -> tuple[list[int], list[int], int]:
        """(history items, their times, target) of sequence i for split "valid" or "test":
        valid reads all but the last two and predicts the second-to-last; test reads all but the
        last and predicts the last."""
        s, t = self.seqs[i], self.times[i]
        cut = {"valid": len(s) - 2, "test": len(s) - 1}[split]
        return s[:cut], t[:cut], s[cut]

    def train_counts(self) -> torch.Tensor:
        """Interactions per item over the training sequences [num_items] (popularity)."""
        c = torch.zeros(self.num_items)
        for i in range(len(self.seqs)):
            c += torch.bincount(torch.tensor(self.train_seq(i), dtype=torch.long), minlength=self.num_items)[: self.num_items].float()
        return c


def split_interactions(inter) -> NextItemSplit:
    """streaming.replay.datasets.Interactions (sorted by time) → NextItemSplit. Items get indices
    in sorted id order (≥ 2), so the split does not depend on the data's row order."""
    items, users = IdMap(), IdMap()
    for it in sorted({str(x) for x in inter.item_id}):
        items.get_or_add(it)
    by_user: dict[str, tuple[list[int], list[int]]] = {}
    for u, it, ts in zip(inter.user_id, inter.item_id, inter.timestamp):
        s = by_user.setdefault(str(u), ([], []))
        s[0].append(items.get(str(it)))
        s[1].append(int(ts))
    out = NextItemSplit(items, users, [], [], [])
    for u in sorted(by_user):
        seq, ts = by_user[u]
        order = sorted(range(len(seq)), key=lambda k: ts[k])  # stable: ties keep the data's order
        out.user.append(users.get_or_add(u))
        out.seqs.append([seq[k] for k in order])
        out.times.append([ts[k] for k in order])
    return out


@dataclass
class Window:
    """Input tokens [a, b) of training sequence ``row``; positions i in [c, b) are supervised with
    the items after i."""

    row: int
    a: int
    b: int
    c: int


def training_windows(split: NextItemSplit, max_len: int, stride: int | None = None) -> list[Window]:
    stride = min(stride or max_len, max_len)
    out = []
    for r in range(len(split.seqs)):
        n = len(split.train_seq(r))
        if n < 2:
            continue
        ends = list(range(n - 1, 0, -stride))
        for k, b in enumerate(ends):
            a = max(0, b - max_len)
            c = a if k == len(ends) - 1 else b - stride
            out.append(Window(r, a, b, c))
    return out


def collate_windows(split: NextItemSplit, windows: list[Window], max_len: int,
                    n_targets: int = 1) -> dict[str, torch.Tensor]:
    """Training batch: every supervised position of each window with its next ``n_targets`` items
    (from the training sequence only) in every funnel stage (all tokens are clicks)."""
    hist, P = [], max(w.b - w.c for w in windows)
    B = len(windows)
    pos = np.zeros((B, P), np.int64)
    valid = np.zeros((B, P), bool)
    tg = np.zeros((B, P, n_targets), np.int64)
    for k, w in enumerate(windows):
        s, t = split.train_seq(w.row), split.times[w.row]
        hist.append((s[w.a:w.b], [int(Action.CLICK)] * (w.b - w.a), t[w.a:w.b]))
        off = max_len - (w.b - w.a)  # left padding
        for p, i in enumerate(range(w.c, w.b)):
            pos[k, p] = 1 + off + (i - w.a)
            valid[k, p] = True
            nxt = s[i + 1:i + 1 + n_targets]
            tg[k, p, : len(nxt)] = nxt
    items, actions, times = collate_histories(hist, max_len)
    targets = torch.from_numpy(tg).unsqueeze(2).expand(B, P, 3, n_targets).contiguous()
    return {"user": torch.tensor([split.user[w.row] for w in windows]), "items": items, "actions": actions,
            "times": times, "pos": torch.from_numpy(pos), "pos_valid": torch.from_numpy(valid),
            "device": torch.zeros(B, P, dtype=torch.long), "targets": targets,
            "target_values": (targets[:, :, 0] > 0).float()}


def collate_eval(split: NextItemSplit, rows: list[int], max_len: int, which: str) -> dict[str, torch.Tensor]:
    """One query per user at the newest position of its ``which`` ("valid"/"test") input, the
    target and ``excluded`` [B, num_items] = padding/OOV and every item of the input history (the
    whole of it, not only the max_len tokens read); the target itself is never excluded."""
    hist, target = [], []
    excluded = torch.zeros(len(rows), split.num_items, dtype=torch.bool)
    for k, r in enumerate(rows):
        s, t, y = split.eval_input(r, which)
        hist.append((s, [int(Action.CLICK)] * len(s), t))
        target.append(y)
        excluded[k, s] = True
    excluded[:, :2] = True
    tgt = torch.tensor(target)
    excluded[torch.arange(len(rows)), tgt] = False
    items, actions, times = collate_histories(hist, max_len)
    B = len(rows)
    return {"user": torch.tensor([split.user[r] for r in rows]), "items": items, "actions": actions,
            "times": times, "pos": last_position(items), "device": torch.zeros(B, 1, dtype=torch.long),
            "target": tgt, "excluded": excluded}
