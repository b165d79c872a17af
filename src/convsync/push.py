"""What `convsync push` does for one client and destination (Google Ads, Meta, Klaviyo):
plan, write the ledger, send, read back (Google only: the others' answers are final).

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
import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from convsync import planning, quotas
from convsync.gctuning import fewer_collections
from convsync.locks import client_lock
from convsync.model import Platform, Upload, UploadStatus
from convsync.planning.google_ads import GoogleAdsRules
from convsync.planning.klaviyo import KlaviyoRules
from convsync.planning.meta import MetaRules
from convsync.settings import ClientConfig, GoogleAdsSection, Secrets
from convsync.sinks import SinkError
from convsync.sinks.google_ads.adjustments import MAX_ADJUSTMENTS, AdjustmentSink
from convsync.sinks.google_ads.datamanager import INGEST, RETRIEVE, DataManagerSink, connect
from convsync.sinks.klaviyo import KlaviyoSink
from convsync.sinks.meta import MetaSink
from convsync.sources import google_ads as google_ads_source
from convsync.sources import klaviyo as klaviyo_source
from convsync.sources import meta as meta_source
from convsync.store import Store, refused_by

log = logging.getLogger(__name__)

VOIDED_UNSENT = "voided by the CRM before it was sent"
RETRACTED = "voided by the CRM: retracted through the Google Ads API"
UNSURE_TOO_LATE = ("may have arrived (a run was killed while sending it), and too long ago "
                   "to send again: the platform would count it twice")
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


class Sink(Protocol):
    """What the push needs of a destination's sink (``sinks``)."""

    destination: Platform
    settles: bool
    """The platform's answer to a request is final (nothing to read back later)."""
    max_events: int
    dedupe_window: dt.timedelta | None
    """How long the platform recognises a resend as the same event (None: for ever)."""

    def batches(self, uploads: Iterable[Upload]) -> Iterator[list[Upload]]: ...

    def problems(self, upload: Upload, now: dt.datetime) -> str: ...

    def send(self, uploads: Sequence[Upload], *, validate_only: bool = False) -> str: ...


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

    def retract() -> None:
        _retract(section, secrets, store, now, result, sleep)

    def read_back() -> None:
        _read_back(store, sink, config.client.name, now, result)

    _push(GoogleAdsRules(config), sink, config, store, now, result,
          threshold=section.restate_threshold, after_writing=retract, finally_=read_back)
    return result


def push_meta(config: ClientConfig, secrets: Secrets, store: Store, *,
              dry_run: bool = False, now: dt.datetime | None = None,
              sink: MetaSink | None = None, sleep: Callable[[float], None] | None = None,
              progress: Callable[[PushResult], None] | None = None) -> PushResult:
    """Plan, ledger and send the Meta (Conversions API) uploads of one client."""
    now = now or dt.datetime.now(dt.UTC)
    result = PushResult(Platform.META, dry_run, planning.Plan(), progress=progress or _quiet)
    section = config.meta
    if section is None or not section.enabled or not section.upload_events:
        result.errors.append("Meta is not configured for pushing: set [meta] pixel_id and "
                             "upload_events")
        return result
    sink = sink or MetaSink(meta_source.connect(section, secrets), section,
                            sleep=sleep or time.sleep,
                            on_request=lambda method: result.requests.update([method]))
    _push(MetaRules(), sink, config, store, now, result)
    return result


def push_klaviyo(config: ClientConfig, secrets: Secrets, store: Store, *,
                 dry_run: bool = False, now: dt.datetime | None = None,
                 sink: KlaviyoSink | None = None, sleep: Callable[[float], None] | None = None,
                 progress: Callable[[PushResult], None] | None = None) -> PushResult:
    """Plan, ledger and send the Klaviyo uploads of one client."""
    now = now or dt.datetime.now(dt.UTC)
    result = PushResult(Platform.KLAVIYO, dry_run, planning.Plan(),
                        progress=progress or _quiet)
    section = config.klaviyo
    if section is None or not section.enabled or not section.upload_metrics:
        result.errors.append("Klaviyo is not configured for pushing: set [klaviyo] "
                             "upload_metrics")
        return result
    sink = sink or KlaviyoSink(klaviyo_source.connect(section, secrets),
                               sleep=sleep or time.sleep, clock=lambda: now,
                               on_request=lambda method: result.requests.update([method]))
    _push(KlaviyoRules(), sink, config, store, now, result)
    return result


def configured_destinations(config: ClientConfig) -> list[Platform]:
    """The destinations the config names uploads for."""
    return [platform for platform, uploads in (
        (Platform.GOOGLE_ADS, config.google_ads and config.google_ads.upload_actions),
        (Platform.META, config.meta and config.meta.upload_events),
        (Platform.KLAVIYO, config.klaviyo and config.klaviyo.upload_metrics)) if uploads]


PUSHES: dict[Platform, Callable[..., PushResult]] = {
    Platform.GOOGLE_ADS: push_google_ads, Platform.META: push_meta,
    Platform.KLAVIYO: push_klaviyo}
"""Each destination's push, by platform."""


def _push(rules: planning.Rules, sink: Sink, config: ClientConfig, store: Store,
          now: dt.datetime, result: PushResult, *, threshold: float = math.inf,
          after_writing: Callable[[], None] = lambda: None,
          finally_: Callable[[], None] = lambda: None) -> None:
    """The push of one destination, under the client's lock: plan, then (unless a dry run)
    write and send, ``after_writing`` (Google's retractions), send what the ledger still has
    waiting, and ``finally_`` (Google's read-back). ``threshold``: how far a value sent
    before may move before it is sent again (never, where the destination cannot restate)."""
    client = config.client.name
    with client_lock(store, client, "push"), fewer_collections(young=10_000):
        result.plan, planned = planning.plan_uploads(rules, config, store, now,
                                                     problems=sink.problems)
        if result.dry_run:
            _dry_run(store, sink, client, planned, result)
            return
        sending = _write_and_send(store, sink, client, now, planned, threshold, result)
        after_writing()
        if sending:
            _send_waiting(store, sink, client, now, result)
        finally_()
    result.held = len(result.plan.holds)


def _write_and_send(store: Store, sink: Sink, client: str, now: dt.datetime,
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
                sink.destination, ((u.dedupe_key, u.value) for u in chunk),
                threshold=threshold)
        store.hold_uploads(sink.destination, result.plan.holds[holds:])
        holds = len(result.plan.holds)
        _fail_voided(store, sink.destination, result)
        waiting = iter([u for u in chunk if u.status != UploadStatus.HELD])
        while sending and (part := list(itertools.islice(waiting, sink.max_events))):
            ready = store.claim_planned(client, sink.destination,
                                        [u.dedupe_key for u in part], now)
            uploads = list({u.dedupe_key: u for u in part if u.dedupe_key in ready}.values())
            sending = _send_claimed(store, sink, client, now, uploads, set(), result,
                                    fresh=fresh)
    _fail_voided(store, sink.destination, result)
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


def _fail_voided(store: Store, destination: Platform, result: PushResult) -> None:
    """Rows not sent yet that a CRM outcome voided never go out."""
    if result.plan.unsent_voided:
        store.release_uploads(destination, result.plan.unsent_voided,
                              UploadStatus.FAILED, VOIDED_UNSENT)
        result.plan.unsent_voided.clear()


def _by_key(upload: Upload) -> str:
    return upload.dedupe_key


def _dry_run(store: Store, sink: Sink, client: str, planned: Iterable[Upload],
             result: PushResult) -> None:
    """Count what the ledger already holds and ask the platform to validate each request
    where it can (Google); nothing is kept, the ledger untouched."""
    for batch in sink.batches(planned):
        known = store.upload_statuses(client, sink.destination,
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


def _send_waiting(store: Store, sink: Sink, client: str, now: dt.datetime,
                  result: PushResult) -> None:
    """Send what the ledger still has waiting: rows planned by an earlier run, held ones
    whose time has come, and ones a killed run left sending (resent, same keys), except
    those left sending for longer than the platform deduplicates (they may have arrived: a
    resend would count twice), and any the platform would now refuse (too old by now)."""
    if sink.dedupe_window is not None:
        gone = store.give_up_sending(client, sink.destination, now - sink.dedupe_window,
                                     UNSURE_TOO_LATE)
        if gone:
            result.failed[UNSURE_TOO_LATE] += gone
    while claimed := store.claim_uploads(client, sink.destination, limit=sink.max_events,
                                         now=now):
        uploads = []
        for upload, _ in claimed:
            why = sink.problems(upload, now)
            if why:
                store.release_uploads(sink.destination, [upload.dedupe_key],
                                      UploadStatus.FAILED, f"{why} (when it was sent at last)")
                result.failed[why] += 1
            else:
                uploads.append(upload)
        resent = {upload.dedupe_key for upload, again in claimed if again}
        if uploads and not _send_claimed(store, sink, client, now, uploads, resent, result):
            return


def _send_claimed(store: Store, sink: Sink, client: str, now: dt.datetime,
                  uploads: list[Upload], resent: set[str], result: PushResult, *,
                  fresh: set[str] | None = None) -> bool:
    """Send claimed rows in as few requests as the limits allow (``fresh``: the keys this
    run wrote, never sent); False when the run must stop sending. What it never tried to
    send goes back to planned: not a resend for the next run."""
    untried = list(sink.batches(uploads))
    try:
        while untried and _send_batch(store, sink, client, now, untried[0], resent, result,
                                      fresh or set()):
            untried.pop(0)
    finally:
        later = [u.dedupe_key for batch in untried[1:] for u in batch]
        if later:
            store.release_uploads(sink.destination, later, UploadStatus.PLANNED, "")
    return not untried


def _send_batch(store: Store, sink: Sink, client: str, now: dt.datetime,
                batch: list[Upload], resent: set[str], result: PushResult,
                fresh: set[str]) -> bool:
    """Send one request; False when the run must stop sending (the rest stays for later).

    Whatever the platform answered, nothing is failed for good here but the events it named:
    local validation (the sink's ``problems``) sets bad events aside before they are planned,
    so a request refused whole is refused for something about the request (credentials, the
    action, consent): its rows go back to planned, and the next run, once that is fixed, sends
    them. Events the platform named (our checks let them through) fail with its reason, and
    the rest of the request goes again without them, as often as it names more."""
    while batch:
        keys = [u.dedupe_key for u in batch]
        try:
            request_id = sink.send(batch)
        except SinkError as error:
            if (not error.maybe_sent and not error.retryable
                    and any(i < len(batch) for i in error.events)):
                batch = _set_aside(store, sink, batch, error, result)
                continue
            result.errors.append(_said(error))
            if not error.maybe_sent:  # else left "sending": the next run resends them
                store.release_uploads(sink.destination, keys, UploadStatus.PLANNED,
                                      error.reason)
            if not error.retryable and not error.maybe_sent:
                result.failed[error.reason or "rejected"] += len(keys)
                for upload in batch:
                    result.by_action[upload.conversion]["rejected"] += 1
            return False
        except ValueError as error:  # the request could not even be built (consent denied)
            result.errors.append(str(error))
            store.release_uploads(sink.destination, keys, UploadStatus.PLANNED, str(error))
            return False
        store.record_sent(client, sink.destination, keys, request_id, now,
                          first=fresh.issuperset(keys), settled=sink.settles)
        result.sent += len(keys)
        result.resent += len(resent & set(keys))
        result.progress(result)
        for upload in batch:
            result.by_action[upload.conversion]["sent"] += 1
            result.by_action[upload.conversion]["resent"] += upload.dedupe_key in resent
        return True
    return True


def _set_aside(store: Store, sink: Sink, batch: list[Upload], error: SinkError,
               result: PushResult) -> list[Upload]:
    """The events of ``batch`` the platform named fail with what it said; the others."""
    named = {i: why for i, why in error.events.items() if i < len(batch)}
    for i, why in named.items():
        upload = batch[i]
        reason = f"{refused_by(sink.destination)}{error.reason} at {why}"
        store.release_uploads(sink.destination, [upload.dedupe_key], UploadStatus.FAILED,
                              reason)
        result.failed[reason] += 1
        result.by_action[upload.conversion]["rejected"] += 1
    log.warning("%s: %d event(s) set aside after %s", sink.destination.value, len(named),
                error.reason)
    return [u for i, u in enumerate(batch) if i not in named]


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
