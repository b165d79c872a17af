"""A Cloud project's Data Manager quotas, counted in the store across clients and runs."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from pydantic import SecretStr

from convsync.quotas import (
    DATAMANAGER_LIMITS,
    Limits,
    ProjectQuota,
    QuotaExhausted,
    cloud_project,
    quota_day_start,
)
from convsync.settings import GoogleAdsSection, Secrets
from convsync.store import Store

WRITE = "datamanager.write"


class Clock:
    """A clock that moves only when someone sleeps."""

    def __init__(self, now: dt.datetime) -> None:
        self.now = now
        self.slept: list[float] = []

    def __call__(self) -> dt.datetime:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += dt.timedelta(seconds=seconds)


def quota(store: Store, clock: Clock, per_minute: int = 3, per_day: int = 10) -> ProjectQuota:
    return ProjectQuota(store, "123456789012", {WRITE: Limits(per_minute, per_day)},
                        clock=clock, sleep=clock.sleep)


def test_calls_past_a_minutes_quota_wait_until_the_last_minute_has_room(
        url: str) -> None:
    clock = Clock(dt.datetime(2026, 12, 6, 9, 30, 40, tzinfo=dt.UTC))
    with Store.open(url) as store:
        pacer = quota(store, clock)
        pacer.take(WRITE)
        clock.now += dt.timedelta(seconds=30)  # 09:31:10
        pacer.take(WRITE)
        pacer.take(WRITE)
        pacer.take(WRITE)  # three in the last minute: waits until the first is surely out
        assert clock.slept == [31.0]  # made during 09:30:40, out of the minute by 09:31:41
        assert clock.now == dt.datetime(2026, 12, 6, 9, 31, 41, tzinfo=dt.UTC)
        pacer.take(WRITE)  # the three of 09:31:10 fill the minute until 09:32:11
        assert clock.slept == [31.0, 30.0]


def test_two_clients_of_one_project_share_its_quota(url: str) -> None:
    """Two runs (two clients, each its own Store and pacer) draw on one count."""
    clock = Clock(dt.datetime(2026, 12, 6, 9, 30, tzinfo=dt.UTC))
    with Store.open(url) as one, Store.open(url) as other:
        first, second = quota(one, clock), quota(other, clock)
        first.take(WRITE)
        first.take(WRITE)
        second.take(WRITE)
        assert clock.slept == []
        second.take(WRITE)  # the minute's three are used: waits
        assert clock.slept == [61.0]
        assert first.left_today(WRITE) == 6


def test_a_spent_day_refuses_until_midnight_pacific(url: str) -> None:
    # 23:50 in Los Angeles on 5 December (UTC-8): the quota day began at 08:00 UTC
    clock = Clock(dt.datetime(2026, 12, 6, 7, 50, tzinfo=dt.UTC))
    with Store.open(url) as store:
        pacer = quota(store, clock, per_minute=100, per_day=5)
        for _ in range(5):
            pacer.take(WRITE)
        with pytest.raises(QuotaExhausted) as refused:
            pacer.take(WRITE)
        assert refused.value.retryable and not refused.value.maybe_sent
        assert "123456789012" in str(refused.value) and "midnight Pacific" in str(refused.value)
        clock.now = dt.datetime(2026, 12, 6, 8, 0, tzinfo=dt.UTC)  # midnight in Los Angeles
        pacer.take(WRITE)
        assert pacer.left_today(WRITE) == 4


def test_the_quota_day_follows_pacific_time_through_daylight_saving() -> None:
    summer = dt.datetime(2026, 7, 1, 12, tzinfo=dt.UTC)
    winter = dt.datetime(2026, 12, 1, 12, tzinfo=dt.UTC)
    assert quota_day_start(summer) == dt.datetime(2026, 7, 1, 7, tzinfo=dt.UTC)
    assert quota_day_start(winter) == dt.datetime(2026, 12, 1, 8, tzinfo=dt.UTC)
    assert quota_day_start(dt.datetime(2026, 12, 1, 7, 59, tzinfo=dt.UTC)) == dt.datetime(
        2026, 11, 30, 8, tzinfo=dt.UTC)


def test_the_project_comes_from_the_config_the_oauth_client_or_the_service_account(
        tmp_path: Path) -> None:
    section = GoogleAdsSection(customer_ids=["1234567890"])
    oauth = Secrets(google_client_id="123456789012-abcdef.apps.googleusercontent.com",
                    google_client_secret=SecretStr("s"), google_refresh_token=SecretStr("r"))
    assert cloud_project(section, oauth) == "123456789012"
    key = tmp_path / "sa.json"
    key.write_text(json.dumps({"type": "service_account", "project_id": "agency-uploads"}))
    assert cloud_project(section, Secrets(google_service_account_file=key)) == "agency-uploads"
    named = section.model_copy(update={"cloud_project": "shared-prod"})
    assert cloud_project(named, oauth) == "shared-prod"
    assert DATAMANAGER_LIMITS[WRITE] == Limits(per_minute=300, per_day=100_000)
