"""RecFormer (UniROM §3.2-3.3): Hybrid-Feature-Service inputs, GCF stacks over the behaviour
sequence and over the whole candidate set of a request, the Mid-fusion Interest-Former, and the
externality-aware pCTR/pCVR heads.

Inputs (B requests, L behaviour tokens, N candidates):
  user [B], device [B]                      user profile + context, read once per request
  hist_items, hist_actions [B, L]           behaviour sequence (left-padded, 0 = padding)
  cand [B, N], cand_mask [B, N]             the request's candidate ads (0 = padding)
Ad side: categorical features only (ad id, advertiser, category; Eq. 5), from buffers that the
serving replica would hold locally (``set_ad_features``). Bids never enter RecFormer: they reach
the model only through AucFormer's positive bid bias (that keeps allocation monotone in the bid).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from trainer.model.unirom.cluster_attention import GCFLayer
from trainer.model.unirom.config import UniROMConfig
from trainer.model.unirom.dice import mlp


class AdEmbedding(nn.Module):
    """Eq. 5: e_ad = W [E(ad id) ; E(advertiser) ; E(category)]. ids [...] → [..., d]."""

    def __init__(self, cfg: UniROMConfig):
        super().__init__()
        d = cfg.d_model
        self.ad = nn.Embedding(cfg.num_items, d, padding_idx=0)
        self.adv = nn.Embedding(cfg.num_advertisers, d)
        self.cat = nn.Embedding(cfg.num_categories, d)
        for e in (self.ad, self.adv, self.cat):
            nn.init.normal_(e.weight, std=0.05)
        self.proj = nn.Linear(3 * d, d)
        self.register_buffer("advertiser", torch.zeros(cfg.num_items, dtype=torch.long))
        self.register_buffer("category", torch.zeros(cfg.num_items, dtype=torch.long))

    def set_ad_features(self, advertiser: torch.Tensor, category: torch.Tensor) -> None:
        """advertiser, category [num_items] (indices already within the tables' sizes)."""
        self.advertiser.copy_(advertiser)
        self.category.copy_(category)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.cat([self.ad(ids), self.adv(self.advertiser[ids]), self.cat(self.category[ids])], -1))


class RecFormer(nn.Module):
    """→ dict(h [B, N, d] candidate representations, ctr_logit [B, N], cvr_logit [B, N])."""

    def __init__(self, cfg: UniROMConfig):
        super().__init__()
        d, self.cfg = cfg.d_model, cfg
        self.ads = AdEmbedding(cfg)
        self.user = nn.Embedding(cfg.num_users, d)
        self.device = nn.Embedding(cfg.num_devices, d)
        self.action = nn.Embedding(cfg.num_actions, d)
        self.pos = nn.Embedding(cfg.max_len + 1, d)  # recency: 0 = the user token, 1 = newest token
        for e in (self.user, self.device, self.action, self.pos):
            nn.init.normal_(e.weight, std=0.02)
        self.ctx = nn.Linear(d, d)  # user + context broadcast to every candidate
        self.seen = nn.Embedding(2, d) if cfg.seen_feature else None
        if self.seen is not None:
            nn.init.normal_(self.seen.weight, std=0.02)

        def layer(attend: bool = True) -> GCFLayer:
            return GCFLayer(d, cfg.n_heads, cfg.n_clusters, cfg.ffn_mult, cfg.dropout, attend)

        self.beh_layers = nn.ModuleList(layer() for _ in range(cfg.n_layers))
        self.cand_layers = nn.ModuleList(layer(cfg.set_aware) for _ in range(cfg.n_layers))
        self.fusion_at = self.fusion_blocks(cfg)
        # MIF: target attention (ads → behaviours), context attention (behaviours → ad set).
        self.target_attn = nn.ModuleDict({str(i): layer() for i in self.fusion_at})
        self.context_attn = nn.ModuleDict({str(i): layer() for i in self.fusion_at if cfg.set_aware})
        self.ctr_head = mlp(d, cfg.head_hidden, 1)
        self.cvr_head = mlp(d, cfg.head_hidden, 1)

    @staticmethod
    def fusion_blocks(cfg: UniROMConfig) -> list[int]:
        """Blocks after which MIF fuses: every ``mif_every``-th (1-based); late fusion (no MIF):
        only after the last one."""
        if not cfg.use_mif:
            return [cfg.n_layers]
        return [i for i in range(1, cfg.n_layers + 1) if i % cfg.mif_every == 0] or [cfg.n_layers]

    def behaviours(self, user, device, hist_items, hist_actions) -> tuple[torch.Tensor, torch.Tensor]:
        """→ behaviour tokens [B, 1 + L, d] (user/context token first) and their mask."""
        B, L = hist_items.shape
        u = (self.user(user) + self.device(device)).unsqueeze(1)
        rec = torch.arange(L, 0, -1, device=hist_items.device).clamp(max=self.cfg.max_len)
        x = self.ads(hist_items) + self.action(hist_actions) + self.pos(rec)
        mask = torch.cat([torch.ones_like(hist_items[:, :1], dtype=torch.bool), hist_items > 0], 1)
        return torch.cat([u + self.pos.weight[0], x], 1), mask

    def forward(self, user, device, hist_items, hist_actions, cand, cand_mask) -> dict:
        b, b_mask = self.behaviours(user, device, hist_items, hist_actions)
        c = self.ads(cand) + self.ctx(b[:, :1])
        if self.seen is not None:  # [B, N] candidate in the behaviour window: O(N·L) compares
            seen = (cand.unsqueeze(-1) == hist_items.unsqueeze(1)).any(-1) & (cand > 0)
            c = c + self.seen(seen.long())
        for i, (lb, lc) in enumerate(zip(self.beh_layers, self.cand_layers), start=1):
            b, c = lb(b, b_mask), lc(c, cand_mask)
            if i in self.fusion_at:
                key = str(i)
                c_new = self.target_attn[key](c, cand_mask, b, b_mask)
                if key in self.context_attn:
                    b = self.context_attn[key](b, b_mask, c, cand_mask)
                c = c_new
        return {"h": c, "ctr_logit": self.ctr_head(c).squeeze(-1), "cvr_logit": self.cvr_head(c).squeeze(-1)}
