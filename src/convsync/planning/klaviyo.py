"""Klaviyo eligibility: a person seen on a Klaviyo profile when pulling (the profile id is
where the event goes: convsync keeps no email to find one by). A conversion the CRM voids
after it was sent stays on the profile: Klaviyo keeps the first event of a unique id and
cannot delete one through the API, so nothing is sent again.
"""

from __future__ import annotations

import datetime as dt

from convsync.model import Identifiers, JourneyEvent, Platform
from convsync.planning import FinalRules, Plan, Target, configured_targets
from convsync.settings import ClientConfig
from convsync.store import Store

ACCOUNT = "klaviyo"
"""The account of every Klaviyo upload: the API key's own."""


class KlaviyoRules(FinalRules):
    destination = Platform.KLAVIYO

    def targets(self, config: ClientConfig, store: Store, plan: Plan) -> dict[str, Target]:
        section = config.klaviyo
        return configured_targets(
            plan, section.upload_metrics if section else None, ACCOUNT,
            "no [klaviyo] upload_metrics in the config: name the metric each conversion's "
            "valued events are created under")

    def refusal(self, config: ClientConfig, target: Target, event: JourneyEvent,
                identifiers: Identifiers, click_time: dt.datetime, now: dt.datetime) -> str:
        if not identifiers.klaviyo_profile_id:
            return "no Klaviyo profile id (the person was never seen in a Klaviyo pull)"
        return ""

    def identifiers(self, event: Identifiers, person: Identifiers) -> Identifiers:
        """The profile only: Klaviyo is never sent an identifier it did not give."""
        return Identifiers(klaviyo_profile_id=event.klaviyo_profile_id
                           or person.klaviyo_profile_id)
