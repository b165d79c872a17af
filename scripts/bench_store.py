"""How much the store costs per stored daily-stats row: 200k rows upserted twice.

    python scripts/bench_store.py                      # SQLite in a temporary directory
    python scripts/bench_store.py --url postgresql+psycopg://postgres@127.0.0.1:55432/db
    python scripts/bench_store.py --baseline           # also time plain Core execute(dicts)

Prints microseconds per row of this process's CPU time (what the "<= 20 us per stored row"
budget counts; PostgreSQL's own work happens in the server) and of wall time. Building the
ConversionStat objects is the source's cost and is not counted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from sqlalchemy.dialects import postgresql, sqlite

from convsync.model import Basis, ConversionStat, Kind, Platform
from convsync.store import STATS_KEY, Store, daily_stats

CONVERSIONS = ("purchase", "add_to_cart", "begin_checkout", "newsletter_signup", "lead_form")


def make_rows(count: int, figures: int) -> list[ConversionStat]:
    """``count`` distinct cells: a year of days x campaigns x conversions."""
    start = dt.date(2026, 1, 1)
    rows = []
    for i in range(count):
        day, rest = divmod(i, 200 * len(CONVERSIONS))
        campaign, conversion = divmod(rest, len(CONVERSIONS))
        rows.append(ConversionStat(
            platform=Platform.GOOGLE_ADS, account_id="1234567890",
            date=start + dt.timedelta(days=day % 365), timezone="Europe/Paris",
            campaign_id=f"{20_000_000 + campaign + 1000 * (day // 365)}",
            campaign_name=f"Campaign {campaign}",
            platform_conversion=CONVERSIONS[conversion], conversion=CONVERSIONS[conversion],
            kind=Kind.MACRO if conversion == 0 else Kind.MICRO, count=float(figures + i % 7),
            value=figures * 12.5, currency="EUR", basis=Basis.CLICK_DATE, window="",
            in_column=conversion == 0,
        ))
    return rows


def timed(label: str, rows: int, action: Callable[[], object]) -> float:
    cpu, wall = time.process_time(), time.perf_counter()
    action()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    print(f"{label:<34} {cpu / rows * 1e6:6.2f} us/row CPU   {wall / rows * 1e6:6.2f} us/row wall")
    return cpu


def core_execute_baseline(store: Store, rows: Sequence[ConversionStat], batch: int) -> None:
    """The textbook Core way: one dict per row, SQLAlchemy processes each parameter set."""
    insert = sqlite.insert if store.dialect == "sqlite" else postgresql.insert
    stmt = insert(daily_stats)
    stmt = stmt.on_conflict_do_update(
        index_elements=list(STATS_KEY),
        set_={c.name: stmt.excluded[c.name] for c in daily_stats.c if c.name not in STATS_KEY})
    for start in range(0, len(rows), batch):
        now = dt.datetime.now(dt.UTC)
        params = [{"platform": r.platform.value, "account_id": r.account_id, "date": r.date,
                   "campaign_id": r.campaign_id, "platform_conversion": r.platform_conversion,
                   "basis": r.basis.value, "attribution_window": r.window,
                   "timezone": r.timezone, "campaign_name": r.campaign_name,
                   "conversion": r.conversion, "kind": r.kind.value if r.kind else None,
                   "count": r.count, "value": r.value, "currency": r.currency,
                   "in_column": r.in_column, "updated_at": now}
                  for r in rows[start:start + batch]]
        with store.engine.begin() as conn:
            conn.execute(stmt, params)


def reset(store: Store) -> None:
    with store.engine.begin() as conn:
        conn.execute(daily_stats.delete())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="database URL (default: SQLite in a temporary directory)")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=5000)
    parser.add_argument("--baseline", action="store_true",
                        help="also time SQLAlchemy Core execute() with a dict per row")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="convsync-bench-") as tmp:
        url = args.url or f"sqlite:///{Path(tmp) / 'bench.db'}"
        first, second = make_rows(args.rows, 1), make_rows(args.rows, 2)
        with Store.open(url) as store:
            print(f"{store.url}: {args.rows} rows, batches of {args.batch_size}")
            reset(store)
            cpu = timed("upsert_stats, new rows", args.rows,
                        lambda: store.upsert_stats(first, args.batch_size))
            cpu += timed("upsert_stats, same rows again", args.rows,
                         lambda: store.upsert_stats(second, args.batch_size))
            assert store.count_rows("daily_stats") == args.rows
            both = cpu / (2 * args.rows) * 1e6
            print(f"{'upsert_stats, both passes':<34} {both:6.2f} us/row CPU")
            if args.baseline:
                reset(store)
                timed("Core execute(dicts), new rows", args.rows,
                      lambda: core_execute_baseline(store, first, args.batch_size))
                timed("Core execute(dicts), same again", args.rows,
                      lambda: core_execute_baseline(store, second, args.batch_size))
            timed("stats() read back", args.rows, lambda: sum(1 for _ in store.stats()))
            reset(store)


if __name__ == "__main__":
    main()
