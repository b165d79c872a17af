"""Klaviyo source: metrics, aggregates and events through klaviyo-api.

Responses are read as dictionaries (``USE_DICTIONARY_FOR_RESPONSE_DATA``): the SDK's
pydantic response models cost about seven times as much per event."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from klaviyo_api import KlaviyoAPI

from convsync.model import Platform, PlatformConversion
from convsync.settings import KlaviyoSection, Secrets


def connect(section: KlaviyoSection, secrets: Secrets) -> KlaviyoAPI:
    """A client whose retries are ours (tenacity), not the SDK's, so they are counted once."""
    if secrets.klaviyo_api_key is None:
        raise ValueError("set CONVSYNC_KLAVIYO_API_KEY")
    kwargs: dict[str, Any] = {"max_retries": 0,
                              "options": {"USE_DICTIONARY_FOR_RESPONSE_DATA": True}}
    if section.endpoint:
        kwargs["test_host"] = section.endpoint.rstrip("/")
    client = KlaviyoAPI(secrets.klaviyo_api_key.get_secret_value(), **kwargs)
    # max_retries=0 stops the SDK's own retry loop, but its urllib3 pool still retries a GET
    # answered 429/503 with Retry-After: switch that off too.
    client.api_client.rest_client.pool_manager.connection_pool_kw["retries"] = False
    return client


def metrics(client: KlaviyoAPI, account_id: str = "") -> Iterator[PlatformConversion]:
    """The account's metrics (event types), every page."""
    cursor: str | None = None
    while True:
        page = client.Metrics.get_metrics(page_cursor=cursor) if cursor else (
            client.Metrics.get_metrics())
        for metric in page["data"]:
            integration = (metric["attributes"].get("integration") or {}).get("name")
            yield PlatformConversion(platform=Platform.KLAVIYO, account_id=account_id,
                                     platform_id=metric["id"],
                                     name=metric["attributes"]["name"],
                                     settings={"integration": integration})
        cursor = (page.get("links") or {}).get("next")
        if not cursor:
            return


def explain(error: Exception) -> str | None:
    import json

    from openapi_client.exceptions import ApiException

    if not isinstance(error, ApiException):
        return None
    try:
        errors = json.loads(error.body or "{}").get("errors", [])
        detail = "; ".join(f"{e.get('code')}: {e.get('detail')}" for e in errors)
    except (ValueError, AttributeError):
        detail = str(error.body or error.reason)
    return f"Klaviyo API HTTP {error.status}: {detail or error.reason}"
