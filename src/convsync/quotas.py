"""Quotas that belong to a Google Cloud project, counted in the store across every client and
run that uses the project, and calls paced under them.

The Data Manager API allows a Cloud project 300 requests a minute and 100,000 a day for writes
(``IngestEvents``), the same again for reads (``RetrieveRequestStatus``); beyond, Google answers
RESOURCE_EXHAUSTED. Every client of an agency usually shares one project, so one client's run
cannot know what the others used unless the store counts it: ``ProjectQuota.take`` counts a
call before it is made, waits while the last 60 seconds hold the minute's quota (a sliding
minute: never more in any 60 seconds, however Google cuts its minutes), and refuses a call
past the day's quota (Google's quota day ends at midnight Pacific time).

The project is the one behind the OAuth credentials: the number an OAuth client id begins
with (``123456789012-abc.apps.googleusercontent.com``), a service account file's
``project_id``, or ``[google_ads] cloud_project`` in the config, which wins (a ready access
token says nothing of its project).
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from convsync.errors import QuotaExhausted
from convsync.settings import GoogleAdsSection, Secrets
from convsync.store import Store

QUOTA_DAY_ZONE = ZoneInfo("America/Los_Angeles")
"""Google's daily quotas start again at midnight Pacific time."""


@dataclass(frozen=True)
class Limits:
    per_minute: int
    per_day: int


DATAMANAGER_LIMITS = {
    "datamanager.write": Limits(per_minute=300, per_day=100_000),
    "datamanager.read": Limits(per_minute=300, per_day=100_000),
}
"""The Data Manager's per-project quotas, by the calls they count."""


GOOGLE_ADS_OPERATIONS = "googleads.operations"
"""Google Ads queries (Search, SearchStream): each is one operation against the project's
daily budget (Explorer 2,880, Basic 15,000). convsync counts them, for every client and run of
the project, and warns as they near the budget; Google refuses queries beyond it."""


def operation_counter(store: Store, project: str, *,
                      clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)
                      ) -> Callable[[str, int], None]:
    """What counts Google Ads operations in the store as they are made (a ``Requests``'s
    ``on_add``): a run killed half-way has still counted what it spent."""
    def count(method: str, n: int) -> None:
        now = clock()
        store.count_calls(project, GOOGLE_ADS_OPERATIONS, now, n, quota_day_start(now))
    return count


def operations_today(store: Store, project: str, now: dt.datetime) -> int:
    """Google Ads operations the project has spent since its quota day began."""
    return store.calls_since(project, GOOGLE_ADS_OPERATIONS, quota_day_start(now))


def cloud_project(section: GoogleAdsSection, secrets: Secrets) -> str:
    """The Cloud project whose quotas the Google calls count against (see the module)."""
    if section.cloud_project:
        return section.cloud_project
    client_id = secrets.google_client_id or ""
    number = client_id.split("-", 1)[0]
    if number.isdigit():
        return number
    path = secrets.google_service_account_file
    if path is not None:
        try:
            project = json.loads(path.read_text()).get("project_id")
        except (OSError, ValueError):
            project = None
        if isinstance(project, str) and project:
            return project
    return "(unnamed project)"


class ProjectQuota:
    """Paces calls under one project's quotas (``limits`` by api name), counting each in the
    store before it is made."""

    def __init__(self, store: Store, project: str, limits: dict[str, Limits], *,
                 clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.store = store
        self.project = project
        self.limits = limits
        self.clock = clock
        self.sleep = sleep
        self.waited = 0.0
        """Seconds spent waiting for a minute with room."""

    def take(self, api: str) -> None:
        """Count one call of ``api``, waiting until the last 60 seconds have room for it;
        QuotaExhausted when the day's calls are spent."""
        limits = self.limits[api]
        while True:
            now = self.clock()
            wait = self.store.take_call(self.project, api, now, limits.per_minute,
                                        limits.per_day, quota_day_start(now))
            if wait is None:
                raise QuotaExhausted(
                    f"the Cloud project {self.project}'s {api} quota for the day is spent "
                    f"({limits.per_day:,} calls, counted for every client of the project)",
                    reason="QUOTA_DAY_SPENT", retryable=True,
                    fix="the next run after midnight Pacific time goes on where this one "
                        "stopped (nothing is lost); or ask Google for a higher quota")
            if wait == 0.0:
                return
            self.waited += wait
            self.sleep(wait)

    def left_today(self, api: str) -> int:
        """Calls of ``api`` the project still has today."""
        used = self.store.calls_since(self.project, api, quota_day_start(self.clock()))
        return max(self.limits[api].per_day - used, 0)


def quota_day_start(now: dt.datetime) -> dt.datetime:
    """When Google's quota day that holds ``now`` began (midnight Pacific), in UTC."""
    local = now.astimezone(QUOTA_DAY_ZONE)
    return dt.datetime.combine(local.date(), dt.time(), QUOTA_DAY_ZONE).astimezone(dt.UTC)
