"""Meta source: ad insights through the facebook-business SDK."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from typing import Any

from facebook_business.adobjects.adaccount import AdAccount
from facebook_business.api import FacebookAdsApi
from facebook_business.session import FacebookSession

from convsync.model import Platform, PlatformConversion
from convsync.settings import MetaSection, Secrets


def connect(section: MetaSection, secrets: Secrets, timeout: float = 120) -> FacebookAdsApi:
    """An API object of our own (not the SDK's process-wide default), on ``endpoint`` if set."""
    if secrets.meta_access_token is None:
        raise ValueError("set CONVSYNC_META_ACCESS_TOKEN")
    session = FacebookSession(access_token=secrets.meta_access_token.get_secret_value(),
                              timeout=timeout)
    if section.endpoint:
        session.GRAPH = section.endpoint.rstrip("/")
    return FacebookAdsApi(session, api_version=section.api_version)


def insights(api: FacebookAdsApi, account_id: str, params: dict[str, Any],
             fields: list[str]) -> Iterator[dict[str, Any]]:
    """Insights rows as plain dicts, following the SDK cursor page by page."""
    cursor = AdAccount(account_id, api=api).get_insights(fields=fields, params=params)
    for row in cursor:
        yield row.export_all_data()


def action_types(api: FacebookAdsApi, section: MetaSection, account_id: str, start: dt.date,
                 end: dt.date) -> Iterator[PlatformConversion]:
    """The action types the account recorded over a date range, with their counts."""
    params = {"level": "account",
              "time_range": json.dumps({"since": start.isoformat(), "until": end.isoformat()}),
              "action_attribution_windows": json.dumps(section.attribution_windows),
              "action_report_time": section.action_report_time}
    totals: dict[str, float] = {}
    for row in insights(api, account_id, params, ["actions"]):
        for action in row.get("actions", []):
            totals[action["action_type"]] = (totals.get(action["action_type"], 0.0)
                                             + float(action.get("value", 0)))
    for action_type, count in sorted(totals.items()):
        yield PlatformConversion(platform=Platform.META, account_id=account_id,
                                 platform_id=action_type, name=action_type,
                                 settings={"count": count})


def explain(error: Exception) -> str | None:
    from facebook_business.exceptions import FacebookRequestError

    if not isinstance(error, FacebookRequestError):
        return None
    subcode = error.api_error_subcode()
    return (f"Meta Graph API error {error.api_error_code()}"
            f"{f'/{subcode}' if subcode else ''} (HTTP {error.http_status()}): "
            f"{error.api_error_message()}")
