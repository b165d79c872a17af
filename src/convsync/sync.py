"""The main job, `convsync sync`: for each client, pull -> audit -> reconcile -> values -> push
(which reads back Google's upload statuses) -> report, with one run record in the store.

One client's failure, or one stage's, never stops the others: each stage's outcome (ok,
partial, failed, skipped) is kept with its counts and its errors, each with what to fix. A
client runs under its lock (``locks.client_lock``: a file beside a SQLite store, an advisory
lock on PostgreSQL, both gone with the process), so a second sync of the same client (an
overlapping cron run) skips it with one line, or waits for it (``wait``). A sync killed
half-way leaves its run record ``running``; the next run marks it abandoned and finishes the
work from the ledger and the watermarks. Clients run in parallel in worker processes
(``jobs``), each holding one client at a time, so memory stays that of the largest client.
"""

from __future__ import annotations

import datetime as dt
import logging
import multiprocessing
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from convsync.errors import Busy, ConvsyncError
from convsync.logs import use_json_lines

log = logging.getLogger(__name__)

STAGES = ("pull", "audit", "reconcile", "values", "push", "report")
"""The stages of a sync, in the order they run."""
WORST = {"ok": 0, "skipped": 1, "partial": 2, "failed": 3}


@dataclass
class StageOutcome:
    """What one stage of one client's sync did."""

    stage: str
    status: str = "ok"
    """ok, partial (some of it failed: see errors), failed, or skipped."""
    seconds: float = 0.0
    counts: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


@dataclass
class ClientSync:
    """One client's sync: its stages, and where its report went."""

    config: str
    client: str = ""
    status: str = "ok"
    """ok, partial, failed, or skipped (locked by another run)."""
    run_id: int | None = None
    stages: list[StageOutcome] = field(default_factory=list)
    report: str = ""
    message: str = ""

    def summary(self) -> dict[str, Any]:
        return asdict(self)


def sync_clients(configs: Sequence[Path], *, stages: Sequence[str] = STAGES, jobs: int = 2,
                 wait: bool = False, out_dir: Path = Path("var/reports"),
                 json_logs: bool = False,
                 on_done: Callable[[ClientSync], None] = lambda c: None) -> list[ClientSync]:
    """Sync each client config, ``jobs`` at a time (in worker processes when more than one),
    telling ``on_done`` of each as it ends; the results in the order of ``configs``."""
    if jobs <= 1 or len(configs) <= 1:
        done = []
        for path in configs:
            done.append(sync_client(path, stages=stages, wait=wait, out_dir=out_dir))
            on_done(done[-1])
        return done
    results: dict[Path, ClientSync] = {}
    context = multiprocessing.get_context("spawn")  # never fork a process gRPC has touched
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context,
                             initializer=_worker_logging,
                             initargs=(logging.getLogger().level, json_logs)) as pool:
        futures = {pool.submit(sync_client, path, stages=tuple(stages), wait=wait,
                               out_dir=out_dir): path for path in configs}
        for future in as_completed(futures):
            path = futures[future]
            try:
                results[path] = future.result()
            except Exception as error:  # the worker itself died (killed, out of memory)
                results[path] = ClientSync(str(path), status="failed",
                                           message=f"the worker process died: {error}")
            on_done(results[path])
    return [results[path] for path in configs]


def _worker_logging(level: int, json_logs: bool) -> None:
    """A worker process logs as the parent does (its handlers are not inherited)."""
    if json_logs:
        use_json_lines(level)
    else:
        logging.basicConfig(level=level, format="%(message)s")


def sync_client(path: Path, *, stages: Sequence[str] = STAGES, wait: bool = False,
                out_dir: Path = Path("var/reports")) -> ClientSync:
    """One client's sync (see the module): never raises; what went wrong is in the result."""
    from convsync.locks import client_lock
    from convsync.redact import Redactor
    from convsync.redact import install as install_redaction
    from convsync.settings import load_config, load_secrets
    from convsync.store import Store

    result = ClientSync(str(path))
    try:
        config = load_config(path)
        secrets = load_secrets(config)
    except ConvsyncError as error:
        result.status, result.message = "failed", str(error)
        return result
    install_redaction(Redactor(secrets.values()))
    result.client = config.client.name
    try:
        with Store.open(config.store_url()) as store:
            try:
                with client_lock(store, config.client.name, "sync",
                                 wait=None if wait else 0.0):
                    _run_stages(config, secrets, store, stages, out_dir, result)
            except Busy as busy:  # recorded too: every run of a client accounts for itself
                result.status, result.message = "skipped", f"skipped: {busy}"
                result.run_id = store.start_run(config.client.name, "sync")
                store.finish_run(result.run_id, result.status, result.summary())
    except ConvsyncError as error:
        result.status, result.message = "failed", str(error)
    return result


def _run_stages(config: Any, secrets: Any, store: Any, stages: Sequence[str], out_dir: Path,
                result: ClientSync) -> None:
    """The stages asked for, in order, under the client's lock, in one run record."""
    result.run_id = store.start_run(config.client.name, "sync")
    log.info("%s: sync started", result.client,
             extra={"run_id": result.run_id, "client": result.client})
    for stage in (s for s in STAGES if s in stages):
        result.stages.append(_run_stage(stage, config, secrets, store, out_dir, result))
    result.status = _overall([s.status for s in result.stages])
    store.finish_run(result.run_id, result.status, result.summary())


def _run_stage(stage: str, config: Any, secrets: Any, store: Any, out_dir: Path,
               result: ClientSync) -> StageOutcome:
    """One stage, timed; an error ends the stage, never the sync."""
    outcome = StageOutcome(stage)
    started = time.monotonic()
    try:
        STAGE_RUNNERS[stage](config, secrets, store, out_dir, outcome, result)
    except Busy as busy:
        outcome.status = "skipped"
        outcome.errors.append(str(busy))
    except ConvsyncError as error:
        outcome.status = "failed"
        outcome.errors.append(str(error))
    except Exception as error:  # a bug: reported, and the other stages still run
        outcome.status = "failed"
        outcome.errors.append(f"{type(error).__name__}: {error} (a convsync bug: please "
                              "report it with the log)")
        log.debug("%s", traceback.format_exc())
    outcome.seconds = round(time.monotonic() - started, 1)
    log.info("%s: %s %s in %.1f s", result.client or result.config, stage, outcome.status,
             outcome.seconds, extra={"run_id": result.run_id, "client": result.client,
                                     "stage": stage, "status": outcome.status,
                                     "counts": outcome.counts, "seconds": outcome.seconds,
                                     "errors": outcome.errors})
    return outcome


def _overall(statuses: Sequence[str]) -> str:
    if not statuses or all(s in ("ok", "skipped") for s in statuses):
        return "ok"
    if all(s == "failed" for s in statuses):
        return "failed"
    return "partial"


# -- the stages ------------------------------------------------------------------------------

def _pull(config: Any, secrets: Any, store: Any, out_dir: Path, outcome: StageOutcome,
          result: ClientSync) -> None:
    from convsync import pipeline

    pulled = pipeline.pull(config, secrets, store)
    outcome.counts = {p.platform.value: {"rows": p.rows, "requests": p.requests.total}
                      for p in pulled.platforms}
    outcome.errors = [f"{p.platform.value}: {e}" for p in pulled.platforms for e in p.errors]
    outcome.errors += pulled.warnings
    if pulled.failed:
        outcome.status = "failed" if len(pulled.failed) == len(pulled.platforms) else "partial"


def _audit(config: Any, secrets: Any, store: Any, out_dir: Path, outcome: StageOutcome,
           result: ClientSync) -> None:
    from convsync import reconcile

    outcome.counts = _by_severity(reconcile.load_audit(config, store).findings)


def _reconcile(config: Any, secrets: Any, store: Any, out_dir: Path, outcome: StageOutcome,
               result: ClientSync) -> None:
    from convsync import reconcile
    from convsync.errors import NoData

    stored = reconcile.stored_range(store)
    if stored is None:
        raise NoData("the store holds no daily stats to reconcile: the pull stored none")
    compared, funnel = reconcile.load_reconciliation(config, store, *stored)
    findings = compared.findings + (funnel.findings if funnel else [])
    outcome.counts = {"comparisons": len(compared.comparisons),
                      "beyond_tolerance": sum(c.beyond_tolerance
                                              for c in compared.comparisons),
                      **_by_severity(findings)}


def _values(config: Any, secrets: Any, store: Any, out_dir: Path, outcome: StageOutcome,
            result: ClientSync) -> None:
    from convsync import pipeline

    computed = pipeline.values(config, store, dt.datetime.now(dt.UTC))
    outcome.counts = {"conversions": len(computed.get("values", []))}


def _push(config: Any, secrets: Any, store: Any, out_dir: Path, outcome: StageOutcome,
          result: ClientSync) -> None:
    from convsync import push

    destinations = push.configured_destinations(config)
    if not destinations:
        outcome.status = "skipped"
        outcome.errors.append("the config names no uploads: nothing to push")
        return
    failed = 0
    for destination in destinations:
        pushed = push.PUSHES[destination](config, secrets, store)
        outcome.counts[destination.value] = {
            "sent": pushed.sent, "resent": pushed.resent, "held": pushed.held,
            "rejected": sum(pushed.rejected.values()), "requests": dict(pushed.requests)}
        problems = [*pushed.plan.problems, *pushed.errors]
        outcome.errors += [f"{destination.value}: {p}" for p in problems]
        failed += bool(problems or pushed.failed)
    if failed:
        outcome.status = "failed" if failed == len(destinations) else "partial"


def _report(config: Any, secrets: Any, store: Any, out_dir: Path, outcome: StageOutcome,
            result: ClientSync) -> None:
    from convsync.report import build_report, write_report

    folder = out_dir / _slug(config.client.name)
    html, _ = write_report(build_report(config, store), folder)
    result.report = str(html)
    outcome.counts = {"html": str(html)}


STAGE_RUNNERS: dict[str, Callable[..., None]] = {
    "pull": _pull, "audit": _audit, "reconcile": _reconcile, "values": _values,
    "push": _push, "report": _report}


def _by_severity(findings: Sequence[Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for finding in findings:
        counts[finding.severity] = counts.get(finding.severity, 0) + 1
    return counts


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "client"


def client_configs(config: Path | None, config_dir: Path | None) -> Iterator[Path]:
    """The config named, or every ``*.toml`` of the folder (sorted: a stable order)."""
    if config is not None:
        yield config
    if config_dir is not None:
        yield from sorted(p for p in config_dir.glob("*.toml") if p.is_file())
