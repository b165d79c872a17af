"""Shared fixtures: a small deterministic world, its sandbox state, and the sandbox TLS cert.

The Google clients (google-ads, google-analytics-data over gRPC) only open TLS channels and
read their trusted roots from GRPC_DEFAULT_SSL_ROOTS_FILE_PATH once per process, so the
certificate is made and the variable set before any test runs."""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from convsync.sandbox.control import Sandbox
from convsync.sandbox.klaviyo import serve_klaviyo
from convsync.sandbox.tls import ensure_certificate
from convsync.sandbox.world import World, WorldSpec

_CERT_DIR = Path(tempfile.mkdtemp(prefix="convsync-test-tls-"))
CERT, KEY = ensure_certificate(_CERT_DIR)
os.environ["GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"] = str(CERT)

SPEC = WorldSpec(seed=11, start=dt.date(2026, 9, 1), days=45, campaigns=8)


@pytest.fixture(scope="session")
def tls_files() -> tuple[Path, Path]:
    """(cert.pem, key.pem) of the sandbox; the process already trusts cert.pem."""
    return CERT, KEY


@pytest.fixture(scope="session")
def world() -> World:
    """A shared read-only world. Tests that move its clock or inject faults build their own."""
    return World(SPEC)


@pytest.fixture
def sandbox(world: World) -> Sandbox:
    return Sandbox(world)


@pytest.fixture(scope="module")
def klaviyo_served(world: World) -> Iterator[tuple[Sandbox, str]]:
    """The Klaviyo simulator on the shared world: (its sandbox state, its base URL)."""
    state = Sandbox(world)
    server = serve_klaviyo(state)
    yield state, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
