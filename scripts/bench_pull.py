#!/usr/bin/env python3
"""Benchmark: pull a large sandbox account and print what it cost the client.

Starts `convsync sandbox serve` in its own process (so its CPU is not counted), backfills the
whole world into a fresh SQLite store through the real pipeline, and prints per platform:
rows stored, rows/s, convsync's CPU per stored row (this process only), requests made against
the minimum the APIs allow, and the process's peak RSS.

    .venv/bin/python scripts/bench_pull.py                 # 365 days x 200 campaigns
    .venv/bin/python scripts/bench_pull.py --days 60 --campaigns 20 --json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--campaigns", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--platform", action="append", default=None,
                        help="only these platforms (repeatable)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="convsync-bench-") as tmp:
        sandbox, config_path = _start_sandbox(Path(tmp), args)
        try:
            figures = _pull(config_path, args)
        finally:
            sandbox.terminate()
            sandbox.wait(timeout=30)
    _print(figures, args.json)
    return 0


def _start_sandbox(tmp: Path, args: argparse.Namespace) -> tuple[subprocess.Popen[str], Path]:
    config = tmp / "bench.toml"
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("convsync")), "sandbox", "serve", "--json",
         "--config-out", str(config), "--state-dir", str(ROOT / "var" / "sandbox"),
         "--days", str(args.days), "--campaigns", str(args.campaigns), "--seed",
         str(args.seed), "--end", "2026-10-31"],
        stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    json.loads(process.stdout.readline())  # ready once it printed its endpoints
    return process, config


def _pull(config_path: Path, args: argparse.Namespace) -> dict[str, Any]:
    import datetime as dt

    from convsync import pipeline
    from convsync.model import Platform
    from convsync.settings import load_config, load_secrets
    from convsync.store import Store

    config = load_config(config_path)
    secrets = load_secrets(config)
    platforms = [Platform(p) for p in args.platform] if args.platform else None
    end = dt.date(2026, 10, 31)
    since = end - dt.timedelta(days=args.days - 1)
    figures: dict[str, Any] = {"days": args.days, "campaigns": args.campaigns, "platforms": {}}
    minimums = _minimums(args, since, end)
    with Store.open(config.store_url()) as store:
        for platform in platforms or config.enabled_platforms():
            cpu0, wall0 = _cpu(), time.perf_counter()
            result = pipeline.pull(config, secrets, store, platforms=[platform], since=since,
                                   until=end, today=end + dt.timedelta(days=1))
            cpu, wall = _cpu() - cpu0, time.perf_counter() - wall0
            outcome = result.platforms[0]
            minimum = minimums.get(platform.value)
            figures["platforms"][platform.value] = {
                "rows": outcome.rows, "seconds": round(wall, 2),
                "rows_per_s": round(outcome.rows / wall) if wall else 0,
                "cpu_us_per_row": round(cpu * 1e6 / outcome.rows, 2) if outcome.rows else None,
                "requests": outcome.requests.total, "min_requests": minimum,
                "errors": outcome.errors}
    per = figures["platforms"].values()
    rows = sum(p["rows"] for p in per)
    figures |= {
        "rows": rows,
        "rows_per_s": round(rows / sum(p["seconds"] for p in per)) if rows else 0,
        "cpu_us_per_row": round(sum((p["cpu_us_per_row"] or 0) * p["rows"] for p in per) / rows,
                                2) if rows else None,
        "requests": {k: p["requests"] for k, p in figures["platforms"].items()},
        "min_requests": {k: p["min_requests"] for k, p in figures["platforms"].items()},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    return figures


MINIMUMS = """
import datetime as dt, json, sys
from convsync.sandbox.world import World, WorldSpec
from convsync.sources import ga4, google_ads, klaviyo, meta
days, campaigns, seed = (int(a) for a in sys.argv[1:4])
since, end = (dt.date.fromisoformat(a) for a in sys.argv[4:6])
world = World(WorldSpec(seed=seed, start=since, days=days, campaigns=campaigns))
ga4_rows = sum(1 for _ in world.ga4_rows(since, end))
from zoneinfo import ZoneInfo
zone = ZoneInfo(world.accounts.google_ads_tz)  # the sandbox config's client time zone
lo = dt.datetime.combine(since, dt.time(), zone)
hi = dt.datetime.combine(end + dt.timedelta(days=1), dt.time(), zone)
events = [sum(1 for _ in world.klaviyo_events(lo, hi, m)) for m in world.klaviyo_metrics]
print(json.dumps({
    "google_ads": google_ads.min_requests(1, days, clicks=False),
    "ga4": ga4.min_requests(ga4_rows),
    "meta": meta.min_requests([sum(1 for _ in world.meta_insights(since, end))]),
    "klaviyo": klaviyo.min_requests(since, end, events, len(world.klaviyo_metrics)),
}))
"""


def _minimums(args: argparse.Namespace, since: Any, end: Any) -> dict[str, int]:
    """The fewest requests the APIs allow for this world, counted from the world itself (in
    another process, so its memory is not the client's)."""
    out = subprocess.run([sys.executable, "-c", MINIMUMS, str(args.days), str(args.campaigns),
                          str(args.seed), since.isoformat(), end.isoformat()],
                         capture_output=True, text=True, check=True).stdout
    result: dict[str, int] = json.loads(out)
    return result


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _print(figures: dict[str, Any], as_json: bool) -> None:
    print(f"pull of {figures['days']} days x {figures['campaigns']} campaigns")
    print(f"{'platform':<12}{'rows':>10}{'rows/s':>10}{'us/row':>9}{'requests':>10}"
          f"{'minimum':>9}")
    for name, p in figures["platforms"].items():
        print(f"{name:<12}{p['rows']:>10}{p['rows_per_s']:>10}{p['cpu_us_per_row'] or 0:>9}"
              f"{p['requests']:>10}{p['min_requests'] if p['min_requests'] is not None else '?':>9}"
              + (f"  errors: {p['errors']}" if p["errors"] else ""))
    print(f"total {figures['rows']} rows, {figures['rows_per_s']} rows/s, "
          f"{figures['cpu_us_per_row']} us CPU per row, peak RSS {figures['peak_rss_mb']} MB")
    if as_json:
        print(json.dumps(figures))


if __name__ == "__main__":
    sys.exit(main())
