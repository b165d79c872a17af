"""What to send to each destination: the uploads the stored journeys, upload values and CRM
outcomes make, each with its deterministic dedupe key, and the destination's eligibility
rules (one module each: ``google_ads``, ``meta``, ``klaviyo``).

A micro conversion uploads the **upload value** `convsync values` stored for its segment (the
ladder credit, or the figure over all segments where the segment's own is withheld), for each
person's first event of it only (credits are per person who reached the step); a macro
conversion (a CRM outcome: a qualified lead, a won deal) uploads its own value. Every event is
checked as the destination checks it, and each refusal is counted by its reason. A CRM outcome
that voids a conversion (``voided_by``) stops it being sent; one already sent is restated or
retracted where the destination can (Google), and reported where it cannot.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from convsync.hashing import sha256_hex
from convsync.model import Identifiers, JourneyEvent, Kind, Platform, Upload, UploadStatus
from convsync.settings import ClientConfig, ConversionEntry
from convsync.store import Store
from convsync.valuation import ALL_SEGMENTS, segment_of

SAMPLE = 5
NO_VALUE = "no upload value (convsync values does not advise uploading it)"
SENT_STATUSES = (UploadStatus.SENT, UploadStatus.ACCEPTED, UploadStatus.SENDING)


@dataclass
class ActionPlan:
    """What one conversion's target (a Google conversion action, a Meta event name, a
    Klaviyo metric) would get."""

    conversion: str
    action_id: str
    action_name: str = ""
    events: int = 0
    value: float = 0.0
    held: int = 0
    voided: int = 0
    """Uploads the destination has that a CRM outcome voided: restated to the configured
    value where it can be (Google's Data Manager), else left as they are (Meta, Klaviyo)."""
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
    """Per target what was planned and refused, the uploads to hold back, and the problems
    that stop a target. Complete once the plan's uploads have all been read."""

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


@dataclass(frozen=True)
class Target:
    """Where one conversion's uploads go: the destination's account (a Google Ads customer, a
    Meta pixel, a Klaviyo account) and the action, event name or metric in it."""

    account_id: str
    action_id: str
    settings: dict[str, object] = field(default_factory=dict)


Problems = Callable[[Upload, dt.datetime], str]
"""A sink's local validation: why the platform would refuse a request carrying an upload."""


class Rules(Protocol):
    """What one destination takes, and how (see each destination's module)."""

    destination: Platform
    restates: bool
    """Whether an upload already sent can take a new value under its key."""

    def targets(self, config: ClientConfig, store: Store, plan: Plan) -> dict[str, Target]:
        """The configured targets by conversion, each one an ``ActionPlan`` in ``plan``; a
        missing or unsuitable one is a problem of the plan."""

    def refusal(self, config: ClientConfig, target: Target, event: JourneyEvent,
                identifiers: Identifiers, click_time: dt.datetime, now: dt.datetime) -> str:
        """Why the destination would not take this event ('' when it would)."""

    def identifiers(self, event: Identifiers, person: Identifiers) -> Identifiers:
        """What the destination takes of an event's and its person's identifiers."""

    def hold(self, click_time: dt.datetime, now: dt.datetime) -> tuple[dt.datetime, str] | None:
        """Until when, and why, an upload must wait (None: it need not)."""

    def void_sent(self, plan: Plan, ledger: ActionPlan, upload: Upload, status: UploadStatus,
                  entry: ConversionEntry, now: dt.datetime) -> Upload | None:
        """A voided upload the destination has (``status``: sent, accepted, or sending: it
        may have arrived): what to send now (None: nothing)."""


def configured_targets(plan: Plan, uploads: dict[str, str] | None, account: str,
                       missing: str) -> dict[str, Target]:
    """Targets named by the config (conversion -> event name or metric) in ``account``, each
    an ``ActionPlan``; ``missing`` is the plan's problem when the config names none."""
    if not uploads:
        plan.problems.append(missing)
        return {}
    for conversion, name in uploads.items():
        plan.actions[conversion] = ActionPlan(conversion, name, name)
    return {conversion: Target(account, name) for conversion, name in uploads.items()}


class FinalRules:
    """The rules every destination whose answer is final shares (Meta, Klaviyo): nothing is
    held, and a voided upload it already has stays with it (counted in the plan, never sent
    again: neither platform can retract or restate)."""

    restates = False

    def hold(self, click_time: dt.datetime, now: dt.datetime) -> tuple[dt.datetime, str] | None:
        return None

    def void_sent(self, plan: Plan, ledger: ActionPlan, upload: Upload, status: UploadStatus,
                  entry: ConversionEntry, now: dt.datetime) -> Upload | None:
        ledger.voided += 1
        return None


def dedupe_key(client: str, destination: Platform, target_id: str, event: JourneyEvent, *,
               per_person: bool = False) -> str:
    """The event's deterministic dedupe key at a destination (Google's transaction id, Meta's
    event id, Klaviyo's unique id): the same event is the same key in every run (the platform
    deduplicates it; at Google a new value under it is a restatement).

    ``per_person``: the key of the person's step rather than of the event (a micro
    conversion's credit is per person who reached the step), so an earlier event of it that
    arrives late is the same upload, never a second one."""
    what = ((event.person_key, event.conversion or "") if per_person
            else (str(event.source_platform), event.source_event_id))
    text = "\x1f".join((client, destination.value, target_id,
                        *(("person",) if per_person else ()), *what))
    return sha256_hex(text)[:32]


def plan_uploads(rules: Rules, config: ClientConfig, store: Store, now: dt.datetime, *,
                 problems: Problems | None = None) -> tuple[Plan, Iterator[Upload]]:
    """The destination's uploads of the stored journeys as of ``now``, streamed (read them
    once; the plan's figures are complete when they have all been read). ``problems`` is the
    sink's local validation (the reason an event would make the platform reject a whole
    request)."""
    plan = Plan()
    targets = rules.targets(config, store, plan)
    if not plan.actions and not plan.problems:
        return plan, iter(())
    return plan, _uploads(plan, rules, targets, config, store, now, problems)


def _uploads(plan: Plan, rules: Rules, targets: dict[str, Target], config: ClientConfig,
             store: Store, now: dt.datetime, problems: Problems | None) -> Iterator[Upload]:
    values = _upload_values(store, config.client.name)
    micro = {d.name for d in config.definitions() if d.kind is Kind.MICRO}
    voiders = {name: entry for entry in config.conversions if entry.name in targets
               for name in entry.voided_by}
    segment_by = config.valuation.segment_by
    events = store.planning_events(now, targets, micro & set(targets), voiders)
    for _, person in itertools.groupby(events, key=_person):
        journey = list(person)  # one person's events: a few
        voided = _voided(journey, voiders)
        known = _person_identifiers(journey)
        for event, click_time in journey:
            conversion = event.conversion or ""
            target = targets.get(conversion)
            if target is None:
                continue  # a CRM outcome that voids others
            ledger = plan.actions[conversion]
            if conversion in micro:
                value = values.get((conversion, segment_of(event, segment_by)),
                                   values.get((conversion, ALL_SEGMENTS)))
                if value is None:
                    ledger.refused[NO_VALUE] += 1
                    continue
            else:
                value = event.value
            upload = _consider(plan, ledger, rules, target, config, event, known, value,
                               click_time, now, problems, per_person=conversion in micro)
            void = voided.get(conversion)
            if upload is not None and void is not None and void[0] >= event.time:
                upload = _void(plan, ledger, rules, store, config.client.name, upload, void[1],
                               now)
            if upload is not None:
                yield upload


def _person(planned: tuple[JourneyEvent, dt.datetime]) -> str:
    return planned[0].person_key


def _person_identifiers(journey: list[tuple[JourneyEvent, dt.datetime]]) -> Identifiers:
    """Everything known of the person across their events (the first value of each kind)."""
    first = journey[0][0].identifiers
    if all(event.identifiers is first for event, _ in journey):
        return first
    merged: dict[str, object] = {}
    for event, _ in journey:
        for name, value in event.identifiers:
            if value is not None:
                merged.setdefault(name, value)
    return Identifiers.model_construct(**merged)  # type: ignore[arg-type]


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


def _void(plan: Plan, ledger: ActionPlan, rules: Rules, store: Store, client: str,
          upload: Upload, entry: ConversionEntry, now: dt.datetime) -> Upload | None:
    """A voided conversion: never sent when the destination does not have it; else what the
    destination's rules make of it (a retraction, a restatement, or nothing)."""
    status = store.upload_statuses(client, rules.destination, [upload.dedupe_key]).get(
        upload.dedupe_key)
    ledger.events -= 1
    ledger.value -= upload.value
    if upload.status == UploadStatus.HELD:
        ledger.held -= 1
        plan.holds = [h for h in plan.holds if h[0] != upload.dedupe_key]
    if status == UploadStatus.RETRACTED:
        return None
    if status not in SENT_STATUSES:
        ledger.refused[f"voided by the CRM ({', '.join(entry.voided_by)}) before it was "
                       "sent"] += 1
        if status is not None:  # planned or held: must not go out any more
            plan.unsent_voided.append(upload.dedupe_key)
        return None
    return rules.void_sent(plan, ledger, upload, status, entry, now)


def _upload_values(store: Store, client: str) -> dict[tuple[str, str], float]:
    """The latest stored upload values, by (conversion, segment); None ones left out."""
    return {(r["conversion"], r["segment"]): float(r["upload_value"])
            for r in store.micro_values(client) if r.get("upload_value") is not None}


def _consider(plan: Plan, ledger: ActionPlan, rules: Rules, target: Target,
              config: ClientConfig, event: JourneyEvent, person: Identifiers, value: float,
              click_time: dt.datetime, now: dt.datetime, problems: Problems | None, *,
              per_person: bool) -> Upload | None:
    """The event's upload, counted in ``ledger``; None when it is refused (counted by
    reason)."""
    identifiers = rules.identifiers(event.identifiers, person)
    refusal = rules.refusal(config, target, event, identifiers, click_time, now)
    if refusal:
        ledger.refused[refusal] += 1
        return None
    hold = rules.hold(click_time, now)
    upload = Upload(
        destination=rules.destination, conversion_action=target.action_id,
        account_id=target.account_id, conversion=ledger.conversion,
        dedupe_key=dedupe_key(config.client.name, rules.destination, target.action_id, event,
                              per_person=per_person),
        value=round(value, 2), currency=config.client.currency, time=event.time,
        identifiers=identifiers,
        status=UploadStatus.HELD if hold else UploadStatus.PLANNED)
    why = problems(upload, now) if problems else ""
    if why:
        ledger.refused[why] += 1
        return None
    ledger.events += 1
    ledger.value += upload.value
    if hold:
        plan.holds.append((upload.dedupe_key, *hold))
        ledger.held += 1
    if len(ledger.sample) < SAMPLE:
        ledger.sample.append(_sample(upload))
    return upload


def _sample(upload: Upload) -> dict[str, object]:
    """An upload as a plan shows it: never an identifier's value, only which kinds it has."""
    kinds = [name for name, value in upload.identifiers if value]
    return {"transaction_id": upload.dedupe_key, "time": upload.time.isoformat(),
            "value": upload.value, "currency": upload.currency, "identifiers": kinds}
