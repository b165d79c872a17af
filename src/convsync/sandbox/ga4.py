"""GA4 Data API v1beta simulator: ``RunReport`` and ``BatchRunReports`` over gRPC and REST.

One report engine (:func:`run_report`) serves both transports. It reads ``World.ga4_rows``,
validates a request the way the real API does (status codes, message wording where known),
filters, sums over the dimensions not asked for, sorts, pages and builds the raw protobuf
response, which the gRPC front end sends as is and the REST front end prints as proto3 JSON.

Fidelity decisions:

- ``conversions`` (renamed ``keyEvents`` in 2024, then removed) is refused like any unknown
  metric.
- ``limit`` above 250,000 is capped, not refused, as the API reference says ("a maximum of
  250,000 rows per request, no matter how many you ask for"); a negative one is refused.
- Without ``orderBys`` rows come by the first metric descending (what the API does), ties by
  dimension values ascending so paging is deterministic.
- Dimensions cited only by ``dimensionFilter`` count towards the 9-dimension limit.
- The property has one custom dimension, event-scoped on the ``gclid`` parameter
  (``customEvent:gclid``): Google campaigns' events come one row per gclid, event and day,
  every other event "(not set)" (``World.ga4_rows(by_gclid=True)``). Any other custom
  dimension is refused as the API refuses one the property has not registered.
- Real features the sandbox does not simulate (other dimensions and metrics, expressions,
  cohorts, comparisons, currency conversion, pivot / realtime / metadata methods) answer
  UNIMPLEMENTED (HTTP 501) naming the feature, never a made-up INVALID_ARGUMENT.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from http.server import ThreadingHTTPServer
from operator import attrgetter, itemgetter
from pathlib import Path
from typing import Any, Literal, NoReturn
from urllib.parse import unquote
from zoneinfo import ZoneInfo

import grpc
import numpy as np
from google.analytics.data_v1beta.types import (
    BatchRunReportsRequest,
    BatchRunReportsResponse,
    RunReportRequest,
    RunReportResponse,
)
from google.analytics.data_v1beta.types import data as ga4_data
from google.protobuf import json_format

from convsync.sandbox.control import Fault, Sandbox
from convsync.sandbox.http import ApiError, Handler, Request, Response, serve_rest
from convsync.sandbox.world import Ga4Row, World

log = logging.getLogger(__name__)

SERVICE = "google.analytics.data.v1beta.BetaAnalyticsData"
GCLID_DIMENSION = "customEvent:gclid"
"""The property's one custom dimension: event-scoped, the ``gclid`` event parameter."""
DEFAULT_LIMIT = 10_000
MAX_LIMIT = 250_000
MAX_DIMENSIONS = 9
MAX_METRICS = 10
MAX_DATE_RANGES = 4
MAX_BATCH_REPORTS = 5
EARLIEST_DATE = dt.date(2015, 8, 14)
SCHEMA_URL = "https://developers.google.com/analytics/devguides/reporting/data/v1/api-schema"
PROPERTY_ID_URL = "https://developers.google.com/analytics/devguides/reporting/data/v1/property-id"
QUOTAS_URL = "https://developers.google.com/analytics/devguides/reporting/data/v1/quotas"
PERMISSION_DENIED_MESSAGE = ("User does not have sufficient permissions for this property. "
                             f"To learn more about Property ID, see {PROPERTY_ID_URL}.")
HOURLY_QUOTA_MESSAGE = ("Exhausted property tokens per hour. These quota tokens will return in "
                        f"under an hour. To learn more, see {QUOTAS_URL}")
DAILY_QUOTA_MESSAGE = ("Exhausted property tokens per day. These quota tokens will return in "
                       f"under 24 hours. To learn more, see {QUOTAS_URL}")
UNAVAILABLE_MESSAGE = "The service is currently unavailable."
INTERNAL_MESSAGE = "Internal error encountered."

TYPE_INTEGER = int(ga4_data.MetricType.TYPE_INTEGER)
TYPE_CURRENCY = int(ga4_data.MetricType.TYPE_CURRENCY)
_MatchType = ga4_data.Filter.StringFilter.MatchType
_Operation = ga4_data.Filter.NumericFilter.Operation
_OrderType = ga4_data.OrderBy.DimensionOrderBy.OrderType
_Aggregation = ga4_data.MetricAggregation
_AGGREGATION_MARKERS = {int(_Aggregation.TOTAL): ("totals", "RESERVED_TOTAL"),
                        int(_Aggregation.MAXIMUM): ("maximums", "RESERVED_MAX"),
                        int(_Aggregation.MINIMUM): ("minimums", "RESERVED_MIN")}

# Standard-property core quotas (tokens per property per day / hour, per project per hour).
TOKENS_PER_DAY = 200_000
TOKENS_PER_HOUR = 40_000
TOKENS_PER_PROJECT_PER_HOUR = 14_000


class Ga4Error(Exception):
    """A request the API refuses: its gRPC status code and the API's own message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _invalid(message: str) -> Ga4Error:
    return Ga4Error(grpc.StatusCode.INVALID_ARGUMENT, message)


def _unsimulated(feature: str) -> Ga4Error:
    return Ga4Error(grpc.StatusCode.UNIMPLEMENTED,
                    f"The convsync sandbox does not simulate {feature}.")


def _fault_error(fault: Fault) -> Ga4Error:
    """rate_limit: the hourly token quota; exhausted: the daily one; server_error: an outage."""
    if fault.kind == "rate_limit":
        return Ga4Error(grpc.StatusCode.RESOURCE_EXHAUSTED, HOURLY_QUOTA_MESSAGE)
    if fault.kind == "exhausted":
        return Ga4Error(grpc.StatusCode.RESOURCE_EXHAUSTED, DAILY_QUOTA_MESSAGE)
    return Ga4Error(grpc.StatusCode.UNAVAILABLE, UNAVAILABLE_MESSAGE)


# -- the schema: what the sandbox property can report ------------------------------------------

@lru_cache(maxsize=4096)
def _yyyymmdd(day: dt.date) -> str:
    return day.strftime("%Y%m%d")


def _same(value: str) -> str:
    return value


@dataclass(frozen=True)
class _Dimension:
    attributes: tuple[str, ...]  # the Ga4Row attributes it is made of
    render: Callable[..., str]  # those attribute values -> the dimension value


_DIMENSIONS = {
    "date": _Dimension(("date",), _yyyymmdd),
    "eventName": _Dimension(("event_name",), _same),
    "sessionSource": _Dimension(("source",), _same),
    "sessionMedium": _Dimension(("medium",), _same),
    "sessionCampaignName": _Dimension(("campaign_name",), _same),
    "sessionSourceMedium": _Dimension(("source", "medium"), lambda s, m: f"{s} / {m}"),
    GCLID_DIMENSION: _Dimension(("gclid",), _same),
}
DATE_RANGE_DIMENSION = "dateRange"


@dataclass(frozen=True)
class _Metric:
    name: str
    type: int  # MetricType number
    attribute: str  # the Ga4Row attribute it sums


_METRICS = {metric.name: metric for metric in (
    _Metric("eventCount", TYPE_INTEGER, "event_count"),
    _Metric("keyEvents", TYPE_INTEGER, "key_events"),
    _Metric("eventValue", TYPE_CURRENCY, "event_value"),
)}

# Real API names the sandbox does not compute: UNIMPLEMENTED rather than "not a valid field".
_UNSIMULATED_DIMENSIONS = frozenset({
    "browser", "campaignId", "campaignName", "city", "country", "dateHour", "dateHourMinute",
    "day", "dayOfWeek", "defaultChannelGroup", "deviceCategory", "firstUserCampaignName",
    "firstUserMedium", "firstUserSource", "firstUserSourceMedium", "hostName", "isKeyEvent",
    "landingPage", "landingPagePlusQueryString", "language", "medium", "month",
    "newVsReturning", "operatingSystem", "pagePath", "pageTitle", "platform", "region",
    "sessionCampaignId", "sessionDefaultChannelGroup", "sessionGoogleAdsCampaignName",
    "source", "sourceMedium", "week", "year", "yearMonth"})
_UNSIMULATED_METRICS = frozenset({
    "activeUsers", "advertiserAdClicks", "advertiserAdCost", "averageSessionDuration",
    "bounceRate", "ecommercePurchases", "engagedSessions", "engagementRate",
    "eventCountPerUser", "eventsPerSession", "itemRevenue", "newUsers", "purchaseRevenue",
    "screenPageViews", "sessionKeyEventRate", "sessions", "totalRevenue", "totalUsers",
    "transactions", "userEngagementDuration", "userKeyEventRate"})


def _check_dimension(name: str) -> None:
    """Refuse what the real API refuses; names it knows but the sandbox lacks pass here."""
    if name not in _DIMENSIONS and name not in _UNSIMULATED_DIMENSIONS:
        raise _invalid(f"Field {name} is not a valid dimension. For a list of valid dimensions "
                       f"and metrics, see {SCHEMA_URL}")


def _check_metric(name: str) -> None:
    if name not in _METRICS and name not in _UNSIMULATED_METRICS \
            and not name.startswith("keyEvents:"):
        raise _invalid(f"Field {name} is not a valid metric. For a list of valid dimensions and "
                       f"metrics, see {SCHEMA_URL}")


def _refuse_unsimulated_fields(dimensions: list[str], metrics: list[str]) -> None:
    """Valid for the real API but not computed by the sandbox: say so (UNIMPLEMENTED)."""
    for name in dimensions:
        if name not in _DIMENSIONS:
            raise _unsimulated(f"the dimension {name}")
    for name in metrics:
        if name not in _METRICS:
            raise _unsimulated(f"the metric {name}")


def _attribute_getter(names: list[str]) -> Callable[[Ga4Row], tuple[Any, ...]]:
    """These Ga4Row attributes of a row, always as a tuple (one C call when there are several)."""
    if not names:
        return lambda row: ()
    if len(names) == 1:
        only = names[0]
        return lambda row: (getattr(row, only),)
    return attrgetter(*names)


def _renderer(dimensions: list[str]) -> tuple[list[str], Callable[[tuple[Any, ...]],
                                                                   tuple[str, ...]]]:
    """(the Ga4Row attributes these dimensions read, those attribute values -> their values)."""
    specs = [_DIMENSIONS[name] for name in dimensions]
    attributes = list(dict.fromkeys(a for spec in specs for a in spec.attributes))
    parts = [_part(spec, [attributes.index(a) for a in spec.attributes]) for spec in specs]

    def render(raw: tuple[Any, ...]) -> tuple[str, ...]:
        return tuple([part(raw) for part in parts])

    return attributes, render


def _part(spec: _Dimension, positions: list[int]) -> Callable[[tuple[Any, ...]], str]:
    """One dimension's value from the raw attribute tuple (a plain C lookup when it can be)."""
    if spec.render is _same:
        return itemgetter(positions[0])
    if len(positions) == 1:
        render, position = spec.render, positions[0]
        return lambda raw: render(raw[position])
    return lambda raw: spec.render(*(raw[i] for i in positions))


# -- parsing and validating a request -----------------------------------------------------------

@dataclass(frozen=True)
class _DateRange:
    label: str
    start: dt.date
    end: dt.date


Predicate = Callable[[Mapping[str, Any]], bool]


@dataclass
class _Query:
    """A RunReportRequest once validated."""

    dimensions: list[str]
    metrics: list[_Metric]
    filter_metrics: list[_Metric]  # cited by metricFilter only: computed, never returned
    ranges: list[_DateRange]
    limit: int
    offset: int
    row_filter: Callable[[Ga4Row], bool] | None = None
    metric_filter: Predicate | None = None
    order_bys: list[Any] = field(default_factory=list)  # OrderBy protobufs
    aggregations: list[int] = field(default_factory=list)
    keep_empty_rows: bool = False
    by_gclid: bool = False  # the gclid custom dimension is requested or filtered on

    @property
    def multi_range(self) -> bool:
        return len(self.ranges) > 1

    @property
    def header_dimensions(self) -> list[str]:
        return self.dimensions + ([DATE_RANGE_DIMENSION] if self.multi_range else [])


def _parse(request: Any, world: World) -> _Query:
    """Validate in the order the API does: names, paging, dates, then the limits."""
    _refuse_unsimulated_features(request, world.accounts.currency)
    metric_names = _field_names(request.metrics, "metrics", _check_metric)
    dimensions = _field_names(request.dimensions, "dimensions", _check_dimension)
    limit, offset = _paging(request)
    ranges = _date_ranges(request, _today(world))
    dimension_filter, filter_dimensions = _filter(request, "dimension_filter", "dimension")
    metric_filter, filter_metrics = _filter(request, "metric_filter", "metric")
    _check_counts(dimensions + filter_dimensions, metric_names + filter_metrics,
                  bool(dimensions or metric_names))
    _refuse_unsimulated_fields(dimensions + filter_dimensions, metric_names + filter_metrics)
    query = _Query(
        dimensions=dimensions, metrics=[_METRICS[name] for name in metric_names],
        filter_metrics=[_METRICS[name] for name in dict.fromkeys(filter_metrics)
                        if name not in metric_names],
        ranges=ranges, limit=limit, offset=offset,
        row_filter=_row_filter(dimension_filter, filter_dimensions),
        metric_filter=metric_filter, keep_empty_rows=request.keep_empty_rows,
        by_gclid=GCLID_DIMENSION in dimensions + filter_dimensions)
    query.order_bys = _order_bys(request, query)
    query.aggregations = _aggregations(request)
    return query


def _refuse_unsimulated_features(request: Any, currency: str) -> None:
    if request.HasField("cohort_spec"):
        raise _unsimulated("cohort reports (cohortSpec)")
    if request.comparisons:
        raise _unsimulated("comparisons")
    if any(metric.expression or metric.invisible for metric in request.metrics):
        raise _unsimulated("metric expressions and invisible metrics")
    if any(dimension.HasField("dimension_expression") for dimension in request.dimensions):
        raise _unsimulated("dimension expressions")
    if request.currency_code and request.currency_code != currency:
        raise _unsimulated(f"currency conversion (the property reports in {currency})")


def _field_names(fields: Any, kind: str, check: Callable[[str], None]) -> list[str]:
    names = [field_.name for field_ in fields]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise _invalid(f"Duplicate {kind} are not allowed. Found duplicate {kind}: "
                       f"{', '.join(duplicates)}")
    for name in names:
        check(name)
    return names


def _paging(request: Any) -> tuple[int, int]:
    if request.limit < 0:
        raise _invalid(f"limit must be positive. The API received limit = {request.limit}")
    if request.offset < 0:
        raise _invalid(f"offset must be positive. The API received offset = {request.offset}")
    return min(request.limit or DEFAULT_LIMIT, MAX_LIMIT), request.offset


def _today(world: World) -> dt.date:
    """The property's "today": the world's clock in the property time zone."""
    return world.as_of.astimezone(ZoneInfo(world.accounts.ga4_tz)).date()


_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_DAYS_AGO = re.compile(r"(\d{1,5})daysAgo")


def _date_ranges(request: Any, today: dt.date) -> list[_DateRange]:
    if not request.date_ranges:
        raise _invalid("A dateRange is required.")
    if len(request.date_ranges) > MAX_DATE_RANGES:
        raise _invalid(f"Requests are limited to {MAX_DATE_RANGES} dateRanges. This request "
                       f"contains {len(request.date_ranges)} dateRanges.")
    ranges = []
    for index, date_range in enumerate(request.date_ranges):
        start = _resolve_date(date_range.start_date, today, "startDate")
        end = _resolve_date(date_range.end_date, today, "endDate")
        if start > end:
            raise _invalid("startDate must be less than or equal to endDate. "
                           f"startDate = {start.isoformat()} and endDate = {end.isoformat()}")
        ranges.append(_DateRange(date_range.name or f"date_range_{index}", start, end))
    labels = [date_range.label for date_range in ranges]
    if len(set(labels)) < len(labels):
        raise _invalid(f"Date range names must be unique; this request names them {labels}.")
    return ranges


def _resolve_date(text: str, today: dt.date, key: str) -> dt.date:
    """YYYY-MM-DD, ``today``, ``yesterday`` or ``NdaysAgo`` (relative to the property's today)."""
    resolved: dt.date | None = None
    days_ago = _DAYS_AGO.fullmatch(text)
    if text in ("today", "yesterday"):
        resolved = today - dt.timedelta(days=int(text == "yesterday"))
    elif days_ago:
        resolved = today - dt.timedelta(days=int(days_ago[1]))
    elif _ISO_DATE.fullmatch(text):
        try:
            resolved = dt.date.fromisoformat(text)
        except ValueError:
            resolved = None
    if resolved is None:
        raise _invalid(f"Invalid {key} : {text}. {key} must be YYYY-MM-DD, NdaysAgo, "
                       "yesterday, or today.")
    if resolved < EARLIEST_DATE:
        raise _invalid(f"{key} = {resolved.isoformat()} must be on or after "
                       f"{EARLIEST_DATE.isoformat()}.")
    return resolved


def _check_counts(dimensions: list[str], metrics: list[str], any_requested: bool) -> None:
    """The limits count every field the request touches, filters included."""
    dimension_count, metric_count = len(set(dimensions)), len(set(metrics))
    if dimension_count > MAX_DIMENSIONS:
        raise _invalid(f"Requests are limited to {MAX_DIMENSIONS} dimensions within a nested "
                       f"request. This request is for {dimension_count} dimensions.")
    if metric_count > MAX_METRICS:
        raise _invalid(f"Requests are limited to {MAX_METRICS} metrics within a nested "
                       f"request. This request is for {metric_count} metrics.")
    if not any_requested:
        raise _invalid("Requests require dimensions and/or metrics. Most requests include "
                       "both.")


def _order_bys(request: Any, query: _Query) -> list[Any]:
    metric_names = {metric.name for metric in query.metrics}
    for order_by in request.order_bys:
        kind = order_by.WhichOneof("one_order_by")
        if kind == "pivot":
            raise _invalid("PivotOrderBy is only supported in pivot reports.")
        if kind is None:
            raise _invalid("An OrderBy must order by a metric or a dimension.")
        name = (order_by.metric.metric_name if kind == "metric"
                else order_by.dimension.dimension_name)
        known = metric_names if kind == "metric" else set(query.header_dimensions)
        if name not in known:
            raise _invalid(f"Field {name} exists in OrderBy but is not defined in input "
                           "Dimensions/Metrics list")
    return list(request.order_bys)


def _aggregations(request: Any) -> list[int]:
    wanted = []
    for aggregation in request.metric_aggregations:
        if aggregation == _Aggregation.COUNT:
            raise _invalid("Metric aggregation Count is not supported in ReportRequest.")
        if aggregation != _Aggregation.METRIC_AGGREGATION_UNSPECIFIED:
            wanted.append(int(aggregation))
    return list(dict.fromkeys(wanted))


# -- filters ------------------------------------------------------------------------------------

def _filter(request: Any, field_name: str, kind: Literal["dimension", "metric"]
            ) -> tuple[Predicate | None, list[str]]:
    """(the request's dimension or metric filter as a predicate, the fields it cites)."""
    if not request.HasField(field_name):
        return None, []
    predicate, cited = _compile_expression(getattr(request, field_name), kind)
    return predicate, list(dict.fromkeys(cited))


def _row_filter(predicate: Predicate | None, names: list[str]
                ) -> Callable[[Ga4Row], bool] | None:
    """The dimension filter on raw rows, decided once per distinct combination it reads."""
    if predicate is None:
        return None
    attributes, render = _renderer(names)
    raw_of = _attribute_getter(attributes)
    memo: dict[tuple[Any, ...], bool] = {}

    def keep(row: Ga4Row) -> bool:
        raw = raw_of(row)
        kept = memo.get(raw)
        if kept is None:
            kept = memo[raw] = predicate(dict(zip(names, render(raw), strict=True)))
        return kept

    return keep


def _compile_expression(expression: Any, kind: Literal["dimension", "metric"]
                        ) -> tuple[Predicate, list[str]]:
    """A FilterExpression -> (predicate over field values, the fields it cites)."""
    which = expression.WhichOneof("expr")
    if which in ("and_group", "or_group"):
        parts = [_compile_expression(e, kind) for e in getattr(expression, which).expressions]
        predicates = [predicate for predicate, _ in parts]
        cited = [name for _, names in parts for name in names]
        if which == "and_group":
            return (lambda values: all(p(values) for p in predicates)), cited
        return (lambda values: any(p(values) for p in predicates)), cited
    if which == "not_expression":
        inner, cited = _compile_expression(expression.not_expression, kind)
        return (lambda values: not inner(values)), cited
    if which == "filter":
        return _compile_filter(expression.filter, kind), [expression.filter.field_name]
    raise _invalid(f"A {kind}Filter expression must set andGroup, orGroup, notExpression "
                   "or filter.")


def _compile_filter(filter_: Any, kind: Literal["dimension", "metric"]) -> Predicate:
    name = filter_.field_name
    (_check_dimension if kind == "dimension" else _check_metric)(name)
    which = filter_.WhichOneof("one_filter")
    if which is None:
        raise _invalid(f"The filter on {name} has no condition.")
    if which in ("numeric_filter", "between_filter"):
        return _numeric_predicate(name, filter_)
    if kind == "metric":
        raise _invalid(f"Metric filters take a numericFilter or betweenFilter; the filter on "
                       f"{name} has a {which}.")
    if which == "empty_filter":
        return lambda values: values[name] in ("", "(not set)")
    if which == "in_list_filter":
        return _in_list_predicate(name, filter_.in_list_filter)
    return _string_predicate(name, filter_.string_filter)


def _string_predicate(name: str, string_filter: Any) -> Predicate:
    sensitive = string_filter.case_sensitive
    match_type = string_filter.match_type
    if match_type in (_MatchType.FULL_REGEXP, _MatchType.PARTIAL_REGEXP):
        try:
            pattern = re.compile(string_filter.value, 0 if sensitive else re.IGNORECASE)
        except re.error as error:
            raise _invalid(f"Invalid regular expression {string_filter.value!r} for {name}: "
                           f"{error}") from error
        find = pattern.fullmatch if match_type == _MatchType.FULL_REGEXP else pattern.search
        return lambda values: find(values[name]) is not None
    wanted = string_filter.value if sensitive else string_filter.value.lower()
    tests: dict[int, Callable[[str], bool]] = {
        _MatchType.BEGINS_WITH: lambda value: value.startswith(wanted),
        _MatchType.ENDS_WITH: lambda value: value.endswith(wanted),
        _MatchType.CONTAINS: lambda value: wanted in value,
    }
    test = tests.get(match_type, lambda value: value == wanted)  # EXACT, also when unset
    if sensitive:
        return lambda values: test(values[name])
    return lambda values: test(values[name].lower())


def _in_list_predicate(name: str, in_list: Any) -> Predicate:
    if in_list.case_sensitive:
        exact = frozenset(in_list.values)
        return lambda values: values[name] in exact
    lowered = frozenset(value.lower() for value in in_list.values)
    return lambda values: values[name].lower() in lowered


def _numeric_predicate(name: str, filter_: Any) -> Predicate:
    if filter_.WhichOneof("one_filter") == "between_filter":
        low = _number(filter_.between_filter.from_value)
        high = _number(filter_.between_filter.to_value)
        return lambda values: _compare(values[name], lambda x: low <= x <= high)
    operation = filter_.numeric_filter.operation
    target = _number(filter_.numeric_filter.value)
    tests: dict[int, Callable[[float], bool]] = {
        _Operation.EQUAL: lambda x: x == target,
        _Operation.LESS_THAN: lambda x: x < target,
        _Operation.LESS_THAN_OR_EQUAL: lambda x: x <= target,
        _Operation.GREATER_THAN: lambda x: x > target,
        _Operation.GREATER_THAN_OR_EQUAL: lambda x: x >= target,
    }
    test = tests.get(operation)
    if test is None:
        raise _invalid(f"The numeric filter on {name} needs an operation.")
    return lambda values: _compare(values[name], test)


def _number(value: Any) -> float:
    return float(value.double_value if value.WhichOneof("one_value") == "double_value"
                 else value.int64_value)


def _compare(value: str | float, test: Callable[[float], bool]) -> bool:
    """Numeric filters on dimensions compare the value as a number (dates as YYYYMMDD)."""
    try:
        return test(float(value))
    except ValueError:
        return False


# -- computing the report -----------------------------------------------------------------------

Cells = list[tuple[tuple[str, ...], list[float]]]


@dataclass
class _Report:
    """Every row of a report, filtered and sorted, before paging; plus its aggregate rows."""

    rows: Cells
    aggregates: dict[int, Cells]


def _compute(world: World, query: _Query) -> _Report:
    metric_count = len(query.metrics)
    rows = [(key, values) for key, values in _aggregate(world, query) if _keep(query, values)]
    if query.metric_filter is not None:
        names = [metric.name for metric in query.metrics + query.filter_metrics]
        predicate = query.metric_filter
        rows = [(key, values) for key, values in rows
                if predicate(dict(zip(names, values, strict=True)))]
    if query.filter_metrics:
        rows = [(key, values[:metric_count]) for key, values in rows]
    _sort(rows, query)
    return _Report(rows, {aggregation: _aggregate_rows(query, rows, aggregation)
                          for aggregation in query.aggregations})


def _aggregate(world: World, query: _Query) -> Cells:
    """Sum the world's rows per requested dimension values (and date range, when several).

    Rows go into flat arrays (cell number, metric values) summed by numpy, so a year of a
    large world costs one dictionary lookup per row and leaves no per-row Python objects."""
    attributes, render = _renderer(query.dimensions)
    raw_of = _attribute_getter(attributes)
    metrics = query.metrics + query.filter_metrics
    numbers_of = _attribute_getter([metric.attribute for metric in metrics])
    labels_on = _range_labels_by_date(query)
    keep = query.row_filter
    cells: dict[tuple[Any, ...], int] = {}
    cell_of_row, numbers = array("q"), array("d")
    for row in _rows_in(world, query.ranges, query.by_gclid):
        labels = labels_on.get(row.date)
        if labels is None or (keep is not None and not keep(row)):
            continue
        raw = raw_of(row)
        for label in labels:
            cell_of_row.append(cells.setdefault((raw, label), len(cells)))
            numbers.extend(numbers_of(row))
    sums = _column_sums(cell_of_row, numbers, len(cells), len(metrics))
    return [(render(raw) + label, values)
            for (raw, label), values in zip(cells, sums.tolist(), strict=True)]


def _column_sums(cell_of_row: array[int], numbers: array[float], cells: int,
                 width: int) -> np.ndarray:
    if not cells or not width:
        return np.zeros((cells, width))
    index = np.frombuffer(cell_of_row, dtype=np.int64)
    values = np.frombuffer(numbers, dtype=np.float64).reshape(-1, width)
    return np.column_stack([np.bincount(index, weights=values[:, column], minlength=cells)
                            for column in range(width)])


def _range_labels_by_date(query: _Query) -> dict[dt.date, list[tuple[str, ...]]]:
    """Each date -> the dateRange values it counts under (``()`` for a single range)."""
    labels: dict[dt.date, list[tuple[str, ...]]] = {}
    for date_range in query.ranges:
        label = (date_range.label,) if query.multi_range else ()
        day = date_range.start
        while day <= date_range.end:
            labels.setdefault(day, []).append(label)
            day += dt.timedelta(days=1)
    return labels


def _rows_in(world: World, ranges: list[_DateRange], by_gclid: bool) -> Iterator[Ga4Row]:
    """The world's rows over the union of the ranges, each day read once (one row per gclid
    for Google campaigns' events when the gclid custom dimension is asked for)."""
    spans = sorted((r.start, r.end) for r in ranges)
    merged: list[list[dt.date]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1] + dt.timedelta(days=1):
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    for start, end in merged:
        yield from world.ga4_rows(start, end, by_gclid=by_gclid)


def _keep(query: _Query, values: list[float]) -> bool:
    """Rows whose requested metrics are all zero are dropped unless keepEmptyRows."""
    requested = values[:len(query.metrics)]
    return query.keep_empty_rows or not requested or any(requested)


def _sort(rows: Cells, query: _Query) -> None:
    rows.sort(key=lambda row: row[0])
    if not query.order_bys:
        if query.metrics:
            rows.sort(key=lambda row: row[1][0], reverse=True)
        return
    for order_by in reversed(query.order_bys):  # stable sorts: the first orderBy wins
        rows.sort(key=_order_key(order_by, query), reverse=order_by.desc)


def _order_key(order_by: Any, query: _Query) -> Callable[[tuple[tuple[str, ...], list[float]]],
                                                           Any]:
    if order_by.WhichOneof("one_order_by") == "metric":
        index = [metric.name for metric in query.metrics].index(order_by.metric.metric_name)
        return lambda row: row[1][index]
    index = query.header_dimensions.index(order_by.dimension.dimension_name)
    order_type = order_by.dimension.order_type
    if order_type == _OrderType.NUMERIC:
        return lambda row: _numeric_order(row[0][index])
    if order_type == _OrderType.CASE_INSENSITIVE_ALPHANUMERIC:
        return lambda row: row[0][index].lower()
    return lambda row: row[0][index]


def _numeric_order(value: str) -> tuple[int, float]:
    """NUMERIC order: numbers by value, every non-numeric value below all of them."""
    try:
        return (1, float(value))
    except ValueError:
        return (0, 0.0)


_COMBINERS: dict[int, Callable[[tuple[float, ...]], float]] = {
    int(_Aggregation.TOTAL): lambda column: sum(column),
    int(_Aggregation.MAXIMUM): lambda column: max(column),
    int(_Aggregation.MINIMUM): lambda column: min(column),
}


def _aggregate_rows(query: _Query, rows: Cells, aggregation: int) -> Cells:
    """One TOTAL / MAXIMUM / MINIMUM row per date range, over every row before paging."""
    marker = _AGGREGATION_MARKERS[aggregation][1]
    combine = _COMBINERS[aggregation]
    out: Cells = []
    for date_range in query.ranges:
        label = (date_range.label,) if query.multi_range else ()
        mine = [values for key, values in rows if key[len(query.dimensions):] == label]
        if mine:
            totals = [combine(column) for column in zip(*mine, strict=True)]
            out.append(((marker,) * len(query.dimensions) + label, totals))
    return out


# -- the response -------------------------------------------------------------------------------

def _format_integer(value: float) -> str:
    return str(round(value))


def _format_decimal(value: float) -> str:
    """Amounts as the API prints doubles: "12" when whole, else the shortest exact digits."""
    rounded = round(float(value), 2)
    return str(int(rounded)) if rounded.is_integer() else repr(rounded)


def _response(query: _Query, report: _Report, world: World) -> Any:
    response = RunReportResponse.pb()()
    for name in query.header_dimensions:
        response.dimension_headers.add(name=name)
    for metric in query.metrics:
        response.metric_headers.add(name=metric.name, type_=metric.type)
    formats: list[Callable[[float], str]] = [
        _format_integer if metric.type == TYPE_INTEGER else _format_decimal
        for metric in query.metrics]
    _add_rows(response.rows, report.rows[query.offset:query.offset + query.limit], formats)
    for aggregation, rows in report.aggregates.items():
        _add_rows(getattr(response, _AGGREGATION_MARKERS[aggregation][0]), rows, formats)
    response.row_count = len(report.rows)
    response.metadata.currency_code = world.accounts.currency
    response.metadata.time_zone = world.accounts.ga4_tz
    response.kind = "analyticsData#runReport"
    return response


def _add_rows(target: Any, rows: Cells, formats: list[Callable[[float], str]]) -> None:
    for dimensions, values in rows:
        row = target.add()
        for dimension in dimensions:
            row.dimension_values.add(value=dimension)
        for format_, number in zip(formats, values, strict=True):
            row.metric_values.add(value=format_(number))


# -- quota and caching --------------------------------------------------------------------------

class QuotaLedger:
    """The property's core tokens, spent per wall-clock hour and (UTC) day.

    The cost model is a plausible stand-in (1 token, more for long ranges, big results and
    many dimensions), not Google's formula. Tokens are reported, never enforced: quota errors
    come from injected faults."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hour = self._day = -1
        self._used_hour = self._used_day = 0

    def charge(self, cost: int) -> Any:
        """Spend ``cost`` tokens; the PropertyQuota after this request."""
        now = time.time()
        with self._lock:
            hour, day = int(now // 3600), int(now // 86_400)
            if hour != self._hour:
                self._hour, self._used_hour = hour, 0
            if day != self._day:
                self._day, self._used_day = day, 0
            self._used_hour += cost
            self._used_day += cost
            used_hour, used_day = self._used_hour, self._used_day
        quota = ga4_data.PropertyQuota.pb()()
        for status, limit, used in (
                (quota.tokens_per_day, TOKENS_PER_DAY, used_day),
                (quota.tokens_per_hour, TOKENS_PER_HOUR, used_hour),
                (quota.tokens_per_project_per_hour, TOKENS_PER_PROJECT_PER_HOUR, used_hour)):
            status.consumed, status.remaining = cost, max(0, limit - used)
        for status, limit in ((quota.concurrent_requests, 10),
                              (quota.server_errors_per_project_per_hour, 10),
                              (quota.potentially_thresholded_requests_per_hour, 120)):
            status.consumed, status.remaining = 0, limit
        return quota


def _token_cost(query: _Query, row_count: int) -> int:
    longest = max((r.end - r.start).days + 1 for r in query.ranges)
    return 1 + longest // 90 + row_count // 25_000 + len(query.dimensions) // 5


class ReportCache:
    """The last few reports, so paging through one with limit/offset does not recompute it."""

    def __init__(self, size: int = 2) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._reports: OrderedDict[bytes, _Report] = OrderedDict()

    def report(self, key: bytes, compute: Callable[[], _Report]) -> _Report:
        with self._lock:
            cached = self._reports.get(key)
            if cached is not None:
                self._reports.move_to_end(key)
                return cached
        report = compute()
        with self._lock:
            self._reports[key] = report
            while len(self._reports) > self._size:
                self._reports.popitem(last=False)
        return report


def _cache_key(request: Any, world: World) -> bytes:
    """The request without its paging and quota switches, at the world's current clock."""
    unpaged = type(request)()
    unpaged.CopyFrom(request)
    unpaged.ClearField("limit")
    unpaged.ClearField("offset")
    unpaged.ClearField("return_property_quota")
    unpaged.ClearField("property")
    return unpaged.SerializeToString(deterministic=True) + repr(world.as_of_ts).encode()


# -- the engine ---------------------------------------------------------------------------------

def run_report(world: World, property_id: str, request: object, *,
               quota: QuotaLedger | None = None, cache: ReportCache | None = None) -> Any:
    """Answer a RunReportRequest for ``property_id`` ("123" or "properties/123").

    ``request`` is a RunReportRequest (proto-plus or raw protobuf) or its JSON dict. Returns a
    raw ``RunReportResponse`` protobuf; raises :class:`Ga4Error` when the API would refuse."""
    message = _as_protobuf(request, RunReportRequest)
    _check_property(property_id, world)
    query = _parse(message, world)
    report = (cache.report(_cache_key(message, world), lambda: _compute(world, query))
              if cache is not None else _compute(world, query))
    response = _response(query, report, world)
    status = (quota or QuotaLedger()).charge(_token_cost(query, len(report.rows)))
    if message.return_property_quota:
        response.property_quota.CopyFrom(status)
    return response


def batch_run_reports(world: World, property_id: str, request: object, *,
                      quota: QuotaLedger | None = None, cache: ReportCache | None = None) -> Any:
    """Answer a BatchRunReportsRequest: every report, or the first report's error."""
    message = _as_protobuf(request, BatchRunReportsRequest)
    _check_property(property_id, world)
    if not 0 < len(message.requests) <= MAX_BATCH_REPORTS:
        raise _invalid(f"Requests are limited to {MAX_BATCH_REPORTS} reports within a batch "
                       f"request. This request contains {len(message.requests)} reports.")
    response = BatchRunReportsResponse.pb()()
    for report_request in message.requests:
        if report_request.property and _property_number(report_request.property) != \
                _property_number(property_id):
            raise _invalid("Within a batch request, a report's property must be unspecified "
                           "or consistent with the batch-level property.")
        response.reports.append(run_report(world, property_id, report_request,
                                           quota=quota, cache=cache))
    response.kind = "analyticsData#batchRunReports"
    return response


def _as_protobuf(request: object, message_type: Any) -> Any:
    if isinstance(request, message_type):
        return message_type.pb(request)
    if isinstance(request, message_type.pb()):
        return request
    if isinstance(request, Mapping):
        try:
            return json_format.ParseDict(request, message_type.pb()())
        except json_format.ParseError as error:
            raise _invalid(_json_error(error)) from error
    raise TypeError(f"expected a {message_type.__name__} or its JSON dict, got {request!r}")


def _property_number(property_id: str) -> str:
    return property_id.removeprefix("properties/")


def _check_property(property_id: str, world: World) -> None:
    number = _property_number(property_id)
    if not number.isdigit():
        raise _invalid(f"Invalid property ID: {property_id}. A property is named "
                       f"properties/{{numeric id}}; see {PROPERTY_ID_URL}.")
    if number != world.accounts.ga4_property_id:
        raise Ga4Error(grpc.StatusCode.PERMISSION_DENIED, PERMISSION_DENIED_MESSAGE)


_UNKNOWN_JSON_FIELD = re.compile(r'has no field named "([^"]+)"')


def _json_error(error: json_format.ParseError) -> str:
    """Google's transcoding message for a body the proto does not accept."""
    unknown = _UNKNOWN_JSON_FIELD.search(str(error))
    if unknown:
        return f'Invalid JSON payload received. Unknown name "{unknown[1]}": Cannot find field.'
    return f"Invalid JSON payload received. {str(error).splitlines()[0]}"


class Ga4Property:
    """The simulated property both front ends share: its world, quota ledger and report cache."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.quota = QuotaLedger()
        self.cache = ReportCache()

    def run_report(self, property_id: str, request: object) -> Any:
        return run_report(self.world, property_id, request, quota=self.quota, cache=self.cache)

    def batch_run_reports(self, property_id: str, request: object) -> Any:
        return batch_run_reports(self.world, property_id, request, quota=self.quota,
                                 cache=self.cache)


# -- gRPC front end -----------------------------------------------------------------------------

class _GrpcService:
    def __init__(self, sandbox: Sandbox, ga4: Ga4Property) -> None:
        self.sandbox = sandbox
        self.ga4 = ga4

    def run_report(self, request: Any, context: Any) -> Any:
        message = RunReportRequest.pb(request)
        response = self._answer(context, "runReport",
                                lambda: self.ga4.run_report(message.property, message))
        return RunReportResponse.wrap(response)

    def batch_run_reports(self, request: Any, context: Any) -> Any:
        message = BatchRunReportsRequest.pb(request)
        response = self._answer(context, "batchRunReports",
                                lambda: self.ga4.batch_run_reports(message.property, message))
        return BatchRunReportsResponse.wrap(response)

    def _answer(self, context: Any, method: str, answer: Callable[[], Any]) -> Any:
        self.sandbox.count("ga4", method)
        fault = self.sandbox.next_fault("ga4")
        if fault is not None and fault.kind == "slow":
            time.sleep(fault.delay)
        elif fault is not None:
            error = _fault_error(fault)
            _abort(context, error.code, error.message)
        try:
            return answer()
        except Ga4Error as error:
            _abort(context, error.code, error.message)
        except Exception:
            log.exception("sandbox ga4 failed on %s", method)
            _abort(context, grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)


def _abort(context: Any, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("grpc ServicerContext.abort always raises")


def build_ga4_grpc_server(sandbox: Sandbox, cert: Path, key: Path, host: str = "127.0.0.1",
                          port: int = 0, *, ga4: Ga4Property | None = None,
                          max_workers: int = 8) -> tuple[grpc.Server, int]:
    """Start the BetaAnalyticsData gRPC service over TLS; (server, bound port).

    Pass the same ``ga4`` to :class:`Ga4Rest` to share quota and cache across transports.
    Stop it with ``server.stop(grace=None)``."""
    service = _GrpcService(sandbox, ga4 or Ga4Property(sandbox.world))
    handlers = {
        "RunReport": grpc.unary_unary_rpc_method_handler(
            service.run_report, request_deserializer=RunReportRequest.deserialize,
            response_serializer=RunReportResponse.serialize),
        "BatchRunReports": grpc.unary_unary_rpc_method_handler(
            service.batch_run_reports, request_deserializer=BatchRunReportsRequest.deserialize,
            response_serializer=BatchRunReportsResponse.serialize),
    }
    server = grpc.server(
        ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="sandbox-ga4"),
        options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    bound = server.add_secure_port(f"{host}:{port}", credentials)
    server.start()
    return server, bound


# -- REST front end -----------------------------------------------------------------------------

_ROUTE = re.compile(r"/v1beta/properties/(?P<property>[^/:]+)(?::(?P<method>\w+)|/metadata)")
_UNSIMULATED_METHODS = frozenset({"runPivotReport", "batchRunPivotReports",
                                  "runRealtimeReport", "checkCompatibility"})
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.INTERNAL: 500, grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
}
_STATUS_BY_HTTP = {status: code.name for code, status in _HTTP_STATUS.items()}


class Ga4Rest:
    """``POST /v1beta/properties/{id}:runReport`` (and ``:batchRunReports``) for serve_rest."""

    name = "ga4"

    def __init__(self, sandbox: Sandbox, ga4: Ga4Property | None = None) -> None:
        self.ga4 = ga4 or Ga4Property(sandbox.world)

    def route(self, request: Request) -> tuple[str, Handler]:
        match = _ROUTE.fullmatch(unquote(request.path))
        method = match["method"] if match else None
        if match and request.method == "POST" and method in ("runReport", "batchRunReports"):
            property_id = match["property"]
            if method == "runReport":
                return "runReport", lambda r: self._run_report(property_id, r)
            return "batchRunReports", lambda r: self._batch_run_reports(property_id, r)
        if match and (method is None or method in _UNSIMULATED_METHODS):
            raise ApiError(_rest_error(_unsimulated(f"{request.method} {request.path}")))
        raise ApiError(_rest_error(Ga4Error(
            grpc.StatusCode.NOT_FOUND,
            f"The requested URL {request.path} was not found on this server.")))

    def fault_response(self, fault: Fault) -> Response:
        return _rest_error(_fault_error(fault))

    def error_response(self, status: int, message: str) -> Response:
        body = {"error": {"code": status, "message": INTERNAL_MESSAGE if status == 500
                          else message, "status": _STATUS_BY_HTTP.get(status, "UNKNOWN")}}
        return Response(status, body)

    def _run_report(self, property_id: str, request: Request) -> Response:
        message = _parse_body(request.body, RunReportRequest)
        return _json_response(request, lambda: self.ga4.run_report(property_id, message))

    def _batch_run_reports(self, property_id: str, request: Request) -> Response:
        message = _parse_body(request.body, BatchRunReportsRequest)
        return _json_response(request,
                              lambda: self.ga4.batch_run_reports(property_id, message))


def serve_ga4_rest(sandbox: Sandbox, host: str = "127.0.0.1", port: int = 0, *,
                   ga4: Ga4Property | None = None) -> ThreadingHTTPServer:
    """Start the REST front end; its base URL is ``http://{host}:{server.server_port}``."""
    return serve_rest(Ga4Rest(sandbox, ga4), sandbox, host, port)


def _parse_body(body: bytes, message_type: Any) -> Any:
    """Proto3 JSON as any client sends it: camelCase or snake_case, enums by name or number."""
    message = message_type.pb()()
    try:
        json_format.Parse(body or b"{}", message)
    except json_format.ParseError as error:
        raise ApiError(_rest_error(_invalid(_json_error(error)))) from error
    return message


def _json_response(request: Request, answer: Callable[[], Any]) -> Response:
    try:
        response = answer()
    except Ga4Error as error:
        raise ApiError(_rest_error(error)) from error
    int_enums = "enum-encoding=int" in (request.arg("$alt") or "")
    text = json_format.MessageToJson(response, indent=None, use_integers_for_enums=int_enums)
    return Response(200, text.encode(), content_type="application/json; charset=UTF-8")


def _rest_error(error: Ga4Error) -> Response:
    status = _HTTP_STATUS.get(error.code, 500)
    return Response(status, {"error": {"code": status, "message": error.message,
                                       "status": error.code.name}})
