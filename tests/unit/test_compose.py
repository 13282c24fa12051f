"""The docker-compose stack, checked offline (no Docker engine here): spec, wiring, commands."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from oneranker.cli import app

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load(COMPOSE.read_text())


def test_validates_against_the_compose_spec():
    exe = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent)) or "check-jsonschema"
    result = subprocess.run([exe, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_depends_on_target_exists(compose):
    services = compose["services"]
    for name, svc in services.items():
        for target in svc.get("depends_on", {}) or {}:
            assert target in services, f"{name} depends on missing service {target}"


def test_only_serving_ports_are_published_and_on_localhost(compose):
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert name.startswith("serve"), f"{name} publishes {port}"
            assert str(port).startswith("127.0.0.1:"), port


def test_required_services_are_there(compose):
    services = compose["services"]
    for name in ("kafka", "redis", "minio", "init", "stream", "trainer", "exporter", "serve-1", "serve-2"):
        assert name in services
    assert "gpu" in services["trainer-gpu"]["profiles"]
    assert services["kafka"]["volumes"]


def test_every_service_command_is_a_real_oneranker_command(compose):
    runner = CliRunner()
    commands = [svc["command"] for svc in compose["services"].values()
                if isinstance(svc.get("command"), list) and svc["command"][0] == "oneranker"]
    assert len(commands) >= 7
    for command in commands:
        words = [w for w in command[1:] if not w.startswith("-")]
        # The sub-command path is the leading words; --help on it must work.
        path = command[1:2] if command[1] not in ("features", "snapshots", "bench") else command[1:3]
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (command, result.output)
        for flag in (w for w in command if w.startswith("--")):
            assert flag in result.output, f"{command}: {flag} is not an option of {' '.join(path)}"
        assert words
