"""Cluster attention and the Global Cluster-Former (GCF) layer (UniROM §3.3, Eqs. 7-15).

Queries attend to C cluster-level *surrogate* keys/values instead of the N original ones, so a
layer costs O(N·C·d) rather than O(N²·d):

    [Q; K; V]  = Dice(MLP(H))                         Q from the query stream X, K/V from Y
    P          = softmax_N(K S)                        S [d_h, C]: learnable cluster matrix (per head)
    K~, V~     = Pᵀ K, Pᵀ V                            C surrogate tokens [C, d_h]
    r_k, r_v   = σ(f(Q K~ᵀ/√d_h)), σ(g(Q V~ᵀ/√d_h))     query-adaptive mixing ratios [N, C]
    A          = softmax_C(r_k ⊙ Q K~ᵀ/√d_h)           attention of each query to the clusters
    O          = (A ⊙ r_v) V~                          heads concatenated, then W_o

f, g: linear maps over the cluster axis (C → C). Self attention is Y = X; the Mid-fusion
Interest-Former's target/context attention is the same module with Y another sequence.
Padding keys (``y_mask`` False) get no cluster weight; every row needs ≥ 1 valid key.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from trainer.model.unirom.dice import Dice


class ClusterAttention(nn.Module):
    """x [B, N, d] (queries), y [B, M, d] (keys/values), y_mask [B, M] bool → [B, N, d]."""

    def __init__(self, d: int, n_heads: int, n_clusters: int):
        super().__init__()
        assert d % n_heads == 0
        self.h, self.dh, self.c = n_heads, d // n_heads, n_clusters
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.q_act, self.kv_act = Dice(d), Dice(2 * d)
        self.clusters = nn.Parameter(torch.randn(n_heads, self.dh, n_clusters) / math.sqrt(self.dh))
        self.f = nn.Linear(n_clusters, n_clusters)  # key mixing ratio
        self.g = nn.Linear(n_clusters, n_clusters)  # value mixing ratio
        self.out = nn.Linear(d, d)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:  # [B, N, d] → [B, H, N, dh]
        B, N, _ = t.shape
        return t.view(B, N, self.h, self.dh).transpose(1, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor | None = None) -> torch.Tensor:
        q = self._heads(self.q_act(self.q(x)))
        k, v = (self._heads(t) for t in self.kv_act(self.kv(y)).chunk(2, -1))
        assign = torch.einsum("bhmd,hdc->bhmc", k, self.clusters)  # [B, H, M, C]
        if y_mask is not None:
            assign = assign.masked_fill(~y_mask[:, None, :, None], -1e9)
        p = assign.softmax(2)  # each cluster: a distribution over the M keys
        ks = p.transpose(2, 3) @ k  # surrogate keys [B, H, C, dh]
        vs = p.transpose(2, 3) @ v  # surrogate values
        scale = 1.0 / math.sqrt(self.dh)
        qk = (q @ ks.transpose(2, 3)) * scale  # [B, H, N, C]
        r_k = torch.sigmoid(self.f(qk))
        r_v = torch.sigmoid(self.g((q @ vs.transpose(2, 3)) * scale))
        a = (r_k * qk).softmax(-1)
        o = (a * r_v) @ vs  # [B, H, N, dh]
        B, _, N, _ = o.shape
        return self.out(o.transpose(1, 2).reshape(B, N, self.h * self.dh))


class FFN(nn.Module):
    """Position-wise Linear → Dice → Linear, [..., d] → [..., d]."""

    def __init__(self, d: int, mult: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, mult * d), Dice(mult * d), nn.Linear(mult * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class GCFLayer(nn.Module):
    """One GCF layer: cluster attention and an FFN, each with a residual connection and a
    (post-)LayerNorm. ``attend=False`` keeps only the FFN sub-layer (the "w/o GCF" ablation: no
    token sees another).

    x [B, N, d], y [B, M, d] (default x: self attention), y_mask [B, M] → [B, N, d]."""

    def __init__(self, d: int, n_heads: int, n_clusters: int, ffn_mult: int = 2, dropout: float = 0.0,
                 attend: bool = True):
        super().__init__()
        self.attn = ClusterAttention(d, n_heads, n_clusters) if attend else None
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ffn = FFN(d, ffn_mult)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor | None = None, y: torch.Tensor | None = None,
                y_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.attn is not None:
            if y is None:
                y, y_mask = x, x_mask
            x = self.ln1(x + self.drop(self.attn(x, y, y_mask)))
        return self.ln2(x + self.drop(self.ffn(x)))


class FullAttention(nn.Module):
    """The quadratic baseline GCF replaces: plain multi-head softmax self attention with explicit
    matmuls (so FLOP counters see it). x [B, N, d] → [B, N, d]; cost O(N²·d)."""

    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.h, self.dh = n_heads, d // n_heads
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, d = x.shape
        q, k, v = (t.view(B, N, self.h, self.dh).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        a = (q @ k.transpose(2, 3) / math.sqrt(self.dh)).softmax(-1)
        return self.out((a @ v).transpose(1, 2).reshape(B, N, d))


__all__ = ["ClusterAttention", "FFN", "GCFLayer", "FullAttention"]
