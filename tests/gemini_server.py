"""Loopback fakes of model HTTP APIs, so tests drive the real clients without a network.

``FakeGeminiServer`` answers ``POST /{v1,v1beta}/models/{model}:generateContent`` with the JSON
shapes of the real Gemini API (candidates[].content.parts[].text, usageMetadata, and the error
body ``{"error": {"code", "message", "status"}}``). Point the Gemini backend at it with the
environment variable ``FUNNELQA_GEMINI_BASE_URL=server.url`` (and any GEMINI_API_KEY)::

    with FakeGeminiServer(responder=lambda body: "hi") as server:
        server.inject("429", "slow")          # the next two requests fail that way, in turn
        monkeypatch.setenv("FUNNELQA_GEMINI_BASE_URL", server.url)
        ...
        server.requests                       # every JSON body received, in arrival order
        server.paths, server.headers          # their paths and (lower-cased) headers

The responder maps a request body to the answer text; the default echoes the last user turn.
Faults, consumed first in, first out, one per request: an HTTP status such as ``"429"``,
``"500"``, ``"400"``, ``"403"`` (answered with that status and the API's error body);
``"slow"`` (waits ``slow_seconds``, longer than any client timeout a test sets, then answers);
``"malformed"`` (status 200 with a body that is not JSON); and, for Gemini, ``"blocked"`` (a
prompt blocked by the safety filter: promptFeedback.blockReason SAFETY, no candidates),
``"safety"`` (a candidate stopped with finishReason SAFETY and no text), ``"no-candidates"``
(``candidates: []``) and ``"hollow"`` (status 200, body ``{}``). A responder may also return
``Fault("blocked")`` (any fault) to fail every request for one prompt, not just the next one.

Like the real API, the Gemini fake answers 400 INVALID_ARGUMENT to a request holding an empty
text part, cuts an answer longer than ``generationConfig.maxOutputTokens`` (4 characters a
token) with finishReason MAX_TOKENS, attaches a RetryInfo to a 429 and, when ``retry_after``
is set, a Retry-After header too.
The server stops on ``__exit__`` and in any case after ``deadline_seconds``, so a stuck test
cannot leave it running. ``LoopbackServer`` is the API-neutral part, for fakes of other APIs.
"""

from __future__ import annotations

import json
import re
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Responder = Callable[[dict[str, Any]], str]


class Fault(str):
    """What a responder returns to answer with a fault instead of text, e.g. ``Fault("500")``."""


class LoopbackServer(ABC):
    """A threaded HTTP server on 127.0.0.1 with a queue of injected faults; subclasses speak one API."""

    def __init__(self, responder: Responder | None = None, *, slow_seconds: float = 10.0, deadline_seconds: float = 120.0):
        self.responder = responder or self.echo
        self.slow_seconds = slow_seconds
        self.requests: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.faults: deque[str] = deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()  # wakes handlers that sit on a "slow" fault
        self.stopped = threading.Event()  # set once the socket is closed, by __exit__ or the deadline
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._deadline = threading.Timer(deadline_seconds, self.stop)
        self._deadline.daemon = True

    # -- what a subclass defines ------------------------------------------------------------

    # Faults beyond the common ones that this API's fake knows how to answer (see special_fault).
    special_faults: frozenset[str] = frozenset()

    @abstractmethod
    def handles(self, path: str) -> bool:
        """Whether the path is the endpoint this fake serves."""

    @abstractmethod
    def answer_body(self, path: str, body: dict[str, Any], text: str) -> dict[str, Any]:
        """The API's success body carrying ``text`` as the model's answer."""

    @abstractmethod
    def error_body(self, status: int, message: str) -> dict[str, Any]:
        """The API's error body for an HTTP error status."""

    def error_headers(self, status: int) -> dict[str, str]:
        return {}

    def rejection(self, body: dict[str, Any]) -> tuple[int, str] | None:
        """(status, message) for a request the API refuses whatever the faults, else None."""
        return None

    def special_fault(self, fault: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """The 200 answer body for one of ``special_faults``."""
        raise ValueError(f"{type(self).__name__} has no fault {fault!r}")

    @staticmethod
    @abstractmethod
    def echo(body: dict[str, Any]) -> str:
        """The default responder: an answer that shows which prompt it answers."""

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> LoopbackServer:
        self._thread.start()
        self._deadline.start()
        return self

    def stop(self) -> None:
        with self._lock:
            if self._stopping.is_set():
                return
            self._stopping.set()
        self._deadline.cancel()
        # shutdown() waits for serve_forever to acknowledge, so only a started server may ask.
        if self._thread.ident is not None:
            self._httpd.shutdown()
        self._httpd.server_close()
        self.stopped.set()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def inject(self, *faults: str) -> None:
        for fault in faults:
            if not (fault.isdigit() or fault in {"slow", "malformed"} or fault in self.special_faults):
                raise ValueError(f"unknown fault {fault!r} for {type(self).__name__}")
        with self._lock:
            self.faults.extend(faults)

    # -- serving ----------------------------------------------------------------------------

    def _next_fault(self) -> str | None:
        with self._lock:
            return self.faults.popleft() if self.faults else None

    def _record(self, path: str, headers: dict[str, str], body: dict[str, Any]) -> None:
        with self._lock:
            self.paths.append(path)
            self.headers.append(headers)
            self.requests.append(body)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Idle keep-alive connections end on their own rather than hold a thread forever.
            timeout = 30

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path.split("?", 1)[0]
                try:
                    body = json.loads(raw or b"{}")
                except json.JSONDecodeError:
                    self._send(400, server.error_body(400, "Invalid JSON payload received."))
                    return
                server._record(path, {k.lower(): v for k, v in self.headers.items()}, body)
                if not server.handles(path):
                    self._send(404, server.error_body(404, f"Method not found: {path}"))
                    return
                rejected = server.rejection(body)
                if rejected is not None:
                    self._send(rejected[0], server.error_body(*rejected))
                    return
                fault = server._next_fault()
                if fault is None or fault == "slow":
                    if fault == "slow" and server._stopping.wait(server.slow_seconds):
                        return
                    text = server.responder(body)
                    if not isinstance(text, Fault):
                        self._send(200, server.answer_body(path, body, text))
                        return
                    fault = str(text)
                if fault.isdigit():
                    status = int(fault)
                    phrase = HTTPStatus(status).phrase
                    self._send(status, server.error_body(status, f"Injected fault: {phrase}."), server.error_headers(status))
                elif fault == "malformed":
                    self._send_raw(200, b"<html><body>upstream proxy hiccup", "text/html")
                else:
                    self._send(200, server.special_fault(fault, path, body))

            def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                self._send_raw(status, json.dumps(payload).encode("utf-8"), "application/json; charset=UTF-8", headers)

            def _send_raw(self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    # The client gave up (a "slow" fault past its timeout); nobody is listening.
                    self.close_connection = True

        return Handler


_GENERATE_PATH = re.compile(r"^/v1(?:beta|alpha)?/models/(?P<model>[^/:]+):generateContent$")

_GOOGLE_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def gemini_prompt_text(body: dict[str, Any]) -> str:
    """The text of the last user turn of a generateContent request body."""
    for content in reversed(body.get("contents", [])):
        if content.get("role", "user") == "user":
            return "".join(part.get("text", "") for part in content.get("parts", []))
    return ""


class FakeGeminiServer(LoopbackServer):
    """The generateContent endpoint of the Gemini API. The default responder echoes the last user turn."""

    @staticmethod
    def echo(body: dict[str, Any]) -> str:
        return f"echo: {gemini_prompt_text(body)}"

    def handles(self, path: str) -> bool:
        return _GENERATE_PATH.match(path) is not None

    def __init__(self, responder: Responder | None = None, *, retry_after: str | None = None, **options: Any):
        super().__init__(responder, **options)
        self.retry_after = retry_after

    def error_headers(self, status: int) -> dict[str, str]:
        return {"Retry-After": self.retry_after} if status == 429 and self.retry_after is not None else {}

    def rejection(self, body: dict[str, Any]) -> tuple[int, str] | None:
        for content in body.get("contents", []):
            for part in content.get("parts", []):
                if "text" in part and not part["text"]:
                    return 400, "Unable to submit request because it has an empty text parameter. Add a value to the parameter and try again."
        return None

    def answer_body(self, path: str, body: dict[str, Any], text: str) -> dict[str, Any]:
        model = _GENERATE_PATH.match(path)["model"]
        prompt_tokens = len(json.dumps(body.get("contents", [])).split())
        finish = "STOP"
        budget = (body.get("generationConfig") or {}).get("maxOutputTokens")
        if budget is not None and len(text) > 4 * budget:
            text, finish = text[: 4 * budget], "MAX_TOKENS"
        answer_tokens = -(-len(text) // 4)
        return {
            "candidates": [
                {
                    "content": {"parts": [{"text": text}], "role": "model"},
                    "finishReason": finish,
                    "index": 0,
                }
            ],
            "usageMetadata": {
                "promptTokenCount": prompt_tokens,
                "candidatesTokenCount": answer_tokens,
                "totalTokenCount": prompt_tokens + answer_tokens,
            },
            "modelVersion": model,
            "responseId": f"fake-{len(self.requests)}",
        }

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        error: dict[str, Any] = {"code": status, "message": message, "status": _GOOGLE_STATUS.get(status, "UNKNOWN")}
        if status == 429:
            # The real API says how long to wait; "0s" keeps tests fast while exercising the path.
            error["details"] = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "0s"}]
        return {"error": error}

    special_faults = frozenset({"blocked", "safety", "no-candidates", "hollow"})

    def special_fault(self, fault: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        if fault == "hollow":
            return {}
        usage = {"promptTokenCount": 1, "totalTokenCount": 1}
        if fault == "no-candidates":
            return {"candidates": [], "usageMetadata": usage, "modelVersion": _GENERATE_PATH.match(path)["model"]}
        if fault == "safety":
            # The real API sends the candidate without content when it stops for safety.
            return {
                "candidates": [{
                    "finishReason": "SAFETY",
                    "index": 0,
                    "safetyRatings": [{"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True}],
                }],
                "usageMetadata": usage,
                "modelVersion": _GENERATE_PATH.match(path)["model"],
            }
        return {
            "promptFeedback": {
                "blockReason": "SAFETY",
                "safetyRatings": [{"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH"}],
            },
            "usageMetadata": {"promptTokenCount": 1, "totalTokenCount": 1},
            "modelVersion": _GENERATE_PATH.match(path)["model"],
        }
