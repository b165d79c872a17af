"""The HTML report: written by ``convsync report``, self-contained, and drawn by a real
browser (headless Chromium) without console errors and with its charts on screen."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
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
                  "macro vs micro conversions per day", "What a micro conversion is worth"):
        assert title in page  # chart titles are text in the SVG
    assert "America/Los_Angeles" in page and "day, in each platform's own time zone" in page


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
