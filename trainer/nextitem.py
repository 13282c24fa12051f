"""The next-item protocol (``oneranker evaluate --protocol next-item``): the standard sequential-
recommendation evaluation on any user_id,item_id,timestamp file or ``movielens-100k``.

Each user's last item is the test target, the second-to-last the validation target, the rest is
training (trainer/nextitem_data.py). Models train on every position of their training windows
(next-item targets), are validated on the validation targets after every epoch (early stopping:
the best epoch's weights are kept), and are measured on the test targets by full-corpus ranking
with the user's earlier items excluded (HR@{1,5,10,50}, NDCG@{10,50}) and by the SASRec paper's
ranking among 100 sampled negatives the user never interacted with (``s100_`` metrics).

Models: popularity (training interactions), sasrec, oneranker-gen-only (Step 1 + Step 2 heads'
bagged dual-channel scores) and oneranker (the same generation scores: this protocol has no ad
requests, so Step 3 and its losses receive nothing to learn from).

    python -m trainer.evaluate --protocol next-item --dataset movielens-100k --seeds 0,1,2 \
        --out trainer/results/nextitem_movielens-100k.json
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from trainer.batching import resolve_device
from trainer.clipping import clip_groups, clipped_step
from trainer.losses import mtp_loss, state_loss
from trainer.metrics import rank_metrics
from trainer.model.baselines import Popularity, SASRec
from trainer.model.config import ABLATIONS, preset as make_preset
from trainer.model.oneranker import OneRanker
from trainer.nextitem_data import NextItemSplit, collate_eval, collate_windows, split_interactions, training_windows
from trainer.nextitem_metrics import full_corpus_ranks, mean_sd, sample_negatives_for_users, sampled_ranks

NEXTITEM_MODELS = ("popularity", "sasrec", "oneranker-gen-only", "oneranker")
DEFAULT_MODELS = "popularity,sasrec,oneranker-gen-only"
# Training defaults of this protocol on top of the preset (``--set`` overrides them): one target per
# position (the next item: what is evaluated); one prefix per target (window_stride 1, RecBole's
# pipeline), 512 prefixes per step. Disjoint windows of 50 (window_stride 0, 16 per step) are ~15×
# cheaper per epoch but left SASRec at 0.80× RecBole's (trainer/results/quality_movielens-100k_e8.json).
NEXTITEM_DEFAULTS: dict = {"n_targets": 1, "batch_size": 512, "window_stride": 1}
MODEL_DEFAULTS: dict[str, dict] = {"oneranker-gen-only": {"train_positions": 8, "state_weight": 1.0},
                                   "oneranker": {"train_positions": 8, "state_weight": 1.0}}
FULL_SOFTMAX_MAX_ITEMS = 4096  # up to this corpus size the generation loss is the exact softmax
# Trained to its early stop: at 8 epochs both SASRec and OneRanker were still improving (SASRec's best
# epoch was its last; gen-only 0.147 = 0.86x SASRec); with 40/5 the best epochs were 10-12 (SASRec) and
# 18-20 (gen-only), gen-only 1.10x SASRec on 3 seeds (trainer/results/nextitem_movielens-100k_e40_gpu.json).
DEFAULT_EPOCHS = 40
DEFAULT_PATIENCE = 5
HEADLINE = ("hr@1", "hr@5", "hr@10", "hr@50", "ndcg@10", "ndcg@50", "s100_hr@10", "s100_ndcg@10")


def build(name: str, cfg):
    if name == "popularity":
        return Popularity(cfg)
    if name == "sasrec":
        return SASRec(cfg)
    if name in ("oneranker-gen-only", "oneranker"):
        return OneRanker(cfg.replace(**ABLATIONS[name]))
    raise ValueError(f"model {name!r} has no next-item variant: use {', '.join(NEXTITEM_MODELS)}")


def corpus_scores(model, b: dict) -> torch.Tensor:
    """Scores of every item table row for each query of an eval batch → [B, N]."""
    if isinstance(model, Popularity):
        return model.corpus(b)
    if isinstance(model, SASRec):
        return model.corpus(b)
    mem, mask = model.encode(b["user"], b["items"], b["actions"], b["times"], b["pos"], b["device"])
    task, _, st = model.step2(mem, mask)
    # The generator's bagged heads (as inference merges them): linear in (task, s_target).
    return model.corpus_scores(task.mean(2, keepdim=True), st.mean(2, keepdim=True))[:, 0, 0]


@torch.no_grad()
def evaluate(model, batches: list[dict], negatives: torch.Tensor | None, dev) -> dict:
    """Full-corpus metrics over ``batches`` (collate_eval), plus sampled-negative metrics when
    ``negatives`` [U, 100] (rows in batch order) is given."""
    model.eval()
    full, samp, off = [], [], 0
    for hb in batches:
        b = {k: v.to(dev) for k, v in hb.items()}
        s = corpus_scores(model, b).float()
        full.append(full_corpus_ranks(s, b["target"], b["excluded"]).cpu())
        if negatives is not None:
            n = negatives[off:off + len(b["target"])].to(dev)
            samp.append(sampled_ranks(s, b["target"], n).cpu())
        off += len(b["target"])
    res = rank_metrics(torch.cat(full))
    if samp:
        res.update(rank_metrics(torch.cat(samp), hr_ks=(1, 5, 10), ndcg_ks=(10,), prefix="s100_"))
    return res


def subsample_positions(b: dict, n: int, gen: torch.Generator) -> dict:
    """The batch with at most ``n`` random valid query positions per window (Step 2 runs once per
    query position: the cost that makes OneRanker ~20× SASRec per target)."""
    if not n or b["pos"].shape[1] <= n:
        return b
    r = torch.rand(b["pos"].shape, generator=gen).to(b["pos"].device).masked_fill(~b["pos_valid"], -1.0)
    idx = r.topk(n, dim=1).indices.sort(1).values  # [B, n]
    out = dict(b)
    for k in ("pos", "pos_valid", "device", "target_values"):
        out[k] = torch.gather(b[k], 1, idx.view(*idx.shape, *([1] * (b[k].dim() - 2))).expand(*idx.shape, *b[k].shape[2:]))
    out["targets"] = torch.gather(b["targets"], 1, idx.view(*idx.shape, 1, 1).expand(*idx.shape, *b["targets"].shape[2:]))
    return out


def oneranker_step_loss(model, b: dict, cfg, log_q, gen) -> torch.Tensor:
    """L_MTP on ``cfg.train_positions`` random positions per window, plus the Step-1 state loss
    (cfg.state_weight) on every position: one backbone pass serves both."""
    sub = subsample_positions(b, cfg.train_positions, gen)
    out = model(sub["user"], sub["items"], sub["actions"], sub["times"], sub["pos"], sub["device"])
    loss = cfg.alpha * mtp_loss(model, out, sub, log_q, cfg.num_negatives, gen)
    if cfg.state_weight:
        tg = b["targets"][:, :, 1] * b["pos_valid"].unsqueeze(-1)
        loss = loss + cfg.state_weight * state_loss(model, out["h1"], b["pos"], tg, log_q, cfg.num_negatives, gen)
    return loss


def train(model, split: NextItemSplit, cfg, epochs: int, patience: int, dev, seed: int, log_q: torch.Tensor,
          valid_batches: list[dict], log=print, name: str = "") -> dict:
    """AdamW, linear warm-up (first 10% of the planned steps) then linear decay to 10%; after every
    epoch the validation HR@10 (NDCG@10 breaks ties); stops after ``patience`` epochs without a
    better one and restores the best epoch's weights. Returns the curve and the best epoch."""
    if isinstance(model, Popularity):
        return {"epochs_run": 0, "best_epoch": 0, "curve": []}
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    windows = training_windows(split, cfg.max_len, cfg.window_stride)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = math.ceil(len(windows) / cfg.batch_size)
    total = epochs * per_epoch
    warm = max(1, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.1, 1.0 - 0.9 * (s - warm) / max(1, total - warm))))
    groups = clip_groups(model)
    best, best_key, best_ep, curve, bad = None, (-1.0, -1.0), 0, [], 0
    for ep in range(epochs):
        model.train()
        if isinstance(model, OneRanker):
            model.refresh_centroids(seed=seed + ep)
        perm, loss_sum, t0 = rng.permutation(len(windows)), 0.0, time.time()
        for s in range(per_epoch):
            idx = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            b = {k: v.to(dev) for k, v in collate_windows(split, [windows[i] for i in idx], cfg.max_len,
                                                           cfg.n_targets).items()}
            if isinstance(model, OneRanker):
                loss = oneranker_step_loss(model, b, cfg, log_q, gen)
            else:
                loss, _ = model.loss(b, log_q, gen)
            clipped_step(loss, opt, sched, groups, cfg.clip_norm)
            loss_sum += float(loss.detach()) / per_epoch
        v = evaluate(model, valid_batches, None, dev)
        curve.append({"epoch": ep + 1, "loss": round(loss_sum, 4), "valid_hr@10": round(v["hr@10"], 4),
                      "valid_ndcg@10": round(v["ndcg@10"], 4), "seconds": round(time.time() - t0, 1)})
        log(f"  {name} " + " ".join(f"{k}={x}" for k, x in curve[-1].items()))
        key = (v["hr@10"], v["ndcg@10"])
        if key > best_key:
            best_key, best_ep, bad = key, ep + 1, 0
            best = copy.deepcopy(model.state_dict())
        else:
            bad += 1
            if bad >= patience:
                break
    if best is not None:  # the fake items' centroids are a buffer: restored with the weights
        model.load_state_dict(best)
    return {"epochs_run": len(curve), "best_epoch": best_ep, "curve": curve}


def nextitem_main(dataset: str = "movielens-100k", models: str = DEFAULT_MODELS, preset: str = "small",
                  epochs: int | None = None, patience: int = DEFAULT_PATIENCE, device: str = "cpu",
                  out: str | None = None, seed: int = 0, limit: int | None = None, threads: int = 2,
                  show: bool = True, **overrides) -> dict:
    """Split, train every model, evaluate on the test targets; print a table; write JSON."""
    from streaming.replay.datasets import load_interactions

    log = print if show else (lambda *a, **k: None)
    t_start = time.time()
    torch.set_num_threads(threads)
    dev = resolve_device(device)
    epochs = DEFAULT_EPOCHS if epochs is None else epochs
    inter = load_interactions(dataset)
    if limit:
        inter = inter.head(limit)
    split = split_interactions(inter)
    names = list(NEXTITEM_MODELS) if models == "all" else [m.strip() for m in models.split(",") if m.strip()]
    cfg = make_preset(preset, **{**NEXTITEM_DEFAULTS, **overrides})
    if "num_negatives" not in overrides and split.num_items <= FULL_SOFTMAX_MAX_ITEMS:
        cfg = cfg.replace(num_negatives=0)
    cfg = cfg.replace(num_items=split.num_items, num_users=len(split.users))
    rows = split.eval_rows()
    counts = split.train_counts()
    q = (counts + 1.0) ** 0.75
    q[:2] = 0
    log_q = torch.log((q / q.sum()).clamp(min=1e-12)).to(dev)
    bs = 512
    valid_b = [collate_eval(split, rows[i:i + bs], cfg.max_len, "valid") for i in range(0, len(rows), bs)]
    test_b = [collate_eval(split, rows[i:i + bs], cfg.max_len, "test") for i in range(0, len(rows), bs)]
    interacted = [set(split.seqs[r]) for r in rows]
    negatives = None  # the sampled metric needs 100 items each user never interacted with
    if rows and min(split.num_items - 2 - len(s) for s in interacted) >= 100:
        negatives = sample_negatives_for_users(interacted, 2, split.num_items, 100, seed)
    n_train = sum(len(split.train_seq(i)) for i in range(len(split.seqs)))
    log(f"{dataset}: {len(split.seqs)} users ({len(rows)} evaluated), {split.num_items - 2} items, "
        f"{n_train} training interactions; preset={preset} max_len={cfg.max_len} "
        f"negatives={cfg.num_negatives or 'full softmax'} epochs≤{epochs} patience={patience}")
    res: dict = {"protocol": "next-item", "dataset": dataset, "preset": preset, "seed": seed, "epochs": epochs,
                 "patience": patience, "device": str(dev), "config": cfg.to_dict(), "n_users": len(split.seqs),
                 "n_eval_users": len(rows), "n_items": split.num_items - 2, "n_train_interactions": n_train,
                 "models": {}}
    for name in names:
        torch.manual_seed(seed)
        mcfg = cfg.replace(**{k: v for k, v in MODEL_DEFAULTS.get(name, {}).items() if k not in overrides})
        model = build(name, mcfg).to(dev)
        if isinstance(model, Popularity):
            model.fit(counts)
        t0 = time.time()
        info = train(model, split, getattr(model, "cfg", mcfg), epochs, patience, dev, seed, log_q, valid_b, log, name)
        t1 = time.time()
        r = evaluate(model, test_b, negatives, dev)
        r.update(info, train_seconds=round(t1 - t0, 1), eval_seconds=round(time.time() - t1, 1),
                 params=sum(p.numel() for p in model.parameters()),
                 **{k: getattr(getattr(model, "cfg", mcfg), k) for k in ("lr", "batch_size", "train_positions",
                                                                          "state_weight", "num_negatives")})
        res["models"][name] = r
        log(f"{name}: " + " ".join(f"{k}={r[k]:.4f}" for k in HEADLINE if k in r) + f" train={r['train_seconds']}s "
            f"best_epoch={r['best_epoch']}")
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(res, indent=2))
    res["wall_seconds"] = round(time.time() - t_start, 1)
    if out:
        Path(out).write_text(json.dumps(res, indent=2))
    return res


def summarize(runs: list[dict]) -> dict:
    """Per model mean ± sample SD over runs (seeds) of the headline metrics and train seconds."""
    out: dict = {"seeds": [r["seed"] for r in runs], "models": {}}
    for name in runs[0]["models"]:
        rows = [r["models"][name] for r in runs]
        out["models"][name] = {k: mean_sd([x[k] for x in rows]) for k in (*HEADLINE, "train_seconds", "best_epoch")
                               if k in rows[0]}
    return out


def print_table(summary: dict) -> None:
    cols = ("hr@10", "ndcg@10", "hr@50", "s100_hr@10", "s100_ndcg@10", "train_seconds")
    print(f"{'model':<20}" + "".join(f"{c:>20}" for c in cols))
    for name, m in summary["models"].items():
        print(f"{name:<20}" + "".join(f"{'-':>20}" if c not in m else f"{m[c]['mean']:>12.4f} ± {m[c]['sd']:<6.4f}"
                                      if c != "train_seconds" else f"{m[c]['mean']:>13.1f} ± {m[c]['sd']:<5.1f}"
                                      for c in cols))


def run_nextitem(seeds: list[int], out: str | None = None, **kw) -> dict:
    """One nextitem_main per seed; the summary and every run in ``out``."""
    t0, runs = time.time(), []
    for s in seeds:  # the summary so far is written after every seed
        runs.append(nextitem_main(seed=s, out=None, **kw))
        summary = summarize(runs)
        print_table(summary)
        result = {"protocol": "next-item", "summary": summary, "runs": runs, "wall_seconds": round(time.time() - t0, 1)}
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(result, indent=2))
            print(f"wrote {out}")
    return result
