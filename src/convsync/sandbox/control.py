"""The sandbox's shared state: its world, the requests it served and the faults it owes."""

from __future__ import annotations

import threading
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Literal

from convsync.sandbox.world import World

FaultKind = Literal["rate_limit", "server_error", "exhausted", "slow"]
FAULT_KINDS: tuple[FaultKind, ...] = ("rate_limit", "server_error", "exhausted", "slow")
"""rate_limit: HTTP 429 with Retry-After (gRPC RESOURCE_EXHAUSTED for Google); server_error:
HTTP 500/503 (gRPC UNAVAILABLE); exhausted: the platform's quota error (Google Ads
RESOURCE_EXHAUSTED, Meta code 17/80004, Klaviyo 429); slow: answer after ``delay`` seconds."""


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    retry_after: float = 1.0
    delay: float = 0.0


@dataclass
class Sandbox:
    """Everything the platform simulators share. Thread-safe."""

    world: World
    _requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    _faults: dict[str, deque[Fault]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, platform: str, method: str) -> None:
        with self._lock:
            self._requests[(platform, method)] += 1

    def requests(self, platform: str | None = None) -> dict[str, int]:
        """Requests served so far, as {"platform.method": n} (one platform's when given)."""
        with self._lock:
            return {f"{p}.{m}": n for (p, m), n in sorted(self._requests.items())
                    if platform is None or p == platform}

    def reset_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def inject(self, platform: str, kind: FaultKind, count: int = 1, *,
               retry_after: float = 1.0, delay: float = 0.0) -> None:
        """Make the next ``count`` requests to ``platform`` fail (or stall) this way."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
        with self._lock:
            queue = self._faults.setdefault(platform, deque())
            queue.extend(Fault(kind, retry_after, delay) for _ in range(count))

    def next_fault(self, platform: str) -> Fault | None:
        with self._lock:
            queue = self._faults.get(platform)
            return queue.popleft() if queue else None

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
