"""A small threaded HTTP server shared by the REST simulators (GA4 REST, Meta, Klaviyo).

Each platform supplies routing and its own error shape; this module counts requests, plays the
faults the sandbox owes and turns exceptions into the platform's error responses."""

from __future__ import annotations

import json
import logging
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from convsync.sandbox.control import Fault, Sandbox

log = logging.getLogger(__name__)


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: Message
    body: bytes = b""

    def arg(self, name: str, default: str | None = None) -> str | None:
        """A query-string or form-body parameter (the last one wins, as on the platforms)."""
        values = self.query.get(name) or self.form().get(name)
        return values[-1] if values else default

    def form(self) -> dict[str, list[str]]:
        content_type = self.headers.get("Content-Type", "")
        if self.body and "application/x-www-form-urlencoded" in content_type:
            return parse_qs(self.body.decode(), keep_blank_values=True)
        return {}

    def json(self) -> Any:
        return json.loads(self.body or b"{}")


@dataclass
class Response:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"


class ApiError(Exception):
    """Raised by a handler to answer with the platform's own error response."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


Handler = Callable[[Request], Response]


class RestPlatform(Protocol):
    name: str

    def route(self, request: Request) -> tuple[str, Handler]:
        """(method label for the request counter, handler); raise ApiError for unknown paths."""

    def fault_response(self, fault: Fault) -> Response:
        """The platform's own answer for an injected fault."""

    def error_response(self, status: int, message: str) -> Response:
        """The platform's own error shape for a generic failure."""


def serve_rest(platform: RestPlatform, sandbox: Sandbox, host: str = "127.0.0.1",
               port: int = 0) -> ThreadingHTTPServer:
    """Start serving ``platform`` in a daemon thread; the bound port is ``server.server_port``."""

    class _Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = f"convsync-sandbox-{platform.name}"

        def do_GET(self) -> None:
            self._dispatch()

        def do_POST(self) -> None:
            self._dispatch()

        def do_PATCH(self) -> None:
            self._dispatch()

        def do_DELETE(self) -> None:
            self._dispatch()

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s %s", platform.name, format % args)

        def _dispatch(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            parts = urlsplit(self.path)
            query = parse_qs(parts.query, keep_blank_values=True)
            request = Request(self.command, parts.path, query, self.headers, body)
            self._send(_answer(platform, sandbox, request))

        def _send(self, response: Response) -> None:
            payload = (response.body if isinstance(response.body, bytes)
                       else json.dumps(response.body).encode())
            self.send_response(response.status)
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(payload)))
            for key, value in response.headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(payload)

    server = ThreadingHTTPServer((host, port), _Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name=f"sandbox-{platform.name}",
                     daemon=True).start()
    return server


def _answer(platform: RestPlatform, sandbox: Sandbox, request: Request) -> Response:
    try:
        label, handler = platform.route(request)
        sandbox.count(platform.name, label)
        fault = sandbox.next_fault(platform.name)
        if fault is not None:
            if fault.kind != "slow":
                return platform.fault_response(fault)
            time.sleep(fault.delay)
        return handler(request)
    except ApiError as error:
        return error.response
    except Exception:  # a simulator bug: answer like a platform outage, keep the trace
        log.error("sandbox %s failed on %s %s\n%s", platform.name, request.method, request.path,
                  traceback.format_exc())
        return platform.error_response(500, "sandbox internal error")
