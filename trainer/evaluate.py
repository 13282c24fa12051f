"""Offline training + evaluation of OneRanker, its ablations and the baselines on one dataset.

Same datasets and ad layer as the replay tool (streaming.replay.adlayer.load_requests); split by
time with each user's last request held out; histories built with features.tokens.TokenSequence
(click and conversion tokens; impressions are popularity-sampled noise in the replayed datasets).
Every model gets the same data, epochs, batch size and positions per sequence; the peak lr is per
model family, each the best tried on the validation split (``--split valid``: every user's
second-to-last request held out, the last one dropped), never on the test requests.

    python -m trainer.evaluate --dataset movielens-100k --models all --out eval.json
    python -m trainer.evaluate --split valid --curves --models sasrec,oneranker   # tuning
"""

from __future__ import annotations

import argparse
import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from trainer import metrics
from trainer.batching import collate_chunks, collate_heldout, resolve_device, to_device
from trainer.clipping import clip_groups, clipped_step
from trainer.data import IdMap, build_streams, chunk_streams
from trainer.infer import rank_topk, score_candidates
from trainer.losses import oneranker_loss
from trainer.model.baselines import Cascade, Popularity, SASRec
from trainer.model.config import ABLATIONS, preset as make_preset
from trainer.model.oneranker import OneRanker

BASELINES = ("popularity", "sasrec", "cascade")
# Offline-harness training defaults on top of the preset (``--set`` still overrides them), chosen on
# the validation split (each user's second-to-last request, 3 epochs). Step 3 also trains on the
# generator's top-20 retrieval. Peak lr 4e-3 for every model, the best tried on validation: SASRec's
# HR@10 2e-3 0.067, 4e-3 0.089, 8e-3 0.076; OneRanker (with embed_norm, seed 0) value-NDCG@10 / GAUC
# 0.645 / 0.772 at 2e-3, 0.680 / 0.806 at 4e-3. The online trainer keeps the preset's lr (2e-3).
EVAL_DEFAULTS = {"rank_retrieved": 20, "popularity_feature": True, "lr": 4e-3}  # see OneRankerConfig
# Epochs of the ad-request protocol. 3 left OneRanker short of the cascade (seed 0, validation,
# value-NDCG@10 / GAUC: OneRanker 0.680 / 0.806 at 3, 0.706 / 0.830 at 5; cascade 0.691 / 0.813 at 3,
# 0.705 / 0.832 at 5): OneRanker, with more losses and parameters, needs the longer run more.
AD_REQUEST_EPOCHS = 5
ALL_MODELS = BASELINES + tuple(ABLATIONS)


def autocast(dev: torch.device, bf16: bool | None = None):
    """bf16 autocast for training: on by default on CUDA only; ``bf16=True`` forces it on CPU too,
    which is how the tests run the CUDA path's reduced-precision dtypes on a machine without a GPU."""
    on = dev.type == "cuda" if bf16 is None else bf16
    return torch.autocast(dev.type, dtype=torch.bfloat16) if on else nullcontext()


def build_model(name: str, cfg):
    if name == "popularity":
        return Popularity(cfg)
    if name == "sasrec":
        return SASRec(cfg)
    if name == "cascade":
        return Cascade(cfg)
    if name in ABLATIONS:
        return OneRanker(cfg.replace(**ABLATIONS[name]))
    raise ValueError(f"unknown model {name!r}: use {', '.join(ALL_MODELS)}")


def train(model, chunks, cfg, epochs: int, dev: torch.device, seed: int, log_q: torch.Tensor,
          progress=None, label: str = "", on_epoch=None, bf16: bool | None = None) -> dict:
    """Train ``model`` for ``epochs`` passes over ``chunks``. Returns last-epoch mean loss parts.
    ``on_epoch(epoch, parts)`` is called after every epoch (validation curves)."""
    if isinstance(model, Popularity):
        return {}
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator(device=dev).manual_seed(seed) if dev.type == "cuda" else torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(chunks) / cfg.batch_size)
    total = epochs * steps_per_epoch
    warm = max(1, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then linear decay to 10%
        opt, lambda s: min((s + 1) / warm, max(0.1, 1.0 - 0.9 * (s - warm) / max(1, total - warm))))
    amp = autocast(dev, bf16)
    task = progress.add_task(label, total=total) if progress is not None else None
    parts_sum: dict[str, float] = {}
    groups = clip_groups(model)
    model.train()
    for ep in range(epochs):
        if isinstance(model, OneRanker) and (ep == 0 or not cfg.centroid_every):
            model.refresh_centroids(seed=seed + ep)
        perm = rng.permutation(len(chunks))
        parts_sum = {}
        for s in range(steps_per_epoch):
            idx = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            batch = to_device(collate_chunks([chunks[i] for i in idx], cfg.max_len, cfg.train_positions, rng), dev)
            with amp:
                if isinstance(model, OneRanker):
                    pool = None
                    if cfg.rank_hard_negatives and model.ranker is not None:  # uniform pool per step
                        pool = torch.randint(2, cfg.num_items, (min(512, cfg.num_items),), device=dev,
                                             generator=gen)
                    out = model(batch["user"], batch["items"], batch["actions"], batch["times"],
                                batch["pos"], batch["device"], batch["cand"], pool, retrieve=cfg.rank_retrieved,
                                ret_targets=batch["targets"][:, :, 1] if cfg.rank_retrieved_covered_only else None,
                                seen=batch["cand_seen"] if cfg.full_history_seen else None)
                    loss, parts = oneranker_loss(model, out, batch, log_q, gen)
                else:
                    loss, parts = model.loss(batch, log_q, gen)
            clipped_step(loss, opt, sched, groups, cfg.clip_norm)
            if isinstance(model, OneRanker) and cfg.centroid_every and (s + 1) % cfg.centroid_every == 0:
                model.refresh_centroids(seed=seed + ep, iters=1, rate=cfg.centroid_rate)
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v / steps_per_epoch
            if task is not None:
                progress.update(task, advance=1, description=f"{label} ep{ep + 1} " +
                                " ".join(f"{k}={v:.3f}" for k, v in parts.items()))
        if on_epoch is not None:
            on_epoch(ep, parts_sum)
            model.train()
    return parts_sum  # no refresh after the last epoch: evaluate with the fake items it trained with


@torch.no_grad()
def evaluate_model(model, held_batches: list[dict], dev: torch.device) -> dict:
    """Full-corpus retrieval on the held-out clicks (seen items excluded), ranking metrics on the
    held-out requests' exposed ads, and Step-2/Step-3 consistency for OneRanker with Step 3."""
    model.eval()
    tops, targets, scores, ctrs, clicks, values, valids, cons, cseen = [], [], [], [], [], [], [], [], []
    for hb in held_batches:
        b = to_device(hb, dev)
        eligible = ~b["seen"]
        dev_ctx = b["device"][:, 0]
        if isinstance(model, OneRanker):
            ids, _, extra = rank_topk(model, b["user"], b["items"], b["actions"], b["times"], dev_ctx,
                                      eligible, k=50, return_all=True)
            if model.ranker is not None:
                cons.append({k: v.float().cpu() for k, v in extra.items()})
            sc = score_candidates(model, b["user"], b["items"], b["actions"], b["times"], dev_ctx, b["cand"][:, 0],
                                  b["cand_seen"][:, 0] if model.cfg.full_history_seen else None)
        elif isinstance(model, Cascade):
            rid, rs = model.corpus(b, eligible)
            ids = torch.gather(rid, 1, rs.topk(min(50, rs.shape[1]), 1).indices)
            sc = model.candidates(b)
        else:
            s = model.corpus(b).float().masked_fill(~eligible, -1e9)
            ids = s.topk(50, 1).indices
            sc = model.candidates(b)
        tops.append(ids.cpu())
        targets.append(b["target"].cpu())
        scores.append(sc["score"].float().cpu())
        ctrs.append(sc["ctr"].float().cpu() if "ctr" in sc else None)
        clicks.append(b["click"].cpu())
        values.append(b["value"].cpu())
        valids.append(b["cand"][:, 0].cpu() > 0)
        cseen.append(b["cand_seen"][:, 0].cpu())
    top, target = torch.cat(tops), torch.cat(targets)
    score, click, value, valid = torch.cat(scores), torch.cat(clicks), torch.cat(values), torch.cat(valids)
    res = metrics.hit_ndcg(top, target)
    res["vndcg@10"] = metrics.value_ndcg(score, value, valid, 10)
    # The same with already-seen candidates moved last by a rule: how much of a model's ranking
    # is more than a seen-item filter (gen-only cannot see those flags, Step 3 can).
    res["vndcg@10_unseen_first"] = metrics.value_ndcg(score - 1e6 * torch.cat(cseen).float(), value, valid, 10)
    res["revenue@3"] = metrics.revenue_at(score, value, valid, 3)
    has_ctr = all(c is not None for c in ctrs)
    ctr = torch.cat(ctrs) if has_ctr else None
    res["gauc"] = metrics.gauc(ctr if has_ctr else score, click, valid)
    res["logloss"] = metrics.logloss(ctr, click, valid) if has_ctr else None
    if cons:
        res["consistency"] = metrics.consistency(torch.cat([c["gen"] for c in cons]),
                                                 torch.cat([c["score"] for c in cons]),
                                                 torch.cat([c["drop"] for c in cons]).bool())
    return res


def evaluate_main(dataset: str = "movielens-100k", models: str | list[str] = "all", preset: str = "small",
                  epochs: int = AD_REQUEST_EPOCHS, device: str = "auto", out: str | None = None, seed: int = 0,
                  limit: int | None = None, threads: int = 2, show: bool = True, split: str = "test",
                  curves: bool = False, bf16: bool | None = None, **overrides) -> dict:
    """Train and evaluate every model in ``models`` (comma list, or 'all') under one budget; print a
    table; write JSON to ``out``. Returns the result dict.

    ``split="valid"`` drops every user's last request first, so each user's second-to-last request
    is held out: tune there, report on "test". ``curves`` evaluates after every epoch.
    ``bf16``: autocast training in bf16 (default: on CUDA only)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from streaming.replay.adlayer import load_requests

    t_start = time.time()
    torch.set_num_threads(threads)
    dev = resolve_device(device)
    names = list(ALL_MODELS) if models in ("all", ["all"]) else (
        [m.strip() for m in models.split(",")] if isinstance(models, str) else list(models))
    console = Console(quiet=not show, width=200)
    requests, catalog = load_requests(dataset, seed=seed, limit=limit)
    if split == "valid":
        last: dict[str, tuple] = {}
        for r in requests:
            last[r.user_id] = max(last.get(r.user_id, (r.ts, r.request_id)), (r.ts, r.request_id))
        requests = [r for r in requests if (r.ts, r.request_id) != last[r.user_id]]
    elif split != "test":
        raise ValueError(f"split must be test or valid, not {split!r}")
    items, users = IdMap(), IdMap()
    cfg0 = make_preset(preset, **{**EVAL_DEFAULTS, **overrides})
    streams, held = build_streams(requests, catalog, items, users, n_targets=cfg0.n_targets, seed=seed)
    chunks = chunk_streams(streams, cfg0.max_len)
    cfg = cfg0.replace(num_items=len(items), num_users=len(users))
    bids = torch.ones(len(items))
    for a, b in zip(catalog.ad_id, catalog.bid):
        bids[items.get(str(a))] = float(b)
    clicks = torch.zeros(len(items))
    for st in streams:
        for q in st.queries:
            for c, k in zip(q.cand, q.click):
                clicks[c] += k
    q = (clicks + 1.0) ** 0.75
    q[:2] = 0
    log_q = torch.log((q / q.sum()).clamp(min=1e-12)).to(dev)
    held_batches = [collate_heldout(held[i:i + 256], items, cfg.max_len, cfg.num_items)
                    for i in range(0, len(held), 256)]
    console.print(f"[bold]{dataset}[/]: {sum(len(s.queries) for s in streams)} training requests in "
                  f"{len(chunks)} sequences, {len(held)} held-out requests, {len(items) - 2} ads; "
                  f"preset={preset} epochs={epochs} device={dev}")
    results: dict = {"dataset": dataset, "preset": preset, "epochs": epochs, "seed": seed, "device": str(dev),
                     "split": split, "bf16": dev.type == "cuda" if bf16 is None else bf16,
                     "config": {k: v for k, v in cfg.to_dict().items()}, "n_train_requests":
                     sum(len(s.queries) for s in streams), "n_heldout": len(held), "models": {}}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        for name in names:
            torch.manual_seed(seed)
            model = build_model(name, cfg).to(dev)
            if hasattr(model, "set_item_bids"):
                model.set_item_bids(bids.to(dev))
            if hasattr(model, "set_item_log_pop"):
                model.set_item_log_pop(log_q)
            if isinstance(model, Popularity):
                model.fit(clicks)
            t0 = time.time()
            curve = []

            def on_epoch(ep, parts, model=model, name=name, curve=curve):
                r = evaluate_model(model, held_batches, dev) if curves else {}
                curve.append({"epoch": ep + 1, **{k: round(v, 4) for k, v in parts.items()},
                              **{k: round(r[k], 4) for k in ("hr@10", "ndcg@10", "vndcg@10", "gauc") if k in r}})
                if curves:
                    progress.console.print(f"  {name} " + " ".join(f"{k}={v}" for k, v in curve[-1].items()))

            parts = train(model, chunks, getattr(model, "cfg", cfg), epochs, dev, seed, log_q, progress, name,
                          on_epoch, bf16)
            t1 = time.time()
            r = evaluate_model(model, held_batches, dev)
            r["train_loss"] = parts
            r["curve"] = curve
            r["train_seconds"] = round(t1 - t0, 1)
            r["eval_seconds"] = round(time.time() - t1, 1)
            r["params"] = sum(p.numel() for p in model.parameters())
            r["lr"] = getattr(model, "cfg", cfg).lr
            results["models"][name] = r
            progress.console.print(f"{name}: hr@10={r['hr@10']:.4f} ndcg@10={r['ndcg@10']:.4f} "
                                   f"vndcg@10={r['vndcg@10']:.4f} gauc={r['gauc']:.4f} "
                                   f"overlap@10={r.get('consistency', {}).get('overlap@10', float('nan')):.3f} "
                                   f"train={r['train_seconds']}s")
            if out:  # partial results survive an interrupted run
                Path(out).parent.mkdir(parents=True, exist_ok=True)
                Path(out).write_text(json.dumps(results, indent=2))
    results["wall_seconds"] = round(time.time() - t_start, 1)
    table = Table(title=f"{dataset} — {preset} preset, {epochs} epochs, {dev}")
    cols = ["hr@1", "hr@5", "hr@10", "hr@50", "ndcg@10", "ndcg@50", "vndcg@10", "revenue@3", "gauc", "logloss",
            "overlap@10", "rank_diff", "train_s"]
    table.add_column("model")
    for c in cols:
        table.add_column(c, justify="right")
    for name, r in results["models"].items():
        cons = r.get("consistency", {})
        vals = [r.get(c) for c in cols[:10]] + [cons.get("overlap@10"), cons.get("mean_abs_rank_diff"),
                                                 r["train_seconds"]]
        table.add_row(name, *("-" if v is None else f"{v:.4f}" if isinstance(v, float) and abs(v) < 10
                              else f"{v:.1f}" for v in vals))
    console.print(table)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2))
        console.print(f"wrote {out}")
    return results


SUMMARY_KEYS = ("hr@10", "ndcg@10", "vndcg@10", "vndcg@10_unseen_first", "gauc")


def summarize_runs(runs: list[dict]) -> dict:
    """Several evaluate_main results (one per seed) → per model mean and sample SD of the headline
    metrics and of the Step-2/Step-3 overlap@10, plus the vNDCG@10 gain of full OneRanker over
    generation-only per run (the issue's ≥ 5% criterion) and its mean."""
    out: dict = {"seeds": [r["seed"] for r in runs], "models": {}}
    for name in runs[0]["models"]:
        rows = [r["models"][name] for r in runs if name in r["models"]]
        vals = {k: [x[k] for x in rows if x.get(k) is not None] for k in SUMMARY_KEYS}
        vals["overlap@10"] = [x["consistency"]["overlap@10"] for x in rows if "consistency" in x]
        out["models"][name] = {k: {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0}
                               for k, v in vals.items() if v}
    for key in ("vndcg@10", "vndcg@10_unseen_first"):
        gains = [r["models"]["oneranker"][key] / r["models"]["oneranker-gen-only"][key] - 1.0 for r in runs
                 if {"oneranker", "oneranker-gen-only"} <= r["models"].keys()]
        if gains:
            out[f"{key}_gain_full_vs_gen_only"] = {"per_seed": gains, "mean": float(np.mean(gains))}
    return out


def print_summary(summary: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=200)
    table = Table(title=f"mean ± sd over seeds {summary['seeds']}")
    table.add_column("model")
    keys = (*SUMMARY_KEYS, "overlap@10")
    for k in keys:
        table.add_column(k, justify="right")
    for name, m in summary["models"].items():
        table.add_row(name, *(f"{m[k]['mean']:.4f} ± {m[k]['sd']:.4f}" if k in m else "-" for k in keys))
    console.print(table)
    for key in ("vndcg@10", "vndcg@10_unseen_first"):
        g = summary.get(f"{key}_gain_full_vs_gen_only")
        if g:
            console.print(f"{key}: full OneRanker vs generation-only " +
                          " ".join(f"{x:+.1%}" for x in g["per_seed"]) + f" (mean {g['mean']:+.1%})")


def evaluate_seeds(seeds: list[int], out: str | None = None, **kw) -> dict:
    """evaluate_main once per seed (data layer and training both reseeded); each run's JSON next
    to ``out`` as <stem>_seed<N>.json, the summary (summarize_runs) and every run in ``out``."""
    runs = []
    for sd in seeds:
        run_out = None if out is None else str(Path(out).with_name(f"{Path(out).stem}_seed{sd}.json"))
        runs.append(evaluate_main(seed=sd, out=run_out, **kw))
    summary = summarize_runs(runs)
    print_summary(summary)
    if out:
        Path(out).write_text(json.dumps({"summary": summary, "runs": runs}, indent=2))
    return summary


def parse_overrides(sets) -> dict:
    """KEY=VALUE strings → config overrides (JSON values where they parse as such)."""
    overrides = {}
    for kv in sets:
        if "=" not in kv:
            raise ValueError(f"--set wants KEY=VALUE, got {kv!r}")
        k, v = kv.split("=", 1)
        overrides[k] = json.loads(v) if v[:1] in "0123456789-[{tfn" else v
    return overrides


def run(seed: int = 0, seeds: str | None = None, out: str | None = None, sets: list[str] = (),
        protocol: str = "ad-request", patience: int | None = None, **kw) -> dict:
    """The command line's entry (``python -m trainer.evaluate`` and ``oneranker evaluate``):
    ``seeds`` "0,1,2" runs evaluate_seeds, else one evaluate_main with ``seed``; ``sets`` are
    KEY=VALUE config overrides (JSON values where they parse as such) for every model.
    ``protocol="next-item"``: the leave-last-out sequential protocol of trainer/nextitem.py."""
    overrides = parse_overrides(sets)
    if protocol == "next-item":
        from trainer.nextitem import DEFAULT_MODELS, DEFAULT_PATIENCE, run_nextitem

        for k in ("split", "curves", "bf16"):  # the next-item protocol validates every epoch itself
            kw.pop(k, None)
        if kw.get("models") in (None, "all"):
            kw["models"] = DEFAULT_MODELS if kw.get("models") is None else "all"
        return run_nextitem([int(x) for x in seeds.split(",")] if seeds else [seed], out=out,
                            patience=DEFAULT_PATIENCE if patience is None else patience, **kw, **overrides)
    if protocol != "ad-request":
        raise ValueError(f"protocol must be ad-request or next-item, not {protocol!r}")
    if kw.get("epochs") is None:
        kw["epochs"] = AD_REQUEST_EPOCHS
    if kw.get("models") is None:
        kw["models"] = "all"
    if seeds:
        return evaluate_seeds([int(x) for x in seeds.split(",")], out=out, **kw, **overrides)
    return evaluate_main(out=out, seed=seed, **kw, **overrides)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="movielens-100k")
    p.add_argument("--models", default=None, help=f"comma list or 'all': {', '.join(ALL_MODELS)} (default all; "
                                                  "next-item: popularity,sasrec,oneranker-gen-only)")
    p.add_argument("--preset", default="small")
    p.add_argument("--protocol", default="ad-request", choices=["ad-request", "next-item"],
                   help="ad-request: each user's last request held out (Steps 1-3); next-item: leave-last-out "
                        "sequential recommendation, full-corpus + 100-sampled-negative ranking (trainer/nextitem.py)")
    p.add_argument("--epochs", type=int, default=None, help="default 5 (ad-request), at most 40 with early "
                                                             "stopping on validation (next-item)")
    p.add_argument("--patience", type=int, default=None, help="next-item: epochs without a better validation HR@10 (default 5)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", default=None, help="comma list: one run per seed and a mean ± sd summary")
    p.add_argument("--limit", type=int, default=None, help="first N interactions/requests only")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--split", default="test", choices=["test", "valid"],
                   help="valid: hold out each user's second-to-last request (for tuning)")
    p.add_argument("--curves", action="store_true", help="evaluate after every epoch")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast in training (default: on CUDA only)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set gamma=0.5 (applies to every model)")
    a = p.parse_args(argv)
    run(a.seed, a.seeds, a.out, a.set, a.protocol, a.patience, dataset=a.dataset, models=a.models,
        preset=a.preset, epochs=a.epochs,
        device=a.device, limit=a.limit, threads=a.threads, split=a.split, curves=a.curves, bf16=a.bf16)


if __name__ == "__main__":
    main()
