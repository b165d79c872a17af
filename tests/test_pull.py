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
    both_bases = "[google_ads]\nconversion_date_basis = true\n"
    path.write_text(path.read_text().replace("[google_ads]\n", both_bases))
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
