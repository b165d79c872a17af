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


def test_a_wrong_type_a_binary_file_and_a_directory_exit_2_with_a_message(
        tmp_path: Path) -> None:
    """Never a traceback: each names the file or key and what is expected (issue 13, 7)."""
    wrong = tmp_path / "wrong.toml"
    wrong.write_text(EXAMPLE.read_text().replace('customer_ids = ["123-456-7890"]',
                                                 "customer_ids = 1234567890"))
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00\xd0\x9f\xff\xfe")
    expected = {wrong: ("google_ads.customer_ids", "not a number"),
                binary: (str(binary), "not a text file"),
                tmp_path: (str(tmp_path), "a directory, not a config file")}
    for path, (key, words) in expected.items():
        result = runner.invoke(app, ["config", "check", str(path), "--json"])
        assert result.exit_code == 2, result.output
        (problem,) = json.loads(result.stdout)["problems"]
        assert problem["key"] == key and words in problem["message"]
        command = runner.invoke(app, ["pull", "--config", str(path)])
        assert command.exit_code == 2 and "Traceback" not in command.output
        assert isinstance(command.exception, SystemExit)  # a message, not a crash


def test_import_refuses_an_unknown_time_zone_before_it_starts(tmp_path: Path) -> None:
    config = tmp_path / "client.toml"
    config.write_text(EXAMPLE.read_text().replace(
        'store_url = "sqlite:///../var/acme-outdoor.db"', 'store_url = "sqlite:///client.db"'))
    result = runner.invoke(app, ["import", "--config", str(config),
                                 str(EXAMPLE.parent / "crm-example.csv"),
                                 "--timezone", "Mars/Olympus"])
    assert result.exit_code == 2 and "unknown time zone 'Mars/Olympus'" in result.output
    assert not (tmp_path / "client.db").exists()  # no run was started


def test_a_store_that_cannot_be_opened_is_one_line_and_exit_1(tmp_path: Path) -> None:
    """A corrupt file, a directory in its place, an unreachable PostgreSQL: one line naming
    the store and what to do, never a traceback nor a platform's failure (issue 13, 11)."""
    (tmp_path / "corrupt.db").write_text("not a database at all\n")
    (tmp_path / "folder.db").mkdir()
    cases = {"sqlite:///corrupt.db": "is not a SQLite database",
             "sqlite:///folder.db": "is a directory",
             "postgresql+psycopg://nobody:hunter2@127.0.0.1:1/x": "does not answer"}
    for url, words in cases.items():
        config = tmp_path / "client.toml"
        config.write_text(EXAMPLE.read_text().replace(
            'store_url = "sqlite:///../var/acme-outdoor.db"', f'store_url = "{url}"'))
        for command in (["values"], ["uploads"], ["audit"]):
            result = runner.invoke(app, [*command, "--config", str(config)])
            said = " ".join(result.output.split())
            assert result.exit_code == 1, (url, command, result.output)
            assert said.startswith("error: the store ") and words in said, said
            assert "Traceback" not in result.output and "hunter2" not in result.output


def test_unknown_scale_is_bad_usage() -> None:
    result = runner.invoke(app, ["sandbox", "serve", "--scale", "huge"])
    assert result.exit_code == 2


def test_import_loads_good_rows_and_names_bad_lines(tmp_path: Path) -> None:
    config = tmp_path / "client.toml"
    config.write_text(EXAMPLE.read_text().replace(
        'store_url = "sqlite:///../var/acme-outdoor.db"', 'store_url = "sqlite:///client.db"'))
    crm_file = EXAMPLE.parent / "crm-example.csv"
    result = runner.invoke(app, ["import", "--config", str(config), str(crm_file), "--json"])
    assert result.exit_code == 3, result.output  # partly done: two rows were bad
    (report,) = json.loads(result.stdout)["files"]
    assert (report["rows"], report["loaded"], report["bad_rows"]) == (8, 6, 2)
    assert [e.split(":")[0] for e in report["errors"]] == ["line 6", "line 7"]
    assert report["unmapped"] == ["deal_won", "demo_booked"]
    again = runner.invoke(app, ["import", "--config", str(config), str(crm_file), "--json"])
    assert json.loads(again.stdout)["files"][0]["loaded"] == 6
    from convsync.store import Store
    with Store.open(f"sqlite:///{tmp_path / 'client.db'}") as store:
        assert store.count_rows("journey_events") == 6  # re-import added nothing


def test_import_of_a_missing_file_is_bad_input(tmp_path: Path) -> None:
    config = tmp_path / "client.toml"
    config.write_text(EXAMPLE.read_text().replace(
        'store_url = "sqlite:///../var/acme-outdoor.db"', 'store_url = "sqlite:///client.db"'))
    result = runner.invoke(app, ["import", "--config", str(config), str(tmp_path / "no.csv")])
    assert result.exit_code == 2
