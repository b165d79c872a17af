"""Klaviyo's event upload side: ``POST /api/events`` (Create Event) and
``POST /api/event-bulk-create-jobs`` (Bulk Create Events), as the klaviyo-api SDK sends them.

What a request must be (revision 2026-10-15): a JSON:API document, ``data.type`` ``event`` (one
event: ``attributes`` holds ``metric``, ``profile``, ``properties`` and the optional ``time``,
``value``, ``value_currency``, ``unique_id``, ``backfill``) or ``event-bulk-create-job``
(``attributes["events-bulk-create"].data``: entries of ``type`` ``event-bulk-create``, each a
``profile``, an optional ``backfill`` and ``events.data``, events of ``type`` ``event`` with the
same attributes but ``profile``). Up to 1,000 events and 5 MB a request. Any problem refuses the
whole request with one JSON:API error (400 ``invalid``, ``source.pointer`` at the attribute to
blame); an accepted request is answered 202 with no body, as Klaviyo answers both.

Profiles: by ``id`` a profile of the world (one of its identified people whose first visit is
not after the world's now), else refused; by ``email`` the world's person with that address, or
else (and by ``phone_number``, ``external_id``, ``anonymous_id``, ``_kx``) a profile the sandbox
makes up for it, counted in ``profiles_created`` and known by its id afterwards.

Deduplication is Klaviyo's: an event's key is (profile, metric, ``unique_id``), and an event sent
without ``unique_id`` takes its time to the second (``time``, else when it was received). Across
requests the first event under a key is kept and later ones absorbed (``duplicates``); a key
repeated inside one bulk request fails the whole request. "Received" is the world's clock
running with the wall clock from the moment it was last set, so a resend a second later is a
new event, as on Klaviyo.

Rate limits are enforced per endpoint in Klaviyo's fixed windows (a burst second and a steady
minute, each opened by the first request after the last one closed): 350/s and 3,500/min for
Create Event, 10/s and 150/min for Bulk Create Events; beyond, 429 ``throttled`` with
``Retry-After`` (and no ``RateLimit-*`` headers, which every other answer carries).

Counts for tests (:meth:`KlaviyoEvents.summary`, control ``GET /klaviyo/events``): per metric
the events recorded, their value, duplicates absorbed, events counted twice (a new event whose
properties, value and currency repeat one already recorded for the profile and metric under
another key: the same conversion counted twice), flows fired (recorded events not backfilled)
and backfilled events; per (profile, metric, key) the times received; refusals by reason.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from convsync.sandbox.control import Sandbox
from convsync.sandbox.http import ApiError, Handler, Request, Response
from convsync.sandbox.klaviyo import JSON_API, error_document
from convsync.sandbox.world import World, _token

CREATE_EVENT = "create_event"
BULK_CREATE_EVENTS = "bulk_create_events"
PATHS = {"/api/events": CREATE_EVENT, "/api/event-bulk-create-jobs": BULK_CREATE_EVENTS}
"""The write endpoints, by path, and the SDK's operation names they are counted under."""
LABELS = frozenset(PATHS.values())

BULK_POINTER = "/data/attributes/events-bulk-create/data"
EARLIEST = dt.datetime(2000, 1, 1, tzinfo=dt.UTC).timestamp()
YEAR = 365 * 86400
MAX_METRIC_NAME = 127  # "Must be less than 128 characters."
MAX_PROPERTIES = 400
MAX_STRING_BYTES = 100 * 1024
MAX_ARRAY_ITEMS = 4000
MAX_NESTING = 10
PROFILE_IDENTIFIERS = ("email", "phone_number", "external_id", "anonymous_id", "_kx")

_ISO_4217 = """
AED AFN ALL AMD AOA ARS AUD AWG AZN BAM BBD BDT BHD BIF BMD BND BOB BOV BRL BSD BTN BWP BYN BZD
CAD CDF CHE CHF CHW CLF CLP CNY COP COU CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD FKP
GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS KHR
KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN
MXV MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR RON RSD RUB RWF SAR SBD
SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH UGX
USD USN UYI UYU UYW UZS VED VES VND VUV WST XAD XAF XAG XAU XBA XBB XBC XBD XCD XCG XDR XOF XPD
XPF XPT XSU XTS XUA XXX YER ZAR ZMW ZWG"""
CURRENCIES = frozenset(_ISO_4217.split())
"""ISO 4217 codes (the list of late 2026)."""

_PROFILE_ID = re.compile(r"01[0-9a-f]{24}")
_PERSON = re.compile(r"d(\d+)i(\d+)")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_PHONE = re.compile(r"\+[1-9]\d{6,14}")


# -- settings and counters ------------------------------------------------------------------

@dataclass
class KlaviyoEventsConfig:
    create_event_burst: int = 350
    create_event_steady: int = 3500
    bulk_create_events_burst: int = 10
    bulk_create_events_steady: int = 150
    max_bulk_events: int = 1000
    max_payload_bytes: int = 5 * 1024 * 1024

    def limits(self, label: str) -> tuple[int, int]:
        """(per second, per minute) for an endpoint label."""
        return getattr(self, f"{label}_burst"), getattr(self, f"{label}_steady")


@dataclass
class MetricCounts:
    """What the sandbox did with the events of one metric (by name)."""

    events: int = 0  # recorded: new keys
    value: float = 0.0  # their values summed (currencies as sent, unconverted)
    received: int = 0  # events received in accepted requests, duplicates included
    duplicates: int = 0  # absorbed: a key already recorded
    counted_twice: int = 0  # recorded again under another key: must stay 0
    flows_fired: int = 0  # recorded events that were not backfilled
    backfilled: int = 0


@dataclass(frozen=True)
class ReceivedEvent:
    """An event recorded (the first one received under its key)."""

    profile_id: str
    metric: str
    key: str  # unique_id, or the time to the second when none was sent
    unique_id: str | None
    time: dt.datetime
    time_sent: bool
    value: float | None
    value_currency: str | None
    properties: dict[str, Any]
    backfill: bool
    endpoint: str


@dataclass
class _Parsed:
    profile_id: str
    created: bool  # a profile the sandbox makes up (no world profile behind it)
    metric: str
    properties: dict[str, Any]
    ts: int  # whole seconds
    time_sent: bool
    value: float | None
    currency: str | None
    unique_id: str | None
    backfill: bool
    pointer: str  # of the event's attributes

    @property
    def key(self) -> str:
        if self.unique_id is not None:
            return self.unique_id
        return "time:" + dt.datetime.fromtimestamp(self.ts, dt.UTC).isoformat()

    def fingerprint(self) -> tuple[Any, ...] | None:
        """What makes two events the same conversion; None when there is nothing to tell
        (no properties and no value: two such events may well be two events)."""
        if not self.properties and self.value is None:
            return None
        return (self.profile_id, self.metric, json.dumps(self.properties, sort_keys=True,
                                                         default=str),
                self.value, self.currency)


class Refusal(Exception):
    """A request Klaviyo refuses: the reason it is counted under and its JSON:API answer."""

    def __init__(self, reason: str, detail: str, pointer: str, status: int = 400,
                 code: str = "invalid", title: str = "Invalid input.") -> None:
        super().__init__(detail)
        self.reason, self.detail, self.pointer = reason, detail, pointer
        self.status, self.code, self.title = status, code, title

    def response(self) -> Response:
        body = error_document(self.status, self.code, self.title, self.detail,
                              {"pointer": self.pointer})
        return Response(self.status, body, content_type=JSON_API)


# -- the world's profiles ---------------------------------------------------------------------

def world_profile_id(world: World, day: int, person: int) -> str:
    """The Klaviyo profile id of one of the world's people (as ``World.klaviyo_events`` gives)."""
    return "01" + _token(world.spec.seed, "prof", day, person, 24)


class WorldProfiles:
    """The world's Klaviyo profiles, found by id or by email. Ids are hashes, so finding one
    means an index of every identified person (built once, on the first look-up by id: a few
    milliseconds for the test worlds, a few seconds for ``--scale large``)."""

    def __init__(self, world: World) -> None:
        self.world = world
        self._lock = threading.Lock()
        self._index: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def exists(self, day: int, person: int) -> bool:
        """An identified person whose first visit is not after the world's now."""
        world = self.world
        if not world.first_day <= day <= world.last_day:
            return False
        people = world.day(day)
        return (0 <= person < people.size and bool(people.identified[person])
                and float(people.click_ts[person]) <= world.as_of_ts)

    def by_id(self, profile_id: str) -> bool:
        if not _PROFILE_ID.fullmatch(profile_id):
            return False
        keys, days, people = self._built()
        key = np.uint64(int(profile_id[2:18], 16))
        position = int(np.searchsorted(keys, key))
        while position < keys.size and keys[position] == key:
            day, person = int(days[position]), int(people[position])
            if world_profile_id(self.world, day, person) == profile_id:
                return self.exists(day, person)
            position += 1
        return False

    def by_email(self, email: str) -> str | None:
        """The profile id of the world's person with this address (as typed, or trimmed and
        lower-cased), or None."""
        wanted = email.strip().lower()
        found = _PERSON.findall(wanted.partition("@")[0])
        if not found:
            return None
        day, person = int(found[-1][0]), int(found[-1][1])
        if not self.exists(day, person):
            return None
        if self.world.email(day, person).strip().lower() != wanted:
            return None
        return world_profile_id(self.world, day, person)

    def _built(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with self._lock:
            if self._index is None:
                self._index = self._build()
            return self._index

    def _build(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        world, seed = self.world, self.world.spec.seed
        keys, days, people = [], [], []
        for day in world.days_between(world.first_day, world.last_day):
            identified = np.nonzero(day.identified)[0]
            keys.append(np.array([int(_token(seed, "prof", day.day, i, 16), 16)
                                  for i in identified.tolist()], dtype=np.uint64))
            days.append(np.full(identified.size, day.day, dtype=np.int32))
            people.append(identified.astype(np.int32))
        if not keys:
            empty = np.zeros(0, dtype=np.int32)
            return np.zeros(0, dtype=np.uint64), empty, empty
        all_keys = np.concatenate(keys)
        order = np.argsort(all_keys, kind="stable")
        return all_keys[order], np.concatenate(days)[order], np.concatenate(people)[order]


# -- rate limits -------------------------------------------------------------------------------

class _Windows:
    """Klaviyo's fixed windows for one endpoint: a second and a minute, each opened by the
    first request after the previous one closed."""

    def __init__(self) -> None:
        self.second = (0.0, 0)
        self.minute = (0.0, 0)
        self.opened = False

    def take(self, now: float, burst: int, steady: int) -> tuple[float | None, dict[str, str]]:
        """(seconds to wait, None when the request may go; the RateLimit-* headers)."""
        if not self.opened or now - self.second[0] >= 1.0:
            self.second = (now, 0)
        if not self.opened or now - self.minute[0] >= 60.0:
            self.minute = (now, 0)
        self.opened = True
        waits = []
        if self.second[1] >= burst:
            waits.append(self.second[0] + 1.0 - now)
        if self.minute[1] >= steady:
            waits.append(self.minute[0] + 60.0 - now)
        if waits:
            return max(waits), {}
        self.second = (self.second[0], self.second[1] + 1)
        self.minute = (self.minute[0], self.minute[1] + 1)
        reset = max(1, math.ceil(self.minute[0] + 60.0 - now))
        return None, {"RateLimit-Limit": str(steady),
                      "RateLimit-Remaining": str(max(steady - self.minute[1], 0)),
                      "RateLimit-Reset": str(reset)}


# -- the service ---------------------------------------------------------------------------------

@dataclass
class _State:
    events: dict[tuple[str, str, str], ReceivedEvent] = field(default_factory=dict)
    received: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    fingerprints: dict[tuple[Any, ...], list[int | None]] = field(default_factory=dict)
    metrics: dict[str, MetricCounts] = field(default_factory=dict)
    accepted_requests: Counter[str] = field(default_factory=Counter)
    rejections: Counter[str] = field(default_factory=Counter)
    created_profiles: set[str] = field(default_factory=set)


class KlaviyoEvents:
    """The Klaviyo event upload endpoints of one sandbox: validation, deduplication, rate
    limits and the counters tests read. ``clock``: monotonic seconds, for the rate windows and
    for the time of receipt (tests pass one they move themselves). Thread-safe."""

    def __init__(self, sandbox: Sandbox, clock: Callable[[], float] = time.monotonic) -> None:
        self.sandbox = sandbox
        self.clock = clock
        self.config = KlaviyoEventsConfig()
        self._lock = threading.RLock()
        self._state = _State()
        self._windows: dict[str, _Windows] = {}
        self._origin: tuple[float, float] | None = None
        self._profiles: WorldProfiles | None = None

    @property
    def world(self) -> World:
        return self.sandbox.world

    @property
    def profiles(self) -> WorldProfiles:
        with self._lock:
            if self._profiles is None or self._profiles.world is not self.world:
                self._profiles = WorldProfiles(self.world)
            return self._profiles

    # -- routing (called by the Klaviyo simulator) ------------------------------------------
    def route(self, method: str, path: str) -> tuple[str, Handler] | None:
        """(label, handler) for a write endpoint; None for every other request."""
        label = PATHS.get(path)
        if label is None or (method != "POST" and label == CREATE_EVENT):
            return None  # GET /api/events is the read side's
        if method != "POST":
            body = error_document(405, "method_not_allowed", f'Method "{method}" not allowed.',
                                  f'Method "{method}" not allowed.')
            raise ApiError(Response(405, body, content_type=JSON_API))
        return label, lambda request: self.handle(label, request)

    def refused_at_gate(self, label: str, response: Response) -> None:
        """Count a request to a write endpoint refused before it was read (revision, key)."""
        if label not in LABELS:
            return
        errors = response.body.get("errors") if isinstance(response.body, dict) else None
        error = errors[0] if errors else {}
        reason = ("revision" if error.get("source", {}).get("parameter") == "revision"
                  else str(error.get("code", response.status)))
        with self._lock:
            self._state.rejections[reason] += 1

    def handle(self, label: str, request: Request) -> Response:
        """Answer one request to a write endpoint (after the revision and key checks)."""
        with self._lock:
            burst, steady = self.config.limits(label)
            windows = self._windows.setdefault(label, _Windows())
            wait, headers = windows.take(self.clock(), burst, steady)
            if wait is not None:
                self._state.rejections["throttled"] += 1
        if wait is not None:
            return _throttled(wait)
        try:
            events = self._parse(label, request)
        except Refusal as refusal:
            with self._lock:
                self._state.rejections[refusal.reason] += 1
            response = refusal.response()
        else:
            self._commit(label, events)
            response = Response(202, b"", content_type=JSON_API)
        response.headers.update(headers)
        return response

    # -- reading a request ---------------------------------------------------------------------
    def _parse(self, label: str, request: Request) -> list[_Parsed]:
        limit = self.config.max_payload_bytes
        if len(request.body) > limit:
            raise Refusal("payload_too_large", f"The payload is {len(request.body)} bytes; the "
                          f"maximum allowed payload size is {limit} bytes (5MB).", "/data")
        try:
            body = json.loads(request.body or b"null")
        except ValueError as error:
            raise Refusal("parse_error", f"JSON parse error - {error}", "/data",
                          code="parse_error", title="Malformed request.") from error
        if not isinstance(body, dict):
            raise Refusal("invalid_document", "The request body must be a JSON:API document "
                          "with a data object.", "/data")
        data = _object(body.get("data"), "/data", "data")
        now = self._received_ts()
        if label == CREATE_EVENT:
            _type(data, "event", "/data")
            attributes = _object(data.get("attributes"), "/data/attributes", "attributes")
            pointer = "/data/attributes"
            profile_id, created = self._profile(attributes.get("profile"), f"{pointer}/profile")
            return [self._event(attributes, pointer, profile_id, created, False, now)]
        return self._bulk(data, now)

    def _bulk(self, data: dict[str, Any], now: float) -> list[_Parsed]:
        _type(data, "event-bulk-create-job", "/data")
        attributes = _object(data.get("attributes"), "/data/attributes", "attributes")
        outer = _object(attributes.get("events-bulk-create"),
                        "/data/attributes/events-bulk-create", "events-bulk-create")
        entries = _list(outer.get("data"), BULK_POINTER, "events-bulk-create.data")
        groups: list[tuple[str, dict[str, Any], list[Any]]] = []
        for i, entry in enumerate(entries):
            pointer = f"{BULK_POINTER}/{i}"
            _type(_object(entry, pointer, "an entry"), "event-bulk-create", pointer)
            entry_attributes = _object(entry.get("attributes"), f"{pointer}/attributes",
                                       "attributes")
            wrapper = _object(entry_attributes.get("events"), f"{pointer}/attributes/events",
                              "events")
            groups.append((pointer, entry_attributes,
                           _list(wrapper.get("data"), f"{pointer}/attributes/events/data",
                                 "events.data")))
        total, most = sum(len(g[2]) for g in groups), self.config.max_bulk_events
        if total > most:
            raise Refusal("too_many_events", f"The request holds {total} events; a bulk create "
                          f"accepts up to {most} events per request.", BULK_POINTER)
        parsed: list[_Parsed] = []
        seen: dict[tuple[str, str, str], str] = {}
        for pointer, entry_attributes, events in groups:
            base = f"{pointer}/attributes"
            backfill = _flag(entry_attributes.get("backfill"), f"{base}/backfill")
            profile_id, created = self._profile(entry_attributes.get("profile"), f"{base}/profile")
            for j, event in enumerate(events):
                event_pointer = f"{base}/events/data/{j}"
                _type(_object(event, event_pointer, "an event"), "event", event_pointer)
                event_attributes = _object(event.get("attributes"), f"{event_pointer}/attributes",
                                           "attributes")
                one = self._event(event_attributes, f"{event_pointer}/attributes", profile_id,
                                  created, backfill, now)
                key = (one.profile_id, one.metric, one.key)
                if key in seen:
                    told = (f"unique_id {one.unique_id!r}" if one.unique_id is not None else
                            f"no unique_id, so its time to the second ({one.key[5:]}) stands "
                            "for it,")
                    raise Refusal("duplicate_unique_id_in_request",
                                  f"Event at {one.pointer} repeats the {told} of the event at "
                                  f"{seen[key]} for the same profile and metric: the request "
                                  "failed and no events were processed.",
                                  f"{one.pointer}/unique_id")
                seen[key] = one.pointer
                parsed.append(one)
        return parsed

    def _event(self, attributes: dict[str, Any], pointer: str, profile_id: str, created: bool,
               backfill: bool, now: float) -> _Parsed:
        metric = _metric_name(attributes.get("metric"), f"{pointer}/metric")
        properties = attributes.get("properties")
        if not isinstance(properties, dict):
            raise Refusal("invalid_properties", "properties is required and must be an object.",
                          f"{pointer}/properties")
        problem = _properties_problem(properties, f"{pointer}/properties")
        if problem is not None:
            raise Refusal("properties_limit", *problem)
        ts, time_sent = _time(attributes.get("time"), f"{pointer}/time", now)
        value = attributes.get("value")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or not math.isfinite(value)):
            raise Refusal("invalid_value", f"value must be a number, got {value!r}.",
                          f"{pointer}/value")
        currency = attributes.get("value_currency")
        if currency is not None:
            if not isinstance(currency, str) or currency.upper() not in CURRENCIES:
                raise Refusal("invalid_currency", f"{currency!r} is not an ISO 4217 currency "
                              "code.", f"{pointer}/value_currency")
            currency = currency.upper()
        unique_id = attributes.get("unique_id")
        if unique_id is not None and not isinstance(unique_id, str):
            raise Refusal("invalid_unique_id", f"unique_id must be a string, got {unique_id!r}.",
                          f"{pointer}/unique_id")
        backfill = _flag(attributes.get("backfill"), f"{pointer}/backfill") or backfill
        return _Parsed(profile_id, created, metric, properties, ts, time_sent,
                       None if value is None else float(value), currency, unique_id, backfill,
                       pointer)

    def _profile(self, value: Any, pointer: str) -> tuple[str, bool]:
        """(profile id, made up by the sandbox) for a ``profile`` relationship object."""
        data = _object(_object(value, pointer, "profile").get("data"), f"{pointer}/data",
                       "profile.data")
        _type(data, "profile", f"{pointer}/data")
        attributes = data.get("attributes") or {}
        if not isinstance(attributes, dict):
            raise Refusal("invalid_document", "profile attributes must be an object.",
                          f"{pointer}/data/attributes")
        profile_id = data.get("id")
        if profile_id is not None:
            if not isinstance(profile_id, str) or not self._known(profile_id):
                raise Refusal("unknown_profile", f"Profile {profile_id!r} does not exist.",
                              f"{pointer}/data/id")
            return profile_id, False
        for name in PROFILE_IDENTIFIERS:
            identifier = attributes.get(name)
            if identifier is None:
                continue
            where = f"{pointer}/data/attributes/{name}"
            if not isinstance(identifier, str) or not identifier.strip():
                raise Refusal("invalid_profile", f"{name} must be a non-empty string.", where)
            identifier = identifier.strip()
            if name == "email":
                if not _EMAIL.fullmatch(identifier):
                    raise Refusal("invalid_email", f"Invalid email address {identifier!r}.",
                                  where)
                known = self.profiles.by_email(identifier)
                if known is not None:
                    return known, False
                identifier = identifier.lower()
            elif name == "phone_number" and not _PHONE.fullmatch(identifier):
                raise Refusal("invalid_phone_number", f"Invalid phone number {identifier!r}: "
                              "use the E.164 format, e.g. +15005550006.", where)
            digest = hashlib.blake2b(f"{name}:{identifier}".encode(), digest_size=12)
            return "01" + digest.hexdigest(), True
        raise Refusal("missing_profile_identifier", "A profile identifier is required: id, "
                      "email, phone_number, external_id or anonymous_id.",
                      f"{pointer}/data/attributes")

    def _known(self, profile_id: str) -> bool:
        with self._lock:
            if profile_id in self._state.created_profiles:
                return True
        return self.profiles.by_id(profile_id)

    def _received_ts(self) -> float:
        """The world's now, running with ``clock`` since the world's clock was last set."""
        with self._lock:
            as_of, now = self.world.as_of_ts, self.clock()
            if self._origin is None or self._origin[0] != as_of:
                self._origin = (as_of, now)
            return as_of + (now - self._origin[1])

    # -- recording ---------------------------------------------------------------------------------
    def _commit(self, label: str, events: list[_Parsed]) -> None:
        with self._lock:
            state = self._state
            state.accepted_requests[label] += 1
            for event in events:
                key = (event.profile_id, event.metric, event.key)
                counts = state.metrics.setdefault(event.metric, MetricCounts())
                state.received[key] += 1
                counts.received += 1
                if key in state.events:
                    counts.duplicates += 1
                    continue
                if event.created:
                    state.created_profiles.add(event.profile_id)
                fingerprint = event.fingerprint()
                if fingerprint is not None:
                    times = state.fingerprints.setdefault(fingerprint, [])
                    mine = event.ts if event.time_sent else None
                    if any(t is None or mine is None or t == mine for t in times):
                        counts.counted_twice += 1
                    times.append(mine)
                state.events[key] = ReceivedEvent(
                    event.profile_id, event.metric, event.key, event.unique_id,
                    dt.datetime.fromtimestamp(event.ts, dt.UTC), event.time_sent, event.value,
                    event.currency, event.properties, event.backfill, label)
                counts.events += 1
                counts.value += event.value or 0.0
                if event.backfill:
                    counts.backfilled += 1
                else:
                    counts.flows_fired += 1

    # -- what tests and the control endpoint read ----------------------------------------------
    def counts(self, metric: str) -> MetricCounts:
        with self._lock:
            return MetricCounts(**asdict(self._state.metrics.get(metric, MetricCounts())))

    def received(self, metric: str | None = None) -> dict[tuple[str, str, str], int]:
        """Times received per (profile id, metric, key), duplicates included."""
        with self._lock:
            return {k: n for k, n in self._state.received.items()
                    if metric is None or k[1] == metric}

    def events(self, metric: str | None = None) -> list[ReceivedEvent]:
        """The events recorded, in the order they were first received."""
        with self._lock:
            return [e for e in self._state.events.values() if metric is None or e.metric == metric]

    def rejections(self) -> dict[str, int]:
        with self._lock:
            return dict(self._state.rejections)

    def summary(self, metric: str | None = None, with_unique_ids: bool = True) -> dict[str, Any]:
        """What the sandbox counted, as the control endpoint reports it."""
        with self._lock:
            state = self._state
            metrics = {name: asdict(c) for name, c in sorted(state.metrics.items())
                       if metric is None or name == metric}
            for counts in metrics.values():
                counts["value"] = round(counts["value"], 2)
            totals = {name: sum(c[name] for c in metrics.values())
                      for name in ("events", "received", "duplicates", "counted_twice",
                                   "flows_fired", "backfilled")}
            out: dict[str, Any] = {
                "config": asdict(self.config),
                "requests": {k.split(".", 1)[1]: n for k, n in
                             self.sandbox.requests("klaviyo").items()
                             if k.split(".", 1)[1] in LABELS},
                "accepted_requests": dict(state.accepted_requests),
                **totals,
                "accepted_value": round(sum(c["value"] for c in metrics.values()), 2),
                "rejections": dict(state.rejections),
                "profiles_created": len(state.created_profiles),
                "metrics": metrics,
            }
            if with_unique_ids:
                keys: dict[str, dict[str, dict[str, int]]] = {}
                for (profile, name, key), n in sorted(state.received.items()):
                    if metric is None or name == metric:
                        keys.setdefault(name, {}).setdefault(profile, {})[key] = n
                out["unique_ids"] = keys
            return out

    def configure(self, **changes: Any) -> KlaviyoEventsConfig:
        with self._lock:
            known = {f.name for f in fields(self.config)}
            for name, value in changes.items():
                if name not in known:
                    raise ValueError(f"unknown setting {name!r}; known: {', '.join(sorted(known))}")
                setattr(self.config, name, int(value))
            return self.config

    def reset(self) -> None:
        """Forget every event, counter and rate window, and restore the default settings."""
        with self._lock:
            self.config = KlaviyoEventsConfig()
            self._state = _State()
            self._windows.clear()

    def control_routes(self) -> dict[tuple[str, str], Callable[[Request], Response]]:
        """The control endpoint's ``/klaviyo/events`` calls (plain JSON)."""

        def summary(request: Request) -> Response:
            return Response(200, self.summary(request.arg("metric"),
                                              request.arg("unique_ids", "1") != "0"))

        def reset(request: Request) -> Response:
            self.reset()
            return Response(200, {})

        def configure(request: Request) -> Response:
            try:
                return Response(200, asdict(self.configure(**request.json())))
            except (TypeError, ValueError) as error:
                return Response(400, {"error": str(error)})

        return {("GET", "/klaviyo/events"): summary, ("DELETE", "/klaviyo/events"): reset,
                ("POST", "/klaviyo/events/config"): configure}


# -- document helpers ------------------------------------------------------------------------------

def _object(value: Any, pointer: str, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise Refusal("invalid_document", f"{what} is required and must be an object.", pointer)
    return value


def _list(value: Any, pointer: str, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise Refusal("invalid_document", f"{what} is required and must be an array.", pointer)
    return value


def _type(resource: dict[str, Any], wanted: str, pointer: str) -> None:
    if resource.get("type") != wanted:
        raise Refusal("invalid_document", f"Expected type {wanted!r}, got "
                      f"{resource.get('type')!r}.", f"{pointer}/type")


def _flag(value: Any, pointer: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise Refusal("invalid_document", f"backfill must be true or false, got {value!r}.",
                      pointer)
    return value


def _metric_name(value: Any, pointer: str) -> str:
    data = _object(_object(value, pointer, "metric").get("data"), f"{pointer}/data",
                   "metric.data")
    _type(data, "metric", f"{pointer}/data")
    attributes = _object(data.get("attributes"), f"{pointer}/data/attributes", "attributes")
    name = attributes.get("name")
    where = f"{pointer}/data/attributes/name"
    if not isinstance(name, str) or not name.strip():
        raise Refusal("missing_metric_name", "The metric name is required (metric.data."
                      "attributes.name).", where)
    if len(name) > MAX_METRIC_NAME:
        raise Refusal("metric_name_too_long", f"The metric name must be less than 128 "
                      f"characters; it has {len(name)}.", where)
    service = attributes.get("service")
    if service is not None and not isinstance(service, str):
        raise Refusal("invalid_document", "service must be a string.",
                      f"{pointer}/data/attributes/service")
    return name


def _time(value: Any, pointer: str, now: float) -> tuple[int, bool]:
    """(whole seconds, whether the event said when): no time is the time of receipt."""
    if value is None:
        return math.floor(now), False
    moment = None
    if isinstance(value, str):
        try:
            moment = dt.datetime.fromisoformat(value)
        except ValueError:
            moment = None
    if moment is None:
        raise Refusal("invalid_time", f"time must be an ISO 8601 datetime, got {value!r}.",
                      pointer)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    ts = moment.timestamp()
    if ts < EARLIEST or ts > now + YEAR:
        raise Refusal("time_out_of_range", f"time {value!r} must be after the year 2000 and "
                      "at most 1 year in the future.", pointer)
    return math.floor(ts), True


def _properties_problem(properties: dict[str, Any], pointer: str) -> tuple[str, str] | None:
    """(detail, pointer) of the first ingestion limit the properties break, or None."""
    if len(properties) > MAX_PROPERTIES:
        return (f"An event may carry at most {MAX_PROPERTIES} properties; it has "
                f"{len(properties)}.", pointer)

    def walk(value: Any, where: str, depth: int) -> tuple[str, str] | None:
        if isinstance(value, str):
            if len(value.encode()) > MAX_STRING_BYTES:
                return "A single string cannot exceed 100KB.", where
            return None
        if isinstance(value, dict | list):
            if depth > MAX_NESTING:
                return f"Properties cannot nest more than {MAX_NESTING} levels.", where
            if isinstance(value, list) and len(value) > MAX_ARRAY_ITEMS:
                return f"An array may hold at most {MAX_ARRAY_ITEMS} items.", where
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                found = walk(item, f"{where}/{key}", depth + 1)
                if found is not None:
                    return found
        return None

    return walk(properties, pointer, 1)


def _throttled(wait: float) -> Response:
    seconds = max(1, math.ceil(wait))
    body = error_document(429, "throttled", "Request was throttled.",
                          f"Request was throttled. Expected available in {seconds} second"
                          f"{'s' if seconds > 1 else ''}.")
    return Response(429, body, {"Retry-After": str(seconds)}, JSON_API)
