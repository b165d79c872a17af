"""`convsync sync`, the main job, against the sandbox: every stage per client, one run record
each, locked clients skipped, one client's failure never the others'."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import named_client
from convsync import sync
from convsync.cli import app
from convsync.locks import client_lock
from convsync.sandbox import server
from convsync.sandbox.world import World, WorldSpec
from convsync.settings import load_config
from convsync.store import Store

CONVSYNC = str(Path(sys.executable).with_name("convsync"))


@pytest.fixture(scope="module")
def running(tls_files: tuple[Path, Path]) -> Iterator[server.RunningSandbox]:
    today = dt.date.today()
    spec = WorldSpec(seed=5, start=today - dt.timedelta(days=40), days=40, campaigns=3)
    with server.start(World(spec), tls_files[0].parent) as sandbox:
        yield sandbox


def clients(running: server.RunningSandbox, folder: Path, names: list[str]) -> Path:
    """A folder of client configs on the sandbox, each with its own store."""
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / "base" / "client.toml"
    server.write_client_config(base, running)
    for name in names:
        named_client(base, folder / f"{name}.toml", name, f"{name}.db",
                     "base/client.secrets.env")
    return folder


def test_a_sync_runs_every_stage_and_keeps_one_run_record(
        running: server.RunningSandbox, tmp_path: Path) -> None:
    folder = clients(running, tmp_path / "one", ["acme"])
    result = CliRunner().invoke(app, ["sync", "--config", str(folder / "acme.toml"), "--out",
                                      str(tmp_path / "reports"), "--jobs", "1", "--json"])
    assert result.exit_code == 0, result.output
    (client,) = json.loads(result.stdout)["clients"]
    assert client["status"] == "ok" and client["client"] == "acme"
    assert [s["stage"] for s in client["stages"]] == list(sync.STAGES)
    assert {s["status"] for s in client["stages"]} <= {"ok", "skipped"}
    pulled = client["stages"][0]["counts"]
    assert pulled["google_ads"]["rows"] > 0 and pulled["klaviyo"]["rows"] > 0
    assert Path(client["report"]).is_file()
    config = load_config(folder / "acme.toml")
    with Store.open(config.store_url()) as store:
        runs = {r.command: r for r in store.recent_runs("acme")}
    assert runs["sync"].status == "ok" and runs["sync"].id == client["run_id"]
    assert [s["stage"] for s in runs["sync"].summary["stages"]] == list(sync.STAGES)
    shown = CliRunner(env={"COLUMNS": "80"}).invoke(
        app, ["runs", "--config", str(folder / "acme.toml")])
    assert shown.exit_code == 0 and "sync" in shown.output and "ok" in shown.output


def test_one_clients_failure_never_stops_the_others_and_a_locked_one_is_skipped(
        running: server.RunningSandbox, tmp_path: Path) -> None:
    folder = clients(running, tmp_path / "many", ["a", "b", "c"])
    (folder / "broken.toml").write_text("[client]\nname = \n")
    config = load_config(folder / "b.toml")
    with Store.open(config.store_url()) as store, client_lock(store, "b", "sync"):
        result = CliRunner().invoke(app, ["sync", "--config-dir", str(folder), "--stage",
                                          "pull", "--stage", "values", "--jobs", "2",
                                          "--json"])
    assert result.exit_code == 3, result.output  # some succeeded, one failed
    by_config = {Path(c["config"]).stem: c for c in json.loads(result.stdout)["clients"]}
    assert by_config["broken"]["status"] == "failed" and "not valid TOML" in by_config[
        "broken"]["message"]
    assert by_config["b"]["status"] == "skipped"
    assert "another sync of client 'b' is running" in by_config["b"]["message"]
    with Store.open(config.store_url()) as store:  # the skip is on the record too
        assert [r.status for r in store.recent_runs("b")] == ["skipped"]
    for name in ("a", "c"):
        assert by_config[name]["status"] == "ok"
        assert [s["stage"] for s in by_config[name]["stages"]] == ["pull", "values"]


def test_a_platform_down_makes_the_client_partial_with_the_reason(
        running: server.RunningSandbox, tmp_path: Path) -> None:
    folder = clients(running, tmp_path / "down", ["down"])
    running.sandbox.inject("klaviyo", "server_error", count=50)
    try:
        result = CliRunner().invoke(app, ["sync", "--config", str(folder / "down.toml"),
                                          "--stage", "pull", "--json"])
    finally:
        running.sandbox.clear_faults()
    assert result.exit_code == 3, result.output
    (client,) = json.loads(result.stdout)["clients"]
    (pull,) = client["stages"]
    assert client["status"] == pull["status"] == "partial"
    assert pull["counts"]["google_ads"]["rows"] > 0  # the others were stored
    assert any(e.startswith("klaviyo:") and "503" in e for e in pull["errors"])


def test_json_logs_are_one_object_a_line_with_no_secret(
        running: server.RunningSandbox, tmp_path: Path) -> None:
    folder = clients(running, tmp_path / "logs", ["logged"])
    done = subprocess.run([CONVSYNC, "sync", "--config", str(folder / "logged.toml"),
                           "--stage", "pull", "--stage", "audit", "--json-logs"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]
    stages = [line for line in lines if line.get("stage")]
    assert [s["stage"] for s in stages] == ["pull", "audit"]
    assert all(s["client"] == "logged" and s["status"] == "ok" and "seconds" in s
               and s["run_id"] for s in stages)
    for secret in server.SANDBOX_SECRETS.values():
        assert secret not in done.stderr
