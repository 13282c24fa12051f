"""Baselines in the same harness: popularity, SASRec (generation only), cascade (SASRec retrieve →
pointwise ranker MLP on the same features). Same token inputs and batches as OneRanker."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.losses import bce, sampled_softmax, sample_negatives
from trainer.model.config import OneRankerConfig

NEG = -1e9


class Popularity(nn.Module):
    """Scores every item by its training click count."""

    def __init__(self, cfg: OneRankerConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("count", torch.zeros(cfg.num_items))

    def fit(self, click_counts: torch.Tensor) -> None:
        self.count.copy_(click_counts.float())

    def corpus(self, batch) -> torch.Tensor:
        return self.count.unsqueeze(0).expand(batch["items"].shape[0], -1)

    def candidates(self, batch) -> dict:
        return {"score": self.count[batch["cand"][:, 0]]}


class SASRec(nn.Module):
    """Causal softmax transformer over [user; item(+action)] tokens with learned absolute positions;
    the state at a query position scores items by dot product. Trained on next-click targets.

    The encoder is the SASRec of RecBole (the peer library of ``oneranker bench quality``): post-LN
    blocks, LayerNorm + dropout on the summed input embeddings, every Linear/Embedding drawn from
    N(0, 0.02). With the one-prefix-per-target training of the next-item protocol this closed our gap
    to RecBole's SASRec on ML-100K (seed 0: 0.177 → 0.214 vs RecBole's 0.213; each part alone
    0.172-0.182: trainer/results/sasrec_ablation_seed0/summary.json). Our user token, positions
    (counted from the newest token) and lr schedule stayed: they made no difference there."""

    def __init__(self, cfg: OneRankerConfig):
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.item = nn.Embedding(cfg.num_items, d, padding_idx=0)
        self.action = nn.Embedding(cfg.num_actions, d)
        self.user = nn.Embedding(cfg.num_users, d)
        self.pos = nn.Embedding(cfg.max_len + 1, d)
        self.emb_norm = nn.Sequential(nn.LayerNorm(d), nn.Dropout(cfg.dropout))
        layer = nn.TransformerEncoderLayer(d, cfg.n_heads, cfg.ffn_mult * d, cfg.dropout,
                                           batch_first=True, norm_first=False)
        self.enc = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.MultiheadAttention):  # its input projection is a bare Parameter
                nn.init.normal_(m.in_proj_weight, std=0.02)
                nn.init.zeros_(m.in_proj_bias)
        self.item.weight.data[0].zero_()

    def states(self, batch) -> torch.Tensor:
        """→ user states at the query positions [B, P, d]."""
        items, actions = batch["items"], batch["actions"]
        B, L = items.shape
        x = torch.cat([self.user(batch["user"]).unsqueeze(1), self.item(items) + self.action(actions)], 1)
        x = self.emb_norm(x + self.pos.weight[: L + 1])
        valid = torch.cat([torch.ones_like(items[:, :1], dtype=torch.bool), items > 0], 1)
        causal = torch.ones(L + 1, L + 1, dtype=torch.bool, device=items.device).triu(1)
        # A fully masked row (padding queries) would NaN: zero it (padding is never a query).
        h = torch.nan_to_num(self.enc(x, mask=causal, src_key_padding_mask=~valid))
        pos = batch["pos"]
        return torch.gather(h, 1, pos.unsqueeze(-1).expand(*pos.shape, h.shape[-1]))

    def gen_loss(self, h, batch, log_q, generator=None) -> torch.Tensor:
        ids = batch["targets"][:, :, 1] * batch["pos_valid"].unsqueeze(-1)  # click stage [B,P,n_t]
        m = self.cfg.num_negatives
        if m and m < log_q.shape[0]:
            neg_ids = sample_negatives(log_q, m, generator)
            lq = log_q + math.log(m)
        else:  # full softmax
            neg_ids = torch.arange(2, log_q.shape[0], device=h.device)
            lq = torch.zeros_like(log_q)
        pos = (h.unsqueeze(2) * self.item(ids)).sum(-1)
        neg = h @ self.item.weight[neg_ids].T
        return sampled_softmax(pos, neg, ids, neg_ids, lq, torch.ones_like(pos))

    def loss(self, batch, log_q, generator=None):
        l = self.gen_loss(self.states(batch), batch, log_q, generator)
        return l, {"mtp": float(l.detach())}

    def corpus(self, batch) -> torch.Tensor:
        return self.states(batch)[:, 0] @ self.item.weight.T

    def candidates(self, batch) -> dict:
        h = self.states(batch)[:, 0]
        return {"score": (h.unsqueeze(1) * self.item(batch["cand"][:, 0])).sum(-1)}


class Cascade(nn.Module):
    """SASRec retrieves top-N from the corpus; a pointwise MLP ranker on the same features
    (user state, item embedding, their product, log bid, log click share, seen flag, device)
    predicts pCTR and reranks.
    The ranker sees detached SASRec features, so retrieval is exactly SASRec."""

    def __init__(self, cfg: OneRankerConfig):
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.retriever = SASRec(cfg)
        self.device_emb = nn.Embedding(cfg.num_devices, d)
        self.mlp = nn.Sequential(nn.Linear(4 * d + 3, 2 * d), nn.SiLU(), nn.Linear(2 * d, d), nn.SiLU(),
                                 nn.Linear(d, 1))
        self.register_buffer("item_log_bid", torch.zeros(cfg.num_items))
        self.register_buffer("item_log_pop", torch.zeros(cfg.num_items))

    def set_item_bids(self, bids: torch.Tensor) -> None:
        self.item_log_bid.copy_(torch.log(bids.clamp(min=1e-6)))

    def set_item_log_pop(self, log_q: torch.Tensor) -> None:
        from trainer.model.oneranker import centred_log_share

        self.item_log_pop.copy_(centred_log_share(log_q, len(self.item_log_pop)).to(self.item_log_pop))

    def ctr_logit(self, h, device, cand, batch, seen=None) -> torch.Tensor:
        """h [B,P,d], device [B,P], cand [B,P,C] → [B,P,C]. Features as OneRanker's Step 3 sees
        them: user state, item, product, device, log bid, seen-before flag (the window's, or'ed
        with ``seen`` [B,P,C] from the longer history when given)."""
        from trainer.model.oneranker import OneRanker

        seen = OneRanker.seen_in_history(batch["items"], batch["pos"], cand) | (
            False if seen is None else seen.bool())
        seen = seen.float().unsqueeze(-1)
        e = self.retriever.item(cand).detach()
        h = h.detach().unsqueeze(2).expand_as(e)
        dv = self.device_emb(device).unsqueeze(2).expand_as(e)
        f = torch.cat([h, e, h * e, dv, self.item_log_bid[cand].unsqueeze(-1), self.item_log_pop[cand].unsqueeze(-1),
                       seen], -1)
        return self.mlp(f).squeeze(-1)

    def _cand_seen(self, batch):
        return batch.get("cand_seen") if self.cfg.full_history_seen else None

    def loss(self, batch, log_q, generator=None):
        h = self.retriever.states(batch)
        g = self.retriever.gen_loss(h, batch, log_q, generator)
        valid = (batch["cand"] > 0) & batch["pos_valid"].unsqueeze(-1)
        r = bce(self.ctr_logit(h, batch["device"], batch["cand"], batch, self._cand_seen(batch)), batch["click"], valid)
        return g + r, {"mtp": float(g.detach()), "ctr": float(r.detach())}

    def corpus(self, batch, eligible=None) -> tuple[torch.Tensor, torch.Tensor]:
        """→ (ids [B, N] retrieved by SASRec, ranker scores [B, N]) with ineligible ones at NEG."""
        h = self.retriever.states(batch)
        s = h[:, 0] @ self.retriever.item.weight.T
        if eligible is not None:
            s = s.masked_fill(~eligible, NEG)
        rs, ids = s.topk(min(self.cfg.retrieve_n, s.shape[-1]), -1)
        ctr = self.ctr_logit(h, batch["device"], ids.unsqueeze(1), batch)[:, 0]
        return ids, ctr.masked_fill(rs <= NEG / 2, NEG)

    def candidates(self, batch) -> dict:
        h = self.retriever.states(batch)
        ctr = self.ctr_logit(h, batch["device"], batch["cand"], batch, self._cand_seen(batch))[:, 0]
        return {"score": ctr, "ctr": ctr}
