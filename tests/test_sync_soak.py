"""A soak of the main job: 20 sandbox clients, two overlapping `sync --config-dir` runs under
injected faults with one platform down for the whole time, one of them killed at a random
moment and a third run after it. In the end every eligible upload arrived exactly once, every
client's runs are on the record, and nothing stored is lost."""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from conftest import named_client
from convsync import pipeline
from convsync.model import Platform
from convsync.sandbox import server
from convsync.sandbox.world import World, WorldSpec
from convsync.settings import load_config, load_secrets
from convsync.store import Store, uploads

CONVSYNC = str(Path(sys.executable).with_name("convsync"))
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
TODAY = NOW.date()
CLIENTS = 20
STAGES = ["--stage", "pull", "--stage", "values", "--stage", "push"]


@pytest.fixture(scope="module")
def running(tls_files: tuple[Path, Path]) -> Iterator[server.RunningSandbox]:
    spec = WorldSpec(seed=29, start=TODAY - dt.timedelta(days=99), days=100, campaigns=2,
                     as_of=NOW, micro_upload_action=True)
    with server.start(World(spec), tls_files[0].parent) as sandbox:
        yield sandbox


def seeded_clients(running: server.RunningSandbox, folder: Path) -> Path:
    """``CLIENTS`` client configs, each with a store holding the same 100 days of history and
    its values (a backfill made once, copied under each client's name)."""
    base = folder / "base" / "client.toml"
    server.write_client_config(base, running)
    config = load_config(base)
    with Store.open(config.store_url()) as store:
        pulled = pipeline.pull(config, load_secrets(config), store,
                               platforms=[Platform.GOOGLE_ADS, Platform.KLAVIYO],
                               since=TODAY - dt.timedelta(days=99), until=TODAY, today=TODAY)
        assert pulled.failed == []
    seeded = Path(config.store_url().removeprefix("sqlite:///"))
    clients = folder / "clients"
    clients.mkdir()
    for n in range(CLIENTS):
        name = f"client-{n:02d}"
        store = clients / f"{name}.db"
        shutil.copy(seeded, store)
        with sqlite3.connect(store) as db:  # the history is this client's now
            for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'"):
                columns = [c[1] for c in db.execute(f"PRAGMA table_info({table})")]
                if "client" in columns:
                    db.execute(f"UPDATE {table} SET client = ?", (name,))
        named_client(base, clients / f"{name}.toml", name, f"{name}.db",
                     "../base/client.secrets.env")
    return clients


def sync(clients: Path, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([CONVSYNC, "sync", "--config-dir", str(clients), *STAGES,
                             "--jobs", "2", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=cwd,
                            start_new_session=True)  # its own group: killed with its workers


def test_overlapping_syncs_under_faults_and_a_kill_send_each_upload_once(
        running: server.RunningSandbox, tmp_path: Path) -> None:
    clients = seeded_clients(running, tmp_path)
    assert running.datamanager is not None and running.meta_capi is not None
    assert running.klaviyo_events is not None
    running.datamanager.configure(processing_delay_minutes=0)
    # one API key for 20 clients: Klaviyo's 150 bulk requests a minute would make the soak
    # a wait (pacing is tested on its own)
    running.klaviyo_events.configure(bulk_create_events_burst=1_000,
                                     bulk_create_events_steady=100_000)
    for platform in ("google_ads", "datamanager", "meta", "klaviyo"):
        for kind in ("server_error", "rate_limit"):  # about one request in ten
            running.sandbox.inject(platform, kind, count=4)  # type: ignore[arg-type]
    running.sandbox.inject("ga4", "server_error", count=100_000)  # down the whole time
    try:
        first, second = sync(clients, tmp_path), sync(clients, tmp_path)
        time.sleep(random.Random(3).uniform(5.0, 20.0))
        os.killpg(first.pid, signal.SIGKILL)  # the first, and its worker processes
        first.wait(timeout=30)
        second.communicate(timeout=900)
        third = subprocess.run([CONVSYNC, "sync", "--config-dir", str(clients), *STAGES,
                                "--jobs", "2", "--json"], capture_output=True, text=True,
                               cwd=tmp_path, timeout=900)
    finally:
        running.sandbox.clear_faults()
    assert second.returncode == 3 and third.returncode == 3  # GA4 down: partial, never failed
    finished = {c["client"]: c for c in json.loads(third.stdout)["clients"]}
    assert set(finished) == {f"client-{n:02d}" for n in range(CLIENTS)}
    for client in finished.values():
        assert client["status"] == "partial", client
        pull, _, push = client["stages"]
        assert any(e.startswith("ga4:") for e in pull["errors"]) and push["status"] == "ok"

    sent: dict[str, set[str]] = {"google_ads": set(), "meta": set(), "klaviyo": set()}
    runs: Counter[str] = Counter()
    for n in range(CLIENTS):
        name = f"client-{n:02d}"
        with Store.open(f"sqlite:///{clients / f'{name}.db'}") as store:
            with store.engine.connect() as conn:
                left = conn.execute(sa.select(sa.func.count()).where(
                    uploads.c.status.in_(["planned", "sending"]))).scalar()
                assert left == 0, name  # nothing left behind
                for destination, key in conn.execute(sa.select(
                        uploads.c.destination, uploads.c.dedupe_key).where(
                        uploads.c.status.in_(["sent", "accepted"]))):
                    sent[destination].add(key)
            records = [r for r in store.recent_runs(name, limit=50) if r.command == "sync"]
        assert {r.status for r in records} <= {"partial", "skipped", "abandoned"}
        assert len(records) >= 2  # the second's and the third's, at least
        runs.update(r.status for r in records)
    assert runs["abandoned"] >= 1  # the killed run's, marked by a later one
    assert all(sent.values())  # every destination got uploads

    google = {key: c for (_, key), c in running.datamanager.transactions().items()}
    assert set(google) == sent["google_ads"] and all(c.conversions <= 1
                                                     for c in google.values())
    assert running.meta_capi.counted_twice() == 0
    meta = {event_id for (_, event_id), c in running.meta_capi.counts().items() if c.counted}
    assert meta == sent["meta"]
    # (the sandbox's own "counted twice" for Klaviyo would flag the 20 clients' copies of one
    # history on one account's profiles: each unique id recorded once is the proof here)
    recorded = [e.unique_id for e in running.klaviyo_events.events()]
    assert len(recorded) == len(set(recorded)) and set(recorded) == sent["klaviyo"]
