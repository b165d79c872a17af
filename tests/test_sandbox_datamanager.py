"""The Data Manager API simulator through the real SDK (google-ads-datamanager), REST and gRPC.

Every test drives ``datamanager_v1.IngestionServiceClient`` against a running sandbox: what a
valid request becomes once processed, each validation error rejecting the whole request in the
API's error shape, limits, consent, restatements by transaction id, quotas and faults, and a
pull that sees the uploads arrive in the Google Ads stats."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import grpc
import pytest
from google.ads import datamanager_v1 as dm
from google.ads.datamanager_v1.services.ingestion_service.transports import (
    IngestionServiceGrpcTransport,
)
from google.api_core import exceptions
from google.api_core import retry as retries
from google.auth.credentials import AnonymousCredentials
from google.auth.exceptions import RefreshError
from google.oauth2.credentials import Credentials
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from convsync import pipeline
from convsync.hashing import normalize_email_google
from convsync.model import Basis, Platform
from convsync.sandbox import server
from convsync.sandbox.control import Sandbox
from convsync.sandbox.datamanager import (
    DataManager,
    build_datamanager_grpc_server,
    serve_datamanager_rest,
)
from convsync.sandbox.world import MICRO_UPLOAD_ACTION_ID, Click, World, WorldSpec
from convsync.settings import load_config, load_secrets
from convsync.store import Store

SPEC = WorldSpec(seed=11, start=dt.date(2026, 9, 1), days=45, campaigns=8,
                 micro_upload_action=True)
"""Its clock stands at 2026-10-16 00:00 UTC (the end of its last day)."""
CUSTOMER, MANAGER = "1234567890", "9876543210"
LEADS = "6108"  # "Qualified lead (offline)": UPLOAD_CLICKS, ONE_PER_CLICK, 90 days, primary
R = dm.ProcessingErrorReason
Status = dm.RequestStatusPerDestination.RequestStatus
TRANSPORTS = ("rest", "grpc")
GRPC_CLASS: dict[type[Exception], type[Exception]] = {
    exceptions.BadRequest: exceptions.InvalidArgument,
    exceptions.Forbidden: exceptions.PermissionDenied,
    exceptions.TooManyRequests: exceptions.ResourceExhausted,
    exceptions.Unauthorized: exceptions.Unauthenticated,
}
"""The SDK raises the class of the HTTP status over REST (400 BadRequest) and its subclass
named after the gRPC code over gRPC (InvalidArgument): catch the HTTP-named one for both."""


def raised_as(error: BaseException, expected: type[Exception], transport: str) -> bool:
    wanted = GRPC_CLASS.get(expected, expected) if transport == "grpc" else expected
    return type(error) is wanted


@dataclass
class Served:
    """The Data Manager simulator on both transports, over a world of its own."""

    dm: DataManager
    grpc_port: int
    rest_port: int
    cert: Path
    _grpc: grpc.Server
    _http: ThreadingHTTPServer

    @property
    def world(self) -> World:
        return self.dm.world

    def client(self, transport: str, token: str | None = None) -> dm.IngestionServiceClient:
        """The SDK's client as a convsync sink would build it (anonymous unless ``token``)."""
        if transport == "rest":
            credentials = Credentials(token=token) if token else AnonymousCredentials()
            return dm.IngestionServiceClient(
                credentials=credentials, transport="rest",
                client_options={"api_endpoint": f"http://127.0.0.1:{self.rest_port}"})
        channel = grpc.secure_channel(f"localhost:{self.grpc_port}",
                                      grpc.ssl_channel_credentials(self.cert.read_bytes()))
        return dm.IngestionServiceClient(transport=IngestionServiceGrpcTransport(channel=channel))

    def stop(self) -> None:
        self._grpc.stop(grace=None)
        self._http.shutdown()
        self._http.server_close()


@pytest.fixture(scope="module")
def servers(tls_files: tuple[Path, Path]) -> Iterator[Served]:
    datamanager = DataManager(Sandbox(World(SPEC)))
    server_, port = build_datamanager_grpc_server(datamanager, *tls_files)
    http = serve_datamanager_rest(datamanager)
    running = Served(datamanager, port, http.server_port, tls_files[0], server_, http)
    yield running
    running.stop()


@pytest.fixture
def served(servers: Served) -> Served:
    """The simulator with a fresh world (tests move its clock and fill its ledger) and
    nothing counted, stored or owed."""
    sandbox = servers.dm.sandbox
    sandbox.world = World(SPEC)
    sandbox.reset_requests()
    sandbox.clear_faults()
    servers.dm.reset()
    return servers


# -- building requests -----------------------------------------------------------------------------
def stamp(seconds: float) -> Timestamp:
    out = Timestamp()
    out.FromNanoseconds(int(seconds * 1e9))
    return out


def destination(action: str = LEADS, reference: str = "", *, login: str | None = MANAGER,
                operating: str = CUSTOMER) -> dm.Destination:
    google_ads = dm.ProductAccount.AccountType.GOOGLE_ADS
    out = dm.Destination(reference=reference, product_destination_id=action,
                         operating_account=dm.ProductAccount(account_type=google_ads,
                                                             account_id=operating))
    if login:
        out.login_account = dm.ProductAccount(account_type=google_ads, account_id=login)
    return out


def clicks(world: World, day: dt.date, count: int) -> list[Click]:
    """Clicks of the world's Google campaigns on one account-time-zone day."""
    out = list(world.google_ads_clicks(day))[:count]
    assert len(out) == count
    return out


def event(click: Click | None, txid: str = "", *, value: float | None = 10.0,
          after_hours: float = 2.0, gclid: str | None = None, **fields: Any) -> dm.Event:
    """A conversion ``after_hours`` after the click (web, gclid, USD) unless told otherwise."""
    fields.setdefault("currency", "USD")
    out = dm.Event(transaction_id=txid, event_source=dm.EventSource.WEB, **fields)
    if click is not None:
        out.event_timestamp = stamp(click.timestamp + after_hours * 3600)
        out.ad_identifiers = dm.AdIdentifiers(gclid=gclid or click.gclid)
    if value is not None:
        out.conversion_value = value
    return out


def request(events: list[dm.Event], destinations: list[dm.Destination] | None = None,
            **fields: Any) -> dm.IngestEventsRequest:
    return dm.IngestEventsRequest(destinations=destinations or [destination()], events=events,
                                  encoding=dm.Encoding.HEX, **fields)


def status_of(client: dm.IngestionServiceClient,
              request_id: str) -> list[dm.RequestStatusPerDestination]:
    response = client.retrieve_request_status(
        request=dm.RetrieveRequestStatusRequest(request_id=request_id), retry=None)
    return list(response.request_status_per_destination)


def error_counts(status: dm.RequestStatusPerDestination) -> dict[Any, int]:
    return {c.reason: c.record_count for c in status.error_info.error_counts}


def upload_stats(world: World, action_id: int, *,
                 by_conversion_date: bool = True) -> tuple[Counter[dt.date], float]:
    """(conversions per date, total value) the Google Ads simulator reports for one action."""
    counts: Counter[dt.date] = Counter()
    value = 0.0
    for stat in world.google_ads_stats(world.start, world.end,
                                       by_conversion_date=by_conversion_date):
        if stat.action.id == action_id:
            counts[stat.date] += stat.all_conversions
            value += stat.all_conversions_value
    return counts, round(value, 2)


def local_date(ts: float) -> dt.date:
    """The account-time-zone date of a moment (what conversion-date stats are filed under)."""
    return dt.datetime.fromtimestamp(ts, ZoneInfo("America/New_York")).date()


def email_hash(world: World, day: int, index: int, *, base64_encoded: bool = False) -> str:
    digest = hashlib.sha256(normalize_email_google(world.email(day, index)).encode()).digest()
    return base64.b64encode(digest).decode() if base64_encoded else digest.hex()


# -- a valid request -------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_valid_request_is_processing_then_succeeds_and_shows_in_the_stats(
        served: Served, transport: str) -> None:
    world = served.world
    client = served.client(transport)
    sent = clicks(world, dt.date(2026, 10, 5), 4)
    response = client.ingest_events(
        request=request([event(c, f"lead-{i}", value=100.0 + i) for i, c in enumerate(sent)],
                        consent=dm.Consent(ad_user_data=dm.ConsentStatus.CONSENT_GRANTED)),
        retry=None)
    assert response.request_id and not response.field_warnings
    (status,) = status_of(client, response.request_id)
    assert status.request_status == Status.PROCESSING
    assert status.events_ingestion_status.record_count == 4
    assert not status.error_info.error_counts
    assert status.destination.product_destination_id == LEADS
    assert status.destination.login_account.account_id == MANAGER
    assert upload_stats(world, int(LEADS)) == (Counter(), 0.0)  # nothing before processing

    world.advance(29 / 1440)
    assert status_of(client, response.request_id)[0].request_status == Status.PROCESSING
    world.advance(2 / 1440)
    (status,) = status_of(client, response.request_id)
    assert status.request_status == Status.SUCCESS
    assert status.events_ingestion_status.record_count == 4
    counts, value = upload_stats(world, int(LEADS))
    assert sum(counts.values()) == 4 and value == 406.0
    # on the conversion date, in the account's time zone, under each click's campaign
    assert counts == Counter(local_date(c.timestamp + 7200) for c in sent)
    by_click, _ = upload_stats(world, int(LEADS), by_conversion_date=False)
    assert by_click == Counter(c.date for c in sent)
    by_campaign = Counter(s.campaign.id for s in world.google_ads_stats(
        world.start, world.end) if s.action.id == int(LEADS) for _ in range(s.all_conversions))
    assert by_campaign == Counter(c.campaign.id for c in sent)
    summary = served.dm.summary()
    assert summary["requests"] == {"IngestEvents": 1, "RetrieveRequestStatus": 3}
    assert (summary["ingested_requests"], summary["processed_requests"]) == (1, 1)
    assert summary["conversions"] == 4 and summary["accepted_value"] == 406.0
    assert summary["transactions"][LEADS]["lead-2"] == {
        "events": 1, "conversions": 1, "adjustments": 0, "duplicates": 0, "errors": 0,
        "value": 102.0, "currency": "USD"}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_processing_reports_error_counts_per_destination(served: Served, transport: str) -> None:
    world = served.world
    short = world.add_google_ads_action("Short window (upload)", click_through_days=7,
                                        created=world.as_of - dt.timedelta(days=30))
    good = clicks(world, dt.date(2026, 10, 5), 6)
    recent = next(c for c in world.google_ads_clicks(dt.date(2026, 10, 15))
                  if world.as_of_ts - 5 * 3600 < c.timestamp < world.as_of_ts - 3600)
    denied = dm.Consent(ad_user_data=dm.ConsentStatus.CONSENT_DENIED)
    leads = [
        event(good[0], "ok-0"), event(good[1], "ok-1"), event(good[2], "ok-2"),
        event(good[3], "missing", gclid="Cj0KCQ" + "0" * 40),  # no such click
        event(good[4], "garbled", gclid="not a gclid!"),
        event(good[5], "early", after_hours=-1.0),  # a time zone bug: before its click
        event(recent, "recent", after_hours=0.5),
        event(good[0], "denied", consent=denied),
    ]
    old = clicks(world, dt.date(2026, 9, 20), 2)
    short_only = [event(c, f"late-{i}", after_hours=24 * 10, destination_references=["short"])
                  for i, c in enumerate(old)]
    client = served.client(transport)
    response = client.ingest_events(request=request(
        leads + short_only,
        [destination(LEADS, "leads"), destination(str(short.id), "short")]), retry=None)
    world.advance(1 / 24)
    leads_status, short_status = status_of(client, response.request_id)
    assert leads_status.request_status == Status.PARTIAL_SUCCESS
    assert leads_status.events_ingestion_status.record_count == 8  # every event without refs
    assert error_counts(leads_status) == {
        R.PROCESSING_ERROR_REASON_CLICK_NOT_FOUND: 1, R.PROCESSING_ERROR_REASON_INVALID_GCLID: 1,
        R.PROCESSING_ERROR_REASON_CONVERSION_PRECEDES_CLICK: 1,
        R.PROCESSING_ERROR_REASON_TOO_RECENT_CLICK: 1,
        R.PROCESSING_ERROR_REASON_DENIED_CONSENT: 1}
    # the short-window action got the 8 unreferenced events and the 2 late ones, all but the
    # three good ones failing (the late ones: clicked more than its 7 days before)
    assert short_status.request_status == Status.PARTIAL_SUCCESS
    assert short_status.events_ingestion_status.record_count == 10
    assert error_counts(short_status)[R.PROCESSING_ERROR_REASON_EVENT_TOO_OLD] == 2
    assert sum(upload_stats(world, int(LEADS))[0].values()) == 3
    assert served.dm.summary()["processing_errors"]["PROCESSING_ERROR_REASON_EVENT_TOO_OLD"] == 2

    failing = client.ingest_events(
        request=request([event(good[3], "x", gclid="Cj0KCQ" + "1" * 40)]), retry=None)
    world.advance(1 / 24)
    (status,) = status_of(client, failing.request_id)
    assert status.request_status == Status.FAILED
    assert error_counts(status) == {R.PROCESSING_ERROR_REASON_CLICK_NOT_FOUND: 1}


# -- whole-request rejection -----------------------------------------------------------------------
Mutation = Callable[[dm.IngestEventsRequest, World], None]


def _pb(message: Any) -> Any:
    return type(message).pb(message)


def _set(**fields: Any) -> Mutation:
    def mutate(req: dm.IngestEventsRequest, world: World) -> None:
        for name, value in fields.items():
            setattr(req.events[0], name, value)
    return mutate


def _clear(name: str) -> Mutation:
    def mutate(req: dm.IngestEventsRequest, world: World) -> None:
        _pb(req.events[0]).ClearField(name)
    return mutate


def _emails(*values: str, encoding: int = dm.Encoding.HEX) -> Mutation:
    def mutate(req: dm.IngestEventsRequest, world: World) -> None:
        req.events[0].user_data = dm.UserData(user_identifiers=[
            dm.UserIdentifier(email_address=v) for v in values])
        _pb(req).encoding = encoding
    return mutate


def _raw(setter: Callable[[Any], None]) -> Mutation:
    def mutate(req: dm.IngestEventsRequest, world: World) -> None:
        setter(_pb(req))
    return mutate


def _destination(**kwargs: Any) -> Mutation:
    def mutate(req: dm.IngestEventsRequest, world: World) -> None:
        req.destinations[0] = destination(**kwargs)
    return mutate


def _new_action(req: dm.IngestEventsRequest, world: World) -> None:
    action = world.add_google_ads_action("Created an hour ago", created=world.as_of
                                         - dt.timedelta(hours=1))
    req.destinations[0] = destination(str(action.id))


def _future(req: dm.IngestEventsRequest, world: World) -> None:
    req.events[0].event_timestamp = stamp(world.as_of_ts + 3600)


SHA = hashlib.sha256(b"jane@example.com").hexdigest()
REJECTIONS: list[tuple[str, Mutation, type[Exception], str, str]] = [
    ("event_source missing", _clear("event_source"), exceptions.BadRequest,
     "REQUIRED_FIELD_MISSING", "events[0].event_source"),
    ("event_timestamp missing", _clear("event_timestamp"), exceptions.BadRequest,
     "REQUIRED_FIELD_MISSING", "events[0].event_timestamp"),
    ("event in the future", _future, exceptions.BadRequest, "EVENT_TIME_INVALID",
     "events[0].event_timestamp"),
    ("no identifiers", _clear("ad_identifiers"), exceptions.BadRequest,
     "NO_IDENTIFIERS_PROVIDED", "events[0]"),
    ("email in clear", _emails("jane@example.com"), exceptions.BadRequest,
     "INVALID_HEX_ENCODING", "events[0].user_data.user_identifiers[0].email_address"),
    ("hex but not SHA-256", _emails(SHA[:40]), exceptions.BadRequest,
     "INVALID_SHA256_FORMAT", "events[0].user_data.user_identifiers[0].email_address"),
    ("bad base64", _emails("***", encoding=dm.Encoding.BASE64), exceptions.BadRequest,
     "INVALID_BASE64_ENCODING", "events[0].user_data.user_identifiers[0].email_address"),
    ("user data without encoding", _emails(SHA, encoding=0), exceptions.BadRequest,
     "REQUIRED_FIELD_MISSING", "encoding"),
    ("11 identifiers", _emails(*[SHA] * 11), exceptions.BadRequest,
     "TOO_MANY_USER_IDENTIFIERS", "events[0].user_data.user_identifiers"),
    ("consent out of its enum", _raw(lambda pb: setattr(pb.consent, "ad_user_data", 7)),
     exceptions.BadRequest, "INVALID_ENUM_VALUE", "consent.ad_user_data"),
    ("event consent out of its enum",
     _raw(lambda pb: setattr(pb.events[0].consent, "ad_personalization", 9)),
     exceptions.BadRequest, "INVALID_ENUM_VALUE", "events[0].consent.ad_personalization"),
    ("lower-case currency", _set(currency="usd"), exceptions.BadRequest,
     "INVALID_CURRENCY_CODE", "events[0].currency"),
    ("a webpage action", _destination(action="6101"), exceptions.BadRequest,
     "INVALID_CONVERSION_ACTION_TYPE", "destinations[0].product_destination_id"),
    ("no such action", _destination(action="999"), exceptions.BadRequest,
     "INVALID_CONVERSION_ACTION_ID", "destinations[0].product_destination_id"),
    ("an action created an hour ago", _new_action, exceptions.BadRequest,
     "CONVERSION_ACTION_TOO_RECENTLY_CREATED", "destinations[0].product_destination_id"),
    ("account id with dashes", _destination(operating="123-456-7890"),
     exceptions.BadRequest, "INVALID_FORMAT",
     "destinations[0].operating_account.account_id"),
    ("another customer's account", _destination(operating="1111111111", login=None),
     exceptions.Forbidden, "PERMISSION_DENIED", ""),
    ("a login that manages nothing here", _destination(login="2222222222"),
     exceptions.Forbidden, "PERMISSION_DENIED", ""),
    ("an unknown destination reference", _set(destination_references=["nowhere"]),
     exceptions.BadRequest, "INVALID_DESTINATION", "events[0].destination_references[0]"),
]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(("case", "mutate", "raised", "reason", "field"), REJECTIONS,
                         ids=[r[0] for r in REJECTIONS])
def test_an_invalid_request_is_rejected_whole_in_the_api_error_shape(
        served: Served, transport: str, case: str, mutate: Mutation, raised: type[Exception],
        reason: str, field: str) -> None:
    world = served.world
    good = clicks(world, dt.date(2026, 10, 5), 3)
    req = request([event(c, f"t{i}") for i, c in enumerate(good)])
    mutate(req, world)
    with pytest.raises(raised) as caught:
        served.client(transport).ingest_events(request=req, retry=None)
    error = caught.value
    assert isinstance(error, exceptions.GoogleAPICallError)
    assert raised_as(error, raised, transport)
    assert error.reason == reason
    assert error.domain == "datamanager.googleapis.com"
    details = _details(error)
    assert "RequestInfo" in details and details["RequestInfo"]["requestId"]
    if field:
        violations = details["BadRequest"]["fieldViolations"]
        assert violations[0]["field"] == field and violations[0]["reason"] == reason
        assert field in error.message
    # nothing was processed: the two good events did not count either
    assert served.dm.summary()["ingested_requests"] == 0 and len(world.uploads) == 0
    assert served.dm.summary()["rejections"] == {reason: 1}


def _details(error: exceptions.GoogleAPICallError) -> dict[str, dict[str, Any]]:
    """The error's standard details by type name, as dicts (REST gives dicts, gRPC messages)."""
    out = {}
    for detail in error.details:
        if isinstance(detail, dict):
            out[detail["@type"].rsplit(".", 1)[1]] = detail
        else:
            out[type(detail).__name__] = json_format.MessageToDict(detail)
    return out


def test_violations_are_all_named_up_to_a_hundred(served: Served) -> None:
    good = clicks(served.world, dt.date(2026, 10, 5), 1)[0]
    events = [event(good, f"t{i}") for i in range(150)]
    for e in events:
        dm.Event.pb(e).ClearField("event_source")
    with pytest.raises(exceptions.BadRequest) as caught:
        served.client("rest").ingest_events(request=request(events), retry=None)
    violations = _details(caught.value)["BadRequest"]["fieldViolations"]
    assert len(violations) == 100 and violations[99]["field"] == "events[99].event_source"
    assert "(and 149 more)" in caught.value.message


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_limits_on_events_and_destinations(served: Served, transport: str) -> None:
    world = served.world
    client = served.client(transport)
    pool = clicks(world, dt.date(2026, 10, 5), 100)
    events = [event(pool[i % 100], f"t{i}") for i in range(2001)]
    with pytest.raises(exceptions.BadRequest) as too_many:
        client.ingest_events(request=request(events), retry=None)
    assert too_many.value.reason == "TOO_MANY_EVENTS"
    with pytest.raises(exceptions.BadRequest) as destinations:
        client.ingest_events(request=request(events[:1], [destination()] * 11), retry=None)
    assert destinations.value.reason == "TOO_MANY_DESTINATIONS"
    accepted = client.ingest_events(request=request(events[:2000]), retry=None)
    world.advance(1 / 24)
    (status,) = status_of(client, accepted.request_id)
    assert status.request_status == Status.SUCCESS
    assert status.events_ingestion_status.record_count == 2000
    # ONE_PER_CLICK: 2,000 transactions on 100 clicks are 100 conversions in the stats
    assert sum(upload_stats(world, int(LEADS))[0].values()) == 100
    assert served.dm.summary()["conversions"] == 2000


# -- consent and user data -------------------------------------------------------------------------
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_denied_consent_fails_events_unless_the_event_grants_it(served: Served,
                                                                 transport: str) -> None:
    world = served.world
    client = served.client(transport)
    sent = clicks(world, dt.date(2026, 10, 6), 3)
    granted = dm.Consent(ad_user_data=dm.ConsentStatus.CONSENT_GRANTED)
    events = [event(sent[0], "a"), event(sent[1], "b", consent=granted),
              event(sent[2], "c", consent=dm.Consent(
                  ad_personalization=dm.ConsentStatus.CONSENT_DENIED))]
    response = client.ingest_events(request=request(
        events, consent=dm.Consent(ad_user_data=dm.ConsentStatus.CONSENT_DENIED,
                                   ad_personalization=dm.ConsentStatus.CONSENT_GRANTED)),
        retry=None)
    world.advance(1 / 24)
    (status,) = status_of(client, response.request_id)
    # the event-level grant overrides the request's denial; denying personalization alone
    # does not stop a conversion, but "c" inherits the request's ad_user_data denial
    assert status.request_status == Status.PARTIAL_SUCCESS
    assert error_counts(status) == {R.PROCESSING_ERROR_REASON_DENIED_CONSENT: 2}
    transactions = served.dm.summary()["transactions"][LEADS]
    assert [transactions[t]["conversions"] for t in "abc"] == [0, 1, 0]


@pytest.mark.parametrize("encoding", ["hex", "base64"])
def test_user_data_only_events_match_a_google_click_by_hashed_email(served: Served,
                                                                     encoding: str) -> None:
    """Enhanced conversions for leads: a Google clicker's email finds their click; a Meta
    campaign's visitor has clicked no Google ad, so nothing is found for them."""
    world = served.world
    day = world.day(world.first_day + 30)
    google = {c.index for c in world.campaigns_on("google_ads")}
    people = [i for i in range(day.size) if not day.view_through[i]]
    clicker = next(i for i in people if int(day.campaign[i]) in google)
    stranger = next(i for i in people if int(day.campaign[i]) not in google)
    as_b64 = encoding == "base64"
    at = float(day.click_ts[clicker]) + 7200

    def lead(index: int, txid: str) -> dm.Event:
        return dm.Event(transaction_id=txid, event_source=dm.EventSource.WEB,
                        event_timestamp=stamp(at), conversion_value=50.0, currency="USD",
                        user_data=dm.UserData(user_identifiers=[
                            dm.UserIdentifier(email_address=email_hash(
                                world, day.day, index, base64_encoded=as_b64))]))

    client = served.client("rest")
    response = client.ingest_events(request=dm.IngestEventsRequest(
        destinations=[destination()], events=[lead(clicker, "known"), lead(stranger, "nobody")],
        encoding=dm.Encoding.BASE64 if as_b64 else dm.Encoding.HEX), retry=None)
    world.advance(1 / 24)
    (status,) = status_of(client, response.request_id)
    assert error_counts(status) == {R.PROCESSING_ERROR_REASON_CLICK_NOT_FOUND: 1}
    (upload,) = world.uploads.uploads(int(LEADS))
    assert (upload.key, upload.click.day, upload.click.index) == ("known", day.day, clicker)


# -- restatements and exactly once -----------------------------------------------------------------
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_same_transaction_id_restates_the_value_and_never_counts_twice(
        served: Served, transport: str) -> None:
    world = served.world
    client = served.client(transport)
    click = clicks(world, dt.date(2026, 10, 7), 1)[0]
    first = client.ingest_events(request=request([event(click, "order-1", value=10.0)]),
                                 retry=None)
    world.advance(1 / 24)
    day = local_date(click.timestamp + 7200)
    assert upload_stats(world, int(LEADS)) == (Counter({day: 1}), 10.0)
    restated = client.ingest_events(request=request([event(click, "order-1", value=25.0)]),
                                    retry=None)
    assert upload_stats(world, int(LEADS))[1] == 10.0  # until the restatement is processed
    world.advance(1 / 24)
    assert upload_stats(world, int(LEADS)) == (Counter({day: 1}), 25.0)
    client.ingest_events(request=request([event(click, "order-1", value=25.0)]), retry=None)
    world.advance(1 / 24)
    for response in (first, restated):
        assert status_of(client, response.request_id)[0].request_status == Status.SUCCESS
    assert upload_stats(world, int(LEADS)) == (Counter({day: 1}), 25.0)
    assert served.dm.summary()["transactions"][LEADS]["order-1"] == {
        "events": 3, "conversions": 1, "adjustments": 1, "duplicates": 1, "errors": 0,
        "value": 25.0, "currency": "USD"}

    twice = client.ingest_events(request=request(
        [event(click, "order-2", value=5.0), event(click, "order-2", value=6.0)]), retry=None)
    no_txid = event(click, value=7.0)
    once_more = client.ingest_events(request=request([no_txid]), retry=None)
    again = client.ingest_events(request=request([no_txid]), retry=None)
    world.advance(1 / 24)
    assert error_counts(status_of(client, twice.request_id)[0]) == {
        R.PROCESSING_ERROR_REASON_DUPLICATE_TRANSACTION_ID: 1}
    assert status_of(client, once_more.request_id)[0].request_status == Status.SUCCESS
    assert error_counts(status_of(client, again.request_id)[0]) == {
        R.PROCESSING_ERROR_REASON_DUPLICATE_GCLID: 1}


def test_a_retry_of_a_request_google_already_took_is_counted_once(served: Served) -> None:
    """The SDK's own retry (on DEADLINE_EXCEEDED) resends a request the server is still
    processing: with transaction ids the second copy changes nothing."""
    world = served.world
    served.dm.sandbox.inject("datamanager", "slow", delay=1.5)
    sent = clicks(world, dt.date(2026, 10, 8), 3)
    retry = retries.Retry(initial=0.05, maximum=0.1, multiplier=1.0, timeout=15.0,
                          predicate=retries.if_exception_type(exceptions.DeadlineExceeded,
                                                              exceptions.ServiceUnavailable))
    served.client("grpc").ingest_events(
        request=request([event(c, f"once-{i}") for i, c in enumerate(sent)]), retry=retry,
        timeout=0.5)
    deadline = dt.datetime.now() + dt.timedelta(seconds=10)
    while served.dm.summary()["ingested_requests"] < 2 and dt.datetime.now() < deadline:
        time.sleep(0.05)  # the first copy lands after its client gave up on it
    summary = served.dm.summary()
    assert summary["requests"]["IngestEvents"] == 2 and summary["ingested_requests"] == 2
    assert (summary["conversions"], summary["duplicates"]) == (3, 3)
    world.advance(1 / 24)
    assert sum(upload_stats(world, int(LEADS))[0].values()) == 3


# -- quotas, faults, credentials -------------------------------------------------------------------
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_quota_per_minute_and_per_day(served: Served, transport: str) -> None:
    client = served.client(transport)
    click = clicks(served.world, dt.date(2026, 10, 5), 1)[0]
    served.dm.configure(writes_per_minute=2)
    taken = [client.ingest_events(request=request([event(click, "q")]), retry=None)
             for _ in range(2)]
    with pytest.raises(exceptions.TooManyRequests) as caught:
        client.ingest_events(request=request([event(click, "q")]), retry=None)
    error = caught.value
    assert error.code == 429 or error.grpc_status_code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (error.reason, error.domain) == ("RATE_LIMIT_EXCEEDED", "googleapis.com")
    assert error.metadata["quota_limit_value"] == "2"
    assert "Requests per minute per project" in error.message
    # reads have a quota of their own
    assert status_of(client, taken[0].request_id)
    served.dm.reset_quota()
    served.dm.configure(writes_per_minute=300, writes_per_day=1)
    client.ingest_events(request=request([event(click, "q")]), retry=None)
    with pytest.raises(exceptions.TooManyRequests) as daily:
        client.ingest_events(request=request([event(click, "q")]), retry=None)
    assert "Requests per day per project" in daily.value.message
    assert served.dm.summary()["rejections"] == {"RATE_LIMIT_EXCEEDED": 2}


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(("kind", "raised", "reason"), [
    ("rate_limit", exceptions.TooManyRequests, "RATE_LIMIT_EXCEEDED"),
    ("exhausted", exceptions.TooManyRequests, "RATE_LIMIT_EXCEEDED"),
    ("server_error", exceptions.ServiceUnavailable, "UNAVAILABLE"),
])
def test_injected_faults_answer_as_the_api(served: Served, transport: str, kind: str,
                                           raised: type[Exception], reason: str) -> None:
    click = clicks(served.world, dt.date(2026, 10, 5), 1)[0]
    served.dm.sandbox.inject("datamanager", kind)
    client = served.client(transport)
    with pytest.raises(raised) as caught:
        client.ingest_events(request=request([event(click, "f")]), retry=None)
    assert raised_as(caught.value, raised, transport)
    assert caught.value.reason == reason
    assert client.ingest_events(request=request([event(click, "f")]), retry=None).request_id


def test_the_sdk_retries_unavailable_by_itself(served: Served) -> None:
    """ingest_events' default retry resends on UNAVAILABLE (after 5 s, for up to 120 s): a
    client that owns its retries must pass ``retry`` (here a fast one to show the resend)."""
    click = clicks(served.world, dt.date(2026, 10, 5), 1)[0]
    served.dm.sandbox.inject("datamanager", "server_error", count=2)
    fast = retries.Retry(initial=0.01, maximum=0.02, multiplier=1.0, timeout=5.0,
                         predicate=retries.if_exception_type(exceptions.ServiceUnavailable))
    response = served.client("rest").ingest_events(request=request([event(click, "r")]),
                                                   retry=fast)
    assert response.request_id
    assert served.dm.summary()["requests"]["IngestEvents"] == 3
    assert served.dm.summary()["rejections"] == {"UNAVAILABLE": 2}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_expired_token_and_missing_scope(served: Served, transport: str) -> None:
    """A token without the datamanager scope is refused; an expired one over gRPC is
    UNAUTHENTICATED, while over REST google-auth's session answers a 401 by refreshing the
    credentials and retrying once (a token-only credential cannot: RefreshError)."""
    click = clicks(served.world, dt.date(2026, 10, 5), 1)[0]
    cases: list[tuple[str, type[Exception], str | None]] = [
        ("no-datamanager-scope", exceptions.Forbidden, "ACCESS_TOKEN_SCOPE_INSUFFICIENT"),
        ("expired", exceptions.Unauthorized, "ACCESS_TOKEN_EXPIRED") if transport == "grpc"
        else ("expired", RefreshError, None)]
    for token, raised, reason in cases:
        client = served.client(transport, token)
        metadata = [("authorization", f"Bearer {token}")] if transport == "grpc" else []
        with pytest.raises(raised) as caught:
            client.ingest_events(request=request([event(click, "t")]), retry=None,
                                 metadata=metadata)
        if reason:
            assert getattr(caught.value, "reason", None) == reason
    assert served.dm.summary()["rejections"] == {"ACCESS_TOKEN_SCOPE_INSUFFICIENT": 1,
                                                 "ACCESS_TOKEN_EXPIRED": 1}
    ok = served.client(transport, "sandbox-token")
    metadata = [("authorization", "Bearer sandbox-token")] if transport == "grpc" else []
    assert ok.ingest_events(request=request([event(click, "t")]), retry=None,
                            metadata=metadata).request_id


# -- statuses over time, validate_only -------------------------------------------------------------
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_request_status_lookups(served: Served, transport: str) -> None:
    world = served.world
    client = served.client(transport)
    click = clicks(world, dt.date(2026, 10, 5), 1)[0]
    response = client.ingest_events(request=request([event(click, "s")]), retry=None)
    with pytest.raises(exceptions.NotFound):
        status_of(client, "7b2d4f0e-1c7a-4a51-9f3e-2f0c9d8e6a11")
    with pytest.raises(exceptions.BadRequest) as malformed:
        status_of(client, "not-a-request-id")
    assert malformed.value.reason == "INVALID_REQUEST_ID"
    world.advance(49)
    assert status_of(client, response.request_id)[0].request_status == Status.SUCCESS
    world.advance(2)
    with pytest.raises(exceptions.BadRequest) as too_old:
        status_of(client, response.request_id)
    assert too_old.value.reason == "REQUEST_TOO_OLD"
    world.advance(10)
    with pytest.raises(exceptions.NotFound):
        status_of(client, response.request_id)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_validate_only_checks_and_keeps_nothing(served: Served, transport: str) -> None:
    client = served.client(transport)
    click = clicks(served.world, dt.date(2026, 10, 5), 1)[0]
    response = client.ingest_events(request=request([event(click, "v")], validate_only=True),
                                    retry=None)
    assert response.request_id == ""
    with pytest.raises(exceptions.BadRequest):
        client.ingest_events(request=request([event(click, "v", currency="usd")],
                                             validate_only=True), retry=None)
    summary = served.dm.summary()
    assert (summary["validate_only_requests"], summary["ingested_requests"]) == (1, 0)
    assert len(served.world.uploads) == 0


def test_rest_wire_details(served: Served) -> None:
    """What a hand-rolled REST client sees: camelCase or snake_case bodies, enums by name,
    unknown fields refused, the other IngestionService methods not simulated."""
    click = clicks(served.world, dt.date(2026, 10, 5), 1)[0]
    base = f"http://127.0.0.1:{served.rest_port}"
    body = {
        "destinations": [{"operatingAccount": {"accountType": "GOOGLE_ADS",
                                               "accountId": CUSTOMER},
                          "product_destination_id": LEADS}],
        "events": [{"transactionId": "wire", "eventSource": "WEB",
                    "eventTimestamp": dt.datetime.fromtimestamp(
                        click.timestamp + 60, dt.UTC).isoformat().replace("+00:00", "Z"),
                    "adIdentifiers": {"gclid": click.gclid}, "conversionValue": 3.5}],
    }
    status, answer = _post(f"{base}/v1/events:ingest", body)
    assert status == 200 and set(answer) == {"requestId"}
    status, answer = _get(f"{base}/v1/requestStatus:retrieve?requestId={answer['requestId']}")
    assert status == 200
    assert answer["requestStatusPerDestination"][0]["requestStatus"] == "PROCESSING"
    body["events"][0]["color"] = "blue"
    status, answer = _post(f"{base}/v1/events:ingest", body)
    assert status == 400 and answer["error"]["status"] == "INVALID_ARGUMENT"
    assert 'Unknown name "color"' in answer["error"]["message"]
    status, answer = _post(f"{base}/v1/audienceMembers:ingest", {})
    assert status == 501 and answer["error"]["status"] == "UNIMPLEMENTED"


def _post(url: str, body: Any) -> tuple[int, Any]:
    req = urllib.request.Request(url, json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    return _send(req)


def _get(url: str) -> tuple[int, Any]:
    return _send(urllib.request.Request(url))


def _send(req: urllib.request.Request) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


# -- the whole sandbox: serve, control, push, pull -------------------------------------------------
def test_pull_after_processing_sees_the_uploads(tls_files: tuple[Path, Path],
                                                 tmp_path: Path) -> None:
    spec = WorldSpec(seed=41, start=dt.date(2026, 9, 1), days=40, campaigns=6,
                     micro_upload_action=True)
    with server.start(World(spec), tls_files[0].parent) as running:
        world = running.world
        endpoints = running.endpoints
        assert endpoints["datamanager"] == endpoints["google_ads"]
        control = endpoints["control"]
        # a brand-new action refuses uploads for about 6 hours
        status, created = _post(f"{control}/datamanager/actions",
                                {"name": "Fresh (upload)", "click_through_days": 30})
        assert status == 200 and created["type"] == "UPLOAD_CLICKS"
        client = dm.IngestionServiceClient(
            credentials=AnonymousCredentials(), transport="rest",
            client_options={"api_endpoint": endpoints["datamanager_rest"]})
        sent = clicks(world, dt.date(2026, 10, 1), 5)
        micro = [event(c, f"micro-{i}", value=2.5) for i, c in enumerate(sent)]
        with pytest.raises(exceptions.BadRequest) as fresh:
            client.ingest_events(request=request(micro, [destination(str(created["id"]))]),
                                 retry=None)
        assert fresh.value.reason == "CONVERSION_ACTION_TOO_RECENTLY_CREATED"
        status, _ = _post(f"{control}/datamanager/actions",
                          {"id": created["id"], "created_hours_ago": 7})
        assert status == 200

        leads = [event(c, f"lead-{i}", value=150.0, after_hours=30) for i, c in enumerate(sent)]
        client.ingest_events(request=request(leads), retry=None)
        client.ingest_events(request=request(
            micro, [destination(str(MICRO_UPLOAD_ACTION_ID)), destination(str(created["id"]))]),
            retry=None)
        def pulled(name: str) -> Counter[tuple[str, Basis]]:
            """Google Ads pulled into a store of its own, by action and basis."""
            path = tmp_path / f"{name}.toml"
            server.write_client_config(path, running)
            config = load_config(path)
            with Store.open(config.store_url()) as store:
                result = pipeline.pull(config, load_secrets(config), store,
                                       platforms=[Platform.GOOGLE_ADS], today=world.end)
                assert result.failed == []
                got: Counter[tuple[str, Basis]] = Counter()
                for s in store.stats(platform=Platform.GOOGLE_ADS):
                    got[(s.platform_conversion, s.basis)] += round(s.count)
                return got

        before = pulled("before")
        assert before[("Qualified lead (offline)", Basis.CLICK_DATE)] == 0
        status, _ = _post(f"{control}/clock", {"advance_days": 1 / 24})
        assert status == 200
        after = pulled("after")
        for basis in Basis:
            assert after[("Qualified lead (offline)", basis)] == 5
            assert after[("convsync micro value (upload)", basis)] == 5
            assert after[("Fresh (upload)", basis)] == 5
        with Store.open(load_config(tmp_path / "after.toml").store_url()) as store:
            lead_rows = [s for s in store.stats(platform=Platform.GOOGLE_ADS)
                         if s.platform_conversion == "Qualified lead (offline)"
                         and s.basis is Basis.CONVERSION_DATE]
            assert {s.conversion for s in lead_rows} == {"qualified_lead"}
            assert all(s.in_column for s in lead_rows)
            assert round(sum(s.value for s in lead_rows), 2) == 750.0

        status, summary = _get(f"{control}/datamanager?action_id=6108")
        assert status == 200
        assert summary["requests"]["IngestEvents"] == 3
        assert summary["rejections"] == {"CONVERSION_ACTION_TOO_RECENTLY_CREATED": 1}
        assert list(summary["transactions"]) == ["6108"]
        assert {t: v["conversions"] for t, v in summary["transactions"]["6108"].items()} == {
            f"lead-{i}": 1 for i in range(5)}
        status, config_answer = _post(f"{control}/datamanager/config",
                                      {"processing_delay_minutes": 5})
        assert status == 200 and config_answer["processing_delay_minutes"] == 5.0
        status, refused = _post(f"{control}/datamanager/config", {"delay": 5})
        assert status == 400 and "unknown setting" in refused["error"]
        status, _ = _send(urllib.request.Request(f"{control}/datamanager", method="DELETE"))
        status, summary = _get(f"{control}/datamanager?transactions=0")
        assert (summary["ingested_requests"], summary["conversions"]) == (0, 0)
        assert "transactions" not in summary
        assert summary["config"]["processing_delay_minutes"] == 30.0
        assert len(world.uploads) == 15  # what Google Ads recorded stays
