"""The store: everything convsync keeps between runs, on SQLite (default) or PostgreSQL.

SQLAlchemy Core only. The schema is versioned: ``schema_version`` holds one row per applied
migration and ``MIGRATIONS`` is the ordered list of migration functions (``MIGRATIONS[0]``
takes an empty database to version 1). ``Store.open`` applies the pending ones in one
transaction and refuses a database written by a newer convsync.

Hot paths (``upsert_stats``, ``upsert_journey_events``, ``upsert_journey_batches``) run an
INSERT ... ON CONFLICT statement compiled once per store, with rows passed as plain tuples
(see ``_BulkUpsert``): SQLAlchemy's per-row parameter processing would otherwise cost more
than SQLite itself.
"""

from __future__ import annotations

import datetime as dt
import functools
import itertools
import os
import socket
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import msgspec
import sqlalchemy as sa
import tenacity
from pydantic import BaseModel
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Dialect, Engine, make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.schema import SchemaItem
from sqlalchemy.sql.dml import Insert

from convsync.errors import StoreError, StoreVersionError
from convsync.model import (
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

__all__ = [
    "LATEST_VERSION",
    "MIGRATIONS",
    "Run",
    "Store",
    "StoreError",
    "StoreVersionError",
    "Watermark",
]

DEFAULT_BATCH_SIZE = 5000
PLATFORM_NAMES = {Platform.GOOGLE_ADS: "Google", Platform.META: "Meta",
                  Platform.KLAVIYO: "Klaviyo", Platform.GA4: "GA4"}


def refused_by(destination: Platform) -> str:
    """How the reason of an upload the platform refused begins (the push writes it)."""
    return f"refused by {PLATFORM_NAMES[destination]}: "


REFUSED_BY_GOOGLE = refused_by(Platform.GOOGLE_ADS)
SQLITE_CACHE_KIB = 16_384
"""SQLite's page cache per connection: upserts keyed by random ids (Klaviyo event ids) touch a
random page of the key's index per row, and a cache that holds most of the index saves a
read and a write of the page for each."""
_STREAM_CHUNK = 2000
_WRITE = "convsync_write"
"""Execution option marking a connection that will write (SQLite: BEGIN IMMEDIATE)."""


T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


_EPOCH = dt.datetime(1970, 1, 1)
_MINUTE_SECOND_TEXT = tuple(f"{s // 60:02d}:{s % 60:02d}.000000" for s in range(3600))


class UtcDateTime(sa.types.TypeDecorator[dt.datetime]):
    """An aware UTC timestamp on every backend.

    PostgreSQL keeps ``timestamptz``; SQLite has no time zones, so the value is stored as naive
    UTC text and given back its UTC zone on the way out. Naive input is refused.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive timestamp {value!r}: the store only takes aware datetimes")
        utc = value.astimezone(dt.UTC)
        return utc if dialect.name == "postgresql" else utc.replace(tzinfo=None)

    def bind_processor(self, dialect: Dialect) -> Processor | None:
        """On SQLite, straight to SQLAlchemy's DATETIME text (``2026-11-01 12:00:00.000000``):
        the generic chain (this decorator, then DATETIME's own formatting) cost 3.6 us a
        value, more than SQLite's insert of the whole journey row."""
        if dialect.name != "sqlite":
            return super().bind_processor(dialect)

        def process(value: dt.datetime | None) -> str | None:
            if value is None:
                return None
            if value.tzinfo is dt.UTC:  # "...:00.000000+00:00" less its zone
                return value.isoformat(" ", "microseconds")[:-6]
            naive: dt.datetime = self.process_bind_param(value, dialect)
            return naive.isoformat(" ", "microseconds")

        return process

    def seconds_processor(self, dialect: Dialect) -> Processor:
        """Whole POSIX seconds to the bound value. On SQLite straight to the text above,
        from the hour's prefix (kept for the next values) and a table of the rest: 0.2 us a
        value against 1.5 through a datetime and its ``isoformat``."""
        if dialect.name != "sqlite":
            bind = self.bind_processor(dialect) or _unchanged
            return lambda seconds: bind(dt.datetime.fromtimestamp(seconds, dt.UTC))
        hours: dict[int, str] = {}

        def text(seconds: int) -> str:
            hour, rest = divmod(seconds, 3600)
            prefix = hours.get(hour)
            if prefix is None:
                if len(hours) >= 4096:
                    hours.clear()
                prefix = hours[hour] = (_EPOCH + dt.timedelta(hours=hour)).isoformat(" ",
                                                                                     "hours")
            return f"{prefix}:{_MINUTE_SECOND_TEXT[rest]}"

        return text

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        moment: dt.datetime = value
        if moment.tzinfo is None:
            return moment.replace(tzinfo=dt.UTC)
        return moment.astimezone(dt.UTC)


_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_MONEY: sa.Double[float] = sa.Double()
"""Counts and money as double precision, like the model's floats: the platforms report them as
doubles (Google Ads ``conversions``, fractional under data-driven attribution, and
``conversions_value``) or as decimal strings parsed to float (Meta), so Numeric would add a
conversion per value without adding exactness the data never had."""

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

IDENTIFIER_COLUMNS = tuple(Identifiers.model_fields)
"""Identifier columns of uploads (and of journey_events before schema version 2); the hashed
ones must be SHA-256 hex."""
_HASHED = ("email_sha256_google", "email_sha256_meta", "phone_sha256_google",
           "phone_sha256_meta")


def _sha256_hex_check(column: str) -> sa.CheckConstraint:
    """NULL or 64 characters with no ``@`` and no ``+``: a raw email or an E.164 phone can
    never land in the column, whatever writes to the database.

    The model already holds these fields to 64 lower-case hex digits; a full hex check here
    (16 nested replace() calls, the only form both SQLite and PostgreSQL read) cost about
    5 us a column a row, more than the rest of the insert."""
    sql = (f"{column} IS NULL OR (length({column}) = 64 AND {column} NOT LIKE '%@%' "
           f"AND {column} NOT LIKE '%+%')")
    return sa.CheckConstraint(sql, name=f"{column}_hex")


def _identifier_columns() -> list[SchemaItem]:
    columns: list[SchemaItem] = [sa.Column(name, sa.String) for name in IDENTIFIER_COLUMNS]
    return columns + [_sha256_hex_check(name) for name in _HASHED]


schema_version = sa.Table(
    "schema_version",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("applied_at", UtcDateTime, nullable=False),
)

conversion_definitions = sa.Table(
    "conversion_definitions",
    metadata,
    sa.Column("client", sa.String, primary_key=True),
    sa.Column("name", sa.String, primary_key=True),
    sa.Column("kind", sa.String(8), nullable=False),
    sa.Column("ladder_position", sa.Integer),
    sa.Column("updated_at", UtcDateTime, nullable=False),
    sa.CheckConstraint("kind IN ('macro', 'micro')", name="kind"),
)

conversion_platform_names = sa.Table(
    "conversion_platform_names",
    metadata,
    sa.Column("client", sa.String, primary_key=True),
    sa.Column("name", sa.String, primary_key=True),
    sa.Column("platform", sa.String(16), primary_key=True),
    sa.Column("platform_name", sa.String, primary_key=True),
    sa.Column("position", sa.Integer, nullable=False),
    sa.ForeignKeyConstraint(
        ["client", "name"],
        [conversion_definitions.c.client, conversion_definitions.c.name],
        ondelete="CASCADE",
    ),
    sa.Index(None, "platform", "platform_name"),
)

platform_conversions = sa.Table(
    "platform_conversions",
    metadata,
    sa.Column("platform", sa.String(16), primary_key=True),
    sa.Column("account_id", sa.String, primary_key=True),
    sa.Column("platform_id", sa.String, primary_key=True),
    sa.Column("name", sa.String, nullable=False),
    sa.Column("settings", _JSON, nullable=False),
    sa.Column("conversion", sa.String),
    sa.Column("kind", sa.String(8)),
    sa.Column("in_column", sa.Boolean),
    sa.Column("last_seen", UtcDateTime, nullable=False),
    sa.Index(None, "platform", "name"),
)

STATS_KEY = (
    "platform", "account_id", "date", "campaign_id", "platform_conversion", "basis",
    "attribution_window", "source", "medium",
)
"""A cell's natural key. ``source`` and ``medium`` (GA4's session source and medium, '' on
the other platforms) came with schema version 3, last so that (platform, account_id, date)
stays the key's prefix."""


def _daily_stats_columns(*, sourced: bool) -> list[SchemaItem]:
    """daily_stats' columns; ``sourced``: with GA4's session source and medium in the key and
    its key-event count, as schema version 3 made them."""
    key: list[SchemaItem] = [
        sa.Column("platform", sa.String(16), primary_key=True),
        sa.Column("account_id", sa.String, primary_key=True),
        sa.Column("date", sa.Date, primary_key=True),
        sa.Column("campaign_id", sa.String, primary_key=True),
        sa.Column("platform_conversion", sa.String, primary_key=True),
        sa.Column("basis", sa.String(16), primary_key=True),
        sa.Column("attribution_window", sa.String(16), primary_key=True),
    ]
    figures: list[SchemaItem] = [
        sa.Column("count", _MONEY, nullable=False),
        sa.Column("value", _MONEY, nullable=False),
    ]
    if sourced:
        key += [sa.Column(name, sa.String, primary_key=True, server_default="")
                for name in ("source", "medium")]
        figures.append(sa.Column("key_events", _MONEY))
    return [
        *key,
        sa.Column("timezone", sa.String, nullable=False),
        sa.Column("campaign_name", sa.String, nullable=False),
        sa.Column("conversion", sa.String),
        sa.Column("kind", sa.String(8)),
        *figures,
        sa.Column("currency", sa.String, nullable=False),
        sa.Column("in_column", sa.Boolean),
        sa.Column("updated_at", UtcDateTime, nullable=False),
        sa.Index(None, "date"),
    ]


daily_stats = sa.Table("daily_stats", metadata, *_daily_stats_columns(sourced=True))


def _daily_stats_v1() -> sa.Table:
    """daily_stats as schema versions 1 and 2 had it: no source, medium or key events."""
    frozen = sa.MetaData(naming_convention=metadata.naming_convention)
    return sa.Table("daily_stats", frozen, *_daily_stats_columns(sourced=False))


JOURNEY_KEY = ("time", "source_platform", "source_event_id")
"""An event is its source, its id and its time, time first: rows then arrive in key order
(sources yield them by time), so an insert appends to the key's index instead of touching a
random page of it, which cost 15 - 20 us a row once the index outgrew the page cache (Klaviyo
event ids are random). The platforms never move an event in time under the same id, except a
CRM file's own ``event_id`` (a corrected time): ``upsert_journey_events`` deletes the old
version of those, through ``ix_journey_events_crm_event_id``."""
MOVABLE_SOURCE = Platform.CRM
"""The one source whose event can come back with another time under the same id."""


def _journey_event_columns(identifiers: list[SchemaItem]) -> list[SchemaItem]:
    return [
        sa.Column("source_platform", sa.String(16), nullable=False),
        sa.Column("source_event_id", sa.String, nullable=False),
        sa.Column("person_key", sa.String, nullable=False),
        sa.Column("conversion", sa.String),
        sa.Column("platform_conversion", sa.String, nullable=False),
        sa.Column("time", UtcDateTime, nullable=False),
        sa.Column("value", _MONEY, nullable=False),
        sa.Column("currency", sa.String, nullable=False),
        sa.Column("campaign_id", sa.String, nullable=False),
        *identifiers,
        sa.Column("updated_at", UtcDateTime, nullable=False),
    ]


def _identifiers_json_column() -> list[SchemaItem]:
    """The event's ``Identifiers`` as one JSON object (null fields left out), not ten columns:
    a Klaviyo pull stores millions of rows and SQLite's insert cost grows with each column
    bound (20 columns 7.2 us a row, 11 columns 3.2). The guard: no ``@`` anywhere (no raw
    email) and no hashed-phone field starting with ``+`` (no raw E.164 number); the model
    holds the hashes to 64 hex digits before that."""
    return [sa.Column("identifiers", sa.Text, nullable=False),
            sa.CheckConstraint("identifiers NOT LIKE '%@%' AND "
                               "identifiers NOT LIKE '%\"phone_sha256_%\":\"+%'",
                               name="identifiers_hashed")]


_MOVABLE = sa.text(f"source_platform = '{MOVABLE_SOURCE.value}'")
journey_events = sa.Table(
    "journey_events",
    metadata,
    *_journey_event_columns(_identifiers_json_column()),
    # no (person_key, time) index: it cost a random page per inserted row, and the valuation
    # reads whole time ranges and groups people itself
    sa.PrimaryKeyConstraint(*JOURNEY_KEY),
    sa.Index("ix_journey_events_crm_event_id", "source_event_id", sqlite_where=_MOVABLE,
             postgresql_where=_MOVABLE),
)


def _journey_events_v1() -> sa.Table:
    """journey_events as schema version 1 made it: keyed by (source_platform,
    source_event_id), with an index on time."""
    frozen = sa.MetaData(naming_convention=metadata.naming_convention)
    return sa.Table("journey_events", frozen, *_journey_event_columns(_identifier_columns()),
                    sa.PrimaryKeyConstraint("source_platform", "source_event_id"),
                    sa.Index(None, "time"))


def _uploads_v1() -> sa.Table:
    """The upload ledger as schema version 1 made it (migration 4 replaced it)."""
    frozen = sa.MetaData(naming_convention=metadata.naming_convention)
    return sa.Table(
        "uploads", frozen,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("destination", sa.String(16), nullable=False),
        sa.Column("conversion_action", sa.String, nullable=False),
        sa.Column("dedupe_key", sa.String, nullable=False),
        sa.Column("value", _MONEY, nullable=False),
        sa.Column("currency", sa.String, nullable=False),
        sa.Column("time", UtcDateTime, nullable=False),
        *_identifier_columns(),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("response", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("updated_at", UtcDateTime, nullable=False),
        sa.UniqueConstraint("destination", "dedupe_key"),
        sa.Index(None, "destination", "status"),
    )


def _upload_state_columns() -> list[SchemaItem]:
    """The columns a push moves (each with a default: a new row is written without them)."""
    return [
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.String, nullable=False, server_default=""),
        sa.Column("hold_until", UtcDateTime),
        sa.Column("request_id", sa.String),
        sa.Column("sent_value", _MONEY),
        sa.Column("sent_at", UtcDateTime),
        sa.Column("response", sa.Text, nullable=False, server_default=""),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("resends", sa.Integer, nullable=False, server_default="0"),
    ]


def _upload_columns(identifiers: list[SchemaItem]) -> list[SchemaItem]:
    return [
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("client", sa.String, nullable=False),
        sa.Column("destination", sa.String(16), nullable=False),
        sa.Column("account_id", sa.String, nullable=False),
        sa.Column("conversion_action", sa.String, nullable=False),
        sa.Column("conversion", sa.String, nullable=False),
        sa.Column("dedupe_key", sa.String, nullable=False),
        sa.Column("value", _MONEY, nullable=False),
        sa.Column("currency", sa.String, nullable=False),
        sa.Column("time", UtcDateTime, nullable=False),
        *identifiers,
        *_upload_state_columns(),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("updated_at", UtcDateTime, nullable=False),
        sa.UniqueConstraint("destination", "dedupe_key"),
    ]


def _uploads_v4() -> sa.Table:
    """The upload ledger as schema version 4 made it: an identifier a column."""
    frozen = sa.MetaData(naming_convention=metadata.naming_convention)
    return sa.Table("uploads", frozen, *_upload_columns(_identifier_columns()),
                    sa.Index(None, "client", "destination", "status"),
                    sa.Index(None, "request_id"))


_SENT = sa.text("request_id IS NOT NULL")
uploads = sa.Table(
    "uploads",
    metadata,
    *_upload_columns(_identifiers_json_column()),
    # the status index ends with the id: a push takes the next rows of a status, in id order,
    # straight from it; a row not sent yet is not in the request index
    sa.Index(None, "client", "destination", "status", "id"),
    sa.Index(None, "request_id", sqlite_where=_SENT, postgresql_where=_SENT),
)
"""The upload ledger: one row per event to send (its dedupe key is the platform's), written
before anything is sent. ``status`` moves planned -> sending (claimed for a request) -> sent
(``request_id``) -> accepted / rejected, or held (``hold_until``: too recent for the
platform) / failed (``reason``); ``sent_value`` is the value last sent, ``resends`` counts
the sends of events that may already have arrived. ``identifiers`` as journey_events keeps
them (one JSON object): a ledger row costs a third as much to write as with a column each."""

upload_requests = sa.Table(
    "upload_requests",
    metadata,
    sa.Column("request_id", sa.String, primary_key=True),
    sa.Column("client", sa.String, nullable=False),
    sa.Column("destination", sa.String(16), nullable=False),
    sa.Column("sent_at", UtcDateTime, nullable=False),
    sa.Column("events", sa.Integer, nullable=False),
    sa.Column("status", sa.String(24), nullable=False),
    sa.Column("detail", _JSON, nullable=False),
    sa.Column("checked_at", UtcDateTime),
    sa.Column("next_check_at", UtcDateTime),
    sa.Column("checks", sa.Integer, nullable=False),
    sa.Index(None, "client", "destination", "status"),
)
"""One row per request a platform took, with what it later said it did (``detail``: per
destination its status and error counts by reason)."""

upload_sends = sa.Table(
    "upload_sends",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("upload_id", sa.Integer, sa.ForeignKey("uploads.id"), nullable=False),
    sa.Column("request_id", sa.String, nullable=False),
    sa.Column("value", _MONEY, nullable=False),
    sa.Column("sent_at", UtcDateTime, nullable=False),
    sa.Index(None, "upload_id"),
)
"""Every earlier send of each upload (its latest is on its row): a restatement is the same
dedupe key again, with another value."""

quota_calls = sa.Table(
    "quota_calls",
    metadata,
    sa.Column("project", sa.String, primary_key=True),
    sa.Column("api", sa.String(48), primary_key=True),
    sa.Column("second", UtcDateTime, primary_key=True),
    sa.Column("calls", sa.Integer, nullable=False),
)
"""API calls made per second against a quota that belongs to a Cloud project (the Data
Manager's 300 requests a minute and 100,000 a day, for writes and again for reads; the Google
Ads operations of the project's daily budget), counted across every client and run that uses
the project, as the calls are made."""

watermarks = sa.Table(
    "watermarks",
    metadata,
    sa.Column("client", sa.String, primary_key=True),
    sa.Column("platform", sa.String(16), primary_key=True),
    sa.Column("account_id", sa.String, primary_key=True),
    sa.Column("stream", sa.String, primary_key=True),
    sa.Column("last_complete_date", sa.Date),
    sa.Column("cursor", sa.String),
    sa.Column("updated_at", UtcDateTime, nullable=False),
)

runs = sa.Table(
    "runs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("client", sa.String, nullable=False),
    sa.Column("command", sa.String, nullable=False),
    sa.Column("started_at", UtcDateTime, nullable=False),
    sa.Column("finished_at", UtcDateTime),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("summary", _JSON, nullable=False),
    sa.Index(None, "client", "started_at"),
)

micro_values = sa.Table(
    "micro_values",
    metadata,
    sa.Column("client", sa.String, primary_key=True),
    sa.Column("computed_on", sa.Date, primary_key=True),
    sa.Column("conversion", sa.String, primary_key=True),
    sa.Column("segment", sa.String, primary_key=True),
    sa.Column("value", _MONEY),
    sa.Column("recommendation", sa.String(24), nullable=False),
    sa.Column("detail", _JSON, nullable=False),
    sa.Column("computed_at", UtcDateTime, nullable=False),
)
"""What each micro conversion was worth as computed on a day: kept, so that a later run can
restate the uploads made with an earlier value. ``value`` is the upload value (what one event
uploads, NULL: nothing); ``detail`` holds every figure of the row."""

DATA_TABLES = (
    conversion_definitions, conversion_platform_names, platform_conversions, daily_stats,
    journey_events, uploads, watermarks, runs, micro_values, upload_requests, upload_sends,
    quota_calls,
)


def _migrate_to_v1(conn: Connection) -> None:
    """Create every table.

    This builds the *current* definitions above, except for the tables a later migration
    changed, which are frozen in their version 1 shape, so that v1 + v2 + ... always equals
    the code."""
    later = (journey_events, daily_stats, uploads, upload_requests, upload_sends, quota_calls)
    metadata.create_all(conn, tables=[t for t in DATA_TABLES if t not in later])
    _journey_events_v1().create(conn)
    _daily_stats_v1().create(conn)
    _uploads_v1().create(conn)


def _set_aside(conn: Connection, table: str, version: str, index: str) -> None:
    """Rename ``table`` to ``<table>_<version>`` so that its new shape can take the name:
    its secondary index is dropped and, on PostgreSQL (where index names are per schema),
    its primary key renamed."""
    conn.execute(sa.text(f"DROP INDEX {index}"))
    conn.execute(sa.text(f"ALTER TABLE {table} RENAME TO {table}_{version}"))
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text(f"ALTER TABLE {table}_{version} RENAME CONSTRAINT "
                             f"pk_{table} TO pk_{table}_{version}"))


def _migrate_to_v2(conn: Connection) -> None:
    """Key journey_events by (time, source_platform, source_event_id) (see ``JOURNEY_KEY``)
    and keep each event's identifiers as one JSON column: the rows move to a new table, a
    chunk at a time, and the old one is dropped."""
    _set_aside(conn, "journey_events", "v1", index="ix_journey_events_time")
    journey_events.create(conn)
    old = _journey_events_v1().to_metadata(sa.MetaData(), name="journey_events_v1")
    key = (old.c.source_platform, old.c.source_event_id)
    query = sa.select(old).order_by(*key).limit(_STREAM_CHUNK)
    after: tuple[Any, ...] | None = None
    while rows := conn.execute(query if after is None else
                               query.where(sa.tuple_(*key) > sa.tuple_(*after))).all():
        conn.execute(journey_events.insert(),
                     [_with_identifiers_json(row._mapping) for row in rows])
        after = (rows[-1].source_platform, rows[-1].source_event_id)
    old.drop(conn)


def _with_identifiers_json(row: sa.RowMapping) -> dict[str, Any]:
    """A row whose identifiers are columns, with them as one JSON column instead."""
    identifiers = Identifiers.model_validate({name: row[name] for name in IDENTIFIER_COLUMNS})
    kept = {name: value for name, value in row.items() if name not in IDENTIFIER_COLUMNS}
    return kept | {"identifiers": _identifiers_json(identifiers)}


def _migrate_to_v3(conn: Connection) -> None:
    """Add GA4's session source and medium to daily_stats' key, and its key-event count: the
    rows move to a new table with source = medium = '' and no key-event count, and the old
    one is dropped. GA4 cells kept this way are replaced day by day as GA4 is pulled again
    (see ``Store.upsert_stats``)."""
    _set_aside(conn, "daily_stats", "v2", index="ix_daily_stats_date")
    daily_stats.create(conn)
    old = _daily_stats_v1().to_metadata(sa.MetaData(), name="daily_stats_v2")
    copied = [old.c[c.name] for c in daily_stats.c if c.name in old.c]
    conn.execute(daily_stats.insert().from_select(
        [*(c.name for c in copied), "source", "medium", "key_events"],
        sa.select(*copied, sa.literal(""), sa.literal(""), sa.null())))
    old.drop(conn)


def _migrate_to_v4(conn: Connection) -> None:
    """The upload ledger of the push side: uploads gain their client, account, conversion and
    the send's states (reason, hold, request, value sent, resends); every request and every
    value sent get a table of their own. Earlier rows (no push existed) move over as they are,
    for the client ''."""
    _set_aside(conn, "uploads", "v3", index="ix_uploads_destination_status")
    if conn.dialect.name == "postgresql":  # names PostgreSQL keeps per schema, not per table
        conn.execute(sa.text("ALTER TABLE uploads_v3 RENAME CONSTRAINT "
                             "uq_uploads_destination_dedupe_key TO uq_uploads_v3_key"))
        conn.execute(sa.text("ALTER SEQUENCE uploads_id_seq RENAME TO uploads_v3_id_seq"))
    new = _uploads_v4()
    new.create(conn)
    old = _uploads_v1().to_metadata(sa.MetaData(), name="uploads_v3")
    kept = [c.name for c in old.c if c.name in new.c]
    conn.execute(new.insert().from_select(
        [*kept, "client", "account_id", "conversion", "reason", "resends"],
        sa.select(*(old.c[name] for name in kept), sa.literal(""), sa.literal(""),
                  sa.literal(""), sa.literal(""), sa.literal(0))))
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT setval('uploads_id_seq', "
                             "(SELECT COALESCE(MAX(id), 0) + 1 FROM uploads), false)"))
    old.drop(conn)
    upload_requests.create(conn)
    upload_sends.create(conn)


def _migrate_to_v5(conn: Connection) -> None:
    """Keep each upload's identifiers as one JSON column (as journey_events does) and let
    the status index end with the row id; index only the rows sent in a request. The
    uploads and the values they were sent with move to the new tables, their ids kept.
    Count the calls made against a Cloud project's quotas (``quota_calls``)."""
    pg = conn.dialect.name == "postgresql"
    conn.execute(sa.text("DROP INDEX ix_uploads_request_id"))
    _set_aside(conn, "uploads", "v4", index="ix_uploads_client_destination_status")
    _set_aside(conn, "upload_sends", "v4", index="ix_upload_sends_upload_id")
    if pg:  # names PostgreSQL keeps per schema, not per table
        conn.execute(sa.text("ALTER TABLE uploads_v4 RENAME CONSTRAINT "
                             "uq_uploads_destination_dedupe_key TO uq_uploads_v4_key"))
        conn.execute(sa.text("ALTER TABLE upload_sends_v4 RENAME CONSTRAINT "
                             "fk_upload_sends_upload_id_uploads TO fk_upload_sends_v4_upload"))
        for table in ("uploads", "upload_sends"):
            conn.execute(sa.text(f"ALTER SEQUENCE {table}_id_seq RENAME TO {table}_v4_id_seq"))
    uploads.create(conn)
    upload_sends.create(conn)
    old = _uploads_v4().to_metadata(sa.MetaData(), name="uploads_v4")
    query = sa.select(old).order_by(old.c.id).limit(_STREAM_CHUNK)
    after = 0
    while rows := conn.execute(query.where(old.c.id > after)).all():
        conn.execute(uploads.insert(), [_with_identifiers_json(row._mapping) for row in rows])
        after = rows[-1].id
    sends = upload_sends.to_metadata(sa.MetaData(), name="upload_sends_v4")
    conn.execute(upload_sends.insert().from_select(
        [c.name for c in upload_sends.c], sa.select(*sends.c)))
    if pg:
        for table in ("uploads", "upload_sends"):
            conn.execute(sa.text(f"SELECT setval('{table}_id_seq', "
                                 f"(SELECT COALESCE(MAX(id), 0) + 1 FROM {table}), false)"))
    conn.execute(sa.text("DROP TABLE upload_sends_v4"))
    conn.execute(sa.text("DROP TABLE uploads_v4"))
    quota_calls.create(conn)


Migration = Callable[[Connection], None]
MIGRATIONS: tuple[Migration, ...] = (_migrate_to_v1, _migrate_to_v2, _migrate_to_v3,
                                     _migrate_to_v4, _migrate_to_v5)
"""MIGRATIONS[n] takes the schema from version n to version n + 1."""
LATEST_VERSION = len(MIGRATIONS)


@dataclass(frozen=True)
class Watermark:
    """How far one stream of one account is known to be complete."""

    client: str
    platform: Platform
    account_id: str
    stream: str
    last_complete_date: dt.date | None
    cursor: str | None
    updated_at: dt.datetime


@dataclass(frozen=True)
class Run:
    id: int
    client: str
    command: str
    started_at: dt.datetime
    finished_at: dt.datetime | None
    status: str
    summary: Mapping[str, Any]


Values = tuple[Any, ...]
Processor = Callable[[Any], Any]


def _unchanged(value: Any) -> Any:
    return value


class _BulkUpsert:
    """An INSERT ... ON CONFLICT compiled once for one dialect and run with executemany.

    Rows are plain tuples in table column order (or in the order of ``columns``, a subset),
    so SQLAlchemy's per-row parameter processing (a dict per row, then a bind processor call
    per value) is skipped. The row builder still
    applies each column type's own bind conversion (DATE as text on SQLite, aware UTC
    timestamps, ...) through ``processor(column)``; ``converted`` names the columns it does
    that for, and a column type needing a conversion the builder would skip is refused here.
    """

    def __init__(self, stmt: Insert, dialect: Dialect, converted: Collection[str],
                 columns: Sequence[str] | None = None) -> None:
        table = stmt.table
        assert isinstance(table, sa.Table)
        columns = list(columns or (c.name for c in table.c))
        compiled = stmt.compile(dialect=dialect, column_keys=columns)
        assert not compiled.positional or list(compiled.positiontup or ()) == columns
        self.sql = str(compiled)
        self._names = None if compiled.positional else columns
        self._processors = {
            name: processor for name in columns
            if (processor := table.c[name].type.dialect_impl(dialect).bind_processor(dialect))
        }
        unconverted = set(self._processors) - set(converted)
        if unconverted:
            raise TypeError(f"{table.name}: the row builder skips the {dialect.name} bind "
                            f"conversion of {sorted(unconverted)}")

    def processor(self, column: str) -> Processor:
        return self._processors.get(column, _unchanged)

    def execute(self, conn: Connection, rows: list[Values]) -> int:
        """Run the statement for ``rows``; the rows it wrote, as the driver counts them."""
        if self._names is None:
            return conn.exec_driver_sql(self.sql, rows).rowcount
        names = self._names
        return conn.exec_driver_sql(
            self.sql, [dict(zip(names, row, strict=True)) for row in rows]).rowcount


def _upsert_insert(dialect: Dialect, table: sa.Table, key: Sequence[str]) -> Insert:
    """INSERT ... ON CONFLICT (key) DO UPDATE every other column to the new values."""
    insert = sqlite.insert if dialect.name == "sqlite" else postgresql.insert
    stmt = insert(table)
    updates = {c.name: stmt.excluded[c.name] for c in table.c if c.name not in key}
    return stmt.on_conflict_do_update(index_elements=list(key), set_=updates)


def _insert_new_only(dialect: Dialect, table: sa.Table, key: Sequence[str]) -> Insert:
    insert = sqlite.insert if dialect.name == "sqlite" else postgresql.insert
    return insert(table).on_conflict_do_nothing(index_elements=list(key))


# Row builders. Enum members go to the driver as they are: they are str subclasses, which
# sqlite3 and psycopg bind as their value, and skipping ``.value`` saves a descriptor call each.

_STATS_CONVERTED = ("date", "count", "value", "key_events", "in_column", "updated_at")
"""Columns whose bind conversion the daily_stats row builder (or upsert_stats) applies."""


def _stat_row_builder(upsert: _BulkUpsert) -> Callable[[ConversionStat, Any], Values]:
    """ConversionStat -> daily_stats row; ``now`` comes already converted.

    Dates and flags repeat across rows, so their (pure) conversions are memoized."""
    date, in_column = (functools.lru_cache(maxsize=4096)(upsert.processor(column))
                       for column in ("date", "in_column"))
    count, value, key_events = (upsert.processor(column)
                                for column in ("count", "value", "key_events"))

    def row(s: ConversionStat, now: Any) -> Values:
        return (s.platform, s.account_id, date(s.date), s.campaign_id, s.platform_conversion,
                s.basis, s.window, s.source, s.medium, s.timezone, s.campaign_name,
                s.conversion, s.kind, count(s.count), value(s.value), key_events(s.key_events),
                s.currency, in_column(s.in_column), now)

    return row


_JSON_ENCODE = msgspec.json.Encoder().encode


def _identifiers_json(identifiers: Identifiers | IdentifierFields) -> str:
    """journey_events.identifiers: the fields that are set, as JSON (msgspec writes it in
    half the time pydantic's ``model_dump_json`` takes)."""
    fields = identifiers if isinstance(identifiers, dict) else {
        k: v for k, v in identifiers.__dict__.items() if v is not None}
    return _JSON_ENCODE(fields).decode()

_JOURNEY_CONVERTED = ("time", "value", "updated_at")
"""Columns whose bind conversion the journey_events row builder (or upsert_journey_events)
applies."""


class _JourneyRows:
    """journey_events rows from JourneyEvents and JourneyBatches; ``now`` comes converted.

    The events of one visit share one Identifiers object, or one dict in a batch (the sources
    build one per person and click), so its JSON is kept for the next rows (by identity, at
    most 4,096)."""

    def __init__(self, upsert: _BulkUpsert, dialect: Dialect) -> None:
        self._time, self._value = upsert.processor("time"), upsert.processor("value")
        self._seconds = UtcDateTime().seconds_processor(dialect)
        self._recent: dict[int, tuple[Identifiers | IdentifierFields, str]] = {}

    def identifiers_json(self, identifiers: Identifiers | IdentifierFields) -> str:
        hit = self._recent.get(id(identifiers))
        if hit is not None and hit[0] is identifiers:
            return hit[1]
        if len(self._recent) >= 4096:
            self._recent.clear()
        text = _identifiers_json(identifiers)
        self._recent[id(identifiers)] = (identifiers, text)
        return text

    def row(self, e: JourneyEvent, now: Any) -> Values:
        return (e.source_platform, e.source_event_id, e.person_key, e.conversion,
                e.platform_conversion, self._time(e.time), self._value(e.value), e.currency,
                e.campaign_id, self.identifiers_json(e.identifiers), now)

    def batch_rows(self, batch: JourneyBatch, now: Any) -> Iterator[Values]:
        """The batch's rows, put together column by column in C (``zip``, ``map``)."""
        n, value = len(batch), self._value
        return zip(itertools.repeat(batch.source_platform, n), batch.source_event_ids,
                   batch.person_keys, itertools.repeat(batch.conversion, n),
                   itertools.repeat(batch.platform_conversion, n),
                   map(self._seconds, batch.times),
                   batch.values if value is _unchanged else map(value, batch.values),
                   batch.currencies, batch.campaign_ids,
                   map(self.identifiers_json, batch.identifiers), itertools.repeat(now, n),
                   strict=True)




class _Reader(Generic[M]):
    """Selects a model's fields and builds the model from each row by position, which is
    much cheaper than named access on every row."""

    def __init__(self, model: type[M], table: sa.Table,
                 renamed: Mapping[str, str] | None = None) -> None:
        self._model = model
        self._fields = tuple(model.model_fields)
        self.columns = [table.c[(renamed or {}).get(name, name)] for name in self._fields]

    def __call__(self, row: sa.Row[Any] | Values) -> M:
        return self._model.model_validate(dict(zip(self._fields, row, strict=True)))


_DELETE_MOVED = sa.delete(journey_events).where(
    _MOVABLE, journey_events.c.source_event_id == sa.bindparam("id"),
    journey_events.c.time != sa.bindparam("time", type_=UtcDateTime))
"""Older versions (another time) of CRM events about to be stored."""


def _moved_events(chunk: list[JourneyEvent]) -> tuple[list[JourneyEvent], list[dict[str, Any]]]:
    """The CRM events of a batch, the later row of an id given twice, replace their stored
    versions at another time."""
    latest = {e.source_event_id: e for e in chunk if e.source_platform == MOVABLE_SOURCE}
    if not latest:
        return chunk, []
    kept = [e for e in chunk
            if e.source_platform != MOVABLE_SOURCE or latest[e.source_event_id] is e]
    return kept, [{"id": e.source_event_id, "time": e.time} for e in latest.values()]

_DELETE_UNSOURCED = sa.delete(daily_stats).where(
    daily_stats.c.platform == sa.bindparam("b_platform"),
    daily_stats.c.account_id == sa.bindparam("b_account"),
    daily_stats.c.date == sa.bindparam("b_date"),
    daily_stats.c.source == "", daily_stats.c.medium == "")
"""A day's cells stored without source and medium (GA4 before schema version 3)."""


def _unsourced_days(chunk: list[ConversionStat]) -> tuple[list[ConversionStat],
                                                          list[dict[str, Any]]]:
    """Cells with a source or medium replace their day's cells stored without either."""
    days = {(s.platform, s.account_id, s.date) for s in chunk if s.source or s.medium}
    return chunk, [{"b_platform": p, "b_account": a, "b_date": d} for p, a, d in days]

_read_stat = _Reader(ConversionStat, daily_stats, {"window": "attribution_window"})


class _JourneyReader:
    """journey_events rows back into JourneyEvents (identifiers validated again)."""

    fields = tuple(name for name in JourneyEvent._fields if name != "identifiers")
    columns = tuple(journey_events.c[name] for name in (*fields, "identifiers"))

    def __call__(self, row: sa.Row[Any]) -> JourneyEvent:
        return JourneyEvent(**dict(zip(self.fields, row, strict=False)),
                            identifiers=Identifiers.model_validate_json(row[-1]))


_read_journey_event = _JourneyReader()


class _UploadReader:
    """uploads rows back into Uploads."""

    fields = ("destination", "conversion_action", "dedupe_key", "value", "currency", "time",
              "account_id", "conversion", "status", "response")
    columns = tuple(uploads.c[name] for name in (*fields, "identifiers"))

    def __call__(self, row: Sequence[Any]) -> Upload:
        (destination, action, key, value, currency, time, account, conversion, status,
         response, identifiers) = row
        return Upload(Platform(destination), action, key, value, currency, time, account,
                      conversion, Identifiers.model_validate_json(identifiers),
                      UploadStatus(status), response)


_read_upload = _UploadReader()


class _PlanningReader:
    """Rows of ``Store.planning_events`` as the driver gives them into events, built by
    position (the columns are selected in ``JourneyEvent``'s order). SQLite gives times as
    the naive UTC text ``UtcDateTime`` stores. Rows come by person, and a person's events
    mostly share their identifiers: the last ones read are used again."""

    columns = tuple(journey_events.c[name] for name in JourneyEvent._fields)

    def __init__(self, dialect: str) -> None:
        self._last: tuple[str, Identifiers] = ("", Identifiers())
        self.time = _sqlite_time if dialect == "sqlite" else _utc

    def __call__(self, row: Sequence[Any]) -> JourneyEvent:
        (person, conversion, name, time, source, event_id, value, currency, text,
         campaign) = row
        if text != self._last[0]:
            self._last = (text, Identifiers.model_validate_json(text))
        return JourneyEvent(person, conversion, name, self.time(time), source, event_id,
                            value, currency, self._last[1], campaign)


def _sqlite_time(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC)


def _utc(moment: dt.datetime) -> dt.datetime:
    return moment.astimezone(dt.UTC)




_UPLOAD_COLUMNS = ("client", "destination", "account_id", "conversion_action", "conversion",
                   "dedupe_key", "value", "currency", "time", "identifiers", "status",
                   "created_at", "updated_at")
"""The columns a new ledger row is written with (the rest take their defaults)."""


def _upload_row_builder(insert: _BulkUpsert) -> Callable[[Upload, str, Any], Values]:
    """Upload -> a new ledger row in ``_UPLOAD_COLUMNS`` order; ``now`` comes converted."""
    time, value = insert.processor("time"), insert.processor("value")

    def row(u: Upload, client: str, now: Any) -> Values:
        return (client, u.destination, u.account_id, u.conversion_action, u.conversion,
                u.dedupe_key, value(u.value), u.currency, time(u.time),
                _identifiers_json(u.identifiers), u.status, now, now)

    return row


def _among(column: sa.ColumnElement[Any], values: Sequence[Any],
           dialect: str) -> sa.ColumnElement[bool]:
    """``column IN values`` for thousands of values, bound as one parameter (a JSON array on
    SQLite, an array on PostgreSQL): SQLAlchemy's own IN binds and renders each value, which
    cost more than the query."""
    if dialect == "postgresql":
        array = postgresql.ARRAY(column.type)
        return column == sa.any_(sa.bindparam(None, list(values), type_=array))
    listed = sa.func.json_each(sa.bindparam(None, _JSON_ENCODE(list(values)).decode(),
                                            type_=sa.Text)).table_valued("value")
    return column.in_(sa.select(listed.c.value))


def _by_key(upload: Upload) -> str:
    return upload.dedupe_key


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    if size < 1:
        raise ValueError(f"batch_size must be at least 1, not {size}")
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _unusable(url: str, error: sa.exc.DBAPIError) -> str:
    """One line on a store that cannot be opened: which, why in words, what to do."""
    said = str(error.orig).lower()
    if "not a database" in said:
        why = ("is not a SQLite database (corrupt, or another file): move it aside and "
               "pull again, or point client.store_url at the right file")
    elif "readonly" in said or "unable to open" in said or "permission" in said:
        why = "cannot be written: check the file's and its folder's permissions"
    elif "connection" in said or "could not translate host" in said:
        why = ("does not answer: is the PostgreSQL server running, and are the host, port, "
               "user and database of client.store_url right?")
    elif "does not exist" in said:
        why = "names a database that does not exist: create it (createdb) or fix the URL"
    else:
        why = f"cannot be used ({type(error.orig).__name__})"
    return f"the store {url} {why}"


def _process_alive(pid: int) -> bool:
    """Whether a process of this machine with this id still runs."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _private_file(path: Path) -> None:
    """Create the store's file (and the folders to it) readable by its owner only: it holds
    hashed emails and the ledger (SQLite gives its -wal and -shm files the same mode)."""
    if path.is_dir():
        raise StoreError(f"the store {path} is a directory: point client.store_url at a file "
                         "in it, such as sqlite:///" + str(path / "convsync.db"))
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))


def _engine_for(url: str, busy_timeout_ms: int) -> Engine:
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            _private_file(Path(parsed.database).expanduser())
        engine = sa.create_engine(parsed)
        _configure_sqlite(engine, busy_timeout_ms)
        return engine
    if backend == "postgresql":
        if parsed.get_driver_name() != "psycopg":
            parsed = parsed.set(drivername="postgresql+psycopg")
        return sa.create_engine(parsed, pool_pre_ping=True)
    raise StoreError(
        f"unsupported database URL {parsed.render_as_string(hide_password=True)!r}: "
        "use sqlite:///path/to/file.db or postgresql+psycopg://user@host/db"
    )


def _switch_to_wal(cursor: Any) -> None:
    if cursor.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        cursor.execute("PRAGMA journal_mode = WAL")


def _configure_sqlite(engine: Engine, busy_timeout_ms: int) -> None:
    """WAL, foreign keys, a busy timeout, and real transactions (DDL included).

    pysqlite only opens a transaction before DML on its own, so it is switched to autocommit
    and convsync emits BEGIN itself: IMMEDIATE for writers (they queue on busy_timeout
    instead of failing on a lock upgrade), DEFERRED for readers (they never block writers).
    """

    # Switching a new file to WAL needs a moment alone with it, and SQLite answers "locked"
    # at once (no busy wait) while another opener migrates it: wait and try again.
    switch_to_wal = tenacity.retry(
        retry=tenacity.retry_if_exception(lambda e: "locked" in str(e)),
        wait=tenacity.wait_random(0.01, 0.1),
        stop=tenacity.stop_after_delay(busy_timeout_ms / 1000), reraise=True)(_switch_to_wal)

    def on_connect(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        switch_to_wal(cursor)
        for pragma in ("foreign_keys = ON", "synchronous = NORMAL",
                       f"cache_size = -{SQLITE_CACHE_KIB}"):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    def on_begin(conn: Connection) -> None:
        mode = "IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "DEFERRED"
        conn.exec_driver_sql(f"BEGIN {mode}")

    sa.event.listen(engine, "connect", on_connect)
    sa.event.listen(engine, "begin", on_begin)


class Store:
    """All of convsync's persistent state. Open with ``Store.open(url)``; close when done.

    ``clock`` gives the aware UTC "now" stamped on rows (tests move it by hand)."""

    def __init__(self, engine: Engine, *, clock: Callable[[], dt.datetime] = _utc_now) -> None:
        self._engine = engine
        self._clock = clock
        dialect = engine.dialect
        self._stats_upsert = _BulkUpsert(_upsert_insert(dialect, daily_stats, STATS_KEY),
                                         dialect, _STATS_CONVERTED)
        self._stat_row = _stat_row_builder(self._stats_upsert)
        self._journey_upsert = _BulkUpsert(_upsert_insert(dialect, journey_events, JOURNEY_KEY),
                                           dialect, _JOURNEY_CONVERTED)
        self._journey_rows = _JourneyRows(self._journey_upsert, dialect)
        self._upload_insert = _BulkUpsert(
            _insert_new_only(dialect, uploads, ("destination", "dedupe_key")), dialect,
            ("value", "time", "created_at", "updated_at"), _UPLOAD_COLUMNS)
        self._upload_row = _upload_row_builder(self._upload_insert)
        self.applied_migrations: tuple[int, ...] = ()
        """Schema versions this open migrated to (empty when the schema was current)."""

    @classmethod
    def open(cls, url: str, *, clock: Callable[[], dt.datetime] = _utc_now,
             busy_timeout_ms: int = 30_000) -> Store:
        """Open (creating if needed) the store at ``url`` and bring its schema up to date.

        ``sqlite:///path`` creates the parent directory and the file on first use;
        ``postgresql+psycopg://user:password@host/db`` needs the database to exist.
        """
        try:
            store = cls(_engine_for(url, busy_timeout_ms), clock=clock)
        except OSError as error:  # the SQLite file or its folders could not be made
            shown = make_url(url).render_as_string(hide_password=True)
            raise StoreError(f"the store {shown} cannot be created: {error.strerror}: check "
                             "client.store_url and its folder's permissions") from None
        try:
            store.applied_migrations = store._migrate()
        except (sa.exc.OperationalError, sa.exc.DatabaseError) as error:
            store.close()
            raise StoreError(_unusable(store.url, error)) from None
        except BaseException:
            store.close()
            raise
        return store

    @property
    def url(self) -> str:
        """The database URL, password hidden."""
        return self._engine.url.render_as_string(hide_password=True)

    @property
    def dialect(self) -> str:
        return self._engine.dialect.name

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine, for ad-hoc read queries (reports, diagnostics)."""
        return self._engine

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    # -- transactions and schema -------------------------------------------------------------

    @contextmanager
    def _writing(self) -> Iterator[Connection]:
        """One write transaction (SQLite: BEGIN IMMEDIATE)."""
        with self._engine.connect() as conn:
            conn.execution_options(**{_WRITE: True})
            with conn.begin():
                yield conn

    def _migrate(self) -> tuple[int, ...]:
        with self._writing() as conn:
            if self.dialect == "postgresql":  # serialize concurrent first opens
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(0x636F6E76)))
            schema_version.create(conn, checkfirst=True)
            current = conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar()
            current = current or 0
            if current > LATEST_VERSION:
                raise StoreVersionError(
                    f"the store at {self.url} has schema version {current}, but this convsync "
                    f"only knows versions up to {LATEST_VERSION}: upgrade convsync, or point "
                    "it at another database"
                )
            applied = tuple(range(current + 1, LATEST_VERSION + 1))
            for version in applied:
                MIGRATIONS[version - 1](conn)
                conn.execute(schema_version.insert().values(version=version,
                                                            applied_at=self._clock()))
            return applied

    def schema_version(self) -> int:
        with self._engine.connect() as conn:
            return conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar() or 0

    def count_rows(self, table: str) -> int:
        if table not in metadata.tables:
            raise ValueError(f"no table {table!r}; tables: {', '.join(sorted(metadata.tables))}")
        with self._engine.connect() as conn:
            counted = conn.execute(sa.select(sa.func.count()).select_from(metadata.tables[table]))
            return counted.scalar_one()

    # -- conversion definitions --------------------------------------------------------------

    def save_definitions(self, defs: Sequence[ConversionDefinition], client: str) -> None:
        """Make ``defs`` the client's whole set of definitions (the config is the truth).
        Concurrent writers of one client (first runs started together) take turns."""
        now = self._clock()
        names = [{"client": client, "name": d.name, "platform": p.value, "platform_name": n,
                  "position": position}
                 for d in defs for p in Platform for position, n in enumerate(d.names.on(p))]
        with self._writing() as conn:
            if self.dialect == "postgresql":  # two first runs at once: one after the other
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(
                    sa.func.hashtextextended(f"convsync definitions {client}", 0))))
            conn.execute(conversion_platform_names.delete().where(
                conversion_platform_names.c.client == client))
            conn.execute(conversion_definitions.delete().where(
                conversion_definitions.c.client == client))
            if defs:
                conn.execute(conversion_definitions.insert(), [
                    {"client": client, "name": d.name, "kind": d.kind.value,
                     "ladder_position": d.ladder_position, "updated_at": now} for d in defs])
            if names:
                conn.execute(conversion_platform_names.insert(), names)

    def definitions(self, client: str) -> list[ConversionDefinition]:
        """The client's definitions, by ladder position (unladdered last), then name."""
        defs = conversion_definitions
        names = conversion_platform_names
        with self._engine.connect() as conn:
            rows = conn.execute(sa.select(defs).where(defs.c.client == client).order_by(
                defs.c.ladder_position.nulls_last(), defs.c.name)).all()
            named = conn.execute(sa.select(names).where(names.c.client == client)
                                 .order_by(names.c.position)).all()
        per_definition: dict[str, dict[str, list[str]]] = {}
        for n in named:
            per_definition.setdefault(n.name, {}).setdefault(n.platform, []).append(
                n.platform_name)
        return [
            ConversionDefinition(
                name=r.name, kind=Kind(r.kind), ladder_position=r.ladder_position,
                names=PlatformNames(**{p: tuple(v) for p, v in
                                       per_definition.get(r.name, {}).items()}),
            )
            for r in rows
        ]

    # -- what the platforms call their conversions -------------------------------------------

    def save_platform_conversions(self, items: Iterable[PlatformConversion],
                                  seen_at: dt.datetime | None = None) -> int:
        """Upsert the platforms' own conversion definitions, seen at ``seen_at`` (now)."""
        now = seen_at or self._clock()
        table = platform_conversions
        stmt = _upsert_insert(self._engine.dialect, table,
                              ("platform", "account_id", "platform_id"))
        stored = 0
        for chunk in _chunks(items, DEFAULT_BATCH_SIZE):
            with self._writing() as conn:
                conn.execute(stmt, [
                    {"platform": c.platform.value, "account_id": c.account_id,
                     "platform_id": c.platform_id, "name": c.name, "settings": c.settings,
                     "conversion": c.conversion, "kind": c.kind.value if c.kind else None,
                     "in_column": c.in_column, "last_seen": now} for c in chunk])
            stored += len(chunk)
        return stored

    def platform_conversions(self, platform: Platform | str | None = None,
                             account_id: str | None = None,
                             seen_since: dt.datetime | None = None) -> list[PlatformConversion]:
        """Stored platform conversions; ``seen_since`` drops those no discovery saw lately."""
        table = platform_conversions
        query = sa.select(table).order_by(table.c.platform, table.c.account_id, table.c.name)
        if platform is not None:
            query = query.where(table.c.platform == Platform(platform).value)
        if account_id is not None:
            query = query.where(table.c.account_id == account_id)
        if seen_since is not None:
            query = query.where(table.c.last_seen >= seen_since)
        with self._engine.connect() as conn:
            return [
                PlatformConversion(
                    platform=Platform(r.platform), account_id=r.account_id,
                    platform_id=r.platform_id, name=r.name, settings=r.settings,
                    conversion=r.conversion, kind=Kind(r.kind) if r.kind else None,
                    in_column=r.in_column)
                for r in conn.execute(query)
            ]

    # -- daily stats ---------------------------------------------------------------------------

    def upsert_stats(self, rows: Iterable[ConversionStat],
                     batch_size: int = DEFAULT_BATCH_SIZE) -> int:
        """Store daily cells; a cell already stored (same natural key) takes the new figures.

        A cell with a source or medium replaces its platform's cells of that account and day
        stored without either: GA4 cells stored before schema version 3, the same events not
        yet split by session source and medium, which would otherwise count twice.

        One transaction per batch of ``batch_size`` rows. Returns the number of rows given."""
        return self._bulk_upsert(self._stats_upsert, self._stat_row, rows, batch_size,
                                 _DELETE_UNSOURCED, _unsourced_days)

    def stats(self, platform: Platform | str | None = None, since: dt.date | None = None,
              until: dt.date | None = None,
              conversion: str | None = None) -> Iterator[ConversionStat]:
        """Stream stored cells, ``since`` and ``until`` inclusive, in natural-key order."""
        table = daily_stats
        query = sa.select(*_read_stat.columns).order_by(*(table.c[name] for name in STATS_KEY))
        if platform is not None:
            query = query.where(table.c.platform == Platform(platform).value)
        if since is not None:
            query = query.where(table.c.date >= since)
        if until is not None:
            query = query.where(table.c.date <= until)
        if conversion is not None:
            query = query.where(table.c.conversion == conversion)
        return map(_read_stat, self._stream(query))

    # -- journey events ------------------------------------------------------------------------

    def upsert_journey_events(self, events: Iterable[JourneyEvent],
                              batch_size: int = DEFAULT_BATCH_SIZE) -> int:
        """Store person-level events: the same (time, source_platform, source_event_id) is one
        row; a CRM event that comes back with another time replaces its old version."""
        return self._bulk_upsert(self._journey_upsert, self._journey_rows.row, events,
                                 batch_size, _DELETE_MOVED, _moved_events)

    def upsert_journey_batches(self, batches: Sequence[JourneyBatch]) -> int:
        """Store whole batches of events in one transaction, as ``upsert_journey_events``
        stores single events."""
        movable = [b for b in batches if b.source_platform == MOVABLE_SOURCE]
        stored = self.upsert_journey_events(e for b in movable for e in b.events())
        batches = [b for b in batches if b.source_platform != MOVABLE_SOURCE]
        if batches:
            upsert = self._journey_upsert
            now = upsert.processor("updated_at")(self._clock())
            rows = list(itertools.chain.from_iterable(
                self._journey_rows.batch_rows(b, now) for b in batches))
            with self._writing() as conn:
                upsert.execute(conn, rows)
            stored += len(rows)
        return stored

    def journey_events(self, since: dt.datetime | None = None,
                       until: dt.datetime | None = None) -> Iterator[JourneyEvent]:
        """Stream events with ``since <= time < until``, oldest first."""
        table = journey_events
        query = sa.select(*_read_journey_event.columns).order_by(
            *(table.c[n] for n in JOURNEY_KEY))
        if since is not None:
            query = query.where(table.c.time >= since)
        if until is not None:
            query = query.where(table.c.time < until)
        return map(_read_journey_event, self._stream(query))

    def planning_events(self, until: dt.datetime, conversions: Collection[str],
                        first_only: Collection[str] = (), crm_names: Collection[str] = ()
                        ) -> Iterator[tuple[JourneyEvent, dt.datetime]]:
        """The events of ``conversions`` before ``until``, each with the time of its person's
        first event of all (the landing that carried the click), by person; of a
        ``first_only`` conversion only each person's first event; and the CRM outcomes named
        ``crm_names`` (mapped or not). The database sorts by person and time, so a plan over
        millions of people holds one person at a time."""
        table = journey_events
        query = (sa.select(*_PlanningReader.columns).where(table.c.time < sa.bindparam("until"))
                 .order_by(table.c.person_key, table.c.time, table.c.source_platform,
                           table.c.source_event_id))
        bind = UtcDateTime().bind_processor(self._engine.dialect) or _unchanged
        read = _PlanningReader(self.dialect)
        wanted, once, crm = frozenset(conversions), frozenset(first_only), frozenset(crm_names)
        person, first_seen, seen = None, dt.datetime.min, set[str]()
        for row in self._stream_raw(query, {"until": bind(until)}):
            if row[0] != person:
                person, first_seen, seen = row[0], read.time(row[3]), set()
            conversion = row[1]
            if conversion not in wanted:
                if row[2] in crm and row[4] == MOVABLE_SOURCE:
                    yield read(row), first_seen
                continue
            if conversion in once:
                if conversion in seen:
                    continue
                seen.add(conversion)
            yield read(row), first_seen

    # -- the upload ledger ---------------------------------------------------------------------

    def plan_uploads(self, planned: Iterable[Upload], batch_size: int = DEFAULT_BATCH_SIZE,
                     *, client: str = "") -> list[str]:
        """Add uploads whose (destination, dedupe_key) is new (with their own status,
        planned or held); returns the keys added.

        An existing key is left exactly as it is (status, value, attempts): exactly-once."""
        added: list[str] = []
        for chunk in _chunks(planned, batch_size):
            now = self._clock()
            stamp = self._upload_insert.processor("created_at")(now)
            unique: dict[tuple[str, str], Upload] = {}
            for u in sorted(chunk, key=_by_key):  # in key order: fewer index pages rewritten
                unique.setdefault((u.destination, u.dedupe_key), u)
            with self._writing() as conn:
                written = self._upload_insert.execute(
                    conn, [self._upload_row(u, client, stamp) for u in unique.values()])
                if written == len(unique):  # all new: the usual case, known without a query
                    added += (key for _, key in unique)
                else:
                    added += self._written_at(conn, client, list(unique), now)
        return added

    def _written_at(self, conn: Connection, client: str, keys: Sequence[tuple[str, str]],
                    now: dt.datetime) -> list[str]:
        """Those of the (destination, dedupe_key) ``keys`` whose row was created at ``now``
        (by the statement that just ran)."""
        table, found = uploads, set[tuple[str, str]]()
        by_destination: dict[str, list[str]] = {}
        for destination, key in keys:
            by_destination.setdefault(Platform(destination).value, []).append(key)
        for destination, chunk in by_destination.items():
            found.update((destination, key) for key in conn.execute(
                sa.select(table.c.dedupe_key).where(
                    table.c.client == client, table.c.destination == destination,
                    table.c.created_at == now,
                    _among(table.c.dedupe_key, chunk, self.dialect))).scalars())
        return [key for destination, key in keys if (Platform(destination).value, key) in found]

    def mark_upload(self, destination: Platform | str, dedupe_key: str, status: UploadStatus,
                    response: str = "", *, attempt: bool = True) -> None:
        """Record an upload's new status and the platform's response.

        ``attempt`` counts one more send attempt; pass False when recording the later outcome
        of an attempt already counted (for instance SENT -> ACCEPTED from request status)."""
        self.mark_uploads(destination, [(dedupe_key, status, response)], attempt=attempt)

    def mark_uploads(self, destination: Platform | str,
                     outcomes: Iterable[tuple[str, UploadStatus, str]], *,
                     attempt: bool = True) -> None:
        """``mark_upload`` for many (dedupe_key, status, response) in one transaction."""
        table = uploads
        stmt = (
            table.update()
            .where(table.c.destination == sa.bindparam("b_destination"),
                   table.c.dedupe_key == sa.bindparam("b_dedupe_key"))
            .values(status=sa.bindparam("b_status"), response=sa.bindparam("b_response"),
                    updated_at=sa.bindparam("b_now", type_=UtcDateTime),
                    attempts=table.c.attempts + (1 if attempt else 0))
        )
        where = Platform(destination).value
        now = self._clock()
        params = [{"b_destination": where, "b_dedupe_key": key,
                   "b_status": UploadStatus(status).value, "b_response": response, "b_now": now}
                  for key, status, response in outcomes]
        if not params:
            return
        with self._writing() as conn:
            known = set(conn.execute(
                sa.select(table.c.dedupe_key).where(
                    table.c.destination == where,
                    table.c.dedupe_key.in_([p["b_dedupe_key"] for p in params]))).scalars())
            missing = [p["b_dedupe_key"] for p in params if p["b_dedupe_key"] not in known]
            if missing:
                raise KeyError(f"no planned {where} upload with dedupe key(s) {missing[:5]}")
            conn.execute(stmt, params)

    def get_upload(self, destination: Platform | str, dedupe_key: str) -> Upload | None:
        table = uploads
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(*_read_upload.columns).where(
                table.c.destination == Platform(destination).value,
                table.c.dedupe_key == dedupe_key)).one_or_none()
        return _read_upload(row) if row is not None else None

    def upload_attempts(self, destination: Platform | str, dedupe_key: str) -> int:
        table = uploads
        with self._engine.connect() as conn:
            attempts = conn.execute(sa.select(table.c.attempts).where(
                table.c.destination == Platform(destination).value,
                table.c.dedupe_key == dedupe_key)).scalar()
        if attempts is None:
            raise KeyError(f"no {destination} upload with dedupe key {dedupe_key!r}")
        return int(attempts)

    def pending_uploads(
        self, destination: Platform | str, *,
        statuses: Sequence[UploadStatus] = (UploadStatus.PLANNED, UploadStatus.FAILED),
        limit: int | None = None,
    ) -> list[Upload]:
        """Uploads still to send (planned, or failed and retryable), oldest first."""
        table = uploads
        query = (
            sa.select(*_read_upload.columns)
            .where(table.c.destination == Platform(destination).value,
                   table.c.status.in_([UploadStatus(s).value for s in statuses]))
            .order_by(table.c.id)
            .limit(limit)
        )
        with self._engine.connect() as conn:
            return [_read_upload(row) for row in conn.execute(query)]

    def restate_uploads(self, destination: Platform | str,
                        values: Iterable[tuple[str, float]], *, threshold: float) -> int:
        """Give uploads already sent a new value where it moved by more than ``threshold``
        (relative to the value sent): they are planned again under the same dedupe key (the
        platform restates, never counts twice). Returns how many were restated. An upload
        not sent yet (planned, held) just takes the new value."""
        table, where = uploads, Platform(destination).value
        sent = (UploadStatus.SENT.value, UploadStatus.ACCEPTED.value)
        waiting = (UploadStatus.PLANNED.value, UploadStatus.HELD.value)
        moved = 0
        now = self._clock()
        for chunk in _chunks(values, DEFAULT_BATCH_SIZE):
            wanted = dict(chunk)
            with self._writing() as conn:
                rows = conn.execute(sa.select(table.c.id, table.c.dedupe_key, table.c.status,
                                              table.c.value, table.c.sent_value)
                                    .where(table.c.destination == where,
                                           _among(table.c.dedupe_key, list(wanted),
                                                  self.dialect),
                                           table.c.status.in_(sent + waiting))).all()
                restated = [{"b_id": r.id, "b_value": wanted[r.dedupe_key]} for r in rows
                            if r.status in sent and r.sent_value is not None
                            and abs(wanted[r.dedupe_key] - r.sent_value)
                            > threshold * max(abs(r.sent_value), 0.01)]
                revalued = [{"b_id": r.id, "b_value": wanted[r.dedupe_key]} for r in rows
                            if r.status in waiting and wanted[r.dedupe_key] != r.value]
                update = table.update().where(table.c.id == sa.bindparam("b_id"))
                if restated:
                    conn.execute(update.values(value=sa.bindparam("b_value"),
                                               status=UploadStatus.PLANNED.value,
                                               reason="restated", updated_at=now), restated)
                if revalued:
                    conn.execute(update.values(value=sa.bindparam("b_value"), updated_at=now),
                                 revalued)
                moved += len(restated)
        return moved

    def hold_uploads(self, destination: Platform | str,
                     holds: Iterable[tuple[str, dt.datetime, str]]) -> None:
        """Keep planned uploads back until a time (key, until, why): a later run sends them."""
        table, where = uploads, Platform(destination).value
        params = [{"b_key": key, "b_until": until, "b_reason": why} for key, until, why in holds]
        if not params:
            return
        with self._writing() as conn:
            conn.execute(table.update().where(
                table.c.destination == where, table.c.dedupe_key == sa.bindparam("b_key"),
                sa.or_(table.c.status == UploadStatus.PLANNED.value,
                       table.c.status == UploadStatus.HELD.value))
                .values(status=UploadStatus.HELD.value, hold_until=sa.bindparam(
                    "b_until", type_=UtcDateTime), reason=sa.bindparam("b_reason"),
                    updated_at=self._clock()), params)

    def claim_uploads(self, client: str, destination: Platform | str, *, limit: int,
                      now: dt.datetime) -> list[tuple[Upload, bool]]:
        """Take up to ``limit`` uploads to send and mark them sending, in one transaction:
        planned ones, held ones whose time has come, and ones a killed run left sending
        (those may have arrived: the flag says so, they go out again under the same key, and
        their ``resends`` count it now, before the send, so a run killed again still counted
        it). Call under the client's lock (``convsync.locks``)."""
        table, where = uploads, Platform(destination).value
        ready = (table.c.status == UploadStatus.SENDING.value,
                 sa.and_(table.c.status == UploadStatus.HELD.value, table.c.hold_until <= now),
                 table.c.status == UploadStatus.PLANNED.value)
        with self._writing() as conn:
            ids: list[int] = []
            for which in ready:  # a status at a time: each is a range of the status index
                query = (sa.select(table.c.id)
                         .where(table.c.client == client, table.c.destination == where, which)
                         .order_by(table.c.id).limit(limit))
                if self.dialect == "postgresql":
                    query = query.with_for_update(skip_locked=True)
                ids += conn.execute(query).scalars()
            ids = sorted(ids)[:limit]
            rows = conn.execute(sa.select(table.c.status, *_read_upload.columns)
                                .where(_among(table.c.id, ids, self.dialect))
                                .order_by(table.c.id)).all()
            if rows:  # a row still "sending" goes out again: a resend, counted before it
                again = sa.case((table.c.status == UploadStatus.SENDING.value, 1), else_=0)
                conn.execute(table.update().where(_among(table.c.id, ids, self.dialect))
                             .values(status=UploadStatus.SENDING.value, updated_at=now,
                                     resends=table.c.resends + again))
        return [(_read_upload(row[1:]), row.status == UploadStatus.SENDING.value)
                for row in rows]

    def claim_planned(self, client: str, destination: Platform | str, keys: Sequence[str],
                      now: dt.datetime) -> set[str]:
        """Mark sending those of ``keys`` that are planned (rows a run has just written, or
        found waiting), in one statement, and return their keys: the run sends them from
        the uploads it holds. Call under the client's lock."""
        table = uploads
        with self._writing() as conn:
            return set(conn.execute(
                table.update().where(table.c.client == client,
                                     table.c.destination == Platform(destination).value,
                                     table.c.status == UploadStatus.PLANNED.value,
                                     _among(table.c.dedupe_key, keys, self.dialect))
                .values(status=UploadStatus.SENDING.value, updated_at=now)
                .returning(table.c.dedupe_key)).scalars())

    def record_sent(self, client: str, destination: Platform | str, keys: Sequence[str],
                    request_id: str, now: dt.datetime, *, first: bool = False,
                    settled: bool = False) -> None:
        """The uploads ``keys`` went out in request ``request_id``: sent, with the value sent
        kept. A row sent before (a restatement, a resend) first moves its earlier send to
        upload_sends, so every value ever sent is kept; ``first`` says none was (rows this
        run wrote), which spares looking. ``settled``: the platform's answer is final (no
        request status to read back later): accepted, and the request done."""
        table, where = uploads, Platform(destination).value
        these = sa.and_(table.c.destination == where,
                        _among(table.c.dedupe_key, keys, self.dialect))
        with self._writing() as conn:
            if not first:
                conn.execute(upload_sends.insert().from_select(
                    ["upload_id", "request_id", "value", "sent_at"],
                    sa.select(table.c.id, table.c.request_id, table.c.sent_value,
                              table.c.sent_at).where(these, table.c.request_id.is_not(None))))
            status = UploadStatus.ACCEPTED if settled else UploadStatus.SENT
            sent = conn.execute(table.update().where(these).values(
                status=status.value, request_id=request_id,
                sent_value=table.c.value, sent_at=now, reason="", updated_at=now,
                attempts=table.c.attempts + 1)).rowcount
            conn.execute(upload_requests.insert().values(
                request_id=request_id, client=client, destination=where, sent_at=now,
                events=sent, status="done" if settled else "processing", detail={}, checks=0,
                next_check_at=None if settled else now + dt.timedelta(minutes=30)))

    def upload_statuses(self, client: str, destination: Platform | str,
                        keys: Sequence[str]) -> dict[str, UploadStatus]:
        """The ledger status of those of ``keys`` it holds."""
        table = uploads
        with self._engine.connect() as conn:
            return {key: UploadStatus(status) for key, status in conn.execute(
                sa.select(table.c.dedupe_key, table.c.status).where(
                    table.c.client == client, table.c.destination == Platform(destination).value,
                    _among(table.c.dedupe_key, keys, self.dialect)))}

    def release_uploads(self, destination: Platform | str, keys: Sequence[str],
                        status: UploadStatus, reason: str) -> None:
        """Uploads claimed but not sent: back to planned (a later run sends them) or failed
        with the reason (the platform refused them)."""
        table = uploads
        with self._writing() as conn:
            conn.execute(table.update().where(
                table.c.destination == Platform(destination).value,
                _among(table.c.dedupe_key, keys, self.dialect)).values(
                status=status.value, reason=reason, updated_at=self._clock()))

    def give_up_sending(self, client: str, destination: Platform | str,
                        claimed_before: dt.datetime, reason: str) -> int:
        """Fail, with ``reason``, the uploads left "sending" since before ``claimed_before``
        (a run killed mid-request, long ago): they may have arrived, and the platform would
        no longer recognise a resend as the same event. Returns how many."""
        table = uploads
        with self._writing() as conn:
            return int(conn.execute(table.update().where(
                table.c.client == client, table.c.destination == Platform(destination).value,
                table.c.status == UploadStatus.SENDING.value,
                table.c.updated_at < claimed_before).values(
                status=UploadStatus.FAILED.value, reason=reason,
                updated_at=self._clock())).rowcount)

    def requests_to_check(self, client: str, destination: Platform | str,
                          now: dt.datetime) -> list[tuple[str, dt.datetime]]:
        """(request id, sent at) of the requests whose outcome the platform has not told yet
        and that are due a look."""
        table = upload_requests
        with self._engine.connect() as conn:
            return [(r.request_id, r.sent_at) for r in conn.execute(
                sa.select(table.c.request_id, table.c.sent_at).where(
                    table.c.client == client, table.c.destination == Platform(destination).value,
                    table.c.status == "processing", table.c.next_check_at <= now)
                .order_by(table.c.sent_at))]

    def record_request_status(self, request_id: str, status: str, detail: Mapping[str, Any],
                              now: dt.datetime, next_check: dt.datetime | None,
                              outcomes: Mapping[str, tuple[UploadStatus, str]]) -> None:
        """What the platform said of a request (``detail``: per destination), when to look
        again (None: final), and the outcome it implies for the uploads it carried, by
        conversion action (uploads of other actions, or of a partly failed one, stay sent)."""
        with self._writing() as conn:
            conn.execute(upload_requests.update().where(
                upload_requests.c.request_id == request_id).values(
                status=status, detail=dict(detail), checked_at=now, next_check_at=next_check,
                checks=upload_requests.c.checks + 1))
            for action, (outcome, reason) in outcomes.items():
                conn.execute(uploads.update().where(
                    uploads.c.request_id == request_id, uploads.c.conversion_action == action,
                    uploads.c.status == UploadStatus.SENT.value).values(
                    status=outcome.value, reason=reason, updated_at=now))

    def ledger(self, client: str, destination: Platform | str) -> list[dict[str, Any]]:
        """The ledger by conversion action, day of the event (UTC), status and reason: how
        many uploads, their value, and how many were resent."""
        table = uploads
        day = (sa.func.to_char(sa.func.timezone("UTC", table.c.time), "YYYY-MM-DD")
               if self.dialect == "postgresql"
               else sa.func.substr(sa.cast(table.c.time, sa.String), 1, 10))
        query = (sa.select(table.c.conversion, table.c.conversion_action, day.label("day"),
                           table.c.status, table.c.reason, sa.func.count().label("uploads"),
                           sa.func.sum(table.c.value).label("value"),
                           sa.func.sum(table.c.resends).label("resends"))
                 .where(table.c.client == client,
                        table.c.destination == Platform(destination).value)
                 .group_by(table.c.conversion, table.c.conversion_action, day, table.c.status,
                           table.c.reason)
                 .order_by(table.c.conversion_action, day, table.c.status))
        with self._engine.connect() as conn:
            return [dict(r._mapping) | {"value": float(r.value or 0)}
                    for r in conn.execute(query)]

    def upload_request_rows(self, client: str, destination: Platform | str
                            ) -> list[dict[str, Any]]:
        table = upload_requests
        with self._engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(sa.select(table).where(
                table.c.client == client, table.c.destination == Platform(destination).value)
                .order_by(table.c.sent_at))]

    # -- quotas --------------------------------------------------------------------------------

    def take_call(self, project: str, api: str, now: dt.datetime, per_minute: int,
                  per_day: int, day_start: dt.datetime) -> float | None:
        """Count one call of ``api`` for ``project`` at ``now`` if the minute before holds
        fewer than ``per_minute`` and the day since ``day_start`` fewer than
        ``per_day``: 0.0 when counted, the seconds until the minute has room when it has
        none, None when the day's calls are spent. One transaction (on PostgreSQL under a
        lock per project and api), so runs on other machines never both take the last
        call."""
        table = quota_calls
        second = now.replace(microsecond=0)
        ours = sa.and_(table.c.project == project, table.c.api == api)
        with self._writing() as conn:
            if self.dialect == "postgresql":
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(
                    sa.func.hashtextextended(f"convsync quota {project} {api}", 0))))
            used_today = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(table.c.calls), 0))
                                      .where(ours, table.c.second >= day_start)).scalar_one()
            if used_today >= per_day:
                return None
            # a call counted at second S was made before S + 1: it may weigh on the minute
            # until S + 61 (a second early would be a call too many in Google's minute)
            span = dt.timedelta(seconds=61)
            recent = conn.execute(sa.select(table.c.second, table.c.calls).where(
                ours, table.c.second > now - span).order_by(table.c.second)).all()
            used, wait = sum(r.calls for r in recent), 0.0
            for moment, calls in recent:  # the wait until enough of them leave the minute
                if used < per_minute:
                    break
                used -= calls
                wait = (moment + span - now).total_seconds()
            if wait > 0:
                return wait
            self._add_calls(conn, project, api, second, 1, day_start)
            return 0.0

    def count_calls(self, project: str, api: str, now: dt.datetime, calls: int,
                    day_start: dt.datetime) -> None:
        """Count ``calls`` calls of ``api`` made for ``project`` at ``now`` (a quota convsync
        does not pace, only reports: Google Ads operations)."""
        with self._writing() as conn:
            self._add_calls(conn, project, api, now.replace(microsecond=0), calls, day_start)

    def _add_calls(self, conn: Connection, project: str, api: str, second: dt.datetime,
                   calls: int, day_start: dt.datetime) -> None:
        table = quota_calls
        insert = (sqlite.insert if self.dialect == "sqlite" else postgresql.insert)(table)
        conn.execute(insert.values(project=project, api=api, second=second, calls=calls)
                     .on_conflict_do_update(index_elements=["project", "api", "second"],
                                            set_={"calls": table.c.calls + calls}))
        conn.execute(table.delete().where(  # what no quota looks at any more
            table.c.second < day_start - dt.timedelta(days=1)))

    def calls_since(self, project: str, api: str, since: dt.datetime) -> int:
        """Calls of ``api`` counted for ``project`` from ``since``."""
        table = quota_calls
        with self._engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(table.c.calls), 0))
                                    .where(table.c.project == project, table.c.api == api,
                                           table.c.second >= since)).scalar_one())

    # -- watermarks ----------------------------------------------------------------------------

    def get_watermark(self, client: str, platform: Platform | str, account_id: str,
                      stream: str) -> Watermark | None:
        table = watermarks
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(table).where(
                table.c.client == client, table.c.platform == Platform(platform).value,
                table.c.account_id == account_id, table.c.stream == stream)).one_or_none()
        if row is None:
            return None
        return Watermark(client=row.client, platform=Platform(row.platform),
                         account_id=row.account_id, stream=row.stream,
                         last_complete_date=row.last_complete_date, cursor=row.cursor,
                         updated_at=row.updated_at)

    def set_watermark(self, client: str, platform: Platform | str, account_id: str,
                      stream: str, *, last_complete_date: dt.date | None = None,
                      cursor: str | None = None) -> None:
        """Replace the stream's watermark (a backfill may move it backwards on purpose)."""
        key = ("client", "platform", "account_id", "stream")
        stmt = _upsert_insert(self._engine.dialect, watermarks, key)
        with self._writing() as conn:
            conn.execute(stmt, {"client": client, "platform": Platform(platform).value,
                                "account_id": account_id, "stream": stream,
                                "last_complete_date": last_complete_date, "cursor": cursor,
                                "updated_at": self._clock()})

    # -- runs ----------------------------------------------------------------------------------

    def start_run(self, client: str, command: str) -> int:
        """Record a run as started (status ``running``, with the process that runs it) and
        return its id. Runs of this machine left ``running`` by a process that is gone
        (killed, crashed) are marked ``abandoned`` first: nothing will ever finish them."""
        host, now = socket.gethostname(), self._clock()
        with self._writing() as conn:
            stale = [r.id for r in conn.execute(
                sa.select(runs.c.id, runs.c.summary).where(runs.c.status == "running"))
                if (r.summary or {}).get("host") == host
                and not _process_alive(int((r.summary or {}).get("pid") or 0))]
            if stale:
                conn.execute(runs.update().where(runs.c.id.in_(stale)).values(
                    status="abandoned", finished_at=now))
            result = conn.execute(runs.insert().values(
                client=client, command=command, started_at=now, status="running",
                summary={"pid": os.getpid(), "host": host}).returning(runs.c.id))
            return int(result.scalar_one())

    def finish_run(self, run_id: int, status: str, summary: Mapping[str, Any]) -> None:
        """Close a run with its status (``ok``, ``failed``, ...) and a JSON-able summary,
        e.g. ``{"requests": {"google_ads": 3}, "rows": 1200, "errors": []}``."""
        with self._writing() as conn:
            updated = conn.execute(runs.update().where(runs.c.id == run_id).values(
                finished_at=self._clock(), status=status, summary=dict(summary)))
            if updated.rowcount != 1:
                raise KeyError(f"no run with id {run_id}")

    # -- micro-conversion values -----------------------------------------------------------

    def save_micro_values(self, client: str, computed_at: dt.datetime,
                          values: Sequence[Mapping[str, Any]]) -> None:
        """Store one computation's values (each a JSON-able mapping with ``conversion``,
        ``segment``, ``upload_value`` and ``recommendation``), replacing that day's earlier
        ones."""
        day = computed_at.date()
        with self._writing() as conn:
            conn.execute(micro_values.delete().where(micro_values.c.client == client,
                                                     micro_values.c.computed_on == day))
            if values:
                conn.execute(micro_values.insert(), [
                    {"client": client, "computed_on": day, "conversion": v["conversion"],
                     "segment": v["segment"], "value": v["upload_value"],
                     "recommendation": v["recommendation"], "detail": dict(v),
                     "computed_at": computed_at} for v in values])

    def micro_values(self, client: str, computed_on: dt.date | None = None
                     ) -> list[dict[str, Any]]:
        """The values computed on ``computed_on`` (default: the latest computation)."""
        table = micro_values
        with self._engine.connect() as conn:
            day = computed_on or conn.execute(sa.select(sa.func.max(table.c.computed_on)).where(
                table.c.client == client)).scalar_one_or_none()
            if day is None:
                return []
            rows = conn.execute(sa.select(table.c.detail).where(
                table.c.client == client, table.c.computed_on == day).order_by(
                table.c.conversion, table.c.segment))
            return [dict(r.detail) for r in rows]

    def recent_runs(self, client: str | None = None, limit: int = 20) -> list[Run]:
        """The latest runs first."""
        query = sa.select(runs).order_by(runs.c.started_at.desc(), runs.c.id.desc()).limit(limit)
        if client is not None:
            query = query.where(runs.c.client == client)
        with self._engine.connect() as conn:
            return [Run(id=r.id, client=r.client, command=r.command, started_at=r.started_at,
                        finished_at=r.finished_at, status=r.status, summary=r.summary)
                    for r in conn.execute(query)]

    # -- helpers -------------------------------------------------------------------------------

    def _bulk_upsert(self, upsert: _BulkUpsert, to_row: Callable[[T, Any], Values],
                     items: Iterable[T], batch_size: int, delete: sa.Delete,
                     superseded: Callable[[list[T]], tuple[list[T], list[dict[str, Any]]]]
                     ) -> int:
        """Upsert ``items`` a transaction per batch; in each, first ``delete`` the stored rows
        the batch supersedes (``superseded(chunk)``: the items to store and the delete's
        parameters). Returns the number of rows stored."""
        stored = 0
        for chunk in _chunks(items, batch_size):
            now = upsert.processor("updated_at")(self._clock())
            kept, replaced = superseded(chunk)
            rows = [to_row(item, now) for item in kept]
            with self._writing() as conn:
                if replaced:
                    conn.execute(delete, replaced)
                upsert.execute(conn, rows)
            stored += len(rows)
        return stored

    def _stream_raw(self, query: sa.Select[Any], values: Mapping[str, Any]
                    ) -> Iterator[Sequence[Any]]:
        """Rows of ``query`` as the driver gives them, fetched in chunks through the driver's
        own cursor (server-side on PostgreSQL): no type converts a value (``values``, the
        named parameters, come converted too), which saves more than the query costs where
        a plan reads millions of rows."""
        compiled = query.compile(dialect=self._engine.dialect)
        params = compiled.construct_params(dict(values))
        bound: Any = (tuple(params[name] for name in compiled.positiontup or ())
                      if compiled.positional else params)
        with self._engine.connect() as conn:
            driver: Any = conn.connection.dbapi_connection
            cursor = (driver.cursor(name="convsync_stream") if self.dialect == "postgresql"
                      else driver.cursor())
            try:
                cursor.execute(str(compiled), bound)
                while rows := cursor.fetchmany(_STREAM_CHUNK):
                    yield from rows
            finally:
                cursor.close()

    def _stream(self, query: sa.Select[Any]) -> Iterator[sa.Row[Any]]:
        """Rows of ``query`` fetched in chunks (server-side cursor on PostgreSQL)."""
        with self._engine.connect() as conn:
            result = conn.execution_options(yield_per=_STREAM_CHUNK).execute(query)
            yield from result

    # -- reconcile and report queries ----------------------------------------------------------

    def stats_span(self, platform: Platform | str) -> tuple[dt.date, dt.date] | None:
        """First and last day of a platform's stored daily stats (None: none stored)."""
        table = daily_stats
        with self._engine.connect() as conn:
            first, last = conn.execute(
                sa.select(sa.func.min(table.c.date), sa.func.max(table.c.date))
                .where(table.c.platform == Platform(platform).value)).one()
        return (first, last) if first is not None else None

    def journey_counts(self, source_platform: Platform | str, since: dt.datetime,
                       until: dt.datetime) -> dict[str, int]:
        """Mapped journey events of one source with ``since <= time < until``, per conversion."""
        table = journey_events
        query = (sa.select(table.c.conversion, sa.func.count())
                 .where(table.c.source_platform == Platform(source_platform).value,
                        table.c.conversion.is_not(None), table.c.time >= since,
                        table.c.time < until)
                 .group_by(table.c.conversion))
        with self._engine.connect() as conn:
            return {name: int(n) for name, n in conn.execute(query)}

    def upload_counts(self, destination: Platform | str) -> dict[str, int]:
        """Upload ledger rows per conversion action of one destination."""
        table = uploads
        query = (sa.select(table.c.conversion_action, sa.func.count())
                 .where(table.c.destination == Platform(destination).value)
                 .group_by(table.c.conversion_action))
        with self._engine.connect() as conn:
            return {name: int(n) for name, n in conn.execute(query)}

    def upload_refusals(self, destination: Platform | str) -> dict[str, dict[str, int]]:
        """Per conversion action, the uploads the platform refused, by its reason: the
        processing errors its requests reported, and the rows it rejected whole."""
        where = Platform(destination).value
        refused: dict[str, dict[str, int]] = {}

        def add(action: str, reason: str, count: int) -> None:
            reasons = refused.setdefault(action, {})
            reasons[reason] = reasons.get(reason, 0) + count

        with self._engine.connect() as conn:
            for detail in conn.execute(sa.select(upload_requests.c.detail).where(
                    upload_requests.c.destination == where)).scalars():
                for d in (detail or {}).get("destinations", []):
                    for reason, count in (d.get("errors") or {}).items():
                        add(str(d.get("conversion_action", "")), reason, int(count))
            table = uploads
            for action, reason, count in conn.execute(
                    sa.select(table.c.conversion_action, table.c.reason, sa.func.count())
                    .where(table.c.destination == where,
                           table.c.status == UploadStatus.FAILED.value,
                           table.c.reason.startswith(REFUSED_BY_GOOGLE))
                    .group_by(table.c.conversion_action, table.c.reason)):
                add(action, reason, int(count))
        return refused

    def stats_campaigns(self, platform: Platform | str, since: dt.date | None = None,
                        until: dt.date | None = None) -> list[tuple[str, str]]:
        """(campaign id, campaign name) pairs in a platform's stored daily stats."""
        table = daily_stats
        query = (sa.select(table.c.campaign_id, table.c.campaign_name).distinct()
                 .where(table.c.platform == Platform(platform).value)
                 .order_by(table.c.campaign_id, table.c.campaign_name))
        if since is not None:
            query = query.where(table.c.date >= since)
        if until is not None:
            query = query.where(table.c.date <= until)
        with self._engine.connect() as conn:
            return [(i, n) for i, n in conn.execute(query)]
