"""The `convsync values` tables: what a marketer reads, at 80 columns.

One row per micro conversion (``--by segment``: per segment too), short headers with their
units, and every reason as a numbered footnote under the table instead of a cell that wraps
over ten lines. Works on the JSON-able summary ``pipeline.values`` returns, so the table and
``--json`` say the same things.
"""

from __future__ import annotations

import datetime as dt
import math
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from zoneinfo import ZoneInfo

from rich import box
from rich.table import Table

from convsync.valuation import ADVICE

ALL = "*"
SHORT: Mapping[str, str] = {str(k): v for k, v in ADVICE.items()}
"""Each recommendation as one word, explained under the table."""
MEANING = {
    "upload": "predicts the macro: upload its events with the upload value",
    "analytics": "keep it in analytics, do not upload it",
    "no evidence": "too few comparable people yet to say; backfill more history",
    "drop": "does not predict the macro: neither upload nor optimise for it",
}

Row = Mapping[str, Any]
COMMAND = "  "
"""Lines starting so are commands to copy: printed whole, never wrapped."""


def number(x: float | None) -> str:
    """A figure in at most about five characters: 0.07, 10.5, 312, 3.0k, 305k."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if math.isinf(x):
        return "inf"
    size = abs(x)
    if size >= 10_000:
        return f"{x / 1000:,.0f}k"
    if size >= 1000:
        return f"{x / 1000:.1f}k"
    if size >= 100:
        return f"{x:.0f}"
    if size >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


LIFT_CAP = 100.0
"""Lifts beyond this read "100+": nearly nobody buys without the step, and "30k times
likelier" (a continuity correction over zero buyers) means nothing more to a reader."""


def lift_text(row: Row) -> str:
    if row["lift"] is None:
        return "-"
    low, high = row["lift_interval"]
    if low >= LIFT_CAP:
        return "100+"
    if row["compared_others"] and not row["compared_others_converted"]:
        return f"{rough(low)}+"  # nobody without it bought: only the lower end means anything
    top = "100+" if high >= LIFT_CAP else rough(high)
    point = "100+" if row["lift"] >= LIFT_CAP else number(row["lift"])
    return f"{point} ({rough(low)}-{top})"


def rough(x: float) -> str:
    """Two significant figures, for the ends of a range: 0.19, 6.0, 40, 1.2k, 305k."""
    if x < 10:
        return f"{x:.1f}" if x >= 1 else f"{x:.2f}"
    return f"{float(f'{x:.2g}'):.0f}" if x < 1000 else number(x)


def history_lines(summary: Mapping[str, Any], config_path: str) -> Iterator[str]:
    """What the figures rest on: the pulled window, the burn-in, the sources, and the
    backfill to run when the history is too short for a sound comparison."""
    zone = ZoneInfo(summary["timezone"])
    as_of = dt.datetime.fromisoformat(summary["as_of"]).astimezone(zone)
    last_day = (as_of - dt.timedelta(microseconds=1)).date()
    history, burn_in = summary["history_days"], summary["burn_in_days"]
    horizon = summary["horizon_days"]
    sources = ", ".join(f"{name} {count:,}" for name, count in
                        sorted(summary["sources"].items(), key=lambda kv: -kv[1]))
    if summary["window_start"]:
        start = dt.datetime.fromisoformat(summary["window_start"]).astimezone(zone)
        yield (f"History: {start:%Y-%m-%d} .. {last_day}, {history:.1f} days "
               f"of journeys ({sources or 'no events'}).")
        compared = start + dt.timedelta(days=burn_in)
        last = as_of - dt.timedelta(days=horizon)
        if compared <= last:
            yield (f"Horizon {horizon} days. Lifts compare people first seen from "
                   f"{compared:%Y-%m-%d} (burn-in {burn_in:.1f} days, as their journey may "
                   f"have begun before the window) to {last:%Y-%m-%d} (so each had {horizon} "
                   "days to convert).")
        else:
            yield (f"Horizon {horizon} days. No lift yet: people first seen after the burn-in "
                   f"({burn_in:.1f} days, from {compared:%Y-%m-%d}) have not had {horizon} "
                   "days to convert.")
    needed = summary["sound_history_days"]
    if history < needed:
        since = last_day - dt.timedelta(days=math.ceil(needed) - 1)
        yield (f"History too short for sound comparisons: {history:.1f} days, needs about "
               f"{needed:.0f} (burn-in, horizon and a month of cohorts). Run:")
        yield f"{COMMAND}convsync backfill --config {config_path} --since {since:%Y-%m-%d}"


class Footnotes:
    """Numbered notes, each text once."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def mark(self, text: str) -> str:
        if not text:
            return ""
        if text not in self.texts:
            self.texts.append(text)
        return f"[{self.texts.index(text) + 1}]"

    def grid(self) -> Table:
        """The notes under their numbers, wrapped lines indented past the number."""
        grid = Table.grid(padding=(0, 1, 0, 0))
        grid.add_column(no_wrap=True)
        grid.add_column()
        for number_, text in enumerate(self.texts, 1):
            grid.add_row(f"[{number_}]", text)
        return grid


def comparison_note(row: Row) -> str:
    reason = row["reason"]
    if row["compared_doers"] or row["compared_others"]:
        reason += (f"; compared {row['compared_doers']:,} people who did it "
                   f"({row['compared_doers_converted']:,} bought) with "
                   f"{row['compared_others']:,} who did not "
                   f"({row['compared_others_converted']:,} bought)")
    if row["upload_value"] is not None:
        reason += f"; upload value: {row['upload_note']}"
    return reason


def overview(summary: Mapping[str, Any], notes: Footnotes) -> Table:
    """One row per micro conversion, over all segments."""
    table = _table(("conversion", "left"), ("upload", "right"), ("expected", "right"),
                   ("lift (90% range)", "right"), ("people", "right"),
                   ("buyers\nfirst", "right"), ("advice", "left"))
    for row in _overall_rows(summary["values"]):
        word = SHORT[row["recommendation"]]
        coverage = "-" if row["coverage"] is None else f"{row['coverage']:.0%}"
        table.add_row(row["conversion"], number(row["upload_value"]), number(row["estimate"]),
                      lift_text(row), f"{row['volume']:,}", coverage,
                      f"{word} {notes.mark(comparison_note(row))}")
    for name in summary["missing"]:
        table.add_row(name, "", "", "", "0", "", notes.mark(
            "mapped in the config, but no journeys of it are stored: pull a source that has "
            "it person by person (Klaviyo, GA4 with a click-id dimension, CRM files)"))
    return table


def by_segment(summary: Mapping[str, Any], notes: Footnotes) -> Table:
    """Every segment's row, the one over all segments first."""
    table = _table(("conversion", "left"), (summary["segment_by"], "left"),
                   ("upload", "right"), ("expected", "right"), ("90% range", "right"),
                   ("people", "right"), ("note", "left"))
    for row in _by_conversion(summary["values"]):
        low, high = row["interval"]
        table.add_row(row["conversion"], "all" if row["segment"] == ALL else row["segment"],
                      number(row["upload_value"]), number(row["estimate"]),
                      f"{number(low)}-{number(high)}", f"{row['volume']:,}",
                      notes.mark(segment_note(row)))
    return table


def segment_note(row: Row) -> str:
    """Why a segment's row uploads what it does, where that needs saying."""
    if row["segment"] == ALL:
        return row["reason"] if row["upload_value"] is None else ""
    if row["withheld"] and row["upload_value"] is not None:
        return f"uploads the figure over all segments; its own is withheld: {row['withheld']}"
    return row["withheld"] if row["upload_value"] is None and row["withheld"] else ""


def _by_conversion(rows: Sequence[Row]) -> list[Row]:
    """Rows in the order the conversions come (the ladder first), each conversion's row over
    all segments first, then its segments by volume."""
    order = {name: k for k, name in enumerate(dict.fromkeys(r["conversion"] for r in rows))}
    return sorted(rows, key=lambda r: (order[r["conversion"]], r["segment"] != ALL,
                                       -r["volume"]))


def wide(summary: Mapping[str, Any], notes: Footnotes) -> Table:
    """Every figure of every row: for a wide terminal or a file."""
    currency = summary["currency"]
    table = _table(("conversion", "left"), (summary["segment_by"], "left"),
                   (f"upload {currency}/event", "right"),
                   (f"expected {currency}/person", "right"),
                   ("90% range", "right"), ("buy share", "right"),
                   (f"avg macro {currency}", "right"), ("lift (90%)", "right"),
                   ("people", "right"), ("buyers first", "right"), ("realised", "right"),
                   ("advice", "left"), ("note", "left"))
    for row in _by_conversion(summary["values"]):
        low, high = row["interval"]
        coverage = "-" if row["coverage"] is None else f"{row['coverage']:.0%}"
        overall = row["segment"] == ALL
        table.add_row(
            row["conversion"], "all" if overall else row["segment"],
            number(row["upload_value"]), number(row["estimate"]), f"{number(low)}-{number(high)}",
            f"{row['customer_share']:.1%}", number(row["mean_macro_value"]),
            lift_text(row) if overall else "", f"{row['volume']:,}",
            coverage if overall else "", number(row["realisation_ratio"]),
            SHORT[row["recommendation"]] if overall else "",
            notes.mark(comparison_note(row) if overall else segment_note(row)))
    return table


def withheld_line(summary: Mapping[str, Any], listed: bool) -> str:
    """How many per-segment values of the uploaded conversions the guard rails withheld (and
    so upload the figure over all segments), and why, in one line."""
    uploaded = {r["conversion"] for r in summary["values"]
                if r["segment"] == ALL and r["upload_value"] is not None}
    rows = [r for r in summary["values"] if r["segment"] != ALL and r["conversion"] in uploaded]
    withheld = [r for r in rows if r["withheld"]]
    if not withheld:
        return ""
    reasons = Counter(_reason_kind(r["withheld"]) for r in withheld)
    why = ", ".join(f"{kind}: {count}" for kind, count in reasons.most_common())
    segment = summary["segment_by"]
    return (f"Per {segment}: {len(withheld)} of the {len(rows)} own values of the uploaded "
            f"conversions are withheld ({why}); those {segment}s upload the figure over all "
            f"{segment}s." + ("" if listed else " --by segment lists them."))


def legend(summary: Mapping[str, Any], view: str) -> Iterator[str]:
    """What the columns of ``view`` (overview, segment or wide) mean."""
    horizon, currency = summary["horizon_days"], summary["currency"]
    parts = [f"upload: {currency} one event uploads (ladder steps share the sales they lead "
             "to: over everyone on the ladder, the uploads add up to those sales once)",
             f"expected: {currency} of macro conversions one person who did it makes within "
             f"{horizon} days (a diagnostic: every ladder step counts the same sale)"]
    if view == "segment":
        parts.append("90% range: of the expected value; people: how many did it; note: why a "
                     f"{summary['segment_by']} uploads what it does")
    else:
        parts.append("lift: how much likelier comparable people who did it are to buy than "
                     "those who did not (100+: nearly nobody buys without it); people: how "
                     "many did it; buyers first: share of buyers who did it before buying")
    if view == "wide":
        parts.append("buy share: of people who did it, the share who buy within the horizon "
                     "(lag-corrected); avg macro: their average macro value; realised: "
                     "realised macro value over the expected value on matured cohorts (1.0: "
                     "as expected)")
    yield "; ".join(parts) + "."
    if view != "segment":
        used = {SHORT[r["recommendation"]] for r in summary["values"] if r["segment"] == ALL}
        yield "advice: " + "; ".join(f"{word}: {MEANING[word]}" for word in MEANING
                                     if word in used)


def _overall_rows(rows: Sequence[Row]) -> list[Row]:
    return [r for r in rows if r["segment"] == ALL]


def _reason_kind(withheld: str) -> str:
    if withheld.startswith("only"):
        return "too few events"
    if withheld.startswith("interval"):
        return "interval too wide"
    if "history" in withheld:
        return "history too short"
    return "no macro seen"


def _table(*columns: tuple[str, str]) -> Table:
    """Columns one space apart (the box's blank divider, no padding); the first (a name)
    folds when it must, figures never wrap."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=0, show_edge=False)
    for k, (header, justify) in enumerate(columns):
        table.add_column(header, justify=justify,  # type: ignore[arg-type]
                         no_wrap=k > 0, overflow="fold")
    return table
