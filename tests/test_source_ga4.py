"""The GA4 source against the sandbox, through the real BetaAnalyticsDataClient (gRPC and REST).

Every stream's rows, and what the store keeps of them, are compared with ``World.ga4_rows``."""

from __future__ import annotations

import datetime as dt
import logging
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from google.analytics.data_v1beta.types import RunReportRequest
from google.api_core import exceptions

from conftest import Ga4Running, start_ga4
from convsync import pipeline
from convsync.model import (
    Basis,
    ConversionMap,
    ConversionStat,
    JourneyEvent,
    Kind,
    Platform,
    PlatformConversion,
)
from convsync.retry import retrying
from convsync.sandbox.control import FaultKind, Sandbox
from convsync.sandbox.world import Ga4Row, World, WorldSpec
from convsync.settings import ClientConfig, Secrets
from convsync.sources import Requests, Row, Stream, ga4
from convsync.store import Store

TRANSPORTS = ("grpc", "rest")
Key = tuple[dt.date, str, str, str, str]  # day, session source, medium, campaign, event
Cell = tuple[int, int, float]  # events, key events, value


@pytest.fixture
def sandbox(ga4_running: Ga4Running) -> Iterator[Sandbox]:
    ga4_running.sandbox.reset_requests()
    yield ga4_running.sandbox
    ga4_running.sandbox.clear_faults()


def make_config(ga4_running: Ga4Running, transport: str = "grpc",
                custom_dimensions: tuple[str, ...] = (),
                property_id: str | None = None) -> ClientConfig:
    """Purchase and add to cart mapped; every other event left unmapped on purpose."""
    return ClientConfig.model_validate({
        "client": {"name": "GA4 test", "timezone": "America/New_York"},
        "ga4": {"property_id": property_id or ga4_running.world.accounts.ga4_property_id,
                "transport": transport,
                "endpoint": ga4_running.endpoint(transport),
                "custom_dimensions": list(custom_dimensions)},
        "conversions": [
            {"name": "purchase", "kind": "macro", "ga4": "purchase"},
            {"name": "add_to_cart", "kind": "micro", "ga4": "add_to_cart"},
        ]})


SECRETS = Secrets(google_access_token="sandbox-token")


def streams(config: ClientConfig, requests: Requests) -> dict[str, Stream]:
    found = ga4.streams(config, SECRETS, ConversionMap(config.definitions()), requests)
    return {stream.name: stream for stream in found}


def stat_truth(world: World, start: dt.date, end: dt.date) -> dict[Key, Cell]:
    sums: dict[Key, list[float]] = defaultdict(lambda: [0, 0, 0.0])
    for row in world.ga4_rows(start, end):
        cell = sums[(row.date, row.source, row.medium, row.campaign_name, row.event_name)]
        cell[0] += row.event_count
        cell[1] += row.key_events
        cell[2] += row.event_value
    return {key: (int(n), int(key_events), round(v, 2))
            for key, (n, key_events, v) in sums.items()}


def as_table(stats: list[ConversionStat]) -> dict[Key, Cell]:
    assert all(s.key_events is not None for s in stats), "a GA4 cell without its key events"
    table = {(s.date, s.source, s.medium, s.campaign_id, s.platform_conversion):
             (round(s.count), round(s.key_events or 0), round(s.value, 2)) for s in stats}
    assert len(table) == len(stats), "a (day, source, medium, campaign, event) came twice"
    return table


def split(rows: list[Row]) -> tuple[list[ConversionStat], list[PlatformConversion]]:
    stats = [r for r in rows if isinstance(r, ConversionStat)]
    definitions = [r for r in rows if isinstance(r, PlatformConversion)]
    assert len(stats) + len(definitions) == len(rows)
    return stats, definitions


# -- events: daily stats -----------------------------------------------------------------------

@pytest.mark.parametrize("transport", TRANSPORTS)
def test_events_stream_matches_the_world_in_one_request(
        transport: str, ga4_running: Ga4Running, sandbox: Sandbox, tmp_path: Path) -> None:
    world = ga4_running.world
    requests = Requests()
    events = streams(make_config(ga4_running, transport), requests)["events"]
    assert (events.platform, events.account_id, events.chunk_days) == (
        "ga4", world.accounts.ga4_property_id, 0)
    stats, definitions = split(list(events.pull(world.start, world.end)))

    truth = stat_truth(world, world.start, world.end)
    assert as_table(stats) == truth
    assert [s.date for s in stats] == sorted(s.date for s in stats)
    assert {(s.platform, s.account_id, s.timezone, s.currency, s.basis, s.window, s.in_column)
            for s in stats} == {(Platform.GA4, world.accounts.ga4_property_id,
                                 world.accounts.ga4_tz, "USD", Basis.CONVERSION_DATE, "", None)}
    assert all(s.campaign_name == s.campaign_id for s in stats)
    # each campaign's own source / medium, Meta's view-through people as (direct) / (none)
    assert {(s.source, s.medium, s.campaign_id) for s in stats} == {
        (c.source, c.medium, c.name) for c in world.campaigns} | {
        ("(direct)", "(none)", "(not set)")}
    # key events: the key events' own count, none for the other events
    keyed = {s.platform_conversion for s in stats if s.key_events}
    assert keyed == {"purchase", "generate_lead"}
    assert sum(s.key_events or 0 for s in stats) == sum(n for _, n, _ in truth.values()) > 0
    # built unvalidated on the hot path, yet exactly what validation makes
    assert all(s == ConversionStat.model_validate(s.model_dump()) for s in stats)
    assert all(s.model_fields_set == set(ConversionStat.model_fields) for s in stats[:100])
    mapped = {(s.platform_conversion, s.conversion, s.kind) for s in stats}
    assert ("purchase", "purchase", Kind.MACRO) in mapped
    assert ("add_to_cart", "add_to_cart", Kind.MICRO) in mapped
    assert ("view_item", None, None) in mapped  # unmapped events are kept
    assert requests.counts == Counter(runReport=ga4.min_requests(len(stats))) == Counter(
        runReport=1)
    assert sandbox.requests("ga4") == {"ga4.runReport": 1}

    with Store.open(f"sqlite:///{tmp_path / 'store.db'}") as store:
        store.upsert_stats(stats)
        store.upsert_stats(stats)  # a second pull of the same days adds nothing
        kept = list(store.stats(platform=Platform.GA4))
    assert as_table(kept) == stat_truth(world, world.start, world.end)
    assert {s.basis for s in kept} == {Basis.CONVERSION_DATE}

    # after the stats: every event seen, whether GA4 counts it as a key event, its counts
    events_seen = {d.name: d for d in definitions}
    assert set(events_seen) == {key[4] for key in stat_truth(world, world.start, world.end)}
    assert {n for n, d in events_seen.items() if d.settings["key_event"]} == {
        "purchase", "generate_lead"}
    assert events_seen["purchase"].conversion == "purchase"
    assert events_seen["view_item"].conversion is None
    purchases = sum(r.event_count for r in world.ga4_rows(world.start, world.end)
                    if r.event_name == "purchase")
    assert events_seen["purchase"].settings["event_count"] == purchases
    assert events_seen["purchase"].settings["key_events"] == purchases


def test_pages_past_the_row_limit_with_one_request_a_page(ga4_running: Ga4Running,
                                                          sandbox: Sandbox) -> None:
    world = ga4_running.world
    config = make_config(ga4_running)
    requests = Requests()
    client = ga4.connect(config.ga4, SECRETS) if config.ga4 else None
    assert client is not None
    pull = ga4.events_pull(client, world.accounts.ga4_property_id,
                           ConversionMap(config.definitions()), requests, ga4.Schema(),
                           page_rows=250)
    stats, _ = split(list(pull(world.start, world.end)))
    assert as_table(stats) == stat_truth(world, world.start, world.end)
    assert len(stats) > 4 * 250
    assert [s.date for s in stats] == sorted(s.date for s in stats)
    assert requests.counts["runReport"] == ga4.min_requests(len(stats), 250)
    assert sandbox.requests("ga4") == {"ga4.runReport": ga4.min_requests(len(stats), 250)}


def test_a_sub_range_holds_only_its_days(ga4_running: Ga4Running) -> None:
    world = ga4_running.world
    start, end = world.start + dt.timedelta(days=10), world.start + dt.timedelta(days=12)
    stats, _ = split(list(streams(make_config(ga4_running), Requests())["events"].pull(start, end)))
    assert as_table(stats) == stat_truth(world, start, end)
    assert {s.date for s in stats} == {start, start + dt.timedelta(days=1), end}


def test_the_old_conversions_metric_name_falls_back_to_the_one_the_api_takes(
        ga4_running: Ga4Running, sandbox: Sandbox, caplog: pytest.LogCaptureFixture) -> None:
    """The fallback between keyEvents and its old name, driven by the API's real refusal."""
    world = ga4_running.world
    config = make_config(ga4_running)
    assert config.ga4 is not None
    requests = Requests()
    schema = ga4.Schema(key_metric="conversions")
    pull = ga4.events_pull(ga4.connect(config.ga4, SECRETS), world.accounts.ga4_property_id,
                           ConversionMap([]), requests, schema)
    with caplog.at_level(logging.WARNING, logger="convsync.sources.ga4"):
        stats, definitions = split(list(pull(world.start, world.end)))
    assert schema.key_metric == "keyEvents"
    assert "refuses the conversions metric; asking for keyEvents" in caplog.text
    assert as_table(stats) == stat_truth(world, world.start, world.end)
    assert {d.name for d in definitions if d.settings["key_event"]} == {"purchase",
                                                                         "generate_lead"}
    assert requests.counts["runReport"] == 2  # the refused one, then the report


def test_a_refused_conversions_metric_is_explained(ga4_running: Ga4Running) -> None:
    config = make_config(ga4_running)
    assert config.ga4 is not None
    client = ga4.connect(config.ga4, SECRETS)
    request = RunReportRequest(property=f"properties/{ga4_running.world.accounts.ga4_property_id}",
                               metrics=[{"name": "conversions"}],
                               date_ranges=[{"start_date": "7daysAgo", "end_date": "today"}])
    with pytest.raises(exceptions.InvalidArgument) as refused:
        client.run_report(request=request)
    message = ga4.explain(refused.value)
    assert message is not None and "renamed the conversions metric keyEvents" in message
    assert not ga4.RETRY.is_retryable(refused.value)


# -- journeys: custom dimensions ---------------------------------------------------------------

JourneyTruth = dict[tuple[dt.date, str, str], tuple[str, float]]


@pytest.fixture(scope="module")
def gclid_truth(world: World) -> JourneyTruth:
    """(day, gclid, event) -> (campaign, value) for the events that carry a gclid."""
    truth = {}
    for row in world.ga4_rows(world.start, world.end, by_gclid=True):
        if row.gclid != "(not set)":
            assert row.event_count == 1
            truth[(row.date, row.gclid, row.event_name)] = (row.campaign_name, row.event_value)
    return truth


def test_gclid_custom_dimension_becomes_journey_events_and_a_missing_one_is_skipped(
        ga4_running: Ga4Running, sandbox: Sandbox, caplog: pytest.LogCaptureFixture,
        gclid_truth: JourneyTruth, tmp_path: Path) -> None:
    world = ga4_running.world
    requests = Requests()
    config = make_config(ga4_running, custom_dimensions=("customEvent:lead_id",
                                                     "customEvent:gclid"))
    journeys = streams(config, requests)["journeys"]
    with caplog.at_level(logging.WARNING, logger="convsync.sources.ga4"):
        events = list(journeys.pull(world.start, world.end))
    assert "has no custom dimension customEvent:lead_id: skipping it" in caplog.text
    assert all(isinstance(e, JourneyEvent) for e in events)
    journey = [e for e in events if isinstance(e, JourneyEvent)]

    truth = gclid_truth
    got = {(e.time.astimezone(ZoneInfo(world.accounts.ga4_tz)).date(), e.identifiers.gclid or "",
            e.platform_conversion): (e.campaign_id, e.value) for e in journey}
    assert len(got) == len(journey) == len(truth)
    assert got.keys() == truth.keys()
    assert all(got[k][0] == truth[k][0] and got[k][1] == pytest.approx(truth[k][1])
               for k in truth)
    zone = ZoneInfo(world.accounts.ga4_tz)
    assert {e.time.astimezone(zone).time() for e in journey} == {dt.time(12)}
    assert [e.time for e in journey] == sorted(e.time for e in journey)
    assert all(e.person_key == f"gclid:{e.identifiers.gclid}" for e in journey)
    assert all(e.identifiers.external_id is None for e in journey)
    assert {e.source_platform for e in journey} == {Platform.GA4}
    assert len({e.source_event_id for e in journey}) == len(journey)
    assert {(e.platform_conversion, e.conversion) for e in journey} >= {
        ("purchase", "purchase"), ("add_to_cart", "add_to_cart"), ("view_item", None)}
    assert all(e.currency == "USD" for e in journey)
    # the refused custom dimension, then the report; remembered for the rest of the run
    assert requests.counts["runReport"] == 1 + ga4.min_requests(
        len(journey), ga4.JOURNEY_PAGE_ROWS["grpc"])
    list(journeys.pull(world.end, world.end))
    assert requests.counts["runReport"] == 3

    with Store.open(f"sqlite:///{tmp_path / 'store.db'}") as store:
        store.upsert_journey_events(journey)
        store.upsert_journey_events(journey)
        kept = list(store.journey_events())
    assert len(kept) == len(journey)
    assert sum(e.value for e in kept) == pytest.approx(sum(v for _, v in truth.values()))


def test_the_gclid_view_of_the_world_splits_the_same_events(world: World) -> None:
    """The simulator's customEvent:gclid rows add up to its rows without the dimension."""
    def sums(rows: Iterator[Ga4Row]) -> dict[Key, Cell]:
        cells: dict[Key, list[float]] = defaultdict(lambda: [0, 0, 0.0])
        for row in rows:
            cell = cells[(row.date, row.source, row.medium, row.campaign_name, row.event_name)]
            cell[0] += row.event_count
            cell[1] += row.key_events
            cell[2] += row.event_value
        return {k: (int(n), int(key), round(v, 2)) for k, (n, key, v) in cells.items()}

    split_rows = list(world.ga4_rows(world.start, world.end, by_gclid=True))
    assert sums(iter(split_rows)) == sums(world.ga4_rows(world.start, world.end))
    google = {c.name for c in world.campaigns_on("google_ads")}
    assert all((row.gclid != "(not set)") == (row.campaign_name in google)
               for row in split_rows)


def test_only_unregistered_custom_dimensions_pull_nothing(ga4_running: Ga4Running,
                                                          sandbox: Sandbox) -> None:
    requests = Requests()
    journeys = streams(make_config(ga4_running, custom_dimensions=("customUser:crm_id",)),
                       requests)["journeys"]
    world = ga4_running.world
    assert list(journeys.pull(world.start, world.end)) == []
    assert list(journeys.pull(world.start, world.end)) == []
    assert requests.counts["runReport"] == 1  # asked once, then known to be missing


def test_no_custom_dimensions_no_journeys_stream(ga4_running: Ga4Running) -> None:
    assert set(streams(make_config(ga4_running), Requests())) == {"events"}


@pytest.mark.parametrize("name", ["gclid", "customEvent:", "ga:dimension1", "customEvent:a b"])
def test_a_malformed_custom_dimension_is_a_config_error(name: str) -> None:
    with pytest.raises(ValueError, match="is not a custom dimension"):
        ga4.check_custom_dimensions([name])


def test_event_ids_stay_unique_when_values_hold_the_separator() -> None:
    assert ga4._joined(["20260901", "Spring | Sale", "x"]) == "20260901|Spring \\| Sale|x"
    assert ga4._joined(["a|b", "c"]) != ga4._joined(["a", "b|c"])
    assert ga4._joined(["a\\", "|b"]) != ga4._joined(["a\\|", "b"])


def test_identifier_fields() -> None:
    assert ga4.identifier_field("customEvent:gclid") == "gclid"
    assert ga4.identifier_field("customEvent:wbraid") == "wbraid"
    assert ga4.identifier_field("customEvent:lead_id") == "external_id"
    assert ga4.identifier_field("customUser:crm_id") == "external_id"


# -- errors and retries ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["rate_limit", "server_error"])
def test_transient_faults_are_retried(kind: FaultKind, ga4_running: Ga4Running,
                                      sandbox: Sandbox) -> None:
    world = ga4_running.world
    requests = Requests()
    events = streams(make_config(ga4_running), requests)["events"]
    sandbox.inject("ga4", kind)
    slept: list[float] = []
    for attempt in retrying(ga4.RETRY, sleep=slept.append):
        with attempt:
            stats, _ = split(list(events.pull(world.start, world.end)))
    assert len(slept) == 1
    assert as_table(stats) == stat_truth(world, world.start, world.end)
    assert requests.counts["runReport"] == 2 == sandbox.requests("ga4")["ga4.runReport"]


@pytest.mark.parametrize(("make_error", "expected", "hint"), [
    ("exhausted", exceptions.ResourceExhausted, "daily tokens are spent"),
    ("bad_range", exceptions.InvalidArgument, "startDate must be less than or equal"),
    ("other_property", exceptions.PermissionDenied, "Viewer access to the property"),
])
def test_daily_quota_validation_and_permission_errors_are_not_retried(
        make_error: str, expected: type[Exception], hint: str, ga4_running: Ga4Running,
        sandbox: Sandbox) -> None:
    world = ga4_running.world
    config = make_config(ga4_running, property_id="999" if make_error == "other_property" else None)
    start, end = world.start, world.end
    if make_error == "bad_range":
        start, end = end, start
    if make_error == "exhausted":
        sandbox.inject("ga4", "exhausted")
    events = streams(config, Requests())["events"]
    slept: list[float] = []
    with pytest.raises(expected) as raised:
        for attempt in retrying(ga4.RETRY, sleep=slept.append):
            with attempt:
                list(events.pull(start, end))
    assert slept == []
    assert sandbox.requests("ga4") == {"ga4.runReport": 1}
    message = ga4.explain(raised.value)
    assert message is not None and hint in message


def test_a_report_that_changes_between_pages_is_retried_from_a_fresh_report(
        tls_files: tuple[Path, Path]) -> None:
    """Late events arriving while a report is paged shift its offsets: never stitch pages of
    two different reports together."""
    spec = WorldSpec(seed=5, start=dt.date(2026, 9, 1), days=20, campaigns=6,
                     as_of=dt.datetime(2026, 9, 15, tzinfo=dt.UTC))
    world = World(spec)
    simulator = start_ga4(world)
    try:
        config = make_config(simulator)
        assert config.ga4 is not None
        pull = ga4.events_pull(ga4.connect(config.ga4, SECRETS),
                               world.accounts.ga4_property_id, ConversionMap([]), Requests(),
                               ga4.Schema(), page_rows=100)
        rows = pull(world.start, world.end)
        first_page = [next(rows) for _ in range(100)]
        assert all(isinstance(r, ConversionStat) for r in first_page)
        world.advance(3)  # three more days of events, and late ones on the earlier days
        with pytest.raises(ga4.ReportChanged) as changed:
            list(rows)
        assert ga4.RETRY.is_retryable(changed.value)
        stats, _ = split(list(pull(world.start, world.end)))
        assert as_table(stats) == stat_truth(world, world.start, world.end)
    finally:
        simulator.stop()


def test_retry_after_reads_the_wait_the_api_asked_for() -> None:
    from google.rpc import error_details_pb2

    info = error_details_pb2.RetryInfo()
    info.retry_delay.seconds, info.retry_delay.nanos = 7, 500_000_000
    grpc_style = exceptions.ResourceExhausted("Exhausted property tokens per hour.",
                                              details=[info])
    rest_style = exceptions.TooManyRequests("Exhausted property tokens per hour.", details=[
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "3s"}])
    assert ga4.RETRY.retry_after(grpc_style) == 7.5
    assert ga4.RETRY.retry_after(rest_style) == 3.0
    assert ga4.RETRY.retry_after(exceptions.ServiceUnavailable("down")) is None


# -- the whole pull ----------------------------------------------------------------------------

def test_pipeline_pull_stores_the_world_with_the_minimum_of_requests(
        ga4_running: Ga4Running, sandbox: Sandbox, gclid_truth: JourneyTruth,
        tmp_path: Path) -> None:
    world = ga4_running.world
    config = make_config(ga4_running, custom_dimensions=("customEvent:gclid",))
    with Store.open(f"sqlite:///{tmp_path / 'pull.db'}") as store:
        result = pipeline.pull(config, SECRETS, store, platforms=[Platform.GA4],
                               since=world.start, until=world.end,
                               today=world.end + dt.timedelta(days=1))
        stats = list(store.stats(platform=Platform.GA4))
        journey = list(store.journey_events())
        definitions = store.platform_conversions(Platform.GA4)
    outcome = result.platforms[0]
    assert outcome.errors == []
    assert as_table(stats) == stat_truth(world, world.start, world.end)
    assert len(journey) == len(gclid_truth)
    assert outcome.rows == len(stats) + len(journey)
    assert outcome.requests.total == ga4.min_requests(len(stats)) + ga4.min_requests(
        len(journey), ga4.JOURNEY_PAGE_ROWS["grpc"])
    assert {d.name for d in definitions if d.settings["key_event"]} == {"purchase",
                                                                         "generate_lead"}
    assert "view_item" in outcome.unmapped
