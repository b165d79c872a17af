"""What each command does for one client: sources -> store -> (later) reconcile, value, push.

Each platform runs on its own: one failing is reported and the others go on."""

from __future__ import annotations

import datetime as dt
import gc
import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

from convsync import quotas
from convsync.errors import ConvsyncError
from convsync.gctuning import fewer_collections
from convsync.model import (
    ConversionMap,
    ConversionStat,
    JourneyBatch,
    JourneyEvent,
    Platform,
    PlatformConversion,
    infer_kind,
)
from convsync.redact import Redactor
from convsync.retry import RetryPolicy, retrying, wait_too_long
from convsync.settings import ClientConfig, Secrets
from convsync.sources import (
    Requests,
    Row,
    Stream,
    ga4,
    give_back_free_memory,
    google_ads,
    klaviyo,
    last_complete_day,
    latest_day,
    meta,
)
from convsync.store import Store

log = logging.getLogger(__name__)



@dataclass
class PlatformOutcome:
    platform: Platform
    conversions: list[PlatformConversion] = field(default_factory=list)
    error: str | None = None

    @property
    def unmapped(self) -> list[PlatformConversion]:
        """Conversions no definition names (views of a mapped Meta action are not, nor the
        import actions convsync uploads to: mapped, they would count its own uploads)."""
        return [c for c in self.conversions if c.conversion is None
                and "alias_of" not in c.settings and "upload_action_of" not in c.settings]


@dataclass
class DiscoverResult:
    client: str
    outcomes: list[PlatformOutcome]

    @property
    def failed(self) -> list[PlatformOutcome]:
        return [o for o in self.outcomes if o.error]

    def summary(self) -> dict[str, Any]:
        return {"client": self.client, "platforms": {
            o.platform.value: {
                "conversions": len(o.conversions), "unmapped": [c.name for c in o.unmapped],
                "error": o.error} for o in self.outcomes}}


def discover(config: ClientConfig, secrets: Secrets, store: Store,
             today: dt.date | None = None, days: int = 30) -> DiscoverResult:
    """List every conversion each enabled platform defines, map it, and store it."""
    until = today or dt.date.today()
    since = until - dt.timedelta(days=days)
    mapping = ConversionMap(config.definitions())
    redact = Redactor(secrets.values())
    outcomes = []
    for platform in config.enabled_platforms():
        outcome = PlatformOutcome(platform)
        try:
            found = list(_platform_conversions(platform, config, secrets, since, until))
            outcome.conversions = [mapping.mapped(c) for c in found]
            if platform is Platform.META:
                outcome.conversions = meta.mark_aliases(outcome.conversions)
            if platform is Platform.GOOGLE_ADS and config.google_ads:
                outcome.conversions = _mark_upload_actions(outcome.conversions,
                                                           config.google_ads.upload_actions)
            store.save_platform_conversions(outcome.conversions)
        except Exception as error:  # one platform failing must not stop the others
            outcome.error = redact(explain(error, platform))
            log.error("%s: %s", platform.value, outcome.error)
        outcomes.append(outcome)
    return DiscoverResult(config.client.name, outcomes)


def _mark_upload_actions(actions: list[PlatformConversion],
                         uploads: dict[str, str]) -> list[PlatformConversion]:
    """The import actions ``upload_actions`` names get ``upload_action_of`` (the conversions
    convsync uploads to them) in their settings."""
    targets: dict[str, list[str]] = {}
    for conversion, action in uploads.items():
        targets.setdefault(action, []).append(conversion)
    return [a if a.platform_id not in targets else a.model_copy(update={"settings": {
        **a.settings, "upload_action_of": ", ".join(targets[a.platform_id])}})
        for a in actions]


def _platform_conversions(platform: Platform, config: ClientConfig, secrets: Secrets,
                          since: dt.date, until: dt.date) -> Iterator[PlatformConversion]:
    if platform is Platform.GOOGLE_ADS and config.google_ads:
        client = google_ads.connect(config.google_ads, secrets)
        for customer_id in config.google_ads.customer_ids:
            yield from google_ads.conversion_actions(client, customer_id)
    elif platform is Platform.GA4 and config.ga4:
        data = ga4.connect(config.ga4, secrets)
        yield from ga4.event_names(data, config.ga4.property_id, since, until)
    elif platform is Platform.META and config.meta:
        api = meta.connect(config.meta, secrets)
        for account in config.meta.ad_account_ids:
            yield from meta.action_types(api, config.meta, account, since, until)
    elif platform is Platform.KLAVIYO and config.klaviyo:
        yield from klaviyo.metrics(klaviyo.connect(config.klaviyo, secrets))


def explain(error: Exception, platform: Platform) -> str:
    """The platform's own account of an error when it is one, else the exception itself,
    and when to come back if the platform asked for a longer wait than a run makes."""
    said = SOURCES[platform].explain(error) or (
        str(error) if isinstance(error, ConvsyncError) else f"{type(error).__name__}: {error}")
    later = wait_too_long(SOURCES[platform].RETRY, error)
    if later is not None and "run again later" not in said:
        back = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=later)
        said += (f" (the platform asked to wait {later:,.0f} s: run again after "
                 f"{back:%H:%M} UTC)")
    return said


EVENT_SYNONYMS = {
    "placed_order": "purchase", "order_completed": "purchase",
    "added_to_cart": "add_to_cart", "started_checkout": "begin_checkout",
    "initiate_checkout": "begin_checkout", "checkout": "begin_checkout",
    "viewed_product": "view_item", "view_content": "view_item", "product_view": "view_item",
    "complete_registration": "sign_up", "lead": "generate_lead", "lead_form": "generate_lead",
}
"""One business event's names on the platforms, as convsync's snippet reads them (Klaviyo's
"Placed Order" and Meta's ``purchase`` are GA4's ``purchase``)."""


def mapping_snippet(unmapped: list[PlatformConversion], taken: set[str]) -> str:
    """Ready-to-paste ``[[conversions]]`` tables for platform conversions no definition names:
    one per business event, with its name on each platform (the same name in several accounts
    once; Meta's views of one event together, counted once). An event whose name the config
    already defines is shown as the names to add to that entry, commented out."""
    events: dict[str, dict[Platform, list[str]]] = {}
    hints: dict[str, str] = {}
    for conversion in unmapped:
        key = _event_key(conversion)
        names = events.setdefault(key, {}).setdefault(conversion.platform, [])
        if conversion.name not in names:
            names.append(conversion.name)
        hints.setdefault(key, str(conversion.settings.get("category", "")))
    blocks = []
    for key, by_platform in events.items():
        lines = [_names_line(p, n)
                 for p, n in sorted(by_platform.items(), key=lambda item: item[0].value)]
        if key in taken:
            blocks.append("\n".join([f"# {key} is defined already: add these names to its "
                                      "[[conversions]] entry", *(f"# {line}" for line in lines)]))
            continue
        names = [name for n in by_platform.values() for name in n]
        kind, why = infer_kind(" ".join(names), hints[key])
        blocks.append("\n".join(["[[conversions]]", f'name = "{key}"',
                                  f'kind = "{kind.value}"  # {why}', *lines]))
    return "\n\n".join(blocks)


def _names_line(platform: Platform, names: list[str]) -> str:
    line = f"{platform.value} = {json.dumps(names[0] if len(names) == 1 else names)}"
    if platform is Platform.META and len(names) > 1:
        line += "  # views of one event, counted once"
    return line


def _event_key(conversion: PlatformConversion) -> str:
    """The business event a platform conversion counts, as a conversion name."""
    name = (meta.action_family(conversion.name) if conversion.platform is Platform.META
            else conversion.name)
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_").removeprefix("ga4_")
    slug = EVENT_SYNONYMS.get(slug, slug)
    return slug if re.match(r"[a-z]", slug) else f"c_{slug}"


# -- pull and backfill ---------------------------------------------------------------------

BATCH_ROWS = 5_000
SOURCES = {Platform.GOOGLE_ADS: google_ads, Platform.GA4: ga4, Platform.META: meta,
           Platform.KLAVIYO: klaviyo}


class Progress:
    """Where a pull reports how far it got; the CLI shows a bar, tests and cron see nothing."""

    def start(self, label: str, days: int) -> None:
        """A stream of ``days`` days begins."""

    def advance(self, label: str, done_days: int) -> None:
        """``done_days`` of the stream's days are complete."""


@dataclass
class PlatformPull:
    """What one platform's pull did; ``summary()`` is what the JSON output shows."""

    platform: Platform
    rows: int = 0
    days: set[dt.date] = field(default_factory=set)
    unmapped: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    requests: Requests = field(default_factory=Requests)
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"rows": self.rows, "days": len(self.days),
                "first_day": min(self.days).isoformat() if self.days else None,
                "last_day": max(self.days).isoformat() if self.days else None,
                "unmapped": sorted(self.unmapped), "errors": self.errors,
                "requests": self.requests.total, "requests_by_method": dict(
                    self.requests.counts), "skipped": self.skipped}


@dataclass
class PullResult:
    client: str
    command: str
    since: dt.date
    until: dt.date
    platforms: list[PlatformPull]
    warnings: list[str] = field(default_factory=list)
    run_id: int | None = None

    @property
    def failed(self) -> list[PlatformPull]:
        return [p for p in self.platforms if p.errors]

    def summary(self) -> dict[str, Any]:
        return {"client": self.client, "command": self.command, "run_id": self.run_id,
                "since": self.since.isoformat(), "until": self.until.isoformat(),
                "rows": sum(p.rows for p in self.platforms), "warnings": self.warnings,
                "platforms": {p.platform.value: p.summary() for p in self.platforms}}


@dataclass(frozen=True)
class Window:
    """The days one stream pulls, and the watermark key its progress is kept under."""

    start: dt.date
    end: dt.date
    key: str
    backfill: bool


def pull(config: ClientConfig, secrets: Secrets, store: Store, *,
         platforms: list[Platform] | None = None, since: dt.date | None = None,
         until: dt.date | None = None, restart: bool = False, today: dt.date | None = None,
         progress: Progress | None = None, sleep: Callable[[float], None] | None = None,
         ) -> PullResult:
    """Pull every enabled platform (or those named) into the store.

    Without ``since``: an incremental pull, from each stream's watermark, re-pulling the last
    ``lookback_days`` because platforms keep attributing conversions to past days; the
    watermark moves only once the rows are committed. With ``since``: a backfill of
    ``since..until`` that records its progress after every committed batch, so a run killed
    half-way resumes where it stopped (``restart`` starts it over)."""
    today = today or _today(config)
    backfill = since is not None
    first = since or today - dt.timedelta(days=max(config.lookback_days(p)
                                                   for p in Platform if p in SOURCES))
    last = until or (today - dt.timedelta(days=1) if backfill else today)
    command = "backfill" if backfill else "pull"
    result = PullResult(config.client.name, command, first, last, [])
    result.run_id = store.start_run(config.client.name, command)
    redact = Redactor(secrets.values())
    mapping = ConversionMap(config.definitions())
    store.save_definitions(config.definitions(), config.client.name)
    chosen = [p for p in config.enabled_platforms() if platforms is None or p in platforms]
    with fewer_collections():
        for platform in chosen:
            _pull_platform(config, secrets, store, platform, result, mapping, redact, today,
                           since, until, restart, progress, sleep)
            gc.collect()
            give_back_free_memory()
    result.warnings += _budget_warnings(config, secrets, store, result)
    status = "ok" if not result.failed else (
        "partial" if len(result.failed) < len(result.platforms) else "failed")
    store.finish_run(result.run_id, status, result.summary())
    return result


def _pull_platform(config: ClientConfig, secrets: Secrets, store: Store, platform: Platform,
                   result: PullResult, mapping: ConversionMap, redact: Redactor,
                   today: dt.date, since: dt.date | None, until: dt.date | None, restart: bool,
                   progress: Progress | None, sleep: Callable[[float], None] | None) -> None:
    """One platform's streams, one after the other; an error is reported, never raised."""
    outcome = PlatformPull(platform)
    result.platforms.append(outcome)
    if platform is Platform.GOOGLE_ADS and config.google_ads is not None:
        outcome.requests.on_add = quotas.operation_counter(
            store, quotas.cloud_project(config.google_ads, secrets))
    source = SOURCES[platform]
    try:
        streams = source.streams(config, secrets, mapping, outcome.requests)
    except Exception as error:  # one platform failing must not stop the others
        outcome.errors.append(redact(explain(error, platform)))
        log.error("%s: %s", platform.value, outcome.errors[-1])
        return
    if platform is Platform.GOOGLE_ADS and (why := _over_budget(config, secrets, store,
                                                                 len(streams))):
        outcome.skipped.append(why)
        log.warning("%s: %s", platform.value, why)
        return
    failed_accounts: set[str] = set()
    for stream in streams:
        if stream.account_id in failed_accounts:
            outcome.skipped.append(f"{stream.name} {stream.account_id}: skipped after the "
                                   "account's earlier error")
            continue
        window = _window(config, store, stream, today, since, until, restart)
        if window is None:
            outcome.skipped.append(f"{stream.name} {stream.account_id}: backfill already "
                                   "complete (use --restart to pull it again)")
            continue
        try:
            _pull_stream(config, store, stream, window, source.RETRY, outcome,
                         progress or Progress(), sleep)
        except Exception as error:
            failed_accounts.add(stream.account_id)  # its other streams would fail alike
            outcome.errors.append(redact(f"{stream.name} {stream.account_id}: "
                                         f"{explain(error, platform)}"))
            log.error("%s: %s", platform.value, outcome.errors[-1])
    if platform is Platform.GOOGLE_ADS and _upload_actions(config):
        own = set(_upload_actions(config).values())  # convsync's own: never to map
        outcome.unmapped -= {c.name for c in store.platform_conversions(platform)
                             if c.platform_id in own}


def _today(config: ClientConfig) -> dt.date:
    return dt.datetime.now(ZoneInfo(config.client.timezone)).date()


def _window(config: ClientConfig, store: Store, stream: Stream, today: dt.date,
            since: dt.date | None, until: dt.date | None, restart: bool) -> Window | None:
    client, platform = config.client.name, Platform(stream.platform)
    if since is not None:
        end = until or today - dt.timedelta(days=1)
        key = f"backfill:{stream.name}:{since}"  # a later --until goes on from what is done
        mark = None if restart else store.get_watermark(client, platform, stream.account_id, key)
        done = mark.last_complete_date if mark else None
        if done is not None and done >= end:
            return None
        start = max(since, done + dt.timedelta(days=1)) if done else since
        return Window(start, end, key, backfill=True)
    lookback = today - dt.timedelta(days=config.lookback_days(platform))
    mark = store.get_watermark(client, platform, stream.account_id, stream.name)
    done = mark.last_complete_date if mark else None
    start = min(done + dt.timedelta(days=1), lookback) if done else lookback
    return Window(start, until or today, stream.name, backfill=False)


def _pull_stream(config: ClientConfig, store: Store, stream: Stream, window: Window,
                 policy: RetryPolicy, outcome: PlatformPull, progress: Progress,
                 sleep: Callable[[float], None] | None) -> None:
    """Pull one stream over its window in batches, retrying transient errors from the last
    complete day, and move its watermark as batches commit."""
    label = f"{stream.platform} {stream.name} {stream.account_id}"
    total_days = (window.end - window.start).days + 1
    progress.start(label, total_days)
    resume = window.start
    chunk = dt.timedelta(days=stream.chunk_days or total_days)
    retry = retrying(policy, sleep) if sleep else retrying(policy)
    tally = _Tally(outcome, ordered=stream.ordered)

    def done_through(day: dt.date) -> None:
        nonlocal resume
        outcome.days.update(resume + dt.timedelta(days=n) for n in range((day - resume).days + 1))
        resume = max(resume, day + dt.timedelta(days=1))
        _mark(config, store, stream, window, day)
        progress.advance(label, (day - window.start).days + 1)
        tally.complete(resume)

    for attempt in retry:
        with attempt:
            tally.retrying()
            while resume <= window.end:
                chunk_end = min(resume + chunk - dt.timedelta(days=1), window.end)
                for complete in _commit_batches(config, store, stream, resume, chunk_end,
                                                tally):
                    done_through(complete)
                done_through(chunk_end)
    if not window.backfill:
        _mark(config, store, stream, window, min(window.end, _today(config) - dt.timedelta(
            days=1)), final=True)


class _Tally:
    """The rows a stream stored, each counted once. A retry pulls again from the last
    complete day, storing again rows the failed attempt stored (the store keeps one of each):
    the batches that may be pulled again are kept (a few days' rows) and, on a retry, their
    rows' keys, so the retried rows are not counted twice."""

    def __init__(self, outcome: PlatformPull, *, ordered: bool = True) -> None:
        self.outcome = outcome
        self.ordered = ordered
        self.kept: list[tuple[dt.date, list[Row]]] = []
        self.seen: set[tuple[Any, ...]] = set()
        self.unsure = 0
        """Rows of an unordered stream's chunk still going (counted once the chunk is done:
        a retry pulls the whole chunk again, and keeping its rows would hold it in memory)."""

    def stored(self, batch: list[Row], rows: int, last_day: dt.date) -> None:
        """``batch`` (``rows`` rows) was stored; none of its rows is of a day after
        ``last_day``."""
        if not self.ordered:
            self.unsure += rows
            return
        if self.seen:  # after a retry: only the rows no earlier attempt stored
            rows = sum(key not in self.seen for key in _row_keys(batch))
        self.outcome.rows += rows
        self.kept.append((last_day, batch))

    def complete(self, resume: dt.date) -> None:
        """Days before ``resume`` are done: their batches are never pulled again."""
        self.outcome.rows += self.unsure
        self.unsure = 0
        self.kept = [(day, batch) for day, batch in self.kept if day >= resume]

    def retrying(self) -> None:
        """An attempt begins: the rows kept may come again."""
        self.unsure = 0
        for _, batch in self.kept:
            self.seen.update(_row_keys(batch))
        self.kept.clear()


def _row_keys(batch: list[Row]) -> Iterator[tuple[Any, ...]]:
    """Each data row's natural key, as the store dedupes it (definitions are not counted)."""
    for row in batch:
        if isinstance(row, ConversionStat):
            yield (row.platform, row.account_id, row.date, row.campaign_id,
                   row.platform_conversion, row.basis, row.window, row.source, row.medium)
        elif isinstance(row, JourneyEvent):
            yield (row.source_platform, row.source_event_id)
        elif isinstance(row, JourneyBatch):
            yield from ((row.source_platform, key) for key in row.source_event_ids)


def _commit_batches(config: ClientConfig, store: Store, stream: Stream, start: dt.date,
                    end: dt.date, tally: _Tally) -> Iterator[dt.date]:
    """Store the stream's rows batch by batch; after each batch yield the last day known
    complete (the rows come in date order, so every day before the last row's is done; a
    stream that promises no order yields nothing)."""
    batch: list[Row] = []
    pending = counted = 0  # rows in the batch; of them, data rows (not definitions)
    for row in stream.pull(start, end):
        batch.append(row)
        rows = len(row) if isinstance(row, JourneyBatch) else 1
        pending += rows
        counted += 0 if isinstance(row, PlatformConversion) else rows
        if pending >= BATCH_ROWS:
            done = last_complete_day(row, config.client.timezone) if stream.ordered else None
            _store_batch(store, batch, tally.outcome, _upload_actions(config))
            tally.stored(batch, counted, min(latest_day(row, config.client.timezone), end))
            batch, pending, counted = [], 0, 0
            if done is not None and done >= start:
                yield done
    _store_batch(store, batch, tally.outcome, _upload_actions(config))
    tally.stored(batch, counted, end)


def _upload_actions(config: ClientConfig) -> dict[str, str]:
    return config.google_ads.upload_actions if config.google_ads else {}


def _store_batch(store: Store, batch: list[Row], outcome: PlatformPull,
                 upload_actions: dict[str, str]) -> None:
    """Store a batch of a stream's rows. Google Ads actions convsync uploads to are marked as
    such (``upload_action_of``) and never reported unmapped: they are convsync's own."""
    stats = [r for r in batch if isinstance(r, ConversionStat)]
    events = [r for r in batch if isinstance(r, JourneyEvent)]
    batches = [r for r in batch if isinstance(r, JourneyBatch)]
    definitions = [r for r in batch if isinstance(r, PlatformConversion)]
    if stats:
        store.upsert_stats(stats)
    if events:
        store.upsert_journey_events(events)
    if batches:
        store.upsert_journey_batches(batches)
    if definitions:
        definitions = _mark_upload_actions(definitions, upload_actions)
        store.save_platform_conversions(definitions)
    outcome.unmapped.update(r.platform_conversion for r in stats if r.conversion is None)
    journeys: list[JourneyEvent | JourneyBatch] = [*events, *batches]
    outcome.unmapped.update(r.platform_conversion for r in journeys
                            if r.conversion is None and r.platform_conversion != "click")
    outcome.unmapped.update(r.name for r in definitions if r.conversion is None
                            and "alias_of" not in r.settings
                            and "upload_action_of" not in r.settings)


def _mark(config: ClientConfig, store: Store, stream: Stream, window: Window,
          complete: dt.date, final: bool = False) -> None:
    """Record progress: a backfill's after every batch, a pull's watermark at the end only."""
    if window.backfill or final:
        store.set_watermark(config.client.name, Platform(stream.platform), stream.account_id,
                            window.key, last_complete_date=complete)


def _over_budget(config: ClientConfig, secrets: Secrets, store: Store, streams: int) -> str:
    """Why this client's Google Ads pull is deferred ('' when it is not): the Cloud project's
    operations left today (every client's are counted) cannot hold one query per stream, so
    it waits for the budget to reset rather than fail half-way."""
    section = config.google_ads
    budget = section.operation_budget if section else None
    if section is None or not budget:
        return ""
    used = quotas.operations_today(store, quotas.cloud_project(section, secrets),
                                   dt.datetime.now(dt.UTC))
    if used + streams <= budget:
        return ""
    return (f"deferred: the Cloud project has {max(budget - used, 0):,} of its {budget:,} "
            f"daily Google Ads operations left and this pull needs at least {streams}; the "
            "budget resets at midnight Pacific time (raise [google_ads] access_level or "
            "daily_operation_budget if Google granted more)")


def _budget_warnings(config: ClientConfig, secrets: Secrets, store: Store,
                     result: PullResult) -> list[str]:
    """Warn when the Cloud project's Google Ads operations today (every client's, every run's,
    killed ones included: counted as they are made) near its daily budget."""
    section = config.google_ads
    budget = section.operation_budget if section else None
    used_now = sum(p.requests.total for p in result.platforms
                   if p.platform is Platform.GOOGLE_ADS)
    if section is None or not budget or not used_now:
        return []
    project = quotas.cloud_project(section, secrets)
    used = quotas.operations_today(store, project, dt.datetime.now(dt.UTC))
    runs_left = (budget - used) // used_now if used < budget else 0
    message = (f"google_ads: {used:,} of the Cloud project's {budget:,} daily operations used "
               f"today ({used_now:,} by this run); the budget is shared by every client synced "
               "with the project, and Google's day ends at midnight Pacific time")
    if used >= budget:
        return [message + ": it has run out, further queries will fail until it resets"]
    if used >= 0.8 * budget or runs_left < 24:
        return [message + f": about {runs_left} more runs like this one fit today"]
    return []


# -- values --------------------------------------------------------------------------------

def values(config: ClientConfig, store: Store, as_of: dt.datetime, *,
           keep: bool = True) -> dict[str, Any]:
    """What each micro conversion is worth as of ``as_of``, from the stored journeys: the
    rows and what they rest on (window, burn-in, sources, what a sound comparison needs),
    JSON-able. ``keep``: store the rows with the day computed (so later runs can restate
    earlier uploads); a replay of a past day is not kept."""
    from convsync import valuation
    from convsync.model import Kind

    section = config.valuation
    definitions = config.definitions()
    macro = {d.name for d in definitions if d.kind is Kind.MACRO}
    ladder = [d.name for d in sorted(definitions, key=lambda d: d.ladder_position or 0)
              if d.ladder_position is not None and d.kind is Kind.MICRO]
    sources: Counter[str] = Counter()

    def counted(events: Iterable[JourneyEvent]) -> Iterator[JourneyEvent]:
        for event in events:
            if event.conversion is not None:
                sources[str(event.source_platform)] += 1
            yield event

    journeys = valuation.journeys_from_events(counted(store.journey_events(until=as_of)),
                                              macro, ladder, section.segment_by)
    settings = valuation.ValuationSettings(min_events=section.min_events,
                                           max_relative_width=section.max_relative_width)
    horizon = float(section.horizon_days)
    rows = [_value_row(v) for v in valuation.estimate_values(journeys, as_of, horizon, settings)]
    if keep:
        store.save_micro_values(config.client.name, as_of, rows)
    overall = next((r for r in rows if r["segment"] == valuation.ALL_SEGMENTS), None)
    burn_in = overall["burn_in_days"] if overall else 0.0
    valued = {r["conversion"] for r in rows}
    return {
        "client": config.client.name, "as_of": as_of.isoformat(),
        "timezone": config.client.timezone, "currency": config.client.currency,
        "horizon_days": section.horizon_days, "segment_by": section.segment_by,
        "window_start": overall["window_start"] if overall else None,
        "history_days": overall["history_days"] if overall else 0.0,
        "burn_in_days": burn_in,
        "sound_history_days": burn_in + horizon + settings.min_cohort_days,
        "sources": dict(sources), "person_groups": list(journeys.groups),
        "missing": [d.name for d in definitions
                    if d.kind is Kind.MICRO and d.name not in valued],
        "values": rows}


def _value_row(value: Any) -> dict[str, Any]:
    from dataclasses import asdict

    row = asdict(value)
    row["as_of"] = value.as_of.isoformat()
    row["window_start"] = value.window_start.isoformat() if value.window_start else None
    row["recommendation"] = str(value.recommendation)
    return row
