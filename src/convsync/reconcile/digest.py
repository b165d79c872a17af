"""The digest: one pass over the stored stats, in the shape the discrepancies and the funnel
read."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

from convsync.model import (
    Basis,
    ConversionDefinition,
    ConversionStat,
    Kind,
    Platform,
)
from convsync.reconcile.common import ALL, CLICK_WINDOWS, NARROW, OTHER, VIEW_WINDOWS

# -- the digest: one pass over the stored stats ------------------------------------------------

VariantKey = tuple[str, Platform, Basis, str, str]
"""(conversion, platform, basis, platform conversion, attribution window)."""
Cells = dict[tuple[dt.date, str], list[float]]
"""(day, campaign) -> [count, value]."""


class Digest:
    """The stored daily stats of a date range, kept at the grain each diagnosis needs: per day
    and campaign for the macro conversions (every platform) and for the ladder of the funnel
    source; per day for every mapped conversion. Build it with ``digest(stats, ...)``."""

    def __init__(self, definitions: Sequence[ConversionDefinition], funnel_source: Platform,
                 owners: Mapping[str, Platform]) -> None:
        self.definitions = list(definitions)
        self.macro = [d.name for d in definitions if d.kind is Kind.MACRO]
        laddered = sorted((d for d in definitions if d.ladder_position is not None),
                          key=lambda d: d.ladder_position or 0)
        self.ladder = [d.name for d in laddered]
        self.kinds = {d.name: d.kind for d in definitions}
        self.funnel_source = funnel_source
        self.owners = dict(owners)
        """Campaign -> the ad platform that runs it (Google Ads or Meta)."""
        self.cells: dict[VariantKey, Cells] = defaultdict(dict)
        self.daily: dict[VariantKey, Cells] = defaultdict(dict)
        """Per day and traffic group: the platform that runs the campaign, or OTHER."""
        self.in_column: dict[str, bool] = {}
        self.timezones: dict[Platform, str] = {}
        self.spans: dict[Platform, tuple[dt.date, dt.date]] = {}

    def add(self, s: ConversionStat) -> None:
        p = s.platform
        first, last = self.spans.get(p, (s.date, s.date))
        self.spans[p] = (min(first, s.date), max(last, s.date))
        self.timezones.setdefault(p, s.timezone)
        campaign = _campaign(s)
        if s.conversion is None or not (s.count or s.value):
            return
        key = (s.conversion, p, s.basis, s.platform_conversion, s.window)
        if p is Platform.GOOGLE_ADS:
            self.in_column[s.platform_conversion] = bool(s.in_column)
        owner = p if p in NARROW else self.owners.get(campaign)
        add_cell(self.daily[key], (s.date, owner.value if owner else OTHER), s.count, s.value)
        if s.conversion in self.macro or (p is self.funnel_source
                                          and s.conversion in self.ladder):
            add_cell(self.cells[key], (s.date, campaign), s.count, s.value)

    def platforms(self) -> list[Platform]:
        return [p for p in Platform if p in self.spans]

    def variants(self, conversion: str, platform: Platform) -> list[VariantKey]:
        return sorted(k for k in self.daily if k[0] == conversion and k[1] == platform)

    def headline(self, conversion: str, platform: Platform) -> list[VariantKey]:
        """The variants that make a platform's own figure for a conversion.

        Google Ads: the actions counted in column (click date), else the busiest action
        alone (several actions of one conversion usually count the same events). Meta: the
        widest click window pulled plus the view windows (Meta's own attribution setting).
        GA4 and Klaviyo: every name mapped to the conversion."""
        keys = self.variants(conversion, platform)
        if platform is Platform.GOOGLE_ADS:
            clicks = [k for k in keys if k[2] is Basis.CLICK_DATE]
            primary = [k for k in clicks if self.in_column.get(k[3])]
            return primary or ([max(clicks, key=self._total)] if clicks else [])
        if platform is Platform.META:
            windows = {k[4] for k in keys}
            widest = next((w for w in CLICK_WINDOWS if w in windows), None)
            return [k for k in keys if k[4] == widest or k[4] in VIEW_WINDOWS]
        return keys

    def conversion_date_variants(self, conversion: str) -> list[VariantKey]:
        """Google Ads' headline actions by conversion date, when that basis was pulled."""
        names = {k[3] for k in self.headline(conversion, Platform.GOOGLE_ADS)}
        return [k for k in self.variants(conversion, Platform.GOOGLE_ADS)
                if k[2] is Basis.CONVERSION_DATE and k[3] in names]

    def dated(self, conversion: str, platform: Platform) -> list[VariantKey]:
        """The headline variants, by conversion date where that basis was pulled: lining
        days up across platforms is about when things happened, not when the click was."""
        if platform is Platform.GOOGLE_ADS:
            return self.conversion_date_variants(conversion) or self.headline(
                conversion, platform)
        return self.headline(conversion, platform)

    def cells_of(self, keys: Iterable[VariantKey]) -> Cells:
        merged: Cells = {}
        for key in keys:
            for where, (n, v) in self.cells.get(key, {}).items():
                add_cell(merged, where, n, v)
        return merged

    def daily_of(self, keys: Iterable[VariantKey],
                 groups: Collection[str] | None = None) -> dict[dt.date, list[float]]:
        """Daily totals of the variants, over the traffic groups given (None: all)."""
        merged: dict[dt.date, list[float]] = {}
        for key in keys:
            for (day, group), (n, v) in self.daily.get(key, {}).items():
                if groups is None or group in groups:
                    add_cell(merged, day, n, v)
        return merged

    def basis(self, platform: Platform) -> Basis:
        keys = [k for k in self.daily if k[1] is platform]
        return keys[0][2] if keys and all(k[2] is keys[0][2] for k in keys) else (
            Basis.CLICK_DATE if platform in (Platform.GOOGLE_ADS, Platform.META)
            else Basis.CONVERSION_DATE)

    def _total(self, key: VariantKey) -> float:
        return sum(n for n, _ in self.daily.get(key, {}).values())


def digest(stats: Iterable[ConversionStat], definitions: Sequence[ConversionDefinition],
           funnel_source: Platform, owners: Mapping[str, Platform]) -> Digest:
    """``owners``: each Google Ads and Meta campaign (by name) and its platform, known before
    the stats stream by (GA4's rows come first and are grouped by them)."""
    found = Digest(definitions, funnel_source, owners)
    for s in stats:
        found.add(s)
    return found


def _campaign(s: ConversionStat) -> str:
    return s.campaign_name or s.campaign_id or ALL


def add_cell(cells: dict[Any, list[float]], key: Any, count: float, value: float) -> None:
    cell = cells.get(key)
    if cell is None:
        cells[key] = [count, value]
    else:
        cell[0] += count
        cell[1] += value


