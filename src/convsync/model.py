"""The normalized model: the one vocabulary every convsync module speaks.

Sources turn platform rows into these objects, the store keeps them, reconcile and
valuation read them, sinks turn ``Upload`` objects into platform calls.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, NamedTuple, TypedDict, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


class Platform(StrEnum):
    GOOGLE_ADS = "google_ads"
    GA4 = "ga4"
    META = "meta"
    KLAVIYO = "klaviyo"
    CRM = "crm"


META_WINDOWS = ("1d_click", "7d_click", "28d_click", "1d_view", "1d_ev")
"""Meta's attribution windows, as of late 2026."""
META_DEFAULT_WINDOWS = ("7d_click", "1d_view")
"""An ad account's default attribution setting: what Meta's plain ``value`` counts."""
META_REMOVED_WINDOWS = ("7d_view", "28d_view")
"""No longer returned by Meta since 2026-01-12."""


class Kind(StrEnum):
    MACRO = "macro"
    MICRO = "micro"


class Basis(StrEnum):
    """Which date a daily conversion figure is filed under."""

    CLICK_DATE = "click_date"
    CONVERSION_DATE = "conversion_date"


class UploadStatus(StrEnum):
    PLANNED = "planned"
    HELD = "held"
    SENDING = "sending"
    SENT = "sent"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    FAILED = "failed"
    RETRACTED = "retracted"


def _aware(value: dt.datetime) -> dt.datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("timestamp must be timezone-aware")
    return value.astimezone(dt.UTC)


AwareDatetime = Annotated[dt.datetime, AfterValidator(_aware)]
"""A timezone-aware timestamp, normalized to UTC."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


M = TypeVar("M", bound=BaseModel)


def copy_with(template: M, changed: dict[str, Any]) -> M:
    """A copy of a validated ``template`` with some fields replaced, unvalidated: for the hot
    paths of sources whose replacements are valid by construction (a GA4 stat's typed API
    values, a Meta stat's figures).

    This is pydantic's own shallow copy (``BaseModel.__copy__``, which ``model_copy`` runs)
    without its generic steps: 0.9 us a copy, against 2.3 for ``model_copy``, 1.8 - 3.2 to
    validate and 5.7 for ``model_construct`` (pydantic 2.14, measured). Every copy has every
    field set, and the copies of a model share one set saying so."""
    cls = type(template)
    made = _new(cls)
    _set_slot(made, "__dict__", template.__dict__ | changed)
    _set_slot(made, "__pydantic_fields_set__", _every_field(cls))
    _set_slot(made, "__pydantic_extra__", None)
    _set_slot(made, "__pydantic_private__", None)
    return made


_new, _set_slot = object.__new__, object.__setattr__


@functools.cache
def _every_field(cls: type[BaseModel]) -> set[str]:
    return set(cls.model_fields)


class PlatformNames(_Frozen):
    """What one canonical conversion is called on each platform (None: not tracked there)."""

    google_ads: tuple[str, ...] = ()
    ga4: tuple[str, ...] = ()
    meta: tuple[str, ...] = ()
    klaviyo: tuple[str, ...] = ()
    crm: tuple[str, ...] = ()

    def on(self, platform: Platform | str) -> tuple[str, ...]:
        names: tuple[str, ...] = getattr(self, str(platform))
        return names

    def is_empty(self) -> bool:
        return not any(self.on(p) for p in Platform)


class ConversionDefinition(_Frozen):
    """A canonical conversion and its name on each platform."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    kind: Kind
    ladder_position: int | None = Field(default=None, ge=1)
    names: PlatformNames = PlatformNames()


class ConversionStat(_Frozen):
    """One aggregate cell: a platform's count and value for a day, campaign and conversion
    (and, on GA4, session source and medium).

    ``date`` is a calendar day in ``timezone`` (the platform account's own time zone).
    ``conversion`` is the canonical name, or None when no definition maps ``platform_conversion``.
    ``source`` and ``medium`` are GA4's session source and medium ("" on the platforms that
    have none). ``key_events`` is GA4's key-event count of the cell, which can be below
    ``count`` (a key event counted once per session) and is 0 for an event that is no key
    event; None on the platforms that have no such notion.
    """

    platform: Platform
    account_id: str
    date: dt.date
    timezone: str
    campaign_id: str
    campaign_name: str = ""
    platform_conversion: str
    conversion: str | None = None
    kind: Kind | None = None
    count: float = 0.0
    value: float = 0.0
    currency: str = ""
    basis: Basis = Basis.CLICK_DATE
    window: str = ""
    in_column: bool | None = None
    source: str = ""
    medium: str = ""
    key_events: float | None = None


Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
"""A SHA-256 digest in lower-case hex: the only form an email or phone is ever kept in."""


class Identifiers(_Frozen):
    """Identifiers of a person or a click. Emails and phones only ever hashed (hex SHA-256)."""

    gclid: str | None = None
    gbraid: str | None = None
    wbraid: str | None = None
    fbc: str | None = None
    fbp: str | None = None
    email_sha256_google: Sha256Hex | None = None
    email_sha256_meta: Sha256Hex | None = None
    phone_sha256_google: Sha256Hex | None = None
    phone_sha256_meta: Sha256Hex | None = None
    external_id: str | None = None
    klaviyo_profile_id: str | None = None
    """The person's Klaviyo profile, seen when pulling: where a Klaviyo upload goes."""


class IdentifierFields(TypedDict, total=False):
    """The fields of an ``Identifiers`` that are set, as a plain dict: how a ``JourneyBatch``
    carries them (a dict costs a third of a model to build, and the store writes it as is)."""

    gclid: str
    gbraid: str
    wbraid: str
    fbc: str
    fbp: str
    email_sha256_google: str
    email_sha256_meta: str
    phone_sha256_google: str
    phone_sha256_meta: str
    external_id: str
    klaviyo_profile_id: str


class JourneyEvent(NamedTuple):
    """One person-level event.

    A NamedTuple where the rest of the model is pydantic: a pull makes millions of these (one
    per Klaviyo event) and validating each cost more than storing it. Its parts come validated:
    ``identifiers`` is an ``Identifiers`` (hashes checked there, built once per person and
    visit), and each source builds ``time`` aware in UTC from the platform's own timestamp."""

    person_key: str
    conversion: str | None
    platform_conversion: str
    time: dt.datetime
    source_platform: Platform
    source_event_id: str
    value: float = 0.0
    currency: str = ""
    identifiers: Identifiers = Identifiers()
    campaign_id: str = ""


@dataclass(frozen=True, slots=True)
class JourneyBatch:
    """Person-level events of one source and conversion, column by column: entry ``i`` of each
    list is event ``i``, in time order.

    How a source hands over a page of a thousand events (Klaviyo's): one ``JourneyEvent`` per
    event cost more to build, carry and take apart again than the store's insert of it, while
    columns become the store's rows in C. ``times`` are whole POSIX seconds (UTC), the
    resolution Klaviyo gives. ``identifiers`` are the set fields of each event's identifiers
    (the events of one visit share one dict), built by the source from its own hashes and the
    platform's click ids: ``events()`` validates them into ``Identifiers``."""

    source_platform: Platform
    conversion: str | None
    platform_conversion: str
    source_event_ids: list[str]
    times: list[int]
    person_keys: list[str]
    values: list[float]
    currencies: list[str]
    campaign_ids: list[str]
    identifiers: list[IdentifierFields]

    def __len__(self) -> int:
        return len(self.source_event_ids)

    def events(self) -> Iterator[JourneyEvent]:
        """The batch one event at a time."""
        columns = zip(self.source_event_ids, self.times, self.person_keys, self.values,
                      self.currencies, self.campaign_ids, self.identifiers, strict=True)
        for event_id, seconds, person, value, currency, campaign, identifiers in columns:
            yield JourneyEvent(
                person_key=person, conversion=self.conversion,
                platform_conversion=self.platform_conversion,
                time=dt.datetime.fromtimestamp(seconds, dt.UTC),
                source_platform=self.source_platform, source_event_id=event_id, value=value,
                currency=currency, identifiers=Identifiers.model_validate(identifiers),
                campaign_id=campaign)


class Upload(NamedTuple):
    """One planned or sent offline conversion. ``dedupe_key`` makes the upload exactly-once
    (Google's transaction id, Meta's event id, Klaviyo's unique id). ``account_id`` is the
    destination account that owns ``conversion_action`` (Google Ads: the operating customer,
    10 digits); ``conversion`` the canonical conversion it uploads.

    A NamedTuple, as ``JourneyEvent`` is: a push plans, writes, claims and sends millions of
    these, and its parts come validated (the identifiers an ``Identifiers``, the time aware,
    which the store's ``UtcDateTime`` checks again); a sink checks each field it sends."""

    destination: Platform
    conversion_action: str
    dedupe_key: str
    value: float
    currency: str
    time: dt.datetime
    account_id: str = ""
    conversion: str = ""
    identifiers: Identifiers = Identifiers()
    status: UploadStatus = UploadStatus.PLANNED
    response: str = ""


class PlatformConversion(_Frozen):
    """A conversion as a platform defines it (a Google Ads conversion action, a GA4 event, a
    Meta action type, a Klaviyo metric), with its settings and its canonical mapping."""

    platform: Platform
    account_id: str
    platform_id: str
    name: str
    settings: dict[str, str | int | float | bool | None] = {}
    conversion: str | None = None
    kind: Kind | None = None
    in_column: bool | None = None


class ConversionMap:
    """Looks up the canonical definition of a platform's conversion name."""

    def __init__(self, definitions: list[ConversionDefinition]) -> None:
        self.definitions = definitions
        self._by_name = {(platform, name): d for d in definitions for platform in Platform
                         for name in d.names.on(platform)}

    def lookup(self, platform: Platform, name: str) -> ConversionDefinition | None:
        return self._by_name.get((platform, name))

    def mapped(self, conversion: PlatformConversion) -> PlatformConversion:
        definition = self.lookup(conversion.platform, conversion.name)
        if definition is None:
            return conversion
        return conversion.model_copy(update={"conversion": definition.name,
                                             "kind": definition.kind})


MACRO_HINTS = ("purchase", "order", "qualified", "converted_lead", "subscribe_paid", "deal",
               "won", "sale", "book_appointment", "request_quote", "demo")
MICRO_HINTS = ("view", "cart", "checkout", "signup", "sign_up", "subscribed", "register",
               "download", "lead", "contact", "page", "engagement", "click", "video", "search")


def infer_kind(name: str, category: str = "") -> tuple[Kind, str]:
    """A best guess at macro or micro from a conversion's name and category, and why.

    Macro hints win over micro ones ("Qualified lead" is macro although "lead" is micro)."""
    text = f"{category} {name}".lower().replace(" ", "_").replace("-", "_")
    for hint in MACRO_HINTS:
        if hint in text:
            return Kind.MACRO, f"name or category contains {hint!r}"
    for hint in MICRO_HINTS:
        if hint in text:
            return Kind.MICRO, f"name or category contains {hint!r}"
    return Kind.MICRO, "no hint in name or category: assumed micro until configured"
