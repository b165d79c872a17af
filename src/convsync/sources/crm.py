"""CRM file source: offline outcomes (qualified leads, won deals) from CSV or JSON Lines.

File format
-----------
One outcome per row: a ``.csv`` file with a header line, or a ``.jsonl`` / ``.ndjson`` file with
one JSON object per line. Column names are matched case-insensitively, with spaces and dashes
read as underscores; columns not listed here are ignored (and named in the report).

============  ========  =====================================================================
column        required  meaning
============  ========  =====================================================================
event         yes       the outcome's CRM name (``lead_qualified``), mapped through the
                        conversion definitions' ``crm`` names; an unmapped name is kept with
                        conversion None
time          yes       ISO 8601 with a UTC offset (``2026-11-03T14:05:00-05:00``, ``...Z``);
                        a time without offset is read in the import's ``timezone`` and is a
                        row error when none is given (never guessed: a CRM export's naive
                        times may be in the CRM user's zone, in UTC or in the client's)
value         no        a number >= 0 (``1250.50``), default 0
currency      no        ISO 4217; defaults to the import's ``default_currency``; required
                        when value > 0
event_id      no        the CRM's own id for this outcome (see "Keys")
gclid, gbraid, wbraid, fbc, fbp, email, phone, external_id
              one       identifiers; at least one per row. ``email`` and ``phone`` are
                        normalized and hashed on arrival (``convsync.hashing``) and never kept
                        in clear; ``phone`` must carry its country code (``+1 650 555 1212``)
============  ========  =====================================================================

Aliases: ``lead_id`` = external_id, ``event_name`` / ``conversion_name`` = event,
``timestamp`` / ``event_time`` / ``conversion_time`` = time, ``conversion_value`` = value,
``currency_code`` = currency, ``email_address`` = email, ``phone_number`` = phone.

A bad row is reported with its line number and reason and skipped; the good rows load. A file
that cannot be read at all (unknown extension, no header, a required column missing, not
UTF-8) raises ``CrmFileError``.

Keys: why a re-import never doubles
-----------------------------------
Each outcome's ``source_event_id`` is deterministic, so importing a file again (the same
file, a later export that repeats old rows, or a rerun after a crash) upserts the same rows:

1. ``event_id`` when the file has one (the CRM's own id: any later correction updates it);
2. else SHA-256 of (external_id, event, time in UTC): a re-export that corrects the value of
   "lead L-1 qualified at T" updates that row instead of adding one;
3. else SHA-256 of the row's normalized content (event, time in UTC, value, currency and every
   identifier, emails and phones as their hashes), independent of column order, spacing and
   file format.

Transactions
------------
The store commits the events in batches (``Store.upsert_journey_events``, one transaction per
batch): every stored row is a whole, valid outcome, never a half-written one, and the file is
streamed, never held in memory. A crash mid-file leaves the batches committed so far; importing
the file again re-upserts every row under the same keys and ends with exactly the store an
uninterrupted import gives. No resume marker is kept on purpose: re-reading a file is cheap, and
a marker (a line number) would go wrong silently if the file were edited between the runs.

There is no ``Stream`` for CRM files: a stream pulls a date range in date order and resumes
from a day watermark, while a file comes in whatever order the CRM wrote it and is imported
whole (``import_file``).
"""

from __future__ import annotations

import codecs
import csv
import datetime as dt
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from convsync.errors import InputError
from convsync.hashing import hash_email, hash_phone, sha256_hex
from convsync.model import ConversionMap, Identifiers, JourneyEvent, Platform, PlatformConversion
from convsync.store import Store

CSV_SUFFIXES = (".csv",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")
MAX_KEPT_ERRORS = 1000
"""Row errors kept with their reasons; beyond that they are only counted (bounded memory)."""

CLICK_IDS = ("gclid", "gbraid", "wbraid", "fbc", "fbp")
IDENTIFIER_COLUMNS = (*CLICK_IDS, "email", "phone", "external_id")
COLUMNS = ("event", "time", "value", "currency", "event_id", *IDENTIFIER_COLUMNS)
ALIASES = {
    "lead_id": "external_id",
    "event_name": "event",
    "conversion_name": "event",
    "timestamp": "time",
    "event_time": "time",
    "conversion_time": "time",
    "conversion_value": "value",
    "currency_code": "currency",
    "email_address": "email",
    "phone_number": "phone",
}
REQUIRED_COLUMNS = ("event", "time")
PERSON_KEYS = (("email", "email_sha256_google"), ("phone", "phone_sha256_google"),
               ("external_id", "external_id"), *((name, name) for name in CLICK_IDS))
"""(prefix, identifier) a person key is made of: the first identifier present, as
``<prefix>:<value>``, the prefixes the other sources use (``email:<Google-rule hash>`` as
Klaviyo, ``gclid:<gclid>`` as Google Ads and GA4, ``external_id:<id>`` as GA4)."""

_SEPARATORS = re.compile(r"[\s\-]+")
_CURRENCY = re.compile(r"[A-Z]{3}")


class CrmFileError(InputError):
    """A file that cannot be imported at all; the message says what to fix."""


@dataclass(frozen=True)
class RowError:
    """A skipped row: its line in the file (the first line of a multi-line CSV record)."""

    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass
class ReadReport:
    """What reading one file found, filled in as its events are consumed."""

    path: Path
    rows: int = 0
    events: int = 0
    error_count: int = 0
    errors: list[RowError] = field(default_factory=list)
    ignored_columns: set[str] = field(default_factory=set)
    unmapped: set[str] = field(default_factory=set)

    def add_error(self, line: int, reason: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_KEPT_ERRORS:
            self.errors.append(RowError(line, reason))

    def unmapped_conversions(self) -> list[PlatformConversion]:
        """Event names no definition maps, for ``pipeline.mapping_snippet``."""
        return [PlatformConversion(platform=Platform.CRM, account_id="", platform_id=name,
                                   name=name) for name in sorted(self.unmapped)]

    def summary(self) -> dict[str, Any]:
        return {"file": str(self.path), "rows": self.rows, "loaded": self.events,
                "bad_rows": self.error_count, "errors": [str(e) for e in self.errors],
                "ignored_columns": sorted(self.ignored_columns),
                "unmapped": sorted(self.unmapped)}


MAX_VALUE = 1e9
"""The largest value an outcome may have (beyond: a typo or a broken export, a bad row)."""
MAX_FIELD = 4_096
"""The longest id a row may carry, in characters."""
EARLIEST = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
"""The earliest outcome time (earlier: an epoch default such as 1970, a bad row)."""


class CrmRow(BaseModel):
    """One row, validated; ``email`` and ``phone`` hold hashes from the moment they are read.

    Validate with ``context={"zone": ZoneInfo | None, "currency": str | None}``."""

    model_config = ConfigDict(frozen=True, extra="ignore", coerce_numbers_to_str=True)

    event: str = Field(min_length=1)
    time: dt.datetime
    value: float = Field(default=0.0, ge=0, le=MAX_VALUE, allow_inf_nan=False)
    currency: str = ""
    event_id: str | None = None
    gclid: str | None = None
    gbraid: str | None = None
    wbraid: str | None = None
    fbc: str | None = None
    fbp: str | None = None
    email: tuple[str, str] | None = None
    """(Google hash, Meta hash) of the address."""
    phone: tuple[str, str] | None = None
    """(Google hash, Meta hash) of the number: E.164 with and without its ``+``."""
    external_id: str | None = None

    @field_validator("time", mode="before")
    @classmethod
    def _aware_utc(cls, value: Any, info: ValidationInfo) -> dt.datetime:
        zone = (info.context or {}).get("zone")
        if not isinstance(value, str):
            raise ValueError("expected ISO 8601 text such as 2026-11-03T14:05:00-05:00")
        return parse_time(value, zone)

    @field_validator("event_id", "gclid", "gbraid", "wbraid", "fbc", "fbp", "external_id",
                     mode="before")
    @classmethod
    def _an_id(cls, value: Any) -> Any:
        """An id, never an address kept in clear (the store refuses any '@' in identifiers)."""
        text = str(value)
        if "@" in text:
            raise ValueError("contains '@': an id, not an email address (emails go in the "
                             "email column, which hashes them)")
        if len(text) > MAX_FIELD:
            raise ValueError(f"longer than {MAX_FIELD:,} characters")
        return value

    @field_validator("currency", mode="before")
    @classmethod
    def _iso_currency(cls, value: Any) -> str:
        code = str(value).upper()
        if not _CURRENCY.fullmatch(code):
            raise ValueError(f"{value!r} is not a three-letter ISO 4217 code like USD")
        return code

    @field_validator("email", mode="before")
    @classmethod
    def _hash_email(cls, value: Any) -> tuple[str, str]:
        if not isinstance(value, str):
            raise ValueError("expected text")
        return hash_email(value)

    @field_validator("phone", mode="before")
    @classmethod
    def _hash_phone(cls, value: Any) -> tuple[str, str]:
        return hash_phone(str(value))

    @model_validator(mode="before")
    @classmethod
    def _default_currency(cls, data: Any, info: ValidationInfo) -> Any:
        default = (info.context or {}).get("currency")
        if default and isinstance(data, dict) and "currency" not in data:
            return {**data, "currency": default}
        return data

    @model_validator(mode="after")
    def _identified_and_priced(self) -> CrmRow:
        if not any(getattr(self, name) for name in IDENTIFIER_COLUMNS):
            raise ValueError(f"no identifier: give at least one of {', '.join(IDENTIFIER_COLUMNS)}")
        if self.value and not self.currency:
            raise ValueError("currency: missing, and the row has a value: add a currency "
                             "column or import with a default currency")
        return self


def parse_time(text: str, zone: ZoneInfo | None) -> dt.datetime:
    """An ISO 8601 time as aware UTC; a time without offset is read in ``zone``.

    An ambiguous local time (the repeated hour when clocks go back) takes its first
    occurrence."""
    text = text.strip()
    try:
        dt.date.fromisoformat(text)
    except ValueError:
        pass
    else:
        raise ValueError(f"{text!r} is a date without a time of day")
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO 8601 time like "
                         "2026-11-03T14:05:00-05:00") from None
    if moment.tzinfo is None:
        if zone is None:
            raise ValueError(f"{text!r} has no UTC offset: add one (Z, -05:00) or import "
                             "with a time zone")
        moment = moment.replace(tzinfo=zone)
    try:
        moment = moment.astimezone(dt.UTC)
    except OverflowError:
        raise ValueError(f"{text!r} is out of range") from None
    if not EARLIEST <= moment <= dt.datetime.now(dt.UTC) + dt.timedelta(days=1):
        raise ValueError(f"{text!r} is before {EARLIEST:%Y} or in the future: not an outcome "
                         "to upload")
    return moment


def read_file(path: Path, mapping: ConversionMap, timezone: str | None = None, *,
              default_currency: str | None = None) -> tuple[Iterator[JourneyEvent], ReadReport]:
    """Stream a CRM file's good rows as journey events; the report fills in as they go.

    Nothing is read until the iterator is consumed; ``CrmFileError`` is raised from it for a
    file that cannot be read at all. ``timezone`` (an IANA name) is where times written
    without offset are read; ``default_currency`` prices rows with a value and no currency."""
    zone = read_zone(timezone)
    report = ReadReport(path)
    context = {"zone": zone, "currency": default_currency}
    return _events(path, mapping, context, report), report


def import_file(store: Store, path: Path, mapping: ConversionMap, timezone: str | None = None,
                *, default_currency: str | None = None) -> ReadReport:
    """Read a CRM file into the store (batched upserts, idempotent keys): see the module doc."""
    events, report = read_file(path, mapping, timezone, default_currency=default_currency)
    store.upsert_journey_events(events)
    return report


def to_journey_event(row: CrmRow, mapping: ConversionMap) -> JourneyEvent:
    google_email, meta_email = row.email or (None, None)
    google_phone, meta_phone = row.phone or (None, None)
    identifiers = Identifiers(
        gclid=row.gclid, gbraid=row.gbraid, wbraid=row.wbraid, fbc=row.fbc, fbp=row.fbp,
        email_sha256_google=google_email, email_sha256_meta=meta_email,
        phone_sha256_google=google_phone, phone_sha256_meta=meta_phone,
        external_id=row.external_id)
    definition = mapping.lookup(Platform.CRM, row.event)
    return JourneyEvent(
        person_key=person_key(identifiers),
        conversion=definition.name if definition else None,
        platform_conversion=row.event, time=row.time, value=row.value, currency=row.currency,
        identifiers=identifiers, source_platform=Platform.CRM,
        source_event_id=event_key(row))


def event_key(row: CrmRow) -> str:
    """The outcome's deterministic ``source_event_id`` (see the module doc, "Keys")."""
    if row.event_id:
        return row.event_id
    time = row.time.isoformat()
    if row.external_id:
        return sha256_hex("\x1f".join(("lead", row.external_id, row.event, time)))
    google_email, meta_email = row.email or ("", "")
    parts = (row.event, time, repr(row.value), row.currency, google_email, meta_email,
             (row.phone or ("",))[0], *(getattr(row, name) or "" for name in CLICK_IDS))
    return sha256_hex("\x1f".join(("row", *parts)))


def person_key(identifiers: Identifiers) -> str:
    """``<prefix>:<value>`` of the first identifier in ``PERSON_KEYS``."""
    for prefix, name in PERSON_KEYS:
        value = getattr(identifiers, name)
        if value:
            return f"{prefix}:{value}"
    raise ValueError("no identifier to key the person by")


def read_zone(timezone: str | None) -> ZoneInfo | None:
    """The zone naive times are read in (None: none given); ValueError naming a bad one."""
    if not timezone:
        return None
    try:
        return ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {timezone!r}: use an IANA name such as "
                         "'America/New_York'") from None


Record = dict[str, Any] | str
"""A row's fields by canonical column name, or why the row could not be split into fields."""


def _events(path: Path, mapping: ConversionMap, context: dict[str, Any],
            report: ReadReport) -> Iterator[JourneyEvent]:
    with _open(path) as handle:
        for line, record in _records(path, handle, report):
            report.rows += 1
            if isinstance(record, str):
                report.add_error(line, record)
                continue
            try:
                row = CrmRow.model_validate(record, context=context)
            except ValidationError as error:
                report.add_error(line, _reason(error))
                continue
            event = to_journey_event(row, mapping)
            if event.conversion is None:
                report.unmapped.add(row.event)
            report.events += 1
            yield event


@contextmanager
def _open(path: Path) -> Iterator[IO[str]]:
    """The file as text (UTF-8, a spreadsheet's byte-order mark allowed)."""
    if path.suffix.lower() not in CSV_SUFFIXES + JSONL_SUFFIXES:
        raise CrmFileError(f"{path}: unknown file type {path.suffix!r}: name it .csv for CSV "
                           "or .jsonl for JSON Lines")
    try:
        _check_utf8(path)
        with path.open(encoding="utf-8-sig", newline="") as handle:
            yield handle
    except FileNotFoundError:
        raise CrmFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CrmFileError(f"{path}: a directory, not a file") from None


def _check_utf8(path: Path) -> None:
    """Refuse a file that is not UTF-8 before a row of it is stored (a bad byte at row
    12,001 used to refuse it after 10,000 rows were in the store), naming the line."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    lines = 1
    with path.open("rb") as raw:
        while chunk := raw.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as error:
                line = lines + chunk.count(b"\n", 0, error.start)
                raise CrmFileError(f"{path}: line {line} is not UTF-8 text: save the file as "
                                   "UTF-8 (CSV UTF-8 in spreadsheet programs); nothing was "
                                   "stored") from None
            lines += chunk.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise CrmFileError(f"{path}: ends inside a character: not UTF-8 text; nothing "
                               "was stored") from None


def _records(path: Path, handle: IO[str], report: ReadReport) -> Iterator[tuple[int, Record]]:
    if path.suffix.lower() in CSV_SUFFIXES:
        return _csv_records(path, handle, report)
    return _jsonl_records(handle, report)


CSV_FIELD_LIMIT = 16 * 1024 * 1024
"""Characters a CSV field may have before the file is refused (csv's own 131,072 refused a
file for one long note; a long id is one bad row, see MAX_FIELD)."""


def _csv_records(path: Path, handle: IO[str],
                 report: ReadReport) -> Iterator[tuple[int, Record]]:
    csv.field_size_limit(CSV_FIELD_LIMIT)
    reader = csv.reader(handle)
    try:
        header = next(reader, None)
        if header is None:
            raise CrmFileError(f"{path}: empty file: expected a header line naming the columns")
        columns = _header_columns(path, header, report)
        line = reader.line_num
        for cells in reader:
            start, line = line + 1, reader.line_num
            if any(cell.strip() for cell in cells):
                yield start, _csv_record(columns, cells)
    except csv.Error as error:
        raise CrmFileError(f"{path}: line {reader.line_num}: {error}") from None


def _header_columns(path: Path, header: list[str], report: ReadReport) -> list[str | None]:
    """Each header cell's canonical column, None for ignored ones; checks what is required."""
    columns: list[str | None] = []
    for cell in header:
        name = _canonical(cell)
        if name is None and cell.strip():
            report.ignored_columns.add(cell.strip())
        if name is not None and name in columns:
            raise CrmFileError(f"{path}: two columns mean {name!r}: keep one")
        columns.append(name)
    missing = [name for name in REQUIRED_COLUMNS if name not in columns]
    if missing:
        raise CrmFileError(f"{path}: missing column(s) {', '.join(missing)} in the header "
                           f"line; it names {', '.join(c.strip() for c in header)}")
    if not any(name in columns for name in IDENTIFIER_COLUMNS):
        raise CrmFileError(f"{path}: no identifier column: add at least one of "
                           f"{', '.join(IDENTIFIER_COLUMNS)}")
    return columns


def _csv_record(columns: list[str | None], cells: list[str]) -> Record:
    extra = cells[len(columns):]
    if len(cells) < len(columns) or any(cell.strip() for cell in extra):
        return f"{len(cells)} fields where the header has {len(columns)}"
    return {name: cell.strip() for name, cell in zip(columns, cells, strict=False)
            if name is not None and cell.strip()}


def _jsonl_records(handle: IO[str], report: ReadReport) -> Iterator[tuple[int, Record]]:
    for number, text in enumerate(handle, start=1):
        if not text.strip():
            continue
        try:
            item = json.loads(text)
        except json.JSONDecodeError as error:
            yield number, f"not valid JSON: {error.msg} at column {error.colno}"
            continue
        if not isinstance(item, dict):
            yield number, "not a JSON object"
            continue
        yield number, _json_record(item, report)


def _json_record(item: dict[str, Any], report: ReadReport) -> Record:
    record: dict[str, Any] = {}
    for key, value in item.items():
        name = _canonical(key)
        if name is None:
            report.ignored_columns.add(key)
            continue
        if name in record:
            return f"two fields mean {name!r}: keep one"
        if isinstance(value, str):
            value = value.strip()
        if value not in (None, ""):
            record[name] = value
    return record


def _canonical(column: str) -> str | None:
    name = _SEPARATORS.sub("_", column.strip().lower())
    name = ALIASES.get(name, name)
    return name if name in COLUMNS else None


def _reason(error: ValidationError) -> str:
    """Pydantic's errors as one line, field by field, without the rejected values (PII)."""
    parts = []
    for item in error.errors(include_url=False, include_input=False, include_context=False):
        message = "missing" if item["type"] == "missing" else item["msg"]
        message = message.removeprefix("Value error, ")
        where = ".".join(str(part) for part in item["loc"])
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)
