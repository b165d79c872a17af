"""The Google Ads sink (Data Manager API) through the real SDK against the sandbox, over REST
and gRPC: a batch accepted, processed and read back per destination; local validation that
names the field and never the value, and matches what the API rejects; the API's refusals as
SinkErrors with a fix; retries under injected faults that still land every transaction exactly
once and count every call; timeouts resent under the same keys; the daily quota left for a
later run; validate_only; the request's limits and shape."""

from __future__ import annotations

import datetime as dt
import json
import random
import socket
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from google.ads import datamanager_v1 as dm
from google.auth import exceptions as auth_exceptions
from google.auth.exceptions import DefaultCredentialsError, RefreshError

from convsync.hashing import hash_email
from convsync.model import Identifiers, Platform, Upload
from convsync.sandbox import server
from convsync.sandbox.server import RunningSandbox
from convsync.sandbox.world import MICRO_UPLOAD_ACTION_ID, Click, World, WorldSpec
from convsync.settings import GoogleAdsSection, Secrets
from convsync.sinks import SinkError
from convsync.sinks.google_ads.datamanager import (
    MAX_EVENTS,
    MAX_TRANSACTION_ID,
    DataManagerSink,
    DestinationStatus,
    _destination_status,
    connect,
)

SPEC = WorldSpec(seed=11, start=dt.date(2026, 9, 1), days=45, campaigns=8,
                 micro_upload_action=True)
"""Its clock stands at 2026-10-16 00:00 UTC."""
CUSTOMER, MANAGER = "1234567890", "9876543210"
LEADS, MICRO = "6108", str(MICRO_UPLOAD_ACTION_ID)  # both UPLOAD_CLICKS
WEBPAGE_ACTION = "6101"  # "Purchase": a tag-based action, not an import one
TRANSPORTS = ("rest", "grpc")
SHA = "5f6bc1b8d6cc6b12e3a1e5fa3f2b1ac6a5b3d35e7dd0a7f6b3b1d5a8f1e2c3d4"


@pytest.fixture(scope="module")
def running(tls_files: tuple[Path, Path]) -> Iterator[RunningSandbox]:
    with server.start(World(SPEC), tls_files[0].parent) as started:
        yield started


@pytest.fixture
def sandbox(running: RunningSandbox) -> RunningSandbox:
    """The sandbox with a fresh world (tests move its clock and fill its ledger) and nothing
    counted, owed or stored by the Data Manager."""
    running.sandbox.world = World(SPEC)
    running.sandbox.reset_requests()
    running.sandbox.clear_faults()
    assert running.datamanager is not None
    running.datamanager.reset()
    return running


@dataclass
class Made:
    """A sink and what it did: the calls it made (``on_request``) and the waits it took."""

    sink: DataManagerSink
    calls: Counter[str] = field(default_factory=Counter)
    sleeps: list[float] = field(default_factory=list)


def section(running: RunningSandbox, transport: str, **changes: Any) -> GoogleAdsSection:
    endpoint = running.endpoints["datamanager" if transport == "grpc" else "datamanager_rest"]
    base = GoogleAdsSection(customer_ids=[CUSTOMER], login_customer_id=MANAGER,
                            ca_file=running.cert, datamanager_endpoint=endpoint,
                            datamanager_transport=transport, consent="granted",
                            upload_actions={"qualified_lead": LEADS})
    return base.model_copy(update=changes)


def make(running: RunningSandbox, transport: str, *, token: str = "sandbox-token",
         attempts: int = 5, timeout: float = 30.0, **changes: Any) -> Made:
    """The sink as the push pipeline builds it: ``connect`` with the config's endpoint,
    transport and a ready access token."""
    config = section(running, transport, **changes)
    client = connect(config, Secrets(google_access_token=token))
    made = Made(None)  # type: ignore[arg-type]
    made.sink = DataManagerSink(client, config, sleep=made.sleeps.append,
                                on_request=lambda method: made.calls.update([method]),
                                attempts=attempts, timeout=timeout)
    return made


def clicks(world: World, day: dt.date, count: int, skip: int = 0) -> list[Click]:
    out = list(world.google_ads_clicks(day))[skip:skip + count]
    assert len(out) == count
    return out


def upload(click: Click | None, key: str, *, action: str = LEADS, value: float = 100.0,
           after_hours: float = 2.0, at: float | None = None, **identifiers: Any) -> Upload:
    """A conversion ``after_hours`` after its click, by gclid unless identifiers are given."""
    if click is not None and not identifiers:
        identifiers = {"gclid": click.gclid}
    moment = at if at is not None else (click.timestamp if click else 0) + after_hours * 3600
    return Upload(destination=Platform.GOOGLE_ADS, conversion_action=action,
                  account_id=CUSTOMER, dedupe_key=key, value=value, currency="USD",
                  time=dt.datetime.fromtimestamp(moment, dt.UTC),
                  identifiers=Identifiers(**identifiers))


def leads(world: World, count: int, prefix: str = "lead", *, day: int = 5,
          skip: int = 0) -> list[Upload]:
    return [upload(c, f"{prefix}-{i}", value=100.0 + i)
            for i, c in enumerate(clicks(world, dt.date(2026, 10, day), count, skip))]


def summary(running: RunningSandbox) -> dict[str, Any]:
    """What the sandbox counted, through its control endpoint (as another process sees it)."""
    return _control(running, "GET", "/datamanager")


def _control(running: RunningSandbox, method: str, path: str, body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(running.endpoints["control"] + path, data, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


def inject(running: RunningSandbox, kind: str, count: int = 1, **extra: Any) -> None:
    _control(running, "POST", "/faults",
             {"platform": "datamanager", "kind": kind, "count": count, **extra})


def advance(running: RunningSandbox, days: float) -> None:
    _control(running, "POST", "/clock", {"advance_days": days})


def wait_for_ingested(running: RunningSandbox, count: int) -> None:
    """A slow request lands after its client gave up on it: wait until it has."""
    deadline = time.monotonic() + 15
    while summary(running)["ingested_requests"] < count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert summary(running)["ingested_requests"] == count


# -- a valid batch ---------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_valid_batch_is_accepted_processed_and_reported_per_destination(
        sandbox: RunningSandbox, transport: str) -> None:
    world = sandbox.world
    made = make(sandbox, transport)
    lead_uploads = leads(world, 4)
    micro_uploads = [upload(c, f"micro-{i}", action=MICRO, value=2.5)
                     for i, c in enumerate(clicks(world, dt.date(2026, 10, 6), 3))]
    # enhanced conversions for leads: a Google clicker known only by their hashed email
    day = world.day(world.first_day + 30)
    google = {c.index for c in world.campaigns_on("google_ads")}
    clicker = next(i for i in range(day.size)
                   if not day.view_through[i] and int(day.campaign[i]) in google)
    by_email = upload(None, "lead-by-email", at=float(day.click_ts[clicker]) + 7200,
                      email_sha256_google=hash_email(world.email(day.day, clicker))[0])
    batch = [*lead_uploads[:2], *micro_uploads, *lead_uploads[2:], by_email]
    assert all(made.sink.problems(u, world.as_of) == "" for u in batch)

    request_id = made.sink.send(batch)
    assert request_id
    status = made.sink.status(request_id)
    assert (status.request_id, status.state) == (request_id, "processing")
    assert [(d.conversion_action, d.status, d.record_count) for d in status.destinations] == [
        (LEADS, "processing", 5), (MICRO, "processing", 3)]

    advance(sandbox, 31 / 1440)  # the sandbox reports a request 30 world minutes later
    status = made.sink.status(request_id)
    assert status.state == "done"
    assert status.destinations == (
        DestinationStatus(CUSTOMER, LEADS, "success", 5, {}),
        DestinationStatus(CUSTOMER, MICRO, "success", 3, {}))
    assert made.calls == Counter({"IngestEvents": 1, "RetrieveRequestStatus": 2})
    assert made.sleeps == []
    counted = summary(sandbox)
    assert counted["conversions"] == 8 and counted["events"] == 8
    assert counted["accepted_value"] == round(100 + 101 + 102 + 103 + 100 + 3 * 2.5, 2)
    (matched,) = [u for u in world.uploads.uploads(int(LEADS)) if u.key == "lead-by-email"]
    assert (matched.click.day, matched.click.index) == (day.day, clicker)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_status_counts_failed_events_by_processing_reason(sandbox: RunningSandbox,
                                                          transport: str) -> None:
    world = sandbox.world
    made = make(sandbox, transport)
    good = leads(world, 3)
    missing = upload(None, "missing", at=good[0].time.timestamp(),
                     gclid="Cj0KCQ" + "0" * 40)  # well formed, no such click
    recent = next(c for c in world.google_ads_clicks(dt.date(2026, 10, 15))
                  if world.as_of_ts - 5 * 3600 < c.timestamp < world.as_of_ts - 3600)
    request_id = made.sink.send([*good, missing, upload(recent, "recent", after_hours=0.5)])
    advance(sandbox, 1 / 24)
    (leads_status,) = made.sink.status(request_id).destinations
    assert leads_status.status == "partial_success" and leads_status.record_count == 5
    assert leads_status.errors == {"CLICK_NOT_FOUND": 1, "TOO_RECENT_CLICK": 1}

    failing = made.sink.send([upload(None, "x", at=good[0].time.timestamp(),
                                     gclid="Cj0KCQ" + "1" * 40)])
    advance(sandbox, 1 / 24)
    status = made.sink.status(failing)
    assert status.state == "done"
    assert status.destinations[0].status == "failed"
    assert status.destinations[0].errors == {"CLICK_NOT_FOUND": 1}


def test_an_unknown_processing_reason_is_kept_by_number() -> None:
    """The API's enums are open: a reason newer than the SDK is counted, not dropped."""
    raw = dm.RequestStatusPerDestination.pb()()
    raw.request_status = 9  # a status the SDK does not know
    raw.destination.operating_account.account_id = CUSTOMER
    raw.destination.product_destination_id = LEADS
    raw.events_ingestion_status.record_count = 4
    raw.error_info.error_counts.add(reason=999, record_count=2)
    raw.error_info.error_counts.add(reason=43, record_count=1)
    assert _destination_status(raw) == DestinationStatus(
        CUSTOMER, LEADS, "unknown", 4, {"UNKNOWN_999": 2, "CLICK_NOT_FOUND": 1})


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_restatement_under_the_same_transaction_id_counts_once(sandbox: RunningSandbox,
                                                                 transport: str) -> None:
    made = make(sandbox, transport)
    (first,) = leads(sandbox.world, 1, "order")
    made.sink.send([first])
    made.sink.send([first._replace(value=250.0)])
    counts = summary(sandbox)["transactions"][LEADS]["order-0"]
    assert (counts["events"], counts["conversions"], counts["adjustments"]) == (2, 1, 1)
    assert counts["value"] == 250.0


# -- local validation ------------------------------------------------------------------------------
GCLID = "Cj0KCQ0d9f53c7d10ba89f8ba47cb7e2e12ec03972635c"
BAD_HASH = "Jane.Doe@Example.com"  # an email in clear where its hash belongs


def _base() -> Upload:
    return Upload(destination=Platform.GOOGLE_ADS, conversion_action=LEADS, account_id=CUSTOMER,
                  dedupe_key="lead-1", value=120.0, currency="USD",
                  time=dt.datetime(2026, 10, 5, 15, tzinfo=dt.UTC),
                  identifiers=Identifiers(gclid=GCLID, email_sha256_google=SHA))


def _with(**changes: Any) -> Upload:
    return _base()._replace(**changes)


def _ids(**changes: Any) -> Upload:
    fields = {"gclid": GCLID, "email_sha256_google": SHA, **changes}
    return _with(identifiers=Identifiers.model_construct(**fields))


NOW = dt.datetime(2026, 10, 16, tzinfo=dt.UTC)
PROBLEMS: list[tuple[str, Upload, str, str, str]] = [
    # (case, upload, the field the reason names, a value it must not repeat, API's reason)
    ("no identifiers", _with(identifiers=Identifiers()), "identifiers", "",
     "NO_IDENTIFIERS_PROVIDED"),
    ("a Meta-only person",
     _with(identifiers=Identifiers(fbc="fb.1.1.abc", email_sha256_meta=SHA)), "identifiers", SHA,
     "NO_IDENTIFIERS_PROVIDED"),
    ("malformed gclid", _ids(gclid="not a gclid!"), "gclid", "not a gclid!", ""),
    ("malformed gbraid", _ids(gclid=None, gbraid="gb raid%%%"), "gbraid", "gb raid%%%", ""),
    ("email in clear", _ids(email_sha256_google=BAD_HASH), "email_sha256_google", BAD_HASH,
     "INVALID_HEX_ENCODING"),
    ("short hash", _ids(email_sha256_google=SHA[:40]), "email_sha256_google", SHA[:40],
     "INVALID_SHA256_FORMAT"),
    ("phone in clear", _ids(phone_sha256_google="+16505551212"), "phone_sha256_google",
     "+16505551212", "INVALID_HEX_ENCODING"),
    ("negative value", _with(value=-5.0), "value", "", ""),
    ("value not a number", _with(value=float("nan")), "value", "", ""),
    ("infinite value", _with(value=float("inf")), "value", "", ""),
    ("lower-case currency", _with(currency="usd"), "currency", "", "INVALID_CURRENCY_CODE"),
    ("two-letter currency", _with(currency="US"), "currency", "", "INVALID_CURRENCY_CODE"),
    ("no currency", _with(currency=""), "currency", "", ""),
    ("in the future", _with(time=NOW + dt.timedelta(hours=2)), "time", "", "EVENT_TIME_INVALID"),
    ("naive time", _with(time=dt.datetime(2026, 10, 5, 15)), "time", "", ""),
    ("no dedupe key", _with(dedupe_key=""), "dedupe_key", "", ""),
    ("dedupe key too long", _with(dedupe_key="k" * (MAX_TRANSACTION_ID + 1)), "dedupe_key",
     "k" * (MAX_TRANSACTION_ID + 1), ""),
    ("account id with dashes", _with(account_id="123-456-7890"), "account_id", "123-456-7890",
     "INVALID_FORMAT"),
    ("account id too short", _with(account_id="12345"), "account_id", "", ""),
    ("action by name", _with(conversion_action="Qualified lead"), "conversion_action",
     "Qualified lead", "INVALID_CONVERSION_ACTION_ID"),
    ("another platform", _with(destination=Platform.META), "destination", "", ""),
]


@pytest.mark.parametrize(("case", "bad", "field_name", "value", "api_reason"), PROBLEMS,
                         ids=[p[0] for p in PROBLEMS])
def test_problems_names_the_field_and_never_the_value(case: str, bad: Upload, field_name: str,
                                                      value: str, api_reason: str) -> None:
    sink = DataManagerSink(None, GoogleAdsSection(customer_ids=[CUSTOMER]))
    assert sink.problems(_base(), NOW) == ""
    reason = sink.problems(bad, NOW)
    assert reason.startswith(field_name + ":"), reason
    if value:
        assert value not in reason
    assert GCLID not in reason and SHA not in reason


def test_problems_needs_an_aware_now() -> None:
    sink = DataManagerSink(None, GoogleAdsSection(customer_ids=[CUSTOMER]))
    with pytest.raises(ValueError, match="timezone-aware"):
        sink.problems(_base(), dt.datetime(2026, 10, 16))


API_REJECTS = [p for p in PROBLEMS if p[4]]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(("case", "bad", "field_name", "value", "api_reason"), API_REJECTS,
                         ids=[p[0] for p in API_REJECTS])
def test_what_problems_refuses_the_api_rejects_whole(
        sandbox: RunningSandbox, transport: str, case: str, bad: Upload, field_name: str,
        value: str, api_reason: str) -> None:
    """Each local problem the API also checks: the whole request is refused (the good events
    with it too), with the API's reason and a fix, and no identifier in the words."""
    made = make(sandbox, transport)
    good = leads(sandbox.world, 2)
    with pytest.raises(SinkError) as caught:
        made.sink.send([*good, bad], validate_only=True)
    error = caught.value
    assert error.reason == api_reason
    assert error.fix and not error.retryable and not error.maybe_sent
    text = str(error)
    for secret in [value, *(u.identifiers.gclid for u in good), SHA, GCLID]:
        assert not secret or secret not in text
    assert made.calls == Counter({"IngestEvents": 1})  # never retried
    counted = summary(sandbox)
    assert counted["rejections"] == {api_reason: 1}
    assert counted["validate_only_requests"] == 0 and len(sandbox.world.uploads) == 0


# -- the API's refusals ----------------------------------------------------------------------------
REFUSALS: list[tuple[str, dict[str, Any], str, str, bool]] = [
    # (case, what differs, reason, words the fix must hold, retryable)
    ("a tag-based action", {"action": WEBPAGE_ACTION}, "INVALID_CONVERSION_ACTION_TYPE",
     "UPLOAD_CLICKS", False),
    ("no such action", {"action": "999"}, "INVALID_CONVERSION_ACTION_ID", "Goals > Conversions",
     False),
    ("an action created an hour ago", {"new_action": True},
     "CONVERSION_ACTION_TOO_RECENTLY_CREATED", "6 hours", True),
    ("a login that manages nothing here", {"login_customer_id": "2222222222"},
     "PERMISSION_DENIED", "login_customer_id", False),
]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(("case", "setup", "reason", "fix", "retryable"), REFUSALS,
                         ids=[r[0] for r in REFUSALS])
def test_a_request_the_api_refuses_raises_its_reason_and_a_fix(
        sandbox: RunningSandbox, transport: str, case: str, setup: dict[str, Any], reason: str,
        fix: str, retryable: bool) -> None:
    world = sandbox.world
    action = setup.get("action", LEADS)
    if setup.get("new_action"):
        action = str(world.add_google_ads_action(
            "Created an hour ago", created=world.as_of - dt.timedelta(hours=1)).id)
    changes = {k: v for k, v in setup.items() if k == "login_customer_id"}
    made = make(sandbox, transport, **changes)
    batch = [u._replace(conversion_action=action) for u in leads(world, 2)]
    with pytest.raises(SinkError) as caught:
        made.sink.send(batch)
    error = caught.value
    assert error.reason == reason
    assert fix in error.fix
    assert (error.retryable, error.maybe_sent) == (retryable, False)
    assert all(str(u.identifiers.gclid) not in str(error) for u in batch)
    assert made.calls == Counter({"IngestEvents": 1}) and made.sleeps == []
    assert summary(sandbox)["ingested_requests"] == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_oauth_failures_say_what_to_renew(sandbox: RunningSandbox, transport: str) -> None:
    """A grant without the Data Manager scope, and an expired token (over REST google-auth
    tries to refresh a token-only credential and cannot: the same SinkError)."""
    batch = leads(sandbox.world, 1)
    scope = make(sandbox, transport, token="no-datamanager-scope")
    with pytest.raises(SinkError) as caught:
        scope.sink.send(batch)
    assert caught.value.reason == "ACCESS_TOKEN_SCOPE_INSUFFICIENT"
    assert "https://www.googleapis.com/auth/datamanager" in caught.value.fix
    assert "consent again" in caught.value.fix and not caught.value.retryable
    expired = make(sandbox, transport, token="expired")
    with pytest.raises(SinkError) as caught:
        expired.sink.send(batch)
    assert caught.value.reason == "ACCESS_TOKEN_EXPIRED"
    assert "CONVSYNC_GOOGLE_REFRESH_TOKEN" in caught.value.fix and not caught.value.retryable
    assert "expired" not in caught.value.message.split("(")[-1]  # the token is not repeated
    assert scope.calls == expired.calls == Counter({"IngestEvents": 1})


# -- faults, retries and exactly once --------------------------------------------------------------
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_under_faults_every_transaction_arrives_exactly_once(sandbox: RunningSandbox,
                                                             transport: str) -> None:
    """About one call in ten answered by the per-minute quota or an outage (control faults):
    each batch is retried until taken, each transaction id lands once, and every call made,
    retries included, is reported to ``on_request``."""
    made = make(sandbox, transport)
    uploads = leads(sandbox.world, 200)
    rng = random.Random(5)
    injected: Counter[str] = Counter()
    request_ids = []
    for start in range(0, len(uploads), 5):
        faults = 0
        while faults < 3 and rng.random() < 0.1:
            faults += 1
        for _ in range(faults):
            kind = rng.choice(["rate_limit", "server_error"])
            inject(sandbox, kind)
            injected[kind] += 1
        request_ids.append(made.sink.send(uploads[start:start + 5]))
    assert injected["rate_limit"] >= 1 and injected["server_error"] >= 1
    retries = sum(injected.values())
    assert made.calls == Counter({"IngestEvents": 40 + retries})
    assert len(made.sleeps) == retries
    counted = summary(sandbox)
    assert counted["rejections"] == {"RATE_LIMIT_EXCEEDED": injected["rate_limit"],
                                     "UNAVAILABLE": injected["server_error"]}
    assert counted["ingested_requests"] == 40 and len(set(request_ids)) == 40
    transactions = counted["transactions"][LEADS]
    assert set(transactions) == {u.dedupe_key for u in uploads}
    assert all((t["events"], t["conversions"]) == (1, 1) for t in transactions.values())

    advance(sandbox, 1 / 24)
    inject(sandbox, "server_error")  # reads are retried the same way
    statuses = [made.sink.status(r) for r in request_ids]
    assert all(s.state == "done" and s.destinations[0].status == "success"
               and s.destinations[0].record_count == 5 for s in statuses)
    assert made.calls["RetrieveRequestStatus"] == 41


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_timeout_is_resent_under_the_same_keys(sandbox: RunningSandbox,
                                                 transport: str) -> None:
    """A call answered too late may still have been taken: the retry sends the same
    transaction ids, so the late copy changes nothing; when every attempt times out the error
    says the request may have arrived."""
    made = make(sandbox, transport, timeout=0.5)
    batch = leads(sandbox.world, 3)
    inject(sandbox, "slow", delay=1.5)
    assert made.sink.send(batch)
    wait_for_ingested(sandbox, 2)
    assert made.calls == Counter({"IngestEvents": 2}) and len(made.sleeps) == 1
    transactions = summary(sandbox)["transactions"][LEADS]
    assert all((t["events"], t["conversions"], t["duplicates"]) == (2, 1, 1)
               for t in transactions.values())

    give_up = make(sandbox, transport, timeout=0.5, attempts=2)
    again = leads(sandbox.world, 3, "late", skip=3)
    inject(sandbox, "slow", count=2, delay=1.5)
    with pytest.raises(SinkError) as caught:
        give_up.sink.send(again)
    error = caught.value
    assert (error.reason, error.retryable, error.maybe_sent) == ("DEADLINE_EXCEEDED", True, True)
    assert give_up.calls == Counter({"IngestEvents": 2})
    wait_for_ingested(sandbox, 4)  # both copies did arrive
    give_up.sink.send(again)  # what the caller does: resend under the same keys
    late = summary(sandbox)["transactions"][LEADS]
    assert all(late[u.dedupe_key]["conversions"] == 1 for u in again)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_the_daily_quota_is_not_retried_in_the_run(sandbox: RunningSandbox,
                                                   transport: str) -> None:
    made = make(sandbox, transport)
    batch = leads(sandbox.world, 2)
    inject(sandbox, "exhausted")  # Google's per-day answer
    with pytest.raises(SinkError) as caught:
        made.sink.send(batch)
    error = caught.value
    assert (error.reason, error.retryable, error.maybe_sent) == (
        "RATE_LIMIT_EXCEEDED", True, False)
    assert "per day" in error.message and "midnight Pacific" in error.fix
    assert made.calls == Counter({"IngestEvents": 1}) and made.sleeps == []

    assert sandbox.datamanager is not None
    sandbox.datamanager.configure(writes_per_day=1)  # the real quota, not a fault
    made.sink.send(batch)
    with pytest.raises(SinkError) as daily:
        made.sink.send(batch)
    assert daily.value.retryable and "midnight Pacific" in daily.value.fix
    assert made.calls == Counter({"IngestEvents": 3}) and made.sleeps == []


def test_the_minute_quota_is_retried_then_left_for_a_later_run(sandbox: RunningSandbox) -> None:
    made = make(sandbox, "rest", attempts=3)
    assert sandbox.datamanager is not None
    sandbox.datamanager.configure(writes_per_minute=1)
    batch = leads(sandbox.world, 1)
    made.sink.send(batch)
    with pytest.raises(SinkError) as caught:
        made.sink.send(batch)
    error = caught.value
    assert (error.reason, error.retryable, error.maybe_sent) == (
        "RATE_LIMIT_EXCEEDED", True, False)
    assert "per minute" in error.message and "300" in error.fix
    assert made.calls == Counter({"IngestEvents": 4}) and len(made.sleeps) == 2


# -- validate_only, statuses over time, limits -----------------------------------------------------
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_validate_only_checks_and_keeps_nothing(sandbox: RunningSandbox, transport: str) -> None:
    made = make(sandbox, transport)
    assert made.sink.send(leads(sandbox.world, 3), validate_only=True) == ""
    counted = summary(sandbox)
    assert (counted["validate_only_requests"], counted["ingested_requests"]) == (1, 0)
    assert counted["conversions"] == 0 and len(sandbox.world.uploads) == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_status_of_old_and_unknown_requests(sandbox: RunningSandbox, transport: str) -> None:
    made = make(sandbox, transport)
    request_id = made.sink.send(leads(sandbox.world, 1))
    unknown = made.sink.status("7b2d4f0e-1c7a-4a51-9f3e-2f0c9d8e6a11")
    assert (unknown.state, unknown.destinations) == ("not_found", ())
    advance(sandbox, 51)
    assert made.sink.status(request_id).state == "too_old"
    advance(sandbox, 10)
    assert made.sink.status(request_id).state == "not_found"
    with pytest.raises(SinkError) as caught:
        made.sink.status("not-a-request-id")
    assert caught.value.reason == "INVALID_REQUEST_ID"
    assert made.calls == Counter({"IngestEvents": 1, "RetrieveRequestStatus": 4})


def test_more_than_a_request_holds_is_refused_before_any_call(sandbox: RunningSandbox) -> None:
    made = make(sandbox, "rest")
    pool = leads(sandbox.world, 100)
    too_many = [pool[i % 100]._replace(dedupe_key=f"t{i}")
                for i in range(MAX_EVENTS + 1)]
    with pytest.raises(ValueError, match="2,000"):
        made.sink.send(too_many)
    assert made.sink.send(too_many[:MAX_EVENTS])
    actions = [u._replace(conversion_action=str(7000 + i))
               for i, u in enumerate(pool[:11])]
    with pytest.raises(ValueError, match="at most 10"):
        made.sink.send(actions)
    with pytest.raises(ValueError, match="no uploads"):
        made.sink.send([])
    denied = make(sandbox, "rest", consent="denied")
    with pytest.raises(ValueError, match="consent"):
        denied.sink.send(pool[:1])
    assert made.calls == Counter({"IngestEvents": 1}) and not denied.calls


def test_the_request_as_built() -> None:
    """Destinations per (account, action) with references, the manager as login account, one
    click id per event, WEB with a click id and OTHER without, hex hashes, consent only when
    the config grants it."""
    sink = DataManagerSink(None, GoogleAdsSection(customer_ids=[CUSTOMER],
                                                  login_customer_id=MANAGER,
                                                  consent="granted"))
    by_click = _with(identifiers=Identifiers(gclid=GCLID, gbraid="GBRAIDxxxxxxxxxx",
                                             email_sha256_google=SHA))
    by_email = _base()._replace(**{"dedupe_key": "lead-2", "conversion_action": MICRO,
                                   "identifiers": Identifiers(phone_sha256_google=SHA),
                                   "time": dt.datetime(2026, 10, 5, 11, 30, 0, 250_000,
                                                       tzinfo=dt.timezone(-dt.timedelta(hours=4)))})
    request = dm.IngestEventsRequest.pb(sink.build_request([by_click, by_email, by_click]))
    assert [(d.reference, d.operating_account.account_id, d.login_account.account_id,
             d.product_destination_id, d.operating_account.account_type)
            for d in request.destinations] == [
        ("d0", CUSTOMER, MANAGER, LEADS, 1), ("d1", CUSTOMER, MANAGER, MICRO, 1)]
    first, second, third = request.events
    assert list(first.destination_references) == ["d0"] == list(third.destination_references)
    assert list(second.destination_references) == ["d1"]
    assert first.event_source == dm.EventSource.WEB and second.event_source == dm.EventSource.OTHER
    assert (first.ad_identifiers.gclid, first.ad_identifiers.gbraid) == (GCLID, "")
    assert [i.email_address for i in first.user_data.user_identifiers] == [SHA]
    assert [i.phone_number for i in second.user_data.user_identifiers] == [SHA]
    assert not second.HasField("ad_identifiers")
    assert (first.transaction_id, first.conversion_value, first.currency) == (
        "lead-1", 120.0, "USD")
    assert (second.event_timestamp.seconds, second.event_timestamp.nanos) == (
        int(dt.datetime(2026, 10, 5, 15, 30, tzinfo=dt.UTC).timestamp()), 250_000_000)
    assert request.encoding == dm.Encoding.HEX and not request.validate_only
    assert request.consent.ad_user_data == dm.ConsentStatus.CONSENT_GRANTED

    unspecified = DataManagerSink(None, GoogleAdsSection(customer_ids=[CUSTOMER]))
    plain = dm.IngestEventsRequest.pb(unspecified.build_request([by_click], validate_only=True))
    assert not plain.HasField("consent") and plain.validate_only
    assert plain.destinations[0].login_account.account_id == CUSTOMER


# -- errors the sandbox does not play --------------------------------------------------------------
class _Refusing:
    """A client whose every call raises ``error`` (what google-auth and requests raise before
    or instead of an API answer)."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def ingest_events(self, **kwargs: Any) -> Any:
        raise self.error

    def retrieve_request_status(self, **kwargs: Any) -> Any:
        raise self.error


@pytest.mark.parametrize(("error", "reason", "fix", "retryable", "calls"), [
    (RefreshError("invalid_grant: Token has been expired or revoked."), "ACCESS_TOKEN_EXPIRED",
     "CONVSYNC_GOOGLE_REFRESH_TOKEN", False, 1),
    (RefreshError("invalid_scope: Bad Request"), "ACCESS_TOKEN_SCOPE_INSUFFICIENT",
     "consent again", False, 1),
    (DefaultCredentialsError("File secret.json is not a valid json file."),
     "INVALID_CREDENTIALS", "CONVSYNC_GOOGLE_SERVICE_ACCOUNT_FILE", False, 1),
    (auth_exceptions.TransportError("token endpoint unreachable"), "UNAVAILABLE",
     "push again later", True, 3),
    (requests.exceptions.InvalidURL("bad"), "INVALID_ENDPOINT", "datamanager_endpoint", False, 1),
])
def test_credential_and_connection_errors_say_what_to_do(
        error: Exception, reason: str, fix: str, retryable: bool, calls: int) -> None:
    made = Made(None)  # type: ignore[arg-type]
    made.sink = DataManagerSink(_Refusing(error), GoogleAdsSection(customer_ids=[CUSTOMER]),
                                sleep=made.sleeps.append, attempts=3,
                                on_request=lambda method: made.calls.update([method]))
    with pytest.raises(SinkError) as caught:
        made.sink.send([_base()])
    assert (caught.value.reason, caught.value.retryable) == (reason, retryable)
    assert fix in caught.value.fix and not caught.value.maybe_sent
    assert "secret.json" not in str(caught.value) and "invalid_grant" not in str(caught.value)
    assert made.calls == Counter({"IngestEvents": calls})


def test_an_endpoint_that_refuses_connections_is_retried_and_nothing_was_sent(
        sandbox: RunningSandbox) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    made = make(sandbox, "rest", attempts=2, datamanager_endpoint=f"http://127.0.0.1:{port}")
    with pytest.raises(SinkError) as caught:
        made.sink.send(leads(sandbox.world, 1))
    error = caught.value
    assert (error.reason, error.retryable, error.maybe_sent) == ("UNAVAILABLE", True, False)
    assert made.calls == Counter({"IngestEvents": 2}) and len(made.sleeps) == 1
