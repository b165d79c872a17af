"""Klaviyo eligibility: a person seen on a Klaviyo profile when pulling (the profile id is
where the event goes: convsync keeps no email to find one by). A conversion the CRM voids
after it was sent stays on the profile: Klaviyo keeps the first event of a unique id and
cannot delete one through the API, so nothing is sent again.
"""

from __future__ import annotations

import datetime as dt

from convsync.model import Identifiers, JourneyEvent, Platform, Upload, UploadStatus
from convsync.planning import ActionPlan, Plan, Target
from convsync.settings import ClientConfig, ConversionEntry
from convsync.store import Store

ACCOUNT = "klaviyo"
"""The account of every Klaviyo upload: the API key's own."""


class KlaviyoRules:
    destination = Platform.KLAVIYO
    restates = False

    def targets(self, config: ClientConfig, store: Store, plan: Plan) -> dict[str, Target]:
        section = config.klaviyo
        if section is None or not section.upload_metrics:
            plan.problems.append("no [klaviyo] upload_metrics in the config: name the metric "
                                 "each conversion's valued events are created under")
            return {}
        found = {}
        for conversion, metric in section.upload_metrics.items():
            plan.actions[conversion] = ActionPlan(conversion, metric, metric)
            found[conversion] = Target(ACCOUNT, metric)
        return found

    def refusal(self, config: ClientConfig, target: Target, event: JourneyEvent,
                identifiers: Identifiers, click_time: dt.datetime, now: dt.datetime) -> str:
        if not identifiers.klaviyo_profile_id:
            return "no Klaviyo profile id (the person was never seen in a Klaviyo pull)"
        return ""

    def identifiers(self, event: Identifiers, person: Identifiers) -> Identifiers:
        """The profile only: Klaviyo is never sent an identifier it did not give."""
        return Identifiers(klaviyo_profile_id=event.klaviyo_profile_id
                           or person.klaviyo_profile_id)

    def hold(self, click_time: dt.datetime, now: dt.datetime) -> tuple[dt.datetime, str] | None:
        return None

    def void_sent(self, plan: Plan, ledger: ActionPlan, upload: Upload, status: UploadStatus,
                  entry: ConversionEntry, now: dt.datetime) -> Upload | None:
        ledger.voided += 1  # Klaviyo keeps it: counted in the plan, never sent again
        return None
