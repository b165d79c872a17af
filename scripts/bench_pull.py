#!/usr/bin/env python3
"""Benchmark: pull a large sandbox account and print what it cost the client.

Starts `convsync sandbox serve` in its own process (so its CPU is not counted), backfills the
whole world into a fresh SQLite store through the real pipeline, and prints per platform:
rows stored, rows/s, convsync's CPU per stored row (this process only), the platform's floor
and convsync's CPU as a ratio of it, requests made against the minimum the APIs allow, and
the process's peak RSS.

The floor is what merely reading the same data costs on the same machine in the same run:
a child process fetches the very same pages from the sandbox with the platform's SDK client,
built by convsync's own connect functions, decodes them on the fast path convsync reads them
by (raw protobuf rows for Google Ads and GA4, the SDK's JSON dicts for Meta, Klaviyo's event
pages decoded by msgspec from the SDK's raw response), reads each row's fields once, and
normalizes and stores nothing. Its CPU is measured as convsync's is (process CPU from
rusage, around the pull, after the same imports, with the pipeline's garbage collector
settings), once before convsync's pull and twice after (``--floor-runs``; once in all when a
run takes over a minute), and the median kept. The ratio compares like with like: a faster
or slower machine moves both. Target: convsync's CPU per stored row at most 3x the floor's
on every platform.

    .venv/bin/python scripts/bench_pull.py                 # 365 days x 200 campaigns
    .venv/bin/python scripts/bench_pull.py --days 60 --campaigns 20 --json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
END = dt.date(2026, 10, 31)
RATIO_TARGET = 3.0
"""convsync's CPU per stored row, at most this many times the floor's, on every platform."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--campaigns", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--platform", action="append", default=None,
                        help="only these platforms (repeatable)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--floor-runs", type=int, default=3,
                        help="runs of each platform's floor, one before its pull and the "
                             "others after, the median taken (default 3; fewer once they "
                             "took a minute)")
    parser.add_argument("--state-dir", type=Path, default=ROOT / "var" / "sandbox",
                        help="where the sandbox keeps its TLS certificate")
    # the floor's child process: --floor PLATFORM --config F --since D --until D
    parser.add_argument("--floor", help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--since", type=dt.date.fromisoformat, help=argparse.SUPPRESS)
    parser.add_argument("--until", type=dt.date.fromisoformat, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor:
        print(json.dumps(floor(args.floor, args.config, args.since, args.until)))
        return 0
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
         "--config-out", str(config), "--state-dir", str(args.state_dir),
         "--days", str(args.days), "--campaigns", str(args.campaigns), "--seed",
         str(args.seed), "--end", END.isoformat()],
        stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    json.loads(process.stdout.readline())  # ready once it printed its endpoints
    return process, config


def _pull(config_path: Path, args: argparse.Namespace) -> dict[str, Any]:
    from convsync import pipeline
    from convsync.model import Platform
    from convsync.settings import load_config, load_secrets
    from convsync.store import Store

    config = load_config(config_path)
    secrets = load_secrets(config)
    platforms = [Platform(p) for p in args.platform] if args.platform else None
    since = END - dt.timedelta(days=args.days - 1)
    figures: dict[str, Any] = {"days": args.days, "campaigns": args.campaigns, "platforms": {}}
    minimums = _minimums(args, since, END)
    cpu_seconds: dict[str, tuple[float, float]] = {}  # platform -> (convsync, floor)
    with Store.open(config.store_url()) as store:
        for platform in platforms or config.enabled_platforms():
            # the floor's first run before the pull and the others after it, so that a
            # machine slowing down or speeding up meanwhile weighs on both alike
            runs = _floor_runs(platform.value, config_path, since, END, [], 1)
            stored = _stored_rows(store)
            cpu0, wall0 = _cpu(), time.perf_counter()
            result = pipeline.pull(config, secrets, store, platforms=[platform], since=since,
                                   until=END, today=END + dt.timedelta(days=1))
            cpu, wall = _cpu() - cpu0, time.perf_counter() - wall0
            outcome = result.platforms[0]
            rows = _stored_rows(store) - stored
            base = _floor_median(_floor_runs(platform.value, config_path, since, END, runs,
                                             args.floor_runs))
            cpu_seconds[platform.value] = (cpu, base["cpu_s"])
            ratio = _ratio(cpu, rows, base["cpu_s"], base["rows"])
            figures["platforms"][platform.value] = {
                "rows": rows, "seconds": round(wall, 2),
                "rows_per_s": round(rows / wall) if wall else 0,
                "cpu_us_per_row": _per_row(cpu, rows),
                "requests": outcome.requests.total,
                "min_requests": minimums.get(platform.value),
                "errors": outcome.errors + ([f"floor: {base['error']}"] if "error" in base
                                            else []),
                "floor_rows": base["rows"], "floor_requests": base["requests"],
                "floor_cpu_us_per_row": _per_row(base["cpu_s"], base["rows"]),
                "floor_runs_us_per_row": base["runs_us_per_row"],
                "cpu_ratio_vs_floor": ratio,
                "meets_ratio_target": ratio is not None and ratio <= RATIO_TARGET}
    per = figures["platforms"]
    rows = sum(p["rows"] for p in per.values())
    floor_rows = sum(p["floor_rows"] for p in per.values())
    cpu_total = sum(c for c, _ in cpu_seconds.values())
    floor_total = sum(f for _, f in cpu_seconds.values())
    ratios = {k: p["cpu_ratio_vs_floor"] for k, p in per.items()}
    ratios["overall"] = _ratio(cpu_total, rows, floor_total, floor_rows)
    figures |= {
        "rows": rows,
        "rows_per_s": round(rows / sum(p["seconds"] for p in per.values())) if rows else 0,
        "cpu_us_per_row": _per_row(cpu_total, rows),
        "requests": {k: p["requests"] for k, p in per.items()},
        "min_requests": {k: p["min_requests"] for k, p in per.items()},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "cpu_ratio_vs_floor": ratios,
        "floor": {"rows": {k: p["floor_rows"] for k, p in per.items()} | {
                      "overall": floor_rows},
                  "requests": {k: p["floor_requests"] for k, p in per.items()},
                  "cpu_us_per_row": {k: p["floor_cpu_us_per_row"] for k, p in per.items()} | {
                      "overall": _per_row(floor_total, floor_rows)}},
        "ratio_target": RATIO_TARGET,
        "ratio_target_met": {k: r is not None and r <= RATIO_TARGET for k, r in ratios.items()},
    }
    return figures


def _stored_rows(store: Any) -> int:
    """Data rows in the store: daily cells and person-level events (the conversion
    definitions that come with them are not counted)."""
    return int(store.count_rows("daily_stats") + store.count_rows("journey_events"))


def _per_row(cpu: float, rows: int) -> float | None:
    return round(cpu * 1e6 / rows, 2) if rows else None


def _ratio(cpu: float, rows: int, floor_cpu: float, floor_rows: int) -> float | None:
    """convsync's CPU per row over the floor's (the CPU ratio itself when the rows agree)."""
    if not (rows and floor_rows and floor_cpu > 0):
        return None
    return round((cpu / rows) / (floor_cpu / floor_rows), 2)


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


# -- the floor ---------------------------------------------------------------------------------

FLOOR_LONG_ENOUGH = 60.0
"""Seconds of floor runs after which no more are made: a run that long rides out the
machine's ups and downs by itself (a year of Klaviyo events takes about three minutes; a
year of any other platform 5 - 15 seconds)."""


def _floor_runs(platform: str, config_path: Path, since: dt.date, until: dt.date,
                runs: list[dict[str, Any]], wanted: int) -> list[dict[str, Any]]:
    """``runs`` and more runs of a platform's floor, up to ``wanted`` in all, fewer once they
    took FLOOR_LONG_ENOUGH seconds or one failed."""
    while (len(runs) < wanted and not any("error" in r for r in runs)
           and sum(r["seconds"] for r in runs) <= FLOOR_LONG_ENOUGH):
        runs.append(_run_floor(platform, config_path, since, until))
    return runs


def _floor_median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The floor: the run of median CPU (every run read the same rows)."""
    failed = next((r for r in runs if "error" in r), None)
    if failed is None and len({(r["rows"], r["requests"]) for r in runs}) > 1:
        failed = {"error": "the floor's runs read different rows: " + ", ".join(
            f"{r['rows']} in {r['requests']} requests" for r in runs)}
    if failed is not None:
        return {"rows": 0, "requests": 0, "cpu_s": 0.0, "runs_us_per_row": [],
                "error": failed["error"]}
    cpus = sorted(r["cpu_s"] for r in runs)
    return runs[0] | {"cpu_s": cpus[(len(cpus) - 1) // 2],
                      "runs_us_per_row": [_per_row(r["cpu_s"], r["rows"]) for r in runs]}


def _run_floor(platform: str, config_path: Path, since: dt.date,
               until: dt.date) -> dict[str, Any]:
    """One run of a platform's floor in a child process (a fresh interpreter, as this one was
    before its pull: the same modules imported, no SDK client built yet)."""
    began = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--floor", platform, "--config",
                           str(config_path), "--since", since.isoformat(), "--until",
                           until.isoformat()], capture_output=True, text=True)
    seconds = time.perf_counter() - began
    if done.returncode != 0:  # no ratio then, but the rest of the figures
        print(f"{platform}: the floor failed: {done.stderr[-3000:]}", file=sys.stderr)
        error = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": error, "seconds": seconds}
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result | {"seconds": seconds}


def floor(platform: str, config_path: Path, since: dt.date, until: dt.date) -> dict[str, Any]:
    """Fetch what convsync's pull of ``platform`` fetched and read each row's fields once.

    Rows are counted as convsync counts its stored rows (a Google Ads stats row is two, one
    per basis, when both are asked for; a Meta action is counted in each window it has a
    figure in, when convsync keeps that action type), so that the two per-row figures divide
    the same number; requests are counted by the same ``Requests``."""
    from convsync import pipeline  # the modules the parent had imported before its pull
    from convsync.gctuning import fewer_collections
    from convsync.model import ConversionMap, Platform
    from convsync.settings import load_config, load_secrets
    from convsync.sources import Requests

    config = load_config(config_path)
    secrets = load_secrets(config)
    read = {Platform.GOOGLE_ADS: _google_ads_floor, Platform.GA4: _ga4_floor,
            Platform.META: _meta_floor, Platform.KLAVIYO: _klaviyo_floor}[Platform(platform)]
    assert Platform(platform) in pipeline.SOURCES
    requests = Requests()
    with fewer_collections():  # the pipeline's garbage collector settings
        cpu0 = _cpu()
        rows = read(config, secrets, ConversionMap(config.definitions()), requests, since,
                    until)
        cpu = _cpu() - cpu0
    return {"platform": platform, "rows": rows, "requests": requests.total, "cpu_s": cpu}


def _google_ads_floor(config: Any, secrets: Any, mapping: Any, requests: Any, start: dt.date,
                      end: dt.date) -> int:
    """The conversion actions and the stats over the range (and, with ``pull_clicks``, the
    clicks day by day) through GoogleAdsService.SearchStream, rows as raw protobuf."""
    from convsync.sources import google_ads

    section = config.google_ads
    client = google_ads.connect(section, secrets)
    both = section.conversion_date_basis
    rows = 0
    for customer_id in section.customer_ids:
        requests.add("SearchStream")
        for row in google_ads.search_stream(client, customer_id,
                                            google_ads.CONVERSION_ACTIONS_QUERY):
            action, customer = row.conversion_action, row.customer
            _touch(customer.time_zone, customer.currency_code, action.resource_name, action.id,
                   action.name, action.category, action.type_, action.status, action.origin,
                   action.primary_for_goal, action.include_in_conversions_metric,
                   action.counting_type, action.value_settings.default_value,
                   action.click_through_lookback_window_days,
                   action.view_through_lookback_window_days)
        requests.add("SearchStream")
        query = google_ads.STATS_QUERY.format(
            start=start, end=end, extra=google_ads.BY_CONVERSION_DATE if both else "")
        for row in google_ads.search_stream(client, customer_id, query):
            segments, metrics, campaign = row.segments, row.metrics, row.campaign
            _touch(segments.date, segments.conversion_action, campaign.id, campaign.name,
                   metrics.all_conversions, metrics.all_conversions_value)
            if both:
                _touch(metrics.all_conversions_by_conversion_date,
                       metrics.all_conversions_value_by_conversion_date)
            rows += 2 if both else 1
        day = start
        while section.pull_clicks and day <= end:
            requests.add("SearchStream")
            for row in google_ads.search_stream(client, customer_id,
                                                google_ads.CLICKS_QUERY.format(day=day)):
                _touch(row.click_view.gclid, row.campaign.id)
                rows += 1
            day += dt.timedelta(days=1)
    return rows


def _ga4_floor(config: Any, secrets: Any, mapping: Any, requests: Any, start: dt.date,
               end: dt.date) -> int:
    """The ``events`` report (and, with custom dimensions, the ``journeys`` one) through
    runReport over gRPC, pages of the same size, rows as raw protobuf."""
    from convsync.sources import ga4

    section = config.ga4
    client = ga4.connect(section, secrets)
    property_id = section.property_id
    schema = ga4.Schema(list(section.custom_dimensions))

    def events_page(page: Any) -> Iterator[int]:
        _touch(page.metadata.time_zone, page.metadata.currency_code)
        for row in page.rows:
            dimensions, metrics = row.dimension_values, row.metric_values
            _touch(dimensions[0].value, dimensions[1].value, dimensions[2].value,
                   dimensions[3].value, dimensions[4].value, float(metrics[0].value),
                   float(metrics[1].value), float(metrics[2].value))
        yield len(page.rows)

    def events() -> Iterator[int]:
        request = ga4.report_request(property_id, list(ga4.EVENT_DIMENSIONS),
                                     [*ga4.EVENT_METRICS, schema.key_metric], start, end)
        return ga4.report_rows(client, request, ga4.PAGE_ROWS[section.transport], requests,
                               events_page)

    def journeys_page(page: Any) -> Iterator[int]:
        _touch(page.metadata.time_zone, page.metadata.currency_code)
        kept = 0
        for row in page.rows:
            values = [v.value for v in row.dimension_values]
            _touch(float(row.metric_values[0].value), float(row.metric_values[1].value))
            kept += any(v not in ga4.NOT_SET for v in values[len(ga4.JOURNEY_DIMENSIONS):])
        yield kept

    def journeys() -> Iterator[int]:
        custom = list(schema.custom_dimensions)
        if not custom:
            return iter(())
        request = ga4.report_request(property_id, [*ga4.JOURNEY_DIMENSIONS, *custom],
                                     list(ga4.JOURNEY_METRICS), start, end, ga4._any_set(custom))
        return ga4.report_rows(client, request, ga4.JOURNEY_PAGE_ROWS[section.transport],
                               requests, journeys_page)

    rows = sum(ga4.adapting(property_id, schema, events))
    if section.custom_dimensions:
        rows += sum(ga4.adapting(property_id, schema, journeys))
    return rows


def _meta_floor(config: Any, secrets: Any, mapping: Any, requests: Any, start: dt.date,
                end: dt.date) -> int:
    """Per ad account, the account and the insights through the SDK's Cursor, rows as the
    JSON dicts Graph sent; which action types count as rows is convsync's ``ActionPlan``."""
    from convsync.sources import meta

    section = config.meta
    api = meta.connect(section, secrets, requests=requests)
    plan = meta.ActionPlan(mapping, section.action_report_time)
    windows = section.attribution_windows
    rows = 0
    for account_id in section.ad_account_ids:
        _touch(meta.fetch_account(api, account_id))
        params = meta.insights_params(section, start, end, meta.PAGE_SIZE)
        for row in meta.insights(api, account_id, params, meta.INSIGHTS_FIELDS):
            _touch(row["date_start"], row["campaign_id"], row.get("campaign_name"))
            values = {entry["action_type"]: entry for entry in row.get("action_values", ())}
            actions = row.get("actions") or ()
            present: frozenset[str] | None = None
            for action in actions:
                action_type = action["action_type"]
                handling = plan(action_type)
                money = values.get(action_type, {})
                if handling.rivals:
                    present = present or frozenset(a["action_type"] for a in actions)
                kept = handling.store and handling.rivals.isdisjoint(present or ())
                for window in windows:
                    count, value = action.get(window, 0), money.get(window, 0)
                    rows += kept and bool(float(count) or float(value))
    return rows


def _klaviyo_floor(config: Any, secrets: Any, mapping: Any, requests: Any, start: dt.date,
                   end: dt.date) -> int:
    """The account, the metrics, the mapped metrics' aggregates per year (the SDK's JSON
    dicts) and their events page by page: the SDK's raw response decoded by msgspec into the
    fields convsync reads (``events_page``, the fast path convsync reads them by)."""
    from convsync.sources import klaviyo

    section = config.klaviyo
    api = klaviyo._Api(klaviyo.connect(section, secrets), klaviyo.Pace(), requests)
    account = klaviyo._account_or_config(api, config, secrets, time.sleep)
    mapped = [m for m in klaviyo._fetch_metrics(api, account.id, mapping)
              if m.conversion is not None]
    tz = config.client.timezone
    rows = 0
    for first, last in klaviyo.year_spans(start, end):
        for metric in mapped:
            answer = api.call("query_metric_aggregates",
                              api.metrics.query_metric_aggregates_with_http_info,
                              metric_aggregate_query=klaviyo._aggregate_query(
                                  metric.platform_id, first, last, tz))
            attributes = answer["data"]["attributes"]
            _touch(attributes["dates"])
            for series in attributes["data"]:
                counts, sums = series["measurements"]["count"], series["measurements"]["sum_value"]
                rows += sum(1 for count, value in zip(counts, sums, strict=True)
                            if count or value)
    for metric in mapped:
        query = klaviyo._events_filter(metric.platform_id, start, end, tz)
        cursor: str | None = None
        while True:
            kwargs = {"page_cursor": cursor} if cursor else {}
            page = api.events_page(filter=query, include=["profile"],
                                   fields_event=klaviyo.EVENT_FIELDS,
                                   fields_profile=klaviyo.PROFILE_FIELDS,
                                   page_size=klaviyo.EVENTS_PAGE_SIZE, sort="datetime",
                                   **kwargs)
            for profile in page.included:
                person = profile.attributes
                _touch(profile.type, profile.id, person.email, person.phone_number,
                       person.external_id)
            for event in page.data:
                attributes = event.attributes
                p = attributes.event_properties or klaviyo._NO_PROPERTIES
                related = event.relationships.profile if event.relationships else None
                _touch(event.id, related.data.id if related and related.data else None,
                       p.value, p.currency, p.utm_id, p.utm_campaign, p.gclid, p.gbraid,
                       p.wbraid, p.fbclid, p.fbc, p.fbc_cookie, p.fbp, p.fbp_cookie)
                rows += attributes.timestamp is not None
            cursor = klaviyo._cursor_of(page.links.next)
            if not cursor:
                break
    return rows


def _touch(*fields: Any) -> None:
    """Where the floor's reads go: nothing is done with them."""


# -- output ------------------------------------------------------------------------------------

def _print(figures: dict[str, Any], as_json: bool) -> None:
    print(f"pull of {figures['days']} days x {figures['campaigns']} campaigns")
    print(f"{'platform':<12}{'rows':>10}{'rows/s':>10}{'us/row':>9}{'floor':>8}{'ratio':>8}"
          f"{'requests':>10}{'minimum':>9}")
    for name, p in figures["platforms"].items():
        minimum = p["min_requests"] if p["min_requests"] is not None else "?"
        print(f"{name:<12}{p['rows']:>10}{p['rows_per_s']:>10}{p['cpu_us_per_row'] or 0:>9}"
              f"{p['floor_cpu_us_per_row'] or 0:>8}{_times(p['cpu_ratio_vs_floor']):>8}"
              f"{p['requests']:>10}{minimum:>9}"
              + (f"  errors: {p['errors']}" if p["errors"] else "")
              + (f"  floor read {p['floor_rows']} rows" if p["floor_rows"] != p["rows"] else "")
              + (f"  floor made {p['floor_requests']} requests"
                 if p["floor_requests"] != p["requests"] else ""))
    ratios = figures["cpu_ratio_vs_floor"]
    print(f"total {figures['rows']} rows, {figures['rows_per_s']} rows/s, "
          f"{figures['cpu_us_per_row']} us CPU per row against a floor of "
          f"{figures['floor']['cpu_us_per_row']['overall']} ({_times(ratios['overall'])}), "
          f"peak RSS {figures['peak_rss_mb']} MB")
    met = figures["ratio_target_met"]
    over = [f"{k} {_times(r)}" for k, r in ratios.items() if k != "overall" and not met[k]]
    print(f"target, at most {figures['ratio_target']:g}x the floor on every platform: "
          + ("met" if not over else "NOT met (" + ", ".join(over) + ")"))
    if as_json:
        print(json.dumps(figures))


def _times(ratio: float | None) -> str:
    return f"{ratio:.2f}x" if ratio is not None else "?"


if __name__ == "__main__":
    sys.exit(main())
