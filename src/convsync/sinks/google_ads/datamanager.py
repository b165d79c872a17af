"""Google Ads sink: offline click conversions and enhanced conversions for leads through the
Data Manager API (``google-ads-datamanager``: ``IngestionService.IngestEvents`` and
``RetrieveRequestStatus``), over gRPC or REST.

What one request carries (``DataManagerSink.build_request``):

- a destination per (account, conversion action) of the batch, in order of first appearance:
  ``operating_account`` the account that owns the action (GOOGLE_ADS, 10 digits),
  ``login_account`` the configured manager (``login_customer_id``) or else the account itself,
  ``product_destination_id`` the action's id, and a ``reference`` each event names in its
  ``destination_references`` (an event goes to its own action only, never to every
  destination of the request);
- per upload one event: ``transaction_id`` = the upload's dedupe key (Google deduplicates it:
  the same id to the same action again restates the value, never counts twice),
  ``event_timestamp`` in UTC, ``conversion_value``, ``currency``, ``event_source``,
  ``ad_identifiers`` with one click id (gclid, else gbraid, else wbraid: a conversion belongs
  to one click) and ``user_data`` with the email and phone hashes under Google's rule (hex:
  ``encoding`` HEX);
- ``consent.ad_user_data`` CONSENT_GRANTED when the config grants it; nothing when it says
  "unspecified" (the account's own settings apply); "denied" never reaches a request.

``event_source``: the reference calls it optional, but Google Ads answers
REQUIRED_FIELD_MISSING without it. An event with a click id is WEB (the conversion follows an ad
click on the advertiser's site, whatever later step made it count); an event known only by a
hashed email or phone (enhanced conversions for leads: a CRM outcome) is OTHER, since nothing
says where it happened.

Errors: the API has no partial failure (one bad event rejects the whole request), so
``problems`` checks each upload as the API would before anything is sent. A refused call raises
``SinkError`` with the API's reason and a fix in Google Ads terms; transient answers
(RESOURCE_EXHAUSTED per minute, UNAVAILABLE, DEADLINE_EXCEEDED; HTTP 429, 503, 504; a dropped
connection) are retried here with tenacity (the SDK's own retry is off: it would resend for up
to 120 s without telling anyone). The daily quota is not retried within the run.

The transaction id's length: the Data Manager reference gives no limit for
``Event.transaction_id`` (nor does the Google Ads API for ``ClickConversion.order_id``), and
the API has a FIELD_VALUE_TOO_LONG reason; ``MAX_TRANSACTION_ID`` keeps to 64 characters, room
for any id convsync makes (the planner's are 32 hex digits)."""

from __future__ import annotations

import datetime as dt
import functools
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import requests
import urllib3
from google.ads import datamanager_v1 as dm
from google.api_core import exceptions as api
from google.api_core.client_options import ClientOptions
from google.auth import exceptions as auth_errors

from convsync.model import Identifiers, Platform, Upload
from convsync.retry import RetryPolicy, retrying
from convsync.settings import GoogleAdsSection, Secrets, trust_ca_file
from convsync.sinks import SinkError
from convsync.sources.google_auth import DATAMANAGER_SCOPE, google_credentials

log = logging.getLogger(__name__)

MAX_EVENTS = 2_000
MAX_DESTINATIONS = 10
MAX_USER_IDENTIFIERS = 10
MAX_TRANSACTION_ID = 64
"""Characters: no published limit (see the module's note); 64 is a safe bound."""
TIMEOUT = 60.0
"""Seconds per call (a 2,000-event request included)."""
INGEST, RETRIEVE = "IngestEvents", "RetrieveRequestStatus"

_GOOGLE_ADS = int(dm.ProductAccount.AccountType.GOOGLE_ADS)
_WEB, _OTHER = int(dm.EventSource.WEB), int(dm.EventSource.OTHER)
_HEX = int(dm.Encoding.HEX)
_GRANTED = int(dm.ConsentStatus.CONSENT_GRANTED)
_IngestRequest = dm.IngestEventsRequest.pb()
_RetrieveResponse = dm.RetrieveRequestStatusResponse.pb()
_Status = dm.RequestStatusPerDestination.RequestStatus
_STATUS_NAMES = {int(_Status.SUCCESS): "success", int(_Status.PARTIAL_SUCCESS): "partial_success",
                 int(_Status.FAILED): "failed", int(_Status.PROCESSING): "processing"}
_FINAL = frozenset({"success", "partial_success", "failed"})


def _short(name: str) -> str:
    for prefix in ("PROCESSING_ERROR_REASON_", "PROCESSING_ERROR_"):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


PROCESSING_ERRORS = {int(r): _short(name)
                     for name, r in dm.ProcessingErrorReason.__members__.items()}
"""ProcessingErrorReason numbers -> names without their prefix (CLICK_NOT_FOUND,
TOO_RECENT_CLICK, EVENT_TOO_OLD, ...). A number the SDK does not know yet (the enum is open)
is kept as UNKNOWN_<number>."""

_ACCOUNT = re.compile(r"[0-9]{10}")
_CLICK_ID = re.compile(r"[A-Za-z0-9_\-]{10,}")
"""A click id (gclid / gbraid / wbraid) as Google issues it: URL-safe base64."""
_SHA256_HEX = re.compile(r"[0-9A-Fa-f]{64}")
_CURRENCY = re.compile(r"[A-Z]{3}")
_EMAIL_LIKE = re.compile(r"[^\s@'\"(),;:<>]+@[^\s@'\"(),;:<>]+\.[A-Za-z]{2,}")


# -- the client ------------------------------------------------------------------------------------
def connect(section: GoogleAdsSection, secrets: Secrets) -> dm.IngestionServiceClient:
    """An IngestionServiceClient for this config: OAuth with the Data Manager scope (no
    developer token), at ``datamanager_endpoint`` (None: Google's) over
    ``datamanager_transport``. gRPC trusts ``ca_file`` as the Google Ads source does (the
    sandbox's certificate); REST takes an http(s) URL."""
    transport = section.datamanager_transport
    if transport == "grpc" and section.ca_file is not None:
        trust_ca_file(section.ca_file)
    endpoint = section.datamanager_endpoint
    options = ClientOptions(api_endpoint=endpoint) if endpoint else None
    return dm.IngestionServiceClient(credentials=google_credentials(secrets, [DATAMANAGER_SCOPE]),
                                     transport=transport, client_options=options)


@dataclass(frozen=True)
class DestinationStatus:
    """What Google did with one destination (account, conversion action) of a request.

    ``status``: success | partial_success | failed | processing | unknown; ``record_count``:
    the events sent to it; ``errors``: events that failed, by processing reason (the API never
    says which events)."""

    account_id: str
    conversion_action: str
    status: str
    record_count: int
    errors: dict[str, int]


@dataclass(frozen=True)
class RequestStatus:
    """``state``: processing (some destination not finished yet) | done | too_old (Google keeps
    statuses about 50 days) | not_found."""

    request_id: str
    state: str
    destinations: tuple[DestinationStatus, ...]


T = TypeVar("T")


class DataManagerSink:
    """Sends uploads to Google Ads and reads back what became of them.

    ``on_request(method)`` is called once per API call actually made, retries included
    ("IngestEvents" or "RetrieveRequestStatus"): the caller counts them against the Cloud
    project's quota (300 a minute, 100,000 a day, for writes and again for reads). ``sleep``
    waits between retries (tests pass a no-op); ``attempts`` counts the first call."""

    destination = Platform.GOOGLE_ADS
    settles = False
    """Google says what became of a request later (``status``)."""
    max_events = MAX_EVENTS
    dedupe_window: dt.timedelta | None = None
    """Google deduplicates a transaction id for good (a resend restates, never adds)."""

    def __init__(self, client: Any, section: GoogleAdsSection, *,
                 sleep: Callable[[float], None] = time.sleep,
                 on_request: Callable[[str], None] | None = None, attempts: int = 5,
                 timeout: float = TIMEOUT) -> None:
        self.client = client
        self.section = section
        self.sleep = sleep
        self.on_request = on_request
        self.timeout = timeout
        self.policy = RetryPolicy("google_ads (Data Manager)", _transient, attempts=attempts,
                                  initial_wait=1.0, max_wait=60.0)

    def batches(self, uploads: Iterable[Upload]) -> Iterator[list[Upload]]:
        """Requests of at most 2,000 events and 10 (account, action) destinations."""
        batch: list[Upload] = []
        seen: set[tuple[str, str]] = set()
        for upload in uploads:
            key = (upload.account_id, upload.conversion_action)
            if len(batch) >= MAX_EVENTS or (key not in seen and len(seen) >= MAX_DESTINATIONS):
                yield batch
                batch, seen = [], set()
            batch.append(upload)
            seen.add(key)
        if batch:
            yield batch

    # -- local validation --------------------------------------------------------------------
    def problems(self, upload: Upload, now: dt.datetime) -> str:
        """Why the API would reject a request carrying this upload ('' when it would not):
        the first problem, naming the field and what is wrong, never its value."""
        if now.tzinfo is None or now.utcoffset() is None:
            raise ValueError("now must be timezone-aware")
        why = _destination_problem(upload.destination, upload.account_id,
                                   upload.conversion_action, upload.currency)
        if why:
            return why
        if not upload.dedupe_key:
            return "dedupe_key: empty (it is Google's transaction_id, which deduplicates)"
        if len(upload.dedupe_key) > MAX_TRANSACTION_ID:
            return f"dedupe_key: longer than {MAX_TRANSACTION_ID} characters"
        ids = upload.identifiers
        clicks = (ids.gclid, ids.gbraid, ids.wbraid)
        for name, value in zip(_CLICK_FIELDS, clicks, strict=True):
            if value is not None and not _CLICK_ID.fullmatch(value):
                return (f"{name}: not a Google click id (URL-safe base64: at least 10 "
                        "letters, digits, '-' or '_')")
        hashes = (ids.email_sha256_google, ids.phone_sha256_google)
        for name, value in zip(_HASH_FIELDS, hashes, strict=True):
            if value is not None and not _SHA256_HEX.fullmatch(value):
                return f"{name}: not a SHA-256 digest in hex (64 hex digits)"
        if not any(clicks) and not any(hashes):
            return ("identifiers: no click id (gclid / gbraid / wbraid) and no email or phone "
                    "hashed under Google's rule")
        if not isinstance(upload.value, int | float) or not math.isfinite(upload.value):
            return "value: not a finite number"
        if upload.value < 0:
            return "value: negative"
        moment = upload.time
        if moment.tzinfo is None or moment.utcoffset() is None:
            return "time: not timezone-aware"
        if moment > now:
            return "time: in the future"
        return ""

    # -- sending -------------------------------------------------------------------------------
    def build_request(self, uploads: Sequence[Upload], *,
                      validate_only: bool = False) -> dm.IngestEventsRequest:
        """The one IngestEventsRequest ``send`` makes of ``uploads`` (see the module's doc).
        ValueError beyond MAX_EVENTS events or MAX_DESTINATIONS (account, action) pairs, for
        no uploads, an upload not for Google Ads, or a config denying consent."""
        if not uploads:
            raise ValueError("no uploads to send")
        if len(uploads) > MAX_EVENTS:
            raise ValueError(f"{len(uploads):,} events in one request: the Data Manager API "
                             f"takes at most {MAX_EVENTS:,} (send them in batches)")
        keys = dict.fromkeys((u.account_id, u.conversion_action) for u in uploads)
        if len(keys) > MAX_DESTINATIONS:
            raise ValueError(f"{len(keys)} (account, conversion action) destinations in one "
                             f"request: the Data Manager API takes at most {MAX_DESTINATIONS}")
        if self.section.consent == "denied":
            raise ValueError("[google_ads] consent is 'denied': nothing may be sent")
        request = _IngestRequest()
        references: dict[tuple[str, str], str] = {}
        login = self.section.login_customer_id
        for account, action in keys:
            reference = references[(account, action)] = f"d{len(references)}"
            destination = request.destinations.add()
            destination.reference = reference
            destination.operating_account.account_type = _GOOGLE_ADS
            destination.operating_account.account_id = account
            destination.login_account.account_type = _GOOGLE_ADS
            destination.login_account.account_id = login or account
            destination.product_destination_id = action
        for upload in uploads:
            if upload.destination != Platform.GOOGLE_ADS:
                raise ValueError("an upload for another platform in a Google Ads request")
            if upload.time.tzinfo is None or upload.time.utcoffset() is None:
                raise ValueError("an upload's time is not timezone-aware")
            event = request.events.add()
            event.destination_references.append(
                references[(upload.account_id, upload.conversion_action)])
            event.transaction_id = upload.dedupe_key
            event.event_timestamp.seconds = math.floor(upload.time.timestamp())
            event.event_timestamp.nanos = upload.time.microsecond * 1000
            event.conversion_value = upload.value
            if upload.currency:
                event.currency = upload.currency
            ids = upload.identifiers
            click = _click_id(ids)
            event.event_source = _WEB if click else _OTHER
            if click is not None:
                setattr(event.ad_identifiers, click[0], click[1])
            for kind, digest in _user_identifiers(ids):
                event.user_data.user_identifiers.add(**{kind: digest})
        request.encoding = _HEX
        if self.section.consent == "granted":
            request.consent.ad_user_data = _GRANTED
        request.validate_only = validate_only
        return dm.IngestEventsRequest.wrap(request)

    def send(self, uploads: Sequence[Upload], *, validate_only: bool = False) -> str:
        """One IngestEvents call (retried on transient errors): the request id Google gave it
        ("" for ``validate_only``, which checks the request and keeps nothing). SinkError when
        it is refused; ``maybe_sent`` on it when Google may have taken it anyway."""
        request = self.build_request(uploads, validate_only=validate_only)
        scrub = _Scrubber(uploads)
        response = self._call(
            INGEST, lambda: self.client.ingest_events(request=request, retry=None,
                                                      timeout=self.timeout),
            sending=True, scrub=scrub, what=f"upload of {len(uploads):,} event(s)")
        return "" if validate_only else str(response.request_id)

    # -- statuses ------------------------------------------------------------------------------
    def status(self, request_id: str) -> RequestStatus:
        """What Google did with a request, per destination in request order. A status older
        than Google keeps (about 50 days) is ``too_old``, an id Google does not know
        ``not_found``."""
        request = dm.RetrieveRequestStatusRequest(request_id=request_id)
        try:
            response = self._call(
                RETRIEVE, lambda: self.client.retrieve_request_status(
                    request=request, retry=None, timeout=self.timeout),
                sending=False, scrub=_Scrubber(()), what="status request",
                keep=lambda e: isinstance(e, api.NotFound) or _reason(e) == "REQUEST_TOO_OLD")
        except api.NotFound:
            return RequestStatus(request_id, "not_found", ())
        except api.BadRequest:
            return RequestStatus(request_id, "too_old", ())
        raw = type(response).pb(response)
        destinations = tuple(_destination_status(s) for s in raw.request_status_per_destination)
        done = bool(destinations) and all(d.status in _FINAL for d in destinations)
        return RequestStatus(request_id, "done" if done else "processing", destinations)

    # -- calls, retries, errors ----------------------------------------------------------------
    def _call(self, method: str, call: Callable[[], T], *, sending: bool, scrub: _Scrubber,
              what: str, keep: Callable[[BaseException], bool] = lambda e: False) -> T:
        maybe_sent = False

        def attempt() -> T:
            nonlocal maybe_sent
            if self.on_request is not None:
                self.on_request(method)
            try:
                return call()
            except Exception as error:
                maybe_sent = maybe_sent or (sending and _may_have_arrived(error))
                raise

        try:
            return retrying(self.policy, self.sleep)(attempt)
        except SinkError as error:  # ``on_request`` refused the call (a quota): not made
            error.maybe_sent = maybe_sent
            raise
        except (api.GoogleAPICallError, auth_errors.GoogleAuthError,
                requests.RequestException) as error:
            if keep(error):
                raise
            failure = _sink_error(error, what, maybe_sent, scrub)
        log.warning("google_ads (Data Manager) %s: %s (%s)", method, failure.reason,
                    "may have arrived" if failure.maybe_sent else "not taken")
        raise failure


_CLICK_FIELDS = ("gclid", "gbraid", "wbraid")
_HASH_FIELDS = ("email_sha256_google", "phone_sha256_google")


@functools.lru_cache(maxsize=256)
def _destination_problem(destination: str, account_id: str, action: str, currency: str) -> str:
    """What is wrong with where an upload goes ('' when nothing): the same for every upload
    of an action, so kept."""
    if destination != Platform.GOOGLE_ADS:
        return "destination: not a Google Ads upload"
    if not _ACCOUNT.fullmatch(account_id or ""):
        return "account_id: a Google Ads account id is 10 digits, without dashes"
    if not (action or "").isdigit():
        return ("conversion_action: a Google Ads conversion action is named by its id "
                "(digits), not its name")
    if not _CURRENCY.fullmatch(currency or ""):
        return "currency: not an ISO 4217 code of three capitals, such as USD"
    return ""


def _click_id(ids: Identifiers) -> tuple[str, str] | None:
    for name in ("gclid", "gbraid", "wbraid"):
        value = getattr(ids, name)
        if value:
            return name, value
    return None


def _user_identifiers(ids: Identifiers) -> list[tuple[str, str]]:
    out = []
    if ids.email_sha256_google:
        out.append(("email_address", ids.email_sha256_google))
    if ids.phone_sha256_google:
        out.append(("phone_number", ids.phone_sha256_google))
    return out


def _destination_status(raw: Any) -> DestinationStatus:
    errors: dict[str, int] = {}
    for count in raw.error_info.error_counts:
        name = PROCESSING_ERRORS.get(count.reason, f"UNKNOWN_{count.reason}")
        errors[name] = errors.get(name, 0) + int(count.record_count)
    destination = raw.destination
    return DestinationStatus(
        account_id=destination.operating_account.account_id,
        conversion_action=destination.product_destination_id,
        status=_STATUS_NAMES.get(raw.request_status, "unknown"),
        record_count=int(raw.events_ingestion_status.record_count), errors=errors)


# -- what is transient, what may have arrived ------------------------------------------------------
def _transient(error: BaseException) -> bool:
    """Retried within the run: the per-minute quota, outages, timeouts, dropped connections.
    The daily quota is not (it lasts until midnight Pacific)."""
    if isinstance(error, api.TooManyRequests):
        return not _daily_quota(error)
    if isinstance(error, api.ServiceUnavailable | api.GatewayTimeout):
        return True
    return isinstance(error, requests.ConnectionError | requests.Timeout
                      | auth_errors.TransportError)


def _may_have_arrived(error: BaseException) -> bool:
    """Whether Google may have taken a request that ended in this error: an answer that never
    came (timeout, outage, reset connection, internal error), not a refusal."""
    if isinstance(error, requests.ConnectTimeout):
        return False  # never connected
    if isinstance(error, requests.ConnectionError) and error.args and isinstance(
            getattr(error.args[0], "reason", None), urllib3.exceptions.NewConnectionError):
        return False  # refused or unreachable: nothing was sent
    return isinstance(error, api.ServiceUnavailable | api.GatewayTimeout
                      | api.InternalServerError | requests.ConnectionError | requests.Timeout)


def _daily_quota(error: api.GoogleAPICallError) -> bool:
    metadata = dict(getattr(error, "metadata", None) or {})
    text = " ".join((str(metadata.get("quota_limit", "")), str(metadata.get("quota_metric", "")),
                     error.message or ""))
    return "perday" in re.sub(r"[\s_\-]", "", text.lower())


def _reason(error: BaseException) -> str:
    """The API's ErrorInfo reason, else the canonical code's name."""
    reason = getattr(error, "reason", None)
    if reason:
        return str(reason)
    code = getattr(error, "grpc_status_code", None)
    if code is not None:
        return str(code.name)
    return {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
            404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE",
            504: "DEADLINE_EXCEEDED"}.get(getattr(error, "code", 0), type(error).__name__)


# -- errors in words -------------------------------------------------------------------------------
_ACTION_HELP = "Google Ads > Goals > Conversions"
_IMPORT_ACTION = (f"create one in {_ACTION_HELP} > New conversion action > Import > Manual "
                  "import using API or uploads > Track conversions from clicks, then put its id "
                  "in [google_ads] upload_actions")
_SCOPE = ("the Google account must consent again with the Data Manager scope "
          f"({DATAMANAGER_SCOPE}; a grant made for the Google Ads scope alone does not cover "
          "it), then set the new CONVSYNC_GOOGLE_REFRESH_TOKEN")
_TOKEN = ("the OAuth token has expired or was revoked: make a new refresh token with the Data "
          "Manager scope and set CONVSYNC_GOOGLE_REFRESH_TOKEN (an OAuth app left in 'testing' "
          "issues refresh tokens that expire after 7 days: publish it), or a fresh "
          "CONVSYNC_GOOGLE_ACCESS_TOKEN")
FIXES: dict[str, str] = {
    "INVALID_CONVERSION_ACTION_TYPE": "the action must be an import action of type "
                                      f"UPLOAD_CLICKS: {_IMPORT_ACTION}",
    "INVALID_CONVERSION_ACTION_ID": "no such conversion action in the account: check its id in "
                                    f"{_ACTION_HELP} (the ctId in the action's URL) and "
                                    "[google_ads] upload_actions",
    "CONVERSION_ACTION_TOO_RECENTLY_CREATED": "a new conversion action accepts uploads about 6 "
                                              "hours after it was created: wait 6 hours, then "
                                              "push again",
    "PERMISSION_DENIED": "the Google account behind the credentials cannot upload to this "
                         "account: give it access in Google Ads > Admin > Access and security, "
                         "or set [google_ads] login_customer_id to the manager account it has "
                         "access through",
    "ACCESS_TOKEN_SCOPE_INSUFFICIENT": _SCOPE,
    "ACCESS_TOKEN_EXPIRED": _TOKEN,
    "UNAUTHENTICATED": _TOKEN,
    "ACCESS_TOKEN_TYPE_UNSUPPORTED": _TOKEN,
    "INVALID_FORMAT": "a Google Ads account id is 10 digits without dashes: check "
                      "[google_ads] customer_ids and login_customer_id",
    "OPERATING_ACCOUNT_LOGIN_ACCOUNT_MISMATCH": "set [google_ads] login_customer_id to the "
                                                "manager of the account, or leave it out",
    "INVALID_DESTINATION": "every destination must be a Google Ads conversion action of the "
                           "account named: check [google_ads] upload_actions",
    "NO_IDENTIFIERS_PROVIDED": "every event needs a gclid / gbraid / wbraid or a hashed email "
                               "or phone: check the source of the conversion",
    "INVALID_HEX_ENCODING": "user data must be the SHA-256 of the normalized email or phone, "
                            "in hex: a value was not hashed",
    "INVALID_SHA256_FORMAT": "user data must be the SHA-256 of the normalized email or phone, "
                             "in hex: a value was not hashed",
    "INVALID_CURRENCY_CODE": "currencies are ISO 4217 codes of three capitals: check "
                             "[client] currency",
    "EVENT_TIME_INVALID": "a conversion time is in the future: check the source's time zone and "
                          "this machine's clock",
    "REQUIRED_FIELD_MISSING": "a field Google requires is missing (named above): a convsync "
                              "bug, please report it",
    "TOO_MANY_EVENTS": f"send at most {MAX_EVENTS:,} events a request",
    "TOO_MANY_DESTINATIONS": f"send to at most {MAX_DESTINATIONS} conversion actions a request",
    "TOO_MANY_USER_IDENTIFIERS": f"send at most {MAX_USER_IDENTIFIERS} identifiers an event",
    "DUPLICATE_DESTINATION_REFERENCE": "a convsync bug (destination references must be "
                                       "unique): please report it",
    "FIELD_VALUE_TOO_LONG": "a value is too long for Google (named above), such as a "
                            "transaction id",
    "DESTINATION_ACCOUNT_NOT_ENABLED_ENHANCED_CONVERSIONS_FOR_LEADS":
        "turn on enhanced conversions for leads in Google Ads > Goals > Settings, or upload "
        "click ids only",
    "DESTINATION_ACCOUNT_ENHANCED_CONVERSIONS_TERMS_NOT_SIGNED":
        "accept the customer data terms in Google Ads > Goals > Settings > Enhanced conversions",
    "DESTINATION_ACCOUNT_DATA_POLICY_PROHIBITS_ENHANCED_CONVERSIONS":
        "Google's customer data policies refuse user data for this account: upload click ids "
        "only",
    "TERMS_AND_CONDITIONS_NOT_SIGNED": "accept the terms Google Ads asks for in the account",
    "NOT_ALLOWLISTED": "the account is not allowlisted for this feature: ask your Google "
                       "representative",
    "INVALID_REQUEST_ID": "a request id is Google's own (a UUID): check the stored request",
    "RATE_LIMIT_EXCEEDED": "more than 300 Data Manager requests a minute from this Cloud "
                           "project (shared by every client using it): push again in a few "
                           "minutes, or spread the clients' runs out",
    "RESOURCE_EXHAUSTED": "too many requests to Google at once: push again in a few minutes",
    "UNAVAILABLE": "Google's service did not answer: push again later (events already taken "
                   "are deduplicated by their transaction id)",
    "DEADLINE_EXCEEDED": "Google did not answer in time: push again later (events already "
                         "taken are deduplicated by their transaction id)",
    "INTERNAL": "Google failed on its side: push again later (events already taken are "
                "deduplicated by their transaction id)",
    "INTERNAL_ERROR": "Google failed on its side: push again later (events already taken are "
                      "deduplicated by their transaction id)",
}
_DAILY_FIX = ("the Cloud project's 100,000 Data Manager requests a day are used up (shared by "
              "every client using it): the next run after midnight Pacific resumes")
_RETRYABLE = frozenset({"CONVERSION_ACTION_TOO_RECENTLY_CREATED", "RATE_LIMIT_EXCEEDED",
                        "RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL",
                        "INTERNAL_ERROR"})


class _Scrubber:
    """Takes out of Google's words any identifier of the batch, and anything that looks like a
    hash or an email: an error message never carries personal data."""

    def __init__(self, uploads: Iterable[Upload]) -> None:
        self.uploads = uploads  # looked through only when there is an error to scrub

    def __call__(self, text: str) -> str:
        values = {v for u in self.uploads for v in (
            u.identifiers.gclid, u.identifiers.gbraid, u.identifiers.wbraid,
            u.identifiers.email_sha256_google, u.identifiers.phone_sha256_google) if v}
        for value in sorted((v for v in values if len(v) >= 4), key=len, reverse=True):
            text = text.replace(value, "***")
        text = _SHA256_HEX.sub("***", text)
        return _EMAIL_LIKE.sub("***", text)


def _sink_error(error: BaseException, what: str, maybe_sent: bool,
                scrub: _Scrubber) -> SinkError:
    kind = type(error).__name__
    if isinstance(error, auth_errors.RefreshError):
        reason = ("ACCESS_TOKEN_SCOPE_INSUFFICIENT" if "scope" in str(error).lower()
                  else "ACCESS_TOKEN_EXPIRED")
        return SinkError(f"Google refused to renew the OAuth credentials for the {what} "
                         f"({kind})", fix=FIXES[reason], reason=reason)
    if isinstance(error, auth_errors.TransportError | requests.ConnectionError
                  | requests.Timeout):
        reason = "DEADLINE_EXCEEDED" if isinstance(error, requests.Timeout) else "UNAVAILABLE"
        return SinkError(f"Google did not answer the {what} ({kind})", fix=FIXES[reason],
                         reason=reason, retryable=True, maybe_sent=maybe_sent)
    if isinstance(error, requests.RequestException):
        return SinkError(f"the {what} could not be made ({kind})",
                         fix="check [google_ads] datamanager_endpoint (an http(s) URL for "
                             "the REST transport, or leave it out for Google's)",
                         reason="INVALID_ENDPOINT", maybe_sent=maybe_sent)
    if isinstance(error, auth_errors.GoogleAuthError):
        return SinkError(f"the Google credentials could not be used for the {what} ({kind})",
                         fix="check CONVSYNC_GOOGLE_REFRESH_TOKEN / _CLIENT_ID / "
                             "_CLIENT_SECRET, or CONVSYNC_GOOGLE_SERVICE_ACCOUNT_FILE",
                         reason="INVALID_CREDENTIALS")
    assert isinstance(error, api.GoogleAPICallError)
    reason = _reason(error)
    code = f"HTTP {error.code}" if error.code else kind
    status = getattr(getattr(error, "grpc_status_code", None), "name", "")
    where = _where(error, scrub)
    request_id = _google_request_id(error)
    tail = f" [{code}{' ' + status if status else ''}" + (
        f", Google request id {request_id}]" if request_id else "]")
    if isinstance(error, api.TooManyRequests):
        daily = _daily_quota(error)
        limit = dict(getattr(error, "metadata", None) or {}).get("quota_limit_value")
        per = "day" if daily else "minute"
        return SinkError(
            f"Google refused the {what}: the Cloud project's Data Manager requests per {per} "
            f"are used up ({reason}{', limit ' + str(limit) if limit else ''}){tail}",
            fix=_DAILY_FIX if daily else FIXES.get(reason, FIXES["RESOURCE_EXHAUSTED"]),
            reason=reason, retryable=True, maybe_sent=maybe_sent)
    transient = isinstance(error, api.ServiceUnavailable | api.GatewayTimeout
                           | api.InternalServerError)
    fix = FIXES.get(reason) or (
        FIXES["UNAVAILABLE"] if transient else
        f"see {reason} in the Data Manager API's ErrorReason reference "
        "(developers.google.com/data-manager/api/reference/rest/v1/ErrorReason)")
    return SinkError(f"Google refused the {what}: {reason}{where}{tail}", fix=fix,
                     reason=reason, retryable=transient or reason in _RETRYABLE,
                     maybe_sent=maybe_sent, events=_event_violations(error, scrub))


def _details(error: api.GoogleAPICallError) -> list[tuple[str, Any]]:
    """The error's standard details as (type name, detail): dicts over REST, messages over
    gRPC."""
    out = []
    for detail in getattr(error, "details", None) or []:
        if isinstance(detail, dict):
            out.append((str(detail.get("@type", "")).rsplit(".", 1)[-1], detail))
        else:
            out.append((type(detail).__name__, detail))
    return out


def _get(detail: Any, *names: str) -> Any:
    for name in names:
        if isinstance(detail, dict):
            if name in detail:
                return detail[name]
        elif hasattr(detail, name):
            return getattr(detail, name)
    return None


def _where(error: api.GoogleAPICallError, scrub: _Scrubber) -> str:
    """' at <field> (<what Google said>)' for the first field violations, scrubbed."""
    violations = []
    for name, detail in _details(error):
        if name == "BadRequest":
            violations += list(_get(detail, "fieldViolations", "field_violations") or [])
    if not violations:
        message = scrub(error.message or "")
        return f" ({message})" if message else ""
    parts = []
    for violation in violations[:3]:
        field = str(_get(violation, "field") or "the request")
        description = scrub(str(_get(violation, "description") or "")).strip()
        parts.append(f"{field}" + (f" ({description})" if description else ""))
    more = f" and {len(violations) - 3} more" if len(violations) > 3 else ""
    return " at " + "; ".join(parts) + more


_EVENT_FIELD = re.compile(r"events\[(\d+)\]\.?(.*)")


def _event_violations(error: api.GoogleAPICallError, scrub: _Scrubber) -> dict[int, str]:
    """The events a refusal names (index in the request -> 'field: what Google said')."""
    events: dict[int, str] = {}
    for name, detail in _details(error):
        if name != "BadRequest":
            continue
        for violation in _get(detail, "fieldViolations", "field_violations") or []:
            found = _EVENT_FIELD.fullmatch(str(_get(violation, "field") or ""))
            if found:
                why = scrub(str(_get(violation, "description") or "")).strip()
                events.setdefault(int(found.group(1)),
                                  f"{found.group(2) or 'event'}: {why or 'invalid'}")
    return events


def _google_request_id(error: api.GoogleAPICallError) -> str:
    for name, detail in _details(error):
        if name == "RequestInfo":
            return str(_get(detail, "requestId", "request_id") or "")
    return ""


PROCESSING_FIXES: dict[str, str] = {
    "CLICK_NOT_FOUND": "Google matched no click: an event known by its hashed email only is a "
                       "person who never clicked this account's ads (or clicked with another "
                       "email); a gclid from another account's ads never matches. Prefer events "
                       "with a gclid, and check auto-tagging is on",
    "EVENT_TOO_OLD": "the conversion came later after its click than the action's "
                     "click-through window (at most 90 days): push more often, or widen the "
                     "window in the action's settings",
    "TOO_RECENT_CLICK": "the click was under 6 hours old: convsync holds such events; if they "
                        "still fail, the event times are likely in the wrong time zone",
    "CONVERSION_PRECEDES_CLICK": "the conversion's time is before its click: usually a time "
                                 "zone error in the source's timestamps",
    "INVALID_GCLID": "not a Google click id: check how the landing page captures gclid",
    "DUPLICATE_TRANSACTION_ID": "one transaction id twice in a request: report it (convsync "
                                "sends each once)",
    "DUPLICATE_GCLID": "the same click and time twice without a transaction id",
    "DENIED_CONSENT": "ad_user_data consent denied for the event: nothing to fix if that is "
                      "the user's choice",
    "NO_CONSENT": "the advertiser's consent is missing: set [google_ads] consent",
}
"""What to do about each processing error reason Google reports for a request, in Google Ads
terms (`convsync uploads` prints them)."""
