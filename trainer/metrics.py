"""Offline metrics (pure tensor functions): full-corpus retrieval, exposed-ad ranking, Step-2/Step-3
consistency (the paper's Figure 3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def hit_ndcg(top_ids: torch.Tensor, target: torch.Tensor, ks=(1, 5, 10, 50), ndcg_ks=(10, 50)) -> dict:
    """top_ids [B, ≥max k] ranked, target [B] → mean HR@k and NDCG@k (one relevant item)."""
    hit = top_ids == target.unsqueeze(1)
    rank = torch.where(hit.any(1), hit.float().argmax(1), torch.full_like(target, 10**9))
    out = {f"hr@{k}": float((rank < k).float().mean()) for k in ks}
    for k in ndcg_ks:
        out[f"ndcg@{k}"] = float(torch.where(rank < k, 1.0 / torch.log2(rank.float() + 2.0), 0.0).mean())
    return out


def value_ndcg(score: torch.Tensor, value: torch.Tensor, valid: torch.Tensor, k: int = 10) -> float:
    """Value-weighted NDCG@k of ranking by score; gains = realised values. [B, C] each."""
    s = score.masked_fill(~valid, float("-inf"))
    order = s.argsort(1, descending=True)[:, :k]
    disc = 1.0 / torch.log2(torch.arange(order.shape[1], dtype=torch.float32) + 2.0)
    dcg = (torch.gather(value * valid, 1, order) * disc).sum(1)
    ideal = (value * valid).sort(1, descending=True).values[:, :k]
    idcg = (ideal * disc[: ideal.shape[1]]).sum(1)
    ok = idcg > 0
    return float((dcg[ok] / idcg[ok]).mean()) if ok.any() else float("nan")


def revenue_at(score: torch.Tensor, value: torch.Tensor, valid: torch.Tensor, k: int = 3) -> float:
    """Mean realised value of the top-k ads per request when ranked by score."""
    order = score.masked_fill(~valid, float("-inf")).argsort(1, descending=True)[:, :k]
    return float(torch.gather(value * valid, 1, order).sum(1).mean())


def gauc(score: torch.Tensor, label: torch.Tensor, valid: torch.Tensor) -> float:
    """Impression-weighted mean of per-request AUC (requests with both classes)."""
    aucs, weights = [], []
    for s, y, v in zip(score, label, valid):
        s, y = s[v], y[v]
        pos, neg = s[y > 0], s[y <= 0]
        if len(pos) == 0 or len(neg) == 0:
            continue
        cmp = (pos.unsqueeze(1) > neg.unsqueeze(0)).float() + 0.5 * (pos.unsqueeze(1) == neg.unsqueeze(0)).float()
        aucs.append(float(cmp.mean()))
        weights.append(len(s))
    if not aucs:
        return float("nan")
    w = torch.tensor(weights, dtype=torch.float64)
    return float((torch.tensor(aucs, dtype=torch.float64) * w).sum() / w.sum())


def logloss(logit: torch.Tensor, label: torch.Tensor, valid: torch.Tensor) -> float:
    v = valid.float()
    return float((F.binary_cross_entropy_with_logits(logit.float(), label, reduction="none") * v).sum() / v.sum())


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
