"""The Meta Graph API simulator, driven by the real facebook-business SDK over HTTP."""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from facebook_business.adobjects.adaccount import AdAccount
from facebook_business.adobjects.adreportrun import AdReportRun
from facebook_business.adobjects.campaign import Campaign as CampaignObject
from facebook_business.api import FacebookAdsApi
from facebook_business.exceptions import FacebookRequestError
from facebook_business.session import FacebookSession

from convsync.model import META_DEFAULT_WINDOWS
from convsync.sandbox.control import Sandbox
from convsync.sandbox.meta import MetaGraph, serve_meta
from convsync.sandbox.world import (
    META_ACTION_TYPES,
    PURCHASE,
    VIEW,
    Day,
    MetaInsight,
    World,
    WorldSpec,
)

TOKEN = "sandbox-meta-token"
WINDOWS = ["1d_click", "7d_click", "28d_click", "1d_view"]
FIELDS = ["campaign_id", "campaign_name", "impressions", "clicks", "spend", "actions",
          "action_values"]
CALLS_PER_HOUR = 300


@dataclass
class Meta:
    sandbox: Sandbox
    graph: MetaGraph
    account: AdAccount
    world: World


@contextmanager
def graph_api(sandbox: Sandbox) -> Iterator[tuple[MetaGraph, str]]:
    """Serve ``sandbox`` and point the SDK at it; the SDK's globals are restored afterwards."""
    server, graph = serve_meta(sandbox, calls_per_hour=CALLS_PER_HOUR)
    previous_graph, previous_api = FacebookSession.GRAPH, FacebookAdsApi.get_default_api()
    url = f"http://127.0.0.1:{server.server_port}"
    FacebookSession.GRAPH = url
    FacebookAdsApi.init(access_token=TOKEN, api_version="v26.0", timeout=20, crash_log=False)
    try:
        yield graph, url
    finally:
        FacebookSession.GRAPH = previous_graph
        FacebookAdsApi.set_default_api(previous_api)
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def meta(world: World) -> Iterator[Meta]:
    sandbox = Sandbox(world)
    with graph_api(sandbox) as (graph, _):
        yield Meta(sandbox, graph, AdAccount(world.accounts.meta_ad_account_id), world)


@pytest.fixture(autouse=True)
def clean(meta: Meta) -> Iterator[None]:
    meta.sandbox.reset_requests()
    yield
    meta.sandbox.clear_faults()


def full_range(world: World) -> dict[str, str]:
    return {"since": world.start.isoformat(), "until": world.end.isoformat()}


def daily(meta: Meta, **params: Any) -> list[dict[str, Any]]:
    base = {"level": "campaign", "time_increment": "1", "time_range": full_range(meta.world),
            "action_attribution_windows": WINDOWS, "limit": 500}
    rows = meta.account.get_insights(fields=FIELDS, params={**base, **params})
    return [row.export_all_data() for row in rows]


def by_type(entries: list[dict[str, str]] | None) -> dict[str, dict[str, float]]:
    return {e["action_type"]: {k: float(v) for k, v in e.items() if k != "action_type"}
            for e in entries or []}


def expected_stats(per_step: dict[int, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """What Graph lists for one row: value under 7d_click + 1d_view, non-zero windows."""
    out: dict[str, dict[str, float]] = {}
    for step, types in META_ACTION_TYPES.items():
        counts = per_step.get(step, {})
        stat = {w: float(counts[w]) for w in WINDOWS if counts.get(w)}
        value = sum(counts.get(w, 0) for w in META_DEFAULT_WINDOWS)
        if value or stat:
            out.update({t: {"value": float(value), **stat} for t in types})
    return out


def conversions_only(stats: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {t: s for t, s in stats.items() if t not in ("link_click", "landing_page_view")}


def rounded(stats: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {t: {k: round(v, 2) for k, v in s.items()} for t, s in stats.items()}


def truth(world: World, report_time: str = "impression") -> dict[tuple[str, str], MetaInsight]:
    return {(i.date.isoformat(), i.campaign.id): i
            for i in world.meta_insights(world.start, world.end, report_time=report_time)}


def assert_rows_match(rows: list[dict[str, Any]], expected: dict[tuple[str, str], MetaInsight]
                      ) -> None:
    assert {(r["date_start"], r["campaign_id"]) for r in rows} == set(expected)
    assert len(rows) == len(expected)
    for row in rows:
        insight = expected[(row["date_start"], row["campaign_id"])]
        assert row["date_stop"] == row["date_start"]
        assert row["campaign_name"] == insight.campaign.name
        assert (int(row["clicks"]), int(row["impressions"])) == (insight.clicks,
                                                                   insight.impressions)
        assert float(row["spend"]) == pytest.approx(insight.spend)
        actions = by_type(row.get("actions"))
        assert conversions_only(actions) == expected_stats(insight.actions)
        assert rounded(by_type(row.get("action_values"))) == rounded(
            expected_stats(insight.values))
        if insight.clicks:
            assert actions["link_click"] == {"value": insight.clicks,
                                             **dict.fromkeys(WINDOWS[:3], insight.clicks)}


# -- insights ----------------------------------------------------------------------------
def test_daily_campaign_actions_match_the_world_in_every_window(meta: Meta) -> None:
    rows = daily(meta)
    assert_rows_match(rows, truth(meta.world))
    assert {r["campaign_id"] for r in rows} == {c.id for c in meta.world.campaigns_on("meta")}
    assert all(isinstance(e["value"], str) for r in rows for e in r.get("actions", []))


def test_purchase_action_types_are_views_of_the_same_events(meta: Meta) -> None:
    rows = [r for r in daily(meta) if "purchase" in by_type(r.get("actions"))]
    assert rows, "the world should have purchases"
    for row in rows:
        for stats in (by_type(row["actions"]), by_type(row.get("action_values"))):
            views = [stats[t] for t in META_ACTION_TYPES[PURCHASE]]
            assert all(v == views[0] for v in views)


def test_small_pages_return_every_row_exactly_once(meta: Meta) -> None:
    whole = [(r["date_start"], r["campaign_id"]) for r in daily(meta)]
    meta.sandbox.reset_requests()
    paged = [(r["date_start"], r["campaign_id"]) for r in daily(meta, limit=7)]
    assert paged == whole
    assert len(set(paged)) == len(paged)
    assert meta.sandbox.requests("meta") == {"meta.insights": math.ceil(len(whole) / 7)}


def test_conversion_report_time_files_lagged_conversions_on_their_own_day(meta: Meta) -> None:
    by_click = truth(meta.world, "impression")
    by_conversion = truth(meta.world, "conversion")
    assert_rows_match(daily(meta, action_report_time="conversion"), by_conversion)
    assert_rows_match(daily(meta, action_report_time="mixed"), by_conversion)

    def purchases(view: dict[tuple[str, str], MetaInsight]) -> dict[tuple[str, str], int]:
        return {k: i.actions.get(PURCHASE, {}).get("28d_click", 0) for k, i in view.items()}

    assert purchases(by_click) != purchases(by_conversion)  # lagged purchases move day


def test_account_level_monthly_rows_sum_the_campaign_days(meta: Meta) -> None:
    world = meta.world
    rows = meta.account.get_insights(fields=["account_id", "clicks", "actions"], params={
        "level": "account", "time_increment": "monthly", "time_range": full_range(world),
        "action_attribution_windows": ["28d_click"]})
    got = [r.export_all_data() for r in rows]
    months = sorted({(d.year, d.month) for d in (world.start, world.end)})
    assert [r["date_start"][:7] for r in got] == [f"{y}-{m:02d}" for y, m in months]
    assert got[0]["date_start"] == world.start.isoformat()
    assert got[-1]["date_stop"] == world.end.isoformat()
    for row in got:
        month = [i for i in truth(world).values()
                 if row["date_start"] <= i.date.isoformat() <= row["date_stop"]]
        assert row["account_id"] == world.accounts.meta_ad_account_id.removeprefix("act_")
        assert int(row["clicks"]) == sum(i.clicks for i in month)
        purchases = sum(i.actions.get(PURCHASE, {}).get("28d_click", 0) for i in month)
        assert by_type(row["actions"])["purchase"]["28d_click"] == purchases


def test_filtering_one_campaign_over_all_days(meta: Meta) -> None:
    campaign = meta.world.campaigns_on("meta")[0]
    rows = meta.account.get_insights(fields=["campaign_id", "clicks", "spend"], params={
        "level": "campaign", "time_range": full_range(meta.world),
        "filtering": [{"field": "campaign.id", "operator": "IN", "value": [campaign.id]}]})
    got = [r.export_all_data() for r in rows]
    mine = [i for i in truth(meta.world).values() if i.campaign.id == campaign.id]
    assert len(got) == 1
    assert got[0]["campaign_id"] == campaign.id
    assert int(got[0]["clicks"]) == sum(i.clicks for i in mine)
    assert float(got[0]["spend"]) == pytest.approx(sum(i.spend for i in mine))


def test_date_preset_is_relative_to_the_world_clock_in_the_account_time_zone(meta: Meta) -> None:
    world = meta.world
    today = world.as_of.astimezone(ZoneInfo(world.accounts.meta_tz)).date()
    rows = meta.account.get_insights(fields=["clicks"], params={"date_preset": "last_7d"})
    row = next(iter(rows)).export_all_data()
    assert row["date_start"] == (today - dt.timedelta(days=7)).isoformat()
    assert row["date_stop"] == (today - dt.timedelta(days=1)).isoformat()
    week = [i for i in truth(world).values()
            if row["date_start"] <= i.date.isoformat() <= row["date_stop"]]
    assert int(row["clicks"]) == sum(i.clicks for i in week)


def test_async_report_run_serves_the_same_rows(meta: Meta) -> None:
    params = {"level": "campaign", "time_increment": "1", "time_range": full_range(meta.world),
              "action_attribution_windows": WINDOWS}
    job = meta.account.get_insights(fields=list(FIELDS), params=params, is_async=True)
    job = job.api_get()
    assert job[AdReportRun.Field.async_status] == "Job Completed"
    assert job[AdReportRun.Field.async_percent_completion] == 100
    rows = [r.export_all_data() for r in job.get_result(params={"limit": 11})]
    assert_rows_match(rows, truth(meta.world))
    requests = meta.sandbox.requests("meta")
    assert requests["meta.insights.async"] == 1
    assert requests["meta.report_run.insights"] == math.ceil(len(rows) / 11)


# -- nodes and edges ---------------------------------------------------------------------
def test_ad_account_node_reports_time_zone_currency_and_attribution(meta: Meta) -> None:
    account = meta.account.api_get(fields=["name", "currency", "timezone_name", "account_id",
                                           "attribution_spec"])
    accounts = meta.world.accounts
    assert account["id"] == accounts.meta_ad_account_id
    assert account["currency"] == accounts.currency
    assert account["timezone_name"] == accounts.meta_tz
    assert account["attribution_spec"] == [{"event_type": "CLICK_THROUGH", "window_days": 7},
                                           {"event_type": "VIEW_THROUGH", "window_days": 1}]


def test_campaigns_edge_pages_through_the_meta_campaigns(meta: Meta) -> None:
    cursor = meta.account.get_campaigns(fields=["name", "status", "objective"],
                                        params={"limit": 1})
    got = [(c["id"], c["name"], c["status"]) for c in cursor]
    assert got == [(c.id, c.name, "ACTIVE") for c in meta.world.campaigns_on("meta")]
    assert meta.sandbox.requests("meta") == {"meta.campaigns": len(got)}
    first = meta.world.campaigns_on("meta")[0]
    campaign = CampaignObject(first.id).api_get(fields=["name", "objective"])
    assert (campaign["name"], campaign["objective"]) == (first.name, "OUTCOME_SALES")


# -- errors ------------------------------------------------------------------------------
@pytest.mark.parametrize("window", ["7d_view", "28d_view"])
def test_removed_view_windows_are_refused_with_a_graph_error(meta: Meta, window: str) -> None:
    with pytest.raises(FacebookRequestError) as caught:
        daily(meta, action_attribution_windows=["7d_click", window])
    error = caught.value
    assert (error.http_status(), error.api_error_code(), error.api_error_type()) == (
        400, 100, "OAuthException")
    assert window in error.api_error_message()
    assert "no longer supported" in error.api_error_message()


def test_unknown_ad_account_is_a_graph_method_exception(meta: Meta) -> None:
    with pytest.raises(FacebookRequestError) as caught:
        AdAccount("act_42").get_insights(fields=["clicks"])
    error = caught.value
    assert (error.api_error_code(), error.api_error_subcode()) == (100, 33)
    assert error.api_error_type() == "GraphMethodException"
    assert "act_42" in error.api_error_message()


def test_unsimulated_breakdowns_are_refused_not_ignored(meta: Meta) -> None:
    with pytest.raises(FacebookRequestError) as caught:
        daily(meta, breakdowns=["age"])
    assert caught.value.api_error_code() == 100
    assert "breakdowns" in caught.value.api_error_message()


@pytest.mark.parametrize(("token", "code", "subcode"), [(None, 104, None), ("expired", 190, 463)])
def test_missing_or_expired_token(meta: Meta, token: str | None, code: int,
                                  subcode: int | None) -> None:
    api = FacebookAdsApi(FacebookSession(access_token=token), api_version="v26.0")
    with pytest.raises(FacebookRequestError) as caught:
        AdAccount(meta.world.accounts.meta_ad_account_id, api=api).api_get(fields=["name"])
    error = caught.value
    assert (error.api_error_code(), error.api_error_subcode()) == (code, subcode)
    assert error.api_error_type() == "OAuthException"
    assert "Facebook Platform" in error.http_headers()["WWW-Authenticate"]


# -- faults and usage headers ------------------------------------------------------------
def business_usage(headers: Any, account: str) -> dict[str, Any]:
    usage: dict[str, Any] = json.loads(headers["x-business-use-case-usage"])[account][0]
    return usage


def test_injected_rate_limit_is_the_ads_insights_throttle(meta: Meta) -> None:
    meta.sandbox.inject("meta", "rate_limit", retry_after=90)
    with pytest.raises(FacebookRequestError) as caught:
        daily(meta)
    error = caught.value
    assert (error.http_status(), error.api_error_code(), error.api_error_subcode()) == (
        400, 80000, 2446079)
    assert error.api_transient_error() is True
    usage = business_usage(error.http_headers(), meta.graph.account_id)
    assert usage["type"] == "ads_insights"
    assert usage["call_count"] >= 100
    assert usage["estimated_time_to_regain_access"] == 2  # minutes, rounded up
    assert_rows_match(daily(meta), truth(meta.world))  # the retry goes through
    assert meta.sandbox.requests("meta") == {"meta.insights": 2}


@pytest.mark.parametrize(("kind", "status", "code"), [("exhausted", 400, 4),
                                                      ("server_error", 500, 2)])
def test_other_faults_are_transient_graph_errors(meta: Meta, kind: Any, status: int,
                                                 code: int) -> None:
    meta.sandbox.inject("meta", kind)
    with pytest.raises(FacebookRequestError) as caught:
        meta.account.api_get(fields=["name"])
    error = caught.value
    assert (error.http_status(), error.api_error_code()) == (status, code)
    assert error.api_transient_error() is True
    assert meta.account.api_get(fields=["name"])["name"]


def test_slow_fault_still_answers_correctly(meta: Meta) -> None:
    meta.sandbox.inject("meta", "slow", delay=0.05)
    assert_rows_match(daily(meta), truth(meta.world))


def test_usage_headers_rise_with_calls(meta: Meta) -> None:
    def app_usage() -> int:
        cursor = meta.account.get_insights(fields=["clicks"])
        return int(json.loads(cursor.headers()["x-app-usage"])["call_count"])

    before = app_usage()
    for _ in range(4):
        meta.account.api_get(fields=["name"])
    assert before < app_usage() < 100


# -- a year of 200 campaigns is served page by page ---------------------------------------
class CountingWorld(World):
    """Counts the UTC days it generates, to show pages do not need the whole range."""

    generated = 0

    def _generate_day(self, day_number: int) -> Day:
        self.generated += 1
        return super()._generate_day(day_number)


def test_year_backfill_pages_are_generated_on_demand() -> None:
    world = CountingWorld(WorldSpec(seed=3, start=dt.date(2025, 10, 1), days=365,
                                    campaigns=200))
    with graph_api(Sandbox(world)):
        cursor = AdAccount(world.accounts.meta_ad_account_id).get_insights(
            fields=["campaign_id", "clicks", "actions"],
            params={"level": "campaign", "time_increment": "1", "limit": 25,
                    "time_range": full_range(world)})
        rows = [next(cursor).export_all_data() for _ in range(60)]  # three pages
    assert world.generated < 10
    meta_campaigns = len(world.campaigns_on("meta"))
    assert [r["date_start"] for r in rows] == [world.start.isoformat()] * 60
    assert len({r["campaign_id"] for r in rows}) == 60 < meta_campaigns
    first = truth_day(world, world.start)
    for row in rows:
        assert int(row["clicks"]) == first[row["campaign_id"]].clicks
        landing = by_type(row["actions"]).get("landing_page_view", {}).get("value", 0)
        assert landing == first[row["campaign_id"]].actions.get(VIEW, {}).get("1d_click", 0)


def truth_day(world: World, day: dt.date) -> dict[str, MetaInsight]:
    return {i.campaign.id: i for i in world.meta_insights(day, day)}


def test_world_has_lagged_purchases_for_the_report_time_test(world: World) -> None:
    """Guards the fixture: the report-time test is only meaningful with lagged purchases."""
    insights = list(world.meta_insights(world.start, world.end))
    lagged = sum(i.actions.get(PURCHASE, {}).get("28d_click", 0)
                 - i.actions.get(PURCHASE, {}).get("1d_click", 0) for i in insights)
    assert lagged > 0
