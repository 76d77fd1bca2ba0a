"""``gemini:MODEL`` — Google's Gemini API through the official google-genai client.

The key comes from GEMINI_API_KEY (or GOOGLE_API_KEY). FUNNELQA_GEMINI_BASE_URL points the client
at another endpoint, which is how the tests reach their loopback server. The client's own retries
are off: retries, backoff and concurrency are the shared policy of ``http_retry``.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import httpx
import pydantic
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from funnelqa.backends import Answer, BackendOptions, ModelSpec, Request
from funnelqa.backends.http_retry import (
    HTTPBackend,
    RetryableFailure,
    failure_for_status,
    make_http_client,
    parse_retry_after,
    transport_failure,
)
from funnelqa.errors import BackendUnavailable, UsageError

BASE_URL_ENV = "FUNNELQA_GEMINI_BASE_URL"
KEY_ENVS = ("GEMINI_API_KEY", "GOOGLE_API_KEY")
DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
_ROLES = {"user": "user", "assistant": "model"}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")


def retry_delay_hint(error_details: Any) -> float | None:
    """Seconds from the ``google.rpc.RetryInfo`` that the API attaches to a 429, if any."""
    error = error_details.get("error", error_details) if isinstance(error_details, dict) else {}
    for detail in error.get("details") or []:
        if isinstance(detail, dict) and detail.get("@type", "").endswith("google.rpc.RetryInfo"):
            match = _DURATION.match(str(detail.get("retryDelay", "")))
            if match:
                return float(match.group(1))
    return None


def answer_text(response: Any) -> str:
    """The text of the first candidate. A blocked prompt or an empty candidate gives ""."""
    if not response.candidates:
        return ""
    content = response.candidates[0].content
    if content is None or not content.parts:
        return ""
    return "".join(part.text for part in content.parts if part.text and not part.thought)


# Finish reasons that mean a filter stopped the answer (the rest of the API's list: STOP, MAX_TOKENS,
# OTHER, and tool-call faults).
_BLOCKING_FINISH = frozenset({"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"})


def _name(value: Any) -> str:
    return str(getattr(value, "value", value) or "")


def answer_of(response: Any, max_tokens: int) -> Answer:
    """The first candidate's text with how it ended: blocked, cut at ``max_tokens``, empty or complete."""
    text = answer_text(response)
    if not response.candidates:
        feedback = response.prompt_feedback
        reason = _name(feedback.block_reason) if feedback is not None else ""
        if reason:
            message = f": {feedback.block_reason_message}" if feedback.block_reason_message else ""
            return Answer("", "blocked", f"prompt blocked: promptFeedback.blockReason {reason}{message}")
        return Answer("", "empty", "no candidates in the answer")
    finish = _name(response.candidates[0].finish_reason)
    if finish == "MAX_TOKENS":
        return Answer(text, "length", f"finishReason MAX_TOKENS at maxOutputTokens={max_tokens}")
    if finish in _BLOCKING_FINISH:
        ratings = response.candidates[0].safety_ratings or []
        flagged = [_name(r.category) for r in ratings if r.blocked]
        return Answer(text, "blocked", f"answer blocked: finishReason {finish}" + (f" ({', '.join(flagged)})" if flagged else ""))
    if not text.strip():
        return Answer("", "empty", f"an empty candidate (finishReason {finish or 'unset'})")
    return Answer(text)


def _retry_after(exc: genai_errors.APIError) -> float | None:
    """The server's wait hint: Google's RetryInfo in the body, else a Retry-After header."""
    hint = retry_delay_hint(exc.details)
    if hint is None:
        headers = getattr(getattr(exc, "response", None), "headers", None)
        if headers is not None:
            hint = parse_retry_after(headers.get("retry-after"))
    return hint


class GeminiBackend(HTTPBackend):
    """``gemini:MODEL``: one ``models.generate_content`` call per request, through ``HTTPBackend``'s
    workers and retries. System messages become the system instruction and assistant turns the
    "model" role; ``json_schema`` is sent as ``response_json_schema`` (plain JSON Schema).
    ``timeout`` is in seconds per request."""

    def __init__(
        self,
        model: str,
        api_key: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        timeout: float = 60.0,
        concurrency: int = 8,
        max_retries: int = 5,
    ):
        super().__init__(
            label=f"gemini:{model}", base_url=base_url, concurrency=concurrency, timeout=timeout, max_retries=max_retries
        )
        self.model = model
        # Our own httpx client: its pool fits our worker count, and its exceptions are the httpx
        # ones that http_retry classifies (google-genai would otherwise pick httpx2 when present).
        self._http = make_http_client(timeout, self.concurrency)
        self.client = genai.Client(
            api_key=api_key,
            vertexai=False,
            http_options=types.HttpOptions(
                base_url=base_url,
                timeout=max(1, round(timeout * 1000)),  # milliseconds
                retry_options=types.HttpRetryOptions(attempts=1),
                httpx_client=self._http,
            ),
        )

    @classmethod
    def from_spec(cls, spec: ModelSpec, options: BackendOptions) -> GeminiBackend:
        """The key from GEMINI_API_KEY, else GOOGLE_API_KEY; the endpoint from
        FUNNELQA_GEMINI_BASE_URL, else Google's; timeout, concurrency and max_retries from
        ``options``. Raises BackendUnavailable when no key is set (nothing is sent yet)."""
        api_key = next((os.environ[name] for name in KEY_ENVS if os.environ.get(name)), None)
        if not api_key:
            raise BackendUnavailable(
                "no Gemini API key: export GEMINI_API_KEY=... (or GOOGLE_API_KEY); get one at https://aistudio.google.com/apikey"
            )
        return cls(
            spec.model,
            api_key,
            base_url=os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL,
            timeout=options.timeout,
            concurrency=options.concurrency,
            max_retries=options.max_retries,
        )

    def _contents_and_config(self, request: Request) -> tuple[list[Any] | None, Any]:
        """The API's contents and config; (None, reason) for a request the API would reject with a 400."""
        system_parts = [m["content"] for m in request.messages if m["role"] == "system"]
        contents = []
        for message in request.messages:
            if message["role"] == "system":
                continue
            role = _ROLES.get(message["role"])
            if role is None:
                raise UsageError(f"{self.label}: unknown message role {message['role']!r}; use system, user or assistant")
            if not message["content"].strip():
                return None, f"a {message['role']} message is empty, and the Gemini API rejects empty parts"
            contents.append(types.Content(role=role, parts=[types.Part(text=message["content"])]))
        config = types.GenerateContentConfig(
            system_instruction="\n\n".join(system_parts) or None,
            temperature=request.temperature,
            max_output_tokens=request.max_tokens,
            seed=request.seed,
        )
        if request.json_schema is not None:
            # response_json_schema takes plain JSON Schema; response_schema would want Google's
            # OpenAPI subset and reject keywords such as additionalProperties.
            config.response_mime_type = "application/json"
            config.response_json_schema = request.json_schema
        return contents, config

    def call_once(self, request: Request) -> str:
        """One generateContent round trip: an Answer that is complete, "length" (cut at
        ``max_tokens``), "blocked" or "empty" (``answer_of``); a request with an empty message,
        which the API would refuse, is a "failed" Answer and is not sent. Raises RetryableFailure
        for HTTP 408/409/429/5xx, transport faults and unreadable bodies, BackendUnavailable for
        401/403/404, BackendError for another 4xx, UsageError for a role other than system,
        user or assistant."""
        contents, config = self._contents_and_config(request)
        if contents is None:
            return Answer("", "failed", f"{self.label}: not sent: {config}")
        try:
            response = self.client.models.generate_content(model=self.model, contents=contents, config=config)
        except genai_errors.APIError as exc:
            raise failure_for_status(
                self.label,
                exc.code,
                f"{exc.status or ''} {exc.message or ''}",
                retry_after=_retry_after(exc),
                auth_hint="check GEMINI_API_KEY",
            ) from exc
        except (genai_errors.UnknownApiResponseError, json.JSONDecodeError) as exc:
            raise RetryableFailure("the answer body is not JSON") from exc
        except pydantic.ValidationError as exc:
            raise RetryableFailure("the answer body does not have the generateContent shape") from exc
        except httpx.TransportError as exc:
            raise transport_failure(exc, self.timeout) from exc
        if response.candidates is None and response.prompt_feedback is None:
            # The API always sends one or the other (promptFeedback when it blocks the prompt).
            raise RetryableFailure("the answer has neither candidates nor promptFeedback")
        return answer_of(response, request.max_tokens)

    def close(self) -> None:
        """Close the genai client and its pooled httpx client."""
        self.client.close()
        self._http.close()
