"""Meta sink: Conversions API events to the configured pixel (dataset), through
facebook-business's server-side classes (``EventRequest``, ``Event``, ``UserData``,
``CustomData``), sent on convsync's own API object (not the SDK's process-wide default).

What one request carries: at most 1,000 events, each with ``event_name`` = the conversion's
own upload name (``[meta] upload_events``: never the pixel's event, whose copy would win
Meta's deduplication), ``event_time`` (Unix seconds), ``event_id`` = the ledger's dedupe key
(Meta deduplicates event_id + event_name for 48 hours), ``action_source`` from the config,
``user_data`` (em, ph: the SHA-256 hashes under Meta's rule made on arrival; external_id
hashed here; fbc, fbp as they are) and ``custom_data`` (value, currency); ``test_event_code``
when the config has one.

One invalid event rejects the whole request, so ``problems`` checks each upload first. Meta's
answer says how many events it received: fewer than sent is an error. Transient Graph errors
(codes 1, 2, 4, 17, 341, HTTP 5xx, dropped connections) are retried here with tenacity;
token (190) and permission errors are reported with what to fix. Meta has no request status
to read back: a request it took is final.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence

from facebook_business.adobjects.adspixel import AdsPixel
from facebook_business.adobjects.serverside.action_source import ActionSource
from facebook_business.adobjects.serverside.custom_data import CustomData
from facebook_business.adobjects.serverside.event import Event
from facebook_business.adobjects.serverside.event_request import EventRequest
from facebook_business.adobjects.serverside.user_data import UserData
from facebook_business.exceptions import FacebookRequestError
from requests import exceptions as http_errors

from convsync.hashing import sha256_hex
from convsync.model import Platform, Upload
from convsync.retry import retrying
from convsync.settings import MetaSection
from convsync.sinks import SinkError, check_request, in_requests
from convsync.sources import meta as meta_source

MAX_EVENTS = 1_000
MAX_EVENT_ID = 64
SKEW = dt.timedelta(minutes=5)
"""How far ahead of Meta's clock an event may be (Meta refuses events in the future)."""
MARGIN = dt.timedelta(hours=1)
"""Events this close to Meta's age limit are not sent: the request may arrive after it."""
SEND = "ConversionsAPI"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_FBC = re.compile(r"fb\.[0-2]\.\d{13}\.\S+")
_FBP = re.compile(r"fb\.[0-2]\.\d{13}\.\d+")
_CURRENCY = re.compile(r"[A-Z]{3}")
FIXES = {
    **meta_source.FIXES,
    200: "the token lacks permission to send events to the pixel: give its system user the "
         "pixel (Business Settings > Data sources > Datasets > Assign people) with 'Manage'",
    10: "the token lacks permission to send events to the pixel: give its system user the "
        "pixel (Business Settings > Data sources > Datasets > Assign people) with 'Manage'",
    100: "Meta refused an event (named above): a convsync check missed it, please report it",
}


class MetaSink:
    """Sends uploads to one Meta pixel through the Conversions API."""

    destination = Platform.META
    settles = True
    max_events = MAX_EVENTS
    dedupe_window: dt.timedelta | None = dt.timedelta(hours=47)
    """Meta deduplicates an event_id + event_name for 48 hours (an hour kept in hand): a
    resend after that counts twice."""
    """A request Meta took is final: it has no request status to read back."""

    def __init__(self, api: meta_source.PacedApi, section: MetaSection, *,
                 sleep: Callable[[float], None] = time.sleep,
                 on_request: Callable[[str], None] | None = None) -> None:
        if not section.pixel_id:
            raise ValueError("set [meta] pixel_id: the pixel (dataset) the events go to")
        self.api = api
        self.section = section
        self.pixel_id = section.pixel_id
        self.sleep = sleep
        self.on_request = on_request

    def batches(self, uploads: Iterable[Upload]) -> Iterator[list[Upload]]:
        """Requests of at most 1,000 events (one pixel: the config's)."""
        return in_requests(uploads, MAX_EVENTS)

    def problems(self, upload: Upload, now: dt.datetime) -> str:
        """Why Meta would refuse a request carrying this upload ('' when it would not): the
        first problem, naming the field, never its value."""
        if upload.destination != Platform.META:
            return "destination: not a Meta upload"
        if upload.account_id != self.pixel_id:
            return "pixel: not the configured [meta] pixel_id"
        if not upload.dedupe_key or len(upload.dedupe_key) > MAX_EVENT_ID:
            return f"event_id: empty or longer than {MAX_EVENT_ID} characters"
        ids = upload.identifiers
        for name, value in (("em", ids.email_sha256_meta), ("ph", ids.phone_sha256_meta)):
            if value is not None and not _SHA256_HEX.fullmatch(value):
                return f"user_data.{name}: not a SHA-256 digest in lower-case hex"
        if ids.fbc is not None and not _FBC.fullmatch(ids.fbc):
            return "user_data.fbc: not Meta's fb.1.<milliseconds>.<fbclid>"
        if ids.fbp is not None and not _FBP.fullmatch(ids.fbp):
            return "user_data.fbp: not Meta's fb.1.<milliseconds>.<random number>"
        if not (ids.email_sha256_meta or ids.phone_sha256_meta or ids.external_id or ids.fbc
                or ids.fbp):
            return "user_data: no hashed email or phone, external id, fbc or fbp"
        if not math.isfinite(upload.value) or upload.value < 0:
            return "custom_data.value: not a finite, non-negative number"
        if not _CURRENCY.fullmatch(upload.currency or ""):
            return "custom_data.currency: not an ISO 4217 code of three capitals"
        if upload.time > now + SKEW:
            return "event_time: in the future"
        oldest = dt.timedelta(days=self.section.max_event_age_days) - MARGIN
        if now - upload.time > oldest:
            return (f"event_time: older than Meta takes ({self.section.max_event_age_days} "
                    "days, [meta] max_event_age_days)")
        return ""

    def send(self, uploads: Sequence[Upload], *, validate_only: bool = False) -> str:
        """One Conversions API request (retried on transient errors): an id for it (Meta's
        trace id; ``validate_only``: nothing is sent, Meta has no such mode, ""). SinkError
        when Meta refuses it; ``maybe_sent`` when Meta may have taken it anyway."""
        check_request(uploads, MAX_EVENTS, "Meta")
        if validate_only:
            return ""
        params = self._request(uploads).get_params()
        maybe_sent = False

        def attempt() -> dict[str, object]:
            nonlocal maybe_sent
            if self.on_request is not None:
                self.on_request(SEND)
            try:
                answer = AdsPixel(self.pixel_id, api=self.api).create_event(fields=[],
                                                                            params=params)
            except (FacebookRequestError, http_errors.RequestException) as error:
                maybe_sent = maybe_sent or _may_have_arrived(error)
                raise
            return dict(answer)

        try:
            answer = retrying(meta_source.RETRY, self.sleep)(attempt)
        except (FacebookRequestError, http_errors.RequestException) as error:
            raise _sink_error(error, len(uploads), maybe_sent) from None
        received = int(str(answer.get("events_received") or 0))
        if received != len(uploads):
            raise SinkError(f"Meta received {received:,} of {len(uploads):,} events",
                            reason="EVENTS_NOT_RECEIVED", maybe_sent=True,
                            fix="push again: the events go out under the same event ids, "
                                "which Meta deduplicates for 48 hours")
        return f"meta-{answer.get('fbtrace_id') or uuid.uuid4().hex}"

    def _request(self, uploads: Sequence[Upload]) -> EventRequest:
        source = ActionSource(self.section.action_source)
        events = [Event(event_name=u.conversion_action, event_time=int(u.time.timestamp()),
                        event_id=u.dedupe_key, action_source=source,
                        user_data=_user_data(u), custom_data=CustomData(
                            value=u.value, currency=u.currency.lower()))
                  for u in uploads]
        return EventRequest(pixel_id=self.pixel_id, events=events,
                            test_event_code=self.section.test_event_code)


def _user_data(upload: Upload) -> UserData:
    """Meta's user data: the Meta-rule hashes, the external id hashed, fbc / fbp as they are
    (``UserData`` leaves what is already a hex digest alone)."""
    ids = upload.identifiers
    return UserData(
        emails=[ids.email_sha256_meta] if ids.email_sha256_meta else None,
        phones=[ids.phone_sha256_meta] if ids.phone_sha256_meta else None,
        external_ids=[sha256_hex(ids.external_id)] if ids.external_id else None,
        fbc=ids.fbc, fbp=ids.fbp)


def _may_have_arrived(error: BaseException) -> bool:
    """An answer that never came (a timeout, a dropped connection, a server error): Meta may
    have taken the request. Not a refusal, and not a connection never made."""
    if isinstance(error, http_errors.ConnectTimeout):
        return False
    if isinstance(error, FacebookRequestError):
        return (error.http_status() or 0) >= 500
    return isinstance(error, http_errors.ConnectionError | http_errors.Timeout)


def _sink_error(error: BaseException, events: int, maybe_sent: bool) -> SinkError:
    what = f"Conversions API request of {events:,} event(s)"
    if not isinstance(error, FacebookRequestError):
        return SinkError(f"{what}: no answer from Meta ({type(error).__name__})",
                         reason="CONNECTION", retryable=True, maybe_sent=maybe_sent,
                         fix="push again later: the events go out under the same event ids")
    code = error.api_error_code()
    body = error.body() if isinstance(error.body(), dict) else {}
    detail = body.get("error", {}) if isinstance(body, dict) else {}
    said = str(detail.get("error_user_msg") or error.api_error_message() or "")
    index = re.search(r"\['data'\]\[(\d+)\]", said)
    retryable = meta_source.RETRY.is_retryable(error)
    return SinkError(
        f"{what} refused: Meta Graph API error {code} (HTTP {error.http_status()}): "
        f"{_scrub(said)}", reason=f"META_{code}", retryable=retryable,
        maybe_sent=maybe_sent,
        fix=FIXES.get(code, "") if isinstance(code, int) else "",
        events={int(index.group(1)): _scrub(re.sub(r"\['data'\]\[\d+\]", "['data'][i]", said))}
        if index and code == 100 else None)


def _scrub(text: str) -> str:
    """Meta's words without anything that looks like a hash or an email."""
    text = _SHA256_HEX.sub("***", text)
    return re.sub(r"\S+@\S+", "***", text)

