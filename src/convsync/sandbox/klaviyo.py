"""The Klaviyo API simulator: JSON:API at revision 2026-10-15, served from the synthetic world.

Endpoints: ``GET /api/accounts``, ``GET /api/metrics``, ``GET /api/metrics/{id}``,
``GET /api/events`` and ``POST /api/metric-aggregates`` (the event uploads, ``POST /api/events``
and ``POST /api/event-bulk-create-jobs``, are ``klaviyo_events.py``'s), with Klaviyo's
authentication (``Authorization: Klaviyo-API-Key pk_...``), ``revision`` header, JSON:API error
documents, ``RateLimit-*`` headers and cursor paging. Everything is recomputed from
``World.klaviyo_*`` on each request: a page cursor carries the position of the last event served
(timestamp, event id), so paging keeps no state and a page never changes once served. (A walk
through the events is kept for a while after a page so that the next page's request can resume
it instead of rescanning the world: a shortcut that serves exactly what a fresh walk would.)

Events carry whole-second times on the wire (``timestamp`` and ``datetime`` are the world's time
floored to the second) and every datetime filter compares against that second, so what a filter
keeps always agrees with what the events it returns say.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import contextlib
import datetime as dt
import hashlib
import json
import math
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from itertools import chain, islice
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np

from convsync.sandbox.control import Fault, Sandbox
from convsync.sandbox.http import ApiError, Handler, Request, Response, serve_rest
from convsync.sandbox.world import DAY, KlaviyoEvent, KlaviyoMetric, World

if TYPE_CHECKING:
    from convsync.sandbox.klaviyo_events import KlaviyoEvents

LATEST_REVISION = dt.date(2026, 10, 15)
FIRST_REVISION = dt.date(2022, 10, 17)
"""The first stable revision: the endpoints simulated here exist in every revision since."""
JSON_API = "application/vnd.api+json"
NO_ACCOUNTS_READ = "-no-accounts-read"
"""A private key ending so lacks the ``accounts:read`` scope: ``GET /api/accounts`` answers
403 permission_denied, as Klaviyo does for a key made without it (to try the fallback)."""

EVENTS_PAGE_SIZE_DEFAULT = 200
EVENTS_PAGE_SIZE_MAX = 1000
STEADY_LIMITS = {"get_events": 3500, "get_metrics": 150, "get_metric": 150,
                 "query_metric_aggregates": 60, "get_accounts": 15}
"""Requests per minute (Klaviyo's "steady" window) per endpoint, reported in RateLimit-*."""

EVENT_FIELDS = ("timestamp", "event_properties", "datetime", "uuid")
ACCOUNT_FIELDS = ("test_account", "contact_information", "industry", "timezone",
                  "preferred_currency", "public_api_key", "locale")
METRIC_FIELDS = ("name", "created", "updated", "integration")
PROFILE_FIELDS = ("email", "phone_number", "external_id", "first_name", "last_name",
                  "organization", "locale", "title", "image", "created", "updated",
                  "last_event_date", "location", "properties")
EVENT_INCLUDES = frozenset({"attributions", "metric", "profile"})
EVENT_SORTS = {"datetime": False, "-datetime": True, "timestamp": False, "-timestamp": True}

INTEGRATIONS: dict[str, dict[str, str]] = {
    "shopify": {"object": "integration", "id": "0eMvjm", "key": "shopify", "name": "Shopify",
                "category": "eCommerce"},
    "klaviyo": {"object": "integration", "id": "0rG4eQ", "key": "klaviyo", "name": "Klaviyo",
                "category": "Internal"},
}
"""Metric sources: the shop's funnel metrics come from its Shopify integration, list
subscriptions are Klaviyo's own (the world does not model integrations; this is presentation)."""
NATIVE_METRICS = frozenset({"Subscribed to List"})

MEASUREMENTS = ("count", "sum_value", "unique")
INTERVALS = ("hour", "day", "week", "month")
UNSUPPORTED_TIMEZONES = frozenset({"Factory", "Europe/Kyiv", "Pacific/Kanton"})
AGGREGATE_DIMENSIONS = frozenset({
    "$attributed_channel", "$attributed_flow", "$attributed_message", "$attributed_variation",
    "$campaign_channel", "$flow", "$flow_channel", "$message", "$message_send_cohort",
    "$usage_amount", "$value_currency", "$variation", "$variation_send_cohort", "Bot Click",
    "Bounce Type", "Campaign Name", "Client Canonical", "Client Name", "Client Type",
    "Email Domain", "Failure Source", "Failure Type", "From Number", "From Phone Region",
    "Inbox Provider", "List", "Message Format", "Message Name", "Message Type", "Method",
    "Segment Count", "Subject", "To Number", "To Phone Region", "URL", "form_id"})
"""What metric aggregates can group (``by``) and filter on, as the 2026-10-15 schema lists."""

RANGE_OPERATORS = frozenset({"greater-or-equal", "greater-than", "less-or-equal", "less-than"})
EVENT_FILTER_OPERATORS: dict[str, frozenset[str]] = {
    "metric_id": frozenset({"equals"}), "profile_id": frozenset({"equals"}),
    "profile": frozenset({"has"}), "metric": frozenset({"has"}),
    "datetime": RANGE_OPERATORS, "timestamp": RANGE_OPERATORS,
}
_UUID_NAMESPACE = uuid.UUID("5b8e6c1e-3f7a-4c55-9d0b-6b1f2f4b9a10")


# -- errors ------------------------------------------------------------------------------

def error_document(status: int, code: str, title: str, detail: str,
                   source: dict[str, str] | None = None) -> dict[str, Any]:
    """Klaviyo's JSON:API error document (``status`` is an int on the real API too)."""
    return {"errors": [{"id": str(uuid.uuid4()), "status": status, "code": code, "title": title,
                        "detail": detail, "source": source or {"pointer": "/data/"}}]}


def _error(status: int, code: str, title: str, detail: str,
           source: dict[str, str] | None = None) -> ApiError:
    body = error_document(status, code, title, detail, source)
    return ApiError(Response(status, body, content_type=JSON_API))


def _invalid(detail: str, *, parameter: str | None = None, pointer: str | None = None) -> ApiError:
    source = {"parameter": parameter} if parameter else {"pointer": pointer or "/data/"}
    return _error(400, "invalid", "Invalid input.", detail, source)


def _not_found(detail: str) -> ApiError:
    return _error(404, "not_found", "Not found.", detail)


# -- filter expressions ----------------------------------------------------------------------

class FilterError(ValueError):
    """A filter expression Klaviyo would refuse; the message says why."""


@dataclass(frozen=True)
class Condition:
    op: str
    field: str
    value: Any = None


_OPERATOR = re.compile(r"[a-z][a-z-]*")


def parse_filter(text: str) -> list[Condition]:
    """``op(field,value)`` expressions, comma-separated or inside ``and(...)``, flattened.

    Values: JSON strings, numbers, true/false/null, unquoted ISO 8601 datetimes, [lists]."""
    return _FilterParser(text).parse()


class _FilterParser:
    def __init__(self, text: str) -> None:
        self.text, self.pos = text, 0

    def parse(self) -> list[Condition]:
        conditions = self._expressions()
        if self.pos != len(self.text):
            raise self._fail("unexpected text")
        return conditions

    def _expressions(self) -> list[Condition]:
        conditions = self._expression()
        while self._peek() == ",":
            self.pos += 1
            conditions += self._expression()
        return conditions

    def _expression(self) -> list[Condition]:
        match = _OPERATOR.match(self.text, self.pos)
        if not match or self.text[match.end():match.end() + 1] != "(":
            raise self._fail("expected an expression such as equals(field,value)")
        op, self.pos = match.group(), match.end() + 1
        if op in ("or", "not"):
            raise FilterError(f"'{op}' is not supported by this endpoint's filter")
        conditions = self._expressions() if op == "and" else [self._condition(op)]
        self._expect(")")
        return conditions

    def _condition(self, op: str) -> Condition:
        end = self._scan_to(",)")
        name = self.text[self.pos:end].strip()
        if not name:
            raise self._fail("missing field name")
        self.pos = end
        if op == "has":
            return Condition(op, name)
        self._expect(",")
        return Condition(op, name, self._value())

    def _value(self) -> Any:
        char = self._peek()
        if char == '"':
            try:
                value, self.pos = json.JSONDecoder().raw_decode(self.text, self.pos)
            except json.JSONDecodeError as error:
                raise self._fail("unterminated string") from error
            return value
        if char == "[":
            return self._list()
        end = self._scan_to(",)]")
        raw, self.pos = self.text[self.pos:end], end
        return _literal(raw)

    def _list(self) -> list[Any]:
        self.pos += 1
        values = [self._value()]
        while self._peek() == ",":
            self.pos += 1
            values.append(self._value())
        self._expect("]")
        return values

    def _scan_to(self, stops: str) -> int:
        end = self.pos
        while end < len(self.text) and self.text[end] not in stops:
            end += 1
        return end

    def _peek(self) -> str:
        return self.text[self.pos:self.pos + 1]

    def _expect(self, char: str) -> None:
        if self._peek() != char:
            raise self._fail(f"expected '{char}'")
        self.pos += 1

    def _fail(self, reason: str) -> FilterError:
        return FilterError(f"{reason} at position {self.pos} of {self.text!r}")


def _literal(raw: str) -> Any:
    words: dict[str, Any] = {"true": True, "false": False, "null": None}
    if raw in words:
        return words[raw]
    for convert in (int, float):
        try:
            return convert(raw)
        except ValueError:
            pass
    try:
        return dt.datetime.fromisoformat(raw)
    except ValueError:
        pass
    hint = " (encode '+' in a UTC offset as %2B)" if " " in raw else ""
    raise FilterError(f"{raw!r} is not a valid value{hint}")


def _as_datetime(condition: Condition, default_tz: dt.tzinfo) -> dt.datetime:
    value = condition.value
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = dt.datetime.fromisoformat(value)
    if not isinstance(value, dt.datetime):
        raise FilterError(f"'{condition.field}' needs an ISO 8601 datetime, got {value!r}")
    return value if value.tzinfo else value.replace(tzinfo=default_tz)


def _as_seconds(condition: Condition) -> float:
    """The moment a datetime or timestamp condition names, in epoch seconds (naive = UTC)."""
    if condition.field == "datetime":
        return _as_datetime(condition, dt.UTC).timestamp()
    if isinstance(condition.value, bool) or not isinstance(condition.value, int | float):
        raise FilterError(f"'timestamp' needs a number of seconds, got {condition.value!r}")
    return float(condition.value)


def _tighten(bounds: tuple[int, int], op: str, seconds: float) -> tuple[int, int]:
    """Narrow [lo, hi) (float event times) so it keeps the events whose whole second passes."""
    lo, hi = bounds
    if op == "greater-or-equal":
        return max(lo, math.ceil(seconds)), hi
    if op == "greater-than":
        return max(lo, math.floor(seconds) + 1), hi
    if op == "less-than":
        return lo, min(hi, math.ceil(seconds))
    return lo, min(hi, math.floor(seconds) + 1)  # less-or-equal


# -- the events query ------------------------------------------------------------------------

@dataclass
class EventSelection:
    """What ``GET /api/events`` asked for: a time span, an optional metric and profile."""

    lo: int
    hi: int
    metric: KlaviyoMetric | None = None
    profile_id: str | None = None
    empty: bool = False  # a metric id that does not exist, or contradictory equals()


def select_events(world: World, conditions: list[Condition]) -> EventSelection:
    selection = EventSelection(world.first_day * DAY, math.floor(world.as_of_ts) + 1)
    bounds = (selection.lo, selection.hi)
    for condition in conditions:
        allowed = EVENT_FILTER_OPERATORS.get(condition.field)
        if allowed is None:
            raise FilterError(f"'{condition.field}' is not a valid field for the resource 'event'")
        if condition.op not in allowed:
            raise FilterError(f"'{condition.op}' is not a valid operator for "
                              f"'{condition.field}'; use one of {', '.join(sorted(allowed))}")
        if condition.op in RANGE_OPERATORS:
            bounds = _tighten(bounds, condition.op, _as_seconds(condition))
        elif condition.op == "equals":
            _select_equal(world, selection, condition)
    selection.lo, selection.hi = bounds
    return selection


def _select_equal(world: World, selection: EventSelection, condition: Condition) -> None:
    if not isinstance(condition.value, str):
        raise FilterError(f"'{condition.field}' needs a quoted string, got {condition.value!r}")
    if condition.field == "profile_id":
        selection.empty |= selection.profile_id not in (None, condition.value)
        selection.profile_id = condition.value
        return
    metric = next((m for m in world.klaviyo_metrics if m.id == condition.value), None)
    selection.empty |= metric is None or selection.metric not in (None, metric)
    selection.metric = metric


def _utc(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.UTC)


def events_after(world: World, selection: EventSelection,
                 after: tuple[float, str] | None) -> Iterator[KlaviyoEvent]:
    """Selected events in (time, id) order, strictly after the cursor position."""
    lo = selection.lo if after is None else max(selection.lo, math.floor(after[0]))
    for event in world.klaviyo_events(_utc(lo), _utc(selection.hi), selection.metric):
        if after is None or (event.timestamp, event.id) > after:
            yield event


def events_before(world: World, selection: EventSelection,
                  before: tuple[float, str] | None) -> Iterator[KlaviyoEvent]:
    """Selected events newest first, strictly before the cursor position (a week at a time)."""
    hi = selection.hi if before is None else min(selection.hi, math.floor(before[0]) + 1)
    while hi > selection.lo:
        lo = max(selection.lo, hi - 7 * DAY)
        week = list(world.klaviyo_events(_utc(lo), _utc(hi), selection.metric))
        for event in reversed(week):
            if before is None or (event.timestamp, event.id) < before:
                yield event
        hi = lo


def encode_cursor(event: KlaviyoEvent) -> str:
    raw = json.dumps([event.timestamp, event.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    """The SDK sends ``page[cursor]==X`` (it keeps the '=' of the link): tolerate one."""
    token = cursor.removeprefix("=")
    try:
        ts, event_id = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        return float(ts), str(event_id)
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError) as error:
        raise _invalid(f"Invalid page cursor {cursor!r}.", parameter="page[cursor]") from error


# -- resources ----------------------------------------------------------------------------------

def _whole_second(event: KlaviyoEvent) -> int:
    return math.floor(event.timestamp)


def _sparse(attributes: dict[str, Any], fields: list[str] | None) -> dict[str, Any]:
    if fields is None:
        return attributes
    wanted = {name.split(".")[0] for name in fields}
    return {k: v for k, v in attributes.items() if k in wanted}


def _relationship_links(base: str, kind: str, ident: str, name: str) -> dict[str, str]:
    return {"self": f"{base}/api/{kind}/{ident}/relationships/{name}/",
            "related": f"{base}/api/{kind}/{ident}/{name}/"}


_EVENT_ATTRIBUTES: dict[str, Callable[[KlaviyoEvent, int], Any]] = {
    "timestamp": lambda event, second: second,
    "event_properties": lambda event, second: event.properties,
    "datetime": lambda event, second: _utc(second).isoformat(),
    "uuid": lambda event, second: str(uuid.uuid5(_UUID_NAMESPACE, event.id)),
}


def event_resource(event: KlaviyoEvent, base: str, fields: list[str] | None,
                   with_attributions: bool) -> dict[str, Any]:
    second = _whole_second(event)
    wanted = _EVENT_ATTRIBUTES.keys() if fields is None else {f.split(".")[0] for f in fields}
    attributes = {name: make(event, second) for name, make in _EVENT_ATTRIBUTES.items()
                  if name in wanted}
    relationships: dict[str, Any] = {
        "profile": {"data": {"type": "profile", "id": event.profile_id},
                    "links": _relationship_links(base, "events", event.id, "profile")},
        "metric": {"data": {"type": "metric", "id": event.metric.id},
                   "links": _relationship_links(base, "events", event.id, "metric")},
    }
    if with_attributions:  # the world attributes nothing to Klaviyo messages
        relationships["attributions"] = {
            "data": [], "links": _relationship_links(base, "events", event.id, "attributions")}
    return {"type": "event", "id": event.id, "attributes": attributes,
            "relationships": relationships, "links": {"self": f"{base}/api/events/{event.id}/"}}


def profile_resource(event: KlaviyoEvent, base: str, fields: list[str] | None) -> dict[str, Any]:
    """The profile behind an event: the world knows its email only."""
    attributes: dict[str, Any] = dict.fromkeys(PROFILE_FIELDS)
    attributes.update(email=event.email, properties={})
    return {"type": "profile", "id": event.profile_id, "attributes": _sparse(attributes, fields),
            "links": {"self": f"{base}/api/profiles/{event.profile_id}/"}}


def account_resource(world: World, base: str, fields: list[str] | None) -> dict[str, Any]:
    """The account behind the key: id, time zone and currency from the world's accounts."""
    accounts = world.accounts
    attributes = {
        "test_account": False,
        "contact_information": {
            "default_sender_name": "Sandbox Outdoor", "default_sender_email": "shop@example.com",
            "website_url": "https://shop.example.com", "organization_name": "Sandbox Outdoor",
            "street_address": {"address1": "1 Sandbox Way", "address2": None,
                               "city": "Boston", "region": "MA", "country": "US",
                               "zip": "02110"}},
        "industry": "Retail / Outdoor", "timezone": accounts.klaviyo_tz,
        "preferred_currency": accounts.currency,
        "public_api_key": accounts.klaviyo_account_id, "locale": "en-US"}
    ident = accounts.klaviyo_account_id
    return {"type": "account", "id": ident, "attributes": _sparse(attributes, fields),
            "links": {"self": f"{base}/api/accounts/{ident}/"}}


def integration_of(metric: KlaviyoMetric) -> dict[str, str]:
    return INTEGRATIONS["klaviyo" if metric.name in NATIVE_METRICS else "shopify"]


def metric_resource(world: World, metric: KlaviyoMetric, base: str,
                    fields: list[str] | None) -> dict[str, Any]:
    created = dt.datetime.combine(world.start, dt.time(), dt.UTC).isoformat()
    attributes = {"name": metric.name, "created": created, "updated": created,
                  "integration": integration_of(metric)}
    return {"type": "metric", "id": metric.id, "attributes": _sparse(attributes, fields),
            "links": {"self": f"{base}/api/metrics/{metric.id}/"}}


# -- query-string parameters ---------------------------------------------------------------------

def _csv(request: Request, name: str) -> list[str] | None:
    raw = request.arg(name)
    return None if raw is None else [part.strip() for part in raw.split(",") if part.strip()]


def _sparse_fields(request: Request, resource: str, known: tuple[str, ...]) -> list[str] | None:
    fields = _csv(request, f"fields[{resource}]")
    for name in fields or ():
        if name.split(".")[0] not in known:
            raise _invalid(f"'{name}' is not a valid field for the resource '{resource}'.",
                           parameter=f"fields[{resource}]")
    return fields


def _page_size(request: Request) -> int:
    raw = request.arg("page[size]")
    if raw is None:
        return EVENTS_PAGE_SIZE_DEFAULT
    if not raw.isdigit() or not 1 <= int(raw) <= EVENTS_PAGE_SIZE_MAX:
        raise _invalid(f"page[size] must be an integer from 1 to {EVENTS_PAGE_SIZE_MAX}, "
                       f"got {raw!r}.", parameter="page[size]")
    return int(raw)


def _filter_conditions(request: Request) -> list[Condition]:
    raw = request.arg("filter")
    if not raw:
        return []
    try:
        return parse_filter(raw)
    except FilterError as error:
        raise _invalid(f"Invalid filter provided: {error}", parameter="filter") from error


def _base_url(request: Request) -> str:
    """Links are https, as on a.klaviyo.com: the SDK only takes a cursor out of an https link."""
    return f"https://{request.headers.get('Host', 'a.klaviyo.com')}"


def _collection_links(request: Request, next_cursor: str | None) -> dict[str, str | None]:
    url = f"{_base_url(request)}{request.path}"
    query = {k: v for k, v in request.query.items() if k != "page[cursor]"}
    links: dict[str, str | None] = {
        "self": f"{url}?{urlencode(request.query, doseq=True)}" if request.query else url,
        "next": None, "prev": None}
    if next_cursor:
        links["next"] = f"{url}?{urlencode({**query, 'page[cursor]': next_cursor}, doseq=True)}"
    return links


# -- metric aggregates ----------------------------------------------------------------------------

@dataclass
class AggregateQuery:
    metric: KlaviyoMetric
    measurements: list[str]
    interval: str
    tz: ZoneInfo
    lo: dt.datetime
    hi: dt.datetime
    by: list[str] = field(default_factory=list)
    matches: list[Condition] = field(default_factory=list)


def _pointer(name: str) -> str:
    return f"/data/attributes/{name}"


def parse_aggregate_query(world: World, body: Any) -> AggregateQuery:
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, dict):
        raise _invalid("The request body must be a JSON:API document with a data object.",
                       pointer="/data")
    if data.get("type") != "metric-aggregate":
        raise _invalid(f"Expected data.type 'metric-aggregate', got {data.get('type')!r}.",
                       pointer="/data/type")
    attributes = data.get("attributes")
    if not isinstance(attributes, dict):
        raise _invalid("data.attributes is required.", pointer="/data/attributes")
    tz = _timezone(attributes.get("timezone", "UTC"))
    lo, hi, matches = _aggregate_filters(attributes.get("filter"), tz)
    return AggregateQuery(
        metric=_aggregate_metric(world, attributes.get("metric_id")),
        measurements=_measurements(attributes.get("measurements")),
        interval=_interval(attributes.get("interval", "day")), tz=tz, lo=lo, hi=hi,
        by=_dimensions(attributes.get("by"), "by"), matches=matches)


def _aggregate_metric(world: World, metric_id: Any) -> KlaviyoMetric:
    if not isinstance(metric_id, str) or not metric_id:
        raise _invalid("metric_id is required.", pointer=_pointer("metric_id"))
    metric = next((m for m in world.klaviyo_metrics if m.id == metric_id), None)
    if metric is None:
        raise _invalid(f"Metric {metric_id!r} does not exist.", pointer=_pointer("metric_id"))
    return metric


def _measurements(value: Any) -> list[str]:
    if (not isinstance(value, list) or not value
            or any(m not in MEASUREMENTS for m in value)):
        raise _invalid(f"measurements must be a non-empty list of {', '.join(MEASUREMENTS)}; "
                       f"got {value!r}.", pointer=_pointer("measurements"))
    return list(dict.fromkeys(value))


def _interval(value: Any) -> str:
    if value not in INTERVALS:
        raise _invalid(f"interval must be one of {', '.join(INTERVALS)}; got {value!r}.",
                       pointer=_pointer("interval"))
    return str(value)


def _timezone(name: Any) -> ZoneInfo:
    try:
        if not isinstance(name, str) or name in UNSUPPORTED_TIMEZONES:
            raise ValueError(name)
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as error:
        raise _invalid(f"{name!r} is not a supported IANA time zone (names are case-sensitive).",
                       pointer=_pointer("timezone")) from error


def _dimensions(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or any(d not in AGGREGATE_DIMENSIONS for d in value):
        raise _invalid(f"{name} must list supported attributes such as '$flow' or "
                       f"'$attributed_message'; got {value!r}.", pointer=_pointer(name))
    return list(value)


def _aggregate_filters(value: Any, tz: ZoneInfo
                       ) -> tuple[dt.datetime, dt.datetime, list[Condition]]:
    """(start, end, attribute conditions); naive datetimes are read in the query's time zone."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _invalid("filter must be a list of strings.", pointer=_pointer("filter"))
    try:
        conditions = [c for text in value for c in parse_filter(text)]
        lo, hi, matches = _split_time_range(conditions, tz)
    except FilterError as error:
        raise _invalid(f"Invalid filter provided: {error}", pointer=_pointer("filter")) from error
    if lo is None or hi is None:
        raise _invalid("filter must include a time range: greater-or-equal(datetime,...) and "
                       "less-than(datetime,...).", pointer=_pointer("filter"))
    if hi <= lo:
        raise _invalid("The end of the time range must be after its start.",
                       pointer=_pointer("filter"))
    if hi > _one_year_after(lo.astimezone(tz)):
        raise _invalid("The time range cannot be longer than one year.",
                       pointer=_pointer("filter"))
    return lo, hi, matches


def _split_time_range(conditions: list[Condition], tz: ZoneInfo
                      ) -> tuple[dt.datetime | None, dt.datetime | None, list[Condition]]:
    lo = hi = None
    matches = []
    for condition in conditions:
        if condition.field == "datetime" and condition.op == "greater-or-equal":
            lo = _as_datetime(condition, tz)
        elif condition.field == "datetime" and condition.op == "less-than":
            hi = _as_datetime(condition, tz)
        elif condition.field in AGGREGATE_DIMENSIONS and condition.op in ("equals", "any"):
            matches.append(condition)
        else:
            raise FilterError(f"'{condition.op}({condition.field},...)' is not supported: use "
                              "greater-or-equal/less-than on datetime, equals/any on attributes")
    return lo, hi, matches


def _one_year_after(moment: dt.datetime) -> dt.datetime:
    try:
        return moment.replace(year=moment.year + 1)
    except ValueError:  # 29 February
        return moment.replace(year=moment.year + 1, day=28)


def _matches(event: KlaviyoEvent, conditions: list[Condition]) -> bool:
    for condition in conditions:
        actual = event.properties.get(condition.field)
        wanted = condition.value if condition.op == "any" else [condition.value]
        if actual is None or actual not in wanted:
            return False
    return True


def interval_starts(lo: dt.datetime, hi: dt.datetime, interval: str,
                    tz: ZoneInfo) -> list[dt.datetime]:
    """Starts of the hour/day/week/month buckets covering [lo, hi), local to ``tz``.

    Days and months follow the local calendar; weeks are 7-day runs from the first day."""
    local = lo.astimezone(tz)
    if interval == "hour":
        start = local.replace(minute=0, second=0, microsecond=0)
    elif interval == "month":
        start = dt.datetime.combine(local.date().replace(day=1), dt.time(), tz)
    else:
        start = dt.datetime.combine(local.date(), dt.time(), tz)
    starts = []
    while start < hi:
        starts.append(start)
        start = _next_start(start, interval, tz)
    return starts


def _next_start(start: dt.datetime, interval: str, tz: ZoneInfo) -> dt.datetime:
    if interval == "hour":
        return (start.astimezone(dt.UTC) + dt.timedelta(hours=1)).astimezone(tz)
    day = start.date()
    if interval == "month":
        day = (day.replace(day=28) + dt.timedelta(days=4)).replace(day=1)
    else:
        day += dt.timedelta(days=7 if interval == "week" else 1)
    return dt.datetime.combine(day, dt.time(), tz)


@dataclass
class _Cells:
    counts: list[int]
    sums: list[float]
    people: list[set[str]]

    @classmethod
    def empty(cls, size: int) -> _Cells:
        return cls([0] * size, [0.0] * size, [set() for _ in range(size)])

    def add(self, bucket: int, event: KlaviyoEvent) -> None:
        self.counts[bucket] += 1
        self.sums[bucket] += event.value
        self.people[bucket].add(event.profile_id)

    def measurements(self, names: list[str]) -> dict[str, list[float]]:
        series = {"count": [float(n) for n in self.counts],
                  "sum_value": [round(v, 2) for v in self.sums],
                  "unique": [float(len(p)) for p in self.people]}
        return {name: series[name] for name in names}


def aggregate(world: World,
              query: AggregateQuery) -> tuple[list[dt.datetime], list[dict[str, Any]]]:
    """(bucket starts, rows): one row without ``by``; with it, one per dimension tuple
    (events that lack a dimension land in a row with empty ``dimensions``, as Klaviyo says)."""
    starts = interval_starts(query.lo, query.hi, query.interval, query.tz)
    edges = [s.timestamp() for s in starts]
    if not query.by and not query.matches and "unique" not in query.measurements:
        return starts, [_counted_row(world, query, edges)]
    groups: dict[tuple[str, ...], _Cells] = {}
    if not query.by:
        groups[()] = _Cells.empty(len(starts))
    for event in world.klaviyo_events(query.lo, query.hi, query.metric):
        if not _matches(event, query.matches):
            continue
        key = tuple(str(event.properties[d]) for d in query.by if d in event.properties)
        cells = groups.setdefault(key if len(key) == len(query.by) else (),
                                  _Cells.empty(len(starts)))
        cells.add(bisect.bisect_right(edges, event.timestamp) - 1, event)
    rows = [{"dimensions": list(key), "measurements": cells.measurements(query.measurements)}
            for key, cells in sorted(groups.items())]
    return starts, rows


def _counted_row(world: World, query: AggregateQuery, edges: list[float]) -> dict[str, Any]:
    """The one row of an ungrouped, unfiltered count / sum_value query, from the world's event
    times in bulk: a year of a busy metric in well under a second instead of a minute."""
    counts, sums = np.zeros(len(edges)), np.zeros(len(edges))
    for times, values in world.klaviyo_event_times(query.metric, query.lo, query.hi):
        buckets = np.searchsorted(edges, times, side="right") - 1
        counts += np.bincount(buckets, minlength=len(edges))
        sums += np.bincount(buckets, weights=values, minlength=len(edges))
    series = {"count": counts.tolist(), "sum_value": [round(v, 2) for v in sums.tolist()]}
    return {"dimensions": [], "measurements": {m: series[m] for m in query.measurements}}


# -- request gates: revision, authentication, rate-limit headers ----------------------------------

_REVISION = re.compile(r"(\d{4}-\d{2}-\d{2})(\.[A-Za-z0-9]+)?")


def check_revision(value: str | None) -> None:
    if not value:
        raise _invalid("Missing `revision` header: send the API revision, e.g. "
                       f"`revision: {LATEST_REVISION.isoformat()}`.", parameter="revision")
    match = _REVISION.fullmatch(value.strip())
    try:
        date = dt.date.fromisoformat(match.group(1)) if match else None
    except ValueError:
        date = None
    if date is None:
        raise _invalid(f"Invalid revision {value!r}: expected YYYY-MM-DD[.suffix].",
                       parameter="revision")
    if date > LATEST_REVISION:
        raise _invalid(f"Invalid revision {value!r}: the latest revision is "
                       f"{LATEST_REVISION.isoformat()}.", parameter="revision")
    if date < FIRST_REVISION:
        raise _not_found("No valid revisions found for method.")


class SteadyWindows:
    """Fixed one-minute windows per endpoint behind the RateLimit-* headers (not enforced:
    inject a ``rate_limit`` fault to get a 429)."""

    def __init__(self, limits: Mapping[str, int] | None = None) -> None:
        self.limits = {**STEADY_LIMITS, **(limits or {})}
        self._lock = threading.Lock()
        self._windows: dict[str, tuple[float, int]] = {}

    def headers(self, label: str) -> dict[str, str]:
        limit, now = self.limits[label], time.monotonic()
        with self._lock:
            start, used = self._windows.get(label, (now, 0))
            if now - start >= 60:
                start, used = now, 0
            self._windows[label] = (start, used + 1)
        return {"RateLimit-Limit": str(limit),
                "RateLimit-Remaining": str(max(limit - used - 1, 0)),
                "RateLimit-Reset": str(max(1, math.ceil(60 - (now - start))))}


class Walks:
    """Event walks suspended after a page, keyed by the selection, the world's clock and the
    position of the page's last event. The next page's request resumes its walk instead of
    rescanning up to HORIZON_DAYS of the world to find its place; a miss (another clock, an
    evicted walk, a cursor from elsewhere) walks from the cursor as before, to the same events."""

    def __init__(self, size: int = 16) -> None:
        self.size = size
        self.resumed = 0
        self._lock = threading.Lock()
        self._walks: OrderedDict[tuple[Any, ...], Iterator[KlaviyoEvent]] = OrderedDict()

    def take(self, key: tuple[Any, ...]) -> Iterator[KlaviyoEvent] | None:
        with self._lock:
            walk = self._walks.pop(key, None)
            self.resumed += walk is not None
            return walk

    def put(self, key: tuple[Any, ...], walk: Iterator[KlaviyoEvent]) -> None:
        with self._lock:
            self._walks[key] = walk
            while len(self._walks) > self.size:
                self._walks.popitem(last=False)


# -- the platform ---------------------------------------------------------------------------------

_METRIC_PATH = re.compile(r"/api/metrics/([^/]+)")


class KlaviyoApi:
    """The ``RestPlatform`` for Klaviyo. ``api_keys``: the private keys it accepts (default:
    any key shaped like a private key, ``pk_...``); ``steady_limits``: per-minute limits to
    report instead of Klaviyo's (by method label, e.g. ``{"get_events": 5}``); ``events``: the
    event upload endpoints and their counters (default: new ones for this sandbox)."""

    name = "klaviyo"

    def __init__(self, sandbox: Sandbox, api_keys: frozenset[str] | None = None,
                 steady_limits: Mapping[str, int] | None = None,
                 events: KlaviyoEvents | None = None) -> None:
        from convsync.sandbox.klaviyo_events import KlaviyoEvents  # it builds on this module

        self.sandbox = sandbox
        self.api_keys = api_keys
        self.windows = SteadyWindows(steady_limits)
        self.walks = Walks()
        self.events = events if events is not None else KlaviyoEvents(sandbox)

    @property
    def world(self) -> World:
        return self.sandbox.world

    # RestPlatform ------------------------------------------------------------------------
    def route(self, request: Request) -> tuple[str, Handler]:
        label, handler = self._resolve(request.method, request.path.rstrip("/"))
        return label, lambda req: self._gated(label, handler, req)

    def fault_response(self, fault: Fault) -> Response:
        if fault.kind in ("rate_limit", "exhausted"):
            wait = max(1, math.ceil(fault.retry_after))
            body = error_document(429, "throttled", "Request was throttled.",
                                  f"Request was throttled. Expected available in {wait} second"
                                  f"{'s' if wait > 1 else ''}.")
            return Response(429, body, {"Retry-After": str(wait)}, JSON_API)
        return self.error_response(503, "The service is temporarily unavailable; retry later.")

    def error_response(self, status: int, message: str) -> Response:
        code, title = ({503: ("service_unavailable", "Service unavailable.")}
                       .get(status, ("error", "A server error occurred.")))
        return Response(status, error_document(status, code, title, message),
                        content_type=JSON_API)

    # routing -----------------------------------------------------------------------------
    def _resolve(self, method: str, path: str) -> tuple[str, Callable[[Request], Response]]:
        upload = self.events.route(method, path)
        if upload is not None:
            return upload
        metric = _METRIC_PATH.fullmatch(path)
        routes: dict[str, tuple[str, str, Callable[[Request], Response]]] = {
            "/api/accounts": ("GET", "get_accounts", self._get_accounts),
            "/api/metrics": ("GET", "get_metrics", self._get_metrics),
            "/api/events": ("GET", "get_events", self._get_events),
            "/api/metric-aggregates": ("POST", "query_metric_aggregates", self._aggregates),
        }
        if metric:
            metric_id = metric.group(1)
            routes[path] = ("GET", "get_metric", lambda req: self._get_metric(req, metric_id))
        if path not in routes:
            raise _not_found(f"No endpoint at {path!r} in the Klaviyo sandbox.")
        allowed, label, handler = routes[path]
        if method != allowed:
            raise _error(405, "method_not_allowed", f'Method "{method}" not allowed.',
                         f'Method "{method}" not allowed.')
        return label, handler

    def _gated(self, label: str, handler: Callable[[Request], Response],
               request: Request) -> Response:
        try:
            check_revision(request.headers.get("revision"))
            credential = self._authenticate(request.headers.get("Authorization"))
            if label == "get_accounts" and credential.endswith(NO_ACCOUNTS_READ):
                raise _error(403, "permission_denied",
                             "You do not have permission to perform this action.",
                             "This API key is missing required scopes: accounts:read")
            response = handler(request)
        except ApiError as error:
            response = error.response
            self.events.refused_at_gate(label, response)
        if label in self.windows.limits:  # the event uploads send their own (enforced) ones
            response.headers.update(self.windows.headers(label))
        return response

    def _authenticate(self, header: str | None) -> str:
        scheme, _, credential = (header or "").strip().partition(" ")
        credential = credential.strip()
        if scheme not in ("Klaviyo-API-Key", "Bearer") or not credential:
            raise _error(401, "not_authenticated", "Authentication credentials were not provided.",
                         "Missing or invalid authorization scheme. Please use "
                         "'Klaviyo-API-Key <private key>'.")
        accepted = (credential in self.api_keys if self.api_keys is not None
                    else scheme == "Bearer" or credential.startswith("pk_"))
        if not accepted:
            raise _error(401, "authentication_failed", "Incorrect authentication credentials.",
                         "Incorrect authentication credentials.")
        return credential

    # handlers ----------------------------------------------------------------------------
    def _get_accounts(self, request: Request) -> Response:
        fields = _sparse_fields(request, "account", ACCOUNT_FIELDS)
        data = [account_resource(self.world, _base_url(request), fields)]
        return Response(200, {"data": data, "links": _collection_links(request, None)},
                        content_type=JSON_API)

    def _get_metrics(self, request: Request) -> Response:
        fields = _sparse_fields(request, "metric", METRIC_FIELDS)
        wanted = _integration_filter(_filter_conditions(request))
        base = _base_url(request)
        data = [metric_resource(self.world, m, base, fields) for m in self.world.klaviyo_metrics
                if all(integration_of(m).get(k) == v for k, v in wanted.items())]
        return Response(200, {"data": data, "links": _collection_links(request, None)},
                        content_type=JSON_API)

    def _get_metric(self, request: Request, metric_id: str) -> Response:
        metric = next((m for m in self.world.klaviyo_metrics if m.id == metric_id), None)
        if metric is None:
            raise _not_found(f"A metric with id {metric_id!r} does not exist.")
        fields = _sparse_fields(request, "metric", METRIC_FIELDS)
        resource = metric_resource(self.world, metric, _base_url(request), fields)
        return Response(200, {"data": resource, "links": {"self": resource["links"]["self"]}},
                        content_type=JSON_API)

    def _get_events(self, request: Request) -> Response:
        size, descending = _page_size(request), _descending(request)
        includes = _includes(request)
        fields = {name: _sparse_fields(request, name, known) for name, known in
                  (("event", EVENT_FIELDS), ("profile", PROFILE_FIELDS), ("metric", METRIC_FIELDS))}
        try:
            selection = select_events(self.world, _filter_conditions(request))
        except FilterError as error:
            raise _invalid(f"Invalid filter provided: {error}", parameter="filter") from error
        cursor = request.arg("page[cursor]")
        position = decode_cursor(cursor) if cursor else None
        page, more = self._event_page(selection, position, descending, size)
        next_cursor = encode_cursor(page[-1]) if more else None
        base = _base_url(request)
        body: dict[str, Any] = {
            "data": [event_resource(e, base, fields["event"], "attributions" in includes)
                     for e in page],
            "links": _collection_links(request, next_cursor)}
        if includes - {"attributions"}:
            body["included"] = self._included(page, includes, base, fields)
        return Response(200, body, content_type=JSON_API)

    def _event_page(self, selection: EventSelection, position: tuple[float, str] | None,
                    descending: bool, size: int) -> tuple[list[KlaviyoEvent], bool]:
        """Up to ``size`` events after ``position``, and whether more follow."""
        if selection.empty:
            return [], False
        metric = selection.metric.id if selection.metric else None
        key = (selection.lo, selection.hi, metric, selection.profile_id, descending,
               self.world.as_of_ts)
        events = self.walks.take((*key, position)) if position else None
        if events is None:
            walk = events_before if descending else events_after
            events = walk(self.world, selection, position)
            if selection.profile_id is not None:
                events = (e for e in events if e.profile_id == selection.profile_id)
        page = list(islice(events, size + 1))
        if len(page) <= size:
            return page, False
        last = page[size - 1]
        self.walks.put((*key, (last.timestamp, last.id)), chain(page[size:], events))
        return page[:size], True

    def _included(self, page: list[KlaviyoEvent], includes: frozenset[str], base: str,
                  fields: dict[str, list[str] | None]) -> list[dict[str, Any]]:
        included: list[dict[str, Any]] = []
        if "profile" in includes:
            people = {e.profile_id: e for e in page}  # one email per profile
            included += [profile_resource(e, base, fields["profile"]) for e in people.values()]
        if "metric" in includes:
            metrics = {e.metric.id: e.metric for e in page}
            included += [metric_resource(self.world, m, base, fields["metric"])
                         for m in metrics.values()]
        return included

    def _aggregates(self, request: Request) -> Response:
        try:
            body = request.json()
        except ValueError as error:
            raise _error(400, "parse_error", "Malformed request.",
                         f"JSON parse error - {error}") from error
        query = parse_aggregate_query(self.world, body)
        starts, rows = aggregate(self.world, query)
        digest = hashlib.blake2b(request.body, digest_size=10).hexdigest()
        self_link = f"{_base_url(request)}/api/metric-aggregates/"
        data = {"type": "metric-aggregate", "id": digest,
                "attributes": {"dates": [s.isoformat() for s in starts], "data": rows},
                "links": {"self": self_link}}
        return Response(200, {"data": data, "links": {"self": self_link}},
                        content_type=JSON_API)


def _descending(request: Request) -> bool:
    sort = request.arg("sort", "datetime") or "datetime"
    if sort not in EVENT_SORTS:
        raise _invalid(f"Invalid sort {sort!r}: use one of {', '.join(EVENT_SORTS)}.",
                       parameter="sort")
    return EVENT_SORTS[sort]


def _includes(request: Request) -> frozenset[str]:
    includes = frozenset(_csv(request, "include") or ())
    unknown = includes - EVENT_INCLUDES
    if unknown:
        raise _invalid(f"Invalid include {', '.join(sorted(unknown))!r}: use "
                       f"{', '.join(sorted(EVENT_INCLUDES))}.", parameter="include")
    return includes


def _integration_filter(conditions: list[Condition]) -> dict[str, str]:
    """``equals(integration.name,"Shopify")`` / ``equals(integration.category,...)``."""
    wanted = {}
    for condition in conditions:
        key = condition.field.removeprefix("integration.")
        if condition.op != "equals" or key not in ("name", "category") or key == condition.field:
            raise _invalid(f"Invalid filter provided: '{condition.op}({condition.field},...)' is "
                           "not supported; use equals on integration.name or "
                           "integration.category.", parameter="filter")
        wanted[key] = condition.value
    return wanted


def serve_klaviyo(sandbox: Sandbox, host: str = "127.0.0.1", port: int = 0, *,
                  api_keys: frozenset[str] | None = None,
                  steady_limits: Mapping[str, int] | None = None) -> ThreadingHTTPServer:
    """Start the Klaviyo simulator in a daemon thread; point the SDK at
    ``KlaviyoAPI(key, test_host=f"http://{host}:{server.server_port}")``."""
    return serve_rest(KlaviyoApi(sandbox, api_keys, steady_limits), sandbox, host, port)
