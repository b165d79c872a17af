"""A backfill killed with SIGKILL half-way, then run again, ends with the same store as an
uninterrupted one."""

from __future__ import annotations

import datetime as dt
import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from convsync.sandbox import server
from convsync.sandbox.world import World, WorldSpec

CONVSYNC = Path(sys.executable).with_name("convsync")
SINCE, UNTIL = "2025-11-01", "2026-10-31"
DATA_TABLES = {
    "daily_stats": "platform, account_id, date, campaign_id, platform_conversion, basis, "
                   "attribution_window, timezone, campaign_name, conversion, kind, count, "
                   "value, currency, in_column",
    "journey_events": "source_platform, source_event_id, person_key, conversion, "
                      "platform_conversion, time, value, currency, campaign_id",
    "platform_conversions": "platform, account_id, platform_id, name, conversion, kind",
}


def backfill(config: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([str(CONVSYNC), "backfill", "--config", str(config), "--since",
                             SINCE, "--until", UNTIL, "--platform", "google_ads", "--json",
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def rows(db: Path, table: str) -> int:
    try:
        with sqlite3.connect(db) as conn:
            return int(conn.execute(f"select count(*) from {table}").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


def contents(db: Path) -> dict[str, list[tuple[object, ...]]]:
    with sqlite3.connect(db) as conn:
        return {t: sorted(conn.execute(f"select {cols} from {t}").fetchall(), key=repr)
                for t, cols in DATA_TABLES.items()}


@pytest.fixture(scope="module")
def running(tls_files: tuple[Path, Path]) -> Iterator[server.RunningSandbox]:
    spec = WorldSpec(seed=41, start=dt.date(2025, 11, 1), days=365, campaigns=60)
    with server.start(World(spec), tls_files[0].parent) as sandbox:
        yield sandbox


def test_killed_backfill_resumes_to_the_same_store(running: server.RunningSandbox,
                                                   tmp_path: Path) -> None:
    killed_config, whole_config = tmp_path / "killed.toml", tmp_path / "whole.toml"
    server.write_client_config(killed_config, running)
    server.write_client_config(whole_config, running)
    killed_db, whole_db = tmp_path / "killed.db", tmp_path / "whole.db"

    victim = backfill(killed_config)
    deadline = time.monotonic() + 120
    while rows(killed_db, "daily_stats") < 10_000 and victim.poll() is None:
        assert time.monotonic() < deadline, "the backfill stored nothing in two minutes"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    half = rows(killed_db, "daily_stats")

    resumed = backfill(killed_config)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    whole = backfill(whole_config)
    whole_out, _ = whole.communicate(timeout=300)
    assert whole.returncode == 0

    total = rows(whole_db, "daily_stats")
    assert 0 < half < total, f"the kill did not land half-way ({half} of {total} rows)"
    assert contents(killed_db) == contents(whole_db)
    # the resumed run did not start over: it pulled from where the killed one stopped
    resumed_rows = json.loads(out)["platforms"]["google_ads"]["rows"]
    assert resumed_rows < json.loads(whole_out)["platforms"]["google_ads"]["rows"]
    again = backfill(killed_config)
    again_out, _ = again.communicate(timeout=120)
    assert "already complete" in again_out
