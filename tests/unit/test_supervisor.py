"""The embedded stack's supervisor restarts what dies and leaves no orphans."""

import json
import os
import signal
import sys

from deploy.supervisor import ServiceSpec, Supervisor
from oneranker.polling import wait_for

SLEEPER = [sys.executable, "-c", "import time\nwhile True: time.sleep(0.1)"]


def gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie still answers kill(0); it is gone once reaped or in state Z.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] == "Z"
    except FileNotFoundError:
        return True


def test_killed_service_is_restarted_and_all_stop(tmp_path):
    sup = Supervisor(tmp_path / "logs", state_file=tmp_path / "state.json")
    sup.start(ServiceSpec("a", SLEEPER))
    sup.start(ServiceSpec("once", [sys.executable, "-c", "print('done')"], restart=False))
    first = sup.services["a"].proc.pid
    os.kill(first, signal.SIGKILL)
    assert wait_for(lambda: sup.check() or sup.services["a"].proc.pid != first)
    second = sup.services["a"].proc.pid
    assert second != first and sup.alive("a")
    assert sup.services["a"].exit_codes == [-signal.SIGKILL]
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["a"]["pid"] == second and state["a"]["restarts"] == 1
    assert wait_for(lambda: not sup.alive("once"))
    sup.check()
    assert sup.services["once"].restarts == 0  # a one-shot is not restarted
    sup.stop_all(timeout_s=5)
    assert wait_for(lambda: gone(second))


def test_children_of_a_service_are_stopped_too(tmp_path):
    spawner = [sys.executable, "-c",
               "import subprocess, sys, time\n"
               "p = subprocess.Popen([sys.executable, '-c', 'import time\\nwhile True: time.sleep(0.1)'])\n"
               "print(p.pid, flush=True)\n"
               "while True: time.sleep(0.1)"]
    sup = Supervisor(tmp_path / "logs")
    sup.start(ServiceSpec("parent", spawner))
    log = tmp_path / "logs" / "parent.log"
    assert wait_for(lambda: log.exists() and log.read_text().strip())
    child = int(log.read_text().split()[0])
    sup.stop_all(timeout_s=5)
    assert wait_for(lambda: gone(child))
