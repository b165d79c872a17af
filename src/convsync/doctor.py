"""``convsync doctor``: can the main job (``convsync sync``: pull, then push) run for a client?

For each enabled platform it checks the credentials and the access the pull and the push need,
and it checks the store. Every check makes the smallest read the platform's own SDK offers (the
clients ``sources`` and ``sinks`` build, never hand-rolled HTTP), with a short timeout and no
retries, and says ``ok`` or the problem with its fix, in the platform's own terms, naming the
config key or environment variable to change and never a secret's value:

- Google Ads: the credentials are set (``Secrets.missing_for``); each ``customer_ids`` account
  answers ``SELECT customer.id, ... FROM customer`` (``GoogleAdsService.Search``); each
  ``upload_actions`` action is looked up by id (``FROM conversion_action WHERE
  conversion_action.id IN (...)``, one query per account): found, of type UPLOAD_CLICKS,
  ENABLED; then the Data Manager is asked to validate (``IngestEvents`` with
  ``validate_only``, through ``DataManagerSink``) one harmless event for the action: Google
  keeps nothing, and answers whether the credentials' grant covers the Data Manager scope, may
  upload to the account, and whether the action takes uploads yet (one created under about 6
  hours ago does not: the Google Ads API has no creation time for an action, the Data Manager's
  answer is where Google says it). The Data Manager's own row is the first such answer.
- GA4: the property answers a one-row ``runReport`` (yesterday's event count).
- Meta: the token answers ``GET /me``; each ad account ``GET act_<id>`` (its name, status,
  currency and time zone); with ``[meta] upload_events``, the pixel ``GET <pixel_id>``.
- Klaviyo: the key reads the account (``GET /api/accounts``: accounts:read, optional: without
  it convsync uses ``[client] currency``), the metrics (metrics:read) and one event
  (events:read); with ``[klaviyo] upload_metrics``, a note that events:write cannot be tested
  without writing an event.
- The store: the URL and driver; a SQLite file that exists, is a file and may be written (or a
  folder it can be made in); the database opens, takes a write (rolled back) and has the schema
  this convsync writes. Nothing is created or migrated: a store that does not exist yet is ok
  (the first run makes it); an older schema is a note (the next run migrates it).

A check's status is ``ok``, ``problem`` (the job would fail: exit 2), ``note`` (worth knowing,
fails nothing) or ``skipped`` (it could not run because another check's problem stands in its
way, which that check names). Checks are independent: each catches its own errors, and the
platforms are checked at once, each in its own thread, so the whole takes about as long as the
slowest platform.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from rich import box
from rich.markup import escape
from rich.table import Table

from convsync.errors import ConfigError, PlatformError
from convsync.model import Identifiers, Platform, Upload
from convsync.redact import Redactor
from convsync.settings import ClientConfig, GoogleAdsSection, Secrets, load_secrets

log = logging.getLogger(__name__)

TIMEOUT = 10.0
"""Seconds each network call may take: doctor must be quick, and never retries."""
SQLITE_BUSY_SECONDS = 2.0
"""How long the store's write probe waits for a lock a running sync holds."""
PROBE_GCLID = "convsync_doctor_probe_not_a_click"
"""The click id of the harmless event the Data Manager is asked to validate (nothing is kept:
``validate_only``); shaped like a click id, so only access and the action are judged."""
PROBE_AGE = dt.timedelta(days=2)
"""How old the harmless event is: in the past for Google and for a sandbox ending yesterday."""
UPLOAD_TYPE = "UPLOAD_CLICKS"
META_ACCOUNT_STATUS = {1: "ACTIVE", 2: "DISABLED", 3: "UNSETTLED", 7: "PENDING_RISK_REVIEW",
                       8: "PENDING_SETTLEMENT", 9: "IN_GRACE_PERIOD", 100: "PENDING_CLOSURE",
                       101: "CLOSED", 201: "ANY_ACTIVE", 202: "ANY_CLOSED"}

Status = Literal["ok", "problem", "note", "skipped"]


@dataclass(frozen=True)
class Check:
    """One line of the doctor's report: what was checked, what was found, what to do."""

    platform: str  # google_ads | ga4 | meta | klaviyo | store | secrets
    name: str  # "account 123-456-7890", "upload action 6108", ...
    status: Status
    result: str  # what was found (ok: what was read; else the problem in the platform's words)
    fix: str = ""  # what to change: a config key, an environment variable, a platform setting

    @property
    def label(self) -> str:
        return f"{self.platform} {self.name}" if self.name else self.platform


@dataclass
class Report:
    config: str
    client: str
    checks: list[Check] = field(default_factory=list)

    @property
    def problems(self) -> list[Check]:
        return [c for c in self.checks if c.status == "problem"]

    @property
    def ok(self) -> bool:
        return not self.problems

    def counts(self) -> dict[str, int]:
        out = {"ok": 0, "problem": 0, "note": 0, "skipped": 0}
        for check in self.checks:
            out[check.status] += 1
        return out

    def summary(self) -> dict[str, Any]:
        return {"config": self.config, "client": self.client, "ok": self.ok,
                "counts": self.counts(),
                "checks": [{"check": c.label, "platform": c.platform, "name": c.name,
                            "status": c.status, "result": c.result, "fix": c.fix}
                           for c in self.checks]}


# -- running the checks ------------------------------------------------------------------------

def load_secrets_checked(config: ClientConfig) -> tuple[Secrets, list[Check]]:
    """The client's secrets, and the check of the secrets file. A secrets file that cannot be
    used is a problem, and the platforms are then checked as if no secret were set (each says
    what it lacks), rather than the doctor stopping there."""
    try:
        secrets = load_secrets(config)
    except ConfigError as error:
        found = _problems_text(error, keys=True)
        return Secrets.model_construct(), [Check(
            "secrets", "", "problem", f"the secrets cannot be read: {found}",
            "fix the secrets file named by [client] secrets_file (or the CONVSYNC_* variable "
            "named), then run doctor again")]
    file = config.client.secrets_file
    where = f"secrets file {file} and the environment" if file else "the environment"
    checks = [Check("secrets", "", "ok", f"read from {where}")]
    if file is not None and config.path is not None:
        path = file if file.is_absolute() else config.path.parent / file
        if path.exists() and path.stat().st_mode & 0o077:
            checks = [Check("secrets", "", "note",
                            f"read from {path}, which other users of this machine can read",
                            f"chmod 600 {path}")]
    return secrets, checks


def run(config: ClientConfig, secrets: Secrets, checks: list[Check] | None = None, *,
        timeout: float = TIMEOUT, now: dt.datetime | None = None) -> Report:
    """Every check for this client, in a stable order (secrets, store, then each enabled
    platform), each platform's checks run at once in threads. Results are redacted of every
    secret value."""
    now = now or dt.datetime.now(dt.UTC)
    groups: list[tuple[str, Callable[[], list[Check]]]] = [
        ("store", lambda: check_store(config.store_url()))]
    enabled = config.enabled_platforms()
    if Platform.GOOGLE_ADS in enabled and config.google_ads is not None:
        section = config.google_ads
        groups.append(("google_ads", lambda: check_google_ads(
            section, secrets, config.client.currency, timeout=timeout, now=now)))
    if Platform.GA4 in enabled and config.ga4 is not None:
        groups.append(("ga4", lambda: check_ga4(config, secrets, timeout=timeout)))
    if Platform.META in enabled and config.meta is not None:
        groups.append(("meta", lambda: check_meta(config, secrets, timeout=timeout)))
    if Platform.KLAVIYO in enabled and config.klaviyo is not None:
        groups.append(("klaviyo", lambda: check_klaviyo(config, secrets, timeout=timeout)))
    found = list(checks or [])
    with _quiet_sdk_logs(), ThreadPoolExecutor(max_workers=len(groups)) as pool:
        for group in list(pool.map(_guarded_group, groups)):
            found += group
    redact = Redactor(secrets.values())
    return Report(str(config.path or ""), config.client.name,
                  [Check(c.platform, c.name, c.status, redact(c.result), redact(c.fix))
                   for c in found])


def _problems_text(error: ConfigError, *, keys: bool = False) -> str:
    """A ConfigError's problems in one line (each a ``Problem`` with its key, or a text)."""
    parts = []
    for problem in error.problems:
        message = getattr(problem, "message", None)
        key = getattr(problem, "key", None)
        if message is None:
            parts.append(str(problem))
        else:
            parts.append(f"{key}: {message}" if keys and key else str(message))
    return "; ".join(parts) or str(error)


def _guarded_group(group: tuple[str, Callable[[], list[Check]]]) -> list[Check]:
    platform, checks = group
    try:
        return checks()
    except Exception as error:  # a bug in a check must not hide the other platforms' checks
        log.debug("doctor: the %s checks failed", platform, exc_info=True)
        return [_unexpected(platform, "", error)]


def _unexpected(platform: str, name: str, error: BaseException) -> Check:
    return Check(platform, name, "problem",
                 f"could not be checked: {type(error).__name__}: {error}",
                 "if the message names nothing in the config, it is a convsync bug: please "
                 "report it with the output of `convsync -v doctor`")


@contextlib.contextmanager
def _quiet_sdk_logs() -> Iterator[None]:
    """The google-ads client and the Data Manager sink log every failed request as a warning;
    the doctor reports each failure in its table, once."""
    loggers = [logging.getLogger(name) for name in (
        "google.ads.googleads.client", "convsync.sinks.google_ads.datamanager")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


# -- Google (Ads and GA4) ----------------------------------------------------------------------

_GOOGLE_TOKEN_FIX = (
    "the OAuth credentials were refused: make a new refresh token (scopes adwords, "
    "analytics.readonly and datamanager) and set CONVSYNC_GOOGLE_REFRESH_TOKEN with its "
    "CONVSYNC_GOOGLE_CLIENT_ID and CONVSYNC_GOOGLE_CLIENT_SECRET, or set "
    "CONVSYNC_GOOGLE_SERVICE_ACCOUNT_FILE, or a fresh CONVSYNC_GOOGLE_ACCESS_TOKEN")


def _google_credentials_check(platform: str, secrets: Secrets) -> Check:
    missing = secrets.missing_for(Platform(platform))
    if missing:
        return Check(platform, "credentials", "problem",
                     f"{platform} is enabled but no Google credentials are set",
                     f"{missing}; or set [{platform}] enabled = false")
    if secrets.google_access_token is not None:
        kind = ("CONVSYNC_GOOGLE_ACCESS_TOKEN (such a token lasts an hour: fine for one "
                "run, not for a schedule)")
    elif secrets.google_refresh_token is not None and secrets.google_client_secret is not None:
        kind = "an OAuth refresh token with its client id and secret"
    else:
        file = secrets.google_service_account_file
        if file is not None and not file.is_file():
            return Check(platform, "credentials", "problem",
                         f"the service account key file {file} does not exist",
                         "set CONVSYNC_GOOGLE_SERVICE_ACCOUNT_FILE to the key file (JSON) "
                         "downloaded from Google Cloud > IAM > Service accounts > Keys")
        kind = f"a service account key file ({file})"
    return Check(platform, "credentials", "ok", f"set: {kind}")


def _google_ads_problem(error: BaseException, customer: str) -> tuple[str, str]:
    """(what Google Ads said, what to do) for an error of a call about ``customer``."""
    from google.api_core import exceptions as api_exceptions
    from google.auth import exceptions as auth_errors

    from convsync.sources import google_ads as source

    shown = _dashed(customer)
    if isinstance(error, auth_errors.RefreshError):
        return f"Google refused to renew the OAuth credentials ({error})", _GOOGLE_TOKEN_FIX
    failure = source.failure_of(error)
    if failure is None:
        if isinstance(error, api_exceptions.Unauthenticated):
            return f"Google Ads refused the credentials ({error.message})", _GOOGLE_TOKEN_FIX
        if isinstance(error, api_exceptions.DeadlineExceeded | api_exceptions.ServiceUnavailable):
            return (f"Google Ads did not answer ({type(error).__name__})",
                    "check [google_ads] endpoint (leave it out for Google's) and this "
                    "machine's network, then run doctor again")
        text = source.explain(error) if isinstance(error, Exception) else None
        return text or f"{type(error).__name__}: {error}", "see the message"
    reasons = [source.error_code_name(e) for e in failure.errors]
    said = source.explain(error) if isinstance(error, Exception) else None
    said = said or "; ".join(reasons)
    fixes = {
        "authorization_error.USER_PERMISSION_DENIED":
            f"the Google account behind the credentials cannot read account {shown}: check "
            "its id in [google_ads] customer_ids (10 digits, top right in Google Ads), give "
            "that Google account access (Google Ads > Admin > Access and security), or set "
            "[google_ads] login_customer_id to the manager account it has access through",
        "authorization_error.CUSTOMER_NOT_ENABLED":
            f"account {shown} is cancelled or not set up yet: reactivate it in Google Ads, or "
            "remove it from [google_ads] customer_ids",
        "authorization_error.INVALID_LOGIN_CUSTOMER_ID_SERVING_CUSTOMER_ID_COMBINATION":
            f"[google_ads] login_customer_id is not a manager of {shown}: set it to the "
            "manager the account is linked to, or leave it out",
        "authentication_error.CUSTOMER_NOT_FOUND":
            f"no Google Ads account {shown}: check [google_ads] customer_ids",
        "authentication_error.CLIENT_CUSTOMER_ID_INVALID":
            f"no Google Ads account {shown}: check [google_ads] customer_ids",
        "request_error.INVALID_CUSTOMER_ID":
            "check [google_ads] customer_ids: 10 digits, like 123-456-7890",
        "authentication_error.NOT_ADS_USER":
            "the Google account behind the credentials has no Google Ads access: make the "
            "refresh token with a Google account that has access to the accounts",
        "quota_error.RESOURCE_EXHAUSTED":
            "the Cloud project's Google Ads operations for today are spent (they reset at "
            "midnight Pacific): run doctor again tomorrow, or get the Cloud project a higher "
            "access level (then set [google_ads] access_level)",
    }
    for reason in reasons:
        if reason in fixes:
            return said, fixes[reason]
        if reason.startswith("authentication_error."):
            return said, _GOOGLE_TOKEN_FIX
    return said, ("see the reason in the Google Ads API's error reference "
                  "(developers.google.com/google-ads/api/reference/rpc)")


def _dashed(customer_id: str) -> str:
    return (f"{customer_id[:3]}-{customer_id[3:6]}-{customer_id[6:]}"
            if len(customer_id) == 10 else customer_id)


ACCOUNT_QUERY = "SELECT customer.id, customer.time_zone, customer.currency_code FROM customer"
ACTIONS_QUERY = ("SELECT conversion_action.id, conversion_action.name, conversion_action.type, "
                 "conversion_action.status FROM conversion_action "
                 "WHERE conversion_action.id IN ({ids})")


@dataclass(frozen=True)
class _Action:
    account: str
    id: str
    name: str
    type: str
    status: str


@dataclass
class _Probe:
    """What the Data Manager said of the harmless event for one action ("" reason: taken)."""

    reason: str
    message: str = ""
    fix: str = ""

    @property
    def access_refused(self) -> bool:
        """Whether the refusal is about the credentials, the account or the service rather
        than the action (then the other actions would be refused the same way)."""
        return bool(self.reason) and self.reason not in _ACTION_REASONS


_UNANSWERED = ("check [google_ads] datamanager_endpoint (leave it out for Google's) and this "
               "machine's network, then run doctor again")
_DOCTOR_FIXES = {
    "UNAVAILABLE": _UNANSWERED, "DEADLINE_EXCEEDED": _UNANSWERED,
    "INTERNAL": "Google failed on its side: run doctor again later",
    "INTERNAL_ERROR": "Google failed on its side: run doctor again later",
    "RATE_LIMIT_EXCEEDED": "the Cloud project's Data Manager requests are used up for now "
                           "(shared by every client using it): run doctor again later",
    "RESOURCE_EXHAUSTED": "the Cloud project's Data Manager requests are used up for now "
                          "(shared by every client using it): run doctor again later",
}
"""The Data Manager's transient refusals, in the doctor's words (the sink's speak of pushing)."""
_ACTION_REASONS = frozenset({"INVALID_CONVERSION_ACTION_ID", "INVALID_CONVERSION_ACTION_TYPE",
                             "CONVERSION_ACTION_TOO_RECENTLY_CREATED", "INVALID_DESTINATION"})


def check_google_ads(section: GoogleAdsSection, secrets: Secrets, currency: str, *,
                     timeout: float = TIMEOUT, now: dt.datetime | None = None) -> list[Check]:
    from google.ads.googleads.client import GoogleAdsClient

    from convsync.sources import google_ads as source

    now = now or dt.datetime.now(dt.UTC)
    credentials = _google_credentials_check("google_ads", secrets)
    checks = [credentials]
    accounts = section.customer_ids
    actions = _upload_actions(section)
    if credentials.status == "problem":
        why = "no usable Google credentials (see google_ads credentials)"
        checks += [Check("google_ads", f"account {_dashed(c)}", "skipped", why)
                   for c in accounts]
        if actions:
            checks.append(Check("google_ads", "Data Manager", "skipped", why))
            checks += [Check("google_ads", f"upload action {a}", "skipped", why)
                       for a in actions]
        return checks
    try:
        client: GoogleAdsClient | None = source.connect(section, secrets)
        connect_error: Exception | None = None
    except Exception as error:
        client, connect_error = None, error
    for customer in accounts:
        checks.append(_account_check(client, connect_error, customer, timeout))
    if not actions:
        checks.append(Check("google_ads", "upload actions", "note",
                            "none configured: push sends nothing to Google Ads",
                            "to push, name an UPLOAD_CLICKS action per conversion in "
                            "[google_ads] upload_actions"))
        return checks
    found, unreadable = _find_actions(client, connect_error, accounts, list(actions), timeout)
    probe = _Prober(section, secrets, currency, timeout, now)
    first = next((a for a in actions if _usable(found.get(a))), next(iter(actions)))
    checks.append(_datamanager_check(section, probe, first, found.get(first), accounts[0]))
    for action_id, conversions in actions.items():
        checks.append(_action_check(action_id, conversions, found.get(action_id), unreadable,
                                    accounts, probe))
    return checks


def _upload_actions(section: GoogleAdsSection) -> dict[str, list[str]]:
    """Each configured upload action id, with the conversions that upload to it."""
    out: dict[str, list[str]] = {}
    for conversion, action in section.upload_actions.items():
        out.setdefault(action, []).append(conversion)
    return out


def _account_check(client: Any, connect_error: Exception | None, customer: str,
                   timeout: float) -> Check:
    name = f"account {_dashed(customer)}"
    if client is None:
        assert connect_error is not None
        return _connect_problem("google_ads", name, connect_error)
    try:
        rows = _search(client, customer, ACCOUNT_QUERY, timeout)
    except Exception as error:
        said, fix = _google_ads_problem(error, customer)
        return Check("google_ads", name, "problem", said, fix)
    if not rows:
        return Check("google_ads", name, "problem", "Google Ads answered no row for the account",
                     "check [google_ads] customer_ids")
    row = rows[0].customer
    return Check("google_ads", name, "ok",
                 f"readable (time zone {row.time_zone}, currency {row.currency_code})")


def _connect_problem(platform: str, name: str, error: Exception) -> Check:
    if isinstance(error, ConfigError):
        said = _problems_text(error)
        return Check(platform, name, "problem", f"cannot connect: {said}",
                     f"fix [{platform}] ca_file (or remove it to use the platform's own "
                     "certificates)")
    return Check(platform, name, "problem",
                 f"the client could not be made: {type(error).__name__}: {error}",
                 f"check the [{platform}] section and the credentials' variables")


def _search(client: Any, customer: str, query: str, timeout: float) -> list[Any]:
    """One GoogleAdsService.Search: one operation, no retry, ``timeout`` seconds."""
    service = client.get_service("GoogleAdsService")
    return list(service.search(customer_id=customer, query=query, retry=None, timeout=timeout))


def _find_actions(client: Any, connect_error: Exception | None, accounts: list[str],
                  ids: list[str], timeout: float
                  ) -> tuple[dict[str, _Action], dict[str, str]]:
    """The configured upload actions as each account reports them (one query per account,
    removed ones included), and the accounts that could not be asked, with why."""
    from convsync.sources.google_ads import _enum_name

    found: dict[str, _Action] = {}
    unreadable: dict[str, str] = {}
    if client is None:
        return found, dict.fromkeys(accounts, str(connect_error))
    query = ACTIONS_QUERY.format(ids=", ".join(ids))
    for customer in accounts:
        try:
            rows = _search(client, customer, query, timeout)
        except Exception as error:
            unreadable[customer] = _google_ads_problem(error, customer)[0]
            continue
        for row in rows:
            action = row.conversion_action
            found.setdefault(str(action.id), _Action(
                customer, str(action.id), action.name, _enum_name(action, "type"),
                _enum_name(action, "status")))
    return found, unreadable


def _usable(action: _Action | None) -> bool:
    return action is not None and action.type == UPLOAD_TYPE and action.status == "ENABLED"


class _Prober:
    """Asks the Data Manager to validate one harmless event per action, once each."""

    def __init__(self, section: GoogleAdsSection, secrets: Secrets, currency: str,
                 timeout: float, now: dt.datetime) -> None:
        self.section = section
        self.secrets = secrets
        self.currency = currency
        self.timeout = timeout
        self.now = now
        self.answers: dict[str, _Probe] = {}
        self._sink: Any = None

    def sink(self) -> Any:
        from convsync.sinks.google_ads import datamanager

        if self._sink is None:
            # "denied" consent never reaches a request: ask with the account's own settings
            section = (self.section.model_copy(update={"consent": "unspecified"})
                       if self.section.consent == "denied" else self.section)
            client = datamanager.connect(section, self.secrets)
            self._sink = datamanager.DataManagerSink(client, section, attempts=1,
                                                     timeout=self.timeout,
                                                     sleep=lambda seconds: None)
        return self._sink

    def __call__(self, action_id: str, account: str) -> _Probe:
        """The Data Manager's answer for this action; once it refused access, that refusal
        stands for every action (asking again would only be refused again)."""
        if action_id not in self.answers:
            refused = next((a for a in self.answers.values() if a.access_refused), None)
            self.answers[action_id] = refused or self._ask(action_id, account)
        return self.answers[action_id]

    def _ask(self, action_id: str, account: str) -> _Probe:
        event = Upload(destination=Platform.GOOGLE_ADS, conversion_action=action_id,
                       dedupe_key="convsync-doctor-probe", value=0.0, currency=self.currency,
                       time=self.now - PROBE_AGE, account_id=account,
                       identifiers=Identifiers(gclid=PROBE_GCLID))
        try:
            self.sink().send([event], validate_only=True)
        except PlatformError as error:
            reason = error.reason or "UNKNOWN"
            return _Probe(reason, error.message, _DOCTOR_FIXES.get(reason, error.fix))
        except ConfigError as error:
            said = _problems_text(error)
            return _Probe("CA_FILE", f"cannot connect: {said}",
                          "fix [google_ads] ca_file (or remove it to use Google's certificates)")
        return _Probe("")


def _datamanager_check(section: GoogleAdsSection, probe: _Prober, action_id: str,
                       action: _Action | None, first_account: str) -> Check:
    name = "Data Manager"
    account = action.account if action else first_account
    try:
        answer = probe(action_id, account)
    except Exception as error:
        return _unexpected("google_ads", name, error)
    consent = ("; note: [google_ads] consent is \"denied\", so push sends nothing"
               if section.consent == "denied" else "")
    if answer.access_refused:
        if answer.reason == "CA_FILE":
            return Check("google_ads", name, "problem", answer.message, answer.fix)
        said = re.sub(r"^Google refused the upload of 1 event\(s\): ", "", answer.message)
        return Check("google_ads", name, "problem",
                     f"a validate_only IngestEvents for action {action_id} in account "
                     f"{_dashed(account)} was refused: {said}", answer.fix)
    status: Status = "note" if consent else "ok"
    return Check("google_ads", name, status,
                 "reachable with the datamanager scope (a validate_only IngestEvents for "
                 f"action {action_id}: nothing kept){consent}",
                 "set [google_ads] consent to \"granted\" or \"unspecified\" to push"
                 if consent else "")


def _action_check(action_id: str, conversions: list[str], action: _Action | None,
                  unreadable: dict[str, str], accounts: list[str], probe: _Prober) -> Check:
    from convsync.sinks.google_ads.datamanager import FIXES

    name = f"upload action {action_id}"
    uploads = ", ".join(conversions)
    if action is None and len(unreadable) < len(accounts):
        where = ", ".join(_dashed(c) for c in accounts if c not in unreadable)
        also = (f" (account {', '.join(_dashed(c) for c in unreadable)} could not be read)"
                if unreadable else "")
        return Check("google_ads", name, "problem",
                     f"no conversion action {action_id} in account {where}{also}; "
                     f"[google_ads] upload_actions sends {uploads} to it",
                     FIXES["INVALID_CONVERSION_ACTION_ID"])
    if action is not None:
        label = f"{action.name!r} in {_dashed(action.account)}"
        if action.type != UPLOAD_TYPE:
            return Check("google_ads", name, "problem",
                         f"{label} is of type {action.type}, not {UPLOAD_TYPE}",
                         FIXES["INVALID_CONVERSION_ACTION_TYPE"])
        if action.status != "ENABLED":
            return Check("google_ads", name, "problem",
                         f"{label} is {action.status}: Google takes no uploads into it",
                         "enable it in Google Ads > Goals > Conversions, or name an enabled "
                         "UPLOAD_CLICKS action in [google_ads] upload_actions")
    else:
        label = f"action {action_id} (the Google Ads API could not be asked)"
    try:
        answer = probe(action_id, action.account if action else accounts[0])
    except Exception as error:
        return _unexpected("google_ads", name, error)
    if answer.reason == "":
        found = (f"{label}: {UPLOAD_TYPE}, ENABLED, takes uploads" if action else
                 f"{label}: the Data Manager takes uploads into it")
        return Check("google_ads", name, "ok", f"{found} (for {uploads})")
    if answer.access_refused:
        if action is None:
            return Check("google_ads", name, "skipped",
                         f"not checked: no account could be asked for action {action_id} (see "
                         "the google_ads account checks) and the Data Manager refused access "
                         "(see google_ads Data Manager)")
        return Check("google_ads", name, "ok",
                     f"{label}: {UPLOAD_TYPE}, ENABLED; whether it takes uploads was not "
                     "asked: the Data Manager refused access (see google_ads Data Manager)")
    if answer.reason == "CONVERSION_ACTION_TOO_RECENTLY_CREATED":
        return Check("google_ads", name, "problem",
                     f"{label} was created under 6 hours ago: Google takes no uploads into it "
                     "yet", FIXES["CONVERSION_ACTION_TOO_RECENTLY_CREATED"])
    return Check("google_ads", name, "problem", f"{label}: {answer.message}", answer.fix)


def check_ga4(config: ClientConfig, secrets: Secrets, *, timeout: float = TIMEOUT) -> list[Check]:
    from google.analytics.data_v1beta.types import DateRange, Metric, RunReportRequest
    from google.api_core import exceptions as api_exceptions
    from google.auth import exceptions as auth_errors

    from convsync.sources import ga4 as source

    section = config.ga4
    assert section is not None
    credentials = _google_credentials_check("ga4", secrets)
    name = f"property {section.property_id}"
    if credentials.status == "problem":
        return [credentials, Check("ga4", name, "skipped",
                                   "no usable Google credentials (see ga4 credentials)")]
    try:
        client = source.connect(section, secrets)
        response = client.run_report(request=RunReportRequest(
            property=f"properties/{section.property_id}",
            date_ranges=[DateRange(start_date="yesterday", end_date="yesterday")],
            metrics=[Metric(name="eventCount")], limit=1), retry=None, timeout=timeout)
    except ConfigError as error:
        return [credentials, _connect_problem("ga4", name, error)]
    except auth_errors.RefreshError as error:
        return [credentials, Check("ga4", name, "problem",
                                   f"Google refused to renew the OAuth credentials ({error})",
                                   _GOOGLE_TOKEN_FIX)]
    except api_exceptions.PermissionDenied as error:
        fix = (f"the Google account behind the credentials cannot read property "
               f"{section.property_id}: check [ga4] property_id (GA4 Admin > Property details), "
               "or give that Google account the Viewer role (GA4 Admin > Property access "
               "management)")
        if "scope" in (error.message or "").lower():
            fix = ("the grant lacks the analytics.readonly scope: make a new refresh token "
                   "with it and set CONVSYNC_GOOGLE_REFRESH_TOKEN")
        return [credentials, Check("ga4", name, "problem", f"GA4: {error.message}", fix)]
    except api_exceptions.Unauthenticated as error:
        return [credentials, Check("ga4", name, "problem", f"GA4: {error.message}",
                                   _GOOGLE_TOKEN_FIX)]
    except api_exceptions.InvalidArgument as error:
        return [credentials, Check("ga4", name, "problem", f"GA4: {error.message}",
                                   "check [ga4] property_id: the property's number, from GA4 "
                                   "Admin > Property details")]
    except (api_exceptions.DeadlineExceeded, api_exceptions.ServiceUnavailable) as error:
        return [credentials, Check("ga4", name, "problem",
                                   f"GA4 did not answer ({type(error).__name__})",
                                   "check [ga4] endpoint (leave it out for Google's) and this "
                                   "machine's network, then run doctor again")]
    except api_exceptions.GoogleAPICallError as error:
        return [credentials, Check("ga4", name, "problem", f"GA4: {error.code} {error.message}",
                                   "see the message")]
    meta = response.metadata
    return [credentials, Check("ga4", name, "ok",
                               f"readable (time zone {meta.time_zone}, currency "
                               f"{meta.currency_code})")]


# -- Meta --------------------------------------------------------------------------------------

_META_TOKEN_CODES = frozenset({190, 102, 104})


def check_meta(config: ClientConfig, secrets: Secrets, *,
               timeout: float = TIMEOUT) -> list[Check]:
    from facebook_business.adobjects.adaccount import AdAccount
    from facebook_business.adobjects.adspixel import AdsPixel
    from facebook_business.adobjects.user import User

    from convsync.sources import meta as source

    section = config.meta
    assert section is not None
    pushing = bool(section.upload_events)
    names = [f"account {a}" for a in section.ad_account_ids]
    pixel = f"pixel {section.pixel_id}" if section.pixel_id else "pixel"
    if secrets.meta_access_token is None:
        why = "no access token (see meta credentials)"
        return [Check("meta", "credentials", "problem", "meta is enabled but has no access token",
                      "set CONVSYNC_META_ACCESS_TOKEN (a system user's token with ads_read"
                      f"{' and ads_management' if pushing else ''}), or set [meta] enabled = "
                      "false"),
                *(Check("meta", n, "skipped", why) for n in names),
                *([Check("meta", pixel, "skipped", why)] if pushing else [])]
    api = source.connect(section, secrets, timeout=timeout)
    checks = [Check("meta", "credentials", "ok", "CONVSYNC_META_ACCESS_TOKEN is set")]
    try:
        me = User(fbid="me", api=api).api_get(fields=["id", "name"])
        checks.append(Check("meta", "access token", "ok",
                            f"valid (it belongs to {me.get('name') or me.get('id')})"))
        token_ok = True
    except Exception as error:
        said, fix = _meta_problem(error, "token")
        checks.append(Check("meta", "access token", "problem", said, fix))
        token_ok = False
    for account_id, name in zip(section.ad_account_ids, names, strict=True):
        try:
            node = AdAccount(account_id, api=api).api_get(
                fields=["name", "account_status", "currency", "timezone_name"])
        except Exception as error:
            checks.append(_meta_failed(error, name, "account", token_ok))
            continue
        status = META_ACCOUNT_STATUS.get(int(node.get("account_status") or 0),
                                         str(node.get("account_status")))
        found = (f"{node.get('name')!r}, {status}, currency {node.get('currency')}, time zone "
                 f"{node.get('timezone_name')}")
        if status == "ACTIVE":
            checks.append(Check("meta", name, "ok", f"readable ({found})"))
        else:
            checks.append(Check("meta", name, "note",
                                f"readable, but not active ({found}): its insights still pull",
                                "settle the account's status in Meta Business Settings > "
                                "Accounts > Ad accounts"))
    if not pushing:
        return checks
    if not section.pixel_id:
        checks.append(Check("meta", pixel, "problem",
                            "[meta] upload_events is set but no pixel: push has nowhere to "
                            "send", "set [meta] pixel_id to the dataset (pixel) id from Events "
                            "Manager > Data sources"))
        return checks
    try:
        node = AdsPixel(section.pixel_id, api=api).api_get(fields=["id", "name"])
    except Exception as error:
        checks.append(_meta_failed(error, pixel, "pixel", token_ok))
        return checks
    checks.append(Check("meta", pixel, "ok",
                        f"reachable ({node.get('name')!r}); sending to it is not tried"))
    return checks


def _meta_failed(error: BaseException, name: str, what: str, token_ok: bool) -> Check:
    from facebook_business.exceptions import FacebookRequestError

    if (not token_ok and isinstance(error, FacebookRequestError)
            and error.api_error_code() in _META_TOKEN_CODES):
        return Check("meta", name, "skipped", "the access token was refused (see meta access "
                                              "token)")
    said, fix = _meta_problem(error, what)
    return Check("meta", name, "problem", said, fix)


def _meta_problem(error: BaseException, what: str) -> tuple[str, str]:
    """(what Meta said, what to do) for a failed read of the token's user, an ad account or
    the pixel."""
    from facebook_business.exceptions import FacebookRequestError
    from requests import exceptions as http_errors

    from convsync.sinks import meta as sink
    from convsync.sources import meta as source

    if isinstance(error, http_errors.ConnectionError | http_errors.Timeout):
        return (f"Meta did not answer ({type(error).__name__})",
                "check [meta] endpoint (leave it out for Meta's) and this machine's network, "
                "then run doctor again")
    if not isinstance(error, FacebookRequestError):
        return f"{type(error).__name__}: {error}", "see the message"
    code, subcode = error.api_error_code(), error.api_error_subcode()
    said = (f"Meta Graph API error {code}{f'/{subcode}' if subcode else ''}: "
            f"{error.api_error_message()}")
    if code in _META_TOKEN_CODES:
        return said, source.FIXES[190 if code == 102 else code]
    if code == 100 and subcode == 33:
        if what == "pixel":
            return said, ("check [meta] pixel_id (Events Manager > Data sources: the dataset's "
                          "id), or give the token's system user the pixel (Business Settings > "
                          "Data sources > Datasets > Assign people)")
        return said, ("check [meta] ad_account_ids (act_ and the id Ads Manager shows), or give "
                      "the token's system user the ad account (Business Settings > Accounts > "
                      "Ad accounts > Assign people) with ads_read")
    if source.throttled(error):
        return said, "Meta throttles this app or ad account: run doctor again later"
    fixes = sink.FIXES if what == "pixel" else source.FIXES
    return said, fixes.get(code, "see Meta's error reference for this code") if isinstance(
        code, int) else "see the message"


# -- Klaviyo -----------------------------------------------------------------------------------

_KEY_FIX = ("the private API key was refused: set CONVSYNC_KLAVIYO_API_KEY to a private key "
            "(pk_...) from Klaviyo > Settings > API keys")


def _scope_fix(scope: str) -> str:
    return (f"give the key the {scope} scope in Klaviyo > Settings > API keys (or make a key "
            "with it) and set CONVSYNC_KLAVIYO_API_KEY")


def check_klaviyo(config: ClientConfig, secrets: Secrets, *,
                  timeout: float = TIMEOUT) -> list[Check]:
    from convsync.sources import klaviyo as source

    section = config.klaviyo
    assert section is not None
    pushing = bool(section.upload_metrics)
    scopes = ["metrics:read", "events:read"]
    if secrets.klaviyo_api_key is None:
        why = "no API key (see klaviyo credentials)"
        write = " and write access to Events" if pushing else ""
        return [Check("klaviyo", "credentials", "problem", "klaviyo is enabled but has no key",
                      "set CONVSYNC_KLAVIYO_API_KEY (a private key, pk_..., with read access to "
                      f"Accounts, Metrics and Events{write}), or set [klaviyo] enabled = false"),
                Check("klaviyo", "API key", "skipped", why),
                *(Check("klaviyo", s, "skipped", why) for s in scopes)]
    client = source.connect(section, secrets)
    limit = (timeout, timeout)
    checks = [Check("klaviyo", "credentials", "ok", "CONVSYNC_KLAVIYO_API_KEY is set")]
    key_refused = False
    try:
        answer = client.Accounts.get_accounts_with_http_info(_request_timeout=limit)
        account = answer.data["data"][0]
        attributes = account.get("attributes") or {}
        checks.append(Check("klaviyo", "API key", "ok",
                            f"valid (account {account.get('id')}, time zone "
                            f"{attributes.get('timezone')}, currency "
                            f"{attributes.get('preferred_currency')})"))
    except Exception as error:
        status = getattr(error, "status", None)
        if status == 403:
            checks.append(Check("klaviyo", "API key", "note",
                                "valid, but without the accounts:read scope: convsync uses "
                                f"[client] currency ({config.client.currency}) for the events",
                                _scope_fix("accounts:read")))
        else:
            key_refused = status == 401
            checks.append(_klaviyo_problem(error, "API key", "accounts:read"))
    calls: dict[str, Callable[[], Any]] = {
        "metrics:read": lambda: client.Metrics.get_metrics_with_http_info(
            fields_metric=["name"], _request_timeout=limit),
        "events:read": lambda: client.Events.get_events_with_http_info(
            fields_event=["timestamp"], page_size=1, _request_timeout=limit),
    }
    for scope, call in calls.items():
        try:
            answer = call()
        except Exception as error:
            if key_refused and getattr(error, "status", None) == 401:
                checks.append(Check("klaviyo", scope, "skipped",
                                    "the key was refused (see klaviyo API key)"))
            else:
                checks.append(_klaviyo_problem(error, scope, scope))
            continue
        count = len(answer.data.get("data") or [])
        found = (f"{count} metric{'s' * (count != 1)} on the first page"
                 if scope == "metrics:read" else "events readable")
        checks.append(Check("klaviyo", scope, "ok", f"granted ({found})"))
    if pushing:
        checks.append(Check("klaviyo", "events:write", "note",
                            "not tested: it cannot be without writing an event, and push "
                            "([klaviyo] upload_metrics) needs it",
                            "make sure the key has write access to Events (Klaviyo > Settings > "
                            "API keys); a push without it fails with HTTP 403"))
    return checks


def _klaviyo_problem(error: BaseException, name: str, scope: str) -> Check:
    from openapi_client.exceptions import ApiException

    from convsync.sources import klaviyo as source

    if isinstance(error, ApiException):
        said = source.explain(error) or f"Klaviyo API HTTP {error.status}"
        said = said.split(" (check ")[0].split(" (the private key ")[0]
        if error.status == 401:
            return Check("klaviyo", name, "problem", said, _KEY_FIX)
        if error.status == 403:
            return Check("klaviyo", name, "problem", f"the key lacks {scope}: {said}",
                         _scope_fix(scope))
        if error.status == 429 or (error.status or 0) >= 500:
            return Check("klaviyo", name, "problem", said,
                         "Klaviyo is busy or failing: run doctor again in a minute")
        return Check("klaviyo", name, "problem", said,
                     "check [klaviyo] endpoint and revision (leave them out for Klaviyo's)")
    return Check("klaviyo", name, "problem",
                 f"Klaviyo did not answer ({type(error).__name__}: {error})",
                 "check [klaviyo] endpoint (leave it out for Klaviyo's) and this machine's "
                 "network, then run doctor again")


# -- the store ---------------------------------------------------------------------------------

def check_store(url: str) -> list[Check]:
    """Whether the store opens, takes a write (rolled back) and has this convsync's schema;
    nothing is created or migrated."""
    try:
        return [_store_check(url)]
    except Exception as error:
        return [_unexpected("store", "", error)]


def _store_check(url: str) -> Check:
    from convsync.store import LATEST_VERSION

    key = "[client] store_url"
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        return Check("store", "", "problem", f"{url!r} is not a database URL",
                     f"set {key} to sqlite:///path/to/file.db or "
                     "postgresql+psycopg://user@host/database")
    shown = parsed.render_as_string(hide_password=True)
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        return Check("store", "", "problem", f"{shown}: {backend} is not supported",
                     f"set {key} to a SQLite file or a PostgreSQL database")
    if backend == "postgresql" and parsed.get_driver_name() != "psycopg":
        parsed = parsed.set(drivername="postgresql+psycopg")
    try:
        parsed.get_dialect().import_dbapi()
    except ImportError:
        return Check("store", "", "problem", f"{shown}: the {parsed.drivername} driver is not "
                                             "installed", "pip install 'convsync[postgres]'")
    connect_args: dict[str, Any] = {"connect_timeout": 5}
    if backend == "sqlite":
        database = parsed.database or ""
        if database in ("", ":memory:"):
            return Check("store", "", "problem", f"{shown} is an in-memory database: nothing "
                                                 "would be kept between runs",
                         f"set {key} to a file, such as sqlite:///var/convsync.db")
        path = Path(database).expanduser()
        problem = _sqlite_path_problem(path, key)
        if problem is not None:
            return problem
        if not path.exists():
            return Check("store", "", "ok",
                         f"{path} does not exist yet: the first run creates it (its folder can "
                         "be written). If this client was synced before, check the path: a new "
                         "store has no upload ledger")
        connect_args = {"timeout": SQLITE_BUSY_SECONDS}
    engine = sa.create_engine(parsed, connect_args=connect_args, poolclass=sa.pool.NullPool)
    if backend == "sqlite":
        _explicit_sqlite_transactions(engine)
    try:
        version, wrote = _probe_store(engine)
    except sa.exc.DBAPIError as error:
        return _store_error(shown, key, error)
    finally:
        engine.dispose()
    where = f"{shown}: opens, takes a write (rolled back)"
    if not wrote:
        return Check("store", "", "note",
                     f"{shown}: opens; a running convsync holds its write lock, so writing "
                     "was not tried", "run doctor again once the run is over")
    if version == 0:
        return Check("store", "", "ok", f"{where}; empty: the first run sets it up")
    if version > LATEST_VERSION:
        return Check("store", "", "problem",
                     f"{shown} has schema version {version}, written by a newer convsync (this "
                     f"one knows up to {LATEST_VERSION})",
                     f"upgrade convsync, or point {key} at another database")
    if version < LATEST_VERSION:
        return Check("store", "", "note",
                     f"{where}; schema version {version}: the next run migrates it to "
                     f"{LATEST_VERSION} (a large store takes a while)",
                     "nothing to do; run `convsync pull` once by hand to migrate it now")
    return Check("store", "", "ok", f"{where}; schema version {version} (current)")


def _sqlite_path_problem(path: Path, key: str) -> Check | None:
    if path.is_dir():
        return Check("store", "", "problem", f"{path} is a directory, not a database file",
                     f"point {key} at a file in it, such as sqlite:///{path / 'convsync.db'}")
    if path.exists():
        if not os.access(path, os.R_OK | os.W_OK):
            return Check("store", "", "problem", f"{path} cannot be read and written by this "
                                                 "user", f"chmod 600 {path} as its owner, or run "
                                                         "convsync as that user")
        if not os.access(path.parent, os.W_OK | os.X_OK):
            return Check("store", "", "problem",
                         f"the folder {path.parent} cannot be written (SQLite keeps its journal "
                         "and the run's lock beside the file)",
                         f"let this user write in {path.parent}, or move the store and "
                         f"change {key}")
        return None
    folder = path.parent
    while not folder.exists():  # the store makes the missing folders
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        return Check("store", "", "problem",
                     f"{path} does not exist and cannot be created: {folder} is not a folder "
                     "this user may write in", f"change {key}, or the folder's permissions")
    return None


_WRITE = "convsync_doctor_write"


def _explicit_sqlite_transactions(engine: sa.Engine) -> None:
    """pysqlite opens transactions only before DML: convsync emits BEGIN itself, as the store
    does (IMMEDIATE, the write lock, for the write probe), so the probe tests what a run
    needs."""

    @sa.event.listens_for(engine, "connect")
    def _autocommit(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE)
                             else "BEGIN")


def _probe_store(engine: sa.Engine) -> tuple[int, bool]:
    """(schema version, whether a write was taken), the write rolled back. Version 0: an
    empty database."""
    from convsync.store import schema_version

    with engine.connect() as conn:
        has_table = sa.inspect(conn).has_table("schema_version")
        version = 0
        if has_table:
            version = int(conn.execute(
                sa.select(sa.func.max(schema_version.c.version))).scalar() or 0)
        conn.rollback()
        conn.execution_options(**{_WRITE: True})
        try:
            with conn.begin() as transaction:
                if has_table:  # a row no migration ever writes
                    conn.execute(schema_version.insert().values(
                        version=-1, applied_at=dt.datetime.now(dt.UTC)))
                else:
                    conn.exec_driver_sql("CREATE TABLE convsync_doctor_probe (x INTEGER)")
                transaction.rollback()
        except sa.exc.OperationalError as error:
            if "locked" in str(error.orig).lower():
                return version, False
            raise
    return version, True


def _store_error(shown: str, key: str, error: sa.exc.DBAPIError) -> Check:
    said = str(error.orig).strip().splitlines()[0] if error.orig else str(error)
    lowered = said.lower()
    if "not a database" in lowered:
        return Check("store", "", "problem", f"{shown} is not a SQLite database ({said})",
                     f"move the file aside (the next pull refills a new one), or point {key} "
                     "at the right file")
    if "readonly" in lowered or "unable to open" in lowered or "permission" in lowered:
        return Check("store", "", "problem", f"{shown} cannot be written ({said})",
                     "check the permissions of the file and of its folder (SQLite writes its "
                     "journal beside it)")
    if "does not exist" in lowered:
        return Check("store", "", "problem", f"{shown}: {said}",
                     f"create the database (createdb), or fix {key}")
    if "connect" in lowered or "could not translate host" in lowered or "timeout" in lowered:
        return Check("store", "", "problem", f"{shown} does not answer ({said})",
                     f"is the PostgreSQL server running, and are the host, port, user and "
                     f"database of {key} right?")
    return Check("store", "", "problem", f"{shown} cannot be used ({said})", "see the message")


# -- the table ---------------------------------------------------------------------------------

_COLOURS = {"ok": "green", "problem": "red", "note": "yellow", "skipped": "dim"}


def table(report: Report) -> Table:
    """The report as a table that reads at 80 columns: check, result, fix."""
    out = Table(title=f"convsync doctor: {escape(report.client)}", box=box.SIMPLE_HEAD,
                title_justify="left", expand=True)
    out.add_column("check", overflow="fold", ratio=3, min_width=14)
    out.add_column("result", overflow="fold", ratio=5)
    out.add_column("fix", overflow="fold", ratio=4)
    platform = None
    for check in report.checks:
        if platform is not None and check.platform != platform:
            out.add_section()
        platform = check.platform
        colour = _COLOURS[check.status]
        out.add_row(escape(check.label),
                    f"[{colour}]{check.status}[/{colour}]: {escape(check.result)}",
                    escape(check.fix))
    return out


def verdict(report: Report) -> str:
    counts = report.counts()
    parts = [f"{n} {status}{'s' * (n != 1 and status == 'problem')}"
             for status, n in counts.items() if n]
    head = ("all well" if report.ok else
            f"{counts['problem']} problem{'s' * (counts['problem'] != 1)} to fix")
    return f"{head} ({', '.join(parts)})"
