"""What `convsync push` does for one client: plan, write the ledger, send, read back.

Exactly once: every upload has its ledger row (with the platform's dedupe key) before it is
sent. Rows are claimed (planned -> sending) in one transaction before a request goes out,
marked sent with the request's id once the platform took it, and released (planned again, or
failed with the platform's reason) when it did not. A run killed between claim and record
leaves rows "sending": the next run sends them again under the same keys (the platform
deduplicates them) and counts them as resends. The whole push holds the client's lock, so two
overlapping runs never send the same rows.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from convsync import planning, quotas
from convsync.gctuning import fewer_collections
from convsync.locks import client_lock
from convsync.model import Platform, Upload, UploadStatus
from convsync.planning.google_ads import plan_google_ads
from convsync.settings import ClientConfig, GoogleAdsSection, Secrets
from convsync.sinks import SinkError
from convsync.sinks.google_ads.adjustments import MAX_ADJUSTMENTS, AdjustmentSink
from convsync.sinks.google_ads.datamanager import (
    INGEST,
    MAX_DESTINATIONS,
    MAX_EVENTS,
    RETRIEVE,
    DataManagerSink,
    connect,
)
from convsync.sources import google_ads as google_ads_source
from convsync.store import REFUSED_BY_GOOGLE, Store

log = logging.getLogger(__name__)

VOIDED_UNSENT = "voided by the CRM before it was sent"
RETRACTED = "voided by the CRM: retracted through the Google Ads API"
PARTLY_FAILED = "request partly failed"
"""The reason of uploads left sent by a request Google says partly failed: it never says
which events failed, only how many by reason (under the requests)."""
QUOTA_API = {INGEST: "datamanager.write", RETRIEVE: "datamanager.read"}
LEDGER_CHUNK = 10_000
"""Planned uploads written to the ledger a transaction at a time (the ledger's key index
takes them in key order: a bigger chunk rewrites fewer of its pages per row)."""
STATUS_FIRST = dt.timedelta(minutes=30)
"""Google's results come about 30 minutes after a request: the first look is then."""
STATUS_LONGEST = dt.timedelta(days=1)
"""A request still processing is looked at again after as long as it has been processing
(30 minutes, an hour, two, ...), at most this long apart."""
STATUS_KEPT = dt.timedelta(days=50)
"""Google keeps a request's status about this long."""


@dataclass
class PushResult:
    """What one push did for one destination."""

    destination: Platform
    dry_run: bool
    plan: planning.Plan
    planned_new: int = 0
    restated: int = 0
    retracted: int = 0
    sent: int = 0
    resent: int = 0
    held: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    requests: Counter[str] = field(default_factory=Counter)
    statuses: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    by_action: defaultdict[str, Counter[str]] = field(
        default_factory=lambda: defaultdict(Counter))
    """Per conversion: sent, resent and rejected (by Google, whole requests) this run."""
    progress: Callable[[PushResult], None] = field(default=lambda result: None, repr=False)

    @property
    def rejected(self) -> dict[str, int]:
        refused = Counter[str]()
        for action in self.plan.actions.values():
            refused.update(action.refused)
        return dict((refused + self.failed).most_common())

    def summary(self) -> dict[str, Any]:
        actions = []
        for action in self.plan.actions.values():
            done = self.by_action[action.conversion]
            row: dict[str, object] = {
                **action.summary(), "sent": done["sent"], "resent": done["resent"],
                "rejected": sum(action.refused.values()) + done["rejected"]}
            if self.dry_run:
                row["in_ledger"] = done["in_ledger"]
            actions.append(row)
        return {"destination": self.destination.value, "dry_run": self.dry_run,
                "planned_new": self.planned_new, "restated": self.restated,
                "retracted": self.retracted, "sent": self.sent,
                "resent": self.resent, "held": self.held, "rejected": self.rejected,
                "requests": dict(self.requests), "statuses": self.statuses,
                "errors": self.errors, "actions": actions, "problems": self.plan.problems}


def push_google_ads(config: ClientConfig, secrets: Secrets, store: Store, *,
                    dry_run: bool = False, now: dt.datetime | None = None,
                    sink: DataManagerSink | None = None,
                    sleep: Callable[[float], None] | None = None,
                    progress: Callable[[PushResult], None] | None = None) -> PushResult:
    """Plan, ledger, send and read back the Google Ads uploads of one client; ``progress``
    is told the figures so far after each request and each chunk of the ledger."""
    now = now or dt.datetime.now(dt.UTC)
    result = PushResult(Platform.GOOGLE_ADS, dry_run, planning.Plan(),
                        progress=progress or _quiet)
    section = _enabled_section(config, result)
    if section is None:
        return result
    sink = sink or _sink(section, secrets, store, result, sleep)
    with client_lock(store, config.client.name, "push"), fewer_collections(young=10_000):
        result.plan, planned = plan_google_ads(config, store, now, problems=sink.problems)
        if dry_run:
            _dry_run(store, sink, config.client.name, planned, result)
            return result
        sending = _write_and_send(store, sink, config.client.name, now, planned,
                                  section.restate_threshold, result)
        _retract(section, secrets, store, now, result, sleep)
        if sending:
            _send_waiting(store, sink, config.client.name, now, result)
        _read_back(store, sink, config.client.name, now, result)
    result.held = len(result.plan.holds)
    return result


def _write_and_send(store: Store, sink: DataManagerSink, client: str, now: dt.datetime,
                    planned: Iterable[Upload], threshold: float, result: PushResult) -> bool:
    """The plan ``LEDGER_CHUNK`` uploads at a time: their rows into the ledger (new ones
    planned, ones sent before restated where their value moved, recent ones held), then a
    request at a time those of them that are planned claimed and sent from memory (no
    reading back). After a request that fails, the rest of the plan still goes into the
    ledger, and nothing more is sent. False when sending stopped."""
    planned, holds, sending = iter(planned), 0, True
    while chunk := sorted(itertools.islice(planned, LEDGER_CHUNK), key=_by_key):
        # in key order, the ledger writes and each request's rows are neighbours
        fresh = set(store.plan_uploads(chunk, LEDGER_CHUNK, client=client))
        result.planned_new += len(fresh)
        result.progress(result)
        if len(fresh) < len(chunk):  # some were in the ledger already: their values may move
            result.restated += store.restate_uploads(
                Platform.GOOGLE_ADS, ((u.dedupe_key, u.value) for u in chunk),
                threshold=threshold)
        store.hold_uploads(Platform.GOOGLE_ADS, result.plan.holds[holds:])
        holds = len(result.plan.holds)
        _fail_voided(store, result)
        waiting = iter([u for u in chunk if u.status != UploadStatus.HELD])
        while sending and (part := list(itertools.islice(waiting, MAX_EVENTS))):
            ready = store.claim_planned(client, Platform.GOOGLE_ADS,
                                        [u.dedupe_key for u in part], now)
            uploads = list({u.dedupe_key: u for u in part if u.dedupe_key in ready}.values())
            sending = _send_claimed(store, sink, client, now, uploads, set(), result,
                                    fresh=fresh)
    _fail_voided(store, result)
    return sending


def _retract(section: GoogleAdsSection, secrets: Secrets, store: Store, now: dt.datetime,
             result: PushResult, sleep: Callable[[float], None] | None) -> None:
    """Retract, through the Google Ads API, the conversions the CRM voided in accounts that
    still may; one Google refuses is restated to its voided value instead (sent with the
    rows still waiting)."""
    if not result.plan.retractions:
        return
    sink = AdjustmentSink(google_ads_source.connect(section, secrets),
                          sleep=sleep or time.sleep,
                          on_request=lambda method: result.requests.update([method]))
    by_account: dict[str, list[Upload]] = {}
    for upload in result.plan.retractions:
        by_account.setdefault(upload.account_id, []).append(upload)
    for uploads in by_account.values():
        for start in range(0, len(uploads), MAX_ADJUSTMENTS):
            chunk = uploads[start:start + MAX_ADJUSTMENTS]
            try:
                outcome = sink.retract(chunk, now)
            except SinkError as error:
                result.errors.append(_said(error))
                return
            done = [key for key, why in outcome.items() if not why]
            store.release_uploads(Platform.GOOGLE_ADS, done, UploadStatus.RETRACTED, RETRACTED)
            result.retracted += len(done)
            for upload in chunk:
                why = outcome[upload.dedupe_key]
                if why:
                    result.failed[f"retraction refused ({why}): restated instead"] += 1
                    store.restate_uploads(Platform.GOOGLE_ADS,
                                          [(upload.dedupe_key, upload.value)], threshold=0.0)


def _fail_voided(store: Store, result: PushResult) -> None:
    """Rows not sent yet that a CRM outcome voided never go out."""
    if result.plan.unsent_voided:
        store.release_uploads(Platform.GOOGLE_ADS, result.plan.unsent_voided,
                              UploadStatus.FAILED, VOIDED_UNSENT)
        result.plan.unsent_voided.clear()


def _by_key(upload: Upload) -> str:
    return upload.dedupe_key


def _dry_run(store: Store, sink: DataManagerSink, client: str, planned: Iterable[Upload],
             result: PushResult) -> None:
    """Count what the ledger already holds and ask Google to validate each request; nothing
    is kept, the ledger untouched."""
    for batch in planning.batches(planned, MAX_EVENTS, MAX_DESTINATIONS):
        known = store.upload_statuses(client, Platform.GOOGLE_ADS,
                                      [u.dedupe_key for u in batch])
        for upload in batch:
            result.by_action[upload.conversion]["in_ledger"] += upload.dedupe_key in known
        if not result.errors:
            try:
                sink.send(batch, validate_only=True)
            except SinkError as error:
                result.errors.append(_said(error))


def refresh_google_ads(config: ClientConfig, secrets: Secrets, store: Store, *,
                       now: dt.datetime | None = None) -> PushResult:
    """Ask Google now what it did with every request still processing (a push asks only
    from 30 minutes after each send, as Google advises)."""
    now = now or dt.datetime.now(dt.UTC)
    result = PushResult(Platform.GOOGLE_ADS, False, planning.Plan())
    section = _enabled_section(config, result)
    if section is None:
        return result
    sink = _sink(section, secrets, store, result, None)
    with client_lock(store, config.client.name, "push"):
        _read_back(store, sink, config.client.name, now, result, every=True)
    return result


def _quiet(result: PushResult) -> None:
    """No progress to show."""


def _enabled_section(config: ClientConfig, result: PushResult) -> GoogleAdsSection | None:
    """The client's Google Ads section, or None (said in ``result``) when there is none."""
    section = config.google_ads
    if section is None or not section.enabled:
        result.errors.append("Google Ads is not configured or not enabled for this client")
        return None
    return section


def _sink(section: GoogleAdsSection, secrets: Secrets, store: Store, result: PushResult,
          sleep: Callable[[float], None] | None) -> DataManagerSink:
    """The Data Manager sink, its API calls paced under the Cloud project's quotas (counted
    in the store, for every client of the project) and counted in ``result``."""
    quota = quotas.ProjectQuota(store, quotas.cloud_project(section, secrets),
                                quotas.DATAMANAGER_LIMITS, sleep=sleep or time.sleep)

    def on_request(method: str) -> None:
        quota.take(QUOTA_API[method])
        result.requests.update([method])

    return DataManagerSink(connect(section, secrets), section, on_request=on_request,
                           sleep=sleep or time.sleep)


def _send_waiting(store: Store, sink: DataManagerSink, client: str, now: dt.datetime,
                  result: PushResult) -> None:
    """Send what the ledger still has waiting: rows planned by an earlier run, held ones
    whose time has come, and ones a killed run left sending (resent, same keys)."""
    while claimed := store.claim_uploads(client, Platform.GOOGLE_ADS, limit=MAX_EVENTS, now=now):
        uploads = [upload for upload, _ in claimed]
        resent = {upload.dedupe_key for upload, again in claimed if again}
        if not _send_claimed(store, sink, client, now, uploads, resent, result):
            return


def _send_claimed(store: Store, sink: DataManagerSink, client: str, now: dt.datetime,
                  uploads: list[Upload], resent: set[str], result: PushResult, *,
                  fresh: set[str] | None = None) -> bool:
    """Send claimed rows in as few requests as the limits allow (``fresh``: the keys this
    run wrote, never sent); False when the run must stop sending. What it never tried to
    send goes back to planned: not a resend for the next run."""
    untried = list(planning.batches(uploads, MAX_EVENTS, MAX_DESTINATIONS))
    try:
        while untried and _send_batch(store, sink, client, now, untried[0], resent, result,
                                      fresh or set()):
            untried.pop(0)
    finally:
        later = [u.dedupe_key for batch in untried[1:] for u in batch]
        if later:
            store.release_uploads(Platform.GOOGLE_ADS, later, UploadStatus.PLANNED, "")
    return not untried


def _send_batch(store: Store, sink: DataManagerSink, client: str, now: dt.datetime,
                batch: list[Upload], resent: set[str], result: PushResult,
                fresh: set[str]) -> bool:
    """Send one request; False when the run must stop sending (the rest stays for later).

    Whatever Google answered, nothing is failed for good here: local validation (the sink's
    ``problems``) sets bad events aside before they are planned, so a request Google refuses
    whole is refused for something about the request (credentials, the action, consent): its
    rows go back to planned, and the next run, once that is fixed, sends them."""
    keys = [u.dedupe_key for u in batch]
    try:
        request_id = sink.send(batch)
    except SinkError as error:
        if (not error.maybe_sent and not error.retryable
                and any(i < len(batch) for i in error.events)):
            return _set_aside(store, sink, client, now, batch, error, resent, result, fresh)
        result.errors.append(_said(error))
        if not error.maybe_sent:  # else left "sending": the next run resends them, same keys
            store.release_uploads(Platform.GOOGLE_ADS, keys, UploadStatus.PLANNED, error.reason)
        if not error.retryable and not error.maybe_sent:
            result.failed[error.reason or "rejected"] += len(keys)
            for upload in batch:
                result.by_action[upload.conversion]["rejected"] += 1
        return False
    except ValueError as error:  # the request could not even be built (consent denied, ...)
        result.errors.append(str(error))
        store.release_uploads(Platform.GOOGLE_ADS, keys, UploadStatus.PLANNED, str(error))
        return False
    store.record_sent(client, Platform.GOOGLE_ADS, keys, request_id, now,
                      first=fresh.issuperset(keys))
    result.sent += len(keys)
    result.resent += len(resent & set(keys))
    result.progress(result)
    for upload in batch:
        result.by_action[upload.conversion]["sent"] += 1
        result.by_action[upload.conversion]["resent"] += upload.dedupe_key in resent
    return True


def _set_aside(store: Store, sink: DataManagerSink, client: str, now: dt.datetime,
               batch: list[Upload], error: SinkError, resent: set[str], result: PushResult,
               fresh: set[str]) -> bool:
    """Google refused a request for some of its events (our checks let them through): those
    fail with what Google said, and the others go out again at once, without them."""
    named = {i: why for i, why in error.events.items() if i < len(batch)}
    for i, why in named.items():
        upload = batch[i]
        reason = f"{REFUSED_BY_GOOGLE}{error.reason} at {why}"
        store.release_uploads(Platform.GOOGLE_ADS, [upload.dedupe_key], UploadStatus.FAILED,
                              reason)
        result.failed[reason] += 1
        result.by_action[upload.conversion]["rejected"] += 1
    log.warning("google_ads: %d event(s) set aside after %s", len(named), error.reason)
    rest = [u for i, u in enumerate(batch) if i not in named]
    return not rest or _send_batch(store, sink, client, now, rest, resent, result, fresh)


def _read_back(store: Store, sink: DataManagerSink, client: str, now: dt.datetime,
               result: PushResult, *, every: bool = False) -> None:
    """Ask Google what it did with the requests whose outcome is still unknown and that are
    due a look (``every``: all of them)."""
    due = now + STATUS_KEPT if every else now
    for request_id, sent_at in store.requests_to_check(client, Platform.GOOGLE_ADS, due):
        try:
            status = sink.status(request_id)
        except SinkError as error:
            result.errors.append(_said(error))
            return
        detail = {"destinations": [
            {"account_id": d.account_id, "conversion_action": d.conversion_action,
             "status": d.status, "record_count": d.record_count, "errors": d.errors}
            for d in status.destinations]}
        outcomes = {d.conversion_action: _outcome(d.status, d.errors)
                    for d in status.destinations
                    if d.status in ("success", "failed", "partial_success")}
        final = status.state in ("done", "too_old") or (
            status.state == "not_found" and now - sent_at > STATUS_KEPT)
        store.record_request_status(request_id, status.state if final else "processing",
                                    detail, now, None if final else _next_check(now, sent_at),
                                    outcomes)
        result.statuses.append({"request_id": request_id, "state": status.state, **detail})


def _outcome(status: str, errors: dict[str, int]) -> tuple[UploadStatus, str]:
    """What a destination's final status says of the uploads it carried. Google never says
    which events of a partly failed request failed: they stay "sent", with the counts."""
    if status == "success":
        return UploadStatus.ACCEPTED, ""
    if status == "partial_success":
        return UploadStatus.SENT, PARTLY_FAILED
    return UploadStatus.REJECTED, ", ".join(errors) or "failed"


def _next_check(now: dt.datetime, sent_at: dt.datetime) -> dt.datetime:
    return now + min(max(now - sent_at, STATUS_FIRST), STATUS_LONGEST)


def _said(error: SinkError) -> str:
    return f"{error}" + (f" (fix: {error.fix})" if error.fix else "")
