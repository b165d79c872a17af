"""How convsync logs: rich lines on a terminal, or (``--json-logs``) one JSON object a line
on stderr for a log collector: time, level, message and, where a record has them, the run,
client, stage, platform, status, counts, seconds, errors and fix. Secrets are redacted from
every field (``redact``); emails and phones never reach a log in the first place."""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys

FIELDS = ("run_id", "client", "stage", "platform", "status", "counts", "seconds", "errors",
          "fix")
"""The extras a record may carry (``log.info(..., extra={"client": ...})``)."""


class JsonLines(logging.Formatter):
    """One JSON object a record."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name,
            "message": record.getMessage()}
        data.update({name: getattr(record, name) for name in FIELDS if hasattr(record, name)})
        if record.exc_info and record.levelno >= logging.DEBUG:
            data["traceback"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def use_json_lines(level: int | None = None) -> None:
    """Make the root logger write JSON lines on stderr (instead of whatever it had)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines())
    root.addHandler(handler)
    if level is not None:
        root.setLevel(level)
