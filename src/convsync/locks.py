"""One run per client at a time: a lock that dies with its process.

Beside a SQLite store it is a file lock (``filelock``) next to the database file; on a
PostgreSQL store it is a session advisory lock keyed by the client's name, held on a
connection of its own for as long as the run lasts. Either way a killed process releases it,
so a crashed run never blocks the next one.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import filelock
import sqlalchemy as sa

from convsync.errors import Busy
from convsync.store import Store


def _key(client: str, job: str) -> int:
    """A signed 64-bit advisory-lock key for (job, client)."""
    digest = hashlib.blake2b(f"convsync:{job}:{client}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@contextmanager
def client_lock(store: Store, client: str, job: str = "run", *,
                wait: float | None = 0.0) -> Iterator[None]:
    """Hold the lock of (``client``, ``job``) for the block. ``wait``: seconds to wait for
    it (None: as long as it takes; 0: not at all); raises ``Busy`` when it is not had."""
    if store.dialect == "postgresql":
        with _advisory(store, _key(client, job), wait, f"{job} of client {client!r}"):
            yield
        return
    path = _lock_path(store, client, job)
    lock = filelock.FileLock(str(path), timeout=-1 if wait is None else wait)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise Busy(f"another {job} of client {client!r} is running (lock file {path})"
                   ) from None
    try:
        yield
    finally:
        lock.release()


def _lock_path(store: Store, client: str, job: str) -> Path:
    database = store.engine.url.database
    slug = hashlib.sha256(client.encode()).hexdigest()[:12]
    if database and database != ":memory:":
        return Path(database).with_name(f"{Path(database).name}.{job}-{slug}.lock")
    return Path(f"/tmp/convsync-{job}-{slug}.lock")


@contextmanager
def _advisory(store: Store, key: int, wait: float | None, what: str) -> Iterator[None]:
    with store.engine.connect() as conn:
        if wait is None:
            conn.execute(sa.select(sa.func.pg_advisory_lock(key)))
        else:
            deadline = time.monotonic() + wait
            while not conn.execute(sa.select(sa.func.pg_try_advisory_lock(key))).scalar():
                if time.monotonic() >= deadline:
                    raise Busy(f"another {what} is running (PostgreSQL advisory lock {key})")
                time.sleep(0.2)
        conn.commit()
        try:
            yield
        finally:
            conn.execute(sa.select(sa.func.pg_advisory_unlock(key)))
            conn.commit()
