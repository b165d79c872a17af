"""Meta source: daily insights per campaign through the facebook-business SDK.

One stream per ad account: ``GET act_<id>/insights`` at campaign level, one row per day
(``time_increment=1``) over the whole date range, with ``actions`` and ``action_values`` in the
configured attribution windows and ``action_report_time``, paged by the SDK's Cursor at
``PAGE_SIZE`` rows a page. Each (day, campaign, action type, window) becomes one
``ConversionStat``; the ad account's time zone and currency come from the account itself.

Meta reports one pixel event under several action types (``purchase``, ``omni_purchase``,
``offsite_conversion.fb_pixel_purchase``, ``onsite_web_purchase``): views of the same events,
never to be added together. Only the mapped view is stored; an unmapped view of a mapped event
is dropped (``ActionPlan``). Unmapped events are kept under every name Meta gives them, so
``pull`` can list them for mapping, as ``discover`` does.

Quotas: every answer carries the rate budget used so far (``x-app-usage``,
``x-business-use-case-usage``, ``x-fb-ads-insights-throttle``, ``x-ad-account-usage``);
``PacedApi`` slows down in proportion once it passes ``Pacer.threshold`` percent, before Meta
throttles. Throttling and transient errors are retried by the pipeline through ``RETRY``,
honouring ``estimated_time_to_regain_access``.
"""

from __future__ import annotations

import datetime as dt
import functools
import gc
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from facebook_business.adobjects.adaccount import AdAccount
from facebook_business.adobjects.adsinsights import AdsInsights
from facebook_business.adobjects.objectparser import ObjectParser
from facebook_business.api import Cursor, FacebookAdsApi, FacebookResponse
from facebook_business.exceptions import FacebookRequestError
from facebook_business.session import FacebookSession
from requests import exceptions as http_errors

from convsync.errors import MissingSecret
from convsync.model import (
    Basis,
    ConversionMap,
    ConversionStat,
    Kind,
    Platform,
    PlatformConversion,
    copy_with,
)
from convsync.retry import RetryPolicy
from convsync.settings import ClientConfig, MetaSection, Secrets
from convsync.sources import Requests, Row, Stream

log = logging.getLogger(__name__)

PAGE_SIZE = 5000
"""Insights rows per page. Graph documents no maximum for ``limit`` on insights; it refuses a
page that holds too much data (code 1, "Please reduce the amount of data you're asking for"),
and the stream then asks for a quarter of the rows a page from the retry on (down to
``MIN_PAGE_SIZE``): four retries get from 5,000 to 25."""
MIN_PAGE_SIZE = 25
PAGE_SHRINK = 4
INSIGHTS_FIELDS = ["campaign_id", "campaign_name", "actions", "action_values"]
ACCOUNT_FIELDS = ["timezone_name", "currency"]


# -- connection and pacing ---------------------------------------------------------------------

PERCENT_KEYS = frozenset({"call_count", "total_cputime", "total_time", "acc_id_util_pct",
                          "app_id_util_pct"})
USAGE_HEADERS = ("x-app-usage", "x-business-use-case-usage", "x-fb-ads-insights-throttle",
                 "x-ad-account-usage")


def usage_percent(headers: Mapping[str, str]) -> float:
    """The highest share of any rate budget (app, ad account, business use case) that Meta's
    usage headers report as used, in percent."""
    highest = 0.0
    for name in USAGE_HEADERS:
        raw = headers.get(name)
        if not raw:
            continue
        try:
            highest = max(highest, _highest_percent(json.loads(raw)))
        except ValueError:
            log.debug("meta: unreadable %s header %r", name, raw)
    return highest


def _highest_percent(value: Any) -> float:
    """The largest percentage in a usage header's JSON (per ad account lists for BUC)."""
    if isinstance(value, list):
        return max((_highest_percent(v) for v in value), default=0.0)
    if not isinstance(value, dict):
        return 0.0
    found = [float(v) for k, v in value.items()
             if k in PERCENT_KEYS and isinstance(v, int | float)]
    nested = [_highest_percent(v) for v in value.values() if isinstance(v, dict | list)]
    return max(found + nested, default=0.0)


def regain_seconds(headers: Mapping[str, str]) -> float | None:
    """Seconds until a throttled ad account may call again (``estimated_time_to_regain_access``,
    in minutes, in ``x-business-use-case-usage``), or None when Meta did not say."""
    raw = headers.get("x-business-use-case-usage")
    try:
        usage = json.loads(raw) if raw else {}
    except ValueError:
        return None
    minutes = [float(entry.get("estimated_time_to_regain_access") or 0)
               for entries in usage.values() if isinstance(entries, list)
               for entry in entries if isinstance(entry, dict)]
    longest = max(minutes, default=0.0)
    return longest * 60 if longest > 0 else None


@dataclass
class Pacer:
    """Slows requests down before Meta throttles them.

    Meta throttles a budget at 100%. Past ``threshold`` percent the next request waits in
    proportion to the usage the last answer reported, up to ``max_pause`` seconds at 100%, less
    the time already gone since that answer (a retry's own wait counts)."""

    threshold: float = 75.0
    max_pause: float = 60.0
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    usage: float = 0.0
    seen_at: float = 0.0

    def record(self, headers: Mapping[str, str] | None) -> None:
        self.usage = usage_percent(headers or {})
        self.seen_at = self.clock()

    def pause(self) -> float:
        """Seconds the next request should wait."""
        over = self.usage - self.threshold
        if over <= 0:
            return 0.0
        wanted = self.max_pause * min(1.0, over / (100.0 - self.threshold))
        return max(0.0, wanted - (self.clock() - self.seen_at))

    def wait(self) -> None:
        pause = self.pause()
        if pause > 0:
            log.info("meta: %.0f%% of the rate budget used; waiting %.1f s", self.usage, pause)
            self.sleep(pause)


class GraphResponse(FacebookResponse):
    """A ``FacebookResponse`` that decodes its body once, with the cyclic garbage collector
    paused: the SDK decodes a body to look for an error and again to read it, and a page of
    insights is about a million small acyclic objects, which would set off collection after
    collection while they are built (together a fifth of the CPU per stored row, measured)."""

    def json(self) -> Any:
        if not hasattr(self, "_decoded"):
            collecting = gc.isenabled()
            gc.disable()
            try:
                self._decoded = super().json()
            finally:
                if collecting:
                    gc.enable()
        return self._decoded


class PacedApi(FacebookAdsApi):
    """The SDK's API object, paced by Meta's usage headers (read off every answer, errors
    included) and counting its requests in ``requests``."""

    def __init__(self, session: FacebookSession, api_version: str, pacer: Pacer,
                 requests: Requests | None = None) -> None:
        super().__init__(session, api_version=api_version)
        self.pacer = pacer
        self.requests = requests

    def call(self, method: str, path: Any, params: Any = None, headers: Any = None,
             files: Any = None, url_override: str | None = None,
             api_version: str | None = None) -> GraphResponse:
        """The SDK's own ``FacebookAdsApi.call``, after the pause the pacer asks for, with the
        garbage collector paused while it decodes, answering a ``GraphResponse`` so the
        Cursor's second decode of the same body is free."""
        self.pacer.wait()
        if self.requests is not None:
            self.requests.add(_request_label(path))
        collecting = gc.isenabled()
        gc.disable()
        try:
            response = super().call(method, path, params, headers, files, url_override,
                                    api_version)
        except FacebookRequestError as error:
            self.pacer.record(error.http_headers())
            raise
        finally:
            if collecting:
                gc.enable()
        self.pacer.record(response.headers())
        return GraphResponse(body=response.body(), headers=response.headers(),
                             http_status=response.status(), call=response._call)


def _request_label(path: Any) -> str:
    """``insights`` for an edge of a node, ``node`` for a node itself."""
    parts = [str(p) for p in path] if isinstance(path, tuple | list) else []
    return parts[1] if len(parts) > 1 and parts[1] else "node"


def connect(section: MetaSection, secrets: Secrets, timeout: float = 120, *,
            pacer: Pacer | None = None, requests: Requests | None = None) -> PacedApi:
    """An API object of our own (not the SDK's process-wide default), on ``endpoint`` if set."""
    if secrets.meta_access_token is None:
        raise MissingSecret("CONVSYNC_META_ACCESS_TOKEN", what="Meta's access token")
    session = FacebookSession(access_token=secrets.meta_access_token.get_secret_value(),
                              timeout=timeout)
    if section.endpoint:
        session.GRAPH = section.endpoint.rstrip("/")
    return PacedApi(session, section.api_version, pacer or Pacer(), requests)


# -- action types ------------------------------------------------------------------------------

ALIAS_PREFIXES = ("offsite_conversion.fb_pixel_", "onsite_conversion.", "onsite_web_", "omni_")
IRREGULAR = {"initiated_checkout": "initiate_checkout"}
ON_META_PREFIXES = ("onsite_conversion.", "link_click", "post_engagement", "page_engagement",
                    "post_reaction", "comment", "like", "video_view")
"""Actions that happen on Meta itself: ``action_report_time=mixed`` files them by impression."""


def action_family(action_type: str) -> str:
    """The event behind an action type: Meta reports one pixel purchase as ``purchase``,
    ``omni_purchase``, ``offsite_conversion.fb_pixel_purchase`` and ``onsite_web_purchase``,
    views of the same events that must never be added together."""
    for prefix in ALIAS_PREFIXES:
        if action_type.startswith(prefix):
            action_type = action_type[len(prefix):]
            break
    return IRREGULAR.get(action_type, action_type)


def mark_aliases(conversions: list[PlatformConversion]) -> list[PlatformConversion]:
    """Unmapped action types that are views of a mapped one get ``alias_of`` in settings."""
    mapped = {action_family(c.name): c.conversion for c in conversions if c.conversion}
    return [c if c.conversion or action_family(c.name) not in mapped else c.model_copy(
        update={"settings": {**c.settings, "alias_of": mapped[action_family(c.name)]}})
        for c in conversions]


def report_basis(action_type: str, report_time: str) -> Basis:
    """The date a figure is filed under for Meta's ``action_report_time``."""
    if report_time == "impression":
        return Basis.CLICK_DATE
    if report_time == "mixed" and action_type.startswith(ON_META_PREFIXES):
        return Basis.CLICK_DATE
    return Basis.CONVERSION_DATE


class Handling(NamedTuple):
    """What to do with one action type's figures."""

    store: bool
    conversion: str | None
    kind: Kind | None
    basis: Basis
    rivals: frozenset[str]
    """Mapped views of the same event for the same conversion listed before this one: when one
    of them is in a row, that one is stored and this one is not."""


class ActionPlan:
    """Decides, once per action type, whether and how its figures are stored.

    A mapped type is stored with its canonical conversion; an unmapped type whose event
    (``action_family``) is mapped through another type is dropped (the same events, already
    stored under the mapped name); any other unmapped type is kept with conversion None. When
    several views of one event map to the same conversion, the one listed first in the config
    that a row carries is stored."""

    def __init__(self, mapping: ConversionMap, report_time: str) -> None:
        self.mapping = mapping
        self.report_time = report_time
        views: dict[tuple[str, str], list[str]] = {}
        for definition in mapping.definitions:
            for name in definition.names.meta:
                views.setdefault((action_family(name), definition.name), []).append(name)
        self.mapped_families = frozenset(family for family, _ in views)
        self.rivals = {name: frozenset(names[:i]) for names in views.values()
                       for i, name in enumerate(names)}
        self._known: dict[str, Handling] = {}

    def __call__(self, action_type: str) -> Handling:
        known = self._known.get(action_type)
        if known is None:
            known = self._known[action_type] = self._decide(action_type)
        return known

    def _decide(self, action_type: str) -> Handling:
        definition = self.mapping.lookup(Platform.META, action_type)
        basis = report_basis(action_type, self.report_time)
        if definition is not None:
            return Handling(True, definition.name, definition.kind, basis,
                            self.rivals.get(action_type, frozenset()))
        aliased = action_family(action_type) in self.mapped_families
        return Handling(not aliased, None, None, basis, frozenset())


# -- insights ----------------------------------------------------------------------------------

def _row_json(response: dict[str, Any], api: Any) -> dict[str, Any]:
    return response


def insights(api: FacebookAdsApi, account_id: str, params: dict[str, Any],
             fields: list[str]) -> Iterator[dict[str, Any]]:
    """Insights rows as the plain dicts Graph sent, page by page through the SDK's Cursor.

    The same Cursor ``AdAccount.get_insights`` returns, with a parser that keeps each row's
    JSON: the default one builds typed ``AdsInsights`` / ``AdsActionStats`` objects, which
    more than doubles the client's CPU per row (about 95 against 40 us for a day of a campaign
    with 18 action types, measured on the sandbox)."""
    cursor = Cursor(source_object=AdAccount(account_id, api=api),
                    target_objects_class=AdsInsights, fields=fields, params=params,
                    include_summary=False, api=api,
                    object_parser=ObjectParser(api=api, custom_parse_method=_row_json))
    yield from cursor


def action_types(api: FacebookAdsApi, section: MetaSection, account_id: str, start: dt.date,
                 end: dt.date) -> Iterator[PlatformConversion]:
    """The action types the account recorded over a date range, with their counts."""
    params = {"level": "account",
              "time_range": {"since": start.isoformat(), "until": end.isoformat()},
              "action_attribution_windows": section.attribution_windows,
              "action_report_time": section.action_report_time}
    totals: dict[str, float] = {}
    for row in insights(api, account_id, params, ["actions"]):
        for action in row.get("actions", []):
            totals[action["action_type"]] = (totals.get(action["action_type"], 0.0)
                                             + float(action.get("value", 0)))
    for action_type, count in sorted(totals.items()):
        yield PlatformConversion(platform=Platform.META, account_id=account_id,
                                 platform_id=action_type, name=action_type,
                                 settings={"count": count})


@dataclass(frozen=True)
class Account:
    """What every row of an ad account carries: its time zone and currency."""

    id: str
    time_zone: str
    currency: str


def fetch_account(api: FacebookAdsApi, account_id: str) -> Account:
    node = AdAccount(account_id, api=api).api_get(fields=ACCOUNT_FIELDS)
    return Account(account_id, str(node["timezone_name"]), str(node["currency"]))


def insights_params(section: MetaSection, start: dt.date, end: dt.date,
                    page_size: int) -> dict[str, Any]:
    return {"level": "campaign", "time_increment": 1, "limit": page_size,
            "time_range": {"since": start.isoformat(), "until": end.isoformat()},
            "action_attribution_windows": list(section.attribution_windows),
            "action_report_time": section.action_report_time}


_NO_VALUES: Mapping[str, str] = {}


def stat_rows(rows: Iterable[Mapping[str, Any]], account: Account, windows: Sequence[str],
              plan: ActionPlan) -> Iterator[ConversionStat]:
    """Insights rows to one ConversionStat per stored action type and window: the hot path.

    A window Meta leaves out (or sends as zero, count and value) makes no row. The rows are
    unvalidated copies of an account template (``copy_with``: 0.9 us against 2.5 to validate):
    their values are Meta's typed fields converted here."""
    template = ConversionStat(platform=Platform.META, account_id=account.id, date=dt.date.min,
                             timezone=account.time_zone, campaign_id="",
                             platform_conversion="", currency=account.currency)
    last = ""
    day = dt.date.min
    for row in rows:
        text = row["date_start"]
        if text != last:
            day, last = dt.date.fromisoformat(text), text
        actions = row.get("actions")
        if not actions:
            continue
        values = {entry["action_type"]: entry for entry in row.get("action_values", ())}
        campaign_id, campaign_name = row["campaign_id"], row.get("campaign_name", "")
        present: frozenset[str] | None = None
        for action in actions:
            action_type = action["action_type"]
            handling = plan(action_type)
            if not handling.store:
                continue
            if handling.rivals:
                present = present or frozenset(a["action_type"] for a in actions)
                if not handling.rivals.isdisjoint(present):
                    continue
            money = values.get(action_type, _NO_VALUES)
            for window in windows:
                count, value = float(action.get(window, 0)), float(money.get(window, 0))
                if count or value:
                    yield copy_with(template, {
                        "date": day, "campaign_id": campaign_id,
                        "campaign_name": campaign_name, "platform_conversion": action_type,
                        "conversion": handling.conversion, "kind": handling.kind,
                        "count": count, "value": value, "basis": handling.basis,
                        "window": window})


def too_much_data(error: BaseException) -> bool:
    """Graph's answer to a page too big to compute: ask again for fewer rows."""
    return (isinstance(error, FacebookRequestError) and error.api_error_code() == 1
            and "reduce the amount of data" in (error.api_error_message() or ""))


class _Insights:
    """One ad account's insights stream: its account fetched once a run, its page size cut
    whenever Meta finds a page too big."""

    def __init__(self, api: FacebookAdsApi, section: MetaSection, account_id: str,
                 plan: ActionPlan, page_size: int) -> None:
        self.api, self.section, self.account_id, self.plan = api, section, account_id, plan
        self.page_size = page_size
        self.account = functools.cache(lambda: fetch_account(api, account_id))

    def pull(self, start: dt.date, end: dt.date) -> Iterator[Row]:
        account = self.account()
        params = insights_params(self.section, start, end, self.page_size)
        rows = insights(self.api, self.account_id, params, INSIGHTS_FIELDS)
        try:
            yield from stat_rows(rows, account, self.section.attribution_windows, self.plan)
        except FacebookRequestError as error:
            if too_much_data(error) and self.page_size > MIN_PAGE_SIZE:
                self.page_size = max(MIN_PAGE_SIZE, self.page_size // PAGE_SHRINK)
                log.warning("meta: page too big for %s; asking %d rows a page from now on",
                            self.account_id, self.page_size)
            raise


def streams(config: ClientConfig, secrets: Secrets, mapping: ConversionMap,
            requests: Requests, *, pacer: Pacer | None = None,
            page_size: int = PAGE_SIZE) -> list[Stream]:
    """One insights stream per ad account (see ``min_requests`` for what a pull costs)."""
    section = config.meta
    if section is None:
        return []
    api = connect(section, secrets, pacer=pacer, requests=requests)
    plan = ActionPlan(mapping, section.action_report_time)
    # Graph does not document the order of insights rows: the stream promises none, so a day
    # counts as complete only once the account's whole range is stored
    return [Stream("meta", "insights", account_id,
                   _Insights(api, section, account_id, plan, page_size).pull, ordered=False)
            for account_id in section.ad_account_ids]


def min_requests(insight_rows: Sequence[int], page_size: int = PAGE_SIZE) -> int:
    """The fewest requests a pull makes: per ad account, one for the account (time zone and
    currency, once a run) and one per page of insights rows (a day of a campaign with any
    delivery or action is a row; an empty range still takes one request).
    ``insight_rows`` holds each account's row count over the pulled range."""
    return sum(1 + max(1, math.ceil(rows / page_size)) for rows in insight_rows)


# -- errors ------------------------------------------------------------------------------------

THROTTLE_CODES = frozenset({4, 17, 32, 341, 613, *range(80000, 80015)})
THROTTLE_SUBCODES = frozenset({2446079, 1487742})
TRANSIENT_CODES = frozenset({1, 2})
"""API Unknown and API Service: "possibly a temporary issue due to downtime, retry"."""
MAX_WAIT = 600.0
"""The longest wait worth retrying within a run; a longer block fails the platform for this
run with the time to wait in the report."""


def throttled(error: BaseException) -> bool:
    return isinstance(error, FacebookRequestError) and (
        error.api_error_code() in THROTTLE_CODES
        or error.api_error_subcode() in THROTTLE_SUBCODES)


def _is_retryable(error: BaseException) -> bool:
    """Throttling, transient and server errors, and lost connections; never validation,
    permission or token errors, nor a throttle lifted only after ``MAX_WAIT``."""
    if isinstance(error, http_errors.ConnectionError | http_errors.Timeout):
        return True
    if not isinstance(error, FacebookRequestError):
        return False
    wait = _retry_after(error)
    if wait is not None and wait > MAX_WAIT:
        return False
    status = error.http_status() or 0
    return (throttled(error) or error.api_transient_error() is True
            or error.api_error_code() in TRANSIENT_CODES or status >= 500)


def _retry_after(error: BaseException) -> float | None:
    if not isinstance(error, FacebookRequestError):
        return None
    return regain_seconds(error.http_headers() or {})


RETRY = RetryPolicy("meta", _is_retryable, _retry_after, max_wait=MAX_WAIT)

FIXES = {
    190: "the access token is invalid or expired: set a new CONVSYNC_META_ACCESS_TOKEN",
    102: "the access token is invalid or expired: set a new CONVSYNC_META_ACCESS_TOKEN",
    104: "no access token reached Meta: set CONVSYNC_META_ACCESS_TOKEN",
    200: "the token lacks permission: grant ads_read on the ad account to its user",
    10: "the token lacks permission: grant ads_read on the ad account to its user",
    294: "the token lacks permission: grant ads_read on the ad account to its user",
}


def explain(error: Exception) -> str | None:
    if not isinstance(error, FacebookRequestError):
        return None
    code, subcode = error.api_error_code(), error.api_error_subcode()
    text = (f"Meta Graph API error {code}{f'/{subcode}' if subcode else ''} "
            f"(HTTP {error.http_status()}): {error.api_error_message()}")
    fix = FIXES.get(code) if isinstance(code, int) else None
    if code == 100 and subcode == 33:
        fix = "no such object for this token: check meta.ad_account_ids"
    elif throttled(error):
        wait = _retry_after(error)
        fix = (f"Meta throttles this app or ad account for about {wait / 60:.0f} min: run "
               "again later" if wait else "Meta throttles this app or ad account: run again "
               "later")
    return f"{text} -- {fix}" if fix else text
