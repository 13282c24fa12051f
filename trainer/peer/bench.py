"""``oneranker bench quality``: RecBole's SASRec (the peer library, its own environment) and our
models on the SAME split and budget, one table.

* Split: trainer/nextitem_data.py's leave-last-out split, written as RecBole atomic files
  (trainer/peer/atomic.py) and read back by RecBole's leave-one-out (``LS: valid_and_test``,
  ``order: TO``, nothing filtered). RecBole's Pop scored with our protocol must equal our
  popularity: that is the split-equivalence check (``split_check`` in the JSON).
* Budget: the same max epochs, early-stopping patience (RecBole's ``stopping_step`` = patience - 1:
  RecBole stops when the count of epochs without improvement EXCEEDS it), model sizes (d_model,
  layers, heads, FFN inner size, max_len, dropout, activation), learning rate, full softmax (CE) and
  the same number of optimizer steps per epoch with the same training targets per step: our SASRec
  trains on windows of ≤ max_len positions, every position supervised, ``batch_size`` windows per
  step; RecBole trains on one prefix per target (n - 1 per user), so its ``train_batch_size`` is
  ceil(training targets / our steps per epoch) (644 on MovieLens-100K: 97171 targets, 151 steps).
  Differences that remain: RecBole's Adam at a constant lr (ours: AdamW without weight decay, 10%
  warm-up, linear decay to 10%, gradient clipping), its post-LN encoder with embedding LayerNorm
  (ours: pre-LN with a user token), and its early stopping on Hit@10 WITHOUT excluding the user's
  earlier items (RecBole's sequential full-sort), while its test figures here are scored with our
  protocol (recbole_sasrec.py ``our_protocol``).
* Ours: trainer/nextitem.py (``nextitem_main``) per seed, or reused from a next-item results JSON
  (``--ours-from``) when its dataset, preset, epochs, patience and model config equal this run's
  (otherwise refused).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PEER_VENV = ROOT / ".venv-recbole"
SCRIPT = Path(__file__).with_name("recbole_sasrec.py")
RECBOLE_MODELS = {"recbole-sasrec": "SASRec", "recbole-pop": "Pop"}
OUR_MODELS = ("popularity", "sasrec", "oneranker-gen-only", "oneranker")
LABELS = {"recbole-sasrec": "RecBole SASRec", "recbole-pop": "RecBole Pop", "sasrec": "our SASRec",
          "oneranker-gen-only": "OneRanker gen-only", "oneranker": "OneRanker (full)", "popularity": "popularity"}
METRICS = ("hr@1", "hr@5", "hr@10", "hr@50", "ndcg@10", "ndcg@50")


def peer_python() -> Path:
    """The peer environment's interpreter; created with ``make peer-venv`` when missing.
    ``ONERANKER_PEER_PYTHON`` names another interpreter that can import recbole (a GPU machine's
    image with the wheels on ``ONERANKER_PEER_PYTHONPATH``)."""
    if os.environ.get("ONERANKER_PEER_PYTHON"):
        return Path(os.environ["ONERANKER_PEER_PYTHON"])
    py = PEER_VENV / "bin" / "python"
    if not (py.exists() and any(PEER_VENV.glob(".installed-*"))):
        print(f"{PEER_VENV.name} missing: creating it with `make peer-venv` (torch 2.13.0 CPU wheel + recbole "
              "1.2.1 and its dependencies, about a minute; never part of the project's own environment)", flush=True)
        subprocess.run(["make", "-C", str(ROOT), "peer-venv"], check=True)
    return py


def our_config(split, preset: str, overrides: dict | None = None):
    """The base config trainer.nextitem.nextitem_main builds for this split (before per-model defaults)."""
    from trainer.model.config import preset as make_preset
    from trainer.nextitem import FULL_SOFTMAX_MAX_ITEMS, NEXTITEM_DEFAULTS

    overrides = overrides or {}
    cfg = make_preset(preset, **{**NEXTITEM_DEFAULTS, **overrides})
    if "num_negatives" not in overrides and split.num_items <= FULL_SOFTMAX_MAX_ITEMS:
        cfg = cfg.replace(num_negatives=0)
    return cfg.replace(num_items=split.num_items, num_users=len(split.users))


def recbole_budget(split, cfg, epochs: int, patience: int) -> dict:
    """RecBole SASRec's config matched to our SASRec's (see the module docstring)."""
    from trainer.nextitem_data import training_windows

    windows = training_windows(split, cfg.max_len, cfg.window_stride)
    targets = sum(w.b - w.c for w in windows)
    steps = math.ceil(len(windows) / cfg.batch_size)
    return {"hidden_size": cfg.d_model, "inner_size": cfg.ffn_mult * cfg.d_model, "n_layers": cfg.n_layers,
            "n_heads": cfg.n_heads, "hidden_dropout_prob": cfg.dropout, "attn_dropout_prob": cfg.dropout,
            "hidden_act": "relu", "MAX_ITEM_LIST_LENGTH": cfg.max_len, "learning_rate": cfg.lr,
            "train_batch_size": math.ceil(targets / steps), "epochs": epochs, "stopping_step": max(0, patience - 1),
            "loss_type": "CE"}, {"our_windows": len(windows), "our_steps_per_epoch": steps,
                                 "training_targets": targets}


def run_recbole(py: Path, atomic_dir: Path, name: str, rb_cfg: dict, seeds: list[int], threads: int, jobs: int,
                cache: Path, models: list[str], log, device: str = "cpu") -> dict[int, dict]:
    """One peer-environment subprocess per seed (``jobs`` at a time); results cached per seed."""
    cache.mkdir(parents=True, exist_ok=True)

    def one(seed: int) -> dict:
        out = cache / f"seed{seed}.json"
        if out.exists():
            got = json.loads(out.read_text())
            if set(models) <= set(got.get("models", {})):
                log(f"RecBole seed {seed}: reusing {out}")
                return got
        cfg = {"atomic_dir": str(atomic_dir), "name": name, "work_dir": str(cache / f"work{seed}"),
               "out": str(out) + ".part", "models": models, "seed": seed, "threads": threads, "recbole": rb_cfg, "device": device}
        cpath = cache / f"seed{seed}.config.json"
        cpath.write_text(json.dumps(cfg, indent=2))
        t0 = time.time()
        env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1", "PYTHONWARNINGS": "ignore",
               "OMP_NUM_THREADS": str(threads)}
        env.pop("PYTHONPATH", None)  # the peer script imports recbole + stdlib only
        if os.environ.get("ONERANKER_PEER_PYTHONPATH"):
            env["PYTHONPATH"] = os.environ["ONERANKER_PEER_PYTHONPATH"]
        with open(cache / f"seed{seed}.log", "w") as lf:
            p = subprocess.Popen([str(py), str(SCRIPT), str(cpath)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, env=env, cwd=str(cache))
            for line in p.stdout:
                lf.write(line)
                lf.flush()
                if line.startswith(("RecBole", "  RecBole")):
                    log(f"[seed {seed}] {line.rstrip()}")
            if p.wait():
                raise RuntimeError(f"RecBole seed {seed} failed (exit {p.returncode}): see {cache / f'seed{seed}.log'}")
        got = json.loads(Path(cfg["out"]).read_text())
        got["wall_seconds"] = round(time.time() - t0, 1)
        out.write_text(json.dumps(got, indent=2))
        Path(cfg["out"]).unlink()
        return got

    with ThreadPoolExecutor(max(1, jobs)) as ex:
        return dict(zip(seeds, ex.map(one, seeds)))


def comparable(stored: dict, dataset: str, preset: str, epochs: int, patience: int, cfg_dict: dict,
               n_eval: int, n_train: int) -> list[str]:
    """Why a stored next-item run is NOT this run's protocol (empty when it is)."""
    why = []
    for k, want in (("dataset", dataset), ("preset", preset), ("epochs", epochs), ("patience", patience),
                    ("n_eval_users", n_eval), ("n_train_interactions", n_train)):
        if stored.get(k) != want:
            why.append(f"{k}: stored {stored.get(k)!r} vs {want!r}")
    sc = stored.get("config", {})
    for k in sorted(set(sc) | set(cfg_dict)):
        a, b = sc.get(k), cfg_dict.get(k)
        if (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
            why.append(f"config.{k}: stored {a!r} vs {b!r}")
    return why


def bench_quality(dataset: str = "movielens-100k", seeds: list[int] = (0, 1, 2),
                  models: str = "recbole-sasrec,popularity,sasrec,oneranker-gen-only", out: str | None = None,
                  epochs: int | None = None, patience: int | None = None, threads: int = 2, jobs: int = 1,
                  preset: str = "small", ours_from: str | None = None, ours_missing: str = "train",
                  limit: int | None = None, device: str = "cpu", overrides: dict | None = None) -> dict:
    from streaming.replay.datasets import load_interactions
    from trainer.nextitem import DEFAULT_EPOCHS, DEFAULT_PATIENCE, nextitem_main
    from trainer.nextitem_data import split_interactions
    from trainer.nextitem_metrics import mean_sd
    from trainer.peer.atomic import write_atomic

    t_start = time.time()
    lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    epochs = DEFAULT_EPOCHS if epochs is None else epochs
    patience = DEFAULT_PATIENCE if patience is None else patience
    seeds = list(seeds)
    names = [m.strip() for m in models.split(",") if m.strip()]
    bad = [m for m in names if m not in RECBOLE_MODELS and m not in OUR_MODELS]
    if bad:
        raise ValueError(f"unknown model(s) {bad}: use {', '.join([*RECBOLE_MODELS, *OUR_MODELS])}")
    inter = load_interactions(dataset)
    if limit:
        inter = inter.head(limit)
    split = split_interactions(inter)
    overrides = dict(overrides or {})
    cfg = our_config(split, preset, overrides)
    rb_cfg, budget = recbole_budget(split, cfg, epochs, patience)
    n_eval = len(split.eval_rows())
    n_train = sum(len(split.train_seq(i)) for i in range(len(split.seqs)))
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(dataset).name) + (f"-{limit}" if limit else "")
    base = ROOT / ".oneranker" / "peer" / slug
    atomic_dir = base / "atomic"
    data_dir = write_atomic(split, atomic_dir, "peer")
    digest = hashlib.sha1((data_dir / "peer.inter").read_bytes()).hexdigest()[:10]
    log(f"{dataset}: {len(split.seqs)} users ({n_eval} evaluated), {split.num_items - 2} items, {n_train} training "
        f"interactions; seeds {seeds}; epochs≤{epochs} patience={patience}; atomic files {data_dir} ({digest})")
    log(f"budget: ours {budget['our_steps_per_epoch']} steps/epoch of {cfg.batch_size} windows "
        f"({budget['training_targets']} targets/epoch) → RecBole train_batch_size {rb_cfg['train_batch_size']}")
    res: dict = {"bench": "quality", "dataset": dataset, "seeds": seeds, "epochs": epochs, "patience": patience,
                 "preset": preset, "device": device, "overrides": overrides, "budget": budget, "recbole_config": rb_cfg, "our_config": cfg.to_dict(),
                 "n_eval_users": n_eval, "n_train_interactions": n_train, "atomic_sha1": digest,
                 "per_seed": {}, "recbole_runs": {}, "ours_source": {}}

    # --- RecBole (the peer environment) ---
    rb_names = [m for m in names if m in RECBOLE_MODELS]
    if rb_names:
        rb_models = ["Pop"] + (["SASRec"] if "recbole-sasrec" in rb_names else [])
        key = hashlib.sha1(json.dumps([rb_cfg, digest, rb_models] + ([device] if device != "cpu" else []),
                                      sort_keys=True).encode()).hexdigest()[:10]
        runs = run_recbole(peer_python(), atomic_dir, "peer", rb_cfg, seeds, threads, jobs, base / f"recbole-{key}",
                           rb_models, log, device)
        res["recbole_runs"] = {str(s): r for s, r in runs.items()}
        res["recbole_version"] = next(iter(runs.values())).get("recbole")
        for s, r in runs.items():
            for m in rb_names:
                mr = r["models"][RECBOLE_MODELS[m]]
                res["per_seed"].setdefault(m, {})[str(s)] = {**{k: mr["test"][k] for k in METRICS},
                                                             "native_hr@10": mr["native_test"].get("hit@10"),
                                                             "train_seconds": mr["train_seconds"],
                                                             "epochs_run": mr["epochs_run"],
                                                             "best_epoch": mr["best_epoch"]}
            res.setdefault("pop_recbole_per_seed", {})[str(s)] = r["models"]["Pop"]["test"]

    # --- ours ---
    ours = [m for m in names if m in OUR_MODELS]
    stored: dict[int, dict] = {}
    if ours and ours_from:
        data = json.loads(Path(ours_from).read_text())
        for run in data.get("runs", [data]):
            why = comparable(run, dataset if not limit else run.get("dataset"), preset, epochs, patience,
                             cfg.to_dict(), n_eval, n_train)
            if why:
                raise SystemExit(f"--ours-from {ours_from} seed {run.get('seed')} is not this run's protocol: "
                                 + "; ".join(why))
            stored[int(run["seed"])] = run
        log(f"ours: reusing seeds {sorted(stored)} of {ours_from} (dataset, preset, epochs, patience and model "
            "config equal this run's)")
    for s in seeds:
        have = stored.get(s, {}).get("models", {})
        todo = [m for m in ours if m not in have and (m == "popularity" or ours_missing == "train")]
        got = dict(have)
        if todo:
            log(f"ours: training {','.join(todo)} seed {s} (trainer/nextitem.py)")
            r = nextitem_main(dataset, ",".join(todo), preset, epochs, patience, device, None, s, limit, threads,
                              **overrides)
            got.update(r["models"])
        for m in ours:
            if m in got:
                x = got[m]
                res["per_seed"].setdefault(m, {})[str(s)] = {**{k: x[k] for k in METRICS},
                                                             "train_seconds": x["train_seconds"],
                                                             "epochs_run": x.get("epochs_run"),
                                                             "best_epoch": x.get("best_epoch")}
                res["ours_source"].setdefault(m, {})[str(s)] = "reused" if m in have else "trained"

    # --- split check, summary, table ---
    if "pop_recbole_per_seed" in res and "popularity" in res["per_seed"]:
        s0 = next(iter(res["pop_recbole_per_seed"]))
        rp, op = res["pop_recbole_per_seed"][s0], res["per_seed"]["popularity"].get(s0)
        if op:
            res["split_check"] = {"recbole_pop_hr@10": rp["hr@10"], "our_popularity_hr@10": op["hr@10"],
                                  "recbole_pop_ndcg@10": rp["ndcg@10"], "our_popularity_ndcg@10": op["ndcg@10"],
                                  "recbole_pop_native_hit@10": rp.get("native_hit@10"),
                                  "equal": abs(rp["hr@10"] - op["hr@10"]) < 1e-6 and abs(rp["ndcg@10"] - op["ndcg@10"]) < 1e-6}
            log(f"split check: RecBole Pop HR@10 {rp['hr@10']:.4f} (our protocol; RecBole's own Hit@10 "
                f"{rp.get('native_hit@10', float('nan')):.4f}) vs our popularity {op['hr@10']:.4f}: "
                f"{'EQUAL' if res['split_check']['equal'] else 'DIFFERENT'}")
    summary = {}
    for m, per in res["per_seed"].items():
        rows = list(per.values())
        summary[m] = {k: mean_sd([r[k] for r in rows]) for k in (*METRICS, "train_seconds", "best_epoch")
                      if all(r.get(k) is not None for r in rows)}
        summary[m]["seeds"] = [int(s) for s in per]
    pop = summary.get("popularity", {}).get("hr@10", {}).get("mean")
    peer = summary.get("recbole-sasrec", {}).get("hr@10", {}).get("mean")
    for m, sm in summary.items():
        h = sm["hr@10"]["mean"]
        sm["hr@10_vs_popularity"] = h / pop if pop else None
        sm["hr@10_vs_recbole_sasrec"] = h / peer if peer else None
    res["summary"] = summary
    res["wall_seconds"] = round(time.time() - t_start, 1)
    table = format_table(summary)
    for line in table:
        log(line)
    res["table"] = table
    res["log"] = lines
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(res, indent=2))
        print(f"wrote {out}")
    return res


def format_table(summary: dict) -> list[str]:
    order = [m for m in ("recbole-sasrec", "sasrec", "oneranker-gen-only", "oneranker", "popularity", "recbole-pop")
             if m in summary]
    head = (f"{'model':<20}{'HR@10':>17}{'NDCG@10':>17}{'HR@50':>17}{'train s':>15}{'best ep':>9}"
            f"{'÷pop':>7}{'÷RecBole':>10}{'seeds':>7}")
    out = [head, "-" * len(head)]
    for m in order:
        sm = summary[m]

        def ms(k, fmt="{:.4f} ± {:.4f}"):
            return fmt.format(sm[k]["mean"], sm[k]["sd"]) if k in sm else "-"

        rp, rr = sm.get("hr@10_vs_popularity"), sm.get("hr@10_vs_recbole_sasrec")
        out.append(f"{LABELS[m]:<20}{ms('hr@10'):>17}{ms('ndcg@10'):>17}{ms('hr@50'):>17}"
                   f"{ms('train_seconds', '{:.0f} ± {:.0f}'):>15}{ms('best_epoch', '{:.1f}'):>9}"
                   f"{(f'{rp:.2f}' if rp is not None else '-'):>7}{(f'{rr:.3f}' if rr is not None else '-'):>10}{len(sm['seeds']):>7}")
    return out


if __name__ == "__main__":  # python -m trainer.peer.bench (the CLI is `oneranker bench quality`)
    bench_quality(*sys.argv[1:2])
