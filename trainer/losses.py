"""Losses: L = α·L_MTP + β·(L_rank + BCE_pCTR + BCE_pCVR) + γ·L_DC (DESIGN §5). Pure functions."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sample_negatives(log_q: torch.Tensor, m: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """m item ids drawn with replacement from q = exp(log_q) [N] (padding/OOV should have -inf)."""
    return torch.multinomial(log_q.exp(), m, replacement=True, generator=generator)


def sampled_softmax(pos: torch.Tensor, neg: torch.Tensor, pos_ids: torch.Tensor, neg_ids: torch.Tensor,
                    log_q: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Sampled softmax with logQ correction, averaged over valid targets.

    pos [..., T] logits of the targets (ids pos_ids [..., T], 0 = no target), neg [..., M] logits of
    shared negatives neg_ids [M]; log_q [N] the sampling log-probabilities; weight [..., T] per target.
    Accidental hits (a negative equal to the target) are masked. When neg_ids is the full corpus
    (log_q uniform), this is the exact softmax (up to the masked target duplicate).
    """
    lp = pos - log_q[pos_ids]  # [..., T]
    ln = (neg - log_q[neg_ids]).unsqueeze(-2)  # [..., 1, M]
    hit = pos_ids.unsqueeze(-1) == neg_ids  # [..., T, M]
    ln = ln.masked_fill(hit, float("-inf"))
    logits = torch.cat([lp.unsqueeze(-1), ln.expand(*lp.shape, ln.shape[-1])], dim=-1)
    nll = -(lp - torch.logsumexp(logits, dim=-1))
    w = weight * (pos_ids > 0).to(nll.dtype)
    return (nll * w).sum() / w.sum().clamp(min=1e-6)


def bpr_loss(score: torch.Tensor, value: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Pairwise BPR over candidate pairs ordered by value: score/value/valid [..., C].
    Every pair (i, j) with value_i > value_j contributes −log σ(s_i − s_j), weighted by the value gap."""
    d = score.unsqueeze(-1) - score.unsqueeze(-2)  # [..., C, C]
    gap = value.unsqueeze(-1) - value.unsqueeze(-2)
    ok = (gap > 0) & valid.unsqueeze(-1) & valid.unsqueeze(-2)
    w = gap.clamp(min=0) * ok
    return (-F.logsigmoid(d) * w).sum() / w.sum().clamp(min=1e-6)


def bce(logit: torch.Tensor, label: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    v = valid.to(logit.dtype)
    return (F.binary_cross_entropy_with_logits(logit, label, reduction="none") * v).sum() / v.sum().clamp(min=1)


def dc_loss(rank_score: torch.Tensor, gen_score: torch.Tensor, valid: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Distillation for consistency: CE from softmax(stopgrad(s_rank)/τ) (teacher) to the generator's
    distribution restricted to the same candidates. rank_score/gen_score/valid [..., C].
    No gradient reaches the ranker through the teacher."""
    neg = torch.finfo(rank_score.dtype).min / 4
    teacher = (rank_score.detach() / tau).masked_fill(~valid, neg).softmax(-1)
    log_student = gen_score.masked_fill(~valid, neg).log_softmax(-1)
    rows = valid.any(-1)
    ce = -(teacher * log_student * valid).sum(-1)
    return (ce * rows).sum() / rows.sum().clamp(min=1)


def retrieved_list_loss(score: torch.Tensor, ids: torch.Tensor, targets: torch.Tensor,
                        valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax cross-entropy over each query's retrieved list: Step 3 trained as the reranker it
    is at inference. score/ids [..., n], targets [..., n_t] (0 = none), valid [...] queries.

    Every target found in its query's list is a positive whose denominator leaves the other
    targets out. Queries whose targets were not retrieved add nothing: inference never reranks
    them, and appending the missed target would teach that a low generator score means a click.
    Returns (loss, fraction of valid queries with a retrieved target)."""
    hit = (ids.unsqueeze(-1) == targets.unsqueeze(-2)) & (targets > 0).unsqueeze(-2)  # [..., n, n_t]
    any_pos = hit.any(-1)  # [..., n]
    neg = torch.finfo(score.dtype).min / 4
    total, count = score.new_zeros(()), score.new_zeros(())
    for t in range(targets.shape[-1]):
        h = hit[..., t]  # [..., n]
        present = h.any(-1) & valid
        logits = score.masked_fill(any_pos & ~h, neg)  # other positives are not negatives
        nll = torch.logsumexp(logits, -1) - (score * h).sum(-1)
        total = total + (nll * present).sum()
        count = count + present.sum()
    covered = (any_pos.any(-1) & valid).sum() / valid.sum().clamp(min=1)
    return total / count.clamp(min=1), covered


def head_stages(cfg) -> list[tuple[int, bool]]:
    """(funnel stage, value-weighted) of each Step-2 head; a single head when tasks are coupled."""
    heads = [(s, False) for s in cfg.stages()] + [(3, True)] * cfg.n_value_tasks
    return heads if cfg.decouple_tasks else heads  # coupled: the one head takes every stage's loss


def mtp_loss(model, out: dict, batch: dict, log_q: torch.Tensor, num_negatives: int,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """L_MTP: each head's sampled softmax over the corpus on its funnel stage's future targets
    (several per position = multi-token prediction); value heads weight targets by value."""
    cfg = model.cfg
    task, st = out["task"], out["s_target"]  # [B,P,T,d], [B,P,T,k]
    tg = batch["targets"] * batch["pos_valid"][..., None, None]  # [B,P,3,n_t]
    n_items = log_q.shape[0]
    if num_negatives and num_negatives < n_items:
        neg_ids = sample_negatives(log_q, num_negatives, generator)
        lq = log_q + math.log(num_negatives)
    else:  # full softmax: every item once, uniform correction
        neg_ids = torch.arange(2, n_items, device=task.device)
        lq = torch.zeros_like(log_q)
    table = model.item_table
    neg = model.step2.score_all(task, st, table[neg_ids])  # [B,P,T,M]
    vals = batch["target_values"]
    vw = vals / vals[vals > 0].mean().clamp(min=1e-6) if (vals > 0).any() else torch.ones_like(vals)
    total, heads = 0.0, head_stages(cfg)
    for h, (stage, weighted) in enumerate(heads):
        hi = h if cfg.decouple_tasks else 0
        ids = tg[:, :, stage - 1]  # [B,P,n_t]
        pos = model.step2.score_each(task[:, :, hi:hi + 1], st[:, :, hi:hi + 1], table[ids]).squeeze(2)
        w = vw if weighted else torch.ones_like(vw)
        total = total + sampled_softmax(pos, neg[:, :, hi], ids, neg_ids, lq, w)
    return total / len(heads)


def state_loss(model, h1: torch.Tensor, pos: torch.Tensor, targets: torch.Tensor, log_q: torch.Tensor,
               num_negatives: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Step-1 next-item loss: H1 [B,S,d] at the query positions pos [B,P] scores the targets
    [B,P,n_t] (0 = none) against the corpus by dot product with the item table: full softmax, or
    sampled softmax with logQ correction when num_negatives < the corpus."""
    h = torch.gather(h1, 1, pos.unsqueeze(-1).expand(*pos.shape, h1.shape[-1]))  # [B,P,d]
    n_items = log_q.shape[0]
    if num_negatives and num_negatives < n_items:
        neg_ids = sample_negatives(log_q, num_negatives, generator)
        lq = log_q + math.log(num_negatives)
    else:
        neg_ids = torch.arange(2, n_items, device=h1.device)
        lq = torch.zeros_like(log_q)
    table = model.item_table
    p = (h.unsqueeze(2) * table[targets]).sum(-1)
    return sampled_softmax(p, h @ table[neg_ids].T, targets, neg_ids, lq, torch.ones_like(p))


def oneranker_loss(model, out: dict, batch: dict, log_q: torch.Tensor,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """The combined loss and its parts (floats, for logging)."""
    cfg = model.cfg
    parts = {"mtp": mtp_loss(model, out, batch, log_q, cfg.num_negatives, generator)}
    loss = cfg.alpha * parts["mtp"]
    if cfg.state_weight and "h1" in out:
        tg = batch["targets"][:, :, 1] * batch["pos_valid"].unsqueeze(-1)
        parts["state"] = state_loss(model, out["h1"], batch["pos"], tg, log_q, cfg.num_negatives, generator)
        loss = loss + cfg.state_weight * parts["state"]
    if "score" in out:
        cand = out.get("cand", batch["cand"])
        extra = cand.shape[-1] - batch["cand"].shape[-1]  # appended hard negatives: label 0

        def pad(x):
            return F.pad(x, (0, extra)) if extra else x

        valid = (cand > 0) & batch["pos_valid"].unsqueeze(-1)
        exposed = pad(torch.ones_like(batch["click"])) > 0
        click, conv, value = pad(batch["click"]), pad(batch["conv"]), pad(batch["value"])
        parts["rank"] = bpr_loss(out["score"], value, valid)
        # pCTR/pCVR stay calibrated on real exposures only
        parts["ctr"] = bce(out["ctr"], click, valid & exposed)
        parts["cvr"] = bce(out["cvr"], conv, valid & exposed & (click > 0))
        loss = loss + cfg.beta * (parts["rank"] + parts["ctr"] + parts["cvr"])
        if "ret_score" in out:  # Step 3 on the generator's own retrieval (see OneRanker.retrieve)
            qv = batch["pos_valid"]
            sel = out.get("ret_sel", torch.ones_like(qv))  # queries Step 3 scored the list of
            parts["list"], parts["list_cover"] = retrieved_list_loss(
                out["ret_score"], out["ret_cand"], batch["targets"][:, :, 1], qv & sel)
            if "ret_sel" in out:
                parts["list_cover"] = (sel & qv).sum() / qv.sum().clamp(min=1)
            loss = loss + cfg.list_weight * parts["list"]
        if cfg.use_dc_loss:
            parts["dc"] = dc_loss(out["score"], out["gen_cand"].mean(2), valid, cfg.tau)
            if "ret_score" in out:  # consistency where it is measured: on the retrieved lists
                rv = (out["ret_cand"] > 1) & (batch["pos_valid"] & sel).unsqueeze(-1)
                parts["dc"] = 0.5 * (parts["dc"] + dc_loss(out["ret_score"], out["ret_gen"].mean(2), rv, cfg.tau))
            loss = loss + cfg.gamma * parts["dc"]
    return loss, {k: float(v.detach()) for k, v in parts.items()}
