"""Sinks: one module per destination, turning planned uploads into platform calls and reading
back what the platform did with them (``google_ads``: the Data Manager API)."""

from __future__ import annotations

from convsync.errors import PlatformError

SinkError = PlatformError
"""What a sink raises when a send or a status call fails (see ``convsync.errors``)."""
