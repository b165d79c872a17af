"""The loaders: the store in, the audit, the reconciliation and the funnel out."""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Iterable
from zoneinfo import ZoneInfo

from convsync.model import (
    ConversionStat,
    Platform,
)
from convsync.reconcile.audit import Audit, audit
from convsync.reconcile.common import NARROW
from convsync.reconcile.digest import Digest, digest
from convsync.reconcile.discrepancies import Reconciliation, reconcile
from convsync.reconcile.funnel import FunnelDiagnosis, diagnose_funnel
from convsync.settings import ClientConfig, ReconcileSection
from convsync.store import Store

# -- loaders: the store in, the findings out -------------------------------------------------

def settings_of(config: ClientConfig) -> ReconcileSection:
    return config.reconcile or ReconcileSection()


def load_audit(config: ClientConfig, store: Store, as_of: dt.date | None = None) -> Audit:
    """Audit the stored Google Ads actions (``convsync discover`` / ``pull`` store them)."""
    settings = settings_of(config)
    span = store.stats_span(Platform.GOOGLE_ADS)
    as_of = as_of or (span[1] if span else None)
    outcomes: dict[str, int] = {}
    reference: Iterable[ConversionStat] = ()
    if as_of is not None:
        start = as_of - dt.timedelta(days=settings.inactive_days - 1)
        zone = ZoneInfo(config.client.timezone)
        outcomes = store.journey_counts(
            Platform.CRM, dt.datetime.combine(start, dt.time(), zone),
            dt.datetime.combine(as_of + dt.timedelta(days=1), dt.time(), zone))
        reference = store.stats(platform=Platform.GA4, since=start, until=as_of)
    return audit(store.platform_conversions(Platform.GOOGLE_ADS),
                 itertools.chain(store.stats(platform=Platform.GOOGLE_ADS), reference),
                 config.definitions(), settings,
                 as_of=as_of, uploads=store.upload_counts(Platform.GOOGLE_ADS),
                 outcomes=outcomes, refusals=store.upload_refusals(Platform.GOOGLE_ADS),
                 upload_actions=config.google_ads.upload_actions if config.google_ads else None)


def stored_range(store: Store) -> tuple[dt.date, dt.date] | None:
    """First and last day of the stored daily stats, over every platform."""
    spans = [s for p in Platform if (s := store.stats_span(p)) is not None]
    if not spans:
        return None
    return min(s[0] for s in spans), max(s[1] for s in spans)


def load_digest(config: ClientConfig, store: Store, since: dt.date, until: dt.date) -> Digest:
    settings = settings_of(config)
    owners = {name or campaign_id: p for p in NARROW
              for campaign_id, name in store.stats_campaigns(p, since, until)}
    return digest(store.stats(since=since, until=until), config.definitions(),
                  Platform(settings.funnel_source), owners)


def load_reconciliation(config: ClientConfig, store: Store, since: dt.date,
                        until: dt.date) -> tuple[Reconciliation, FunnelDiagnosis | None]:
    """The discrepancy report and the funnel diagnosis of ``since..until``."""
    settings = settings_of(config)
    d = load_digest(config, store, since, until)
    return (reconcile(d, since, until, settings, config.client.timezone),
            diagnose_funnel(d, since, until, settings))
