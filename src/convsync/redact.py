"""Keep secrets out of every log line and error message."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

MASK = "***"
# Credentials that travel in URLs or headers even when we do not know their value.
_PATTERNS = (
    re.compile(r"(access_token=)[^&\s\"']+"),
    re.compile(r"(Klaviyo-API-Key\s+)[^\s\"']+"),
    re.compile(r"(Bearer\s+)[^\s\"']+"),
    re.compile(r"(refresh_token[\"']?\s*[:=]\s*[\"']?)[^&\s\"',]+"),
)


class Redactor:
    """Replaces known secret values and credential-shaped substrings with ``***``."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        for pattern in _PATTERNS:
            text = pattern.sub(lambda m: m.group(1) + MASK, text)
        return text


class RedactingFilter(logging.Filter):
    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.redactor(record.getMessage())
        record.args = None
        for name in ("errors", "fix"):  # the extras a JSON log line carries as text
            value = getattr(record, name, None)
            if isinstance(value, str):
                setattr(record, name, self.redactor(value))
            elif isinstance(value, list):
                setattr(record, name, [self.redactor(str(v)) for v in value])
        return True


def install(redactor: Redactor) -> None:
    """Redact every record that reaches the root logger's handlers."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter(redactor))
