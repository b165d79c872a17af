"""Klaviyo sink: one event per valued conversion on the person's Klaviyo profile, through
klaviyo-api's Bulk Create Events (``Events.bulk_create_events_with_http_info``: at most 1,000
events and 5 MB a request, 10 requests a second and 150 a minute).

Each event: the metric of the conversion (``[klaviyo] upload_metrics``: one of convsync's
own, never Klaviyo's metric for the same action, which would count it twice), the profile by
the id seen when pulling (never an email: convsync keeps none), ``time``, ``value`` and
``value_currency``, ``unique_id`` = the ledger's dedupe key (Klaviyo keeps the first event of
a profile, metric and unique id; one repeated inside a bulk request fails the request, and the
ledger's keys never repeat), and ``backfill`` for events over a day old, so history never
fires a flow. The SDK's own retries are off (the source's client); transient answers (429, 5xx,
dropped connections) are retried here with tenacity, paced by Klaviyo's windows. Klaviyo
answers a bulk request 202 and never says what became of each event: a request it took is
final.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from klaviyo_api import KlaviyoAPI
from openapi_client.exceptions import ApiException
from urllib3.exceptions import ProtocolError
from urllib3.exceptions import TimeoutError as Urllib3Timeout

from convsync.model import Platform, Upload
from convsync.retry import retrying
from convsync.sinks import SinkError, check_request, in_requests
from convsync.sources import klaviyo as klaviyo_source

MAX_EVENTS = 1_000
MAX_UNIQUE_ID = 100
BACKFILL_AFTER = dt.timedelta(days=1)
"""Events older than this are sent as history: recorded, never firing a flow."""
SEND = "bulk_create_events"
_CURRENCY = re.compile(r"[A-Z]{3}")
_OLDEST = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
FIXES = {
    401: "the private API key is wrong or was revoked: set CONVSYNC_KLAVIYO_API_KEY",
    403: "the private API key lacks the events:write scope: add it in Klaviyo > Settings > "
         "API keys (or make a key with it) and set CONVSYNC_KLAVIYO_API_KEY",
    400: "Klaviyo refused an event (named above): a convsync check missed it, please report it",
}


class KlaviyoSink:
    """Sends uploads to one Klaviyo account as events on its profiles."""

    destination = Platform.KLAVIYO
    settles = True
    max_events = MAX_EVENTS
    dedupe_window: dt.timedelta | None = None
    """Klaviyo keeps the first event of a profile, metric and unique id for good."""
    """A request Klaviyo took (202) is final: it has no status to read back."""

    def __init__(self, client: KlaviyoAPI, *, sleep: Callable[[float], None] = time.sleep,
                 on_request: Callable[[str], None] | None = None,
                 clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)) -> None:
        self.events = client.Events
        self.sleep = sleep
        self.on_request = on_request
        self.clock = clock
        self.pace = klaviyo_source.Pace(sleep=sleep)

    def batches(self, uploads: Iterable[Upload]) -> Iterator[list[Upload]]:
        """Requests of at most 1,000 events."""
        return in_requests(uploads, MAX_EVENTS)

    def problems(self, upload: Upload, now: dt.datetime) -> str:
        """Why Klaviyo would refuse a request carrying this upload ('' when it would not)."""
        if upload.destination != Platform.KLAVIYO:
            return "destination: not a Klaviyo upload"
        if not upload.identifiers.klaviyo_profile_id:
            return "profile: no Klaviyo profile id"
        if not upload.conversion_action or len(upload.conversion_action) >= 128:
            return "metric: empty or 128 characters or more"
        if not upload.dedupe_key or len(upload.dedupe_key) > MAX_UNIQUE_ID:
            return f"unique_id: empty or longer than {MAX_UNIQUE_ID} characters"
        if not math.isfinite(upload.value):
            return "value: not a finite number"
        if not _CURRENCY.fullmatch(upload.currency or ""):
            return "value_currency: not an ISO 4217 code of three capitals"
        if not _OLDEST <= upload.time <= now + dt.timedelta(minutes=5):
            return "time: before 2000 or in the future"
        return ""

    def send(self, uploads: Sequence[Upload], *, validate_only: bool = False) -> str:
        """One Bulk Create Events request (retried on transient errors): an id of convsync's
        for it (Klaviyo gives a bulk job none). SinkError when Klaviyo refuses it;
        ``maybe_sent`` when Klaviyo may have taken it anyway. ``validate_only``: nothing is
        sent (Klaviyo has no such mode), ""."""
        check_request(uploads, MAX_EVENTS, "Klaviyo")
        if validate_only:
            return ""
        body, positions = self._job(uploads)
        maybe_sent = False

        def attempt() -> None:
            nonlocal maybe_sent
            self.pace.wait(SEND)
            if self.on_request is not None:
                self.on_request(SEND)
            try:
                answer = self.events.bulk_create_events_with_http_info(
                    body, _request_timeout=klaviyo_source.TIMEOUT)
            except (ApiException, Urllib3Timeout, ProtocolError) as error:
                self.pace.observe(SEND, getattr(error, "headers", None))
                maybe_sent = maybe_sent or _may_have_arrived(error)
                raise
            self.pace.observe(SEND, answer.headers)

        try:
            retrying(klaviyo_source.RETRY, self.sleep)(attempt)
        except (ApiException, Urllib3Timeout, ProtocolError) as error:
            raise _sink_error(error, positions, maybe_sent) from None
        return f"klaviyo-{uuid.uuid4().hex}"

    def _job(self, uploads: Sequence[Upload]) -> tuple[dict[str, Any], list[list[int]]]:
        """The bulk job: the events grouped by profile and by history or not, in order; and
        where each upload went (entry -> event -> index in ``uploads``)."""
        now = self.clock()
        entries: dict[tuple[str, bool], list[dict[str, Any]]] = {}
        positions: dict[tuple[str, bool], list[int]] = {}
        for i, u in enumerate(uploads):
            key = (u.identifiers.klaviyo_profile_id or "", now - u.time > BACKFILL_AFTER)
            positions.setdefault(key, []).append(i)
            entries.setdefault(key, []).append(
                {"type": "event", "attributes": {
                    "metric": {"data": {"type": "metric",
                                        "attributes": {"name": u.conversion_action}}},
                    "properties": {"conversion": u.conversion, "source": "convsync"},
                    "time": u.time.isoformat(), "value": u.value,
                    "value_currency": u.currency, "unique_id": u.dedupe_key}})
        body = {"data": {"type": "event-bulk-create-job", "attributes": {"events-bulk-create": {
            "data": [{"type": "event-bulk-create", "attributes": {
                "backfill": backfill,
                "profile": {"data": {"type": "profile", "id": profile, "attributes": {}}},
                "events": {"data": events}}}
                for (profile, backfill), events in entries.items()]}}}}
        return body, list(positions.values())


def _may_have_arrived(error: BaseException) -> bool:
    """An answer that never came (a timeout, a dropped connection, a server error)."""
    if isinstance(error, ApiException):
        return (error.status or 0) >= 500
    return True


def _sink_error(error: BaseException, positions: list[list[int]],
                maybe_sent: bool) -> SinkError:
    what = f"Klaviyo bulk request of {sum(map(len, positions)):,} event(s)"
    if not isinstance(error, ApiException):
        return SinkError(f"{what}: no answer from Klaviyo ({type(error).__name__})",
                         reason="CONNECTION", retryable=True, maybe_sent=maybe_sent,
                         fix="push again later: the events go out under the same unique ids")
    status = error.status or 0
    detail, pointer = _first_error(error)
    at = re.search(r"/events-bulk-create/data/(\d+)/attributes/(?:events/data/(\d+))?", pointer)
    named = {}
    if at and status == 400 and int(at.group(1)) < len(positions):
        entry = positions[int(at.group(1))]  # a profile's events: all of them, or the one named
        named = {i: detail for n, i in enumerate(entry)
                 if at.group(2) is None or n == int(at.group(2))}
    return SinkError(f"{what} refused: HTTP {status}: {detail}", reason=f"HTTP_{status}",
                     retryable=klaviyo_source.RETRY.is_retryable(error), maybe_sent=maybe_sent,
                     fix=FIXES.get(status, ""), events=named)


def _first_error(error: ApiException) -> tuple[str, str]:
    """Klaviyo's first JSON:API error: its detail and where it points (no value of ours: the
    detail names the field)."""
    try:
        first = json.loads(error.body or "{}")["errors"][0]
    except (ValueError, KeyError, IndexError, TypeError):
        return str(error.reason or "error"), ""
    pointer = str((first.get("source") or {}).get("pointer") or "")
    return re.sub(r"\S+@\S+", "***", str(first.get("detail") or first.get("title"))), pointer
