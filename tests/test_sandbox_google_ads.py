"""The Google Ads simulator, driven by the real ``google-ads`` client over gRPC + TLS.

Every answer the SDK parses is compared with the world's own view (``World.google_ads_*``)."""

from __future__ import annotations

import datetime as dt
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import grpc
import pytest
from google.ads.googleads.client import GoogleAdsClient
from google.ads.googleads.errors import GoogleAdsException
from google.ads.googleads.v26.errors.types.errors import GoogleAdsFailure
from google.api_core import exceptions as api_exceptions
from google.auth.credentials import AnonymousCredentials
from google.oauth2.credentials import Credentials

from convsync.sandbox.control import Sandbox
from convsync.sandbox.google_ads import FAILURE_KEY, PAGE_SIZE, build_google_ads_server
from convsync.sandbox.world import World, WorldSpec
from convsync.sources.google_ads import error_code_name

CONVERSION_METRICS = ("conversions", "conversions_value", "all_conversions",
                      "all_conversions_value")
BOTH_BASES = CONVERSION_METRICS + tuple(f"{m}_by_conversion_date" for m in CONVERSION_METRICS)


@pytest.fixture(scope="module")
def running(world: World, tls_files: tuple[Path, Path]) -> Iterator[tuple[Sandbox, int]]:
    sandbox = Sandbox(world)
    server, port = build_google_ads_server(sandbox, *tls_files)
    yield sandbox, port
    server.stop(grace=None)


@pytest.fixture
def sandbox(running: tuple[Sandbox, int]) -> Iterator[Sandbox]:
    sandbox = running[0]
    sandbox.clear_faults()
    sandbox.reset_requests()
    yield sandbox
    sandbox.clear_faults()


def make_client(port: int, credentials: Any = None, **options: Any) -> GoogleAdsClient:
    """As convsync builds it: no developer token (sunset), raw protobuf rows."""
    return GoogleAdsClient(credentials=credentials or Credentials(token="sandbox"),
                           endpoint=f"localhost:{port}", use_proto_plus=False, **options)


@pytest.fixture(scope="module")
def service(running: tuple[Sandbox, int]) -> Any:
    return make_client(running[1]).get_service("GoogleAdsService")


def stream(service: Any, world: World, query: str) -> list[Any]:
    rows = []
    batches = service.search_stream(customer_id=world.accounts.google_ads_customer_id,
                                    query=query)
    for batch in batches:
        rows.extend(batch.results)
    return rows


def reasons(error: GoogleAdsException) -> list[tuple[str, str]]:
    """(error code field, enum value name) of each error in the failure."""
    raw = type(error.failure).pb(error.failure)
    return [(code.split(".")[0], code.split(".")[1]) for code in map(error_code_name, raw.errors)]


def enum_name(message: Any, field: str) -> str:
    descriptor = message.DESCRIPTOR.fields_by_name[field]
    return str(descriptor.enum_type.values_by_number[getattr(message, field)].name)


def stats_truth(world: World, start: dt.date, end: dt.date) -> dict[tuple[str, int, int],
                                                                     tuple[float, ...]]:
    """(date, campaign id, action id) -> the eight conversion metrics, both bases joined."""
    truth: dict[tuple[str, int, int], list[float]] = defaultdict(lambda: [0.0] * 8)
    for offset, by_conversion_date in ((0, False), (4, True)):
        for stat in world.google_ads_stats(start, end, by_conversion_date=by_conversion_date):
            key = (stat.date.isoformat(), int(stat.campaign.id), stat.action.id)
            truth[key][offset:offset + 4] = [stat.conversions, stat.conversions_value,
                                             stat.all_conversions, stat.all_conversions_value]
    return {key: tuple(values) for key, values in truth.items()}


def action_id(resource_name: str) -> int:
    return int(resource_name.rsplit("/", 1)[1])


def account_today(world: World) -> dt.date:
    return world.as_of.astimezone(ZoneInfo(world.accounts.google_ads_tz)).date()


# -- pulls ----------------------------------------------------------------------------------
def test_conversion_actions_match_the_world(service: Any, world: World) -> None:
    rows = stream(service, world, """
        SELECT conversion_action.id, conversion_action.name, conversion_action.category,
               conversion_action.type, conversion_action.status, conversion_action.origin,
               conversion_action.primary_for_goal, conversion_action.counting_type,
               conversion_action.include_in_conversions_metric,
               conversion_action.value_settings.default_value,
               conversion_action.value_settings.always_use_default_value,
               conversion_action.click_through_lookback_window_days,
               conversion_action.view_through_lookback_window_days,
               customer.time_zone, customer.currency_code
        FROM conversion_action""")
    got = {row.conversion_action.id: row for row in rows}
    assert sorted(got) == sorted(a.id for a in world.google_ads_actions)
    for action in world.google_ads_actions:
        row = got[action.id]
        resource = row.conversion_action
        assert resource.name == action.name
        assert enum_name(resource, "category") == action.category
        assert enum_name(resource, "type_") == action.type
        assert enum_name(resource, "origin") == action.origin
        assert enum_name(resource, "counting_type") == action.counting_type
        assert enum_name(resource, "status") == "ENABLED"
        assert resource.primary_for_goal is action.primary_for_goal
        assert resource.include_in_conversions_metric is action.primary_for_goal
        assert resource.value_settings.default_value == action.default_value
        assert resource.click_through_lookback_window_days == action.click_through_days
        assert resource.view_through_lookback_window_days == action.view_through_days
        assert resource.resource_name == (
            f"customers/{world.accounts.google_ads_customer_id}/conversionActions/{action.id}")
        assert row.customer.time_zone == world.accounts.google_ads_tz
        assert row.customer.currency_code == world.accounts.currency


def test_daily_campaign_action_stats_stream_matches_both_bases(service: Any,
                                                               world: World) -> None:
    start, end = world.start + dt.timedelta(days=5), world.start + dt.timedelta(days=24)
    metrics = ", ".join(f"metrics.{m}" for m in BOTH_BASES)
    rows = stream(service, world, f"""
        SELECT campaign.id, segments.date, segments.conversion_action, {metrics}
        FROM campaign WHERE segments.date BETWEEN '{start}' AND '{end}'""")
    got = {(row.segments.date, row.campaign.id, action_id(row.segments.conversion_action)):
           tuple(getattr(row.metrics, m) for m in BOTH_BASES) for row in rows}
    assert len(got) == len(rows)
    assert got == stats_truth(world, start, end)
    assert any(values[0] != values[4] for values in got.values())  # the bases differ


def test_search_pages_of_ten_thousand_rows_match_the_world(running: tuple[Sandbox, int],
                                                           tls_files: tuple[Path, Path]) -> None:
    world = World(WorldSpec(seed=5, start=dt.date(2026, 9, 1), days=40, campaigns=90))
    server, port = build_google_ads_server(Sandbox(world), *tls_files)
    try:
        service = make_client(port).get_service("GoogleAdsService")
        pager = service.search(request={
            "customer_id": world.accounts.google_ads_customer_id,
            "query": f"""SELECT campaign.id, segments.date, segments.conversion_action,
                                metrics.all_conversions, metrics.all_conversions_value
                         FROM campaign
                         WHERE segments.date BETWEEN '{world.start}' AND '{world.end}'""",
            "search_settings": {"return_total_results_count": True}})
        pages = list(pager.pages)
    finally:
        server.stop(grace=None)
    truth = {key: values[2:4] for key, values in stats_truth(world, world.start,
                                                               world.end).items()
             if values[2]}  # click-date rows only
    assert len(truth) > PAGE_SIZE
    assert [len(page.results) for page in pages] == [PAGE_SIZE, len(truth) - PAGE_SIZE]
    assert pages[0].next_page_token and not pages[1].next_page_token
    assert pages[0].total_results_count == len(truth)
    got = {(r.segments.date, r.campaign.id, action_id(r.segments.conversion_action)):
           (r.metrics.all_conversions, r.metrics.all_conversions_value)
           for page in pages for r in page.results}
    assert got == truth


def test_campaign_days_carry_clicks_and_all_conversion_totals(service: Any, world: World) -> None:
    day = world.start + dt.timedelta(days=10)
    rows = stream(service, world, f"""
        SELECT campaign.id, campaign.name, segments.date, metrics.clicks, metrics.impressions,
               metrics.cost_micros, metrics.conversions, metrics.all_conversions_value
        FROM campaign WHERE segments.date = '{day}'""")
    clicks = Counter(int(click.campaign.id) for click in world.google_ads_clicks(day))
    conversions: Counter[int] = Counter()
    values: defaultdict[int, float] = defaultdict(float)
    for stat in world.google_ads_stats(day, day):
        conversions[int(stat.campaign.id)] += stat.conversions
        values[int(stat.campaign.id)] += stat.all_conversions_value
    assert {row.campaign.id: row.metrics.clicks for row in rows} == clicks
    assert {row.campaign.id: row.metrics.conversions for row in rows} == {
        cid: conversions[cid] for cid in clicks}
    for row in rows:
        assert row.metrics.all_conversions_value == pytest.approx(values[row.campaign.id])
        assert row.metrics.impressions > row.metrics.clicks > 0
        assert row.campaign.name == next(c.name for c in world.campaigns
                                         if int(c.id) == row.campaign.id)


def test_unselected_segments_are_summed_over(service: Any, world: World) -> None:
    start, end = world.start + dt.timedelta(days=3), world.start + dt.timedelta(days=16)
    per_campaign = stream(service, world, f"""
        SELECT campaign.id, metrics.all_conversions, metrics.conversions_by_conversion_date
        FROM campaign WHERE segments.date BETWEEN '{start}' AND '{end}'
        PARAMETERS omit_unselected_resource_names = true""")
    per_action = stream(service, world, f"""
        SELECT conversion_action.id, segments.date, metrics.all_conversions
        FROM conversion_action WHERE segments.date BETWEEN '{start}' AND '{end}'""")
    by_campaign: Counter[int] = Counter()
    by_action: Counter[tuple[str, int]] = Counter()
    for stat in world.google_ads_stats(start, end):
        by_campaign[int(stat.campaign.id)] += stat.all_conversions
        by_action[(stat.date.isoformat(), stat.action.id)] += stat.all_conversions
    by_conversion_date: Counter[int] = Counter()
    for stat in world.google_ads_stats(start, end, by_conversion_date=True):
        by_conversion_date[int(stat.campaign.id)] += stat.conversions
    assert {r.campaign.id: r.metrics.all_conversions for r in per_campaign} == by_campaign
    assert {r.campaign.id: r.metrics.conversions_by_conversion_date
            for r in per_campaign} == by_conversion_date
    assert all(r.campaign.resource_name == "" for r in per_campaign)
    assert {(r.segments.date, r.conversion_action.id): r.metrics.all_conversions
            for r in per_action} == by_action
    assert all(r.conversion_action.resource_name for r in per_action)


def test_filters_order_and_limit(service: Any, world: World) -> None:
    google = world.campaigns_on("google_ads")[:2]
    start, end = world.start, world.start + dt.timedelta(days=13)
    rows = stream(service, world, f"""
        SELECT campaign.id, segments.date, metrics.conversions FROM campaign
        WHERE segments.date BETWEEN '{start}' AND '{end}'
          AND campaign.id IN ({google[0].id}, {google[1].id}) AND metrics.conversions > 0
        ORDER BY segments.date DESC LIMIT 5""")
    truth: Counter[tuple[str, int]] = Counter()
    for stat in world.google_ads_stats(start, end):
        if stat.campaign in google:
            truth[(stat.date.isoformat(), int(stat.campaign.id))] += stat.conversions
    expected = sorted(((d, c) for (d, c), n in truth.items() if n > 0),
                      key=lambda key: key[0], reverse=True)[:5]
    assert [(r.segments.date, r.campaign.id) for r in rows] == expected
    assert all(r.metrics.conversions == truth[(r.segments.date, r.campaign.id)] for r in rows)


def test_during_is_relative_to_the_world_clock(service: Any, world: World) -> None:
    today = account_today(world)
    query = "SELECT segments.date, metrics.all_conversions FROM customer WHERE segments.date {}"
    during = stream(service, world, query.format("DURING LAST_7_DAYS"))
    between = stream(service, world, query.format(
        f"BETWEEN '{today - dt.timedelta(days=7)}' AND '{today - dt.timedelta(days=1)}'"))
    assert [r.segments.date for r in during] == [
        (today - dt.timedelta(days=d)).isoformat() for d in range(7, 0, -1)]
    assert [r.metrics.all_conversions for r in during] == [
        r.metrics.all_conversions for r in between]


def test_summary_row_totals_the_stream(service: Any, world: World) -> None:
    start, end = world.start, world.start + dt.timedelta(days=6)
    batches = list(service.search_stream(request={
        "customer_id": world.accounts.google_ads_customer_id,
        "query": f"SELECT campaign.id, segments.date, metrics.all_conversions FROM campaign "
                 f"WHERE segments.date BETWEEN '{start}' AND '{end}'",
        "summary_row_setting": 3}))  # SUMMARY_ROW_WITH_RESULTS
    total = sum(s.all_conversions for s in world.google_ads_stats(start, end))
    assert batches[-1].summary_row.metrics.all_conversions == total
    assert sum(r.metrics.all_conversions for b in batches for r in b.results) == total


def test_click_view_one_day_matches_the_world(service: Any, world: World) -> None:
    day = account_today(world) - dt.timedelta(days=3)
    rows = stream(service, world, f"""
        SELECT click_view.gclid, campaign.id, segments.date FROM click_view
        WHERE segments.date = '{day}'""")
    clicks = list(world.google_ads_clicks(day))
    assert [(r.click_view.gclid, r.campaign.id) for r in rows] == [
        (c.gclid, int(c.campaign.id)) for c in clicks]
    assert {r.segments.date for r in rows} == {day.isoformat()}
    assert rows[0].click_view.resource_name.endswith(f"/clickViews/{day}~{clicks[0].gclid}")


def test_late_conversions_show_up_on_a_repull(tls_files: tuple[Path, Path]) -> None:
    spec = WorldSpec(seed=11, start=dt.date(2026, 9, 1), days=30, campaigns=8,
                     as_of=dt.datetime(2026, 9, 21, tzinfo=dt.UTC))
    world = World(spec)
    server, port = build_google_ads_server(Sandbox(world), *tls_files)
    query = ("SELECT campaign.id, segments.date, metrics.all_conversions FROM campaign "
             "WHERE segments.date BETWEEN '2026-09-01' AND '2026-09-15'")
    try:
        service = make_client(port).get_service("GoogleAdsService")
        before = sum(r.metrics.all_conversions for r in stream(service, world, query))
        world.advance(days=10)
        after = sum(r.metrics.all_conversions for r in stream(service, world, query))
    finally:
        server.stop(grace=None)
    start, end = dt.date(2026, 9, 1), dt.date(2026, 9, 15)
    assert after > before > 0
    assert after == sum(s.all_conversions for s in world.google_ads_stats(start, end))


# -- what the API refuses --------------------------------------------------------------------
def test_multi_day_click_view_is_refused(service: Any, world: World) -> None:
    with pytest.raises(GoogleAdsException) as caught:
        stream(service, world, "SELECT click_view.gclid FROM click_view "
                               "WHERE segments.date BETWEEN '2026-10-01' AND '2026-10-02'")
    assert reasons(caught.value) == [("click_view_error", "EXPECTED_FILTER_ON_A_SINGLE_DAY")]
    assert caught.value.error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.request_id


def test_unknown_field_is_unrecognized(service: Any, world: World) -> None:
    with pytest.raises(GoogleAdsException) as caught:
        stream(service, world, "SELECT campaign.nmae FROM campaign")
    assert reasons(caught.value) == [("query_error", "UNRECOGNIZED_FIELD")]
    error = caught.value.failure.errors[0]
    assert error.trigger.string_value == "campaign.nmae"
    assert "campaign.nmae" in error.message


@pytest.mark.parametrize(("query", "reason"), [
    ("SELECT campaign.id FORM campaign", "EXPECTED_FROM"),
    ("SELECT campaign.id, segments.date FROM campaign", "EXPECTED_FILTERS_ON_DATE_RANGE"),
    ("SELECT campaign.id FROM campaign WHERE segments.date DURING LAST_90_DAYS",
     "INVALID_VALUE_WITH_DURING_OPERATOR"),
    ("SELECT campaign.id, segments.conversion_action, metrics.clicks FROM campaign",
     "PROHIBITED_METRIC_IN_SELECT_OR_WHERE_CLAUSE"),
    ("SELECT conversion_action.id, metrics.conversions FROM conversion_action",
     "PROHIBITED_METRIC_IN_SELECT_OR_WHERE_CLAUSE"),
    ("SELECT campaign.id FROM campaign WHERE campaign.status = 'RUNNING'", "BAD_ENUM_CONSTANT"),
    ("SELECT campaign.id FROM campaign WHERE segments.date = '2026-13-01'",
     "INVALID_DATE_FORMAT"),
    ("SELECT campaign.id FROM campaign WHERE segments.conversion_action = 'x'",
     "EXPECTED_REFERENCED_FIELD_IN_SELECT_CLAUSE"),
    ("SELECT ad_group.id FROM ad_group", "QUERY_ERROR"),
])
def test_queries_the_api_rejects(service: Any, world: World, query: str, reason: str) -> None:
    with pytest.raises(GoogleAdsException) as caught:
        stream(service, world, query)
    assert reasons(caught.value) == [("query_error", reason)]


def test_setting_a_page_size_is_refused(service: Any, world: World) -> None:
    with pytest.raises(GoogleAdsException) as caught:
        service.search(request={"customer_id": world.accounts.google_ads_customer_id,
                                "query": "SELECT campaign.id FROM campaign", "page_size": 100})
    assert reasons(caught.value) == [("request_error", "PAGE_SIZE_NOT_SUPPORTED")]


def test_customer_and_manager_are_checked(running: tuple[Sandbox, int], world: World) -> None:
    port = running[1]
    query = "SELECT campaign.id FROM campaign"
    accounts = world.accounts
    # a chained get_service(...).search(...) may lose its channel: keep the service around
    managed = make_client(port, login_customer_id=accounts.google_ads_manager_id)
    service = managed.get_service("GoogleAdsService")
    rows = list(service.search(customer_id=accounts.google_ads_customer_id, query=query))
    assert [r.campaign.id for r in rows] == [int(c.id) for c in world.campaigns_on("google_ads")]
    for client, customer_id in ((make_client(port), "1111111111"),
                                (make_client(port, login_customer_id="5555555555"),
                                 accounts.google_ads_customer_id)):
        service = client.get_service("GoogleAdsService")
        with pytest.raises(GoogleAdsException) as caught:
            list(service.search(customer_id=customer_id, query=query))
        assert reasons(caught.value) == [("authorization_error", "USER_PERMISSION_DENIED")]
        assert caught.value.error.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_call_without_credentials_is_unauthenticated(running: tuple[Sandbox, int],
                                                       world: World) -> None:
    service = make_client(running[1], credentials=AnonymousCredentials()).get_service(
        "GoogleAdsService")
    with pytest.raises(api_exceptions.Unauthenticated) as caught:
        list(service.search(customer_id=world.accounts.google_ads_customer_id,
                            query="SELECT campaign.id FROM campaign"))
    assert "missing required authentication credential" in caught.value.message


# -- faults and the request counter ---------------------------------------------------------
def test_injected_rate_limit_surfaces_as_resource_exhausted(sandbox: Sandbox, service: Any,
                                                            world: World) -> None:
    sandbox.inject("google_ads", "rate_limit", retry_after=7)
    query = "SELECT campaign.id FROM campaign"
    # the client leaves RESOURCE_EXHAUSTED to api_core, which maps it to its own exception
    with pytest.raises(api_exceptions.ResourceExhausted) as caught:
        list(service.search(customer_id=world.accounts.google_ads_customer_id, query=query))
    call: Any = caught.value.response
    assert call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    failure = GoogleAdsFailure.deserialize(dict(call.trailing_metadata())[FAILURE_KEY])
    details = failure.errors[0].details.quota_error_details
    assert failure.errors[0].error_code.quota_error.name == "RESOURCE_TEMPORARILY_EXHAUSTED"
    assert details.retry_delay.total_seconds() == 7
    assert len(list(service.search(customer_id=world.accounts.google_ads_customer_id,
                                   query=query))) == len(world.campaigns_on("google_ads"))


@pytest.mark.parametrize(("kind", "raised"), [
    ("exhausted", api_exceptions.ResourceExhausted),
    ("server_error", api_exceptions.ServiceUnavailable)])
def test_other_faults(sandbox: Sandbox, service: Any, world: World, kind: Any,
                      raised: type[Exception]) -> None:
    sandbox.inject("google_ads", kind)
    with pytest.raises(raised):
        stream(service, world, "SELECT campaign.id FROM campaign")


def test_every_call_counts_once(sandbox: Sandbox, service: Any, world: World) -> None:
    query = "SELECT campaign.id FROM campaign"
    stream(service, world, query)
    stream(service, world, query)
    list(service.search(customer_id=world.accounts.google_ads_customer_id, query=query))
    sandbox.inject("google_ads", "slow", delay=0.01)
    with pytest.raises(GoogleAdsException):
        stream(service, world, "SELECT campaign.nope FROM campaign")
    assert sandbox.requests("google_ads") == {"google_ads.Search": 1,
                                              "google_ads.SearchStream": 3}
