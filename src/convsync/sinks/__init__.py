"""Sinks: one module per destination, turning planned uploads into platform calls and reading
back what the platform did with them (``google_ads``: the Data Manager API)."""

from __future__ import annotations


class SinkError(Exception):
    """A send or status call that failed, with what to fix; never carries PII or secrets.

    ``reason`` is the platform's error reason name (``INVALID_CONVERSION_ACTION_TYPE``,
    ``RATE_LIMIT_EXCEEDED``, ...); ``retryable``: a later run may succeed (quota, outage, an
    action too new); ``maybe_sent``: the platform may have taken the request (a timeout or an
    outage after sending), so the caller must resend under the same keys and never assume
    nothing arrived; ``events``: the events of the request the platform named as the cause
    (their index in the request -> what is wrong, never a value), when it named any."""

    def __init__(self, message: str, *, fix: str = "", reason: str = "",
                 retryable: bool = False, maybe_sent: bool = False,
                 events: dict[int, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix
        self.reason = reason
        self.retryable = retryable
        self.maybe_sent = maybe_sent
        self.events = events or {}

    def __str__(self) -> str:
        return f"{self.message}; to fix: {self.fix}" if self.fix else self.message
