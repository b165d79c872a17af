"""The funnel diagnosis: step-to-step rates by traffic segment, and the steps that broke."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from convsync.model import (
    Platform,
)
from convsync.reconcile.common import ALL, NOT_SET, Finding, rounded
from convsync.reconcile.digest import Digest
from convsync.reconcile.discrepancies import Scope, Series
from convsync.settings import ReconcileSection

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
    series = {c: Series(d.cells_of(d.headline(c, source))) for c in ladder}
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
    return FunnelDiagnosis(source.value, d.timezones.get(source, ""), ladder, rounded(average),
                           overall, by_source, by_campaign, days, daily, findings)


def _segments(d: Digest, series: Mapping[str, Series]) -> dict[str, frozenset[str]]:
    """Traffic sources (label -> campaigns): the ad platform that runs a campaign, else
    other campaigns, else none ((not set))."""
    campaigns = {c for s in series.values() for row in s.by_day.values() for c in row}
    grouped: dict[str, set[str]] = defaultdict(set)
    for c in campaigns:
        owner = d.owners.get(c)
        grouped[SOURCE_LABELS[owner] if owner else NO_CAMPAIGN if c in (NOT_SET, ALL, "")
                else OTHER_SOURCE].add(c)
    return {label: frozenset(grouped[label]) for label in sorted(grouped)}


def _funnel(segment: str, series: Mapping[str, Series], ladder: Sequence[str],
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
        steps.append(FunnelStep(conversion, rounded(counts[k]), rounded(totals[k][1]),
                                None if rate is None else rounded(rate, 4), rounded(lost or 0.0),
                                rounded(value_lost or 0.0)))
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
         "days": run.stop - run.start, "from_count": rounded(came), "count": rounded(went),
         "rate": rounded(rate, 4), "usual_rate": rounded(usual, 4), "missing": rounded(missing),
         "value_missing": rounded(value)},
        alert=True)


def _rate_over(daily: Mapping[str, Sequence[float]], a: str, b: str, *spans: slice) -> float:
    came = sum(sum(daily[a][span]) for span in spans)
    went = sum(sum(daily[b][span]) for span in spans)
    return went / came if came else 0.0


