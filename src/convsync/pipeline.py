"""What each command does for one client: sources -> store -> (later) reconcile, value, push.

Each platform runs on its own: one failing is reported and the others go on."""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from convsync.model import ConversionMap, Platform, PlatformConversion, infer_kind
from convsync.redact import Redactor
from convsync.settings import ClientConfig, Secrets
from convsync.sources import ga4, google_ads, klaviyo, meta
from convsync.store import Store

log = logging.getLogger(__name__)

EXPLAINERS: tuple[Callable[[Exception], str | None], ...] = (
    google_ads.explain, ga4.explain, meta.explain, klaviyo.explain)


@dataclass
class PlatformOutcome:
    platform: Platform
    conversions: list[PlatformConversion] = field(default_factory=list)
    error: str | None = None

    @property
    def unmapped(self) -> list[PlatformConversion]:
        """Conversions no definition names (views of a mapped Meta action are not)."""
        return [c for c in self.conversions
                if c.conversion is None and "alias_of" not in c.settings]


@dataclass
class DiscoverResult:
    client: str
    outcomes: list[PlatformOutcome]

    @property
    def failed(self) -> list[PlatformOutcome]:
        return [o for o in self.outcomes if o.error]

    def summary(self) -> dict[str, Any]:
        return {"client": self.client, "platforms": {
            o.platform.value: {
                "conversions": len(o.conversions), "unmapped": [c.name for c in o.unmapped],
                "error": o.error} for o in self.outcomes}}


def discover(config: ClientConfig, secrets: Secrets, store: Store,
             today: dt.date | None = None, days: int = 30) -> DiscoverResult:
    """List every conversion each enabled platform defines, map it, and store it."""
    until = today or dt.date.today()
    since = until - dt.timedelta(days=days)
    mapping = ConversionMap(config.definitions())
    redact = Redactor(secrets.values())
    outcomes = []
    for platform in config.enabled_platforms():
        outcome = PlatformOutcome(platform)
        try:
            found = list(_platform_conversions(platform, config, secrets, since, until))
            outcome.conversions = [mapping.mapped(c) for c in found]
            if platform is Platform.META:
                outcome.conversions = meta.mark_aliases(outcome.conversions)
            store.save_platform_conversions(outcome.conversions)
        except Exception as error:  # one platform failing must not stop the others
            outcome.error = redact(explain(error))
            log.error("%s: %s", platform.value, outcome.error)
        outcomes.append(outcome)
    return DiscoverResult(config.client.name, outcomes)


def _platform_conversions(platform: Platform, config: ClientConfig, secrets: Secrets,
                          since: dt.date, until: dt.date) -> Iterator[PlatformConversion]:
    if platform is Platform.GOOGLE_ADS and config.google_ads:
        client = google_ads.connect(config.google_ads, secrets)
        for customer_id in config.google_ads.customer_ids:
            yield from google_ads.conversion_actions(client, customer_id)
    elif platform is Platform.GA4 and config.ga4:
        data = ga4.connect(config.ga4, secrets)
        yield from ga4.event_names(data, config.ga4.property_id, since, until)
    elif platform is Platform.META and config.meta:
        api = meta.connect(config.meta, secrets)
        for account in config.meta.ad_account_ids:
            yield from meta.action_types(api, config.meta, account, since, until)
    elif platform is Platform.KLAVIYO and config.klaviyo:
        yield from klaviyo.metrics(klaviyo.connect(config.klaviyo, secrets))


def explain(error: Exception) -> str:
    """The platform's own account of an error when it is one, else the exception itself."""
    for explainer in EXPLAINERS:
        message = explainer(error)
        if message:
            return message
    return f"{type(error).__name__}: {error}"


def mapping_snippet(unmapped: list[PlatformConversion], taken: set[str]) -> str:
    """Ready-to-paste ``[[conversions]]`` tables for platform conversions no definition names.

    ``taken`` holds the canonical names already defined: a clash gets a platform suffix."""
    blocks = []
    for conversion in unmapped:
        kind, why = infer_kind(conversion.name, str(conversion.settings.get("category", "")))
        slug = re.sub(r"[^a-z0-9]+", "_", conversion.name.lower()).strip("_")
        slug = slug if re.match(r"[a-z]", slug) else f"c_{slug}"
        if slug in taken:
            slug = f"{slug}_{conversion.platform.value}"
        taken = taken | {slug}
        blocks.append("\n".join([
            "[[conversions]]", f'name = "{slug}"', f'kind = "{kind.value}"  # {why}',
            f"{conversion.platform.value} = {json.dumps(conversion.name)}"]))
    return "\n\n".join(blocks)
