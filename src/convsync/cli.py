"""The convsync command line: parses, calls the pipeline, prints. Nothing else lives here.

Exit codes: 0 ok, 1 failed, 2 bad usage, config or input file, 3 partly done (which error
ends with which: ``convsync.errors``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import signal
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import IntEnum
from pathlib import Path
from typing import Annotated, Any
from zoneinfo import ZoneInfo

import typer
from rich import box
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from convsync import __version__
from convsync.errors import ConvsyncError
from convsync.model import Platform
from convsync.redact import Redactor
from convsync.redact import install as install_redaction
from convsync.settings import (
    ClientConfig,
    ConfigError,
    Secrets,
    check_config,
    load_config,
    load_secrets,
)


class _Commands(TyperGroup):
    """convsync's commands: any of convsync's errors (``convsync.errors``: a config, an input
    file, the store, a platform, a lock) is one line saying what to fix and the error's exit
    code, never a traceback (``-v`` adds it, for a bug report)."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except ConvsyncError as error:
            logging.getLogger("convsync").debug("the traceback, for a bug report:",
                                                exc_info=True)
            console.print(f"error: {error}", highlight=False, markup=False)
            raise typer.Exit(error.exit_code) from None


app = typer.Typer(
    help="Keep an advertiser's conversion data honest across Google Ads, GA4, Meta and Klaviyo.",
    no_args_is_help=True, add_completion=False, rich_markup_mode=None, cls=_Commands)
config_app = typer.Typer(help="Check client configuration files.", no_args_is_help=True)
sandbox_app = typer.Typer(help="Run local simulators of the four platforms (no accounts needed).",
                          no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(sandbox_app, name="sandbox")

console = Console(stderr=True)
out = Console()


class Exit(IntEnum):
    OK = 0
    FAILED = 1
    BAD_INPUT = 2
    PARTIAL = 3


JsonFlag = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON summary "
                                                       "on stdout instead of tables.")]
ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="Client config file (TOML).",
                                            exists=False, dir_okay=False)]


def _emit(summary: dict[str, Any], as_json: bool, human: Callable[[], None]) -> None:
    if as_json:
        print(json.dumps(summary, default=str), flush=True)
    else:
        human()


def _version(value: bool) -> None:
    if value:
        print(f"convsync {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug details.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Keep an advertiser's conversion data honest across Google Ads, GA4, Meta and Klaviyo."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)])


@config_app.command("check")
def config_check(
    file: Annotated[Path, typer.Argument(help="The client config file to check.")],
    with_secrets: Annotated[bool, typer.Option(
        "--with-secrets", help="Also require each enabled platform's credentials (use this on "
                               "the machine that runs the syncs).")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Validate a client config file, naming each problem's key and fix."""
    problems = check_config(file, require_secrets=with_secrets)
    errors = [p for p in problems if p.severity == "error"]
    summary = {"file": str(file), "ok": not errors,
               "problems": [vars(p) for p in problems]}

    def human() -> None:
        if not problems:
            console.print(f"[green]ok[/green] {file}")
        for problem in problems:
            colour = "red" if problem.severity == "error" else "yellow"
            console.print(f"[{colour}]{problem.severity}[/{colour}] "
                          f"[bold]{problem.key}[/bold]: {problem.message}", highlight=False)
        if errors:
            console.print(f"{file}: {len(errors)} error(s)")

    _emit(summary, as_json, human)
    raise typer.Exit(Exit.BAD_INPUT if errors else Exit.OK)


@sandbox_app.command("serve")
def sandbox_serve(
    config_out: Annotated[Path | None, typer.Option(
        help="Write a ready client config pointing at the sandbox to this file (its fake "
             "secrets go beside it).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic world.")] = 7,
    scale: Annotated[str, typer.Option(help="World size: small (60 days x 6 campaigns), "
                                            "medium (180 x 40) or large (365 x 200).")] = "small",
    days: Annotated[int | None, typer.Option(help="Days of the world (overrides --scale).")] = None,
    campaigns: Annotated[int | None, typer.Option(
        help="Campaigns of the world (overrides --scale).")] = None,
    end: Annotated[str | None, typer.Option(
        help="Last day of the world, YYYY-MM-DD (default: yesterday, so relative date ranges "
             "like LAST_30_DAYS hold data).")] = None,
    fault: Annotated[list[str] | None, typer.Option(
        help="World fault to plant (repeatable): duplicate_tag, micro_in_column, tz_shift, "
             "broken_checkout.")] = None,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port_base: Annotated[int, typer.Option(
        help="First of seven consecutive ports (0: any free ports).")] = 0,
    state_dir: Annotated[Path, typer.Option(help="Where the TLS certificate is kept.")] = Path(
        "var/sandbox"),
    as_json: JsonFlag = False,
) -> None:
    """Serve the four platform simulators until stopped (Ctrl-C)."""
    from convsync.sandbox import server
    from convsync.sandbox.world import SCALES, World, WorldSpec

    if scale not in SCALES:
        raise typer.BadParameter(f"use one of {', '.join(SCALES)}", param_hint="--scale")
    default_days, default_campaigns = SCALES[scale]
    n_days = days or default_days
    last = dt.date.fromisoformat(end) if end else dt.date.today() - dt.timedelta(days=1)
    try:
        spec = WorldSpec(seed=seed, start=last - dt.timedelta(days=n_days - 1), days=n_days,
                         campaigns=campaigns or default_campaigns,
                         faults=frozenset(fault or ()), micro_upload_action=True,
                         as_of=dt.datetime.now(dt.UTC) if end is None else None)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    running = server.start(World(spec), state_dir.resolve(), host, port_base)
    secrets = (server.write_client_config(config_out, running) if config_out else None)
    summary = {"endpoints": running.endpoints, "config": str(config_out) if config_out else None,
               "secrets_file": str(secrets) if secrets else None, "ca_file": str(running.cert),
               "world": server.describe(running.world)}

    def human() -> None:
        table = Table(title="convsync sandbox", show_header=True)
        table.add_column("platform")
        table.add_column("endpoint")
        for name, endpoint in running.endpoints.items():
            table.add_row(name, endpoint)
        out.print(table)
        world = server.describe(running.world)
        out.print(f"world: {world['start']} .. {world['end']}, {world['campaigns']} campaigns, "
                  f"seed {world['seed']}, now {world['as_of']}")
        if config_out:
            out.print(f"client config: {config_out} (try: convsync config check {config_out})")
        out.print("serving until Ctrl-C")

    _emit(summary, as_json, human)
    sys.stdout.flush()
    _serve_until_stopped()
    running.stop()


def _serve_until_stopped() -> None:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(3600):
        pass


@app.command()
def discover(config: ConfigOption, as_json: JsonFlag = False) -> None:
    """List each platform's conversions and how they map.

    Connects to every enabled platform, lists the conversions it defines (Google Ads actions
    with their in-column settings, GA4 events, Meta action types, Klaviyo metrics), maps
    them to the config's definitions, stores them, and prints a ready-to-paste snippet for
    the unmapped ones."""
    from convsync import pipeline
    from convsync.store import Store

    client, secrets = _load(config)
    with Store.open(client.store_url()) as store:
        result = pipeline.discover(client, secrets, store)
    unmapped = [c for o in result.outcomes for c in o.unmapped]
    summary = result.summary() | {"store": client.store_url(),
                                  "snippet": pipeline.mapping_snippet(
                                      unmapped, {d.name for d in client.definitions()})}

    def human() -> None:
        out.print(_discovered_table(result))
        if unmapped:
            out.print(f"{len(unmapped)} unmapped; to map them, paste this at the end of {config} "
                      "(after its last section):")
            out.print(summary["snippet"], markup=False, highlight=False)
        out.print(f"stored in {client.store_url()}")

    _emit(summary, as_json, human)
    if result.failed:
        raise typer.Exit(Exit.PARTIAL if len(result.failed) < len(result.outcomes) else
                         Exit.FAILED)


def _discovered_table(result: Any) -> Table:
    """Each platform's conversions under its account, names never cut (they are what the
    user copies into the config)."""
    table = Table(title=f"Conversions defined on each platform: {result.client}",
                  box=box.SIMPLE_HEAD)
    table.add_column("conversion", overflow="fold", min_width=36)  # most of Meta's names
    table.add_column("maps to", overflow="fold", max_width=22)
    table.add_column("kind", min_width=5)
    table.add_column("in col", min_width=6)
    for outcome in result.outcomes:
        account = None
        for c in outcome.conversions:
            if c.account_id != account or account is None:
                account = c.account_id
                table.add_section()
                table.add_row(f"[bold]{c.platform.value}[/bold] {c.account_id}".rstrip())
            in_column = "" if c.in_column is None else ("yes" if c.in_column else "no")
            table.add_row(c.name, _maps_to(c), c.kind.value if c.kind else "", in_column)
        if outcome.error:
            table.add_section()
            table.add_row(f"[bold]{outcome.platform.value}[/bold]")
            table.add_row(f"[red]{escape(outcome.error)}[/red]")
    return table


def _maps_to(conversion: Any) -> str:
    """What a discovered conversion is to convsync."""
    if conversion.conversion:
        return str(conversion.conversion)
    if alias := conversion.settings.get("alias_of"):
        return f"alias of {alias}"
    if conversion.settings.get("upload_action_of"):
        return "convsync's upload action"
    return "[yellow]unmapped[/yellow]"


PlatformOption = Annotated[list[str] | None, typer.Option(
    "--platform", "-p", help="Only these platforms (repeatable): google_ads, ga4, meta, klaviyo.")]


@app.command("pull")
def pull_command(config: ConfigOption, platform: PlatformOption = None,
                 as_json: JsonFlag = False) -> None:
    """Pull new and late conversions since the last run.

    Pulls each enabled platform from its watermark, re-pulling the last lookback_days
    because platforms keep attributing conversions to past days; the watermark moves only
    once the rows are committed. Exit code 3 when a platform failed and the others did not."""
    _run_pull(config, platform, as_json)


@app.command()
def backfill(
    config: ConfigOption,
    since: Annotated[str, typer.Option(help="First day, YYYY-MM-DD.")],
    until: Annotated[str | None, typer.Option(help="Last day, YYYY-MM-DD (default: "
                                                   "yesterday).")] = None,
    platform: PlatformOption = None,
    restart: Annotated[bool, typer.Option(help="Pull the range again even if an earlier "
                                               "backfill of it completed.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Pull a date range; resumes where a killed run stopped.

    Progress is recorded after every committed batch, per --since, so running a backfill
    from the same day again (after a crash or a kill, or later with a later --until, or
    none) continues from the last complete day: days already stored are not pulled again."""
    first, last = _day(since, "--since"), _day(until, "--until") if until else None
    if last is not None and last < first:
        raise typer.BadParameter("--until is before --since", param_hint="--until")
    client, _ = _load(config)
    yesterday = dt.datetime.now(ZoneInfo(client.client.timezone)).date() - dt.timedelta(days=1)
    if first > yesterday:
        raise typer.BadParameter(
            f"{first} is not a complete day yet in {client.client.timezone} (a backfill pulls "
            "days that are over: `convsync pull` keeps the recent ones)", param_hint="--since")
    if last is not None and last > yesterday:
        console.print(f"--until {last} is not over yet: backfilling to {yesterday}",
                      highlight=False)
        last = yesterday
    _run_pull(config, platform, as_json, since=first, until=last, restart=restart)


def _run_pull(path: Path, platform: list[str] | None, as_json: bool, **window: Any) -> None:
    from convsync import pipeline
    from convsync.store import Store

    platforms = [_platform(p) for p in platform] if platform else None
    client, secrets = _load(path)
    with Store.open(client.store_url()) as store, _progress(as_json) as progress:
        result = pipeline.pull(client, secrets, store, platforms=platforms,
                               progress=progress, **window)
    summary = result.summary() | {"store": client.store_url()}

    def human() -> None:
        table = Table(title=f"{result.command} {result.client}: {result.since} .. {result.until}")
        for column in ("platform", "rows", "days", "requests", "unmapped", "errors"):
            table.add_column(column, justify="right" if column in ("rows", "days", "requests")
                             else "left")
        for p in result.platforms:
            s = p.summary()
            table.add_row(p.platform.value, f"{s['rows']:,}", f"{s['days']:,}",
                          f"{s['requests']:,}", ", ".join(s["unmapped"]),
                          escape("\n".join(s["errors"])))
        out.print(table)
        skipped = [(p.platform.value, why) for p in result.platforms for why in p.skipped]
        done = [name for name, why in skipped if "already complete" in why]
        if done:
            out.print(f"nothing to do for {', '.join(dict.fromkeys(done))}: "
                      f"{result.since} .. {result.until} is already stored (--restart pulls "
                      "it again)", highlight=False)
        for name, why in skipped:
            if "already complete" not in why:
                out.print(f"{name}: {why}", highlight=False, markup=False)
        for warning in result.warnings:
            console.print(f"[yellow]warning[/yellow] {warning}", highlight=False)
        unmapped = sorted({(p.platform, n) for p in result.platforms for n in p.unmapped})
        if unmapped:
            out.print("Unmapped conversions are stored; map them with `convsync discover "
                      f"--config {path}` (it prints a ready-to-paste snippet).")
        out.print(f"stored in {client.store_url()}")

    _emit(summary, as_json, human)
    if result.failed:
        raise typer.Exit(Exit.PARTIAL if len(result.failed) < len(result.platforms) else
                         Exit.FAILED)


@app.command("import")
def import_command(
    config: ConfigOption,
    files: Annotated[list[Path], typer.Argument(help="CSV or JSON Lines files of offline "
                                                     "outcomes (see docs/crm-files.md).")],
    timezone: Annotated[str | None, typer.Option(
        help="Time zone of times written without offset (default: [crm] timezone; without "
             "one, such rows are errors).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Import CRM outcomes from CSV / JSON Lines files.

    Offline outcomes (qualified leads, won deals) with their identifiers; emails and phones
    are hashed on arrival. A bad row is reported with its line number and skipped, good rows
    load, and importing a file again adds nothing twice. Exit code 3 when rows were bad."""
    from convsync import pipeline
    from convsync.model import ConversionMap
    from convsync.sources import crm
    from convsync.store import Store

    client, _ = _load(config)
    zone = timezone or (client.crm.timezone if client.crm else None)
    try:
        crm.read_zone(zone)  # checked before a run starts
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--timezone") from None
    mapping = ConversionMap(client.definitions())
    reports = []
    with Store.open(client.store_url()) as store:
        run = store.start_run(client.client.name, "import")
        try:
            for file in files:
                reports.append(crm.import_file(store, file, mapping, zone,
                                               default_currency=client.client.currency))
        except (crm.CrmFileError, OSError) as error:
            store.finish_run(run, "failed", {"error": str(error)})
            console.print(f"[red]error[/red] {error}", highlight=False)
            raise typer.Exit(Exit.BAD_INPUT) from None
        summary = {"files": [r.summary() for r in reports], "store": client.store_url()}
        store.finish_run(run, "partial" if any(r.error_count for r in reports) else "ok",
                         summary)
    unmapped = [c for r in reports for c in r.unmapped_conversions()]
    summary["snippet"] = pipeline.mapping_snippet(unmapped, {d.name for d in client.definitions()})

    def human() -> None:
        for report in reports:
            out.print(f"{report.path}: {report.events} loaded, {report.error_count} bad of "
                      f"{report.rows} rows")
            for error in report.errors[:20]:
                console.print(f"  {report.path}:{error.line}: {error.reason}", highlight=False,
                              markup=False)
            if report.error_count > 20:
                console.print(f"  ... and {report.error_count - 20} more (--json lists "
                              f"{len(report.errors)})")
        if unmapped:
            out.print("Unmapped outcomes are stored; to map them, paste into the config:")
            out.print(summary["snippet"], markup=False, highlight=False)

    _emit(summary, as_json, human)
    if any(r.error_count for r in reports):
        raise typer.Exit(Exit.PARTIAL)


@app.command("values")
def values_command(
    config: ConfigOption,
    as_of: Annotated[str | None, typer.Option(
        "--as-of", help="Replay as of the end of this day in the client's time zone, "
                        "YYYY-MM-DD (default: now; a replay is not stored).")] = None,
    by: Annotated[str, typer.Option(
        "--by", help="overall: one row per micro conversion; segment: each segment's row "
                     "too (campaign, source or client, as [valuation] segment_by says).")
    ] = "overall",
    wide: Annotated[bool, typer.Option(
        "--wide", help="Every figure of every segment's row, for a wide terminal or a file.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Estimate what each micro conversion is worth, and whether to upload it.

    From the stored journeys (pull or backfill first): per micro conversion, the upload
    value (what one event uploads: ladder steps share the sale they lead to, so their
    uploads add up to it once), the expected macro value of one person who did it (a
    diagnostic), its lift over comparable people who did not do it with its 90% range, how
    many did it, the share of buyers who did it first, and advice. Under the table: the
    history the figures rest on, each reason as a footnote, and the backfill to run when
    the history is too short. Values are stored with the day they were computed (the upload
    values are what a push sends); a replay with --as-of is shown, not stored."""
    from convsync import pipeline, values_table
    from convsync.store import Store

    if by not in ("overall", "segment"):
        raise typer.BadParameter("use overall or segment", param_hint="--by")
    client, _ = _load(config)
    zone = ZoneInfo(client.client.timezone)
    now = dt.datetime.now(dt.UTC)
    moment = now
    if as_of:
        day = _day(as_of, "--as-of")
        if day > now.astimezone(zone).date():
            raise typer.BadParameter(f"{day} is in the future (in {client.client.timezone})",
                                     param_hint="--as-of")
        moment = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), zone).astimezone(
            dt.UTC)
    with Store.open(client.store_url()) as store:
        summary = pipeline.values(client, store, min(moment, now), keep=as_of is None)

    def human() -> None:
        if not summary["values"]:
            before = f" before the end of {as_of}" if as_of else ""
            out.print(f"no journeys stored{before}: run `convsync backfill --config {config} "
                      "--since YYYY-MM-DD` (or `convsync pull`) first", highlight=False)
            return
        when = f"the end of {as_of}" if as_of else f"{now.astimezone(zone):%Y-%m-%d %H:%M}"
        replay = "; a replay, not stored" if as_of else ""
        out.print(f"{client.client.name}: micro-conversion values in "
                  f"{client.client.currency}, as of {when} ({client.client.timezone}{replay})",
                  highlight=False)
        for line in values_table.history_lines(summary, str(config)):
            out.print(line, highlight=False, soft_wrap=line.startswith(values_table.COMMAND))
        notes = values_table.Footnotes()
        view = "wide" if wide else by if by == "segment" else "overview"
        table = (values_table.wide(summary, notes) if wide else
                 values_table.by_segment(summary, notes) if by == "segment" else
                 values_table.overview(summary, notes))
        out.print(table, width=max(out.width, 170) if wide else None)
        for line in [values_table.withheld_line(summary, listed=view != "overview"),
                     *values_table.legend(summary, view)]:
            if line:
                out.print(line, highlight=False)
        out.print(notes.grid(), highlight=False)

    _emit(summary, as_json, human)


DESTINATIONS = ("google_ads", "meta", "klaviyo")
DESTINATION_NAMES = {"google_ads": "Google Ads", "meta": "Meta", "klaviyo": "Klaviyo"}
VOIDED_KEPT = {
    "google_ads": "restated to their voided_value: the Data Manager API cannot retract a "
                  "conversion (each still counts once in Google Ads)",
    "meta": "already sent: the Conversions API can neither retract nor restate an event, so "
            "Meta keeps it",
    "klaviyo": "already sent: Klaviyo keeps the first event of a unique id, so the profile "
               "keeps it",
}


@app.command("push")
def push_command(
    config: ConfigOption,
    destination: Annotated[list[str] | None, typer.Option(
        help="Where to push (repeatable): google_ads (the Data Manager API), meta (the "
             "Conversions API), klaviyo (events on the people's profiles). Default: every "
             "destination the config names uploads for ([google_ads] upload_actions, [meta] "
             "upload_events, [klaviyo] upload_metrics).")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print the plan (per conversion: events, total value, refusals by "
                          "reason, a sample) and ask Google to validate it; nothing is sent "
                          "and the ledger is unchanged.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Send the upload values and CRM outcomes to Google Ads, Meta and Klaviyo, exactly once.

    From the stored journeys, the upload values `convsync values` stored and the CRM
    outcomes: each event gets its ledger row (with a deterministic dedupe key: Google's
    transaction id, Meta's event id, Klaviyo's unique id) before it is sent; events a
    platform would refuse are counted by reason, Google events whose click is under 6 hours
    old are held for a later run; a run killed half-way is finished by the next one, which
    resends only what may not have arrived, under the same keys. Then asks Google what it did
    with earlier requests. Exit code 3 when some events were rejected."""
    from convsync import push
    from convsync.locks import Busy
    from convsync.store import Store

    client, secrets = _load(config)
    chosen = _destinations(client, destination)
    results = []
    with Store.open(client.store_url()) as store:
        for name in chosen:
            with _push_progress(as_json) as progress:
                try:
                    results.append(push.PUSHES[Platform(name)](
                        client, secrets, store, dry_run=dry_run, progress=progress))
                except Busy as busy:
                    console.print(f"skipped: {busy}", highlight=False)
                    raise typer.Exit(Exit.OK) from None
    summary = {"client": client.client.name, "dry_run": dry_run,
               "destinations": {r.destination.value: r.summary() for r in results}}

    def human() -> None:
        for result in results:
            _print_push(client, result, dry_run)

    _emit(summary, as_json, human)
    if any(r.errors or r.plan.problems or r.failed for r in results):
        raise typer.Exit(Exit.PARTIAL)


def _destinations(client: ClientConfig, named: list[str] | None) -> list[str]:
    """The destinations to push to: those named, else those the config names uploads for."""
    for name in named or ():
        if name not in DESTINATIONS:
            raise typer.BadParameter(f"unknown destination {name!r}: use "
                                     f"{', '.join(DESTINATIONS)}", param_hint="--destination")
    if named:
        return list(dict.fromkeys(named))
    from convsync.push import configured_destinations

    configured = [p.value for p in configured_destinations(client)]
    if not configured:
        raise typer.BadParameter(
            "the config names no uploads: set [google_ads] upload_actions, [meta] "
            "upload_events or [klaviyo] upload_metrics", param_hint="--config")
    return configured


def _print_push(client: ClientConfig, result: Any, dry_run: bool) -> None:
    """One destination's push: its plan per conversion, refusals, and what was sent."""
    name = result.destination.value
    title = "Push plan (dry run: nothing sent)" if dry_run else "Push"
    table = Table(title=f"{title}, {client.client.name}, {DESTINATION_NAMES[name]} "
                        f"({client.client.currency})", box=box.SIMPLE_HEAD)
    columns = ("conversion", "events", "new" if dry_run else "sent now", "value", "held",
               "not sent")
    for column in columns:
        table.add_column(column, justify="left" if column == "conversion" else "right",
                         no_wrap=True)
    for action in result.plan.actions.values():
        done = result.by_action[action.conversion]
        now = action.events - done["in_ledger"] if dry_run else done["sent"]
        table.add_row(action.conversion, f"{action.events:,}", f"{now:,}",
                      f"{action.value:,.2f}", f"{action.held:,}",
                      f"{sum(action.refused.values()):,}")
    out.print(table)
    for action in result.plan.actions.values():
        target = (action.action_id if action.action_name in ("", action.action_id)
                  else f"{action.action_id} {action.action_name}")
        out.print(f"  {action.conversion} goes to {target}", highlight=False, markup=False)
    out.print("events: all the plan holds (sent before or not); not sent: what the platform "
              "would refuse or convsync does not advise, by reason below", highlight=False)
    for action in result.plan.actions.values():
        for why, count in action.refused.most_common():
            out.print(f"  {action.conversion}: {count:,} not sent: {why}", highlight=False,
                      markup=False)
        if action.retracting:
            out.print(f"  {action.conversion}: {action.retracting:,} voided by the CRM, to "
                      "retract through the Google Ads API (retraction_accounts)",
                      highlight=False)
        if action.voided:
            out.print(f"  {action.conversion}: {action.voided:,} voided by the CRM, "
                      f"{VOIDED_KEPT[name]}", highlight=False)
    for why, count in result.failed.most_common():
        out.print(f"  {count:,} failed: {why}", highlight=False, markup=False)
    if not dry_run:
        requests = ", ".join(f"{n:,} {method}" for method, n in result.requests.items())
        restated = (f", restated {result.restated:,}, retracted {result.retracted:,}"
                    if name == "google_ads" else "")
        out.print(f"sent {result.sent:,} ({result.resent:,} resent), new in the ledger "
                  f"{result.planned_new:,}{restated}, held {result.held:,}; requests: "
                  f"{requests or 'none'}", highlight=False)
    for problem in [*result.plan.problems, *result.errors]:
        console.print(f"[yellow]problem[/yellow] {name}: {escape(problem)}", highlight=False)


@app.command("sync")
def sync_command(
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="One client's config file (TOML).", dir_okay=False)] = None,
    config_dir: Annotated[Path | None, typer.Option(
        "--config-dir", help="Every client config (*.toml) in this folder.",
        file_okay=False)] = None,
    stage: Annotated[list[str] | None, typer.Option(
        help="Only these stages (repeatable): pull, audit, reconcile, values, push, report. "
             "Default: all, in that order.")] = None,
    jobs: Annotated[int, typer.Option(
        help="Clients synced at once, each in its own process (2 suits a 2-core VM: most "
             "of a sync waits on the platforms).", min=1, max=32)] = 2,
    wait: Annotated[bool, typer.Option(
        "--wait", help="Wait for a client another run holds, instead of skipping it.")] = False,
    reports: Annotated[Path, typer.Option(
        "--out", help="Where each client's report goes (a folder per client).")] = Path(
        "var/reports"),
    json_logs: Annotated[bool, typer.Option(
        "--json-logs", help="Log one JSON object a line on stderr (time, run, client, stage, "
                            "counts, seconds, errors), secrets redacted.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """The main job: for each client, pull -> audit -> reconcile -> values -> push -> report.

    Each client runs under its own lock: an overlapping run (cron) skips it with one line, or
    waits with --wait. One client's or one stage's failure never stops the others; each
    client's run record keeps every stage's counts and errors (`convsync runs`). Exit code 0
    when every client succeeded (or was skipped: another run has it), 3 when some did, 1
    when none did."""
    from convsync import sync

    if config is None and config_dir is None:
        raise typer.BadParameter("name a client: --config FILE or --config-dir DIR",
                                 param_hint="--config")
    unknown = sorted(set(stage or ()) - set(sync.STAGES))
    if unknown:
        raise typer.BadParameter(f"unknown stage {', '.join(unknown)}: use "
                                 f"{', '.join(sync.STAGES)}", param_hint="--stage")
    configs = list(sync.client_configs(config, config_dir))
    if not configs:
        raise typer.BadParameter(f"no *.toml client config in {config_dir}",
                                 param_hint="--config-dir")
    if json_logs:
        from convsync.logs import use_json_lines

        use_json_lines()

    def done(client: Any) -> None:
        if not as_json and not json_logs:
            console.print(f"{client.client or client.config}: {client.status}"
                          + (f" ({client.message})" if client.message else ""),
                          highlight=False, markup=False)

    results = sync.sync_clients(configs, stages=stage or sync.STAGES, jobs=jobs, wait=wait,
                                out_dir=reports, json_logs=json_logs, on_done=done)
    summary = {"clients": [r.summary() for r in results]}

    def human() -> None:
        table = Table(title="Sync", box=box.SIMPLE_HEAD)
        for column in ("client", "status", "pulled", "sent", "not ok", "report"):
            table.add_column(column, overflow="fold",
                             justify="right" if column in ("pulled", "sent") else "left")
        for r in results:
            counts = {s.stage: s.counts for s in r.stages}
            pulled = sum(p.get("rows", 0) for p in counts.get("pull", {}).values()
                         if isinstance(p, dict))
            sent = sum(d.get("sent", 0) for d in counts.get("push", {}).values()
                       if isinstance(d, dict))
            not_ok = ", ".join(f"{s.stage} {s.status}" for s in r.stages if s.status != "ok")
            table.add_row(r.client or r.config, r.status, f"{pulled:,}" if r.stages else "",
                          f"{sent:,}" if "push" in counts else "", not_ok or r.message,
                          r.report)
        out.print(table)
        out.print("pulled: rows stored; sent: uploads sent (to every destination); not ok: "
                  "the stages that were not, with their problems below", highlight=False)
        for r in results:
            for s in r.stages:
                for error in s.errors:
                    console.print(f"[yellow]problem[/yellow] {escape(r.client)} {s.stage}: "
                                  f"{escape(error)}", highlight=False)

    _emit(summary, as_json, human)
    succeeded = [r for r in results if r.status in ("ok", "skipped")]
    if len(succeeded) < len(results):
        raise typer.Exit(Exit.PARTIAL if any(r.status != "failed" for r in results)
                         else Exit.FAILED)


@app.command("doctor")
def doctor_command(config: ConfigOption, as_json: JsonFlag = False) -> None:
    """Check what the main job (`convsync sync`) needs: each enabled platform's credentials
    and access (the accounts it pulls, the actions, pixel and scopes it pushes to) and the
    store, each with ok or the problem and its fix. Exit 0 when all is well, 2 when something
    is missing or wrong."""
    from convsync import doctor

    try:
        client = load_config(config)
    except ConfigError as error:
        console.print(str(error), highlight=False)
        raise typer.Exit(Exit.BAD_INPUT) from None
    secrets, secrets_checks = doctor.load_secrets_checked(client)
    install_redaction(Redactor(secrets.values()))
    report = doctor.run(client, secrets, secrets_checks)

    def human() -> None:
        out.print(doctor.table(report))
        out.print(doctor.verdict(report), highlight=False)

    _emit(report.summary(), as_json, human)
    raise typer.Exit(Exit.OK if report.ok else Exit.BAD_INPUT)


@app.command("runs")
def runs_command(
    config: ConfigOption,
    limit: Annotated[int, typer.Option(help="How many of the latest runs.", min=1)] = 20,
    as_json: JsonFlag = False,
) -> None:
    """The client's recent runs (pull, backfill, push, sync, ...): when, how long, and how
    each ended; a run left running by a process that is gone shows as abandoned."""
    from convsync.store import Store

    client, _ = _load(config)
    with Store.open(client.store_url()) as store:
        runs = store.recent_runs(client.client.name, limit=limit)
    summary = {"client": client.client.name, "runs": [
        {"id": r.id, "command": r.command, "started_at": r.started_at,
         "finished_at": r.finished_at, "status": r.status} for r in runs]}

    def human() -> None:
        table = Table(title=f"Runs, {client.client.name}", box=box.SIMPLE_HEAD)
        for column in ("id", "command", "started (UTC)", "took", "status"):
            table.add_column(column)
        for r in runs:
            took = (f"{(r.finished_at - r.started_at).total_seconds():,.0f} s"
                    if r.finished_at else "")
            table.add_row(str(r.id), r.command, f"{r.started_at:%Y-%m-%d %H:%M}", took,
                          r.status)
        out.print(table)

    _emit(summary, as_json, human)


@app.command("uploads")
def uploads_command(
    config: ConfigOption,
    by_day: Annotated[bool, typer.Option(
        "--by-day", help="One row per action, day of the event and status.")] = False,
    refresh: Annotated[bool, typer.Option(
        "--refresh", help="First ask Google now what it did with the requests still "
                          "processing (push asks from 30 minutes after each send).")] = False,
    as_json: JsonFlag = False,
) -> None:
    """The upload ledger: per destination and conversion action, how many uploads are
    planned, held, sent, accepted or rejected (with the reason), their value and resends;
    then what Google said of its requests, its processing errors by reason and what to fix
    for each (Meta and Klaviyo say nothing after taking a request: it is final)."""
    from convsync import push
    from convsync.sinks.google_ads.datamanager import PROCESSING_FIXES
    from convsync.store import Store

    client, secrets = _load(config)
    with Store.open(client.store_url()) as store:
        if refresh:
            for error in push.refresh_google_ads(client, secrets, store).errors:
                console.print(f"[yellow]problem[/yellow] {escape(error)}", highlight=False)
        ledgers = {name: store.ledger(client.client.name, Platform(name))
                   for name in DESTINATIONS}
        requests = store.upload_request_rows(client.client.name, Platform.GOOGLE_ADS)
    rows = ledgers["google_ads"]
    summary = {"client": client.client.name, **ledgers, "requests": requests}

    def human() -> None:
        if not any(ledgers.values()):
            out.print("the ledger is empty: nothing was planned yet (`convsync push --dry-run` "
                      "says what would go, and why the rest would not)")
            return
        for name in ("meta", "klaviyo"):
            if ledgers[name]:
                out.print(_ledger_table(f"Uploads to {DESTINATION_NAMES[name]}, "
                                        f"{client.client.name}", ledgers[name], by_day))
        if not rows:
            return
        out.print(_ledger_table(f"Uploads to Google Ads, {client.client.name}", rows, by_day))
        states = Counter(r["status"] for r in requests)
        errors: Counter[str] = Counter()
        for r in requests:
            for destination in r["detail"].get("destinations", []):
                errors.update(destination.get("errors", {}))
        out.print(f"Requests: {len(requests):,} ("
                  + ", ".join(f"{n:,} {state}" for state, n in states.most_common()) + ")",
                  highlight=False)
        if any(r["reason"] == push.PARTLY_FAILED for r in rows):
            out.print(f"{push.PARTLY_FAILED}: Google says how many events of a request failed "
                      "and why, never which: the uploads stay sent, the reasons are these:",
                      highlight=False)
        for reason, count in errors.most_common():
            fix = PROCESSING_FIXES.get(reason, "see Google's Data Manager error reasons")
            out.print(f"  {reason}: {count:,} events. {fix}", highlight=False)

    _emit(summary, as_json, human)


def _ledger_table(title: str, rows: list[dict[str, Any]], by_day: bool) -> Table:
    """A destination's ledger summed per action, status and reason (and day)."""
    table = Table(title=title, box=box.SIMPLE_HEAD)
    columns = ("action", *(("day",) if by_day else ()), "status", "uploads", "value", "resent",
               "reason")
    for column in columns:
        table.add_column(column, justify="right" if column in ("uploads", "value", "resent")
                         else "left", overflow="fold")
    for (action, day, status, reason), (count, value, resends) in _ledger_cells(
            rows, by_day).items():
        table.add_row(action, *((day,) if by_day else ()), status, f"{count:,}",
                      f"{value:,.2f}", f"{resends:,}", reason)
    return table


def _ledger_cells(rows: list[dict[str, Any]], by_day: bool
                  ) -> dict[tuple[str, str, str, str], tuple[int, float, int]]:
    """The ledger's rows summed per action, status and reason (and day)."""
    cells: dict[tuple[str, str, str, str], tuple[int, float, int]] = {}
    for r in rows:
        key = (f"{r['conversion']} ({r['conversion_action']})", r["day"] if by_day else "",
               r["status"], r["reason"] or "")
        count, value, resends = cells.get(key, (0, 0.0, 0))
        cells[key] = (count + r["uploads"], value + r["value"], resends + (r["resends"] or 0))
    return cells


SinceOption = Annotated[str | None, typer.Option(
    help="First day, YYYY-MM-DD (default: the first stored day).")]
UntilOption = Annotated[str | None, typer.Option(
    help="Last day, YYYY-MM-DD (default: the last stored day).")]


@app.command()
def audit(config: ConfigOption, as_json: JsonFlag = False) -> None:
    """Check what the Google Ads Conversions column counts.

    For every stored conversion action (run discover or pull first): its kind (from the
    config, else inferred from its category and name, with the reason), whether it counts in
    column, and findings with their evidence and fix: micro conversions in column, macro
    conversions left out, two primary actions counting the same events, actions with no
    conversions in [reconcile] inactive_days, convsync's micro uploads primary without opt-in.
    Exit code 3 when there is an error or a warning."""
    from convsync import reconcile
    from convsync.store import Store

    client, _ = _load(config)
    with Store.open(client.store_url()) as store:
        result = reconcile.load_audit(client, store)
    summary = {"client": client.client.name, "store": client.store_url(),
               **reconcile.as_data(result)}

    def human() -> None:
        title = "Google Ads conversion actions"
        if result.window:
            title += f", conversions {result.window[0]} .. {result.window[1]}"
        table = Table(title=title, box=box.SIMPLE_HEAD)
        for column in ("account", "action", "kind", "col.", "conv.", "value", "last"):
            table.add_column(column, justify="right" if column in ("conv.", "value")
                             else "left", no_wrap=column != "action")
        for a in result.actions:
            last = a.last_conversion
            table.add_row(_account(a.account_id), a.name, a.label,
                          "yes" if a.in_column else "no", f"{a.conversions:,g}",
                          f"{a.value:,.0f}", f"{last:%m-%d}" if last else "")
        out.print(table)
        out.print("col.: counted in the Conversions column; conv. and value: in the window, by "
                  "click date; last: the last day with a conversion", highlight=False)
        if any(a.guessed for a in result.actions):
            out.print("? kind guessed from the name or category: map the action in a "
                      "[[conversions]] entry (`convsync discover` prints one)", markup=False,
                      highlight=False)
        _print_findings(result.findings)
        for note in result.notes:
            out.print(note, style="dim", highlight=False)

    _emit(summary, as_json, human)
    if any(f.severity != "info" for f in result.findings):
        raise typer.Exit(Exit.PARTIAL)


@app.command("reconcile")
def reconcile_command(config: ConfigOption, since: SinceOption = None,
                      until: UntilOption = None, as_json: JsonFlag = False) -> None:
    """Compare each macro conversion across platforms, and diagnose the funnel.

    Per day, campaign and macro conversion, each platform's count and value beside the
    reference's ([reconcile] reference, GA4 by default) with the likely cause of a gap
    (click vs conversion date, days still filling, time zones, a duplicate tag, attribution
    windows); each platform over the settled days against [reconcile] tolerance; then the
    funnel along the ladder. Exit code 3 when something is beyond tolerance (a discrepancy,
    days shifted by a time zone, a funnel step that collapsed)."""
    from convsync import reconcile
    from convsync.store import Store

    client, _ = _load(config)
    with Store.open(client.store_url()) as store:
        first, last = _days_between(reconcile.stored_range(store), since, until)
        result, funnel = reconcile.load_reconciliation(client, store, first, last)
    findings = result.findings + (funnel.findings if funnel else [])
    summary = {"client": client.client.name, **reconcile.as_data(result),
               "funnel": reconcile.as_data(funnel)}

    def human() -> None:
        table = Table(title=f"{', '.join(sorted({c.conversion for c in result.comparisons}))}"
                            f": each platform against {result.reference}, settled days")
        for column in ("campaign", "platform", "days", "count", "reference", "ratio", "status",
                       "likely causes"):
            table.add_column(column)
        for c in result.comparisons:
            ratio = "" if c.ratio is None else f"{c.ratio:.2f}x"
            status = "[red]beyond tolerance[/red]" if c.beyond_tolerance else "[green]ok[/green]"
            table.add_row(c.campaign, c.platform, f"{c.first} .. {c.last}", f"{c.count:g}",
                          f"{c.reference_count:g}", ratio, status,
                          ", ".join(cause.code for cause in c.causes))
        out.print(table)
        for c in result.comparisons:
            if c.campaign == reconcile.ALL:
                out.print(f"{c.conversion}, {c.platform} against {c.reference}:",
                          style="bold", highlight=False)
                for cause in c.causes:
                    out.print(f"  - {cause.text}", highlight=False, markup=False)
        statuses: dict[str, int] = {}
        for row in result.days:
            statuses[row.status] = statuses.get(row.status, 0) + 1
        out.print(f"{len(result.days)} day rows: " + ", ".join(
            f"{n} {status}" for status, n in sorted(statuses.items())) + " (--json lists them)")
        if funnel:
            out.print(_funnel_table(funnel))
        _print_findings(findings)
        for note in result.notes:
            out.print(note, style="dim", highlight=False)

    _emit(summary, as_json, human)
    if any(f.alert for f in findings):
        raise typer.Exit(Exit.PARTIAL)


@app.command()
def report(config: ConfigOption,
           out_dir: Annotated[Path, typer.Option("--out", help="Directory to write "
                                                 "report.html and report.json into.")],
           since: SinceOption = None, until: UntilOption = None,
           as_json: JsonFlag = False) -> None:
    """Write the HTML report (and the same data as JSON beside it).

    One self-contained file that works offline: the audit, the discrepancy table, the funnel
    with its drop-offs per segment, macro vs micro per platform, and the micro-conversion
    values, with charts. Exit code 3 when something in it is beyond tolerance."""
    from convsync.report import build_report, write_report
    from convsync.store import Store

    client, _ = _load(config)
    with Store.open(client.store_url()) as store:
        first = _day(since, "--since") if since else None
        last = _day(until, "--until") if until else None
        result = build_report(client, store, first, last)
    html, data = write_report(result, out_dir)
    summary = {"client": client.client.name, "html": str(html), "json": str(data),
               "since": result.since.isoformat(), "until": result.until.isoformat(),
               "findings": len(result.findings), "alerts": len(result.alerts)}

    def human() -> None:
        _print_findings(result.findings)
        out.print(f"report: {html}", highlight=False)
        out.print(f"data:   {data}", highlight=False)

    _emit(summary, as_json, human)
    if result.alerts:
        raise typer.Exit(Exit.PARTIAL)


def _days_between(stored: tuple[dt.date, dt.date] | None, since: str | None,
                  until: str | None) -> tuple[dt.date, dt.date]:
    """The --since / --until days, each defaulting to the stored range's end."""
    if stored is None and not (since and until):
        console.print("[red]error[/red] the store holds no daily stats: run convsync pull "
                      "first", highlight=False)
        raise typer.Exit(Exit.FAILED)
    first = _day(since, "--since") if since else stored[0] if stored else dt.date.min
    last = _day(until, "--until") if until else stored[1] if stored else dt.date.max
    if last < first:
        raise typer.BadParameter("--until is before --since", param_hint="--until")
    return first, last


def _print_findings(findings: list[Any]) -> None:
    from rich.markup import escape

    colours = {"error": "red", "warning": "yellow", "info": "blue"}
    for f in findings:
        colour = colours[f.severity]
        flag = " [bold](beyond tolerance)[/bold]" if f.alert else ""
        where = f" (account {_account(f.account)})" if f.account else ""
        out.print(f"[{colour}]{f.severity}[/{colour}] [bold]{escape(f.subject)}[/bold]{where}"
                  f"{flag}: {escape(f.message)}", highlight=False)
        out.print(f"  fix: {escape(f.fix)}", style="green", highlight=False)


def _account(account_id: str) -> str:
    """A Google Ads customer id as Google Ads shows it (123-456-7890)."""
    if len(account_id) == 10 and account_id.isdigit():
        return f"{account_id[:3]}-{account_id[3:6]}-{account_id[6:]}"
    return account_id


def _funnel_table(funnel: Any) -> Table:
    table = Table(title=f"Funnel ({funnel.source}, {funnel.timezone}): "
                        f"{' -> '.join(funnel.ladder)}")
    table.add_column("segment")
    for step in funnel.ladder:
        table.add_column(step, justify="right")
    table.add_column("biggest loss")
    for f in [funnel.overall, *funnel.by_source]:
        cells = [f"{s.count:,.0f}" + (f" ({s.rate:.0%})" if s.rate is not None else "")
                 for s in f.steps]
        table.add_row(f.segment, *cells, f.biggest_loss or "")
    return table


def _platform(name: str) -> Platform:
    try:
        return Platform(name)
    except ValueError:
        raise typer.BadParameter(f"unknown platform {name!r}; use google_ads, ga4, meta or "
                                 "klaviyo", param_hint="--platform") from None


def _day(text: str, option: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a date like 2026-10-01",
                                 param_hint=option) from None


class _RichProgress:
    """A rich progress bar per stream, on a terminal only."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("days"), console=console, transient=False)
        self.tasks: dict[str, Any] = {}

    def start(self, label: str, days: int) -> None:
        self.tasks[label] = self.bar.add_task(label, total=days)

    def advance(self, label: str, done_days: int) -> None:
        self.bar.update(self.tasks[label], completed=done_days)


@contextmanager
def _progress(quiet: bool) -> Iterator[Any]:
    if quiet or not console.is_terminal:
        yield None
        return
    progress = _RichProgress()
    with progress.bar:
        yield progress


@contextmanager
def _push_progress(quiet: bool) -> Iterator[Any]:
    """A status line of a push's figures so far, on a terminal only."""
    if quiet or not console.is_terminal:
        yield None
        return
    with console.status("planning...") as status:
        def show(result: Any) -> None:
            requests = sum(result.requests.values())
            status.update(f"new in the ledger {result.planned_new:,}, sent {result.sent:,} "
                          f"in {requests:,} request{'s' * (requests != 1)}")
        yield show


def _load(path: Path) -> tuple[ClientConfig, Secrets]:
    """The config and its secrets, or exit 2 naming each problem."""
    try:
        config = load_config(path)
        secrets = load_secrets(config)
    except ConfigError as error:
        console.print(str(error), highlight=False)
        raise typer.Exit(Exit.BAD_INPUT) from None
    install_redaction(Redactor(secrets.values()))
    return config, secrets


if __name__ == "__main__":  # pragma: no cover
    app()
