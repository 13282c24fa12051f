"""Helpers for integration tests and the benchmark: run a worker process, publish events to
suffixed topics, read topics back. Every wait polls with a deadline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

from kafka import KafkaConsumer, TopicPartition

from oneranker import config
from oneranker.kafka import make_producer
from oneranker.polling import wait_for
from streaming import events as contract


def wait_until(predicate: Callable[[], object], timeout_s: float, interval_s: float = 0.2,
               what: str = "condition"):
    """``wait_for`` that raises TimeoutError at the deadline instead of returning None."""
    value = wait_for(predicate, timeout_s, interval_s)
    if not value:
        raise TimeoutError(f"{what} not reached within {timeout_s:.0f}s")
    return value


class WorkerProcess:
    """``oneranker stream`` as a child process (so tests can SIGKILL it)."""

    def __init__(self, bootstrap: str, app_id: str, suffix: str, home: Path, args: Iterable[str] = (),
                 log_path: Path | None = None, worker_id: str = "w"):
        self.bootstrap, self.app_id, self.suffix, self.home = bootstrap, app_id, suffix, Path(home)
        self.args = list(args)
        self.worker_id = worker_id
        self.log_path = log_path or self.home / f"{app_id}-{worker_id}.log"
        self.proc: subprocess.Popen | None = None
        self.data_dir = self.home / "stream" / f"{app_id}-{worker_id}"

    def start(self) -> "WorkerProcess":
        env = {**os.environ, "ONERANKER_HOME": str(self.home), "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "oneranker.cli", "stream", "--bootstrap-servers", self.bootstrap,
               "--app-id", self.app_id, "--topic-suffix", self.suffix, "--worker-id", self.worker_id,
               *self.args]
        self.home.mkdir(parents=True, exist_ok=True)
        out = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        return self

    def stats(self) -> dict | None:
        """The running process's stats.json (None until it has written one)."""
        try:
            doc = json.loads((self.data_dir / "stats.json").read_text())
        except (OSError, ValueError):
            return None
        return doc if self.proc is not None and doc.get("pid") == self.proc.pid else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def children(self) -> list[int]:
        """Pids of the worker's child processes (its Feast pusher)."""
        if not self.alive():
            return []
        return [pid for pid in _pids() if _ppid(pid) == self.proc.pid]

    def kill(self) -> None:
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout_s: float = 20.0) -> None:
        if not self.alive():
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def publish(bootstrap: str, events: list[tuple[str, dict]], suffix: str = "", pace: bool = False,
            producer=None, progress: list | None = None) -> int:
    """Send (event_type, data) pairs to the suffixed event topics, key = user_id.
    ``progress[0]`` (when given) counts the events handed to the producer so far."""
    own = producer is None
    producer = producer or make_producer(bootstrap)
    start = time.monotonic()
    ts0 = events[0][1]["ts"] if events else 0
    for event_type, data in events:
        if pace:
            ahead = (data["ts"] - ts0) / 1000.0 - (time.monotonic() - start)
            if ahead > 0.002:
                time.sleep(ahead)  # replay pacing (event time → wall time), not synchronisation
        producer.send(config.EVENT_TOPICS[event_type] + suffix, key=str(data["user_id"]).encode(),
                      value=contract.encode(data))
        if progress is not None:
            progress[0] += 1
    producer.flush()
    if own:
        producer.close()
    return len(events)


class TopicReader:
    """Reads a topic from the beginning without a consumer group, accumulating records."""

    def __init__(self, bootstrap: str, topic: str):
        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                                      enable_auto_commit=False, auto_offset_reset="earliest",
                                      client_id="oneranker-test-reader")
        parts = wait_until(lambda: self.consumer.partitions_for_topic(topic), 30, what=f"topic {topic}")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        self.consumer.assign(tps)
        self.consumer.seek_to_beginning(*tps)
        self.records: list = []

    def poll(self) -> list:
        batch = self.consumer.poll(timeout_ms=200, max_records=10000)
        for recs in batch.values():
            self.records.extend(recs)
        return self.records

    def until(self, predicate: Callable[[list], bool], timeout_s: float, what: str = "records") -> list:
        return wait_until(lambda: predicate(self.poll()) and self.records, timeout_s, 0.0, what)

    def close(self) -> None:
        self.consumer.close()


def _pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def running(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
