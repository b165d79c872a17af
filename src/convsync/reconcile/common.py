"""What every part of the reconciliation shares: the platforms' names, constants, ``Finding`` and
``as_data``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from convsync.model import (
    Platform,
)

Severity = Literal["error", "warning", "info"]
ALL = "(all campaigns)"
NOT_SET = "(not set)"
OTHER = "other"
"""Traffic group of the campaigns no ad platform claims (email, organic, (not set))."""
OFFLINE_TYPES = frozenset({"UPLOAD_CLICKS", "UPLOAD_CALLS", "STORE_SALES",
                           "STORE_SALES_DIRECT_UPLOAD", "SALESFORCE"})
"""Google Ads action types whose conversions only exist once someone uploads them."""
SKIPPED_STATUSES = frozenset({"REMOVED", "HIDDEN"})
CLICK_WINDOWS = ("28d_click", "7d_click", "1d_click")
"""Meta click windows, widest first: they nest, so only the widest pulled one is counted."""
VIEW_WINDOWS = ("1d_view", "1d_ev")
GOALS_PATH = "Google Ads > Goals > Conversions > Summary"
NAMES = {"google_ads": "Google Ads", "ga4": "GA4", "meta": "Meta", "klaviyo": "Klaviyo",
         "crm": "CRM"}
NARROW = (Platform.GOOGLE_ADS, Platform.META)
"""Platforms that see only their own campaigns."""
NOISE_Z = 3.0
"""A period difference beyond tolerance must also exceed this many Poisson standard
deviations (sqrt of the two counts' sum) to be judged: small campaigns differ by chance."""


def name_of(platform: Platform | str) -> str:
    """A platform's name as people write it (Google Ads, GA4, ...)."""
    key = platform.value if isinstance(platform, Platform) else platform
    return NAMES.get(key, key)


@dataclass(frozen=True)
class Finding:
    """One thing worth a person's attention, with the numbers behind it and the fix."""

    area: str  # audit | reconcile | funnel
    code: str
    severity: Severity
    subject: str
    message: str
    fix: str
    evidence: dict[str, Any] = field(default_factory=dict)
    alert: bool = False
    """Beyond tolerance: ``convsync reconcile`` / ``report`` exit with code 3."""
    account: str = ""
    """The platform account it is about (the audit's: a Google Ads customer id)."""


def rounded(x: float, digits: int = 2) -> float:
    return round(float(x), digits)


def as_data(value: Any) -> Any:
    """A result (dataclasses, lists, dicts) as plain JSON-able data; dates, enums and pydantic
    models are left for the JSON encoder's ``default``."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: as_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): as_data(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [as_data(v) for v in value]
    return value


