"""What can go wrong, as convsync reports it: one small hierarchy.

Every error convsync raises on purpose is a ``ConvsyncError``. Each kind has the exit code the
CLI ends with and a message that names what to fix, never a secret, an email or a phone (an
input error names the line and the column, never the value). The CLI prints any of them as
one line, ``error: <message>``; ``convsync -v`` adds the traceback for a bug report. Anything
else escaping is a bug in convsync.

    ConvsyncError             exit 1
    ├── ConfigError           exit 2   a config file or secret that cannot be used: each
    │   │                              problem names its key
    │   └── MissingSecret              a credential a platform needs is not set
    ├── InputError            exit 2   a file to import that cannot be read at all (a bad
    │                                  row is not an error: it is skipped and reported by
    │                                  line, the rest imported)
    ├── StoreError            exit 1   the store cannot be opened or used: names the store
    │   └── StoreVersionError          written by a newer convsync
    ├── PlatformError         exit 1   a platform refused or failed a call: ``reason`` (the
    │   │                              platform's own name for it), ``retryable`` (a later
    │   │                              run may succeed), ``fix``
    │   └── QuotaExhausted             a quota convsync counts is spent for the day
    ├── Busy                  exit 1   another run of the client holds its lock
    └── NoData                exit 1   nothing stored to work on (pull first)

During a pull, a platform's errors are reported in the run's summary and the other platforms
go on: they reach the CLI as a ``partial`` run (exit 3), not as an exception. A push's
``PlatformError`` carries ``maybe_sent`` (the platform may have taken the request: its events
are resent under the same keys, never assumed lost) and ``events`` (the events the platform
named as the cause, by index).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


class ConvsyncError(Exception):
    """Something convsync reports rather than crashes on; ``fix`` says what to do."""

    exit_code = 1

    def __init__(self, message: str, *, fix: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.message}; to fix: {self.fix}" if self.fix else self.message


class ConfigError(ConvsyncError):
    """A config file that cannot be used; ``problems`` names each key to fix."""

    exit_code = 2

    def __init__(self, path: Path, problems: Sequence[Any]) -> None:
        self.path: Path | None = path
        self.problems: list[Any] = list(problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{path}: {len(self.problems)} problem(s)\n{lines}")


class MissingSecret(ConfigError):
    """A credential a platform needs is not set: names the variable, never a value."""

    def __init__(self, variable: str, *, what: str = "") -> None:
        ConvsyncError.__init__(
            self, f"{variable} is not set{f' ({what})' if what else ''}",
            fix=f"set {variable} in the environment or in the client's secrets_file")
        self.path = None
        self.problems = [self.message]


class InputError(ConvsyncError):
    """A file to import that cannot be read at all; the message says what to fix."""

    exit_code = 2


class StoreError(ConvsyncError):
    """The store cannot be opened or used as asked."""


class StoreVersionError(StoreError):
    """The database was written by a newer convsync than this one."""


class PlatformError(ConvsyncError):
    """A platform call that failed, with what to fix; never carries PII or secrets.

    ``reason`` is the platform's error reason name (``INVALID_CONVERSION_ACTION_TYPE``,
    ``RATE_LIMIT_EXCEEDED``, ...); ``retryable``: a later run may succeed (quota, outage, an
    action too new); ``maybe_sent``: the platform may have taken the request (a timeout or an
    outage after sending), so the caller must resend under the same keys and never assume
    nothing arrived; ``events``: the events of the request the platform named as the cause
    (their index in the request -> what is wrong, never a value), when it named any."""

    def __init__(self, message: str, *, fix: str = "", reason: str = "",
                 retryable: bool = False, maybe_sent: bool = False,
                 events: dict[int, str] | None = None) -> None:
        super().__init__(message, fix=fix)
        self.reason = reason
        self.retryable = retryable
        self.maybe_sent = maybe_sent
        self.events = events or {}


class QuotaExhausted(PlatformError):
    """The project's quota for the day is spent: nothing was sent; a later run goes on."""


class Busy(ConvsyncError):
    """Another run of the same client holds the lock."""


class NoData(ConvsyncError):
    """Nothing stored to work on."""
