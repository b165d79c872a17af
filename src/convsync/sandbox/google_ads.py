"""The Google Ads API simulator: ``GoogleAdsService.Search`` / ``SearchStream`` over gRPC + TLS.

It answers the official ``google-ads`` client (API v26) with rows computed from the world:
conversion actions, daily campaign (x conversion action) conversions on both the click-date and
the conversion-date basis, clicks and delivery, and ``click_view`` gclids. Queries are GAQL
(see ``gaql.py``); what the real API refuses is refused with its own error shape: a gRPC status
with a serialized ``GoogleAdsFailure`` in the ``...googleadsfailure-bin`` trailer.

Rows are streamed as the world produces them and never all held in memory (unless an ORDER BY
other than ``segments.date`` asks for a sort). Each row is the concatenation of the serialized
parts that depend only on its campaign / action (cached) and a small message holding its date
and metrics: serialized protobuf messages of one type concatenate into their merge.

More services can join the same server: ``begin_call`` does the checks every Google Ads call
shares and ``build_google_ads_server`` takes extra handlers (the sandbox adds the Data
Manager's IngestionService and ConversionAdjustmentUploadService, ``adjustments.py``)."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import heapq
import logging
import operator
import re
import secrets
import struct
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from operator import itemgetter
from pathlib import Path
from typing import Any, NoReturn
from zoneinfo import ZoneInfo

import grpc
from google.ads.googleads.v26.errors.types.errors import GoogleAdsFailure
from google.ads.googleads.v26.services.types.google_ads_service import (
    GoogleAdsRow,
    SearchGoogleAdsRequest,
    SearchGoogleAdsResponse,
    SearchGoogleAdsStreamRequest,
    SearchGoogleAdsStreamResponse,
)
from google.protobuf import any_pb2, descriptor
from google.rpc import status_pb2

from convsync.sandbox import gaql
from convsync.sandbox.control import Fault, Sandbox
from convsync.sandbox.world import (
    PURCHASE,
    Accounts,
    Campaign,
    Click,
    GoogleAdsAction,
    World,
)

log = logging.getLogger(__name__)

API_VERSION = "v26"
PLATFORM = "google_ads"
SERVICE = f"google.ads.googleads.{API_VERSION}.services.GoogleAdsService"
FAILURE_KEY = f"google.ads.googleads.{API_VERSION}.errors.googleadsfailure-bin"
FAILURE_TYPE_URL = f"type.googleapis.com/google.ads.googleads.{API_VERSION}.errors.GoogleAdsFailure"
PAGE_SIZE = 10_000
"""Rows per Search page (fixed since page_size was retired) and per SearchStream batch."""
CLICK_VIEW_MAX_AGE_DAYS = 90
OPEN_CURSORS = 64
"""Search result sets kept open for their next page; an evicted one is recomputed and skipped."""

_Row = GoogleAdsRow.pb()
_SearchResponse = SearchGoogleAdsResponse.pb()
_StreamResponse = SearchGoogleAdsStreamResponse.pb()
_Failure = GoogleAdsFailure.pb()
_SUMMARY_SETTINGS = {2: "none", 3: "with_results", 4: "only"}  # SummaryRowSettingEnum values

METRICS = ("clicks", "impressions", "cost_micros", "conversions", "conversions_value",
           "all_conversions", "all_conversions_value", "conversions_by_conversion_date",
           "conversions_value_by_conversion_date", "all_conversions_by_conversion_date",
           "all_conversions_value_by_conversion_date")
METRIC_INDEX = {name: i for i, name in enumerate(METRICS)}
DELIVERY_METRICS = frozenset(f"metrics.{m}" for m in METRICS[:3])
CLICK_DATE_METRICS = frozenset(f"metrics.{m}" for m in METRICS[3:7])
CONVERSION_DATE_METRICS = frozenset(f"metrics.{m}" for m in METRICS[7:])
CONVERSION_SEGMENTS = frozenset({"segments.conversion_action", "segments.conversion_action_name",
                                 "segments.conversion_action_category"})

_STATUS_TEXT = {
    grpc.StatusCode.INVALID_ARGUMENT: "Request contains an invalid argument.",
    grpc.StatusCode.PERMISSION_DENIED: "The caller does not have permission",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "Resource has been exhausted (e.g. check quota).",
    grpc.StatusCode.INTERNAL: "Internal error encountered.",
}
_MISSING_CREDENTIAL = (
    "Request is missing required authentication credential. Expected OAuth 2 access token, "
    "login cookie or other valid authentication credential. See "
    "https://developers.google.com/identity/sign-in/web/devconsole-project.")
_INVALID_CREDENTIAL = (
    "Request had invalid authentication credentials. Expected OAuth 2 access token, login "
    "cookie or other valid authentication credential. See "
    "https://developers.google.com/identity/sign-in/web/devconsole-project.")
_PERMISSION_DENIED = (
    "User doesn't have permission to access customer. Note: If you're accessing a client "
    "customer, the manager's customer id must be set in the 'login-customer-id' header. See "
    "https://developers.google.com/google-ads/api/docs/concepts/call-structure#cid")


# -- errors --------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdsError:
    """One ``GoogleAdsError``: ``code`` is the ErrorCode field, ``reason`` its enum value name."""

    code: str
    reason: str
    message: str
    trigger: str | None = None
    location: str | None = None  # the request field it is about ("query", "customer_id")
    path: tuple[tuple[str, int | None], ...] = ()
    """A deeper location, element by element: (("conversion_adjustments", 3), ("order_id",
    None)); used instead of ``location`` when given."""
    retry_delay: float | None = None  # quota errors: QuotaErrorDetails.retry_delay
    rate_scope: str = "ACCOUNT"
    rate_name: str = ""


class AdsFailure(Exception):
    """A call the API answers with ``status`` and a GoogleAdsFailure holding ``errors``."""

    def __init__(self, status: grpc.StatusCode, *errors: AdsError) -> None:
        super().__init__(errors[0].message if errors else status.name)
        self.status = status
        self.errors = errors


class TransportFailure(Exception):
    """A call refused before the Ads API proper (Google's front end): a bare gRPC status."""

    def __init__(self, status: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.status = status
        self.details = details


def query_failure(reason: str, message: str, trigger: str | None = None) -> AdsFailure:
    return AdsFailure(grpc.StatusCode.INVALID_ARGUMENT,
                      AdsError("query_error", reason, message, trigger, "query"))


def failure_bytes(errors: Sequence[AdsError], request_id: str) -> bytes:
    failure = _Failure(request_id=request_id)
    for error in errors:
        entry = failure.errors.add(message=error.message)
        code_field = entry.error_code.DESCRIPTOR.fields_by_name[error.code]
        reason = code_field.enum_type.values_by_name[error.reason].number
        setattr(entry.error_code, error.code, reason)
        if error.trigger is not None:
            entry.trigger.string_value = error.trigger
        if error.path:
            for name, index in error.path:
                element = entry.location.field_path_elements.add(field_name=name)
                if index is not None:
                    element.index = index
        elif error.location:
            entry.location.field_path_elements.add(field_name=error.location)
        if error.retry_delay is not None:
            details = entry.details.quota_error_details
            scope = details.DESCRIPTOR.fields_by_name["rate_scope"].enum_type
            details.rate_scope = scope.values_by_name[error.rate_scope].number
            details.rate_name = error.rate_name
            details.retry_delay.FromTimedelta(dt.timedelta(seconds=error.retry_delay))
    return failure.SerializeToString()


def abort(context: grpc.ServicerContext, failure: AdsFailure | TransportFailure,
          request_id: str) -> NoReturn:
    """End the call the way the API does: status, details and the failure trailers."""
    if isinstance(failure, TransportFailure):
        context.set_trailing_metadata((("request-id", request_id),))
        context.abort(failure.status, failure.details)
    else:
        payload = failure_bytes(failure.errors, request_id)
        text = _STATUS_TEXT.get(failure.status, failure.status.name)
        status = status_pb2.Status(code=failure.status.value[0], message=text,
                                   details=[any_pb2.Any(type_url=FAILURE_TYPE_URL, value=payload)])
        context.set_trailing_metadata(((FAILURE_KEY, payload),
                                       ("grpc-status-details-bin", status.SerializeToString()),
                                       ("request-id", request_id)))
        context.abort(failure.status, text)
    raise AssertionError("ServicerContext.abort always raises")


def fault_failure(fault: Fault) -> AdsFailure | TransportFailure:
    """The API's answer for an injected fault (``slow`` is played by the caller)."""
    if fault.kind == "server_error":
        return TransportFailure(grpc.StatusCode.UNAVAILABLE,
                                "The service is currently unavailable.")
    seconds = max(1, round(fault.retry_after))
    if fault.kind == "rate_limit":
        error = AdsError("quota_error", "RESOURCE_TEMPORARILY_EXHAUSTED",
                         f"Too many requests. Retry in {seconds} seconds.",
                         retry_delay=fault.retry_after, rate_scope="ACCOUNT",
                         rate_name="Requests per service per method")
    else:
        error = AdsError("quota_error", "RESOURCE_EXHAUSTED",
                         f"Too many requests. Retry in {seconds} seconds.",
                         retry_delay=fault.retry_after, rate_scope="DEVELOPER",
                         rate_name="Number of operations for basic access")
    return AdsFailure(grpc.StatusCode.RESOURCE_EXHAUSTED, error)


# -- what every call checks ----------------------------------------------------------------
@dataclass(frozen=True)
class Customer:
    """The account a call is about, as the world knows it."""

    id: str
    accounts: Accounts
    manager: bool = False

    @property
    def resource_name(self) -> str:
        return f"customers/{self.id}"


def new_request_id() -> str:
    return secrets.token_urlsafe(16)[:22]


def begin_call(sandbox: Sandbox, context: grpc.ServicerContext, method: str,
               customer_id: str) -> Customer:
    """Count the call, play the fault it owes, check credentials and the customer.

    Raises AdsFailure / TransportFailure the way the API refuses the call."""
    sandbox.count(PLATFORM, method)
    fault = sandbox.next_fault(PLATFORM)
    if fault is not None:
        if fault.kind != "slow":
            raise fault_failure(fault)
        time.sleep(fault.delay)
    metadata = dict(context.invocation_metadata())
    _check_credentials(metadata.get("authorization"))
    customer = _customer(sandbox.world.accounts, customer_id)
    login = metadata.get("login-customer-id")
    if login and login not in (customer.accounts.google_ads_manager_id, customer.id):
        raise AdsFailure(grpc.StatusCode.PERMISSION_DENIED,
                         AdsError("authorization_error", "USER_PERMISSION_DENIED",
                                  _PERMISSION_DENIED))
    return customer


def _check_credentials(authorization: str | bytes | None) -> None:
    """Any bearer token is good: the sandbox checks the shape, not the grant."""
    if not authorization:
        raise TransportFailure(grpc.StatusCode.UNAUTHENTICATED, _MISSING_CREDENTIAL)
    text = authorization if isinstance(authorization, str) else authorization.decode()
    scheme, _, token = text.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise TransportFailure(grpc.StatusCode.UNAUTHENTICATED, _INVALID_CREDENTIAL)


def _customer(accounts: Accounts, customer_id: str) -> Customer:
    if not customer_id.isdigit():
        raise AdsFailure(grpc.StatusCode.INVALID_ARGUMENT,
                         AdsError("request_error", "INVALID_CUSTOMER_ID",
                                  f"Invalid customer ID '{customer_id}'.", customer_id,
                                  "customer_id"))
    if customer_id == accounts.google_ads_customer_id:
        return Customer(customer_id, accounts)
    if customer_id == accounts.google_ads_manager_id:
        return Customer(customer_id, accounts, manager=True)
    raise AdsFailure(grpc.StatusCode.PERMISSION_DENIED,
                     AdsError("authorization_error", "USER_PERMISSION_DENIED", _PERMISSION_DENIED))


# -- the rows, before serialization --------------------------------------------------------
def _zeros() -> list[float]:
    return [0.0] * len(METRICS)


@dataclass(slots=True)
class Cell:
    """One result row in the making: what it is about and its metric values."""

    date: dt.date | None = None
    campaign: Campaign | None = None
    action: GoogleAdsAction | None = None
    click: Click | None = None
    metrics: list[float] = field(default_factory=_zeros)


@dataclass(frozen=True)
class FieldSpec:
    name: str  # GAQL name
    kind: str  # string | int | double | bool | enum | date
    get: Callable[[Cell], Any]
    static: bool = True
    """The value depends only on the row's campaign, action and customer (it is cached)."""

    @property
    def family(self) -> str:
        return self.name.split(".", 1)[0]


def _campaign(cell: Cell) -> Campaign:
    assert cell.campaign is not None
    return cell.campaign


def _action(cell: Cell) -> GoogleAdsAction:
    assert cell.action is not None
    return cell.action


def _click(cell: Cell) -> Click:
    assert cell.click is not None
    return cell.click


@lru_cache(maxsize=16)
def catalog(customer: Customer) -> dict[str, FieldSpec]:
    """Every field the simulator serves, by GAQL name, for one customer."""
    cid, accounts = customer.id, customer.accounts
    f = FieldSpec

    def action_name(cell: Cell) -> str:
        return f"customers/{cid}/conversionActions/{_action(cell).id}"

    fields = [
        f("customer.resource_name", "string", lambda c: customer.resource_name),
        f("customer.id", "int", lambda c: int(cid)),
        f("customer.time_zone", "string", lambda c: accounts.google_ads_tz),
        f("customer.currency_code", "string", lambda c: accounts.currency),
        f("campaign.resource_name", "string",
          lambda c: f"customers/{cid}/campaigns/{_campaign(c).id}"),
        f("campaign.id", "int", lambda c: int(_campaign(c).id)),
        f("campaign.name", "string", lambda c: _campaign(c).name),
        f("campaign.status", "enum", lambda c: "ENABLED"),
        f("conversion_action.resource_name", "string", action_name),
        f("conversion_action.id", "int", lambda c: _action(c).id),
        f("conversion_action.name", "string", lambda c: _action(c).name),
        f("conversion_action.status", "enum", lambda c: "ENABLED"),
        f("conversion_action.type", "enum", lambda c: _action(c).type),
        f("conversion_action.category", "enum", lambda c: _action(c).category),
        f("conversion_action.origin", "enum", lambda c: _action(c).origin),
        f("conversion_action.primary_for_goal", "bool", lambda c: _action(c).primary_for_goal),
        f("conversion_action.include_in_conversions_metric", "bool",
          lambda c: _action(c).primary_for_goal),
        f("conversion_action.counting_type", "enum", lambda c: _action(c).counting_type),
        f("conversion_action.click_through_lookback_window_days", "int",
          lambda c: _action(c).click_through_days),
        f("conversion_action.view_through_lookback_window_days", "int",
          lambda c: _action(c).view_through_days),
        f("conversion_action.value_settings.default_value", "double",
          lambda c: _action(c).default_value),
        f("conversion_action.value_settings.default_currency_code", "string",
          lambda c: accounts.currency),
        f("conversion_action.value_settings.always_use_default_value", "bool",
          # the world values only purchases per order; uploads carry their own values
          lambda c: _action(c).step != PURCHASE and not _action(c).type.startswith("UPLOAD")),
        f("segments.conversion_action", "string", action_name),
        f("segments.conversion_action_name", "string", lambda c: _action(c).name),
        f("segments.conversion_action_category", "enum", lambda c: _action(c).category),
        f("segments.date", "date", lambda c: c.date, static=False),
        f("click_view.gclid", "string", lambda c: _click(c).gclid, static=False),
        f("click_view.resource_name", "string",
          lambda c: f"customers/{cid}/clickViews/{_click(c).date.isoformat()}~{_click(c).gclid}",
          static=False),
    ]
    for i, metric in enumerate(METRICS):
        fields.append(f(f"metrics.{metric}", "int" if i < 3 else "double", _metric_getter(i),
                        static=False))
    return {spec.name: spec for spec in fields}


def _metric_getter(index: int) -> Callable[[Cell], Any]:
    if index < 3:
        return lambda cell: int(cell.metrics[index])
    return lambda cell: cell.metrics[index]


@dataclass(frozen=True)
class Resource:
    """What may be queried with one resource in the FROM clause."""

    families: frozenset[str]  # resources whose fields may be selected
    segments: frozenset[str]
    metrics: frozenset[str]
    segmenting: frozenset[str] = frozenset()  # their fields in WHERE must also be selected


ALL_METRICS = frozenset(f"metrics.{m}" for m in METRICS)
RESOURCES = {
    "campaign": Resource(frozenset({"campaign", "customer"}),
                         CONVERSION_SEGMENTS | {"segments.date"}, ALL_METRICS),
    "customer": Resource(frozenset({"customer"}), CONVERSION_SEGMENTS | {"segments.date"},
                         ALL_METRICS),
    "conversion_action": Resource(frozenset({"conversion_action", "customer"}),
                                  frozenset({"segments.date"}),
                                  frozenset({"metrics.all_conversions",
                                             "metrics.all_conversions_value"})),
    "click_view": Resource(frozenset({"click_view", "campaign", "customer"}),
                           frozenset({"segments.date"}), frozenset({"metrics.clicks"}),
                           segmenting=frozenset({"campaign"})),
}
RESOURCE_NAMED = ("campaign", "customer", "conversion_action", "click_view")


# -- planning: the query checked and turned into what to compute ----------------------------
Predicate = Callable[[Cell], bool]
DATE_OPERATORS = frozenset({"=", "!=", ">", ">=", "<", "<=", "BETWEEN", "DURING", "IN", "NOT IN"})
_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "=": operator.eq, "!=": operator.ne, ">": operator.gt, ">=": operator.ge, "<": operator.lt,
    "<=": operator.le}


@dataclass
class Plan:
    query: gaql.Query
    customer: Customer
    selected: list[FieldSpec]
    emitted: list[FieldSpec]  # selected plus the resource names the API adds
    grain: frozenset[str]  # what one row is about: date, campaign, action, customer, click
    sources: frozenset[str]  # delivery, by_click, by_conversion, or one listing
    first: dt.date | None
    last: dt.date | None
    row_filters: list[Predicate] = field(default_factory=list)
    metric_filters: list[Predicate] = field(default_factory=list)
    ordering: list[tuple[FieldSpec, bool]] = field(default_factory=list)

    @property
    def has_metrics(self) -> bool:
        return any(spec.family == "metrics" for spec in self.selected)

    @property
    def streams_in_order(self) -> bool:
        """Rows come out of the world by date: only another ORDER BY needs a sort."""
        order = self.query.order_by
        return not order or (len(order) == 1 and order[0] == gaql.Ordering("segments.date"))


def plan_query(query: gaql.Query, customer: Customer, today: dt.date) -> Plan:
    resource = _resource(query.resource)
    specs = catalog(customer)
    referenced = query.referenced()
    for name in referenced:
        if name not in specs:
            raise _unknown_field(name)
    _check_compatibility(query, resource)
    selected = [specs[name] for name in query.select]
    referenced_set = set(referenced)
    if customer.manager and referenced_set & ALL_METRICS:
        raise query_failure("REQUESTED_METRICS_FOR_MANAGER",
                            "Metrics cannot be requested for a manager account. To retrieve "
                            "metrics, issue separate requests against each client account "
                            "under the manager account.")
    grain, sources = _grain_and_sources(query.resource, set(query.select), referenced_set)
    plan = Plan(query, customer, selected, _emitted(query, selected, specs), grain, sources,
                None, None)
    try:
        _plan_conditions(plan, specs, today)
    except gaql.GaqlError as error:  # a value the grammar allows but the field does not
        raise query_failure(error.reason, error.message, error.trigger) from None
    _check_date_range(plan, today)
    plan.ordering = [(specs[o.field], o.descending) for o in query.order_by]
    return plan


def _resource(name: str) -> Resource:
    if name in RESOURCES:
        return RESOURCES[name]
    if name in _Row.DESCRIPTOR.fields_by_name and name not in ("segments", "metrics"):
        raise query_failure("QUERY_ERROR",
                            f"Resource '{name}' is a real Google Ads resource the convsync "
                            f"sandbox does not simulate; it serves: {', '.join(RESOURCES)}.",
                            name)
    raise query_failure("BAD_RESOURCE_TYPE_IN_FROM_CLAUSE",
                        f"Error in FROM clause: invalid resource name '{name}'.", name)


def _unknown_field(name: str) -> AdsFailure:
    if _real_field(name):
        return query_failure("QUERY_ERROR",
                             f"Field '{name}' is a real Google Ads field the convsync sandbox "
                             "does not simulate.", name)
    return query_failure("UNRECOGNIZED_FIELD", f"Unrecognized field in the query: '{name}'.", name)


def _real_field(name: str) -> bool:
    message: descriptor.Descriptor | None = _Row.DESCRIPTOR
    for part in name.split("."):
        if message is None or part.endswith("_"):  # ``type_`` is Python's name, not the API's
            return False
        found = message.fields_by_name.get(part) or message.fields_by_name.get(part + "_")
        if found is None:
            return False
        message = found.message_type
    return True


def _check_compatibility(query: gaql.Query, resource: Resource) -> None:
    """Refuse fields the FROM resource cannot be queried with, as the API does."""
    clauses = [(name, "SELECT") for name in query.select] + [
        (c.field, "WHERE") for c in query.where]
    _check_metrics(query, resource, [name for name, _ in clauses])
    for name, clause in clauses:
        _check_field(query, resource, name, clause)
    _check_ordering(query)


def _check_metrics(query: gaql.Query, resource: Resource, names: list[str]) -> None:
    bad = [name for name in names if name.startswith("metrics.") and name not in resource.metrics]
    conversion_segments = set(names) & CONVERSION_SEGMENTS
    if conversion_segments:  # clicks, impressions and cost cannot be split by conversion action
        bad += [name for name in names if name in DELIVERY_METRICS]
    if not bad:
        return
    bad = list(dict.fromkeys(bad))
    listed = ", ".join(f"'{name.split('.', 1)[1]}'" for name in bad)
    scope = [query.resource.upper()] + (["SEGMENTS.CONVERSION_ACTION"]
                                        if conversion_segments else [])
    raise query_failure(
        "PROHIBITED_METRIC_IN_SELECT_OR_WHERE_CLAUSE",
        f"Cannot select or filter on the following metrics: {listed} (could not support "
        f"requested resources: {', '.join(repr(s) for s in scope)}), since metric is "
        "incompatible with the resource in the FROM clause or other selected segmenting "
        "resources.", bad[0])


def _check_field(query: gaql.Query, resource: Resource, name: str, clause: str) -> None:
    family = name.split(".", 1)[0]
    if family == "segments" and name not in resource.segments:
        raise query_failure(
            "PROHIBITED_SEGMENT_IN_SELECT_OR_WHERE_CLAUSE",
            f"Cannot select or filter on the following segments: '{name}' (could not support "
            f"requested resources: '{query.resource.upper()}'), since segment is incompatible "
            "with the resource in the FROM clause or other selected segmenting resources.", name)
    if family not in ("segments", "metrics") and family not in resource.families:
        verb = "select" if clause == "SELECT" else "filter on"
        raise query_failure(
            f"PROHIBITED_RESOURCE_TYPE_IN_{clause}_CLAUSE",
            f"Cannot {verb} fields from the following resource: '{family}', since it is not "
            f"segmentable by or attributed to the resource in the FROM clause: "
            f"'{query.resource}'.", name)
    # a filter on a segment (but the core date one) or on a segmenting resource needs it selected
    must_select = (family == "segments" and name != "segments.date") or (
        family in resource.segmenting)
    if clause == "WHERE" and must_select and name not in query.select:
        raise _not_selected(name)


def _check_ordering(query: gaql.Query) -> None:
    """Rows sort by selected fields, or by attributes of a resource the query selects."""
    families = {query.resource} | {name.split(".", 1)[0] for name in query.select}
    for ordering in query.order_by:
        family = ordering.field.split(".", 1)[0]
        attribute = family not in ("segments", "metrics") and family in families
        if ordering.field not in query.select and not attribute:
            raise _not_selected(ordering.field)


def _not_selected(name: str) -> AdsFailure:
    return query_failure("EXPECTED_REFERENCED_FIELD_IN_SELECT_CLAUSE",
                         f"The following field must be present in SELECT clause: '{name}'.", name)


def _grain_and_sources(resource: str, selected: set[str],
                       referenced: set[str]) -> tuple[frozenset[str], frozenset[str]]:
    """What one row is about (the selected segments split it) and which world views feed it."""
    if resource == "click_view":
        return frozenset({"click"}), frozenset({"clicks"})
    metrics = referenced & ALL_METRICS
    main = {"campaign": "campaign", "customer": "customer", "conversion_action": "action"}
    grain = {main[resource]}
    if not metrics and not any(n.startswith("segments.") for n in referenced):
        return frozenset(grain), frozenset({f"list_{resource}"})
    if "segments.date" in selected:
        grain.add("date")
    if selected & CONVERSION_SEGMENTS:
        grain.add("action")
    sources = set()
    if metrics & CLICK_DATE_METRICS or not metrics & CONVERSION_DATE_METRICS:
        sources.add("by_click")
    if metrics & CONVERSION_DATE_METRICS:
        sources.add("by_conversion")
    if metrics & DELIVERY_METRICS or ("action" not in grain and resource != "conversion_action"):
        sources.add("delivery")  # a campaign day with clicks is a row even without conversions
    return frozenset(grain), frozenset(sources)


def _emitted(query: gaql.Query, selected: list[FieldSpec],
             specs: dict[str, FieldSpec]) -> list[FieldSpec]:
    """The selected fields plus the resource names the API returns unless told to omit them."""
    out = list(dict.fromkeys(selected))
    if query.parameters.get("omit_unselected_resource_names"):
        return out
    families = [query.resource] + [s.family for s in selected]
    for family in dict.fromkeys(families):
        name = f"{family}.resource_name"
        if family in RESOURCE_NAMED and specs[name] not in out:
            out.append(specs[name])
    return out


def _plan_conditions(plan: Plan, specs: dict[str, FieldSpec], today: dt.date) -> None:
    for condition in plan.query.where:
        spec = specs[condition.field]
        if spec.kind == "date":
            if condition.operator not in DATE_OPERATORS:
                raise _mismatch(spec, condition.operator)
            _narrow_dates(plan, condition, today)
            if condition.operator not in ("!=", "IN", "NOT IN"):
                continue  # the date range asked of the world is exactly this condition
        predicate = _predicate(spec, condition)
        if spec.family == "metrics":
            plan.metric_filters.append(predicate)
        else:
            plan.row_filters.append(predicate)


def _narrow_dates(plan: Plan, condition: gaql.Condition, today: dt.date) -> None:
    op, value = condition.operator, condition.value
    low: dt.date | None = None
    high: dt.date | None = None
    if op == "DURING":
        assert isinstance(value, gaql.Literal)
        low, high = gaql.date_range(value.text, today)
    elif op == "BETWEEN":
        assert isinstance(value, tuple)
        low, high = (_between_date(v) for v in value)
        if low > high:
            raise query_failure("DATE_RANGE_TOO_NARROW",
                                "Filters on date have a start date after end date.")
    elif op in ("=", ">=", ">", "<=", "<"):
        day = gaql.parse_date(value)
        step = dt.timedelta(days=1)
        low = {"=": day, ">=": day, ">": day + step}.get(op)
        high = {"=": day, "<=": day, "<": day - step}.get(op)
    elif op == "IN":
        assert isinstance(value, tuple)
        days = [gaql.parse_date(v) for v in value]
        low, high = min(days), max(days)
    if low is not None:
        plan.first = max(plan.first, low) if plan.first else low
    if high is not None:
        plan.last = min(plan.last, high) if plan.last else high


def _between_date(value: gaql.Scalar) -> dt.date:
    try:
        return gaql.parse_date(value)
    except gaql.GaqlError:
        raise query_failure("INVALID_VALUE_WITH_BETWEEN_OPERATOR",
                            f"Error in WHERE clause: BETWEEN value {value!r} is not a date.",
                            str(value)) from None


def _check_date_range(plan: Plan, today: dt.date) -> None:
    if plan.first and plan.last and plan.first > plan.last:
        raise query_failure("DATE_RANGE_TOO_NARROW",
                            "Filters on date have a start date after end date.")
    if plan.query.resource == "click_view":
        if plan.first is None or plan.first != plan.last:
            raise AdsFailure(grpc.StatusCode.INVALID_ARGUMENT, AdsError(
                "click_view_error", "EXPECTED_FILTER_ON_A_SINGLE_DAY",
                "Queries including ClickView must have a filter limiting the results to one "
                "day.", location="query"))
        if plan.first < today - dt.timedelta(days=CLICK_VIEW_MAX_AGE_DAYS):
            raise AdsFailure(grpc.StatusCode.INVALID_ARGUMENT, AdsError(
                "click_view_error", "DATE_TOO_OLD",
                f"The requested date is too old: ClickView serves the last "
                f"{CLICK_VIEW_MAX_AGE_DAYS} days.", plan.first.isoformat(), "query"))
    elif "segments.date" in plan.query.select and (plan.first is None or plan.last is None):
        raise query_failure("EXPECTED_FILTERS_ON_DATE_RANGE",
                            "Expects filters on the following field to limit a finite date "
                            "range: 'segments.date'.", "segments.date")


def _predicate(spec: FieldSpec, condition: gaql.Condition) -> Predicate:
    op, value = condition.operator, condition.value
    get = spec.get
    if op == "IS NULL":
        return lambda cell: get(cell) is None
    if op == "IS NOT NULL":
        return lambda cell: get(cell) is not None
    if op == "DURING" or op.startswith("CONTAINS") or (
            op in ("LIKE", "NOT LIKE", "REGEXP_MATCH", "NOT REGEXP_MATCH")
            and spec.kind != "string"):
        raise _mismatch(spec, op)  # DURING is for dates, CONTAINS for repeated fields
    if op in ("LIKE", "NOT LIKE", "REGEXP_MATCH", "NOT REGEXP_MATCH"):
        assert isinstance(value, str)
        pattern = re.compile(_like_regex(value) if "LIKE" in op else value, re.DOTALL)
        wanted = not op.startswith("NOT")
        return lambda cell: (pattern.fullmatch(get(cell)) is not None) == wanted
    if op in ("IN", "NOT IN"):
        assert isinstance(value, tuple)
        members = frozenset(_operand(spec, v) for v in value)
        wanted = op == "IN"
        return lambda cell: (get(cell) in members) == wanted
    if op == "BETWEEN":
        assert isinstance(value, tuple)
        low, high = (_operand(spec, v) for v in value)
        return lambda cell: low <= get(cell) <= high
    if spec.kind in ("enum", "bool") and op not in ("=", "!="):
        raise _mismatch(spec, op)
    operand = _operand(spec, value)
    compare = _COMPARE[op]
    return lambda cell: compare(get(cell), operand)


def _mismatch(spec: FieldSpec, operator: str) -> AdsFailure:
    return query_failure("OPERATOR_FIELD_MISMATCH",
                         f"Error in WHERE clause: operator {operator} cannot be used with "
                         f"field '{spec.name}'.", spec.name)


def _like_regex(pattern: str) -> str:
    """GAQL LIKE: % any run, _ one character, [x] the character x itself."""
    out = []
    for token in re.findall(r"\[.\]|.", pattern, re.DOTALL):
        if len(token) == 3:
            out.append(re.escape(token[1]))
        else:
            out.append({"%": ".*", "_": "."}.get(token, re.escape(token)))
    return "".join(out)


def _operand(spec: FieldSpec, value: object) -> Any:
    """A WHERE value as the field's Python type, refused the way the API refuses it."""
    kind = spec.kind
    if kind == "date":
        return gaql.parse_date(value)
    if kind == "string":
        if not isinstance(value, str):
            raise query_failure("INVALID_STRING_VALUE",
                                f"Error in WHERE clause: field '{spec.name}' needs a string "
                                f"value, not {_show(value)}.", _show(value))
        return value
    if kind in ("int", "double"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise query_failure("BAD_NUMBER", f"Error in WHERE clause: field '{spec.name}' "
                                f"needs a number, not {_show(value)}.", _show(value))
        return value
    if kind == "bool":
        text = value.text.upper() if isinstance(value, gaql.Literal) else ""
        if text not in ("TRUE", "FALSE"):
            raise query_failure("BAD_VALUE", f"Error in WHERE clause: field '{spec.name}' needs "
                                f"TRUE or FALSE, not {_show(value)}.", _show(value))
        return text == "TRUE"
    name = value.text if isinstance(value, gaql.Literal) else value
    if not isinstance(name, str) or name not in _enum_names(spec.name):
        raise query_failure("BAD_ENUM_CONSTANT",
                            f"Error in WHERE clause: invalid enum constant {_show(value)} for "
                            f"field '{spec.name}'.", _show(value))
    return name


def _show(value: object) -> str:
    return value.text if isinstance(value, gaql.Literal) else repr(value)


@lru_cache(maxsize=64)
def _enum_names(name: str) -> frozenset[str]:
    enum = _pb_field(name).enum_type
    return frozenset(enum.values_by_name) if enum else frozenset()


@lru_cache(maxsize=256)
def _pb_path(name: str) -> tuple[str, ...]:
    """GAQL path -> protobuf attribute names (``conversion_action.type`` -> ``type_``)."""
    message: descriptor.Descriptor = _Row.DESCRIPTOR
    path = []
    for part in name.split("."):
        found = message.fields_by_name.get(part) or message.fields_by_name[part + "_"]
        path.append(found.name)
        message = found.message_type
    return tuple(path)


def _pb_field(name: str) -> descriptor.FieldDescriptor:
    message: descriptor.Descriptor = _Row.DESCRIPTOR
    found: descriptor.FieldDescriptor | None = None
    for part in _pb_path(name):
        found = message.fields_by_name[part]
        message = found.message_type
    assert found is not None
    return found


# -- execution: cells out of the world ------------------------------------------------------
def iter_cells(plan: Plan, world: World, today: dt.date) -> Iterator[Cell]:
    """The result rows of a plan, filtered and in order, before LIMIT and serialization."""
    cells = _source_cells(plan, world, today)
    if plan.row_filters:
        cells = (cell for cell in cells if all(p(cell) for p in plan.row_filters))
    if plan.sources & {"delivery", "by_click", "by_conversion"}:
        cells = _aggregate(cells, plan.grain)
    if plan.metric_filters:
        cells = (cell for cell in cells if all(p(cell) for p in plan.metric_filters))
    if not plan.streams_in_order:
        cells = iter(_sorted(list(cells), plan.ordering))
    return cells


def _source_cells(plan: Plan, world: World, today: dt.date) -> Iterator[Cell]:
    if plan.customer.manager:  # a manager account owns no campaigns of its own
        return iter([Cell()] if plan.sources == {"list_customer"} else [])
    if plan.sources == {"list_customer"}:
        return iter([Cell()])
    if plan.sources == {"list_campaign"}:
        return (Cell(campaign=c) for c in world.campaigns_on(PLATFORM))
    if plan.sources == {"list_conversion_action"}:
        return (Cell(action=a) for a in world.google_ads_actions)
    if plan.sources == {"clicks"}:
        assert plan.first is not None
        return (Cell(date=c.date, campaign=c.campaign, click=c, metrics=_one_click())
                for c in world.google_ads_clicks(plan.first))
    first = plan.first or world.start - dt.timedelta(days=1)
    last = min(plan.last or today, today)
    return _facts(world, plan.sources, first, last)


def _one_click() -> list[float]:
    metrics = _zeros()
    metrics[0] = 1.0
    return metrics


FactKey = tuple[dt.date, int, int]


def _facts(world: World, sources: frozenset[str], first: dt.date,
           last: dt.date) -> Iterator[Cell]:
    """Per day, campaign and action (-1: delivery), every requested basis joined in one cell."""
    streams: list[Iterator[tuple[FactKey, Cell]]] = []
    if "delivery" in sources:
        streams.append(_delivery_facts(world, first, last))
    if "by_click" in sources:
        streams.append(_stat_facts(world, first, last, by_conversion_date=False))
    if "by_conversion" in sources:
        streams.append(_stat_facts(world, first, last, by_conversion_date=True))
    if len(streams) == 1:
        yield from (cell for _, cell in streams[0])
        return
    current: tuple[FactKey, Cell] | None = None
    for key, cell in heapq.merge(*streams, key=itemgetter(0)):
        if current is not None and current[0] == key:
            current[1].metrics = [a + b for a, b in zip(current[1].metrics, cell.metrics,
                                                         strict=True)]
            continue
        if current is not None:
            yield current[1]
        current = (key, cell)
    if current is not None:
        yield current[1]


def _delivery_facts(world: World, first: dt.date,
                    last: dt.date) -> Iterator[tuple[FactKey, Cell]]:
    for row in world.google_ads_delivery(first, last):
        metrics = _zeros()
        metrics[0:3] = (row.clicks, row.impressions, row.cost_micros)
        yield (row.date, row.campaign.index, -1), Cell(row.date, row.campaign, None, None, metrics)


def _stat_facts(world: World, first: dt.date, last: dt.date, *,
                by_conversion_date: bool) -> Iterator[tuple[FactKey, Cell]]:
    offset = 7 if by_conversion_date else 3
    for stat in world.google_ads_stats(first, last, by_conversion_date=by_conversion_date):
        metrics = _zeros()
        metrics[offset:offset + 4] = (stat.conversions, stat.conversions_value,
                                      stat.all_conversions, stat.all_conversions_value)
        yield ((stat.date, stat.campaign.index, stat.action.id),
               Cell(stat.date, stat.campaign, stat.action, None, metrics))


def _aggregate(cells: Iterable[Cell], grain: frozenset[str]) -> Iterator[Cell]:
    """Sum the facts (which come in date order) into one cell per row of the query's grain."""
    if grain == {"date", "campaign", "action"}:
        yield from cells  # facts are already one per row
        return
    by_date = "date" in grain
    keep_campaign, keep_action = "campaign" in grain, "action" in grain
    groups: dict[tuple[int, int], Cell] = {}
    current: dt.date | None = None
    for cell in cells:
        if by_date and cell.date != current:
            yield from _flush(groups)
            current = cell.date
        campaign = cell.campaign if keep_campaign else None
        action = cell.action if keep_action else None
        key = (campaign.index if campaign else -1, action.id if action else -1)
        into = groups.get(key)
        if into is None:
            groups[key] = Cell(cell.date if by_date else None, campaign, action, None,
                               list(cell.metrics))
        else:
            into.metrics = [a + b for a, b in zip(into.metrics, cell.metrics, strict=True)]
    yield from _flush(groups)


def _flush(groups: dict[tuple[int, int], Cell]) -> Iterator[Cell]:
    for key in sorted(groups):
        yield groups[key]
    groups.clear()


def _sorted(cells: list[Cell], ordering: list[tuple[FieldSpec, bool]]) -> list[Cell]:
    for spec, descending in reversed(ordering):  # stable sorts, last key first
        cells.sort(key=spec.get, reverse=descending)
    return cells


# -- serialization --------------------------------------------------------------------------
_ONE_BYTE = [bytes((i,)) for i in range(128)]


def _varint(value: int) -> bytes:
    if 0 <= value < 128:
        return _ONE_BYTE[value]
    value &= (1 << 64) - 1  # negative int64 as ten bytes, like protobuf
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def frame_results(rows: Sequence[bytes]) -> bytes:
    """``results`` (field 1 of both response messages) as wire bytes, one record per row."""
    return b"".join(b"\x0a" + _varint(len(row)) + row for row in rows)


Setter = Callable[[Any, Any], None]


def _setter(spec: FieldSpec) -> Setter:
    path = _pb_path(spec.name)
    enum = _pb_field(spec.name).enum_type

    def assign(row: Any, value: Any) -> None:
        target = row
        for part in path[:-1]:
            target = getattr(target, part)
        if enum is not None:
            value = enum.values_by_name[value].number
        elif spec.kind == "date":
            value = value.isoformat()
        setattr(target, path[-1], value)

    return assign


_DOUBLE = struct.Struct("<d").pack


def _wire_value(field_descriptor: descriptor.FieldDescriptor,
                kind: str) -> tuple[int, Callable[[Any], bytes]]:
    """(wire type, encoder) of a scalar field, for the kinds the catalog's dynamic fields use."""
    if field_descriptor.type == descriptor.FieldDescriptor.TYPE_DOUBLE:
        return 1, _DOUBLE
    if field_descriptor.type == descriptor.FieldDescriptor.TYPE_STRING:
        def text(value: Any) -> bytes:
            raw = (value.isoformat() if kind == "date" else value).encode()
            return _varint(len(raw)) + raw
        return 2, text
    assert field_descriptor.type == descriptor.FieldDescriptor.TYPE_INT64, field_descriptor.name
    return 0, _varint


def _wire_encoder(specs: Sequence[FieldSpec]) -> Callable[[Cell], bytes]:
    """A GoogleAdsRow holding ``specs`` (scalars one level down, e.g. ``metrics.clicks``)
    written straight as wire bytes: this part is new on every row, so it is the hot path."""
    groups: dict[str, list[tuple[bytes, Callable[[Cell], Any], Callable[[Any], bytes]]]] = {}
    for spec in specs:
        parent, _ = _pb_path(spec.name)
        field_descriptor = _pb_field(spec.name)
        wire_type, encode_value = _wire_value(field_descriptor, spec.kind)
        tag = _varint(field_descriptor.number << 3 | wire_type)
        groups.setdefault(parent, []).append((tag, spec.get, encode_value))
    parents = [(_varint(_Row.DESCRIPTOR.fields_by_name[name].number << 3 | 2), fields)
               for name, fields in groups.items()]

    def encode(cell: Cell) -> bytes:
        out = []
        for parent_tag, fields in parents:
            body = b"".join([tag + encode_value(get(cell)) for tag, get, encode_value in fields])
            out.append(parent_tag + _varint(len(body)) + body)
        return b"".join(out)

    return encode


class RowEncoder:
    """Cells -> serialized GoogleAdsRow bytes holding exactly the emitted fields."""

    def __init__(self, emitted: Sequence[FieldSpec]) -> None:
        self.static = [(spec.get, _setter(spec)) for spec in emitted if spec.static]
        self.dynamic = _wire_encoder([spec for spec in emitted if not spec.static])
        self._cache: dict[tuple[int, int], bytes] = {}

    def encode(self, cell: Cell) -> bytes:
        key = (cell.campaign.index if cell.campaign else -1,
               cell.action.id if cell.action else -1)
        head = self._cache.get(key)
        if head is None:
            row = _Row()
            for get, assign in self.static:
                assign(row, get(cell))
            head = self._cache[key] = row.SerializeToString()
        return head + self.dynamic(cell)


def summary_row(plan: Plan, totals: list[float]) -> Any:
    """The summary GoogleAdsRow: every selected metric summed over the result rows."""
    row = _Row()
    cell = Cell(metrics=totals)
    for spec in plan.selected:
        if spec.family == "metrics":
            _setter(spec)(row, spec.get(cell))
    return row


class ResultRows:
    """A plan's result as serialized rows, with LIMIT applied (and metric totals when asked)."""

    def __init__(self, plan: Plan, world: World, today: dt.date, *,
                 with_totals: bool = False) -> None:
        self.plan = plan
        self.totals = _zeros()
        self._with_totals = with_totals
        self._cells = iter_cells(plan, world, today)
        self._encoder = RowEncoder(plan.emitted)
        self._left = plan.query.limit
        self._ahead: bytes | None = None

    def __iter__(self) -> Iterator[bytes]:
        return self

    def has_more(self) -> bool:
        """Read one row ahead (kept for the next call) to tell whether any is left."""
        if self._ahead is None:
            self._ahead = next(self, None)
        return self._ahead is not None

    def __next__(self) -> bytes:
        if self._ahead is not None:
            row, self._ahead = self._ahead, None
            return row
        if self._left is not None:
            if self._left <= 0:
                raise StopIteration
            self._left -= 1
        cell = next(self._cells)
        if self._with_totals:
            self.totals = [a + b for a, b in zip(self.totals, cell.metrics, strict=True)]
        return self._encoder.encode(cell)

    def take(self, count: int) -> list[bytes]:
        out = []
        for row in self:
            out.append(row)
            if len(out) == count:
                break
        return out


def field_mask_paths(plan: Plan) -> list[str]:
    return [spec.name for spec in plan.selected]


# -- the service ----------------------------------------------------------------------------
def account_today(world: World) -> dt.date:
    """The world's current date in the Google Ads account's time zone."""
    return world.as_of.astimezone(ZoneInfo(world.accounts.google_ads_tz)).date()


@dataclass
class _Cursor:
    rows: ResultRows
    served: int
    total: int | None


def _fresh_cursor(plan: Plan, world: World, today: dt.date, settings: Any) -> _Cursor:
    total = (sum(1 for _ in iter_cells(plan, world, today))
             if settings.return_total_results_count else None)
    rows = ResultRows(plan, world, today, with_totals=settings.return_summary_row)
    return _Cursor(rows, 0, total)


class GoogleAdsService:
    """``Search`` and ``SearchStream`` of GoogleAdsService, over one sandbox."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self._cursors: OrderedDict[str, _Cursor] = OrderedDict()
        self._lock = threading.Lock()

    # -- gRPC entry points -----------------------------------------------------------------
    def search(self, request: Any, context: grpc.ServicerContext) -> bytes:
        request_id = new_request_id()
        try:
            customer = begin_call(self.sandbox, context, "Search", request.customer_id)
            response = self._search(request, customer, request_id)
        except (AdsFailure, TransportFailure) as failure:
            abort(context, failure, request_id)
        except Exception:  # a simulator bug: answer like an API outage, keep the trace
            log.error("sandbox google_ads Search failed\n%s", traceback.format_exc())
            abort(context, _internal_failure(), request_id)
        context.set_trailing_metadata((("request-id", request_id),))
        return response

    def search_stream(self, request: Any, context: grpc.ServicerContext) -> Iterator[bytes]:
        request_id = new_request_id()
        try:
            customer = begin_call(self.sandbox, context, "SearchStream", request.customer_id)
            batches = self._stream(request, customer, request_id)
            first = next(batches)  # plan errors surface before anything is sent
        except (AdsFailure, TransportFailure) as failure:
            abort(context, failure, request_id)
        except Exception:
            log.error("sandbox google_ads SearchStream failed\n%s", traceback.format_exc())
            abort(context, _internal_failure(), request_id)
        yield first
        yield from batches

    # -- Search ----------------------------------------------------------------------------
    def _search(self, request: Any, customer: Customer, request_id: str) -> bytes:
        if request.page_size:
            raise AdsFailure(grpc.StatusCode.INVALID_ARGUMENT, AdsError(
                "request_error", "PAGE_SIZE_NOT_SUPPORTED",
                "Setting the page size is not supported: pages hold 10,000 rows.",
                location="page_size"))
        world = self.sandbox.world
        today = account_today(world)
        plan = plan_query(_parse(request.query), customer, today)
        settings = request.search_settings
        want_total = settings.return_total_results_count
        want_summary = settings.return_summary_row
        if want_summary and not plan.has_metrics:
            raise AdsFailure(grpc.StatusCode.INVALID_ARGUMENT, AdsError(
                "request_error", "CANNOT_RETURN_SUMMARY_ROW_FOR_REQUEST_WITHOUT_METRICS",
                "return_summary_row cannot be enabled if request did not select any metrics "
                "field."))
        response = _SearchResponse()
        response.field_mask.paths.extend(field_mask_paths(plan))
        if request.validate_only:
            return self._validate_only(request, response)
        fingerprint = _fingerprint(customer.id, request.query)
        cursor = self._cursor(request, plan, world, today, fingerprint)
        rows = cursor.rows.take(PAGE_SIZE)
        cursor.served += len(rows)
        if want_total:
            response.total_results_count = cursor.total or 0
        if cursor.rows.has_more():
            token = _token(fingerprint, cursor.served, want_total, want_summary)
            response.next_page_token = token
            with self._lock:
                self._cursors[token] = cursor
                while len(self._cursors) > OPEN_CURSORS:
                    self._cursors.popitem(last=False)
        elif want_summary:
            response.summary_row.CopyFrom(summary_row(plan, cursor.rows.totals))
        if settings.omit_results:
            rows = []
        return frame_results(rows) + response.SerializeToString()

    @staticmethod
    def _validate_only(request: Any, response: Any) -> bytes:
        if request.page_token:
            raise AdsFailure(grpc.StatusCode.INVALID_ARGUMENT, AdsError(
                "request_error", "VALIDATE_ONLY_REQUEST_HAS_PAGE_TOKEN",
                "page_token is set in the validate only request", location="page_token"))
        if request.search_settings.return_summary_row:
            raise AdsFailure(grpc.StatusCode.INVALID_ARGUMENT, AdsError(
                "request_error", "CANNOT_RETURN_SUMMARY_ROW_FOR_VALIDATE_ONLY_REQUESTS",
                "return_summary_row should not be enabled for validate only requests."))
        return response.SerializeToString()

    def _cursor(self, request: Any, plan: Plan, world: World, today: dt.date,
                fingerprint: str) -> _Cursor:
        """The open result set a page token continues, or a new one for a first page."""
        settings = request.search_settings
        if not request.page_token:
            return _fresh_cursor(plan, world, today, settings)
        offset = _check_token(request.page_token, fingerprint, settings)
        with self._lock:
            cursor = self._cursors.pop(request.page_token, None)
        if cursor is None:  # evicted: recompute and skip what was served
            cursor = _fresh_cursor(plan, world, today, settings)
            for _ in range(offset):
                next(cursor.rows, None)
            cursor.served = offset
        return cursor

    # -- SearchStream ----------------------------------------------------------------------
    def _stream(self, request: Any, customer: Customer, request_id: str) -> Iterator[bytes]:
        world = self.sandbox.world
        today = account_today(world)
        plan = plan_query(_parse(request.query), customer, today)
        summary = _SUMMARY_SETTINGS.get(request.summary_row_setting, "none")
        if summary != "none" and not plan.has_metrics:
            raise AdsFailure(grpc.StatusCode.INVALID_ARGUMENT, AdsError(
                "request_error", "CANNOT_RETURN_SUMMARY_ROW_FOR_REQUEST_WITHOUT_METRICS",
                "return_summary_row cannot be enabled if request did not select any metrics "
                "field."))
        tail = _StreamResponse(request_id=request_id)
        tail.field_mask.paths.extend(field_mask_paths(plan))
        head = tail.SerializeToString()
        rows = ResultRows(plan, world, today, with_totals=summary != "none")
        if summary == "only":
            for _ in rows:  # only the totals are sent
                pass
        while True:
            batch = rows.take(PAGE_SIZE)
            if rows.has_more():
                yield frame_results(batch) + head
                continue
            if summary != "none":
                tail.summary_row.CopyFrom(summary_row(plan, rows.totals))
            yield frame_results(batch) + tail.SerializeToString()
            return


def _parse(text: str) -> gaql.Query:
    try:
        return gaql.parse(text)
    except gaql.GaqlError as error:
        raise query_failure(error.reason, error.message, error.trigger) from None


def _internal_failure() -> AdsFailure:
    return AdsFailure(grpc.StatusCode.INTERNAL, AdsError(
        "internal_error", "INTERNAL_ERROR", "Internal error encountered."))


def _fingerprint(customer_id: str, query: str) -> str:
    return hashlib.sha256(f"{customer_id}\n{query}".encode()).hexdigest()[:16]


def _token(fingerprint: str, offset: int, total: bool, summary: bool) -> str:
    raw = f"{fingerprint}:{offset}:{int(total)}{int(summary)}:{secrets.token_hex(4)}"
    return base64.urlsafe_b64encode(raw.encode()).decode()


def _check_token(token: str, fingerprint: str, settings: Any) -> int:
    """The offset a page token resumes at, if it belongs to this very query."""
    try:
        mark, offset, flags, _ = base64.urlsafe_b64decode(token.encode()).decode().split(":")
        position = int(offset)
    except ValueError:
        position, mark, flags = -1, "", ""
    if mark != fingerprint or position < 0 or len(flags) != 2:
        raise AdsFailure(grpc.StatusCode.INVALID_ARGUMENT, AdsError(
            "request_error", "INVALID_PAGE_TOKEN",
            "Next page token specified in user request is invalid.", location="page_token"))
    if settings.return_total_results_count and flags[0] == "0":
        raise AdsFailure(grpc.StatusCode.INVALID_ARGUMENT, AdsError(
            "request_error", "TOTAL_RESULTS_COUNT_NOT_ORIGINALLY_REQUESTED",
            "The total results count cannot be returned if it was not requested in the "
            "original request."))
    if settings.return_summary_row != (flags[1] == "1"):
        raise AdsFailure(grpc.StatusCode.INVALID_ARGUMENT, AdsError(
            "request_error", "INCONSISTENT_RETURN_SUMMARY_ROW_VALUE",
            "return_summary_row parameter value should be the same between requests with "
            "page_token field set and their original request."))
    return position


# -- the server -----------------------------------------------------------------------------
def google_ads_handler(sandbox: Sandbox) -> grpc.GenericRpcHandler:
    """GoogleAdsService's methods, to add to any gRPC server."""
    service = GoogleAdsService(sandbox)
    return grpc.method_handlers_generic_handler(SERVICE, {
        "Search": grpc.unary_unary_rpc_method_handler(
            service.search, request_deserializer=SearchGoogleAdsRequest.pb().FromString),
        "SearchStream": grpc.unary_stream_rpc_method_handler(
            service.search_stream,
            request_deserializer=SearchGoogleAdsStreamRequest.pb().FromString),
    })


def build_google_ads_server(sandbox: Sandbox, cert: Path, key: Path, host: str = "127.0.0.1",
                            port: int = 0, *, extra_handlers: Sequence[grpc.GenericRpcHandler] = (),
                            max_workers: int = 8) -> tuple[grpc.Server, int]:
    """Start a TLS gRPC server with GoogleAdsService (and ``extra_handlers``): (server, port)."""
    server = grpc.server(ThreadPoolExecutor(max_workers=max_workers,
                                            thread_name_prefix="sandbox-google-ads"))
    server.add_generic_rpc_handlers((google_ads_handler(sandbox), *extra_handlers))
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    bound = server.add_secure_port(f"{host}:{port}", credentials)
    server.start()
    return server, bound
