"""scripts/bench_push.py: the figures it prints, on a small push (never their speed)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "scripts" / "bench_push.py"


def test_a_small_bench_sends_every_event_in_the_fewest_requests_and_has_a_floor() -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "--events", "4500", "--json"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    figures = json.loads(out.stdout.splitlines()[-1])
    assert figures["sent"] == figures["events"] == 4500
    assert figures["requests"] == figures["min_requests"] == 3  # 2,000 events a request
    for key in ("cpu_us_per_event", "floor_us_per_event", "cpu_ratio_vs_floor", "peak_rss_mb",
                "events_per_s"):
        assert math.isfinite(figures[key]) and figures[key] > 0, key
    assert figures["cpu_ratio_vs_floor"] == round(
        figures["cpu_us_per_event"] / figures["floor_us_per_event"], 2)
