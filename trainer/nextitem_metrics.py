"""Ranks of the next-item protocol (trainer/nextitem.py): full-corpus ranking with the user's
earlier items excluded, and the SASRec paper's 100-sampled-negatives ranking; pure tensor functions.
HR/NDCG/MRR of those ranks: ``trainer.metrics.rank_metrics``.

Ties are broken against the target (an item scored exactly like the target ranks above it), so a
model that scores everything alike gets no hits by luck.
"""

from __future__ import annotations

import math

import torch

from trainer.metrics import HR_KS, NDCG_KS, rank_metrics  # noqa: F401 - the ranks' HR/NDCG/MRR live there


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
