"""The HTML report: written by ``convsync report``, self-contained, and drawn by a real
browser (headless Chromium) without console errors and with its charts on screen."""

from __future__ import annotations

import datetime as dt
import html
import json
import re
import shutil
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
from markupsafe import escape
from PIL import Image
from typer.testing import CliRunner

from convsync import pipeline
from convsync.cli import app
from convsync.report import build_report
from convsync.report.build import value_row
from convsync.report.charts import PLATFORM_COLOURS
from convsync.sandbox import server
from convsync.sandbox.world import World, WorldSpec
from convsync.settings import load_config, load_secrets
from convsync.store import Store

TODAY = dt.date(2026, 10, 31)
START = TODAY - dt.timedelta(days=39)
AS_OF = dt.datetime(2026, 10, 31, 15, tzinfo=dt.UTC)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
runner = CliRunner()


@pytest.fixture(scope="module")
def config_path(tls_files: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A client whose store holds a 40-day world with a duplicate tag and a broken checkout,
    and the micro-conversion values computed from it."""
    spec = WorldSpec(seed=71, start=START, days=40, campaigns=6,
                     faults=frozenset({"duplicate_tag", "broken_checkout"}),
                     as_of=AS_OF)
    path = tmp_path_factory.mktemp("report") / "client.toml"
    with server.start(World(spec), tls_files[0].parent) as running:
        server.write_client_config(path, running)
        config = load_config(path)
        with Store.open(config.store_url()) as store:
            result = pipeline.pull(config, load_secrets(config), store, since=START,
                                   until=TODAY, today=TODAY)
            pipeline.values(config, store, AS_OF)  # the report shows the stored values
    assert result.failed == []
    return path


@pytest.fixture(scope="module")
def written(config_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("out")
    result = runner.invoke(app, ["report", "--config", str(config_path), "--out", str(out),
                                 "--json"])
    assert result.exit_code == 3, result.output  # the faults are beyond tolerance
    summary = json.loads(result.stdout)
    assert summary["html"] == str(out / "report.html") and summary["alerts"] >= 2
    return out


def test_the_report_and_the_store_are_for_their_owner_only(written: Path,
                                                          config_path: Path) -> None:
    """Issue 13, item 10: files convsync writes are 0600, their folders 0700."""
    assert stat.S_IMODE(written.stat().st_mode) == 0o700
    for name in ("report.html", "report.json"):
        assert stat.S_IMODE((written / name).stat().st_mode) == 0o600
    store = Path(load_config(config_path).store_url().removeprefix("sqlite:///"))
    assert stat.S_IMODE(store.stat().st_mode) == 0o600


def test_the_report_is_one_self_contained_file_with_its_data_beside_it(
        written: Path, config_path: Path) -> None:
    page = (written / "report.html").read_text(encoding="utf-8")
    data = json.loads((written / "report.json").read_text(encoding="utf-8"))
    assert page.startswith("<!doctype html>")
    assert len(re.findall(r"<svg[\s>]", page)) == 6  # per macro conversion, funnel x 3, ...
    external = re.findall(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//|url\(\s*["']?https?:|"""
                          r"""@import""", page)
    assert external == []  # no CDN, no web font: it works offline
    codes = [f["code"] for f in data["findings"]]
    assert {"double_counting", "duplicate_tag", "step_broken"} <= set(codes)
    for finding in data["findings"]:
        assert str(escape(finding["message"])) in page  # as the template escapes it
    config = load_config(config_path)
    with Store.open(config.store_url()) as store:
        report = build_report(config, store)
    assert len(data["reconciliation"]["days"]) == len(report.reconciliation.days)
    assert data["since"] == str(START) and data["until"] == str(TODAY)
    assert data["summary"]["alerts"] == len(report.alerts)
    with Store.open(config.store_url()) as store:
        assert data["values"] == json.loads(json.dumps(store.micro_values(config.client.name)))
    assert {"add_to_cart", "begin_checkout"} <= {v["conversion"] for v in data["values"]}
    for title in ("purchase: conversions per day, by platform", "Step-to-step rates by traffic",
                  "macro vs micro conversions per day",
                  "What one event of each micro conversion uploads"):
        assert title in page  # chart titles are text in the SVG
    assert "America/Los_Angeles" in page and "day, in the time zone beside each platform" in page
    # Klaviyo's days are the client's, not an account's own: the axes say whose they are
    assert "own time zone" not in page and "Klaviyo's are the client's" in page


def test_the_values_table_shows_what_each_stored_row_uploads(written: Path,
                                                            config_path: Path) -> None:
    """One row per micro conversion over all segments: the upload value the store holds when
    the conversion is advised for upload, otherwise no figure at all."""
    config = load_config(config_path)
    with Store.open(config.store_url()) as store:
        stored = [v for v in store.micro_values(config.client.name) if v["segment"] == "*"]
    page = (written / "report.html").read_text(encoding="utf-8")
    rows = _value_rows(page)
    assert set(rows) == {v["conversion"] for v in stored}
    for v in stored:
        cells = rows[v["conversion"]]
        if v["recommendation"] == "track_and_upload" and v["value"] is not None:
            assert v["upload_value"] is not None
            assert cells["upload"] == f"{v['upload_value']:,.2f}"
        else:
            assert cells["upload"].startswith("not uploaded")
            assert not re.search(r"\d", cells["upload"])
        assert f"{v['estimate']:,.2f}" in cells["expected"]
        assert f"{v['volume']:,}" == cells["people"]
    basis = stored[0]
    intro = page[page.index('<section id="values">'):page.index("<figure>",
                                                                 page.index('id="values"'))]
    for text in (basis["window_start"][:10], basis["as_of"][:10], "diagnostic",
                 "share the sales they lead", f"{basis['horizon_days']:g} days",
                 f"burn-in of {basis['burn_in_days']:.1f} days",
                 f"{basis['history_days']:,.1f} days of journeys"):
        assert text in " ".join(intro.split()), text
    compared_from = (dt.datetime.fromisoformat(basis["window_start"])
                     + dt.timedelta(days=basis["burn_in_days"]))
    if compared_from < AS_OF - dt.timedelta(days=basis["horizon_days"]):
        assert f"first seen from {compared_from:%Y-%m-%d}" in intro
    else:  # 40 days of history: shorter than the burn-in plus the horizon
        assert "No one can be compared yet" in intro
    for label in _uploaded_labels(page):  # the chart sends what the table says
        conversion, figure = label
        assert rows[conversion]["upload"] == figure


CRAFTED = {
    # conversion: (recommendation, estimate, value, withheld, upload_value)
    "add_to_cart": ("track_and_upload", 31.25, 31.25, "", 12.34),
    "begin_checkout": ("track_and_upload", 44.44, None,
                       "interval too wide (2.5 x the value, max 2)", 6.66),
    "newsletter_signup": ("drop_noise", 7.77, 7.77, "", 5.55),
    "product_view": ("analytics_only", 3.21, 3.21, "", None),
}
"""Rows that ``convsync values`` would not write as such: a dropped step with a value and
even an upload figure, a withheld one with a stale upload figure. The report must show
neither figure."""


@pytest.fixture
def crafted(config_path: Path, tmp_path: Path) -> tuple[Path, list[dict[str, object]]]:
    """A copy of the client whose latest values are ``CRAFTED`` (and a per-segment row with
    its own upload figure): the report written from it, and the rows."""
    client = tmp_path / "client"
    shutil.copytree(config_path.parent, client)
    config = load_config(client / config_path.name)
    with Store.open(config.store_url()) as store:
        template = next(v for v in store.micro_values(config.client.name)
                        if v["segment"] == "*")
        rows: list[dict[str, object]] = []
        for conversion, (advice, estimate, value, withheld, upload) in CRAFTED.items():
            rows.append(template | {
                "conversion": conversion, "recommendation": advice, "estimate": estimate,
                "interval": [estimate * 0.9, estimate * 1.1], "value": value,
                "withheld": withheld, "upload_value": upload,
                "upload_note": "ladder credit: 40% of the ladder's value",
                "reason": f"crafted {advice}"})
        rows.append(rows[0] | {"segment": "Search 001", "upload_value": 98.76})
        store.save_micro_values(config.client.name, AS_OF + dt.timedelta(days=1), rows)
    out = tmp_path / "out"
    result = runner.invoke(app, ["report", "--config", str(client / config_path.name),
                                 "--out", str(out)])
    assert result.exit_code == 3, result.output
    return out, rows


def test_a_dropped_or_withheld_step_shows_no_upload_figure(
        crafted: tuple[Path, list[dict[str, object]]]) -> None:
    out, stored = crafted
    page = (out / "report.html").read_text(encoding="utf-8")
    rows = _value_rows(page)
    assert set(rows) == set(CRAFTED)  # per segment: in report.json only
    assert rows["add_to_cart"]["upload"] == "12.34" and rows["add_to_cart"]["advice"] == "upload"
    for conversion, advice, why in (("newsletter_signup", "drop", "advice: drop"),
                                    ("begin_checkout", "upload", "value withheld"),
                                    ("product_view", "analytics", "advice: analytics")):
        cells = rows[conversion]
        assert cells["advice"] == advice
        assert cells["upload"] == f"not uploaded {why}"  # no figure in the upload cell
        assert f"{CRAFTED[conversion][1]:,.2f}" in cells["expected"]  # the diagnostic stays
    assert "value withheld: interval too wide" in rows["begin_checkout"]["reason"]
    for figure in ("5.55", "6.66", "98.76"):  # not in the table, not in the chart
        assert figure not in page
    assert sorted(_uploaded_labels(page)) == [("add_to_cart", "12.34")]
    assert {c for c, _ in _not_uploaded_labels(page)} == {"begin_checkout",
                                                         "newsletter_signup", "product_view"}
    data = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert data["values"] == json.loads(json.dumps(sorted(
        stored, key=lambda v: (v["conversion"], v["segment"]))))  # as stored, every segment


def test_a_row_stored_before_upload_values_uploads_nothing() -> None:
    old = {"conversion": "add_to_cart", "segment": "*", "estimate": 30.5,
           "interval": [29.8, 31.2], "value": 30.5, "volume": 100, "lift": 3.0,
           "lift_interval": [2.0, 4.0], "coverage": 0.5, "recommendation": "track_and_upload",
           "reason": "lift 3.0 [2.0, 4.0]"}
    row = value_row(old)
    assert row.upload is None and row.not_uploaded == "no upload value stored"
    assert value_row(old | {"upload_value": 0.0}).upload is None
    assert value_row(old | {"upload_value": 9.5}).upload == 9.5
    assert value_row(old | {"upload_value": 9.5, "recommendation": "drop_noise"}).upload is None


def test_a_lift_nobody_without_the_step_contradicts_reads_as_its_lower_end() -> None:
    from convsync.report.render import _lift

    row = {"conversion": "product_view", "segment": "*", "estimate": 10.4,
           "interval": [9.9, 11.0], "value": 10.4, "volume": 10_812, "lift": 253.4,
           "lift_interval": [6.19, 5782.0], "coverage": 1.0,
           "recommendation": "track_and_upload", "reason": "none bought", "upload_value": 0.07,
           "compared_doers": 5429, "compared_doers_converted": 613, "compared_others": 54,
           "compared_others_converted": 0}
    assert _lift(value_row(row)) == "6.2+"
    assert _lift(value_row(row | {"compared_others_converted": 1, "lift": 6.1,
                                  "lift_interval": [2.03, 118.0]})) == "6.10 (2.0-100+)"


def _value_rows(page: str) -> dict[str, dict[str, str]]:
    """The values table's rows by conversion: each cell's text (tags dropped, spaces
    collapsed) under a name from its column's header."""
    section = page[page.index('<section id="values">'):]
    table = section[section.index("<table"):section.index("</table>")]
    headers = [_text(h) for h in re.findall(r"<th[^>]*>(.*?)</th>", table, flags=re.S)]
    names = [next((name for name, words in COLUMNS.items() if header.startswith(words)), header)
             for header in headers]
    rows = {}
    for row in re.findall(r"<tr[^>]*>\s*<td.*?</tr>", table, flags=re.S):
        cells = [_text(cell) for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, flags=re.S)]
        assert len(cells) == len(names), row
        rows[cells[0]] = dict(zip(names, cells, strict=True))
    return rows


COLUMNS = {"conversion": "micro conversion", "people": ("people", "events"),
           "upload": "upload value", "expected": ("expected value", "estimate"),
           "lift": "lift", "buyers_first": "buyers", "advice": ("advice", "recommendation"),
           "reason": "reason"}
"""The values table's columns by the words their headers start with (an older report's too,
so that these tests read it)."""


def _text(cell: str) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", cell)).split())


def _chart_texts(page: str) -> list[tuple[float, str]]:
    """The values chart's texts with their heights (SVG y)."""
    section = page[page.index('<section id="values">'):]
    svg = section[section.index("<svg"):section.index("</svg>")]
    texts = []
    for attributes, text in re.findall(r"<text([^>]*)>(.*?)</text>", svg, flags=re.S):
        where = (re.search(r'\by="([-\d.]+)"', attributes)
                 or re.search(r"translate\([-\d.]+ ([-\d.]+)\)", attributes))
        assert where is not None, attributes
        texts.append((float(where.group(1)), html.unescape(text)))
    return texts


def _labelled(page: str, pattern: str) -> list[tuple[str, str]]:
    """Chart labels matching ``pattern``, each with the conversion whose tick label is
    nearest (the label's bar is that conversion's), and the pattern's group."""
    texts = _chart_texts(page)
    names = [(y, text) for y, text in texts if text in _value_rows(page)]
    found = []
    for y, text in texts:
        match = re.fullmatch(pattern, text)
        if match:
            nearest = min(names, key=lambda name: abs(name[0] - y))[1]
            found.append((nearest, match.group(1)))
    return found


def _uploaded_labels(page: str) -> list[tuple[str, str]]:
    return _labelled(page, r"([\d,.]+) USD uploaded per event")


def _not_uploaded_labels(page: str) -> list[tuple[str, str]]:
    return _labelled(page, r"not uploaded \((.*)\)")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed: .ci/run installs "
                                             "Debian's chromium; elsewhere apt install chromium")
def test_the_report_opens_in_headless_chromium_and_shows_its_charts(
        written: Path, tmp_path: Path) -> None:
    assert CHROMIUM is not None
    control = tmp_path / "control.html"
    control.write_text("<!doctype html><p>x</p><script>throw new Error('planted')</script>")
    assert "Uncaught Error: planted" in _chromium(CHROMIUM, control, tmp_path / "c.png",
                                                  "200,100")[1]

    report = written / "report.html"
    shot, log = _chromium(CHROMIUM, report, tmp_path / "report.png")
    assert ":CONSOLE" not in log and "Uncaught" not in log, log
    stripped = tmp_path / "no-charts.html"
    stripped.write_text(re.sub(r"<svg.*?</svg>", "", report.read_text(), flags=re.S))
    bare, _ = _chromium(CHROMIUM, stripped, tmp_path / "bare.png")
    for platform, colour in PLATFORM_COLOURS.items():
        assert _pixels(shot, colour) > 300, f"no {platform} line on screen"
        assert _pixels(bare, colour) < 20  # only the charts draw in these colours


def _chromium(binary: str, page: Path, png: Path,
              window: str = "1280,8000") -> tuple[np.ndarray, str]:
    """Open a page in headless Chromium (no network at all): its screenshot as an RGB array,
    and Chromium's log, where console messages and uncaught errors show as CONSOLE lines."""
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--hide-scrollbars",
               "--host-resolver-rules=MAP * ~NOTFOUND", "--enable-logging=stderr", "--v=0",
               f"--user-data-dir={png.parent / (png.stem + '-profile')}",
               f"--screenshot={png}", f"--window-size={window}", page.resolve().as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert png.exists(), done.stderr[-3000:]
    with Image.open(png) as image:
        pixels = np.asarray(image.convert("RGB"))
    return pixels, done.stderr


def _pixels(image: np.ndarray, colour: str) -> int:
    """Pixels within a small distance of a colour (anti-aliased edges aside)."""
    near = np.ones(image.shape[:2], dtype=bool)
    for channel, hex_pair in enumerate((colour[1:3], colour[3:5], colour[5:7])):
        near &= np.abs(image[:, :, channel].astype(np.int16) - int(hex_pair, 16)) <= 24
    return int(near.sum())
