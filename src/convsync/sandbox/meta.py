"""The Meta Graph API (Marketing API) simulator: ad account, campaigns and Ads Insights.

Serves ``/vNN.0/...`` (any version, or none) over plain HTTP so that ``facebook-business``
talks to it once ``FacebookSession.GRAPH`` points here. Numbers come from
``World.meta_insights``; the wire shapes, parameter rules and error objects follow the Graph
API: numbers as strings, ``actions`` / ``action_values`` lists with one key per requested
attribution window, cursor paging with ``after``, ``{"error": {...}}`` objects with the real
codes, and the ``x-app-usage`` / ``x-business-use-case-usage`` headers on every answer.

Choices where the real API is silent or the world has less detail:

- ``value`` of an action is the count under the account's attribution setting, 7-day click
  plus 1-day view (``META_DEFAULT_WINDOWS``); every ad set uses the account's setting, so
  ``use_account_attribution_setting`` and ``use_unified_attribution_setting`` change nothing.
  A requested window whose count is zero is left out of the entry; an action that is zero in
  ``value`` and in every requested window is left out of the list.
- ``link_click`` (= clicks) and ``landing_page_view`` (people whose product view fired within a
  day of their click) are not conversions: they carry their count in every requested click
  window and none in view windows.
- ``action_report_time=mixed`` files on-Meta activity (clicks, impressions) by impression time
  and pixel actions by conversion time, which in this world equals ``conversion``.
- Parameters that would change the answer in ways the world cannot model (breakdowns, ad set
  or ad level, sort, summaries, ``before`` paging, other attribution models) are refused with a
  Graph error that names them, never silently ignored. Valid insights fields the world does
  not model (reach, frequency, video metrics, ...) are left out of the rows.
- An async report (``POST .../insights``) completes at once; its pages are computed from the
  world when they are read, like the synchronous edge.
- Pages hold ``limit`` rows and are generated on demand: the ``after`` cursor encodes (row
  date, campaign index), so a year of 200 campaigns never sits in memory.
- ``max_page_bytes`` (off by default) refuses an insights page whose JSON would be larger, as
  Graph refuses pages too big to compute: HTTP 500, code 1, "Please reduce the amount of data
  you're asking for, then retry your request". Graph's real threshold is undocumented.
- The usage headers count calls in a rolling hour against ``calls_per_hour``; the sandbox
  throttles only when a fault is injected (``rate_limit``: the ads-insights / ads-management
  throttle, code 80000 / 80004, with ``estimated_time_to_regain_access`` in whole minutes;
  ``exhausted``: code 4, the application limit; ``server_error``: HTTP 500, code 2).
"""

from __future__ import annotations

import base64
import binascii
import calendar
import datetime as dt
import itertools
import json
import math
import re
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from http.server import ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

from facebook_business.adobjects.adaccount import AdAccount
from facebook_business.adobjects.adreportrun import AdReportRun
from facebook_business.adobjects.adsinsights import AdsInsights
from facebook_business.adobjects.adspixel import AdsPixel
from facebook_business.adobjects.campaign import Campaign as CampaignObject
from facebook_business.adobjects.user import User

from convsync.model import META_DEFAULT_WINDOWS, META_REMOVED_WINDOWS, META_WINDOWS
from convsync.sandbox.control import Fault, Sandbox
from convsync.sandbox.http import ApiError, Handler, Request, Response, serve_rest
from convsync.sandbox.world import (
    META_ACTION_TYPES,
    VIEW,
    Campaign,
    MetaInsight,
    World,
    epoch_day,
    from_epoch_day,
)

if TYPE_CHECKING:
    from convsync.sandbox.meta_capi import ConversionsApi

JSON_TYPE = "application/json; charset=UTF-8"
VERSION = re.compile(r"v\d+\.\d+")
RATE_LIMIT_DOCS = "https://developers.facebook.com/docs/graph-api/overview/rate-limiting"
GRAPH_DOCS = "https://developers.facebook.com/docs/graph-api"
PACIFIC = ZoneInfo("America/Los_Angeles")  # Graph words token expiry in Menlo Park time
ACCOUNT_NAME = "convsync sandbox"
PIXEL_NAME = "convsync sandbox pixel"
SYSTEM_USER_ID = "61550000000001"
SYSTEM_USER_NAME = "convsync sandbox system user"
"""Who every sandbox token belongs to (``GET /me``): a Business Manager system user."""
CAMPAIGN_STATUS = "ACTIVE"
CAMPAIGN_OBJECTIVE = "OUTCOME_SALES"
DEFAULT_LIMIT = 25
RETENTION_MONTHS = 37
ACCOUNT_KEY = -1
"""Sort key of the one row per time bucket at ``level=account``."""
NON_CONVERSIONS = ("link_click", "landing_page_view")
ALLOWED_WINDOWS = (*META_WINDOWS, "default")
DATE_PRESETS = tuple(v for k, v in vars(AdsInsights.DatePreset).items() if not k.startswith("_"))
REPORT_TIMES = {"impression": "impression", "conversion": "conversion", "mixed": "conversion"}
FILTER_OPERATORS = ("IN", "NOT_IN", "EQUAL", "NOT_EQUAL")
UNSIMULATED_PARAMS = ("breakdowns", "time_ranges", "sort", "summary", "summary_action_breakdowns",
                      "before", "export_format", "export_columns")


def _fields_of(cls: Any) -> frozenset[str]:
    return frozenset(v for k, v in vars(cls.Field).items() if not k.startswith("_"))


INSIGHTS_FIELDS = _fields_of(AdsInsights)
ACCOUNT_FIELDS = _fields_of(AdAccount)
CAMPAIGN_FIELDS = _fields_of(CampaignObject)
PIXEL_FIELDS = _fields_of(AdsPixel)
USER_FIELDS = _fields_of(User)
REPORT_FIELDS = _fields_of(AdReportRun)


# -- errors -------------------------------------------------------------------------------
def graph_error(status: int, code: int, message: str, *, kind: str = "OAuthException",
                subcode: int | None = None, transient: bool | None = None,
                extra: dict[str, str] | None = None,
                headers: dict[str, str] | None = None) -> ApiError:
    """An ``{"error": {...}}`` answer the SDK turns into ``FacebookRequestError``."""
    body: dict[str, Any] = {"message": message, "type": kind, "code": code}
    if subcode is not None:
        body["error_subcode"] = subcode
    if transient is not None:
        body["is_transient"] = transient
    body.update(extra or {})
    body["fbtrace_id"] = secrets.token_urlsafe(17)
    return ApiError(Response(status, {"error": body}, dict(headers or {}), JSON_TYPE))


def invalid_param(message: str) -> ApiError:
    return graph_error(400, 100, f"(#100) {message}")


def not_simulated(what: str) -> ApiError:
    return invalid_param(f"{what} is not simulated by the convsync sandbox; see the sandbox "
                         "fidelity table in the README")


def unsupported_request(method: str, node: str) -> ApiError:
    return graph_error(
        400, 100,
        f"Unsupported {method.lower()} request. Object with ID '{node}' does not exist, cannot "
        "be loaded due to missing permissions, or does not support this operation. Please read "
        f"the Graph API documentation at {GRAPH_DOCS}",
        kind="GraphMethodException", subcode=33)


# -- parameters ---------------------------------------------------------------------------
Getter = Callable[[str], "str | None"]


def list_param(name: str, raw: str | None) -> list[str]:
    """A Graph array parameter: a JSON array (what the SDK sends) or comma-separated values."""
    if raw is None or not raw.strip():
        return []
    text = raw.strip()
    if not text.startswith("["):
        return [part.strip() for part in text.split(",") if part.strip()]
    try:
        values = json.loads(text)
    except ValueError:
        raise invalid_param(f"param {name} must be an array.") from None
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise invalid_param(f"param {name} must be an array of strings.")
    return values


def bool_param(name: str, raw: str | None) -> bool:
    if raw is None or raw.lower() in ("", "false", "0"):
        return False
    if raw.lower() in ("true", "1"):
        return True
    raise invalid_param(f"param {name} must be a boolean.")


def limit_param(raw: str | None) -> int:
    if raw is None or raw == "":
        return DEFAULT_LIMIT
    if not raw.isdigit() or int(raw) < 1:
        raise invalid_param("param limit must be a positive integer.")
    return int(raw)


def months_back(day: dt.date, months: int) -> dt.date:
    index = day.year * 12 + day.month - 1 - months
    year, month = divmod(index, 12)
    return dt.date(year, month + 1, min(day.day, calendar.monthrange(year, month + 1)[1]))


def preset_range(preset: str, today: dt.date) -> tuple[dt.date, dt.date]:
    """The dates a ``date_preset`` names, ``today`` being the ad account's local date."""
    one = dt.timedelta(days=1)
    if match := re.fullmatch(r"last_(\d+)d", preset):
        return today - int(match[1]) * one, today - one
    monday = today - today.weekday() * one
    sunday = today - ((today.weekday() + 1) % 7) * one
    month = today.replace(day=1)
    quarter = today.replace(month=(today.month - 1) // 3 * 3 + 1, day=1)
    year = today.replace(month=1, day=1)
    ranges = {
        "today": (today, today),
        "yesterday": (today - one, today - one),
        "this_week_mon_today": (monday, today),
        "this_week_sun_today": (sunday, today),
        "last_week_mon_sun": (monday - 7 * one, monday - one),
        "last_week_sun_sat": (sunday - 7 * one, sunday - one),
        "this_month": (month, today),
        "last_month": (months_back(month, 1), month - one),
        "this_quarter": (quarter, today),
        "last_quarter": (months_back(quarter, 3), quarter - one),
        "this_year": (year, today),
        "last_year": (year.replace(year=year.year - 1), year - one),
        "maximum": (months_back(today, RETENTION_MONTHS), today),
        "data_maximum": (months_back(today, RETENTION_MONTHS), today),
    }
    return ranges[preset]


def date_range(get: Getter, today: dt.date) -> tuple[dt.date, dt.date]:
    """``time_range`` wins over ``date_preset``; neither means ``last_30d``, as on Graph."""
    raw_range = get("time_range")
    if raw_range:
        since, until = parse_time_range(raw_range)
    else:
        preset = get("date_preset") or "last_30d"
        if preset not in DATE_PRESETS:
            raise invalid_param("date_preset must be one of the following values: "
                                + ", ".join(DATE_PRESETS))
        since, until = preset_range(preset, today)
    if since < months_back(today, RETENTION_MONTHS):
        raise graph_error(400, 3018, "(#3018) The start date of the time range cannot be beyond "
                                     f"{RETENTION_MONTHS} months from the current date")
    return since, until


def parse_time_range(raw: str) -> tuple[dt.date, dt.date]:
    try:
        value = json.loads(raw)
        since = dt.date.fromisoformat(value["since"])
        until = dt.date.fromisoformat(value["until"])
    except (ValueError, TypeError, KeyError):
        raise invalid_param('param time_range must be a JSON object like '
                            '{"since":"YYYY-MM-DD","until":"YYYY-MM-DD"}.') from None
    if since > until:
        raise invalid_param("time_range's since must be on or before its until.")
    return since, until


def time_increment(raw: str | None) -> int | str:
    if raw is None or raw in ("", "all_days"):
        return "all_days"
    if raw == "monthly":
        return raw
    if raw.isdigit() and 1 <= int(raw) <= 90:
        return int(raw)
    raise invalid_param("param time_increment must be an integer between 1 and 90, "
                        "'monthly' or 'all_days'.")


def attribution_windows(raw: str | None) -> tuple[str, ...]:
    """Requested windows; ``default`` names the ``value`` key, which every entry has anyway."""
    windows = list_param("action_attribution_windows", raw)
    for i, window in enumerate(windows):
        if window in ALLOWED_WINDOWS:
            continue
        allowed = (f"action_attribution_windows[{i}] must be one of the following values: "
                   f"{', '.join(ALLOWED_WINDOWS)}.")
        if window in META_REMOVED_WINDOWS:
            raise invalid_param(
                f"{allowed} The {window} attribution window is no longer supported: the 7d_view "
                "and 28d_view windows are not returned since January 12, 2026.")
        if window in vars(AdsInsights.ActionAttributionWindows).values():
            raise not_simulated(f"action_attribution_windows value {window}")
        raise invalid_param(allowed)
    return tuple(dict.fromkeys(w for w in windows if w != "default"))


def report_time(raw: str | None) -> str:
    value = raw or "impression"
    if value == "lifetime":
        raise not_simulated("action_report_time=lifetime")
    if value not in REPORT_TIMES:
        raise invalid_param("action_report_time must be one of the following values: "
                            "impression, conversion, mixed, lifetime")
    return REPORT_TIMES[value]


def level_param(raw: str | None, default: str) -> str:
    value = raw or default
    if value in ("adset", "ad"):
        raise not_simulated(f"level={value} (the world has no ad sets or ads)")
    if value not in ("campaign", "account"):
        raise invalid_param("level must be one of the following values: ad, adset, campaign, "
                            "account")
    return value


def insight_fields(raw: str | None) -> tuple[str, ...]:
    fields = list_param("fields", raw) or ["impressions", "spend"]
    for name in fields:
        if name not in INSIGHTS_FIELDS:
            raise invalid_param(f"{name} is not valid for fields param. please check "
                                "https://developers.facebook.com/docs/marketing-api/reference/"
                                "ads-insights/ for all valid values")
    return tuple(dict.fromkeys(fields))


def campaign_filter(raw: str | None) -> tuple[frozenset[str] | None, frozenset[str]]:
    """``filtering`` on ``campaign.id``: (ids to keep or None for all, ids to drop)."""
    if not raw:
        return None, frozenset()
    try:
        rules = json.loads(raw)
        parsed = [(r["field"], r["operator"], r["value"]) for r in rules]
    except (ValueError, TypeError, KeyError):
        raise invalid_param("param filtering must be an array of objects with field, operator "
                            "and value.") from None
    keep: frozenset[str] | None = None
    drop: frozenset[str] = frozenset()
    for name, operator, value in parsed:
        if name != "campaign.id" or operator not in FILTER_OPERATORS:
            raise not_simulated(f"filtering on {name} {operator}")
        ids = frozenset(str(v) for v in (value if isinstance(value, list) else [value]))
        if operator in ("IN", "EQUAL"):
            keep = ids if keep is None else keep & ids
        else:
            drop |= ids
    return keep, drop


def refuse_unsimulated(get: Getter) -> None:
    for name in UNSIMULATED_PARAMS:
        if get(name) not in (None, "", "[]"):
            raise not_simulated(f"param {name}")
    if bool_param("default_summary", get("default_summary")):
        raise not_simulated("param default_summary")
    breakdowns = list_param("action_breakdowns", get("action_breakdowns"))
    if any(b != "action_type" for b in breakdowns):
        raise not_simulated("action_breakdowns other than action_type")
    bool_param("use_account_attribution_setting", get("use_account_attribution_setting"))
    bool_param("use_unified_attribution_setting", get("use_unified_attribution_setting"))


@dataclass(frozen=True)
class InsightsQuery:
    """One Ads Insights request, validated: what to compute, independent of paging."""

    level: str
    since: dt.date
    until: dt.date
    increment: int | str  # days per row (1..90), "monthly" or "all_days"
    fields: tuple[str, ...]
    windows: tuple[str, ...]
    report_time: str  # the world's: impression | conversion
    keep: frozenset[str] | None = None
    drop: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, get: Getter, today: dt.date, default_level: str) -> InsightsQuery:
        refuse_unsimulated(get)
        since, until = date_range(get, today)
        keep, drop = campaign_filter(get("filtering"))
        return cls(level_param(get("level"), default_level), since, until,
                   time_increment(get("time_increment")), insight_fields(get("fields")),
                   attribution_windows(get("action_attribution_windows")),
                   report_time(get("action_report_time")), keep, drop)

    def only_campaign(self, campaign_id: str) -> InsightsQuery:
        keep = frozenset({campaign_id}) if self.keep is None else self.keep & {campaign_id}
        return replace(self, keep=keep)

    def keeps(self, campaign: Campaign) -> bool:
        return ((self.keep is None or campaign.id in self.keep)
                and campaign.id not in self.drop)

    def bucket(self, day: dt.date) -> tuple[dt.date, dt.date]:
        """(date_start, date_stop) of the row ``day`` is reported in."""
        if self.increment == "all_days":
            return self.since, self.until
        if self.increment == "monthly":
            last = calendar.monthrange(day.year, day.month)[1]
            return max(day.replace(day=1), self.since), min(day.replace(day=last), self.until)
        size = int(self.increment)
        start = self.since + dt.timedelta(days=(day - self.since).days // size * size)
        return start, min(start + dt.timedelta(days=size - 1), self.until)


# -- insights rows ------------------------------------------------------------------------
class Position(NamedTuple):
    """Where a row sits in the answer: (its date_start as an epoch day, campaign index)."""

    day: int
    key: int

    def encode(self) -> str:
        return base64.urlsafe_b64encode(f"{self.day}:{self.key}".encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, cursor: str) -> Position:
        try:
            text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
            day, key = text.split(":")
            return cls(int(day), int(key))
        except (ValueError, binascii.Error):
            raise invalid_param(f"The after cursor {cursor!r} is not valid.") from None


@dataclass
class Cell:
    """One insights row being summed: a time bucket and a campaign (None: the account)."""

    start: dt.date
    stop: dt.date
    campaign: Campaign | None
    clicks: int = 0
    impressions: int = 0
    spend: float = 0.0
    actions: dict[int, dict[str, int]] = field(default_factory=dict)
    values: dict[int, dict[str, float]] = field(default_factory=dict)

    def add(self, insight: MetaInsight) -> None:
        self.clicks += insight.clicks
        self.impressions += insight.impressions
        self.spend += insight.spend
        for step, counts in insight.actions.items():
            into = self.actions.setdefault(step, {})
            for window, n in counts.items():
                into[window] = into.get(window, 0) + n
        for step, amounts in insight.values.items():
            into_values = self.values.setdefault(step, {})
            for window, amount in amounts.items():
                into_values[window] = into_values.get(window, 0.0) + amount


def insight_cells(world: World, query: InsightsQuery,
                  after: Position | None = None) -> Iterator[tuple[Position, Cell]]:
    """Rows in answer order, generated lazily from the bucket holding ``after`` onwards.

    The world streams in date order and buckets are contiguous, so only the current bucket is
    held in memory; a later page restarts from its cursor instead of from ``since``."""
    first = query.since if after is None else from_epoch_day(after.day)
    current: tuple[dt.date, dt.date] | None = None
    pending: dict[int, Cell] = {}
    for insight in world.meta_insights(first, query.until, report_time=query.report_time):
        if not query.keeps(insight.campaign):
            continue
        bucket = query.bucket(insight.date)
        if bucket != current:
            yield from _finished(pending, after)
            pending, current = {}, bucket
        by_campaign = query.level == "campaign"
        key = insight.campaign.index if by_campaign else ACCOUNT_KEY
        if key not in pending:
            pending[key] = Cell(*bucket, insight.campaign if by_campaign else None)
        pending[key].add(insight)
    yield from _finished(pending, after)


def _finished(pending: dict[int, Cell],
              after: Position | None) -> Iterator[tuple[Position, Cell]]:
    for key in sorted(pending):
        position = Position(epoch_day(pending[key].start), key)
        if after is None or position > after:
            yield position, pending[key]


def decimal(value: float, places: int = 2) -> str:
    """Graph's numeric strings: no exponent, no trailing zeros ("12.5", "3", "0")."""
    text = f"{value:.{places}f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def action_stats(cell: Cell, windows: tuple[str, ...], money: bool) -> list[dict[str, str]]:
    """The ``actions`` (or ``action_values``) list of one row."""
    stats = [] if money else _non_conversion_stats(cell, windows)
    source: dict[int, dict[str, Any]] = cell.values if money else cell.actions
    for step, types in META_ACTION_TYPES.items():
        per_window = source.get(step, {})
        value = sum(per_window.get(w, 0) for w in META_DEFAULT_WINDOWS)
        extra = {w: per_window[w] for w in windows if per_window.get(w)}
        if not value and not extra:
            continue
        entry = {"value": _number(value, money), **{w: _number(n, money) for w, n in extra.items()}}
        stats.extend({"action_type": action_type, **entry} for action_type in types)
    return stats


def _non_conversion_stats(cell: Cell, windows: tuple[str, ...]) -> list[dict[str, str]]:
    counts = {"link_click": cell.clicks,
              "landing_page_view": cell.actions.get(VIEW, {}).get("1d_click", 0)}
    click_windows = [w for w in windows if w.endswith("_click")]
    return [{"action_type": name, "value": str(n), **dict.fromkeys(click_windows, str(n))}
            for name, n in counts.items() if n]


def _number(amount: float, money: bool) -> str:
    return decimal(amount) if money else str(int(amount))


# -- usage headers --------------------------------------------------------------------------
class Usage:
    """A rolling-hour call count behind the rate-limit headers Graph sends with every answer.

    Percentages rise with each call against ``calls_per_hour`` and stop at 99: the sandbox
    throttles only when a fault is injected, and then reports 100 and the wait."""

    def __init__(self, calls_per_hour: int) -> None:
        self.calls_per_hour = calls_per_hour
        self._calls: deque[float] = deque()
        self._lock = threading.Lock()

    def record(self) -> None:
        now = time.monotonic()
        with self._lock:
            self._calls.append(now)
            while self._calls and self._calls[0] < now - 3600:
                self._calls.popleft()

    def percent(self) -> int:
        with self._lock:
            return min(99, math.ceil(len(self._calls) * 100 / self.calls_per_hour))

    def headers(self, account: str, use_case: str, *, throttled: bool = False,
                app_exhausted: bool = False, regain_minutes: int = 0) -> dict[str, str]:
        pct = self.percent()
        buc = 100 if throttled else pct
        app = 100 if app_exhausted else pct
        business = {account: [{
            "type": use_case, "call_count": buc, "total_cputime": buc * 3 // 4,
            "total_time": buc * 4 // 5, "estimated_time_to_regain_access": regain_minutes,
            "ads_api_access_tier": "standard_access"}]}
        headers = {
            "x-app-usage": json.dumps({"call_count": app, "total_cputime": app * 3 // 4,
                                       "total_time": app * 4 // 5}),
            "x-business-use-case-usage": json.dumps(business),
        }
        if use_case == "ads_insights":
            headers["x-fb-ads-insights-throttle"] = json.dumps(
                {"app_id_util_pct": app, "acc_id_util_pct": buc,
                 "ads_api_access_tier": "standard_access"})
        return headers


# -- the platform -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ReportRun:
    id: str
    account_id: str
    query: InsightsQuery
    created: int  # epoch seconds of the world's clock


NodeHandler = Callable[[Request, str], Response]
"""Answers a request about one Graph node (the id in its path)."""


@dataclass(frozen=True)
class Route:
    label: str
    node: str
    handler: NodeHandler
    use_case: str = "ads_management"
    on_error: Callable[[ApiError], None] | None = None
    """Told of every error this route answers (the Conversions API counts its refusals)."""


class MetaGraph:
    """The Graph API of one ad account (``world.accounts.meta_ad_account_id``) and its pixel."""

    name = "meta"

    def __init__(self, sandbox: Sandbox, *, calls_per_hour: int = 2_000,
                 max_reports: int = 1_024, max_page_bytes: int | None = None,
                 capi: ConversionsApi | None = None) -> None:
        from convsync.sandbox.meta_capi import ConversionsApi  # it builds on this module

        self.sandbox = sandbox
        self.capi = capi or ConversionsApi(sandbox)
        """The Conversions API (``POST /{pixel_id}/events``) and what it counted."""
        self.world = sandbox.world
        self.usage = Usage(calls_per_hour)
        self.max_reports = max_reports
        self.max_page_bytes = max_page_bytes
        self._reports: OrderedDict[str, ReportRun] = OrderedDict()
        self._report_ids = itertools.count(1)
        self._lock = threading.Lock()
        self._current = threading.local()

    @property
    def account_id(self) -> str:
        """The ad account id without ``act_`` (how Graph writes it in fields and headers)."""
        return self.world.accounts.meta_ad_account_id.removeprefix("act_")

    # -- RestPlatform --------------------------------------------------------------------
    def route(self, request: Request) -> tuple[str, Handler]:
        self.usage.record()
        route = self._route(request)
        self._current.use_case = route.use_case
        self._current.route = route

        def answer(req: Request) -> Response:
            try:
                self._authenticate(req)
                response = route.handler(req, route.node)
            except ApiError as error:
                response = error.response
                if route.on_error is not None:
                    route.on_error(error)
            response.headers.update(self.usage.headers(self.account_id, route.use_case))
            return response

        return route.label, answer

    def fault_response(self, fault: Fault) -> Response:
        use_case = getattr(self._current, "use_case", "ads_management")
        route: Route | None = getattr(self._current, "route", None)
        minutes = math.ceil(fault.retry_after / 60) if fault.retry_after > 0 else 0
        if fault.kind == "rate_limit":
            error = (self.capi.throttle_error()
                     if route is not None and route.label == self.capi.label
                     else self._throttle_error(use_case))
            headers = self.usage.headers(self.account_id, use_case, throttled=True,
                                         regain_minutes=minutes)
        elif fault.kind == "exhausted":
            error = graph_error(400, 4, "(#4) Application request limit reached",
                                transient=True)
            headers = self.usage.headers(self.account_id, use_case, app_exhausted=True)
        else:
            error = graph_error(500, 2, "An unexpected error has occurred. Please retry your "
                                        "request later.", transient=True)
            headers = self.usage.headers(self.account_id, use_case)
        error.response.headers.update(headers)
        if route is not None and route.on_error is not None:
            route.on_error(error)
        return error.response

    def error_response(self, status: int, message: str) -> Response:
        response = graph_error(status, 1, "An unknown error occurred", subcode=99).response
        response.headers.update(self.usage.headers(self.account_id, "ads_management"))
        return response

    @staticmethod
    def _throttle_error(use_case: str) -> ApiError:
        if use_case == "ads_insights":
            code, text = 80000, "There have been too many calls from this ad-account."
        else:
            code, text = 80004, "There have been too many calls to this ad-account."
        return graph_error(
            400, code, f"(#{code}) {text} Wait a bit and try again. For more info, please refer "
                       f"to {RATE_LIMIT_DOCS}.",
            subcode=2446079, transient=True,
            extra={"error_user_title": "Ad Account Has Too Many API Calls",
                   "error_user_msg": "There have been too many calls from this ad-account. "
                                     "Please wait a bit and try again."})

    # -- routing and auth ----------------------------------------------------------------
    def _route(self, request: Request) -> Route:
        parts = [p for p in request.path.split("/") if p]
        if parts and VERSION.fullmatch(parts[0]):
            parts = parts[1:]
        node = parts[0] if parts else ""
        edge = "/".join(parts[1:])
        if request.method == "POST" and edge == "events":  # any node: the edge checks it
            return Route(self.capi.label, node, self.capi.events, on_error=self.capi.rejected)
        kind = self._node_kind(node)
        routes: dict[tuple[str, str, str], Route] = {
            ("GET", "account", ""): Route("account", node, self._account),
            ("GET", "account", "insights"): Route("insights", node, self._account_insights,
                                                  "ads_insights"),
            ("POST", "account", "insights"): Route("insights.async", node, self._create_report,
                                                   "ads_insights"),
            ("GET", "account", "campaigns"): Route("campaigns", node, self._campaigns),
            ("GET", "campaign", ""): Route("campaign", node, self._campaign),
            ("GET", "campaign", "insights"): Route("insights", node, self._campaign_insights,
                                                   "ads_insights"),
            ("GET", "report", ""): Route("report_run", node, self._report),
            ("GET", "report", "insights"): Route("report_run.insights", node,
                                                 self._report_insights, "ads_insights"),
            ("GET", "pixel", ""): Route("pixel", node, self._pixel),
            ("GET", "me", ""): Route("me", node, self._me),
        }
        found = routes.get((request.method, kind, edge))
        if found is not None:
            return found
        if kind != "unknown":
            return Route("unsupported", node, self._unsimulated(f"{request.method} /{edge}"))
        return Route("unsupported", node, self._unsupported(request.method))

    def _node_kind(self, node: str) -> str:
        accounts = self.world.accounts
        if node.startswith("act_"):
            return "account" if node == accounts.meta_ad_account_id else "unknown"
        if node == accounts.meta_pixel_id:
            return "pixel"
        if node == "me":  # the token's own user (a system user's, for a server-side token)
            return "me"
        if self._meta_campaign(node) is not None:
            return "campaign"
        with self._lock:
            return "report" if node in self._reports else "unknown"

    @staticmethod
    def _unsupported(method: str) -> NodeHandler:
        def handler(request: Request, node: str) -> Response:
            raise unsupported_request(method, node)
        return handler

    @staticmethod
    def _unsimulated(what: str) -> NodeHandler:
        def handler(request: Request, node: str) -> Response:
            raise not_simulated(what)
        return handler

    def _authenticate(self, request: Request) -> None:
        token = (request.arg("access_token") or _bearer(request.headers.get("Authorization"))
                 or self.capi.body_token(request))
        if not token:
            message = "An access token is required to request this resource."
            raise graph_error(400, 104, message, headers=_www_authenticate("invalid_request",
                                                                           message))
        if token == "expired":
            now = self.world.as_of.astimezone(PACIFIC)
            stamp = "%A, %d-%b-%y %H:%M:%S %Z"
            message = (f"Error validating access token: Session has expired on "
                       f"{(now - dt.timedelta(days=1)).strftime(stamp)}. The current time is "
                       f"{now.strftime(stamp)}.")
            raise graph_error(400, 190, message, subcode=463,
                              headers=_www_authenticate("invalid_token", message))

    # -- nodes ---------------------------------------------------------------------------
    def _account(self, request: Request, node: str) -> Response:
        accounts = self.world.accounts
        offset = self.world.as_of.astimezone(ZoneInfo(accounts.meta_tz)).utcoffset()
        account = {
            "id": accounts.meta_ad_account_id, "account_id": self.account_id,
            "name": ACCOUNT_NAME, "currency": accounts.currency, "account_status": 1,
            "timezone_name": accounts.meta_tz,
            "timezone_offset_hours_utc": offset.total_seconds() / 3600 if offset else 0.0,
            "attribution_spec": _attribution_spec(), "is_attribution_spec_system_default": True,
        }
        return _node_response(account, request, ACCOUNT_FIELDS, "AdAccount")

    def _campaign(self, request: Request, node: str) -> Response:
        campaign = self._meta_campaign(node)
        if campaign is None:
            raise unsupported_request("GET", node)
        return _node_response(self._campaign_node(campaign), request, CAMPAIGN_FIELDS,
                              "Campaign")

    def _pixel(self, request: Request, node: str) -> Response:
        pixel = {"id": self.world.accounts.meta_pixel_id, "name": PIXEL_NAME}
        return _node_response(pixel, request, PIXEL_FIELDS, "AdsPixel")

    def _me(self, request: Request, node: str) -> Response:
        """``GET /me``: the user the token belongs to, as Graph answers any valid token."""
        user = {"id": SYSTEM_USER_ID, "name": SYSTEM_USER_NAME}
        return _node_response(user, request, USER_FIELDS, "User")

    def _report(self, request: Request, node: str) -> Response:
        run = self._report_run(node)
        report = {
            "id": run.id, "account_id": run.account_id, "async_status": "Job Completed",
            "async_percent_completion": 100, "date_start": run.query.since.isoformat(),
            "date_stop": run.query.until.isoformat(), "time_ref": run.created,
            "time_completed": run.created, "is_running": False,
        }
        return _node_response(report, request, REPORT_FIELDS, "AdReportRun",
                              default=tuple(report))

    def _campaign_node(self, campaign: Campaign) -> dict[str, Any]:
        return {"id": campaign.id, "name": campaign.name, "status": CAMPAIGN_STATUS,
                "effective_status": CAMPAIGN_STATUS, "configured_status": CAMPAIGN_STATUS,
                "objective": CAMPAIGN_OBJECTIVE, "account_id": self.account_id}

    def _meta_campaign(self, campaign_id: str) -> Campaign | None:
        return next((c for c in self.world.campaigns_on("meta") if c.id == campaign_id), None)

    def _report_run(self, report_id: str) -> ReportRun:
        with self._lock:
            run = self._reports.get(report_id)
        if run is None:  # dropped between routing and answering
            raise unsupported_request("GET", report_id)
        return run

    # -- edges ---------------------------------------------------------------------------
    def _campaigns(self, request: Request, node: str) -> Response:
        fields = _node_fields(request, CAMPAIGN_FIELDS, "Campaign")
        statuses = list_param("effective_status", request.arg("effective_status"))
        campaigns = [c for c in self.world.campaigns_on("meta")
                     if not statuses or CAMPAIGN_STATUS in statuses]
        raw_after = request.arg("after")
        start = Position.decode(raw_after).key + 1 if raw_after else 0
        limit = limit_param(request.arg("limit"))
        page = campaigns[start:start + limit]
        rows = [_select(self._campaign_node(c), fields or ("id",)) for c in page]
        body = _paged(rows, [Position(0, start + i) for i in range(len(page))],
                      start + limit < len(campaigns), request)
        if bool_param("summary", request.arg("summary")):
            body["summary"] = {"total_count": len(campaigns)}
        return Response(200, body, content_type=JSON_TYPE)

    def _account_insights(self, request: Request, node: str) -> Response:
        query = InsightsQuery.parse(request.arg, self._today(), "account")
        return self._insights_page(query, request)

    def _campaign_insights(self, request: Request, node: str) -> Response:
        query = InsightsQuery.parse(request.arg, self._today(), "campaign")
        return self._insights_page(query.only_campaign(node), request)

    def _create_report(self, request: Request, node: str) -> Response:
        query = InsightsQuery.parse(request.arg, self._today(), "account")
        report_id = str(6_020_000_000_000_000 + next(self._report_ids))
        run = ReportRun(report_id, self.account_id, query, int(self.world.as_of_ts))
        with self._lock:
            self._reports[report_id] = run
            while len(self._reports) > self.max_reports:
                self._reports.popitem(last=False)
        return Response(200, {"report_run_id": report_id}, content_type=JSON_TYPE)

    def _report_insights(self, request: Request, node: str) -> Response:
        return self._insights_page(self._report_run(node).query, request)

    def _insights_page(self, query: InsightsQuery, request: Request) -> Response:
        raw_after = request.arg("after")
        after = Position.decode(raw_after) if raw_after else None
        limit = limit_param(request.arg("limit"))
        rows = list(itertools.islice(insight_cells(self.world, query, after), limit + 1))
        data = [self._insight_json(cell, query) for _, cell in rows[:limit]]
        body = _paged(data, [p for p, _ in rows[:limit]], len(rows) > limit, request)
        if self.max_page_bytes is not None and len(json.dumps(body)) > self.max_page_bytes:
            raise graph_error(500, 1, "Please reduce the amount of data you're asking for, then "
                                      "retry your request")
        return Response(200, body, content_type=JSON_TYPE)

    def _insight_json(self, cell: Cell, query: InsightsQuery) -> dict[str, Any]:
        """The requested fields the world models (others are left out), then the dates."""
        getters = self._insight_getters(cell, query)
        row: dict[str, Any] = {}
        for name in query.fields:
            value = getters[name]() if name in getters else None
            if value is not None:
                row[name] = value
        row["date_start"] = cell.start.isoformat()
        row["date_stop"] = cell.stop.isoformat()
        return row

    def _insight_getters(self, cell: Cell, query: InsightsQuery) -> dict[str, Callable[[], Any]]:
        campaign = cell.campaign
        spend = round(cell.spend, 2)
        return {
            "account_id": lambda: self.account_id,
            "account_name": lambda: ACCOUNT_NAME,
            "account_currency": lambda: self.world.accounts.currency,
            "campaign_id": lambda: campaign.id if campaign else None,
            "campaign_name": lambda: campaign.name if campaign else None,
            "objective": lambda: CAMPAIGN_OBJECTIVE if campaign else None,
            "impressions": lambda: str(cell.impressions),
            "clicks": lambda: str(cell.clicks),
            "inline_link_clicks": lambda: str(cell.clicks),
            "spend": lambda: decimal(spend),
            "ctr": lambda: _ratio(cell.clicks * 100, cell.impressions),
            "cpc": lambda: _ratio(spend, cell.clicks),
            "cpm": lambda: _ratio(spend * 1000, cell.impressions),
            "actions": lambda: action_stats(cell, query.windows, money=False) or None,
            "action_values": lambda: action_stats(cell, query.windows, money=True) or None,
        }

    def _today(self) -> dt.date:
        return self.world.as_of.astimezone(ZoneInfo(self.world.accounts.meta_tz)).date()


# -- helpers ------------------------------------------------------------------------------------
def _bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() in ("bearer", "oauth") else None


def _www_authenticate(kind: str, message: str) -> dict[str, str]:
    return {"WWW-Authenticate": f'OAuth "Facebook Platform" "{kind}" "{message}"'}


def _attribution_spec() -> list[dict[str, Any]]:
    kinds = {"click": "CLICK_THROUGH", "view": "VIEW_THROUGH", "ev": "ENGAGED_VIDEO_VIEW"}
    spec = []
    for window in META_DEFAULT_WINDOWS:
        days, kind = window.split("d_")
        spec.append({"event_type": kinds[kind], "window_days": int(days)})
    return spec


def _node_fields(request: Request, valid: frozenset[str], node_type: str) -> tuple[str, ...]:
    fields = list_param("fields", request.arg("fields"))
    for name in fields:
        if any(c in name for c in "{}.()"):
            raise not_simulated(f"field expansion ({name})")
        if name not in valid:
            raise invalid_param(f"Tried accessing nonexisting field ({name}) on node type "
                                f"({node_type})")
    return tuple(dict.fromkeys(fields))


def _select(node: dict[str, Any], fields: Iterable[str]) -> dict[str, Any]:
    """The requested fields the sandbox knows, plus ``id`` (Graph always returns it)."""
    return {"id": node["id"], **{f: node[f] for f in fields if f in node}}


def _node_response(node: dict[str, Any], request: Request, valid: frozenset[str],
                   node_type: str, default: tuple[str, ...] = ("id",)) -> Response:
    fields = _node_fields(request, valid, node_type) or default
    return Response(200, _select(node, fields), content_type=JSON_TYPE)


def _paged(data: list[dict[str, Any]], positions: list[Position], more: bool,
           request: Request) -> dict[str, Any]:
    """``{"data", "paging"}`` with cursors; ``next`` (which the SDK keys on) only if more."""
    body: dict[str, Any] = {"data": data}
    if not data:
        return body
    after = positions[-1].encode()
    paging: dict[str, Any] = {"cursors": {"before": positions[0].encode(), "after": after}}
    if more:
        paging["next"] = _next_url(request, after)
    body["paging"] = paging
    return body


def _next_url(request: Request, after: str) -> str:
    params = {k: v[-1] for k, v in {**request.form(), **request.query}.items() if k != "after"}
    params["after"] = after
    host = request.headers.get("Host", "127.0.0.1")
    return f"http://{host}{request.path}?{urlencode(params)}"


def _ratio(numerator: float, denominator: float) -> str | None:
    return decimal(numerator / denominator, 6) if denominator else None


def serve_meta(sandbox: Sandbox, host: str = "127.0.0.1", port: int = 0, *,
               calls_per_hour: int = 2_000,
               max_page_bytes: int | None = None) -> tuple[ThreadingHTTPServer, MetaGraph]:
    """Start the simulator; point ``FacebookSession.GRAPH`` at ``http://host:server_port``."""
    graph = MetaGraph(sandbox, calls_per_hour=calls_per_hour, max_page_bytes=max_page_bytes)
    return serve_rest(graph, sandbox, host, port), graph
