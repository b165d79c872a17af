"""Resumed backfills, runs that die, retried streams: what the pull says it did and spent."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from convsync import pipeline, quotas
from convsync.model import ConversionStat, Platform
from convsync.retry import RetryPolicy
from convsync.sandbox import server
from convsync.sandbox.world import World, WorldSpec
from convsync.settings import ClientConfig, load_config, load_secrets
from convsync.sources import Row, Stream
from convsync.store import Store

TODAY = dt.date(2026, 10, 31)
START = TODAY - dt.timedelta(days=59)


@pytest.fixture(scope="module")
def running(tls_files: tuple[Path, Path]) -> Iterator[server.RunningSandbox]:
    spec = WorldSpec(seed=41, start=START, days=60, campaigns=3,
                     as_of=dt.datetime(2026, 10, 31, 15, tzinfo=dt.UTC))
    with server.start(World(spec), tls_files[0].parent) as sandbox:
        yield sandbox


@pytest.fixture
def config(running: server.RunningSandbox, tmp_path: Path) -> ClientConfig:
    path = tmp_path / "client.toml"
    server.write_client_config(path, running)
    return load_config(path)


def backfill(config: ClientConfig, until: dt.date | None, *,
             progress: pipeline.Progress | None = None) -> pipeline.PullResult:
    with Store.open(config.store_url()) as store:
        return pipeline.pull(config, load_secrets(config), store, platforms=[
            Platform.GOOGLE_ADS], since=START, until=until, today=TODAY, progress=progress)


def test_a_backfill_to_a_later_day_pulls_only_the_days_not_done(
        config: ClientConfig, running: server.RunningSandbox) -> None:
    first = backfill(config, START + dt.timedelta(days=29)).summary()["platforms"]["google_ads"]
    assert first["days"] == 30 and first["first_day"] == START.isoformat()
    # --until omitted: up to yesterday, which moves every day; what is stored is not pulled again
    later = backfill(config, None).summary()["platforms"]["google_ads"]
    assert later["first_day"] == (START + dt.timedelta(days=30)).isoformat()
    assert later["last_day"] == (TODAY - dt.timedelta(days=1)).isoformat()
    assert later["days"] == 29 and later["rows"] > 0
    again = backfill(config, TODAY - dt.timedelta(days=10)).summary()["platforms"]["google_ads"]
    assert again["requests"] == 0 and again["days"] == 0
    assert "backfill already complete" in again["skipped"][0]


class Killed(BaseException):
    """What SIGKILL does to a run, as far as the store can tell: it never finishes."""


class DieAfterFirstDay(pipeline.Progress):
    def advance(self, label: str, done_days: int) -> None:
        raise Killed


def test_the_operations_of_a_run_that_died_still_count_against_the_budget(
        running: server.RunningSandbox, tmp_path: Path) -> None:
    path = tmp_path / "budget.toml"
    server.write_client_config(path, running)
    path.write_text(path.read_text().replace("[google_ads]\n",
                                             "[google_ads]\ndaily_operation_budget = 40\n", 1))
    config = load_config(path)
    running.sandbox.reset_requests()
    with pytest.raises(Killed):
        backfill(config, None, progress=DieAfterFirstDay())
    spent = running.sandbox.requests("google_ads")["google_ads.SearchStream"]
    assert spent >= 1
    with Store.open(config.store_url()) as store:
        assert [r.status for r in store.recent_runs()] == ["running"]  # nothing finished it
        result = pipeline.pull(config, load_secrets(config), store,
                               platforms=[Platform.GOOGLE_ADS], today=TODAY)
        project = quotas.cloud_project(config.google_ads, load_secrets(config))  # type: ignore[arg-type]
        counted = quotas.operations_today(store, project, dt.datetime.now(dt.UTC))
    total = running.sandbox.requests("google_ads")["google_ads.SearchStream"]
    assert counted == total > spent
    warning = next(w for w in result.warnings if "daily operations" in w)
    assert re.search(rf"\b{total} of the Cloud project's 40 daily operations", warning)


def stats(day: dt.date, n: int) -> list[ConversionStat]:
    return [ConversionStat(platform=Platform.META, account_id="act_1", date=day,
                           timezone="UTC", campaign_id=f"c{i}", platform_conversion="purchase",
                           count=1.0) for i in range(n)]


class Flaky(Exception):
    """A transient error half-way through a stream."""


@pytest.mark.parametrize("ordered", [True, False])
def test_rows_pulled_again_after_a_retry_are_counted_once(tmp_path: Path, ordered: bool) -> None:
    days = [START + dt.timedelta(days=n) for n in range(12)]
    failed = []

    def pull(start: dt.date, end: dt.date) -> Iterator[Row]:
        for n, day in enumerate(d for d in days if start <= d <= end):
            if n == 7 and not failed:  # after 7,000 rows, some of them past the last mark
                failed.append(day)
                raise Flaky
            yield from stats(day, 1_000)

    stream = Stream("meta", "insights", "act_1", pull, ordered=ordered)
    outcome = pipeline.PlatformPull(Platform.META)
    window = pipeline.Window(days[0], days[-1], "backfill:insights", backfill=True)
    path = tmp_path / "client.toml"
    path.write_text('[client]\nname = "c"\ntimezone = "UTC"\ncurrency = "USD"\n'
                    f'store_url = "sqlite:///{tmp_path / "store.db"}"\n'
                    '[meta]\nad_account_ids = ["act_1"]\n')
    config = load_config(path)
    policy = RetryPolicy("meta", lambda error: isinstance(error, Flaky), attempts=2)
    with Store.open(config.store_url()) as store:
        pipeline._pull_stream(config, store, stream, window, policy, outcome,
                              pipeline.Progress(), lambda seconds: None)
        stored = store.count_rows("daily_stats")
    assert failed and stored == 12_000
    assert outcome.rows == 12_000  # not 12,000 + the rows of the days pulled twice
    assert len(outcome.days) == 12


def test_a_pull_the_projects_budget_cannot_hold_is_deferred_not_failed_half_way(
        running: server.RunningSandbox, tmp_path: Path) -> None:
    path = tmp_path / "tight.toml"
    server.write_client_config(path, running)
    path.write_text(path.read_text().replace("[google_ads]\n",
                                             "[google_ads]\ndaily_operation_budget = 3\n", 1))
    config = load_config(path)
    secrets = load_secrets(config)
    with Store.open(config.store_url()) as store:
        first = pipeline.pull(config, secrets, store, platforms=[Platform.GOOGLE_ADS],
                              today=TODAY)
        running.sandbox.reset_requests()
        second = pipeline.pull(config, secrets, store, platforms=[Platform.GOOGLE_ADS],
                               today=TODAY)
    assert first.failed == [] and first.platforms[0].requests.total == 2
    google = second.summary()["platforms"]["google_ads"]
    assert google["errors"] == [] and google["requests"] == 0
    assert google["skipped"][0].startswith("deferred: the Cloud project has 1 of its 3 daily")
    assert running.sandbox.requests("google_ads").get("google_ads.SearchStream", 0) == 0
