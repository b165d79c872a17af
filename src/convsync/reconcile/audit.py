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
from scipy import stats as scistats

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
    upload_of: tuple[str, ...] = ()
    """The conversions convsync uploads to it (``[google_ads] upload_actions``): convsync's
    own import action, never one to map."""

    @property
    def offline(self) -> bool:
        return self.type in OFFLINE_TYPES

    @property
    def guessed(self) -> bool:
        """Its kind is a guess from its name or category (map it to be sure)."""
        return not self.upload_of and not self.kind_source.startswith("from config")

    @property
    def label(self) -> str:
        """Its kind as the audit table shows it."""
        if self.upload_of:
            return "convsync upload"
        return f"{self.kind.value}{'?' if self.guessed else ''}"


@dataclass(frozen=True)
class Audit:
    as_of: dt.date | None
    window: tuple[dt.date, dt.date] | None
    actions: list[ActionAudit]
    findings: list[Finding]
    notes: list[str]


@dataclass
class _Activity:
    """What the stats say about one action: window totals, recent daily counts, first and
    last conversion."""

    count: float = 0.0
    value: float = 0.0
    first: dt.date | None = None
    last: dt.date | None = None
    daily: dict[dt.date, float] = field(default_factory=dict)
    """Counts of the last MEASURED_DAYS days."""


@dataclass
class _Seen:
    """What the stats say: each Google Ads action's activity by (account, action name), each
    account's first stored day and campaigns (in the window), and GA4's event counts in the
    window by (event name, session campaign name)."""

    activity: dict[tuple[str, str], _Activity] = field(
        default_factory=lambda: defaultdict(_Activity))
    first_day: dict[str, dt.date] = field(default_factory=dict)
    campaigns: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    ga4: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))


def audit(actions: Iterable[PlatformConversion], stats: Iterable[ConversionStat],
          definitions: Sequence[ConversionDefinition], settings: ReconcileSection, *,
          as_of: dt.date | None, uploads: Mapping[str, int] | None = None,
          outcomes: Mapping[str, int] | None = None,
          refusals: Mapping[str, Mapping[str, int]] | None = None,
          upload_actions: Mapping[str, str] | None = None) -> Audit:
    """Audit the Google Ads conversion actions against what belongs in the Conversions column.

    ``stats``: the Google Ads daily stats (click-date rows are used), and GA4's, if given, as
    the reference a double count is measured against. ``as_of``: the last day of the window
    of ``settings.inactive_days`` days (None: no stats, activity not judged).
    ``uploads``: convsync's upload ledger rows per action id (Google: the push side keys its
    ledger so) or name. ``outcomes``: offline outcomes
    (CRM) per canonical conversion in the window, to tell an idle offline action from one
    whose uploads do not arrive. ``refusals``: per action id, the uploads Google refused, by
    its reason (from the push ledger), quoted where uploads do not arrive.
    ``upload_actions``: the config's ``[google_ads] upload_actions`` (canonical conversion ->
    action id): convsync's own import actions, shown as such (actions ``discover`` marked
    with ``upload_action_of`` are too)."""
    window = (None if as_of is None else
              (as_of - dt.timedelta(days=settings.inactive_days - 1), as_of))
    seen = _seen(stats, window)
    mapping = ConversionMap(list(definitions))
    ledger = uploads or {}
    targets: dict[str, list[str]] = defaultdict(list)
    for conversion, action_id in (upload_actions or {}).items():
        targets[str(action_id)].append(conversion)
    rows = [_action_row(a, mapping, seen.activity.get((a.account_id, a.name), _Activity()),
                        ledger.get(a.platform_id) or ledger.get(a.name, 0),
                        _upload_of(a, targets))
            for a in actions if str(a.settings.get("status", "")) not in SKIPPED_STATUSES]
    notes: list[str] = []
    findings: list[Finding] = []
    for account in sorted({r.account_id for r in rows}):
        mine = [r for r in rows if r.account_id == account]
        found = _column_findings(mine, settings) + _double_counting(
            mine, seen, window, settings, mapping, outcomes or {})
        covered = (window is not None and seen.first_day.get(account) is not None
                   and seen.first_day[account] <= window[0])
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


def _seen(stats: Iterable[ConversionStat], window: tuple[dt.date, dt.date] | None) -> _Seen:
    seen = _Seen()

    def inside(day: dt.date) -> bool:
        return window is not None and window[0] <= day <= window[1]

    def measured(day: dt.date) -> bool:  # the days double counting is measured over
        return (window is not None
                and window[1] - dt.timedelta(days=MEASURED_DAYS) < day <= window[1])

    for s in stats:
        if s.platform is Platform.GA4:
            if s.count and inside(s.date):
                seen.ga4[(s.platform_conversion, s.campaign_name)] += s.count
            continue
        if s.platform is not Platform.GOOGLE_ADS or s.basis is not Basis.CLICK_DATE:
            continue
        if s.account_id not in seen.first_day or s.date < seen.first_day[s.account_id]:
            seen.first_day[s.account_id] = s.date
        if not s.count:
            continue
        a = seen.activity[(s.account_id, s.platform_conversion)]
        a.first = min(a.first or s.date, s.date)
        a.last = max(a.last or s.date, s.date)
        if inside(s.date):
            a.count += s.count
            a.value += s.value
            seen.campaigns[s.account_id].add(s.campaign_name)
        if measured(s.date):
            a.daily[s.date] = a.daily.get(s.date, 0.0) + s.count
    return seen


def _upload_of(action: PlatformConversion, targets: Mapping[str, list[str]]) -> tuple[str, ...]:
    """The conversions convsync uploads to ``action``: the config's ``upload_actions``, else
    what ``discover`` marked it with."""
    named = targets.get(action.platform_id)
    if named:
        return tuple(sorted(named))
    marked = str(action.settings.get("upload_action_of") or "")
    return tuple(sorted(n.strip() for n in marked.split(",") if n.strip()))


def _action_row(action: PlatformConversion, mapping: ConversionMap, seen: _Activity,
                uploads: int, upload_of: tuple[str, ...] = ()) -> ActionAudit:
    category = str(action.settings.get("category", ""))
    definition = mapping.lookup(Platform.GOOGLE_ADS, action.name)
    conversion = definition.name if definition else None
    if definition is not None:
        kind, source = definition.kind, f"from config: {definition.name}"
    elif upload_of:  # convsync's own import action: it counts what convsync uploads
        uploaded = [d for d in mapping.definitions if d.name in upload_of]
        kind = Kind.MACRO if any(d.kind is Kind.MACRO for d in uploaded) else Kind.MICRO
        source = (f"from config: convsync uploads {', '.join(upload_of)} to it "
                  "([google_ads] upload_actions)")
        conversion = upload_of[0] if len(upload_of) == 1 else None
    else:
        kind, why = infer_kind(action.name, category)
        source = f"inferred: {why}"
    in_column = action.in_column
    if in_column is None:
        in_column = bool(action.settings.get("include_in_conversions_metric"))
    return ActionAudit(
        account_id=action.account_id, action_id=action.platform_id, name=action.name,
        category=category, type=str(action.settings.get("type", "")),
        conversion=conversion, kind=kind, kind_source=source,
        in_column=in_column, conversions=rounded(seen.count), value=rounded(seen.value),
        last_conversion=seen.last, uploads=uploads, upload_of=upload_of)


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
        ours = bool(r.uploads or r.upload_of)  # convsync's micro uploads go there
        if r.kind is not Kind.MICRO or (ours and settings.primary_micro_uploads):
            continue
        share = r.conversions / column_total if column_total else 0
        evidence = {"action": r.name, "kind_source": r.kind_source, "conversions": r.conversions,
                    "column_conversions": rounded(column_total),
                    "share_of_column": rounded(share, 3),
                    "value_per_conversion": rounded(r.value / r.conversions
                                                    if r.conversions else 0),
                    "macro_value_per_conversion": rounded(macro_value), "uploads": r.uploads}
        findings.append(_micro_upload(r, evidence) if ours else _micro_in_column(r, evidence))
    # an unmapped action's category is counted by any action of it in column, mapped or not
    counted = {name for r in rows if r.in_column
               for name in (r.conversion, f"category {r.category}") if name}
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
    how = (f"{r.uploads} in the ledger" if r.uploads else
           f"[google_ads] upload_actions: {', '.join(r.upload_of)}")
    return Finding(
        "audit", "micro_upload_primary", "error", r.name,
        f"'{r.name}' receives convsync's micro-conversion uploads ({how}) "
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


# -- double counting: primary actions counting the same conversions ---------------------------

DUPLICATE_P = 0.001
"""Two actions count the same conversions when their daily split is this unlikely for two
separate counts (the lower tail of the binomial dispersion test below)."""
DUPLICATE_MIN_R = 0.5
"""... and their daily counts correlate at least this much."""
MEASURED_DAYS = 90
"""Two actions are measured against each other over the stored days of this span (ending
with the audit window, its unsettled last days left out), while both were live."""
DUPLICATE_MIN_DAYS = 7
DUPLICATE_MIN_COUNT = 10
"""Days (settled, with both actions live) and conversions of each action below which a pair
is not judged."""
NEAR_EQUAL = 0.5
"""Without a reference, the smaller of two such actions counts at least this share of the
larger (the Conversions column at least 1.5x the largest)."""
REFERENCE_TIMES = 1.5
"""With a reference (GA4, else the CRM), the two count at least this many times it."""
TAG_TYPES = frozenset({"WEBPAGE", "WEBPAGE_CODELESS", "CLICK_TO_CALL", "WEBSITE_CALL"})
"""Google Ads action types that are a tag on the site (a duplicate one can be removed)."""


@dataclass(frozen=True)
class _Pair:
    """Two primary actions of one account measured against each other over ``days`` settled
    days: their daily correlation, and the binomial dispersion test of their daily split."""

    first: ActionAudit
    second: ActionAudit
    days: int
    correlation: float
    dispersion: float
    """Chi-square of the daily split over its degrees of freedom: about 1 (or more) for two
    separate counts, near 0 for one count seen twice."""
    p_separate: float
    """How likely a split this steady is for two separate counts (lower tail)."""
    reference: dict[str, Any] | None
    duplicate: bool


def _double_counting(rows: list[ActionAudit], seen: _Seen,
                     window: tuple[dt.date, dt.date] | None, settings: ReconcileSection,
                     mapping: ConversionMap, outcomes: Mapping[str, int]) -> list[Finding]:
    """Primary actions of one account counting the same conversions, whatever the mapping:
    two actions of one category (or one mapped conversion) whose daily counts move together
    far more closely than two separate counts can, and which add up to about twice the
    conversions (near-equal, or at least 1.5x the reference when there is one). Each set of
    such actions is one finding."""
    if window is None:
        return []
    primary = sorted((r for r in rows if r.in_column),
                     key=lambda r: (-r.conversions, r.name))
    span = (window[1] - dt.timedelta(days=MEASURED_DAYS - 1),
            window[1] - dt.timedelta(days=settings.settle_days))
    pairs: list[_Pair] = []
    for i, first in enumerate(primary):
        for second in primary[i + 1:]:
            related = (first.category and first.category == second.category) or (
                first.conversion is not None and first.conversion == second.conversion)
            if related:
                pair = _measure(first, second, seen, span, mapping, outcomes, settings)
                if pair is not None and pair.duplicate:
                    pairs.append(pair)
    findings = []
    for group in _linked(pairs):
        if all(r.kind is Kind.MICRO for r in group):
            continue  # micro_in_column already makes them all secondary
        findings.append(_double_counting_finding(
            group, [p for p in pairs if p.first in group]))
    return findings


def _measure(first: ActionAudit, second: ActionAudit, seen: _Seen,
             span: tuple[dt.date, dt.date], mapping: ConversionMap,
             outcomes: Mapping[str, int], settings: ReconcileSection) -> _Pair | None:
    """``first`` and ``second`` (``first`` the busier) over the settled days of ``span`` on
    which both were live (from the later one's first conversion to the earlier one's last)."""
    a, b = (seen.activity.get((r.account_id, r.name), _Activity()) for r in (first, second))
    if a.first is None or b.first is None or a.last is None or b.last is None:
        return None
    start, end = max(span[0], a.first, b.first), min(span[1], a.last, b.last)
    days = [start + dt.timedelta(days=i) for i in range((end - start).days + 1)]
    x = np.array([a.daily.get(d, 0.0) for d in days])
    y = np.array([b.daily.get(d, 0.0) for d in days])
    if (len(days) < DUPLICATE_MIN_DAYS or min(x.sum(), y.sum()) < DUPLICATE_MIN_COUNT
            or x.std() == 0 or y.std() == 0):
        return None
    correlation = float(np.corrcoef(x, y)[0, 1])
    # Two separate counts split each day's total binomially around their overall share:
    # chi-square of about its degrees of freedom. One count seen twice splits it far more
    # evenly (a thinned copy: (1 - p) / (1 + p) of that).
    total = x + y
    live = total > 0
    share = x.sum() / total.sum()
    chi2 = float(np.sum((x[live] - share * total[live]) ** 2
                        / (total[live] * share * (1 - share))))
    freedom = int(live.sum()) - 1
    if freedom < DUPLICATE_MIN_DAYS - 1:
        return None
    p_separate = float(scistats.chi2.cdf(chi2, freedom))
    reference = _reference(first, second, seen, mapping, outcomes, settings)
    larger, smaller = max(x.sum(), y.sum()), min(x.sum(), y.sum())
    twice = (smaller >= NEAR_EQUAL * larger
             or (reference is not None
                 and first.conversions + second.conversions
                 >= REFERENCE_TIMES * reference["count"]))
    together = p_separate < DUPLICATE_P and correlation >= DUPLICATE_MIN_R
    return _Pair(first, second, len(days), rounded(correlation, 3), rounded(chi2 / freedom, 3),
                 float(f"{p_separate:.3g}"), reference, together and twice)


def _reference(first: ActionAudit, second: ActionAudit, seen: _Seen, mapping: ConversionMap,
               outcomes: Mapping[str, int], settings: ReconcileSection) -> dict[str, Any] | None:
    """The count of the business event the two stand for, where one of them is mapped: GA4's
    events on the account's campaigns in the window, else the CRM's outcomes (all traffic);
    None with fewer than ``min_count``."""
    for r in (first, second):
        definition = next((d for d in mapping.definitions if d.name == r.conversion), None)
        if definition is None:
            continue
        events = definition.names.on(Platform.GA4)
        campaigns = seen.campaigns.get(r.account_id, set())
        ga4 = sum(n for (event, campaign), n in seen.ga4.items()
                  if event in events and campaign in campaigns)
        if ga4 >= settings.min_count:
            return {"platform": "ga4", "conversion": definition.name, "count": rounded(ga4),
                    "events": list(events), "scope": "the account's campaigns"}
        crm = outcomes.get(definition.name, 0)
        if crm >= settings.min_count:
            return {"platform": "crm", "conversion": definition.name, "count": crm,
                    "scope": "all traffic"}
    return None


def _linked(pairs: list[_Pair]) -> list[list[ActionAudit]]:
    """The sets of actions the pairs link (busiest first)."""
    groups: list[list[ActionAudit]] = []
    for pair in pairs:
        touching = [g for g in groups if pair.first in g or pair.second in g]
        merged = [r for g in touching for r in g]
        merged += [r for r in (pair.first, pair.second) if r not in merged]
        groups = [g for g in groups if g not in touching] + [merged]
    return [sorted(g, key=lambda r: (-r.conversions, r.name)) for g in groups]


def _double_counting_finding(group: list[ActionAudit], pairs: list[_Pair]) -> Finding:
    """``group``: primary actions counting the same conversions, busiest first; ``pairs``:
    the measurements that link them."""
    keep = min(group, key=lambda r: (r.type.startswith("GOOGLE_ANALYTICS"), -r.conversions))
    group = [keep, *(r for r in group if r is not keep)]  # the one to keep named first
    largest = max(r.conversions for r in group)
    total = sum(r.conversions for r in group)
    times = rounded(total / largest if largest else 0)
    names = _and([f"'{r.name}'" for r in group])
    categories = sorted({r.category for r in group if r.category})
    what = f"category {', '.join(categories)}" if categories else "one conversion"
    corr = min(p.correlation for p in pairs)
    reference = next((p.reference for p in pairs if p.reference), None)
    counted = "twice" if len(group) == 2 else f"up to {len(group)} times"
    ref_text = ""
    if reference is not None and reference["platform"] == "ga4":
        events = ", ".join(f"'{e}'" for e in reference["events"])
        ref_text = f"; GA4 counts {reference['count']:g} {events} events on the same campaigns"
    elif reference is not None:
        ref_text = (f"; the CRM holds {reference['count']:g} {reference['conversion']} "
                    "outcomes, all traffic")
    message = (f"{names} are {'both' if len(group) == 2 else 'all'} primary ({what}) and "
               f"count the same conversions: the Conversions column, which bidding reads, "
               f"counts them {counted}: {total:g} in the window for about {largest:g} "
               f"({times:g}x){ref_text}. Their daily counts move together (r = {corr:.2f}), "
               "too closely for separate conversions.")
    others = [r for r in group if r is not keep]
    fix = (f"{GOALS_PATH} > '{others[0].name}' > Edit settings > Action optimization: "
           "Secondary action")
    if len(others) > 1:
        fix += ", and the same for " + _and([f"'{r.name}'" for r in others[1:]])
    removable = [f"'{r.name}'" for r in others if r.type in TAG_TYPES]
    fix += (" (it stays in All conversions)" if len(others) == 1 else
            " (they stay in All conversions)")
    if len(removable) == 1:
        fix += (f"; or, if {removable[0]} is a second tag firing on the same page, remove "
                "that tag")
    elif removable:
        fix += (f"; or, if {_and(removable)} are extra tags firing on the same page, "
                "remove them")
    fix += f". Keep '{keep.name}' primary."
    return Finding("audit", "double_counting", "error", names, message, fix, {
        "category": ", ".join(categories),
        "conversions": {r.name: r.conversion for r in group},
        "actions": {r.name: r.conversions for r in group},
        "column_conversions": rounded(total), "times_the_largest": times,
        "daily_correlation": corr, "reference": reference, "keep": keep.name,
        "pairs": [{"actions": [p.first.name, p.second.name], "days": p.days,
                   "correlation": p.correlation, "dispersion": p.dispersion,
                   "p_separate": p.p_separate} for p in pairs]})


def _and(items: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


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
        elif r.upload_of:
            notes.append(f"'{r.name}' has no conversions in {days} days: it is convsync's "
                         f"upload action for {', '.join(r.upload_of)}"
                         + (f": {r.uploads:,} uploads in the ledger (`convsync uploads` "
                            "shows what Google did with them)" if r.uploads else
                            ", an offline import with nothing to upload yet"))
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


