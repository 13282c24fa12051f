"""OneRanker: Step 1 (backbone) → Step 2 (task + fake-item decoder) → Step 3 (ranker), one forward.

Queries are taken at positions ``pos`` [B, P] of the sequence (index into the 1+L layout: 0 = user
token, L = newest token); a query at ``pos`` sees H1 up to and including ``pos`` only, so one
training sequence supervises many requests causally, and inference uses pos = L.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.model.backbone import Backbone
from trainer.model.config import OneRankerConfig
from trainer.model.ranker import Ranker
from trainer.model.step2 import Step2


@torch.no_grad()
def centred_log_share(log_q: torch.Tensor, rows: int) -> torch.Tensor:
    """log_q [≤ rows]: log click share per item, as the losses sample negatives (rows without an
    item, e.g. padding and unused capacity, are ≤ log 1e-12) → [rows], centred on the mean over
    real items so the feature's scale does not depend on the corpus size; 0 elsewhere."""
    n = min(len(log_q), rows)
    x = log_q[:n].float()
    real = x > -25.0
    real[:2] = False
    centre = x[real].mean() if real.any() else x.new_zeros(())
    out = x.new_zeros(rows)
    out[:n] = torch.where(real, x - centre, torch.zeros_like(x))
    return out


class OneRanker(nn.Module):
    def __init__(self, cfg: OneRankerConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.step2 = Step2(cfg)
        self.ranker = Ranker(cfg) if cfg.use_step3 else None
        # log(bid) per item (catalog), used as a Step-3 candidate feature; 0 for pad/OOV.
        self.register_buffer("item_log_bid", torch.zeros(cfg.num_items))
        if cfg.popularity_feature:
            # log of each item's share of past clicks (the sampling distribution q of L_MTP), a
            # Step-3 candidate feature: the generator's softmax estimates p(item | user), while a
            # slate's other ads were shown by popularity; the ranker learns the correction.
            self.register_buffer("item_log_pop", torch.zeros(cfg.num_items))

    # --- plumbing -------------------------------------------------------------------------
    @property
    def item_table(self) -> torch.Tensor:
        return self.backbone.embed.item.weight

    @torch.no_grad()
    def set_item_log_pop(self, log_q: torch.Tensor) -> None:
        if self.cfg.popularity_feature:
            self.item_log_pop.copy_(centred_log_share(log_q, len(self.item_log_pop)).to(self.item_log_pop))

    def set_item_bids(self, bids: torch.Tensor) -> None:
        self.item_log_bid.copy_(torch.log(bids.clamp(min=1e-6)).to(self.item_log_bid))

    @torch.no_grad()
    def refresh_centroids(self, seed: int = 0, iters: int = 10, rate: float = 1.0) -> None:
        self.step2.refresh_centroids(self.item_table.detach(), seed=seed, iters=iters, rate=rate)

    def encode(self, user, items, actions, times, pos, device):
        """→ memory parts (context token [B,P,1,d], H1 [B,1,S,d]) and their masks
        ([B,P,1,1], [B,P,1,S]: a query at pos sees H1 up to pos only)."""
        h1, valid = self.backbone(user, items, actions, times)  # [B,S,d], [B,S]
        S = h1.shape[1]
        idx = torch.arange(S, device=h1.device)
        keys = valid.unsqueeze(1) & (idx.view(1, 1, S) <= pos.unsqueeze(2))  # [B,P,S]
        ctx = self.backbone.embed.context(device).unsqueeze(2)  # [B,P,1,d]
        mem = (ctx, h1.unsqueeze(1), self.state(h1, pos).unsqueeze(2))
        return mem, (torch.ones_like(keys[:, :, :1]).unsqueeze(2), keys.unsqueeze(2))

    @staticmethod
    def state(h1, pos) -> torch.Tensor:
        """H1 at the query positions (the user state after the newest visible token): [B,P,d]."""
        return torch.gather(h1, 1, pos.unsqueeze(-1).expand(*pos.shape, h1.shape[-1]))

    @staticmethod
    def seen_in_history(items, pos, cand) -> torch.Tensor:
        """Whether each candidate already appears in the history the query sees:
        items [B,L], pos [B,P] (1+L layout), cand [B,P,C] → bool [B,P,C]."""
        idx = torch.arange(1, items.shape[1] + 1, device=items.device)
        visible = idx.view(1, 1, -1) <= pos.unsqueeze(-1)  # [B,P,L]
        hit = cand.unsqueeze(-1) == items.view(items.shape[0], 1, 1, -1)  # [B,P,C,L]
        return (hit & visible.unsqueeze(2) & (cand.unsqueeze(-1) > 1)).any(-1)

    def rank(self, mem, mask, s2_out, cand, seen=None, gen=None):
        """Step 3 on candidates [B,P,C] given Step-2 outputs s2_out [B,P,Q,d] (the pass-through):
        keys/values = concat(context, H1, Step-2 outputs), or without Step 2 when the switch is off."""
        state = mem[2][:, :, 0]
        mem, mask = mem[:2], mask[:2]
        if self.cfg.kv_passthrough:
            mem = (*mem, s2_out)
            mask = (*mask, torch.ones_like(mask[0]).expand(*s2_out.shape[:2], 1, s2_out.shape[2]))
        else:
            gen = None  # the generator's scores are a Step-2 output too
        return self.ranker(mem, mask, self.item_table[cand], self.item_log_bid[cand], seen, state, gen,
                           self.item_log_pop[cand] if self.cfg.popularity_feature else None)

    # --- forward --------------------------------------------------------------------------
    @torch.no_grad()
    def retrieve(self, task, s_target, items, pos, n: int) -> torch.Tensor:
        """The generator's top-n items per query, as inference retrieves them (bagged heads over
        the whole corpus, padding/OOV and items already in the visible history excluded):
        task [B,P,T,d], s_target [B,P,T,k], items [B,L], pos [B,P] → ids [B,P,n]."""
        # Scores are linear in (task, s_target): bag the heads first, score the corpus once.
        g = self.corpus_scores(task.mean(2, keepdim=True), s_target.mean(2, keepdim=True))[:, :, 0]  # [B,P,N]
        B, P, N = g.shape
        L = items.shape[1]
        visible = (torch.arange(1, L + 1, device=items.device).view(1, 1, L) <= pos.unsqueeze(-1)).float()
        # float32 counts whatever g's dtype (bf16 under autocast): scatter_add_ needs equal dtypes
        seen = visible.new_zeros(B, P, N).scatter_add_(2, items.unsqueeze(1).expand(B, P, L), visible) > 0
        seen[..., :2] = True
        return g.masked_fill(seen, float("-inf")).topk(min(n, N - 2), dim=-1).indices

    def forward(self, user, items, actions, times, pos, device, cand=None, pool=None, retrieve: int = 0,
                ret_targets=None, seen=None) -> dict:
        """user [B], items/actions [B,L], times [B,L], pos [B,P], device [B,P], cand [B,P,C] →
        dict(task [B,P,T,d], s_target [B,P,T,k], gen_cand [B,P,T,C], score/ctr/cvr [B,P,C]).

        ``pool`` [M] (training): item ids from which the cfg.rank_hard_negatives best-scored by the
        generator (not already candidates) are appended to cand; out["cand"] is the final list.
        ``retrieve`` = n (training): Step 3 also scores the generator's own top-n retrieval per query
        (the lists it reranks at inference): ret_cand [B,P,n], ret_gen [B,P,T,n], ret_score [B,P,n].
        With ``ret_targets`` [B,P,n_t] only the queries whose list holds a target (ret_sel [B,P])
        go through Step 3 (the only ones the list loss can use); ret_score is 0 elsewhere.
        ``seen`` [B,P,C] (optional): which candidates the user interacted with before, from a
        longer history than the L tokens given (the feature store's, or the dataset's); without
        it Step 3 checks the visible window only (``seen_in_history``)."""
        mem, mask = self.encode(user, items, actions, times, pos, device)
        task, fake, s_target = self.step2(mem, mask)
        out = {"task": task, "fake": fake, "s_target": s_target, "h1": mem[1][:, 0]}
        if cand is not None and pool is not None and self.cfg.rank_hard_negatives > 0:
            with torch.no_grad():
                g = self.step2.score_all(task, s_target, self.item_table[pool]).mean(2)  # [B,P,M]
                taken = (pool.view(1, 1, -1, 1) == cand.unsqueeze(2)).any(-1)
                g = g.masked_fill(taken, float("-inf"))
                hard = pool[g.topk(self.cfg.rank_hard_negatives, dim=-1).indices]  # [B,P,E]
            cand = torch.cat([cand, hard * (cand[..., :1] > 0)], dim=-1)
        n_ret = 0
        if cand is not None and retrieve and self.ranker is not None:
            ret = self.retrieve(task, s_target, items, pos, retrieve)
            out["ret_cand"] = ret
            if ret_targets is None:
                n_ret = ret.shape[-1]
                cand = torch.cat([cand, ret], dim=-1)  # one Step-3 call; split below
            else:
                out.update(self._rank_retrieved(mem, mask, task, fake, s_target, items, pos, ret, ret_targets))
        if cand is not None:
            gen_cand = self.step2.score_each(task, s_target, self.item_table[cand])
            if self.ranker is not None:
                s2 = torch.cat([task, fake], dim=2)
                in_window = self.seen_in_history(items, pos, cand)
                if seen is not None:  # the given candidates' flags; appended ones keep the window's
                    in_window = in_window | F.pad(seen.bool(), (0, cand.shape[-1] - seen.shape[-1]))
                gen = gen_cand.mean(2).detach()
                out["score"], out["ctr"], out["cvr"] = self.rank(mem, mask, s2, cand, in_window, gen)
            if n_ret:
                C = cand.shape[-1] - n_ret
                out["ret_gen"] = gen_cand[..., C:]
                out["ret_score"] = out["score"][..., C:]
                cand, gen_cand = cand[..., :C], gen_cand[..., :C]
                for k in ("score", "ctr", "cvr"):
                    out[k] = out[k][..., :C]
            out["cand"] = cand
            out["gen_cand"] = gen_cand
        return out

    def _rank_retrieved(self, mem, mask, task, fake, s_target, items, pos, ret, targets) -> dict:
        """Step 3 on the retrieved lists ret [B,P,n] of the queries whose list holds a target only:
        the selected queries become a batch of their own (H1 gathered per query)."""
        sel = ((ret.unsqueeze(-1) == targets.unsqueeze(-2)) & (targets > 0).unsqueeze(-2)).any(-1).any(-1)
        bi, pi = sel.nonzero(as_tuple=True)
        B, P, r = ret.shape
        if bi.numel() == 0:  # nothing to rerank in this batch
            z = task.new_zeros(B, P, r)
            return {"ret_sel": sel, "ret_score": z, "ret_gen": task.new_zeros(B, P, task.shape[2], r)}
        sub_mem = (mem[0][bi, pi].unsqueeze(1), mem[1][bi], mem[2][bi, pi].unsqueeze(1))
        sub_mask = (mask[0][bi, pi].unsqueeze(1), mask[1][bi, pi].unsqueeze(1))
        t, st = task[bi, pi].unsqueeze(1), s_target[bi, pi].unsqueeze(1)
        c = ret[bi, pi].unsqueeze(1)  # [n,1,r]
        gen = self.step2.score_each(t, st, self.item_table[c])  # [n,1,T,r]
        s2 = torch.cat([t, fake[bi, pi].unsqueeze(1)], dim=2)
        seen = self.seen_in_history(items[bi], pos[bi, pi].unsqueeze(1), c)
        score = self.rank(sub_mem, sub_mask, s2, c, seen, gen.mean(2).detach())[0][:, 0]  # [n,r]
        full = score.new_zeros(B, P, r).index_put((bi, pi), score)
        full_gen = gen.new_zeros(B, P, gen.shape[2], r).index_put((bi, pi), gen[:, 0])
        return {"ret_sel": sel, "ret_score": full, "ret_gen": full_gen}

    def corpus_scores(self, task, s_target) -> torch.Tensor:
        """Dual-channel scores over the whole item table: [B,P,T,num_items]."""
        return self.step2.score_all(task, s_target, self.item_table)
