"""Online vs frozen (Monolith's online-vs-batch result) on a replayed sample stream.

One pass over the stream in micro-batches with the streaming trainer's learner (trainer/learner.py):
every batch is scored before it is learned (prequential). At ``split`` (default 70%) a frozen copy of
the model is taken; over the remaining stream both are scored on the same batches — the incremental
model keeps learning (and admits new ads/users), the frozen one does not (ids it never saw → OOV,
as a model with a fixed vocabulary serves them). Prints JSON.

    python -m trainer.online_vs_frozen --dataset movielens-100k --limit 25000 --out ovf.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch


def online_vs_frozen(dataset: str = "movielens-100k", limit: int | None = 25000, preset: str = "small",
                     batch_size: int = 64, split: float = 0.7, device: str = "cpu", seed: int = 0,
                     threads: int = 1, default_speed: float = 100000.0, tail_chunks: int = 3,
                     out: str | None = None, **overrides) -> dict:
    from trainer.learner import OnlineLearner
    from trainer.model.config import preset as make_preset
    from trainer.prequential import summarize
    from trainer.replay_samples import load_samples

    torch.set_num_threads(threads)
    samples, info = load_samples(dataset, limit=limit, seed=seed, speed=1.0, start_ms=1_700_000_000_000)
    span_days = info["replay_span_s"] / 86400.0
    lr_kw = {k: overrides.pop(k) for k in ("centroid_every", "centroid_rate", "centroid_iters") if k in overrides}
    lr = OnlineLearner(make_preset(preset, **({"dropout": 0.0} | overrides)), device=device, seed=seed, **lr_kw)
    n = len(samples)
    cut = int(n * split) // batch_size * batch_size
    head, online_tail, frozen_tail = [], [], []
    frozen, fi, fu = None, 0, 0
    t0 = time.perf_counter()
    learn_s = 0.0
    for i in range(0, n, batch_size):
        batch = samples[i:i + batch_size]
        if i == cut:
            frozen = copy.deepcopy(lr.model).eval()
            fi, fu = len(lr.vocab.items), len(lr.vocab.users)
        if frozen is not None:
            frozen_tail.append(lr.score_frozen(frozen, fi, fu, batch))
        ts = time.perf_counter()
        p, _ = lr.step(batch)
        learn_s += time.perf_counter() - ts
        (head if frozen is None else online_tail).append(p)
    wall = time.perf_counter() - t0

    def chunks(ps):
        k = max(1, len(ps) // tail_chunks)
        return [summarize(ps[j:j + k]) for j in range(0, len(ps), k)][:tail_chunks]

    on, fr = summarize(online_tail), summarize(frozen_tail)
    res = {
        "dataset": dataset, "limit": limit, "samples": n, "preset": preset, "batch_size": batch_size,
        "split": split, "frozen_at_sample": cut, "device": str(lr.dev), "threads": threads,
        "ads_seen_at_split": fi - 2, "ads_seen_total": len(lr.vocab.items) - 2,
        "users_seen_at_split": fu - 2, "users_seen_total": len(lr.vocab.users) - 2,
        "first_70pct_online": summarize(head),
        "last_30pct": {"online": on, "frozen": fr,
                       "auc_gain": on["auc"] - fr["auc"], "gauc_gain": on["gauc"] - fr["gauc"],
                       "logloss_gain": fr["logloss"] - on["logloss"]},
        "last_30pct_by_chunk": {"online": chunks(online_tail), "frozen": chunks(frozen_tail)},
        "throughput": {"learn_samples_per_s": round(n / learn_s, 1), "wall_s": round(wall, 1),
                       "replay_days": round(span_days, 2),
                       f"replay_samples_per_s_at_speed_{int(default_speed)}":
                           round(n / (info["replay_span_s"] / default_speed), 1)},
    }
    text = json.dumps(res, indent=2, default=float)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="movielens-100k")
    p.add_argument("--limit", type=int, default=25000)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--split", type=float, default=0.7)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="model config override, e.g. --set embed_norm=false")
    a = p.parse_args(argv)
    from trainer.evaluate import parse_overrides

    online_vs_frozen(a.dataset, a.limit, a.preset, a.batch_size, a.split, a.device, a.seed, a.threads, out=a.out,
                     **parse_overrides(a.set))


if __name__ == "__main__":
    main()
