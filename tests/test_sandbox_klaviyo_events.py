"""Klaviyo's event uploads in the sandbox (``POST /api/events``, ``POST
/api/event-bulk-create-jobs``), driven by the real klaviyo-api SDK over loopback HTTP.

The SDK's own calls throughout (``Events.create_event``, ``Events.bulk_create_events``); a
document the SDK's models would refuse to build is made with pydantic's ``model_construct``, so
that the sandbox, not the SDK, is what refuses it. The SDK's own retries are off
(``max_retries=0``) unless a test is about them."""

from __future__ import annotations

import datetime as dt
import json
import urllib.request
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from klaviyo_api import KlaviyoAPI
from openapi_client.exceptions import ApiException
from openapi_client.models import (
    EventCreateQueryV2,
    EventCreateQueryV2ResourceObject,
    EventCreateQueryV2ResourceObjectAttributes,
    EventCreateQueryV2ResourceObjectAttributesMetric,
    EventCreateQueryV2ResourceObjectAttributesProfile,
    MetricCreateQueryResourceObject,
    MetricCreateQueryResourceObjectAttributes,
)

from convsync.sandbox.control import Sandbox
from convsync.sandbox.http import serve_rest
from convsync.sandbox.klaviyo import KlaviyoApi
from convsync.sandbox.klaviyo_events import KlaviyoEvents
from convsync.sandbox.server import ControlApi
from convsync.sandbox.world import World

KEY = "pk_sandbox_0123456789"
METRIC = "convsync Value"
UNKNOWN_PROFILE = "01" + "f" * 24


class Clock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Served:
    def __init__(self, world: World) -> None:
        self.clock = Clock()
        self.sandbox = Sandbox(world)
        self.uploads = KlaviyoEvents(self.sandbox, clock=self.clock)
        self.server = serve_rest(KlaviyoApi(self.sandbox, events=self.uploads), self.sandbox)
        self.url = f"http://127.0.0.1:{self.server.server_port}"


@pytest.fixture(scope="module")
def served(world: World) -> Iterator[Served]:
    running = Served(world)
    yield running
    running.server.shutdown()
    running.server.server_close()


@pytest.fixture
def uploads(served: Served) -> KlaviyoEvents:
    """The sandbox's event uploads, forgotten before each test (counters, rate windows)."""
    served.uploads.reset()
    served.sandbox.clear_faults()
    served.sandbox.reset_requests()
    return served.uploads


@pytest.fixture
def client(served: Served) -> KlaviyoAPI:
    return KlaviyoAPI(KEY, test_host=served.url, max_retries=0)


@pytest.fixture(scope="module")
def people(world: World) -> list[str]:
    """Profile ids of the world (as a pull of its events shows them), five of them."""
    start = dt.datetime(2026, 9, 10, tzinfo=dt.UTC)
    ids = dict.fromkeys(e.profile_id for e in world.klaviyo_events(start, start + dt.timedelta(1)))
    return list(ids)[:5]


# -- documents as the SDK takes them -----------------------------------------------------------

def metric(name: str = METRIC) -> dict[str, Any]:
    return {"data": {"type": "metric", "attributes": {"name": name}}}


def profile(profile_id: str | None = None, **attributes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"type": "profile", "attributes": attributes}
    if profile_id is not None:
        data["id"] = profile_id
    return {"data": data}


def event(unique_id: str | None = None, value: float | None = None, *, name: str = METRIC,
          **attributes: Any) -> dict[str, Any]:
    """One event of a bulk job (``properties`` default to the conversion they stand for)."""
    attributes.setdefault("properties", {"conversion": unique_id} if unique_id else {})
    body = {"metric": metric(name), "value": value, "unique_id": unique_id, **attributes}
    return {"type": "event", "attributes": {k: v for k, v in body.items() if v is not None}}


def entry(profile_id: str, *events: dict[str, Any], backfill: bool = False) -> dict[str, Any]:
    return {"type": "event-bulk-create",
            "attributes": {"backfill": backfill, "profile": profile(profile_id),
                           "events": {"data": list(events)}}}


def job(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"data": {"type": "event-bulk-create-job",
                     "attributes": {"events-bulk-create": {"data": list(entries)}}}}


def single(profile_id: str, unique_id: str | None = None, value: float | None = None,
           **attributes: Any) -> dict[str, Any]:
    """A Create Event document."""
    one = event(unique_id, value, **attributes)["attributes"]
    return {"data": {"type": "event", "attributes": {**one, "profile": profile(profile_id)}}}


def unchecked(profile_id: str, **attributes: Any) -> EventCreateQueryV2:
    """A Create Event document the SDK's models would refuse: its attributes unvalidated."""
    fields: dict[str, Any] = {
        "properties": {},
        "metric": EventCreateQueryV2ResourceObjectAttributesMetric.from_dict(metric()),
        "profile": EventCreateQueryV2ResourceObjectAttributesProfile.from_dict(
            profile(profile_id))}
    fields.update(attributes)
    constructed = EventCreateQueryV2ResourceObjectAttributes.model_construct(**fields)
    return EventCreateQueryV2(data=EventCreateQueryV2ResourceObject(type="event",
                                                                    attributes=constructed))


def nameless_metric() -> EventCreateQueryV2ResourceObjectAttributesMetric:
    data = MetricCreateQueryResourceObject(
        type="metric", attributes=MetricCreateQueryResourceObjectAttributes.model_construct())
    return EventCreateQueryV2ResourceObjectAttributesMetric(data=data)


def error_of(raised: pytest.ExceptionInfo[ApiException]) -> dict[str, Any]:
    errors = json.loads(raised.value.body)["errors"]
    assert len(errors) == 1
    return dict(errors[0])


def nothing_recorded(uploads: KlaviyoEvents) -> None:
    summary = uploads.summary()
    assert (summary["events"], summary["received"], summary["accepted_requests"]) == (0, 0, {})


# -- accepted and counted ------------------------------------------------------------------------

def test_a_bulk_job_is_accepted_and_counted_with_its_values(
        client: KlaviyoAPI, uploads: KlaviyoEvents, people: list[str]) -> None:
    first, second = people[:2]
    body = job(entry(first, event("order-1", 10.0, value_currency="USD"),
                     event("order-2", 20.5, time="2026-10-14T09:30:15.7+02:00")),
               entry(second, event("order-3", 30), event("order-4", 0.25, name="Other")))
    assert client.Events.bulk_create_events(body) is None  # 202, no body: Klaviyo's answer
    assert client.Events.create_event(single(second, "order-5", 7.5)) is None

    summary = uploads.summary()
    assert summary["requests"] == {"bulk_create_events": 1, "create_event": 1}
    assert summary["accepted_requests"] == {"bulk_create_events": 1, "create_event": 1}
    assert summary["metrics"][METRIC] == {
        "events": 4, "value": 68.0, "received": 4, "duplicates": 0, "counted_twice": 0,
        "flows_fired": 4, "backfilled": 0}
    assert summary["metrics"]["Other"]["value"] == 0.25
    assert (summary["events"], summary["accepted_value"]) == (5, 68.25)
    assert uploads.received(METRIC) == {(first, METRIC, "order-1"): 1,
                                        (first, METRIC, "order-2"): 1,
                                        (second, METRIC, "order-3"): 1,
                                        (second, METRIC, "order-5"): 1}
    recorded = {e.key: e for e in uploads.events(METRIC)}
    assert recorded["order-1"].value_currency == "USD"
    assert recorded["order-2"].time == dt.datetime(2026, 10, 14, 7, 30, 15, tzinfo=dt.UTC)
    assert recorded["order-3"].properties == {"conversion": "order-3"}
    assert recorded["order-5"].endpoint == "create_event"
    assert summary["profiles_created"] == 0  # every profile was the world's


def test_the_same_unique_id_under_another_profile_or_metric_is_another_event(
        client: KlaviyoAPI, uploads: KlaviyoEvents, people: list[str]) -> None:
    client.Events.bulk_create_events(job(entry(people[0], event("x", 1), event("x", 2, name="B")),
                                         entry(people[1], event("x", 3))))
    assert uploads.summary()["events"] == 3


def test_a_unique_id_repeated_in_one_bulk_request_fails_it_whole(
        client: KlaviyoAPI, uploads: KlaviyoEvents, people: list[str]) -> None:
    body = job(entry(people[0], event("a", 1)),
               entry(people[1], event("a", 2), event("b", 3), event("a", 4)))
    with pytest.raises(ApiException) as raised:
        client.Events.bulk_create_events(body)
    error = error_of(raised)
    assert (raised.value.status, error["code"], error["status"]) == (400, "invalid", 400)
    assert error["source"] == {"pointer": "/data/attributes/events-bulk-create/data/1/"
                                          "attributes/events/data/2/attributes/unique_id"}
    nothing_recorded(uploads)
    assert uploads.rejections() == {"duplicate_unique_id_in_request": 1}


def test_events_without_unique_id_at_the_same_second_collide_in_one_bulk_request(
        client: KlaviyoAPI, uploads: KlaviyoEvents, people: list[str]) -> None:
    """Klaviyo's default unique_id is the time to the second."""
    at = "2026-10-01T12:00:00+00:00"
    with pytest.raises(ApiException) as raised:
        client.Events.bulk_create_events(job(entry(people[0], event(time=at, value=1),
                                                   event(time=at, value=2))))
    assert raised.value.status == 400
    assert "time to the second" in error_of(raised)["detail"]
    nothing_recorded(uploads)


# -- exactly once ------------------------------------------------------------------------------

def test_a_resend_is_absorbed_not_counted_twice(
        client: KlaviyoAPI, uploads: KlaviyoEvents, people: list[str]) -> None:
    body = job(entry(people[0], event("order-1", 10), event("order-2", 20)),
               entry(people[1], event("order-3", 30)))
    client.Events.bulk_create_events(body)
    client.Events.create_event(single(people[2], "order-4", 40))
    resent = job(entry(people[0], event("order-1", 99), event("order-2", 20)),
                 entry(people[1], event("order-3", 30)))
    client.Events.bulk_create_events(resent)  # a retry after an answer that never came
    client.Events.create_event(single(people[2], "order-4", 40))

    counts = uploads.counts(METRIC)
    assert (counts.events, counts.received, counts.duplicates, counts.counted_twice) == (4, 8, 4, 0)
    assert counts.value == 100  # the first of each kept: order-1 stays at 10
    assert counts.flows_fired == 4
    assert set(uploads.received(METRIC).values()) == {2}


def test_the_same_conversion_without_unique_id_is_counted_twice_a_second_later(
        served: Served, client: KlaviyoAPI, uploads: KlaviyoEvents, people: list[str]) -> None:
    """What convsync must never do: with no unique_id (and no time), Klaviyo keys the event by
    the second it arrives, so only a resend within that second is absorbed."""
    body = single(people[0], value=25.0, properties={"conversion": "lead-7"})
    client.Events.create_event(body)
    client.Events.create_event(body)  # the same second: absorbed
    served.clock.advance(2)
    client.Events.create_event(body)  # two seconds later: a second event, the same conversion

    counts = uploads.counts(METRIC)
    assert (counts.events, counts.duplicates, counts.counted_twice) == (2, 1, 1)
    assert uploads.summary()["counted_twice"] == 1


def test_two_unique_ids_for_one_conversion_are_counted_twice(
        client: KlaviyoAPI, uploads: KlaviyoEvents, people: list[str]) -> None:
    """A key that is not deterministic (a retry under a new unique_id) shows the same way;
    distinct conversions do not."""
    same = {"properties": {"conversion": "c-1"}, "time": "2026-10-01T12:00:00+00:00"}
    client.Events.create_event(single(people[0], "run-1:c-1", 5.0, **same))
    client.Events.create_event(single(people[0], "run-2:c-1", 5.0, **same))
    client.Events.create_event(single(people[0], "c-2", 5.0, properties={"conversion": "c-2"},
                                      time="2026-10-01T12:00:00+00:00"))
    assert uploads.counts(METRIC).counted_twice == 1
    assert uploads.counts(METRIC).events == 3


# -- refused -------------------------------------------------------------------------------------

def test_1001_events_are_refused_1000_accepted(
        client: KlaviyoAPI, uploads: KlaviyoEvents, people: list[str]) -> None:
    events = [event(f"e-{i}", 1.0) for i in range(1001)]
    with pytest.raises(ApiException) as raised:
        client.Events.bulk_create_events(job(entry(people[0], *events[:600]),
                                             entry(people[1], *events[600:])))
    error = error_of(raised)
    assert (raised.value.status, error["code"]) == (400, "invalid")
    assert error["source"] == {"pointer": "/data/attributes/events-bulk-create/data"}
    assert "1001" in error["detail"]
    nothing_recorded(uploads)

    client.Events.bulk_create_events(job(entry(people[0], *events[:600]),
                                         entry(people[1], *events[600:1000])))
    assert uploads.counts(METRIC).events == 1000
    assert uploads.rejections() == {"too_many_events": 1}


def test_a_request_over_5_mb_is_refused(client: KlaviyoAPI, uploads: KlaviyoEvents,
                                         people: list[str]) -> None:
    big = "x" * 90_000  # under the 100 KB a string may hold, 60 of them over 5 MB
    events = [event(f"e-{i}", properties={"blob": big}) for i in range(60)]
    with pytest.raises(ApiException) as raised:
        client.Events.bulk_create_events(job(entry(people[0], *events)))
    assert (raised.value.status, error_of(raised)["source"]) == (400, {"pointer": "/data"})
    nothing_recorded(uploads)
    assert uploads.rejections() == {"payload_too_large": 1}


def test_an_unknown_profile_is_refused(client: KlaviyoAPI, uploads: KlaviyoEvents,
                                       people: list[str]) -> None:
    with pytest.raises(ApiException) as raised:
        client.Events.create_event(single(UNKNOWN_PROFILE, "u-1", 5))
    error = error_of(raised)
    assert (raised.value.status, error["code"]) == (400, "invalid")
    assert error["source"] == {"pointer": "/data/attributes/profile/data/id"}
    assert UNKNOWN_PROFILE in error["detail"]

    body = job(entry(people[0], event("u-2", 5)), entry(UNKNOWN_PROFILE, event("u-3", 5)))
    with pytest.raises(ApiException) as raised:  # one unknown profile fails the whole job
        client.Events.bulk_create_events(body)
    assert error_of(raised)["source"] == {
        "pointer": "/data/attributes/events-bulk-create/data/1/attributes/profile/data/id"}
    nothing_recorded(uploads)
    assert uploads.rejections() == {"unknown_profile": 2}


def test_profiles_by_email_are_the_worlds_people_or_new(
        client: KlaviyoAPI, uploads: KlaviyoEvents, world: World) -> None:
    start = dt.datetime(2026, 9, 10, tzinfo=dt.UTC)
    person = next(iter(world.klaviyo_events(start, start + dt.timedelta(1))))
    body = single("", "by-email", 3.0)
    body["data"]["attributes"]["profile"] = profile(email=person.email)  # as typed, spaces too
    client.Events.create_event(body)
    body["data"]["attributes"]["profile"] = profile(email="new.person@example.com")
    client.Events.create_event(body)
    assert {key[0] for key in uploads.received(METRIC)} >= {person.profile_id}
    assert uploads.summary()["profiles_created"] == 1

    body["data"]["attributes"]["profile"] = profile(email="not an address")
    with pytest.raises(ApiException) as raised:
        client.Events.create_event(body)
    assert error_of(raised)["source"] == {
        "pointer": "/data/attributes/profile/data/attributes/email"}


def test_a_missing_metric_name_is_400_at_its_pointer(
        client: KlaviyoAPI, uploads: KlaviyoEvents, people: list[str]) -> None:
    with pytest.raises(ApiException) as raised:
        client.Events.create_event(unchecked(people[0], metric=nameless_metric()))
    error = error_of(raised)
    assert (raised.value.status, error["code"], error["title"]) == (400, "invalid",
                                                                    "Invalid input.")
    assert error["source"] == {"pointer": "/data/attributes/metric/data/attributes/name"}

    nameless = event("n-2", 1, name="")
    with pytest.raises(ApiException) as raised:
        client.Events.bulk_create_events(job(entry(people[0], event("n-1", 1), nameless)))
    assert error_of(raised)["source"] == {
        "pointer": "/data/attributes/events-bulk-create/data/0/attributes/events/data/1/"
                   "attributes/metric/data/attributes/name"}
    nothing_recorded(uploads)
    assert uploads.rejections() == {"missing_metric_name": 2}


@pytest.mark.parametrize(("attributes", "pointer", "reason"), [
    ({"time": "last tuesday"}, "time", "invalid_time"),
    ({"time": "1999-12-31T23:59:59+00:00"}, "time", "time_out_of_range"),
    ({"time": "2028-01-01T00:00:00+00:00"}, "time", "time_out_of_range"),
    ({"value": "12.50"}, "value", "invalid_value"),
    ({"value": True}, "value", "invalid_value"),
    ({"value": 5, "value_currency": "XYZ"}, "value_currency", "invalid_currency"),
    ({"unique_id": 42}, "unique_id", "invalid_unique_id"),
    ({"properties": {f"p{i}": i for i in range(401)}}, "properties", "properties_limit"),
    ({"properties": {"big": "x" * 102_401}}, "properties/big", "properties_limit"),
])
def test_bad_event_attributes_are_400_at_their_pointer(
        client: KlaviyoAPI, uploads: KlaviyoEvents, people: list[str],
        attributes: dict[str, Any], pointer: str, reason: str) -> None:
    with warnings.catch_warnings():  # pydantic warns while dumping what it never validated
        warnings.simplefilter("ignore")
        with pytest.raises(ApiException) as raised:
            client.Events.create_event(unchecked(people[0], **attributes))
    error = error_of(raised)
    assert (raised.value.status, error["code"]) == (400, "invalid")
    assert error["source"] == {"pointer": f"/data/attributes/{pointer}"}
    nothing_recorded(uploads)
    assert uploads.rejections() == {reason: 1}


def test_the_revision_header_is_required(client: KlaviyoAPI, uploads: KlaviyoEvents,
                                         people: list[str]) -> None:
    del client.api_client.default_headers["revision"]
    with pytest.raises(ApiException) as raised:
        client.Events.create_event(single(people[0], "r-1", 1))
    assert (raised.value.status, error_of(raised)["source"]) == (400, {"parameter": "revision"})
    nothing_recorded(uploads)
    assert uploads.rejections() == {"revision": 1}


# -- backfill ------------------------------------------------------------------------------------

def test_backfilled_events_fire_no_flows(client: KlaviyoAPI, uploads: KlaviyoEvents,
                                         people: list[str]) -> None:
    client.Events.bulk_create_events(job(
        entry(people[0], event("h-1", 1), event("h-2", 2), backfill=True),  # the whole entry
        entry(people[1], event("h-3", 3, backfill=True), event("live-1", 4))))
    client.Events.create_event(single(people[2], "h-4", 5, backfill=True))
    client.Events.create_event(single(people[2], "live-2", 6))

    counts = uploads.counts(METRIC)
    assert (counts.events, counts.backfilled, counts.flows_fired) == (6, 4, 2)
    assert {e.key for e in uploads.events(METRIC) if not e.backfill} == {"live-1", "live-2"}


# -- rate limits and faults ----------------------------------------------------------------------

def test_past_the_burst_a_429_with_retry_after(served: Served, client: KlaviyoAPI,
                                               uploads: KlaviyoEvents, people: list[str]) -> None:
    for i in range(10):  # Bulk Create Events: 10 a second
        answer = client.Events.bulk_create_events_with_http_info(
            job(entry(people[0], event(f"b-{i}", 1))))
    assert (answer.status_code, answer.headers["RateLimit-Limit"]) == (202, "150")
    assert answer.headers["RateLimit-Remaining"] == "140"
    with pytest.raises(ApiException) as raised:
        client.Events.bulk_create_events(job(entry(people[0], event("b-10", 1))))
    assert (raised.value.status, raised.value.headers["Retry-After"]) == (429, "1")
    assert "RateLimit-Limit" not in raised.value.headers
    assert error_of(raised)["code"] == "throttled"
    client.Events.create_event(single(people[0], "c-1", 1))  # each endpoint has its own windows

    served.clock.advance(1)
    client.Events.bulk_create_events(job(entry(people[0], event("b-10", 1))))
    assert uploads.counts(METRIC).events == 12
    assert uploads.rejections() == {"throttled": 1}
    assert uploads.summary()["requests"] == {"bulk_create_events": 12, "create_event": 1}


def test_past_the_steady_minute_retry_after_counts_down_the_minute(
        served: Served, client: KlaviyoAPI, uploads: KlaviyoEvents, people: list[str]) -> None:
    uploads.configure(create_event_steady=3)
    for i in range(3):
        client.Events.create_event(single(people[0], f"s-{i}", 1))
    served.clock.advance(20)
    with pytest.raises(ApiException) as raised:
        client.Events.create_event(single(people[0], "s-3", 1))
    assert (raised.value.status, raised.value.headers["Retry-After"]) == (429, "40")
    served.clock.advance(40)
    client.Events.create_event(single(people[0], "s-3", 1))
    assert uploads.counts(METRIC).events == 4


def test_an_injected_fault_is_seen_and_an_sdk_retry_counts_once(
        served: Served, uploads: KlaviyoEvents, people: list[str]) -> None:
    without_retries = KlaviyoAPI(KEY, test_host=served.url, max_retries=0)
    served.sandbox.inject("klaviyo", "rate_limit", retry_after=7)
    with pytest.raises(ApiException) as raised:
        without_retries.Events.create_event(single(people[0], "f-1", 1))
    assert (raised.value.status, raised.value.headers["Retry-After"]) == (429, "7")
    nothing_recorded(uploads)

    retrying = KlaviyoAPI(KEY, test_host=served.url, max_retries=2, max_delay=0)
    served.sandbox.inject("klaviyo", "server_error")  # 503: the SDK retries it by itself
    retrying.Events.bulk_create_events(job(entry(people[0], event("f-2", 1))))
    assert uploads.summary()["requests"] == {"create_event": 1, "bulk_create_events": 2}
    assert uploads.counts(METRIC).events == 1


# -- the control endpoint ------------------------------------------------------------------------

def test_the_control_endpoint_reports_and_resets_the_counts(
        served: Served, client: KlaviyoAPI, uploads: KlaviyoEvents, people: list[str]) -> None:
    control = serve_rest(ControlApi(served.sandbox, klaviyo_events=uploads), served.sandbox)
    base = f"http://127.0.0.1:{control.server_port}/klaviyo/events"
    try:
        client.Events.bulk_create_events(job(entry(people[0], event("k-1", 2.5))))
        client.Events.bulk_create_events(job(entry(people[0], event("k-1", 2.5))))
        with urllib.request.urlopen(base) as answer:
            summary = json.load(answer)
        assert summary["metrics"][METRIC]["duplicates"] == 1
        assert summary["unique_ids"] == {METRIC: {people[0]: {"k-1": 2}}}
        config = urllib.request.Request(f"{base}/config", data=b'{"max_bulk_events": 1}',
                                        method="POST")
        with urllib.request.urlopen(config) as answer:
            assert json.load(answer)["max_bulk_events"] == 1
        with urllib.request.urlopen(urllib.request.Request(base, method="DELETE")):
            pass
        assert uploads.summary()["events"] == 0
        assert uploads.config.max_bulk_events == 1000
    finally:
        control.shutdown()
        control.server_close()
