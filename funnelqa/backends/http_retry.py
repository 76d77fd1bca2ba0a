"""What the HTTP backends (Gemini, OpenAI-compatible servers) share: concurrency, retries, backoff.

A backend subclasses ``HTTPBackend`` and writes one round trip, ``call_once``. It raises
``RetryableFailure`` for what another try may fix (rate limit, server error, timeout, a body we
cannot read) and a ``FunnelQAError`` for what it cannot (bad request, rejected key). The retry
policy lives here only, so both backends behave alike and their clients' own retries stay off.
"""

from __future__ import annotations

import random
import threading
from abc import abstractmethod
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

import httpx

from funnelqa.backends import Backend, Request
from funnelqa.errors import BackendError, BackendUnavailable

# 408 and 409 are what proxies and overloaded servers answer for "try again"; 429 is a rate
# limit; any 5xx may be a passing overload or a restart.
RETRYABLE_STATUS = frozenset({408, 409, 429})
AUTH_STATUS = frozenset({401, 403})


class RetryableFailure(Exception):
    """One attempt failed in a way that a later attempt may not."""

    def __init__(self, reason: str, *, retry_after: float | None = None, unreachable: bool = False):
        super().__init__(reason)
        self.reason = reason
        # The server's own hint (Retry-After, Google's RetryInfo) of how long to wait, seconds.
        self.retry_after = retry_after
        # Nothing listens at the address: if that lasts, the fix is to start a server, not to wait.
        self.unreachable = unreachable


def backoff_delay(attempt: int, base: float, cap: float, retry_after: float | None, rng: random.Random) -> float:
    """Seconds to wait before retry number ``attempt + 1``: exponential, jittered, at least the server's hint.

    The jitter keeps many workers that failed together from coming back together.
    """
    ceiling = min(cap, base * 2**attempt)
    delay = ceiling * rng.uniform(0.5, 1.0)
    if retry_after is not None:
        delay = max(delay, min(retry_after, cap))
    return delay


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header; the HTTP-date form is rare from model servers and is ignored."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return max(0.0, seconds)


def failure_for_status(label: str, status: int, message: str, *, retry_after: float | None = None, auth_hint: str) -> Exception:
    """The exception for an HTTP error answer: retryable, or final with the server's own words."""
    detail = " ".join(message.split())[:300] or "no message"
    if status in RETRYABLE_STATUS or status >= 500:
        return RetryableFailure(f"HTTP {status}: {detail}", retry_after=retry_after)
    if status in AUTH_STATUS:
        return BackendUnavailable(f"{label}: HTTP {status}: {detail} ({auth_hint})")
    return BackendError(f"{label}: HTTP {status}: {detail}")


def transport_failure(exc: httpx.TransportError, timeout: float) -> RetryableFailure:
    """A failure below HTTP: nothing listening, no answer in time, or a connection cut mid-answer."""
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return RetryableFailure(f"cannot connect: {exc or type(exc).__name__}", unreachable=True)
    if isinstance(exc, httpx.TimeoutException):
        return RetryableFailure(f"no answer within {timeout:g} s")
    return RetryableFailure(f"connection failed: {exc or type(exc).__name__}")


def make_http_client(timeout: float, concurrency: int, **kwargs) -> httpx.Client:
    """One pooled client shared by all worker threads (httpx clients are thread-safe)."""
    return httpx.Client(
        timeout=httpx.Timeout(timeout),
        limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        **kwargs,
    )


class _Abandoned(BackendError):
    """A sibling request of the batch failed for good, so this one stops retrying."""


class HTTPBackend(Backend):
    # Backoff before retry k is about backoff_base * 2**k seconds, never more than backoff_cap.
    # Class attributes so tests (and impatient users) can shrink them.
    backoff_base: float = 1.0
    backoff_cap: float = 60.0

    def __init__(self, *, label: str, base_url: str, concurrency: int, timeout: float, max_retries: int):
        self.spec = label
        self.label = label
        self.base_url = base_url
        self.concurrency = max(1, concurrency)
        self.timeout = timeout
        self.max_retries = max(0, max_retries)
        # Enough requests per batch to keep every worker busy while a few wait on retries.
        self.batch_size = 4 * self.concurrency
        self._rng = random.Random()

    @abstractmethod
    def call_once(self, request: Request) -> str:
        """One round trip. Raise RetryableFailure when another try may help, a FunnelQAError when not."""

    def generate(self, requests: Sequence[Request]) -> list[str]:
        stop = threading.Event()
        if len(requests) <= 1 or self.concurrency == 1:
            return [self._call_with_retries(request, stop) for request in requests]
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests)), thread_name_prefix="funnelqa-http")
        futures = [pool.submit(self._call_with_retries, request, stop) for request in requests]
        try:
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((future for future in futures if future in done and future.exception()), None)
            if failed is not None:
                raise failed.exception()
        except BaseException:
            # One request failed for good (or the user pressed Ctrl-C): the batch is lost anyway,
            # so the other workers stop at once instead of spending their retries.
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        return [future.result() for future in futures]

    def _call_with_retries(self, request: Request, stop: threading.Event) -> str:
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            try:
                return self.call_once(request)
            except RetryableFailure as failure:
                last = failure
            if attempt + 1 < attempts:
                delay = backoff_delay(attempt, self.backoff_base, self.backoff_cap, last.retry_after, self._rng)
                if stop.wait(delay):
                    raise _Abandoned(f"{self.label}: abandoned after a sibling request failed")
        tries = f"{attempts} attempt{'s' if attempts > 1 else ''}"
        if last.unreachable:
            raise BackendUnavailable(
                f"no server answers at {self.base_url} ({last.reason}; {tries}); start it or fix the URL"
            )
        raise BackendError(f"{self.label}: gave up after {tries}: {last.reason}")

