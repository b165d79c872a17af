"""scripts/bench_pull.py on a tiny world: its JSON carries convsync's CPU as a ratio of each
platform's floor, and the floor read the very rows convsync stored. No CPU or time figure is
asserted: they belong to the machine."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
PLATFORMS = {"google_ads", "ga4", "meta", "klaviyo"}


def test_bench_pull_reports_the_cpu_ratio_to_each_platforms_floor(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_pull.py"), "--days", "5",
         "--campaigns", "3", "--floor-runs", "1", "--json", "--state-dir",
         str(tmp_path / "state")],
        capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    figures = json.loads(done.stdout.splitlines()[-1])

    ratios = figures["cpu_ratio_vs_floor"]
    assert set(ratios) == PLATFORMS | {"overall"}
    for name, ratio in ratios.items():
        assert isinstance(ratio, float) and math.isfinite(ratio) and ratio > 0, name
    assert set(figures["ratio_target_met"]) == PLATFORMS | {"overall"}
    assert figures["ratio_target"] == 3.0

    # the same pages: the floor read as many rows, in as many requests, as convsync made
    for name in PLATFORMS:
        platform = figures["platforms"][name]
        assert platform["errors"] == []
        assert platform["rows"] > 0
        assert platform["floor_rows"] == platform["rows"], name
        assert platform["floor_requests"] == platform["requests"], name
        assert platform["cpu_ratio_vs_floor"] == ratios[name]
        assert platform["floor_cpu_us_per_row"] > 0
    assert figures["floor"]["rows"]["overall"] == figures["rows"]

    # the existing keys stay
    assert {"days", "campaigns", "rows", "rows_per_s", "cpu_us_per_row", "requests",
            "min_requests", "peak_rss_mb"} <= set(figures)
    assert "x the floor on every platform" in done.stdout
