"""In-column audit, cross-platform discrepancies and funnel diagnosis.

Pure functions over what the store returns (``PlatformConversion``, ``ConversionStat`` rows),
and ``load_*`` functions that query a ``Store`` and call them. Every judgement ends as a
``Finding``: a severity, a message, the evidence (numbers), the fix in the platform's terms,
and ``alert`` when it is beyond tolerance (the commands then exit 3). docs/reconcile.md
explains each finding, each cause heuristic and each tolerance.

Days are each platform's own calendar days (its account time zone): lining them up by date
is what the time-zone heuristic looks at.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from zoneinfo import ZoneInfo

import numpy as np

from convsync.model import (
    Basis,
    ConversionDefinition,
    ConversionMap,
    ConversionStat,
    Kind,
    Platform,
    PlatformConversion,
    infer_kind,
)
from convsync.settings import ClientConfig, ReconcileSection
from convsync.store import Store

Severity = Literal["error", "warning", "info"]
ALL = "(all campaigns)"
NOT_SET = "(not set)"
OTHER = "other"
"""Traffic group of the campaigns no ad platform claims (email, organic, (not set))."""
OFFLINE_TYPES = frozenset({"UPLOAD_CLICKS", "UPLOAD_CALLS", "STORE_SALES",
                           "STORE_SALES_DIRECT_UPLOAD", "SALESFORCE"})
"""Google Ads action types whose conversions only exist once someone uploads them."""
SKIPPED_STATUSES = frozenset({"REMOVED", "HIDDEN"})
CLICK_WINDOWS = ("28d_click", "7d_click", "1d_click")
"""Meta click windows, widest first: they nest, so only the widest pulled one is counted."""
VIEW_WINDOWS = ("1d_view", "1d_ev")
GOALS_PATH = "Google Ads > Goals > Conversions > Summary"
NAMES = {"google_ads": "Google Ads", "ga4": "GA4", "meta": "Meta", "klaviyo": "Klaviyo",
         "crm": "CRM"}
_NARROW = (Platform.GOOGLE_ADS, Platform.META)
"""Platforms that see only their own campaigns."""
NOISE_Z = 3.0
"""A period difference beyond tolerance must also exceed this many Poisson standard
deviations (sqrt of the two counts' sum) to be judged: small campaigns differ by chance."""


def name_of(platform: Platform | str) -> str:
    """A platform's name as people write it (Google Ads, GA4, ...)."""
    key = platform.value if isinstance(platform, Platform) else platform
    return NAMES.get(key, key)


@dataclass(frozen=True)
class Finding:
    """One thing worth a person's attention, with the numbers behind it and the fix."""

    area: str  # audit | reconcile | funnel
    code: str
    severity: Severity
    subject: str
    message: str
    fix: str
    evidence: dict[str, Any] = field(default_factory=dict)
    alert: bool = False
    """Beyond tolerance: ``convsync reconcile`` / ``report`` exit with code 3."""
    account: str = ""
    """The platform account it is about (the audit's: a Google Ads customer id)."""


def _r(x: float, digits: int = 2) -> float:
    return round(float(x), digits)


def as_data(value: Any) -> Any:
    """A result (dataclasses, lists, dicts) as plain JSON-able data; dates, enums and pydantic
    models are left for the JSON encoder's ``default``."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: as_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): as_data(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [as_data(v) for v in value]
    return value


# -- in-column audit ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ActionAudit:
    """One Google Ads conversion action as the audit sees it."""

    account_id: str
    action_id: str
    name: str
    category: str
    type: str
    conversion: str | None
    kind: Kind
    kind_source: str
    in_column: bool
    conversions: float
    """All conversions (click date) in the audit window."""
    value: float
    last_conversion: dt.date | None
    uploads: int
    """Rows convsync's upload ledger holds for this action."""

    @property
    def offline(self) -> bool:
        return self.type in OFFLINE_TYPES


@dataclass(frozen=True)
class Audit:
    as_of: dt.date | None
    window: tuple[dt.date, dt.date] | None
    actions: list[ActionAudit]
    findings: list[Finding]
    notes: list[str]


@dataclass
class _Activity:
    """What the stats say about one action: window totals, daily counts, last conversion."""

    count: float = 0.0
    value: float = 0.0
    last: dt.date | None = None
    daily: dict[dt.date, float] = field(default_factory=dict)


def audit(actions: Iterable[PlatformConversion], stats: Iterable[ConversionStat],
          definitions: Sequence[ConversionDefinition], settings: ReconcileSection, *,
          as_of: dt.date | None, uploads: Mapping[str, int] | None = None,
          outcomes: Mapping[str, int] | None = None,
          refusals: Mapping[str, Mapping[str, int]] | None = None) -> Audit:
    """Audit the Google Ads conversion actions against what belongs in the Conversions column.

    ``stats``: the Google Ads daily stats (click-date rows are used). ``as_of``: the last day
    of the window of ``settings.inactive_days`` days (None: no stats, activity not judged).
    ``uploads``: convsync's upload ledger rows per action id (Google: the push side keys its
    ledger so) or name. ``outcomes``: offline outcomes
    (CRM) per canonical conversion in the window, to tell an idle offline action from one
    whose uploads do not arrive. ``refusals``: per action id, the uploads Google refused, by
    its reason (from the push ledger), quoted where uploads do not arrive."""
    window = (None if as_of is None else
              (as_of - dt.timedelta(days=settings.inactive_days - 1), as_of))
    activity, first_day = _activity(stats, window)
    mapping = ConversionMap(list(definitions))
    ledger = uploads or {}
    rows = [_action_row(a, mapping, activity.get((a.account_id, a.name), _Activity()),
                        ledger.get(a.platform_id) or ledger.get(a.name, 0))
            for a in actions if str(a.settings.get("status", "")) not in SKIPPED_STATUSES]
    notes: list[str] = []
    findings: list[Finding] = []
    for account in sorted({r.account_id for r in rows}):
        mine = [r for r in rows if r.account_id == account]
        found = _column_findings(mine, settings) + _double_counting(mine, activity, window)
        covered = (window is not None and first_day.get(account) is not None
                   and first_day[account] <= window[0])
        if covered:
            idle, idle_notes = _inactive(mine, outcomes or {}, settings, refusals or {})
            found += idle
            notes += idle_notes
        else:
            notes.append(f"account {account}: the stored Google Ads stats do not cover the last "
                         f"{settings.inactive_days} days, so idle actions were not judged: "
                         f"backfill them (convsync backfill --since ...)")
        findings += [dataclasses.replace(f, account=account) for f in found]
    return Audit(as_of, window, rows, findings, notes)


def _activity(stats: Iterable[ConversionStat], window: tuple[dt.date, dt.date] | None,
              ) -> tuple[dict[tuple[str, str], _Activity], dict[str, dt.date]]:
    found: dict[tuple[str, str], _Activity] = defaultdict(_Activity)
    first_day: dict[str, dt.date] = {}
    for s in stats:
        if s.platform is not Platform.GOOGLE_ADS or s.basis is not Basis.CLICK_DATE:
            continue
        if s.account_id not in first_day or s.date < first_day[s.account_id]:
            first_day[s.account_id] = s.date
        if not s.count:
            continue
        a = found[(s.account_id, s.platform_conversion)]
        a.last = max(a.last or s.date, s.date)
        if window is not None and window[0] <= s.date <= window[1]:
            a.count += s.count
            a.value += s.value
            a.daily[s.date] = a.daily.get(s.date, 0.0) + s.count
    return found, first_day


def _action_row(action: PlatformConversion, mapping: ConversionMap, seen: _Activity,
                uploads: int) -> ActionAudit:
    category = str(action.settings.get("category", ""))
    definition = mapping.lookup(Platform.GOOGLE_ADS, action.name)
    if definition is not None:
        kind, source = definition.kind, f"from config: {definition.name}"
    else:
        kind, why = infer_kind(action.name, category)
        source = f"inferred: {why}"
    in_column = action.in_column
    if in_column is None:
        in_column = bool(action.settings.get("include_in_conversions_metric"))
    return ActionAudit(
        account_id=action.account_id, action_id=action.platform_id, name=action.name,
        category=category, type=str(action.settings.get("type", "")),
        conversion=definition.name if definition else None, kind=kind, kind_source=source,
        in_column=in_column, conversions=_r(seen.count), value=_r(seen.value),
        last_conversion=seen.last, uploads=uploads)


def _column_findings(rows: list[ActionAudit], settings: ReconcileSection) -> list[Finding]:
    """Micro actions counted in column (and convsync's micro uploads counted without opt-in),
    and macro conversions none of whose actions is counted."""
    column = [r for r in rows if r.in_column]
    column_total = sum(r.conversions for r in column)
    macros = [r for r in column if r.kind is Kind.MACRO]
    macro_count = sum(r.conversions for r in macros)
    macro_value = sum(r.value for r in macros) / macro_count if macro_count else 0.0
    findings: list[Finding] = []
    for r in column:
        if r.kind is not Kind.MICRO or (r.uploads and settings.primary_micro_uploads):
            continue
        evidence = {"action": r.name, "kind_source": r.kind_source, "conversions": r.conversions,
                    "column_conversions": _r(column_total),
                    "share_of_column": _r(r.conversions / column_total if column_total else 0, 3),
                    "value_per_conversion": _r(r.value / r.conversions if r.conversions else 0),
                    "macro_value_per_conversion": _r(macro_value), "uploads": r.uploads}
        findings.append(_micro_upload(r, evidence) if r.uploads else _micro_in_column(r, evidence))
    counted = {r.conversion or f"category {r.category}" for r in rows if r.in_column}
    groups: dict[str, list[ActionAudit]] = defaultdict(list)
    for r in rows:  # an unmapped macro action stands for its category
        if r.kind is Kind.MACRO:
            groups[r.conversion or f"category {r.category}"].append(r)
    for name, group in sorted(groups.items()):
        # in column through any action of the account, or nothing counted to bring in (an
        # idle import action): making one primary would count its sales again, or nothing
        if name not in counted and sum(r.conversions for r in group) > 0:
            findings.append(_macro_left_out(name, group))
    return findings


def _micro_in_column(r: ActionAudit, evidence: dict[str, Any]) -> Finding:
    share = evidence["share_of_column"]
    return Finding(
        "audit", "micro_in_column", "error" if r.conversions else "warning", r.name,
        f"micro conversion '{r.name}' (kind {r.kind_source}) is counted in the Conversions "
        f"column: {r.conversions:g} of the column's {evidence['column_conversions']:g} "
        f"conversions in the window ({share:.0%}), each worth "
        f"{evidence['value_per_conversion']:g} against "
        f"{evidence['macro_value_per_conversion']:g} for a macro conversion: bidding treats "
        "them as equals",
        f"{GOALS_PATH} > '{r.name}' > Edit settings > Action optimization: Secondary action "
        "(it stays in All conversions). To bid on it, let convsync upload it value-weighted "
        "and opt in with [reconcile] primary_micro_uploads = true.", evidence)


def _micro_upload(r: ActionAudit, evidence: dict[str, Any]) -> Finding:
    return Finding(
        "audit", "micro_upload_primary", "error", r.name,
        f"'{r.name}' receives convsync's micro-conversion uploads ({r.uploads} in the ledger) "
        f"and is a primary action, but you did not opt in: {r.conversions:g} micro "
        "conversions drive bidding as if they were sales",
        f"{GOALS_PATH} > '{r.name}' > Edit settings > Action optimization: Secondary action; "
        "or, if bidding on value-weighted micro conversions is intended, set "
        "[reconcile] primary_micro_uploads = true.", evidence)


def _macro_left_out(name: str, group: list[ActionAudit]) -> Finding:
    names = ", ".join(f"'{r.name}'" for r in group)
    best = max(group, key=lambda r: (r.conversions, not r.type.startswith("GOOGLE_ANALYTICS")))
    # on a tie, the Google Ads tag rather than a GA4 import
    return Finding(
        "audit", "macro_not_in_column", "warning", names,
        f"macro conversion {name} is in no action counted in the Conversions column ({names}: "
        f"{sum(r.conversions for r in group):g} conversions in the window, in All conversions "
        "only): bidding does not see the sales",
        f"{GOALS_PATH} > '{best.name}' > Edit settings > Action optimization: Primary action, "
        "and include its goal in the campaigns' goals (account-default goals).",
        {"conversion": name, "actions": {r.name: r.conversions for r in group}})


def _double_counting(rows: list[ActionAudit], activity: Mapping[tuple[str, str], _Activity],
                     window: tuple[dt.date, dt.date] | None) -> list[Finding]:
    """Two primary actions of one conversion (its category when unmapped) counting the same
    events: their counts are alike and move together from day to day."""
    groups: dict[str, list[ActionAudit]] = defaultdict(list)
    for r in rows:
        if r.in_column:
            groups[r.conversion or f"category {r.category}"].append(r)
    findings = []
    for name, group in sorted(groups.items()):
        if len(group) > 1:
            group.sort(key=lambda r: -r.conversions)
            series = [activity.get((r.account_id, r.name), _Activity()) for r in group[:2]]
            findings.append(_double_counting_finding(name, group,
                                                     _correlation(series, _days(window))))
    return findings


def _double_counting_finding(name: str, group: list[ActionAudit],
                             corr: float | None) -> Finding:
    """``group``: the primary actions of one conversion, busiest first."""
    first, second = group[0], group[1]
    total = sum(r.conversions for r in group)
    same = second.conversions >= 0.5 * first.conversions > 0 and corr is not None and corr >= 0.5
    keep = min(group, key=lambda r: (r.type.startswith("GOOGLE_ANALYTICS"), -r.conversions))
    times = _r(total / first.conversions if first.conversions else 0)
    names = " and ".join(f"'{r.name}'" for r in group)
    both = "both" if len(group) == 2 else "all"
    if same:
        message = (f"{names} are {both} primary for {name} and count the same events: the "
                   f"Conversions column counts {total:g} where there are about "
                   f"{first.conversions:g} ({times:g}x); their daily counts move together "
                   f"(r = {corr:.2f})")
    else:
        message = (f"{names} are {both} primary for {name}: check that they count different "
                   "events, or the Conversions column counts some twice")
    fix = "; ".join(f"{GOALS_PATH} > '{r.name}' > Edit settings > Action optimization: "
                    "Secondary action" for r in group if r is not keep)
    return Finding("audit", "double_counting", "error" if same else "warning", names, message,
                   f"{fix} (keep '{keep.name}' primary).",
                   {"conversion": name, "actions": {r.name: r.conversions for r in group},
                    "column_conversions": _r(total), "times_the_largest": times,
                    "daily_correlation": None if corr is None else _r(corr, 3),
                    "keep": keep.name})


def _days(window: tuple[dt.date, dt.date] | None) -> list[dt.date]:
    if window is None:
        return []
    return [window[0] + dt.timedelta(days=i) for i in range((window[1] - window[0]).days + 1)]


def _correlation(series: Sequence[_Activity], days: Sequence[dt.date]) -> float | None:
    a, b = (np.array([s.daily.get(d, 0.0) for d in days]) for s in series)
    if len(days) < 3 or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def _inactive(rows: list[ActionAudit], outcomes: Mapping[str, int],
              settings: ReconcileSection, refusals: Mapping[str, Mapping[str, int]]
              ) -> tuple[list[Finding], list[str]]:
    """Actions with no conversions in the window (findings), and notes. An offline import is
    only idle, not broken, while there is nothing to upload to it: flagged when outcomes
    exist or uploads stopped, else noted."""
    days = settings.inactive_days
    findings = []
    notes = []
    for r in rows:
        if r.conversions:
            continue
        pending = outcomes.get(r.conversion or "", 0)
        refused = dict(sorted(refusals.get(r.action_id, {}).items(), key=lambda kv: -kv[1]))
        evidence = {"action": r.name, "days": days, "last_conversion": r.last_conversion,
                    "in_column": r.in_column, "offline_outcomes": pending,
                    "refused_uploads": refused}
        said = ("; Google refused convsync's uploads to it: " + ", ".join(
            f"{reason} {count:,}" for reason, count in list(refused.items())[:3])
            if refused else "")
        if r.offline and pending:
            findings.append(Finding(
                "audit", "uploads_not_arriving", "warning", r.name,
                f"'{r.name}' recorded no conversions in {days} days while {pending} "
                f"{r.conversion} outcomes were imported for that time: the uploads do not "
                f"arrive{said}",
                "Run `convsync uploads` for what Google did with each upload and what to fix "
                "for each reason (Google Ads > Goals > Conversions > Uploads shows the same).",
                evidence))
        elif r.offline and r.last_conversion:
            findings.append(Finding(
                "audit", "uploads_stopped", "warning", r.name,
                f"'{r.name}' recorded no conversions in {days} days; the last was on "
                f"{r.last_conversion}: the uploads stopped",
                "Check the job that uploads to it (convsync push, or the CRM connector).",
                evidence))
        elif r.offline:
            notes.append(f"'{r.name}' has no conversions in {days} days: it is an offline "
                         "import with nothing to upload yet")
        else:
            findings.append(Finding(
                "audit", "inactive_action", "warning" if r.in_column else "info", r.name,
                f"'{r.name}' recorded no conversions in {days} days"
                + (f" (the last on {r.last_conversion})" if r.last_conversion else "")
                + (": a primary action without data leaves bidding blind" if r.in_column
                   else ""),
                "Check its tag fires on the page (Tag Assistant) or that its GA4 event still "
                f"exists; if it is obsolete, {GOALS_PATH} > '{r.name}' > Remove.", evidence))
    return findings, notes


# -- the digest: one pass over the stored stats ------------------------------------------------

VariantKey = tuple[str, Platform, Basis, str, str]
"""(conversion, platform, basis, platform conversion, attribution window)."""
Cells = dict[tuple[dt.date, str], list[float]]
"""(day, campaign) -> [count, value]."""


class Digest:
    """The stored daily stats of a date range, kept at the grain each diagnosis needs: per day
    and campaign for the macro conversions (every platform) and for the ladder of the funnel
    source; per day for every mapped conversion. Build it with ``digest(stats, ...)``."""

    def __init__(self, definitions: Sequence[ConversionDefinition], funnel_source: Platform,
                 owners: Mapping[str, Platform]) -> None:
        self.definitions = list(definitions)
        self.macro = [d.name for d in definitions if d.kind is Kind.MACRO]
        laddered = sorted((d for d in definitions if d.ladder_position is not None),
                          key=lambda d: d.ladder_position or 0)
        self.ladder = [d.name for d in laddered]
        self.kinds = {d.name: d.kind for d in definitions}
        self.funnel_source = funnel_source
        self.owners = dict(owners)
        """Campaign -> the ad platform that runs it (Google Ads or Meta)."""
        self.cells: dict[VariantKey, Cells] = defaultdict(dict)
        self.daily: dict[VariantKey, Cells] = defaultdict(dict)
        """Per day and traffic group: the platform that runs the campaign, or OTHER."""
        self.in_column: dict[str, bool] = {}
        self.timezones: dict[Platform, str] = {}
        self.spans: dict[Platform, tuple[dt.date, dt.date]] = {}

    def add(self, s: ConversionStat) -> None:
        p = s.platform
        first, last = self.spans.get(p, (s.date, s.date))
        self.spans[p] = (min(first, s.date), max(last, s.date))
        self.timezones.setdefault(p, s.timezone)
        campaign = _campaign(s)
        if s.conversion is None or not (s.count or s.value):
            return
        key = (s.conversion, p, s.basis, s.platform_conversion, s.window)
        if p is Platform.GOOGLE_ADS:
            self.in_column[s.platform_conversion] = bool(s.in_column)
        owner = p if p in _NARROW else self.owners.get(campaign)
        _add(self.daily[key], (s.date, owner.value if owner else OTHER), s.count, s.value)
        if s.conversion in self.macro or (p is self.funnel_source
                                          and s.conversion in self.ladder):
            _add(self.cells[key], (s.date, campaign), s.count, s.value)

    def platforms(self) -> list[Platform]:
        return [p for p in Platform if p in self.spans]

    def variants(self, conversion: str, platform: Platform) -> list[VariantKey]:
        return sorted(k for k in self.daily if k[0] == conversion and k[1] == platform)

    def headline(self, conversion: str, platform: Platform) -> list[VariantKey]:
        """The variants that make a platform's own figure for a conversion.

        Google Ads: the actions counted in column (click date), else the busiest action
        alone (several actions of one conversion usually count the same events). Meta: the
        widest click window pulled plus the view windows (Meta's own attribution setting).
        GA4 and Klaviyo: every name mapped to the conversion."""
        keys = self.variants(conversion, platform)
        if platform is Platform.GOOGLE_ADS:
            clicks = [k for k in keys if k[2] is Basis.CLICK_DATE]
            primary = [k for k in clicks if self.in_column.get(k[3])]
            return primary or ([max(clicks, key=self._total)] if clicks else [])
        if platform is Platform.META:
            windows = {k[4] for k in keys}
            widest = next((w for w in CLICK_WINDOWS if w in windows), None)
            return [k for k in keys if k[4] == widest or k[4] in VIEW_WINDOWS]
        return keys

    def conversion_date_variants(self, conversion: str) -> list[VariantKey]:
        """Google Ads' headline actions by conversion date, when that basis was pulled."""
        names = {k[3] for k in self.headline(conversion, Platform.GOOGLE_ADS)}
        return [k for k in self.variants(conversion, Platform.GOOGLE_ADS)
                if k[2] is Basis.CONVERSION_DATE and k[3] in names]

    def dated(self, conversion: str, platform: Platform) -> list[VariantKey]:
        """The headline variants, by conversion date where that basis was pulled: lining
        days up across platforms is about when things happened, not when the click was."""
        if platform is Platform.GOOGLE_ADS:
            return self.conversion_date_variants(conversion) or self.headline(
                conversion, platform)
        return self.headline(conversion, platform)

    def cells_of(self, keys: Iterable[VariantKey]) -> Cells:
        merged: Cells = {}
        for key in keys:
            for where, (n, v) in self.cells.get(key, {}).items():
                _add(merged, where, n, v)
        return merged

    def daily_of(self, keys: Iterable[VariantKey],
                 groups: Collection[str] | None = None) -> dict[dt.date, list[float]]:
        """Daily totals of the variants, over the traffic groups given (None: all)."""
        merged: dict[dt.date, list[float]] = {}
        for key in keys:
            for (day, group), (n, v) in self.daily.get(key, {}).items():
                if groups is None or group in groups:
                    _add(merged, day, n, v)
        return merged

    def basis(self, platform: Platform) -> Basis:
        keys = [k for k in self.daily if k[1] is platform]
        return keys[0][2] if keys and all(k[2] is keys[0][2] for k in keys) else (
            Basis.CLICK_DATE if platform in (Platform.GOOGLE_ADS, Platform.META)
            else Basis.CONVERSION_DATE)

    def _total(self, key: VariantKey) -> float:
        return sum(n for n, _ in self.daily.get(key, {}).values())


def digest(stats: Iterable[ConversionStat], definitions: Sequence[ConversionDefinition],
           funnel_source: Platform, owners: Mapping[str, Platform]) -> Digest:
    """``owners``: each Google Ads and Meta campaign (by name) and its platform, known before
    the stats stream by (GA4's rows come first and are grouped by them)."""
    found = Digest(definitions, funnel_source, owners)
    for s in stats:
        found.add(s)
    return found


def _campaign(s: ConversionStat) -> str:
    return s.campaign_name or s.campaign_id or ALL


def _add(cells: dict[Any, list[float]], key: Any, count: float, value: float) -> None:
    cell = cells.get(key)
    if cell is None:
        cells[key] = [count, value]
    else:
        cell[0] += count
        cell[1] += value


# -- discrepancies -----------------------------------------------------------------------------

COVERAGE_GAP = (0.01, 0.30)
"""The gaps a coverage cause may explain: under 1% there is nothing to explain; GA4's
blocked tags and declined consent cost it 5-15% of visitors, so a gap beyond 30% has another
cause (a duplicate tag, a broken tag)."""


@dataclass(frozen=True)
class Cause:
    """A likely cause of a difference: what it is, for which platform, and its numbers."""

    code: str
    platform: str
    text: str
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Comparison:
    """One platform against the reference over the settled days, for one campaign (or all)."""

    conversion: str
    campaign: str
    platform: str
    reference: str
    first: dt.date
    last: dt.date
    basis: str
    """The platform's figures compared: by click date or by conversion date."""
    count: float
    reference_count: float
    value: float
    reference_value: float
    ratio: float | None
    beyond_tolerance: bool
    causes: list[Cause]


@dataclass(frozen=True)
class Figure:
    count: float
    value: float


@dataclass(frozen=True)
class DayRow:
    """One day, campaign and macro conversion: each platform's figure side by side, the
    reference's figure over each platform's own campaigns, and the likely causes."""

    date: dt.date
    campaign: str
    conversion: str
    figures: dict[str, Figure]
    expected: dict[str, float]
    """Platform -> the reference's count over the campaigns that platform covers."""
    causes: list[Cause]
    status: str  # ok | filling | explained | differs


@dataclass(frozen=True)
class Shift:
    """How a platform's days line up with the reference's, on the traffic both see:
    ``fitted`` is the share of a day by which its days run ahead (its day D holds that share
    of the reference's D-1; negative: of D+1), fitted on the daily counts of every mapped
    conversion; ``expected`` is what the two time zones imply."""

    platform: str
    reference: str
    timezone: str
    reference_timezone: str
    hours_apart: float
    expected: float
    fitted: float
    r_same_day: float
    r_shifted: float
    """Correlation of the daily counts with the reference's same days, and with the fitted
    mix of its days."""
    days: int


@dataclass(frozen=True)
class Reconciliation:
    since: dt.date
    until: dt.date
    reference: str
    timezones: dict[str, str]
    comparisons: list[Comparison]
    days: list[DayRow]
    shifts: list[Shift]
    findings: list[Finding]
    notes: list[str]


def reconcile(d: Digest, since: dt.date, until: dt.date, settings: ReconcileSection,
              client_timezone: str) -> Reconciliation:
    """Compare every macro conversion across platforms, per day and campaign, and over the
    settled days; name the likely causes and flag what is beyond tolerance."""
    notes: list[str] = []
    reference = _reference(d, settings)
    shifts = _shifts(d, reference, since, until, settings) if reference else []
    comparisons: list[Comparison] = []
    rows: list[DayRow] = []
    if reference is None:
        notes.append("no platform has macro conversions in the range: nothing to reconcile")
    else:
        if reference.value != settings.reference:
            notes.append(f"the reference {settings.reference} has no data in the range; "
                         f"{name_of(reference)} is used instead")
        for conversion in d.macro:
            scopes = _scopes(d, conversion, reference, notes)
            if not scopes:
                continue
            ctx = _Context(d, conversion, reference, scopes, since, until, settings, shifts)
            comparisons += ctx.comparisons()
            rows += ctx.day_rows()
    middle = since + (until - since) / 2
    findings = _discrepancy_findings(comparisons, settings) + _shift_findings(
        shifts, settings, client_timezone, middle)
    return Reconciliation(since, until, reference.value if reference else settings.reference,
                          {p.value: tz for p, tz in d.timezones.items()}, comparisons, rows,
                          shifts, findings, notes)


def _reference(d: Digest, settings: ReconcileSection) -> Platform | None:
    wanted = Platform(settings.reference)
    with_macro = [p for p in d.platforms()
                  if any(d.variants(c, p) for c in d.macro)]
    if wanted in with_macro:
        return wanted
    order = (Platform.GA4, Platform.KLAVIYO, Platform.GOOGLE_ADS, Platform.META)
    return next((p for p in order if p in with_macro), None)


Scope = frozenset[str] | None
"""The campaigns a comparison covers; None: the platforms' totals only (no campaigns)."""


def _scopes(d: Digest, conversion: str, reference: Platform,
            notes: list[str]) -> dict[Platform, Scope]:
    """Which platforms compare with the reference for a conversion, and over which campaigns:
    an ad platform over its own campaigns; GA4 over all; Klaviyo (no campaigns) by totals,
    and only against a platform that sees all traffic too."""
    ref_cells = d.cells_of(d.headline(conversion, reference))
    if not ref_cells:
        return {}
    scopes: dict[Platform, Scope] = {}
    for p in d.platforms():
        cells = d.cells_of(d.headline(conversion, p)) if p is not reference else {}
        if not cells:
            continue
        if _shared_traffic(p, reference) is None:
            notes.append(f"{conversion}: {name_of(p)} and {name_of(reference)} cover different "
                         "traffic (different campaigns, or no campaigns): not compared")
        elif Platform.KLAVIYO in (p, reference):
            scopes[p] = None
        else:
            owned = cells if p in _NARROW else ref_cells
            scopes[p] = frozenset(c for _, c in owned if c != ALL)
    return scopes


def _shared_traffic(p: Platform, reference: Platform,
                    ) -> tuple[frozenset[str] | None, frozenset[str] | None] | None:
    """The traffic groups of each side that see the same people (None: all of its traffic),
    or None when the two see different traffic: two ad platforms (their own campaigns
    each), or Klaviyo (no campaigns) against an ad platform."""
    if p in _NARROW and reference in _NARROW:
        return None
    if Platform.KLAVIYO in (p, reference) and (p in _NARROW or reference in _NARROW):
        return None
    if p in _NARROW:
        return None, frozenset({p.value})
    if reference in _NARROW:
        return frozenset({reference.value}), None
    return None, None


class _Series:
    """One platform's cells for one conversion, indexed for the questions reconcile asks:
    a day's count (one campaign, or a scope's sum) and period totals per campaign."""

    def __init__(self, cells: Cells) -> None:
        self.cells = cells
        self.by_day: dict[dt.date, dict[str, list[float]]] = defaultdict(dict)
        for (day, campaign), (n, v) in cells.items():
            _add(self.by_day[day], campaign, n, v)
        self._totals: dict[tuple[dt.date, dt.date], dict[str, list[float]]] = {}

    def __bool__(self) -> bool:
        return bool(self.cells)

    def at(self, day: dt.date, campaign: str, scope: Scope) -> float:
        """The count of one day: of one campaign, or (ALL) of the scope's campaigns."""
        return self.figure(day, campaign, scope)[0]

    def figure(self, day: dt.date, campaign: str, scope: Scope) -> tuple[float, float]:
        """Count and value of one day: of one campaign, or (ALL) of the scope's campaigns."""
        row = self.by_day.get(day, {})
        if campaign != ALL:
            n, v = row.get(campaign, (0.0, 0.0))
            return n, v
        kept = [cell for c, cell in row.items() if scope is None or c in scope]
        return sum(n for n, _ in kept), sum(v for _, v in kept)

    def total(self, first: dt.date, last: dt.date, scope: Scope,
              campaign: str) -> tuple[float, float]:
        """Count and value over ``first..last``: of one campaign, or (ALL) of the scope's."""
        totals = self._totals.get((first, last))
        if totals is None:
            totals = self._totals[(first, last)] = {}
            for (day, c), (n, v) in self.cells.items():
                if first <= day <= last:
                    _add(totals, c, n, v)
        if campaign != ALL:
            n, v = totals.get(campaign, (0.0, 0.0))
            return n, v
        kept = [cell for c, cell in totals.items() if scope is None or c in scope]
        return sum(n for n, _ in kept), sum(v for _, v in kept)


class _Context:
    """One macro conversion's comparisons and day rows against the reference."""

    def __init__(self, d: Digest, conversion: str, reference: Platform,
                 scopes: Mapping[Platform, Scope], since: dt.date, until: dt.date,
                 settings: ReconcileSection, shifts: Sequence[Shift]) -> None:
        self.d, self.conversion, self.reference = d, conversion, reference
        self.scopes, self.since, self.until, self.settings = scopes, since, until, settings
        self.shift = {Platform(s.platform): s.fitted for s in shifts}
        self.ref = _Series(d.cells_of(d.headline(conversion, reference)))
        self.series = {p: _Series(d.cells_of(d.headline(conversion, p))) for p in scopes}
        """Each platform's own figures (Google Ads: the Conversions column, by click date)."""
        self.ref_judged = _Series(d.cells_of(d.dated(conversion, reference)))
        self.judged = {p: _Series(d.cells_of(d.dated(conversion, p))) for p in scopes}
        """The figures compared over the period: Google Ads by conversion date when that
        basis was pulled, like the reference's days (the other platforms as above)."""
        self.actions = self._in_column_actions(d.headline(conversion, Platform.GOOGLE_ADS))
        """Google Ads' in-column actions, when several count this conversion."""
        self.judged_actions = self._in_column_actions(d.dated(conversion, Platform.GOOGLE_ADS))
        self.by_date = _Series(d.cells_of(d.conversion_date_variants(conversion)))
        meta = d.variants(conversion, Platform.META)
        self.windows = {w: _Series(d.cells_of([k for k in meta if k[4] == w]))
                        for w in sorted({k[4] for k in meta})}

    def _in_column_actions(self, keys: Sequence[VariantKey]) -> dict[str, _Series]:
        primary = [k for k in keys if self.d.in_column.get(k[3])]
        if len(primary) < 2:
            return {}
        return {k[3]: _Series(self.d.cells_of([k])) for k in primary}

    def _judged_basis(self, p: Platform) -> Basis:
        if p is Platform.GOOGLE_ADS and self.by_date:
            return Basis.CONVERSION_DATE
        return self.d.basis(p)

    # period comparisons
    def comparisons(self) -> list[Comparison]:
        out = []
        for p, scope in self.scopes.items():
            first, last = self._settled(p)
            if first > last:
                continue
            for campaign in [ALL] + (sorted(scope) if scope is not None else []):
                out.append(self._compare(p, scope, campaign, first, last))
        return out

    def _settled(self, p: Platform) -> tuple[dt.date, dt.date]:
        """The days both platforms cover, less the last ``settle_days`` (still filling)."""
        spans = [self.d.spans[p], self.d.spans[self.reference]]
        first = max([self.since] + [s[0] for s in spans])
        return first, self._end(p) - dt.timedelta(days=self.settings.settle_days)

    def _end(self, p: Platform) -> dt.date:
        return min(self.until, self.d.spans[p][1], self.d.spans[self.reference][1])

    def _compare(self, p: Platform, scope: Scope, campaign: str, first: dt.date,
                 last: dt.date) -> Comparison:
        n, v = self.judged[p].total(first, last, scope, campaign)
        rn, rv = self.ref_judged.total(first, last, scope, campaign)
        ratio = n / rn if rn else None
        big = max(n, rn) >= self.settings.min_count
        beyond = (big and (ratio is None or abs(ratio - 1) > self.settings.tolerance)
                  and abs(n - rn) > NOISE_Z * math.sqrt(n + rn))
        causes = self._period_causes(p, scope, campaign, first, last, n, rn) if big else []
        return Comparison(self.conversion, campaign, p.value, self.reference.value, first, last,
                          self._judged_basis(p).value, _r(n), _r(rn), _r(v), _r(rv),
                          None if ratio is None else _r(ratio, 3), beyond, causes)

    def _period_causes(self, p: Platform, scope: Scope, campaign: str, first: dt.date,
                       last: dt.date, n: float, rn: float) -> list[Cause]:
        where = (first, last, scope, campaign)
        causes: list[Cause] = []
        if p is Platform.GOOGLE_ADS:
            causes += self._duplicate_cause(where, n, rn)
        if Platform.GOOGLE_ADS in (p, self.reference):
            causes += self._basis_cause(p, where, n, rn)
        if Platform.META in (p, self.reference):
            causes += self._window_cause(p, where)
        causes += self._coverage_cause(p, n, rn)
        causes += self._time_zone_cause(p)
        tail = self._tail(p, scope, campaign, last)
        if tail:
            causes.append(tail)
        return causes

    def _duplicate_cause(self, where: _Where, n: float, rn: float) -> list[Cause]:
        """Google Ads counting one conversion in several in-column actions: the sum about
        twice the largest, the largest alone near the reference."""
        per_action = {name: series.total(*where)[0]
                      for name, series in self.judged_actions.items()}
        largest = max(per_action.values(), default=0.0)
        if not (largest and rn and 1.6 <= n / largest <= 2.4):
            return []
        actions = " + ".join(f"'{a}' {c:g}" for a, c in sorted(per_action.items()))
        return [Cause("duplicate_tag", Platform.GOOGLE_ADS.value,
                      f"duplicate tag: {len(per_action)} in-column actions count the same "
                      f"{self.conversion} ({actions} = {n:g}, {n / largest:.2f}x the largest); "
                      f"with one of them Google Ads is at {largest / rn:.2f}x "
                      f"{name_of(self.reference)}",
                      {"actions": {a: _r(c) for a, c in per_action.items()},
                       "times_the_largest": _r(n / largest, 3),
                       "ratio_with_one": _r(largest / rn, 3)})]

    def _basis_cause(self, p: Platform, where: _Where, n: float, rn: float) -> list[Cause]:
        """Google Ads files conversions under the click's day; the others (mostly) under the
        day they happen. Compared by conversion date when that basis was pulled."""
        other = self.reference if p is Platform.GOOGLE_ADS else p
        if self.d.basis(other) is not Basis.CONVERSION_DATE:
            return []
        if not self.by_date:
            return [Cause("click_vs_conversion_date", Platform.GOOGLE_ADS.value,
                          f"click date vs conversion date: Google Ads files {self.conversion} "
                          f"under the day of the click, {name_of(other)} under the day it "
                          "happened (pull both with google_ads.conversion_date_basis = true "
                          "to compare like with like)")]
        if p is Platform.GOOGLE_ADS:
            by_date, by_click = n, self.series[p].total(*where)[0]
        else:
            by_date, by_click = rn, self.ref.total(*where)[0]
        return [Cause("click_vs_conversion_date", Platform.GOOGLE_ADS.value,
                      f"click date vs conversion date: compared by conversion date "
                      f"({by_date:g}); the Conversions column files them under the click's "
                      f"day ({by_click:g} over the same days)",
                      {"by_conversion_date": _r(by_date), "by_click_date": _r(by_click)})]

    def _window_cause(self, p: Platform, where: _Where) -> list[Cause]:
        windows = {w: series.total(*where)[0] for w, series in self.windows.items()}
        click = next((w for w in CLICK_WINDOWS if w in windows), "")
        views = sum(windows.get(w, 0.0) for w in VIEW_WINDOWS)
        other = name_of(self.reference if p is Platform.META else p)
        text = (f"attribution window: Meta counts {self.conversion} within {click or 'its'} "
                f"window of a click ({windows.get(click, 0):g})")
        if views:
            text += (f" and {views:g} within a day of an ad view; {other} credits view-through "
                     "visitors to no campaign ((direct) / (none))")
        else:
            text += f"; {other} counts every one of the campaign's sessions, whenever"
        return [Cause("attribution_window", Platform.META.value, text,
                      {w: _r(c) for w, c in windows.items()})]

    def _coverage_cause(self, p: Platform, n: float, rn: float) -> list[Cause]:
        """GA4 misses visitors whose browser blocks its tag; Klaviyo knows identified people."""
        low, high = (p, self.reference) if n < rn else (self.reference, p)
        texts = {Platform.GA4: "GA4 misses visitors who block its tag or decline consent "
                               "(typically 5-15%)",
                 Platform.KLAVIYO: "Klaviyo only counts people it can identify (an email)"}
        if low not in texts or not (n and rn):
            return []
        gap = abs(n - rn) / max(n, rn)
        if gap < COVERAGE_GAP[0] or (low is Platform.GA4 and gap > COVERAGE_GAP[1]):
            return []  # nothing to explain, or more than blocked tags explain (a duplicate?)
        return [Cause("coverage", low.value, f"{texts[low]}: {name_of(low)} is {gap:.0%} below "
                      f"{name_of(high)}", {"gap": _r(gap, 3)})]

    def _time_zone_cause(self, p: Platform) -> list[Cause]:
        tz, ref_tz = self.d.timezones.get(p, ""), self.d.timezones.get(self.reference, "")
        if tz == ref_tz:
            return []
        apart = self.shift.get(p, 0.0)
        text = (f"time zones: {name_of(p)} days are {tz} days, {name_of(self.reference)} "
                f"days {ref_tz}")
        if p in self.shift:
            text += f"; the daily counts line up with a {apart:+.2f}-day shift"
        return [Cause("time_zone", p.value, text, {"timezone": tz, "reference_timezone": ref_tz,
                                                   "fitted_shift": _r(apart, 3)})]

    def _tail(self, p: Platform, scope: Scope, campaign: str, last: dt.date) -> Cause | None:
        """The unsettled last days, left out of the comparison: their figures."""
        end = self._end(p)
        if end <= last:
            return None
        start = last + dt.timedelta(days=1)
        n = self.judged[p].total(start, end, scope, campaign)[0]
        rn = self.ref_judged.total(start, end, scope, campaign)[0]
        return Cause("lag", p.value,
                     f"recent days still filling: {start} .. {end} are not judged "
                     f"({name_of(p)} {n:g}, {name_of(self.reference)} {rn:g} there)",
                     {"from": start, "to": end, "count": _r(n), "reference_count": _r(rn)})

    # day rows
    def day_rows(self) -> list[DayRow]:
        by_day: dict[dt.date, set[str]] = defaultdict(set)
        for series in [self.ref, *self.series.values()]:
            for day, campaigns in series.by_day.items():
                if self.since <= day <= self.until:
                    by_day[day].update(campaigns)
        return [self._day_row(day, campaign) for day in sorted(by_day)
                for campaign in [ALL, *sorted(by_day[day] - {ALL})]]

    def _day_row(self, day: dt.date, campaign: str) -> DayRow:
        figures: dict[str, Figure] = {}
        expected: dict[str, float] = {}
        causes: list[Cause] = []
        statuses = ["ok"]
        ref = self._figure(self.ref, day, campaign, None)
        if ref is not None:
            figures[self.reference.value] = ref
        for p, scope in self.scopes.items():
            if campaign != ALL and (scope is None or campaign not in scope):
                continue
            fig = self._figure(self.series[p], day, campaign, scope)
            if fig is None:
                continue
            r = self.ref.at(day, campaign, scope)
            figures[p.value] = fig
            expected[p.value] = _r(r)
            status, found = self._judge_day(p, scope, day, campaign, fig.count, r)
            statuses.append(status)
            causes += found
        order = ("ok", "filling", "explained", "differs")
        return DayRow(day, campaign, self.conversion, figures, expected, causes,
                      max(statuses, key=order.index))

    @staticmethod
    def _figure(series: _Series, day: dt.date, campaign: str, scope: Scope) -> Figure | None:
        """The day's figure; None for a campaign the series has nothing for that day."""
        if campaign != ALL and campaign not in series.by_day.get(day, {}):
            return None
        n, v = series.figure(day, campaign, scope)
        return Figure(_r(n), _r(v))

    def _judge_day(self, p: Platform, scope: Scope, day: dt.date, campaign: str, n: float,
                   r: float) -> tuple[str, list[Cause]]:
        """ok within the noise; else the causes whose counterfactual closes the gap."""
        gap = abs(n - r)
        if gap <= self.settings.tolerance * max(n, r) + math.sqrt(n + r + 1):
            return "ok", []
        if day > self._end(p) - dt.timedelta(days=self.settings.settle_days) and n < r and (
                self.d.basis(p) is Basis.CLICK_DATE):
            return "filling", [Cause("lag", p.value, f"{day}: recent clicks still converting "
                                     f"({name_of(p)} {n:g}, {name_of(self.reference)} "
                                     f"{r:g})")]
        causes = []
        for code, (count, against) in self._alternatives(p, scope, day, campaign, n, r):
            if abs(count - against) <= gap / 2:
                causes.append(Cause(code, p.value, f"{day}: {_ALTERNATIVE_TEXT[code]} gives "
                                    f"{count:g} against {against:g}",
                                    {"count": _r(count), "reference_count": _r(against)}))
        return ("explained" if causes else "differs"), causes

    def _alternatives(self, p: Platform, scope: Scope, day: dt.date, campaign: str, n: float,
                      r: float) -> list[tuple[str, tuple[float, float]]]:
        """(cause, (count, reference count) had the cause not been there)."""
        out: list[tuple[str, tuple[float, float]]] = []
        if p is Platform.GOOGLE_ADS and self.actions:
            largest = max(s.at(day, campaign, scope) for s in self.actions.values())
            out.append(("duplicate_tag", (largest, r)))
        if p is Platform.GOOGLE_ADS and self.by_date:
            out.append(("click_vs_conversion_date", (self.by_date.at(day, campaign, scope), r)))
        apart = self.shift.get(p, 0.0)
        if abs(apart) >= 0.05 and self.d.timezones.get(p) != self.d.timezones.get(
                self.reference):
            step = dt.timedelta(days=1 if apart > 0 else -1)
            shifted = (1 - abs(apart)) * r + abs(apart) * self.ref.at(day - step, campaign, scope)
            out.append(("time_zone", (n, shifted)))
        return out


_Where = tuple[dt.date, dt.date, Scope, str]
"""(first day, last day, scope, campaign) of a period total."""

_ALTERNATIVE_TEXT = {
    "duplicate_tag": "counting one in-column action only",
    "click_vs_conversion_date": "Google Ads by conversion date",
    "time_zone": "lining the days up across time zones",
}


def _discrepancy_findings(comparisons: Sequence[Comparison],
                          settings: ReconcileSection) -> list[Finding]:
    """One finding per conversion and platform with comparisons beyond tolerance."""
    grouped: dict[tuple[str, str], list[Comparison]] = defaultdict(list)
    for c in comparisons:
        if c.beyond_tolerance:
            grouped[(c.conversion, c.platform)].append(c)
    findings = []
    for (conversion, platform), group in sorted(grouped.items()):
        head = next((c for c in group if c.campaign == ALL), group[0])
        codes = [cause.code for cause in head.causes]
        duplicate = "duplicate_tag" in codes
        ratio = "n/a" if head.ratio is None else f"{head.ratio:.2f}x"
        message = (f"{name_of(platform)} counts {head.count:g} {conversion} where "
                   f"{name_of(head.reference)} counts "
                   f"{head.reference_count:g} ({ratio}) from {head.first} to {head.last}, "
                   f"beyond the {settings.tolerance:.0%} tolerance")
        campaigns = [c.campaign for c in group if c.campaign != ALL]
        if campaigns:
            message += f"; campaigns beyond it: {', '.join(campaigns)}"
        likely = [cause.text for cause in head.causes if cause.code != "lag"]
        if likely:
            message += f". Likely: {likely[0]}"
        fix = (_DUPLICATE_FIX if duplicate else
               f"Check {name_of(platform)}'s {conversion} tracking (tag on the confirmation page, "
               f"mapping in [[conversions]]); if the gap is expected, raise [reconcile] "
               "tolerance.")
        findings.append(Finding(
            "reconcile", "duplicate_tag" if duplicate else "discrepancy", "error",
            f"{conversion}: {name_of(platform)} vs {name_of(head.reference)}", message, fix,
            {"first": head.first, "last": head.last, "count": head.count,
             "reference_count": head.reference_count, "ratio": head.ratio,
             "campaigns": {c.campaign: {"count": c.count, "reference_count": c.reference_count,
                                        "ratio": c.ratio} for c in group},
             "causes": [vars(cause) for cause in head.causes]},
            alert=True))
    return findings


_DUPLICATE_FIX = (f"{GOALS_PATH}: keep one primary action for the conversion and set the "
                  "others (typically the GA4-imported one) to Action optimization: Secondary "
                  "action.")


# -- time zones: how the platforms' days line up ----------------------------------------------

_SHIFT_GRID = np.round(np.arange(-1.0, 1.0001, 0.01), 2)
_MIN_SHIFT_DAYS = 14


def _shifts(d: Digest, reference: Platform, since: dt.date, until: dt.date,
            settings: ReconcileSection) -> list[Shift]:
    """Each platform's day shift against the reference, on the traffic both see."""
    shifts = []
    for p in d.platforms():
        groups = _shared_traffic(p, reference) if p is not reference else None
        if groups is not None:
            shift = _fit_shift(d, p, reference, groups, since, until, settings.settle_days)
            if shift is not None:
                shifts.append(shift)
    return shifts


def _fit_shift(d: Digest, p: Platform, reference: Platform,
               groups: tuple[frozenset[str] | None, frozenset[str] | None], since: dt.date,
               until: dt.date, settle_days: int) -> Shift | None:
    first = max(since, d.spans[p][0], d.spans[reference][0]) + dt.timedelta(days=1)
    last = min(until, d.spans[p][1], d.spans[reference][1]) - dt.timedelta(
        days=max(settle_days, 1))
    days = [first + dt.timedelta(days=i) for i in range((last - first).days + 1)]
    if len(days) < _MIN_SHIFT_DAYS:
        return None
    series = []
    for conversion in d.kinds:
        mine = d.daily_of(d.dated(conversion, p), groups[0])
        theirs = d.daily_of(d.dated(conversion, reference), groups[1])
        at = np.array([[theirs.get(day + dt.timedelta(days=o), [0.0])[0] for day in days]
                       for o in (-1, 0, 1)])
        own = np.array([mine.get(day, [0.0])[0] for day in days])
        if own.sum() > 0 and at[1].sum() > 0:
            series.append((own, at))
    if not series:
        return None
    fitted = _best_shift(series)
    same, shifted = _shift_correlations(series, fitted)
    tz, ref_tz = d.timezones[p], d.timezones[reference]
    hours = _hours_apart(tz, ref_tz, days[len(days) // 2])
    return Shift(p.value, reference.value, tz, ref_tz, hours, _r(hours / 24, 3), fitted,
                 _r(same, 3), _r(shifted, 3), len(days))


def _best_shift(series: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
    """The share of a day a by which a platform's days run ahead of the reference's: its day
    D is modelled as (1 - |a|) x the reference's D plus |a| x its D-1 (D+1 when a < 0), times
    a scale per conversion; a minimizes the Poisson-weighted squared error."""
    weights = np.abs(_SHIFT_GRID)[:, None]
    total = np.zeros(len(_SHIFT_GRID))
    for own, at in series:
        neighbour = np.where(_SHIFT_GRID[:, None] > 0, at[0][None, :], at[2][None, :])
        model = (1 - weights) * at[1][None, :] + weights * neighbour
        scale = (model @ own) / np.maximum((model * model).sum(axis=1), 1e-9)
        fitted = scale[:, None] * model
        total += (((own[None, :] - fitted) ** 2) / (fitted + 1)).sum(axis=1)
    return float(_SHIFT_GRID[int(np.argmin(total))])


def _shift_correlations(series: Sequence[tuple[np.ndarray, np.ndarray]],
                        fitted: float) -> tuple[float, float]:
    """Correlation of the platform's daily counts (each conversion scaled to its mean) with
    the reference's same days, and with the fitted mix of the reference's days."""
    neighbour = 0 if fitted >= 0 else 2
    own, same, mixed = [], [], []
    for counts, at in series:
        model = (1 - abs(fitted)) * at[1] + abs(fitted) * at[neighbour]
        own.append(counts / counts.mean())
        same.append(at[1] / at[1].mean())
        mixed.append(model / max(model.mean(), 1e-9))
    own_all = np.concatenate(own)
    return _pearson(own_all, np.concatenate(same)), _pearson(own_all, np.concatenate(mixed))


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def _hours_apart(tz: str, other: str, day: dt.date) -> float:
    """Hours by which ``tz``'s clock is ahead of ``other``'s at noon UTC of ``day``."""
    moment = dt.datetime.combine(day, dt.time(12), dt.UTC)
    offsets = [moment.astimezone(ZoneInfo(z)).utcoffset() or dt.timedelta() for z in (tz, other)]
    return (offsets[0] - offsets[1]).total_seconds() / 3600


def _shift_findings(shifts: Sequence[Shift], settings: ReconcileSection,
                    client_timezone: str, middle: dt.date) -> list[Finding]:
    """One finding per platform whose days are off: a pair whose fitted shift and time zones
    both differ by ``max_day_shift`` or more (a shift the zones do not explain is the basis
    or lag at work); of the pair, the one whose zone is further from the client's is blamed."""
    off = [s for s in shifts if abs(s.fitted) >= settings.max_day_shift
           and abs(s.expected) >= settings.max_day_shift]
    blamed: dict[str, list[Shift]] = defaultdict(list)
    for s in off:
        own = abs(_hours_apart(s.timezone, client_timezone, middle))
        theirs = abs(_hours_apart(s.reference_timezone, client_timezone, middle))
        blamed[s.reference if theirs > own else s.platform].append(s)
    return [_shift_finding(platform, group, client_timezone, middle)
            for platform, group in sorted(blamed.items())]


def _shift_finding(platform: str, group: Sequence[Shift], client_timezone: str,
                   middle: dt.date) -> Finding:
    first = group[0]
    own = first.platform == platform
    tz = first.timezone if own else first.reference_timezone
    others = ", ".join(name_of(s.reference if own else s.platform) for s in group)
    ahead = float(np.median([s.fitted if own else -s.fitted for s in group]))
    direction = "previous" if ahead > 0 else "next"
    best = max(group, key=lambda s: s.r_shifted - s.r_same_day)
    name = name_of(platform)
    message = (f"{name}'s days do not line up with {others}: about {abs(ahead):.0%} of "
               f"each {name} day falls on their {direction} day (daily counts correlate "
               f"r = {best.r_shifted:.2f} shifted, {best.r_same_day:.2f} as dated)")
    if tz != client_timezone:
        hours = _hours_apart(tz, client_timezone, middle)
        message += f"; {name} reports in {tz}, {hours:+g} h from the client's {client_timezone}"
    return Finding(
        "reconcile", "time_zone_shift", "warning", name, message,
        _TIME_ZONE_FIX.get(platform, "Compare this platform weekly, not daily.").format(
            tz=client_timezone),
        {"timezone": tz, "client_timezone": client_timezone, "fitted_shift": _r(ahead, 3),
         "pairs": [vars(s) for s in group]}, alert=True)


_TIME_ZONE_FIX = {
    "ga4": "GA4 Admin > Property details > Reporting time zone: {tz}. GA4 applies it from "
           "the day of the change; earlier days stay in the old zone.",
    "google_ads": "A Google Ads account's time zone cannot be changed: compare it weekly, or "
                  "set the client's [client] timezone to the account's.",
    "meta": "Meta: Ads Manager > Ad account settings > Time zone: {tz} (Meta may open a new ad "
            "account for it); meanwhile compare weekly.",
    "klaviyo": "Klaviyo aggregates are asked for in [client] timezone: check it is {tz}.",
}


# -- funnel ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FunnelStep:
    conversion: str
    count: float
    value: float
    rate: float | None
    """Share of the step before that reached this step."""
    lost: float
    """Events of the step before that did not reach this one."""
    value_lost: float
    """``lost`` x the value of reaching this step (its share that reaches the macro x the
    average macro value)."""


@dataclass(frozen=True)
class Funnel:
    segment: str
    steps: list[FunnelStep]
    biggest_loss: str | None
    """The step whose entry loses the most value (or share, without values)."""


@dataclass(frozen=True)
class FunnelDiagnosis:
    source: str
    timezone: str
    ladder: list[str]
    average_value: float
    overall: Funnel
    by_source: list[Funnel]
    by_campaign: list[Funnel]
    days: list[dt.date]
    daily: dict[str, list[float]]
    """Ladder step -> its count per day of ``days`` (all traffic)."""
    findings: list[Finding]


SOURCE_LABELS = {Platform.GOOGLE_ADS: "paid search (Google Ads)",
                 Platform.META: "paid social (Meta)"}
OTHER_SOURCE = "other campaigns"
NO_CAMPAIGN = "no campaign ((not set))"


def diagnose_funnel(d: Digest, since: dt.date, until: dt.date,
                    settings: ReconcileSection) -> FunnelDiagnosis | None:
    """Step-to-step rates and drop-offs along the ladder, overall, per source and per
    campaign; the biggest loss named; steps that collapse while the ones above are normal."""
    source = d.funnel_source
    ladder = [c for c in d.ladder if d.headline(c, source)]
    if len(ladder) < 2:
        return None
    series = {c: _Series(d.cells_of(d.headline(c, source))) for c in ladder}
    n_last, v_last = series[ladder[-1]].total(since, until, None, ALL)
    average = v_last / n_last if ladder[-1] in d.macro and n_last else 0.0
    overall = _funnel("all traffic", series, ladder, since, until, None, ALL, average, None)
    segments = _segments(d, series)
    by_source = [_funnel(label, series, ladder, since, until, scope, ALL, average, overall)
                 for label, scope in segments.items()]
    campaigns = sorted(c for scope in segments.values() for c in scope)
    by_campaign = [_funnel(c, series, ladder, since, until, None, c, average, overall)
                   for c in campaigns]
    days = [since + dt.timedelta(days=i) for i in range((until - since).days + 1)]
    daily = {c: [series[c].at(day, ALL, None) for day in days] for c in ladder}
    findings = _broken_steps("all traffic", ladder, days, daily, average, overall, settings)
    broken = {f.evidence["step"] for f in findings}
    for label, scope in segments.items():
        own = {c: [series[c].at(day, ALL, scope) for day in days] for c in ladder}
        findings += [f for f in _broken_steps(label, ladder, days, own, average, overall,
                                              settings) if f.evidence["step"] not in broken]
    return FunnelDiagnosis(source.value, d.timezones.get(source, ""), ladder, _r(average),
                           overall, by_source, by_campaign, days, daily, findings)


def _segments(d: Digest, series: Mapping[str, _Series]) -> dict[str, frozenset[str]]:
    """Traffic sources (label -> campaigns): the ad platform that runs a campaign, else
    other campaigns, else none ((not set))."""
    campaigns = {c for s in series.values() for row in s.by_day.values() for c in row}
    grouped: dict[str, set[str]] = defaultdict(set)
    for c in campaigns:
        owner = d.owners.get(c)
        grouped[SOURCE_LABELS[owner] if owner else NO_CAMPAIGN if c in (NOT_SET, ALL, "")
                else OTHER_SOURCE].add(c)
    return {label: frozenset(grouped[label]) for label in sorted(grouped)}


def _funnel(segment: str, series: Mapping[str, _Series], ladder: Sequence[str],
            since: dt.date, until: dt.date, scope: Scope, campaign: str, average: float,
            overall: Funnel | None) -> Funnel:
    totals = [series[c].total(since, until, scope, campaign) for c in ladder]
    counts = [n for n, _ in totals]
    steps = []
    for k, conversion in enumerate(ladder):
        rate = lost = value_lost = None
        if k:
            before = counts[k - 1]
            rate = counts[k] / before if before else None
            lost = max(before - counts[k], 0.0)
            value_lost = lost * _reach_value(k, counts, average, overall)
        steps.append(FunnelStep(conversion, _r(counts[k]), _r(totals[k][1]),
                                None if rate is None else _r(rate, 4), _r(lost or 0.0),
                                _r(value_lost or 0.0)))
    return Funnel(segment, steps, _biggest_loss(steps, average))


def _reach_value(k: int, counts: Sequence[float], average: float,
                 overall: Funnel | None) -> float:
    """What reaching step k is worth: its share that reaches the last step x the average
    macro value; the overall funnel's share when this segment has none at step k."""
    if counts[k] and counts[-1]:
        return counts[-1] / counts[k] * average
    if overall is not None and overall.steps[k].count:
        return overall.steps[-1].count / overall.steps[k].count * average
    return average if k == len(counts) - 1 else 0.0


def _biggest_loss(steps: Sequence[FunnelStep], average: float) -> str | None:
    later = steps[1:]
    if not later:
        return None
    if average:
        best = max(later, key=lambda s: s.value_lost)
        return best.conversion if best.value_lost else None
    return max(later, key=lambda s: 1 - (s.rate if s.rate is not None else 1)).conversion


_MIN_MISSING = 20.0
"""A collapsed step must have missed at least this many events to be called broken."""
_MIN_GAIN = 12.0
"""... and its collapse must be this much more likely (log-likelihood ratio) than the usual
rate: about p < 1e-6 for one run, which the search over every run and segment needs."""
_MIN_USUAL_DAYS = 7


def _broken_steps(segment: str, ladder: Sequence[str], days: Sequence[dt.date],
                  daily: Mapping[str, Sequence[float]], average: float, overall: Funnel,
                  settings: ReconcileSection) -> list[Finding]:
    """Steps whose rate collapses below ``funnel_drop`` of its usual level for at least
    ``funnel_min_days`` days while the step above keeps its volume."""
    findings = []
    counts = [s.count for s in overall.steps]
    for k in range(1, len(ladder)):
        above = np.array(daily[ladder[k - 1]], dtype=float)
        step = np.array(daily[ladder[k]], dtype=float)
        usual = _usual_rate(above, step)
        found = _collapse(above, step, usual, settings) if usual else None
        if found is not None:  # the usual rate again, from the days outside the collapse
            outside = np.ones(above.size, dtype=bool)
            outside[found[0]:found[1]] = False
            if outside.sum() >= _MIN_USUAL_DAYS and above[outside].sum():
                usual = float(step[outside].sum() / above[outside].sum())
                found = _collapse(above, step, usual, settings)
        if found is None:
            continue
        run = slice(*found)
        rest = np.concatenate([above[:run.start], above[run.stop:]])
        if rest.size and above[run].mean() < 0.5 * rest.mean():
            continue  # the step above fell too: the break is higher up
        missing = float(above[run].sum() * usual - step[run].sum())
        findings.append(_broken_step(segment, ladder, k, days, run, daily, usual,
                                     missing * _reach_value(k, counts, average, overall)))
    return findings


def _usual_rate(above: np.ndarray, step: np.ndarray, window: int = 7) -> float:
    """A first guess at the step's usual rate: the upper quartile of its 7-day rolling rates
    (robust to a collapse lasting up to three quarters of the days)."""
    if above.size < window:
        return float(step.sum() / above.sum()) if above.sum() else 0.0
    kernel = np.ones(window)
    a, s = np.convolve(above, kernel, "valid"), np.convolve(step, kernel, "valid")
    rates = s[a > 0] / a[a > 0]
    return float(np.quantile(rates, 0.75)) if rates.size else 0.0


def _collapse(above: np.ndarray, step: np.ndarray, usual: float,
              settings: ReconcileSection) -> tuple[int, int] | None:
    """The run of days [start, stop) that a collapsed rate explains best: the most likely
    (Poisson likelihood ratio against the usual rate) of the runs at least
    ``funnel_min_days`` long, at most ``funnel_drop`` of the usual rate, and missing at least
    ``_MIN_MISSING`` events, by at least ``_MIN_GAIN``. Days at the usual rate do not join
    the run: they lower its likelihood."""
    came = np.concatenate([[0.0], np.cumsum(above)])
    went = np.concatenate([[0.0], np.cumsum(step)])
    best, where = 0.0, None
    for start in range(above.size - settings.funnel_min_days + 1):
        stops = np.arange(start + settings.funnel_min_days, above.size + 1)
        expected = usual * (came[stops] - came[start])
        seen = went[stops] - went[start]
        with np.errstate(divide="ignore", invalid="ignore"):
            gain = np.where(seen > 0, seen * np.log(seen / expected), 0.0) - seen + expected
        ok = ((seen <= settings.funnel_drop * expected) & (expected - seen >= _MIN_MISSING)
              & (gain >= _MIN_GAIN))
        if ok.any():
            i = int(np.argmax(np.where(ok, gain, -np.inf)))
            if gain[i] > best:
                best, where = float(gain[i]), (start, int(stops[i]))
    return where


def _broken_step(segment: str, ladder: Sequence[str], k: int, days: Sequence[dt.date],
                 run: slice, daily: Mapping[str, Sequence[float]], usual: float,
                 value: float) -> Finding:
    first, last = days[run.start], days[run.stop - 1]
    prev, this = ladder[k - 1], ladder[k]
    came, went = sum(daily[prev][run]), sum(daily[this][run])
    rate = went / came if came else 0.0
    missing = came * usual - went
    upstream = ""
    if k >= 2:
        higher = ladder[k - 2]
        during = _rate_over(daily, higher, prev, run)
        around = _rate_over(daily, higher, prev, slice(0, run.start), slice(run.stop, None))
        upstream = (f"; the step above is normal ({higher} -> {prev} {during:.1%}, "
                    f"{around:.1%} on the other days)")
    message = (f"{segment}: {prev} -> {this} collapsed from {first} to {last} "
               f"({run.stop - run.start} days): {came:g} {prev} led to {went:g} {this} "
               f"({rate:.1%}) against {usual:.1%} usually: about {missing:.0f} {this} missing"
               + (f", worth about {value:,.0f}" if value else "") + upstream)
    return Finding(
        "funnel", "step_broken", "error", f"{prev} -> {this} ({segment})", message,
        f"Walk through {prev} -> {this} by hand as a customer would (a new fee, a payment or "
        f"shipping option, a form error); check the site's error logs from {first}; the "
        f"{this} tag may fire on a page that is no longer reached.",
        {"segment": segment, "step": this, "from_step": prev, "first": first, "last": last,
         "days": run.stop - run.start, "from_count": _r(came), "count": _r(went),
         "rate": _r(rate, 4), "usual_rate": _r(usual, 4), "missing": _r(missing),
         "value_missing": _r(value)},
        alert=True)


def _rate_over(daily: Mapping[str, Sequence[float]], a: str, b: str, *spans: slice) -> float:
    came = sum(sum(daily[a][span]) for span in spans)
    went = sum(sum(daily[b][span]) for span in spans)
    return went / came if came else 0.0


# -- loaders: the store in, the findings out -------------------------------------------------

def settings_of(config: ClientConfig) -> ReconcileSection:
    return config.reconcile or ReconcileSection()


def load_audit(config: ClientConfig, store: Store, as_of: dt.date | None = None) -> Audit:
    """Audit the stored Google Ads actions (``convsync discover`` / ``pull`` store them)."""
    settings = settings_of(config)
    span = store.stats_span(Platform.GOOGLE_ADS)
    as_of = as_of or (span[1] if span else None)
    outcomes: dict[str, int] = {}
    if as_of is not None:
        start = as_of - dt.timedelta(days=settings.inactive_days - 1)
        zone = ZoneInfo(config.client.timezone)
        outcomes = store.journey_counts(
            Platform.CRM, dt.datetime.combine(start, dt.time(), zone),
            dt.datetime.combine(as_of + dt.timedelta(days=1), dt.time(), zone))
    return audit(store.platform_conversions(Platform.GOOGLE_ADS),
                 store.stats(platform=Platform.GOOGLE_ADS), config.definitions(), settings,
                 as_of=as_of, uploads=store.upload_counts(Platform.GOOGLE_ADS),
                 outcomes=outcomes, refusals=store.upload_refusals(Platform.GOOGLE_ADS))


def stored_range(store: Store) -> tuple[dt.date, dt.date] | None:
    """First and last day of the stored daily stats, over every platform."""
    spans = [s for p in Platform if (s := store.stats_span(p)) is not None]
    if not spans:
        return None
    return min(s[0] for s in spans), max(s[1] for s in spans)


def load_digest(config: ClientConfig, store: Store, since: dt.date, until: dt.date) -> Digest:
    settings = settings_of(config)
    owners = {name or campaign_id: p for p in _NARROW
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
