"""A backfill killed with SIGKILL half-way, then run again, ends with the same store as an
uninterrupted one: Google Ads (stats, committed day by day) and Klaviyo (events, committed a
few pages at a time)."""

from __future__ import annotations

import datetime as dt
import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Case:
    platform: str
    table: str
    since: str
    until: str


GOOGLE_ADS = Case("google_ads", "daily_stats", SINCE, UNTIL)
KLAVIYO = Case("klaviyo", "journey_events", "2026-09-01", "2026-10-31")


def backfill(config: Path, case: Case) -> subprocess.Popen[str]:
    return subprocess.Popen([str(CONVSYNC), "backfill", "--config", str(config), "--since",
                             case.since, "--until", case.until, "--platform", case.platform,
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
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


@pytest.fixture(scope="module")
def running_small(tls_files: tuple[Path, Path]) -> Iterator[server.RunningSandbox]:
    """Two months of 15 campaigns: about 35,000 Klaviyo events, pulled in a few seconds."""
    spec = WorldSpec(seed=43, start=dt.date(2026, 9, 1), days=61, campaigns=15)
    with server.start(World(spec), tls_files[0].parent) as sandbox:
        yield sandbox


@pytest.mark.parametrize(("case", "sandbox", "kill_at"), [
    (GOOGLE_ADS, "running", 10_000), (KLAVIYO, "running_small", 10_000)])
def test_killed_backfill_resumes_to_the_same_store(case: Case, sandbox: str, kill_at: int,
                                                   request: pytest.FixtureRequest,
                                                   tmp_path: Path) -> None:
    running: server.RunningSandbox = request.getfixturevalue(sandbox)
    killed_config, whole_config = tmp_path / "killed.toml", tmp_path / "whole.toml"
    server.write_client_config(killed_config, running)
    server.write_client_config(whole_config, running)
    killed_db, whole_db = tmp_path / "killed.db", tmp_path / "whole.db"

    victim = backfill(killed_config, case)
    deadline = time.monotonic() + 120
    while rows(killed_db, case.table) < kill_at and victim.poll() is None:
        assert time.monotonic() < deadline, "the backfill stored nothing in two minutes"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    half = rows(killed_db, case.table)

    resumed = backfill(killed_config, case)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    whole = backfill(whole_config, case)
    whole_out, _ = whole.communicate(timeout=300)
    assert whole.returncode == 0

    total = rows(whole_db, case.table)
    assert 0 < half < total, f"the kill did not land half-way ({half} of {total} rows)"
    assert contents(killed_db) == contents(whole_db)
    # the resumed run did not start over: it pulled from where the killed one stopped
    resumed_rows = json.loads(out)["platforms"][case.platform]["rows"]
    assert resumed_rows < json.loads(whole_out)["platforms"][case.platform]["rows"]
    again = backfill(killed_config, case)
    again_out, _ = again.communicate(timeout=120)
    assert "already complete" in again_out
