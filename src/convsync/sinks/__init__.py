"""Sinks: one module per destination, turning planned uploads into platform calls and reading
back what the platform did with them (``google_ads``: the Data Manager API)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from convsync.errors import PlatformError

if TYPE_CHECKING:
    from convsync.model import Upload

SinkError = PlatformError
"""What a sink raises when a send or a status call fails (see ``convsync.errors``)."""


def check_request(uploads: Sequence[Upload], size: int, platform: str) -> None:
    """ValueError for a request of no uploads or more than ``platform`` takes."""
    if not uploads:
        raise ValueError("no uploads to send")
    if len(uploads) > size:
        raise ValueError(f"{len(uploads):,} events in one request: {platform} takes at most "
                         f"{size:,}")


def in_requests(uploads: Iterable[Upload], size: int) -> Iterator[list[Upload]]:
    """Uploads ``size`` at a time, in order: the requests of a platform that takes a list."""
    iterator = iter(uploads)
    while batch := list(itertools.islice(iterator, size)):
        yield batch
