"""``oneranker serve`` (one HTTP replica) and ``oneranker bench serve`` (heavy imports inside)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from oneranker import config

console = Console()


def serve_cmd(
    replica_id: str = typer.Option(..., "--replica-id", help="Name of this replica (metrics, logs, responses)."),
    store: Optional[str] = typer.Option(None, "--store", envvar="ONERANKER_SNAPSHOT_STORE",
                                        help="Snapshot store URL (default file://$ONERANKER_HOME/snapshots)."),
    port: int = typer.Option(config.DEFAULT_SERVE_PORT, "--port", help="HTTP port."),
    host: Optional[str] = typer.Option(None, "--host", envvar="ONERANKER_BIND", help="Bind address (default 127.0.0.1)."),
    features: str = typer.Option("feast", "--features",
                                 help="User tokens: 'feast' (the online store), 'none' (every user cold), "
                                      "or a JSON file {user_id: {item_ids, actions, event_times}}."),
    online: Optional[str] = typer.Option(None, "--online", envvar="ONERANKER_FEAST_ONLINE",
                                         help="Feast online store (sqlite, a path, or redis://…)."),
    poll_s: float = typer.Option(5.0, "--poll-s", help="Seconds between checks of the store's CURRENT pointer."),
    threads: Optional[int] = typer.Option(None, "--threads", help="onnxruntime intra-op threads (default: all cores)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Where snapshots are downloaded."),
    kafka: bool = typer.Option(True, "--kafka/--no-kafka", help="Listen for announcements on oneranker.snapshots."),
    bootstrap_servers: Optional[str] = typer.Option(None, "--bootstrap-servers", envvar="ONERANKER_KAFKA",
                                                    help="Kafka bootstrap servers (default 127.0.0.1:9092)."),
    cuda: bool = typer.Option(True, "--cuda/--no-cuda", help="Use CUDAExecutionProvider when it works."),
) -> None:
    """Run one serving replica: POST /v1/rank, /healthz, /readyz, /metrics, /admin/{reload,rollback}."""
    from deploy.replica import FeastTokens, Replica, Server, StaticTokens, admin_token_from_env

    settings = config.settings()
    if features == "feast":
        tokens = FeastTokens(online)
    elif features == "none":
        tokens = StaticTokens()
    else:
        tokens = StaticTokens.from_file(Path(features))
    replica = Replica(replica_id, store or settings.snapshot_store_url, tokens, cache_dir=cache_dir,
                      threads=threads, poll_s=poll_s,
                      bootstrap=(bootstrap_servers or settings.bootstrap_servers) if kafka else None,
                      admin_token=admin_token_from_env(), want_cuda=cuda)
    server = Server(replica, host or settings.bind_host, port, log_level="info")
    console.print(f"replica {replica_id} on {server.url} serving from {replica.store.url}")
    server.run()


def bench_serve_cmd(
    out: Path = typer.Option(Path("bench_serve.json"), "--out", help="Write the results as JSON here."),
    quick: bool = typer.Option(False, "--quick", help="Smaller corpora and fewer requests."),
    requests: Optional[int] = typer.Option(None, "--requests", help="Requests per concurrency level."),
    presets: str = typer.Option("small,paper", "--presets", help="Comma-separated model presets."),
    corpora: Optional[str] = typer.Option(None, "--corpora", help="Comma-separated corpus sizes "
                                          "(default 1000,100000; --quick 1000,10000)."),
    threads: Optional[int] = typer.Option(1, "--threads", help="onnxruntime intra-op threads per replica "
                                          "(and for the bare graph; 0 = all cores)."),
    repeats: int = typer.Option(3, "--repeats", help="Load runs per concurrency level (medians reported)."),
    corpus_bits: Optional[int] = typer.Option(
        None, "--corpus-bits", help="The snapshots' corpus scan: 8 (int8 + exact shortlist rescoring) or 32 "
        "(fp32); the bare graph's scan gets the same (default: the exporter's, 8 from 65,536 rows)."),
    probes: int = typer.Option(100, "--probes", help="Users whose served top-20 is compared with exact fp32 "
                               "scoring (torch)."),
    swaps_under_load: int = typer.Option(20, "--swaps-under-load", help="Hot swaps of replica 0 while a c=1 "
                                         "request loop runs on it (failed requests and swap times reported)."),
) -> None:
    """p50/p95/p99 latency and requests/s over HTTP at concurrency 1 (one replica) and 8 (two
    replicas), per preset and corpus size (untrained weights), with the served path's stages, the
    session's time by ONNX node type, a bare graph of the same steps and sizes timed in the same run
    (served/bare ratios) and hot-swap times."""
    import json
    import os
    import time

    from deploy.bench import print_table, run_bench

    sizes = [int(x) for x in (corpora or ("1000,10000" if quick else "1000,100000")).split(",")]
    n = requests or (100 if quick else 300)
    started = {"utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "loadavg": os.getloadavg(),
               "cpus": os.cpu_count()}
    results = run_bench([p.strip() for p in presets.split(",")], sizes, n, threads=threads or None,
                        repeats=repeats, corpus_bits=corpus_bits, probes=probes,
                        swaps_under_load=swaps_under_load)
    print_table(results)
    for r in results:
        r["run_started"] = started
    out.write_text(json.dumps(results, indent=2))
    console.print(f"wrote {out}")


def bench_freshness_cmd(
    out: Path = typer.Option(Path("bench_freshness.json"), "--out", help="Write the results as JSON here."),
    runs: int = typer.Option(3, "--runs", help="Runs of `oneranker up` (the medians are reported)."),
    work_dir: Path = typer.Option(Path(".oneranker/bench-freshness"), "--work-dir",
                                  help="State and logs of the runs (wiped per run)."),
    limit: int = typer.Option(20000, "--limit", help="Interactions replayed per run (as `up --limit`)."),
    speed: float = typer.Option(20000.0, "--speed", help="Replay speed (as `up --speed`)."),
) -> None:
    """End-to-end freshness of `oneranker up`, run several times: medians of p50/p95 and of each
    stage (window, learn, checkpoint, export, validate, swap)."""
    import json

    from deploy.bench_freshness import print_table, run_bench

    doc = run_bench(runs, work_dir, ["--limit", str(limit), "--speed", f"{speed:g}"])
    print_table(doc)
    out.write_text(json.dumps(doc, indent=2))
    console.print(f"wrote {out}")


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    app.command("serve")(serve_cmd)
    bench_app.command("serve")(bench_serve_cmd)
    bench_app.command("freshness")(bench_freshness_cmd)
