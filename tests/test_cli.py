"""The command line: help, exit codes and JSON output."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from convsync.cli import app

EXAMPLE = Path(__file__).parents[1] / "config" / "example.toml"
runner = CliRunner()


def test_help_lists_every_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("config", "sandbox"):
        assert command in result.output
    sub = runner.invoke(app, ["config", "--help"])
    assert "check" in sub.output


def test_config_check_example_exits_0() -> None:
    result = runner.invoke(app, ["config", "check", str(EXAMPLE), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["ok"] is True


def test_config_check_bad_time_zone_exits_2_and_names_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(EXAMPLE.read_text().replace('"America/New_York"', '"Mars/Olympus"'))
    result = runner.invoke(app, ["config", "check", str(bad), "--json"])
    assert result.exit_code == 2
    keys = [p["key"] for p in json.loads(result.stdout)["problems"] if p["severity"] == "error"]
    assert keys == ["client.timezone"]
    human = runner.invoke(app, ["config", "check", str(bad)])
    assert human.exit_code == 2 and "client.timezone" in human.output


def test_unknown_scale_is_bad_usage() -> None:
    result = runner.invoke(app, ["sandbox", "serve", "--scale", "huge"])
    assert result.exit_code == 2
