"""The GA4 Data API simulator, driven by the real BetaAnalyticsDataClient over gRPC and REST.

Every report is compared with ``World.ga4_rows``, the ground truth the simulator serves."""

from __future__ import annotations

import datetime as dt
import json
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from google.analytics.data_v1beta import BetaAnalyticsDataClient
from google.analytics.data_v1beta.types import (
    BatchRunReportsRequest,
    RunReportRequest,
    RunReportResponse,
)
from google.api_core import exceptions
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials

from conftest import Ga4Running, start_ga4
from convsync.sandbox.control import Sandbox
from convsync.sandbox.world import Accounts, Ga4Row, World, WorldSpec

TRANSPORTS = ("grpc", "rest")
PROPERTY = f"properties/{Accounts().ga4_property_id}"
Key = tuple[str, ...]
Sums = dict[Key, list[float]]


def sdk_client(ga4_running: Ga4Running, transport: str) -> BetaAnalyticsDataClient:
    """The real GA4 client over ``transport`` (grpc or rest), pointed at the simulator."""
    options = ClientOptions(api_endpoint=ga4_running.endpoint(transport))
    if transport == "rest":
        return BetaAnalyticsDataClient(credentials=AnonymousCredentials(), transport="rest",
                                       client_options=options)
    return BetaAnalyticsDataClient(credentials=AnonymousCredentials(), client_options=options)


@pytest.fixture
def ga4_sandbox(ga4_running: Ga4Running) -> Iterator[Sandbox]:
    ga4_running.sandbox.reset_requests()
    yield ga4_running.sandbox
    ga4_running.sandbox.clear_faults()


@pytest.fixture(params=TRANSPORTS)
def client(request: pytest.FixtureRequest, ga4_running: Ga4Running) -> BetaAnalyticsDataClient:
    return sdk_client(ga4_running, request.param)


# -- helpers ------------------------------------------------------------------------------------

def report(client: BetaAnalyticsDataClient, dimensions: list[str], metrics: list[str],
           start: str | dt.date, end: str | dt.date, property_: str | None = None,
           **fields: Any) -> Any:
    """Run a report and hand back the raw protobuf response (the fast way convsync reads it)."""
    request = RunReportRequest(
        property=property_ or PROPERTY,
        dimensions=[{"name": name} for name in dimensions],
        metrics=[{"name": name} for name in metrics],
        date_ranges=[{"start_date": str(start), "end_date": str(end)}], **fields)
    return RunReportResponse.pb(client.run_report(request))


def table(response: Any) -> dict[Key, tuple[str, ...]]:
    rows = {tuple(v.value for v in row.dimension_values): tuple(v.value for v in row.metric_values)
            for row in response.rows}
    assert len(rows) == len(response.rows), "a dimension combination came back twice"
    return rows


def truth(world: World, start: dt.date, end: dt.date, key: Callable[[Ga4Row], Key],
          keep: Callable[[Ga4Row], bool] = lambda row: True) -> Sums:
    """Event count, key events and event value per key, summed from the world's own rows."""
    sums: Sums = defaultdict(lambda: [0, 0, 0.0])
    for row in world.ga4_rows(start, end):
        if keep(row):
            cell = sums[key(row)]
            cell[0] += row.event_count
            cell[1] += row.key_events
            cell[2] += row.event_value
    return dict(sums)


def assert_matches(rows: dict[Key, tuple[str, ...]], expected: Sums) -> None:
    """Integer metrics exactly, eventValue as a decimal string to the cent."""
    assert set(rows) == set(expected)
    for key, (count, key_events, value) in expected.items():
        got_count, got_key_events, got_value = rows[key]
        assert (int(got_count), int(got_key_events)) == (count, key_events), key
        assert float(got_value) == pytest.approx(value, abs=0.006), key


def ymd(day: dt.date) -> str:
    return day.strftime("%Y%m%d")


def property_today(world: World) -> dt.date:
    return world.as_of.astimezone(ZoneInfo(world.accounts.ga4_tz)).date()


METRICS = ["eventCount", "keyEvents", "eventValue"]


# -- what the reports say -----------------------------------------------------------------------

def test_event_metrics_per_day_source_campaign_and_event_match_the_world(
        client: BetaAnalyticsDataClient, world: World) -> None:
    response = report(client, ["date", "sessionSource", "sessionCampaignName", "eventName"],
                      METRICS, world.start, world.end)
    expected = truth(world, world.start, world.end,
                     lambda r: (ymd(r.date), r.source, r.campaign_name, r.event_name))
    assert_matches(table(response), expected)
    assert response.row_count == len(expected)
    assert [h.name for h in response.dimension_headers] == [
        "date", "sessionSource", "sessionCampaignName", "eventName"]
    assert [(h.name, h.type_) for h in response.metric_headers] == [
        ("eventCount", 1), ("keyEvents", 1), ("eventValue", 9)]  # INTEGER, INTEGER, CURRENCY
    assert (response.metadata.currency_code, response.metadata.time_zone) == (
        world.accounts.currency, world.accounts.ga4_tz)
    assert response.kind == "analyticsData#runReport"


def test_dimensions_not_asked_for_are_summed_over(client: BetaAnalyticsDataClient,
                                                  world: World) -> None:
    by_day_event = report(client, ["date", "eventName"], METRICS, world.start, world.end)
    assert_matches(table(by_day_event), truth(world, world.start, world.end,
                                              lambda r: (ymd(r.date), r.event_name)))
    by_source_medium = report(client, ["sessionSourceMedium"], METRICS, world.start, world.end)
    expected = truth(world, world.start, world.end, lambda r: (f"{r.source} / {r.medium}",))
    assert_matches(table(by_source_medium), expected)
    assert ("google / cpc",) in expected
    totals = report(client, [], METRICS, world.start, world.end)
    assert_matches(table(totals), truth(world, world.start, world.end, lambda r: ()))


def test_paging_with_limit_and_offset_returns_every_row_exactly_once(
        client: BetaAnalyticsDataClient, world: World) -> None:
    dimensions = ["date", "sessionCampaignName", "eventName"]
    expected = truth(world, world.start, world.end,
                     lambda r: (ymd(r.date), r.campaign_name, r.event_name))
    seen: list[Key] = []
    rows: dict[Key, tuple[str, ...]] = {}
    offset, page_size = 0, 300
    while True:
        page = report(client, dimensions, METRICS, world.start, world.end,
                      limit=page_size, offset=offset)
        assert page.row_count == len(expected)
        assert len(page.rows) == min(page_size, len(expected) - offset)
        rows.update(table(page))
        seen += [tuple(v.value for v in row.dimension_values) for row in page.rows]
        offset += page_size
        if offset >= page.row_count:
            break
    assert len(seen) == len(set(seen)) == len(expected) > page_size
    assert_matches(rows, expected)
    past_the_end = report(client, dimensions, METRICS, world.start, world.end,
                          limit=page_size, offset=len(expected))
    assert (len(past_the_end.rows), past_the_end.row_count) == (0, len(expected))


def test_limit_above_the_maximum_is_capped_not_refused(client: BetaAnalyticsDataClient,
                                                       world: World) -> None:
    response = report(client, ["date"], ["eventCount"], world.start, world.end,
                      limit=1_000_000)
    assert len(response.rows) == response.row_count == (world.end - world.start).days + 1


def test_rows_come_by_first_metric_descending_unless_ordered(client: BetaAnalyticsDataClient,
                                                             world: World) -> None:
    default = report(client, ["date", "eventName"], ["eventCount"], world.start, world.end)
    counts = [int(row.metric_values[0].value) for row in default.rows]
    assert counts == sorted(counts, reverse=True)
    ordered = report(client, ["date", "eventName"], ["eventCount"], world.start, world.end,
                     order_bys=[{"dimension": {"dimension_name": "date"}},
                                {"dimension": {"dimension_name": "eventName"}, "desc": True}])
    keys = [(row.dimension_values[0].value, row.dimension_values[1].value)
            for row in ordered.rows]
    assert keys == sorted(sorted(keys, key=lambda k: k[1], reverse=True), key=lambda k: k[0])
    by_metric = report(client, ["eventName"], ["keyEvents", "eventCount"], world.start,
                       world.end, order_bys=[{"metric": {"metric_name": "eventCount"}}])
    ascending = [int(row.metric_values[1].value) for row in by_metric.rows]
    assert ascending == sorted(ascending) and len(set(ascending)) > 1


def test_dimension_filters_select_rows_before_aggregation(client: BetaAnalyticsDataClient,
                                                          world: World) -> None:
    """Filters may cite dimensions the report does not show; matching ignores case."""
    google_key_events = {"and_group": {"expressions": [
        {"filter": {"field_name": "sessionSource",
                    "string_filter": {"match_type": "EXACT", "value": "GOOGLE"}}},
        {"filter": {"field_name": "eventName",
                    "in_list_filter": {"values": ["purchase", "generate_lead"]}}},
    ]}}
    response = report(client, ["date", "eventName"], METRICS, world.start, world.end,
                      dimension_filter=google_key_events)
    expected = truth(world, world.start, world.end, lambda r: (ymd(r.date), r.event_name),
                     lambda r: r.source == "google"
                     and r.event_name in ("purchase", "generate_lead"))
    assert_matches(table(response), expected)
    assert expected and {event for _, event in expected} == {"purchase", "generate_lead"}

    search_or_max = {"or_group": {"expressions": [
        {"filter": {"field_name": "sessionCampaignName",
                    "string_filter": {"match_type": "BEGINS_WITH", "value": "search"}}},
        {"filter": {"field_name": "sessionCampaignName",
                    "string_filter": {"match_type": "CONTAINS", "value": "Max"}}},
    ]}}
    response = report(client, ["sessionCampaignName"], METRICS, world.start, world.end,
                      dimension_filter=search_or_max)
    expected = truth(world, world.start, world.end, lambda r: (r.campaign_name,),
                     lambda r: r.campaign_name.startswith("Search") or "Max" in r.campaign_name)
    assert_matches(table(response), expected)
    assert {name[:4] for (name,) in expected} == {"Sear", "PMax"}

    not_exactly_search = {"and_group": {"expressions": [
        {"not_expression": {"filter": {"field_name": "sessionCampaignName", "string_filter": {
            "match_type": "EXACT", "value": "search"}}}},
        {"filter": {"field_name": "sessionCampaignName", "string_filter": {
            "match_type": "BEGINS_WITH", "value": "S", "case_sensitive": True}}},
    ]}}
    response = report(client, ["sessionCampaignName"], METRICS, world.start, world.end,
                      dimension_filter=not_exactly_search)
    expected = truth(world, world.start, world.end, lambda r: (r.campaign_name,),
                     lambda r: r.campaign_name.startswith("S"))
    assert_matches(table(response), expected)
    assert {name[:4] for (name,) in expected} == {"Sear", "Shop"}


def test_multiple_date_ranges_add_a_date_range_dimension(client: BetaAnalyticsDataClient,
                                                         world: World) -> None:
    first = (world.start, world.start + dt.timedelta(days=6))
    later = (world.start + dt.timedelta(days=3), world.start + dt.timedelta(days=13))
    request = RunReportRequest(
        property=f"properties/{world.accounts.ga4_property_id}",
        dimensions=[{"name": "eventName"}], metrics=[{"name": name} for name in METRICS],
        date_ranges=[{"start_date": str(first[0]), "end_date": str(first[1])},
                     {"start_date": str(later[0]), "end_date": str(later[1]), "name": "later"}])
    response = RunReportResponse.pb(client.run_report(request))
    assert [h.name for h in response.dimension_headers] == ["eventName", "dateRange"]
    expected = {(*key, "date_range_0"): sums for key, sums in
                truth(world, *first, lambda r: (r.event_name,)).items()}
    expected |= {(*key, "later"): sums for key, sums in
                 truth(world, *later, lambda r: (r.event_name,)).items()}
    assert_matches(table(response), expected)


def test_relative_dates_resolve_against_the_world_clock(client: BetaAnalyticsDataClient,
                                                        world: World) -> None:
    today = property_today(world)
    response = report(client, ["date"], METRICS, "7daysAgo", "yesterday")
    first, last = today - dt.timedelta(days=7), today - dt.timedelta(days=1)
    assert_matches(table(response), truth(world, first, last, lambda r: (ymd(r.date),)))
    assert {key[0] for key in table(response)} == {
        ymd(first + dt.timedelta(days=n)) for n in range(7)}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_today_follows_the_world_clock_as_it_moves(transport: str,
                                                   tls_files: tuple[Path, Path]) -> None:
    world = World(WorldSpec(seed=5, start=dt.date(2026, 9, 1), days=12, campaigns=4,
                            as_of=dt.datetime(2026, 9, 8, 18, 0, tzinfo=dt.UTC)))
    simulator = start_ga4(world)
    try:
        client = sdk_client(simulator, transport)
        before = table(report(client, ["date"], ["eventCount"], "today", "today"))
        world.advance(1)
        after = table(report(client, ["date"], ["eventCount"], "today", "today"))
    finally:
        simulator.stop()
    assert list(before) == [("20260908",)] and list(after) == [("20260909",)]
    assert after == {key: (str(int(sums[0])),) for key, sums in truth(
        world, dt.date(2026, 9, 9), dt.date(2026, 9, 9), lambda r: (ymd(r.date),)).items()}


def test_rows_with_only_zero_metrics_need_keep_empty_rows(client: BetaAnalyticsDataClient,
                                                          world: World) -> None:
    dropped = table(report(client, ["eventName"], ["keyEvents"], world.start, world.end))
    kept = table(report(client, ["eventName"], ["keyEvents"], world.start, world.end,
                        keep_empty_rows=True))
    assert set(dropped) == {("purchase",), ("generate_lead",)}
    assert len(kept) == 6 and kept[("view_item",)] == ("0",)


def test_metric_aggregations_add_totals_and_maximums(client: BetaAnalyticsDataClient,
                                                     world: World) -> None:
    response = report(client, ["date"], ["eventCount", "eventValue"], world.start, world.end,
                      limit=5, metric_aggregations=["TOTAL", "MAXIMUM"])
    everything = truth(world, world.start, world.end, lambda r: (ymd(r.date),))
    (total,), (maximum,) = response.totals, response.maximums
    assert [v.value for v in total.dimension_values] == ["RESERVED_TOTAL"]
    assert int(total.metric_values[0].value) == sum(s[0] for s in everything.values())
    assert float(total.metric_values[1].value) == pytest.approx(
        sum(s[2] for s in everything.values()), abs=0.01)
    assert int(maximum.metric_values[0].value) == max(s[0] for s in everything.values())


def test_property_quota_is_reported_and_spent(client: BetaAnalyticsDataClient,
                                              world: World) -> None:
    first = report(client, ["date"], ["eventCount"], world.start, world.end,
                   return_property_quota=True).property_quota
    second = report(client, ["date"], ["eventCount"], world.start, world.end,
                    return_property_quota=True).property_quota
    assert first.tokens_per_day.consumed >= 1
    assert second.tokens_per_day.remaining == (
        first.tokens_per_day.remaining - second.tokens_per_day.consumed)
    assert 0 < second.tokens_per_hour.remaining < 40_000
    assert second.concurrent_requests.remaining == 10
    assert not report(client, ["date"], ["eventCount"], world.start,
                      world.end).HasField("property_quota")


def test_batch_run_reports_answers_each_report(client: BetaAnalyticsDataClient, world: World,
                                               ga4_sandbox: Sandbox) -> None:
    property_ = f"properties/{world.accounts.ga4_property_id}"
    ranges = [{"start_date": str(world.start), "end_date": str(world.end)}]
    batch = client.batch_run_reports(BatchRunReportsRequest(property=property_, requests=[
        {"dimensions": [{"name": "eventName"}], "metrics": [{"name": "keyEvents"}],
         "date_ranges": ranges},
        {"dimensions": [{"name": "sessionSource"}], "metrics": [{"name": "eventCount"}],
         "date_ranges": ranges},
    ]))
    by_event, by_source = (RunReportResponse.pb(r) for r in batch.reports)
    assert table(by_event) == {key: (str(sums[1]),) for key, sums in truth(
        world, world.start, world.end, lambda r: (r.event_name,)).items() if sums[1]}
    assert table(by_source) == {key: (str(sums[0]),) for key, sums in truth(
        world, world.start, world.end, lambda r: (r.source,)).items()}
    assert ga4_sandbox.requests("ga4") == {"ga4.batchRunReports": 1}


# -- what the API refuses -----------------------------------------------------------------------

REFUSED = [
    pytest.param({"metrics": ["pageViewz"]}, "Field pageViewz is not a valid metric. For a list",
                 id="unknown-metric"),
    pytest.param({"metrics": ["conversions"]}, "Field conversions is not a valid metric",
                 id="conversions-was-renamed-keyEvents"),
    pytest.param({"dimensions": ["customEvent:lead_id"]},
                 "Field customEvent:lead_id is not a valid dimension",
                 id="unregistered-custom-dimension"),
    pytest.param({"dimensions": ["date", "eventName", "sessionSource", "sessionMedium",
                                 "sessionCampaignName", "sessionSourceMedium", "country", "city",
                                 "browser", "deviceCategory"]},
                 "Requests are limited to 9 dimensions within a nested request. This request "
                 "is for 10 dimensions.", id="ten-dimensions"),
    pytest.param({"metrics": [*METRICS, "sessions", "totalUsers", "newUsers", "activeUsers",
                              "bounceRate", "engagedSessions", "transactions", "itemRevenue"]},
                 "Requests are limited to 10 metrics", id="eleven-metrics"),
    pytest.param({"start": "2026-13-01"}, "Invalid startDate : 2026-13-01. startDate must be "
                 "YYYY-MM-DD, NdaysAgo, yesterday, or today.", id="bad-date"),
    pytest.param({"start": "today", "end": "3daysAgo"}, "startDate must be less than or equal",
                 id="reversed-range"),
    pytest.param({"limit": -5}, "limit must be positive", id="negative-limit"),
    pytest.param({"order_bys": [{"metric": {"metric_name": "eventValue"}}]},
                 "Field eventValue exists in OrderBy but is not defined", id="order-by-absent"),
]


@pytest.mark.parametrize(("change", "message"), REFUSED)
def test_invalid_requests_are_refused_with_the_api_message(
        client: BetaAnalyticsDataClient, change: dict[str, Any], message: str) -> None:
    fields = {"dimensions": ["date"], "metrics": ["eventCount"], "start": "2026-09-01",
              "end": "2026-09-07"} | change
    # The REST transport maps HTTP 400 to BadRequest; only gRPC knows INVALID_ARGUMENT.
    expected = (exceptions.InvalidArgument if client.transport.kind == "grpc"
                else exceptions.BadRequest)
    with pytest.raises(exceptions.BadRequest) as raised:
        report(client, **fields)
    assert type(raised.value) is expected
    assert message in raised.value.message


def test_a_real_dimension_the_sandbox_lacks_is_unimplemented(
        client: BetaAnalyticsDataClient) -> None:
    with pytest.raises(exceptions.MethodNotImplemented, match="does not simulate the dimension"):
        report(client, ["country"], ["eventCount"], "7daysAgo", "today")


def test_another_property_is_permission_denied(client: BetaAnalyticsDataClient) -> None:
    expected = (exceptions.PermissionDenied if client.transport.kind == "grpc"
                else exceptions.Forbidden)
    with pytest.raises(exceptions.Forbidden) as raised:
        report(client, ["date"], ["eventCount"], "7daysAgo", "today",
               property_="properties/987654321")
    assert type(raised.value) is expected
    assert "User does not have sufficient permissions for this property" in raised.value.message


# -- faults and counting ------------------------------------------------------------------------

@pytest.mark.parametrize(("kind", "grpc_error", "rest_error", "message"), [
    ("rate_limit", exceptions.ResourceExhausted, exceptions.TooManyRequests,
     "Exhausted property tokens per hour"),
    ("exhausted", exceptions.ResourceExhausted, exceptions.TooManyRequests,
     "Exhausted property tokens per day"),
    ("server_error", exceptions.ServiceUnavailable, exceptions.ServiceUnavailable,
     "The service is currently unavailable"),
])
def test_injected_faults_fail_one_request_the_platform_way(
        client: BetaAnalyticsDataClient, ga4_sandbox: Sandbox, world: World, kind: Any,
        grpc_error: type[Exception], rest_error: type[Exception], message: str) -> None:
    ga4_sandbox.inject("ga4", kind)
    with pytest.raises(exceptions.GoogleAPICallError) as raised:
        report(client, ["date"], ["eventCount"], world.start, world.end)
    assert type(raised.value) is (grpc_error if client.transport.kind == "grpc" else rest_error)
    assert message in str(raised.value)
    assert report(client, ["date"], ["eventCount"], world.start, world.end).row_count > 0


def test_a_slow_answer_still_arrives_complete(client: BetaAnalyticsDataClient,
                                              ga4_sandbox: Sandbox, world: World) -> None:
    ga4_sandbox.inject("ga4", "slow", delay=0.05)
    response = report(client, ["eventName"], METRICS, world.start, world.end)
    assert_matches(table(response), truth(world, world.start, world.end,
                                          lambda r: (r.event_name,)))
    assert ga4_sandbox.next_fault("ga4") is None


def test_every_request_is_counted_refused_ones_too(client: BetaAnalyticsDataClient,
                                                   ga4_sandbox: Sandbox, world: World) -> None:
    report(client, ["date"], ["eventCount"], world.start, world.end)
    report(client, ["date"], ["eventCount"], world.start, world.end, limit=3)
    with pytest.raises(exceptions.BadRequest):
        report(client, ["date"], ["pageViewz"], world.start, world.end)
    assert ga4_sandbox.requests("ga4") == {"ga4.runReport": 3}


# -- the REST wire as other clients speak it ----------------------------------------------------

def post(ga4_running: Ga4Running, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{ga4_running.rest_port}{path}", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_rest_takes_enum_names_and_refuses_unknown_fields(ga4_running: Ga4Running,
                                                          world: World) -> None:
    """curl and the JS client send enum names and int64 as strings; a typo is a 400."""
    path = f"/v1beta/{ga4_running.property}:runReport"
    status, body = post(ga4_running, path, {
        "dimensions": [{"name": "eventName"}], "metrics": [{"name": "eventCount"}],
        "dateRanges": [{"startDate": str(world.start), "endDate": str(world.end)}],
        "limit": "2", "orderBys": [{"dimension": {"dimensionName": "eventName",
                                                   "orderType": "ALPHANUMERIC"}}]})
    assert status == 200
    assert body["metricHeaders"] == [{"name": "eventCount", "type": "TYPE_INTEGER"}]
    assert [row["dimensionValues"][0]["value"] for row in body["rows"]] == [
        "add_to_cart", "begin_checkout"]
    assert body["rowCount"] == 6
    status, body = post(ga4_running, path, {"dimension": [{"name": "eventName"}]})
    assert (status, body["error"]["status"]) == (400, "INVALID_ARGUMENT")
    assert body["error"]["message"] == (
        'Invalid JSON payload received. Unknown name "dimension": Cannot find field.')
    status, body = post(ga4_running, f"/v1beta/{ga4_running.property}:runPivotReport", {})
    assert (status, body["error"]["status"]) == (501, "UNIMPLEMENTED")
