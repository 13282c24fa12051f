"""``oneranker bench train``: training throughput of the online learner (trainer.online) per preset.

Samples come from the movielens-100k replay (trainer.replay_samples); each run is a fresh learner
doing ``warmup`` + ``steps`` micro-batches (test-then-train, exactly the streaming trainer's step).
Reported per preset: samples/s and tokens/s (history tokens + exposed-ad candidates per sample)
as the median of ``runs`` runs, peak memory (CPU: ru_maxrss of the process — torch allocations are
invisible to tracemalloc, so tracemalloc's peak is reported only for the Python-side collation;
CUDA: torch.cuda.max_memory_allocated), and the time split data (collate + host→device copy) vs
compute (forward, metrics, backward, optimizer; CUDA-synchronised on GPU).
"""

from __future__ import annotations

import json
import resource
import statistics
import time
import tracemalloc
from pathlib import Path


def bench_train(presets=("small", "paper"), quick: bool = False, device: str = "auto", runs: int = 3,
                batch_size: int | None = None, threads: int = 1, out: str | None = None, show: bool = True) -> dict:
    import torch
    from rich.console import Console
    from rich.table import Table

    from trainer.model.config import preset as make_preset
    from trainer.online import OnlineLearner, resolve_device
    from trainer.replay_samples import load_samples

    torch.set_num_threads(threads)
    dev = resolve_device(device)
    steps, warmup = (3, 1) if quick else (10, 2)
    runs = max(3, runs)
    res: dict = {"device": str(dev), "threads": threads, "quick": quick, "runs": runs, "presets": {}}
    for name in presets:
        cfg = make_preset(name, dropout=0.0)
        bs = batch_size or cfg.batch_size
        need = (steps + warmup) * bs
        samples, _ = load_samples("movielens-100k", limit=min(100_000, max(need, 20_000)), speed=1.0,
                                  start_ms=1_700_000_000_000, history_len=cfg.max_len)
        samples = samples[-need:]  # late in the stream: long histories
        tokens = sum(len(s.history.get("item_ids", [])[-cfg.max_len:]) + len(s.ads) for s in samples[warmup * bs:])
        rates, trates, data_f = [], [], []
        tm_peak = 0
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for r in range(runs):
            lr = OnlineLearner(cfg, device=dev, seed=r)
            for i in range(warmup):
                lr.step(samples[i * bs:(i + 1) * bs])
            lr.timing = {"data_s": 0.0, "compute_s": 0.0}
            if r == 0:
                tracemalloc.start()
            t0 = time.perf_counter()
            for i in range(warmup, warmup + steps):
                lr.step(samples[i * bs:(i + 1) * bs])
            if dev.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            if r == 0:
                tm_peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
            rates.append(steps * bs / dt)
            trates.append(tokens / dt)
            tot = lr.timing["data_s"] + lr.timing["compute_s"]
            data_f.append(lr.timing["data_s"] / tot if tot else 0.0)
        p = {"batch_size": bs, "max_len": cfg.max_len, "d_model": cfg.d_model, "steps": steps,
             "samples_per_s": round(statistics.median(rates), 1), "tokens_per_s": round(statistics.median(trates), 1),
             "samples_per_s_runs": [round(x, 1) for x in rates],
             "data_fraction": round(statistics.median(data_f), 3),
             "params": sum(q.numel() for q in lr.model.parameters()),
             "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
             "tracemalloc_peak_mb": round(tm_peak / 2**20, 2)}
        if dev.type == "cuda":
            p["cuda_max_memory_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        res["presets"][name] = p
    console = Console(quiet=not show)
    table = Table(title=f"online trainer throughput ({dev}, {threads} thread(s), median of {runs})")
    for c in ("preset", "batch", "samples/s", "tokens/s", "data %", "peak RSS MB", "CUDA MB"):
        table.add_column(c, justify="right")
    for name, p in res["presets"].items():
        table.add_row(name, str(p["batch_size"]), f"{p['samples_per_s']:,.1f}", f"{p['tokens_per_s']:,.0f}",
                      f"{100 * p['data_fraction']:.1f}", f"{p['peak_rss_mb']:,.0f}",
                      str(p.get("cuda_max_memory_allocated_mb", "-")))
    console.print(table)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(res, indent=2))
    return res
