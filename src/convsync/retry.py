"""Retries with tenacity, each platform deciding what is retryable and how long to wait.

A platform's ``RetryPolicy`` names its transient errors (HTTP 429/5xx, gRPC RESOURCE_EXHAUSTED /
UNAVAILABLE / INTERNAL, Meta throttling codes) and reads the wait the platform asked for
(Retry-After, Google's retry_delay, Meta's estimated_time_to_regain_access). Validation and
permission errors are never retried: they are reported."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    platform: str
    is_retryable: Callable[[BaseException], bool]
    retry_after: Callable[[BaseException], float | None] = lambda error: None
    attempts: int = 5
    initial_wait: float = 1.0
    max_wait: float = 120.0


def retrying(policy: RetryPolicy, sleep: Callable[[float], None] = time.sleep) -> Retrying:
    """A tenacity ``Retrying`` for ``policy``: exponential backoff with jitter, or the wait the
    platform asked for when it said one; an error asking for more than ``max_wait`` is not
    retried (see ``wait_too_long``); the last error is re-raised as is."""
    backoff = wait_exponential_jitter(initial=policy.initial_wait, max=policy.max_wait)

    def wait(state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        asked = policy.retry_after(error) if error is not None else None
        return min(asked, policy.max_wait) if asked is not None else backoff(state)

    def before_sleep(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        log.warning("%s: %s; retry %d of %d in %.1f s", policy.platform,
                    type(error).__name__, state.attempt_number, policy.attempts - 1, delay)

    def retryable(error: BaseException) -> bool:
        return policy.is_retryable(error) and wait_too_long(policy, error) is None

    return Retrying(stop=stop_after_attempt(policy.attempts), wait=wait,
                    retry=retry_if_exception(retryable), reraise=True,
                    sleep=sleep, before_sleep=before_sleep)


def wait_too_long(policy: RetryPolicy, error: BaseException) -> float | None:
    """The wait the platform asked for when it is longer than ``policy.max_wait`` (the run
    stops that platform rather than come back early and be refused again), else None."""
    asked = policy.retry_after(error)
    return asked if asked is not None and asked > policy.max_wait else None
