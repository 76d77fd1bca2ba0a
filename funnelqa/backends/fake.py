"""A scripted backend for tests and dry runs: no model, fully predictable answers.

``fake:SCRIPT.json`` reads a list of rules, tried in order against the whole prompt text:
``{"contains": "text", "response": "answer"}`` always gives the same answer;
``{"last": "text", ...}`` matches only the last message (the question a simulated user is asked,
not the earlier turns of its conversation); ``contains`` and ``last`` may be combined;
``{"contains": "text", "responses": ["a", "b"]}`` gives them in turn (a queue, last one repeats).
A rule without ``contains`` matches everything; an answer that is not a string is sent as JSON.
In Python, ``FakeBackend(responder)`` takes a function of the Request instead.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from funnelqa.backends import Backend, BackendOptions, ModelSpec, Request
from funnelqa.errors import BackendError, BackendUnavailable


def prompt_text(request: Request) -> str:
    """The contents of all the request's messages joined by newlines: the text ``contains`` is sought in."""
    return "\n".join(m["content"] for m in request.messages)


def _as_text(answer: Any) -> str:
    return answer if isinstance(answer, str) else json.dumps(answer, ensure_ascii=False)


class FakeBackend(Backend):
    """A backend that answers each request with ``responder(request)``. It keeps every request it
    saw in ``requests`` and the size of every ``generate`` batch in ``batches``, for tests."""

    def __init__(self, responder: Callable[[Request], str], name: str = "fake", identity: str | None = None):
        self.responder = responder
        self.spec = name
        # A script's answers are fixed by its content; a Python responder is known only to this object.
        self._identity = identity or uuid.uuid4().hex
        self.requests: list[Request] = []
        self.batches: list[int] = []

    @classmethod
    def from_spec(cls, spec: ModelSpec, options: BackendOptions) -> FakeBackend:
        """``fake:SCRIPT.json`` played by ``scripted``; ``options`` are ignored. Raises
        BackendUnavailable when the spec names no script, or it is missing, not JSON or not a list."""
        if not spec.model:
            raise BackendUnavailable("the fake backend needs a script: fake:PATH/TO/rules.json")
        path = Path(spec.model)
        try:
            text = path.read_text(encoding="utf-8")
            rules = json.loads(text)
        except FileNotFoundError:
            raise BackendUnavailable(f"fake backend script not found: {path}") from None
        except json.JSONDecodeError as exc:
            raise BackendUnavailable(f"fake backend script {path} is not valid JSON: {exc}") from None
        return cls(scripted(rules), name=spec.redacted(), identity=hashlib.sha256(text.encode()).hexdigest()[:16])

    @property
    def cache_id(self) -> str:
        """``fake#`` and the first 16 hex digits of the script's SHA-256, so an edited script is
        asked afresh; a Python responder's id is random, so no two share cached answers."""
        return f"fake#{self._identity}"

    def generate(self, requests: Sequence[Request]) -> list[str]:
        """``responder`` on each request in order; what it raises (a script's BackendError for a
        prompt no rule matches) comes through."""
        self.requests.extend(requests)
        self.batches.append(len(requests))
        return [self.responder(r) for r in requests]


def scripted(rules: list[dict[str, Any]]) -> Callable[[Request], str]:
    """A responder that plays ``rules`` (the module docstring's format): the first rule that
    matches answers; a ``responses`` queue gives its answers in turn and then repeats the last.
    Raises BackendUnavailable when ``rules`` is not a list; the responder raises BackendError for
    a prompt that no rule matches."""
    if not isinstance(rules, list):
        raise BackendUnavailable("a fake backend script is a JSON list of rules")
    queues = [list(rule.get("responses", [])) for rule in rules]

    def respond(request: Request) -> str:
        text = prompt_text(request)
        for rule, queue in zip(rules, queues):
            if rule.get("contains", "") not in text or rule.get("last", "") not in request.messages[-1]["content"]:
                continue
            if "response" in rule:
                return _as_text(rule["response"])
            if queue:
                return _as_text(queue.pop(0) if len(queue) > 1 else queue[0])
        raise BackendError(f"fake backend: no rule matches the prompt starting {text[:80]!r}")

    return respond
