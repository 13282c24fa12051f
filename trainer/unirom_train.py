"""UniROM training in the offline harness (UniROM §4): request-level data, pre-training, and the
three post-training stages. Data comes from the same ad layer and split as ``trainer/evaluate.py``
(``trainer.data.build_streams``: every user's last request held out, histories as of the request).

Stages, each a function over the same ``URData``:
  pretrain        BCE on the set-aware pCTR over exposed ads (label: clicked in this request) and
                  popularity-sampled unexposed ads (label: the user clicks the ad later in the same
                  session, (ts, ts + session_s], within the training requests); BCE on pCVR of
                  exposed ads (converted).
  train_evaluator reward model on the exposures (slot = shown position), RecFormer frozen.
  train_rlaf      policy gradient on the generator with the marginal-revenue reward (Eq. 22) from
                  the frozen evaluator; RecFormer frozen.
  train_payment   payment network, Lagrangian: −revenue + λ·regret + ρ/2·regret² (Eq. 24), λ by dual ascent.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from features.tokens import Action
from trainer.data import IdMap, build_streams
from trainer.model.unirom import UniROM, UniROMConfig, greedy_allocate, sample_allocate
from trainer.model.unirom.aucformer import gather_rows
from trainer.unirom_auction import GAMMAS, expost_regret


@dataclass
class URRequest:
    user: int
    device: int
    hist_items: list[int]
    hist_actions: list[int]
    exposed: list[int]  # shown ads in position order
    click: list[float]
    conv: list[float]
    later: set[int]  # ads the user clicks later in the session (unexposed labels)
    target: int = 0  # held out: the clicked ad
    seen: frozenset = frozenset()  # held out: ads in the whole history


@dataclass
class URData:
    items: IdMap
    users: IdMap
    bids: torch.Tensor  # [num_items] per-click bid (1 for padding/unknown)
    advertiser: torch.Tensor  # [num_items]
    category: torch.Tensor  # [num_items]
    pop: np.ndarray  # [num_items] popularity sampling distribution ((clicks + 1)^0.75, 0 for 0/1)
    train: list[URRequest]
    held: list[URRequest]
    streams: list  # trainer.data.UserStream, for the cascade baseline
    held_raw: list  # build_streams' held-out tuples, for the cascade baseline

    def config(self, **kw) -> UniROMConfig:
        return UniROMConfig(num_items=len(self.items), num_users=len(self.users),
                            num_advertisers=int(self.advertiser.max()) + 1,
                            num_categories=int(self.category.max()) + 1, **kw)


def build_data(requests, catalog, max_len: int = 50, session_s: float = 3600.0, seed: int = 0) -> URData:
    items, users = IdMap(), IdMap()
    streams, held = build_streams(requests, catalog, items, users, seed=seed)
    n = len(items)
    bids, adv, cat = torch.ones(n), torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)
    for a, b, v, c in zip(catalog.ad_id, catalog.bid, catalog.advertiser_id, catalog.category):
        i = items.get(str(a))
        bids[i], adv[i], cat[i] = float(b), int(v) + 1, int(c) + 1
    clicks = np.zeros(n)
    train = []
    for st in streams:
        ct = [(t, it) for it, a, t in zip(st.items, st.actions, st.times) if a == Action.CLICK]
        ctimes = [t for t, _ in ct]
        for q in st.queries:
            lo = max(0, q.n_hist - max_len)
            a, b = bisect.bisect_right(ctimes, q.ts), bisect.bisect_right(ctimes, q.ts + session_s)
            later = {it for _, it in ct[a:b]} - set(q.cand)
            train.append(URRequest(st.user, q.device, st.items[lo:q.n_hist], st.actions[lo:q.n_hist],
                                   list(q.cand), list(q.click), list(q.conv), later))
            for c, k in zip(q.cand, q.click):
                clicks[c] += k
    pop = (clicks + 1.0) ** 0.75
    pop[:2] = 0
    pop /= pop.sum()
    held_req = []
    for u, hist, q, seen in held:
        h = hist.last(max_len)
        held_req.append(URRequest(u, q.device, items.lookup(h.item_ids), list(h.actions), list(q.cand),
                                  list(q.click), list(q.conv), set(), q.targets[1][0], frozenset(seen)))
    return URData(items, users, bids, adv, cat, pop, train, held_req, streams, held)


def collate(reqs: list[URRequest], data: URData, max_len: int, n_unexposed: int,
            rng: np.random.Generator | None) -> dict[str, torch.Tensor]:
    """→ user, device [B]; hist_items/hist_actions [B, L] (left-padded); cand, mask, label, exposed,
    conv, bids [B, E + U]: the exposed ads first (position order), then ``n_unexposed``
    popularity-sampled ads (duplicates of exposed ones masked out)."""
    B = len(reqs)
    E = max(len(r.exposed) for r in reqs)
    U = n_unexposed if rng is not None else 0
    hi = np.zeros((B, max_len), np.int64)
    ha = np.zeros((B, max_len), np.int64)
    cand = np.zeros((B, E + U), np.int64)
    lab = np.zeros((B, E + U), np.float32)
    conv = np.zeros((B, E + U), np.float32)
    extra = rng.choice(len(data.pop), size=(B, U), p=data.pop) if U else None
    for b, r in enumerate(reqs):
        k = min(len(r.hist_items), max_len)
        if k:
            hi[b, max_len - k:] = r.hist_items[-k:]
            ha[b, max_len - k:] = r.hist_actions[-k:]
        e = len(r.exposed)
        cand[b, :e], lab[b, :e], conv[b, :e] = r.exposed, r.click, r.conv
        if U:
            ex = set(r.exposed)
            row = [0 if x in ex else int(x) for x in extra[b]]
            cand[b, E:] = row
            lab[b, E:] = [float(x in r.later) for x in row]
    t = torch.from_numpy
    c = t(cand)
    exposed = torch.zeros_like(c, dtype=torch.bool)
    exposed[:, :E] = c[:, :E] > 0
    return {"user": torch.tensor([r.user for r in reqs]), "device": torch.tensor([r.device for r in reqs]),
            "hist_items": t(hi), "hist_actions": t(ha), "cand": c, "mask": c > 0, "label": t(lab),
            "conv": t(conv), "exposed": exposed, "bids": data.bids[c]}


def recformer_out(model: UniROM, b: dict) -> dict:
    return model.recformer(b["user"], b["device"], b["hist_items"], b["hist_actions"], b["cand"], b["mask"])


def masked_bce(logit, label, mask) -> torch.Tensor:
    m = mask.float()
    return (F.binary_cross_entropy_with_logits(logit, label, reduction="none") * m).sum() / m.sum().clamp(min=1)


def batches(data: URData, cfg: UniROMConfig, epochs: float, rng: np.random.Generator, unexposed: bool = True):
    n = len(data.train)
    steps = max(1, int(math.ceil(epochs * n / cfg.batch_size)))
    perm = np.concatenate([rng.permutation(n) for _ in range(int(math.ceil(epochs)) + 1)])
    for s in range(steps):
        idx = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size]
        yield s, steps, collate([data.train[i] for i in idx], data, cfg.max_len,
                                cfg.n_unexposed if unexposed else 0, rng)


def _opt(params, lr, steps):
    opt = torch.optim.Adam(params, lr=lr)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.1, 1.0 - 0.9 * (s - warm) / max(1, steps - warm))))
    return opt, sched


def _step(loss, opt, sched, params, clip=1.0):
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    sched.step()


def pretrain(model: UniROM, data: URData, epochs: float, seed: int, log=print) -> dict:
    """Request-level BCE on the set-aware pCTR (exposed + popularity-sampled unexposed) + pCVR."""
    cfg, rng = model.cfg, np.random.default_rng([seed, 11])
    params = list(model.recformer.parameters())
    opt = sched = None
    model.train()
    tot = {"ctr": 0.0, "cvr": 0.0}
    for s, steps, b in batches(data, cfg, epochs, rng):
        if opt is None:
            opt, sched = _opt(params, cfg.lr, steps)
        out = recformer_out(model, b)
        l_ctr = masked_bce(out["ctr_logit"], b["label"], b["mask"])
        l_cvr = masked_bce(out["cvr_logit"], b["conv"], b["exposed"])
        _step(l_ctr + l_cvr, opt, sched, params)
        tot["ctr"] += float(l_ctr.detach()) / steps
        tot["cvr"] += float(l_cvr.detach()) / steps
        if s % 100 == 0:
            log(f"  pretrain {s}/{steps} ctr={float(l_ctr.detach()):.4f} cvr={float(l_cvr.detach()):.4f}")
    return tot


def _frozen_rec(model: UniROM, b: dict) -> dict:
    model.recformer.eval()
    with torch.no_grad():
        return recformer_out(model, b)


def train_evaluator(model: UniROM, data: URData, epochs: float, seed: int, log=print) -> dict:
    """Reward model on the exposures (their shown positions as slots), RecFormer frozen: the
    candidate set it sees is the request's exposed + sampled ads, as in pre-training."""
    cfg, rng = model.cfg, np.random.default_rng([seed, 12])
    params = list(model.evaluator.parameters())
    opt = sched = None
    model.evaluator.train()
    tot = 0.0
    for s, steps, b in batches(data, cfg, epochs, rng):
        if opt is None:
            opt, sched = _opt(params, cfg.lr, steps)
        rec = _frozen_rec(model, b)
        E = int(b["exposed"].sum(1).max())
        logit = model.evaluator(rec["h"][:, :E], b["exposed"][:, :E])
        loss = masked_bce(logit, b["label"][:, :E], b["exposed"][:, :E])
        _step(loss, opt, sched, params)
        tot += float(loss.detach()) / steps
    log(f"  evaluator bce={tot:.4f}")
    model.evaluator.eval()
    return {"evaluator_bce": tot}


def eval_ctr(model: UniROM, h: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Evaluator pCTR [R, K] of the list ``slots`` [R, K] over candidates h [B, N, d] (row r of
    the lists belongs to request ``rows[r]``; default r)."""
    return torch.sigmoid(model.evaluator(pick(h, slots, rows)))


def pick(x: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, N, ...], idx [R, K], rows [R] (default arange) → x[rows[r], idx[r, k]] [R, K, ...]."""
    if rows is None:
        return gather_rows(x, idx)
    return x[rows.unsqueeze(1), idx]


def drop_and_refill(slots: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """For each slot k, the list without its ad: later ads move up one slot and the last slot takes
    the best (greedy on z's last column) ad not in the original list. slots [B, K] → [B, K, K]."""
    B, K = slots.shape
    zl = z[:, :, -1].scatter(1, slots, -2e9)
    fill = zl.argmax(1, keepdim=True)  # [B, 1]
    out = []
    for k in range(K):
        out.append(torch.cat([slots[:, :k], slots[:, k + 1:], fill], 1))
    return torch.stack(out, 1)


def train_rlaf(model: UniROM, data: URData, epochs: float, seed: int, log=print) -> dict:
    """RLAF (Eqs. 22-23): sample lists from the generator, reward each placed ad by its marginal
    revenue R(list) − R(list without it, refilled greedily), R = Σ bid·evaluator pCTR; REINFORCE
    with a per-slot batch-mean baseline. RecFormer and evaluator frozen."""
    cfg, rng = model.cfg, np.random.default_rng([seed, 13])
    gen = torch.Generator().manual_seed(seed)
    params = list(model.generator.parameters())
    opt = sched = None
    model.generator.train()
    tot = {"reward": 0.0, "greedy_revenue": 0.0}
    for s, steps, b in batches(data, cfg, epochs, rng):
        if opt is None:
            opt, sched = _opt(params, cfg.lr * 0.5, steps)
        rec = _frozen_rec(model, b)
        z = model.generator(rec["h"], rec["ctr_logit"], b["mask"], b["bids"])
        slots, logp = sample_allocate(z, gen)
        with torch.no_grad():
            B, K = slots.shape
            rev = (b["bids"].gather(1, slots) * eval_ctr(model, rec["h"], slots)).sum(1)  # [B]
            alt = drop_and_refill(slots, z).view(B * K, K)
            rows = torch.arange(B).repeat_interleave(K)
            rev_alt = (b["bids"][rows].gather(1, alt) * eval_ctr(model, rec["h"], alt, rows)).sum(1)
            reward = rev.unsqueeze(1) - rev_alt.view(B, K)  # marginal revenue per placed ad
            adv = reward - reward.mean(0, keepdim=True)
            gs = greedy_allocate(z)
            g_rev = (b["bids"].gather(1, gs) * eval_ctr(model, rec["h"], gs)).sum(1)
        loss = -(adv * logp).sum(1).mean()
        _step(loss, opt, sched, params)
        tot["reward"] += float(reward.sum(1).mean()) / steps
        tot["greedy_revenue"] += float(g_rev.mean()) / steps
        if s % 100 == 0:
            log(f"  rlaf {s}/{steps} marginal={float(reward.sum(1).mean()):.4f} greedy_rev={float(g_rev.mean()):.4f} "
                f"w={[round(float(w), 3) for w in model.generator.bid_weight.detach()]}")
    model.generator.eval()
    return tot


def unirom_mechanism(model: UniROM, h: torch.Tensor, ctr_logit: torch.Tensor, m: torch.Tensor, mask: torch.Tensor):
    """The deployed mechanism as a ``mech(rows, bids)`` (trainer/unirom_auction.py) over fixed
    RecFormer outputs and bid-free matching term ``m`` [B, N, K]: greedy allocation on
    m + w·log b, payment network. Payments carry gradients to the payment network."""
    def mech(rows, bids):
        with torch.no_grad():
            slots = greedy_allocate(model.generator.logits(m[rows], bids, mask[rows]))
        b = bids.gather(1, slots)
        return slots, model.payment(pick(h, slots, rows), pick(ctr_logit, slots, rows), b) * b
    return mech


def regret_candidates(z: torch.Tensor, k: int) -> torch.Tensor:
    """The ads whose misreports can matter most: the top-k by slot-1 logit (the K placed ads and the
    next ones). z [B, N, K] → candidate indices [B, k]."""
    return z[:, :, 0].topk(k, 1).indices


def train_payment(model: UniROM, data: URData, epochs: float, seed: int, log=print) -> dict:
    """Payment network (Eq. 24, augmented Lagrangian as CGA): loss = −revenue + λ·rgt + ρ/2·rgt²,
    revenue = Σ evaluator pCTR · payment over the greedy list, rgt = mean ex-post regret of the
    top-2K ads over GAMMAS; λ ← λ + ρ·rgt after each step. Everything else frozen."""
    cfg, rng = model.cfg, np.random.default_rng([seed, 14])
    params = list(model.payment.parameters())
    opt = sched = None
    lam, rho = 0.0, cfg.pay_rho
    model.payment.train()
    tot = {"revenue": 0.0, "regret": 0.0, "lambda": 0.0}
    for s, steps, b in batches(data, cfg, epochs, rng):
        if opt is None:
            opt, sched = _opt(params, cfg.lr, steps)
        rec = _frozen_rec(model, b)
        with torch.no_grad():
            m = model.generator.match(rec["h"], rec["ctr_logit"], b["mask"])
            z = model.generator.logits(m, b["bids"], b["mask"])
        mech = unirom_mechanism(model, rec["h"], rec["ctr_logit"], m, b["mask"])

        def ctr_fn(rows, slots, h=rec["h"]):
            with torch.no_grad():
                return eval_ctr(model, h, slots, rows)

        who = regret_candidates(z, 2 * cfg.n_slots)
        rgt, _ = expost_regret(mech, ctr_fn, b["bids"], who, GAMMAS)
        slots, pay = mech(torch.arange(len(b["bids"])), b["bids"])
        revenue = (ctr_fn(torch.arange(len(b["bids"])), slots) * pay).sum(1).mean()
        r = rgt.sum(1).mean()
        loss = -revenue + lam * r + 0.5 * rho * r * r
        _step(loss, opt, sched, params)
        lam += rho * float(r.detach())
        tot["revenue"] += float(revenue.detach()) / steps
        tot["regret"] += float(r.detach()) / steps
        if s % 100 == 0:
            log(f"  payment {s}/{steps} revenue={float(revenue.detach()):.4f} regret={float(r.detach()):.5f} lambda={lam:.3f}")
    tot["lambda"] = lam
    model.payment.eval()
    return tot
