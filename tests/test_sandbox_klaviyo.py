"""The Klaviyo simulator, driven by the real klaviyo-api SDK over loopback HTTP.

Ground truth is always the world's own view (``World.klaviyo_*``), computed directly."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from klaviyo_api import KlaviyoAPI
from openapi_client.exceptions import ApiException
from openapi_client.models import (
    GetAccountResponseCollection,
    GetAccounts4XXResponse,
    GetEventResponseCollectionCompoundDocument,
    GetMetricResponseCollectionCompoundDocument,
    PostMetricAggregateResponse,
)

from convsync.sandbox.control import Sandbox
from convsync.sandbox.http import serve_rest
from convsync.sandbox.klaviyo import KlaviyoApi, serve_klaviyo
from convsync.sandbox.world import KlaviyoEvent, KlaviyoMetric, World, WorldSpec

KEY = "pk_sandbox_0123456789"
FAST = {"USE_DICTIONARY_FOR_RESPONSE_DATA": True}
WEEK = (dt.datetime(2026, 9, 10, tzinfo=dt.UTC), dt.datetime(2026, 9, 17, tzinfo=dt.UTC))


@pytest.fixture
def live(klaviyo_served: tuple[Sandbox, str]) -> Iterator[Sandbox]:
    """The served sandbox; faults a test leaves unconsumed are dropped after it."""
    yield klaviyo_served[0]
    klaviyo_served[0].clear_faults()


@pytest.fixture
def fast(klaviyo_served: tuple[Sandbox, str]) -> KlaviyoAPI:
    return KlaviyoAPI(KEY, test_host=klaviyo_served[1], max_retries=0, options=FAST)


@pytest.fixture
def typed(klaviyo_served: tuple[Sandbox, str]) -> KlaviyoAPI:
    return KlaviyoAPI(KEY, test_host=klaviyo_served[1], max_retries=0)


def metric_named(world: World, name: str) -> KlaviyoMetric:
    return next(m for m in world.klaviyo_metrics if m.name == name)


def window_filter(metric: KlaviyoMetric | None, start: dt.datetime, end: dt.datetime) -> str:
    parts = [f'equals(metric_id,"{metric.id}")'] if metric else []
    parts += [f"greater-or-equal(datetime,{start.isoformat()})",
              f"less-than(datetime,{end.isoformat()})"]
    return ",".join(parts)


def all_pages(client: KlaviyoAPI, cursor: str | None = None,
              **kwargs: Any) -> list[dict[str, Any]]:
    """Every page of get_events from ``cursor`` on, passing links.next back as page_cursor
    (the way the SDK documents paging)."""
    pages = [client.Events.get_events(**kwargs, page_cursor=cursor)]
    while pages[-1]["links"]["next"]:
        pages.append(client.Events.get_events(**kwargs, page_cursor=pages[-1]["links"]["next"]))
    return pages


def wire_view(event: KlaviyoEvent) -> tuple[str, int, float, str, str]:
    return (event.id, int(event.timestamp), event.value, event.profile_id, event.email)


def served_view(pages: list[dict[str, Any]]) -> list[tuple[str, int, float, str, str]]:
    out = []
    for page in pages:
        emails = {p["id"]: p["attributes"]["email"] for p in page.get("included", [])
                  if p["type"] == "profile"}
        for event in page["data"]:
            attributes, profile = event["attributes"], event["relationships"]["profile"]["data"]
            out.append((event["id"], attributes["timestamp"],
                        float(attributes["event_properties"].get("$value", 0.0)),
                        profile["id"], emails[profile["id"]]))
    return out


def error_of(raised: pytest.ExceptionInfo[ApiException]) -> dict[str, Any]:
    errors = json.loads(raised.value.body)["errors"]
    assert len(errors) == 1
    return dict(errors[0])


# -- metrics ---------------------------------------------------------------------------------

def test_metrics_list_and_get_validate_and_match_the_world(typed: KlaviyoAPI,
                                                           world: World) -> None:
    page = typed.Metrics.get_metrics()
    assert isinstance(page, GetMetricResponseCollectionCompoundDocument)
    assert [(m.id, m.attributes.name) for m in page.data] == [
        (m.id, m.name) for m in world.klaviyo_metrics]
    assert page.links is not None and page.links.next is None
    one = typed.Metrics.get_metric("PlOrd4").data
    assert (one.id, one.attributes.name) == ("PlOrd4", "Placed Order")
    assert one.links.var_self.endswith("/api/metrics/PlOrd4/")


def test_metrics_filter_on_integration_name(fast: KlaviyoAPI) -> None:
    native = fast.Metrics.get_metrics(filter='equals(integration.name,"Klaviyo")')
    assert [m["attributes"]["name"] for m in native["data"]] == ["Subscribed to List"]
    shop = fast.Metrics.get_metrics(filter='equals(integration.category,"eCommerce")')
    assert {m["attributes"]["integration"]["key"] for m in shop["data"]} == {"shopify"}
    assert len(shop["data"]) == 4


def test_unknown_metric_is_a_json_api_404(typed: KlaviyoAPI) -> None:
    with pytest.raises(ApiException) as raised:
        typed.Metrics.get_metric("nope42")
    assert raised.value.status == 404
    assert error_of(raised)["code"] == "not_found"
    assert isinstance(raised.value.data, GetAccounts4XXResponse)


# -- events ----------------------------------------------------------------------------------

def test_a_week_of_events_paged_small_matches_the_world_one_for_one(fast: KlaviyoAPI,
                                                                     world: World) -> None:
    metric = metric_named(world, "Added to Cart")
    pages = all_pages(fast, filter=window_filter(metric, *WEEK), page_size=37,
                      include=["profile"])
    truth = [wire_view(e) for e in world.klaviyo_events(*WEEK, metric)]
    assert len(pages) == -(-len(truth) // 37) >= 5
    assert all(len(p["data"]) == 37 for p in pages[:-1])
    assert served_view(pages) == truth
    first = pages[0]["data"][0]
    assert first["attributes"]["datetime"] == dt.datetime.fromtimestamp(
        truth[0][1], dt.UTC).isoformat()
    assert first["relationships"]["metric"]["data"] == {"type": "metric", "id": metric.id}


def test_newest_first_across_all_metrics_is_the_world_reversed(fast: KlaviyoAPI,
                                                              world: World) -> None:
    start, end = WEEK[0], WEEK[0] + dt.timedelta(days=2)
    pages = all_pages(fast, filter=window_filter(None, start, end), sort="-datetime",
                      page_size=150, include=["profile", "metric"])
    truth = [wire_view(e) for e in world.klaviyo_events(start, end)]
    assert len(pages) > 2
    assert served_view(pages) == truth[::-1]
    metrics = {r["id"] for p in pages for r in p["included"] if r["type"] == "metric"}
    assert metrics == {m.id for m in world.klaviyo_metrics}


def test_and_and_strict_bounds_keep_the_same_seconds_the_events_show(fast: KlaviyoAPI,
                                                                      world: World) -> None:
    metric = metric_named(world, "Placed Order")
    start, end = WEEK
    truth = list(world.klaviyo_events(start, end, metric))
    first_second = int(truth[0].timestamp)
    lo = dt.datetime.fromtimestamp(first_second, dt.UTC)  # strictly after: drops that second
    hi = end - dt.timedelta(seconds=1)  # or-equal: keeps the last second of the week
    expression = (f'and(equals(metric_id,"{metric.id}"),greater-than(datetime,{lo.isoformat()}),'
                  f"less-or-equal(datetime,{hi.isoformat()}))")
    pages = all_pages(fast, filter=expression, page_size=200)
    served = [e["id"] for p in pages for e in p["data"]]
    assert served == [e.id for e in truth if int(e.timestamp) > first_second]


def test_sparse_fieldsets_trim_attributes(fast: KlaviyoAPI, world: World) -> None:
    page = fast.Events.get_events(filter=window_filter(metric_named(world, "Placed Order"), *WEEK),
                                  fields_event=["timestamp"], fields_profile=["email"],
                                  include=["profile"], page_size=5)
    assert [set(e["attributes"]) for e in page["data"]] == [{"timestamp"}] * 5
    assert all(set(p["attributes"]) == {"email"} for p in page["included"])


def test_default_models_validate_the_events_page(typed: KlaviyoAPI, world: World) -> None:
    metric = metric_named(world, "Started Checkout")
    page = typed.Events.get_events(filter=window_filter(metric, *WEEK), include=["profile"],
                                   page_size=20)
    truth = list(world.klaviyo_events(*WEEK, metric))[:20]
    assert isinstance(page, GetEventResponseCollectionCompoundDocument)
    assert [e.id for e in page.data] == [e.id for e in truth]
    first = page.data[0]
    assert first.attributes.datetime_ == dt.datetime.fromtimestamp(int(truth[0].timestamp),
                                                                   dt.UTC)
    assert first.relationships is not None and first.relationships.profile is not None
    assert first.relationships.profile.data.id == truth[0].profile_id
    assert page.included is not None and page.included[0]["attributes"]["email"] == truth[0].email
    assert page.links is not None and page.links.next is not None
    assert page.links.next.startswith("https://")


@pytest.mark.parametrize(("expression", "parameter"), [
    ('equals(metric_id,"VwPrd1"', "filter"),
    ('equals(campaign_id,"x")', "filter"),
    ('greater-than(metric_id,"VwPrd1")', "filter"),
    ("less-than(datetime,not-a-date)", "filter"),
    ('or(equals(metric_id,"a"),equals(metric_id,"b"))', "filter"),
])
def test_bad_filters_are_400_invalid_on_the_filter_parameter(fast: KlaviyoAPI, expression: str,
                                                             parameter: str) -> None:
    with pytest.raises(ApiException) as raised:
        fast.Events.get_events(filter=expression)
    assert raised.value.status == 400
    error = error_of(raised)
    assert (error["code"], error["status"], error["source"]) == (
        "invalid", 400, {"parameter": parameter})


def test_a_forged_cursor_and_a_bad_sort_are_refused(fast: KlaviyoAPI) -> None:
    with pytest.raises(ApiException) as raised:
        fast.Events.get_events(page_cursor="not-a-cursor!")
    assert error_of(raised)["source"] == {"parameter": "page[cursor]"}
    with pytest.raises(ApiException) as raised:
        fast.Events.get_events(sort="value")
    assert error_of(raised)["source"] == {"parameter": "sort"}


def test_pages_hold_still_while_late_events_arrive() -> None:
    world = World(WorldSpec(seed=3, start=dt.date(2026, 9, 1), days=10, campaigns=6,
                            as_of=dt.datetime(2026, 9, 6, tzinfo=dt.UTC)))
    server = serve_klaviyo(Sandbox(world))
    try:
        client = KlaviyoAPI(KEY, test_host=f"http://127.0.0.1:{server.server_port}",
                            max_retries=0, options=FAST)
        metric = metric_named(world, "Placed Order")
        start = dt.datetime(2026, 9, 1, tzinfo=dt.UTC)
        end = start + dt.timedelta(days=10)
        kwargs: dict[str, Any] = {"filter": window_filter(metric, start, end), "page_size": 25}
        first = client.Events.get_events(**kwargs)
        before = [e.id for e in world.klaviyo_events(start, end, metric)]
        world.advance(5)
        rest = all_pages(client, first["links"]["next"], **kwargs)
        served = [e["id"] for p in [first, *rest] for e in p["data"]]
        after = [e.id for e in world.klaviyo_events(start, end, metric)]
        assert len(after) > len(before)
        assert served == after
    finally:
        server.shutdown()
        server.server_close()


# -- metric aggregates -----------------------------------------------------------------------

def aggregate_query(metric: KlaviyoMetric, start: str, end: str, tz: str,
                    interval: str = "day") -> dict[str, Any]:
    return {"data": {"type": "metric-aggregate", "attributes": {
        "metric_id": metric.id, "measurements": ["count", "sum_value", "unique"],
        "interval": interval, "timezone": tz,
        "filter": [f"greater-or-equal(datetime,{start})", f"less-than(datetime,{end})"]}}}


@pytest.mark.parametrize(("name", "tz"), [("Placed Order", "America/New_York"),
                                          ("Added to Cart", "Asia/Tokyo")])
def test_daily_aggregates_match_the_world_in_the_query_time_zone(typed: KlaviyoAPI, world: World,
                                                                 name: str, tz: str) -> None:
    metric = metric_named(world, name)
    answer = typed.Metrics.query_metric_aggregates(
        aggregate_query(metric, "2026-09-01T00:00:00", "2026-09-15T00:00:00", tz))
    assert isinstance(answer, PostMetricAggregateResponse)
    dates = [d.astimezone(ZoneInfo(tz)) for d in answer.data.attributes.dates]
    assert [d.date() for d in dates] == [dt.date(2026, 9, 1) + dt.timedelta(days=i)
                                         for i in range(14)]
    assert all((d.hour, d.minute) == (0, 0) for d in dates)
    [row] = answer.data.attributes.data
    truth = world.klaviyo_daily(metric, dt.date(2026, 9, 1), dt.date(2026, 9, 14), tz)
    served = {d.date(): (n, v) for d, n, v in zip(dates, row.measurements["count"],
                                                  row.measurements["sum_value"], strict=True)}
    assert {d: (int(n), round(v, 2)) for d, (n, v) in served.items() if n} == {
        d: (n, round(v, 2)) for d, (n, v) in truth.items()}
    assert row.dimensions == []


def test_unique_counts_distinct_profiles_and_hours_add_up_to_days(fast: KlaviyoAPI,
                                                                   world: World) -> None:
    metric = metric_named(world, "Viewed Product")
    span = ("2026-09-10T00:00:00", "2026-09-12T00:00:00")
    daily = fast.Metrics.query_metric_aggregates(
        aggregate_query(metric, *span, "UTC"))["data"]["attributes"]
    hourly = fast.Metrics.query_metric_aggregates(
        aggregate_query(metric, *span, "UTC", "hour"))["data"]["attributes"]
    assert len(hourly["dates"]) == 48
    day_counts = daily["data"][0]["measurements"]["count"]
    hour_counts = hourly["data"][0]["measurements"]["count"]
    assert day_counts == [sum(hour_counts[:24]), sum(hour_counts[24:])]
    events = list(world.klaviyo_events(dt.datetime(2026, 9, 10, tzinfo=dt.UTC),
                                       dt.datetime(2026, 9, 11, tzinfo=dt.UTC), metric))
    assert daily["data"][0]["measurements"]["unique"][0] == len({e.profile_id for e in events})


@pytest.mark.parametrize(("attributes", "pointer"), [
    ({"filter": ["greater-or-equal(datetime,2025-01-01T00:00:00)",
                 "less-than(datetime,2026-09-01T00:00:00)"]}, "/data/attributes/filter"),
    ({"filter": ["greater-or-equal(datetime,2026-09-01T00:00:00)"]}, "/data/attributes/filter"),
    ({"timezone": "Mars/Olympus"}, "/data/attributes/timezone"),
    ({"metric_id": "nope42"}, "/data/attributes/metric_id"),
])
def test_invalid_aggregate_queries_name_the_attribute(fast: KlaviyoAPI, world: World,
                                                      attributes: dict[str, Any],
                                                      pointer: str) -> None:
    query = aggregate_query(metric_named(world, "Placed Order"), "2026-09-01T00:00:00",
                            "2026-09-08T00:00:00", "UTC")
    query["data"]["attributes"].update(attributes)
    with pytest.raises(ApiException) as raised:
        fast.Metrics.query_metric_aggregates(query)
    assert raised.value.status == 400
    error = error_of(raised)
    assert (error["code"], error["source"]) == ("invalid", {"pointer": pointer})


# -- headers, authentication, faults, counting -------------------------------------------------

def test_missing_or_future_revision_is_400(klaviyo_served: tuple[Sandbox, str]) -> None:
    client = KlaviyoAPI(KEY, test_host=klaviyo_served[1], max_retries=0)
    del client.api_client.default_headers["revision"]
    with pytest.raises(ApiException) as raised:
        client.Metrics.get_metrics()
    assert raised.value.status == 400
    assert error_of(raised)["source"] == {"parameter": "revision"}
    client.api_client.default_headers["revision"] = "2099-01-15"
    with pytest.raises(ApiException) as raised:
        client.Metrics.get_metrics()
    assert (raised.value.status, error_of(raised)["code"]) == (400, "invalid")


def test_bad_or_missing_key_is_401(klaviyo_served: tuple[Sandbox, str]) -> None:
    with pytest.raises(ApiException) as raised:
        KlaviyoAPI("SbXkL2", test_host=klaviyo_served[1], max_retries=0).Metrics.get_metrics()
    assert raised.value.status == 401
    assert error_of(raised)["code"] == "authentication_failed"
    assert isinstance(raised.value.data, GetAccounts4XXResponse)
    with pytest.raises(ApiException) as raised:
        KlaviyoAPI("", test_host=klaviyo_served[1], max_retries=0).Metrics.get_metrics()
    error = error_of(raised)
    assert (raised.value.status, error["code"], error["status"]) == (401, "not_authenticated", 401)


def without_urllib3_retries(client: KlaviyoAPI) -> KlaviyoAPI:
    """``max_retries=0`` only stops the SDK's own retries: its urllib3 pool still retries a GET
    answered 429/503 with Retry-After (3 times, sleeping as told) unless told not to."""
    client.api_client.rest_client.pool_manager.connection_pool_kw["retries"] = False
    return client


def test_rate_limit_fault_is_429_with_retry_after_then_headers_return(
        fast: KlaviyoAPI, live: Sandbox) -> None:
    client = without_urllib3_retries(fast)
    live.inject("klaviyo", "rate_limit", retry_after=7)
    with pytest.raises(ApiException) as raised:
        client.Events.get_events(page_size=1)
    assert raised.value.status == 429
    assert raised.value.headers["Retry-After"] == "7"
    assert "RateLimit-Limit" not in raised.value.headers
    assert error_of(raised)["code"] == "throttled"
    answer = client.Events.get_events_with_http_info(page_size=1)
    assert answer.headers["RateLimit-Limit"] == "3500"
    assert 0 <= int(answer.headers["RateLimit-Remaining"]) < 3500
    assert 1 <= int(answer.headers["RateLimit-Reset"]) <= 60


def test_exhausted_fault_on_aggregates_raises_even_with_urllib3_retries(
        fast: KlaviyoAPI, live: Sandbox, world: World) -> None:
    live.inject("klaviyo", "exhausted", retry_after=30)
    query = aggregate_query(metric_named(world, "Placed Order"), "2026-09-01T00:00:00",
                            "2026-09-02T00:00:00", "UTC")
    with pytest.raises(ApiException) as raised:  # urllib3 never retries a POST
        fast.Metrics.query_metric_aggregates(query)
    assert (raised.value.status, raised.value.headers["Retry-After"]) == (429, "30")


def test_urllib3_quietly_retries_a_throttled_get(fast: KlaviyoAPI, live: Sandbox) -> None:
    live.reset_requests()
    live.inject("klaviyo", "rate_limit", retry_after=1)
    assert fast.Events.get_events(page_size=1)["data"]
    assert live.requests("klaviyo") == {"klaviyo.get_events": 2}


def test_server_error_fault_is_503(fast: KlaviyoAPI, live: Sandbox) -> None:
    live.inject("klaviyo", "server_error")
    with pytest.raises(ApiException) as raised:
        fast.Metrics.get_metrics()
    assert raised.value.status == 503
    assert error_of(raised)["status"] == 503
    assert fast.Metrics.get_metrics()["data"]


def test_requests_are_counted_per_endpoint(fast: KlaviyoAPI, live: Sandbox,
                                           world: World) -> None:
    live.reset_requests()
    metric = metric_named(world, "Placed Order")
    pages = all_pages(fast, filter=window_filter(metric, *WEEK), page_size=100)
    fast.Metrics.get_metrics()
    fast.Metrics.query_metric_aggregates(
        aggregate_query(metric, "2026-09-01T00:00:00", "2026-09-08T00:00:00", "UTC"))
    assert live.requests("klaviyo") == {
        "klaviyo.get_events": len(pages), "klaviyo.get_metrics": 1,
        "klaviyo.query_metric_aggregates": 1}


# -- the account, the aggregate fast path, resumed walks, reported limits ------------------------

def test_the_account_validates_and_carries_the_worlds_id_zone_and_currency(
        typed: KlaviyoAPI, world: World) -> None:
    page = typed.Accounts.get_accounts()
    assert isinstance(page, GetAccountResponseCollection)
    [account] = page.data
    assert (account.id, account.attributes.timezone, account.attributes.preferred_currency) == (
        world.accounts.klaviyo_account_id, world.accounts.klaviyo_tz, world.accounts.currency)


@pytest.mark.parametrize("tz", ["America/New_York", "Asia/Tokyo"])
def test_counts_and_sums_alone_match_the_world_and_the_full_computation(
        fast: KlaviyoAPI, world: World, tz: str) -> None:
    """Without ``unique`` nor ``by`` the simulator sums the world's arrays in bulk: same
    answer as event by event."""
    metric = metric_named(world, "Placed Order")
    query = aggregate_query(metric, "2026-09-01T00:00:00", "2026-10-10T00:00:00", tz)
    full = fast.Metrics.query_metric_aggregates(query)["data"]["attributes"]
    query["data"]["attributes"]["measurements"] = ["sum_value", "count"]
    bulk = fast.Metrics.query_metric_aggregates(query)["data"]["attributes"]
    assert bulk["dates"] == full["dates"]
    served = bulk["data"][0]["measurements"]
    assert set(served) == {"count", "sum_value"}
    for name in ("count", "sum_value"):
        assert served[name] == full["data"][0]["measurements"][name]
    zone = ZoneInfo(tz)
    truth = world.klaviyo_daily(metric, dt.date(2026, 9, 1), dt.date(2026, 10, 9), tz)
    days = [dt.datetime.fromisoformat(d).astimezone(zone).date() for d in bulk["dates"]]
    assert {d: (int(n), v) for d, n, v in zip(days, served["count"], served["sum_value"],
                                              strict=True) if n} == {
        d: (n, round(v, 2)) for d, (n, v) in truth.items()}


def test_a_resumed_walk_serves_what_a_fresh_walk_from_the_cursor_serves(
        fast: KlaviyoAPI, world: World) -> None:
    """A server resumes the walk it kept after the previous page; another server has no walk
    and rescans from the cursor: both answer the same, as does the world."""
    metric = metric_named(world, "Viewed Product")
    kwargs: dict[str, Any] = {"filter": window_filter(metric, *WEEK), "page_size": 300}
    sandbox = Sandbox(world)
    api = KlaviyoApi(sandbox)
    server = serve_rest(api, sandbox)
    try:
        client = KlaviyoAPI(KEY, test_host=f"http://127.0.0.1:{server.server_port}",
                            max_retries=0, options=FAST)
        pages = all_pages(client, **kwargs)
        fresh = all_pages(fast, pages[0]["links"]["next"], **kwargs)
    finally:
        server.shutdown()
        server.server_close()
    assert len(pages) > 3 and api.walks.resumed == len(pages) - 1
    ids = [[e["id"] for e in page["data"]] for page in pages]
    assert ids[1:] == [[e["id"] for e in page["data"]] for page in fresh]
    assert [i for page in ids for i in page] == [
        e.id for e in world.klaviyo_events(*WEEK, metric)]


def test_steady_limits_can_be_lowered_to_exercise_a_client_pace(world: World) -> None:
    server = serve_klaviyo(Sandbox(world), steady_limits={"get_events": 3})
    try:
        client = KlaviyoAPI(KEY, test_host=f"http://127.0.0.1:{server.server_port}",
                            max_retries=0, options=FAST)
        remaining = [client.Events.get_events_with_http_info(page_size=1).headers[
            "RateLimit-Remaining"] for _ in range(4)]
        limit = client.Metrics.get_metrics_with_http_info().headers["RateLimit-Limit"]
    finally:
        server.shutdown()
        server.server_close()
    assert (remaining, limit) == (["2", "1", "0", "0"], "150")
