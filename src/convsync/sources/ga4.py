"""GA4 source: the Data API's runReport through google-analytics-data.

The gRPC transport with responses unwrapped to raw protobuf is the fast path (about 4 us a
row against 37-81 us for proto-plus or REST); REST stays available by config."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

from google.analytics.data_v1beta import BetaAnalyticsDataClient
from google.analytics.data_v1beta.types import (
    DateRange,
    Dimension,
    Metric,
    RunReportRequest,
    RunReportResponse,
)
from google.api_core.client_options import ClientOptions

from convsync.model import Platform, PlatformConversion
from convsync.settings import Ga4Section, Secrets, trust_ca_file
from convsync.sources.google_auth import ANALYTICS_SCOPE, google_credentials

PAGE_SIZE = 100_000


def connect(section: Ga4Section, secrets: Secrets) -> BetaAnalyticsDataClient:
    if section.ca_file is not None and section.transport == "grpc":
        trust_ca_file(section.ca_file)
    options = ClientOptions(api_endpoint=section.endpoint) if section.endpoint else None
    return BetaAnalyticsDataClient(credentials=google_credentials(secrets, [ANALYTICS_SCOPE]),
                                   transport=section.transport, client_options=options)


def run_report(client: BetaAnalyticsDataClient, property_id: str, dimensions: list[str],
               metrics: list[str], start: dt.date, end: dt.date) -> Iterator[Any]:
    """Every row of a report, page by page (limit/offset), as raw protobuf rows."""
    offset = 0
    while True:
        request = RunReportRequest(
            property=f"properties/{property_id}",
            dimensions=[Dimension(name=d) for d in dimensions],
            metrics=[Metric(name=m) for m in metrics],
            date_ranges=[DateRange(start_date=start.isoformat(), end_date=end.isoformat())],
            limit=PAGE_SIZE, offset=offset)
        response = RunReportResponse.pb(client.run_report(request=request, timeout=300))
        yield from response.rows
        offset += len(response.rows)
        if not response.rows or offset >= response.row_count:
            return


def event_names(client: BetaAnalyticsDataClient, property_id: str, start: dt.date,
                end: dt.date) -> Iterator[PlatformConversion]:
    """The property's events over a date range; key events flagged with their count."""
    for row in run_report(client, property_id, ["eventName"], ["eventCount", "keyEvents"],
                          start, end):
        name = row.dimension_values[0].value
        count, key_events = (float(v.value) for v in row.metric_values)
        yield PlatformConversion(
            platform=Platform.GA4, account_id=property_id, platform_id=name, name=name,
            settings={"event_count": count, "key_event": key_events > 0})


def explain(error: Exception) -> str | None:
    from google.api_core.exceptions import GoogleAPICallError

    if not isinstance(error, GoogleAPICallError):
        return None
    return f"GA4 Data API: {error.code} {error.message}"
