"""The report's charts: matplotlib figures exported as inline SVG.

SVG keeps the report self-contained and small (tens of kB a chart, against ~4 MB of inlined
plotly.js for interactive charts nobody needs in an audit), sharp at any zoom, and
printable. Figures are built with the object API (``Figure``), never pyplot: no global state,
safe in threads. Text stays text (``svg.fonttype = none``), so the browser's sans-serif draws
it and the labels can be searched.
"""

from __future__ import annotations

import datetime as dt
import io
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib as mpl
from matplotlib.axes import Axes
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter, date2num
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.typing import RcKeyType

from convsync.reconcile import Funnel, FunnelDiagnosis
from convsync.report.build import ValueRow

PLATFORM_COLOURS = {"google_ads": "#1a73e8", "ga4": "#e37400", "meta": "#8e24aa",
                    "klaviyo": "#2a9d8f"}
STEP_COLOURS = ("#455a64", "#c0ca33", "#d81b60", "#6d4c41", "#00acc1")
"""Ladder transitions: not the platforms' colours, which mean platforms everywhere."""
OTHER_SEGMENT, NO_SEGMENT = "#2a9d8f", "#90a4ae"
MACRO_COLOUR, MICRO_COLOUR, FILLING_COLOUR = "#1b5e20", "#9e9d24", "#eceff1"
UPLOAD_COLOUR, EXPECTED_COLOUR, NOT_UPLOADED_COLOUR = "#00695c", "#cfd8dc", "#757575"
"""Micro-conversion values: the figure sent, the diagnostic beside it, a step not uploaded."""
PLATFORM_NAMES = {"google_ads": "Google Ads", "ga4": "GA4", "meta": "Meta",
                  "klaviyo": "Klaviyo"}
_STYLE: dict[RcKeyType, Any] = {
    "svg.fonttype": "none", "font.family": "sans-serif", "font.size": 10,
    "axes.spines.top": False, "axes.spines.right": False, "axes.titlesize": 12,
    "axes.titleweight": "bold", "axes.grid": True, "grid.color": "#e0e0e0",
    "svg.hashsalt": "convsync"}


def platform_name(platform: str) -> str:
    return PLATFORM_NAMES.get(platform, platform)


def _svg(figure: Figure) -> str:
    """The figure as an ``<svg>`` element (no XML prolog, no metadata, no external link)."""
    buffer = io.StringIO()
    with mpl.rc_context(_STYLE):
        figure.savefig(buffer, format="svg", bbox_inches="tight",
                       metadata={"Creator": None, "Date": None, "Format": None, "Type": None})
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def _figure(width: float, height: float) -> Figure:
    with mpl.rc_context(_STYLE):
        return Figure(figsize=(width, height), layout="constrained")


def _x(days: Sequence[dt.date]) -> Any:
    """Days as matplotlib date numbers (what a date axis plots)."""
    return date2num(list(days))


def _day(day: dt.date) -> float:
    return float(date2num(day))


def _date_axis(ax: Axes, label: str) -> None:
    locator = AutoDateLocator(minticks=4, maxticks=10)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
    ax.set_xlabel(label)


DAYS_BY_ZONE = "each account's or property's own; Klaviyo's are the client's"
"""Whose days each platform counts: Google Ads, GA4 and Meta report in their account's time
zone; Klaviyo's days are cut in the client's (its API gives times, convsync makes the days)."""


def daily_by_platform(conversion: str, days: Sequence[dt.date],
                      series: Mapping[str, Sequence[float]], timezones: Mapping[str, str],
                      filling_from: dt.date | None, client_timezone: str) -> str:
    """One macro conversion per day on each platform, the unsettled days shaded."""
    with mpl.rc_context(_STYLE):
        figure = _figure(11, 3.6)
        ax = figure.add_subplot()
        for platform, counts in series.items():
            ax.plot(_x(days), counts, label=f"{platform_name(platform)} ({timezones[platform]})",
                    color=PLATFORM_COLOURS.get(platform), linewidth=1.6)
        if filling_from is not None and days:
            ax.axvspan(_day(filling_from), _day(days[-1] + dt.timedelta(days=1)),
                       color=FILLING_COLOUR,
                       label="still filling (not judged)", zorder=0)
        ax.set_title(f"{conversion}: conversions per day, by platform")
        ax.set_ylabel(f"{conversion} per day (count)")
        _date_axis(ax, f"day, in the time zone beside each platform ({DAYS_BY_ZONE}; client: "
                       f"{client_timezone})")
        ax.set_ylim(bottom=0)
        figure.legend(loc="outside lower center", fontsize=8, ncols=5, frameon=False)
        return _svg(figure)


def macro_vs_micro(trends: Sequence[tuple[str, str, Sequence[dt.date], Sequence[float],
                                          Sequence[float]]]) -> str:
    """Per platform (name, time zone, days, macro counts, micro counts): macro on the left
    axis, micro on the right, as their sizes differ by orders of magnitude."""
    with mpl.rc_context(_STYLE):
        figure = _figure(11, 2.5 * max(len(trends), 1))
        axes = figure.subplots(max(len(trends), 1), 1, squeeze=False, sharex=True)[:, 0]
        for ax, (platform, tz, days, macro, micro) in zip(axes, trends, strict=False):
            ax.plot(_x(days), macro, color=MACRO_COLOUR, linewidth=1.8, label="macro (left axis)")
            ax.set_ylabel("macro / day", color=MACRO_COLOUR)
            ax.set_ylim(bottom=0)
            right = ax.twinx()
            right.plot(_x(days), micro, color=MICRO_COLOUR, linewidth=1.2, linestyle="--",
                       label="micro (right axis)")
            right.set_ylabel("micro / day", color=MICRO_COLOUR)
            right.set_ylim(bottom=0)
            right.grid(False)
            right.spines["right"].set_visible(True)
            ax.set_title(f"{platform_name(platform)}: macro vs micro conversions per day "
                         f"({tz})", loc="left")
        if trends:
            _date_axis(axes[-1], f"day, in the time zone of each title ({DAYS_BY_ZONE})")
            figure.legend(*_legend_entries(figure), loc="outside lower center", fontsize=8,
                          frameon=False, ncols=2)
        return _svg(figure)


def _legend_entries(figure: Figure) -> tuple[list[Any], list[str]]:
    """Each distinct label of the figure's lines once (every panel draws the same two)."""
    handles: dict[str, Any] = {}
    for ax in figure.axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    return list(handles.values()), list(handles)


def funnel_bars(funnel: Funnel, source: str, tz: str, currency: str) -> str:
    """The ladder's steps as bars, each drop-off written beside the step it happens at."""
    with mpl.rc_context(_STYLE):
        figure = _figure(11, 0.75 * len(funnel.steps) + 1.3)
        ax = figure.add_subplot()
        names = [s.conversion for s in funnel.steps][::-1]
        counts = [s.count for s in funnel.steps][::-1]
        colours = ["#c62828" if s.conversion == funnel.biggest_loss else "#546e7a"
                   for s in funnel.steps][::-1]
        ax.barh(names, counts, color=colours)
        top = max(counts) if counts else 0
        for y, step in enumerate(funnel.steps[::-1]):
            text = f"{step.count:,.0f}"
            if step.rate is not None:
                text += (f"  ({step.rate:.1%} of the step above; lost {step.lost:,.0f}"
                         + (f", worth {step.value_lost:,.0f} {currency}" if step.value_lost
                            else "") + ")")
            ax.text(step.count + top * 0.01, y, text, va="center", fontsize=9)
        ax.set_xlim(0, top * 1.9 if top else 1)
        ax.set_xlabel("events in the period (count)")
        ax.set_title(f"Funnel, {funnel.segment} ({platform_name(source)}, {tz}); "
                     f"red: the step that loses the most value", loc="left")
        ax.grid(axis="y", visible=False)
        return _svg(figure)


def segment_rates(funnels: Sequence[Funnel], source: str) -> str:
    """Step-to-step rates per segment side by side: where each traffic source loses people
    (each ad platform's campaigns in its platform's colour)."""
    with mpl.rc_context(_STYLE):
        figure = _figure(11, 3.8)
        ax = figure.add_subplot()
        steps = funnels[0].steps if funnels else []
        transitions = [f"{a.conversion} -> {b.conversion}" for a, b in itertools.pairwise(steps)]
        width = 0.8 / max(len(funnels), 1)
        for i, funnel in enumerate(funnels):
            rates = [100 * (s.rate or 0.0) for s in funnel.steps[1:]]
            xs = [x + (i - (len(funnels) - 1) / 2) * width for x in range(len(rates))]
            bars = ax.bar(xs, rates, width * 0.95, label=funnel.segment,
                          color=_segment_colour(funnel.segment))
            ax.bar_label(bars, fmt="%.0f%%", fontsize=7, padding=1)
        ax.set_xticks(range(len(transitions)), transitions)
        ax.set_ylabel("% of the step before")
        ax.set_title(f"Step-to-step rates by traffic source ({platform_name(source)})",
                     loc="left")
        figure.legend(fontsize=8, frameon=False, ncols=min(len(funnels), 4),
                      loc="outside lower center")
        ax.set_ylim(0, 105)
        ax.grid(axis="x", visible=False)
        return _svg(figure)


def _segment_colour(segment: str) -> str:
    for platform, name in PLATFORM_NAMES.items():
        if segment.endswith(f"({name})"):
            return PLATFORM_COLOURS[platform]
    return NO_SEGMENT if segment.startswith("no campaign") else OTHER_SEGMENT


def daily_rates(diagnosis: FunnelDiagnosis,
                collapses: Sequence[tuple[dt.date, dt.date]]) -> str:
    """Each step's daily rate, with the days a step collapsed shaded."""
    with mpl.rc_context(_STYLE):
        figure = _figure(11, 3.4)
        ax = figure.add_subplot()
        ladder, daily = diagnosis.ladder, diagnosis.daily
        for i, (above, step) in enumerate(itertools.pairwise(ladder)):
            rates = [100 * b / a if a else float("nan")
                     for a, b in zip(daily[above], daily[step], strict=True)]
            ax.plot(_x(diagnosis.days), rates, label=f"{above} -> {step}",
                    color=STEP_COLOURS[i % len(STEP_COLOURS)], linewidth=1.4)
        for first, last in collapses:
            ax.axvspan(_day(first), _day(last + dt.timedelta(days=1)), color="#ffcdd2", zorder=0,
                       label="step collapsed")
        ax.set_ylabel("% of the step before")
        ax.set_ylim(bottom=0)
        _date_axis(ax, f"day ({diagnosis.timezone})")
        ax.set_title(f"Step-to-step rates per day, all traffic "
                     f"({platform_name(diagnosis.source)})", loc="left")
        figure.legend(fontsize=8, frameon=False, ncols=5, loc="outside lower center")
        return _svg(figure)


def micro_values(rows: Sequence[ValueRow], currency: str, horizon_days: float) -> str:
    """Per micro conversion, what one event uploads (a solid bar: the figure sent) and, below
    it, the expected value of one person who did it with its 90% interval (a light bar: a
    diagnostic, never sent). A conversion not uploaded gets no upload bar and no upload
    figure, only "not uploaded" and why."""
    with mpl.rc_context(_STYLE):
        figure = _figure(11, 0.95 * len(rows) + 1.5)
        ax = figure.add_subplot()
        top = max([r.interval[1] for r in rows] + [r.upload or 0.0 for r in rows] + [1e-9])
        pad, half = top * 0.01, 0.19
        for i, row in enumerate(rows):
            if row.upload is not None:
                ax.barh(i - half, row.upload, 2 * half * 0.95, color=UPLOAD_COLOUR)
                ax.text(row.upload + pad, i - half, f"{row.upload:,.2f} {currency} uploaded "
                        "per event", va="center", fontsize=9, color=UPLOAD_COLOUR,
                        fontweight="bold")
            else:
                ax.text(pad, i - half, f"not uploaded ({row.not_uploaded})", va="center",
                        fontsize=9, color=NOT_UPLOADED_COLOUR, fontstyle="italic")
            low, high = row.interval
            ax.barh(i + half, row.estimate, 2 * half * 0.95, color=EXPECTED_COLOUR,
                    xerr=[[max(row.estimate - low, 0.0)], [max(high - row.estimate, 0.0)]],
                    error_kw={"ecolor": "#78909c", "linewidth": 1, "capsize": 3})
            ax.text(max(high, row.estimate) + pad, i + half,
                    f"expected {row.estimate:,.2f} ({low:,.2f}-{high:,.2f}) per person, "
                    "diagnostic", va="center", fontsize=8, color="#607d8b")
        ax.set_yticks(range(len(rows)),
                      [f"{r.conversion}\nadvice: {r.advice}" for r in rows])
        ax.set_ylim(len(rows) - 0.45, -0.55)
        ax.set_xlim(0, top * 1.55)
        ax.set_xlabel(f"{currency} (upload value: per event; expected value: per person)")
        ax.set_axisbelow(True)
        ax.set_title(f"What one event of each micro conversion uploads ({currency}), and the "
                     f"expected value per person within {horizon_days:g} days (diagnostic)",
                     loc="left")
        ax.grid(axis="y", visible=False)
        handles = [Patch(color=UPLOAD_COLOUR, label="upload value per event: what is sent"),
                   Patch(color=EXPECTED_COLOUR, label="expected value per person, 90% "
                         "interval: a diagnostic (every ladder step counts the same sale), "
                         "never sent")]
        figure.legend(handles=handles, loc="outside lower center", fontsize=8, ncols=2,
                      frameon=False)
        return _svg(figure)
