"""The Meta Conversions API simulator, driven by the real facebook-business SDK over HTTP.

Every request goes through the SDK's own ``EventRequest`` / ``Event`` / ``UserData`` /
``CustomData`` (or ``AdsPixel.create_event``, or a plain HTTP client for the other wire forms),
pointed at the sandbox as ``notes/sdk-endpoints.md`` says."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from facebook_business.adobjects.adspixel import AdsPixel
from facebook_business.adobjects.serverside.action_source import ActionSource
from facebook_business.adobjects.serverside.custom_data import CustomData
from facebook_business.adobjects.serverside.event import Event
from facebook_business.adobjects.serverside.event_request import EventRequest
from facebook_business.adobjects.serverside.user_data import UserData
from facebook_business.api import FacebookAdsApi
from facebook_business.exceptions import FacebookRequestError
from facebook_business.session import FacebookSession

from convsync.sandbox import server
from convsync.sandbox.control import Sandbox
from convsync.sandbox.meta import serve_meta
from convsync.sandbox.meta_capi import ConversionsApi
from convsync.sandbox.world import World, WorldSpec

TOKEN = "sandbox-meta-token"
SPEC = WorldSpec(seed=11, start=dt.date(2026, 9, 1), days=45, campaigns=8)
HOUR = 3_600
DAY = 86_400


@dataclass
class Capi:
    sandbox: Sandbox
    capi: ConversionsApi
    url: str

    @property
    def world(self) -> World:
        return self.sandbox.world

    @property
    def pixel(self) -> str:
        return self.world.accounts.meta_pixel_id

    @property
    def now(self) -> int:
        return int(self.world.as_of_ts)


@contextmanager
def sdk_at(url: str, token: str = TOKEN) -> Iterator[None]:
    """Point the SDK's globals at ``url`` with ``token``; restore them afterwards."""
    previous_graph, previous_api = FacebookSession.GRAPH, FacebookAdsApi.get_default_api()
    FacebookSession.GRAPH = url
    FacebookAdsApi.init(access_token=token, api_version="v26.0", timeout=20, crash_log=False)
    try:
        yield
    finally:
        FacebookSession.GRAPH = previous_graph
        FacebookAdsApi.set_default_api(previous_api)


@pytest.fixture(scope="module")
def served() -> Iterator[Capi]:
    """Its own world: these tests move the clock."""
    sandbox = Sandbox(World(SPEC))
    http, graph = serve_meta(sandbox)
    url = f"http://127.0.0.1:{http.server_port}"
    with sdk_at(url):
        yield Capi(sandbox, graph.capi, url)
    http.shutdown()
    http.server_close()


@pytest.fixture
def meta(served: Capi) -> Iterator[Capi]:
    start = served.world.as_of_ts
    served.capi.reset()
    served.sandbox.reset_requests()
    yield served
    served.sandbox.clear_faults()
    served.world.as_of_ts = start


def event(meta: Capi, event_id: str | None = "order-1", *, name: str = "Purchase",
          age: int = HOUR, value: float | None = 120.0, currency: str | None = "usd",
          user_data: UserData | None = None,
          source: ActionSource | None = ActionSource.SYSTEM_GENERATED) -> Event:
    """An event as convsync uploads one: hashed email, external id, the click's fbc."""
    custom = CustomData(value=value, currency=currency) if value or currency else None
    return Event(event_name=name, event_time=meta.now - age, event_id=event_id,
                 action_source=source, custom_data=custom,
                 user_data=user_data or UserData(
                     emails=["Sam.Lee@example.com"], external_ids=["person-17"],
                     fbc="fb.1.1760000000000.IwAR2abc"))


def send(meta: Capi, *events: Event, test_event_code: str | None = None) -> int:
    response = EventRequest(pixel_id=meta.pixel, events=list(events),
                            test_event_code=test_event_code).execute()
    return int(response.events_received)


def refused(meta: Capi, *events: Event, pixel: str | None = None) -> FacebookRequestError:
    with pytest.raises(FacebookRequestError) as caught:
        EventRequest(pixel_id=pixel or meta.pixel, events=list(events)).execute()
    return caught.value


def pixel_summary(meta: Capi) -> dict[str, Any]:
    return dict(meta.capi.summary(meta.pixel)["pixels"].get(meta.pixel, {}))


# -- accepted -------------------------------------------------------------------------------
def test_an_accepted_batch_is_counted_once_per_event(meta: Capi) -> None:
    batch = [event(meta, "order-1"), event(meta, "order-2", value=80.0),
             event(meta, "lead-9", name="Lead", value=None, currency=None),
             event(meta, None, name="Lead", value=None, currency=None)]

    assert send(meta, *batch) == 4

    summary = pixel_summary(meta)
    assert summary["events_received"] == 4
    assert summary["events_counted"] == 4
    assert summary["without_event_id"] == 1
    assert summary["duplicates"] == summary["counted_twice"] == 0
    assert summary["accepted_value"] == 200.0
    order = summary["events"]["Purchase"]["order-2"]
    assert {k: order[k] for k in ("received", "counted", "duplicates", "value", "currency")} == {
        "received": 1, "counted": 1, "duplicates": 0, "value": 80.0, "currency": "USD"}
    assert order["user_data"]["external_id"] == ["person-17"]  # what was counted, kept
    assert meta.sandbox.requests("meta") == {"meta.events": 1}
    assert meta.capi.summary()["accepted_requests"] == 1


def test_the_sdk_hashes_the_email_and_sends_the_external_id_as_given(meta: Capi) -> None:
    """What reaches Meta: the email as SHA-256 of its trimmed lower-case form (which the
    sandbox insists on), the external id in clear (which Meta accepts)."""
    seen: list[dict[str, Any]] = []
    original = meta.capi.events

    def spy(request: Any, node: str) -> Any:
        seen.append(json.loads(json.loads(request.form()["data"][0])[0]))
        return original(request, node)

    meta.capi.events = spy  # type: ignore[method-assign]
    try:
        # a fresh route picks up the spy: MetaGraph routes each request anew
        send(meta, event(meta))
    finally:
        del meta.capi.events
    user_data = seen[0]["user_data"]
    assert user_data["em"] == [hashlib.sha256(b"sam.lee@example.com").hexdigest()]
    assert user_data["external_id"] == ["person-17"]
    assert seen[0]["custom_data"] == {"value": 120.0, "currency": "usd"}


# -- refused, whole --------------------------------------------------------------------------
BAD_EVENTS: dict[str, tuple[dict[str, Any], int, str]] = {
    # fbc with the click time in seconds, not milliseconds
    "fbc in seconds": ({"user_data": UserData(fbc="fb.1.1760000000.IwAR2abc")}, 2804019,
                       "$['data'][1]['user_data']['fbc']"),
    "no action_source": ({"source": None}, 2804019, "$['data'][1]['action_source'] is required"),
    "value without currency": ({"currency": None}, 2804019,
                               "$['data'][1]['custom_data']['currency'] is required"),
    "currency not ISO 4217": ({"currency": "usx"}, 2804019,
                              "$['data'][1]['custom_data']['currency']"),
    "no customer information": ({"user_data": UserData(client_ip_address="203.0.113.9")},
                                2804050, "$['data'][1]['user_data']"),
    "website without user agent": ({"source": ActionSource.WEBSITE}, 2804019,
                                   "$['data'][1]['event_source_url'] is required"),
}


@pytest.mark.parametrize("case", BAD_EVENTS)
def test_one_bad_event_rejects_the_whole_batch(meta: Capi, case: str) -> None:
    changes, subcode, where = BAD_EVENTS[case]
    batch = [event(meta, "order-1"), event(meta, "order-2", **changes), event(meta, "order-3")]

    error = refused(meta, *batch)

    assert error.http_status() == 400
    assert (error.api_error_code(), error.api_error_subcode()) == (100, subcode)
    assert error.api_error_type() == "OAuthException"
    assert error.api_error_message() == "Invalid parameter"
    assert error.api_transient_error() is False
    body = error.body()["error"]
    assert where in body["error_user_msg"]
    assert body["error_user_title"] and body["fbtrace_id"]
    assert pixel_summary(meta) == {}  # nothing counted, not even the good events
    assert meta.capi.summary()["rejected_requests"] == 1


def test_an_unhashed_email_is_refused(meta: Capi) -> None:
    """The SDK hashes what it is given; a client that builds the body itself may not."""
    good = event(meta, "order-1").normalize()
    bad = {**good, "event_id": "order-2", "user_data": {"em": ["sam.lee@example.com"]}}

    answer = requests.post(f"{meta.url}/v26.0/{meta.pixel}/events",
                           json={"data": [good, bad], "access_token": TOKEN}, timeout=10)

    assert answer.status_code == 400
    error = answer.json()["error"]
    assert (error["code"], error["error_subcode"]) == (100, 2804019)
    assert "$['data'][1]['user_data']['em'][0]" in error["error_user_msg"]
    assert meta.capi.rejections() == {"unhashed_user_data": 1}


def test_more_than_1000_events_are_refused(meta: Capi) -> None:
    batch = [event(meta, f"order-{i}") for i in range(1_001)]

    error = refused(meta, *batch)

    assert (error.http_status(), error.api_error_code()) == (400, 100)
    assert "at most 1000" in error.api_error_message()
    assert pixel_summary(meta) == {}
    assert send(meta, *batch[:1_000]) == 1_000
    assert pixel_summary(meta)["events_counted"] == 1_000


def test_an_event_over_7_days_old_is_refused(meta: Capi) -> None:
    error = refused(meta, event(meta, "order-1"), event(meta, "order-2", age=8 * DAY))

    assert (error.api_error_code(), error.api_error_subcode()) == (100, 2804003)
    assert error.body()["error"]["error_user_title"] == "Event Timestamp Too Old"
    assert "$['data'][1]['event_time']" in error.body()["error"]["error_user_msg"]
    assert meta.capi.rejections() == {"event_time_too_old": 1}
    assert send(meta, event(meta, "order-2", age=7 * DAY - 60)) == 1  # just inside


def test_a_future_event_is_refused(meta: Capi) -> None:
    error = refused(meta, event(meta, "order-1", age=-HOUR))
    assert (error.api_error_code(), error.api_error_subcode()) == (100, 2804004)
    assert "$['data'][0]['event_time']" in error.body()["error"]["error_user_msg"]

    # a time in milliseconds is the usual way to send one
    millis = Event(event_name="Purchase", event_time=meta.now * 1000, event_id="order-1",
                   action_source=ActionSource.SYSTEM_GENERATED,
                   user_data=UserData(external_ids=["person-17"]),
                   custom_data=CustomData(value=1.0, currency="usd"))
    assert refused(meta, millis).api_error_subcode() == 2804004

    assert send(meta, event(meta, "order-1", age=-60)) == 1  # a small clock skew is allowed
    assert meta.capi.rejections() == {"event_time_in_future": 2}


# -- deduplication ----------------------------------------------------------------------------
def test_a_resend_within_48_hours_is_absorbed_and_one_after_is_counted_twice(meta: Capi) -> None:
    first = event(meta, "order-1")
    assert send(meta, first, event(meta, "order-1")) == 2  # received, deduplicated at once
    meta.world.advance(47 / 24)
    assert send(meta, event(meta, "order-1")) == 1
    assert send(meta, event(meta, "order-1", name="Lead", value=None, currency=None)) == 1

    counts = meta.capi.counts()
    assert counts[("Purchase", "order-1")].counted == 1
    assert counts[("Purchase", "order-1")].duplicates == 2
    assert counts[("Lead", "order-1")].counted == 1  # another event name: another event
    assert meta.capi.counted_twice() == 0

    meta.world.advance(2 / 24)  # 49 hours after the counted copy
    assert send(meta, event(meta, "order-1")) == 1

    counts = meta.capi.counts()
    assert counts[("Purchase", "order-1")].counted == 2
    assert counts[("Purchase", "order-1")].value == 240.0
    assert meta.capi.counted_twice() == 1
    summary = pixel_summary(meta)
    assert (summary["events_received"], summary["events_counted"], summary["duplicates"],
            summary["counted_twice"]) == (5, 3, 2, 1)


def test_test_events_are_kept_apart(meta: Capi) -> None:
    assert send(meta, event(meta, "order-1"), event(meta, "order-2"),
                test_event_code="TEST4242") == 2

    summary = pixel_summary(meta)
    assert summary["test_events"] == {"TEST4242": 2}
    assert summary["events_received"] == summary["events_counted"] == 0
    assert meta.capi.counts() == {}

    assert send(meta, event(meta, "order-1")) == 1  # not absorbed by the test copy
    assert meta.capi.counts()[("Purchase", "order-1")].counted == 1
    assert pixel_summary(meta)["test_events"] == {"TEST4242": 2}


# -- faults, credentials, pixels ---------------------------------------------------------------
def test_injected_faults_answer_as_meta_and_count_nothing(meta: Capi) -> None:
    meta.sandbox.inject("meta", "rate_limit")
    throttled = refused(meta, event(meta, "order-1"))
    assert (throttled.http_status(), throttled.api_error_code()) == (400, 17)
    assert throttled.api_transient_error() is True
    assert "x-app-usage" in {k.lower() for k in throttled.http_headers()}

    meta.sandbox.inject("meta", "server_error")
    outage = refused(meta, event(meta, "order-1"))
    assert (outage.http_status(), outage.api_error_code()) == (500, 2)

    meta.sandbox.inject("meta", "exhausted")
    assert refused(meta, event(meta, "order-1")).api_error_code() == 4

    assert pixel_summary(meta) == {}
    assert meta.capi.rejections() == {"rate_limit": 1, "server_error": 1, "exhausted": 1}
    assert send(meta, event(meta, "order-1")) == 1  # the retry goes through, counted once
    assert meta.capi.counts()[("Purchase", "order-1")].counted == 1


def test_an_unknown_pixel_and_an_expired_token_are_graph_errors(meta: Capi) -> None:
    error = refused(meta, event(meta), pixel="111222333")
    assert (error.api_error_code(), error.api_error_subcode()) == (100, 33)
    assert error.api_error_type() == "GraphMethodException"
    assert "111222333" in error.api_error_message()

    with sdk_at(meta.url, token="expired"):
        expired = refused(meta, event(meta))
    assert (expired.api_error_code(), expired.api_error_subcode()) == (190, 463)

    assert meta.capi.rejections() == {"unknown_pixel": 1, "expired_token": 1}
    assert pixel_summary(meta) == {}


# -- other wire forms -----------------------------------------------------------------------------
def test_plain_objects_json_and_multipart_bodies_are_accepted(meta: Capi) -> None:
    payload = event(meta, "order-1").normalize()
    # AdsPixel.create_event with plain objects (the SDK warns, then sends them)
    with pytest.warns(UserWarning):
        answer = AdsPixel(meta.pixel).create_event(params={"data": [payload]})
    assert answer["events_received"] == 1

    edge = f"{meta.url}/v26.0/{meta.pixel}/events"
    as_json = requests.post(edge, json={"data": [{**payload, "event_id": "order-2"}],
                                        "access_token": TOKEN}, timeout=10)
    assert as_json.status_code == 200, as_json.text
    assert as_json.json()["events_received"] == 1

    multipart = requests.post(edge, files={
        "data": (None, json.dumps([{**payload, "event_id": "order-3"}])),
        "access_token": (None, TOKEN)}, timeout=10)
    assert multipart.status_code == 200, multipart.text

    assert set(meta.capi.counts()) == {("Purchase", f"order-{i}") for i in (1, 2, 3)}
    missing = requests.post(edge, json={"access_token": TOKEN}, timeout=10)
    assert missing.status_code == 400
    assert missing.json()["error"]["message"] == "(#100) The parameter data is required"


# -- the whole sandbox: control endpoint -------------------------------------------------------
def _control(url: str, method: str = "GET") -> Any:
    request = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


def test_the_control_endpoint_reports_and_resets_the_counts(
        meta: Capi, tls_files: tuple[Path, Path]) -> None:
    with server.start(meta.world, tls_files[0].parent) as running:  # the clock is restored
        assert running.meta_capi is not None
        probe = Capi(running.sandbox, running.meta_capi, running.endpoints["meta"])
        control = running.endpoints["control"]
        with sdk_at(running.endpoints["meta"]):
            send(probe, event(probe, "order-1"))
            running.sandbox.world.advance(3)
            send(probe, event(probe, "order-1"))
            refused(probe, event(probe, "order-2", age=9 * DAY))

        summary = _control(f"{control}/meta/capi")
        assert summary["requests"] == 3
        assert summary["rejections"] == {"event_time_too_old": 1}
        pixel = summary["pixels"][probe.pixel]
        assert (pixel["events_counted"], pixel["counted_twice"]) == (2, 1)
        assert pixel["events"]["Purchase"]["order-1"]["counted"] == 2
        assert running.meta_capi.counted_twice() == 1
        assert "events" not in _control(f"{control}/meta/capi?events=0")["pixels"][probe.pixel]

        _control(f"{control}/meta/capi", "DELETE")
        assert _control(f"{control}/meta/capi")["pixels"] == {}
