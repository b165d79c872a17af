"""The report's files: ``report.html`` from a Jinja2 template with the charts inline as SVG,
and ``report.json`` beside it with the same data."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from convsync.reconcile import ALL, FunnelDiagnosis, Reconciliation, as_data
from convsync.report import charts
from convsync.report.build import SEVERITY_ORDER, Report, ValueRow
from convsync.values_table import MEANING, lift_text

HTML_NAME, JSON_NAME = "report.html", "report.json"
MAX_DAY_ROWS = 400
"""Day rows shown in the HTML (the all-campaign rows first); report.json has all of them."""


def write_report(report: Report, out: Path) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.json`` into ``out`` (created if needed, for its
    owner only: a client's figures are not for every user of the machine)."""
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    html, data = out / HTML_NAME, out / JSON_NAME
    _write_private(html, render_html(report))
    _write_private(data, json.dumps(report_data(report), default=_json_value, indent=1) + "\n")
    return html, data


def _write_private(path: Path, text: str) -> None:
    """``text`` into ``path``, readable by its owner only (0600, whatever the umask)."""
    handle = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    os.fchmod(handle, 0o600)
    with os.fdopen(handle, "w", encoding="utf-8") as file:
        file.write(text)


def report_data(report: Report) -> dict[str, Any]:
    """The report as JSON-able data: what the HTML shows, and every day row."""
    fields = {f.name: getattr(report, f.name) for f in dataclasses.fields(report)}
    data: dict[str, Any] = {name: as_data(value) for name, value in fields.items()}
    data["settings"] = report.settings.model_dump()
    data["summary"] = _summary(report)
    data["findings"] = [as_data(f) for f in report.findings]
    data["json_file"] = JSON_NAME
    return data


def _summary(report: Report) -> dict[str, int]:
    counts = {severity: 0 for severity in SEVERITY_ORDER}
    for finding in report.findings:
        counts[finding.severity] += 1
    return counts | {"alerts": len(report.alerts)}


def _json_value(value: Any) -> Any:
    if isinstance(value, dt.date | dt.datetime):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    if hasattr(value, "model_dump"):
        return value.model_dump()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def render_html(report: Report) -> str:
    template = _environment().get_template("report.html.j2")
    return template.render(report=report, summary=_summary(report), charts=_charts(report),
                           day_rows=_day_rows(report.reconciliation),
                           value_rows=report.value_rows, basis=report.values_basis,
                           platforms=_platforms(report.reconciliation), ALL=ALL,
                           json_name=JSON_NAME, max_day_rows=MAX_DAY_ROWS,
                           advice_meanings=MEANING)


def _environment() -> Environment:
    env = Environment(loader=PackageLoader("convsync.report", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(num=_num, pct=_pct, platform=charts.platform_name, evidence=_evidence,
                       lift=_lift, day=_day, local=_local)
    return env


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "–"
    if digits == 0 and abs(value - round(value)) > 1e-9 and abs(value) < 100:
        digits = 2
    return f"{value:,.{digits}f}"


def _pct(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f}%"


def _lift(row: ValueRow) -> str:
    """The lift with its 90% range, as ``convsync values`` prints it: 15.4 (6.0-40)."""
    if row.lift is None:
        return "–"
    return lift_text({"lift": row.lift, "lift_interval": row.lift_interval or (row.lift,
                                                                                row.lift),
                      "compared_others": row.compared_others,
                      "compared_others_converted": row.compared_others_converted})


def _day(moment: dt.datetime | None) -> str:
    return "–" if moment is None else f"{moment:%Y-%m-%d}"


def _local(moment: dt.datetime, timezone: str) -> str:
    """A moment in the client's time zone, to the minute."""
    return f"{moment.astimezone(ZoneInfo(timezone)):%Y-%m-%d %H:%M}"


def _evidence(value: Any) -> str:
    """Evidence as compact one-line JSON."""
    return json.dumps(as_data(value), default=_json_value, ensure_ascii=False)


def _platforms(reconciliation: Reconciliation) -> list[str]:
    order = ("google_ads", "ga4", "meta", "klaviyo")
    present = {p for row in reconciliation.days for p in row.figures}
    return [p for p in order if p in present]


def _day_rows(reconciliation: Reconciliation) -> list[Any]:
    """The all-campaign rows, then the campaign rows that are not plainly ok, capped."""
    totals = [r for r in reconciliation.days if r.campaign == ALL]
    others = [r for r in reconciliation.days if r.campaign != ALL and r.status != "ok"]
    return (totals + others)[:MAX_DAY_ROWS]


def _charts(report: Report) -> dict[str, Any]:
    rec = report.reconciliation
    days = [report.since + dt.timedelta(days=i)
            for i in range((report.until - report.since).days + 1)]
    settled = [c.last for c in rec.comparisons]
    filling = min(settled) + dt.timedelta(days=1) if settled else None
    out: dict[str, Any] = {"daily": [
        Markup(charts.daily_by_platform(conversion, days, series, rec.timezones, filling,
                                        report.timezone))
        for conversion, series in _daily_series(rec, days).items()]}
    out["trends"] = Markup(charts.macro_vs_micro(
        [(t.platform, t.timezone, t.days, t.macro, t.micro) for t in report.trends]))
    if report.funnel is not None:
        out |= _funnel_charts(report.funnel, report.currency)
    basis = report.values_basis
    if basis is not None:
        out["values"] = Markup(charts.micro_values(report.value_rows, report.currency,
                                                   basis.horizon_days))
    return out


def _daily_series(rec: Reconciliation,
                  days: Sequence[dt.date]) -> dict[str, dict[str, list[float]]]:
    """Per macro conversion and platform, the all-campaign count of each day."""
    index = {day: i for i, day in enumerate(days)}
    series: dict[str, dict[str, list[float]]] = {}
    for row in rec.days:
        if row.campaign != ALL or row.date not in index:
            continue
        for platform, figure in row.figures.items():
            counts = series.setdefault(row.conversion, {}).setdefault(
                platform, [0.0] * len(days))
            counts[index[row.date]] = figure.count
    return series


def _funnel_charts(funnel: FunnelDiagnosis, currency: str) -> dict[str, Any]:
    collapses = [(f.evidence["first"], f.evidence["last"]) for f in funnel.findings
                 if f.evidence.get("segment") == funnel.overall.segment]
    return {"funnel": Markup(charts.funnel_bars(funnel.overall, funnel.source, funnel.timezone,
                                                currency)),
            "segments": Markup(charts.segment_rates(funnel.by_source, funnel.source)),
            "rates": Markup(charts.daily_rates(funnel, collapses))}
