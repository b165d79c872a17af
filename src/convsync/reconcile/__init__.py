"""In-column audit, cross-platform discrepancies and funnel diagnosis.

Pure functions over what the store returns (``PlatformConversion``, ``ConversionStat`` rows),
and ``load_*`` functions that query a ``Store`` and call them. Every judgement ends as a
``Finding``: a severity, a message, the evidence (numbers), the fix in the platform's terms,
and ``alert`` when it is beyond tolerance (the commands then exit 3). docs/reconcile.md
explains each finding, each cause heuristic and each tolerance.

Days are each platform's calendar days (its account's time zone; Klaviyo's are the
client's): lining them up by date is what the time-zone heuristic looks at.

A module per concern: ``common``, ``audit``, ``digest``, ``discrepancies``, ``funnel``
and ``load`` (the store in, the findings out)."""

from convsync.reconcile.audit import (
    ActionAudit,
    Audit,
    audit,
)
from convsync.reconcile.common import (
    ALL,
    CLICK_WINDOWS,
    GOALS_PATH,
    NAMES,
    NOISE_Z,
    NOT_SET,
    OFFLINE_TYPES,
    OTHER,
    SKIPPED_STATUSES,
    VIEW_WINDOWS,
    Finding,
    Severity,
    as_data,
    name_of,
)
from convsync.reconcile.digest import (
    Cells,
    Digest,
    VariantKey,
    digest,
)
from convsync.reconcile.discrepancies import (
    COVERAGE_GAP,
    Cause,
    Comparison,
    DayRow,
    Figure,
    Reconciliation,
    Scope,
    Shift,
    reconcile,
)
from convsync.reconcile.funnel import (
    NO_CAMPAIGN,
    OTHER_SOURCE,
    SOURCE_LABELS,
    Funnel,
    FunnelDiagnosis,
    FunnelStep,
    diagnose_funnel,
)
from convsync.reconcile.load import (
    load_audit,
    load_digest,
    load_reconciliation,
    settings_of,
    stored_range,
)

__all__ = [
    "ALL",
    "CLICK_WINDOWS",
    "COVERAGE_GAP",
    "GOALS_PATH",
    "NAMES",
    "NOISE_Z",
    "NOT_SET",
    "NO_CAMPAIGN",
    "OFFLINE_TYPES",
    "OTHER",
    "OTHER_SOURCE",
    "SKIPPED_STATUSES",
    "SOURCE_LABELS",
    "VIEW_WINDOWS",
    "ActionAudit",
    "Audit",
    "Cause",
    "Cells",
    "Comparison",
    "DayRow",
    "Digest",
    "Figure",
    "Finding",
    "Funnel",
    "FunnelDiagnosis",
    "FunnelStep",
    "Reconciliation",
    "Scope",
    "Severity",
    "Shift",
    "VariantKey",
    "as_data",
    "audit",
    "diagnose_funnel",
    "digest",
    "load_audit",
    "load_digest",
    "load_reconciliation",
    "name_of",
    "reconcile",
    "settings_of",
    "stored_range",
]
