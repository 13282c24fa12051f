"""Every `oneranker` command answers --help."""

from typer.main import get_command
from typer.testing import CliRunner

from oneranker.cli import app


def all_command_paths(cmd=None, prefix=()):
    cmd = cmd or get_command(app)
    yield prefix
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from all_command_paths(sub, prefix + (name,))


def test_every_command_has_help():
    runner = CliRunner()
    paths = list(all_command_paths())
    assert ("broker",) in paths and ("produce",) in paths
    for path in paths:
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Usage" in result.output
