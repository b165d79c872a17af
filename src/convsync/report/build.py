"""What the report shows, computed from the store: ``build_report`` -> ``Report``."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from convsync.errors import NoData
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
from convsync.values_table import MEANING, SHORT

SEVERITY_ORDER = ("error", "warning", "info")
UPLOAD = "track_and_upload"
ADVICE_ORDER = (UPLOAD, "analytics_only", "not_enough_evidence", "drop_noise")


@dataclass(frozen=True)
class PlatformTrend:
    """A platform's macro and micro conversions per day (in the zone it counts days in)."""

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

    @property
    def value_rows(self) -> list[ValueRow]:
        """The values table: one row per micro conversion, the uploaded ones first."""
        return sorted((value_row(v) for v in self.overall_values),
                      key=lambda r: (_advice_rank(r.recommendation), -r.volume, r.conversion))

    @property
    def values_basis(self) -> ValuesBasis | None:
        """What the stored values rest on (None: no values stored)."""
        return values_basis(self.overall_values)


@dataclass(frozen=True)
class ValueRow:
    """One micro conversion over all segments, as the report shows it.

    ``upload`` is what one event uploads, and is given only when the conversion is advised
    for upload and its value is not withheld: a dropped or withheld step never shows a
    figure there, whatever the stored row holds (``not_uploaded`` says why, in words)."""

    conversion: str
    volume: int
    upload: float | None
    not_uploaded: str
    """Why nothing is uploaded, in a few words without figures ('' when ``upload`` is given)."""
    estimate: float
    interval: tuple[float, float]
    lift: float | None
    lift_interval: tuple[float, float] | None
    compared_doers: int
    compared_doers_converted: int
    compared_others: int
    compared_others_converted: int
    coverage: float | None
    recommendation: str
    reasons: list[str]
    """The recommendation's reason, then why the value is withheld or not uploaded, or how the
    upload value is made."""

    @property
    def advice(self) -> str:
        """The recommendation in a word, as ``convsync values`` prints it."""
        return SHORT.get(self.recommendation, self.recommendation)

    @property
    def advice_meaning(self) -> str:
        return MEANING.get(self.advice, "")

    @property
    def compared(self) -> bool:
        return bool(self.compared_doers or self.compared_others)


def value_row(row: dict[str, Any]) -> ValueRow:
    """A stored valuation row (over all segments) as the report shows it. Rows stored by an
    older convsync (no upload value) show nothing uploaded."""
    recommendation = str(row.get("recommendation", ""))
    withheld = str(row.get("withheld") or "")
    if row.get("value") is None and not withheld:
        withheld = "no value"
    stored_upload, note = row.get("upload_value"), str(row.get("upload_note") or "")
    reasons = [str(row.get("reason") or "")]
    upload: float | None = None
    if recommendation != UPLOAD:
        why = f"advice: {SHORT.get(recommendation, recommendation)}"
    elif withheld:
        why = "value withheld"
        reasons.append(f"value withheld: {withheld}")
    elif "upload_value" not in row:
        why = "no upload value stored"
        reasons.append("computed by an older convsync: run convsync values again")
    elif stored_upload is None or float(stored_upload) <= 0:
        why = "no upload value"
        reasons.append(f"not uploaded: {note}" if note else "not uploaded")
    else:
        upload, why = float(stored_upload), ""
        reasons.append(f"upload value: {note}" if note else "upload value: its value")
    lift_interval = row.get("lift_interval")
    return ValueRow(
        conversion=str(row["conversion"]), volume=int(row.get("volume") or 0), upload=upload,
        not_uploaded=why, estimate=float(row["estimate"]),
        interval=(float(row["interval"][0]), float(row["interval"][1])),
        lift=None if row.get("lift") is None else float(row["lift"]),
        lift_interval=None if lift_interval is None else (float(lift_interval[0]),
                                                          float(lift_interval[1])),
        compared_doers=int(row.get("compared_doers") or 0),
        compared_doers_converted=int(row.get("compared_doers_converted") or 0),
        compared_others=int(row.get("compared_others") or 0),
        compared_others_converted=int(row.get("compared_others_converted") or 0),
        coverage=None if row.get("coverage") is None else float(row["coverage"]),
        recommendation=recommendation, reasons=[r for r in reasons if r])


def _advice_rank(recommendation: str) -> int:
    return (ADVICE_ORDER.index(recommendation) if recommendation in ADVICE_ORDER
            else len(ADVICE_ORDER))


@dataclass(frozen=True)
class ValuesBasis:
    """The history the values rest on: journeys from ``window_start`` to ``as_of``; the lift
    compares people first seen from ``compared_from`` (after the burn-in) to ``compared_to``
    (so each had the horizon to convert)."""

    as_of: dt.datetime
    horizon_days: float
    window_start: dt.datetime | None
    history_days: float
    burn_in_days: float

    @property
    def compared_from(self) -> dt.datetime | None:
        if self.window_start is None:
            return None
        return self.window_start + dt.timedelta(days=self.burn_in_days)

    @property
    def compared_to(self) -> dt.datetime:
        return self.as_of - dt.timedelta(days=self.horizon_days)

    @property
    def anyone_compared(self) -> bool:
        """Whether the history is longer than the burn-in plus the horizon (else nobody can
        be compared yet, and no lift is given)."""
        start = self.compared_from
        return start is not None and start < self.compared_to


def values_basis(rows: list[dict[str, Any]]) -> ValuesBasis | None:
    if not rows:
        return None
    row = rows[0]
    start = row.get("window_start")
    return ValuesBasis(
        as_of=dt.datetime.fromisoformat(str(row["as_of"])),
        horizon_days=float(row["horizon_days"]),
        window_start=dt.datetime.fromisoformat(start) if start else None,
        history_days=float(row.get("history_days") or 0.0),
        burn_in_days=float(row.get("burn_in_days") or 0.0))


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
