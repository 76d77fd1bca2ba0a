"""``openai:MODEL@BASE_URL`` — any server that speaks OpenAI's chat completions (vLLM, llama.cpp, Ollama...).

``POST {BASE_URL}/chat/completions`` with httpx; an optional key from OPENAI_API_KEY is sent as a
Bearer token. Retries, backoff and concurrency are the shared policy of ``http_retry``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import httpx

from funnelqa.backends import Answer, BackendOptions, ModelSpec, Request
from funnelqa.backends.http_retry import (
    HTTPBackend,
    RetryableFailure,
    failure_for_status,
    make_http_client,
    parse_retry_after,
    transport_failure,
)

KEY_ENV = "OPENAI_API_KEY"


def chat_payload(model: str, request: Request) -> dict[str, Any]:
    """The JSON body of ``POST /chat/completions``: model, messages, max_tokens, temperature,
    seed, and for a ``json_schema`` a ``response_format`` of type json_schema named "answer"."""
    payload: dict[str, Any] = {
        "model": model,
        "messages": [{"role": m["role"], "content": m["content"]} for m in request.messages],
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "seed": request.seed,
    }
    if request.json_schema is not None:
        payload["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": request.json_schema},
        }
    return payload


def error_message(response: httpx.Response) -> str:
    """The server's own words: OpenAI and llama.cpp nest them under "error", vLLM puts them on top."""
    try:
        body = response.json()
    except ValueError:
        return response.text
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if body.get("message"):
            return str(body["message"])
    return response.text


class OpenAIBackend(HTTPBackend):
    """``openai:MODEL@BASE_URL``: one chat completion per request over httpx, through
    ``HTTPBackend``'s workers and retries; ``api_key``, when given, goes as a Bearer token.
    ``timeout`` is in seconds per request."""

    def __init__(
        self,
        model: str,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        concurrency: int = 8,
        max_retries: int = 5,
    ):
        super().__init__(
            # The spec as written, trailing '/' and all: it keys the cache. Requests go to the URL without it.
            label=f"openai:{model}@{base_url}",
            base_url=base_url.rstrip("/"),
            concurrency=concurrency,
            timeout=timeout,
            max_retries=max_retries,
        )
        self.model = model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = make_http_client(timeout, self.concurrency, headers=headers)
        self._url = f"{self.base_url}/chat/completions"

    @classmethod
    def from_spec(cls, spec: ModelSpec, options: BackendOptions) -> OpenAIBackend:
        """Model and base URL from the spec, the key from OPENAI_API_KEY if set, timeout,
        concurrency and max_retries from ``options``. Nothing is sent yet: a server that is not
        there shows up as BackendUnavailable on the first call."""
        return cls(
            spec.model,
            spec.base_url,
            api_key=os.environ.get(KEY_ENV) or None,
            timeout=options.timeout,
            concurrency=options.concurrency,
            max_retries=options.max_retries,
        )

    def call_once(self, request: Request) -> str:
        """One POST: the first choice's text as an Answer, "length" for finish_reason length,
        "blocked" for content_filter or a refusal, "empty" for no choice or no text. Raises
        RetryableFailure for HTTP 408/409/429/5xx, transport faults and bodies that are not a
        chat completion, BackendUnavailable for 401/403/404, BackendError for another 4xx."""
        try:
            response = self._http.post(self._url, json=chat_payload(self.model, request))
        except httpx.TransportError as exc:
            raise transport_failure(exc, self.timeout) from exc
        if response.status_code != 200:
            raise failure_for_status(
                self.label,
                response.status_code,
                error_message(response),
                retry_after=parse_retry_after(response.headers.get("Retry-After")),
                auth_hint=f"check {KEY_ENV}",
            )
        try:
            choices = response.json()["choices"]
            if not choices:
                # Like Gemini's empty candidates: an answer that says nothing, for the caller to report.
                return Answer("", "empty", "no choices in the answer")
            message = choices[0]["message"]
            finish = choices[0].get("finish_reason")
        except (json.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise RetryableFailure("the answer body is not a chat completion") from exc
        if not isinstance(message, dict) or not isinstance(message.get("content"), (str, type(None))):
            raise RetryableFailure("the answer's message is not a chat message with text")
        text = message.get("content") or ""
        if finish == "length":
            return Answer(text, "length", f"finish_reason length at max_tokens={request.max_tokens}")
        if finish == "content_filter" or message.get("refusal"):
            refusal = f": {message['refusal']}" if message.get("refusal") else ""
            return Answer(text, "blocked", f"finish_reason {finish}{refusal}")
        if not text.strip():
            # A tool call or a bare stop leaves no content.
            return Answer("", "empty", f"no text in the message (finish_reason {finish})")
        return Answer(text)

    def close(self) -> None:
        """Close the pooled httpx client."""
        self._http.close()
