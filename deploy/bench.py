"""Serving benchmark: one replica over real HTTP on 127.0.0.1, untrained weights, synthetic users."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(url: str, users: list[str], n: int, concurrency: int, k: int = 10, timeout: float = 30.0) -> dict:
    """``n`` POST /v1/rank requests from ``concurrency`` threads; latency percentiles and rps."""
    import httpx

    lat: list[float] = []
    errors = 0
    lock = threading.Lock()
    counter = iter(range(n))

    def worker(w: int):
        nonlocal errors
        with httpx.Client(base_url=url, timeout=timeout) as c:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                r = c.post("/v1/rank", json={"user_id": users[(i * 7919 + w) % len(users)], "k": k})
                dt = time.perf_counter() - t0
                with lock:
                    lat.append(dt)
                    errors += r.status_code != 200

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        list(ex.map(worker, range(concurrency)))
    wall = time.perf_counter() - t0
    a = np.asarray(lat) * 1000
    return {"concurrency": concurrency, "requests": n, "errors": errors, "p50_ms": float(np.percentile(a, 50)),
            "p95_ms": float(np.percentile(a, 95)), "p99_ms": float(np.percentile(a, 99)), "rps": n / wall}


def _fetch(store, dest: Path):
    v = store.current()["version"]
    return dest, store.fetch(v, dest)


def run_bench(presets: list[str], corpora: list[int], n: int, threads: int | None = None) -> list[dict]:
    import logging

    import httpx

    from exporter.runtime import OnnxRanker
    from exporter.store import SnapshotStore
    from exporter.synthetic import make_model, make_users, publish_model

    for name in ("onnx_ir", "onnxscript", "torch.onnx", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    results = []
    for preset_name in presets:
        for n_items in corpora:
            with tempfile.TemporaryDirectory(prefix="oneranker-bench-") as tmp:
                tmp = Path(tmp)
                model = make_model(preset_name, num_items=n_items + 2, num_users=1002)
                store = SnapshotStore(str(tmp / "store"))
                doc = publish_model(store, model, 1, tmp)
                export_s = doc["export_s"]
                model_bytes = sum(f["size"] for n, f in doc["files"].items() if n.startswith("model.onnx"))
                users = make_users(1002, n_items + 2, model.cfg.max_len, 1000, seed=1)
                (tmp / "users.json").write_text(json.dumps({u: q.to_dict() for u, q in users.items()}))
                # the model alone (one onnxruntime session, batch 1, same process)
                ranker = OnnxRanker(*_fetch(store, tmp / "direct"), threads=threads)
                ranker.warm()
                ids = list(users)
                direct = []
                for u in ids[:100]:
                    t0 = time.perf_counter()
                    ranker.rank(u, users[u], 10)
                    direct.append(time.perf_counter() - t0)
                providers = ranker.providers
                del ranker
                # the replica: its own process (`oneranker serve`), HTTP on 127.0.0.1
                port = _free_port()
                cmd = [sys.executable, "-m", "oneranker.cli", "serve", "--replica-id", f"bench-{preset_name}-{n_items}",
                       "--store", store.url, "--port", str(port), "--features", str(tmp / "users.json"),
                       "--no-kafka", "--poll-s", "3600", "--cache-dir", str(tmp / "cache")]
                if threads:
                    cmd += ["--threads", str(threads)]
                log = open(tmp / "replica.log", "w")
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
                url = f"http://127.0.0.1:{port}"
                t0 = time.perf_counter()
                try:
                    deadline = time.monotonic() + 180
                    while True:
                        try:
                            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                                break
                        except httpx.HTTPError:
                            pass
                        if proc.poll() is not None or time.monotonic() > deadline:
                            raise RuntimeError(f"replica did not become ready; see {tmp / 'replica.log'}")
                        time.sleep(0.2)
                    ready_s = time.perf_counter() - t0
                    with httpx.Client(base_url=url) as c:  # warm the HTTP path
                        for u in ids[:10]:
                            c.post("/v1/rank", json={"user_id": u, "k": 10}).raise_for_status()
                    swap = httpx.get(f"{url}/metrics").text
                    swap_s = float(next(line.rsplit(" ", 1)[1] for line in swap.splitlines()
                                        if line.startswith("oneranker_serve_last_swap_seconds{")))
                    for conc in (1, 8):
                        r = load(url, ids, n, conc)
                        d = np.asarray(direct) * 1000
                        results.append({"preset": preset_name, "corpus": n_items, "export_s": round(export_s, 1),
                                        "process_ready_s": round(ready_s, 1), "swap_s": round(swap_s, 2),
                                        "model_bytes": model_bytes, "model_only_p50_ms": float(np.percentile(d, 50)),
                                        "model_only_p99_ms": float(np.percentile(d, 99)),
                                        "providers": providers, "host": platform.node(),
                                        "loadavg_1m": os.getloadavg()[0], **r})
                finally:
                    proc.terminate()
                    try:
                        proc.wait(timeout=15)
                    except subprocess.TimeoutExpired:
                        proc.kill()
    return results


def print_table(results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="oneranker bench serve (one replica process, HTTP on 127.0.0.1; model p50 = "
                    "onnxruntime alone, batch 1; swap = download+verify+session+warm-up)")
    for col in ("preset", "corpus", "conc", "p50 ms", "p95 ms", "p99 ms", "req/s", "errors", "model p50 ms",
                "swap s", "MB"):
        t.add_column(col, justify="right")
    for r in results:
        t.add_row(r["preset"], f"{r['corpus']:,}", str(r["concurrency"]), f"{r['p50_ms']:.1f}", f"{r['p95_ms']:.1f}",
                  f"{r['p99_ms']:.1f}", f"{r['rps']:.0f}", str(r["errors"]), f"{r['model_only_p50_ms']:.1f}",
                  f"{r['swap_s']:.2f}",
                  f"{r['model_bytes'] / 1e6:.1f}")
    Console().print(t)
