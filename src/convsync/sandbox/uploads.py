"""Offline conversions uploaded to the world's Google Ads account (the Data Manager sink side).

The ledger is what Google Ads keeps of accepted uploads: one conversion per (conversion action,
transaction id), matched to a click of the world, with the value it was last restated to. Each
change takes effect when its upload request finishes processing (``effective_ts`` on the
world's clock), so the Google Ads simulator's stats show an upload only once it is processed,
and a restatement only once it is processed in turn. A retraction (the Google Ads API's
conversion adjustments, ``adjustments.py``) takes the conversion out of the stats, count and
value, from its effective time on, for good: a later upload under the same key restates a value
nobody sees.

It holds no request, status or counter: those belong to the Data Manager simulator
(``datamanager.py``), which decides what is accepted and records it here, and to the
conversion adjustments simulator (``adjustments.py``), which retracts and restates."""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal

Applied = Literal["conversion", "adjustment", "duplicate"]
AdjustmentKind = Literal["RETRACTION", "RESTATEMENT"]
"""What an accepted event did: a new conversion, a restatement of one (value or currency
changed), or nothing (the same transaction id sent again with the same value: a resend)."""


@dataclass(frozen=True)
class ClickRef:
    """One click of the world: the person who made it and where it came from."""

    day: int  # UTC day number of the click (World.day)
    index: int  # the person within that day
    campaign: int  # campaign index
    ts: float  # click time, epoch seconds


@dataclass(frozen=True)
class Adjustment:
    """A conversion adjustment accepted through the Google Ads API."""

    kind: AdjustmentKind
    adjustment_ts: float  # when it happened, as the advertiser said (adjustment_date_time)
    effective_ts: float  # when Google Ads applied it (world clock)


@dataclass
class Upload:
    """One conversion an upload created, and the values it was restated to."""

    action_id: int
    key: str  # the transaction id, or "<identifier>@<conversion time>" without one
    click: ClickRef
    conversion_ts: float
    versions: list[tuple[float, float, str]] = field(default_factory=list)
    """(effective_ts, value, currency) in the order they were accepted."""
    adjustments: list[Adjustment] = field(default_factory=list)
    """Retractions and restatements through the Google Ads API, in the order accepted."""

    @property
    def created_ts(self) -> float:
        return self.versions[0][0]

    @property
    def retracted_ts(self) -> float | None:
        """When its retraction took effect (world clock), or None while it counts."""
        return next((a.effective_ts for a in self.adjustments if a.kind == "RETRACTION"), None)

    def restatement_times(self) -> list[float]:
        """The ``adjustment_date_time`` of each restatement made through the Google Ads API."""
        return [a.adjustment_ts for a in self.adjustments if a.kind == "RESTATEMENT"]

    def value_at(self, as_of_ts: float) -> tuple[float, str] | None:
        """The value and currency in effect at ``as_of_ts``; None before the first one and
        from its retraction on."""
        retracted = self.retracted_ts
        if retracted is not None and retracted <= as_of_ts:
            return None
        current = None
        for effective, value, currency in self.versions:
            if effective <= as_of_ts:
                current = (value, currency)
        return current


class UploadLedger:
    """Accepted uploads, by (action, key) and by the UTC day of their click. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_key: dict[tuple[int, str], Upload] = {}
        self._by_click_day: defaultdict[int, list[Upload]] = defaultdict(list)

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_key)

    def get(self, action_id: int, key: str) -> Upload | None:
        with self._lock:
            return self._by_key.get((action_id, key))

    def apply(self, action_id: int, key: str, click: ClickRef, conversion_ts: float,
              value: float, currency: str, effective_ts: float) -> Applied:
        """Record an accepted event: a new conversion, or a restatement of the one under the
        same key (value and currency overwritten; its click, time and count stay)."""
        with self._lock:
            upload = self._by_key.get((action_id, key))
            if upload is None:
                upload = Upload(action_id, key, click, conversion_ts,
                                [(effective_ts, value, currency)])
                self._by_key[(action_id, key)] = upload
                self._by_click_day[click.day].append(upload)
                return "conversion"
            _, last_value, last_currency = upload.versions[-1]
            if (last_value, last_currency) == (value, currency):
                return "duplicate"
            upload.versions.append((effective_ts, value, currency))
            return "adjustment"

    def find(self, action_id: int, identifier: str, conversion_second: int) -> Upload | None:
        """The conversion uploaded without a transaction id for this click id (gclid, gbraid,
        wbraid) at this conversion time, to the second."""
        prefix = f"{identifier}@"
        with self._lock:
            return next((u for (action, key), u in self._by_key.items()
                         if action == action_id and key.startswith(prefix)
                         and int(u.conversion_ts) == conversion_second), None)

    def retract(self, action_id: int, key: str, adjustment_ts: float,
                effective_ts: float) -> bool:
        """Take the conversion under ``key`` back (count and value) from ``effective_ts`` on;
        False when there is none, or it was already retracted."""
        with self._lock:
            upload = self._by_key.get((action_id, key))
            if upload is None or upload.retracted_ts is not None:
                return False
            upload.adjustments.append(Adjustment("RETRACTION", adjustment_ts, effective_ts))
            return True

    def restate(self, action_id: int, key: str, value: float, currency: str,
                adjustment_ts: float, effective_ts: float) -> bool:
        """Change the value of the conversion under ``key`` from ``effective_ts`` on (its count,
        click and time stay); False when there is none, or it was retracted."""
        with self._lock:
            upload = self._by_key.get((action_id, key))
            if upload is None or upload.retracted_ts is not None:
                return False
            upload.versions.append((effective_ts, value, currency))
            upload.adjustments.append(Adjustment("RESTATEMENT", adjustment_ts, effective_ts))
            return True

    def on_click_day(self, day: int) -> list[Upload]:
        """The uploads whose click was on UTC day ``day`` (a copy: safe to iterate)."""
        with self._lock:
            uploads = self._by_click_day.get(day)
            return list(uploads) if uploads else []

    def has_uploads(self) -> bool:
        with self._lock:
            return bool(self._by_key)

    def uploads(self, action_id: int | None = None) -> list[Upload]:
        with self._lock:
            return [u for u in self._by_key.values()
                    if action_id is None or u.action_id == action_id]
