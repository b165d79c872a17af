"""The store on SQLite and, when CONVSYNC_TEST_POSTGRES_URL is set, on PostgreSQL.

Start a throwaway server for the PostgreSQL half with
``export CONVSYNC_TEST_POSTGRES_URL="$(scripts/start_test_postgres | tail -n 1)"``."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.engine import Connection

from convsync import store as store_module
from convsync.model import (
    Basis,
    ConversionDefinition,
    ConversionStat,
    IdentifierFields,
    Identifiers,
    JourneyBatch,
    JourneyEvent,
    Kind,
    Platform,
    PlatformConversion,
    PlatformNames,
    Upload,
    UploadStatus,
)
from convsync.store import LATEST_VERSION, STATS_KEY, Store, StoreError, StoreVersionError

POSTGRES_URL = os.environ.get("CONVSYNC_TEST_POSTGRES_URL")
T0 = dt.datetime(2026, 10, 1, 12, 0, tzinfo=dt.UTC)
PARIS = dt.timezone(dt.timedelta(hours=2))
SHA_A = "a" * 64
SHA_B = "0123456789abcdef" * 4


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: dt.datetime = T0) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now

    def tick(self, **delta: float) -> dt.datetime:
        self.now += dt.timedelta(**delta)
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(url: str, clock: Clock) -> Iterator[Store]:
    with Store.open(url, clock=clock) as opened:
        yield opened


def stat(day: int, count: float = 1.0, **fields: object) -> ConversionStat:
    values: dict[str, object] = {
        "platform": Platform.GOOGLE_ADS, "account_id": "1234567890",
        "date": dt.date(2026, 9, 1) + dt.timedelta(days=day), "timezone": "Europe/Paris",
        "campaign_id": "111", "campaign_name": "Brand", "platform_conversion": "Purchase",
        "conversion": "purchase", "kind": Kind.MACRO, "count": count, "value": count * 40.0,
        "currency": "EUR", "basis": Basis.CLICK_DATE, "window": "", "in_column": True,
    }
    return ConversionStat.model_validate(values | fields)


def ga4_stat(day: int, count: float = 1.0, **fields: object) -> ConversionStat:
    """A GA4 cell as schema version 3 keeps it: session source and medium, key events."""
    values: dict[str, object] = {
        "platform": Platform.GA4, "account_id": "321", "timezone": "America/New_York",
        "campaign_id": "Brand", "campaign_name": "Brand", "platform_conversion": "purchase",
        "basis": Basis.CONVERSION_DATE, "in_column": None, "source": "google",
        "medium": "cpc", "key_events": count,
    }
    return stat(day, count, **(values | fields))


def event(n: int, time: dt.datetime, **fields: object) -> JourneyEvent:
    values: dict[str, object] = {
        "person_key": f"person-{n % 3}", "conversion": "add_to_cart",
        "platform_conversion": "Added to Cart", "time": time, "value": 2.5 * n,
        "currency": "USD", "source_platform": Platform.KLAVIYO, "source_event_id": f"ev-{n}",
        "campaign_id": "c9",
        "identifiers": Identifiers(gclid=f"gclid-{n}", fbp="fb.1.1.2", email_sha256_google=SHA_A,
                                   email_sha256_meta=SHA_B, external_id=f"crm-{n}"),
    }
    return JourneyEvent(**(values | fields))  # type: ignore[arg-type]


def upload(key: str, value: float = 50.0) -> Upload:
    return Upload(destination=Platform.META, conversion_action="Lead", dedupe_key=key,
                  value=value, currency="EUR", time=T0 - dt.timedelta(hours=3),
                  identifiers=Identifiers(fbc="fb.1.1.abc", email_sha256_meta=SHA_B))


def version_rows(store: Store) -> list[tuple[int, dt.datetime]]:
    table = store_module.schema_version
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(table.c.version, table.c.applied_at)
                            .order_by(table.c.version))
        return [(r.version, r.applied_at) for r in rows]


def sqlite_path(url: str) -> Path | None:
    parsed = sa.make_url(url)
    return Path(parsed.database or "") if parsed.get_backend_name() == "sqlite" else None


# -- opening and migrations ----------------------------------------------------------------


def test_fresh_store_gets_the_latest_schema(url: str, clock: Clock) -> None:
    with Store.open(url, clock=clock) as store:
        assert store.schema_version() == LATEST_VERSION
        assert store.applied_migrations == tuple(range(1, LATEST_VERSION + 1))
        assert [v for v, _ in version_rows(store)] == list(range(1, LATEST_VERSION + 1))
        tables = set(sa.inspect(store.engine).get_table_names())
        assert tables == set(store_module.metadata.tables)
        for table in store_module.DATA_TABLES:
            assert store.count_rows(table.name) == 0
    path = sqlite_path(url)
    if path is not None:
        assert path.is_file()
        with sqlite3.connect(path) as raw:
            assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_reopening_runs_no_migration_and_keeps_data(url: str, clock: Clock) -> None:
    with Store.open(url, clock=clock) as store:
        store.upsert_stats([stat(0), stat(1)])
        store.set_watermark("acme", Platform.META, "act_1", "insights",
                            last_complete_date=dt.date(2026, 9, 30))
        applied = version_rows(store)
    clock.tick(days=1)
    with Store.open(url, clock=clock) as again:
        assert again.applied_migrations == ()
        assert version_rows(again) == applied
        assert list(again.stats()) == [stat(0), stat(1)]
        watermark = again.get_watermark("acme", Platform.META, "act_1", "insights")
        assert watermark is not None
        assert watermark.last_complete_date == dt.date(2026, 9, 30)


def test_concurrent_first_opens_migrate_once(url: str) -> None:
    with ThreadPoolExecutor(max_workers=4) as pool:
        stores = list(pool.map(lambda _: Store.open(url), range(4)))
    try:
        assert sorted(s.applied_migrations for s in stores) == (
            [()] * 3 + [tuple(range(1, LATEST_VERSION + 1))])
        assert [v for v, _ in version_rows(stores[0])] == list(range(1, LATEST_VERSION + 1))
    finally:
        for opened in stores:
            opened.close()


SAVE_DEFINITIONS = """
import sys, time
from pathlib import Path
from convsync.model import ConversionDefinition, Kind, PlatformNames
from convsync.store import Store
url, go = sys.argv[1], Path(sys.argv[2])
defs = [ConversionDefinition(name=f"step_{i}", kind=Kind.MICRO,
                             names=PlatformNames(ga4=(f"event_{i}",))) for i in range(20)]
with Store.open(url) as store:
    while not go.exists():
        time.sleep(0.005)
    for _ in range(10):
        store.save_definitions(defs, "acme")
"""


def test_first_runs_started_together_save_the_definitions_without_a_crash(
        url: str, tmp_path: Path) -> None:
    """Several processes saving one client's definitions at once (first runs of a fresh
    store): each run's whole set replaces the last, none fails on a unique key (PostgreSQL
    crashed 3% of the time; issue 13, item 12)."""
    Store.open(url).close()  # migrated: the processes race on the definitions alone
    go = tmp_path / "go"
    runs = [subprocess.Popen([sys.executable, "-c", SAVE_DEFINITIONS, url, str(go)],
                             stderr=subprocess.PIPE, text=True) for _ in range(6)]
    go.touch()
    failures = [p.communicate(timeout=120)[1] for p in runs if p.wait(timeout=120) != 0]
    assert failures == []
    with Store.open(url) as store:
        assert [d.name for d in store.definitions("acme")] == sorted(
            f"step_{i}" for i in range(20))


def test_store_from_a_newer_convsync_is_refused(url: str) -> None:
    with Store.open(url) as store, store.engine.begin() as conn:
        conn.execute(store_module.schema_version.insert().values(
            version=LATEST_VERSION + 1, applied_at=T0))
    with pytest.raises(StoreVersionError) as refused:
        Store.open(url)
    message = str(refused.value)
    assert f"schema version {LATEST_VERSION + 1}" in message
    assert f"up to {LATEST_VERSION}" in message
    assert "upgrade convsync" in message


def test_a_failing_migration_leaves_nothing_behind(
        url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Migrations and their version row commit together, DDL included (SQLite too)."""
    with Store.open(url):
        pass

    def half_done(conn: sa.Connection) -> None:
        conn.execute(sa.text("CREATE TABLE half_done (id INTEGER)"))
        raise RuntimeError("migration bug")

    monkeypatch.setattr(store_module, "MIGRATIONS", (*store_module.MIGRATIONS, half_done))
    monkeypatch.setattr(store_module, "LATEST_VERSION", LATEST_VERSION + 1)
    with pytest.raises(RuntimeError, match="migration bug"):
        Store.open(url)
    monkeypatch.undo()
    with Store.open(url) as store:
        assert store.schema_version() == LATEST_VERSION
        assert "half_done" not in sa.inspect(store.engine).get_table_names()


def test_unsupported_url_is_refused_without_its_password() -> None:
    with pytest.raises(StoreError, match="unsupported database URL") as refused:
        Store.open("mysql://user:hunter2@db.example/convsync")
    assert "hunter2" not in str(refused.value)


def test_sqlite_enforces_foreign_keys(tmp_path: Path) -> None:
    with Store.open(f"sqlite:///{tmp_path / 'fk.db'}") as store, \
            pytest.raises(sa.exc.IntegrityError, match="FOREIGN KEY"), \
            store.engine.begin() as conn:
        conn.execute(store_module.conversion_platform_names.insert().values(
            client="acme", name="ghost", platform="meta", platform_name="Purchase", position=0))


# -- daily stats -----------------------------------------------------------------------------


def test_storing_the_same_day_twice_keeps_one_row_with_the_newest_figures(
        store: Store, clock: Clock) -> None:
    first = [stat(0, 1.0), stat(1, 2.0), stat(1, 7.0, basis=Basis.CONVERSION_DATE),
             stat(1, 3.0, window="7d_click", platform=Platform.META)]
    assert store.upsert_stats(first) == 4
    later = clock.tick(hours=6)
    restated = [stat(1, 2.5, campaign_name="Brand (renamed)", in_column=False)]
    assert store.upsert_stats(restated) == 1

    assert store.count_rows("daily_stats") == 4
    assert list(store.stats(platform=Platform.GOOGLE_ADS, since=stat(1).date)) == [
        restated[0], first[2]]
    table = store_module.daily_stats
    with store.engine.connect() as conn:
        stamps = dict(conn.execute(sa.select(table.c.basis, table.c.updated_at).where(
            table.c.date == stat(1).date, table.c.platform == "google_ads")).all())
    assert stamps == {"click_date": later, "conversion_date": T0}
    assert all(stamp.tzinfo == dt.UTC for stamp in stamps.values())


def test_batches_larger_than_batch_size(store: Store) -> None:
    rows = [stat(day, float(day)) for day in range(23)]
    rows.append(stat(4, 99.0))  # same cell again in a later batch: the last figures win
    rows.append(stat(21, 77.0))  # and again within one batch (rows 20 to 24)
    assert store.upsert_stats(iter(rows), batch_size=5) == 25
    assert store.count_rows("daily_stats") == 23
    stored = {s.date: s.count for s in store.stats()}
    assert stored == {s.date: s.count for s in rows}
    assert (stored[stat(4).date], stored[stat(21).date]) == (99.0, 77.0)
    with pytest.raises(ValueError, match="batch_size"):
        store.upsert_stats(rows, batch_size=0)


def test_stats_round_trip_and_filters(store: Store) -> None:
    rows = [
        stat(0), stat(0, conversion=None, kind=None, platform_conversion="Unmapped thing",
                      in_column=None),
        ga4_stat(2, 5.0, key_events=4.0),
        stat(5, platform=Platform.KLAVIYO, conversion="newsletter_signup", kind=Kind.MICRO,
             currency="", value=0.0, in_column=None),
        # the same day, campaign and event from another source / medium is another cell
        ga4_stat(2, 2.0, source="(direct)", medium="(none)"),
        ga4_stat(2, 3.0, medium="organic", key_events=0.0),
    ]
    store.upsert_stats(rows)
    assert sorted(store.stats(), key=repr) == sorted(rows, key=repr)
    assert [(s.source, s.medium, s.count, s.key_events) for s in store.stats(platform="ga4")
            ] == [("(direct)", "(none)", 2.0, 2.0), ("google", "cpc", 5.0, 4.0),
                  ("google", "organic", 3.0, 0.0)]
    assert {(s.source, s.medium, s.key_events) for s in store.stats(platform="google_ads")
            } == {("", "", None)}
    day2 = stat(2).date
    assert {s.platform for s in store.stats(since=day2, until=day2)} == {Platform.GA4}
    assert list(store.stats(conversion="newsletter_signup")) == [rows[3]]
    assert list(store.stats(until=stat(-1).date)) == []


def test_stats_stream_in_chunks(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "_STREAM_CHUNK", 7)
    store.upsert_stats(stat(day) for day in range(30))
    streamed = store.stats()
    assert next(streamed) == stat(0)
    assert [s.date for s in streamed] == [stat(day).date for day in range(1, 30)]


# -- journey events --------------------------------------------------------------------------


def test_journey_events_round_trip_with_aware_utc_times(store: Store, clock: Clock) -> None:
    local = dt.datetime(2026, 9, 3, 9, 30, 15, 123456, tzinfo=PARIS)
    events = [event(n, local + dt.timedelta(hours=n)) for n in range(5)]
    events.append(event(9, local, identifiers=Identifiers(), conversion=None))
    assert store.upsert_journey_events(events, batch_size=4) == 6

    stored = list(store.journey_events())
    assert sorted(stored, key=lambda e: e.source_event_id) == sorted(
        events, key=lambda e: e.source_event_id)
    assert all(e.time.tzinfo == dt.UTC for e in stored)
    assert stored[0].time == dt.datetime(2026, 9, 3, 7, 30, 15, 123456, tzinfo=dt.UTC)
    window = list(store.journey_events(since=local + dt.timedelta(hours=1),
                                       until=local + dt.timedelta(hours=3)))
    assert [e.source_event_id for e in window] == ["ev-1", "ev-2"]

    clock.tick(minutes=5)
    store.upsert_journey_events([event(1, events[1].time, value=123.0), *events[2:]])
    assert store.count_rows("journey_events") == 6
    again = {e.source_event_id: e for e in store.journey_events()}
    assert again["ev-1"].value == 123.0
    assert again["ev-1"].time == events[1].time


def test_a_crm_event_moved_in_time_replaces_its_old_version(store: Store) -> None:
    """A CRM file's own event id can come back with a corrected time; a platform event
    never moves, so the same id at another time is another event there."""
    hour = dt.timedelta(hours=1)
    store.upsert_journey_events([event(1, T0, source_platform=Platform.CRM),
                                 event(1, T0, source_platform=Platform.KLAVIYO)])
    store.upsert_journey_events([event(1, T0 + 2 * hour, source_platform=Platform.CRM,
                                       value=99.0)])
    assert sorted((e.source_platform, e.time, e.value) for e in store.journey_events()) == [
        (Platform.CRM, T0 + 2 * hour, 99.0), (Platform.KLAVIYO, T0, 2.5)]
    store.upsert_journey_events([event(1, T0 + hour, source_platform=Platform.KLAVIYO)])
    assert store.count_rows("journey_events") == 3


def batch_of(events: list[JourneyEvent]) -> JourneyBatch:
    """Events of one source and conversion (whole seconds) as one batch."""
    first, shared = events[0], {id(e.identifiers): fields(e.identifiers) for e in events}
    return JourneyBatch(first.source_platform, first.conversion, first.platform_conversion,
                        [e.source_event_id for e in events],
                        [int(e.time.timestamp()) for e in events],
                        [e.person_key for e in events], [e.value for e in events],
                        [e.currency for e in events], [e.campaign_id for e in events],
                        [shared[id(e.identifiers)] for e in events])


def fields(identifiers: Identifiers) -> IdentifierFields:
    return identifiers.model_dump(exclude_none=True)  # type: ignore[return-value]


def test_a_batch_is_stored_as_its_events_one_by_one_are(store: Store, clock: Clock) -> None:
    """Same rows either way: the same event given once as a batch and once alone is one row,
    and the batch's whole seconds are the same instant as the event's time."""
    times = [dt.datetime(2026, 9, 3, 23, 59, 59, tzinfo=dt.UTC), T0, T0,
             dt.datetime(1969, 12, 31, 23, 0, 1, tzinfo=dt.UTC),
             dt.datetime(2099, 1, 1, tzinfo=PARIS)]
    events = [event(n, t) for n, t in enumerate(times)]
    shared = events[1].identifiers
    events[2] = event(2, T0, identifiers=shared, person_key="person-1")
    assert store.upsert_journey_batches([batch_of(events[:3]), batch_of(events[3:])]) == 5
    stored = sorted(store.journey_events(), key=lambda e: e.source_event_id)
    assert stored == events
    assert list(batch_of(events).events()) == events
    assert IdentifierFields.__annotations__.keys() == Identifiers.model_fields.keys()

    clock.tick(minutes=5)
    store.upsert_journey_events(events)
    store.upsert_journey_batches([batch_of([event(0, times[0], value=7.0)])])
    assert store.count_rows("journey_events") == 5
    assert {e.source_event_id: e.value for e in store.journey_events()}["ev-0"] == 7.0


def test_a_crm_batch_replaces_its_moved_events_as_single_events_do(store: Store) -> None:
    store.upsert_journey_events([event(1, T0, source_platform=Platform.CRM)])
    moved = event(1, T0 + dt.timedelta(hours=2), source_platform=Platform.CRM, value=99.0)
    assert store.upsert_journey_batches([batch_of([moved])]) == 1
    assert [(e.time, e.value) for e in store.journey_events()] == [(moved.time, 99.0)]


def test_version_1_journey_events_move_to_the_time_ordered_key(url: str, clock: Clock) -> None:
    """A store written at schema version 1 keeps every journey event through migration 2,
    which keys them by time first."""
    events = [event(n, T0 + dt.timedelta(minutes=n)) for n in (2, 0, 1)]
    if path := sqlite_path(url):
        path.parent.mkdir(parents=True)
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        store_module.schema_version.create(conn)
        store_module.MIGRATIONS[0](conn)
        conn.execute(store_module.schema_version.insert().values(version=1, applied_at=T0))
        conn.execute(store_module._journey_events_v1().insert(), [
            {**e._asdict(), **e.identifiers.model_dump(), "updated_at": T0} for e in events])
    engine.dispose()

    with Store.open(url, clock=clock) as store:
        assert store.applied_migrations == tuple(range(2, LATEST_VERSION + 1))
        assert list(store.journey_events()) == sorted(events, key=lambda e: e.time)
        key = sa.inspect(store.engine).get_pk_constraint("journey_events")
        assert key["constrained_columns"] == ["time", "source_platform", "source_event_id"]
        store.upsert_journey_events(events)
        assert store.count_rows("journey_events") == 3


def store_at_version(url: str, version: int, fill: Callable[[Connection], None]) -> None:
    """A database as schema ``version`` left it, filled by ``fill``."""
    if path := sqlite_path(url):
        path.parent.mkdir(parents=True)
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        store_module.schema_version.create(conn)
        for number, migrate in enumerate(store_module.MIGRATIONS[:version], start=1):
            migrate(conn)
            conn.execute(store_module.schema_version.insert().values(version=number,
                                                                     applied_at=T0))
        fill(conn)
    engine.dispose()


def version_2_store(url: str, stats: list[ConversionStat]) -> None:
    """A database as schema version 2 left it, holding ``stats`` (no source, medium or key
    events then)."""
    store_at_version(url, 2, lambda conn: conn.execute(store_module._daily_stats_v1().insert(), [
        {**s.model_dump(exclude={"window", "source", "medium", "key_events"}),
         "attribution_window": s.window, "updated_at": T0} for s in stats]))


def test_version_3_uploads_move_to_the_ledger_of_the_push_side(url: str,
                                                               clock: Clock) -> None:
    """A store at schema version 3 keeps its upload rows through migration 4 (client '',
    nothing sent yet), and gains the request and send tables, in the shapes the code
    defines."""
    store_at_version(url, 3, lambda conn: conn.execute(store_module._uploads_v1().insert(), [{
        "destination": "meta", "conversion_action": "purchase", "dedupe_key": "k1",
        "value": 12.5, "currency": "USD", "time": T0, "status": "planned", "response": "",
        "attempts": 0, "created_at": T0, "updated_at": T0, "fbc": "fb.1.1.abc"}]))
    with Store.open(url, clock=clock) as store:
        assert store.applied_migrations == (4, 5)
        kept = store.get_upload(Platform.META, "k1")
        assert kept is not None and (kept.value, kept.account_id, kept.conversion) == (
            12.5, "", "")
        assert kept.identifiers == Identifiers(fbc="fb.1.1.abc")
        inspector = sa.inspect(store.engine)
        assert not {"uploads_v3", "uploads_v4"} & set(inspector.get_table_names())
        for table in (store_module.uploads, store_module.upload_requests,
                      store_module.upload_sends):
            assert [c["name"] for c in inspector.get_columns(table.name)] == [
                c.name for c in table.c]
        new = Upload(destination=Platform.META, conversion_action="purchase", dedupe_key="k2",
                     value=1.0, currency="USD", time=T0)
        assert len(store.plan_uploads([new], client="acme")) == 1  # the ids go on after the old


def test_version_4_uploads_keep_their_identifiers_and_sends_through_migration_5(
        url: str, clock: Clock) -> None:
    """Migration 5 folds an upload's identifier columns into one JSON column; its id, its
    state and every value it was sent with stay, and new ids go on after the old."""
    def fill(conn: Connection) -> None:
        conn.execute(store_module._uploads_v4().insert(), [{
            "id": 7, "client": "acme", "destination": "google_ads", "account_id": "1234567890",
            "conversion_action": "6111", "conversion": "add_to_cart", "dedupe_key": "k1",
            "value": 3.5, "currency": "USD", "time": T0, "gclid": "Cj0KCQabc1234",
            "email_sha256_google": "a" * 64, "status": "sent", "reason": "",
            "request_id": "r1", "sent_value": 3.0, "sent_at": T0, "response": "",
            "attempts": 1, "resends": 1, "created_at": T0, "updated_at": T0}])
        conn.execute(store_module.upload_sends.insert(), [
            {"upload_id": 7, "request_id": "r0", "value": 2.0, "sent_at": T0},
            {"upload_id": 7, "request_id": "r1", "value": 3.0, "sent_at": T0}])

    store_at_version(url, 4, fill)
    with Store.open(url, clock=clock) as store:
        assert store.applied_migrations == (5,)
        kept = store.get_upload(Platform.GOOGLE_ADS, "k1")
        assert kept is not None and kept.identifiers == Identifiers(
            gclid="Cj0KCQabc1234", email_sha256_google="a" * 64)
        with store.engine.connect() as conn:
            row = conn.execute(sa.select(store_module.uploads).where(
                store_module.uploads.c.dedupe_key == "k1")).one()
            sends = conn.execute(sa.select(store_module.upload_sends.c.upload_id,
                                           store_module.upload_sends.c.value)).all()
        assert (row.id, row.status, row.request_id, row.sent_value, row.resends) == (
            7, "sent", "r1", 3.0, 1)
        assert sorted(sends) == [(7, 2.0), (7, 3.0)]
        assert len(store.plan_uploads([upload("k2")], client="acme")) == 1
        with store.engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.max(store_module.uploads.c.id))).scalar() > 7


def test_version_2_stats_move_to_the_key_with_source_and_medium(url: str,
                                                                clock: Clock) -> None:
    """A store written at schema version 2 keeps every daily cell through migration 3, with
    source = medium = '' and no key-event count, in the table the code defines."""
    old = [stat(0), stat(1, 2.0, window="7d_click", platform=Platform.META, in_column=None),
           ga4_stat(1, source="", medium="", key_events=None)]
    version_2_store(url, old)
    engine = sa.create_engine(url)
    before = [c["name"] for c in sa.inspect(engine).get_columns("daily_stats")]
    engine.dispose()
    assert before == [c.name for c in store_module._daily_stats_v1().c]
    assert not {"source", "medium", "key_events"} & set(before)

    with Store.open(url, clock=clock) as store:
        assert store.applied_migrations == (3, 4, 5)
        kept = list(store.stats())
        assert sorted(kept, key=repr) == sorted(old, key=repr)
        assert {(s.source, s.medium, s.key_events) for s in kept} == {("", "", None)}
        inspector = sa.inspect(store.engine)
        assert "daily_stats_v2" not in inspector.get_table_names()
        key = inspector.get_pk_constraint("daily_stats")
        assert key["constrained_columns"] == list(STATS_KEY)
        columns = {c["name"]: c for c in inspector.get_columns("daily_stats")}
        assert list(columns) == [c.name for c in store_module.daily_stats.c]
        assert [columns[name]["nullable"] for name in ("source", "medium", "key_events")] == [
            False, False, True]
        assert all("''" in str(columns[name]["default"]) for name in ("source", "medium"))
        assert [(i["name"], i["column_names"]) for i in inspector.get_indexes("daily_stats")
                ] == [("ix_daily_stats_date", ["date"])]

        store.upsert_stats([stat(0, 9.0), ga4_stat(2)])
        assert store.count_rows("daily_stats") == 4
        assert next(store.stats(platform=Platform.GOOGLE_ADS)).count == 9.0


def test_ga4_cells_from_version_2_give_way_to_their_day_pulled_again(url: str,
                                                                     clock: Clock) -> None:
    """A GA4 cell migrated from version 2 holds the same events as the day's cells split by
    source and medium: when the day is pulled again they replace it, or it would count
    twice. Other days, other accounts and platforms without sources keep their cells."""
    unsourced = {"source": "", "medium": "", "key_events": None}
    old_ga4 = [ga4_stat(0, 5.0, **unsourced),
               ga4_stat(0, 1.0, campaign_id="Sale", campaign_name="Sale", **unsourced),
               ga4_stat(1, 4.0, **unsourced),
               ga4_stat(0, 7.0, account_id="999", **unsourced)]
    google_ads = stat(0)
    version_2_store(url, [*old_ga4, google_ads])

    with Store.open(url, clock=clock) as store:
        pulled = [ga4_stat(0, 3.0), ga4_stat(0, 2.0, source="(direct)", medium="(none)")]
        store.upsert_stats(pulled, batch_size=1)
        store.upsert_stats([stat(1)])  # no source: replaces nothing
        assert sorted(store.stats(), key=repr) == sorted(
            [*pulled, old_ga4[2], old_ga4[3], google_ads, stat(1)], key=repr)


def test_no_raw_pii_column_exists(store: Store) -> None:
    inspector = sa.inspect(store.engine)
    columns = {(table, c["name"]) for table in inspector.get_table_names()
               for c in inspector.get_columns(table)}
    personal = {(t, c) for t, c in columns
                if any(word in c for word in ("email", "phone", "mail", "tel"))}
    assert personal == set()  # identifiers are one JSON column of hashes (checked below)


def test_journey_identifiers_are_kept_as_json_of_hashes(store: Store) -> None:
    store.upsert_journey_events([event(1, T0)])
    with store.engine.connect() as conn:
        text = conn.execute(sa.text("SELECT identifiers FROM journey_events")).scalar_one()
    assert json.loads(text) == {"gclid": "gclid-1", "fbp": "fb.1.1.2",
                                "email_sha256_google": SHA_A, "email_sha256_meta": SHA_B,
                                "external_id": "crm-1"}


def test_a_raw_email_is_refused_in_a_hash_column(store: Store) -> None:
    """The model refuses anything but hex SHA-256; the database refuses it too, as a second
    lock for whatever bypasses the model."""
    with pytest.raises(ValidationError, match="email_sha256_google"):
        Identifiers(email_sha256_google="Jane.Doe@gmail.com")
    raw_email = event(1, T0, identifiers=Identifiers.model_construct(
        email_sha256_google="Jane.Doe@gmail.com" + "x" * 46))
    raw_phone = event(1, T0, identifiers=Identifiers.model_construct(
        phone_sha256_meta="+33612345678" + "0" * 52))
    for raw in (raw_email, raw_phone):
        with pytest.raises(sa.exc.IntegrityError, match="identifiers"):
            store.upsert_journey_events([event(0, T0), raw])
    assert store.count_rows("journey_events") == 0
    for raw_ids in (Identifiers.model_construct(phone_sha256_google="+33612345678" + "0" * 52),
                    Identifiers.model_construct(email_sha256_meta="Jane.Doe@gmail.com")):
        with pytest.raises(sa.exc.IntegrityError, match="identifiers"):
            store.plan_uploads([upload("k")._replace(identifiers=raw_ids)])
    assert store.count_rows("uploads") == 0


def test_naive_timestamps_are_refused(store: Store) -> None:
    """The model refuses naive times; the column type refuses them too, as a second lock."""
    with pytest.raises(sa.exc.StatementError, match="naive timestamp"), \
            store.engine.begin() as conn:
        conn.execute(store_module.runs.insert().values(
            client="acme", command="pull", started_at=dt.datetime(2026, 1, 1), status="x",
            summary={}))


# -- the upload ledger ---------------------------------------------------------------------


def test_plan_uploads_is_exactly_once(store: Store, clock: Clock) -> None:
    assert len(store.plan_uploads([upload("a"), upload("b"), upload("c")])) == 3
    store.mark_upload(Platform.META, "b", UploadStatus.SENT, '{"events_received": 1}')
    clock.tick(hours=1)

    replanned = [upload("a", value=999.0), upload("b", value=999.0), upload("c"), upload("d")]
    assert len(store.plan_uploads(replanned, batch_size=2)) == 1
    assert store.count_rows("uploads") == 4
    sent = store.get_upload(Platform.META, "b")
    assert sent is not None
    assert (sent.status, sent.value, sent.response) == (
        UploadStatus.SENT, 50.0, '{"events_received": 1}')
    first = store.get_upload(Platform.META, "a")
    assert first == upload("a")
    assert [u.dedupe_key for u in store.pending_uploads(Platform.META)] == ["a", "c", "d"]
    assert store.pending_uploads(Platform.GOOGLE_ADS) == []


def test_mark_upload_records_status_response_and_attempts(store: Store) -> None:
    store.plan_uploads([upload("a"), upload("b")])
    store.mark_upload(Platform.META, "a", UploadStatus.FAILED, "HTTP 503")
    assert [u.dedupe_key for u in store.pending_uploads("meta")] == ["a", "b"]
    store.mark_upload(Platform.META, "a", UploadStatus.SENT, "fbtrace 1")
    store.mark_upload(Platform.META, "a", UploadStatus.ACCEPTED, "ok", attempt=False)
    store.mark_uploads(Platform.META, [("b", UploadStatus.REJECTED, "invalid fbc")])

    assert store.upload_attempts(Platform.META, "a") == 2
    assert store.upload_attempts(Platform.META, "b") == 1
    accepted = store.get_upload(Platform.META, "a")
    assert accepted is not None
    assert (accepted.status, accepted.response) == (UploadStatus.ACCEPTED, "ok")
    assert store.pending_uploads(Platform.META) == []
    assert [u.dedupe_key for u in store.pending_uploads(
        Platform.META, statuses=[UploadStatus.REJECTED])] == ["b"]
    with pytest.raises(KeyError, match="never-planned"):
        store.mark_upload(Platform.META, "never-planned", UploadStatus.SENT)
    with pytest.raises(KeyError):
        store.mark_upload(Platform.GOOGLE_ADS, "a", UploadStatus.SENT)
    assert store.get_upload(Platform.META, "nope") is None


# -- definitions and platform conversions ---------------------------------------------------


def test_definitions_round_trip_and_are_replaced_per_client(store: Store) -> None:
    purchase = ConversionDefinition(
        name="purchase", kind=Kind.MACRO, ladder_position=4,
        names=PlatformNames(google_ads=("Purchase (web)", "Purchase (app)"), ga4=("purchase",),
                            meta=("offsite_conversion.fb_pixel_purchase",),
                            klaviyo=("Placed Order",)))
    cart = ConversionDefinition(name="add_to_cart", kind=Kind.MICRO, ladder_position=2,
                                names=PlatformNames(ga4=("add_to_cart",)))
    lead = ConversionDefinition(name="lead", kind=Kind.MICRO)
    store.save_definitions([purchase, cart, lead], "acme")
    store.save_definitions([cart], "globex")
    assert store.definitions("acme") == [cart, purchase, lead]

    store.save_definitions([purchase], "acme")
    assert store.definitions("acme") == [purchase]
    assert store.definitions("globex") == [cart]
    assert store.count_rows("conversion_platform_names") == 6


def test_platform_conversions_round_trip(store: Store, clock: Clock) -> None:
    action = PlatformConversion(
        platform=Platform.GOOGLE_ADS, account_id="1234567890", platform_id="987",
        name="Purchase", conversion="purchase", kind=Kind.MACRO, in_column=True,
        settings={"category": "PURCHASE", "type": "WEBPAGE", "status": "ENABLED",
                  "primary_for_goal": True, "counting_type": "ONE_PER_CLICK",
                  "default_value": 1.5, "click_through_lookback_window_days": 30})
    metric = PlatformConversion(platform=Platform.KLAVIYO, account_id="", platform_id="Xy7",
                                name="Viewed Product")
    assert store.save_platform_conversions([action, metric]) == 2
    assert store.platform_conversions() == [action, metric]

    clock.tick(days=1)
    demoted = action.model_copy(update={"in_column": False,
                                        "settings": {**action.settings,
                                                     "primary_for_goal": False}})
    store.save_platform_conversions([demoted])
    assert store.platform_conversions(Platform.GOOGLE_ADS, "1234567890") == [demoted]
    assert store.platform_conversions(seen_since=clock.now) == [demoted]
    assert store.count_rows("platform_conversions") == 2


# -- watermarks and runs ---------------------------------------------------------------------


def test_watermarks_round_trip(store: Store, clock: Clock) -> None:
    assert store.get_watermark("acme", Platform.GA4, "properties/1", "events") is None
    store.set_watermark("acme", Platform.GA4, "properties/1", "events",
                        last_complete_date=dt.date(2026, 9, 20))
    store.set_watermark("acme", Platform.KLAVIYO, "", "events", cursor="page-token-7")
    later = clock.tick(hours=2)
    store.set_watermark("acme", "ga4", "properties/1", "events",
                        last_complete_date=dt.date(2026, 9, 21))

    ga4 = store.get_watermark("acme", Platform.GA4, "properties/1", "events")
    assert ga4 is not None
    assert (ga4.last_complete_date, ga4.cursor, ga4.updated_at) == (
        dt.date(2026, 9, 21), None, later)
    klaviyo = store.get_watermark("acme", Platform.KLAVIYO, "", "events")
    assert klaviyo is not None
    assert (klaviyo.last_complete_date, klaviyo.cursor) == (None, "page-token-7")
    assert store.get_watermark("globex", Platform.GA4, "properties/1", "events") is None
    assert store.count_rows("watermarks") == 2


def test_a_run_whose_process_is_gone_is_marked_abandoned_by_the_next(store: Store) -> None:
    """A run killed or crashed stays "running" no more: the next run on the machine marks it
    abandoned; one whose process lives, or of another machine, is left (issue 13, item 13)."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with store.engine.begin() as conn:
        for pid, host in ((gone.pid, socket.gethostname()), (os.getpid(), socket.gethostname()),
                          (gone.pid, "another-machine")):
            conn.execute(store_module.runs.insert().values(
                client="acme", command="pull", started_at=T0, status="running",
                summary={"pid": pid, "host": host}))
    store.start_run("acme", "push")
    statuses = [(r.summary.get("host"), r.summary.get("pid"), r.status)
                for r in reversed(store.recent_runs("acme"))]
    assert statuses[:3] == [(socket.gethostname(), gone.pid, "abandoned"),
                            (socket.gethostname(), os.getpid(), "running"),
                            ("another-machine", gone.pid, "running")]


def test_runs_round_trip(store: Store, clock: Clock) -> None:
    first = store.start_run("acme", "pull")
    clock.tick(minutes=3)
    summary = {"requests": {"google_ads": 3, "meta": 12}, "rows": 5120,
               "errors": ["klaviyo: 429 after 5 retries"]}
    store.finish_run(first, "partial", summary)
    clock.tick(minutes=1)
    second = store.start_run("acme", "push")
    store.start_run("globex", "pull")

    recent = store.recent_runs("acme")
    assert [r.id for r in recent] == [second, first]
    assert (recent[0].status, recent[0].finished_at, recent[0].summary) == (
        "running", None, {"pid": os.getpid(), "host": socket.gethostname()})
    done = recent[1]
    assert (done.command, done.status, done.summary) == ("pull", "partial", summary)
    assert done.started_at == T0
    assert done.finished_at == T0 + dt.timedelta(minutes=3)
    assert done.finished_at is not None and done.finished_at.tzinfo == dt.UTC
    assert len(store.recent_runs(limit=2)) == 2
    with pytest.raises(KeyError):
        store.finish_run(10_000, "ok", {})


def test_count_rows_names_the_tables_on_a_typo(store: Store) -> None:
    with pytest.raises(ValueError, match="daily_stats"):
        store.count_rows("daily_stat")


# ---------------------------------------------------------------- the push side's ledger


def google_upload(key: str, value: float = 10.0, action: str = "6111") -> Upload:
    return Upload(destination=Platform.GOOGLE_ADS, conversion_action=action,
                  account_id="1234567890", conversion="add_to_cart", dedupe_key=key,
                  value=value, currency="USD", time=T0)


def test_a_claim_takes_each_row_once_and_a_killed_runs_rows_come_back_as_resends(
        store: Store) -> None:
    store.plan_uploads([google_upload(f"k{i}") for i in range(5)], client="acme")
    store.plan_uploads([google_upload("other")], client="zeta")
    first = store.claim_uploads("acme", Platform.GOOGLE_ADS, limit=3, now=T0)
    assert [(u.dedupe_key, again) for u, again in first] == [
        ("k0", False), ("k1", False), ("k2", False)]
    store.record_sent("acme", Platform.GOOGLE_ADS, ["k0", "k1"], "req-1", T0)
    # k2 stays "sending", as a run killed before it heard back leaves it
    second = store.claim_uploads("acme", Platform.GOOGLE_ADS, limit=10, now=T0)
    assert [(u.dedupe_key, again) for u, again in second] == [
        ("k2", True), ("k3", False), ("k4", False)]
    store.record_sent("acme", Platform.GOOGLE_ADS, ["k2", "k3", "k4"], "req-2", T0)
    assert store.claim_uploads("acme", Platform.GOOGLE_ADS, limit=10, now=T0) == []
    ledger = {(r["status"], r["uploads"], r["resends"])
              for r in store.ledger("acme", Platform.GOOGLE_ADS)}
    assert ledger == {("sent", 5, 1)}
    assert [r["request_id"] for r in store.upload_request_rows("acme", Platform.GOOGLE_ADS)
            ] == ["req-1", "req-2"]


def test_a_moved_value_is_restated_under_the_same_key_and_each_value_sent_is_kept(
        store: Store, url: str) -> None:
    store.plan_uploads([google_upload("k", 10.0), google_upload("j", 20.0)], client="acme")
    claimed = store.claim_uploads("acme", Platform.GOOGLE_ADS, limit=10, now=T0)
    store.record_sent("acme", Platform.GOOGLE_ADS, [u.dedupe_key for u, _ in claimed], "req-1",
                      T0)
    assert store.restate_uploads(Platform.GOOGLE_ADS, [("k", 10.3), ("j", 30.0)],
                                 threshold=0.05) == 1  # 3% is no move; 50% is
    again = store.claim_uploads("acme", Platform.GOOGLE_ADS, limit=10, now=T0)
    assert [(u.dedupe_key, u.value) for u, _ in again] == [("j", 30.0)]
    store.record_sent("acme", Platform.GOOGLE_ADS, ["j"], "req-2", T0)
    with store.engine.connect() as conn:
        earlier = conn.execute(sa.select(store_module.upload_sends.c.request_id,
                                         store_module.upload_sends.c.value)).all()
        ledger = store_module.uploads
        latest = conn.execute(sa.select(ledger.c.dedupe_key, ledger.c.request_id,
                                        ledger.c.sent_value)).all()
    # every value sent: the earlier sends kept aside, the latest on the row
    assert [(r, float(v)) for r, v in earlier] == [("req-1", 20.0)]
    assert sorted(latest) == [("j", "req-2", 30.0), ("k", "req-1", 10.0)]


def test_held_rows_wait_for_their_time_and_released_ones_say_why(store: Store) -> None:
    store.plan_uploads([google_upload("early"), google_upload("late"), google_upload("bad")],
                       client="acme")
    store.hold_uploads(Platform.GOOGLE_ADS, [("late", T0 + dt.timedelta(hours=6), "too recent")])
    claimed = store.claim_uploads("acme", Platform.GOOGLE_ADS, limit=10, now=T0)
    assert [u.dedupe_key for u, _ in claimed] == ["bad", "early"]  # in key order, as written
    store.release_uploads(Platform.GOOGLE_ADS, ["bad"], UploadStatus.FAILED,
                          "INVALID_CONVERSION_ACTION_TYPE")
    store.release_uploads(Platform.GOOGLE_ADS, ["early"], UploadStatus.PLANNED, "")
    later = store.claim_uploads("acme", Platform.GOOGLE_ADS, limit=10,
                                now=T0 + dt.timedelta(hours=7))
    assert [u.dedupe_key for u, _ in later] == ["early", "late"]
    reasons = {r["reason"] for r in store.ledger("acme", Platform.GOOGLE_ADS)
               if r["status"] == "failed"}
    assert reasons == {"INVALID_CONVERSION_ACTION_TYPE"}


def test_a_request_status_settles_its_uploads_by_action(store: Store) -> None:
    store.plan_uploads([google_upload("a", action="6111"), google_upload("b", action="6108")],
                       client="acme")
    store.claim_uploads("acme", Platform.GOOGLE_ADS, limit=10, now=T0)
    store.record_sent("acme", Platform.GOOGLE_ADS, ["a", "b"], "req", T0)
    assert store.requests_to_check("acme", Platform.GOOGLE_ADS, T0) == []  # 30 minutes first
    later = T0 + dt.timedelta(minutes=31)
    assert store.requests_to_check("acme", Platform.GOOGLE_ADS, later) == [("req", T0)]
    store.record_request_status("req", "done", {"destinations": []}, later, None, {
        "6111": (UploadStatus.ACCEPTED, ""),
        "6108": (UploadStatus.REJECTED, "CLICK_NOT_FOUND 1")})
    assert store.requests_to_check("acme", Platform.GOOGLE_ADS, later) == []
    statuses = {(r["conversion_action"], r["status"], r["reason"])
                for r in store.ledger("acme", Platform.GOOGLE_ADS)}
    assert statuses == {("6111", "accepted", ""), ("6108", "rejected", "CLICK_NOT_FOUND 1")}
