"""Step 3: the ranking decoder with K/V pass-through, plus calibrated pCTR / pCVR heads."""

from __future__ import annotations

import torch
import torch.nn as nn

from trainer.model.attention import DecoderLayer
from trainer.model.config import OneRankerConfig


def step3_mask(n_cand: int) -> torch.Tensor:
    """[1+C, 1+C] self-attention mask: T_r sees itself; each candidate sees T_r and itself only,
    so a candidate's score never depends on the other candidates."""
    i = torch.arange(1 + n_cand).unsqueeze(1)
    j = torch.arange(1 + n_cand).unsqueeze(0)
    return (i == j) | (j == 0)


class Ranker(nn.Module):
    """(memory parts, their masks (see MultiHeadAttention), candidate vectors [B,P,C,d], log-bids [B,P,C],
    seen-before flags [B,P,C], user state [B,P,d], the generator's scores [B,P,C], log click shares
    [B,P,C]; the last four optional) → score [B,P,C], pCTR logit [B,P,C], pCVR logit [B,P,C]."""

    def __init__(self, cfg: OneRankerConfig):
        super().__init__()
        d = cfg.d_model
        self.rank_token = nn.Parameter(torch.randn(d) * 0.02)
        self.bid = nn.Linear(1, d)
        self.seen = nn.Embedding(2, d)  # target-aware: the candidate already is in the history
        nn.init.zeros_(self.seen.weight)
        self.state_in = nn.Linear(d, d)  # user state at the query position → T_r
        self.gen_in = nn.Linear(1, d)  # the generator's (detached) score of the candidate
        # the candidate's log click share (OneRanker.item_log_pop), when the config has it
        self.pop_in = nn.Linear(1, d) if cfg.popularity_feature else None
        self.layers = nn.ModuleList([DecoderLayer(d, cfg.n_heads, cfg.ffn_mult, cfg.dropout)
                                     for _ in range(cfg.n_step3_layers)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Sequential(nn.Linear(3 * d, d), nn.SiLU(), nn.Linear(d, 3))

    def forward(self, mem: torch.Tensor, mem_mask: torch.Tensor, cand: torch.Tensor,
                log_bid: torch.Tensor, seen: torch.Tensor | None = None, state: torch.Tensor | None = None,
                gen: torch.Tensor | None = None, log_pop: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, P, C, d = cand.shape
        c = cand + self.bid(log_bid.unsqueeze(-1))
        if seen is not None:
            c = c + self.seen(seen.long())
        if gen is not None:
            c = c + self.gen_in(gen.unsqueeze(-1))
        if log_pop is not None:
            c = c + self.pop_in(log_pop.unsqueeze(-1))
        tr = self.rank_token.expand(B, P, 1, d)
        if state is not None:
            tr = tr + self.state_in(state).unsqueeze(2)
        x = torch.cat([tr, c], dim=2)  # [B,P,1+C,d]
        for layer in self.layers:  # self-attention in step3_mask's star pattern, in O(C)
            x = layer(x, mem, mem_mask, "star")
        x = self.ln_f(x)
        tr, xc = x[:, :, :1].expand(B, P, C, d), x[:, :, 1:]
        out = self.head(torch.cat([xc, tr, xc * cand], dim=-1))  # [B,P,C,3]
        return out[..., 0], out[..., 1], out[..., 2]
