"""``oneranker bench train``: training throughput of the online learner (trainer/learner.py) per preset.

Samples come from the movielens-100k replay (trainer.replay_samples); each run is a fresh learner
doing ``warmup`` + ``steps`` micro-batches (test-then-train, exactly the streaming trainer's step).
Reported per preset: samples/s and tokens/s (history tokens + exposed-ad candidates per sample)
as the median of ``runs`` runs, peak memory (CPU: ru_maxrss of the process — torch allocations are
invisible to tracemalloc, so tracemalloc's peak is reported only for the Python-side collation;
CUDA: torch.cuda.max_memory_allocated), and the time split data (collate + host→device copy) vs
compute (forward, metrics, backward, optimizer; CUDA-synchronised on GPU).

Other jobs share this 2-core machine, so each preset also reports samples per CPU-second of this
process (contention slows the wall clock, not the work per sample: with one torch thread this is
the rate the learner reaches on a core of its own) and the 1-minute load average around its runs.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import time
import tracemalloc
from pathlib import Path

PHASES = ("data_s", "centroids_s", "forward_s", "score_s", "learn_s")


def bench_train(presets=("small", "paper"), quick: bool = False, device: str = "auto", runs: int = 3,
                batch_size: int | None = None, threads: int = 1, out: str | None = None, show: bool = True) -> dict:
    import torch
    from rich.console import Console
    from rich.table import Table

    from trainer.batching import resolve_device
    from trainer.learner import OnlineLearner
    from trainer.model.config import preset as make_preset
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
        rates, trates, data_f, cpu_rates, splits = [], [], [], [], []
        load_before = os.getloadavg()[0]
        tm_peak = 0
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for r in range(runs):
            lr = OnlineLearner(cfg, device=dev, seed=r)
            for i in range(warmup):
                lr.step(samples[i * bs:(i + 1) * bs])
            lr.timing = dict.fromkeys(lr.timing, 0.0)
            if r == 0:
                tracemalloc.start()
            t0, c0 = time.perf_counter(), time.process_time()
            for i in range(warmup, warmup + steps):
                lr.step(samples[i * bs:(i + 1) * bs])
            if dev.type == "cuda":
                torch.cuda.synchronize()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if r == 0:
                tm_peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
            rates.append(steps * bs / dt)
            cpu_rates.append(steps * bs / dc)
            ph = sum(lr.timing[k] for k in PHASES) or 1.0
            splits.append({k.removesuffix("_s"): lr.timing[k] / ph for k in PHASES})
            trates.append(tokens / dt)
            tot = lr.timing["data_s"] + lr.timing["compute_s"]
            data_f.append(lr.timing["data_s"] / tot if tot else 0.0)
        p = {"batch_size": bs, "max_len": cfg.max_len, "d_model": cfg.d_model, "steps": steps,
             "samples_per_s": round(statistics.median(rates), 1), "tokens_per_s": round(statistics.median(trates), 1),
             "samples_per_s_runs": [round(x, 1) for x in rates],
             "samples_per_cpu_s": round(statistics.median(cpu_rates), 1),
             "load1": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # before, after
             "time_split": {k: round(statistics.median(s[k] for s in splits), 3) for k in splits[0]},
             "data_fraction": round(statistics.median(data_f), 3),
             "params": sum(q.numel() for q in lr.model.parameters()),
             "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
             "tracemalloc_peak_mb": round(tm_peak / 2**20, 2)}
        if dev.type == "cuda":
            p["cuda_max_memory_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        res["presets"][name] = p
    console = Console(quiet=not show, width=160)
    table = Table(title=f"online trainer throughput ({dev}, {threads} thread(s), median of {runs})")
    for c in ("preset", "batch", "samples/s", "samples/CPU-s", "tokens/s", "data %", "fwd/score/learn %",
              "load1 before/after", "peak RSS MB", "CUDA MB"):
        table.add_column(c, justify="right")
    for name, p in res["presets"].items():
        ts = p["time_split"]
        table.add_row(name, str(p["batch_size"]), f"{p['samples_per_s']:,.1f}", f"{p['samples_per_cpu_s']:,.1f}",
                      f"{p['tokens_per_s']:,.0f}", f"{100 * p['data_fraction']:.1f}",
                      "/".join(f"{100 * ts[k]:.0f}" for k in ("forward", "score", "learn")),
                      "/".join(f"{x:.2f}" for x in p["load1"]), f"{p['peak_rss_mb']:,.0f}",
                      str(p.get("cuda_max_memory_allocated_mb", "-")))
    console.print(table)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(res, indent=2))
    return res
