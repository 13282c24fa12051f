"""Step 2: value-aware multi-task decoupling + target awareness (fake item tokens).

Query = [task tokens in funnel order (interest: impression → click → conversion, then value);
fake item tokens = k-means centroids of the item embedding table]. Each decoder layer:
cross-attention to H1 FIRST, then self-attention under the heterogeneous mask, then FFN.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.model.attention import DecoderLayer
from trainer.model.config import OneRankerConfig


def step2_mask(n_tasks: int, n_fake: int) -> torch.Tensor:
    """The heterogeneous self-attention mask [n_tasks+n_fake, n_tasks+n_fake], True = may attend.

    task i → task j iff j ≤ i (causal along the funnel); task → every fake item;
    fake → every task; fake l → fake m iff l == m (fake items see only themselves among fakes).
    """
    n = n_tasks + n_fake
    i = torch.arange(n).unsqueeze(1)
    j = torch.arange(n).unsqueeze(0)
    qt, kt = i < n_tasks, j < n_tasks
    task_task = qt & kt & (j <= i)
    task_fake = qt & ~kt
    fake_task = ~qt & kt
    fake_self = ~qt & ~kt & (i == j)
    return task_task | task_fake | fake_task | fake_self


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iters: int = 10, seed: int = 0, init: torch.Tensor | None = None) -> torch.Tensor:
    """Plain Lloyd k-means on rows of x [N, d] → centroids [k, d] (deterministic for a seed).
    ``init`` warm-starts from the previous centroids so fake item l keeps its identity across
    refreshes (Step 2's weights learned for it stay meaningful)."""
    g = torch.Generator().manual_seed(seed)
    x = x.float().cpu()
    c = init.float().cpu().clone() if init is not None else x[torch.randperm(x.shape[0], generator=g)[:k]].clone()
    if c.shape[0] < k:  # fewer rows than clusters: repeat
        c = c.repeat((k + c.shape[0] - 1) // c.shape[0], 1)[:k]
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(1)
        s = torch.zeros_like(c).index_add_(0, assign, x)
        cnt = torch.bincount(assign, minlength=k).unsqueeze(1).float()
        c = torch.where(cnt > 0, s / cnt.clamp(min=1), c)
    return c


class Step2(nn.Module):
    """(H1-memory [B, K, d], mem_mask [B, P, K]) → task outputs [B, P, T, d], fake outputs
    [B, P, k, d] and the target-aware weights s_target [B, P, T, k]."""

    def __init__(self, cfg: OneRankerConfig):
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.n_tasks, self.n_fake = cfg.n_tasks, cfg.n_fake
        self.task = nn.Parameter(torch.randn(self.n_tasks, d) * 0.02)
        self.register_buffer("centroids", torch.zeros(max(self.n_fake, 1), d))
        self.layers = nn.ModuleList([DecoderLayer(d, cfg.n_heads, cfg.ffn_mult, cfg.dropout)
                                     for _ in range(cfg.n_step2_layers)])
        self.ln_f = nn.LayerNorm(d)
        self.state_in = nn.Linear(d, d)
        self.register_buffer("mask", step2_mask(self.n_tasks, self.n_fake), persistent=False)
        # s_target_il = MLP([task_i ; fake_l]); the first linear is split so the pairs never
        # materialise as [.., T, k, 2d].
        self.st_task = nn.Linear(d, d)
        self.st_fake = nn.Linear(d, d, bias=False)
        self.st_out = nn.Linear(d, 1)

    def fake_tokens(self) -> torch.Tensor:
        """The fake item query tokens [k, d]: exactly the current centroids."""
        return self.centroids[: self.n_fake]

    @torch.no_grad()
    def refresh_centroids(self, item_table: torch.Tensor, seed: int = 0, iters: int = 10,
                          rate: float = 1.0) -> None:
        """k-means over the item embedding table (rows ≥ 2: no padding/OOV) → centroids. The first
        time a full 10-iteration clustering; afterwards ``iters`` Lloyd iterations warm-started from
        the current centroids, of which only the fraction ``rate`` is taken (damped: the fake item
        tokens move with the table instead of jumping, which Step 2's weights for them cannot follow)."""
        if not self.n_fake:
            return
        cur = self.centroids[: self.n_fake]
        if not bool(cur.abs().sum() > 0):
            self.centroids[: self.n_fake] = kmeans(item_table[2:], self.n_fake, seed=seed).to(self.centroids)
            return
        new = kmeans(item_table[2:], self.n_fake, iters=iters, seed=seed, init=cur).to(self.centroids)
        # rate 1 stores the k-means result itself (cur + 1·(new − cur) can differ in the last bit)
        self.centroids[: self.n_fake] = new if rate == 1 else cur + rate * (new - cur)

    def forward(self, mem: torch.Tensor, mem_mask: torch.Tensor):
        """mem/mem_mask: parts from OneRanker.encode (context [B,P,1,d], H1 [B,1,S,d], state [B,P,1,d])."""
        state = mem[2]  # [B,P,1,d] H1 at the query position
        mem, mem_mask = mem[:2], mem_mask[:2]
        B, P = mem_mask[0].shape[:2]
        q = torch.cat([self.task, self.fake_tokens()], dim=0)  # [Q, d]
        x = q.expand(B, P, *q.shape)
        # Task tokens start from the user state at the query position (cross-attention alone has
        # no notion of recency); fake item tokens stay exactly the centroids.
        is_task = (torch.arange(q.shape[0], device=q.device) < self.n_tasks).view(-1, 1)
        x = x + self.state_in(state) * is_task
        for layer in self.layers:
            x = layer(x, mem, mem_mask, self.mask)
        x = self.ln_f(x)
        task, fake = x[:, :, : self.n_tasks], x[:, :, self.n_tasks:]
        if self.n_fake:
            h = self.st_task(task).unsqueeze(3) + self.st_fake(fake).unsqueeze(2)  # [B,P,T,k,d]
            s_target = self.st_out(F.silu(h)).squeeze(-1)  # [B, P, T, k]
        else:
            s_target = task.new_zeros(B, P, self.n_tasks, 0)
        return task, fake, s_target

    def item_side(self, item_vecs: torch.Tensor) -> torch.Tensor:
        """cos(e_item, centroid_l) for every l: item_vecs [*, d] → [*, k]."""
        return F.normalize(item_vecs, dim=-1) @ F.normalize(self.fake_tokens(), dim=-1).T

    def score_all(self, task: torch.Tensor, s_target: torch.Tensor, item_vecs: torch.Tensor) -> torch.Tensor:
        """Dual-channel scores against a shared item set: task [B,P,T,d], s_target [B,P,T,k],
        item_vecs [N, d] → [B, P, T, N]. score = e_task·e_item + Σ_l s_target_l·cos(e_item, c_l)."""
        s = task @ item_vecs.T
        if self.n_fake:
            s = s + s_target @ self.item_side(item_vecs).T
        return s

    def score_own(self, task: torch.Tensor, s_target: torch.Tensor, item_vecs: torch.Tensor) -> torch.Tensor:
        """Each task its own items: task [B, T, d], s_target [B, T, k], item_vecs [B, T, m, d] → [B, T, m]."""
        s = (item_vecs @ task.unsqueeze(-1)).squeeze(-1)
        if self.n_fake:
            s = s + (self.item_side(item_vecs) @ s_target.unsqueeze(-1)).squeeze(-1)
        return s

    def score_each(self, task: torch.Tensor, s_target: torch.Tensor, item_vecs: torch.Tensor) -> torch.Tensor:
        """Per-position item sets: item_vecs [B, P, N, d] → [B, P, T, N]."""
        s = task @ item_vecs.transpose(-1, -2)
        if self.n_fake:
            s = s + s_target @ self.item_side(item_vecs).transpose(-1, -2)
        return s
