"""``oneranker bench keepup``: does the online trainer keep up with the replay at its default speed?

For each torch thread count: a fresh topic; ``oneranker train`` (defaults: batch 64 growing to 256
under a backlog, checkpoints, prequential metrics) as its own process on it; once it has joined
the group, the dataset's samples (trainer.replay_samples: the samples the joiner emits, on the
replay's compressed clock) are published PACED by event time, as ``oneranker produce --speed``
would make them appear. Every second the tool records the samples produced and the samples the
trainer has learned (its metrics lines, every ``metrics_every_s``), and the 1-minute load average.

Lag = produced − learned (samples), and the lag in seconds = how long ago the newest learned
sample was produced. End offsets are not used: Tansu's high-watermark is wrong (DESIGN §8).
"Keeps up" = the lag is bounded: the trainer's rate while it has a backlog exceeds the replay's
mean rate, so each burst's backlog drains, and it has caught up shortly after the replay ends.
"""

from __future__ import annotations

import bisect
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from oneranker import config
from oneranker.polling import wait_for

DEFAULT_OUT = Path(__file__).parent / "results" / "keepup_cpu.json"


def _read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line being written
            pass
    return out


def _cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) a process has used so far (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def encode(samples) -> list[tuple[bytes, bytes, int]]:
    """(key, JSON value, event time) per sample, encoded before the replay clock starts."""
    return [(s.user_id.encode(), s.to_json(), s.ts) for s in samples]


def publish_paced(raws: list[tuple[bytes, bytes, int]], bootstrap: str, topic: str, on_sent) -> None:
    """Publish encoded samples when the wall clock reaches each one's event-time offset.
    aiokafka, not kafka-python: its record batches are built and checksummed in C, while
    kafka-python without the crc32c package spends ~300 µs of pure-Python CRC per 3.3 KB sample —
    CPU this 2-core box would take from the trainer under test (hence also ``encode`` up front)."""
    import asyncio

    from aiokafka import AIOKafkaProducer

    async def main():
        prod = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, max_request_size=4 * 1024 * 1024,
                                client_id="oneranker-keepup")
        await prod.start()
        try:
            loop = asyncio.get_running_loop()
            start, ts0 = loop.time(), raws[0][2] if raws else 0
            for n, (key, value, ts) in enumerate(raws, 1):
                ahead = (ts - ts0) / 1000.0 - (loop.time() - start)
                if ahead > 0.002:
                    await asyncio.sleep(ahead)  # pacing the replay clock, not synchronisation
                await prod.send(topic, value=value, key=key)  # queued; delivery is batched
                on_sent(n)
            await prod.flush()
        finally:
            await prod.stop()

    asyncio.run(main())


def run_once(raws, bootstrap: str, threads: int, workdir: Path, metrics_every_s: float = 2.0,
             drain_timeout_s: float = 600.0, train_args: tuple[str, ...] = ()) -> dict:
    """One replay into a fresh topic with one trainer process; returns the series and a summary."""
    from oneranker.kafka import ensure_topics

    tag = uuid.uuid4().hex[:8]
    topic, group = f"keepup.samples.{tag}", f"keepup-trainer-{tag}"
    ensure_topics(bootstrap, [topic], partitions=config.DEFAULT_PARTITIONS)
    run_dir = workdir / f"threads{threads}-{tag}"
    run_dir.mkdir(parents=True)
    metrics = run_dir / "metrics.jsonl"
    log_path = run_dir / "trainer.log"
    cmd = [sys.executable, "-m", "oneranker.cli", "train", "--bootstrap-servers", bootstrap,
           "--samples-topic", topic, "--group-id", group, "--checkpoint-dir", str(run_dir / "ckpt"),
           "--metrics-port", "-1", "--metrics-jsonl", str(metrics), "--metrics-every-s", str(metrics_every_s),
           "--threads", str(threads), "--device", "cpu", *train_args]
    env = dict(os.environ, ONERANKER_HOME=str(run_dir / "home"), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
    try:
        if not wait_for(lambda: proc.poll() is not None or "assigned [" in log_path.read_text(), 90, 0.1):
            raise RuntimeError(f"trainer did not join the group in 90 s: {log_path}")
        if proc.poll() is not None:
            raise RuntimeError(f"trainer exited: {log_path.read_text()[-2000:]}")

        produced_at: list[float] = []  # wall time at which sample #i was sent

        def on_sent(n: int) -> None:
            produced_at.append(time.time())

        cpu0 = _cpu_s(proc.pid)  # after start-up (imports, model init): the replay's cost only
        t0 = time.time()
        producer = threading.Thread(target=publish_paced, args=(raws, bootstrap, topic, on_sent), daemon=True)
        producer.start()
        load: list[tuple[float, float]] = []
        while producer.is_alive():  # the load average, sampled while the replay runs
            load.append((time.time(), os.getloadavg()[0]))
            producer.join(timeout=1.0)
        t_replay_end = time.time()
        n = len(produced_at)

        def caught_up():
            m = _read_metrics(metrics)
            return m and m[-1]["samples_learned"] >= n

        while (not wait_for(caught_up, 1.0, 0.1) and proc.poll() is None
               and time.time() - t_replay_end < drain_timeout_s):
            load.append((time.time(), os.getloadavg()[0]))
        drained = bool(caught_up())
        cpu1 = _cpu_s(proc.pid)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # graceful: final checkpoint
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    m = _read_metrics(metrics)
    cpu = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
    return summarize_run(threads, t0, t_replay_end, produced_at, m, load, drained, cpu_s=cpu, log=str(log_path))


def summarize_run(threads: int, t0: float, t_replay_end: float, produced_at: list[float], metrics: list[dict],
                  load: list[tuple[float, float]], drained: bool, cpu_s: float | None, log: str) -> dict:
    n = len(produced_at)
    series = []
    for rec in metrics:
        t, learned = rec["ts"], rec["samples_learned"]
        produced = bisect.bisect_right(produced_at, t)
        lag = max(produced - learned, 0)
        # seconds since the newest learned sample was produced
        lag_s = (t - produced_at[learned - 1]) if 0 < learned <= len(produced_at) else None
        i = bisect.bisect_right([x for x, _ in load], t)
        series.append({"t_s": round(t - t0, 1), "produced": produced, "learned": learned, "lag": lag,
                       "lag_s": round(lag_s, 2) if lag_s is not None else None,
                       "mean_batch": rec.get("mean_batch"), "load1": load[max(i - 1, 0)][1] if load else None})
    during = [r for r in series if r["t_s"] <= t_replay_end - t0]
    lags = [r["lag"] for r in during] or [0]
    t_caught = next((r["t_s"] for r in series if r["t_s"] >= t_replay_end - t0 and r["learned"] >= n), None)
    # learning rate while the trainer had a backlog (lag > one max batch): its capacity
    busy, prev = [], None
    for r in series:
        if prev is not None and prev["lag"] > 256 and r["t_s"] > prev["t_s"]:
            busy.append((r["learned"] - prev["learned"], r["t_s"] - prev["t_s"]))
        prev = r
    span = t_replay_end - t0
    last = metrics[-1] if metrics else {}
    tm = last.get("time_s", {})
    total = sum(v for k, v in tm.items() if k != "compute_s") or 1.0
    loads = [x for _, x in load]
    res = {
        "threads": threads, "samples": n, "replay_wall_s": round(span, 1),
        "produce_per_s": round(n / span, 1) if span else None,
        "learned": last.get("samples_learned", 0), "drained": drained,
        "caught_up_after_replay_s": round(t_caught - span, 1) if t_caught is not None else None,
        "learn_per_s_overall": round(last.get("samples_learned", 0) / max(t_caught or series[-1]["t_s"], 1e-9), 1)
        if series else None,
        "learn_per_s_backlogged": round(sum(a for a, _ in busy) / sum(b for _, b in busy), 1) if busy else None,
        "lag_max": max(lags), "lag_p50": statistics.median(lags),
        "lag_p95": sorted(lags)[int(0.95 * (len(lags) - 1))],
        "lag_at_replay_end": during[-1]["lag"] if during else None,
        "lag_s_max": max((r["lag_s"] for r in during if r["lag_s"] is not None), default=None),
        "fraction_caught_up": round(sum(r["lag"] <= 256 for r in during) / max(len(during), 1), 3),
        "mean_batch": round(statistics.mean(r["mean_batch"] for r in series if r["mean_batch"]), 1)
        if any(r["mean_batch"] for r in series) else None,
        "trainer_cpu_s": round(cpu_s, 1) if cpu_s else None,
        "samples_per_trainer_cpu_s": round(last.get("samples_learned", 0) / cpu_s, 1) if cpu_s else None,
        "load1_mean": round(statistics.mean(loads), 2) if loads else None,
        "load1_max": round(max(loads), 2) if loads else None,
        "time_split": {k.removesuffix("_s"): round(v / total, 3) for k, v in tm.items() if k != "compute_s"},
        "trainer_log": log, "series": series,
    }
    # bounded: capacity above the mean arrival rate, and caught up soon after the last burst
    res["keeps_up"] = bool(drained and res["learn_per_s_backlogged"] is not None
                           and res["learn_per_s_backlogged"] > (res["produce_per_s"] or 0)
                           and res["caught_up_after_replay_s"] is not None
                           and res["caught_up_after_replay_s"] <= 0.25 * span)
    return res


def keepup(dataset: str = "movielens-100k", speed: float = 100_000.0, threads: tuple[int, ...] = (1, 2),
           limit: int | None = None, bootstrap: str | None = None, out: str | None = str(DEFAULT_OUT),
           metrics_every_s: float = 2.0, drain_timeout_s: float = 300.0, train_args: tuple[str, ...] = (),
           show: bool = True) -> dict:
    from rich.console import Console
    from rich.table import Table

    from trainer.replay_samples import load_samples

    samples, info = load_samples(dataset, limit=limit, speed=speed)
    raws = encode(samples)
    del samples
    res: dict = {"dataset": dataset, "speed": speed, "replay": info, "cpus": os.cpu_count(),
                 "load1_before": os.getloadavg()[0], "train_args": list(train_args), "runs": []}
    with tempfile.TemporaryDirectory(prefix="keepup-") as tmp:
        broker = None
        if bootstrap is None:
            from streaming.broker import EmbeddedBroker, free_port

            broker = EmbeddedBroker(port=free_port(), log_path=Path(tmp) / "tansu.log").start()
            bootstrap = broker.bootstrap
        try:
            for n in threads:
                r = run_once(raws, bootstrap, n, Path(tmp), metrics_every_s, drain_timeout_s, train_args)
                r.pop("trainer_log")
                res["runs"].append(r)
                if out:  # after each run: a long run that is interrupted keeps the earlier ones
                    Path(out).parent.mkdir(parents=True, exist_ok=True)
                    Path(out).write_text(json.dumps(res, indent=1))
        finally:
            if broker is not None:
                broker.stop()
    console = Console(quiet=not show, width=160)
    t = Table(title=f"trainer keep-up: {dataset} replay at speed {speed:g} "
                    f"({info['samples']:,} samples, mean {info['replay_samples_per_s']} /s), CPU")
    for c in ("threads", "produced/s", "learned/s (backlog)", "lag max", "lag p50", "lag p95", "lag max s",
              "caught up after", "mean batch", "learned/CPU-s", "load1 mean/max", "keeps up"):
        t.add_column(c, justify="right")
    for r in res["runs"]:
        t.add_row(str(r["threads"]), f"{r['produce_per_s']:,.0f}", f"{r['learn_per_s_backlogged'] or 0:,.0f}",
                  f"{r['lag_max']:,}", f"{r['lag_p50']:,.0f}", f"{r['lag_p95']:,}", str(r["lag_s_max"]),
                  f"{r['caught_up_after_replay_s']} s" if r["drained"] else f"not in {drain_timeout_s:g} s", str(r["mean_batch"]), str(r["samples_per_trainer_cpu_s"]),
                  f"{r['load1_mean']}/{r['load1_max']}", "yes" if r["keeps_up"] else "NO")
    console.print(t)
    for r in res["runs"]:
        lt = Table(title=f"lag over time, {r['threads']} thread(s) (every ~10 s)")
        for c in ("t s", "produced", "learned", "lag", "lag s", "batch", "load1"):
            lt.add_column(c, justify="right")
        step = max(1, int(round(10 / metrics_every_s)))
        for row in r["series"][::step]:
            lt.add_row(f"{row['t_s']:.0f}", f"{row['produced']:,}", f"{row['learned']:,}", f"{row['lag']:,}",
                       str(row["lag_s"]), str(row["mean_batch"]), f"{row['load1']:.2f}" if row["load1"] else "-")
        console.print(lt)
        console.print("time split of the trainer loop (poll includes idle waits): " + ", ".join(
            f"{k} {100 * v:.1f}%" for k, v in sorted(r["time_split"].items(), key=lambda kv: -kv[1])))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(res, indent=1))
    return res
