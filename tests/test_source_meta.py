"""The Meta source, driven through the real facebook-business SDK against the Graph simulator."""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from facebook_business.exceptions import FacebookRequestError
from pydantic import SecretStr

from convsync import pipeline
from convsync.model import Basis, ConversionMap, ConversionStat, Kind, Platform
from convsync.retry import retrying
from convsync.sandbox.control import Sandbox
from convsync.sandbox.meta import serve_meta
from convsync.sandbox.world import (
    LEAD,
    META_ACTION_TYPES,
    PURCHASE,
    VIEW,
    Accounts,
    World,
    WorldSpec,
)
from convsync.settings import ClientConfig, Secrets
from convsync.sources import Requests, Stream, meta
from convsync.store import Store

ACCOUNTS = Accounts(meta_tz="Australia/Sydney", currency="AUD")
"""Not the config's defaults (UTC, USD): rows can only carry these by asking the account."""
SPEC = WorldSpec(seed=5, start=dt.date(2026, 9, 1), days=30, campaigns=8, accounts=ACCOUNTS)
ACCOUNT = ACCOUNTS.meta_ad_account_id
WINDOWS = ["7d_click", "1d_view"]
CONVERSIONS: list[dict[str, Any]] = [
    {"name": "purchase", "kind": "macro", "meta": "offsite_conversion.fb_pixel_purchase"},
    {"name": "add_to_cart", "kind": "micro", "meta": "offsite_conversion.fb_pixel_add_to_cart"},
    {"name": "begin_checkout", "kind": "micro", "meta": "omni_initiated_checkout"},
    {"name": "product_view", "kind": "micro", "meta": "view_content"},
    {"name": "newsletter_signup", "kind": "micro", "meta": "complete_registration"},
]
"""Every ladder event mapped through one of its views; the lead form is left unmapped."""
MAPPED = {step: (c["meta"], c["name"]) for c in CONVERSIONS
          for step, types in META_ACTION_TYPES.items() if c["meta"] in types}

Key = tuple[dt.date, str, str, str]
"""(date, campaign id, action type, window)."""
Cell = tuple[float, float, str | None]
"""(count, value, canonical conversion)."""


@dataclass
class Graph:
    url: str
    sandbox: Sandbox
    world: World
    waits: list[float] = field(default_factory=list)
    """What the retries slept."""
    pauses: list[float] = field(default_factory=list)
    """What the pacer slept."""


@contextmanager
def serving(world: World, **options: Any) -> Iterator[Graph]:
    sandbox = Sandbox(world)
    server, _ = serve_meta(sandbox, **options)
    try:
        yield Graph(f"http://127.0.0.1:{server.server_port}", sandbox, world)
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def graph() -> Iterator[Graph]:
    with serving(World(SPEC)) as served:
        yield served


@pytest.fixture(autouse=True)
def clean(graph: Graph) -> Iterator[None]:
    graph.sandbox.reset_requests()
    graph.waits.clear()
    graph.pauses.clear()
    yield
    graph.sandbox.clear_faults()


def config(url: str, *, report_time: str = "impression", accounts: list[str] | None = None,
           conversions: list[dict[str, Any]] | None = None) -> ClientConfig:
    return ClientConfig.model_validate({
        "client": {"name": "meta test"},
        "meta": {"ad_account_ids": accounts or [ACCOUNT], "endpoint": url,
                 "attribution_windows": WINDOWS, "action_report_time": report_time},
        "conversions": CONVERSIONS if conversions is None else conversions})


def stream(graph: Graph, requests: Requests | None = None, *, pacer: meta.Pacer | None = None,
           **options: Any) -> Stream:
    settings = options.pop("settings", None) or config(graph.url, **options.pop("cfg", {}))
    [only] = meta.streams(settings, Secrets(meta_access_token=SecretStr("t")),
                          ConversionMap(settings.definitions()), requests or Requests(),
                          pacer=pacer or meta.Pacer(sleep=graph.pauses.append), **options)
    return only


def pull(graph: Graph, stream_: Stream | None = None) -> list[ConversionStat]:
    stream_ = stream_ or stream(graph)
    assert not stream_.ordered  # Graph documents no row order: no mid-range progress marks
    rows = list(stream_.pull(graph.world.start, graph.world.end))
    assert all(isinstance(r, ConversionStat) for r in rows)
    return [r for r in rows if isinstance(r, ConversionStat)]


def pull_retrying(graph: Graph, stream_: Stream) -> list[ConversionStat]:
    for attempt in retrying(meta.RETRY, sleep=graph.waits.append):
        with attempt:
            return pull(graph, stream_)
    raise AssertionError("retrying gave up without raising")


def expected(world: World, report_time: str = "impression",
             mapped: dict[int, tuple[str, str]] = MAPPED) -> dict[Key, Cell]:
    """The world's truth as the source should store it: a mapped event under its mapped name
    only, an unmapped one under each of Meta's names, clicks and landing page views as the
    simulator counts them (click windows only)."""
    out: dict[Key, Cell] = {}
    for insight in world.meta_insights(world.start, world.end, report_time=report_time):
        key = (insight.date, insight.campaign.id)
        for step, types in META_ACTION_TYPES.items():
            name, conversion = mapped.get(step, ("", None))
            for window in WINDOWS:
                count = insight.actions.get(step, {}).get(window, 0)
                value = insight.values.get(step, {}).get(window, 0.0)
                for action_type in [name] if name else types:
                    if count or value:
                        out[(*key, action_type, window)] = (count, value, conversion)
        landing = insight.actions.get(VIEW, {}).get("1d_click", 0)
        for window in (w for w in WINDOWS if w.endswith("_click")):
            for action_type, count in (("link_click", insight.clicks),
                                       ("landing_page_view", landing)):
                if count:
                    out[(*key, action_type, window)] = (count, 0.0, None)
    return out


def cells(rows: list[ConversionStat]) -> dict[Key, Cell]:
    out = {(r.date, r.campaign_id, r.platform_conversion, r.window): (r.count, r.value,
                                                                      r.conversion)
           for r in rows}
    assert len(out) == len(rows), "one row per (day, campaign, action type, window)"
    return out


def assert_cells(got: dict[Key, Cell], want: dict[Key, Cell]) -> None:
    assert set(got) == set(want)
    for key, (count, value, conversion) in want.items():
        assert got[key][0] == count, key
        assert got[key][1] == pytest.approx(value), key
        assert got[key][2] == conversion, key


# -- rows against the world ---------------------------------------------------------------------

def test_rows_match_the_world_per_day_campaign_action_and_window(graph: Graph,
                                                                 tmp_path: Path) -> None:
    rows = pull(graph)
    want = expected(graph.world)
    assert_cells(cells(rows), want)
    names = {c.id: c.name for c in graph.world.campaigns_on("meta")}
    for row in rows:
        assert (row.platform, row.account_id, row.basis) == (Platform.META, ACCOUNT,
                                                              Basis.CLICK_DATE)
        assert (row.timezone, row.currency) == ("Australia/Sydney", "AUD")
        assert row.campaign_name == names[row.campaign_id]
    assert [r.date for r in rows] == sorted(r.date for r in rows)
    kinds = {r.conversion: r.kind for r in rows}
    assert kinds["purchase"] is Kind.MACRO and kinds["add_to_cart"] is Kind.MICRO
    # built unvalidated on the hot path, yet exactly what validation makes
    assert all(r == ConversionStat.model_validate(r.model_dump()) for r in rows)
    with Store.open(f"sqlite:///{tmp_path}/store.db") as store:
        store.upsert_stats(rows)
        stored = list(store.stats(platform=Platform.META))
    assert_cells(cells(stored), want)
    assert {(r.timezone, r.currency, r.basis) for r in stored} == {
        ("Australia/Sydney", "AUD", Basis.CLICK_DATE)}


def test_views_of_a_mapped_event_are_never_stored(graph: Graph) -> None:
    rows = pull(graph)
    purchases = [r for r in rows if meta.action_family(r.platform_conversion) == "purchase"]
    assert {r.platform_conversion for r in purchases} == {"offsite_conversion.fb_pixel_purchase"}
    checkouts = {r.platform_conversion for r in rows if r.conversion == "begin_checkout"}
    assert checkouts == {"omni_initiated_checkout"}  # the irregular omni name is the mapped one
    truth = sum(i.actions.get(PURCHASE, {}).get("7d_click", 0)
                for i in graph.world.meta_insights(graph.world.start, graph.world.end))
    assert truth > 0
    assert sum(r.count for r in purchases if r.window == "7d_click") == truth


def test_unmapped_action_types_are_kept_under_each_of_their_names(graph: Graph) -> None:
    unmapped = {r.platform_conversion for r in pull(graph) if r.conversion is None}
    assert unmapped == {*META_ACTION_TYPES[LEAD], "link_click", "landing_page_view"}


def test_views_mapped_twice_store_the_first_listed_one(graph: Graph) -> None:
    twice = [{"name": "purchase", "kind": "macro",
              "meta": ["omni_purchase", "offsite_conversion.fb_pixel_purchase"]}]
    rows = pull(graph, stream(graph, cfg={"conversions": twice}))
    purchases = {r.platform_conversion for r in rows if r.conversion == "purchase"}
    assert purchases == {"omni_purchase"}
    mapped = {PURCHASE: ("omni_purchase", "purchase")}
    assert_cells(cells(rows), expected(graph.world, mapped=mapped))


def test_conversion_report_time_files_under_the_conversion_date(graph: Graph) -> None:
    rows = pull(graph, stream(graph, cfg={"report_time": "conversion"}))
    assert {r.basis for r in rows} == {Basis.CONVERSION_DATE}
    by_conversion = expected(graph.world, "conversion")
    assert_cells(cells(rows), by_conversion)
    assert by_conversion != expected(graph.world)  # lagged purchases moved day


def test_mixed_report_time_files_on_meta_actions_by_impression() -> None:
    assert meta.report_basis("link_click", "mixed") is Basis.CLICK_DATE
    assert meta.report_basis("offsite_conversion.fb_pixel_purchase", "mixed") is (
        Basis.CONVERSION_DATE)
    assert meta.report_basis("omni_purchase", "impression") is Basis.CLICK_DATE


def test_late_conversions_are_picked_up_by_a_second_pull(tmp_path: Path) -> None:
    spec = WorldSpec(seed=8, start=dt.date(2026, 9, 1), days=20, campaigns=6,
                     as_of=dt.datetime(2026, 9, 21, tzinfo=dt.UTC))
    world = World(spec)
    with serving(world) as served, Store.open(f"sqlite:///{tmp_path}/s.db") as store:
        source = stream(served)
        store.upsert_stats(pull(served, source))
        first = cells(list(store.stats(platform=Platform.META)))
        world.advance(10)
        store.upsert_stats(pull(served, source))
        second = cells(list(store.stats(platform=Platform.META)))
    assert_cells(second, expected(world))
    late = sum(second[k][0] for k in second) - sum(first[k][0] for k in first)
    assert late > 0


# -- requests -----------------------------------------------------------------------------------

def insight_rows(world: World) -> int:
    return sum(1 for _ in world.meta_insights(world.start, world.end))


def test_requests_are_the_minimum_and_the_account_is_asked_once(graph: Graph) -> None:
    requests = Requests()
    source = stream(graph, requests, page_size=7)
    pull(graph, source)
    rows = insight_rows(graph.world)
    assert requests.total == meta.min_requests([rows], page_size=7) == 1 + math.ceil(rows / 7)
    assert requests.counts == {"node": 1, "insights": math.ceil(rows / 7)}
    assert graph.sandbox.requests("meta") == {"meta.account": 1,
                                              "meta.insights": math.ceil(rows / 7)}
    pull(graph, source)  # a second pull (a retry, another chunk) reuses the account
    assert requests.counts["node"] == 1


def test_default_pages_take_the_whole_range_in_one_request(graph: Graph) -> None:
    requests = Requests()
    pull(graph, stream(graph, requests))
    assert insight_rows(graph.world) <= meta.PAGE_SIZE
    assert requests.total == meta.min_requests([insight_rows(graph.world)]) == 2


def test_rows_stream_page_by_page(graph: Graph) -> None:
    requests = Requests()
    rows = stream(graph, requests, page_size=5).pull(graph.world.start, graph.world.end)
    next(rows)
    assert requests.counts == {"node": 1, "insights": 1}


# -- errors and retries -------------------------------------------------------------------------

@pytest.mark.parametrize("warm", [False, True], ids=["account", "insights"])
def test_a_throttle_is_retried_after_the_time_meta_asks(graph: Graph, warm: bool) -> None:
    """The ads-management throttle (code 80004) on the account, or the ads-insights one
    (80000) on the insights once the account is known."""
    requests = Requests()
    source = stream(graph, requests)
    if warm:
        pull(graph, source)
    graph.sandbox.inject("meta", "rate_limit", retry_after=90)
    rows = pull_retrying(graph, source)
    assert graph.waits == [120.0]  # estimated_time_to_regain_access: 2 minutes
    assert_cells(cells(rows), expected(graph.world))
    # the throttled call counts too
    assert requests.counts == ({"node": 1, "insights": 3} if warm
                               else {"node": 2, "insights": 1})


@pytest.mark.parametrize(("kind", "code"), [("exhausted", 4), ("server_error", 2)])
def test_transient_errors_are_retried(graph: Graph, kind: Any, code: int) -> None:
    source = stream(graph)
    graph.sandbox.inject("meta", kind)
    with pytest.raises(FacebookRequestError) as caught:
        pull(graph, source)
    assert caught.value.api_error_code() == code and meta.RETRY.is_retryable(caught.value)
    graph.sandbox.inject("meta", kind)
    assert_cells(cells(pull_retrying(graph, source)), expected(graph.world))
    assert len(graph.waits) == 1
    if kind == "exhausted":  # the app's budget is used up: the pacer holds back the retry too
        assert graph.pauses == [pytest.approx(60, abs=1), pytest.approx(60, abs=1)]
    else:
        assert graph.pauses == []


def test_an_unknown_account_is_not_retried_and_says_what_to_fix(graph: Graph) -> None:
    requests = Requests()
    source = stream(graph, requests, cfg={"accounts": ["act_42"]})
    with pytest.raises(FacebookRequestError) as caught:
        pull_retrying(graph, source)
    assert (caught.value.api_error_code(), caught.value.api_error_subcode()) == (100, 33)
    assert graph.waits == [] and requests.total == 1
    assert "meta.ad_account_ids" in (meta.explain(caught.value) or "")


def test_a_throttle_longer_than_a_run_can_wait_is_reported_not_retried(graph: Graph) -> None:
    graph.sandbox.inject("meta", "rate_limit", retry_after=3600)
    with pytest.raises(FacebookRequestError) as caught:
        pull_retrying(graph, stream(graph))
    assert graph.waits == []
    assert "60 min" in (meta.explain(caught.value) or "")


def test_a_page_too_big_is_asked_again_in_smaller_pages() -> None:
    """60 rows of about 2 KB: 400 and 100 rows a page are refused, 25 go through."""
    world = World(SPEC)
    with serving(world, max_page_bytes=60_000) as served:
        requests = Requests()
        rows = pull_retrying(served, stream(served, requests, page_size=400))
    assert_cells(cells(rows), expected(world))
    assert len(served.waits) == 2
    assert requests.counts["insights"] == 2 + math.ceil(insight_rows(world) / 25)


def test_days_in_any_order_are_all_stored(tmp_path: Path) -> None:
    """Graph does not document the order of insights rows: a day after a later one is stored
    like any other, and the pipeline marks no day complete before the whole range is in."""
    account = meta.Account(ACCOUNT, "UTC", "USD")
    plan = meta.ActionPlan(ConversionMap([]), "impression")
    days = [dt.date(2026, 9, 1) + dt.timedelta(days=n % 7) for n in range(pipeline.BATCH_ROWS + 10)]
    rows = [{"date_start": day.isoformat(), "campaign_id": str(n),
             "actions": [{"action_type": "lead", "7d_click": "1"}]}
            for n, day in enumerate(reversed(days))]
    stream = Stream("meta", "insights", ACCOUNT,
                    lambda start, end: meta.stat_rows(rows, account, ["7d_click"], plan),
                    ordered=False)
    config = ClientConfig.model_validate({"client": {"name": "c", "timezone": "UTC"}})
    outcome = pipeline.PlatformPull(Platform.META)
    with Store.open(f"sqlite:///{tmp_path}/store.db") as store:
        marks = list(pipeline._commit_batches(config, store, stream, days[0], days[6],
                                              pipeline._Tally(outcome)))
        assert marks == []
        assert store.count_rows("daily_stats") == len(rows) == outcome.rows
        ordered = dataclasses.replace(stream, ordered=True,
                                      pull=lambda start, end: iter(sorted(
                                          meta.stat_rows(rows, account, ["7d_click"], plan),
                                          key=lambda s: s.date)))
        assert list(pipeline._commit_batches(config, store, ordered, days[0], days[6],
                                             pipeline._Tally(pipeline.PlatformPull(
                                                 Platform.META))))


# -- pacing -------------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_requests_slow_down_once_usage_passes_the_threshold() -> None:
    """Usage rises 12.5 points a call here: from the call that reports 88% the next ones wait,
    longer as usage climbs, before any throttling."""
    with serving(World(SPEC), calls_per_hour=8) as served:
        pacer = meta.Pacer(sleep=served.waits.append, clock=Clock())
        rows = pull(served, stream(served, pacer=pacer, page_size=5))
        assert_cells(cells(rows), expected(served.world))
    usage = [min(99, math.ceil(n * 100 / 8)) for n in range(1, 20)]
    want = [60.0 * (u - 75) / 25 for u in usage if u > 75]
    assert served.waits == pytest.approx(want[:len(served.waits)])
    assert len(served.waits) >= 3 and served.waits == sorted(served.waits)
    assert served.waits[-1] < pacer.max_pause  # the sandbox reports at most 99%


def test_usage_is_the_highest_share_of_any_budget() -> None:
    headers = {
        "x-app-usage": '{"call_count": 12, "total_cputime": 3, "total_time": 5}',
        "x-business-use-case-usage": '{"1029384756": [{"type": "ads_insights", '
                                     '"call_count": 40, "total_cputime": 81, "total_time": 7, '
                                     '"estimated_time_to_regain_access": 3}]}',
        "x-fb-ads-insights-throttle": '{"app_id_util_pct": 9.5, "acc_id_util_pct": 30}',
    }
    assert meta.usage_percent(headers) == 81
    assert meta.regain_seconds(headers) == 180
    assert meta.usage_percent({"x-app-usage": "not json"}) == 0
    assert meta.regain_seconds({}) is None


def test_a_pause_counts_the_time_already_gone() -> None:
    clock, waits = Clock(), list[float]()
    pacer = meta.Pacer(sleep=waits.append, clock=clock)
    pacer.record({"x-app-usage": '{"call_count": 100}'})
    clock.now = 45.0
    pacer.wait()
    pacer.record({"x-app-usage": '{"call_count": 50}'})
    pacer.wait()
    assert waits == [15.0]
