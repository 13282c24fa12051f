"""``oneranker stream`` (the Faust worker) and ``oneranker bench stream``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from oneranker import config

BootstrapOpt = typer.Option(None, "--bootstrap-servers", envvar="ONERANKER_KAFKA",
                            help="Kafka bootstrap servers (host:port[,…]); default 127.0.0.1:9092.")


def stream(
    app_id: str = typer.Option("oneranker-stream", envvar="ONERANKER_STREAM_APP_ID",
                               help="Faust app id: consumer group and changelog topic prefix."),
    worker_id: Optional[str] = typer.Option(None, help="Names this worker's data dir (default: host)."),
    data_dir: Optional[Path] = typer.Option(None, help="Faust state dir (default $ONERANKER_HOME/"
                                            "stream/<app-id>-<worker-id>)."),
    store: str = typer.Option("memory://", help="Faust table store: memory:// (changelog recovery) or "
                              "rocksdb:// (needs python-rocksdb)."),
    topic_suffix: str = typer.Option("", envvar="ONERANKER_TOPIC_SUFFIX",
                                     help="Appended to every project topic name (isolation)."),
    click_window_ms: int = typer.Option(config.CLICK_WINDOW_MS, help="Click attribution window."),
    conversion_window_ms: int = typer.Option(config.CONVERSION_WINDOW_MS,
                                             help="Conversion attribution window (from the request)."),
    window_scale: float = typer.Option(1.0, help="Multiply both windows (a replay at speed S: 1/S)."),
    speed: Optional[float] = typer.Option(None, envvar="ONERANKER_REPLAY_SPEED", help="Replay speed; sets --window-scale to 1/speed."),
    allowed_lateness_ms: int = typer.Option(2000, help="Watermark = min over topics of max event "
                                            "time minus this."),
    flush_idle_s: float = typer.Option(2.0, help="A topic-partition silent this long stops holding "
                                       "the watermark; when all are silent it follows the wall clock."),
    history_len: int = typer.Option(config.DEFAULT_HISTORY_LEN, help="Tokens kept per user (N)."),
    history_actions: str = typer.Option("click,conversion", help="Actions that become tokens "
                                        "(impression,click,conversion)."),
    batch_size: int = typer.Option(5000, help="At most this many events per fetch, processed as "
                                   "one batch (a user's state is written once per batch)."),
    metrics_port: int = typer.Option(9102, envvar="ONERANKER_STREAM_METRICS_PORT",
                                     help="Prometheus /metrics port (0: off)."),
    feast: bool = typer.Option(True, help="Push user sequences/profiles to the Feast online store."),
    feast_online: Optional[str] = typer.Option(None, envvar="ONERANKER_FEAST_ONLINE",
                                               help="Feast online store (sqlite | path | redis://…)."),
    loglevel: str = typer.Option("warning", help="Faust log level."),
    bootstrap_servers: Optional[str] = BootstrapOpt,
) -> None:
    """Run the streaming worker: validate, dead-letter, join into samples, keep token sequences in Feast."""
    from features.tokens import Action
    from streaming.app import WorkerOptions, run_worker
    from streaming.joiner import JoinConfig

    scale = 1.0 / speed if speed else window_scale
    actions = tuple(int(Action[a.strip().upper()]) for a in history_actions.split(",") if a.strip())
    join = JoinConfig(click_window_ms, conversion_window_ms, allowed_lateness_ms, history_len,
                      actions).scaled(scale)
    opts = WorkerOptions(
        bootstrap=bootstrap_servers or config.settings().bootstrap_servers, app_id=app_id,
        topic_suffix=topic_suffix, data_dir=data_dir, store=store, join=join, idle_s=flush_idle_s,
        batch_size=batch_size, metrics_port=metrics_port or None,
        feast=feast, feast_online=feast_online)
    if worker_id:
        opts.worker_id = worker_id
    typer.echo(f"stream worker {app_id}: windows click {join.click_window_ms} ms, conversion "
               f"{join.conversion_window_ms} ms, lateness {join.allowed_lateness_ms} ms, "
               f"metrics :{metrics_port or '-'}", err=True)
    run_worker(opts, loglevel=loglevel)


def bench_stream(
    quick: bool = typer.Option(False, "--quick", help="A smaller stream and fewer runs."),
    out: Path = typer.Option(Path("bench_stream.json"), "--out", help="Write the results as JSON here."),
    runs: Optional[int] = typer.Option(None, help="Worker runs (median reported; default 3)."),
    requests: Optional[int] = typer.Option(None, help="Synthetic requests to replay."),
    bootstrap_servers: Optional[str] = typer.Option(
        None, "--bootstrap-servers", envvar="ONERANKER_KAFKA",
        help="Use this broker (default: start an embedded one on a free port)."),
) -> None:
    """Worker events/s vs the raw aiokafka consume rate on the same topics (median of runs)."""
    from streaming.bench import print_table, run_bench

    result = run_bench(bootstrap=bootstrap_servers, quick=quick, runs=runs, n_requests=requests)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print_table(result)
    typer.echo(f"wrote {out}")


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    app.command("stream")(stream)
    bench_app.command("stream")(bench_stream)
