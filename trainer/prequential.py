"""Prequential (test-then-train) metrics of the online trainer: the predictions a micro-batch got
BEFORE it was learned (``BatchPreds``, recorded by trainer.learner.OnlineLearner.step), and sliding
windows (by samples) over them → AUC, GAUC, logloss of pCTR, CTR, HR@10 of the clicked ad in
full-corpus Step-2 retrieval (history items excluded), value-NDCG@10 of the exposed ads ranked by
Step 3. Each metric is the one trainer/evaluate.py reports (trainer/metrics.py)."""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from trainer import metrics


@dataclass
class BatchPreds:
    """Per-sample predictions made BEFORE learning from the batch. Arrays [B, C] / [B]."""

    ctr_logit: np.ndarray
    score: np.ndarray
    click: np.ndarray
    value: np.ndarray
    valid: np.ndarray
    hit10: np.ndarray  # 1/0 per sample with a click, NaN without

    def __len__(self) -> int:
        return len(self.hit10)


def _pad_cols(a: np.ndarray, C: int, fill) -> np.ndarray:
    if a.shape[1] == C:
        return a
    out = np.full((a.shape[0], C), fill, a.dtype)
    out[:, : a.shape[1]] = a
    return out


def summarize(preds: Sequence[BatchPreds]) -> dict[str, float]:
    """Metrics over a list of batches' predictions."""
    preds = [p for p in preds if len(p)]
    if not preds:
        return {"samples": 0}
    C = max(p.valid.shape[1] for p in preds)
    cat = {f: np.concatenate([_pad_cols(getattr(p, f), C, False if f == "valid" else 0.0) for p in preds])
           for f in ("ctr_logit", "score", "click", "value", "valid")}
    valid = cat["valid"]
    logit, click = cat["ctr_logit"][valid].astype(np.float64), cat["click"][valid]
    p = 1.0 / (1.0 + np.exp(-logit))
    hits = np.concatenate([p_.hit10 for p_ in preds])
    hits = hits[~np.isnan(hits)]
    return {"samples": int(valid.shape[0]), "impressions": int(valid.sum()),
            "auc": metrics.auc(logit, click), "gauc": metrics.gauc(cat["ctr_logit"], cat["click"], valid),
            "logloss": metrics.logloss(logit, click), "ctr": float(click.mean()) if len(click) else float("nan"),
            "mean_pctr": float(p.mean()) if len(p) else float("nan"),
            "hr@10": float(hits.mean()) if len(hits) else float("nan"),
            "vndcg@10": metrics.value_ndcg(cat["score"], cat["value"], valid)}


class Prequential:
    """Sliding windows (in samples) over the latest batches' predictions."""

    def __init__(self, windows: Sequence[int] = (1000, 10000)):
        self.windows = sorted(windows)
        self.batches: collections.deque[BatchPreds] = collections.deque()
        self.n = 0
        self.total = 0

    def add(self, p: BatchPreds) -> None:
        self.batches.append(p)
        self.n += len(p)
        self.total += len(p)
        while self.batches and self.n - len(self.batches[0]) >= self.windows[-1]:
            self.n -= len(self.batches.popleft())

    def window(self, size: int) -> list[BatchPreds]:
        out, n = [], 0
        for b in reversed(self.batches):
            if n >= size:
                break
            out.append(b)
            n += len(b)
        return out[::-1]

    def summary(self) -> dict[str, dict]:
        return {f"w{w}": summarize(self.window(w)) for w in self.windows}
