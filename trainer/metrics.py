"""Metrics, one definition each, for the offline harness (trainer/evaluate.py, trainer/nextitem.py)
and the online trainer's prequential windows (trainer/prequential.py).

The per-impression metrics take numpy arrays or torch tensors (converted to numpy on the CPU):
``auc``, ``gauc`` (impression-weighted per-request AUC), ``logloss`` (of logits), ``value_ndcg``,
``revenue_at``. Rank metrics (``rank_metrics``: HR@k, NDCG@k, MRR of one relevant item per query;
``hit_ndcg`` for a ranked top list) and Step-2/Step-3 ``consistency`` (the paper's Figure 3) are
tensor functions.
"""

from __future__ import annotations

import numpy as np
import torch

HR_KS = (1, 5, 10, 50)
NDCG_KS = (10, 50)


def as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


# ------------------------------------------------------------------------------------------
# Per impression: rows [N, C] of candidates with a validity mask


def auc(score, label) -> float:
    """ROC AUC with ties counted half (Mann–Whitney on average ranks), over flat arrays."""
    score, label = as_numpy(score), as_numpy(label)
    pos = label > 0
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    ranks = np.empty(len(s), np.float64)
    _, start, counts = np.unique(s, return_index=True, return_counts=True)
    avg = start + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def gauc(score, label, valid) -> float:
    """Impression-weighted mean of per-request AUC (ties count half) over the requests [N, C] that
    have both classes among their valid candidates."""
    score, label, valid = as_numpy(score), as_numpy(label), as_numpy(valid).astype(bool)
    pos = (label > 0) & valid
    neg = (label <= 0) & valid
    gt = (score[:, :, None] > score[:, None, :]) + 0.5 * (score[:, :, None] == score[:, None, :])
    pairs = pos[:, :, None] & neg[:, None, :]
    npairs = pairs.sum((1, 2))
    ok = npairs > 0
    if not ok.any():
        return float("nan")
    a = (gt * pairs).sum((1, 2))[ok] / npairs[ok]
    w = valid.sum(1)[ok]
    return float((a * w).sum() / w.sum())


def logloss(logit, label, valid=None) -> float:
    """Mean binary cross-entropy of logits over the valid impressions (float64, stable form)."""
    x, y = as_numpy(logit).astype(np.float64), as_numpy(label).astype(np.float64)
    if valid is not None:
        v = as_numpy(valid).astype(bool)
        x, y = x[v], y[v]
    if x.size == 0:
        return float("nan")
    return float((np.logaddexp(0.0, x) - x * y).mean())


def _top_k(score, valid, k: int) -> np.ndarray:
    """Indices [N, ≤k] of the top-k valid candidates by score (ties: the earlier candidate first)."""
    s = np.where(valid, score, -np.inf)
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def value_ndcg(score, value, valid, k: int = 10) -> float:
    """Value-weighted NDCG@k of ranking each request's valid candidates by score; gains = realised
    values. Requests without value are skipped."""
    score, value, valid = as_numpy(score), as_numpy(value), as_numpy(valid).astype(bool)
    v = np.where(valid, value, 0.0)
    order = _top_k(score, valid, k)
    disc = 1.0 / np.log2(np.arange(order.shape[1]) + 2.0)
    dcg = (np.take_along_axis(v, order, 1) * disc).sum(1)
    ideal = -np.sort(-v, axis=1)[:, :k]
    idcg = (ideal * disc[: ideal.shape[1]]).sum(1)
    ok = idcg > 0
    return float((dcg[ok] / idcg[ok]).mean()) if ok.any() else float("nan")


def revenue_at(score, value, valid, k: int = 3) -> float:
    """Mean realised value of the top-k ads per request when ranked by score."""
    score, value, valid = as_numpy(score), as_numpy(value), as_numpy(valid).astype(bool)
    v = np.where(valid, value, 0.0)
    return float(np.take_along_axis(v, _top_k(score, valid, k), 1).sum(1).mean())


# ------------------------------------------------------------------------------------------
# Rank metrics (tensors)


def rank_metrics(ranks: torch.Tensor, hr_ks=HR_KS, ndcg_ks=NDCG_KS, prefix: str = "", mrr: bool = True) -> dict:
    """0-based ranks [B] of one relevant item per user → mean HR@k and NDCG@k (and MRR)."""
    r = ranks.float()
    out = {f"{prefix}hr@{k}": float((r < k).float().mean()) for k in hr_ks}
    for k in ndcg_ks:
        out[f"{prefix}ndcg@{k}"] = float(torch.where(r < k, 1.0 / torch.log2(r + 2.0), torch.zeros_like(r)).mean())
    if mrr:
        out[f"{prefix}mrr"] = float((1.0 / (r + 1.0)).mean())
    return out


def hit_ndcg(top_ids: torch.Tensor, target: torch.Tensor, ks=HR_KS, ndcg_ks=NDCG_KS) -> dict:
    """top_ids [B, ≥max k] ranked, target [B] → mean HR@k and NDCG@k (one relevant item; a target
    missing from the list ranks beyond every k)."""
    hit = top_ids == target.unsqueeze(1)
    rank = torch.where(hit.any(1), hit.float().argmax(1), torch.full_like(target, 10**9))
    return rank_metrics(rank, ks, ndcg_ks, mrr=False)


def consistency(gen: torch.Tensor, score: torch.Tensor, drop: torch.Tensor, max_k: int = 10) -> dict:
    """Step-2 vs Step-3 agreement on the same retrieved set: gen/score/drop [B, M].
    Mean absolute difference of an item's rank under the two orders, and top-K overlap K=1..max_k."""
    g = gen.float().masked_fill(drop, float("-inf"))
    s = score.float().masked_fill(drop, float("-inf"))
    rg = g.argsort(1, descending=True).argsort(1).float()
    rs = s.argsort(1, descending=True).argsort(1).float()
    keep = (~drop).float()
    out = {"mean_abs_rank_diff": float(((rg - rs).abs() * keep).sum() / keep.sum())}
    for k in range(1, max_k + 1):
        out[f"overlap@{k}"] = float(((rg < k) & (rs < k) & ~drop).float().sum(1).div(k).mean())
    return out
