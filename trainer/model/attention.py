"""Softmax multi-head attention and the decoder layer shared by Step 2 and Step 3.

Written with plain matmuls (no SDPA) so masks are explicit and the graph exports to ONNX as-is.
Leading dimensions are free: queries [*, Q, d], memory [*, K, d], masks broadcastable to [*, Q, K].
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class MultiHeadAttention(nn.Module):
    def __init__(self, d: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        assert d % n_heads == 0
        self.h, self.dh = n_heads, d // n_heads
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.o = nn.Linear(d, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mem, mask) -> torch.Tensor:
        """x [*, Q, d]; mem [*, K, d] and mask bool [*, Q, K] (True = may attend), or tuples of
        parts (mem_i [*|1, K_i, d], mask_i [*|1, Q|1, K_i]) attended jointly as if concatenated:
        a part shared across leading dims (e.g. H1 for every query position) is projected once.
        → [*, Q, d]. A query row with no allowed key gets zeros (never NaN)."""
        mems = mem if isinstance(mem, (tuple, list)) else (mem,)
        masks = mask if isinstance(mask, (tuple, list)) else (mask,)
        lead = x.shape[:-2]
        q = self.q(x).unflatten(-1, (self.h, self.dh)).transpose(-2, -3)  # [*, h, Q, dh]
        att, vs, ms = [], [], []
        for mm, mk in zip(mems, masks):
            k, v = self.kv(mm).unflatten(-1, (2 * self.h, self.dh)).transpose(-2, -3).chunk(2, dim=-3)
            a = (q @ k.transpose(-1, -2)) * (self.dh ** -0.5)  # [*, h, Q, K_i]
            m = mk.unsqueeze(-3).expand(*a.shape[:-3], 1, a.shape[-2], a.shape[-1])
            att.append(a)
            ms.append(m)
            vs.append(v)
        a, m = torch.cat(att, -1), torch.cat(ms, -1)
        a = a.masked_fill(~m, -1e9).softmax(-1) * m.to(a.dtype)
        a = self.drop(a)
        y, off = 0, 0
        for v in vs:  # Σ_i A_i · V_i without materialising the concatenated (expanded) values
            y = y + a[..., off:off + v.shape[-2]] @ v
            off += v.shape[-2]
        return self.o(y.transpose(-2, -3).reshape(*lead, x.shape[-2], self.h * self.dh))

    def star(self, x: torch.Tensor) -> torch.Tensor:
        """Self-attention in the star pattern of ``ranker.step3_mask``: position 0 (the hub) attends
        only itself, every other position attends the hub and itself. x [*, 1+C, d] → [*, 1+C, d],
        equal to ``forward(x, x, step3_mask(C))`` but in O(C), not O(C²): Step 3's dense
        [1+C, 1+C] attention (C = 400 candidates at the paper's size) was 1.3 ms of a 19 ms request."""
        lead = x.shape[:-2]
        q = self.q(x).unflatten(-1, (self.h, self.dh))  # [*, 1+C, h, dh]
        k, v = self.kv(x).unflatten(-1, (2 * self.h, self.dh)).chunk(2, dim=-2)  # [*, 1+C, h, dh] each
        scale = self.dh ** -0.5
        to_hub = (q[..., 1:, :, :] * k[..., :1, :, :]).sum(-1) * scale  # [*, C, h]
        to_self = (q[..., 1:, :, :] * k[..., 1:, :, :]).sum(-1) * scale
        a = self.drop(torch.stack([to_hub, to_self], dim=-1).softmax(-1))  # [*, C, h, 2]
        y = a[..., :1] * v[..., :1, :, :] + a[..., 1:] * v[..., 1:, :, :]  # [*, C, h, dh]
        y = torch.cat([v[..., :1, :, :], y], dim=-3)  # the hub's only key is itself: its value
        return self.o(y.reshape(*lead, x.shape[-2], self.h * self.dh))


class FeedForward(nn.Module):
    def __init__(self, d: int, mult: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, mult * d), nn.GELU(), nn.Linear(mult * d, d), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer in the paper's order: cross-attention to memory FIRST, then masked
    self-attention, then FFN. ``self_mask="star"``: the self-attention pattern of Step 3
    (``MultiHeadAttention.star``), computed in O(Q) instead of with a dense [Q, Q] mask."""

    def __init__(self, d: int, n_heads: int, ffn_mult: int, dropout: float = 0.0):
        super().__init__()
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.cross = MultiHeadAttention(d, n_heads, dropout)
        self.self_attn = MultiHeadAttention(d, n_heads, dropout)
        self.ffn = FeedForward(d, ffn_mult, dropout)

    def forward(self, x: torch.Tensor, mem: torch.Tensor, mem_mask: torch.Tensor,
                self_mask: torch.Tensor | str) -> torch.Tensor:
        """x [*, Q, d], mem/mem_mask as MultiHeadAttention (a tensor or tuple of parts),
        self_mask [Q, Q] or "star" → [*, Q, d]."""
        x = x + self.cross(self.ln1(x), mem, mem_mask)
        h = self.ln2(x)
        x = x + (self.self_attn.star(h) if isinstance(self_mask, str) and self_mask == "star"
                 else self.self_attn(h, h, self_mask))
        return x + self.ffn(self.ln3(x))


def rms(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)
