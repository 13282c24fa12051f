"""AucFormer (UniROM §3.4): non-autoregressive generator, permutation-aware evaluator, payment
network. Inputs come from RecFormer (h [B, N, d], ctr_logit [B, N]); bids [B, N] (> 0).

Generator (Eq. 17). K slot tokens go through GCF layers that cross-attend to the candidate set;
the allocation matrix M [B, N, K] = log pCTR_i + <W h_i, s_k>/√d (a residual on the set-aware
pCTR, so an untrained generator allocates like eCPM = bid·pCTR), and

    z_ik = M_ik + w_k · log b_i,   w_k = softplus(ŵ_k) > 0,   p_k = softmax_i(z_ik)

Ad i's bid enters only through w_k·log b_i, so raising it raises z_ik and its allocation
probability p_ik in every slot; greedy slot filling (slot k takes the argmax of z_·k over the ads
not yet placed) then places it no later than before. Sampling uses the same masked softmax.

Evaluator (Eq. 18): the exposed ads' representations + slot embeddings → cluster-attention blocks
over the exposed list → permutation-aware pCTR per slot (the reward model).

Payment network (Eq. 19): rate = σ(MLP[h_i ; log pCTR_i ; slot one-hot ; log bids of the other
allocated ads]), payment = rate · b_i ≤ b_i (IR by construction).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.model.unirom.cluster_attention import GCFLayer
from trainer.model.unirom.config import UniROMConfig
from trainer.model.unirom.dice import mlp

NEG = -1e9


class Generator(nn.Module):
    """Allocation logits z [B, N, K] from (h, ctr_logit, mask, bids)."""

    def __init__(self, cfg: UniROMConfig):
        super().__init__()
        d, K = cfg.d_model, cfg.n_slots
        self.slots = nn.Parameter(torch.randn(K, d) * 0.02)
        self.layers = nn.ModuleList(GCFLayer(d, cfg.n_heads, cfg.n_clusters, cfg.ffn_mult)
                                    for _ in range(cfg.n_gen_layers))
        self.ad_proj = nn.Linear(d, d)
        nn.init.zeros_(self.ad_proj.weight)  # start at eCPM ranking (the residual is 0)
        nn.init.zeros_(self.ad_proj.bias)
        self.bid_raw = nn.Parameter(torch.full((K,), math.log(math.e - 1.0)))  # softplus → w = 1

    @property
    def bid_weight(self) -> torch.Tensor:
        """w [K] > 0."""
        return F.softplus(self.bid_raw)

    def match(self, h: torch.Tensor, ctr_logit: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The bid-free part M [B, N, K]."""
        s = self.slots.unsqueeze(0).expand(h.shape[0], -1, -1)
        for layer in self.layers:
            s = layer(s, None, h, mask)
        m = self.ad_proj(h) @ s.transpose(1, 2) / math.sqrt(h.shape[-1])
        return m + F.logsigmoid(ctr_logit).unsqueeze(-1)

    def logits(self, m: torch.Tensor, bids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """M [B, N, K] + w_k log b_i, padding at NEG → z [B, N, K]."""
        z = m + self.bid_weight * torch.log(bids.clamp(min=1e-6)).unsqueeze(-1)
        return z.masked_fill(~mask.unsqueeze(-1), NEG)

    def forward(self, h, ctr_logit, mask, bids) -> torch.Tensor:
        return self.logits(self.match(h, ctr_logit, mask), bids, mask)


def greedy_allocate(z: torch.Tensor) -> torch.Tensor:
    """z [B, N, K] → ad index per slot [B, K]: slot k takes the best ad not placed in slots < k."""
    z = z.clone()
    out = []
    for k in range(z.shape[-1]):
        i = z[:, :, k].argmax(1)
        out.append(i)
        z.scatter_(1, i.view(-1, 1, 1).expand(-1, 1, z.shape[-1]), NEG * 2)
    return torch.stack(out, 1)


def sample_allocate(z: torch.Tensor, generator: torch.Generator | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot by slot from the masked softmax → (ad index [B, K], log-probability [B, K])."""
    taken = torch.zeros_like(z[:, :, 0], dtype=torch.bool)
    idx, logp = [], []
    for k in range(z.shape[-1]):
        lp = z[:, :, k].masked_fill(taken, NEG * 2).log_softmax(1)
        i = torch.multinomial(lp.detach().exp(), 1, generator=generator).squeeze(1)
        idx.append(i)
        logp.append(lp.gather(1, i[:, None]).squeeze(1))
        taken = taken.scatter(1, i[:, None], True)
    return torch.stack(idx, 1), torch.stack(logp, 1)


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, N, ...], idx [B, K] → [B, K, ...]."""
    return x.gather(1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(*idx.shape, *x.shape[2:]))


class Evaluator(nn.Module):
    """h [B, K, d] of the exposed ads in slot order, mask [B, K] → permutation-aware pCTR logits [B, K]."""

    def __init__(self, cfg: UniROMConfig):
        super().__init__()
        d = cfg.d_model
        self.slot = nn.Embedding(max(cfg.n_exposed_slots, cfg.n_slots), d)
        nn.init.normal_(self.slot.weight, std=0.02)
        self.layers = nn.ModuleList(GCFLayer(d, cfg.n_heads, cfg.n_clusters, cfg.ffn_mult)
                                    for _ in range(cfg.n_eval_layers))
        self.head = mlp(d, cfg.head_hidden, 1)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = h + self.slot.weight[: h.shape[1]]
        for layer in self.layers:
            x = layer(x, mask)
        return self.head(x).squeeze(-1)


class PaymentNet(nn.Module):
    """h [B, K, d], ctr_logit [B, K], bids [B, K] of the allocated ads in slot order →
    payment rate [B, K] in (0, 1); payment = rate · bid."""

    def __init__(self, cfg: UniROMConfig):
        super().__init__()
        K = cfg.n_slots
        self.net = mlp(cfg.d_model + 1 + 2 * K, cfg.head_hidden, 1)

    def forward(self, h: torch.Tensor, ctr_logit: torch.Tensor, bids: torch.Tensor) -> torch.Tensor:
        B, K, _ = h.shape
        eye = torch.eye(K, device=h.device, dtype=h.dtype)
        logb = torch.log(bids.clamp(min=1e-6))
        others = logb.unsqueeze(1).expand(B, K, K) * (1 - eye)  # row k: the others' log bids
        f = torch.cat([h, F.logsigmoid(ctr_logit).unsqueeze(-1), eye.expand(B, K, K), others], -1)
        return torch.sigmoid(self.net(f).squeeze(-1))
