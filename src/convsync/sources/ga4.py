"""GA4 source: the Data API's runReport through google-analytics-data.

Per property, two streams:

- ``events``: one ``ConversionStat`` per day, session source, session medium, session
  campaign and event: ``count`` is the event count, ``value`` the event value,
  ``key_events`` the key-event count (0 for an event that is no key event; below the event
  count for a key event counted once per session), filed on the day the event happened
  (basis ``conversion_date``, in the property's time zone; GA4 has no attribution window and
  no "in column"). GA4 reports no campaign id beside the session campaign name, so the name
  is the ``campaign_id`` too. The key-event count is asked for as ``keyEvents``, or by its
  pre-2024 name ``conversions`` where a property refuses the new one. After the stats, one
  ``PlatformConversion`` per event seen, with its event and key-event counts over the pull
  and whether GA4 counts it as a key event (``settings["key_event"]``).
- ``journeys`` (only with ``ga4.custom_dimensions``): one ``JourneyEvent`` per day, event,
  session campaign and custom dimension values (for example ``customEvent:gclid``), for the
  events that carry at least one of them; no source and medium there. A report row has a
  day, not a time: the event is put at noon of that day in the property's time zone, and
  several events of one gclid, event and day are one journey event with their summed value.

Requests: one report per stream over the whole date range, paged with ``limit`` / ``offset``;
``min_requests`` gives the count. The gRPC transport with responses unwrapped to raw protobuf
is the fast path (about 3 us a row to read, against 48 us over REST); REST stays available by
config, with smaller pages because its JSON costs about 3.7 kB of memory a row while parsed.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import requests as http
from google.analytics.data_v1beta import BetaAnalyticsDataClient
from google.analytics.data_v1beta.types import (
    DateRange,
    Dimension,
    Filter,
    FilterExpression,
    FilterExpressionList,
    Metric,
    OrderBy,
    RunReportRequest,
    RunReportResponse,
)
from google.api_core import exceptions as api_exceptions
from google.api_core.client_options import ClientOptions
from google.rpc import error_details_pb2

from convsync.errors import PlatformError
from convsync.model import (
    Basis,
    ConversionMap,
    ConversionStat,
    Identifiers,
    JourneyEvent,
    Kind,
    Platform,
    PlatformConversion,
    copy_with,
)
from convsync.retry import RetryPolicy
from convsync.settings import ClientConfig, Ga4Section, Secrets, trust_ca_file
from convsync.sources import Requests, Row, Stream, give_back_free_memory
from convsync.sources.google_auth import ANALYTICS_SCOPE, google_credentials

log = logging.getLogger(__name__)

T = TypeVar("T")

PAGE_ROWS = {"grpc": 125_000, "rest": 30_000}
"""Rows per ``events`` page, by transport. The API allows 250,000, but a page costs the client
memory while it arrives and is read: over gRPC about 800 bytes a row (the message, then its
parsed form: five dimension values and three metric values a row), so a year of 200
campaigns (370,000 rows) peaked at 300 - 320 MB in pages of 200,000, 285 - 290 in pages of
150,000 (too near the 300 MB target) and 264 - 273 in pages of 125,000, with every SDK loaded
and the store's page cache full. Over REST the JSON text and
its parsed dictionaries peak at about 3.7 kB a row: 30,000 rows, 110 MB."""
JOURNEY_PAGE_ROWS = {"grpc": 100_000, "rest": 20_000}
"""Rows per ``journeys`` page: its rows are wider (a 46-character gclid each), 250,000 of them
would add 160 MB over gRPC; 100,000 add 75 MB."""
TIMEOUT = 300.0
"""Seconds per runReport call: a year of a large property takes the API a while to compute."""

EVENT_DIMENSIONS = ("date", "sessionSource", "sessionMedium", "sessionCampaignName",
                    "eventName")
EVENT_METRICS = ("eventCount", "eventValue")
KEY_EVENT_METRICS = ("keyEvents", "conversions")
"""GA4 renamed ``conversions`` to ``keyEvents`` in 2024 and has since removed the old name; a
property that refuses one is asked for the other."""
JOURNEY_DIMENSIONS = ("date", "sessionCampaignName", "eventName")
"""The ``journeys`` report's dimensions before its custom ones: no source and medium, which
would add nothing to a click id's events and change their ids (made of every dimension)."""
JOURNEY_METRICS = ("eventCount", "eventValue")
MAX_DIMENSIONS = 9
NOT_SET = frozenset({"", "(not set)"})
CUSTOM_DIMENSION = re.compile(r"custom(Event|User):(\w+)")
IDENTIFIER_PARAMETERS = frozenset({"gclid", "gbraid", "wbraid", "fbc", "fbp"})
"""Custom dimension parameters kept under their own identifier; any other (``lead_id``,
``user_id``, ...) is the person's ``external_id``."""
_REFUSED_FIELD = re.compile(r"Field (\S+) is not a valid (?:dimension|metric)")


class ReportChanged(PlatformError):
    """The report's row count changed between two pages: GA4 was still processing some of its
    days, so offsets no longer line up. Retried: the pull resumes from its last complete day
    with a fresh report."""


def connect(section: Ga4Section, secrets: Secrets) -> BetaAnalyticsDataClient:
    if section.ca_file is not None and section.transport == "grpc":
        trust_ca_file(section.ca_file)
    options = ClientOptions(api_endpoint=section.endpoint) if section.endpoint else None
    return BetaAnalyticsDataClient(credentials=google_credentials(secrets, [ANALYTICS_SCOPE]),
                                   transport=section.transport, client_options=options)


def min_requests(report_rows: int, page_rows: int = PAGE_ROWS["grpc"]) -> int:
    """runReport calls to read one report of ``report_rows`` rows: one a page, at least one.

    A pull makes this for the ``events`` stream (its rows are the stored stats, pages of
    ``PAGE_ROWS``) plus, with custom dimensions, this for the ``journeys`` stream (its rows are
    the journey events, pages of ``JOURNEY_PAGE_ROWS``); one more per field the property
    refuses (a custom dimension it lacks, ``keyEvents``)."""
    return max(1, -(-report_rows // page_rows))


@dataclass
class Schema:
    """What a property accepts, learnt from its refusals and kept for the run."""

    custom_dimensions: list[str] = field(default_factory=list)
    key_metric: str = KEY_EVENT_METRICS[0]
    tried_key_metrics: set[str] = field(default_factory=set)

    def adapt(self, property_id: str, error: Exception) -> bool:
        """Stop asking for the field ``error`` refuses: drop a custom dimension, or ask for
        the key-event count by its other name. False when the error is about anything else."""
        refused = _refused_field(error)
        if refused == self.key_metric:
            self.tried_key_metrics.add(refused)
            other = next((m for m in KEY_EVENT_METRICS if m not in self.tried_key_metrics), None)
            if other is None:
                return False
            log.warning("ga4: property %s refuses the %s metric; asking for %s instead",
                        property_id, refused, other)
            self.key_metric = other
            return True
        if refused in self.custom_dimensions:
            self.custom_dimensions.remove(refused)
            log.warning("ga4: property %s has no custom dimension %s: skipping it (register it "
                        "in GA4 Admin > Custom definitions, or remove it from "
                        "ga4.custom_dimensions)", property_id, refused)
            return True
        return False


def streams(config: ClientConfig, secrets: Secrets, mapping: ConversionMap,
            requests: Requests) -> list[Stream]:
    """The property's ``events`` stream, and its ``journeys`` stream when custom dimensions
    are configured."""
    section = config.ga4
    if section is None:
        return []
    check_custom_dimensions(section.custom_dimensions)
    client = connect(section, secrets)
    page_rows = PAGE_ROWS[section.transport]
    property_id = section.property_id
    schema = Schema(list(section.custom_dimensions))
    out = [Stream("ga4", "events", property_id,
                  events_pull(client, property_id, mapping, requests, schema, page_rows))]
    if section.custom_dimensions:
        out.append(Stream("ga4", "journeys", property_id,
                          journeys_pull(client, property_id, mapping, requests, schema,
                                        JOURNEY_PAGE_ROWS[section.transport])))
    return out


def check_custom_dimensions(names: list[str]) -> None:
    """Refuse names the Data API cannot take as custom dimensions, or too many of them."""
    for name in names:
        if not CUSTOM_DIMENSION.fullmatch(name):
            raise ValueError(f"ga4.custom_dimensions: {name!r} is not a custom dimension; write "
                             "'customEvent:<event parameter>' (or 'customUser:<user property>'),"
                             " e.g. 'customEvent:gclid'")
    room = MAX_DIMENSIONS - len(JOURNEY_DIMENSIONS)
    if len(names) > room:
        raise ValueError(f"ga4.custom_dimensions: at most {room} (a report takes "
                         f"{MAX_DIMENSIONS} dimensions, {len(JOURNEY_DIMENSIONS)} are taken)")


# -- paging ------------------------------------------------------------------------------------

def report_rows(client: BetaAnalyticsDataClient, request: RunReportRequest, page_rows: int,
                requests: Requests, convert: Callable[[Any], Iterator[T]]) -> Iterator[T]:
    """Every row of one report, converted page by page with ``convert(raw page)``.

    Pages are read with ``limit`` / ``offset`` and held one at a time: a page is dropped before
    the next is asked for, since any protobuf row still referenced keeps its whole page alive.
    Raises ReportChanged when the row count moves between pages."""
    offset, expected = 0, None
    while True:
        request.limit, request.offset = page_rows, offset
        requests.add("runReport")
        page = RunReportResponse.pb(client.run_report(request=request, timeout=TIMEOUT))
        count, total = len(page.rows), page.row_count
        if expected is not None and total != expected:
            raise ReportChanged(f"the report had {expected} rows, now {total}: GA4 is still "
                                "processing some of these days")
        expected = total
        yield from convert(page)
        del page  # one page in memory at a time
        offset += count
        if count == 0 or offset >= total:
            return
        give_back_free_memory()


def adapting(property_id: str, schema: Schema, run: Callable[[], Iterator[T]]) -> Iterator[T]:
    """``run()`` again, without what the property refused, while nothing has been yielded."""
    while True:
        started = False
        try:
            for item in run():
                started = True
                yield item
            return
        except api_exceptions.BadRequest as error:
            if started or not schema.adapt(property_id, error):
                raise


def report_request(property_id: str, dimensions: list[str], metrics: list[str],
                   start: dt.date, end: dt.date,
                   dimension_filter: FilterExpression | None = None) -> RunReportRequest:
    """A report over ``start..end`` ordered by its dimensions (date first), so that pages split
    it at stable places and rows come in date order."""
    return RunReportRequest(
        property=f"properties/{property_id}",
        dimensions=[Dimension(name=name) for name in dimensions],
        metrics=[Metric(name=name) for name in metrics],
        date_ranges=[DateRange(start_date=start.isoformat(), end_date=end.isoformat())],
        dimension_filter=dimension_filter,
        order_bys=[OrderBy(dimension=OrderBy.DimensionOrderBy(dimension_name=name))
                   for name in dimensions])


# -- events: daily stats -----------------------------------------------------------------------

EventTotals = dict[str, list[float]]
"""Per event over a pull: [event count, key-event count] (is it a key event?)."""


def events_pull(client: BetaAnalyticsDataClient, property_id: str, mapping: ConversionMap,
                requests: Requests, schema: Schema, page_rows: int = PAGE_ROWS["grpc"],
                ) -> Callable[[dt.date, dt.date], Iterator[Row]]:
    lookup = _lookup(mapping)

    def pull(start: dt.date, end: dt.date) -> Iterator[Row]:
        totals: EventTotals = {}

        def run() -> Iterator[ConversionStat]:
            totals.clear()
            request = report_request(property_id, list(EVENT_DIMENSIONS),
                                     [*EVENT_METRICS, schema.key_metric], start, end)
            return report_rows(client, request, page_rows, requests,
                               lambda page: _stat_rows(page, property_id, lookup, totals))

        yield from adapting(property_id, schema, run)
        yield from _event_definitions(property_id, totals, mapping)

    return pull


def _lookup(mapping: ConversionMap) -> Callable[[str], tuple[str | None, Kind | None]]:
    @functools.cache
    def lookup(event: str) -> tuple[str | None, Kind | None]:
        definition = mapping.lookup(Platform.GA4, event)
        return (definition.name, definition.kind) if definition else (None, None)
    return lookup


def _stat_rows(page: Any, property_id: str,
               lookup: Callable[[str], tuple[str | None, Kind | None]],
               totals: EventTotals) -> Iterator[ConversionStat]:
    """A page's rows (date, source, medium, campaign, event; count, value, key events) as
    ConversionStats, unvalidated: the values are the API's own typed strings converted here,
    and the page's constants are valid by construction."""
    template = ConversionStat(
        platform=Platform.GA4, account_id=property_id, date=dt.date.min,
        timezone=page.metadata.time_zone, campaign_id="", platform_conversion="",
        currency=page.metadata.currency_code, basis=Basis.CONVERSION_DATE)
    for row in page.rows:
        dimensions, metrics = row.dimension_values, row.metric_values
        campaign, event = dimensions[3].value, dimensions[4].value
        count, key_events = float(metrics[0].value), float(metrics[2].value)
        seen = totals.get(event)
        if seen is None:
            seen = totals[event] = [0.0, 0.0]
        seen[0] += count
        seen[1] += key_events
        conversion, kind = lookup(event)
        yield copy_with(template, {
            "date": _date(dimensions[0].value), "source": dimensions[1].value,
            "medium": dimensions[2].value, "campaign_id": campaign, "campaign_name": campaign,
            "platform_conversion": event, "conversion": conversion, "kind": kind,
            "count": count, "value": float(metrics[1].value), "key_events": key_events})


@functools.lru_cache(maxsize=4096)
def _date(yyyymmdd: str) -> dt.date:
    return dt.date(int(yyyymmdd[:4]), int(yyyymmdd[4:6]), int(yyyymmdd[6:]))


def _event_definitions(property_id: str, totals: EventTotals,
                       mapping: ConversionMap) -> Iterator[PlatformConversion]:
    for event, (count, key_events) in sorted(totals.items()):
        yield mapping.mapped(_definition(property_id, event, count, key_events))


def _definition(property_id: str, event: str, count: float,
                key_events: float) -> PlatformConversion:
    return PlatformConversion(
        platform=Platform.GA4, account_id=property_id, platform_id=event, name=event,
        settings={"event_count": count, "key_events": key_events, "key_event": key_events > 0})


def event_names(client: BetaAnalyticsDataClient, property_id: str, start: dt.date,
                end: dt.date) -> Iterator[PlatformConversion]:
    """The property's events over a date range; key events flagged, with their counts."""
    schema = Schema()

    def run() -> Iterator[PlatformConversion]:
        request = report_request(property_id, ["eventName"],
                                 ["eventCount", schema.key_metric], start, end)
        return report_rows(client, request, PAGE_ROWS["grpc"], Requests(), _definitions_page)

    def _definitions_page(page: Any) -> Iterator[PlatformConversion]:
        for row in page.rows:
            count, key_events = (float(v.value) for v in row.metric_values)
            yield _definition(property_id, row.dimension_values[0].value, count, key_events)

    yield from adapting(property_id, schema, run)


# -- journeys: custom dimensions ---------------------------------------------------------------

@dataclass(frozen=True)
class _JourneyShape:
    """How one report's custom dimension values become identifiers."""

    property_id: str
    fields: tuple[str, ...]  # the Identifiers field of each custom dimension, in report order
    lookup: Callable[[str], tuple[str | None, Kind | None]]


def identifier_field(dimension: str) -> str:
    """``customEvent:gclid`` -> ``gclid``; a parameter that is no click id -> ``external_id``."""
    match = CUSTOM_DIMENSION.fullmatch(dimension)
    parameter = match[2] if match else dimension
    return parameter if parameter in IDENTIFIER_PARAMETERS else "external_id"


def journeys_pull(client: BetaAnalyticsDataClient, property_id: str, mapping: ConversionMap,
                  requests: Requests, schema: Schema,
                  page_rows: int = JOURNEY_PAGE_ROWS["grpc"],
                  ) -> Callable[[dt.date, dt.date], Iterator[Row]]:
    lookup = _lookup(mapping)

    def pull(start: dt.date, end: dt.date) -> Iterator[Row]:
        def run() -> Iterator[JourneyEvent]:
            custom = list(schema.custom_dimensions)
            if not custom:
                return iter(())
            shape = _JourneyShape(property_id, tuple(identifier_field(d) for d in custom),
                                  lookup)
            request = report_request(property_id, [*JOURNEY_DIMENSIONS, *custom],
                                     list(JOURNEY_METRICS), start, end, _any_set(custom))
            return report_rows(client, request, page_rows, requests,
                               lambda page: _journey_rows(page, shape))

        yield from adapting(property_id, schema, run)

    return pull


def _any_set(dimensions: list[str]) -> FilterExpression:
    """Rows where at least one of ``dimensions`` has a value (empty matches "(not set)")."""
    return FilterExpression(or_group=FilterExpressionList(expressions=[
        FilterExpression(not_expression=FilterExpression(
            filter=Filter(field_name=name, empty_filter=Filter.EmptyFilter())))
        for name in dimensions]))


def _journey_rows(page: Any, shape: _JourneyShape) -> Iterator[JourneyEvent]:
    """A page's rows (date, campaign, event, custom values; count, value) as JourneyEvents.

    The person is the first custom dimension with a value (``gclid:<gclid>``, as the Google
    Ads clicks name it); the event id is the property and every dimension value of the row.
    Identifiers are shallow ``model_copy``s of an empty one."""
    zone = ZoneInfo(page.metadata.time_zone)
    currency = page.metadata.currency_code
    no_identifiers = Identifiers().model_copy
    fields, lookup, prefix = shape.fields, shape.lookup, f"{shape.property_id}|"
    noons: dict[str, dt.datetime] = {}
    for row in page.rows:
        values = [v.value for v in row.dimension_values]
        date_text, campaign, event = values[0], values[1], values[2]
        found: dict[str, str] = {}
        for name, value in zip(fields, values[3:], strict=True):
            if value not in NOT_SET:
                found.setdefault(name, value)
        if not found:
            continue
        person_field, person = next(iter(found.items()))
        time = noons.get(date_text)
        if time is None:
            time = noons[date_text] = _noon_utc(_date(date_text), zone)
        conversion, _ = lookup(event)
        yield JourneyEvent(
            person_key=f"{person_field}:{person}", conversion=conversion,
            platform_conversion=event, time=time, source_platform=Platform.GA4,
            source_event_id=prefix + _joined(values),
            value=float(row.metric_values[1].value), currency=currency,
            identifiers=no_identifiers(update=found), campaign_id=campaign)


def _noon_utc(day: dt.date, zone: ZoneInfo) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(12), zone).astimezone(dt.UTC)


def _joined(values: list[str]) -> str:
    """The values joined by ``|``, a ``|`` or ``\\`` inside one escaped (rarely needed)."""
    text = "|".join(values)
    if "\\" in text or text.count("|") != len(values) - 1:
        text = "|".join(v.replace("\\", "\\\\").replace("|", "\\|") for v in values)
    return text


# -- errors ------------------------------------------------------------------------------------

def _refused_field(error: Exception) -> str | None:
    """The dimension or metric a Data API validation error names as not valid."""
    match = _REFUSED_FIELD.search(str(getattr(error, "message", "")))
    return match[1] if match else None


def _daily_quota(error: BaseException) -> bool:
    return "per day" in str(getattr(error, "message", ""))


def _is_retryable(error: BaseException) -> bool:
    """Transient: the hourly and concurrency quotas, 500/502/503/504 (gRPC INTERNAL,
    UNAVAILABLE, DEADLINE_EXCEEDED), a dropped connection, a report that moved under the
    pages. Not the daily token quota: it returns within 24 hours, not minutes."""
    if isinstance(error, api_exceptions.TooManyRequests):
        return not _daily_quota(error)
    return isinstance(error, ReportChanged | api_exceptions.InternalServerError
                      | api_exceptions.BadGateway | api_exceptions.ServiceUnavailable
                      | api_exceptions.GatewayTimeout | http.ConnectionError | http.Timeout)


def _retry_after(error: BaseException) -> float | None:
    """The wait the API asked for: a google.rpc.RetryInfo detail, or a Retry-After header."""
    for detail in getattr(error, "details", None) or ():
        if isinstance(detail, error_details_pb2.RetryInfo):
            return float(detail.retry_delay.seconds + detail.retry_delay.nanos / 1e9)
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith("RetryInfo"):
            return float(str(detail.get("retryDelay", "0s")).rstrip("s") or 0)
    response = getattr(error, "response", None)
    header = response.headers.get("Retry-After") if isinstance(response, http.Response) else None
    return float(header) if header and header.isdigit() else None


RETRY = RetryPolicy("ga4", _is_retryable, _retry_after)


def explain(error: Exception) -> str | None:
    """A one-line account of a GA4 Data API error, naming what to fix; None if not one."""
    if isinstance(error, ReportChanged):
        return f"GA4 Data API: {error} (retried; run the pull again if it persists)"
    if not isinstance(error, api_exceptions.GoogleAPICallError):
        return None
    hint = ""
    if _refused_field(error) == "conversions":
        hint = " (GA4 renamed the conversions metric keyEvents in 2024 and removed the old name)"
    elif isinstance(error, api_exceptions.TooManyRequests) and _daily_quota(error):
        hint = " (the property's daily tokens are spent: pull fewer days per run, or wait)"
    elif isinstance(error, api_exceptions.PermissionDenied):
        hint = (" (give the Google account or service account at least Viewer access to the "
                "property, and check ga4.property_id)")
    return f"GA4 Data API: {error.code} {error.message}{hint}"
