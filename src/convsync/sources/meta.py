"""Meta source: ad insights through the facebook-business SDK."""

from __future__ import annotations

import datetime as dt
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


ALIAS_PREFIXES = ("offsite_conversion.fb_pixel_", "onsite_conversion.", "onsite_web_", "omni_")
IRREGULAR = {"initiated_checkout": "initiate_checkout"}


def action_family(action_type: str) -> str:
    """The event behind an action type: Meta reports one pixel purchase as ``purchase``,
    ``omni_purchase``, ``offsite_conversion.fb_pixel_purchase`` and ``onsite_web_purchase``,
    views of the same events that must never be added together."""
    for prefix in ALIAS_PREFIXES:
        if action_type.startswith(prefix):
            action_type = action_type[len(prefix):]
            break
    return IRREGULAR.get(action_type, action_type)


def mark_aliases(conversions: list[PlatformConversion]) -> list[PlatformConversion]:
    """Unmapped action types that are views of a mapped one get ``alias_of`` in settings."""
    mapped = {action_family(c.name): c.conversion for c in conversions if c.conversion}
    return [c if c.conversion or action_family(c.name) not in mapped else c.model_copy(
        update={"settings": {**c.settings, "alias_of": mapped[action_family(c.name)]}})
        for c in conversions]


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
              "time_range": {"since": start.isoformat(), "until": end.isoformat()},
              "action_attribution_windows": section.attribution_windows,
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
