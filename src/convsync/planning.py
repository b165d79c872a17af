"""What to send to Google Ads: the uploads the stored journeys, upload values and CRM outcomes
make, each with its deterministic transaction id, and Google's eligibility rules.

A micro conversion uploads the **upload value** `convsync values` stored for its segment (the
ladder credit, or the figure over all segments where the segment's own is withheld), for each
person's first event of it only (credits are per person who reached the step); a macro
conversion (a CRM outcome: a qualified lead, a won deal) uploads its own value. Every event is
checked as Google checks it, and each refusal is counted by its reason: a click id or a hashed
email / phone; the conversion action known, of type UPLOAD_CLICKS; the click within the
action's click-through window and not after the conversion; consent. An event whose click is
under 6 hours old is held (sent by a later run), never dropped.

The click's time is the person's first stored event (the landing that carried the click id):
an approximation where clicks are not pulled.
"""

from __future__ import annotations

import datetime as dt
import functools
import itertools
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field

from convsync.hashing import sha256_hex
from convsync.model import (
    Identifiers,
    JourneyEvent,
    Kind,
    Platform,
    PlatformConversion,
    Upload,
    UploadStatus,
)
from convsync.settings import ClientConfig, ConversionEntry
from convsync.store import Store
from convsync.valuation import ALL_SEGMENTS, segment_of

TOO_RECENT = dt.timedelta(hours=6)
"""Google refuses a click under about 6 hours old (TOO_RECENT_CLICK): such events wait."""
MAX_WINDOW_DAYS = 90
UPLOAD_TYPE = "UPLOAD_CLICKS"
SAMPLE = 5
RETRACTION_WINDOW = dt.timedelta(days=54)
"""Google takes a retraction up to 54 days after the conversion; later, it is restated."""
NO_VALUE = "no upload value (convsync values does not advise uploading it)"


@dataclass
class ActionPlan:
    """What one conversion action would get."""

    conversion: str
    action_id: str
    action_name: str = ""
    events: int = 0
    value: float = 0.0
    held: int = 0
    voided: int = 0
    """Uploads Google has that a CRM outcome voided: restated to the configured value (the
    Data Manager API cannot retract them)."""
    retracting: int = 0
    """Uploads a CRM outcome voided, to retract through the Google Ads API."""
    refused: Counter[str] = field(default_factory=Counter)
    sample: list[dict[str, object]] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        return {"conversion": self.conversion, "action_id": self.action_id,
                "action_name": self.action_name, "events": self.events,
                "value": round(self.value, 2), "held": self.held, "voided": self.voided,
                "retracting": self.retracting,
                "refused": dict(self.refused.most_common()), "sample": self.sample}


@dataclass
class Plan:
    """Per action what was planned and refused, the uploads to hold back, and the problems
    that stop an action. Complete once the plan's uploads have all been read."""

    holds: list[tuple[str, dt.datetime, str]] = field(default_factory=list)
    actions: dict[str, ActionPlan] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    unsent_voided: list[str] = field(default_factory=list)
    """Ledger rows not sent yet that a CRM outcome voided: never to be sent."""
    retractions: list[Upload] = field(default_factory=list)
    """Uploads Google has that a CRM outcome voided, to retract (their accounts still may)."""

    @property
    def events(self) -> int:
        return sum(action.events for action in self.actions.values())

    def summary(self) -> dict[str, object]:
        return {"actions": [a.summary() for a in self.actions.values()],
                "problems": self.problems}


def transaction_id(client: str, action_id: str, event: JourneyEvent, *,
                   per_person: bool = False) -> str:
    """The event's deterministic Google transaction id: the same event is the same id in
    every run (Google deduplicates it; a new value under it is a restatement).

    ``per_person``: the id of the person's step rather than of the event (a micro conversion's
    credit is per person who reached the step), so an earlier event of it that arrives late
    is the same upload, never a second one."""
    what = ((event.person_key, event.conversion or "") if per_person
            else (str(event.source_platform), event.source_event_id))
    text = "\x1f".join((client, "google_ads", action_id, *(("person",) if per_person else ()),
                        *what))
    return sha256_hex(text)[:32]


def plan_google_ads(config: ClientConfig, store: Store, now: dt.datetime, *,
                    problems: Callable[[Upload, dt.datetime], str] | None = None
                    ) -> tuple[Plan, Iterator[Upload]]:
    """The Google Ads uploads of the stored journeys as of ``now``, streamed (read them once;
    the plan's figures are complete when they have all been read). ``problems`` is the sink's
    local validation (the reason an event would make Google reject a whole request)."""
    section = config.google_ads
    plan = Plan()
    if section is None or not section.upload_actions:
        plan.problems.append("no [google_ads] upload_actions in the config: name the UPLOAD_CLICKS "
                             "conversion action each conversion uploads to")
        return plan, iter(())
    return plan, _uploads(plan, config, store, now, problems)


def _uploads(plan: Plan, config: ClientConfig, store: Store, now: dt.datetime,
             problems: Callable[[Upload, dt.datetime], str] | None) -> Iterator[Upload]:
    section = config.google_ads
    assert section is not None
    actions = _actions(store, section.upload_actions, plan)
    values = _upload_values(store, config.client.name)
    micro = {d.name for d in config.definitions() if d.kind is Kind.MICRO}
    voiders = {name: entry for entry in config.conversions if entry.name in actions
               for name in entry.voided_by}
    segment_by = config.valuation.segment_by
    events = store.planning_events(now, actions, micro & set(actions), voiders)
    for _, person in itertools.groupby(events, key=_person):
        journey = list(person)  # one person's events: a few
        voided = _voided(journey, voiders)
        for event, click_time in journey:
            conversion = event.conversion or ""
            if conversion not in actions:
                continue  # a CRM outcome that voids others
            ledger, action = plan.actions[conversion], actions[conversion]
            if conversion in micro:
                value = values.get((conversion, segment_of(event, segment_by)),
                                   values.get((conversion, ALL_SEGMENTS)))
                if value is None:
                    ledger.refused[NO_VALUE] += 1
                    continue
            else:
                value = event.value
            upload = _consider(plan, ledger, action, config, event, value, click_time, now,
                               problems, per_person=conversion in micro)
            void = voided.get(conversion)
            if upload is not None and void is not None and void[0] >= event.time:
                upload = _void(plan, ledger, store, config.client.name, upload, void[1],
                               section.retraction_accounts, now)
            if upload is not None:
                yield upload


def _person(planned: tuple[JourneyEvent, dt.datetime]) -> str:
    return planned[0].person_key


def _voided(journey: list[tuple[JourneyEvent, dt.datetime]],
            voiders: dict[str, ConversionEntry]) -> dict[str, tuple[dt.datetime, ConversionEntry]]:
    """The conversions a CRM outcome of this person voids: (the latest such outcome's time,
    the conversion's config)."""
    voided: dict[str, tuple[dt.datetime, ConversionEntry]] = {}
    for event, _ in journey:
        entry = voiders.get(event.platform_conversion)
        if entry is not None and event.conversion != entry.name:
            voided[entry.name] = (event.time, entry)
    return voided


def _void(plan: Plan, ledger: ActionPlan, store: Store, client: str, upload: Upload,
          entry: ConversionEntry, retract: Collection[str], now: dt.datetime) -> Upload | None:
    """A voided conversion Google has: retracted through the Google Ads API where the account
    still may (``retract``, within Google's 54 days), else restated to the config's value
    (the Data Manager API cannot retract: it still counts once); never sent when Google does
    not have it."""
    status = store.upload_statuses(client, Platform.GOOGLE_ADS, [upload.dedupe_key]).get(
        upload.dedupe_key)
    ledger.events -= 1
    ledger.value -= upload.value
    if upload.status == UploadStatus.HELD:
        ledger.held -= 1
        plan.holds = [h for h in plan.holds if h[0] != upload.dedupe_key]
    if status == UploadStatus.RETRACTED:
        return None
    if (status in (UploadStatus.SENT, UploadStatus.ACCEPTED) and upload.account_id in retract
            and now - upload.time < RETRACTION_WINDOW):
        ledger.retracting += 1  # at its voided value, should Google refuse the retraction
        plan.retractions.append(upload._replace(value=round(entry.voided_value, 2)))
        return None
    if status not in (UploadStatus.SENT, UploadStatus.ACCEPTED, UploadStatus.SENDING):
        ledger.refused[f"voided by the CRM ({', '.join(entry.voided_by)}) before it was "
                       "sent"] += 1
        if status is not None:  # planned or held: must not go out any more
            plan.unsent_voided.append(upload.dedupe_key)
        return None
    ledger.voided += 1
    ledger.events += 1
    ledger.value += entry.voided_value
    return upload._replace(value=round(entry.voided_value, 2))


def _actions(store: Store, wanted: dict[str, str], plan: Plan) -> dict[str, PlatformConversion]:
    """The configured upload actions as Google Ads describes them (pulled with the conversion
    actions); a missing or unsuitable one is a problem of the plan, and its events refused."""
    known = {c.platform_id: c for c in store.platform_conversions(Platform.GOOGLE_ADS)}
    found: dict[str, PlatformConversion] = {}
    for conversion, action_id in wanted.items():
        plan.actions[conversion] = ActionPlan(conversion, action_id)
        action = known.get(action_id)
        if action is None:
            plan.problems.append(
                f"upload action {action_id} (for {conversion}) is not among the Google Ads "
                "conversion actions pulled: check the id in Google Ads > Goals > Conversions, "
                "then run `convsync pull --platform google_ads`")
            continue
        plan.actions[conversion].action_name = action.name
        if action.settings.get("type") != UPLOAD_TYPE:
            plan.problems.append(
                f"upload action {action_id} ({action.name!r}, for {conversion}) is of type "
                f"{action.settings.get('type')}, not {UPLOAD_TYPE}: Google only imports into "
                "an import action (Goals > Conversions > New conversion action > Import > "
                "Manual import using API or uploads > Track conversions from clicks)")
            continue
        found[conversion] = action
    return found


def _upload_values(store: Store, client: str) -> dict[tuple[str, str], float]:
    """The latest stored upload values, by (conversion, segment); None ones left out."""
    return {(r["conversion"], r["segment"]): float(r["upload_value"])
            for r in store.micro_values(client) if r.get("upload_value") is not None}


def _consider(plan: Plan, ledger: ActionPlan, action: PlatformConversion, config: ClientConfig,
              event: JourneyEvent, value: float, click_time: dt.datetime, now: dt.datetime,
              problems: Callable[[Upload, dt.datetime], str] | None, *,
              per_person: bool) -> Upload | None:
    """The event's upload, counted in ``ledger``; None when it is refused (counted by
    reason)."""
    refusal = _refusal(config, action, event, click_time, now)
    if refusal:
        ledger.refused[refusal] += 1
        return None
    held = now - click_time < TOO_RECENT
    upload = Upload(
        destination=Platform.GOOGLE_ADS, conversion_action=action.platform_id,
        account_id=action.account_id, conversion=ledger.conversion,
        dedupe_key=transaction_id(config.client.name, action.platform_id, event,
                                  per_person=per_person),
        value=round(value, 2), currency=config.client.currency, time=event.time,
        identifiers=_google_identifiers(event.identifiers),
        status=UploadStatus.HELD if held else UploadStatus.PLANNED)
    why = problems(upload, now) if problems else ""
    if why:
        ledger.refused[why] += 1
        return None
    ledger.events += 1
    ledger.value += upload.value
    if held:
        plan.holds.append((upload.dedupe_key, click_time + TOO_RECENT,
                           "click under 6 hours old (Google: TOO_RECENT_CLICK)"))
        ledger.held += 1
    if len(ledger.sample) < SAMPLE:
        ledger.sample.append(_sample(upload))
    return upload


def _refusal(config: ClientConfig, action: PlatformConversion, event: JourneyEvent,
             click_time: dt.datetime, now: dt.datetime) -> str:
    """Why Google would not take this event ('' when it would)."""
    ids = event.identifiers
    if not (ids.gclid or ids.gbraid or ids.wbraid or ids.email_sha256_google
            or ids.phone_sha256_google):
        return "no click id (gclid / gbraid / wbraid) and no hashed email or phone"
    section = config.google_ads
    if section is not None and section.consent == "denied":
        return "consent denied in the config ([google_ads] consent)"
    window = min(int(action.settings.get("click_through_lookback_window_days") or
                     MAX_WINDOW_DAYS), MAX_WINDOW_DAYS)
    if event.time < click_time:
        return "conversion before its click"
    if event.time - click_time > dt.timedelta(days=window) or (
            now - event.time > dt.timedelta(days=MAX_WINDOW_DAYS)):
        return f"past the action's {window}-day click-through window (EVENT_TOO_OLD)"
    return ""


@functools.lru_cache(maxsize=64)
def _google_identifiers(ids: Identifiers) -> Identifiers:
    """Only what Google takes: click ids and Google-rule hashes. (Cached: a person's events
    come one after another and share one ``Identifiers``.)"""
    return Identifiers(gclid=ids.gclid, gbraid=ids.gbraid, wbraid=ids.wbraid,
                       email_sha256_google=ids.email_sha256_google,
                       phone_sha256_google=ids.phone_sha256_google)


def _sample(upload: Upload) -> dict[str, object]:
    """An upload as a plan shows it: never an identifier's value, only which kinds it has."""
    kinds = [name for name, value in upload.identifiers.model_dump().items() if value]
    return {"transaction_id": upload.dedupe_key, "time": upload.time.isoformat(),
            "value": upload.value, "currency": upload.currency, "identifiers": kinds}


def batches(uploads: Iterable[Upload], size: int, destinations: int) -> Iterator[list[Upload]]:
    """Requests of at most ``size`` events and ``destinations`` (account, action) pairs."""
    batch: list[Upload] = []
    seen: set[tuple[str, str]] = set()
    for upload in uploads:
        key = (upload.account_id, upload.conversion_action)
        if len(batch) >= size or (key not in seen and len(seen) >= destinations):
            yield batch
            batch, seen = [], set()
        batch.append(upload)
        seen.add(key)
    if batch:
        yield batch
