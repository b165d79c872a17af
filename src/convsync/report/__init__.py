"""The report people look at: audit, discrepancies, funnel, trends and micro-conversion values
of one client, as one self-contained HTML file (charts inline as SVG, no CDN) and the same
data as JSON beside it.

``build_report`` reads the store and computes (``build.py``); ``write_report`` writes the
files (``render.py``, a Jinja2 template and matplotlib charts).
"""

from convsync.report.build import NoData, PlatformTrend, Report, build_report
from convsync.report.render import render_html, report_data, write_report

__all__ = ["NoData", "PlatformTrend", "Report", "build_report", "render_html", "report_data",
           "write_report"]
