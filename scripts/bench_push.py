#!/usr/bin/env python3
"""Benchmark: push a million valued events to one destination of the sandbox (Google's Data
Manager, Meta's Conversions API or Klaviyo's bulk events) and print what it cost the client.

Starts `convsync sandbox serve` in its own process, fills a fresh SQLite store with valued
micro conversions (people who climbed the sandbox's ladder: product_view, add_to_cart,
begin_checkout, each event with a gclid, over the 80 days before now, and the upload values
`convsync values` would have stored), then runs `convsync push --json` in a child process
and reports that process's figures: events sent, requests made against the minimum
(ceil(events / 2,000): Google's batch limit), events per second, CPU per event and peak RSS
(the child's, so neither the sandbox nor the store's filling counts).

Beside it, on a copy of the same store, in a child process measured the same way, the
floor: the least any push keeping the ledger the issue asks for costs here, written as
lean as Python and sqlite3 allow: the journeys read back by person, each step's transaction
id, the ledger rows inserted (planned), claimed (sending) and recorded (sent) a request at
a time, and each request built and serialized with the Data Manager's protobuf, with none of
convsync's checks, no rules and no network. ``cpu_ratio_vs_floor`` is convsync's CPU per
event over the floor's: the machine's speed drifts, the ratio much less.

For Meta the events are of the last 6 days (Meta takes 7) and carry a hashed email; for
Klaviyo they go to the profiles a Klaviyo pull of the sandbox finds (the sandbox knows no
others), over 80 days, and Klaviyo's limit of 150 bulk requests a minute sets the pace. The
floor is measured for Google only.

    .venv/bin/python scripts/bench_push.py                  # 1,000,000 events to Google
    .venv/bin/python scripts/bench_push.py --events 100000 --json
    .venv/bin/python scripts/bench_push.py --destination meta --json
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import re
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONVSYNC = str(Path(sys.executable).with_name("convsync"))
LADDER = ("product_view", "add_to_cart", "begin_checkout")
UPLOAD_VALUES = {"product_view": 0.85, "add_to_cart": 6.4, "begin_checkout": 21.75}
BATCHES = {"google_ads": 2_000, "meta": 1_000, "klaviyo": 1_000}
"""Events a request at most: Google's Data Manager, Meta's Conversions API, Klaviyo's bulk
create."""
BATCH = BATCHES["google_ads"]
REQUEST_NAMES = {"google_ads": "IngestEvents", "meta": "ConversionsAPI",
                 "klaviyo": "bulk_create_events"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--store-url", default="",
                        help="the store (default: a fresh SQLite file); a PostgreSQL URL must "
                             "name an empty database")
    parser.add_argument("--destination", choices=tuple(BATCHES), default="google_ads")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--floor-of", metavar="DB", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_of:  # the child that measures the floor
        _floor_push(args.floor_of)
        return 0
    with tempfile.TemporaryDirectory(prefix="convsync-bench-push-") as tmp:
        sandbox, config = _start_sandbox(Path(tmp), args.store_url)
        try:
            now = dt.datetime.now(dt.UTC)
            _fill_store(config, args.events, now, args.destination)
            floor_db = (_copy_for_floor(config, Path(tmp))
                        if not args.store_url and args.destination == "google_ads" else None)
            figures = _push(config, args.events, args.destination)
        finally:
            sandbox.terminate()
            sandbox.wait(timeout=30)
        if floor_db is not None:
            figures |= _floor(floor_db, args.events, figures["cpu_us_per_event"])
    _print(figures, args.json)
    return 0 if figures["sent"] == args.events else 1


def _start_sandbox(tmp: Path, store_url: str) -> tuple[subprocess.Popen[str], Path]:
    config = tmp / "bench.toml"
    process = subprocess.Popen(
        [CONVSYNC, "sandbox", "serve", "--json", "--config-out", str(config),
         "--state-dir", str(ROOT / "var" / "sandbox"), "--days", "30", "--campaigns", "4"],
        stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    json.loads(process.stdout.readline())  # ready once it printed its endpoints
    if store_url:
        text = config.read_text()
        config.write_text(re.sub(r'(?m)^store_url = .*$', f"store_url = {json.dumps(store_url)}",
                                 text))
    return process, config


def _fill_store(config_path: Path, events: int, now: dt.datetime, destination: str) -> None:
    """The store a client has after pulling the upload action and computing values, with
    ``events`` valued micro events (three per person) that ``destination`` can take."""
    from convsync.model import JourneyEvent, Platform, PlatformConversion
    from convsync.settings import load_config
    from convsync.store import Store
    from convsync.valuation import ALL_SEGMENTS

    config = load_config(config_path)
    section = config.google_ads
    assert section is not None
    identify = _identities(config_path, destination)
    days = 6 if destination == "meta" else 80

    def journey() -> Iterator[JourneyEvent]:
        start = now - dt.timedelta(days=days)
        span = dt.timedelta(days=days - 1).total_seconds()
        for n in range(events):
            person, step = divmod(n, len(LADDER))
            when = start + dt.timedelta(seconds=span * person * len(LADDER) / events + step * 60)
            yield JourneyEvent(
                person_key=f"bench:{person:010d}", conversion=LADDER[step],
                platform_conversion=LADDER[step], time=when, source_platform=Platform.GA4,
                source_event_id=f"bench-{n}", identifiers=identify(person),
                campaign_id=f"{person % 40}")

    with Store.open(config.store_url()) as store:
        store.save_platform_conversions([PlatformConversion(
            platform=Platform.GOOGLE_ADS, account_id=section.customer_ids[0], platform_id=action,
            name=f"upload {action}",
            settings={"type": "UPLOAD_CLICKS", "click_through_lookback_window_days": 90})
            for action in set(section.upload_actions.values())])
        store.upsert_journey_events(journey())
        store.save_micro_values(config.client.name, now, [
            {"conversion": step, "segment": ALL_SEGMENTS, "upload_value": value,
             "recommendation": "track_and_upload"} for step, value in UPLOAD_VALUES.items()])


def _identities(config_path: Path, destination: str) -> Any:
    """Person number -> the identifiers ``destination`` matches people on."""
    import functools

    from convsync.hashing import sha256_hex
    from convsync.model import Identifiers

    if destination == "google_ads":
        return functools.lru_cache(maxsize=4)(
            lambda person: Identifiers(gclid=f"Cj0KCQbench{person:010d}"))
    if destination == "meta":
        return functools.lru_cache(maxsize=4)(lambda person: Identifiers(
            email_sha256_meta=sha256_hex(f"bench{person}@example.com")))
    profiles = _sandbox_profiles(config_path)
    return functools.lru_cache(maxsize=4)(lambda person: Identifiers(
        klaviyo_profile_id=profiles[person % len(profiles)]))


def _sandbox_profiles(config_path: Path) -> list[str]:
    """The Klaviyo profile ids of the sandbox's people, as a Klaviyo pull finds them."""
    from convsync import pipeline
    from convsync.model import Platform
    from convsync.settings import load_config, load_secrets
    from convsync.store import Store

    config = load_config(config_path)
    today = dt.date.today()
    with Store.open(config.store_url()) as store:
        pipeline.pull(config, load_secrets(config), store, platforms=[Platform.KLAVIYO],
                      since=today - dt.timedelta(days=29), until=today, today=today)
        profiles = sorted({e.identifiers.klaviyo_profile_id for e in store.journey_events()
                           if e.identifiers.klaviyo_profile_id})
        with store.engine.begin() as conn:  # the bench's own events only
            conn.exec_driver_sql("DELETE FROM journey_events")
    return profiles


def _copy_for_floor(config_path: Path, tmp: Path) -> Path:
    """A copy of the filled SQLite store, for the floor to push from."""
    from convsync.settings import load_config

    source = sqlite3.connect(load_config(config_path).store_url().removeprefix("sqlite:///"))
    copy = tmp / "floor.db"
    with sqlite3.connect(copy) as target:
        source.backup(target)
    source.close()
    return copy


def _push(config: Path, events: int, destination: str) -> dict[str, Any]:
    before = _children_cpu()
    wall0 = time.perf_counter()
    out = subprocess.run([CONVSYNC, "push", "--destination", destination, "--config",
                          str(config), "--json"],
                         capture_output=True, text=True, env=os.environ | {"COLUMNS": "80"})
    wall = time.perf_counter() - wall0
    if out.returncode not in (0, 3):
        sys.exit(f"push failed ({out.returncode}):\n{out.stderr[-3000:]}")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    summary = json.loads(out.stdout)
    if os.environ.get("BENCH_DEBUG"):
        print(json.dumps(summary, indent=1)[:3000], out.stderr[-2000:])
    pushed = summary["destinations"][destination]
    cpu = _children_cpu() - before
    return {"destination": destination, "events": events, "sent": pushed["sent"],
            "requests": pushed["requests"].get(REQUEST_NAMES[destination], 0),
            "min_requests": math.ceil(events / BATCHES[destination]), "seconds": round(wall, 1),
            "events_per_s": round(events / wall), "cpu_s": round(cpu, 1),
            "cpu_us_per_event": round(cpu * 1e6 / events, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _floor(db: Path, events: int, cpu_us_per_event: float) -> dict[str, Any]:
    before = _children_cpu()
    subprocess.run([sys.executable, __file__, "--floor-of", str(db)], check=True)
    floor = round((_children_cpu() - before) * 1e6 / events, 2)
    return {"floor_us_per_event": floor,
            "cpu_ratio_vs_floor": round(cpu_us_per_event / floor, 2)}


def _floor_push(db: str) -> None:
    """The floor (see the module): the same uploads through the same three ledger writes and
    the same protobuf, nothing else."""
    from google.ads.datamanager_v1 import types as dm

    request_type, identifiers_type = dm.IngestEventsRequest.pb(), dm.AdIdentifiers.pb()
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("pragma journal_mode=wal")
    con.execute("pragma synchronous=normal")
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    insert = ("insert into uploads (client, destination, account_id, conversion_action, "
              "conversion, dedupe_key, value, currency, time, identifiers, status, created_at, "
              "updated_at) values ('c', 'google_ads', '1234567890', '6111', ?, ?, ?, 'USD', ?, ?, "
              "'planned', ?, ?) on conflict do nothing")
    these = "destination = 'google_ads' and dedupe_key in (select value from json_each(?))"
    claim = f"update uploads set status = 'sending', updated_at = ? where {these}"
    record = (f"update uploads set status = 'sent', request_id = ?, sent_value = value, "
              f"sent_at = ?, updated_at = ?, attempts = attempts + 1 where {these}")
    rows = con.execute("select person_key, conversion, time, identifiers from journey_events "
                       "order by person_key, time")
    person, seen, chunk = None, set[str](), []
    for key, conversion, time_text, ids in rows:
        if key != person:
            person, seen = key, set()
        if conversion in seen:
            continue
        seen.add(conversion)
        digest = hashlib.sha256(f"c\x1fgoogle_ads\x1f6111\x1fperson\x1f{key}\x1f{conversion}"
                                .encode()).hexdigest()[:32]
        chunk.append((conversion, digest, UPLOAD_VALUES[conversion], time_text, ids, now, now))
        if len(chunk) == 10_000:
            _floor_chunk(con, chunk, insert, claim, record, now, request_type, identifiers_type)
            chunk = []
    _floor_chunk(con, chunk, insert, claim, record, now, request_type, identifiers_type)


def _floor_chunk(con: sqlite3.Connection, chunk: list[tuple[Any, ...]], insert: str, claim: str,
                 record: str, now: str, request_type: Any, identifiers_type: Any) -> None:
    chunk.sort(key=lambda row: row[1])
    con.execute("begin")
    con.executemany(insert, chunk)
    con.execute("commit")
    for start in range(0, len(chunk), BATCH):
        part = chunk[start:start + BATCH]
        keys = json.dumps([row[1] for row in part])
        con.execute("begin")
        con.execute(claim, (now, keys))
        con.execute("commit")
        request = request_type()
        for _, key, value, time_text, ids, _, _ in part:
            moment = dt.datetime.fromisoformat(time_text).replace(tzinfo=dt.UTC)
            request.events.add(
                destination_references=["d0"], transaction_id=key,
                event_timestamp={"seconds": int(moment.timestamp())}, conversion_value=value,
                currency="USD", event_source=1,
                ad_identifiers=identifiers_type(gclid=json.loads(ids)["gclid"]))
        request.SerializeToString()
        con.execute("begin")
        con.execute(record, (f"request-{start}", now, now, keys))
        con.execute("commit")


def _print(figures: dict[str, Any], as_json: bool) -> None:
    print(f"push of {figures['events']:,} valued events to the sandbox's "
          f"{figures['destination']}")
    print(f"sent {figures['sent']:,} in {figures['requests']:,} requests "
          f"(minimum {figures['min_requests']:,}), {figures['seconds']} s, "
          f"{figures['events_per_s']:,} events/s")
    print(f"convsync's CPU {figures['cpu_s']} s = {figures['cpu_us_per_event']} us per event, "
          f"peak RSS {figures['peak_rss_mb']} MB")
    if "floor_us_per_event" in figures:
        print(f"floor (the same ledger writes and protobuf, nothing else): "
              f"{figures['floor_us_per_event']} us per event; convsync "
              f"{figures['cpu_ratio_vs_floor']}x it")
    if as_json:
        print(json.dumps(figures))


if __name__ == "__main__":
    sys.exit(main())
