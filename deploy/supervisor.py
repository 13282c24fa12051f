"""A small process supervisor for the embedded stack: start services, restart the ones that die,
stop them all (no orphans), and record their pids for ops tooling and chaos tests."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from oneranker.process import die_with_parent

log = logging.getLogger(__name__)

@dataclass
class ServiceSpec:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    restart: bool = True
    max_restarts: int = 10


@dataclass
class Managed:
    spec: ServiceSpec
    proc: subprocess.Popen
    started: float
    restarts: int = 0
    exit_codes: list[int] = field(default_factory=list)


class Supervisor:
    """Runs each service in its own process group with its output in ``log_dir/<name>.log``."""

    def __init__(self, log_dir: Path, state_file: Path | None = None):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.state_file = state_file
        self.services: dict[str, Managed] = {}

    def _spawn(self, spec: ServiceSpec) -> subprocess.Popen:
        out = open(self.log_dir / f"{spec.name}.log", "ab")
        try:
            return subprocess.Popen(spec.argv, stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, **spec.env}, start_new_session=True,
                                    preexec_fn=die_with_parent)
        finally:
            out.close()

    def start(self, spec: ServiceSpec) -> Managed:
        managed = Managed(spec, self._spawn(spec), time.monotonic())
        self.services[spec.name] = managed
        log.info("started %s (pid %d)", spec.name, managed.proc.pid)
        self._write_state()
        return managed

    def check(self) -> list[str]:
        """Restart services that exited unexpectedly; returns a line per restart."""
        events = []
        for name, m in self.services.items():
            code = m.proc.poll()
            if code is None:
                continue
            if not m.spec.restart or m.restarts >= m.spec.max_restarts:
                continue
            m.exit_codes.append(code)
            m.restarts += 1
            m.proc = self._spawn(m.spec)
            m.started = time.monotonic()
            events.append(f"{name} exited with {code}; restarted (restart {m.restarts}, pid {m.proc.pid})")
            log.warning(events[-1])
        if events:
            self._write_state()
        return events

    def alive(self, name: str) -> bool:
        return self.services[name].proc.poll() is None

    def stop(self, name: str, timeout_s: float = 10.0) -> None:
        m = self.services[name]
        m.spec.restart = False
        _terminate_group(m.proc, timeout_s)

    def stop_all(self, timeout_s: float = 10.0) -> None:
        for m in self.services.values():
            m.spec.restart = False
            if m.proc.poll() is None:
                try:
                    os.killpg(m.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout_s
        for m in self.services.values():
            _terminate_group(m.proc, max(0.1, deadline - time.monotonic()))
        self._write_state()

    def _write_state(self) -> None:
        if self.state_file is None:
            return
        state = {name: {"pid": m.proc.pid, "alive": m.proc.poll() is None, "restarts": m.restarts,
                        "argv": m.spec.argv} for name, m in self.services.items()}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, self.state_file)


def _terminate_group(proc: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM the process group, then SIGKILL it if it has not gone within ``timeout_s``."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group, children included
    except ProcessLookupError:
        pass
    proc.wait()
