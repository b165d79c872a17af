"""Cross-platform discrepancies: each platform against the reference, with the likely causes, and
how the platforms' days line up (time zones)."""

from __future__ import annotations

import datetime as dt
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np

from convsync.model import (
    Basis,
    Platform,
)
from convsync.reconcile.common import (
    ALL,
    CLICK_WINDOWS,
    GOALS_PATH,
    NARROW,
    NOISE_Z,
    VIEW_WINDOWS,
    Finding,
    name_of,
    rounded,
)
from convsync.reconcile.digest import Cells, Digest, VariantKey, add_cell
from convsync.settings import ReconcileSection

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
            owned = cells if p in NARROW else ref_cells
            scopes[p] = frozenset(c for _, c in owned if c != ALL)
    return scopes


def _shared_traffic(p: Platform, reference: Platform,
                    ) -> tuple[frozenset[str] | None, frozenset[str] | None] | None:
    """The traffic groups of each side that see the same people (None: all of its traffic),
    or None when the two see different traffic: two ad platforms (their own campaigns
    each), or Klaviyo (no campaigns) against an ad platform."""
    if p in NARROW and reference in NARROW:
        return None
    if Platform.KLAVIYO in (p, reference) and (p in NARROW or reference in NARROW):
        return None
    if p in NARROW:
        return None, frozenset({p.value})
    if reference in NARROW:
        return frozenset({reference.value}), None
    return None, None


class Series:
    """One platform's cells for one conversion, indexed for the questions reconcile asks:
    a day's count (one campaign, or a scope's sum) and period totals per campaign."""

    def __init__(self, cells: Cells) -> None:
        self.cells = cells
        self.by_day: dict[dt.date, dict[str, list[float]]] = defaultdict(dict)
        for (day, campaign), (n, v) in cells.items():
            add_cell(self.by_day[day], campaign, n, v)
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
                    add_cell(totals, c, n, v)
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
        self.ref = Series(d.cells_of(d.headline(conversion, reference)))
        self.series = {p: Series(d.cells_of(d.headline(conversion, p))) for p in scopes}
        """Each platform's own figures (Google Ads: the Conversions column, by click date)."""
        self.ref_judged = Series(d.cells_of(d.dated(conversion, reference)))
        self.judged = {p: Series(d.cells_of(d.dated(conversion, p))) for p in scopes}
        """The figures compared over the period: Google Ads by conversion date when that
        basis was pulled, like the reference's days (the other platforms as above)."""
        self.actions = self._in_column_actions(d.headline(conversion, Platform.GOOGLE_ADS))
        """Google Ads' in-column actions, when several count this conversion."""
        self.judged_actions = self._in_column_actions(d.dated(conversion, Platform.GOOGLE_ADS))
        self.by_date = Series(d.cells_of(d.conversion_date_variants(conversion)))
        meta = d.variants(conversion, Platform.META)
        self.windows = {w: Series(d.cells_of([k for k in meta if k[4] == w]))
                        for w in sorted({k[4] for k in meta})}

    def _in_column_actions(self, keys: Sequence[VariantKey]) -> dict[str, Series]:
        primary = [k for k in keys if self.d.in_column.get(k[3])]
        if len(primary) < 2:
            return {}
        return {k[3]: Series(self.d.cells_of([k])) for k in primary}

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
                          self._judged_basis(p).value, rounded(n), rounded(rn), rounded(v),
                          rounded(rv),
                          None if ratio is None else rounded(ratio, 3), beyond, causes)

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
                      {"actions": {a: rounded(c) for a, c in per_action.items()},
                       "times_the_largest": rounded(n / largest, 3),
                       "ratio_with_one": rounded(largest / rn, 3)})]

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
                      {"by_conversion_date": rounded(by_date), "by_click_date": rounded(by_click)})]

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
                      {w: rounded(c) for w, c in windows.items()})]

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
                      f"{name_of(high)}", {"gap": rounded(gap, 3)})]

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
                                                   "fitted_shift": rounded(apart, 3)})]

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
                     {"from": start, "to": end, "count": rounded(n),
                      "reference_count": rounded(rn)})

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
            expected[p.value] = rounded(r)
            status, found = self._judge_day(p, scope, day, campaign, fig.count, r)
            statuses.append(status)
            causes += found
        order = ("ok", "filling", "explained", "differs")
        return DayRow(day, campaign, self.conversion, figures, expected, causes,
                      max(statuses, key=order.index))

    @staticmethod
    def _figure(series: Series, day: dt.date, campaign: str, scope: Scope) -> Figure | None:
        """The day's figure; None for a campaign the series has nothing for that day."""
        if campaign != ALL and campaign not in series.by_day.get(day, {}):
            return None
        n, v = series.figure(day, campaign, scope)
        return Figure(rounded(n), rounded(v))

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
                                    {"count": rounded(count), "reference_count": rounded(against)}))
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
    return Shift(p.value, reference.value, tz, ref_tz, hours, rounded(hours / 24, 3), fitted,
                 rounded(same, 3), rounded(shifted, 3), len(days))


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
        {"timezone": tz, "client_timezone": client_timezone, "fitted_shift": rounded(ahead, 3),
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


