"""Serving benchmark: one replica over real HTTP on 127.0.0.1, untrained weights, synthetic users."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(urls: list[str] | str, users: list[str], n: int, concurrency: int, k: int = 10,
         timeout: float = 30.0, stop: threading.Event | None = None) -> dict:
    """``n`` POST /v1/rank requests from ``concurrency`` bounded request loops of one asyncio client
    (loop w talks to replica w mod len(urls)); latency percentiles, rps and the replica's own
    per-stage durations (its Server-Timing header, medians). The client is aiohttp: httpx's
    AsyncClient added 0.7 ms a request on this machine (1.1 vs 0.4 ms p50 for /healthz), which a
    latency figure would have charged to the server. ``stop``: the loops end early once it is set."""
    import asyncio

    import aiohttp

    urls = [urls] if isinstance(urls, str) else list(urls)
    lat: list[float] = []
    stages: dict[str, list[float]] = {}
    errors = 0

    async def main():
        nonlocal errors
        clients = [aiohttp.ClientSession(u, timeout=aiohttp.ClientTimeout(total=timeout),
                                         connector=aiohttp.TCPConnector(limit=concurrency))
                   for u in urls]
        counter = iter(range(n))

        async def loop(w: int):
            nonlocal errors
            c = clients[w % len(clients)]
            for i in counter:  # shared: the loops stop together after n requests
                if stop is not None and stop.is_set():
                    break
                timing = ""
                t0 = time.perf_counter()
                try:
                    async with c.post("/v1/rank", json={"user_id": users[(i * 7919 + w) % len(users)], "k": k}) as r:
                        await r.read()
                        ok = r.status == 200
                        timing = r.headers.get("server-timing", "")
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    ok = False
                lat.append(time.perf_counter() - t0)
                errors += not ok
                if ok:
                    for part in timing.split(","):
                        name, _, dur = part.strip().partition(";dur=")
                        if dur:
                            stages.setdefault(name, []).append(float(dur))

        t0 = time.perf_counter()
        await asyncio.gather(*(loop(w) for w in range(concurrency)))
        wall = time.perf_counter() - t0
        for c in clients:
            await c.close()
        return wall

    wall = asyncio.run(main())
    a = np.asarray(lat) * 1000
    st = {name: float(np.median(v)) for name, v in stages.items()}
    if st:
        st["http_client"] = float(np.median(a)) - sum(st.values())  # outside the app: sockets, client
    return {"concurrency": concurrency, "replicas": len(urls), "requests": len(lat), "errors": errors,
            "p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
            "p99_ms": float(np.percentile(a, 99)), "rps": len(lat) / wall, "stages_p50_ms": st}


def _fetch(store, dest: Path):
    v = store.current()["version"]
    return dest, store.fetch(v, dest)


def session_by_op(snap_dir: Path, users: dict, threads: int | None, runs: int = 20) -> dict:
    """onnxruntime's profiler on the snapshot: mean ms per request by ONNX node type (top 10)."""
    import collections

    import onnxruntime as ort

    from exporter.runtime import OnnxRanker

    r = OnnxRanker(snap_dir, threads=threads, want_cuda=False)
    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(snap_dir / "ort-profile")
    so.inter_op_num_threads = 1
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(snap_dir / "model.onnx"), so, providers=["CPUExecutionProvider"])
    ids = list(users)[:runs]
    for u in ids:
        sess.run(None, r.encode([users[u]], [u], [0]))
    events = json.loads(Path(sess.end_profiling()).read_text())
    by = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            by[e["args"]["op_name"]] += e["dur"] / 1000 / len(ids)
    out = {op: round(ms, 3) for op, ms in by.most_common(10)}
    out["all_nodes"] = round(sum(by.values()), 3)
    return out


def _median_of(runs: list[dict]) -> dict:
    """Medians over repeated load runs of every number (stages too); errors summed."""
    out = dict(runs[0])
    for key in ("p50_ms", "p95_ms", "p99_ms", "rps"):
        out[key] = float(np.median([r[key] for r in runs]))
    out["errors"] = sum(r["errors"] for r in runs)
    out["stages_p50_ms"] = {k: float(np.median([r["stages_p50_ms"].get(k, np.nan) for r in runs]))
                            for k in runs[0]["stages_p50_ms"]}
    out["runs"] = [{k: r[k] for k in ("p50_ms", "p99_ms", "rps", "errors")} for r in runs]
    return out


def _start_replica(name: str, store, port: int, tmp: Path, threads: int | None, token: str):
    cmd = [sys.executable, "-m", "oneranker.cli", "serve", "--replica-id", name,
           "--store", store.url, "--port", str(port), "--features", str(tmp / "users.json"),
           "--no-kafka", "--poll-s", "3600", "--cache-dir", str(tmp / f"cache-{name}"), "--no-cuda"]
    if threads:
        cmd += ["--threads", str(threads)]
    log = open(tmp / f"{name}.log", "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "ONERANKER_ADMIN_TOKEN": token})


def _republish_and_reload(store, url: str, src: Path, token: str) -> dict:
    """Publish snapshot 1's files again as a new current version and have the replica at ``url``
    load it now; its readyz ``last_swap`` (seconds: total, fetch+verify, session build, warm-up)."""
    import httpx

    m = store.fetch(1, src)
    (src / "manifest.json").unlink()
    v = store.publish(src, {"checkpoint_step": 1, "model": m["model"]})["version"]
    store.set_current(v)
    httpx.post(f"{url}/admin/reload", timeout=300, headers={"Authorization": f"Bearer {token}"}).raise_for_status()
    doc = httpx.get(f"{url}/readyz", timeout=10).json()
    if doc.get("model_version") != v:
        raise RuntimeError(f"replica at {url} serves {doc.get('model_version')} after reloading {v}")
    shutil.rmtree(src, ignore_errors=True)
    return doc["last_swap"]


def _swaps_under_load(store, urls: list[str], users: list[str], tmp: Path, token: str, swaps: int) -> dict:
    """``swaps`` hot swaps of replica 0 while a c=1 request loop runs on it: failed requests (any
    non-200), swap seconds (median, max) and latency during the swaps."""
    stop = threading.Event()
    docs: list[dict] = []
    failure: list[BaseException] = []

    def swapper():
        try:
            for j in range(swaps):
                docs.append(_republish_and_reload(store, urls[0], tmp / f"swap-{j}", token))
        except BaseException as exc:  # noqa: BLE001 - reported below
            failure.append(exc)
        finally:
            stop.set()

    t = threading.Thread(target=swapper, name="bench-swapper")
    t.start()
    r = load(urls[:1], users, 10**9, 1, stop=stop)
    t.join()
    if failure:
        raise failure[0]
    s = [d["s"] for d in docs]
    return {"swaps": len(docs), "requests": r["requests"], "errors": r["errors"], "swap_s_median": float(np.median(s)),
            "swap_s_max": float(np.max(s)), "build_s_median": float(np.median([d["build_s"] for d in docs])),
            "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"]}


def exact_topk_match(model, snap_dir: Path, users: dict, ids: list[str], threads: int | None, k: int = 20) -> float:
    """Share of probe users whose top-``k`` from the snapshot's session equals exact fp32 scoring
    (torch ``rank_topk`` over the model's own corpus scores), in the same order; positions past
    the last real result (score at the "not a result" floor) carry arbitrary ids and are skipped."""
    import torch

    from exporter.runtime import NEG_HALF, OnnxRanker
    from trainer.infer import rank_topk

    ranker = OnnxRanker(snap_dir, threads=threads, want_cuda=False)
    same = 0
    for u in ids:
        feeds = ranker.encode([users[u]], [u], [0])
        o_ids, o_scores = ranker.run(feeds)
        eligible = ranker.eligibility_mask(feeds)
        args = [torch.from_numpy(np.array(feeds[name])) for name in ranker.input_names[:5]]
        args.append(torch.from_numpy(eligible))
        with torch.no_grad():
            t_ids, t_scores = rank_topk(model, *args, k=ranker.top_k, seen_ids=torch.from_numpy(feeds["seen_ids"]))
        served = o_ids[0, :k][o_scores[0, :k] > NEG_HALF].tolist()
        exact = t_ids.numpy()[0, :k][t_scores.numpy()[0, :k] > NEG_HALF].tolist()
        same += served == exact
    return same / len(ids)


def run_bench(presets: list[str], corpora: list[int], n: int, threads: int | None = None,
              repeats: int = 3, swaps: int = 3, corpus_bits: int | None = None, probes: int = 100,
              swaps_under_load: int = 20) -> list[dict]:
    import logging

    import httpx

    from deploy.bare_graph import export_bare, time_bare
    from exporter.runtime import OnnxRanker
    from exporter.store import SnapshotStore
    from exporter.synthetic import make_model, make_users, publish_model

    for name in ("onnx_ir", "onnxscript", "torch.onnx", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    token = "bench-admin"
    results = []
    for preset_name in presets:
        for n_items in corpora:
            with tempfile.TemporaryDirectory(prefix="oneranker-bench-") as tmp:
                tmp = Path(tmp)
                model = make_model(preset_name, num_items=n_items + 2, num_users=1002)
                store = SnapshotStore(str(tmp / "store"))
                doc = publish_model(store, model, 1, tmp, corpus_bits=corpus_bits)
                export_s = doc["export_s"]
                bits = doc["model"]["corpus_bits"]
                model_bytes = sum(f["size"] for n, f in doc["files"].items() if n.startswith("model.onnx"))
                users = make_users(1002, n_items + 2, model.cfg.max_len, 1000, seed=1)
                (tmp / "users.json").write_text(json.dumps({u: q.to_dict() for u, q in users.items()}))
                ids = list(users)
                # the bare reference graph (same steps and sizes, nothing else), same process and threads
                bare = time_bare(export_bare(model.cfg, n_items + 2, doc["model"]["top_k"], tmp / "bare.onnx",
                                             corpus_bits=bits), model.cfg.max_len, n_items + 2, threads)
                # the model alone (one onnxruntime session, batch 1, same process): encode and run
                snap_dir, _ = _fetch(store, tmp / "direct")
                ranker = OnnxRanker(snap_dir, threads=threads, want_cuda=False)
                ranker.warm()
                enc, run = [], []
                for u in ids[:200]:
                    t0 = time.perf_counter()
                    feeds = ranker.encode([users[u]], [u], [0])
                    t1 = time.perf_counter()
                    ranker.run(feeds)
                    enc.append(t1 - t0)
                    run.append(time.perf_counter() - t1)
                providers = ranker.providers
                del ranker
                by_op = session_by_op(snap_dir, users, threads)
                # two replicas: their own processes (`oneranker serve`), HTTP on 127.0.0.1
                ports = [_free_port(), _free_port()]
                urls = [f"http://127.0.0.1:{p}" for p in ports]
                t0 = time.perf_counter()
                procs = [_start_replica(f"bench-{preset_name}-{n_items}-{i}", store, p, tmp, threads, token)
                         for i, p in enumerate(ports)]
                try:
                    deadline = time.monotonic() + 300
                    for url, proc in zip(urls, procs):
                        while True:
                            try:
                                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                                    break
                            except httpx.HTTPError:
                                pass
                            if proc.poll() is not None or time.monotonic() > deadline:
                                raise RuntimeError(f"replica did not become ready; see {tmp}/*.log")
                            time.sleep(0.2)
                    ready_s = time.perf_counter() - t0
                    for url in urls:  # warm the HTTP path
                        with httpx.Client(base_url=url) as c:
                            for u in ids[:10]:
                                c.post("/v1/rank", json={"user_id": u, "k": 10}).raise_for_status()
                    # hot swaps of replica 0 (the same files re-published as new versions), idle
                    swap_docs = [_republish_and_reload(store, urls[0], tmp / f"republish-{j}", token)
                                 for j in range(swaps)]
                    swap = {k: float(np.median([d[k] for d in swap_docs])) for k in ("s", "fetch_s", "build_s", "warm_s")}
                    httpx.post(f"{urls[1]}/admin/reload", timeout=120,
                               headers={"Authorization": f"Bearer {token}"}).raise_for_status()
                    exact = exact_topk_match(model, snap_dir, users, ids[:probes], threads) if probes else None
                    base = {"preset": preset_name, "corpus": n_items, "corpus_bits": bits,
                            "exact_top20_match": exact, "exact_probes": probes,
                            "export_s": round(export_s, 1),
                            "process_ready_s": round(ready_s, 1), "swap_s": swap["s"], "swap_stages_s": swap,
                            "model_bytes": model_bytes, "threads": threads,
                            "model_only_p50_ms": float(np.percentile(run, 50)) * 1000,
                            "model_only_p99_ms": float(np.percentile(run, 99)) * 1000,
                            "encode_p50_ms": float(np.percentile(enc, 50)) * 1000,
                            "session_by_op_ms": by_op,
                            "bare_p50_ms": bare["p50_ms"], "bare_p99_ms": bare["p99_ms"],
                            "bare_session_ready_s": bare["session_ready_s"],
                            "providers": providers, "host": platform.node()}
                    rps1, rows = None, {}
                    for conc, targets in ((1, urls[:1]), (8, urls)):
                        la0 = os.getloadavg()
                        r = _median_of([load(targets, ids, n, conc) for _ in range(repeats)])
                        rps1 = r["rps"] if conc == 1 else rps1
                        rows[conc] = {**base, **r, "loadavg_start": la0, "loadavg_1m": os.getloadavg()[0],
                                      "served_over_bare_p50": r["p50_ms"] / bare["p50_ms"],
                                      "served_over_bare_p99": r["p99_ms"] / bare["p99_ms"],
                                      "rps_over_c1": r["rps"] / rps1}
                        results.append(rows[conc])
                    if swaps_under_load:  # the c=1 row: replica 0 swaps while it serves
                        rows[1]["swaps_under_load"] = _swaps_under_load(store, urls, ids, tmp, token,
                                                                        swaps_under_load)
                finally:
                    for proc in procs:
                        proc.terminate()
                    for proc in procs:
                        try:
                            proc.wait(timeout=15)
                        except subprocess.TimeoutExpired:
                            proc.kill()
    return results


def print_table(results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="oneranker bench serve (replica processes, HTTP on 127.0.0.1, asyncio client; medians "
                    "of repeated runs; c=1 on one replica, c=8 over two; bare = the same steps and sizes "
                    "alone in onnxruntime, batch 1; model = the snapshot's session alone; swap = "
                    "download+verify+session+warm-up)")
    for col in ("preset", "corpus", "bits", "conc", "p50 ms", "p99 ms", "req/s", "×c1", "errors", "bare p50/p99",
                "served/bare p50", "p99", "model p50", "run/encode/feast/pre/post/http p50", "swap s",
                "exact top-20", "swaps under load: n/err/max s", "load"):
        t.add_column(col, justify="right")
    for r in results:
        st = r.get("stages_p50_ms") or {}
        stages = "/".join(f"{st.get(k, float('nan')):.1f}" for k in ("run", "encode", "feast", "pre", "post",
                                                                      "http_client"))
        t.add_row(r["preset"], f"{r['corpus']:,}", str(r.get("corpus_bits", 32)),
                  f"{r['concurrency']}×{r.get('replicas', 1)}",
                  f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}", f"{r['rps']:.0f}", f"{r.get('rps_over_c1', 1):.2f}",
                  str(r["errors"]), f"{r['bare_p50_ms']:.1f}/{r['bare_p99_ms']:.1f}",
                  f"{r['served_over_bare_p50']:.2f}", f"{r['served_over_bare_p99']:.2f}",
                  f"{r['model_only_p50_ms']:.1f}", stages, f"{r['swap_s']:.2f}",
                  "" if r.get("exact_top20_match") is None else f"{r['exact_top20_match']:.2f}",
                  f"{sw['swaps']}/{sw['errors']}/{sw['swap_s_max']:.2f}" if (sw := r.get("swaps_under_load")) else "",
                  f"{r['loadavg_1m']:.1f}")
    Console(width=220).print(t)
