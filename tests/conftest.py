"""Shared fixtures: a small deterministic world, its sandbox state, and the sandbox TLS cert.

The Google clients (google-ads, google-analytics-data over gRPC) only open TLS channels and
read their trusted roots from GRPC_DEFAULT_SSL_ROOTS_FILE_PATH once per process, so the
certificate is made and the variable set before any test runs."""

from __future__ import annotations

import datetime as dt
import os
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from convsync.sandbox.control import Sandbox
from convsync.sandbox.ga4 import Ga4Property, build_ga4_grpc_server, serve_ga4_rest
from convsync.sandbox.klaviyo import serve_klaviyo
from convsync.sandbox.tls import ensure_certificate
from convsync.sandbox.world import World, WorldSpec

_CERT_DIR = Path(tempfile.mkdtemp(prefix="convsync-test-tls-"))
CERT, KEY = ensure_certificate(_CERT_DIR)
os.environ["GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"] = str(CERT)

SPEC = WorldSpec(seed=11, start=dt.date(2026, 9, 1), days=45, campaigns=8)
POSTGRES_URL = os.environ.get("CONVSYNC_TEST_POSTGRES_URL")


@pytest.fixture(params=[
    "sqlite",
    pytest.param("postgresql", marks=[
        pytest.mark.postgres,
        pytest.mark.skipif(POSTGRES_URL is None, reason=(
            "CONVSYNC_TEST_POSTGRES_URL is not set; start a server with "
            "scripts/start_test_postgres and export the URL it prints")),
    ]),
])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL to an empty database: a new SQLite file, or a new PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'nested' / 'dir' / 'convsync.db'}"
        return
    assert POSTGRES_URL is not None
    schema = f"test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    scoped = sa.make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield scoped.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


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


@dataclass
class Ga4Running:
    """A world's GA4 simulator on both transports (gRPC with the sandbox certificate, REST)."""

    sandbox: Sandbox
    grpc_port: int
    rest_port: int
    grpc_server: grpc.Server
    http_server: ThreadingHTTPServer

    @property
    def world(self) -> World:
        return self.sandbox.world

    @property
    def property(self) -> str:
        return f"properties/{self.world.accounts.ga4_property_id}"

    def endpoint(self, transport: str) -> str:
        """What ``ClientOptions(api_endpoint=...)`` takes for ``grpc`` or ``rest``."""
        if transport == "grpc":
            return f"localhost:{self.grpc_port}"
        return f"http://127.0.0.1:{self.rest_port}"

    def stop(self) -> None:
        self.grpc_server.stop(grace=None)
        self.http_server.shutdown()
        self.http_server.server_close()


def start_ga4(world: World) -> Ga4Running:
    sandbox = Sandbox(world)
    ga4 = Ga4Property(world)
    server, port = build_ga4_grpc_server(sandbox, CERT, KEY, "127.0.0.1", 0, ga4=ga4)
    http = serve_ga4_rest(sandbox, "127.0.0.1", 0, ga4=ga4)
    return Ga4Running(sandbox, port, http.server_port, server, http)


@pytest.fixture(scope="module")
def ga4_running(world: World) -> Iterator[Ga4Running]:
    """The GA4 simulator on the shared world, for a module's tests."""
    running = start_ga4(world)
    yield running
    running.stop()


def named_client(base: Path, target: Path, name: str, store: str, secrets_file: str) -> Path:
    """A copy of the client config ``base`` as the client ``name``, with its own store and
    the secrets file ``secrets_file`` (relative to ``target``'s folder)."""
    import re

    text = re.sub(r'(?m)^name = .*$', f'name = "{name}"', base.read_text(), count=1)
    text = re.sub(r'(?m)^store_url = .*$', f'store_url = "sqlite:///{store}"', text)
    text = re.sub(r'(?m)^secrets_file = .*$', f'secrets_file = "{secrets_file}"', text)
    target.write_text(text)
    return target
