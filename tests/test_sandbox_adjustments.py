"""The Google Ads API's conversion adjustments (``ConversionAdjustmentUploadService``) in the
sandbox, driven by the real ``google-ads`` client against conversions uploaded with the real
``google-ads-datamanager`` client: retractions and restatements by order id (the Data Manager
transaction id), per-adjustment errors in the partial-failure shape the SDK parses, whole-request
refusals, and what the Google Ads stats and the Data Manager counters show afterwards."""

from __future__ import annotations

import datetime as dt
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.ads import datamanager_v1 as dm
from google.ads.datamanager_v1.services.ingestion_service.transports import (
    IngestionServiceGrpcTransport,
)
from google.ads.googleads.client import GoogleAdsClient
from google.ads.googleads.errors import GoogleAdsException
from google.ads.googleads.v26.errors.types.errors import GoogleAdsFailure
from google.api_core import exceptions as api_exceptions
from google.auth.credentials import AnonymousCredentials
from google.oauth2.credentials import Credentials
from google.protobuf.timestamp_pb2 import Timestamp

from convsync.sandbox import server
from convsync.sandbox.server import RunningSandbox
from convsync.sandbox.world import MICRO_UPLOAD_ACTION_ID, Click, World, WorldSpec
from convsync.sources.google_ads import error_code_name

SPEC = WorldSpec(seed=11, start=dt.date(2026, 9, 1), days=45, campaigns=8,
                 micro_upload_action=True)
"""Its clock stands at 2026-10-16 00:00 UTC (the end of its last day)."""
CUSTOMER, MANAGER = "1234567890", "9876543210"
MICRO = MICRO_UPLOAD_ACTION_ID  # "convsync micro value (upload)": UPLOAD_CLICKS, MANY_PER_CLICK
LEADS = 6108  # "Qualified lead (offline)": UPLOAD_CLICKS, ONE_PER_CLICK
GA4_PURCHASE = 6102  # GOOGLE_ANALYTICS_4_PURCHASE: no adjustments
VALUES = (10.0, 20.0, 30.0)
LATER = "2026-10-15 12:00:00-04:00"
"""An adjustment time after the uploaded conversions (early October) and before the clock."""


# -- the sandbox -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def started(tls_files: tuple[Path, Path]) -> Iterator[RunningSandbox]:
    with server.start(World(SPEC), tls_files[0].parent) as running:
        yield running


@pytest.fixture
def running(started: RunningSandbox) -> RunningSandbox:
    """The whole sandbox with a fresh world (tests fill its ledger and move its clock) and
    nothing counted or owed."""
    started.sandbox.world = World(SPEC)
    started.sandbox.reset_requests()
    started.sandbox.clear_faults()
    assert started.datamanager is not None
    started.datamanager.reset()
    return started


def ads_client(running: RunningSandbox, **options: Any) -> GoogleAdsClient:
    """The SDK's client as convsync builds it; only the endpoint is the sandbox's."""
    options.setdefault("credentials", Credentials(token="sandbox"))
    return GoogleAdsClient(endpoint=running.endpoints["google_ads"], use_proto_plus=False,
                           **options)


def dm_client(running: RunningSandbox) -> dm.IngestionServiceClient:
    channel = grpc.secure_channel(running.endpoints["datamanager"],
                                  grpc.ssl_channel_credentials(running.cert.read_bytes()))
    return dm.IngestionServiceClient(transport=IngestionServiceGrpcTransport(channel=channel))


# -- uploads through the Data Manager API -----------------------------------------------------
def clicks(world: World, day: dt.date, count: int) -> list[Click]:
    out = list(world.google_ads_clicks(day))[:count]
    assert len(out) == count
    return out


def stamp(seconds: float) -> Timestamp:
    out = Timestamp()
    out.FromNanoseconds(int(seconds * 1e9))
    return out


def conversion(click: Click, txid: str, value: float, after_hours: float = 2.0) -> dm.Event:
    return dm.Event(transaction_id=txid, event_source=dm.EventSource.WEB, currency="USD",
                    conversion_value=value,
                    event_timestamp=stamp(click.timestamp + after_hours * 3600),
                    ad_identifiers=dm.AdIdentifiers(gclid=click.gclid))


def ingest(running: RunningSandbox, events: list[dm.Event], action: int = MICRO) -> None:
    google_ads = dm.ProductAccount.AccountType.GOOGLE_ADS
    destination = dm.Destination(
        product_destination_id=str(action),
        operating_account=dm.ProductAccount(account_type=google_ads, account_id=CUSTOMER),
        login_account=dm.ProductAccount(account_type=google_ads, account_id=MANAGER))
    response = dm_client(running).ingest_events(request=dm.IngestEventsRequest(
        destinations=[destination], events=events, encoding=dm.Encoding.HEX), retry=None)
    assert response.request_id


def upload_three(running: RunningSandbox) -> list[Click]:
    """tx-0, tx-1, tx-2 (10, 20 and 30 USD) to the micro action, processed."""
    sent = clicks(running.world, dt.date(2026, 10, 5), 3)
    ingest(running, [conversion(c, f"tx-{i}", v) for i, (c, v) in enumerate(zip(sent, VALUES,
                                                                                 strict=True))])
    running.world.advance(1 / 24)
    return sent


# -- adjustments through the Google Ads API ---------------------------------------------------
def adjust(client: GoogleAdsClient, *adjustments: dict[str, Any], customer: str = CUSTOMER,
           partial_failure: bool = True, validate_only: bool = False) -> Any:
    """One UploadConversionAdjustments call, built as the SDK's own example builds it: each
    adjustment a dict of ``kind`` (RETRACTION / RESTATEMENT), ``order_id`` or ``gclid`` and
    ``conversion_date_time``, ``action``, ``when``, ``value``."""
    service = client.get_service("ConversionAdjustmentUploadService")
    actions = client.get_service("ConversionActionService")  # the one with conversion_action_path
    request = client.get_type("UploadConversionAdjustmentsRequest")
    request.customer_id = customer
    request.partial_failure = partial_failure
    request.validate_only = validate_only
    kinds = client.enums.ConversionAdjustmentTypeEnum
    for spec in adjustments:
        adjustment = request.conversion_adjustments.add()
        action = spec.get("action", MICRO)
        adjustment.conversion_action = (action if isinstance(action, str) else
                                        actions.conversion_action_path(CUSTOMER, action))
        adjustment.adjustment_type = getattr(kinds, spec.get("kind", "RETRACTION"))
        adjustment.adjustment_date_time = spec.get("when", LATER)
        if "order_id" in spec:
            adjustment.order_id = spec["order_id"]
        if "gclid" in spec:
            adjustment.gclid_date_time_pair.gclid = spec["gclid"]
            adjustment.gclid_date_time_pair.conversion_date_time = spec["conversion_date_time"]
        if "value" in spec:
            adjustment.restatement_value.adjusted_value = spec["value"]
    return service.upload_conversion_adjustments(request=request)


def retraction(order_id: str, **fields: Any) -> dict[str, Any]:
    return {"kind": "RETRACTION", "order_id": order_id, **fields}


def restatement(order_id: str, value: float, **fields: Any) -> dict[str, Any]:
    return {"kind": "RESTATEMENT", "order_id": order_id, "value": value, **fields}


def refused(response: Any) -> dict[int, tuple[str, str]]:
    """Index -> (error code field, enum name) of each adjustment the partial failure names,
    read as a caller of the SDK reads it."""
    out: dict[int, tuple[str, str]] = {}
    for detail in response.partial_failure_error.details:
        unpacked = GoogleAdsFailure.pb()()
        assert detail.Unpack(unpacked)  # the type URL names the SDK's GoogleAdsFailure
        failure = GoogleAdsFailure.deserialize(detail.value)
        for error in failure.errors:
            first = error.location.field_path_elements[0]
            assert first.field_name == "conversion_adjustments"
            code = type(error.error_code).pb(error.error_code)
            which = code.WhichOneof("error_code")
            number = getattr(code, which)
            name = code.DESCRIPTOR.fields_by_name[which].enum_type.values_by_number[number].name
            out[first.index] = (which, name)
    return out


def upload_error(name: str) -> tuple[str, str]:
    return ("conversion_adjustment_upload_error", name)


def reasons(error: GoogleAdsException) -> list[tuple[str, str]]:
    """(error code field, enum value name) of each error in the failure."""
    raw = type(error.failure).pb(error.failure)
    return [(code.split(".")[0], code.split(".")[1]) for code in map(error_code_name, raw.errors)]


def action_stats(client: GoogleAdsClient, action: int = MICRO) -> tuple[float, float]:
    """(all conversions, their value) the GoogleAdsService reports for one action, all dates."""
    service = client.get_service("GoogleAdsService")
    query = ("SELECT conversion_action.id, metrics.all_conversions, "
             f"metrics.all_conversions_value FROM conversion_action "
             f"WHERE conversion_action.id = {action}")
    rows = [row for batch in service.search_stream(customer_id=CUSTOMER, query=query)
            for row in batch.results]
    if not rows:
        return 0.0, 0.0
    (row,) = rows
    return row.metrics.all_conversions, round(row.metrics.all_conversions_value, 2)


def control(running: RunningSandbox, path: str) -> Any:
    with urllib.request.urlopen(f"{running.endpoints['control']}{path}", timeout=10) as answer:
        return json.loads(answer.read())


def counts(running: RunningSandbox, action: int = MICRO) -> dict[str, tuple[int, int, float]]:
    """Per transaction id: (retractions, adjustments, value) as the Data Manager counted."""
    assert running.datamanager is not None
    return {txid: (c.retractions, c.adjustments, c.value)
            for (_, txid), c in running.datamanager.transactions(action).items()}


# -- retractions ------------------------------------------------------------------------------
def test_retraction_by_order_id_takes_the_conversion_out_of_the_stats(
        running: RunningSandbox) -> None:
    upload_three(running)
    client = ads_client(running, login_customer_id=MANAGER)
    assert action_stats(client) == (3.0, 60.0)

    response = adjust(client, retraction("tx-1"))
    assert response.partial_failure_error.code == 0 and not refused(response)
    (result,) = response.results
    assert result.order_id == "tx-1" and result.adjustment_date_time == LATER
    assert result.conversion_action == f"customers/{CUSTOMER}/conversionActions/{MICRO}"
    assert result.adjustment_type == client.enums.ConversionAdjustmentTypeEnum.RETRACTION
    assert response.job_id >= 2**31
    assert counts(running) == {"tx-0": (0, 0, 10.0), "tx-1": (1, 0, 20.0),
                               "tx-2": (0, 0, 30.0)}
    assert action_stats(client) == (2.0, 40.0)  # count and value gone, at once
    upload = running.world.uploads.get(MICRO, "tx-1")
    assert upload is not None and upload.value_at(running.world.as_of_ts) is None
    assert upload.value_at(running.world.as_of_ts - 60) == (20.0, "USD")  # before it: there
    # a later resend of the same transaction id through the Data Manager does not revive it
    ingest(running, [conversion(clicks(running.world, dt.date(2026, 10, 5), 2)[1], "tx-1",
                                25.0)])
    running.world.advance(1 / 24)
    assert action_stats(client) == (2.0, 40.0)

    summary = control(running, f"/datamanager?action_id={MICRO}")
    assert summary["retractions"] == 1 and summary["accepted_value"] == 40.0
    assert summary["transactions"][str(MICRO)]["tx-1"]["retractions"] == 1
    assert "retractions" not in summary["transactions"][str(MICRO)]["tx-0"]
    assert control(running, "/requests?platform=google_ads")[
        "google_ads.UploadConversionAdjustments"] == 1


def test_a_second_retraction_fails_alone_while_the_rest_of_the_request_succeeds(
        running: RunningSandbox) -> None:
    upload_three(running)
    client = ads_client(running)
    assert not refused(adjust(client, retraction("tx-0")))

    response = adjust(client, retraction("tx-0", when="2026-10-15 13:00:00-04:00"),
                      retraction("tx-2"))
    assert refused(response) == {0: upload_error("CONVERSION_ALREADY_RETRACTED")}
    assert response.partial_failure_error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "at conversion_adjustments[0]" in response.partial_failure_error.message
    empty, done = response.results
    assert empty.ByteSize() == 0  # a failed adjustment's result is empty, in its place
    assert done.order_id == "tx-2"
    assert counts(running) == {"tx-0": (1, 0, 10.0), "tx-1": (0, 0, 20.0),
                               "tx-2": (1, 0, 30.0)}
    assert action_stats(client) == (1.0, 20.0)

    # twice in one request: the second finds it retracted (the same time twice is a duplicate)
    response = adjust(client, retraction("tx-1"), retraction("tx-1"),
                      retraction("tx-1", when="2026-10-15 14:00:00-04:00"))
    assert refused(response) == {1: upload_error("DUPLICATE_ADJUSTMENT_IN_REQUEST"),
                                 2: upload_error("CONVERSION_ALREADY_RETRACTED")}
    assert counts(running)["tx-1"] == (1, 0, 20.0)
    assert action_stats(client) == (0.0, 0.0)


def test_unknown_conversions_are_not_found(running: RunningSandbox) -> None:
    upload_three(running)
    client = ads_client(running)
    response = adjust(client, retraction("no-such-order"),
                      retraction("tx-0", action=LEADS),  # uploaded to the micro action
                      retraction("tx-0"))
    assert refused(response) == {0: upload_error("CONVERSION_NOT_FOUND"),
                                 1: upload_error("CONVERSION_NOT_FOUND")}
    assert [r.order_id for r in response.results] == ["", "", "tx-0"]
    assert counts(running) == {"tx-0": (1, 0, 10.0), "tx-1": (0, 0, 20.0),
                               "tx-2": (0, 0, 30.0)}
    assert counts(running, LEADS) == {}
    assert action_stats(client) == (2.0, 50.0)


def test_partial_failure_false_is_refused_whole(running: RunningSandbox) -> None:
    upload_three(running)
    client = ads_client(running)
    with pytest.raises(GoogleAdsException) as caught:
        adjust(client, retraction("tx-0"), partial_failure=False)
    assert reasons(caught.value) == [("partial_failure_error", "PARTIAL_FAILURE_MODE_REQUIRED")]
    assert caught.value.error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert counts(running)["tx-0"] == (0, 0, 10.0)
    assert action_stats(client) == (3.0, 60.0)
    assert running.sandbox.requests("google_ads")["google_ads.UploadConversionAdjustments"] == 1


# -- restatements -----------------------------------------------------------------------------
def test_restatement_changes_the_value_and_keeps_the_count(running: RunningSandbox) -> None:
    upload_three(running)
    client = ads_client(running)
    response = adjust(client, restatement("tx-1", 55.5))
    assert not refused(response)
    assert response.results[0].adjustment_type == (
        client.enums.ConversionAdjustmentTypeEnum.RESTATEMENT)
    assert action_stats(client) == (3.0, 95.5)
    assert counts(running)["tx-1"] == (0, 1, 55.5)

    response = adjust(client,
                      restatement("tx-1", 70.0, when="2026-10-15 11:00:00-04:00"),  # earlier
                      restatement("tx-1", 70.0),  # the same time as the first
                      {"kind": "RESTATEMENT", "order_id": "tx-2"},  # no value
                      restatement("tx-0", 12.5, when="2026-10-15 12:30:00-04:00"))
    assert refused(response) == {
        0: upload_error("MORE_RECENT_RESTATEMENT_FOUND"),
        1: upload_error("RESTATEMENT_ALREADY_EXISTS"),
        2: ("field_error", "REQUIRED")}
    assert action_stats(client) == (3.0, 98.0)
    assert counts(running) == {"tx-0": (0, 1, 12.5), "tx-1": (0, 1, 55.5),
                               "tx-2": (0, 0, 30.0)}

    assert not refused(adjust(client, retraction("tx-1", when="2026-10-15 13:00:00-04:00")))
    assert action_stats(client) == (2.0, 42.5)
    response = adjust(client, restatement("tx-1", 80.0, when="2026-10-15 14:00:00-04:00"))
    assert refused(response) == {0: upload_error("CONVERSION_ALREADY_RETRACTED")}
    assert action_stats(client) == (2.0, 42.5)


# -- what else is checked ---------------------------------------------------------------------
def test_each_adjustment_is_checked_on_its_own(running: RunningSandbox) -> None:
    world = running.world
    upload_three(running)
    recent = next(c for c in world.google_ads_clicks(dt.date(2026, 10, 15))
                  if world.as_of_ts - 20 * 3600 < c.timestamp < world.as_of_ts - 10 * 3600)
    ingest(running, [conversion(recent, "fresh", 5.0, after_hours=1.0)])
    world.advance(1 / 24)  # processed, but the conversion is under a day old
    ingest(running, [conversion(clicks(world, dt.date(2026, 10, 6), 1)[0], "pending", 5.0)])
    client = ads_client(running)
    response = adjust(
        client,
        retraction("fresh"),  # 0
        retraction("pending"),  # 1: its upload is still processing
        retraction("tx-0", when="2026-10-01 12:00:00-04:00"),  # 2: before the conversion
        retraction("tx-0", when="2026-10-15 12:00"),  # 3: no offset
        retraction("tx-0", when="2026-10-20 12:00:00-04:00"),  # 4: in the future
        retraction("tx-0", action=GA4_PURCHASE),  # 5
        retraction("tx-0", action=999_999),  # 6
        {"kind": "RETRACTION", "order_id": "tx-0", "value": 1.0},  # 7: a value on a retraction
        {"kind": "RETRACTION", "order_id": "tx-0", "gclid": "abc",  # 8: both identifiers
         "conversion_date_time": LATER},
        {"kind": "ENHANCEMENT", "order_id": "tx-0"},  # 9
        retraction("tx-2"),  # 10: fine
    )
    assert refused(response) == {
        0: upload_error("TOO_RECENT_CONVERSION"),
        1: upload_error("TOO_RECENT_CONVERSION"),
        2: upload_error("ADJUSTMENT_PRECEDES_CONVERSION"),
        3: ("date_error", "INVALID_STRING_DATE_TIME_SECONDS_WITH_OFFSET"),
        4: ("date_error", "LATER_THAN_MAXIMUM_DATE"),
        5: upload_error("INVALID_CONVERSION_ACTION_TYPE"),
        6: upload_error("NO_CONVERSION_ACTION_FOUND"),
        7: ("field_error", "VALUE_MUST_BE_UNSET"),
        8: upload_error("GCLID_DATE_TIME_PAIR_AND_ORDER_ID_BOTH_SET"),
        9: upload_error("CONVERSION_ACTION_NOT_ELIGIBLE_FOR_ENHANCEMENT"),
    }
    assert response.partial_failure_error.message.startswith("Multiple errors in 'details'")
    failure = GoogleAdsFailure.deserialize(response.partial_failure_error.details[0].value)
    where = {e.location.field_path_elements[0].index:
             [p.field_name for p in e.location.field_path_elements[1:]] for e in failure.errors}
    assert where[2] == ["adjustment_date_time"] and where[7] == ["restatement_value"]
    assert [r.order_id for r in response.results] == [""] * 10 + ["tx-2"]
    assert {txid for txid, (retracted, _, _) in counts(running).items() if retracted} == {"tx-2"}
    world.advance(1)  # a day later both are old enough
    assert not refused(adjust(client, retraction("fresh", when="2026-10-16 12:00:00+00:00"),
                              retraction("pending", when="2026-10-16 12:00:00+00:00")))
    world.advance(60)
    response = adjust(client, retraction("tx-0", when="2026-12-15 12:00:00+00:00"))
    assert refused(response) == {0: upload_error("CONVERSION_EXPIRED")}


def test_a_conversion_uploaded_without_transaction_id_by_gclid_and_time(
        running: RunningSandbox) -> None:
    click = clicks(running.world, dt.date(2026, 10, 7), 1)[0]
    event = conversion(click, "", 40.0)
    ingest(running, [event])
    running.world.advance(1 / 24)
    client = ads_client(running)
    assert action_stats(client) == (1.0, 40.0)
    converted = dt.datetime.fromtimestamp(click.timestamp + 7200, dt.UTC)
    wrong = (converted + dt.timedelta(seconds=5)).strftime("%Y-%m-%d %H:%M:%S+00:00")
    response = adjust(client, {"kind": "RETRACTION", "gclid": click.gclid,
                               "conversion_date_time": wrong})
    assert refused(response) == {0: upload_error("CONVERSION_NOT_FOUND")}
    local = converted.astimezone(dt.timezone(dt.timedelta(hours=-4)))
    response = adjust(client, {"kind": "RETRACTION", "gclid": click.gclid,
                               "conversion_date_time": local.strftime("%Y-%m-%d %H:%M:%S-04:00")})
    assert not refused(response)
    assert response.results[0].gclid_date_time_pair.gclid == click.gclid
    assert action_stats(client) == (0.0, 0.0)
    assert control(running, "/datamanager")["without_transaction_id"]["retractions"] == 1


def test_validate_only_checks_and_changes_nothing(running: RunningSandbox) -> None:
    upload_three(running)
    client = ads_client(running)
    response = adjust(client, retraction("tx-0"), retraction("nope"), validate_only=True)
    assert refused(response) == {1: upload_error("CONVERSION_NOT_FOUND")}
    assert not response.results
    assert action_stats(client) == (3.0, 60.0)
    assert counts(running)["tx-0"] == (0, 0, 10.0)


def test_whole_request_refusals(running: RunningSandbox) -> None:
    upload_three(running)
    client = ads_client(running)
    with pytest.raises(GoogleAdsException) as caught:
        adjust(client, retraction("tx-0"), retraction("tx-1", action="conversionActions/6111"))
    assert reasons(caught.value) == [("request_error", "RESOURCE_NAME_MALFORMED")]
    path = caught.value.failure.errors[0].location.field_path_elements
    assert [(p.field_name, p.index) for p in path][:1] == [("conversion_adjustments", 1)]
    with pytest.raises(GoogleAdsException) as caught:
        adjust(client, retraction("tx-0"), customer="1111111111")
    assert reasons(caught.value) == [("authorization_error", "USER_PERMISSION_DENIED")]
    with pytest.raises(GoogleAdsException) as caught:
        adjust(client, retraction("tx-0"), customer=MANAGER)
    assert reasons(caught.value) == [("request_error", "CANNOT_BE_EXECUTED_BY_MANAGER_ACCOUNT")]
    with pytest.raises(api_exceptions.Unauthenticated):
        adjust(ads_client(running, credentials=AnonymousCredentials()), retraction("tx-0"))
    running.sandbox.inject("google_ads", "rate_limit", retry_after=3)
    with pytest.raises(api_exceptions.ResourceExhausted):
        adjust(client, retraction("tx-0"))
    assert counts(running)["tx-0"] == (0, 0, 10.0)  # none of them retracted anything
    assert action_stats(client) == (3.0, 60.0)
    assert running.sandbox.requests("google_ads")[
        "google_ads.UploadConversionAdjustments"] == 5  # refused calls count too
    assert not refused(adjust(client, retraction("tx-0")))  # the fault was spent
