"""Google Ads source: the google-ads client over gRPC, GAQL through SearchStream.

Rows are read as plain protobuf messages (``use_proto_plus=False``): Google recommends it for
large results and it costs about a tenth of proto-plus attribute access per row."""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

from google.ads.googleads.client import GoogleAdsClient
from google.ads.googleads.errors import GoogleAdsException
from google.ads.googleads.v26.errors.types.errors import GoogleAdsFailure
from google.ads.googleads.v26.services.types.google_ads_service import (
    SearchGoogleAdsStreamResponse,
)
from google.api_core import exceptions as api_exceptions

from convsync.model import (
    Basis,
    ConversionMap,
    ConversionStat,
    Identifiers,
    JourneyEvent,
    Kind,
    Platform,
    PlatformConversion,
)
from convsync.retry import RetryPolicy
from convsync.settings import ClientConfig, GoogleAdsSection, Secrets, trust_ca_file
from convsync.sources import Requests, Row, Stream
from convsync.sources.google_auth import ADWORDS_SCOPE, google_credentials

FAILURE_TRAILER = "google.ads.googleads.v26.errors.googleadsfailure-bin"
_EMPTY = SearchGoogleAdsStreamResponse()

CONVERSION_ACTIONS_QUERY = """
SELECT customer.time_zone, customer.currency_code,
  conversion_action.resource_name, conversion_action.id, conversion_action.name,
  conversion_action.category,
  conversion_action.type, conversion_action.status, conversion_action.origin,
  conversion_action.primary_for_goal, conversion_action.include_in_conversions_metric,
  conversion_action.counting_type, conversion_action.value_settings.default_value,
  conversion_action.click_through_lookback_window_days,
  conversion_action.view_through_lookback_window_days
FROM conversion_action
WHERE conversion_action.status != 'REMOVED'"""


def connect(section: GoogleAdsSection, secrets: Secrets) -> GoogleAdsClient:
    """A GoogleAdsClient for this config. The developer token is sent only when one is set."""
    if section.ca_file is not None:
        trust_ca_file(section.ca_file)
    token = secrets.google_developer_token
    return GoogleAdsClient(
        credentials=google_credentials(secrets, [ADWORDS_SCOPE]),
        developer_token=token.get_secret_value() if token else None,
        endpoint=section.endpoint,
        login_customer_id=section.login_customer_id,
        use_proto_plus=False,
    )


def search_stream(client: GoogleAdsClient, customer_id: str, query: str) -> Iterator[Any]:
    """Every row of one GAQL query: one API operation however many rows it returns.

    A parsed batch of 10,000 GoogleAdsRows takes about 70 MB (upb lays out every one of the
    row's hundreds of fields), so a batch is dropped before the next is read: holding two at
    once is what pushed a year's pull past 300 MB."""
    service = client.get_service("GoogleAdsService")  # keep a reference while streaming
    batches = iter(service.search_stream(customer_id=customer_id, query=query, timeout=600))
    while (batch := next(batches, None)) is not None:
        yield from batch.results
        del batch
        forget_first_batch(batches)


def forget_first_batch(batches: Any) -> bool:
    """Make the SDK let go of a stream's first batch; True when there was one to drop.

    google-ads keeps the first response of every stream for its request log
    (``_UnaryStreamWrapper._cache.initial_response_object``): 70 MB held for the whole
    stream. An empty response takes its place, which is what the log then shows."""
    wrapper: Any = getattr(batches, "_wrapped", None)
    cache = wrapper.get_cache() if hasattr(wrapper, "get_cache") else None
    if cache is None or getattr(cache, "initial_response_object", None) in (None, _EMPTY):
        return False
    cache.initial_response_object = _EMPTY
    return True


def conversion_actions(client: GoogleAdsClient, customer_id: str) -> Iterator[PlatformConversion]:
    """The account's conversion actions with the settings that decide what is "in column"."""
    for row in search_stream(client, customer_id, CONVERSION_ACTIONS_QUERY):
        yield _platform_conversion(row, customer_id)


def _platform_conversion(row: Any, customer_id: str) -> PlatformConversion:
    action = row.conversion_action
    settings: dict[str, str | int | float | bool | None] = {
        "category": _enum_name(action, "category"),
        "type": _enum_name(action, "type"),
        "status": _enum_name(action, "status"),
        "origin": _enum_name(action, "origin"),
        "primary_for_goal": action.primary_for_goal,
        "include_in_conversions_metric": action.include_in_conversions_metric,
        "counting_type": _enum_name(action, "counting_type"),
        "default_value": action.value_settings.default_value,
        "click_through_lookback_window_days": action.click_through_lookback_window_days,
        "view_through_lookback_window_days": action.view_through_lookback_window_days,
        "resource_name": action.resource_name,
        "time_zone": row.customer.time_zone,
        "currency": row.customer.currency_code,
    }
    return PlatformConversion(
        platform=Platform.GOOGLE_ADS, account_id=customer_id, platform_id=str(action.id),
        name=action.name, settings=settings, in_column=action.include_in_conversions_metric)


# -- pulling ---------------------------------------------------------------------------------

STATS_QUERY = """
SELECT segments.date, campaign.id, campaign.name, segments.conversion_action,
  metrics.all_conversions, metrics.all_conversions_value{extra}
FROM campaign
WHERE segments.date BETWEEN '{start}' AND '{end}'
ORDER BY segments.date"""
BY_CONVERSION_DATE = """,
  metrics.all_conversions_by_conversion_date, metrics.all_conversions_value_by_conversion_date"""
CLICKS_QUERY = """
SELECT click_view.gclid, segments.date, campaign.id
FROM click_view
WHERE segments.date = '{day}'"""


@dataclass(frozen=True)
class _Action:
    """What a stats row needs to know about its conversion action."""

    name: str
    conversion: str | None
    kind: Kind | None
    in_column: bool


@dataclass
class _Account:
    """An account's time zone, currency and conversion actions, fetched once per run."""

    time_zone: str
    currency: str
    actions: dict[str, _Action]
    conversions: list[PlatformConversion]


def min_requests(accounts: int, days: int, *, clicks: bool) -> int:
    """The fewest operations a pull can make: per account, one SearchStream for the conversion
    actions and one for the daily stats over the whole range (both bases in one query), plus one
    per day for click_view, which the API limits to a single day per query."""
    return accounts * (2 + (days if clicks else 0))


def streams(config: ClientConfig, secrets: Secrets, mapping: ConversionMap,
            requests: Requests) -> list[Stream]:
    """Per account: its conversion actions, daily stats per campaign and action, and (when
    ``pull_clicks``) clicks with their gclid."""
    section = config.google_ads
    if section is None:
        return []
    client = connect(section, secrets)
    out: list[Stream] = []
    for customer_id in section.customer_ids:
        account = functools.cache(lambda c=customer_id: _fetch_account(client, c, mapping,
                                                                      requests))
        out.append(Stream("google_ads", "conversion_actions", customer_id,
                          _actions_pull(account)))
        out.append(Stream("google_ads", "stats", customer_id,
                          _stats_pull(client, customer_id, account, requests,
                                      section.conversion_date_basis)))
        if section.pull_clicks:
            out.append(Stream("google_ads", "clicks", customer_id,
                              _clicks_pull(client, customer_id, account, requests),
                              chunk_days=1))
    return out


def _fetch_account(client: GoogleAdsClient, customer_id: str, mapping: ConversionMap,
                   requests: Requests) -> _Account:
    requests.add("SearchStream")
    conversions = [mapping.mapped(c) for c in conversion_actions(client, customer_id)]
    actions = {str(c.settings["resource_name"]): _Action(c.name, c.conversion, c.kind,
                                                          bool(c.in_column))
               for c in conversions}
    first = conversions[0].settings if conversions else {}
    return _Account(str(first.get("time_zone") or "UTC"), str(first.get("currency") or ""),
                    actions, conversions)


def _actions_pull(account: Callable[[], _Account]) -> Callable[[dt.date, dt.date],
                                                                Iterator[Row]]:
    def pull(start: dt.date, end: dt.date) -> Iterator[Row]:
        yield from account().conversions
    return pull


def _stats_pull(client: GoogleAdsClient, customer_id: str, account: Callable[[], _Account],
                requests: Requests, both_bases: bool) -> Callable[[dt.date, dt.date],
                                                                  Iterator[Row]]:
    def pull(start: dt.date, end: dt.date) -> Iterator[Row]:
        info = account()
        query = STATS_QUERY.format(start=start, end=end,
                                   extra=BY_CONVERSION_DATE if both_bases else "")
        requests.add("SearchStream")
        yield from _stat_rows(search_stream(client, customer_id, query), customer_id, info,
                              both_bases)
    return pull


def _stat_rows(rows: Iterator[Any], customer_id: str, info: _Account,
               both_bases: bool) -> Iterator[ConversionStat]:
    """Rows to ConversionStats: the hot path, a few microseconds a row (validating costs
    less than pydantic's ``model_construct`` here)."""
    tz, currency = info.time_zone, info.currency
    dates: dict[str, dt.date] = {}
    unknown = _Action("", None, None, False)
    for row in rows:
        segments, metrics, campaign = row.segments, row.metrics, row.campaign
        day = dates.get(segments.date)
        if day is None:
            day = dates[segments.date] = dt.date.fromisoformat(segments.date)
        action = info.actions.get(segments.conversion_action, unknown)
        name = action.name or segments.conversion_action
        campaign_id, campaign_name = str(campaign.id), campaign.name
        click_date = (metrics.all_conversions, metrics.all_conversions_value)
        conversion_date = ((metrics.all_conversions_by_conversion_date,
                            metrics.all_conversions_value_by_conversion_date)
                           if both_bases else None)
        # Drop every reference into the batch before yielding: a row kept alive across the
        # next read keeps its whole 70 MB batch alive too.
        del row, segments, metrics, campaign
        for basis, figures in ((Basis.CLICK_DATE, click_date),
                               (Basis.CONVERSION_DATE, conversion_date)):
            if figures is not None:
                yield ConversionStat(
                    platform=Platform.GOOGLE_ADS, account_id=customer_id, date=day,
                    timezone=tz, campaign_id=campaign_id, campaign_name=campaign_name,
                    platform_conversion=name, conversion=action.conversion, kind=action.kind,
                    count=figures[0], value=figures[1], currency=currency, basis=basis,
                    window="", in_column=action.in_column)


def _clicks_pull(client: GoogleAdsClient, customer_id: str, account: Callable[[], _Account],
                 requests: Requests) -> Callable[[dt.date, dt.date], Iterator[Row]]:
    """Clicks as journey events (the ladder's first rung): one query per day, as required."""
    def pull(start: dt.date, end: dt.date) -> Iterator[Row]:
        tz = account().time_zone
        day = start
        while day <= end:
            requests.add("SearchStream")
            time = dt.datetime.combine(day, dt.time(12), ZoneInfo(tz))  # click_view has no time
            for row in search_stream(client, customer_id, CLICKS_QUERY.format(day=day)):
                gclid = row.click_view.gclid
                yield JourneyEvent(
                    person_key=f"gclid:{gclid}", conversion=None, platform_conversion="click",
                    time=time.astimezone(dt.UTC), source_platform=Platform.GOOGLE_ADS,
                    source_event_id=f"click:{gclid}", identifiers=Identifiers(gclid=gclid),
                    campaign_id=str(row.campaign.id))
            day += dt.timedelta(days=1)
    return pull


# -- errors ----------------------------------------------------------------------------------

def failure_of(error: BaseException) -> Any:
    """The GoogleAdsFailure an error carries (raw protobuf), or None."""
    if isinstance(error, GoogleAdsException):
        failure = error.failure  # proto-plus even when the client is not
        return type(failure).pb(failure) if hasattr(type(failure), "pb") else failure
    response = getattr(error, "response", None)
    trailing = getattr(response, "trailing_metadata", None)
    for key, value in (trailing() or ()) if callable(trailing) else ():
        if key == FAILURE_TRAILER:
            return GoogleAdsFailure.pb(GoogleAdsFailure.deserialize(value))
    return None


def _quota_reasons(error: BaseException) -> list[str]:
    failure = failure_of(error)
    if failure is None:
        return []
    return [_enum_name(e.error_code, "quota_error") for e in failure.errors
            if e.error_code.WhichOneof("error_code") == "quota_error"]


def _is_retryable(error: BaseException) -> bool:
    """Transient: UNAVAILABLE, INTERNAL, DEADLINE_EXCEEDED, and a temporary rate limit. The
    daily operation budget (QuotaError.RESOURCE_EXHAUSTED) is not: it resets tomorrow."""
    if isinstance(error, api_exceptions.ResourceExhausted):
        return "RESOURCE_EXHAUSTED" not in _quota_reasons(error)
    return isinstance(error, api_exceptions.ServiceUnavailable | api_exceptions.InternalServerError
                      | api_exceptions.DeadlineExceeded)


def _retry_after(error: BaseException) -> float | None:
    failure = failure_of(error)
    for e in failure.errors if failure is not None else ():
        delay = e.details.quota_error_details.retry_delay
        if delay.seconds or delay.nanos:
            return delay.seconds + delay.nanos / 1e9
    return None


RETRY = RetryPolicy("google_ads", _is_retryable, _retry_after)


def _enum_name(message: Any, field: str) -> str:
    """The name of an enum field's value (proto-plus renames ``type`` to ``type_``)."""
    fields = message.DESCRIPTOR.fields_by_name
    field = field if field in fields else f"{field}_"
    number = getattr(message, field)
    value = fields[field].enum_type.values_by_number.get(number)
    return value.name if value is not None else str(number)


def explain(error: Exception) -> str | None:
    """A one-line account of a Google Ads API error, naming what to fix; None if not one."""
    failure = failure_of(error)
    if failure is None:
        if isinstance(error, api_exceptions.GoogleAPICallError):
            return f"Google Ads API: {error.code} {error.message}"
        return None
    details = "; ".join(f"{error_code_name(e)}: {e.message}" for e in failure.errors)
    if "RESOURCE_EXHAUSTED" in _quota_reasons(error):
        details += (" (the Cloud project's daily operation budget is spent: it resets at "
                    "midnight Pacific time; raise the access level or sync fewer accounts)")
    request_id = getattr(error, "request_id", "") or failure.request_id
    return f"Google Ads request {request_id} failed: {details}"


def error_code_name(error: Any) -> str:
    """``conversion_adjustment_upload_error.CONVERSION_NOT_FOUND``: a GoogleAdsError's code."""
    code = error.error_code
    which = code.WhichOneof("error_code")
    return f"{which}.{_enum_name(code, which)}" if which else "unknown"
