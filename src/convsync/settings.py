"""Client configuration (one TOML file per client) and secrets (environment or a secrets file).

This is the only module that reads the environment. Everything else receives a
``ClientConfig`` and a ``Secrets``.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import sqlalchemy as sa
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from convsync.errors import ConfigError
from convsync.model import (
    META_REMOVED_WINDOWS,
    META_WINDOWS,
    ConversionDefinition,
    Kind,
    Platform,
    PlatformNames,
)

GOOGLE_ADS_BUDGETS = {"explorer": 2_880, "basic": 15_000}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


log = logging.getLogger(__name__)


def _names(value: Any) -> Any:
    """Accept one name as a plain string as well as a list of names; anything else is an
    error naming what is expected."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple):
        return value
    kind = {"int": "number", "float": "number", "bool": "true / false", "dict": "table"}.get(
        type(value).__name__, type(value).__name__)
    raise ValueError(f"expected a value in quotes or a list of them, such as [\"a\", \"b\"], "
                     f"not a {kind}")


class ClientSection(_Section):
    name: str = Field(min_length=1)
    timezone: str = "UTC"
    currency: str = "USD"
    store_url: str = ""
    secrets_file: Path | None = None
    lookback_days: int = Field(default=30, ge=0, le=540)

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            hint = difflib.get_close_matches(value, _all_zones(), n=1)
            raise ValueError(
                f"unknown time zone {value!r}: use an IANA name such as 'America/New_York'"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
            ) from None
        return value

    @field_validator("currency")
    @classmethod
    def _iso_currency(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Z]{3}", value):
            raise ValueError(f"currency {value!r} must be a three-letter ISO 4217 code like 'USD'")
        return value


class _PlatformSection(_Section):
    enabled: bool = True
    endpoint: str | None = None
    lookback_days: int | None = Field(default=None, ge=0, le=540)


class GoogleAdsSection(_PlatformSection):
    customer_ids: list[str] = Field(min_length=1)
    login_customer_id: str | None = None
    ca_file: Path | None = None
    access_level: Literal["explorer", "basic", "standard"] = "basic"
    daily_operation_budget: int | None = Field(default=None, ge=1)
    conversion_date_basis: bool = False
    pull_clicks: bool = False
    upload_actions: dict[str, str] = {}
    """Push: the conversion action (an UPLOAD_CLICKS action's id) each conversion uploads to,
    by canonical conversion name; a conversion not named here is not pushed to Google Ads."""
    datamanager_endpoint: str | None = None
    """Push: the Data Manager API's address (default Google's; the sandbox writes its own)."""
    datamanager_transport: Literal["grpc", "rest"] = "grpc"
    consent: Literal["granted", "denied", "unspecified"] = "unspecified"
    """Push: the ad_user_data consent sent with every event ("denied": nothing is sent)."""
    retraction_accounts: list[str] = []
    """Push: accounts still allowed to use the Google Ads API's conversion adjustments (closed
    to new adopters since 2026-06-15): a conversion the CRM voids is retracted there (count
    and value taken back) instead of restated to its voided value."""
    cloud_project: str | None = None
    """Push: the Cloud project whose Data Manager quotas the calls count against (default:
    the one the OAuth client id or service account names; see ``convsync.quotas``)."""
    restate_threshold: float = Field(default=0.05, ge=0)
    """Push: an upload already sent is sent again with its new value (same transaction id:
    Google restates it) when the value moved by more than this share."""

    @field_validator("upload_actions")
    @classmethod
    def _action_ids(cls, value: dict[str, str]) -> dict[str, str]:
        for name, action in value.items():
            if not str(action).isdigit():
                raise ValueError(f"upload action for {name!r} must be a conversion action id "
                                 f"(digits, as Google Ads shows it), not {action!r}")
        return {name: str(action) for name, action in value.items()}

    @field_validator("customer_ids", mode="before")
    @classmethod
    def _ids(cls, value: Any) -> Any:
        return [_customer_id(v) for v in _names(value)]

    @field_validator("retraction_accounts", mode="before")
    @classmethod
    def _retraction_ids(cls, value: Any) -> Any:
        return [_customer_id(v) for v in _names(value)]

    @field_validator("login_customer_id", mode="before")
    @classmethod
    def _login(cls, value: Any) -> Any:
        return None if value in (None, "") else _customer_id(value)

    @property
    def operation_budget(self) -> int | None:
        """Search/SearchStream operations per day for the Cloud project (None: unlimited)."""
        return self.daily_operation_budget or GOOGLE_ADS_BUDGETS.get(self.access_level)


class Ga4Section(_PlatformSection):
    property_id: str
    transport: Literal["grpc", "rest"] = "grpc"
    ca_file: Path | None = None
    custom_dimensions: list[str] = []

    @field_validator("property_id", mode="before")
    @classmethod
    def _property(cls, value: Any) -> Any:
        text = str(value).removeprefix("properties/")
        if not text.isdigit():
            raise ValueError(f"GA4 property id {value!r} must be digits, like '123456789'")
        return text


META_STANDARD_EVENTS = frozenset((
    "AddPaymentInfo", "AddToCart", "AddToWishlist", "CompleteRegistration", "Contact",
    "CustomizeProduct", "Donate", "FindLocation", "InitiateCheckout", "Lead", "Purchase",
    "Schedule", "Search", "StartTrial", "SubmitApplication", "Subscribe", "ViewContent",
    "PageView"))
"""Meta's standard events: the pixel sends them, so an upload under one of these names would
be deduplicated against (and lose to) the pixel's own copy."""


class MetaSection(_PlatformSection):
    ad_account_ids: list[str] = Field(min_length=1)
    pixel_id: str | None = None
    api_version: str = "v26.0"
    attribution_windows: list[str] = ["7d_click", "1d_view"]
    action_report_time: Literal["impression", "conversion", "mixed"] = "impression"
    upload_events: dict[str, str] = {}
    """Push: the Conversions API event name each conversion is sent under, by canonical
    conversion name; a conversion not named here is not pushed to Meta. A name of its own
    (``convsync_add_to_cart``), never the pixel's event: Meta keeps the first of two events
    with one name and id, and would drop the valued copy."""
    action_source: Literal["system_generated", "other", "website", "physical_store",
                           "app", "email", "phone_call", "chat"] = "system_generated"
    """Push: where Meta is told the conversions happened (``website`` requires the client's
    user agent, which convsync never has)."""
    max_event_age_days: int = Field(default=7, ge=1, le=62)
    """Push: events older than this are not sent (Meta refuses a whole request for one event
    older than 7 days; 62 only for physical_store events)."""
    test_event_code: str | None = None
    """Push: send to Events Manager's Test events view instead of the real dataset."""

    @field_validator("upload_events")
    @classmethod
    def _event_names(cls, value: dict[str, str]) -> dict[str, str]:
        for conversion, name in value.items():
            if name in META_STANDARD_EVENTS:
                raise ValueError(
                    f"upload event for {conversion!r} is {name!r}, a standard event the pixel "
                    "sends itself: Meta would keep the pixel's copy and drop the valued one; "
                    f"name it for convsync, such as 'convsync_{conversion}'")
            if not re.fullmatch(r"[A-Za-z0-9_ .-]{1,50}", name):
                raise ValueError(f"upload event for {conversion!r}: {name!r} is not a Meta "
                                 "event name (letters, digits, '_', '-', '.', ' '; 50 at most)")
        return value

    @field_validator("ad_account_ids", mode="before")
    @classmethod
    def _accounts(cls, value: Any) -> Any:
        ids = [str(v) for v in _names(value)]
        for account in ids:
            if not re.fullmatch(r"(act_)?\d+", account):
                raise ValueError(f"Meta ad account id {account!r} must look like 'act_1234567890'")
        return [a if a.startswith("act_") else f"act_{a}" for a in ids]

    @field_validator("attribution_windows")
    @classmethod
    def _windows(cls, value: list[str]) -> list[str]:
        for window in value:
            if window in META_REMOVED_WINDOWS:
                raise ValueError(
                    f"attribution window {window!r} is no longer returned by Meta since "
                    f"2026-01-12; use one of {', '.join(META_WINDOWS)}")
            if window not in META_WINDOWS:
                raise ValueError(f"unknown attribution window {window!r}; "
                                 f"use one of {', '.join(META_WINDOWS)}")
        return value


class KlaviyoSection(_PlatformSection):
    revision: str = "2026-10-15"
    upload_metrics: dict[str, str] = {}
    """Push: the metric each conversion's valued events are created under on the person's
    Klaviyo profile, by canonical conversion name; a conversion not named here is not pushed
    to Klaviyo. A metric of its own (``convsync add_to_cart value``): Klaviyo's own metric
    would count the event twice."""


class CrmSection(_Section):
    """Offline outcome files (CSV / JSON Lines) imported with ``convsync import``."""

    timezone: str | None = None

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        return None if value is None else ClientSection._known_timezone(value)


class ReconcileSection(_Section):
    """Tolerances and choices of ``convsync audit`` / ``reconcile`` / ``report``."""

    reference: Literal["ga4", "google_ads", "meta", "klaviyo"] = "ga4"
    tolerance: float = Field(default=0.25, gt=0)
    min_count: int = Field(default=30, ge=1)
    settle_days: int = Field(default=7, ge=0, le=90)
    max_day_shift: float = Field(default=0.25, gt=0, le=1)
    inactive_days: int = Field(default=30, ge=1, le=540)
    funnel_source: Literal["ga4", "google_ads", "meta", "klaviyo"] = "ga4"
    funnel_drop: float = Field(default=0.2, gt=0, lt=1)
    funnel_min_days: int = Field(default=3, ge=1)
    primary_micro_uploads: bool = False


class ValuationSection(_Section):
    """How ``convsync values`` estimates what each micro conversion is worth."""

    horizon_days: int = Field(default=90, ge=1, le=90)
    segment_by: Literal["campaign", "source", "client"] = "campaign"
    min_events: int = Field(default=30, ge=1)
    max_relative_width: float = Field(default=2.0, gt=0)


class ConversionEntry(_Section):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    kind: Kind
    ladder_position: int | None = Field(default=None, ge=1)
    google_ads: list[str] = []
    ga4: list[str] = []
    meta: list[str] = []
    klaviyo: list[str] = []
    crm: list[str] = []
    voided_by: list[str] = []
    """CRM outcomes that undo this conversion for the same person when they come after it
    (``lead_disqualified``, ``deal_lost``): an upload already sent is restated to
    ``voided_value``; one not sent yet is not sent."""
    voided_value: float = Field(default=0.0, ge=0)

    @field_validator("google_ads", "ga4", "meta", "klaviyo", "crm", "voided_by", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return _names(value)

    def definition(self) -> ConversionDefinition:
        return ConversionDefinition(
            name=self.name, kind=self.kind, ladder_position=self.ladder_position,
            names=PlatformNames(**{p.value: tuple(getattr(self, p.value)) for p in Platform}))


class ClientConfig(_Section):
    """One client's configuration file, validated."""

    client: ClientSection
    google_ads: GoogleAdsSection | None = None
    ga4: Ga4Section | None = None
    meta: MetaSection | None = None
    klaviyo: KlaviyoSection | None = None
    crm: CrmSection | None = None
    valuation: ValuationSection = ValuationSection()
    reconcile: ReconcileSection | None = None
    conversions: list[ConversionEntry] = []
    path: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _unique_conversions(self) -> ClientConfig:
        seen: set[str] = set()
        for entry in self.conversions:
            if entry.name in seen:
                raise ValueError(f"conversions: conversion {entry.name!r} is defined twice")
            seen.add(entry.name)
        return self

    @model_validator(mode="after")
    def _one_conversion_per_platform_name(self) -> ClientConfig:
        owner: dict[tuple[str, str], str] = {}
        for entry in self.conversions:
            for platform in ("google_ads", "ga4", "meta", "klaviyo", "crm"):
                for name in getattr(entry, platform):
                    first = owner.setdefault((platform, name), entry.name)
                    if first != entry.name:
                        raise ValueError(
                            f"conversions: {platform} {name!r} is mapped by both {first!r} "
                            f"and {entry.name!r}: keep it in one entry (it would be counted "
                            "twice)")
        return self

    @model_validator(mode="after")
    def _known_upload_conversions(self) -> ClientConfig:
        names = {entry.name for entry in self.conversions}
        targets = {"google_ads.upload_actions": self.google_ads and self.google_ads.upload_actions,
                   "meta.upload_events": self.meta and self.meta.upload_events,
                   "klaviyo.upload_metrics": self.klaviyo and self.klaviyo.upload_metrics}
        for key, uploads in targets.items():
            unknown = sorted(set(uploads or ()) - names)
            if unknown:
                raise ValueError(f"{key}: {', '.join(map(repr, unknown))} is no conversion of "
                                 "this config: use a conversions entry's name "
                                 f"({', '.join(sorted(names)) or 'none defined'})")
        if self.meta and self.meta.upload_events and not self.meta.pixel_id:
            raise ValueError("meta.upload_events: set meta.pixel_id, the pixel (dataset) the "
                             "Conversions API events go to (Events Manager > Data sources)")
        return self

    def enabled_platforms(self) -> list[Platform]:
        return [p for p in (Platform.GOOGLE_ADS, Platform.GA4, Platform.META, Platform.KLAVIYO)
                if (section := getattr(self, p.value)) is not None and section.enabled]

    def definitions(self) -> list[ConversionDefinition]:
        return [entry.definition() for entry in self.conversions]

    def lookback_days(self, platform: Platform) -> int:
        section = getattr(self, platform.value, None)
        own = getattr(section, "lookback_days", None)
        return own if own is not None else self.client.lookback_days

    def store_url(self) -> str:
        """The store URL; a relative SQLite path is taken relative to the config file."""
        url = self.client.store_url or f"sqlite:///var/{_slug(self.client.name)}.db"
        prefix = "sqlite:///"
        if url.startswith(prefix) and not url.startswith(prefix + "/") and self.path:
            return prefix + str((self.path.parent / url[len(prefix):]).resolve())
        return url


class Secrets(BaseSettings):
    """Credentials, from CONVSYNC_* environment variables or a dotenv-style secrets file.

    Google: an OAuth refresh token with its client id and secret, or a service account key
    file, or a ready access token (the sandbox uses one). The developer token is optional:
    Google sunset it on 2026-09-09 and ignores the header."""

    model_config = SettingsConfigDict(env_prefix="CONVSYNC_", extra="ignore")

    google_refresh_token: SecretStr | None = None
    google_client_id: str | None = None
    google_client_secret: SecretStr | None = None
    google_service_account_file: Path | None = None
    google_access_token: SecretStr | None = None
    google_developer_token: SecretStr | None = None
    meta_access_token: SecretStr | None = None
    klaviyo_api_key: SecretStr | None = None

    @field_validator("*", mode="before")
    @classmethod
    def _empty_is_missing(cls, value: Any) -> Any:
        """A variable set to nothing (``CONVSYNC_META_ACCESS_TOKEN=``) is not a secret."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("google_refresh_token", "google_client_id", "google_client_secret",
                     "google_access_token", "google_developer_token", "meta_access_token",
                     "klaviyo_api_key", mode="before")
    @classmethod
    def _printable(cls, value: Any) -> Any:
        """A credential travels in an HTTP header: printable ASCII only (a stray character
        from a copy made gRPC answer 'Illegal metadata', which looked like an outage)."""
        if isinstance(value, str) and not (value.isascii() and value.isprintable()
                                           and " " not in value.strip()):
            raise ValueError("not a credential: only ASCII letters, digits and punctuation "
                             "(copied with a stray or accented character?)")
        return value

    def values(self) -> list[str]:
        """Every secret value, for redaction."""
        return [s.get_secret_value() for s in (
            self.google_refresh_token, self.google_client_secret, self.google_access_token,
            self.google_developer_token, self.meta_access_token, self.klaviyo_api_key)
            if s is not None and s.get_secret_value()]

    def missing_for(self, platform: Platform) -> str | None:
        """What to set for ``platform``, or None when its credentials are there."""
        if platform in (Platform.GOOGLE_ADS, Platform.GA4):
            oauth = (self.google_refresh_token and self.google_client_id
                     and self.google_client_secret)
            if oauth or self.google_service_account_file or self.google_access_token:
                return None
            return ("set CONVSYNC_GOOGLE_REFRESH_TOKEN, CONVSYNC_GOOGLE_CLIENT_ID and "
                    "CONVSYNC_GOOGLE_CLIENT_SECRET (OAuth), or "
                    "CONVSYNC_GOOGLE_SERVICE_ACCOUNT_FILE (a service account's key file), or "
                    "CONVSYNC_GOOGLE_ACCESS_TOKEN (a ready token, for a one-off run); "
                    "CONVSYNC_GOOGLE_DEVELOPER_TOKEN is optional")
        if platform is Platform.META and self.meta_access_token is None:
            return "set CONVSYNC_META_ACCESS_TOKEN"
        if platform is Platform.KLAVIYO and self.klaviyo_api_key is None:
            return "set CONVSYNC_KLAVIYO_API_KEY"
        return None


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config file: where, what, and how to fix it."""

    key: str
    message: str
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        return f"{self.severity}: {self.key}: {self.message}"


def load_config(path: Path) -> ClientConfig:
    """Read and validate a client config file; raise ConfigError naming every bad key."""
    config, problems = _parse(path)
    errors = [p for p in problems if p.severity == "error"]
    if config is None or errors:
        raise ConfigError(path, errors)
    return config


def load_secrets(config: ClientConfig | None = None, secrets_file: Path | None = None) -> Secrets:
    """Secrets from the environment, then from the secrets file (config's or given)."""
    file = _secrets_file(config, secrets_file)
    if file is not None and not file.exists():
        raise ConfigError(file, [Problem("client.secrets_file",
                                         f"secrets file {file} does not exist: create it or "
                                         "remove the key and use environment variables")])
    if file is not None and _exposed(file):
        log.warning("%s", _exposed(file))
    try:
        return Secrets(_env_file=file) if file else Secrets()
    except ValidationError as error:  # never the value: it is a secret
        raise ConfigError(file or Path("environment"), [
            Problem(f"CONVSYNC_{str(e['loc'][0]).upper()}",
                    str(e["msg"]).removeprefix("Value error, "))
            for e in error.errors(include_input=False)]) from None


def _secrets_file(config: ClientConfig | None, given: Path | None = None) -> Path | None:
    """The secrets file (``given``, else the config's), relative to the config file."""
    file = given or (config.client.secrets_file if config else None)
    if file is not None and config is not None and config.path and not file.is_absolute():
        file = config.path.parent / file
    return file


def _exposed(file: Path) -> str:
    """What is wrong with who may read the secrets file ('' when only its owner may)."""
    if file.exists() and file.stat().st_mode & 0o077:
        return (f"secrets file {file} can be read by other users of this machine: "
                f"chmod 600 {file}")
    return ""


def check_config(path: Path, secrets: Secrets | None = None, *,
                 require_secrets: bool = False) -> list[Problem]:
    """Every problem in a config file (errors and warnings), each with its key and fix.

    Missing credentials are warnings unless ``require_secrets``: a config file checked in CI
    has no secrets at hand, the machine that runs the syncs must."""
    config, problems = _parse(path)
    if config is None:
        return problems
    try:
        secrets = secrets or load_secrets(config)
    except ConfigError as error:
        return problems + error.problems
    file = _secrets_file(config)
    if file is not None and (exposed := _exposed(file)):
        problems.append(Problem("client.secrets_file", exposed, "warning"))
    for platform in config.enabled_platforms():
        missing = secrets.missing_for(platform)
        if missing:
            problems.append(Problem(platform.value, f"{platform.value} is enabled but has no "
                                    f"credentials: {missing} (or set enabled = false)",
                                    "error" if require_secrets else "warning"))
    enabled = set(config.enabled_platforms())
    for i, entry in enumerate(config.conversions):
        mapped = {p for p in Platform if getattr(entry, p.value)}
        if not mapped:
            problems.append(Problem(f"conversions[{i}] ({entry.name})",
                                    "mapped to no platform: add its name on at least one "
                                    "platform, e.g. ga4 = \"purchase\""))
        elif not mapped & (enabled | {Platform.CRM}):
            problems.append(Problem(f"conversions[{i}] ({entry.name})",
                                    "mapped only to platforms that are not enabled", "warning"))
    if not any(e.kind is Kind.MACRO for e in config.conversions):
        problems.append(Problem("conversions", "no macro conversion defined: add the purchase "
                                "or qualified lead with kind = \"macro\"", "warning"))
    problems += _store_problems(config.store_url())
    return problems


def _store_problems(url: str) -> list[Problem]:
    """Whether the store can be opened: a URL SQLAlchemy reads, of SQLite or PostgreSQL, its
    driver installed, and for SQLite a file (or a directory to make it in) that can be
    written. Nothing is created or connected to."""
    key = "client.store_url"
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        return [Problem(key, "not a database URL: use sqlite:///path/to/file.db or "
                             "postgresql+psycopg://user@host/database")]
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        return [Problem(key, f"{backend} is not supported: use SQLite or PostgreSQL")]
    try:
        parsed.get_dialect().import_dbapi()
    except ImportError:
        return [Problem(key, f"the {parsed.drivername} driver is not installed: for "
                             "PostgreSQL use postgresql+psycopg://, the driver convsync "
                             "installs")]
    if backend == "sqlite" and parsed.database not in (None, "", ":memory:"):
        return _sqlite_file_problems(Path(parsed.database), key)
    return []


def _sqlite_file_problems(path: Path, key: str) -> list[Problem]:
    if path.is_dir():
        return [Problem(key, f"{path} is a directory: name a file in it, such as "
                             f"{path / 'convsync.db'}")]
    if path.exists():
        ok = os.access(path, os.R_OK | os.W_OK)
        return [] if ok else [Problem(key, f"{path} cannot be written: check its permissions")]
    folder = path.parent
    while not folder.exists():  # the store makes the missing folders
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        return [Problem(key, f"{path} cannot be created: {folder} is not a folder convsync "
                             "may write in")]
    return [Problem(key, f"{path} does not exist yet: the first run creates it, empty. If "
                         "this client was synced before, check the path: a new store has no "
                         "ledger, and Meta would count again what it received over 48 hours "
                         "ago", "warning")]


def trust_ca_file(path: Path) -> None:
    """Make this process's gRPC TLS channels trust ``path`` (the sandbox's certificate).

    The Google clients open only TLS channels and take their roots from this variable when
    the first channel opens; it replaces the public roots, so set it only for the sandbox."""
    global _trusted_ca
    if _trusted_ca is not None and _trusted_ca != path.resolve():
        raise ConfigError(path, [Problem("ca_file", f"this process already trusts {_trusted_ca}; "
                                         "one process can trust one sandbox certificate")])
    if not path.exists():
        raise ConfigError(path, [Problem("ca_file", f"{path} does not exist: start the sandbox "
                                         "(convsync sandbox serve) or remove ca_file")])
    os.environ["GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"] = str(path)
    _trusted_ca = path.resolve()


_trusted_ca: Path | None = None


def _parse(path: Path) -> tuple[ClientConfig | None, list[Problem]]:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, [Problem(str(path), "file not found")]
    except IsADirectoryError:
        return None, [Problem(str(path), "a directory, not a config file: name the .toml file")]
    except UnicodeDecodeError:
        return None, [Problem(str(path), "not a text file (UTF-8): a config is a .toml text "
                                         "file, such as config/example.toml")]
    except OSError as error:
        return None, [Problem(str(path), f"cannot be read ({error.strerror})")]
    except tomllib.TOMLDecodeError as error:
        return None, [Problem(str(path), f"not valid TOML: {error}")]
    try:
        config = ClientConfig.model_validate({**raw, "path": path.resolve()})
    except ValidationError as error:
        return None, [_problem(err, raw) for err in error.errors()]
    return config, []


_NAMED_KEY = re.compile(r"([a-z_]+(?:\.[a-z_]+)*): (.+)", re.DOTALL)


def _problem(err: Any, raw: dict[str, Any]) -> Problem:
    loc = [str(part) for part in err["loc"]]
    key = ".".join(loc).replace(".[", "[")
    key = re.sub(r"conversions\.(\d+)", r"conversions[\1]", key)
    if err["type"] == "extra_forbidden":
        return Problem(key, _unknown_key_message(loc))
    if err["type"] == "missing":
        return Problem(key, "required key is missing: add it")
    message = str(err["msg"]).removeprefix("Value error, ")
    if not key and (named := _NAMED_KEY.match(message)):  # a check across keys names its key
        key, message = named.group(1), named.group(2)
    value = err.get("input")
    if not isinstance(value, dict | list) and value is not None and repr(value) not in message:
        message += f" (got {value!r})"
    return Problem(key, message)


def _unknown_key_message(loc: list[str]) -> str:
    model: type[BaseModel] = ClientConfig
    for part in loc[:-1]:
        if part.isdigit():
            continue
        field = model.model_fields.get(part)
        inner = _model_of(field.annotation) if field else None
        if inner is None:
            break
        model = inner
    known = [name for name in model.model_fields if name != "path"]
    hint = difflib.get_close_matches(loc[-1], known, n=1)
    suggestion = f"did you mean {hint[0]!r}?" if hint else f"known keys: {', '.join(known)}"
    return f"unknown key {loc[-1]!r}: {suggestion}"


def _model_of(annotation: Any) -> type[BaseModel] | None:
    candidates = [annotation, *getattr(annotation, "__args__", ())]
    for candidate in candidates:
        inner = getattr(candidate, "__args__", None)
        for c in [candidate, *(inner or ())]:
            if isinstance(c, type) and issubclass(c, BaseModel):
                return c
    return None


def _customer_id(value: Any) -> str:
    digits = str(value).replace("-", "")
    if not re.fullmatch(r"\d{10}", digits):
        raise ValueError(f"Google Ads customer id {value!r} must be 10 digits, like "
                         "'123-456-7890' or '1234567890'")
    return digits


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "client"


def _all_zones() -> list[str]:
    import zoneinfo
    return sorted(zoneinfo.available_timezones())
