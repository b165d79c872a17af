"""What the report shows, computed from the store: ``build_report`` -> ``Report``."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from convsync.model import Kind
from convsync.reconcile import (
    Audit,
    Digest,
    Finding,
    FunnelDiagnosis,
    Reconciliation,
    diagnose_funnel,
    load_audit,
    load_digest,
    reconcile,
    settings_of,
    stored_range,
)
from convsync.settings import ClientConfig, ReconcileSection
from convsync.store import Store
from convsync.valuation import ALL_SEGMENTS

SEVERITY_ORDER = ("error", "warning", "info")


@dataclass(frozen=True)
class PlatformTrend:
    """A platform's macro and micro conversions per day (its own time zone)."""

    platform: str
    timezone: str
    days: list[dt.date]
    macro: list[float]
    micro: list[float]


@dataclass(frozen=True)
class Report:
    client: str
    timezone: str
    currency: str
    generated_at: dt.datetime
    since: dt.date
    until: dt.date
    settings: ReconcileSection
    audit: Audit
    reconciliation: Reconciliation
    funnel: FunnelDiagnosis | None
    trends: list[PlatformTrend]
    values: list[dict[str, Any]]
    """The latest micro-conversion values ``convsync values`` stored (valuation rows)."""
    notes: list[str]

    @property
    def findings(self) -> list[Finding]:
        """Every finding, errors first."""
        found = (self.audit.findings + self.reconciliation.findings
                 + (self.funnel.findings if self.funnel else []))
        return sorted(found, key=lambda f: SEVERITY_ORDER.index(f.severity))

    @property
    def alerts(self) -> list[Finding]:
        return [f for f in self.findings if f.alert]

    @property
    def overall_values(self) -> list[dict[str, Any]]:
        """The values over all segments (one row per micro conversion)."""
        return [v for v in self.values if v.get("segment") == ALL_SEGMENTS]


class NoData(LookupError):
    """The store holds no daily stats to report on."""


def build_report(config: ClientConfig, store: Store, since: dt.date | None = None,
                 until: dt.date | None = None, now: dt.datetime | None = None) -> Report:
    """Everything the report shows, for ``since..until`` (default: all stored days)."""
    stored = stored_range(store)
    if stored is None:
        raise NoData("the store holds no daily stats: run convsync pull first")
    since, until = since or stored[0], until or stored[1]
    now = now or dt.datetime.now(dt.UTC)
    settings = settings_of(config)
    d = load_digest(config, store, since, until)
    tz = config.client.timezone
    values = store.micro_values(config.client.name)
    notes = [] if values else ["no micro-conversion values stored yet: run convsync values"]
    return Report(
        client=config.client.name, timezone=tz, currency=config.client.currency,
        generated_at=now, since=since, until=until, settings=settings,
        audit=load_audit(config, store), reconciliation=reconcile(d, since, until, settings, tz),
        funnel=diagnose_funnel(d, since, until, settings), trends=trends(d, since, until),
        values=values, notes=notes)


def trends(d: Digest, since: dt.date, until: dt.date) -> list[PlatformTrend]:
    """Per platform, the day totals of its macro and of its micro conversions."""
    days = [since + dt.timedelta(days=i) for i in range((until - since).days + 1)]
    out = []
    for platform in d.platforms():
        totals = {Kind.MACRO: [0.0] * len(days), Kind.MICRO: [0.0] * len(days)}
        for conversion, kind in d.kinds.items():
            daily = d.daily_of(d.headline(conversion, platform))
            for i, day in enumerate(days):
                totals[kind][i] += daily.get(day, [0.0])[0]
        if any(totals[Kind.MACRO]) or any(totals[Kind.MICRO]):
            out.append(PlatformTrend(platform.value, d.timezones[platform], days,
                                     totals[Kind.MACRO], totals[Kind.MICRO]))
    return out
