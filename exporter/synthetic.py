"""Synthetic checkpoints, users and samples for tests and benchmarks (untrained or perturbed weights).

Ad ids are ``a<i>`` (model index i + 2), user ids ``u<i>``; histories are random token sequences.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from features.tokens import TokenSequence


def make_model(preset_name: str = "small", num_items: int = 300, num_users: int = 50, seed: int = 0, **kw):
    import torch

    from trainer.model.config import preset
    from trainer.model.oneranker import OneRanker

    torch.manual_seed(seed)
    cfg = preset(preset_name, num_items=num_items, num_users=num_users, **kw)
    m = OneRanker(cfg).eval()
    m.refresh_centroids(seed=seed)
    g = torch.Generator().manual_seed(seed)
    m.set_item_bids(torch.rand(cfg.num_items, generator=g) + 0.5)
    return m


def item_ids(num_items: int) -> dict[str, int]:
    return {f"a{i}": i + 2 for i in range(num_items - 2)}


def user_ids(num_users: int) -> dict[str, int]:
    return {f"u{i}": i + 2 for i in range(num_users - 2)}


def make_checkpoint(model, step: int, recent_samples: list[dict] | None = None, noise: float = 0.0,
                    seed: int = 0):
    """A trainer.checkpoint.Checkpoint of ``model`` (optionally with tiny weight noise)."""
    import torch

    from trainer.checkpoint import Checkpoint

    state = {k: v.clone() for k, v in model.state_dict().items()}
    if noise:
        g = torch.Generator().manual_seed(seed)
        for k, v in state.items():
            if v.is_floating_point() and "item_log_bid" not in k:
                v.add_(torch.randn(v.shape, generator=g) * noise)
    cfg = model.cfg
    return Checkpoint(step=step, model_config=cfg.to_dict(), model_state=state,
                      item_ids=item_ids(cfg.num_items), user_ids=user_ids(cfg.num_users),
                      offsets={"oneranker.samples:0": step * 10}, trained_through_ts=int(time.time() * 1000),
                      metrics={"step": step}, extra={"recent_samples": list(recent_samples or [])})


def random_sequence(rng: random.Random, num_items: int, length: int, t0: int = 1_700_000_000_000) -> TokenSequence:
    seq = TokenSequence(max_len=max(length, 1))
    t = t0
    for _ in range(length):
        t += rng.randint(1_000, 600_000)
        seq.append(f"a{rng.randrange(num_items - 2)}", rng.choice((1, 2, 2, 3)), t)
    return seq


def make_users(num_users: int, num_items: int, max_len: int, n: int, seed: int = 0) -> dict[str, TokenSequence]:
    rng = random.Random(seed)
    return {f"u{i}": random_sequence(rng, num_items, rng.randint(1, max_len))
            for i in range(min(n, num_users - 2))}


def labelled_samples(ranker, users: dict[str, TokenSequence], n_ads: int = 10, seed: int = 0) -> list[dict]:
    """Samples whose clicked ad is ``ranker``'s own top-1: a model ranking like ``ranker`` scores
    HR@10 = 1 and GAUC = 1 on them, an unrelated one ≈ chance. For quality-gate tests."""
    from streaming.samples import Sample, SampleAd, sample_id

    rng = random.Random(seed)
    out = []
    n_items = len(ranker.items)
    for j, (uid, seq) in enumerate(users.items()):
        top = [a for a, _ in ranker.rank(uid, seq, 3)]
        others = [f"a{rng.randrange(n_items - 2)}" for _ in range(n_ads)]
        ads = list(dict.fromkeys(top + others))[:n_ads]
        rng.shuffle(ads)
        ts = (seq.event_times[-1] if len(seq) else 1_700_000_000_000) + 1000
        sample = Sample(sample_id(uid, f"r{j}"), uid, f"r{j}", ts, seq.to_dict(),
                        [SampleAd(p + 1, a, 1.0, click=int(a == top[0])) for p, a in enumerate(ads)],
                        {"device": "web"})
        out.append(sample.to_dict())
    return out


def save_jsonl(rows: list[dict], path: Path) -> Path:
    import json

    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def publish_model(store, model, step: int, workdir: Path, set_current: bool = True,
                  corpus_bits: int | None = None) -> dict:
    """Export ``model`` and publish it WITHOUT parity or quality gate (benchmarks and tests that
    need a real snapshot fast; the exporter itself always runs the checks)."""
    from exporter.export import export_graph, model_manifest, write_id_maps

    snap = Path(workdir) / f"snap-{step}"
    snap.mkdir(parents=True)
    graph = export_graph(model, snap, corpus_bits=corpus_bits)
    write_id_maps(make_checkpoint(model, step), snap)
    doc = store.publish(snap, {"checkpoint_step": step, "model": model_manifest(model, graph),
                               "export_s": graph["export_s"]})
    if set_current:
        store.set_current(doc["version"])
    return doc
