"""Sinks: one module per destination, turning planned uploads into platform calls and reading
back what the platform did with them (``google_ads``: the Data Manager API)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from convsync.errors import PlatformError

if TYPE_CHECKING:
    from convsync.model import Upload

SinkError = PlatformError
"""What a sink raises when a send or a status call fails (see ``convsync.errors``)."""


def in_requests(uploads: Iterable[Upload], size: int) -> Iterator[list[Upload]]:
    """Uploads ``size`` at a time, in order: the requests of a platform that takes a list."""
    iterator = iter(uploads)
    while batch := list(itertools.islice(iterator, size)):
        yield batch
