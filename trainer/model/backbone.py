"""Step 1: heterogeneous tokens → causal HSTU blocks → H1.

Sequence layout (DESIGN §5, trainer/data.py): index 0 is the user token, indices 1..L are the
item-with-action tokens, LEFT-padded (padding has item id 0), so the newest token is always at L.
The request's context token (device) is embedded here too but, because one training sequence
serves many requests with different contexts, it is handed to Steps 2/3 as an extra memory token
next to H1 rather than placed inside the causal sequence.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.model.config import OneRankerConfig


class TokenEmbedding(nn.Module):
    """User / context / item-with-action tokens to d. The item table is shared with the output side
    (Step-2 scores, Step-3 candidates, k-means fake items)."""

    def __init__(self, cfg: OneRankerConfig):
        super().__init__()
        d = cfg.d_model
        self.item = nn.Embedding(cfg.num_items, d, padding_idx=0)
        self.action = nn.Embedding(cfg.num_actions, d)
        self.user = nn.Embedding(cfg.num_users, d)
        self.device = nn.Embedding(cfg.num_devices, d)
        self.kind = nn.Embedding(3, d)  # 0 user, 1 context, 2 item-with-action
        nn.init.normal_(self.item.weight, std=0.05)
        for e in (self.action, self.user, self.device, self.kind):
            nn.init.normal_(e.weight, std=0.02)

    def sequence(self, user: torch.Tensor, items: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """user [B], items/actions [B, L] → tokens [B, 1+L, d]."""
        u = (self.user(user) + self.kind.weight[0]).unsqueeze(1)
        x = self.item(items) + self.action(actions) + self.kind.weight[2]
        return torch.cat([u, x], dim=1)

    def context(self, device: torch.Tensor) -> torch.Tensor:
        """device [*] → context tokens [*, d]."""
        return self.device(device) + self.kind.weight[1]


def time_bucket(times: torch.Tensor, n_buckets: int) -> torch.Tensor:
    """times [B, S] seconds (any origin) → log2-spaced buckets of |t_i - t_j| [B, S, S] in 1..n-1."""
    dt = (times.unsqueeze(2) - times.unsqueeze(1)).abs()
    b = torch.log2(1.0 + dt / 60.0).floor().long() + 1
    return b.clamp(1, n_buckets - 1)


class HSTUBlock(nn.Module):
    """One HSTU layer: U,V,Q,K = split(SiLU(W·LN(x))); A = SiLU(QKᵀ/√dh + rab_pos + rab_time) / n;
    y = W_o(LN(A·V) ⊙ U); x + y. n = the number of keys a query may attend (length normalisation)."""

    def __init__(self, cfg: OneRankerConfig):
        super().__init__()
        d = cfg.d_model
        self.h, self.dh = cfg.n_heads, d // cfg.n_heads
        self.ln = nn.LayerNorm(d)
        self.uvqk = nn.Linear(d, 4 * d)
        self.ln_out = nn.LayerNorm(d)
        self.o = nn.Linear(d, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.pos_bias = nn.Embedding(cfg.max_len + 2, self.h)
        self.time_bias = nn.Embedding(cfg.time_buckets, self.h)
        nn.init.zeros_(self.pos_bias.weight)
        nn.init.zeros_(self.time_bias.weight)
        self.max_rel = cfg.max_len + 1

    def forward(self, x: torch.Tensor, weight: torch.Tensor, rab: torch.Tensor) -> torch.Tensor:
        """x [B, S, d]; weight [B, 1, S, S]: 1/n where a query may attend a key (causal & valid),
        0 elsewhere; rab [B, h, S, S]: this block's position + time bias (Backbone.relative_bias)."""
        B, S, _ = x.shape
        u, v, q, k = F.silu(self.uvqk(self.ln(x))).chunk(4, dim=-1)
        q = q.view(B, S, self.h, self.dh).transpose(1, 2)
        k = k.view(B, S, self.h, self.dh).transpose(1, 2)
        v = v.view(B, S, self.h, self.dh).transpose(1, 2)
        att = F.silu(q @ k.transpose(-1, -2) * (self.dh ** -0.5) + rab) * weight
        y = (self.drop(att) @ v).transpose(1, 2).reshape(B, S, -1)
        return x + self.drop(self.o(self.ln_out(y) * u))


class Backbone(nn.Module):
    """Step 1. (user [B], items [B, L], actions [B, L], times [B, L] float seconds) → H1 [B, 1+L, d],
    plus the key-validity mask [B, 1+L] (user token always valid, padding not)."""

    def __init__(self, cfg: OneRankerConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = TokenEmbedding(cfg)
        self.blocks = nn.ModuleList([HSTUBlock(cfg) for _ in range(cfg.n_layers)])
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.embed_ln = nn.LayerNorm(cfg.d_model) if cfg.embed_norm else nn.Identity()

    def forward(self, user: torch.Tensor, items: torch.Tensor, actions: torch.Tensor,
                times: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.drop(self.embed_ln(self.embed.sequence(user, items, actions)))
        B, S, _ = x.shape
        valid = torch.cat([torch.ones_like(items[:, :1], dtype=torch.bool), items > 0], dim=1)  # [B, S]
        idx = torch.arange(S, device=items.device)
        rel = idx.unsqueeze(1) - idx.unsqueeze(0)  # [S, S] i - j
        causal = rel >= 0
        mask = causal.unsqueeze(0) & valid.unsqueeze(1)  # [B, S(query), S(key)]
        t = torch.cat([times[:, :1], times], dim=1)
        tb = time_bucket(t, self.cfg.time_buckets)
        # Pairs touching the user token or padding use bucket 0 (no time relation).
        tok = torch.cat([torch.zeros_like(valid[:, :1]), valid[:, 1:]], dim=1)
        tb = torch.where(tok.unsqueeze(2) & tok.unsqueeze(1), tb, torch.zeros_like(tb))
        rel_c = rel.clamp(0, self.cfg.max_len + 1)  # one Clip (ONNX: two chained clamps mis-optimise)
        m = mask.unsqueeze(1).to(x.dtype)  # [B, 1, S, S]
        weight = m / m.sum(-1, keepdim=True).clamp(min=1.0)  # the same for every block: computed once
        for blk, rab in zip(self.blocks, self.relative_bias(rel_c, tb)):
            x = blk(x, weight, rab)
        return self.ln_f(x), valid

    def relative_bias(self, rel: torch.Tensor, tbucket: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """rel [S, S] clamped relative positions, tbucket [B, S, S] → one rab [B, h, S, S] per block.
        Every block's position (and time) table is read in ONE gather of [S, S] rows n_layers·h
        wide, not one narrow gather per block: at serving, 2n_layers gathers of h-wide rows (and as
        many transposes) were 2.6 of the paper preset's 20 ms."""
        h = self.blocks[0].h
        pos = torch.cat([b.pos_bias.weight for b in self.blocks], dim=1)  # [max_len+2, n_layers·h]
        tim = torch.cat([b.time_bias.weight for b in self.blocks], dim=1)  # [time_buckets, n_layers·h]
        rab = F.embedding(rel, pos).unsqueeze(0) + F.embedding(tbucket, tim)  # [B, S, S, n_layers·h]
        rab = rab.permute(0, 3, 1, 2)
        return tuple(rab[:, i * h:(i + 1) * h] for i in range(len(self.blocks)))  # slices, not a Split sequence
