"""The Meta Conversions API simulator: ``POST /{version}/{pixel_id}/events`` on the Graph server.

``facebook-business`` sends ``EventRequest(...).execute()`` as a form-encoded POST to
``{FacebookSession.GRAPH}/{version}/{pixel_id}/events?access_token=...``: ``data`` is a JSON
array whose items are JSON *strings* of the events (``EventRequest.normalize``), beside
``test_event_code``, ``namespace_id``, ``upload_id``, ``upload_tag``, ``upload_source``,
``partner_agent``. ``AdsPixel.create_event`` sends ``data`` as a JSON array of objects, curl's
``-F`` a multipart form, other clients a JSON body ``{"data": [...], "access_token": ...}``:
all four are accepted, with the token in the query, the body or an ``Authorization`` header.

What is checked, as Meta documents it (``conversions-api/parameters``):

- the pixel is the world's (``world.accounts.meta_pixel_id``); another id gets Graph's
  "Unsupported post request" (code 100, subcode 33, GraphMethodException);
- ``data``: present, a non-empty array of at most 1,000 events;
- per event: ``event_name`` (non-empty string), ``event_time`` (integer Unix seconds, at most
  7 days old and not ahead of the world's clock by more than ``future_skew_seconds``),
  ``action_source`` (one of the SDK's ``ActionSource`` values; website events also need
  ``event_source_url`` and ``user_data.client_user_agent``), ``user_data`` with at least one
  identifier Meta matches on (``MATCH_KEYS``, or ``client_ip_address`` with
  ``client_user_agent``, or first and last name with a city, state, zip or birth date);
  contact fields (``HASHED_FIELDS``) SHA-256 as 64 lowercase hex characters; ``external_id``
  any non-empty string (Meta recommends hashing it and accepts it unhashed: the SDK sends it
  as given); ``fbc`` as ``fb.<0-2>.<creation time in ms>.<fbclid>``, ``fbp`` as
  ``fb.<0-2>.<ms>.<random>``; ``client_ip_address`` an IPv4 or IPv6 address;
  ``custom_data.value`` a finite number, with ``currency`` an ISO 4217 code (either case),
  both required for ``Purchase``.

One invalid event rejects the whole request and nothing is counted, in Graph's envelope:
HTTP 400, ``{"error": {"message": "Invalid parameter", "type": "OAuthException", "code": 100,
"error_subcode", "is_transient": false, "error_user_title", "error_user_msg", "fbtrace_id"}}``
where ``error_user_msg`` names the event as ``$['data'][i]`` (Meta's JSONPath form). Subcodes:
2804019 "Server-side API parameter error" (required, malformed or unhashed parameters),
2804003 "Event Timestamp Too Old", 2804050 when no usable customer information is given
(those three seen in public traces of Meta's answers); 2804004 for a future ``event_time`` is
the sandbox's choice (Meta's is undocumented).

Counting (what tests need to prove exactly once), per pixel on the world's clock: every
accepted event is *received*; an event with an ``event_id`` is deduplicated by
(``event_name``, ``event_id``) as Meta does, the first copy counted and any copy within 48
hours of it absorbed (a *duplicate*); a copy 48 hours or more after the counted one is counted
again (*counted twice*, the number convsync must keep at zero) and opens a new window. Events
without ``event_id`` are each counted. Requests with ``test_event_code`` go to the test view:
counted per code, never in the real counts and never deduplicated against them.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import secrets
import threading
from collections import Counter
from dataclasses import asdict, dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

import pycountry
from facebook_business.adobjects.serverside.action_source import ActionSource

from convsync.sandbox.control import Sandbox
from convsync.sandbox.http import ApiError, Request, Response
from convsync.sandbox.meta import JSON_TYPE, graph_error, invalid_param, unsupported_request
from convsync.sandbox.world import World

LABEL = "events"
"""The request counter's method label (``Sandbox.requests()["meta.events"]``)."""
MAX_EVENTS = 1_000
MAX_AGE_SECONDS = 7 * 86_400
DEDUPE_SECONDS = 48 * 3_600
FUTURE_SKEW_SECONDS = 300.0
ACTION_SOURCES: tuple[str, ...] = tuple(source.value for source in ActionSource)
HASHED_FIELDS = ("em", "ph", "fn", "ln", "ge", "db", "ct", "st", "zp", "country")
"""Contact information: "Hashing required" in Meta's customer information parameters."""
MATCH_KEYS = ("em", "ph", "external_id", "fbc", "fbp", "madid", "anon_id", "lead_id",
              "fb_login_id", "subscription_id", "ctwa_clid", "page_scoped_user_id", "ig_sid")
"""Each alone is enough customer information for Meta to try a match."""
NAME_PLACES = ("ct", "st", "zp", "db")

PARAMETER_SUBCODE, PARAMETER_TITLE = 2804019, "Server-side API parameter error"
TOO_OLD_SUBCODE, TOO_OLD_TITLE = 2804003, "Event Timestamp Too Old"
FUTURE_SUBCODE, FUTURE_TITLE = 2804004, "Event Timestamp In The Future"
NO_USER_DATA_SUBCODE, NO_USER_DATA_TITLE = 2804050, "Missing Customer Information"

SHA256 = re.compile(r"[0-9a-f]{64}")
FBC = re.compile(r"fb\.[0-2]\.\d{13}\.\S+")
FBP = re.compile(r"fb\.[0-2]\.\d{13}\.\S+")
REASONS_BY_CODE = {104: "no_access_token", 190: "expired_token", 17: "rate_limit",
                   4: "exhausted", 2: "server_error"}


def _currencies() -> frozenset[str]:
    return frozenset(str(getattr(c, "alpha_3", "")).upper() for c in pycountry.currencies)


CURRENCIES = _currencies()


# -- errors ---------------------------------------------------------------------------------
class CapiError(ApiError):
    """A refusal of a Conversions API request, with the reason it is counted under."""

    def __init__(self, reason: str, error: ApiError) -> None:
        super().__init__(error.response)
        self.reason = reason


def event_error(reason: str, user_msg: str, *, subcode: int = PARAMETER_SUBCODE,
                title: str = PARAMETER_TITLE) -> CapiError:
    """Meta's answer to an invalid event: "Invalid parameter", the detail for people."""
    return CapiError(reason, graph_error(
        400, 100, "Invalid parameter", subcode=subcode, transient=False,
        extra={"error_user_title": title, "error_user_msg": user_msg}))


def path(index: int, *keys: str | int) -> str:
    """``$['data'][3]['user_data']['em'][0]``: how Meta names a parameter of an event."""
    return f"$['data'][{index}]" + "".join(f"[{k}]" if isinstance(k, int) else f"['{k}']"
                                            for k in keys)


def throttle_error() -> ApiError:
    """The rate-limit answer on the events edge: code 17, transient."""
    return graph_error(400, 17, "(#17) User request limit reached", transient=True,
                       extra={"error_user_title": "Too Many Calls",
                              "error_user_msg": "There have been too many calls to this "
                                                "dataset. Please wait a bit and try again."})


def reason_of(error: ApiError) -> str:
    """The rejection reason of any error answered on the events edge."""
    if isinstance(error, CapiError):
        return error.reason
    body = error.response.body.get("error", {}) if isinstance(error.response.body, dict) else {}
    code = body.get("code")
    if code == 100 and body.get("error_subcode") == 33:
        return "unknown_pixel"
    return REASONS_BY_CODE.get(code, f"code_{code}") if isinstance(code, int) else "unknown"


# -- the request ------------------------------------------------------------------------------
def request_params(request: Request) -> dict[str, Any]:
    """Every parameter of a request: query, then a form (url-encoded or multipart) or a JSON
    object body, the later winning as on Graph. Values are strings, but for a JSON body's."""
    params: dict[str, Any] = {k: v[-1] for k, v in request.query.items() if v}
    content_type = request.headers.get("Content-Type", "")
    if not request.body:
        return params
    if "application/x-www-form-urlencoded" in content_type:
        params.update({k: v[-1] for k, v in request.form().items() if v})
    elif "multipart/form-data" in content_type:
        message = BytesParser(policy=HTTP).parsebytes(
            b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + request.body)
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if isinstance(name, str):
                payload = part.get_payload(decode=True)
                params[name] = payload.decode() if isinstance(payload, bytes) else ""
    elif "json" in content_type or request.body.lstrip()[:1] == b"{":
        try:
            body = json.loads(request.body)
        except ValueError:
            raise CapiError("invalid_body", invalid_param("The request body is not valid "
                                                          "JSON.")) from None
        if isinstance(body, dict):
            params.update(body)
    return params


def body_token(request: Request) -> str | None:
    """An ``access_token`` sent in a JSON or multipart body (Graph accepts both)."""
    content_type = request.headers.get("Content-Type", "")
    if not request.body or "x-www-form-urlencoded" in content_type:
        return None
    try:
        token = request_params(request).get("access_token")
    except ApiError:
        return None
    return token if isinstance(token, str) and token else None


def _events_of(params: dict[str, Any]) -> list[dict[str, Any]]:
    raw = params.get("data")
    if raw is None or raw == "":
        raise CapiError("missing_data", invalid_param("The parameter data is required"))
    data = raw
    if isinstance(raw, str):
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
    if not isinstance(data, list):
        raise CapiError("invalid_data", invalid_param("param data must be an array."))
    if not data:
        raise CapiError("empty_data", invalid_param("param data must be a non-empty array."))
    if len(data) > MAX_EVENTS:
        raise CapiError("too_many_events", invalid_param(
            f"param data must be an array of at most {MAX_EVENTS} events; {len(data)} were "
            "sent."))
    events = []
    for i, item in enumerate(data):
        event = item
        if isinstance(item, str):  # EventRequest sends each event as a JSON string
            try:
                event = json.loads(item)
            except ValueError:
                event = None
        if not isinstance(event, dict):
            raise event_error("invalid_event", f"The parameter {path(i)} must be a JSON "
                                               "object.")
        events.append(event)
    return events


# -- one event --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Accepted:
    """One valid event, as counting needs it."""

    name: str
    id: str | None
    value: float
    currency: str
    user_data: dict[str, Any] = field(default_factory=dict)
    time: int = 0


def check_event(i: int, event: dict[str, Any], now: float,
                future_skew: float = FUTURE_SKEW_SECONDS) -> Accepted:
    """The event, or the CapiError Meta answers for its first problem."""
    name = event.get("event_name")
    if not isinstance(name, str) or not name.strip():
        raise _required(i, "event_name")
    _check_time(i, event.get("event_time"), now, future_skew)
    source = event.get("action_source")
    if source is None or source == "":
        raise _required(i, "action_source")
    if source not in ACTION_SOURCES:
        raise event_error("invalid_action_source", f"The parameter {path(i, 'action_source')} "
                          f"must be one of: {', '.join(ACTION_SOURCES)}.")
    user_data = event.get("user_data")
    if user_data is None:
        raise _required(i, "user_data")
    if not isinstance(user_data, dict):
        raise event_error("invalid_user_data", f"The parameter {path(i, 'user_data')} must be "
                                               "a JSON object.")
    _check_user_data(i, user_data)
    if source == "website":
        if not _text(event.get("event_source_url")):
            raise _required(i, "event_source_url", what="for website events")
        if not _text(user_data.get("client_user_agent")):
            raise _required(i, "user_data", "client_user_agent", what="for website events")
    value, currency = _check_custom_data(i, event.get("custom_data"), name)
    event_id = event.get("event_id")
    if event_id is not None and (isinstance(event_id, bool)
                                 or not isinstance(event_id, str | int)):
        raise event_error("invalid_event_id", f"The parameter {path(i, 'event_id')} must be a "
                                              "string.")
    key = str(event_id) if event_id is not None and str(event_id) != "" else None
    return Accepted(name, key, value, currency, user_data, int(event.get("event_time") or 0))


def _required(i: int, *keys: str, what: str = "") -> CapiError:
    suffix = f" {what}" if what else ""
    return event_error("missing_parameter", f"The parameter {path(i, *keys)} is required"
                                            f"{suffix}.")


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _check_time(i: int, raw: Any, now: float, future_skew: float) -> None:
    if raw is None or raw == "":
        raise _required(i, "event_time")
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise event_error("invalid_event_time", f"The parameter {path(i, 'event_time')} must "
                                                "be an integer: a Unix timestamp in seconds.")
    if raw < now - MAX_AGE_SECONDS:
        raise event_error(
            "event_time_too_old",
            "The timestamp for this event is too far in the past. Events need to be sent from "
            "your server within 7 days of when they occurred. Enter a timestamp that has "
            f"occurred within the last 7 days ({path(i, 'event_time')}).",
            subcode=TOO_OLD_SUBCODE, title=TOO_OLD_TITLE)
    if raw > now + future_skew:
        raise event_error(
            "event_time_in_future",
            "The timestamp for this event is in the future. Enter the time the event actually "
            "occurred, as a Unix timestamp in seconds in GMT "
            f"({path(i, 'event_time')}).", subcode=FUTURE_SUBCODE, title=FUTURE_TITLE)


def _values(i: int, user_data: dict[str, Any], key: str) -> list[str]:
    """A user_data parameter's values (a string or a list of strings), empty ones dropped."""
    raw = user_data.get(key)
    if raw is None:
        return []
    items = raw if isinstance(raw, list) else [raw]
    if not all(isinstance(v, str) for v in items):
        raise event_error("invalid_user_data", f"The parameter {path(i, 'user_data', key)} "
                                               "must be a string or a list of strings.")
    return [v for v in items if v.strip()]


def _check_user_data(i: int, user_data: dict[str, Any]) -> None:
    for key in HASHED_FIELDS:
        raw = user_data.get(key)
        for j, value in enumerate(_values(i, user_data, key)):
            if not SHA256.fullmatch(value):
                where = path(i, "user_data", key, j) if isinstance(raw, list) else \
                    path(i, "user_data", key)
                raise event_error(
                    "unhashed_user_data",
                    f"The parameter {where} must be the SHA-256 hash of the normalized value, "
                    "as 64 lowercase hexadecimal characters: customer contact information is "
                    "not accepted unhashed.")
    for key, pattern, form in (("fbc", FBC, "fb.1.<creation time in milliseconds>.<fbclid>"),
                               ("fbp", FBP, "fb.1.<creation time in milliseconds>.<random>")):
        for value in _values(i, user_data, key):
            if not pattern.fullmatch(value):
                raise event_error(f"invalid_{key}", f"The parameter {path(i, 'user_data', key)} "
                                                    f"must be formatted as {form}.")
    for value in _values(i, user_data, "client_ip_address"):
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise event_error(
                "invalid_client_ip_address",
                f"The parameter {path(i, 'user_data', 'client_ip_address')} must be a valid "
                "IPv4 or IPv6 address.") from None
    present = {k for k in user_data if k in (*MATCH_KEYS, *HASHED_FIELDS, "client_ip_address",
                                             "client_user_agent") and _values(i, user_data, k)}
    if (present & set(MATCH_KEYS)
            or {"client_ip_address", "client_user_agent"} <= present
            or ({"fn", "ln"} <= present and present & set(NAME_PLACES))):
        return
    raise event_error(
        "missing_user_data",
        f"The parameter {path(i, 'user_data')} does not contain enough customer information "
        "to match this event: send at least one of em, ph, external_id, fbc, fbp (or "
        "client_ip_address with client_user_agent).",
        subcode=NO_USER_DATA_SUBCODE, title=NO_USER_DATA_TITLE)


def _check_custom_data(i: int, custom: Any, name: str) -> tuple[float, str]:
    if custom is None:
        custom = {}
    if not isinstance(custom, dict):
        raise event_error("invalid_custom_data", f"The parameter {path(i, 'custom_data')} must "
                                                 "be a JSON object.")
    value, currency = custom.get("value"), custom.get("currency")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                              or not math.isfinite(value)):
        raise event_error("invalid_value", f"The parameter {path(i, 'custom_data', 'value')} "
                                           "must be a number.")
    if currency is not None and (not isinstance(currency, str)
                                 or currency.upper() not in CURRENCIES):
        raise event_error("invalid_currency", f"The parameter "
                                              f"{path(i, 'custom_data', 'currency')} must be a "
                                              "valid ISO 4217 currency code.")
    if value is not None and currency is None:
        raise _required(i, "custom_data", "currency", what="when value is sent")
    if name == "Purchase":
        for key, given in (("value", value), ("currency", currency)):
            if given is None:
                raise _required(i, "custom_data", key, what="for Purchase events")
    return float(value or 0.0), (currency or "").upper()


# -- counting ---------------------------------------------------------------------------------
@dataclass
class EventCounts:
    """What the sandbox did with the copies of one (event_name, event_id) on one pixel."""

    received: int = 0  # copies received in accepted requests (test events apart)
    counted: int = 0  # 1 once counted; 2 or more: counted twice (a copy 48 h or more later)
    duplicates: int = 0  # copies absorbed by Meta's deduplication
    value: float = 0.0  # the values of the counted copies, summed
    currency: str = ""
    user_data: dict[str, Any] = field(default_factory=dict)  # the first counted copy's
    time: int = 0  # the first counted copy's event_time


@dataclass
class _Pixel:
    events_received: int = 0
    without_event_id: int = 0
    value_without_event_id: float = 0.0
    test_events: Counter[str] = field(default_factory=Counter)
    keys: dict[tuple[str, str], EventCounts] = field(default_factory=dict)
    windows: dict[tuple[str, str], float] = field(default_factory=dict)  # counted at (world)


class ConversionsApi:
    """The events edge of the world's pixel, and what it counted. Thread-safe.

    :meth:`events` answers ``POST /{pixel_id}/events`` once ``MetaGraph`` authenticated it;
    :meth:`rejected` counts a refusal (validation, credentials, faults)."""

    label = LABEL

    def __init__(self, sandbox: Sandbox, *, pixels: tuple[str, ...] = (),
                 future_skew_seconds: float = FUTURE_SKEW_SECONDS) -> None:
        self.sandbox = sandbox
        self.pixels = pixels or (sandbox.world.accounts.meta_pixel_id,)
        self.future_skew_seconds = future_skew_seconds
        self._lock = threading.Lock()
        self._pixels: dict[str, _Pixel] = {}
        self._accepted = 0
        self._rejections: Counter[str] = Counter()

    @property
    def world(self) -> World:
        return self.sandbox.world

    # -- the edge ------------------------------------------------------------------------------
    @staticmethod
    def throttle_error() -> ApiError:
        return throttle_error()

    @staticmethod
    def body_token(request: Request) -> str | None:
        return body_token(request)

    def events(self, request: Request, node: str) -> Response:
        if node not in self.pixels:
            raise CapiError("unknown_pixel", unsupported_request("POST", node))
        params = request_params(request)
        raw_events = _events_of(params)
        test_code = params.get("test_event_code")
        if test_code is not None and not isinstance(test_code, str):
            raise CapiError("invalid_test_event_code",
                            invalid_param("param test_event_code must be a string."))
        now = self.world.as_of_ts
        accepted = [check_event(i, e, now, self.future_skew_seconds)
                    for i, e in enumerate(raw_events)]
        with self._lock:
            self._count(node, accepted, test_code or None, self.world.as_of_ts)
        body = {"events_received": len(accepted), "messages": [],
                "fbtrace_id": secrets.token_urlsafe(17)}
        return Response(200, body, content_type=JSON_TYPE)

    def _count(self, pixel_id: str, events: list[Accepted], test_code: str | None,
               now: float) -> None:
        self._accepted += 1
        pixel = self._pixels.setdefault(pixel_id, _Pixel())
        if test_code is not None:
            pixel.test_events[test_code] += len(events)
            return
        pixel.events_received += len(events)
        for event in events:
            if event.id is None:
                pixel.without_event_id += 1
                pixel.value_without_event_id += event.value
                continue
            key = (event.name, event.id)
            counts = pixel.keys.setdefault(key, EventCounts())
            counts.received += 1
            first = pixel.windows.get(key)
            if first is not None and now - first < DEDUPE_SECONDS:
                counts.duplicates += 1
                continue
            pixel.windows[key] = now
            if not counts.counted:
                counts.user_data, counts.time = event.user_data, event.time
            counts.counted += 1
            counts.value += event.value
            counts.currency = event.currency or counts.currency

    def rejected(self, error: ApiError) -> None:
        """Count a refused request under its reason (``reason_of``)."""
        with self._lock:
            self._rejections[reason_of(error)] += 1

    # -- what tests and the control endpoint read ----------------------------------------------
    def counts(self, pixel_id: str | None = None) -> dict[tuple[str, str], EventCounts]:
        """Per (event_name, event_id) of one pixel (the world's by default): copies received,
        counted, absorbed."""
        with self._lock:
            pixel = self._pixels.get(pixel_id or self.pixels[0])
            if pixel is None:
                return {}
            return {k: EventCounts(**asdict(v)) for k, v in pixel.keys.items()}

    def counted_twice(self, pixel_id: str | None = None) -> int:
        """Events Meta counted more than once: 0 is the exactly-once proof."""
        return sum(c.counted - 1 for c in self.counts(pixel_id).values() if c.counted > 1)

    def rejections(self) -> dict[str, int]:
        with self._lock:
            return dict(self._rejections)

    def reset(self) -> None:
        """Forget every count and the deduplication windows."""
        with self._lock:
            self._pixels.clear()
            self._accepted = 0
            self._rejections.clear()

    def summary(self, pixel_id: str | None = None, with_events: bool = True) -> dict[str, Any]:
        """What the sandbox counted, as the control endpoint reports it."""
        with self._lock:
            rejected = sum(self._rejections.values())
            out: dict[str, Any] = {
                "requests": self._accepted + rejected, "accepted_requests": self._accepted,
                "rejected_requests": rejected, "rejections": dict(self._rejections),
            }
            pixels = {}
            for pid, pixel in sorted(self._pixels.items()):
                if pixel_id is not None and pid != pixel_id:
                    continue
                counts = pixel.keys.values()
                row: dict[str, Any] = {
                    "events_received": pixel.events_received,
                    "events_counted": sum(c.counted for c in counts) + pixel.without_event_id,
                    "duplicates": sum(c.duplicates for c in counts),
                    "counted_twice": sum(c.counted - 1 for c in counts if c.counted > 1),
                    "without_event_id": pixel.without_event_id,
                    "accepted_value": round(sum(c.value for c in counts)
                                            + pixel.value_without_event_id, 2),
                    "test_events": dict(pixel.test_events),
                }
                if with_events:
                    by_name: dict[str, dict[str, Any]] = {}
                    for (name, event_id), c in sorted(pixel.keys.items()):
                        by_name.setdefault(name, {})[event_id] = asdict(c)
                    row["events"] = by_name
                pixels[pid] = row
            out["pixels"] = pixels
        return out
