"""Meta (Conversions API) eligibility: a person Meta can match: a hashed email or phone
(Meta's rule), an external id, or the click's fbc / the browser's fbp, from any of the
person's events; the sink refuses the rest (an event older than Meta takes: 7 days, or the
config's ``max_event_age_days``). A conversion the CRM voids after it was sent stays with
Meta: the Conversions API can neither retract nor restate an event (a second copy under its
event id is dropped, or, after 48 hours, counted twice), so nothing is sent again.
"""

from __future__ import annotations

import datetime as dt

from convsync.model import Identifiers, JourneyEvent, Platform, Upload, UploadStatus
from convsync.planning import ActionPlan, Plan, Target
from convsync.settings import ClientConfig, ConversionEntry
from convsync.store import Store


class MetaRules:
    destination = Platform.META
    restates = False

    def targets(self, config: ClientConfig, store: Store, plan: Plan) -> dict[str, Target]:
        section = config.meta
        if section is None or not section.upload_events:
            plan.problems.append("no [meta] upload_events in the config: name the event each "
                                 "conversion is sent to Meta under")
            return {}
        found = {}
        for conversion, event_name in section.upload_events.items():
            plan.actions[conversion] = ActionPlan(conversion, event_name, event_name)
            found[conversion] = Target(section.pixel_id or "", event_name)
        return found

    def refusal(self, config: ClientConfig, target: Target, event: JourneyEvent,
                identifiers: Identifiers, click_time: dt.datetime, now: dt.datetime) -> str:
        ids = identifiers
        if not (ids.email_sha256_meta or ids.phone_sha256_meta or ids.external_id or ids.fbc
                or ids.fbp):
            return "no hashed email or phone, external id, fbc or fbp to match the person"
        return ""  # the sink's checks say the rest (an event too old for Meta, ...)

    def identifiers(self, event: Identifiers, person: Identifiers) -> Identifiers:
        """What Meta matches on, from any of the person's events."""
        return Identifiers(fbc=event.fbc or person.fbc, fbp=event.fbp or person.fbp,
                           email_sha256_meta=person.email_sha256_meta,
                           phone_sha256_meta=person.phone_sha256_meta,
                           external_id=person.external_id)

    def hold(self, click_time: dt.datetime, now: dt.datetime) -> tuple[dt.datetime, str] | None:
        return None

    def void_sent(self, plan: Plan, ledger: ActionPlan, upload: Upload, status: UploadStatus,
                  entry: ConversionEntry, now: dt.datetime) -> Upload | None:
        ledger.voided += 1  # Meta keeps it: counted in the plan, never sent again
        return None
