"""Pull and backfill through the pipeline: the store against the world's ground truth."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from convsync import pipeline
from convsync.model import Basis, Platform
from convsync.sandbox import server
from convsync.sandbox.world import World, WorldSpec
from convsync.settings import ClientConfig, load_config, load_secrets
from convsync.store import Store

TODAY = dt.date(2026, 10, 31)


@pytest.fixture(scope="module")
def running(tls_files: tuple[Path, Path]) -> Iterator[server.RunningSandbox]:
    spec = WorldSpec(seed=31, start=TODAY - dt.timedelta(days=59), days=60, campaigns=6,
                     as_of=dt.datetime(2026, 10, 31, 15, tzinfo=dt.UTC))
    with server.start(World(spec), tls_files[0].parent) as sandbox:
        yield sandbox


@pytest.fixture
def config(running: server.RunningSandbox, tmp_path: Path) -> ClientConfig:
    path = tmp_path / "client.toml"
    server.write_client_config(path, running)
    assert "conversion_date_basis = true" in path.read_text()  # both bases are pulled
    return load_config(path)


def google_truth(world: World, start: dt.date, end: dt.date,
                 basis: Basis) -> Counter[tuple[dt.date, str, str]]:
    truth: Counter[tuple[dt.date, str, str]] = Counter()
    for s in world.google_ads_stats(start, end,
                                    by_conversion_date=basis is Basis.CONVERSION_DATE):
        truth[(s.date, s.campaign.id, s.action.name)] += s.all_conversions
    return truth


def stored(store: Store, platform: Platform, basis: Basis) -> Counter[tuple[dt.date, str, str]]:
    got: Counter[tuple[dt.date, str, str]] = Counter()
    for s in store.stats(platform=platform):
        if s.basis is basis and s.count:
            got[(s.date, s.campaign_id, s.platform_conversion)] += round(s.count)
    return got


def test_google_ads_pull_matches_the_world_with_minimal_requests(
        config: ClientConfig, running: server.RunningSandbox) -> None:
    running.sandbox.reset_requests()
    with Store.open(config.store_url()) as store:
        result = pipeline.pull(config, load_secrets(config), store,
                               platforms=[Platform.GOOGLE_ADS], today=TODAY)
        assert result.failed == []
        start = TODAY - dt.timedelta(days=30)
        world = running.world
        for basis in Basis:
            assert stored(store, Platform.GOOGLE_ADS, basis) == google_truth(
                world, start, TODAY, basis)
        purchase = next(s for s in store.stats(platform=Platform.GOOGLE_ADS)
                        if s.platform_conversion == "Purchase")
        assert purchase.conversion == "purchase" and purchase.in_column is True
        assert purchase.timezone == "America/New_York" and purchase.currency == "USD"
    google = result.summary()["platforms"]["google_ads"]
    assert google["requests"] == 2 == running.sandbox.requests("google_ads")[
        "google_ads.SearchStream"]
    assert google["days"] == 31 and google["errors"] == []


def test_second_pull_adds_no_duplicates_and_picks_up_late_conversions(
        tls_files: tuple[Path, Path], tmp_path: Path) -> None:
    spec = WorldSpec(seed=32, start=TODAY - dt.timedelta(days=39), days=40, campaigns=4,
                     as_of=dt.datetime(2026, 10, 25, 12, tzinfo=dt.UTC))
    with server.start(World(spec), tls_files[0].parent) as running:
        path = tmp_path / "late.toml"
        server.write_client_config(path, running)
        config = load_config(path)
        secrets = load_secrets(config)
        with Store.open(config.store_url()) as store:
            pipeline.pull(config, secrets, store, platforms=[Platform.GOOGLE_ADS],
                          today=dt.date(2026, 10, 25))
            first_rows = store.count_rows("daily_stats")
            first = stored(store, Platform.GOOGLE_ADS, Basis.CLICK_DATE)
            running.world.advance(days=6)  # conversions keep arriving for past click days
            pipeline.pull(config, secrets, store, platforms=[Platform.GOOGLE_ADS], today=TODAY)
            second = stored(store, Platform.GOOGLE_ADS, Basis.CLICK_DATE)
            keys = [(s.date, s.campaign_id, s.platform_conversion, s.basis)
                    for s in store.stats(platform=Platform.GOOGLE_ADS)]
        assert len(keys) == len(set(keys))  # one row per cell, however often pulled
        assert store_rows_grew(first_rows, len(keys))
        truth = google_truth(running.world, TODAY - dt.timedelta(days=36), TODAY,
                             Basis.CLICK_DATE)
        assert second == truth
        late = [k for k in first if k[0] < dt.date(2026, 10, 20) and second[k] > first[k]]
        assert late, "no past day gained conversions: the lookback did not re-pull"


def store_rows_grew(before: int, after: int) -> bool:
    return after >= before


def test_transient_errors_are_retried_and_validation_errors_reported(
        config: ClientConfig, running: server.RunningSandbox) -> None:
    running.sandbox.reset_requests()
    running.sandbox.inject("google_ads", "rate_limit", retry_after=7)
    running.sandbox.inject("google_ads", "server_error")
    slept: list[float] = []
    with Store.open(config.store_url()) as store:
        result = pipeline.pull(config, load_secrets(config), store,
                               platforms=[Platform.GOOGLE_ADS], today=TODAY, sleep=slept.append)
    assert result.failed == []
    assert slept[0] == 7  # the retry delay Google asked for
    assert len(slept) == 2
    assert running.sandbox.requests("google_ads")["google_ads.SearchStream"] == 4


def test_a_permission_error_is_not_retried_and_the_others_go_on(
        running: server.RunningSandbox, tmp_path: Path) -> None:
    path = tmp_path / "wrong.toml"
    server.write_client_config(path, running)
    path.write_text(path.read_text().replace('customer_ids = ["1234567890"]',
                                             'customer_ids = ["1111111111"]'))
    config = load_config(path)
    running.sandbox.reset_requests()
    slept: list[float] = []
    with Store.open(config.store_url()) as store:
        result = pipeline.pull(config, load_secrets(config), store,
                               platforms=[Platform.GOOGLE_ADS, Platform.KLAVIYO], today=TODAY,
                               sleep=slept.append)
        runs = store.recent_runs()
    google = result.summary()["platforms"]["google_ads"]
    assert "USER_PERMISSION_DENIED" in google["errors"][0] and slept == []
    assert running.sandbox.requests("google_ads")["google_ads.SearchStream"] == 1
    assert result.summary()["platforms"]["klaviyo"]["errors"] == []
    assert runs[0].status == "partial"


def test_values_from_pulled_journeys_are_stored_with_their_day(
        config: ClientConfig, running: server.RunningSandbox) -> None:
    with Store.open(config.store_url()) as store:
        pipeline.pull(config, load_secrets(config), store, platforms=[Platform.KLAVIYO],
                      since=running.world.start, until=TODAY, today=TODAY)
        as_of = dt.datetime(2026, 10, 31, 15, tzinfo=dt.UTC)
        summary = pipeline.values(config, store, as_of)
        saved = store.micro_values(config.client.name)
    rows = summary["values"]
    overall = {r["conversion"]: r for r in rows if r["segment"] == "*"}
    assert set(overall) == {"product_view", "add_to_cart", "begin_checkout",
                            "newsletter_signup"}
    # the ladder: a step closer to the purchase is worth more
    assert (overall["product_view"]["estimate"] < overall["add_to_cart"]["estimate"]
            < overall["begin_checkout"]["estimate"])
    assert overall["begin_checkout"]["value"] is not None  # 60 days of history, horizon 28
    assert len(saved) == len(rows) and saved[0]["as_of"] == as_of.isoformat()
    assert set(summary["sources"]) == {"klaviyo"} and summary["sources"]["klaviyo"] > 1000
    assert summary["person_groups"] == ["email"]
    start = dt.datetime.fromisoformat(summary["window_start"])
    assert start.date() >= running.world.start and summary["history_days"] == pytest.approx(
        (as_of - start).total_seconds() / 86_400)
