"""The in-column audit: which Google Ads conversion actions the Conversions column counts, and what
is wrong with that."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

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
from convsync.reconcile.common import GOALS_PATH, OFFLINE_TYPES, SKIPPED_STATUSES, Finding, rounded
from convsync.settings import ReconcileSection

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
        in_column=in_column, conversions=rounded(seen.count), value=rounded(seen.value),
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
        share = r.conversions / column_total if column_total else 0
        evidence = {"action": r.name, "kind_source": r.kind_source, "conversions": r.conversions,
                    "column_conversions": rounded(column_total),
                    "share_of_column": rounded(share, 3),
                    "value_per_conversion": rounded(r.value / r.conversions
                                                    if r.conversions else 0),
                    "macro_value_per_conversion": rounded(macro_value), "uploads": r.uploads}
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
    times = rounded(total / first.conversions if first.conversions else 0)
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
                    "column_conversions": rounded(total), "times_the_largest": times,
                    "daily_correlation": None if corr is None else rounded(corr, 3),
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


