"""The Data Manager API simulator: ``IngestionService.IngestEvents`` and ``RetrieveRequestStatus``.

It answers the official ``google-ads-datamanager`` client over gRPC (service
``google.ads.datamanager.v1.IngestionService``, on the sandbox's TLS gRPC server) and over REST
(``POST /v1/events:ingest``, ``GET /v1/requestStatus:retrieve?requestId=...``, proto3 JSON),
for the world's Google Ads account: offline click conversions and enhanced conversions for
leads, sent to UPLOAD_CLICKS conversion actions.

What it does as the API does:

- Fast fail: one bad event, destination or limit rejects the whole request before anything is
  processed, as a ``google.rpc.Status`` whose details carry an ``ErrorInfo`` (the Data Manager
  ``ErrorReason`` name, domain ``datamanager.googleapis.com``), a ``BadRequest`` with one field
  violation per problem (snake_case paths such as ``events[3].event_source``; the first 100)
  and a ``RequestInfo`` with the request id. gRPC sends it in ``grpc-status-details-bin``,
  REST as ``{"error": {"code", "message", "status", "details"}}``, so the SDK raises the
  matching ``google.api_core.exceptions`` class with ``.reason`` and ``.details``.
- Asynchronous results: an accepted request gets a ``request_id``; its status stays
  PROCESSING until ``processing_delay_minutes`` have passed on the world's clock, then each
  destination (in request order) is SUCCESS, PARTIAL_SUCCESS or FAILED with its record count
  and error counts by ``ProcessingErrorReason``. Which events fail is never said.
- Matching: a gclid is looked up among the world's clicks (``World.find_clicks``); a
  user-data-only event (enhanced conversions for leads) is matched by its hashed email to a
  Google click of the same person inside the action's window (``World.find_email_clicks``);
  phone numbers and addresses never match (the world has none). Accepted events become
  conversions in ``World.uploads`` and show in the Google Ads simulator's stats for that action
  once processed, attributed to the click's campaign.
- Dedupe: the same ``transaction_id`` sent again to the same action restates it (value and
  currency overwritten, count unchanged), or changes nothing when the value is the same (a
  resend); twice in one request the second is DUPLICATE_TRANSACTION_ID. Without a
  transaction id, the same identifier and conversion time again is DUPLICATE_GCLID.
- Quotas per (sandbox) Cloud project, on the wall clock: 300 writes a minute and 100,000 a day,
  the same again for reads; beyond, RESOURCE_EXHAUSTED / HTTP 429 in Google's quota shape
  (``ErrorInfo`` RATE_LIMIT_EXCEEDED, domain ``googleapis.com``). Faults injected on platform
  ``datamanager`` answer the same way (``rate_limit``: per minute, ``exhausted``: per day),
  UNAVAILABLE / 503 (``server_error``) or late (``slow``).

Fidelity decisions are listed in docs/sandbox.md (the fidelity table)."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import logging
import re
import threading
import time
import traceback
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal, NoReturn
from urllib.parse import unquote
from zoneinfo import ZoneInfo

import grpc
from google.ads.datamanager_v1.types import (
    IngestEventsRequest,
    IngestEventsResponse,
    ProcessingErrorReason,
    RequestStatusPerDestination,
    RetrieveRequestStatusRequest,
    RetrieveRequestStatusResponse,
)
from google.protobuf import any_pb2, json_format
from google.rpc import error_details_pb2, status_pb2

from convsync.sandbox.control import Fault, Sandbox
from convsync.sandbox.http import ApiError, Handler, Request, Response, serve_rest
from convsync.sandbox.uploads import ClickRef
from convsync.sandbox.world import DAY, GoogleAdsAction, World

log = logging.getLogger(__name__)

PLATFORM = "datamanager"
SERVICE = "google.ads.datamanager.v1.IngestionService"
DOMAIN = "datamanager.googleapis.com"
PROJECT_NUMBER = "480913274016"
"""The sandbox's Cloud project, named in quota errors."""
MAX_EVENTS = 2_000
MAX_DESTINATIONS = 10
MAX_IDENTIFIERS = 10
MAX_VIOLATIONS = 100
NEW_ACTION_HOURS = 6
"""A conversion action accepts uploads about 6 hours after it was created."""
RECENT_CLICK_HOURS = 6
"""A click younger than this is refused (TOO_RECENT_CLICK)."""
MAX_EVENT_AGE_DAYS = 90
LIMITS_URL = "https://developers.google.com/data-manager/api/devguides/limits"

_IngestRequest = IngestEventsRequest.pb()
_IngestResponse = IngestEventsResponse.pb()
_RetrieveRequest = RetrieveRequestStatusRequest.pb()
_RetrieveResponse = RetrieveRequestStatusResponse.pb()
_Status = RequestStatusPerDestination.pb()
_RequestStatus = RequestStatusPerDestination.RequestStatus

GOOGLE_ADS = 1  # ProductAccount.AccountType.GOOGLE_ADS and the deprecated Product.GOOGLE_ADS
CONSENT_DENIED = 2
HEX, BASE64 = 1, 2

_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.INTERNAL: 500, grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
}
_INVALID_ARGUMENT = "Request contains an invalid argument."
_UNAVAILABLE = "The service is currently unavailable."
_INTERNAL = "Internal error encountered."
_INVALID_CREDENTIALS = (
    "Request had invalid authentication credentials. Expected OAuth 2 access token, login "
    "cookie or other valid authentication credential. See "
    "https://developers.google.com/identity/sign-in/web/devconsole-project.")
_INSUFFICIENT_SCOPES = "Request had insufficient authentication scopes."
DATAMANAGER_SCOPE = "https://www.googleapis.com/auth/datamanager"
EXPIRED_TOKEN = "expired"
"""A bearer token the sandbox treats as expired (UNAUTHENTICATED, ACCESS_TOKEN_EXPIRED)."""
NO_SCOPE_TOKEN = "no-datamanager-scope"
"""A bearer token granted without the datamanager scope (PERMISSION_DENIED,
ACCESS_TOKEN_SCOPE_INSUFFICIENT): a user who consented to the Google Ads scope only."""

_CURRENCY = re.compile(r"[A-Z]{3}")
_CLICK_ID = re.compile(r"[A-Za-z0-9_\-]{10,}")
"""What decodes as a click id (gclid / gbraid / wbraid): URL-safe base64, long enough."""
_HEX = re.compile(r"[0-9A-Fa-f]*")


# -- errors ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Violation:
    """One ``BadRequest.FieldViolation``: the field, why (an ErrorReason name), in words."""

    field: str
    reason: str
    description: str


class DmError(Exception):
    """A whole request refused: a canonical code and the standard error details."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str, *,
                 domain: str = DOMAIN, metadata: dict[str, str] | None = None,
                 violations: Sequence[Violation] = (), help_url: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata = metadata or {}
        self.violations = list(violations)
        self.help_url = help_url

    def status(self, request_id: str) -> Any:
        """The ``google.rpc.Status`` the API answers with."""
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        details: list[Any] = [error_details_pb2.ErrorInfo(
            reason=self.reason, domain=self.domain, metadata=self.metadata)]
        if self.violations:
            details.append(error_details_pb2.BadRequest(field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description, reason=v.reason)
                for v in self.violations[:MAX_VIOLATIONS]]))
        if self.help_url:
            details.append(error_details_pb2.Help(links=[error_details_pb2.Help.Link(
                description="Data Manager API limits", url=self.help_url)]))
        details.append(error_details_pb2.RequestInfo(request_id=request_id))
        for detail in details:
            packed = any_pb2.Any()
            packed.Pack(detail)
            status.details.append(packed)
        return status

    def rest_body(self, request_id: str) -> dict[str, Any]:
        status = json_format.MessageToDict(self.status(request_id))
        return {"error": {"code": _HTTP_STATUS.get(self.code, 500), "message": self.message,
                          "status": self.code.name, "details": status.get("details", [])}}


def invalid(violations: Sequence[Violation]) -> DmError:
    """INVALID_ARGUMENT for these field violations (the first one names the reason)."""
    first = violations[0]
    more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
    return DmError(grpc.StatusCode.INVALID_ARGUMENT,
                   f"{_INVALID_ARGUMENT} {first.field}: {first.description}{more}",
                   first.reason, violations=violations)


def quota_error(limit: str, value: int) -> DmError:
    """Google's quota answer (the service infrastructure's, not the Data Manager's own)."""
    per = "minute" if limit == "minute" else "day"
    name = f"Requests per {per} per project"
    return DmError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"Quota exceeded for quota metric 'Requests' and limit '{name}' of service "
        f"'{DOMAIN}' for consumer 'project_number:{PROJECT_NUMBER}'.",
        "RATE_LIMIT_EXCEEDED", domain="googleapis.com",
        metadata={"service": DOMAIN, "consumer": f"projects/{PROJECT_NUMBER}",
                  "quota_metric": f"{DOMAIN}/requests", "quota_limit": name,
                  "quota_limit_value": str(value), "quota_location": "global"},
        help_url=LIMITS_URL)


def fault_error(fault: Fault, config: DataManagerConfig) -> DmError:
    """The API's answer for an injected fault (``slow`` is played by the caller)."""
    if fault.kind == "rate_limit":
        return quota_error("minute", config.writes_per_minute)
    if fault.kind == "exhausted":
        return quota_error("day", config.writes_per_day)
    return DmError(grpc.StatusCode.UNAVAILABLE, _UNAVAILABLE, "UNAVAILABLE",
                   domain="googleapis.com")


def _unimplemented(what: str) -> DmError:
    return DmError(grpc.StatusCode.UNIMPLEMENTED,
                   f"{what} is a real Data Manager API feature the convsync sandbox does not "
                   "simulate.", "NOT_SIMULATED", domain="sandbox.convsync")


# -- configuration, quotas and counters ------------------------------------------------------
@dataclass
class DataManagerConfig:
    processing_delay_minutes: float = 30.0
    """World minutes between an accepted request and its results (real: about 30)."""
    writes_per_minute: int = 300
    writes_per_day: int = 100_000
    reads_per_minute: int = 300
    reads_per_day: int = 100_000
    status_days: int = 50
    """Statuses older than this (world days) answer REQUEST_TOO_OLD."""
    forget_days: int = 60
    """Requests older than this are forgotten (NOT_FOUND)."""


class _Quota:
    """One project's requests of a kind (writes or reads): a sliding minute and the day in
    America/Los_Angeles (Google's quota days end at midnight Pacific), on the wall clock."""

    _PACIFIC = ZoneInfo("America/Los_Angeles")

    def __init__(self) -> None:
        self.minute: deque[float] = deque()
        self.day = ""
        self.used_today = 0

    def take(self, per_minute: int, per_day: int) -> DmError | None:
        now = time.monotonic()
        while self.minute and self.minute[0] <= now - 60.0:
            self.minute.popleft()
        today = dt.datetime.now(self._PACIFIC).date().isoformat()
        if today != self.day:
            self.day, self.used_today = today, 0
        if self.used_today >= per_day:
            return quota_error("day", per_day)
        if len(self.minute) >= per_minute:
            return quota_error("minute", per_minute)
        self.minute.append(now)
        self.used_today += 1
        return None


@dataclass
class TransactionCounts:
    """What the sandbox did with the events carrying one transaction id for one action."""

    events: int = 0  # events received with it (in accepted, executed requests)
    conversions: int = 0  # 1 once a conversion was created under it
    adjustments: int = 0  # restatements (value or currency changed; also the Google Ads API's)
    duplicates: int = 0  # resends that changed nothing (same value and currency)
    errors: int = 0  # events with it that failed processing
    value: float = 0.0  # the value last accepted
    currency: str = ""
    retractions: int = 0  # 1 once the Google Ads API retracted it (adjustments.py)


@dataclass
class _Counters:
    ingested_requests: int = 0
    validate_only: int = 0
    events: int = 0
    rejections: Counter[str] = field(default_factory=Counter)
    processing_errors: Counter[str] = field(default_factory=Counter)
    transactions: dict[tuple[int, str], TransactionCounts] = field(default_factory=dict)
    without_transaction_id: Counter[str] = field(default_factory=Counter)


# -- stored requests ---------------------------------------------------------------------------
@dataclass
class _Outcome:
    """One destination of an accepted request, as processing will report it."""

    destination: bytes  # the Destination as sent, echoed in the status
    record_count: int = 0
    errors: Counter[int] = field(default_factory=Counter)  # ProcessingErrorReason -> events


@dataclass
class _Stored:
    request_id: str
    received_ts: float  # world clock
    due_ts: float  # world clock: processed from then on
    outcomes: list[_Outcome]


@dataclass
class _Event:
    """An event of a request, parsed once."""

    index: int
    message: Any
    ts: float
    targets: list[int]  # destination indexes it goes to


# -- the service ---------------------------------------------------------------------------------
class DataManager:
    """The Data Manager API of one sandbox: validation, processing, statuses, quotas, counters.

    Both front ends (gRPC and REST) call :meth:`begin`, then :meth:`ingest_events` or
    :meth:`retrieve_request_status` with raw protobuf messages. Thread-safe."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.config = DataManagerConfig()
        self._lock = threading.RLock()
        self._requests: OrderedDict[str, _Stored] = OrderedDict()
        self._quota = {"write": _Quota(), "read": _Quota()}
        self._counters = _Counters()

    @property
    def world(self) -> World:
        return self.sandbox.world

    # -- what every call does --------------------------------------------------------------
    def begin(self, method: str, authorization: str | None) -> None:
        """Check the credentials and charge the quota (after the caller counted the request and
        played its fault). Raises DmError the way the API refuses the call."""
        try:
            _check_credentials(authorization)
            config = self.config
            with self._lock:
                if method == "IngestEvents":
                    refused = self._quota["write"].take(config.writes_per_minute,
                                                        config.writes_per_day)
                else:
                    refused = self._quota["read"].take(config.reads_per_minute,
                                                       config.reads_per_day)
            if refused is not None:
                raise refused
        except DmError as error:
            self.reject(error)
            raise

    def reject(self, error: DmError) -> None:
        """Count a whole-request refusal by its reason."""
        with self._lock:
            self._counters.rejections[error.reason] += 1

    def fault(self, fault: Fault) -> DmError:
        error = fault_error(fault, self.config)
        self.reject(error)
        return error

    # -- IngestEvents ----------------------------------------------------------------------
    def ingest_events(self, request: Any) -> Any:
        """Validate the whole request (DmError if anything is wrong), then, unless
        ``validate_only``, decide every event's fate now and report it once processed."""
        try:
            with self._lock:
                return self._ingest(request)
        except DmError as error:
            self.reject(error)
            raise

    def _ingest(self, request: Any) -> Any:
        world = self.world
        if request.HasField("encryption_info"):
            raise _unimplemented("Encrypted user data (encryption_info)")
        actions = self._check_destinations(request)
        events = _check_events(request, world, actions)
        response = _IngestResponse()
        if request.validate_only:
            self._counters.validate_only += 1
            return response
        now = world.as_of_ts
        stored = _Stored(str(uuid.uuid4()), now,
                         now + self.config.processing_delay_minutes * 60.0,
                         [_Outcome(d.SerializeToString()) for d in request.destinations])
        self._process(request, events, actions, stored)
        self._forget_old(now)
        self._requests[stored.request_id] = stored
        self._counters.ingested_requests += 1
        self._counters.events += len(events)
        response.request_id = stored.request_id
        return response

    def _check_destinations(self, request: Any) -> list[GoogleAdsAction]:
        """Each destination's conversion action, after the structural, access and action
        checks (each stage refuses the request on its own)."""
        world = self.world
        accounts = world.accounts
        destinations = request.destinations
        if not destinations:
            raise invalid([Violation("destinations", "REQUIRED_FIELD_MISSING",
                                     "Required field is missing.")])
        if len(destinations) > MAX_DESTINATIONS:
            raise invalid([Violation("destinations", "TOO_MANY_DESTINATIONS",
                                     "Maximum number of destinations allowed per request is "
                                     f"{MAX_DESTINATIONS}.")])
        problems: list[Violation] = []
        references: set[str] = set()
        for j, destination in enumerate(destinations):
            path = f"destinations[{j}]"
            if destination.reference:
                if destination.reference in references:
                    problems.append(Violation(f"{path}.reference",
                                              "DUPLICATE_DESTINATION_REFERENCE",
                                              "Destination references must be unique within "
                                              "the request."))
                references.add(destination.reference)
            if not destination.HasField("operating_account"):
                problems.append(Violation(f"{path}.operating_account", "REQUIRED_FIELD_MISSING",
                                          "Required field is missing."))
            else:
                problems += _check_account(destination.operating_account,
                                           f"{path}.operating_account")
            if destination.HasField("login_account"):
                problems += _check_account(destination.login_account, f"{path}.login_account")
            if destination.HasField("linked_account"):
                problems.append(Violation(
                    f"{path}.linked_account",
                    "LINKED_ACCOUNT_ONLY_ALLOWED_WITH_DATA_PARTNER_LOGIN_ACCOUNT",
                    "A linked account is only allowed with a data partner login account."))
            if not destination.product_destination_id:
                problems.append(Violation(f"{path}.product_destination_id",
                                          "REQUIRED_FIELD_MISSING",
                                          "Required field is missing."))
            elif not destination.product_destination_id.isdigit():
                problems.append(Violation(f"{path}.product_destination_id",
                                          "INVALID_CONVERSION_ACTION_ID",
                                          "Conversion action ID is not valid: a Google Ads "
                                          "conversion action id is numeric."))
        if problems:
            raise invalid(problems)
        for destination in destinations:  # who may write to which account
            operating = destination.operating_account.account_id
            login = (destination.login_account.account_id
                     if destination.HasField("login_account") else operating)
            if operating != accounts.google_ads_customer_id or login not in (
                    operating, accounts.google_ads_manager_id):
                raise DmError(grpc.StatusCode.PERMISSION_DENIED,
                              "The caller does not have permission", "PERMISSION_DENIED")
        actions: list[GoogleAdsAction] = []
        for j, destination in enumerate(destinations):
            path = f"destinations[{j}].product_destination_id"
            action = world.google_ads_action(int(destination.product_destination_id))
            if action is None:
                problems.append(Violation(path, "INVALID_CONVERSION_ACTION_ID",
                                          "Conversion action ID is not valid: no such "
                                          "conversion action in the operating account."))
                continue
            if action.type != "UPLOAD_CLICKS":
                problems.append(Violation(path, "INVALID_CONVERSION_ACTION_TYPE",
                                          f"Conversion action type is not valid: "
                                          f"'{action.name}' is {action.type}, not "
                                          "UPLOAD_CLICKS."))
            elif (action.created_ts is not None and
                  world.as_of_ts - action.created_ts < NEW_ACTION_HOURS * 3600):
                problems.append(Violation(path, "CONVERSION_ACTION_TOO_RECENTLY_CREATED",
                                          "The conversion action was created too recently: "
                                          f"it accepts uploads about {NEW_ACTION_HOURS} hours "
                                          "after it was created."))
            actions.append(action)
        if problems:
            raise invalid(problems)
        return actions

    # -- processing (decided at ingest, reported once due) ----------------------------------
    def _process(self, request: Any, events: list[_Event], actions: list[GoogleAdsAction],
                 stored: _Stored) -> None:
        world = self.world
        gclids: dict[str, float] = {}
        email_queries: list[tuple[bytes, float, int]] = []
        email_query_of: dict[tuple[int, int], list[int]] = {}
        encoding = request.encoding
        for event in events:
            ids = event.message.ad_identifiers
            if ids.gclid:
                gclids.setdefault(ids.gclid, event.ts)
            elif not (ids.gbraid or ids.wbraid):
                for j in event.targets:
                    window = actions[j].click_through_days
                    email_query_of[(event.index, j)] = [
                        len(email_queries) + k for k in range(_email_count(event.message))]
                    email_queries += [(digest, event.ts, window)
                                      for digest in _email_digests(event.message, encoding)]
        clicks = world.find_clicks(gclids)
        email_clicks = world.find_email_clicks(email_queries) if email_queries else []
        seen: set[tuple[int, str]] = set()
        for j, (action, outcome) in enumerate(zip(actions, stored.outcomes, strict=True)):
            for event in events:
                if j not in event.targets:
                    continue
                outcome.record_count += 1
                email_matches = [email_clicks[q] for q in email_query_of.get((event.index, j), [])]
                reason = self._process_event(request, event, action, clicks, email_matches,
                                             seen, stored.due_ts)
                if reason is not None:
                    outcome.errors[reason] += 1
                    self._counters.processing_errors[ProcessingErrorReason(reason).name] += 1

    def _process_event(self, request: Any, event: _Event, action: GoogleAdsAction,
                       clicks: dict[str, ClickRef], email_matches: list[ClickRef | None],
                       seen: set[tuple[int, str]], effective_ts: float) -> int | None:
        """Apply one event to one action; the ProcessingErrorReason when it fails."""
        message = event.message
        txid = message.transaction_id
        counts = None
        if txid:
            counts = self._counters.transactions.setdefault((action.id, txid),
                                                           TransactionCounts())
            counts.events += 1
        reason = self._match(request, event, action, clicks, email_matches)
        if isinstance(reason, int):
            if counts is not None:
                counts.errors += 1
            return reason
        click = reason
        world = self.world
        value = (message.conversion_value if message.HasField("conversion_value")
                 else action.default_value)
        currency = message.currency or world.accounts.currency
        ids = message.ad_identifiers
        if txid:
            if (action.id, txid) in seen:
                assert counts is not None
                counts.errors += 1
                return ProcessingErrorReason.PROCESSING_ERROR_REASON_DUPLICATE_TRANSACTION_ID
            seen.add((action.id, txid))
            key = txid
        else:
            key = f"{ids.gclid or ids.gbraid or ids.wbraid or 'user_data'}@{event.ts:.6f}"
            if world.uploads.get(action.id, key) is not None or (action.id, key) in seen:
                self._counters.without_transaction_id["duplicates"] += 1
                return ProcessingErrorReason.PROCESSING_ERROR_REASON_DUPLICATE_GCLID
            seen.add((action.id, key))
        applied = world.uploads.apply(action.id, key, click, event.ts, value, currency,
                                      effective_ts)
        if counts is None:
            self._counters.without_transaction_id[
                "conversions" if applied == "conversion" else applied + "s"] += 1
            return None
        if applied == "conversion":
            counts.conversions += 1
        elif applied == "adjustment":
            counts.adjustments += 1
        else:
            counts.duplicates += 1
        counts.value, counts.currency = value, currency
        return None

    def _match(self, request: Any, event: _Event, action: GoogleAdsAction,
               clicks: dict[str, ClickRef],
               email_matches: list[ClickRef | None]) -> int | ClickRef:
        """The click an event is for, or the ProcessingErrorReason it fails with."""
        R = ProcessingErrorReason
        message = event.message
        consent = (message.consent.ad_user_data if message.HasField("consent")
                   and message.consent.ad_user_data else request.consent.ad_user_data)
        if consent == CONSENT_DENIED:
            return R.PROCESSING_ERROR_REASON_DENIED_CONSENT
        ids = message.ad_identifiers
        click: ClickRef | None
        if ids.gclid:
            if not _CLICK_ID.fullmatch(ids.gclid):
                return R.PROCESSING_ERROR_REASON_INVALID_GCLID
            click = clicks.get(ids.gclid)
        elif ids.gbraid or ids.wbraid:
            if action.counting_type == "ONE_PER_CLICK":
                return R.PROCESSING_ERROR_REASON_ONE_PER_CLICK_CONVERSION_ACTION_NOT_PERMITTED_WITH_BRAID  # noqa: E501
            if ids.gbraid and not _CLICK_ID.fullmatch(ids.gbraid):
                return R.PROCESSING_ERROR_REASON_INVALID_GBRAID
            if ids.wbraid and not _CLICK_ID.fullmatch(ids.wbraid):
                return R.PROCESSING_ERROR_REASON_INVALID_WBRAID
            click = None  # the world has no iOS app or web-to-app clicks
        else:
            click = next((c for c in email_matches if c is not None), None)
        if click is None:
            return R.PROCESSING_ERROR_REASON_CLICK_NOT_FOUND
        now = self.world.as_of_ts
        if int(event.ts) < int(click.ts):  # Google keeps click times to the second, as
            return R.PROCESSING_ERROR_REASON_CONVERSION_PRECEDES_CLICK  # platforms send them
        if (event.ts - click.ts > action.click_through_days * DAY
                or now - event.ts > MAX_EVENT_AGE_DAYS * DAY):
            return R.PROCESSING_ERROR_REASON_EVENT_TOO_OLD
        if now - click.ts < RECENT_CLICK_HOURS * 3600:
            return R.PROCESSING_ERROR_REASON_TOO_RECENT_CLICK
        return click

    def _forget_old(self, now: float) -> None:
        horizon = now - self.config.forget_days * DAY
        while self._requests:
            oldest = next(iter(self._requests.values()))
            if oldest.received_ts >= horizon:
                break
            self._requests.popitem(last=False)

    # -- RetrieveRequestStatus -------------------------------------------------------------
    def retrieve_request_status(self, request: Any) -> Any:
        try:
            with self._lock:
                return self._retrieve(request.request_id)
        except DmError as error:
            self.reject(error)
            raise

    def _retrieve(self, request_id: str) -> Any:
        if not request_id:
            raise invalid([Violation("request_id", "REQUIRED_FIELD_MISSING",
                                     "Required field is missing.")])
        try:
            uuid.UUID(request_id)
        except ValueError:
            raise invalid([Violation("request_id", "INVALID_REQUEST_ID",
                                     "The request ID is not valid.")]) from None
        now = self.world.as_of_ts
        stored = self._requests.get(request_id)
        if stored is None or now - stored.received_ts > self.config.forget_days * DAY:
            raise DmError(grpc.StatusCode.NOT_FOUND, "Requested entity was not found.",
                          "NOT_FOUND")
        if now - stored.received_ts > self.config.status_days * DAY:
            raise invalid([Violation("request_id", "REQUEST_TOO_OLD",
                                     "Request status is only available for approximately "
                                     f"{self.config.status_days} days after the API receives "
                                     "a request.")])
        response = _RetrieveResponse()
        for outcome in stored.outcomes:
            status = response.request_status_per_destination.add()
            status.destination.ParseFromString(outcome.destination)
            status.events_ingestion_status.record_count = outcome.record_count
            if now < stored.due_ts:
                status.request_status = _RequestStatus.PROCESSING
                continue
            failed = sum(outcome.errors.values())
            if failed == 0:
                status.request_status = _RequestStatus.SUCCESS
                continue
            status.request_status = (_RequestStatus.FAILED if failed >= outcome.record_count
                                     else _RequestStatus.PARTIAL_SUCCESS)
            for reason, count in sorted(outcome.errors.items()):
                status.error_info.error_counts.add(record_count=count, reason=reason)
        return response

    # -- the control endpoint --------------------------------------------------------------
    def configure(self, **changes: Any) -> DataManagerConfig:
        with self._lock:
            for name, value in changes.items():
                if not hasattr(self.config, name):
                    raise ValueError(f"unknown setting {name!r}; known: "
                                     f"{', '.join(asdict(self.config))}")
                current = getattr(self.config, name)
                setattr(self.config, name, type(current)(value))
            return self.config

    def reset_quota(self) -> None:
        with self._lock:
            self._quota = {"write": _Quota(), "read": _Quota()}

    def reset(self) -> None:
        """Forget requests, statuses, counters and quota use, and restore the default settings
        (the conversions Google Ads recorded, ``World.uploads``, stay)."""
        with self._lock:
            self.config = DataManagerConfig()
            self._requests.clear()
            self._quota = {"write": _Quota(), "read": _Quota()}
            self._counters = _Counters()

    def record_adjustment(self, action_id: int, transaction_id: str | None,
                          kind: Literal["RETRACTION", "RESTATEMENT"], value: float = 0.0,
                          currency: str = "") -> None:
        """Count a retraction or restatement the Google Ads API's conversion adjustments made
        (``adjustments.py``) to a conversion uploaded here (without a transaction id: under
        ``without_transaction_id``)."""
        with self._lock:
            if not transaction_id:
                self._counters.without_transaction_id[
                    "retractions" if kind == "RETRACTION" else "adjustments"] += 1
                return
            counts = self._counters.transactions.setdefault((action_id, transaction_id),
                                                           TransactionCounts())
            if kind == "RETRACTION":
                counts.retractions += 1
            else:
                counts.adjustments += 1
                counts.value, counts.currency = value, currency

    def transactions(self, action_id: int | None = None) -> dict[tuple[int, str],
                                                                  TransactionCounts]:
        """Per (action, transaction id): events, conversions, adjustments, duplicates."""
        with self._lock:
            return {k: TransactionCounts(**asdict(v))
                    for k, v in self._counters.transactions.items()
                    if action_id is None or k[0] == action_id}

    def summary(self, action_id: int | None = None,
                with_transactions: bool = True) -> dict[str, Any]:
        """What the sandbox counted, as the control endpoint reports it."""
        transactions = self.transactions(action_id)
        by_action: dict[str, dict[str, Any]] = {}
        for (action, txid), counts in sorted(transactions.items()):
            row = asdict(counts)
            if not counts.retractions:  # said only of the conversions the Google Ads API took back
                del row["retractions"]
            by_action.setdefault(str(action), {})[txid] = row
        with self._lock:
            c = self._counters
            world = self.world
            processed = sum(1 for s in self._requests.values() if s.due_ts <= world.as_of_ts)
            out: dict[str, Any] = {
                "config": asdict(self.config),
                "requests": {k.split(".", 1)[1]: n for k, n in
                             self.sandbox.requests(PLATFORM).items()},
                "ingested_requests": c.ingested_requests, "processed_requests": processed,
                "validate_only_requests": c.validate_only, "events": c.events,
                "rejections": dict(c.rejections),
                "processing_errors": dict(c.processing_errors),
                "conversions": sum(t.conversions for t in transactions.values()),
                "adjustments": sum(t.adjustments for t in transactions.values()),
                "duplicates": sum(t.duplicates for t in transactions.values()),
                "retractions": sum(t.retractions for t in transactions.values()),
                "accepted_value": round(sum(t.value for t in transactions.values()
                                            if t.conversions and not t.retractions), 2),
                "without_transaction_id": dict(c.without_transaction_id),
            }
        if with_transactions:
            out["transactions"] = by_action
        return out


def _check_account(account: Any, path: str) -> list[Violation]:
    problems = []
    kind, product = account.account_type, account.product
    if not _valid_enum(account, "account_type"):
        problems.append(Violation(f"{path}.account_type", "INVALID_ENUM_VALUE",
                                  "Enum value cannot be used."))
    elif not kind and not product:
        problems.append(Violation(f"{path}.account_type", "REQUIRED_FIELD_MISSING",
                                  "Required field is missing."))
    elif kind and product and kind != product:
        problems.append(Violation(f"{path}.product", "INVALID_ARGUMENT",
                                  "account_type and the deprecated product must match."))
    elif (kind or product) != GOOGLE_ADS:
        problems.append(Violation(f"{path}.account_type", "INVALID_DESTINATION",
                                  "This Destination is not valid: the convsync sandbox "
                                  "simulates Google Ads accounts only."))
    if not account.account_id:
        problems.append(Violation(f"{path}.account_id", "REQUIRED_FIELD_MISSING",
                                  "Required field is missing."))
    elif not account.account_id.isdigit():
        problems.append(Violation(f"{path}.account_id", "INVALID_FORMAT",
                                  "Format is invalid: a Google Ads account ID is 10 digits, "
                                  "without dashes."))
    return problems


def _valid_enum(message: Any, name: str) -> bool:
    enum = message.DESCRIPTOR.fields_by_name[name].enum_type
    return getattr(message, name) in enum.values_by_number


def _check_events(request: Any, world: World,
                  actions: list[GoogleAdsAction]) -> list[_Event]:
    """Every event, parsed; INVALID_ARGUMENT naming each problem if any has one."""
    events = request.events
    if not events:
        raise invalid([Violation("events", "REQUIRED_FIELD_MISSING",
                                 "Required field is missing.")])
    if len(events) > MAX_EVENTS:
        raise invalid([Violation("events", "TOO_MANY_EVENTS",
                                 f"Too many events: at most {MAX_EVENTS:,} can be sent in a "
                                 "single request.")])
    problems: list[Violation] = []
    if not _valid_enum(request, "encoding"):
        problems.append(Violation("encoding", "INVALID_ENUM_VALUE", "Enum value cannot be used."))
    problems += _check_consent(request, "consent")
    references = {d.reference: j for j, d in enumerate(request.destinations) if d.reference}
    everywhere = list(range(len(request.destinations)))
    parsed = []
    horizon = world.as_of_ts + 60.0
    encoding = request.encoding
    for i, event in enumerate(events):
        path = f"events[{i}]"
        ts = 0.0
        if not event.HasField("event_timestamp"):
            problems.append(Violation(f"{path}.event_timestamp", "REQUIRED_FIELD_MISSING",
                                      "Required field is missing."))
        else:
            ts = event.event_timestamp.seconds + event.event_timestamp.nanos / 1e9
            if ts > horizon:
                problems.append(Violation(f"{path}.event_timestamp", "EVENT_TIME_INVALID",
                                          "The event time is invalid: it is in the future."))
        if not _valid_enum(event, "event_source"):
            problems.append(Violation(f"{path}.event_source", "INVALID_ENUM_VALUE",
                                      "Enum value cannot be used."))
        elif not event.event_source:
            problems.append(Violation(f"{path}.event_source", "REQUIRED_FIELD_MISSING",
                                      "Required field is missing."))
        if event.HasField("consent"):
            problems += _check_consent(event, f"{path}.consent")
        if event.currency and not _CURRENCY.fullmatch(event.currency):
            problems.append(Violation(f"{path}.currency", "INVALID_CURRENCY_CODE",
                                      "Currency code is not valid: an ISO 4217 code such as "
                                      "USD."))
        ids = event.ad_identifiers
        has_click_id = bool(ids.gclid or ids.gbraid or ids.wbraid)
        identifiers = event.user_data.user_identifiers
        if not has_click_id and not identifiers:
            problems.append(Violation(path, "NO_IDENTIFIERS_PROVIDED",
                                      "No identifiers provided: an event needs a click id "
                                      "(gclid, gbraid, wbraid) or user data."))
        if event.HasField("user_data"):
            problems += _check_user_data(event.user_data, f"{path}.user_data", encoding)
        if event.HasField("third_party_user_data"):
            problems.append(Violation(f"{path}.third_party_user_data",
                                      "THIRD_PARTY_USER_DATA_NOT_ALLOWED",
                                      "Third party user data can only be set by data "
                                      "partners."))
        targets = everywhere
        if event.destination_references:
            targets = []
            for k, reference in enumerate(event.destination_references):
                if reference not in references:
                    problems.append(Violation(f"{path}.destination_references[{k}]",
                                              "INVALID_DESTINATION",
                                              f"This Destination is not valid: no destination "
                                              f"has the reference '{reference}'."))
                else:
                    targets.append(references[reference])
        parsed.append(_Event(i, event, ts, sorted(set(targets))))
    if problems:
        raise invalid(problems)
    return parsed


def _check_consent(message: Any, path: str) -> list[Violation]:
    consent = message.consent
    return [Violation(f"{path}.{name}", "INVALID_ENUM_VALUE", "Enum value cannot be used.")
            for name in ("ad_user_data", "ad_personalization") if not _valid_enum(consent, name)]


def _check_user_data(user_data: Any, path: str, encoding: int) -> list[Violation]:
    identifiers = user_data.user_identifiers
    if not identifiers:
        return [Violation(f"{path}.user_identifiers", "REQUIRED_FIELD_MISSING",
                          "Required field is missing: user data needs at least one "
                          "identifier.")]
    if len(identifiers) > MAX_IDENTIFIERS:
        return [Violation(f"{path}.user_identifiers", "TOO_MANY_USER_IDENTIFIERS",
                          "Maximum number of user identifiers allowed per event is "
                          f"{MAX_IDENTIFIERS}.")]
    if encoding not in (HEX, BASE64):
        return [Violation("encoding", "REQUIRED_FIELD_MISSING",
                          "Required field is missing: encoding (HEX or BASE64) must be given "
                          "with user data.")]
    problems = []
    for k, identifier in enumerate(identifiers):
        where = f"{path}.user_identifiers[{k}]"
        kind = identifier.WhichOneof("identifier")
        if kind is None:
            problems.append(Violation(where, "REQUIRED_FIELD_MISSING",
                                      "Required field is missing."))
        elif kind in ("email_address", "phone_number"):
            problems += _check_hash(getattr(identifier, kind), f"{where}.{kind}", encoding)
        else:
            address = identifier.address
            for name in ("given_name", "family_name"):
                problems += _check_hash(getattr(address, name), f"{where}.address.{name}",
                                        encoding)
            if not re.fullmatch(r"[A-Z]{2}", address.region_code):
                problems.append(Violation(f"{where}.address.region_code",
                                          "INVALID_COUNTRY_CODE", "Country code is not valid."))
            if not address.postal_code:
                problems.append(Violation(f"{where}.address.postal_code",
                                          "REQUIRED_FIELD_MISSING",
                                          "Required field is missing."))
    return problems


def _check_hash(value: str, path: str, encoding: int) -> list[Violation]:
    """A hashed identifier: SHA-256 (32 bytes) in the request's encoding."""
    if not value:
        return [Violation(path, "REQUIRED_FIELD_MISSING", "Required field is missing.")]
    digest = _decode(value, encoding)
    if digest is None:
        reason = "INVALID_HEX_ENCODING" if encoding == HEX else "INVALID_BASE64_ENCODING"
        text = "The HEX encoded value is malformed." if encoding == HEX else (
            "The base64 encoded value is malformed.")
        return [Violation(path, reason, text)]
    if len(digest) != 32:
        return [Violation(path, "INVALID_SHA256_FORMAT", "The SHA256 encoded value is "
                          f"malformed: {len(digest)} bytes, not 32.")]
    return []


def _decode(value: str, encoding: int) -> bytes | None:
    if encoding == HEX:
        if len(value) % 2 or not _HEX.fullmatch(value):
            return None
        return bytes.fromhex(value)
    try:
        padded = value + "=" * (-len(value) % 4)
        return base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        return None


def _email_count(event: Any) -> int:
    return sum(1 for i in event.user_data.user_identifiers
               if i.WhichOneof("identifier") == "email_address")


def _email_digests(event: Any, encoding: int) -> list[bytes]:
    out = []
    for identifier in event.user_data.user_identifiers:
        if identifier.WhichOneof("identifier") == "email_address":
            out.append(_decode(identifier.email_address, encoding) or b"")
    return out


def _check_credentials(authorization: str | None) -> None:
    """No credentials pass (as the sandbox's GA4; ``AnonymousCredentials`` send none); a bearer
    token must be non-empty; two tokens play the OAuth failures a client must handle."""
    if authorization is None:
        return
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise DmError(grpc.StatusCode.UNAUTHENTICATED, _INVALID_CREDENTIALS,
                      "ACCESS_TOKEN_TYPE_UNSUPPORTED", domain="googleapis.com",
                      metadata={"service": DOMAIN})
    if token == EXPIRED_TOKEN:
        raise DmError(grpc.StatusCode.UNAUTHENTICATED, _INVALID_CREDENTIALS,
                      "ACCESS_TOKEN_EXPIRED", domain="googleapis.com",
                      metadata={"service": DOMAIN, "method": f"{SERVICE}.IngestEvents"})
    if token == NO_SCOPE_TOKEN:
        raise DmError(grpc.StatusCode.PERMISSION_DENIED, _INSUFFICIENT_SCOPES,
                      "ACCESS_TOKEN_SCOPE_INSUFFICIENT", domain="googleapis.com",
                      metadata={"service": DOMAIN, "method": f"{SERVICE}.IngestEvents"})


def _internal() -> DmError:
    return DmError(grpc.StatusCode.INTERNAL, _INTERNAL, "INTERNAL_ERROR")


# -- gRPC front end ------------------------------------------------------------------------------
class _GrpcService:
    def __init__(self, datamanager: DataManager) -> None:
        self.dm = datamanager

    def ingest_events(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._answer(context, "IngestEvents", lambda: self.dm.ingest_events(request))

    def retrieve_request_status(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._answer(context, "RetrieveRequestStatus",
                            lambda: self.dm.retrieve_request_status(request))

    def _answer(self, context: grpc.ServicerContext, method: str,
                answer: Callable[[], Any]) -> Any:
        dm = self.dm
        request_id = str(uuid.uuid4())
        dm.sandbox.count(PLATFORM, method)
        try:
            fault = dm.sandbox.next_fault(PLATFORM)
            if fault is not None and fault.kind == "slow":
                time.sleep(fault.delay)
            elif fault is not None:
                raise dm.fault(fault)
            metadata = dict(context.invocation_metadata())
            authorization = metadata.get("authorization")
            dm.begin(method, authorization if isinstance(authorization, str) else None)
            return answer()
        except DmError as error:
            _abort(context, error, request_id)
        except Exception:  # a simulator bug: answer like an outage, keep the trace
            log.error("sandbox datamanager %s failed\n%s", method, traceback.format_exc())
            _abort(context, _internal(), request_id)


def _abort(context: grpc.ServicerContext, error: DmError, request_id: str) -> NoReturn:
    status = error.status(request_id)
    context.set_trailing_metadata((("grpc-status-details-bin", status.SerializeToString()),))
    context.abort(error.code, error.message)
    raise AssertionError("ServicerContext.abort always raises")


def datamanager_handler(datamanager: DataManager) -> grpc.GenericRpcHandler:
    """IngestionService's simulated methods, to add to any gRPC server (the others answer
    UNIMPLEMENTED, as gRPC does for a method a server does not have)."""
    service = _GrpcService(datamanager)
    return grpc.method_handlers_generic_handler(SERVICE, {
        "IngestEvents": grpc.unary_unary_rpc_method_handler(
            service.ingest_events, request_deserializer=_IngestRequest.FromString,
            response_serializer=_IngestResponse.SerializeToString),
        "RetrieveRequestStatus": grpc.unary_unary_rpc_method_handler(
            service.retrieve_request_status, request_deserializer=_RetrieveRequest.FromString,
            response_serializer=_RetrieveResponse.SerializeToString),
    })


def build_datamanager_grpc_server(datamanager: DataManager, cert: Path, key: Path,
                                  host: str = "127.0.0.1", port: int = 0,
                                  max_workers: int = 8) -> tuple[grpc.Server, int]:
    """A TLS gRPC server with IngestionService alone (the sandbox serves it beside
    GoogleAdsService instead): (server, bound port)."""
    server = grpc.server(ThreadPoolExecutor(max_workers=max_workers,
                                            thread_name_prefix="sandbox-datamanager"))
    server.add_generic_rpc_handlers((datamanager_handler(datamanager),))
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    bound = server.add_secure_port(f"{host}:{port}", credentials)
    server.start()
    return server, bound


# -- REST front end ------------------------------------------------------------------------------
_UNSIMULATED_PATHS = frozenset({
    "/v1/audienceMembers:ingest", "/v1/audienceMembers:remove", "/v1/audienceMembers:removeAll",
    "/v1/users:ingest", "/v1/users:remove", "/v1/adEvents:ingest"})
_UNKNOWN_JSON_FIELD = re.compile(r'has no field named "([^"]+)"')


class DataManagerRest:
    """``POST /v1/events:ingest`` and ``GET /v1/requestStatus:retrieve`` for serve_rest."""

    name = PLATFORM

    def __init__(self, datamanager: DataManager) -> None:
        self.dm = datamanager

    def route(self, request: Request) -> tuple[str, Handler]:
        path = unquote(request.path)
        if request.method == "POST" and path == "/v1/events:ingest":
            return "IngestEvents", self._ingest
        if request.method == "GET" and path == "/v1/requestStatus:retrieve":
            return "RetrieveRequestStatus", self._retrieve
        if path in _UNSIMULATED_PATHS:
            raise ApiError(_rest_error(_unimplemented(f"{request.method} {path}")))
        raise ApiError(_rest_error(DmError(
            grpc.StatusCode.NOT_FOUND, f"The requested URL {request.path} was not found on "
            "this server.", "NOT_FOUND", domain="googleapis.com")))

    def fault_response(self, fault: Fault) -> Response:
        return _rest_error(self.dm.fault(fault))

    def error_response(self, status: int, message: str) -> Response:
        return _rest_error(_internal())

    def _ingest(self, request: Request) -> Response:
        def answer() -> Any:
            try:
                message = _parse_json(request.body, _IngestRequest)
            except DmError as error:
                self.dm.reject(error)
                raise
            return self.dm.ingest_events(message)
        return self._answer(request, "IngestEvents", answer)

    def _retrieve(self, request: Request) -> Response:
        message = _RetrieveRequest(request_id=request.arg("requestId")
                                   or request.arg("request_id") or "")
        return self._answer(request, "RetrieveRequestStatus",
                            lambda: self.dm.retrieve_request_status(message))

    def _answer(self, request: Request, method: str, answer: Callable[[], Any]) -> Response:
        try:
            self.dm.begin(method, request.headers.get("Authorization"))
            response = answer()
        except DmError as error:
            return _rest_error(error)
        int_enums = "enum-encoding=int" in (request.arg("$alt") or "")
        text = json_format.MessageToJson(response, indent=None,
                                         use_integers_for_enums=int_enums)
        return Response(200, text.encode(), content_type="application/json; charset=UTF-8")


def _parse_json(body: bytes, message_type: Any) -> Any:
    """Proto3 JSON as any client sends it: camelCase or snake_case, enums by name or number."""
    message = message_type()
    try:
        json_format.Parse(body or b"{}", message)
    except json_format.ParseError as error:
        unknown = _UNKNOWN_JSON_FIELD.search(str(error))
        text = (f'Invalid JSON payload received. Unknown name "{unknown[1]}": Cannot find '
                "field." if unknown else
                f"Invalid JSON payload received. {str(error).splitlines()[0]}")
        raise DmError(grpc.StatusCode.INVALID_ARGUMENT, text, "INVALID_ARGUMENT",
                      domain="googleapis.com") from error
    return message


def _rest_error(error: DmError) -> Response:
    return Response(_HTTP_STATUS.get(error.code, 500), error.rest_body(str(uuid.uuid4())))


def serve_datamanager_rest(datamanager: DataManager, host: str = "127.0.0.1",
                           port: int = 0) -> ThreadingHTTPServer:
    """Start the REST front end; its base URL is ``http://{host}:{server.server_port}``."""
    return serve_rest(DataManagerRest(datamanager), datamanager.sandbox, host, port)
