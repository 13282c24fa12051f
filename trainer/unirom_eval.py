"""UniROM offline harness (the paper's Table 1): MCA (the project's cascade + GSP), UniROM and its
ablations on the same ad requests, judged by one offline replay evaluator.

    python -m trainer.unirom_eval --models mca,unirom,unirom-no-gcf,unirom-no-aucformer \
        --limit 10000 --seeds 0,1,2 --out trainer/results/unirom_eval.json

Data and split as ``trainer/evaluate.py`` (each user's last request held out). Each held-out
request is an auction over the whole ad corpus minus the ads in the user's history. Per model:
  recall@50  the held-out clicked ad in the model's top-50 (MCA: its SASRec recall stage; UniROM:
             set-aware pCTR over the corpus)
  auc        impression-weighted per-request AUC of pCTR on the held-out request's shown ads
  ectr       mean replay pCTR per slot (%), eRPM = 1000 × mean Σ_slots replay pCTR · payment
  ic         Σ ex-post regret / Σ truthful utility over the top-2K ads of each auction, bids
             perturbed by trainer.unirom_auction.GAMMAS (values = bids), allocation re-run
  ir_violations  payments above the bid (truthful run)
The replay judge is a separately seeded UniROM RecFormer + permutation-aware evaluator (trained
like the reward model), so no mechanism is scored by the very network it optimised against.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from trainer import metrics
from trainer.batching import collate_heldout
from trainer.data import chunk_streams
from trainer.model.unirom import UniROM
from trainer.model.unirom.config import VARIANTS
from trainer.unirom_auction import GAMMAS, expost_regret, gsp
from trainer.unirom_train import (URData, build_data, collate, eval_ctr, pretrain, regret_candidates,
                                  train_evaluator, train_payment, train_rlaf, unirom_mechanism)

MODELS = ("mca", "unirom", "unirom-no-gcf", "unirom-no-aucformer")
# Small CPU preset (DESIGN §8: 2 shared cores); --set overrides any UniROMConfig field.
PRESET = {"d_model": 32, "n_layers": 2, "mif_every": 1, "n_clusters": 16, "head_hidden": (64, 32),
          "batch_size": 128, "n_unexposed": 20}
# Epochs per stage (fractions allowed): pre-training, reward model, RLAF, payment network.
EPOCHS = {"pretrain": 3.0, "evaluator": 1.0, "rlaf": 1.0, "payment": 2.0}
JUDGE_SEED_OFFSET = 1000


def new_model(data: URData, seed: int, **cfg) -> UniROM:
    torch.manual_seed(seed)
    m = UniROM(data.config(**{**PRESET, **cfg}))
    m.recformer.ads.set_ad_features(data.advertiser, data.category)
    return m


def fit_unirom(data: URData, seed: int, epochs: dict, log=print, full: bool = True, **cfg) -> tuple[UniROM, dict]:
    """Pre-training, then (``full``) reward model, RLAF and payment network."""
    m, info, t = new_model(data, seed, **cfg), {}, time.time()
    info["pretrain"] = pretrain(m, data, epochs["pretrain"], seed, log)
    info["evaluator"] = train_evaluator(m, data, epochs["evaluator"], seed, log)
    if full:
        info["rlaf"] = train_rlaf(m, data, epochs["rlaf"], seed, log)
        info["payment"] = train_payment(m, data, epochs["payment"], seed, log)
    info["train_seconds"] = round(time.time() - t, 1)
    m.eval()
    return m, info


def fit_mca(data: URData, seed: int, epochs: int, log=print):
    """The project's cascade (SASRec recall → pointwise pCTR ranker; trainer/model/baselines.py),
    trained as trainer/evaluate.py trains it; GSP is applied at evaluation."""
    from trainer.evaluate import EVAL_DEFAULTS, build_model, resolve_device, train
    from trainer.model.config import preset

    cfg = preset("small", **EVAL_DEFAULTS)
    cfg = cfg.replace(num_items=len(data.items), num_users=len(data.users))
    torch.manual_seed(seed)
    model = build_model("cascade", cfg)
    clicks = torch.zeros(len(data.items))
    for st in data.streams:
        for q in st.queries:
            for c, k in zip(q.cand, q.click):
                clicks[c] += k
    q = (clicks + 1.0) ** 0.75
    q[:2] = 0
    log_q = torch.log((q / q.sum()).clamp(min=1e-12))
    model.set_item_bids(data.bids)
    model.set_item_log_pop(log_q)
    t = time.time()
    parts = train(model, chunk_streams(data.streams, cfg.max_len), cfg, epochs, resolve_device("cpu"), seed, log_q)
    model.eval()
    return model, {"train_loss": parts, "train_seconds": round(time.time() - t, 1)}


@torch.no_grad()
def evaluate(models: dict, judge: UniROM, data: URData, k: int, chunk: int = 32, log=print) -> dict:
    """models: name → ("unirom", UniROM) | ("gsp", UniROM) | ("mca", (Cascade, its cfg)). → metrics per name."""
    n_items = len(data.items)
    corpus = torch.arange(2, n_items)
    acc = {name: {"top": [], "auc_s": [], "ctr": [], "rev": [], "rgt": 0.0, "u": 0.0, "ir": 0, "n_pay": 0}
           for name in models}
    clicks, valids, targets = [], [], []
    for s in range(0, len(data.held), chunk):
        reqs = data.held[s:s + chunk]
        B = len(reqs)
        b = collate(reqs, data, judge.cfg.max_len, 0, None)
        full = {**b, "cand": corpus.expand(B, -1), "mask": torch.ones(B, len(corpus), dtype=torch.bool)}
        eligible = torch.ones(B, len(corpus), dtype=torch.bool)
        for i, r in enumerate(reqs):
            eligible[i, [x - 2 for x in r.seen if x >= 2]] = False
        bids = data.bids[corpus].expand(B, -1).contiguous()
        exp_idx = (b["cand"] - 2).clamp(min=0)  # shown ads as corpus indices
        h_j = judge.recformer(b["user"], b["device"], b["hist_items"], b["hist_actions"], full["cand"], full["mask"])["h"]

        def judge_ctr(rows, slots, h_j=h_j):
            return eval_ctr(judge, h_j, slots, rows)

        clicks.append(b["label"])
        valids.append(b["mask"])
        targets.append(torch.tensor([r.target for r in reqs]))
        for name, (kind, model) in models.items():
            a = acc[name]
            if kind == "mca":
                cascade = model
                hb = collate_heldout(data.held_raw[s:s + chunk], data.items, cascade.cfg.max_len, n_items)
                elig_items = torch.zeros(B, n_items, dtype=torch.bool)
                elig_items[:, 2:] = eligible
                ids, logit = cascade.corpus(hb, elig_items)  # SASRec's top-N, ranker pCTR logits
                a["top"].append(torch.gather(ids, 1, logit.topk(min(50, ids.shape[1]), 1).indices))
                a["auc_s"].append(cascade.candidates(hb)["ctr"])
                ctr, ok, mb = torch.sigmoid(logit), logit > -1e8, data.bids[ids]
                mech = (lambda rows, bb, ctr=ctr, ok=ok: gsp(ctr[rows], bb, ok[rows], k))
                cfn = (lambda rows, slots, ids=ids: judge_ctr(rows, ids[rows].gather(1, slots) - 2))
                who = (ctr * mb).masked_fill(~ok, -1).topk(2 * k, 1).indices
            else:
                rec = model.recformer(b["user"], b["device"], b["hist_items"], b["hist_actions"], full["cand"],
                                      full["mask"])
                logit = rec["ctr_logit"]
                a["top"].append(logit.masked_fill(~eligible, -1e9).topk(50, 1).indices + 2)
                a["auc_s"].append(logit.gather(1, exp_idx))
                mb, cfn = bids, judge_ctr
                if kind == "unirom":
                    m = model.generator.match(rec["h"], logit, eligible)
                    mech = unirom_mechanism(model, rec["h"], logit, m, eligible)
                    who = regret_candidates(model.generator.logits(m, bids, eligible), 2 * k)
                else:
                    ctr = torch.sigmoid(logit)
                    mech = (lambda rows, bb, ctr=ctr: gsp(ctr[rows], bb, eligible[rows], k))
                    who = (ctr * bids).masked_fill(~eligible, -1).topk(2 * k, 1).indices
            rows = torch.arange(B)
            slots, pay = mech(rows, mb)
            pc = cfn(rows, slots)
            a["ctr"].append(pc)
            a["rev"].append((pc * pay).sum(1))
            a["ir"] += int((pay > mb.gather(1, slots) + 1e-6).sum())
            a["n_pay"] += pay.numel()
            rgt, u0 = expost_regret(mech, cfn, mb, who, GAMMAS)
            a["rgt"] += float(rgt.sum())
            a["u"] += float(u0.sum())
        log(f"  evaluated {s + B}/{len(data.held)}")
    click, valid, target = torch.cat(clicks), torch.cat(valids), torch.cat(targets)
    out = {}
    for name, a in acc.items():
        out[name] = {"recall@50": metrics.hit_ndcg(torch.cat(a["top"]), target, ks=(50,), ndcg_ks=())["hr@50"],
                     "auc": metrics.gauc(torch.cat(a["auc_s"]).float(), click, valid),
                     "ectr": 100.0 * float(torch.cat(a["ctr"]).mean()),
                     "erpm": 1000.0 * float(torch.cat(a["rev"]).mean()),
                     "ic": a["rgt"] / max(a["u"], 1e-12), "ir_violations": a["ir"], "payments": a["n_pay"]}
    return out


def run_seed(data_args: dict, names: list[str], seed: int, epochs: dict, mca_epochs: int, k: int,
             overrides: dict, log=print) -> dict:
    from streaming.replay.adlayer import load_requests

    t0 = time.time()
    requests, catalog = load_requests(data_args["dataset"], seed=seed, limit=data_args["limit"])
    data = build_data(requests, catalog, max_len=PRESET.get("max_len", 50), seed=seed)
    log(f"seed {seed}: {len(data.train)} training requests, {len(data.held)} held-out, {len(data.items) - 2} ads")
    cfg = {"n_slots": k, **overrides}
    res: dict = {"seed": seed, "n_train_requests": len(data.train), "n_heldout": len(data.held), "models": {}}
    log("judge (replay evaluator)")
    judge, res["judge"] = fit_unirom(data, seed + JUDGE_SEED_OFFSET, epochs, log, full=False, **cfg)
    models, info = {}, {}
    if "mca" in names:
        log("mca")
        cascade, info["mca"] = fit_mca(data, seed, mca_epochs, log)
        models["mca"] = ("mca", cascade)
    if {"unirom", "unirom-no-aucformer"} & set(names):
        log("unirom")
        m, i = fit_unirom(data, seed, epochs, log, full="unirom" in names, **cfg)
        if "unirom" in names:
            models["unirom"], info["unirom"] = ("unirom", m), i
        if "unirom-no-aucformer" in names:
            models["unirom-no-aucformer"], info["unirom-no-aucformer"] = ("gsp", m), {"shares": "unirom's RecFormer"}
    if "unirom-no-gcf" in names:
        log("unirom-no-gcf")
        m, i = fit_unirom(data, seed, epochs, log, **{**cfg, **VARIANTS["unirom-no-gcf"]})
        models["unirom-no-gcf"], info["unirom-no-gcf"] = ("unirom", m), i
    ev = evaluate({n: models[n] for n in names}, judge, data, k, log=log)
    for n in names:
        res["models"][n] = {**ev[n], "train": info[n]}
    res["wall_seconds"] = round(time.time() - t0, 1)
    return res


SUMMARY = ("recall@50", "auc", "ectr", "erpm", "ic", "ir_violations")


def summarize(runs: list[dict]) -> dict:
    out = {}
    for n in runs[0]["models"]:
        out[n] = {}
        for key in SUMMARY:
            v = [r["models"][n][key] for r in runs]
            out[n][key] = {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0}
    return out


def print_table(summary: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    t.add_column("model")
    for key in SUMMARY:
        t.add_column(key, justify="right")
    for n, m in summary.items():
        t.add_row(n, *(f"{m[k]['mean']:.0f} ± {m[k]['sd']:.0f}" if k == "ir_violations" else
                       f"{m[k]['mean']:.1%} ± {m[k]['sd']:.1%}" if k == "ic" else
                       f"{m[k]['mean']:.4f} ± {m[k]['sd']:.4f}" for k in SUMMARY))
    Console(width=200).print(t)


def run(models: str = ",".join(MODELS), dataset: str = "movielens-100k", limit: int | None = 10000,
        seeds: str = "0", slots: int = 3, mca_epochs: int = 3, threads: int = 1, out: str | None = None,
        epochs: dict | None = None, sets: list[str] = (), log=print) -> dict:
    torch.set_num_threads(threads)
    names = [m.strip() for m in models.split(",") if m.strip()]
    bad = set(names) - set(MODELS)
    if bad:
        raise ValueError(f"unknown models {sorted(bad)}: use {', '.join(MODELS)}")
    overrides = {}
    for kv in sets:
        key, v = kv.split("=", 1)
        overrides[key] = json.loads(v) if v[:1] in "0123456789-[{tfn" else v
    ep = {**EPOCHS, **(epochs or {})}
    runs = []
    result = {"dataset": dataset, "limit": limit, "slots": slots, "epochs": ep, "mca_epochs": mca_epochs,
              "preset": {**PRESET, **overrides}, "gammas": GAMMAS, "runs": runs}
    for sd in [int(x) for x in seeds.split(",")]:
        runs.append(run_seed({"dataset": dataset, "limit": limit}, names, sd, ep, mca_epochs, slots, overrides, log))
        result["summary"] = summarize(runs)
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(result, indent=2, default=float))
    print_table(result["summary"], f"{dataset} (limit {limit}), K={slots} slots, seeds {seeds}: mean ± sd")
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--dataset", default="movielens-100k")
    p.add_argument("--limit", type=int, default=10000, help="first N interactions (0 = all)")
    p.add_argument("--seeds", default="0")
    p.add_argument("--slots", type=int, default=3)
    p.add_argument("--mca-epochs", type=int, default=3)
    for stage, v in EPOCHS.items():
        p.add_argument(f"--{stage}-epochs", type=float, default=v)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: fastest on a busy 2-core machine)")
    p.add_argument("--out", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="UniROMConfig override")
    a = p.parse_args(argv)
    run(a.models, a.dataset, a.limit or None, a.seeds, a.slots, a.mca_epochs, a.threads, a.out,
        {s: getattr(a, f"{s}_epochs") for s in EPOCHS}, a.set)


if __name__ == "__main__":
    main()
