"""`oneranker up` survives SIGKILL of its services: the supervisor restarts each one and the demo
still finishes correctly (every request's sample, replicas on a newer snapshot, freshness)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from streaming.broker import free_port
from oneranker.polling import wait_for


def services(home: Path) -> dict:
    try:
        return json.loads((home / "services.json").read_text())
    except (OSError, ValueError):
        return {}


def snapshots(home: Path) -> int:
    return len(list((home / "snapshots").glob("v*/manifest.json")))


@pytest.mark.slow
def test_killing_services_during_up_does_not_stop_the_demo(tmp_path):
    home = tmp_path / "up"
    log = (tmp_path / "up.log").open("w")
    up = subprocess.Popen([sys.executable, "-m", "oneranker.cli", "up", "--limit", "4000", "--speed", "5000",
                           "--home", str(home), "--port", str(free_port()), "--timeout", "420"],
                          stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "120"})
    try:
        # Kill each kind of service once the stack is doing real work: after the first snapshot.
        assert wait_for(lambda: snapshots(home) >= 1, 240, interval_s=0.5), (tmp_path / "up.log").read_text()[-3000:]
        killed = []
        for name in ("stream", "trainer", "serve-1"):
            before = services(home)[name]
            os.kill(before["pid"], signal.SIGKILL)
            killed.append(name)
            restarted = wait_for(lambda: services(home).get(name, {}).get("restarts", 0) > before["restarts"], 60,
                                 interval_s=0.5)
            assert restarted, f"{name} was not restarted"
        assert up.wait(timeout=480) == 0, (tmp_path / "up.log").read_text()[-4000:]
    finally:
        if up.poll() is None:
            up.kill()
        log.close()
    summary = json.loads((home / "up-summary.json").read_text())
    assert summary["ok"]
    assert all(summary["restarts"][n] >= 1 for n in killed)
    assert all(v != summary["first_version"] for v in summary["versions"].values())
    assert summary["freshness"]["served"] > 0
    out = (tmp_path / "up.log").read_text()
    assert "serve-1: top-10 ads" in out and "serve-2: top-10 ads" in out
    # every request's sample, across a SIGKILL of the stream worker (once lost 2 of 4,000 here:
    # rebalances raced the table recovery; fixed in streaming/app.py, see test_stream_crash.py)
    assert summary["requests"] == 4000 and summary["samples"] == 4000, summary


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.slow
def test_sigterm_stops_every_service_and_the_broker(tmp_path):
    home = tmp_path / "up"
    port = free_port()
    log_path = tmp_path / "up.log"
    log = log_path.open("w")
    up = subprocess.Popen([sys.executable, "-m", "oneranker.cli", "up", "--limit", "2000", "--speed", "5000",
                           "--home", str(home), "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        state = wait_for(lambda: len(services(home)) == 5 and services(home), 120, interval_s=0.5)
        assert state, "the stack did not start: " + log_path.read_text()[-3000:]
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 130, log_path.read_text()[-3000:]
    finally:
        if up.poll() is None:
            up.kill()
        log.close()
    pids = [s["pid"] for s in state.values()]
    assert wait_for(lambda: all(_gone(p) for p in pids), 15, interval_s=0.2), "orphaned services"
    from streaming.broker import port_in_use

    assert wait_for(lambda: not port_in_use("127.0.0.1", port), 15, interval_s=0.2), "orphaned broker"
