"""``oneranker up``: the whole system as local processes on embedded defaults.

broker (Tansu) → init (topics, ad catalog, feast apply) → supervised services (stream worker,
trainer, exporter --watch, N serving replicas) → dataset replay, with live progress → once the
replicas serve a snapshot trained on the replay: top-10 ads per replica and the measured freshness.

Freshness of an event = from the moment it was produced to the first moment a replica serves a
snapshot whose trained-through offsets cover that event's sample (its offset on oneranker.samples).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
from kafka import KafkaConsumer, TopicPartition
from rich.console import Console
from rich.live import Live
from rich.table import Table

from deploy.freshness import STAGES, Freshness, sample_offsets
from deploy.supervisor import ServiceSpec, Supervisor
from oneranker import config
from streaming.broker import free_port

log = logging.getLogger(__name__)
console = Console()


@dataclass
class UpOptions:
    dataset: str = "movielens-100k"
    # The first 20k MovieLens interactions span 49 days: at speed 20000 they replay in ~210 s, a
    # rate (~95 requests/s, ~1,100 events/s) the whole stack keeps up with on 2 CPU cores
    # (measured: freshness p50 21 s; at speed 30000 the trainer fell behind: p50 92 s).
    speed: float = 20000.0
    limit: int | None = 20000
    replicas: int = 2
    impressions: int = 10
    seed: int = 0
    preset: str = "small"
    port: int | None = None  # broker port; default 9092 when free, else any free port
    home: Path | None = None
    timeout_s: float = 540.0  # the whole run, replay included
    sample_every: int = 50  # every N-th request is followed for freshness
    show_users: int = 3
    metrics_port: int = 0  # Prometheus endpoint of `up` (freshness histogram); 0 = any free port
    # The exporter asks for a checkpoint whenever it is idle (trainer/checkpoint.py, want_checkpoint)
    # and looks for it every export_interval_s; the timed checkpoint is the crash-recovery fallback.
    checkpoint_every_s: float = 10.0
    export_interval_s: float = 0.1
    # The replay sends each topic-partition in event-time order, so the watermark needs little
    # slack for disorder; a quiet topic (conversions are sparse) stops holding it after idle_s.
    # Labels that still come after their window are counted (summary "late_labels").
    allowed_lateness_ms: int = 500
    flush_idle_s: float = 0.5
    train_max_wait_ms: int = 200  # a partial batch is learned after this long (freshness's learn stage)


def _freshness_metric(port: int):
    """The freshness histogram on a Prometheus endpoint of its own (printed at start)."""
    from prometheus_client import CollectorRegistry, Histogram, start_http_server

    registry = CollectorRegistry()
    hist = Histogram("oneranker_freshness_seconds",
                     "Event production → first served by a replica whose snapshot covers its sample",
                     buckets=(1, 2, 5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600), registry=registry)
    port = port or free_port()
    start_http_server(port, addr=config.settings().bind_host, registry=registry)
    console.print(f"freshness metric: http://{config.settings().bind_host}:{port}/metrics "
                  "(oneranker_freshness_seconds)")
    return hist


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _oneranker(*args: str) -> list[str]:
    return [sys.executable, "-m", "oneranker.cli", *args]


def _service_specs(opts: UpOptions, home: Path, store_url: str, ports: dict[str, int]) -> list[ServiceSpec]:
    ckpt = str(home / "checkpoints")
    specs = [
        ServiceSpec("stream", _oneranker("stream", "--speed", str(opts.speed),
                                         "--allowed-lateness-ms", str(opts.allowed_lateness_ms),
                                         "--flush-idle-s", str(opts.flush_idle_s),
                                         "--metrics-port", str(ports["stream"]))),
        ServiceSpec("trainer", _oneranker("train", "--device", "auto", "--preset", opts.preset,
                                          "--checkpoint-dir", ckpt,
                                          "--checkpoint-every-s", str(opts.checkpoint_every_s),
                                          "--max-wait-ms", str(opts.train_max_wait_ms),
                                          "--metrics-port", str(ports["trainer"]))),
        ServiceSpec("exporter", _oneranker("export", "--watch", "--checkpoint-dir", ckpt,
                                           "--store", store_url, "--interval-s", str(opts.export_interval_s),
                                           "--json", str(home / "exports.json"))),
    ]
    for i in range(1, opts.replicas + 1):
        # one onnxruntime thread each: the replicas share 2 cores with everything else here
        specs.append(ServiceSpec(f"serve-{i}", _oneranker(
            "serve", "--replica-id", f"serve-{i}", "--store", store_url, "--port", str(ports[f"serve-{i}"]),
            "--threads", "1")))
    return specs


def replica_version(client: httpx.Client, port: int) -> tuple[str | None, float | None]:
    """The version a replica serves, and the wall time it swapped it in (None if it cannot say)."""
    try:
        r = client.get(f"http://127.0.0.1:{port}/readyz", timeout=2.0)
        doc = r.json() if r.status_code == 200 else {}
    except (httpx.HTTPError, ValueError):
        return None, None
    v = doc.get("model_version")
    swap = doc.get("last_swap") or {}
    at = swap.get("at") if v is not None and swap.get("version") == v else None
    return (None if v is None else str(v)), at


def snapshot_offsets(store_url: str, version: str) -> dict[int, int]:
    """Partition → next offset on the samples topic that the snapshot was trained through."""
    from exporter.store import SnapshotStore

    manifest = SnapshotStore(store_url).manifest(int(version))
    return sample_offsets((manifest.get("trained_through") or {}).get("offsets"))


def _follow_samples(bootstrap: str, fresh: Freshness, counts: dict, stop: threading.Event) -> None:
    """Map followed requests to their sample's (partition, offset); count distinct samples."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                             auto_offset_reset="earliest", client_id="oneranker-up-samples")
    parts = [TopicPartition(config.TOPIC_SAMPLES, p)
             for p in sorted(consumer.partitions_for_topic(config.TOPIC_SAMPLES) or [])]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    seen: set[str] = set()
    while not stop.is_set():
        for tp, records in consumer.poll(timeout_ms=300).items():
            for rec in records:
                try:
                    doc = json.loads(rec.value)
                except ValueError:
                    continue
                seen.add(doc.get("sample_id"))
                rid = doc.get("request_id")
                with fresh.lock:
                    if rid in fresh.produced and rid not in fresh.sample_at:
                        fresh.sample_at[rid] = (tp.partition, rec.offset)
                        fresh.sample_time[rid] = rec.timestamp / 1000.0  # the producer's send time
        counts["samples"] = len(seen)
    consumer.close()


def _scrape(client: httpx.Client, port: int, names: tuple[str, ...], label: str = "") -> dict[str, float]:
    """A few series from a Prometheus endpoint (summed over labels; only lines with ``label``)."""
    out: dict[str, float] = {}
    try:
        text = client.get(f"http://127.0.0.1:{port}/metrics", timeout=2.0).text
    except httpx.HTTPError:
        return out
    for line in text.splitlines():
        if line.startswith("#") or (label and label not in line):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in names:
            try:
                value = float(line.rsplit(" ", 1)[1])
            except ValueError:
                continue
            # Filtered by a label: the first matching series; otherwise the sum over all series.
            out[name] = value if label and name not in out else out.get(name, 0.0) + (0 if label else value)
    return out


def run_up(opts: UpOptions) -> int:
    from oneranker.kafka import ensure_topics
    from streaming.broker import EmbeddedBroker, port_in_use
    from streaming.replay.adlayer import load_requests, request_events
    from streaming.replay.producer import publish

    # Ctrl-C and SIGTERM both unwind through the ``finally`` below: every service, then the broker.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    home = (opts.home or config.settings().home / "up").resolve()
    if home.exists():
        shutil.rmtree(home)  # the embedded broker is memory-only: old state would not match it
    home.mkdir(parents=True)
    store_url = (home / "snapshots").as_uri()
    os.environ.update({"ONERANKER_HOME": str(home), "ONERANKER_SNAPSHOT_STORE": store_url})
    port = opts.port or (config.DEFAULT_BROKER_PORT if not port_in_use("127.0.0.1", config.DEFAULT_BROKER_PORT)
                         else free_port())
    deadline = time.monotonic() + opts.timeout_s
    sup = Supervisor(home / "logs", state_file=home / "services.json")
    stop = threading.Event()
    broker = EmbeddedBroker(port=port, log_path=home / "logs" / "broker.log")
    try:
        broker.start()
        os.environ["ONERANKER_KAFKA"] = broker.bootstrap
        console.print(f"[bold]broker[/bold] {broker.bootstrap}   [bold]home[/bold] {home}")
        with console.status(f"init: topics, {opts.dataset} ad layer, feast apply"):
            ensure_topics(broker.bootstrap)
            requests, catalog = load_requests(opts.dataset, seed=opts.seed, n_impressions=opts.impressions,
                                              limit=opts.limit)
            from features.store import ad_catalog_path, apply

            apply(catalog=catalog.write(ad_catalog_path()))
            events = request_events(requests, int(time.time() * 1000), opts.speed)
        ports = {"stream": free_port(), "trainer": free_port(),
                 **{f"serve-{i}": free_port() for i in range(1, opts.replicas + 1)}}
        for spec in _service_specs(opts, home, store_url, ports):
            sup.start(spec)
        console.print(f"services: {', '.join(sup.services)} (logs in {home / 'logs'})")

        # The exporter traces its serving graph on the trainer's initial checkpoint (20-60 s here):
        # the system is ready, and the replay starts, once that is done.
        with console.status("warming up: the exporter traces the serving graph"):
            warm = _wait_for_export(home / "exports.json", sup, min(240.0, max(0.0, deadline - time.monotonic())))
        console.print(f"exporter ready: {warm}")
        fresh, counts = Freshness(histogram=_freshness_metric(opts.metrics_port)), {"samples": 0, "produced": 0}
        followed = {r.request_id for i, r in enumerate(requests) if i % opts.sample_every == 0}

        def on_sent(i: int, event_type: str, data: dict) -> None:
            counts["produced"] = i + 1
            rid = data["request_id"]
            if rid in followed and rid not in fresh.produced:
                with fresh.lock:
                    fresh.produced[rid] = time.time()

        replay_done = threading.Event()

        def replay() -> None:
            try:
                counts["replay"] = publish(events, broker.bootstrap, pace=True, show_progress=False,
                                           on_sent=on_sent, stop=stop).as_dict()
            finally:
                replay_done.set()

        threads = [threading.Thread(target=replay, name="replay", daemon=True),
                   threading.Thread(target=_follow_samples, args=(broker.bootstrap, fresh, counts, stop),
                                    name="samples", daemon=True)]
        for t in threads:
            t.start()
        return _watch(opts, sup, fresh, counts, ports, store_url, requests, len(events), replay_done, deadline)
    finally:
        stop.set()
        sup.stop_all()
        broker.stop()


def _wait_for_export(path: Path, sup: Supervisor, timeout_s: float) -> str:
    """Poll the exporter's result file until it reports its first result (or give up)."""
    from oneranker.polling import wait_for

    def first_result():
        sup.check()
        try:
            return (json.loads(path.read_text()) or [None])[0]
        except (OSError, ValueError):
            return None

    r = wait_for(first_result, timeout_s, 0.5)
    if r is None:
        return f"not yet after {timeout_s:.0f} s (the replay starts anyway)"
    return f"{r['status']} ({(r.get('report') or {}).get('export', {}).get('export_s')} s)"


class _ManifestPoller:
    """Reads each new checkpoint and snapshot manifest once, for the freshness breakdown (the
    trainer and exporter keep only the newest few, so this polls with the watch loop)."""

    def __init__(self, ckpt_dir: Path, store_url: str, fresh: Freshness):
        from exporter.store import SnapshotStore

        self.ckpt_dir, self.store, self.fresh = ckpt_dir, SnapshotStore(store_url), fresh
        self.seen_ckpts: set[str] = set()
        self.seen_versions: set[int] = set()

    def poll(self) -> None:
        for path in sorted(self.ckpt_dir.glob("ckpt-*.json")):
            if path.name not in self.seen_ckpts:
                try:
                    self.fresh.on_checkpoint(json.loads(path.read_text()))
                    self.seen_ckpts.add(path.name)
                except (OSError, ValueError, KeyError):
                    pass  # deleted by retention meanwhile, or being replaced
        try:
            versions = self.store.versions()
        except Exception:  # noqa: BLE001 - the store is being written
            return
        for v in versions:
            if v not in self.seen_versions:
                try:
                    self.fresh.on_snapshot(self.store.manifest(v))
                    self.seen_versions.add(v)
                except Exception:  # noqa: BLE001 - a snapshot being published
                    pass


def _watch(opts, sup, fresh, counts, ports, store_url, requests, n_events, replay_done, deadline) -> int:
    client = httpx.Client()
    versions: dict[str, str | None] = {name: None for name in ports if name.startswith("serve")}
    first_version: str | None = None
    offsets_cache: dict[str, dict[int, int]] = {}
    notes: list[str] = []
    done_since = None
    manifests = _ManifestPoller(sup.log_dir.parent / "checkpoints", store_url, fresh)

    def table() -> Table:
        t = Table(title=f"oneranker up — {opts.dataset} at speed {opts.speed:g}", expand=False)
        t.add_column("what")
        t.add_column("now", justify="right")
        t.add_row("events produced", f"{counts['produced']:,} / {n_events:,}")
        t.add_row("samples emitted", f"{counts['samples']:,} / {len(requests):,}")
        tm = _scrape(client, ports["trainer"], ("oneranker_trainer_steps_total",
                                                "oneranker_trainer_samples_total"))
        auc = _scrape(client, ports["trainer"], ("oneranker_trainer_prequential",), label='metric="auc"')
        t.add_row("trainer steps / samples", f"{tm.get('oneranker_trainer_steps_total', 0):,.0f} / "
                                             f"{tm.get('oneranker_trainer_samples_total', 0):,.0f}")
        if auc:
            t.add_row("prequential AUC (window)", f"{auc['oneranker_trainer_prequential']:.4f}")
        for name, v in versions.items():
            t.add_row(f"{name} serves", str(v or "-"))
        f = fresh.summary()
        t.add_row("freshness p50 / p95 (s)", f"{f['p50_s']} / {f['p95_s']}  ({f['served']}/{f['followed']})")
        for n in notes[-3:]:
            t.add_row("[yellow]supervisor[/yellow]", n)
        return t

    with Live(table(), console=console, refresh_per_second=2, transient=False) as live:
        while time.monotonic() < deadline:
            notes.extend(sup.check())
            manifests.poll()
            now = time.time()
            for name in versions:
                v, swapped_at = replica_version(client, ports[name])
                if v and v != versions[name]:
                    versions[name] = v
                    first_version = first_version or v
                    if v not in offsets_cache:
                        try:
                            offsets_cache[v] = snapshot_offsets(store_url, v)
                        except Exception as exc:  # noqa: BLE001 - a snapshot being written
                            log.debug("manifest of %s not readable yet: %s", v, exc)
                            versions[name] = None
                            continue
                    # the replica's own swap time: this loop's polling interval is not freshness
                    fresh.on_version(min(now, swapped_at or now), offsets_cache[v])
            live.update(table())
            all_newer = all(v and v != first_version for v in versions.values())
            caught_up = replay_done.is_set() and counts["samples"] >= len(requests)
            followed_served = len(fresh.served) >= len(fresh.sample_at) > 0
            if replay_done.is_set() and all_newer and (caught_up and followed_served):
                break
            if replay_done.is_set() and all_newer and done_since is None:
                done_since = time.monotonic()
            if done_since and time.monotonic() - done_since > 120:
                break  # good enough: newer snapshots are served; stragglers would only add waiting
            time.sleep(0.5)
    ok = all(v and v != first_version for v in versions.values())
    _show_results(client, ports, versions, requests, opts, fresh, counts)
    diversity = _diversity(client, ports[next(iter(versions))], requests)
    console.print(f"[bold]personalisation[/bold]: mean overlap of two users' top-10 lists "
                  f"{diversity['mean_overlap@10']} over {diversity['users']} users (the same list for "
                  f"everyone, as popularity gives, is 1.0)")
    client.close()
    summary = {"ok": ok, "first_version": first_version, "versions": versions,
               "samples": counts["samples"], "requests": len(requests), "freshness": fresh.summary(),
               "snapshots_published": len(manifests.seen_versions), "diversity": diversity,
               "late_labels": _late_labels(sup.log_dir.parent),
               "exports": _export_phases(sup.log_dir.parent / "exports.json"),
               "restarts": {name: m.restarts for name, m in sup.services.items()}}
    (sup.log_dir.parent / "up-summary.json").write_text(json.dumps(summary, indent=2))
    if not ok:
        console.print("[red]the replicas did not reach a snapshot newer than the first one in time[/red]")
    return 0 if ok else 1


def _export_phases(path: Path) -> dict:
    """The exporter's results by status and, over its published snapshots, the median seconds of
    each phase (exporter/export.py) and of the gate's looks: where a snapshot's time goes."""
    import statistics

    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    published = [r.get("report") or {} for r in results if r.get("status") == "published"]
    phases: dict[str, list[float]] = {}
    for rep in published:
        for k, v in (rep.get("phases_s") or {}).items():
            phases.setdefault(k, []).append(v)
    looks = [int(n.split()[1]) for rep in published for n in (rep.get("gate") or {}).get("notes", [])
             if n.startswith("looks: ")]
    return {"by_status": dict(Counter(r.get("status") for r in results)),
            "phases_p50_s": {k: round(statistics.median(v), 3) for k, v in phases.items()},
            "gate_looks_mean": round(statistics.fmean(looks), 2) if looks else None}


def _late_labels(home: Path) -> dict:
    """Labels the stream worker counted after their request's window (the stats of its last
    incarnation): what a too-small allowed lateness would lose."""
    out: dict = {}
    for f in (home / "stream").glob("*/stats.json"):
        try:
            outcomes = json.loads(f.read_text()).get("outcomes", {})
        except (OSError, ValueError):
            continue
        for k in ("late_click", "late_conversion"):
            out[k] = out.get(k, 0) + int(outcomes.get(k, 0))
    return out


def _diversity(client: httpx.Client, port: int, requests, n_users: int = 50) -> dict:
    """Mean pairwise overlap |A ∩ B| / 10 of the top-10 lists a replica serves to the last
    ``n_users`` active users: 1.0 when everyone gets the same list (popularity), lower when the
    lists follow the users' histories."""
    lists = []
    users = _last_users(requests, n_users)
    for u in users:
        try:
            r = client.post(f"http://127.0.0.1:{port}/v1/rank", json={"user_id": u, "k": 10}, timeout=10.0)
            if r.status_code == 200:
                lists.append({str(a["ad_id"]) for a in r.json()["items"]})
        except (httpx.HTTPError, ValueError, KeyError):
            continue
    pairs = [len(a & b) / 10 for i, a in enumerate(lists) for b in lists[i + 1:]]
    return {"users": len(lists), "mean_overlap@10": round(sum(pairs) / len(pairs), 3) if pairs else None}


def _last_users(requests, n: int) -> list[str]:
    """The ``n`` users of the most recent requests, newest first."""
    users: list[str] = []
    for r in reversed(requests):
        if r.user_id not in users:
            users.append(r.user_id)
        if len(users) == n:
            break
    return users


def _show_results(client, ports, versions, requests, opts, fresh, counts) -> None:
    users = _last_users(requests, opts.show_users)
    for name in versions:
        t = Table(title=f"{name}: top-10 ads (model {versions[name]})")
        t.add_column("user")
        t.add_column("top-10 ad ids")
        for u in users:
            try:
                r = client.post(f"http://127.0.0.1:{ports[name]}/v1/rank", json={"user_id": u, "k": 10},
                                timeout=10.0)
                body = r.json()
                ids = ([str(a["ad_id"]) for a in body["items"]] + (["(cold start)"] if body.get("cold_start") else [])
                       if r.status_code == 200 else [f"HTTP {r.status_code}: {r.text[:80]}"])
            except (httpx.HTTPError, ValueError) as exc:
                ids = [f"error: {exc}"]
            t.add_row(u, " ".join(ids))
        console.print(t)
    replay = counts.get("replay") or {}
    if replay:
        console.print(f"[bold]replay[/bold] {replay['events']:,} events {replay['by_type']}, "
                      f"{replay['users']:,} users, {replay['ads']:,} ads, {replay['requests']:,} requests, "
                      f"{replay['events_per_s']:,.0f} events/s over {replay['seconds']:.0f} s")
    f = fresh.summary()
    console.print(f"[bold]freshness[/bold] (production → served by a replica, {f['served']} of "
                  f"{f['followed']} followed requests): p50 {f['p50_s']} s, p95 {f['p95_s']} s")
    t = Table(title="where the freshness goes (deploy/freshness.py), seconds per stage")
    for col in ("stage", "p50", "p95", "mean", "requests"):
        t.add_column(col, justify="right" if col != "stage" else "left")
    for stage in STAGES:
        q = f["stages"][stage]
        t.add_row(stage, str(q["p50_s"]), str(q["p95_s"]), str(q["mean_s"]), str(q["n"]))
    console.print(t)
