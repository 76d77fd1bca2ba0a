"""What the HTTP backends (Gemini, OpenAI-compatible servers) share: concurrency, retries, backoff.

A backend subclasses ``HTTPBackend`` and writes one round trip, ``call_once``. It raises
``RetryableFailure`` for what another try may fix (rate limit, server error, timeout, a body we
cannot read) and a ``FunnelQAError`` for what it cannot (bad request, rejected key). The retry
policy lives here only, so both backends behave alike and their clients' own retries stay off.

A request that fails for good (a bad request, retries spent) becomes a failed ``Answer`` and its
batch-mates go on; only a fault that no request can get past (no server, a rejected key, an
unknown model) stops the batch. tenacity runs the attempts; each wait is logged on stderr with
its reason and length, credentials in URLs masked.
"""

from __future__ import annotations

import os
import random
import threading
from abc import abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed

import httpx
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt

from funnelqa.backends import Answer, Backend, Request, raise_failures
from funnelqa.errors import BackendError, BackendUnavailable
from funnelqa.redact import redact

# 408 and 409 are what proxies and overloaded servers answer for "try again"; 429 is a rate
# limit; any 5xx may be a passing overload or a restart.
RETRYABLE_STATUS = frozenset({408, 409, 429})
AUTH_STATUS = frozenset({401, 403})
BACKOFF_ENV = "FUNNELQA_BACKOFF_BASE"


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
    if status == 404:
        # An unknown model or endpoint: every other request would get the same answer.
        return BackendUnavailable(f"{label}: HTTP 404: {detail} (check the model name and base URL)")
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
    """The batch stopped (no server, Ctrl-C), so this request stops retrying."""


def _log_wait(message: str) -> None:
    from funnelqa.console import stderr

    # The reason quotes the server, whose brackets are not rich markup.
    stderr.print(message, markup=False, highlight=False)


class HTTPBackend(Backend):
    """A backend that calls a server once per request (``call_once``), up to ``concurrency``
    requests at a time in worker threads, each tried ``max_retries + 1`` times at most.

    The wait before retry k is ``backoff_delay``: about ``backoff_base * 2**k`` seconds, jittered,
    at most ``backoff_cap``, at least the server's own hint. Those are class attributes so tests
    (and impatient users) can shrink them; FUNNELQA_BACKOFF_BASE (seconds) sets the base too.
    ``batch_size`` is 4 x ``concurrency``; ``label`` (also ``spec``) is the redacted spec.
    """

    backoff_base: float = 1.0
    backoff_cap: float = 60.0

    def __init__(self, *, label: str, base_url: str, concurrency: int, timeout: float, max_retries: int):
        # Shown in every log line and stored with every session: a key written into the URL stays out.
        self.label = self.spec = redact(label)
        self.base_url = base_url
        self.concurrency = max(1, concurrency)
        self.timeout = timeout
        self.max_retries = max(0, max_retries)
        # Enough requests per batch to keep every worker busy while a few wait on retries.
        self.batch_size = 4 * self.concurrency
        self._rng = random.Random()
        # FUNNELQA_BACKOFF_BASE (seconds) shortens the waits for a loopback server or a test.
        if os.environ.get(BACKOFF_ENV):
            self.backoff_base = float(os.environ[BACKOFF_ENV])
        self._lock = threading.Lock()
        self.http_retries = 0

    @abstractmethod
    def call_once(self, request: Request) -> str:
        """One round trip. Raise RetryableFailure when another try may help, a FunnelQAError when not."""

    def counters(self) -> dict[str, int]:
        """``{"http_retries": N}``: the waits before a retry so far, over every request."""
        return {"http_retries": self.http_retries}

    def generate(self, requests: Sequence[Request]) -> list[str]:
        """``generate_each``, then BackendError for the first request that failed for good."""
        return raise_failures(self.generate_each(requests))

    def generate_each(self, requests: Sequence[Request], on_answer: Callable[[int, str], None] | None = None) -> list[str]:
        """Answers in request order; each also goes to ``on_answer(index, answer)`` as it arrives.

        A request that cannot succeed (a 4xx the server will not change its mind on, retries
        spent) becomes a failed Answer and the others go on. Raises BackendUnavailable when no
        request can: nothing answers at ``base_url`` after every try, or the server rejects the key
        (401/403) or the model (404); the other workers then stop at once, as they do on Ctrl-C.
        """
        on_answer = on_answer or (lambda index, answer: None)
        stop = threading.Event()
        answers: list[str] = [""] * len(requests)
        if len(requests) <= 1 or self.concurrency == 1:
            for index, request in enumerate(requests):
                answers[index] = self._call_with_retries(request, stop)
                on_answer(index, answers[index])
            return answers
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests)), thread_name_prefix="funnelqa-http")
        futures = {pool.submit(self._call_with_retries, request, stop): index for index, request in enumerate(requests)}
        try:
            for future in as_completed(futures):
                index = futures[future]
                answers[index] = future.result()  # raises only for a fault that stops every request
                on_answer(index, answers[index])
        except BaseException:
            # No server, a rejected key or Ctrl-C: the other workers stop at once instead of
            # spending their retries; the answers that arrived were handed over already.
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        return answers

    def _call_with_retries(self, request: Request, stop: threading.Event) -> str:
        """``call_once`` tried up to ``max_retries + 1`` times, with a logged backoff between tries.

        Returns the answer, or a failed Answer when this request cannot succeed (a bad request,
        retries spent). Raises BackendUnavailable when no request can (nothing listens at the
        address, a rejected key), and _Abandoned when ``stop`` is set, between tries or during a wait.
        """

        def attempt() -> str:
            if stop.is_set():
                raise _Abandoned(f"{self.label}: abandoned: the batch stopped")
            return self.call_once(request)

        def sleep(seconds: float) -> None:
            if stop.wait(seconds):
                raise _Abandoned(f"{self.label}: abandoned: the batch stopped")

        attempts = self.max_retries + 1
        retrying = Retrying(
            retry=retry_if_exception_type(RetryableFailure),
            stop=stop_after_attempt(attempts),
            wait=self._backoff,
            before_sleep=self._log_backoff,
            sleep=sleep,
            reraise=True,  # the last RetryableFailure itself, not tenacity's RetryError
        )
        try:
            return retrying(attempt)
        except RetryableFailure as last:
            tries = f"{attempts} attempt{'s' if attempts > 1 else ''}"
            if last.unreachable:
                raise BackendUnavailable(
                    redact(f"no server answers at {self.base_url} ({last.reason}; {tries}); start it or fix the URL")
                ) from None
            return Answer("", "failed", redact(f"{self.label}: gave up after {tries}: {last.reason}"))
        except (BackendUnavailable, _Abandoned):
            raise
        except BackendError as exc:
            # This request is wrong (e.g. HTTP 400); the others may be fine.
            return Answer("", "failed", str(exc))

    def _backoff(self, state: RetryCallState) -> float:
        """tenacity's wait: seconds before the next try, from the failure of the last one."""
        failure = state.outcome.exception()
        return backoff_delay(state.attempt_number - 1, self.backoff_base, self.backoff_cap, failure.retry_after, self._rng)

    def _log_backoff(self, state: RetryCallState) -> None:
        """tenacity's before_sleep: one stderr line per wait, e.g.
        ``gemini:m: HTTP 429: quota; retry 1 of 4 in 2.0 s, the server asked for 2 s``."""
        failure = state.outcome.exception()
        hint = f", the server asked for {failure.retry_after:g} s" if failure.retry_after is not None else ""
        _log_wait(redact(f"{self.label}: {failure.reason}; retry {state.attempt_number} of {self.max_retries} "
                         f"in {state.next_action.sleep:.1f} s{hint}"))
        with self._lock:
            self.http_retries += 1
