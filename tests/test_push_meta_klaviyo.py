"""`convsync push` to Meta (Conversions API) and Klaviyo against the sandbox: exactly the
eligible events, once each, whatever fails or is killed on the way."""

from __future__ import annotations

import datetime as dt
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from convsync import pipeline, push
from convsync.cli import app
from convsync.model import Identifiers, JourneyEvent, Platform, Upload
from convsync.planning import dedupe_key
from convsync.sandbox import server
from convsync.sandbox.world import World, WorldSpec
from convsync.settings import ClientConfig, load_config, load_secrets
from convsync.sinks.meta import MetaSink
from convsync.sources import meta as meta_source
from convsync.store import Store, uploads
from convsync.valuation import ALL_SEGMENTS, segment_of

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
TODAY = NOW.date()
LADDER = ("product_view", "add_to_cart", "begin_checkout")
CONVSYNC = Path(sys.executable).with_name("convsync")
META_AGE = dt.timedelta(days=7) - dt.timedelta(hours=1)


@pytest.fixture(scope="module")
def running(tls_files: tuple[Path, Path]) -> Iterator[server.RunningSandbox]:
    spec = WorldSpec(seed=17, start=TODAY - dt.timedelta(days=99), days=100, campaigns=4,
                     as_of=NOW)
    with server.start(World(spec), tls_files[0].parent) as sandbox:
        yield sandbox


@pytest.fixture(scope="module")
def valued(running: server.RunningSandbox,
           tmp_path_factory: pytest.TempPathFactory) -> ClientConfig:
    """A client whose store holds 100 days of Klaviyo journeys and the values computed from
    them (the sandbox config names Meta's upload events and Klaviyo's upload metrics)."""
    path = tmp_path_factory.mktemp("push-mk") / "client.toml"
    server.write_client_config(path, running)
    config = load_config(path)
    with Store.open(config.store_url()) as store:
        result = pipeline.pull(config, load_secrets(config), store,
                               platforms=[Platform.KLAVIYO], since=TODAY - dt.timedelta(days=99),
                               until=TODAY, today=TODAY)
        assert result.failed == []
        pipeline.values(config, store, NOW)
    return config


def copy_client(config: ClientConfig, folder: Path) -> Path:
    """The client's config and store copied into ``folder``, with an empty ledger."""
    assert config.path is not None
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(config.store_url().removeprefix("sqlite:///")), folder / "client.db")
    shutil.copy(config.path.with_name(config.path.stem + ".secrets.env"),
                folder / "client.secrets.env")
    text = re.sub(r'store_url = ".*"', 'store_url = "sqlite:///client.db"',
                  config.path.read_text())
    path = folder / "client.toml"
    path.write_text(text.replace(config.path.stem + ".secrets.env", "client.secrets.env"))
    return path


def eligible(config: ClientConfig, store: Store, destination: Platform,
             oldest: dt.timedelta | None) -> dict[str, float]:
    """What a push must send, worked out apart from the planner: each person's first event
    of each ladder step, at the upload value stored for its segment (else over all
    segments), when the destination can match the person and the event is not too old; by
    dedupe key."""
    values = {(r["conversion"], r["segment"]): r["upload_value"]
              for r in store.micro_values(config.client.name) if r["upload_value"] is not None}
    names = (config.meta.upload_events if destination is Platform.META
             else config.klaviyo.upload_metrics)  # type: ignore[union-attr]
    people: dict[str, list[JourneyEvent]] = {}
    for event in store.journey_events(until=NOW):
        people.setdefault(event.person_key, []).append(event)
    wanted: dict[str, float] = {}
    for events in people.values():
        known = merged([e.identifiers for e in events])
        if not matchable(known, destination):
            continue
        for step in LADDER:
            steps = sorted((e for e in events if e.conversion == step), key=lambda e: e.time)
            if not steps or (oldest and NOW - steps[0].time > oldest):
                continue
            segment = segment_of(steps[0], config.valuation.segment_by)
            value = values.get((step, segment), values.get((step, ALL_SEGMENTS)))
            if value is None:
                continue
            key = dedupe_key(config.client.name, destination, names[step], steps[0],
                             per_person=True)
            wanted[key] = round(float(value), 2)
    return wanted


def merged(all_ids: list[Identifiers]) -> Identifiers:
    fields: dict[str, str] = {}
    for ids in all_ids:
        for name, value in ids:
            if value is not None:
                fields.setdefault(name, value)
    return Identifiers(**fields)


def matchable(ids: Identifiers, destination: Platform) -> bool:
    if destination is Platform.KLAVIYO:
        return ids.klaviyo_profile_id is not None
    return bool(ids.email_sha256_meta or ids.phone_sha256_meta or ids.external_id or ids.fbc
                or ids.fbp)


def ledger(store: Store, destination: Platform) -> dict[str, tuple[str, float | None]]:
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(uploads.c.dedupe_key, uploads.c.status,
                                      uploads.c.sent_value).where(
            uploads.c.destination == destination.value)).all()
    return {key: (status, value) for key, status, value in rows}


def meta_counted(running: server.RunningSandbox) -> dict[str, tuple[int, float, dict[str, object]]]:
    assert running.meta_capi is not None
    return {event_id: (c.counted, round(c.value, 2), c.user_data)
            for (_, event_id), c in running.meta_capi.counts().items()}


def klaviyo_counted(running: server.RunningSandbox) -> dict[str, tuple[int, float, bool]]:
    assert running.klaviyo_events is not None
    received = running.klaviyo_events.received()
    return {e.unique_id or "": (received[(e.profile_id, e.metric, e.key)], round(e.value or 0, 2),
                                e.backfill)
            for e in running.klaviyo_events.events()}


def test_meta_gets_each_recent_eligible_event_once_at_its_value_with_metas_hashes(
        valued: ClientConfig, running: server.RunningSandbox, tmp_path: Path) -> None:
    assert running.meta_capi is not None
    running.meta_capi.reset()
    config = load_config(copy_client(valued, tmp_path / "meta"))
    with Store.open(config.store_url()) as store:
        wanted = eligible(config, store, Platform.META, META_AGE)
        first = push.push_meta(config, load_secrets(config), store, now=NOW)
        again = push.push_meta(config, load_secrets(config), store, now=NOW)
        rows = ledger(store, Platform.META)
        people = {dedupe_key(config.client.name, Platform.META,
                             config.meta.upload_events[e.conversion], e,  # type: ignore[union-attr]
                             per_person=True): e.identifiers
                  for e in store.journey_events(until=NOW) if e.conversion in LADDER}
    counted = meta_counted(running)
    assert first.errors == [] and len(wanted) > 100
    assert first.sent == len(wanted) and set(counted) == set(wanted)
    assert first.requests["ConversionsAPI"] == -(-len(wanted) // 1000)  # the fewest requests
    for key, (times, value, user_data) in counted.items():
        assert times == 1 and value == wanted[key] == rows[key][1]
        assert rows[key][0] == "accepted"
        # Meta's own hash of the email (its rule: lower case, trimmed), made on arrival
        assert user_data["em"] == [people[key].email_sha256_meta]
    too_old = sum(n for a in first.plan.actions.values() for why, n in a.refused.items()
                  if "older than Meta takes" in why)
    assert too_old > len(wanted)  # most of the 100 days are past Meta's 7
    assert (again.sent, again.planned_new) == (0, 0)
    assert meta_counted(running) == counted
    assert running.meta_capi.counted_twice() == 0
    shown = CliRunner().invoke(app, ["uploads", "--config", str(config.path), "--json"])
    ledgered = json.loads(shown.stdout)["meta"]
    assert sum(r["uploads"] for r in ledgered if r["status"] == "accepted") == len(wanted)


def test_klaviyo_gets_each_eligible_event_once_on_its_profile_history_as_backfill(
        valued: ClientConfig, running: server.RunningSandbox, tmp_path: Path) -> None:
    assert running.klaviyo_events is not None
    running.klaviyo_events.reset()
    config = load_config(copy_client(valued, tmp_path / "klaviyo"))
    with Store.open(config.store_url()) as store:
        wanted = eligible(config, store, Platform.KLAVIYO, None)
        times = {dedupe_key(config.client.name, Platform.KLAVIYO,
                            config.klaviyo.upload_metrics[e.conversion],  # type: ignore[union-attr]
                            e, per_person=True): e.time
                 for e in store.journey_events(until=NOW) if e.conversion in LADDER}
        first = push.push_klaviyo(config, load_secrets(config), store, now=NOW,
                                  sleep=lambda s: None)
        again = push.push_klaviyo(config, load_secrets(config), store, now=NOW)
        rows = ledger(store, Platform.KLAVIYO)
    counted = klaviyo_counted(running)
    assert first.errors == [] and len(wanted) > 1000
    assert first.sent == len(wanted) and set(counted) == set(wanted)
    assert first.requests["bulk_create_events"] == -(-len(wanted) // 1000)
    for key, (received, value, backfill) in counted.items():
        assert received == 1 and value == wanted[key] == rows[key][1]
        assert backfill == (NOW - times[key] > dt.timedelta(days=1))  # history fires no flow
    assert any(not b for _, _, b in counted.values()) and any(b for _, _, b in counted.values())
    assert (again.sent, again.planned_new) == (0, 0)
    assert running.klaviyo_events.summary(with_unique_ids=False)["counted_twice"] == 0


def counted_once(running: server.RunningSandbox, destination: Platform) -> set[str]:
    """The keys the platform counted, after checking it counted none twice (copies it
    deduplicated are resends, not conversions)."""
    assert running.meta_capi is not None and running.klaviyo_events is not None
    if destination is Platform.META:
        assert running.meta_capi.counted_twice() == 0
        keys = [event_id for (_, event_id), c in running.meta_capi.counts().items()
                if c.counted]
    else:
        assert running.klaviyo_events.summary(with_unique_ids=False)["counted_twice"] == 0
        keys = [e.unique_id or "" for e in running.klaviyo_events.events()]
    assert len(keys) == len(set(keys))
    return set(keys)


def inject(running: server.RunningSandbox, platform: str, kinds: list[str]) -> None:
    for kind in kinds:
        running.sandbox.inject(platform, kind)  # type: ignore[arg-type]


@pytest.mark.parametrize("destination", [Platform.META, Platform.KLAVIYO])
def test_a_push_under_faults_counts_each_event_once(
        valued: ClientConfig, running: server.RunningSandbox, tmp_path: Path,
        destination: Platform) -> None:
    """Throttling and outages on about one request in ten: retried, each event lands once,
    nothing lost."""
    assert running.meta_capi is not None and running.klaviyo_events is not None
    running.meta_capi.reset()
    running.klaviyo_events.reset()
    config = load_config(copy_client(valued, tmp_path / destination.value))
    slept: list[float] = []
    pushes = {Platform.META: push.push_meta, Platform.KLAVIYO: push.push_klaviyo}
    platform = destination.value
    with Store.open(config.store_url()) as store:
        wanted = eligible(config, store, destination,
                          META_AGE if destination is Platform.META else None)
        requests = -(-len(wanted) // 1000)
        inject(running, platform, ["server_error", "rate_limit"][:max(1, requests // 10)])
        result = pushes[destination](config, load_secrets(config), store, now=NOW,
                                     sleep=slept.append)
        rows = ledger(store, destination)
    assert result.errors == [] and slept  # retried, after waiting
    assert set(counted_once(running, destination)) == set(wanted) == set(rows)
    assert {status for status, _ in rows.values()} == {"accepted"}


@pytest.mark.parametrize("destination", [Platform.META, Platform.KLAVIYO])
def test_a_push_killed_anywhere_and_rerun_counts_each_event_once(
        valued: ClientConfig, running: server.RunningSandbox, tmp_path: Path,
        destination: Platform) -> None:
    """SIGKILL at 20 random moments of a push, each time run again: in the end the platform
    has every eligible event once, nothing lost, nothing left behind."""
    assert running.meta_capi is not None and running.klaviyo_events is not None
    path = copy_client(valued, tmp_path / "clean")
    command = [str(CONVSYNC), "push", "--destination", destination.value, "--config"]
    started = time.monotonic()
    clean = subprocess.run([*command, str(path), "--json"], capture_output=True, text=True,
                           timeout=300, cwd=tmp_path)
    took = time.monotonic() - started
    assert clean.returncode in (0, 3), clean.stderr[-2000:]
    expected = json.loads(clean.stdout)["destinations"][destination.value]["sent"]
    running.meta_capi.reset()
    running.klaviyo_events.reset()
    path = copy_client(valued, tmp_path / "killed")
    rng = random.Random(23)
    for _ in range(20):
        process = subprocess.Popen([*command, str(path)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, cwd=tmp_path)
        time.sleep(rng.uniform(0.0, took))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    final = subprocess.run([*command, str(path), "--json"], capture_output=True, text=True,
                           timeout=300, cwd=tmp_path)
    assert final.returncode in (0, 3), final.stderr[-2000:]
    with Store.open(load_config(path).store_url()) as store:
        rows = ledger(store, destination)
    assert {status for status, _ in rows.values()} == {"accepted"}  # nothing left behind
    assert set(counted_once(running, destination)) == set(rows)  # nothing lost
    assert len(rows) == expected > 100


class LaxMetaSink(MetaSink):
    """A Meta sink whose own checks miss a malformed fbc: what Meta then says must still set
    the bad event aside, with Meta's reason, and send the others."""

    def problems(self, upload: Upload, now: dt.datetime) -> str:
        why = super().problems(upload, now)
        return "" if why.startswith("user_data.fbc") else why


def test_an_event_the_platform_refuses_is_set_aside_with_its_reason_and_the_rest_goes(
        valued: ClientConfig, running: server.RunningSandbox, tmp_path: Path) -> None:
    assert running.meta_capi is not None and running.klaviyo_events is not None
    running.meta_capi.reset()
    running.klaviyo_events.reset()
    config = load_config(copy_client(valued, tmp_path / "refused"))
    secrets = load_secrets(config)
    assert config.meta is not None and config.klaviyo is not None
    with Store.open(config.store_url()) as store:
        # Meta: one person with a click id (fbc) that is not Meta's fb.1.<ms>.<fbclid>
        with store.engine.begin() as conn:
            person = conn.execute(sa.text(
                "SELECT person_key FROM journey_events WHERE conversion = 'add_to_cart' "
                "ORDER BY time DESC LIMIT 1")).scalar_one()
            conn.execute(sa.text("UPDATE journey_events SET identifiers = json_set(identifiers, "
                                 "'$.fbc', 'fb.1.123.not-meta') WHERE person_key = :p"),
                         {"p": person})
            # Klaviyo: one person whose profile is gone from Klaviyo since the pull
            conn.execute(sa.text("UPDATE journey_events SET identifiers = json_set(identifiers, "
                                 "'$.klaviyo_profile_id', '01GONEGONEGONEGONEGONEGONE') "
                                 "WHERE person_key = :p"), {"p": person})
        meta = push.push_meta(config, secrets, store, now=NOW, sink=LaxMetaSink(
            meta_source.connect(config.meta, secrets), config.meta))
        klaviyo = push.push_klaviyo(config, secrets, store, now=NOW, sleep=lambda s: None)
        meta_rows, klaviyo_rows = ledger(store, Platform.META), ledger(store, Platform.KLAVIYO)
    meta_failed = {k for k, (status, _) in meta_rows.items() if status == "failed"}
    assert meta_failed and all(why.startswith("refused by Meta: META_100 at ")
                               for why in meta.failed), meta.failed
    assert set(counted_once(running, Platform.META)) == set(meta_rows) - meta_failed
    klaviyo_failed = {k for k, (status, _) in klaviyo_rows.items() if status == "failed"}
    assert klaviyo_failed and all(why.startswith("refused by Klaviyo: HTTP_400 at ")
                                  for why in klaviyo.failed), klaviyo.failed
    assert set(counted_once(running, Platform.KLAVIYO)) == set(klaviyo_rows) - klaviyo_failed
    assert sum(klaviyo.failed.values()) == len(klaviyo_failed)
