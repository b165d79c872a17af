"""Klaviyo source: the account's metrics, daily metric aggregates and person-level events.

Responses are read as dictionaries (``USE_DICTIONARY_FOR_RESPONSE_DATA``): the SDK's pydantic
response models cost about seven times as much per event. Requests go through the SDK's
``*_with_http_info`` variants, whose answers carry the headers, so ``Pace`` can read Klaviyo's
``RateLimit-Remaining`` / ``RateLimit-Reset`` and slow down before a 429 rather than after.
Event pages, millions of events a year, take a faster path still: the SDK's raw response,
decoded by msgspec into only the fields convsync reads, and handed on as one ``JourneyBatch``
a page.

Requests per run, the fewest the API allows for this data (``min_requests``):

- ``GET /api/accounts``: one, when the streams are built (the account id and its currency);
- ``GET /api/metrics``: one page per 200 metrics, shared by the three streams;
- ``POST /api/metric-aggregates``: one per mapped metric per year of the range (a query takes
  one metric and at most a year; counts and sums per day come back together);
- ``GET /api/events``: per mapped metric, one page per 1,000 events (the largest page) and at
  least one. The ``metric_id`` filter takes one id; pulling every metric unfiltered would page
  through each email receipt and open to keep a few purchases.

Days are the client's (``client.timezone``): aggregates are asked for in that zone, and the
events of ``start..end`` are those from ``start`` 00:00 to ``end`` 24:00 there.
"""

from __future__ import annotations

import datetime as dt
import heapq
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo

import msgspec
from klaviyo_api import KlaviyoAPI
from openapi_client.exceptions import ApiException
from openapi_client.rest import RESTResponse
from urllib3.exceptions import ProtocolError
from urllib3.exceptions import TimeoutError as Urllib3Timeout

from convsync.errors import MissingSecret, PlatformError
from convsync.hashing import hash_email, hash_phone, sha256_hex
from convsync.model import (
    Basis,
    ConversionMap,
    ConversionStat,
    IdentifierFields,
    JourneyBatch,
    Platform,
    PlatformConversion,
)
from convsync.retry import RetryPolicy, retrying
from convsync.settings import ClientConfig, KlaviyoSection, Secrets
from convsync.sources import Requests, Row, Stream

log = logging.getLogger(__name__)

EVENTS_PAGE_SIZE = 1000
"""The largest ``page[size]`` ``GET /api/events`` accepts."""
METRICS_PAGE_SIZE = 200
"""Metrics per page of ``GET /api/metrics`` (fixed by Klaviyo)."""
EVENT_FIELDS = ["timestamp", "event_properties"]
PROFILE_FIELDS = ["email", "phone_number", "external_id"]
MEASUREMENTS = ["count", "sum_value"]
TIMEOUT = (10.0, 120.0)
"""(connect, read) seconds per request: the SDK has no default timeout."""
BURST_LIMITS = {"get_accounts": 1, "get_metrics": 10, "get_events": 350,
                "query_metric_aggregates": 3, "bulk_create_events": 10}
"""Requests per second Klaviyo allows per endpoint (its "burst" window, from the API
reference). The headers only report the per-minute ("steady") window."""
PEOPLE_CACHE = 20_000
"""Profiles whose hashed identifiers are kept between pages (a person's events come close
together); the cache is emptied when it grows past this, which bounds its memory."""


def connect(section: KlaviyoSection, secrets: Secrets) -> KlaviyoAPI:
    """A client whose retries are ours (tenacity), not the SDK's, so they are counted once."""
    if secrets.klaviyo_api_key is None:
        raise MissingSecret("CONVSYNC_KLAVIYO_API_KEY", what="Klaviyo's private API key")
    kwargs: dict[str, Any] = {"max_retries": 0,
                              "options": {"USE_DICTIONARY_FOR_RESPONSE_DATA": True}}
    if section.endpoint:
        kwargs["test_host"] = section.endpoint.rstrip("/")
    client = KlaviyoAPI(secrets.klaviyo_api_key.get_secret_value(), **kwargs)
    client.api_client.default_headers["revision"] = section.revision
    # max_retries=0 stops the SDK's own retry loop, but its urllib3 pool still retries a GET
    # answered 429/503 with Retry-After: switch that off too.
    client.api_client.rest_client.pool_manager.connection_pool_kw["retries"] = False
    return client


# -- retries and pacing ----------------------------------------------------------------------

def _header(headers: Mapping[str, str] | None, name: str) -> str | None:
    """A header by name whatever its case (HTTP/2 sends them lower-cased)."""
    wanted = name.lower()
    return next((v for k, v in (headers or {}).items() if k.lower() == wanted), None)


def _is_retryable(error: BaseException) -> bool:
    """Throttling (429), server errors (5xx) and dropped or timed-out connections."""
    if isinstance(error, ApiException):
        status = error.status or 0
        return status == 429 or status >= 500
    return isinstance(error, Urllib3Timeout | ProtocolError)


def _retry_after(error: BaseException) -> float | None:
    value = _header(getattr(error, "headers", None), "Retry-After")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


RETRY = RetryPolicy("klaviyo", _is_retryable, _retry_after)


class Pace:
    """Waits before a request when Klaviyo would otherwise throttle it.

    Klaviyo limits each endpoint per account in two fixed windows: a burst (per second,
    ``BURST_LIMITS``) and a steady one (per minute) whose state every answer reports in
    ``RateLimit-Limit`` / ``RateLimit-Remaining`` / ``RateLimit-Reset`` (seconds). Other
    tools on the same account share both, so the last few requests of a steady window are
    left alone: the pace waits for the reset instead."""

    def __init__(self, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._sleep, self._clock = sleep, clock
        self._recent: dict[str, deque[float]] = {}
        self._steady: dict[str, tuple[int, float]] = {}  # method -> (requests left, reset at)

    def wait(self, method: str) -> None:
        """Sleep as long as needed before a request to ``method``."""
        now = self._clock()
        recent = self._recent.setdefault(method, deque(maxlen=BURST_LIMITS.get(method, 1)))
        delay = recent[0] + 1.0 - now if len(recent) == recent.maxlen else 0.0
        left, reset_at = self._steady.get(method, (1 << 30, now))
        if left <= 0 and reset_at > now:
            delay = max(delay, reset_at - now)
            del self._steady[method]
        if delay > 0:
            self._sleep(delay)
        recent.append(now + max(delay, 0.0))

    def observe(self, method: str, headers: Mapping[str, str] | None) -> None:
        """Note the steady window an answer reports."""
        limit, remaining, reset = (_header(headers, f"RateLimit-{name}")
                                   for name in ("Limit", "Remaining", "Reset"))
        if remaining is None or reset is None:
            return
        try:
            reserve = max(2, int(limit) // 50) if limit else 2
            self._steady[method] = (int(remaining) - reserve, self._clock() + float(reset))
        except ValueError:
            return


@dataclass
class _Api:
    """The SDK's endpoint groups, with pacing and request counting around every call."""

    client: KlaviyoAPI
    pace: Pace
    requests: Requests

    def __post_init__(self) -> None:
        # each property access builds a new endpoint object: keep one of each
        self.accounts, self.metrics = self.client.Accounts, self.client.Metrics
        self.events = self.client.Events

    def call(self, method: str, endpoint: Callable[..., Any], **kwargs: Any) -> dict[str, Any]:
        self.pace.wait(method)
        self.requests.add(method)
        answer = endpoint(**kwargs, _request_timeout=TIMEOUT)
        self.pace.observe(method, answer.headers)
        data: dict[str, Any] = answer.data
        return data

    def events_page(self, **kwargs: Any) -> EventPage:
        """One ``GET /api/events`` page, decoded by msgspec into only the fields convsync reads.

        The SDK sends the request (``get_events_without_preload_content``) and its errors are
        raised as its own; only the body's decoding is ours: the SDK's dictionary path decodes
        every link and relationship of a page into dicts and walks them again, about 15 us an
        event against 3 here."""
        self.pace.wait("get_events")
        self.requests.add("get_events")
        response = self.events.get_events_without_preload_content(**kwargs,
                                                                  _request_timeout=TIMEOUT)
        answer = RESTResponse(response)
        body: bytes = answer.read()
        response.release_conn()
        self.pace.observe("get_events", response.headers)
        if not 200 <= answer.status <= 299:
            raise ApiException.from_response(
                http_resp=answer, body=body.decode("utf-8", "replace"), data=None)
        try:
            return _EVENT_PAGE.decode(body)
        except msgspec.DecodeError as error:
            raise KlaviyoResponseError(f"Klaviyo GET /api/events answered a page convsync "
                                       f"cannot read: {error}") from error


# -- the account and its metrics --------------------------------------------------------------

@dataclass(frozen=True)
class Account:
    id: str
    timezone: str
    currency: str


def fetch_account(api: _Api) -> Account:
    """The account the key belongs to (a private key belongs to exactly one)."""
    resource = api.call("get_accounts", api.accounts.get_accounts_with_http_info)["data"][0]
    attributes = resource["attributes"]
    return Account(resource["id"], attributes["timezone"], attributes["preferred_currency"])


def _account_or_config(api: _Api, config: ClientConfig, secrets: Secrets,
                       sleep: Callable[[float], None]) -> Account:
    """The account, or, for a key without the ``accounts:read`` scope (convsync reads the
    account only for its currency), the config's currency and a stable id made from the key
    (a hash: never the key), with a warning."""
    try:
        return retrying(RETRY, sleep)(fetch_account, api)
    except ApiException as error:
        if error.status != 403:
            raise
    key = secrets.klaviyo_api_key.get_secret_value() if secrets.klaviyo_api_key else ""
    log.warning("klaviyo: the private key lacks the accounts:read scope: using the config's "
                "currency (%s); add the scope to the key to read the account's own",
                config.client.currency)
    return Account(f"key-{sha256_hex(key)[:12]}", config.client.timezone,
                   config.client.currency)


def _next_cursor(page: dict[str, Any]) -> str | None:
    """The ``page[cursor]`` of the next page's link, or None on the last page."""
    return _cursor_of((page.get("links") or {}).get("next"))


def _cursor_of(link: str | None) -> str | None:
    if not link:
        return None
    cursors = parse_qs(urlsplit(link).query).get("page[cursor]")
    return cursors[0] if cursors else None


def _metric_pages(fetch: Callable[[str | None], dict[str, Any]]) -> Iterator[dict[str, Any]]:
    cursor: str | None = None
    while True:
        page = fetch(cursor)
        yield from page["data"]
        cursor = _next_cursor(page)
        if not cursor:
            return


def _metric(resource: dict[str, Any], account_id: str) -> PlatformConversion:
    integration = resource["attributes"].get("integration") or {}
    return PlatformConversion(platform=Platform.KLAVIYO, account_id=account_id,
                              platform_id=resource["id"], name=resource["attributes"]["name"],
                              settings={"integration": integration.get("name"),
                                        "integration_category": integration.get("category")})


def metrics(client: KlaviyoAPI, account_id: str = "") -> Iterator[PlatformConversion]:
    """The account's metrics (event types), every page."""
    endpoint = client.Metrics

    def fetch(cursor: str | None) -> dict[str, Any]:
        page: dict[str, Any] = endpoint.get_metrics(page_cursor=cursor) if cursor else (
            endpoint.get_metrics())
        return page

    for resource in _metric_pages(fetch):
        yield _metric(resource, account_id)


def _fetch_metrics(api: _Api, account_id: str,
                   mapping: ConversionMap) -> list[PlatformConversion]:
    def fetch(cursor: str | None) -> dict[str, Any]:
        kwargs = {"page_cursor": cursor} if cursor else {}
        return api.call("get_metrics", api.metrics.get_metrics_with_http_info, **kwargs)

    found = [mapping.mapped(_metric(r, account_id)) for r in _metric_pages(fetch)]
    named = {name for d in mapping.definitions for name in d.names.klaviyo}
    missing = sorted(named - {m.name for m in found})
    if missing:
        log.warning("klaviyo: account %s has no metric named %s: check the klaviyo names in "
                    "[[conversions]] against `convsync discover`", account_id,
                    ", ".join(repr(n) for n in missing))
    return found


# -- streams -----------------------------------------------------------------------------------

Pull = Callable[[dt.date, dt.date], Iterator[Row]]


def min_requests(start: dt.date, end: dt.date, events_per_metric: Sequence[int],
                 metric_count: int = 0) -> int:
    """The fewest requests a pull of ``start..end`` can make: one for the account, one per page
    of 200 metrics (``metric_count``: how many the account has; 0 counts one page), and per
    mapped metric (one entry of ``events_per_metric`` each: its events in the range) one
    aggregate query per year and one events page per 1,000 events, at least one.

    ``1 + ceil(metrics / 200) + mapped * years + sum(max(1, ceil(events_m / 1000)))``"""
    metric_pages = max(1, math.ceil(metric_count / METRICS_PAGE_SIZE))
    years = len(year_spans(start, end))
    pages = sum(max(1, math.ceil(n / EVENTS_PAGE_SIZE)) for n in events_per_metric)
    return 1 + metric_pages + len(events_per_metric) * years + pages


def streams(config: ClientConfig, secrets: Secrets, mapping: ConversionMap, requests: Requests,
            *, sleep: Callable[[float], None] = time.sleep) -> list[Stream]:
    """The account's metrics (every one, mapped or not), daily aggregates of the mapped metrics
    and their person-level events, a page (one ``JourneyBatch``) at a time.

    Asks for the account and its metrics once, here (retried as the pulls are); ``sleep`` is
    how the pace and those retries wait."""
    section = config.klaviyo
    if section is None:
        return []
    api = _Api(connect(section, secrets), Pace(sleep), requests)
    account = _account_or_config(api, config, secrets, sleep)
    catalog = retrying(RETRY, sleep)(_fetch_metrics, api, account.id, mapping)
    mapped = [m for m in catalog if m.conversion is not None]
    tz = config.client.timezone
    return [
        Stream("klaviyo", "metrics", account.id, _metrics_pull(catalog)),
        Stream("klaviyo", "metric_aggregates", account.id,
               _aggregates_pull(api, account, mapped, tz)),
        Stream("klaviyo", "events", account.id, _events_pull(api, account, mapped, tz)),
    ]


def _metrics_pull(catalog: list[PlatformConversion]) -> Pull:
    def pull(start: dt.date, end: dt.date) -> Iterator[Row]:
        yield from catalog
    return pull


# -- daily aggregates --------------------------------------------------------------------------

def year_spans(start: dt.date, end: dt.date) -> list[tuple[dt.date, dt.date]]:
    """``start..end`` cut into spans of at most a year, the longest an aggregate query takes."""
    spans = []
    while start <= end:
        last = min(_one_year_after(start) - dt.timedelta(days=1), end)
        spans.append((start, last))
        start = last + dt.timedelta(days=1)
    return spans


def _one_year_after(day: dt.date) -> dt.date:
    try:
        return day.replace(year=day.year + 1)
    except ValueError:  # 29 February
        return day.replace(year=day.year + 1, day=28)


def _aggregate_query(metric_id: str, start: dt.date, end: dt.date, tz: str) -> dict[str, Any]:
    """Count and value per day of ``start..end`` in ``tz`` (naive datetimes are read there)."""
    after = end + dt.timedelta(days=1)
    return {"data": {"type": "metric-aggregate", "attributes": {
        "metric_id": metric_id, "measurements": MEASUREMENTS, "interval": "day",
        "timezone": tz,
        "filter": [f"greater-or-equal(datetime,{start.isoformat()}T00:00:00)",
                   f"less-than(datetime,{after.isoformat()}T00:00:00)"]}}}


def _aggregates_pull(api: _Api, account: Account, mapped: list[PlatformConversion],
                     tz: str) -> Pull:
    def pull(start: dt.date, end: dt.date) -> Iterator[Row]:
        for first, last in year_spans(start, end):
            cells: dict[tuple[dt.date, str], list[float]] = {}
            for metric in mapped:
                answer = api.call("query_metric_aggregates",
                                  api.metrics.query_metric_aggregates_with_http_info,
                                  metric_aggregate_query=_aggregate_query(
                                      metric.platform_id, first, last, tz))
                _add_daily(cells, answer["data"]["attributes"], metric.name, tz)
            yield from _daily_stats(cells, {m.name: m for m in mapped}, account, tz)
    return pull


def _add_daily(cells: dict[tuple[dt.date, str], list[float]], attributes: dict[str, Any],
               name: str, tz: str) -> None:
    """Add one metric's daily counts and sums (metrics sharing a name add up: the stats key on
    the name, which is what conversion definitions map)."""
    zone = ZoneInfo(tz)
    days = [dt.datetime.fromisoformat(d).astimezone(zone).date() for d in attributes["dates"]]
    for row in attributes["data"]:
        series = row["measurements"]
        for day, count, value in zip(days, series["count"], series["sum_value"], strict=True):
            if count or value:
                cell = cells.setdefault((day, name), [0.0, 0.0])
                cell[0] += count
                cell[1] += value


def _daily_stats(cells: dict[tuple[dt.date, str], list[float]],
                 metrics: dict[str, PlatformConversion], account: Account,
                 tz: str) -> Iterator[ConversionStat]:
    for (day, name), (count, value) in sorted(cells.items()):
        metric = metrics[name]
        yield ConversionStat(
            platform=Platform.KLAVIYO, account_id=account.id, date=day, timezone=tz,
            campaign_id="", platform_conversion=name, conversion=metric.conversion,
            kind=metric.kind, count=count, value=round(value, 2), currency=account.currency,
            basis=Basis.CONVERSION_DATE, window="")


# -- events ------------------------------------------------------------------------------------

ClickIds = tuple[str | None, str | None, str | None, str | None, str | None]
"""(gclid, gbraid, wbraid, fbc, fbp) an event carries."""
NO_CLICKS: ClickIds = (None, None, None, None, None)
CLICK_FIELDS = ("gclid", "gbraid", "wbraid", "fbc", "fbp")


class KlaviyoResponseError(PlatformError):
    """A Klaviyo answer convsync cannot read (not the JSON:API shape it documents)."""


class _Ref(msgspec.Struct, frozen=True, gc=False):
    id: str


class _Related(msgspec.Struct, frozen=True, gc=False):
    data: _Ref | None = None


class _EventRelationships(msgspec.Struct, frozen=True, gc=False):
    profile: _Related | None = None


class _Properties(msgspec.Struct, frozen=True, gc=False):
    """The event properties convsync reads; the rest (often an order's whole cart) is skipped
    unread. Klaviyo keeps what the sender sent, so any of them can be of any JSON type."""

    value: Any = msgspec.field(default=None, name="$value")
    currency: Any = msgspec.field(default=None, name="$value_currency")
    utm_id: Any = None
    utm_campaign: Any = None
    gclid: Any = None
    gbraid: Any = None
    wbraid: Any = None
    fbclid: Any = None
    fbc: Any = None
    fbc_cookie: Any = msgspec.field(default=None, name="_fbc")
    fbp: Any = None
    fbp_cookie: Any = msgspec.field(default=None, name="_fbp")


_NO_PROPERTIES = _Properties()


class _EventAttributes(msgspec.Struct, frozen=True, gc=False):
    timestamp: int | None = None
    event_properties: _Properties | None = None


class _Event(msgspec.Struct, frozen=True, gc=False):
    id: str
    attributes: _EventAttributes
    relationships: _EventRelationships | None = None


class _ProfileAttributes(msgspec.Struct, frozen=True, gc=False):
    email: str | None = None
    phone_number: str | None = None
    external_id: str | int | None = None


class _Included(msgspec.Struct, frozen=True, gc=False):
    type: str
    id: str
    attributes: _ProfileAttributes = _ProfileAttributes()


class _Links(msgspec.Struct, frozen=True, gc=False):
    next: str | None = None


class EventPage(msgspec.Struct, frozen=True, gc=False):
    """The parts of a ``GET /api/events?include=profile`` page convsync reads; the rest of
    the document (links, metric relationships, ...) is skipped, never built."""

    data: list[_Event]
    included: list[_Included] = []
    links: _Links = _Links()


_EVENT_PAGE = msgspec.json.Decoder(EventPage)


def _hashed(rule: Callable[[str], tuple[str, str]],
            value: str | None) -> tuple[str, str] | tuple[None, None]:
    """Both platforms' hashes of an email or phone; a missing or malformed one gives none and
    is never logged: it is personal data (try/except rather than contextlib.suppress, which
    cost 0.2 us a person)."""
    if not value:
        return None, None
    try:
        return rule(value)
    except ValueError:
        return None, None


class _Person:
    """One profile, known by hashes only: its email and phone are hashed as the page arrives
    and never kept. ``key`` is ``email:<Google-rule SHA-256 of the email>`` (so
    ``Jane.Doe+x@gmail.com`` and ``janedoe@gmail.com`` are one person), else
    ``phone:<SHA-256 of the E.164 number>``, else ``klaviyo:<profile id>``."""

    __slots__ = ("_by_clicks", "_hashes", "key")

    def __init__(self, profile_id: str, profile: _ProfileAttributes) -> None:
        hashes: IdentifierFields = {}
        google, meta = _hashed(hash_email, profile.email)
        if google and meta:
            hashes["email_sha256_google"], hashes["email_sha256_meta"] = google, meta
        phone, phone_meta = _hashed(hash_phone, profile.phone_number)
        if phone and phone_meta:
            hashes["phone_sha256_google"], hashes["phone_sha256_meta"] = phone, phone_meta
        if profile.external_id:
            hashes["external_id"] = str(profile.external_id)
        if profile_id != _UNKNOWN:
            hashes["klaviyo_profile_id"] = profile_id
        self._hashes = hashes
        self.key = (f"email:{google}" if google else f"phone:{phone}" if phone
                    else f"klaviyo:{profile_id}")
        self._by_clicks: dict[ClickIds, IdentifierFields] = {}

    def identifiers(self, clicks: ClickIds) -> IdentifierFields:
        """The person's identifiers with an event's click ids: the events of one visit carry
        the same ones, so they share one dict."""
        found = self._by_clicks.get(clicks)
        if found is None:
            if len(self._by_clicks) >= 8:
                self._by_clicks.clear()
            given: IdentifierFields = {name: value  # type: ignore[assignment]
                                       for name, value in zip(CLICK_FIELDS, clicks, strict=True)
                                       if value}
            found = self._by_clicks[clicks] = given | self._hashes
        return found


_NOBODY = _ProfileAttributes()
_UNKNOWN = "unknown"


class _People:
    """Profiles seen lately (a person's events come close together), at most PEOPLE_CACHE."""

    def __init__(self) -> None:
        self._known: dict[str, _Person] = {}

    def learn(self, included: Iterable[_Included]) -> None:
        if len(self._known) > PEOPLE_CACHE:
            self._known.clear()
        known = self._known
        for resource in included:
            if resource.type == "profile" and resource.id not in known:
                known[resource.id] = _Person(resource.id, resource.attributes)

    def get(self, profile_id: str | None) -> _Person:
        person = self._known.get(profile_id or "")
        if person is None:
            person = self._known[profile_id or ""] = _Person(profile_id or _UNKNOWN, _NOBODY)
        return person


def _text(value: Any) -> str | None:
    return str(value) if value else None


def _click_ids(props: _Properties, seconds: int) -> ClickIds:
    """``gclid`` / ``gbraid`` / ``wbraid`` as they are, ``fbc`` as is or built from ``fbclid``
    the way Meta's pixel does (``fb.1.<milliseconds>.<fbclid>``, here the event's own time, so
    a re-pull gives the same value), ``fbp`` as is."""
    gclid, fbclid, fbc = props.gclid, props.fbclid, props.fbc or props.fbc_cookie
    fbp = props.fbp or props.fbp_cookie
    if not (gclid or fbclid or fbc or fbp or props.gbraid or props.wbraid):
        return NO_CLICKS
    if fbclid and not fbc:
        fbc = f"fb.1.{seconds * 1000}.{fbclid}"
    return (_text(gclid), _text(props.gbraid), _text(props.wbraid), _text(fbc), _text(fbp))


def _number(value: Any) -> float:
    """``$value`` as a float: Klaviyo stores what the sender sent (a number, a string, null)."""
    try:
        return float(value or 0.0)
    except (TypeError, ValueError):
        return 0.0


def _event_batch(page: EventPage, metric: PlatformConversion, currency: str,
                 people: _People) -> JourneyBatch:
    """One page of events as one batch: the hot path. An event without a timestamp (the API
    allows null) cannot be placed in a journey and is skipped."""
    people.learn(page.included)
    batch = JourneyBatch(Platform.KLAVIYO, metric.conversion, metric.name, [], [], [], [], [],
                         [], [])
    add_id, add_time, add_person = (batch.source_event_ids.append, batch.times.append,
                                    batch.person_keys.append)
    add_value, add_currency, add_campaign, add_identifiers = (
        batch.values.append, batch.currencies.append, batch.campaign_ids.append,
        batch.identifiers.append)
    for event in page.data:
        attributes = event.attributes
        seconds = attributes.timestamp
        if seconds is None:
            continue
        props = attributes.event_properties or _NO_PROPERTIES
        related = event.relationships.profile if event.relationships else None
        person = people.get(related.data.id if related and related.data else None)
        value, campaign = props.value, props.utm_id or props.utm_campaign or ""
        add_id(event.id)
        add_time(seconds)
        add_person(person.key)
        add_value(value if type(value) is float else _number(value))
        add_currency(props.currency or currency)
        add_campaign(campaign if type(campaign) is str else str(campaign))
        add_identifiers(person.identifiers(_click_ids(props, seconds)))
    return batch


def _events_filter(metric_id: str, start: dt.date, end: dt.date, tz: str) -> str:
    zone = ZoneInfo(tz)
    lo, hi = (dt.datetime.combine(day, dt.time(), zone).astimezone(dt.UTC).isoformat()
              for day in (start, end + dt.timedelta(days=1)))
    return (f'equals(metric_id,"{metric_id}"),greater-or-equal(datetime,{lo}),'
            f"less-than(datetime,{hi})")


def _metric_batches(api: _Api, metric: PlatformConversion, currency: str, query: str,
                    people: _People) -> Iterator[JourneyBatch]:
    """One metric's events, oldest first, a page of 1,000 (one batch) at a time; a page with
    no event to keep gives no batch."""
    cursor: str | None = None
    while True:
        kwargs = {"page_cursor": cursor} if cursor else {}
        page = api.events_page(filter=query, include=["profile"], fields_event=EVENT_FIELDS,
                               fields_profile=PROFILE_FIELDS, page_size=EVENTS_PAGE_SIZE,
                               sort="datetime", **kwargs)
        batch = _event_batch(page, metric, currency, people)
        if batch:
            yield batch
        cursor = _cursor_of(page.links.next)
        if not cursor:
            return


def _events_pull(api: _Api, account: Account, mapped: list[PlatformConversion],
                 tz: str) -> Pull:
    """The mapped metrics' events, a batch (a page) at a time, one page per metric in memory.

    The API walks one metric at a time, oldest first. Of the walks' next pages, the one whose
    first event is oldest goes first: no event yielded later is older than a batch's first
    (all the pipeline's progress needs), and a person's events on several metrics come close
    together, so their email is hashed once (a new person every 1.9 events, not every one)."""
    def pull(start: dt.date, end: dt.date) -> Iterator[Row]:
        people = _People()
        walks = [_metric_batches(api, metric, account.currency,
                                 _events_filter(metric.platform_id, start, end, tz), people)
                 for metric in mapped]
        heads: list[tuple[int, int, JourneyBatch]] = []
        for index in range(len(walks)):
            _push_next(heads, walks, index)
        while heads:
            _, index, batch = heapq.heappop(heads)
            yield batch
            _push_next(heads, walks, index)
    return pull


def _push_next(heads: list[tuple[int, int, JourneyBatch]], walks: list[Iterator[JourneyBatch]],
               index: int) -> None:
    batch = next(walks[index], None)
    if batch is not None:
        heapq.heappush(heads, (batch.times[0], index, batch))


# -- errors ------------------------------------------------------------------------------------

SCOPES = "accounts:read, metrics:read, events:read"


def explain(error: Exception) -> str | None:
    """Klaviyo's own account of an API error (its JSON:API ``errors``), with what to fix."""
    if not isinstance(error, ApiException):
        return None
    try:
        errors = json.loads(error.body or "{}").get("errors", [])
        detail = "; ".join(f"{e.get('code')}: {e.get('detail')}" for e in errors)
    except (ValueError, AttributeError):
        detail = str(error.body or error.reason)
    hint = {401: " (check CONVSYNC_KLAVIYO_API_KEY: a private key, pk_...)",
            403: f" (the private key needs the read scopes {SCOPES})"}.get(error.status or 0, "")
    return f"Klaviyo API HTTP {error.status}: {detail or error.reason}{hint}"
