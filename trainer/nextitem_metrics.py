"""Metrics of the next-item protocol (trainer/nextitem.py): full-corpus ranking with the user's
earlier items excluded, and the SASRec paper's 100-sampled-negatives ranking. Pure tensor functions.

Ties are broken against the target (an item scored exactly like the target ranks above it), so a
model that scores everything alike gets no hits by luck.
"""

from __future__ import annotations

import math

import torch

HR_KS = (1, 5, 10, 50)
NDCG_KS = (10, 50)


def full_corpus_ranks(scores: torch.Tensor, target: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
    """scores [B, N] over the whole item table, target [B] ids, excluded bool [B, N] (padding/OOV and
    the user's earlier items; the target itself is never excluded) → 0-based rank of the target among
    the eligible items [B]."""
    scores = scores.float()
    t = scores.gather(1, target.unsqueeze(1))  # [B,1]
    other = ~excluded
    other = other.scatter(1, target.unsqueeze(1), False)
    return ((scores >= t) & other).sum(1)


def sampled_ranks(scores: torch.Tensor, target: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """The SASRec paper's protocol: rank of the target among itself and ``negatives`` [B, M] (ids the
    user never interacted with) → [B] 0-based."""
    scores = scores.float()
    t = scores.gather(1, target.unsqueeze(1))
    return (scores.gather(1, negatives) >= t).sum(1)


def rank_metrics(ranks: torch.Tensor, hr_ks=HR_KS, ndcg_ks=NDCG_KS, prefix: str = "") -> dict:
    """0-based ranks [B] of one relevant item per user → mean HR@k and NDCG@k."""
    r = ranks.float()
    out = {f"{prefix}hr@{k}": float((r < k).float().mean()) for k in hr_ks}
    for k in ndcg_ks:
        out[f"{prefix}ndcg@{k}"] = float(torch.where(r < k, 1.0 / torch.log2(r + 2.0), torch.zeros_like(r)).mean())
    out[f"{prefix}mrr"] = float((1.0 / (r + 1.0)).mean())
    return out


def sample_negatives_for_users(interacted: list[set[int]], first_item: int, n_rows: int, m: int = 100,
                               seed: int = 0) -> torch.Tensor:
    """m distinct negatives per user, uniform over items [first_item, n_rows) the user never
    interacted with (the SASRec paper's sampling), seeded: [U, m]."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(len(interacted), m, dtype=torch.long)
    n = n_rows - first_item
    for u, seen in enumerate(interacted):
        if n - sum(first_item <= i < n_rows for i in seen) < m:
            raise ValueError(f"user {u}: fewer than {m} items left to sample negatives from")
        got: list[int] = []
        taken = set(seen)
        while len(got) < m:
            for c in (torch.randint(first_item, n_rows, (2 * m,), generator=g)).tolist():
                if c not in taken:
                    taken.add(c)
                    got.append(c)
                    if len(got) == m:
                        break
        out[u] = torch.tensor(got)
    return out


def mean_sd(values: list[float]) -> dict:
    """Mean and sample SD (0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "sd": sd, "n": n}
