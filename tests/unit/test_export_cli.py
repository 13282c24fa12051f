"""The exporter/serving commands are registered and their --help is cheap (no heavy imports)."""

import subprocess
import sys

from typer.testing import CliRunner

from oneranker.cli import app


def test_commands_have_help():
    runner = CliRunner()
    for args in (["export"], ["snapshots"], ["snapshots", "list"], ["snapshots", "promote"],
                 ["snapshots", "rollback"], ["serve"], ["bench", "serve"]):
        res = runner.invoke(app, [*args, "--help"])
        assert res.exit_code == 0, (args, res.output)
    assert "--bootstrap-servers" in runner.invoke(app, ["export", "--help"]).output
    assert "--replica-id" in runner.invoke(app, ["serve", "--help"]).output


def test_help_does_not_import_torch_or_onnxruntime():
    code = ("import sys; from typer.testing import CliRunner; from oneranker.cli import app; "
            "CliRunner().invoke(app, ['serve', '--help']); CliRunner().invoke(app, ['export', '--help']); "
            "print(sorted(m for m in ('torch', 'onnxruntime', 'feast', 'fastapi') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


def test_rollback_of_a_missing_version_fails_cleanly(tmp_path):
    res = CliRunner().invoke(app, ["snapshots", "rollback", "3", "--store", str(tmp_path / "s"), "--no-announce"])
    assert res.exit_code == 1 and "not found" in res.output
