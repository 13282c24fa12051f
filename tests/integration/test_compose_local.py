"""The compose services' own commands and environment, run as local processes (no Docker engine
here): hosts mapped to 127.0.0.1, the embedded broker for Kafka, SQLite where Redis is absent, a
local directory where the S3 store is absent. The stack must answer a ranking request."""

import shutil
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from deploy.supervisor import ServiceSpec, Supervisor
from streaming.broker import EmbeddedBroker, free_port
from oneranker.polling import wait_for

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("stream", "trainer", "exporter", "serve-1")


def local_env(compose_env: dict, bootstrap: str, home: Path) -> dict:
    env = {k: str(v) for k, v in compose_env.items()}
    env["ONERANKER_KAFKA"] = bootstrap  # kafka:9092 → the embedded broker
    env["ONERANKER_HOME"] = str(home)  # the /data volume
    env["ONERANKER_BIND"] = "127.0.0.1"
    env["ONERANKER_REPLAY_SPEED"] = "20000"  # as an ops user sets it in .env for a demo replay
    if shutil.which("redis-server") is None or env.get("ONERANKER_FEAST_ONLINE", "").startswith("redis://redis"):
        env.pop("ONERANKER_FEAST_ONLINE", None)  # no Redis here: the SQLite online store
    env["ONERANKER_SNAPSHOT_STORE"] = (home / "snapshots").as_uri()  # no MinIO here: a directory
    for k in ("FSSPEC_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(k, None)
    return env


def local_argv(command: list, home: Path, ports: dict, name: str) -> list:
    argv = [sys.executable, "-m", "oneranker.cli"]
    for word in command[1:]:
        word = str(word)
        argv.append(word.replace("/data", str(home)))
    if "--port" in argv:
        argv[argv.index("--port") + 1] = str(ports[name])
    if name == "stream" or name == "trainer":
        argv += ["--metrics-port", str(ports[name + "-metrics"])]
    return argv


@pytest.mark.slow
def test_compose_commands_as_local_processes_answer_a_ranking(tmp_path):
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    home = tmp_path / "data"
    home.mkdir()
    ports = {"serve-1": free_port(), "stream-metrics": free_port(), "trainer-metrics": free_port()}
    with EmbeddedBroker(port=free_port(), log_path=tmp_path / "broker.log") as broker:
        sup = Supervisor(tmp_path / "logs")
        try:
            init = services["init"]
            sup.start(ServiceSpec("init", local_argv(init["command"], home, ports, "init"),
                                  local_env(init["environment"], broker.bootstrap, home), restart=False))
            assert wait_for(lambda: not sup.alive("init"), 180, interval_s=0.5), "init did not finish"
            assert sup.services["init"].proc.returncode == 0, (tmp_path / "logs" / "init.log").read_text()[-3000:]
            for name in SERVICES:
                svc = services[name]
                sup.start(ServiceSpec(name, local_argv(svc["command"], home, ports, name),
                                      local_env(svc["environment"], broker.bootstrap, home)))
            produce = local_argv(services["replay"]["command"], home, ports, "replay") + ["--limit", "400"]
            sup.start(ServiceSpec("replay", produce, local_env(services["replay"]["environment"],
                                                               broker.bootstrap, home), restart=False))
            url = f"http://127.0.0.1:{ports['serve-1']}"

            def ready():
                sup.check()
                try:
                    r = httpx.get(f"{url}/readyz", timeout=2)
                    return r.status_code == 200 and r.json()
                except httpx.HTTPError:
                    return None

            status = wait_for(ready, 300, interval_s=1.0)
            logs = {p.name: p.read_text()[-1500:] for p in (tmp_path / "logs").glob("*.log")}
            assert status, f"no replica became ready: {logs}"
            r = httpx.post(f"{url}/v1/rank", json={"user_id": "u259", "k": 10}, timeout=10)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["model_version"] == status["model_version"]
            assert len(body["items"]) == 10
            assert all(s["restarts"] == 0 for s in [{"restarts": m.restarts} for m in sup.services.values()])
        finally:
            sup.stop_all()
