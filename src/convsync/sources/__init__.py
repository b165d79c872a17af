"""One module per platform: connect with the platform's own SDK, pull, normalize.

Every source offers its data as ``Stream``s: named, per account, each a function from a date
range to normalized rows (``ConversionStat``, ``JourneyEvent``, ``JourneyBatch``) yielded in
date order, so the pipeline can commit as it goes and resume a killed backfill from the last
complete day.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

from convsync.model import ConversionStat, JourneyBatch, JourneyEvent, PlatformConversion

Row = ConversionStat | JourneyEvent | JourneyBatch | PlatformConversion
"""What a stream yields: aggregate cells, person-level events (one by one or a page at a
time), or (undated) the conversion definitions the platform reports, such as Google Ads
conversion actions."""


@dataclass(frozen=True)
class Stream:
    """One kind of data from one account, pulled over a date range.

    ``pull(start, end)`` yields rows for days ``start..end`` (inclusive, in the account's time
    zone) in nondecreasing date order: once a row of day D is yielded, no row of an earlier day
    follows (a ``JourneyBatch`` counts as its first event). ``chunk_days`` > 0 asks the
    pipeline to split the range into chunks (for APIs that take one day, or a bounded span,
    per request); 0 means one pull for the whole range.
    ``ordered=False`` lifts the date-order promise (an API that does not document its order):
    the pipeline then counts a day complete only once the whole pull, or chunk, is stored."""

    platform: str
    name: str
    account_id: str
    pull: Callable[[dt.date, dt.date], Iterator[Row]]
    chunk_days: int = 0
    ordered: bool = True


@dataclass
class Requests:
    """API requests made, per method; the quota that matters is often requests, not rows."""

    counts: Counter[str] = field(default_factory=Counter)
    on_add: Callable[[str, int], None] | None = None
    """Told of each request as it is made (the pipeline counts Google Ads operations in the
    store, so a run killed half-way still counted what it spent)."""

    def add(self, method: str, n: int = 1) -> None:
        self.counts[method] += n
        if self.on_add is not None:
            self.on_add(method, n)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def last_complete_day(row: Row, timezone: str) -> dt.date | None:
    """The last day surely complete once ``row`` is stored, the rows coming in date order.

    A stat carries its own (account) date: every earlier day is done. An event has only a
    time (a batch counts as its first event's), read here in ``timezone`` (the client's),
    while the stream's days are the account's, which can differ by a day: one more day of
    margin. Undated rows say nothing (None)."""
    if isinstance(row, ConversionStat):
        return row.date - dt.timedelta(days=1)
    if isinstance(row, JourneyEvent):
        return row.time.astimezone(ZoneInfo(timezone)).date() - dt.timedelta(days=2)
    if isinstance(row, JourneyBatch) and row.times:
        first = dt.datetime.fromtimestamp(row.times[0], ZoneInfo(timezone))
        return first.date() - dt.timedelta(days=2)
    return None


def latest_day(row: Row, timezone: str) -> dt.date:
    """A day no row of a batch ending with ``row`` is after (the rows come in date order; a
    day of margin for the account's time zone against the client's, ``timezone``)."""
    if isinstance(row, ConversionStat):
        return row.date
    if isinstance(row, JourneyBatch) and row.times:
        moment = dt.datetime.fromtimestamp(row.times[-1], ZoneInfo(timezone))
        return moment.date() + dt.timedelta(days=1)
    if isinstance(row, JourneyEvent):
        return row.time.astimezone(ZoneInfo(timezone)).date() + dt.timedelta(days=1)
    return dt.date.max


def give_back_free_memory() -> None:
    """Return freed heap to the system between large pieces of work (a GA4 page, a platform).

    glibc keeps freed memory for reuse, and what comes next (another page's wire bytes and
    parsed message, another SDK's objects) fits it badly: without this the second GA4 page of
    a year of 200 campaigns peaked 15 - 25 MB above the first, and a four-platform pull 60 MB
    above its largest platform alone. A no-op where ``malloc_trim`` does not exist."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)
