"""``oneranker export`` and ``oneranker snapshots list|promote|rollback`` (heavy imports inside)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console()
log = logging.getLogger(__name__)
snapshots_app = typer.Typer(help="Snapshots in the store: list, promote, roll back.", no_args_is_help=True)

StoreOpt = typer.Option(None, "--store", envvar="ONERANKER_SNAPSHOT_STORE",
                        help="Snapshot store URL (default file://$ONERANKER_HOME/snapshots; s3://… via fsspec).")
BootstrapOpt = typer.Option(None, "--bootstrap-servers", envvar="ONERANKER_KAFKA",
                            help="Kafka bootstrap servers for announcements (default 127.0.0.1:9092).")
AnnounceOpt = typer.Option(True, "--announce/--no-announce",
                           help="Announce on oneranker.snapshots (replicas also poll the store).")


def _store(url: Optional[str]):
    from exporter.store import SnapshotStore
    from oneranker import config

    return SnapshotStore(url or config.settings().snapshot_store_url)


def _announcer(enabled: bool, bootstrap: Optional[str]):
    """A Kafka announcer, or None (with a warning) when no broker answers quickly."""
    if not enabled:
        return None
    from oneranker import config
    from oneranker.kafka import wait_for_broker

    bootstrap = bootstrap or config.settings().bootstrap_servers
    try:
        wait_for_broker(bootstrap, 3.0).close()
        from exporter.export import KafkaAnnouncer

        return KafkaAnnouncer(bootstrap)
    except Exception as exc:  # noqa: BLE001
        console.print(f"[yellow]no announcements: {exc}; replicas fall back to polling the store[/yellow]")
        return None


def _catalog_rows() -> int:
    """Rows the item table will need for the whole ad catalog (its ads + padding + OOV), or 0."""
    from features.store import ad_catalog_path

    path = ad_catalog_path()
    if not path.exists():
        return 0
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows + 2


def _quiet_export_logs() -> None:
    for name in ("onnx_ir", "onnxscript", "torch.onnx", "torch._dynamo", "torch.export"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _print_result(result) -> None:
    table = Table(title=f"export of checkpoint {result.step}: {result.status}")
    table.add_column("item")
    table.add_column("value")
    table.add_row("version", str(result.version))
    rep = result.report
    if "parity" in rep:
        p = rep["parity"]
        table.add_row("parity", f"ok={p['ok']} rows={p['rows']} max|Δ|={p['max_abs_diff']:.2e} "
                      f"top-K mismatches={p['topk_mismatch_rows']}")
    if "gate" in rep:
        table.add_row("quality gate", f"ok={rep['gate']['ok']}: " + "; ".join(rep["gate"]["notes"]))
    if "export" in rep:
        table.add_row("export", f"{rep['export']['export_s']} s, K={rep['export']['k']}, "
                      f"files {rep['export']['files']}")
    if rep.get("removed"):
        table.add_row("retention removed", str(rep["removed"]))
    if "error" in rep:
        table.add_row("error", rep["error"])
    console.print(table)


def export_cmd(
    checkpoint_dir: Path = typer.Option(..., "--checkpoint-dir", help="The trainer's checkpoint directory."),
    store: Optional[str] = StoreOpt,
    watch: bool = typer.Option(False, "--watch", help="Keep running; export every newer checkpoint."),
    interval_s: float = typer.Option(10.0, "--interval-s", help="Seconds between checks in --watch (idle, "
                                     "it also asks the trainer for a checkpoint of its newest weights)."),
    keep: int = typer.Option(5, "--keep", help="Snapshots to keep in the store (the current one always stays)."),
    gate_tolerance: float = typer.Option(0.02, "--gate-tolerance",
                                         help="Allowed drop of HR@10 / GAUC vs the serving snapshot."),
    holdout: Optional[Path] = typer.Option(None, "--holdout", help="JSONL of samples when the checkpoint "
                                           "carries no extra['recent_samples']."),
    force: bool = typer.Option(False, "--force", help="Export even if the checkpoint is already served."),
    announce: bool = AnnounceOpt,
    bootstrap_servers: Optional[str] = BootstrapOpt,
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result report as JSON here."),
    min_item_rows: Optional[int] = typer.Option(
        None, "--min-item-rows", help="Pad the exported item table to at least this many rows, so the "
        "traced graph is re-used while the ids fill it (default: the ad catalog's size, if there is one)."),
    corpus_bits: Optional[int] = typer.Option(
        None, "--corpus-bits", envvar="ONERANKER_CORPUS_BITS", help="8: the whole-corpus scan reads an int8 "
        "table and the graph rescores each head's shortlist exactly; 32: fp32 (default: 8 from 65,536 item rows)."),
) -> None:
    """Export the newest checkpoint to ONNX, verify it (checker, parity, quality gate) and publish
    it as a snapshot; announce it on oneranker.snapshots."""
    import signal
    import threading

    import torch

    from exporter.export import VALIDATION_THREADS, export_checkpoint
    from exporter.export import watch as watch_loop
    from trainer.checkpoint import latest

    # torch (parity, tracing) on as many threads as onnxruntime's validation: with the default (all
    # cores), parity took 2.8 s a snapshot in a loaded `oneranker up` on the 2-core box (a one-thread
    # process beside the same other load: 0.3-0.4 s)
    torch.set_num_threads(VALIDATION_THREADS)
    _quiet_export_logs()
    st = _store(store)
    ann = _announcer(announce, bootstrap_servers)
    if min_item_rows is None:
        min_item_rows = _catalog_rows()
    kw = dict(gate_tolerance=gate_tolerance, holdout_file=holdout, keep=keep, announce=ann, force=force,
              min_item_rows=min_item_rows, corpus_bits=corpus_bits)
    results = []

    def done(result):
        results.append(result)
        _print_result(result)
        if json_out:
            json_out.write_text(json.dumps([{"status": r.status, "step": r.step, "version": r.version,
                                             "report": r.report} for r in results], indent=2, default=str))

    try:
        if watch:
            stop = threading.Event()
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: stop.set())
            console.print(f"watching {checkpoint_dir} every {interval_s:g} s → {st.url}")
            watch_loop(checkpoint_dir, st, stop, interval_s, on_result=done, **kw)
            return
        ckpt = latest(checkpoint_dir)
        if ckpt is None:
            console.print(f"[red]no intact checkpoint in {checkpoint_dir}[/red]")
            raise typer.Exit(2)
        result = export_checkpoint(ckpt, st, **kw)
        done(result)
        if not result.ok:
            raise typer.Exit(1)
    finally:
        if ann is not None:
            ann.close()


@snapshots_app.command("list")
def list_cmd(store: Optional[str] = StoreOpt,
             as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List the snapshots in the store and which one is current."""
    st = _store(store)
    cur = st.current() or {}
    rows = []
    for v in st.versions():
        m = st.manifest(v)
        hold = (m.get("metrics") or {}).get("holdout") or {}
        rows.append({"version": v, "current": v == cur.get("version"), "created": m.get("created"),
                     "checkpoint_step": m.get("checkpoint_step"),
                     "trained_through_ms": (m.get("trained_through") or {}).get("event_time_ms"),
                     "hr@10": hold.get("hr@10"), "gauc": hold.get("gauc"),
                     "bytes": sum(f["size"] for f in m.get("files", {}).values())})
    if as_json:
        print(json.dumps({"store": st.url, "current": cur, "snapshots": rows}, indent=2))
        return
    table = Table(title=f"snapshots in {st.url} (current: {cur.get('version')}, {cur.get('action')})")
    for col in ("version", "current", "created", "checkpoint_step", "hr@10", "gauc", "bytes"):
        table.add_column(col)
    import datetime as dt

    for r in rows:
        table.add_row(str(r["version"]), "*" if r["current"] else "",
                      dt.datetime.fromtimestamp(r["created"]).isoformat(timespec="seconds") if r["created"] else "",
                      str(r["checkpoint_step"]), f"{r['hr@10']:.4f}" if r["hr@10"] is not None else "-",
                      f"{r['gauc']:.4f}" if r["gauc"] is not None else "-", f"{r['bytes']:,}")
    console.print(table)


def _point(version: int, action: str, store, announce, bootstrap_servers) -> None:
    from exporter.store import SnapshotError

    st = _store(store)
    try:
        doc = st.set_current(version, action)
    except SnapshotError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    ann = _announcer(announce, bootstrap_servers)
    if ann is not None:
        try:
            ann({"version": version, "url": doc["url"], "created": doc["updated"], "action": action})
        finally:
            ann.close()
    console.print(f"current → {version} ({action}, epoch {doc['epoch']}, was {doc['previous']})")


@snapshots_app.command("promote")
def promote_cmd(version: int = typer.Argument(..., help="Snapshot version."), store: Optional[str] = StoreOpt,
                announce: bool = AnnounceOpt, bootstrap_servers: Optional[str] = BootstrapOpt) -> None:
    """Make VERSION current (replicas follow, even to a lower version)."""
    _point(version, "promote", store, announce, bootstrap_servers)


@snapshots_app.command("rollback")
def rollback_cmd(version: int = typer.Argument(..., help="Snapshot version to go back to."),
                 store: Optional[str] = StoreOpt, announce: bool = AnnounceOpt,
                 bootstrap_servers: Optional[str] = BootstrapOpt) -> None:
    """Roll the replicas back to VERSION (an explicit move to an older snapshot)."""
    _point(version, "rollback", store, announce, bootstrap_servers)


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    app.command("export")(export_cmd)
    app.add_typer(snapshots_app, name="snapshots")
