"""Meta (Conversions API) eligibility: a person Meta can match: a hashed email or phone
(Meta's rule), an external id, or the click's fbc / the browser's fbp, from any of the
person's events; the sink refuses the rest (an event older than Meta takes: 7 days, or the
config's ``max_event_age_days``). A conversion the CRM voids after it was sent stays with
Meta: the Conversions API can neither retract nor restate an event (a second copy under its
event id is dropped, or, after 48 hours, counted twice), so nothing is sent again.
"""

from __future__ import annotations

import datetime as dt

from convsync.model import Identifiers, JourneyEvent, Platform
from convsync.planning import FinalRules, Plan, Target, configured_targets
from convsync.settings import ClientConfig
from convsync.store import Store


class MetaRules(FinalRules):
    destination = Platform.META

    def targets(self, config: ClientConfig, store: Store, plan: Plan) -> dict[str, Target]:
        section = config.meta
        return configured_targets(
            plan, section.upload_events if section else None,
            (section.pixel_id or "") if section else "",
            "no [meta] upload_events in the config: name the event each conversion is sent "
            "to Meta under")

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
