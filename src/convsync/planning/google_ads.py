"""Google Ads (Data Manager API) eligibility: a click id or a hashed email / phone; the
conversion action known, of type UPLOAD_CLICKS; the click within the action's click-through
window and not after the conversion; consent. An event whose click is under 6 hours old is
held (sent by a later run), never dropped. A voided conversion Google has is retracted
through the Google Ads API where the account still may, else restated to its voided value.

The click's time is the person's first stored event (the landing that carried the click id):
an approximation where clicks are not pulled.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Iterator

from convsync.model import Identifiers, JourneyEvent, Platform, Upload, UploadStatus
from convsync.planning import ActionPlan, Plan, Problems, Target, plan_uploads
from convsync.settings import ClientConfig, ConversionEntry
from convsync.store import Store

TOO_RECENT = dt.timedelta(hours=6)
"""Google refuses a click under about 6 hours old (TOO_RECENT_CLICK): such events wait."""
MAX_WINDOW_DAYS = 90
UPLOAD_TYPE = "UPLOAD_CLICKS"
RETRACTION_WINDOW = dt.timedelta(days=54)
"""Google takes a retraction up to 54 days after the conversion; later, it is restated."""


class GoogleAdsRules:
    destination = Platform.GOOGLE_ADS
    restates = True

    def __init__(self, config: ClientConfig) -> None:
        self.retraction_accounts = frozenset(config.google_ads.retraction_accounts
                                             if config.google_ads else ())

    def targets(self, config: ClientConfig, store: Store, plan: Plan) -> dict[str, Target]:
        """The configured upload actions as Google Ads describes them (pulled with the
        conversion actions); a missing or unsuitable one is a problem of the plan."""
        section = config.google_ads
        if section is None or not section.upload_actions:
            plan.problems.append("no [google_ads] upload_actions in the config: name the "
                                 "UPLOAD_CLICKS conversion action each conversion uploads to")
            return {}
        known = {c.platform_id: c for c in store.platform_conversions(Platform.GOOGLE_ADS)}
        found: dict[str, Target] = {}
        for conversion, action_id in section.upload_actions.items():
            plan.actions[conversion] = ActionPlan(conversion, action_id)
            action = known.get(action_id)
            if action is None:
                plan.problems.append(
                    f"upload action {action_id} (for {conversion}) is not among the Google Ads "
                    "conversion actions pulled: check the id in Google Ads > Goals > "
                    "Conversions, then run `convsync pull --platform google_ads`")
                continue
            plan.actions[conversion].action_name = action.name
            if action.settings.get("type") != UPLOAD_TYPE:
                plan.problems.append(
                    f"upload action {action_id} ({action.name!r}, for {conversion}) is of type "
                    f"{action.settings.get('type')}, not {UPLOAD_TYPE}: Google only imports "
                    "into an import action (Goals > Conversions > New conversion action > "
                    "Import > Manual import using API or uploads > Track conversions from "
                    "clicks)")
                continue
            found[conversion] = Target(action.account_id, action.platform_id,
                                       dict(action.settings))
        return found

    def refusal(self, config: ClientConfig, target: Target, event: JourneyEvent,
                identifiers: Identifiers, click_time: dt.datetime, now: dt.datetime) -> str:
        ids = identifiers
        if not (ids.gclid or ids.gbraid or ids.wbraid or ids.email_sha256_google
                or ids.phone_sha256_google):
            return "no click id (gclid / gbraid / wbraid) and no hashed email or phone"
        section = config.google_ads
        if section is not None and section.consent == "denied":
            return "consent denied in the config ([google_ads] consent)"
        window = min(int(str(target.settings.get("click_through_lookback_window_days") or
                             MAX_WINDOW_DAYS)), MAX_WINDOW_DAYS)
        if event.time < click_time:
            return "conversion before its click"
        if event.time - click_time > dt.timedelta(days=window) or (
                now - event.time > dt.timedelta(days=MAX_WINDOW_DAYS)):
            return f"past the action's {window}-day click-through window (EVENT_TOO_OLD)"
        return ""

    def identifiers(self, event: Identifiers, person: Identifiers) -> Identifiers:
        return _google_identifiers(event)

    def hold(self, click_time: dt.datetime, now: dt.datetime) -> tuple[dt.datetime, str] | None:
        if now - click_time < TOO_RECENT:
            return click_time + TOO_RECENT, "click under 6 hours old (Google: TOO_RECENT_CLICK)"
        return None

    def void_sent(self, plan: Plan, ledger: ActionPlan, upload: Upload, status: UploadStatus,
                  entry: ConversionEntry, now: dt.datetime) -> Upload | None:
        """Retracted through the Google Ads API where the account still may (within
        Google's 54 days), else restated to the config's value (the Data Manager API cannot
        retract: it still counts once)."""
        voided = upload._replace(value=round(entry.voided_value, 2))
        if (status is not UploadStatus.SENDING and upload.account_id in self.retraction_accounts
                and now - upload.time < RETRACTION_WINDOW):
            ledger.retracting += 1  # at its voided value, should Google refuse the retraction
            plan.retractions.append(voided)
            return None
        ledger.voided += 1
        ledger.events += 1
        ledger.value += entry.voided_value
        return voided


@functools.lru_cache(maxsize=64)
def _google_identifiers(ids: Identifiers) -> Identifiers:
    """Only what Google takes: click ids and Google-rule hashes. (Cached: a person's events
    come one after another and share one ``Identifiers``.)"""
    return Identifiers(gclid=ids.gclid, gbraid=ids.gbraid, wbraid=ids.wbraid,
                       email_sha256_google=ids.email_sha256_google,
                       phone_sha256_google=ids.phone_sha256_google)


def plan_google_ads(config: ClientConfig, store: Store, now: dt.datetime, *,
                    problems: Problems | None = None) -> tuple[Plan, Iterator[Upload]]:
    """The Google Ads uploads of the stored journeys as of ``now`` (see ``plan_uploads``)."""
    return plan_uploads(GoogleAdsRules(config), config, store, now, problems=problems)
